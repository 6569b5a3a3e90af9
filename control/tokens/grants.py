"""Viewer grants: what lets a patient's browser read one study through the DICOMweb gate.

Opening the viewer from a patient's page puts a signed, short-lived grant for that one study in a
cookie (``pacs_grant``: HttpOnly, SameSite=Lax, Secure with SSL, gone when the browser closes).
The gate accepts a grant only while its token still works: revoking or expiry ends it at once, as
the token row is checked on every request. A browser can hold grants for a few studies at once
(a patient with several links); nothing else in the archive opens with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Request, Response, current_app
from itsdangerous import BadSignature, URLSafeTimedSerializer

COOKIE = "pacs_grant"
MAX_AGE = 12 * 3600
MAX_GRANTS = 8


@dataclass(frozen=True)
class Grant:
    token_id: int
    study_uid: str


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt="pacs-study-grant")


def read(request: Request) -> list[Grant]:
    """The grants the browser presents; a forged, tampered or stale cookie presents none."""
    value = request.cookies.get(COOKIE)
    if not value:
        return []
    try:
        entries = _serializer().loads(value, max_age=MAX_AGE)
    except BadSignature:
        return []
    return [Grant(int(token_id), str(study_uid)) for token_id, study_uid in entries]


def add(request: Request, response: Response, grant: Grant, secure: bool) -> None:
    """Add ``grant`` to the browser's grants (newest first, a few at most)."""
    kept = [existing for existing in read(request) if existing != grant]
    entries = [[item.token_id, item.study_uid] for item in [grant, *kept][:MAX_GRANTS]]
    response.set_cookie(
        COOKIE, _serializer().dumps(entries), httponly=True, samesite="Lax", secure=secure, path="/"
    )
