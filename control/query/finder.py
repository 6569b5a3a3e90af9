"""Finding studies in Orthanc, newest first, one page at a time.

Every list is built from ``POST /tools/find`` with ``Expand`` (never QIDO: ten times slower, and it
mangles non-ASCII criteria). Orthanc 1.10.1 cannot sort: ``OrderBy`` is ignored and ``Limit`` and
``Since`` page in its own storage order. ``Since`` is no shortcut either: Orthanc reads every
match before it. So the order is made here, and how depends on the size of the answer.

**Small answers** (up to ``SORT_LIMIT`` matching studies, 2,000: the searches people make) take one
call: every match, expanded, sorted here by study date and time (newest first), then sliced into
the page. Total counts are exact and the time is that of the find: about 0.1 ms per matching study
(100 ms for 1,000 on a 2-core machine); keeping the page's own work per row cheap keeps a
1,000-study answer within a small multiple of that call. The first call asks for ``SORT_LIMIT + 1``
studies, so it also tells whether the answer is small.

**One patient by ID**, the search physicians make most, takes no find at all: Orthanc names a
patient by the SHA-1 of its ID, so the patient's studies are one GET (``Finder._one_patient``),
about 0.2 ms of Orthanc's time whatever the archive holds. An ID that names no patient exactly
(typed in another case, say) is searched with a find like any other criterion.

**Large answers** (a broad search in a big archive: "everything", "all CT") are not read whole:
at 50,000 studies an expanded find takes about 5 s and 40 MB. Orthanc does apply a study date range
in its database before anything else, so a range holding few studies is cheap whatever the archive
holds. The answer is therefore cut into study date windows, walked from today backwards: each
window is counted with an id-only query (about 0.04 ms per match), its span adapted so that it holds
at most ``SORT_LIMIT`` studies (shrunk where studies are dense, widened across empty years), and
only the windows that hold the page are fetched expanded and sorted. Page 1 of "everything" in a
50,000-study archive costs a few small queries; a page deep in the answer costs counting the
windows before it. Before the walk come studies dated in the future (clock errors) and after it
those without a date. Orthanc compares dates as text, so a date that is not a DICOM date
(``1997.04.24``) may fall between two windows: such studies come last, from one full read that
only the last pages of such an answer need. The total is one
id-only count (or ``/statistics`` when there are no criteria); past ``COUNT_LIMIT`` matches the
pages say only that more follow. Every find carries a ``Limit``: on a PostgreSQL index (several
archive nodes) a broad find costs about 8 times what it does on SQLite.

The trade-off: large answers cost one count plus work proportional to the depth of the page rather
than to the archive; studies stored while someone pages may shift rows between pages, as in any
list that is not a snapshot. At patient level (patients ordered by their newest matching study) a
large answer is walked the same way, fetching windows until the page's patients are found; its
patient total would need a full read (Orthanc's own patient count can disagree: a patient criterion
at study level matches the patient's tags as stored with each study), so the pages say whether more
follow, and give a total only for "everything" (from ``/statistics``).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from control.orthanc import ArchiveClient, OrthancError, OrthancUnavailable, resource_id
from control.paging import Page

SORT_LIMIT = 2000
# Counts stop here (every find carries a Limit, see Orthanc.find): a larger answer's total is
# not given ("more follow"), and no one window or leftover read brings more than this.
COUNT_LIMIT = 10_000
DICOM_DATE = re.compile(r"\d{8}")
# Study date windows never start before this; older and undated studies come last, in one window.
EARLIEST = dt.date(1900, 1, 1)
FIRST_WINDOW_DAYS = 31
LONGEST_WINDOW_DAYS = 200 * 366
# A page of this many studies or fewer (a search for one patient, say) reads each study's series
# with a plain GET, about 1.4 ms whatever the archive holds, where a find searches the index (about
# 7 ms even for one match in a 3,000-study archive, and more as it grows): see bench/ and README.
FEW_STUDIES = 3


def dicom_date(day: dt.date) -> str:
    """A date as DICOM writes it (``YYYYMMDD``, year zero-padded)."""
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


@dataclass(frozen=True)
class DateRange:
    """The study dates searched: from ``first`` to ``last`` (open-ended when None), both included."""

    first: dt.date
    last: dt.date | None = None


@dataclass(frozen=True)
class Search:
    """What to look for: Orthanc criteria about the patient and about the study, and study dates."""

    patient_query: dict[str, str] = field(default_factory=dict)
    study_query: dict[str, str] = field(default_factory=dict)
    dates: DateRange | None = None

    @property
    def is_everything(self) -> bool:
        return not (self.patient_query or self.study_query or self.dates)

    def query(self, window: Window | None = None) -> dict[str, str]:
        """The Orthanc query, its study date restricted to ``window`` when given."""
        query = {**self.patient_query, **self.study_query}
        if window is not None:
            query["StudyDate"] = window.range_text
        elif self.dates is not None:
            last = dicom_date(self.dates.last) if self.dates.last else ""
            query["StudyDate"] = f"{dicom_date(self.dates.first)}-{last}"
        return query


@dataclass(frozen=True)
class Window:
    """Study dates from ``low`` to ``high`` (DICOM dates, None for an open end), as Orthanc matches them."""

    low: str | None
    high: str | None

    @property
    def range_text(self) -> str:
        return f"{self.low or ''}-{self.high or ''}"

    def holds(self, study_date: str) -> bool:
        # Orthanc compares dates as text; an open start also takes an empty date.
        return (self.low is None or study_date >= self.low) and (self.high is None or study_date <= self.high)


@dataclass
class PatientMatch:
    """A patient with matching studies: the patient's tags as stored with its newest match."""

    id: str
    tags: dict[str, str]
    newest_study: dict[str, Any]
    study_count: int = 1


