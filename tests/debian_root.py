"""A fresh Debian machine for tests: a minimal root file system made with debootstrap, used by chroot.

``DebianRoot(release, cache)`` unpacks Debian's minimal base system (``debootstrap --variant=minbase``,
the same tarball the compose test imports as its base image, made once per machine and kept in the
cache) into a new folder, copies in the repository as a fresh clone holds it (the files git tracks,
as they are in the working tree), and runs commands inside with ``chroot``. Nothing else from this
machine is there: no packages beyond the base system, no virtual environment, no viewer.

What a chroot lacks of a machine is provided, and only that:

- ``/proc``, ``/sys``, ``/dev`` (with ``/dev/pts`` and its own ``/dev/shm``) are mounted.
- ``/etc/resolv.conf`` is this machine's, and the certificate authorities this machine adds to
  Debian's (``/usr/local/share/ca-certificates``, for a network whose proxy inspects TLS) wait in the
  root's own folder of them, where Debian's ``ca-certificates`` takes them in when it is installed.
- There is no init system: ``policy-rc.d`` tells package scripts not to start services, which
  would otherwise run on this machine's network (a chroot shares it) and take its ports 80, 4242,
  8042. dpkg skips its fsync calls (``force-unsafe-io``), as in Debian's own container images.
- Downloads are cached between runs on one machine (in ``CACHE/fresh-machine/RELEASE``: Debian's
  packages, pip's wheels, npm's tarballs): every install step still runs, it only fetches less.

Processes started inside are recognised by their root folder (``/proc/PID/root``) and are stopped
when the root is removed; the mounts are undone before anything is deleted.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.processes import log_tail

from dockerd import _mounts_under, debian_base_tarball

REPOSITORY = Path(__file__).resolve().parent.parent
INSIDE = Path("/srv/pacs")
"""Where the repository is copied inside the root: a path a site might use."""
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The network's settings reach the root; nothing of this machine's installation does.
PASSED_ON = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
DOWNLOAD_CACHES = {
    "apt": Path("var/cache/apt/archives"),
    "pip": Path("root/.cache/pip"),
    "npm": Path("root/.npm"),
}


class RootError(RuntimeError):
    """A command inside the root failed; the message carries the end of its output."""


@dataclass
class Timings:
    """How long each part took, in order, for the test's report."""

    parts: list[tuple[str, float]] = field(default_factory=list)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.parts.append((name, time.monotonic() - started))

    def add(self, name: str, seconds: float) -> None:
        self.parts.append((name, seconds))

    def report(self, title: str) -> str:
        width = max(len(name) for name, _ in self.parts)
        lines = [f"{name:<{width}}  {seconds:6.0f} s" for name, seconds in self.parts]
        return "\n".join([title, *lines])


