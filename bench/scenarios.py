"""The scenarios of the benchmark, most of them comparing the portal with Orthanc asked directly.

"Direct" is what a client with Orthanc's credentials gets from Orthanc's own HTTP port; "portal"
is the same thing asked as a user asks it, through Caddy (and the control plane where it is in the
path). Each scenario adds rows (times, ratios, targets) and content checks to the report:

- ``zip``: a study's zip (``/query/studies/<id>/archive``, built by the portal from the stored files)
  against Orthanc's own ``/archive``, for one, two and four clients at once, its first byte, the
  control plane's memory meanwhile, the zips' sizes; then JPEG lossless against Orthanc's
  transcoding archive, and what transcoding several instances at once gains.
- ``search``: one-result searches and a page of a 1,000-study answer (``/query/studies``) against
  the ``/tools/find`` call behind them (``control.query.finder``: ``Expand``, ``Limit`` 2,001).
- ``viewer``: what OHIF asks to show a series (its metadata, then every frame, 6 requests at a
  time), with a patient's grant cookie through the DICOMweb gate; and, for reference, the same
  through a Caddy of the benchmark's own that proxies straight to Orthanc (no gate).
- ``upload``: a zip of DICOM files posted to ``/upload/files`` against posting the same files to
  ``POST /instances``, unpacked by the client and sent 4 at a time as the portal does.
- ``users``: simulated users signing in, searching, opening a study and fetching frames, for a
  bounded time; every step's latency and errors.
- ``growth``: the searches again as the archive grows (one-instance studies), to show which costs
  follow the archive's size (Orthanc's SQLite index) and which do not (the portal).
- ``catalog`` (``bench.catalog``): the study catalog's searches against ``/tools/find`` and today's
  finder as the archive grows, the catalog alone at up to a million rows on SQLite and PostgreSQL,
  and its feeder's lag under a steady stream of stores.
- ``activity``: the admin's activity pages, filters and CSV export over an activity log of years
  (10 million rows written straight into the table, ``bench.activity``), each against a time
  budget: there is no direct way to compare with.
- ``nodes``: two archive nodes and two control planes on one PostgreSQL (``bench.nodes``): stores
  by C-STORE with one writer against two, and PostgreSQL's conflicts; uploads through one control
  plane against two; a zip and the viewer through the balancer against the single-node stack.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import random
import sqlite3
import statistics
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import requests
import urllib3

from bench import catalog, clients, data
from bench.clients import Refused, digest_of, expect
from bench.measure import DIRECT, PORTAL, Action, Answer, Comparison, MemorySampler, interleave, percentile
from bench.nodes import run_nodes
from bench.report import Report, Row, Target, format_seconds
from bench.stack import ADMIN_PASSWORD, Processes, Stack, proxy_alone

FIND_LIMIT = 2001  # what control.query.finder asks for: SORT_LIMIT + 1
PER_PAGE = 50  # the query pages' default page size
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
UPLOAD_SENDERS = 4  # control.uploads.store.SENDERS: the portal sends 4 files at a time
USER_PASSWORD = "bench user password"  # noqa: S105 - users of a throwaway stack
UPLOADER = "bench-uploader"
MB = 1_000_000
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"


@dataclass(frozen=True)
class Scale:
    """How big and how long: the sizes of the material and the number of runs."""

    zip_series: tuple[int, int]  # slices of the large study's two series; the first is the viewer's
    upload_slices: int
    page_studies: int
    sizes: tuple[int, ...]
    users: int
    users_seconds: float
    repeat: int
    search_rounds: int
    viewer_threads: int = 6
    frames_per_user: int = 4
    budget: float = 900.0  # seconds any one comparison may take before it stops repeating
    activity_rows: int = 10_000_000  # rows of the activity scenario's log
    catalog_rows: tuple[int, ...] = (200_000, 1_000_000)  # the catalog alone (bench.catalog)
    lag_rates: tuple[int, ...] = (120, 350)  # stores a second while the feeder's lag is measured
    lag_seconds: float = 30.0


PRESETS = {
    # About 10 minutes on a 2-core machine; the full growth curve (--sizes 1000,10000,50000) about 13.
    "default": Scale((100, 300), 400, 1000, (1000, 10000), 50, 60, 5, 50),
    "quick": Scale(
        (40, 60),
        100,
        1000,
        (1000, 3000),
        20,
        15,
        3,
        20,
        budget=120,
        catalog_rows=(20_000, 100_000),
        lag_seconds=10,
        activity_rows=1_000_000,
    ),
    # What tests/test_bench_smoke.py runs: the code paths, not the figures.
    "smoke": Scale(
        (3, 5),
        4,
        30,
        (40, 60),
        3,
        3,
        1,
        2,
        viewer_threads=2,
        frames_per_user=2,
        budget=30,
        activity_rows=20_000,
        catalog_rows=(400, 800),
        lag_rates=(20,),
        lag_seconds=2,
    ),
}


@dataclass
class LargeStudy:
    """The large CT study in the archive: its ids, and the viewer's series (the first)."""

    orthanc_id: str
    study_uid: str
    series_uid: str
    instance_uids: list[str]
    size: int


@dataclass
class UploadMaterial:
    """The zip users upload, and what the archive must hold after it."""

    zip_path: Path
    files: int
    dicom_size: int
    study_uid: str
    expected: str  # digest of SOP Instance UID and MD5 of every file


