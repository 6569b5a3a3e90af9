"""One feeder at a time, however many control planes share the database.

The lock dies with its holder, so that a feeder killed mid-batch hands over at once rather than
after a lease runs out: on PostgreSQL a session-level advisory lock held by a connection of its
own (the server drops it when the connection goes), on SQLite an ``flock`` on a file beside the
database (the kernel drops it when the process goes; SQLite's database is on one machine anyway).
The lock only keeps feeders from doing the same work twice: correctness does not rest on it, as
every batch commits through a compare-and-set of the state row (``control.catalog.store``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import sqlalchemy as sa

# pg_try_advisory_lock's key: any 64-bit number the portal uses for nothing else.
ADVISORY_KEY = 0x70616373_63617400  # "pacscat\0"


class FeedLock:
    """The feeder's lock on the catalog of one database."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._connection: sa.Connection | None = None
        self._file: int | None = None

    @property
    def _postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def _lock_path(self) -> Path:
        return Path(f"{self.engine.url.database}.catalog-feeder.lock")

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; True when this process holds it now."""
        if self.holds():
            return True
        if self._postgresql:
            connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            taken = connection.execute(sa.select(sa.func.pg_try_advisory_lock(ADVISORY_KEY))).scalar_one()
            if taken:
                self._connection = connection
            else:
                connection.close()
            return bool(taken)
        descriptor = os.open(self._lock_path(), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return False
        self._file = descriptor
        return True

    def holds(self) -> bool:
        """Whether the lock is still this process's (a PostgreSQL restart takes it away)."""
        if self._file is not None:
            return True
        if self._connection is None:
            return False
        try:
            self._connection.execute(sa.text("SELECT 1"))
        except sa.exc.DBAPIError:
            self.release()
            return False
        return True

    def release(self) -> None:
        if self._connection is not None:
            # Invalidated, the connection is closed for good rather than pooled with the lock held.
            with contextlib.suppress(sa.exc.DBAPIError):
                self._connection.invalidate()
                self._connection.close()
            self._connection = None
        if self._file is not None:
            os.close(self._file)
            self._file = None
