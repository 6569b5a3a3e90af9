"""Watching the archive for what it does not tell the portal by itself.

Orthanc refuses a modality's DICOM request itself (an unregistered AE title, a registered one
calling from another address, a store while only registered modalities may store) and says so in
its log, nowhere else: no REST call lists refusals, and a plugin sees only the requests Orthanc let
through (orthanc-python 4.0's C-STORE filter, for one, is called after the core's checks and knows
the caller's AE title but not its address). So the control plane reads Orthanc's log, the line
Orthanc 1.10 to 1.12 write at their default level for every refused request::

    W1201 12:45:59.859520 CommandDispatcher.cpp:828] Rejected Store request from remote DICOM
    modality with AET "CT1" and hostname "127.0.0.7"

and records each as a ``dicom-refused`` event with the caller's AE title and address. The line
is written whatever Orthanc's verbosity, and the decision stays Orthanc's own; what the portal adds
is the record.

The same watcher follows Orthanc's changes (``GET /changes``) for new studies: one whose Study
Instance UID another patient's study already has is flagged to the admin as it arrives
(``control.tokens.shared``).

Every control-plane process runs a watcher thread (started by gunicorn's ``post_worker_init``,
``control.runtime.gunicorn_conf``); one at a time does the work. What must be done once, whatever the number
of control planes and archive nodes: following ``/changes`` (one change log, shared by every node
of an archive on PostgreSQL) and recording each refusal. What is per node: each archive node
writes its own log (``logs/orthanc.log``, ``logs/orthanc-2.log``...; the containers' nodes write
theirs into the shared data volume too), and each has its own reading position. Positions live in
the control plane's database (``archive_state`` row ``watch``) and are committed in the same
transaction as the events they recorded, so each line and each change is recorded once however
many processes and machines run, and none is lost across restarts. One round at a time: the round
holds that row locked (``FOR UPDATE SKIP LOCKED`` on PostgreSQL: another control plane skips its
round rather than waits) and, on one machine, an exclusive lock on a file in ``run/`` (SQLite has
no row locks). Orthanc's log lines carry local time without a year: the year is the current one
unless that puts the line in the future.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from control import db
from control.activity import Outcome, record_activity
from control.events import DicomRefusedEvent
from control.orthanc import ArchiveClient, OrthancError, OrthancUnavailable
from control.site import Site
from control.tokens import shared

INTERVAL = 2.0  # seconds between two readings
MOST_READ = 4 * 1024 * 1024  # bytes of log read in one round, so that a long backlog is read in steps
CHANGES_PAGE = 200  # of Orthanc's changes read in one round

log = logging.getLogger(__name__)

# The shared state's row, locked for the round; a round that finds it locked is skipped.
_LOCK_STATE = (
    sa.select(db.archive_state.c.value)
    .where(db.archive_state.c.name == "watch")
    .with_for_update(skip_locked=True)
)

_LOG_LINE = re.compile(
    r"^[IWEF](?P<month>\d\d)(?P<day>\d\d) (?P<time>\d\d:\d\d:\d\d\.\d{6}) .*?\] "
    r'Rejected (?P<request>\w+) request from remote DICOM modality with AET "(?P<aet>.*)" '
    r'and hostname "(?P<address>[^"]*)"\s*$'
)
# The line before, when Orthanc says why (1.10.1's wording): the AE title is unknown, or it is
# registered for another address.
_WHY = re.compile(r"DICOM authorization rejected +for AET (?P<aet>.*) on IP (?P<address>\S+): (?P<why>.*)$")


@dataclass(frozen=True)
class RefusedCall:
    """One DICOM request Orthanc refused."""

    request: str  # Orthanc's name of it: Store, Find, FindWorklist, Get, Move...
    aet: str
    address: str
    at: dt.datetime  # naive UTC
    reason: str = ""


def _utc_of_local(month: int, day: int, clock: str, now: dt.datetime) -> dt.datetime:
    """A log line's local time (no year) as naive UTC, taking the latest year not in the future."""
    time = dt.time.fromisoformat(clock)
    local_now = now.replace(tzinfo=dt.UTC).astimezone()
    for year in (local_now.year, local_now.year - 1):
        with contextlib.suppress(ValueError):  # 29 February of a year without one
            moment = dt.datetime.combine(dt.date(year, month, day), time).astimezone()
            if moment <= local_now + dt.timedelta(days=1):
                return moment.astimezone(dt.UTC).replace(tzinfo=None)
    return now


def refused_calls(lines: list[str], now: dt.datetime) -> Iterator[RefusedCall]:
    """The refused requests in Orthanc's log ``lines``; ``now`` (naive UTC) dates them."""
    why: dict[tuple[str, str], str] = {}
    for line in lines:
        explained = _WHY.search(line)
        if explained:
            why[explained["aet"], explained["address"]] = _reason(explained["why"])
            continue
        match = _LOG_LINE.match(line)
        if match is None:
            continue
        at = _utc_of_local(int(match["month"]), int(match["day"]), match["time"], now)
        key = (match["aet"], match["address"])
        yield RefusedCall(match["request"], match["aet"], match["address"], at, why.pop(key, ""))


