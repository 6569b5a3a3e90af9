"""Caddy in front of several control planes when one has just died (proxy/Caddyfile, ``balanced``).

Real parts: Caddy 2.6.2 with the portal's own configuration, rendered for two control planes; a
real control plane (gunicorn, on a prepared installation) and one that has just died, whose socket
is left behind with nobody listening, as a kill -9 leaves it. Caddy picks between the two at random
while neither has a request in flight, so each round starts a Caddy of its own: in one of two
rounds the first try goes to the dead one. Caddy 2.6.2 then sent the request on with its body
already read (caddyserver/caddy#5454): a form got 502, and the live control plane was left out for
10 s, so every page after it got 503.

A control plane killed with kill -9 takes a tenth of a second to die (its threads, its memory),
and its socket takes connections until the last of its processes is gone: a form sent then is
reset unread. Two real control planes, one killed as the browser sends the sign-in form, show that
the browser is made to send the form again (307) and signs in once. A control plane that had read
the form when it died may have acted on it: that form is never sent again.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from control import db
from control.activity import Action
from control.runtime import configs, files
from control.runtime.stack import gunicorn_argv
from control.site import Site, write_private

from browser import chromium
from conftest import ADMIN_PASSWORD, Stack, free_port, make_stack

pytestmark = pytest.mark.stack

ROUNDS = 8


@pytest.fixture
def installation(tmp_path: Path) -> Iterator[tuple[Site, configs.Topology]]:
    """A prepared installation with one real control plane and the socket of a dead one."""
    stack = make_stack(tmp_path / "data")
    prepared = stack.pacs("prepare")
    assert prepared.returncode == 0, prepared.stderr
    site = Site(stack.data)
    live, dead = files.control_socket(site, 1), files.control_socket(site, 2)
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(str(dead))  # bound once, never listened on: connections are refused
    topology = dataclasses.replace(
        configs.Topology.from_environment(site), control_upstreams=(f"unix/{live}", f"unix/{dead}")
    )
    with (tmp_path / "control.log").open("wb") as log:
        plane = subprocess.Popen(
            gunicorn_argv(site, topology, listen=f"unix:{live}"),
            env={**stack.env, "PACS_DATA": str(site.data), "TMPDIR": str(site.spool)},
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=Path(__file__).parent.parent,
        )
    try:
        deadline = time.monotonic() + 60
        while not live.exists():
            assert plane.poll() is None and time.monotonic() < deadline, "the control plane did not start"
            time.sleep(0.1)
        yield site, topology
    finally:
        plane.terminate()
        plane.wait(30)


def caddy(site: Site, topology: configs.Topology, web_port: int) -> subprocess.Popen:
    settings = dataclasses.replace(site.load_settings(), web_port=web_port)
    write_private(files.caddyfile(site), configs.render_caddy(site, settings, topology))
    configs.write_unavailable(site, settings)
    started = subprocess.Popen(
        ["caddy", "run", "--config", str(files.caddyfile(site)), "--adapter", "caddyfile"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", web_port), timeout=1).close()
            return started
        except OSError:
            assert started.poll() is None and time.monotonic() < deadline, "Caddy did not start"
            time.sleep(0.1)


def test_a_form_sent_as_a_control_plane_dies_reaches_the_other_and_nothing_else_fails(installation) -> None:
    site, topology = installation
    for _round in range(ROUNDS):
        web_port = free_port()
        front = caddy(site, topology, web_port)
        try:
            url = f"http://127.0.0.1:{web_port}"
            # The sign-in form as the browser sends it; the token of another page, so the portal
            # itself answers that the form has expired: an answer of the portal, not of Caddy.
            answer = requests.post(
                f"{url}/login",
                data={"username": "admin", "password": "wrong", "csrf_token": "x"},
                headers={"Origin": url},
                timeout=30,
            )
            assert answer.status_code == 400 and "This form has expired" in answer.text, (
                answer.status_code,
                answer.text[:300],
            )
            pages = [requests.get(f"{url}/login", timeout=30).status_code for _ in range(3)]
            assert pages == [200, 200, 200]
        finally:
            front.terminate()
            front.wait(30)


def start_plane(stack: Stack, site: Site, topology: configs.Topology, number: int) -> subprocess.Popen:
    """Control plane ``number`` on its socket, in a process group of its own (kill -9 takes all)."""
    path = files.control_socket(site, number)
    path.unlink(missing_ok=True)
    with (
        (site.logs / f"access-{number}.log").open("ab") as access,
        (site.logs / f"control-{number}.log").open("ab") as log,
    ):
        plane = subprocess.Popen(
            gunicorn_argv(site, topology, listen=f"unix:{path}"),
            env={
                **stack.env,
                "PACS_DATA": str(site.data),
                "TMPDIR": str(site.spool),
                "PACS_CONTROL_PLANE": str(number),
            },
            stdout=access,
            stderr=log,
            cwd=Path(__file__).parent.parent,
            process_group=0,
        )
    deadline = time.monotonic() + 60
    while True:
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(30)
            try:
                probe.connect(str(path))
                probe.sendall(b"GET /healthz HTTP/1.0\r\nHost: portal\r\n\r\n")
                # 503 too: /healthz also asks the archive, which does not run here.
                if probe.recv(64).split(b" ")[1:2] in ([b"200"], [b"503"]):
                    return plane
            except OSError:
                pass
        assert plane.poll() is None and time.monotonic() < deadline, "the control plane did not start"
        time.sleep(0.1)


def form_posts(site: Site, number: int, path: str) -> int:
    """How many POSTs to ``path`` control plane ``number`` answered (its access log)."""
    log = site.logs / f"access-{number}.log"
    return log.read_text().count(f'"POST {path}"') if log.exists() else 0


def sign_ins(site: Site) -> int:
    with site.engine.connect() as connection:
        return connection.execute(
            sa.select(sa.func.count()).where(db.activity.c.action == Action.SIGN_IN)
        ).scalar_one()


def test_a_form_sent_as_a_killed_control_plane_dies_is_sent_again_by_the_browser_once(
    tmp_path: Path,
) -> None:
    stack = make_stack(tmp_path / "data")
    prepared = stack.pacs("prepare")
    assert prepared.returncode == 0, prepared.stderr
    site = Site(stack.data)
    sockets = [files.control_socket(site, number) for number in (1, 2)]
    topology = dataclasses.replace(
        configs.Topology.from_environment(site), control_upstreams=tuple(f"unix/{path}" for path in sockets)
    )
    planes = {number: start_plane(stack, site, topology, number) for number in (1, 2)}
    web_port = free_port()
    front = caddy(site, topology, web_port)
    url = f"http://127.0.0.1:{web_port}"
    resent = []
    try:
        with chromium() as browser:
            for round_ in range(ROUNDS):
                page = browser.new_context().new_page()
                page.on(
                    "response",
                    lambda response, round_=round_: resent.append(round_) if response.status == 307 else None,
                )
                page.goto(f"{url}/login")
                page.fill("#username", "admin")
                page.fill("#password", ADMIN_PASSWORD)
                victim = planes[1 + round_ % 2]
                os.killpg(victim.pid, signal.SIGKILL)
                with page.expect_navigation():
                    page.click("button[type=submit]")
                assert "Signed in as admin" in page.inner_text("header"), (
                    round_,
                    page.inner_text("main")[:300],
                )
                page.context.close()
                victim.wait(30)
                # The runner starts a killed control plane again; Caddy takes it back once the
                # 10 s it leaves a failed one out are over.
                planes[1 + round_ % 2] = start_plane(stack, site, topology, 1 + round_ % 2)
                time.sleep(11)
    finally:
        front.terminate()
        front.wait(30)
        for plane in planes.values():
            if plane.poll() is None:
                plane.terminate()
                plane.wait(30)
    # Each form was acted on once: one sign-in each, one answered POST each, whichever plane.
    assert sign_ins(site) == ROUNDS, resent
    assert form_posts(site, 1, "/login") + form_posts(site, 2, "/login") == ROUNDS, resent


class ReadsThenDies:
    """A control plane killed once it had read a form (it may have acted on it): it takes each
    request whole, then its connection closes without an answer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.posts = 0
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                received = b""
                while b"\r\n\r\n" not in received:
                    chunk = connection.recv(65536)
                    if not chunk:
                        break
                    received += chunk
                head, _, body = received.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next(
                    (
                        int(line.split(":", 1)[1])
                        for line in lines
                        if line.lower().startswith("content-length:")
                    ),
                    0,
                )
                while len(body) < length:
                    chunk = connection.recv(65536)
                    if not chunk:
                        break
                    body += chunk
                if lines[0].startswith("POST "):
                    self.posts += 1

    def close(self) -> None:
        self.listener.close()


