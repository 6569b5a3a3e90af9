"""The DICOMweb route table: every path the portal takes under ``/dicom-web`` and ``/wado``, and who
answers it.

Three parties read DICOMweb paths. Caddy hands some requests to the control plane and streams the
rest from Orthanc once the gate has said yes; the control plane's blueprint answers the first
kind; the gate (``control.dicomweb.rules``) lets through only paths of the grammar below, in
canonical form. All three take the grammar from this table:

- the Caddyfile's matchers for what the control plane answers are rendered from
  ``TO_CONTROL_PLANE``, and the one for bulk data's media type from ``BULK_DATA``
  (``control.runtime.configs``, ``proxy/Caddyfile``);
- the blueprint's URL rules are the rows' ``rules`` (``control.dicomweb``);
- the gate knows a path when a row matches it (``known``).

A path is a row's when it matches the row's pattern whole. The patterns are regular expressions
that Python and Go (Caddy) read alike; the variable parts of the control plane's rules are
Werkzeug converters with the same expressions. tests/test_dicomweb_routes.py fails when the
Caddyfile or the blueprint spells a DICOMweb path of its own.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from werkzeug.routing import BaseConverter

from control.identifiers import UID


class UidConverter(BaseConverter):
    regex = UID


class NumberConverter(BaseConverter):
    regex = "[0-9]+"


# The converters of the control plane's rules (registered by the blueprint), by name.
CONVERTERS: dict[str, type[BaseConverter]] = {"uid": UidConverter, "number": NumberConverter}
_VARIABLE = re.compile(r"<(\w+):(\w+)>")
# What a rule's fixed text may hold: nothing a regular expression reads otherwise.
_LITERAL = re.compile(r"[A-Za-z0-9/_-]*")


class AnsweredBy(enum.Enum):
    CONTROL_PLANE = "the control plane"
    # After the gate's yes (Caddy's forward_auth), Caddy streams Orthanc's answer.
    ORTHANC = "Orthanc, through Caddy"


@dataclass(frozen=True)
class Route:
    """A kind of DICOMweb request: its methods, its paths, and who answers it.

    A control plane's row gives its paths as the blueprint's URL rules (``rules``, answered by
    ``endpoint``); an Orthanc row as a regular expression (``pattern``) with a named ``study``
    where its paths name one.
    """

    name: str
    methods: tuple[str, ...]
    answered_by: AnsweredBy
    why: str
    rules: tuple[str, ...] = ()
    endpoint: str = ""
    # Caddy asks the upload gate (size, free disk) before the body comes.
    upload: bool = False
    pattern: str = ""
    _compiled: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        patterns = [_rule_pattern(rule) for rule in self.rules] if self.rules else [self.pattern]
        object.__setattr__(self, "_compiled", tuple(re.compile(pattern) for pattern in patterns))
        if self.rules:
            unnamed = [re.sub(r"\(\?P<\w+>", "(?:", pattern) for pattern in patterns]
            object.__setattr__(self, "pattern", "|".join(unnamed))

    def match(self, path: str) -> dict[str, str] | None:
        """The named parts of ``path`` (``study``, ``series``...) when it is this row's, else None."""
        for compiled in self._compiled:
            found = compiled.fullmatch(path)
            if found is not None:
                return found.groupdict()
        return None

    def matches(self, path: str) -> bool:
        return self.match(path) is not None

    @property
    def caddy_regexp(self) -> str:
        """The row's paths as a Caddyfile ``path_regexp``."""
        return f"^(?:{self.pattern})$"


def _rule_pattern(rule: str) -> str:
    """A URL rule (``/studies/<uid:study>``) as a regular expression with named parts."""
    parts = _VARIABLE.split(rule)
    if not all(_LITERAL.fullmatch(text) for text in parts[::3]):
        raise ValueError(f"{rule}: a DICOMweb path is letters, digits, '/', '-' and variables")
    pattern = parts[0]
    for converter, name, text in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        pattern += f"(?P<{name}>{CONVERTERS[converter].regex}){text}"
    return pattern


