"""What people see, in Chromium on the real stack (SSL on): values in words, lists a hospital works with.

A study whose values exercise every kind (a name with its ideographic and phonetic groups, a birth
date, a study date and time, a legacy ``1997.04.24`` series date, sex O, an age, a referring
physician, an attached PDF: modality DOC) and an HL7 order for it are uploaded and opened as their
users do; then the pages that show them are walked and none may show a raw ``^`` or a DICOM date
as stored. Sorting, the date shortcuts, the activity filters ("who opened patient X's study?"),
the upload's summary, its speed, time left and Cancel, and the archive's default character set
are each used as a person would. Every page visited is saved as a screenshot into
``data/test-output/screenshots/`` (or ``PACS_TEST_SCREENSHOTS``) for a person to look at.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from playwright.sync_api import Browser, Page
from pydicom.uid import generate_uid
from test_uploads import a_pdf
from test_worklist import order

from control import accounts
from control.site import Site

from browser import chromium, sign_in, submit
from conftest import REPOSITORY, TLSStack, c_store, fresh_study

pytestmark = [pytest.mark.stack, pytest.mark.browser]

PASSWORD = "words browser user 1"
NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"
SHOTS = Path(os.environ.get("PACS_TEST_SCREENSHOTS", REPOSITORY / "data" / "test-output" / "screenshots"))
# What a page must never show of the study's values: DICOM as stored.
RAW = ("^", "19700101", "20240131", "1997.04.24", "110000", "045Y", "20240315")


@pytest.fixture(scope="module")
def browser(tls_stack: TLSStack) -> Iterator[Browser]:
    with chromium(tls_stack) as running:
        yield running


def account(stack: TLSStack, username: str, **rights: bool) -> str:
    with Site(stack.data).engine.begin() as connection:
        if not accounts.find_by_username(connection, username):
            accounts.create_user(connection, username, PASSWORD, **rights)
    return username


def signed_in(browser: Browser, stack: TLSStack, username: str) -> Page:
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    sign_in(page, stack, username, PASSWORD)
    return page


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def assert_in_words(text: str, where: str) -> None:
    shown = [raw for raw in RAW if raw in text]
    assert not shown, f"{where} shows {shown} as stored: {text[:3000]}"


def words_study(patient_id: str, path: Path) -> pydicom.Dataset:
    """A CT image of a study whose values are of every kind, as a modality writes them, saved."""
    dataset = fresh_study("CT_small.dcm", study_date="20240131", patient_id=patient_id)
    dataset.SpecificCharacterSet = "ISO_IR 192"
    dataset.PatientName = NAME
    dataset.PatientSex = "O"
    dataset.PatientBirthDate = "19700101"
    dataset.PatientAge = "045Y"
    dataset.StudyTime = "110000"
    dataset.AccessionNumber = "ACC-" + patient_id[-8:]
    dataset.ReferringPhysicianName = "Jones^Bob"
    dataset.StudyDescription = "Words study"
    dataset.SeriesDescription = "Legacy dated series"
    # ACR-NEMA's date form, which older files still carry: pydicom warns that DICOM has no such date.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dataset.SeriesDate = "1997.04.24"
        dataset.save_as(path, enforce_file_format=True)
    return dataset


@pytest.fixture(scope="module")
def walked(browser: Browser, tls_stack: TLSStack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The study uploaded from the query page's upload section, a PDF report attached from its
    row, its link asked for and its HL7 order sent: everything the pages then show."""
    folder = tmp_path_factory.mktemp("words")
    patient_id = "WORDS-" + generate_uid()[-10:]
    image = folder / "words.dcm"
    dataset = words_study(patient_id, image)
    hl7 = folder / "order.hl7"
    hl7.write_text(order(dataset.AccessionNumber, name="Yamada^Tarou").replace("PAT-", "WL-"))
    uploader = account(tls_stack, "words.uploader", can_upload=True)
    page = signed_in(browser, tls_stack, uploader)

    page.goto(f"{tls_stack.browser_url}/query")
    assert page.locator("header a:has-text('Upload')").count() == 1  # the header has it too
    page.set_input_files(".upload-section #upload-files", [str(image), str(hl7)])
    assert page.is_hidden(".upload-section #upload-cancel")
    page.click(".upload-section #upload-submit")
    page.wait_for_selector("#upload-status:has-text('Done')")
    assert page.is_hidden(".upload-section #upload-cancel")  # nothing left to cancel
    summary = page.inner_text("table.upload-studies")
    assert "Yamada Tarou = 山田 太郎 = やまだ たろう" in summary and "Words study" in summary
    assert "2024-01-31 11:00:00" in summary and "1 stored" in summary and "0 refused" in summary
    page.click("details.upload-files summary")
    uploaded = page.inner_text("#upload-batches")
    assert "words.dcm" in uploaded and "order.hl7" in uploaded and "CT Head" in uploaded
    assert "CT CT" not in uploaded
    assert_in_words(uploaded, "the upload results")
    shot(page, "upload-results")

    with page.expect_navigation():
        page.click("table.upload-studies a:has-text('Open the study')")
    assert "/series" in page.url
    shot(page, "series-after-upload")

    report = folder / "report.pdf"
    report.write_bytes(a_pdf())
    page.goto(f"{tls_stack.browser_url}/query/studies?patient_id={patient_id}")
    page.set_input_files("td.attach-pdf input[type=file]", str(report))
    submit(page, "td.attach-pdf button:has-text('Upload File')")
    message = page.inner_text(".flash >> nth=0")
    assert "Yamada Tarou" in message, message
    assert_in_words(message, "the PDF message")
    # The study is from 2024: its link has expired, which the page says instead of copying it;
    # asking made the link all the same, for the admin's study links page to show.
    page.get_by_role("button", name="Copy study link").click()
    page.wait_for_selector(".copy-note:has-text('it would not open the study')")
    page.close()
    return {"patient_id": patient_id, "accession": dataset.AccessionNumber, "uid": dataset.StudyInstanceUID}


