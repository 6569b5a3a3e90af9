"""Downloads: zip files of a patient, a study or a series, and what the downloader needs.

The control plane builds each zip itself from the archive's stored files (``control.query.zips``
says how and why): ``zip_plan`` lists what a zip holds, in a layout a person can read, from three
calls to Orthanc; ``archive_response`` sends it. A zip of stored files has its exact length (the
zip page states it before the download starts), a strong ``ETag``, and answers a ``Range``, so
browsers show the time left and resume a broken download, and the downloader (``downloader/``)
resumes inside a series, reading the series to fetch from ``manifest``. What a zip holds follows
the ``zip_content`` and ``zip_dicomdir`` site settings, read at each request; the zip page offers
the other choices. Each download is one activity event, recorded before its first byte and
completed at its end, with the bytes sent and whether it completed."""

from __future__ import annotations

import datetime as dt
import re
import shlex
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

from flask import (
    Response,
    current_app,
    jsonify,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import current_user

from control import formatting, services, spooling
from control.activity import EventColumns, Outcome, record_activity, update_activity
from control.errors import error_response, wants_json
from control.events import DownloadEvent
from control.orthanc import OrthancUnavailable
from control.query import bp, present, zips
from control.query.views import check_id, get_or_404, safe_back

MANIFEST_FORMAT = "pacs-download-manifest/1"
LEVEL = "<any(patients, studies, series):level>/<orthanc_id>"
NOUNS = {"patients": "patient", "studies": "study", "series": "series"}

# Characters no common file system takes, and names Windows keeps for devices.
_UNSAFE = re.compile(r'[\x00-\x1f\x7f"*/:<>?\\|]')
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL"} | {
    f"{name}{n}" for name in ("COM", "LPT") for n in range(1, 10)
}


def safe_file_name(parts: Iterable[str], fallback: str, suffix: str = ".zip", max_bytes: int = 150) -> str:
    """A file name any OS accepts, made of ``parts`` joined by ``_`` (spaces become ``-``).

    Invisible formatting characters go too: a right-to-left override could disguise the extension.
    """
    cleaned = []
    for part in parts:
        text = "".join(
            " " if _UNSAFE.match(char) or unicodedata.category(char)[0] in "CZ" else char
            for char in unicodedata.normalize("NFC", part)
        )
        text = "-".join(text.split()).strip(".-_")
        if text:
            cleaned.append(text)
    stem = "_".join(cleaned).encode()[:max_bytes].decode("utf-8", "ignore").rstrip(".-_") or fallback
    if stem.split(".")[0].upper() in _WINDOWS_DEVICES:
        stem = "_" + stem
    return stem + suffix


def content_disposition(file_name: str, fallback: str) -> str:
    """An attachment header with an ASCII name for old clients and the UTF-8 name (RFC 6266/5987)."""
    ascii_parts = unicodedata.normalize("NFKD", file_name).encode("ascii", "ignore").decode()
    ascii_name = safe_file_name([ascii_parts.removesuffix(".zip")], fallback)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(file_name, safe='')}"


def iso_date(value: str | None) -> str:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return ""


def first_name_group(value: str | None) -> str:
    """The first written form of a person name (``Yamada^Tarou=山田^太郎`` gives ``Yamada Tarou``)."""
    return next(iter(formatting.name_groups(value)), "")


