"""Timing the two ways side by side: interleaved runs, CPU per process, statistics.

Every comparison runs the direct way and the portal's way alternately (direct, portal, direct,
portal, ...), after one warm-up pair that is not counted, so that whatever else loads the machine
(other test runs share it) falls on both about equally; the ratios, not the absolute times, are
what the benchmark is about. Each run records its wall time, when its first byte (or first frame)
arrived if that matters, a digest of what it received (both ways must agree), and the CPU seconds
each process of the stack spent meanwhile.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.stack import Processes

DIRECT, PORTAL = "direct", "portal"


@dataclass
class Answer:
    """What one run received: a digest of its content, and when the first of it arrived (seconds).

    ``digest`` may be a function: it is then called once the clock has stopped, so that checking
    what arrived (reading back a zip, asking Orthanc what it stored) is not counted as its time.
    """

    digest: str | Callable[[], str]
    first: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """One timed run of one way."""

    seconds: float
    answer: Answer
    cpu: dict[str, float]


@dataclass
class Comparison:
    """The runs of both ways of one measurement."""

    runs: dict[str, list[Run]] = field(default_factory=lambda: {DIRECT: [], PORTAL: []})

    def seconds(self, way: str) -> list[float]:
        return [run.seconds for run in self.runs[way]]

    def firsts(self, way: str) -> list[float]:
        return [run.answer.first for run in self.runs[way] if run.answer.first is not None]

    def median(self, way: str) -> float:
        return statistics.median(self.seconds(way))

    def paired_ratio(self) -> float:
        """The median of each pair's direct/portal ratio: the two runs of a pair are next to each
        other in time, so this is the figure least moved by load that comes and goes."""
        pairs = zip(self.seconds(DIRECT), self.seconds(PORTAL), strict=False)
        return statistics.median(direct / portal for direct, portal in pairs)

    def cpu(self, way: str) -> dict[str, float]:
        """Median CPU seconds per run of each process role."""
        roles = self.runs[way][0].cpu if self.runs[way] else {}
        return {role: statistics.median(run.cpu[role] for run in self.runs[way]) for role in roles}

    def digests_agree(self) -> bool:
        """Whether the portal received what Orthanc gave directly, pair by pair (round ``i`` of both
        ways asks the same question)."""
        pairs = zip(self.runs[DIRECT], self.runs[PORTAL], strict=False)
        return bool(self.runs[PORTAL]) and all(a.answer.digest == b.answer.digest for a, b in pairs)

    def mismatches(self) -> list[tuple[str, str]]:
        pairs = zip(self.runs[DIRECT], self.runs[PORTAL], strict=False)
        return [(a.answer.digest, b.answer.digest) for a, b in pairs if a.answer.digest != b.answer.digest]


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank): the value that many samples stay at or below."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


Action = Callable[[int], Answer]


def timed(processes: Processes | None, action: Action, round_number: int) -> Run:
    """Run ``action`` once: its wall time, its answer and the CPU each process spent meanwhile."""
    before = processes.cpu() if processes else {}
    started = time.perf_counter()
    answer = action(round_number)
    seconds = time.perf_counter() - started
    after = processes.cpu() if processes else {}
    if callable(answer.digest):
        answer.digest = answer.digest()
    return Run(seconds, answer, {role: after[role] - before[role] for role in after})


def interleave(
    direct: Action,
    portal: Action,
    *,
    repeat: int,
    processes: Processes | None,
    budget: float,
    warm_up: bool = True,
    between: Callable[[], None] | None = None,
) -> Comparison:
    """``repeat`` pairs of runs, direct then portal, after a warm-up pair (not counted).

    Both actions are given the round's number (0, 1, ...; -1 for the warm-up), so that a round can
    ask both ways the same question and the next round another one. ``between`` runs after every
    run, untimed (to put the archive back as it was, say). Stops early, with at least one pair,
    when ``budget`` seconds are spent: a slow machine gives fewer runs rather than a benchmark that
    never ends.
    """
    comparison = Comparison()
    deadline = time.monotonic() + budget
    if warm_up:
        for action in (direct, portal):
            timed(None, action, -1)
            if between:
                between()
    for round_number in range(repeat):
        for way, action in ((DIRECT, direct), (PORTAL, portal)):
            comparison.runs[way].append(timed(processes, action, round_number))
            if between:
                between()
        if time.monotonic() > deadline:
            break
    return comparison


class MemorySampler:
    """The control plane workers' resident memory, sampled in the background: before, peak, after."""

    def __init__(self, processes: Processes, interval: float = 0.2) -> None:
        self.processes = processes
        self.interval = interval
        self.before = processes.workers_rss()
        self.peak = self.before
        self.after = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after = self.processes.workers_rss()
        self.peak = max(self.peak, self.after)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.processes.workers_rss())
