"""Zip downloads through the real stack: what they hold, how they are named, the zip_content setting,
the size stated beforehand, and the activity event of each download, complete or not."""

from __future__ import annotations

import io
import itertools
import json
import re
import time
import zipfile
from urllib.parse import quote

import pydicom
import pytest
import requests
import sqlalchemy as sa

from control import db
from control.site import Site

from conftest import Stack, csrf_token
from samples import StudyFacts, make_study, store_study

pytestmark = pytest.mark.stack

JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"


@pytest.fixture(scope="module")
def browser(stack: Stack) -> requests.Session:
    return stack.sign_in()


def orthanc_ids(stack: Stack, browser: requests.Session, facts: StudyFacts) -> tuple[str, str]:
    """The archive's ids of a study's patient and of the study, as the portal's JSON gives them."""
    answer = browser.get(
        f"{stack.url}/query/studies", params={"patient_id": facts.patient_id, "format": "json"}
    )
    row = next(row for row in answer.json()["rows"] if row["study_instance_uid"] == facts.uid)
    return row["patient"]["id"], row["id"]


def zip_members(body: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        return {info.filename: archive.read(info) for info in archive.infolist() if not info.is_dir()}


def sop_uids(members: dict[str, bytes]) -> set[str]:
    return {str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID) for data in members.values()}


def activity_after(stack: Stack, last_id: int, action: str = "download") -> list:
    with Site(stack.data).engine.connect() as connection:
        return connection.execute(
            sa.select(db.activity)
            .where(db.activity.c.id > last_id, db.activity.c.action == action)
            .order_by(db.activity.c.id)
        ).all()


def last_activity_id(stack: Stack) -> int:
    with Site(stack.data).engine.connect() as connection:
        return connection.execute(sa.select(sa.func.max(db.activity.c.id))).scalar() or 0


def all_instances(facts: StudyFacts) -> set[str]:
    return set().union(*facts.series.values())


def test_a_study_zip_holds_its_instances_and_says_whose_it_is(
    stack: Stack, browser: requests.Session
) -> None:
    facts = store_study(
        stack,
        make_study(
            "Müller^Jürgen",
            study_date="20240131",
            series=(("CT", 3), ("MR", 2)),
            StudyDescription="Knee / left: MRI?",
        ),
    )
    _patient_id, study_id = orthanc_ids(stack, browser, facts)
    page = browser.get(f"{stack.url}/query/studies/{study_id}/zip", params={"format": "json"}).json()
    assert (page["series"], page["instances"], page["content"]) == (2, 5, "dicom")
    before = last_activity_id(stack)

    response = browser.get(page["archive"])
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/zip"
    name = "Müller-Jürgen_2024-01-31_Knee-left-MRI.zip"
    assert page["file_name"] == name
    assert response.headers["Content-Disposition"] == (
        f"attachment; filename=\"Muller-Jurgen_2024-01-31_Knee-left-MRI.zip\"; filename*=UTF-8''{quote(name)}"
    )
    members = zip_members(response.content)
    assert sop_uids(members) == all_instances(facts)
    assert page["expected_size"] == sum(len(data) for data in members.values())

    (event,) = activity_after(stack, before)
    detail = json.loads(event.detail)
    assert (event.outcome, event.username, event.study) == ("ok", "admin", facts.uid)
    assert event.patient == f"Müller Jürgen ({facts.patient_id})"
    assert detail["completed"] is True and detail["bytes_sent"] == len(response.content)
    assert (detail["level"], detail["content"]) == ("studies", "dicom")


def test_patient_and_series_zips_hold_exactly_theirs(stack: Stack, browser: requests.Session) -> None:
    first = store_study(stack, make_study("Two^Studies", "TWO-STUDIES", study_date="20230101"))
    second = store_study(
        stack, make_study("Two^Studies", "TWO-STUDIES", study_date="20230202", series=(("CT", 2), ("MR", 3)))
    )
    patient_id, study_id = orthanc_ids(stack, browser, second)
    patient_zip = browser.get(f"{stack.url}/query/patients/{patient_id}/archive")
    assert sop_uids(zip_members(patient_zip.content)) == all_instances(first) | all_instances(second)
    assert "filename*=UTF-8''Two-Studies_TWO-STUDIES.zip" in patient_zip.headers["Content-Disposition"]

    series = browser.get(f"{stack.url}/query/studies/{study_id}/series", params={"format": "json"}).json()[
        "rows"
    ]
    mr = next(row for row in series if row["modality"] == "MR")
    series_zip = browser.get(mr["actions"]["archive"])
    assert sop_uids(zip_members(series_zip.content)) == second.series[mr["series_instance_uid"]]
    assert "Two-Studies_2023-02-02_series-2_MR.zip" in series_zip.headers["Content-Disposition"]


def test_the_zip_page_states_the_size_before_the_download(stack: Stack, browser: requests.Session) -> None:
    facts = store_study(stack, make_study("Size^Stated", series=(("CT", 4),), size=64))
    _patient_id, study_id = orthanc_ids(stack, browser, facts)
    before = last_activity_id(stack)
    page = browser.get(f"{stack.url}/query/studies/{study_id}/zip")
    size = browser.get(f"{stack.url}/query/studies/{study_id}/zip", params={"format": "json"}).json()[
        "expected_size"
    ]
    assert f"{size / 1000:.1f} kB of DICOM files" in page.text
    assert f'href="/query/studies/{study_id}/archive" data-autostart="true"' in page.text
    assert "4 files" in page.text and "DICOM files as stored" in page.text
    assert activity_after(stack, before) == [], "showing the page downloads nothing"


