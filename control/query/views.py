"""The query pages: the search form, patients and studies found, a patient's studies, a study's series.

Every page is a GET whose URL holds all it shows (criteria, order, page, the page to go back to),
so results can be bookmarked and "Go back" returns to the same results. Every list answers JSON
too (``?format=json`` or ``Accept: application/json``), with the same rows. Everything is read
before a template starts, so a missing archive gives the 503 page, never half a table.

The lists of patients and studies come from the study catalog (``control.catalog``): exact totals,
any column's order, pages at any depth for the same cost. Where the catalog cannot answer now
(being built, behind the archive, its feeder stopped) they come from the archive itself through
``control.query.finder``, newest first, and say so; ``?source=archive`` asks the archive anyway,
to compare. A study's series always come from the archive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from flask import abort, current_app, jsonify, redirect, render_template, request, url_for

from control import services
from control.activity import record_activity
from control.catalog.freshness import freshness
from control.catalog.rows import as_orthanc_study
from control.catalog.search import PATIENT_SORTS, STUDY_SORTS, Catalog, Sorting, supports
from control.errors import wants_json
from control.events import ListOpenedEvent, SearchEvent
from control.identifiers import is_orthanc_id
from control.orthanc import OrthancError, resource_id
from control.paging import Page
from control.query import bp, present
from control.query.criteria import SearchForm, has_wildcard
from control.query.finder import Finder, ModalityCensus, Search, newest_first

PER_PAGE_CHOICES = (25, 50, 100, 200)
DEFAULT_PER_PAGE = 50


bp.add_app_template_filter(present.file_size, "file_size")


def get_or_404(path: str) -> Any:
    """An Orthanc resource by path; an unknown resource is this site's 404."""
    try:
        return services.archive().get_json(path)
    except OrthancError as error:
        if error.status == 404:
            abort(404)
        raise


def check_id(orthanc_id: str) -> None:
    # Ids go into Orthanc paths: anything but an Orthanc id is simply not found.
    if not is_orthanc_id(orthanc_id):
        abort(404)


def modality_census() -> ModalityCensus:
    census = current_app.extensions.get("query.modalities")
    if census is None:
        census = current_app.extensions.setdefault("query.modalities", ModalityCensus(services.archive()))
    return census


@dataclass(frozen=True)
class Paging:
    """Which page of a list the URL asks for."""

    page: int
    per_page: int

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    @classmethod
    def from_request(cls) -> Paging:
        page = request.args.get("page", "1")
        per_page = request.args.get("per_page", "")
        return cls(
            int(page) if page.isdigit() and 0 < int(page) < 1_000_000 else 1,
            int(per_page) if per_page.isdigit() and int(per_page) in PER_PAGE_CHOICES else DEFAULT_PER_PAGE,
        )


# The arguments that say where a page starts, replaced by each link to another page.
PLACE_ARGUMENTS = ("page", "after", "before", "last")


def page_url(page: int, **place: str) -> str:
    """This URL at another page of the list (``place``: a cursor of the catalog's, see its search)."""
    args = {name: value for name, value in request.args.items() if name not in PLACE_ARGUMENTS}
    return _this_page(**args, page=page, **place)


def _this_page(**values: Any) -> str:
    """The URL of the page being answered, its path's own arguments kept, with ``values``."""
    endpoint = request.endpoint
    assert endpoint is not None  # only a request that found no page has none
    return url_for(endpoint, **(request.view_args or {}), **values)


def sorting_from_request(sorts: dict[str, tuple], default: str = "date") -> Sorting:
    """The order the URL asks for (``sort`` a column, ``order`` asc or desc), else ``default``
    (the date: newest first)."""
    column = request.args.get("sort", default)
    if column not in sorts:
        column = default
    order = request.args.get("order", "")
    descending = order == "desc" if order in ("asc", "desc") else sorts[column][1] == "desc"
    return Sorting(column, descending)


