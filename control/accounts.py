"""Web user accounts: creation, password hashing and checking.

Passwords are hashed with argon2id (argon2-cffi's RFC 9106 profile: memory-hard, 64 MiB per hash).
Any Unicode is accepted and nothing is truncated. Checking an unknown user costs the same hash as
checking a known one, so the answer's timing does not tell which usernames exist.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from control import db

MINIMUM_PASSWORD_LENGTH = 8

_hasher = PasswordHasher()
_UNKNOWN_USER_HASH = _hasher.hash("an unknown user never signs in")


class AccountError(ValueError):
    """A request about accounts that cannot be carried out, with a message for the admin."""


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


def check_new_password(password: str, confirmation: str | None = None) -> None:
    """Raise AccountError when a new password is not acceptable."""
    if confirmation is not None and password != confirmation:
        raise AccountError("The password and its confirmation differ.")
    if len(_normalise(password)) < MINIMUM_PASSWORD_LENGTH:
        raise AccountError(f"A password needs at least {MINIMUM_PASSWORD_LENGTH} characters.")


def hash_password(password: str) -> str:
    return _hasher.hash(_normalise(password))


def _row_to_user(row: sa.Row) -> User:
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
        raise AccountError("A username needs 1 to 64 characters.")
    check_new_password(password)
    key = username_key(username)
    taken = connection.execute(sa.select(db.users.c.id).where(db.users.c.username_key == key)).first()
    if taken:
        raise AccountError(f"The username {username!r} is taken.")
    result = connection.execute(
        db.users.insert().values(
            username=username,
            username_key=key,
            real_name=real_name,
            is_admin=is_admin,
            can_upload=can_upload,
            is_active=True,
            password_hash=hash_password(password),
            created_at=db.utcnow(),
        )
    )
    return get_user(connection, result.inserted_primary_key[0])


def get_user(connection: sa.Connection, user_id: int) -> User | None:
    row = connection.execute(sa.select(db.users).where(db.users.c.id == user_id)).first()
    return _row_to_user(row) if row else None


def count_users(connection: sa.Connection) -> int:
    return connection.execute(sa.select(sa.func.count()).select_from(db.users)).scalar_one()


def authenticate(connection: sa.Connection, username: str, password: str) -> User | None:
    """The active user with this name and password, or None; the same work whichever fails."""
    row = connection.execute(
        sa.select(db.users).where(db.users.c.username_key == username_key(username))
    ).first()
    stored_hash = row.password_hash if row else _UNKNOWN_USER_HASH
    try:
        _hasher.verify(stored_hash, _normalise(password))
        verified = row is not None
    except (VerificationError, InvalidHashError):
        verified = False
    if not verified or not row.is_active:
        return None
    if _hasher.check_needs_rehash(stored_hash):
        connection.execute(
            db.users.update().where(db.users.c.id == row.id).values(password_hash=hash_password(password))
        )
    return _row_to_user(row)
