"""Patients' pages, reached by a study token link: ``/token?{token}``.

A patient needs no account: the 64-character token in the link is the key to one study. The page
shows the institution and the study, and offers the viewer, a zip of the study, and a printable
handout. An expired link says so and whom to contact; an unknown or revoked one gets the same page
as any made-up token. Refused attempts are recorded and, past a limit per client address, refused
outright for a while. Every use is an activity event naming the token's public id, never the token.

Signed-in users get a study's link from the study results (``control.query.links``).
A link names one study of one patient (the archive's study, not its UID alone): while two
patients' studies share its Study Instance UID, none is made and an existing one is held
(``control.tokens.shared``).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import wraps
from typing import Any
from urllib.parse import quote

import segno
import sqlalchemy as sa
from flask import (
    Blueprint,
    Response,
    abort,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf import FlaskForm
from markupsafe import Markup
from wtforms.validators import DataRequired, Length

from control import db, network, services
from control.activity import Outcome, record_activity
from control.errors import error_response, wants_json
from control.events import (
    Action,
    Event,
    TokenIdentityEvent,
    TokenIdentityLockedEvent,
    TokenRefusedEvent,
    TokenUsedEvent,
    ViewerOpenedEvent,
)
from control.fields import TextField
from control.orthanc import ArchiveClient, OrthancError, error_for
from control.settings import SiteSettings
from control.tokens import grants, shared, store

bp = Blueprint("tokens", __name__)

REFUSAL_WINDOW = dt.timedelta(minutes=15)
REFUSAL_LIMIT = 20


@dataclass(frozen=True)
class StudyView:
    """What the patient's page shows of the study, read from the archive."""

    patient_name: str
    study_id: str
    description: str
    date: str
    time: str
    modalities: list[str]
    study_uid: str
    orthanc_id: str
    # The study's documents (modality DOC: attached PDF reports), as (instance id, title), offered
    # on the patient's page on their own.
    reports: tuple[tuple[str, str], ...] = ()


def study_facts(orthanc: ArchiveClient, orthanc_id: str) -> tuple[store.StudyFacts, StudyView]:
    """Read a study from Orthanc, for the token store and for the page."""
    study = orthanc.get_json(f"/studies/{orthanc_id}")
    series = orthanc.get_json(f"/studies/{orthanc_id}/series")
    tags, patient = study.get("MainDicomTags", {}), study.get("PatientMainDicomTags", {})
    modalities = sorted({item.get("MainDicomTags", {}).get("Modality", "") for item in series} - {""})
    facts = store.StudyFacts(
        study_uid=tags.get("StudyInstanceUID", ""),
        orthanc_study_id=orthanc_id,
        patient_name=patient.get("PatientName", ""),
        patient_id=patient.get("PatientID", ""),
        patient_birth_date=patient.get("PatientBirthDate", ""),
        study_date=tags.get("StudyDate", ""),
    )
    view = StudyView(
        patient_name=facts.patient_name,
        study_id=tags.get("StudyID", ""),
        description=tags.get("StudyDescription", ""),
        date=tags.get("StudyDate", ""),
        time=tags.get("StudyTime", ""),
        modalities=modalities,
        study_uid=facts.study_uid,
        orthanc_id=orthanc_id,
        reports=tuple(
            (instance, item.get("MainDicomTags", {}).get("SeriesDescription") or "Report")
            for item in series
            if item.get("MainDicomTags", {}).get("Modality") == "DOC"
            for instance in item.get("Instances", [])
        ),
    )
    return facts, view


def _recent_refusals(connection: sa.Connection, client_address: str) -> int:
    return connection.execute(
        sa.select(sa.func.count()).where(
            db.activity.c.action == str(Action.TOKEN_REFUSED),
            db.activity.c.client_address == client_address,
            db.activity.c.at > db.utcnow() - REFUSAL_WINDOW,
        )
    ).scalar_one()


def _refuse(connection: sa.Connection, reason: str, token: store.StudyToken | None = None) -> None:
    record_activity(
        TokenRefusedEvent(reason=reason, path=request.path),
        Outcome.REFUSED,
        connection=connection,
        token_id=token.public_id if token else "",
        patient=token.row.patient_name if token else "",
        study=token.row.study_uid if token else "",
    )


