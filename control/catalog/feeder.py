"""The feeder: follows Orthanc's change log into the catalog, builds it, and notices deletions.

It runs as a process of its own (``./pacs catalog feed``, started and restarted by the runner,
and by compose as the ``catalog`` service) rather than as a thread of a gunicorn worker: feeding
350 stores a second costs a good part of a core in Python, which would share the worker's
interpreter lock with the pages it serves, and a worker's life (restarts, timeouts) is gunicorn's
business. Any number may run, on any number of machines sharing the database: the one holding
the lock (``control.catalog.lock``) feeds, the others wait to take over.

**Following the log.** ``GET /changes?since=S`` lists the changes after S, the last sequence
number applied, which the state row keeps. A batch's studies are read whole from the archive
(``control.catalog.rows``) and written in one transaction with the new S, through a compare-and-
set (``control.catalog.store``): a feeder killed mid-batch has written nothing, and its successor
starts from the same S; two feeders never both apply a batch. Which changes matter: a new,
modified or anonymized study, series or instance (its study is read again). The studies of a
batch are read together, each once however many of its changes the batch holds: the archive
says which study each series or instance belongs to in the same bulk read that describes the
studies. Patients' changes do not touch a study's row, and "stable" changes say nothing new (the
instances were followed as they came). A batch applied, the log is read again at once: what was
stored meanwhile waits for no poll.

**Gaps.** Sequence numbers have gaps: Orthanc 1.10.1 removes a deleted resource's changes from the
log, and with several Orthancs on one PostgreSQL index a change can become visible after a later
one (its transaction committed later). A batch is therefore applied only up to a gap younger than
``GAP_GRACE`` seconds (by the feeder's clock since it first saw the gap, or by the dates Orthanc
wrote on the changes); an older gap is a deletion's and is passed.

**Deletions** do not appear in the log at all. When it is caught up, the feeder compares the
archive's study count (``/statistics``, about 7 ms at 20,000 studies, so at most every few
seconds) with the catalog's; when they differ, or when the log's end moved back (its last changes
were deleted, or the archive was replaced), it sweeps: the archive's study ids go into a scratch
table in pages, the database compares them with the catalog's, rows the archive no longer holds
go, studies the catalog lacks are read. Meanwhile the pages ask the archive instead.

**Building** (a new catalog, or ``./pacs catalog rebuild``) reads every study of the archive (its
``/studies?expand`` pages, and the series and sizes of each page's studies), writes the rows,
removes those of studies gone, then resumes the log from where it ended when the build began:
what changed during the build is read again.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite

from control import db
from control.catalog import store, tables
from control.catalog.lock import FeedLock
from control.catalog.rows import StudyRow, read_studies, rows_of
from control.orthanc import ArchiveClient, OrthancError, OrthancUnavailable

log = logging.getLogger("pacs.catalog")

BATCH = 500  # changes read at once: about 125 stored studies, whose rows then show together
POLL_SECONDS = 0.25  # between reads of the log when there was nothing new
HEARTBEAT_SECONDS = 1.0  # the state row's heartbeat is written at most this often while idle
GAP_GRACE = 3.0  # seconds a gap in the log is waited for (see the module's notes)
COUNT_CHECK_SECONDS = 3.0  # the least time between two comparisons of study counts
SWEEP_PAGE = 10_000  # study ids listed at once when sweeping
BUILD_PAGE = 200  # studies read at once when building

# The changes that touch a study's row, by the level of the resource they name.
FOLLOWED = {
    "Study": frozenset({"NewStudy", "ModifiedStudy", "AnonymizedStudy"}),
    "Series": frozenset({"NewSeries", "ModifiedSeries", "AnonymizedSeries"}),
    "Instance": frozenset({"NewInstance"}),
}


def feeder_name() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


def orthanc_time(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, "%Y%m%dT%H%M%S")
    except (TypeError, ValueError):
        return None


@dataclass
class Gaps:
    """When this feeder first saw each gap of the log, by the sequence number before it."""

    first_seen: dict[int, float] = field(default_factory=dict)

    def ready_prefix(self, applied: int, changes: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        """The changes that may be applied now: all of them, or those before the first young gap."""
        if not changes:
            return changes
        newest = max(
            (orthanc_time(change.get("Date", "")) for change in changes), default=None, key=_sortable
        )
        befores = [applied, *(change["Seq"] for change in changes[:-1])]
        # Every gap of the batch is seen now, so that they all age together: one wait for a log
        # that a two-node site's replayed stores leave full of gaps, not one for each gap.
        for before, change in zip(befores, changes, strict=True):
            if change["Seq"] > before + 1:
                self.first_seen.setdefault(before, now)
        for index, (before, change) in enumerate(zip(befores, changes, strict=True)):
            if change["Seq"] > before + 1 and not self._old(before, change, newest, now):
                return changes[:index]
        self.first_seen = {seq: seen for seq, seen in self.first_seen.items() if seq >= changes[-1]["Seq"]}
        return changes

    def _old(self, before: int, change: dict[str, Any], newest: dt.datetime | None, now: float) -> bool:
        if now - self.first_seen[before] >= GAP_GRACE:
            return True
        written = orthanc_time(change.get("Date", ""))
        # Orthanc's dates have whole seconds: one more second of margin.
        return bool(written and newest and (newest - written).total_seconds() >= GAP_GRACE + 1)


def _sortable(value: dt.datetime | None) -> dt.datetime:
    return value or dt.datetime.min


class Feeder:
    """Keeps the catalog of one database in step with one archive."""

    def __init__(
        self,
        engine: sa.Engine,
        orthanc: ArchiveClient,
        *,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.orthanc = orthanc
        self.name = name or feeder_name()
        self.lock = FeedLock(engine)
        self.clock = clock
        self.gaps = Gaps()
        self._last_heartbeat = 0.0
        self._last_count_check = 0.0
        self._count_check_seconds = COUNT_CHECK_SECONDS
        self._archive_reachable = True

    # ---- running ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Feed until ``stop`` is set, waiting for the lock while another feeder holds it."""
        log.info("catalog feeder %s started", self.name)
        waiting_said = holding = False
        while not stop.is_set():
            try:
                if not self.lock.try_acquire():
                    if not waiting_said:
                        log.info("another feeder holds the catalog's lock: waiting to take over")
                        waiting_said = True
                    holding = False
                    stop.wait(1.0)
                    continue
                if not holding:
                    log.info("feeding the catalog (lock taken)")
                    waiting_said, holding = False, True
                    self._claim()
                pause = self.step()
                if not self._archive_reachable:
                    log.info("the archive answers again")
                    self._archive_reachable = True
            except OrthancUnavailable as error:
                if self._archive_reachable:
                    log.warning("the archive is not reachable (%s): retrying", error)
                    self._archive_reachable = False
                pause = 1.0
            except sa.exc.SQLAlchemyError as error:
                log.warning("the database failed (%s): retrying", type(error).__name__)
                self.lock.release()
                holding = False
                pause = 2.0
            except OrthancError as error:
                log.warning("the archive refused a catalog request (%s): retrying", error)
                pause = 2.0
            except store.Conflict as error:
                log.info("%s: starting again from the state row", error)
                pause = 0.0
            except Exception:
                # A fault of the feeder's own must not stop the portal (the runner gives up on a
                # process that keeps dying): the pages ask the archive while the catalog lags.
                log.exception("the catalog feeder failed: retrying in 5 s")
                pause = 5.0
            stop.wait(pause)
        self.lock.release()
        log.info("catalog feeder %s stopped", self.name)

    def _claim(self) -> None:
        with self.engine.begin() as connection:
            store.update_state(connection, feeder=self.name)

    def step(self) -> float:
        """One round: build or sweep if due, else apply the next changes; the seconds to wait."""
        with self.engine.connect() as connection:
            state = store.read_state(connection)
        if state.status in ("empty", "building") or state.build_requested_at is not None:
            self.build()
            return 0.0
        if state.status == "sweeping":
            self.sweep(state)
            return 0.0
        answer = self.orthanc.get_json(
            "/changes", params={"since": str(state.applied_seq), "limit": str(BATCH)}
        )
        changes = answer.get("Changes", [])
        if not changes and int(answer.get("Last", 0)) < state.applied_seq:
            log.info(
                "the archive's change log ends at %s, before %s: looking for deleted studies",
                answer.get("Last"),
                state.applied_seq,
            )
            self.sweep(state, restart_at=int(answer.get("Last", 0)))
            return 0.0
        ready = self.gaps.ready_prefix(state.applied_seq, changes, self.clock())
        caught_up = bool(answer.get("Done")) and len(ready) == len(changes)
        if ready:
            try:
                self.apply(state, ready, caught_up=caught_up)
            except store.Conflict:
                log.info("the catalog moved meanwhile (another feeder, or a build): batch dropped")
                return 0.0
        if not caught_up:
            return 0.0 if len(ready) == len(changes) else POLL_SECONDS
        if not ready:
            self._heartbeat()
        if self.clock() - self._last_count_check >= self._count_check_seconds:
            self.check_counts()
        # What was stored while this batch was read is asked for at once, not a poll later.
        return 0.0 if ready else POLL_SECONDS

    def _heartbeat(self) -> None:
        now = self.clock()
        if now - self._last_heartbeat < HEARTBEAT_SECONDS:
            return
        with self.engine.begin() as connection:
            at = db.utcnow()
            store.update_state(connection, heartbeat_at=at, caught_up_at=at, feeder=self.name)
        self._last_heartbeat = now

    # ---- applying changes ---------------------------------------------------------------------

    def apply(self, state: store.State, changes: list[dict[str, Any]], *, caught_up: bool) -> None:
        """Read the studies ``changes`` touch and write them with the new sequence number."""
        followed = [
            change for change in changes if change["ChangeType"] in FOLLOWED.get(change["ResourceType"], ())
        ]
        # A study named by a change and no longer in the archive goes; a series or instance no
        # longer there names no study (its study is read again if it changed, or swept).
        read: dict[str, StudyRow | None] = {
            change["ID"]: None for change in followed if change["ResourceType"] == "Study"
        }
        read.update(read_studies(self.orthanc, (change["ID"] for change in followed)))
        with self.engine.begin() as connection:
            delta = self._write_read(connection, read)
            store.advance(
                connection,
                generation=state.generation,
                from_seq=state.applied_seq,
                to_seq=changes[-1]["Seq"],
                changes=len(changes),
                delta=delta,
                now=db.utcnow(),
                caught_up=caught_up,
            )
        self._last_heartbeat = self.clock()

    def read_these(self, study_ids: list[str]) -> dict[str, StudyRow | None]:
        """The rows of these studies as the archive holds them (None: no longer there)."""
        return dict.fromkeys(study_ids) | read_studies(self.orthanc, study_ids)

    # ---- deletions ----------------------------------------------------------------------------

    def check_counts(self) -> None:
        """Sweep when the archive holds another number of studies than the catalog (deletions)."""
        started = self.clock()
        statistics = self.orthanc.get_json("/statistics")
        last = int(self.orthanc.get_json("/changes", params={"last": ""}).get("Last", 0))
        took = self.clock() - started
        self._last_count_check = self.clock()
        # Counting grows with the archive (0.35 ms per 1,000 studies here): keep it a small share.
        self._count_check_seconds = max(COUNT_CHECK_SECONDS, 20 * took)
        with self.engine.connect() as connection:
            state = store.read_state(connection)
        if state.status != "ready" or last > state.applied_seq:
            return  # stored meanwhile: compare when the log is applied
        archive = int(statistics["CountStudies"])
        if archive != state.studies:
            log.info("the archive holds %s studies, the catalog %s: sweeping", archive, state.studies)
            self.sweep(state)

    def sweep(self, state: store.State, restart_at: int | None = None) -> None:
        """Compare the catalog's studies with the archive's ids; remove and add what differs."""
        started = time.monotonic()
        generation = self._begin(state, "sweeping", message="comparing with the archive's studies")
        with self.engine.begin() as connection:
            connection.execute(tables.sweep.delete())
        since = 0
        while True:
            page = self.orthanc.get_json("/studies", params={"since": str(since), "limit": str(SWEEP_PAGE)})
            with self.engine.begin() as connection:
                self._note_swept(connection, page)
            if len(page) < SWEEP_PAGE:
                break
            since += SWEEP_PAGE
        studies, swept = tables.studies.c, tables.sweep.c
        extra = sa.select(studies.study_id).where(~sa.exists().where(swept.study_id == studies.study_id))
        missing = sa.select(swept.study_id).where(~sa.exists().where(studies.study_id == swept.study_id))
        removed = added = 0
        # Rows the archive's pages did not list: gone, or stored after their page was listed.
        while found := self._first_ids(extra):
            read = self.read_these(found)
            with self.engine.begin() as connection:
                self._write_read(connection, read)
                self._note_swept(connection, [study_id for study_id, row in read.items() if row])
            removed += sum(1 for row in read.values() if row is None)
        while found := self._first_ids(missing):
            read = self.read_these(found)
            with self.engine.begin() as connection:
                self._write_read(connection, read)
                gone = [study_id for study_id, row in read.items() if row is None]
                connection.execute(tables.sweep.delete().where(swept.study_id.in_(gone)))
            added += sum(1 for row in read.values() if row is not None)
        with self.engine.begin() as connection:
            connection.execute(tables.sweep.delete())
            values: dict[str, Any] = {"message": ""}
            if restart_at is not None:
                values["applied_seq"] = restart_at
            self._end(connection, generation, **values)
        log.info(
            "sweep done in %.1f s: %s rows removed, %s studies added",
            time.monotonic() - started,
            removed,
            added,
        )

    def _first_ids(self, query: sa.Select) -> list[str]:
        with self.engine.connect() as connection:
            return list(connection.execute(query.limit(store.SLICE)).scalars())

    def _note_swept(self, connection: sa.Connection, study_ids: list[str]) -> None:
        """Add ids to the sweep's scratch table (an id listed twice, by pages that shifted, once)."""
        if not study_ids:
            return
        insert: sa.Insert
        if connection.dialect.name == "postgresql":
            insert = sa.dialects.postgresql.insert(tables.sweep).on_conflict_do_nothing()
        else:
            insert = sa.dialects.sqlite.insert(tables.sweep).on_conflict_do_nothing()
        connection.execute(insert, [{"study_id": study_id} for study_id in dict.fromkeys(study_ids)])

    def _write_read(
        self, connection: sa.Connection, read: dict[str, StudyRow | None], swept: int | None = None
    ) -> store.Delta:
        """Write studies as ``read_studies`` found them: rows replaced, the studies gone removed."""
        rows = [row for row in read.values() if row is not None]
        return store.write(
            connection, rows, [study_id for study_id, row in read.items() if row is None], swept
        )

    # ---- building -----------------------------------------------------------------------------

    def build(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Make every row again from the archive, then resume the log from where the build began."""
        started = time.monotonic()
        with self.engine.connect() as connection:
            state = store.read_state(connection)
        total = int(self.orthanc.get_json("/statistics")["CountStudies"])
        resume_at = int(self.orthanc.get_json("/changes", params={"last": ""}).get("Last", 0))
        generation = self._begin(
            state, "building", build_requested_at=None, build_done=0, build_total=total, message=""
        )
        log.info("building the catalog: %s studies in the archive", total)
        done = 0
        since = 0
        while True:
            page = self.orthanc.get_json(
                "/studies", params={"expand": "", "since": str(since), "limit": str(BUILD_PAGE)}
            )
            read = rows_of(self.orthanc, page)
            with self.engine.begin() as connection:
                self._write_read(connection, read, generation)
                done += len(page)
                self._progress(connection, generation, done, max(total, done))
            if progress:
                progress(done, max(total, done))
            if len(page) < BUILD_PAGE:
                break
            since += BUILD_PAGE
        # Rows the build did not meet: studies deleted since the last build, or moved in the pages.
        unseen = sa.select(tables.studies.c.study_id).where(tables.studies.c.swept != generation)
        while found := self._first_ids(unseen):
            with self.engine.begin() as connection:
                self._write_read(connection, self.read_these(found), generation)
        with self.engine.begin() as connection:
            self._end(connection, generation, applied_seq=resume_at, built_at=db.utcnow(), message="")
        log.info("catalog built in %.1f s: %s studies", time.monotonic() - started, done)

    def _begin(self, state: store.State, status: str, **values: Any) -> int:
        """Enter ``status`` (the pages ask the archive meanwhile); the generation of the work."""
        generation = state.generation + 1
        with self.engine.begin() as connection:
            moved = connection.execute(
                tables.state.update()
                .where(tables.state.c.id == 1, tables.state.c.generation == state.generation)
                .values(status=status, generation=generation, feeder=self.name, **values)
            )
            if moved.rowcount != 1:
                raise store.Conflict("the catalog's state moved")
        return generation

    def _progress(self, connection: sa.Connection, generation: int, done: int, total: int) -> None:
        moved = connection.execute(
            tables.state.update()
            .where(tables.state.c.id == 1, tables.state.c.generation == generation)
            .values(build_done=done, build_total=total, heartbeat_at=db.utcnow())
        )
        if moved.rowcount != 1:
            raise store.Conflict("the catalog's state moved during the build")

    def _end(self, connection: sa.Connection, generation: int, **values: Any) -> None:
        now = db.utcnow()
        moved = connection.execute(
            tables.state.update()
            .where(tables.state.c.id == 1, tables.state.c.generation == generation)
            .values(
                status="ready",
                generation=generation + 1,
                heartbeat_at=now,
                **store.counts(connection),
                **values,
            )
        )
        if moved.rowcount != 1:
            raise store.Conflict("the catalog's state moved")
