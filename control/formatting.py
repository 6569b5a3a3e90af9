"""How times and dates appear on pages: one format for the whole site, in the site's time zone."""

from __future__ import annotations

import datetime as dt
import zoneinfo

from flask import Flask, g


def local_time(moment: dt.datetime | None, time_zone: str, pattern: str) -> str:
    """A naive UTC time from the store, shown in ``time_zone`` with a strftime ``pattern``."""
    if moment is None:
        return ""
    return moment.replace(tzinfo=dt.UTC).astimezone(zoneinfo.ZoneInfo(time_zone)).strftime(pattern)


def person_name(value: str | None) -> str:
    """A DICOM person name (``Family^Given^Middle^Prefix^Suffix``, maybe with ideographic and
    phonetic forms after ``=``) as people write it: "Family Given Middle"."""
    if not value:
        return ""
    first_form = next((form for form in value.split("=") if form.strip("^ ")), "")
    return " ".join(part.strip() for part in first_form.split("^") if part.strip())


def dicom_date(value: str | None, pattern: str) -> str:
    """A DICOM date (``YYYYMMDD``) in the site's format; anything else is shown as it is."""
    text = (value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return text  # strptime would read "2024031" as a date; DICOM dates have 8 digits
    try:
        return dt.datetime.strptime(text, "%Y%m%d").strftime(pattern)
    except ValueError:
        return text


def dicom_time(value: str | None) -> str:
    """A DICOM time (``HHMMSS.frac``, or shorter) as ``HH:MM:SS``."""
    digits = (value or "").strip().split(".")[0]
    if not digits.isdigit() or len(digits) not in (2, 4, 6):
        return (value or "").strip()
    return ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))


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
    app.add_template_filter(detail_value)
    app.add_template_filter(person_name)
    app.add_template_filter(dicom_time)

    @app.template_filter("dicom_date")
    def dicom_date_filter(value: str | None) -> str:
        return dicom_date(value, g.settings["date_format"])

    @app.template_filter("datetime")
    def datetime_filter(moment: dt.datetime | None) -> str:
        settings = g.settings
        return local_time(moment, settings["time_zone"], settings["date_format"] + " %H:%M:%S")
