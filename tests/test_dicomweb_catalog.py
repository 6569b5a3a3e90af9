"""DICOMweb study searches of signed-in users, answered by the study catalog (control.catalog.qido).

A stack of this module's own holds real studies, stored by C-STORE: pydicom's samples, its
character-set files (Greek, Russian, Arabic, Hebrew, Japanese, Korean and Chinese names, with
their ideographic and phonetic groups) and studies made for the search keys (dates, accession
numbers, referring physicians, descriptions, a study of two modalities). dicomweb-client asks the
portal, signed in; the same questions go straight to Orthanc's DICOMweb plugin, and both must name
the same studies with the same attribute values. Then what only the catalog can do (percent-encoded
non-Latin names, accents) shows that the catalog answers, and a patient's link still finds its own
study alone.
"""

from __future__ import annotations

import copy
import os
import signal
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.uid import generate_uid

from conftest import Stack, c_store, csrf_token, fresh_study, make_stack, orthanc_id, wait_until

pytestmark = pytest.mark.stack

CHARACTER_SETS = (
    "chrGreek",
    "chrRuss",
    "chrArab",
    "chrHbrw",
    "chrH31",
    "chrI2",
    "chrX1",
    "chrFren",
    "chrGerm",
)
# The plugin answers this one, the catalog does not keep it (see control.catalog.qido).
TIME_ZONE = "00080201"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = make_stack(tmp_path_factory.mktemp("dicomweb-catalog"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def store(stack: Stack, dataset: pydicom.Dataset | str) -> None:
    assert c_store(stack, dataset) == 0


def made_study(
    sample: str, *, date: str, name: str, accession: str, referring: str, description: str
) -> pydicom.Dataset:
    dataset = fresh_study(sample, study_date=date, patient_name=name)
    dataset.AccessionNumber = accession
    dataset.ReferringPhysicianName = referring
    dataset.StudyDescription = description
    dataset.PatientBirthDate = "19610304"
    return dataset


@pytest.fixture(scope="module")
def archive(stack: Stack) -> dict[str, str]:
    """The studies, stored for real; the catalog caught up. Returns a few of their UIDs by role."""
    for sample in ("CT_small.dcm", "MR_small.dcm"):
        store(stack, get_testdata_file(sample))
    for name in CHARACTER_SETS:
        store(stack, get_charset_files(f"{name}.dcm")[0])
    chest = made_study(
        "CT_small.dcm",
        date="20240312",
        name="Qido^Anna",
        accession="QA-1001",
        referring="House^Gregory",
        description="Chest CT",
    )
    head = made_study(
        "CT_small.dcm",
        date="20240320",
        name="Qido^Bernd",
        accession="QA-1002",
        referring="House^Gregory",
        description="Head CT",
    )
    knee = made_study(
        "MR_small.dcm",
        date="20230105",
        name="Qidoson^Clara",
        accession="QA-1003",
        referring="Wilson^James",
        description="Knee MR",
    )
    # Today's, for a patient's link (a link to an old study has expired).
    today = fresh_study("CT_small.dcm", patient_name="Qido^Dora")
    for dataset in (chest, head, knee, today):
        store(stack, dataset)
    # A second series of another modality in the head study: ModalitiesInStudy CT\MR, 2 series.
    added = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for keyword in (
        "StudyInstanceUID",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
    ):
        setattr(added, keyword, copy.deepcopy(getattr(head, keyword)))
    for keyword in ("AccessionNumber", "ReferringPhysicianName", "StudyDescription", "StudyID", "StudyTime"):
        setattr(added, keyword, copy.deepcopy(head.get(keyword, "")))
    added.SeriesInstanceUID = generate_uid()
    added.SOPInstanceUID = added.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    store(stack, added)
    stack.wait_for_catalog()
    return {
        "chest": chest.StudyInstanceUID,
        "head": head.StudyInstanceUID,
        "knee": knee.StudyInstanceUID,
        "today": today.StudyInstanceUID,
    }


@pytest.fixture(scope="module")
def doctor(stack: Stack) -> requests.Session:
    return stack.sign_in()


def portal_client(stack: Stack, session: requests.Session) -> DICOMwebClient:
    return DICOMwebClient(f"{stack.url}/dicom-web", session=session)


def plugin_answer(stack: Stack, query: str) -> list[dict[str, Any]]:
    """Orthanc's own DICOMweb answer, asked directly with the raw query: it reads values
    undecoded, and requests would write ``^`` as ``%5E``."""
    session = stack.orthanc()
    asked = session.prepare_request(
        requests.Request(
            "GET", f"{stack.orthanc_url}/dicom-web/studies", headers={"Accept": "application/dicom+json"}
        )
    )
    asked.url += f"?{query}" if query else ""
    answer = session.send(asked, timeout=60)
    assert answer.status_code == 200, answer.text[:300]
    return answer.json()


def comparable(study: dict[str, Any]) -> dict[str, Any]:
    """A study answer with what may differ in form only set aside: an attribute without a value is
    no value whether it is there or not, the modalities are a set, and the time zone is the
    plugin's alone. The retrieve URL's host is the one each was asked by (dicomweb-client names
    the host without its port), so only its path is compared."""
    kept = {}
    for tag, element in study.items():
        if tag == TIME_ZONE or "Value" not in element:
            continue
        if tag == "00080061":
            element = {**element, "Value": sorted(element["Value"])}
        if tag == "00081190":
            element = {**element, "Value": [urlsplit(element["Value"][0]).path]}
        kept[tag] = element
    return kept


def by_uid(answers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = {study["0020000D"]["Value"][0]: comparable(study) for study in answers}
    assert len(found) == len(answers), "a study was answered twice"
    return found


# (the portal's search filters for dicomweb-client, the same search as Orthanc's plugin reads it)
SEARCHES = [
    ({}, ""),
    ({"PatientName": "compressedsamples*"}, "PatientName=compressedsamples*"),
    ({"PatientName": "Qido*"}, "PatientName=Qido*"),
    ({"PatientName": "*anna"}, "PatientName=*anna"),
    ({"PatientID": "SCSGREEK"}, "PatientID=SCSGREEK"),
    ({"PatientID": "I2EXAMPLE"}, "PatientID=I2EXAMPLE"),
    ({"PatientID": "h31example"}, "PatientID=h31example"),
    ({"PatientID": "SCS*"}, "PatientID=SCS*"),
    ({"StudyDate": "20240301-20240331"}, "StudyDate=20240301-20240331"),
    ({"StudyDate": "20040119"}, "StudyDate=20040119"),
    ({"StudyDate": "20230101-"}, "StudyDate=20230101-"),
    ({"AccessionNumber": "QA-1003"}, "AccessionNumber=QA-1003"),
    ({"AccessionNumber": "QA-*"}, "AccessionNumber=QA-*"),
    ({"ModalitiesInStudy": "CT"}, "ModalitiesInStudy=CT"),
    ({"ModalitiesInStudy": "mr"}, "ModalitiesInStudy=mr"),
    ({"ModalitiesInStudy": "CT,MR", "PatientName": "Qido*"}, "ModalitiesInStudy=CT,MR&PatientName=Qido*"),
    ({"StudyDescription": "*CT"}, "StudyDescription=*CT"),
    ({"ReferringPhysicianName": "house*"}, "ReferringPhysicianName=house*"),
    (
        {"PatientName": "Qido*", "StudyDate": "20240101-20241231", "ModalitiesInStudy": "MR"},
        "PatientName=Qido*&StudyDate=20240101-20241231&ModalitiesInStudy=MR",
    ),
]


@pytest.mark.parametrize(("filters", "raw"), SEARCHES, ids=[raw or "all studies" for _f, raw in SEARCHES])
def test_the_catalog_answers_as_the_archive_does(
    stack: Stack, archive: dict[str, str], doctor: requests.Session, filters: dict[str, str], raw: str
) -> None:
    expected = by_uid(plugin_answer(stack, raw))
    found = by_uid(portal_client(stack, doctor).search_for_studies(search_filters=filters))
    assert expected, f"the plugin found nothing for {raw!r}: not a comparison"
    assert sorted(found) == sorted(expected)
    for uid, study in expected.items():
        assert found[uid] == study, uid


def test_study_lists_fields_and_fuzzy_matching(stack: Stack, archive: dict[str, str], doctor) -> None:
    client = portal_client(stack, doctor)
    uids = [archive["chest"], archive["knee"]]
    raw = f"StudyInstanceUID={','.join(uids)}&includefield=StudyDescription,InstitutionName"
    expected = by_uid(plugin_answer(stack, raw))
    found = client.search_for_studies(
        search_filters={"StudyInstanceUID": ",".join(uids)}, fields=["StudyDescription", "InstitutionName"]
    )
    assert sorted(by_uid(found)) == sorted(expected) == sorted(uids)
    assert by_uid(found) == expected
    assert {study["00081030"]["Value"][0] for study in found} == {"Chest CT", "Knee MR"}

    fuzzy = client.search_for_studies(search_filters={"PatientName": "Qido*"}, fuzzymatching=True)
    assert by_uid(fuzzy) == by_uid(plugin_answer(stack, "PatientName=Qido*"))


def test_non_latin_names_are_answered_whole(stack: Stack, archive: dict[str, str], doctor) -> None:
    """The names' groups as the plugin splits them, and the retrieve URL at the portal."""
    client = portal_client(stack, doctor)
    (korean,) = client.search_for_studies(search_filters={"PatientID": "I2EXAMPLE"})
    assert korean["00100010"] == {
        "Value": [{"Alphabetic": "Hong^Gildong", "Ideographic": "洪^吉洞", "Phonetic": "홍^길동"}],
        "vr": "PN",
    }
    assert korean["00080005"]["Value"] == ["ISO_IR 192"]
    uid = korean["0020000D"]["Value"][0]
    (asked,) = doctor.get(f"{stack.url}/dicom-web/studies", params={"PatientID": "I2EXAMPLE"}).json()
    assert asked["00081190"]["Value"] == [f"{stack.url}/dicom-web/studies/{uid}"]
    (greek,) = client.search_for_studies(search_filters={"PatientID": "SCSGREEK"})
    assert greek["00100010"]["Value"] == [{"Alphabetic": "Διονυσιος"}]


@pytest.mark.parametrize(
    ("name", "patient_id"),
    [
        ("*王*", "X1EXAMPLE"),
        ("*山田*", "H31EXAMPLE"),
        ("*Διονυσιος*", "SCSGREEK"),
        ("Aneas^Rudiger", "SCSGERM"),
        ("buc^jerome", "SCSFREN"),
    ],
)
def test_the_catalog_finds_names_the_archive_cannot(
    stack: Stack, archive: dict[str, str], doctor, name: str, patient_id: str
) -> None:
    """Percent-encoded UTF-8 (what dicomweb-client and browsers send) and names without their
    accents: Orthanc's plugin finds nothing for either, the catalog finds the patient."""
    query = requests.Request("GET", "http://x/", params={"PatientName": name}).prepare().url.partition("?")[2]
    assert plugin_answer(stack, query) == []
    found = portal_client(stack, doctor).search_for_studies(search_filters={"PatientName": name})
    assert [study["00100020"]["Value"][0] for study in found] == [patient_id]


def test_pages_of_a_search_follow_each_other(stack: Stack, archive: dict[str, str], doctor) -> None:
    client = portal_client(stack, doctor)
    everything = [study["0020000D"]["Value"][0] for study in client.search_for_studies()]
    pages = []
    for offset in range(0, len(everything) + 3, 3):
        response = doctor.get(f"{stack.url}/dicom-web/studies", params={"limit": "3", "offset": str(offset)})
        assert response.status_code == 200
        page = [study["0020000D"]["Value"][0] for study in response.json()]
        more = offset + 3 < len(everything)
        assert ("Warning" in response.headers) == more, offset
        pages.extend(page)
    assert pages == everything
    assert len(set(everything)) == len(everything) == len(plugin_answer(stack, ""))
    # Newest first: the catalog's order, as the query pages list.
    dates = [study.get("00080020", {}).get("Value", [""])[0] for study in client.search_for_studies()]
    assert dates == sorted(dates, reverse=True)


def test_what_the_catalog_cannot_answer_goes_to_the_archive(
    stack: Stack, archive: dict[str, str], doctor
) -> None:
    """A key, a field or a level the catalog does not keep: the plugin's own answer, as before."""
    client = portal_client(stack, doctor)
    for filters, fields, raw in (
        ({"PatientID": "1CT1"}, ["00100021"], "PatientID=1CT1&includefield=00100021"),
        ({"InstitutionName": "JFK*"}, None, "InstitutionName=JFK*"),
    ):
        found = client.search_for_studies(search_filters=filters, fields=fields)
        assert found, raw
        # The plugin's answer carries the time zone (0008,0201), which the catalog does not.
        assert [study.get(TIME_ZONE) for study in found] == [
            s.get(TIME_ZONE) for s in plugin_answer(stack, raw)
        ]
        assert any(TIME_ZONE in study for study in found)
    # Values the catalog cannot read (not UTF-8, not a date): the archive's answer, never a 500.
    for query in ("PatientName=%FF%FE", "StudyDate=2024", "StudyInstanceUID=1.2.x"):
        answered = doctor.get(f"{stack.url}/dicom-web/studies?{query}")
        assert answered.status_code < 500, query
        assert answered.status_code != 200 or answered.json() == [], query
    series = client.search_for_series(search_filters={"PatientID": "1CT1"})
    assert [item["0020000D"]["Value"] for item in series] == [
        item["0020000D"]["Value"] for item in plugin_answer_at(stack, "series", "PatientID=1CT1")
    ]


def plugin_answer_at(stack: Stack, level: str, query: str) -> list[dict[str, Any]]:
    answer = stack.orthanc().get(f"{stack.orthanc_url}/dicom-web/{level}?{query}", timeout=60)
    assert answer.status_code == 200
    return answer.json()


def test_a_patients_link_still_finds_its_own_study_alone(
    stack: Stack, archive: dict[str, str], doctor: requests.Session
) -> None:
    home = doctor.get(f"{stack.url}/")
    made = doctor.post(
        f"{stack.url}/tokens/studies/{orthanc_id(stack, archive['today'])}/link",
        headers={"X-CSRFToken": csrf_token(home.text)},
    )
    assert made.status_code == 200, made.text
    query = made.json()["link"].split("?", 1)[1]
    browser = requests.Session()
    assert browser.get(f"{stack.url}/token?{query}").status_code == 200
    assert browser.get(f"{stack.url}/token/viewer?{query}", allow_redirects=False).status_code == 302
    client = portal_client(stack, browser)
    for filters in (
        {},
        {"PatientName": "Qido*"},
        {"StudyInstanceUID": archive["head"]},
        {"PatientName": "*王*"},
    ):
        found = client.search_for_studies(search_filters=filters)
        assert {study["0020000D"]["Value"][0] for study in found} <= {archive["today"]}, filters
    assert [study["0020000D"]["Value"][0] for study in client.search_for_studies()] == [archive["today"]]


def test_a_catalog_that_cannot_answer_leaves_it_to_the_archive(
    stack: Stack, archive: dict[str, str], doctor: requests.Session
) -> None:
    """While the catalog's feeder is stopped, searches are the archive's again: a non-Latin name,
    which only the catalog finds, finds nothing; once the feeder goes on, the catalog answers."""
    client = portal_client(stack, doctor)

    def found() -> list[str]:
        answers = client.search_for_studies(search_filters={"PatientName": "*王*"})
        return [study["00100020"]["Value"][0] for study in answers]

    assert found() == ["X1EXAMPLE"]
    feeder = int((stack.data / "run" / "catalog.pid").read_text())
    os.kill(feeder, signal.SIGSTOP)
    try:
        wait_until(lambda: found() == [], "the archive answering while the catalog's feeder is stopped")
    finally:
        os.kill(feeder, signal.SIGCONT)
    wait_until(lambda: found() == ["X1EXAMPLE"], "the catalog answering again")
