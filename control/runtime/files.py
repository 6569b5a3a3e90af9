"""The names in the data directory's ``run/``, spelled once.

The runner, the systemd units, the commands and the web app find each other by these files: the
sockets Caddy and the control planes listen on, the pid files of the runner and of each process,
the marker of a portal that is up, and the configurations rendered for Caddy.
"""

from __future__ import annotations

from pathlib import Path

from control.site import Site

RUNNER = "pacs"  # the runner's own pid file is pacs.pid; each process's is its name's


def caddy_admin_socket(site: Site) -> Path:
    """Caddy's admin API: configurations are loaded through it, never over TCP."""
    return site.run / "caddy-admin.sock"


def control_socket(site: Site, number: int = 1) -> Path:
    """The unix socket of the control plane ``number`` on this machine (``control.sock`` first)."""
    return site.run / ("control.sock" if number == 1 else f"control-{number}.sock")


def caddyfile(site: Site) -> Path:
    """The web front's configuration, as last rendered from the settings."""
    return site.run / "Caddyfile"


def pid_file(site: Site, process: str) -> Path:
    """The pid file of ``process`` (a name of the stack's, or ``RUNNER``)."""
    return site.run / f"{process}.pid"


def pid_files(site: Site) -> list[Path]:
    """Every pid file there is, the runner's included."""
    return sorted(site.run.glob("*.pid"))


def ready(site: Site) -> Path:
    """Written once every process answers; a detached ``./pacs up`` waits for it."""
    return site.run / "ready"
