"""The README's commands on a fresh machine of each supported release: Debian 12 and Debian 13.

For each release a minimal Debian root is made with debootstrap (tests/debian_root.py: the base
tarball is cached, everything else is new each time) and the repository is copied in as a clone
holds it. Inside, only what the README tells a newcomer runs: ``./pacs up --detach``, which must
install everything from the repository's own files (a missing package, pin or set-up step fails
here, whatever this machine happens to have), and ``./pacs down`` at the end, which must leave
nothing running. From outside, as a hospital's users would, the portal is used on its main paths:
landing page, sign-in, a modality's C-STORE, search, zip, a patient's link and the viewer's
metadata.

The suite itself runs on this machine's release. In the root of the other release (Debian 13 on a
Debian 12 machine), ``./pacs test``, the README's second command, runs the modules whose
expectations come from Orthanc's own behaviour (``ORTHANC_MODULES``: frames against the DICOMweb
plugin, search matching, zips, what differs between versions): one CI run tests both Orthanc
versions. In the root of this machine's release, an ordinary user runs ``./pacs up`` once root has
installed the packages, as the README's "Without root" says.

Needs root. The time of each part is printed at the end of each release's run; the first run on a
machine also makes the base systems (about 30 s each) and fills the download caches.
"""

from __future__ import annotations

import datetime as dt
import io
import itertools
import os
import re
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE

from bench.stack import download_cache

from conftest import csrf_token, free_port
from debian_root import DebianRoot, RootError, Timings

pytestmark = pytest.mark.fresh_machine

RELEASES = {"bookworm": "Debian 12", "trixie": "Debian 13"}
ORTHANC_MODULES = (
    "tests/test_frames.py",
    "tests/test_query.py",
    "tests/test_downloads.py",
    "tests/test_archive_versions.py",
)


def this_machines_release() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    return ""


THIS_RELEASE = this_machines_release()
OTHER_RELEASE = next((release for release in RELEASES if release != THIS_RELEASE), "trixie")
"""The release whose Orthanc the suite does not meet on this machine: the Orthanc modules run there."""
INSTITUTION = "Fresh Machine General Hospital"
ADMIN_PASSWORD = re.compile(r"created the admin account 'admin' with the password (\S+)")
# What ./pacs up prints as it goes, and the part of the set-up each line begins.
SET_UP_STEPS = {
    "pacs: installing Debian packages": "Debian packages",
    "pacs: creating the virtual environment": "virtual environment",
    "pacs: installing Python requirements": "Python requirements",
    "pacs: fetching the OHIF viewer": "OHIF viewer",
    "pacs: created the admin account": "first start",
}


@dataclass
class FreshMachine:
    """A release's root with the portal started in it by ``./pacs up --detach``."""

    release: str
    root: DebianRoot
    web_port: int
    dicom_port: int
    admin_password: str
    timings: Timings

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"


def pacs_up(root: DebianRoot, env: dict[str, str], timings: Timings) -> str:
    """``./pacs up --detach`` with each part of its set-up timed from the lines it prints."""
    marks: list[tuple[str, float]] = [("checking what is installed", time.monotonic())]

    def mark(line: str) -> None:
        for start, step in SET_UP_STEPS.items():
            if line.startswith(start):
                marks.append((step, time.monotonic()))

    output = root.run("./pacs up --detach", "up.log", env=env, timeout=1800, on_line=mark)
    marks.append(("", time.monotonic()))
    for (step, began), (_next, ended) in itertools.pairwise(marks):
        timings.add(f"./pacs up --detach: {step}", ended - began)
    return output