def test_every_page_shows_dicom_values_in_words(browser: Browser, tls_stack: TLSStack, walked) -> None:
    reader = account(tls_stack, "words.reader")
    page = signed_in(browser, tls_stack, reader)
    base = tls_stack.browser_url

    page.goto(f"{base}/query/patients?patient_id={walked['patient_id']}")
    text = page.inner_text("main table.results")
    assert "Yamada Tarou = 山田 太郎 = やまだ たろう" in text and "Other" in text and "1970-01-01" in text
    assert_in_words(text, "the patients found")
    shot(page, "patients")

    page.goto(f"{base}/query/studies?patient_id={walked['patient_id']}")
    text = page.inner_text("main")
    assert walked["accession"] in text and "2024-01-31 11:00:00" in text
    assert page.get_attribute("td.modalities abbr:has-text('DOC')", "title") == "Document (PDF report)"
    assert page.get_attribute("td.modalities abbr:has-text('CT')", "title") == "Computed tomography"
    assert "CT, CT" not in text
    assert_in_words(page.inner_text("main table.results"), "the studies found")
    shot(page, "studies")

    with page.expect_navigation():
        page.click("td.actions a:has-text('Series')")
    text = page.inner_text("main")
    assert "1997-04-24" in text and "Other" in text, text
    assert_in_words(text, "the series of the study")
    shot(page, "series")

    # The same with another date format: every date follows it.
    admin = signed_in(browser, tls_stack, account(tls_stack, "words.admin", is_admin=True, can_upload=True))
    assert tls_stack.pacs("config", "set", "date_format", "%d.%m.%Y").returncode == 0
    try:
        page.reload()
        assert "24.04.1997" in page.inner_text("main") and "31.01.2024" in page.inner_text("main")
        shot(page, "series-dd-mm-yyyy")
    finally:
        tls_stack.pacs("config", "set", "date_format", "%Y-%m-%d")

    admin.goto(f"{base}/upload/worklist")
    row = admin.inner_text(f"tr:has-text('{walked['accession']}')")
    assert "Yamada Tarou" in row and "2024-03-15 09:30" in row and "1970-01-01" in row and "Male" in row
    assert "Smith Anna" in row
    assert_in_words(admin.inner_text("table.worklist"), "the worklist")
    shot(admin, "worklist")

    admin.goto(f"{base}/admin/tokens?patient_id={walked['patient_id']}")
    row = admin.inner_text("table.study-links tbody tr")
    assert "Yamada Tarou" in row and "2024-01-31" in row and "Words study" in row
    assert walked["uid"] not in row  # a short UID ...
    admin.click("table.study-links details.uid summary")
    assert walked["uid"] in admin.inner_text("table.study-links tbody tr")  # ... the whole on demand
    assert_in_words(admin.inner_text("table.study-links"), "the study links")
    width = admin.evaluate("document.documentElement.scrollWidth")
    assert width <= 1400, f"the study links page is {width} px wide in a 1400 px window"
    shot(admin, "study-links")

    admin.goto(f"{base}/admin/activity?patient={walked['patient_id']}")
    text = admin.inner_text("main table")
    for words in ("Upload", "Attached a PDF report", "Opened a list of studies or series"):
        assert words in text, text
    for internal in ("list-opened", "study_orthanc_id", "pdf-attached", "patient_orthanc_id"):
        assert internal not in admin.inner_text("main"), internal
    assert_in_words(text, "the activity log")
    width = admin.evaluate("document.documentElement.scrollWidth")
    assert width <= 1400, f"the activity page is {width} px wide in a 1400 px window"
    shot(admin, "activity")
    with admin.expect_navigation():
        admin.click("main table tbody tr:has-text('Opened a list') td.time a")
    assert "Archive id of the" in admin.inner_text("main")
    assert_in_words(admin.inner_text("main"), "an activity event")
    shot(admin, "activity-event")


