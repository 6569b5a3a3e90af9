"""Slowing down and then refusing repeated failed sign-ins, without letting anyone lock others out.

Every wrong password (or unknown name) is a row of ``sign_in_failures`` keyed by the name as
sign-in matches it (``accounts.username_key``: NFC and case folding, so ``\u212aristoss`` with a
Kelvin sign, ``kri\u017ftoss`` with a long s and ``kristoß`` all count against ``kristoss``) and by
the client address. The table lives in the shared database, so spreading attempts over portal
instances gains nothing. Three limits, each over a sliding window:

- one account from one address: ``PAIR_LIMIT`` failures in ``PAIR_WINDOW``. This is the lock
  brute force meets first, and it holds only that address: a stranger's guesses never keep the
  account's owner out.
- one address naming anyone: ``ADDRESS_LIMIT`` in ``PAIR_WINDOW`` (one password tried on many
  names).
- one account from everywhere: ``ACCOUNT_LIMIT`` in ``ACCOUNT_WINDOW``, for guesses spread over
  many addresses. It locks the account for addresses it has not signed in from in the last
  ``KNOWN_ADDRESS_DAYS`` days; the owner's usual places still get in (each under its own lock).

Past ``SLOW_AFTER`` failures each answer is delayed a little more. While locked, sign-in is refused
even with the right password, and the attempt is not counted. The admin sees every lock in force
(``current_locks``) and can lift one (``lift``), which forgets the failures behind it.
"""

from __future__ import annotations

import datetime as dt
import enum
import time
from dataclasses import dataclass

import sqlalchemy as sa

from control import db
from control.accounts import username_key

PAIR_WINDOW = dt.timedelta(minutes=15)
PAIR_LIMIT = 5
ADDRESS_LIMIT = 20
ACCOUNT_WINDOW = dt.timedelta(hours=24)
ACCOUNT_LIMIT = 50
KNOWN_ADDRESS_DAYS = 30
SLOW_AFTER = 3
MAX_DELAY = 3.0

failures = db.sign_in_failures


class LockKind(enum.StrEnum):
    """Which limit a lock comes from; the values are what the admin's page and the log show."""

    ACCOUNT_FROM_ADDRESS = "account from one address"
    ADDRESS = "address, for every account"
    ACCOUNT = "account, from new addresses"


@dataclass(frozen=True)
class Lock:
    """A lock in force: what it holds, since how many failures, until when (naive UTC)."""

    kind: LockKind
    account_key: str
    client_address: str
    failures: int
    until: dt.datetime