@pytest.fixture(scope="module", params=list(RELEASES))
def machine(request: pytest.FixtureRequest) -> Iterator[FreshMachine]:
    if os.geteuid() != 0:
        pytest.skip(
            "FRESH MACHINES NOT TESTED: debootstrap, chroot and mounts need root. "
            "Run the suite as root to test the README's commands on Debian 12 and 13 (CI does)."
        )
    release = request.param
    cache = download_cache()
    timings = Timings()
    root = DebianRoot(release, cache)
    failures_before = request.session.testsfailed
    try:
        root.make(timings)
        web_port, dicom_port, orthanc_port = free_port(), free_port(), free_port()
        # First-run settings, as the README's configuration table names them: free ports, so that
        # the portal in the root does not meet this machine's own.
        env = {
            "PACS_WEB_PORT": str(web_port),
            "PACS_DICOM_PORT": str(dicom_port),
            "PACS_ORTHANC_HTTP_PORT": str(orthanc_port),
            "PACS_INSTITUTION": INSTITUTION,
            # Only so that its progress lines arrive as they are printed, for the timings.
            "PYTHONUNBUFFERED": "1",
        }
        output = pacs_up(root, env, timings)
        password = ADMIN_PASSWORD.search(output)
        assert password, f"./pacs up printed no admin password:\n{output[-2000:]}"
        yield FreshMachine(release, root, web_port, dicom_port, password.group(1), timings)
    finally:
        if request.session.testsfailed > failures_before:
            print(f"--- logs of the {release} root's portal ---")
            for log in sorted((root.repository / "data" / "logs").glob("*.log")):
                print(f"--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        root.remove()
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter and timings.parts:
            reporter.write_line("")
            reporter.write_line(timings.report(f"fresh machine, {RELEASES[release]} ({release}):"))


@pytest.fixture(scope="module")
def admin(machine: FreshMachine) -> requests.Session:
    """A browser-like session signed in as admin with the password ./pacs up printed."""
    session = requests.Session()
    session.trust_env = False
    form = session.get(f"{machine.url}/login", timeout=30)
    answer = session.post(
        f"{machine.url}/login",
        data={"username": "admin", "password": machine.admin_password, "csrf_token": csrf_token(form.text)},
        timeout=30,
    )
    assert answer.status_code == 200
    assert "signed in as <strong>admin</strong>" in answer.text.lower()
    return session


@pytest.fixture(scope="module")
def stored(machine: FreshMachine) -> pydicom.Dataset:
    """pydicom's CT sample as a new study, sent to the root's DICOM port as a modality would."""
    with machine.timings.part("smoke: C-STORE"):
        dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.PatientID = f"FRESH-{machine.release.upper()}"
        # Patients' links work until the study date plus token_days: a study of today's.
        dataset.StudyDate = dt.date.today().strftime("%Y%m%d")
        modality = AE(ae_title="FRESHCT")
        modality.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        association = modality.associate("127.0.0.1", machine.dicom_port, ae_title="ORTHANC")
        assert association.is_established, "the archive refused the modality's association"
        try:
            status = association.send_c_store(dataset)
        finally:
            association.release()
        assert status.Status == 0x0000
    return dataset


@pytest.fixture(scope="module")
def found(machine: FreshMachine, admin: requests.Session, stored: pydicom.Dataset) -> dict:
    """The stored study's row, as the query page finds it by patient ID."""
    page = admin.get(
        f"{machine.url}/query/studies", params={"patient_id": stored.PatientID, "format": "json"}, timeout=30
    )
    assert page.status_code == 200
    rows = page.json()["rows"]
    assert [row["study_instance_uid"] for row in rows] == [stored.StudyInstanceUID]
    return rows[0]


def test_the_portal_runs_the_releases_own_orthanc(machine: FreshMachine) -> None:
    """The archive is the Orthanc and DICOMweb plugin this release's packages installed, detected."""
    health = requests.get(f"{machine.url}/healthz", timeout=30).json()
    assert health["status"] == "ok"
    packages = machine.root.run(
        "dpkg-query -W -f '${Version}\\n' orthanc orthanc-dicomweb", "packages.log", timeout=60
    ).split()
    # Debian versions are upstream+dfsg-revision: 1.12.7+dfsg-4 is Orthanc 1.12.7.
    assert [re.split(r"[+-]", version)[0] for version in packages] == [
        health["orthanc"]["version"],
        health["orthanc"]["dicomweb"],
    ]


def test_the_landing_page_names_the_institution(machine: FreshMachine) -> None:
    page = requests.get(f"{machine.url}/", timeout=30)
    assert page.status_code == 200
    assert INSTITUTION in page.text


def test_a_physician_finds_what_a_modality_stored(found: dict, stored: pydicom.Dataset) -> None:
    assert found["study_instance_uid"] == stored.StudyInstanceUID


def test_the_study_downloads_as_a_zip_of_its_file(
    machine: FreshMachine, admin: requests.Session, found: dict, stored: pydicom.Dataset
) -> None:
    with machine.timings.part("smoke: zip"):
        response = admin.get(f"{machine.url}/query/studies/{found['id']}/archive", timeout=60)
    assert response.status_code == 200
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert archive.testzip() is None
        (member,) = [name for name in archive.namelist() if not name.endswith("/")]
        assert pydicom.dcmread(archive.open(member)).SOPInstanceUID == stored.SOPInstanceUID


def test_a_patients_link_opens_the_study_in_the_viewer(
    machine: FreshMachine, admin: requests.Session, found: dict, stored: pydicom.Dataset
) -> None:
    """A link copied for the patient shows the study; the viewer then reads its metadata."""
    home = admin.get(f"{machine.url}/", timeout=30)
    answer = admin.post(
        f"{machine.url}/tokens/studies/{found['id']}/link",
        headers={"X-CSRFToken": csrf_token(home.text)},
        timeout=30,
    )
    assert answer.status_code == 200
    link = urlsplit(answer.json()["link"])
    assert link.port == machine.web_port
    # The link names this machine's address; the test reaches the same listener on loopback.
    patient = requests.Session()
    patient.trust_env = False
    page = patient.get(f"{machine.url}{link.path}?{link.query}", timeout=30)
    assert page.status_code == 200
    assert INSTITUTION in page.text and f'href="/token/viewer?{link.query}"' in page.text

    viewer = patient.get(f"{machine.url}/token/viewer?{link.query}", timeout=30)
    assert viewer.status_code == 200 and "app-config.js" in viewer.text
    metadata = patient.get(
        f"{machine.url}/dicom-web/studies/{stored.StudyInstanceUID}"
        f"/series/{stored.SeriesInstanceUID}/metadata",
        headers={"Accept": "application/dicom+json"},
        timeout=60,
    )
    assert metadata.status_code == 200
    (instance,) = metadata.json()
    assert instance["00080018"]["Value"] == [stored.SOPInstanceUID]
    # Bulk data is fetched from where the browser reached the portal, never from Orthanc's own port.
    assert instance["7FE00010"]["BulkDataURI"].startswith(f"{machine.url}/dicom-web/")


def test_the_orthanc_specific_tests_pass_inside(machine: FreshMachine) -> None:
    """``./pacs test``, the README's second command: it installs what the tests need, then the
    modules that depend on Orthanc's behaviour run against this release's Orthanc."""
    if machine.release != OTHER_RELEASE:
        pytest.skip(f"the whole suite runs on this machine's {RELEASES[machine.release]}")
    with machine.timings.part(f"./pacs test {' '.join(Path(module).stem for module in ORTHANC_MODULES)}"):
        try:
            output = machine.root.run(
                f"./pacs test {' '.join(ORTHANC_MODULES)} -q -p no:cacheprovider", "test.log", timeout=2400
            )
        except RootError as error:
            pytest.fail(str(error))
    assert re.search(r"\d+ passed", output)
    assert not re.search(r"\d+ (failed|error)", output), output[-3000:]


def test_pacs_down_stops_everything(machine: FreshMachine) -> None:
    with machine.timings.part("./pacs down"):
        output = machine.root.run("./pacs down", "down.log", timeout=120)
    assert "pacs: stopped." in output
    assert machine.root.processes() == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{machine.url}/", timeout=10)


def test_an_ordinary_user_runs_the_portal_once_root_installed_the_packages(machine: FreshMachine) -> None:
    """README, "Without root": with the packages in place, a user without root rights (and without
    /usr/sbin in PATH, as Debian gives ordinary users) sets up and runs a portal of their own."""
    if machine.release == OTHER_RELEASE:
        pytest.skip("run in the root of this machine's release, which has the time for it")
    root = machine.root
    with machine.timings.part("an ordinary user: ./pacs up --detach, landing page, ./pacs down"):
        root.run("useradd --create-home --shell /bin/bash clinician", "useradd.log", timeout=60)
        # The user's own clone: the repository's files without root's environment and data.
        root.run(
            "mkdir /home/clinician/pacs && tar -c --exclude=./.venv --exclude=./data ."
            " | tar -x -C /home/clinician/pacs && chown -R clinician: /home/clinician/pacs",
            "copy.log",
            timeout=120,
        )
        web_port = free_port()
        user = (
            "runuser -u clinician -- env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/home/clinician"
            f" LANG=C.UTF-8 PACS_WEB_PORT={web_port} PACS_DICOM_PORT={free_port()}"
            f" PACS_ORTHANC_HTTP_PORT={free_port()} PACS_INSTITUTION='{INSTITUTION}'"
            " bash -c 'cd ~/pacs && ./pacs "
        )
        output = root.run(user + "up --detach'", "user-up.log", timeout=900)
        assert "installing Debian packages" not in output and "are missing" not in output
        try:
            page = requests.get(f"http://127.0.0.1:{web_port}/", timeout=30)
            assert page.status_code == 200 and INSTITUTION in page.text
            health = requests.get(f"http://127.0.0.1:{web_port}/healthz", timeout=30).json()
            assert health["status"] == "ok"
            accounts = (line.split(":") for line in root.read("/etc/passwd").splitlines())
            clinician = next(int(fields[2]) for fields in accounts if fields[0] == "clinician")
            assert {Path(f"/proc/{pid}").stat().st_uid for pid, _ in root.processes()} == {clinician}
        finally:
            assert "pacs: stopped." in root.run(user + "down'", "user-down.log", timeout=120)
    assert root.processes() == []
