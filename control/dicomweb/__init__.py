"""The DICOMweb gate: who may read the archive through ``/dicom-web`` (the viewer's data source).

Most of it does not pass through Python: Caddy asks ``/internal/gate/dicom-web`` before it
proxies a DICOMweb request (``forward_auth``), then streams Orthanc's answer itself, adding
Orthanc's credentials and a ``Forwarded`` header so that the URLs in Orthanc's answers point back
through the portal. Two kinds of request come here instead: searches at the top
(``/dicom-web/studies``, ``/series``, ``/instances``), because a patient's grant must see its own
study whatever the search asks for; and single frames, which the control plane answers from
Orthanc's core at a fraction of the plugin's cost (``control.dicomweb.frames``).

The decision itself is ``rules.decide``; this module finds out who is asking: a signed-in user, a
patient's study grants, or a viewer token (``Authorization: Bearer``, ``control.desktop``), which
alone decides for a request that carries one.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app, g, request
from flask_login import current_user

from control import db
from control.activity import Action, Outcome, record_activity
from control.desktop import credentials as viewer_tokens
from control.dicomweb import relay, rules
from control.dicomweb.frames import FrameRequest
from control.tokens import grants

bp = Blueprint("dicomweb", __name__)


def valid_grants() -> list[grants.Grant]:
    """The browser's study grants whose tokens still work (revoked or expired ones end at once)."""
    presented = grants.read(request)
    if not presented:
        return []
    with current_app.extensions["site"].engine.connect() as connection:
        return grants.still_valid(connection, presented, g.settings["token_days"], db.utcnow().date())


def token_visitor(token: viewer_tokens.ViewerToken) -> rules.Visitor:
    """The gate's visitor for a viewer token that works: its studies, and its series if it has one."""
    return rules.Visitor(
        granted_studies=frozenset(token.study_uids),
        granted_series=frozenset(token.series_uids),
        credential=token.public_id,
    )


def visitor() -> tuple[rules.Visitor, list[grants.Grant]]:
    bearer = viewer_tokens.bearer_secret(request.headers.get("Authorization"))
    if bearer is not None:
        # Judged as the token alone: a cookie beside it must not widen what it reads.
        with current_app.extensions["site"].engine.connect() as connection:
            token, works = viewer_tokens.look_up(connection, bearer, g.settings, db.utcnow())
        g.viewer_token = token
        if token is None or not works:
            return rules.Visitor(credential=token.public_id if token else ""), []
        return token_visitor(token), []
    if current_user.is_authenticated:
        return rules.Visitor(signed_in=True, can_upload=current_user.can_upload), []
    held = valid_grants()
    return rules.Visitor(granted_studies=frozenset(grant.study_uid for grant in held)), held


def _denied(decision: rules.Decision, method: str, path: str, asking: rules.Visitor) -> None:
    if decision.verdict is rules.Verdict.NOT_FOUND:
        return
    record_activity(
        Action.DICOMWEB_DENIED,
        Outcome.REFUSED,
        token_id=asking.credential,
        study=decision.study_uid,
        method=method,
        path=path[:200],
        reason=decision.reason,
    )


@bp.route("/internal/gate/dicom-web")
def gate():
    """Caddy's ``forward_auth`` question: may this DICOMweb request through? (2xx = yes)"""
    method = request.headers.get("X-Forwarded-Method", "GET").upper()
    uri = request.headers.get("X-Forwarded-Uri", "")
    return _verdict(method, uri) or Response("", status=200, mimetype="text/plain")


def _verdict(method: str, uri: str) -> Response | None:
    """None when ``method uri`` may go through; else the refusal, recorded."""
    asking, _held = visitor()
    decision = rules.decide(method, uri, asking)
    if decision.verdict is rules.Verdict.ALLOW:
        _token_used(asking, uri)
        return None
    _denied(decision, method, rules.split_uri(uri)[0], asking)
    status = decision.verdict.value
    body = {401: "Sign-in needed", 403: "Not allowed", 404: "Not found"}[status]
    return Response(body, status=status, mimetype="text/plain")


