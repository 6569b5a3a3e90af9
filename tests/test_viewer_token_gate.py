"""Viewer tokens at the DICOMweb gate, in process: the rules, and the quick path against the full gate.

The stack-level tests (tests/test_desktop.py) read real studies with a real client; here every
kind of token (desktop for a patient, a study or a series; for another viewer; expired, revoked,
made by an account no longer active, a patient's whose link died, unknown, malformed) asks the
gate's probe set (``test_quick_gate.REQUESTS`` and ``FRAME_REQUESTS``) and series probes of its
own, and wherever the quick path says yes, the full gate must too.
"""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
from test_quick_gate import FRAME_REQUESTS, HOLDERS, OTHER, OWN, REQUESTS, facts
from werkzeug.test import Client, EnvironBuilder

from control import accounts, db
from control.app import create_app
from control.auth import sessions
from control.desktop import credentials
from control.desktop.credentials import Kind, Opened, Scope
from control.dicomweb.fast import GATE_PATH
from control.dicomweb.rules import SERIES_UID_KEYS, Verdict, Visitor, decide, narrowed_query
from control.site import Site
from control.tokens import store

from conftest import free_port

pytestmark = pytest.mark.inprocess

SECOND = "1.2.840.99.7"  # the same patient's other study
SERIES, OTHER_SERIES = "1.2", "1.9"
PASSWORD = "a long enough password"
CLIENT = "127.0.0.1"

SERIES_REQUESTS = [
    ("GET", f"/dicom-web/studies/{OWN}/series/{SERIES}/instances/1.3"),
    ("GET", f"/dicom-web/studies/{OWN}/series/{SERIES}/metadata"),
    ("GET", f"/dicom-web/studies/{OWN}/series/{SERIES}/instances"),
    ("GET", f"/dicom-web/studies/{OWN}/series/{OTHER_SERIES}/instances/1.3"),
    ("GET", f"/dicom-web/studies/{OWN}/series/{OTHER_SERIES}/metadata"),
    ("GET", f"/dicom-web/studies/{OWN}/series"),
    ("GET", f"/dicom-web/studies/{OWN}"),
    ("GET", f"/dicom-web/studies/{SECOND}/metadata"),
    ("GET", f"/wado?requestType=WADO&studyUID={OWN}&seriesUID={OTHER_SERIES}&objectUID=1.3"),
    ("GET", f"/dicom-web/studies/{OWN}/series/{SERIES}/../{OTHER_SERIES}/metadata"),
    ("POST", f"/dicom-web/studies/{OWN}"),
]

series_token = Visitor(granted_studies={OWN: "o-" + OWN}, granted_series={SERIES}, credential="viewer-1")
study_token = Visitor(granted_studies={OWN: "o-" + OWN}, credential="viewer-2")
dead_token = Visitor(credential="viewer-3")


