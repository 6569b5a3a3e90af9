"""The study catalog found by Study Instance UID: the viewer's first DICOMweb question.

Revision ID: 0010
Revises: 0009

A viewer opening a study asks ``/dicom-web/studies?StudyInstanceUID=...``, which the catalog
answers for signed-in users (``control.catalog.qido``): without an index that would read every row.
"""

from alembic import op

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    op.create_index("ix_catalog_studies_study_uid", "catalog_studies", ["study_uid"])
