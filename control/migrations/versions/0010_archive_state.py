"""The archive's shared state: where its index is, how far the watcher read, the orphan sweep's lease.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"


def upgrade() -> None:
    op.create_table(
        "archive_state",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    # The watcher's row exists from the start: each round locks it (control.watch).
    op.bulk_insert(
        sa.table("archive_state", sa.column("name", sa.String), sa.column("value", sa.Text)),
        [{"name": "watch", "value": "{}"}],
    )
    op.bulk_insert(
        sa.table("revisions", sa.column("name", sa.String), sa.column("value", sa.Integer)),
        [{"name": "orphan-sweep", "value": 0}],
    )
