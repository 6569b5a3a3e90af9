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
answer only ever says yes; "no" always comes from the full gate. A viewer token's request whose
use is due for the activity log (``control.desktop.credentials.use_due``) goes on too, so that
the full gate records it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.http import parse_cookie

from control import db
from control.auth import sessions
from control.cookies import SiteSessionInterface
from control.cookies import session_id as session_id_in
from control.desktop import credentials as viewer_tokens
from control.dicomweb import rules, token_visitor
from control.dicomweb.frames import FrameRequest, FrameSource
from control.dicomweb.relay import origin
from control.orthanc import OrthancUnavailable
from control.tokens import grants

GATE_PATH = "/internal/gate/dicom-web"
_ALLOWED = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", "0")]

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class QuickGate:
    """WSGI middleware in front of the app: answers the gate's plain "yes" itself."""

    def __init__(self, app: WSGIApp, flask_app: Flask) -> None:
        self.app = app
        self.flask_app = flask_app
        self.site = flask_app.extensions["site"]
        self.session_interface: SiteSessionInterface = flask_app.session_interface  # type: ignore[assignment]
        self.grant_signing = grants.serializer(flask_app.config["SECRET_KEY"])
        self.frames: FrameSource = flask_app.extensions["frames"]

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == GATE_PATH:
            if self._quick_yes(self.allows, environ):
                start_response("200 OK", _ALLOWED)
                return [b""]
        elif path.startswith("/dicom-web/") and environ.get("REQUEST_METHOD") == "GET":
            wanted = FrameRequest.of(rules.request_uri(environ))
            if wanted is not None and self._quick_yes(self.allows_frame, environ):
                return self._frame(wanted, environ, start_response)
        return self.app(environ, start_response)

    def _quick_yes(self, question: Callable[[dict[str, Any]], bool], environ: dict[str, Any]) -> bool:
        try:
            return question(environ)
        except SQLAlchemyError:
            return False  # the database is in trouble: the app answers, as it does for every page

    def _frame(
        self, wanted: FrameRequest, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        try:
            answer = self.frames.answer(wanted, environ.get("HTTP_ACCEPT", ""), origin(environ))
        except OrthancUnavailable:
            return self.app(environ, start_response)  # the app's 503, as for every page
        start_response(answer.status, answer.headers)
        return answer.body

    def allows(self, environ: dict[str, Any]) -> bool:
        """True when the request Caddy asks about may plainly go through; False means "ask the app"."""
        method = environ.get("HTTP_X_FORWARDED_METHOD", "GET").upper()
        return self._allows(method, environ.get("HTTP_X_FORWARDED_URI", ""), environ)

    def allows_frame(self, environ: dict[str, Any]) -> bool:
        """True when a frame the viewer asks for itself may plainly be sent; False means "ask the app"."""
        return self._allows(environ.get("REQUEST_METHOD", "GET"), rules.request_uri(environ), environ)

    def _allows(self, method: str, uri: str, environ: dict[str, Any]) -> bool:
        bearer = viewer_tokens.bearer_secret(environ.get("HTTP_AUTHORIZATION"))
        if bearer is not None:
            return self._token_allows(method, uri, bearer, environ)
        cookies = parse_cookie(environ.get("HTTP_COOKIE", ""))
        # The cookies' names follow the scheme the browser uses (control.cookies).
        secure = origin(environ).startswith("https:")
        session_id = session_id_in(self.session_interface, self.flask_app, cookies, secure)
        presented = grants.read_value(cookies.get(grants.cookie_name(secure), ""), self.grant_signing)
        if session_id is None and not presented:
            return False
        now = db.utcnow()
        with self.site.engine.connect() as connection:
            settings = self.site.load_settings(connection)
            if session_id is not None:
                row = sessions.find_session(connection, session_id)
                # A session whose last-seen time is due for an update is left to the app.
                if row is None or not sessions.is_live(row, now, settings) or sessions.touch_due(row, now):
                    return False
                visitor = rules.Visitor(signed_in=True, can_upload=row.can_upload)
            else:
                held = grants.still_valid(connection, presented, settings["token_days"], now.date())
                visitor = rules.Visitor(granted_studies=frozenset(grant.study_uid for grant in held))
        return rules.decide(method, uri, visitor).verdict is rules.Verdict.ALLOW

    def _token_allows(self, method: str, uri: str, bearer: str, environ: dict[str, Any]) -> bool:
        """A viewer token's request, judged as that token alone (as the full gate does)."""
        now = db.utcnow()
        with self.site.engine.connect() as connection:
            settings = self.site.load_settings(connection)
            token, works = viewer_tokens.look_up(connection, bearer, settings, now)
        # Caddy is the one hop in front (as ProxyFix trusts it): the client is its last address.
        client_address = environ.get("HTTP_X_FORWARDED_FOR", "").rpartition(",")[2].strip()
        if token is None or not works or viewer_tokens.use_due(token, client_address, now):
            return False
        return rules.decide(method, uri, token_visitor(token)).verdict is rules.Verdict.ALLOW
