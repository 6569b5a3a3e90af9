"""Fixtures: real stacks (Orthanc, gunicorn, Caddy) on free ports and temporary data directories.

A stack is started the way an admin starts one, with ``python -m control --data DIR up``, and
stopped the way Ctrl-C stops it. Tests talk to it through Caddy, like a browser. When a stack fails
to start, its logs are shown. The OHIF build is fetched once into a shared cache (``PACS_CACHE``,
by default the cache of the default data directory) so that every stack does not unpack it again.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE

REPOSITORY = Path(__file__).resolve().parent.parent
os.environ.setdefault("PACS_CACHE", str(REPOSITORY / "data" / "cache"))

ADMIN_PASSWORD = "correct horse battery staple"


def free_port() -> int:
    """A TCP port nobody listens on right now (on every interface, as the stack binds)."""
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        return probe.getsockname()[1]


def show_logs(data: Path) -> str:
    parts = []
    for log in sorted((data / "logs").glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-40:]
        parts.append(f"--- {log.name} ---\n" + "\n".join(text))
    return "\n".join(parts)


@dataclass
class Stack:
    """A running portal: its addresses, its data directory and the admin's credentials."""

    data: Path
    web_port: int
    dicom_port: int
    orthanc_port: int
    institution: str
    env: dict[str, str]
    process: subprocess.Popen | None = None
    output: list[str] = field(default_factory=list)
    aet: str = "ORTHANC"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def orthanc_url(self) -> str:
        return f"http://127.0.0.1:{self.orthanc_port}"

    @property
    def orthanc_auth(self) -> tuple[str, str]:
        import json

        secrets = json.loads((self.data / "secrets" / "secrets.json").read_text())
        return secrets["orthanc_user"], secrets["orthanc_password"]

    def pacs(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        """Run a ``./pacs`` command (after the bash set-up) against this stack's data directory."""
        return subprocess.run(
            [sys.executable, "-m", "control", "--data", str(self.data), *args],
            cwd=REPOSITORY,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=240,
            **kwargs,
        )

    def start(self, timeout: float = 240) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "control", "--data", str(self.data), "up"],
            cwd=REPOSITORY,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout
        os.set_blocking(self.process.stdout.fileno(), False)
        while time.monotonic() < deadline:
            self._read_output()
            if any("Press Ctrl-C to stop." in line for line in self.output):
                return
            if self.process.poll() is not None:
                self._read_output()
                raise RuntimeError(
                    f"the stack did not start (exit {self.process.returncode}):\n"
                    + "".join(self.output)
                    + show_logs(self.data)
                )
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("the stack did not start in time:\n" + "".join(self.output) + show_logs(self.data))

    def _read_output(self) -> None:
        while True:
            line = self.process.stdout.readline()
            if not line:
                return
            self.output.append(line)

    def stop(self, timeout: float = 60) -> int | None:
        """Stop it as Ctrl-C would; return the runner's exit code."""
        if not self.process or self.process.stdout.closed:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.set_blocking(self.process.stdout.fileno(), True)
        self.output.extend(self.process.stdout.readlines())
        self.process.stdout.close()
        return self.process.returncode

    def session(self) -> requests.Session:
        return requests.Session()

    def sign_in(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> requests.Session:
        """A browser-like session signed in through the real form (CSRF token included)."""
        session = requests.Session()
        response = sign_in(session, self.url, username, password)
        assert response.status_code == 200, response.text[:500]
        assert f"signed in as <strong>{username.lower()}</strong>" in response.text.lower()
        return session


def c_store(stack: Stack, dataset: Dataset | str | Path) -> int:
    """Send one dataset (or file) to the archive's DICOM port as a modality would; return the status."""
    if not isinstance(dataset, Dataset):
        dataset = pydicom.dcmread(dataset)
    ae = AE(ae_title="TESTMODALITY")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", stack.dicom_port, ae_title=stack.aet)
    assert association.is_established, "the archive refused the association"
    try:
        return association.send_c_store(dataset).Status
    finally:
        association.release()


def fresh_study(
    sample: str,
    *,
    study_date: str | None = None,
    patient_id: str | None = None,
    patient_name: str | None = None,
) -> Dataset:
    """A pydicom sample file made into a new study of its own (new UIDs), dated today by default."""
    dataset = pydicom.dcmread(get_testdata_file(sample))
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.StudyDate = study_date if study_date is not None else dt.date.today().strftime("%Y%m%d")
    dataset.PatientID = patient_id or "TEST-" + generate_uid()[-12:]
    if patient_name:
        dataset.PatientName = patient_name
    return dataset


def orthanc_id(stack: Stack, study_uid: str) -> str:
    """The archive's id of a study, from its StudyInstanceUID."""
    found = requests.post(f"{stack.orthanc_url}/tools/lookup", data=study_uid, auth=stack.orthanc_auth).json()
    return next(item["ID"] for item in found if item["Type"] == "Study")


def csrf_token(html: str) -> str:
    match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html) or re.search(
        r'value="([^"]+)"[^>]*name="csrf_token"', html
    )
    assert match, "the page has no CSRF token"
    return match.group(1)


def sign_in(session: requests.Session, url: str, username: str, password: str) -> requests.Response:
    page = session.get(f"{url}/login")
    return session.post(
        f"{url}/login",
        data={"username": username, "password": password, "csrf_token": csrf_token(page.text)},
    )


def make_stack(data: Path, **env_overrides: str) -> Stack:
    web_port, dicom_port, orthanc_port = free_port(), free_port(), free_port()
    institution = env_overrides.pop("institution", "St. Test Hospital")
    env = {
        **os.environ,
        "PACS_WEB_PORT": str(web_port),
        "PACS_DICOM_PORT": str(dicom_port),
        "PACS_ORTHANC_HTTP_PORT": str(orthanc_port),
        "PACS_INSTITUTION": institution,
        "PACS_DEPARTMENT": "Radiology",
        "PACS_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "PYTHONPATH": str(REPOSITORY),
        **env_overrides,
    }
    env.pop("PACS_DATA", None)
    return Stack(data, web_port, dicom_port, orthanc_port, institution, env)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One portal shared by the tests that only read from it or add their own data."""
    running = make_stack(tmp_path_factory.mktemp("stack"))
    running.start()
    yield running
    running.stop()


@pytest.fixture
def fresh_stack(tmp_path: Path) -> Iterator[Stack]:
    """A portal of the test's own, not started: for tests of starting and stopping."""
    made = make_stack(tmp_path / "data")
    yield made
    made.stop()
    made.pacs("down")
