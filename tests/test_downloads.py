"""Zip downloads through the real stack: what they hold (the archive's stored files, byte for byte),
how they are named, their exact length, ranges and resumed downloads, the zip_content setting, the
DICOMDIR and compressed choices, and the activity event of each download, complete or not."""

from __future__ import annotations

import io
import itertools
import json
import random
import re
import subprocess
import time
import zipfile
from urllib.parse import quote

import numpy as np
import pydicom
import pytest
import requests
import sqlalchemy as sa
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.uid import generate_uid

from control import db
from control.site import Site

from conftest import Stack, c_store, csrf_token
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


def stored_files(stack: Stack, level: str, orthanc_id: str) -> dict[str, bytes]:
    """The archive's stored file of every instance of a resource, by SOP Instance UID."""
    instances = requests.get(f"{stack.orthanc_url}/{level}/{orthanc_id}/instances", auth=stack.orthanc_auth)
    return {
        instance["MainDicomTags"]["SOPInstanceUID"]: requests.get(
            f"{stack.orthanc_url}/instances/{instance['ID']}/file", auth=stack.orthanc_auth
        ).content
        for instance in instances.json()
    }


def by_sop_uid(members: dict[str, bytes]) -> dict[str, bytes]:
    return {str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID): data for data in members.values()}


