"""Pages of studies and patients from the catalog: exact totals, any order, any depth.

The criteria are the query form's own (a ``control.query.finder.Search``, the Orthanc query the
archive would be asked), translated column by column, so that both sources match alike: patterns
with ``*`` and ``?`` against the whole value, in the matching form of ``control.catalog.names``
(which adds accent folding), a patient ID typed exactly as stored naming its patient alone,
study dates compared as text, an empty date in no range.

**Order and depth.** Every order is a tuple of columns ending with the study's date, time and id,
which an index leads with (migration 0004), so a page is a short walk of one index. The links to
the next and previous pages carry the place where the page ends (``after``) or starts
(``before``), and the next page starts there: the cost does not grow with the depth. The last page
is the first of the reversed order. A page asked for by number alone (a typed URL) is an offset,
whose cost grows with it.

**Plans.** The total is counted first (the kept count when there are no criteria); a small answer
(up to ``SELECTIVE`` studies) is then read by its criteria (a materialised CTE) and sorted, a large
one found by walking the order's index and testing each study. Planners need telling: SQLite's
trigram index finds few matches at once but many slowly, it plans ``IN`` and ``EXISTS`` as
written, and PostgreSQL walked the name index through a hundred thousand rows for a thousand
matches.

**Patients.** A patient's place is that of its first matching study in the chosen order (for the
default order, its newest matching study, as the archive's finder does), shown with the patient's
tags as stored with that study. Pages walk the studies in order and keep each patient's first
appearance; after a page's end, a patient met again is skipped if it has a matching study at or
before that end (it was listed already).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from control.catalog import tables
from control.catalog.names import fold, glob_pattern, has_wildcard, like_pattern, longest_literal
from control.catalog.store import read_state
from control.orthanc import resource_id
from control.paging import Page

if TYPE_CHECKING:
    from control.query.finder import PatientMatch, Search

SELECTIVE = 5000
WALK_CHUNK = 200

c = tables.studies.c
DEFAULT_ORDER = (c.study_date, c.study_time, c.study_id)
# Each sortable column with its direction when first chosen; the columns after it settle ties.
STUDY_SORTS: dict[str, tuple[tuple[sa.ColumnElement, ...], str]] = {
    "date": (DEFAULT_ORDER, "desc"),
    "name": ((c.name_key, *DEFAULT_ORDER), "asc"),
    "patient_id": ((c.patient_id_key, *DEFAULT_ORDER), "asc"),
    "study_id": ((c.study_code, *DEFAULT_ORDER), "asc"),
    "accession": ((c.accession_key, *DEFAULT_ORDER), "asc"),
    "description": ((c.description_key, *DEFAULT_ORDER), "asc"),
    "modalities": ((c.modalities, *DEFAULT_ORDER), "asc"),
    "series": ((c.series_count, *DEFAULT_ORDER), "desc"),
    "instances": ((c.instance_count, *DEFAULT_ORDER), "desc"),
    "size": ((c.size, *DEFAULT_ORDER), "desc"),
}
PATIENT_SORTS = {
    "date": STUDY_SORTS["date"],
    "name": STUDY_SORTS["name"],
    "patient_id": STUDY_SORTS["patient_id"],
    "sex": ((c.sex_key, *DEFAULT_ORDER), "asc"),
    "birth_date": ((c.birth_date, *DEFAULT_ORDER), "asc"),
}
# What each Orthanc criterion of a Search is matched against.
KEYS = {
    "PatientName": c.name_key,
    "PatientID": c.patient_id_key,
    "PatientSex": c.sex_key,
    "AccessionNumber": c.accession_key,
    "InstitutionName": c.institution_key,
    "ReferringPhysicianName": c.referring_key,
}
SUPPORTED = {*KEYS, "PatientBirthDate", "ModalitiesInStudy"}
TEXT_INDEX = sa.table(
    "catalog_text",
    sa.column("rowid"),
    *(sa.column(name) for name in ("name_key", "patient_id_key", "institution_key", "referring_key")),
)


@dataclass(frozen=True)
class Sorting:
    """A list's order: a column of ``STUDY_SORTS`` or ``PATIENT_SORTS`` and a direction."""

    column: str
    descending: bool

    def keys(
        self, sorts: dict[str, tuple[tuple[sa.ColumnElement, ...], str]]
    ) -> tuple[sa.ColumnElement, ...]:
        return sorts[self.column][0]


