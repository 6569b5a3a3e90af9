"""The DICOM port against hostile peers: callers from other addresses, under registered AE titles.

The port is open to the network by design, and DICOM has no passwords: a modality is known by its
AE title and the address it calls from. The attacker here is a pynetdicom client bound to another
loopback address (127.0.0.7) that calls itself by a registered modality's AE title (CT1, registered
at 127.0.0.5), or by a title nobody registered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    ModalityWorklistInformationFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from control import db
from control.site import Site

from conftest import ADMIN_PASSWORD, Stack, csrf_token, fresh_study, make_stack

pytestmark = [
    pytest.mark.stack,
    # pynetdicom 3.0.4 leaves the socket of an association the archive aborted unclosed (its
    # shutdown fails on the closed connection and the close after it is skipped).
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in. <socket\.socket:pytest.PytestUnraisableExceptionWarning"
    ),
]

MODALITY_ADDRESS = "127.0.0.5"
ATTACKER_ADDRESS = "127.0.0.7"
SUCCESS_OR_PENDING = (0x0000, 0xFF00, 0xFF01)


@pytest.fixture(scope="module")
def peers_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A portal of this module's own: it changes who may store, which the other tests rely on."""
    running = make_stack(tmp_path_factory.mktemp("peers"))
    running.start()
    yield running
    running.stop()


def admin_submit(stack: Stack, session: requests.Session, data: dict[str, str]) -> requests.Response:
    page = session.get(f"{stack.url}/upload/worklist")
    return session.post(
        f"{stack.url}/upload/worklist/modalities", data={**data, "csrf_token": csrf_token(page.text)}
    )


@pytest.fixture(scope="module")
def peer_study(peers_stack: Stack) -> Dataset:
    """A study in the archive, stored by some modality."""
    study = fresh_study("CT_small.dcm", patient_id="PEER-1")
    assert store(peers_stack, study, "LOADER") == 0
    return study


@pytest.fixture(scope="module")
def registered(peers_stack: Stack, peer_study: Dataset) -> Stack:
    """CT1 registered at 127.0.0.5 by the admin, a study in the archive and a worklist entry."""
    admin = peers_stack.sign_in("admin", ADMIN_PASSWORD)
    answer = admin_submit(peers_stack, admin, {"aet": "CT1", "host": MODALITY_ADDRESS, "port": "104"})
    assert "Saved: the registered modalities may now query the worklist." in answer.text
    entry = Dataset()
    entry.PatientName, entry.PatientID, entry.AccessionNumber = "Peer^Pat", "PEER-1", "ACC-PEER"
    step = Dataset()
    step.Modality, step.ScheduledStationAETitle = "CT", "CT1"
    entry.ScheduledProcedureStepSequence = [step]
    entry.ensure_file_meta()
    entry.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
    entry.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    entry.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    entry.save_as(Site(peers_stack.data).worklists / "peer.wl", enforce_file_format=True)
    return peers_stack


def associate(stack: Stack, ae: AE, aet: str, address: str, **kwargs):
    ae.ae_title = aet
    return ae.associate(
        "127.0.0.1", stack.dicom_port, ae_title=stack.aet, bind_address=(address, 0), **kwargs
    )


def store(stack: Stack, dataset: Dataset, aet: str, address: str = "127.0.0.1") -> int | None:
    """The status of a C-STORE of ``dataset``; None when the archive refused it (it aborts)."""
    ae = AE()
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = associate(stack, ae, aet, address)
    assert association.is_established
    try:
        status = association.send_c_store(dataset)
        return status.Status if status else None
    finally:
        if association.is_established:
            association.release()


def find_studies(stack: Stack, aet: str, address: str) -> list[str] | None:
    """The patient IDs a study-level C-FIND lists; None when refused."""
    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    association = associate(stack, ae, aet, address)
    query = Dataset()
    query.QueryRetrieveLevel, query.PatientID, query.StudyInstanceUID = "STUDY", "", ""
    found = []
    try:
        for status, answer in association.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status or status.Status not in SUCCESS_OR_PENDING:
                return None
            if answer is not None:
                found.append(answer.PatientID)
    finally:
        if association.is_established:
            association.release()
    return found


def find_worklist(stack: Stack, aet: str, address: str) -> list[str] | None:
    """The accession numbers of the worklist as the caller sees it; None when refused."""
    ae = AE()
    ae.add_requested_context(ModalityWorklistInformationFind)
    association = associate(stack, ae, aet, address)
    query = Dataset()
    query.PatientName, query.AccessionNumber = "", ""
    query.ScheduledProcedureStepSequence = [Dataset()]
    found = []
    try:
        for status, answer in association.send_c_find(query, ModalityWorklistInformationFind):
            if not status or status.Status not in SUCCESS_OR_PENDING:
                return None
            if answer is not None:
                found.append(answer.AccessionNumber)
    finally:
        if association.is_established:
            association.release()
    return found


def get_study(stack: Stack, aet: str, address: str, study_uid: str) -> list[str] | None:
    """The SOP instance UIDs a C-GET of the study brings; None when refused."""
    received: list[str] = []

    def keep(event: evt.Event) -> int:
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    association = associate(
        stack,
        ae,
        aet,
        address,
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, keep)],
    )
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study_uid
    try:
        for status, _answer in association.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            if not status or status.Status not in SUCCESS_OR_PENDING:
                return None
    finally:
        if association.is_established:
            association.release()
    return received


def archive_starts(stack: Stack) -> int:
    return (stack.data / "logs" / "orthanc.log").read_text(errors="replace").count("Orthanc has started")


