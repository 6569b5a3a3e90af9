"""``./pacs service install``: systemd units that run the portal the way a server runs it.

The unit files are checked by systemd itself (``systemd-analyze verify``, which fails on a broken
one). systemd cannot run here (it is not this machine's init system), so ``StandInSystemd`` stands
in for it: a small, honest imitation that reads each unit's ``ExecStart``, ``ExecStartPost``,
``Environment``, ``EnvironmentFile``, ``WorkingDirectory``, ``UMask``, ``After``, ``Restart``,
``RestartSec`` and ``KillMode`` as systemd does, runs those commands and nothing else (no
``./pacs up``, no runner), gives each service's output a journal file of its own with
``JOURNAL_STREAM`` set, and starts a service again only when its ``Restart=`` says so. It does not
apply the sandbox (``ProtectSystem=`` ...) or ``User=``: the tests run as the user they run as.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from bench.stack import children
from control import db
from control import settings as site_settings
from control.runtime import configs, stack
from control.site import Site

from conftest import ADMIN_PASSWORD, Stack, c_store, fresh_study, make_stack

pytestmark = pytest.mark.stack

# systemd's own PATH for services (Debian).
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Signals after which a process counts as stopped cleanly (systemd.service, Restart=).
CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections, each key with all its values in order (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip()[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def words(line: str, *, command: bool = True) -> list[str]:
    """A unit file's line split as systemd splits it: quotes as in a shell, ``%%`` and ``$$``."""
    found = [word.replace("%%", "%") for word in shlex.split(line)]
    return [word.replace("$$", "$") for word in found] if command else found


