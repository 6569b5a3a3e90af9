"""Test material for the archive: pydicom's sample files and made-up studies, sent as a modality would.

``load_samples(stack)`` sends every sample file pydicom ships (``test_files`` and ``charset_files``:
CT, MR, RT, SR, many transfer syntaxes, names in Japanese, Korean, Chinese, Greek, Arabic, Hebrew,
Russian and accented Latin) to a stack's DICOM port with pynetdicom, and returns what happened to
each file and the studies the archive now holds, as Orthanc will show them. Some files are refused,
and that is part of the material: unreadable ones, ones without UIDs, ones pynetdicom cannot encode,
ones the archive answers with a failure status.

``make_study`` builds a new study (fresh UIDs) of small CT/MR-like images, with noise for large
incompressible zips; ``send`` stores any datasets. Expectations in tests are derived from what was
sent (``Loaded.studies``, ``StudyFacts``), never hard-coded.
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pydicom.data
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from conftest import Stack

CALLING_AE = "TESTMODALITY"
SUCCESS = 0x0000
SAMPLE_FOLDERS = ("test_files", "charset_files")
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SOP_CLASSES = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class Sent:
    """One file or dataset sent to the archive, and its C-STORE status."""

    name: str
    dataset: Dataset | None  # None when pydicom could not read the file
    status: int | None  # None when nothing was sent or the association broke off

    @property
    def stored(self) -> bool:
        return self.status == SUCCESS


@dataclass
class StudyFacts:
    """A study as the archive shows it: Orthanc keeps the study's tags of its first stored instance."""

    uid: str
    patient_id: str
    patient_name: str
    sex: str
    birth_date: str
    date: str
    time: str
    accession: str
    institution: str
    referring: str
    description: str
    study_id: str
    series: dict[str, set[str]] = field(default_factory=dict)  # series UID -> SOP instance UIDs
    modality_of: dict[str, str] = field(default_factory=dict)  # series UID -> modality

    @property
    def modalities(self) -> set[str]:
        return {modality for modality in self.modality_of.values() if modality}

    @property
    def instance_count(self) -> int:
        return sum(len(instances) for instances in self.series.values())