def sort_links(sorts: dict[str, tuple], sorting: Sorting) -> dict[str, dict[str, Any]]:
    """For each sortable column: the URL of the list in its order (the other way round when it is
    the current one), and whether and how it is the current order."""
    args = {
        name: value for name, value in request.args.items() if name not in (*PLACE_ARGUMENTS, "sort", "order")
    }
    links = {}
    for column, (_keys, first_direction) in sorts.items():
        current = column == sorting.column
        flipped = "asc" if sorting.descending else "desc"
        order = flipped if current else first_direction
        links[column] = {
            "url": _this_page(**args, sort=column, order=order),
            "current": ("desc" if sorting.descending else "asc") if current else None,
        }
    return links


def one_patient_id(search: Search) -> str | None:
    """The archive's id of the patient a search names by an exact patient ID alone, if it does."""
    if search.study_query or search.dates or set(search.patient_query) != {"PatientID"}:
        return None
    typed = search.patient_query["PatientID"]
    return None if has_wildcard(typed) else resource_id(typed)


def catalog_has_patient(connection: sa.Connection, orthanc_id: str) -> bool:
    """Whether the catalog holds this patient's studies as the archive holds them now: the same
    studies, each with as many series and the same last update (an archive that holds no such
    patient: nothing to miss)."""
    try:
        held = {
            study["ID"]: (len(study.get("Series", ())), study.get("LastUpdate") or "")
            for study in services.archive().get_json(f"/patients/{orthanc_id}/studies")
        }
    except OrthancError as error:
        if error.status == 404:
            return True
        raise
    return held == Catalog(connection).study_versions_of_patient(orthanc_id)


@dataclass(frozen=True)
class Source:
    """Where a list comes from: the catalog, or the archive (with the reason to tell the user)."""

    catalog: bool
    notice: str | None = None

    @property
    def name(self) -> str:
        return "catalog" if self.catalog else "archive"


def choose_source(search: Search | None, sorting: Sorting, patient_id: str | None = None) -> Source:
    """The catalog when it can answer now, else the archive, saying why (see control.catalog).

    While changes wait for the feeder, one patient's studies (the list of a patient, given its
    ``patient_id``, or a search for one patient ID typed exactly) are checked against the archive,
    one GET: if the archive holds a study the catalog does not have yet, or has it otherwise (a
    series added a moment ago, a PDF report say), the archive answers, so that what a user just
    stored shows on the page that follows.
    """
    if request.args.get("source") == "archive" or (search is not None and not supports(search)):
        return Source(False)
    with services.engine().connect() as connection:
        fresh = freshness(connection, services.archive())
        exact = patient_id or (one_patient_id(search) if search is not None else None)
        if fresh.usable and fresh.behind and exact and not catalog_has_patient(connection, exact):
            return Source(False)
    notice = fresh.notice
    if notice is None:  # the catalog is usable
        return Source(True)
    if sorting.column != "date" or not sorting.descending:
        notice += " The order you chose applies once the catalog answers again."
    return Source(False, notice)


def page_of(found: list[Any], paging: Paging) -> Page:
    """The asked-for page of a list held whole (a patient's studies, a study's series)."""
    end = paging.offset + paging.per_page
    return Page(found[paging.offset : end], paging.offset, paging.per_page, len(found), end < len(found))


def pager(page: Page, paging: Paging, *, cursors: bool = False) -> dict[str, Any]:
    """What the pages and the JSON say about where a page sits in its list.

    With ``cursors`` (a list of studies from the catalog) the links carry where this page ends or
    starts, and the last page is read from the end: each costs the same whatever its depth. A
    catalog's list of patients carries where it ends only (see control.catalog.search).
    """
    pages = math.ceil(page.total / paging.per_page) if page.total is not None else None
    number = paging.page if not request.args.get("last") else pages or 1
    after = getattr(page, "after", None)
    before = getattr(page, "before", None) if cursors else None
    previous = next_page = last_page = None
    if number > 1:
        previous = page_url(number - 1, before=before) if before else page_url(number - 1)
    if page.has_next:
        next_page = page_url(number + 1, after=after) if after else page_url(number + 1)
    if pages and pages > number + 1:
        last_page = page_url(pages, last="1") if cursors else page_url(pages)
    return {
        "page": number,
        "per_page": paging.per_page,
        "pages": pages,
        "total": page.total,
        "first": page.first_number if page.rows else 0,
        "last": page.last_number,
        "previous": previous,
        "next": next_page,
        "last_page": last_page,
    }


