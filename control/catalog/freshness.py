"""Whether the pages may answer from the catalog now, and what they say when they may not.

The catalog is used when it holds every change of the archive's log, or when its feeder is
keeping up (it was caught up less than ``LAG_LIMIT`` seconds ago: a study stored in the last
moments may be missing, as in any list made a moment ago). Otherwise (never built, being built,
looking for deleted studies, its feeder silent, or far behind) the pages ask the archive itself
and say so. Each search costs one small read of the state row and one ``GET /changes?last`` (a
fraction of a millisecond), which also tells whether the archive answers at all.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa

from control import db
from control.catalog.store import State, read_state
from control.orthanc import ArchiveClient

LAG_LIMIT = 10.0
FEEDER_SILENT = 20.0  # the feeder writes a heartbeat every second at least while it runs
USED_INSTEAD = (
    "these results come from the archive itself, newest first, and names must be typed with their accents"
)


@dataclass(frozen=True)
class Freshness:
    """The catalog's state as a page sees it."""

    usable: bool
    notice: str | None = None
    behind: int = 0  # changes of the archive's log not applied yet


def notice_for(state: State, behind: int, now: dt.datetime) -> str | None:
    """Why the catalog cannot answer now, in the user's words; None when it can."""
    if state.status == "empty":
        return f"The study catalog has not been built yet: {USED_INSTEAD}."
    if state.status == "building":
        done = f" ({state.build_done:,} of {state.build_total:,} studies)" if state.build_total else ""
        return f"The study catalog is being built{done}: {USED_INSTEAD}."
    if state.status == "sweeping":
        return f"The study catalog is looking for studies deleted from the archive: {USED_INSTEAD}."
    if state.heartbeat_at is None or (now - state.heartbeat_at).total_seconds() > FEEDER_SILENT:
        return f"The study catalog is not being kept up to date (its feeder is not running): {USED_INSTEAD}."
    if behind <= 0:
        return None
    if state.caught_up_at and (now - state.caught_up_at).total_seconds() <= LAG_LIMIT:
        return None
    return f"The study catalog is {behind:,} changes behind the archive: {USED_INSTEAD}."


def freshness(connection: sa.Connection, orthanc: ArchiveClient) -> Freshness:
    """Ask the state row and the archive's log whether the catalog may answer (OrthancUnavailable
    when the archive does not answer)."""
    state = read_state(connection)
    last = int(orthanc.get_json("/changes", params={"last": ""}).get("Last", 0))
    behind = max(0, last - state.applied_seq)
    notice = notice_for(state, behind, db.utcnow())
    return Freshness(notice is None, notice, behind)
