"""The code stays as ruff leaves it: lint-clean and formatted (configuration in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPOSITORY

pytestmark = pytest.mark.inprocess

CODE = [name for name in ("control", "tests", "downloader", "bench") if (REPOSITORY / name).is_dir()]


def test_ruff_finds_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", *CODE], cwd=REPOSITORY, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_the_code_is_formatted() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", *CODE],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout
