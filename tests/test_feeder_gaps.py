"""The feeder's patience with gaps in Orthanc's change log (``control.catalog.feeder.Gaps``).

On a PostgreSQL index every store that collides with another (SERIALIZABLE writes) is replayed,
and each attempt takes sequence numbers it then gives up: a log written by two nodes at once has
gaps every few dozen changes. A gap may also be a transaction not yet committed, so the feeder
waits ``GAP_GRACE`` seconds before passing it; these tests hold it to waiting once for all the
gaps it has seen, not once for each, which kept a two-node site's catalog minutes behind.
"""

from __future__ import annotations

import pytest

from control.catalog.feeder import GAP_GRACE, Gaps

pytestmark = pytest.mark.inprocess

DATE = "20261202T003000"


def log_with_gaps(first: int, count: int, every: int) -> list[dict]:
    """``count`` changes from ``first`` on, with one sequence number missing after each ``every``."""
    changes, seq = [], first
    for index in range(count):
        if index and index % every == 0:
            seq += 1  # a number a replayed transaction took and gave up
        changes.append({"Seq": seq, "ChangeType": "NewInstance", "Date": DATE})
        seq += 1
    return changes


def test_changes_before_the_first_young_gap_are_applied_at_once() -> None:
    changes = log_with_gaps(1, 20, every=5)
    assert Gaps().ready_prefix(0, changes, now=100.0) == changes[:5]


def test_every_gap_seen_in_a_batch_ages_together() -> None:
    """After one wait, the whole batch is ready: not one gap more per wait."""
    gaps = Gaps()
    changes = log_with_gaps(1, 500, every=25)
    gaps.ready_prefix(0, changes, now=100.0)
    assert gaps.ready_prefix(0, changes, now=100.0 + GAP_GRACE) == changes


def test_a_gap_seen_later_waits_its_own_time() -> None:
    """A gap in a later read (its changes had not arrived yet) is waited for from when it was seen."""
    gaps = Gaps()
    first = log_with_gaps(1, 10, every=100)
    assert gaps.ready_prefix(0, first, now=100.0) == first
    later = log_with_gaps(first[-1]["Seq"] + 2, 10, every=100)  # one number missing before them
    assert gaps.ready_prefix(first[-1]["Seq"], later, now=101.0) == []
    assert gaps.ready_prefix(first[-1]["Seq"], later, now=101.0 + GAP_GRACE) == later


def test_a_gap_older_than_the_batchs_newest_change_is_passed_at_once() -> None:
    """Orthanc's own dates say the change after the gap was written long before the newest one."""
    changes = log_with_gaps(1, 6, every=3)
    changes[-1]["Date"] = "20261202T003010"
    assert Gaps().ready_prefix(0, changes, now=100.0) == changes


def test_a_log_with_nothing_new_gives_nothing_to_apply() -> None:
    """The feeder's every idle read: no change after the last one applied."""
    gaps = Gaps()
    assert gaps.ready_prefix(40, [], now=100.0) == []
    assert gaps.ready_prefix(40, [], now=100.0 + GAP_GRACE) == []
