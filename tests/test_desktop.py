"""The desktop viewer (Weasis) and other DICOMweb viewers under a token, on a real stack with SSL on.

Chromium presses "Desktop viewer" on a patient, a study and a series row and on a patient's page;
the test catches the ``weasis://`` navigation the page makes, reads the command in it as Weasis
would, and a real DICOMweb client (dicomweb-client) then sends exactly what the link says, as
Weasis's ``dicom:rs`` does: to the DICOMweb address on the portal's public name
(https://pacs.test:PORT, resolved to this machine), with the link's header. It must get every
instance of what was opened, byte for byte as the archive holds it, and nothing else.
"""

from __future__ import annotations

import datetime as dt
import re
import shlex
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

import pytest
import requests
import sqlalchemy as sa
from dicomweb_client.api import DICOMwebClient
from playwright.sync_api import Browser, Page
from pydicom import Dataset
from pydicom.uid import generate_uid
from requests import HTTPError
from requests.adapters import HTTPAdapter
from test_quick_gate import REQUESTS

from control import accounts, db
from control.desktop import credentials
from control.site import Site

from browser import chromium, sign_in
from conftest import ADMIN_PASSWORD, SITE_NAME, TLSStack, c_store, csrf_token, fresh_study

pytestmark = [pytest.mark.stack, pytest.mark.browser]

PHYSICIAN, PASSWORD = "dr.weasis", "desktop viewer password 1"
BIRTH_DATE = "19640229"


@dataclass(frozen=True)
class Archive:
    """One patient with two studies (the first of two series), and another patient's study."""

    patient_id: str
    patient: str  # Orthanc ids from here on, with the UIDs they stand for
    study_a: str
    study_b: str
    other: str
    series_a1: str
    series_a2: str
    uids: dict[str, str]


def instance(sample: str, patient_id: str, study_uid: str, series_uid: str, description: str) -> Dataset:
    dataset = fresh_study(sample, patient_id=patient_id, patient_name="Desktop^Dora")
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series_uid
    dataset.StudyDescription = description
    dataset.SeriesDescription = f"{description}, {series_uid[-6:]}"
    dataset.PatientBirthDate = BIRTH_DATE
    return dataset


def lookup(stack: TLSStack, uid: str, kind: str) -> str:
    found = requests.post(f"{stack.orthanc_url}/tools/lookup", data=uid, auth=stack.orthanc_auth).json()
    return next(item["ID"] for item in found if item["Type"] == kind)


@pytest.fixture(scope="module")
def archive(tls_stack: TLSStack) -> Archive:
    patient_id = "DESKTOP-" + generate_uid()[-10:]
    study_a, study_b, other = generate_uid(), generate_uid(), generate_uid()
    series_a1, series_a2 = generate_uid(), generate_uid()
    datasets = [
        instance("CT_small.dcm", patient_id, study_a, series_a1, "Study A"),
        instance("CT_small.dcm", patient_id, study_a, series_a1, "Study A"),
        instance("MR_small.dcm", patient_id, study_a, series_a2, "Study A"),
        instance("MR_small.dcm", patient_id, study_b, generate_uid(), "Study B"),
        instance("CT_small.dcm", "OTHER-" + patient_id, other, generate_uid(), "Another patient's"),
    ]
    for dataset in datasets:
        assert c_store(tls_stack, dataset) == 0
    return Archive(
        patient_id=patient_id,
        patient=lookup(tls_stack, patient_id, "Patient"),
        study_a=lookup(tls_stack, study_a, "Study"),
        study_b=lookup(tls_stack, study_b, "Study"),
        other=lookup(tls_stack, other, "Study"),
        series_a1=lookup(tls_stack, series_a1, "Series"),
        series_a2=lookup(tls_stack, series_a2, "Series"),
        uids={"a": study_a, "b": study_b, "other": other, "a1": series_a1, "a2": series_a2},
    )


def archive_files(stack: TLSStack, level: str, orthanc_id: str) -> dict[str, bytes]:
    """Every instance of a patient, study or series as the archive stores it, by SOP Instance UID."""
    orthanc = stack.orthanc()
    return {
        item["MainDicomTags"]["SOPInstanceUID"]: orthanc.get(
            f"{stack.orthanc_url}/instances/{item['ID']}/file"
        ).content
        for item in orthanc.get(f"{stack.orthanc_url}/{level}/{orthanc_id}/instances").json()
    }


