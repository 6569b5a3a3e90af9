"""The command-line downloader against the real stack: a whole study, a connection cut halfway
(it resumes without fetching the finished series again), a second run after a failed one, the
viewer command, and the ways to get it (served by the portal, installable with pip)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests

from conftest import ADMIN_PASSWORD, REPOSITORY, Stack, csrf_token
from samples import StudyFacts, make_study, store_study

pytestmark = pytest.mark.stack

SCRIPT = REPOSITORY / "downloader" / "pacs_download.py"
# Each series zip is about 3 x 32 kB of noise; pages and manifests are a few kB.
CUT_AFTER = 60_000


class CuttingRelay:
    """A TCP relay on 127.0.0.1 to the portal that cuts chosen connections after ``CUT_AFTER`` bytes.

    Connections are numbered in the order their answers grow past ``CUT_AFTER`` bytes (the zips);
    those numbered in ``cut`` are closed at that point, as a dropped network would. Each request's
    first line is kept, to tell what was fetched how often. With ``rate`` (bytes a second), answers
    come no faster than that, as over a slow link, so that a progress bar has time to move.
    """

    def __init__(self, target_port: int, cut: set[int] = frozenset(), rate: float | None = None) -> None:
        self.target_port = target_port
        self.cut = cut
        self.rate = rate
        self.requests: list[str] = []
        self.heads: list[str] = []  # each request's line and headers
        self.large = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, stack_url: str) -> str:
        return re.sub(r":\d+", f":{self.port}", stack_url, count=1)

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _address = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._upward, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._downward, args=(upstream, client), daemon=True).start()

    def _upward(self, client: socket.socket, upstream: socket.socket) -> None:
        first = True
        while data := self._receive(client):
            if first:
                with self.lock:
                    self.requests.append(data.split(b"\r\n", 1)[0].decode())
                    self.heads.append(data.split(b"\r\n\r\n", 1)[0].decode(errors="replace"))
                first = False
            if not self._send(upstream, data):
                break
        self._close(client, upstream)

    def _downward(self, upstream: socket.socket, client: socket.socket) -> None:
        sent = 0
        while data := self._receive(upstream):
            if sent <= CUT_AFTER < sent + len(data):
                with self.lock:
                    self.large += 1
                    cut_here = self.large in self.cut
                if cut_here:
                    self._send(client, data[: CUT_AFTER - sent])
                    break
            sent += len(data)
            if not self._send(client, data):
                break
            if self.rate:
                time.sleep(len(data) / self.rate)
        self._close(client, upstream)

    @staticmethod
    def _send(end: socket.socket, data: bytes) -> bool:
        try:
            end.sendall(data)
        except OSError:
            return False
        return True

    @staticmethod
    def _close(*ends: socket.socket) -> None:
        # Whichever direction ends first ends the connection: the other one's recv then returns.
        for end in ends:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    @staticmethod
    def _receive(end: socket.socket) -> bytes:
        try:
            return end.recv(65536)
        except OSError:
            return b""

    def fetched(self, path_part: str) -> int:
        return sum(path_part in line for line in self.requests)

    def ranges_asked(self, path_part: str) -> list[str]:
        """The ``Range`` header of each request for ``path_part`` ("" for none), in order."""
        found = []
        for head in self.heads:
            if path_part in head.split("\r\n", 1)[0]:
                match = re.search(r"^Range: ([^\r\n]*)", head, re.MULTILINE | re.IGNORECASE)
                found.append(match.group(1) if match else "")
        return found


@dataclass
class Study:
    facts: StudyFacts
    orthanc_id: str
    series_ids: list[str]  # in the manifest's order


def stored_for_download(stack: Stack, datasets: list) -> Study:
    """``datasets`` stored, with the ids the downloader's manifest gives them."""
    facts = store_study(stack, datasets)
    browser = stack.sign_in()
    rows = browser.get(
        f"{stack.url}/query/studies", params={"patient_id": facts.patient_id, "format": "json"}
    ).json()["rows"]
    manifest = browser.get(rows[0]["actions"]["manifest"]).json()
    return Study(facts, rows[0]["id"], [series["id"] for series in manifest["series"]])


