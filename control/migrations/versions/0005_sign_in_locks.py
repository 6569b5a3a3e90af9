"""Sign-in failures counted by account key, password checks, escalating birth-date locks.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "sign_in_failures",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("account_key", sa.String(64), nullable=False),
        sa.Column("client_address", sa.String(64), nullable=False),
    )
    op.create_index("ix_sign_in_failures_account_key_at", "sign_in_failures", ["account_key", "at"])
    op.create_index("ix_sign_in_failures_client_address_at", "sign_in_failures", ["client_address", "at"])
    # Plain ADD COLUMNs (SQLite has them): no table is copied, so users keep AUTOINCREMENT.
    op.add_column("users", sa.Column("password_problem", sa.String(200)))
    op.add_column("study_tokens", sa.Column("identity_locks", sa.Integer, nullable=False, server_default="0"))
    op.add_column("study_tokens", sa.Column("identity_held_at", sa.DateTime))