@dataclass
class Bench:
    """One benchmark run: its stack, its scale, its report, and the material it made."""

    stack: Stack
    scale: Scale
    report: Report
    work: Path
    say: Callable[[str], None] = print
    _sessions: dict[str, requests.Session] = field(default_factory=dict)

    @cached_property
    def processes(self) -> Processes:
        return self.stack.processes()

    @cached_property
    def orthanc(self) -> requests.Session:
        return self.stack.orthanc()

    def orthanc_get(self, path: str, **kwargs: Any) -> Any:
        return expect(self.orthanc.get(f"{self.stack.orthanc_url}{path}", timeout=120, **kwargs)).json()

    def find(self, level: str, query: dict[str, str], *, expand: bool = True, limit: int = 0) -> list[Any]:
        body: dict[str, Any] = {"Level": level, "Query": query, "Expand": expand}
        if limit:
            body["Limit"] = limit
        return expect(
            self.orthanc.post(f"{self.stack.orthanc_url}/tools/find", json=body, timeout=300)
        ).json()

    def count_studies(self) -> int:
        return int(self.orthanc_get("/statistics")["CountStudies"])

    def signed_in(self, username: str = "admin", password: str = ADMIN_PASSWORD) -> requests.Session:
        """A signed-in browser session, made once per user and kept."""
        if username not in self._sessions:
            self._sessions[username] = clients.sign_in(self.stack.url, username, password)[0]
        return self._sessions[username]

    def create_user(self, username: str, password: str, *, can_upload: bool = False) -> None:
        """A web user made directly in the stack's database (once)."""
        from control import accounts
        from control.site import Site

        with Site(self.stack.data).engine.begin() as connection:
            if accounts.find_by_username(connection, username) is None:
                accounts.create_user(connection, username, password, can_upload=can_upload)

    # ---- material, made when a scenario first needs it ----

    @cached_property
    def large_study(self) -> LargeStudy:
        first, second = self.scale.zip_series
        plan = data.study_plan(
            1, "CT chest abdomen pelvis", (("Axial 5 mm", first), ("Axial 1.25 mm", second))
        )
        started = time.monotonic()
        paths = data.write_study(plan, self.work / "large")
        data.post_files(self.orthanc, self.stack.orthanc_url, paths, deadline=time.monotonic() + 600)
        found = expect(
            self.orthanc.post(f"{self.stack.orthanc_url}/tools/lookup", data=plan.study_uid)
        ).json()
        orthanc_id = next(item["ID"] for item in found if item["Type"] == "Study")
        series = self.find("Series", {"StudyInstanceUID": plan.study_uid, "SeriesNumber": "1"})[0]
        instances = self.orthanc_get(f"/series/{series['ID']}/instances")
        instances.sort(key=lambda instance: int(instance["MainDicomTags"].get("InstanceNumber", 0)))
        size = int(self.orthanc_get(f"/studies/{orthanc_id}/statistics")["DicomDiskSize"])
        self.say(
            f"  large study: {first}+{second} slices of 512x512, {size / MB:.0f} MB "
            f"({time.monotonic() - started:.0f} s to make and store)"
        )
        return LargeStudy(
            orthanc_id,
            plan.study_uid,
            series["MainDicomTags"]["SeriesInstanceUID"],
            [instance["MainDicomTags"]["SOPInstanceUID"] for instance in instances],
            size,
        )

    @cached_property
    def page_group(self) -> list[data.SmallStudy]:
        """The studies one wildcard search finds (``PAGE-*``), spread over the last three years."""
        started = time.monotonic()
        first_day = dt.date.today() - dt.timedelta(days=1095)
        made = [
            data.small_study(index, group="PAGE", first_day=first_day, days=1095)
            for index in range(self.scale.page_studies)
        ]
        data.post_files(
            self.orthanc,
            self.stack.orthanc_url,
            (data.encode(dataset) for _facts, dataset in made),
            deadline=time.monotonic() + 600,
        )
        # The results pages list from the study catalog: let its feeder apply what was stored.
        self.stack.wait_for_catalog(timeout=600)
        self.say(f"  search material: {len(made)} studies ({time.monotonic() - started:.0f} s to store)")
        return [facts for facts, _dataset in made]

    @cached_property
    def upload_material(self) -> UploadMaterial:
        plan = data.study_plan(2, "CT upload", (("Axial 1.25 mm", self.scale.upload_slices),))
        started = time.monotonic()
        paths = data.write_study(plan, self.work / "upload")
        zip_path = data.zip_files(paths, self.work / "upload.zip")
        dicom_size = sum(path.stat().st_size for path in paths)
        self.say(
            f"  upload material: {len(paths)} files, {dicom_size / MB:.0f} MB in a "
            f"{zip_path.stat().st_size / MB:.0f} MB zip ({time.monotonic() - started:.0f} s to make)"
        )
        expected = stored_digest(data.md5_of_files(paths))
        return UploadMaterial(zip_path, len(paths), dicom_size, plan.study_uid, expected)

    # ---- helpers of the scenarios ----

    def compare(self, scenario: str, what: str, direct: Action, portal: Action, **options: Any) -> Comparison:
        """Interleaved runs of both ways, and the check that they received the same content."""
        options.setdefault("repeat", self.scale.repeat)
        options.setdefault("budget", self.scale.budget)
        options.setdefault("processes", self.processes)
        comparison = interleave(direct, portal, **options)
        mismatches = comparison.mismatches()
        self.report.check(
            scenario,
            f"{what}: same content both ways ({len(comparison.runs[PORTAL])} pairs)",
            comparison.digests_agree(),
            f"first mismatch: {mismatches[0]}" if mismatches else "",
        )
        return comparison

    def row(self, scenario: str, name: str, comparison: Comparison, target: Target | None, **extra: Any):
        """A row of medians from a comparison; ``value`` defaults to the ratio direct/portal."""
        direct, portal = comparison.median(DIRECT), comparison.median(PORTAL)
        row = Row(
            scenario,
            name,
            direct,
            portal,
            extra.pop("value", direct / portal),
            target,
            runs=len(comparison.runs[PORTAL]),
            cpu={way: comparison.cpu(way) for way in (DIRECT, PORTAL)},
            **extra,
        )
        row.detail["seconds"] = {way: comparison.seconds(way) for way in (DIRECT, PORTAL)}
        row.detail["paired_ratio"] = comparison.paired_ratio()
        return self.report.add(row)

    def first_row(self, scenario: str, name: str, comparison: Comparison, most_extra: float) -> Row:
        """A row of the median times to the first answer (first byte, first frame) of each way."""
        direct, portal = (percentile(comparison.firsts(way), 0.5) for way in (DIRECT, PORTAL))
        return self.report.add(
            Row(
                scenario,
                name,
                direct,
                portal,
                portal - direct,
                Target("extra", most_extra),
                runs=len(comparison.runs[PORTAL]),
                detail={"seconds": {way: comparison.firsts(way) for way in (DIRECT, PORTAL)}},
            )
        )