@pytest.fixture(scope="module")
def study(stack: Stack) -> Study:
    return stored_for_download(
        stack, make_study("Downloader^Dora", series=(("CT", 3), ("MR", 3), ("CT", 3)), size=128, noise=True)
    )


@pytest.fixture
def relay(stack: Stack) -> Iterator[CuttingRelay]:
    made = CuttingRelay(stack.web_port, cut={2})
    yield made
    made.close()


def run(url: str, folder: Path, *options: str, password: str = ADMIN_PASSWORD) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--user", "admin", "--retry-wait", "0.1", *options, url],
        cwd=folder,
        env={**os.environ, "PACS_PASSWORD": password},
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_zip(path: Path, facts: StudyFacts) -> None:
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        uids = {
            str(pydicom.dcmread(io.BytesIO(archive.read(info))).SOPInstanceUID) for info in archive.infolist()
        }
    assert uids == set().union(*facts.series.values())


def test_the_command_the_portal_shows_saves_the_study(stack: Stack, study: Study, tmp_path: Path) -> None:
    browser = stack.sign_in()
    page = browser.get(f"{stack.url}/query/studies/{study.orthanc_id}/downloader", params={"format": "json"})
    words = shlex.split(page.json()["command"])
    assert words[:2] == ["python3", "pacs_download.py"]
    result = run(words[-1], tmp_path)
    assert result.returncode == 0, result.stderr
    (saved,) = tmp_path.glob("*.zip")
    assert re.fullmatch(r"Downloader-Dora_\d{4}-\d\d-\d\d\.zip", saved.name)
    check_zip(saved, study.facts)
    assert "9 files, checked" in result.stdout
    assert not (tmp_path / (saved.name + ".parts")).exists()


def test_a_cut_connection_resumes_without_fetching_finished_series_again(
    stack: Stack, study: Study, relay: CuttingRelay, tmp_path: Path
) -> None:
    url = relay.url(f"{stack.url}/query/studies/{study.orthanc_id}/series")  # any page of the study will do
    result = run(url, tmp_path, "--output", "dora.zip")
    assert result.returncode == 0, result.stderr
    assert "connection lost" in result.stderr
    check_zip(tmp_path / "dora.zip", study.facts)
    assert [relay.fetched(f"/query/series/{series}/archive") for series in study.series_ids] == [1, 2, 1]
    first, resumed = relay.ranges_asked(f"/query/series/{study.series_ids[1]}/archive")
    assert first == "" and re.fullmatch(r"bytes=[1-9]\d*-", resumed), "the cut series went on where it broke"


def test_a_second_run_fetches_only_what_the_first_did_not(
    stack: Stack, study: Study, relay: CuttingRelay, tmp_path: Path
) -> None:
    url = relay.url(f"{stack.url}/query/studies/{study.orthanc_id}/manifest")
    failed = run(url, tmp_path, "--output", "dora.zip", "--retries", "0")
    assert failed.returncode == 1
    assert "run the same command again later to resume" in failed.stderr
    assert not (tmp_path / "dora.zip").exists()
    assert len(list((tmp_path / "dora.zip.parts").glob("*.zip"))) == 1

    again = CuttingRelay(stack.web_port)
    try:
        result = run(
            again.url(f"{stack.url}/query/studies/{study.orthanc_id}/manifest"), tmp_path, "-o", "dora.zip"
        )
    finally:
        again.close()
    assert result.returncode == 0, result.stderr
    assert "series 1/3 already here" in result.stderr
    check_zip(tmp_path / "dora.zip", study.facts)
    assert [again.fetched(f"/query/series/{series}/archive") for series in study.series_ids] == [0, 1, 1]
    assert again.ranges_asked(f"/query/series/{study.series_ids[1]}/archive")[0].startswith("bytes="), (
        "the second run continues the series the first one left unfinished"
    )


def test_a_patient_download_then_opens_the_viewer(stack: Stack, study: Study, tmp_path: Path) -> None:
    browser = stack.sign_in()
    patient = browser.get(
        f"{stack.url}/query/patients", params={"patient_id": study.facts.patient_id, "format": "json"}
    ).json()["rows"][0]
    viewer = (
        f"{shlex.quote(sys.executable)} -c \"import sys; open('opened.txt', 'w').write(sys.argv[1])\" {{}}"
    )
    result = run(patient["actions"]["studies"], tmp_path, "--open", viewer)
    assert result.returncode == 0, result.stderr
    (saved,) = tmp_path.glob("*.zip")
    assert saved.name == f"Downloader-Dora_{study.facts.patient_id}.zip"
    assert (tmp_path / "opened.txt").read_text() == str(saved)
    check_zip(saved, study.facts)


