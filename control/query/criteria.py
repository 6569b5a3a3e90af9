"""The query form: what a user may search by, checked, and turned into an Orthanc query.

A search changes nothing, so it is a GET form and its URL is a bookmark: the criteria travel in
the query string under the names of ``SearchForm``'s fields. Matching, in the user's words:

- Patient name, referring physician and institution match anywhere in the value ("smith" finds
  ``SMITH^JOHN`` and ``Goldsmith^Ann``); a space matches a space or the ``^`` between name parts,
  so "Family Given" finds ``Family^Given``, and a name is typed as the pages show it.
- Patient ID and accession number match the whole value. A patient ID typed exactly as stored
  finds that patient alone (as DICOM matches IDs); one that names no patient exactly matches
  whatever its case, like the other criteria.
- ``*`` (any text) and ``?`` (one character) are wildcards; a value typed with one is matched as a
  whole, as typed ("SMI*" finds names that begin with SMI).
- Everything is case-insensitive (Orthanc's default, for every script it can upper-case: Latin,
  Greek, Cyrillic). The study catalog, which answers the pages, also folds accents ("Jerome"
  finds ``Jérôme``, see ``control.catalog.names``); the archive asked directly does not.
- The study date range applies only when "Search" is "With Study Date"; its open ends exclude
  studies without a date (Orthanc's ``-20240131`` alone would include them). The shortcuts beside
  it (``period``: today, yesterday, the last 7 or 30 days, counted in the site's time zone) are
  buttons of the form, so they keep the other criteria typed and work without a script; the
  results' URL keeps the shortcut, so a bookmark of "today" means today.

A backslash separates values in DICOM, so no criterion may contain one.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo

from flask_wtf import FlaskForm
from wtforms import SelectField, StringField
from wtforms.validators import Length, Optional, Regexp, ValidationError

from control import services
from control.query import finder

SEX_CHOICES = [("", "All"), ("M", "Male"), ("F", "Female"), ("O", "Other")]
SEARCH_CHOICES = [("all", "All"), ("date", "With Study Date")]
MODALITY = re.compile(r"[A-Z0-9_]{1,16}")
# Oldest date a range's open start stands for: any real date, never an empty one.
DAWN = dt.date(1, 1, 1)
# The date shortcuts: (first day, last day) as days before today.
PERIODS = {"today": (0, 0), "yesterday": (1, 1), "last7": (6, 0), "last30": (29, 0)}
PERIOD_CHOICES = [
    ("", "Any"),
    ("today", "Today"),
    ("yesterday", "Yesterday"),
    ("last7", "Last 7 days"),
    ("last30", "Last 30 days"),
]


def site_today() -> dt.date:
    """Today where the site is (the ``time_zone`` setting), which is what "today" means to its users."""
    return dt.datetime.now(zoneinfo.ZoneInfo(services.settings().time_zone)).date()


def no_backslash(_form: FlaskForm, field: StringField) -> None:
    if field.data and "\\" in field.data:
        raise ValidationError("A backslash cannot be searched for (it separates DICOM values).")


class DicomDateField(StringField):
    """A date typed as 2024-03-31 (what date pickers send) or 20240331 (DICOM's own form)."""

    date: dt.date | None = None

    def process_formdata(self, valuelist: list[str]) -> None:
        super().process_formdata(valuelist)
        self.date = None
        text = (self.data or "").strip()
        self.data = text
        if not text:
            return
        for pattern in ("%Y-%m-%d", "%Y%m%d"):
            try:
                self.date = dt.datetime.strptime(text, pattern).date()
                return
            except ValueError:
                continue
        raise ValueError("Enter a date as YYYY-MM-DD, for example 2024-03-31.")


def _text(label: str, max_length: int = 64) -> StringField:
    return StringField(
        label,
        filters=[lambda value: value.strip() if value else value],
        validators=[Optional(), Length(max=max_length), no_backslash],
    )


class SearchForm(FlaskForm):
    """The criteria of the query page, read from the query string."""

    class Meta:
        csrf = False  # a GET form that changes nothing

    search = SelectField("Search", choices=SEARCH_CHOICES, default="all")
    patient_name = _text("Patient name")
    patient_id = _text("Patient ID")
    sex = SelectField("Patient sex", choices=SEX_CHOICES, default="")
    birth_date = DicomDateField("Date of birth")
    date_from = DicomDateField("Study date from")
    date_to = DicomDateField("Study date to")
    period = SelectField("Study date", choices=PERIOD_CHOICES, default="")
    accession = _text("Accession number", 16)
    institution = _text("Institution")
    referring = _text("Referring physician")
    modality = StringField(
        "Modality",
        filters=[lambda value: value.strip().upper() if value else value],
        validators=[Optional(), Regexp(MODALITY.pattern + "$", message="Not a modality code.")],
    )

    def validate_date_to(self, field: DicomDateField) -> None:
        if self.search.data != "date":
            return
        first, last = self.date_from.date, field.date
        if first is None and last is None and not self.date_from.errors:
            raise ValidationError("Choose the study dates to search, or set Search to All.")
        if first and last and first > last:
            raise ValidationError("This date is before the start of the range.")

    def apply_period(self) -> None:
        """A date shortcut chosen: the study date range it stands for, searched by date."""
        days = PERIODS.get(self.period.data or "")
        if days is None:
            return
        today = site_today()
        first, last = (today - dt.timedelta(days=back) for back in days)
        self.search.data = "date"
        self.date_from.data, self.date_from.date = first.isoformat(), first
        self.date_to.data, self.date_to.date = last.isoformat(), last

    def validate(self, extra_validators=None) -> bool:
        # With "Search: All" the dates are ignored, so a malformed one there is no error.
        self.apply_period()
        valid = super().validate(extra_validators)
        if self.search.data != "date":
            self.date_from.errors = []
            self.date_to.errors = []
            return not any(self.errors.values())
        return valid

    def criteria(self) -> dict[str, str]:
        """The criteria as given (for the URL, the activity log and the JSON), empty ones left out."""
        values = {name: field.data for name, field in self._fields.items() if field.data}
        values.pop("period", None)  # it stands for the dates it gave
        if values.get("search") == "all":
            values.pop("search")
            values.pop("date_from", None)
            values.pop("date_to", None)
        return values

    def to_search(self) -> finder.Search:
        """The Orthanc query for these criteria (the form must have validated); the catalog
        translates the same query into its own (``control.catalog.search``)."""
        query: dict[str, str] = {}
        if self.patient_name.data:
            query["PatientName"] = name_pattern(self.patient_name.data)
        if self.patient_id.data:
            query["PatientID"] = self.patient_id.data
        if self.sex.data:
            query["PatientSex"] = self.sex.data
        if self.birth_date.date:
            query["PatientBirthDate"] = finder.dicom_date(self.birth_date.date)
        study_query: dict[str, str] = {}
        if self.accession.data:
            study_query["AccessionNumber"] = self.accession.data
        if self.institution.data:
            study_query["InstitutionName"] = contains_pattern(self.institution.data)
        if self.referring.data:
            study_query["ReferringPhysicianName"] = name_pattern(self.referring.data)
        if self.modality.data:
            study_query["ModalitiesInStudy"] = self.modality.data
        dates = None
        if self.search.data == "date":
            dates = finder.DateRange(self.date_from.date or DAWN, self.date_to.date)
        return finder.Search(patient_query=query, study_query=study_query, dates=dates)


def has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text


def contains_pattern(text: str) -> str:
    """A wildcard pattern matching values that contain ``text``, or ``text`` itself if it has wildcards."""
    return text if has_wildcard(text) else f"*{text}*"


def name_pattern(text: str) -> str:
    """Like ``contains_pattern``, with each run of spaces matching one space or ``^``."""
    pattern = re.sub(r"\s+", "?", text.strip())
    return pattern if has_wildcard(text) else f"*{pattern}*"
