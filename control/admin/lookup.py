"""What the activity filters' patient and study stand for, looked up in the study catalog.

An admin asks "who opened patient X's study?" by the patient's name or ID and a study by its UID
or accession number, as the query page takes them. The activity log keeps each event's patient ID
and Study Instance UID (indexed, migration 0009); the catalog turns what was typed into those:
a patient's name matches as on the query page (anywhere in the name, "Family Given" for
``Family^Given``, accents and capitals optional), an ID or an accession number as a whole.
"""

from __future__ import annotations

import sqlalchemy as sa

from control.catalog import tables
from control.catalog.search import Catalog
from control.query.criteria import name_pattern
from control.query.finder import Search

# Most patients or studies one filter stands for; a name that matches more is too vague to be
# the question "who opened patient X's study?", and the list says to type more of it.
MOST_MATCHES = 200

c = tables.studies.c


def patient(connection: sa.Connection, typed: str) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """The patient IDs and Study Instance UIDs of the patients named ``typed`` (name or ID), and
    whether there were more than ``MOST_MATCHES`` studies (only the first are kept)."""
    text = typed.strip()
    if not text or "\\" in text:
        return (), (), False
    catalog = Catalog(connection)
    by_name = catalog.conditions(Search(patient_query={"PatientName": name_pattern(text)}), walking=False)
    by_id = catalog.conditions(Search(patient_query={"PatientID": text}), walking=False)
    rows = connection.execute(
        sa.select(c.patient_id, c.study_uid)
        .where(sa.or_(sa.and_(*by_name), sa.and_(*by_id)))
        .limit(MOST_MATCHES + 1)
    ).all()
    kept = rows[:MOST_MATCHES]
    return (
        tuple(sorted({row.patient_id for row in kept if row.patient_id})),
        tuple(sorted({row.study_uid for row in kept})),
        len(rows) > MOST_MATCHES,
    )


def study(connection: sa.Connection, typed: str) -> tuple[str, ...]:
    """The Study Instance UIDs of the studies whose accession number is ``typed`` (a UID is
    matched as it is by the filter itself)."""
    text = typed.strip()
    if not text or "\\" in text:
        return ()
    by_accession = Catalog(connection).conditions(
        Search(study_query={"AccessionNumber": text}), walking=False
    )
    rows = connection.execute(sa.select(c.study_uid).where(*by_accession).limit(MOST_MATCHES)).all()
    return tuple(sorted({row.study_uid for row in rows}))
