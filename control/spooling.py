"""Answers whose length is known only at their end, made whole on disk first and sent with it.

Caddy 2.6.2 ends a chunked answer normally when the control plane breaks it off (it logs
"aborting with incomplete response" and returns, caddyserver/caddy#5951, fixed in 2.8): the
browser then gets the terminating chunk and a cut file that looks whole. An answer with a
``Content-Length`` that comes short is broken off by Caddy in turn. So an answer the control
plane cannot size beforehand (a transcoded or compressed zip, one with a DICOMDIR, a whole
DICOMweb series from Orthanc) is first written to a temporary file in the data directory's
``tmp/`` (``TMPDIR``), checked, then sent with its length; if it cannot be finished, the client
gets a clear error instead of a file.

While the file is made nothing is sent, so the server cannot learn from a failed write that the
client went away: ``client_gone`` looks at the client's connection instead (Caddy closes its
connection to the control plane when its own client leaves), and the work stops at once.
"""

from __future__ import annotations

import select
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from control.orthanc import STREAM_CHUNK

CHECK_EVERY = 4 * 1024 * 1024  # bytes written between two looks at the client's connection


class ClientGone(RuntimeError):
    """The client closed its connection before the answer was ready."""


def client_gone(environ: dict[str, Any]) -> Callable[[], bool]:
    """A check of whether the request's client has closed its connection (gunicorn's socket)."""
    connection = environ.get("gunicorn.socket")

    def gone() -> bool:
        if not isinstance(connection, socket.socket):
            return False
        try:
            readable, _, _ = select.select([connection], [], [], 0)
            return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    return gone


def spool(chunks: Iterable[bytes], gone: Callable[[], bool]) -> tuple[IO[bytes], int]:
    """``chunks`` written to an anonymous temporary file: the file (at its start) and its size.

    Raises ``ClientGone`` as soon as ``gone`` says so; anything ``chunks`` raises goes on up. The
    file is closed (and so removed) on any error.
    """
    spooled = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, which closes it
    size = checked = 0
    try:
        for chunk in chunks:
            spooled.write(chunk)
            size += len(chunk)
            if size - checked >= CHECK_EVERY:
                checked = size
                if gone():
                    raise ClientGone
        spooled.seek(0)
    except BaseException:
        spooled.close()
        raise
    return spooled, size


def read_back(spooled: IO[bytes]) -> Iterator[bytes]:
    """A spooled file in ``STREAM_CHUNK`` blocks; closed (and removed) at the end or when left."""
    try:
        while block := spooled.read(STREAM_CHUNK):
            yield block
    finally:
        spooled.close()
