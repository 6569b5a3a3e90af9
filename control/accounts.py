"""Web user accounts: creation, password rules, hashing and checking.

Passwords are hashed with argon2id (argon2-cffi's RFC 9106 profile: memory-hard, 64 MiB per hash).
Any Unicode is accepted and nothing is truncated. Checking an unknown user costs the same hash as
checking a known one, so the answer's timing does not tell which usernames exist.

A new password follows OWASP ASVS 4.0.3 section 2.1, wherever it is set (the admin's pages, the
user's own page, ``./pacs user``, the first admin of ``./pacs up``): at least the site's
``password_min_length`` characters (never fewer than 8), not on the shipped list of common and
breached passwords (``control/passwords/``, no network look-up), and not containing the username.
No rules about kinds of characters. Passwords set before the rules keep working: each one is
checked when it is next typed at sign-in, the only time it is in hand, and what falls short is
kept on the account for the admin's users page and the user's own reminder.
"""

from __future__ import annotations

import datetime as dt
import functools
import gzip
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from control import db, settings

# ASVS 2.1.1 asks for 12; the manual's product accepts 8, and no site may go below it.
LOWEST_PASSWORD_LENGTH = 8
COMMON_PASSWORDS = Path(__file__).parent / "passwords" / "common-passwords.txt.gz"
# A name this short (``al``) is in too many passwords to be a sign of a weak one.
SHORTEST_NAME_CHECKED = 3

_hasher = PasswordHasher()


@functools.cache
def _unknown_user_hash() -> str:
    """A hash of today's cost to check a password against when no such user exists, so that an
    unknown name takes as long as a wrong password. Made at the first sign-in, not at import:
    every process (each gunicorn worker, each ./pacs command) would pay 0.3 s for it."""
    return _hasher.hash("an unknown user never signs in")


class AccountError(ValueError):
    """A request about accounts that cannot be carried out, with a message for the admin.

    ``field`` names the form field the message belongs next to.
    """

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class User:
    """A web user as the pages see it (never with the password hash)."""

    id: int
    username: str
    real_name: str
    is_admin: bool
    is_active: bool
    can_upload: bool


def _normalise(password: str) -> str:
    # The same passphrase typed on two keyboards can arrive composed or decomposed.
    return unicodedata.normalize("NFC", password)


def username_key(username: str) -> str:
    return unicodedata.normalize("NFC", username).casefold()


@functools.cache
def _common_passwords() -> frozenset[str]:
    # Lowercased already; read once per process (19,640 lines, about 2 MB in memory).
    with gzip.open(COMMON_PASSWORDS, "rt", encoding="utf-8") as file:
        return frozenset(line.strip() for line in file if line.strip())


def minimum_password_length(connection: sa.Connection) -> int:
    """The site's ``password_min_length``, never below the lowest the portal allows."""
    stored = settings.SiteSettings.from_stored(db.get_settings(connection))
    return max(LOWEST_PASSWORD_LENGTH, stored.password_min_length)


def password_problems(password: str, username: str, minimum_length: int) -> list[str]:
    """What is wrong with ``password`` for the account ``username`` by the site's rules."""
    typed = _normalise(password)
    problems = []
    if len(typed) < minimum_length:
        problems.append(f"shorter than {minimum_length} characters")
    if typed.strip().lower() in _common_passwords():
        problems.append("on the list of common and breached passwords")
    name = username_key(username.strip())
    if len(name) >= SHORTEST_NAME_CHECKED and name in typed.casefold():
        problems.append("contains the username")
    return problems


def check_new_password(
    connection: sa.Connection, password: str, username: str, confirmation: str | None = None
) -> None:
    """Raise AccountError when a new password for ``username`` is not acceptable."""
    if confirmation is not None and password != confirmation:
        raise AccountError("The password and its confirmation differ.", "confirm")
    minimum_length = minimum_password_length(connection)
    problems = password_problems(password, username, minimum_length)
    if problems:
        if problems[0].startswith("shorter"):
            raise AccountError(f"A password needs at least {minimum_length} characters.", "password")
        if problems[0].startswith("on the list"):
            raise AccountError(
                "This password is on the list of common and breached passwords: choose another.", "password"
            )
        raise AccountError("A password must not contain the username.", "password")


def password_help(minimum_length: int) -> str:
    """The rules, as the password fields' help says them."""
    return (
        f"At least {minimum_length} characters; not a common or breached password, and not containing "
        "the username. A long passphrase of a few unrelated words is easy to remember; any characters "
        "are accepted and none is cut off."
    )