@pytest.fixture(scope="module")
def browser(tls_stack: TLSStack) -> Iterator[Browser]:
    with chromium(tls_stack) as running:
        yield running


def physician_page(browser: Browser, stack: TLSStack) -> Page:
    with Site(stack.data).engine.begin() as connection:
        if not accounts.find_by_username(connection, PHYSICIAN):
            accounts.create_user(connection, PHYSICIAN, PASSWORD)
    page = browser.new_context().new_page()
    sign_in(page, stack, PHYSICIAN, PASSWORD)
    return page


def press_desktop_viewer(page: Page, row: str) -> str:
    """Click "Desktop viewer" in the row that shows ``row``; return the weasis:// link it opens."""
    button = page.locator(f"tbody tr:has-text('{row}') form.desktop-viewer button")
    assert button.count() == 1, page.inner_text("main")[:2000]
    with page.expect_request(lambda request: request.url.startswith("weasis://")) as opened:
        button.click()
    note = page.locator(f"tbody tr:has-text('{row}') .desktop-note")
    assert "Opening Weasis" in note.inner_text()
    # The note keeps the same link for a second try, and the page is still there.
    assert note.locator("a.weasis-link").get_attribute("href") == opened.value.url
    assert page.locator("tbody").is_visible()
    return opened.value.url


@pytest.fixture(scope="module")
def launched(browser: Browser, tls_stack: TLSStack, archive: Archive) -> dict[str, str]:
    """The links a physician's clicks open, by level."""
    signed_in = physician_page(browser, tls_stack)
    base = tls_stack.browser_url
    links = {}
    for level, path, row in (
        ("patient", f"/query/patients?patient_id={archive.patient_id}", archive.patient_id),
        ("study", f"/query/patients/{archive.patient}/studies", "Study A"),
        ("series", f"/query/studies/{archive.study_a}/series", archive.uids["a1"][-6:]),
    ):
        # A page of its own each: headless Chromium keeps the tab that launched an external
        # protocol waiting for an answer that no one gives, and takes no more clicks in it.
        page = signed_in.context.new_page()
        page.goto(base + path)
        links[level] = press_desktop_viewer(page, row)
        page.close()
    signed_in.context.close()
    return links


@dataclass(frozen=True)
class Command:
    """A ``$dicom:rs`` command as Weasis reads it (weasis.org, "Weasis Commands")."""

    url: str
    request: list[tuple[str, str]]
    header: tuple[str, str]

    @classmethod
    def of(cls, link: str) -> Command:
        scheme, _, encoded = link.partition("://")
        assert scheme == "weasis"
        words = shlex.split(unquote(encoded))
        assert words[0] == "$dicom:rs", words
        options = dict(zip(words[1::2], words[2::2], strict=True))
        assert set(options) == {"--url", "-r", "-H"}, options
        name, _, value = options["-H"].partition(":")
        return cls(options["--url"], parse_qsl(options["-r"]), (name.strip(), value.strip()))

    @property
    def secret(self) -> str:
        return self.header[1].removeprefix("Bearer ")


