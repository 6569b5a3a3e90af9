"""The DICOMweb route table is the only spelling of the portal's DICOMweb paths.

``control.dicomweb_routes`` declares which requests the control plane answers and which go to
Orthanc through the gate. Caddy's configuration is rendered from it, the blueprint's URL rules are
its rows' rules and the gate knows the paths it matches. These tests fail when one of them goes
its own way: a matcher written into the Caddyfile by hand, a view registered at a DICOMweb path
the table does not have, a rule that matches other paths than the table says.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from werkzeug.exceptions import HTTPException

from control import db
from control import dicomweb_routes as routes
from control.app import create_app
from control.dicomweb import rules
from control.runtime import configs
from control.site import Site

pytestmark = pytest.mark.inprocess

# Paths around the table's: near misses of each row, and the resources Orthanc answers.
UID = "1.2.840.10008.9.1"
STUDY = f"/dicom-web/studies/{UID}"
INSTANCE = f"{STUDY}/series/1.2/instances/1.2.3"
PATHS = [
    "/dicom-web/studies",
    "/dicom-web/series",
    "/dicom-web/instances",
    "/dicom-web/Studies",
    "/dicom-web/studies/",
    STUDY,
    f"{STUDY}/",
    f"{STUDY}x",
    "/dicom-web/studies/1..2",
    "/dicom-web/studies/.1",
    "/dicom-web/studies/abc",
    f"{STUDY}/metadata",
    f"{STUDY}/series",
    f"{STUDY}/series/1.2",
    f"{STUDY}/series/1.2/metadata",
    f"{STUDY}/series/1.2/instances",
    INSTANCE,
    f"{INSTANCE}/frames/1",
    f"{INSTANCE}/frames/0",
    f"{INSTANCE}/frames/12",
    f"{INSTANCE}/frames/1,2",
    f"{INSTANCE}/frames/1/rendered",
    f"{INSTANCE}/frames/x",
    f"{INSTANCE}/bulk/7fe00010",
    "/wado",
    "/dicom-web/servers",
]
METHODS = ("GET", "POST", "PUT", "DELETE")


@pytest.fixture(scope="module")
def portal(tmp_path_factory):
    data = tmp_path_factory.mktemp("routes")
    db.migrate(Site(data).engine)
    return create_app({"DATA_DIR": data})


def table_endpoint(method: str, path: str) -> str | None:
    """The control plane's view for ``method path`` by the table, or None (Orthanc's, or nobody's)."""
    for route in routes.TO_CONTROL_PLANE:
        if method in route.methods and route.matches(path):
            return f"dicomweb.{route.endpoint}"
    return None


def test_the_blueprint_registers_the_tables_rules_and_no_other_dicomweb_path(portal) -> None:
    served = {
        (rule.rule, rule.endpoint, frozenset(rule.methods - {"HEAD", "OPTIONS"}))
        for rule in portal.url_map.iter_rules()
        if rule.rule.startswith(("/dicom-web", "/wado"))
    }
    declared = {
        (rule, f"dicomweb.{route.endpoint}", frozenset(route.methods) - {"HEAD"})
        for route in routes.TO_CONTROL_PLANE
        for rule in route.rules
    }
    assert served == declared


@pytest.mark.parametrize("path", PATHS)
def test_the_blueprint_answers_exactly_the_paths_of_the_table(portal, path: str) -> None:
    urls = portal.url_map.bind("portal")
    for method in METHODS:
        try:
            endpoint = urls.match(path, method=method)[0]
        except HTTPException:  # not found, or not with this method
            endpoint = None
        assert endpoint == table_endpoint(method, path), (method, path)


@pytest.mark.parametrize("path", PATHS)
def test_the_gate_knows_the_paths_of_the_table_and_no_other(path: str) -> None:
    of_a_row = [route.name for route in routes.ROUTES if route.matches(path)]
    decision = rules.decide("GET", path, rules.Visitor(signed_in=True))
    assert (decision.verdict is not rules.Verdict.NOT_FOUND) == bool(of_a_row), (path, of_a_row)


