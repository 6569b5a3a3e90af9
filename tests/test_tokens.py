"""Study tokens, the patient's page and the DICOMweb gate, on the real stack.

DICOMweb is spoken by a real client (dicomweb-client) through Caddy, with a patient's study grant
or a signed-in user's session, as the OHIF viewer would.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
import sqlalchemy as sa
from dicomweb_client.api import DICOMwebClient
from requests import HTTPError

from control import db
from control.site import Site

from conftest import ADMIN_PASSWORD, Stack, c_store, csrf_token, fresh_study, orthanc_id

pytestmark = pytest.mark.stack


@dataclass(frozen=True)
class StoredStudy:
    study_uid: str
    series_uid: str
    instance_uid: str
    orthanc_id: str
    patient_id: str
    birth_date: str


def store_study(stack: Stack, sample: str, **changes: str) -> StoredStudy:
    dataset = fresh_study(sample, **changes)
    dataset.PatientBirthDate = "19700215"
    assert c_store(stack, dataset) == 0
    return StoredStudy(
        dataset.StudyInstanceUID,
        dataset.SeriesInstanceUID,
        dataset.SOPInstanceUID,
        orthanc_id(stack, dataset.StudyInstanceUID),
        dataset.PatientID,
        dataset.PatientBirthDate,
    )


def make_link(session: requests.Session, stack: Stack, study: StoredStudy) -> dict:
    home = session.get(f"{stack.url}/")
    response = session.post(
        f"{stack.url}/tokens/studies/{study.orthanc_id}/link", headers={"X-CSRFToken": csrf_token(home.text)}
    )
    assert response.status_code == 200, response.text
    return response.json()


def local(stack: Stack, link: str) -> str:
    """The same link, aimed at this test stack (links carry the site's public name)."""
    return f"{stack.url}/token?{link.split('?', 1)[1]}"


def instance_url(stack: Stack, study: StoredStudy) -> str:
    return (
        f"{stack.url}/dicom-web/studies/{study.study_uid}/series/{study.series_uid}"
        f"/instances/{study.instance_uid}"
    )


def dicomweb(stack: Stack, session: requests.Session) -> DICOMwebClient:
    return DICOMwebClient(f"{stack.url}/dicom-web", session=session)


@pytest.fixture(scope="module")
def doctor(stack: Stack) -> requests.Session:
    return stack.sign_in("admin", ADMIN_PASSWORD)


@pytest.fixture(scope="module")
def ct(stack: Stack) -> StoredStudy:
    return store_study(stack, "CT_small.dcm")


@pytest.fixture(scope="module")
def mr(stack: Stack) -> StoredStudy:
    return store_study(stack, "MR_small.dcm")


@pytest.fixture
def patient(stack: Stack, doctor: requests.Session, ct: StoredStudy) -> Iterator[requests.Session]:
    """A patient's browser that opened the CT's link and then the viewer."""
    link = make_link(doctor, stack, ct)["link"]
    browser = requests.Session()
    page = browser.get(local(stack, link))
    assert page.status_code == 200
    viewer = browser.get(f"{stack.url}/token/viewer?{link.split('?', 1)[1]}", allow_redirects=False)
    assert viewer.status_code == 302
    assert viewer.headers["Location"] == f"/viewer?StudyInstanceUIDs={ct.study_uid}"
    assert "pacs_grant" in browser.cookies
    yield browser


def test_a_study_link_is_fully_qualified_and_stable(
    stack: Stack, doctor: requests.Session, ct: StoredStudy
) -> None:
    stack.pacs("config", "set", "web_server_name", "pacs.example.org")
    try:
        first = make_link(doctor, stack, ct)
        second = make_link(doctor, stack, ct)
    finally:
        stack.pacs("config", "set", "web_server_name", "")
    assert re.fullmatch(
        rf"http://pacs\.example\.org:{stack.web_port}/token\?[A-Za-z0-9]{{64}}", first["link"]
    )
    assert second["link"] == first["link"]
    assert second["new"] is False
    assert dt.date.fromisoformat(first["accessible_until"]) == dt.date.today() + dt.timedelta(days=60)


def test_the_shell_prints_the_same_link(stack: Stack, doctor: requests.Session, ct: StoredStudy) -> None:
    from_page = make_link(doctor, stack, ct)["link"]
    for reference in (ct.study_uid, ct.orthanc_id):
        printed = stack.pacs("token", reference)
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout.strip() == from_page
    missing = stack.pacs("token", "1.2.3.4.5.6.7.8.9")
    assert missing.returncode == 1 and "no study" in missing.stderr


def test_the_patient_page_shows_the_study_and_its_actions(
    stack: Stack, doctor: requests.Session, ct: StoredStudy
) -> None:
    link = make_link(doctor, stack, ct)["link"]
    page = requests.get(local(stack, link))
    assert page.status_code == 200
    assert stack.institution in page.text
    assert "CT" in page.text and "Study date/time" in page.text
    query = link.split("?", 1)[1]
    for action in ("/token/viewer", "/token/download", "/token/handout"):
        assert f'href="{action}?{query}"' in page.text
    assert "Sign in" not in page.text  # a patient has no account to sign in with

    handout = requests.get(f"{stack.url}/token/handout?{query}")
    assert link in handout.text
    assert "<svg" in handout.text


def test_made_up_and_revoked_links_get_the_same_page(
    stack: Stack, doctor: requests.Session, mr: StoredStudy
) -> None:
    link = make_link(doctor, stack, mr)["link"]
    with Site(stack.data).engine.begin() as connection:
        row = connection.execute(
            sa.select(db.study_tokens.c.id).where(db.study_tokens.c.study_uid == mr.study_uid)
        ).first()
    page = doctor.get(f"{stack.url}/admin/tokens/{row.id}")
    doctor.post(
        f"{stack.url}/admin/tokens/{row.id}",
        data={"csrf_token": csrf_token(page.text), "revoke": "Revoke this link"},
    )

    revoked = requests.get(local(stack, link))
    made_up = requests.get(f"{stack.url}/token?{'A' * 64}")
    garbage = requests.get(f"{stack.url}/token?<script>")
    assert revoked.status_code == made_up.status_code == garbage.status_code == 404
    assert revoked.text == made_up.text == garbage.text
    assert "This link is not valid" in revoked.text

    renewed = make_link(doctor, stack, mr)
    assert renewed["link"] != link and renewed["new"] is True
    assert requests.get(local(stack, renewed["link"])).status_code == 200


def test_an_old_study_link_has_expired(stack: Stack, doctor: requests.Session) -> None:
    old = store_study(stack, "CT_small.dcm", study_date="20200101")
    link = make_link(doctor, stack, old)
    assert link["accessible_until"] == "2020-03-01"
    page = requests.get(local(stack, link["link"]))
    assert page.status_code == 410
    assert "This link has expired" in page.text and stack.institution in page.text


def test_a_future_dated_study_counts_from_the_day_of_issue(stack: Stack, doctor: requests.Session) -> None:
    future = store_study(stack, "CT_small.dcm", study_date="29990101")
    link = make_link(doctor, stack, future)
    assert dt.date.fromisoformat(link["accessible_until"]) == dt.date.today() + dt.timedelta(days=60)


def test_a_grant_reads_its_own_study_and_nothing_else(
    stack: Stack, patient: requests.Session, ct: StoredStudy, mr: StoredStudy
) -> None:
    client = dicomweb(stack, patient)
    metadata = client.retrieve_study_metadata(ct.study_uid)
    assert metadata[0]["0020000D"]["Value"] == [ct.study_uid]
    frames = client.retrieve_instance_frames(
        ct.study_uid,
        ct.series_uid,
        ct.instance_uid,
        frame_numbers=[1],
        media_types=(("application/octet-stream", "*"),),
    )
    assert len(frames[0]) == 128 * 128 * 2  # CT_small: 128 x 128, 16 bits

    for search in ({}, {"PatientID": "*"}, {"StudyInstanceUID": mr.study_uid}):
        found = client.search_for_studies(search_filters=search)
        assert {study["0020000D"]["Value"][0] for study in found} <= {ct.study_uid}, search
    assert [s["0020000D"]["Value"][0] for s in client.search_for_studies()] == [ct.study_uid]
    assert {s["0020000D"]["Value"][0] for s in client.search_for_series()} == {ct.study_uid}

    with pytest.raises(HTTPError) as refused:
        client.retrieve_study_metadata(mr.study_uid)
    assert refused.value.response.status_code == 403
    with pytest.raises(HTTPError) as refused:
        client.retrieve_instance_frames(mr.study_uid, mr.series_uid, mr.instance_uid, frame_numbers=[1])
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize(
    "path",
    [
        "/dicom-web/studies/{mr}/../{ct}/metadata",
        "/dicom-web/studies/{ct}/../../studies/{mr}/metadata",
        "/dicom-web/studies/{ct}%2F..%2F{mr}/metadata",
        "/dicom-web//studies/{mr}/metadata",
        "/dicom-web/studies/{mr}/metadata/",
        "/DICOM-WEB/studies/{mr}/metadata",
        "/dicom-web/Studies/{mr}/metadata",
        "/internal/gate/dicom-web",
    ],
)
def test_path_tricks_are_refused(
    stack: Stack, patient: requests.Session, ct: StoredStudy, mr: StoredStudy, path: str
) -> None:
    url = stack.url + path.format(ct=ct.study_uid, mr=mr.study_uid)
    # Sent as typed: requests would otherwise tidy up some of these paths before sending.
    prepared = patient.prepare_request(requests.Request("GET", url))
    prepared.url = url
    response = patient.send(prepared)
    assert response.status_code in (403, 404), response.status_code
    assert mr.study_uid not in response.text


def test_a_grant_cannot_write_or_delete(stack: Stack, patient: requests.Session, ct: StoredStudy) -> None:
    for method in ("POST", "PUT", "DELETE"):
        response = patient.request(method, f"{stack.url}/dicom-web/studies/{ct.study_uid}")
        assert response.status_code == 403, method
    stow = patient.post(
        f"{stack.url}/dicom-web/studies",
        headers={"Content-Type": 'multipart/related; type="application/dicom"'},
        data=b"--x--",
    )
    assert stow.status_code == 403


def test_revoking_ends_an_open_grant_at_once(stack: Stack, doctor: requests.Session) -> None:
    study = store_study(stack, "MR_small.dcm")
    link = make_link(doctor, stack, study)["link"]
    browser = requests.Session()
    browser.get(f"{stack.url}/token/viewer?{link.split('?', 1)[1]}")
    client = dicomweb(stack, browser)
    assert client.retrieve_study_metadata(study.study_uid)
    with Site(stack.data).engine.begin() as connection:
        connection.execute(
            db.study_tokens.update()
            .where(db.study_tokens.c.study_uid == study.study_uid)
            .values(revoked_at=db.utcnow())
        )
    with pytest.raises(HTTPError) as refused:
        client.retrieve_study_metadata(study.study_uid)
    assert refused.value.response.status_code == 401  # the grant is worth nothing now


def test_signing_out_ends_the_viewer_at_once(stack: Stack, ct: StoredStudy) -> None:
    browser = stack.sign_in("admin", ADMIN_PASSWORD)
    instance = instance_url(stack, ct)
    assert browser.get(f"{instance}/metadata").status_code == 200
    cookies = browser.cookies.copy()
    home = browser.get(f"{stack.url}/")
    assert browser.post(f"{stack.url}/logout", data={"csrf_token": csrf_token(home.text)}).status_code == 200
    replayed = requests.get(f"{instance}/metadata", cookies=cookies)
    assert replayed.status_code == 401


def test_a_user_who_only_looks_at_images_stays_signed_in(stack: Stack, ct: StoredStudy) -> None:
    """Frames read by the viewer count as activity, so the idle timeout does not end the session."""
    browser = stack.sign_in("admin", ADMIN_PASSWORD)
    engine = Site(stack.data).engine
    newest = sa.select(sa.func.max(db.web_sessions.c.created_at)).scalar_subquery()
    with engine.begin() as connection:
        connection.execute(
            db.web_sessions.update()
            .where(db.web_sessions.c.created_at == newest)
            .values(last_seen_at=db.utcnow() - dt.timedelta(minutes=25))  # the idle limit is 30
        )
    instance = instance_url(stack, ct)
    for _ in range(3):
        assert browser.get(f"{instance}/metadata").status_code == 200
    with engine.begin() as connection:
        seen = connection.execute(
            sa.select(db.web_sessions.c.last_seen_at).where(db.web_sessions.c.created_at == newest)
        ).scalar_one()
        connection.execute(
            db.web_sessions.update()
            .where(db.web_sessions.c.created_at == newest)
            .values(last_seen_at=seen - dt.timedelta(minutes=10))
        )
    # 35 minutes after the last page, but 10 after the last image: still signed in.
    page = browser.get(f"{stack.url}/query")
    assert (page.status_code, page.url) == (200, f"{stack.url}/query")
    assert "Your session has ended" not in page.text


def test_no_session_and_no_grant_gets_401(stack: Stack, ct: StoredStudy) -> None:
    assert requests.get(f"{stack.url}/dicom-web/studies/{ct.study_uid}/metadata").status_code == 401
    assert requests.get(f"{stack.url}/dicom-web/studies").status_code == 401
    forged = requests.get(
        f"{stack.url}/dicom-web/studies/{ct.study_uid}/metadata", cookies={"pacs_grant": "forged.value.x"}
    )
    assert forged.status_code == 401


def test_signed_in_users_read_everything_and_store_only_with_the_right(
    stack: Stack, doctor: requests.Session, ct: StoredStudy, mr: StoredStudy
) -> None:
    client = dicomweb(stack, doctor)
    # (By patient ID: searches answer a page, and the shared stack holds many studies.)
    found = {
        study["0020000D"]["Value"][0]
        for patient_id in (ct.patient_id, mr.patient_id)
        for study in client.search_for_studies(search_filters={"PatientID": patient_id})
    }
    assert {ct.study_uid, mr.study_uid} <= found
    assert client.retrieve_study_metadata(mr.study_uid)
    # Bulk-data URIs in the answers point back through the portal, not at Orthanc. (Read raw:
    # dicomweb-client rewrites these URIs as it parses them, dropping the port.)
    raw = doctor.get(
        f"{stack.url}/dicom-web/studies/{ct.study_uid}/series/{ct.series_uid}/metadata",
        headers={"Accept": "application/dicom+json"},
    ).json()
    bulk = [
        value["BulkDataURI"]
        for value in raw[0].values()
        if isinstance(value, dict) and "BulkDataURI" in value
    ]
    assert bulk and all(uri.startswith(f"http://127.0.0.1:{stack.web_port}/dicom-web/") for uri in bulk)

    stow = doctor.post(
        f"{stack.url}/dicom-web/studies",
        headers={"Content-Type": 'multipart/related; type="application/dicom"'},
        data=b"--x--",
    )
    assert stow.status_code == 403  # the admin of the test stack has no upload right


def test_the_identity_check_asks_for_the_birth_date_and_locks_after_wrong_answers(
    stack: Stack, doctor: requests.Session
) -> None:
    study = store_study(stack, "CT_small.dcm")
    link = local(stack, make_link(doctor, stack, study)["link"])
    stack.pacs("config", "set", "token_identity_check", "yes")
    try:
        browser = requests.Session()
        question = browser.get(link)
        assert "Confirm who you are" in question.text and "Study date/time" not in question.text
        token = csrf_token(question.text)
        right = browser.post(link, data={"birth_date": "1970-02-15", "csrf_token": token})
        assert "Study date/time" in right.text

        stranger = requests.Session()
        answers = []
        for _attempt in range(5):
            page = stranger.get(link)
            answers.append(
                stranger.post(link, data={"birth_date": "1970-01-01", "csrf_token": csrf_token(page.text)})
            )
        assert [answer.status_code for answer in answers] == [403, 403, 403, 403, 429]
        answer = answers[-1]
        assert "locked for now" in answer.text
        assert "locked for now" in requests.get(link).text
        # The downloader asks for JSON, and is told the same.
        script = requests.get(link, headers={"Accept": "application/json"})
        assert script.status_code == 429 and "locked for now" in script.json()["message"]
    finally:
        stack.pacs("config", "set", "token_identity_check", "no")


def test_token_use_is_logged_by_public_id_never_by_token(
    stack: Stack, doctor: requests.Session, ct: StoredStudy
) -> None:
    made = make_link(doctor, stack, ct)
    token = made["link"].split("?", 1)[1]
    requests.get(local(stack, made["link"]))
    with Site(stack.data).engine.connect() as connection:
        rows = connection.execute(
            sa.select(db.activity).where(db.activity.c.token_id == made["token_id"])
        ).all()
        dump = "\n".join(str(tuple(row)) for row in connection.execute(sa.select(db.activity)))
    assert {"token-made", "token-copied", "token-used"} & {row.action for row in rows}
    assert any(row.action == "token-used" and row.study == ct.study_uid for row in rows)
    assert token not in dump
    logs = "\n".join(path.read_text(errors="replace") for path in (stack.data / "logs").glob("*.log"))
    assert token not in logs
    admin_list = doctor.get(f"{stack.url}/admin/activity", params={"list": "tokens"}).text
    assert made["token_id"] in admin_list


def test_too_many_bad_links_from_one_address_are_refused_for_a_while(stack: Stack) -> None:
    engine = Site(stack.data).engine
    try:
        statuses = [requests.get(f"{stack.url}/token?{n:064d}").status_code for n in range(22)]
        assert statuses[0] == 404
        assert statuses[-1] == 429
        assert "Too many attempts" in requests.get(f"{stack.url}/token?{'B' * 64}").text
    finally:
        # Move the refusals out of the window so the other tests on this stack are not blocked.
        with engine.begin() as connection:
            for row in connection.execute(
                sa.select(db.activity.c.id, db.activity.c.at).where(db.activity.c.action == "token-refused")
            ).all():
                earlier = row.at - dt.timedelta(hours=1)
                connection.execute(db.activity.update().where(db.activity.c.id == row.id).values(at=earlier))