def _presented_token() -> str:
    # The link is /token?{token}: the whole query string is the token.
    return request.query_string.decode("ascii", "replace")


def _status_page(template: str, status: int, **context: Any):
    response = make_response(render_template(template, **context), status)
    response.headers["Cache-Control"] = "no-store"
    return response


def with_token(view: Callable[..., Any]) -> Callable[..., Any]:
    """Let a request through only with a valid token for a study still in the archive.

    Passes the token and the study's facts to the view; answers the refusal pages otherwise.
    """

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any):
        settings = services.settings()
        now = db.utcnow()
        client_address = request.remote_addr or ""
        with services.engine().begin() as connection:
            if _recent_refusals(connection, client_address) >= REFUSAL_LIMIT:
                _refuse(connection, "too many refused links from this address")
                return _status_page("tokens/blocked.html", 429)
            token = store.find(connection, _presented_token())
            state = token.state(settings.token_days, now.date()) if token else None
            if token is None or state is store.TokenState.REVOKED:
                _refuse(connection, "unknown link" if token is None else "revoked link", token)
                return _status_page("tokens/invalid.html", 404)
            if state is store.TokenState.EXPIRED:
                _refuse(connection, "expired link", token)
                return _status_page(
                    "tokens/expired.html", 410, until=token.accessible_until(settings.token_days)
                )
        orthanc = services.archive()
        try:
            _facts, study = study_facts(orthanc, token.row.orthanc_study_id)
        except OrthancError as error:
            if error.status != 404:
                raise
            with services.engine().begin() as connection:
                _refuse(connection, "study no longer in the archive", token)
            return _status_page("tokens/invalid.html", 404)
        holders = shared.holders(orthanc, token.row.study_uid)
        if len(holders) > 1:
            with services.engine().begin() as connection:
                shared.flag(connection, orthanc, token.row.study_uid, holders, "a patient's link")
                # Not a refused link (those count towards blocking an address): the link is good.
                record_activity(
                    TokenUsedEvent(reason="held: another patient's study has the same Study Instance UID"),
                    Outcome.REFUSED,
                    connection=connection,
                    token_id=token.public_id,
                    patient=token.row.patient_name,
                    study=token.row.study_uid,
                )
            return _status_page("tokens/held.html", 409)
        if needs_identity_check(token) and token.id not in session.get("verified_tokens", []):
            return identity_check(token)
        return view(token, study, *args, **kwargs)

    return wrapper


SHARED_UID = (
    "This study's Study Instance UID is also the UID of another patient's study in the archive: no "
    "link can be made while both are there, as the viewer could not tell them apart. The admin sees "
    "it under Study links; correct or delete one of the studies."
)


def needs_identity_check(token: store.StudyToken) -> bool:
    # Without a birth date on file nothing is asked (see unchecked_link_warning); the admin is told.
    return bool(services.settings().token_identity_check and token.row.patient_birth_date)


class IdentityForm(FlaskForm):
    birth_date = TextField("Date of birth", validators=[DataRequired(), Length(max=10)])


def _parse_birth_date(text: str) -> str | None:
    """A typed birth date as DICOM ``YYYYMMDD``; accepts the HTML date input's ``YYYY-MM-DD`` too."""
    for pattern in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text.strip(), pattern).strftime("%Y%m%d")
        except ValueError:
            continue
    return None


WRONG_BIRTH_DATE = "That is not the date of birth we have for this study."


