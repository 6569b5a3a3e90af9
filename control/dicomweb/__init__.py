"""The DICOMweb gate: who may read the archive through ``/dicom-web`` (the viewer's data source).

Most of it does not pass through Python: Caddy asks ``/internal/gate/dicom-web`` before it
proxies a DICOMweb request (``forward_auth``), then streams Orthanc's answer itself, adding
Orthanc's credentials and a ``Forwarded`` header so that the URLs in Orthanc's answers point back
through the portal. Four kinds of request come here instead: searches at the top
(``/dicom-web/studies``, ``/series``, ``/instances``), because a patient's grant must see its own
study whatever the search asks for, because searches are paged here, and because the study
catalog answers signed-in users' study searches where it can (``control.catalog.qido``); single
frames, which the control plane answers from Orthanc's core at a fraction of the plugin's cost
(``control.dicomweb.frames``); whole studies and series, which Orthanc streams with no length
(``control.dicomweb.relay``); and stores (STOW-RS), which go through the upload page's checks
(``control.uploads.stow``).

The decision itself is ``rules.decide`` and ``rules.owned``; this module finds out who is asking
(a signed-in user, a patient's study grants, or a viewer token: ``Authorization: Bearer``,
``control.desktop``, which alone decides for a request that carries one) and which archive studies
hold the UID asked for.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, g, request
from flask_login import current_user

from control import db, services, spooling
from control import dicomweb_routes as routes
from control.activity import Outcome, record_activity
from control.catalog import qido
from control.catalog.freshness import freshness
from control.desktop import credentials as viewer_tokens
from control.dicomweb import relay, rules
from control.dicomweb.frames import FrameRequest, NotTheGrantedStudy, StudyShared
from control.events import DicomwebDeniedEvent, ViewerOpenedEvent
from control.extensions import csrf
from control.orthanc import OrthancUnavailable
from control.tokens import grants, shared
from control.uploads import discard_small_body, stow

bp = Blueprint("dicomweb", __name__)
# The route table's rules name their variable parts with its converters (uid, number).
bp.record_once(lambda state: state.app.url_map.converters.update(routes.CONVERTERS))

# Request headers the rules read (control.dicomweb.rules); Caddy's forward_auth passes the
# client's headers to the gate as they came.
RULED_HEADERS = (rules.METHOD_OVERRIDE_HEADER, "content-encoding")
MOST_SEARCHED_STUDIES = 100


def valid_grants() -> list[grants.Grant]:
    """The browser's study grants whose tokens still work (revoked or expired ones end at once)."""
    presented = grants.read(request)
    if not presented:
        return []
    with services.engine().connect() as connection:
        return grants.still_valid(connection, presented, services.settings().token_days, db.utcnow().date())


def token_visitor(token: viewer_tokens.ViewerToken) -> rules.Visitor:
    """The gate's visitor for a viewer token that works: its studies, and its series if it has one."""
    return rules.Visitor(
        granted_studies=token.studies,
        granted_series=frozenset(token.series_uids),
        credential=token.public_id,
    )


def visitor() -> tuple[rules.Visitor, list[grants.Grant]]:
    bearer = viewer_tokens.bearer_secret(request.headers.get("Authorization"))
    if bearer is not None:
        # Judged as the token alone: a cookie beside it must not widen what it reads.
        with services.engine().connect() as connection:
            token, works = viewer_tokens.look_up(connection, bearer, services.settings(), db.utcnow())
        g.viewer_token = token
        if token is None or not works:
            return rules.Visitor(credential=token.public_id if token else ""), []
        return token_visitor(token), []
    if current_user.is_authenticated:
        return rules.Visitor(signed_in=True, can_upload=current_user.can_upload), []
    held = valid_grants()
    return rules.Visitor(granted_studies=grants.granted_studies(held)), held


def ruled_headers() -> dict[str, str]:
    return {name: request.headers[name] for name in RULED_HEADERS if name in request.headers}


def _denied(decision: rules.Decision, method: str, path: str, asking: rules.Visitor) -> None:
    if decision.verdict is rules.Verdict.NOT_FOUND:
        return
    record_activity(
        DicomwebDeniedEvent(method=method, path=path[:200], reason=decision.reason),
        Outcome.REFUSED,
        token_id=asking.credential,
        study=decision.study_uid,
    )
    if decision.verdict is rules.Verdict.CONFLICT:
        # Tell the admin (once; see control.tokens.shared).
        with services.engine().begin() as connection:
            shared.flag(
                connection,
                services.archive(),
                decision.study_uid,
                services.study_holders(decision.study_uid),
                "dicomweb",
            )


def _answers(route: routes.Route):
    """Register the decorated view as the answer to ``route``, at each of its rules."""

    def register(view):
        for rule in route.rules:
            bp.add_url_rule(rule, route.endpoint, view, methods=list(route.methods))
        return view

    return register


def _refusal(decision: rules.Decision) -> Response:
    answer = relay.refusal(decision.verdict.value)
    return _passed_on(answer)