@pytest.mark.parametrize(
    ("who", "method", "uri", "verdict"),
    [
        (series_token, "GET", f"/dicom-web/studies/{OWN}/series/{SERIES}/instances/1.3", Verdict.ALLOW),
        (
            series_token,
            "GET",
            f"/dicom-web/studies/{OWN}/series/{SERIES}/instances/1.3/frames/1",
            Verdict.ALLOW,
        ),
        (series_token, "GET", f"/dicom-web/studies/{OWN}/series/{SERIES}", Verdict.ALLOW),
        (series_token, "GET", f"/wado?requestType=WADO&studyUID={OWN}&seriesUID={SERIES}", Verdict.ALLOW),
        # A series token reads inside its series only: not the study, its metadata or its series list.
        (series_token, "GET", f"/dicom-web/studies/{OWN}", Verdict.DENY),
        (series_token, "GET", f"/dicom-web/studies/{OWN}/metadata", Verdict.DENY),
        (series_token, "GET", f"/dicom-web/studies/{OWN}/series", Verdict.DENY),
        (series_token, "GET", f"/dicom-web/studies/{OWN}/series/{OTHER_SERIES}/metadata", Verdict.DENY),
        (series_token, "GET", f"/dicom-web/studies/{OWN}/series/{SERIES}1/metadata", Verdict.DENY),
        (
            series_token,
            "GET",
            f"/wado?requestType=WADO&studyUID={OWN}&seriesUID={OTHER_SERIES}",
            Verdict.DENY,
        ),
        (series_token, "GET", f"/wado?requestType=WADO&studyUID={OWN}", Verdict.DENY),
        (series_token, "POST", "/dicom-web/studies", Verdict.DENY),
        (study_token, "GET", f"/dicom-web/studies/{OWN}/series", Verdict.ALLOW),
        (study_token, "GET", f"/dicom-web/studies/{OTHER}/metadata", Verdict.DENY),
        (study_token, "POST", f"/dicom-web/studies/{OWN}", Verdict.DENY),
        (study_token, "DELETE", f"/dicom-web/studies/{OWN}", Verdict.DENY),
        (dead_token, "GET", f"/dicom-web/studies/{OWN}/metadata", Verdict.SIGN_IN),
    ],
)
def test_token_decisions(who: Visitor, method: str, uri: str, verdict: Verdict) -> None:
    assert decide(method, uri, who).verdict is verdict


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (f"StudyInstanceUID={OWN}", f"StudyInstanceUID={OWN}&SeriesInstanceUID={SERIES}"),
        (f"0020000E={OTHER_SERIES}", None),
        (f"seriesinstanceuid={OTHER_SERIES},{SERIES}", f"SeriesInstanceUID={SERIES}"),
        (f"Series%49nstanceUID={OTHER_SERIES}", None),
    ],
)
def test_series_searches_are_narrowed_to_the_series(query: str, expected: str | None) -> None:
    assert narrowed_query(query, SERIES, SERIES_UID_KEYS, "SeriesInstanceUID") == expected


# ---- the quick path and the full gate, on a database of their own ----


