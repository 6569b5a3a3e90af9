"""Viewer tokens: bearer tokens that let a DICOMweb client read exactly what it was given.

A desktop program has no browser cookie, so the portal hands it a token with the address to read
from. Two kinds:

- **desktop**: made when a user presses "Desktop viewer" on a patient, study or series (or a
  patient on their page), for that patient's studies, that study or that series alone, and valid
  for ``DESKTOP_LIFETIME``: long enough for a large study to arrive over a slow line, short enough
  that a copied launch link is worthless the next day. It travels in the ``weasis://`` link that
  starts Weasis (``weasis_link``).
- **shared**: made by a user on a study's "Access for another viewer" page, for one study and a
  few days: a DICOMweb address plus token for a second opinion or a research viewer.

The token is 256 random bits; the database keeps its SHA-256 only, and every page and log row names
the token's public id. A token works only through the DICOMweb gate (``control.dicomweb``), which
applies its rules to it unchanged: reads only, its studies only, searches narrowed to them. It
ends at its expiry, when revoked, when the account that made it is deactivated or deleted, and,
for a patient's, as soon as the patient's study link stops working.

Uses are recorded in the activity log by the gate: the first request from each client address,
then one request a minute while the token is in use (``use_due``), so that the log says who read
what from where without a row for every image.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa

from control import db, services
from control.activity import record_activity
from control.events import ViewerTokenUsedEvent
from control.settings import SiteSettings
from control.tokens import store

DESKTOP_LIFETIME = dt.timedelta(minutes=30)
# How long a token for another viewer works, in days, as the page offers it.
SHARED_LIFETIMES = {1: "1 day", 7: "1 week", 30: "30 days", 90: "90 days"}
USE_RECORD_INTERVAL = dt.timedelta(minutes=1)
PUBLIC_ID_PREFIX = "viewer-"

_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")
_BEARER = re.compile(r"bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)


class Kind(enum.StrEnum):
    DESKTOP = "desktop"
    SHARED = "shared"


class Scope(enum.StrEnum):
    PATIENT = "patient"
    STUDY = "study"
    SERIES = "series"


class TokenState(enum.Enum):
    VALID = "valid"
    EXPIRED = "expired"
    REVOKED = "revoked"
    ENDED = "ended"  # its account is no longer active, or its patient's link no longer works


@dataclass(frozen=True)
class Opened:
    """What a token reads: one series, one study, or one patient's studies."""

    scope: Scope
    study_uids: tuple[str, ...]
    series_uid: str = ""
    patient_name: str = ""
    patient_id: str = ""
    # The archive's ids of those studies, in the same order: a UID names one patient's study only
    # while no other patient's study has it (control.dicomweb.rules.owned).
    study_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ViewerToken:
    """A token's row (joined with whether the account that made it is still active)."""

    row: sa.Row

    @property
    def id(self) -> int:
        return self.row.id

    @property
    def public_id(self) -> str:
        return self.row.public_id

    @property
    def study_uids(self) -> list[str]:
        return json.loads(self.row.study_uids)

    @property
    def studies(self) -> dict[str, str]:
        """Each Study Instance UID the token reads, with the archive's id of the study it was made for."""
        return dict(zip(self.study_uids, json.loads(self.row.orthanc_study_ids), strict=True))

    @property
    def series_uids(self) -> list[str]:
        return [self.row.series_uid] if self.row.series_uid else []

    def state(self, now: dt.datetime) -> TokenState:
        """The token's own state; ``look_up`` adds the state of the link a patient's came from."""
        if self.row.revoked_at is not None:
            return TokenState.REVOKED
        if now >= self.row.expires_at:
            return TokenState.EXPIRED
        if self.row.issued_by_user_id is not None and not self.row.issuer_active:
            return TokenState.ENDED
        return TokenState.VALID


