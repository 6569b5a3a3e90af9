"""Shared study UIDs: links are found by the archive's study, and UIDs two patients share are kept.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_index("ix_study_tokens_orthanc_study_id", "study_tokens", ["orthanc_study_id"])
    op.create_table(
        "shared_study_uids",
        sa.Column("study_uid", sa.String(64), primary_key=True),
        sa.Column("flagged_at", sa.DateTime, nullable=False),
        sa.Column("studies", sa.Text, nullable=False, server_default="[]"),
    )
