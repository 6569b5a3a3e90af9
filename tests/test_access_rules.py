"""``control.access.RULES`` is the only place that grants access, one rule per endpoint.

In process (no archive needed, tests/conftest.py's ``app``): the URL map is walked, and every endpoint
must be named by exactly one rule (by its name or by its blueprint's, never both), every
blueprint must serve one audience, and no view may carry a sign-in check of its own beside the
rules (flask-login's ``login_required`` and its kin), which would make a second place to read.
Every route is then asked for, in process, by an anonymous caller and by a user without the
right: each is refused unless its rule lets them in. How a browser is refused through Caddy is
tested against a running portal (test_users.py, test_uploads.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import flask_login
import pytest
from flask import Flask
from werkzeug.routing import Rule
from werkzeug.routing.converters import AnyConverter

from control.access import RULES, Audience, audience_of

from conftest import Auth, activity_rows, add_user, csrf_token

pytestmark = pytest.mark.inprocess

FLASK_LOGIN = Path(flask_login.__file__).parent
# Signing in is for those who are not signed in yet, signing out for those who are.
MIXED_AUDIENCES = {"auth"}


def rules_naming(endpoint: str) -> list[str]:
    blueprint = endpoint.rpartition(".")[0]
    return [name for name in (endpoint, f"{blueprint}.*" if blueprint else None) if name in RULES]


def test_every_endpoint_has_exactly_one_rule(app) -> None:
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert len(endpoints) > 50
    assert {
        endpoint: rules_naming(endpoint) for endpoint in endpoints if len(rules_naming(endpoint)) != 1
    } == {}
    named = {name for endpoint in endpoints for name in rules_naming(endpoint)}
    assert set(RULES) - named == set(), "rules for endpoints that are not there"


def test_each_blueprint_serves_one_audience(app) -> None:
    audiences: dict[str, set] = {}
    for rule in app.url_map.iter_rules():
        blueprint = rule.endpoint.rpartition(".")[0]
        audiences.setdefault(blueprint, set()).add(audience_of(rule.endpoint))
    mixed = {
        name: found for name, found in audiences.items() if len(found) > 1 and name not in MIXED_AUDIENCES
    }
    assert mixed == {}


def test_no_view_checks_sign_in_itself(app) -> None:
    def layers(view):
        while view is not None:
            yield view
            view = getattr(view, "__wrapped__", None)

    own_checks = [
        endpoint
        for endpoint, view in app.view_functions.items()
        for layer in layers(view)
        if FLASK_LOGIN in Path(layer.__code__.co_filename).parents
    ]
    assert own_checks == []


def example_path(rule: Rule) -> str:
    """A path the rule matches: each argument the first value its converter takes, or 1."""
    values = {
        name: sorted(converter.items)[0] if isinstance(converter, AnyConverter) else 1
        for name, converter in rule._converters.items()
    }
    return rule.build(values)[1]


def requests_to(app: Flask, audiences: set[Audience | None]) -> list[tuple[str, str]]:
    """Every (method, path) of the URL map whose rule is for one of ``audiences``."""
    return [
        (method, example_path(rule))
        for rule in app.url_map.iter_rules()
        if audience_of(rule.endpoint) in audiences
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"})
    ]


def test_an_anonymous_caller_is_sent_to_sign_in_everywhere_but_the_public_pages(app, client) -> None:
    # The form's token of an anonymous visitor: what is refused is the caller, not a missing token.
    token = csrf_token(client.get("/login").text)
    closed = requests_to(app, set(Audience) - {Audience.PUBLIC})
    assert len(closed) > 40
    answers = {
        (method, path): client.open(path, method=method, data={"csrf_token": token})
        for method, path in closed
    }
    let_in = {
        request: response.status_code
        for request, response in answers.items()
        if not (
            response.status_code == 401
            or (response.status_code == 302 and response.headers["Location"].startswith("/login?next="))
        )
    }
    assert let_in == {}


@pytest.mark.parametrize(
    ("rights", "refused"),
    [({}, {Audience.ADMIN, Audience.UPLOADER}), ({"can_upload": True}, {Audience.ADMIN})],
)
def test_a_user_without_the_right_is_refused_and_it_is_logged(app, client, auth, rights, refused) -> None:
    add_user(app, "reader", "a reading room passphrase", **rights)
    auth.login("reader", "a reading room passphrase")
    token = csrf_token(client.get("/account/password").text)
    closed = requests_to(app, refused)
    answers = {
        (method, path): client.open(path, method=method, data={"csrf_token": token}).status_code
        for method, path in closed
    }
    assert {request: status for request, status in answers.items() if status != 403} == {}
    denied = [json.loads(row.detail) for row in activity_rows(app, username="reader", action="access-denied")]
    assert sorted((detail["method"], detail["path"]) for detail in denied) == sorted(closed)


def test_a_page_nobody_listed_is_closed_to_everyone_admins_too(own_app) -> None:
    app = own_app
    app.add_url_rule("/unlisted", "unlisted", lambda: "the page's secret")
    assert audience_of("unlisted") is None
    client = app.test_client()
    auth = Auth(client)
    assert client.get("/unlisted").status_code == 404
    auth.login()
    response = client.get("/unlisted")
    assert response.status_code == 403
    assert "the page's secret" not in response.text
    assert len(activity_rows(app, username="admin", action="access-denied")) == 1