def test_a_rule_of_the_table_is_plain_text_and_variables() -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        routes.Route("odd", ("GET",), routes.AnsweredBy.CONTROL_PLANE, "", rules=("/dicom-web/a.b",))
    frame = routes.FRAME.match(f"{INSTANCE}/frames/12")
    assert frame == {"study": UID, "series": "1.2", "instance": "1.2.3", "frame": "12"}


def caddy_routes(site: Site, caddyfile: Path) -> list[dict]:
    """The routes of the portal's site in Caddy's own reading of its Caddyfile, rendered there."""
    topology = configs.Topology.from_environment(site)
    caddyfile.write_text(configs.render_caddy(site, site.load_settings(), topology))
    # validate provisions every module: Caddy compiles the table's expressions with Go's RE2.
    subprocess.run(
        ["caddy", "validate", "--config", str(caddyfile), "--adapter", "caddyfile"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    adapted = subprocess.run(
        ["caddy", "adapt", "--config", str(caddyfile), "--adapter", "caddyfile"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    (server,) = json.loads(adapted.stdout)["apps"]["http"]["servers"].values()
    return server["routes"]


def handlers(node: object) -> list[dict]:
    """Every handler below ``node``, in order."""
    if isinstance(node, dict):
        found = [node] if "handler" in node else []
        return found + [handler for value in node.values() for handler in handlers(value)]
    if isinstance(node, list):
        return [handler for item in node for handler in handlers(item)]
    return []


def test_caddy_hands_the_control_plane_the_tables_routes_and_orthanc_the_rest(portal, tmp_path) -> None:
    site = portal.extensions["site"]
    topology = configs.Topology.from_environment(site)
    control = f"{topology.control_upstream}"
    to_control, to_orthanc, refusals, header_changes = [], [], 0, []
    for route in caddy_routes(site, tmp_path / "Caddyfile"):
        matchers = route.get("match", [])
        text = json.dumps(matchers)
        if "/dicom-web" not in text and "/wado" not in text:
            continue
        proxies = [handler for handler in handlers(route["handle"]) if handler["handler"] == "reverse_proxy"]
        if not proxies:
            # Either Caddy answers itself (a refusal), or the route only changes headers and the
            # request goes on to the next.
            if any(handler["handler"] == "static_response" for handler in handlers(route["handle"])):
                refusals += 1
            else:
                header_changes.extend(matcher["path_regexp"]["pattern"] for matcher in matchers)
            continue
        *asked, final = proxies
        gates = [proxy["rewrite"]["uri"] for proxy in asked]
        (matcher,) = matchers
        dial = final["upstreams"][0]["dial"]
        if dial == control:
            assert not to_orthanc, "a control plane's route after Orthanc's catches nothing"
            to_control.append((tuple(matcher["method"]), matcher["path_regexp"]["pattern"], gates))
        else:
            to_orthanc.append((matcher, gates))
    assert to_control == [
        (route.methods, route.caddy_regexp, ["/internal/gate/upload"] if route.upload else [])
        for route in routes.TO_CONTROL_PLANE
    ]
    assert to_orthanc == [({"path": ["/dicom-web/*", "/wado"]}, [routes.GATE])]
    assert refusals == 3  # bad paging, a method override, an encoded body
    assert header_changes == [routes.BULK_DATA]  # bulk data asked for as both plugins serve it
    assert re.match(routes.BULK_DATA, f"{INSTANCE}/bulk/00420011")  # an attached PDF's, as Orthanc names it
    # Whatever the table has goes one of these two ways.
    assert all(re.match(r"\^\(\?:/dicom-web/", pattern) for _methods, pattern, _gates in to_control)
    assert all(path.startswith("/dicom-web/") or path == "/wado" for path in PATHS if routes.known(path))
