"""Orthanc's DICOMweb answers passed on to the client as they arrive, by the control plane.

Most DICOMweb bytes flow Orthanc → Caddy without Python. The few that pass through the control
plane (signed-in users' searches, frames the core cannot give as the plugin does, and the frames
it can, wrapped; whole studies and series) are streamed with the same pieces: ``Answer`` is what
the WSGI layer sends back, ``Relayed`` its body, read from an open urllib3 answer in
``STREAM_CHUNK`` blocks.

An answer the archive breaks off must reach the client broken, never as a shorter answer that
looks whole. Orthanc gives most answers a ``Content-Length``, which urllib3 holds it to (a short
body raises). Whole studies and series (multipart WADO-RS) it streams with neither a length nor
chunks, ending them by closing the connection, so an early close looks like the end: those are
checked for the multipart's closing delimiter, and made whole in a temporary file before they are
sent with their length (``control.spooling`` says why); a cut one then gets a clear 503. Either
way ``Relayed`` raises ``BrokenOff``, and the server breaks the client's answer off in turn.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import urllib3

from control import spooling
from control.orthanc import STREAM_CHUNK, ArchiveClient

# Headers of Orthanc's answer that describe the body and go back to the client.
PASSED_BACK = ("Content-Type", "Content-Length", "Content-Disposition", "ETag", "Last-Modified")
log = logging.getLogger(__name__)
_BOUNDARY = re.compile(r'boundary="?([^";,]+)"?', re.IGNORECASE)


class BrokenOff(RuntimeError):
    """The archive's answer ended before its end (Orthanc went away midway)."""


@dataclass
class Answer:
    """What goes back to the client: status, headers and a body read as it is sent."""

    status: str
    headers: list[tuple[str, str]]
    body: Iterable[bytes]


class Relayed:
    """A WSGI body read from an open upstream answer, with what comes before and after it.

    The server calls ``close`` whether or not the body was read to its end (PEP 3333): a client
    gone midway leaves bytes unread on the connection, which is then closed rather than given back
    to the pool for the next request.
    """

    def __init__(self, upstream: urllib3.BaseHTTPResponse, head: bytes = b"", tail: bytes = b"") -> None:
        self.upstream = upstream
        self.head = head
        self.tail = tail
        self.complete = False
        self.closing_delimiter = _closing_delimiter(upstream)

    def __iter__(self) -> Iterator[bytes]:
        if self.head:
            yield self.head
        last = b""
        try:
            for chunk in self.upstream.stream(STREAM_CHUNK, decode_content=False):
                if self.closing_delimiter:
                    last = (last + chunk[-256:])[-256:]
                yield chunk
        except urllib3.exceptions.HTTPError as error:
            raise BrokenOff(f"the archive's answer broke off: {error}") from None
        if self.closing_delimiter and not last.rstrip(b"\r\n").endswith(self.closing_delimiter):
            raise BrokenOff("the archive closed the connection before the end of its multipart answer")
        if self.tail:
            yield self.tail
        self.complete = True

    def close(self) -> None:
        if not self.complete:
            self.upstream.close()
        self.upstream.release_conn()


def _closing_delimiter(upstream: urllib3.BaseHTTPResponse) -> bytes:
    """``--boundary--`` for a multipart answer that only the closing of its connection ends."""
    delimited = "Content-Length" in upstream.headers or "chunked" in upstream.headers.get(
        "Transfer-Encoding", ""
    )
    match = _BOUNDARY.search(upstream.headers.get("Content-Type", ""))
    if delimited or not match or not upstream.headers.get("Content-Type", "").startswith("multipart/"):
        return b""
    return b"--" + match.group(1).encode() + b"--"


def origin(environ: dict[str, Any]) -> str:
    """Where the client reached the portal (``https://host:port``), read as ``ProxyFix`` reads
    Caddy's forwarded headers for the app (the last hop's value)."""
    scheme = environ.get("HTTP_X_FORWARDED_PROTO", "").rpartition(",")[2].strip()
    host = environ.get("HTTP_X_FORWARDED_HOST", "").rpartition(",")[2].strip()
    return f"{scheme or environ.get('wsgi.url_scheme', 'http')}://{host or environ.get('HTTP_HOST', '')}"


def asking(accept: str, origin: str) -> dict[str, str]:
    """The headers of a DICOMweb request to Orthanc for a client at ``origin`` (``https://host:port``).

    ``Forwarded`` makes the URLs in Orthanc's answer point back through the portal: DICOMweb 1.7
    reads it, not ``X-Forwarded-*``.
    """
    scheme, _, host = origin.partition("://")
    return {"Accept": accept, "Forwarded": f"host={host};proto={scheme}"}


# The portal's own answers for refusals and errors. Orthanc's error texts are not passed on: they
# tell, for one, whether an instance UID exists in another study ("Accessing an inexistent
# instance" against "the instance does not belong to this series").
SHORT_ANSWERS = {
    400: "Bad request",
    401: "Sign-in needed",
    403: "Not allowed",
    404: "Not found",
    409: "Two patients' studies share this Study Instance UID: the archive's administrator has been told.",
    413: "Too large",
    415: "Unsupported media type",
}


def refusal(status: int, text: str = "") -> Answer:
    """A short plain-text answer of the portal's own for ``status``."""
    body = (text or SHORT_ANSWERS.get(status) or status_line(status).partition(" ")[2]).encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    return Answer(status_line(status), headers, [body])


def relay(
    orthanc: ArchiveClient, target: str, accept: str, origin: str, gone: Callable[[], bool] = lambda: False
) -> Answer:
    """Orthanc's answer to ``GET target`` (path and raw query), streamed; an error status
    comes with the portal's short answer instead of Orthanc's text.

    An answer with no length is spooled first (``gone`` tells whether the client left meanwhile).
    """
    upstream = orthanc.open_raw(target, asking(accept, origin))
    if upstream.status >= 400:
        upstream.close()
        upstream.release_conn()
        # As Caddy answers for Orthanc's errors on the viewer's other requests: "404 Not Found".
        return refusal(upstream.status, status_line(upstream.status))
    headers = [(name, upstream.headers[name]) for name in PASSED_BACK if name in upstream.headers]
    body = Relayed(upstream)
    if not body.closing_delimiter:
        return Answer(status_line(upstream.status), headers, body)
    try:
        spooled, size = spooling.spool(body, gone)
    except (BrokenOff, spooling.ClientGone) as error:
        log.warning("%s of %s: %s", type(error).__name__, target.split("?")[0], error)
        message = "The image archive stopped answering. Please try again in a minute."
        return Answer(status_line(503), [("Content-Type", "text/plain; charset=utf-8")], [message.encode()])
    finally:
        body.close()
    return Answer(
        status_line(upstream.status), [*headers, ("Content-Length", str(size))], spooling.read_back(spooled)
    )


def status_line(status: int) -> str:
    """A WSGI status (``"404 Not Found"``) for an HTTP status code."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"
