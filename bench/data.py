"""The benchmark's own material, made with pydicom: large CT series and many small studies.

- ``ct_series`` makes CT slices of realistic size (512x512, 16 bits, 512 kB of pixels each): a body
  phantom (air, soft tissue, lungs, a bone ring) with Gaussian noise, so that Orthanc's zip deflate
  has about as much to do as with a real scan (pure noise would not compress; a flat image would
  compress to nothing). Every slice is made from a seed, so a run is repeatable.
- ``small_study`` makes a one-instance study (an 8x8 image) with patient and study tags varied
  as in a real archive: the material of searches and of the growth scenario.
- ``post_files`` puts them into Orthanc quickly: a thread pool over ``POST /instances`` stores
  about 350 small studies a second here, where C-STORE from pynetdicom over one association
  managed about 10 (a round trip per instance, each waiting on TCP's delayed acknowledgement).

Nothing here talks to the portal: loading goes straight to Orthanc, which is set-up, not measurement.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import random
import time
import zipfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SOP_CLASSES = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}
SMALL_MODALITIES = ("CT", "CT", "MR", "CR", "DX", "US", "MG", "PT")
SIZE = 512
FAMILY_NAMES = (
    "Smith", "Jones", "Papadopoulos", "Müller", "García", "Rossi", "Nowak", "Kim", "Dubois", "Ivanova",
    "Yamada", "Haddad", "Cohen", "Silva", "Novak", "Larsen", "Okafor", "Nguyen", "Brown", "Moreau",
)  # fmt: skip
GIVEN_NAMES = (
    "Anna", "John", "Maria", "Eleni", "Ahmed", "Yuki", "Pierre", "Olga", "Luis", "Sara", "Tom", "Ines",
)  # fmt: skip


def _file_meta(dataset: Dataset) -> None:
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def encode(dataset: Dataset) -> bytes:
    """A dataset as the bytes of a DICOM file (Part 10, explicit VR little endian)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class Patient:
    name: str
    patient_id: str
    birth_date: str
    sex: str


@dataclass(frozen=True)
class StudyPlan:
    """What a large study holds: its patient, UIDs and series (description, slice count)."""

    patient: Patient
    study_uid: str
    accession: str
    description: str
    series: tuple[tuple[str, int], ...]
    seed: int
    study_date: str


def _phantom(slice_index: int, slices: int) -> np.ndarray:
    """Hounsfield units of one axial slice of a body phantom (lungs in the upper part of the stack)."""
    y, x = np.mgrid[-1 : 1 : SIZE * 1j, -1 : 1 : SIZE * 1j]
    position = slice_index / max(slices - 1, 1)
    body = (x / 0.85) ** 2 + (y / (0.62 + 0.05 * np.sin(3 * position))) ** 2 <= 1
    image = np.full((SIZE, SIZE), -1000.0)
    image[body] = 40.0
    ring = ((x / 0.8) ** 2 + (y / 0.57) ** 2 <= 1) & ((x / 0.74) ** 2 + (y / 0.51) ** 2 > 1)
    image[ring & body] = 700.0
    if position < 0.6:
        for centre in (-0.35, 0.35):
            lung = ((x - centre) / 0.28) ** 2 + (y / (0.4 - 0.2 * position)) ** 2 <= 1
            image[lung] = -820.0
    return image


