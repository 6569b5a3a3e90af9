"""``./pacs service install``: the portal as systemd units, the way a hospital's server runs it.

``./pacs up`` supervises the stack itself; a server rather has the init system do it: started at
boot, each process restarted by systemd, logs in the journal. The units are made from the one
list of the stack's processes (``control.runtime.stack.processes``), so that a process is declared once:

    pacs.target              what ``systemctl enable --now pacs.target`` starts, at every boot
    pacs-prepare.service     a oneshot running ``./pacs prepare`` (folders, migrations, configs)
    pacs-<process>.service   one per process, each after the one before it in the list (the
                             archive before the control plane, the control plane before Caddy)

Each process unit runs that process's command with its environment and umask, as the service's
user, sandboxed (a read-only system, the data directory the only place it writes), restarted on
failure as ``./pacs up`` would restart it (same delay, same limit). The next unit starts once the
process answers (``ExecStartPost``: ``./pacs service wait``, the runner's readiness check).

Logs go to the journal (``JOURNAL_STREAM`` is set, see ``control.runtime.logs``), except that Orthanc's
output is also written to ``logs/orthanc.log``, where the archive watcher finds the DICOM calls
Orthanc refused: its unit runs Orthanc through ``./pacs service relay``, which copies every line
to both.

The environment the processes need beyond ``PACS_DATA`` (``PACS_DATABASE_URL``, ``PACS_CACHE``,
...) is kept in an environment file, ``/etc/default/pacs``, readable by root only: it may hold a
database password, and unit files are readable by everyone.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from control import settings as site_settings
from control.runtime import configs, logs, stack
from control.site import REPOSITORY, Site

UNIT_DIRECTORY = Path("/etc/systemd/system")
ENVIRONMENT_FILE = Path("/etc/default/pacs")
TARGET = "pacs.target"
PREPARE = "pacs-prepare.service"
# Not kept for the service: the data directory is in every unit; the first admin's password is
# used once, by the installation's first preparation.
NOT_KEPT = ("PACS_DATA", "PACS_ADMIN_PASSWORD")
READY_TIMEOUT = 60  # seconds a process has to answer, as under ./pacs up
# Where home folders are: the sandbox hides them unless the portal lives there.
HOMES = (Path("/home"), Path("/root"), Path("/run/user"))
TMPS = (Path("/tmp"), Path("/var/tmp"))  # noqa: S108 - only compared with the portal's paths


class ServiceError(RuntimeError):
    """The units cannot be installed as asked, with a message for the admin."""


def unit_name(process: str) -> str:
    return f"pacs-{process}.service"


@dataclass(frozen=True)
class Account:
    """The user and group the portal's processes run as."""

    user: str
    group: str
    uid: int
    gid: int
    home: str

    @classmethod
    def named(cls, user: str) -> Account:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ServiceError(f"there is no user {user!r} on this machine") from None
        return cls(
            entry.pw_name, grp.getgrgid(entry.pw_gid).gr_name, entry.pw_uid, entry.pw_gid, entry.pw_dir
        )


def default_account(site: Site) -> Account:
    """Who owns the data directory, else who called ``sudo``, else who runs this; never root."""
    candidates = []
    with contextlib.suppress(FileNotFoundError):
        candidates.append(pwd.getpwuid(site.data.stat().st_uid).pw_name)
    candidates += [os.environ.get("SUDO_USER", ""), pwd.getpwuid(os.getuid()).pw_name]
    for user in candidates:
        if user and user != "root":
            return Account.named(user)
    raise ServiceError(
        "the portal would run as root: name the user it runs as with --user NAME "
        "(it will own the data directory)"
    )


# ---- writing unit files ---------------------------------------------------------------------------

_PLAIN = re.compile(r"[\w@%+=:,./-]+")


