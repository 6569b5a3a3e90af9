"""The modality worklist: one DICOM file per scheduled order in the data directory's ``worklists/``.

Orthanc's worklist plugin answers modalities' C-FIND requests from every ``*.wl`` file in that
folder, reading them again for every query, so the files are the worklist: no table mirrors them
and any portal instance sharing the data directory sees the same entries. A file is named from a
hash of its order's key (accession number and step), never from a value of the order itself: a
repeated order lands on the same name and replaces its entry, a cancel removes it. Files are
written under a temporary name and renamed, so the plugin never reads half an entry.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from control.site import replacing
from control.uploads.hl7orders import Order

WORKLIST_SOP_CLASS = UID("1.2.840.10008.5.1.4.31")  # Modality Worklist Information Model - FIND
SUFFIX = ".wl"


class Change(enum.StrEnum):
    """What an order did to the worklist (the values are what the upload results show)."""

    SCHEDULED = "scheduled"
    REPLACED = "replaced"
    CANCELLED = "cancelled"


class NothingToCancel(LookupError):
    """A cancel named an order the worklist does not hold."""


def entry_name(order: Order) -> str:
    """The file name of an order's entry: a hash of its key, safe whatever the order says."""
    return hashlib.sha256(order.key.encode()).hexdigest()[:32] + SUFFIX


def dataset_of(order: Order) -> Dataset:
    """The worklist entry of an order, as Orthanc's plugin serves it."""
    entry = Dataset()
    entry.file_meta = FileMetaDataset()
    entry.file_meta.MediaStorageSOPClassUID = WORKLIST_SOP_CLASS
    entry.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    entry.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    entry.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: names arrive in any script
    entry.AccessionNumber = order.accession_number
    entry.ReferringPhysicianName = order.referring_physician
    entry.PatientName = order.patient_name
    entry.PatientID = order.patient_id
    if order.issuer_of_patient_id:
        entry.IssuerOfPatientID = order.issuer_of_patient_id
    entry.PatientBirthDate = order.birth_date
    entry.PatientSex = order.sex
    # The same order always gets the same study UID, so a modality that queried before a
    # replacement still files its images into the same study.
    entry.StudyInstanceUID = order.study_instance_uid or generate_uid(entropy_srcs=["worklist", order.key])
    entry.RequestedProcedureID = order.requested_procedure_id
    entry.RequestedProcedureDescription = order.procedure_text
    if order.procedure_code:
        code = Dataset()
        code.CodeValue = order.procedure_code
        code.CodingSchemeDesignator = order.procedure_scheme or "L"
        code.CodeMeaning = order.procedure_text or order.procedure_code
        entry.RequestedProcedureCodeSequence = [code]
    entry.PlacerOrderNumberImagingServiceRequest = order.placer_order_number
    entry.FillerOrderNumberImagingServiceRequest = order.filler_order_number
    step = Dataset()
    step.Modality = order.modality
    step.ScheduledStationAETitle = order.station_aet
    step.ScheduledProcedureStepStartDate = order.scheduled_date
    step.ScheduledProcedureStepStartTime = order.scheduled_time
    step.ScheduledPerformingPhysicianName = ""
    step.ScheduledProcedureStepDescription = order.procedure_text
    step.ScheduledProcedureStepID = order.step_id
    step.ScheduledProcedureStepStatus = "SCHEDULED"
    entry.ScheduledProcedureStepSequence = [step]
    return entry


def apply(folder: Path, order: Order) -> Change:
    """Schedule, replace or cancel the entry of ``order``; raise NothingToCancel when there is none."""
    path = folder / entry_name(order)
    if order.cancels:
        try:
            path.unlink()
        except FileNotFoundError:
            raise NothingToCancel(
                f"message {order.message}: nothing to cancel, the worklist holds no order with "
                f"accession number {order.accession_number}"
            ) from None
        return Change.CANCELLED
    existed = path.exists()
    folder.mkdir(parents=True, exist_ok=True)
    with replacing(path) as file:
        dataset_of(order).save_as(file, enforce_file_format=True)
    return Change.REPLACED if existed else Change.SCHEDULED


@dataclass(frozen=True)
class Entry:
    """One worklist entry as the admin's page lists it."""

    id: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    accession_number: str
    modality: str
    station_aet: str
    scheduled: str  # DICOM's date and time, "YYYYMMDD HHMMSS": the list's order
    procedure: str
    referring_physician: str
    written_at: dt.datetime
    problem: str = ""

    @property
    def scheduled_date(self) -> str:
        return self.scheduled.partition(" ")[0]

    @property
    def scheduled_time(self) -> str:
        return self.scheduled.partition(" ")[2]


def list_entries(folder: Path) -> list[Entry]:
    """Every entry in the folder, soonest scheduled first; unreadable files are listed as such."""
    entries = [_read_entry(path) for path in folder.glob(f"*{SUFFIX}") if path.is_file()]
    return sorted(entries, key=lambda entry: (entry.scheduled or "~", entry.accession_number))


def _read_entry(path: Path) -> Entry:
    written_at = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).replace(tzinfo=None)
    try:
        entry = pydicom.dcmread(path)
        steps = entry.get("ScheduledProcedureStepSequence") or [None]
        step = steps[0]
    except Exception as error:  # any damage to a file in the folder is shown, not raised
        return Entry(path.stem, "", "", "", "", "", "", "", "", "", "", written_at, f"unreadable: {error}")
    date = step.get("ScheduledProcedureStepStartDate", "") if step else ""
    time = step.get("ScheduledProcedureStepStartTime", "") if step else ""
    return Entry(
        id=path.stem,
        patient_name=str(entry.get("PatientName", "")),
        patient_id=entry.get("PatientID", ""),
        birth_date=entry.get("PatientBirthDate", ""),
        sex=entry.get("PatientSex", ""),
        accession_number=entry.get("AccessionNumber", ""),
        modality=step.get("Modality", "") if step else "",
        station_aet=step.get("ScheduledStationAETitle", "") if step else "",
        scheduled=f"{date} {time}".strip(),
        procedure=entry.get("RequestedProcedureDescription", ""),
        referring_physician=str(entry.get("ReferringPhysicianName", "")),
        written_at=written_at,
    )


def delete_entry(folder: Path, entry_id: str) -> Entry | None:
    """Delete the entry listed under ``entry_id``; None when there is no such entry.

    The id is looked up among the files actually in the folder, so no text from a request is ever
    turned into a path of its own.
    """
    for path in folder.glob(f"*{SUFFIX}"):
        if path.stem == entry_id and path.is_file():
            entry = _read_entry(path)
            path.unlink(missing_ok=True)
            return entry
    return None
