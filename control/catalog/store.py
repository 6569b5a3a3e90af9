"""Reading and writing the catalog's rows and its state row.

Every write of rows happens in the transaction that moves the state row on, and that move is a
compare-and-set: it commits only if the state row still holds the generation and sequence number
the writer started from. So however many feeders believe they feed (a lock lost with its
database connection, a build started meanwhile), a change of the archive's log is applied once,
and a batch that lost the race leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import sqlalchemy as sa

from control.catalog import tables
from control.catalog.rows import StudyRow

# SQLite accepts at most 32,766 bound values per statement: ids are handled in slices.
SLICE = 500
T = TypeVar("T")


class Conflict(RuntimeError):
    """The state row moved while a batch was prepared (another feeder, or a build): nothing was written."""


@dataclass(frozen=True)
class State:
    """The catalog's state row (see ``control.catalog.tables.state``)."""

    status: str
    generation: int
    applied_seq: int
    applied_changes: int
    studies: int
    patients: int
    feeder: str
    heartbeat_at: dt.datetime | None
    caught_up_at: dt.datetime | None
    build_requested_at: dt.datetime | None
    build_done: int
    build_total: int
    built_at: dt.datetime | None
    message: str


_STATE_COLUMNS = [getattr(tables.state.c, item.name) for item in fields(State)]
_READ_STATE = sa.select(*_STATE_COLUMNS).where(tables.state.c.id == 1)


def read_state(connection: sa.Connection) -> State:
    return State(*connection.execute(_READ_STATE).one())


def update_state(connection: sa.Connection, **values: object) -> None:
    connection.execute(tables.state.update().where(tables.state.c.id == 1).values(**values))


def slices(items: list[T]) -> Iterable[list[T]]:
    for start in range(0, len(items), SLICE):
        yield items[start : start + SLICE]


def row_ids(connection: sa.Connection, study_ids: Iterable[str]) -> dict[str, int]:
    """The catalog's row ids of those of ``study_ids`` it holds."""
    found: dict[str, int] = {}
    for part in slices(sorted(set(study_ids))):
        query = sa.select(tables.studies.c.study_id, tables.studies.c.id).where(
            tables.studies.c.study_id.in_(part)
        )
        found.update(connection.execute(query).all())
    return found


@dataclass(frozen=True)
class Delta:
    """How many studies and patients a write added (negative: removed)."""

    studies: int = 0
    patients: int = 0


def patients_held(connection: sa.Connection, patient_keys: Iterable[str]) -> set[str]:
    """Those of ``patient_keys`` that have at least one study in the catalog."""
    held: set[str] = set()
    for part in slices(sorted(set(patient_keys))):
        query = (
            sa.select(tables.studies.c.patient_key).where(tables.studies.c.patient_key.in_(part)).distinct()
        )
        held.update(connection.execute(query).scalars())
    return held


def write(
    connection: sa.Connection, rows: list[StudyRow], deleted: Iterable[str] = (), swept: int | None = None
) -> Delta:
    """Insert or replace ``rows`` and remove the ``deleted`` study ids; what that changed in the
    numbers of studies and patients. ``swept`` marks the rows as found by that sweep."""
    deleted = sorted(set(deleted) - {row.study_id for row in rows})
    studies = tables.studies.c
    touched = {row.values["patient_key"] for row in rows}
    for part in slices(deleted):
        touched.update(
            connection.execute(sa.select(studies.patient_key).where(studies.study_id.in_(part))).scalars()
        )
    patients_before = len(patients_held(connection, touched))
    removed = 0
    for part in slices(deleted):
        removed += connection.execute(tables.studies.delete().where(studies.study_id.in_(part))).rowcount
    existing = row_ids(connection, (row.study_id for row in rows))
    extra = {} if swept is None else {"swept": swept}
    new = [row.values | extra for row in rows if row.study_id not in existing]
    changed = [
        row.values | extra | {"row": existing[row.study_id]} for row in rows if row.study_id in existing
    ]
    if new:
        connection.execute(tables.studies.insert(), new)
    if changed:
        columns: dict[str, sa.BindParameter[Any]] = {
            name: sa.bindparam(name) for name in changed[0] if name != "row"
        }
        connection.execute(
            tables.studies.update().where(studies.id == sa.bindparam("row")).values(columns), changed
        )
        for part in slices([item["row"] for item in changed]):
            connection.execute(tables.modalities.delete().where(tables.modalities.c.study_row.in_(part)))
    ids = existing
    if new:
        ids = existing | row_ids(connection, (item["study_id"] for item in new))
    held = [
        {"modality": modality, "study_row": ids[row.study_id]} for row in rows for modality in row.modalities
    ]
    if held:
        connection.execute(tables.modalities.insert(), held)
    patients_after = len(patients_held(connection, touched))
    return Delta(len(new) - removed, patients_after - patients_before)


def advance(
    connection: sa.Connection,
    *,
    generation: int,
    from_seq: int,
    to_seq: int,
    changes: int,
    delta: Delta,
    now: dt.datetime,
    caught_up: bool,
) -> None:
    """Move the state row from ``from_seq`` to ``to_seq``, or raise Conflict if it moved meanwhile."""
    state = tables.state.c
    values: dict[str, object] = {
        "applied_seq": to_seq,
        "applied_changes": state.applied_changes + changes,
        "studies": state.studies + delta.studies,
        "patients": state.patients + delta.patients,
        "heartbeat_at": now,
    }
    if caught_up:
        values["caught_up_at"] = now
    moved = connection.execute(
        tables.state.update()
        .where(
            state.id == 1,
            state.generation == generation,
            state.applied_seq == from_seq,
            state.status == "ready",
        )
        .values(values)
    )
    if moved.rowcount != 1:
        raise Conflict("the catalog's state moved while this batch was prepared")


def counts(connection: sa.Connection) -> dict[str, int]:
    """The numbers of studies and patients, counted (after a build or sweep)."""
    studies = tables.studies.c
    return {
        "studies": connection.execute(sa.select(sa.func.count()).select_from(tables.studies)).scalar_one(),
        "patients": connection.execute(
            sa.select(sa.func.count(sa.distinct(studies.patient_key)))
        ).scalar_one(),
    }