def ct_series(plan: StudyPlan, series_number: int, description: str, slices: int) -> Iterator[Dataset]:
    """The slices of one CT series of ``plan``: 512x512, 16 bits allocated, 12 stored."""
    series_uid = generate_uid(entropy_srcs=[plan.study_uid, str(series_number)])
    frame_uid = generate_uid(entropy_srcs=[series_uid, "frame"])
    generator = np.random.default_rng(plan.seed + series_number)
    for number in range(1, slices + 1):
        hounsfield = _phantom(number - 1, slices) + generator.normal(0, 12, (SIZE, SIZE))
        stored = np.clip(hounsfield + 1024, 0, 4095).astype("<u2")
        dataset = Dataset()
        dataset.SpecificCharacterSet = "ISO_IR 192"
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        dataset.SOPClassUID = CT_IMAGE_STORAGE
        dataset.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(number)])
        dataset.StudyDate = dataset.SeriesDate = plan.study_date
        dataset.StudyTime = "101500"
        dataset.AccessionNumber = plan.accession
        dataset.Modality = "CT"
        dataset.Manufacturer = "pydicom benchmark"
        dataset.InstitutionName = "Benchmark Hospital"
        dataset.ReferringPhysicianName = "House^Gregory"
        dataset.StudyDescription = plan.description
        dataset.SeriesDescription = description
        dataset.PatientName = plan.patient.name
        dataset.PatientID = plan.patient.patient_id
        dataset.PatientBirthDate = plan.patient.birth_date
        dataset.PatientSex = plan.patient.sex
        dataset.SliceThickness = "1.25"
        dataset.KVP = "120"
        dataset.StudyInstanceUID = plan.study_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.StudyID = "1"
        dataset.SeriesNumber = series_number
        dataset.InstanceNumber = number
        dataset.ImagePositionPatient = [-250.0, -250.0, round(-1.25 * number, 2)]
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.FrameOfReferenceUID = frame_uid
        dataset.SliceLocation = round(-1.25 * number, 2)
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.Rows = dataset.Columns = SIZE
        dataset.PixelSpacing = [0.9765625, 0.9765625]
        dataset.BitsAllocated = 16
        dataset.BitsStored = 12
        dataset.HighBit = 11
        dataset.PixelRepresentation = 0
        dataset.WindowCenter = "40"
        dataset.WindowWidth = "400"
        dataset.RescaleIntercept = "-1024"
        dataset.RescaleSlope = "1"
        dataset.PixelData = stored.tobytes()
        _file_meta(dataset)
        yield dataset


def study_plan(seed: int, description: str, series: tuple[tuple[str, int], ...]) -> StudyPlan:
    """A large study's plan; the same seed gives the same UIDs and pixels."""
    chance = random.Random(seed)
    patient = Patient(
        f"{chance.choice(FAMILY_NAMES)}^{chance.choice(GIVEN_NAMES)}",
        f"CT-{seed:06d}",
        f"19{chance.randint(30, 99)}0{chance.randint(1, 9)}1{chance.randint(0, 9)}",
        chance.choice("MF"),
    )
    study_uid = generate_uid(entropy_srcs=["pacs-bench", str(seed)])
    # Last week: patients' links to the study work for token_days from its date.
    study_date = (dt.date.today() - dt.timedelta(days=7)).strftime("%Y%m%d")
    return StudyPlan(patient, study_uid, f"BCT{seed:06d}", description, series, seed, study_date)


