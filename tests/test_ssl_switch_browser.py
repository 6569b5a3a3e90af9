"""The setup page in Chromium: SSL turned on and off again, a renewed certificate, web port 0; and
forms posted to the portal from a page of another origin, over https and over http."""

from __future__ import annotations

import datetime as dt
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Page

from control import accounts
from control.site import Site

from browser import chromium, sign_in, submit
from conftest import (
    ADMIN_PASSWORD,
    SITE_NAME,
    SiteCertificate,
    Stack,
    TLSStack,
    c_store,
    free_port,
    fresh_study,
    make_stack,
)

pytestmark = [pytest.mark.stack, pytest.mark.browser]


def port_answers(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def served_certificate(port: int) -> str:
    """The certificate the web port presents to a new connection, in PEM."""
    return ssl.get_server_certificate(("127.0.0.1", port))


def settings_page(page: Page, base: str) -> None:
    page.goto(f"{base}/admin/settings")
    assert "HTTP server setup" in page.inner_text("main")


def save(page: Page) -> None:
    submit(page, "button:has-text('Save and apply')")


def cookie_names(page: Page) -> set[str]:
    return {cookie["name"] for cookie in page.context.cookies()}


@pytest.mark.parametrize("way_off", ["untick", "clear values"])
def test_ssl_on_and_off_again_from_the_setup_page_keeps_the_admin_signed_in(
    tmp_path: Path, way_off: str
) -> None:
    stack = make_stack(tmp_path / "data", PACS_WEB_SERVER_NAME=SITE_NAME)
    first = SiteCertificate.make(tmp_path / "first")
    renewed = SiteCertificate.make(tmp_path / "renewed", days=90)
    stack.start()
    plain = f"http://{SITE_NAME}:{stack.web_port}"
    secure = f"https://{SITE_NAME}:{stack.web_port}"
    try:
        with chromium(trust=[first, renewed]) as browser:
            page = browser.new_page()
            sign_in(page, stack, "admin", ADMIN_PASSWORD, base=plain)
            settings_page(page, plain)
            page.check("#ssl_enabled")
            page.set_input_files("#certificate", str(first.certificate))
            page.set_input_files("#key", str(first.key))
            save(page)
            # The page waits for the switch, then goes on to the same page over https, signed in.
            page.wait_for_url(f"{secure}/admin/settings?saved=1", timeout=30000)
            assert "Signed in as admin" in page.inner_text("header")
            assert "Saved." in page.inner_text("main")
            assert "__Host-pacs_session" in cookie_names(page)
            assert "pacs_session" not in cookie_names(page)
            assert "valid until" in page.inner_text(".ssl-files")

            # A bookmark of the old address still works: it is sent on to https.
            page.goto(f"{plain}/query")
            assert page.url == f"{secure}/query"

            # A renewed certificate, uploaded from the page.
            settings_page(page, secure)
            page.set_input_files("#certificate", str(renewed.certificate))
            page.set_input_files("#key", str(renewed.key))
            save(page)
            assert "Saved." in page.inner_text("main")
            until = (dt.date.today() + dt.timedelta(days=90)).isoformat()
            assert f"valid until {until}" in page.inner_text(".ssl-files")
            deadline = time.monotonic() + 30
            while served_certificate(stack.web_port) != renewed.certificate.read_text():
                assert time.monotonic() < deadline, "the web server still serves the old certificate"
                time.sleep(0.2)

            # And off again, from the page: the admin is back on http, still signed in.
            settings_page(page, secure)
            if way_off == "untick":
                page.uncheck("#ssl_enabled")
                save(page)
            else:
                submit(page, "button:has-text('Clear values')")
            page.wait_for_url(f"{plain}/admin/settings?saved=1", timeout=30000)
            assert "Signed in as admin" in page.inner_text("header")
            assert "pacs_session" in cookie_names(page)
            page.goto(f"{plain}/query")
            assert page.url == f"{plain}/query"
    finally:
        stack.stop()


def test_web_port_zero_asks_first_and_says_how_to_turn_it_back_on(tmp_path: Path) -> None:
    stack = make_stack(tmp_path / "data")
    stack.start()
    try:
        with chromium() as browser:
            page = browser.new_page()
            sign_in(page, stack, "admin", ADMIN_PASSWORD)
            settings_page(page, stack.url)
            page.fill("#web_port", "0")
            save(page)
            asked = page.inner_text(".confirm")
            assert "unreachable from browsers" in asked
            assert f"config set web_port {stack.web_port}" in asked
            page.click(".confirm a:has-text('Cancel')")
            assert page.input_value("#web_port") == str(stack.web_port)

            page.fill("#web_port", "0")
            save(page)
            submit(page, "button:has-text('Turn web access off')")
            shown = page.inner_text("main")
            assert "Web access is off" in shown
            assert f"config set web_port {stack.web_port}" in shown
            assert ":0/" not in page.content()
        deadline = time.monotonic() + 30
        while port_answers(stack.web_port):
            assert time.monotonic() < deadline, "the web port still answers"
            time.sleep(0.2)
        assert c_store(stack, fresh_study("CT_small.dcm")) == 0
        command = next(line for line in shown.splitlines() if "config set web_port" in line).strip()
        back = stack.pacs(*command.split()[1:])
        assert back.returncode == 0, back.stderr
        assert stack.institution in stack.client().get(f"{stack.url}/").text
    finally:
        stack.stop()


@contextmanager
def attacker_site(page_html: str) -> Iterator[str]:
    """A web server of another origin (another port of this machine) serving one page."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = page_html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def forged_add_user(portal: str, token: str, username: str) -> str:
    return f"""<!doctype html><html><body onload="document.forms[0].submit()">
<form method="post" action="{portal}/admin/users/new">
<input name="csrf_token" value="{token}"><input name="username" value="{username}">
<input name="password" value="intruder password 1"><input name="confirm" value="intruder password 1">
</form></body></html>"""


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_form_posted_from_another_origin_is_refused(scheme: str, stack: Stack, tls_stack: TLSStack) -> None:
    portal = tls_stack if scheme == "https" else stack
    username = f"intruder.{scheme}"
    with chromium(portal) as browser:
        page = browser.new_page()
        sign_in(page, portal, "admin", ADMIN_PASSWORD)
        # Even holding the page's own token (as if it had leaked), the other site's form is refused.
        token = page.get_attribute("meta[name=csrf-token]", "content")
        with attacker_site(forged_add_user(portal.browser_url, token, username)) as attacker:
            with page.expect_navigation(url=f"{portal.browser_url}/admin/users/new"):
                page.goto(attacker)
            assert "did not come from this site" in page.inner_text("main")
        page.goto(f"{portal.browser_url}/admin/users")
        assert "Signed in as admin" in page.inner_text("header")
        assert username not in page.inner_text("main")
    with Site(portal.data).engine.connect() as connection:
        assert accounts.find_by_username(connection, username) is None
