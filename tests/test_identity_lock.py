"""The birth-date question of patients' links: escalating locks, a hold the admin releases, no date.

Wrong dates are posted as the page's form posts them; the admin looks at the study links page in
Chromium and releases the link there.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import sqlalchemy as sa
from test_tokens import StoredStudy, local, make_link, store_study

from control import db
from control.site import Site
from control.tokens import store

from browser import chromium
from conftest import ADMIN_PASSWORD, Stack, c_store, csrf_token, fresh_study, orthanc_id

pytestmark = pytest.mark.stack


@pytest.fixture
def identity_check(stack: Stack) -> Iterator[None]:
    assert stack.pacs("config", "set", "token_identity_check", "yes").returncode == 0
    yield
    assert stack.pacs("config", "set", "token_identity_check", "no").returncode == 0


@pytest.fixture(scope="module")
def doctor(stack: Stack) -> requests.Session:
    return stack.sign_in("admin", ADMIN_PASSWORD)


def answer(link: str, birth_date: str, session: requests.Session | None = None) -> requests.Response:
    session = session or requests.Session()
    page = session.get(link)
    return session.post(link, data={"birth_date": birth_date, "csrf_token": csrf_token(page.text)})


def wrong_answers(link: str, count: int = 5) -> list[int]:
    return [answer(link, f"1980-01-{day:02d}").status_code for day in range(1, count + 1)]


def token_row(stack: Stack, study: StoredStudy) -> sa.Row:
    with Site(stack.data).engine.connect() as connection:
        return connection.execute(
            sa.select(db.study_tokens).where(
                db.study_tokens.c.study_uid == study.study_uid, db.study_tokens.c.revoked_at.is_(None)
            )
        ).one()


def wait_out_the_lock(stack: Stack, study: StoredStudy) -> dt.timedelta:
    """Move the link's lock into the past, as waiting would; return how long it was set for."""
    row = token_row(stack, study)
    length = row.identity_locked_until - db.utcnow()
    with Site(stack.data).engine.begin() as connection:
        connection.execute(
            db.study_tokens.update()
            .where(db.study_tokens.c.id == row.id)
            .values(identity_locked_until=db.utcnow() - dt.timedelta(seconds=1))
        )
    return length


def events(stack: Stack, action: str, token_id: str) -> list[sa.Row]:
    with Site(stack.data).engine.connect() as connection:
        return connection.execute(
            sa.select(db.activity).where(db.activity.c.action == action, db.activity.c.token_id == token_id)
        ).all()


def test_wrong_birth_dates_lock_for_longer_then_hold_the_link_until_the_admin_releases_it(
    stack: Stack, doctor: requests.Session, identity_check: None
) -> None:
    study = store_study(stack, "CT_small.dcm")
    made = make_link(doctor, stack, study)
    link = local(stack, made["link"])

    assert wrong_answers(link) == [403, 403, 403, 403, 429]
    first = wait_out_the_lock(stack, study)
    assert dt.timedelta(minutes=14) < first <= dt.timedelta(minutes=15)

    assert wrong_answers(link) == [403, 403, 403, 403, 429]
    locked = requests.get(link)
    assert locked.status_code == 429 and "locked for now" in locked.text
    second = wait_out_the_lock(stack, study)
    assert second > dt.timedelta(hours=1)

    early = requests.Session()
    early_form = csrf_token(early.get(link).text)
    held = wrong_answers(link)
    assert held == [403, 403, 403, 403, 429]
    # Held: nobody gets in, not even with the right date on a form opened before, and no time
    # opens it again.
    refused = early.post(link, data={"birth_date": "1970-02-15", "csrf_token": early_form})
    assert refused.status_code == 429 and "this link is held" in refused.text.lower()
    assert "Study date/time" not in refused.text
    assert token_row(stack, study).identity_locked_until is None
    script = requests.get(link, headers={"Accept": "application/json"})
    assert script.status_code == 429 and "held" in script.json()["message"]
    assert len(events(stack, "token-identity-locked", made["token_id"])) == 3

    with chromium() as browser:
        page = browser.new_page()
        page.goto(f"{stack.url}/login")
        page.fill("#username", "admin")
        page.fill("#password", ADMIN_PASSWORD)
        with page.expect_navigation():
            page.click("button[type=submit]")
        page.goto(f"{stack.url}/admin/tokens")
        assert "held after repeated wrong dates of birth" in page.locator("#held-links").inner_text()
        row = page.locator("tr", has_text=made["token_id"])
        assert "held" in row.locator("td.identity").inner_text()
        with page.expect_navigation():
            row.get_by_role("link", name=made["token_id"]).click()
        assert "nobody can open the link until you release it" in page.content()
        with page.expect_navigation():
            page.get_by_role("button", name="Release: ask the birth date again").click()
        assert "Released" in page.content()
    assert len(events(stack, "token-identity-released", made["token_id"])) == 1

    patient = requests.Session()
    assert "Study date/time" in answer(link, "1970-02-15", patient).text


def test_answers_sent_at_once_are_each_counted(
    stack: Stack, doctor: requests.Session, identity_check: None
) -> None:
    study = store_study(stack, "CT_small.dcm")
    link = local(stack, make_link(doctor, stack, study)["link"])
    forms = []
    for _ in range(20):
        session = requests.Session()
        forms.append((session, csrf_token(session.get(link).text)))

    def post(form: tuple[requests.Session, str]) -> int:
        session, token = form
        return session.post(link, data={"birth_date": "1981-03-03", "csrf_token": token}).status_code

    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(post, forms))
    # Five wrong answers are looked at; every other one meets the lock.
    assert codes.count(403) == store.IDENTITY_ATTEMPTS - 1
    assert codes.count(429) == 20 - codes.count(403)
    assert token_row(stack, study).identity_locks == 1


def test_a_link_to_a_study_without_birth_date_says_that_it_asks_nothing(
    stack: Stack, doctor: requests.Session, identity_check: None
) -> None:
    dataset = fresh_study("MR_small.dcm")
    if "PatientBirthDate" in dataset:
        del dataset.PatientBirthDate
    assert c_store(stack, dataset) == 0
    study = StoredStudy(
        dataset.StudyInstanceUID,
        dataset.SeriesInstanceUID,
        dataset.SOPInstanceUID,
        orthanc_id(stack, dataset.StudyInstanceUID),
        dataset.PatientID,
        "",
    )
    made = make_link(doctor, stack, study)
    assert "opens without the birth-date question" in made["warning"]
    [logged] = events(stack, "token-made", made["token_id"])
    assert "no birth date" in logged.detail
    listed = doctor.get(f"{stack.url}/admin/tokens", params={"patient_id": study.patient_id}).text
    assert "none: no birth date on file" in listed
    # The shell's link says so too.
    shell = stack.pacs("token", study.study_uid)
    assert shell.returncode == 0 and "opens without the birth-date question" in shell.stderr
    # What the admin was told holds: the link opens unasked.
    assert "Study date/time" in requests.get(local(stack, made["link"])).text
