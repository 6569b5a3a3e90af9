"""Slowing down and then refusing repeated failed sign-ins.

Failures are read back from the activity log (refused ``sign-in`` rows), which every portal instance
shares, so an attacker gains nothing by spreading attempts over instances. Two counters over the
last ``WINDOW``: failures naming one account (from anywhere) and failures from one client address
(naming anyone). Past ``SLOW_AFTER`` failures each answer is delayed a little more; past the limits
sign-in is refused outright, even with the right password, until the window has moved on.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

import sqlalchemy as sa

from control import db
from control.accounts import username_key
from control.activity import Action, Outcome

WINDOW = dt.timedelta(minutes=15)
SLOW_AFTER = 3
ACCOUNT_LIMIT = 5
ADDRESS_LIMIT = 20
MAX_DELAY = 3.0


@dataclass(frozen=True)
class Verdict:
    """What the recent failures say about one more attempt."""

    account_failures: int
    address_failures: int
    retry_after: dt.timedelta | None

    @property
    def locked(self) -> bool:
        return self.retry_after is not None

    @property
    def delay(self) -> float:
        """Seconds to wait before answering, growing with the failures."""
        failures = max(self.account_failures, self.address_failures // 4)
        return min(MAX_DELAY, 0.5 * max(0, failures - SLOW_AFTER + 1))


def _failures(connection: sa.Connection, condition: sa.ColumnElement[bool], since: dt.datetime):
    return connection.execute(
        sa.select(sa.func.count(), sa.func.max(db.activity.c.at)).where(
            db.activity.c.action == str(Action.SIGN_IN),
            db.activity.c.outcome == str(Outcome.REFUSED),
            db.activity.c.at > since,
            condition,
        )
    ).one()


def check(connection: sa.Connection, username: str, client_address: str) -> Verdict:
    now = db.utcnow()
    since = now - WINDOW
    account_count, account_last = _failures(
        connection, sa.func.lower(db.activity.c.username) == username_key(username), since
    )
    address_count, address_last = _failures(connection, db.activity.c.client_address == client_address, since)
    retry_after = None
    if account_count >= ACCOUNT_LIMIT:
        retry_after = account_last + WINDOW - now
    if address_count >= ADDRESS_LIMIT:
        retry_after = max(retry_after or dt.timedelta(0), address_last + WINDOW - now)
    return Verdict(account_count, address_count, retry_after)


def slow_down(verdict: Verdict) -> None:
    if verdict.delay:
        time.sleep(verdict.delay)