def test_a_form_a_dying_control_plane_had_read_is_never_sent_again(tmp_path: Path) -> None:
    stack = make_stack(tmp_path / "data")
    prepared = stack.pacs("prepare")
    assert prepared.returncode == 0, prepared.stderr
    site = Site(stack.data)
    live, dying = files.control_socket(site, 1), files.control_socket(site, 2)
    topology = dataclasses.replace(
        configs.Topology.from_environment(site), control_upstreams=(f"unix/{live}", f"unix/{dying}")
    )
    plane = start_plane(stack, site, topology, 1)
    reader = ReadsThenDies(dying)
    outcomes = []
    try:
        with chromium() as browser:
            for _round in range(ROUNDS):
                web_port = free_port()
                front = caddy(site, topology, web_port)
                try:
                    url = f"http://127.0.0.1:{web_port}"
                    page = browser.new_context().new_page()
                    # A page Caddy answers itself, so that no control plane is asked before the form.
                    page.goto(f"{url}/dicom-web/studies?limit=-1")
                    posts_before, answered_before = reader.posts, form_posts(site, 1, "/login")
                    with page.expect_navigation():
                        page.evaluate(
                            """() => {
                              const form = document.createElement('form');
                              form.method = 'post';
                              form.action = '/login';
                              for (const [name, value] of [['username', 'admin'], ['password', 'wrong']]) {
                                const field = document.createElement('input');
                                field.name = name;
                                field.value = value;
                                form.append(field);
                              }
                              document.body.append(form);
                              form.submit();
                            }"""
                        )
                    read, answered = (
                        reader.posts - posts_before,
                        form_posts(site, 1, "/login") - answered_before,
                    )
                    text = page.inner_text("body")
                    outcomes.append((read, answered))
                    # Read by the dying one: the restarting page, never sent on; else the portal's answer.
                    assert (read, answered) in ((1, 0), (0, 1)), outcomes
                    if read:
                        assert "The portal is restarting" in text, text[:300]
                    page.context.close()
                finally:
                    front.terminate()
                    front.wait(30)
    finally:
        reader.close()
        plane.terminate()
        plane.wait(30)