@pytest.fixture
def site_name_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    """The site's name resolves to this machine, as DNS resolves it for the hospital's users."""
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        return real("127.0.0.1" if host == SITE_NAME else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


class FromAddress(HTTPAdapter):
    """Connections from another loopback address, as another machine's would come."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def client_of(stack: TLSStack, command: Command, address: str | None = None) -> DICOMwebClient:
    """A DICOMweb client that sends what the link says: its address, its header."""
    session = stack.client()
    session.headers[command.header[0]] = command.header[1]
    if address:
        session.mount("https://", FromAddress(address))
    return DICOMwebClient(command.url, session=session)


def read_as_weasis_does(client: DICOMwebClient, command: Command) -> dict[str, bytes]:
    """What Weasis's ``dicom:rs`` fetches: searches by the link's UIDs, then every instance."""
    series: list[tuple[str, str]] = []
    for key, uid in command.request:
        if key == "studyUID":
            found = client.search_for_studies(search_filters={"0020000D": uid})
            assert [study["0020000D"]["Value"][0] for study in found] == [uid]
            series += [(uid, item["0020000E"]["Value"][0]) for item in client.search_for_series(uid)]
        else:
            assert key == "seriesUID"
            found = client.search_for_series(search_filters={"0020000E": uid})
            series += [(item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]) for item in found]
    files = {}
    for study_uid, series_uid in series:
        for item in client.search_for_instances(study_uid, series_uid):
            sop = item["00080018"]["Value"][0]
            retrieved = client.retrieve_instance(
                study_uid, series_uid, sop, media_types=(("application/dicom", "*"),)
            )
            files[sop] = retrieved.buffer.getvalue()  # the part's bytes, as they came
    return files


def opened_files(stack: TLSStack, archive: Archive, level: str) -> dict[str, bytes]:
    where = {
        "patient": ("patients", archive.patient),
        "study": ("studies", archive.study_a),
        "series": ("series", archive.series_a1),
    }[level]
    return archive_files(stack, *where)


def expected_request(archive: Archive, level: str) -> set[tuple[str, str]]:
    uids = archive.uids
    return {
        "patient": {("studyUID", uids["a"]), ("studyUID", uids["b"])},
        "study": {("studyUID", uids["a"])},
        "series": {("seriesUID", uids["a1"])},
    }[level]


def status_of(call) -> int:
    with pytest.raises(HTTPError) as refused:
        call()
    return refused.value.response.status_code


def token_row(stack: TLSStack, secret: str) -> sa.Row:
    with Site(stack.data).engine.connect() as connection:
        token = credentials.find(connection, secret)
    assert token is not None
    return token.row


LEVELS = ["patient", "study", "series"]


@pytest.mark.parametrize("level", LEVELS)
def test_the_link_starts_weasis_on_the_public_dicomweb_address(
    launched: dict[str, str], tls_stack: TLSStack, archive: Archive, level: str
) -> None:
    command = Command.of(launched[level])
    assert command.url == f"https://{SITE_NAME}:{tls_stack.web_port}/dicom-web"
    assert set(command.request) == expected_request(archive, level)
    assert command.header[0] == "Authorization"
    assert re.fullmatch(r"Bearer [A-Za-z0-9_-]{43}", command.header[1])
    row = token_row(tls_stack, command.secret)
    assert (row.kind, row.scope, row.issued_by) == ("desktop", level, PHYSICIAN)
    # Minutes, not days.
    assert dt.timedelta(minutes=1) < row.expires_at - row.issued_at <= dt.timedelta(hours=1)


@pytest.mark.parametrize("level", LEVELS)
def test_a_client_sending_what_the_link_says_gets_every_instance_of_what_was_opened(
    launched: dict[str, str], tls_stack: TLSStack, archive: Archive, level: str, site_name_resolves: None
) -> None:
    command = Command.of(launched[level])
    fetched = read_as_weasis_does(client_of(tls_stack, command), command)
    stored = opened_files(tls_stack, archive, level)
    assert len(stored) == {"patient": 4, "study": 3, "series": 2}[level]
    assert fetched.keys() == stored.keys()
    assert all(fetched[sop] == stored[sop] for sop in stored), "not byte for byte the archive's"


@pytest.mark.parametrize("level", LEVELS)
def test_the_token_reads_nothing_else_and_writes_nothing(
    launched: dict[str, str], tls_stack: TLSStack, archive: Archive, level: str, site_name_resolves: None
) -> None:
    command = Command.of(launched[level])
    client = client_of(tls_stack, command)
    uids = archive.uids
    assert status_of(lambda: client.retrieve_study_metadata(uids["other"])) == 403
    assert status_of(lambda: client.retrieve_study(uids["other"])) == 403
    if level != "patient":
        assert status_of(lambda: client.retrieve_study_metadata(uids["b"])) == 403
    if level == "series":
        assert status_of(lambda: client.retrieve_study_metadata(uids["a"])) == 403
        assert status_of(lambda: client.retrieve_series_metadata(uids["a"], uids["a2"])) == 403
        assert status_of(lambda: client.search_for_series(uids["a"])) == 403
        found = client.search_for_instances(search_filters={"PatientID": archive.patient_id})
        assert {item["0020000E"]["Value"][0] for item in found} == {uids["a1"]}
    else:
        assert client.retrieve_study_metadata(uids["a"])
    # Searches, whatever they ask, answer with what was opened alone.
    found = {
        study["0020000D"]["Value"][0]
        for study in client.search_for_studies(search_filters={"PatientID": "*"})
    }
    assert found == {"patient": {uids["a"], uids["b"]}, "study": {uids["a"]}, "series": {uids["a"]}}[level]
    found = client.search_for_studies(search_filters={"StudyInstanceUID": uids["other"]})
    assert found == []
    # No writes of any kind.
    dataset = instance("CT_small.dcm", archive.patient_id, uids["a"], uids["a1"], "Study A")
    assert status_of(lambda: client.store_instances([dataset])) == 403
    assert status_of(lambda: client.store_instances([dataset], study_instance_uid=uids["a"])) == 403
    session = client_of(tls_stack, command)._session
    for method in ("PUT", "DELETE", "PATCH"):
        assert session.request(method, f"{command.url}/studies/{uids['a']}").status_code == 403, method
    assert (
        requests.get(
            f"{tls_stack.orthanc_url}/studies/{archive.study_a}", auth=tls_stack.orthanc_auth
        ).status_code
        == 200
    )


def launch_from_a_script(stack: TLSStack, level: str, orthanc_id: str) -> Command:
    """Press "Desktop viewer" as the page's script does (a POST with the page's CSRF token)."""
    session = stack.sign_in()
    home = session.get(f"{stack.url}/")
    answer = session.post(
        f"{stack.url}/desktop/{level}/{orthanc_id}",
        headers={"X-CSRFToken": csrf_token(home.text), "Accept": "application/json"},
    )
    assert answer.status_code == 200, answer.text
    return Command.of(answer.json()["link"])


def test_the_token_ends_at_its_expiry(
    tls_stack: TLSStack, archive: Archive, site_name_resolves: None
) -> None:
    command = launch_from_a_script(tls_stack, "studies", archive.study_a)
    client = client_of(tls_stack, command)
    assert client.retrieve_study_metadata(archive.uids["a"])
    with Site(tls_stack.data).engine.begin() as connection:
        connection.execute(
            db.viewer_tokens.update()
            .where(db.viewer_tokens.c.secret_hash == credentials.secret_hash(command.secret))
            .values(expires_at=db.utcnow() - dt.timedelta(seconds=1))
        )
    assert status_of(lambda: client.retrieve_study_metadata(archive.uids["a"])) == 401
    assert status_of(lambda: client.search_for_studies()) == 401
    frame = lambda: client.retrieve_instance_frames(  # noqa: E731
        archive.uids["a"], archive.uids["a1"], next(iter(opened_files(tls_stack, archive, "series"))), [1]
    )
    assert status_of(frame) == 401


def test_the_token_cannot_become_a_session_nor_open_other_pages(
    tls_stack: TLSStack, archive: Archive
) -> None:
    command = launch_from_a_script(tls_stack, "studies", archive.study_a)
    bearer = {"Authorization": command.header[1]}
    client = tls_stack.client()
    home = client.get(f"{tls_stack.url}/", headers=bearer)
    assert "Signed in as" not in home.text and 'href="/login"' in home.text
    pages = [
        "/query",
        f"/query/studies/{archive.study_a}/series",
        f"/query/studies/{archive.study_a}/archive",
        f"/query/studies/{archive.study_a}/zip",
        f"/desktop/studies/{archive.study_a}/access",
        "/admin/tokens",
        "/upload",
        "/internal/gate/dicom-web",
        f"/token?{command.secret}",
        f"/token/download?{command.secret}",
    ]
    for path in pages:
        answer = client.get(f"{tls_stack.url}{path}", headers=bearer, allow_redirects=False)
        assert answer.status_code in (302, 401, 404), (path, answer.status_code)
        assert "Signed in as" not in answer.text and "DICM" not in answer.text[:200], path
    # Nor can it make another token, or sign in.
    made = client.post(
        f"{tls_stack.url}/desktop/studies/{archive.study_a}", headers=bearer, allow_redirects=False
    )
    assert made.status_code in (302, 400, 401), made.status_code
    # Whatever cookies these answers left, they sign nobody in.
    after = client.get(f"{tls_stack.url}/query", allow_redirects=False)
    assert after.status_code == 302 and "/login" in after.headers["Location"]


def test_path_tricks_with_the_token_are_refused(tls_stack: TLSStack, archive: Archive) -> None:
    """The gate's probe set (test_quick_gate's requests, test_tokens' path tricks) with a token."""
    command = launch_from_a_script(tls_stack, "series", archive.series_a1)
    session = tls_stack.client()
    session.headers["Authorization"] = command.header[1]
    uids = archive.uids
    probes = [
        (method, uri.replace("1.2.840.99.1", uids["a"]).replace("1.2.840.99.2", uids["other"]))
        for method, uri in REQUESTS
    ]
    probes += [
        ("GET", f"/dicom-web/studies/{uids['other']}/../{uids['a']}/metadata"),
        ("GET", f"/dicom-web/studies/{uids['a']}/../../studies/{uids['other']}/metadata"),
        ("GET", f"/dicom-web/studies/{uids['a']}%2F..%2F{uids['other']}/metadata"),
        ("GET", f"/dicom-web//studies/{uids['other']}/metadata"),
        ("GET", f"/dicom-web/studies/{uids['other']}/metadata/"),
        ("GET", f"/DICOM-WEB/studies/{uids['other']}/metadata"),
        ("GET", f"/dicom-web/Studies/{uids['other']}/metadata"),
        ("GET", f"/dicom-web/studies/{uids['a']}/series/{uids['a1']}/../{uids['a2']}/metadata"),
        ("GET", f"/dicom-web/studies/{uids['a']}/series/{uids['a1']}%2F..%2F{uids['a2']}/metadata"),
        ("GET", f"/dicom-web/studies/{uids['a']}/series/{uids['a2']}/metadata"),
        ("GET", f"/wado?requestType=WADO&studyUID={uids['a']}&seriesUID={uids['a2']}"),
        ("GET", "/internal/gate/dicom-web"),
    ]
    for method, path in probes:
        url = tls_stack.url + path
        # Sent as typed: requests would otherwise tidy up some of these paths before sending.
        prepared = session.prepare_request(requests.Request(method, url))
        prepared.url = url
        answer = session.send(prepared)
        # Refused, or (a search) answered with the token's own series' study alone.
        assert answer.status_code in (400, 403, 404) or (method, path) == ("GET", "/dicom-web/studies"), (
            method,
            path,
            answer.status_code,
        )
        for elsewhere in (uids["other"], uids["a2"], uids["b"]):
            assert elsewhere not in answer.text, (method, path)