@pytest.fixture(scope="module")
def portal(tmp_path_factory):
    """The app on a fresh database, and the headers of every kind of token."""
    data = tmp_path_factory.mktemp("viewer-token-gate")
    db.migrate(Site(data).engine)
    with Site(data).engine.begin() as connection:
        # An archive port where nothing listens: a frame let through gets the portal's 503.
        db.put_settings(connection, {"orthanc_http_port": free_port()})
    app = create_app({"DATA_DIR": data})
    # Which archive studies hold each UID: the gate asks Orthanc; this app has no Orthanc running.
    holders = {**HOLDERS, SECOND: ["o-" + SECOND]}
    app.extensions["study_holders"] = lambda study_uid: holders.get(study_uid, [])
    site = app.extensions["site"]
    now = db.utcnow()
    today = now.strftime("%Y%m%d")
    secrets: dict[str, str] = {}
    with site.engine.begin() as connection:
        reader = accounts.create_user(connection, "reader", PASSWORD)
        leaver = accounts.create_user(connection, "leaver", PASSWORD)
        live_session = sessions.start_session(connection, reader, CLIENT).session_id
        link = store.issue(connection, "k" * 64, facts(OWN, today), now)[0]
        dead_link = store.issue(connection, "k" * 64, facts(SECOND, today), now)[0]
        store.revoke(connection, dead_link.id, now)

        def make(name: str, opened: Opened, **options) -> None:
            kind = options.pop("kind", Kind.DESKTOP)
            expires_at = options.pop("expires_at", now + credentials.DESKTOP_LIFETIME)
            _token, secret = credentials.issue(
                connection,
                opened,
                kind=kind,
                expires_at=expires_at,
                now=now,
                client_address=CLIENT,
                **options,
            )
            secrets[name] = secret

        by_reader = {"issued_by_user_id": reader.id, "issued_by": "reader"}
        make("desktop study", Opened(Scope.STUDY, (OWN,), "", study_ids=("o-" + OWN,)), **by_reader)
        make("desktop series", Opened(Scope.SERIES, (OWN,), SERIES, study_ids=("o-" + OWN,)), **by_reader)
        make(
            "desktop patient",
            Opened(Scope.PATIENT, (OWN, SECOND), "", study_ids=("o-" + OWN, "o-" + SECOND)),
            **by_reader,
        )
        make(
            "another viewer",
            Opened(Scope.STUDY, (OWN,), "", study_ids=("o-" + OWN,)),
            kind=Kind.SHARED,
            **by_reader,
        )
        make(
            "expired",
            Opened(Scope.STUDY, (OWN,), "", study_ids=("o-" + OWN,)),
            expires_at=now - dt.timedelta(seconds=1),
            **by_reader,
        )
        make("revoked", Opened(Scope.STUDY, (OWN,), "", study_ids=("o-" + OWN,)), **by_reader)
        make(
            "made by an account since deactivated",
            Opened(Scope.STUDY, (OWN,), "", study_ids=("o-" + OWN,)),
            issued_by_user_id=leaver.id,
        )
        make(
            "made by an account since deleted",
            Opened(Scope.STUDY, (OWN,), "", study_ids=("o-" + OWN,)),
            issued_by_user_id=9999,
        )
        make("a patient's", Opened(Scope.STUDY, (OWN,), "", study_ids=("o-" + OWN,)), study_token_id=link.id)
        make(
            "a patient's whose link was revoked",
            Opened(Scope.STUDY, (SECOND,), "", study_ids=("o-" + SECOND,)),
            study_token_id=dead_link.id,
        )
        revoked = credentials.find(connection, secrets["revoked"])
        credentials.revoke(connection, revoked.id, "admin", now)
        connection.execute(db.users.update().where(db.users.c.id == leaver.id).values(is_active=False))
    with app.test_request_context():
        session_cookie = app.session_interface.get_signing_serializer(app).dumps({"_user_id": live_session})
    visitors = {name: {"Authorization": f"Bearer {secret}"} for name, secret in secrets.items()}
    visitors["unknown"] = {"Authorization": f"Bearer {credentials.new_secret()}"}
    visitors["malformed"] = {"Authorization": "Bearer not-one-of-ours"}
    visitors["lower-case scheme"] = {"Authorization": f"bearer {secrets['desktop study']}"}
    # A bearer decides alone: a signed-in user's cookie beside it widens nothing.
    visitors["token with a session cookie"] = {
        "Authorization": f"Bearer {secrets['desktop series']}",
        "Cookie": f"pacs_session={session_cookie}",
    }
    return app, visitors


def gate_environ(method: str, uri: str, headers: dict[str, str], client: str = CLIENT) -> dict:
    sent = {"X-Forwarded-Method": method, "X-Forwarded-Uri": uri, "X-Forwarded-For": client, **headers}
    return EnvironBuilder(path=GATE_PATH, headers=sent).get_environ()


def frame_environ(uri: str, headers: dict[str, str], client: str = CLIENT) -> dict:
    path, _, query = uri.partition("?")
    built = EnvironBuilder(path=path, query_string=query, headers={"X-Forwarded-For": client, **headers})
    return {**built.get_environ(), "RAW_URI": uri}


def full_gate(app, environ: dict) -> int:
    return Client(app.wsgi_app.app, use_cookies=False).open(environ).status_code  # behind the quick layer


ALL_REQUESTS = REQUESTS + SERIES_REQUESTS


def test_a_quick_yes_for_a_token_is_always_a_yes_of_the_full_gate(portal) -> None:
    app, visitors = portal
    quick = app.wsgi_app
    for headers in visitors.values():
        full_gate(
            app, gate_environ("GET", f"/dicom-web/studies/{OWN}/series/{SERIES}/instances/1.3", headers)
        )
    said_yes = 0
    for (name, headers), (method, uri) in itertools.product(visitors.items(), ALL_REQUESTS):
        if quick.allows(gate_environ(method, uri, headers)):
            said_yes += 1
            assert full_gate(app, gate_environ(method, uri, headers)) == 200, (name, method, uri)
    for (name, headers), uri in itertools.product(visitors.items(), FRAME_REQUESTS):
        if quick.allows_frame(frame_environ(uri, headers)):
            said_yes += 1
            # Through the gate; this app's archive is not running, so the answer is its 503.
            assert full_gate(app, frame_environ(uri, headers)) == 503, (name, uri)
    assert said_yes > 20  # the quick path is in use, not only ever passing the question on