@dataclass(frozen=True)
class Resource:
    """A patient, study or series to download, with what names it for people."""

    level: str
    orthanc_id: str
    patient: dict[str, str]
    study: dict[str, str]
    series: dict[str, Any]
    last_update: str = ""  # when the archive last changed it (Orthanc's ``LastUpdate``)

    @property
    def noun(self) -> str:
        return NOUNS[self.level]

    @property
    def title(self) -> str:
        """What the download holds, in words: "Buc Jérôme, study of 2004-08-26: Whole Body Bone"."""
        words = self.patient["name_display"] or "Unnamed patient"
        if self.level == "patients":
            return (
                f"{words} ({self.patient['patient_id']}): all studies"
                if self.patient["patient_id"]
                else words
            )
        shown_date = formatting.dicom_date(self.study.get("StudyDate"), services.settings().date_format)
        words += f", study of {shown_date or 'unknown date'}"
        if self.study.get("StudyDescription"):
            words += f": {self.study['StudyDescription']}"
        if self.level == "series":
            tags = self.series["MainDicomTags"]
            words += f", series {tags.get('SeriesNumber') or '?'} {tags.get('Modality') or ''}".rstrip()
            if tags.get("SeriesDescription"):
                words += f" ({tags['SeriesDescription']})"
        return words

    @property
    def file_name(self) -> str:
        parts = [first_name_group(self.patient["name"])]
        if self.level == "patients":
            parts.append(self.patient["patient_id"])
        else:
            parts += [iso_date(self.study.get("StudyDate")), self.study.get("StudyDescription") or ""]
        if self.level == "series":
            tags = self.series["MainDicomTags"]
            parts += [f"series-{tags.get('SeriesNumber') or ''}".rstrip("-"), tags.get("Modality") or ""]
        return safe_file_name(parts, self.noun)

    def record(self, outcome: Outcome, who: EventColumns, event: DownloadEvent) -> int:
        """The activity event of a download of this resource; ``who`` overrides its columns."""
        columns: EventColumns = {
            "patient": present.patient_label(self.patient),
            "patient_id": self.patient["patient_id"],
            "study": self.study.get("StudyInstanceUID") or "",
        }
        return record_activity(event, outcome, **(columns | who))


def describe(level: str, orthanc_id: str) -> Resource:
    """The resource a download URL names (404 when Orthanc has no such thing)."""
    check_id(orthanc_id)
    date_format = services.settings().date_format
    series: dict[str, Any] = {}  # a study or a patient has no series of its own
    if level == "patients":
        patient = get_or_404(f"/patients/{orthanc_id}")
        fields = present.patient_fields(patient["MainDicomTags"], date_format)
        return Resource(level, orthanc_id, fields, {}, {}, patient.get("LastUpdate", ""))
    if level == "series":
        series = get_or_404(f"/series/{orthanc_id}")
        study = services.archive().get_json(f"/studies/{series['ParentStudy']}")
        last_update = series.get("LastUpdate", "")
    else:
        study = get_or_404(f"/studies/{orthanc_id}")
        last_update = study.get("LastUpdate", "")
    patient = present.patient_fields(study.get("PatientMainDicomTags", {}), date_format)
    return Resource(level, orthanc_id, patient, study["MainDicomTags"], series, last_update)


def zip_content() -> str:
    """The ``zip_content`` setting: ``dicom`` (the files as stored) or ``jpeg-lossless``."""
    return services.settings().zip_content


def statistics(level: str, orthanc_id: str) -> dict[str, int]:
    """Counts and the DICOM files' size of a resource, from Orthanc's statistics."""
    answer = services.archive().get_json(f"/{level}/{orthanc_id}/statistics")
    return {
        "studies": int(answer.get("CountStudies", 1)),
        "series": int(answer.get("CountSeries", 1)),
        "instances": int(answer["CountInstances"]),
        "expected_size": int(answer["DicomUncompressedSize"]),
    }


@bp.get(f"/query/{LEVEL}/zip")
def zip_page(level: str, orthanc_id: str):
    """What a zip will hold and how large it is, before it starts (the page then starts it).

    The download it starts follows the site settings; the other choices (with or without a
    DICOMDIR, a smaller compressed zip) are links to the same zip with ``dicomdir`` or
    ``compressed`` in the query.
    """
    resource = describe(level, orthanc_id)
    counts = statistics(level, orthanc_id)
    content = zip_content()
    dicomdir = wants_dicomdir()
    plan = zip_plan(resource, content, dicomdir=dicomdir)
    archive_url = url_for("query.archive", level=level, orthanc_id=orthanc_id)
    manifest_url = url_for("query.manifest", level=level, orthanc_id=orthanc_id)
    other_dicomdir = url_for(
        "query.archive", level=level, orthanc_id=orthanc_id, dicomdir="no" if dicomdir else "yes"
    )
    compressed_url = url_for(
        "query.archive",
        level=level,
        orthanc_id=orthanc_id,
        compressed="yes",
        dicomdir="yes" if dicomdir else "no",
    )
    if wants_json():
        base = request.host_url.rstrip("/")
        return jsonify(
            {
                "level": level,
                "id": orthanc_id,
                "title": resource.title,
                "file_name": resource.file_name,
                "content": content,
                "dicomdir": dicomdir,
                **counts,
                "zip_size": plan.length,
                "resumable": plan.length is not None,
                "archive": base + archive_url,
                "archive_other_dicomdir": base + other_dicomdir,
                "archive_compressed": base + compressed_url,
                "manifest": base + manifest_url,
            }
        )
    return render_template(
        "query/zip.html",
        resource=resource,
        counts=counts,
        content=content,
        dicomdir=dicomdir,
        zip_size=plan.length,
        archive_url=archive_url,
        other_dicomdir_url=other_dicomdir,
        compressed_url=compressed_url,
        downloader_url=url_for("query.downloader_page", level=level, orthanc_id=orthanc_id),
        back=safe_back(""),
    )


