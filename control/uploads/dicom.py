"""What an uploaded file is, and whether a DICOM file may go to the archive.

``sniff`` tells DICOM, zip, HL7 and PDF apart by their first bytes, never by the file's name.
``check_dicom`` reads a DICOM file's header with pydicom before Orthanc sees it, so that a refusal
says in words what is wrong (not DICOM, truncated, missing its UIDs) and a zip full of other things
never reaches Orthanc. Orthanc still has the last word: what it refuses is reported too.

Only the header is parsed: values longer than ``DEFER_SIZE`` (pixel data above all) are skipped
over, not read, which keeps the check near a millisecond whatever the file's size and lets it spot
a file that ends before a value it announces.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import IO

import pydicom
from pydicom.dataelem import RawDataElement

DEFER_SIZE = 16 * 1024
HEAD_SIZE = 1024  # enough of a file's start to tell what it is
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
REQUIRED_UIDS = (
    ("StudyInstanceUID", "Study Instance UID"),
    ("SeriesInstanceUID", "Series Instance UID"),
    ("SOPInstanceUID", "SOP Instance UID"),
)
_UNDEFINED_LENGTH = 0xFFFFFFFF
# A DICOM file without the Part 10 header starts with an element of group 0002 or 0008, in either
# byte order (pydicom's own test files and Orthanc both accept such files).
_BARE_DATASET_STARTS = (b"\x08\x00", b"\x00\x08", b"\x02\x00", b"\x00\x02")


class Kind(enum.Enum):
    DICOM = "DICOM file"
    ZIP = "zip file"
    HL7 = "HL7 message file"
    PDF = "PDF file"
    OTHER = "other file"


def sniff(head: bytes) -> Kind:
    """What a file is, from its first ``HEAD_SIZE`` bytes."""
    if head[128:132] == b"DICM":
        return Kind.DICOM
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return Kind.ZIP
    if b"%PDF-" in head:
        return Kind.PDF
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if text.startswith((b"MSH", b"FHS", b"BHS")):
        return Kind.HL7
    if head.startswith(_BARE_DATASET_STARTS):
        return Kind.DICOM
    return Kind.OTHER


class NotForTheArchive(ValueError):
    """A file that is not sent to Orthanc, and why. ``skipped`` is a file left out on purpose."""

    def __init__(self, reason: str, *, skipped: bool = False) -> None:
        super().__init__(reason)
        self.skipped = skipped


@dataclass(frozen=True)
class Header:
    """What the results table shows about a DICOM file that passed the check."""

    study_instance_uid: str
    patient_id: str
    patient_name: str
    series_instance_uid: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""


def check_dicom(file: IO[bytes], size: int) -> Header:
    """Read the header of the DICOM file ``file`` (``size`` bytes) or raise NotForTheArchive.

    The file is left positioned at its start.
    """
    file.seek(0)
    has_preamble = file.read(132)[128:132] == b"DICM"
    file.seek(0)
    try:
        dataset = pydicom.dcmread(file, defer_size=DEFER_SIZE, force=not has_preamble)
        _check_complete(dataset, size)
        header = Header(
            study_instance_uid=str(dataset.get("StudyInstanceUID", "")),
            patient_id=str(dataset.get("PatientID", "")),
            patient_name=str(dataset.get("PatientName", "")),
            series_instance_uid=str(dataset.get("SeriesInstanceUID", "")),
            sop_class_uid=str(dataset.get("SOPClassUID", "")),
            sop_instance_uid=str(dataset.get("SOPInstanceUID", "")),
        )
        missing = [label for keyword, label in REQUIRED_UIDS if not str(dataset.get(keyword, "")).strip()]
        media_class = dataset.file_meta.get("MediaStorageSOPClassUID", "") if dataset.file_meta else ""
    except NotForTheArchive:
        raise
    except Exception as error:  # pydicom raises many kinds on damaged input; all mean "unreadable"
        raise NotForTheArchive(f"not a readable DICOM file ({type(error).__name__}: {error})") from None
    finally:
        file.seek(0)
    if media_class == DICOMDIR_SOP_CLASS:
        raise NotForTheArchive("a DICOMDIR (an index of the other files), not an image", skipped=True)
    if missing and not has_preamble and len(missing) == len(REQUIRED_UIDS):
        raise NotForTheArchive("not a DICOM file")
    if missing:
        raise NotForTheArchive(f"missing its {', '.join(missing)}")
    return header


def _check_complete(dataset: pydicom.Dataset, size: int) -> None:
    """Raise NotForTheArchive when the file ends before the end of a value it announces."""
    syntax = dataset.file_meta.get("TransferSyntaxUID") if dataset.file_meta else None
    if syntax is not None and syntax.is_deflated:
        return  # offsets count the inflated data set, not the file: Orthanc judges these alone
    for tag in dataset.keys():  # noqa: SIM118 - iterating a Dataset would read every element
        element = dataset.get_item(tag, keep_deferred=True)
        if not isinstance(element, RawDataElement) or element.length == _UNDEFINED_LENGTH:
            continue
        if element.value_tell + element.length > size:
            name = pydicom.datadict.keyword_for_tag(tag) or "a private element"
            raise NotForTheArchive(
                f"truncated: the file ends {element.value_tell + element.length - size} bytes before "
                f"the end of {name} {tag}"
            )