def stored_digest(md5_by_uid: dict[str, str]) -> str:
    return digest_of(*(f"{uid} {md5}" for uid, md5 in sorted(md5_by_uid.items())))


# ---- 1. zip ----------------------------------------------------------------------------------


def run_zip(bench: Bench) -> None:
    """The portal's own zip against Orthanc's ``/archive``, for 1, 2 and 4 clients, then JPEG lossless.

    Both ways must hold the same files: each run's digest is every member's SOP Instance UID and
    MD5 (the layouts differ), and the portal's members are checked once against the MD5s of
    Orthanc's stored files.
    """
    study = bench.large_study
    direct_url = f"{bench.stack.orthanc_url}/studies/{study.orthanc_id}/archive"
    portal_url = f"{bench.stack.url}/query/studies/{study.orthanc_id}/archive"
    folder = bench.work / "downloads"
    folder.mkdir(exist_ok=True)
    # Each client with its own connections, as separate browsers.
    direct_clients = [bench.orthanc, *(bench.stack.orthanc() for _ in range(3))]
    portal_clients = [
        bench.signed_in(),
        *(clients.sign_in(bench.stack.url, "admin", ADMIN_PASSWORD)[0] for _ in range(3)),
    ]
    sizes: dict[str, int] = {}

    def fetch(session: requests.Session, url: str, name: str) -> tuple[float, Callable[[], str]]:
        """Download into a file as a browser would; the digest is read back after the clock stops."""
        path = folder / name
        started = time.perf_counter()
        with path.open("wb") as sink:
            first, size = clients.stream_to(session.get(url, stream=True, timeout=900), sink, started)
        sizes[name] = size

        def digest() -> str:
            try:
                return clients.zip_files_digest(path)
            finally:
                path.unlink()

        return first, digest

    def at_once(sessions: list[requests.Session], url: str, way: str, count: int) -> Action:
        def action(_round: int) -> Answer:
            with ThreadPoolExecutor(count) as pool:
                done = list(pool.map(lambda n: fetch(sessions[n], url, f"{way}-{n}.zip"), range(count)))

            def digest() -> str:
                digests = {digest() for _first, digest in done}
                return digests.pop() if len(digests) == 1 else f"the clients differ: {digests}"

            return Answer(digest, min(first for first, _digest in done))

        return action

    def compare(what: str, count: int, direct: str, portal: str, **options: Any) -> Comparison:
        return bench.compare(
            "zip",
            what,
            at_once(direct_clients, direct, DIRECT, count),
            at_once(portal_clients, portal, PORTAL, count),
            **options,
        )

    fewer = min(3, bench.scale.repeat)
    with MemorySampler(bench.processes) as memory:
        single = compare("one client", 1, direct_url, portal_url)
        double = compare("two clients", 2, direct_url, portal_url)
        quadruple = compare("four clients", 4, direct_url, portal_url, repeat=fewer)
    size = f"{study.size / MB:.0f} MB study"
    portal_size, direct_size = sizes[f"{PORTAL}-0.zip"], sizes[f"{DIRECT}-0.zip"]
    bench.row(
        "zip",
        f"{size}, one client",
        single,
        Target("ratio", 10.0),
        note=f"zip sizes: the portal's {portal_size / MB:.1f} MB (files as stored), Orthanc's "
        f"{direct_size / MB:.1f} MB (deflated): {portal_size / direct_size:.2f}x",
        detail={"portal_bytes": portal_size, "direct_bytes": direct_size},
    )
    bench.row("zip", f"{size}, two clients at once", double, None)
    bench.row("zip", f"{size}, four clients at once", quadruple, None)
    bench.first_row("zip", "first byte (one client)", single, 0.050)
    growth = (memory.after - memory.before) / 2**20
    bench.report.add(
        Row(
            "zip",
            "control-plane memory growth (gunicorn workers' RSS)",
            None,
            growth,
            growth,
            Target("most", 32),
            note=f"before {memory.before / 2**20:.0f} MB, peak {memory.peak / 2**20:.0f} MB, "
            f"after {memory.after / 2**20:.0f} MB",
            detail={
                "before_mb": memory.before / 2**20,
                "peak_mb": memory.peak / 2**20,
                "after_mb": memory.after / 2**20,
            },
        )
    )
    check_stored_files(bench, portal_url, folder / "checked.zip")

    bench.stack.pacs("config", "set", "zip_content", "jpeg-lossless")
    try:
        jpeg = compare(
            "JPEG lossless", 1, f"{direct_url}?transcode={JPEG_LOSSLESS}", portal_url, repeat=fewer
        )
    finally:
        bench.stack.pacs("config", "set", "zip_content", "dicom")
    bench.row("zip", "JPEG lossless: the study transcoded, one client", jpeg, Target("ratio", 1.0))
    transcoding_speed_up(bench, study)


