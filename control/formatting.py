"""How values appear to people: every DICOM value and every time, the same way on every page.

One presentation layer for the whole portal. The result lists, the upload results, the messages
after a PDF report is attached, the activity log and its CSV export, the worklist, the study links
and the JSON answers' ``*_display`` fields all show DICOM values through these functions, so that
"Doe^John" never sits beside "Doe John" and "20261201" never beside "2026-12-01":

- person names (PS3.5 6.2, PN): ``Family^Given^Middle^Prefix^Suffix``, with the ideographic and
  phonetic groups after ``=``, as "Yamada Tarou = 山田 太郎 = やまだ たろう" (the parts in their
  stored order, so that what is shown can be typed back into a search);
- dates (DA, and the ``1997.04.24`` of ACR-NEMA files), times (TM), date-times (DT) and ages (AS),
  dates in the ``date_format`` setting;
- codes (patient sex, modality) as a word, or as the code with its meaning to show on hover.

Everything here returns plain text: the templates escape it (Jinja autoescape), and nothing from a
DICOM file is ever marked safe. A value that is not what its kind says is shown as it is, never
dropped: a person can still read what the modality sent.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Iterable

from flask import Flask

from control import services

# PS3.3 C.7.1.1 (Patient's Sex).
SEX = {"M": "Male", "F": "Female", "O": "Other"}

# PS3.3 C.7.3.1.1.1 (Modality), defined terms and the retired ones older archives still hold.
MODALITIES = {
    "AR": "Autorefraction",
    "ASMT": "Content assessment results",
    "AU": "Audio",
    "BDUS": "Bone densitometry (ultrasound)",
    "BI": "Biomagnetic imaging",
    "BMD": "Bone densitometry (X-ray)",
    "CD": "Color flow Doppler",
    "CR": "Computed radiography",
    "CT": "Computed tomography",
    "DD": "Duplex Doppler",
    "DG": "Diaphanography",
    "DM": "Digital microscopy",
    "DOC": "Document (PDF report)",
    "DX": "Digital radiography",
    "EC": "Echocardiography",
    "ECG": "Electrocardiography",
    "EPS": "Cardiac electrophysiology",
    "ES": "Endoscopy",
    "FID": "Fiducials",
    "GM": "General microscopy",
    "HC": "Hard copy",
    "HD": "Hemodynamic waveform",
    "IO": "Intra-oral radiography",
    "IOL": "Intraocular lens data",
    "IVOCT": "Intravascular optical coherence tomography",
    "IVUS": "Intravascular ultrasound",
    "KER": "Keratometry",
    "KO": "Key object selection",
    "LEN": "Lensometry",
    "LS": "Laser surface scan",
    "M3D": "Model for 3D manufacturing",
    "MA": "Magnetic resonance angiography",
    "MG": "Mammography",
    "MR": "Magnetic resonance",
    "MS": "Magnetic resonance spectroscopy",
    "NM": "Nuclear medicine",
    "OAM": "Ophthalmic axial measurements",
    "OCT": "Optical coherence tomography",
    "OP": "Ophthalmic photography",
    "OPM": "Ophthalmic mapping",
    "OPT": "Ophthalmic tomography",
    "OPTBSV": "Ophthalmic tomography B-scan volume analysis",
    "OPTENF": "Ophthalmic tomography en face",
    "OPV": "Ophthalmic visual field",
    "OSS": "Optical surface scan",
    "OT": "Other",
    "PLAN": "Plan",
    "PR": "Presentation state",
    "PT": "Positron emission tomography (PET)",
    "PX": "Panoramic X-ray",
    "REG": "Registration",
    "RESP": "Respiratory waveform",
    "RF": "Radio fluoroscopy",
    "RG": "Radiographic imaging (film)",
    "RTDOSE": "Radiotherapy dose",
    "RTIMAGE": "Radiotherapy image",
    "RTPLAN": "Radiotherapy plan",
    "RTRECORD": "Radiotherapy treatment record",
    "RTSTRUCT": "Radiotherapy structure set",
    "RWV": "Real world value map",
    "SEG": "Segmentation",
    "SM": "Slide microscopy",
    "SMR": "Stereometric relationship",
    "SR": "Structured report",
    "SRF": "Subjective refraction",
    "ST": "Single-photon emission computed tomography (SPECT)",
    "STAIN": "Automated slide stainer",
    "TG": "Thermography",
    "US": "Ultrasound",
    "VA": "Visual acuity",
    "XA": "X-ray angiography",
    "XC": "External-camera photography",
}

_AGE_UNITS = {"D": ("day", "days"), "W": ("week", "weeks"), "M": ("month", "months"), "Y": ("year", "years")}
_DATE = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")  # DA, and ACR-NEMA's YYYY.MM.DD
_TIME = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2}))?)?(?:\.\d{1,6})?")  # TM, and ACR-NEMA's HH:MM:SS
_DATE_TIME = re.compile(r"(\d{8})(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?")
_AGE = re.compile(r"(\d{3})([DWMY])")


def local_time(moment: dt.datetime | None, time_zone: str, pattern: str) -> str:
    """A naive UTC time from the store, shown in ``time_zone`` with a strftime ``pattern``."""
    if moment is None:
        return ""
    return moment.replace(tzinfo=dt.UTC).astimezone(zoneinfo.ZoneInfo(time_zone)).strftime(pattern)


def name_groups(value: str | None) -> list[str]:
    """The written forms of a DICOM person name (alphabetic, ideographic, phonetic), each as
    people write it ("Family Given Middle"), the empty ones left out."""
    if not value:
        return []
    parts = (group.split("^") for group in value.split("="))
    groups = (" ".join(part.strip() for part in group if part.strip()) for group in parts)
    return [group for group in groups if group]


def person_name(value: str | None) -> str:
    """A DICOM person name with every written form: ``Yamada^Tarou=山田^太郎=やまだ^たろう`` is
    "Yamada Tarou = 山田 太郎 = やまだ たろう"."""
    return " = ".join(name_groups(value))


def patient_label(name: str | None, patient_id: str | None) -> str:
    """How messages and the activity log name a patient: the name as shown, then the ID."""
    shown = person_name(name)
    if patient_id:
        return f"{shown} ({patient_id})" if shown else f"({patient_id})"
    return shown


def dicom_date(value: str | None, pattern: str) -> str:
    """A DICOM date (``YYYYMMDD``, or ACR-NEMA's ``YYYY.MM.DD``) in the site's format."""
    text = (value or "").strip()
    match = _DATE.fullmatch(text)
    if not match:
        return text
    try:
        return dt.date(*map(int, match.groups())).strftime(pattern)
    except ValueError:
        return text


def dicom_time(value: str | None) -> str:
    """A DICOM time (``HHMMSS.frac``, or shorter, or ACR-NEMA's ``HH:MM:SS``) as ``HH:MM:SS``
    (``HH:MM`` when the time has no seconds)."""
    text = (value or "").strip()
    match = _TIME.fullmatch(text)
    if not match:
        return text
    hours, minutes, seconds = match.groups()
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:
        return text
    return f"{hours}:{minutes or '00'}" + (f":{seconds}" if seconds else "")


def dicom_date_time(value: str | None, pattern: str) -> str:
    """A DICOM date-time (``YYYYMMDDHHMMSS.frac&ZZXX``) as the site's date, the time and the
    offset from UTC it was given with."""
    text = (value or "").strip()
    match = _DATE_TIME.fullmatch(text)
    if not match:
        return text
    day, time, offset = match.groups()
    shown = dicom_date(day, pattern)
    if shown == day:
        return text
    if time:
        shown += " " + dicom_time(time if len(time) != 2 else time + "00")
    if offset:
        shown += f" UTC{offset[:3]}:{offset[3:]}"
    return shown


def when(date: str | None, time: str | None, pattern: str) -> str:
    """A DICOM date and time of the same thing (a study's, a series'), shown together."""
    return f"{dicom_date(date, pattern)} {dicom_time(time)}".strip()


def age(value: str | None) -> str:
    """A DICOM age (``045Y``, ``003M``, ``002W``, ``010D``) in words: "45 years"."""
    text = (value or "").strip()
    match = _AGE.fullmatch(text)
    if not match:
        return text
    count = int(match.group(1))
    singular, plural = _AGE_UNITS[match.group(2)]
    return f"{count} {singular if count == 1 else plural}"


def sex(value: str | None) -> str:
    """A patient's sex code in words (M Male, F Female, O Other)."""
    text = (value or "").strip()
    return SEX.get(text.upper(), text)


def modality_meaning(code: str | None) -> str:
    """What a modality code stands for ("CT": "Computed tomography"); '' for a code not in DICOM."""
    return MODALITIES.get((code or "").strip().upper(), "")


def modality_list(codes: Iterable[str] | str | None) -> list[str]:
    """Modality codes as a list, each once, in their first order: ``CT\\MR``, ``"CT CT"`` or a
    list of them all give their codes once."""
    if codes is None:
        return []
    if isinstance(codes, str):
        codes = re.split(r"[\\\s,]+", codes)
    seen: dict[str, None] = {}
    for code in codes:
        code = code.strip()
        if code:
            seen.setdefault(code, None)
    return list(seen)


def modalities_text(codes: Iterable[str] | str | None) -> str:
    """Modality codes with their meaning, for places without hover (CSV, JSON, messages):
    "CT (Computed tomography), DOC (Document (PDF report))"."""
    shown = []
    for code in modality_list(codes):
        meaning = modality_meaning(code)
        shown.append(f"{code} ({meaning})" if meaning else code)
    return ", ".join(shown)


def detail_value(value: object) -> str:
    """An activity detail as a person reads it: lists joined, mappings as name: value."""
    if isinstance(value, list):
        return ", ".join(detail_value(item) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{key}: {detail_value(item)}" for key, item in value.items())
    if value is True or value is False:
        return "yes" if value else "no"
    return "" if value is None else str(value)


def init_app(app: Flask) -> None:
    """The template filters every page uses (and ``dicom_legend``: the codes a page shows)."""
    for function in (detail_value, person_name, dicom_time, age, sex, modality_meaning, modality_list):
        app.add_template_filter(function)

    @app.template_filter("dicom_date")
    def dicom_date_filter(value: str | None) -> str:
        return dicom_date(value, services.settings().date_format)

    @app.template_filter("dicom_date_time")
    def dicom_date_time_filter(value: str | None) -> str:
        return dicom_date_time(value, services.settings().date_format)

    @app.template_filter("datetime")
    def datetime_filter(moment: dt.datetime | None) -> str:
        settings = services.settings()
        return local_time(moment, settings.time_zone, settings.date_format + " %H:%M:%S")

    @app.template_filter("date")
    def date_filter(day: dt.date | None) -> str:
        return day.strftime(services.settings().date_format) if day else ""
