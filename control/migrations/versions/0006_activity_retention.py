"""The activity log for years of service: indexes for the admin's lists at millions of rows, and the
daily lease of its retention clean-up.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    # Each list of the admin's pages is one set of equality conditions (web users' activity: no
    # token and outcome ok), each filter one more, and every list is read newest first. An index
    # whose columns are the filter, then the list's conditions, then the time hands a page over in
    # order; without the filter column in front, SQLite walks the list's index in time order and
    # tests every row (seconds at millions of rows for a filter that matches little).
    op.create_index("ix_activity_list_at", "activity", ["token_id", "outcome", "at"])
    op.create_index(
        "ix_activity_username_list_at", "activity", [sa.text("lower(username)"), "token_id", "outcome", "at"]
    )
    op.create_index("ix_activity_action_list_at", "activity", ["action", "token_id", "outcome", "at"])
    op.drop_index("ix_activity_client_address_at", "activity")
    op.create_index(
        "ix_activity_client_address_list_at", "activity", ["client_address", "token_id", "outcome", "at"]
    )
    # Refused or failed connections, grouped by client address: a partial index of those rows
    # alone, in address order, with all the grouping needs.
    op.create_index(
        "ix_activity_refused",
        "activity",
        ["client_address", "at", "username", "action"],
        sqlite_where=sa.text("outcome != 'ok'"),
        postgresql_where=sa.text("outcome != 'ok'"),
    )
    op.bulk_insert(
        sa.table("revisions", sa.column("name", sa.String), sa.column("value", sa.Integer)),
        [{"name": "activity-retention", "value": 0}],
    )
