"""The admin's activity log, in process: filters narrow the rows the page and the CSV export show,
days are the site's own, and a bad filter is named next to its field, never an error page.

A log is written with ``record_activity`` as the portal writes it; the real sign-ins, downloads
and refusals behind such rows are tested against a running portal in test_users.py and
test_activity_retention.py.
"""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest

from control import db
from control.activity import Outcome, record_activity
from control.events import SignInEvent, SignOutEvent

from conftest import field_error

pytestmark = pytest.mark.inprocess

EVENTS = [
    # (when, in UTC; what; how it went; who; from where)
    (dt.datetime(2026, 3, 1, 9, 0), SignInEvent(), Outcome.OK, "alice", "10.0.0.5"),
    # 22:30 UTC on the 1st is 00:30 on the 2nd in Athens.
    (dt.datetime(2026, 3, 1, 22, 30), SignInEvent(), Outcome.OK, "bob", "10.0.0.6"),
    (dt.datetime(2026, 3, 2, 10, 0), SignOutEvent(), Outcome.OK, "alice", "10.0.0.5"),
    (dt.datetime(2026, 3, 2, 11, 0), SignInEvent(), Outcome.REFUSED, "alice", "192.0.2.7"),
    (dt.datetime(2026, 3, 3, 8, 0), SignInEvent(), Outcome.REFUSED, '=HYPERLINK("http://x")', "192.0.2.7"),
]


@pytest.fixture
def log(app):
    """The app with the events above in its log, its time zone Europe/Athens, and an admin signed in."""
    with app.extensions["site"].engine.begin() as connection:
        for at, event, outcome, username, address in EVENTS:
            record_activity(
                event, outcome, username=username, client_address=address, at=at, connection=connection
            )
        db.put_settings(connection, {"time_zone": "Europe/Athens"})
    return app


def exported(client, query: str) -> list[dict[str, str]]:
    """The CSV export's rows for the filters of ``query``, without the admin's own sign-in."""
    response = client.get(f"/admin/activity.csv?{query}")
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(response.text)))
    return [row for row in rows if row["user"] != "admin"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", [("Sign-out", "alice"), ("Sign-in", "bob"), ("Sign-in", "alice")]),
        ("user=ALICE", [("Sign-out", "alice"), ("Sign-in", "alice")]),
        ("action=sign-out", [("Sign-out", "alice")]),
        ("address=10.0.0.6", [("Sign-in", "bob")]),
        # Days are the site's: bob's 22:30 UTC sign-in is on the 2nd in Athens.
        ("date_from=2026-03-02&date_to=2026-03-02", [("Sign-out", "alice"), ("Sign-in", "bob")]),
        ("date_to=2026-03-01", [("Sign-in", "alice")]),
        ("list=refused&user=alice", [("Sign-in", "alice")]),
        ("list=tokens", []),
    ],
)
def test_filters_narrow_the_export_to_the_rows_asked_for(log, client, auth, query, expected) -> None:
    auth.login()
    assert [(row["action"], row["user"]) for row in exported(client, query)] == expected


def test_the_page_shows_the_filtered_rows(log, client, auth) -> None:
    auth.login()
    page = client.get("/admin/activity?user=alice").text
    assert "alice" in page and "bob" not in page


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ("date_from=31/02/2026", "date_from", "Not a valid date value."),
        ("date_to=yesterday", "date_to", "Not a valid date value."),
        ("patient=" + "x" * 65, "patient", "64 characters"),
        ("user=" + "x" * 65, "user", "64 characters"),
    ],
)
def test_a_bad_filter_is_named_next_to_its_field_and_the_list_still_shows(
    log, client, auth, query, field, message
) -> None:
    auth.login()
    response = client.get(f"/admin/activity?{query}")
    assert response.status_code == 200
    assert message in (field_error(response.text, field) or "")
    assert "alice" in response.text


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("list=everything", 404),
        ("user_id=alice", 404),
        ("page=-3", 200),
        ("page=many", 200),
        ("page=99", 200),
    ],
)
def test_odd_addresses_of_the_list_are_a_page_or_a_404_never_an_error(
    log, client, auth, query, status
) -> None:
    auth.login()
    assert client.get(f"/admin/activity?{query}").status_code == status
    assert client.get(f"/admin/activity.csv?{query}").status_code == status


def test_the_export_keeps_what_was_typed_from_becoming_a_formula(log, client, auth) -> None:
    auth.login()
    [row] = exported(client, "list=refused&address=192.0.2.7&date_from=2026-03-03")
    assert row["user"] == '\'=HYPERLINK("http://x")'