def check_stored_files(bench: Bench, portal_url: str, path: Path) -> None:
    """Every file of the portal's zip is the archive's stored file (MD5 against Orthanc's own)."""
    with path.open("wb") as sink:
        clients.stream_to(
            bench.signed_in().get(portal_url, stream=True, timeout=900), sink, time.perf_counter()
        )
    found = clients.zip_files_digest(path)
    path.unlink()
    instances = bench.orthanc_get(f"/studies/{bench.large_study.orthanc_id}/instances")
    stored = {
        instance["MainDicomTags"]["SOPInstanceUID"]: expect(
            bench.orthanc.get(f"{bench.stack.orthanc_url}/instances/{instance['ID']}/attachments/dicom/md5")
        ).text.strip()
        for instance in instances
    }
    bench.report.check(
        "zip",
        f"every file of the portal's zip is the archive's stored one, byte for byte ({len(stored)} files)",
        found == stored_digest(stored),
    )


def transcoding_speed_up(bench: Bench, study: LargeStudy) -> None:
    """What transcoding several instances at once gains: Orthanc alone, one at a time against as
    many at once as the portal asks for (``control.query.zips.TRANSCODERS``)."""
    from control.query.zips import TRANSCODERS

    instances = [instance["ID"] for instance in bench.orthanc_get(f"/studies/{study.orthanc_id}/instances")]
    body = {
        "Transcode": JPEG_LOSSLESS,
        "Keep": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
        "Force": True,
    }
    sessions = [bench.stack.orthanc() for _ in range(TRANSCODERS)]

    def transcode(session: requests.Session, instance_id: str) -> str:
        answer = expect(session.post(f"{bench.stack.orthanc_url}/instances/{instance_id}/modify", json=body))
        return f"{instance_id} {hashlib.md5(answer.content).hexdigest()}"  # noqa: S324 - a digest

    def transcoded(workers: int) -> Action:
        def action(_round: int) -> Answer:
            with ThreadPoolExecutor(workers) as pool:
                done = list(
                    pool.map(
                        lambda item: transcode(sessions[item[0] % workers], item[1]), enumerate(instances)
                    )
                )
            return Answer(digest_of(*sorted(done)))

        return action

    comparison = interleave(
        transcoded(1), transcoded(TRANSCODERS), repeat=1, processes=bench.processes, budget=bench.scale.budget
    )
    bench.row(
        "zip",
        f"JPEG lossless: Orthanc transcoding {len(instances)} files one at a time / {TRANSCODERS} at once",
        comparison,
        None,
        note="Orthanc alone: the speed-up the portal's parallel transcoding buys",
    )


# ---- 2. search -------------------------------------------------------------------------------


def search_actions(bench: Bench, queries: list[dict[str, str]], criteria: list[dict[str, str]]):
    """Direct and portal actions that ask round ``i`` the ``i``-th query (cycling).

    Direct is the call behind the portal's page: ``/tools/find`` with ``Expand`` and ``Limit``,
    timed until its answer has arrived (the portal has to parse it too; the client's parsing is
    not counted). Its answer is reduced to the first page in the portal's order. The portal's
    page is the HTML a browser gets; its rows are read from it.
    """
    session = bench.signed_in()

    def direct(round_number: int) -> Answer:
        query = queries[round_number % len(queries)]
        return find_answer(bench, {"Level": "Study", "Query": query, "Expand": True, "Limit": FIND_LIMIT})

    def portal(round_number: int) -> Answer:
        params = criteria[round_number % len(criteria)]
        page = expect(session.get(f"{bench.stack.url}/query/studies", params=params, timeout=300))
        return Answer(lambda: digest_of(*clients.page_study_ids(page.text)))

    return direct, portal


def find_answer(bench: Bench, body: dict[str, Any]) -> Answer:
    """``POST /tools/find`` as a timed run: its first page, in the portal's order, is the digest."""
    answer = expect(bench.orthanc.post(f"{bench.stack.orthanc_url}/tools/find", json=body, timeout=300))
    content = answer.content
    return Answer(lambda: digest_of(*clients.newest_first_ids(json.loads(content))[:PER_PAGE]))


def one_result_queries(bench: Bench, count: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    chosen = random.Random(8).sample(bench.page_group, min(count, len(bench.page_group)))
    return (
        [{"PatientID": study.patient_id} for study in chosen],
        [{"patient_id": study.patient_id} for study in chosen],
    )


def run_search(bench: Bench) -> None:
    queries, criteria = one_result_queries(bench, bench.scale.search_rounds)
    single = bench.compare(
        "search",
        "one-result searches",
        *search_actions(bench, queries, criteria),
        repeat=bench.scale.search_rounds,
    )
    median_direct, median_portal = single.median(DIRECT), single.median(PORTAL)
    p95_direct, p95_portal = (
        percentile(single.seconds(DIRECT), 0.95),
        percentile(single.seconds(PORTAL), 0.95),
    )
    cpu = {way: single.cpu(way) for way in (DIRECT, PORTAL)}
    runs = len(single.runs[PORTAL])
    bench.report.add(
        Row(
            "search",
            "one result, median",
            median_direct,
            median_portal,
            median_portal - median_direct,
            Target("extra", 0.003),
            runs=runs,
            cpu=cpu,
        )
    )
    bench.report.add(
        Row(
            "search",
            "one result, p95",
            p95_direct,
            p95_portal,
            p95_portal - p95_direct,
            Target("extra", 0.006),
            runs=runs,
        )
    )
    page = bench.compare(
        "search",
        "page of the PAGE-* answer",
        *search_actions(bench, [{"PatientID": "PAGE-*"}], [{"patient_id": "PAGE-*"}]),
        repeat=max(bench.scale.repeat, min(11, bench.scale.search_rounds)),
    )
    bench.row(
        "search",
        f"page 1 of a {len(bench.page_group):,}-study answer",
        page,
        Target("ratio", 0.4),
        note="within 2.5x of its find",
    )


# ---- 3. viewer -------------------------------------------------------------------------------


class Browser:
    """A browser's parallel connections: ``threads`` requests at a time to one origin.

    It speaks urllib3, not requests: requests' own work per answer (1.7 to 2.4 ms of CPU per
    half-megabyte frame, twice urllib3's) took CPU from the servers on this 2-core machine, which
    a browser, on a machine of its own and with native networking, never does. Both ways use it.
    """

    def __init__(self, threads: int, origin: str, headers: dict[str, str]) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="browser")
        self.connections = urllib3.connection_from_url(origin, maxsize=threads, block=True)
        self.headers = headers

    def get(self, path: str, accept: str) -> urllib3.BaseHTTPResponse:
        answer = self.connections.urlopen(
            "GET", path, headers={**self.headers, "Accept": accept}, timeout=120, retries=False
        )
        if answer.status != 200:
            raise Refused(f"GET {path} answered {answer.status}: {answer.data[:200]!r}")
        return answer

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_exception: object) -> None:
        self.pool.shutdown(wait=True)
        self.connections.close()


