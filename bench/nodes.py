"""The ``nodes`` scenario: two archive nodes and two control planes on one PostgreSQL.

It starts a PostgreSQL server of its own (``bench.postgres``) and a second portal on it with
``./pacs up --nodes 2``, beside the benchmark's single-node stack, then measures:

- **Stores by C-STORE**, four associations at once: all to the first node (one writer, the
  portal's choice) against two to each node (two writers), with the serialization conflicts
  PostgreSQL logged for each ("could not serialize access") and the stores that failed.
- **Stores through the portal**: a zip upload to one control plane, against two uploads of half
  as many files at once (Caddy gives each to a control plane; both store on the writer).
- **A zip and the viewer through the balancer** (Caddy in front of two control planes and two
  archive nodes) against the same on the single-node stack: what the balancing costs.
- **The catalog feeder's lag** on the PostgreSQL index at 120 stores a second, measured as the
  catalog scenario measures it on SQLite (``bench.catalog.run_lag``).

Small sizes (``Scale``): the machine is shared. The figures are a run's, not targets.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
import urllib3
from pydicom import Dataset
from pynetdicom import AE

from bench import catalog, clients, data
from bench.clients import Refused, expect
from bench.measure import Answer
from bench.postgres import PostgresServer, binaries
from bench.stack import ADMIN_PASSWORD, Stack, free_port, free_ports, stack_environment

if TYPE_CHECKING:
    from bench.scenarios import Bench

NODES = 2
ASSOCIATIONS = 4
UPLOADER = "bench-nodes-uploader"
UPLOADER_PASSWORD = "bench nodes uploader password"  # noqa: S105 - a throwaway stack's
FIRST_DAY = dt.date(2020, 1, 1)  # the small studies' dates: a year from here


def zipped(bodies: list[bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for number, body in enumerate(bodies):
            archive.writestr(f"files/{number:05d}.dcm", body)
    return buffer.getvalue()


def start_cluster(folder: Path, postgres: PostgresServer, say: Callable[[str], None]) -> Stack:
    """A portal with two archive nodes and two control planes on ``postgres``."""
    url = postgres.create_database("pacs")
    web, dicom, orthanc = free_port(), free_ports(NODES), free_ports(NODES)
    env = stack_environment(
        web,
        dicom,
        orthanc,
        PACS_INSTITUTION="Benchmark Hospital",
        PACS_ADMIN_PASSWORD=ADMIN_PASSWORD,
        PACS_DATABASE_URL=url,
        PACS_NODES=str(NODES),
    )
    stack = Stack(folder, web, dicom, orthanc, env=env)
    started = time.monotonic()
    stack.start()
    seconds = time.monotonic() - started
    say(f"  two archive nodes and two control planes on PostgreSQL ({seconds:.0f} s to start)")
    return stack


def conflicts(postgres: PostgresServer) -> int:
    """Serialization failures PostgreSQL has logged so far (the index plugin's SERIALIZABLE writes)."""
    return postgres.log.read_text(errors="replace").count("could not serialize access")


def store_datasets(ports: list[int], datasets: list[Dataset]) -> tuple[int, int]:
    """C-STORE ``datasets`` over ``ASSOCIATIONS`` associations, spread over ``ports``; (stored, failed)."""
    contexts = sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets})

    def send(number: int) -> tuple[int, int]:
        ae = AE(ae_title=f"BENCH{number}")
        ae.dimse_timeout = 60
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, syntax)
        association = ae.associate("127.0.0.1", ports[number % len(ports)], ae_title="ORTHANC")
        if not association.is_established:
            raise Refused("the archive refused the association")
        stored = failed = 0
        try:
            for dataset in datasets[number::ASSOCIATIONS]:
                answer = association.send_c_store(dataset)
                if "Status" in answer and answer.Status == 0:
                    stored += 1
                else:
                    failed += 1
        finally:
            association.release()
        return stored, failed

    with ThreadPoolExecutor(ASSOCIATIONS) as pool:
        counts = list(pool.map(send, range(ASSOCIATIONS)))
    return sum(stored for stored, _ in counts), sum(failed for _, failed in counts)


