"""Logs that do not fill the disk: each rotates by size and only a few older files are kept.

A stack with a 1 MB limit and 2 older files kept gets its access log pushed past that limit
several times over: the log rotates, no more than two older files remain, and the stack keeps
writing to the new file. Run for the journal, nothing is written to files but Orthanc's log, which
the archive watcher reads (and which goes to the journal too).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import requests

from conftest import make_stack, wait_until

pytestmark = pytest.mark.stack

LINE_PATH = "/no-such-page/" + "x" * 4000  # one access-log line of about 4 kB


def push(url: str, megabytes: float) -> None:
    session = requests.Session()
    for _ in range(int(megabytes * 1024 * 1024 / len(LINE_PATH)) + 1):
        assert session.get(url + LINE_PATH).status_code == 404


def test_a_log_past_its_size_rotates_and_the_stack_keeps_writing(tmp_path: Path) -> None:
    stack = make_stack(tmp_path / "data", PACS_LOG_MAX_MB="1", PACS_LOG_KEEP="2")
    stack.start()
    try:
        logs = stack.data / "logs"
        assert "each rotated at 1 MB, 2 older files kept" in "".join(stack.output)
        push(stack.url, 3.5)
        wait_until(lambda: (logs / "access.log.2").exists(), "the second rotation")
        assert not (logs / "access.log.3").exists()
        for rotated in ("access.log.1", "access.log.2"):
            size = (logs / rotated).stat().st_size
            assert 0.9 * 1024 * 1024 < size <= 1024 * 1024 + 8192
        marker = f"/after-rotation-{uuid.uuid4().hex}"
        assert requests.get(stack.url + marker).status_code == 404
        wait_until(lambda: marker in (logs / "access.log").read_text(), "the marker in the new log")
        assert requests.get(f"{stack.url}/healthz").status_code == 200
        # Caddy rolls its own log with the same bounds.
        caddyfile = (stack.data / "run" / "Caddyfile").read_text()
        assert "roll_size 1MiB" in caddyfile and "roll_keep 2" in caddyfile
        status = stack.pacs("status")
        assert f"logs in {logs}, each rotated at 1 MB, 2 older files kept" in status.stdout
    finally:
        stack.stop()


def test_for_the_journal_every_line_goes_to_the_runners_output(tmp_path: Path) -> None:
    stack = make_stack(tmp_path / "data", PACS_LOGS="journal")
    stack.start()
    try:
        marker = f"/journal-{uuid.uuid4().hex}"
        assert requests.get(stack.url + marker).status_code == 404
        wait_until(lambda: marker in stack.runner_log.read_text(), "the marker in the journal")
        assert "control-access: " in stack.runner_log.read_text()
        assert "orthanc: " in stack.runner_log.read_text()
        assert [path.name for path in (stack.data / "logs").iterdir()] == ["orthanc.log"]
        assert "Orthanc has started" in (stack.data / "logs" / "orthanc.log").read_text()
        assert "output stderr" in (stack.data / "run" / "Caddyfile").read_text()
    finally:
        stack.stop()