def hash_password(password: str) -> str:
    return _hasher.hash(_normalise(password))


def row_to_user(row: sa.Row) -> User:
    """The user of a row that holds the ``users`` columns of ``User`` (a join's row may hold more)."""
    return User(
        id=row.id,
        username=row.username,
        real_name=row.real_name,
        is_admin=row.is_admin,
        is_active=row.is_active,
        can_upload=row.can_upload,
    )


def create_user(
    connection: sa.Connection,
    username: str,
    password: str,
    *,
    is_admin: bool = False,
    can_upload: bool = False,
    real_name: str = "",
) -> User:
    """Create an account; raise AccountError for a taken or empty name or a weak password."""
    username = unicodedata.normalize("NFC", username.strip())
    if not username or len(username) > 64:
        raise AccountError("A username needs 1 to 64 characters.", "username")
    check_new_password(connection, password, username)
    key = username_key(username)
    taken = connection.execute(sa.select(db.users.c.id).where(db.users.c.username_key == key)).first()
    if taken:
        raise AccountError(f"The username {username!r} is taken.", "username")
    created = connection.execute(
        db.users.insert()
        .values(
            username=username,
            username_key=key,
            real_name=real_name,
            is_admin=is_admin,
            can_upload=can_upload,
            is_active=True,
            password_hash=hash_password(password),
            password_problem="",
            created_at=db.utcnow(),
        )
        .returning(*db.users.c)
    ).one()
    return row_to_user(created)


def get_user(connection: sa.Connection, user_id: int) -> User | None:
    row = connection.execute(sa.select(db.users).where(db.users.c.id == user_id)).first()
    return row_to_user(row) if row else None


def count_users(connection: sa.Connection) -> int:
    return connection.execute(sa.select(sa.func.count()).select_from(db.users)).scalar_one()


def authenticate(connection: sa.Connection, username: str, password: str) -> User | None:
    """The active user with this name and password, or None; the same work whichever fails."""
    row = connection.execute(
        sa.select(db.users).where(db.users.c.username_key == username_key(username))
    ).first()
    stored_hash = row.password_hash if row else _unknown_user_hash()
    try:
        _hasher.verify(stored_hash, _normalise(password))
        verified = row is not None
    except (VerificationError, InvalidHashError):
        verified = False
    if row is None or not verified or not row.is_active:
        return None
    changes = {}
    if _hasher.check_needs_rehash(stored_hash):
        changes["password_hash"] = hash_password(password)
    problem = "; ".join(password_problems(password, row.username, minimum_password_length(connection)))
    if problem != row.password_problem:
        changes["password_problem"] = problem
    if changes:
        connection.execute(db.users.update().where(db.users.c.id == row.id).values(**changes))
    return row_to_user(row)


def stored_password_problem(connection: sa.Connection, user_id: int) -> str | None:
    """What the account's password fell short of when last typed; "" for nothing, None if unknown."""
    return connection.execute(
        sa.select(db.users.c.password_problem).where(db.users.c.id == user_id)
    ).scalar_one_or_none()


@dataclass(frozen=True)
class UserDetails:
    """Everything an admin sees and edits about an account."""

    id: int
    username: str
    real_name: str
    phone: str
    email: str
    notes: str
    is_admin: bool
    is_active: bool
    can_upload: bool
    created_at: dt.datetime
    last_login_at: dt.datetime | None
    last_activity_at: dt.datetime | None
    password_problem: str | None


def _details_query() -> sa.Select:
    """Accounts with the time of each one's latest recorded activity."""
    last_activity = (
        sa.select(db.activity.c.user_id, sa.func.max(db.activity.c.at).label("last_activity_at"))
        .where(db.activity.c.user_id.is_not(None))
        .group_by(db.activity.c.user_id)
        .subquery()
    )
    return sa.select(db.users, last_activity.c.last_activity_at).outerjoin(
        last_activity, last_activity.c.user_id == db.users.c.id
    )


def list_users(connection: sa.Connection) -> list[UserDetails]:
    """All accounts, by username."""
    rows = connection.execute(_details_query().order_by(db.users.c.username_key))
    return [_details(row) for row in rows]


def get_details(connection: sa.Connection, user_id: int) -> UserDetails | None:
    row = connection.execute(_details_query().where(db.users.c.id == user_id)).first()
    return _details(row) if row else None


