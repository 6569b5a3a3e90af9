"""Backups of an installation while it runs, and restoring one into an empty data directory.

``./pacs backup DEST`` writes a snapshot into ``DEST/snapshots/<UTC time>/``: the control plane's
database (SQLite's online backup API, or ``pg_dump`` on PostgreSQL), the archive's index (a copy
of Orthanc's SQLite file, or ``pg_dump`` of its PostgreSQL database), the worklist, the settings'
secrets, the activity log's exported files and how many nodes run (``run/topology.json``), each
one file with its SHA-256 in the snapshot's ``manifest.json``. The stored files themselves go to
``DEST/files/``, shared by every snapshot: Orthanc never changes a stored file once written, so
each backup copies only the files that are not there yet. Every stored file is checked against
the MD5 Orthanc keeps for it in its index, when it is copied and again when it is restored.

Order is what makes the copy consistent while modalities store. Orthanc writes a file, then
commits it to its index, then acknowledges the store: so the index is copied first, and then
exactly the files that copy of the index names. Every study acknowledged before the backup started
is in that index, and all of its files are on disk; files stored while the backup runs are left
for the next one (their index rows are not in this copy either).

An index on PostgreSQL (several archive nodes, see control.archive_index) is dumped by
``pg_dump``, which reads the whole database in one snapshot while the nodes go on writing; the
files to copy are then read from that dump itself (``pg_restore`` of its ``attachedfiles``
table), so they are exactly the ones the restored index will name. Nothing needs to stand still.

Orthanc 1.10.1 opens its SQLite index (``index`` in the storage folder) in exclusive locking mode,
so no other process can read it while Orthanc runs, not even through SQLite's backup API. The
backup therefore copies the index file while Orthanc runs, then holds Orthanc still (SIGSTOP) for
as long as it takes to copy what changed since (its write-ahead log, usually a few megabytes) and
lets it go on (SIGCONT). Files taken while the process stands still are what a power cut at that
instant would leave, which SQLite recovers from by design: the copy is opened and checked by
SQLite, then written out as a plain database. Modalities' stores wait meanwhile; they do not fail.
A watchdog started beside the backup wakes Orthanc even if the backup itself is killed.

``./pacs restore SRC`` checks every part and every stored file while it copies them into a
folder beside the target, and moves that folder into place only when everything matched: a
damaged backup is refused with the damaged part named, and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

from control import __version__, archive_index, db
from control.activity import exports_folder as activity_exports
from control.runtime import configs
from control.site import Site

# Format 2 says where the archive's index is ("archive_index"); format 1 had it in SQLite always.
FORMAT = 2
# A part a backup may lack: one made before it was backed up, or of a portal never started.
TOPOLOGY_PART = "topology.json"
READABLE_FORMATS = (1, 2)
CHUNK = 1024 * 1024
# Orthanc is held still for at most this long; the watchdog wakes it after that whatever happens.
FREEZE_LIMIT = 120
# The index file copied while Orthanc runs is trusted only if nothing wrote to it for this long
# before the copy began: file times are coarse, and a write within the same tick would not show.
QUIET_BEFORE_COPY = 1.0
INDEX = "index"
SQLITE_INDEX_PART = "orthanc-index.sqlite3"
POSTGRESQL_INDEX_PART = "orthanc-index.pgdump"


class BackupError(RuntimeError):
    """A backup that could not be made, or a backup that cannot be restored; says which part."""


@dataclass(frozen=True)
class Part:
    """One file of a snapshot, as its manifest lists it."""

    name: str  # what the admin reads: "control database", "archive index", ...
    file: str
    sha256: str
    bytes: int


# ---- helpers ----


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def copy_checked(source: Path, target: Path) -> tuple[int, str]:
    """Copy ``source`` to ``target`` (through a temporary name); return its size and MD5."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".part")
    digest = hashlib.md5()  # noqa: S324 - Orthanc's own checksum of stored files
    size = 0
    with source.open("rb") as reader, temporary.open("wb") as writer:
        while block := reader.read(CHUNK):
            digest.update(block)
            writer.write(block)
            size += len(block)
        writer.flush()
        os.fsync(writer.fileno())
    temporary.replace(target)
    return size, digest.hexdigest()


