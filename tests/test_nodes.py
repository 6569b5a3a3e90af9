"""Several archive nodes and control planes on one PostgreSQL, and what the failure of each does.

One portal runs as a larger site runs it, with ``./pacs up --nodes 2``: a private PostgreSQL server
holds the control plane's database and the archive's index; two Orthancs share the storage and
worklist folders; two control planes run behind the one Caddy. The faults are real: kill -9 of
the Orthanc that takes the writes while modalities store over DICOM, an uploader posts a zip and
two zips download; kill -9 of a control plane in the middle of two downloads, as a user sends
the sign-in form (Chromium); PostgreSQL restarted. The runner starts a killed process again by
itself, as it would on a site.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import io
import json
import os
import re
import signal
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pydicom
import pytest
import requests
import sqlalchemy as sa
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from bench.stack import free_ports, stack_environment
from control import accounts, db, orphans
from control.activity import Action
from control.runtime import configs

from browser import chromium, submit
from conftest import ADMIN_PASSWORD, Stack, csrf_token, free_port, make_stack
from postgres import PostgresServer, binaries
from samples import make_study, store_study

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(binaries() is None, reason="PostgreSQL is not installed"),
]

NODES = 2
UPLOADER = ("ulla", "uploads many studies 1")
READ_BLOCK = 64 * 1024


@dataclass
class Cluster:
    """The multi-node portal and its PostgreSQL server."""

    stack: Stack
    postgres: PostgresServer
    database_url: str

    def node_url(self, number: int) -> str:
        return f"http://127.0.0.1:{self.stack.orthanc_port + number - 1}"

    def dicom_port(self, number: int) -> int:
        return self.stack.dicom_port + number - 1

    def orthanc(self) -> requests.Session:
        return self.stack.orthanc()

    def pid(self, name: str) -> int:
        return int((self.stack.data / "run" / f"{name}.pid").read_text())

    def engine(self) -> sa.Engine:
        return sa.create_engine(self.database_url)

    def events(self, action: str, after: int = 0) -> list[sa.Row]:
        engine = self.engine()
        try:
            with engine.connect() as connection:
                return connection.execute(
                    sa.select(db.activity)
                    .where(db.activity.c.action == action, db.activity.c.id > after)
                    .order_by(db.activity.c.id)
                ).all()
        finally:
            engine.dispose()

    def last_event(self) -> int:
        engine = self.engine()
        try:
            with engine.connect() as connection:
                return connection.execute(sa.select(sa.func.max(db.activity.c.id))).scalar() or 0
        finally:
            engine.dispose()

    def wait_until_whole(self, timeout: float = 120) -> None:
        """Until the portal says every node answers (a killed one started again by the runner)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                answer = requests.get(f"{self.stack.url}/healthz", timeout=10)
                if answer.status_code == 200 and answer.json()["status"] == "ok":
                    return
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the portal did not come back whole"
            time.sleep(0.5)

    def instances_of(self, number: int) -> set[str]:
        """Every SOP Instance UID the archive holds, as node ``number`` answers."""
        found = self.orthanc().post(
            f"{self.node_url(number)}/tools/find",
            json={"Level": "Instance", "Query": {}, "Expand": True},
            timeout=120,
        )
        assert found.status_code == 200, found.text
        return {instance["MainDicomTags"]["SOPInstanceUID"] for instance in found.json()}


