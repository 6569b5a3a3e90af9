"""compose.yaml end to end: build the three images, run the stack and use it as a site would.

Everything runs under a private Docker engine started for this module (tests/dockerd.py). No image
registry is reachable, so the base image (``debian:trixie-slim``: the images' default release,
Debian 13; ``PACS_TEST_DEBIAN_RELEASE=bookworm`` tests Debian 12's instead) is made with
debootstrap (cached in ``PACS_CACHE``) and imported; the Dockerfiles then build with Debian's,
PyPI's and npm's packages only. The stack is published on loopback ports picked at run time,
under a project name of its own, with a fresh data volume. Needs root; takes a few minutes, with
progress printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pynetdicom import AE

from control import settings

from dockerd import DockerEngine, DockerError, debian_base_tarball, run_logged, tail

REPOSITORY = Path(__file__).resolve().parent.parent
SERVICES = ("control", "catalog", "orthanc", "caddy")
CONTAINER_UID = 10001
"""The unprivileged user all three images run as (docker/*.Dockerfile)."""

RELEASE = os.environ.get("PACS_TEST_DEBIAN_RELEASE", "trixie")
INSTITUTION = "Compose Test Infirmary of Zebra Hill"
ADMIN_PASSWORD = "compose test password 7"
DICOM_AET = "COMPOSEPACS"

pytestmark = pytest.mark.compose


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_ca_certificates() -> str:
    """Certificate authorities this machine adds to Debian's (update-ca-certificates' folder).

    The image builds download from PyPI and npm through the same network as this machine; where
    that network has a TLS-inspecting proxy, they need its authority too (docker/registry-ca.sh).
    """
    folder = Path("/usr/local/share/ca-certificates")
    return "".join(path.read_text() for path in sorted(folder.rglob("*.crt"))) if folder.is_dir() else ""


def compose_program() -> list[str]:
    """docker-compose 1.x (Debian's), else the docker compose plugin."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    raise DockerError("neither docker-compose nor docker compose found; ./pacs test installs docker-compose")


def build_progress(line: str) -> bool:
    """The build output lines worth printing as progress.

    The three images build in parallel, so: the end of each, and the command that broke a build
    (the log's tail may then belong to another image).
    """
    return bool(
        re.match(r"(Successfully tagged|fetch-ohif:|Service '\w+' failed|ERROR)", line)
        or "returned a non-zero code" in line
    )


@dataclass
class ComposeStack:
    """The stack of compose.yaml under one project name, published on loopback ports."""

    engine: DockerEngine
    project: str
    web_port: int
    dicom_port: int
    logs: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def env(self) -> dict[str, str]:
        # The caller's own PACS_* and COMPOSE_* settings must not leak into the stack under test.
        env = {
            name: value
            for name, value in self.engine.env.items()
            if not name.startswith(("PACS_", "COMPOSE_"))
        }
        env.update(
            PACS_PUBLISH_ADDRESS="127.0.0.1",
            PACS_WEB_PORT=str(self.web_port),
            PACS_DICOM_PORT=str(self.dicom_port),
            PACS_INSTITUTION=INSTITUTION,
            PACS_ADMIN_PASSWORD=ADMIN_PASSWORD,
            PACS_DICOM_AET=DICOM_AET,
            PACS_BUILD_CA_CERTIFICATES=local_ca_certificates(),
            PACS_DEBIAN_RELEASE=RELEASE,
        )
        return env

    def command(self, *args: str) -> list[str]:
        return [
            *compose_program(),
            "--project-name",
            self.project,
            "--file",
            str(REPOSITORY / "compose.yaml"),
            *args,
        ]

    def compose(self, *args: str, timeout: float = 180) -> str:
        """Run a compose command; its output, or DockerError with it."""
        result = subprocess.run(
            self.command(*args), env=self.env, cwd=REPOSITORY, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise DockerError(f"compose {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def build(self) -> None:
        run_logged(
            self.command("build", "--parallel"),
            self.logs / "build.log",
            env=self.env,
            cwd=REPOSITORY,
            timeout=600,
            show=build_progress,
        )

    def containers(self) -> dict[str, dict]:
        """``docker inspect`` of each service's container, by service name."""
        ids = self.compose("ps", "--quiet").split()
        inspected = json.loads(self.engine.docker("inspect", *ids).stdout)
        return {
            container["Config"]["Labels"]["com.docker.compose.service"]: container for container in inspected
        }

    def health(self) -> dict:
        response = requests.get(f"{self.url}/healthz", timeout=10)
        response.raise_for_status()
        return response.json()

    def wait_until_ready(self, timeout: float = 180) -> None:
        """Wait until Caddy answers /healthz from the control plane with Orthanc reachable.

        A container that stopped or was restarted fails the wait at once, with the logs.
        """
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            try:
                health = self.health()
                if health.get("orthanc", {}).get("ok"):
                    return
                last = json.dumps(health)
            except (requests.RequestException, ValueError) as error:
                last = str(error)
            for service, container in self.containers().items():
                if container["RestartCount"] or not container["State"]["Running"]:
                    raise DockerError(f"the {service} container stopped ({last}):\n{self.logs_tail()}")
            time.sleep(1)
        raise DockerError(f"the stack was not ready within {timeout:.0f} s ({last}):\n{self.logs_tail()}")

    def take_down(self) -> None:
        """Remove the containers, network and volume; the engine's own stop would get them too."""
        try:
            self.compose("down", "--volumes", "--remove-orphans", timeout=120)
        except (DockerError, subprocess.TimeoutExpired) as error:
            print(f"compose: down failed, the engine's stop cleans up instead: {error}")

    def logs_tail(self, lines: int = 60) -> str:
        try:
            return self.compose("logs", "--no-color", "--tail", str(lines), timeout=60)
        except (DockerError, subprocess.TimeoutExpired) as error:
            return f"(no container logs: {error})"


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    if os.geteuid() != 0:
        pytest.skip(
            "COMPOSE STACK NOT TESTED: it starts a Docker engine of its own and runs debootstrap, "
            "which need root. Run the suite as root to test compose.yaml (CI does)."
        )
    print("\ncompose: starting a private Docker engine", flush=True)
    with DockerEngine() as running:
        yield running
        stopping = time.monotonic()
    print(f"compose: Docker engine stopped and removed ({time.monotonic() - stopping:.0f} s)", flush=True)


@pytest.fixture(scope="module")
def compose_stack(
    engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ComposeStack]:
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"compose: {message} ({time.monotonic() - started:.0f} s)", flush=True)

    stack = ComposeStack(
        engine=engine,
        project=f"pacstest{uuid.uuid4().hex[:8]}",
        web_port=free_loopback_port(),
        dicom_port=free_loopback_port(),
        logs=tmp_path_factory.mktemp("compose"),
    )
    try:
        cache = Path(os.environ.get("PACS_CACHE") or Path(tempfile.gettempdir()) / "pacs-cache") / "docker"
        progress(f"making the base image with debootstrap, or taking it from {cache}")
        engine.import_base_image(debian_base_tarball(cache, RELEASE), f"debian:{RELEASE}-slim")
        progress(f"building the images of project {stack.project}, log in {stack.logs / 'build.log'}")
        stack.build()
        progress("images built; starting the stack")
        stack.compose("up", "--detach")
        stack.wait_until_ready()
        progress(f"stack ready at {stack.url}")
    except BaseException:
        print(f"--- dockerd log ---\n{tail(engine.log)}")
        stack.take_down()
        raise
    failures_before = request.session.testsfailed
    yield stack
    if request.session.testsfailed > failures_before:
        print(f"--- container logs ---\n{stack.logs_tail()}")
    stack.take_down()
    progress("stack removed")


def sign_in(url: str, password: str) -> tuple[requests.Session, requests.Response]:
    """Post the real sign-in form as admin, CSRF token included; the session and the form's answer."""
    session = requests.Session()
    form = session.get(f"{url}/login", timeout=10)
    assert form.status_code == 200
    field = re.search(r'<input[^>]*name="csrf_token"[^>]*>', form.text)
    assert field and 'type="hidden"' in field.group(0), "the sign-in form has no hidden csrf_token input"
    token = re.search(r'value="([^"]*)"', field.group(0))
    assert token
    answer = session.post(
        f"{url}/login",
        data={"username": "admin", "password": password, "csrf_token": token.group(1)},
        allow_redirects=False,
        timeout=10,
    )
    return session, answer


def signed_in_session(url: str) -> tuple[requests.Session, requests.Response]:
    """A session signed in as admin with the password from the environment, and its first page."""
    session, answer = sign_in(url, ADMIN_PASSWORD)
    assert answer.status_code in (302, 303), answer.text[:500]
    landing = session.get(urljoin(f"{url}/", answer.headers["Location"]), timeout=10)
    assert landing.status_code == 200
    assert "Signed in as <strong>admin</strong>" in landing.text
    return session, landing


def store_sample(port: int) -> pydicom.Dataset:
    """C-STORE pydicom's CT sample to the archive's published DICOM port; the dataset sent."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    modality = AE(ae_title="COMPOSETEST")
    modality.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = modality.associate("127.0.0.1", port, ae_title=DICOM_AET)
    assert association.is_established, "the archive refused the association"
    try:
        status = association.send_c_store(dataset)
    finally:
        association.release()
    assert status and status.Status == 0x0000, f"C-STORE status {status}"
    return dataset


def test_control_container_takes_every_setting_from_the_environment() -> None:
    """A site sets first-start defaults in .env; compose.yaml passes on each one the portal reads."""
    compose_file = (REPOSITORY / "compose.yaml").read_text()
    passed_on = set(re.findall(r"^ {6}(PACS_[A-Z0-9_]+):", compose_file, flags=re.MULTILINE))
    # The archive's HTTP port is the project network's own business.
    wanted = {setting.env for setting in settings.SETTINGS if setting.env} - {"PACS_ORTHANC_HTTP_PORT"}
    assert wanted - passed_on == set()


def test_control_image_holds_every_repository_folder_the_control_plane_reads() -> None:
    """The control plane reads files beside its package; the build context and image must hold them."""
    source = "\n".join(path.read_text() for path in (REPOSITORY / "control").rglob("*.py"))
    read = set(re.findall(r'REPOSITORY / "([^"]+)"', source)) - {"data"}  # data: the volume
    copied = set(
        re.findall(r"^COPY (\S+) /app/", (REPOSITORY / "docker/control.Dockerfile").read_text(), re.M)
    )
    in_context = set(re.findall(r"^!(\S+?)/?$", (REPOSITORY / ".dockerignore").read_text(), re.M))
    assert read - copied == set(), "copy these in docker/control.Dockerfile"
    assert copied - in_context == set(), "let these into the build context in .dockerignore"


def test_landing_page_names_the_institution(compose_stack: ComposeStack) -> None:
    page = requests.get(f"{compose_stack.url}/", timeout=10)
    assert page.status_code == 200
    assert INSTITUTION in page.text


def test_admin_signs_in_with_the_password_from_the_environment(compose_stack: ComposeStack) -> None:
    session, _ = signed_in_session(compose_stack.url)
    assert session.get(f"{compose_stack.url}/healthz", timeout=10).status_code == 200

    refused, answer = sign_in(compose_stack.url, "not the password")
    assert answer.status_code not in (302, 303)
    assert "Signed in as" not in refused.get(f"{compose_stack.url}/", timeout=10).text


def test_modality_stores_to_the_published_dicom_port(compose_stack: ComposeStack) -> None:
    store_sample(compose_stack.dicom_port)
    orthanc = compose_stack.health()["orthanc"]
    assert orthanc["ok"] is True
    assert orthanc["aet"] == DICOM_AET


def test_the_volume_is_readable_by_the_pacs_user_only(compose_stack: ComposeStack) -> None:
    """After a store and a sign-in: the database, the archive's files, logs, configurations, secrets."""
    store_sample(compose_stack.dicom_port)
    signed_in_session(compose_stack.url)
    control = compose_stack.containers()["control"]["Id"]
    listed = compose_stack.engine.docker(
        "exec", control, "find", "/data", "!", "-type", "l", "-printf", "%m %p\n"
    ).stdout.splitlines()
    assert any("/data/orthanc/" in line for line in listed) and any(
        "control.sqlite3" in line for line in listed
    )
    readable = [line for line in listed if int(line.split()[0], 8) & 0o077]
    assert readable == []


def test_signed_in_user_finds_the_stored_study_through_dicomweb(compose_stack: ComposeStack) -> None:
    dataset = store_sample(compose_stack.dicom_port)
    session, _ = signed_in_session(compose_stack.url)
    found = session.get(
        f"{compose_stack.url}/dicom-web/studies",
        params={"StudyInstanceUID": dataset.StudyInstanceUID},
        headers={"Accept": "application/dicom+json"},
        timeout=30,
    )
    assert found.status_code == 200, found.text[:500]
    assert [study["0020000D"]["Value"][0] for study in found.json()] == [dataset.StudyInstanceUID]


def test_viewer_files_come_from_the_caddy_image(compose_stack: ComposeStack) -> None:
    session, _ = signed_in_session(compose_stack.url)
    viewer = session.get(f"{compose_stack.url}/viewer", params={"StudyInstanceUIDs": "1.2.3"}, timeout=10)
    assert viewer.status_code == 200
    assert "OHIF" in viewer.text and "app-config.js" in viewer.text
    config = session.get(f"{compose_stack.url}/app-config.js", timeout=10)
    assert config.status_code == 200
    assert config.text.endswith((REPOSITORY / "ohif" / "app-config.js").read_text())
    assert "/dicom-web" in config.text


def test_downloader_program_is_offered(compose_stack: ComposeStack) -> None:
    script = requests.get(f"{compose_stack.url}/downloader/pacs_download.py", timeout=10)
    assert script.status_code == 200
    assert script.text == (REPOSITORY / "downloader" / "pacs_download.py").read_text()


def test_only_web_and_dicom_are_published_on_the_chosen_address(compose_stack: ComposeStack) -> None:
    published = {
        (service, port, binding["HostIp"], int(binding["HostPort"]))
        for service, container in compose_stack.containers().items()
        for port, bindings in (container["NetworkSettings"]["Ports"] or {}).items()
        for binding in bindings or []
    }
    assert published == {
        ("caddy", "3000/tcp", "127.0.0.1", compose_stack.web_port),
        ("orthanc", "4242/tcp", "127.0.0.1", compose_stack.dicom_port),
    }


def test_the_archive_is_the_releases_own_orthanc(compose_stack: ComposeStack) -> None:
    """The images are built on the chosen Debian release, and the portal reports the Orthanc and
    DICOMweb plugin of that release's packages, as it detected them."""
    image = compose_stack.containers()["orthanc"]["Image"]
    facts = (
        ". /etc/os-release && echo $VERSION_CODENAME"
        " && dpkg-query -W -f '${Version}\\n' orthanc orthanc-dicomweb"
    )
    packages = compose_stack.engine.docker(
        "run", "--rm", "--entrypoint", "sh", image, "-c", facts
    ).stdout.split()
    codename, orthanc_package, dicomweb_package = packages
    assert codename == RELEASE
    reported = compose_stack.health()["orthanc"]
    # Debian versions are upstream+dfsg-revision: 1.12.7+dfsg-4 is Orthanc 1.12.7.
    assert re.split(r"[+-]", orthanc_package)[0] == reported["version"]
    assert re.split(r"[+-]", dicomweb_package)[0] == reported["dicomweb"]


def test_every_process_runs_as_the_same_unprivileged_user(compose_stack: ComposeStack) -> None:
    containers = compose_stack.containers()
    assert set(containers) == set(SERVICES)
    for service, container in containers.items():
        table = compose_stack.engine.docker("top", container["Id"], "-o", "pid,uid,args").stdout
        top = table.splitlines()[1:]
        assert top, f"{service} runs no process"
        for line in top:
            _, uid, command = line.split(None, 2)
            assert int(uid) == CONTAINER_UID, f"{service}: {command} runs as uid {uid}"


def test_images_hold_no_site_data(compose_stack: ComposeStack) -> None:
    """Secrets, database and archive are made in the volume at first start, never in an image."""
    for service, container in compose_stack.containers().items():
        found = compose_stack.engine.docker(
            "run", "--rm", "--user", "0", "--entrypoint", "sh", container["Image"], "-c",
            "ls -A /data; find / -xdev \\( -name secrets.json -o -name 'control.sqlite3*' \\) -print",
        ).stdout  # fmt: skip
        assert found.split() == [], f"the {service} image holds {found.split()}"


def test_control_container_reports_healthy(compose_stack: ComposeStack) -> None:
    """compose.yaml's health check, which a site's monitoring reads, sees the control plane answer."""
    deadline = time.monotonic() + 90
    while (status := compose_stack.containers()["control"]["State"]["Health"]["Status"]) == "starting":
        assert time.monotonic() < deadline, "the control container's health check never ran"
        time.sleep(2)
    assert status == "healthy"


def test_site_survives_recreated_containers(compose_stack: ComposeStack) -> None:
    session, landing = signed_in_session(compose_stack.url)

    compose_stack.compose("up", "--detach", "--force-recreate")
    compose_stack.wait_until_ready()

    # The session from before still holds (same session key); so does the password (same database).
    assert "Signed in as <strong>admin</strong>" in session.get(landing.url, timeout=10).text
    signed_in_session(compose_stack.url)
