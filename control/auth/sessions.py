"""Server-side web sessions behind flask-login.

The signed cookie carries only a random session id; the database keeps a row per session (by the
id's hash) with when it started, was last seen and ended. So signing out really ends a session (a
copied cookie is refused afterwards), an idle or too old session expires on the server whatever the
cookie says, and a deactivated user is out on their next request. Rows live in the shared database,
so any portal instance can serve any request.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass, fields

import sqlalchemy as sa
from flask import g
from flask_login import UserMixin

from control import accounts, db, services
from control.extensions import login_manager
from control.settings import SiteSettings

# Touching last_seen_at on every request would make every page view a write.
LAST_SEEN_RESOLUTION = dt.timedelta(seconds=30)


@dataclass(frozen=True)
class SignedInUser(UserMixin):
    """The flask-login user: an account plus the session it signed in with."""

    account: accounts.User
    session_id: str

    def get_id(self) -> str:
        # flask-login keeps this in the cookie: the session id, not the user id (see module doc).
        return self.session_id

    @property
    def is_active(self) -> bool:
        return self.account.is_active

    def __getattr__(self, name: str):
        return getattr(self.account, name)


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


# A session's row with its user's account (``accounts.row_to_user``), by the id's hash (built
# once: compiled once). One query signs a request in.
SESSION_ROW = (
    sa.select(
        db.web_sessions,
        *(db.users.c[field.name] for field in fields(accounts.User)),
    )
    .join(db.users, db.users.c.id == db.web_sessions.c.user_id)
    .where(db.web_sessions.c.id_hash == sa.bindparam("id_hash"))
)


def find_session(connection: sa.Connection, session_id: str) -> sa.Row | None:
    """The session's row (joined with its user's account), if any."""
    return connection.execute(SESSION_ROW, {"id_hash": _hash(session_id)}).first()


def touch_due(row: sa.Row, now: dt.datetime) -> bool:
    """Whether the session's last-seen time is old enough to be written again."""
    return now - row.last_seen_at > LAST_SEEN_RESOLUTION


def is_live(row: sa.Row | None, now: dt.datetime, settings: SiteSettings) -> bool:
    """Whether the session of ``row`` lets its user in: not ended, not expired, user active."""
    return (
        row is not None
        and row.ended_at is None
        and row.is_active
        and not expired(row.created_at, row.last_seen_at, now, settings)
    )


def start_session(connection: sa.Connection, account: accounts.User, client_address: str) -> SignedInUser:
    """Open a new session for ``account`` (a fresh id at every sign-in)."""
    session_id = secrets.token_urlsafe(32)
    now = db.utcnow()
    connection.execute(
        db.web_sessions.insert().values(
            id_hash=_hash(session_id),
            user_id=account.id,
            created_at=now,
            last_seen_at=now,
            client_address=client_address,
        )
    )
    connection.execute(db.users.update().where(db.users.c.id == account.id).values(last_login_at=now))
    return SignedInUser(account, session_id)


def end_session(session_id: str) -> None:
    with services.engine().begin() as connection:
        connection.execute(
            db.web_sessions.update()
            .where(db.web_sessions.c.id_hash == _hash(session_id), db.web_sessions.c.ended_at.is_(None))
            .values(ended_at=db.utcnow())
        )


def expired(
    created_at: dt.datetime, last_seen_at: dt.datetime, now: dt.datetime, settings: SiteSettings
) -> bool:
    """Whether a session is past the idle timeout or the absolute lifetime."""
    idle = dt.timedelta(minutes=settings.session_idle_minutes)
    lifetime = dt.timedelta(hours=settings.session_lifetime_hours)
    return now - last_seen_at > idle or now - created_at > lifetime


@login_manager.user_loader
def load_session(session_id: str) -> SignedInUser | None:
    """The signed-in user of a live session, or None (which flask-login treats as signed out)."""
    now = db.utcnow()
    with services.engine().begin() as connection:
        row = find_session(connection, session_id)
        if row is None or row.ended_at is not None or not row.is_active:
            return None
        settings = g.get("settings") or services.site().load_settings()
        if expired(row.created_at, row.last_seen_at, now, settings):
            connection.execute(
                db.web_sessions.update().where(db.web_sessions.c.id_hash == row.id_hash).values(ended_at=now)
            )
            g.session_expired = True
            return None
        if touch_due(row, now):
            connection.execute(
                db.web_sessions.update()
                .where(db.web_sessions.c.id_hash == row.id_hash)
                .values(last_seen_at=now)
            )
    return SignedInUser(accounts.row_to_user(row), session_id)