def test_activity_names_the_token_by_its_public_id_never_its_secret(
    tls_stack: TLSStack, archive: Archive, site_name_resolves: None
) -> None:
    command = launch_from_a_script(tls_stack, "studies", archive.study_b)
    row = token_row(tls_stack, command.secret)
    read_as_weasis_does(client_of(tls_stack, command), command)
    elsewhere = client_of(tls_stack, command, address="127.0.0.7")
    assert elsewhere.retrieve_study_metadata(archive.uids["b"])
    assert status_of(lambda: elsewhere.retrieve_study_metadata(archive.uids["a"])) == 403
    engine = Site(tls_stack.data).engine
    with engine.connect() as connection:
        rows = connection.execute(sa.select(db.activity).where(db.activity.c.token_id == row.public_id)).all()
        made = connection.execute(
            sa.select(db.activity)
            .where(db.activity.c.action == "desktop-viewer-opened")
            .order_by(db.activity.c.id.desc())
        ).first()
        dump = "\n".join(str(tuple(item)) for item in connection.execute(sa.select(db.activity)))
    used = [item for item in rows if item.action == "viewer-token-used"]
    # One row per address (the first use from each), naming who made it and what it reads.
    assert sorted(item.client_address for item in used) == ["127.0.0.1", "127.0.0.7"]
    assert all(item.username == "admin" and item.study == archive.uids["b"] for item in used)
    assert any(item.action == "dicomweb-denied" and item.client_address == "127.0.0.7" for item in rows)
    assert row.public_id in made.detail and archive.uids["b"] in made.detail
    assert command.secret not in dump
    assert credentials.secret_hash(command.secret) not in dump
    logs = "\n".join(path.read_text(errors="replace") for path in (tls_stack.data / "logs").glob("*.log"))
    assert command.secret not in logs
    with engine.connect() as connection:
        stored = "\n".join(str(tuple(item)) for item in connection.execute(sa.select(db.viewer_tokens)))
    assert command.secret not in stored  # only its hash is kept


