"""A portal started as an admin starts one, on a data directory and ports of its own.

``Stack.start`` runs ``python -m control --data DIR up`` and waits for its banner; ``stop`` sends
the Ctrl-C an admin would. The benchmark runs its scenarios against one, and the tests
(``tests/conftest.py``) start theirs with the same class. The runner's output goes to
``DIR/runner.out`` (a pipe nobody reads could fill up and stop the runner), and ``output`` holds
the lines of the current run.

While a stack runs, the pid files in ``DIR/run`` name Orthanc, the gunicorn master and Caddy;
gunicorn's workers are the master's children. ``Processes`` reads their CPU time and memory from
``/proc``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import requests

from bench import processes
from control.site import REPOSITORY, write_private

ADMIN_PASSWORD = "the bench keeper's long passphrase"  # noqa: S105 - a throwaway stack's
START_TIMEOUT = 240
BANNER = "Press Ctrl-C to stop."
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# The processes whose CPU is counted, as the pid files in run/ name them.
PROCESS_NAMES = ("orthanc", "control", "catalog", "caddy")


def download_cache() -> Path:
    """Where test and bench stacks keep what they download (the viewer, base systems, packages).

    ``PACS_CACHE`` if set, otherwise the user's cache (``$XDG_CACHE_HOME/pacs``, by default
    ``~/.cache/pacs``), as pip and npm keep theirs: every clone on a machine shares one, so that a
    fresh clone does not fetch and unpack them all again. Nothing in it is needed to run a portal:
    each stack copies or unpacks what it takes.
    """
    if configured := os.environ.get("PACS_CACHE"):
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pacs"


class StackFailed(RuntimeError):
    """The stack did not start; the message holds the end of its logs."""


def free_port() -> int:
    """A TCP port nobody listens on right now (on every interface, as the stack binds)."""
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))  # noqa: S104 - the stack binds there too
        return probe.getsockname()[1]


def free_ports(count: int) -> int:
    """The first of ``count`` free ports in a row: the archive nodes of one machine take the ports
    after the first node's (``./pacs up --nodes N``)."""
    from control.network import port_is_free

    while True:
        first = free_port()
        if all(port_is_free(first + offset) for offset in range(1, count)):
            return first


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


def stack_environment(web_port: int, dicom_port: int, orthanc_port: int, **overrides: str) -> dict[str, str]:
    """The environment of ``./pacs up`` for a stack on these ports (the first run's settings)."""
    env = {
        **os.environ,
        "PACS_WEB_PORT": str(web_port),
        "PACS_DICOM_PORT": str(dicom_port),
        "PACS_ORTHANC_HTTP_PORT": str(orthanc_port),
        "PYTHONPATH": str(REPOSITORY),
    }
    # The stack's own data directory comes from --data; an installation's must not leak in.
    env.pop("PACS_DATA", None)
    env.pop("PACS_DATABASE_URL", None)
    # Every stack would otherwise unpack the 50 MB viewer again.
    env.setdefault("PACS_CACHE", str(download_cache()))
    env.update(overrides)
    return env


def stored_ports(data: Path) -> tuple[int, int, int] | None:
    """The web, DICOM and Orthanc ports of a data directory used before (the environment sets
    ports only on a first run), or None for a new one."""
    if not (data / "control.sqlite3").exists():
        return None
    from control import db
    from control.site import Site

    # Read as stored, before the stack's start brings the schema up to date.
    with Site(data).engine.connect() as connection:
        stored = db.get_settings(connection)
    return stored["web_port"], stored["dicom_port"], stored["orthanc_http_port"]


