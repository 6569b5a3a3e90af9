"""Where this portal is reachable: its addresses and the fully qualified links built on them."""

from __future__ import annotations

import errno
import os
import socket

from control.settings import SiteSettings


def local_address() -> str:
    """The address other machines on the local network reach this one at, best effort."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            # Connecting a UDP socket sends nothing; it only picks the outgoing interface.
            probe.connect(("10.255.255.255", 1))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def public_origin(settings: SiteSettings) -> str:
    """``scheme://host:port`` of the portal as the outside world reaches it.

    The host is the web server name, else the internet address, else this machine's address; the
    scheme is https when SSL is on. Built from the settings alone, so a link made from a page opened
    on a local address, or from a shell, still works for a patient at home.
    """
    host = settings.web_server_name or settings.public_address or local_address()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    scheme = "https" if settings.ssl_enabled else "http"
    # Behind a port mapping (compose.yaml) the outside world uses another port than Caddy's own.
    port = os.environ.get("PACS_PUBLIC_WEB_PORT") or settings.web_port
    return f"{scheme}://{host}:{port}"


def token_link(settings: SiteSettings, token: str) -> str:
    """The fully qualified link a patient opens: ``{origin}/token?{token}``."""
    return f"{public_origin(settings)}/token?{token}"


def port_is_free(port: int) -> bool:
    """Whether a listener of this machine could take ``port`` on every address now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))  # noqa: S104 - the listeners bind there too
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True