@bp.route(routes.GATE)
def gate():
    """Caddy's ``forward_auth`` question: may this DICOMweb request through? (2xx = yes)"""
    method = request.headers.get("X-Forwarded-Method", "GET").upper()
    uri = request.headers.get("X-Forwarded-Uri", "")
    try:
        return _verdict(method, uri) or Response("", status=200, mimetype="text/plain")
    except OrthancUnavailable:
        # Caddy hands this answer to the viewer: the words Caddy itself uses when Orthanc is down.
        return Response(
            "The image archive is not reachable at the moment. Please try again in a minute.",
            status=503,
            mimetype="text/plain",
            headers={"Retry-After": "30"},
        )


def decision_for(method: str, uri: str, asking: rules.Visitor) -> rules.Decision:
    """The rules' answer, then, for a request that names a study, the archive's say on who holds
    its UID (frames are left to control.dicomweb.frames, which knows the study already)."""
    decision = rules.decide(method, uri, asking, ruled_headers())
    study_uid = rules.study_named(uri)
    if decision.verdict is rules.Verdict.ALLOW and study_uid and FrameRequest.of(uri) is None:
        decision = rules.owned(decision, asking, study_uid, services.study_holders(study_uid))
    return decision


def _verdict(method: str, uri: str) -> Response | None:
    """None when ``method uri`` may go through; else the refusal, recorded."""
    asking, _held = visitor()
    decision = decision_for(method, uri, asking)
    if decision.verdict is rules.Verdict.ALLOW:
        _token_used(asking, uri)
        return None
    _denied(decision, method, rules.split_uri(uri)[0], asking)
    return _refusal(decision)


@_answers(routes.FRAME)
def retrieve_frame(**_uids: str):
    """A frame the viewer asks for (WADO-RS), which Caddy hands here rather than to Orthanc."""
    uri = rules.request_uri(request.environ)
    refusal = _verdict("GET", uri)
    if refusal is not None:
        return refusal
    wanted = FrameRequest.of(uri)
    accept = request.headers.get("Accept", "")
    origin = relay.origin(request.environ)
    if wanted is None:
        return _passed_on(relay.relay(services.archive(), uri, accept, origin))
    asking, _held = visitor()
    granted = "" if asking.signed_in else asking.granted_studies.get(wanted.study, "")
    try:
        return _passed_on(services.frames().answer(wanted, accept, origin, granted))
    except (StudyShared, NotTheGrantedStudy):
        allowed = rules.decide("GET", uri, asking)
        decision = rules.owned(allowed, asking, wanted.study, services.study_holders(wanted.study))
    if decision.verdict is rules.Verdict.ALLOW:
        decision = rules.Decision(rules.Verdict.NOT_FOUND, "the study changed meanwhile", wanted.study)
    _denied(decision, "GET", wanted.path, asking)
    return _refusal(decision)


@_answers(routes.STORE)
@csrf.exempt  # a cross-site page cannot send multipart/related without a preflight: see stow
def store_instances(study: str = ""):
    """STOW-RS: instances into the archive, through the upload page's checks (control.uploads.stow)."""
    uri = rules.request_uri(request.environ)
    asking, _held = visitor()
    decision = rules.decide("POST", uri, asking, ruled_headers())
    if decision.verdict is not rules.Verdict.ALLOW:
        discard_small_body()
        _denied(decision, "POST", rules.split_uri(uri)[0], asking)
        return _refusal(decision)
    return stow.receive(study)


@_answers(routes.RETRIEVE)
def retrieve_instances(**_uids: str):
    """A whole study or series (WADO-RS), which Caddy hands here rather than to Orthanc: Orthanc
    streams it with no length, so only a relay that checks its end can tell a cut one from a
    whole one (``relay.Relayed``)."""
    uri = rules.request_uri(request.environ)
    refusal = _verdict("GET", uri)
    if refusal is not None:
        return refusal
    return _passed_on(
        relay.relay(
            services.archive(),
            uri,
            request.headers.get("Accept", 'multipart/related; type="application/dicom"'),
            relay.origin(request.environ),
            spooling.client_gone(request.environ),
        )
    )


def _token_used(asking: rules.Visitor, uri: str) -> None:
    """Record a viewer token's use in the activity log, when one is due (``viewer_tokens.use_due``)."""
    token = g.get("viewer_token")
    if asking.credential and token is not None:
        viewer_tokens.record_use(token, request.remote_addr or "", rules.split_uri(uri)[0])


def _passed_on(answer: relay.Answer) -> Response:
    return Response(answer.body, status=answer.status, headers=answer.headers, direct_passthrough=True)


