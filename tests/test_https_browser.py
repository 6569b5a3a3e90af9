"""The portal with SSL on, used in Chromium as its users use it: every flow clicked and typed.

The portal runs with the site's own certificate (``tls_stack``, made with openssl); Chromium trusts
it and reaches the portal by its name, https://pacs.test:PORT. Under https browsers send what
they really send (fetch metadata, ``Origin`` under the pages' referrer policies, no ``Referer``
from patients' pages), and the session lives in a ``__Host-`` cookie.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
from playwright.sync_api import Browser, Page
from test_uploads import a_pdf
from test_worklist import order

from control import accounts, db
from control.site import Site

from browser import chromium, sign_in, submit, wait_for_image
from conftest import ADMIN_PASSWORD, SITE_NAME, TLSStack, c_store, fresh_study, orthanc_id

pytestmark = [pytest.mark.stack, pytest.mark.browser]

PASSWORD = "https browser user 1"


@pytest.fixture(scope="module")
def browser(tls_stack: TLSStack) -> Iterator[Browser]:
    with chromium(tls_stack) as running:
        yield running


def account(stack: TLSStack, username: str, **rights: bool) -> str:
    with Site(stack.data).engine.begin() as connection:
        if not accounts.find_by_username(connection, username):
            accounts.create_user(connection, username, PASSWORD, **rights)
    return username


def signed_in(browser: Browser, stack: TLSStack, username: str, password: str = PASSWORD, **context) -> Page:
    page = browser.new_context(**context).new_page()
    sign_in(page, stack, username, password)
    return page


def cookie_names(page: Page) -> set[str]:
    return {cookie["name"] for cookie in page.context.cookies()}


def test_sign_in_and_out_over_https(browser: Browser, tls_stack: TLSStack) -> None:
    username = account(tls_stack, "https.reader")
    page = signed_in(browser, tls_stack, username)
    assert page.url.startswith(f"https://{SITE_NAME}:")
    session = next(cookie for cookie in page.context.cookies() if cookie["name"] == "__Host-pacs_session")
    assert session["secure"] and session["httpOnly"] and session["path"] == "/"
    assert "pacs_session" not in cookie_names(page)
    submit(page, "button:has-text('Sign out')")
    assert "You have signed out." in page.inner_text("main")
    assert "Signed in as" not in page.inner_text("header")


def test_search_open_the_results_and_download_a_zip(browser: Browser, tls_stack: TLSStack, tmp_path) -> None:
    dataset = fresh_study("CT_small.dcm", patient_name="Https^Searcher")
    assert c_store(tls_stack, dataset) == 0
    page = signed_in(browser, tls_stack, account(tls_stack, "https.reader"))
    page.click("text=Query")
    page.fill("#patient_id", dataset.PatientID)
    submit(page, "button.button:has-text('Search')")
    row = page.locator("table.results tbody tr")
    assert row.count() == 1 and dataset.PatientID in row.inner_text()
    submit(page, "table.results a:has-text('Studies')")
    assert "/studies" in page.url and dataset.StudyInstanceUID not in page.url
    with page.expect_download() as downloading:
        page.click("table.results a:has-text('Zip')")
    saved = tmp_path / "study.zip"
    downloading.value.save_as(saved)
    with zipfile.ZipFile(saved) as archive:
        members = [name for name in archive.namelist() if not name.endswith("/")]
        assert len(members) == 1
        stored = pydicom.dcmread(io.BytesIO(archive.read(members[0])))
    assert stored.SOPInstanceUID == dataset.SOPInstanceUID


def test_copy_a_study_link(browser: Browser, tls_stack: TLSStack) -> None:
    dataset = fresh_study("MR_small.dcm")
    assert c_store(tls_stack, dataset) == 0
    page = signed_in(
        browser,
        tls_stack,
        account(tls_stack, "https.reader"),
        permissions=["clipboard-read", "clipboard-write"],
    )
    page.goto(f"{tls_stack.browser_url}/query/studies?patient_id={dataset.PatientID}")
    page.get_by_role("button", name="Copy study link").click()
    page.get_by_role("button", name="Copy the link").click()
    page.wait_for_selector("text=Copied to the clipboard.")
    copied = page.evaluate("navigator.clipboard.readText()")
    assert re.fullmatch(rf"https://{SITE_NAME}:{tls_stack.web_port}/token\?[A-Za-z0-9]{{64}}", copied)


def test_attach_a_pdf_report(browser: Browser, tls_stack: TLSStack, tmp_path) -> None:
    dataset = fresh_study("CT_small.dcm")
    assert c_store(tls_stack, dataset) == 0
    report = tmp_path / "report.pdf"
    report.write_bytes(a_pdf())
    page = signed_in(browser, tls_stack, account(tls_stack, "https.uploader", can_upload=True))
    page.goto(f"{tls_stack.browser_url}/query/studies?patient_id={dataset.PatientID}")
    assert page.inner_text("table.results tbody tr td.series").strip() == "1"
    page.set_input_files("td.attach-pdf input[type=file]", str(report))
    submit(page, "td.attach-pdf button:has-text('Upload File')")
    assert "/query/studies" in page.url
    assert page.inner_text("table.results tbody tr td.series").strip() == "2"


def test_upload_with_the_progress_bar(browser: Browser, tls_stack: TLSStack, tmp_path) -> None:
    dataset = fresh_study("MR_small.dcm")
    upload = tmp_path / "image.dcm"
    dataset.save_as(upload)
    page = signed_in(browser, tls_stack, account(tls_stack, "https.uploader", can_upload=True))
    page.goto(f"{tls_stack.browser_url}/query")  # the manual's place: a section of the query page
    page.set_input_files(".upload-section #upload-files", str(upload))
    assert "1 file" in page.inner_text("#upload-chosen")  # chosen, not sent before Upload
    page.click("#upload-submit")
    page.wait_for_selector("tr.upload-stored", state="attached")
    assert page.eval_on_selector("#upload-bar", "bar => bar.value") == 100
    page.click("details.upload-files summary")
    assert "image.dcm" in page.inner_text("#upload-batches")
    page.goto(f"{tls_stack.browser_url}/query/studies?patient_id={dataset.PatientID}")
    assert page.locator("table.results tbody tr").count() == 1


def test_change_ones_own_password(browser: Browser, tls_stack: TLSStack) -> None:
    username = account(tls_stack, "https.changer")
    page = signed_in(browser, tls_stack, username)
    page.click("header a:has-text('Password')")
    page.fill("#current", PASSWORD)
    page.fill("#password", "a brand new https password")
    page.fill("#confirm", "a brand new https password")
    submit(page)
    assert "Your password is changed." in page.inner_text("main")
    submit(page, "button:has-text('Sign out')")
    sign_in(page, tls_stack, username, "a brand new https password")


def admin_page(browser: Browser, stack: TLSStack) -> Page:
    page = signed_in(browser, stack, "admin", ADMIN_PASSWORD)
    page.click("header a:has-text('Administration')")
    return page


def test_the_admins_user_forms(browser: Browser, tls_stack: TLSStack) -> None:
    page = admin_page(browser, tls_stack)
    page.click("a:has-text('Add user')")
    page.fill("#username", "https.newcomer")
    page.fill("#password", "newcomer password 1")
    page.fill("#confirm", "newcomer password 1")
    page.fill("#real_name", "New Comer")
    page.check("#can_upload")
    submit(page)
    row = page.locator("tr", has_text="https.newcomer")
    assert "New Comer" in row.inner_text()

    submit(page, "tr:has-text('https.newcomer') a:has-text('Edit')")
    page.fill("#real_name", "Renamed Comer")
    submit(page)
    assert "Renamed Comer" in page.locator("tr", has_text="https.newcomer").inner_text()

    submit(page, "tr:has-text('https.newcomer') button[data-flag=is_active]")
    assert "turn on" in page.locator("tr", has_text="https.newcomer").locator("td").nth(2).inner_text()

    submit(page, "tr:has-text('https.newcomer') a:has-text('Change user name/password')")
    page.fill("#username", "https.renamed")
    page.fill("#password", "renamed password 22")
    page.fill("#confirm", "renamed password 22")
    submit(page)
    assert page.locator("tr", has_text="https.renamed").count() == 1

    submit(page, "tr:has-text('https.renamed') a:has-text('Delete')")
    submit(page, "button:has-text('Delete https.renamed')")
    assert page.locator("tr", has_text="https.renamed").count() == 0
    with Site(tls_stack.data).engine.connect() as connection:
        assert accounts.find_by_username(connection, "https.renamed") is None


def test_the_admins_settings_form(browser: Browser, tls_stack: TLSStack) -> None:
    page = admin_page(browser, tls_stack)
    page.click("a:has-text('HTTP server setup')")
    page.fill("#institution", "St. Https Hospital")
    submit(page, "button:has-text('Save and apply')")
    assert "Saved." in page.inner_text("main")
    page.wait_for_timeout(1000)  # the web front swaps configurations just after answering
    page.goto(f"{tls_stack.browser_url}/")
    assert "St. Https Hospital" in page.inner_text("header")
    assert page.url.startswith("https://")


def study_link_for(stack: TLSStack, dataset) -> str:
    reader = stack.sign_in()
    home = reader.get(f"{stack.url}/")
    from conftest import csrf_token

    made = reader.post(
        f"{stack.url}/tokens/studies/{orthanc_id(stack, dataset.StudyInstanceUID)}/link",
        headers={"X-CSRFToken": csrf_token(home.text)},
    )
    assert made.status_code == 200, made.text[:300]
    return made.json()["link"]


def test_the_admins_study_links_page(browser: Browser, tls_stack: TLSStack) -> None:
    dataset = fresh_study("CT_small.dcm", patient_id="HTTPS-LINKS-" + fresh_study("CT_small.dcm").PatientID)
    assert c_store(tls_stack, dataset) == 0
    link = study_link_for(tls_stack, dataset)
    page = admin_page(browser, tls_stack)
    page.click("a:has-text('Study links')")
    page.fill("#patient_id", dataset.PatientID)
    submit(page, "button:has-text('Show')")
    submit(page, "table a >> nth=0")
    later = (dt.date.today() + dt.timedelta(days=400)).isoformat()
    page.fill("#extend_until", later)
    submit(page, "input[value=Extend], button:has-text('Extend')")
    assert "(extended)" in page.inner_text("main")
    submit(page, "input[value='Revoke this link'], button:has-text('Revoke this link')")
    patient = browser.new_context().new_page()
    patient.goto(link)
    assert "Your study at" not in patient.content()


def test_the_admins_worklist_page(browser: Browser, tls_stack: TLSStack, tmp_path) -> None:
    hl7 = tmp_path / "order.hl7"
    hl7.write_text(order("HTTPS-WL-1", name="Worklist^Https"))
    admin = account(tls_stack, "https.scheduler", can_upload=True, is_admin=True)
    page = signed_in(browser, tls_stack, admin)
    page.goto(f"{tls_stack.browser_url}/upload")
    page.set_input_files("#upload-files", str(hl7))
    page.click("#upload-submit")
    page.wait_for_selector("tr.upload-scheduled", state="attached")
    page.goto(f"{tls_stack.browser_url}/upload/worklist")
    assert page.locator("tr", has_text="HTTPS-WL-1").count() == 1
    submit(page, "tr:has-text('HTTPS-WL-1') button:has-text('Delete')")
    assert page.locator("tr", has_text="HTTPS-WL-1").count() == 0

    page.fill("#modality-aet", "HTTPSCT")
    page.fill("#modality-host", "127.0.0.9")
    page.fill("#modality-port", "11112")
    submit(page, "button:has-text('Register')")
    assert page.locator("tr", has_text="HTTPSCT").count() == 1
    tls_stack.wait_for_archive()
    submit(page, "tr:has-text('HTTPSCT') button:has-text('Remove')")
    assert page.locator("tr", has_text="HTTPSCT").count() == 0
    tls_stack.wait_for_archive()


def test_a_patient_answers_the_birth_date_then_views_and_downloads(
    browser: Browser, tls_stack: TLSStack, tmp_path: Path
) -> None:
    dataset = fresh_study("MR_small.dcm")
    dataset.PatientBirthDate = "19800214"
    assert c_store(tls_stack, dataset) == 0
    asked = tls_stack.pacs("config", "set", "token_identity_check", "yes")
    assert asked.returncode == 0, asked.stderr
    link = study_link_for(tls_stack, dataset)
    assert link.startswith(f"https://{SITE_NAME}:{tls_stack.web_port}/token?")
    try:
        patient = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        patient.goto(link)
        patient.fill("#birth_date", "1980-02-15")
        submit(patient)
        assert "That is not the date of birth we have for this study." in patient.inner_text("main")
        patient.fill("#birth_date", "1980-02-14")
        submit(patient)
        assert "Your study at" in patient.content()
        assert patient.url == link

        with patient.expect_download() as downloading:
            patient.click("a:has-text('Zip file of the study')")
        saved = tmp_path / "patient.zip"
        downloading.value.save_as(saved)
        with zipfile.ZipFile(saved) as archive:
            assert archive.testzip() is None and len(archive.namelist()) >= 1

        with patient.expect_navigation(wait_until="commit"):
            patient.click("a:has-text('View the study online')")
        assert patient.url.startswith(f"https://{SITE_NAME}:{tls_stack.web_port}/viewer?")
        assert "__Host-pacs_grant" in cookie_names(patient)
        wait_for_image(patient)
    finally:
        tls_stack.pacs("config", "set", "token_identity_check", "no")
    with Site(tls_stack.data).engine.connect() as connection:
        actions = {
            row.action
            for row in connection.execute(
                sa.select(db.activity.c.action).where(db.activity.c.study == dataset.StudyInstanceUID)
            )
        }
    assert {"token-identity-check", "viewer-opened"} <= actions
