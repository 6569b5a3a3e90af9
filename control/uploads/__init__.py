"""Uploads: DICOM files, zips of DICOM, HL7 orders into the worklist, PDF reports into studies.

Only users whose account may upload reach these pages (``control.access``: ``Audience.UPLOADER``);
the worklist the HL7 orders fill is the admin's to see and change (``control.admin.worklist``).
Before Caddy passes an upload's body on, it asks ``upload_gate`` (``forward_auth``), which refuses
one whose declared size is over ``upload_max_mb`` (from anyone) or that the archive's disk cannot
take (``disk_reserve_mb``): that body is never sent. Every POST that does come then passes
``guard``, in this order: access control (already done by then), the same size limit and disk
reserve again (for a body of no declared length, and for a control plane reached another way), and
only then the CSRF check, whose reading of the form is what makes Werkzeug spool the body. So a
refused upload is never spooled or stored (a small one is read and dropped, so that the refusal
reaches the browser), and the limits are in force before a byte is stored. The limits live here
only: changing them never touches Caddy's configuration.

Answers are JSON for ``Accept: application/json`` (the page's script) and pages or redirects with a
message for browsers. Every upload is one activity event with its counts, recorded as "not
completed" when the files start going to the archive and brought up to date as they do, so that a
worker killed in the middle leaves a row saying how far it got. A disk that fills while an upload
arrives gets 507, like a disk already too full. Every worklist change and every attached PDF is
one event too.
"""

from __future__ import annotations

import errno
import re
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from control import formatting, services
from control.activity import Outcome, record_activity, update_activity
from control.auth import safe_next
from control.errors import error_response, wants_json
from control.events import PdfAttachedEvent, UploadEvent, WorklistOrderEvent
from control.extensions import csrf
from control.identifiers import is_orthanc_id, is_uid
from control.orthanc import OrthancError, OrthancUnavailable
from control.uploads import archive, pdf, store

bp = Blueprint("uploads", __name__, url_prefix="/upload")
# Caddy's question before an upload's body comes (its own blueprint: its path is not under /upload).
gate = Blueprint("upload_gate", __name__)

# The CSRF check runs in ``guard``, after access control and the size and disk checks (see above).
csrf.exempt(bp)

UPLOADS = {"uploads.upload_files", "uploads.attach_pdf", "uploads.attach_pdf_to_study"}
FORM_BUFFER_BYTES = 1024 * 1024
DISCARD_LIMIT = 16 * 1024 * 1024  # a refused body up to this size is read before the refusal
_WILDCARDS = re.compile(r"[*?\\]")
# The studies a PDF report's study reference may name: more than one is already an ambiguity.
ATTACH_CANDIDATES = 20
# What an upload's activity row says until its files are all dealt with (see the module).
NOT_COMPLETED = "not completed (still storing, or the portal stopped while storing)"


def _limit_bytes() -> int:
    return services.settings().upload_max_mb * store.MB


def _disk() -> store.DiskGuard:
    return store.DiskGuard(services.site().orthanc_storage, services.settings().disk_reserve_mb * store.MB)


@gate.route("/internal/gate/upload")
def upload_gate():
    """Caddy's ``forward_auth`` question before it passes a POST under /upload, or a DICOMweb
    store, on: may its body come? (2xx = yes; any other answer goes to the browser instead, and the
    body is never sent.)

    Only the upload forms and DICOMweb stores are judged, by the length Caddy saw declared
    (``X-Upload-Length``): over the limit from anyone, the disk from users who may upload (the
    others are refused by access control once the request comes). The rest may come.
    """
    path = request.headers.get("X-Forwarded-Uri", "").split("?", 1)[0]
    try:
        endpoint, _arguments = current_app.url_map.bind("localhost").match(path, method="POST")
    except HTTPException:
        endpoint = None
    declared = request.headers.get("X-Upload-Length", "")
    length = int(declared) if declared.isdigit() else 0
    if endpoint in UPLOADS or endpoint == "dicomweb.store_instances":
        if length > _limit_bytes():
            return _too_large(length)
        if current_user.is_authenticated and current_user.can_upload:
            problem = _disk().problem(length)
            if problem:
                return _disk_full(problem)
    return Response("", status=200, mimetype="text/plain")