def new_secret() -> str:
    """A token: 256 random bits in 43 URL-safe characters (fits a header, a command line, a URL)."""
    return secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def bearer_secret(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header; None when the request has no bearer.

    A bearer that cannot be one of ours comes back as "" (presented, and unknown): a request that
    carries a bearer is judged as that bearer alone, never by the cookies beside it.
    """
    if not authorization:
        return None
    match = _BEARER.fullmatch(authorization)
    if match is None:
        return None  # another scheme (Basic ...): not a viewer token
    token = match.group(1)
    return token if _SECRET.fullmatch(token) else ""


# Built once: a statement SQLAlchemy has compiled before runs at a fraction of the cost.
_TOKEN_BY_HASH = (
    sa.select(db.viewer_tokens, db.users.c.is_active.label("issuer_active"))
    .outerjoin(db.users, db.users.c.id == db.viewer_tokens.c.issued_by_user_id)
    .where(db.viewer_tokens.c.secret_hash == sa.bindparam("secret_hash"))
)
_TOKEN_BY_ID = (
    sa.select(db.viewer_tokens, db.users.c.is_active.label("issuer_active"))
    .outerjoin(db.users, db.users.c.id == db.viewer_tokens.c.issued_by_user_id)
    .where(db.viewer_tokens.c.id == sa.bindparam("token_id"))
)


def find(connection: sa.Connection, secret: str) -> ViewerToken | None:
    """The token presented, whatever its state; None for anything unknown."""
    if not _SECRET.fullmatch(secret):
        return None
    wanted = secret_hash(secret)
    row = connection.execute(_TOKEN_BY_HASH, {"secret_hash": wanted}).first()
    if row is None or not hmac.compare_digest(row.secret_hash, wanted):
        return None
    return ViewerToken(row)


def get(connection: sa.Connection, token_id: int) -> ViewerToken | None:
    row = connection.execute(_TOKEN_BY_ID, {"token_id": token_id}).first()
    return ViewerToken(row) if row else None


def state_of(
    connection: sa.Connection, token: ViewerToken, settings: SiteSettings, now: dt.datetime
) -> TokenState:
    """The token's state, counting the patient's link a patient's token came from."""
    own = token.state(now)
    if own is not TokenState.VALID or token.row.study_token_id is None:
        return own
    link = store.get(connection, token.row.study_token_id)
    if link is None or link.state(settings.token_days, now.date()) is not store.TokenState.VALID:
        return TokenState.ENDED
    return TokenState.VALID


def look_up(
    connection: sa.Connection, secret: str, settings: SiteSettings, now: dt.datetime
) -> tuple[ViewerToken | None, bool]:
    """The presented token (None when unknown) and whether it works now."""
    token = find(connection, secret)
    if token is None:
        return None, False
    return token, state_of(connection, token, settings, now) is TokenState.VALID


def issue(
    connection: sa.Connection,
    opened: Opened,
    *,
    kind: Kind,
    expires_at: dt.datetime,
    now: dt.datetime,
    client_address: str,
    issued_by_user_id: int | None = None,
    issued_by: str = "",
    study_token_id: int | None = None,
    note: str = "",
) -> tuple[ViewerToken, str]:
    """A new token for ``opened``; returns it with its secret, which is never stored."""
    secret = new_secret()
    public_id = PUBLIC_ID_PREFIX + secrets.token_hex(6)
    result = connection.execute(
        db.viewer_tokens.insert()
        .values(
            public_id=public_id,
            secret_hash=secret_hash(secret),
            kind=str(kind),
            scope=str(opened.scope),
            study_uids=json.dumps(list(opened.study_uids)),
            orthanc_study_ids=json.dumps(list(opened.study_ids)),
            series_uid=opened.series_uid,
            patient_name=opened.patient_name[:200],
            patient_id=opened.patient_id[:100],
            issued_by_user_id=issued_by_user_id,
            issued_by=issued_by[:64],
            study_token_id=study_token_id,
            note=note[:200],
            issued_at=now,
            issued_from=client_address[:64],
            expires_at=expires_at,
        )
        .returning(db.viewer_tokens.c.id)
    )
    token = get(connection, result.scalar_one())
    assert token is not None
    return token, secret


def use_due(token: ViewerToken, client_address: str, now: dt.datetime) -> bool:
    """Whether this request is one the activity log records (see the module)."""
    row = token.row
    return (
        row.last_used_at is None
        or row.last_used_from != client_address
        or now - row.last_used_at >= USE_RECORD_INTERVAL
    )


def claim_use(connection: sa.Connection, token: ViewerToken, client_address: str, now: dt.datetime) -> bool:
    """Note a use when one is due; True for the one request (of several at once) that got it."""
    table = db.viewer_tokens
    result = connection.execute(
        table.update()
        .where(
            table.c.id == token.id,
            sa.or_(
                table.c.last_used_at.is_(None),
                table.c.last_used_from != client_address,
                table.c.last_used_at <= now - USE_RECORD_INTERVAL,
            ),
        )
        .values(uses=table.c.uses + 1, last_used_at=now, last_used_from=client_address[:64])
    )
    return result.rowcount == 1


def revoke(connection: sa.Connection, token_id: int, revoked_by: str, now: dt.datetime) -> bool:
    """Revoke a token; False when it was revoked already."""
    result = connection.execute(
        db.viewer_tokens.update()
        .where(db.viewer_tokens.c.id == token_id, db.viewer_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now, revoked_by=revoked_by[:64])
    )
    return result.rowcount == 1


def list_tokens(
    connection: sa.Connection,
    *,
    patient_id: str = "",
    study_uid: str = "",
    kind: Kind | None = None,
    limit: int = 50,
) -> list[ViewerToken]:
    """Tokens, newest first: all, or a patient's, or those that read a study."""
    table = db.viewer_tokens
    query = (
        sa.select(table, db.users.c.is_active.label("issuer_active"))
        .outerjoin(db.users, db.users.c.id == table.c.issued_by_user_id)
        .order_by(table.c.issued_at.desc(), table.c.id.desc())
        .limit(limit)
    )
    if patient_id:
        query = query.where(table.c.patient_id == patient_id)
    if study_uid:
        # The JSON list holds quoted UIDs; a UID is digits and dots, so the quoted form is exact.
        query = query.where(table.c.study_uids.contains(json.dumps(study_uid)))
    if kind is not None:
        query = query.where(table.c.kind == str(kind))
    return [ViewerToken(row) for row in connection.execute(query)]


def listing(
    connection: sa.Connection, settings: SiteSettings, **filters: Any
) -> list[tuple[ViewerToken, TokenState]]:
    """``list_tokens`` with each token's state now, for the pages that list them."""
    now = db.utcnow()
    return [
        (token, state_of(connection, token, settings, now)) for token in list_tokens(connection, **filters)
    ]


def weasis_command(dicomweb_url: str, secret: str, opened: Opened) -> str:
    """The Weasis command that loads ``opened`` from the portal's DICOMweb address.

    The grammar is Weasis's own (weasis.org, "Weasis Commands", ``dicom:rs``: ``-u/--url`` the
    DICOMweb service, ``-r/--request`` its query parameters as weasis-pacs-connector names them,
    ``studyUID`` and ``seriesUID``, repeatable with ``&``; ``-H/--header`` a header sent with every
    request), written with double quotes as its integration guide shows for DICOMweb archives with
    a bearer token. A series is asked for by ``seriesUID`` alone: with its study's UID beside it,
    Weasis would load the whole study.
    """
    if opened.scope is Scope.SERIES:
        request = f"seriesUID={opened.series_uid}"
    else:
        request = "&".join(f"studyUID={uid}" for uid in opened.study_uids)
    values = (dicomweb_url, request, secret)
    if any('"' in value or "\\" in value for value in values):
        raise ValueError("a value of the Weasis command cannot hold quotes or backslashes")
    return f'$dicom:rs --url "{dicomweb_url}" -r "{request}" -H "Authorization: Bearer {secret}"'


def weasis_link(dicomweb_url: str, secret: str, opened: Opened) -> str:
    """The ``weasis://`` link that starts Weasis on ``opened``.

    Weasis's web protocol (weasis.org, "Weasis Web Protocol", "How to build an URI"): the commands,
    URL-encoded, after the scheme ``weasis://``.
    """
    return "weasis://" + quote(weasis_command(dicomweb_url, secret, opened), safe="")


def study_label(study_uids: Sequence[str]) -> str:
    """A token's studies as the activity log's study column holds them (100 characters)."""
    return study_uids[0] if len(study_uids) == 1 else f"{len(study_uids)} studies"


def record_use(token: ViewerToken, client_address: str, path: str) -> None:
    """Record a use of ``token`` in the activity log, when one is due (see the module)."""
    now = db.utcnow()
    if not use_due(token, client_address, now):
        return
    with services.engine().begin() as connection:
        if not claim_use(connection, token, client_address, now):
            return  # another request of the same moment recorded it
        row = token.row
        record_activity(
            ViewerTokenUsedEvent(
                kind=row.kind,
                issued_by=row.issued_by or "the patient's link",
                studies=token.study_uids,
                series=row.series_uid or None,
                path=path[:200],
            ),
            connection=connection,
            user_id=row.issued_by_user_id,
            username=row.issued_by,
            token_id=row.public_id,
            patient=row.patient_name,
            study=study_label(token.study_uids),
        )
