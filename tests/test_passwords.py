"""Password rules (OWASP ASVS 4.0.3, 2.1) wherever a password is set, and weak old passwords flagged.

The admin's form and the user's own password page are filled in by Chromium; the shell commands
run as an admin would run them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import sqlalchemy as sa

from control import accounts, db
from control.site import Site

from browser import chromium
from conftest import ADMIN_PASSWORD, REPOSITORY, Stack

pytestmark = pytest.mark.stack

# (password, what the page says): the three of the review, a common one long enough, the username.
WEAK = [
    ("password", "at least 12 characters"),
    ("12345678", "at least 12 characters"),
    ("Password1", "at least 12 characters"),
    ("qwerty123456", "on the list of common and breached passwords"),
    ("Password1234", "on the list of common and breached passwords"),
    ("nurse.ratched on duty", "must not contain the username"),
]


def signed_in_page(browser, stack: Stack, username: str, password: str):
    page = browser.new_page()
    page.goto(f"{stack.url}/login")
    page.fill("#username", username)
    page.fill("#password", password)
    with page.expect_navigation():
        page.click("button[type=submit]")
    return page


def test_the_admin_page_refuses_weak_passwords(stack: Stack) -> None:
    with chromium() as browser:
        page = signed_in_page(browser, stack, "admin", ADMIN_PASSWORD)
        for password, message in WEAK:
            page.goto(f"{stack.url}/admin/users/new")
            assert "At least 12 characters" in page.content()
            page.fill("#username", "Nurse.Ratched")
            page.fill("#password", password)
            page.fill("#confirm", password)
            with page.expect_navigation():
                page.get_by_role("button", name="Add user").click()
            assert message in page.content(), password
        page.goto(f"{stack.url}/admin/users")
        assert "Nurse.Ratched" not in page.content()

        page.goto(f"{stack.url}/admin/users/new")
        page.fill("#username", "Nurse.Ratched")
        page.fill("#password", "tea, toast and a quiet ward")
        page.fill("#confirm", "tea, toast and a quiet ward")
        with page.expect_navigation():
            page.get_by_role("button", name="Add user").click()
        assert "Created the account Nurse.Ratched" in page.content()


def test_the_own_password_page_refuses_weak_passwords(stack: Stack) -> None:
    with Site(stack.data).engine.begin() as connection:
        accounts.create_user(connection, "dr.own", "my own first passphrase")
    with chromium() as browser:
        page = signed_in_page(browser, stack, "dr.own", "my own first passphrase")
        page.goto(f"{stack.url}/account/password")
        page.fill("#current", "my own first passphrase")
        page.fill("#password", "1q2w3e4r5t6y")
        page.fill("#confirm", "1q2w3e4r5t6y")
        with page.expect_navigation():
            page.get_by_role("button", name="Change password").click()
        assert "on the list of common and breached passwords" in page.content()
    stack.sign_in("dr.own", "my own first passphrase")


def shell(stack: Stack, *args: str, password: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "control", "--data", str(stack.data), "user", *args],
        input=password + "\n",
        capture_output=True,
        text=True,
        env=stack.env,
        cwd=REPOSITORY,
    )


@pytest.mark.parametrize(("password", "message"), WEAK)
def test_shell_user_add_refuses_weak_passwords(stack: Stack, password: str, message: str) -> None:
    added = shell(stack, "add", "nurse.ratched", password=password)
    assert added.returncode == 1
    assert message in added.stderr


def test_shell_passwd_refuses_weak_passwords(stack: Stack) -> None:
    assert shell(stack, "add", "dr.shell", password="a shell-made passphrase").returncode == 0
    refused = shell(stack, "passwd", "dr.shell", password="qwertyuiop12")
    assert refused.returncode == 1 and "common and breached" in refused.stderr
    stack.sign_in("dr.shell", "a shell-made passphrase")


def test_the_minimum_length_is_a_setting_never_below_8(stack: Stack) -> None:
    refused = stack.pacs("config", "set", "password_min_length", "7")
    assert refused.returncode == 1 and "must be at least 8" in refused.stderr
    assert stack.pacs("config", "set", "password_min_length", "20").returncode == 0
    try:
        short = shell(stack, "add", "dr.twenty", password="only nineteen chars")
        assert short.returncode == 1 and "at least 20 characters" in short.stderr
    finally:
        assert stack.pacs("config", "set", "password_min_length", "12").returncode == 0


def test_an_old_weak_password_keeps_working_and_the_admin_sees_it(stack: Stack) -> None:
    # An account from before the rules: its password was accepted then and has not been typed since.
    with Site(stack.data).engine.begin() as connection:
        connection.execute(
            db.users.insert().values(
                username="dr.oldtimer",
                username_key="dr.oldtimer",
                password_hash=accounts.hash_password("Password1"),
                created_at=db.utcnow(),
            )
        )
    with chromium() as browser:
        admin = signed_in_page(browser, stack, "admin", ADMIN_PASSWORD)
        admin.goto(f"{stack.url}/admin/users")
        row = admin.locator("tr", has_text="dr.oldtimer")
        assert "checked at the next sign-in" in row.inner_text()

        old = signed_in_page(browser, stack, "dr.oldtimer", "Password1")
        assert "Signed in as" in old.content()
        assert "Your password falls short of this site's rules" in old.content()

        admin.goto(f"{stack.url}/admin/users")
        flagged = admin.locator("tr", has_text="dr.oldtimer").inner_text()
        assert "weak: shorter than 12 characters; on the list of common and breached passwords" in flagged

        old.goto(f"{stack.url}/account/password")
        old.fill("#current", "Password1")
        old.fill("#password", "a much better passphrase")
        old.fill("#confirm", "a much better passphrase")
        with old.expect_navigation():
            old.get_by_role("button", name="Change password").click()
        admin.goto(f"{stack.url}/admin/users")
        assert "meets the rules" in admin.locator("tr", has_text="dr.oldtimer").inner_text()
    with Site(stack.data).engine.connect() as connection:
        problem = connection.execute(
            sa.select(db.users.c.password_problem).where(db.users.c.username == "dr.oldtimer")
        ).scalar_one()
    assert problem == ""
