"""An activity log of years: rows written straight into the control plane's SQLite table.

A hospital's portal records every search, download, viewer opening and patient link use; over
years that is millions of rows. ``fill`` writes ``count`` such rows, spread evenly over the last
``years`` with a plausible mix of actions, users, patients' tokens, addresses and refusals, in
large transactions through sqlite3 (the portal's own code path would take hours for millions).
The activity scenario then asks the admin's pages for them through the portal.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

# (action, outcome, share of the rows, by a patient's token?)
MIX = (
    ("search", "ok", 30, False),
    ("list-opened", "ok", 20, False),
    ("download", "ok", 10, False),
    ("viewer-opened", "ok", 10, False),
    ("token-used", "ok", 12, True),
    ("sign-in", "ok", 6, False),
    ("sign-out", "ok", 4, False),
    ("sign-in", "refused", 3, False),
    ("access-denied", "refused", 1, False),
    ("token-refused", "refused", 1, True),
    ("upload", "ok", 2, False),
    ("settings-changed", "ok", 1, False),
)
USERS = 300
ADDRESSES = 2000
BATCH = 50_000
COLUMNS = (
    "at",
    "action",
    "outcome",
    "user_id",
    "username",
    "token_id",
    "client_address",
    "user_agent",
    "patient",
    "study",
    "detail",
)
USER_AGENT = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0"


def username(number: int) -> str:
    return f"doctor{number:03d}"


def address(number: int) -> str:
    return f"10.{number // 250 % 250}.{number % 250}.{7 + number % 3}"


def rows(count: int, years: float, now: dt.datetime, seed: int = 7) -> Iterator[tuple]:
    """``count`` rows in time order, the last one at ``now``."""
    chooser = random.Random(seed)
    kinds = [kind for kind in MIX for _share in range(kind[2])]
    span = dt.timedelta(days=365.25 * years)
    start = now - span
    step = span / max(1, count - 1)
    for index in range(count):
        action, outcome, _share, by_token = chooser.choice(kinds)
        user = chooser.randrange(USERS)
        patient = f"PATIENT^{chooser.randrange(100_000):05d}"
        token_id = f"t{chooser.randrange(50_000):07d}" if by_token else ""
        yield (
            (start + step * index).strftime("%Y-%m-%d %H:%M:%S.%f"),
            action,
            outcome,
            None if by_token or outcome != "ok" else user + 1,
            "" if by_token else username(user),
            token_id,
            address(chooser.randrange(ADDRESSES)),
            USER_AGENT,
            patient if action not in ("sign-in", "sign-out", "access-denied") else "",
            f"1.2.826.0.1.{chooser.randrange(10**9)}" if action in ("download", "viewer-opened") else "",
            json.dumps({"criteria": "PatientID"}) if action == "search" else "{}",
        )


def fill(database: Path, count: int, years: float = 5.0, now: dt.datetime | None = None) -> None:
    """Append ``count`` rows to the activity table of the SQLite database at ``database``."""
    now = now or dt.datetime.now(dt.UTC).replace(tzinfo=None)
    connection = sqlite3.connect(database, timeout=60)
    # Indexes are made again after the rows are in: sorting once is much faster than keeping
    # seven indexes in order through millions of inserts, and leaves the same indexes.
    indexes = connection.execute(
        "SELECT name, sql FROM sqlite_master "
        "WHERE type = 'index' AND tbl_name = 'activity' AND sql IS NOT NULL"
    ).fetchall()
    for name, _sql in indexes:
        connection.execute(f'DROP INDEX "{name}"')
    # Column names from the fixed list above, values as parameters.
    insert = f"INSERT INTO activity ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"  # noqa: S608
    try:
        batch: list[tuple] = []
        for row in rows(count, years, now):
            batch.append(row)
            if len(batch) == BATCH:
                with connection:
                    connection.executemany(insert, batch)
                batch.clear()
        with connection:
            connection.executemany(insert, batch)
        for _name, sql in indexes:
            connection.execute(sql)
        connection.execute("ANALYZE")
    finally:
        connection.close()