def patient_grant(bench: Bench, orthanc_id: str) -> requests.cookies.RequestsCookieJar:
    """The cookies of a patient's browser that opened the study's link, then the viewer."""
    doctor = bench.signed_in()
    home = expect(doctor.get(f"{bench.stack.url}/"))
    made = expect(
        doctor.post(
            f"{bench.stack.url}/tokens/studies/{orthanc_id}/link",
            headers={"X-CSRFToken": clients.csrf_token(home.text)},
        )
    ).json()
    token = made["link"].split("?", 1)[1]
    patient = requests.Session()
    expect(patient.get(f"{bench.stack.url}/token?{token}"))
    expect(patient.get(f"{bench.stack.url}/token/viewer?{token}", allow_redirects=False), 302)
    if "pacs_grant" not in patient.cookies:
        raise Refused("opening the viewer gave no grant cookie")
    return patient.cookies


def viewer_action(browser: Browser, study: LargeStudy, origin: str):
    """Load the viewer's series as OHIF does: its metadata, then every frame, in parallel."""
    series = f"/dicom-web/studies/{study.study_uid}/series/{study.series_uid}"

    def frame(instance_uid: str, started: float) -> tuple[urllib3.BaseHTTPResponse, float]:
        answer = browser.get(f"{series}/instances/{instance_uid}/frames/1", FRAME_ACCEPT)
        return answer, time.perf_counter() - started

    def pixels(answer: urllib3.BaseHTTPResponse) -> str:
        parts = clients.multipart_parts(answer.data, answer.headers.get("Content-Type", ""))
        return digest_of(*parts)

    def action(_round: int) -> Answer:
        started = time.perf_counter()
        metadata = browser.get(f"{series}/metadata", "application/dicom+json").data.decode()
        instances = sorted(json.loads(metadata), key=lambda item: int(item["00200013"]["Value"][0]))
        uids = [item["00080018"]["Value"][0] for item in instances]
        frames = list(browser.pool.map(lambda uid: frame(uid, started), uids))

        def digest() -> str:
            # Bulk-data URLs name the host each way was reached at; everything else must match,
            # in any order (an index on PostgreSQL lists a series' instances in another).
            items = sorted(
                json.loads(metadata.replace(origin, "ORIGIN")), key=lambda item: item["00080018"]["Value"][0]
            )
            return digest_of(json.dumps(items, sort_keys=True), *(pixels(answer) for answer, _at in frames))

        return Answer(digest, min(at for _answer, at in frames), {"frames": len(frames)})

    return action


def run_viewer(bench: Bench) -> None:
    study = bench.large_study
    cookies = patient_grant(bench, study.orthanc_id)
    threads = bench.scale.viewer_threads
    as_orthanc_client = urllib3.make_headers(basic_auth=":".join(bench.stack.orthanc_auth))
    as_patient = {"Cookie": "; ".join(f"{name}={value}" for name, value in cookies.items())}
    # A load takes well under a second and varies with whatever else runs: more pairs.
    repeat = 3 * bench.scale.repeat
    slices = len(study.instance_uids)
    with Browser(threads, bench.stack.orthanc_url, as_orthanc_client) as direct:
        with Browser(threads, bench.stack.url, as_patient) as portal:
            comparison = bench.compare(
                "viewer",
                "series metadata and frames",
                viewer_action(direct, study, bench.stack.orthanc_url),
                viewer_action(portal, study, bench.stack.url),
                repeat=repeat,
            )
        bench.row(
            "viewer",
            f"{slices}-slice series: metadata + every frame, {threads} at a time",
            comparison,
            Target("ratio", 0.85),
            note="aim 0.95",
        )
        bench.first_row("viewer", "first frame", comparison, 0.100)
        # The same through a Caddy that proxies straight to Orthanc, without the gate: how much of
        # the difference is the proxy hop itself.
        with (
            proxy_alone(bench.stack, bench.work / "proxy-alone") as (url, pid),
            Browser(threads, url, {}) as proxied,
        ):
            hop = bench.compare(
                "viewer",
                "series metadata and frames through Caddy alone",
                viewer_action(direct, study, bench.stack.orthanc_url),
                viewer_action(proxied, study, url),
                repeat=repeat,
                processes=Processes({**bench.processes.pids, "caddy": [pid]}),
            )
    bench.row(
        "viewer",
        "the same through Caddy alone, no gate (for reference)",
        hop,
        None,
        note="a benchmark-only Caddy straight to Orthanc: the proxy hop's own share",
    )


