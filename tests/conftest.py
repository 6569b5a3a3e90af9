"""Fixtures: real stacks (Orthanc, gunicorn, Caddy) on free ports and temporary data directories.

A stack is started the way an admin starts one, with ``python -m control --data DIR up``, and
stopped the way Ctrl-C stops it. Tests talk to it through Caddy, like a browser. When a stack fails
to start, its logs are shown. The OHIF build is fetched once into a shared cache (``PACS_CACHE``,
by default the user's ``~/.cache/pacs``, see ``bench.stack.download_cache``) so that every stack
and every clone does not fetch and unpack it again.

``tls_stack`` is a portal with SSL on, as a hospital runs it: the site's own certificate, made
here with openssl for the name ``pacs.test`` (and 127.0.0.1), installed with ``./pacs config
certificate``. Python clients trust that certificate and reach it at ``https://127.0.0.1:PORT``;
browsers reach it by its name (``browser_url``, see tests/browser.py).

``app``, ``client`` and ``auth`` are the in-process layer, for the logic that needs no archive
(sign-in, CSRF, access rules, forms, the admin's pages): the control plane built by
``create_app`` on a temporary data directory, each test on a new installation's SQLite database
made by the real migrations, driven through Flask's test client. No Orthanc, gunicorn or Caddy:
the archive's port is one where nothing listens, so a page that asks the archive gets the
portal's 503. Tests of this layer are marked ``inprocess`` (``./pacs test -m inprocess``, seconds).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import html
import html.parser
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
import sqlalchemy as sa
from argon2 import PasswordHasher, profiles
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Flask
from flask.testing import FlaskClient
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.transport import AssociationSocket
from werkzeug.test import TestResponse

from bench.stack import REPOSITORY, download_cache, free_port  # noqa: F401 - REPOSITORY for the tests
from bench.stack import Stack as PortalStack
from control import accounts, db
from control.app import create_app
from control.site import Site

from dockerd import DockerEngine
from postgres import PostgresServer, binaries

os.environ.setdefault("PACS_CACHE", str(download_cache()))


def _shut_down_and_close(self: AssociationSocket) -> None:
    """pynetdicom 3.0.4 closes a socket only when shutting it down works: the socket of a
    connection the archive reset (a node killed mid-association) was left to the garbage
    collector, whose ResourceWarning then failed whichever test was running. Close it anyway."""
    if self.socket is None:
        return
    with contextlib.suppress(OSError):
        self.socket.shutdown(socket.SHUT_RDWR)
    self.socket.close()


AssociationSocket._shutdown_socket = _shut_down_and_close  # type: ignore[method-assign]

ADMIN_PASSWORD = "correct horse battery staple"
SITE_NAME = "pacs.test"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Under ``-m inprocess``, a test module that never names the marker is not even imported:
    importing the browser and DICOM libraries of the other modules would take seconds."""
    if config.option.markexpr == "inprocess" and collection_path.name.startswith("test_"):
        return "inprocess" not in collection_path.read_text()
    return None


def wait_until(condition: Callable[[], object], what: str, timeout: float = 90) -> None:
    """Wait for something a test caused to be seen (a line in a log, a row...), however loaded the
    machine; fail naming ``what`` when it never is."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.05)


class Stack(PortalStack):
    """A portal of the tests (see ``bench.stack``), with a browser's sign-in."""

    @property
    def browser_url(self) -> str:
        """Where a browser reaches the portal (tests/browser.py resolves the site's name)."""
        return self.url

    def client(self) -> requests.Session:
        """A new HTTP client for this portal."""
        return requests.Session()

    def sign_in(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> requests.Session:
        """A browser-like session signed in through the real form (CSRF token included)."""
        session = self.client()
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
        client = self.client()
        while client.get(f"{self.url}/healthz").status_code != 200:
            assert time.monotonic() < deadline, "the archive did not come back"
            time.sleep(0.5)


@dataclass(frozen=True)
class SiteCertificate:
    """A site's certificate and private key, as a certificate provider hands them over."""

    certificate: Path
    key: Path

    @classmethod
    def make(cls, folder: Path, name: str = SITE_NAME, days: int = 30) -> SiteCertificate:
        """A self-signed certificate for ``name`` and 127.0.0.1, made with openssl."""
        folder.mkdir(parents=True, exist_ok=True)
        certificate, key = folder / "site.crt", folder / "site.key"
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
                *("-nodes", "-keyout", str(key), "-out", str(certificate), "-days", str(days)),
                *("-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1"),
            ],
            check=True,
            capture_output=True,
        )
        return cls(certificate, key)

    @property
    def spki_pin(self) -> str:
        """The base64 SHA-256 of the certificate's public key, as Chromium's trust flag takes it."""
        loaded = x509.load_pem_x509_certificate(self.certificate.read_bytes())
        spki = loaded.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(hashlib.sha256(spki).digest()).decode()


