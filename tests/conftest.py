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
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE

from bench.stack import REPOSITORY, free_port  # noqa: F401 - tests import free_port from here
from bench.stack import Stack as PortalStack

os.environ.setdefault("PACS_CACHE", str(REPOSITORY / "data" / "cache"))

ADMIN_PASSWORD = "correct horse battery staple"


class Stack(PortalStack):
    """A portal of the tests (see ``bench.stack``), with a browser's sign-in."""

    def sign_in(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> requests.Session:
        """A browser-like session signed in through the real form (CSRF token included)."""
        session = requests.Session()
        response = sign_in(session, self.url, username, password)
        assert response.status_code == 200, response.text[:500]
        assert f"signed in as <strong>{username.lower()}</strong>" in response.text.lower()
        return session

    def kill_archive(self) -> None:
        """Kill Orthanc as a crash would; the runner starts it again by itself."""
        os.kill(int((self.data / "run" / "orthanc.pid").read_text()), signal.SIGKILL)

    def wait_for_archive(self, timeout: float = 60) -> None:
        """Wait until the portal's health check says the archive answers again."""
        deadline = time.monotonic() + timeout
        while requests.get(f"{self.url}/healthz").status_code != 200:
            assert time.monotonic() < deadline, "the archive did not come back"
            time.sleep(0.5)


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
    """A stack (not started) on free ports, as the tests' admin sets it up."""
    institution = env_overrides.pop("institution", "St. Test Hospital")
    return Stack.on(
        data,
        institution=institution,
        admin_password=ADMIN_PASSWORD,
        PACS_DEPARTMENT="Radiology",
        **env_overrides,
    )


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
