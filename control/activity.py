"""The activity log: every connection and action, recorded through one function.

``record_activity`` writes one row of ``db.activity`` for one event of ``control.events`` (which
declares what each kind of event records); the admin's activity pages, the CSV export and the
tests read those same rows. Who acted is a user (id and the name they had then) or a study
token's public id, never a token, password or cookie. The client address is the one Caddy forwarded:
Caddy is the only listener, so its header is the only one trusted.

The log is kept for ``activity_keep_years`` (0: for ever). Once a day one worker of one instance
(whichever takes the day's lease in the shared database) writes the rows past that age to a
gzipped CSV file in the data directory's ``activity-exports/`` and only then removes exactly
those rows; ``./pacs activity prune`` does the same at once. Counting for the admin's pages
stops at ``COUNT_LIMIT`` rows, so that a page of a log of millions of rows costs what a page of a
small one does (the indexes are those of migration 0004).
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import gzip
import json
import logging
import threading
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import sqlalchemy as sa
from flask import has_request_context, request
from flask_login import current_user

from control import db, formatting, metrics, services
from control.events import Action, Event
from control.site import replacing

if TYPE_CHECKING:
    from flask import Flask

    from control.site import Site


class Outcome(enum.StrEnum):
    OK = "ok"
    REFUSED = "refused"
    FAILED = "failed"


# What the admin's pages and the CSV export call each action, outcome and detail: words, never
# the stored names (tests/test_activity_words.py checks that every Action has its words).
ACTION_LABELS: dict[Action, str] = {
    Action.SIGN_IN: "Sign-in",
    Action.SIGN_OUT: "Sign-out",
    Action.LOCKED_OUT: "Sign-in locked",
    Action.SIGN_IN_LOCK_LIFTED: "Sign-in lock lifted",
    Action.SESSION_EXPIRED: "Session expired",
    Action.ACCESS_DENIED: "Access denied",
    Action.SEARCH: "Search",
    Action.LIST_OPENED: "Opened a list of studies or series",
    Action.DOWNLOAD: "Download",
    Action.USER_CREATED: "Created an account",
    Action.USER_CHANGED: "Changed an account",
    Action.USER_DELETED: "Deleted an account",
    Action.SETTINGS_CHANGED: "Changed settings",
    Action.UPLOAD: "Upload",
    Action.PDF_ATTACHED: "Attached a PDF report",
    Action.WORKLIST_ORDER: "Worklist order received",
    Action.WORKLIST_DELETED: "Deleted a worklist entry",
    Action.TOKEN_MADE: "Made a patient's study link",
    Action.TOKEN_COPIED: "Copied a patient's study link",
    Action.TOKEN_USED: "Patient's study link opened",
    Action.TOKEN_REFUSED: "Patient's study link refused",
    Action.TOKEN_IDENTITY: "Birth date asked on a study link",
    Action.TOKEN_IDENTITY_LOCKED: "Study link locked after wrong birth dates",
    Action.TOKEN_IDENTITY_RELEASED: "Study link released",
    Action.TOKEN_REVOKED: "Revoked a study link",
    Action.TOKEN_EXTENDED: "Extended a study link",
    Action.VIEWER_OPENED: "Opened the viewer",
    Action.DICOMWEB_DENIED: "DICOMweb request refused",
    Action.DICOM_REFUSED: "DICOM call refused by the archive",
    Action.STUDY_UID_SHARED: "Two patients' studies share a UID",
    Action.ARCHIVE_ORPHANS: "Swept the archive's orphan files",
    Action.DESKTOP_VIEWER_OPENED: "Opened the desktop viewer",
    Action.VIEWER_TOKEN_MADE: "Made a viewer token",
    Action.VIEWER_TOKEN_USED: "Viewer token used",
    Action.VIEWER_TOKEN_REVOKED: "Revoked a viewer token",
}
OUTCOME_LABELS: dict[str, str] = {"ok": "done", "refused": "refused", "failed": "failed"}
DETAIL_LABELS: dict[str, str] = {
    "accession": "Accession number",
    "account": "Account",
    "address": "Client address",
    "aet": "AE title",
    "bytes": "Bytes",
    "bytes_sent": "Bytes sent",
    "can_upload": "Can upload",
    "cancelled": "Cancelled",
    "change": "Change",
    "changed": "Changed",
    "completed": "Completed",
    "compressed": "Compressed",
    "content": "Content",
    "criteria": "Criteria",
    "dicomdir": "With DICOMDIR",
    "duplicate": "Already in the archive",
    "expires": "Expires",
    "failures": "Failed attempts",
    "file": "File",
    "files": "Files",
    "found_by": "Found by",
    "is_admin": "Admin",
    "issued_by": "Issued by",
    "kind": "Kind",
    "level": "Level",
    "limit_mb": "Limit (MB)",
    "lock": "Lock",
    "locks": "Locks",
    "method": "Method",
    "megabytes": "Size (MB)",
    "modality": "Modality",
    "new": "New",
    "new_username": "New username",
    "node": "Archive node",
    "note": "Note",
    "old": "Old",
    "old_username": "Old username",
    "orphans": "Orphan files",
    "orthanc_id": "Archive id",
    "page": "Page",
    "pages": "Pages",
    "path": "Path",
    "patient": "Patient",
    "patient_id": "Patient ID",
    "patient_orthanc_id": "Archive id of the patient",
    "range": "Byte range",
    "reason": "Reason",
    "recent": "Too recent to remove",
    "refused": "Refused",
    "removed": "Removed",
    "replaced": "Replaced",
    "request": "Request",
    "revoked": "Revoked",
    "scheduled": "Scheduled",
    "series": "Series",
    "skipped": "Skipped",
    "state": "State",
    "station": "Station",
    "stopped_by": "Stopped by",
    "stored": "Stored",
    "studies": "Studies",
    "study": "Study",
    "study_orthanc_id": "Archive id of the study",
    "title": "Title",
    "token_id": "Link",
    "total": "Found",
    "until": "Until",
    "via": "Via",
    "viewer_token": "Viewer token",
}
# Ids of the archive's own: on the event's page, not in the list (the patient and study say it).
DETAILS_NOT_LISTED = frozenset({"orthanc_id", "patient_orthanc_id", "study_orthanc_id", "series"})
# Stored values of some details, in words.
DETAIL_VALUE_LABELS: dict[str, dict[str, str]] = {
    "level": {"patients": "patient", "studies": "study", "series": "series"},
}


def action_label(action: str) -> str:
    """An action in words ("list-opened": "Opened a list of studies or series")."""
    try:
        return ACTION_LABELS[Action(action)]
    except ValueError:
        return action.replace("-", " ").capitalize()  # an action of a newer version, say


def outcome_label(outcome: str) -> str:
    return OUTCOME_LABELS.get(outcome, outcome)


def detail_label(key: str) -> str:
    """A detail's key in words ("study_orthanc_id": "Archive id of the study")."""
    return DETAIL_LABELS.get(key, key.replace("_", " ").capitalize())