class TLSStack(Stack):
    """A portal with SSL on and the site's own certificate (``certificate``), named ``pacs.test``."""

    certificate: SiteCertificate

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.web_port}"

    @property
    def plain_url(self) -> str:
        """The same port spoken to in plain http, as a mistyped address would."""
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def browser_url(self) -> str:
        return f"https://{SITE_NAME}:{self.web_port}"

    def client(self) -> requests.Session:
        session = requests.Session()
        session.verify = str(self.certificate.certificate)
        session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would override verify
        return session

    def turn_ssl_on(self, certificate: SiteCertificate) -> None:
        """Install the certificate and turn SSL on from a shell, before the stack starts."""
        self.certificate = certificate
        for command in (
            ("prepare",),
            ("config", "certificate", str(certificate.certificate), str(certificate.key)),
            ("config", "set", "ssl_enabled", "yes"),
        ):
            done = self.pacs(*command)
            assert done.returncode == 0, done.stderr


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


def make_stack(data: Path, kind: type[Stack] = Stack, **env_overrides: str) -> Stack:
    """A stack (not started) on free ports, as the tests' admin sets it up."""
    institution = env_overrides.pop("institution", "St. Test Hospital")
    return kind.on(
        data,
        institution=institution,
        admin_password=ADMIN_PASSWORD,
        PACS_DEPARTMENT="Radiology",
        **env_overrides,
    )


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the module's own (Debian's binaries, a free port), stopped after it."""
    if binaries() is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    server = PostgresServer(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One portal shared by the tests that only read from it or add their own data."""
    running = make_stack(tmp_path_factory.mktemp("stack"))
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """The private Docker engine of the compose tests (tests/dockerd.py), one for the session: the
    images tests/test_compose_nodes.py builds reuse the layers of tests/test_compose.py's."""
    if os.geteuid() != 0:
        pytest.skip(
            "COMPOSE STACK NOT TESTED: it starts a Docker engine of its own and runs debootstrap, "
            "which need root. Run the suite as root to test compose.yaml (CI does)."
        )
    print("\ncompose: starting a private Docker engine", flush=True)
    with DockerEngine() as running:
        _docker_engines.append(running)
        yield running


_docker_engines: list[DockerEngine] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Stop the Docker engine after the last test that needs it, not at the session's end: the
    tests after it need neither its disk nor the packet filter rules it adds."""
    yield
    if "docker_engine" in item.fixturenames and (
        nextitem is None or "docker_engine" not in nextitem.fixturenames
    ):
        while _docker_engines:
            stopping = time.monotonic()
            _docker_engines.pop().stop()
            print(f"compose: Docker engine stopped and removed ({time.monotonic() - stopping:.0f} s)")


def make_tls_stack(folder: Path) -> TLSStack:
    """A stack (not started) with SSL on, its own certificate and the web server name ``pacs.test``."""
    made = make_stack(folder / "data", TLSStack, PACS_WEB_SERVER_NAME=SITE_NAME)
    assert isinstance(made, TLSStack)
    made.turn_ssl_on(SiteCertificate.make(folder / "certificate"))
    return made


@pytest.fixture(scope="session")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSStack]:
    """One portal with SSL on, shared like ``stack`` by the tests that only add their own data."""
    running = make_tls_stack(tmp_path_factory.mktemp("tls-stack"))
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


@pytest.fixture(scope="session")
def migrated_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database made once by the real migrations, for tests to take copies of."""
    engine = Site(tmp_path_factory.mktemp("migrated")).engine
    db.migrate(engine)
    engine.dispose()
    return Path(engine.url.database)


# The real argon2id code at its cheapest cost: the inner loop hashes many passwords.
CHEAP_HASHER = PasswordHasher.from_parameters(profiles.CHEAPEST)


@pytest.fixture(scope="session")
def installation(tmp_path_factory: pytest.TempPathFactory, migrated_database: Path) -> tuple[Flask, Path]:
    """The in-process control plane, built once, and the database of a new installation with
    one admin, which each test's ``app`` starts from.

    Building an app compiles every URL rule (most of the cost of ``create_app``); a test gets the
    one app on a database of its own instead. A test that changes the app itself (adds a page,
    say) takes ``own_app``.
    """
    data = tmp_path_factory.mktemp("installation")
    new = data / "new-installation.sqlite3"
    shutil.copyfile(migrated_database, new)
    engine = db.make_engine(f"sqlite:///{new}")
    with engine.begin() as connection, pytest.MonkeyPatch.context() as patch:
        patch.setattr(accounts, "_hasher", CHEAP_HASHER)
        # Not the archive's usual 8042, where another installation's Orthanc may answer.
        db.put_settings(connection, {"orthanc_http_port": free_port()})
        accounts.create_user(connection, "admin", ADMIN_PASSWORD, is_admin=True)
    engine.dispose()
    shutil.copyfile(new, data / migrated_database.name)
    return create_app({"DATA_DIR": data, "TESTING": True}), new