def catalog_has(stack: TLSStack, patient_id: str, count: int) -> None:
    """Wait until the query pages list the patient's ``count`` studies (the catalog follows the
    archive within about a second)."""
    client = stack.sign_in("admin")
    for _ in range(120):
        answer = client.get(f"{stack.url}/query/studies", params={"patient_id": patient_id, "format": "json"})
        if answer.json()["total"] == count and answer.json()["source"] == "catalog":
            return
        time.sleep(0.5)
    raise AssertionError("the catalog did not list the studies")


def test_date_shortcuts_and_sorting_give_the_right_rows(browser: Browser, tls_stack: TLSStack) -> None:
    patient_id = "SHORTCUT-" + generate_uid()[-8:]
    today = dt.datetime.now(dt.UTC).date()  # the stack's time zone is UTC
    ages = {"today": 0, "yesterday": 1, "five days ago": 5, "twenty days ago": 20, "sixty days ago": 60}
    for description, days in ages.items():
        dataset = fresh_study(
            "CT_small.dcm", patient_id=patient_id, study_date=f"{today - dt.timedelta(days):%Y%m%d}"
        )
        dataset.StudyDescription = description
        dataset.AccessionNumber = f"SC{days:03d}"
        assert c_store(tls_stack, dataset) == 0
    catalog_has(tls_stack, patient_id, len(ages))
    page = signed_in(browser, tls_stack, account(tls_stack, "words.reader"))

    def described() -> list[str]:
        return [
            cell.strip() for cell in page.locator("table.results tbody td:nth-child(6)").all_inner_texts()
        ]

    for button, expected in (
        ("Last 7 days", ["today", "yesterday", "five days ago"]),
        ("Today", ["today"]),
        ("Yesterday", ["yesterday"]),
        ("Last 30 days", ["today", "yesterday", "five days ago", "twenty days ago"]),
    ):
        page.goto(f"{tls_stack.browser_url}/query")
        page.fill("#patient_id", patient_id)
        submit(page, f".date-shortcuts button:has-text('{button}')")
        with page.expect_navigation():
            page.click("a:has-text('List the matching studies instead')")
        assert described() == expected, button
        shot(page, f"shortcut-{button.lower().replace(' ', '-')}")

    # Enter in a field still searches everything, not a shortcut.
    page.goto(f"{tls_stack.browser_url}/query")
    page.fill("#patient_id", patient_id)
    with page.expect_navigation():
        page.press("#patient_id", "Enter")
    assert "period" not in page.url

    page.goto(f"{tls_stack.browser_url}/query/studies?patient_id={patient_id}")
    newest_first = ["today", "yesterday", "five days ago", "twenty days ago", "sixty days ago"]
    assert described() == newest_first
    for heading, first_order in (
        ("Description", sorted(newest_first)),
        ("Accession", ["today", "yesterday", "five days ago", "twenty days ago", "sixty days ago"]),
        ("Date/time", newest_first),  # a date's first click: newest first
    ):
        with page.expect_navigation():
            page.click(f"table.results th a.sort:has-text('{heading}')")
        assert described() == first_order, heading
        with page.expect_navigation():
            page.click(f"table.results th a.sort:has-text('{heading}')")
        assert described() == list(reversed(first_order)), heading
    shot(page, "studies-sorted")

    with page.expect_navigation():
        page.click("td.actions a:has-text('Series')")
    headings = page.locator("table.results th a.sort").all_inner_texts()
    assert {"#", "Modality", "Date/time", "Description", "Files"} <= {text.split(" ")[0] for text in headings}


