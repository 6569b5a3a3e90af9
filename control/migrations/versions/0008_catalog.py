"""The study catalog: one row per study of the archive, its modalities, and the feeder's state.

Revision ID: 0008
Revises: 0007

Text that is matched or sorted is kept twice: as stored (shown) and in its matching form (the
``_key`` columns, see ``control.catalog.names``). Keys sort bytewise on both back-ends (PostgreSQL's
"C" collation, SQLite's default), so both list in the same order and PostgreSQL's b-trees serve
prefix matches. Names, IDs, institutions and referring physicians match anywhere in the value:
PostgreSQL indexes them with trigrams (``pg_trgm``), SQLite with an FTS5 trigram table kept by
triggers.
"""

import logging

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"

# Each column a list may be sorted by leads an index that ends with the default order's columns,
# so that a page in any order, at any depth, is a short walk of one index.
SORTED_BY = {
    "date": [],
    "name": ["name_key"],
    "patient_id": ["patient_id_key"],
    "sex": ["sex_key"],
    "birth_date": ["birth_date"],
    "study_code": ["study_code"],
    "accession": ["accession_key"],
    "description": ["description_key"],
    "modalities": ["modalities"],
    "series": ["series_count"],
    "instances": ["instance_count"],
    "size": ["size"],
}
TRIGRAM_KEYS = ("name_key", "patient_id_key", "institution_key", "referring_key")


def key_text() -> sa.types.TypeEngine:
    return sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "catalog_studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "study_id",
            sa.String(44).with_variant(sa.String(44, collation="C"), "postgresql"),
            nullable=False,
            unique=True,
        ),
        sa.Column(
            "patient_key",
            sa.String(44).with_variant(sa.String(44, collation="C"), "postgresql"),
            nullable=False,
        ),
        sa.Column("study_uid", sa.Text, nullable=False),
        sa.Column("patient_name", sa.Text, nullable=False),
        sa.Column("name_key", key_text(), nullable=False),
        sa.Column("patient_id", sa.Text, nullable=False),
        sa.Column("patient_id_key", key_text(), nullable=False),
        sa.Column("patient_sex", sa.Text, nullable=False),
        sa.Column("sex_key", key_text(), nullable=False),
        sa.Column("birth_date", key_text(), nullable=False),
        sa.Column("study_date", key_text(), nullable=False),
        sa.Column("study_time", key_text(), nullable=False),
        sa.Column("study_code", key_text(), nullable=False),
        sa.Column("accession", sa.Text, nullable=False),
        sa.Column("accession_key", key_text(), nullable=False),
        sa.Column("institution", sa.Text, nullable=False),
        sa.Column("institution_key", key_text(), nullable=False),
        sa.Column("referring", sa.Text, nullable=False),
        sa.Column("referring_key", key_text(), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("description_key", key_text(), nullable=False),
        sa.Column("modalities", key_text(), nullable=False),
        sa.Column("series_count", sa.Integer, nullable=False),
        sa.Column("instance_count", sa.Integer, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("last_update", sa.String(20), nullable=False),
        sa.Column("swept", sa.Integer, nullable=False, server_default="0"),
    )
    for name, leading in SORTED_BY.items():
        op.create_index(
            f"ix_catalog_studies_{name}",
            "catalog_studies",
            [*leading, "study_date", "study_time", "study_id"],
        )
    op.create_index(
        "ix_catalog_studies_patient",
        "catalog_studies",
        ["patient_key", "study_date", "study_time", "study_id"],
    )
    op.create_index("ix_catalog_studies_institution", "catalog_studies", ["institution_key"])
    op.create_index("ix_catalog_studies_referring", "catalog_studies", ["referring_key"])
    op.create_table(
        "catalog_modalities",
        sa.Column("modality", key_text(), primary_key=True),
        sa.Column(
            "study_row",
            sa.Integer,
            sa.ForeignKey("catalog_studies.id", ondelete="CASCADE"),
            primary_key=True,
        ),
    )
    op.create_index("ix_catalog_modalities_study_row", "catalog_modalities", ["study_row"])
    state = op.create_table(
        "catalog_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
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
    op.bulk_insert(
        state,
        [
            {
                "id": 1,
                "status": "empty",
                "generation": 1,
                "applied_seq": 0,
                "applied_changes": 0,
                "studies": 0,
                "patients": 0,
                "feeder": "",
                "build_done": 0,
                "build_total": 0,
                "message": "",
            }
        ],
    )
    op.create_table(
        "catalog_sweep",
        sa.Column(
            "study_id",
            sa.String(44).with_variant(sa.String(44, collation="C"), "postgresql"),
            primary_key=True,
        ),
    )
    if postgresql:
        _trigram_indexes()
    else:
        _sqlite_text_index()


def _trigram_indexes() -> None:
    """Trigram indexes for matches anywhere in a value, when the database allows the extension.

    ``pg_trgm`` is a trusted extension (PostgreSQL 13 and later): a database owner may create it.
    Where it cannot be created, searches stay correct and read the table instead.
    """
    bind = op.get_bind()
    savepoint = bind.begin_nested()
    try:
        bind.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
    except sa.exc.DBAPIError as error:
        savepoint.rollback()
        logging.getLogger("alembic").warning(
            "pg_trgm is not available (%s): name searches in the catalog read the whole table", error.orig
        )
        return
    savepoint.commit()
    for column in TRIGRAM_KEYS:
        op.execute(
            f"CREATE INDEX ix_catalog_studies_{column}_trigrams ON catalog_studies "
            f"USING gin ({column} gin_trgm_ops)"
        )


def _sqlite_text_index() -> None:
    """An FTS5 trigram index over the matched keys, kept in step with the table by triggers."""
    op.execute(
        "CREATE VIRTUAL TABLE catalog_text USING fts5("
        "name_key, patient_id_key, institution_key, referring_key, "
        "content='catalog_studies', content_rowid='id', tokenize='trigram case_sensitive 1')"
    )
    op.execute(
        "CREATE TRIGGER catalog_text_insert AFTER INSERT ON catalog_studies BEGIN "
        "INSERT INTO catalog_text(rowid, name_key, patient_id_key, institution_key, referring_key) "
        "VALUES (new.id, new.name_key, new.patient_id_key, new.institution_key, new.referring_key); END"
    )
    op.execute(
        "CREATE TRIGGER catalog_text_delete AFTER DELETE ON catalog_studies BEGIN "
        "INSERT INTO catalog_text(catalog_text, rowid, name_key, patient_id_key, institution_key, "
        "referring_key) "
        "VALUES ('delete', old.id, old.name_key, old.patient_id_key, old.institution_key, "
        "old.referring_key); END"
    )
    op.execute(
        "CREATE TRIGGER catalog_text_update "
        "AFTER UPDATE OF name_key, patient_id_key, institution_key, referring_key ON catalog_studies BEGIN "
        "INSERT INTO catalog_text(catalog_text, rowid, name_key, patient_id_key, institution_key, "
        "referring_key) "
        "VALUES ('delete', old.id, old.name_key, old.patient_id_key, old.institution_key, "
        "old.referring_key); "
        "INSERT INTO catalog_text(rowid, name_key, patient_id_key, institution_key, referring_key) "
        "VALUES (new.id, new.name_key, new.patient_id_key, new.institution_key, new.referring_key); END"
    )