def safe_back(default: str) -> str:
    """The page to go back to: a path of the query pages given by ``back``, else ``default``."""
    target = request.args.get("back", "")
    parts = urlsplit(target)
    if target.startswith("/query") and not (parts.scheme or parts.netloc) and "\\" not in target:
        return target
    return default


def this_page() -> str:
    return request.full_path.rstrip("?")


def list_answer(
    kind: str, rows: list[dict[str, Any]], pages: dict[str, Any], source: Source | None = None, **extra: Any
):
    """The JSON of a list: what it is, where the page sits, and its rows with absolute URLs."""
    base = request.host_url.rstrip("/")
    links = {
        name: base + pages[key] if pages[key] else None
        for name, key in (("previous", "previous"), ("next", "next"), ("last", "last_page"))
    }
    body = {
        "list": kind,
        **extra,
        **({"source": source.name, "notice": source.notice} if source else {}),
        **{name: pages[name] for name in ("total", "page", "per_page", "pages", "first", "last")},
        "links": links,
        "rows": present.absolute(rows, request.host_url),
    }
    return jsonify(body)


def modality_choices(form: SearchForm) -> list[str]:
    held = modality_census().modalities()
    chosen = form.modality.data
    return held if not chosen or chosen in held else sorted([*held, chosen])


def invalid_search(form: SearchForm):
    if wants_json():
        return jsonify({"error": "Bad criteria", "fields": form.errors, "status": 400}), 400
    return render_template("query/search.html", form=form, modalities=modality_choices(form)), 400


@bp.get("/query")
def search():
    """The query form, filled in from the URL (the results pages' "Change search" comes here)."""
    form = SearchForm(request.args)
    return render_template("query/search.html", form=form, modalities=modality_choices(form))


@bp.get("/query/patients")
def patients():
    """Patients with studies matching the criteria, the newest study first: where results open."""
    form = SearchForm(request.args)
    if not form.validate():
        return invalid_search(form)
    paging = Paging.from_request()
    search = form.to_search()
    sorting = sorting_from_request(PATIENT_SORTS)
    source = choose_source(search, sorting)
    if source.catalog:
        with services.engine().connect() as connection:
            page = Catalog(connection).patients(
                search, sorting, paging.offset, paging.per_page, after=request.args.get("after")
            )
    else:
        page = Finder(services.archive()).patients(search, paging.offset, paging.per_page)
    links = present.Links(back=this_page())
    date_format = services.settings().date_format
    rows = [
        present.patient_row(number, match, links, date_format)
        for number, match in enumerate(page.rows, page.first_number)
    ]
    # URL arguments, as url_for takes them.
    criteria: dict[str, Any] = form.criteria()
    pages = pager(page, paging)
    record_activity(SearchEvent(level="patients", criteria=criteria, page=paging.page, total=page.total))
    if wants_json():
        return list_answer("patients", rows, pages, source, criteria=criteria, sort=order_of(sorting, source))
    return render_template(
        "query/patients.html",
        rows=rows,
        pages=pages,
        criteria=criteria,
        form=form,
        source=source,
        sorts=sort_links(PATIENT_SORTS, sorting) if source.catalog else None,
        studies_url=url_for("query.studies", **criteria),
        back=url_for("query.search", **criteria),
    )


def order_of(sorting: Sorting, source: Source) -> dict[str, str]:
    """The order a list is in, as its JSON tells: the chosen one, or newest first from the archive."""
    if not source.catalog:
        return {"column": "date", "order": "desc"}
    return {"column": sorting.column, "order": "desc" if sorting.descending else "asc"}


