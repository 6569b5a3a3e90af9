"""A private Docker engine for tests, and a Debian base image made without any image registry.

``DockerEngine`` starts ``dockerd`` as root with every folder of its own (data root, exec root, pid
file, API socket) in a new temporary folder outside the repository, so that it neither meets a
Docker engine the machine may run nor lands in a build context. Stopping it stops what it ran,
kills what is left of its processes, unmounts and deletes its folders, deletes the network
bridges it made and puts back the packet filter rules it found: the machine is left as it was.

``debian_base_tarball`` makes the root file system of a Debian release (``debian:trixie-slim``,
``debian:bookworm-slim``) with debootstrap (from Debian's default mirror) and keeps it in a cache
folder, so only the first run on a machine pays for it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench import processes
from bench.processes import log_tail

BASE_TARBALL_MAX_AGE = 30 * 24 * 3600
"""A cached base older than this (seconds) is made again, so its packages do not grow stale."""

FIREWALL_TABLES_DOCKER_CHANGES = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}
"""The iptables tables dockerd adds rules to, with their built-in chains."""


class DockerError(RuntimeError):
    """The engine could not start, or a docker command failed; the message carries the logs."""


def require_programs(*names: str) -> dict[str, str]:
    """The full path of each program, or a DockerError naming the missing ones and their packages."""
    found = {name: shutil.which(name) for name in names}
    missing = [name for name, path in found.items() if not path]
    if missing:
        raise DockerError(
            f"missing programs: {', '.join(missing)}; they come with Debian's docker.io, docker-compose, "
            "debootstrap and iproute2 packages, which ./pacs test installs"
        )
    return {name: str(path) for name, path in found.items()}


def run_logged(
    argv: Sequence[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float,
    show: Callable[[str], bool] = lambda line: False,
) -> None:
    """Run a long command with its output in ``log``, printing the lines ``show`` picks as progress.

    Raises DockerError with the log's tail when the command fails or outlives ``timeout`` seconds.
    """
    started = time.monotonic()
    with (
        log.open("w") as output,
        subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            text=True,
            errors="replace",
        ) as process,
    ):
        assert process.stdout is not None
        # Reading line by line cannot time out by itself: a timer kills a command that hangs.
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            for line in process.stdout:
                output.write(line)
                if show(line):
                    print(f"  [{time.monotonic() - started:4.0f} s] {line.rstrip()}", flush=True)
            code = process.wait()
        finally:
            timer.cancel()
    if code != 0:
        elapsed = time.monotonic() - started
        reason = (
            f"was stopped after {elapsed:.0f} s" if elapsed >= timeout else f"failed with exit code {code}"
        )
        raise DockerError(f"{shlex.join(argv)} {reason}:\n{log_tail(log)}")


def _mounts_under(folder: Path) -> list[str]:
    """Mount points at or below ``folder``, deepest first."""
    prefix = str(folder.resolve())
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for entry in mountinfo:
            # Field 5 is the mount point, with spaces and such escaped as octal.
            point = entry.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def remove_tree(folder: Path) -> None:
    """Unmount whatever is still mounted below ``folder`` (overlays, chroot /proc), then delete it."""
    for point in _mounts_under(folder):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def _network_interfaces() -> set[str]:
    return set(os.listdir("/sys/class/net"))


class DockerEngine:
    """``dockerd`` run as root from a temporary folder of its own; use as a context manager."""

    def __init__(self) -> None:
        programs = require_programs("dockerd", "docker", "ip")
        self.dockerd, self.docker_program, self.ip = programs["dockerd"], programs["docker"], programs["ip"]
        self.root = Path(tempfile.mkdtemp(prefix="pacs-dockerd-"))
        self.socket = self.root / "docker.sock"
        self.log = self.root / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._interfaces_before: set[str] = set()
        self._firewall_before: str | None = None
        self._ip_forward_before: str | None = None

    def __enter__(self) -> DockerEngine:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """The environment of a docker client that talks to this engine and no other."""
        env = {name: value for name, value in os.environ.items() if not name.startswith("DOCKER_")}
        env["DOCKER_HOST"] = f"unix://{self.socket}"
        return env

    def start(self, timeout: float = 60) -> None:
        """Start dockerd and wait until ``docker info`` answers."""
        self._interfaces_before = _network_interfaces()
        self._save_firewall()
        self.process = processes.start_logged(
            [
                self.dockerd,
                "--data-root", str(self.root / "data"),
                "--exec-root", str(self.root / "exec"),
                "--pidfile", str(self.root / "dockerd.pid"),
                "-H", f"unix://{self.socket}",
            ],
            self.log,
            start_new_session=True,
        )  # fmt: skip

        refusal = [""]

        def answers() -> bool:
            probe = subprocess.run(
                [self.docker_program, "info", "--format", "{{.ServerVersion}}"],
                env=self.env,
                capture_output=True,
                text=True,
                check=False,
            )
            refusal[0] = probe.stderr.strip()
            return probe.returncode == 0

        processes.wait_until_ready(
            self.process,
            answers,
            "dockerd",
            timeout=timeout,
            details=lambda: f"({refusal[0]})\n{log_tail(self.log)}",
            failure=DockerError,
            interval=0.5,
        )

    def docker(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run one docker command against this engine; a failure raises DockerError with its output."""
        result = subprocess.run(
            [self.docker_program, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise DockerError(
                f"docker {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def import_base_image(self, tarball: Path, tag: str) -> None:
        """Import a root file system tarball as image ``tag``, with a shell as its command."""
        self.docker("import", "--change", 'CMD ["bash"]', str(tarball), tag, timeout=300)

    def stop(self, timeout: float = 60) -> None:
        """Stop the engine and undo what it did to the machine; safe to call more than once."""
        if self.process and self.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                # Containers first, so that no stop timeout or restart policy holds up dockerd's exit.
                containers = self.docker("ps", "--all", "--quiet", check=False, timeout=30).stdout.split()
                if containers:
                    self.docker("rm", "--force", "--volumes", *containers, check=False, timeout=timeout)
        # dockerd stops its containerd, then exits.
        processes.stop(self.process, timeout=timeout)
        for pid in self._leftover_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in _network_interfaces() - self._interfaces_before:
            if name == "docker0" or name.startswith("br-"):
                subprocess.run([self.ip, "link", "delete", name], check=False, capture_output=True)
        self._restore_firewall()
        remove_tree(self.root)

    def _leftover_processes(self) -> Iterator[int]:
        """Processes started for this engine (containerd, shims) that outlived dockerd.

        Each has this engine's private folder on its command line, which nothing else has.
        """
        marker = str(self.root).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    yield int(entry.name)

    def _save_firewall(self) -> None:
        """Remember the packet filter rules and IP forwarding, which dockerd changes and leaves behind."""
        with contextlib.suppress(OSError):
            self._ip_forward_before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
        if shutil.which("iptables-save"):
            saved = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False)
            if saved.returncode == 0:
                self._firewall_before = saved.stdout

    def _restore_firewall(self) -> None:
        if self._firewall_before is not None:
            # A table absent before is restored as empty, with the kernel's default policies.
            restore = self._firewall_before
            for table, chains in FIREWALL_TABLES_DOCKER_CHANGES.items():
                if f"*{table}\n" not in restore:
                    restore += (
                        f"*{table}\n" + "".join(f":{chain} ACCEPT [0:0]\n" for chain in chains) + "COMMIT\n"
                    )
            subprocess.run(["iptables-restore"], input=restore, text=True, capture_output=True, check=False)
            self._firewall_before = None
        if self._ip_forward_before is not None:
            with contextlib.suppress(OSError):
                Path("/proc/sys/net/ipv4/ip_forward").write_text(self._ip_forward_before)
            self._ip_forward_before = None


def debian_base_tarball(cache: Path, suite: str = "bookworm") -> Path:
    """A root file system of Debian ``suite`` (minbase) as a tarball in ``cache``, made when missing.

    debootstrap takes about half a minute and downloads about 50 MB; the tarball (about 200 MB) is
    kept and made again once it is older than BASE_TARBALL_MAX_AGE.
    """
    tarball = cache / f"debian-{suite}-minbase.tar"
    if tarball.exists() and time.time() - tarball.stat().st_mtime < BASE_TARBALL_MAX_AGE:
        return tarball
    debootstrap = require_programs("debootstrap")["debootstrap"]
    cache.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f"pacs-debootstrap-{suite}-"))
    target.chmod(0o755)  # the root folder of a system, which the tarball's "." carries
    try:
        run_logged(
            [debootstrap, "--variant=minbase", suite, str(target)],
            cache / f"debootstrap-{suite}.log",
            timeout=600,
            show=lambda line: line.startswith("I: Base system installed"),
        )
        partial = tarball.with_name(tarball.name + ".partial")
        subprocess.run(["tar", "-C", str(target), "-c", "-f", str(partial), "."], check=True)
        partial.replace(tarball)
    finally:
        remove_tree(target)
    return tarball
