"""Who may read the data directory: every file the stack writes, after a real store and sign-in.

Each test walks the whole data directory with ``os.stat`` once the portal has stored a study
(C-STORE to Orthanc), signed a user in and written its logs: the database, the archive's files and
index, logs, generated configurations, sockets and secrets.
"""

from __future__ import annotations

import grp
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Stack, c_store, fresh_study, make_stack

pytestmark = pytest.mark.stack

PRIVATE_FOLDERS = ("secrets", "run", "tmp")
# Written by the tests' own runner (the stack's output), not by the stack.
NOT_THE_STACKS = {"runner.out"}


def everything(data: Path) -> Iterator[tuple[Path, os.stat_result]]:
    for folder, directories, files in os.walk(data):
        for name in [*directories, *files]:
            path = Path(folder) / name
            if path.relative_to(data).as_posix() in NOT_THE_STACKS:
                continue
            yield path, os.lstat(path)
    yield data, os.lstat(data)


def use(stack: Stack) -> None:
    """What an ordinary day writes: a study stored by a modality, a sign-in."""
    assert c_store(stack, fresh_study("CT_small.dcm")) == 0
    assert c_store(stack, fresh_study("MR_small.dcm")) == 0
    stack.sign_in()


def readable_by_others(data: Path) -> list[str]:
    return [
        f"{path.relative_to(data)} {stat.filemode(info.st_mode)}"
        for path, info in everything(data)
        if not stat.S_ISLNK(info.st_mode) and info.st_mode & 0o077
    ]


def test_everything_the_stack_writes_is_the_services_alone(tmp_path: Path) -> None:
    stack = make_stack(tmp_path / "data")
    stack.start()
    try:
        use(stack)
        stored = [path for path, info in everything(stack.data / "orthanc") if stat.S_ISREG(info.st_mode)]
        assert len(stored) >= 3  # two DICOM files and the index at least
        assert (stack.data / "control.sqlite3").exists()
        assert readable_by_others(stack.data) == []
    finally:
        stack.stop()


def test_an_existing_installation_is_put_right_at_the_next_start(tmp_path: Path) -> None:
    stack = make_stack(tmp_path / "data")
    stack.start()
    use(stack)
    stack.stop()
    # As an installation of an earlier version left it: readable by all, no record of a fix.
    for path, info in everything(stack.data):
        if not stat.S_ISLNK(info.st_mode):
            os.chmod(path, stat.S_IMODE(info.st_mode) | (0o055 if stat.S_ISDIR(info.st_mode) else 0o044))
    (stack.data / ".permissions").unlink(missing_ok=True)
    assert readable_by_others(stack.data)

    stack.output.clear()  # wait for this start's banner, not the first one's
    stack.start()
    try:
        use(stack)
        assert readable_by_others(stack.data) == []
    finally:
        stack.stop()


def test_a_group_of_the_admins_choice_reads_all_but_the_secrets(tmp_path: Path) -> None:
    group = grp.getgrnam("nogroup").gr_gid
    assert group != os.getgid()
    stack = make_stack(tmp_path / "data", PACS_DATA_GROUP="nogroup")
    stack.start()
    try:
        use(stack)
        for path, info in everything(stack.data):
            if stat.S_ISLNK(info.st_mode):
                continue
            relative = path.relative_to(stack.data)
            where = f"{relative} {stat.filemode(info.st_mode)} gid {info.st_gid}"
            assert not info.st_mode & 0o007, where
            if relative.as_posix() in PRIVATE_FOLDERS:
                # Closed to the group: nothing inside can be reached.
                assert stat.S_IMODE(info.st_mode) == 0o700, where
            elif relative.parts[:1] and relative.parts[0] in PRIVATE_FOLDERS:
                continue
            elif stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
                assert info.st_gid == group, where
                assert info.st_mode & 0o040, where
    finally:
        stack.stop()
