"""The activity log's retention: rows past ``activity_keep_years`` are exported, then removed.

Old rows are written straight into the table of a running portal (as years of use would leave
them); ``./pacs activity prune`` must write exactly those past the limit to a private gzipped CSV
file and then remove exactly them, and leave every other row as it was.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import stat
import time

import pytest
import sqlalchemy as sa

from control import db
from control.activity import prune_activity, retention_cutoff, take_daily_lease
from control.site import Site

from conftest import Stack, make_stack

pytestmark = pytest.mark.stack


def old_row(at: dt.datetime, patient: str) -> dict:
    return {
        "at": at,
        "action": "download",
        "outcome": "ok",
        "user_id": None,
        "username": "dr.old",
        "token_id": "",
        "client_address": "10.0.0.9",
        "user_agent": "Browser, with a comma",
        "patient": patient,
        "study": "1.2.3",
        "detail": '{"files": 3}',
    }


def test_retention_exports_then_removes_exactly_the_rows_past_it(stack: Stack) -> None:
    engine = Site(stack.data).engine
    now = db.utcnow()
    cutoff = retention_cutoff(2, now)
    ages = {
        "OLDEST^ONE": now - dt.timedelta(days=6 * 365),
        "JUST^PAST": cutoff - dt.timedelta(minutes=5),
        "JUST^WITHIN": cutoff + dt.timedelta(minutes=5),
        "LAST^YEAR": now - dt.timedelta(days=365),
    }
    with engine.begin() as connection:
        for patient, at in ages.items():
            connection.execute(db.activity.insert().values(old_row(at, patient)))
        before = connection.execute(sa.select(db.activity).order_by(db.activity.c.id)).all()
    past = [row for row in before if row.at < retention_cutoff(2, db.utcnow())]
    assert {row.patient for row in past} == {"OLDEST^ONE", "JUST^PAST"}

    assert stack.pacs("config", "set", "activity_keep_years", "2").returncode == 0
    try:
        pruned = stack.pacs("activity", "prune")
    finally:
        stack.pacs("config", "set", "activity_keep_years", "0")
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith("2 events older than")

    exports = list((stack.data / "activity-exports").glob("activity-before-*.csv.gz"))
    assert len(exports) == 1
    assert stat.S_IMODE(exports[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(exports[0].parent.stat().st_mode) == 0o700
    with gzip.open(exports[0], "rt", newline="", encoding="utf-8") as file:
        exported = list(csv.DictReader(file))
    assert [int(row["id"]) for row in exported] == [row.id for row in past]
    assert exported[0]["patient"] == "OLDEST^ONE"
    assert exported[0]["user_agent"] == "Browser, with a comma"
    assert exported[0]["at"] == past[0].at.isoformat(timespec="microseconds") + "Z"

    with engine.connect() as connection:
        after = connection.execute(sa.select(db.activity).order_by(db.activity.c.id)).all()
    kept = [row for row in before if row not in past]
    # Every other row is still there, unchanged.
    assert after[: len(kept)] == kept
    assert all(row.at >= retention_cutoff(2, now) for row in after)


def test_with_no_limit_nothing_is_removed(stack: Stack) -> None:
    engine = Site(stack.data).engine
    with engine.begin() as connection:
        connection.execute(
            db.activity.insert().values(old_row(db.utcnow() - dt.timedelta(days=40 * 365), "ANCIENT"))
        )
        count = connection.execute(sa.select(sa.func.count()).select_from(db.activity)).scalar_one()
    shown = stack.pacs("activity", "prune")
    assert "keeps everything" in shown.stdout
    assert prune_activity(engine, stack.data / "activity-exports", 0).rows == 0
    with engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(db.activity)).scalar_one() == count


def test_one_worker_a_day_takes_the_clean_up(stack: Stack) -> None:
    engine = Site(stack.data).engine
    day = dt.date.today() + dt.timedelta(days=3650)  # a day no worker of this stack reached
    with engine.begin() as connection:
        assert take_daily_lease(connection, day)
    with engine.begin() as connection:
        assert not take_daily_lease(connection, day)
        assert take_daily_lease(connection, day + dt.timedelta(days=1))
    with engine.begin() as connection:  # back to a day the real workers will reach
        connection.execute(
            db.revisions.update().where(db.revisions.c.name == "activity-retention").values(value=0)
        )


def test_the_portal_applies_the_retention_by_itself_in_one_worker(tmp_path) -> None:
    stack = make_stack(tmp_path / "data")
    prepared = stack.pacs("prepare")
    assert prepared.returncode == 0, prepared.stderr
    assert stack.pacs("config", "set", "activity_keep_years", "1").returncode == 0
    engine = Site(stack.data).engine
    with engine.begin() as connection:
        for years in (3, 2):
            connection.execute(
                db.activity.insert().values(old_row(db.utcnow() - dt.timedelta(days=365 * years), "OLD"))
            )
    stack.start()
    try:
        # The workers look soon after they start; only one of them does the work.
        deadline = time.monotonic() + 240
        while True:
            with engine.connect() as connection:
                left = connection.execute(
                    sa.select(sa.func.count()).select_from(db.activity).where(db.activity.c.patient == "OLD")
                ).scalar_one()
            if left == 0:
                break
            assert time.monotonic() < deadline, "the old rows were never removed"
            time.sleep(2)
        exports = list((stack.data / "activity-exports").glob("*.csv.gz"))
        assert len(exports) == 1
        with gzip.open(exports[0], "rt", newline="", encoding="utf-8") as file:
            assert [row["patient"] for row in csv.DictReader(file)] == ["OLD", "OLD"]
    finally:
        stack.stop()
    assert "activity retention: 2 rows older than" in (stack.data / "logs" / "control.log").read_text()
