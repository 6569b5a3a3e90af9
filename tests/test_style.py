"""The code stays as ruff leaves it (lint-clean and formatted) and as mypy reads it: no type error
in the control plane (configuration of both in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPOSITORY

CODE = [name for name in ("control", "tests", "downloader", "bench") if (REPOSITORY / name).is_dir()]


@pytest.mark.inprocess
def test_ruff_finds_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", *CODE], cwd=REPOSITORY, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.inprocess
def test_the_code_is_formatted() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", *CODE],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


def test_mypy_finds_no_type_error() -> None:
    """mypy over what pyproject.toml names (``files``), with its cache in the repository's
    ``.mypy_cache`` (ignored by git): a few seconds once warm, about a minute cold on 2 cores, which
    is why this test is not in the in-process layer."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(REPOSITORY / ".mypy_cache")],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