def identity_check(token: store.StudyToken):
    """Ask for the patient's birth date; count wrong answers towards a lock of this link.

    The downloader (``downloader/``) asks with ``Accept: application/json``: it gets the question
    as JSON (403 ``{"error": "identity check", "message", "csrf_token"}``), asks its user, and
    posts the answer as the page's form does; a locked link answers 429 with the message.
    """
    form = IdentityForm()
    now = db.utcnow()
    if token.identity_locked(now):
        return _identity_locked(token, now)
    if request.method == "POST" and form.validate_on_submit():
        correct = _parse_birth_date(form.birth_date.data) == token.row.patient_birth_date
        about = {"token_id": token.public_id, "patient": token.row.patient_name, "study": token.row.study_uid}
        with services.engine().begin() as connection:
            answer = store.identity_answer(connection, token.id, correct, now)
            if answer is not store.IdentityAnswer.CLOSED:
                record_activity(
                    TokenIdentityEvent(),
                    Outcome.OK if correct else Outcome.REFUSED,
                    connection=connection,
                    **about,
                )
            answered = store.reread(connection, token)
            if answer in (store.IdentityAnswer.LOCKED, store.IdentityAnswer.HELD):
                # The admin's study links page shows it too; a held link waits for their release.
                record_activity(
                    TokenIdentityLockedEvent(
                        locks=answered.row.identity_locks,
                        until="held until an admin releases it"
                        if answered.identity_held
                        else answered.row.identity_locked_until.isoformat(timespec="seconds") + "Z",
                    ),
                    Outcome.REFUSED,
                    connection=connection,
                    **about,
                )
        if answer is store.IdentityAnswer.ACCEPTED:
            session["verified_tokens"] = [token.id, *session.get("verified_tokens", [])][:8]
            return redirect(request.full_path)
        if answer is not store.IdentityAnswer.WRONG:
            return _identity_locked(answered, now)
        form.birth_date.errors = [*form.birth_date.errors, WRONG_BIRTH_DATE]
    if wants_json():
        errors = [*form.birth_date.errors, *form.csrf_token.errors]
        question = jsonify(
            error="identity check",
            message=errors[0] if errors else "This link asks for the patient's date of birth.",
            csrf_token=form.csrf_token.current_token,
        )
        question.status_code = 403
        question.headers["Cache-Control"] = "no-store"
        return question
    return _status_page("tokens/identity.html", 200 if request.method == "GET" else 403, form=form)


def _identity_locked(token: store.StudyToken, now: dt.datetime):
    """The answer while the birth-date question is closed: for how long, or until whom."""
    settings = services.settings()
    contact = f"{settings.institution}, {settings.department}"
    if token.identity_held:
        message = (
            "The date of birth was entered wrongly too many times: this link is held. Please contact "
            f"{contact}, who can open it again."
        )
        minutes = None
    else:
        minutes = max(1, math.ceil((token.row.identity_locked_until - now).total_seconds() / 60))
        message = (
            "The date of birth was entered wrongly too many times: this link is locked for now. Please "
            f"try again in {minutes} minute{'s' if minutes > 1 else ''}, or contact {contact}."
        )
    if wants_json():
        return error_response(429, message)
    return _status_page("tokens/identity_locked.html", 429, held=token.identity_held, minutes=minutes)


def _used(token: store.StudyToken, event: Event) -> None:
    with services.engine().begin() as connection:
        store.record_use(connection, token.id, request.remote_addr or "", db.utcnow())
        record_activity(
            event,
            connection=connection,
            token_id=token.public_id,
            patient=token.row.patient_name,
            study=token.row.study_uid,
        )


@bp.route("/token", methods=["GET", "POST"])
@with_token
def patient_page(token: store.StudyToken, study: StudyView):
    _used(token, TokenUsedEvent(page="study"))
    token_query = _presented_token()
    if wants_json():
        # The downloader (downloader/) given this link: where the list of the study's series is.
        return jsonify(manifest=f"{url_for('tokens.patient_manifest', _external=True)}?{token_query}")
    return _status_page(
        "tokens/patient.html",
        200,
        study=study,
        token_query=token_query,
        until=token.accessible_until(services.settings().token_days),
    )


@bp.route("/token/viewer")
@with_token
def patient_viewer(token: store.StudyToken, study: StudyView):
    """Grant this browser the study for the viewer, then open it."""
    _used(token, ViewerOpenedEvent())
    response = redirect(f"/viewer?StudyInstanceUIDs={quote(study.study_uid)}")
    grants.add(request, response, grants.Grant(token.id, study.study_uid), secure=request.is_secure)
    return response