@bp.get(f"/query/{LEVEL}/archive")
def archive(level: str, orthanc_id: str):
    """The zip itself, made as it is sent (see ``archive_response``)."""
    return archive_response(level, orthanc_id)


def archive_response(
    level: str, orthanc_id: str, *, activity: EventColumns | None = None
) -> ResponseReturnValue:
    """The zip of a patient, study or series as a streamed response, and its activity event.

    Any page that offers a zip answers with this (the patients' token page too); ``activity``
    overrides the event's columns (``token_id``, ``patient``, ``study``). A zip of stored files
    has its length and a strong ``ETag``, and answers a single ``Range`` (with ``If-Range``) with
    206 and just those bytes; an unsatisfiable range gets 416. Any other zip (transcoded,
    compressed, with a DICOMDIR) is made whole in a temporary file first, then sent with its
    length (``control.spooling``: why). Either way a zip the portal cannot finish ends as a failure
    the client sees, and its activity event says it did not complete.
    """
    resource = describe(level, orthanc_id)
    content = zip_content()
    plan = zip_plan(resource, content, compress=wants_compressed(), dicomdir=wants_dicomdir())
    length = plan.length
    start, stop, status = 0, length, 200
    requested = request.range if length is not None else None
    if requested and len(requested.ranges) == 1 and request.headers.get("If-Range", plan.etag) == plan.etag:
        span = requested.range_for_length(length)
        if span is None:
            refused = Response(status=416, headers={"Content-Range": f"bytes */{length}"})
            refused.headers["Cache-Control"] = "no-store"
            return refused
        start, stop = span
        status = 206
    headers = {
        "Content-Disposition": content_disposition(resource.file_name, resource.noun),
        "Cache-Control": "no-store",
        "Accept-Ranges": "bytes" if length is not None else "none",
    }
    if request.method == "HEAD":
        if length is not None:
            headers |= {"Content-Length": str((stop or 0) - start), "ETag": plan.etag}
        answer = Response(status=status, mimetype="application/zip")
        answer.headers.update(headers)
        return answer

    # Recorded before the first byte, so that a download whose worker is killed stays in the log as
    # not completed; its end fills in the rest.
    started = DownloadEvent(
        level=resource.level,
        orthanc_id=resource.orthanc_id,
        content=content,
        bytes_sent=0,
        completed=False,
        compressed=plan.compress or None,
        dicomdir=plan.dicomdir or None,
        range=f"{start}-{(stop or 0) - 1}/{length}" if status == 206 else None,
        stopped_by="server",
    )
    event_id = resource.record(Outcome.FAILED, activity or {}, started)

    def finish(completed: bool, sent: int, stopped_by: str) -> None:
        ended = replace(
            started, bytes_sent=sent, completed=completed, stopped_by=None if completed else stopped_by
        )
        update_activity(event_id, Outcome.OK if completed else Outcome.FAILED, ended)

    if length is None:
        try:
            spooled, length = spooling.spool(
                zips.zip_bytes(services.archive(), plan), spooling.client_gone(request.environ)
            )
        except spooling.ClientGone:
            finish(False, 0, "client")
            return error_response(503, "The download was stopped.")
        except (zips.ZipBroken, OrthancUnavailable) as error:
            current_app.logger.warning("The zip of %s %s could not be made: %s", level, orthanc_id, error)
            finish(False, 0, "archive")
            return error_response(
                503, "The archive stopped answering while the zip was being made. Please download it again."
            )
        body: Iterable[bytes] = spooling.read_back(spooled)
        stop = length
    else:
        spooled, body = None, zips.zip_bytes(services.archive(), plan, start, stop)

    def relay() -> Iterator[bytes]:
        sent, completed, stopped_by = 0, False, "client"
        try:
            for chunk in body:
                sent += len(chunk)
                yield chunk
            completed = True
        except (zips.ZipBroken, OrthancUnavailable) as error:
            # Raised on, the answer is broken off short of its length: the client sees a failed
            # download, never a whole-looking cut zip.
            stopped_by = "archive"
            current_app.logger.warning("The zip of %s %s broke off: %s", level, orthanc_id, error)
            raise
        finally:
            finish(completed, sent, stopped_by)

    response = Response(
        stream_with_context(relay()), status=status, mimetype="application/zip", direct_passthrough=True
    )
    if spooled is not None:
        response.call_on_close(spooled.close)
    response.headers.update(headers)
    response.headers["Content-Length"] = str((stop or 0) - start)
    if plan.length is not None:
        response.headers["ETag"] = plan.etag
    if status == 206:
        response.headers["Content-Range"] = f"bytes {start}-{(stop or 0) - 1}/{length}"
    return response


