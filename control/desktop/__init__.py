"""The desktop viewer and other DICOMweb viewers: opening the archive to a program, under a token.

Besides the OHIF viewer in the browser, the manual's portal offers a desktop viewer from every
patient, study and series row and from the patient's page. The open one sites use is Weasis:
free, installed on the user's computer, started from a web page by its ``weasis://`` protocol,
reading the archive over DICOMweb. Pressing "Desktop viewer" posts here (with the page's CSRF
token); the portal makes a viewer token for exactly what the row holds
(``credentials.DESKTOP_LIFETIME``) and answers the ``weasis://`` link, which the page then opens
(``static/desktop.js``; without the script, a page with the link to click).

"Access for another viewer" hands a study to any DICOMweb client (a second opinion, a research
viewer): the portal's DICOMweb address and a token that reads that study and nothing else, for a
few days, revocable from the same page and from the admin's study links.

Everything a token may read is decided by the DICOMweb gate (``control.dicomweb``); this module
makes, shows and revokes tokens.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import (
    Blueprint,
    abort,
    flash,
    jsonify,
    make_response,
    redirect,
    render_template,
    request,
)
from flask_login import current_user
from flask_wtf import FlaskForm
from wtforms import SelectField
from wtforms.validators import Length

from control import db, network, services
from control.activity import Outcome, record_activity
from control.auth import safe_next
from control.desktop import credentials
from control.desktop.credentials import Kind, Opened, Scope
from control.errors import wants_json
from control.events import (
    AccessDeniedEvent,
    DesktopViewerOpenedEvent,
    ViewerTokenMadeEvent,
    ViewerTokenRevokedEvent,
)
from control.fields import TextField
from control.query.finder import newest_first
from control.query.views import check_id, get_or_404
from control.tokens import StudyView, with_token
from control.tokens import bp as patients_pages
from control.tokens import store as study_links

bp = Blueprint("desktop", __name__)

# Weasis's official download page (weasis.org, "Getting Started").
WEASIS_DOWNLOAD = "https://weasis.org/en/getting-started/download-dicom-viewer/"
LEVELS = ("patients", "studies", "series")
bp.record_once(lambda state: state.app.jinja_env.globals.update(weasis_download=WEASIS_DOWNLOAD))


def dicomweb_url() -> str:
    """The portal's DICOMweb address as the outside world reaches it (links are for other machines)."""
    return network.public_origin(services.settings()) + "/dicom-web"


def opened_resource(level: str, orthanc_id: str) -> Opened:
    """What a row holds, read from the archive: a patient's studies, one study, or one series."""
    check_id(orthanc_id)
    if level == "patients":
        patient = get_or_404(f"/patients/{orthanc_id}")
        studies = newest_first(get_or_404(f"/patients/{orthanc_id}/studies"))
        tags = patient.get("MainDicomTags", {})
        uids = tuple(study["MainDicomTags"]["StudyInstanceUID"] for study in studies)
        ids = tuple(study["ID"] for study in studies)
        return Opened(Scope.PATIENT, uids, "", tags.get("PatientName", ""), tags.get("PatientID", ""), ids)
    if level == "studies":
        return study_opened(get_or_404(f"/studies/{orthanc_id}"))
    series = get_or_404(f"/series/{orthanc_id}")
    return study_opened(
        get_or_404(f"/studies/{series['ParentStudy']}"), series["MainDicomTags"]["SeriesInstanceUID"]
    )


def study_opened(study: dict[str, Any], series_uid: str = "") -> Opened:
    """A study of the archive (Orthanc's answer), or one series of it, as a token reads it."""
    tags = study.get("PatientMainDicomTags", {})
    return Opened(
        Scope.SERIES if series_uid else Scope.STUDY,
        (study["MainDicomTags"]["StudyInstanceUID"],),
        series_uid,
        tags.get("PatientName", ""),
        tags.get("PatientID", ""),
        (study["ID"],),
    )


def _launched(token: credentials.ViewerToken, secret: str, opened: Opened, base_template: str):
    """The ``weasis://`` link: JSON for the page's script, else a page with the link to click."""
    address = dicomweb_url()
    link = credentials.weasis_link(address, secret, opened)
    if wants_json():
        answer = jsonify(
            link=link,
            token_id=token.public_id,
            expires_at=token.row.expires_at.isoformat() + "Z",
            dicomweb_url=address,
            download=WEASIS_DOWNLOAD,
        )
    else:
        answer = make_response(
            render_template(
                "desktop/launch.html",
                base_template=base_template,
                link=link,
                token=token,
                opened=opened,
                dicomweb_url=address,
                download=WEASIS_DOWNLOAD,
            )
        )
    answer.headers["Cache-Control"] = "no-store"  # it holds the token
    return answer


