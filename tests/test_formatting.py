"""The one presentation layer of DICOM values (control.formatting): what people read for each kind."""

from __future__ import annotations

import json

import pytest

from control import activity, formatting

pytestmark = pytest.mark.inprocess


@pytest.mark.parametrize(
    ("stored", "shown"),
    [
        ("Doe^John", "Doe John"),
        ("Doe^John^Paul^Dr.^Jr.", "Doe John Paul Dr. Jr."),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada Tarou = 山田 太郎 = やまだ たろう"),
        ("=山田^太郎", "山田 太郎"),
        ("Müller^Jürgen", "Müller Jürgen"),
        ("^^^", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_person_names(stored: str | None, shown: str) -> None:
    assert formatting.person_name(stored) == shown
    assert formatting.person_name(shown) == shown  # what is shown stays as it is


@pytest.mark.parametrize(
    ("stored", "pattern", "shown"),
    [
        ("20240331", "%Y-%m-%d", "2024-03-31"),
        ("20240331", "%d.%m.%Y", "31.03.2024"),
        ("1997.04.24", "%d/%m/%Y", "24/04/1997"),  # ACR-NEMA's form, in older files
        ("20240231", "%Y-%m-%d", "20240231"),  # no such day: shown as sent
        ("2024031", "%Y-%m-%d", "2024031"),
        ("", "%Y-%m-%d", ""),
    ],
)
def test_dates(stored: str, pattern: str, shown: str) -> None:
    assert formatting.dicom_date(stored, pattern) == shown


@pytest.mark.parametrize(
    ("stored", "shown"),
    [
        ("110000", "11:00:00"),
        ("093015.123456", "09:30:15"),
        ("0930", "09:30"),
        ("09", "09:00"),
        ("09:30:15", "09:30:15"),
        ("256000", "256000"),
        ("", ""),
    ],
)
def test_times(stored: str, shown: str) -> None:
    assert formatting.dicom_time(stored) == shown


def test_date_times_ages_and_codes() -> None:
    assert formatting.dicom_date_time("20261201110000", "%d.%m.%Y") == "01.12.2026 11:00:00"
    assert formatting.dicom_date_time("20261201110000.5+0200", "%Y-%m-%d") == "2026-12-01 11:00:00 UTC+02:00"
    assert formatting.dicom_date_time("2026", "%Y-%m-%d") == "2026"
    assert formatting.when("20261201", "110000", "%Y-%m-%d") == "2026-12-01 11:00:00"
    assert [formatting.age(value) for value in ("045Y", "001Y", "003M", "002W", "010D", "45")] == [
        "45 years",
        "1 year",
        "3 months",
        "2 weeks",
        "10 days",
        "45",
    ]
    assert [formatting.sex(value) for value in ("M", "F", "O", "", "X")] == [
        "Male",
        "Female",
        "Other",
        "",
        "X",
    ]
    assert formatting.modality_meaning("DOC") == "Document (PDF report)"
    assert formatting.modality_list("CT\\MR\\CT") == ["CT", "MR"]
    assert formatting.modality_list(["CT", "CT"]) == ["CT"]
    assert formatting.modalities_text(["CT", "XYZ"]) == "CT (Computed tomography), XYZ"
    assert formatting.patient_label("Doe^John", "P1") == "Doe John (P1)"


def test_every_action_has_its_words() -> None:
    """The activity pages and the CSV never show an action's stored name."""
    for action in activity.Action:
        label = activity.action_label(action.value)
        assert action in activity.ACTION_LABELS and label != action.value and label[0].isupper(), action
    internal = [("study_orthanc_id", "abc"), ("level", "studies"), ("patient", "Doe^John (P1)")]
    words = activity.details(json.dumps(dict(internal)))
    assert words == [("Archive id of the study", "abc"), ("Level", "study"), ("Patient", "Doe John (P1)")]
    assert activity.details('{"study_orthanc_id": "abc", "page": 2}', listed=True) == [("Page", "2")]
