"""Which DICOMweb requests the gate lets through: the rules as data, decided by one pure function.

The gate sees the request line exactly as the browser sent it (Caddy passes it in
``X-Forwarded-Uri``; a frame request comes itself, its target kept by gunicorn) and the same bytes
then reach Orthanc, so it decides on the raw text and does not try to repair it: a path that is
not in canonical form (percent-escapes, ``..``, ``//``, a trailing slash, other letter case) is
refused rather than normalised, because Orthanc's reading of a repaired path could differ from
the gate's. The paths it knows are those of the route table (``control.dicomweb_routes``); UIDs
are digits and dots, nothing else.

Who may do what:

- a signed-in user reads everything; stores (STOW-RS) only with the upload right;
- a patient's study grant reads its own study (metadata, frames, rendered images, bulk data) and
  searches that answer with that study alone; nothing else, and nothing but GET and HEAD;
- a viewer token (``control.desktop``: the desktop viewer, or another DICOMweb viewer) reads its
  studies the way a grant does; one scoped to a series reads inside that series only;
- anyone else: 401.

Whoever asks, a request that Orthanc would read as another method is refused: Orthanc 1.10.1
takes ``X-HTTP-Method-Override: DELETE`` on any request, and ``?_method=DELETE`` (with the key or
value percent-encoded too) on a GET, as a DELETE. So is a request body with a ``Content-Encoding``:
Orthanc 1.10.1 would inflate it without bounds.

DICOMweb names a study by its Study Instance UID alone, and a modality can send two patients'
studies under one UID: Orthanc then keeps two studies, and its DICOMweb answers for that UID mix
them. So once the rules say yes to a request that names a study, ``owned`` looks at which archive
studies hold that UID right now: a UID held by several is refused to everyone (409), and a grant
reads its UID only while the one study holding it is the study its link was made for.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from control import dicomweb_routes as routes
from control.identifiers import is_uid

READ_METHODS = frozenset(routes.READ)


class Verdict(enum.Enum):
    ALLOW = 200
    BAD_REQUEST = 400
    SIGN_IN = 401
    DENY = 403
    NOT_FOUND = 404
    CONFLICT = 409
    UNSUPPORTED = 415


# The header Orthanc 1.10.1 reads as the request's method, and the query key it reads so on a GET.
METHOD_OVERRIDE_HEADER = "x-http-method-override"
METHOD_OVERRIDE_KEY = "_method"


@dataclass(frozen=True)
class Visitor:
    """Who is asking: a signed-in user (with or without the upload right), study grants, or a
    viewer token (``credential``, its public id) with its studies and, if scoped to one, series.

    ``granted_studies`` maps each granted Study Instance UID to the archive's id of the study the
    link or token was made for.
    """

    signed_in: bool = False
    can_upload: bool = False
    granted_studies: Mapping[str, str] = field(default_factory=dict)
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


def decide(method: str, uri: str, visitor: Visitor, headers: Mapping[str, str] | None = None) -> Decision:
    """The gate's answer for ``method uri`` from ``visitor``; ``headers`` (lower-case names) are the
    request's, of which the method override and the content encoding count."""
    path, query = split_uri(uri)
    headers = headers or {}
    if not visitor.signed_in and not visitor.granted_studies:
        if visitor.credential:
            return Decision(Verdict.SIGN_IN, "the viewer token no longer works (expired, revoked or ended)")
        return Decision(Verdict.SIGN_IN, "no session and no study grant")
    if METHOD_OVERRIDE_HEADER in headers or _names_a_method(query):
        return Decision(Verdict.BAD_REQUEST, "the request names another method than its own")
    if headers.get("content-encoding", "identity").strip().lower() != "identity":
        return Decision(Verdict.UNSUPPORTED, "a request body with a content encoding")
    if not routes.known(path):
        return Decision(Verdict.NOT_FOUND, "not a DICOMweb resource in canonical form")

    if method == "POST":
        if not routes.STORE.matches(path):
            return Decision(Verdict.DENY, "POST is only for storing studies")
        if visitor.signed_in and visitor.can_upload:
            return Decision(Verdict.ALLOW, "store by an uploader")
        return Decision(Verdict.DENY, "storing needs the upload right")
    if method not in READ_METHODS:
        return Decision(Verdict.DENY, f"{method} is not allowed")

    if visitor.signed_in:
        return Decision(Verdict.ALLOW, "read by a signed-in user")
    if routes.SEARCH.matches(path):
        # Answered by the control plane itself, narrowed to the granted studies (see views).
        return Decision(Verdict.DENY, "searches by a study grant are narrowed by the portal")
    study = _study_of(path, query)
    if not study or study not in visitor.granted_studies:
        return Decision(Verdict.DENY, "the study is not granted", study)
    if visitor.granted_series and _series_of(path, query) not in visitor.granted_series:
        # The study itself, its metadata and its list of series are more than one series.
        return Decision(Verdict.DENY, "the series is not granted", study)
    return Decision(Verdict.ALLOW, "read of a granted study", study)