def run_nodes(bench: Bench) -> None:
    if binaries() is None:
        bench.report.check("nodes", "PostgreSQL is installed (Debian package postgresql)", False)
        return
    folder = Path(tempfile.mkdtemp(prefix="pacs-bench-nodes-"))
    postgres = PostgresServer(free_port())
    postgres.start()
    cluster = None
    try:
        cluster = start_cluster(folder / "stack", postgres, bench.say)
        stores(bench, cluster, postgres)
        uploads(bench, cluster, postgres)
        balanced_reads(bench, cluster)
        # A PostgreSQL index stores about 120 a second here: the feeder must keep up with that
        # (a smoke run's scale asks less).
        rate = min(120, max(bench.scale.lag_rates))
        catalog.run_lag(_bench_on(bench, cluster), (rate,), scenario="nodes", where=", PostgreSQL index")
    finally:
        if cluster is not None:
            cluster.stop()
        postgres.stop()
        shutil.rmtree(folder, ignore_errors=True)


def stores(bench: Bench, cluster: Stack, postgres: PostgresServer) -> None:
    count = bench.scale.upload_slices * 2
    made: dict[str, list[Dataset]] = {}
    outcome: dict[str, dict[str, int]] = {}

    def way(name: str, ports: list[int]):
        def action(round_number: int) -> Answer:
            datasets = made.pop(f"{name}{round_number}")
            before = conflicts(postgres)
            stored, failed = store_datasets(ports, datasets)
            seen = outcome.setdefault(name, {"conflicts": 0, "failed": 0, "stores": 0})
            if round_number >= 0:
                seen["conflicts"] += conflicts(postgres) - before
                seen["failed"] += failed
                seen["stores"] += len(datasets)
            return Answer(f"{stored + failed} sent")

        return action

    rounds = range(-1, bench.scale.repeat)
    for name in ("one", "two"):
        for round_number in rounds:
            made[f"{name}{round_number}"] = [
                data.small_study(
                    index, group=f"N{name}{round_number}", first_day=dt.date(2020, 1, 1), days=365
                )[1]
                for index in range(count)
            ]
    nodes = [cluster.dicom_port, cluster.dicom_port + 1]
    comparison = bench.compare(
        "nodes",
        f"C-STORE of {count} instances",
        way("one", nodes[:1]),
        way("two", nodes),
        processes=None,
    )
    one, two = outcome["one"], outcome["two"]
    bench.row(
        "nodes",
        f"C-STORE, {ASSOCIATIONS} associations: one writer (direct) against two (portal)",
        comparison,
        None,
        note=(
            f"stores/s: {count / comparison.median('direct'):.0f} with one writer, "
            f"{count / comparison.median('portal'):.0f} with two; PostgreSQL conflicts "
            f"{one['conflicts']} and {two['conflicts']}, failed stores {one['failed']} and {two['failed']} "
            f"(of {one['stores']} each)"
        ),
        detail={"one_writer": one, "two_writers": two},
    )


