"""HL7 orders into the modality worklist, found by a real modality client (pynetdicom) over DICOM."""

from __future__ import annotations

import json
import re

import pytest
import requests
import sqlalchemy as sa
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind

from control import accounts, db
from control.site import Site

from conftest import ADMIN_PASSWORD, Stack, csrf_token

pytestmark = pytest.mark.stack

MODALITY = "TESTMWL"
SCHEDULER = ("worklist.user", "schedules orders 1")


def order(
    accession: str, *, control: str = "NW", procedure: str = "CTHEAD^CT Head^L", name: str = "Doe^John"
) -> str:
    return "\r\n".join(
        [
            f"MSH|^~\\&|RIS|HOSP|PACS|HOSP|20240102120000||ORM^O01|{accession}|P|2.3",
            f"PID|1||PAT-{accession}^^^HOSP||{name}||19700101|M",
            "PV1|1|O||||||123^Smith^Anna",
            f"ORC|{control}|PLC-{accession}|||SC||^^^202403150930",
            f"OBR|1|PLC-{accession}||{procedure}||||||||||||^Jones^Bob||{accession}|RP1|SPS1|CT01|||CT",
            "",
        ]
    )


def find(stack: Stack, calling_aet: str = MODALITY, **query: str) -> list[Dataset] | None:
    """The worklist entries a modality finds (None when the archive refuses the query)."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(ModalityWorklistInformationFind)
    association = ae.associate("127.0.0.1", stack.dicom_port, ae_title=stack.aet)
    if not association.is_established:
        return None
    identifier = Dataset()
    identifier.SpecificCharacterSet = "ISO_IR 192"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber"):
        setattr(identifier, keyword, query.get(keyword, ""))
    identifier.ReferringPhysicianName = ""
    identifier.RequestedProcedureDescription = ""
    identifier.StudyInstanceUID = ""
    step = Dataset()
    step.Modality = query.get("Modality", "")
    step.ScheduledStationAETitle = ""
    step.ScheduledProcedureStepStartDate = query.get("ScheduledProcedureStepStartDate", "")
    step.ScheduledProcedureStepStartTime = ""
    identifier.ScheduledProcedureStepSequence = [step]
    found: list[Dataset] = []
    try:
        for status, answer in association.send_c_find(identifier, ModalityWorklistInformationFind):
            if not status or status.Status not in (0x0000, 0xFF00, 0xFF01):
                return None
            if answer is not None:
                found.append(answer)
    finally:
        association.release()
    return found


class Browser:
    def __init__(self, stack: Stack, username: str, password: str) -> None:
        self.stack = stack
        self.session = stack.sign_in(username, password)

    def submit(self, path: str, data: dict, form_page: str) -> requests.Response:
        page = self.session.get(f"{self.stack.url}{form_page}")
        return self.session.post(
            f"{self.stack.url}{path}", data={**data, "csrf_token": csrf_token(page.text)}
        )

    def upload_hl7(self, name: str, text: str) -> dict:
        token = csrf_token(self.session.get(f"{self.stack.url}/upload").text)
        response = self.session.post(
            f"{self.stack.url}/upload/files",
            files=[("files", (name, text.encode()))],
            headers={"Accept": "application/json", "X-CSRFToken": token},
        )
        assert response.status_code == 200, response.text[:300]
        return response.json()


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Browser:
    admin = Browser(stack, "admin", ADMIN_PASSWORD)
    response = admin.submit(
        "/upload/worklist/modalities",
        {"aet": MODALITY, "host": "127.0.0.1", "port": "11112"},
        "/upload/worklist",
    )
    assert "Saved: the registered modalities may now query the worklist." in response.text
    return admin


@pytest.fixture(scope="module")
def scheduler(stack: Stack) -> Browser:
    with Site(stack.data).engine.begin() as connection:
        accounts.create_user(connection, *SCHEDULER, can_upload=True)
    return Browser(stack, *SCHEDULER)


def test_an_order_reaches_the_worklist_a_repeat_replaces_it_and_a_cancel_removes_it(
    stack: Stack, admin: Browser, scheduler: Browser
) -> None:
    answer = scheduler.upload_hl7("order.hl7", order("WL-001", name="Παπαδόπουλος^Γιώργος"))
    assert [(row["outcome"], row["detail"]) for row in answer["results"]] == [
        ("scheduled", "message 1: accession WL-001, CT Head, 2024-03-15 09:30 at CT01")
    ]

    (entry,) = find(stack, AccessionNumber="WL-001")
    assert str(entry.PatientName) == "Παπαδόπουλος^Γιώργος"
    assert (entry.PatientID, entry.PatientBirthDate, entry.PatientSex) == ("PAT-WL-001", "19700101", "M")
    assert (str(entry.ReferringPhysicianName), entry.RequestedProcedureDescription) == (
        "Smith^Anna",
        "CT Head",
    )
    step = entry.ScheduledProcedureStepSequence[0]
    assert (step.Modality, step.ScheduledStationAETitle) == ("CT", "CT01")
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime) == (
        "20240315",
        "0930",
    )
    assert find(stack, Modality="CT", ScheduledProcedureStepStartDate="20240315")
    study_uid = entry.StudyInstanceUID

    answer = scheduler.upload_hl7("change.hl7", order("WL-001", control="XO", procedure="CTNECK^CT Neck^L"))
    assert answer["results"][0]["outcome"] == "replaced"
    (entry,) = find(stack, AccessionNumber="WL-001")
    assert entry.RequestedProcedureDescription == "CT Neck"
    assert entry.StudyInstanceUID == study_uid

    answer = scheduler.upload_hl7("cancel.hl7", order("WL-001", control="CA"))
    assert answer["results"][0]["outcome"] == "cancelled"
    assert find(stack, AccessionNumber="WL-001") == []
    answer = scheduler.upload_hl7("cancel.hl7", order("WL-001", control="CA"))
    assert answer["results"][0] == {
        "name": "cancel.hl7",
        "outcome": "refused",
        "detail": "message 1: nothing to cancel, the worklist holds no order with accession number WL-001",
        "study": "",
        "study_id": "",
        "patient": "Doe John (PAT-WL-001)",
    }

    with Site(stack.data).engine.connect() as connection:
        logged = connection.execute(
            sa.select(db.activity.c.detail, db.activity.c.patient).where(
                db.activity.c.action == "worklist-order"
            )
        ).all()
    changes = [json.loads(row.detail)["change"] for row in logged if "WL-001" in row.detail]
    assert changes == ["scheduled", "replaced", "cancelled"]


def test_unregistered_modalities_are_refused(stack: Stack, admin: Browser, scheduler: Browser) -> None:
    scheduler.upload_hl7("order.hl7", order("WL-002"))
    assert find(stack, AccessionNumber="WL-002")
    assert find(stack, calling_aet="STRANGER", AccessionNumber="WL-002") is None

    admin.submit("/upload/worklist/modalities", {"remove": MODALITY}, "/upload/worklist")
    assert find(stack, AccessionNumber="WL-002") is None
    admin.submit(
        "/upload/worklist/modalities",
        {"aet": MODALITY, "host": "127.0.0.1", "port": "11112"},
        "/upload/worklist",
    )
    assert find(stack, AccessionNumber="WL-002")
    # The list is also in Orthanc's configuration, for its next start.
    rendered = json.loads((stack.data / "run" / "orthanc.json").read_text())
    assert rendered["DicomModalities"][MODALITY] == {"AET": MODALITY, "Host": "127.0.0.1", "Port": 11112}

    response = admin.submit(
        "/upload/worklist/modalities",
        {"aet": "BAD AET", "host": "127.0.0.1", "port": "104"},
        "/upload/worklist",
    )
    assert "Not registered:" in response.text


def test_malformed_hl7_is_refused_and_the_good_messages_go_in(
    stack: Stack, admin: Browser, scheduler: Browser
) -> None:
    bad_type = order("WL-BAD1").replace("ORM^O01", "ADT^A08")
    no_patient_id = order("WL-BAD2").replace("PAT-WL-BAD2^^^HOSP", "")
    text = order("WL-003") + bad_type + no_patient_id + order("WL-004")
    answer = scheduler.upload_hl7("mixed.hl7", text)
    assert [(row["outcome"], row["detail"].split(":")[0]) for row in answer["results"]] == [
        ("scheduled", "message 1"),
        ("refused", "message 2"),
        ("refused", "message 3"),
        ("scheduled", "message 4"),
    ]
    assert "MSH-9 (message type) is ADT^A08" in answer["results"][1]["detail"]
    assert answer["results"][2]["detail"] == "message 3: PID-3 (patient ID) is missing"
    assert find(stack, AccessionNumber="WL-003") and find(stack, AccessionNumber="WL-004")
    assert find(stack, AccessionNumber="WL-BAD1") == [] and find(stack, AccessionNumber="WL-BAD2") == []

    garbage = scheduler.upload_hl7("garbage.hl7", "MSH|this is not\x00 what it seems")
    assert garbage["results"][0]["outcome"] == "refused"
    assert garbage["results"][0]["detail"].startswith("message 1: ")


def test_the_admin_sees_the_worklist_and_deletes_an_entry(
    stack: Stack, admin: Browser, scheduler: Browser
) -> None:
    scheduler.upload_hl7("order.hl7", order("WL-005", name="Roe^Richard"))
    page = admin.session.get(f"{stack.url}/upload/worklist").text
    row = re.search(r"<tr>(?:(?!</tr>).)*WL-005.*?</tr>", page, re.S).group(0)
    assert "Roe Richard" in row and "CT01" in row
    entry_id = re.search(r'data-entry="([0-9a-f]{32})"', row).group(1)
    response = admin.submit(f"/upload/worklist/{entry_id}/delete", {}, "/upload/worklist")
    assert "Deleted the worklist entry of accession number WL-005" in response.text
    assert find(stack, AccessionNumber="WL-005") == []
    assert "<td>WL-005</td>" not in response.text

    # The page and its changes are the admin's alone.
    assert scheduler.session.get(f"{stack.url}/upload/worklist").status_code == 403
    token = csrf_token(scheduler.session.get(f"{stack.url}/upload").text)
    refused = scheduler.session.post(
        f"{stack.url}/upload/worklist/modalities", data={"remove": MODALITY, "csrf_token": token}
    )
    assert refused.status_code == 403
    assert find(stack, AccessionNumber="WL-003")