def detail_in_words(key: str, value: Any) -> Any:
    """A detail's value as the pages show it: a level in words, a patient's name formatted."""
    if isinstance(value, str):
        if key in DETAIL_VALUE_LABELS:
            return DETAIL_VALUE_LABELS[key].get(value, value)
        if key == "patient":
            return formatting.person_name(value)
    return value


def details(detail: str, *, listed: bool = False) -> list[tuple[str, str]]:
    """An event's stored details (JSON) as (label, value in words) pairs; ``listed``: those the
    activity list shows (not the archive's own ids)."""
    try:
        loaded = json.loads(detail or "{}")
    except ValueError:
        return [("Detail", detail)]
    if not isinstance(loaded, dict):
        return [("Detail", formatting.detail_value(loaded))]
    return [
        (detail_label(key), formatting.detail_value(detail_in_words(key, value)))
        for key, value in loaded.items()
        if not (listed and key in DETAILS_NOT_LISTED)
    ]


def _detail_json(event: Event) -> str:
    return json.dumps(event.detail(), ensure_ascii=False, default=str)


# One statement, compiled once, for every event; it answers the new row's id.
_INSERT = db.activity.insert().returning(db.activity.c.id)


class EventColumns(TypedDict, total=False):
    """The columns of an event that say whose it is and what it is about (see record_activity)."""

    token_id: str
    patient: str
    patient_id: str
    study: str