def _details(row: sa.Row) -> UserDetails:
    return UserDetails(
        id=row.id,
        username=row.username,
        real_name=row.real_name,
        phone=row.phone,
        email=row.email,
        notes=row.notes,
        is_admin=row.is_admin,
        is_active=row.is_active,
        can_upload=row.can_upload,
        created_at=row.created_at,
        last_login_at=row.last_login_at,
        last_activity_at=row.last_activity_at,
        password_problem=row.password_problem,
    )


def find_by_username(connection: sa.Connection, username: str) -> User | None:
    row = connection.execute(
        sa.select(db.users).where(db.users.c.username_key == username_key(username))
    ).first()
    return row_to_user(row) if row else None


def _other_active_admins(connection: sa.Connection, user_id: int) -> int:
    return connection.execute(
        sa.select(sa.func.count())
        .select_from(db.users)
        .where(db.users.c.is_admin, db.users.c.is_active, db.users.c.id != user_id)
    ).scalar_one()


def update_contact(connection: sa.Connection, user_id: int, **contact: str) -> None:
    """Change real name, phone, e-mail or notes."""
    allowed = {"real_name", "phone", "email", "notes"}
    connection.execute(
        db.users.update()
        .where(db.users.c.id == user_id)
        .values(**{name: (value or "").strip() for name, value in contact.items() if name in allowed})
    )


def set_flags(
    connection: sa.Connection,
    user_id: int,
    acting_user_id: int,
    *,
    is_active: bool | None = None,
    can_upload: bool | None = None,
    is_admin: bool | None = None,
) -> None:
    """Turn an account's switches; the last active admin, and the acting admin, keep theirs."""
    losing_admin = is_active is False or is_admin is False
    if losing_admin:
        if user_id == acting_user_id:
            raise AccountError("You cannot deactivate yourself or remove your own admin right.")
        target = get_user(connection, user_id)
        if target and target.is_admin and target.is_active and not _other_active_admins(connection, user_id):
            raise AccountError("This is the last active admin: make another admin first.")
    values = {
        name: value
        for name, value in {"is_active": is_active, "can_upload": can_upload, "is_admin": is_admin}.items()
        if value is not None
    }
    connection.execute(db.users.update().where(db.users.c.id == user_id).values(**values))
    if is_active is False:
        end_all_sessions(connection, user_id)


def rename(connection: sa.Connection, user_id: int, new_username: str) -> None:
    new_username = unicodedata.normalize("NFC", new_username.strip())
    if not new_username or len(new_username) > 64:
        raise AccountError("A username needs 1 to 64 characters.", "username")
    taken = find_by_username(connection, new_username)
    if taken and taken.id != user_id:
        raise AccountError(f"The username {new_username!r} is taken.", "username")
    connection.execute(
        db.users.update()
        .where(db.users.c.id == user_id)
        .values(username=new_username, username_key=username_key(new_username))
    )


def set_password(
    connection: sa.Connection, user_id: int, password: str, confirmation: str | None = None
) -> User:
    """Set a new password and end the account's sessions: whoever knew the old one is out.
    Returns the account as it is now."""
    user = get_user(connection, user_id)
    if user is None:
        raise AccountError("There is no such user.")
    check_new_password(connection, password, user.username, confirmation)
    changed = connection.execute(
        db.users.update()
        .where(db.users.c.id == user_id)
        .values(password_hash=hash_password(password), password_problem="")
        .returning(*db.users.c)
    ).one()
    end_all_sessions(connection, user_id)
    return row_to_user(changed)


def delete_user(connection: sa.Connection, user_id: int, acting_user_id: int) -> None:
    """Delete an account; its activity history stays in the log under the name it had."""
    if user_id == acting_user_id:
        raise AccountError("You cannot delete your own account.")
    target = get_user(connection, user_id)
    if target and target.is_admin and target.is_active and not _other_active_admins(connection, user_id):
        raise AccountError("This is the last active admin: make another admin first.")
    connection.execute(db.web_sessions.delete().where(db.web_sessions.c.user_id == user_id))
    connection.execute(db.users.delete().where(db.users.c.id == user_id))


def end_all_sessions(connection: sa.Connection, user_id: int) -> None:
    connection.execute(
        db.web_sessions.update()
        .where(db.web_sessions.c.user_id == user_id, db.web_sessions.c.ended_at.is_(None))
        .values(ended_at=db.utcnow())
    )
