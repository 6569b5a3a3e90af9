"""Who may reach what: the access rules of every page, kept as data, enforced in one place.

Every endpoint of the app is listed below with its audience, either by name or by its blueprint
(``"admin.*"``), never both: each blueprint serves one audience. ``enforce`` runs before every
request and denies by default: an endpoint nobody listed is refused, so a new page is closed until
someone decides who may see it. This is the only place that grants access: no view carries a
sign-in check of its own. Tests walk the URL map and check each rule from each audience's side.
"""

from __future__ import annotations

import enum

from flask import Flask, abort, flash, g, redirect, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user

from control.activity import Outcome, record_activity
from control.errors import wants_json
from control.events import AccessDeniedEvent, SessionExpiredEvent


class Audience(enum.Enum):
    PUBLIC = "anyone"
    SIGNED_IN = "signed-in users"
    ADMIN = "admins"
    UPLOADER = "signed-in users who may upload"


RULES: dict[str, Audience] = {
    "static": Audience.PUBLIC,
    "public.*": Audience.PUBLIC,
    "auth.login": Audience.PUBLIC,
    "auth.logout": Audience.SIGNED_IN,
    "auth.own_password": Audience.SIGNED_IN,
    "query.*": Audience.SIGNED_IN,
    # Patients' pages: the token in the link is the key (control.tokens checks it).
    "tokens.*": Audience.PUBLIC,
    # The desktop viewer and tokens for other viewers (control.desktop); a patient's own button
    # is one of the patients' pages.
    "desktop.*": Audience.SIGNED_IN,
    # The DICOMweb gate decides itself: a signed-in user, a study grant or a viewer token
    # (control.dicomweb.rules).
    "dicomweb.*": Audience.PUBLIC,
    # The viewer's configuration and a bare /viewer: what they say depends on who asks (control.viewer).
    "viewer.*": Audience.PUBLIC,
    "admin.*": Audience.ADMIN,
    # Monitoring decides itself: admins, or clients on this machine (control.metrics).
    "metrics.metrics": Audience.PUBLIC,
    # Uploads need the account's "can upload files" right.
    "uploads.*": Audience.UPLOADER,
    # Caddy's question before an upload's body comes: it refuses by size and disk alone, and
    # leaves who may upload to the rules above, on the request itself.
    "upload_gate.*": Audience.PUBLIC,
}


def audience_of(endpoint: str | None) -> Audience | None:
    """The audience of an endpoint, or None when no rule names it (then nobody may reach it)."""
    if endpoint is None:
        return None
    if endpoint in RULES:
        return RULES[endpoint]
    blueprint = endpoint.rpartition(".")[0]
    return RULES.get(f"{blueprint}.*") if blueprint else None


def enforce() -> ResponseReturnValue | None:
    """Before every request: let it through, send it to sign-in, or refuse it."""
    if request.endpoint is None:
        return None  # no such page: the 404 handler answers
    audience = audience_of(request.endpoint)
    if audience is Audience.PUBLIC:
        return None
    if not current_user.is_authenticated:
        if audience is None:
            abort(404)
        if g.pop("session_expired", False):
            record_activity(SessionExpiredEvent(), Outcome.REFUSED)
            flash("Your session has ended. Please sign in again.", "info")
        if wants_json():
            abort(401)
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    if (
        audience is Audience.SIGNED_IN
        or (audience is Audience.ADMIN and current_user.is_admin)
        or (audience is Audience.UPLOADER and current_user.can_upload)
    ):
        return None
    record_activity(AccessDeniedEvent(path=request.path, method=request.method), Outcome.REFUSED)
    abort(403)


def init_app(app: Flask) -> None:
    app.before_request(enforce)
