"""The gate's quick answer never lets through what the full gate would refuse.

``control.dicomweb.fast`` answers Caddy's question about most of a viewer's requests before Flask.
Here both answer the same questions, in process on a database of their own: every visitor (signed
in, with or without the upload right, ended or idle sessions, grants valid, revoked, expired or
forged, nothing at all) asks for every kind of DICOMweb request, and wherever the quick path says
yes, the full gate must say yes too. The plain cases must get the quick yes, or the viewer is slow.
"""

from __future__ import annotations

import datetime as dt
import itertools
import socket
from collections.abc import Iterator

import pytest
from werkzeug.test import Client, EnvironBuilder

from control import accounts, db
from control.app import create_app
from control.auth import sessions
from control.dicomweb.fast import GATE_PATH
from control.site import Site
from control.tokens import grants, store

pytestmark = pytest.mark.inprocess

OWN, OTHER = "1.2.840.99.1", "1.2.840.99.2"
REVOKED, EXPIRED = "1.2.840.99.3", "1.2.840.99.4"
# Two patients' studies under one UID; and a UID whose study of the link is gone, another
# patient's study now holding it.
SHARED, REPLACED = "1.2.840.99.5", "1.2.840.99.6"
PASSWORD = "a long enough password"

REQUESTS = [
    ("GET", f"/dicom-web/studies/{OWN}/series/1.2/instances/1.3/frames/1"),
    ("GET", f"/dicom-web/studies/{OWN}/metadata"),
    ("HEAD", f"/dicom-web/studies/{OWN}/series/1.2/instances/1.3"),
    ("GET", f"/dicom-web/studies/{OTHER}/series/1.2/instances/1.3/frames/1"),
    ("GET", f"/dicom-web/studies/{REVOKED}/metadata"),
    ("GET", f"/dicom-web/studies/{EXPIRED}/metadata"),
    ("GET", f"/dicom-web/studies/{OWN}/series/../../{OTHER}/metadata"),
    ("GET", f"/dicom-web/studies/{OWN}%2Fmetadata"),
    ("GET", "/dicom-web/studies"),
    ("GET", f"/wado?requestType=WADO&studyUID={OWN}&seriesUID=1.2&objectUID=1.3"),
    ("POST", "/dicom-web/studies"),
    ("DELETE", f"/dicom-web/studies/{OWN}"),
    ("GET", f"/dicom-web/studies/{SHARED}/series"),
    ("GET", f"/dicom-web/studies/{REPLACED}/series/1.2/metadata"),
    ("GET", f"/wado?requestType=WADO&studyUID={SHARED}&seriesUID=1.2&objectUID=1.3"),
    ("GET", f"/dicom-web/studies/{OWN}/metadata?_method=DELETE"),
    ("GET", f"/dicom-web/studies/{OWN}/metadata?%5Fmethod=DELETE"),
]
# Which archive studies hold each UID: the gate asks Orthanc; this app's Orthanc is not there.
HOLDERS = {
    OWN: ["o-" + OWN],
    OTHER: ["o-" + OTHER],
    REVOKED: ["o-" + REVOKED],
    EXPIRED: ["o-" + EXPIRED],
    SHARED: ["o-" + SHARED, "o-of-another-patient"],
    REPLACED: ["o-of-another-patient"],
}


def facts(study_uid: str, study_date: str) -> store.StudyFacts:
    return store.StudyFacts(study_uid, "o-" + study_uid, "Doe^Jane", "P1", "", study_date)


