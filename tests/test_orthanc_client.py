"""The Orthanc client's answers when the archive is not there, hangs, or refuses (control.orthanc).

Real sockets on 127.0.0.1, no stack: a port nobody listens on, a listener that never answers, and
small HTTP servers that answer what Orthanc answers when it refuses, fails, or cannot reach its
index database. What the pages make of these (a 503 page, "send it again") is tested here in
process and on the real stack in test_stack, test_uploads and test_nodes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from control.nodes import Archive, Node
from control.orthanc import (
    Orthanc,
    OrthancBusy,
    OrthancError,
    OrthancRefused,
    OrthancUnavailable,
    OrthancUnreachable,
)

from conftest import Auth, free_port

pytestmark = pytest.mark.inprocess


def client(port: int, timeout: float = 30) -> Orthanc:
    return Orthanc(f"http://127.0.0.1:{port}", "user", "password", timeout=timeout)


CALLS = {
    "get_json": lambda orthanc: orthanc.get_json("/system"),
    "post_json": lambda orthanc: orthanc.find("Study", {"PatientID": "X"}),
    "store_instance": lambda orthanc: orthanc.store_instance(b"DICM", 4),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_nobody_listening_is_unavailable(call) -> None:
    with pytest.raises(OrthancUnavailable):
        call(client(free_port()))


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_an_archive_that_never_answers_is_unavailable_after_the_timeout(call, silent_port: int) -> None:
    started = time.monotonic()
    with pytest.raises(OrthancUnavailable, match=r"no answer within 0\.3 s"):
        call(client(silent_port, timeout=0.3))
    # GETs and searches are tried twice (a closed pooled connection looks the same), never more.
    assert time.monotonic() - started < 3


@pytest.fixture
def breaking_port() -> Iterator[int]:
    """A server that reads each request, begins an answer and closes midway, as a dying node does."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                connection.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{"Status": ')

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_a_refused_connection_is_told_from_an_answer_broken_off(call, breaking_port: int) -> None:
    # Nothing reached an archive that refused the connection: another node may take even a write.
    with pytest.raises(OrthancUnreachable):
        call(client(free_port()))
    # An archive that took the request and broke off its answer may have acted on it.
    with pytest.raises(OrthancUnavailable) as broken:
        call(client(breaking_port))
    assert not isinstance(broken.value, OrthancUnreachable)