def write_study(plan: StudyPlan, folder: Path) -> list[Path]:
    """Write every slice of ``plan`` into ``folder`` (once: existing files are kept); their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for series_number, (description, slices) in enumerate(plan.series, 1):
        expected = [folder / f"s{series_number:02d}-{number:04d}.dcm" for number in range(1, slices + 1)]
        if not all(path.exists() for path in expected):
            for path, dataset in zip(
                expected, ct_series(plan, series_number, description, slices), strict=True
            ):
                path.write_bytes(encode(dataset))
        paths += expected
    return paths


def zip_files(paths: list[Path], target: Path) -> Path:
    """A deflated zip of ``paths`` in a folder, as a user would make one to upload (made once)."""
    if not target.exists():
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
            for path in paths:
                archive.write(path, f"CT/{path.name}")
        partial.replace(target)
    return target


@dataclass(frozen=True)
class SmallStudy:
    """One study of the search material: what identifies it, for building queries."""

    index: int
    patient_id: str
    accession: str
    study_date: str


def small_study(index: int, *, group: str, first_day: dt.date, days: int) -> tuple[SmallStudy, Dataset]:
    """A one-instance study (8x8 pixels) of its own patient, dated within ``days`` from ``first_day``.

    ``group`` prefixes the patient ID and the accession number, so that one wildcard finds the
    whole group: ``PAGE-*`` is the results page of 1,000 studies, ``GROW-*`` the filler that makes
    the archive grow.
    """
    chance = random.Random(f"{group}{index}")
    study_uid = generate_uid(entropy_srcs=["pacs-bench", group, str(index)])
    day = first_day + dt.timedelta(days=chance.randrange(days))
    facts = SmallStudy(index, f"{group}-{index:06d}", f"{group[:2]}{index:08d}", day.strftime("%Y%m%d"))
    modality = chance.choice(SMALL_MODALITIES)
    dataset = Dataset()
    dataset.SpecificCharacterSet = "ISO_IR 192"
    dataset.SOPClassUID = SOP_CLASSES.get(modality, SECONDARY_CAPTURE)
    dataset.SOPInstanceUID = generate_uid(entropy_srcs=[study_uid, "instance"])
    dataset.StudyDate = facts.study_date
    dataset.StudyTime = f"{chance.randrange(7, 20):02d}{chance.randrange(60):02d}00"
    dataset.AccessionNumber = facts.accession
    dataset.Modality = modality
    dataset.InstitutionName = chance.choice(("Benchmark Hospital", "North Clinic", "Harbour Imaging"))
    dataset.ReferringPhysicianName = f"{chance.choice(FAMILY_NAMES)}^{chance.choice(GIVEN_NAMES)}"
    dataset.StudyDescription = chance.choice(("Chest", "Head", "Abdomen", "Knee", "Spine", "Pelvis"))
    dataset.PatientName = f"{chance.choice(FAMILY_NAMES)}^{chance.choice(GIVEN_NAMES)}"
    dataset.PatientID = facts.patient_id
    dataset.PatientBirthDate = f"19{chance.randint(30, 99)}0{chance.randint(1, 9)}1{chance.randint(0, 9)}"
    dataset.PatientSex = chance.choice("MF")
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = generate_uid(entropy_srcs=[study_uid, "series"])
    dataset.StudyID = "1"
    dataset.SeriesNumber = 1
    dataset.InstanceNumber = 1
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.Rows = dataset.Columns = 8
    dataset.BitsAllocated = dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    dataset.PixelData = bytes(range(128))
    _file_meta(dataset)
    return facts, dataset


def post_files(
    orthanc: requests.Session,
    url: str,
    bodies: Iterable[bytes | Path],
    *,
    threads: int = 4,
    deadline: float | None = None,
) -> int:
    """``POST /instances`` each body (bytes, or a file read when its turn comes) with a thread pool.

    Returns how many were stored; any refusal raises. The pool keeps at most ``4 * threads``
    files in memory.
    """

    def store(body: bytes | Path) -> None:
        data = body.read_bytes() if isinstance(body, Path) else body
        answer = orthanc.post(
            f"{url}/instances", data=data, headers={"Content-Type": "application/dicom"}, timeout=120
        )
        answer.raise_for_status()

    stored = 0
    with ThreadPoolExecutor(threads) as pool:
        pending = []
        for body in bodies:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("loading took longer than allowed")
            pending.append(pool.submit(store, body))
            if len(pending) >= 4 * threads:
                pending.pop(0).result()
                stored += 1
        for future in pending:
            future.result()
            stored += 1
    return stored


def md5_of_files(paths: Iterable[Path]) -> dict[str, str]:
    """SOP Instance UID to the MD5 of its file: what Orthanc must hold after an upload."""
    digests = {}
    for path in paths:
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        digests[str(dataset.SOPInstanceUID)] = hashlib.md5(path.read_bytes()).hexdigest()  # noqa: S324
    return digests