def _text(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    return "" if value is None else str(value)


def study_facts(sent: Iterable[Sent]) -> dict[str, StudyFacts]:
    """The studies that stored datasets make, by StudyInstanceUID.

    An instance whose SOP Instance UID was stored before is a duplicate the archive ignores (it still
    answers success). Two studies with one UID but different patient IDs are two studies for
    Orthanc; they are one entry here, which tests compare by UID.
    """
    studies: dict[str, StudyFacts] = {}
    seen: set[str] = set()
    for item in sent:
        if not item.stored or item.dataset is None:
            continue
        dataset = item.dataset
        sop_uid = _text(dataset, "SOPInstanceUID")
        if sop_uid in seen:
            continue
        seen.add(sop_uid)
        uid = _text(dataset, "StudyInstanceUID")
        if uid not in studies:
            studies[uid] = StudyFacts(
                uid=uid,
                patient_id=_text(dataset, "PatientID"),
                patient_name=_text(dataset, "PatientName"),
                sex=_text(dataset, "PatientSex"),
                birth_date=_text(dataset, "PatientBirthDate"),
                date=_text(dataset, "StudyDate"),
                time=_text(dataset, "StudyTime"),
                accession=_text(dataset, "AccessionNumber"),
                institution=_text(dataset, "InstitutionName"),
                referring=_text(dataset, "ReferringPhysicianName"),
                description=_text(dataset, "StudyDescription"),
                study_id=_text(dataset, "StudyID"),
            )
        series_uid = _text(dataset, "SeriesInstanceUID")
        studies[uid].series.setdefault(series_uid, set()).add(sop_uid)
        studies[uid].modality_of.setdefault(series_uid, _text(dataset, "Modality"))
    return studies


@dataclass
class Loaded:
    """What was sent to an archive, file by file, and the studies it made."""

    sent: list[Sent]

    @property
    def stored(self) -> list[Sent]:
        return [item for item in self.sent if item.stored]

    @property
    def refused(self) -> list[Sent]:
        return [item for item in self.sent if not item.stored]

    @property
    def studies(self) -> dict[str, StudyFacts]:
        return study_facts(self.sent)


def sample_files() -> list[Path]:
    """Every DICOM sample file pydicom ships, in a stable order."""
    root = Path(pydicom.data.__file__).parent
    files: list[Path] = []
    for folder in SAMPLE_FOLDERS:
        files += sorted((root / folder).rglob("*.dcm"))
    return files


def send(stack: Stack, datasets: Iterable[tuple[str, Dataset | None]]) -> list[Sent]:
    """C-STORE each named dataset to the stack as a modality would, over as few associations as it can.

    A dataset without SOP Class or transfer syntax, or one pynetdicom cannot encode, is not sent
    (status None); an association the archive breaks off is opened again for the next dataset.
    """
    items = list(datasets)
    contexts = sorted(
        {
            (str(dataset.SOPClassUID), str(dataset.file_meta.TransferSyntaxUID))
            for _name, dataset in items
            if _sendable(dataset)
        }
    )
    # One association offers at most 128 presentation contexts.
    assert len(contexts) <= 128, "more SOP class and transfer syntax pairs than one association offers"
    ae = AE(ae_title=CALLING_AE)
    # rtplan_truncated.dcm leaves the archive waiting for the rest of it: give up on an answer soon.
    ae.dimse_timeout = 5
    for sop_class, transfer_syntax in contexts:
        ae.add_requested_context(sop_class, transfer_syntax)
    results: list[Sent] = []
    association = None
    try:
        for name, dataset in items:
            if not _sendable(dataset):
                results.append(Sent(name, dataset, None))
                continue
            if association is None or not association.is_established:
                association = ae.associate("127.0.0.1", stack.dicom_port, ae_title=stack.aet)
                assert association.is_established, "the archive refused the association"
            try:
                answer = association.send_c_store(dataset)
            except (ValueError, AttributeError, TypeError):
                results.append(Sent(name, dataset, None))  # pynetdicom could not encode it
                continue
            results.append(Sent(name, dataset, int(answer.Status) if "Status" in answer else None))
    finally:
        if association is not None and association.is_established:
            association.release()
    return results


def _sendable(dataset: Dataset | None) -> bool:
    return (
        dataset is not None
        and "SOPClassUID" in dataset
        and "SOPInstanceUID" in dataset
        and "TransferSyntaxUID" in getattr(dataset, "file_meta", {})
    )


def read_samples() -> list[tuple[str, Dataset | None]]:
    """The sample files, read by pydicom (None for those it cannot read)."""
    read: list[tuple[str, Dataset | None]] = []
    for path in sample_files():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # some samples are odd on purpose, and pydicom says so
            try:
                read.append((path.name, pydicom.dcmread(path)))
            except (InvalidDicomError, OSError, ValueError):
                read.append((path.name, None))
    return read


_loaded: dict[str, Loaded] = {}


def load_samples(stack: Stack) -> Loaded:
    """Send every pydicom sample file to ``stack`` (once per stack; later calls return the same)."""
    key = os.fspath(stack.data)
    if key not in _loaded:
        _loaded[key] = Loaded(send(stack, read_samples()))
    return _loaded[key]


def make_study(
    patient_name: str = "Test^Patient",
    patient_id: str | None = None,
    *,
    study_date: str | None = None,
    study_time: str = "120000",
    series: Iterable[tuple[str, int]] = (("CT", 1),),
    size: int = 32,
    noise: bool = False,
    **study_tags: str,
) -> list[Dataset]:
    """A new study: for each ``(modality, count)`` of ``series``, that many ``size``x``size`` images.

    ``noise`` fills the pixels with random values, which no zip compresses: large downloads from
    small studies. ``study_tags`` sets any other attribute (``PatientSex="F"``, ``AccessionNumber=...``).
    """
    study_uid = generate_uid()
    patient_id = patient_id or "TEST-" + study_uid[-10:]
    study_date = study_date or dt.date.today().strftime("%Y%m%d")
    datasets = []
    for series_number, (modality, count) in enumerate(series, 1):
        series_uid = generate_uid()
        for instance_number in range(1, count + 1):
            dataset = Dataset()
            dataset.SpecificCharacterSet = "ISO_IR 192"
            dataset.SOPClassUID = SOP_CLASSES.get(modality, SECONDARY_CAPTURE)
            dataset.SOPInstanceUID = generate_uid()
            dataset.PatientName = patient_name
            dataset.PatientID = patient_id
            dataset.StudyInstanceUID = study_uid
            dataset.StudyDate = study_date
            dataset.StudyTime = study_time
            dataset.StudyID = "1"
            dataset.AccessionNumber = ""
            dataset.ReferringPhysicianName = ""
            dataset.SeriesInstanceUID = series_uid
            dataset.SeriesNumber = series_number
            dataset.Modality = modality
            dataset.InstanceNumber = instance_number
            for keyword, value in study_tags.items():
                setattr(dataset, keyword, value)
            _add_pixels(dataset, size, noise)
            dataset.file_meta = FileMetaDataset()
            dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            datasets.append(dataset)
    return datasets


def _add_pixels(dataset: Dataset, size: int, noise: bool) -> None:
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.Rows = dataset.Columns = size
    dataset.BitsAllocated = dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    if noise:
        dataset.PixelData = os.urandom(size * size * 2)
    else:
        dataset.PixelData = bytes(
            (row * 7 + column) % 256 for row in range(size) for column in range(size * 2)
        )


def store_study(stack: Stack, datasets: list[Dataset]) -> StudyFacts:
    """Send a study made by ``make_study``; every instance must be stored."""
    sent = send(stack, [(f"instance {number}", dataset) for number, dataset in enumerate(datasets, 1)])
    assert all(item.stored for item in sent), [(item.name, item.status) for item in sent]
    (facts,) = study_facts(sent).values()
    return facts
