"""Faults injected for real on running stacks, and settings changed while transfers run.

Processes are killed with SIGKILL (the archive, a gunicorn worker, Caddy) in the middle of a zip
upload; the web front's configuration and the registered modalities are changed, from the real
setup page in Chromium and from ``./pacs config set``, while a download runs; the data directory's
disk (a tmpfs the test mounts) fills while an upload arrives; PostgreSQL restarts while searches
run; SQLite is held locked. Each test asserts what the client saw, what the activity log says, and
that the archive holds exactly what the portal acknowledged, whole; and that the portal comes back
by itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
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
from pydicom import Dataset
from pynetdicom import AE
from test_uploads import Uploader

from control import accounts, db
from control.runtime import unixhttp
from control.site import Site
from control.uploads import store

from browser import chromium
from conftest import (
    ADMIN_PASSWORD,
    Stack,
    c_store,
    free_port,
    fresh_study,
    make_stack,
    orthanc_id,
    wait_until,
)
from postgres import PostgresServer
from samples import make_study, store_study

pytestmark = pytest.mark.stack

UPLOADER = ("fault.uploader", "uploads through faults 1")
FILES_IN_ZIP = 1000  # enough that storing them takes a while to interrupt
BOUNDARY = "pacs-fault-boundary"


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A portal of this module's own: its processes get killed."""
    running = make_stack(tmp_path_factory.mktemp("faults"))
    running.start()
    with Site(running.data).engine.begin() as connection:
        accounts.create_user(connection, *UPLOADER, can_upload=True)
    yield running
    running.stop()


@pytest.fixture
def uploader(faulty: Stack) -> Uploader:
    return Uploader(faulty, *UPLOADER)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324 - a checksum, not security


