"""DICOMweb study searches (QIDO-RS) of signed-in users, answered from the catalog.

Orthanc's DICOMweb plugin reads its whole index for a broad search, as ``/tools/find`` does, and
never decodes a percent-encoded value, so that a non-Latin name, which every client sends encoded,
matches nothing. The catalog answers the study searches it can, in DICOM JSON (PS3.18 F.2) with
the attributes the plugin returns by default, newest first:

- matching on PatientName, PatientID, AccessionNumber, ReferringPhysicianName and StudyDescription
  (``*`` and ``?``, as the query pages match: case and accents aside, ``control.catalog.names``),
  StudyDate (a date or a range), ModalitiesInStudy and StudyInstanceUID (lists);
- ``includefield`` naming attributes it keeps (InstitutionName, StudyDescription), ``limit`` and
  ``offset``; ``fuzzymatching`` is ignored, as the plugin ignores it.

Anything else (another key, an ``includefield`` of an attribute the catalog does not keep or of
``all``, a value that is not UTF-8) makes ``parse`` say None, and the archive answers as before.

Where the answers differ from the plugin's, on purpose: values are percent-decoded and accents
folded ("Muller" finds "Müller", ``*王*`` finds ``Wang^XiaoDong=王^小東``); a value of ``*`` alone
matches every study (the plugin leaves out those without the attribute); a date range with an open
start leaves out studies without a date (the plugin takes them), as the query pages do; and
Timezone Offset From UTC (0008,0201), which the catalog does not keep, is not answered.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import sqlalchemy as sa

from control import dicomweb_routes as routes
from control.catalog import search as catalog_search
from control.catalog import tables
from control.catalog.names import fold, has_wildcard
from control.catalog.search import DEFAULT_ORDER, SELECTIVE, Catalog, Matching
from control.identifiers import is_uid

c = catalog_search.c
# The answer is JSON, so text is UTF-8 whatever the files said: the plugin says so too.
UTF_8 = "ISO_IR 192"


@dataclass(frozen=True)
class Attribute:
    """An attribute the catalog answers: its tag, its VR, and how a row gives its value
    (text as stored, DICOM's ``\\`` between values; a number; or, for the retrieve URL, the
    study's address at the portal)."""

    keyword: str
    tag: str
    vr: str
    value: Callable[[Any, str], str | int]


def _column(name: str) -> Callable[[Any, str], str | int]:
    return lambda row, _portal: getattr(row, name)


ATTRIBUTES = {
    attribute.keyword: attribute
    for attribute in (
        Attribute("SpecificCharacterSet", "00080005", "CS", lambda _row, _portal: UTF_8),
        Attribute("StudyDate", "00080020", "DA", _column("study_date")),
        Attribute("StudyTime", "00080030", "TM", _column("study_time")),
        Attribute("AccessionNumber", "00080050", "SH", _column("accession")),
        Attribute("ModalitiesInStudy", "00080061", "CS", _column("modalities")),
        Attribute("InstitutionName", "00080080", "LO", _column("institution")),
        Attribute("ReferringPhysicianName", "00080090", "PN", _column("referring")),
        Attribute("StudyDescription", "00081030", "LO", _column("description")),
        Attribute(
            "RetrieveURL", "00081190", "UR", lambda row, portal: f"{portal}{routes.STUDIES}/{row.study_uid}"
        ),
        Attribute("PatientName", "00100010", "PN", _column("patient_name")),
        Attribute("PatientID", "00100020", "LO", _column("patient_id")),
        Attribute("PatientBirthDate", "00100030", "DA", _column("birth_date")),
        Attribute("PatientSex", "00100040", "CS", _column("patient_sex")),
        Attribute("StudyInstanceUID", "0020000D", "UI", _column("study_uid")),
        Attribute("StudyID", "00200010", "SH", _column("study_code")),
        Attribute("NumberOfStudyRelatedSeries", "00201206", "IS", _column("series_count")),
        Attribute("NumberOfStudyRelatedInstances", "00201208", "IS", _column("instance_count")),
    )
}
BY_TAG = {attribute.tag: attribute.keyword for attribute in ATTRIBUTES.values()}
# What the plugin answers without an includefield (Orthanc's DICOMweb 1.7), the time zone aside.
DEFAULT = frozenset(ATTRIBUTES) - {"InstitutionName", "StudyDescription"}
TEXT_KEYS = {
    "PatientName": c.name_key,
    "PatientID": c.patient_id_key,
    "AccessionNumber": c.accession_key,
    "ReferringPhysicianName": c.referring_key,
    "StudyDescription": c.description_key,
}
MATCHED = {*TEXT_KEYS, "StudyDate", "ModalitiesInStudy", "StudyInstanceUID"}
_LIST = re.compile(r"[,\\]")
_DATE_RANGE = re.compile(r"([0-9]{8})?(-)?([0-9]{8})?")


@dataclass(frozen=True)
class StudySearch:
    """A study search the catalog can answer: its matching keys (decoded values), the attributes
    it answers, and where its page starts."""

    matching: dict[str, str] = field(default_factory=dict)
    answered: frozenset[str] = DEFAULT
    offset: int = 0

    @property
    def study_uids(self) -> list[str]:
        return [uid for uid in _LIST.split(self.matching.get("StudyInstanceUID", "")) if uid]


def keyword_of(name: str) -> str | None:
    """The attribute a query names by keyword or tag (``PatientName``, ``00100010``), if kept."""
    return name if name in ATTRIBUTES else BY_TAG.get(name.upper())


def parse(raw_query: str) -> StudySearch | None:
    """The search a raw query string asks (without its ``limit``, see ``rules.search_limit``, which
    has checked ``offset`` too), or None when the catalog cannot answer it."""
    matching: dict[str, str] = {}
    answered, offset = set(DEFAULT), 0
    for part in raw_query.split("&") if raw_query else []:
        if not part:
            continue
        key, _, value = part.partition("=")
        try:
            key, value = unquote(key, errors="strict").strip(), unquote(value, errors="strict")
        except UnicodeDecodeError:
            return None
        if key.lower() == "offset":
            offset = int(value.strip())
        elif key.lower() == "includefield":
            for name in value.split(","):
                keyword = keyword_of(name.strip())
                if keyword is None:
                    return None
                answered.add(keyword)
        elif key.lower() != "fuzzymatching":
            keyword = keyword_of(key)
            if keyword == "StudyInstanceUID" and keyword in matching:
                value = f"{matching[keyword]},{value}"  # a list given key by key
            elif keyword not in MATCHED or keyword in matching:
                return None
            if not _can_match(keyword, value):
                return None
            matching[keyword] = value
            answered.add(keyword)
    return StudySearch(matching, frozenset(answered), offset)


def _universal(value: str) -> bool:
    return value in ("", "*")


def _can_match(keyword: str, value: str) -> bool:
    if _universal(value) or keyword in TEXT_KEYS:
        return True
    if keyword == "StudyDate":
        return _date_range(value) is not None
    items = [item for item in _LIST.split(value) if item]
    if keyword == "StudyInstanceUID":
        return bool(items) and all(is_uid(item) for item in items)
    return bool(items) and not any(has_wildcard(item) for item in items)  # ModalitiesInStudy


def _date_range(value: str) -> tuple[str | None, str | None] | None:
    """A DICOM date or range (``A``, ``A-``, ``-B``, ``A-B``) as its first and last dates."""
    found = _DATE_RANGE.fullmatch(value.strip())
    if found is None or not (found[1] or found[3]) or (found[3] and not found[2]):
        return None
    for day in (found[1], found[3]):
        try:
            if day:
                dt.datetime.strptime(day, "%Y%m%d")
        except ValueError:
            return None
    if not found[2]:
        return found[1], found[1]
    return found[1], found[3]


def conditions(catalog: Catalog, search: StudySearch, *, walking: bool) -> list[sa.ColumnElement[bool]]:
    """The SQL of ``search``; ``walking`` for a walk of the date index (many matches)."""
    where: list[sa.ColumnElement[bool]] = []
    for keyword, value in search.matching.items():
        if _universal(value):
            continue
        if keyword in TEXT_KEYS:
            where.append(catalog.matches(TEXT_KEYS[keyword], value, walking=walking))
        elif keyword == "StudyDate":
            first, last = _date_range(value) or (None, None)
            where.append(c.study_date != "")
            if first:
                where.append(c.study_date >= first)
            if last:
                where.append(c.study_date <= last)
        elif keyword == "StudyInstanceUID":
            where.append(c.study_uid.in_(search.study_uids))
        else:
            held = [fold(item) for item in _LIST.split(value) if item]
            where.append(sa.or_(*(catalog.has_modality(modality, walking=walking) for modality in held)))
    return where


def find(connection: sa.Connection, search: StudySearch, limit: int) -> tuple[list[Any], bool]:
    """Up to ``limit`` matching studies (catalog rows) from the search's offset, newest first, and
    whether there are more. Planned as the query pages are (``control.catalog.search``): counted,
    then read by their criteria when few, found by walking the date index when many."""
    catalog = Catalog(connection)
    where = conditions(catalog, search, walking=False)
    few = False
    if where:
        counted = sa.select(sa.func.count()).select_from(tables.studies).where(*where)
        total = connection.execute(counted).scalar_one()
        if total <= search.offset:
            return [], False
        few = total <= SELECTIVE
        where = conditions(catalog, search, walking=not few)
    rows = catalog.ordered(Matching(where, few), DEFAULT_ORDER, True, limit=limit + 1, offset=search.offset)
    return rows[:limit], len(rows) > limit


def answer(row: Any, search: StudySearch, portal: str) -> dict[str, Any]:
    """A catalog row as a DICOM JSON study, with ``portal`` (``https://host:port``) in its URL."""
    found: dict[str, Any] = {}
    for attribute in sorted((ATTRIBUTES[keyword] for keyword in search.answered), key=lambda a: a.tag):
        found[attribute.tag] = element(attribute.vr, attribute.value(row, portal))
    return found


def element(vr: str, value: str | int) -> dict[str, Any]:
    """One attribute in DICOM JSON: an empty one has no ``Value``; names are split into their
    alphabetic, ideographic and phonetic groups (``=`` between them)."""
    if isinstance(value, int):
        return {"Value": [value], "vr": vr}
    if not value:
        return {"vr": vr}
    values = value.split("\\") if vr != "UR" else [value]
    if vr == "PN":
        groups = ("Alphabetic", "Ideographic", "Phonetic")
        return {"Value": [dict(zip(groups, name.split("="), strict=False)) for name in values], "vr": vr}
    return {"Value": values, "vr": vr}
