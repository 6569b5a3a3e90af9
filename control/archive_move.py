"""Moving a single-node archive's index from SQLite to PostgreSQL, with Orthanc's own REST API.

``./pacs archive move-to-postgresql``, with the portal stopped. Orthanc 1.10.1 has no tool that
converts its index; what it has is its REST API, which hands out and takes stored files byte for
byte. So:

1. Two Orthancs of the move's own, on loopback ports of their own, DICOM off: the installation's
   as it is (its SQLite index and storage), and a new one on the PostgreSQL index
   (``configs.archive_database_url``) storing into ``orthanc-moving/`` beside ``orthanc/``.
2. Every instance is read from the first (``GET /instances/{id}/file``) and stored into the second
   (``POST /instances``), a few at a time. Orthanc's ids are hashes of the patient ID and UIDs, the
   same on both, so the study links, tokens and activity that name studies keep naming them.
3. Checked before anything changes: the counts of patients, studies, series and instances, and
   every instance's MD5 as each Orthanc recorded it.
4. Then ``orthanc/`` becomes ``orthanc-sqlite-<time>/`` (the way back; remove it once sure),
   ``orthanc-moving/`` becomes ``orthanc/``, and the control plane's database records that the
   archive's index is on PostgreSQL: every later start uses it. The new index's change log starts
   over, so what follows the old one starts over too: the archive watcher from the new log's end,
   the study catalog with a build from the new archive.

A move that stops midway (Ctrl-C, a full disk) leaves the installation as it was; run it again:
instances moved already are answered ``AlreadyStored``. It needs free space for a second copy of
the stored files, and says so first. What Orthanc keeps about each instance beside its file (when
it was received, and from which AE title) becomes that of the move.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, LiteralString

import psycopg

from control import archive_index, db
from control.catalog import store as catalog_store
from control.orthanc import Orthanc, OrthancError, OrthancUnavailable
from control.runtime import configs, files, stack
from control.settings import SiteSettings
from control.site import Site, write_private

MOVING = "orthanc-moving"
SENDERS = 4
PAGE = 500


class MoveError(RuntimeError):
    """The move cannot start or did not check out; the installation is as it was."""


@dataclass
class Moved:
    instances: int
    studies: int
    megabytes: float
    kept: Path


def move_to_postgresql(site: Site, say: Callable[[str], None] = print) -> Moved:
    """Move the archive of ``site`` (stopped) onto its PostgreSQL index; see the module."""
    if stack.running_supervisor(site) or stack.read_pid(files.pid_file(site, "orthanc")):
        raise MoveError("the portal is running: stop it first (./pacs down, or Ctrl-C), then move")
    if archive_index.recorded(site) == archive_index.POSTGRESQL:
        raise MoveError("this installation's archive index is on PostgreSQL already")
    if not (site.orthanc_storage / "index").exists():
        raise MoveError(f"there is no SQLite index at {site.orthanc_storage / 'index'}: nothing to move")
    try:
        url = configs.archive_database_url(site)
        archive_index.ensure_database(url)
    except (ValueError, archive_index.ArchiveIndexError) as error:
        raise MoveError(str(error)) from None
    moving = site.data / MOVING
    held = _instances_in(url)
    if held and not moving.exists():
        raise MoveError(
            f"the archive's PostgreSQL database already holds {held} instances that no earlier move "
            "left: give the archive a database of its own (PACS_ARCHIVE_DATABASE_URL)"
        )
    settings = site.load_settings()
    moving.mkdir(mode=0o700, exist_ok=True)
    with _orthanc(site, settings, "sqlite", site.orthanc_storage) as old:
        statistics = old.get_json("/statistics")
        needed = int(statistics["TotalDiskSize"]) + settings.disk_reserve_mb * 1024 * 1024
        free = shutil.disk_usage(site.data).free + _size_of(moving)
        if free < needed:
            raise MoveError(
                f"the move needs {needed // 2**20} MB free beside the data (a second copy of the "
                f"stored files and the reserve of {settings.disk_reserve_mb} MB); "
                f"there are {free // 2**20} MB"
            )
        say(
            f"pacs: moving {statistics['CountInstances']} instances ({statistics['TotalDiskSizeMB']} MB) "
            "to the PostgreSQL index"
        )
        with _orthanc(site, settings, archive_index.POSTGRESQL, moving) as new:
            moved = _copy_all(old, new, say)
            _check(old, new, moved)
    kept = site.data / f"orthanc-sqlite-{dt.datetime.now():%Y%m%d-%H%M%S}"
    site.orthanc_storage.rename(kept)
    moving.rename(site.orthanc_storage)
    archive_index.record(site, archive_index.POSTGRESQL)
    _follow_the_new_change_log(site)
    recorded = configs.running_topology(site)
    recorded["archive_index"] = archive_index.POSTGRESQL
    write_private(site.run / configs.RUNNING_TOPOLOGY, json.dumps(recorded, indent=2) + "\n")
    return Moved(len(moved), int(statistics["CountStudies"]), float(statistics["TotalDiskSizeMB"]), kept)


def _follow_the_new_change_log(site: Site) -> None:
    """Forget the positions in the old index's change log, which the new one's numbers do not follow.

    The watcher takes the new log's end at its next round (control.watch); the catalog's feeder
    builds the catalog again, the pages asking the archive meanwhile (control.catalog.feeder).
    """
    with site.engine.begin() as connection:
        state = json.loads(db.get_archive_state(connection, "watch") or "{}")
        state.pop("changes", None)
        db.put_archive_state(connection, "watch", json.dumps(state))
        catalog_store.update_state(connection, build_requested_at=db.utcnow())


def _instances_in(url: str) -> int:
    with psycopg.connect(url, connect_timeout=10) as connection:
        if not _value(connection, "SELECT to_regclass('public.resources') IS NOT NULL"):
            return 0
        # Orthanc's resource types: 4 is an instance.
        return _value(connection, "SELECT COUNT(*) FROM resources WHERE resourcetype = 4")


def _value(connection: psycopg.Connection, query: LiteralString) -> Any:
    """The one value of a query's one row (a count, a test)."""
    [(value,)] = connection.execute(query).fetchall()
    return value