@pytest.fixture(scope="module")
def cluster(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    url = postgres.create_database("pacs")
    web, dicom, orthanc_port = free_port(), free_ports(NODES), free_ports(NODES)
    env = stack_environment(
        web,
        dicom,
        orthanc_port,
        PACS_INSTITUTION="St. Scale Hospital",
        PACS_ADMIN_PASSWORD=ADMIN_PASSWORD,
        PACS_DATABASE_URL=url,
        PACS_NODES=str(NODES),
    )
    running = Stack(tmp_path_factory.mktemp("nodes"), web, dicom, orthanc_port, env=env)
    running.start()
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        accounts.create_user(connection, *UPLOADER, can_upload=True)
        # Today's sweep of orphan files counts as done (its first comes a minute after a worker
        # starts): here only the admin's command sweeps, at the moment the tests say.
        connection.execute(
            db.revisions.update()
            .where(db.revisions.c.name == orphans.LEASE)
            .values(value=dt.date.today().toordinal())
        )
    engine.dispose()
    yield Cluster(running, postgres, url)
    running.stop()


def modality_ae(aet: str = "MODALITY") -> AE:
    ae = AE(ae_title=aet)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")  # CT, explicit VR LE
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.dimse_timeout = 30
    return ae


@dataclass
class Modality:
    """A modality sending its studies over DICOM to its archive, and to the next node when the
    archive breaks the association off, as a modality with a second destination does."""

    HELD = 10

    ports: list[int]
    datasets: list[Dataset]
    # Set when the fault has happened: until then the last HELD datasets wait, so that the fault
    # finds the modality still sending however slowly the machine runs.
    fault: threading.Event
    pause: float = 0.05
    acknowledged: set[str] = field(default_factory=set)
    reported_failed: set[str] = field(default_factory=set)  # ever answered with no success
    thread: threading.Thread | None = None

    def start(self) -> Modality:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        ae = modality_ae()
        destinations = iter(self.ports)
        association = ae.associate("127.0.0.1", next(destinations), ae_title="ORTHANC")
        waiting = list(self.datasets)
        while waiting:
            if len(waiting) <= self.HELD:
                self.fault.wait(300)
            dataset = waiting.pop(0)
            uid = str(dataset.SOPInstanceUID)
            status = None
            if association.is_established:
                answer = association.send_c_store(dataset)
                status = int(answer.Status) if "Status" in answer else None
            if status == 0:
                self.acknowledged.add(uid)
                time.sleep(self.pause)
                continue
            # No success status: the sender knows this one failed, and sends it again elsewhere.
            self.reported_failed.add(uid)
            waiting.append(dataset)
            if association.is_established:
                association.abort()
            association = ae.associate("127.0.0.1", next(destinations), ae_title="ORTHANC")
        association.release()

    def join(self, timeout: float = 300) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the modality did not finish sending"


@dataclass
class SlowDownload:
    """A zip read slowly into a file on a thread: how much came and how the answer ended."""

    url: str
    session: requests.Session
    path: Path
    received: int = 0
    length: int = 0
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> SlowDownload:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        try:
            with self.session.get(self.url, stream=True, timeout=120) as answer, self.path.open("wb") as file:
                answer.raise_for_status()
                self.length = int(answer.headers["Content-Length"])
                for block in answer.iter_content(READ_BLOCK):
                    file.write(block)
                    self.received += len(block)
                    time.sleep(0.03)
        except (requests.RequestException, OSError) as error:
            self.error = error
        finally:
            self.done.set()

    def wait_for(self, received: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.received < received:
            assert not self.done.is_set(), f"the download ended early: {self.error!r}"
            assert time.monotonic() < deadline, "the download did not get going"
            time.sleep(0.05)

    def outcome(self, timeout: float = 300) -> Exception | None:
        assert self.done.wait(timeout), "the download never ended"
        return self.error


def zip_of(datasets: list[Dataset]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as packed:
        for number, dataset in enumerate(datasets):
            member = io.BytesIO()
            dataset.save_as(member, enforce_file_format=True)
            packed.writestr(f"upload/{number:04}.dcm", member.getvalue())
    return buffer.getvalue()


def study_in_archive(cluster: Cluster, study_uid: str) -> str:
    found = cluster.orthanc().post(f"{cluster.node_url(2)}/tools/lookup", data=study_uid).json()
    return next(item["ID"] for item in found if item["Type"] == "Study")


def find_refused_by(ae_title: str, port: int) -> None:
    """A C-FIND from an AE title no one registered: the archive refuses the association's request."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    association = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
    if association.is_established:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        for _status, _identifier in association.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            pass
        association.release()


def test_every_node_serves_what_any_node_stored(cluster: Cluster) -> None:
    """Both nodes hold one archive: stored through one, found, shown and zipped through the other."""
    datasets = make_study("Shared^Sam", series=(("CT", 3),))
    facts = store_study(cluster.stack, datasets)  # the first node's DICOM port
    assert {str(dataset.SOPInstanceUID) for dataset in datasets} <= cluster.instances_of(2)
    for number in (1, 2):
        statistics = cluster.orthanc().get(f"{cluster.node_url(number)}/statistics").json()
        assert statistics["CountInstances"] >= 3
    session = cluster.stack.sign_in()
    page = session.get(
        f"{cluster.stack.url}/query/studies", params={"patient_id": facts.patient_id, "format": "json"}
    )
    assert page.status_code == 200
    assert [row["id"] for row in page.json()["rows"]] == [study_in_archive(cluster, facts.uid)]
    health = requests.get(f"{cluster.stack.url}/healthz").json()
    assert health["status"] == "ok" and set(health["nodes"]) == {"orthanc", "orthanc-2"}


def test_registered_modalities_and_restarts_reach_every_node(cluster: Cluster) -> None:
    stack = cluster.stack
    changed = stack.pacs("config", "set", "dicom_modalities", "CT7@127.0.0.7:104")
    assert changed.returncode == 0, changed.stderr
    for number in (1, 2):
        registered = cluster.orthanc().get(f"{cluster.node_url(number)}/modalities", params={"expand": ""})
        assert registered.json()["CT7"]["Host"] == "127.0.0.7", f"node {number} was not told"

    # Storing from registered modalities only restarts every node with the new configuration.
    changed = stack.pacs("config", "set", "dicom_store_from", "registered", "--cut-transfers")
    assert changed.returncode == 0, changed.stderr
    try:
        cluster.wait_until_whole()
        for number in (1, 2):
            ae = modality_ae("UNKNOWN")
            deadline = time.monotonic() + 60
            while True:
                association = ae.associate("127.0.0.1", cluster.dicom_port(number), ae_title="ORTHANC")
                if association.is_established:
                    break
                assert time.monotonic() < deadline, f"node {number} did not come back"
                time.sleep(0.5)
            (dataset,) = make_study("Refused^Ray")
            status = association.send_c_store(dataset)
            if association.is_established:
                association.release()
            assert "Status" not in status or status.Status != 0, (
                f"node {number} still takes stores from anyone"
            )
            assert str(dataset.SOPInstanceUID) not in cluster.instances_of(number)
    finally:
        assert stack.pacs("config", "set", "dicom_store_from", "any", "--cut-transfers").returncode == 0
        assert stack.pacs("config", "set", "dicom_modalities", "").returncode == 0
        cluster.wait_until_whole()


def test_refused_calls_on_every_node_are_recorded_once(cluster: Cluster) -> None:
    """Four watchers run (two workers in each control plane); each node's refusal is one event."""
    before = cluster.last_event()
    find_refused_by("NOSUCH1", cluster.dicom_port(1))
    find_refused_by("NOSUCH2", cluster.dicom_port(2))
    deadline = time.monotonic() + 60
    while True:
        refused = [json.loads(row.detail) for row in cluster.events("dicom-refused", before)]
        if {event["aet"] for event in refused} >= {"NOSUCH1", "NOSUCH2"}:
            break
        assert time.monotonic() < deadline, f"not recorded: {refused}"
        time.sleep(0.5)
    time.sleep(5)  # two more rounds of every watcher: nothing is recorded twice
    refused = [json.loads(row.detail) for row in cluster.events("dicom-refused", before)]
    assert sorted(event["aet"] for event in refused) == ["NOSUCH1", "NOSUCH2"]
    assert [event.get("node") for event in refused if event["aet"] == "NOSUCH2"] == ["orthanc-2"]


def test_the_writer_killed_while_modalities_store_an_upload_arrives_and_zips_download(
    cluster: Cluster, tmp_path: Path
) -> None:
    stack = cluster.stack
    session = stack.sign_in()
    zipped = store_study(stack, make_study("Zip^Zelda", series=(("CT", 40),), size=512, noise=True))
    zip_url = f"{stack.url}/query/studies/{study_in_archive(cluster, zipped.uid)}/archive"
    upload_datasets = make_study("Upload^Ulla", series=(("CT", 150),), size=128, noise=True)
    upload_body = zip_of(upload_datasets)
    uploader = stack.sign_in(*UPLOADER)
    token = csrf_token(uploader.get(f"{stack.url}/").text)
    fault = threading.Event()
    modalities = [
        Modality(
            [cluster.dicom_port(1), cluster.dicom_port(2), cluster.dicom_port(2)],
            make_study(f"Modality^M{number}", series=(("CT", 60),), size=64),
            fault,
        )
        for number in (1, 2)
    ]
    downloads = [SlowDownload(zip_url, session, tmp_path / f"zip-{number}.zip") for number in (1, 2)]
    uploaded: list[requests.Response] = []

    def upload() -> None:
        uploaded.append(
            uploader.post(
                f"{stack.url}/upload/files",
                files=[("files", ("studies.zip", upload_body))],
                headers={"Accept": "application/json", "X-CSRFToken": token},
                timeout=600,
            )
        )

    upload_thread = threading.Thread(target=upload, daemon=True)
    for download in downloads:
        download.start()
    for modality in modalities:
        modality.start()
    upload_thread.start()
    upload_uids = {str(dataset.SOPInstanceUID) for dataset in upload_datasets}
    deadline = time.monotonic() + 180
    while len(upload_uids & cluster.instances_of(2)) < 5 or any(len(m.acknowledged) < 5 for m in modalities):
        assert time.monotonic() < deadline, "the upload and the modalities did not get going"
        time.sleep(0.2)
    for download in downloads:
        download.wait_for(2 * 1024 * 1024)

    assert upload_thread.is_alive(), "the upload was over before the fault"
    os.kill(cluster.pid("orthanc"), signal.SIGKILL)
    killed_at = time.monotonic()
    fault.set()
    answers = []
    while time.monotonic() - killed_at < 3 * configs.HEALTH_INTERVAL:
        at = time.monotonic() - killed_at
        page = session.get(f"{stack.url}/query/studies", params={"patient_id": zipped.patient_id})
        series = next(iter(zipped.series))
        metadata = session.get(f"{stack.url}/dicom-web/studies/{zipped.uid}/series/{series}/metadata")
        answers.append((round(at, 2), page.status_code, metadata.status_code))
        time.sleep(0.2)
    # The survivor answers at once: reads are sent to it as soon as the dead node refuses, by the
    # control planes and by Caddy alike (within one health interval is what the site is promised).
    assert all(answer[1:] == (200, 200) for answer in answers), answers

    for modality in modalities:
        modality.join()
    upload_thread.join(600)
    held = cluster.instances_of(2)
    for modality in modalities:
        sent = {str(dataset.SOPInstanceUID) for dataset in modality.datasets}
        # The kill broke each modality's association: the stores in flight were failures at the
        # modality, which sent them again to the other node. Every acknowledged one is indexed.
        assert modality.reported_failed, "the fault did not reach this modality"
        assert modality.acknowledged == sent
        assert sent <= held
    (answer,) = uploaded
    assert answer.status_code == 200, answer.text[:500]
    outcomes = {row["outcome"] for row in answer.json()["results"]}
    assert outcomes <= {"stored", "duplicate"}, answer.json()["results"]
    assert upload_uids <= held

    # The portal builds zips from stored files that every node serves: both go on from the
    # surviving node and arrive whole, every file as stored.
    for download in downloads:
        assert download.outcome() is None, download.error
        assert download.received == download.length
        with zipfile.ZipFile(download.path) as archive:
            assert archive.testzip() is None
            members = [pydicom.dcmread(archive.open(name)) for name in archive.namelist()]
        assert {str(member.SOPInstanceUID) for member in members} == next(iter(zipped.series.values()))

    # The runner starts the node again; then every node counts the same.
    cluster.wait_until_whole()
    first, second = (
        cluster.orthanc().get(f"{cluster.node_url(number)}/statistics").json() for number in (1, 2)
    )
    assert first == second
    assert cluster.instances_of(1) == cluster.instances_of(2)
    sweep_orphans(cluster)


def stored_files(storage: Path) -> list[Path]:
    return [path for path in storage.glob("??/??/*") if re.fullmatch(r"[0-9a-f-]{36}", path.name)]


def sweep_orphans(cluster: Cluster) -> None:
    """What the kill left (and one file as a crash leaves it) counted, and removed once a day old."""
    storage = cluster.stack.data / "orthanc"
    some_file = stored_files(storage)[0]
    planted = storage / "0f" / "f0" / "0ff0c0de-0000-4000-8000-000000000001"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(some_file.read_bytes())
    with psycopg.connect(cluster.postgres.url("pacs_archive", driver=False)) as connection:
        indexed = {row[0] for row in connection.execute("SELECT uuid FROM attachedfiles")}
    unindexed = {path for path in stored_files(storage) if path.name not in indexed}
    assert planted in unindexed

    counted = cluster.stack.pacs("archive", "orphans")
    assert counted.returncode == 0, counted.stderr
    assert (
        f", 0 not in the archive's index and older than a day; {len(unindexed)} newer ones" in counted.stdout
    )

    day_and_more = time.time() - 26 * 3600
    for path in stored_files(storage):
        os.utime(path, (day_and_more, day_and_more))
    before = cluster.last_event()
    swept = cluster.stack.pacs("archive", "orphans", "--remove")
    assert swept.returncode == 0, swept.stderr
    assert f"{len(unindexed)} not in the archive's index and older than a day" in swept.stdout
    assert f"{len(unindexed)} removed" in swept.stdout
    assert not any(path.exists() for path in unindexed)
    left = {path.name for path in stored_files(storage)}
    assert left == indexed
    (event,) = cluster.events("archive-orphans", before)
    assert json.loads(event.detail)["removed"] == len(unindexed)
    # Nothing the index names went: every file of every instance is served whole.
    for instance in cluster.orthanc().get(f"{cluster.node_url(1)}/instances").json()[:50]:
        answer = cluster.orthanc().get(f"{cluster.node_url(1)}/instances/{instance}/file")
        md5 = cluster.orthanc().get(f"{cluster.node_url(1)}/instances/{instance}/attachments/dicom/md5")
        assert hashlib.md5(answer.content).hexdigest() == md5.text  # noqa: S324 - Orthanc's checksum


def test_a_control_plane_killed_mid_download_fails_that_download_visibly_and_no_other(
    cluster: Cluster, tmp_path: Path
) -> None:
    stack = cluster.stack
    session = stack.sign_in()
    zipped = store_study(stack, make_study("Plane^Paul", series=(("CT", 40),), size=512, noise=True))
    zip_url = f"{stack.url}/query/studies/{study_in_archive(cluster, zipped.uid)}/archive"
    with chromium() as browser:
        # A user signing in: the form is sent the moment the control plane is killed.
        page = browser.new_context().new_page()
        page.goto(f"{stack.browser_url}/login")
        page.fill("#username", "admin")
        page.fill("#password", ADMIN_PASSWORD)
        sign_ins = len(cluster.events(Action.SIGN_IN))
        # Caddy sends each request to the control plane with the fewest in flight: one download each.
        downloads = [
            SlowDownload(zip_url, session, tmp_path / f"zip-{number}.zip").start() for number in (1, 2)
        ]
        for download in downloads:
            download.wait_for(2 * 1024 * 1024)
        os.killpg(cluster.pid("control"), signal.SIGKILL)
        killed_at = time.monotonic()
        submit(page, "button[type=submit]")
        assert "Signed in as admin" in page.inner_text("header"), page.inner_text("main")[:300]
    answers = []
    while time.monotonic() - killed_at < 2 * configs.HEALTH_INTERVAL:
        answers.append(session.get(f"{stack.url}/query/studies", params={"patient_id": zipped.patient_id}))
        time.sleep(0.2)
    assert all(answer.status_code == 200 for answer in answers), [a.status_code for a in answers]
    assert len(cluster.events(Action.SIGN_IN)) == sign_ins + 1

    outcomes = [download.outcome() for download in downloads]
    cut = [download for download, error in zip(downloads, outcomes, strict=True) if error is not None]
    whole = [download for download, error in zip(downloads, outcomes, strict=True) if error is None]
    assert len(cut) == 1 and len(whole) == 1, outcomes
    assert cut[0].received < cut[0].length
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(cut[0].path)
    assert whole[0].received == whole[0].length
    with zipfile.ZipFile(whole[0].path) as archive:
        assert archive.testzip() is None and len(archive.namelist()) == 40
    cluster.wait_until_whole()


def test_postgresql_restarted_gives_clear_503s_then_everything_comes_back(cluster: Cluster) -> None:
    stack = cluster.stack
    session = stack.sign_in()
    (waiting,) = make_study("Restart^Rita")
    before = cluster.last_event()
    checked = threading.Event()  # PostgreSQL stays down until every check below is made
    restart = threading.Thread(target=cluster.postgres.restart, kwargs={"until": checked}, daemon=True)
    restart.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            psycopg.connect(cluster.postgres.url("pacs", driver=False), connect_timeout=1).close()
        except psycopg.OperationalError:
            break
        assert time.monotonic() < deadline, "PostgreSQL did not stop"
        time.sleep(0.1)

    page = session.get(f"{stack.url}/")
    assert page.status_code == 503
    assert "database is not available" in page.text and "Traceback" not in page.text
    assert requests.get(f"{stack.url}/healthz").status_code == 503
    # The viewer's requests reach the archive, which cannot read its index either.
    assert session.get(f"{stack.url}/dicom-web/studies/1.2.3/metadata").status_code == 503
    # A modality's store is refused, so the modality knows to send it again.
    ae = modality_ae()
    association = ae.associate("127.0.0.1", cluster.dicom_port(1), ae_title="ORTHANC")
    if association.is_established:
        status = association.send_c_store(copy.deepcopy(waiting))
        association.release()
        assert "Status" not in status or status.Status != 0
    # A call refused meanwhile is in the archive's log: it is recorded once the database is back.
    find_refused_by("WHILEDOWN", cluster.dicom_port(2))
    checked.set()
    restart.join(60)

    deadline = time.monotonic() + 120
    while session.get(f"{stack.url}/").status_code != 200:
        assert time.monotonic() < deadline, "the portal did not come back by itself"
        time.sleep(0.5)
    assert stack.sign_in().get(f"{stack.url}/query/studies").status_code == 200
    association = ae.associate("127.0.0.1", cluster.dicom_port(1), ae_title="ORTHANC")
    assert association.is_established
    assert association.send_c_store(waiting).Status == 0
    association.release()
    while not any(
        json.loads(row.detail)["aet"] == "WHILEDOWN" for row in cluster.events("dicom-refused", before)
    ):
        assert time.monotonic() < deadline, "the refusal made while the database was down was lost"
        time.sleep(0.5)
    cluster.wait_until_whole()


@pytest.fixture
def single(postgres: PostgresServer, tmp_path: Path) -> Iterator[Stack]:
    """A single-node portal whose control plane is on PostgreSQL and whose archive is on SQLite."""
    url = postgres.create_database("single")
    made = make_stack(tmp_path / "data", PACS_DATABASE_URL=url)
    # The node that ./pacs up --nodes 2 adds takes the ports after the first one's.
    made.dicom_port, made.orthanc_port = free_ports(NODES), free_ports(NODES)
    made.env.update(PACS_DICOM_PORT=str(made.dicom_port), PACS_ORTHANC_HTTP_PORT=str(made.orthanc_port))
    yield made
    made.stop()


def test_a_single_node_archive_moves_to_postgresql_without_losing_a_study(single: Stack) -> None:
    single.start()
    # A study deleted before the move leaves the old change log longer than the new one will be.
    deleted = store_study(single, make_study("Moving^Deleted", series=(("CT", 3),)))
    studies = [
        store_study(single, make_study(f"Moving^M{number}", series=(("CT", 4), ("MR", 2))))
        for number in (1, 2)
    ]
    (found,) = single.orthanc().post(f"{single.orthanc_url}/tools/lookup", data=deleted.uid).json()
    assert single.orthanc().delete(f"{single.orthanc_url}/studies/{found['ID']}").status_code == 200
    session = single.sign_in()
    row = session.get(
        f"{single.url}/query/studies", params={"patient_id": studies[0].patient_id, "format": "json"}
    ).json()["rows"][0]
    link = session.post(
        f"{single.url}/tokens/studies/{row['id']}/link",
        headers={"X-CSRFToken": csrf_token(session.get(f"{single.url}/").text)},
    ).json()["link"]
    instances = single.orthanc().get(f"{single.orthanc_url}/instances", params={"expand": ""}).json()
    before = {
        instance["ID"]: single.orthanc()
        .get(f"{single.orthanc_url}/instances/{instance['ID']}/attachments/dicom/md5")
        .text
        for instance in instances
    }
    assert len(before) == 12
    single.stop()

    # Several nodes need the index on PostgreSQL: the portal says how to move it, and starts nothing.
    single.env["PACS_NODES"] = str(NODES)
    refused = single.pacs("up")
    assert refused.returncode == 1
    assert "holds 12 instances in its SQLite index" in refused.stderr
    assert "./pacs archive move-to-postgresql" in refused.stderr

    moved = single.pacs("archive", "move-to-postgresql")
    assert moved.returncode == 0, moved.stderr
    assert "moved 12 instances of 2 studies" in moved.stdout
    kept = list(single.data.glob("orthanc-sqlite-*"))
    assert len(kept) == 1 and (kept[0] / "index").exists()

    single.output.clear()  # the banner of this start, not of the first
    single.start()
    second_node = f"http://127.0.0.1:{single.orthanc_port + 1}"
    instances = single.orthanc().get(f"{second_node}/instances", params={"expand": ""}).json()
    after = {
        instance["ID"]: single.orthanc()
        .get(f"{second_node}/instances/{instance['ID']}/attachments/dicom/md5")
        .text
        for instance in instances
    }
    assert after == before
    # A patient's link made before the move opens the same study.
    patient = requests.Session()
    token = link.split("?", 1)[1]
    assert patient.get(f"{single.url}/token?{token}").status_code == 200
    viewer = patient.get(f"{single.url}/token/viewer?{token}", allow_redirects=False)
    assert viewer.headers["Location"] == f"/viewer?StudyInstanceUIDs={studies[0].uid}"
    counted = single.pacs("archive", "orphans")
    assert counted.returncode == 0, counted.stderr
    assert ", 0 not in the archive's index" in counted.stdout

    # The new index's change log starts over, and what follows it starts over with it: a study
    # stored now that shares the first one's UID is flagged, and the catalog matches the archive.
    clash = make_study("Moving^Clash", series=(("CT", 1),))
    for dataset in clash:
        dataset.StudyInstanceUID = studies[0].uid
    store_study(single, clash)
    engine = sa.create_engine(single.env["PACS_DATABASE_URL"])
    try:
        deadline = time.monotonic() + 60
        while True:
            with engine.connect() as connection:
                flagged = connection.execute(
                    sa.select(db.activity.c.id).where(
                        db.activity.c.action == "study-uid-shared", db.activity.c.study == studies[0].uid
                    )
                ).all()
            if flagged:
                break
            assert time.monotonic() < deadline, (
                "the study sharing a UID, stored after the move, was not flagged"
            )
            time.sleep(0.5)
    finally:
        engine.dispose()
    deadline = time.monotonic() + 60
    while (checked := single.pacs("catalog", "check")).returncode != 0:
        assert time.monotonic() < deadline, checked.stdout + checked.stderr
        time.sleep(1)