# ---- 4. upload -------------------------------------------------------------------------------


def multipart_body(name: str, content: bytes, boundary: str) -> bytes:
    """A form upload of one file, as a browser sends it (built once: both ways start from bytes)."""
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    return head + content + f"\r\n--{boundary}--\r\n".encode()


def zip_members(content: bytes) -> Iterator[bytes]:
    """The files of a zip, inflated one at a time (as the portal does, in one thread)."""
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        for info in archive.infolist():
            if not info.is_dir():
                yield archive.read(info)


def run_upload(bench: Bench) -> None:
    material = bench.upload_material
    content = material.zip_path.read_bytes()
    bench.create_user(UPLOADER, USER_PASSWORD, can_upload=True)
    uploader = bench.signed_in(UPLOADER, USER_PASSWORD)
    token = clients.csrf_token(expect(uploader.get(f"{bench.stack.url}/upload")).text)
    boundary = "pacs-bench-boundary-7d1f0c"
    body = multipart_body("study.zip", content, boundary)
    # The direct client's senders live as long as the scenario, each with its own connection,
    # as the portal's Orthanc client keeps its pooled ones.
    senders = ThreadPoolExecutor(UPLOAD_SENDERS, thread_name_prefix="sender")
    local = threading.local()

    def stored() -> str:
        """What the archive holds of the uploaded study: every instance's UID and file MD5."""
        found = bench.find("Study", {"StudyInstanceUID": material.study_uid}, expand=False)
        if len(found) != 1:
            return f"{len(found)} studies stored"
        md5 = {}
        for instance in bench.orthanc_get(f"/studies/{found[0]}/instances"):
            answer = bench.orthanc.get(
                f"{bench.stack.orthanc_url}/instances/{instance['ID']}/attachments/dicom/md5", timeout=60
            )
            md5[instance["MainDicomTags"]["SOPInstanceUID"]] = expect(answer).text.strip()
        return stored_digest(md5)

    def remove() -> None:
        for orthanc_id in bench.find("Study", {"StudyInstanceUID": material.study_uid}, expand=False):
            expect(bench.orthanc.delete(f"{bench.stack.orthanc_url}/studies/{orthanc_id}", timeout=300))

    def post(member: bytes) -> None:
        if not hasattr(local, "session"):
            local.session = bench.stack.orthanc()
        answer = local.session.post(
            f"{bench.stack.orthanc_url}/instances",
            data=member,
            headers={"Content-Type": "application/dicom"},
            timeout=300,
        )
        if expect(answer).json().get("Status") != "Success":
            raise Refused(f"Orthanc did not store a file: {answer.text[:200]}")

    def direct(_round: int) -> Answer:
        # Unpacked here and posted UPLOAD_SENDERS at a time, at most twice that many waiting:
        # the portal's own pipeline (control.uploads.store), without the portal.
        waiting = threading.BoundedSemaphore(2 * UPLOAD_SENDERS)
        futures = []
        for member in zip_members(content):
            waiting.acquire()
            future = senders.submit(post, member)
            future.add_done_callback(lambda _done: waiting.release())
            futures.append(future)
        for future in futures:
            future.result()
        return Answer(stored)

    def portal(_round: int) -> Answer:
        answer = expect(
            uploader.post(
                f"{bench.stack.url}/upload/files",
                data=body,
                headers={
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                    "X-CSRFToken": token,
                    "Accept": "application/json",
                },
                timeout=900,
            )
        ).json()
        if answer["counts"]["stored"] != material.files:
            raise Refused(f"the portal stored {answer['counts']} of {material.files} files")
        return Answer(stored)

    remove()
    try:
        comparison = bench.compare("upload", "zip upload", direct, portal, between=remove)
    finally:
        senders.shutdown(wait=True)
    received = {run.answer.digest for way in (DIRECT, PORTAL) for run in comparison.runs[way]}
    bench.report.check(
        "upload",
        "after every run the archive held exactly the zip's files, byte for byte",
        received == {material.expected},
    )
    bench.row(
        "upload",
        f"{material.zip_path.stat().st_size / MB:.0f} MB zip of {material.files} files "
        f"({material.dicom_size / MB:.0f} MB DICOM)",
        comparison,
        Target("ratio", 0.95),
        note=f"direct: the client unzips and posts each file to POST /instances, {UPLOAD_SENDERS} at a time",
    )


# ---- 5. users --------------------------------------------------------------------------------

USER_STEPS = ("sign in", "search", "open study", "frames", "sign out")
MAX_SEARCHES = 10_000


@dataclass
class StepLog:
    """Latencies and errors of each step, from every simulated user."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: {step: [] for step in USER_STEPS})
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USER_STEPS, 0))
    messages: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, step: str, action: Callable[..., Any], *args: Any) -> Any:
        """``action(*args)``'s result, its latency logged; None (and an error counted) if it failed."""
        started = time.perf_counter()
        try:
            result = action(*args)
        except (requests.RequestException, Refused, KeyError, ValueError) as error:
            with self.lock:
                self.errors[step] += 1
                if len(self.messages) < 10:
                    self.messages.append(f"{step}: {error}")
            return None
        with self.lock:
            self.latencies[step].append(time.perf_counter() - started)
        return result