@bp.route("/desktop/<level>/<orthanc_id>", methods=["POST"])
def launch(level: str, orthanc_id: str):
    """Open a patient's studies, a study or a series in Weasis: make its token, answer the link."""
    if level not in LEVELS:
        abort(404)
    opened = opened_resource(level, orthanc_id)
    now = db.utcnow()
    with services.engine().begin() as connection:
        token, secret = credentials.issue(
            connection,
            opened,
            kind=Kind.DESKTOP,
            expires_at=now + credentials.DESKTOP_LIFETIME,
            now=now,
            client_address=request.remote_addr or "",
            issued_by_user_id=current_user.id,
            issued_by=current_user.username,
        )
        record_activity(
            DesktopViewerOpenedEvent(
                viewer_token=token.public_id,
                expires=token.row.expires_at.isoformat(timespec="minutes"),
                scope=str(opened.scope),
                studies=opened.study_uids,
                series=opened.series_uid or None,
            ),
            connection=connection,
            patient=opened.patient_name,
            study=credentials.study_label(opened.study_uids),
        )
    return _launched(token, secret, opened, "base.html")


@patients_pages.route("/token/desktop-viewer", methods=["POST"])
@with_token
def patient_launch(token: study_links.StudyToken, study: StudyView):
    """A patient opens their study in Weasis: a token for that study, within their link's validity.

    A page of the patients' blueprint, whose audience is anyone holding a link: ``with_token`` has
    checked the link (and the birth date, when the site asks for it).
    """
    now = db.utcnow()
    client_address = request.remote_addr or ""
    link_ends = dt.datetime.combine(
        token.accessible_until(services.settings().token_days) + dt.timedelta(days=1), dt.time()
    )
    opened = Opened(
        Scope.STUDY, (study.study_uid,), "", token.row.patient_name, token.row.patient_id, (study.orthanc_id,)
    )
    with services.engine().begin() as connection:
        study_links.record_use(connection, token.id, client_address, now)
        viewer, secret = credentials.issue(
            connection,
            opened,
            kind=Kind.DESKTOP,
            expires_at=min(now + credentials.DESKTOP_LIFETIME, link_ends),
            now=now,
            client_address=client_address,
            study_token_id=token.id,
        )
        record_activity(
            DesktopViewerOpenedEvent(
                viewer_token=viewer.public_id, expires=viewer.row.expires_at.isoformat(timespec="minutes")
            ),
            connection=connection,
            token_id=token.public_id,
            patient=token.row.patient_name,
            study=study.study_uid,
        )
    return _launched(viewer, secret, opened, "tokens/patient_base.html")


class AccessForm(FlaskForm):
    note = TextField(
        "For whom",
        validators=[Length(max=200)],
        filters=[lambda value: (value or "").strip()],
        description="Shown in the activity log and the study links, e.g. \u201csecond opinion\u201d.",
    )
    days = SelectField(
        "Works for",
        choices=list(credentials.SHARED_LIFETIMES.items()),
        coerce=int,
        default=7,
    )


@bp.route("/desktop/studies/<orthanc_id>/access", methods=["GET", "POST"])
def study_access(orthanc_id: str):
    """Access for another viewer: the DICOMweb address and a token that reads this study alone."""
    check_id(orthanc_id)
    study = get_or_404(f"/studies/{orthanc_id}")
    opened = study_opened(study)
    form = AccessForm()
    made = None
    if form.validate_on_submit():
        now = db.utcnow()
        with services.engine().begin() as connection:
            token, secret = credentials.issue(
                connection,
                opened,
                kind=Kind.SHARED,
                expires_at=now + dt.timedelta(days=form.days.data),
                now=now,
                client_address=request.remote_addr or "",
                issued_by_user_id=current_user.id,
                issued_by=current_user.username,
                note=form.note.data,
            )
            record_activity(
                ViewerTokenMadeEvent(
                    viewer_token=token.public_id,
                    note=form.note.data,
                    expires=token.row.expires_at.isoformat(timespec="minutes"),
                ),
                connection=connection,
                patient=opened.patient_name,
                study=opened.study_uids[0],
            )
        made = {"token": token, "secret": secret}
    with services.engine().connect() as connection:
        listed = credentials.listing(
            connection, services.settings(), study_uid=opened.study_uids[0], kind=Kind.SHARED
        )
    response = make_response(
        render_template(
            "desktop/access.html",
            form=form,
            opened=opened,
            study=study.get("MainDicomTags", {}),
            made=made,
            listed=listed,
            dicomweb_url=dicomweb_url(),
        ),
        200 if made or request.method == "GET" else 400,
    )
    response.headers["Cache-Control"] = "no-store"  # the page shows a new token once
    return response


@bp.route("/desktop/tokens/<int:token_id>/revoke", methods=["POST"])
def revoke(token_id: int):
    """Revoke a viewer token: an admin any, a user those they made. It stops working at once."""
    with services.engine().begin() as connection:
        token = credentials.get(connection, token_id)
        if token is None:
            abort(404)
        if not (current_user.is_admin or token.row.issued_by_user_id == current_user.id):
            record_activity(
                AccessDeniedEvent(path=request.path, method=request.method, viewer_token=token.public_id),
                Outcome.REFUSED,
                connection=connection,
            )
            abort(403)
        if credentials.revoke(connection, token_id, current_user.username, db.utcnow()):
            record_activity(
                ViewerTokenRevokedEvent(viewer_token=token.public_id, kind=token.row.kind),
                connection=connection,
                patient=token.row.patient_name,
                study=credentials.study_label(token.study_uids),
            )
    flash(f"Revoked {token.public_id}: it no longer opens anything.", "info")
    return redirect(safe_next(request.form.get("next")))