@_answers(routes.SEARCH)
def search():
    """QIDO-RS searches, paged (``rules.search_limit``): as asked for signed-in users, narrowed to
    the granted studies for patients. A search naming a UID two patients share is refused."""
    raw_query = request.query_string.decode("latin-1")
    asking, _held = visitor()
    decision = rules.decide("GET", request.full_path.rstrip("?"), asking, ruled_headers())
    to_granted = decision.verdict is rules.Verdict.DENY and bool(asking.granted_studies)
    if decision.verdict is not rules.Verdict.ALLOW and not to_granted:
        _denied(decision, "GET", request.path, asking)
        return _refusal(decision)
    try:
        rest, limit = rules.search_limit(raw_query)
    except ValueError as error:
        return _passed_on(relay.refusal(400, f"Bad request: {error}."))
    if asking.signed_in:
        asked = rules.searched_studies(raw_query)
        if len(asked) > MOST_SEARCHED_STUDIES:
            return _passed_on(
                relay.refusal(400, f"Bad request: ask for {MOST_SEARCHED_STUDIES} studies at most.")
            )
        for study_uid in asked:
            refused = rules.owned(decision, asking, study_uid, services.study_holders(study_uid))
            if refused.verdict is not rules.Verdict.ALLOW:
                _denied(refused, "GET", request.path, asking)
                return _refusal(refused)
        if request.path == routes.STUDIES and asked:
            # The viewer's first question when it opens a study: the one place that sees it open.
            record_activity(ViewerOpenedEvent(via="dicomweb"), study=",".join(asked)[:100])
        return _catalog_answer(rest, limit) or _paged_answer(request.path, rest, limit)
    _token_used(asking, request.path)
    # A token scoped to a series (it has one at most) finds that series and its instances alone.
    series_uid = "" if request.path == routes.STUDIES else next(iter(asking.granted_series), "")
    answers: list[Any] = []
    for study_uid, orthanc_study_id in asking.granted_studies.items():
        narrowed = rules.narrowed_query(rest, study_uid)
        if narrowed is not None and series_uid:
            narrowed = rules.narrowed_query(narrowed, series_uid, rules.SERIES_UID_KEYS, "SeriesInstanceUID")
        if narrowed is None:
            continue
        if services.study_holders(study_uid) != [orthanc_study_id]:
            continue  # the patient's page says why: the study is held (control.tokens)
        _status, found, _more = _search_orthanc(request.path, narrowed, limit)
        # Whatever the query did, only the granted study's entries leave the portal.
        answers.extend(
            item
            for item in found
            if item.get("0020000D", {}).get("Value") == [study_uid]
            and (not series_uid or item.get("0020000E", {}).get("Value") == [series_uid])
        )
    return Response(json.dumps(answers[:limit]), status=200, mimetype="application/dicom+json")


def _accept() -> str:
    return request.headers.get("Accept", "application/dicom+json")


def _orthanc_target(path: str, raw_query: str) -> str:
    """The search as Orthanc's QIDO reads it; the raw string goes as is, never re-encoded."""
    query = rules.orthanc_query(raw_query)
    return path + (f"?{query}" if query else "")


def _search_orthanc(path: str, raw_query: str, limit: int) -> tuple[int, list[Any], bool]:
    """Orthanc's status and JSON answer to a search (at most ``limit`` entries), and whether it had
    more. The page is read whole: ``MAX_LIMIT`` entries of a few kB at most."""
    target = _orthanc_target(path, "&".join(part for part in (raw_query, f"limit={limit + 1}") if part))
    upstream = services.archive().open_raw(
        target, relay.asking("application/dicom+json", relay.origin(request.environ))
    )
    body = relay.Relayed(upstream)
    try:
        found = b"".join(body) if upstream.status == 200 else b"[]"
    finally:
        body.close()
    entries = json.loads(found or b"[]")
    return upstream.status, entries[:limit], len(entries) > limit


def _catalog_answer(rest: str, limit: int) -> Response | None:
    """A signed-in user's study search answered from the catalog (``control.catalog.qido``), or
    None when the catalog cannot answer it now: then the archive does. A search for given studies
    waits for the catalog to hold every change: the viewer asks so for a study just stored."""
    if request.path != routes.STUDIES or "xml" in _accept():
        return None
    search = qido.parse(rest)
    if search is None:
        return None
    with services.engine().connect() as connection:
        fresh = freshness(connection, services.archive())
        if not fresh.usable or (fresh.behind and search.study_uids):
            return None
        rows, more = qido.find(connection, search, limit)
    portal = relay.origin(request.environ)
    return _page([qido.answer(row, search, portal) for row in rows], more)


def _paged_answer(path: str, rest: str, limit: int) -> Response:
    """A signed-in user's search, from the archive: in JSON, with a warning when there is more
    than the page."""
    if "xml" in _accept():
        target = _orthanc_target(path, "&".join(part for part in (rest, f"limit={limit}") if part))
        return _passed_on(relay.relay(services.archive(), target, _accept(), relay.origin(request.environ)))
    status, found, more = _search_orthanc(path, rest, limit)
    if status != 200:
        return _passed_on(relay.refusal(status))
    return _page(found, more)


def _page(found: list[Any], more: bool) -> Response:
    response = Response(json.dumps(found), status=200, mimetype="application/dicom+json")
    if more:
        # DICOM PS3.18's way of saying that a search answered a page of what it found.
        response.headers["Warning"] = (
            '299 - "The number of results exceeded the maximum supported by the server. '
            'Additional results can be requested."'
        )
    return response
