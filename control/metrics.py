"""Monitoring: ``/metrics`` in Prometheus' text format, for admins and for this machine only.

gunicorn runs several worker processes, each with its own memory, so the counters live where all
of them can add to them and one scrape can read them together: ``prometheus_client``'s
multiprocess mode (one small memory-mapped file per worker and metric in ``run/metrics/``, which
the gunicorn master empties when it starts, see ``control.runtime.gunicorn_conf``). Counting is one
addition per request and one per activity event; downloads are counted by the bytes the WSGI
server is handed, added up and passed on every few megabytes, so nothing is added to the loop that
relays a zip. What the archive holds, its health and its disk space are read when scraped.

Who may read it: a signed-in admin, or a client on this machine itself (127.0.0.1 or ::1 as Caddy
saw it, e.g. a Prometheus or a node exporter's script running beside the portal). Every other
client gets the same 404 as for a page that does not exist.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Response, abort, current_app, request
from flask_login import current_user
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from control import services
from control.orthanc import OrthancError, OrthancUnavailable

bp = Blueprint("metrics", __name__)

LOCAL_ADDRESSES = frozenset({"127.0.0.1", "::1"})
FLUSH_BYTES = 8 * 1024 * 1024

REQUESTS = Counter(
    "pacs_http_requests",
    "Requests answered by the control plane, by kind and status code",
    ["kind", "status"],
)
EVENTS = Counter(
    "pacs_activity_events",
    "Events of the activity log (sign-ins and their refusals, lockouts, downloads, uploads, patients' "
    "link use ...), by action and outcome",
    ["action", "outcome"],
)
TRANSFERS = Gauge(
    "pacs_transfers_in_progress", "Downloads being sent now", ["kind"], multiprocess_mode="livesum"
)
SENT = Counter("pacs_transfer_sent_bytes", "Bytes of downloads sent", ["kind"])
RECEIVED = Counter("pacs_upload_received_bytes", "Bytes of upload requests received")

# The kind of a request, by its path: the first pattern that matches.
KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("download", re.compile(r"^/query/[a-z]+/[^/]+/archive$|^/token/(download|series/[^/]+/download)$")),
    ("viewer", re.compile(r"^/(dicom-web|wado)(/|$)")),
    ("gate", re.compile(r"^/internal/")),
    ("search", re.compile(r"^/query(/|$)")),
    ("patient", re.compile(r"^/tokens?(/|$)")),
    ("upload", re.compile(r"^/upload(/|$)")),
    ("admin", re.compile(r"^/admin(/|$)")),
    ("sign-in", re.compile(r"^/(login|logout|account)(/|$)")),
    ("monitoring", re.compile(r"^/(healthz|metrics)$")),
    ("static", re.compile(r"^/static/")),
)


def kind_of(path: str) -> str:
    for kind, pattern in KINDS:
        if pattern.match(path):
            return kind
    return "page"


def count_event(action: str, outcome: str) -> None:
    EVENTS.labels(action, outcome).inc()


class Counting:
    """WSGI middleware, outermost: counts every request (the gate's quick answers too).

    Transparent: any other attribute is the wrapped layer's (the quick gate's ``allows``, ...).
    """

    def __init__(self, inner: Callable[..., Iterable[bytes]]) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        kind = kind_of(environ.get("PATH_INFO", ""))
        status = "000"

        def counted_start(code: str, headers: list[tuple[str, str]], *args: Any) -> Any:
            nonlocal status
            status = code[:3]
            return start_response(code, headers, *args)

        if kind == "upload":
            length = environ.get("CONTENT_LENGTH") or ""
            if length.isdigit():
                RECEIVED.inc(int(length))
        try:
            answer = self.inner(environ, counted_start)
        except BaseException:
            REQUESTS.labels(kind, "500").inc()
            raise
        REQUESTS.labels(kind, status).inc()
        if kind != "download":
            return answer
        return _Transfer(answer, kind)


class _Transfer:
    """A download's body, passed on unchanged; its bytes counted and its progress shown."""

    def __init__(self, body: Iterable[bytes], kind: str) -> None:
        self.body = body
        self.kind = kind

    def __iter__(self) -> Iterator[bytes]:
        TRANSFERS.labels(self.kind).inc()
        pending = 0
        try:
            for chunk in self.body:
                pending += len(chunk)
                if pending >= FLUSH_BYTES:
                    SENT.labels(self.kind).inc(pending)
                    pending = 0
                yield chunk
        finally:
            SENT.labels(self.kind).inc(pending)
            TRANSFERS.labels(self.kind).dec()

    def close(self) -> None:
        close = getattr(self.body, "close", None)
        if close:
            close()


class ArchiveState:
    """Scrape-time gauges: the archive's health and content, the database, the disk."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        site = services.site(self.app)
        orthanc = services.archive(self.app)
        up = GaugeMetricFamily("pacs_archive_up", "1 when the archive (Orthanc) answers")
        content = GaugeMetricFamily("pacs_archive_resources", "What the archive holds", labels=["level"])
        stored = GaugeMetricFamily("pacs_archive_stored_bytes", "Bytes of the archive's stored files")
        try:
            statistics = orthanc.get_json("/statistics")
            up.add_metric([], 1)
            for level in ("Patients", "Studies", "Series", "Instances"):
                content.add_metric([level.lower()], statistics[f"Count{level}"])
            stored.add_metric([], int(statistics["TotalDiskSize"]))
        except (OrthancUnavailable, OrthancError, KeyError, ValueError):
            up.add_metric([], 0)
        yield up
        yield content
        yield stored
        database = GaugeMetricFamily("pacs_database_up", "1 when the control plane's database answers")
        try:
            with site.engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
            database.add_metric([], 1)
        except sa.exc.SQLAlchemyError:
            database.add_metric([], 0)
        yield database
        usage = shutil.disk_usage(site.orthanc_storage)
        free = GaugeMetricFamily("pacs_disk_free_bytes", "Free space on the archive's disk")
        free.add_metric([], usage.free)
        yield free
        size = GaugeMetricFamily("pacs_disk_size_bytes", "Size of the archive's disk")
        size.add_metric([], usage.total)
        yield size
        reserve = GaugeMetricFamily(
            "pacs_disk_reserve_bytes", "Free space below which uploads are refused (disk_reserve_mb)"
        )
        reserve.add_metric([], services.settings().disk_reserve_mb * 1024 * 1024)
        yield reserve
        now = GaugeMetricFamily("pacs_scrape_time_seconds", "When these values were read (Unix time)")
        now.add_metric([], time.time())
        yield now


def may_read() -> bool:
    return request.remote_addr in LOCAL_ADDRESSES or (current_user.is_authenticated and current_user.is_admin)


@bp.route("/metrics")
def metrics() -> Response:
    if not may_read():
        abort(404)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        counters = CollectorRegistry()
        multiprocess.MultiProcessCollector(counters)
    else:  # one process (an app built by a test or a script): its own counters
        counters = REGISTRY
    scraped = CollectorRegistry()
    scraped.register(ArchiveState(current_app))
    body = generate_latest(counters) + generate_latest(scraped)
    response = Response(body, mimetype="text/plain; version=0.0.4; charset=utf-8")
    response.headers["Cache-Control"] = "no-store"
    return response
