"""Viewer tokens: bearer tokens of the desktop viewer and of other DICOMweb viewers.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    op.create_table(
        "viewer_tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("public_id", sa.String(32), nullable=False, unique=True),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("study_uids", sa.Text, nullable=False),
        sa.Column("orthanc_study_ids", sa.Text, nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False, server_default=""),
        sa.Column("patient_name", sa.String(200), nullable=False, server_default=""),
        sa.Column("patient_id", sa.String(100), nullable=False, server_default=""),
        sa.Column("issued_by_user_id", sa.Integer),
        sa.Column("issued_by", sa.String(64), nullable=False, server_default=""),
        sa.Column("study_token_id", sa.Integer),
        sa.Column("note", sa.String(200), nullable=False, server_default=""),
        sa.Column("issued_at", sa.DateTime, nullable=False),
        sa.Column("issued_from", sa.String(64), nullable=False, server_default=""),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("revoked_at", sa.DateTime),
        sa.Column("revoked_by", sa.String(64), nullable=False, server_default=""),
        sa.Column("uses", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_used_at", sa.DateTime),
        sa.Column("last_used_from", sa.String(64), nullable=False, server_default=""),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_viewer_tokens_issued_at", "viewer_tokens", ["issued_at"])
    op.create_index("ix_viewer_tokens_patient_id", "viewer_tokens", ["patient_id"])
