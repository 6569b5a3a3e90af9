"""``control.access.RULES`` is the only place that grants access, one rule per endpoint.

In process, on an app of its own (no archive needed): the URL map is walked, and every endpoint
must be named by exactly one rule (by its name or by its blueprint's, never both), every
blueprint must serve one audience, and no view may carry a sign-in check of its own beside the
rules (flask-login's ``login_required`` and its kin), which would make a second place to read.
How each audience is refused is tested against a running portal (test_users.py, test_uploads.py).
"""

from __future__ import annotations

from pathlib import Path

import flask_login
import pytest

from control import db
from control.access import RULES, audience_of
from control.app import create_app
from control.site import Site

FLASK_LOGIN = Path(flask_login.__file__).parent
# Signing in is for those who are not signed in yet, signing out for those who are.
MIXED_AUDIENCES = {"auth"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    data = tmp_path_factory.mktemp("access")
    db.migrate(Site(data).engine)
    return create_app({"DATA_DIR": data})


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
