"""Downloads under real faults: Orthanc, a gunicorn worker or Caddy killed (kill -9) in the middle.

Each test starts a slow download through Caddy (a client that reads about 3 MB a second from a
small receive buffer, so that most of the answer is still to come), kills one process of the
stack, and checks what a person would be left with: an answer broken off before its end (curl's
exit code, Python's ``http.client.IncompleteRead``), never a whole-looking file; for zips, the
activity row saying the download did not complete. The runner starts the killed process again by
itself; each test waits for the portal to answer before it ends.

The stack is this module's own: other tests must not see processes die under them.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import pytest
import requests
import sqlalchemy as sa
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from control import db
from control.site import Site

from conftest import Stack, csrf_token, make_stack
from samples import StudyFacts, make_study, store_study

pytestmark = pytest.mark.stack

KILL_AFTER = 4_000_000  # bytes the client has received when the fault comes
READ_BLOCK = 64 * 1024


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = make_stack(tmp_path_factory.mktemp("faults"))
    running.start()
    yield running
    running.stop()


@dataclass
class Material:
    facts: StudyFacts
    study_id: str
    series_uid: str
    session: requests.Session
    token_query: str
    multiframe: tuple[str, str, str]  # study, series and SOP instance UIDs of a 42 MB instance


@pytest.fixture(scope="module")
def material(stack: Stack) -> Material:
    """A 53 MB study of noise (no buffer on the way holds it), its patient link, a large multi-frame file."""
    facts = store_study(stack, make_study("Fault^Fiona", series=(("CT", 100),), size=512, noise=True))
    session = stack.sign_in()
    row = session.get(
        f"{stack.url}/query/studies", params={"patient_id": facts.patient_id, "format": "json"}
    ).json()["rows"][0]
    link = session.post(
        f"{stack.url}/tokens/studies/{row['id']}/link",
        headers={"X-CSRFToken": csrf_token(session.get(f"{stack.url}/").text)},
    ).json()["link"]
    (series_uid,) = facts.series
    return Material(facts, row["id"], series_uid, session, link.split("?", 1)[1], store_multiframe(stack))


def store_multiframe(stack: Stack) -> tuple[str, str, str]:
    """One instance of 80 frames of 512x512 noise, stored through Orthanc's REST API."""
    dataset = pydicom.Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.PatientID, dataset.PatientName, dataset.Modality = "FAULT-MF", "Frames^Frida", "OT"
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.Rows = dataset.Columns = 512
    dataset.BitsAllocated = dataset.BitsStored = 16
    dataset.HighBit, dataset.PixelRepresentation, dataset.NumberOfFrames = 15, 0, 80
    dataset.PixelData = os.urandom(80 * 512 * 512 * 2)
    body = io.BytesIO()
    dataset.save_as(body, enforce_file_format=True)
    stored = requests.post(f"{stack.orthanc_url}/instances", data=body.getvalue(), auth=stack.orthanc_auth)
    assert stored.status_code == 200, stored.text
    return str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID)


@dataclass
class SlowClient:
    """A GET read slowly on a thread, with http.client: what arrived and how the answer ended."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0
    answer_headers: dict[str, str] = field(default_factory=dict)
    received: int = 0
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> SlowClient:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        parts = urlsplit(self.url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        try:
            connection.connect()
            # A small window: the server can run only a little ahead of what this client has read.
            connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            connection.request(
                "GET", f"{parts.path}?{parts.query}" if parts.query else parts.path, headers=self.headers
            )
            response = connection.getresponse()
            self.status, self.answer_headers = response.status, dict(response.getheaders())
            while block := response.read(READ_BLOCK):
                self.received += len(block)
                time.sleep(0.02)
            expected = response.getheader("Content-Length")
            if expected is not None and self.received < int(expected):
                # What read() of the whole body raises; read(n) just returns b"" at the early end.
                raise http.client.IncompleteRead(b"", int(expected) - self.received)
        except (http.client.HTTPException, OSError) as error:
            self.error = error
        finally:
            connection.close()
            self.done.set()

    def wait_for(self, received: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.received < received:
            assert not self.done.is_set(), f"the download ended early: {self.status} {self.error!r}"
            assert time.monotonic() < deadline, "the download did not get going"
            time.sleep(0.05)

    def outcome(self, timeout: float = 120) -> Exception | None:
        assert self.done.wait(timeout), "the client never saw the end of the answer"
        return self.error


def cookies(session: requests.Session) -> str:
    return "; ".join(f"{cookie.name}={cookie.value}" for cookie in session.cookies)


def last_activity_id(stack: Stack) -> int:
    with Site(stack.data).engine.connect() as connection:
        return connection.execute(sa.select(sa.func.max(db.activity.c.id))).scalar() or 0


def download_events(stack: Stack, after: int, *, finished: bool = True, timeout: float = 60) -> list:
    """The download events after ``after``; with ``finished``, once the download has ended."""
    deadline = time.monotonic() + timeout
    while True:
        with Site(stack.data).engine.connect() as connection:
            events = connection.execute(
                sa.select(db.activity)
                .where(db.activity.c.id > after, db.activity.c.action == "download")
                .order_by(db.activity.c.id)
            ).all()
        if events and (
            not finished or all(json.loads(e.detail).get("stopped_by") != "server" for e in events)
        ):
            return events
        assert time.monotonic() < deadline, f"no finished download event: {events}"
        time.sleep(0.2)


def wait_for_portal(stack: Stack, timeout: float = 60) -> None:
    """Until Caddy, the control plane and Orthanc all answer again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{stack.url}/healthz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the portal did not come back"
        time.sleep(0.5)