def set_store_policy(stack: Stack, value: str) -> None:
    """``./pacs config set dicom_store_from VALUE``, then wait until the archive runs with it (the
    command returns while the archive restarts: its old self still answers for a moment)."""
    starts = archive_starts(stack)
    changed = stack.pacs("config", "set", "dicom_store_from", value)
    assert changed.returncode == 0, changed.stderr
    deadline = time.monotonic() + 60
    while archive_starts(stack) == starts:
        assert time.monotonic() < deadline, "the archive did not restart"
        time.sleep(0.2)
    stack.wait_for_archive()


def refusals(stack: Stack, address: str, wanted: int, timeout: float = 30) -> list[dict]:
    """The archive's refusals of calls from ``address`` in the activity log, once ``wanted`` are
    there (the portal reads them from the archive's log every few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        with Site(stack.data).engine.connect() as connection:
            rows = connection.execute(
                sa.select(db.activity)
                .where(db.activity.c.action == "dicom-refused", db.activity.c.client_address == address)
                .order_by(db.activity.c.id)
            ).all()
        if len(rows) >= wanted or time.monotonic() > deadline:
            return [{"outcome": row.outcome, **json.loads(row.detail)} for row in rows]
        time.sleep(0.5)


def test_a_registered_ae_title_calling_from_another_address_gets_nothing(
    registered: Stack, peer_study: Dataset
) -> None:
    # The registered modality, from its own address, queries and retrieves.
    assert "PEER-1" in find_studies(registered, "CT1", MODALITY_ADDRESS)
    assert find_worklist(registered, "CT1", MODALITY_ADDRESS) == ["ACC-PEER"]
    assert len(get_study(registered, "CT1", MODALITY_ADDRESS, peer_study.StudyInstanceUID)) == 1

    # The same AE title from another host lists nothing, reads no worklist, retrieves nothing.
    assert find_studies(registered, "CT1", ATTACKER_ADDRESS) is None
    assert find_worklist(registered, "CT1", ATTACKER_ADDRESS) is None
    assert get_study(registered, "CT1", ATTACKER_ADDRESS, peer_study.StudyInstanceUID) is None

    logged = refusals(registered, ATTACKER_ADDRESS, 3)
    assert [(row["aet"], row["outcome"]) for row in logged] == [("CT1", "refused")] * 3
    assert {row["request"] for row in logged} >= {"Find", "Get"}
    assert {row["reason"] for row in logged} == {"this AE title is registered for another address"}


def test_a_modality_can_only_be_registered_by_its_address(registered: Stack) -> None:
    admin = registered.sign_in("admin", ADMIN_PASSWORD)
    answer = admin_submit(registered, admin, {"aet": "CT9", "host": "ct9.hospital.example", "port": "104"})
    assert "Not registered:" in answer.text and "give the modality&#39;s IP address" in answer.text
    shell = registered.pacs("config", "set", "dicom_modalities", "CT1@ct1.hospital.example:104")
    assert shell.returncode != 0 and "IP address" in shell.stderr
    page = admin.get(f"{registered.url}/admin/settings").text
    assert "AE title and the IP address it comes from are both those registered" in page


def test_only_registered_modalities_store_when_the_admin_says_so(registered: Stack) -> None:
    stranger_before = fresh_study("CT_small.dcm", patient_id="STRANGER-0")
    assert store(registered, stranger_before, "STRANGER", ATTACKER_ADDRESS) == 0  # the default: any

    set_store_policy(registered, "registered")
    try:
        refused = [fresh_study("CT_small.dcm", patient_id=f"STRANGER-{n}") for n in (1, 2)]
        assert store(registered, refused[0], "STRANGER", ATTACKER_ADDRESS) is None
        assert store(registered, refused[1], "CT1", ATTACKER_ADDRESS) is None
        welcome = fresh_study("CT_small.dcm", patient_id="CT1-OWN")
        assert store(registered, welcome, "CT1", MODALITY_ADDRESS) == 0

        orthanc = requests.Session()
        orthanc.auth = registered.orthanc_auth
        patients = {
            patient["MainDicomTags"]["PatientID"]
            for patient in orthanc.get(f"{registered.orthanc_url}/patients?expand").json()
        }
        assert "CT1-OWN" in patients and not {"STRANGER-1", "STRANGER-2"} & patients

        stores = [row for row in refusals(registered, ATTACKER_ADDRESS, 5) if row["request"] == "Store"]
        assert [(row["aet"], row.get("reason")) for row in stores] == [
            ("STRANGER", "not a registered modality"),
            ("CT1", "this AE title is registered for another address"),
        ]
        # The admin sees the caller among the refused connections.
        admin = registered.sign_in("admin", ADMIN_PASSWORD)
        listed = admin.get(f"{registered.url}/admin/activity", params={"list": "refused"}).text
        assert ATTACKER_ADDRESS in listed
        detail = admin.get(
            f"{registered.url}/admin/activity", params={"list": "refused", "address": ATTACKER_ADDRESS}
        ).text
        assert "dicom-refused" in detail and "STRANGER" in detail
    finally:
        set_store_policy(registered, "any")
    assert store(registered, fresh_study("CT_small.dcm"), "STRANGER", ATTACKER_ADDRESS) == 0


def test_the_setting_reaches_the_archive_configuration(registered: Stack) -> None:
    rendered = json.loads(Path(registered.data / "run" / "orthanc.json").read_text())
    assert rendered["DicomCheckModalityHost"] is True
    assert rendered["DicomAlwaysAllowStore"] is True
