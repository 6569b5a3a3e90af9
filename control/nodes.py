"""The archive's nodes as one archive: which Orthanc each call of the control plane goes to.

A single-node portal has one Orthanc, and this is a thin layer over it. A larger site runs several
Orthancs on one PostgreSQL index with shared storage (README: Several nodes): each holds the same
studies, so any may answer a read, but writes go to one.

- **Reads** (finds, look-ups, stored files, frames, DICOMweb answers) go to the nodes in turn. A
  node that does not answer (connection refused, reset, timed out) or answers 503 (it cannot reach
  the index yet) is left out, and the read sent at once to the next node; ``HEALTH_INTERVAL``
  seconds later the node is asked in the background (``/system``) whether it is back, and gets
  requests again when it is. A stored file that breaks off midway is read on from another node
  from the same byte: the files are shared, the bytes the same. The study catalog's feeder, which
  reads in bulk, leaves the writer out while another node answers (``spare_writer``): each node
  has one connection to the index, and on the writer its reads waited behind the stores.
- **Writes** (stores, PDF reports) go to the first node that answers: the writer. Plugin 4.0 runs
  every write SERIALIZABLE, and two nodes storing at once collide: no faster than one, with
  conflicts that Orthanc answers 503 once its own retries are spent (bench: nodes). So one writer,
  the next node taking over while it is down. A write answered 503 is sent again after a growing
  pause, up to ``WRITE_ATTEMPTS`` times, then reported as failed with that reason. A store whose
  node died is sent to the next node: storing is idempotent (an instance already there is answered
  ``AlreadyStored``). A PDF report goes to another node only when no connection to the first could
  be made, since each creation makes new UIDs.
- **Per node**: registered modalities (``PUT /modalities``, kept in each node's memory) and
  restarts (``/tools/reset``) are for every node: ``each()`` lists them.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import urllib3
from urllib3.util.retry import Retry

from control.orthanc import (
    FIND_LIMIT,
    SEARCHES,
    Orthanc,
    OrthancBusy,
    OrthancError,
    OrthancRefused,
    OrthancUnavailable,
    OrthancUnreachable,
)
from control.runtime import configs
from control.settings import SiteSettings
from control.site import Site

# A write the archive answered "busy" (503) is sent this many times in all, with these pauses
# (seconds) before the second, third... sending: about 6 s in all, on top of Orthanc's own replays.
WRITE_ATTEMPTS = 5
WRITE_PAUSES = (0.2, 0.6, 1.5, 3.0)

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Node:
    """One archive node and what this process knows of its health."""

    name: str
    orthanc: Orthanc
    down_since: float | None = None
    probing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def up(self) -> bool:
        return self.down_since is None


class Archive:
    """The archive's nodes behind the methods of one ``Orthanc`` client (see the module)."""

    def __init__(
        self,
        nodes: list[Node],
        health_interval: float = configs.HEALTH_INTERVAL,
        *,
        spare_writer: bool = False,
    ) -> None:
        self.nodes = nodes
        self.health_interval = health_interval
        self.spare_writer = spare_writer
        self._turn = itertools.count()

    @property
    def url(self) -> str:
        """The first node's URL."""
        return self.nodes[0].orthanc.url

    def each(self) -> list[tuple[str, Orthanc]]:
        """Every node by name, for what each must be told itself."""
        return [(node.name, node.orthanc) for node in self.nodes]

    # Which node, and what to do when it fails.

    def _failed(self, node: Node) -> None:
        if len(self.nodes) == 1:
            return
        with node.lock:
            if node.down_since is None:
                node.down_since = time.monotonic()
                log.warning("Archive node %s does not answer; its requests go to the other nodes", node.name)

    def _probe_later(self, node: Node) -> None:
        """Ask a node that failed whether it is back, in the background, once its pause is over."""
        with node.lock:
            if node.probing or node.down_since is None:
                return
            if time.monotonic() - node.down_since < self.health_interval:
                return
            node.probing = True

        def probe() -> None:
            try:
                node.orthanc.system()
            except (OrthancUnavailable, OrthancError):
                with node.lock:
                    node.down_since = time.monotonic()
            else:
                with node.lock:
                    node.down_since = None
                log.warning("Archive node %s answers again", node.name)
            finally:
                node.probing = False

        threading.Thread(target=probe, name=f"probe-{node.name}", daemon=True).start()

    def _ordered(self, rotate: bool, spare_writer: bool = False) -> list[Node]:
        """The nodes to try, in order: those that answer (in turn for reads), then the others;
        with ``spare_writer``, the writer after the other nodes that answer.

        Nodes that failed are tried last rather than never: when all seem down, one that just came
        back is found, and the caller learns at once that the archive does not answer.
        """
        for node in self.nodes:
            if not node.up:
                self._probe_later(node)
        up = [node for node in self.nodes if node.up]
        last = [up.pop(0)] if spare_writer and len(up) > 1 else []
        if rotate and len(up) > 1:
            start = next(self._turn) % len(up)
            up = up[start:] + up[:start]
        return up + last + [node for node in self.nodes if not node.up]

    def _read(self, call: Callable[[Orthanc], T]) -> T:
        failure: OrthancUnavailable | None = None
        for node in self._ordered(rotate=True, spare_writer=self.spare_writer):
            try:
                return call(node.orthanc)
            except OrthancUnavailable as error:
                self._failed(node)
                failure = error
        assert failure is not None
        raise failure

    def _write(self, call: Callable[[Orthanc], T], *, rewind: Callable[[], object], idempotent: bool) -> T:
        """``call`` on the writer; sent again when busy (503) or, as far as safe, when its node fails."""
        attempts = 0
        busy = 0
        while True:
            nodes = self._ordered(rotate=False)
            node = nodes[0]
            try:
                return call(node.orthanc)
            except (OrthancRefused, OrthancBusy) as error:
                if error.status != 503:
                    raise
                busy += 1
                if busy >= WRITE_ATTEMPTS:
                    log.warning("The archive was busy %d times in a row; a write was given up", busy)
                    raise OrthancRefused(
                        503, f"the archive was too busy to store it ({busy} attempts); please send it again"
                    ) from None
                time.sleep(WRITE_PAUSES[min(busy, len(WRITE_PAUSES)) - 1])
            except OrthancUnavailable as error:
                retry_elsewhere = idempotent or isinstance(error, OrthancUnreachable)
                self._failed(node)
                attempts += 1
                if len(self.nodes) == 1 or not retry_elsewhere or attempts >= len(self.nodes):
                    raise
            rewind()

    # The methods of Orthanc's client that the control plane uses.

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/json",
        timeout: float | None = None,
        retries: Retry | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """A call answered whole: a GET is a read; anything else goes to the writer."""

        def call(orthanc: Orthanc) -> urllib3.BaseHTTPResponse:
            return orthanc.request(
                method, path, body, content_type=content_type, timeout=timeout, retries=retries
            )

        if method == "GET":
            return self._read(call)
        return self._write(call, rewind=lambda: None, idempotent=False)

    def get_json(
        self, path: str, *, params: dict[str, str] | None = None, timeout: float | None = None
    ) -> Any:
        return self._read(lambda orthanc: orthanc.get_json(path, params=params, timeout=timeout))

    def post_json(self, path: str, body: Any, *, timeout: float | None = None) -> Any:
        """Searches are reads; other JSON posts go to the writer."""

        def call(orthanc: Orthanc) -> Any:
            return orthanc.post_json(path, body, timeout=timeout)

        if path in SEARCHES:
            return self._read(call)
        return self._write(call, rewind=lambda: None, idempotent=False)

    def lookup(self, text: str) -> list[dict[str, Any]]:
        return self._read(lambda orthanc: orthanc.lookup(text))

    def get_text(self, path: str) -> str:
        return self._read(lambda orthanc: orthanc.get_text(path))

    def open_raw(self, path: str, headers: dict[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        return self._read(lambda orthanc: orthanc.open_raw(path, headers))

    def system(self) -> dict[str, Any]:
        return self._read(lambda orthanc: orthanc.system())

    def find(
        self, level: str, query: dict[str, str], *, expand: bool = False, limit: int = FIND_LIMIT
    ) -> list[Any]:
        return self._read(lambda orthanc: orthanc.find(level, query, expand=expand, limit=limit))

    def find_studies(self, query: dict[str, str], limit: int = FIND_LIMIT) -> list[str]:
        return self._read(lambda orthanc: orthanc.find_studies(query, limit))

    def instance_file(self, instance_id: str) -> bytes:
        return self._read(lambda orthanc: orthanc.instance_file(instance_id))

    def transcoded_instance(self, instance_id: str, transfer_syntax: str) -> bytes:
        # Stores nothing: a read (see Orthanc.transcoded_instance).
        return self._read(lambda orthanc: orthanc.transcoded_instance(instance_id, transfer_syntax))

    def stream_instance_file(self, instance_id: str) -> Iterator[bytes]:
        """An instance's stored file in blocks; when its node breaks off, read on from another node.

        Each node serves the same file (the storage is shared), so the bytes after the ones already
        given are the same wherever they are read. Raises ``OrthancUnavailable`` when no node can.
        """
        given = 0
        tried = 0
        while True:
            node = self._ordered(rotate=True)[0]
            skip = given
            try:
                for block in node.orthanc.stream_instance_file(instance_id):
                    if skip:
                        if len(block) <= skip:
                            skip -= len(block)
                            continue
                        block = block[skip:]  # the part not given yet
                        skip = 0
                    given += len(block)
                    yield block
                return
            except OrthancUnavailable:
                self._failed(node)
                tried += 1
                if tried >= len(self.nodes):
                    raise

    def store_instance(self, body: bytes | IO[bytes], size: int) -> dict[str, Any]:
        """Store one DICOM file on the writer (see the module for what is sent again)."""
        start = body.tell() if not isinstance(body, bytes) else 0

        def rewind() -> None:
            if not isinstance(body, bytes):
                body.seek(start)

        return self._write(lambda orthanc: orthanc.store_instance(body, size), rewind=rewind, idempotent=True)

    def create_dicom(self, body: IO[bytes]) -> dict[str, Any]:
        """``POST /tools/create-dicom`` on the writer: sent again when busy, or when no connection
        could be made, never when a node failed after taking it (it makes new UIDs each time)."""
        start = body.tell()
        return self._write(
            lambda orthanc: orthanc.create_dicom(body), rewind=lambda: body.seek(start), idempotent=False
        )

    def modalities(self) -> dict[str, dict[str, Any]]:
        return self._read(lambda orthanc: orthanc.modalities())


def connect(
    site: Site,
    settings: SiteSettings,
    topology: configs.Topology,
    *,
    spare_writer: bool = False,
    **options: Any,
) -> Archive:
    """The archive of the installation ``site``: every node of ``topology``, with its credentials;
    ``spare_writer`` for a client whose reads should leave the writer alone (see ``Archive``)."""
    user, password = site.secrets.orthanc_user, site.secrets.orthanc_password
    return Archive(
        [
            Node(node.name, Orthanc(node.url, user, password, **options))
            for node in configs.archive_nodes(settings, topology)
        ],
        spare_writer=spare_writer,
    )