def _names_a_method(query: str) -> bool:
    return any(key.lower() == METHOD_OVERRIDE_KEY for key, _value in decoded_pairs(query))


def decoded_pairs(query: str) -> list[tuple[str, str]]:
    """A query string's pairs, keys and values percent-decoded as Orthanc decodes them."""
    pairs = []
    for part in query.split("&") if query else []:
        key, _, value = part.partition("=")
        pairs.append((unquote(key).strip(), unquote(value)))
    return pairs


def study_named(uri: str) -> str:
    """The Study Instance UID a request's path names (a study's resources, WADO-URI), or ''."""
    return _study_of(*split_uri(uri))


def searched_studies(query: str) -> list[str]:
    """The Study Instance UIDs a search's query string asks for, however it spells the key."""
    asked: list[str] = []
    for key, value in decoded_pairs(query):
        if key.lower() in STUDY_UID_KEYS:
            asked.extend(item for item in re.split(r"[,\\]", value) if item)
    return asked


def owned(decision: Decision, visitor: Visitor, study_uid: str, holders: Sequence[str]) -> Decision:
    """The final answer to a request the rules allowed that names ``study_uid``, given ``holders``:
    the archive's ids of the studies that hold that UID now (see the module)."""
    if decision.verdict is not Verdict.ALLOW:
        return decision
    if len(holders) > 1:
        return Decision(
            Verdict.CONFLICT,
            f"the Study Instance UID is shared by {len(holders)} patients' studies",
            study_uid,
        )
    if not visitor.signed_in and list(holders) != [visitor.granted_studies.get(study_uid)]:
        return Decision(
            Verdict.NOT_FOUND, "the study of the link is no longer the archive's study", study_uid
        )
    return decision


def _study_of(path: str, query: str) -> str:
    resource = routes.STUDY_RESOURCE.match(path)
    if resource is not None:
        return resource["study"]
    if routes.WADO_URI.matches(path):
        study = dict(parse_qsl(query)).get("studyUID", "")
        return study if is_uid(study) else ""
    return ""


def _series_of(path: str, query: str) -> str:
    resource = routes.STUDY_RESOURCE.match(path)
    if resource is not None:
        return resource["series"] or ""
    if routes.WADO_URI.matches(path):
        series = dict(parse_qsl(query)).get("seriesUID", "")
        return series if is_uid(series) else ""
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
    kept: list[str] = []
    asked: list[str] = []
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


# QIDO searches are paged: an answer of every study in the archive took Orthanc 7 s at 1,500
# studies (it reads each study's tags). A search without a limit gets the default, one asking for
# more than the maximum gets the maximum.
DEFAULT_LIMIT = 100
MAX_LIMIT = 500
_COUNT = re.compile(r"[0-9]{1,9}")


def search_limit(raw_query: str) -> tuple[str, int]:
    """A search's raw query string without its ``limit``, and the limit the portal puts instead.

    Orthanc decodes the key (``%6Cimit``), reads the last ``limit`` given and takes 0 for "all":
    every ``limit`` the client gave goes, and the caller adds one. Raises ValueError for a limit
    or an offset that is not a whole number (Orthanc answers those with a 400 or a 500).
    """
    kept, asked = [], ""
    for part in raw_query.split("&") if raw_query else []:
        key, _, value = part.partition("=")
        name, number = unquote(key).strip().lower(), unquote(value).strip()
        if name in ("limit", "offset") and not _COUNT.fullmatch(number):
            raise ValueError(f"{name} must be a whole number")
        if name == "limit":
            asked = number
        else:
            kept.append(part)
    limit = min(int(asked), MAX_LIMIT) if asked and int(asked) else DEFAULT_LIMIT
    return "&".join(kept), limit
