"""The control plane's connection to Orthanc's HTTP API.

Only the control plane (and Caddy, for streamed DICOMweb bytes) knows Orthanc's credentials. One
``requests.Session`` per process reuses connections. Orthanc 1.10.1 closes idle keep-alive
connections after one second, so a pooled connection may be stale: idempotent requests are retried
once on a connection error. Anything that means "the archive is not there" becomes
``OrthancUnavailable``, which the pages turn into a clear 503.
"""

from __future__ import annotations

from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

STREAM_CHUNK = 256 * 1024


class OrthancUnavailable(RuntimeError):
    """Orthanc did not answer (down, starting, or unreachable)."""


class OrthancError(RuntimeError):
    """Orthanc answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"Orthanc answered {status}: {message}")
        self.status = status


class Orthanc:
    """A small client for the parts of Orthanc's REST API the portal uses."""

    def __init__(self, url: str, username: str, password: str, timeout: float = 30) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        self.session.auth = (username, password)
        # Orthanc would gzip DICOM on request; the portal never wants that (see README: speed).
        self.session.headers["Accept-Encoding"] = "identity"
        retry = Retry(total=2, connect=2, read=1, status=0, backoff_factor=0.05)
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=32, max_retries=retry)
        self.session.mount("http://", adapter)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        try:
            response = self.session.request(method, f"{self.url}{path}", **kwargs)
        except requests.ConnectionError as error:
            raise OrthancUnavailable(str(error)) from None
        except requests.Timeout as error:
            raise OrthancUnavailable(f"no answer within {kwargs['timeout']} s: {error}") from None
        if response.status_code >= 400 and not kwargs.get("stream"):
            raise OrthancError(response.status_code, response.text[:300])
        return response

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post_json(self, path: str, body: Any, **kwargs: Any) -> Any:
        return self.request("POST", path, json=body, **kwargs).json()

    def system(self) -> dict[str, Any]:
        """Orthanc's ``/system`` answer: name, version, AE title, ports."""
        return self.get_json("/system", timeout=3)