def test_the_activity_filters_answer_who_opened_a_patients_study(
    browser: Browser, tls_stack: TLSStack, walked
) -> None:
    # Two physicians: one opens the patient's study, the other another patient's.
    looker = signed_in(browser, tls_stack, account(tls_stack, "words.looker"))
    looker.goto(f"{tls_stack.browser_url}/query/studies?patient_id={walked['patient_id']}")
    with looker.expect_navigation():
        looker.click("td.actions a:has-text('Series')")
    other_patient = fresh_study("MR_small.dcm", patient_name="Someone^Else")
    assert c_store(tls_stack, other_patient) == 0
    catalog_has(tls_stack, other_patient.PatientID, 1)
    bystander = signed_in(browser, tls_stack, account(tls_stack, "words.bystander"))
    bystander.goto(f"{tls_stack.browser_url}/query/studies?patient_id={other_patient.PatientID}")
    with bystander.expect_navigation():
        bystander.click("td.actions a:has-text('Series')")

    admin = signed_in(browser, tls_stack, account(tls_stack, "words.admin", is_admin=True, can_upload=True))
    admin.goto(f"{tls_stack.browser_url}/admin/activity")
    # Typed as a person says it: the name in any case, no ^, and the kind of event in words.
    admin.fill("#patient", "yamada tarou")
    admin.select_option("#action", label="Opened a list of studies or series")
    submit(admin, "form.filters button:has-text('Filter')")
    rows = admin.locator("main table tbody tr").all_inner_texts()
    assert any("words.looker" in row for row in rows), rows
    assert not any("words.bystander" in row for row in rows), rows
    assert all("Opened a list of studies or series" in row for row in rows), rows
    shot(admin, "activity-who-opened")

    # The same question by the study's accession number, and by the patient ID, from another address.
    admin.goto(f"{tls_stack.browser_url}/admin/activity")
    admin.fill("#study", walked["accession"])
    admin.fill("#user", "words.looker")
    submit(admin, "form.filters button:has-text('Filter')")
    assert "words.looker" in admin.inner_text("main table tbody")
    admin.fill("#address", "127.0.0.99")
    submit(admin, "form.filters button:has-text('Filter')")
    assert "No activity matches." in admin.inner_text("main table tbody")

    # The CSV export has the same rows, in words.
    admin.goto(f"{tls_stack.browser_url}/admin/activity?patient={walked['patient_id']}&user=words.looker")
    with admin.expect_download() as download:
        admin.click("a:has-text('Export CSV')")
    exported = Path(download.value.path()).read_text(encoding="utf-8")
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert rows and {row["user"] for row in rows} == {"words.looker"}
    assert {row["action"] for row in rows} >= {"Opened a list of studies or series"}
    assert all("^" not in row["patient"] for row in rows), rows
    assert all(
        row["patient_id"] == walked["patient_id"] for row in rows if row["action_code"] == "list-opened"
    )