def read_study(client: DICOMwebClient, study_uid: str) -> dict[str, bytes]:
    return {
        item.SOPInstanceUID: item.buffer.getvalue()
        for item in client.retrieve_study(study_uid, media_types=(("application/dicom", "*"),))
    }


def test_another_viewer_reads_the_study_with_its_token_until_revoked(
    browser: Browser, tls_stack: TLSStack, archive: Archive, site_name_resolves: None
) -> None:
    page = physician_page(browser, tls_stack)
    page.goto(f"{tls_stack.browser_url}/query/patients/{archive.patient}/studies")
    with page.expect_navigation():
        page.locator("tbody tr:has-text('Study A')").get_by_role(
            "link", name="Access for another viewer"
        ).click()
    page.fill("#note", "Second opinion, Dr. Ross")
    page.select_option("#days", "7")
    with page.expect_navigation():
        page.click("main button[type=submit]")
    address = page.inner_text(".made-token .dicomweb-url")
    secret = page.inner_text(".made-token .viewer-token")
    assert address == f"https://{SITE_NAME}:{tls_stack.web_port}/dicom-web"
    row = token_row(tls_stack, secret)
    assert (row.kind, row.scope, row.note) == ("shared", "study", "Second opinion, Dr. Ross")
    assert dt.timedelta(days=6) < row.expires_at - row.issued_at <= dt.timedelta(days=7)
    # The token is shown once: the page, loaded again, lists it but shows no secret.
    page.goto(page.url)
    assert secret not in page.content() and row.public_id in page.content()

    viewer = DICOMwebClient(
        address, session=tls_stack.client(), headers={"Authorization": f"Bearer {secret}"}
    )
    assert read_study(viewer, archive.uids["a"]) == archive_files(tls_stack, "studies", archive.study_a)
    assert status_of(lambda: viewer.retrieve_study(archive.uids["b"])) == 403
    assert status_of(lambda: viewer.retrieve_study(archive.uids["other"])) == 403
    assert {s["0020000D"]["Value"][0] for s in viewer.search_for_studies()} == {archive.uids["a"]}

    # The admin revokes it among the study links, with the button there.
    admin = browser.new_context().new_page()
    sign_in(admin, tls_stack, "admin", ADMIN_PASSWORD)
    admin.goto(f"{tls_stack.browser_url}/admin/tokens")
    token_line = admin.locator(f".viewer-tokens tr:has-text('{row.public_id}')")
    assert "Second opinion, Dr. Ross" in token_line.inner_text() and "valid" in token_line.inner_text()
    with admin.expect_navigation():
        token_line.get_by_role("button", name="Revoke").click()
    assert f"Revoked {row.public_id}" in admin.inner_text("main")
    assert "revoked" in admin.locator(f".viewer-tokens tr:has-text('{row.public_id}')").inner_text()
    assert status_of(lambda: viewer.retrieve_study_metadata(archive.uids["a"])) == 401
    with Site(tls_stack.data).engine.connect() as connection:
        actions = {
            item.action
            for item in connection.execute(
                sa.select(db.activity).where(db.activity.c.detail.contains(row.public_id))
            )
        }
    assert {"viewer-token-made", "viewer-token-revoked"} <= actions
    page.context.close()
    admin.context.close()


