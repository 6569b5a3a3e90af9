"""The control plane's store: accounts, sessions, settings and the activity log.

One module owns the database. Tables are declared here with SQLAlchemy Core, queries elsewhere are
plain Core expressions a reader can see, and the schema is created and changed only by the numbered
Alembic migrations in ``control/migrations/versions``. The same code runs on SQLite (a file in the
data directory, the default) and on PostgreSQL (``PACS_DATABASE_URL=postgresql+psycopg://...``),
which several portal instances can share: nothing else about an instance is stateful.

Times are stored as naive UTC ``datetime`` values on both back-ends.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

metadata = sa.MetaData()

settings = sa.Table(
    "settings",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(64), nullable=False),
    # Usernames are unique whatever their case: the key is the case-folded name.
    sa.Column("username_key", sa.String(64), nullable=False, unique=True),
    sa.Column("real_name", sa.String(200), nullable=False, server_default=""),
    sa.Column("phone", sa.String(100), nullable=False, server_default=""),
    sa.Column("email", sa.String(200), nullable=False, server_default=""),
    sa.Column("notes", sa.Text, nullable=False, server_default=""),
    sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("can_upload", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("password_hash", sa.String(200), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("last_login_at", sa.DateTime),
    # What is wrong with the password by the site's rules, as found when it was last typed (a
    # sign-in or a change): "" when nothing, NULL when not checked since the rules came in.
    sa.Column("password_problem", sa.String(200)),
    # The log keeps a deleted user's history under their id: an id must never be given out again.
    sqlite_autoincrement=True,
)

web_sessions = sa.Table(
    "web_sessions",
    metadata,
    # Only a hash of the session id is stored: a copy of the database does not sign anyone in.
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("last_seen_at", sa.DateTime, nullable=False),
    sa.Column("ended_at", sa.DateTime),
    sa.Column("client_address", sa.String(64), nullable=False, server_default=""),
    sa.Index("ix_web_sessions_user_id", "user_id"),
)

activity = sa.Table(
    "activity",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("action", sa.String(40), nullable=False),
    sa.Column("outcome", sa.String(20), nullable=False),
    # Who: a user (kept by id and by the name they had then, so deleting a user keeps their
    # history), or a study token's public id for patients. Never a token itself.
    sa.Column("user_id", sa.Integer),
    sa.Column("username", sa.String(64), nullable=False, server_default=""),
    sa.Column("token_id", sa.String(32), nullable=False, server_default=""),
    sa.Column("client_address", sa.String(64), nullable=False, server_default=""),
    sa.Column("user_agent", sa.String(300), nullable=False, server_default=""),
    sa.Column("patient", sa.String(200), nullable=False, server_default=""),
    sa.Column("study", sa.String(100), nullable=False, server_default=""),
    sa.Column("detail", sa.Text, nullable=False, server_default="{}"),
    # The patient's ID when the event is about one patient (migration 0009); ``patient`` is the
    # name as shown, with the ID.
    sa.Column("patient_id", sa.String(64), nullable=False, server_default=""),
    # The indexes (and why) are those of migrations 0004, 0006 and 0009.
    sa.Index("ix_activity_at", "at"),
    sa.Index("ix_activity_user_id_at", "user_id", "at"),
    sa.Index("ix_activity_list_at", "token_id", "outcome", "at"),
    sa.Index("ix_activity_client_address_list_at", "client_address", "token_id", "outcome", "at"),
    sa.Index("ix_activity_action_list_at", "action", "token_id", "outcome", "at"),
    sa.Index("ix_activity_patient_id_list_at", "patient_id", "token_id", "outcome", "at"),
    sa.Index("ix_activity_study_list_at", "study", "token_id", "outcome", "at"),
)

sign_in_failures = sa.Table(
    "sign_in_failures",
    metadata,
    # One wrong password (or unknown name), counted by the key sign-in matches accounts with
    # (``accounts.username_key``): the activity log keeps the name as it was typed.
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("account_key", sa.String(64), nullable=False),
    sa.Column("client_address", sa.String(64), nullable=False),
    sa.Index("ix_sign_in_failures_account_key_at", "account_key", "at"),
    sa.Index("ix_sign_in_failures_client_address_at", "client_address", "at"),
)


def utcnow() -> dt.datetime:
    """The current time as the store keeps it: naive UTC."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def default_url(data_dir: Path) -> str:
    """The SQLite database of an installation that has not been pointed at PostgreSQL."""
    return f"sqlite:///{data_dir / 'control.sqlite3'}"


