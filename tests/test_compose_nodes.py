"""compose.yaml with compose.nodes.yaml on top, run and used from outside as a hospital meets it.

Two archive nodes (``orthanc``, ``orthanc-2``, each with its published DICOM port), two control
planes, one PostgreSQL, the catalog feeder and Caddy, built from the repository's Dockerfiles on
the session's Docker engine (``docker_engine``: after tests/test_compose.py every layer but
PostgreSQL's is in its cache) and started as the README says. Modalities store with pynetdicom to
the published ports; users search and download through Caddy. The faults are real: ``docker kill
-s KILL`` of a node while a modality stores to the other, and of a control plane; the killed
container is then started again with ``docker start`` (compose's restart policy leaves a killed
container stopped), as a site's operator would.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from pydicom import Dataset
from pynetdicom import AE

from control.runtime import configs

from compose_stack import (
    DICOM_AET,
    INSTITUTION,
    ComposeStack,
    free_loopback_port,
    progress_printer,
    signed_in_session,
)
from conftest import wait_until
from dockerd import DockerEngine
from samples import CT_IMAGE_STORAGE, make_study

pytestmark = pytest.mark.compose

# Spaces and the characters a URL gives a meaning to: the site's password is taken as it is.
DATABASE_PASSWORD = "nodes' pass: a/b@c?d#e %20 f"
NODES = ("orthanc", "orthanc-2")
READ_BLOCK = 256 * 1024

# Asks every node, from inside the control container (the nodes' HTTP API is never published),
# what the shared index holds: its instance count and every SOP Instance UID.
COUNT_THROUGH_EACH_NODE = """
import base64, json, sys, urllib.request
from pathlib import Path
from control.site import Site
secrets = Site(Path("/data")).secrets
credentials = f"{secrets.orthanc_user}:{secrets.orthanc_password}".encode()
headers = {"Authorization": "Basic " + base64.b64encode(credentials).decode()}
def ask(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=120) as answer:
        return json.load(answer)
answers = {}
for host in sys.argv[1:]:
    count = ask(f"http://{host}:8042/statistics")["CountInstances"]
    found = ask(f"http://{host}:8042/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
    answers[host] = {"count": count, "uids": sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in found)}
print(json.dumps(answers))
"""


@dataclass
class NodesStack:
    """The running stack, its second DICOM port, and every instance a modality saw acknowledged."""

    compose: ComposeStack
    second_dicom_port: int
    acknowledged: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return self.compose.url

    def container(self, service: str) -> str:
        return self.compose.containers()[service]["Id"]

    def kill(self, service: str) -> None:
        """kill -9 of the service's container, as a crash of its machine would."""
        self.compose.engine.docker("kill", "--signal", "KILL", self.container(service))
        wait_until(
            lambda: not self.compose.containers()[service]["State"]["Running"], f"{service} stopped", 30
        )

    def start_again(self, service: str) -> None:
        """``docker start`` of a killed container; back once the portal says every node answers and
        every container's health check says healthy."""
        self.compose.engine.docker("start", self.container(service))
        self.compose.wait_until_ready()

    def counts_through_each_node(self) -> dict[str, dict]:
        answer = self.compose.engine.docker(
            "exec", self.container("control"), "python", "-c", COUNT_THROUGH_EACH_NODE, *NODES
        )
        return json.loads(answer.stdout)


