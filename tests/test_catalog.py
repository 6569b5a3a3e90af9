"""The study catalog through the real stack: fed by the archive's change log, rebuilt, checked.

A stack of this module's own: studies stored by C-STORE (pynetdicom, as a modality), by the
upload page and straight into Orthanc's REST API (many at once), deleted and modified there, and
the catalog's feeder killed and doubled. Every expectation is the archive's own answer: the
catalog must list exactly the studies Orthanc holds, each change of Orthanc's log applied once.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from bench import data
from control import accounts, db
from control.catalog import tables

from conftest import REPOSITORY, Stack, c_store, csrf_token, free_port, fresh_study, make_stack
from postgres import PostgresServer, binaries

pytestmark = pytest.mark.stack

# The rebuild compares a fed catalog with a rebuilt one over this many studies: enough for many
# batches of the log and pages of the build, few enough to store in seconds.
REBUILD_STUDIES = 2000
UPLOADER = ("catalog.uploader", "uploads into the catalog 1")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = make_stack(tmp_path_factory.mktemp("catalog"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def engine_of(stack: Stack) -> sa.Engine:
    return db.make_engine(stack.database_url)


def catalog_ids(stack: Stack) -> set[str]:
    engine = engine_of(stack)
    try:
        with engine.connect() as connection:
            return set(connection.execute(sa.select(tables.studies.c.study_id)).scalars())
    finally:
        engine.dispose()


def catalog_rows(stack: Stack) -> dict[str, tuple]:
    """Every row as the catalog holds it (its columns but the row's own id), with its searched
    modalities."""
    columns = [column for column in tables.studies.c if column.name not in ("id", "swept")]
    engine = engine_of(stack)
    try:
        with engine.connect() as connection:
            modalities: dict[str, set[str]] = {}
            held = sa.select(tables.studies.c.study_id, tables.modalities.c.modality).join(
                tables.modalities, tables.modalities.c.study_row == tables.studies.c.id
            )
            for study_id, modality in connection.execute(held):
                modalities.setdefault(study_id, set()).add(modality)
            return {
                row.study_id: (*row, frozenset(modalities.get(row.study_id, ())))
                for row in connection.execute(sa.select(*columns))
            }
    finally:
        engine.dispose()


def archive_ids(stack: Stack) -> set[str]:
    return set(stack.orthanc().get(f"{stack.orthanc_url}/studies", timeout=60).json())


def last_change(stack: Stack) -> int:
    return stack.orthanc().get(f"{stack.orthanc_url}/changes", params={"last": ""}, timeout=30).json()["Last"]


def changes_logged(stack: Stack, after: int, upto: int) -> int:
    """How many changes the archive's log holds with a sequence number in (after, upto]."""
    session, counted, since = stack.orthanc(), 0, after
    while True:
        answer = session.get(
            f"{stack.orthanc_url}/changes", params={"since": str(since), "limit": "1000"}, timeout=60
        ).json()
        within = [change for change in answer["Changes"] if change["Seq"] <= upto]
        counted += len(within)
        if answer["Done"] or len(within) < len(answer["Changes"]) or not answer["Changes"]:
            return counted
        since = answer["Changes"][-1]["Seq"]


def store_many(stack: Stack, count: int, group: str) -> None:
    """``count`` one-instance studies straight into the archive, four at a time (bench's loader)."""
    first_day = dt.date(2001, 1, 1)
    bodies = (
        data.encode(data.small_study(index, group=group, first_day=first_day, days=6000)[1])
        for index in range(count)
    )
    assert data.post_files(stack.orthanc(), stack.orthanc_url, bodies) == count


def feeder_pid(stack: Stack) -> int:
    return int((stack.data / "run" / "catalog.pid").read_text())


def wait_until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.2)


def search(session: requests.Session, stack: Stack, path: str = "/query/studies", **params: str) -> dict:
    answer = session.get(f"{stack.url}{path}", params={"format": "json", "per_page": "200", **params})
    assert answer.status_code == 200, answer.text[:500]
    return answer.json()