def record_activity(
    event: Event,
    outcome: Outcome = Outcome.OK,
    *,
    user_id: int | None = None,
    username: str | None = None,
    token_id: str = "",
    patient: str = "",
    patient_id: str = "",
    study: str = "",
    connection: sa.Connection | None = None,
    client_address: str = "",
    at: dt.datetime | None = None,
) -> int:
    """Record one event; its row's id. Request details (client, browser, signed-in user) are filled in.

    ``event`` says what happened and its details (``control.events``); the rest are the row's
    columns, the same for every kind of event. ``patient`` names the patient as pages show it
    (``formatting.patient_label``), ``patient_id`` is their ID for the admin's patient filter,
    ``study`` the Study Instance UID.

    Events seen outside a request (a modality's refused call, read from the archive's log) give
    their ``client_address`` and the time ``at`` which they happened (naive UTC) themselves.
    """
    action_name, outcome_name = str(event.action), str(outcome)
    user_agent = ""
    if has_request_context():
        client_address = request.remote_addr or ""
        user_agent = request.headers.get("User-Agent", "")[:300]
        if user_id is None and current_user and current_user.is_authenticated:
            user_id = current_user.id
            username = username or current_user.username
    row = {
        "at": at or db.utcnow(),
        "action": action_name,
        "outcome": outcome_name,
        "user_id": user_id,
        "username": (username or "")[:64],
        "token_id": token_id,
        "client_address": client_address,
        "user_agent": user_agent,
        "patient": patient[:200],
        "patient_id": patient_id[:64],
        "study": study[:100],
        "detail": _detail_json(event),
    }
    metrics.count_event(action_name, outcome_name)
    if connection is not None:
        return connection.execute(_INSERT, row).scalar_one()
    with services.engine().begin() as own_connection:
        return own_connection.execute(_INSERT, row).scalar_one()


def update_activity(
    event_id: int, outcome: Outcome, event: Event, *, patient: str = "", study: str = ""
) -> None:
    """Bring an event recorded when a long action began up to date: a download or an upload
    records itself as not completed first (and an upload says how far it got as it goes), so that
    a process killed in the middle of it leaves a true row behind. ``event`` is the kind of event
    the row was recorded as; its details replace the row's."""
    values = {"outcome": str(outcome), "detail": _detail_json(event)}
    if patient or study:
        values.update(patient=patient[:200], study=study[:100])
    with services.engine().begin() as connection:
        connection.execute(db.activity.update().where(db.activity.c.id == event_id).values(**values))


class ActivityList(enum.StrEnum):
    """The server activity lists of the admin's pages."""

    USERS = "users"  # what web users did
    TOKENS = "tokens"  # patients' access by study token
    REFUSED = "refused"  # refused or failed connections, grouped by client address


@dataclass(frozen=True)
class ActivityFilter:
    """What an admin narrowed the log to. Dates are local days in the site's time zone."""

    listing: ActivityList = ActivityList.USERS
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    user: str = ""
    action: str = ""
    address: str = ""
    user_id: int | None = None
    # A patient (name or ID) and a study (UID or accession number) as typed, and what they stand
    # for in the study catalog (``control.admin.lookup``): the patient IDs and Study Instance UIDs
    # of the patients whose name or ID matches, and the UIDs of the studies with that accession.
    patient: str = ""
    study: str = ""
    patient_ids: tuple[str, ...] = ()
    patient_studies: tuple[str, ...] = ()
    study_uids: tuple[str, ...] = ()

    def conditions(self, time_zone: str) -> list[sa.ColumnElement[bool]]:
        table = db.activity
        token_id: sa.ColumnElement[str] = table.c.token_id
        outcome: sa.ColumnElement[str] = table.c.outcome
        if self.patient or self.study:
            # A patient or a study is a few rows found by its own index (0009) and then sorted;
            # SQLite would rather walk the list's index in time order (no sort) and test every
            # row. Its terms made expressions (``|| ''``, the same values) keep it from that.
            token_id, outcome = token_id.concat(""), outcome.concat("")
        if self.user_id is not None:
            conditions = [table.c.user_id == self.user_id]
        elif self.listing is ActivityList.USERS:
            conditions = [token_id == "", outcome == str(Outcome.OK)]
        elif self.listing is ActivityList.TOKENS:
            conditions = [token_id != ""]
        else:
            # As a literal, so that SQLite can use the partial index of refused rows (0004).
            conditions = [outcome != sa.literal_column("'ok'")]
        zone = zoneinfo.ZoneInfo(time_zone)
        if self.date_from:
            conditions.append(table.c.at >= _utc(dt.datetime.combine(self.date_from, dt.time(), zone)))
        if self.date_to:
            next_day = self.date_to + dt.timedelta(days=1)
            conditions.append(table.c.at < _utc(dt.datetime.combine(next_day, dt.time(), zone)))
        if self.user:
            conditions.append(sa.func.lower(table.c.username) == self.user.strip().lower())
        if self.action:
            conditions.append(table.c.action == self.action)
        if self.address:
            conditions.append(table.c.client_address == self.address.strip())
        if self.patient:
            # The ID as typed too: a patient whose studies have left the archive keeps their events.
            of_patient = [table.c.patient_id.in_({self.patient.strip(), *self.patient_ids})]
            if self.patient_studies:
                of_patient.append(table.c.study.in_(self.patient_studies))
            conditions.append(sa.or_(*of_patient))
        if self.study:
            conditions.append(table.c.study.in_({self.study.strip(), *self.study_uids}))
        return conditions


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment.astimezone(dt.UTC).replace(tzinfo=None)


