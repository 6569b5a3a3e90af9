"""How DICOM values are shown, and the rows of the result lists.

A row is one plain dict, built once and used twice: the HTML table reads its display fields, the
JSON answer gives it whole (Orthanc ids, DICOM UIDs and values as stored, and the action URLs).
Rows are built without calling Orthanc and with a handful of string operations each: URLs come from
patterns made once per request (``Links``), because ``url_for`` per cell would cost more than the
find behind the page.

Values are shown as text: the templates escape them (Jinja autoescape) and nothing from a DICOM
file is ever marked safe.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from flask import url_for

from control import formatting
from control.formatting import dicom_date, when
from control.query.finder import PatientMatch

PLACEHOLDER = "ORTHANC-ID"
VIEWER = "/viewer"


def file_size(size: int) -> str:
    """A size in bytes as file managers show it: ``39.2 kB``, ``1.4 GB`` (decimal units)."""
    if size < 1000:
        return f"{size} bytes"
    value = float(size)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} TB"


def series_sort_key(series: dict[str, Any]) -> tuple:
    """Series in acquisition order: by number, then date and time."""
    tags = series["MainDicomTags"]
    number = tags.get("SeriesNumber") or ""
    numeric = int(number) if re.fullmatch(r"-?\d{1,9}", number.strip()) else 1 << 31
    return (numeric, tags.get("SeriesDate") or "", tags.get("SeriesTime") or "", series["ID"])


class Links:
    """The action URLs of result rows, made from one ``url_for`` per kind and request."""

    def __init__(self, back: str) -> None:
        self.back = f"?back={quote(back, safe='')}" if back else ""
        self._patterns: dict[str, str] = {}

    def _pattern(self, endpoint: str, **values: Any) -> str:
        key = endpoint + repr(sorted(values.items()))
        if key not in self._patterns:
            self._patterns[key] = url_for(endpoint, **values)
        return self._patterns[key]

    def resource(self, level: str, orthanc_id: str) -> dict[str, str]:
        """Zip page, zip file, downloader page, manifest and desktop viewer of a patient, study or series.

        The two pages remember the list the row is on, for their "Go back".
        """
        actions = {
            action: self._pattern(endpoint, level=level, orthanc_id=PLACEHOLDER).replace(
                PLACEHOLDER, orthanc_id
            )
            for action, endpoint in (
                ("zip", "query.zip_page"),
                ("archive", "query.archive"),
                ("downloader", "query.downloader_page"),
                ("manifest", "query.manifest"),
                ("desktop", "desktop.launch"),
            )
        }
        actions["zip"] += self.back
        actions["downloader"] += self.back
        return actions

    def path(self, endpoint: str, orthanc_id: str) -> str:
        return self._pattern(endpoint, orthanc_id=PLACEHOLDER).replace(PLACEHOLDER, orthanc_id)

    def drill_down(self, endpoint: str, orthanc_id: str) -> str:
        """A list under this row, which remembers the list the row is on (for "Go back")."""
        return self.path(endpoint, orthanc_id) + self.back


def study_viewer(study_uid: str, series_uid: str | None = None) -> str:
    """The OHIF viewer on a study (Caddy serves it; the study list is off)."""
    url = f"{VIEWER}?StudyInstanceUIDs={quote(study_uid, safe='.')}"
    if series_uid:
        url += f"&initialSeriesInstanceUID={quote(series_uid, safe='.')}"
    return url


def patient_fields(tags: dict[str, str], date_format: str) -> dict[str, str]:
    return {
        "patient_id": tags.get("PatientID") or "",
        "name": tags.get("PatientName") or "",
        "name_display": formatting.person_name(tags.get("PatientName")),
        "sex": tags.get("PatientSex") or "",
        "sex_display": formatting.sex(tags.get("PatientSex")),
        "birth_date": tags.get("PatientBirthDate") or "",
        "birth_date_display": dicom_date(tags.get("PatientBirthDate"), date_format),
    }


def patient_label(patient: dict[str, str]) -> str:
    """How the activity log names a patient: the name as shown, and the ID."""
    return formatting.patient_label(patient["name"], patient["patient_id"])


def patient_row(number: int, match: PatientMatch, links: Links, date_format: str) -> dict[str, Any]:
    row: dict[str, Any] = {"number": number, "id": match.id}
    row.update(patient_fields(match.tags, date_format))
    row["matching_studies"] = match.study_count
    row["actions"] = links.resource("patients", match.id) | {
        "viewer": links.path("query.patient_viewer", match.id),
        "studies": links.drill_down("query.patient_studies", match.id),
    }
    return row


def study_row(
    number: int | None, study: dict[str, Any], modalities: list[str], links: Links, date_format: str
) -> dict[str, Any]:
    """A study as a row of a list (``number`` None: the study a page is about)."""
    tags = study["MainDicomTags"]
    uid = tags.get("StudyInstanceUID") or ""
    date, time = tags.get("StudyDate") or "", tags.get("StudyTime") or ""
    row = {} if number is None else {"number": number}
    # The catalog knows a study's counts and size; the archive's study answers only its series.
    size = study.get("Size")
    return row | {
        "id": study["ID"],
        "study_instance_uid": uid,
        "study_id": tags.get("StudyID") or "",
        "date": date,
        "time": time,
        "date_time": when(date, time, date_format),
        "description": tags.get("StudyDescription") or "",
        "accession_number": tags.get("AccessionNumber") or "",
        "institution": tags.get("InstitutionName") or "",
        "referring_physician": tags.get("ReferringPhysicianName") or "",
        "modalities": formatting.modality_list(modalities),
        "modalities_display": formatting.modalities_text(modalities),
        "series_count": study.get("SeriesCount", len(study.get("Series", ()))),
        "instances_count": study.get("InstancesCount"),
        "size": size,
        "size_display": file_size(size) if size is not None else "",
        "patient": {"id": study.get("ParentPatient", "")}
        | patient_fields(study.get("PatientMainDicomTags", {}), date_format),
        "actions": links.resource("studies", study["ID"])
        | {"viewer": study_viewer(uid), "series": links.drill_down("query.study_series", study["ID"])},
    }


def series_row(
    number: int, series: dict[str, Any], study: dict[str, Any], links: Links, date_format: str
) -> dict[str, Any]:
    tags = series["MainDicomTags"]
    study_tags = study["MainDicomTags"]
    uid = tags.get("SeriesInstanceUID") or ""
    date, time = tags.get("SeriesDate") or "", tags.get("SeriesTime") or ""
    return {
        "number": number,
        "id": series["ID"],
        "series_instance_uid": uid,
        "series_number": tags.get("SeriesNumber") or "",
        "study": {
            "id": study["ID"],
            "study_instance_uid": study_tags.get("StudyInstanceUID") or "",
            "study_id": study_tags.get("StudyID") or "",
            "description": study_tags.get("StudyDescription") or "",
        },
        "modality": tags.get("Modality") or "",
        "modality_display": formatting.modalities_text(tags.get("Modality")),
        "date": date,
        "time": time,
        "date_time": when(date, time, date_format),
        "description": tags.get("SeriesDescription") or "",
        "instances": len(series.get("Instances", ())),
        "actions": links.resource("series", series["ID"])
        | {"viewer": study_viewer(study_tags.get("StudyInstanceUID") or "", uid)},
    }


def absolute(rows: list[dict[str, Any]], host_url: str) -> list[dict[str, Any]]:
    """Rows whose action URLs name the host, for scripts (the pages use relative ones)."""
    base = host_url.rstrip("/")
    for row in rows:
        row["actions"] = {name: base + url for name, url in row["actions"].items()}
    return rows
