"""Study links that never surprise, in Chromium over https and from a shell.

"Copy study link" says until when the link works before anything is copied; a link that has
already expired (an old study) is not handed out: the page says it would not open and what an
admin can do. ``./pacs token`` says the same. A patient whose link has expired sees how to reach
the institution, and an attached PDF report is offered on the patient's page on its own.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterator

import pytest
import requests
from playwright.sync_api import Browser, Page
from test_uploads import a_pdf

from control import accounts
from control.site import Site

from browser import DESKTOP, chromium, screenshot, sign_in
from conftest import ADMIN_PASSWORD, SITE_NAME, TLSStack, c_store, csrf_token, fresh_study, orthanc_id

pytestmark = [pytest.mark.stack, pytest.mark.browser]

PASSWORD = "study links reader 1"
OLD_STUDY_DATE = "20010612"


@pytest.fixture(scope="module")
def browser(tls_stack: TLSStack) -> Iterator[Browser]:
    with chromium(tls_stack) as running:
        yield running


def signed_in(
    browser: Browser, stack: TLSStack, username: str = "admin", password: str = ADMIN_PASSWORD
) -> Page:
    page = browser.new_context(viewport=DESKTOP, permissions=["clipboard-read", "clipboard-write"]).new_page()
    sign_in(page, stack, username, password)
    return page


def results_of(page: Page, stack: TLSStack, patient_id: str) -> None:
    page.goto(f"{stack.browser_url}/query/studies?patient_id={patient_id}")


def patient_link(stack: TLSStack, study_uid: str) -> str:
    staff = stack.sign_in()
    answer = staff.post(
        f"{stack.url}/tokens/studies/{orthanc_id(stack, study_uid)}/link",
        headers={"X-CSRFToken": csrf_token(staff.get(f"{stack.url}/").text)},
    ).json()
    return f"https://{SITE_NAME}:{stack.web_port}/token?{answer['link'].split('?', 1)[1]}"


def fetch(page: Page, address: str) -> tuple[int, str, bytes]:
    """GET an address from the page, as its links do: status, content type and body."""
    status, kind, body = page.evaluate(
        """async (address) => {
            const response = await fetch(address);
            const body = new Uint8Array(await response.arrayBuffer());
            return [response.status, response.headers.get("content-type"), Array.from(body)];
        }""",
        address,
    )
    return status, kind, bytes(body)


def test_the_end_date_is_said_before_the_link_is_copied(browser: Browser, tls_stack: TLSStack) -> None:
    dataset = fresh_study("CT_small.dcm")
    assert c_store(tls_stack, dataset) == 0
    page = signed_in(browser, tls_stack)
    results_of(page, tls_stack, dataset.PatientID)
    page.evaluate("navigator.clipboard.writeText('nothing yet')")
    page.get_by_role("button", name="Copy study link").click()
    until = (dt.date.today() + dt.timedelta(days=60)).isoformat()  # the study is today's; 60 days
    note = page.locator(".copy-note")
    note.get_by_text(f"This link works until {until} (60 days from today).").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == "nothing yet"
    page.get_by_role("button", name="Copy the link").click()
    note.get_by_text("Copied to the clipboard.").wait_for()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith(f"https://{SITE_NAME}:{tls_stack.web_port}/token?")
    assert page.input_value(".copied input") == copied
    assert until in note.inner_text()
    screenshot(page, "copy-study-link")


def test_an_expired_link_is_not_handed_out_and_the_admin_is_shown_where_to_extend_it(
    browser: Browser, tls_stack: TLSStack
) -> None:
    dataset = fresh_study("MR_small.dcm", study_date=OLD_STUDY_DATE)
    assert c_store(tls_stack, dataset) == 0
    page = signed_in(browser, tls_stack)
    results_of(page, tls_stack, dataset.PatientID)
    page.evaluate("navigator.clipboard.writeText('nothing yet')")
    page.get_by_role("button", name="Copy study link").click()
    note = page.locator(".copy-note")
    note.get_by_text("This link expired on 2001-08-11: it would not open the study.").wait_for()
    assert "An administrator can extend it on Administration, Study links." in note.inner_text()
    assert page.get_by_role("button", name="Copy the link").is_hidden()
    assert page.locator(".copied input").is_hidden()
    assert page.evaluate("navigator.clipboard.readText()") == "nothing yet"
    screenshot(page, "copy-expired-study-link")
    with page.expect_navigation():
        page.get_by_role("link", name="Extend it").click()
    assert "/admin/tokens/" in page.url
    page.fill("#extend_until", (dt.date.today() + dt.timedelta(days=7)).isoformat())
    with page.expect_navigation():
        page.get_by_role("button", name="Extend").click()

    results_of(page, tls_stack, dataset.PatientID)
    page.get_by_role("button", name="Copy study link").click()
    page.locator(".copy-note").get_by_text("(7 days from today)").wait_for()
    assert page.get_by_role("button", name="Copy the link").is_visible()


def test_a_user_who_is_not_an_admin_is_told_whom_to_ask(browser: Browser, tls_stack: TLSStack) -> None:
    with Site(tls_stack.data).engine.begin() as connection:
        if not accounts.find_by_username(connection, "links.reader"):
            accounts.create_user(connection, "links.reader", PASSWORD)
    dataset = fresh_study("CT_small.dcm", study_date=OLD_STUDY_DATE)
    assert c_store(tls_stack, dataset) == 0
    page = signed_in(browser, tls_stack, "links.reader", PASSWORD)
    results_of(page, tls_stack, dataset.PatientID)
    page.get_by_role("button", name="Copy study link").click()
    page.locator(".copy-note").get_by_text("An administrator can extend it").wait_for()
    assert (
        page.get_by_role("link", name="Extend it").count() == 0
        or page.get_by_role("link", name="Extend it").is_hidden()
    )


def test_pacs_token_says_the_same(tls_stack: TLSStack) -> None:
    fresh = fresh_study("CT_small.dcm")
    old = fresh_study("CT_small.dcm", study_date=OLD_STUDY_DATE)
    assert c_store(tls_stack, fresh) == 0 and c_store(tls_stack, old) == 0
    works = tls_stack.pacs("token", fresh.StudyInstanceUID)
    assert works.returncode == 0, works.stderr
    assert works.stdout.strip().startswith("https://")
    until = (dt.date.today() + dt.timedelta(days=60)).isoformat()
    assert f"This link works until {until} (60 days from today)." in works.stderr
    expired = tls_stack.pacs("token", old.StudyInstanceUID)
    assert expired.returncode == 1
    assert expired.stdout == ""
    assert "This link expired on 2001-08-11: it would not open the study." in expired.stderr
    assert "An administrator can extend it on Administration, Study links." in expired.stderr


def test_a_patient_with_an_expired_link_sees_how_to_reach_the_institution(
    browser: Browser, tls_stack: TLSStack
) -> None:
    dataset = fresh_study("CT_small.dcm", study_date=OLD_STUDY_DATE)
    assert c_store(tls_stack, dataset) == 0
    link = patient_link(tls_stack, dataset.StudyInstanceUID)
    for name, value in (("contact_phone", "+30 210 123 4567"), ("contact_email", "imaging@example.org")):
        done = tls_stack.pacs("config", "set", name, value)
        assert done.returncode == 0, done.stderr
    try:
        page = browser.new_context(viewport=DESKTOP).new_page()
        page.goto(link)
        assert page.locator("h1").inner_text() == "This link has expired"
        contact = page.locator("p.contact")
        settings = Site(tls_stack.data).load_settings()
        assert contact.inner_text() == (
            f"Contact {settings.institution}, {settings.department}: phone +30 210 123 4567, "
            "e-mail imaging@example.org."
        )
        assert (
            contact.get_by_role("link", name="+30 210 123 4567").get_attribute("href") == "tel:+302101234567"
        )
        assert contact.get_by_role("link", name="imaging@example.org").get_attribute("href") == (
            "mailto:imaging@example.org"
        )
        screenshot(page, "patient-link-expired")
    finally:
        for name in ("contact_phone", "contact_email"):
            tls_stack.pacs("config", "set", name, "")


def test_an_attached_report_is_offered_on_the_patients_page(browser: Browser, tls_stack: TLSStack) -> None:
    dataset = fresh_study("CT_small.dcm")
    assert c_store(tls_stack, dataset) == 0
    report = a_pdf()
    study_id = orthanc_id(tls_stack, dataset.StudyInstanceUID)
    made = requests.post(
        f"{tls_stack.orthanc_url}/tools/create-dicom",
        json={
            "Parent": study_id,
            "Tags": {"Modality": "DOC", "SeriesDescription": "Radiology report"},
            "Content": "data:application/pdf;base64," + base64.b64encode(report).decode(),
        },
        auth=tls_stack.orthanc_auth,
    )
    assert made.status_code == 200, made.text
    page = browser.new_context(viewport=DESKTOP).new_page()
    page.goto(patient_link(tls_stack, dataset.StudyInstanceUID))
    card = page.locator(".card.report")
    assert card.locator("h2").inner_text() == "Radiology report"
    href = card.get_by_role("link", name="Open the report (PDF)").get_attribute("href")
    status, kind, body = fetch(page, href or "")
    assert (status, kind) == (200, "application/pdf")
    assert body == report
    screenshot(page, "patient-with-report")
    # Another study's document does not open with this link.
    other = fresh_study("MR_small.dcm")
    assert c_store(tls_stack, other) == 0
    instance = made.json()["ID"]
    other_link = patient_link(tls_stack, other.StudyInstanceUID)
    refused, _kind, _body = fetch(page, f"/token/report/{instance}?{other_link.split('?', 1)[1]}")
    assert refused == 404
