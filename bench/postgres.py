"""A private PostgreSQL server: its own cluster in a temporary folder, on a free port.

The tests run the control plane on one (``tests/postgres.py``), and the benchmark measures the
study catalog on one. Debian's ``postgresql`` package provides the binaries; ``initdb`` refuses to
run as root, so the cluster belongs to the ``postgres`` system user when run as root. The server
listens on 127.0.0.1 only and trusts local connections: it lives as long as its user's session.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg

from bench import processes


def binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    def __init__(self, port: int) -> None:
        # Not under pytest's temporary folders: those are private to root, and the server runs as
        # the postgres user.
        self.folder = Path(tempfile.mkdtemp(prefix="pacs-test-postgres-"))
        self.port = port
        self.bin = binaries()
        self.process: subprocess.Popen | None = None
        self.log = self.folder / "postgres.log"

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def start(self) -> None:
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
        data = self.folder / "cluster"
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        subprocess.run(
            self._as_owner(
                [str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
        )
        self._run()

    def _run(self) -> None:
        data = self.folder / "cluster"
        self.process = processes.start_logged(
            self._as_owner(
                [
                    str(self.bin / "postgres"),
                    *("-D", str(data), "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.folder)),
                ]
            ),
            self.log,
        )
        processes.wait_until_ready(
            self.process,
            self._answers,
            "PostgreSQL",
            timeout=30,
            details=lambda: processes.log_tail(self.log),
            interval=0.2,
        )

    def _answers(self) -> bool:
        try:
            with psycopg.connect(self.url("postgres", driver=False), connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def restart(self, down_for: float = 0, until: threading.Event | None = None) -> None:
        """Stop the server as an admin's restart does (fast shutdown: sessions are ended, nothing
        committed is lost), stay down ``down_for`` seconds (or until ``until`` is set, so that a
        test's checks all happen while it is down however slow the machine), then start it again
        on the same data."""
        assert self.process is not None
        # The postmaster itself (the process started may be runuser, standing in between).
        postmaster = int((self.folder / "cluster" / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGINT)
        self.process.wait(60)
        if until is not None:
            until.wait(300)
        else:
            time.sleep(down_for)
        self._run()

    def url(self, database: str, driver: bool = True) -> str:
        scheme = "postgresql+psycopg" if driver else "postgresql"
        return f"{scheme}://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url("postgres", driver=False), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        processes.stop(self.process)
        shutil.rmtree(self.folder, ignore_errors=True)