def seconds(value: str) -> float:
    for suffix, factor in (("min", 60), ("ms", 0.001), ("s", 1)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


class StandInSystemd:
    """Starts a target's services as systemd would, supervises them by their ``Restart=`` alone."""

    def __init__(self, folder: Path, journal: Path) -> None:
        self.units = {
            path.name: parse_unit(path.read_text()) for path in folder.iterdir() if "." in path.name
        }
        self.journal = journal
        journal.mkdir(exist_ok=True)
        self.main: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {}
        self.started: dict[str, list[float]] = {}
        self.failed: set[str] = set()
        self.stopping = threading.Event()
        self.order: list[str] = []
        self.lock = threading.Lock()
        self.watcher = threading.Thread(target=self._watch, daemon=True)

    def service(self, name: str) -> dict[str, list[str]]:
        return self.units[name]["Service"]

    def _one(self, name: str, key: str, default: str = "") -> str:
        return self.service(name).get(key, [default])[-1]

    def environment(self, name: str) -> dict[str, str]:
        """What systemd gives a service: its PATH, the user's names, Environment=, EnvironmentFile=."""
        user = pwd.getpwnam(self._one(name, "User", pwd.getpwuid(os.getuid()).pw_name))
        env = {"PATH": SYSTEMD_PATH, "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name}
        for line in self.service(name).get("Environment", []):
            env.update(word.split("=", 1) for word in words(line, command=False))
        for line in self.service(name).get("EnvironmentFile", []):
            path = Path(line.removeprefix("-"))
            if path.exists() or not line.startswith("-"):
                for entry in path.read_text().splitlines():
                    if entry.strip() and not entry.startswith("#"):
                        key, _, value = entry.partition("=")
                        env[key] = "".join(shlex.split(value))
        journal = self.journal / f"{name}.log"
        journal.touch()
        env["JOURNAL_STREAM"] = f"{journal.stat().st_dev}:{journal.stat().st_ino}"
        return env

    def _run(self, name: str, line: str, **options) -> subprocess.Popen:
        with (self.journal / f"{name}.log").open("ab") as journal:
            return subprocess.Popen(
                words(line),
                cwd=self._one(name, "WorkingDirectory", "/"),
                env=self.environment(name),
                umask=int(self._one(name, "UMask", "0022"), 8),
                stdin=subprocess.DEVNULL,
                stdout=journal,
                stderr=subprocess.STDOUT,
                # A process group of its own stands in for the unit's control group.
                start_new_session=True,
                **options,
            )

    def _start(self, name: str) -> None:
        if self._one(name, "Type", "simple") == "oneshot":
            for line in self.service(name)["ExecStart"]:
                assert self._run(name, line).wait() == 0, f"{name} failed:\n{self.journal_of(name)}"
            return
        self.started.setdefault(name, []).append(time.monotonic())
        self.main[name] = self._run(name, self.service(name)["ExecStart"][0])
        timeout = seconds(self._one(name, "TimeoutStartSec", "90s"))
        for line in self.service(name).get("ExecStartPost", []):
            code = self._run(name, line).wait(timeout)
            assert code == 0, f"{name}: ExecStartPost failed:\n{self.journal_of(name)}"

    def start(self, target: str) -> None:
        """Start what ``target`` wants, each unit after those its ``After=`` names."""
        wanted = self.units[target]["Unit"]["Wants"][0].split()
        while len(self.order) < len(wanted):
            for name in wanted:
                after = " ".join(self.units[name]["Unit"].get("After", [])).split()
                if name not in self.order and all(unit in self.order for unit in after if unit in wanted):
                    self._start(name)
                    self.order.append(name)
                    break
            else:
                raise AssertionError(f"no order satisfies After= of {wanted}")
        self.watcher.start()

    def _watch(self) -> None:
        """Restart=on-failure: a service that ends with an error or a signal other than a stop's
        starts again after RestartSec, unless it started StartLimitBurst times within
        StartLimitIntervalSec; any other Restart= (or none) leaves it stopped."""
        while not self.stopping.wait(0.2):
            for name, process in list(self.main.items()):
                code = process.poll()
                if code is None or name in self.failed:
                    continue
                with self.lock:
                    if self.stopping.is_set():
                        return
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)  # what is left of its control group
                    failure = code > 0 or (code < 0 and -code not in CLEAN_SIGNALS)
                    unit = self.units[name]["Unit"]
                    window = seconds(unit.get("StartLimitIntervalSec", ["10s"])[-1])
                    burst = int(unit.get("StartLimitBurst", ["5"])[-1])
                    recent = [t for t in self.started[name] if time.monotonic() - t < window]
                    if (
                        self._one(name, "Restart", "no") != "on-failure"
                        or not failure
                        or len(recent) >= burst
                    ):
                        self.failed.add(name)
                        continue
                    time.sleep(seconds(self._one(name, "RestartSec", "100ms")))
                    self.restarts[name] = self.restarts.get(name, 0) + 1
                    self._start(name)

    def stop(self) -> None:
        """Stop the services in the reverse order: SIGTERM (to the main process alone with
        KillMode=mixed), then SIGKILL to whatever is left after TimeoutStopSec."""
        with self.lock:
            self.stopping.set()
        for name in reversed(self.order):
            process = self.main.get(name)
            if process is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                if self._one(name, "KillMode", "control-group") == "mixed":
                    process.send_signal(signal.SIGTERM)
                else:
                    os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(seconds(self._one(name, "TimeoutStopSec", "90s")))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def journal_of(self, name: str) -> str:
        return (self.journal / f"{name}.log").read_text(errors="replace")

    def pid(self, name: str) -> int:
        return self.main[name].pid


def verify(folder: Path) -> subprocess.CompletedProcess:
    """``systemd-analyze verify`` on every unit file of ``folder``."""
    names = sorted(f"./{path.name}" for path in folder.iterdir() if path.suffix in (".service", ".target"))
    return subprocess.run(
        ["systemd-analyze", "verify", *names], cwd=folder, capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """A new installation, prepared as ``./pacs service install`` prepares it (its admin made)."""
    made = make_stack(tmp_path_factory.mktemp("service") / "data")
    prepared = made.pacs("prepare")
    assert prepared.returncode == 0, prepared.stderr
    return made


@pytest.fixture(scope="module")
def units(portal: Stack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("units")
    user = pwd.getpwuid(os.getuid()).pw_name
    done = portal.pacs("service", "install", "--directory", str(folder), "--user", user)
    assert done.returncode == 0, done.stderr
    assert "pacs.target" in done.stdout and "pacs-orthanc.service" in done.stdout
    return folder


@pytest.fixture(scope="module")
def running(portal: Stack, units: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandInSystemd]:
    init = StandInSystemd(units, tmp_path_factory.mktemp("journal"))
    try:
        init.start("pacs.target")
        yield init
    finally:
        init.stop()


def test_systemd_accepts_the_units_and_refuses_a_broken_one(units: Path, tmp_path: Path) -> None:
    checked = verify(units)
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr
    # The check is able to fail: a mistyped restart policy and an unquoted command are caught.
    for name in ("pacs.target", "pacs-orthanc.service"):
        (tmp_path / name).write_text((units / name).read_text())
    broken = tmp_path / "pacs-orthanc.service"
    broken.write_text(broken.read_text().replace("Restart=on-failure", "Restart=on-failures"))
    assert "pacs-orthanc.service" in verify(tmp_path).stderr
    broken.write_text(broken.read_text().replace("ExecStart=", 'ExecStart="', 1))
    assert verify(tmp_path).returncode != 0


def test_every_process_of_the_stack_has_its_unit(portal: Stack, units: Path) -> None:
    site = Site(portal.data)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in portal.env.items():
            patch.setenv(name, value)
        prepared = stack.Prepared(site_settings.first_run_values(), configs.Topology.from_environment(site))
        processes = stack.processes(site, prepared)
    target = parse_unit((units / "pacs.target").read_text())
    assert target["Install"]["WantedBy"] == ["multi-user.target"]
    wanted = target["Unit"]["Wants"][0].split()
    assert wanted == ["pacs-prepare.service", *(f"pacs-{process.name}.service" for process in processes)]
    for process in processes:
        unit = parse_unit((units / f"pacs-{process.name}.service").read_text())
        command = words(unit["Service"]["ExecStart"][0])
        # Orthanc runs through the relay that keeps its log file; the command after "--" is its own.
        own = command[command.index("--") + 1 :] if process.read_back else command
        assert own == [shutil.which(process.argv[0]), *process.argv[1:]]
        assert unit["Service"]["UMask"] == [f"{process.umask:04o}"]
        environment = dict(
            word.split("=", 1) for line in unit["Service"]["Environment"] for word in words(line)
        )
        assert environment == {
            "PACS_DATA": str(portal.data),
            "PYTHONPATH": environment["PYTHONPATH"],
            **process.env,
        }
        assert unit["Service"]["Restart"] == ["on-failure"]
        assert unit["Service"]["ProtectSystem"] == ["strict"]
        assert unit["Service"]["ReadWritePaths"][0].split()[0] == str(portal.data)
    # The archive starts before the control plane, the control plane before Caddy.
    afters = {name: parse_unit((units / name).read_text())["Unit"].get("After", [""])[0] for name in wanted}
    assert afters["pacs-control.service"] == "pacs-orthanc.service"
    assert afters["pacs-caddy.service"] == "pacs-catalog.service"
    # Secrets and settings of the environment are in the root-only environment file, not the units.
    assert (units / "pacs.env").stat().st_mode & 0o077 == 0
    kept = (units / "pacs.env").read_text()
    assert f'PACS_WEB_PORT="{portal.web_port}"' in kept and "PACS_ADMIN_PASSWORD" not in kept


def test_a_portal_of_several_nodes_has_a_unit_for_each_node_and_control_plane(tmp_path: Path) -> None:
    # What ./pacs up --nodes 2 records for later starts: the units follow it.
    made = make_stack(tmp_path / "data")
    site = Site(made.data)
    site.run.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in made.env.items():
            patch.setenv(name, value)
        topology = configs.Topology.from_environment(site)
    configs.write_running_topology(site, dataclasses.replace(topology, nodes=2, archive_index="postgresql"))
    folder = tmp_path / "units"
    user = pwd.getpwuid(os.getuid()).pw_name
    done = made.pacs("service", "install", "--directory", str(folder), "--user", user)
    assert done.returncode == 0, done.stderr
    wanted = parse_unit((folder / "pacs.target").read_text())["Unit"]["Wants"][0].split()
    assert wanted == [
        "pacs-prepare.service",
        *(
            f"pacs-{name}.service"
            for name in ("orthanc", "orthanc-2", "control", "control-2", "catalog", "caddy")
        ),
    ]
    second = parse_unit((folder / "pacs-orthanc-2.service").read_text())["Service"]
    command = words(second["ExecStart"][0])
    # The second node runs its own configuration, and keeps its own log, which the watcher reads.
    assert command[-1] == str(made.data / "run" / "orthanc-2.json")
    assert command[command.index("--log") + 1] == str(made.data / "logs" / "orthanc-2.log")
    assert second["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    plane = parse_unit((folder / "pacs-control-2.service").read_text())
    assert plane["Unit"]["After"] == ["pacs-control.service"]
    command = words(plane["Service"]["ExecStart"][0])
    assert command[command.index("--bind") + 1] == f"unix:{made.data / 'run' / 'control-2.sock'}"
    assert any("PACS_CONTROL_PLANE=2" in words(line) for line in plane["Service"]["Environment"])
    checked = verify(folder)
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr


def stranger_find(portal: Stack) -> bool:
    """A C-FIND from an unregistered AE title on another address; True when the archive let it in."""
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ""
    association = ae.associate(
        "127.0.0.1", portal.dicom_port, ae_title=portal.aet, bind_address=("127.0.0.7", 0)
    )
    try:
        return association.is_established and all(
            status and status.Status in (0, 0xFF00, 0xFF01)
            for status, _ in association.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        )
    finally:
        if association.is_established:
            association.release()


def refused_calls(portal: Stack, wanted: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        with Site(portal.data).engine.connect() as connection:
            count = connection.execute(
                sa.select(sa.func.count()).where(
                    db.activity.c.action == "dicom-refused", db.activity.c.client_address == "127.0.0.7"
                )
            ).scalar_one()
        if count >= wanted or time.monotonic() > deadline:
            return count
        time.sleep(0.5)


def wait_until_answers(url: str, timeout: float = 90) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(requests.RequestException):
            answer = requests.get(url, timeout=5)
            if answer.status_code == 200:
                return answer
        assert time.monotonic() < deadline, f"{url} did not answer"
        time.sleep(0.5)


def archive_starts(portal: Stack) -> int:
    return (portal.data / "logs" / "orthanc.log").read_text(errors="replace").count("Orthanc has started")


def test_the_units_run_the_portal(portal: Stack, running: StandInSystemd) -> None:
    landing = requests.get(f"{portal.url}/", timeout=10)
    assert landing.status_code == 200 and "St. Test Hospital" in landing.text
    signed_in = portal.sign_in("admin", ADMIN_PASSWORD)
    assert signed_in.get(f"{portal.url}/healthz").json()["status"] == "ok"

    study = fresh_study("CT_small.dcm")
    assert c_store(portal, study) == 0
    found = requests.post(
        f"{portal.orthanc_url}/tools/lookup",
        data=study.StudyInstanceUID,
        auth=portal.orthanc_auth,
        timeout=10,
    ).json()
    assert [item["Type"] for item in found] == ["Study"]

    # The logs are in the journal; Orthanc's also in logs/orthanc.log, where the archive watcher
    # finds the calls it refused and records them in the activity log.
    assert "Orthanc has started" in running.journal_of("pacs-orthanc.service")
    assert "Booting worker" in running.journal_of("pacs-control.service")
    assert not (portal.data / "logs" / "control.log").exists()
    assert not stranger_find(portal)
    assert refused_calls(portal, 1) == 1
    assert "Rejected Find request" in (portal.data / "logs" / "orthanc.log").read_text()


def test_systemd_starts_a_killed_process_again(portal: Stack, running: StandInSystemd) -> None:
    """The restart is the init system's: nothing of the portal's own runner is there to do it."""
    assert not (portal.data / "run" / "pacs.pid").exists()
    starts = archive_starts(portal)
    refused = refused_calls(portal, 0)
    relay = running.pid("pacs-orthanc.service")
    (orthanc,) = children(relay)
    os.kill(orthanc, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while running.restarts.get("pacs-orthanc.service", 0) < 1 or archive_starts(portal) == starts:
        assert time.monotonic() < deadline, "the archive did not come back"
        time.sleep(0.5)
    portal.wait_for_archive()
    assert running.pid("pacs-orthanc.service") != relay
    assert c_store(portal, fresh_study("CT_small.dcm")) == 0
    # Its log goes on in the file: the watcher still sees what it refuses.
    assert not stranger_find(portal)
    assert refused_calls(portal, refused + 1) == refused + 1

    caddy = running.pid("pacs-caddy.service")
    os.kill(caddy, signal.SIGKILL)
    wait_until_answers(f"{portal.url}/")
    assert running.pid("pacs-caddy.service") != caddy and running.restarts["pacs-caddy.service"] == 1


def test_installing_into_the_system_needs_root_and_names_the_next_commands(portal: Stack) -> None:
    shown = portal.pacs("service", "install", "--print", "--user", pwd.getpwuid(os.getuid()).pw_name)
    assert shown.returncode == 0, shown.stderr
    assert "# /etc/systemd/system/pacs-caddy.service" in shown.stdout
    # Run by someone other than root (the tests may run as root: then by nobody).
    refused = portal.pacs("service", "install", **({"user": "nobody"} if os.geteuid() == 0 else {}))
    assert refused.returncode == 1 and "needs root: sudo ./pacs service install" in refused.stderr
    assert not list(Path("/etc/systemd/system").glob("pacs*"))
    no_one = portal.pacs("service", "install", "--print", "--user", "no-such-user-" + generate_uid()[-6:])
    assert no_one.returncode == 1 and "there is no user" in no_one.stderr