def uploads(bench: Bench, cluster: Stack, postgres: PostgresServer) -> None:
    from control import accounts, db

    engine = db.make_engine(cluster.env["PACS_DATABASE_URL"])
    with engine.begin() as connection:
        if accounts.find_by_username(connection, UPLOADER) is None:
            accounts.create_user(connection, UPLOADER, UPLOADER_PASSWORD, can_upload=True)
    engine.dispose()
    files = bench.scale.upload_slices * 2
    # Small files (8x8 pixels): what is measured is each store's way to the index, not the bytes.
    zips: dict[str, list[bytes]] = {}
    for round_number in range(-1, bench.scale.repeat):
        for name, parts in (("one", 1), ("two", 2)):
            bodies = [
                data.encode(
                    data.small_study(index, group=f"U{name}{round_number}", first_day=FIRST_DAY, days=365)[1]
                )
                for index in range(files)
            ]
            zips[f"{name}{round_number}"] = [zipped(bodies[part::parts]) for part in range(parts)]
    sessions = [clients.sign_in(cluster.url, UPLOADER, UPLOADER_PASSWORD)[0] for _ in range(2)]
    tokens = [clients.csrf_token(expect(session.get(f"{cluster.url}/")).text) for session in sessions]
    seen = {"one": 0, "two": 0}

    def post(number: int, body: bytes) -> int:
        answer = expect(
            sessions[number].post(
                f"{cluster.url}/upload/files",
                files=[("files", (f"part-{number}.zip", body, "application/zip"))],
                headers={"Accept": "application/json", "X-CSRFToken": tokens[number]},
                timeout=900,
            )
        )
        return sum(1 for row in answer.json()["results"] if row["outcome"] in ("stored", "duplicate"))

    def way(name: str):
        def action(round_number: int) -> Answer:
            before = conflicts(postgres)
            parts = zips[f"{name}{round_number}"]
            with ThreadPoolExecutor(len(parts)) as pool:
                stored = sum(pool.map(post, range(len(parts)), parts))
            if round_number >= 0:
                seen[name] += conflicts(postgres) - before
            return Answer(f"{stored} stored")

        return action

    comparison = bench.compare(
        "nodes", f"portal uploads of {files} files", way("one"), way("two"), processes=None
    )
    bench.row(
        "nodes",
        f"uploads of {files} files: one upload (direct) against two halves at once (portal)",
        comparison,
        None,
        note=(
            f"stores/s: {files / comparison.median('direct'):.0f} and "
            f"{files / comparison.median('portal'):.0f}; PostgreSQL conflicts {seen['one']} and "
            f"{seen['two']} (both to the writer, through two control planes)"
        ),
        detail={"conflicts": seen},
    )


def balanced_reads(bench: Bench, cluster: Stack) -> None:
    """A zip and the viewer through the balancer against one archive node asked directly, as the
    zip and viewer scenarios compare a single node; then against the single-node stack's portal
    (SQLite), which tells what the PostgreSQL index and the balancing cost together."""
    from bench.scenarios import Browser, patient_grant, viewer_action

    slices = bench.scale.zip_series[0]
    plan = data.study_plan(9500, "CT balanced", (("Axial", slices),))
    paths = data.write_study(plan, bench.work / "nodes-reads")
    ids: dict[str, str] = {}
    for stack in (bench.stack, cluster):
        data.post_files(stack.orthanc(), stack.orthanc_url, paths, deadline=time.monotonic() + 600)
        found = expect(stack.orthanc().post(f"{stack.orthanc_url}/tools/lookup", data=plan.study_uid)).json()
        ids[stack.url] = next(item["ID"] for item in found if item["Type"] == "Study")
    # The stores before left the archive watcher thousands of new studies to look at: reads are
    # measured once it has caught up, as on a site between bursts.
    caught_up(cluster, bench.say)
    folder = bench.work / "nodes-downloads"
    folder.mkdir(exist_ok=True)
    single_session = bench.signed_in()
    cluster_session = clients.sign_in(cluster.url, "admin", ADMIN_PASSWORD)[0]

    def download(session: requests.Session, url: str, name: str):
        def action(round_number: int) -> Answer:
            path = folder / f"{name}-{round_number}.zip"
            started = time.perf_counter()
            with path.open("wb") as sink:
                first, _size = clients.stream_to(session.get(url, stream=True, timeout=900), sink, started)

            def digest() -> str:
                try:
                    return clients.zip_files_digest(path)
                finally:
                    path.unlink()

            return Answer(digest, first)

        return action

    balanced = download(
        cluster_session, f"{cluster.url}/query/studies/{ids[cluster.url]}/archive", "balanced"
    )
    node = download(cluster.orthanc(), f"{cluster.orthanc_url}/studies/{ids[cluster.url]}/archive", "node")
    single = download(
        single_session, f"{bench.stack.url}/query/studies/{ids[bench.stack.url]}/archive", "single"
    )
    size = f"{slices}-slice study"
    zipped = bench.compare("nodes", "zip: one node directly, the balancer", node, balanced)
    bench.row(
        "nodes",
        f"zip of a {size}: one node's /archive (direct) against the balancer (portal)",
        zipped,
        None,
        note="Orthanc deflates its zip on one core; the portal's is the stored files (see zip)",
    )
    against_single = bench.compare("nodes", "zip: the single-node portal, the balancer", single, balanced)
    bench.row(
        "nodes",
        f"zip of a {size}: the single-node portal (direct) against the balancer (portal)",
        against_single,
        None,
        note="the same request; the single-node archive's index is SQLite, the nodes' PostgreSQL",
    )

    threads = bench.scale.viewer_threads
    study = _viewer_study(plan, ids, cluster)
    as_patient = {}
    for stack in (bench.stack, cluster):
        cookies = patient_grant(_bench_on(bench, stack), ids[stack.url])
        as_patient[stack.url] = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())}
    as_orthanc_client = urllib3.make_headers(basic_auth=":".join(cluster.orthanc_auth))
    repeat = 3 * bench.scale.repeat
    with (
        Browser(threads, cluster.orthanc_url, as_orthanc_client) as direct,
        Browser(threads, cluster.url, as_patient[cluster.url]) as through,
        Browser(threads, bench.stack.url, as_patient[bench.stack.url]) as one,
    ):
        viewed = bench.compare(
            "nodes",
            "viewer: one node directly, the balancer",
            viewer_action(direct, study, cluster.orthanc_url),
            viewer_action(through, study, cluster.url),
            repeat=repeat,
        )
        against_one = bench.compare(
            "nodes",
            "viewer: the single-node portal, the balancer",
            viewer_action(one, study, bench.stack.url),
            viewer_action(through, study, cluster.url),
            repeat=repeat,
        )
    bench.row(
        "nodes",
        f"viewer, {slices}-slice series: one node's DICOMweb (direct) against the balancer (portal)",
        viewed,
        None,
        note="metadata from the nodes through Caddy, frames through the control planes",
    )
    bench.row(
        "nodes",
        f"viewer, {slices}-slice series: the single-node portal (direct) against the balancer (portal)",
        against_one,
        None,
        note="the same loads; the single-node archive's index is SQLite",
    )


