"""Stored files that the archive's index does not name: counted, and removed once a day old.

Orthanc writes a stored file, then commits it to its index, then acknowledges the store. An
archive node killed between the two (a crash, ``kill -9``, a power cut) leaves a file that no
index row names and that nothing would ever remove. With several nodes on one PostgreSQL index
this is the one thing a dead node leaves behind: the index itself is PostgreSQL's, and the other
nodes go on.

The sweep walks the storage folder (Orthanc's layout: ``ab/cd/abcd...``, one file per attachment
named by its UUID) and asks the index, a few hundred names at a time, which of them it knows
(``attachedfiles``, read straight from the archive's PostgreSQL database). A file it does not know
and that is older than ``MIN_AGE`` is an orphan: no store in progress is that old. Younger unknown
files are counted but left alone. Once a day one control plane does it (a lease in the shared
database, as the activity log's retention), and records what it removed as an
``archive-orphans`` event; ``./pacs archive orphans`` counts now and ``--remove`` sweeps now.

Only an archive whose index is on PostgreSQL is swept: Orthanc 1.10.1 holds its SQLite index
locked while it runs, so it cannot be asked which files it knows.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from control import db
from control.activity import record_activity
from control.events import ArchiveOrphansEvent
from control.runtime import configs
from control.site import Site

MIN_AGE = dt.timedelta(days=1)
BATCH = 500
LEASE = "orphan-sweep"
# A minute after a worker starts, then every hour: the lease makes it once a day.
FIRST_WAIT = 60
INTERVAL = 3600

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

log = logging.getLogger(__name__)


@dataclass
class Sweep:
    """What one look at the storage folder found (and, when removing, removed)."""

    files: int = 0  # stored files looked at
    orphans: int = 0  # not in the index and older than MIN_AGE
    orphan_bytes: int = 0
    recent: int = 0  # not in the index, younger: perhaps a store in progress, left alone
    removed: int = 0

    def describe(self) -> str:
        text = f"{self.files} stored files, {self.orphans} not in the archive's index and older than a day"
        if self.orphans:
            text += f" ({self.orphan_bytes / 1024 / 1024:.1f} MB)"
        if self.removed:
            text += f", {self.removed} removed"
        if self.recent:
            text += f"; {self.recent} newer ones not in the index yet (left alone)"
        return text


def stored_files(storage: Path) -> Iterator[Path]:
    """Every file in Orthanc's storage layout under ``storage`` (``ab/cd/abcd...``)."""
    for first in sorted(storage.iterdir()):
        if not (first.is_dir() and len(first.name) == 2):
            continue
        for second in sorted(first.iterdir()):
            if not (second.is_dir() and len(second.name) == 2):
                continue
            for path in second.iterdir():
                if _UUID.match(path.name) and path.name.startswith(first.name + second.name):
                    yield path


def known_to_index(connection: psycopg.Connection, names: list[str]) -> set[str]:
    """Which of the attachment UUIDs ``names`` the archive's index names."""
    rows = connection.execute("SELECT uuid FROM attachedfiles WHERE uuid = ANY(%s)", (names,))
    return {row[0] for row in rows}


def sweep(site: Site, *, remove: bool, now: float | None = None) -> Sweep:
    """Count the orphan files of the archive's storage, and remove them when ``remove``."""
    now = now or time.time()
    cutoff = now - MIN_AGE.total_seconds()
    found = Sweep()
    with psycopg.connect(configs.archive_database_url(site), connect_timeout=10) as connection:
        batch: list[Path] = []

        def judge() -> None:
            known = known_to_index(connection, [path.name for path in batch])
            for path in batch:
                if path.name in known:
                    continue
                try:
                    info = path.stat()
                except FileNotFoundError:
                    continue  # removed meanwhile (a study deleted)
                if info.st_mtime >= cutoff:
                    found.recent += 1
                    continue
                # No store takes a day between writing its file and committing it: this one never will.
                if remove:
                    path.unlink(missing_ok=True)
                    found.removed += 1
                found.orphans += 1
                found.orphan_bytes += info.st_size
            batch.clear()

        for path in stored_files(site.orthanc_storage):
            found.files += 1
            batch.append(path)
            if len(batch) >= BATCH:
                judge()
        if batch:
            judge()
    return found


def take_daily_lease(site: Site, today: dt.date) -> bool:
    """True for the first caller of the day, across workers and control planes."""
    with site.engine.begin() as connection:
        taken = connection.execute(
            db.revisions.update()
            .where(db.revisions.c.name == LEASE, db.revisions.c.value < today.toordinal())
            .values(value=today.toordinal())
        )
        return taken.rowcount == 1


def record(site: Site, found: Sweep, *, username: str | None = None) -> None:
    """The sweep's ``archive-orphans`` event (for an admin's command, ``username`` names who)."""
    with site.engine.begin() as connection:
        record_activity(
            ArchiveOrphansEvent(
                files=found.files,
                orphans=found.orphans,
                removed=found.removed,
                megabytes=round(found.orphan_bytes / 1024 / 1024, 1),
                recent=found.recent,
            ),
            connection=connection,
            username=username,
        )


def start_daily_sweep(site: Site) -> threading.Thread:
    """Once a day, in one worker of one control plane, sweep the orphans (a daemon thread)."""

    def run_daily() -> None:
        wait = threading.Event().wait
        wait(FIRST_WAIT)
        while True:
            run_once()
            wait(INTERVAL)

    def run_once() -> None:
        try:
            if configs.Topology.from_environment(site).archive_index != "postgresql":
                return
            if not take_daily_lease(site, dt.date.today()):
                return
            found = sweep(site, remove=True)
            log.warning("Orphan files of the archive: %s", found.describe())
            if found.orphans or found.recent:
                record(site, found)
        except Exception:
            log.exception("The sweep of orphan files failed; it is tried again tomorrow")

    thread = threading.Thread(target=run_daily, name="orphan-sweep", daemon=True)
    thread.start()
    return thread
