"""Backups taken while the portal works, restored into a new data directory on other ports.

A modality stores in a loop and a zip downloads while ``./pacs backup`` runs; the backup is
restored into an empty data directory and started as a second portal. Everything acknowledged
before the backup started must be there byte for byte: studies, users, patients' links, the
activity log. A damaged backup is refused with the damaged part named, and a live data directory
is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import requests
import sqlalchemy as sa

from bench.stack import free_ports, stack_environment
from control import db

from conftest import REPOSITORY, Stack, c_store, free_port, fresh_study, make_stack
from samples import make_study, store_study

pytestmark = pytest.mark.stack

DOCTOR, DOCTOR_PASSWORD = "dr.backup", "a doctor's long password"


def pacs(data: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "control", "--data", str(data), *args],
        cwd=REPOSITORY,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
    )


def stored_md5s(stack: Stack) -> dict[str, str]:
    """Every instance the archive holds: its SOP Instance UID and the MD5 of its file."""
    session = stack.orthanc()
    found = {}
    for instance in session.get(f"{stack.orthanc_url}/instances", params={"expand": "1"}).json():
        content = session.get(f"{stack.orthanc_url}/instances/{instance['ID']}/file").content
        found[instance["MainDicomTags"]["SOPInstanceUID"]] = hashlib.md5(content).hexdigest()  # noqa: S324
    return found


def activity_rows(data: Path, up_to: int | None = None) -> list[tuple]:
    connection = sqlite3.connect(data / "control.sqlite3")
    try:
        query = "SELECT * FROM activity WHERE id <= ? ORDER BY id"
        return connection.execute(query, (up_to or 2**62,)).fetchall()
    finally:
        connection.close()


class Modality(threading.Thread):
    """Stores a new study again and again until told to stop; notes when each was acknowledged."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.stop = threading.Event()
        self.acknowledged: list[tuple[float, str]] = []
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            dataset = fresh_study("CT_small.dcm", patient_name="LOOP^STORE")
            try:
                status = c_store(self.stack, dataset)
            except Exception as error:
                self.failures.append(repr(error))
                continue
            if status == 0:
                self.acknowledged.append((time.monotonic(), dataset.SOPInstanceUID))
            else:
                self.failures.append(f"status 0x{status:04x}")


class Download(threading.Thread):
    """Downloads one study's zip again and again until told to stop; notes each one's size."""

    def __init__(self, session: requests.Session, url: str) -> None:
        super().__init__(daemon=True)
        self.session, self.url = session, url
        self.stop = threading.Event()
        self.sizes: list[int] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with self.session.get(self.url, stream=True, timeout=120) as response:
                    size = sum(len(chunk) for chunk in response.iter_content(256 * 1024))
                if response.status_code != 200:
                    self.errors.append(f"HTTP {response.status_code}")
                self.sizes.append(size)
            except requests.RequestException as error:
                self.errors.append(repr(error))


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory):
    """A portal with studies, a user, a patient's link and activity, backed up while it works."""
    folder = tmp_path_factory.mktemp("backup")
    source = make_stack(folder / "data")
    source.start()
    try:
        for sample in ("CT_small.dcm", "MR_small.dcm"):
            assert c_store(source, fresh_study(sample, patient_name="BEFORE^BACKUP")) == 0
        made = pacs(
            source.data, "user", "add", DOCTOR, "--real-name", "Dr Backup", stdin=DOCTOR_PASSWORD + "\n"
        )
        assert made.returncode == 0, made.stderr
        study = source.orthanc().get(f"{source.orthanc_url}/studies", params={"expand": "1"}).json()[0]
        link = source.pacs("token", study["MainDicomTags"]["StudyInstanceUID"])
        assert link.returncode == 0, link.stderr
        doctor = source.sign_in(DOCTOR, DOCTOR_PASSWORD)

        modality = Modality(source)
        download = Download(doctor, f"{source.url}/query/studies/{study['ID']}/archive")
        modality.start()
        download.start()
        while len(modality.acknowledged) < 3 or not download.sizes:
            assert not modality.failures and not download.errors
            time.sleep(0.2)
        expected = stored_md5s(source)
        last_event = activity_rows(source.data)[-1][0]
        started = time.monotonic()
        made = pacs(source.data, "backup", str(folder / "backup"))
        finished = time.monotonic()
        # Stores and downloads went on after the backup too.
        stored_during = len(modality.acknowledged)
        while len(modality.acknowledged) < stored_during + 2:
            time.sleep(0.2)
        modality.stop.set()
        download.stop.set()
        modality.join(60)
        download.join(180)
        assert made.returncode == 0, made.stdout + made.stderr
        source.stop()
        yield {
            "folder": folder,
            "backup": folder / "backup",
            "source": source,
            "expected": expected,
            "acknowledged_before": [uid for at, uid in modality.acknowledged if at < started],
            "stored_while": [uid for at, uid in modality.acknowledged if started <= at <= finished],
            "modality": modality,
            "download": download,
            "link": link.stdout.strip(),
            "study": study,
            "activity": activity_rows(source.data, up_to=last_event),
            "output": made.stdout,
        }
    finally:
        source.stop()


