"""HTTP over a unix socket: how the portal talks to gunicorn's socket and Caddy's admin API."""

from __future__ import annotations

import http.client
import socket
from pathlib import Path


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def request(
    path: Path,
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 3,
) -> tuple[int, bytes]:
    """Send one request to the server listening on the unix socket ``path``; return status and body."""
    connection = _UnixConnection(str(path), timeout)
    try:
        # An empty Host: Caddy's admin API on a unix socket accepts no other (gunicorn takes any).
        connection.request(method, url, body=body, headers={"Host": "", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