@pytest.fixture
def app(installation: tuple[Flask, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    """The control plane of a new installation, in process, with one admin (``ADMIN_PASSWORD``)."""
    built, new = installation
    site: Site = built.extensions["site"]
    database = Path(site.engine.url.database)
    for leftover in (database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")):
        leftover.unlink(missing_ok=True)
    shutil.copyfile(new, database)
    shutil.rmtree(site.secrets_dir / "tls", ignore_errors=True)
    site._settings = None  # the new database's revision may be the number the last one had
    monkeypatch.setattr(accounts, "_hasher", CHEAP_HASHER)
    yield built
    site.engine.dispose()


@pytest.fixture
def own_app(
    installation: tuple[Flask, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Flask]:
    """An app of the test's own on a new installation, for tests that change the app itself."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(installation[1], data / "control.sqlite3")
    monkeypatch.setattr(accounts, "_hasher", CHEAP_HASHER)
    made = create_app({"DATA_DIR": data, "TESTING": True})
    yield made
    made.extensions["site"].engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A browser of the in-process portal: it keeps cookies; it follows no redirect unless told."""
    return app.test_client()


def add_user(app: Flask, username: str, password: str, **rights: bool) -> accounts.User:
    """An account made as the admin's page makes it (``is_admin``, ``can_upload``)."""
    with app.extensions["site"].engine.begin() as connection:
        return accounts.create_user(connection, username, password, **rights)


def activity_rows(app: Flask, **where: str) -> list:
    """The activity log's rows (all columns), oldest first, those whose columns equal ``where``."""
    table = db.activity
    query = sa.select(table).where(*(table.c[name] == value for name, value in where.items()))
    with app.extensions["site"].engine.connect() as connection:
        return list(connection.execute(query.order_by(table.c.id)))


class _FormReader(html.parser.HTMLParser):
    """What a browser would send of each form of a page, as the page fills it in."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, str]] = []
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        given = {name: value or "" for name, value in attrs}
        name = given.get("name")
        if tag == "form":
            self.forms.append({})
        elif not self.forms or "disabled" in given:
            return
        elif tag == "input" and name and given.get("type", "text") not in ("file", "submit", "button"):
            if given.get("type") not in ("checkbox", "radio") or "checked" in given:
                self.forms[-1][name] = given.get("value", "on")
        elif tag == "select" and name:
            self._select = name
        elif tag == "option" and self._select and ("selected" in given or self._select not in self.forms[-1]):
            self.forms[-1][self._select] = given.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None


def form_values(page: str, having: str) -> dict[str, str]:
    """What the form of ``page`` with the field ``having`` sends as it stands (no textareas, no
    files)."""
    reader = _FormReader()
    reader.feed(page)
    [form] = [form for form in reader.forms if having in form]
    return form


def field_error(page: str, name: str) -> str | None:
    """The error a page shows next to its form field ``name``, or None."""
    after = page.split(f'name="{name}"', 1)[1]
    own = re.split(r'<div class="field[ "]', after, maxsplit=1)[0]
    found = re.search(r'class="field-error" role="alert">([^<]*)<', own)
    return html.unescape(found.group(1)) if found else None


class Auth:
    """Signing in and out, and sending forms, as a browser does: through the pages' own forms,
    with the token each page carries (flaskr's ``AuthActions``)."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client

    def login(self, username: str = "admin", password: str = ADMIN_PASSWORD, **data: str) -> TestResponse:
        page = self.client.get("/login")
        return self.client.post(
            "/login",
            data={"username": username, "password": password, "csrf_token": csrf_token(page.text), **data},
        )

    def logout(self) -> TestResponse:
        return self.submit("/account/password", "/logout")

    def submit(
        self, page: str, action: str | None = None, data: dict | None = None, **headers: str
    ) -> TestResponse:
        """Open ``page`` and send its form (to ``action``, by default the page itself) with ``data``."""
        data = {**(data or {}), "csrf_token": self.token(page)}
        return self.client.post(action or page, data=data, headers=headers)

    def token(self, page: str) -> str:
        """The CSRF token of ``page``'s forms, as the browser has it after opening the page."""
        return csrf_token(self.client.get(page).text)


@pytest.fixture
def auth(client: FlaskClient) -> Auth:
    return Auth(client)
