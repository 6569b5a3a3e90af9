"""The gate's quick answer: the requests of an open viewer, let through without the web framework.

A viewer asks for every frame of a series, each one a DICOMweb request. Frames come to the
control plane itself (``control.dicomweb.frames``); for the viewer's other requests Caddy asks the
gate before it streams Orthanc's answer. Going through Flask for each would cost more than
Orthanc's own work for a frame, so this WSGI layer answers the common case itself: a live session,
or a study grant whose token still works, reading what the rules allow. It reads the same rows with
the same functions as the full gate, on every request, so a sign-out, a revoked token or a changed
setting counts at once.

Anything else goes on to the full gate in ``control.dicomweb``, which decides again, records
refusals in the activity log and touches the session's last-seen time when it is due. The quick
answer only ever says yes; "no" always comes from the full gate. Like the full gate, it asks
Orthanc which studies hold the Study Instance UID of a request that names one (a single frame's
study is checked by ``control.dicomweb.frames`` itself). A viewer token's request whose use is
due for the activity log (``control.desktop.credentials.use_due``) goes on too, so that the full
gate records it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.http import parse_cookie

from control import db, services
from control import dicomweb_routes as routes
from control.auth import sessions
from control.cookies import SiteSessionInterface
from control.cookies import session_id as session_id_in
from control.desktop import credentials as viewer_tokens
from control.dicomweb import rules, token_visitor
from control.dicomweb.frames import FrameRequest, FrameSource, NotTheGrantedStudy, StudyShared
from control.dicomweb.relay import origin
from control.orthanc import OrthancError, OrthancUnavailable
from control.tokens import grants

# The request headers the rules read, as WSGI names them.
_RULED_HEADERS = {
    "HTTP_X_HTTP_METHOD_OVERRIDE": rules.METHOD_OVERRIDE_HEADER,
    "HTTP_CONTENT_ENCODING": "content-encoding",
}

GATE_PATH = routes.GATE
_ALLOWED = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "0")]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class QuickGate:
    """WSGI middleware in front of the app: answers the gate's plain "yes" itself."""

    def __init__(self, app: WSGIApp, flask_app: Flask) -> None:
        self.app = app
        self.flask_app = flask_app
        self.site = services.site(flask_app)
        session_interface = flask_app.session_interface
        assert isinstance(session_interface, SiteSessionInterface)  # installed by create_app
        self.session_interface = session_interface
        self.grant_signing = grants.serializer(flask_app.config["SECRET_KEY"])
        self.frames: FrameSource = services.frames(flask_app)
        self.extensions = flask_app.extensions

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == GATE_PATH:
            if self._quick_yes(self.allows, environ):
                start_response("200 OK", _ALLOWED)
                return [b""]
        elif path.startswith("/dicom-web/") and environ.get("REQUEST_METHOD") == "GET":
            wanted = FrameRequest.of(rules.request_uri(environ))
            visitor = self._quick_yes(self._frame_visitor, environ) if wanted is not None else None
            if wanted is not None and visitor is not None:
                granted = "" if visitor.signed_in else visitor.granted_studies.get(wanted.study, "")
                return self._frame(wanted, granted, environ, start_response)
        return self.app(environ, start_response)

    def _quick_yes(self, question: Callable[[dict[str, Any]], Any], environ: dict[str, Any]) -> Any:
        try:
            return question(environ)
        except SQLAlchemyError:
            return None  # the database is in trouble: the app answers, as it does for every page
        except (OrthancUnavailable, OrthancError):
            return None  # the app answers: a 503 while the archive is away

    def _frame(
        self, wanted: FrameRequest, granted: str, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        try:
            answer = self.frames.answer(wanted, environ.get("HTTP_ACCEPT", ""), origin(environ), granted)
        except (OrthancUnavailable, StudyShared, NotTheGrantedStudy):
            # The app's answer: its 503 as for every page, or the refusal, recorded.
            return self.app(environ, start_response)
        start_response(answer.status, answer.headers)
        return answer.body

    def allows(self, environ: dict[str, Any]) -> bool:
        """True when the request Caddy asks about may plainly go through; False means "ask the app"."""
        method = environ.get("HTTP_X_FORWARDED_METHOD", "GET").upper()
        return self._allows(method, environ.get("HTTP_X_FORWARDED_URI", ""), environ)

    def allows_frame(self, environ: dict[str, Any]) -> bool:
        """True when the quick way sends this frame itself: one frame (``FrameRequest``), plainly
        allowed; False means "ask the app"."""
        wanted = FrameRequest.of(rules.request_uri(environ))
        return wanted is not None and self._frame_visitor(environ) is not None

    def _frame_visitor(self, environ: dict[str, Any]) -> rules.Visitor | None:
        """The visitor a frame may plainly be sent to, or None: ask the app."""
        visitor = self._visitor(environ)
        uri = rules.request_uri(environ)
        if (
            visitor is None
            or self._decide(environ.get("REQUEST_METHOD", "GET"), uri, visitor, environ) is None
        ):
            return None
        return visitor

    def _allows(self, method: str, uri: str, environ: dict[str, Any]) -> bool:
        visitor = self._visitor(environ)
        if visitor is None:
            return False
        decision = self._decide(method, uri, visitor, environ)
        if decision is None:
            return False
        study_uid = rules.study_named(uri)
        if study_uid and FrameRequest.of(uri) is None:
            decision = rules.owned(
                decision, visitor, study_uid, services.study_holders(study_uid, self.flask_app)
            )
        return decision.verdict is rules.Verdict.ALLOW

    def _decide(
        self, method: str, uri: str, visitor: rules.Visitor, environ: dict[str, Any]
    ) -> rules.Decision | None:
        headers = {name: environ[key] for key, name in _RULED_HEADERS.items() if key in environ}
        decision = rules.decide(method, uri, visitor, headers)
        return decision if decision.verdict is rules.Verdict.ALLOW else None

    def _visitor(self, environ: dict[str, Any]) -> rules.Visitor | None:
        """Who asks, when the quick way can tell (a live session not due for a touch, grants, or a
        viewer token whose use is not due for the activity log)."""
        bearer = viewer_tokens.bearer_secret(environ.get("HTTP_AUTHORIZATION"))
        if bearer is not None:
            return self._token_visitor(bearer, environ)
        cookies = parse_cookie(environ.get("HTTP_COOKIE", ""))
        # The cookies' names follow the scheme the browser uses (control.cookies).
        secure = origin(environ).startswith("https:")
        session_id = session_id_in(self.session_interface, self.flask_app, cookies, secure)
        presented = grants.read_value(cookies.get(grants.cookie_name(secure), ""), self.grant_signing)
        if session_id is None and not presented:
            return None
        now = db.utcnow()
        with self.site.engine.connect() as connection:
            settings = self.site.load_settings(connection)
            if session_id is not None:
                row = sessions.find_session(connection, session_id)
                # A session whose last-seen time is due for an update is left to the app.
                if row is None or not sessions.is_live(row, now, settings) or sessions.touch_due(row, now):
                    return None
                return rules.Visitor(signed_in=True, can_upload=row.can_upload)
            held = grants.still_valid(connection, presented, settings.token_days, now.date())
        return rules.Visitor(granted_studies=grants.granted_studies(held))

    def _token_visitor(self, bearer: str, environ: dict[str, Any]) -> rules.Visitor | None:
        """A viewer token's visitor: the token alone counts (as in the full gate), cookies or not."""
        now = db.utcnow()
        with self.site.engine.connect() as connection:
            settings = self.site.load_settings(connection)
            token, works = viewer_tokens.look_up(connection, bearer, settings, now)
        # Caddy is the one hop in front (as ProxyFix trusts it): the client is its last address.
        client_address = environ.get("HTTP_X_FORWARDED_FOR", "").rpartition(",")[2].strip()
        if token is None or not works or viewer_tokens.use_due(token, client_address, now):
            return None
        return token_visitor(token)