def unzip_test(body: bytes, folder) -> str:
    """What ``unzip -t`` (Info-ZIP) says of a zip; it fails the test unless the zip is whole."""
    path = folder / "tested.zip"
    path.write_bytes(body)
    result = subprocess.run(["unzip", "-t", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_a_study_zip_holds_its_instances_and_says_whose_it_is(
    stack: Stack, browser: requests.Session, tmp_path
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
    assert int(response.headers["Content-Length"]) == len(response.content) == page["zip_size"]
    members = zip_members(response.content)
    assert by_sop_uid(members) == stored_files(stack, "studies", study_id)
    assert page["expected_size"] == sum(len(data) for data in members.values())
    assert "No errors detected" in unzip_test(response.content, tmp_path)
    assert {name.rsplit("/", 1)[0] for name in members} == {
        f"Müller-Jürgen_{facts.patient_id}/2024-01-31_Knee-left-MRI/series-1_CT",
        f"Müller-Jürgen_{facts.patient_id}/2024-01-31_Knee-left-MRI/series-2_MR",
    }

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
    assert int(patient_zip.headers["Content-Length"]) == len(patient_zip.content)
    patient_members = zip_members(patient_zip.content)
    assert sop_uids(patient_members) == all_instances(first) | all_instances(second)
    assert by_sop_uid(patient_members) == stored_files(stack, "patients", patient_id)
    assert len({name.split("/")[1] for name in patient_members}) == 2, "a folder per study"
    assert "filename*=UTF-8''Two-Studies_TWO-STUDIES.zip" in patient_zip.headers["Content-Disposition"]

    series = browser.get(f"{stack.url}/query/studies/{study_id}/series", params={"format": "json"}).json()[
        "rows"
    ]
    mr = next(row for row in series if row["modality"] == "MR")
    series_zip = browser.get(mr["actions"]["archive"])
    assert int(series_zip.headers["Content-Length"]) == len(series_zip.content)
    series_members = zip_members(series_zip.content)
    assert sop_uids(series_members) == second.series[mr["series_instance_uid"]]
    assert by_sop_uid(series_members) == stored_files(stack, "series", mr["id"])
    assert "Two-Studies_2023-02-02_series-2_MR.zip" in series_zip.headers["Content-Disposition"]


def test_the_zip_page_states_the_size_before_the_download(stack: Stack, browser: requests.Session) -> None:
    facts = store_study(stack, make_study("Size^Stated", series=(("CT", 4),), size=64))
    _patient_id, study_id = orthanc_ids(stack, browser, facts)
    before = last_activity_id(stack)
    page = browser.get(f"{stack.url}/query/studies/{study_id}/zip")
    size = browser.get(f"{stack.url}/query/studies/{study_id}/zip", params={"format": "json"}).json()[
        "zip_size"
    ]
    assert f"<dd>{size / 1000:.1f} kB</dd>" in page.text
    assert f'href="/query/studies/{study_id}/archive" data-autostart="true"' in page.text
    assert "4 files" in page.text and "DICOM files as stored" in page.text
    assert "shows the time left" in page.text and "If the download fails" in page.text
    assert activity_after(stack, before) == [], "showing the page downloads nothing"
    assert len(browser.get(f"{stack.url}/query/studies/{study_id}/archive").content) == size


def test_the_jpeg_lossless_setting_transcodes_the_zips(stack: Stack, browser: requests.Session) -> None:
    facts = store_study(stack, make_study("Jpeg^Lossless", series=(("CT", 2), ("MR", 1)), size=64))
    _patient_id, study_id = orthanc_ids(stack, browser, facts)
    assert stack.pacs("config", "set", "zip_content", "jpeg-lossless").returncode == 0
    try:
        assert "compressed JPEG lossless" in browser.get(f"{stack.url}/query/studies/{study_id}/zip").text
        response = browser.get(f"{stack.url}/query/studies/{study_id}/archive")
        assert response.headers["Accept-Ranges"] == "none", "its length is known only once it is made"
        assert int(response.headers["Content-Length"]) == len(response.content)
        members = zip_members(response.content)
        datasets = [pydicom.dcmread(io.BytesIO(data)) for data in members.values()]
        assert {str(dataset.SOPInstanceUID) for dataset in datasets} == all_instances(facts)
        assert {str(dataset.file_meta.TransferSyntaxUID) for dataset in datasets} == {JPEG_LOSSLESS}
        originals = {
            uid: pydicom.dcmread(io.BytesIO(data))
            for uid, data in stored_files(stack, "studies", study_id).items()
        }
        for dataset in datasets:
            assert np.array_equal(dataset.pixel_array, originals[dataset.SOPInstanceUID].pixel_array)
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
    while (
        not (events := activity_after(stack, before))
        or json.loads(events[0].detail)["stopped_by"] == "server"
    ):
        assert time.monotonic() < deadline, "the end of the download was never recorded"
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


@pytest.fixture(scope="module")
def noisy_study(stack: Stack, browser: requests.Session) -> str:
    """A study of 12 MB of noise in three series (most zip members span many network packets)."""
    facts = store_study(
        stack, make_study("Range^Rita", series=(("CT", 8), ("MR", 8), ("CT", 8)), size=512, noise=True)
    )
    return orthanc_ids(stack, browser, facts)[1]


def test_every_download_of_a_zip_is_the_same_and_a_range_is_part_of_it(
    stack: Stack, browser: requests.Session, noisy_study: str
) -> None:
    url = f"{stack.url}/query/studies/{noisy_study}/archive"
    full = browser.get(url)
    again = browser.get(url)
    assert full.content == again.content, "two downloads of one study give the same bytes"
    assert full.headers["ETag"] == again.headers["ETag"] and full.headers["Accept-Ranges"] == "bytes"
    before = last_activity_id(stack)
    length = len(full.content)
    start, end = length // 3, length // 3 + 2_000_000
    part = browser.get(url, headers={"Range": f"bytes={start}-{end}"})
    assert part.status_code == 206
    assert part.headers["Content-Range"] == f"bytes {start}-{end}/{length}"
    assert part.content == full.content[start : end + 1]
    tail = browser.get(url, headers={"Range": "bytes=-1000", "If-Range": full.headers["ETag"]})
    assert (tail.status_code, tail.content) == (206, full.content[-1000:])
    (event, _tail_event) = activity_after(stack, before)
    detail = json.loads(event.detail)
    assert detail["completed"] is True and detail["bytes_sent"] == end + 1 - start
    assert detail["range"] == f"{start}-{end}/{length}"

    other_version = browser.get(url, headers={"Range": f"bytes={start}-", "If-Range": '"not-this-zip"'})
    assert other_version.status_code == 200 and other_version.content == full.content
    refused = browser.get(url, headers={"Range": f"bytes={length}-"})
    assert refused.status_code == 416 and refused.headers["Content-Range"] == f"bytes */{length}"


def test_a_download_cut_at_random_places_and_resumed_gives_the_whole_zip(
    stack: Stack, browser: requests.Session, noisy_study: str
) -> None:
    url = f"{stack.url}/query/studies/{noisy_study}/archive"
    whole = browser.get(url)
    length, etag = len(whole.content), whole.headers["ETag"]
    chance = random.Random(18)
    cuts = sorted(chance.sample(range(1, length), 4))
    received = bytearray()
    for cut in [*cuts, length]:
        headers = {"Range": f"bytes={len(received)}-", "If-Range": etag} if received else {}
        with browser.get(url, headers=headers, stream=True) as response:
            assert response.status_code == (206 if received else 200)
            for chunk in response.iter_content(64 * 1024):
                received += chunk[: cut - len(received)]
                if len(received) >= cut:
                    break
    assert bytes(received) == whole.content
    assert zip_members(bytes(received)).keys() == zip_members(whole.content).keys()


def test_a_dicomdir_lists_every_file_of_the_zip(stack: Stack, browser: requests.Session, tmp_path) -> None:
    facts = store_study(stack, make_study("Dicomdir^Dora", series=(("CT", 3), ("MR", 2)), size=64))
    _patient_id, study_id = orthanc_ids(stack, browser, facts)
    page = browser.get(f"{stack.url}/query/studies/{study_id}/zip", params={"format": "json"}).json()
    assert page["dicomdir"] is False
    response = browser.get(page["archive_other_dicomdir"])
    assert response.status_code == 200
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert archive.testzip() is None
        archive.extractall(tmp_path)
        names = {name for name in archive.namelist() if name != "DICOMDIR"}
    records = [
        record
        for record in pydicom.dcmread(tmp_path / "DICOMDIR").DirectoryRecordSequence
        if "ReferencedFileID" in record
    ]
    listed = {"/".join(record.ReferencedFileID): record.ReferencedSOPInstanceUIDInFile for record in records}
    assert set(listed) == names
    assert set(listed.values()) == all_instances(facts)
    for name, uid in listed.items():
        assert pydicom.dcmread(tmp_path / name).SOPInstanceUID == uid, "each record names its own file"

    stack.pacs("config", "set", "zip_dicomdir", "yes")
    try:
        page = browser.get(f"{stack.url}/query/studies/{study_id}/zip")
        assert "and a DICOMDIR" in page.text and "Without a DICOMDIR" in page.text
        with zipfile.ZipFile(
            io.BytesIO(browser.get(f"{stack.url}/query/studies/{study_id}/archive").content)
        ) as z:
            assert "DICOMDIR" in z.namelist()
    finally:
        stack.pacs("config", "set", "zip_dicomdir", "no")


def test_a_compressed_zip_holds_the_same_files(stack: Stack, browser: requests.Session) -> None:
    facts = store_study(stack, make_study("Squeeze^Sam", series=(("CT", 3),), size=128))
    _patient_id, study_id = orthanc_ids(stack, browser, facts)
    page = browser.get(f"{stack.url}/query/studies/{study_id}/zip", params={"format": "json"}).json()
    stored = browser.get(page["archive"])
    compressed = browser.get(page["archive_compressed"])
    assert compressed.headers["Accept-Ranges"] == "none", "its length is known only once it is made"
    assert int(compressed.headers["Content-Length"]) == len(compressed.content)
    assert len(compressed.content) < len(stored.content) / 2
    with zipfile.ZipFile(io.BytesIO(compressed.content)) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}
    assert zip_members(compressed.content) == zip_members(stored.content)


@pytest.mark.parametrize(
    "samples",
    [("rtplan.dcm", "waveform_ecg.dcm", "chrArab.dcm", "MR_small.dcm", "rtdose.dcm")],
)
def test_a_dicomdir_lists_files_that_lack_what_its_records_need(
    stack: Stack, browser: requests.Session, tmp_path, samples: tuple[str, ...]
) -> None:
    """Real files without an instance number, a series number or a study date still get a record."""
    patient_id = "DICOMDIR-" + generate_uid()[-10:]
    sent = set()
    for sample in samples:
        dataset = pydicom.dcmread(get_testdata_file(sample) or get_charset_files(sample)[0])
        dataset.PatientID = patient_id
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        assert c_store(stack, dataset) == 0, sample
        sent.add(dataset.SOPInstanceUID)
    row = browser.get(f"{stack.url}/query/patients", params={"patient_id": patient_id, "format": "json"})
    patient = row.json()["rows"][0]["id"]
    response = browser.get(f"{stack.url}/query/patients/{patient}/archive", params={"dicomdir": "yes"})
    assert response.status_code == 200
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert archive.testzip() is None
        archive.extractall(tmp_path)
        names = {name for name in archive.namelist() if name != "DICOMDIR"}
    records = [
        record
        for record in pydicom.dcmread(tmp_path / "DICOMDIR").DirectoryRecordSequence
        if "ReferencedFileID" in record
    ]
    assert {"/".join(record.ReferencedFileID) for record in records} == names
    assert {record.ReferencedSOPInstanceUIDInFile for record in records} == sent
