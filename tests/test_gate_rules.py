"""The DICOMweb gate's rules, row by row (pure logic; the real gate is tested in test_tokens.py)."""

from __future__ import annotations

import pytest

from control.dicomweb.rules import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    Verdict,
    Visitor,
    decide,
    narrowed_query,
    orthanc_query,
    owned,
    search_limit,
    searched_studies,
)

pytestmark = pytest.mark.inprocess

MINE = "1.2.840.10008.9.1"
OTHER = "1.2.840.10008.9.2"
SERIES = "1.2.840.10008.9.1.1"
INSTANCE = "1.2.840.10008.9.1.1.1"

patient = Visitor(granted_studies={MINE: "study-of-the-link"})
reader = Visitor(signed_in=True)
uploader = Visitor(signed_in=True, can_upload=True)
nobody = Visitor()

STUDY = f"/dicom-web/studies/{MINE}"
FRAME = f"{STUDY}/series/{SERIES}/instances/{INSTANCE}/frames/1"


@pytest.mark.parametrize(
    ("who", "method", "uri", "verdict"),
    [
        # A patient's grant: its own study, read only.
        (patient, "GET", f"{STUDY}/metadata", Verdict.ALLOW),
        (patient, "GET", f"{STUDY}/series", Verdict.ALLOW),
        (patient, "GET", f"{STUDY}/series?includefield=0008103E", Verdict.ALLOW),
        (patient, "GET", f"{STUDY}/series/{SERIES}/metadata", Verdict.ALLOW),
        (patient, "GET", f"{STUDY}/series/{SERIES}/instances", Verdict.ALLOW),
        (patient, "GET", FRAME, Verdict.ALLOW),
        (patient, "GET", f"{FRAME},2,3", Verdict.ALLOW),
        (patient, "HEAD", f"{STUDY}/rendered", Verdict.ALLOW),
        (patient, "GET", f"{STUDY}/series/{SERIES}/instances/{INSTANCE}/bulk/7fe00010", Verdict.ALLOW),
        (patient, "GET", f"{STUDY}/series/{SERIES}/instances/{INSTANCE}/bulk/00420011", Verdict.ALLOW),
        (patient, "GET", f"/wado?requestType=WADO&studyUID={MINE}&seriesUID={SERIES}", Verdict.ALLOW),
        # ... and nothing else.
        (patient, "GET", f"/dicom-web/studies/{OTHER}/metadata", Verdict.DENY),
        (
            patient,
            "GET",
            f"/dicom-web/studies/{OTHER}/series/{SERIES}/instances/{INSTANCE}/frames/1",
            Verdict.DENY,
        ),
        (patient, "GET", f"/wado?requestType=WADO&studyUID={OTHER}", Verdict.DENY),
        (patient, "GET", "/wado?requestType=WADO", Verdict.DENY),
        (patient, "GET", "/dicom-web/studies", Verdict.DENY),
        (patient, "POST", "/dicom-web/studies", Verdict.DENY),
        (patient, "DELETE", STUDY, Verdict.DENY),
        (patient, "PUT", STUDY, Verdict.DENY),
        # Path tricks: anything not in canonical form is refused, never repaired.
        (patient, "GET", f"/dicom-web/studies/{OTHER}/../{MINE}/metadata", Verdict.NOT_FOUND),
        (patient, "GET", f"{STUDY}/../../studies/{OTHER}/metadata", Verdict.NOT_FOUND),
        (patient, "GET", f"/dicom-web/studies/{MINE}%2F..%2F{OTHER}/metadata", Verdict.NOT_FOUND),
        (patient, "GET", f"/dicom-web//studies/{MINE}/metadata", Verdict.NOT_FOUND),
        (patient, "GET", f"{STUDY}/metadata/", Verdict.NOT_FOUND),
        (patient, "GET", f"/DICOM-WEB/studies/{MINE}/metadata", Verdict.NOT_FOUND),
        (patient, "GET", f"/dicom-web/Studies/{MINE}/metadata", Verdict.NOT_FOUND),
        (patient, "GET", f"/dicom-web/studies/{MINE}x/metadata", Verdict.NOT_FOUND),
        (patient, "GET", "/dicom-web/studies/%31.2/metadata", Verdict.NOT_FOUND),
        (patient, "GET", "/dicom-web/servers", Verdict.NOT_FOUND),
        (patient, "GET", "/dicom-web/../instances", Verdict.NOT_FOUND),
        # Signed-in users read everything; store only with the upload right.
        (reader, "GET", f"/dicom-web/studies/{OTHER}/metadata", Verdict.ALLOW),
        (reader, "GET", "/dicom-web/studies?PatientID=*", Verdict.ALLOW),
        (reader, "POST", "/dicom-web/studies", Verdict.DENY),
        (uploader, "POST", "/dicom-web/studies", Verdict.ALLOW),
        (uploader, "POST", f"/dicom-web/studies/{MINE}", Verdict.ALLOW),
        (uploader, "POST", f"{STUDY}/metadata", Verdict.DENY),
        (uploader, "DELETE", STUDY, Verdict.DENY),
        # Nobody at all.
        (nobody, "GET", f"{STUDY}/metadata", Verdict.SIGN_IN),
        (nobody, "GET", "/dicom-web/studies", Verdict.SIGN_IN),
        # What Orthanc 1.10.1 reads as a DELETE, however spelled.
        (reader, "GET", f"{STUDY}/metadata?_method=DELETE", Verdict.BAD_REQUEST),
        (patient, "GET", f"{STUDY}/metadata?a=1&%5Fmethod=DELETE", Verdict.BAD_REQUEST),
        (patient, "GET", f"{STUDY}/metadata?%5fmethod=%44ELETE", Verdict.BAD_REQUEST),
        (reader, "GET", "/dicom-web/studies?_Method=DELETE", Verdict.BAD_REQUEST),
        (reader, "GET", f"{STUDY}/metadata?the_method=x", Verdict.ALLOW),
    ],
)
def test_gate_decisions(who: Visitor, method: str, uri: str, verdict: Verdict) -> None:
    assert decide(method, uri, who).verdict is verdict


