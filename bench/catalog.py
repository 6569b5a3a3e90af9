"""The catalog scenario: the study catalog's searches as the archive grows, and its feeder's lag.

Three parts, each in the report under ``catalog``:

- **Stored for real** (the growth scenario's sizes, ``--sizes``, one-instance studies stored in
  Orthanc): page 1 of a one-result search, of the 1,000-study ``PAGE-*`` answer, of all studies,
  and of a name wildcard (``smi*``), newest first and by name, as the portal's results page from
  the catalog, against Orthanc's ``/tools/find`` giving the whole answer (what a portal without
  the catalog must read to sort) and, newest first, against today's finder (the same page with
  ``?source=archive``: ``control.query.finder``'s date windows). Each pair must list the same
  studies in the same order. The same four searches as DICOMweb study searches (QIDO-RS, page 1 of
  50, signed in), which the catalog answers, against Orthanc's plugin asked directly: the same
  studies when the answer fits in the page, as many otherwise (the plugin does not sort).
- **The catalog alone, rows written straight into its table** (``--catalog-rows``, 200,000 and
  1,000,000 by default, far beyond what can be stored in Orthanc here in minutes), on SQLite and on
  a private PostgreSQL: the same searches timed through ``control.catalog.search`` in-process
  (count and page, no HTTP), plus a page deep in the list reached by its cursor, the first page
  of patients and DICOMweb searches (``control.catalog.qido``); target: a median of at most 100 ms
  on SQLite and 50 ms on PostgreSQL.
- **The feeder's lag** at 120 and 350 stores a second (``Scale.lag_rates``): one-instance studies
  posted to Orthanc at that pace for ``Scale.lag_seconds``, each one's time from Orthanc's answer
  to its row appearing in the catalog; target: a median of at most 2 s. The archive's index here is
  Orthanc's SQLite; the control plane's database the stack's SQLite file. Then the feeder's own
  pace, which the store rates reached on a small machine cannot show (``run_catch_up``): a
  backlog of as many studies as the highest rate's run, applied after the feeder was stopped;
  target: 350 studies a second (1 s per 350).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from bench import clients, data
from bench.clients import digest_of, expect
from bench.measure import Answer
from bench.postgres import PostgresServer, binaries
from bench.report import Row, Target
from bench.stack import free_port
from control import db
from control.catalog import qido, tables
from control.catalog.names import fold
from control.catalog.rows import row_from
from control.catalog.search import STUDY_SORTS, Catalog, Sorting, encode_cursor
from control.orthanc import resource_id
from control.query.finder import Search

if TYPE_CHECKING:
    from bench.scenarios import Bench

PER_PAGE = 50
WILDCARD = "smi*"  # about one patient in twenty (bench.data.FAMILY_NAMES)
TARGETS = {"sqlite": 0.100, "postgresql": 0.050}
LAG_TARGET = 2.0
WRITE_BATCH = 5000


# ---- 1. stored for real ------------------------------------------------------------------------


def name_order(studies: list[dict[str, Any]]) -> list[str]:
    """Orthanc study ids in the catalog's name order: the matching form of the name, then the date,
    time and id, as ``control.catalog.search`` sorts them."""
    ordered = sorted(
        studies,
        key=lambda study: (
            fold(study.get("PatientMainDicomTags", {}).get("PatientName")),
            study["MainDicomTags"].get("StudyDate") or "",
            study["MainDicomTags"].get("StudyTime") or "",
            study["ID"],
        ),
    )
    return [study["ID"] for study in ordered]


def measures(bench: Bench) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """Each search: its label, the page's criteria and Orthanc's query."""
    one = bench.page_group[len(bench.page_group) // 2]
    return [
        ("one result", {"patient_id": one.patient_id}, {"PatientID": one.patient_id}),
        (f"{len(bench.page_group):,} matches", {"patient_id": "PAGE-*"}, {"PatientID": "PAGE-*"}),
        ("all studies", {}, {}),
        (f"name {WILDCARD}", {"patient_name": WILDCARD}, {"PatientName": WILDCARD}),
    ]


def qido_digest(answer: list[dict[str, Any]]) -> str:
    """What both DICOMweb answers must agree on: the studies of an answer that fits in the page,
    the count of a page of a larger one (the plugin lists in its index's order, the catalog newest
    first)."""
    uids = sorted(study["0020000D"]["Value"][0] for study in answer)
    return digest_of(*uids) if len(uids) < PER_PAGE else digest_of(str(len(uids)))


def compare_qido(bench: Bench, label: str, measure: str, query: dict[str, str]) -> None:
    """Page 1 of a DICOMweb study search (QIDO-RS), signed in, against Orthanc's plugin asked
    directly; Orthanc reads values undecoded, so its query is written out raw (ASCII here)."""
    session = bench.signed_in()
    asked = {**query, "limit": str(PER_PAGE)}
    raw = "&".join(f"{key}={value}" for key, value in asked.items())

    def direct(_round: int) -> Answer:
        answer = expect(bench.orthanc.get(f"{bench.stack.orthanc_url}/dicom-web/studies?{raw}", timeout=600))
        return Answer(lambda: qido_digest(answer.json()))

    def portal(_round: int) -> Answer:
        answer = expect(session.get(f"{bench.stack.url}/dicom-web/studies", params=asked, timeout=600))
        return Answer(lambda: qido_digest(answer.json()))

    name = f"{label}: DICOMweb search, {measure}"
    against_plugin = bench.compare(
        "catalog", f"{name} vs Orthanc's QIDO", direct, portal, repeat=max(bench.scale.repeat, 3)
    )
    bench.row(
        "catalog",
        f"{name}: catalog against Orthanc's QIDO, page 1",
        against_plugin,
        None,
        detail={"studies": bench.count_studies(), "measure": f"qido {measure}", "against": "qido"},
    )


def run_stored(bench: Bench) -> None:
    from bench import scenarios

    session = bench.signed_in()
    for size in sorted(bench.scale.sizes):
        scenarios.load_filler(bench, size)
        bench.stack.wait_for_catalog(timeout=3600)
        label = f"{bench.count_studies():,} studies"
        for measure, _criteria, query in measures(bench):
            compare_qido(bench, label, measure, query)
        for measure, criteria, query in measures(bench):
            for sort in ("date", "name"):
                order = {"sort": "name", "order": "asc"} if sort == "name" else {}

                def find(_round: int, query=query, sort=sort) -> Answer:
                    answer = expect(
                        bench.orthanc.post(
                            f"{bench.stack.orthanc_url}/tools/find",
                            json={"Level": "Study", "Query": query, "Expand": True},
                            timeout=600,
                        )
                    ).content

                    def first_page() -> str:
                        found = json.loads(answer)
                        ids = name_order(found) if sort == "name" else clients.newest_first_ids(found)
                        return digest_of(*ids[:PER_PAGE])

                    return Answer(first_page)

                def page(_round: int, params: dict[str, str]) -> Answer:
                    text = expect(
                        session.get(f"{bench.stack.url}/query/studies", params=params, timeout=600)
                    ).text
                    return Answer(lambda: digest_of(*clients.page_study_ids(text)))

                catalog = {**criteria, **order}
                name = f"{label}: {measure}, {'by name' if sort == 'name' else 'newest first'}"
                repeat = max(bench.scale.repeat, 3)
                against_find = bench.compare(
                    "catalog", f"{name} vs /tools/find", find, lambda r, p=catalog: page(r, p), repeat=repeat
                )
                bench.row(
                    "catalog",
                    f"{name}: catalog against /tools/find",
                    against_find,
                    None,
                    detail={
                        "studies": bench.count_studies(),
                        "measure": f"{measure}, {sort}",
                        "against": "find",
                    },
                )
                if sort == "date":
                    against_finder = bench.compare(
                        "catalog",
                        f"{name} vs today's finder",
                        lambda r, p={**criteria, "source": "archive"}: page(r, p),
                        lambda r, p=catalog: page(r, p),
                        repeat=repeat,
                    )
                    bench.row(
                        "catalog",
                        f"{name}: catalog against today's finder",
                        against_finder,
                        None,
                        detail={
                            "studies": bench.count_studies(),
                            "measure": f"{measure}, {sort}",
                            "against": "finder",
                        },
                    )


# ---- 2. the catalog alone, rows written straight into its table ---------------------------------


def synthetic_study(index: int, page_group: int) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """Orthanc's answers for a made-up study (the study, its series) and its size: patients of
    one to four studies, names and dates as in ``bench.data.small_study``, the first
    ``page_group`` studies the ``PAGE-*`` group."""
    chance = random.Random(index)
    patient = index // 3 if index >= page_group else index
    group = "PAGE" if index < page_group else "SYN"
    patient_id = f"{group}-{patient:07d}"
    naming = random.Random(patient_id)
    day = dt.date(1995, 1, 1) + dt.timedelta(days=chance.randrange(11000))
    modality = chance.choice(data.SMALL_MODALITIES)
    study_uid = f"1.2.826.0.1.3680043.10.1.{index}"
    study = {
        "ID": resource_id(patient_id, study_uid),
        "ParentPatient": resource_id(patient_id),
        "LastUpdate": "20260101T120000",
        "MainDicomTags": {
            "StudyInstanceUID": study_uid,
            "StudyID": "1",
            "StudyDate": day.strftime("%Y%m%d"),
            "StudyTime": f"{chance.randrange(7, 20):02d}{chance.randrange(60):02d}00",
            "StudyDescription": chance.choice(("Chest", "Head", "Abdomen", "Knee", "Spine", "Pelvis")),
            "AccessionNumber": f"SY{index:08d}",
            "InstitutionName": chance.choice(("Benchmark Hospital", "North Clinic", "Harbour Imaging")),
            "ReferringPhysicianName": f"{chance.choice(data.FAMILY_NAMES)}^{chance.choice(data.GIVEN_NAMES)}",
        },
        "PatientMainDicomTags": {
            "PatientID": patient_id,
            "PatientName": f"{naming.choice(data.FAMILY_NAMES)}^{naming.choice(data.GIVEN_NAMES)}",
            "PatientSex": naming.choice("MF"),
            "PatientBirthDate": f"19{naming.randint(30, 99)}0{naming.randint(1, 9)}1{naming.randint(0, 9)}",
        },
    }
    series = [
        {
            "ID": f"series-{index}",
            "MainDicomTags": {"Modality": modality},
            "Instances": ["i"] * chance.randint(1, 400),
        }
    ]
    return study, series, chance.randint(10**5, 5 * 10**8)


def secondary_definitions(connection: sa.Connection) -> list[str]:
    """The SQL of the catalog's indexes and triggers (its primary and unique keys aside), as the
    migration made them."""
    if connection.dialect.name == "postgresql":
        query = sa.text(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'catalog_studies' "
            "AND indexdef NOT LIKE 'CREATE UNIQUE INDEX%'"
        )
    else:
        query = sa.text(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'catalog_studies' "
            "AND type IN ('index', 'trigger') AND sql IS NOT NULL"
        )
    return list(connection.execute(query).scalars())


@contextmanager
def bulk_load(engine: sa.Engine) -> Iterator[None]:
    """Indexes and triggers set aside while rows are written, then made again from the same SQL,
    as one loads a table in bulk: row by row, a million rows would take most of an hour here."""
    with engine.begin() as connection:
        definitions = secondary_definitions(connection)
        for definition in definitions:
            kind, name = definition.split()[1:3]  # CREATE INDEX name ..., CREATE TRIGGER name ...
            connection.execute(sa.text(f"DROP {kind} {name}"))
    try:
        yield
    finally:
        with engine.begin() as connection:
            for definition in definitions:
                connection.execute(sa.text(definition))
            if connection.dialect.name == "sqlite":
                connection.execute(sa.text("INSERT INTO catalog_text(catalog_text) VALUES ('rebuild')"))


def write_rows(engine: sa.Engine, start: int, end: int, page_group: int) -> None:
    """Rows ``start`` to ``end`` straight into the catalog's tables (no archive behind them)."""
    with bulk_load(engine):
        for first in range(start, end, WRITE_BATCH):
            batch = range(first, min(end, first + WRITE_BATCH))
            rows = [row_from(*synthetic_study(index, page_group)) for index in batch]
            with engine.begin() as connection:
                connection.execute(
                    tables.studies.insert(),
                    [{"id": index + 1, **row.values} for index, row in zip(batch, rows, strict=True)],
                )
                connection.execute(
                    tables.modalities.insert(),
                    [
                        {"modality": modality, "study_row": index + 1}
                        for index, row in zip(batch, rows, strict=True)
                        for modality in row.modalities
                    ],
                )
    with engine.begin() as connection:
        counted = connection.execute(
            sa.select(sa.func.count(), sa.func.count(sa.distinct(tables.studies.c.patient_key)))
        ).one()
        connection.execute(
            tables.state.update().values(
                status="ready", studies=counted[0], patients=counted[1], heartbeat_at=db.utcnow()
            )
        )
        if connection.dialect.name == "postgresql":
            # What autovacuum does after a load like this one, so that plans use fresh statistics.
            connection.execute(sa.text("ANALYZE"))


