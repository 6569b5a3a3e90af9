"""The activity log: every connection and action, recorded through one function.

``record_activity`` writes one row of ``db.activity``; the admin's activity pages, the CSV export and
the tests read those same rows. Who acted is a user (id and the name they had then) or a study
token's public id, never a token, password or cookie. The client address is the one Caddy forwarded:
Caddy is the only listener, so its header is the only one trusted.
"""

from __future__ import annotations

import enum
import json
from typing import Any

import sqlalchemy as sa
from flask import current_app, has_request_context, request
from flask_login import current_user

from control import db


class Action(enum.StrEnum):
    """What happened. The values are what the log stores and the admin filters on."""

    SIGN_IN = "sign-in"
    SIGN_OUT = "sign-out"
    SESSION_EXPIRED = "session-expired"
    ACCESS_DENIED = "access-denied"


class Outcome(enum.StrEnum):
    OK = "ok"
    REFUSED = "refused"
    FAILED = "failed"


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
        connection.execute(db.activity.insert().values(**row))
        return
    with current_app.extensions["site"].engine.begin() as own_connection:
        own_connection.execute(db.activity.insert().values(**row))