@pytest.mark.parametrize(
    ("headers", "verdict"),
    [
        ({"x-http-method-override": "DELETE"}, Verdict.BAD_REQUEST),
        ({"x-http-method-override": ""}, Verdict.BAD_REQUEST),
        ({"content-encoding": "gzip"}, Verdict.UNSUPPORTED),
        ({"content-encoding": "identity"}, Verdict.ALLOW),
    ],
)
def test_headers_orthanc_would_act_on_are_refused(headers: dict[str, str], verdict: Verdict) -> None:
    for who in (reader, uploader, patient):
        assert decide("GET", f"{STUDY}/metadata", who, headers).verdict is verdict
    assert decide("POST", "/dicom-web/studies", uploader, headers).verdict is verdict


@pytest.mark.parametrize(
    ("who", "holders", "verdict"),
    [
        (reader, ["study-of-the-link"], Verdict.ALLOW),
        (reader, [], Verdict.ALLOW),  # Orthanc answers 404 itself
        (reader, ["a", "b"], Verdict.CONFLICT),
        (patient, ["study-of-the-link"], Verdict.ALLOW),
        (patient, ["study-of-the-link", "another patient's"], Verdict.CONFLICT),
        (patient, ["another patient's"], Verdict.NOT_FOUND),
        (patient, [], Verdict.NOT_FOUND),
    ],
)
def test_a_uid_held_by_several_studies_or_another_study_is_refused(
    who: Visitor, holders: list[str], verdict: Verdict
) -> None:
    allowed = decide("GET", f"{STUDY}/series", who)
    assert owned(allowed, who, MINE, holders).verdict is verdict


@pytest.mark.parametrize(
    ("query", "rest", "limit"),
    [
        ("", "", DEFAULT_LIMIT),
        ("PatientID=*", "PatientID=*", DEFAULT_LIMIT),
        ("PatientID=*&limit=5", "PatientID=*", 5),
        ("limit=0", "", DEFAULT_LIMIT),  # Orthanc reads 0 as "everything"
        ("limit=100000", "", MAX_LIMIT),
        ("limit=3&%6Cimit=100000", "", MAX_LIMIT),  # Orthanc decodes the key and takes the last
        ("LIMIT=7&offset=20", "offset=20", 7),
    ],
)
def test_searches_are_paged(query: str, rest: str, limit: int) -> None:
    assert search_limit(query) == (rest, limit)


@pytest.mark.parametrize("query", ["limit=abc", "limit=-1", "offset=-1", "limit=1e3"])
def test_a_bad_page_is_refused(query: str) -> None:
    with pytest.raises(ValueError):
        search_limit(query)


def test_the_studies_a_search_names() -> None:
    assert searched_studies(f"StudyInstanceUID={MINE}%5C{OTHER}&0020000D={SERIES}") == [MINE, OTHER, SERIES]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", f"StudyInstanceUID={MINE}"),
        ("PatientID=*", f"PatientID=*&StudyInstanceUID={MINE}"),
        (f"StudyInstanceUID={OTHER}", None),
        (f"0020000D={OTHER}", None),
        (f"studyinstanceuid={OTHER}", None),
        (f"StudyInstanceUID={OTHER},{MINE}", f"StudyInstanceUID={MINE}"),
        (f"StudyInstanceUID={OTHER}%5C{MINE}&limit=5", f"limit=5&StudyInstanceUID={MINE}"),
        (f"Study%49nstanceUID={OTHER}", None),
        (
            "includefield=00081030,00080060&limit=1",
            f"includefield=00081030,00080060&limit=1&StudyInstanceUID={MINE}",
        ),
    ],
)
def test_searches_are_narrowed_to_the_granted_study(query: str, expected: str | None) -> None:
    assert narrowed_query(query, MINE) == expected


@pytest.mark.parametrize(
    ("sent", "for_orthanc"),
    [
        ("PatientID=%2A", "PatientID=*"),
        ("PatientName=Doe%5EJ%2A&limit=5", "PatientName=Doe^J*&limit=5"),
        ("includefield=00081030%2C00080060", "includefield=00081030,00080060"),
        ("PatientName=%E5%B1%B1%E7%94%B0", "PatientName=%E5%B1%B1%E7%94%B0"),
        ("PatientName=a%26b", "PatientName=a%26b"),
        ("PatientName=a%3Db%20c", "PatientName=a%3Db%20c"),
    ],
)
def test_plain_escapes_are_written_out_for_orthanc(sent: str, for_orthanc: str) -> None:
    assert orthanc_query(sent) == for_orthanc