READ = ("GET", "HEAD")
# Where studies are searched (and, below it, each study is): the catalog answers these searches
# for signed-in users, and its answers point at the study below it (control.catalog.qido).
STUDIES = "/dicom-web/studies"
_STUDY = f"{STUDIES}/<uid:study>"
_SERIES = f"{_STUDY}/series/<uid:series>"

SEARCH = Route(
    "search",
    READ,
    AnsweredBy.CONTROL_PLANE,
    "Top-level searches (QIDO-RS): the control plane pages them and narrows them to a patient's study.",
    rules=(STUDIES, "/dicom-web/series", "/dicom-web/instances"),
    endpoint="search",
)
STORE = Route(
    "store",
    ("POST",),
    AnsweredBy.CONTROL_PLANE,
    "Stores (STOW-RS), through the upload page's checks.",
    rules=(STUDIES, _STUDY),
    endpoint="store_instances",
    upload=True,
)
FRAME = Route(
    "frame",
    ("GET",),
    AnsweredBy.CONTROL_PLANE,
    "Single frames, the bulk of a viewer's requests: from Orthanc's core, at a third of the plugin's cost.",
    rules=(f"{_SERIES}/instances/<uid:instance>/frames/<number:frame>",),
    endpoint="retrieve_frame",
)
RETRIEVE = Route(
    "retrieve",
    ("GET",),
    AnsweredBy.CONTROL_PLANE,
    "Whole studies and series, which Orthanc ends by closing its connection: a cut one is broken off.",
    rules=(_STUDY, _SERIES),
    endpoint="retrieve_instances",
)

_PARTS = r"(?:/metadata|/rendered|/thumbnail)"
_FRAMES = r"/frames/[0-9]+(?:,[0-9]+)*(?:/rendered|/thumbnail)?"
_BULK = r"/bulk/[0-9A-Fa-f]{8}(?:/[0-9]+/[0-9A-Fa-f]{8})*"
_INSTANCE = rf"/instances/{UID}(?:{_PARTS}|{_FRAMES}|{_BULK})?"
_SERIES_RESOURCE = rf"/series/(?P<series>{UID})(?:{_PARTS}|/instances|{_INSTANCE})?"

STUDY_RESOURCE = Route(
    "study_resource",
    READ,
    AnsweredBy.ORTHANC,
    "Everything else a viewer reads of a study: metadata, rendered images, bulk data, frame lists.",
    pattern=rf"/dicom-web/studies/(?P<study>{UID})(?:{_PARTS}|/series|{_SERIES_RESOURCE})?",
)
WADO_URI = Route(
    "wado_uri",
    READ,
    AnsweredBy.ORTHANC,
    "WADO-URI: the study, series and instance are in the query string.",
    pattern="/wado",
)

# Bulk data (a PDF report, say), whose Accept header Caddy narrows to the one type both DICOMweb
# plugins serve (proxy/Caddyfile): a Caddyfile ``path_regexp``.
BULK_DATA = rf"^/dicom-web/studies/{UID}/series/{UID}/instances/{UID}{_BULK}$"

# Caddy's question before it streams Orthanc's answer (forward_auth); not a DICOMweb path.
GATE = "/internal/gate/dicom-web"

ROUTES = (SEARCH, STORE, FRAME, RETRIEVE, STUDY_RESOURCE, WADO_URI)
# In the order Caddy tries them, before it hands the rest to Orthanc through the gate.
TO_CONTROL_PLANE = tuple(route for route in ROUTES if route.answered_by is AnsweredBy.CONTROL_PLANE)


def known(path: str) -> bool:
    """Whether ``path`` (raw, as the client sent it) is a DICOMweb path of the table."""
    return any(route.matches(path) for route in ROUTES)