def quote(word: str, *, command: bool = True) -> str:
    """One word of a unit file's line: ``%`` is systemd's (and ``$`` on a command line), quotes as
    in a shell."""
    word = word.replace("%", "%%")
    if command:
        word = word.replace("$", "$$")
    if _PLAIN.fullmatch(word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def command_line(argv: list[str]) -> str:
    program = argv[0] if os.path.isabs(argv[0]) else shutil.which(argv[0]) or argv[0]
    return " ".join(quote(word) for word in [program, *argv[1:]])


def _env_file_value(value: str) -> str:
    escaped = "".join("\\" + char if char in '"\\`$' else char for char in value)
    return f'"{escaped}"'


def kept_environment(environ: Mapping[str, str], environment_file: Path) -> dict[str, str]:
    """The ``PACS_*`` variables the service keeps: the file's, then this shell's over them."""
    kept = read_environment_file(environment_file)
    kept.update({name: value for name, value in environ.items() if name.startswith("PACS_")})
    for name in NOT_KEPT:
        kept.pop(name, None)
    return kept


def read_environment_file(path: Path) -> dict[str, str]:
    """The variables of an environment file this module wrote (``NAME="value"`` lines)."""
    values = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                name, _, value = line.partition("=")
                values[name.strip()] = "".join(shlex.split(value))
    return values


def environment_file_text(values: Mapping[str, str]) -> str:
    lines = ["# The portal's environment, read by its systemd units (./pacs service install)."]
    lines += [f"{name}={_env_file_value(value)}" for name, value in sorted(values.items())]
    return "\n".join(lines) + "\n"


def _section(title: str, entries: list[tuple[str, str]]) -> str:
    return "\n".join([f"[{title}]", *(f"{key}={value}" for key, value in entries)]) + "\n"


def _relay_argv(site: Site, process: stack.Process) -> list[str]:
    """The process's command run through ``./pacs service relay``, which keeps its log file too."""
    head = [sys.executable, "-m", "control", "--data", str(site.data), "service", "relay"]
    return [*head, "--name", process.name, "--log", str(process.log), "--", *process.argv]


def _sandbox(site: Site, listens: bool) -> list[tuple[str, str]]:
    writable = [site.data]
    if not site.cache.is_relative_to(site.data):
        writable.append(site.cache)
    needed = [REPOSITORY, *writable]
    at_home = any(path.is_relative_to(home) for path in needed for home in HOMES)
    capability = "CAP_NET_BIND_SERVICE" if listens else ""
    in_tmp = any(path.is_relative_to(tmp) for path in needed for tmp in TMPS)
    entries = [
        ("NoNewPrivileges", "yes"),
        # A private /tmp would hide a portal that lives in the shared one.
        ("PrivateTmp", "no" if in_tmp else "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectSystem", "strict"),
        # The repository or the data under a home folder: home folders stay visible, read-only.
        ("ProtectHome", "read-only" if at_home else "yes"),
        ("ReadWritePaths", " ".join(quote(str(path)) for path in writable)),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        # Only the listeners may bind a port below 1024 (a setting may move theirs there at any
        # time); nothing gets any other privilege, whoever the user is.
        ("CapabilityBoundingSet", capability),
    ]
    if listens:
        entries.append(("AmbientCapabilities", capability))
    return entries


def units(site: Site, account: Account, environment_file: Path = ENVIRONMENT_FILE) -> dict[str, str]:
    """The unit files of the portal at ``site``, by name."""
    # The commands do not depend on the stored settings (only the readiness checks do, which
    # ``service wait`` makes with them): the units are written without the database.
    prepared = stack.Prepared(site_settings.first_run_values(), configs.Topology.from_environment(site))
    processes = stack.processes(site, prepared)
    control = [sys.executable, "-m", "control", "--data", str(site.data)]
    common = [
        ("User", account.user),
        ("Group", account.group),
        ("WorkingDirectory", str(REPOSITORY).replace("%", "%%")),
    ]

    def environment(env: Mapping[str, str]) -> list[tuple[str, str]]:
        given = {"PACS_DATA": str(site.data), "PYTHONPATH": str(REPOSITORY), **env}
        entries = [("Environment", quote(f"{name}={value}", command=False)) for name, value in given.items()]
        # Its variables win over the lines above (systemd's order); "-": it may be missing.
        return [*entries, ("EnvironmentFile", "-" + str(environment_file).replace("%", "%%"))]

    made = {}
    made[TARGET] = (
        _section(
            "Unit",
            [
                ("Description", f"PACS web portal ({site.data})"),
                ("Wants", " ".join([PREPARE, *(unit_name(process.name) for process in processes)])),
            ],
        )
        + "\n"
        + _section("Install", [("WantedBy", "multi-user.target")])
    )
    made[PREPARE] = (
        _section(
            "Unit",
            [
                ("Description", "PACS web portal: folders, database, configuration"),
                ("PartOf", TARGET),
                # A database on this machine is up before the migrations.
                ("After", "network-online.target postgresql.service"),
                ("Wants", "network-online.target"),
            ],
        )
        + "\n"
        + _section(
            "Service",
            [
                ("Type", "oneshot"),
                ("RemainAfterExit", "yes"),
                *common,
                ("UMask", f"{site.umask:04o}"),
                *environment({}),
                ("ExecStart", command_line([*control, "prepare"])),
                # The first start may fetch the viewer.
                ("TimeoutStartSec", "15min"),
                *_sandbox(site, listens=False),
            ],
        )
    )
    before = PREPARE
    for process in processes:
        argv = _relay_argv(site, process) if process.read_back else process.argv
        made[unit_name(process.name)] = (
            _section(
                "Unit",
                [
                    ("Description", f"PACS web portal: {process.name}"),
                    ("PartOf", TARGET),
                    ("Requires", PREPARE),
                    ("After", before),
                    ("StartLimitIntervalSec", f"{stack.RESTART_WINDOW}s"),
                    ("StartLimitBurst", str(stack.MAX_RESTARTS)),
                ],
            )
            + "\n"
            + _section(
                "Service",
                [
                    ("Type", "simple"),
                    *common,
                    ("UMask", f"{process.umask:04o}"),
                    *environment(process.env),
                    ("ExecStart", command_line(argv)),
                    ("ExecStartPost", command_line([*control, "service", "wait", process.name])),
                    ("Restart", "on-failure"),
                    ("RestartSec", f"{stack.RESTART_DELAY:g}s"),
                    ("TimeoutStartSec", f"{READY_TIMEOUT + 30}s"),
                    # gunicorn lets requests finish for 30 s (--graceful-timeout).
                    ("TimeoutStopSec", "40s"),
                    # The relay passes the stop on to its program and writes what it says last.
                    *([("KillMode", "mixed")] if process.read_back else []),
                    *_sandbox(site, listens=process.listens),
                ],
            )
        )
        before = unit_name(process.name)
    return made


def write(
    directory: Path, made: Mapping[str, str], environment: Mapping[str, str], environment_file: Path
) -> None:
    """Write the unit files and the environment file (readable by root, or whoever writes it, only)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in made.items():
        (directory / name).write_text(text)
        (directory / name).chmod(0o644)
    environment_file.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        environment_file.unlink()
    descriptor = os.open(environment_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as output:
        output.write(environment_file_text(environment))


def installed(directory: Path = UNIT_DIRECTORY) -> list[Path]:
    """The portal's unit files in ``directory``."""
    return sorted([*directory.glob("pacs-*.service"), *directory.glob(TARGET)])


def systemd_runs() -> bool:
    """True when systemd is this machine's init system (the test of ``sd_booted``)."""
    return Path("/run/systemd/system").is_dir()


def prepare_as(site: Site, account: Account, environment: Mapping[str, str]) -> int:
    """``./pacs prepare`` as the service's user, here, so that the first admin's password shows on
    this terminal (not in the journal) and every file is the user's from the start."""
    if not site.data.exists():
        site.data.mkdir(mode=0o700, parents=True)
        os.chown(site.data, account.uid, account.gid)
    env = {
        **os.environ,
        **environment,
        "PACS_DATA": str(site.data),
        "HOME": account.home,
        "USER": account.user,
    }
    return subprocess.call(
        [sys.executable, "-m", "control", "--data", str(site.data), "prepare"],
        cwd=REPOSITORY,
        env=env,
        user=account.uid,
        group=account.gid,
        extra_groups=os.getgrouplist(account.user, account.gid),
        umask=site.umask,
    )


# ---- what the units run -------------------------------------------------------------------------


def relay(name: str, log: Path, argv: list[str]) -> int:
    """Run ``argv``, copying its output both to the journal and to the rotating ``log``; return its
    exit code (128 + the signal that ended it, as a shell says)."""
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def pass_on(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, pass_on)
    assert child.stdout is not None  # a pipe, as asked
    copying = logs.relay(child.stdout, log, name, read_back=True)
    code = child.wait()
    copying.join()
    return code if code >= 0 else 128 - code


def wait_ready(site: Site, name: str, say: Callable[[str], None]) -> bool:
    """Wait until the process ``name`` answers, as the runner does before starting the next one."""
    prepared = stack.Prepared(site.load_settings(), configs.Topology.from_environment(site))
    found = {process.name: process for process in stack.processes(site, prepared)}
    if name not in found:
        say(f"no process {name!r}; the processes are {', '.join(found)}")
        return False
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if found[name].ready():
                return True
        time.sleep(0.2)
    say(f"{name} did not answer within {READY_TIMEOUT} s")
    return False
