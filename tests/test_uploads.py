"""Uploads through the real stack: DICOM files, zips (good, bad and hostile), PDF reports, limits.

Everything goes through Caddy as a browser's script would send it; what the archive holds is then
checked on Orthanc itself, with the stack's own credentials.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
import requests
import sqlalchemy as sa
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pypdf import PdfWriter

from control import accounts, db
from control.site import Site
from control.uploads import archive

from conftest import Stack, csrf_token

pytestmark = pytest.mark.stack

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent
UPLOADER = ("upload.user", "uploads allowed 1")
READER = ("no.upload.user", "uploads refused 1")


class Uploader:
    """A signed-in user on the upload page, sending files as the page's script does."""

    def __init__(self, stack: Stack, username: str, password: str) -> None:
        self.stack = stack
        self.session = stack.sign_in(username, password)
        self.token = csrf_token(self.session.get(f"{stack.url}/").text)

    def post(self, path: str, **kwargs) -> requests.Response:
        headers = {"Accept": "application/json", "X-CSRFToken": self.token, **kwargs.pop("headers", {})}
        return self.session.post(f"{self.stack.url}{path}", headers=headers, **kwargs)

    def upload(self, *files: tuple[str, bytes | io.IOBase]) -> dict:
        response = self.post("/upload/files", files=[("files", file) for file in files])
        assert response.status_code == 200, response.text[:500]
        return response.json()


def outcomes(answer: dict) -> dict[str, tuple[str, str]]:
    return {result["name"]: (result["outcome"], result["detail"]) for result in answer["results"]}


def events(stack: Stack, action: str) -> list[sa.Row]:
    with Site(stack.data).engine.connect() as connection:
        query = sa.select(db.activity).where(db.activity.c.action == action).order_by(db.activity.c.id)
        return connection.execute(query).all()


def orthanc(stack: Stack) -> requests.Session:
    session = requests.Session()
    session.auth = stack.orthanc_auth
    return session


def sample(name: str) -> bytes:
    return (TEST_FILES / name).read_bytes()


@contextmanager
def settings_changed(stack: Stack, **values: object) -> Iterator[None]:
    """Site settings changed for the block (the control plane reads them per request)."""
    site = Site(stack.data)
    with site.engine.begin() as connection:
        before = db.get_settings(connection)
        db.put_settings(connection, values)
    try:
        yield
    finally:
        with site.engine.begin() as connection:
            db.put_settings(connection, {name: before[name] for name in values if name in before})
            db.delete_settings(connection, [name for name in values if name not in before])


@pytest.fixture(scope="module")
def uploader(stack: Stack) -> Uploader:
    with Site(stack.data).engine.begin() as connection:
        accounts.create_user(connection, *UPLOADER, can_upload=True)
        accounts.create_user(connection, *READER)
    return Uploader(stack, *UPLOADER)


def test_only_users_who_may_upload_see_and_reach_uploads(stack: Stack, uploader: Uploader) -> None:
    assert 'href="/upload"' in uploader.session.get(f"{stack.url}/").text
    page = uploader.session.get(f"{stack.url}/upload")
    assert page.status_code == 200 and 'id="drop-zone"' in page.text and "upload.js" in page.text

    reader = Uploader(stack, *READER)
    assert 'href="/upload"' not in reader.session.get(f"{stack.url}/").text
    assert reader.session.get(f"{stack.url}/upload").status_code == 403
    response = reader.post("/upload/files", files=[("files", ("CT_small.dcm", sample("CT_small.dcm")))])
    assert response.status_code == 403
    assert response.json()["error"] == "Not allowed"
    for path in ("/upload/pdf", "/upload/studies/0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d/pdf"):
        assert reader.post(path, files={"file": ("r.pdf", b"%PDF-1.4")}).status_code == 403
    denied = [row for row in events(stack, "access-denied") if row.username == READER[0]]
    assert {json.loads(row.detail)["path"] for row in denied} >= {"/upload", "/upload/files", "/upload/pdf"}

    anonymous = requests.post(
        f"{stack.url}/upload/files", files={"files": ("a.dcm", b"x")}, allow_redirects=False
    )
    assert anonymous.status_code == 302 and "/login" in anonymous.headers["Location"]


