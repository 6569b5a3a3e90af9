"""A compose stack under the tests' private Docker engine: build, start, wait, use and take down.

``ComposeStack`` runs compose.yaml, with more files on top where a test names them
(compose.nodes.yaml), under a project name of its own, published on loopback ports picked at run
time, with a fresh data volume. ``start`` imports the base image (``debian:trixie-slim``, the
images' default release; ``PACS_TEST_DEBIAN_RELEASE=bookworm`` tests Debian 12's instead), made with
debootstrap and cached in ``PACS_CACHE``, builds the images and waits until the portal answers.
Every compose test module runs on the one engine of the session (``docker_engine`` in
tests/conftest.py): the images of one reuse the layers the other built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

import pydicom
import requests
from pydicom.data import get_testdata_file
from pynetdicom import AE

from bench.processes import log_tail
from bench.stack import download_cache

from dockerd import DockerEngine, DockerError, debian_base_tarball, run_logged

REPOSITORY = Path(__file__).resolve().parent.parent
RELEASE = os.environ.get("PACS_TEST_DEBIAN_RELEASE", "trixie")
INSTITUTION = "Compose Test Infirmary of Zebra Hill"
ADMIN_PASSWORD = "compose test password 7"
DICOM_AET = "COMPOSEPACS"


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

    The images build in parallel, so: the end of each, and the command that broke a build (the
    log's tail may then belong to another image).
    """
    return bool(
        re.match(r"(Successfully tagged|fetch-ohif:|Service '[\w-]+' failed|ERROR)", line)
        or "returned a non-zero code" in line
    )


@dataclass
class ComposeStack:
    """The stack of compose.yaml (and ``files`` on top) under one project name, on loopback ports."""

    engine: DockerEngine
    project: str
    web_port: int
    dicom_port: int
    logs: Path
    files: tuple[str, ...] = ("compose.yaml",)
    # Variables of the files on top (compose.nodes.yaml's database password and second DICOM port).
    variables: dict[str, str] = field(default_factory=dict)
    # Ready only once every container with a health check reports healthy (a second control plane
    # starts answering after the portal's /healthz already does, through the first).
    wait_for_health_checks: bool = False

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
        env.update(self.variables)
        return env

    def command(self, *args: str) -> list[str]:
        files = [option for name in self.files for option in ("--file", str(REPOSITORY / name))]
        return [*compose_program(), "--project-name", self.project, *files, *args]

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
            timeout=900,
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
        """Wait until Caddy answers /healthz from the control plane with every archive node reachable.

        A container that stopped or was restarted fails the wait at once, with the logs.
        """
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            try:
                health = self.health()
                nodes = health.get("nodes") or {"orthanc": health.get("orthanc", {})}
                answering = health.get("orthanc", {}).get("ok") and all(
                    node.get("ok") for node in nodes.values()
                )
                last = json.dumps(health)
            except (requests.RequestException, ValueError) as error:
                answering, last = False, str(error)
            containers = self.containers()
            for service, container in containers.items():
                if container["RestartCount"] or not container["State"]["Running"]:
                    raise DockerError(f"the {service} container stopped ({last}):\n{self.logs_tail()}")
            unhealthy = [
                service
                for service, container in containers.items()
                if container["State"].get("Health", {"Status": "healthy"})["Status"] != "healthy"
            ]
            if answering and (not unhealthy or not self.wait_for_health_checks):
                return
            if answering:
                last = f"not healthy yet: {', '.join(unhealthy)}"
            time.sleep(1)
        raise DockerError(f"the stack was not ready within {timeout:.0f} s ({last}):\n{self.logs_tail()}")

    def start(self, progress: Callable[[str], None]) -> None:
        """Import the base image, build the images, start the stack and wait until it answers.

        A failure takes the stack down again, with the engine's log shown.
        """
        try:
            cache = download_cache() / "docker"
            base = f"debian:{RELEASE}-slim"
            # An import makes a new image each time, and every layer built on the old one would be
            # built again: the engine's second stack builds on the first one's base.
            if self.engine.docker("image", "inspect", base, check=False).returncode != 0:
                progress(f"making the base image with debootstrap, or taking it from {cache}")
                self.engine.import_base_image(debian_base_tarball(cache, RELEASE), base)
            progress(f"building the images of project {self.project}, log in {self.logs / 'build.log'}")
            self.build()
            progress("images built; starting the stack")
            self.compose("up", "--detach")
            self.wait_until_ready()
            progress(f"stack ready at {self.url}")
        except BaseException:
            print(f"--- dockerd log ---\n{log_tail(self.engine.log)}")
            self.take_down()
            raise

    def take_down(self) -> None:
        """Remove the containers, network and volumes; the engine's own stop would get them too."""
        try:
            self.compose("down", "--volumes", "--remove-orphans", timeout=120)
        except (DockerError, subprocess.TimeoutExpired) as error:
            print(f"compose: down failed, the engine's stop cleans up instead: {error}")

    def logs_tail(self, lines: int = 60) -> str:
        try:
            return self.compose("logs", "--no-color", "--tail", str(lines), timeout=60)
        except (DockerError, subprocess.TimeoutExpired) as error:
            return f"(no container logs: {error})"


def progress_printer() -> Callable[[str], None]:
    """A ``progress`` for ``ComposeStack.start``: each message with the seconds since this call."""
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"compose: {message} ({time.monotonic() - started:.0f} s)", flush=True)

    return progress


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