# The admin's pages count matching rows up to this many and then say "more than".
COUNT_LIMIT = 10_000


def count_activity(
    connection: sa.Connection, filters: ActivityFilter, time_zone: str, *, limit: int | None = None
) -> int:
    """How many rows match; with ``limit``, at most ``limit + 1`` (enough to say "more than")."""
    matching = sa.select(db.activity.c.id).where(*filters.conditions(time_zone))
    if limit is not None:
        matching = matching.limit(limit + 1)
    query = sa.select(sa.func.count()).select_from(matching.subquery())
    return connection.execute(query).scalar_one()


def list_activity(
    connection: sa.Connection,
    filters: ActivityFilter,
    time_zone: str,
    *,
    offset: int = 0,
    limit: int | None = 100,
) -> sa.CursorResult:
    """Matching rows, newest first."""
    query = (
        sa.select(db.activity)
        .where(*filters.conditions(time_zone))
        .order_by(db.activity.c.at.desc(), db.activity.c.id.desc())
        .offset(offset)
        .limit(limit)
    )
    return connection.execute(query)


def refused_by_address(
    connection: sa.Connection, filters: ActivityFilter, time_zone: str, *, offset: int = 0, limit: int = 100
) -> tuple[int, list[sa.Row]]:
    """Refused or failed events grouped by client address: how many, first, last, which actions."""
    table = db.activity
    grouped = (
        sa.select(
            table.c.client_address,
            sa.func.count().label("count"),
            sa.func.min(table.c.at).label("first_at"),
            sa.func.max(table.c.at).label("last_at"),
            sa.func.count(sa.distinct(table.c.username)).label("usernames"),
        )
        .where(*filters.conditions(time_zone))
        .group_by(table.c.client_address)
    )
    # One pass over the refused rows (their partial index, in address order); the groups, one per
    # address, are few enough to count and order here rather than group everything twice.
    groups = list(connection.execute(grouped).all())
    groups.sort(key=lambda group: (-group.last_at.timestamp(), group.client_address))
    return len(groups), groups[offset : offset + limit]


def get_event(connection: sa.Connection, event_id: int) -> sa.Row | None:
    return connection.execute(sa.select(db.activity).where(db.activity.c.id == event_id)).first()


# ---- retention ----

EXPORT_COLUMNS = tuple(column.name for column in db.activity.columns)
RETENTION_BATCH = 5_000
RETENTION_LEASE = "activity-retention"
RETENTION_INTERVAL = 3600.0  # how often a worker looks whether today's clean-up is done
RETENTION_FIRST_LOOK = 10.0  # seconds after a worker starts: once the start's own work is done
log = logging.getLogger(__name__)


def exports_folder(site: Site) -> Path:
    """Where the rows past the retention period are exported before they are removed."""
    return site.data / "activity-exports"


