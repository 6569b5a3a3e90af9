"""Which DICOMweb requests the gate lets through: the rules as data, decided by one pure function.

The gate sees the request line exactly as the browser sent it (Caddy passes it in
``X-Forwarded-Uri``; a frame request comes itself, its target kept by gunicorn) and the same bytes
then reach Orthanc, so it decides on the raw text and does not try to repair it: a path that is
not in canonical form (percent-escapes, ``..``, ``//``, a trailing slash, other letter case) is
refused rather than normalised, because Orthanc's reading of a repaired path could differ from
the gate's. UIDs are digits and dots, nothing else.

Who may do what:

- a signed-in user reads everything; stores (STOW-RS) only with the upload right;
- a patient's study grant reads its own study (metadata, frames, rendered images, bulk data) and
  searches that answer with that study alone; nothing else, and nothing but GET and HEAD;
- a viewer token (``control.desktop``: the desktop viewer, or another DICOMweb viewer) reads its
  studies the way a grant does; one scoped to a series reads inside that series only;
- anyone else: 401.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

UID = r"[0-9]+(?:\.[0-9]+)*"
_PARTS = r"(?:/metadata|/rendered|/thumbnail)"
_FRAMES = r"/frames/[0-9]+(?:,[0-9]+)*(?:/rendered|/thumbnail)?"
_BULK = r"/bulk/[0-9A-Fa-f]{8}(?:/[0-9]+/[0-9A-Fa-f]{8})*"
_INSTANCE = rf"/instances/{UID}(?:{_PARTS}|{_FRAMES}|{_BULK})?"
_SERIES = rf"/series/{UID}(?:{_PARTS}|/instances|{_INSTANCE})?"

STUDY_RESOURCE = re.compile(rf"^/dicom-web/studies/(?P<study>{UID})(?:{_PARTS}|/series|{_SERIES})?$")
SEARCHES = frozenset({"/dicom-web/studies", "/dicom-web/series", "/dicom-web/instances"})
STORE = re.compile(rf"^/dicom-web/studies(?:/{UID})?$")
WADO_URI = "/wado"
READ_METHODS = frozenset({"GET", "HEAD"})


class Verdict(enum.Enum):
    ALLOW = 200
    SIGN_IN = 401
    DENY = 403
    NOT_FOUND = 404


@dataclass(frozen=True)
class Visitor:
    """Who is asking: a signed-in user (with or without the upload right), study grants, or a
    viewer token (``credential``, its public id) with its studies and, if scoped to one, series."""

    signed_in: bool = False
    can_upload: bool = False
    granted_studies: Collection[str] = ()
    granted_series: Collection[str] = ()
    credential: str = ""


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str
    study_uid: str = ""


def request_uri(environ: dict[str, Any]) -> str:
    """The request's target as the client sent it (gunicorn keeps it), for the rules' raw reading."""
    raw = environ.get("RAW_URI")
    if raw is not None:
        return raw
    query = environ.get("QUERY_STRING", "")
    return environ.get("PATH_INFO", "") + (f"?{query}" if query else "")


def split_uri(uri: str) -> tuple[str, str]:
    path, _, query = uri.partition("?")
    return path, query


def decide(method: str, uri: str, visitor: Visitor) -> Decision:
    """The gate's answer for ``method uri`` from ``visitor``."""
    path, query = split_uri(uri)
    if not visitor.signed_in and not visitor.granted_studies:
        if visitor.credential:
            return Decision(Verdict.SIGN_IN, "the viewer token no longer works (expired, revoked or ended)")
        return Decision(Verdict.SIGN_IN, "no session and no study grant")
    if not (path == WADO_URI or path in SEARCHES or STUDY_RESOURCE.match(path) or STORE.match(path)):
        return Decision(Verdict.NOT_FOUND, "not a DICOMweb resource in canonical form")

    if method == "POST":
        if not STORE.match(path):
            return Decision(Verdict.DENY, "POST is only for storing studies")
        if visitor.signed_in and visitor.can_upload:
            return Decision(Verdict.ALLOW, "store by an uploader")
        return Decision(Verdict.DENY, "storing needs the upload right")
    if method not in READ_METHODS:
        return Decision(Verdict.DENY, f"{method} is not allowed")

    if visitor.signed_in:
        return Decision(Verdict.ALLOW, "read by a signed-in user")
    if path in SEARCHES:
        # Answered by the control plane itself, narrowed to the granted studies (see views).
        return Decision(Verdict.DENY, "searches by a study grant are narrowed by the portal")
    study = _study_of(path, query)
    if not study or study not in visitor.granted_studies:
        return Decision(Verdict.DENY, "the study is not granted", study)
    if visitor.granted_series and _series_of(path, query) not in visitor.granted_series:
        # The study itself, its metadata and its list of series are more than one series.
        return Decision(Verdict.DENY, "the series is not granted", study)
    return Decision(Verdict.ALLOW, "read of a granted study", study)


