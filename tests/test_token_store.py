"""Study tokens as data: derivation, validity boundaries, revocation and the identity lock."""

from __future__ import annotations

import datetime as dt
import re
import shutil

import pytest
import sqlalchemy as sa

from control import db
from control.tokens import store

pytestmark = pytest.mark.inprocess

KEY = "k" * 64
NOW = dt.datetime(2026, 3, 10, 12, 0)


@pytest.fixture
def connection(tmp_path, migrated_database):
    shutil.copyfile(migrated_database, tmp_path / migrated_database.name)
    engine = db.make_engine(db.default_url(tmp_path))
    with engine.begin() as opened:
        yield opened
    engine.dispose()


def facts(study_uid: str = "1.2.3", study_date: str = "20260301", patient_id: str = "P1") -> store.StudyFacts:
    return store.StudyFacts(study_uid, "orthanc-" + study_uid, "Doe^Jane", patient_id, "19800101", study_date)


def test_tokens_are_64_alphanumerics_stable_and_unguessable() -> None:
    token = store.derive_token(KEY, "1.2.3", 1)
    assert re.fullmatch(r"[A-Za-z0-9]{64}", token)
    assert store.derive_token(KEY, "1.2.3", 1) == token
    assert store.derive_token(KEY, "1.2.3", 2) != token
    assert store.derive_token(KEY, "1.2.4", 1) != token
    assert store.derive_token("another key", "1.2.3", 1) != token
    # Character use is spread over the whole alphabet (a weak encoding would show in 2,000 tokens).
    sample = "".join(store.derive_token(KEY, f"1.2.{n}", 1) for n in range(2000))
    counts = [sample.count(character) for character in store.ALPHABET]
    assert min(counts) > 0.7 * len(sample) / 62 and max(counts) < 1.3 * len(sample) / 62


def test_the_same_study_gets_the_same_token_until_revoked(connection) -> None:
    first, new = store.issue(connection, KEY, facts(), NOW)
    again, new_again = store.issue(connection, KEY, facts(), NOW + dt.timedelta(days=1))
    assert new and not new_again
    assert first.token == again.token
    assert store.find(connection, first.token).id == first.id

    store.revoke(connection, first.id, NOW)
    assert store.find(connection, first.token).state(60, NOW.date()) is store.TokenState.REVOKED
    renewed, new = store.issue(connection, KEY, facts(), NOW)
    assert new and renewed.token != first.token


def test_the_database_alone_does_not_hold_the_token(connection) -> None:
    token, _ = store.issue(connection, KEY, facts(), NOW)
    dump = "\n".join(str(tuple(row)) for row in connection.execute(sa.select(db.study_tokens)))
    assert token.token not in dump


@pytest.mark.parametrize(
    ("study_date", "days", "last_day"),
    [
        ("20260301", 60, dt.date(2026, 4, 30)),
        ("20260301", 7, dt.date(2026, 3, 8)),
        ("", 60, dt.date(2026, 5, 9)),  # no date: counted from the day of issue
        ("2026031", 60, dt.date(2026, 5, 9)),  # malformed
        ("20260230", 60, dt.date(2026, 5, 9)),  # no such day
        ("29990101", 60, dt.date(2026, 5, 9)),  # in the future: no eternal links
    ],
)
def test_validity_counts_from_the_study_date_or_the_day_of_issue(
    connection, study_date, days, last_day
) -> None:
    token, _ = store.issue(connection, KEY, facts(study_date=study_date), NOW)
    assert token.accessible_until(days) == last_day
    assert token.state(days, last_day) is store.TokenState.VALID
    assert token.state(days, last_day + dt.timedelta(days=1)) is store.TokenState.EXPIRED


def test_an_extension_moves_the_last_day(connection) -> None:
    token, _ = store.issue(connection, KEY, facts(), NOW)
    store.extend(connection, token.id, dt.date(2027, 1, 31))
    token = store.get(connection, token.id)
    assert token.state(60, dt.date(2027, 1, 31)) is store.TokenState.VALID
    assert token.state(60, dt.date(2027, 2, 1)) is store.TokenState.EXPIRED


def test_revoking_a_patient_revokes_all_their_links(connection) -> None:
    one, _ = store.issue(connection, KEY, facts("1.1"), NOW)
    two, _ = store.issue(connection, KEY, facts("1.2"), NOW)
    other, _ = store.issue(connection, KEY, facts("1.3", patient_id="P2"), NOW)
    assert store.revoke_patient(connection, "P1", NOW) == 2
    states = {t.token: store.find(connection, t.token).state(60, NOW.date()) for t in (one, two, other)}
    assert states == {
        one.token: store.TokenState.REVOKED,
        two.token: store.TokenState.REVOKED,
        other.token: store.TokenState.VALID,
    }


@pytest.mark.parametrize("presented", ["", "short", "x" * 64, "!" * 64, "a" * 65])
def test_made_up_tokens_find_nothing(connection, presented: str) -> None:
    store.issue(connection, KEY, facts(), NOW)
    assert store.find(connection, presented) is None


def test_wrong_birth_dates_lock_the_link_for_longer_each_time_then_hold_it(connection) -> None:
    token, _ = store.issue(connection, KEY, facts(), NOW)
    now = NOW
    for lock in store.IDENTITY_LOCKS:
        answers = [
            store.identity_answer(connection, token.id, False, now) for _ in range(store.IDENTITY_ATTEMPTS)
        ]
        assert answers == [store.IdentityAnswer.WRONG] * (store.IDENTITY_ATTEMPTS - 1) + [
            store.IdentityAnswer.LOCKED
        ]
        locked = store.get(connection, token.id)
        assert locked.identity_locked(now + lock - dt.timedelta(seconds=1))
        assert not locked.identity_locked(now + lock + dt.timedelta(seconds=1))
        # While locked, even the right answer is not looked at.
        assert store.identity_answer(connection, token.id, True, now) is store.IdentityAnswer.CLOSED
        now += lock + dt.timedelta(seconds=1)
    answers = [
        store.identity_answer(connection, token.id, False, now) for _ in range(store.IDENTITY_ATTEMPTS)
    ]
    assert answers[-1] is store.IdentityAnswer.HELD
    held = store.get(connection, token.id)
    assert held.identity_held and held.identity_locked(now + dt.timedelta(days=365))
    assert store.count_held(connection) == 1

    store.release_identity(connection, token.id)
    assert not store.get(connection, token.id).identity_locked(now)
    assert store.identity_answer(connection, token.id, True, now) is store.IdentityAnswer.ACCEPTED
    assert store.count_held(connection) == 0
