"""Study tokens: patients' links to one study each.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "study_tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("public_id", sa.String(16), nullable=False, unique=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("orthanc_study_id", sa.String(64), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("lookup_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("patient_name", sa.String(200), nullable=False, server_default=""),
        sa.Column("patient_id", sa.String(100), nullable=False, server_default=""),
        sa.Column("patient_birth_date", sa.String(8), nullable=False, server_default=""),
        sa.Column("study_date", sa.Date, nullable=False),
        sa.Column("issued_at", sa.DateTime, nullable=False),
        sa.Column("extended_until", sa.Date),
        sa.Column("revoked_at", sa.DateTime),
        sa.Column("uses", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_used_at", sa.DateTime),
        sa.Column("last_used_from", sa.String(64), nullable=False, server_default=""),
        sa.Column("identity_failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("identity_locked_until", sa.DateTime),
        sa.UniqueConstraint("study_uid", "generation", name="uq_study_tokens_study_generation"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_study_tokens_patient_id", "study_tokens", ["patient_id"])
