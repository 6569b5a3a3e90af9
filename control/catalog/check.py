"""``./pacs catalog check``: what differs between the catalog and the archive.

Three kinds of difference: a study the archive holds that the catalog lacks, a row for a study the
archive no longer holds, and (unless ``quick``) a row whose columns differ from what the archive
answers for that study now. The archive's study ids are compared with the catalog's in the
database (a temporary table, filled a page at a time), so that a large archive's million ids are
never held in memory; rows are compared by reading each study as the feeder would. Nothing is
changed: a sweep or a rebuild does that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite

from control.catalog import store, tables
from control.catalog.rows import read_studies
from control.orthanc import ArchiveClient

PAGE = 10_000
SHOWN = 50  # differences listed of each kind; all are counted


@dataclass
class Findings:
    """What a check found."""

    archive_studies: int = 0
    catalog_studies: int = 0
    missing: list[str] = field(default_factory=list)  # study ids the catalog lacks
    extra: list[str] = field(default_factory=list)  # study ids the archive no longer holds
    differing: list[tuple[str, list[str]]] = field(default_factory=list)  # study id, columns
    missing_count: int = 0
    extra_count: int = 0
    differing_count: int = 0
    compared_rows: int = 0
    moved_meanwhile: bool = False

    @property
    def clean(self) -> bool:
        return not (self.missing_count or self.extra_count or self.differing_count)


def check(
    engine: sa.Engine,
    orthanc: ArchiveClient,
    *,
    quick: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Findings:
    """Compare the catalog with the archive (see the module)."""
    findings = Findings()
    listed = sa.Table(
        "catalog_check_ids",
        sa.MetaData(),
        sa.Column("study_id", sa.String(44), primary_key=True),
        prefixes=["TEMPORARY"],
    )
    with engine.connect() as connection:
        before = store.read_state(connection)
        listed.drop(connection, checkfirst=True)
        listed.create(connection)
        try:
            since = 0
            while True:
                page = orthanc.get_json("/studies", params={"since": str(since), "limit": str(PAGE)})
                if page:
                    connection.execute(_insert_ignoring(connection, listed), [{"study_id": i} for i in page])
                if len(page) < PAGE:
                    break
                since += PAGE
            studies = tables.studies.c
            findings.archive_studies = connection.execute(
                sa.select(sa.func.count()).select_from(listed)
            ).scalar_one()
            findings.catalog_studies = store.counts(connection)["studies"]
            missing = sa.select(listed.c.study_id).where(
                ~sa.exists().where(studies.study_id == listed.c.study_id)
            )
            extra = sa.select(studies.study_id).where(
                ~sa.exists().where(listed.c.study_id == studies.study_id)
            )
            findings.missing_count, findings.missing = _counted(connection, missing)
            findings.extra_count, findings.extra = _counted(connection, extra)
            if not quick:
                _compare_rows(connection, orthanc, findings, progress)
        finally:
            listed.drop(connection, checkfirst=True)
            connection.commit()
        after = store.read_state(connection)
    findings.moved_meanwhile = (after.generation, after.applied_seq) != (
        before.generation,
        before.applied_seq,
    )
    return findings


def _insert_ignoring(connection: sa.Connection, table: sa.Table) -> sa.Insert:
    dialect = sa.dialects.postgresql if connection.dialect.name == "postgresql" else sa.dialects.sqlite
    return dialect.insert(table).on_conflict_do_nothing()


def _counted(connection: sa.Connection, query: sa.Select) -> tuple[int, list[str]]:
    count = connection.execute(sa.select(sa.func.count()).select_from(query.subquery())).scalar_one()
    return count, list(connection.execute(query.order_by(query.selected_columns[0]).limit(SHOWN)).scalars())


def _compare_rows(
    connection: sa.Connection,
    orthanc: ArchiveClient,
    findings: Findings,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Read every study the catalog holds from the archive and compare the columns."""
    studies = tables.studies
    columns = [column for column in studies.c if column.name not in ("id", "swept")]
    held = tables.modalities.c
    last_id = 0
    total = findings.catalog_studies
    while True:
        rows = connection.execute(
            sa.select(studies.c.id, *columns).where(studies.c.id > last_id).order_by(studies.c.id).limit(200)
        ).all()
        if not rows:
            return
        last_id = rows[-1].id
        stored_modalities: dict[int, set[str]] = {}
        for study_row, modality in connection.execute(
            sa.select(held.study_row, held.modality).where(held.study_row.in_([row.id for row in rows]))
        ):
            stored_modalities.setdefault(study_row, set()).add(modality)
        read = read_studies(orthanc, [row.study_id for row in rows])
        for row in rows:
            fresh = read.get(row.study_id)
            findings.compared_rows += 1
            if fresh is None:
                continue  # gone from the archive: counted as extra above, or deleted meanwhile
            differing = [
                column.name for column in columns if getattr(row, column.name) != fresh.values[column.name]
            ]
            if set(fresh.modalities) != stored_modalities.get(row.id, set()):
                differing.append("modalities (searched)")
            if differing:
                findings.differing_count += 1
                if len(findings.differing) < SHOWN:
                    findings.differing.append((row.study_id, differing))
        if progress:
            progress(findings.compared_rows, total)
