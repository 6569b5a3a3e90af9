"""The native runner: set-up, then Orthanc, the control plane, the catalog's feeder and Caddy as
supervised processes.

``prepare`` makes an installation ready (folders, secrets, database, settings, first admin, viewer,
generated configs) and is idempotent. ``Supervisor`` starts the processes in order, waits until
each answers, starts again one that dies (the portal meanwhile answers "archive not reachable"
rather than nothing), and stops them all (terminate, wait, kill) when told to.
``./pacs up --nodes N`` runs N archive nodes (``orthanc``, ``orthanc-2``...) and N control planes
(``control``, ``control-2``...) behind the one Caddy, on one machine, with one catalog feeder:
for tests and small sites (README: Several nodes).
``./pacs up --detach`` runs the same supervisor as a background process whose pid is kept in
``run/pacs.pid``; ``./pacs down`` signals it and makes sure nothing is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control import accounts, archive_index, db, network
from control import settings as site_settings
from control.orthanc import Orthanc, OrthancError, OrthancUnavailable
from control.runtime import configs, files, logs, unixhttp
from control.site import REPOSITORY, Site, SiteError
from control.viewer import ensure_viewer

ADMIN_USERNAME = "admin"
# Debian installs Orthanc in /usr/sbin, which an ordinary user's PATH lacks on Debian 12 and 13.
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"

# A process that dies is started again after RESTART_DELAY seconds, unless it died more than
# MAX_RESTARTS times within RESTART_WINDOW seconds: then something is wrong that a restart won't fix.
RESTART_DELAY = 2.0
MAX_RESTARTS = 5
RESTART_WINDOW = 120


class StackError(RuntimeError):
    """Something that keeps the stack from starting, with a message for the admin."""


@dataclass
class Prepared:
    """What ``prepare`` found or made."""

    settings: site_settings.SiteSettings
    topology: configs.Topology
    admin_password: str | None = None


def prepare(site: Site, *, fetch_viewer: bool = True, say: Callable[..., None] = print) -> Prepared:
    """Make the installation at ``site`` ready to run; safe to call on every start."""
    try:
        site.make_directories()
    except SiteError as error:
        raise StackError(str(error)) from None
    site.secrets  # noqa: B018 - generated on first use
    db.migrate(site.engine)
    with site.engine.begin() as connection:
        stored = db.get_settings(connection)
        first_run = site_settings.first_run_values()
        missing = {name: value for name, value in first_run.as_dict().items() if name not in stored}
        if missing:
            db.put_settings(connection, missing)
    topology = configs.Topology.from_environment(site)
    try:
        where = archive_index.choose(site, topology.nodes)
    except archive_index.ArchiveIndexError as error:
        raise StackError(str(error)) from None
    if where != topology.archive_index:
        topology = dataclasses.replace(topology, archive_index=where)
    if fetch_viewer and topology.ohif_managed:
        ensure_viewer(site, say=say)
    values = site.load_settings()
    configs.write_all(site, values, topology)
    return Prepared(values, topology, create_first_admin(site, say))


def create_first_admin(site: Site, say: Callable[..., None]) -> str | None:
    """Create the admin account of a new installation; return its password if it was generated.

    The password comes from ``PACS_ADMIN_PASSWORD`` or is generated, and is shown at once: it is
    never stored in clear, so this is the only moment it can be seen.
    """
    with site.engine.begin() as connection:
        if accounts.count_users(connection):
            return None
        chosen = os.environ.get("PACS_ADMIN_PASSWORD")
        password = chosen or secrets.token_urlsafe(12)
        try:
            accounts.create_user(connection, ADMIN_USERNAME, password, is_admin=True)
        except accounts.AccountError as error:
            raise StackError(f"PACS_ADMIN_PASSWORD is refused: {error}") from None
    if chosen:
        say(f"pacs: created the admin account {ADMIN_USERNAME!r} with the password in PACS_ADMIN_PASSWORD")
        return None
    say(f"pacs: created the admin account {ADMIN_USERNAME!r} with the password {password}  (shown once)")
    return password


def _die_with_parent() -> None:
    """In a child: receive SIGTERM when the supervisor dies, so nothing outlives it."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def check_ports(values: site_settings.SiteSettings, topology: configs.Topology | None = None) -> None:
    """Refuse to start when a port the stack needs is taken, naming the port and its setting."""
    for setting in site_settings.SETTINGS:
        port = values.as_dict()[setting.name] if setting.listening_port else 0
        if port and not network.port_is_free(port):
            # "Web port" -> "web port", "DICOM port" stays.
            what = (
                setting.label
                if setting.label[1:2].isupper()
                else setting.label[0].lower() + setting.label[1:]
            )
            raise StackError(
                f"port {port} ({what}) is already in use by another program. Stop that program, "
                f"or choose another port: ./pacs config set {setting.name} PORT"
            )
    if topology is None or topology.orthanc_hosts:
        return
    for node in configs.archive_nodes(values, topology)[1:]:
        for port, first in ((node.http_port, "orthanc_http_port"), (node.dicom_port, "dicom_port")):
            if not network.port_is_free(port):
                raise StackError(
                    f"port {port} (archive node {node.number} takes the ports after {first}) is "
                    f"already in use by another program. Stop that program, or move the first: "
                    f"./pacs config set {first} PORT"
                )


