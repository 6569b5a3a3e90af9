"""The HTTP server setup page on a real stack and a real Caddy: SSL with the site's own certificate,
ports that move, web access turned off, and changes applied without a restart."""

from __future__ import annotations

import datetime as dt
import io
import re
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import ADMIN_PASSWORD, Stack, c_store, csrf_token, free_port, fresh_study, orthanc_id

pytestmark = pytest.mark.stack

NAME = "pacs.test"


def _pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class ThrowAwayCA:
    """A certificate authority that exists for one test, and the certificates it signs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")])
        now = dt.datetime.now(dt.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = folder / "ca.crt"
        self.path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, days: int = 30, expired: bool = False) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        start, end = (
            (now - dt.timedelta(days=60), now - dt.timedelta(days=1))
            if expired
            else (
                now - dt.timedelta(days=1),
                now + dt.timedelta(days=days),
            )
        )
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM), _pem(key)


def curl(
    stack: Stack, ca: ThrowAwayCA, path: str = "/", port: int | None = None
) -> subprocess.CompletedProcess:
    port = port or stack.web_port
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--resolve",
            f"{NAME}:{port}:127.0.0.1",
            "--cacert",
            str(ca.path),
            "-D",
            "-",
            f"https://{NAME}:{port}{path}",
        ],
        capture_output=True,
        text=True,
    )


def save(session: requests.Session, url: str, fields: dict, files: dict | None = None) -> requests.Response:
    page = session.get(f"{url}/admin/settings")
    current = {
        name: value
        for name, value in re.findall(
            r'<input type="(?:text|number)" name="(\w+)" id="\w+" value="([^"]*)"', page.text
        )
    }
    current.update(
        dict(
            re.findall(r'<select name="(\w+)" id="\w+">.*?<option value="([^"]*)" selected', page.text, re.S)
        )
    )
    checked = re.findall(r'<input type="checkbox" name="(\w+)" id="\w+" value="yes" checked>', page.text)
    data = {**current, **{name: "yes" for name in checked}, "csrf_token": csrf_token(page.text)}
    data.update(fields)
    data = {name: value for name, value in data.items() if value is not None}
    response = session.post(f"{url}/admin/settings", data=data, files=files or {}, allow_redirects=False)
    if response.status_code == 302 or 'id="moving"' in response.text or "Web access is off" in response.text:
        time.sleep(1)  # the web front swaps configurations just after answering (control.runtime.apply)
    return response


@pytest.fixture
def site(fresh_stack: Stack, tmp_path: Path) -> tuple[Stack, requests.Session, ThrowAwayCA]:
    fresh_stack.start()
    return fresh_stack, fresh_stack.sign_in("admin", ADMIN_PASSWORD), ThrowAwayCA(tmp_path)


def test_ssl_with_the_sites_own_certificate(site) -> None:
    stack, admin, ca = site
    certificate, key = ca.issue(NAME)
    saved = save(
        admin,
        stack.url,
        {"ssl_enabled": "yes", "web_server_name": NAME},
        files={"certificate": ("site.crt", certificate), "key": ("site.key", key)},
    )
    # The page that answers says where the portal now is, and takes the admin there.
    assert saved.status_code == 200, saved.text[:2000]
    assert f'data-target="https://127.0.0.1:{stack.web_port}/admin/settings?saved=1"' in saved.text

    answer = curl(stack, ca)
    assert answer.returncode == 0, answer.stderr
    assert stack.institution in answer.stdout
    assert "strict-transport-security: max-age=31536000" in answer.stdout.lower()
    plain = requests.get(f"{stack.url}/query?a=1", allow_redirects=False)
    assert plain.status_code == 308
    assert plain.headers["Location"] == f"https://127.0.0.1:{stack.web_port}/query?a=1"

    # Sign-in over https gives a Secure __Host- cookie, and links to studies are https with the name.
    login = curl(stack, ca, "/login")
    assert re.search(r"(?i)set-cookie: __Host-pacs_session=[^\n]*; Secure", login.stdout)

    page = subprocess.run(
        [
            "curl",
            "-sS",
            "--resolve",
            f"{NAME}:{stack.web_port}:127.0.0.1",
            "--cacert",
            str(ca.path),
            f"https://{NAME}:{stack.web_port}/admin/settings",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ],
        capture_output=True,
        text=True,
    )
    assert page.stdout == "302"  # not signed in over https yet: to the sign-in page

    dataset = fresh_study("CT_small.dcm")
    assert c_store(stack, dataset) == 0
    linked = stack.pacs("token", dataset.StudyInstanceUID)
    assert linked.stdout.startswith(f"https://{NAME}:{stack.web_port}/token?")


@pytest.mark.parametrize("problem", ["mismatched key", "expired", "not a certificate"])
def test_a_bad_certificate_is_refused_and_the_old_configuration_keeps_serving(site, problem: str) -> None:
    stack, admin, ca = site
    certificate, key = ca.issue(NAME)
    if problem == "mismatched key":
        key = ca.issue(NAME)[1]
        message = "does not belong to this certificate"
    elif problem == "expired":
        certificate, key = ca.issue(NAME, expired=True)
        message = "The certificate expired on"
    else:
        certificate = b"-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n"
        message = "not a PEM certificate"
    refused = save(
        admin,
        stack.url,
        {"ssl_enabled": "yes", "web_server_name": NAME},
        files={"certificate": ("site.crt", certificate), "key": ("site.key", key)},
    )
    assert refused.status_code == 400
    assert message in refused.text
    assert stack.institution in requests.get(f"{stack.url}/").text
    assert not (stack.data / "secrets" / "tls" / "site.crt").exists()


def test_the_port_moves_and_port_zero_closes_the_web_but_not_dicom(site) -> None:
    stack, admin, _ca = site
    new_port = free_port()
    moved = save(admin, stack.url, {"web_port": str(new_port)})
    assert moved.status_code == 200
    assert f'data-target="http://127.0.0.1:{new_port}/admin/settings?saved=1"' in moved.text
    assert stack.institution in requests.get(f"http://127.0.0.1:{new_port}/").text
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", stack.web_port)) != 0

    admin_new = requests.Session()
    admin_new.cookies = admin.cookies
    asked = save(admin_new, f"http://127.0.0.1:{new_port}", {"web_port": "0"})
    assert asked.status_code == 200 and "Turn web access off?" in asked.text
    assert stack.institution in requests.get(f"http://127.0.0.1:{new_port}/").text  # not yet
    off = save(admin_new, f"http://127.0.0.1:{new_port}", {"web_port": "0", "confirm_web_off": "yes"})
    assert off.status_code == 200 and "Web access is off" in off.text
    assert f"config set web_port {new_port}" in off.text
    assert ":0/" not in off.text
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", new_port)) != 0
    assert c_store(stack, fresh_study("MR_small.dcm")) == 0  # DICOM keeps working

    back = stack.pacs("config", "set", "web_port", str(stack.web_port))
    assert back.returncode == 0, back.stderr
    assert "Applied to the running portal." in back.stdout
    assert stack.institution in requests.get(f"{stack.url}/").text


def test_a_taken_port_is_refused_next_to_its_field(site) -> None:
    stack, admin, _ca = site
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        refused = save(admin, stack.url, {"web_port": str(taken)})
    assert refused.status_code == 400
    assert f"Port {taken} is used by another program" in refused.text
    assert stack.institution in requests.get(f"{stack.url}/").text


def test_bad_values_are_refused_and_nothing_changes(site) -> None:
    stack, admin, _ca = site
    refused = save(
        admin, stack.url, {"institution": "Renamed Clinic", "web_port": "99999", "time_zone": "Mars/Base"}
    )
    assert refused.status_code == 400
    assert "must be at most 65535" in refused.text
    assert "is not a time zone name" in refused.text
    assert "Renamed Clinic" not in requests.get(f"{stack.url}/").text


def test_changes_are_logged_with_old_and_new_values_never_the_key(site) -> None:
    stack, admin, ca = site
    certificate, key = ca.issue(NAME)
    save(
        admin,
        stack.url,
        {"institution": "Renamed Clinic", "ssl_enabled": None},
        files={"certificate": ("site.crt", certificate), "key": ("site.key", key)},
    )
    assert "Renamed Clinic" in requests.get(f"{stack.url}/").text
    log = admin.get(f"{stack.url}/admin/activity", params={"action": "settings-changed"}).text
    assert "St. Test Hospital" in log and "Renamed Clinic" in log
    assert NAME in log  # the certificate's name is shown ...
    key_text = key.decode().splitlines()[1]
    assert key_text not in log  # ... its key never
    export = admin.get(f"{stack.url}/admin/activity.csv", params={"action": "settings-changed"}).text
    assert key_text not in export
    key_file = stack.data / "secrets" / "tls" / "site.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"


def test_a_download_in_progress_survives_a_reload(site) -> None:
    stack, admin, _ca = site
    first = fresh_study("CT_small.dcm")
    assert c_store(stack, first) == 0
    for _ in range(40):
        more = fresh_study("CT_small.dcm")
        more.StudyInstanceUID, more.PatientID = first.StudyInstanceUID, first.PatientID
        assert c_store(stack, more) == 0
    study = orthanc_id(stack, first.StudyInstanceUID)
    response = admin.get(f"{stack.url}/query/studies/{study}/archive", stream=True)
    assert response.status_code == 200
    expected = int(response.headers["Content-Length"])
    chunks = response.iter_content(4096)
    received = [next(chunks)]
    saved = save(admin_copy(admin), stack.url, {"institution": "Reloaded Clinic"})
    assert saved.status_code == 302
    assert "Reloaded Clinic" in requests.get(f"{stack.url}/").text
    received.extend(chunks)
    body = b"".join(received)
    assert len(body) == expected
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None and len(archive.namelist()) == 41


def admin_copy(session: requests.Session) -> requests.Session:
    copy = requests.Session()
    copy.cookies.update(session.cookies)
    return copy