def test_stores_by_c_store_and_by_upload_appear_in_the_catalog_and_its_searches(stack: Stack) -> None:
    modality = fresh_study("CT_small.dcm", patient_id="CAT-CSTORE", patient_name="Stored^ByModality")
    assert c_store(stack, modality) == 0x0000
    with engine_of(stack).begin() as connection:
        accounts.create_user(connection, *UPLOADER, can_upload=True)
    uploader = stack.sign_in(*UPLOADER)
    token = csrf_token(uploader.get(f"{stack.url}/").text)
    uploaded = fresh_study("MR_small.dcm", patient_id="CAT-UPLOAD", patient_name="Stored^ByUpload")
    body = io.BytesIO()
    uploaded.save_as(body)
    answer = uploader.post(
        f"{stack.url}/upload/files",
        files=[("files", ("mr.dcm", body.getvalue()))],
        headers={"Accept": "application/json", "X-CSRFToken": token},
    )
    assert answer.status_code == 200, answer.text[:500]

    stack.wait_for_catalog()
    assert archive_ids(stack) == catalog_ids(stack)
    session = stack.sign_in()
    found = search(session, stack, patient_name="stored")
    assert found["source"] == "catalog"
    assert {row["patient"]["patient_id"]: row["modalities"] for row in found["rows"]} == {
        "CAT-CSTORE": ["CT"],
        "CAT-UPLOAD": ["MR"],
    }
    row = next(row for row in found["rows"] if row["patient"]["patient_id"] == "CAT-CSTORE")
    statistics = stack.orthanc().get(f"{stack.orthanc_url}/studies/{row['id']}/statistics").json()
    assert (row["instances_count"], row["size"]) == (1, int(statistics["DicomUncompressedSize"]))


def test_a_series_added_a_moment_ago_shows_on_its_patients_page_before_the_feeder_applies_it(
    stack: Stack,
) -> None:
    """A report attached, a late series: one patient's list compares the catalog with the archive
    (one GET) while changes wait, and answers from the archive when they differ."""
    first = fresh_study("CT_small.dcm", patient_id="CAT-LATE-SERIES")
    assert c_store(stack, first) == 0x0000
    stack.wait_for_catalog()
    session = stack.sign_in()
    (before,) = search(session, stack, patient_id="CAT-LATE-SERIES")["rows"]
    assert before["series_count"] == 1
    later = fresh_study("MR_small.dcm", patient_id="CAT-LATE-SERIES")
    later.StudyInstanceUID = first.StudyInstanceUID
    feeder = feeder_pid(stack)
    os.kill(feeder, signal.SIGSTOP)
    try:
        assert c_store(stack, later) == 0x0000
        answer = search(session, stack, patient_id="CAT-LATE-SERIES")
        patient = search(session, stack, f"/query/patients/{before['patient']['id']}/studies")
    finally:
        os.kill(feeder, signal.SIGCONT)
    assert answer["source"] == "archive" and answer["notice"] is None
    assert [(row["id"], row["series_count"]) for row in answer["rows"]] == [(before["id"], 2)]
    assert patient["source"] == "archive" and patient["rows"][0]["series_count"] == 2
    stack.wait_for_catalog()
    again = search(session, stack, patient_id="CAT-LATE-SERIES")
    (row,) = again["rows"]
    assert again["source"] == "catalog" and row["modalities"] == ["CT", "MR"]
    # The series came alone, its study known to the feeder only through it; the size is that of
    # both series' files, as the archive counts it.
    statistics = stack.orthanc().get(f"{stack.orthanc_url}/studies/{before['id']}/statistics").json()
    assert (row["instances_count"], row["size"]) == (2, int(statistics["DicomUncompressedSize"]))


def test_a_study_deleted_from_the_archive_leaves_the_catalog(stack: Stack) -> None:
    made = fresh_study("CT_small.dcm", patient_id="CAT-DELETED", patient_name="Soon^Deleted")
    assert c_store(stack, made) == 0x0000
    stack.wait_for_catalog()
    session = stack.sign_in()
    (row,) = search(session, stack, patient_id="CAT-DELETED")["rows"]
    # The archive's log does not report deletions: the feeder notices the archive's count drop.
    assert stack.orthanc().delete(f"{stack.orthanc_url}/studies/{row['id']}").status_code == 200

    wait_until(lambda: row["id"] not in catalog_ids(stack), "the deleted study's row going")
    stack.wait_for_catalog()
    answer = search(session, stack, patient_name="soon deleted")
    assert answer["source"] == "catalog" and answer["rows"] == [] and answer["total"] == 0
    assert archive_ids(stack) == catalog_ids(stack)
    assert stack.catalog_state().studies == len(archive_ids(stack))