class DebianRoot:
    """A minimal Debian ``release`` in a new folder, with the repository in ``/srv/pacs``."""

    def __init__(self, release: str, cache: Path) -> None:
        self.release = release
        self.cache = cache
        self.downloads = cache / "fresh-machine" / release
        self.path = Path(tempfile.mkdtemp(prefix=f"pacs-fresh-{release}-"))
        self.logs = self.path.with_name(self.path.name + "-logs")
        self.logs.mkdir()

    @property
    def repository(self) -> Path:
        """The repository's copy, seen from outside."""
        return self.path / INSIDE.relative_to("/")

    def make(self, timings: Timings) -> None:
        """Unpack the base system (made with debootstrap first if the cache lacks it), prepare what a
        chroot lacks, and copy the repository in."""
        with timings.part(f"base system ({self.release}, debootstrap, or the cached tarball)"):
            tarball = debian_base_tarball(self.cache / "docker", self.release)
        with timings.part("base system unpacked"):
            subprocess.run(["tar", "-C", str(self.path), "-x", "-f", str(tarball)], check=True)
            # A system's root folder is open to every user (the postgres user's initdb, say).
            self.path.chmod(0o755)
        self._stand_in_for_a_machine()
        with timings.part("repository copied (git's files)"):
            self._copy_repository()

    def _stand_in_for_a_machine(self) -> None:
        root = self.path
        shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
        authorities = root / "usr/local/share/ca-certificates"
        authorities.mkdir(parents=True, exist_ok=True)
        for certificate in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copyfile(certificate, authorities / certificate.name)
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\n# No init system here: package scripts start no service.\nexit 101\n")
        policy.chmod(0o755)
        (root / "etc/dpkg/dpkg.cfg.d/unsafe-io").write_text("force-unsafe-io\n")
        self._mount("proc", "proc", "-t", "proc")
        self._mount("sysfs", "sys", "-t", "sysfs", "-o", "ro")
        self._mount("/dev", "dev", "--bind")
        self._mount("/dev/pts", "dev/pts", "--bind")
        self._mount("tmpfs", "dev/shm", "-t", "tmpfs", "-o", "mode=1777")
        for name, inside in DOWNLOAD_CACHES.items():
            kept = self.downloads / name
            kept.mkdir(parents=True, exist_ok=True)
            self._mount(str(kept), str(inside), "--bind")

    def _mount(self, source: str, inside: str, *options: str) -> None:
        target = self.path / inside
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", *options, source, str(target)], check=True, capture_output=True)

    def _copy_repository(self) -> None:
        """The files git tracks, with their working-tree content: what a clone of this tree holds."""
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPOSITORY, capture_output=True, check=True
        ).stdout.split(b"\0")
        for name in filter(None, listed):
            source = REPOSITORY / os.fsdecode(name)
            if not source.exists():
                continue  # deleted in the working tree, not yet in git
            target = self.repository / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target, follow_symlinks=False)

    def run(
        self,
        command: str,
        log_name: str,
        *,
        env: dict[str, str] | None = None,
        timeout: float,
        on_line: Callable[[str], None] = lambda line: None,
    ) -> str:
        """Run a shell ``command`` in the repository's copy as root, with a clean environment plus
        ``env``; its output (also in ``log_name`` under ``logs``). ``on_line`` sees each line as it
        comes. Raises RootError when it fails or outlives ``timeout`` seconds."""
        environment = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb"}
        environment.update({name: os.environ[name] for name in PASSED_ON if name in os.environ})
        environment.update(env or {})
        argv = [
            "chroot", str(self.path), "/usr/bin/env", "-i",
            *(f"{name}={value}" for name, value in environment.items()),
            "/bin/bash", "-c", f"cd {INSIDE} && {command}",
        ]  # fmt: skip
        log = self.logs / log_name
        lines: list[str] = []
        started = time.monotonic()
        with (
            log.open("w") as output,
            subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
            ) as process,
        ):
            assert process.stdout is not None
            timer = threading.Timer(timeout, process.kill)
            timer.start()
            try:
                for line in process.stdout:
                    output.write(line)
                    output.flush()
                    lines.append(line)
                    on_line(line)
                code = process.wait()
            finally:
                timer.cancel()
        if code != 0:
            elapsed = time.monotonic() - started
            what = f"was stopped after {elapsed:.0f} s" if elapsed >= timeout else f"failed (exit {code})"
            raise RootError(f"{command} {what} in the {self.release} root; its output ends:\n{log_tail(log)}")
        return "".join(lines)

    def read(self, inside: str) -> str:
        """A file of the root, by its path inside."""
        return (self.path / inside.lstrip("/")).read_text()

    def processes(self) -> list[tuple[int, str]]:
        """The processes running inside this root: pid and command line."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "root") == str(self.path):
                    command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    found.append((int(entry.name), command.strip()))
        return found

    def remove(self) -> None:
        """Stop what still runs inside, undo the mounts, delete the root (and keep nothing of it)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid, _command in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
        for point in _mounts_under(self.path):
            subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
        left = _mounts_under(self.path)
        if left:
            # Deleting through a bind mount of /dev would delete this machine's own files.
            raise RootError(f"could not unmount {shlex.join(left)}; {self.path} is left as it is")
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.rmtree(self.logs, ignore_errors=True)