@bp.route("/dicom-web/studies/<study>/series/<series>/instances/<instance>/frames/<frame>", methods=["GET"])
def retrieve_frame(**_uids: str):
    """A frame the viewer asks for (WADO-RS), which Caddy hands here rather than to Orthanc."""
    uri = rules.request_uri(request.environ)
    refusal = _verdict("GET", uri)
    if refusal is not None:
        return refusal
    wanted = FrameRequest.of(uri)
    accept = request.headers.get("Accept", "")
    origin = relay.origin(request.environ)
    if wanted is not None:
        return _passed_on(current_app.extensions["frames"].answer(wanted, accept, origin))
    return _passed_on(relay.relay(current_app.extensions["orthanc"], uri, accept, origin))


def _token_used(asking: rules.Visitor, uri: str) -> None:
    """Record a viewer token's use in the activity log, when one is due (``viewer_tokens.use_due``)."""
    token = g.get("viewer_token")
    if asking.credential and token is not None:
        viewer_tokens.record_use(token, request.remote_addr or "", rules.split_uri(uri)[0])


def _passed_on(answer: relay.Answer) -> Response:
    return Response(answer.body, status=answer.status, headers=answer.headers, direct_passthrough=True)


@bp.route("/dicom-web/studies", methods=["GET"])
@bp.route("/dicom-web/series", methods=["GET"])
@bp.route("/dicom-web/instances", methods=["GET"])
def search():
    """QIDO-RS searches: unchanged for signed-in users, narrowed to the granted studies for patients."""
    raw_query = request.query_string.decode("latin-1")
    asking, held = visitor()
    decision = rules.decide("GET", request.path, asking)
    if asking.signed_in:
        studies = request.args.get("StudyInstanceUID", "")
        if request.path == "/dicom-web/studies" and studies:
            # The viewer's first question when it opens a study: the one place that sees it open.
            record_activity(Action.VIEWER_OPENED, study=studies[:100], via="dicomweb")
        return _relay(request.path, raw_query)
    if decision.verdict is rules.Verdict.SIGN_IN:
        _denied(decision, "GET", request.path, asking)
        return Response("Sign-in needed", status=401, mimetype="text/plain")
    _token_used(asking, request.path)
    orthanc = current_app.extensions["orthanc"]
    headers = relay.asking(_accept(), relay.origin(request.environ))
    answers: list[Any] = []
    granted = dict.fromkeys(grant.study_uid for grant in held) if held else asking.granted_studies
    # A token scoped to a series (it has one at most) finds that series and its instances alone.
    series_uid = "" if request.path == "/dicom-web/studies" else next(iter(asking.granted_series), "")
    for study_uid in granted:
        narrowed = rules.narrowed_query(raw_query, study_uid)
        if narrowed is not None and series_uid:
            narrowed = rules.narrowed_query(narrowed, series_uid, rules.SERIES_UID_KEYS, "SeriesInstanceUID")
        if narrowed is None:
            continue
        upstream = orthanc.open_raw(_orthanc_target(request.path, narrowed), headers)
        body = relay.Relayed(upstream)
        try:
            found = b"".join(body) if upstream.status == 200 else b""
        finally:
            body.close()
        if found:
            # Whatever the query did, only the granted study's entries leave the portal.
            answers.extend(
                item
                for item in json.loads(found)
                if item.get("0020000D", {}).get("Value") == [study_uid]
                and (not series_uid or item.get("0020000E", {}).get("Value") == [series_uid])
            )
    return Response(json.dumps(answers), status=200, mimetype="application/dicom+json")


def _accept() -> str:
    return request.headers.get("Accept", "application/dicom+json")


def _orthanc_target(path: str, raw_query: str) -> str:
    """The search as Orthanc's QIDO reads it; the raw string goes as is, never re-encoded."""
    query = rules.orthanc_query(raw_query)
    return path + (f"?{query}" if query else "")


def _relay(path: str, raw_query: str) -> Response:
    orthanc = current_app.extensions["orthanc"]
    target = _orthanc_target(path, raw_query)
    return _passed_on(relay.relay(orthanc, target, _accept(), relay.origin(request.environ)))
