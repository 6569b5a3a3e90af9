"""DICOMweb stores (STOW-RS) and bodies that do not arrive whole, on the real stack.

A store by DICOMweb is another door into the archive: it must meet what the upload page meets
(the upload right, the size limit, pydicom's check before Orthanc parses anything, the disk
reserve, one activity event). Stores are sent by dicomweb-client as a script would, and by hand
where a client library would not send such a thing (oversized, junk, gzip-encoded, cut short).
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pydicom
import pytest
import requests
import sqlalchemy as sa
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset

from control import accounts, db
from control.runtime import configs
from control.site import Site, write_private

from conftest import Stack, csrf_token, fresh_study

pytestmark = pytest.mark.stack

UPLOADER = ("stow.uploader", "stores by dicomweb 1")
READER = ("stow.reader", "reads by dicomweb 1")
STOW_TYPE = 'multipart/related; type="application/dicom"'


@pytest.fixture(scope="module")
def uploader(stack: Stack) -> requests.Session:
    with Site(stack.data).engine.begin() as connection:
        accounts.create_user(connection, *UPLOADER, can_upload=True)
        accounts.create_user(connection, *READER)
    return stack.sign_in(*UPLOADER)


def encoded(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def multipart(*parts: bytes, boundary: str = "") -> tuple[str, bytes]:
    boundary = boundary or uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n" for part in parts
    )
    return f"{STOW_TYPE}; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


def archived(stack: Stack, dataset: Dataset) -> bool:
    found = requests.post(
        f"{stack.orthanc_url}/tools/lookup", data=dataset.SOPInstanceUID, auth=stack.orthanc_auth
    )
    return any(item["Type"] == "Instance" for item in found.json())


def uploads(stack: Stack) -> list[dict]:
    with Site(stack.data).engine.connect() as connection:
        rows = connection.execute(
            sa.select(db.activity).where(db.activity.c.action == "upload").order_by(db.activity.c.id)
        ).all()
    return [{"outcome": row.outcome, "username": row.username, **json.loads(row.detail)} for row in rows]


def orthanc_log(stack: Stack) -> str:
    return (stack.data / "logs" / "orthanc.log").read_text(errors="replace")


@contextmanager
def upload_limit(stack: Stack, megabytes: int) -> Iterator[None]:
    """``upload_max_mb`` changed for the block, in the database and in the running Caddy."""
    site = Site(stack.data)
    with site.engine.begin() as connection:
        before = db.get_settings(connection)["upload_max_mb"]
        db.put_settings(connection, {"upload_max_mb": megabytes})
    reload_caddy(stack)
    try:
        yield
    finally:
        with site.engine.begin() as connection:
            db.put_settings(connection, {"upload_max_mb": before})
        reload_caddy(stack)


def reload_caddy(stack: Stack) -> None:
    site = Site(stack.data)
    topology = configs.Topology.from_environment(site)
    write_private(site.run / "Caddyfile", configs.render_caddy(site, site.load_settings(), topology))
    subprocess.run(
        [
            *("caddy", "reload", "--config", str(site.run / "Caddyfile"), "--adapter", "caddyfile"),
            *("--address", f"unix/{site.run / 'caddy-admin.sock'}"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )


def large_instance(megabytes: float) -> Dataset:
    dataset = fresh_study("CT_small.dcm")
    side = int((megabytes * 1024 * 1024 / 2) ** 0.5)
    dataset.Rows = dataset.Columns = side
    dataset.PixelData = bytes(side * side * 2)
    return dataset


def test_a_stow_goes_through_the_upload_checks_and_is_one_activity_event(
    stack: Stack, uploader: requests.Session
) -> None:
    first, second = fresh_study("CT_small.dcm"), fresh_study("MR_small.dcm")
    second.StudyInstanceUID = first.StudyInstanceUID
    client = DICOMwebClient(f"{stack.url}/dicom-web", session=uploader)
    answer = client.store_instances([first, second])
    stored = [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence]
    assert stored == [first.SOPInstanceUID, second.SOPInstanceUID]
    # (dicomweb-client drops the port of the URLs it reads: the path is what it kept.)
    assert answer.RetrieveURL.endswith(f"/dicom-web/studies/{first.StudyInstanceUID}")
    assert archived(stack, first) and archived(stack, second)
    event = uploads(stack)[-1]
    assert event["via"] == "dicomweb" and event["username"] == UPLOADER[0]
    assert (event["outcome"], event["stored"], event["refused"], event["studies"]) == ("ok", 2, 0, 1)

    # Without the upload right, nothing goes in.
    reader = DICOMwebClient(f"{stack.url}/dicom-web", session=stack.sign_in(*READER))
    third = fresh_study("CT_small.dcm")
    with pytest.raises(requests.HTTPError) as refused:
        reader.store_instances([third])
    assert refused.value.response.status_code == 403
    assert not archived(stack, third)


def test_a_store_to_a_study_takes_that_studys_instances_only(
    stack: Stack, uploader: requests.Session
) -> None:
    mine, stranger = fresh_study("CT_small.dcm"), fresh_study("CT_small.dcm")
    client = DICOMwebClient(f"{stack.url}/dicom-web", session=uploader)
    with pytest.raises(requests.HTTPError) as refused:
        client.store_instances([stranger], study_instance_uid=mine.StudyInstanceUID)
    assert refused.value.response.status_code == 409
    failure = pydicom.Dataset.from_json(refused.value.response.json()).FailedSOPSequence[0]
    assert (failure.ReferencedSOPInstanceUID, failure.FailureReason) == (stranger.SOPInstanceUID, 0xA900)
    assert "is not the study of the request" in refused.value.response.headers["Warning"]
    assert not archived(stack, stranger)


def test_a_stow_larger_than_the_upload_limit_stores_nothing(stack: Stack, uploader: requests.Session) -> None:
    big = large_instance(1.5)
    client = DICOMwebClient(f"{stack.url}/dicom-web", session=uploader)
    with upload_limit(stack, 1):
        with pytest.raises(requests.HTTPError) as refused:
            client.store_instances([big])
        assert refused.value.response.status_code == 413
        assert "1 MB" in refused.value.response.text
        # Without a declared length (chunked), the body is cut at the limit as it arrives.
        content_type, body = multipart(encoded(big))
        chunked = uploader.post(
            f"{stack.url}/dicom-web/studies",
            data=(body[start : start + 65536] for start in range(0, len(body), 65536)),
            headers={"Content-Type": content_type},
        )
        assert chunked.status_code == 413
    assert not archived(stack, big)


def test_junk_and_compressed_bodies_never_reach_the_archives_parser(
    stack: Stack, uploader: requests.Session
) -> None:
    log_before = orthanc_log(stack)
    junk_part = b"\x00" * 128 + b"DICM" + b"\xff" * 4000
    content_type, body = multipart(junk_part, b"not dicom at all")
    answer = uploader.post(
        f"{stack.url}/dicom-web/studies", data=body, headers={"Content-Type": content_type}
    )
    assert answer.status_code == 409
    failures = pydicom.Dataset.from_json(answer.json()).FailedSOPSequence
    assert [item.FailureReason for item in failures] == [0xC000, 0xC000]
    assert "missing its Study Instance UID" in answer.headers["Warning"]
    assert "not a DICOM file" in answer.headers["Warning"]
    assert uploads(stack)[-1]["refused"] == 2

    not_multipart = uploader.post(
        f"{stack.url}/dicom-web/studies",
        data=b"\x89junk" * 1000,
        headers={"Content-Type": STOW_TYPE + "; boundary=x"},
    )
    assert not_multipart.status_code == 400
    assert "not a readable multipart/related message" in not_multipart.json()["message"]
    other_type = uploader.post(
        f"{stack.url}/dicom-web/studies", data=b"{}", headers={"Content-Type": "application/json"}
    )
    assert other_type.status_code == 415

    dataset = fresh_study("CT_small.dcm")
    content_type, body = multipart(encoded(dataset))
    gzipped = uploader.post(
        f"{stack.url}/dicom-web/studies",
        data=gzip.compress(body),
        headers={"Content-Type": content_type, "Content-Encoding": "gzip"},
    )
    assert gzipped.status_code == 415
    assert not archived(stack, dataset)
    # Orthanc was never handed any of it: its log says nothing new about bad files.
    new_lines = orthanc_log(stack)[len(log_before) :]
    assert "Bad file format" not in new_lines and "multipart" not in new_lines.lower()


def short_post(
    stack: Stack, session: requests.Session, path: str, content_type: str, body: bytes, **headers
) -> str:
    """POST ``body`` declared 1,000 bytes longer than it is, then stop sending; the status line."""
    cookies = "; ".join(f"{name}={value}" for name, value in session.cookies.items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{stack.web_port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body) + 1000}\r\nCookie: {cookies}\r\nAccept: application/json\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        + "\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", stack.web_port), timeout=60) as connection:
        connection.sendall(head + body)
        connection.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer.split(b"\r\n", 1)[0].decode()


def refused_upload_since(stack: Stack, count: int, timeout: float = 20) -> dict:
    """The upload event after the first ``count`` ones, once it is there."""
    deadline = time.monotonic() + timeout
    while len(uploads(stack)) <= count:
        assert time.monotonic() < deadline, "no activity event for the upload"
        time.sleep(0.2)
    return uploads(stack)[count]


def test_a_body_shorter_than_it_says_stores_nothing_and_is_logged_so(
    stack: Stack, uploader: requests.Session
) -> None:
    # The upload page: the form's closing boundary arrives, the rest of the declared length never.
    page_file = fresh_study("CT_small.dcm")
    boundary = uuid.uuid4().hex
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.dcm"\r\n'
            "Content-Type: application/dicom\r\n\r\n"
        ).encode()
        + encoded(page_file)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    token = csrf_token(uploader.get(f"{stack.url}/upload").text)
    count = len(uploads(stack))
    status = short_post(
        stack,
        uploader,
        "/upload/files",
        f"multipart/form-data; boundary={boundary}",
        form,
        **{"X-CSRFToken": token},
    )
    assert not status.startswith("HTTP/1.1 2")
    event = refused_upload_since(stack, count)
    assert event["outcome"] == "refused" and "ended after" in event["reason"]
    assert not archived(stack, page_file)

    # The same by DICOMweb.
    stow_file = fresh_study("CT_small.dcm")
    content_type, body = multipart(encoded(stow_file))
    count = len(uploads(stack))
    status = short_post(stack, uploader, "/dicom-web/studies", content_type, body)
    assert not status.startswith("HTTP/1.1 2")
    event = refused_upload_since(stack, count)
    assert event["outcome"] == "refused" and "ended after" in event["reason"] and event["via"] == "dicomweb"
    assert not archived(stack, stow_file)
