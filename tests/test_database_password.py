"""A database password with any character: given apart from the URL, it reaches libpq whole.

compose.nodes.yaml hands the site's ``PACS_DATABASE_PASSWORD`` to the control planes apart from
``PACS_DATABASE_URL``; the control plane's own connections (SQLAlchemy) and the archive's index
(Orthanc's plugin and psycopg, which take libpq's URLs) must both get it exactly. libpq's own
parser (``psycopg.conninfo.conninfo_to_dict``) reads the URLs here; tests/test_compose_nodes.py
runs the stack with such a password.
"""

from __future__ import annotations

from pathlib import Path

import psycopg.conninfo
import pytest
import sqlalchemy as sa

from control.runtime import configs
from control.site import Site

pytestmark = pytest.mark.inprocess

PASSWORDS = ("a long one", "nodes' pass: a/b@c?d#e %20 f", "ünïcode+plus=equals&and")


@pytest.mark.parametrize("password", PASSWORDS)
def test_the_password_apart_from_the_url_reaches_both_databases(
    password: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACS_DATABASE_URL", "postgresql+psycopg://pacs@db.example:5433/pacs")
    monkeypatch.setenv("PACS_DATABASE_PASSWORD", password)
    monkeypatch.delenv("PACS_ARCHIVE_DATABASE_URL", raising=False)
    site = Site(tmp_path)

    control_plane = sa.engine.make_url(site.database_url)
    assert (control_plane.username, control_plane.password) == ("pacs", password)
    assert (control_plane.host, control_plane.port, control_plane.database) == ("db.example", 5433, "pacs")

    archive = psycopg.conninfo.conninfo_to_dict(configs.archive_database_url(site))
    assert archive == {
        "user": "pacs",
        "password": password,
        "host": "db.example",
        "port": "5433",
        "dbname": "pacs_archive",
    }


def test_a_url_without_a_separate_password_is_taken_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACS_DATABASE_URL", "postgresql+psycopg://pacs:pass%20word@db/pacs?sslmode=require")
    monkeypatch.delenv("PACS_DATABASE_PASSWORD", raising=False)
    monkeypatch.delenv("PACS_ARCHIVE_DATABASE_URL", raising=False)
    site = Site(tmp_path)

    assert site.database_url == "postgresql+psycopg://pacs:pass%20word@db/pacs?sslmode=require"
    archive = psycopg.conninfo.conninfo_to_dict(configs.archive_database_url(site))
    assert archive["password"] == "pass word" and archive["sslmode"] == "require"
    assert archive["dbname"] == "pacs_archive"


@pytest.mark.parametrize(
    "url", ["postgresql+psycopg://pacs@db.example:5433", "postgresql+psycopg://pacs@db/"]
)
def test_a_control_database_url_that_names_no_database_gives_no_archive_name(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACS_DATABASE_URL", url)
    monkeypatch.delenv("PACS_ARCHIVE_DATABASE_URL", raising=False)
    with pytest.raises(ValueError, match="PACS_DATABASE_URL names no database") as refused:
        configs.archive_database_url(Site(tmp_path))
    assert "None" not in str(refused.value)
