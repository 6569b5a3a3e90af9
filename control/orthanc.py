"""The control plane's connection to Orthanc's HTTP API.

Only the control plane (and Caddy, for streamed DICOMweb bytes) knows Orthanc's credentials. Each
process reuses its connections through one urllib3 pool: calls answered with JSON, the viewer's
frames, DICOMweb answers relayed as they arrive, the stored files of uploads and of zips.
Orthanc 1.10.1 closes idle keep-alive connections after one second, so a pooled connection may be
stale: idempotent requests are retried once on a connection error. Anything that means "the
archive is not there" becomes ``OrthancUnavailable``, which the pages turn into a clear 503.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import IO, Any, Protocol
from urllib.parse import urlencode

import urllib3
from urllib3.util.retry import Retry

STREAM_CHUNK = 256 * 1024
# POSTs of Orthanc's API that change nothing, so that sending one twice is harmless.
SEARCHES = frozenset({"/tools/find", "/tools/lookup", "/tools/bulk-content"})
# GETs are sent again once when their pooled connection turns out closed (Orthanc 1.10.1 closes
# idle ones after a second); so are the searches, POSTs that only read. A stored file is sent
# again only when its connection could not be made: then nothing reached Orthanc.
RETRY = Retry(total=2, connect=2, read=1, status=0, redirect=0, backoff_factor=0.05)
SEARCH_RETRY = RETRY.new(allowed_methods=None)
STORE_RETRY = RETRY.new(read=0)
# Seconds to wait for a connection: on loopback a dead Orthanc refuses at once; across machines a
# node that is gone must not hold a request for the whole answer timeout (control.nodes then
# sends it to another node).
CONNECT_TIMEOUT = 3.0
# The most results one find may ask for (see Orthanc.find).
FIND_LIMIT = 100_000


def resource_id(*identifiers: str) -> str:
    """Orthanc's id of a resource, from its patient ID and (for a study, series or instance) UIDs:
    the SHA-1 of them joined by ``|``, in five groups of eight (Orthanc's ``DicomInstanceHasher``).
    The values are as Orthanc stores them: a padded ``"ID "`` names another patient than ``"ID"``."""
    digest = hashlib.sha1("|".join(identifiers).encode()).hexdigest()  # noqa: S324 - Orthanc's naming
    return "-".join(digest[start : start + 8] for start in range(0, 40, 8))


class OrthancUnavailable(RuntimeError):
    """Orthanc did not answer (down, starting, or unreachable)."""


class OrthancUnreachable(OrthancUnavailable):
    """No connection to Orthanc could be made: nothing of the request reached it."""


class OrthancBusy(OrthancUnavailable):
    """Orthanc answered 503: it is there but cannot serve now (its index database restarting,
    say). Like no answer at all, it passes: the pages say "try again", the workers wait."""

    def __init__(self, message: str) -> None:
        super().__init__(f"Orthanc answered 503: {message}")
        self.status = 503


class OrthancError(RuntimeError):
    """Orthanc answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Orthanc answered {status}: {message}")
        self.status = status


class OrthancRefused(OrthancError):
    """Orthanc refused what it was sent; ``reason`` is its own explanation."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.reason = reason


class ArchiveClient(Protocol):
    """What code that reads from or stores into "the archive" may ask of it: the methods that one
    node's ``Orthanc`` client and the nodes behind one archive (``control.nodes.Archive``) both offer."""

    @property
    def url(self) -> str: ...

    # A cache may key on the client (control.query.finder keeps each study's modalities).
    def __hash__(self) -> int: ...

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/json",
        timeout: float | None = None,
        retries: Retry | None = None,
    ) -> urllib3.BaseHTTPResponse: ...

    def get_json(
        self, path: str, *, params: dict[str, str] | None = None, timeout: float | None = None
    ) -> Any: ...

    def post_json(self, path: str, body: Any, *, timeout: float | None = None) -> Any: ...

    def lookup(self, text: str) -> list[dict[str, Any]]: ...

    def get_text(self, path: str) -> str: ...

    def open_raw(self, path: str, headers: dict[str, str] | None = None) -> urllib3.BaseHTTPResponse: ...

    def system(self) -> dict[str, Any]: ...

    def find(
        self, level: str, query: dict[str, str], *, expand: bool = False, limit: int = FIND_LIMIT
    ) -> list[Any]: ...

    def find_studies(self, query: dict[str, str], limit: int = FIND_LIMIT) -> list[str]: ...

    def instance_file(self, instance_id: str) -> bytes: ...

    def stream_instance_file(self, instance_id: str) -> Iterator[bytes]: ...

    def transcoded_instance(self, instance_id: str, transfer_syntax: str) -> bytes: ...

    def store_instance(self, body: bytes | IO[bytes], size: int) -> dict[str, Any]: ...

    def create_dicom(self, body: IO[bytes]) -> dict[str, Any]: ...

    def modalities(self) -> dict[str, dict[str, Any]]: ...


