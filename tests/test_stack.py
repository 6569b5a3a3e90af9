"""The stack as an admin and a browser meet it: starting, stopping, the landing page, health, and
what must stay closed (Orthanc's HTTP API)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess

import pytest
import requests
from pydicom.data import get_testdata_file

from control.runtime.configs import OHIF_PIN
from control.viewer import inline_script_hashes

from conftest import REPOSITORY, Stack, c_store, free_port, sign_in

pytestmark = pytest.mark.stack


def test_landing_page_is_branded_and_asks_for_an_account(stack: Stack) -> None:
    page = requests.get(f"{stack.url}/")
    assert page.status_code == 200
    assert stack.institution in page.text
    assert "Radiology" in page.text
    assert "You need an account" in page.text
    assert 'href="/login"' in page.text


def test_health_reports_every_part_and_no_secret(stack: Stack) -> None:
    response = requests.get(f"{stack.url}/healthz")
    assert response.status_code == 200
    report = response.json()
    assert report["status"] == "ok"
    system = requests.get(f"{stack.orthanc_url}/system", auth=stack.orthanc_auth).json()
    plugin = requests.get(f"{stack.orthanc_url}/plugins/dicom-web", auth=stack.orthanc_auth).json()
    assert report["orthanc"] == {
        "ok": True,
        "version": system["Version"],
        "dicomweb": plugin["Version"],
        "extended_find": bool(system.get("Capabilities", {}).get("HasExtendedFind")),
        "aet": stack.aet,
    }
    assert report["database"]["ok"] and report["control"]["ok"]
    user, password = stack.orthanc_auth
    assert password not in response.text and user not in response.text


def test_orthanc_http_needs_credentials_and_is_not_behind_the_web_port(stack: Stack) -> None:
    assert requests.get(f"{stack.orthanc_url}/system").status_code == 401
    assert requests.get(f"{stack.orthanc_url}/system", auth=("orthanc", "orthanc")).status_code == 401
    assert requests.get(f"{stack.orthanc_url}/system", auth=stack.orthanc_auth).status_code == 200
    # The public port answers with the portal's pages, never with Orthanc's API.
    for path in ("/system", "/instances", "/tools/find", "/app/explorer.html", "/statistics"):
        response = requests.get(f"{stack.url}{path}", auth=stack.orthanc_auth)
        assert response.status_code == 404, path
        assert "Orthanc" not in response.text


def test_orthanc_refuses_other_hosts_even_with_credentials(stack: Stack) -> None:
    """Orthanc 1.10 cannot bind to loopback only; RemoteAccessAllowed=false must close it instead."""
    other = [address for address in _local_addresses() if not address.startswith("127.")]
    if not other:
        pytest.skip("this machine has no non-loopback address to test from")
    response = requests.get(f"http://{other[0]}:{stack.orthanc_port}/system", auth=stack.orthanc_auth)
    assert response.status_code == 401


def _local_addresses() -> list[str]:
    output = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    return [line.split()[3].split("/")[0] for line in output.splitlines()]


def test_viewer_files_are_served(stack: Stack) -> None:
    page = requests.get(f"{stack.url}/viewer", params={"StudyInstanceUIDs": "1.2.3"})
    assert page.status_code == 200
    assert "app-config.js" in page.text and '<div id="root"' in page.text
    config = requests.get(f"{stack.url}/app-config.js")
    assert config.status_code == 200
    assert "qidoRoot: '/dicom-web'" in config.text
    # A bundle named by the page is there too (the viewer would be blank without it).
    bundle = next(part for part in page.text.split('"') if part.startswith("/app.bundle."))
    assert requests.get(f"{stack.url}{bundle}").status_code == 200
    # Its inline scripts run: their hashes, pinned with the version, are in the viewer's policy.
    assert inline_script_hashes(page.text) == OHIF_PIN["inline_script_hashes"]
    for digest in OHIF_PIN["inline_script_hashes"]:
        assert f"'{digest}'" in page.headers["Content-Security-Policy"]


def test_security_headers_on_pages_files_and_errors(stack: Stack) -> None:
    for path in ("/", "/app-config.js", "/no-such-page"):
        headers = requests.get(f"{stack.url}{path}").headers
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert headers["X-Frame-Options"] == "DENY", path
        assert headers["Referrer-Policy"] == "same-origin", path
        assert "Server" not in headers or "Caddy" not in headers["Server"], path


def test_patients_pages_send_no_referrer_at_all(stack: Stack) -> None:
    # Their URL holds the token: not even the portal's own files may see it in a Referer.
    for path in ("/token?" + "x" * 64, "/token/viewer?" + "x" * 64, "/token/handout?abc"):
        assert requests.get(f"{stack.url}{path}").headers["Referrer-Policy"] == "no-referrer", path


def test_sign_in_shows_the_archive_and_sign_out_ends_the_session(stack: Stack) -> None:
    session = stack.sign_in()
    home = session.get(f"{stack.url}/")
    assert "The archive holds" in home.text
    copied_cookie = session.cookies.get("pacs_session")

    from conftest import csrf_token

    session.post(f"{stack.url}/logout", data={"csrf_token": csrf_token(home.text)})
    assert "Signed in as" not in session.get(f"{stack.url}/").text

    replay = requests.get(f"{stack.url}/", cookies={"pacs_session": copied_cookie})
    assert "Signed in as" not in replay.text
    assert "The archive holds" not in replay.text


def test_wrong_password_is_refused_with_the_generic_message(stack: Stack) -> None:
    session = requests.Session()
    response = sign_in(session, stack.url, "admin", "not the password")
    assert response.status_code == 401
    assert "The username or password is not correct" in response.text
    assert "Signed in as" not in response.text


def test_sign_in_without_csrf_token_is_refused(stack: Stack) -> None:
    response = requests.post(
        f"{stack.url}/login", data={"username": "admin", "password": "correct horse battery staple"}
    )
    assert response.status_code == 400
    assert "Signed in as" not in response.text


def test_a_dead_orthanc_gives_a_clear_503_and_comes_back(stack: Stack) -> None:
    session = stack.sign_in()
    stack.kill_archive()

    page = session.get(f"{stack.url}/")
    assert page.status_code == 503
    assert "The archive is not reachable" in page.text
    assert "Traceback" not in page.text
    # The viewer's requests, which Caddy sends straight to Orthanc once the gate says yes.
    frames = session.get(f"{stack.url}/dicom-web/studies/1.2.3/metadata")
    assert frames.status_code == 503
    assert "The image archive is not reachable" in frames.text
    health = requests.get(f"{stack.url}/healthz")
    assert health.status_code == 503
    assert health.json()["orthanc"]["ok"] is False

    # The runner starts the archive again by itself.
    stack.wait_for_archive()
    assert session.get(f"{stack.url}/").status_code == 200


def test_modality_stores_and_a_second_up_keeps_everything(fresh_stack: Stack) -> None:
    fresh_stack.start()
    assert c_store(fresh_stack, get_testdata_file("CT_small.dcm")) == 0x0000
    secrets_file = fresh_stack.data / "secrets" / "secrets.json"
    secrets_before = secrets_file.read_text()
    assert fresh_stack.stop() == 0

    fresh_stack.output.clear()
    fresh_stack.start()
    assert "created the admin account" not in "".join(fresh_stack.output)
    assert secrets_file.read_text() == secrets_before
    statistics = requests.get(f"{fresh_stack.orthanc_url}/statistics", auth=fresh_stack.orthanc_auth).json()
    assert statistics["CountInstances"] == 1
    fresh_stack.sign_in()


def test_generated_secrets_and_configs_are_private(stack: Stack) -> None:
    for path in (
        stack.data / "secrets" / "secrets.json",
        stack.data / "run" / "orthanc.json",
        stack.data / "run" / "Caddyfile",
    ):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == 0o600, f"{path.name} is {oct(mode)}"
    assert stat.S_IMODE((stack.data / "secrets").stat().st_mode) == 0o700


def test_first_run_prints_addresses_and_the_generated_admin_password(fresh_stack: Stack) -> None:
    del fresh_stack.env["PACS_ADMIN_PASSWORD"]
    fresh_stack.start()
    output = "".join(fresh_stack.output)
    assert f"http://127.0.0.1:{fresh_stack.web_port}/" in output
    assert f"AE title ORTHANC, port {fresh_stack.dicom_port}" in output
    password = output.split("with the password ")[1].split()[0]
    fresh_stack.sign_in("admin", password)


def test_a_taken_port_is_named(fresh_stack: Stack) -> None:
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", fresh_stack.web_port))
        squatter.listen()
        result = fresh_stack.pacs("up")
    assert result.returncode == 1
    assert f"port {fresh_stack.web_port} (web port) is already in use" in result.stderr


def test_detached_up_then_down_leaves_nothing_behind(fresh_stack: Stack) -> None:
    started = fresh_stack.pacs("up", "--detach")
    assert started.returncode == 0, started.stderr + started.stdout
    assert "Runs in the background" in started.stdout
    assert fresh_stack.institution in requests.get(f"{fresh_stack.url}/").text

    status = fresh_stack.pacs("status")
    assert status.returncode == 0
    assert "health   ok" in status.stdout
    run = fresh_stack.data / "run"
    pids = [int(path.read_text()) for path in run.glob("*.pid")]
    assert len(pids) == 5  # the runner, Orthanc, the control plane, the catalog's feeder, Caddy

    stopped = fresh_stack.pacs("down")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), f"process {pid} is still running"
    for port in (fresh_stack.web_port, fresh_stack.dicom_port, fresh_stack.orthanc_port):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
    assert fresh_stack.pacs("status").returncode == 3


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            return stat_file.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_two_stacks_run_side_by_side(stack: Stack, fresh_stack: Stack) -> None:
    fresh_stack.env["PACS_INSTITUTION"] = fresh_stack.institution = "Second Site Clinic"
    fresh_stack.start()
    assert "Second Site Clinic" in requests.get(f"{fresh_stack.url}/").text
    assert stack.institution in requests.get(f"{stack.url}/").text


def test_second_setup_installs_nothing(tmp_path) -> None:
    """``./pacs`` on a prepared machine goes straight to work: no package, no download."""
    env = {**os.environ, "PACS_WEB_PORT": str(free_port())}
    result = subprocess.run(
        [str(REPOSITORY / "pacs"), "--data", str(tmp_path / "data"), "prepare"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    again = subprocess.run(
        [str(REPOSITORY / "pacs"), "--data", str(tmp_path / "data"), "prepare"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert "installing" not in again.stdout and "fetching" not in again.stdout
    assert "created the admin account" not in again.stdout