def study_date(study: dict[str, Any]) -> str:
    return study["MainDicomTags"].get("StudyDate") or ""


def newest_first(studies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Studies by date and time, newest first; the Orthanc id settles ties so pages never overlap."""
    return sorted(
        studies,
        key=lambda study: (
            study_date(study),
            study["MainDicomTags"].get("StudyTime") or "",
            study["ID"],
        ),
        reverse=True,
    )


def group_by_patient(studies: list[dict[str, Any]], into: dict[str, PatientMatch]) -> None:
    """Add studies (newest first) to ``into``, a patient's place being that of its newest study."""
    for study in studies:
        match = into.get(study["ParentPatient"])
        if match is None:
            into[study["ParentPatient"]] = PatientMatch(
                study["ParentPatient"], study.get("PatientMainDicomTags", {}), study
            )
        else:
            match.study_count += 1


def _read_modalities(orthanc: ArchiveClient, study_id: str) -> tuple[str, ...]:
    """The modalities of a study's series, from Orthanc."""
    series = orthanc.get_json(f"/studies/{study_id}/series")
    return tuple(sorted({item["MainDicomTags"].get("Modality") for item in series} - {None, ""}))


@functools.lru_cache(maxsize=4096)
def _remembered_modalities(
    orthanc: ArchiveClient, study_id: str, version: tuple[str, tuple[str, ...]]
) -> tuple[str, ...]:
    """``_read_modalities``, kept per study version: a study found again (paging, "Go back", the
    same search) costs no call. A version is the study's LastUpdate and its series."""
    return _read_modalities(orthanc, study_id)


class Finder:
    """Pages of matching studies or patients, newest study first, from one Orthanc."""

    def __init__(self, orthanc: ArchiveClient, sort_limit: int = SORT_LIMIT, today: dt.date | None = None):
        self.orthanc = orthanc
        self.sort_limit = sort_limit
        self.today = today or dt.date.today()

    def studies(self, search: Search, offset: int, limit: int) -> Page:
        """Matching studies ``offset`` to ``offset + limit``, newest first."""
        everything = self._small_answer(search)
        if everything is not None:
            ordered = newest_first(everything)
            return Page(
                ordered[offset : offset + limit], offset, limit, len(ordered), offset + limit < len(ordered)
            )
        total = self._count(search, "Study", COUNT_LIMIT + 1)
        known = total <= COUNT_LIMIT
        wanted = offset + limit
        rows: list[dict[str, Any]] = []
        position = 0
        walked: list[Window] = []
        for window, count in self._windows(search):
            walked.append(window)
            if position + count > offset:
                fetched = newest_first(self._fetch(search, window))
                rows.extend(fetched[max(0, offset - position) : wanted - position])
                count = len(fetched)
            position += count
            if position >= wanted:
                break
        else:
            leftovers = self._leftovers(search, walked)
            rows.extend(leftovers[max(0, offset - position) : wanted - position])
            position += len(leftovers)
        if not known:
            return Page(rows, offset, limit, None, position > wanted or len(rows) == limit)
        return Page(rows, offset, limit, total, wanted < total)

    def patients(self, search: Search, offset: int, limit: int) -> Page:
        """Patients with matching studies ``offset`` to ``offset + limit``, by their newest match.

        Rows are ``PatientMatch`` objects; ``study_count`` counts the matching studies read.
        """
        everything = self._small_answer(search)
        matches: dict[str, PatientMatch] = {}
        if everything is not None:
            group_by_patient(newest_first(everything), matches)
            rows = list(matches.values())
            return Page(rows[offset : offset + limit], offset, limit, len(rows), offset + limit < len(rows))
        # One patient more than the page tells whether another page follows.
        wanted = offset + limit + 1
        walked: list[Window] = []
        for window, _count in self._windows(search):
            walked.append(window)
            group_by_patient(newest_first(self._fetch(search, window)), matches)
            if len(matches) >= wanted:
                break
        else:
            group_by_patient(self._leftovers(search, walked), matches)
        rows = list(matches.values())
        # Orthanc's patient count would not do: at study level a patient criterion matches the
        # patient's tags as stored with each study, which may differ from study to study.
        total = self._count(search, "Patient", COUNT_LIMIT + 1) if search.is_everything else None
        if total is not None and total > COUNT_LIMIT:
            total = None
        return Page(rows[offset : offset + limit], offset, limit, total, len(rows) > offset + limit)

    def modalities(self, search: Search, studies: list[dict[str, Any]]) -> dict[str, list[str]]:
        """The modalities of each of ``studies``, a page of the answer to ``search``: one or two finds.

        Orthanc 1.10.1 does not keep ModalitiesInStudy, so the series of the page's studies are found
        with the same criteria within the page's study dates, the modality left out (a study found
        for its CT series shows its other modalities too). Studies without a DICOM date are found by
        their UIDs instead: such a list costs Orthanc time per UID and archive size, but is rare.
        A page of ``FEW_STUDIES`` or fewer asks for each study's series instead, which is cheaper.
        """
        if not studies:
            return {}
        if len(studies) <= FEW_STUDIES:
            return self._modalities_one_by_one(studies)
        dated = [study_date(study) for study in studies if DICOM_DATE.fullmatch(study_date(study))]
        undated = [study for study in studies if not DICOM_DATE.fullmatch(study_date(study))]
        queries = []
        if dated:
            criteria = {name: value for name, value in search.query().items() if name != "ModalitiesInStudy"}
            queries.append(criteria | {"StudyDate": f"{min(dated)}-{max(dated)}"})
        uids = sorted({study["MainDicomTags"].get("StudyInstanceUID") or "" for study in undated} - {""})
        if uids:
            queries.append({"StudyInstanceUID": "\\".join(uids)})
        wanted = {study["ID"] for study in studies}
        found: dict[str, set[str]] = {}
        for query in queries:
            for series in self.orthanc.find("Series", query, expand=True, limit=COUNT_LIMIT):
                modality = series["MainDicomTags"].get("Modality")
                if series["ParentStudy"] in wanted and modality:
                    found.setdefault(series["ParentStudy"], set()).add(modality)
        return {study_id: sorted(held) for study_id, held in found.items()}

    def _modalities_one_by_one(self, studies: list[dict[str, Any]]) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for study in studies:
            # A study's modalities change only with its series, and any change to a study moves
            # its LastUpdate: the key says when a remembered answer still holds.
            version = (study.get("LastUpdate", ""), tuple(study.get("Series", ())))
            try:
                if version[0]:
                    held = _remembered_modalities(self.orthanc, study["ID"], version)
                else:
                    held = _read_modalities(self.orthanc, study["ID"])
            except OrthancError as error:
                if error.status != 404:
                    raise
                continue  # deleted since the find: shown without modalities, as a find would
            if held:
                found[study["ID"]] = list(held)
        return found

    def _small_answer(self, search: Search) -> list[dict[str, Any]] | None:
        """Every matching study, expanded, or None when there are more than ``sort_limit``."""
        exact = self._one_patient(search)
        if exact is not None:
            return exact
        if search.is_everything and self._count(search, "Study", self.sort_limit + 1) > self.sort_limit:
            return None  # the archive's statistics said so, without reading a study
        found = self.orthanc.find("Study", search.query(), expand=True, limit=self.sort_limit + 1)
        return found if len(found) <= self.sort_limit else None

    def _one_patient(self, search: Search) -> list[dict[str, Any]] | None:
        """The studies of the patient whose ID is exactly the one searched for, if that is the whole
        search and there is such a patient; None otherwise (a find then decides).

        Orthanc names a patient by the SHA-1 of its ID, so this is one GET whatever the archive
        holds, where a find reads the whole index (3 ms at 1,000 studies, 60 ms at 50,000). An ID
        typed in another case than stored is no exact match: the find then matches it as usual,
        whatever the case.
        """
        if search.study_query or search.dates or set(search.patient_query) != {"PatientID"}:
            return None
        patient_id = search.patient_query["PatientID"]
        if "*" in patient_id or "?" in patient_id:
            return None
        try:
            return self.orthanc.get_json(f"/patients/{resource_id(patient_id)}/studies") or None
        except OrthancError as error:
            if error.status != 404:
                raise
            return None

    def _count(self, search: Search, level: str, limit: int) -> int:
        """How many studies (or, for no criteria only, patients) match, up to ``limit``: ids only,
        or the statistics."""
        if search.is_everything:
            statistics = self.orthanc.get_json("/statistics")
            return int(statistics["CountStudies" if level == "Study" else "CountPatients"])
        return len(self.orthanc.find(level, search.query(), limit=limit))

    def _fetch(self, search: Search, window: Window) -> list[dict[str, Any]]:
        return self.orthanc.find("Study", search.query(window), expand=True, limit=COUNT_LIMIT)

    def _windows(self, search: Search) -> Iterator[tuple[Window, int]]:
        """Study date windows covering the search's dates, newest first, each with its count.

        A window holds at most ``sort_limit`` studies, unless one day alone holds more.
        """
        first = search.dates.first if search.dates else None
        last = search.dates.last if search.dates else None
        tomorrow = self.today + dt.timedelta(days=1)
        if last is None or last >= tomorrow:
            future = Window(
                dicom_date(max(tomorrow, first) if first else tomorrow), dicom_date(last) if last else None
            )
            yield future, self._count_window(search, future)
        top = min(last, self.today) if last else self.today
        bottom = max(first, EARLIEST) if first else EARLIEST
        high = top
        span = FIRST_WINDOW_DAYS
        while high >= bottom:
            low = max(high - dt.timedelta(days=span - 1), bottom)
            window = Window(dicom_date(low), dicom_date(high))
            # Past sort_limit, a window of several days is only shrunk: "more" is all it needs to know.
            count = self._count_window(search, window, self.sort_limit + 1)
            if count > self.sort_limit and low == high:
                count = self._count_window(search, window)
            if count > self.sort_limit and low < high:
                # Too many to sort at once: aim for three quarters of the limit.
                span = max(1, min(span - 1, span * self.sort_limit * 3 // (4 * count)))
                continue
            yield window, count
            high = low - dt.timedelta(days=1)
            if count < self.sort_limit // 4:
                grow = 8 if count == 0 else max(1, self.sort_limit // (2 * count))
                span = min(span * min(grow, 8), LONGEST_WINDOW_DAYS)
        if first is None:
            # Studies without a date, and any dated before EARLIEST.
            undated = Window(None, dicom_date(bottom - dt.timedelta(days=1)))
            yield undated, self._count_window(search, undated)

    def _count_window(self, search: Search, window: Window, limit: int = COUNT_LIMIT) -> int:
        return len(self.orthanc.find("Study", search.query(window), limit=limit))

    def _leftovers(self, search: Search, windows: list[Window]) -> list[dict[str, Any]]:
        """Matching studies that no window holds (malformed dates), newest first: one full read."""
        everything = self.orthanc.find("Study", search.query(), expand=True, limit=COUNT_LIMIT)
        return newest_first(
            [study for study in everything if not any(w.holds(study_date(study)) for w in windows)]
        )


# DICOM's defined terms for Modality (PS3.3 C.7.3.1.1.1). Orthanc cannot list the distinct values
# of a tag, so the archive is asked about each term (``Limit`` 1): about 10 ms a term at 5,000
# series, growing with the archive, hence the census below is kept for a while and refreshed in the
# background.
# fmt: off
MODALITY_TERMS = (
    "AR", "ASMT", "AU", "BDUS", "BI", "BMD", "CR", "CT", "CTPROTOCOL", "DG", "DMS", "DOC", "DX", "ECG",
    "EEG", "EMG", "EOG", "EPS", "ES", "FID", "GM", "HC", "HD", "IO", "IOL", "IVOCT", "IVUS", "KER", "KO",
    "LEN", "LS", "MG", "MR", "M3D", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPTBSV", "OPTENF", "OPV",
    "OSS", "OT", "PA", "PLAN", "POS", "PR", "PT", "PX", "REG", "RESP", "RF", "RG", "RTDOSE", "RTIMAGE",
    "RTINTENT", "RTPLAN", "RTRAD", "RTRECORD", "RTSEGANN", "RTSTRUCT", "RWV", "SEG", "SM", "SMR", "SR",
    "SRF", "STAIN", "TEXTUREMAP", "TG", "US", "VA", "XA", "XAPROTOCOL", "XC",
)
# fmt: on


class ModalityCensus:
    """The modalities the archive holds, for the query form's list.

    The first answer is counted while the caller waits; after ``max_age`` seconds the last answer is
    still given at once while a background thread counts again, so no page waits for a recount.
    """

    def __init__(self, orthanc: ArchiveClient, max_age: float = 300) -> None:
        self.orthanc = orthanc
        self.max_age = max_age
        self._lock = threading.Lock()
        self._counted: list[str] | None = None
        self._counted_at = 0.0
        self._recounting = False

    def modalities(self) -> list[str]:
        with self._lock:
            counted, stale = self._counted, time.monotonic() - self._counted_at > self.max_age
            recount_in_background = counted is not None and stale and not self._recounting
            if recount_in_background:
                self._recounting = True
        if counted is None:
            return self._recount()
        if recount_in_background:
            threading.Thread(target=self._recount, name="modality-census", daemon=True).start()
        return counted

    def _recount(self) -> list[str]:
        try:
            with ThreadPoolExecutor(max_workers=4) as pool:
                held = pool.map(self._holds, MODALITY_TERMS)
                found = [term for term, present in zip(MODALITY_TERMS, held, strict=True) if present]
        except (OrthancUnavailable, OrthancError):
            found = None
        with self._lock:
            self._recounting = False
            if found is not None:
                self._counted, self._counted_at = found, time.monotonic()
            return self._counted or []

    def _holds(self, modality: str) -> bool:
        return bool(self.orthanc.find("Series", {"Modality": modality}, limit=1))