# (file, outcomes accepted, words of the reason). Good files may already be in the shared archive.
SAMPLES = [
    ("CT_small.dcm", {"stored", "duplicate"}, ""),
    ("rtstruct.dcm", {"stored", "duplicate"}, ""),  # no Part 10 header: Orthanc takes it, so do we
    ("../charset_files/chrH31.dcm", {"stored", "duplicate"}, ""),
    ("MR_truncated.dcm", {"refused"}, "truncated: the file ends 62 bytes before the end of PixelData"),
    ("rtplan_truncated.dcm", {"refused"}, "truncated"),
    ("JPEGLSNearLossless_08.dcm", {"refused"}, "missing its Study Instance UID, Series Instance UID"),
    ("UN_sequence.dcm", {"refused"}, "missing its Study Instance UID, Series Instance UID, SOP Instance UID"),
    ("no_meta.dcm", {"refused"}, "not a DICOM file"),
    ("SC_rgb_jpeg.dcm", {"refused"}, "the archive refused it: Cannot parse an invalid DICOM file"),
    ("dicomdirtests/DICOMDIR", {"skipped"}, "a DICOMDIR"),
    ("dicomdirtests/README.txt", {"refused"}, "not a DICOM file, a zip of DICOM files or an HL7 order file"),
]


@pytest.mark.parametrize(("name", "accepted", "reason"), SAMPLES, ids=[name for name, *_ in SAMPLES])
def test_pydicom_samples_one_by_one(
    stack: Stack, uploader: Uploader, name: str, accepted: set[str], reason: str
) -> None:
    answer = uploader.upload((Path(name).name, sample(name)))
    ((outcome, detail),) = outcomes(answer).values()
    assert outcome in accepted, detail
    assert reason in detail
    if outcome in ("stored", "duplicate"):
        uid = pydicom.dcmread(TEST_FILES / name, force=True).SOPInstanceUID
        found = orthanc(stack).post(
            f"{stack.orthanc_url}/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": uid}}
        )
        assert len(found.json()) == 1
        again = uploader.upload((Path(name).name, sample(name)))
        assert again["results"][0]["outcome"] == "duplicate"


def test_pydicom_samples_in_a_zip_with_folders_and_other_files(stack: Stack, uploader: Uploader) -> None:
    good = [
        "MR_small.dcm",
        "JPEG2000.dcm",
        "../charset_files/chrGreek.dcm",
        "dicomdirtests/77654033/CR1/6154",
    ]
    bad = ["MR_truncated.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_jpeg.dcm"]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("study/", b"")
        for index, name in enumerate(good + bad):
            archive.writestr(f"study/series{index % 2}/{Path(name).name}", sample(name))
        archive.writestr("study/DICOMDIR", sample("dicomdirtests/DICOMDIR"))
        archive.writestr("README.txt", b"Images of the patient, for Dr. Who\n")
        archive.writestr("inner.zip", b"PK\x05\x06" + bytes(18))
    before = len(events(stack, "upload"))
    answer = uploader.upload(("study.zip", buffer.getvalue()))

    found = outcomes(answer)
    assert len(found) == len(good) + len(bad) + 3  # no row for the folder
    for name in good:
        assert found[f"study.zip: study/series{(good + bad).index(name) % 2}/{Path(name).name}"][0] in (
            "stored",
            "duplicate",
        )
    assert found["study.zip: study/series0/MR_truncated.dcm"][0] == "refused"
    assert "truncated" in found["study.zip: study/series0/MR_truncated.dcm"][1]
    assert "missing its Study Instance UID" in found["study.zip: study/series1/JPEGLSNearLossless_16.dcm"][1]
    assert "the archive refused it" in found["study.zip: study/series0/SC_rgb_jpeg.dcm"][1]
    assert found["study.zip: study/DICOMDIR"][0] == "skipped"
    assert found["study.zip: README.txt"] == ("skipped", "not a DICOM file (other file)")
    assert found["study.zip: inner.zip"] == ("skipped", "a zip inside the zip is not opened")
    counts = answer["counts"]
    assert counts["stored"] + counts["duplicate"] == len(good)
    assert (counts["refused"], counts["skipped"]) == (len(bad), 3)

    (event,) = events(stack, "upload")[before:]
    detail = json.loads(event.detail)
    assert (event.username, event.outcome) == (UPLOADER[0], "ok")
    assert detail["stored"] + detail["duplicate"] == len(good)
    assert (detail["refused"], detail["skipped"], detail["files"]) == (len(bad), 3, ["study.zip"])