@dataclass(frozen=True)
class Verdict:
    """What the recent failures say about one more attempt."""

    pair_failures: int
    address_failures: int
    lock: Lock | None
    now: dt.datetime

    @property
    def delay(self) -> float:
        """Seconds to wait before answering, growing with the failures."""
        count = max(self.pair_failures, self.address_failures // 4)
        return min(MAX_DELAY, 0.5 * max(0, count - SLOW_AFTER + 1))


def _condition(account_key: str | None, client_address: str | None) -> list[sa.ColumnElement[bool]]:
    condition = []
    if account_key is not None:
        condition.append(failures.c.account_key == account_key)
    if client_address is not None:
        condition.append(failures.c.client_address == client_address)
    return condition


def _lock_condition(kind: LockKind, account_key: str, client_address: str) -> list[sa.ColumnElement[bool]]:
    """The failures that make up a lock of ``kind``."""
    if kind is LockKind.ACCOUNT_FROM_ADDRESS:
        return _condition(account_key, client_address)
    if kind is LockKind.ADDRESS:
        return _condition(None, client_address)
    return _condition(account_key, None)


def _count(connection: sa.Connection, condition: list, since: dt.datetime) -> int:
    query = sa.select(sa.func.count()).select_from(failures).where(failures.c.at > since, *condition)
    return connection.execute(query).scalar_one()


def _lock_end(
    connection: sa.Connection, condition: list, window: dt.timedelta, limit: int, now: dt.datetime
) -> dt.datetime | None:
    """When the count over the window drops below ``limit`` again (when the ``limit``-th most
    recent failure leaves the window); None when it is below the limit already."""
    query = (
        sa.select(failures.c.at)
        .where(failures.c.at > now - window, *condition)
        .order_by(failures.c.at.desc())
        .offset(limit - 1)
        .limit(1)
    )
    oldest_counted = connection.execute(query).scalar()
    return oldest_counted + window if oldest_counted is not None else None


def _known_address(
    connection: sa.Connection, account_key: str, client_address: str, now: dt.datetime
) -> bool:
    """Whether the account signed in from this address lately."""
    since = now - dt.timedelta(days=KNOWN_ADDRESS_DAYS)
    query = (
        sa.select(db.web_sessions.c.id_hash)
        .join(db.users, db.users.c.id == db.web_sessions.c.user_id)
        .where(
            db.users.c.username_key == account_key,
            db.web_sessions.c.client_address == client_address,
            db.web_sessions.c.created_at > since,
        )
        .limit(1)
    )
    return connection.execute(query).first() is not None


def check(connection: sa.Connection, username: str, client_address: str) -> Verdict:
    """The verdict on a sign-in attempt naming ``username`` from ``client_address``."""
    now = db.utcnow()
    key = username_key(username)
    pair = _condition(key, client_address)
    from_address = _condition(None, client_address)
    pair_failures = _count(connection, pair, now - PAIR_WINDOW)
    address_failures = _count(connection, from_address, now - PAIR_WINDOW)
    locks: list[Lock] = []

    def add_lock(
        kind: LockKind,
        account_key: str,
        address: str,
        count: int,
        condition: list,
        window: dt.timedelta,
        limit: int,
    ) -> None:
        # None when the failures were forgotten meanwhile (a sign-in of the owner): no lock.
        until = _lock_end(connection, condition, window, limit, now)
        if until is not None:
            locks.append(Lock(kind, account_key, address, count, until))

    if pair_failures >= PAIR_LIMIT:
        add_lock(
            LockKind.ACCOUNT_FROM_ADDRESS, key, client_address, pair_failures, pair, PAIR_WINDOW, PAIR_LIMIT
        )
    if address_failures >= ADDRESS_LIMIT:
        add_lock(
            LockKind.ADDRESS, "", client_address, address_failures, from_address, PAIR_WINDOW, ADDRESS_LIMIT
        )
    account = _condition(key, None)
    account_failures = _count(connection, account, now - ACCOUNT_WINDOW)
    if account_failures >= ACCOUNT_LIMIT and not _known_address(connection, key, client_address, now):
        add_lock(LockKind.ACCOUNT, key, "", account_failures, account, ACCOUNT_WINDOW, ACCOUNT_LIMIT)
    lock = max(locks, key=lambda found: found.until) if locks else None
    return Verdict(pair_failures, address_failures, lock, now)


def record_failure(connection: sa.Connection, username: str, client_address: str) -> None:
    """Count a failed sign-in; forget failures too old to count for any limit."""
    now = db.utcnow()
    connection.execute(failures.delete().where(failures.c.at < now - max(PAIR_WINDOW, ACCOUNT_WINDOW)))
    connection.execute(
        failures.insert().values(at=now, account_key=username_key(username), client_address=client_address)
    )


def record_success(connection: sa.Connection, username: str, client_address: str) -> None:
    """The owner got in from here: the typos they made from this address stop counting there."""
    connection.execute(failures.delete().where(*_condition(username_key(username), client_address)))


def current_locks(connection: sa.Connection) -> list[Lock]:
    """Every lock in force now, latest end first."""
    now = db.utcnow()
    found: list[Lock] = []
    for kind, columns, window, limit in (
        (
            LockKind.ACCOUNT_FROM_ADDRESS,
            (failures.c.account_key, failures.c.client_address),
            PAIR_WINDOW,
            PAIR_LIMIT,
        ),
        (LockKind.ADDRESS, (failures.c.client_address,), PAIR_WINDOW, ADDRESS_LIMIT),
        (LockKind.ACCOUNT, (failures.c.account_key,), ACCOUNT_WINDOW, ACCOUNT_LIMIT),
    ):
        groups = connection.execute(
            sa.select(*columns, sa.func.count().label("failures"))
            .where(failures.c.at > now - window)
            .group_by(*columns)
            .having(sa.func.count() >= limit)
        ).all()
        for group in groups:
            account_key = group.account_key if "account_key" in group._fields else ""
            client_address = group.client_address if "client_address" in group._fields else ""
            condition = _lock_condition(kind, account_key, client_address)
            until = _lock_end(connection, condition, window, limit, now)
            if until is not None:
                found.append(Lock(kind, account_key, client_address, group.failures, until))
    return sorted(found, key=lambda lock: lock.until, reverse=True)


def lift(connection: sa.Connection, kind: LockKind, account_key: str, client_address: str) -> int:
    """Forget the failures behind a lock, which lifts it; return how many were forgotten."""
    condition = _lock_condition(kind, account_key, client_address)
    return connection.execute(failures.delete().where(*condition)).rowcount


def slow_down(verdict: Verdict) -> None:
    if verdict.delay:
        time.sleep(verdict.delay)