@dataclass
class Process:
    """One supervised program: how to start it and how to tell that it answers."""

    name: str
    argv: list[str]
    log: Path
    ready: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    # Files the program writes are the service's alone from creation (see control.site).
    umask: int = 0o077
    popen: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)
    # Where standard output goes when it is not ``log`` (gunicorn's access log); stderr stays in ``log``.
    output_log: Path | None = None
    # The portal reads ``log`` back (the archive watcher reads Orthanc's): it is written even when
    # the logs go to the journal.
    read_back: bool = False
    # It listens on ports the admin chooses, perhaps below 1024 (DICOM's 104, https' 443): as a
    # system service it may bind them (control.runtime.service).
    listens: bool = False

    def start(self, site: Site) -> None:
        # Output goes through pipes to rotating log files (control.runtime.logs), never straight to a file.
        process = self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if self.output_log else subprocess.STDOUT,
            env={**os.environ, **self.env},
            process_group=0,
            umask=self.umask,
            preexec_fn=_die_with_parent,
            cwd=REPOSITORY,
        )
        assert process.stdout is not None  # a pipe, as asked
        if self.output_log:
            assert process.stderr is not None
            logs.relay(process.stdout, self.output_log, f"{self.name}-access")
            logs.relay(process.stderr, self.log, self.name)
        else:
            logs.relay(process.stdout, self.log, self.name, read_back=self.read_back)
        files.pid_file(site, self.name).write_text(str(process.pid))

    @property
    def running(self) -> subprocess.Popen[bytes]:
        """The running program, once ``start`` has started it."""
        if self.popen is None:
            raise StackError(f"{self.name} has not been started")
        return self.popen

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.running.poll() is not None:
                raise StackError(
                    f"{self.name} stopped while starting (exit code {self.running.returncode}); "
                    f"its log {self.log} ends with:\n{tail(self.log)}"
                )
            with contextlib.suppress(OSError):
                if self.ready():
                    return
            time.sleep(0.1)
        raise StackError(
            f"{self.name} did not answer within {timeout:.0f} s; its log {self.log} ends with:\n"
            f"{tail(self.log)}"
        )

    def stop(self, site: Site, timeout: float = 20) -> None:
        if self.popen and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        with contextlib.suppress(FileNotFoundError):
            files.pid_file(site, self.name).unlink()


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def processes(site: Site, prepared: Prepared) -> list[Process]:
    """The stack's programs in the order they start: every archive node, every control plane, the
    catalog's feeder, Caddy."""
    values, topology = prepared.settings, prepared.topology
    admin_socket = files.caddy_admin_socket(site)

    def orthanc_ready(node: configs.ArchiveNode) -> Callable[[], bool]:
        orthanc = Orthanc(node.url, site.secrets.orthanc_user, site.secrets.orthanc_password)

        def ready() -> bool:
            try:
                orthanc.system()
            except (OrthancUnavailable, OrthancError):
                return False
            return True

        return ready

    def control_ready(socket_path: Path) -> Callable[[], bool]:
        return lambda: unixhttp.request(socket_path, "GET", "/healthz")[0] in (200, 503)

    def caddy_ready() -> bool:
        if values.web_port:
            with socket.create_connection(("127.0.0.1", values.web_port), timeout=1):
                return True
        return admin_socket.exists()

    archive = [
        Process(
            node.name,
            [ORTHANC, str(configs.orthanc_configuration_file(site, node))],
            site.logs / f"{node.name}.log",
            orthanc_ready(node),
            umask=site.umask,
            read_back=True,
            listens=True,
        )
        for node in configs.archive_nodes(values, topology)
    ]
    planes = []
    for number in range(1, topology.nodes + 1):
        name = "control" if number == 1 else f"control-{number}"
        socket_path = files.control_socket(site, number)
        planes.append(
            Process(
                name,
                gunicorn_argv(site, topology, listen=f"unix:{socket_path}"),
                site.logs / f"{name}.log",
                control_ready(socket_path),
                env={
                    "PACS_DATA": str(site.data),
                    "TMPDIR": str(site.spool),
                    "PACS_CONTROL_PLANE": str(number),
                },
                umask=site.umask,
                output_log=site.logs / ("access.log" if number == 1 else f"access-{number}.log"),
            )
        )
    # The study catalog's feeder (control.catalog.feeder): a process of its own, so that following
    # the archive never competes with the pages for a worker's interpreter. One for all nodes: it
    # reads the shared index's change log through the client of all nodes, and however many run
    # (on other machines too) the one holding the database's lock feeds (control.catalog.lock).
    catalog = Process(
        "catalog",
        [sys.executable, "-m", "control", "--data", str(site.data), "catalog", "feed"],
        site.logs / "catalog.log",
        lambda: True,
        env={"PACS_DATA": str(site.data)},
        umask=site.umask,
    )
    caddy_home = site.cache / "caddy"
    caddy = Process(
        "caddy",
        ["caddy", "run", "--config", str(files.caddyfile(site)), "--adapter", "caddyfile"],
        site.logs / "caddy-process.log",
        caddy_ready,
        env={"XDG_CONFIG_HOME": str(caddy_home / "config"), "XDG_DATA_HOME": str(caddy_home / "data")},
        umask=site.umask,
        listens=True,
    )
    return [*archive, *planes, catalog, caddy]


