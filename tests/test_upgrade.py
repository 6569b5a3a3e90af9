"""An installation made by an older version upgrades in place, and a failed upgrade loses nothing.

The older version is this repository's first commit with web users and patients' study links
that runs, checked out into a temporary worktree and run as its admin ran it. Studies, a user, a link and
activity are put in; then the current ``./pacs up`` runs on the same data directory, migrates the
database, and everything must still be there. A migration that fails (here: the old database
already holds an index of the name the new migration creates) must leave the old database exactly
as it was and say so; once the obstacle is gone, the upgrade goes through.
"""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from alembic.config import Config
from alembic.script import ScriptDirectory

from conftest import ADMIN_PASSWORD, REPOSITORY, c_store, fresh_study, make_stack

pytestmark = pytest.mark.stack

# Web users and study links came with 6f5dffe, but that commit and the next one import modules
# that only arrive with this one ("Uploads: ..."): the first commit with users and study links
# that runs.
OLD_COMMIT = "9a2a763"
DOCTOR, DOCTOR_PASSWORD = "dr.upgrade", "a long password of the old days"
BANNER = "Press Ctrl-C to stop."


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tree = tmp_path_factory.mktemp("old") / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(tree), OLD_COMMIT],
        cwd=REPOSITORY,
        check=True,
        capture_output=True,
    )
    yield tree
    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPOSITORY, capture_output=True)


def old_pacs(tree: Path, env: dict[str, str], data: Path, *args: str, stdin: str | None = None):
    """A command of the old version (its own code, this virtual environment: its pins are a subset)."""
    return subprocess.run(
        [sys.executable, "-m", "control", "--data", str(data), *args],
        cwd=tree,
        env={**env, "PYTHONPATH": str(tree)},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


class OldPortal:
    """The old version's ``./pacs up``, in the foreground, stopped with Ctrl-C."""

    def __init__(self, tree: Path, env: dict[str, str], data: Path) -> None:
        self.output = data.parent / "old-runner.out"
        with self.output.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "control", "--data", str(data), "up"],
                cwd=tree,
                env={**env, "PYTHONPATH": str(tree)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 240
        while BANNER not in self.output.read_text(errors="replace"):
            assert self.process.poll() is None, self.output.read_text()
            assert time.monotonic() < deadline, self.output.read_text()
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(60)


def sqlite_dump(database: Path) -> list[str]:
    connection = sqlite3.connect(database)
    try:
        return list(connection.iterdump())
    finally:
        connection.close()


@pytest.fixture(scope="module")
def old_installation(old_tree: Path, tmp_path_factory: pytest.TempPathFactory):
    """A data directory made and used by the old version, then stopped."""
    data = tmp_path_factory.mktemp("upgrade") / "data"
    stack = make_stack(data)  # ports and environment only: the old version runs it
    old = OldPortal(old_tree, stack.env, data)
    try:
        studies = [
            fresh_study(sample, patient_name="OLD^TIMES") for sample in ("CT_small.dcm", "MR_small.dcm")
        ]
        for dataset in studies:
            assert c_store(stack, dataset) == 0
        made = old_pacs(old_tree, stack.env, data, "user", "add", DOCTOR, stdin=DOCTOR_PASSWORD + "\n")
        assert made.returncode == 0, made.stderr
        link = old_pacs(old_tree, stack.env, data, "token", studies[0].StudyInstanceUID)
        assert link.returncode == 0, link.stderr
        doctor = stack.sign_in(DOCTOR, DOCTOR_PASSWORD)
        assert doctor.get(f"{stack.url}/query/studies", params={"patient_name": "OLD*"}).status_code == 200
        token = link.stdout.strip().split("?", 1)[1]
        assert requests.get(f"{stack.url}/token?{token}").status_code == 200
        session = stack.orthanc()
        files = {
            instance["MainDicomTags"]["SOPInstanceUID"]: hashlib.sha256(
                session.get(f"{stack.orthanc_url}/instances/{instance['ID']}/file").content
            ).hexdigest()
            for instance in session.get(f"{stack.orthanc_url}/instances", params={"expand": "1"}).json()
        }
    finally:
        old.stop()
    uids = [dataset.StudyInstanceUID for dataset in studies]
    return {"data": data, "stack": stack, "token": token, "files": files, "studies": uids}


def newest_schema() -> str:
    config = Config()
    config.set_main_option("script_location", str(REPOSITORY / "control" / "migrations"))
    return ScriptDirectory.from_config(config).get_current_head()


def activity_of(database: Path) -> list[dict]:
    connection = sqlite3.connect(database)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute("SELECT * FROM activity ORDER BY id")]
    finally:
        connection.close()


def test_a_failed_upgrade_leaves_the_old_database_as_it_was(old_installation) -> None:
    database = old_installation["data"] / "control.sqlite3"
    connection = sqlite3.connect(database)
    with connection:
        connection.execute("CREATE INDEX ix_activity_list_at ON activity (at)")
    connection.close()
    before = sqlite_dump(database)
    stack = make_stack(old_installation["data"])
    refused = stack.pacs("up")
    assert refused.returncode == 1
    assert "could not be upgraded from schema 0002" in refused.stderr
    assert "left as it was" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sqlite_dump(database) == before
    assert not list(database.parent.glob("*.before-upgrade-*"))
    connection = sqlite3.connect(database)
    with connection:
        connection.execute("DROP INDEX ix_activity_list_at")
    connection.close()


def test_the_new_version_upgrades_the_old_installation_in_place(old_installation) -> None:
    data = old_installation["data"]
    activity_before = activity_of(data / "control.sqlite3")
    assert activity_before
    stack = make_stack(data)
    stack.start()
    try:
        stack.sign_in("admin", ADMIN_PASSWORD)
        doctor = stack.sign_in(DOCTOR, DOCTOR_PASSWORD)
        found = doctor.get(f"{stack.url}/query/studies", params={"patient_name": "OLD*", "format": "json"})
        assert found.status_code == 200
        assert all(uid in found.text for uid in old_installation["studies"])
        patient = requests.get(f"{stack.url}/token?{old_installation['token']}")
        assert patient.status_code == 200 and "OLD" in patient.text
        session = stack.orthanc()
        for instance in session.get(f"{stack.orthanc_url}/instances", params={"expand": "1"}).json():
            content = session.get(f"{stack.orthanc_url}/instances/{instance['ID']}/file").content
            expected = old_installation["files"].pop(instance["MainDicomTags"]["SOPInstanceUID"])
            assert hashlib.sha256(content).hexdigest() == expected
        assert old_installation["files"] == {}, "studies of the old installation are missing"
        with sqlite3.connect(data / "control.sqlite3") as connection:
            assert (
                connection.execute("SELECT version_num FROM alembic_version").fetchone()[0] == newest_schema()
            )
    finally:
        stack.stop()
    # Every row as it was, in the columns it had (migrations add columns, never change a value).
    after = activity_of(data / "control.sqlite3")[: len(activity_before)]
    assert [{name: row[name] for name in activity_before[0]} for row in after] == activity_before