def retention_cutoff(keep_years: int, now: dt.datetime) -> dt.datetime | None:
    """The time before which rows are past ``keep_years`` calendar years (None: keep everything)."""
    if keep_years <= 0:
        return None
    try:
        return now.replace(year=now.year - keep_years)
    except ValueError:  # 29 February, in a year without one
        return now.replace(year=now.year - keep_years, day=28)


@dataclass(frozen=True)
class Pruned:
    rows: int
    cutoff: dt.datetime | None
    export: Path | None


def prune_activity(
    engine: sa.Engine, folder: Path, keep_years: int, now: dt.datetime | None = None
) -> Pruned:
    """Export the rows older than ``keep_years`` to a file in ``folder``, then remove them.

    The file is complete and on disk before any row goes; the rows removed are exactly the rows
    written to it (older than the cut-off and no newer than the last one exported).
    """
    now = now or db.utcnow()
    cutoff = retention_cutoff(keep_years, now)
    if cutoff is None:
        return Pruned(0, None, None)
    table = db.activity
    old = table.c.at < cutoff
    with engine.connect() as connection:
        last_id = connection.execute(sa.select(sa.func.max(table.c.id)).where(old)).scalar()
    if last_id is None:
        return Pruned(0, cutoff, None)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # patients' names and study ids
    export = folder / f"activity-before-{cutoff:%Y%m%dT%H%M%SZ}-{now:%Y%m%dT%H%M%SZ}.csv.gz"
    exported = _export(engine, export, sa.and_(old, table.c.id <= last_id))
    removed = 0
    while True:
        with engine.begin() as connection:
            batch = (
                sa.select(table.c.id)
                .where(old, table.c.id <= last_id)
                .order_by(table.c.id)
                .limit(RETENTION_BATCH)
            )
            done = connection.execute(table.delete().where(table.c.id.in_(batch.scalar_subquery()))).rowcount
        removed += done
        if done < RETENTION_BATCH:
            break
    if removed != exported:
        log.warning("activity retention exported %d rows and removed %d", exported, removed)
    return Pruned(removed, cutoff, export)


def _export(engine: sa.Engine, path: Path, condition: sa.ColumnElement[bool]) -> int:
    count = 0
    with replacing(path) as raw, gzip.open(raw, "wt", newline="", encoding="utf-8") as text:
        writer = csv.writer(text)
        writer.writerow(EXPORT_COLUMNS)
        with engine.connect() as connection:
            rows = connection.execution_options(yield_per=RETENTION_BATCH).execute(
                sa.select(db.activity).where(condition).order_by(db.activity.c.id)
            )
            for row in rows:
                writer.writerow(
                    [
                        row.at.isoformat(timespec="microseconds") + "Z"
                        if name == "at"
                        else row._mapping[name]
                        for name in EXPORT_COLUMNS
                    ]
                )
                count += 1
    return count


def take_daily_lease(connection: sa.Connection, today: dt.date) -> bool:
    """True for the first caller of the day, across workers and instances sharing the database."""
    revisions = db.revisions
    taken = connection.execute(
        revisions.update()
        .where(revisions.c.name == RETENTION_LEASE, revisions.c.value < today.toordinal())
        .values(value=today.toordinal())
    )
    return taken.rowcount == 1


def start_retention(app: Flask) -> threading.Thread:
    """Once a day, in one worker of one instance, apply the retention setting (a daemon thread)."""
    site = services.site(app)

    def run_daily() -> None:
        # Soon after the start, then every hour: the lease makes it once a day.
        wait = threading.Event().wait
        wait(RETENTION_FIRST_LOOK)
        while True:
            run_once()
            wait(RETENTION_INTERVAL)

    def run_once() -> None:
        try:
            keep_years = site.load_settings().activity_keep_years
            if not keep_years:
                return
            with site.engine.begin() as connection:
                if not take_daily_lease(connection, dt.date.today()):
                    return
            pruned = prune_activity(site.engine, exports_folder(site), keep_years)
            if pruned.rows:
                log.warning(
                    "activity retention: %d rows older than %s exported to %s and removed",
                    pruned.rows,
                    pruned.cutoff,
                    pruned.export,
                )
        except Exception:
            log.exception("activity retention failed; the rows stay and it is tried again later")

    thread = threading.Thread(target=run_daily, name="activity-retention", daemon=True)
    thread.start()
    return thread