@bp.before_request
def guard():
    """Size, disk space, then CSRF, for every POST here (after access control: see the module)."""
    if request.method != "POST":
        return None
    if request.endpoint in UPLOADS:
        request.environ["wsgi.input"] = CountedBody(request.environ["wsgi.input"])
        request.max_content_length = _limit_bytes()
        # Werkzeug's multipart reader also holds up to this much of a file part in its buffer: the
        # app-wide 64 kB (meant for text fields) would refuse every file larger than that.
        request.max_form_memory_size = FORM_BUFFER_BYTES
        if (request.content_length or 0) > _limit_bytes():
            discard_small_body()
            return _too_large(request.content_length)
        problem = _disk().problem(request.content_length or 0)
        if problem:
            discard_small_body()
            return _disk_full(problem)
    csrf.protect()
    return None


def _disk_full(problem: str):
    record_activity(UploadEvent(reason="disk nearly full"), Outcome.REFUSED)
    return _refusal(507, problem)


@bp.errorhandler(OSError)
def disk_filled(error: OSError):
    """The disk filled while an upload arrived (Werkzeug spools it into the data directory)."""
    if error.errno != errno.ENOSPC:
        current_app.logger.exception("Unexpected error on %s %s", request.method, request.path)
        return error_response(500)
    # The partly spooled body (held by the frames of the traceback) is let go before the refusal
    # is written to the same disk.
    error.__traceback__ = None
    return _disk_full(
        "The archive's disk filled up while this upload arrived; nothing of it was stored. "
        "Uploads are refused until an administrator makes room; then send it again."
    )


def discard_small_body() -> None:
    """Read and drop a refused upload's body when it is small, before answering.

    An answer sent while Caddy is still passing the body on reached the browser as a 502 about one
    time in thirty, instead of the refusal. Caddy never sends a body declared larger than the limit
    (it asks ``upload_gate`` first), so only a control plane reached some other way receives
    anything large; that is not read.
    """
    length = request.content_length or 0
    if length > DISCARD_LIMIT:
        return
    body = request.environ["wsgi.input"]
    while length > 0:
        chunk = body.read(min(length, FORM_BUFFER_BYTES))
        if not chunk:
            break
        length -= len(chunk)


