"""What the portal relies on that differs, or might, between the Orthanc versions Debian ships.

This module runs on this machine's release in the suite, and on Debian 13's Orthanc 1.12.7 inside
the fresh machine of tests/test_fresh_machine.py: each test states what holds on which version.
"""

from __future__ import annotations

import base64
import json
import select
import socket
import time

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pynetdicom import AE

from control.archive_version import ArchiveVersion, parse_version

from conftest import Stack, c_store, fresh_study, orthanc_id

OHIF_PDF_ACCEPT = (
    'multipart/related; type="application/pdf", multipart/related; type="application/octet-stream"'
)
KEEP_ALIVE_TIMEOUT = (1, 11, 3)
"""The first Orthanc whose configuration can keep idle HTTP connections open longer than 1 s."""


def running_versions(stack: Stack) -> ArchiveVersion:
    """What Orthanc itself says, asked directly."""
    system = requests.get(f"{stack.orthanc_url}/system", auth=stack.orthanc_auth, timeout=10).json()
    plugin = requests.get(f"{stack.orthanc_url}/plugins/dicom-web", auth=stack.orthanc_auth, timeout=10)
    return ArchiveVersion.from_answers(system, plugin.json())


@pytest.mark.inprocess
def test_versions_are_read_as_orthanc_writes_them() -> None:
    assert parse_version("1.10.1") == (1, 10, 1)
    assert parse_version("1.12.7") > parse_version("1.12.5") > parse_version("1.11.3")
    assert parse_version("mainline") > parse_version("1.99.0")
    assert parse_version("") is None
    older = ArchiveVersion.from_answers({"Version": "1.10.1"}, {"Version": "1.7"})
    assert older.native_frames_named_as_stored and not older.extended_find
    newer = ArchiveVersion.from_answers(
        {"Version": "1.12.7", "Capabilities": {"HasExtendedFind": True}}, {"Version": "1.20"}
    )
    assert not newer.native_frames_named_as_stored and newer.extended_find


def test_the_health_check_names_the_archive_as_it_runs(stack: Stack) -> None:
    """Monitoring (and an admin after an upgrade) reads which Orthanc and plugin the portal found."""
    health = requests.get(f"{stack.url}/healthz", timeout=10).json()["orthanc"]
    assert {key: health[key] for key in ("version", "dicomweb", "extended_find")} == (
        running_versions(stack).describe()
    )


def _get_system(connection: socket.socket, stack: Stack) -> bytes:
    credentials = base64.b64encode(":".join(stack.orthanc_auth).encode()).decode()
    connection.sendall(
        f"GET /system HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {credentials}\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += connection.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = int(next(line for line in lines if line.lower().startswith(b"content-length:"))[15:])
    while len(body) < length:
        body += connection.recv(65536)
    return lines[0]


def _closed_by_the_server(connection: socket.socket, wait: float) -> bool:
    readable, _, _ = select.select([connection], [], [], wait)
    return bool(readable) and connection.recv(1) == b""


def test_idle_connections_to_the_archive_last_as_its_version_allows(stack: Stack) -> None:
    """orthanc/orthanc.json's KeepAliveTimeout keeps an idle connection of the portal's pools open
    for the next request (1.11.3 and later); 1.10.1 drops it after a second whatever the
    configuration says, which is why the Orthanc client sends reads again on a dropped connection."""
    with socket.create_connection(("127.0.0.1", stack.orthanc_port), timeout=10) as connection:
        assert _get_system(connection, stack) == b"HTTP/1.1 200 OK"
        if running_versions(stack).orthanc >= KEEP_ALIVE_TIMEOUT:
            time.sleep(2)
            assert not _closed_by_the_server(connection, 0)
            assert _get_system(connection, stack) == b"HTTP/1.1 200 OK"
        else:
            assert _closed_by_the_server(connection, 30)


def test_a_file_the_archive_cannot_read_gets_no_answer_and_ends_the_association(stack: Stack) -> None:
    """A truncated file over C-STORE: Orthanc 1.10.1 and 1.12.7 alike log "Store SCP Failed: DIMSE:
    Odd Fragment Length" and never answer, so the modality's own timeout ends the association. What
    was stored before it stays; the modality's next association stores again."""
    before, after = fresh_study("CT_small.dcm"), fresh_study("CT_small.dcm")
    truncated = pydicom.dcmread(get_testdata_file("rtplan_truncated.dcm"))
    modality = AE(ae_title="TRUNCATING")
    modality.dimse_timeout = 5
    for dataset in (before, truncated):
        modality.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = modality.associate("127.0.0.1", stack.dicom_port, ae_title=stack.aet)
    assert association.is_established
    assert association.send_c_store(before).Status == 0x0000
    assert "Status" not in association.send_c_store(truncated)
    assert association.is_aborted

    association = modality.associate("127.0.0.1", stack.dicom_port, ae_title=stack.aet)
    assert association.is_established
    try:
        assert association.send_c_store(after).Status == 0x0000
    finally:
        association.release()
    for dataset in (before, after):
        assert orthanc_id(stack, dataset.StudyInstanceUID)


def test_a_pdf_report_reaches_the_viewer_as_it_asks_for_it(stack: Stack) -> None:
    """OHIF fetches an attached PDF's bulk data offering "pdf, then octet-stream". DICOMweb 1.7
    answers to the last type offered, 1.20 to the first and refuses PDF (400, and the viewer shows
    "Something went wrong"): the portal asks the plugin for the type it serves, on either release."""
    dataset = fresh_study("CT_small.dcm")
    assert c_store(stack, dataset) == 0
    report = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    made = requests.post(
        f"{stack.orthanc_url}/tools/create-dicom",
        auth=stack.orthanc_auth,
        data=json.dumps(
            {
                "Parent": orthanc_id(stack, dataset.StudyInstanceUID),
                "Tags": {"Modality": "DOC", "SeriesDescription": "Report"},
                "Content": "data:application/pdf;base64," + base64.b64encode(report).decode(),
            }
        ),
        timeout=30,
    ).json()
    tags = requests.get(
        f"{stack.orthanc_url}/instances/{made['ID']}/tags", params={"simplify": ""}, auth=stack.orthanc_auth
    ).json()
    doctor = stack.sign_in()
    (metadata,) = doctor.get(
        f"{stack.url}/dicom-web/studies/{dataset.StudyInstanceUID}/series/{tags['SeriesInstanceUID']}/metadata",
        headers={"Accept": "application/dicom+json"},
    ).json()
    bulk = metadata["00420011"]["BulkDataURI"]
    assert bulk.startswith(f"{stack.url}/dicom-web/")
    answer = doctor.get(
        bulk,
        headers={"Accept": OHIF_PDF_ACCEPT},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith('multipart/related; type="application/octet-stream"')
    assert report.rstrip(b"\n") in answer.content