def test_a_modified_patient_name_is_found_by_its_new_name(stack: Stack) -> None:
    made = fresh_study("MR_small.dcm", patient_id="CAT-RENAMED", patient_name="Before^Renaming")
    assert c_store(stack, made) == 0x0000
    stack.wait_for_catalog()
    session = stack.sign_in()
    (before,) = search(session, stack, patient_name="before renaming")["rows"]
    modified = stack.orthanc().post(
        f"{stack.orthanc_url}/studies/{before['id']}/modify",
        json={"Replace": {"PatientName": "Après^Renommage"}, "Force": True, "KeepSource": False},
    )
    assert modified.status_code == 200, modified.text

    wait_until(
        lambda: search(session, stack, patient_name="apres renommage")["rows"], "the new name being found"
    )
    (after,) = search(session, stack, patient_name="apres renommage")["rows"]
    assert after["patient"]["name"] == "Après^Renommage" and after["id"] == modified.json()["ID"]
    wait_until(lambda: before["id"] not in catalog_ids(stack), "the original's row going")
    assert search(session, stack, patient_name="before renaming")["rows"] == []


def test_a_feeder_killed_mid_feed_resumes_without_missing_or_doubling_a_change(stack: Stack) -> None:
    stack.wait_for_catalog()
    start = stack.catalog_state()
    feeder = feeder_pid(stack)
    os.kill(feeder, signal.SIGSTOP)  # a backlog, so that the kill lands while the feeder works
    try:
        store_many(stack, 300, "KILLED")
    finally:
        os.kill(feeder, signal.SIGCONT)
    wait_until(lambda: stack.catalog_state().applied_seq > start.applied_seq, "the feeder applying a batch")
    behind = stack.catalog_state()
    os.kill(feeder, signal.SIGKILL)
    assert behind.applied_seq < last_change(stack), "the feeder had caught up before it was killed"

    wait_until(lambda: feeder_pid(stack) != feeder, "the runner starting the feeder again")
    stack.wait_for_catalog()
    end = stack.catalog_state()
    assert archive_ids(stack) == catalog_ids(stack)
    assert end.applied_changes - start.applied_changes == changes_logged(
        stack, start.applied_seq, end.applied_seq
    )
    assert end.feeder.endswith(f"pid {feeder_pid(stack)}")


def test_a_second_feeder_waits_and_takes_over_when_the_first_dies(stack: Stack) -> None:
    stack.wait_for_catalog()
    start = stack.catalog_state()
    log = stack.data / "logs" / "second-feeder.log"
    with log.open("wb") as output:
        second = subprocess.Popen(
            [sys.executable, "-m", "control", "--data", str(stack.data), "catalog", "feed"],
            cwd=REPOSITORY,
            env=stack.env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "waiting to take over" in log.read_text(), "the second feeder waiting")
        os.kill(feeder_pid(stack), signal.SIGKILL)
        wait_until(lambda: "lock taken" in log.read_text(), "the second feeder taking over")
        store_many(stack, 100, "SECOND")
        stack.wait_for_catalog()
        end = stack.catalog_state()
        assert end.feeder.endswith(f"pid {second.pid}")
        assert archive_ids(stack) == catalog_ids(stack)
        assert end.applied_changes - start.applied_changes == changes_logged(
            stack, start.applied_seq, end.applied_seq
        )
    finally:
        second.terminate()
        second.wait(30)
    # The runner's own feeder, started again meanwhile, takes over from the second.
    wait_until(
        lambda: stack.catalog_state().feeder.endswith(f"pid {feeder_pid(stack)}"),
        "the runner's feeder feeding",
    )


def test_a_rebuild_gives_the_same_rows_as_the_fed_catalog(stack: Stack) -> None:
    store_many(stack, REBUILD_STUDIES, "REBUILD")
    stack.wait_for_catalog()
    fed = catalog_rows(stack)
    assert len(fed) >= REBUILD_STUDIES and set(fed) == archive_ids(stack)
    session = stack.sign_in()

    rebuild = subprocess.Popen(
        [sys.executable, "-m", "control", "--data", str(stack.data), "catalog", "rebuild"],
        cwd=REPOSITORY,
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: stack.catalog_state().status == "building", "the build starting", timeout=60)
        os.kill(feeder_pid(stack), signal.SIGSTOP)  # hold the build where a page can see it
        try:
            answer = search(session, stack, patient_id="REBUILD-*")
            page = session.get(f"{stack.url}/query/patients", params={"patient_id": "REBUILD-*"})
        finally:
            os.kill(feeder_pid(stack), signal.SIGCONT)
        assert answer["source"] == "archive" and "being built" in answer["notice"]
        assert answer["total"] == REBUILD_STUDIES  # the archive's answer meanwhile, complete
        assert "The study catalog is being built" in page.text
        output, _ = rebuild.communicate(timeout=600)
    finally:
        if rebuild.poll() is None:
            rebuild.kill()
    assert rebuild.returncode == 0, output
    assert f"holds {len(fed):,} studies" in output
    stack.wait_for_catalog()
    assert catalog_rows(stack) == fed
    assert search(session, stack, patient_id="REBUILD-*")["source"] == "catalog"


