"""The one way the tests and the benchmark start, wait for and stop processes (bench.processes).

Small Python processes stand in for a server: one that exits at once, one that never answers,
one that shrugs off the polite signal. What a test's author sees is the process's own log.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from bench import processes

pytestmark = pytest.mark.inprocess

IGNORES_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('listening', flush=True); "
    "time.sleep(600)"
)


def python(code: str, log: Path):
    return processes.start_logged([sys.executable, "-c", code], log)


def test_a_process_that_exits_is_told_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    process = python("print('no configuration file'); raise SystemExit(3)", log)
    with pytest.raises(processes.ProcessFailed) as failed:
        processes.wait_until_ready(
            process, lambda: False, "the server", timeout=60, details=lambda: processes.log_tail(log)
        )
    assert str(failed.value).startswith("the server exited with code 3:")
    assert "no configuration file" in str(failed.value)


def test_a_process_that_never_answers_fails_at_the_deadline_and_is_stopped(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    process = python("import time; print('starting', flush=True); time.sleep(600)", log)
    try:
        with pytest.raises(processes.ProcessFailed, match="the server did not answer within 0 s"):
            processes.wait_until_ready(
                process, lambda: False, "the server", timeout=0.3, details=lambda: processes.log_tail(log)
            )
    finally:
        assert processes.stop(process) == -signal.SIGTERM


def test_a_process_deaf_to_its_signal_is_killed(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    process = python(IGNORES_TERM, log)
    processes.wait_until_ready(
        process,
        lambda: "listening" in log.read_text(),
        "the server",
        timeout=60,
        details=lambda: processes.log_tail(log),
    )
    assert processes.stop(process, timeout=0.5) == -signal.SIGKILL
    assert processes.stop(None) is None
