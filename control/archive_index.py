"""Where the archive's index lives: Orthanc's own SQLite file (the default), or PostgreSQL.

A single-node portal keeps Orthanc's index in the storage folder (``orthanc/index``). Several
archive nodes need one index they all write to: Orthanc's PostgreSQL index plugin, in a database
of its own on the control plane's PostgreSQL server (``configs.archive_database_url``). Once an
installation's archive is on PostgreSQL, the control plane's database says so (``archive_state``
row ``index``), and every later start, whatever its number of nodes, uses it: an archive is never
left behind for an empty one.

An installation whose SQLite index holds studies is moved with ``./pacs archive
move-to-postgresql`` (``control.archive_move``); a new one starts on PostgreSQL directly.
"""

from __future__ import annotations

import os
import sqlite3

import psycopg
import sqlalchemy as sa
from psycopg import sql

from control import db
from control.runtime import configs
from control.site import Site

SQLITE = "sqlite"
POSTGRESQL = "postgresql"


class ArchiveIndexError(RuntimeError):
    """The archive's index cannot be where it is asked to be; the message says what to do."""


def recorded(site: Site) -> str:
    """Where the control plane's database says the archive's index is."""
    with site.engine.connect() as connection:
        return db.get_archive_state(connection, "index") or SQLITE


def record(site: Site, where: str) -> None:
    with site.engine.begin() as connection:
        db.put_archive_state(connection, "index", where)


def sqlite_instances(site: Site) -> int:
    """How many instances Orthanc's SQLite index holds (0 when there is none)."""
    index = site.orthanc_storage / "index"
    if not index.exists():
        return 0
    try:
        connection = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0
    try:
        # Orthanc's resource types: 1 patient, 2 study, 3 series, 4 instance.
        return connection.execute("SELECT COUNT(*) FROM Resources WHERE resourceType = 4").fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        connection.close()


def choose(site: Site, nodes: int) -> str:
    """Where the archive's index is for a start with ``nodes`` archive nodes (recorded if new).

    PostgreSQL when it is there already, when several nodes run, or when
    ``PACS_ARCHIVE_DATABASE_URL`` names a database for it; else SQLite.
    """
    where = recorded(site)
    if where == SQLITE and nodes == 1 and not os.environ.get("PACS_ARCHIVE_DATABASE_URL"):
        return SQLITE
    try:
        url = configs.archive_database_url(site)
    except ValueError as error:
        raise ArchiveIndexError(f"{nodes} archive nodes: {error}") from None
    if where == SQLITE:
        held = sqlite_instances(site)
        if held:
            raise ArchiveIndexError(
                f"this installation's archive holds {held} instances in its SQLite index "
                f"({site.orthanc_storage / 'index'}). Move them to PostgreSQL first (the portal stopped): "
                "./pacs archive move-to-postgresql"
            )
    ensure_database(url)
    if where == SQLITE:
        record(site, POSTGRESQL)
    return POSTGRESQL


def database_url(site: Site) -> str:
    """The archive's PostgreSQL database (``configs.archive_database_url``); ArchiveIndexError,
    saying what to set, when the installation names no PostgreSQL server."""
    try:
        return configs.archive_database_url(site)
    except ValueError as error:
        raise ArchiveIndexError(str(error)) from None


def ensure_database(url: str) -> bool:
    """Create the archive's PostgreSQL database if it is missing (True: it was); ArchiveIndexError
    if it cannot be."""
    wanted = sa.engine.make_url(url)
    try:
        psycopg.connect(url, connect_timeout=10).close()
        return False
    except psycopg.OperationalError as error:
        if "does not exist" not in str(error):
            raise ArchiveIndexError(f"the archive's database does not answer: {_first_line(error)}") from None
    if not wanted.database:
        raise ArchiveIndexError("the archive's database URL names no database to create")
    server = configs.libpq_url(wanted.set(database="postgres"))
    try:
        with psycopg.connect(server, connect_timeout=10, autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(wanted.database)))
    except psycopg.Error as error:
        raise ArchiveIndexError(
            f"the archive's database {wanted.database!r} does not exist and could not be created "
            f"({_first_line(error)}). Create it, owned by {wanted.username!r}: "
            f"sudo -u postgres createdb -O {wanted.username} {wanted.database}"
        ) from None
    return True


def drop_database(url: str) -> None:
    """Drop the archive's database that ``ensure_database`` created for work that then failed."""
    wanted = sa.engine.make_url(url)
    if not wanted.database:
        return  # ensure_database creates none without a name
    server = configs.libpq_url(wanted.set(database="postgres"))
    with psycopg.connect(server, connect_timeout=10, autocommit=True) as connection:
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(wanted.database)))


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