class SimulatedUser:
    """One user's session: sign in, then search a patient, open the study found and look at a few
    frames of the large study, again and again, then sign out; a pause (0.5 to 1.5 s) between two
    clicks, as a person takes. (People sign in once a session: signing in costs an Argon2 hash,
    about 170 ms of CPU on purpose, which would swamp everything else if repeated at every search.)
    """

    def __init__(self, bench: Bench, log: StepLog, username: str, seed: int) -> None:
        self.bench = bench
        self.log = log
        self.username = username
        self.chance = random.Random(seed)
        self.url = bench.stack.url
        self.session = requests.Session()
        self.page = ""  # the last page seen, for its CSRF token

    def run(self, deadline: float) -> int:
        """Work until ``deadline``; how many searches were made."""
        searches = 0
        while self.log.timed("sign in", self.sign_in) is None:
            self.think()
            if time.monotonic() > deadline:
                return searches
        while time.monotonic() < deadline and searches < MAX_SEARCHES:
            self.think()
            searches += 1
            found = self.log.timed("search", self.search)
            self.think()
            if found:
                self.log.timed("open study", self.open_study, found)
                self.think()
            self.log.timed("frames", self.frames)
        self.log.timed("sign out", self.sign_out)
        return searches

    def think(self) -> None:
        time.sleep(self.chance.uniform(0.5, 1.5))

    def sign_in(self) -> bool:
        self.session = requests.Session()
        self.page = clients.sign_in(self.url, self.username, USER_PASSWORD, self.session)[1].text
        return True

    def search(self) -> str:
        patient_id = self.chance.choice(self.bench.page_group).patient_id
        page = expect(
            self.session.get(f"{self.url}/query/studies", params={"patient_id": patient_id}, timeout=60)
        )
        found = clients.page_study_ids(page.text)
        if len(found) != 1:
            raise Refused(f"searching {patient_id} found {len(found)} studies")
        self.page = page.text
        return found[0]

    def open_study(self, orthanc_id: str) -> None:
        self.page = expect(self.session.get(f"{self.url}/query/studies/{orthanc_id}/series", timeout=60)).text

    def frames(self) -> None:
        study = self.bench.large_study
        base = f"{self.url}/dicom-web/studies/{study.study_uid}/series/{study.series_uid}/instances"
        count = min(self.bench.scale.frames_per_user, len(study.instance_uids))
        for uid in self.chance.sample(study.instance_uids, count):
            answer = expect(
                self.session.get(f"{base}/{uid}/frames/1", headers={"Accept": FRAME_ACCEPT}, timeout=60)
            )
            if not clients.multipart_parts(answer.content, answer.headers.get("Content-Type", "")):
                raise Refused("a frame answer without parts")

    def sign_out(self) -> None:
        token = clients.csrf_token(self.page)
        landing = expect(self.session.post(f"{self.url}/logout", data={"csrf_token": token}, timeout=60))
        if "/logout" in landing.text:
            raise Refused("still signed in after signing out")


def run_users(bench: Bench) -> None:
    bench.large_study  # noqa: B018 - made before the clock starts
    bench.page_group  # noqa: B018
    count, seconds = bench.scale.users, bench.scale.users_seconds
    started = time.monotonic()
    names = [f"bench-user-{number:02d}" for number in range(1, count + 1)]
    for name in names:
        bench.create_user(name, USER_PASSWORD)
    bench.say(f"  {count} users created ({time.monotonic() - started:.0f} s)")
    log = StepLog()
    # Users arrive one after another over the first sixth of the time, not all at one instant.
    ramp = seconds / 6
    deadline = time.monotonic() + seconds

    def user(number: int) -> int:
        time.sleep(ramp * number / count)
        return SimulatedUser(bench, log, names[number], seed=number).run(deadline)

    before = bench.processes.cpu()
    with ThreadPoolExecutor(count, thread_name_prefix="user") as pool:
        searches = sum(pool.map(user, range(count)))
    after = bench.processes.cpu()
    errors = sum(log.errors.values())
    bench.report.check(
        "users", f"{count} users for {seconds:.0f} s: no errors", errors == 0, "; ".join(log.messages)
    )
    for step in USER_STEPS:
        latencies = log.latencies[step]
        median = percentile(latencies, 0.5) if latencies else None
        bench.report.add(
            Row(
                "users",
                f"{step}: p95 ({len(latencies)} done, median {format_seconds(median)})",
                None,
                percentile(latencies, 0.95) if latencies else None,
                log.errors[step],
                Target("errors"),
                runs=len(latencies),
                detail={"median": median, "errors": log.errors[step]},
            )
        )
    bench.report.archive["users"] = {
        "users": count,
        "seconds": seconds,
        "searches": searches,
        "cpu_seconds": {role: round(after[role] - before[role], 2) for role in after},
    }


# ---- 6. growth -------------------------------------------------------------------------------


def load_filler(bench: Bench, total: int) -> None:
    """Add one-instance studies (``GROW-*``) until the archive holds ``total`` studies."""
    have = bench.count_studies()
    if have >= total:
        # Studies stored by the scenarios before (the upload's, say) must be in the catalog too.
        bench.stack.wait_for_catalog(timeout=600)
        return
    start = len(bench.find("Study", {"PatientID": "GROW-*"}, expand=False))
    wanted = total - have
    started = time.monotonic()
    first_day = dt.date(1995, 1, 1)
    days = (dt.date.today() - first_day).days

    def bodies() -> Iterator[bytes]:
        for index in range(start, start + wanted):
            yield data.encode(data.small_study(index, group="GROW", first_day=first_day, days=days)[1])
            if (index - start + 1) % 5000 == 0:
                bench.say(f"    {index - start + 1:,} of {wanted:,} stored")

    data.post_files(bench.orthanc, bench.stack.orthanc_url, bodies(), deadline=time.monotonic() + 3600)
    bench.stack.wait_for_catalog(timeout=3600)
    elapsed = time.monotonic() - started
    bench.say(f"  archive grown to {total:,} studies: {wanted:,} stored in {elapsed:.0f} s")
    bench.report.archive.setdefault("loading", []).append(
        {"studies": total, "added": wanted, "seconds": round(elapsed, 1)}
    )