@pytest.mark.parametrize(
    ("visitor", "method", "uri", "status"),
    [
        ("desktop study", "GET", f"/dicom-web/studies/{OWN}/metadata", 200),
        ("desktop study", "GET", f"/dicom-web/studies/{OTHER}/metadata", 403),
        ("desktop study", "POST", "/dicom-web/studies", 403),
        ("desktop study", "DELETE", f"/dicom-web/studies/{OWN}", 403),
        ("lower-case scheme", "GET", f"/dicom-web/studies/{OWN}/metadata", 200),
        ("desktop series", "GET", f"/dicom-web/studies/{OWN}/series/{SERIES}/metadata", 200),
        ("desktop series", "GET", f"/dicom-web/studies/{OWN}/series/{OTHER_SERIES}/metadata", 403),
        ("desktop series", "GET", f"/dicom-web/studies/{OWN}/metadata", 403),
        ("desktop patient", "GET", f"/dicom-web/studies/{SECOND}/metadata", 200),
        ("desktop patient", "GET", f"/dicom-web/studies/{OTHER}/metadata", 403),
        ("another viewer", "GET", f"/dicom-web/studies/{OWN}/metadata", 200),
        ("another viewer", "GET", f"/dicom-web/studies/{OWN}/series/../../{OTHER}/metadata", 404),
        ("expired", "GET", f"/dicom-web/studies/{OWN}/metadata", 401),
        ("revoked", "GET", f"/dicom-web/studies/{OWN}/metadata", 401),
        ("made by an account since deactivated", "GET", f"/dicom-web/studies/{OWN}/metadata", 401),
        ("made by an account since deleted", "GET", f"/dicom-web/studies/{OWN}/metadata", 401),
        ("a patient's", "GET", f"/dicom-web/studies/{OWN}/metadata", 200),
        ("a patient's whose link was revoked", "GET", f"/dicom-web/studies/{SECOND}/metadata", 401),
        ("unknown", "GET", f"/dicom-web/studies/{OWN}/metadata", 401),
        ("malformed", "GET", f"/dicom-web/studies/{OWN}/metadata", 401),
        ("token with a session cookie", "GET", f"/dicom-web/studies/{OTHER}/metadata", 403),
        ("token with a session cookie", "GET", f"/dicom-web/studies/{OWN}/metadata", 403),
    ],
)
def test_the_full_gate_judges_each_token(portal, visitor: str, method: str, uri: str, status: int) -> None:
    app, visitors = portal
    assert (
        Client(app.wsgi_app, use_cookies=False).open(gate_environ(method, uri, visitors[visitor])).status_code
        == status
    )


def test_a_tokens_first_request_from_an_address_goes_to_the_full_gate_which_records_it(portal) -> None:
    app, visitors = portal
    headers = visitors["another viewer"]
    uri = f"/dicom-web/studies/{OWN}/series/{SERIES}/instances/1.3"
    elsewhere = "127.0.0.9"
    assert not app.wsgi_app.allows(gate_environ("GET", uri, headers, client=elsewhere))
    assert full_gate(app, gate_environ("GET", uri, headers, client=elsewhere)) == 200
    assert app.wsgi_app.allows(gate_environ("GET", uri, headers, client=elsewhere))
    with app.extensions["site"].engine.connect() as connection:
        token = credentials.find(connection, headers["Authorization"].split()[1])
        rows = connection.execute(
            db.activity.select().where(
                db.activity.c.token_id == token.public_id, db.activity.c.client_address == elsewhere
            )
        ).all()
    assert [row.action for row in rows] == ["viewer-token-used"]
    assert rows[0].username == "reader"