class CountedBody:
    """The request body as the server hands it, counting the bytes that really arrived.

    A body can end before its ``Content-Length`` (the client stopped; Caddy then cuts the request
    and answers the client 502 itself) after a complete closing boundary: the form reads as
    whole, and only the count tells that the upload did not arrive. gunicorn's reader cannot say.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.received += len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data = self.stream.readline(size)
        self.received += len(data)
        return data


def body_incomplete() -> str:
    """After the form was read: why the body is not all there (read to its end first), or ''."""
    counted = request.environ["wsgi.input"]
    declared = request.content_length
    if not isinstance(counted, CountedBody) or declared is None:
        return ""
    while counted.received < declared and counted.read(min(declared - counted.received, FORM_BUFFER_BYTES)):
        pass
    if counted.received >= declared:
        return ""
    return f"the upload ended after {counted.received:,} of its {declared:,} bytes"


@bp.errorhandler(RequestEntityTooLarge)
def body_too_large(_error: RequestEntityTooLarge):
    """A body without a declared length that went past the limit while being read."""
    return _too_large(request.content_length)


def _too_large(length: int | None):
    limit_mb = services.settings().upload_max_mb
    record_activity(
        UploadEvent(reason="too large", bytes=length, limit_mb=limit_mb),
        Outcome.REFUSED,
    )
    return error_response(
        413,
        f"This upload is larger than the {limit_mb} MB this server accepts in one request. Send "
        "fewer files at once, or split the zip file.",
    )


def _refusal(status: int, message: str, *, back: str | None = None):
    """A refusal: JSON for scripts, else a redirect to ``back`` (default: the upload page) with the
    message. ``guard`` never passes ``back``: reading the form would read the whole upload."""
    if wants_json():
        return jsonify({"error": "refused", "message": message, "status": status}), status
    flash(message, "error")
    return redirect(safe_next(back or url_for("uploads.page")), 303)


def _back() -> str | None:
    return request.form.get("next")


@bp.route("")
def page():
    """The upload page: files (DICOM, zip, HL7) and the PDF report form."""
    return render_template("uploads/upload.html", results=None, counts=None, studies=None)


@bp.route("/files", methods=["POST"])
def upload_files():
    """Store DICOM files and zips of DICOM files, and schedule HL7 orders.

    Form fields: ``files`` (one or more files), ``csrf_token`` (or an ``X-CSRFToken`` header).
    Answer: ``{"results": [{"name", "outcome", "detail", "study", "patient"}...], "counts": {...}}``
    for JSON clients (outcome: stored, duplicate, refused, skipped, scheduled, replaced or
    cancelled), else the upload page with the results table.
    """
    files: list[FileStorage] = [file for file in request.files.getlist("files") if file.filename]
    incomplete = body_incomplete()
    if incomplete:
        # Nothing is stored from a body that did not arrive whole: the client hears of a failure.
        record_activity(UploadEvent(reason=incomplete, bytes=request.content_length), Outcome.REFUSED)
        return _refusal(400, f"Nothing was stored: {incomplete}. Please send the files again.")
    if not files:
        return _refusal(400, "Choose one or more files to upload.", back=_back())
    names = [file.filename or "" for file in files][:20]
    event = record_activity(UploadEvent(files=names, state=NOT_COMPLETED), Outcome.FAILED)

    def progress(counts: dict[str, int]) -> None:
        shown: dict[str, Any] = store.shown_counts(counts)
        update_activity(event, Outcome.FAILED, UploadEvent(files=names, state=NOT_COMPLETED, **shown))

    upload = store.Upload(
        orthanc=services.archive(),
        worklists=services.site().worklists,
        zip_limits=archive.ZipLimits(max_unpacked=services.settings().upload_max_unpacked_mb * store.MB),
        disk=_disk(),
        on_progress=progress,
        date_format=services.settings().date_format,
    )
    try:
        for file in files:
            upload.receive(file.filename or "", file.stream)
    finally:
        results = upload.finish()
    counts = upload.counts()
    for order, change in upload.orders:
        record_activity(
            WorklistOrderEvent(
                accession=order.accession_number,
                change=str(change),
                modality=order.modality,
                station=order.station_aet,
            ),
            patient=formatting.patient_label(order.patient_name, order.patient_id),
            patient_id=order.patient_id,
        )
    touched = store.summary(results)
    stored_anything = any(
        counts[name] for name in ("stored", "duplicate", "scheduled", "replaced", "cancelled")
    )
    shown: dict[str, Any] = store.shown_counts(counts)
    update_activity(
        event,
        Outcome.OK if stored_anything or not counts["refused"] else Outcome.REFUSED,
        UploadEvent(files=names, studies=touched["studies"], **shown),
        patient=touched["patient"],
        study=touched["study"],
    )
    studies = study_summaries(results)
    if wants_json():
        return jsonify(
            {"results": [result.as_json() for result in results], "counts": counts, "studies": studies}
        )
    return render_template(
        "uploads/upload.html",
        results=results,
        counts=counts,
        studies=studies,
        outcome_words={outcome.name.lower(): str(outcome) for outcome in store.Outcome},
    )


# An upload's summary names at most this many studies as the archive holds them (one GET each);
# the others as their files said.
SUMMARY_LOOKUPS = 50


def study_summaries(results: list[store.FileResult]) -> list[dict[str, Any]]:
    """One summary per study an upload touched: the patient and the study as the archive now holds
    them (as the files said, for a study none of whose files was stored), how many of its files
    were stored, already there or refused, and the link to its series. Files of no study (HL7
    orders, files refused before their study was known) have none."""
    date_format = services.settings().date_format
    by_study: dict[str, dict[str, Any]] = {}
    for result in results:
        if not result.study:
            continue
        summary = by_study.setdefault(
            result.study,
            {
                "study_instance_uid": result.study,
                "study_id": "",
                "patient": result.patient,
                "stored": 0,
                "duplicate": 0,
                "refused": 0,
            },
        )
        summary["study_id"] = summary["study_id"] or result.study_id
        counted = {store.Outcome.STORED: "stored", store.Outcome.DUPLICATE: "duplicate"}
        summary[counted.get(result.outcome, "refused")] += 1
    for number, summary in enumerate(by_study.values()):
        summary.update(date="", description="", accession_number="", url="")
        if not summary["study_id"]:
            continue
        summary["url"] = url_for("query.study_series", orthanc_id=summary["study_id"])
        if number >= SUMMARY_LOOKUPS:
            continue
        try:
            study = services.archive().get_json(f"/studies/{summary['study_id']}")
        except (OrthancError, OrthancUnavailable):
            continue  # the files' own words stand
        tags, patient = study.get("MainDicomTags", {}), study.get("PatientMainDicomTags", {})
        summary["patient"] = formatting.patient_label(patient.get("PatientName"), patient.get("PatientID"))
        summary["date"] = formatting.when(tags.get("StudyDate"), tags.get("StudyTime"), date_format)
        summary["description"] = tags.get("StudyDescription") or ""
        summary["accession_number"] = tags.get("AccessionNumber") or ""
    return list(by_study.values())


@bp.route("/studies/<study_id>/pdf", methods=["POST"])
def attach_pdf_to_study(study_id: str):
    """Attach a PDF report to the study ``study_id`` (Orthanc's id) as a new Encapsulated PDF series.

    Form fields: ``file`` (the PDF), ``title`` (optional: the series description and document
    title, kept in the study's character set; default the file's name), ``next`` (optional: a
    local page to return to), ``csrf_token`` (or an ``X-CSRFToken`` header).
    Answers: for ``Accept: application/json``, 201 ``{"instance", "series", "study",
    "study_instance_uid", "title", "pages"}``, or an error status (400 not a PDF, 404 no such
    study, 413 too large, 507 disk full) with ``{"error", "message"}``. Browsers are sent back to
    ``next`` (default: the upload page) with a message.
    """
    if not is_orthanc_id(study_id):
        return _refusal(404, "There is no such study in the archive.", back=_back())
    return _attach(study_id)


@bp.route("/pdf", methods=["POST"])
def attach_pdf():
    """Attach a PDF report to the study named by ``study``: its StudyInstanceUID or accession number.

    Other fields and answers as for ``attach_pdf_to_study``.
    """
    wanted = request.form.get("study", "").strip()
    if not wanted or _WILDCARDS.search(wanted):
        return _refusal(
            400, "Give the study's Study Instance UID or accession number (no wildcards).", back=_back()
        )
    found: list[str] = []
    if is_uid(wanted):
        found = services.archive().find_studies({"StudyInstanceUID": wanted}, limit=ATTACH_CANDIDATES)
    if not found:
        found = services.archive().find_studies({"AccessionNumber": wanted}, limit=ATTACH_CANDIDATES)
    if not found:
        return _refusal(
            404, f"No study in the archive has the UID or accession number {wanted}.", back=_back()
        )
    if len(found) > 1:
        return _refusal(
            409,
            f"{len(found) if len(found) < ATTACH_CANDIDATES else 'Many'} studies have the accession "
            f"number {wanted}: give the Study Instance UID.",
            back=_back(),
        )
    return _attach(found[0])


def _attach(study_id: str):
    file = request.files.get("file")
    if file is None or not file.filename:
        return _refusal(400, "Choose the PDF file to attach.", back=_back())
    try:
        study = services.archive().get_json(f"/studies/{study_id}")
    except OrthancError as error:
        if error.status == 404:
            return _refusal(404, "There is no such study in the archive.", back=_back())
        raise
    study_uid = study["MainDicomTags"].get("StudyInstanceUID", "")
    patient_tags = study.get("PatientMainDicomTags", {})
    patient_id = patient_tags.get("PatientID", "")
    patient = formatting.patient_label(patient_tags.get("PatientName"), patient_id)
    name = archive.display_name(file.filename)
    stream = file.stream
    stream.seek(0, 2)
    size = stream.tell()
    try:
        pages = pdf.check_pdf(stream)
    except pdf.NotAPdf as error:
        record_activity(
            PdfAttachedEvent(file=name, reason=str(error)),
            Outcome.REFUSED,
            patient=patient,
            patient_id=patient_id,
            study=study_uid,
        )
        return _refusal(400, f"{name} is {error}; nothing was attached.", back=_back())
    title = pdf.title_of(request.form.get("title", ""), file.filename)
    with pdf.create_dicom_body(stream, size, study_id, title) as body:
        created = services.archive().create_dicom(body)
    # Orthanc 1.10 writes the new series in its study's character set, dropping what that cannot
    # hold: say the title as the archive keeps it.
    series = services.archive().get_json(f"/series/{created['ParentSeries']}")
    title = series["MainDicomTags"].get("SeriesDescription", title)
    record_activity(
        PdfAttachedEvent(
            file=name, title=title, pages=pages, bytes=size, series=created.get("ParentSeries", "")
        ),
        patient=patient,
        patient_id=patient_id,
        study=study_uid,
    )
    if wants_json():
        answer = {
            "instance": created.get("ID"),
            "series": created.get("ParentSeries"),
            "study": study_id,
            "study_instance_uid": study_uid,
            "title": title,
            "pages": pages,
        }
        return jsonify(answer), 201
    flash(f"Attached {title} ({pages} page{'s' if pages > 1 else ''}) to the study of {patient}.", "info")
    return redirect(safe_next(_back() or url_for("uploads.page")), 303)