def caught_up(cluster: Stack, say: Callable[[str], None], timeout: float = 600) -> None:
    """Wait until the archive watcher has read every change the archive logged so far."""
    from control import db

    last = expect(cluster.orthanc().get(f"{cluster.orthanc_url}/changes", params={"last": ""})).json()["Last"]
    engine = db.make_engine(cluster.env["PACS_DATABASE_URL"])
    started = time.monotonic()
    try:
        while True:
            with engine.connect() as connection:
                state = json.loads(db.get_archive_state(connection, "watch") or "{}")
            if state.get("changes", 0) >= last:
                break
            if time.monotonic() - started > timeout:
                raise Refused(f"the archive watcher did not reach change {last}: {state.get('changes')}")
            time.sleep(0.5)
    finally:
        engine.dispose()
    say(f"  the archive watcher read {last} changes ({time.monotonic() - started:.0f} s waited)")


def _bench_on(bench: Bench, stack: Stack) -> Bench:
    from bench.scenarios import Bench as BenchOf

    return bench if stack is bench.stack else BenchOf(stack, bench.scale, bench.report, bench.work, bench.say)


def _viewer_study(plan: data.StudyPlan, ids: dict[str, str], cluster: Stack) -> Any:
    from bench.scenarios import LargeStudy

    orthanc = cluster.orthanc()
    series = expect(
        orthanc.post(
            f"{cluster.orthanc_url}/tools/find",
            json={"Level": "Series", "Query": {"StudyInstanceUID": plan.study_uid}, "Expand": True},
        )
    ).json()[0]
    instances = expect(orthanc.get(f"{cluster.orthanc_url}/series/{series['ID']}/instances")).json()
    instances.sort(key=lambda instance: int(instance["MainDicomTags"].get("InstanceNumber", 0)))
    return LargeStudy(
        ids[cluster.url],
        plan.study_uid,
        series["MainDicomTags"]["SeriesInstanceUID"],
        [instance["MainDicomTags"]["SOPInstanceUID"] for instance in instances],
        0,
    )