def gunicorn_argv(site: Site, topology: configs.Topology, listen: str | None = None) -> list[str]:
    """gunicorn serving the control plane.

    ``gthread`` workers, because ``sync`` workers are killed by the worker timeout in the middle of a
    long zip download and the browser is left with a truncated file. The access log records the path
    without its query string: token links carry the token there.
    """
    # A socket left by a gunicorn that died is replaced by gunicorn itself.
    listen = listen or topology.control_listen
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        listen,
        "--worker-class",
        "gthread",
        "--workers",
        os.environ.get("PACS_CONTROL_WORKERS", "2"),
        "--threads",
        os.environ.get("PACS_CONTROL_THREADS", "16"),
        "--timeout",
        "120",
        "--graceful-timeout",
        "30",
        "--keep-alive",
        "75",
        # Both to the runner (control.runtime.logs): the access log on stdout, gunicorn's own on stderr.
        "--access-logfile",
        "-",
        "--access-logformat",
        '%({x-forwarded-for}i)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms',
        "--logger-class",
        "control.runtime.serving.AccessLogger",
        "--error-logfile",
        "-",
        # gunicorn 27 opens a control socket in the home folder by default: shared by every
        # installation of the same user, and outside the data directory. The portal does not use it.
        "--no-control-socket",
        # The workers' archive watcher, metrics across workers and the activity log's retention
        # (see control.runtime.gunicorn_conf).
        "--config",
        "python:control.runtime.gunicorn_conf",
        # gunicorn's own umask (0 by default) applies to its unix socket: keep it the site's.
        "--umask",
        oct(site.umask),
        "control.app:create_app()",
    ]