@bp.route("/token/handout")
@with_token
def patient_handout(token: store.KnownToken, study: StudyView):
    """A printable page for the patient: the link, a QR code of it, and until when it works."""
    _used(token, TokenUsedEvent(page="handout"))
    link = network.token_link(services.settings(), token.token)
    qr_svg = segno.make(link, error="m").svg_inline(scale=4, dark="#000", light="#fff", omitsize=False)
    return _status_page(
        "tokens/handout.html",
        200,
        study=study,
        link=link,
        qr_svg=Markup(qr_svg),  # noqa: S704 - generated by segno from the link, no outside markup
        until=token.accessible_until(services.settings().token_days),
    )


NO_BIRTH_DATE = "none: the study has no birth date"


def unchecked_link_warning(settings: SiteSettings, facts: store.StudyFacts) -> str:
    """What to tell whoever makes a link that will open without the birth-date question, or "".

    Nothing else is asked instead. The patient ID is what the portal could still ask, but it is no
    secret of the patient's: it is printed on the papers and discs that travel with the link, and
    many patients do not know it, so asking it would keep real patients out more often than it would
    keep a finder of the link out.
    """
    if not settings.token_identity_check or facts.patient_birth_date:
        return ""
    return (
        "This study has no date of birth, so its link opens without the birth-date question: whoever "
        "has the link sees the study. Hand it over in person or by a channel only the patient reads, "
        "or revoke it under Administration, Study links."
    )


@bp.route("/token/download")
@with_token
def patient_download(token: store.StudyToken, study: StudyView):
    """The study as a zip, streamed from the archive."""
    _used(token, TokenUsedEvent(page="download"))
    from control.query.downloads import archive_response

    return archive_response(
        "studies",
        study.orthanc_id,
        activity={
            "token_id": token.public_id,
            "patient": token.row.patient_name,
            "study": token.row.study_uid,
        },
    )


@bp.route("/token/report/<instance_id>")
@with_token
def patient_report(token: store.StudyToken, study: StudyView, instance_id: str):
    """A PDF report attached to the study, as the document itself (the browser shows it)."""
    if instance_id not in {instance for instance, _title in study.reports}:
        abort(404)  # the token opens its own study's reports only
    upstream = services.archive().open_raw(f"/instances/{instance_id}/pdf")
    if upstream.status >= 400:
        status = upstream.status
        upstream.close()
        upstream.release_conn()
        if status in (400, 404):
            abort(404)  # a document of the study that is not a PDF
        raise error_for(status, "the archive did not hand out the report")
    _used(token, TokenUsedEvent(page="report"))

    def body() -> Iterator[bytes]:
        # A report that breaks off raises here, so the browser sees a cut answer, never a short PDF.
        try:
            yield from upstream.stream(256 * 1024, decode_content=False)
        finally:
            upstream.close()
            upstream.release_conn()

    response = Response(body(), mimetype="application/pdf", direct_passthrough=True)
    response.headers["Content-Disposition"] = 'inline; filename="report.pdf"'
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.route("/token/manifest")
@with_token
def patient_manifest(token: store.StudyToken, study: StudyView):
    """The downloader's list of the study's series, each zip link carrying this same token."""
    from control.query.downloads import manifest_response
    from control.query.present import PLACEHOLDER

    _used(token, TokenUsedEvent(page="downloader"))
    pattern = url_for("tokens.patient_series_download", series_id=PLACEHOLDER, _external=True)
    token_query = _presented_token()
    return manifest_response(
        "studies",
        study.orthanc_id,
        lambda series_id: f"{pattern.replace(PLACEHOLDER, series_id)}?{token_query}",
    )


@bp.route("/token/series/<series_id>/download")
@with_token
def patient_series_download(token: store.StudyToken, study: StudyView, series_id: str):
    """One series of the study as a zip: the downloader fetches a study series by series."""
    from control.query.downloads import archive_response
    from control.query.views import check_id

    check_id(series_id)
    try:
        series = services.archive().get_json(f"/series/{series_id}")
    except OrthancError as error:
        if error.status == 404:
            abort(404)
        raise
    if series.get("ParentStudy") != study.orthanc_id:
        abort(404)  # the token opens its own study only
    _used(token, TokenUsedEvent(page="series download"))
    return archive_response(
        "series",
        series_id,
        activity={
            "token_id": token.public_id,
            "patient": token.row.patient_name,
            "study": token.row.study_uid,
        },
    )