def test_stores_and_downloads_go_on_while_the_backup_runs(backed_up) -> None:
    modality, download = backed_up["modality"], backed_up["download"]
    assert modality.failures == [] and download.errors == []
    assert backed_up["stored_while"], "no store was acknowledged while the backup ran"
    assert len(set(download.sizes)) == 1, "a zip downloaded during the backup came out different"
    assert "archive index" in backed_up["output"] and "stored files" in backed_up["output"]


def test_a_restored_portal_holds_everything_acknowledged_before_the_backup(backed_up) -> None:
    target = backed_up["folder"] / "restored"
    restored = pacs(target, "restore", str(backed_up["backup"]))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    for name in ("web_port", "dicom_port", "orthanc_http_port"):
        moved = pacs(target, "config", "set", name, str(free_port()))
        assert moved.returncode == 0, moved.stderr
    second = make_stack(target)
    assert second.web_port != backed_up["source"].web_port
    second.start()
    try:
        held = stored_md5s(second)
        expected = backed_up["expected"]
        # Every store acknowledged before the backup began is in the restore: also those acknowledged
        # after ``expected`` was listed (the modality keeps storing meanwhile).
        assert set(backed_up["acknowledged_before"]) <= set(held)
        for uid, md5 in expected.items():
            assert held.get(uid) == md5, f"instance {uid} is missing or differs after the restore"
        # Users sign in with their passwords, as before.
        second.sign_in()
        second.sign_in(DOCTOR, DOCTOR_PASSWORD)
        # The patient's link opens the same study.
        token = backed_up["link"].split("?", 1)[1]
        page = requests.get(f"{second.url}/token?{token}")
        assert page.status_code == 200
        assert "BEFORE" in page.text
        # Every activity row up to the backup is there, unchanged.
        before = backed_up["activity"]
        assert activity_rows(target, up_to=before[-1][0]) == before
    finally:
        second.stop()


