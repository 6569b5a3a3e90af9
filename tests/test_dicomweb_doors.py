"""The DICOMweb doors of the real stack: what reaches Orthanc, what comes back from it, how much.

Orthanc 1.10.1 reads ``?_method=DELETE`` on a GET and ``X-HTTP-Method-Override: DELETE`` on
anything as a DELETE, inflates compressed request bodies without bounds, explains its errors in
detail (whether an instance UID exists elsewhere), and answers a search with everything it found.
Each is tried here through Caddy as a client would, as a signed-in user and with a patient's grant.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator

import pytest
import requests
from pydicom import Dataset

from control.dicomweb.rules import DEFAULT_LIMIT, MAX_LIMIT

from conftest import ADMIN_PASSWORD, Stack, csrf_token, fresh_study, make_stack

pytestmark = pytest.mark.stack

FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def store(stack: Stack, dataset: Dataset) -> str:
    """Store through Orthanc's own API (setting up the archive); the study's Orthanc id."""
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    answer = requests.post(f"{stack.orthanc_url}/instances", data=buffer.getvalue(), auth=stack.orthanc_auth)
    answer.raise_for_status()
    return answer.json()["ParentStudy"]


@pytest.fixture(scope="module")
def doors(stack: Stack) -> tuple[Dataset, Dataset, requests.Session, requests.Session]:
    """Two studies; a signed-in doctor; a patient whose grant is for the first study only."""
    granted, other = fresh_study("CT_small.dcm"), fresh_study("MR_small.dcm")
    granted_id = store(stack, granted)
    store(stack, other)
    doctor = stack.sign_in("admin", ADMIN_PASSWORD)
    link = doctor.post(
        f"{stack.url}/tokens/studies/{granted_id}/link",
        headers={"X-CSRFToken": csrf_token(doctor.get(f"{stack.url}/").text)},
    ).json()["link"]
    patient = requests.Session()
    patient.get(f"{stack.url}/token/viewer?{link.split('?', 1)[1]}", allow_redirects=False)
    assert "pacs_grant" in patient.cookies
    return granted, other, doctor, patient


def metadata_path(dataset: Dataset) -> str:
    return f"/dicom-web/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}/metadata"


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("?_method=DELETE", {}),
        ("?%5Fmethod=DELETE", {}),
        ("?_method=%44ELETE", {}),
        ("", {"X-HTTP-Method-Override": "DELETE"}),
        ("", {"X-HTTP-Method-Override": "delete"}),
    ],
)
def test_requests_orthanc_would_read_as_a_delete_never_reach_it(
    stack: Stack, doors, query: str, headers: dict[str, str]
) -> None:
    granted, _other, doctor, patient = doors
    for browser in (doctor, patient):
        answer = browser.get(f"{stack.url}{metadata_path(granted)}{query}", headers=headers)
        # Orthanc would have answered 405 ("only GET here"): it read the request as a DELETE.
        assert answer.status_code == 400, answer.text
        assert "another method" in answer.text
    search = doctor.get(f"{stack.url}/dicom-web/studies{query}", headers=headers)
    assert search.status_code == 400
    assert doctor.get(f"{stack.url}{metadata_path(granted)}").status_code == 200


def test_compressed_request_bodies_are_refused_before_the_archive(stack: Stack, doors) -> None:
    granted, _other, doctor, patient = doors
    bomb = gzip.compress(b"\0" * (16 * 1024 * 1024))
    for browser in (doctor, patient):
        answer = browser.get(
            f"{stack.url}{metadata_path(granted)}", data=bomb, headers={"Content-Encoding": "gzip"}
        )
        assert answer.status_code == 415
        assert browser.get(f"{stack.url}{metadata_path(granted)}").status_code == 200


def test_orthanc_error_texts_do_not_reach_patients(stack: Stack, doors) -> None:
    granted, other, doctor, patient = doors
    study = f"/dicom-web/studies/{granted.StudyInstanceUID}"
    # An instance that exists in another study, and one that does not exist at all, asked for
    # under the granted study: the answers must not tell them apart.
    elsewhere = f"{study}/series/{other.SeriesInstanceUID}/instances/{other.SOPInstanceUID}"
    nowhere = f"{study}/series/{granted.SeriesInstanceUID}/instances/1.2.3.4.5"
    answers = [patient.get(f"{stack.url}{path}/metadata") for path in (elsewhere, nowhere)]
    frames = [
        patient.get(f"{stack.url}{path}/frames/1", headers={"Accept": FRAME_ACCEPT})
        for path in (elsewhere, nowhere)
    ]
    for answer in [*answers, *frames]:
        assert answer.status_code == 404
        assert answer.text == "404 Not Found"
        assert "inexistent" not in answer.text and "Details" not in answer.text
    assert answers[0].text == answers[1].text and frames[0].text == frames[1].text
    bad_search = doctor.get(f"{stack.url}/dicom-web/studies", params={"limit": "-1"})
    assert bad_search.status_code == 400 and "Orthanc" not in bad_search.text


@pytest.fixture(scope="module")
def full_archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A portal whose archive holds more studies than a search answers at once."""
    running = make_stack(tmp_path_factory.mktemp("paging"))
    running.start()
    for number in range(MAX_LIMIT + 10):
        store(running, fresh_study("CT_small.dcm", patient_id=f"PAGED-{number:04d}"))
    yield running
    running.stop()


def test_searches_are_paged(full_archive: Stack) -> None:
    doctor = full_archive.sign_in("admin", ADMIN_PASSWORD)

    def search(**params: str) -> requests.Response:
        answer = doctor.get(
            f"{full_archive.url}/dicom-web/studies", params={"PatientID": "PAGED-*", **params}
        )
        assert answer.status_code == 200, answer.text
        return answer

    first = search()
    assert len(first.json()) == DEFAULT_LIMIT and "Additional results" in first.headers["Warning"]
    assert len(search(limit="0").json()) == DEFAULT_LIMIT
    most = search(limit="100000")
    assert len(most.json()) == MAX_LIMIT and "Warning" in most.headers
    last = search(limit="50", offset=str(MAX_LIMIT))
    assert len(last.json()) == 10 and "Warning" not in last.headers
    seen = {item["00100020"]["Value"][0] for item in most.json() + last.json()}
    assert len(seen) == MAX_LIMIT + 10