class _ClosingSQLiteConnection(sqlite3.Connection):
    """A SQLite connection that closes itself when the garbage collector takes it.

    An engine dropped without ``dispose()`` (a shell command's, a test's look at a data directory)
    leaves its pooled connections to the collector, and Python 3.13 (Debian 13's) reports each as
    ``ResourceWarning: unclosed database``. SQLAlchemy warns by itself about a connection that was
    never given back to its pool, the leak that matters; an idle pooled one is closed here.
    """

    def __del__(self) -> None:
        self.close()


def make_engine(url: str) -> sa.Engine:
    """An engine for ``url``, with the SQLite settings that make one file safe for many workers."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "factory": _ClosingSQLiteConnection})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


class MigrationError(RuntimeError):
    """The database could not be brought to the newest schema; it was left as it was."""


def migrate(engine: sa.Engine) -> None:
    """Bring the schema to the newest migration. Safe to run on every start.

    An upgrade that fails leaves the database as it was. PostgreSQL runs the whole upgrade in one
    transaction. SQLite's Python driver commits schema changes as they go, so an existing SQLite
    database is first copied (SQLite's backup API) and, should a migration fail, copied back.
    """
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    head = ScriptDirectory.from_config(config).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current == head:
        return
    saved = _copy_before_upgrade(engine, current)
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except Exception as error:
        engine.dispose()
        if saved:
            database, copy = saved
            _copy_sqlite(copy, database)
            copy.unlink()
        raise MigrationError(
            f"the database could not be upgraded from schema {current} to {head}, and was left as it "
            f"was (nothing is lost; the previous version of the portal still runs on it): {error}"
        ) from error
    if saved:
        saved[1].unlink()


def _copy_before_upgrade(engine: sa.Engine, current: str | None) -> tuple[Path, Path] | None:
    """The SQLite database file and a copy of it made before an upgrade (None for PostgreSQL, for a
    database that has no schema yet, and for one in memory)."""
    if engine.dialect.name != "sqlite" or current is None or not engine.url.database:
        return None
    database = Path(engine.url.database)
    copy = database.with_name(f"{database.name}.before-upgrade-{current}")
    _copy_sqlite(database, copy)
    return database, copy


def _copy_sqlite(source: Path, target: Path) -> None:
    """The whole of one SQLite database into another, through SQLite's backup API."""
    reader, writer = sqlite3.connect(source, timeout=30), sqlite3.connect(target, timeout=30)
    try:
        reader.backup(writer)
    finally:
        reader.close()
        writer.close()


revisions = sa.Table(
    "revisions",
    metadata,
    # A counter per kind of shared state, raised by every change to it: an instance that cached
    # the state reads one number per request to know whether its copy still holds.
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
)

_SETTINGS_REVISION = sa.select(revisions.c.value).where(revisions.c.name == "settings")


def settings_revision(connection: sa.Connection) -> int:
    """The settings' revision: it changes whenever a setting does."""
    return connection.execute(_SETTINGS_REVISION).scalar_one()


def _settings_changed(connection: sa.Connection) -> None:
    connection.execute(
        revisions.update().where(revisions.c.name == "settings").values(value=revisions.c.value + 1)
    )


def get_settings(connection: sa.Connection) -> dict[str, Any]:
    """All stored settings as a name -> value mapping."""
    rows = connection.execute(sa.select(settings.c.name, settings.c.value))
    return {name: json.loads(value) for name, value in rows}


def put_settings(connection: sa.Connection, values: dict[str, Any]) -> None:
    """Store (insert or replace) the given settings."""
    now = utcnow()
    stored = get_settings(connection)
    for name, value in values.items():
        encoded = json.dumps(value)
        if name in stored:
            connection.execute(
                settings.update().where(settings.c.name == name).values(value=encoded, updated_at=now)
            )
        else:
            connection.execute(settings.insert().values(name=name, value=encoded, updated_at=now))
    _settings_changed(connection)


def delete_settings(connection: sa.Connection, names: list[str]) -> None:
    """Remove stored settings, so that they fall back to their defaults."""
    connection.execute(settings.delete().where(settings.c.name.in_(names)))
    _settings_changed(connection)


study_tokens = sa.Table(
    "study_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # What the activity log and the admin pages show for a token: never the token itself.
    sa.Column("public_id", sa.String(16), nullable=False, unique=True),
    sa.Column("study_uid", sa.String(64), nullable=False),
    sa.Column("orthanc_study_id", sa.String(64), nullable=False),
    # The token is derived from the token key and (study, generation); revoking moves to the next
    # generation. The database keeps only a SHA-256 of the token, to find it.
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("lookup_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("patient_name", sa.String(200), nullable=False, server_default=""),
    sa.Column("patient_id", sa.String(100), nullable=False, server_default=""),
    sa.Column("patient_birth_date", sa.String(8), nullable=False, server_default=""),
    sa.Column("study_date", sa.Date, nullable=False),
    sa.Column("issued_at", sa.DateTime, nullable=False),
    sa.Column("extended_until", sa.Date),
    sa.Column("revoked_at", sa.DateTime),
    sa.Column("uses", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_used_at", sa.DateTime),
    sa.Column("last_used_from", sa.String(64), nullable=False, server_default=""),
    sa.Column("identity_failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("identity_locked_until", sa.DateTime),
    # Locks in a row since the last right answer: each one is longer, and past the last the link
    # is held (``identity_held_at``) until an admin releases it.
    sa.Column("identity_locks", sa.Integer, nullable=False, server_default="0"),
    sa.Column("identity_held_at", sa.DateTime),
    sa.UniqueConstraint("study_uid", "generation", name="uq_study_tokens_study_generation"),
    sa.Index("ix_study_tokens_patient_id", "patient_id"),
    # A link names one study of one patient: it is found by the archive's id of that study.
    sa.Index("ix_study_tokens_orthanc_study_id", "orthanc_study_id"),
    sqlite_autoincrement=True,
)

shared_study_uids = sa.Table(
    "shared_study_uids",
    metadata,
    # Study Instance UIDs found held by several patients' studies, for the admin (control.tokens.shared).
    sa.Column("study_uid", sa.String(64), primary_key=True),
    sa.Column("flagged_at", sa.DateTime, nullable=False),
    sa.Column("studies", sa.Text, nullable=False, server_default="[]"),
)

viewer_tokens = sa.Table(
    "viewer_tokens",
    metadata,
    # Bearer tokens for DICOMweb clients that have no browser cookie: the desktop viewer launched
    # from a row (minutes), or another viewer a physician hands a study to (days). Each reads
    # exactly its studies (and series, when scoped to one) through the DICOMweb gate.
    sa.Column("id", sa.Integer, primary_key=True),
    # What the activity log and the admin pages show for a token: never the token itself, of which
    # the database keeps only a SHA-256.
    sa.Column("public_id", sa.String(32), nullable=False, unique=True),
    sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("scope", sa.String(16), nullable=False),
    sa.Column("study_uids", sa.Text, nullable=False),  # a JSON list
    sa.Column("orthanc_study_ids", sa.Text, nullable=False),  # the archive's ids of those studies, likewise
    sa.Column("series_uid", sa.String(64), nullable=False, server_default=""),
    sa.Column("patient_name", sa.String(200), nullable=False, server_default=""),
    sa.Column("patient_id", sa.String(100), nullable=False, server_default=""),
    # Who answers for it: a user account (which must stay active), or a patient's study link
    # (which must stay valid). No foreign keys: the rows outlive a deleted account or link.
    sa.Column("issued_by_user_id", sa.Integer),
    sa.Column("issued_by", sa.String(64), nullable=False, server_default=""),
    sa.Column("study_token_id", sa.Integer),
    sa.Column("note", sa.String(200), nullable=False, server_default=""),
    sa.Column("issued_at", sa.DateTime, nullable=False),
    sa.Column("issued_from", sa.String(64), nullable=False, server_default=""),
    sa.Column("expires_at", sa.DateTime, nullable=False),
    sa.Column("revoked_at", sa.DateTime),
    sa.Column("revoked_by", sa.String(64), nullable=False, server_default=""),
    sa.Column("uses", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_used_at", sa.DateTime),
    sa.Column("last_used_from", sa.String(64), nullable=False, server_default=""),
    sa.Index("ix_viewer_tokens_issued_at", "issued_at"),
    sa.Index("ix_viewer_tokens_patient_id", "patient_id"),
    sqlite_autoincrement=True,
)

archive_state = sa.Table(
    "archive_state",
    metadata,
    # What the control planes know of the archive, shared by all of them: where its index is
    # (``index``: "postgresql" once moved there) and how far the archive watcher has read
    # (``watch``: JSON, committed with the events it recorded, see control.watch).
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


def get_archive_state(connection: sa.Connection, name: str) -> str | None:
    return connection.execute(
        sa.select(archive_state.c.value).where(archive_state.c.name == name)
    ).scalar_one_or_none()


def put_archive_state(connection: sa.Connection, name: str, value: str) -> None:
    updated = connection.execute(
        archive_state.update().where(archive_state.c.name == name).values(value=value)
    )
    if updated.rowcount == 0:
        connection.execute(archive_state.insert().values(name=name, value=value))