class Supervisor:
    """Runs the stack's processes until told to stop or until one of them dies."""

    def __init__(self, site: Site, prepared: Prepared) -> None:
        self.site = site
        self.prepared = prepared
        self.processes = processes(site, prepared)
        self.stopping = False

    @property
    def pid_file(self) -> Path:
        return files.pid_file(self.site, files.RUNNER)

    def run(self, on_ready: Callable[[], None]) -> int:
        """Start everything, call ``on_ready``, then supervise; return an exit code."""
        running = running_supervisor(self.site)
        if running:
            raise StackError(f"the portal of {self.site.data} already runs (pid {running})")
        check_ports(self.prepared.settings, self.prepared.topology)
        self.pid_file.write_text(str(os.getpid()))
        signal.signal(signal.SIGTERM, self._stop_signal)
        signal.signal(signal.SIGINT, self._stop_signal)
        signal.signal(signal.SIGHUP, self._stop_signal)
        try:
            for process in self.processes:
                process.start(self.site)
                process.wait_ready(timeout=60)
            files.ready(self.site).write_text(json.dumps({"pid": os.getpid()}))
            on_ready()
            return self._watch()
        finally:
            self.stop()

    def _stop_signal(self, _signum: int, _frame: Any) -> None:
        self.stopping = True

    def _watch(self) -> int:
        """Restart a process that died, unless it keeps dying; then stop everything."""
        while not self.stopping:
            for process in self.processes:
                if process.running.poll() is None:
                    continue
                now = time.monotonic()
                process.restarts = [t for t in process.restarts if now - t < RESTART_WINDOW] + [now]
                print(
                    f"pacs: {process.name} stopped unexpectedly (exit code {process.running.returncode}); "
                    f"its log ends with:\n{tail(process.log)}",
                    file=sys.stderr,
                    flush=True,
                )
                if len(process.restarts) > MAX_RESTARTS:
                    print(
                        f"pacs: {process.name} stopped {len(process.restarts)} times within "
                        f"{RESTART_WINDOW} s; stopping the portal.",
                        file=sys.stderr,
                        flush=True,
                    )
                    return 1
                time.sleep(RESTART_DELAY)
                self._restart(process)
            time.sleep(0.2)
        return 0

    def _restart(self, process: Process) -> None:
        try:
            process.start(self.site)
            process.wait_ready(timeout=60)
            print(f"pacs: {process.name} restarted.", file=sys.stderr, flush=True)
        except StackError as error:
            print(f"pacs: {error}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop(self.site)
        for path in (files.ready(self.site), self.pid_file):
            path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; it only waits for its parent to collect it.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return False
    return True


def read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def running_supervisor(site: Site) -> int | None:
    return read_pid(files.pid_file(site, files.RUNNER))


def leftover_processes(site: Site) -> Iterator[tuple[str, int]]:
    """The stack's processes that run, by name (every node's and plane's pid file in ``run/``)."""
    for path in files.pid_files(site):
        pid = read_pid(path) if path.stem != files.RUNNER else None
        if pid:
            yield path.stem, pid


def stop_detached(site: Site, timeout: float = 60) -> bool:
    """Stop a detached portal and anything it left behind; True when something was running."""
    found = False
    supervisor = running_supervisor(site)
    if supervisor:
        found = True
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.1)
    for _name, pid in leftover_processes(site):
        found = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    for path in files.pid_files(site):
        path.unlink()
    files.ready(site).unlink(missing_ok=True)
    return found


def start_detached(site: Site, timeout: float = 180) -> int:
    """Run the supervisor in the background and wait until the stack answers; return its pid."""
    files.ready(site).unlink(missing_ok=True)
    log = site.logs / "pacs.log"
    with log.open("ab") as output:
        child = subprocess.Popen(
            [sys.executable, "-m", "control", "--data", str(site.data), "up", "--quiet"],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPOSITORY,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if files.ready(site).exists():
            return child.pid
        if child.poll() is not None:
            raise StackError(f"the portal did not start; {log} ends with:\n{tail(log)}")
        time.sleep(0.1)
    stop_detached(site)
    raise StackError(f"the portal did not start within {timeout:.0f} s; see {log}")
