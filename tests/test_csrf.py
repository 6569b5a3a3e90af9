"""Cross-site request forgery, with the headers browsers really send (control.csrf), in process.

Each case sends the admin's "new account" form, with the page's token or without it, and with the
fetch metadata, Origin and Referer a browser would send from the portal's own page, from another
site, from another port of the same host, or under ``Referrer-Policy: no-referrer`` (the patients'
pages). What a refused form must leave behind is nothing: no account is made. Chromium's own
headers against a running portal are in test_https_browser.py and test_users.py.
"""

from __future__ import annotations

import pytest

from control import accounts
from control.csrf import FOREIGN

from conftest import csrf_token

pytestmark = pytest.mark.inprocess

NEW_USER = {
    "username": "new.reader",
    "password": "a reading room passphrase",
    "confirm": "a reading room passphrase",
}
OWN = "http://localhost"  # the test client's origin

ACCEPTED = [
    pytest.param({"Sec-Fetch-Site": "same-origin", "Origin": OWN}, id="same-origin"),
    pytest.param({"Sec-Fetch-Site": "none"}, id="typed-by-the-user"),
    pytest.param({"Origin": OWN}, id="own-origin-without-fetch-metadata"),
    pytest.param({"Origin": "HTTP://LOCALHOST"}, id="own-origin-in-capitals"),
    pytest.param({"Origin": "null"}, id="origin-null-under-no-referrer"),
    pytest.param({}, id="no-origin-no-referer"),
    # Referer is not what decides: a form under no-referrer has none, and a same-origin page sends Origin.
    pytest.param({"Referer": "http://elsewhere.example/"}, id="foreign-referer-alone"),
]
FOREIGN_ORIGINS = [
    pytest.param({"Sec-Fetch-Site": "cross-site", "Origin": "http://elsewhere.example"}, id="cross-site"),
    pytest.param(
        {"Sec-Fetch-Site": "same-site", "Origin": "http://localhost:8443"}, id="same-site-other-port"
    ),
    pytest.param({"Sec-Fetch-Site": "cross-site", "Origin": "null"}, id="cross-site-origin-null"),
    pytest.param({"Origin": "http://elsewhere.example"}, id="foreign-origin"),
    pytest.param({"Origin": "http://localhost:8443"}, id="other-port"),
    pytest.param({"Origin": "https://localhost"}, id="other-scheme"),
    pytest.param({"Origin": "http://localhost.elsewhere.example"}, id="lookalike-host"),
]


def accounts_named(app, username: str) -> int:
    with app.extensions["site"].engine.connect() as connection:
        return sum(user.username == username for user in accounts.list_users(connection))


def send_new_user(client, headers: dict[str, str], with_token: bool = True):
    page = client.get("/admin/users/new")
    data = {**NEW_USER, **({"csrf_token": csrf_token(page.text)} if with_token else {})}
    return client.post("/admin/users/new", data=data, headers=headers)


@pytest.mark.parametrize("headers", ACCEPTED)
def test_a_form_from_the_portals_own_page_is_taken(app, client, auth, headers) -> None:
    auth.login()
    response = send_new_user(client, headers)
    assert response.status_code == 302, response.text
    assert accounts_named(app, "new.reader") == 1


@pytest.mark.parametrize("headers", FOREIGN_ORIGINS)
def test_a_form_from_elsewhere_is_refused_even_with_the_token(app, client, auth, headers) -> None:
    auth.login()
    response = send_new_user(client, headers)
    assert response.status_code == 400
    assert FOREIGN in response.text
    assert accounts_named(app, "new.reader") == 0


@pytest.mark.parametrize("headers", ACCEPTED[:3])
def test_a_form_without_the_pages_token_is_refused(app, client, auth, headers) -> None:
    auth.login()
    response = send_new_user(client, headers, with_token=False)
    assert response.status_code == 400
    assert "This form has expired or did not come from this site." in response.text
    assert accounts_named(app, "new.reader") == 0


def test_another_sessions_token_is_refused(app, client, auth) -> None:
    auth.login()
    stranger = app.test_client()
    foreign_token = csrf_token(stranger.get("/login").text)
    response = client.post("/admin/users/new", data={**NEW_USER, "csrf_token": foreign_token})
    assert response.status_code == 400
    assert accounts_named(app, "new.reader") == 0


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Origin": "null"}, 302),
        ({}, 302),
        ({"Origin": "https://localhost", "Referer": "https://localhost/admin/users/new"}, 302),
        ({"Origin": "http://localhost"}, 400),
    ],
)
def test_over_https_forms_need_no_referer_and_the_https_origin(app, client, auth, headers, status) -> None:
    """Behind Caddy with SSL on, the patients' pages send their forms with no Referer
    (no-referrer): Flask-WTF's strict https check, which demands one, refused every one of them."""
    client.environ_base.update({"HTTP_X_FORWARDED_PROTO": "https", "HTTP_X_FORWARDED_FOR": "192.0.2.9"})
    assert auth.login().status_code == 302
    response = send_new_user(client, headers)
    assert response.status_code == status, response.text
    assert accounts_named(app, "new.reader") == (status == 302)
