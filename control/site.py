"""One installation of the portal: its data directory, its secrets and its database.

Everything an installation writes lives under one data directory (``./data`` unless ``--data DIR``
or ``PACS_DATA`` say otherwise)::

    control.sqlite3     accounts, sessions, settings, activity (unless PACS_DATABASE_URL is set)
    orthanc/            the archive's storage and index
    worklists/          modality worklist entries served by Orthanc
    secrets/            generated credentials, readable by the service only
    run/                generated configs, sockets and pid files of the running stack
    logs/               one log per process
    cache/              the OHIF viewer build and other downloads

Two installations with two data directories and different ports run side by side.

Everything in the data directory is readable by the service's user only: the processes of the
stack run with the umask ``Site.umask`` (077), so even the files Orthanc writes are private from
creation. ``PACS_DATA_GROUP`` (a group name or number) lets one group read what is not secret too
(a backup operator, say): folders get that group and its setgid bit, files are group-readable
(umask 027); ``secrets/``, ``run/`` and ``tmp/`` stay the service's alone. An installation made
before, or under another choice, has its files put right at the next start, once
(``.permissions`` records what was applied).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO

import sqlalchemy as sa

from control import db, settings

REPOSITORY = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    """``PACS_DATA`` when set, else ``data/`` beside the program."""
    return Path(os.environ.get("PACS_DATA") or REPOSITORY / "data").resolve()


@dataclass(frozen=True)
class Secrets:
    """Credentials generated once per installation.

    ``orthanc_password`` is known to the control plane and Caddy only; ``session_key`` signs the
    session cookies; ``token_key`` derives study tokens and never goes into the database, so that a
    copy of the database alone does not reveal a working token link. Each may instead come from the
    environment (``PACS_SECRET_SESSION_KEY`` ...) so that several portal instances share them.
    """

    orthanc_user: str
    orthanc_password: str
    session_key: str
    token_key: str


class SiteError(RuntimeError):
    """An installation that cannot be used as it is set up, with a message for the admin."""


def data_group() -> int | None:
    """The group id named by ``PACS_DATA_GROUP`` (a name or a number), or None when unset."""
    name = os.environ.get("PACS_DATA_GROUP", "").strip()
    if not name:
        return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SiteError(f"PACS_DATA_GROUP: there is no group {name!r} on this machine") from None


class Site:
    """Paths, secrets and the database of the installation rooted at ``data``."""

    def __init__(self, data: Path | str | None = None) -> None:
        self.data = Path(data).resolve() if data else default_data_dir()
        self._settings: tuple[int, settings.SiteSettings] | None = None

    def __repr__(self) -> str:
        return f"Site({str(self.data)!r})"

    @property
    def run(self) -> Path:
        return self.data / "run"

    @property
    def logs(self) -> Path:
        return self.data / "logs"

    @property
    def cache(self) -> Path:
        """Downloads that can be made again; ``PACS_CACHE`` lets test stacks share one."""
        return Path(os.environ.get("PACS_CACHE") or self.data / "cache").resolve()

    @property
    def orthanc_storage(self) -> Path:
        return self.data / "orthanc"

    @property
    def worklists(self) -> Path:
        return self.data / "worklists"

    @property
    def secrets_dir(self) -> Path:
        return self.data / "secrets"

    @property
    def spool(self) -> Path:
        """The control plane's temporary files (``TMPDIR``): uploads as they arrive, large zip members.

        In the data directory rather than ``/tmp``, which may be small or held in memory (Debian 13
        mounts a tmpfs there), and beside the archive's storage, whose free space uploads are
        judged by.
        """
        return self.data / "tmp"

    @property
    def database_url(self) -> str:
        """``PACS_DATABASE_URL``, with ``PACS_DATABASE_PASSWORD`` as its password when that is set.

        A password in a URL must be percent-encoded; one given on its own may hold any character
        (compose.nodes.yaml passes the site's password so).
        """
        url = os.environ.get("PACS_DATABASE_URL")
        if not url:
            return db.default_url(self.data)
        password = os.environ.get("PACS_DATABASE_PASSWORD")
        if not password:
            return url
        return sa.engine.make_url(url).set(password=password).render_as_string(hide_password=False)

    @property
    def umask(self) -> int:
        """The umask of every process of the stack: private, or readable by ``PACS_DATA_GROUP`` too."""
        return 0o027 if data_group() is not None else 0o077

    @property
    def private_directories(self) -> tuple[Path, ...]:
        """Folders for the service alone, whatever group may read the rest."""
        return (self.secrets_dir, self.run, self.spool)

    def make_directories(self) -> None:
        """Create the data directory's folders with the permissions of the site's choice.

        Also puts right the files of an installation made before, or under another choice of
        group, once: ``.permissions`` records what was applied.
        """
        group = data_group()
        os.umask(self.umask)
        for path in (self.data, self.orthanc_storage, self.worklists, self.logs, self.cache):
            path.mkdir(parents=True, exist_ok=True)
        for path in self.private_directories:
            path.mkdir(parents=True, exist_ok=True)
        applied = f"group {group}" if group is not None else "private"
        record = self.data / ".permissions"
        if not record.exists() or record.read_text().strip() != applied:
            self._restrict(self.data, group)
            record.write_text(applied + "\n")
        for path in self.private_directories:
            path.chmod(0o700)

    def _restrict(self, top: Path, group: int | None) -> None:
        """Take every permission from others (and from the group, unless it is the site's group)."""
        private = {str(path) for path in self.private_directories}
        for folder, directories, files in os.walk(top):
            shared_with = (
                group
                if group is not None
                and not any(folder == path or folder.startswith(path + os.sep) for path in private)
                else None
            )
            for name in [folder, *(os.path.join(folder, file) for file in files)]:
                info = os.lstat(name)
                if stat.S_ISLNK(info.st_mode):
                    continue
                mode = stat.S_IMODE(info.st_mode) & 0o700
                if shared_with is not None:
                    # The group may read (and enter) what the owner may; folders hand it down.
                    mode |= (mode & 0o500) >> 3
                    if stat.S_ISDIR(info.st_mode):
                        mode |= stat.S_ISGID
                try:
                    if shared_with is not None and info.st_gid != shared_with:
                        os.chown(name, -1, shared_with, follow_symlinks=False)
                    os.chmod(name, mode)
                except PermissionError:
                    raise SiteError(
                        f"cannot restrict who reads {name}: it belongs to another user (or the service's "
                        "user is not in PACS_DATA_GROUP). Give the data directory to the service's user."
                    ) from None
            directories[:] = [
                directory for directory in directories if not os.path.islink(os.path.join(folder, directory))
            ]

    @cached_property
    def secrets(self) -> Secrets:
        """The installation's secrets, generated on first use and kept in ``secrets/``."""
        path = self.secrets_dir / "secrets.json"
        stored: dict[str, str] = {}
        if path.exists():
            stored = json.loads(path.read_text())
        wanted = {
            "orthanc_user": lambda: "pacs-" + secrets.token_hex(4),
            "orthanc_password": lambda: secrets.token_urlsafe(32),
            "session_key": lambda: secrets.token_urlsafe(48),
            "token_key": lambda: secrets.token_urlsafe(48),
        }
        missing = {name: make() for name, make in wanted.items() if name not in stored}
        if missing:
            stored.update(missing)
            self.secrets_dir.mkdir(parents=True, exist_ok=True)
            self.secrets_dir.chmod(0o700)
            write_private(path, json.dumps(stored, indent=2))
        values = {name: os.environ.get(f"PACS_SECRET_{name.upper()}") or stored[name] for name in wanted}
        return Secrets(**values)

    @cached_property
    def engine(self) -> sa.Engine:
        return db.make_engine(self.database_url)

    def load_settings(self, connection: sa.Connection | None = None) -> settings.SiteSettings:
        """The site settings: stored values over the declared defaults.

        Read on every request, so that a change made through any instance counts at once; the
        values are kept between requests and read again only when the settings' revision moved.
        """
        if connection is None:
            with self.engine.connect() as connection:
                return self.load_settings(connection)
        revision = db.settings_revision(connection)
        cached = self._settings
        if cached is None or cached[0] != revision:
            cached = (revision, settings.SiteSettings.from_stored(db.get_settings(connection)))
            self._settings = cached
        return cached[1]

    def last_settings(self) -> settings.SiteSettings:
        """The settings as last read, without asking the database (for pages that say it is
        down); the declared defaults when they were never read."""
        cached = self._settings
        return cached[1] if cached else settings.SiteSettings()


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[IO[bytes]]:
    """A new file, readable by the service only, that takes ``path``'s place once it is written
    whole and on disk: readers see the old file or the new one, never a part. If writing fails,
    ``path`` stays as it was and the new file goes. (Its temporary name ends in ``.tmp``, which
    backups pass over.)"""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_private(path: Path, content: str | bytes) -> bool:
    """Write ``content`` into ``path`` (``replacing`` it) unless it holds that already; True when
    it changed."""
    data = content.encode() if isinstance(content, str) else content
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == data:
            return False
    with replacing(path) as file:
        file.write(data)
    return True