def test_catalog_check_finds_a_row_removed_by_hand_and_one_changed(stack: Stack) -> None:
    stack.wait_for_catalog()
    clean = stack.pacs("catalog", "check", "--quick")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "studies missing from the catalog: 0" in clean.stdout

    removed, changed = sorted(catalog_ids(stack))[:2]
    engine = engine_of(stack)
    with engine.begin() as connection:
        connection.execute(tables.studies.delete().where(tables.studies.c.study_id == removed))
        connection.execute(
            tables.studies.update().where(tables.studies.c.study_id == changed).values(description="edited")
        )
    engine.dispose()

    quick = stack.pacs("catalog", "check", "--quick")
    assert quick.returncode == 1
    assert "studies missing from the catalog: 1" in quick.stdout and f"  {removed}" in quick.stdout
    full = stack.pacs("catalog", "check")
    assert full.returncode == 1
    assert f"  {changed}: description" in full.stdout
    assert "rows that differ from the archive: 1 of" in full.stdout

    assert stack.pacs("catalog", "rebuild").returncode == 0
    assert stack.pacs("catalog", "check").returncode == 0
    status = stack.pacs("catalog", "status")
    assert status.returncode == 0
    assert "status:       ready" in status.stdout
    assert f"studies:      {len(archive_ids(stack)):,} studies of" in status.stdout


@pytest.mark.skipif(binaries() is None, reason="PostgreSQL is not installed")
def test_two_control_planes_on_postgresql_feed_once_between_them(tmp_path: Path) -> None:
    """Two machines' feeders on one PostgreSQL database: one feeds, the other takes over at once
    when the first is killed, and every change is applied once between them."""
    postgres = PostgresServer(free_port())
    postgres.start()
    first = make_stack(tmp_path / "first", PACS_DATABASE_URL=postgres.create_database("pacs"))
    second = None
    try:
        first.start()
        # The stack's own feeder holds the lock before the second one starts: else the second may
        # take it first, and nothing would be left for this test to hand over.
        wait_until(
            lambda: (first.catalog_state().feeder or "").endswith(f"pid {feeder_pid(first)}"),
            "the stack's feeder feeding",
        )
        orthanc_user, orthanc_password = first.orthanc_auth
        env = {
            **first.env,
            "PACS_SECRET_ORTHANC_USER": orthanc_user,
            "PACS_SECRET_ORTHANC_PASSWORD": orthanc_password,
        }
        log = tmp_path / "second-feeder.log"
        with log.open("wb") as output:
            second = subprocess.Popen(
                [sys.executable, "-m", "control", "--data", str(tmp_path / "second"), "catalog", "feed"],
                cwd=REPOSITORY,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        first.wait_for_catalog()
        wait_until(lambda: "waiting to take over" in log.read_text(), "the second feeder waiting")
        start = first.catalog_state()
        os.kill(feeder_pid(first), signal.SIGSTOP)
        try:
            store_many(first, 200, "PGFEED")
        finally:
            os.kill(feeder_pid(first), signal.SIGCONT)
        wait_until(lambda: first.catalog_state().applied_seq > start.applied_seq, "the first feeder applying")
        os.kill(feeder_pid(first), signal.SIGKILL)
        wait_until(lambda: "lock taken" in log.read_text(), "the second feeder taking over", timeout=30)
        first.wait_for_catalog()
        end = first.catalog_state()
        assert end.feeder.endswith(f"pid {second.pid}")
        assert archive_ids(first) == catalog_ids(first)
        assert end.applied_changes - start.applied_changes == changes_logged(
            first, start.applied_seq, end.applied_seq
        )
        session = first.sign_in()
        assert search(session, first, patient_id="PGFEED-*")["total"] == 200
    finally:
        if second is not None:
            second.terminate()
            second.wait(30)
        first.stop()
        postgres.stop()