def wants_compressed() -> bool:
    """The zip page's choice of a smaller, deflated zip (``?compressed=yes``)."""
    return request.args.get("compressed") == "yes"


def wants_dicomdir() -> bool:
    """A DICOMDIR in the zip: the zip page's choice (``?dicomdir=yes|no``), else the site setting."""
    choice = request.args.get("dicomdir")
    return choice == "yes" if choice in ("yes", "no") else bool(services.settings().zip_dicomdir)


def zip_plan(
    resource: Resource, content: str, *, compress: bool = False, dicomdir: bool = False
) -> zips.ZipPlan:
    """What the zip of ``resource`` holds, in order, named ``patient/study/series/0001.dcm``.

    Three calls to Orthanc whatever the size: the resource's instances (with each stored file's
    size and attachment id), its series and (for a patient) its studies.
    """
    level, orthanc_id = resource.level, resource.orthanc_id
    instances = services.archive().get_json(f"/{level}/{orthanc_id}/instances")
    if level == "series":
        series_list = [resource.series]
    else:
        series_list = sorted(
            services.archive().get_json(f"/{level}/{orthanc_id}/series"), key=present.series_sort_key
        )
    if level == "patients":
        studies = {
            study["ID"]: study["MainDicomTags"]
            for study in services.archive().get_json(f"/patients/{orthanc_id}/studies")
        }
    else:
        studies = {series["ParentStudy"]: resource.study for series in series_list}
    patient_folder = safe_file_name(
        [first_name_group(resource.patient["name"]), resource.patient["patient_id"]], "patient", ""
    )
    study_order = sorted(studies, key=lambda study_id: (studies[study_id].get("StudyDate") or "", study_id))
    study_folders = _unique_names(
        {
            study_id: safe_file_name(
                [
                    iso_date(studies[study_id].get("StudyDate")),
                    studies[study_id].get("StudyDescription") or "",
                ],
                "study",
                "",
            )
            for study_id in study_order
        }
    )
    by_series: dict[str, list[dict[str, Any]]] = {}
    for instance in instances:
        by_series.setdefault(instance["ParentSeries"], []).append(instance)
    members = []
    for study_id in study_order:
        in_study = [series for series in series_list if series["ParentStudy"] == study_id]
        series_folders = _unique_names({series["ID"]: _series_folder(series) for series in in_study})
        for series in in_study:
            ordered = sorted(by_series.get(series["ID"], []), key=_instance_order)
            width = max(4, len(str(len(ordered))))
            for number, instance in enumerate(ordered, 1):
                folder = f"{patient_folder}/{study_folders[study_id]}/{series_folders[series['ID']]}"
                members.append(
                    zips.Member(
                        f"{folder}/{number:0{width}d}.dcm",
                        instance["ID"],
                        instance["FileUuid"],
                        int(instance["FileSize"]),
                    )
                )
    return zips.ZipPlan(
        tuple(members),
        _modified_at(resource.last_update),
        transcode=zips.JPEG_LOSSLESS if content == "jpeg-lossless" else None,
        compress=compress,
        dicomdir=dicomdir,
    )


def _series_folder(series: dict[str, Any]) -> str:
    tags = series["MainDicomTags"]
    number = f"series-{tags.get('SeriesNumber') or ''}".rstrip("-")
    return safe_file_name(
        [number, tags.get("Modality") or "", tags.get("SeriesDescription") or ""], "series", ""
    )