def dicom_date(day: dt.date) -> str:
    """A date as DICOM writes it (``YYYYMMDD``), as ``control.query.finder`` compares them."""
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


@dataclass(frozen=True)
class Matching:
    """A search's SQL, and whether it matches few studies (``SELECTIVE`` or fewer): those are read
    by the criteria first and then sorted; many are found by walking the order's index."""

    where: list[sa.ColumnElement[bool]]
    few: bool


def supports(search: Search) -> bool:
    """Whether the catalog can answer ``search`` (criteria it keeps columns for)."""
    return set(search.patient_query) | set(search.study_query) <= SUPPORTED


def encode_cursor(values: tuple[Any, ...]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode().rstrip("=")


def decode_cursor(text: str | None, keys: tuple[sa.ColumnElement, ...]) -> tuple[Any, ...] | None:
    """A cursor from a link, or None when it is not one for this order (a link edited by hand)."""
    if not text or len(text) > 2000:
        return None
    try:
        values = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except ValueError:
        return None
    if not isinstance(values, list) or len(values) != len(keys):
        return None
    for value, key in zip(values, keys, strict=True):
        wanted = int if isinstance(key.type, sa.Integer) else str
        if type(value) is not wanted:
            return None
    return tuple(values)


class Catalog:
    """Searches of the catalog on one connection."""

    def __init__(self, connection: sa.Connection) -> None:
        self.connection = connection
        self.sqlite = connection.dialect.name == "sqlite"
        self._patients_named: dict[str, bool] = {}

    # ---- criteria -----------------------------------------------------------------------------

    def conditions(self, search: Search, *, walking: bool) -> list[sa.ColumnElement[bool]]:
        """The SQL of ``search``; ``walking`` for a walk of an order's index (many matches)."""
        found: list[sa.ColumnElement[bool]] = []
        query = {**search.patient_query, **search.study_query}
        for name, value in query.items():
            if name == "PatientID" and self._names_one_patient(search):
                found.append(c.patient_key == resource_id(value))
            elif name in KEYS:
                found.append(self.matches(KEYS[name], value, walking=walking))
            elif name == "PatientBirthDate":
                found.append(c.birth_date == value)
            elif name == "ModalitiesInStudy":
                found.append(self.has_modality(fold(value), walking=walking))
            else:
                raise ValueError(f"the catalog has no column for {name}")
        if search.dates is not None:
            found.append(c.study_date != "")
            found.append(c.study_date >= dicom_date(search.dates.first))
            if search.dates.last is not None:
                found.append(c.study_date <= dicom_date(search.dates.last))
        return found

    def _names_one_patient(self, search: Search) -> bool:
        """A patient ID typed exactly as stored, alone: that patient only (see control.query.finder)."""
        if search.study_query or search.dates or set(search.patient_query) != {"PatientID"}:
            return False
        typed = search.patient_query["PatientID"]
        if has_wildcard(typed):
            return False
        if typed not in self._patients_named:
            exists = sa.select(c.id).where(c.patient_key == resource_id(typed)).limit(1)
            self._patients_named[typed] = self.connection.execute(exists).first() is not None
        return self._patients_named[typed]

    def matches(self, key: sa.ColumnElement, pattern: str, *, walking: bool) -> sa.ColumnElement[bool]:
        """``key`` matching a DICOM pattern (``*``, ``?``) as a whole, in the matching form."""
        folded = fold(pattern)
        if not has_wildcard(folded):
            return key == folded
        if not self.sqlite:
            return key.like(like_pattern(folded), escape="\\")
        glob = glob_pattern(folded)
        # A pattern that starts with text is a range of the key's b-tree; one that starts with a
        # wildcard (a match anywhere) needs the trigram index, which knows three characters.
        anywhere = folded[0] in "*?"
        if anywhere and not walking and key.name in TEXT_INDEX.c and longest_literal(folded) >= 3:
            return c.id.in_(sa.select(TEXT_INDEX.c.rowid).where(TEXT_INDEX.c[key.name].op("GLOB")(glob)))
        return key.op("GLOB")(glob)

    def has_modality(self, modality: str, *, walking: bool) -> sa.ColumnElement[bool]:
        held = tables.modalities.c
        if walking:
            return sa.exists().where(held.modality == modality, held.study_row == c.id)
        return c.id.in_(sa.select(held.study_row).where(held.modality == modality))

    # ---- studies ------------------------------------------------------------------------------

    def count_studies(self, search: Search, patient_key: str | None = None) -> int:
        if search.is_everything and patient_key is None:
            return read_state(self.connection).studies
        where = self.conditions(search, walking=False) + self._of_patient(patient_key)
        query = sa.select(sa.func.count()).select_from(tables.studies).where(*where)
        return self.connection.execute(query).scalar_one()

    def study_versions_of_patient(self, patient_key: str) -> dict[str, tuple[int, str]]:
        """A patient's studies: each one's series count and the archive's last update of it."""
        query = sa.select(c.study_id, c.series_count, c.last_update).where(c.patient_key == patient_key)
        return {study_id: (series, updated) for study_id, series, updated in self.connection.execute(query)}

    @staticmethod
    def _of_patient(patient_key: str | None) -> list[sa.ColumnElement[bool]]:
        return [] if patient_key is None else [c.patient_key == patient_key]

    def studies(
        self,
        search: Search,
        sorting: Sorting,
        offset: int,
        limit: int,
        *,
        after: str | None = None,
        before: str | None = None,
        last_page: bool = False,
        patient_key: str | None = None,
    ) -> Page:
        """A page of matching studies (rows of ``tables.studies``) in ``sorting``'s order, of one
        patient only when ``patient_key`` (the archive's patient id) is given."""
        keys = sorting.keys(STUDY_SORTS)
        total = self.count_studies(search, patient_key)
        matching = self.matching(search, total, patient_key)
        start, end = decode_cursor(after, keys), decode_cursor(before, keys)
        if last_page:
            offset = max(0, (total - 1) // limit * limit) if total else 0
            rows = self.ordered(matching, keys, not sorting.descending, limit=total - offset or limit)[::-1]
        elif end is not None:
            rows = self.ordered(matching, keys, not sorting.descending, limit=limit, beyond=end)[::-1]
        else:
            rows = self.ordered(
                matching, keys, sorting.descending, limit=limit, beyond=start, offset=0 if start else offset
            )
        page = Page(rows, offset, limit, total, offset + len(rows) < total)
        if rows:
            page.after = encode_cursor(tuple(getattr(rows[-1], key.name) for key in keys))
            page.before = encode_cursor(tuple(getattr(rows[0], key.name) for key in keys))
        return page

    def matching(self, search: Search, total: int, patient_key: str | None = None) -> Matching:
        few = total <= SELECTIVE
        return Matching(self.conditions(search, walking=not few) + self._of_patient(patient_key), few)

    def ordered(
        self,
        matching: Matching,
        keys: tuple[sa.ColumnElement, ...],
        descending: bool,
        *,
        limit: int,
        beyond: tuple[Any, ...] | None = None,
        offset: int = 0,
    ) -> list[Any]:
        """Matching studies in the order of ``keys`` (after ``beyond``, when given)."""
        if matching.few:
            # Read first, sorted next: left to itself, a planner may walk the order's index
            # through a million rows for a thousand matches (PostgreSQL did, for a name order).
            # Only the keys are sorted; the page's rows are read by their ids.
            found = sa.select(c.id, *keys).where(*matching.where).cte("matches").prefix_with("MATERIALIZED")
            chosen = self._order(
                sa.select(found), tuple(found.c[key.name] for key in keys), descending, beyond
            )
            page = chosen.limit(limit).offset(offset).subquery("chosen")
            query = sa.select(tables.studies).join(page, c.id == page.c.id)
            return list(
                self.connection.execute(
                    self._order(query, tuple(page.c[key.name] for key in keys), descending, None)
                )
            )
        query = self._order(sa.select(tables.studies).where(*matching.where), keys, descending, beyond)
        return list(self.connection.execute(query.limit(limit).offset(offset)))

    @staticmethod
    def _order(
        query: sa.Select, keys: tuple[sa.ColumnElement, ...], descending: bool, beyond: tuple[Any, ...] | None
    ) -> sa.Select:
        """``query`` in the order of ``keys``, after ``beyond`` when given."""
        if beyond is not None:
            place = sa.tuple_(*keys)
            query = query.where(place < sa.tuple_(*beyond) if descending else place > sa.tuple_(*beyond))
        return query.order_by(*(key.desc() if descending else key.asc() for key in keys))

    # ---- patients -----------------------------------------------------------------------------

    def count_patients(self, search: Search) -> int:
        if search.is_everything:
            return read_state(self.connection).patients
        query = sa.select(sa.func.count(sa.distinct(c.patient_key))).where(
            *self.conditions(search, walking=False)
        )
        return self.connection.execute(query).scalar_one()

    def patients(
        self, search: Search, sorting: Sorting, offset: int, limit: int, *, after: str | None = None
    ) -> Page:
        """A page of patients with matching studies (``PatientMatch`` rows), by their first matching
        study in ``sorting``'s order."""
        keys = sorting.keys(PATIENT_SORTS)
        total = self.count_patients(search)
        matching = self.matching(search, total)
        start = decode_cursor(after, keys)
        seen: set[str] = set()
        found: list[Any] = []
        skip = 0 if start else offset
        for chunk in self._walk(matching, keys, sorting.descending, start):
            firsts = []
            for row in chunk:
                if row.patient_key not in seen:
                    seen.add(row.patient_key)
                    firsts.append(row)
            listed = (
                self._listed_before(matching.where, keys, sorting.descending, start, firsts)
                if start
                else set()
            )
            for row in firsts:
                if row.patient_key in listed:
                    continue
                if skip:
                    skip -= 1
                    continue
                found.append(row)
                if len(found) > limit:
                    break
            if len(found) > limit:
                break
        rows = found[:limit]
        counts = self._matching_counts(matching.where, [row.patient_key for row in rows])
        matches = [self.patient_match(row, counts.get(row.patient_key, 1)) for row in rows]
        page = Page(matches, offset, limit, total, len(found) > limit)
        if rows:
            page.after = encode_cursor(tuple(getattr(rows[-1], key.name) for key in keys))
        return page

    def _walk(
        self,
        matching: Matching,
        keys: tuple[sa.ColumnElement, ...],
        descending: bool,
        start: tuple[Any, ...] | None,
    ) -> Iterator[list[Any]]:
        """Matching studies in order after ``start``, a chunk at a time."""
        place = start
        while True:
            chunk = self.ordered(matching, keys, descending, limit=WALK_CHUNK, beyond=place)
            if chunk:
                yield chunk
            if len(chunk) < WALK_CHUNK:
                return
            place = tuple(getattr(chunk[-1], key.name) for key in keys)

    def _listed_before(
        self,
        where: list[sa.ColumnElement[bool]],
        keys: tuple[sa.ColumnElement, ...],
        descending: bool,
        start: tuple[Any, ...],
        candidates: list[Any],
    ) -> set[str]:
        """Those of the candidates' patients with a matching study at or before ``start``."""
        if not candidates:
            return set()
        place = sa.tuple_(*keys)
        before = place >= sa.tuple_(*start) if descending else place <= sa.tuple_(*start)
        query = (
            sa.select(c.patient_key)
            .where(c.patient_key.in_([row.patient_key for row in candidates]), before, *where)
            .distinct()
        )
        return set(self.connection.execute(query).scalars())

    def _matching_counts(
        self, where: list[sa.ColumnElement[bool]], patient_keys: list[str]
    ) -> dict[str, int]:
        if not patient_keys:
            return {}
        query = (
            sa.select(c.patient_key, sa.func.count())
            .where(c.patient_key.in_(patient_keys), *where)
            .group_by(c.patient_key)
        )
        return dict(self.connection.execute(query).tuples().all())

    @staticmethod
    def patient_match(row: Any, study_count: int) -> PatientMatch:
        # Imported here: control.query imports this module, and this module is also the first
        # one imported by ./pacs catalog and the benchmark, where a module-level import would
        # come back to a control.query still being imported.
        from control.query.finder import PatientMatch

        tags = {
            "PatientID": row.patient_id,
            "PatientName": row.patient_name,
            "PatientSex": row.patient_sex,
            "PatientBirthDate": row.birth_date,
        }
        return PatientMatch(row.patient_key, tags, {"ID": row.study_id}, study_count)