def _size_of(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@contextlib.contextmanager
def _orthanc(site: Site, settings: SiteSettings, index: str, storage: Path) -> Iterator[Orthanc]:
    """An Orthanc of the move's own on ``storage`` and the index ``index``, DICOM off, loopback."""
    topology = replace(
        configs.Topology.from_environment(site), nodes=1, orthanc_hosts=(), archive_index=index
    )
    port = _free_port()
    configuration = json.loads(configs.render_orthanc(site, settings, topology))
    configuration.update(
        {
            "HttpPort": port,
            "RemoteAccessAllowed": False,
            "DicomServerEnabled": False,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            # Only the index plugin (when on PostgreSQL): nothing else is needed to move files.
            "Plugins": [plugin for plugin in configuration["Plugins"] if "PostgreSQL" in plugin],
        }
    )
    name = "move-sqlite" if index == "sqlite" else "move-postgresql"
    path = site.run / f"{name}.json"
    write_private(path, json.dumps(configuration, indent=2) + "\n")
    with (site.logs / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            ["Orthanc", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            umask=site.umask,
        )
    orthanc = Orthanc(
        f"http://127.0.0.1:{port}", site.secrets.orthanc_user, site.secrets.orthanc_password, timeout=120
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                orthanc.system()
                break
            except OrthancUnavailable:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise MoveError(
                        f"the move's Orthanc ({name}) did not start; its log: {site.logs / f'{name}.log'}"
                    ) from None
                time.sleep(0.2)
        yield orthanc
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        path.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _instance_ids(orthanc: Orthanc) -> Iterator[str]:
    since = 0
    while True:
        page = orthanc.get_json("/instances", params={"since": str(since), "limit": str(PAGE)})
        yield from page
        if len(page) < PAGE:
            return
        since += PAGE


def _copy_all(old: Orthanc, new: Orthanc, say: Callable[[str], None]) -> list[str]:
    ids = list(_instance_ids(old))

    def copy(instance_id: str) -> str:
        content = old.instance_file(instance_id)
        answer = new.store_instance(content, len(content))
        if answer.get("ID") != instance_id:
            raise MoveError(f"instance {instance_id} came out as {answer.get('ID')} on the new index")
        return instance_id

    done = []
    with ThreadPoolExecutor(SENDERS) as senders:
        for count, instance_id in enumerate(senders.map(copy, ids), start=1):
            done.append(instance_id)
            if count % 1000 == 0:
                say(f"pacs: {count} of {len(ids)} instances moved")
    return done


def _check(old: Orthanc, new: Orthanc, moved: list[str]) -> None:
    """The same counts and, instance by instance, the same MD5 on both; MoveError if not."""
    counts = ("CountPatients", "CountStudies", "CountSeries", "CountInstances")
    before, after = old.get_json("/statistics"), new.get_json("/statistics")
    different = [name for name in counts if before[name] != after[name]]
    if different:
        raise MoveError(
            "the new index does not hold what the old one does: "
            + ", ".join(f"{name} {before[name]} against {after[name]}" for name in different)
        )

    def same(instance_id: str) -> bool:
        path = f"/instances/{instance_id}/attachments/dicom/md5"
        return old.get_text(path) == new.get_text(path)

    try:
        with ThreadPoolExecutor(SENDERS) as checkers:
            wrong = [
                instance_id
                for instance_id, ok in zip(moved, checkers.map(same, moved), strict=True)
                if not ok
            ]
    except (OrthancError, OrthancUnavailable) as error:
        raise MoveError(f"an instance could not be checked: {error}") from None
    if wrong:
        raise MoveError(f"{len(wrong)} instances differ on the new index, e.g. {wrong[0]}")