@bp.get("/query/studies")
def studies():
    """Studies matching the criteria, newest first unless another order is chosen."""
    form = SearchForm(request.args)
    if not form.validate():
        return invalid_search(form)
    paging = Paging.from_request()
    search = form.to_search()
    sorting = sorting_from_request(STUDY_SORTS)
    source = choose_source(search, sorting)
    if source.catalog:
        page, found, modalities = catalog_studies(search, sorting, paging)
    else:
        finder = Finder(services.archive())
        page = finder.studies(search, paging.offset, paging.per_page)
        found, modalities = page.rows, finder.modalities(search, page.rows)
    links = present.Links(back=this_page())
    date_format = services.settings().date_format
    rows = [
        present.study_row(number, study, modalities.get(study["ID"], []), links, date_format)
        for number, study in enumerate(found, page.first_number)
    ]
    # URL arguments, as url_for takes them.
    criteria: dict[str, Any] = form.criteria()
    pages = pager(page, paging, cursors=source.catalog)
    record_activity(SearchEvent(level="studies", criteria=criteria, page=paging.page, total=page.total))
    if wants_json():
        return list_answer("studies", rows, pages, source, criteria=criteria, sort=order_of(sorting, source))
    return render_template(
        "query/studies.html",
        rows=rows,
        pages=pages,
        criteria=criteria,
        form=form,
        patient=None,
        source=source,
        sorts=sort_links(STUDY_SORTS, sorting) if source.catalog else None,
        back=url_for("query.search", **criteria),
    )


def catalog_studies(
    search: Search, sorting: Sorting, paging: Paging, patient_key: str | None = None
) -> tuple[Page, list[dict[str, Any]], dict[str, list[str]]]:
    """A page of studies from the catalog (of one patient, given its id), its studies in the shape
    of the archive's answers, and their modalities."""
    with services.engine().connect() as connection:
        page = Catalog(connection).studies(
            search,
            sorting,
            paging.offset,
            paging.per_page,
            after=request.args.get("after"),
            before=request.args.get("before"),
            last_page=bool(request.args.get("last")),
            patient_key=patient_key,
        )
    found = [as_orthanc_study(row) for row in page.rows]
    modalities = {row.study_id: row.modalities.split("\\") for row in page.rows if row.modalities}
    return page, found, modalities


@bp.get("/query/patients/<orthanc_id>/studies")
def patient_studies(orthanc_id: str):
    """All the studies of one patient, newest first unless another order is chosen."""
    check_id(orthanc_id)
    paging = Paging.from_request()
    sorting = sorting_from_request(STUDY_SORTS)
    source = choose_source(None, sorting, patient_id=orthanc_id)
    found: list[dict[str, Any]] = []
    if source.catalog:
        page, found, modalities = catalog_studies(Search(), sorting, paging, patient_key=orthanc_id)
    if found:
        heading = found[0]
    else:
        # Not in the catalog (stored a moment ago, a page past the end, or the catalog cannot
        # answer now): the archive's answer.
        source = Source(False, source.notice)
        every = newest_first(get_or_404(f"/patients/{orthanc_id}/studies"))
        if not every:
            abort(404)
        held: dict[str, set[str]] = {}
        for series in services.archive().get_json(f"/patients/{orthanc_id}/series"):
            modality = series["MainDicomTags"].get("Modality")
            if modality:
                held.setdefault(series["ParentStudy"], set()).add(modality)
        modalities = {study_id: sorted(names) for study_id, names in held.items()}
        page = page_of(every, paging)
        found, heading = page.rows, every[0]
    date_format = services.settings().date_format
    patient = present.patient_fields(heading.get("PatientMainDicomTags", {}), date_format)
    links = present.Links(back=this_page())
    rows = [
        present.study_row(number, study, modalities.get(study["ID"], []), links, date_format)
        for number, study in enumerate(found, page.first_number)
    ]
    pages = pager(page, paging, cursors=source.catalog)
    record_activity(
        ListOpenedEvent(level="studies", patient_orthanc_id=orthanc_id, page=paging.page),
        patient=present.patient_label(patient),
        patient_id=patient["patient_id"],
    )
    resource = links.resource("patients", orthanc_id) | {
        "viewer": links.path("query.patient_viewer", orthanc_id)
    }
    if wants_json():
        base = request.host_url.rstrip("/")
        return list_answer(
            "studies",
            rows,
            pages,
            source,
            patient={"id": orthanc_id, **patient},
            manifest=base + resource["manifest"],
            sort=order_of(sorting, source),
        )
    return render_template(
        "query/studies.html",
        rows=rows,
        pages=pages,
        patient=patient,
        patient_actions=resource,
        source=source,
        sorts=sort_links(STUDY_SORTS, sorting) if source.catalog else None,
        back=safe_back(url_for("query.search")),
    )