def test_the_jpeg_lossless_setting_transcodes_the_zips(stack: Stack, browser: requests.Session) -> None:
    facts = store_study(stack, make_study("Jpeg^Lossless", series=(("CT", 2), ("MR", 1)), size=64))
    _patient_id, study_id = orthanc_ids(stack, browser, facts)
    assert stack.pacs("config", "set", "zip_content", "jpeg-lossless").returncode == 0
    try:
        assert "compressed JPEG lossless" in browser.get(f"{stack.url}/query/studies/{study_id}/zip").text
        members = zip_members(browser.get(f"{stack.url}/query/studies/{study_id}/archive").content)
        datasets = [pydicom.dcmread(io.BytesIO(data)) for data in members.values()]
        assert {str(dataset.SOPInstanceUID) for dataset in datasets} == all_instances(facts)
        assert {str(dataset.file_meta.TransferSyntaxUID) for dataset in datasets} == {JPEG_LOSSLESS}
    finally:
        stack.pacs("config", "set", "zip_content", "dicom")
    members = zip_members(browser.get(f"{stack.url}/query/studies/{study_id}/archive").content)
    assert JPEG_LOSSLESS not in {
        str(pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID) for data in members.values()
    }


def test_a_client_that_leaves_stops_the_download(stack: Stack, browser: requests.Session) -> None:
    """40 MB of noise: far more than every buffer between the archive and the client holds."""
    facts = store_study(stack, make_study("Leaves^Early", series=(("CT", 40),), size=724, noise=True))
    _patient_id, study_id = orthanc_ids(stack, browser, facts)
    before = last_activity_id(stack)
    started = time.monotonic()
    with browser.get(f"{stack.url}/query/studies/{study_id}/archive", stream=True) as response:
        assert response.status_code == 200
        received = sum(len(chunk) for chunk in itertools.islice(response.iter_content(128 * 1024), 4))
    deadline = time.monotonic() + 30
    while not (events := activity_after(stack, before)):
        assert time.monotonic() < deadline, "the download was never recorded"
        time.sleep(0.2)
    detail = json.loads(events[0].detail)
    assert events[0].outcome == "failed" and detail["completed"] is False
    assert detail["stopped_by"] == "client"
    assert received <= detail["bytes_sent"] < 40 * 724 * 724 * 2 // 2, detail
    assert time.monotonic() - started < 20


def test_downloads_of_unknown_things_are_not_found(stack: Stack, browser: requests.Session) -> None:
    unknown = "0000000a-0000000b-0000000c-0000000d-0000000e"
    for path in (
        f"/query/studies/{unknown}/archive",
        f"/query/series/{unknown}/manifest",
        "/query/studies/x/zip",
    ):
        assert browser.get(f"{stack.url}{path}").status_code == 404, path


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (["Doe John", "2024-01-31", "CT abdomen"], "Doe-John_2024-01-31_CT-abdomen.zip"),
        (['a/b\\c:d*e?f"g<h>i|j'], "a-b-c-d-e-f-g-h-i-j.zip"),
        (["山田 太郎", ""], "山田-太郎.zip"),
        (["evil\u202egpj.exe"], "evil-gpj.exe.zip"),
        (["CON"], "_CON.zip"),
        (["...", "  "], "study.zip"),
        (["é" * 200], "é" * 75 + ".zip"),
    ],
)
def test_file_names_are_safe_on_every_system(parts: list[str], expected: str) -> None:
    from control.query.downloads import safe_file_name

    assert safe_file_name(parts, "study") == expected


def test_the_downloader_page_gives_the_exact_command(stack: Stack, browser: requests.Session) -> None:
    facts = store_study(stack, make_study("Command^Line"))
    _patient_id, study_id = orthanc_ids(stack, browser, facts)
    page = browser.get(f"{stack.url}/query/studies/{study_id}/downloader")
    command = f"python3 pacs_download.py --user admin {stack.url}/query/studies/{study_id}/manifest"
    assert command in page.text
    assert f'href="{stack.url}/downloader/pacs_download.py"' in page.text
    assert re.search(r"Command-Line_\d{4}-\d\d-\d\d\.zip", page.text)


def test_a_patients_study_link_downloads_through_the_same_stream(
    stack: Stack, browser: requests.Session
) -> None:
    facts = store_study(stack, make_study("Token^Tilda", series=(("CT", 2),)))
    _patient_id, study_id = orthanc_ids(stack, browser, facts)
    home = browser.get(f"{stack.url}/")
    link = browser.post(
        f"{stack.url}/tokens/studies/{study_id}/link", headers={"X-CSRFToken": csrf_token(home.text)}
    ).json()
    before = last_activity_id(stack)
    response = requests.get(f"{stack.url}/token/download?{link['link'].split('?', 1)[1]}")
    assert response.status_code == 200
    assert sop_uids(zip_members(response.content)) == all_instances(facts)
    assert "Token-Tilda_" in response.headers["Content-Disposition"]
    (event,) = activity_after(stack, before)
    assert event.token_id == link["token_id"] and event.username == ""
    assert json.loads(event.detail)["completed"] is True
