"""compose.yaml end to end: build the three images, run the stack and use it as a site would.

Everything runs under the session's private Docker engine (tests/dockerd.py, ``docker_engine``
in tests/conftest.py). No image registry is reachable, so the base image (``debian:trixie-slim``:
the images' default release, Debian 13; ``PACS_TEST_DEBIAN_RELEASE=bookworm`` tests Debian 12's
instead) is made with debootstrap (cached in ``PACS_CACHE``) and imported; the Dockerfiles then
build with Debian's, PyPI's and npm's packages only (tests/compose_stack.py). The stack is
published on loopback ports picked at run time, under a project name of its own, with a fresh data
volume. Needs root; takes a few minutes, with progress printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator

import pytest
import requests

from control import settings

from compose_stack import (
    DICOM_AET,
    INSTITUTION,
    RELEASE,
    REPOSITORY,
    ComposeStack,
    free_loopback_port,
    progress_printer,
    sign_in,
    signed_in_session,
    store_sample,
)
from dockerd import DockerEngine

SERVICES = ("control", "catalog", "orthanc", "caddy")
CONTAINER_UID = 10001
"""The unprivileged user all three images run as (docker/*.Dockerfile)."""

pytestmark = pytest.mark.compose


@pytest.fixture(scope="module")
def compose_stack(
    docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ComposeStack]:
    progress = progress_printer()
    stack = ComposeStack(
        engine=docker_engine,
        project=f"pacstest{uuid.uuid4().hex[:8]}",
        web_port=free_loopback_port(),
        dicom_port=free_loopback_port(),
        logs=tmp_path_factory.mktemp("compose"),
    )
    stack.start(progress)
    failures_before = request.session.testsfailed
    yield stack
    if request.session.testsfailed > failures_before:
        print(f"--- container logs ---\n{stack.logs_tail()}")
    stack.take_down()
    progress("stack removed")


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
