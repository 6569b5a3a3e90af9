"""Viewer grants: what lets a patient's browser read one study through the DICOMweb gate.

Opening the viewer from a patient's page puts a signed, short-lived grant for that one study in a
cookie (``pacs_grant``, ``__Host-pacs_grant`` over https as ``control.cookies`` explains; HttpOnly,
SameSite=Lax, Secure with SSL, gone when the browser closes).
The gate accepts a grant only while its token still works: revoking or expiry ends it at once, as
the token row is checked on every request. A browser can hold grants for a few studies at once
(a patient with several links); nothing else in the archive opens with them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import sqlalchemy as sa
from flask import Request, current_app
from itsdangerous import BadSignature, URLSafeTimedSerializer
from werkzeug.wrappers import Response

from control import db
from control.tokens import store

COOKIE = "pacs_grant"
SECURE_COOKIE = "__Host-pacs_grant"
MAX_AGE = 12 * 3600
MAX_GRANTS = 8


@dataclass(frozen=True)
class Grant:
    token_id: int
    study_uid: str
    # The archive's study the token was made for, read from its row (the cookie holds the first two).
    orthanc_study_id: str = field(default="", compare=False)


def cookie_name(secure: bool) -> str:
    """The grants' cookie over https (``secure``) or http."""
    return SECURE_COOKIE if secure else COOKIE


def serializer(secret_key: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret_key, salt="pacs-study-grant")


def _serializer() -> URLSafeTimedSerializer:
    return serializer(current_app.config["SECRET_KEY"])


def read(request: Request) -> list[Grant]:
    """The grants the browser presents; a forged, tampered or stale cookie presents none."""
    return read_value(request.cookies.get(cookie_name(request.is_secure), ""), _serializer())


def read_value(value: str, signed_by: URLSafeTimedSerializer) -> list[Grant]:
    """The grants in a grants cookie's value (none when it is forged, tampered or stale)."""
    if not value:
        return []
    try:
        entries = signed_by.loads(value, max_age=MAX_AGE)
    except BadSignature:
        return []
    return [Grant(int(token_id), str(study_uid)) for token_id, study_uid in entries]


# Built once: a statement SQLAlchemy has compiled before runs at a fraction of the cost.
_TOKENS_BY_ID = sa.select(db.study_tokens).where(
    db.study_tokens.c.id.in_(sa.bindparam("ids", expanding=True))
)


def still_valid(
    connection: sa.Connection, presented: list[Grant], token_days: int, today: dt.date
) -> list[Grant]:
    """The grants whose tokens still work: a revoked or expired token ends its grant at once."""
    if not presented:
        return []
    rows = {
        row.id: store.StudyToken(row)
        for row in connection.execute(_TOKENS_BY_ID, {"ids": [grant.token_id for grant in presented]})
    }
    return [
        Grant(grant.token_id, grant.study_uid, rows[grant.token_id].row.orthanc_study_id)
        for grant in presented
        if grant.token_id in rows
        and rows[grant.token_id].row.study_uid == grant.study_uid
        and rows[grant.token_id].state(token_days, today) is store.TokenState.VALID
    ]


def granted_studies(held: list[Grant]) -> dict[str, str]:
    """The gate's view of valid grants: each granted Study Instance UID and its archive study."""
    return {grant.study_uid: grant.orthanc_study_id for grant in held}


def add(request: Request, response: Response, grant: Grant, secure: bool) -> None:
    """Add ``grant`` to the browser's grants (newest first, a few at most)."""
    kept = [existing for existing in read(request) if existing != grant]
    entries = [[item.token_id, item.study_uid] for item in [grant, *kept][:MAX_GRANTS]]
    response.set_cookie(
        cookie_name(secure),
        _serializer().dumps(entries),
        httponly=True,
        samesite="Lax",
        secure=secure,
        path="/",
    )