def test_an_upload_shows_its_speed_and_time_left_and_can_be_cancelled(
    browser: Browser, tls_stack: TLSStack, tmp_path: Path
) -> None:
    files = []
    for number in range(3):
        dataset = fresh_study("CT_small.dcm", patient_id=f"CANCEL-{number}-" + generate_uid()[-6:])
        # About 1 MB more, in a private element: a slow line takes seconds for each file.
        dataset.private_block(0x0009, "PACS WORDS TEST", create=True).add_new(
            0x10, "OB", os.urandom(1_000_000)
        )
        path = tmp_path / f"big-{number}.dcm"
        dataset.save_as(path)
        files.append((path, dataset.PatientID))
    page = signed_in(browser, tls_stack, account(tls_stack, "words.uploader", can_upload=True))
    page.goto(f"{tls_stack.browser_url}/upload")
    # A slow line, as from a clinic's uplink: 400 kB/s.
    network = page.context.new_cdp_session(page)
    network.send("Network.enable")
    network.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 400_000},
    )
    page.set_input_files("#upload-files", [str(path) for path, _ in files])
    assert "3 files" in page.inner_text("#upload-chosen")
    page.wait_for_timeout(500)
    assert page.locator("tr.upload-stored").count() == 0  # nothing goes before Upload is pressed
    page.click("#upload-submit")
    page.wait_for_selector("#upload-status:has-text('left')")
    status = page.inner_text("#upload-status")
    assert re.search(
        r"Sending [\d.]+ [kMG]B of [\d.]+ MB · [\d.]+ [kMG]B/s · about \d+ (s|min) left", status
    ), status
    shot(page, "upload-in-progress")
    page.click("#upload-cancel")
    page.wait_for_selector("#upload-status:has-text('Cancelled')")
    shot(page, "upload-cancelled")
    network.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    client = tls_stack.sign_in("admin")
    stored = [
        client.get(
            f"{tls_stack.url}/query/studies",
            params={"patient_id": patient_id, "format": "json", "source": "archive"},
        ).json()["total"]
        for _, patient_id in files
    ]
    assert stored == [0, 0, 0], stored  # cancelled while they were sent: none is stored


def test_files_without_a_character_set_keep_their_letters(browser: Browser, tls_stack: TLSStack) -> None:
    """A modality that names no character set sends Latin-1: with the setting on Latin-1 the
    archive reads "Müller" as such (Orthanc's default, UTF-8 here, drops the ü)."""

    def send_latin1(name: str) -> str:
        dataset = fresh_study("CT_small.dcm")
        if "SpecificCharacterSet" in dataset:
            del dataset.SpecificCharacterSet
        dataset.PatientName = name  # pydicom writes it in its default, Latin-1
        assert c_store(tls_stack, dataset) == 0
        return dataset.PatientID

    before = send_latin1("Müller^Jürgen")
    admin = signed_in(browser, tls_stack, account(tls_stack, "words.admin", is_admin=True, can_upload=True))
    admin.goto(f"{tls_stack.browser_url}/query/patients?patient_id={before}")
    assert "Mller Jrgen" in admin.inner_text("table.results")  # what UTF-8 made of it
    admin.goto(f"{tls_stack.browser_url}/admin/settings")
    admin.select_option("#default_encoding", "Latin1")
    submit(admin, "button:has-text('Save and apply')")
    try:
        assert "The archive took it at once; nothing was restarted." in admin.inner_text("main")
        shot(admin, "setup-default-encoding")
        after = send_latin1("Müller^Jürgen")
        admin.goto(f"{tls_stack.browser_url}/query/patients?patient_id={after}")
        assert "Müller Jürgen" in admin.inner_text("table.results")
        shot(admin, "latin1-name")
        running = requests.get(f"{tls_stack.orthanc_url}/tools/default-encoding", auth=tls_stack.orthanc_auth)
        assert running.text.strip() == "Latin1"  # at once, without a restart
        configuration = (tls_stack.data / "run" / "orthanc.json").read_text()
        assert '"DefaultEncoding": "Latin1"' in configuration  # and for its next start
    finally:
        tls_stack.pacs("config", "set", "default_encoding", "Utf8")