def test_a_user_revokes_their_own_tokens_only(tls_stack: TLSStack, archive: Archive) -> None:
    with Site(tls_stack.data).engine.begin() as connection:
        if not accounts.find_by_username(connection, PHYSICIAN):
            accounts.create_user(connection, PHYSICIAN, PASSWORD)
    mine = launch_from_a_script(tls_stack, "studies", archive.study_a)  # made by the admin
    physician = tls_stack.sign_in(PHYSICIAN, PASSWORD)
    home = physician.get(f"{tls_stack.url}/")
    refused = physician.post(
        f"{tls_stack.url}/desktop/tokens/{token_row(tls_stack, mine.secret).id}/revoke",
        data={"csrf_token": csrf_token(home.text)},
    )
    assert refused.status_code == 403
    assert token_row(tls_stack, mine.secret).revoked_at is None


def test_a_patient_opens_their_study_in_weasis_after_the_birth_date_check(
    browser: Browser, tls_stack: TLSStack, archive: Archive, site_name_resolves: None
) -> None:
    doctor = tls_stack.sign_in()
    home = doctor.get(f"{tls_stack.url}/")
    made = doctor.post(
        f"{tls_stack.url}/tokens/studies/{archive.study_b}/link",
        headers={"X-CSRFToken": csrf_token(home.text)},
    ).json()
    token_query = made["link"].split("?", 1)[1]
    tls_stack.pacs("config", "set", "token_identity_check", "yes")
    try:
        # Before the birth date is given, the page makes no token.
        script = tls_stack.client()
        question = script.get(f"{tls_stack.url}/token?{token_query}")
        asked = script.post(
            f"{tls_stack.url}/token/desktop-viewer?{token_query}",
            data={"csrf_token": csrf_token(question.text)},
            headers={"Accept": "application/json"},
        )
        assert asked.status_code == 403 and "link" not in asked.json()

        page = browser.new_context().new_page()
        page.goto(f"{tls_stack.browser_url}/token?{token_query}")
        page.fill("#birth_date", "1964-02-29")
        with page.expect_navigation():
            page.click("main button[type=submit]")
        card = page.locator(".card:has-text('Open in the desktop viewer')")
        assert (
            card.get_by_role("link", name="download Weasis")
            .get_attribute("href")
            .startswith("https://weasis.org/")
        )
        with page.expect_request(lambda request: request.url.startswith("weasis://")) as opened:
            card.get_by_role("button", name="Open in Weasis").click()
        command = Command.of(opened.value.url)
        assert command.url == f"https://{SITE_NAME}:{tls_stack.web_port}/dicom-web"
        assert command.request == [("studyUID", archive.uids["b"])]
        client = client_of(tls_stack, command)
        assert read_as_weasis_does(client, command) == archive_files(tls_stack, "studies", archive.study_b)
        assert status_of(lambda: client.retrieve_study_metadata(archive.uids["a"])) == 403
        row = token_row(tls_stack, command.secret)
        assert row.study_token_id is not None and row.issued_by == ""
        page.context.close()
    finally:
        tls_stack.pacs("config", "set", "token_identity_check", "no")
    # Revoking the patient's link ends the desktop viewer's token with it, at once.
    with Site(tls_stack.data).engine.begin() as connection:
        connection.execute(
            db.study_tokens.update()
            .where(db.study_tokens.c.id == row.study_token_id)
            .values(revoked_at=db.utcnow())
        )
    assert status_of(lambda: client.retrieve_study_metadata(archive.uids["b"])) == 401


