"""Starting, waiting for and stopping the processes that the tests and the benchmark run beside a
portal (a stack's runner, a reference Caddy, PostgreSQL, a second control plane): one way.

Each is started with its output in a log of its own, waited for until it answers (however loaded
the machine: a deadline, never a fixed sleep), reported with the end of that log when it exits
or does not answer in time, and stopped as its own shutdown stops it (a signal, then a wait),
killed only when that does not end it.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class ProcessFailed(RuntimeError):
    """A process that exited, or did not answer in time, told with the end of its log."""


def log_tail(log: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a log ("" when there is none)."""
    try:
        return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except FileNotFoundError:
        return ""


def start_logged(argv: Sequence[str], log: Path, **popen: Any) -> subprocess.Popen:
    """``argv`` started with no input and its output (both streams) added to ``log``."""
    with log.open("ab") as output:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, **popen
        )


def wait_until_ready(
    process: subprocess.Popen,
    ready: Callable[[], bool],
    what: str,
    *,
    timeout: float,
    details: Callable[[], str],
    failure: type[Exception] = ProcessFailed,
    interval: float = 0.1,
) -> None:
    """Return once ``ready()``; raise ``failure`` naming ``what``, with ``details()`` (the end of
    its log, say), when the process exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise failure(f"{what} exited with code {process.returncode}:\n{details()}")
        if time.monotonic() > deadline:
            raise failure(f"{what} did not answer within {timeout:.0f} s:\n{details()}")
        time.sleep(interval)


def stop(
    process: subprocess.Popen | None, how: signal.Signals = signal.SIGTERM, timeout: float = 30
) -> int | None:
    """Stop ``process`` with ``how`` (its own shutdown), killed if it has not ended ``timeout``
    seconds later; its exit code (None when there was no process)."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(how)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