class Orthanc:
    """A small client for the parts of Orthanc's REST API the portal uses."""

    def __init__(self, url: str, username: str, password: str, timeout: float = 30) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        # One pool for every call, answers read whole or streamed: requests' work around each call
        # cost about 0.25 ms of CPU, a tenth of a search's overhead, and 1 ms per file of an upload
        # (see README: speed). No proxy from the environment may stand in between: Orthanc is the
        # portal's own loopback service, and a proxy would see its credentials. Large files are
        # sent in STREAM_CHUNK blocks: a 100 MB file in urllib3's default 16 kB blocks cost 0.08 s
        # of CPU, in 256 kB blocks 0.03 s.
        self._pool = urllib3.connection_from_url(self.url, maxsize=32, blocksize=STREAM_CHUNK)
        self._headers = {
            **urllib3.make_headers(basic_auth=f"{username}:{password}"),
            # Orthanc would gzip DICOM on request; the portal never wants that (see README: speed).
            "Accept-Encoding": "identity",
        }

    def request(
        self,
        method: str,
        path: str,
        body: bytes | IO[bytes] | None = None,
        *,
        content_type: str = "application/json",
        timeout: float | None = None,
        retries: Retry | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """``method path`` with ``body`` (bytes, or a binary file read from where it stands), its
        answer read whole. An error status raises OrthancError; no answer, or Orthanc's 503 ("cannot
        serve now"), OrthancUnavailable.

        GETs, PUTs, DELETEs and searches are sent again once on a stale pooled connection; other
        POSTs only when their connection could not be made (``retries`` says otherwise).
        """
        response = self._send(method, path, body, content_type=content_type, timeout=timeout, retries=retries)
        if response.status >= 400:
            raise error_for(response.status, response.data[:300].decode(errors="replace"))
        return response

    def _send(
        self,
        method: str,
        path: str,
        body: bytes | IO[bytes] | None = None,
        *,
        content_type: str = "application/json",
        timeout: float | None = None,
        retries: Retry | None = None,
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> urllib3.BaseHTTPResponse:
        sent = {**self._headers, **(headers or {})}
        if body is not None:
            sent["Content-Type"] = content_type
            # A file goes with its length: without one urllib3 would send it in chunks.
            sent.setdefault(
                "Content-Length", str(len(body) if isinstance(body, bytes) else _length_left(body))
            )
        if retries is None:
            retries = (SEARCH_RETRY if path in SEARCHES else STORE_RETRY) if method == "POST" else RETRY
        timeout = timeout or self.timeout
        waits = urllib3.Timeout(connect=min(CONNECT_TIMEOUT, timeout), read=timeout)
        try:
            return self._pool.urlopen(
                method, path, body=body, headers=sent, timeout=waits, retries=retries, **options
            )
        except urllib3.exceptions.HTTPError as error:
            reason = error.reason if isinstance(error, urllib3.exceptions.MaxRetryError) else error
            # Refused or never connected: nothing reached Orthanc, so another node may take the
            # request (NewConnectionError is a ConnectTimeoutError, itself a TimeoutError: test first).
            if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
                raise OrthancUnreachable(str(reason)) from None
            if isinstance(reason, urllib3.exceptions.TimeoutError):
                raise OrthancUnavailable(f"no answer within {timeout} s: {reason}") from None
            raise OrthancUnavailable(str(reason)) from None

    def get_json(
        self, path: str, *, params: dict[str, str] | None = None, timeout: float | None = None
    ) -> Any:
        """``GET path`` (with the query ``params``); Orthanc's answer, parsed."""
        return json.loads(
            self.request("GET", f"{path}?{urlencode(params)}" if params else path, timeout=timeout).data
        )

    def post_json(self, path: str, body: Any, *, timeout: float | None = None) -> Any:
        """``POST path`` with the JSON ``body``; Orthanc's answer, parsed.

        Under load, Orthanc closing an idle connection just as a search went out gave users
        "archive not reachable" (bench/, the users scenario): searches are retried like GETs.
        """
        return json.loads(self.request("POST", path, json.dumps(body).encode(), timeout=timeout).data)

    def lookup(self, text: str) -> list[dict[str, Any]]:
        """``POST /tools/lookup``: the resources whose DICOM UID or Orthanc id is ``text``."""
        return json.loads(
            self.request("POST", "/tools/lookup", text.encode(), content_type="text/plain").data
        )

    def get_text(self, path: str) -> str:
        """``GET path``: Orthanc's answer as text (a metadata value, say)."""
        return self.request("GET", path).data.decode()

    def open_raw(self, path: str, headers: dict[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        """A GET whose body is read as it arrives, whatever the status; the caller reads it to the
        end or closes it, then releases it (``release_conn``)."""
        return self._send("GET", path, headers=headers, preload_content=False, release_conn=False)

    def system(self) -> dict[str, Any]:
        """Orthanc's ``/system`` answer: name, version, AE title, ports."""
        return self.get_json("/system", timeout=3)

    def find(
        self, level: str, query: dict[str, str], *, expand: bool = False, limit: int = FIND_LIMIT
    ) -> list[Any]:
        """``POST /tools/find``: the ids (or, with ``expand``, the resources) of ``level`` matching ``query``.

        Matching is case-insensitive. Every find carries a ``Limit`` (at most ``FIND_LIMIT``): on a
        PostgreSQL index a broad find costs about 8 times what it costs on SQLite, and the limit
        lets the index stop early. Callers ask for one more than they need to tell "more".
        (``Since`` exists too, but costs as much as reading everything before it, and 1.10.1
        ignores ``OrderBy``; see control.query.finder.)
        """
        body: dict[str, Any] = {
            "Level": level,
            "Query": query,
            "Expand": expand,
            "Limit": min(limit, FIND_LIMIT),
        }
        return self.post_json("/tools/find", body)

    def instance_file(self, instance_id: str) -> bytes:
        """An instance's stored file, whole (``GET /instances/{id}/file``).

        A body shorter than its ``Content-Length`` (Orthanc gone midway) is read again once, then
        raises ``OrthancUnavailable``: fewer bytes are never returned.
        """
        return self.request("GET", f"/instances/{instance_id}/file").data

    def stream_instance_file(self, instance_id: str) -> Iterator[bytes]:
        """An instance's stored file in ``STREAM_CHUNK`` blocks, for files too large to hold.

        A body that ends before its ``Content-Length`` raises ``OrthancUnavailable``.
        """
        response = self.open_raw(f"/instances/{instance_id}/file")
        try:
            if response.status >= 400:
                raise error_for(response.status, response.read(300).decode(errors="replace"))
            yield from response.stream(STREAM_CHUNK, decode_content=False)
        except urllib3.exceptions.HTTPError as error:
            raise OrthancUnavailable(f"the file of instance {instance_id} broke off: {error}") from None
        finally:
            response.close()
            response.release_conn()

    def transcoded_instance(self, instance_id: str, transfer_syntax: str) -> bytes:
        """An instance's file as Orthanc transcodes it to ``transfer_syntax``, its UIDs kept.

        ``POST /instances/{id}/modify`` with ``Transcode`` stores nothing; keeping the three UIDs
        (which needs ``Force``) gives the very file Orthanc's transcoding archive holds. A file
        Orthanc cannot transcode raises ``OrthancError``.
        """
        body = {
            "Transcode": transfer_syntax,
            "Keep": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
            "Force": True,
        }
        # It only reads, so it may be sent again like a search.
        modify = f"/instances/{instance_id}/modify"
        return self.request("POST", modify, json.dumps(body).encode(), retries=SEARCH_RETRY).data

    def store_instance(self, body: bytes | IO[bytes], size: int) -> dict[str, Any]:
        """Store one DICOM file of ``size`` bytes (bytes, or a binary file at its start); Orthanc's answer.

        ``Status`` is ``Success`` or ``AlreadyStored``. A refusal raises OrthancRefused with Orthanc's
        own explanation (its ``Details``, else its ``Message``). The file is sent again only when
        its connection could not be made: then nothing reached Orthanc.
        """
        response = self._send(
            "POST",
            "/instances",
            body,
            content_type="application/dicom",
            headers={"Content-Length": str(size)},
            retries=STORE_RETRY,
        )
        try:
            answer = json.loads(response.data)
        except ValueError:
            answer = {}
        if response.status >= 400:
            reason = answer.get("Details") or answer.get("Message") or response.reason
            raise OrthancRefused(response.status, str(reason))
        return answer

    def create_dicom(self, body: IO[bytes]) -> dict[str, Any]:
        """``POST /tools/create-dicom`` with a JSON body given as a binary file (see control.uploads.pdf)."""
        return json.loads(self.request("POST", "/tools/create-dicom", body).data)

    def find_studies(self, query: dict[str, str], limit: int = FIND_LIMIT) -> list[str]:
        """The Orthanc ids of the studies matching ``query`` (DICOM keywords to values)."""
        return self.find("Study", query, limit=limit)

    def modalities(self) -> dict[str, dict[str, Any]]:
        """The registered DICOM modalities, by name."""
        return self.get_json("/modalities", params={"expand": ""})

    def put_modality(self, name: str, entry: dict[str, Any]) -> None:
        """Register (or change) a modality with its ``DicomModalities`` entry; Orthanc keeps it
        until it restarts."""
        self.request("PUT", f"/modalities/{name}", json.dumps(entry).encode())

    def delete_modality(self, name: str) -> None:
        self.request("DELETE", f"/modalities/{name}")


def error_for(status: int, message: str) -> OrthancError | OrthancBusy:
    """What an error answer of Orthanc raises: 503 passes (OrthancBusy); any other is Orthanc's word."""
    return OrthancBusy(message) if status == 503 else OrthancError(status, message)


def _length_left(file: IO[bytes]) -> int:
    """How many bytes of ``file`` lie after where it stands."""
    return os.fstat(file.fileno()).st_size - file.tell()
