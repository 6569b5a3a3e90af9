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

    @app.template_filter("datetime")
    def datetime_filter(moment: dt.datetime | None) -> str:
        settings = g.settings
        return local_time(moment, settings["time_zone"], settings["date_format"] + " %H:%M:%S")