def test_a_wrong_password_is_said_plainly(stack: Stack, study: Study, tmp_path: Path) -> None:
    result = run(f"{stack.url}/query/studies/{study.orthanc_id}/manifest", tmp_path, password="not it at all")
    assert result.returncode == 1
    assert "did not accept that username and password" in result.stderr


def test_the_portal_serves_the_downloader_to_anyone(stack: Stack) -> None:
    response = requests.get(f"{stack.url}/downloader/pacs_download.py")
    assert response.status_code == 200
    assert response.content == SCRIPT.read_bytes()
    assert response.headers["Content-Disposition"] == "attachment; filename=pacs_download.py"
    assert 'href="/downloader/pacs_download.py"' in requests.get(f"{stack.url}/").text


def test_the_downloader_installs_with_pip(tmp_path: Path) -> None:
    target = tmp_path / "installed"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-build-isolation",
            "--no-deps",
            "--target",
            str(target),
            str(REPOSITORY / "downloader"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=tmp_path,
    )
    version = subprocess.run(
        [str(target / "bin" / "pacs-download"), "--version"],
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == "pacs-download 0.3.0"


def test_a_patients_study_link_is_enough(stack: Stack, study: Study, tmp_path: Path) -> None:
    """A patient has no account: the study's link alone fetches it, series by series."""
    browser = stack.sign_in()
    home = browser.get(f"{stack.url}/")
    link = browser.post(
        f"{stack.url}/tokens/studies/{study.orthanc_id}/link", headers={"X-CSRFToken": csrf_token(home.text)}
    ).json()["link"]
    token_link = f"{stack.url}/token?{link.split('?', 1)[1]}"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), token_link],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (saved,) = tmp_path.glob("*.zip")
    check_zip(saved, study.facts)

    other = store_study(stack, make_study("Other^Olga"))
    row = browser.get(
        f"{stack.url}/query/studies", params={"patient_id": other.patient_id, "format": "json"}
    ).json()["rows"][0]
    series = browser.get(row["actions"]["series"], params={"format": "json"}).json()["rows"][0]
    refused = requests.get(f"{stack.url}/token/series/{series['id']}/download?{link.split('?', 1)[1]}")
    assert refused.status_code == 404, "a link opens its own study only"


def test_a_link_that_asks_for_the_birth_date_gets_it_from_the_downloader(
    stack: Stack, tmp_path: Path
) -> None:
    facts = store_study(stack, make_study("Born^Bella", PatientBirthDate="19610304"))
    browser = stack.sign_in()
    study_id = browser.get(
        f"{stack.url}/query/studies", params={"patient_id": facts.patient_id, "format": "json"}
    ).json()["rows"][0]["id"]
    made = browser.post(
        f"{stack.url}/tokens/studies/{study_id}/link",
        headers={"X-CSRFToken": csrf_token(browser.get(f"{stack.url}/").text)},
    ).json()["link"]
    link = f"{stack.url}/token?{made.split('?', 1)[1]}"

    def download(folder: Path, *options: str, birth_date: str = "") -> subprocess.CompletedProcess:
        folder.mkdir()
        return subprocess.run(
            [sys.executable, str(SCRIPT), *options, link],
            cwd=folder,
            env={**os.environ, "PACS_BIRTH_DATE": birth_date},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )

    stack.pacs("config", "set", "token_identity_check", "yes")
    try:
        wrong = download(tmp_path / "wrong", "--birth-date", "1961-03-05")
        assert wrong.returncode == 1
        assert "That is not the date of birth we have for this study." in wrong.stderr
        assert not list((tmp_path / "wrong").glob("*.zip"))

        right = download(tmp_path / "right", birth_date="1961-03-04")
        assert right.returncode == 0, right.stderr
        (saved,) = (tmp_path / "right").glob("*.zip")
        check_zip(saved, facts)
    finally:
        stack.pacs("config", "set", "token_identity_check", "no")
