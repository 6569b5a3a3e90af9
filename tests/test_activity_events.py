"""Activity events, in process: one action, one kind of event, one shape of its details.

``control.events`` declares what each kind of event records. These tests keep it the only place
that does: every action has its kind and no second one, a detail that a kind does not declare
cannot be recorded, and the rows written are shaped as the admin's pages, the CSV export and the
rows already in a hospital's log have them.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence

import pytest

from control import events
from control.activity import Action, Outcome, record_activity, update_activity
from control.events import EVENTS, Event
from control.uploads import store

from conftest import activity_rows

pytestmark = pytest.mark.inprocess

KINDS = [
    kind
    for kind in vars(events).values()
    if isinstance(kind, type) and issubclass(kind, Event) and kind is not Event
]
SAMPLES: dict[object, object] = {str: "CT", int: 3, float: 1.5, bool: True}


def sample(hint: object) -> object:
    """A value of the type ``hint`` (one of those the events' fields use)."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return sample(next(arg for arg in typing.get_args(hint) if arg is not type(None)))
    if origin is dict:
        return {"dicom_aet": {"old": "PACS", "new": "ARCHIVE"}}
    if origin is Sequence:
        return ["1.2.3"]
    return SAMPLES[hint]


def required(kind: type[Event]) -> dict[str, object]:
    """Values for the details that ``kind`` always records."""
    hints = typing.get_type_hints(kind)
    return {
        field.name: sample(hints[field.name])
        for field in dataclasses.fields(kind)
        if field.default is dataclasses.MISSING
    }


def test_every_action_has_exactly_one_kind_of_event() -> None:
    assert sorted(EVENTS) == sorted(Action)
    assert sorted(kind.action for kind in KINDS) == sorted(Action)
    assert all(EVENTS[kind.action] is kind for kind in KINDS)


def test_a_second_kind_for_an_action_or_a_kind_without_one_is_refused() -> None:
    with pytest.raises(TypeError, match="already recorded as SignInEvent"):

        @dataclasses.dataclass(frozen=True, kw_only=True)
        class SignInFromAnotherPage(Event):
            action = Action.SIGN_IN
            page: str = ""

    with pytest.raises(TypeError, match="names no action of its own"):

        @dataclasses.dataclass(frozen=True, kw_only=True)
        class SignInWithAReason(events.SignInEvent):
            reason: str = ""

    assert EVENTS[Action.SIGN_IN] is events.SignInEvent


@pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.__name__)
def test_a_detail_that_a_kind_does_not_declare_cannot_be_recorded(kind: type[Event]) -> None:
    event = kind(**required(kind))
    assert list(event.detail()) == list(required(kind))
    with pytest.raises(TypeError, match="unexpected keyword argument 'ward'"):
        kind(**required(kind), ward="radiology")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.ward = "radiology"  # type: ignore[attr-defined]


def test_the_old_free_form_call_is_refused_and_writes_nothing(app) -> None:
    with app.app_context(), pytest.raises(TypeError):
        record_activity(Action.SIGN_OUT, reason="typed by hand")
    assert activity_rows(app, action="sign-out") == []


def test_a_download_row_has_the_shape_the_log_always_had(app) -> None:
    """Recorded as not completed before its first byte, then brought up to date: the details a
    download had before are left out, the order is the one the event's page has always shown."""
    started = events.DownloadEvent(
        level="studies",
        orthanc_id="6b9e19d9-62094390-5f9ddb01-4a191ae7-9766b715",
        content="dicom",
        bytes_sent=0,
        completed=False,
        range="0-99/1000",
        stopped_by="server",
    )
    with app.app_context():
        event_id = record_activity(started, Outcome.FAILED, patient="Doe^Jane (P7)", study="1.2.3")
        [row] = activity_rows(app, action="download")
        assert list(json.loads(row.detail).items()) == [
            ("level", "studies"),
            ("orthanc_id", "6b9e19d9-62094390-5f9ddb01-4a191ae7-9766b715"),
            ("content", "dicom"),
            ("bytes_sent", 0),
            ("completed", False),
            ("range", "0-99/1000"),
            ("stopped_by", "server"),
        ]
        update_activity(
            event_id,
            Outcome.OK,
            dataclasses.replace(started, bytes_sent=100, completed=True, stopped_by=None),
        )
    [row] = activity_rows(app, action="download")
    assert (row.outcome, row.patient, row.study) == ("ok", "Doe^Jane (P7)", "1.2.3")
    assert json.loads(row.detail) == {
        "level": "studies",
        "orthanc_id": "6b9e19d9-62094390-5f9ddb01-4a191ae7-9766b715",
        "content": "dicom",
        "bytes_sent": 100,
        "completed": True,
        "range": "0-99/1000",
    }


def test_a_detail_always_recorded_is_recorded_when_unknown_too(app) -> None:
    with app.app_context():
        record_activity(events.SearchEvent(level="studies", criteria={"modality": "CT"}, page=1, total=None))
    [row] = activity_rows(app, action="search")
    assert json.loads(row.detail) == {
        "level": "studies",
        "criteria": {"modality": "CT"},
        "page": 1,
        "total": None,
    }


def test_an_upload_event_declares_the_count_of_every_outcome_of_a_file() -> None:
    """An upload's event carries the count of each outcome a file can have (``store.Outcome``):
    a new outcome without its field here would fail every upload that has one."""
    declared = {field.name for field in dataclasses.fields(events.UploadEvent)}
    assert {outcome.name.lower() for outcome in store.Outcome} <= declared


def test_the_event_page_shows_a_recorded_event_in_words(app, client, auth) -> None:
    with app.app_context():
        event_id = record_activity(
            events.UserChangedEvent(
                account="grey", changed=["can_upload"], old={"can_upload": False}, new={"can_upload": True}
            ),
            username="admin",
        )
    auth.login()
    page = client.get(f"/admin/activity/{event_id}").text
    assert "Changed an account" in page
    assert "can_upload: no" in page and "can_upload: yes" in page
