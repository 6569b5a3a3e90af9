"""The catalog's tables, as migration 0004 made them, declared in the store's metadata.

They live beside the catalog's code rather than in ``control.db`` because nothing else reads them;
``control.db`` still owns the engine and the migrations.
"""

from __future__ import annotations

import sqlalchemy as sa

from control.db import metadata


def _key_text() -> sa.types.TypeEngine:
    # Keys sort bytewise on both back-ends (see the migration).
    return sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def _orthanc_id() -> sa.types.TypeEngine:
    return sa.String(44).with_variant(sa.String(44, collation="C"), "postgresql")


studies = sa.Table(
    "catalog_studies",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("study_id", _orthanc_id(), nullable=False, unique=True),
    sa.Column("patient_key", _orthanc_id(), nullable=False),
    sa.Column("study_uid", sa.Text, nullable=False),
    sa.Column("patient_name", sa.Text, nullable=False),
    sa.Column("name_key", _key_text(), nullable=False),
    sa.Column("patient_id", sa.Text, nullable=False),
    sa.Column("patient_id_key", _key_text(), nullable=False),
    sa.Column("patient_sex", sa.Text, nullable=False),
    sa.Column("sex_key", _key_text(), nullable=False),
    sa.Column("birth_date", _key_text(), nullable=False),
    sa.Column("study_date", _key_text(), nullable=False),
    sa.Column("study_time", _key_text(), nullable=False),
    sa.Column("study_code", _key_text(), nullable=False),
    sa.Column("accession", sa.Text, nullable=False),
    sa.Column("accession_key", _key_text(), nullable=False),
    sa.Column("institution", sa.Text, nullable=False),
    sa.Column("institution_key", _key_text(), nullable=False),
    sa.Column("referring", sa.Text, nullable=False),
    sa.Column("referring_key", _key_text(), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("description_key", _key_text(), nullable=False),
    sa.Column("modalities", _key_text(), nullable=False),
    sa.Column("series_count", sa.Integer, nullable=False),
    sa.Column("instance_count", sa.Integer, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("last_update", sa.String(20), nullable=False),
    # The sweep that last found the study in the archive (see control.catalog.feeder).
    sa.Column("swept", sa.Integer, nullable=False, server_default="0"),
)

modalities = sa.Table(
    "catalog_modalities",
    metadata,
    sa.Column("modality", _key_text(), primary_key=True),
    sa.Column(
        "study_row", sa.Integer, sa.ForeignKey("catalog_studies.id", ondelete="CASCADE"), primary_key=True
    ),
)

# One row (id 1): how far the catalog has followed the archive's change log, and who feeds it.
state = sa.Table(
    "catalog_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # empty (never built), building, ready, sweeping (looking for studies deleted from the archive)
    sa.Column("status", sa.String(16), nullable=False),
    # Moves whenever a build or sweep starts or ends: a feeder's batch read before commits only if
    # the generation and the sequence number it started from are still those in this row.
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("applied_seq", sa.BigInteger, nullable=False),
    sa.Column("applied_changes", sa.BigInteger, nullable=False),
    sa.Column("studies", sa.Integer, nullable=False),
    sa.Column("patients", sa.Integer, nullable=False),
    sa.Column("feeder", sa.String(200), nullable=False),
    sa.Column("heartbeat_at", sa.DateTime),
    sa.Column("caught_up_at", sa.DateTime),
    sa.Column("build_requested_at", sa.DateTime),
    sa.Column("build_done", sa.Integer, nullable=False),
    sa.Column("build_total", sa.Integer, nullable=False),
    sa.Column("built_at", sa.DateTime),
    sa.Column("message", sa.Text, nullable=False),
)

# Scratch space of a sweep: the archive's study ids, to compare with the catalog's in the database
# rather than in memory (a million ids would take about 100 MB in a Python set).
sweep = sa.Table("catalog_sweep", metadata, sa.Column("study_id", _orthanc_id(), primary_key=True))