def pid_of(stack: Stack, name: str) -> int:
    return int((stack.data / "run" / f"{name}.pid").read_text())


def worker_reading_the_archive(stack: Stack) -> int:
    """The gunicorn worker making the download: the one with open connections to Orthanc (the
    other's pooled ones are closed by Orthanc after a second idle)."""
    established = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == stack.orthanc_port and fields[3] == "01":
            established.add(f"socket:[{fields[9]}]")

    def connections(pid: int) -> int:
        count = 0
        for descriptor in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                count += os.readlink(descriptor) in established
        return count

    return max(stack.processes().workers, key=connections)


class SlowLink:
    """A TCP relay on 127.0.0.1 to the portal that passes about 3 MB a second through small
    buffers, as a slow network would: curl through it cannot read ahead of what has come."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            client, _address = self.listener.accept()
            upstream = socket.socket()
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            upstream.connect(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pass, args=(client, upstream, 0), daemon=True).start()
            self._pass(upstream, client, 0.02)

    @staticmethod
    def _pass(source: socket.socket, target: socket.socket, pause: float) -> None:
        try:
            while data := source.recv(READ_BLOCK):
                target.sendall(data)
                time.sleep(pause)
        except OSError:
            pass
        finally:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()


def test_the_archive_killed_mid_zip_breaks_the_download_off(
    stack: Stack, material: Material, tmp_path: Path
) -> None:
    """curl over a slow link, as a person's script would use it: a failed exit, and a file that is
    no zip."""
    url = f"{stack.url}/query/studies/{material.study_id}/archive"
    length = int(material.session.head(url).headers["Content-Length"])
    before = last_activity_id(stack)
    saved = tmp_path / "study.zip"
    link = SlowLink(stack.web_port)
    curl = subprocess.Popen(
        [
            "curl",
            "--silent",
            "--show-error",
            "--output",
            str(saved),
            "--header",
            f"Cookie: {cookies(material.session)}",
            url.replace(f":{stack.web_port}/", f":{link.port}/"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not saved.exists() or saved.stat().st_size < KILL_AFTER:
            assert curl.poll() is None and time.monotonic() < deadline, "the download did not get going"
            time.sleep(0.05)
        stack.kill_archive()
        _out, error = curl.communicate(timeout=120)
    finally:
        link.close()
        if curl.poll() is None:
            curl.kill()
    assert curl.returncode in (18, 56), f"curl ended with {curl.returncode}: {error}"
    assert saved.stat().st_size < length
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(saved)
    (event,) = download_events(stack, before)
    detail = json.loads(event.detail)
    assert (event.outcome, detail["completed"], detail["stopped_by"]) == ("failed", False, "archive")
    assert KILL_AFTER <= detail["bytes_sent"] < length
    stack.wait_for_archive()

    whole = material.session.get(url)
    assert len(whole.content) == length, "once the archive is back the same zip downloads whole"
    with zipfile.ZipFile(io.BytesIO(whole.content)) as archive:
        assert archive.testzip() is None


def test_the_archive_killed_mid_patient_download_breaks_it_off(stack: Stack, material: Material) -> None:
    before = last_activity_id(stack)
    client = SlowClient(f"{stack.url}/token/download?{material.token_query}").start()
    client.wait_for(KILL_AFTER)
    stack.kill_archive()
    assert isinstance(client.outcome(), http.client.IncompleteRead), client.error
    assert client.status == 200 and client.received < int(client.answer_headers["Content-Length"])
    (event,) = download_events(stack, before)
    detail = json.loads(event.detail)
    assert event.token_id and event.username == ""
    assert (detail["completed"], detail["stopped_by"]) == (False, "archive")
    stack.wait_for_archive()


def test_a_worker_killed_mid_zip_breaks_it_off_and_the_log_keeps_it(stack: Stack, material: Material) -> None:
    before = last_activity_id(stack)
    client = SlowClient(
        f"{stack.url}/query/studies/{material.study_id}/archive", {"Cookie": cookies(material.session)}
    ).start()
    client.wait_for(KILL_AFTER)
    os.kill(worker_reading_the_archive(stack), signal.SIGKILL)
    assert isinstance(client.outcome(), http.client.IncompleteRead), client.error
    assert client.received < int(client.answer_headers["Content-Length"])
    (event,) = download_events(stack, before, finished=False)
    detail = json.loads(event.detail)
    assert (event.outcome, detail["completed"]) == ("failed", False), "recorded before the first byte"
    wait_for_portal(stack)
    assert material.session.get(f"{stack.url}/query/studies/{material.study_id}/zip").status_code == 200


def test_caddy_killed_mid_zip_breaks_it_off(stack: Stack, material: Material) -> None:
    before = last_activity_id(stack)
    client = SlowClient(
        f"{stack.url}/query/studies/{material.study_id}/archive", {"Cookie": cookies(material.session)}
    ).start()
    client.wait_for(KILL_AFTER)
    os.kill(pid_of(stack, "caddy"), signal.SIGKILL)
    assert client.outcome() is not None, "the client saw a normal end"
    assert client.received < int(client.answer_headers["Content-Length"])
    (event,) = download_events(stack, before)
    detail = json.loads(event.detail)
    assert (detail["completed"], detail["stopped_by"]) == (False, "client")
    wait_for_portal(stack)


def spooled_bytes(stack: Stack) -> int:
    """The size of the largest file the control plane has open in its temporary folder.

    Its spooled answers are anonymous files (no name on the disk), still open under ``/proc``.
    """
    sizes = [0]
    for worker in stack.processes().workers:
        for descriptor in Path(f"/proc/{worker}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(descriptor).startswith(str(stack.data / "tmp")):
                    sizes.append(descriptor.stat().st_size)
    return max(sizes)


def test_the_archive_killed_mid_series_load_gives_an_error_not_a_short_series(
    stack: Stack, material: Material
) -> None:
    """A DICOMweb client loading a whole series (WADO-RS), which Orthanc streams with no length:
    the control plane makes it whole before sending it, so a cut one is a clear 503."""
    client = SlowClient(
        f"{stack.url}/dicom-web/studies/{material.facts.uid}/series/{material.series_uid}",
        {"Cookie": cookies(material.session), "Accept": 'multipart/related; type="application/dicom"'},
    ).start()
    deadline = time.monotonic() + 60
    while spooled_bytes(stack) < KILL_AFTER:
        assert time.monotonic() < deadline and not client.done.is_set(), "the series did not start"
        time.sleep(0.002)
    stack.kill_archive()
    assert client.outcome() is None
    assert client.status == 503, "the archive died midway: no series, and a clear answer"
    stack.wait_for_archive()

    whole = SlowClient(client.url, client.headers).start()
    assert whole.outcome() is None and whole.status == 200
    assert whole.received == int(whole.answer_headers["Content-Length"])


def test_the_archive_killed_mid_bulk_data_breaks_it_off(stack: Stack, material: Material) -> None:
    """Bulk data Caddy streams straight from Orthanc, once the gate said yes."""
    study, series, instance = material.multiframe
    client = SlowClient(
        f"{stack.url}/dicom-web/studies/{study}/series/{series}/instances/{instance}/bulk/7fe00010",
        {"Cookie": cookies(material.session), "Accept": "multipart/related; type=application/octet-stream"},
    ).start()
    client.wait_for(KILL_AFTER)
    stack.kill_archive()
    assert isinstance(client.outcome(), http.client.IncompleteRead), client.error
    assert client.status == 200
    stack.wait_for_archive()


def test_the_archive_killed_while_a_jpeg_lossless_zip_is_made_gives_an_error_not_a_zip(
    stack: Stack, material: Material
) -> None:
    """A transcoded zip is made whole before it is sent: a cut one is a clear 503, and logged so."""
    assert stack.pacs("config", "set", "zip_content", "jpeg-lossless").returncode == 0
    try:
        before = last_activity_id(stack)
        client = SlowClient(
            f"{stack.url}/query/studies/{material.study_id}/archive", {"Cookie": cookies(material.session)}
        ).start()
        deadline = time.monotonic() + 120
        while spooled_bytes(stack) < 1_000_000:
            assert time.monotonic() < deadline and not client.done.is_set(), "the zip was not being made"
            time.sleep(0.01)
        stack.kill_archive()
        assert client.outcome() is None
        assert client.status == 503 and client.answer_headers["Content-Type"].startswith("text/html")
        (event,) = download_events(stack, before)
        detail = json.loads(event.detail)
        assert (detail["completed"], detail["stopped_by"], detail["bytes_sent"]) == (False, "archive", 0)
        stack.wait_for_archive()
    finally:
        stack.pacs("config", "set", "zip_content", "dicom")