def _reason(orthanc_says: str) -> str:
    if "IP address should be" in orthanc_says:
        return "this AE title is registered for another address"
    if "not listed" in orthanc_says:
        return "not a registered modality"
    return orthanc_says[:200]


class ArchiveWatch:
    """Reads what Orthanc logged since the last reading and records it (see the module)."""

    def __init__(self, site: Site, orthanc: ArchiveClient, interval: float = INTERVAL) -> None:
        self.site = site
        self.orthanc = orthanc
        self.interval = interval
        self.tasks: list[Callable[[dict[str, Any], sa.Connection], None]] = [
            self._read_logs,
            self._new_studies,
        ]
        self._stop = threading.Event()

    @property
    def archive_logs(self) -> list[Path]:
        """Every archive node's log: ``orthanc.log`` (the first node) and ``orthanc-N.log``."""
        return sorted(self.site.logs.glob("orthanc*.log"))

    @property
    def former_state_file(self) -> Path:
        """Where versions before the shared state kept the reading position (read once, then gone)."""
        return self.site.run / "archive-watch.json"

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="archive-watch", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        # The first round at once: it marks where reading starts (see _read_logs).
        while True:
            try:
                self.run_once()
            except Exception:  # the next round tries again; the portal itself goes on
                log.exception("Watching the archive failed")
            if self._stop.wait(self.interval):
                return

    def run_once(self) -> bool:
        """One round, unless another process is doing it right now; True when this one did."""
        self.site.run.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.site.run / "archive-watch.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            with self.site.engine.begin() as connection:
                kept = connection.execute(_LOCK_STATE).scalar_one_or_none()
                if kept is None:
                    return False  # another control plane is doing this round
                state = json.loads(kept) or self._former_state()
                for task in self.tasks:
                    task(state, connection)
                db.put_archive_state(connection, "watch", json.dumps(state))
            self.former_state_file.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)  # releases the lock

    def _former_state(self) -> dict[str, Any]:
        """The position kept in ``run/`` by a version before the shared state, in today's form."""
        try:
            former = json.loads(self.former_state_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        if "log" in former:
            former["logs"] = {"orthanc.log": former.pop("log")}
        return former

    def _read_logs(self, state: dict[str, Any], connection: sa.Connection) -> None:
        """Record the refusals every node logged since the positions kept in ``state``."""
        first_round = "logs" not in state
        positions = state.setdefault("logs", {})
        for path in self.archive_logs:
            self._read_log(path, positions, first_round, connection)

    def _read_log(
        self, path: Path, positions: dict[str, Any], first_round: bool, connection: sa.Connection
    ) -> None:
        try:
            file = path.open("rb")
        except FileNotFoundError:
            return
        with file:
            size = os.fstat(file.fileno()).st_size
            inode = os.fstat(file.fileno()).st_ino
            kept = positions.get(path.name)
            if kept is None and first_round:
                # The watcher's first round: what Orthanc logged before it existed is not read. A
                # node's log that appears later (a node added) is read from its start.
                positions[path.name] = {"inode": inode, "offset": size}
                return
            kept = kept or {}
            offset = kept["offset"] if kept.get("inode") == inode and kept.get("offset", 0) <= size else 0
            file.seek(offset)
            chunk = file.read(min(size - offset, MOST_READ))
        complete = chunk[: chunk.rfind(b"\n") + 1] if len(chunk) < MOST_READ else chunk
        lines = complete.decode("utf-8", errors="replace").splitlines()
        for call in refused_calls(lines, db.utcnow()):
            refused = DicomRefusedEvent(
                aet=call.aet,
                request=call.request,
                reason=call.reason or None,
                node=path.stem if path.name != "orthanc.log" else None,
            )
            record_activity(
                refused, Outcome.REFUSED, connection=connection, client_address=call.address[:64], at=call.at
            )
        positions[path.name] = {"inode": inode, "offset": offset + len(complete)}

    def _new_studies(self, state: dict[str, Any], connection: sa.Connection) -> None:
        """Flag the new studies (since the change kept in ``state``) whose UID another study has."""
        try:
            if "changes" not in state:
                # The watcher's first round: studies the archive had before are checked when used.
                state["changes"] = self.orthanc.get_json("/changes", params={"last": ""})["Last"]
                return
            page = self.orthanc.get_json(
                "/changes", params={"since": str(state["changes"]), "limit": str(CHANGES_PAGE)}
            )
            for change in page.get("Changes", []):
                if change.get("ChangeType") == "NewStudy":
                    self._check_study(connection, change["ID"])
        except OrthancUnavailable:
            return  # the archive is away: the next round goes on from the same change
        state["changes"] = page.get("Last", state["changes"])

    def _check_study(self, connection: sa.Connection, orthanc_id: str) -> None:
        try:
            study_uid = self.orthanc.get_json(f"/studies/{orthanc_id}")["MainDicomTags"]["StudyInstanceUID"]
        except (OrthancError, KeyError):
            return  # deleted meanwhile, or no UID to share
        holders = shared.holders(self.orthanc, study_uid)
        if len(holders) > 1:
            shared.flag(connection, self.orthanc, study_uid, holders, "a new study")
