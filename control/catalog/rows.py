"""A study's catalog row, read from the archive, and the row given back in the shape pages use.

A row is read whole from what Orthanc answers now (never patched from a change's details), so that
reading it again is harmless and a rebuild gives the very rows the feeder wrote: the study (its
tags and the patient's tags as stored with it), its series (modalities, instance counts) and its
instances' sizes (the size of its DICOM files, what ``/studies/{id}/statistics`` calls
``DicomUncompressedSize``).

Rows are read many studies at a time with ``POST /tools/bulk-content`` (Orthanc 1.9.4 and
later), which describes a list of resources at the level asked: the studies of a list of
studies, series or instances (each study once, ids the archive no longer holds left out), the
series of a list of studies, or their instances. Three such reads make the rows of a page of
the change log: three GETs for each of 300 one-instance studies took 3.2 s here, the three bulk
reads 0.3 s, and the feeder, waiting on an Orthanc busy storing, fell behind the stores with the
GETs (README: the catalog's figures). The instances of a large study are not listed: one
``/statistics`` costs less than their descriptions.

On Orthanc's PostgreSQL index each described resource costs several round trips to the
database: the three reads of 125 one-instance studies took 2.4 s (0.6, 0.4 and 1.3 s) on a
two-node site, so the feeder applied no more than about 60 studies a second even with the archive
idle. A read's resources are therefore asked in parts of ``BULK_RESOURCES`` at once, up to
``PARALLEL_READS`` together: one node answers parallel parts faster (4 parts of 32 studies:
0.42 s, against 0.63 s for one read of 125), and several readers share them (reads take turns,
``control.nodes``; the feeder leaves the writer out, so on two nodes its parts all go to the
other one: 0.28 s when they went to both).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from control.catalog.names import fold
from control.orthanc import ArchiveClient, OrthancError

BULK = "/tools/bulk-content"
BULK_RESOURCES = 32  # resources named in one bulk read
PARALLEL_READS = 4  # bulk reads of one description sent at once
BULK_INSTANCES = 5000  # instances described in one answer at most (about 0.7 kB each)
LARGE_STUDY = 1000  # instances beyond which a study's size is read from its statistics


@dataclass(frozen=True)
class StudyRow:
    """The catalog's columns of one study (see ``control.catalog.tables.studies``)."""

    values: dict[str, Any]
    modalities: tuple[str, ...]

    @property
    def study_id(self) -> str:
        return self.values["study_id"]


def row_from(study: dict[str, Any], series: list[dict[str, Any]], size: int) -> StudyRow:
    """The row of a study from Orthanc's answers for it and its series, and the size of its files."""
    tags = study.get("MainDicomTags", {})
    patient = study.get("PatientMainDicomTags", {})
    held = sorted({item["MainDicomTags"].get("Modality") or "" for item in series} - {""})
    name = patient.get("PatientName") or ""
    values = {
        "study_id": study["ID"],
        "patient_key": study.get("ParentPatient", ""),
        "study_uid": tags.get("StudyInstanceUID") or "",
        "patient_name": name,
        "name_key": fold(name),
        "patient_id": patient.get("PatientID") or "",
        "patient_id_key": fold(patient.get("PatientID")),
        "patient_sex": patient.get("PatientSex") or "",
        "sex_key": fold(patient.get("PatientSex")),
        "birth_date": patient.get("PatientBirthDate") or "",
        "study_date": tags.get("StudyDate") or "",
        "study_time": tags.get("StudyTime") or "",
        "study_code": tags.get("StudyID") or "",
        "accession": tags.get("AccessionNumber") or "",
        "accession_key": fold(tags.get("AccessionNumber")),
        "institution": tags.get("InstitutionName") or "",
        "institution_key": fold(tags.get("InstitutionName")),
        "referring": tags.get("ReferringPhysicianName") or "",
        "referring_key": fold(tags.get("ReferringPhysicianName")),
        "description": tags.get("StudyDescription") or "",
        "description_key": fold(tags.get("StudyDescription")),
        "modalities": "\\".join(held),
        "series_count": len(series),
        "instance_count": sum(len(item.get("Instances", ())) for item in series),
        "size": size,
        "last_update": study.get("LastUpdate") or "",
    }
    return StudyRow(values, tuple(sorted({fold(modality) for modality in held})))