@dataclass
class Stack:
    """A portal on ``data``: its ports, environment, runner process and output."""

    data: Path
    web_port: int
    dicom_port: int
    orthanc_port: int
    env: dict[str, str]
    institution: str = ""
    process: subprocess.Popen | None = None
    output: list[str] = field(default_factory=list)
    aet: str = "ORTHANC"

    @classmethod
    def on(cls, data: Path, *, institution: str, admin_password: str, **env: str) -> Self:
        """A stack (not started) on free ports, or on the ports ``data`` already has."""
        ports = stored_ports(data) or (free_port(), free_port(), free_port())
        overrides = {"PACS_INSTITUTION": institution, "PACS_ADMIN_PASSWORD": admin_password, **env}
        return cls(data, *ports, env=stack_environment(*ports, **overrides), institution=institution)

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

    @property
    def runner_log(self) -> Path:
        return self.data / "runner.out"

    def pacs(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a ``./pacs`` command (after the bash set-up) against this stack's data directory."""
        return subprocess.run(
            [sys.executable, "-m", "control", "--data", str(self.data), *args],
            cwd=REPOSITORY,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            **kwargs,
        )

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the stack and wait for its banner (or raise StackFailed with its output and logs)."""
        self.data.mkdir(parents=True, exist_ok=True)
        self._read_from = self.runner_log.stat().st_size if self.runner_log.exists() else 0
        self.process = processes.start_logged(
            [sys.executable, "-m", "control", "--data", str(self.data), "up"],
            self.runner_log,
            cwd=REPOSITORY,
            env=self.env,
        )

        def banner_shown() -> bool:
            self._read_output()
            return any(BANNER in line for line in self.output)

        def told() -> str:
            self._read_output()
            return "".join(self.output)[-3000:] + logs_tail(self.data)

        try:
            processes.wait_until_ready(
                self.process,
                banner_shown,
                "the stack",
                timeout=timeout,
                details=told,
                failure=StackFailed,
            )
        except StackFailed:
            self.stop()
            raise

    def _read_output(self) -> None:
        """Add the runner's new complete lines to ``output``."""
        with self.runner_log.open("rb") as log:
            log.seek(self._read_from)
            text = log.read()
        complete = text[: text.rfind(b"\n") + 1]
        self._read_from += len(complete)
        self.output.extend(complete.decode(errors="replace").splitlines(keepends=True))

    def stop(self, timeout: float = 60) -> int | None:
        """Stop it as Ctrl-C would (then make sure it is gone); the runner's exit code."""
        if self.process is None:
            return None
        code = processes.stop(self.process, signal.SIGINT, timeout)
        self._read_output()
        return code

    def processes(self) -> Processes:
        return Processes.of(self.data / "run")

    @property
    def database_url(self) -> str:
        from control import db

        return self.env.get("PACS_DATABASE_URL") or db.default_url(self.data)

    def catalog_state(self):
        """The study catalog's state row (``control.catalog.store.State``)."""
        from control import db
        from control.catalog import store

        engine = db.make_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return store.read_state(connection)
        finally:
            engine.dispose()

    def wait_for_catalog(self, timeout: float = 120) -> None:
        """Wait until the study catalog holds every change the archive has logged so far."""
        last = (
            self.orthanc().get(f"{self.orthanc_url}/changes", params={"last": ""}, timeout=30).json()["Last"]
        )
        deadline = time.monotonic() + timeout
        while True:
            state = self.catalog_state()
            if state.status == "ready" and state.applied_seq >= last:
                return
            if time.monotonic() > deadline:
                raise StackFailed(
                    f"the catalog did not catch up with change {last}: {state}\n" + logs_tail(self.data)
                )
            time.sleep(0.1)

    def orthanc(self) -> requests.Session:
        """A session straight to Orthanc with its credentials: the "direct" side of every comparison.

        ``Accept-Encoding: identity`` as the portal sends: Orthanc's compression is off anyway.
        """
        session = requests.Session()
        session.auth = self.orthanc_auth
        session.headers["Accept-Encoding"] = "identity"
        return session


@contextlib.contextmanager
def proxy_alone(stack: Stack, folder: Path, timeout: float = 20) -> Iterator[tuple[str, int]]:
    """A Caddy of the benchmark's own that proxies straight to the stack's Orthanc, with its
    credentials and the headers the portal's DICOMweb route sets, but no gate: the proxy hop's own
    cost, for reference. It listens on 127.0.0.1 only and lives as long as the block; yields its
    URL and pid. The portal's configuration never has such a route."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    basic = base64.b64encode(":".join(stack.orthanc_auth).encode()).decode()
    config = folder / "Caddyfile"
    write_private(
        config,
        "{\n\tadmin off\n\tauto_https off\n}\n"
        f"http://127.0.0.1:{port} {{\n"
        f"\treverse_proxy 127.0.0.1:{stack.orthanc_port} {{\n"
        f'\t\theader_up Authorization "Basic {basic}"\n'
        "\t\theader_up -Accept-Encoding\n"
        "\t\tflush_interval -1\n"
        "\t}\n}\n",
    )
    env = {**os.environ, "XDG_CONFIG_HOME": str(folder / "config"), "XDG_DATA_HOME": str(folder / "data")}
    log = folder / "caddy.log"
    process = processes.start_logged(
        ["caddy", "run", "--config", str(config), "--adapter", "caddyfile"], log, env=env
    )

    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        processes.wait_until_ready(
            process,
            listening,
            "the reference Caddy",
            timeout=timeout,
            details=lambda: processes.log_tail(log),
            failure=StackFailed,
            interval=0.05,
        )
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        processes.stop(process, timeout=10)