def test_a_batch_with_bad_files_still_stores_the_good_ones_and_says_why(uploader: Uploader) -> None:
    answer = uploader.upload(
        ("notes.txt", b"not an image"),
        ("MR_small.dcm", sample("MR_small.dcm")),
        ("empty.dcm", b""),
        ("report.pdf", b"%PDF-1.4\n%%EOF\n"),
    )
    assert [result["outcome"] for result in answer["results"]][1] in ("stored", "duplicate")
    reasons = {result["name"]: result["detail"] for result in answer["results"]}
    assert reasons["empty.dcm"] == "an empty file"
    assert "use the form for PDF reports" in reasons["report.pdf"]


def zeros_zip(member_size: int, name: str = "bomb.dcm", *, dicom_head: bool = True) -> bytes:
    """A zip whose member is mostly zeros: tiny packed, huge unpacked."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("good/MR_small.dcm", sample("MR_small.dcm"))
        with archive.open(name, "w") as member:
            head = bytes(128) + b"DICM" if dicom_head else b""
            member.write(head)
            chunk = bytes(1024 * 1024)
            written = len(head)
            while written < member_size:
                member.write(chunk[: member_size - written])
                written += len(chunk)
    return buffer.getvalue()


def test_a_zip_bomb_is_stopped_while_reading_and_the_rest_goes_in(stack: Stack, uploader: Uploader) -> None:
    bomb = zeros_zip(300 * 1024 * 1024)
    assert len(bomb) < 1024 * 1024
    started = time.monotonic()
    answer = uploader.upload(("bomb.zip", bomb))
    found = outcomes(answer)
    assert found["bomb.zip: bomb.dcm"][0] == "refused"
    assert "inflates more than 100 times its packed size" in found["bomb.zip: bomb.dcm"][1]
    assert found["bomb.zip: good/MR_small.dcm"][0] in ("stored", "duplicate")
    assert time.monotonic() - started < 20

    # A zip may unpack to at most upload_max_unpacked_mb, whatever the ratio of its members.
    with settings_changed(stack, upload_max_unpacked_mb=1):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for index in range(40):
                archive.writestr(f"ct/{index:02}.dcm", sample("CT_small.dcm"))
        answer = uploader.upload(("many.zip", buffer.getvalue()))
    results = answer["results"]
    assert {result["outcome"] for result in results[:20]} <= {"stored", "duplicate"}
    assert results[-1]["outcome"] == "refused"
    assert results[-1]["detail"] == "not unpacked: the zip unpacks to more than 1 MB"


def test_zip_slip_and_links_never_touch_the_disk(stack: Stack, uploader: Uploader, tmp_path: Path) -> None:
    target = tmp_path / "escaped"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ok/CT_small.dcm", sample("CT_small.dcm"))
        archive.writestr("../" * 12 + str(target).lstrip("/") + "/evil.dcm", sample("MR_small.dcm"))
        archive.writestr(str(target) + "/absolute.dcm", sample("MR_small.dcm"))
        archive.writestr("..\\..\\windows.dcm", sample("MR_small.dcm"))
        link = zipfile.ZipInfo("link.dcm")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    answer = uploader.upload(("slip.zip", buffer.getvalue()))

    rows = answer["results"]
    assert rows[0]["outcome"] in ("stored", "duplicate")
    assert [row["outcome"] for row in rows[1:]] == ["refused"] * 4
    assert all("zip-slip" in row["detail"] for row in rows[1:4])
    assert rows[4]["detail"] == "a link, not a file"
    assert not target.exists()
    leftovers = [
        path for path in stack.data.rglob("*") if path.name in ("evil.dcm", "absolute.dcm", "windows.dcm")
    ]
    assert not leftovers


def lying_zip(declared_size: int) -> bytes:
    """A zip whose member inflates to 50 MB while both its headers claim ``declared_size``."""
    data = bytearray(zeros_zip(50 * 1024 * 1024, "liar.dcm"))
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("liar.dcm")
    claimed = declared_size.to_bytes(4, "little")
    data[info.header_offset + 22 : info.header_offset + 26] = claimed  # the local header
    entry = data.find(b"PK\x01\x02")
    while data[entry + 46 : entry + 54] != b"liar.dcm":
        entry = data.find(b"PK\x01\x02", entry + 4)
    data[entry + 24 : entry + 28] = claimed  # the central directory, which zipfile goes by
    return bytes(data)


def test_lying_zip_headers_are_judged_by_what_inflates(uploader: Uploader) -> None:
    # Claims 2 kB: zipfile stops there and the checksum gives the lie away.
    answer = uploader.upload(("small-lie.zip", lying_zip(2048)))
    outcome, detail = outcomes(answer)["small-lie.zip: liar.dcm"]
    assert outcome == "refused" and "damaged in the zip" in detail and "CRC" in detail
    # Claims 4 GB: the bytes actually inflated are counted and the ratio limit stops it.
    answer = uploader.upload(("big-lie.zip", lying_zip(0xFFFFFFF0)))
    outcome, detail = outcomes(answer)["big-lie.zip: liar.dcm"]
    assert outcome == "refused" and "inflates more than 100 times" in detail
    assert outcomes(answer)["big-lie.zip: good/MR_small.dcm"][0] in ("stored", "duplicate")


def test_a_zip_with_too_many_members_is_refused_before_reading(uploader: Uploader) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(20_001):
            archive.writestr(f"{index}", b"")
    answer = uploader.upload(("crowd.zip", buffer.getvalue()))
    assert answer["results"] == [
        {
            "name": "crowd.zip",
            "outcome": "refused",
            "detail": "holds 20001 files; at most 20000 are taken from one zip",
            "study": "",
            "study_id": "",
            "patient": "",
        }
    ]


def a_pdf(text_pages: int = 2) -> bytes:
    writer = PdfWriter()
    for _ in range(text_pages):
        writer.add_blank_page(595, 842)
    buffer = io.BytesIO()
    writer.write(buffer)
    pdf = buffer.getvalue()
    return pdf if len(pdf) % 2 else pdf + b"\n"  # odd length: the DICOM value needs a pad byte


def study_of(stack: Stack, sop_instance_uid: str) -> dict:
    session = orthanc(stack)
    (instance,) = session.post(
        f"{stack.orthanc_url}/tools/find",
        json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}},
    ).json()
    series = session.get(f"{stack.orthanc_url}/instances/{instance}").json()["ParentSeries"]
    study = session.get(f"{stack.orthanc_url}/series/{series}").json()["ParentStudy"]
    return session.get(f"{stack.orthanc_url}/studies/{study}").json()


def test_a_pdf_report_joins_the_study_and_comes_back_byte_identical(stack: Stack, uploader: Uploader) -> None:
    uploader.upload(("CT_small.dcm", sample("CT_small.dcm")))
    study = study_of(stack, pydicom.dcmread(TEST_FILES / "CT_small.dcm").SOPInstanceUID)
    pdf = a_pdf()
    response = uploader.post(
        f"/upload/studies/{study['ID']}/pdf",
        files={"file": ("report.pdf", pdf)},
        data={"title": "Befund Röntgen Ω"},
    )
    assert response.status_code == 201, response.text
    created = response.json()
    # CT_small's study is in Latin-1 (ISO_IR 100): the archive keeps what that can hold, and says so.
    assert (created["study"], created["title"], created["pages"]) == (study["ID"], "Befund Röntgen", 2)

    session = orthanc(stack)
    series = session.get(f"{stack.orthanc_url}/series/{created['series']}").json()
    assert series["ParentStudy"] == study["ID"]
    assert series["MainDicomTags"]["Modality"] == "DOC"
    assert series["MainDicomTags"]["SeriesDescription"] == "Befund Röntgen"
    assert session.get(f"{stack.orthanc_url}/instances/{created['instance']}/pdf").content == pdf

    # In the study's zip: the Encapsulated PDF, whose document (less its pad byte) is the file.
    archive = zipfile.ZipFile(
        io.BytesIO(session.get(f"{stack.orthanc_url}/studies/{study['ID']}/archive").content)
    )
    documents = []
    for name in archive.namelist():
        dataset = pydicom.dcmread(io.BytesIO(archive.read(name)))
        if dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1":
            documents.append(dataset)
    (document,) = [
        item for item in documents if item.SeriesInstanceUID == series["MainDicomTags"]["SeriesInstanceUID"]
    ]
    assert document.EncapsulatedDocumentLength == len(pdf)
    assert document.EncapsulatedDocument[: document.EncapsulatedDocumentLength] == pdf
    assert document.MIMETypeOfEncapsulatedDocument == "application/pdf"

    # Through DICOMweb, as OHIF fetches it: the bulk data of the Encapsulated Document tag.
    uids = (study["MainDicomTags"]["StudyInstanceUID"], document.SeriesInstanceUID, document.SOPInstanceUID)
    bulk = session.get(
        f"{stack.orthanc_url}/dicom-web/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}/bulk/00420011"
    )
    assert bulk.status_code == 200
    boundary = bulk.headers["Content-Type"].split("boundary=")[1].strip('"').encode()
    part = bulk.content.split(b"--" + boundary)[1]
    payload = part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
    assert payload[: len(pdf)] == pdf and len(payload) - len(pdf) <= 1

    (event,) = [
        row
        for row in events(stack, "pdf-attached")
        if json.loads(row.detail).get("series") == created["series"]
    ]
    assert event.study == uids[0] and event.outcome == "ok"


def test_the_pdf_form_finds_the_study_by_accession_number(stack: Stack, uploader: Uploader) -> None:
    dataset = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    dataset.AccessionNumber = "ACC-PDF-1"
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = (
        pydicom.uid.generate_uid(),
        pydicom.uid.generate_uid(),
    )
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    assert uploader.upload(("accession.dcm", buffer.getvalue()))["results"][0]["outcome"] == "stored"

    page = uploader.session.get(f"{stack.url}/upload")
    response = uploader.session.post(
        f"{stack.url}/upload/pdf",
        data={"study": "ACC-PDF-1", "csrf_token": csrf_token(page.text)},
        files={"file": ("Brain MR report.pdf", a_pdf(1))},
    )
    assert response.status_code == 200 and response.url == f"{stack.url}/upload"
    assert "Attached Brain MR report (1 page) to the study of" in response.text
    study = study_of(stack, dataset.SOPInstanceUID)
    assert len(study["Series"]) == 2

    response = uploader.post(
        "/upload/pdf", data={"study": "1.2.3.4.5.6.7.8.9"}, files={"file": ("x.pdf", a_pdf())}
    )
    assert response.status_code == 404
    assert (
        "No study in the archive has the UID or accession number 1.2.3.4.5.6.7.8.9"
        in response.json()["message"]
    )
    response = uploader.post("/upload/pdf", data={"study": "*"}, files={"file": ("x.pdf", a_pdf())})
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (sample("CT_small.dcm"), "not a PDF file (it does not start with %PDF-)"),
        (b"%PDF-1.7\nthis is not really a PDF\n%%EOF\n", "a damaged PDF"),
        (b"", "not a PDF file"),
    ],
)
def test_a_file_that_is_not_a_pdf_is_refused(
    stack: Stack, uploader: Uploader, content: bytes, reason: str
) -> None:
    uploader.upload(("CT_small.dcm", sample("CT_small.dcm")))
    study = study_of(stack, pydicom.dcmread(TEST_FILES / "CT_small.dcm").SOPInstanceUID)
    series_before = len(study["Series"])
    response = uploader.post(f"/upload/studies/{study['ID']}/pdf", files={"file": ("fake.pdf", content)})
    assert response.status_code == 400
    assert reason in response.json()["message"]
    after = orthanc(stack).get(f"{stack.orthanc_url}/studies/{study['ID']}").json()
    assert len(after["Series"]) == series_before


def test_unknown_studies_answer_404(uploader: Uploader) -> None:
    for study in ("0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d-0a1b2c3d", "%2E%2E", "not-an-id"):
        response = uploader.post(f"/upload/studies/{study}/pdf", files={"file": ("x.pdf", a_pdf())})
        assert response.status_code == 404, study


def test_oversized_uploads_are_refused_before_their_body_is_sent(stack: Stack, uploader: Uploader) -> None:
    """The limit is the control plane's alone: Caddy asks it before sending a body on, so a new
    limit counts at once, with no new configuration for Caddy (which would cut transfers)."""
    body = os.urandom(2 * 1024 * 1024)
    caddyfile = (stack.data / "run" / "Caddyfile").read_text()
    access_log = stack.data / "logs" / "access.log"
    with settings_changed(stack, upload_max_mb=1):
        seen = len(access_log.read_text().splitlines())
        response = uploader.post(
            "/upload/files", files=[("files", ("big.dcm", body))], headers={"Accept": "text/html"}
        )
        assert response.status_code == 413
        assert "larger than the 1 MB this server accepts" in response.text
        assert stack.institution in response.text  # the portal's own page
        refusal = events(stack, "upload")[-1]
        assert refusal.outcome == "refused" and json.loads(refusal.detail)["reason"] == "too large"
        # Caddy asked, and never passed the body on.
        asked = access_log.read_text().splitlines()[seen:]
        assert any('"GET /internal/gate/upload" 413' in line for line in asked), asked
        assert not any("POST /upload/files" in line for line in asked), asked

        response = uploader.post("/upload/files", files=[("files", ("big.dcm", body))])
        assert response.status_code == 413
        assert "larger than the 1 MB this server accepts" in response.json()["message"]
        small = uploader.upload(("CT_small.dcm", sample("CT_small.dcm")))
        assert small["results"][0]["outcome"] == "duplicate"
    assert (stack.data / "run" / "Caddyfile").read_text() == caddyfile
    assert uploader.upload(("big.dcm", body))["results"][0]["outcome"] == "refused"


def test_uploads_are_refused_while_the_disk_is_nearly_full(stack: Stack, uploader: Uploader) -> None:
    with settings_changed(stack, disk_reserve_mb=1024**3):
        response = uploader.post("/upload/files", files=[("files", ("MR_small.dcm", sample("MR_small.dcm")))])
        assert response.status_code == 507
        assert "The archive's disk is nearly full" in response.json()["message"]
        page = uploader.session.post(
            f"{stack.url}/upload/files",
            data={"csrf_token": uploader.token},
            files=[("files", ("MR_small.dcm", sample("MR_small.dcm")))],
        )
        assert page.url == f"{stack.url}/upload" and "The archive&#39;s disk is nearly full" in page.text
    assert [row.outcome for row in events(stack, "upload")[-2:]] == ["refused", "refused"]
    assert uploader.upload(("MR_small.dcm", sample("MR_small.dcm")))["results"][0]["outcome"] in (
        "stored",
        "duplicate",
    )


def test_posts_without_the_csrf_token_are_refused(stack: Stack, uploader: Uploader) -> None:
    response = uploader.session.post(
        f"{stack.url}/upload/files",
        files=[("files", ("MR_small.dcm", sample("MR_small.dcm")))],
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 400


def test_without_the_script_the_form_answers_with_the_results_page(stack: Stack, uploader: Uploader) -> None:
    page = uploader.session.get(f"{stack.url}/upload")
    response = uploader.session.post(
        f"{stack.url}/upload/files",
        data={"csrf_token": csrf_token(page.text)},
        files=[
            ("files", ("CT_small.dcm", sample("CT_small.dcm"))),
            ("files", ("MR_truncated.dcm", sample("MR_truncated.dcm"))),
        ],
    )
    assert response.status_code == 200
    rows = re.findall(r'<tr class="upload-(\w+)">\s*<td>([^<]*)</td>', response.text)
    assert rows == [("duplicate", "CT_small.dcm"), ("refused", "MR_truncated.dcm")]
    assert "truncated: the file ends 62 bytes before the end of PixelData" in response.text


def large_dicom() -> bytes:
    """A 5 MB CT image (larger than a member the control plane keeps in memory), with new UIDs."""
    dataset = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    dataset.SOPInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Rows = dataset.Columns = 1600
    dataset.PixelData = os.urandom(1600 * 1600 * 2)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_large_files_reach_the_archive_byte_for_byte(stack: Stack, uploader: Uploader) -> None:
    alone, zipped = large_dicom(), large_dicom()
    assert len(zipped) > archive.IN_MEMORY_LIMIT
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as packed:
        packed.writestr("big/CT.dcm", zipped)
    answer = uploader.upload(("big.dcm", alone), ("big.zip", buffer.getvalue()))
    assert [result["outcome"] for result in answer["results"]] == ["stored", "stored"]
    for content in (alone, zipped):
        uid = pydicom.dcmread(io.BytesIO(content)).SOPInstanceUID
        found = orthanc(stack).post(
            f"{stack.orthanc_url}/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": uid}}
        )
        (instance,) = found.json()
        assert orthanc(stack).get(f"{stack.orthanc_url}/instances/{instance}/file").content == content


def test_an_upload_while_the_archive_is_down_says_so_and_can_be_sent_again(
    stack: Stack, uploader: Uploader
) -> None:
    stack.kill_archive()
    content = large_dicom()
    answer = uploader.upload(("CT.dcm", content))
    assert answer["results"][0]["outcome"] == "refused"
    assert answer["results"][0]["detail"] == "the archive did not answer; please send it again"

    stack.wait_for_archive()
    assert uploader.upload(("CT.dcm", content))["results"][0]["outcome"] == "stored"


def open_files_under(pids: list[int], folder: Path) -> list[str]:
    """The files under ``folder`` that the processes ``pids`` hold open (deleted ones too)."""
    found = []
    for pid in pids:
        for descriptor in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(descriptor)
                if target.startswith(f"{folder}/"):
                    found.append(target)
    return found


def test_an_upload_arriving_is_kept_in_the_data_directory_not_in_tmp(
    stack: Stack, uploader: Uploader
) -> None:
    content = large_dicom()
    boundary = "pacs-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="CT.dcm"\r\n'
        "Content-Type: application/dicom\r\n\r\n"
    ).encode()
    half = len(content) // 2
    paused = threading.Event()
    resume = threading.Event()

    def body() -> Iterator[bytes]:
        yield head + content[:half]
        paused.set()
        resume.wait(30)
        yield content[half:] + f"\r\n--{boundary}--\r\n".encode()

    answers: list[requests.Response] = []
    sender = threading.Thread(
        target=lambda: answers.append(
            uploader.post(
                "/upload/files",
                data=body(),
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
        )
    )
    sender.start()
    try:
        assert paused.wait(30)
        spool = stack.data / "tmp"
        deadline = time.monotonic() + 10
        while not open_files_under(stack.processes().workers, spool):
            assert time.monotonic() < deadline, "no upload is being kept in the data directory's tmp/"
            time.sleep(0.1)
    finally:
        resume.set()
        sender.join(60)
    assert answers[0].status_code == 200, answers[0].text[:300]
    assert answers[0].json()["results"][0]["outcome"] == "stored"