@contextmanager
def databases(bench: Bench) -> Iterator[Iterator[tuple[str, sa.Engine]]]:
    """A fresh, migrated catalog on SQLite and (when installed) on a private PostgreSQL."""
    folder = bench.work / "catalog-growth"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("catalog.sqlite3*"):
        old.unlink()
    server = PostgresServer(free_port()) if binaries() else None
    try:
        if server:
            server.start()

        def each() -> Iterator[tuple[str, sa.Engine]]:
            urls = [("sqlite", db.default_url(folder).replace("control.sqlite3", "catalog.sqlite3"))]
            if server:
                urls.append(("postgresql", server.create_database("catalog")))
            for backend, url in urls:
                engine = db.make_engine(url)
                db.migrate(engine)
                try:
                    yield backend, engine
                finally:
                    engine.dispose()

        yield each()
    finally:
        if server:
            server.stop()


Timed = Callable[[Catalog], Callable[[], Any]]


def catalog_measures(rows: int, page_group: int) -> list[tuple[str, Timed]]:
    """The searches timed on a catalog of ``rows`` made-up studies (see ``synthetic_study``): each
    prepares, on a catalog, the call that is timed."""
    newest, by_name = Sorting("date", True), Sorting("name", False)
    one = Search(patient_query={"PatientID": f"SYN-{(page_group + rows // 2) // 3:07d}"})
    group = Search(patient_query={"PatientID": "PAGE-*"})
    wildcard = Search(patient_query={"PatientName": WILDCARD})
    everything = Search()

    def page(search: Search, sorting: Sorting) -> Timed:
        return lambda catalog: lambda: catalog.studies(search, sorting, 0, PER_PAGE)

    def half_way(catalog: Catalog) -> Callable[[], Any]:
        # The page half-way down the list, reached as its "Next" link reaches it: by its cursor.
        keys = newest.keys(STUDY_SORTS)
        middle = catalog.connection.execute(
            sa.select(*keys).order_by(*(key.desc() for key in keys)).offset(rows // 2).limit(1)
        ).one()
        cursor = encode_cursor(tuple(middle))
        return lambda: catalog.studies(everything, newest, rows // 2, PER_PAGE, after=cursor)

    def dicomweb(query: str) -> Timed:
        search = qido.parse(query)
        assert search is not None, query
        return lambda catalog: lambda: DicomwebPage(qido.find(catalog.connection, search, PER_PAGE)[0])

    return [
        ("one result", page(one, newest)),
        (f"{page_group:,} matches, newest first", page(group, newest)),
        (f"{page_group:,} matches, by name", page(group, by_name)),
        ("all studies, newest first", page(everything, newest)),
        ("all studies, by name", page(everything, by_name)),
        (f"name {WILDCARD}, newest first", page(wildcard, newest)),
        (f"name {WILDCARD}, by name", page(wildcard, by_name)),
        ("all studies, the page half-way down", half_way),
        (
            "all patients, newest study first",
            lambda catalog: lambda: catalog.patients(everything, newest, 0, PER_PAGE),
        ),
        # What a viewer asks when it opens a study, and a DICOMweb client's broad search.
        (
            "DICOMweb search for one Study Instance UID",
            dicomweb(f"StudyInstanceUID=1.2.826.0.1.3680043.10.1.{rows // 2}"),
        ),
        (f"DICOMweb search, name {WILDCARD}", dicomweb(f"PatientName={WILDCARD}")),
        ("DICOMweb search, all studies", dicomweb("")),
    ]


@dataclass
class DicomwebPage:
    """A page of DICOMweb answers in the shape the timing loop reads (``rows``)."""

    rows: list[Any]


def run_catalog_rows(bench: Bench) -> None:
    page_group = min(1000, min(bench.scale.catalog_rows) // 4)
    repeat = max(bench.scale.repeat, 5)
    with databases(bench) as each:
        for backend, engine in each:
            written = 0
            for rows in sorted(bench.scale.catalog_rows):
                started = time.monotonic()
                write_rows(engine, written, rows, page_group)
                bench.say(
                    f"  catalog on {backend}: {rows:,} rows ({time.monotonic() - started:.0f} s to write)"
                )
                written = rows
                for measure, prepare in catalog_measures(rows, page_group):
                    seconds, found = [], 0
                    with engine.connect() as connection:
                        timed = prepare(Catalog(connection))
                        for round_number in range(repeat + 1):
                            began = time.perf_counter()
                            page = timed()
                            if round_number:  # the first round warms the caches and is not counted
                                seconds.append(time.perf_counter() - began)
                            found = len(page.rows)
                    bench.report.check(
                        "catalog", f"{backend}, {rows:,} rows: {measure} lists a page", found > 0
                    )
                    median = statistics.median(seconds)
                    bench.report.add(
                        Row(
                            "catalog",
                            f"{backend}, {rows:,} rows written straight in: {measure}",
                            None,
                            median,
                            median,
                            Target("within", TARGETS[backend]),
                            runs=len(seconds),
                            detail={"rows": rows, "backend": backend, "measure": measure, "seconds": seconds},
                        )
                    )


# ---- 3. the feeder's lag -----------------------------------------------------------------------


def run_lag(
    bench: Bench, rates: tuple[int, ...] | None = None, *, scenario: str = "catalog", where: str = ""
) -> None:
    """The feeder's lag at each of ``rates`` (the scale's by default) on ``bench``'s stack;
    ``where`` names the archive in the rows when it is not the benchmark's own (", PostgreSQL index")."""
    for rate in rates or bench.scale.lag_rates:
        stored, seen, achieved = measure_lag(bench, rate, bench.scale.lag_seconds)
        lags = sorted(seen[study] - stored[study] for study in stored if study in seen)
        bench.report.check(
            scenario,
            f"feeder at {rate} stores/s{where}: every store reached the catalog",
            len(lags) == len(stored),
            f"{len(stored) - len(lags)} missing",
        )
        if not lags:
            continue
        median, p95 = statistics.median(lags), lags[max(0, int(len(lags) * 0.95) - 1)]
        detail = {"rate": rate, "achieved": achieved, "stores": len(stored), "p95": p95, "max": lags[-1]}
        note = f"{achieved:.0f} stores/s achieved; p95 {p95:.2f} s, max {lags[-1]:.2f} s"
        bench.report.add(
            Row(
                scenario,
                f"feeder lag at {rate} stores/s{where} (median)",
                None,
                median,
                median,
                Target("within", LAG_TARGET),
                runs=len(lags),
                note=note,
                detail=detail,
            )
        )


def measure_lag(bench: Bench, rate: int, seconds: float) -> tuple[dict[str, float], dict[str, float], float]:
    """Store one-instance studies at ``rate`` a second for ``seconds``; when each was answered by
    Orthanc and when its row appeared in the catalog (monotonic seconds), and the rate achieved.
    The catalog first catches up with what the scenario stored before (minutes, on a two-node
    site that has just stored thousands of studies)."""
    bench.stack.wait_for_catalog(timeout=600)
    engine = db.make_engine(bench.stack.database_url)
    with engine.connect() as connection:
        newest = connection.execute(sa.select(sa.func.max(tables.studies.c.id))).scalar_one() or 0
    stored: dict[str, float] = {}
    seen: dict[str, float] = {}
    done = threading.Event()

    def watch() -> None:
        last = newest
        deadline = None
        while True:
            finished = done.is_set()
            if finished and deadline is None:
                deadline = time.monotonic() + 120
            if deadline is not None and time.monotonic() > deadline:
                return  # what is still missing is reported as missing
            with engine.connect() as connection:
                found = connection.execute(
                    sa.select(tables.studies.c.id, tables.studies.c.study_id).where(
                        tables.studies.c.id > last
                    )
                ).all()
            now = time.monotonic()
            for row_id, study_id in found:
                seen.setdefault(study_id, now)
                last = max(last, row_id)
            if finished and set(stored) <= set(seen):
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, name="catalog-lag", daemon=True)
    watcher.start()
    count = max(1, int(rate * seconds))
    group = f"LAG{rate}"
    bodies = [
        data.encode(data.small_study(index, group=group, first_day=dt.date(2010, 1, 1), days=3000)[1])
        for index in range(count)
    ]
    started = time.monotonic()

    def store(index: int) -> None:
        delay = started + index / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        answer = expect(
            bench.orthanc.post(f"{bench.stack.orthanc_url}/instances", data=bodies[index], timeout=120)
        ).json()
        stored[answer["ParentStudy"]] = time.monotonic()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(store, range(count)))
    achieved = count / (time.monotonic() - started)
    done.set()
    watcher.join()
    engine.dispose()
    return stored, seen, achieved


def run_catch_up(bench: Bench) -> None:
    """How fast the feeder applies a backlog, beyond the store rates this machine reaches: the
    studies of ``max(lag_rates) * lag_seconds`` stores are posted while the catalog's process is
    stopped (SIGSTOP), and the time from SIGCONT until the catalog holds them all is what it takes.
    The archive is idle meanwhile, so this is the feeder's own pace, not Orthanc's; the feeder
    keeps up with a store rate when it applies that many studies a second."""
    rate = max(bench.scale.lag_rates)
    count = int(rate * bench.scale.lag_seconds)
    bodies = [
        data.encode(data.small_study(index, group="BACKLOG", first_day=dt.date(2010, 1, 1), days=3000)[1])
        for index in range(count)
    ]
    bench.stack.wait_for_catalog()
    (feeder,) = bench.stack.processes().pids["catalog"]
    orthanc = bench.orthanc  # one session for every store (the property makes a new one each time)
    os.kill(feeder, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(8) as pool:
            for answer in pool.map(
                lambda body: orthanc.post(f"{bench.stack.orthanc_url}/instances", data=body, timeout=120),
                bodies,
            ):
                expect(answer)
    finally:
        started = time.monotonic()
        os.kill(feeder, signal.SIGCONT)
    bench.stack.wait_for_catalog(timeout=600)
    seconds = time.monotonic() - started
    applied = count / seconds
    bench.report.add(
        Row(
            "catalog",
            f"feeder applying a backlog of {count:,} studies: time per {rate} studies",
            None,
            seconds * rate / count,
            seconds * rate / count,
            Target("within", 1.0),
            runs=1,
            note=f"{applied:.0f} studies/s applied, the archive idle meanwhile; {seconds:.1f} s in all",
            detail={"studies": count, "seconds": seconds, "applied_per_second": applied},
        )
    )


def run_catalog(bench: Bench) -> None:
    run_stored(bench)
    run_catalog_rows(bench)
    run_lag(bench)
    run_catch_up(bench)