@pytest.fixture(scope="module")
def nodes_stack(
    docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[NodesStack]:
    progress = progress_printer()
    second_dicom_port = free_loopback_port()
    compose = ComposeStack(
        engine=docker_engine,
        project=f"pacsnodes{uuid.uuid4().hex[:8]}",
        web_port=free_loopback_port(),
        dicom_port=free_loopback_port(),
        logs=tmp_path_factory.mktemp("compose-nodes"),
        files=("compose.yaml", "compose.nodes.yaml"),
        variables={"PACS_DATABASE_PASSWORD": DATABASE_PASSWORD, "PACS_DICOM_PORT_2": str(second_dicom_port)},
        wait_for_health_checks=True,
    )
    compose.start(progress)
    failures_before = request.session.testsfailed
    yield NodesStack(compose, second_dicom_port)
    if request.session.testsfailed > failures_before:
        print(f"--- container logs ---\n{compose.logs_tail(200)}")
    compose.take_down()
    progress("stack removed")


def modality() -> AE:
    ae = AE(ae_title="NODESCT")
    ae.add_requested_context(CT_IMAGE_STORAGE, "1.2.840.10008.1.2.1")
    ae.dimse_timeout = 30
    return ae


def store(port: int, datasets: list[Dataset]) -> set[str]:
    """C-STORE every dataset over one association; the SOP Instance UIDs acknowledged with success."""
    association = modality().associate("127.0.0.1", port, ae_title=DICOM_AET)
    assert association.is_established, f"the archive on port {port} refused the association"
    acknowledged = set()
    try:
        for dataset in datasets:
            status = association.send_c_store(dataset)
            if "Status" in status and status.Status == 0x0000:
                acknowledged.add(str(dataset.SOPInstanceUID))
    finally:
        association.release()
    return acknowledged


@dataclass
class StoringModality:
    """A modality storing a study to one port on a thread, an instance every ``pause`` seconds."""

    port: int
    datasets: list[Dataset]
    pause: float = 0.1
    acknowledged: set[str] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> StoringModality:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        association = modality().associate("127.0.0.1", self.port, ae_title=DICOM_AET)
        try:
            for dataset in self.datasets:
                uid = str(dataset.SOPInstanceUID)
                status = association.send_c_store(dataset) if association.is_established else Dataset()
                if "Status" in status and status.Status == 0x0000:
                    self.acknowledged.add(uid)
                else:
                    self.failed.append(uid)
                time.sleep(self.pause)
        finally:
            if association.is_established:
                association.release()

    def join(self, timeout: float = 300) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the modality did not finish sending"


def found_studies(session: requests.Session, url: str, patient_id: str) -> list[dict]:
    """The portal's study search for one patient, as its list page answers it (JSON)."""
    page = session.get(
        f"{url}/query/studies", params={"patient_id": patient_id, "format": "json"}, timeout=60
    )
    assert page.status_code == 200, page.text[:500]
    return page.json()["rows"]


def wait_until_found(session: requests.Session, url: str, patient_id: str) -> dict:
    """The study of ``patient_id`` once the catalog has it (the feeder follows the change log)."""
    rows: list[dict] = []

    def listed() -> bool:
        rows[:] = found_studies(session, url, patient_id)
        return bool(rows)

    wait_until(listed, f"the study of {patient_id} listed by the portal's search", 120)
    (row,) = rows
    return row


def uids(study: list[Dataset]) -> set[str]:
    return {str(dataset.SOPInstanceUID) for dataset in study}


def instances_through_the_web(session: requests.Session, url: str, study: list[Dataset]) -> set[str]:
    """The SOP Instance UIDs of a study as the viewer reads its metadata, through Caddy from a node."""
    found = session.get(
        f"{url}/dicom-web/studies/{study[0].StudyInstanceUID}/metadata",
        headers={"Accept": "application/dicom+json"},
        timeout=60,
    )
    assert found.status_code == 200, found.text[:500]
    return {item["00080018"]["Value"][0] for item in found.json()}


def download_zip(session: requests.Session, url: str, study_id: str, path: Path) -> zipfile.ZipFile:
    """A study's zip from the portal, as announced: its full length, a readable archive."""
    with session.get(f"{url}/query/studies/{study_id}/archive", stream=True, timeout=120) as answer:
        assert answer.status_code == 200, answer.text[:500]
        announced = int(answer.headers["Content-Length"])
        with path.open("wb") as file:
            for block in answer.iter_content(READ_BLOCK):
                file.write(block)
    assert path.stat().st_size == announced
    archive = zipfile.ZipFile(path)
    assert archive.testzip() is None
    return archive


def test_stores_to_either_nodes_port_are_found_through_the_web(nodes_stack: NodesStack) -> None:
    """The two nodes are one archive: a study stored to each node's port is listed by the one portal."""
    first = make_study("First^Fiona", series=(("CT", 3),))
    second = make_study("Second^Sven", series=(("CT", 4),))
    assert store(nodes_stack.compose.dicom_port, first) == uids(first)
    assert store(nodes_stack.second_dicom_port, second) == uids(second)
    nodes_stack.acknowledged |= uids(first + second)

    session, _ = signed_in_session(nodes_stack.url)
    for study in (first, second):
        row = wait_until_found(session, nodes_stack.url, str(study[0].PatientID))
        assert row["study_instance_uid"] == study[0].StudyInstanceUID
        assert instances_through_the_web(session, nodes_stack.url, study) == uids(study)


def test_the_running_stack_is_backed_up_as_the_readme_says(nodes_stack: NodesStack, tmp_path: Path) -> None:
    # Both databases on the postgresql service: pg_dump comes with the control image. The backup
    # folder is the host's, owned by the containers' user.
    backup = tmp_path / "backup"
    backup.mkdir(mode=0o700)
    os.chown(backup, 10001, 10001)
    made = nodes_stack.compose.compose(
        *("run", "--rm", "--no-deps", "-T", "-v", f"{backup}:/backup", "control"),
        *("python", "-m", "control", "--data", "/data", "backup", "/backup"),
        timeout=600,
    )
    assert "pg_dump of its PostgreSQL database" in made, made
    assert DATABASE_PASSWORD not in made
    # Checked the same way: the dump is in the format of the postgresql image's release, which an
    # older pg_restore (the host's) may not read.
    checked = nodes_stack.compose.compose(
        *("run", "--rm", "--no-deps", "-T", "-v", f"{backup}:/backup", "control"),
        *("python", "-m", "control", "--data", "/data", "restore", "--check", "/backup"),
        timeout=600,
    )
    assert "are intact" in checked, checked


def test_a_killed_node_while_a_modality_stores_to_the_other_loses_nothing(
    nodes_stack: NodesStack, tmp_path: Path
) -> None:
    """kill -9 of the first node while a modality stores to the second: after one health interval
    the portal searches and zips through the survivor, and every acknowledged store is there."""
    zipped = make_study("Zip^Zora", series=(("CT", 12),), size=128, noise=True)
    assert store(nodes_stack.compose.dicom_port, zipped) == uids(zipped)
    nodes_stack.acknowledged |= uids(zipped)
    session, _ = signed_in_session(nodes_stack.url)
    study_id = wait_until_found(session, nodes_stack.url, str(zipped[0].PatientID))["id"]

    sent = make_study("During^Dora", series=(("CT", 30),))
    storing = StoringModality(nodes_stack.second_dicom_port, sent).start()
    wait_until(lambda: len(storing.acknowledged) >= 5, "the modality's first stores", 60)
    nodes_stack.kill("orthanc")
    try:
        time.sleep(configs.HEALTH_INTERVAL)
        rows = found_studies(session, nodes_stack.url, str(zipped[0].PatientID))
        assert [row["id"] for row in rows] == [study_id]
        with download_zip(session, nodes_stack.url, study_id, tmp_path / "zora.zip") as archive:
            assert len([name for name in archive.namelist() if name.endswith(".dcm")]) == len(zipped)
        storing.join()
        # The second node never went away: the modality had every store acknowledged.
        assert storing.failed == []
        assert storing.acknowledged == uids(sent)
        nodes_stack.acknowledged |= storing.acknowledged
        wait_until_found(session, nodes_stack.url, str(sent[0].PatientID))
        assert instances_through_the_web(session, nodes_stack.url, sent) == uids(sent)
    finally:
        nodes_stack.start_again("orthanc")
    counts = nodes_stack.counts_through_each_node()
    for node in NODES:
        assert nodes_stack.acknowledged <= set(counts[node]["uids"]), node


def test_a_killed_control_plane_leaves_the_pages_answering(nodes_stack: NodesStack) -> None:
    """kill -9 of the first control plane: sign-in, the search page and the landing page keep
    answering through the other, and a session signed in before stays signed in."""
    study = make_study("Plane^Pia", series=(("CT", 2),))
    assert store(nodes_stack.second_dicom_port, study) == uids(study)
    nodes_stack.acknowledged |= uids(study)
    before, landing = signed_in_session(nodes_stack.url)
    wait_until_found(before, nodes_stack.url, str(study[0].PatientID))

    nodes_stack.kill("control")
    try:
        for _ in range(5):
            assert "Signed in as <strong>admin</strong>" in before.get(landing.url, timeout=30).text
            after, _ = signed_in_session(nodes_stack.url)
            assert len(found_studies(after, nodes_stack.url, str(study[0].PatientID))) == 1
            assert INSTITUTION in requests.get(f"{nodes_stack.url}/", timeout=30).text
    finally:
        nodes_stack.start_again("control")


def test_after_the_killed_containers_start_again_counts_agree_through_each_node(
    nodes_stack: NodesStack,
) -> None:
    counts = nodes_stack.counts_through_each_node()
    first, second = (counts[node] for node in NODES)
    assert first == second
    assert first["count"] == len(first["uids"])
    assert nodes_stack.acknowledged <= set(first["uids"])
    assert nodes_stack.compose.health()["status"] == "ok"
