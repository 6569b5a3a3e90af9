"""The benchmark keeps working: ``./pacs bench --smoke`` on tiny data, every scenario, no timings judged.

Benchmarks are not tests (issue 8): nothing here looks at a time. What is checked is that the
code runs end to end against a real stack, writes its report and plot, and that every content
check (the portal's answer against Orthanc's) passed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPOSITORY

pytestmark = pytest.mark.stack

SCENARIOS = {"zip", "search", "viewer", "upload", "users", "growth", "catalog", "activity", "nodes"}
# The scenarios that ask both ways the same question, so each has a "same content" check.
COMPARED = {"zip", "search", "viewer", "upload", "growth", "catalog", "nodes"}


def test_a_smoke_run_reports_every_scenario_with_matching_content(tmp_path: Path) -> None:
    results, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    options = ["--smoke", "--data", str(tmp_path / "stack"), "--json", str(results), "--plot", str(plot)]
    run = subprocess.run(
        [sys.executable, "-m", "bench", *options],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    report = json.loads(results.read_text())
    assert set(report["scenarios"]) == SCENARIOS
    assert {row["scenario"] for row in report["rows"]} == SCENARIOS
    failed = [check for check in report["checks"] if not check["passed"]]
    assert not failed and report["all_checks_passed"]
    content_checks = {check["scenario"] for check in report["checks"] if "same content" in check["what"]}
    assert content_checks == COMPARED
    assert any(
        "byte for byte" in check["what"] for check in report["checks"] if check["scenario"] == "upload"
    )
    assert all(row["met"] is None for row in report["rows"]), "a smoke run judges no target"
    assert all(row["portal"] is not None for row in report["rows"])

    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert json.loads((tmp_path / "stack" / "bench.json").read_text())["rows"] == report["rows"]
    assert not (tmp_path / "stack" / "run" / "pacs.pid").exists(), "the stack was not stopped"
    assert "| zip |" in run.stdout and "content checks: " in run.stdout