def _study_of(path: str, query: str) -> str:
    match = STUDY_RESOURCE.match(path)
    if match:
        return match.group("study")
    if path == WADO_URI:
        values = dict(parse_qsl(query))
        study = values.get("studyUID", "")
        return study if re.fullmatch(UID, study) else ""
    return ""


SERIES_RESOURCE = re.compile(rf"^/dicom-web/studies/{UID}/series/(?P<series>{UID})(?:/|$)")


def _series_of(path: str, query: str) -> str:
    match = SERIES_RESOURCE.match(path)
    if match:
        return match.group("series")
    if path == WADO_URI:
        series = dict(parse_qsl(query)).get("seriesUID", "")
        return series if re.fullmatch(UID, series) else ""
    return ""


STUDY_UID_KEYS = frozenset({"studyinstanceuid", "0020000d"})


def narrowed_query(
    raw_query: str, study_uid: str, keys: frozenset[str] = STUDY_UID_KEYS, name: str = "StudyInstanceUID"
) -> str | None:
    """A search's raw query string with its study fixed to ``study_uid``.

    Every other parameter is kept byte for byte (Orthanc 1.10's QIDO reads values raw, and a
    re-encoded ``includefield=a,b`` silently loses fields). Returns None when the search asked for
    other studies only: the answer is then empty without asking Orthanc. With the ``keys`` and
    ``name`` of another level (``SERIES_UID_KEYS``, ``SeriesInstanceUID``) it fixes that level.
    """
    kept, asked = [], []
    for part in raw_query.split("&") if raw_query else []:
        key, _, value = part.partition("=")
        if "%" in key:
            return None  # an escaped key could name the study in a way this check does not read
        if key.lower() in keys:
            asked.extend(item for item in re.split(r"[,\\]|%2[Cc]|%5[Cc]", value) if item)
        else:
            kept.append(part)
    if asked and study_uid not in asked:
        return None
    kept.append(f"{name}={study_uid}")
    return "&".join(kept)


SERIES_UID_KEYS = frozenset({"seriesinstanceuid", "0020000e"})


_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_PLAIN_FOR_ORTHANC = frozenset(
    "*?,^-_.~" + "0123456789" + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


def orthanc_query(raw_query: str) -> str:
    """A search's query string as Orthanc 1.10's QIDO understands it.

    Orthanc reads query values without decoding them, so the ``PatientID=%2A`` that standard clients
    (dicomweb-client, browsers) send for ``*`` would match nothing. Escapes of plain ASCII (letters,
    digits, wildcards, commas, carets) are written out; every other byte stays as it came.
    """

    def unescape(match: re.Match[str]) -> str:
        character = chr(int(match.group(1), 16))
        return character if character in _PLAIN_FOR_ORTHANC else match.group(0)

    return _ESCAPE.sub(unescape, raw_query)