def test_a_second_backup_copies_only_new_files(backed_up) -> None:
    source = make_stack(backed_up["source"].data)
    source.start()
    try:
        assert c_store(source, fresh_study("CT_small.dcm")) == 0
        again = pacs(source.data, "backup", str(backed_up["backup"]))
        # Restoring onto the running portal's own data directory is refused outright.
        refused = pacs(source.data, "restore", str(backed_up["backup"]))
        assert refused.returncode == 1 and "is running" in refused.stderr, refused.stderr
    finally:
        source.stop()
    assert again.returncode == 0, again.stderr
    first, second = sorted((backed_up["backup"] / "snapshots").iterdir())
    before = json.loads((first / "manifest.json").read_text())["stored_files"]["count"]
    now = json.loads((second / "manifest.json").read_text())["stored_files"]["count"]
    # Only what came after the first backup was copied (the modality's last stores and this one).
    assert re.search(rf"stored files: {now} \(.*\); {now - before} new", again.stdout), again.stdout
    assert now - before < now / 2
    assert len(list((backed_up["backup"] / "snapshots").iterdir())) == 2


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("orthanc-index.sqlite3", "archive index"),
        ("control.sqlite3", "control database"),
        ("secrets.tar", "secrets"),
        ("a stored file", "stored files"),
    ],
)
def test_a_damaged_backup_is_refused_with_the_part_named(
    backed_up, tmp_path: Path, damage: str, named: str
) -> None:
    copy = tmp_path / "backup"
    shutil.copytree(backed_up["backup"], copy)
    snapshot = sorted((copy / "snapshots").iterdir())[-1]
    victim = next((copy / "files").glob("*/*/*")) if damage == "a stored file" else snapshot / damage
    content = bytearray(victim.read_bytes())
    content[len(content) // 2] ^= 0xFF
    victim.write_bytes(bytes(content))
    target = tmp_path / "restored"
    refused = pacs(target, "restore", str(copy))
    assert refused.returncode == 1
    assert f"the backup's {named}" in refused.stderr and "damaged" in refused.stderr, refused.stderr
    assert "nothing was restored" in refused.stderr
    assert not target.exists() and not list(tmp_path.glob(".restored*"))
    checked = pacs(target, "restore", "--check", str(copy))
    assert checked.returncode == 1 and f"the backup's {named}" in checked.stderr


def test_restore_never_overwrites_a_data_directory_in_use(backed_up, tmp_path: Path) -> None:
    source = backed_up["source"]
    refused = pacs(source.data, "restore", str(backed_up["backup"]))
    assert refused.returncode == 1
    assert "is not empty" in refused.stderr
    assert source.data.joinpath("control.sqlite3").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("the admin's own file")
    assert pacs(occupied, "restore", str(backed_up["backup"])).returncode == 1
    assert [path.name for path in occupied.iterdir()] == ["notes.txt"]


def test_a_portal_on_postgresql_is_backed_up_with_pg_dump_and_restored(tmp_path: Path) -> None:
    from postgres import PostgresServer, binaries

    if binaries() is None:
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    server = PostgresServer(free_port())
    server.start()
    try:
        source_url = server.create_database("pacs_source")
        source = make_stack(tmp_path / "data", PACS_DATABASE_URL=source_url)
        source.start()
        try:
            assert c_store(source, fresh_study("CT_small.dcm")) == 0
            made = source.pacs("user", "add", DOCTOR, input=DOCTOR_PASSWORD + "\n")
            assert made.returncode == 0, made.stderr
            made = source.pacs("backup", str(tmp_path / "backup"))
            assert made.returncode == 0, made.stdout + made.stderr
        finally:
            source.stop()
        snapshot = sorted((tmp_path / "backup" / "snapshots").iterdir())[-1]
        assert (snapshot / "control.pgdump").exists()

        # Into SQLite it is refused: the engines differ.
        refused = pacs(tmp_path / "elsewhere", "restore", str(tmp_path / "backup"))
        assert refused.returncode == 1 and "set PACS_DATABASE_URL" in refused.stderr

        target_url = server.create_database("pacs_target")
        restore_env = {**source.env, "PACS_DATABASE_URL": target_url}
        restored = subprocess.run(
            [
                sys.executable,
                "-m",
                "control",
                "--data",
                str(tmp_path / "restored"),
                "restore",
                str(tmp_path / "backup"),
            ],
            cwd=REPOSITORY,
            env=restore_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert restored.returncode == 0, restored.stdout + restored.stderr
        tables = ("users", "activity", "settings", "study_tokens")
        engines = [sa.create_engine(source_url), sa.create_engine(target_url)]
        try:
            contents = []
            for engine in engines:
                with engine.connect() as connection:
                    contents.append(
                        {
                            table: sorted(
                                map(tuple, connection.execute(sa.select(getattr(db, table)))),
                                key=repr,
                            )
                            for table in tables
                        }
                    )
            assert contents[0] == contents[1]
            assert any(DOCTOR in row for row in contents[1]["users"])
        finally:
            for engine in engines:
                engine.dispose()
        # The database now holds a portal: a second restore into it is refused.
        again = subprocess.run(
            [
                sys.executable,
                "-m",
                "control",
                "--data",
                str(tmp_path / "again"),
                "restore",
                str(tmp_path / "backup"),
            ],
            cwd=REPOSITORY,
            env=restore_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert again.returncode == 1 and "is not empty" in again.stderr
        assert not (tmp_path / "again").exists()
    finally:
        server.stop()


# ---- an archive whose index is on PostgreSQL: two nodes, as ./pacs up --nodes 2 runs them ----


@pytest.fixture(scope="module")
def backed_up_on_postgresql(postgres, tmp_path_factory: pytest.TempPathFactory):
    """A portal of two archive nodes whose control plane and archive index are on PostgreSQL
    (``pacs_source`` and ``pacs_source_archive``), backed up while a modality stores into node 1;
    stopped once the backup is made."""
    folder = tmp_path_factory.mktemp("postgresql-index")
    source = make_stack(
        folder / "data",
        PACS_DATABASE_URL=with_password(postgres.create_database("pacs_source")),
        PACS_NODES="2",
    )
    # The second node takes the ports after the first one's.
    source.dicom_port, source.orthanc_port = free_ports(2), free_ports(2)
    source.env.update(PACS_DICOM_PORT=str(source.dicom_port), PACS_ORTHANC_HTTP_PORT=str(source.orthanc_port))
    source.start()
    try:
        assert (source.data / "run" / "orthanc-2.pid").exists()
        assert "attachedfiles" in tables_in(postgres.url("pacs_source_archive"))
        assert not (source.data / "orthanc" / "index").exists()
        studies = [
            store_study(source, make_study("Before^Backup", series=(("CT", 3), ("MR", 2)))),
            store_study(source, make_study("Before^Second", series=(("CT", 2),))),
        ]
        link = source.pacs("token", studies[0].uid)
        assert link.returncode == 0, link.stderr
        modality = Modality(source)
        modality.start()
        while len(modality.acknowledged) < 3:
            assert not modality.failures
            time.sleep(0.2)
        expected = stored_md5s(source)
        started = time.monotonic()
        made = source.pacs("backup", str(folder / "backup"))
        finished = time.monotonic()
        stored_during = len(modality.acknowledged)
        while len(modality.acknowledged) < stored_during + 2 and not modality.failures:
            time.sleep(0.2)
        modality.stop.set()
        modality.join(60)
        assert made.returncode == 0, made.stdout + made.stderr
        yield {
            "folder": folder,
            "backup": folder / "backup",
            "source": source,
            "studies": studies,
            "expected": expected,
            "acknowledged_before": [uid for at, uid in modality.acknowledged if at < started],
            "stored_while": [uid for at, uid in modality.acknowledged if started <= at <= finished],
            "modality": modality,
            "link": link.stdout.strip(),
            "output": made.stdout + made.stderr,
        }
    finally:
        source.stop()


# The test server trusts its clients whatever they send: a password that must never be shown.
PASSWORD = "index-password-never-shown"


def with_password(url: str) -> str:
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


def restore_on_postgresql(data: Path, backup: Path, **env: str) -> subprocess.CompletedProcess:
    """``./pacs restore`` into ``data`` with the databases ``env`` names (none: SQLite)."""
    environment = stack_environment(free_port(), free_port(), free_port(), **env)
    return subprocess.run(
        [sys.executable, "-m", "control", "--data", str(data), "restore", str(backup)],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


def tables_in(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        return sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_a_postgresql_index_is_backed_up_while_modalities_store(backed_up_on_postgresql) -> None:
    backed = backed_up_on_postgresql
    assert backed["modality"].failures == []
    assert backed["stored_while"], "no store was acknowledged while the backup ran"
    assert "archive index" in backed["output"] and "pg_dump" in backed["output"]
    assert PASSWORD not in backed["output"]
    assert not [
        path
        for path in backed["backup"].rglob("*")
        if path.is_file() and PASSWORD.encode() in path.read_bytes()
    ]
    (snapshot,) = (backed["backup"] / "snapshots").iterdir()
    manifest = json.loads((snapshot / "manifest.json").read_text())
    assert manifest["archive_index"] == "postgresql"
    assert {"control database", "archive index"} <= {part["name"] for part in manifest["parts"]}
    # Exactly the files the dumped index names, as many as the archive held then or more.
    assert manifest["stored_files"]["count"] >= len(backed["expected"])
    assert len(list((backed["backup"] / "files").glob("*/*/*"))) == manifest["stored_files"]["count"]
    assert {path.stat().st_mode & 0o777 for path in snapshot.iterdir()} == {0o600}
    checked = pacs(backed["folder"] / "unused", "restore", "--check", str(backed["backup"]))
    assert checked.returncode == 0, checked.stderr
    assert f"all {manifest['stored_files']['count']} stored files" in checked.stdout


def test_a_postgresql_index_is_restored_into_a_new_data_directory_and_database(
    backed_up_on_postgresql, postgres
) -> None:
    backed = backed_up_on_postgresql
    target = backed["folder"] / "restored"
    target_url = postgres.create_database("pacs_restored")
    # The index goes into pacs_restored_archive, which the restore creates as ./pacs up would.
    restored = restore_on_postgresql(target, backed["backup"], PACS_DATABASE_URL=with_password(target_url))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert PASSWORD not in restored.stdout + restored.stderr
    assert "archive index restored" in restored.stdout
    assert "attachedfiles" in tables_in(postgres.url("pacs_restored_archive"))
    # The backed-up portal ran two nodes: the restored one starts two again, on ports of its own.
    second = make_stack(target, PACS_DATABASE_URL=target_url)
    second.dicom_port, second.orthanc_port = free_ports(2), free_ports(2)
    for name, port in (
        ("web_port", second.web_port),
        ("dicom_port", second.dicom_port),
        ("orthanc_http_port", second.orthanc_port),
    ):
        moved = second.pacs("config", "set", name, str(port))
        assert moved.returncode == 0, moved.stderr
    second.start()
    try:
        assert (target / "run" / "orthanc-2.pid").exists() and (target / "run" / "control-2.pid").exists()
        held = stored_md5s(second)
        # Every store acknowledged before the backup began is there, with every instance of the
        # studies stored before, byte for byte.
        assert set(backed["acknowledged_before"]) <= set(held)
        for uid, md5 in backed["expected"].items():
            assert held.get(uid) == md5, f"instance {uid} is missing or differs after the restore"
        # A signed-in user finds each study stored before the backup, through the portal.
        session = second.sign_in()
        for study in backed["studies"]:
            rows = session.get(
                f"{second.url}/query/studies", params={"patient_id": study.patient_id, "format": "json"}
            ).json()["rows"]
            assert len(rows) == 1, rows
        # A patient's link made before the backup opens the same study.
        token = backed["link"].split("?", 1)[1]
        patient = requests.Session()
        page = patient.get(f"{second.url}/token?{token}")
        assert page.status_code == 200 and "Before" in page.text
        viewer = patient.get(f"{second.url}/token/viewer?{token}", allow_redirects=False)
        assert viewer.headers["Location"] == f"/viewer?StudyInstanceUIDs={backed['studies'][0].uid}"
        # The restored portal stores into its own index, not the original's.
        assert c_store(second, fresh_study("CT_small.dcm")) == 0
    finally:
        second.stop()


def test_a_damaged_dump_of_the_index_is_refused_with_the_part_named(
    backed_up_on_postgresql, postgres, tmp_path: Path
) -> None:
    copy = tmp_path / "backup"
    shutil.copytree(backed_up_on_postgresql["backup"], copy)
    (snapshot,) = (copy / "snapshots").iterdir()
    victim = snapshot / "orthanc-index.pgdump"
    content = bytearray(victim.read_bytes())
    content[len(content) // 2] ^= 0xFF
    victim.write_bytes(bytes(content))
    target_url = postgres.create_database("pacs_damaged")
    refused = restore_on_postgresql(tmp_path / "restored", copy, PACS_DATABASE_URL=target_url)
    assert refused.returncode == 1
    assert "the backup's archive index" in refused.stderr and "damaged" in refused.stderr, refused.stderr
    assert "nothing was restored" in refused.stderr
    assert not (tmp_path / "restored").exists()
    assert tables_in(target_url) == []
    checked = pacs(tmp_path / "restored", "restore", "--check", str(copy))
    assert checked.returncode == 1 and "the backup's archive index" in checked.stderr


def test_restoring_a_postgresql_index_says_which_databases_to_set(
    backed_up_on_postgresql, postgres, tmp_path: Path
) -> None:
    backup = backed_up_on_postgresql["backup"]
    told = restore_on_postgresql(tmp_path / "restored", backup)
    assert told.returncode == 1
    assert "set PACS_DATABASE_URL" in told.stderr and "PACS_ARCHIVE_DATABASE_URL" in told.stderr
    # An index database that holds an archive already is refused before anything is written.
    control_url = postgres.create_database("pacs_beside")
    refused = restore_on_postgresql(
        tmp_path / "restored",
        backup,
        PACS_DATABASE_URL=control_url,
        PACS_ARCHIVE_DATABASE_URL=with_password(postgres.url("pacs_source_archive")),
    )
    assert refused.returncode == 1
    assert "the database PACS_ARCHIVE_DATABASE_URL names is not empty" in refused.stderr
    assert PASSWORD not in refused.stderr + refused.stdout
    assert tables_in(control_url) == [] and not (tmp_path / "restored").exists()


def databases_on(postgres) -> set[str]:
    with psycopg.connect(postgres.url("postgres", driver=False)) as connection:
        return {name for (name,) in connection.execute("SELECT datname FROM pg_database")}


def test_a_refused_restore_leaves_no_archive_database_it_created(
    backed_up_on_postgresql, postgres, tmp_path: Path
) -> None:
    copy = tmp_path / "backup"
    shutil.copytree(backed_up_on_postgresql["backup"], copy)
    # A stored file damaged on the backup's disk: found only once the restore copies it, after the
    # archive's database was made for the index.
    victim = next((copy / "files").glob("*/*/*"))
    content = bytearray(victim.read_bytes())
    content[len(content) // 2] ^= 0xFF
    victim.write_bytes(bytes(content))
    target_url = postgres.create_database("pacs_refused")
    assert "pacs_refused_archive" not in databases_on(postgres)
    refused = restore_on_postgresql(tmp_path / "restored", copy, PACS_DATABASE_URL=target_url)
    assert refused.returncode == 1
    assert "damaged" in refused.stderr and "nothing was restored" in refused.stderr, refused.stderr
    assert "pacs_refused_archive" not in databases_on(postgres)
    assert tables_in(target_url) == [] and not (tmp_path / "restored").exists()
    # A database the admin made beforehand is theirs: it stays, as empty as it was.
    made = postgres.create_database("pacs_refused_archive")
    refused = restore_on_postgresql(tmp_path / "restored", copy, PACS_DATABASE_URL=target_url)
    assert refused.returncode == 1
    assert "pacs_refused_archive" in databases_on(postgres) and tables_in(made) == []