def encoded(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Material:
    """A zip of one new patient's study, and what each of its files is (SOP UID, MD5)."""

    def __init__(self, name: str, count: int = FILES_IN_ZIP, *, noise: bool = False) -> None:
        datasets = make_study(f"Fault^{name}", series=(("CT", count),), size=96, noise=noise)
        self.patient_id = datasets[0].PatientID
        self.files = {f"study/{number:04}.dcm": encoded(dataset) for number, dataset in enumerate(datasets)}
        self.uids = {
            name: str(dataset.SOPInstanceUID) for name, dataset in zip(self.files, datasets, strict=True)
        }

    def zip(self, names: list[str] | None = None) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as packed:
            for name in names or self.files:
                packed.writestr(name, self.files[name])
        return buffer.getvalue()

    def by_uid(self) -> dict[str, str]:
        return {self.uids[name]: md5(content) for name, content in self.files.items()}


def archive_content(stack: Stack, patient_id: str) -> dict[str, str]:
    """What the archive holds for a patient: SOP Instance UID -> MD5 of the stored file, each
    file read back whole."""
    orthanc = stack.orthanc()
    found = orthanc.post(
        f"{stack.orthanc_url}/tools/find",
        json={"Level": "Instance", "Query": {"PatientID": patient_id}, "Expand": True},
    ).json()
    content = {}
    for instance in found:
        answer = orthanc.get(f"{stack.orthanc_url}/instances/{instance['ID']}/file")
        assert answer.status_code == 200, answer.text[:200]
        content[instance["MainDicomTags"]["SOPInstanceUID"]] = md5(answer.content)
    return content


def stored_count(stack: Stack, patient_id: str) -> int:
    try:
        found = stack.orthanc().post(
            f"{stack.orthanc_url}/tools/find",
            json={"Level": "Instance", "Query": {"PatientID": patient_id}},
            timeout=5,
        )
    except requests.RequestException:
        return 0
    return len(found.json()) if found.ok else 0


def events(stack: Stack, action: str, after: int = 0) -> list[sa.Row]:
    with Site(stack.data).engine.connect() as connection:
        query = (
            sa.select(db.activity)
            .where(db.activity.c.action == action, db.activity.c.id > after)
            .order_by(db.activity.c.id)
        )
        return connection.execute(query).all()


def last_event_id(stack: Stack) -> int:
    with Site(stack.data).engine.connect() as connection:
        return connection.execute(sa.select(sa.func.max(db.activity.c.id))).scalar_one() or 0


@contextmanager
def upload_in_background(uploader: Uploader, body: bytes | Iterator[bytes]) -> Iterator[dict]:
    """Post a zip as the upload page's script does; the answer (or the error) lands in the dict.

    A body given piece by piece goes chunked, as a body whose size Caddy cannot judge first.
    """
    outcome: dict = {}
    if isinstance(body, bytes):
        options = {"files": [("files", ("faults.zip", body))]}
    else:
        options = {"data": body, "headers": {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}}

    def post() -> None:
        try:
            outcome["response"] = uploader.post("/upload/files", **options)
        except requests.RequestException as error:
            outcome["error"] = error

    sender = threading.Thread(target=post)
    sender.start()
    try:
        yield outcome
    finally:
        sender.join(300)
    assert not sender.is_alive(), "the upload never ended"


def resend_all(uploader: Uploader, material: Material) -> None:
    """Send everything again, as the answer tells the user to: every file ends up in the archive."""
    answer = uploader.upload(("again.zip", material.zip()))
    assert {result["outcome"] for result in answer["results"]} <= {"stored", "duplicate"}, answer["counts"]


def test_the_archive_killed_during_an_upload(faulty: Stack, uploader: Uploader) -> None:
    material = Material("ArchiveKilled")
    before = last_event_id(faulty)
    with upload_in_background(uploader, material.zip()) as outcome:
        wait_until(lambda: stored_count(faulty, material.patient_id) >= 20, "storing")
        faulty.kill_archive()
    response = outcome["response"]
    assert response.status_code == 200, response.text[:300]
    results = {result["name"].removeprefix("faults.zip: "): result for result in response.json()["results"]}
    stored = {name for name, result in results.items() if result["outcome"] == "stored"}
    others = {name: result for name, result in results.items() if name not in stored}
    assert stored and others, response.json()["counts"]
    for name, result in others.items():
        assert result["outcome"] == "refused", (name, result)
        assert result["detail"].endswith("please send it again"), (name, result)

    faulty.wait_for_archive()
    sent, held = material.by_uid(), archive_content(faulty, material.patient_id)
    # Everything acknowledged is there, whole; nothing is there that was not sent, or not whole.
    assert all(held.get(material.uids[name]) == sent[material.uids[name]] for name in stored)
    assert all(sent.get(uid) == digest for uid, digest in held.items())
    # Besides: at most the files in the archive's hands when it died (stored, their answer lost).
    assert len(set(held) - {material.uids[name] for name in stored}) <= store.SENDERS

    (event,) = events(faulty, "upload", after=before)
    detail = json.loads(event.detail)
    assert event.outcome == "ok"
    assert (detail["stored"], detail["refused"]) == (len(stored), len(others))

    resend_all(uploader, material)
    assert archive_content(faulty, material.patient_id) == sent


def test_a_worker_killed_during_an_upload(faulty: Stack, uploader: Uploader) -> None:
    material = Material("WorkerKilled")
    before = last_event_id(faulty)
    spool = faulty.data / "tmp"
    with upload_in_background(uploader, material.zip()) as outcome:
        wait_until(lambda: stored_count(faulty, material.patient_id) >= 20, "storing")
        (worker,) = [pid for pid in faulty.processes().workers if holds_an_upload(pid, spool)]
        os.kill(worker, signal.SIGKILL)
    response = outcome["response"]
    # The portal's answer, as the upload page's script reads it: not an empty 502.
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert "Sending an upload again is safe" in response.json()["message"]
    assert _answers(faulty.url)  # the other worker, and the one started in its place, answer

    (event,) = events(faulty, "upload", after=before)
    detail = json.loads(event.detail)
    assert event.outcome == "failed" and detail["state"].startswith("not completed")
    sent, held = material.by_uid(), archive_content(faulty, material.patient_id)
    assert held and all(sent.get(uid) == digest for uid, digest in held.items())
    assert detail.get("stored", 0) <= len(held)

    resend_all(uploader, material)
    assert archive_content(faulty, material.patient_id) == sent


def holds_an_upload(pid: int, spool: Path) -> bool:
    """Whether a worker holds a received upload in the spool (beside gunicorn's empty heartbeat
    file, which every worker keeps there)."""
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(descriptor).startswith(f"{spool}/") and descriptor.stat().st_size:
                return True
    return False


def test_the_web_front_killed_during_an_upload(faulty: Stack, uploader: Uploader) -> None:
    material = Material("CaddyKilled")
    before = last_event_id(faulty)
    with upload_in_background(uploader, material.zip()) as outcome:
        wait_until(lambda: stored_count(faulty, material.patient_id) >= 20, "storing")
        os.kill(int((faulty.data / "run" / "caddy.pid").read_text()), signal.SIGKILL)
    assert isinstance(outcome.get("error"), requests.ConnectionError), outcome
    # The control plane finishes what it received, and says so; the web front comes back.
    wait_until(lambda: [row.outcome for row in events(faulty, "upload", after=before)] == ["ok"], "the row")
    wait_until(lambda: _answers(faulty.url), "the web front's return")
    (event,) = events(faulty, "upload", after=before)
    assert json.loads(event.detail)["stored"] == FILES_IN_ZIP
    assert archive_content(faulty, material.patient_id) == material.by_uid()

    again = uploader.upload(("again.zip", material.zip()))
    assert again["counts"]["duplicate"] == FILES_IN_ZIP


def in_flight(stack: Stack) -> int:
    """The requests the stack's web front is proxying, as its admin API counts them."""
    status, body = unixhttp.request(
        stack.data / "run" / "caddy-admin.sock", "GET", "/reverse_proxy/upstreams"
    )
    assert status == 200
    return sum(upstream["num_requests"] for upstream in json.loads(body))


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def test_the_portal_restarting_answers_with_its_page(faulty: Stack) -> None:
    """gunicorn gone (master and workers killed): Caddy answers for it until the runner has
    started it again."""
    master = int((faulty.data / "run" / "control.pid").read_text())
    os.killpg(master, signal.SIGKILL)
    page = requests.get(f"{faulty.url}/query", headers={"Accept": "text/html"})
    assert page.status_code == 503 and page.headers["Retry-After"]
    assert "The portal is restarting" in page.text and faulty.institution in page.text
    assert page.headers["X-Frame-Options"] == "DENY"
    answer = requests.get(f"{faulty.url}/query", headers={"Accept": "application/json"})
    assert answer.status_code == 503 and "try again in a moment" in answer.json()["message"]
    wait_until(lambda: _answers(faulty.url), "the control plane's return")


class SlowDownload:
    """A signed-in user's zip download that has started and is paused, its bytes in flight."""

    def __init__(self, stack: Stack, study_id: str) -> None:
        self.session = stack.sign_in()
        self.response = self.session.get(f"{stack.url}/query/studies/{study_id}/archive", stream=True)
        assert self.response.status_code == 200
        self.chunks = self.response.iter_content(256 * 1024)
        self.received = [next(self.chunks)]

    def finish(self) -> zipfile.ZipFile:
        """Read the rest; the zip, which must be whole."""
        self.received.extend(self.chunks)
        packed = zipfile.ZipFile(io.BytesIO(b"".join(self.received)))
        assert packed.testzip() is None
        return packed


@pytest.fixture(scope="module")
def big_study(faulty: Stack) -> tuple[str, dict[str, str]]:
    """40 MB of noise (far more than the buffers between the archive and a client hold): the
    study's Orthanc id, and its files' SOP UIDs -> MD5 as stored."""
    facts = store_study(faulty, make_study("Slow^Download", series=(("CT", 40),), size=724, noise=True))
    study = orthanc_id(faulty, facts.uid)
    orthanc = faulty.orthanc()
    files = {}
    for instance in orthanc.get(f"{faulty.orthanc_url}/studies/{study}/instances").json():
        content = orthanc.get(f"{faulty.orthanc_url}/instances/{instance['ID']}/file").content
        files[instance["MainDicomTags"]["SOPInstanceUID"]] = md5(content)
    return study, files


def assert_whole(packed: zipfile.ZipFile, files: dict[str, str]) -> None:
    members = [name for name in packed.namelist() if not name.endswith("/")]
    got = {}
    for name in members:
        content = packed.read(name)
        got[str(pydicom.dcmread(io.BytesIO(content)).SOPInstanceUID)] = md5(content)
    assert got == files


def admin_page(browser, stack: Stack, path: str):
    page = browser.new_context().new_page()
    page.goto(f"{stack.url}/login")
    page.fill("#username", "admin")
    page.fill("#password", ADMIN_PASSWORD)
    page.click("button[type=submit]")
    page.goto(f"{stack.url}{path}")
    return page


def test_settings_changed_on_the_setup_page_never_cut_a_download(
    faulty: Stack, big_study: tuple[str, dict[str, str]]
) -> None:
    study, files = big_study
    before = last_event_id(faulty)
    download = SlowDownload(faulty, study)
    with chromium() as browser:
        page = admin_page(browser, faulty, "/admin/settings")
        page.fill("#upload_max_mb", "777")
        page.fill("#department", "Fault Radiology")
        page.get_by_role("button", name="Save and apply").click()
        page.wait_for_selector("text=Saved. The portal is reachable at")
    time.sleep(2)  # any load of the web front's configuration happens just after the answer
    assert_whole(download.finish(), files)
    assert "Fault Radiology" in requests.get(f"{faulty.url}/").text
    (change,) = events(faulty, "settings-changed", after=before)
    assert json.loads(change.detail)["changed"]["upload_max_mb"] == {"old": 2048, "new": 777}
    assert change.username == "admin"


def test_config_set_never_cuts_a_download(faulty: Stack, big_study: tuple[str, dict[str, str]]) -> None:
    study, files = big_study
    download = SlowDownload(faulty, study)
    changes = [
        faulty.pacs("config", "set", name, value)
        for name, value in (("upload_max_mb", "1024"), ("time_zone", "Europe/Athens"), ("token_days", "30"))
    ]
    assert_whole(download.finish(), files)
    for changed in changes:
        assert changed.returncode == 0, changed.stderr
        assert "Applied to the running portal." in changed.stdout


def test_a_new_web_port_waits_for_transfers_or_the_admins_word(
    faulty: Stack, big_study: tuple[str, dict[str, str]]
) -> None:
    study, files = big_study
    new_port = free_port()
    download = SlowDownload(faulty, study)
    refused = faulty.pacs("config", "set", "web_port", str(new_port))
    assert refused.returncode == 1
    assert "1 transfer in progress" in refused.stderr and "--cut-transfers" in refused.stderr
    assert "Nothing changed" in refused.stderr
    assert_whole(download.finish(), files)
    assert faulty.pacs("config", "show").stdout.count(f"web_port = {faulty.web_port}") == 1

    wait_until(lambda: in_flight(faulty) == 0, "the end of the download for the web front")
    moved = faulty.pacs("config", "set", "web_port", str(new_port))
    assert moved.returncode == 0, moved.stderr
    assert _answers(f"http://127.0.0.1:{new_port}")
    back = faulty.pacs("config", "set", "web_port", str(faulty.web_port))
    assert back.returncode == 0, back.stderr
    assert _answers(faulty.url)


def test_new_dicom_settings_on_the_setup_page_say_what_they_would_cut_first(
    faulty: Stack, big_study: tuple[str, dict[str, str]]
) -> None:
    study, files = big_study
    new_port = free_port()
    download = SlowDownload(faulty, study)
    with chromium() as browser:
        page = admin_page(browser, faulty, "/admin/settings")
        page.fill("#dicom_port", str(new_port))
        page.get_by_role("button", name="Save and apply").click()
        notice = page.wait_for_selector(".confirm-cut")
        assert "Nothing was changed yet: 1 transfer in progress" in notice.inner_text()
        assert "the archive restarts" in notice.inner_text()
        # Nothing moved: the download goes on, the archive still listens where it did.
        assert c_store(faulty, fresh_study("CT_small.dcm")) == 0
        assert_whole(download.finish(), files)

        page.get_by_role("button", name="Save and cut 1 transfer").click()
        page.wait_for_selector("text=The archive restarts with the new DICOM settings.")
    moved = dataclasses.replace(faulty, dicom_port=new_port)
    wait_until(lambda: _stores(moved), "the archive on its new DICOM port")
    restored = faulty.pacs("config", "set", "dicom_port", str(faulty.dicom_port))
    assert restored.returncode == 0, restored.stderr
    wait_until(lambda: _stores(faulty), "the archive back on its DICOM port")


def _stores(stack: Stack) -> bool:
    """Whether the archive takes a study on the stack's DICOM port (once it listens there)."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", stack.dicom_port)) != 0:
            return False
    return c_store(stack, fresh_study("CT_small.dcm")) == 0


def test_new_modalities_never_restart_the_archive(
    faulty: Stack, big_study: tuple[str, dict[str, str]]
) -> None:
    study, files = big_study
    download = SlowDownload(faulty, study)
    # A modality in the middle of sending: its association must survive the change.
    dataset = fresh_study("CT_small.dcm")
    ae = AE(ae_title="FAULTSCU")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", faulty.dicom_port, ae_title=faulty.aet)
    assert association.is_established
    try:
        assert association.send_c_store(dataset).Status == 0
        changed = faulty.pacs("config", "set", "dicom_modalities", "FAULTCT@127.0.0.1:11112")
        assert changed.returncode == 0, changed.stderr
        with chromium() as browser:
            page = admin_page(browser, faulty, "/upload/worklist")
            page.fill("input[name=aet]", "FAULTMR")
            page.fill("input[name=host]", "127.0.0.1")
            page.fill("input[name=port]", "11113")
            page.get_by_role("button", name="Register").click()
            page.wait_for_selector("text=Saved: the registered modalities may now query the worklist.")
        second = fresh_study("CT_small.dcm")
        assert association.is_established and association.send_c_store(second).Status == 0
    finally:
        association.release()
    assert_whole(download.finish(), files)
    assert "The archive took it at once; nothing was restarted." in changed.stdout
    registered = faulty.orthanc().get(f"{faulty.orthanc_url}/modalities", params={"expand": ""}).json()
    assert {entry["AET"] for entry in registered.values()} == {"FAULTCT", "FAULTMR"}
    rendered = json.loads((faulty.data / "run" / "orthanc.json").read_text())["DicomModalities"]
    assert set(rendered) == {"FAULTCT", "FAULTMR"}
    shapes = [json.loads(row.detail)["changed"] for row in events(faulty, "settings-changed")[-2:]]
    assert [set(shape) for shape in shapes] == [{"dicom_modalities"}, {"dicom_modalities"}]


def test_a_locked_database_answers_503_and_loses_no_activity(faulty: Stack) -> None:
    session = faulty.sign_in()
    search = f"{faulty.url}/query/studies"
    assert session.get(search, params={"patient_id": "LOCKED"}).status_code == 200
    before = len(events(faulty, "search"))
    held = sqlite3.connect(faulty.data / "control.sqlite3", isolation_level=None)
    answers: list[requests.Response] = []
    try:
        held.execute("BEGIN EXCLUSIVE")
        asking = threading.Thread(
            target=lambda: answers.append(session.get(search, params={"patient_id": "LOCKED"}, timeout=120))
        )
        asking.start()
        asking.join(120)
    finally:
        held.execute("ROLLBACK")
        held.close()
    (answer,) = answers
    assert answer.status_code == 503
    assert "database is not available" in answer.text
    assert faulty.institution in answer.text  # the portal's own page
    assert answer.headers["Retry-After"]
    assert session.get(search, params={"patient_id": "LOCKED"}).status_code == 200
    # The refused search left no row; the answered one has its row.
    assert len(events(faulty, "search")) == before + 1


def test_postgresql_restarted_during_searches(postgres: PostgresServer, tmp_path: Path) -> None:
    url = postgres.create_database("pacs")
    stack = make_stack(tmp_path / "data", PACS_DATABASE_URL=url)
    stack.start()
    try:
        session = stack.sign_in()
        search = f"{stack.url}/query/studies"
        statuses: list[tuple[int, str]] = []
        searching = threading.Event()
        searching.set()

        def keep_searching() -> None:
            while searching.is_set():
                answer = session.get(search, params={"patient_id": "RESTART"}, timeout=120)
                statuses.append((answer.status_code, answer.text))

        searcher = threading.Thread(target=keep_searching)
        searcher.start()
        try:
            wait_until(lambda: len(statuses) >= 3, "searches")
            postgres.restart(down_for=3)
            answered = len(statuses)
            wait_until(lambda: len(statuses) >= answered + 3 and statuses[-1][0] == 200, "searches again")
        finally:
            searching.clear()
            searcher.join(120)
        codes = [code for code, _text in statuses]
        assert set(codes) <= {200, 503}, codes
        assert 503 in codes, "no search fell in the restart"
        assert all("database is not available" in text for code, text in statuses if code == 503)
        engine = db.make_engine(url)
        with engine.connect() as connection:
            rows = connection.execute(
                sa.select(sa.func.count()).where(db.activity.c.action == "search")
            ).scalar_one()
        engine.dispose()
        assert rows == codes.count(200)
    finally:
        stack.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 160 MB filesystem of the test's own (a tmpfs), for a data directory."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_mb: int) -> Path:
    """Write a file that leaves about ``leave_mb`` MB of the disk free."""
    filler = disk / "filler.bin"
    block = b"\0" * (256 * 1024)
    with filler.open("ab") as file, contextlib.suppress(OSError):  # full already: so be it
        while free_bytes(disk) > leave_mb * 1024 * 1024 + len(block):
            file.write(block)
            file.flush()
    return filler


def free_bytes(disk: Path) -> int:
    facts = os.statvfs(disk)
    return facts.f_bavail * facts.f_frsize


def test_the_disk_filling_during_an_upload(small_disk: Path) -> None:
    stack = make_stack(small_disk / "data", PACS_DISK_RESERVE_MB="24")
    stack.start()
    try:
        with Site(stack.data).engine.begin() as connection:
            accounts.create_user(connection, *UPLOADER, can_upload=True)
        uploader = Uploader(stack, *UPLOADER)
        material = Material("DiskFull", count=400, noise=True)  # 7 MB that no zip makes smaller
        body = material.zip()
        head = (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="faults.zip"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
        tail = f"\r\n--{BOUNDARY}--\r\n".encode()
        first = len(body) // 4
        paused, resume = threading.Event(), threading.Event()

        def slowly() -> Iterator[bytes]:
            yield head + body[:first]
            paused.set()
            resume.wait(60)
            yield body[first:] + tail

        with upload_in_background(uploader, slowly()) as outcome:
            assert paused.wait(60)
            filler = fill(small_disk, leave_mb=1)  # less than the rest of the upload
            resume.set()
        response = outcome["response"]
        assert response.status_code == 507, response.text[:300]
        assert "filled up while this upload arrived" in response.json()["message"]
        (event,) = events(stack, "upload")
        assert event.outcome == "refused" and json.loads(event.detail)["reason"] == "disk nearly full"
        assert archive_content(stack, material.patient_id) == {}  # nothing was acknowledged
        # What had arrived of it is not left taking the disk.
        assert free_bytes(small_disk) > 512 * 1024

        # Nearly full before an upload: refused before its body is sent, with the portal's answer.
        refused = uploader.post("/upload/files", files=[("files", ("faults.zip", body))])
        assert refused.status_code == 507
        assert "The archive's disk is nearly full" in refused.json()["message"]
        page = uploader.post(
            "/upload/files", files=[("files", ("faults.zip", body))], headers={"Accept": "text/html"}
        )
        assert page.url.endswith("/upload") and "disk is nearly full" in page.text

        filler.unlink()  # an administrator makes room: uploads work again, nothing else to do
        answer = uploader.upload(("faults.zip", body))
        assert answer["counts"]["stored"] == len(material.files)
        assert archive_content(stack, material.patient_id) == material.by_uid()
        assert [row.outcome for row in events(stack, "upload")] == ["refused", "refused", "refused", "ok"]
        assert "Traceback" not in (stack.data / "logs" / "control.log").read_text()
    finally:
        stack.stop()