def stored_file_path(root: Path, uuid: str) -> Path:
    """Where Orthanc's file storage keeps an attachment: two levels of folders from its uuid."""
    return root / uuid[0:2] / uuid[2:4] / uuid


@dataclass(frozen=True)
class StoredFile:
    uuid: str
    size: int
    md5: str


def stored_files(index: Path) -> Iterator[StoredFile]:
    """Every file an archive index names, with the size and MD5 Orthanc recorded for it.

    ``index`` is a snapshot's part: a copy of Orthanc's SQLite index, or a dump of its PostgreSQL one.
    """
    if index.name == POSTGRESQL_INDEX_PART:
        yield from _dumped_stored_files(index)
        return
    connection = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT uuid, compressedSize, compressedMD5 FROM AttachedFiles")
        for uuid, size, md5 in rows:
            yield StoredFile(uuid, int(size), md5 or "")
    finally:
        connection.close()


def _dumped_stored_files(dump: Path) -> Iterator[StoredFile]:
    """The rows of ``attachedfiles`` (Orthanc's PostgreSQL index plugin) in a custom-format dump.

    ``pg_restore`` writes the table's data as PostgreSQL's COPY text: a header naming the columns,
    one tab-separated line per row, then a line ``\\.``. Read as it comes, never all at once.
    """
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(
            [_pg_tool("pg_restore"), "--data-only", "--table=attachedfiles", "--file=-", str(dump)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        assert process.stdout is not None
        columns: list[str] | None = None
        try:
            for line in process.stdout:
                if columns is None:
                    if line.startswith("COPY ") and "attachedfiles" in line:
                        columns = [name.strip() for name in line.split("(", 1)[1].split(")", 1)[0].split(",")]
                        uuid, size, md5 = (
                            columns.index(name) for name in ("uuid", "compressedsize", "compressedhash")
                        )
                    continue
                if line == "\\.\n":
                    break
                values = line.rstrip("\n").split("\t")
                yield StoredFile(values[uuid], int(values[size]), "" if values[md5] == "\\N" else values[md5])
            process.stdout.read()
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
        if process.returncode or columns is None:
            errors.seek(0)
            told = errors.read().decode(errors="replace").strip() or "it holds no table attachedfiles"
            raise BackupError(f"the archive index ({dump}) cannot be read as Orthanc's index: {told}")


def _private_directory(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def _tar_folder(folder: Path, target: Path) -> None:
    """A tar of ``folder``'s content (empty when the folder does not exist)."""
    with tarfile.open(target, "w") as archive:
        if folder.is_dir():
            for child in sorted(folder.iterdir()):
                if child.name.endswith((".tmp", ".part")):
                    continue
                archive.add(child, arcname=child.name)


def _untar(archive_path: Path, folder: Path) -> None:
    """Unpack a part made by ``_tar_folder``: plain files and folders only, all inside ``folder``.

    (Debian 12's Python 3.11.2 predates tarfile's extraction filters.)
    """
    with tarfile.open(archive_path) as archive:
        for member in archive:
            target = (folder / member.name).resolve()
            if folder.resolve() not in target.parents or not (member.isfile() or member.isdir()):
                raise BackupError(f"{archive_path} holds {member.name!r}, which a backup never does")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None  # a file member has its bytes
            with source, target.open("wb") as written:
                shutil.copyfileobj(source, written, CHUNK)
            target.chmod(member.mode & 0o700 or 0o600)


def _sqlite_copy(source: sqlite3.Connection, target: Path) -> None:
    destination = sqlite3.connect(target)
    try:
        source.backup(destination)
    finally:
        destination.close()


def _pg_environment(url: str) -> dict[str, str]:
    """libpq's variables for a SQLAlchemy URL: the password never goes on a command line."""
    parsed = sa.engine.make_url(url)
    env = {**os.environ}
    for variable, value in (
        ("PGHOST", parsed.host),
        ("PGPORT", parsed.port),
        ("PGUSER", parsed.username),
        ("PGPASSWORD", parsed.password),
        ("PGDATABASE", parsed.database),
    ):
        if value is not None:
            env[variable] = str(value)
    return env


def _pg_tool(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if not found:
        raise BackupError(f"{name} is missing: install the Debian package postgresql-client")
    return str(found)


# ---- the archive's index while Orthanc runs ----


def orthanc_pid(site: Site) -> int | None:
    from control.runtime import files
    from control.runtime.stack import read_pid

    return read_pid(files.pid_file(site, "orthanc"))


@contextlib.contextmanager
def held_still(pid: int) -> Iterator[None]:
    """Orthanc stopped (SIGSTOP) for the block; a watchdog continues it even if we die."""
    watchdog = subprocess.Popen(
        ["/bin/sh", "-c", f"sleep {FREEZE_LIMIT}; kill -CONT {pid}"],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        watchdog.kill()
        watchdog.wait()


def _copy_raw(source: Path, target: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        target.unlink()
    if source.exists():
        shutil.copyfile(source, target)


def copy_archive_index(site: Site, target: Path, work: Path) -> float:
    """A consistent copy of Orthanc's index in ``target``; return how long Orthanc stood still."""
    index = site.orthanc_storage / INDEX
    if not index.exists():
        raise BackupError(f"there is no archive index at {index}: is this a data directory?")
    pid = orthanc_pid(site)
    if pid is None:
        source = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=30)
        try:
            _sqlite_copy(source, target)
        except sqlite3.OperationalError:
            raise BackupError(
                "the archive's index is held by an Orthanc that this runner did not start (another "
                "container?): run the backup where that Orthanc runs, or stop it first"
            ) from None
        finally:
            source.close()
        return 0.0
    work.mkdir(parents=True, exist_ok=True)
    raw, raw_wal = work / INDEX, work / f"{INDEX}-wal"
    wal = index.with_name(f"{INDEX}-wal")
    for _attempt in range(20):
        before = index.stat()
        if time.time() - before.st_mtime >= QUIET_BEFORE_COPY:
            break
        time.sleep(QUIET_BEFORE_COPY)
    _copy_raw(index, raw)
    started = time.monotonic()
    with held_still(pid):
        now = index.stat()
        unchanged = (now.st_size, now.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        if not unchanged or time.time() - before.st_mtime < QUIET_BEFORE_COPY:
            _copy_raw(index, raw)
        _copy_raw(wal, raw_wal)
    stood_still = time.monotonic() - started
    copy = sqlite3.connect(raw)
    try:
        check = copy.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise BackupError(f"the copy of the archive index failed SQLite's check: {check}")
        _sqlite_copy(copy, target)
    finally:
        copy.close()
    shutil.rmtree(work, ignore_errors=True)
    return stood_still


# ---- backup ----


def snapshots(destination: Path) -> list[Path]:
    """The complete snapshots of a backup folder, oldest first."""
    folder = destination / "snapshots"
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if (path / "manifest.json").is_file())


@contextlib.contextmanager
def _locked(destination: Path) -> Iterator[None]:
    with (destination / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(f"another backup into {destination} is running") from None
        yield


def backup(site: Site, destination: Path, *, keep: int = 7, say: Callable[[str], None] = print) -> Path:
    """Make a snapshot of ``site`` in ``destination``; return its folder."""
    destination = destination.resolve()
    if destination == site.data or site.data in destination.parents:
        raise BackupError("the backup must go outside the data directory (best: onto another disk)")
    _private_directory(destination)
    with _locked(destination):
        return _backup(site, destination, keep, say)


def _backup(site: Site, destination: Path, keep: int, say: Callable[[str], None]) -> Path:
    started = db.utcnow()
    name = started.strftime("%Y%m%dT%H%M%SZ")
    incoming = destination / "snapshots" / f".incoming-{name}"
    shutil.rmtree(incoming, ignore_errors=True)
    _private_directory(incoming)
    parts: list[tuple[str, str]] = []

    database = _backup_database(site, incoming)
    parts.append(("control database", database.name))
    say(f"  control database: {database.stat().st_size / 1e6:.1f} MB")

    index_on = archive_index.recorded(site)
    if index_on == archive_index.POSTGRESQL:
        index = incoming / POSTGRESQL_INDEX_PART
        try:
            url = archive_index.database_url(site)
        except archive_index.ArchiveIndexError as error:
            raise BackupError(str(error)) from None
        _pg_dump(url, index, "the archive index")
        say(f"  archive index: {index.stat().st_size / 1e6:.1f} MB (pg_dump of its PostgreSQL database)")
    else:
        index = incoming / SQLITE_INDEX_PART
        stood_still = copy_archive_index(site, index, incoming / ".raw")
        say(
            f"  archive index: {index.stat().st_size / 1e6:.1f} MB "
            f"(the archive stood still {stood_still:.2f} s)"
        )
    parts.append(("archive index", index.name))

    copied, present, copied_bytes, total_bytes = _backup_stored_files(site, index, destination / "files")
    say(
        f"  stored files: {copied + present} ({total_bytes / 1e6:.1f} MB); "
        f"{copied} new ({copied_bytes / 1e6:.1f} MB copied)"
    )

    for part, folder, file_name in (
        ("worklist", site.worklists, "worklists.tar"),
        ("secrets", site.secrets_dir, "secrets.tar"),
        ("activity exports", activity_exports(site), "activity-exports.tar"),
    ):
        _tar_folder(folder, incoming / file_name)
        parts.append((part, file_name))
    # How many archive nodes and control planes run (run/topology.json): a restored site starts
    # as many again. A portal that was never started has none: it starts with one.
    topology = site.run / configs.RUNNING_TOPOLOGY
    if topology.is_file():
        shutil.copyfile(topology, incoming / TOPOLOGY_PART)
        parts.append(("topology", TOPOLOGY_PART))

    manifest = {
        "format": FORMAT,
        "made_at": started.isoformat(timespec="seconds") + "Z",
        "portal_version": __version__,
        "source": str(site.data),
        "database": "sqlite" if database.suffix == ".sqlite3" else "postgresql",
        "archive_index": index_on,
        "stored_files": {"count": copied + present, "bytes": total_bytes},
        "parts": [
            Part(part, file, sha256_of(incoming / file), (incoming / file).stat().st_size).__dict__
            for part, file in parts
        ],
    }
    for path in incoming.iterdir():
        path.chmod(0o600)
    (incoming / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    finished = incoming.with_name(name)
    incoming.replace(finished)
    _prune(destination, keep, say)
    return finished


def _backup_database(site: Site, folder: Path) -> Path:
    url = site.database_url
    if url.startswith("sqlite"):
        target = folder / "control.sqlite3"
        database = sa.engine.make_url(url).database
        if not database:
            raise BackupError(
                "the control plane's database is in memory (PACS_DATABASE_URL): nothing to back up"
            )
        source = sqlite3.connect(database, timeout=30)
        try:
            _sqlite_copy(source, target)
        finally:
            source.close()
        return target
    target = folder / "control.pgdump"
    _pg_dump(url, target, "the control database")
    return target


def _pg_dump(url: str, target: Path, part: str) -> None:
    """``pg_dump`` of the database ``url`` names: one snapshot of it, however busy it is."""
    done = subprocess.run(
        [_pg_tool("pg_dump"), "--format=custom", "--no-owner", f"--file={target}"],
        env=_pg_environment(url),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise BackupError(f"pg_dump of {part} failed: {done.stderr.strip()}")


def _backup_stored_files(site: Site, index: Path, files: Path) -> tuple[int, int, int, int]:
    """Copy the files ``index`` names that ``files`` lacks; (copied, present, bytes copied, bytes)."""
    copied = present = copied_bytes = total_bytes = 0
    vanished: list[str] = []
    damaged: list[str] = []
    for stored in stored_files(index):
        total_bytes += stored.size
        target = stored_file_path(files, stored.uuid)
        with contextlib.suppress(FileNotFoundError):
            if target.stat().st_size == stored.size:
                present += 1
                continue
        source = stored_file_path(site.orthanc_storage, stored.uuid)
        try:
            size, md5 = copy_checked(source, target)
        except FileNotFoundError:
            vanished.append(stored.uuid)
            continue
        if size != stored.size or (stored.md5 and md5 != stored.md5):
            target.unlink()
            damaged.append(stored.uuid)
            continue
        copied += 1
        copied_bytes += size
    if damaged:
        raise BackupError(
            f"{len(damaged)} stored files of the archive do not match the checksum Orthanc recorded "
            f"for them (a failing disk?), e.g. {stored_file_path(site.orthanc_storage, damaged[0])}"
        )
    if vanished:
        raise BackupError(
            f"{len(vanished)} stored files were deleted while the backup ran (studies deleted "
            "meanwhile); run the backup again (what it copied is kept)"
        )
    return copied, present, copied_bytes, total_bytes


def _prune(destination: Path, keep: int, say: Callable[[str], None]) -> None:
    """Keep the newest ``keep`` snapshots, and the stored files they name."""
    complete = snapshots(destination)
    for old in complete[:-keep]:
        shutil.rmtree(old)
    for leftover in (destination / "snapshots").glob(".incoming-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    wanted: set[str] = set()
    for folder in snapshots(destination):
        index = find_snapshot(folder).part("archive index")
        wanted.update(stored.uuid for stored in stored_files(index))
    removed = 0
    for path in (destination / "files").glob("*/*/*"):
        if path.name not in wanted:
            path.unlink()
            removed += 1
    if removed:
        say(f"  {removed} stored files no snapshot needs any more were removed from the backup")


# ---- restore ----


@dataclass(frozen=True)
class Snapshot:
    folder: Path
    files: Path
    manifest: dict[str, Any]

    def part(self, name: str) -> Path:
        return self.folder / next(part["file"] for part in self.manifest["parts"] if part["name"] == name)


def find_snapshot(source: Path) -> Snapshot:
    """The snapshot ``source`` names: a snapshot folder, or a backup folder (its newest)."""
    source = source.resolve()
    if (source / "manifest.json").is_file():
        folder, files = source, source.parent.parent / "files"
    else:
        found = snapshots(source)
        if not found:
            raise BackupError(f"{source} holds no backup (no snapshots/*/manifest.json)")
        folder, files = found[-1], source / "files"
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["parts"]
    except (ValueError, KeyError, TypeError):
        raise BackupError(f"the backup's manifest ({folder / 'manifest.json'}) is damaged") from None
    if manifest.get("format") not in READABLE_FORMATS:
        raise BackupError(
            f"this backup has format {manifest.get('format')!r}; this portal reads "
            + " and ".join(map(str, READABLE_FORMATS))
        )
    manifest.setdefault("archive_index", archive_index.SQLITE)
    return Snapshot(folder, files, manifest)


def check_parts(snapshot: Snapshot) -> None:
    """Every part is there with the checksum its manifest gives, or the damaged part is named."""
    for part in snapshot.manifest["parts"]:
        path = snapshot.folder / part["file"]
        if not path.is_file():
            raise BackupError(f"the backup's {part['name']} ({path}) is missing")
        if sha256_of(path) != part["sha256"]:
            raise BackupError(
                f"the backup's {part['name']} ({path}) is damaged: its checksum does not match the manifest"
            )


def _check_stored_file(snapshot: Snapshot, stored: StoredFile, copy_to: Path | None) -> int:
    source = stored_file_path(snapshot.files, stored.uuid)
    try:
        if copy_to is None:
            size, md5 = _md5_of(source)
        else:
            size, md5 = copy_checked(source, stored_file_path(copy_to, stored.uuid))
    except FileNotFoundError:
        raise BackupError(f"the backup's stored files: {source} is missing") from None
    if size != stored.size or (stored.md5 and md5 != stored.md5):
        raise BackupError(
            f"the backup's stored files: {source} is damaged (its checksum does not match the archive index)"
        )
    return size


def _md5_of(path: Path) -> tuple[int, str]:
    digest = hashlib.md5()  # noqa: S324 - Orthanc's own checksum of stored files
    size = 0
    with path.open("rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def check(source: Path, say: Callable[[str], None] = print) -> Snapshot:
    """Read every part and stored file of a backup and check them; raise BackupError if damaged."""
    snapshot = find_snapshot(source)
    check_parts(snapshot)
    count = total = 0
    for stored in stored_files(snapshot.part("archive index")):
        total += _check_stored_file(snapshot, stored, None)
        count += 1
    say(
        f"backup {snapshot.folder.name}: every part and all {count} stored files "
        f"({total / 1e6:.1f} MB) are intact"
    )
    return snapshot


def _refuse_unless_empty(site: Site) -> None:
    from control.runtime.stack import leftover_processes, running_supervisor

    if running_supervisor(site) or any(True for _ in leftover_processes(site)):
        raise BackupError(
            f"the portal of {site.data} is running: restore only into an empty (or new) data directory"
        )
    if site.data.exists() and any(site.data.iterdir()):
        raise BackupError(
            f"{site.data} is not empty: restore only into an empty (or new) data directory, "
            "so that nothing there is overwritten"
        )


def restore(source: Path, site: Site, say: Callable[[str], None] = print) -> Snapshot:
    """Restore the backup at ``source`` into the empty data directory of ``site``."""
    _refuse_unless_empty(site)
    snapshot = find_snapshot(source)
    made_with = snapshot.manifest.get("database")
    wanted = "sqlite" if site.database_url.startswith("sqlite") else "postgresql"
    index_on_postgresql = snapshot.manifest["archive_index"] == archive_index.POSTGRESQL
    if made_with != wanted:
        raise BackupError(
            f"this backup's database is {made_with}, and this installation's is {wanted}: "
            + (
                "set PACS_DATABASE_URL to an empty PostgreSQL database"
                + (
                    " (and the archive's index goes into the database of that name followed by "
                    "_archive on the same server, which must be empty too, unless "
                    "PACS_ARCHIVE_DATABASE_URL names another)"
                    if index_on_postgresql
                    else ""
                )
                if made_with == "postgresql"
                else "unset PACS_DATABASE_URL to restore into SQLite"
            )
        )
    index_url = _archive_database_url_to_restore(site) if index_on_postgresql else None
    check_parts(snapshot)
    if made_with == "postgresql":
        _refuse_unless_empty_database(site.database_url, "the database PACS_DATABASE_URL names")
    # A database the restore creates is dropped again if the restore fails: a refused restore
    # leaves nothing of its own behind.
    created = index_url is not None and _ensure_empty_archive_database(index_url)
    staging = site.data.with_name(f".{site.data.name}.restoring")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _restore_into(snapshot, site, staging, index_url, say, index_created=created)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and index_url is not None:
            _drop_created_database(index_url, say)
        raise
    if site.data.exists():
        site.data.rmdir()
    staging.replace(site.data)
    site.make_directories()
    return snapshot


def _archive_database_url_to_restore(site: Site) -> str:
    """The PostgreSQL database the archive's index is restored into; BackupError, saying what to
    set, if none is named."""
    try:
        url = archive_index.database_url(site)
    except archive_index.ArchiveIndexError:
        raise BackupError(
            "this backup's archive index is on PostgreSQL: set PACS_ARCHIVE_DATABASE_URL to an empty "
            "PostgreSQL database for it (or restore with the control plane's database on PostgreSQL, "
            "PACS_DATABASE_URL, whose server then holds the index in a database of that name followed "
            "by _archive)"
        ) from None
    chosen, control = sa.engine.make_url(url), sa.engine.make_url(site.database_url)
    if (chosen.host, chosen.port, chosen.database) == (control.host, control.port, control.database):
        raise BackupError(
            "PACS_ARCHIVE_DATABASE_URL names the control plane's own database: the archive's index "
            "needs a database of its own"
        )
    return url


def _ensure_empty_archive_database(url: str) -> bool:
    """The archive's database created if missing (as ``./pacs up`` does; True: it was);
    BackupError if it holds anything."""
    try:
        created = archive_index.ensure_database(url)
    except archive_index.ArchiveIndexError as error:
        raise BackupError(str(error)) from None
    _refuse_unless_empty_database(url, _archive_database_named(url))
    return created


def _drop_created_database(url: str, say: Callable[[str], None]) -> None:
    try:
        archive_index.drop_database(url)
    except psycopg.Error as error:
        # The restore's own error is the one to read; this one only says what is left behind.
        say(
            f"  {_archive_database_named(url)}, created by this restore, could not be dropped "
            f"({str(error).strip().splitlines()[0]}): drop it before restoring again"
        )


def _archive_database_named(url: str) -> str:
    """The archive's database as the admin named it (never with its password)."""
    if os.environ.get("PACS_ARCHIVE_DATABASE_URL"):
        return "the database PACS_ARCHIVE_DATABASE_URL names"
    name = sa.engine.make_url(url).database
    return f"the archive's database {name!r} (beside the one PACS_DATABASE_URL names)"


def _refuse_unless_empty_database(url: str, named: str) -> None:
    libpq = configs.libpq_url(sa.engine.make_url(url))
    try:
        with psycopg.connect(libpq, connect_timeout=10) as connection:
            counted = connection.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            ).fetchone()
            tables = counted[0] if counted else 0
    except psycopg.Error as error:
        raise BackupError(f"{named} does not answer: {str(error).strip().splitlines()[0]}") from None
    if tables:
        raise BackupError(f"{named} is not empty: restore into an empty one")


def _restore_into(
    snapshot: Snapshot,
    site: Site,
    staging: Path,
    index_url: str | None,
    say: Callable[[str], None],
    index_created: bool = False,
) -> None:
    staging.mkdir(parents=True)
    storage = staging / site.orthanc_storage.relative_to(site.data)
    count = total = 0
    index = snapshot.part("archive index")
    for stored in stored_files(index):
        total += _check_stored_file(snapshot, stored, storage)
        count += 1
    storage.mkdir(parents=True, exist_ok=True)
    if index_url is None:
        shutil.copyfile(index, storage / INDEX)
    say(f"  stored files: {count} ({total / 1e6:.1f} MB), each matching the archive index")
    for part, folder, private in (
        ("worklist", site.worklists, False),
        ("secrets", site.secrets_dir, True),
        ("activity exports", activity_exports(site), True),
    ):
        target = staging / folder.relative_to(site.data)
        (_private_directory if private else lambda path: path.mkdir(parents=True, exist_ok=True))(target)
        _untar(snapshot.part(part), target)
    if any(part["name"] == "topology" for part in snapshot.manifest["parts"]):
        run = staging / site.run.relative_to(site.data)
        _private_directory(run)
        shutil.copyfile(snapshot.part("topology"), run / configs.RUNNING_TOPOLOGY)
        (run / configs.RUNNING_TOPOLOGY).chmod(0o600)
    # Each database is restored in one transaction: one that fails is left empty.
    if index_url is not None:
        _pg_restore(index_url, index, "the archive index")
        say("  archive index restored into its PostgreSQL database")
    if snapshot.manifest["database"] == "sqlite":
        target = staging / "control.sqlite3"
        shutil.copyfile(snapshot.part("control database"), target)
        target.chmod(0o600)
    else:
        try:
            _pg_restore(site.database_url, snapshot.part("control database"), "the control database")
        except BackupError as error:
            if index_url is None or index_created:
                raise
            raise BackupError(
                f"{error}. {_archive_database_named(index_url)} holds the restored index now: "
                "drop it and create it again (empty) before restoring again"
            ) from None
    say("  control database, worklist, secrets and activity exports restored")


def _pg_restore(url: str, dump: Path, part: str) -> None:
    done = subprocess.run(
        [
            _pg_tool("pg_restore"),
            "--no-owner",
            "--exit-on-error",
            "--single-transaction",
            f"--dbname={sa.engine.make_url(url).database}",
            str(dump),
        ],
        env=_pg_environment(url),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise BackupError(f"pg_restore of {part} failed: {done.stderr.strip()}")