# A study's series, sorted here (a study has few): each column's key and its first direction.
SERIES_SORTS: dict[str, tuple[Any, str]] = {
    "number": (present.series_sort_key, "asc"),
    "modality": (lambda series: (_series_tag(series, "Modality"), *present.series_sort_key(series)), "asc"),
    "date": (
        lambda series: (
            _series_tag(series, "SeriesDate"),
            _series_tag(series, "SeriesTime"),
            *present.series_sort_key(series),
        ),
        "desc",
    ),
    "description": (
        lambda series: (
            _series_tag(series, "SeriesDescription").casefold(),
            *present.series_sort_key(series),
        ),
        "asc",
    ),
    "files": (lambda series: (len(series.get("Instances", ())), *present.series_sort_key(series)), "desc"),
}


def _series_tag(series: dict[str, Any], name: str) -> str:
    return series["MainDicomTags"].get(name) or ""


@bp.get("/query/studies/<orthanc_id>/series")
def study_series(orthanc_id: str):
    """The series of one study, in acquisition order unless another order is chosen."""
    check_id(orthanc_id)
    study = get_or_404(f"/studies/{orthanc_id}")
    sorting = sorting_from_request(SERIES_SORTS, default="number")
    found = sorted(
        services.archive().get_json(f"/studies/{orthanc_id}/series"),
        key=SERIES_SORTS[sorting.column][0],
        reverse=sorting.descending,
    )
    paging = Paging.from_request()
    page = page_of(found, paging)
    date_format = services.settings().date_format
    links = present.Links(back=this_page())
    rows = [
        present.series_row(number, series, study, links, date_format)
        for number, series in enumerate(page.rows, page.first_number)
    ]
    patient = present.patient_fields(study.get("PatientMainDicomTags", {}), date_format)
    modalities = {series["MainDicomTags"].get("Modality") or "" for series in found} - {""}
    study_fields = present.study_row(None, study, sorted(modalities), links, date_format)
    pages = pager(page, paging)
    record_activity(
        ListOpenedEvent(level="series", study_orthanc_id=orthanc_id, page=paging.page),
        patient=present.patient_label(patient),
        patient_id=patient["patient_id"],
        study=study_fields["study_instance_uid"],
    )
    if wants_json():
        study_json = present.absolute([study_fields], request.host_url)[0]
        return list_answer(
            "series",
            rows,
            pages,
            study=study_json,
            manifest=study_json["actions"]["manifest"],
            sort={"column": sorting.column, "order": "desc" if sorting.descending else "asc"},
        )
    return render_template(
        "query/series.html",
        rows=rows,
        pages=pages,
        patient=patient,
        study=study_fields,
        sorts=sort_links(SERIES_SORTS, sorting),
        back=safe_back(url_for("query.search")),
    )


@bp.get("/query/patients/<orthanc_id>/viewer")
def patient_viewer(orthanc_id: str):
    """The viewer on all the studies of a patient (the list does not know them all)."""
    check_id(orthanc_id)
    studies = newest_first(get_or_404(f"/patients/{orthanc_id}/studies"))
    uids = [study["MainDicomTags"]["StudyInstanceUID"] for study in studies]
    return redirect(present.VIEWER + "?StudyInstanceUIDs=" + ",".join(uids))