def test_the_landing_page_lists_both_free_applications(tls_stack: TLSStack) -> None:
    page = tls_stack.client().get(f"{tls_stack.url}/").text
    section = page[page.index("Free applications") :]
    assert 'href="/downloader/pacs_download.py"' in section
    assert 'href="https://weasis.org/en/getting-started/download-dicom-viewer/"' in section
    assert "Weasis desktop viewer" in section


def test_bad_requests_get_clear_answers_and_make_no_token(tls_stack: TLSStack, archive: Archive) -> None:
    session = tls_stack.sign_in()
    token = csrf_token(session.get(f"{tls_stack.url}/").text)
    json_headers = {"X-CSRFToken": token, "Accept": "application/json"}
    with Site(tls_stack.data).engine.connect() as connection:
        before = connection.execute(sa.select(sa.func.count()).select_from(db.viewer_tokens)).scalar_one()
    for path in (
        f"/desktop/instances/{archive.study_a}",  # no such level
        "/desktop/studies/not-an-id",
        "/desktop/studies/00000000-00000000-00000000-00000000-00000000",  # not in the archive
    ):
        answer = session.post(f"{tls_stack.url}{path}", headers=json_headers)
        assert answer.status_code == 404 and answer.json()["error"] == "Not found", path
    forged = session.post(
        f"{tls_stack.url}/desktop/studies/{archive.study_a}", headers={"Accept": "application/json"}
    )
    assert forged.status_code == 400 and "expired or did not come from this site" in forged.json()["message"]
    page = session.get(f"{tls_stack.url}/desktop/studies/{archive.study_a}/access")
    wrong = session.post(
        f"{tls_stack.url}/desktop/studies/{archive.study_a}/access",
        data={"csrf_token": csrf_token(page.text), "days": "365", "note": "x" * 201},
    )
    assert wrong.status_code == 400
    assert "Not a valid choice" in wrong.text and "Field cannot be longer than 200 characters" in wrong.text
    with Site(tls_stack.data).engine.connect() as connection:
        after = connection.execute(sa.select(sa.func.count()).select_from(db.viewer_tokens)).scalar_one()
    assert after == before
    logged = (tls_stack.data / "logs" / "control.log").read_text(errors="replace")
    assert "Traceback" not in logged
