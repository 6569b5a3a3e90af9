"""The admin's pages for web users, in process: accounts made, changed and deleted through the
pages' forms, each change one activity event, and every mistake a clear error next to its field.

The same pages are used through Caddy in test_users.py and test_passwords.py; here each rule
takes a fraction of a second.
"""

from __future__ import annotations

import json

import pytest

from control import accounts

from conftest import activity_rows, add_user, field_error

pytestmark = pytest.mark.inprocess

PASSPHRASE = "a reading room passphrase"
NEW_USER = {
    "username": "Dr.Grey",
    "password": PASSPHRASE,
    "confirm": PASSPHRASE,
    "real_name": "Meredith Grey",
}


def users_of(app) -> dict[str, accounts.UserDetails]:
    with app.extensions["site"].engine.connect() as connection:
        return {user.username: user for user in accounts.list_users(connection)}


def test_an_account_made_on_the_page_is_listed_logged_and_signs_in(app, client, auth) -> None:
    auth.login()
    response = auth.submit("/admin/users/new", data=NEW_USER | {"can_upload": "y"})
    assert response.status_code == 302
    assert "Created the account Dr.Grey." in client.get("/admin/users").text
    made = users_of(app)["Dr.Grey"]
    assert (made.real_name, made.can_upload, made.is_admin) == ("Meredith Grey", True, False)
    [event] = activity_rows(app, action="user-created")
    assert json.loads(event.detail) == {"account": "Dr.Grey", "is_admin": False, "can_upload": True}
    assert PASSPHRASE not in event.detail
    auth.logout()
    assert auth.login("dr.grey", PASSPHRASE).status_code == 302


@pytest.mark.parametrize(
    ("typed", "field", "message"),
    [
        ({"username": "ADMIN"}, "username", "is taken"),
        ({"username": "  "}, "username", "This field is required."),
        ({"confirm": "another passphrase"}, "confirm", "The password and its confirmation differ."),
        ({"password": "short", "confirm": "short"}, "password", "at least 12 characters"),
        ({"password": "password1234", "confirm": "password1234"}, "password", "common and breached"),
        ({"password": "Dr.Grey's own key", "confirm": "Dr.Grey's own key"}, "password", "the username"),
        ({"email": "grey at hospital"}, "email", "Not an e-mail address."),
        ({"username": "x" * 65}, "username", "64 characters"),
    ],
)
def test_a_mistake_in_a_new_account_is_named_next_to_its_field(
    app, client, auth, typed, field, message
) -> None:
    auth.login()
    response = auth.submit("/admin/users/new", data=NEW_USER | typed)
    assert response.status_code == 200
    assert message in (field_error(response.text, field) or "")
    assert set(users_of(app)) == {"admin"}
    assert activity_rows(app, action="user-created") == []


def test_contact_details_are_changed_and_the_fields_named_in_the_log(app, client, auth) -> None:
    grey = add_user(app, "grey", PASSPHRASE)
    auth.login()
    page = f"/admin/users/{grey.id}/edit"
    response = auth.submit(page, data={"real_name": "Meredith Grey", "phone": "+30 210 123 4567"})
    assert response.status_code == 302
    changed = users_of(app)["grey"]
    assert (changed.real_name, changed.phone) == ("Meredith Grey", "+30 210 123 4567")
    [event] = activity_rows(app, action="user-changed")
    assert json.loads(event.detail) == {"account": "grey", "changed": ["phone", "real_name"]}
    response = auth.submit(page, data={"email": "not an address"})
    assert field_error(response.text, "email") == "Not an e-mail address."
    assert users_of(app)["grey"].email == ""


def test_a_rename_and_a_new_password_take_effect_and_are_logged_once(app, client, auth) -> None:
    grey = add_user(app, "grey", PASSPHRASE)
    auth.login()
    page = f"/admin/users/{grey.id}/credentials"
    response = auth.submit(page, data={"username": "grey"})
    assert (
        field_error(response.text, "username") == "Nothing to change: type a new username or a new password."
    )
    new_key = "an entirely new passphrase"
    response = auth.submit(page, data={"username": "m.grey", "password": new_key, "confirm": new_key})
    assert response.status_code == 302
    [event] = activity_rows(app, action="user-changed")
    detail = json.loads(event.detail)
    assert (detail["changed"], detail["old_username"], detail["new_username"]) == (
        ["username", "password"],
        "grey",
        "m.grey",
    )
    auth.logout()
    assert auth.login("grey", PASSPHRASE).status_code == 401
    assert auth.login("m.grey", new_key).status_code == 302


def test_a_new_password_sent_without_its_confirmation_field_is_refused(app, client, auth) -> None:
    # A script's post, not a browser's: the confirmation field is missing altogether.
    grey = add_user(app, "grey", PASSPHRASE)
    auth.login()
    page = f"/admin/users/{grey.id}/credentials"
    response = auth.submit(page, data={"username": "grey", "password": "an unconfirmed passphrase"})
    assert field_error(response.text, "confirm") == "The password and its confirmation differ."
    assert activity_rows(app, action="user-changed") == []
    auth.logout()
    assert auth.login("grey", PASSPHRASE).status_code == 302


def test_the_last_admin_keeps_their_rights_and_nobody_deletes_themselves(app, client, auth) -> None:
    auth.login()
    admin = users_of(app)["admin"]
    for flag in ("is_admin", "is_active"):
        response = auth.submit("/admin/users", f"/admin/users/{admin.id}/flags", {"flag": flag, "value": "0"})
        assert response.status_code == 302
    auth.submit("/admin/users", f"/admin/users/{admin.id}/delete")
    kept = users_of(app)["admin"]
    assert (kept.is_admin, kept.is_active) == (True, True)
    assert [event.action for event in activity_rows(app, username="admin")] == ["sign-in"]


def test_a_deleted_account_goes_and_its_history_stays(app, client, auth) -> None:
    grey = add_user(app, "grey", PASSPHRASE)
    auth.login("grey", PASSPHRASE)
    auth.logout()
    auth.login()
    response = auth.submit(f"/admin/users/{grey.id}/delete")
    assert response.status_code == 302
    assert "grey" not in users_of(app)
    assert [event.action for event in activity_rows(app, user_id=grey.id)] == ["sign-in", "sign-out"]
    assert client.get(f"/admin/users/{grey.id}/edit").status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "data"),
    [
        ("GET", "/admin/users/999/edit", {}),
        ("GET", "/admin/users/999/credentials", {}),
        ("POST", "/admin/users/999/flags", {"flag": "is_active", "value": "0"}),
        ("POST", "/admin/users/999/delete", {}),
        ("GET", "/admin/users/abc/edit", {}),
    ],
)
def test_an_account_that_is_not_there_is_a_404(client, auth, method, path, data) -> None:
    auth.login()
    token = auth.token("/admin/users")
    assert client.open(path, method=method, data={**data, "csrf_token": token}).status_code == 404


@pytest.mark.parametrize("flag", ["password_hash", "", "is_admin'--"])
def test_only_the_pages_own_flags_can_be_set(app, client, auth, flag) -> None:
    grey = add_user(app, "grey", PASSPHRASE)
    auth.login()
    response = auth.submit("/admin/users", f"/admin/users/{grey.id}/flags", {"flag": flag, "value": "1"})
    assert response.status_code == 400
    assert activity_rows(app, action="user-changed") == []