def run_growth(bench: Bench) -> None:
    bench.page_group  # noqa: B018 - the 1,000-study answer must be there from the first size
    queries, criteria = one_result_queries(bench, 20)
    page = f"page of {len(bench.page_group):,}"
    for size in sorted(bench.scale.sizes):
        load_filler(bench, size)
        studies = bench.count_studies()
        label = f"{studies:,} studies"
        measures = (
            ("one result", queries, criteria, max(bench.scale.repeat, min(20, bench.scale.search_rounds))),
            (page, [{"PatientID": "PAGE-*"}], [{"patient_id": "PAGE-*"}], bench.scale.repeat),
            ("all studies, page 1", [{}], [{}], bench.scale.repeat),
        )
        for measure, direct_queries, portal_criteria, repeat in measures:
            direct, portal = search_actions(bench, direct_queries, portal_criteria)
            if measure == "all studies, page 1":
                direct = all_studies_action(bench)
            comparison = bench.compare("growth", f"{label}: {measure}", direct, portal, repeat=repeat)
            bench.row(
                "growth",
                f"{label}: {measure}",
                comparison,
                None,
                detail={"studies": studies, "measure": measure},
                note="direct: the full expanded find, which the portal avoids"
                if measure.startswith("all")
                else "",
            )


def all_studies_action(bench: Bench):
    """Every study, expanded, in one find: what a naive portal would read for page 1 of everything.

    The portal instead walks study date windows (control.query.finder); both must show the same page.
    """

    def direct(_round: int) -> Answer:
        return find_answer(bench, {"Level": "Study", "Query": {}, "Expand": True})

    return direct


# ---- 8. activity (7., the catalog, is bench.catalog) ----------------------------------------------

ACTIVITY_PAGE_BUDGET = 0.5  # seconds for one page of the admin's activity lists
ACTIVITY_CSV_BUDGET = 10.0  # seconds for one user's whole CSV export


def run_activity(bench: Bench) -> None:
    """The admin's activity pages over a log of years (millions of rows written straight in).

    Last of the scenarios: the rows stay in the stack's log. Each page is asked ``repeat`` times
    (at least 5); the median must stay within the page budget, whatever the log's size.
    """
    from bench import activity

    count = bench.scale.activity_rows
    started = time.monotonic()
    activity.fill(bench.stack.data / "control.sqlite3", count)
    bench.say(f"  activity log: {count:,} rows written ({time.monotonic() - started:.0f} s)")
    with sqlite3.connect(bench.stack.data / "control.sqlite3") as connection:
        refused_from = connection.execute(
            "SELECT client_address FROM activity WHERE outcome != 'ok' ORDER BY id DESC LIMIT 1"
        ).fetchone()[0]
    admin = bench.signed_in()
    today = dt.date.today()
    month = {
        "date_from": (today - dt.timedelta(days=400)).isoformat(),
        "date_to": (today - dt.timedelta(days=370)).isoformat(),
    }
    pages = (
        ("web users' activity, page 1", {}),
        ("web users' activity, page 150", {"page": "150"}),
        ("filtered by user", {"user": activity.username(42)}),
        ("filtered by action and a month a year ago", {"action": "upload", **month}),
        ("filtered by client address", {"address": activity.address(17)}),
        ("patients' access by token, page 1", {"list": "tokens"}),
        ("refused connections by address, a month", {"list": "refused", **month}),
        ("refused connections by address, all time", {"list": "refused"}),
        ("refused from one address", {"list": "refused", "address": refused_from}),
    )
    runs = max(5, bench.scale.repeat)
    for name, query in pages:
        seconds = []
        for _round in range(runs + 1):  # the first is a warm-up
            begun = time.perf_counter()
            response = admin.get(f"{bench.stack.url}/admin/activity", params=query, timeout=300)
            seconds.append(time.perf_counter() - begun)
            expect(response)
        bench.report.check(
            "activity",
            f"{name}: the page lists events",
            'class="outcome-' in response.text or "<td>" in response.text,
        )
        median = statistics.median(seconds[1:])
        bench.report.add(
            Row("activity", name, None, median, median, Target("within", ACTIVITY_PAGE_BUDGET), runs=runs)
        )
    begun = time.perf_counter()
    with admin.get(
        f"{bench.stack.url}/admin/activity.csv",
        params={"user": activity.username(42)},
        stream=True,
        timeout=600,
    ) as response:
        expect(response)
        lines = sum(chunk.count(b"\n") for chunk in response.iter_content(256 * 1024))
    seconds = time.perf_counter() - begun
    bench.report.check(
        "activity", "one user's CSV export holds that user's rows", lines > 1, f"{lines - 1} rows"
    )
    bench.report.add(
        Row(
            "activity",
            f"CSV export of one user ({lines - 1:,} rows)",
            None,
            seconds,
            seconds,
            Target("within", ACTIVITY_CSV_BUDGET),
            runs=1,
        )
    )
    bench.report.archive["activity_rows"] = count


SCENARIOS: dict[str, Callable[[Bench], None]] = {
    "zip": run_zip,
    "search": run_search,
    "viewer": run_viewer,
    "upload": run_upload,
    "users": run_users,
    "growth": run_growth,
    "catalog": catalog.run_catalog,
    "activity": run_activity,
    "nodes": run_nodes,
}


def describe_archive(bench: Bench) -> dict[str, Any]:
    statistics = bench.orthanc_get("/statistics")
    system = bench.orthanc_get("/system")
    return {
        "studies": int(statistics["CountStudies"]),
        "instances": int(statistics["CountInstances"]),
        "disk_mb": round(int(statistics["TotalDiskSize"]) / MB),
        "orthanc": system.get("Version"),
        "dicomweb_plugin": bench.orthanc_get("/plugins/dicom-web").get("Version"),
    }
