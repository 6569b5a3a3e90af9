"""The activity log by patient and by study: who opened patient X's study, in one step.

Revision ID: 0009
Revises: 0008

Events name their patient by the patient ID (a new column, empty in rows written before it) and
their study by its Study Instance UID (the ``study`` column). The admin's filters turn a patient's
name or ID, or a study's accession number, into those values (through the study catalog) and ask
for rows with one of them: each index, like migration 0006's, leads with the filter's column, then
the list's conditions, then the time, so a filter that matches little reads little whatever the
size of the log.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    # A plain ADD COLUMN with a constant default: both back-ends add it without rewriting the rows.
    op.add_column("activity", sa.Column("patient_id", sa.String(64), nullable=False, server_default=""))
    op.create_index("ix_activity_patient_id_list_at", "activity", ["patient_id", "token_id", "outcome", "at"])
    op.create_index("ix_activity_study_list_at", "activity", ["study", "token_id", "outcome", "at"])
