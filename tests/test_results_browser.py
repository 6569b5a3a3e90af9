"""The study results in a real browser: copy a patient's link, attach a PDF report, open the viewer."""

from __future__ import annotations

import re

import pytest
import sqlalchemy as sa
from test_uploads import a_pdf

from control import accounts, db
from control.site import Site

from browser import chromium, wait_for_image
from conftest import Stack, c_store, fresh_study

pytestmark = [pytest.mark.stack, pytest.mark.browser]

PASSWORD = "browser uploader 1"


@pytest.fixture(scope="module")
def uploader(stack: Stack) -> str:
    with Site(stack.data).engine.begin() as connection:
        if not accounts.find_by_username(connection, "results.browser"):
            accounts.create_user(connection, "results.browser", PASSWORD, can_upload=True)
    return "results.browser"


def signed_in_page(browser, stack: Stack, username: str, **context):
    page = browser.new_context(**context).new_page()
    page.goto(f"{stack.url}/login")
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    return page


def studies_of(page, stack: Stack, patient_id: str) -> None:
    page.goto(f"{stack.url}/query/studies?patient_id={patient_id}")


def test_copy_study_link_puts_the_patients_link_on_the_clipboard(stack: Stack, uploader: str) -> None:
    dataset = fresh_study("CT_small.dcm")
    assert c_store(stack, dataset) == 0
    with chromium() as browser:
        page = signed_in_page(browser, stack, uploader, permissions=["clipboard-read", "clipboard-write"])
        studies_of(page, stack, dataset.PatientID)
        page.get_by_role("button", name="Copy study link").click()
        page.get_by_role("button", name="Copy the link").click()
        page.wait_for_selector("text=Copied to the clipboard.")
        copied = page.evaluate("navigator.clipboard.readText()")
    assert re.fullmatch(rf"http://[^/]+:{stack.web_port}/token\?[A-Za-z0-9]{{64}}", copied)


def test_copy_study_link_shows_the_link_when_the_clipboard_is_refused(stack: Stack, uploader: str) -> None:
    dataset = fresh_study("MR_small.dcm")
    assert c_store(stack, dataset) == 0
    with chromium() as browser:
        page = signed_in_page(browser, stack, uploader)
        page.add_init_script("navigator.clipboard.writeText = () => Promise.reject(new Error('refused'))")
        studies_of(page, stack, dataset.PatientID)
        page.get_by_role("button", name="Copy study link").click()
        page.get_by_role("button", name="Copy the link").click()
        page.wait_for_selector("text=did not allow copying")
        shown = page.input_value(".copied input")
    assert re.search(r"/token\?[A-Za-z0-9]{64}$", shown)


def test_a_pdf_is_attached_from_the_study_row(stack: Stack, uploader: str, tmp_path) -> None:
    dataset = fresh_study("CT_small.dcm")
    assert c_store(stack, dataset) == 0
    report = tmp_path / "report.pdf"
    report.write_bytes(a_pdf())
    with chromium() as browser:
        page = signed_in_page(browser, stack, uploader)
        studies_of(page, stack, dataset.PatientID)
        assert page.inner_text("table.results tbody tr td.series").strip() == "1"
        page.set_input_files("td.attach-pdf input[type=file]", str(report))
        page.get_by_role("button", name="Upload File").click()
        page.wait_for_load_state()
        assert "/query/studies" in page.url
        assert page.inner_text("table.results tbody tr td.series").strip() == "2"


def test_a_reader_sees_no_upload_controls(stack: Stack) -> None:
    with Site(stack.data).engine.begin() as connection:
        if not accounts.find_by_username(connection, "results.reader"):
            accounts.create_user(connection, "results.reader", PASSWORD)
    dataset = fresh_study("CT_small.dcm")
    assert c_store(stack, dataset) == 0
    with chromium() as browser:
        page = signed_in_page(browser, stack, "results.reader")
        studies_of(page, stack, dataset.PatientID)
        assert page.locator("td.attach-pdf").count() == 0
        assert page.get_by_role("button", name="Copy study link").count() == 1
        page.goto(f"{stack.url}/query")
        assert page.locator(".upload-section").count() == 0


def test_the_viewer_opens_from_the_study_results(stack: Stack, uploader: str) -> None:
    dataset = fresh_study("MR_small.dcm")
    assert c_store(stack, dataset) == 0
    with chromium() as browser:
        page = signed_in_page(browser, stack, uploader, viewport={"width": 1280, "height": 900})
        studies_of(page, stack, dataset.PatientID)
        with page.context.expect_page() as opened:
            page.get_by_role("link", name="Viewer").first.click()
        viewer = opened.value
        viewer.wait_for_load_state("domcontentloaded")
        assert f"StudyInstanceUIDs={dataset.StudyInstanceUID}" in viewer.url
        wait_for_image(viewer)
    with Site(stack.data).engine.connect() as connection:
        opened_events = connection.execute(
            sa.select(db.activity).where(
                db.activity.c.action == "viewer-opened", db.activity.c.study == dataset.StudyInstanceUID
            )
        ).all()
    assert opened_events and opened_events[0].username == uploader


def test_an_attached_pdf_report_shows_in_the_viewer(stack: Stack, uploader: str, tmp_path) -> None:
    dataset = fresh_study("CT_small.dcm")
    assert c_store(stack, dataset) == 0
    report = tmp_path / "report.pdf"
    report.write_bytes(a_pdf())
    with chromium() as browser:
        page = signed_in_page(browser, stack, uploader, viewport={"width": 1280, "height": 900})
        studies_of(page, stack, dataset.PatientID)
        page.set_input_files("td.attach-pdf input[type=file]", str(report))
        page.get_by_role("button", name="Upload File").click()
        page.wait_for_load_state()
        series = page.context.request.get(
            f"{stack.url}/dicom-web/studies/{dataset.StudyInstanceUID}/series?Modality=DOC",
            headers={"Accept": "application/dicom+json"},
        ).json()
        pdf_series = next(
            item["0020000E"]["Value"][0] for item in series if item["00080060"]["Value"] == ["DOC"]
        )
        problems: list[str] = []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.goto(
            f"{stack.url}/viewer?StudyInstanceUIDs={dataset.StudyInstanceUID}&initialSeriesInstanceUID={pdf_series}"
        )
        shown = page.wait_for_selector(
            "object[data^='blob:'], iframe[src^='blob:'], embed[src^='blob:']", timeout=60000
        )
        assert shown is not None
        assert not [text for text in problems if "Content Security Policy" in text]