class Refusing(BaseHTTPRequestHandler):
    """Orthanc's answers to a file it refuses and to a broken request."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/instances":
            self._answer(400, {"HttpStatus": 400, "Message": "Bad file format", "Details": "Cannot parse"})
        else:
            self._answer(500, {"HttpStatus": 500, "Message": "Internal error"})

    def do_GET(self) -> None:
        self._answer(404, {"HttpStatus": 404, "Message": "Unknown resource"})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def refusing_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_refusals_carry_the_archives_status_and_reason(refusing_port: int) -> None:
    orthanc = client(refusing_port)
    with pytest.raises(OrthancRefused) as refused:
        orthanc.store_instance(b"not DICOM", 9)
    assert refused.value.status == 400 and refused.value.reason == "Cannot parse"
    with pytest.raises(OrthancError) as missing:
        orthanc.get_json("/studies/nothing")
    assert missing.value.status == 404 and "Unknown resource" in str(missing.value)
    with pytest.raises(OrthancError) as broken:
        orthanc.find("Study", {})
    assert broken.value.status == 500


# Orthanc 1.10.1's answer to every call while its PostgreSQL index restarts, word for word.
INDEX_DOWN = {
    "HttpError": "Service Unavailable",
    "HttpStatus": 503,
    "Message": "The database is currently not available (probably a transient situation)",
    "Method": "GET",
    "OrthancError": "The database is currently not available (probably a transient situation)",
    "OrthancStatus": 36,
    "Uri": "/statistics",
}


def answering(status: int, body: dict) -> type[BaseHTTPRequestHandler]:
    class Answering(Refusing):
        def do_GET(self) -> None:
            self._answer(status, body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self._answer(status, body)

    return Answering


@pytest.fixture
def archive_servers() -> Iterator[dict[str, int]]:
    """Archives on ports of their own: one whose index is down, one that fails, one that answers."""
    handlers = {
        "index down": answering(503, INDEX_DOWN),
        "failing": answering(500, {"HttpStatus": 500, "Message": "Internal error"}),
        "answering": answering(200, {"CountStudies": 7}),
    }
    servers = {name: ThreadingHTTPServer(("127.0.0.1", 0), handler) for name, handler in handlers.items()}
    for server in servers.values():
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {name: server.server_address[1] for name, server in servers.items()}
    for server in servers.values():
        server.shutdown()
        server.server_close()


def test_an_archive_whose_index_is_down_is_unavailable_not_an_error(archive_servers) -> None:
    # What passes (a restarting index) is told from what Orthanc refuses or fails at.
    for call in (lambda orthanc: orthanc.get_json("/statistics"), CALLS["post_json"]):
        with pytest.raises(OrthancBusy) as busy:
            call(client(archive_servers["index down"]))
        assert busy.value.status == 503 and "database is currently not available" in str(busy.value)
        assert not isinstance(busy.value, OrthancError)
    with pytest.raises(OrthancBusy):
        list(client(archive_servers["index down"]).stream_instance_file("x"))
    with pytest.raises(OrthancError) as failed:
        client(archive_servers["failing"]).get_json("/statistics")
    assert failed.value.status == 500 and not isinstance(failed.value, OrthancUnavailable)


def test_a_node_whose_index_is_down_leaves_its_reads_to_the_others(archive_servers) -> None:
    archive = Archive(
        [
            Node("a", client(archive_servers["index down"])),
            Node("b", client(archive_servers["answering"])),
        ]
    )
    # Reads go to the nodes in turn: each of these would reach the node that cannot serve.
    assert [archive.get_json("/statistics") for _ in range(4)] == [{"CountStudies": 7}] * 4
    assert not archive.nodes[0].up and archive.nodes[1].up


@pytest.mark.parametrize(
    ("archive", "status", "says"),
    [
        ("index down", 503, "The archive is not reachable"),
        ("failing", 502, "The archive failed"),
    ],
)
def test_the_home_page_says_the_archive_cannot_answer_and_logs_no_traceback(
    app,
    auth: Auth,
    archive_servers,
    monkeypatch: pytest.MonkeyPatch,
    caplog,
    archive: str,
    status: int,
    says: str,
) -> None:
    auth.login()
    monkeypatch.setitem(app.extensions, "orthanc", client(archive_servers[archive]))
    caplog.clear()
    page = auth.client.get("/")
    assert page.status_code == status, page.text[:300]
    assert says in page.text and "Traceback" not in page.text
    assert not [record for record in caplog.records if record.exc_info], caplog.text


@pytest.fixture
def three_nodes() -> Iterator[dict[str, ThreadingHTTPServer]]:
    """Three archive nodes that answer every read with their own name; the first is the writer."""
    servers = {
        name: ThreadingHTTPServer(("127.0.0.1", 0), answering(200, {"Node": name}))
        for name in ("a", "b", "c")
    }
    for server in servers.values():
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers
    for server in servers.values():
        server.shutdown()
        server.server_close()


def archive_of(servers: dict[str, ThreadingHTTPServer], **options) -> Archive:
    return Archive(
        [Node(name, client(server.server_address[1])) for name, server in servers.items()], **options
    )


def test_the_catalogs_reads_leave_the_writer_to_its_stores_while_another_node_answers(three_nodes) -> None:
    """Each node has one connection to the index: the feeder's bulk reads on the writer waited
    behind its stores, and the catalog fell minutes behind a two-node site storing."""
    everyone = archive_of(three_nodes)
    assert {everyone.get_json("/statistics")["Node"] for _ in range(6)} == {"a", "b", "c"}

    feeder = archive_of(three_nodes, spare_writer=True)
    assert {feeder.get_json("/statistics")["Node"] for _ in range(6)} == {"b", "c"}
    assert {feeder.post_json("/tools/bulk-content", {"Resources": []})["Node"] for _ in range(6)} == {
        "b",
        "c",
    }
    # Writes still go to the writer.
    assert feeder.post_json("/tools/create-archive", {})["Node"] == "a"

    for name in ("b", "c"):
        three_nodes[name].shutdown()
        three_nodes[name].server_close()
    # With no other node left, the writer serves the reads too.
    assert [feeder.get_json("/statistics")["Node"] for _ in range(3)] == ["a"] * 3