@pytest.fixture(scope="module")
def archive_port() -> Iterator[int]:
    """A port where no archive answers, whatever else runs on this machine: bound here, never
    listened on, so that connecting is refused at once for as long as the tests run."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


@pytest.fixture(scope="module")
def portal(tmp_path_factory, archive_port: int):
    """The app on a fresh database, and the cookies of every kind of visitor."""
    data = tmp_path_factory.mktemp("quick-gate")
    db.migrate(Site(data).engine)
    with Site(data).engine.begin() as connection:
        db.put_settings(connection, {"orthanc_http_port": archive_port})
    app = create_app({"DATA_DIR": data})
    app.extensions["study_holders"] = lambda study_uid: HOLDERS.get(study_uid, [])
    site = app.extensions["site"]
    now = db.utcnow()
    today = now.strftime("%Y%m%d")
    with site.engine.begin() as connection:
        reader = accounts.create_user(connection, "reader", PASSWORD)
        uploader = accounts.create_user(connection, "uploader", PASSWORD, can_upload=True)
        live = sessions.start_session(connection, reader, "127.0.0.1").session_id
        uploading = sessions.start_session(connection, uploader, "127.0.0.1").session_id
        ended = sessions.start_session(connection, reader, "127.0.0.1").session_id
        idle = sessions.start_session(connection, reader, "127.0.0.1").session_id
        tokens = {
            uid: store.issue(connection, "k" * 64, facts(uid, date), now)[0]
            for uid, date in (
                (OWN, today),
                (REVOKED, today),
                (EXPIRED, "20000101"),
                (SHARED, today),
                (REPLACED, today),
            )
        }
        store.revoke(connection, tokens[REVOKED].id, now)
        connection.execute(
            db.web_sessions.update()
            .where(db.web_sessions.c.id_hash == sessions._hash(idle))
            .values(last_seen_at=now - dt.timedelta(hours=2))
        )
    with app.test_request_context():
        sessions.end_session(ended)
        session_cookie = app.session_interface.get_signing_serializer(app)

        def signed_in(session_id: str) -> dict[str, str]:
            return {"pacs_session": session_cookie.dumps({"_user_id": session_id})}

        def grant(*uids: str) -> dict[str, str]:
            entries = [[tokens[uid].id, uid] for uid in uids]
            return {grants.COOKIE: grants.serializer(app.config["SECRET_KEY"]).dumps(entries)}

        visitors = {
            "signed in": signed_in(live),
            "uploader": signed_in(uploading),
            "signed out": signed_in(ended),
            "idle": signed_in(idle),
            "grant": grant(OWN),
            "grant of a shared UID": grant(SHARED),
            "grant of a replaced study": grant(REPLACED),
            "revoked grant": grant(REVOKED),
            "expired grant": grant(EXPIRED),
            "grant for another study's token": {
                grants.COOKIE: grants.serializer(app.config["SECRET_KEY"]).dumps([[tokens[OWN].id, OTHER]])
            },
            "forged grant": {grants.COOKIE: grant(OWN)[grants.COOKIE][:-2] + "xx"},
            "forged session": {"pacs_session": signed_in(live)["pacs_session"][:-2] + "xx"},
            "nobody": {},
        }
    return app, visitors


def environ(method: str, uri: str, cookies: dict[str, str], **more_headers: str) -> dict:
    header = "; ".join(f"{name}={value}" for name, value in cookies.items())
    headers = {"X-Forwarded-Method": method, "X-Forwarded-Uri": uri, "X-Forwarded-For": "127.0.0.1"}
    headers.update({name.replace("_", "-"): value for name, value in more_headers.items()})
    if header:
        headers["Cookie"] = header
    return EnvironBuilder(path=GATE_PATH, headers=headers).get_environ()


DISGUISES = [{}, {"X_HTTP_Method_Override": "DELETE"}, {"Content_Encoding": "gzip"}]


def test_a_quick_yes_is_always_a_yes_of_the_full_gate(portal) -> None:
    app, visitors = portal
    quick = app.wsgi_app
    flask_only = Client(app.wsgi_app.app, use_cookies=False)
    for (name, cookies), (method, uri), more in itertools.product(visitors.items(), REQUESTS, DISGUISES):
        if quick.allows(environ(method, uri, cookies, **more)):
            assert flask_only.open(environ(method, uri, cookies, **more)).status_code == 200, (
                name,
                uri,
                more,
            )


@pytest.mark.parametrize(
    ("visitor", "method", "uri"),
    [
        ("grant", "GET", f"/dicom-web/studies/{OWN}/series/1.2/instances/1.3/frames/1"),
        ("grant", "GET", f"/wado?requestType=WADO&studyUID={OWN}&seriesUID=1.2&objectUID=1.3"),
        ("signed in", "GET", f"/dicom-web/studies/{OTHER}/metadata"),
        ("uploader", "POST", "/dicom-web/studies"),
    ],
)
def test_the_viewers_plain_requests_get_the_quick_yes(portal, visitor: str, method: str, uri: str) -> None:
    app, visitors = portal
    assert app.wsgi_app.allows(environ(method, uri, visitors[visitor]))


@pytest.mark.parametrize(
    ("visitor", "method", "uri", "status"),
    [
        ("grant", "GET", f"/dicom-web/studies/{OTHER}/metadata", 403),
        ("revoked grant", "GET", f"/dicom-web/studies/{REVOKED}/metadata", 401),
        ("expired grant", "GET", f"/dicom-web/studies/{EXPIRED}/metadata", 401),
        ("grant for another study's token", "GET", f"/dicom-web/studies/{OTHER}/metadata", 401),
        ("forged grant", "GET", f"/dicom-web/studies/{OWN}/metadata", 401),
        ("signed out", "GET", f"/dicom-web/studies/{OWN}/metadata", 401),
        ("idle", "GET", f"/dicom-web/studies/{OWN}/metadata", 401),
        ("forged session", "GET", f"/dicom-web/studies/{OWN}/metadata", 401),
        ("signed in", "POST", "/dicom-web/studies", 403),
        ("grant", "DELETE", f"/dicom-web/studies/{OWN}", 403),
        # A UID two patients' studies share: nobody reads it by DICOMweb.
        ("signed in", "GET", f"/dicom-web/studies/{SHARED}/series", 409),
        ("grant of a shared UID", "GET", f"/dicom-web/studies/{SHARED}/series", 409),
        ("grant of a shared UID", "GET", REQUESTS[-3][1], 409),
        # A grant reads the study of its link, not another patient's that took its UID.
        ("grant of a replaced study", "GET", f"/dicom-web/studies/{REPLACED}/series/1.2/metadata", 404),
        # What Orthanc would read as a DELETE.
        ("signed in", "GET", f"/dicom-web/studies/{OWN}/metadata?_method=DELETE", 400),
        ("grant", "GET", f"/dicom-web/studies/{OWN}/metadata?%5Fmethod=DELETE", 400),
    ],
)
def test_refusals_come_from_the_full_gate(portal, visitor: str, method: str, uri: str, status: int) -> None:
    app, visitors = portal
    cookies = visitors[visitor]
    assert not app.wsgi_app.allows(environ(method, uri, cookies))
    assert Client(app.wsgi_app, use_cookies=False).open(environ(method, uri, cookies)).status_code == status


# ---- frames, which the viewer asks of the control plane itself ----

FRAME_REQUESTS = [
    f"/dicom-web/studies/{OWN}/series/1.2/instances/1.3/frames/1",
    f"/dicom-web/studies/{OTHER}/series/1.2/instances/1.3/frames/1",
    f"/dicom-web/studies/{REVOKED}/series/1.2/instances/1.3/frames/1",
    f"/dicom-web/studies/{EXPIRED}/series/1.2/instances/1.3/frames/1",
    f"/dicom-web/studies/{OWN}/series/1.2/instances/1.3/frames/1,2",
    f"/dicom-web/studies/{OWN}/series/1.2/instances/1.3/frames/1?x=1",
    f"/dicom-web/studies/{OTHER}/series/1.2/instances/1.3%2F..%2F..%2F..%2F..%2F{OWN}/frames/1",
    f"/dicom-web/studies/{OWN}/series/../../{OTHER}/series/1.2/instances/1.3/frames/1",
]


def frame_environ(uri: str, cookies: dict[str, str]) -> dict:
    """A frame request as gunicorn hands it on: the raw target in RAW_URI, the path decoded."""
    path, _, query = uri.partition("?")
    header = "; ".join(f"{name}={value}" for name, value in cookies.items())
    built = EnvironBuilder(path=path, query_string=query, headers={"Cookie": header} if header else {})
    return {**built.get_environ(), "RAW_URI": uri}


def test_a_quick_frame_is_always_a_frame_the_full_gate_lets_through(portal) -> None:
    app, visitors = portal
    quick = app.wsgi_app
    flask_only = Client(quick.app, use_cookies=False)
    for (name, cookies), uri in itertools.product(visitors.items(), FRAME_REQUESTS):
        if quick.allows_frame(frame_environ(uri, cookies)):
            # Through the gate; this app's archive is not running, so the answer is its 503.
            assert flask_only.open(frame_environ(uri, cookies)).status_code == 503, (name, uri)


@pytest.mark.parametrize(
    ("visitor", "uri", "status"),
    [
        ("grant", FRAME_REQUESTS[0], None),
        ("signed in", FRAME_REQUESTS[1], None),
        ("grant", FRAME_REQUESTS[1], 403),
        ("revoked grant", FRAME_REQUESTS[2], 401),
        ("nobody", FRAME_REQUESTS[0], 401),
        ("grant", FRAME_REQUESTS[6], 404),
        ("signed in", FRAME_REQUESTS[7], 404),
    ],
)
def test_frames_get_the_quick_way_or_the_full_gates_refusal(
    portal, visitor: str, uri: str, status: int | None
) -> None:
    app, visitors = portal
    cookies = visitors[visitor]
    assert app.wsgi_app.allows_frame(frame_environ(uri, cookies)) is (status is None)
    if status is not None:
        assert Client(app.wsgi_app, use_cookies=False).open(frame_environ(uri, cookies)).status_code == status


@pytest.mark.parametrize(
    ("headers", "status"), [({"X_HTTP_Method_Override": "DELETE"}, 400), ({"Content_Encoding": "gzip"}, 415)]
)
def test_requests_orthanc_would_read_otherwise_are_refused(portal, headers: dict, status: int) -> None:
    app, visitors = portal
    for visitor in ("signed in", "grant"):
        asked = environ("GET", f"/dicom-web/studies/{OWN}/metadata", visitors[visitor], **headers)
        assert not app.wsgi_app.allows(asked)
        assert Client(app.wsgi_app, use_cookies=False).open(asked).status_code == status
