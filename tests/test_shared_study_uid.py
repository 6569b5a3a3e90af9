"""Two patients' studies under one Study Instance UID, sent by a modality over C-STORE.

Orthanc keeps them as two studies (it names a study by patient ID and UID), but DICOMweb, the viewer
and study links name a study by its UID alone. Before the portal knew, "copy study link" on the
second patient's study handed out the first patient's link, and the first patient's viewer read
the second patient's series. Now a link names one study of one patient, a shared UID gets no link
and no DICOMweb answer, the admin is told, and everything works again once one study is left.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
import requests
import sqlalchemy as sa
from pydicom import Dataset

from control import db
from control.site import Site

from conftest import ADMIN_PASSWORD, Stack, c_store, csrf_token, fresh_study

pytestmark = pytest.mark.stack

FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


@dataclass(frozen=True)
class Sent:
    dataset: Dataset
    orthanc_id: str

    @property
    def series_url(self) -> str:
        return f"/dicom-web/studies/{self.dataset.StudyInstanceUID}/series/{self.dataset.SeriesInstanceUID}"

    @property
    def instance_url(self) -> str:
        return f"{self.series_url}/instances/{self.dataset.SOPInstanceUID}"


def send(stack: Stack, dataset: Dataset) -> Sent:
    assert c_store(stack, dataset) == 0
    found = requests.post(
        f"{stack.orthanc_url}/tools/lookup", data=dataset.SOPInstanceUID, auth=stack.orthanc_auth
    )
    instance = next(item["ID"] for item in found.json() if item["Type"] == "Instance")
    study = requests.get(f"{stack.orthanc_url}/instances/{instance}/study", auth=stack.orthanc_auth).json()
    return Sent(dataset, study["ID"])


def link_answer(stack: Stack, doctor: requests.Session, sent: Sent) -> requests.Response:
    token = csrf_token(doctor.get(f"{stack.url}/").text)
    return doctor.post(
        f"{stack.url}/tokens/studies/{sent.orthanc_id}/link",
        headers={"X-CSRFToken": token, "Accept": "application/json"},
    )


def open_viewer(stack: Stack, link: str) -> requests.Session:
    """A patient's browser that opened the link and the viewer (so it holds the study's grant)."""
    browser = requests.Session()
    query = link.split("?", 1)[1]
    assert browser.get(f"{stack.url}/token?{query}").status_code == 200
    assert browser.get(f"{stack.url}/token/viewer?{query}", allow_redirects=False).status_code == 302
    return browser


def events(stack: Stack, action: str, study_uid: str) -> list[sa.Row]:
    with Site(stack.data).engine.connect() as connection:
        return connection.execute(
            sa.select(db.activity)
            .where(db.activity.c.action == action, db.activity.c.study == study_uid)
            .order_by(db.activity.c.id)
        ).all()


def series_of(answer: requests.Response) -> set[str]:
    assert answer.status_code == 200, answer.text
    return {item["0020000E"]["Value"][0] for item in answer.json()}


def test_a_study_uid_two_patients_share_gets_no_link_and_no_mixed_answers(stack: Stack) -> None:
    doctor = stack.sign_in("admin", ADMIN_PASSWORD)
    first = send(stack, fresh_study("CT_small.dcm", patient_id="UID-FIRST", patient_name="First^Anna"))
    uid = first.dataset.StudyInstanceUID
    first_link = link_answer(stack, doctor, first).json()["link"]
    patient = open_viewer(stack, first_link)
    query = first_link.split("?", 1)[1]

    # A modality sends another patient's study under the same Study Instance UID.
    colliding = fresh_study("MR_small.dcm", patient_id="UID-SECOND", patient_name="Second^Bob")
    colliding.StudyInstanceUID = uid
    second = send(stack, colliding)
    assert second.orthanc_id != first.orthanc_id

    # Neither study gets a link: above all not the second patient the first one's.
    for sent in (second, first):
        refused = link_answer(stack, doctor, sent)
        assert refused.status_code == 409
        assert "another patient's study" in refused.json()["message"]
        assert query not in refused.text
    # The first patient's link is held, with a page that says why.
    held = requests.get(f"{stack.url}/token?{query}")
    assert held.status_code == 409 and "cannot be shown at the moment" in held.text
    # The admin is told, once, on the study links page too.
    flagged = events(stack, "study-uid-shared", uid)
    assert len(flagged) == 1 and "UID-FIRST" in flagged[0].patient and "UID-SECOND" in flagged[0].patient
    links_page = doctor.get(f"{stack.url}/admin/tokens").text
    assert uid in links_page and "UID-SECOND" in links_page and "no link" in links_page

    # DICOMweb never answers for the UID, to the patient's grant or to a signed-in user.
    for browser in (patient, doctor):
        assert browser.get(f"{stack.url}/dicom-web/studies/{uid}/series").status_code == 409
        assert browser.get(f"{stack.url}{second.series_url}/metadata").status_code == 409
        frame = browser.get(f"{stack.url}{second.instance_url}/frames/1", headers={"Accept": FRAME_ACCEPT})
        assert frame.status_code == 409
        wado = browser.get(
            f"{stack.url}/wado",
            params={
                "requestType": "WADO",
                "studyUID": uid,
                "seriesUID": colliding.SeriesInstanceUID,
                "objectUID": colliding.SOPInstanceUID,
            },
        )
        assert wado.status_code == 409
    assert doctor.get(f"{stack.url}/dicom-web/studies", params={"StudyInstanceUID": uid}).status_code == 409
    assert patient.get(f"{stack.url}/dicom-web/studies").json() == []
    reasons = [json.loads(row.detail)["reason"] for row in events(stack, "dicomweb-denied", uid)]
    assert reasons and all(reason.startswith("the Study Instance UID is shared by 2") for reason in reasons)

    # The admin deletes the stray study: the first patient's link and viewer work again, alone.
    requests.delete(
        f"{stack.orthanc_url}/studies/{second.orthanc_id}", auth=stack.orthanc_auth
    ).raise_for_status()
    assert requests.get(f"{stack.url}/token?{query}").status_code == 200
    assert series_of(patient.get(f"{stack.url}/dicom-web/studies/{uid}/series")) == {
        first.dataset.SeriesInstanceUID
    }
    assert link_answer(stack, doctor, first).json()["link"] == first_link
    assert "Studies two patients share a UID with" not in doctor.get(f"{stack.url}/admin/tokens").text


def test_a_link_never_opens_another_patients_study_that_took_its_uid(stack: Stack) -> None:
    doctor = stack.sign_in("admin", ADMIN_PASSWORD)
    gone = send(stack, fresh_study("CT_small.dcm", patient_id="UID-GONE"))
    uid = gone.dataset.StudyInstanceUID
    old_link = link_answer(stack, doctor, gone).json()["link"]
    patient = open_viewer(stack, old_link)
    requests.delete(
        f"{stack.orthanc_url}/studies/{gone.orthanc_id}", auth=stack.orthanc_auth
    ).raise_for_status()

    successor = fresh_study("MR_small.dcm", patient_id="UID-SUCCESSOR")
    successor.StudyInstanceUID = uid
    taken = send(stack, successor)

    assert requests.get(f"{stack.url}/token?{old_link.split('?', 1)[1]}").status_code == 404
    assert patient.get(f"{stack.url}/dicom-web/studies/{uid}/series").status_code == 404
    assert patient.get(f"{stack.url}{taken.series_url}/metadata").status_code == 404
    frame = patient.get(f"{stack.url}{taken.instance_url}/frames/1", headers={"Accept": FRAME_ACCEPT})
    assert frame.status_code == 404
    assert patient.get(f"{stack.url}/dicom-web/studies").json() == []
    # The new study gets a link of its own, not the old one.
    new_link = link_answer(stack, doctor, taken).json()["link"]
    assert new_link != old_link
    assert series_of(open_viewer(stack, new_link).get(f"{stack.url}/dicom-web/studies/{uid}/series")) == {
        successor.SeriesInstanceUID
    }


def test_the_admin_is_told_as_the_colliding_study_arrives(stack: Stack) -> None:
    first = fresh_study("CT_small.dcm", patient_id="UID-EARLY")
    send(stack, first)
    late = fresh_study("MR_small.dcm", patient_id="UID-LATE")
    late.StudyInstanceUID = first.StudyInstanceUID
    send(stack, late)
    # Nobody asks anything about the study: the portal follows the archive's changes itself.
    deadline = time.monotonic() + 30
    while not events(stack, "study-uid-shared", first.StudyInstanceUID):
        assert time.monotonic() < deadline, "the shared UID was not flagged"
        time.sleep(0.5)
    (flagged,) = events(stack, "study-uid-shared", first.StudyInstanceUID)
    assert json.loads(flagged.detail)["found_by"] == "a new study"
    assert "UID-EARLY" in flagged.patient and "UID-LATE" in flagged.patient
