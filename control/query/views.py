"""The query pages: the search form, patients and studies found, a patient's studies, a study's series.

Every page is a GET whose URL holds all it shows (criteria, page, the page to go back to), so
results can be bookmarked and "Go back" returns to the same results. Every list answers JSON too
(``?format=json`` or ``Accept: application/json``), with the same rows. Orthanc is asked everything
before a template starts, so a missing archive gives the 503 page, never half a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from flask import abort, current_app, g, jsonify, redirect, render_template, request, url_for

from control.activity import Action, record_activity
from control.errors import wants_json
from control.identifiers import is_orthanc_id
from control.orthanc import Orthanc, OrthancError
from control.query import bp, present
from control.query.criteria import SearchForm
from control.query.finder import Finder, ModalityCensus, Page, newest_first

PER_PAGE_CHOICES = (25, 50, 100, 200)
DEFAULT_PER_PAGE = 50


bp.add_app_template_filter(present.file_size, "file_size")


def orthanc() -> Orthanc:
    return current_app.extensions["orthanc"]


def get_or_404(path: str) -> Any:
    """An Orthanc resource by path; an unknown resource is this site's 404."""
    try:
        return orthanc().get_json(path)
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
        census = current_app.extensions.setdefault("query.modalities", ModalityCensus(orthanc()))
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


def page_url(page: int) -> str:
    """This URL at another page of the list."""
    args = {name: value for name, value in request.args.items() if name != "page"}
    return url_for(request.endpoint, **request.view_args, **args, page=page)


def page_of(found: list[Any], paging: Paging) -> Page:
    """The asked-for page of a list held whole (a patient's studies, a study's series)."""
    end = paging.offset + paging.per_page
    return Page(found[paging.offset : end], paging.offset, paging.per_page, len(found), end < len(found))


def pager(page: Page, paging: Paging) -> dict[str, Any]:
    """What the pages and the JSON say about where a page sits in its list."""
    pages = math.ceil(page.total / paging.per_page) if page.total is not None else None
    return {
        "page": paging.page,
        "per_page": paging.per_page,
        "pages": pages,
        "total": page.total,
        "first": page.first_number if page.rows else 0,
        "last": page.last_number,
        "previous": page_url(paging.page - 1) if paging.page > 1 else None,
        "next": page_url(paging.page + 1) if page.has_next else None,
        "last_page": page_url(pages) if pages and pages > paging.page + 1 else None,
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


def list_answer(kind: str, rows: list[dict[str, Any]], pages: dict[str, Any], **extra: Any):
    """The JSON of a list: what it is, where the page sits, and its rows with absolute URLs."""
    base = request.host_url.rstrip("/")
    links = {name: base + pages[name] if pages[name] else None for name in ("previous", "next")}
    body = {
        "list": kind,
        **extra,
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
    page = Finder(orthanc()).patients(form.to_search(), paging.offset, paging.per_page)
    links = present.Links(back=this_page())
    date_format = g.settings["date_format"]
    rows = [
        present.patient_row(number, match, links, date_format)
        for number, match in enumerate(page.rows, page.first_number)
    ]
    criteria = form.criteria()
    pages = pager(page, paging)
    record_activity(Action.SEARCH, level="patients", criteria=criteria, page=paging.page, total=page.total)
    if wants_json():
        return list_answer("patients", rows, pages, criteria=criteria)
    return render_template(
        "query/patients.html",
        rows=rows,
        pages=pages,
        criteria=criteria,
        form=form,
        studies_url=url_for("query.studies", **criteria),
        back=url_for("query.search", **criteria),
    )


@bp.get("/query/studies")
def studies():
    """Studies matching the criteria, newest first."""
    form = SearchForm(request.args)
    if not form.validate():
        return invalid_search(form)
    paging = Paging.from_request()
    search = form.to_search()
    finder = Finder(orthanc())
    page = finder.studies(search, paging.offset, paging.per_page)
    modalities = finder.modalities(search, page.rows)
    links = present.Links(back=this_page())
    date_format = g.settings["date_format"]
    rows = [
        present.study_row(number, study, modalities.get(study["ID"], []), links, date_format)
        for number, study in enumerate(page.rows, page.first_number)
    ]
    criteria = form.criteria()
    pages = pager(page, paging)
    record_activity(Action.SEARCH, level="studies", criteria=criteria, page=paging.page, total=page.total)
    if wants_json():
        return list_answer("studies", rows, pages, criteria=criteria)
    return render_template(
        "query/studies.html",
        rows=rows,
        pages=pages,
        criteria=criteria,
        form=form,
        patient=None,
        back=url_for("query.search", **criteria),
    )


@bp.get("/query/patients/<orthanc_id>/studies")
def patient_studies(orthanc_id: str):
    """All the studies of one patient, newest first."""
    check_id(orthanc_id)
    found = newest_first(get_or_404(f"/patients/{orthanc_id}/studies"))
    if not found:
        abort(404)
    modalities: dict[str, set[str]] = {}
    for series in orthanc().get_json(f"/patients/{orthanc_id}/series"):
        modality = series["MainDicomTags"].get("Modality")
        if modality:
            modalities.setdefault(series["ParentStudy"], set()).add(modality)
    paging = Paging.from_request()
    page = page_of(found, paging)
    date_format = g.settings["date_format"]
    patient = present.patient_fields(found[0].get("PatientMainDicomTags", {}), date_format)
    links = present.Links(back=this_page())
    rows = [
        present.study_row(number, study, sorted(modalities.get(study["ID"], ())), links, date_format)
        for number, study in enumerate(page.rows, page.first_number)
    ]
    pages = pager(page, paging)
    record_activity(
        Action.LIST_OPENED,
        patient=present.patient_label(patient),
        level="studies",
        patient_orthanc_id=orthanc_id,
        page=paging.page,
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
            patient={"id": orthanc_id, **patient},
            manifest=base + resource["manifest"],
        )
    return render_template(
        "query/studies.html",
        rows=rows,
        pages=pages,
        patient=patient,
        patient_actions=resource,
        back=safe_back(url_for("query.search")),
    )


@bp.get("/query/studies/<orthanc_id>/series")
def study_series(orthanc_id: str):
    """The series of one study, in acquisition order."""
    check_id(orthanc_id)
    study = get_or_404(f"/studies/{orthanc_id}")
    found = sorted(orthanc().get_json(f"/studies/{orthanc_id}/series"), key=present.series_sort_key)
    paging = Paging.from_request()
    page = page_of(found, paging)
    date_format = g.settings["date_format"]
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
        Action.LIST_OPENED,
        patient=present.patient_label(patient),
        study=study_fields["study_instance_uid"],
        level="series",
        study_orthanc_id=orthanc_id,
        page=paging.page,
    )
    if wants_json():
        study_json = present.absolute([study_fields], request.host_url)[0]
        return list_answer(
            "series", rows, pages, study=study_json, manifest=study_json["actions"]["manifest"]
        )
    return render_template(
        "query/series.html",
        rows=rows,
        pages=pages,
        patient=patient,
        study=study_fields,
        back=safe_back(url_for("query.search")),
    )


@bp.get("/query/patients/<orthanc_id>/viewer")
def patient_viewer(orthanc_id: str):
    """The viewer on all the studies of a patient (the list does not know them all)."""
    check_id(orthanc_id)
    studies = newest_first(get_or_404(f"/patients/{orthanc_id}/studies"))
    uids = [study["MainDicomTags"]["StudyInstanceUID"] for study in studies]
    return redirect(present.VIEWER + "?StudyInstanceUIDs=" + ",".join(uids))