def _instance_order(instance: dict[str, Any]) -> tuple:
    number = (instance["MainDicomTags"].get("InstanceNumber") or "").strip()
    numeric = int(number) if re.fullmatch(r"-?\d{1,9}", number) else 1 << 31
    return (numeric, instance.get("IndexInSeries") or 0, instance["ID"])


def _unique_names(names: dict[str, str]) -> dict[str, str]:
    """The same names, with ``(2)``, ``(3)``... added where two siblings would share one."""
    taken: set[str] = set()
    unique = {}
    for key, name in names.items():
        candidate, number = name, 2
        while candidate.casefold() in taken:
            candidate = f"{name} ({number})"
            number += 1
        taken.add(candidate.casefold())
        unique[key] = candidate
    return unique


def _modified_at(last_update: str) -> dt.datetime:
    """The members' time stamp: when the archive last changed the resource (Orthanc writes UTC)."""
    try:
        return dt.datetime.strptime(last_update, "%Y%m%dT%H%M%S").replace(tzinfo=dt.UTC)
    except ValueError:
        return dt.datetime(1980, 1, 1, tzinfo=dt.UTC)


@bp.get(f"/query/{LEVEL}/manifest")
def manifest(level: str, orthanc_id: str):
    """What the downloader fetches: every series of the resource, with its zip URL, count and size."""
    pattern = url_for("query.archive", level="series", orthanc_id=present.PLACEHOLDER, _external=True)
    return manifest_response(
        level, orthanc_id, lambda series_id: pattern.replace(present.PLACEHOLDER, series_id)
    )


def manifest_response(level: str, orthanc_id: str, series_archive: Callable[[str], str]):
    """The downloader's manifest of a patient, study or series (``MANIFEST_FORMAT``).

    ``series_archive`` gives the URL of a series' zip: any page that offers the downloader (the
    patients' token page too) answers with this, with zip URLs its visitor may fetch.
    """
    resource = describe(level, orthanc_id)
    if level == "series":
        found = [resource.series]
    else:
        found = sorted(
            services.archive().get_json(f"/{level}/{orthanc_id}/series"), key=present.series_sort_key
        )
    if level == "patients":
        study_uids = {
            study["ID"]: study["MainDicomTags"].get("StudyInstanceUID")
            for study in services.archive().get_json(f"/patients/{orthanc_id}/studies")
        }
    else:
        study_uids = {series["ParentStudy"]: resource.study.get("StudyInstanceUID") for series in found}
    content = zip_content()
    series_list = []
    for series in found:
        tags = series["MainDicomTags"]
        # One statistics call per series: the manifest is asked for once per download, not per page.
        counts = statistics("series", series["ID"])
        series_list.append(
            {
                "id": series["ID"],
                "series_instance_uid": tags.get("SeriesInstanceUID") or "",
                "study_instance_uid": study_uids.get(series["ParentStudy"]) or "",
                "modality": tags.get("Modality") or "",
                "number": tags.get("SeriesNumber") or "",
                "description": tags.get("SeriesDescription") or "",
                "instances": counts["instances"],
                "size": counts["expected_size"],
                "archive": series_archive(series["ID"]),
            }
        )
    return jsonify(
        {
            "format": MANIFEST_FORMAT,
            "level": level,
            "id": orthanc_id,
            "title": resource.title,
            "file_name": resource.file_name,
            "content": content,
            "expected_instances": sum(series["instances"] for series in series_list),
            "expected_size": sum(series["size"] for series in series_list),
            "series": series_list,
        }
    )


@bp.get(f"/query/{LEVEL}/downloader")
def downloader_page(level: str, orthanc_id: str):
    """How to fetch this patient, study or series with the downloader: the exact command line."""
    resource = describe(level, orthanc_id)
    manifest_url = url_for("query.manifest", level=level, orthanc_id=orthanc_id, _external=True)
    script_url = url_for("public.downloader_script", _external=True)
    command = shlex.join(["python3", "pacs_download.py", "--user", current_user.username, manifest_url])
    if wants_json():
        return jsonify(
            {"title": resource.title, "manifest": manifest_url, "script": script_url, "command": command}
        )
    return render_template(
        "query/downloader.html",
        resource=resource,
        command=command,
        script_url=script_url,
        zip_url=url_for("query.zip_page", level=level, orthanc_id=orthanc_id),
        back=safe_back(""),
    )
