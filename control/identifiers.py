"""The shapes of the archive's identifiers, spelled once for every check that reads them.

Two kinds of identifier reach the control plane from outside: DICOM UIDs (in DICOMweb paths, in
HL7 orders, in a PDF's "study" field) and Orthanc's resource ids (in the pages' URLs). Both go
into Orthanc paths and queries, so anything else is refused before it gets there. The patterns
are plain regular expressions that Python and Caddy (Go's RE2) read alike: the DICOMweb route
table (``control.dicomweb_routes``) puts them into the Caddyfile too.
"""

from __future__ import annotations

import re

# A DICOM UID as the gate takes it: digits and dots, no empty component (PS3.5 9.1).
UID = r"[0-9]+(?:\.[0-9]+)*"
# Orthanc's id of a patient, study, series or instance: a SHA-1 in five groups of eight
# (control.orthanc.resource_id).
ORTHANC_ID = r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}"

_UID = re.compile(UID)
_ORTHANC_ID = re.compile(ORTHANC_ID)


def is_uid(text: str) -> bool:
    return _UID.fullmatch(text) is not None


def is_orthanc_id(text: str) -> bool:
    return _ORTHANC_ID.fullmatch(text) is not None
