"""The session cookie, named and flagged by the scheme the browser uses.

Over https the session is ``__Host-pacs_session``: a browser keeps a cookie of that name only when
it was set over https, Secure, for this host alone (no Domain) and for the whole site (Path=/), so
nobody on the network can plant or overwrite it over plain http (cookies are otherwise shared by
every scheme and port of a host). Over http it is ``pacs_session``. The two are signed with
different salts, so the value of an https cookie cannot be planted under the plain name either.
The patients' viewer grants follow the same rule (``control.tokens.grants``).

Turning SSL on or off from the setup page keeps the admin signed in:

- On: the setup page answers over http, where no ``__Host-`` cookie can be set. The browser sends
  its plain cookie to the https address too; over https a plain cookie is taken only when it holds
  a signed-in session, and only once: it is issued again under the ``__Host-`` name, the plain one
  is deleted, and its CSRF token stays behind (the next page makes a new one). A plain cookie
  planted over http therefore gives nobody a token they know, and one without a session is
  ignored. Sessions last ``session_lifetime_hours`` at most, which bounds how long plain cookies
  issued before SSL was on can still be taken.
- Off: the answer that turns SSL off goes out over https; ``carry_session_to_http`` makes it also
  set a plain copy of the session for the http page that follows, and delete the ``__Host-`` one,
  which the browser would never send over http. A plain cookie is taken over https only while
  SSL is on, so requests still made over https before the switch leave the copy alone.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Request, Response, g, request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from itsdangerous import BadSignature, URLSafeTimedSerializer

from control import services

PLAIN_SESSION = "pacs_session"
SECURE_SESSION = "__Host-pacs_session"
SECURE_SALT = "cookie-session-https"


def session_cookie(secure: bool) -> str:
    """The session cookie's name over https (``secure``) or http."""
    return SECURE_SESSION if secure else PLAIN_SESSION


class SiteSession(SecureCookieSession):
    """Flask's signed-cookie session, knowing whether a plain cookie is to be deleted."""

    drop_plain = False


class SiteSessionInterface(SecureCookieSessionInterface):
    """Sessions in ``__Host-pacs_session`` over https and ``pacs_session`` over http (see module)."""

    session_class = SiteSession

    def serializer_for(self, app: Flask, secure: bool) -> URLSafeTimedSerializer:
        """The signer of the session cookie over https (``secure``) or http."""
        if not app.secret_key:
            raise RuntimeError("the control plane has no SECRET_KEY")  # create_app always sets one
        keys: list[str | bytes] = [*(app.config["SECRET_KEY_FALLBACKS"] or ()), app.secret_key]
        return URLSafeTimedSerializer(
            keys,  # type: ignore[arg-type]  # itsdangerous takes str and bytes keys mixed but annotates one kind
            salt=SECURE_SALT if secure else self.salt,
            serializer=self.serializer,
            signer_kwargs={"key_derivation": self.key_derivation, "digest_method": self.digest_method},
        )

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        return self.serializer_for(app, request.is_secure)

    def get_cookie_name(self, app: Flask) -> str:
        return session_cookie(request.is_secure)

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure

    def load(self, app: Flask, value: str, secure: bool) -> dict[str, Any] | None:
        """The content of a session cookie's value, or None when it is forged or too old."""
        try:
            return self.serializer_for(app, secure).loads(
                value, max_age=int(app.permanent_session_lifetime.total_seconds())
            )
        except BadSignature:
            return None

    def open_session(self, app: Flask, request: Request) -> SiteSession:
        secure = request.is_secure
        value = request.cookies.get(session_cookie(secure))
        if value:
            return SiteSession(self.load(app, value, secure) or {})
        plain = request.cookies.get(PLAIN_SESSION) if secure else None
        # Once SSL is turned off, pages still go out over https until the web front has switched;
        # the plain cookie handed over for the http page that follows must stay as it is.
        if not plain or not services.site(app).load_settings().ssl_enabled:
            return SiteSession()
        data = self.load(app, plain, secure=False) or {}
        if data.get("_user_id"):
            data.pop("csrf_token", None)
            session = SiteSession(data)
            session.modified = True  # issued again under the https name
        else:
            session = SiteSession()
        session.drop_plain = True
        return session

    def save_session(self, app: Flask, session: Any, response: Response) -> None:
        if request.is_secure and g.get("session_to_http"):
            self._hand_over_to_http(app, session, response)
            return
        super().save_session(app, session, response)
        if session.drop_plain:
            response.delete_cookie(PLAIN_SESSION, path="/", httponly=True, samesite="Lax")

    def _hand_over_to_http(self, app: Flask, session: Any, response: Response) -> None:
        response.delete_cookie(SECURE_SESSION, path="/", secure=True, httponly=True, samesite="Lax")
        if session:
            response.set_cookie(
                PLAIN_SESSION,
                self.serializer_for(app, secure=False).dumps(dict(session)),
                expires=self.get_expiration_time(app, session),
                path="/",
                httponly=True,
                samesite="Lax",
            )
        response.vary.add("Cookie")


def carry_session_to_http() -> None:
    """Make the current (https) answer hand the session over to the http page that follows."""
    g.session_to_http = True


def session_id(
    interface: SiteSessionInterface, app: Flask, cookies: dict[str, str], secure: bool
) -> str | None:
    """The server-side session id in the request's own session cookie (flask-login keeps it there),
    or None; a plain cookie over https is left to the app, which takes it over (see the module)."""
    value = cookies.get(session_cookie(secure), "")
    data = interface.load(app, value, secure) if value else None
    found = (data or {}).get("_user_id")
    return found if isinstance(found, str) and found else None
