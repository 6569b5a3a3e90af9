"""Where the archive's index lives: the PostgreSQL database made for it (control.archive_index)."""

from __future__ import annotations

import psycopg
import pytest

from control import archive_index

from postgres import PostgresServer, binaries

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(binaries() is None, reason="PostgreSQL is not installed"),
]


def test_the_archive_database_is_made_when_missing(postgres: PostgresServer) -> None:
    url = postgres.url("pacs_archive", driver=False)
    archive_index.ensure_database(url)
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT current_database()").fetchone() == ("pacs_archive",)


def test_an_archive_url_that_names_no_database_is_refused_clearly(postgres: PostgresServer) -> None:
    # A role without a database of its own name: libpq's default database does not exist either.
    with psycopg.connect(postgres.url("postgres", driver=False), autocommit=True) as connection:
        connection.execute("CREATE ROLE radiology LOGIN CREATEDB")
    url = f"postgresql://radiology@127.0.0.1:{postgres.port}"
    with pytest.raises(archive_index.ArchiveIndexError, match="names no database"):
        archive_index.ensure_database(url)
