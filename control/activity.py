"""The activity log: every connection and action, recorded through one function.

``record_activity`` writes one row of ``db.activity``; the admin's activity pages, the CSV export and
the tests read those same rows. Who acted is a user (id and the name they had then) or a study
token's public id, never a token, password or cookie. The client address is the one Caddy forwarded:
Caddy is the only listener, so its header is the only one trusted.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import zoneinfo
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from flask import current_app, has_request_context, request
from flask_login import current_user

from control import db


class Action(enum.StrEnum):
    """What happened. The values are what the log stores and the admin filters on."""

    SIGN_IN = "sign-in"
    SIGN_OUT = "sign-out"
    LOCKED_OUT = "locked-out"
    SESSION_EXPIRED = "session-expired"
    ACCESS_DENIED = "access-denied"
    SEARCH = "search"
    LIST_OPENED = "list-opened"
    DOWNLOAD = "download"
    USER_CREATED = "user-created"
    USER_CHANGED = "user-changed"
    USER_DELETED = "user-deleted"
    SETTINGS_CHANGED = "settings-changed"
    UPLOAD = "upload"
    PDF_ATTACHED = "pdf-attached"
    WORKLIST_ORDER = "worklist-order"
    WORKLIST_DELETED = "worklist-deleted"
    TOKEN_MADE = "token-made"
    TOKEN_COPIED = "token-copied"
    TOKEN_USED = "token-used"
    TOKEN_REFUSED = "token-refused"
    TOKEN_IDENTITY = "token-identity-check"
    TOKEN_REVOKED = "token-revoked"
    TOKEN_EXTENDED = "token-extended"
    VIEWER_OPENED = "viewer-opened"
    DICOMWEB_DENIED = "dicomweb-denied"
    DESKTOP_VIEWER_OPENED = "desktop-viewer-opened"
    VIEWER_TOKEN_MADE = "viewer-token-made"
    VIEWER_TOKEN_USED = "viewer-token-used"
    VIEWER_TOKEN_REVOKED = "viewer-token-revoked"


class Outcome(enum.StrEnum):
    OK = "ok"
    REFUSED = "refused"
    FAILED = "failed"


_INSERT = db.activity.insert()  # one statement, compiled once, for every event


def record_activity(
    action: Action,
    outcome: Outcome = Outcome.OK,
    *,
    user_id: int | None = None,
    username: str | None = None,
    token_id: str = "",
    patient: str = "",
    study: str = "",
    connection: sa.Connection | None = None,
    **detail: Any,
) -> None:
    """Record one event. Request details (client, browser, signed-in user) are filled in."""
    client_address = user_agent = ""
    if has_request_context():
        client_address = request.remote_addr or ""
        user_agent = request.headers.get("User-Agent", "")[:300]
        if user_id is None and current_user and current_user.is_authenticated:
            user_id = current_user.id
            username = username or current_user.username
    row = {
        "at": db.utcnow(),
        "action": str(action),
        "outcome": str(outcome),
        "user_id": user_id,
        "username": (username or "")[:64],
        "token_id": token_id,
        "client_address": client_address,
        "user_agent": user_agent,
        "patient": patient[:200],
        "study": study[:100],
        "detail": json.dumps(detail, ensure_ascii=False, default=str),
    }
    if connection is not None:
        connection.execute(_INSERT, row)
        return
    with current_app.extensions["site"].engine.begin() as own_connection:
        own_connection.execute(_INSERT, row)


class ActivityList(enum.StrEnum):
    """The server activity lists of the admin's pages."""

    USERS = "users"  # what web users did
    TOKENS = "tokens"  # patients' access by study token
    REFUSED = "refused"  # refused or failed connections, grouped by client address


@dataclass(frozen=True)
class ActivityFilter:
    """What an admin narrowed the log to. Dates are local days in the site's time zone."""

    listing: ActivityList = ActivityList.USERS
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    user: str = ""
    action: str = ""
    address: str = ""
    user_id: int | None = None

    def conditions(self, time_zone: str) -> list[sa.ColumnElement[bool]]:
        table = db.activity
        if self.user_id is not None:
            conditions = [table.c.user_id == self.user_id]
        elif self.listing is ActivityList.USERS:
            conditions = [table.c.token_id == "", table.c.outcome == str(Outcome.OK)]
        elif self.listing is ActivityList.TOKENS:
            conditions = [table.c.token_id != ""]
        else:
            conditions = [table.c.outcome != str(Outcome.OK)]
        zone = zoneinfo.ZoneInfo(time_zone)
        if self.date_from:
            conditions.append(table.c.at >= _utc(dt.datetime.combine(self.date_from, dt.time(), zone)))
        if self.date_to:
            next_day = self.date_to + dt.timedelta(days=1)
            conditions.append(table.c.at < _utc(dt.datetime.combine(next_day, dt.time(), zone)))
        if self.user:
            conditions.append(sa.func.lower(table.c.username) == self.user.strip().lower())
        if self.action:
            conditions.append(table.c.action == self.action)
        if self.address:
            conditions.append(table.c.client_address == self.address.strip())
        return conditions


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(tzinfo=None)


def count_activity(connection: sa.Connection, filters: ActivityFilter, time_zone: str) -> int:
    query = sa.select(sa.func.count()).select_from(db.activity).where(*filters.conditions(time_zone))
    return connection.execute(query).scalar_one()


def list_activity(
    connection: sa.Connection,
    filters: ActivityFilter,
    time_zone: str,
    *,
    offset: int = 0,
    limit: int | None = 100,
) -> sa.CursorResult:
    """Matching rows, newest first."""
    query = (
        sa.select(db.activity)
        .where(*filters.conditions(time_zone))
        .order_by(db.activity.c.at.desc(), db.activity.c.id.desc())
        .offset(offset)
        .limit(limit)
    )
    return connection.execute(query)


def refused_by_address(
    connection: sa.Connection, filters: ActivityFilter, time_zone: str, *, offset: int = 0, limit: int = 100
) -> tuple[int, list[sa.Row]]:
    """Refused or failed events grouped by client address: how many, first, last, which actions."""
    table = db.activity
    grouped = (
        sa.select(
            table.c.client_address,
            sa.func.count().label("count"),
            sa.func.min(table.c.at).label("first_at"),
            sa.func.max(table.c.at).label("last_at"),
            sa.func.count(sa.distinct(table.c.username)).label("usernames"),
        )
        .where(*filters.conditions(time_zone))
        .group_by(table.c.client_address)
    )
    total = connection.execute(sa.select(sa.func.count()).select_from(grouped.subquery())).scalar_one()
    rows = connection.execute(
        grouped.order_by(sa.desc("last_at"), table.c.client_address).offset(offset).limit(limit)
    ).all()
    return total, rows


def get_event(connection: sa.Connection, event_id: int) -> sa.Row | None:
    return connection.execute(sa.select(db.activity).where(db.activity.c.id == event_id)).first()
