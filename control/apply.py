"""Applying settings to the running portal without restarting it.

The web front's configuration is generated from the settings (control.configs) and handed to the
running Caddy through its admin API on a unix socket in the data directory (``POST /load``). Caddy
swaps configurations gracefully: requests in flight, such as a long zip download, finish on the
old one. If Caddy refuses the new configuration, it keeps serving the old one and the caller gets
Caddy's reason; the generated file is only replaced once Caddy has taken it.

Settings read by Orthanc (DICOM port, AE title, modalities) are written into its configuration file,
and Orthanc is told to read it again (``restart_archive``).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from control import configs, unixhttp
from control.orthanc import Orthanc, OrthancError, OrthancUnavailable
from control.site import Site

# Settings in Orthanc's own configuration file, applied by restarting it.
ARCHIVE_SETTINGS = frozenset({"dicom_port", "dicom_aet", "dicom_modalities", "dicom_store_from"})
# Settings that the running processes read only when they start.
NEXT_START_SETTINGS = frozenset({"orthanc_http_port"})


class ApplyError(RuntimeError):
    """The running portal refused the new configuration; the old one still serves."""


def caddy_socket(site: Site):
    return site.run / "caddy-admin.sock"


def web_front_running(site: Site) -> bool:
    return caddy_socket(site).exists()


def check_web_settings(site: Site, values: dict[str, Any]) -> None:
    """Have the running Caddy check the configuration for ``values`` without applying it.

    Raises ApplyError with Caddy's reason when it would refuse it. Does nothing when no Caddy runs.
    """
    text = configs.render_caddy(site, values, configs.Topology.from_environment(site))
    if web_front_running(site):
        try:
            status, body = unixhttp.request(
                caddy_socket(site),
                "POST",
                "/adapt",
                body=text.encode(),
                headers={"Content-Type": "text/caddyfile"},
            )
        except (FileNotFoundError, ConnectionRefusedError):
            return
        if status != 200:
            raise ApplyError(_caddy_reason(body))


def apply_later(app: Any, site: Site, values: dict[str, Any]) -> None:
    """Apply ``values`` to the web front once the current response has gone out.

    A page that changes the web front's configuration is itself a request in flight through Caddy:
    Caddy would cut it off when it swaps configurations under it. So the page checks the new
    configuration first (``check_web_settings``), answers, and the swap happens just after.
    """

    def swap() -> None:
        time.sleep(0.2)  # let Caddy pass the answer on before it swaps configurations
        try:
            apply_web_settings(site, values)
        except ApplyError as error:
            app.logger.error("The web front refused the new configuration: %s", error)

    def start() -> None:
        threading.Thread(target=swap, name="apply-settings", daemon=True).start()

    from flask import after_this_request

    @after_this_request
    def when_sent(response):
        response.call_on_close(start)
        return response


def apply_web_settings(site: Site, values: dict[str, Any]) -> bool:
    """Generate the web front's configuration for ``values`` and load it into the running Caddy.

    Returns whether a running Caddy took it (False: nothing runs; the file is written for the next
    start). Raises ApplyError when Caddy refuses it; the running configuration then stays as it was.
    """
    topology = configs.Topology.from_environment(site)
    text = configs.render_caddy(site, values, topology)
    loaded = False
    if web_front_running(site):
        try:
            status, body = unixhttp.request(
                caddy_socket(site),
                "POST",
                "/load",
                body=text.encode(),
                headers={"Content-Type": "text/caddyfile"},
                timeout=30,
            )
        except (FileNotFoundError, ConnectionRefusedError):
            status = None  # a socket left behind by a Caddy that is gone: nothing runs to apply to
        except OSError as error:
            raise ApplyError(f"the web front did not answer: {error}") from None
        if status is not None and status != 200:
            raise ApplyError(_caddy_reason(body))
        loaded = status == 200
    configs.write_private(site.run / "Caddyfile", text)
    return loaded


def _caddy_reason(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", body.decode(errors="replace")))
    except ValueError:
        return body.decode(errors="replace")[:500]


def restart_archive(site: Site, values: dict[str, Any]) -> bool:
    """Rewrite Orthanc's configuration and have Orthanc read it again; True when it did.

    Orthanc's ``POST /tools/reset`` restarts it in place with the configuration file read anew: the
    same call works whether Orthanc runs beside the portal or in a container of its own.
    """
    topology = configs.Topology.from_environment(site)
    configs.write_private(site.run / "orthanc.json", configs.render_orthanc(site, values, topology))
    orthanc = Orthanc(
        configs.orthanc_url(values, topology), site.secrets.orthanc_user, site.secrets.orthanc_password
    )
    try:
        orthanc.request("POST", "/tools/reset", timeout=30)
    except (OrthancUnavailable, OrthancError):
        return False
    return True
