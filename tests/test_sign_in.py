"""Signing in and out, and sessions that end, in process (tests/conftest.py's ``app`` and ``client``).

The same rules are used from Chromium and through Caddy in test_users.py and test_https_browser.py;
here they run in a second each, with the server-side session rows changed directly to make a
session old.
"""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from control import db
from control.auth import GENERIC_FAILURE

from conftest import ADMIN_PASSWORD, activity_rows, add_user, csrf_token

pytestmark = pytest.mark.inprocess


def signed_in_as(client) -> str | None:
    """Whose name the page header shows, or None when a page for signed-in users sends to sign-in."""
    page = client.get("/account/password")
    if page.status_code == 302:
        assert page.headers["Location"].startswith("/login?next=")
        return None
    assert page.status_code == 200
    return page.text.split("Signed in as <strong>", 1)[1].split("<", 1)[0]


def test_sign_in_then_out(client, auth, app) -> None:
    assert signed_in_as(client) is None
    response = auth.login()
    assert response.status_code == 302 and response.headers["Location"] == "/"
    assert signed_in_as(client) == "admin"
    response = auth.logout()
    assert response.status_code == 302
    assert "You have signed out." in client.get("/login").text
    assert signed_in_as(client) is None
    assert [row.action for row in activity_rows(app, username="admin")] == ["sign-in", "sign-out"]


def test_a_copied_cookie_signs_nobody_in_after_sign_out(app, client, auth) -> None:
    auth.login()
    copy = app.test_client()
    copy.set_cookie("pacs_session", client.get_cookie("pacs_session").value)
    assert signed_in_as(copy) == "admin"
    auth.logout()
    assert signed_in_as(copy) is None


@pytest.mark.parametrize(
    ("username", "password"),
    [("admin", "not the password"), ("nobody", ADMIN_PASSWORD), ("leaver", "a departed colleague's key")],
)
def test_wrong_unknown_and_inactive_get_one_generic_answer(app, client, auth, username, password) -> None:
    leaver = add_user(app, "leaver", "a departed colleague's key")
    with app.extensions["site"].engine.begin() as connection:
        connection.execute(db.users.update().where(db.users.c.id == leaver.id).values(is_active=False))
    response = auth.login(username, password)
    assert response.status_code == 401
    assert GENERIC_FAILURE in response.text
    assert signed_in_as(client) is None
    assert [(row.action, row.outcome) for row in activity_rows(app, username=username)] == [
        ("sign-in", "refused")
    ]


@pytest.mark.parametrize(
    "fields",
    [{}, {"username": "admin"}, {"password": ADMIN_PASSWORD}, {"username": "a" * 65, "password": "x"}],
)
def test_an_incomplete_sign_in_is_a_clear_400(client, fields) -> None:
    page = client.get("/login")
    response = client.post("/login", data={**fields, "csrf_token": csrf_token(page.text)})
    assert response.status_code == 400
    assert "<form" in response.text and "Traceback" not in response.text


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/admin/users", "/admin/users"),
        ("/query?patient=DOE", "/query?patient=DOE"),
        ("https://elsewhere.example/", "/"),
        ("//elsewhere.example/", "/"),
        ("/\\elsewhere.example", "/"),
        ("javascript:alert(1)", "/"),
        ("", "/"),
    ],
)
def test_sign_in_goes_on_to_a_local_next_only(auth, target: str, expected: str) -> None:
    response = auth.login(next=target)
    assert response.status_code == 302
    assert response.headers["Location"] == expected


def test_an_idle_session_ends_on_the_server_and_the_page_says_so(app, client, auth) -> None:
    auth.login()
    idle = db.utcnow() - dt.timedelta(minutes=31)  # the default idle timeout is 30 minutes
    with app.extensions["site"].engine.begin() as connection:
        connection.execute(db.web_sessions.update().values(last_seen_at=idle))
    response = client.get("/admin/users")
    assert response.status_code == 302 and response.headers["Location"].startswith("/login?next=")
    assert "Your session has ended. Please sign in again." in client.get("/login").text
    assert len(activity_rows(app, action="session-expired")) == 1
    with app.extensions["site"].engine.connect() as connection:
        assert connection.scalar(sa.select(db.web_sessions.c.ended_at)) is not None


def test_a_session_past_its_lifetime_ends_however_busy(app, client, auth) -> None:
    auth.login()
    born = db.utcnow() - dt.timedelta(hours=12, minutes=1)
    with app.extensions["site"].engine.begin() as connection:
        connection.execute(db.web_sessions.update().values(created_at=born))
    assert signed_in_as(client) is None


def test_a_deactivated_user_is_out_on_the_next_request(app, client, auth) -> None:
    reader = add_user(app, "reader", "a reading room passphrase")
    auth.login("reader", "a reading room passphrase")
    assert signed_in_as(client) == "reader"
    with app.extensions["site"].engine.begin() as connection:
        connection.execute(db.users.update().where(db.users.c.id == reader.id).values(is_active=False))
    assert signed_in_as(client) is None