def describe(orthanc: ArchiveClient, resources: Iterable[str], level: str) -> list[dict[str, Any]]:
    """Orthanc's descriptions at ``level`` of what ``resources`` (ids of any level) name or hold."""
    parts = list(_parts(list(dict.fromkeys(resources)), BULK_RESOURCES))

    def read(part: list[str]) -> list[dict[str, Any]]:
        return orthanc.post_json(BULK, {"Resources": part, "Level": level})

    if len(parts) <= 1:
        return [item for part in parts for item in read(part)]
    with ThreadPoolExecutor(min(PARALLEL_READS, len(parts)), thread_name_prefix="catalog-read") as pool:
        return [item for answer in pool.map(read, parts) for item in answer]


def read_studies(orthanc: ArchiveClient, resources: Iterable[str]) -> dict[str, StudyRow | None]:
    """The rows of the studies that these studies, series or instances belong to, as the archive
    holds them now. A study the archive no longer holds is not in the answer (None: it went while
    it was read)."""
    return rows_of(orthanc, describe(orthanc, resources, "Study"))


def read_study(orthanc: ArchiveClient, study_id: str) -> StudyRow | None:
    """The row of a study as the archive holds it now; None when the archive no longer has it."""
    return read_studies(orthanc, [study_id]).get(study_id)


def rows_of(orthanc: ArchiveClient, studies: list[dict[str, Any]]) -> dict[str, StudyRow | None]:
    """The rows of studies from Orthanc's answers for them (a page of ``/studies?expand``, or a
    bulk read): their series and sizes read now. None for a study gone meanwhile (a study
    without series is one Orthanc has just deleted)."""
    series: dict[str, list[dict[str, Any]]] = {study["ID"]: [] for study in studies}
    for item in describe(orthanc, series, "Series"):
        series[item["ParentStudy"]].append(item)
    sizes = _sizes(orthanc, {study_id: held for study_id, held in series.items() if held})
    return {
        study["ID"]: row_from(study, series[study["ID"]], sizes[study["ID"]])
        if study["ID"] in sizes
        else None
        for study in studies
    }


def _sizes(orthanc: ArchiveClient, series: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """The size of each study's DICOM files (those of the instances its series list), by study;
    a study gone meanwhile is left out."""
    sizes: dict[str, int] = {}
    study_of = {
        instance: study_id
        for study_id, held in series.items()
        for item in held
        for instance in item["Instances"]
    }
    counts = {study_id: sum(len(item["Instances"]) for item in held) for study_id, held in series.items()}
    small = [study_id for study_id, count in counts.items() if count <= LARGE_STUDY]
    for study_id in counts.keys() - set(small):
        try:
            statistics = orthanc.get_json(f"/studies/{study_id}/statistics")
        except OrthancError as error:
            if error.status != 404:
                raise
            continue
        sizes[study_id] = int(
            statistics.get("DicomUncompressedSize") or statistics.get("UncompressedSize") or 0
        )
    for part in _instance_parts(small, counts):
        for instance in describe(orthanc, part, "Instance"):
            # An instance stored after its series was read is counted when its change is applied;
            # a study none of whose instances is left has gone.
            holder = study_of.get(instance["ID"])
            if holder:
                sizes[holder] = sizes.get(holder, 0) + int(instance.get("FileSize") or 0)
    return sizes


def _instance_parts(study_ids: list[str], counts: dict[str, int]) -> Iterator[list[str]]:
    """``study_ids`` in groups of at most ``BULK_INSTANCES`` instances together."""
    part: list[str] = []
    held = 0
    for study_id in study_ids:
        if part and held + counts[study_id] > BULK_INSTANCES:
            yield part
            part, held = [], 0
        part.append(study_id)
        held += counts[study_id]
    if part:
        yield part


def _parts(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def as_orthanc_study(row: Any) -> dict[str, Any]:
    """A catalog row in the shape of Orthanc's study answers, which the pages' rows are made from,
    with the counts and size that only the catalog knows."""
    return {
        "ID": row.study_id,
        "ParentPatient": row.patient_key,
        "MainDicomTags": {
            "StudyInstanceUID": row.study_uid,
            "StudyID": row.study_code,
            "StudyDate": row.study_date,
            "StudyTime": row.study_time,
            "StudyDescription": row.description,
            "AccessionNumber": row.accession,
            "InstitutionName": row.institution,
            "ReferringPhysicianName": row.referring,
        },
        "PatientMainDicomTags": {
            "PatientID": row.patient_id,
            "PatientName": row.patient_name,
            "PatientSex": row.patient_sex,
            "PatientBirthDate": row.birth_date,
        },
        "SeriesCount": row.series_count,
        "InstancesCount": row.instance_count,
        "Size": row.size,
    }
