"""Study Instance UIDs that two patients' studies share.

A Study Instance UID should name one study in the world, but modalities get it wrong (a study
sent again under a corrected patient ID, a UID generator that repeats). Orthanc names a study by
its patient ID and UID together, so it keeps two studies; everything that names a study by its
UID alone (DICOMweb, the viewer, a study link) can no longer tell them apart. The portal
therefore makes no link for such a UID, answers DICOMweb requests about it with 409 and, for an
existing link, shows the patient that the study is held; the admin is told (activity and the
study links page) as soon as the second study arrives (``control.watch`` follows Orthanc's
changes) or whenever one of those refusals finds it.

``holders`` asks Orthanc each time (``/tools/lookup``, an indexed look-up that costs Orthanc about
what ``/system`` does): a study that arrives or goes counts at once. ``flag`` keeps the UID in
``shared_study_uids`` for the admin's page, which checks each one again against the archive when
it is shown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import sqlalchemy as sa

from control import db
from control.activity import Outcome, record_activity
from control.events import StudyUidSharedEvent
from control.orthanc import ArchiveClient, OrthancError, OrthancUnavailable


@dataclass(frozen=True)
class HeldStudy:
    """One of the archive's studies under a shared UID, as the admin sees it."""

    orthanc_id: str
    patient_name: str
    patient_id: str
    study_date: str
    description: str


def holders(orthanc: ArchiveClient, study_uid: str) -> list[str]:
    """The archive's ids of the studies whose Study Instance UID is ``study_uid`` (usually one)."""
    return [item["ID"] for item in orthanc.lookup(study_uid) if item.get("Type") == "Study"]


def describe(orthanc: ArchiveClient, orthanc_ids: list[str]) -> list[HeldStudy]:
    studies = []
    for orthanc_id in orthanc_ids:
        try:
            study = orthanc.get_json(f"/studies/{orthanc_id}")
        except OrthancError:
            continue  # deleted meanwhile
        except OrthancUnavailable:
            study = {}  # the admin still learns of the UID, and its studies' ids
        tags, patient = study.get("MainDicomTags", {}), study.get("PatientMainDicomTags", {})
        studies.append(
            HeldStudy(
                orthanc_id,
                patient.get("PatientName", ""),
                patient.get("PatientID", ""),
                tags.get("StudyDate", ""),
                tags.get("StudyDescription", ""),
            )
        )
    return studies


def flag(
    connection: sa.Connection, orthanc: ArchiveClient, study_uid: str, held: list[str], found_by: str
) -> bool:
    """Tell the admin that ``study_uid`` is held by the studies ``held``, once; True when it was new."""
    known = connection.execute(
        sa.select(db.shared_study_uids.c.study_uid).where(db.shared_study_uids.c.study_uid == study_uid)
    ).first()
    if known is not None:
        return False
    studies = describe(orthanc, held)
    connection.execute(
        db.shared_study_uids.insert().values(
            study_uid=study_uid,
            flagged_at=db.utcnow(),
            studies=json.dumps([study.__dict__ for study in studies], ensure_ascii=False),
        )
    )
    record_activity(
        StudyUidSharedEvent(studies=len(held), found_by=found_by),
        Outcome.FAILED,
        connection=connection,
        study=study_uid,
        patient=" / ".join(f"{study.patient_name} ({study.patient_id})" for study in studies)[:200],
    )
    return True


def flagged(connection: sa.Connection, orthanc: ArchiveClient) -> list[tuple[str, list[HeldStudy]]]:
    """The flagged UIDs still shared in the archive, with their studies; resolved ones are dropped
    (the activity log keeps their history)."""
    found = []
    rows = connection.execute(
        sa.select(db.shared_study_uids).order_by(db.shared_study_uids.c.flagged_at.desc())
    ).all()
    for row in rows:
        held = holders(orthanc, row.study_uid)
        if len(held) > 1:
            found.append((row.study_uid, describe(orthanc, held)))
        else:
            connection.execute(
                db.shared_study_uids.delete().where(db.shared_study_uids.c.study_uid == row.study_uid)
            )
    return found
