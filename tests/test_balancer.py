"""Caddy in front of several control planes when one has just died (proxy/Caddyfile, ``balanced``).

Real parts: Caddy 2.6.2 with the portal's own configuration, rendered for two control planes; a
real control plane (gunicorn, on a prepared installation) and one that has just died, whose socket
is left behind with nobody listening, as a kill -9 leaves it. Caddy picks between the two at random
while neither has a request in flight, so each round starts a Caddy of its own: in one of two
rounds the first try goes to the dead one. Caddy 2.6.2 then sent the request on with its body
already read (caddyserver/caddy#5454): a form got 502, and the live control plane was left out for
10 s, so every page after it got 503.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from control.runtime import configs, files
from control.runtime.stack import gunicorn_argv
from control.site import Site, write_private

from conftest import free_port, make_stack

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
