"""The control plane's connection to Orthanc's HTTP API.

Only the control plane (and Caddy, for streamed DICOMweb bytes) knows Orthanc's credentials. Each
process reuses its connections: the calls answered with JSON, the viewer's frames, the stored files
of uploads and of zips go through a urllib3 pool, the rest through a ``requests.Session``.
Orthanc 1.10.1 closes idle keep-alive connections after one second, so a pooled connection may be
stale: idempotent requests are retried once on a connection error. Anything that means "the
archive is not there" becomes ``OrthancUnavailable``, which the pages turn into a clear 503.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import urlencode

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

STREAM_CHUNK = 256 * 1024
# Seconds to wait for a connection: on loopback a dead Orthanc refuses at once; across machines a
# node that is gone must not hold a request for the whole answer timeout (control.nodes then
# sends it to another node).
CONNECT_TIMEOUT = 3.0
# The most results one find may ask for (see Orthanc.find).
FIND_LIMIT = 100_000
# POSTs of Orthanc's API that change nothing, so that sending one twice is harmless.
SEARCHES = frozenset({"/tools/find", "/tools/lookup"})
# GETs are sent again once when their pooled connection turns out closed (Orthanc 1.10.1 closes
# idle ones after a second); so are the searches, POSTs that only read. A stored file is sent
# again only when its connection could not be made: then nothing reached Orthanc.
RETRY = Retry(total=2, connect=2, read=1, status=0, redirect=0, backoff_factor=0.05)
SEARCH_RETRY = RETRY.new(allowed_methods=None)
STORE_RETRY = RETRY.new(read=0)


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


class Orthanc:
    """A small client for the parts of Orthanc's REST API the portal uses."""

    def __init__(self, url: str, username: str, password: str, timeout: float = 30) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.auth = (username, password)
        # Orthanc is the portal's own loopback service: no proxy from the environment may stand in
        # between (it would see Orthanc's credentials), and skipping the proxy look-up saves about
        # half a millisecond per call.
        self.session.trust_env = False
        # Orthanc would gzip DICOM on request; the portal never wants that (see README: speed).
        self.session.headers["Accept-Encoding"] = "identity"
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=32, max_retries=RETRY)
        self.session.mount("http://", adapter)
        # The calls that answer JSON, and uploads, skip requests: its work around each call cost
        # about 0.25 ms of CPU, a tenth of a search's overhead (see README: speed).
        # Large files are sent in STREAM_CHUNK blocks: a 100 MB file in urllib3's default 16 kB
        # blocks cost 0.08 s of CPU, in 256 kB blocks 0.03 s.
        self._pool = urllib3.connection_from_url(self.url, maxsize=32, blocksize=STREAM_CHUNK)
        self._headers = {
            **urllib3.make_headers(basic_auth=f"{username}:{password}"),
            "Accept-Encoding": "identity",
        }

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        answer_timeout = kwargs["timeout"]
        kwargs["timeout"] = (min(CONNECT_TIMEOUT, answer_timeout), answer_timeout)
        try:
            response = self.session.request(method, f"{self.url}{path}", **kwargs)
        except requests.ConnectionError as error:
            reason = getattr(error.args[0], "reason", None) if error.args else None
            if isinstance(error, requests.ConnectTimeout) or isinstance(
                reason, urllib3.exceptions.NewConnectionError
            ):
                raise OrthancUnreachable(str(error)) from None
            raise OrthancUnavailable(str(error)) from None
        except requests.Timeout as error:
            raise OrthancUnavailable(f"no answer within {answer_timeout} s: {error}") from None
        if response.status_code >= 400 and not kwargs.get("stream"):
            raise OrthancError(response.status_code, response.text[:300])
        return response

    def get_json(
        self, path: str, *, params: dict[str, str] | None = None, timeout: float | None = None
    ) -> Any:
        """``GET path`` (with the query ``params``); Orthanc's answer, parsed."""
        return self._call_json("GET", f"{path}?{urlencode(params)}" if params else path, timeout=timeout)

    def post_json(self, path: str, body: Any, *, timeout: float | None = None) -> Any:
        """``POST path`` with the JSON ``body``; Orthanc's answer, parsed."""
        return self._call_json("POST", path, json.dumps(body).encode(), timeout=timeout)

    def lookup(self, text: str) -> list[dict[str, Any]]:
        """``POST /tools/lookup``: the resources whose DICOM UID or Orthanc id is ``text``."""
        return self._call_json("POST", "/tools/lookup", text.encode(), content_type="text/plain")

    def _call_json(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        timeout: float | None = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {**self._headers, "Content-Type": content_type} if body is not None else self._headers
        # Under load, Orthanc closing an idle connection just as a search went out gave users
        # "archive not reachable" (bench/, the users scenario): searches are retried like GETs.
        retries = SEARCH_RETRY if method == "POST" and path in SEARCHES else RETRY
        response = self._urlopen(method, path, body, headers, timeout or self.timeout, retries)
        if response.status >= 400:
            raise OrthancError(response.status, response.data[:300].decode(errors="replace"))
        return json.loads(response.data)

    def _urlopen(
        self,
        method: str,
        path: str,
        body: Any,
        headers: dict[str, str],
        timeout: float,
        retries: Retry,
        **options: Any,
    ) -> urllib3.BaseHTTPResponse:
        waits = urllib3.Timeout(connect=min(CONNECT_TIMEOUT, timeout), read=timeout)
        try:
            return self._pool.urlopen(
                method, path, body=body, headers=headers, timeout=waits, retries=retries, **options
            )
        except urllib3.exceptions.HTTPError as error:
            reason = error.reason if isinstance(error, urllib3.exceptions.MaxRetryError) else error
            if isinstance(
                reason, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError
            ):
                raise OrthancUnreachable(str(reason)) from None
            if isinstance(reason, urllib3.exceptions.TimeoutError):
                raise OrthancUnavailable(f"no answer within {timeout} s: {reason}") from None
            raise OrthancUnavailable(str(reason)) from None

    def get_text(self, path: str) -> str:
        """``GET path``: Orthanc's answer as text (a metadata value, say)."""
        response = self._urlopen("GET", path, None, self._headers, self.timeout, RETRY)
        if response.status >= 400:
            raise OrthancError(response.status, response.data[:300].decode(errors="replace"))
        return response.data.decode()

    def open_raw(self, path: str, headers: dict[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        """A GET whose body is read as it arrives, whatever the status; the caller reads it to the
        end or closes it, then releases it (``release_conn``)."""
        headers = {**self._headers, **headers} if headers else self._headers
        return self._urlopen(
            "GET", path, None, headers, self.timeout, RETRY, preload_content=False, release_conn=False
        )

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
        response = self._urlopen(
            "GET", f"/instances/{instance_id}/file", None, self._headers, self.timeout, RETRY
        )
        if response.status >= 400:
            raise OrthancError(response.status, response.data[:300].decode(errors="replace"))
        return response.data

    def stream_instance_file(self, instance_id: str) -> Iterator[bytes]:
        """An instance's stored file in ``STREAM_CHUNK`` blocks, for files too large to hold.

        A body that ends before its ``Content-Length`` raises ``OrthancUnavailable``.
        """
        response = self.open_raw(f"/instances/{instance_id}/file")
        try:
            if response.status >= 400:
                raise OrthancError(response.status, response.read(300).decode(errors="replace"))
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
        headers = {**self._headers, "Content-Type": "application/json"}
        path = f"/instances/{instance_id}/modify"
        # It only reads, so it may be sent again like a search.
        response = self._urlopen("POST", path, json.dumps(body).encode(), headers, self.timeout, SEARCH_RETRY)
        if response.status >= 400:
            raise OrthancError(response.status, response.data[:300].decode(errors="replace"))
        return response.data

    def store_instance(self, body: bytes | BinaryIO, size: int) -> dict[str, Any]:
        """Store one DICOM file of ``size`` bytes (bytes, or a binary file at its start); Orthanc's answer.

        ``Status`` is ``Success`` or ``AlreadyStored``. A refusal raises OrthancRefused with Orthanc's
        own explanation (its ``Details``, else its ``Message``).

        Uploads send hundreds of files in a row: through requests, its work around each call and
        answer cost about 1 ms of CPU per file, a third of the control plane's share of a zip upload
        (see README: speed).
        """
        headers = {**self._headers, "Content-Type": "application/dicom", "Content-Length": str(size)}
        response = self._urlopen("POST", "/instances", body, headers, self.timeout, STORE_RETRY)
        try:
            answer = json.loads(response.data)
        except ValueError:
            answer = {}
        if response.status >= 400:
            reason = answer.get("Details") or answer.get("Message") or response.reason
            raise OrthancRefused(response.status, str(reason))
        return answer

    def create_dicom(self, body: Any) -> dict[str, Any]:
        """``POST /tools/create-dicom`` with a JSON body given as a binary file (see control.uploads.pdf)."""
        return self.request(
            "POST", "/tools/create-dicom", data=body, headers={"Content-Type": "application/json"}
        ).json()

    def find_studies(self, query: dict[str, str], limit: int = FIND_LIMIT) -> list[str]:
        """The Orthanc ids of the studies matching ``query`` (DICOM keywords to values)."""
        return self.find("Study", query, limit=limit)

    def modalities(self) -> dict[str, dict[str, Any]]:
        """The registered DICOM modalities, by name."""
        return self.get_json("/modalities", params={"expand": ""})

    def put_modality(self, name: str, entry: dict[str, Any]) -> None:
        """Register (or change) a modality with its ``DicomModalities`` entry; Orthanc keeps it
        until it restarts."""
        self.request("PUT", f"/modalities/{name}", json=entry)

    def delete_modality(self, name: str) -> None:
        self.request("DELETE", f"/modalities/{name}")
