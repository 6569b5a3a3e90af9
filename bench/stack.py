"""The stack under test: started as an admin starts one, on the benchmark's own data directory.

``BenchStack.start`` runs ``python -m control --data DIR up`` on free ports (as tests/conftest.py
does) and waits for its banner; ``stop`` sends the Ctrl-C an admin would. While it runs, the pid
files in ``DIR/run`` name Orthanc, the gunicorn master and Caddy; gunicorn's workers are the
master's children. ``Processes`` reads their CPU time and memory from ``/proc``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from control.site import REPOSITORY

ADMIN_PASSWORD = "bench admin password, long enough"  # noqa: S105 - a throwaway stack's
START_TIMEOUT = 240
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# The processes whose CPU is counted, as the pid files in run/ name them.
PROCESS_NAMES = ("orthanc", "control", "caddy")


class StackFailed(RuntimeError):
    """The stack did not start; the message holds the end of its logs."""


def free_port() -> int:
    """A TCP port nobody listens on right now (on every interface, as the stack binds)."""
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))  # noqa: S104 - the stack binds there too
        return probe.getsockname()[1]


def logs_tail(data: Path, lines: int = 30) -> str:
    parts = []
    for log in sorted((data / "logs").glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log.name} ---\n" + "\n".join(text))
    return "\n".join(parts)


def _stat_fields(pid: int) -> list[str]:
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far (0 when it is gone)."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    # After the command: state is fields[0], so utime (stat field 14) is fields[11], stime fields[12].
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (0 when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (gunicorn's workers), found by their parent pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(entry.name))[1]) == pid:
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return sorted(found)


@dataclass
class Processes:
    """The stack's processes by role: ``orthanc``, ``control`` (master and workers), ``caddy``."""

    pids: dict[str, list[int]]

    @classmethod
    def of(cls, run: Path) -> Processes:
        pids: dict[str, list[int]] = {}
        for name in PROCESS_NAMES:
            pid = int((run / f"{name}.pid").read_text().strip())
            pids[name] = [pid, *children(pid)] if name == "control" else [pid]
        return cls(pids)

    @property
    def workers(self) -> list[int]:
        return self.pids["control"][1:]

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by each role, and by this benchmark process (``client``)."""
        used = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in self.pids.items()}
        times = os.times()
        used["client"] = times.user + times.system
        return used

    def workers_rss(self) -> int:
        """Resident memory of the control plane's workers together, in bytes."""
        return sum(rss_bytes(pid) for pid in self.workers)


@dataclass
class BenchStack:
    """A running portal on ``data``: its ports, credentials and processes."""

    data: Path
    web_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    orthanc_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    aet: str = "ORTHANC"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def orthanc_url(self) -> str:
        return f"http://127.0.0.1:{self.orthanc_port}"

    @property
    def orthanc_auth(self) -> tuple[str, str]:
        stored = json.loads((self.data / "secrets" / "secrets.json").read_text())
        return stored["orthanc_user"], stored["orthanc_password"]

    def environment(self) -> dict[str, str]:
        env = {
            **os.environ,
            "PACS_WEB_PORT": str(self.web_port),
            "PACS_DICOM_PORT": str(self.dicom_port),
            "PACS_ORTHANC_HTTP_PORT": str(self.orthanc_port),
            "PACS_INSTITUTION": "Benchmark Hospital",
            "PACS_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "PYTHONPATH": str(REPOSITORY),
        }
        # The stack's own data directory comes from --data; an installation's must not leak in.
        env.pop("PACS_DATA", None)
        env.pop("PACS_DATABASE_URL", None)
        # Every stack would otherwise fetch the 50 MB viewer again (tests share the same cache).
        env.setdefault("PACS_CACHE", str(REPOSITORY / "data" / "cache"))
        return env

    def start(self) -> None:
        """Start the stack and wait for its banner (or fail with its logs)."""
        self.data.mkdir(parents=True, exist_ok=True)
        self._keep_stored_ports()
        log = (self.data / "bench-stack.out").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "control", "--data", str(self.data), "up"],
            cwd=REPOSITORY,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if (self.data / "run" / "ready").exists() and self._answers():
                return
            if self.process.poll() is not None:
                raise StackFailed(
                    f"the stack did not start (exit {self.process.returncode}):\n"
                    + (self.data / "bench-stack.out").read_text(errors="replace")[-3000:]
                    + logs_tail(self.data)
                )
            time.sleep(0.2)
        self.stop()
        raise StackFailed("the stack did not start in time:\n" + logs_tail(self.data))

    def _keep_stored_ports(self) -> None:
        """A data directory used before keeps its ports: the environment sets them only at first."""
        if not (self.data / "control.sqlite3").exists():
            return
        from control import db
        from control.site import Site

        # Read as stored, before the stack's start brings the schema up to date.
        with Site(self.data).engine.connect() as connection:
            stored = db.get_settings(connection)
        self.web_port = stored["web_port"]
        self.dicom_port = stored["dicom_port"]
        self.orthanc_port = stored["orthanc_http_port"]

    def _answers(self) -> bool:
        try:
            return requests.get(f"{self.url}/login", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def stop(self, timeout: float = 60) -> None:
        """Stop it as Ctrl-C would, then make sure it is gone."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def processes(self) -> Processes:
        return Processes.of(self.data / "run")

    def orthanc(self) -> requests.Session:
        """A session straight to Orthanc with its credentials: the "direct" side of every comparison.

        ``Accept-Encoding: identity`` as the portal sends: Orthanc's compression is off anyway.
        """
        session = requests.Session()
        session.auth = self.orthanc_auth
        session.headers["Accept-Encoding"] = "identity"
        return session
