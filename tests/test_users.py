"""Web users, sign-in and the activity log, through the real stack (Caddy, gunicorn, database)."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys

import pytest
import requests
import sqlalchemy as sa

from control import db
from control.app import create_app
from control.auth import safe_next
from control.site import Site

from conftest import ADMIN_PASSWORD, REPOSITORY, Stack, csrf_token, sign_in

pytestmark = pytest.mark.stack


class Browser:
    """A signed-in (or not) browser: follows redirects, sends forms with the page's CSRF token."""

    def __init__(self, stack: Stack, username: str | None = None, password: str = ADMIN_PASSWORD) -> None:
        self.stack = stack
        self.session = stack.sign_in(username, password) if username else requests.Session()

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.session.get(f"{self.stack.url}{path}", **kwargs)

    def submit(self, path: str, data: dict, form_page: str | None = None) -> requests.Response:
        """POST ``data`` to ``path`` with the CSRF token of ``form_page`` (default: ``path``)."""
        page = self.get(form_page or path)
        return self.session.post(
            f"{self.stack.url}{path}", data={**data, "csrf_token": csrf_token(page.text)}
        )


def engine(stack: Stack) -> sa.Engine:
    return Site(stack.data).engine


def user_id(stack: Stack, username: str) -> int:
    with engine(stack).connect() as connection:
        return connection.execute(
            sa.select(db.users.c.id).where(db.users.c.username_key == username.casefold())
        ).scalar_one()


def events(stack: Stack, **where: object) -> list[sa.Row]:
    with engine(stack).connect() as connection:
        query = sa.select(db.activity).order_by(db.activity.c.id)
        for column, value in where.items():
            query = query.where(db.activity.c[column] == value)
        return connection.execute(query).all()


def add_user(browser: Browser, username: str, password: str, **flags: bool) -> requests.Response:
    data = {"username": username, "password": password, "confirm": password, "real_name": f"Dr. {username}"}
    data.update({name: "y" for name, on in flags.items() if on})
    return browser.submit("/admin/users/new", data)


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Browser:
    return Browser(stack, "admin")


def test_admin_creates_a_user_who_can_then_sign_in(stack: Stack, admin: Browser) -> None:
    password = "Ωmega-Pässwörd-長い"
    response = add_user(admin, "Physician1", password, can_upload=True)
    assert "Created the account Physician1" in response.text
    row = re.search(r"<tr>\s*<td><a [^>]*>Physician1</a></td>.*?</tr>", response.text, re.S).group(0)
    assert "Dr. Physician1" in row
    assert row.count('class="yes"') == 2  # active and can upload, not admin

    Browser(stack, "physician1", password)  # usernames are case-insensitive
    with pytest.raises(AssertionError):
        Browser(stack, "Physician1", password[:-1])  # nothing is truncated: one char less is wrong


def test_usernames_are_unique_whatever_the_case(admin: Browser) -> None:
    add_user(admin, "Unique.Name", "long enough 1")
    response = add_user(admin, "UNIQUE.NAME", "long enough 2")
    assert "is taken" in response.text
    assert "Created the account" not in response.text


@pytest.mark.parametrize(
    ("password", "confirm", "message"),
    [
        ("short", "short", "at least 12 characters"),
        ("long enough", "long enough!", "confirmation differ"),
    ],
)
def test_weak_or_mismatched_passwords_are_refused(
    admin: Browser, password: str, confirm: str, message: str
) -> None:
    response = admin.submit(
        "/admin/users/new", {"username": "weakling", "password": password, "confirm": confirm}
    )
    assert message in response.text
    assert "weakling" not in admin.get("/admin/users").text


def test_wrong_inactive_and_unknown_get_one_generic_answer(stack: Stack, admin: Browser) -> None:
    add_user(admin, "sleeper", "asleep at the wheel 1")
    uid = user_id(stack, "sleeper")
    admin.submit(f"/admin/users/{uid}/flags", {"flag": "is_active", "value": "0"}, form_page="/admin/users")
    answers = []
    for username, password in [
        ("admin", "wrong password"),
        ("nobody-here", "whatever1"),
        ("sleeper", "asleep at the wheel 1"),
    ]:
        response = sign_in(requests.Session(), stack.url, username, password)
        answers.append(
            (
                response.status_code,
                re.search(r'<p class="flash error"[^>]*>(.*?)</p>', response.text).group(1),
            )
        )
    assert len(set(answers)) == 1, answers
    assert answers[0][0] == 401


def test_deactivation_and_new_password_take_effect_on_the_next_request(stack: Stack, admin: Browser) -> None:
    add_user(admin, "mover", "moves house often")
    mover = Browser(stack, "mover", "moves house often")
    uid = user_id(stack, "mover")

    admin.submit(f"/admin/users/{uid}/flags", {"flag": "is_active", "value": "0"}, form_page="/admin/users")
    assert "Signed in as" not in mover.get("/").text
    admin.submit(f"/admin/users/{uid}/flags", {"flag": "is_active", "value": "1"}, form_page="/admin/users")

    mover = Browser(stack, "mover", "moves house often")
    response = admin.submit(
        f"/admin/users/{uid}/credentials",
        {"username": "mover", "password": "a new secret", "confirm": "a new secret"},
    )
    assert "Changed the password of mover" in response.text
    assert "Signed in as" not in mover.get("/").text  # a new password signs the user out everywhere
    Browser(stack, "mover", "a new secret")


def test_rename_edit_and_delete_from_the_pages_each_logged_once(stack: Stack, admin: Browser) -> None:
    add_user(admin, "temp.user", "temp password")
    uid = user_id(stack, "temp.user")

    admin.submit(
        f"/admin/users/{uid}/edit",
        {"real_name": "Dr. Temp", "phone": "+30 210 0000", "email": "t@example.org", "notes": "locum"},
    )
    edit_page = admin.get(f"/admin/users/{uid}/edit").text
    assert 'value="+30 210 0000"' in edit_page and "locum" in edit_page

    response = admin.submit(
        f"/admin/users/{uid}/credentials", {"username": "renamed.user", "password": "", "confirm": ""}
    )
    assert "Changed the username of renamed.user" in response.text
    Browser(stack, "renamed.user", "temp password")

    confirm = admin.get(f"/admin/users/{uid}/delete")
    assert "Delete renamed.user?" in confirm.text
    assert user_id(stack, "renamed.user") == uid  # a GET deletes nothing
    response = admin.submit(f"/admin/users/{uid}/delete", {})
    assert "Deleted the account renamed.user" in response.text
    assert sign_in(requests.Session(), stack.url, "renamed.user", "temp password").status_code == 401

    changes = [row for row in events(stack) if "temp.user" in row.detail or "renamed.user" in row.detail]
    actions = [row.action for row in changes]
    assert actions.count("user-created") == 1
    assert actions.count("user-deleted") == 1
    assert actions.count("user-changed") == 2  # the contact edit and the rename
    # The deleted user's own history stays, under the name they had.
    assert [row.action for row in events(stack, user_id=uid)].count("sign-in") == 1


def test_user_activity_report_lists_each_action_once_newest_first(stack: Stack, admin: Browser) -> None:
    add_user(admin, "reporter", "writes the news daily")
    uid = user_id(stack, "reporter")
    reporter = Browser(stack, "reporter", "writes the news daily")
    reporter.session.post(f"{stack.url}/logout", data={"csrf_token": csrf_token(reporter.get("/").text)})

    report = admin.get(f"/admin/users/{uid}").text
    actions = re.findall(r"<td>(Sign-in|Sign-out)</td>", report)
    assert actions == ["Sign-out", "Sign-in"]


def test_the_last_admin_and_oneself_are_protected(stack: Stack, admin: Browser) -> None:
    own = user_id(stack, "admin")
    response = admin.submit(
        f"/admin/users/{own}/flags", {"flag": "is_active", "value": "0"}, form_page="/admin/users"
    )
    assert "You cannot deactivate yourself" in response.text
    response = admin.submit(f"/admin/users/{own}/delete", {})
    assert "You cannot delete your own account" in response.text
    assert "Signed in as" in admin.get("/").text


def test_non_admins_get_403_on_every_admin_page(stack: Stack, admin: Browser) -> None:
    add_user(admin, "plain.user", "plain password")
    plain = Browser(stack, "plain.user", "plain password")
    anonymous = requests.Session()
    token = csrf_token(plain.get("/").text)
    app = create_app({"DATA_DIR": stack.data})
    rules = [rule for rule in app.url_map.iter_rules() if rule.endpoint.startswith("admin.")]
    assert len(rules) >= 10
    for rule in rules:
        path = rule.build({name: 1 for name in rule.arguments})[1]
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            response = plain.session.request(
                method, f"{stack.url}{path}", data={"csrf_token": token}, allow_redirects=False
            )
            assert response.status_code == 403, (method, path)
            response = anonymous.request(method, f"{stack.url}{path}", allow_redirects=False)
            assert response.status_code in (302, 400), (method, path)
    refused = [row for row in events(stack, username="plain.user") if row.action == "access-denied"]
    assert len(refused) == sum(len(rule.methods - {"HEAD", "OPTIONS"}) for rule in rules)


def test_posts_without_csrf_token_are_refused_and_change_nothing(stack: Stack, admin: Browser) -> None:
    before = admin.get("/admin/users").text.count("<tr>")
    response = admin.session.post(
        f"{stack.url}/admin/users/new",
        data={"username": "csrf.victim", "password": "whatever12", "confirm": "whatever12"},
    )
    assert response.status_code == 400
    assert admin.get("/admin/users").text.count("<tr>") == before
    response = admin.session.post(f"{stack.url}/logout")
    assert response.status_code == 400
    assert "Signed in as" in admin.get("/").text


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/admin/users", "/admin/users"),
        ("/query?patient_name=A*", "/query?patient_name=A*"),
        ("https://evil.example/", "/"),
        ("//evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("", "/"),
    ],
)
def test_next_after_sign_in_must_be_local(stack: Stack, target: str, expected: str) -> None:
    app = create_app({"DATA_DIR": stack.data})
    with app.test_request_context():
        assert safe_next(target) == expected


def test_sign_in_follows_a_local_next(stack: Stack) -> None:
    session = requests.Session()
    page = session.get(f"{stack.url}/admin/users")
    assert page.url.startswith(f"{stack.url}/login?next=")
    response = session.post(
        f"{stack.url}/login",
        data={
            "username": "admin",
            "password": ADMIN_PASSWORD,
            "next": "/admin/users",
            "csrf_token": csrf_token(page.text),
        },
    )
    assert response.url == f"{stack.url}/admin/users"


def test_idle_sessions_end_on_the_server(stack: Stack) -> None:
    browser = Browser(stack, "admin")
    with engine(stack).begin() as connection:
        newest = sa.select(sa.func.max(db.web_sessions.c.created_at)).scalar_subquery()
        connection.execute(
            db.web_sessions.update()
            .where(db.web_sessions.c.created_at == newest)
            .values(last_seen_at=db.utcnow() - dt.timedelta(minutes=31))
        )
    page = browser.get("/admin/users")
    assert page.url.startswith(f"{stack.url}/login")
    assert "Your session has ended" in page.text
    assert events(stack, action="session-expired")


def test_repeated_failures_lock_the_account_then_release(fresh_stack: Stack) -> None:
    fresh_stack.start()
    session = requests.Session()
    codes = [sign_in(session, fresh_stack.url, "admin", f"guess {n}").status_code for n in range(5)]
    assert codes == [401] * 5
    locked = sign_in(session, fresh_stack.url, "admin", ADMIN_PASSWORD)
    assert locked.status_code == 429
    assert "Too many failed sign-ins" in locked.text
    assert events(fresh_stack, action="locked-out")

    # Fifteen minutes later (the failures are moved back in time) the right password works again.
    with engine(fresh_stack).begin() as connection:
        for table in (db.activity, db.sign_in_failures):
            for row in connection.execute(sa.select(table.c.id, table.c.at)).all():
                earlier = row.at - dt.timedelta(minutes=16)
                connection.execute(table.update().where(table.c.id == row.id).values(at=earlier))
    fresh_stack.sign_in("admin", ADMIN_PASSWORD)

    admin = Browser(fresh_stack, "admin")
    refused = admin.get("/admin/activity", params={"list": "refused"}).text
    assert "127.0.0.1" in refused
    detail = admin.get("/admin/activity", params={"list": "refused", "address": "127.0.0.1"}).text
    assert detail.count("<td>Sign-in locked</td>") == 1
    assert detail.count("<td>Sign-in</td>") == 5


def test_activity_filters_and_csv_export(stack: Stack, admin: Browser) -> None:
    page = admin.get("/admin/activity", params={"list": "users", "user": "admin", "action": "sign-in"})
    rows = re.findall(r'<tr class="outcome-ok">(.*?)</tr>', page.text, re.S)
    assert rows and all("<td>Sign-in</td>" in row and "<td>admin</td>" in row for row in rows)
    bad = admin.get("/admin/activity", params={"date_from": "31/31/2024"})
    assert "Not a valid date value" in bad.text

    export = admin.get("/admin/activity.csv", params={"list": "users", "user": "admin", "action": "sign-in"})
    assert export.headers["Content-Type"].startswith("text/csv")
    lines = export.text.strip().splitlines()
    assert lines[0].startswith("time,action,outcome,user")
    assert len(lines) - 1 == int(re.search(r"(\d+) events", page.text).group(1))


def test_csv_export_neutralises_formulas(stack: Stack, admin: Browser) -> None:
    sign_in(requests.Session(), stack.url, '=HYPERLINK("http://x")', "whatever1")
    export = admin.get("/admin/activity.csv", params={"list": "refused"}).text
    assert "'=HYPERLINK" in export
    assert ",=HYPERLINK" not in export


def test_shell_user_commands(stack: Stack) -> None:
    env = {**stack.env}
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "control",
            "--data",
            str(stack.data),
            "user",
            "add",
            "shell.made",
            "--can-upload",
        ],
        input="from the shell 1\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=REPOSITORY,
    )
    assert added.returncode == 0, added.stderr
    Browser(stack, "shell.made", "from the shell 1")
    listed = stack.pacs("user", "list").stdout
    line = next(line for line in listed.splitlines() if line.startswith("shell.made\t"))
    assert line.split("\t")[1] == "active,upload"
    changed = subprocess.run(
        [sys.executable, "-m", "control", "--data", str(stack.data), "user", "passwd", "shell.made"],
        input="changed in shell\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=REPOSITORY,
    )
    assert changed.returncode == 0, changed.stderr
    Browser(stack, "shell.made", "changed in shell")
    short = subprocess.run(
        [sys.executable, "-m", "control", "--data", str(stack.data), "user", "add", "tiny"],
        input="short\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=REPOSITORY,
    )
    assert short.returncode == 1 and "at least 12 characters" in short.stderr


def test_no_password_or_session_cookie_reaches_the_log_or_the_process_logs(
    stack: Stack, admin: Browser
) -> None:
    secret_words = [ADMIN_PASSWORD, "Ωmega-Pässwörd-長い", "a new secret", "changed in shell", "guess 1"]
    cookie = admin.session.cookies.get("pacs_session")
    with engine(stack).connect() as connection:
        logged = "\n".join(str(tuple(row)) for row in connection.execute(sa.select(db.activity)))
    process_logs = "\n".join(path.read_text(errors="replace") for path in (stack.data / "logs").glob("*.log"))
    for text in (logged, process_logs):
        for word in secret_words:
            assert word not in text
        assert cookie not in text


def test_a_user_needs_only_a_name_and_a_password(stack: Stack, admin: Browser) -> None:
    response = admin.submit(
        "/admin/users/new",
        {"username": "minimal", "password": "just the basics 1", "confirm": "just the basics 1"},
    )
    assert "Created the account minimal" in response.text
    Browser(stack, "minimal", "just the basics 1")


def test_taking_away_the_upload_right_takes_effect_on_the_next_request(stack: Stack, admin: Browser) -> None:
    add_user(admin, "uploader.for.now", "uploads for now", can_upload=True)
    uid = user_id(stack, "uploader.for.now")
    uploader = Browser(stack, "uploader.for.now", "uploads for now")
    assert uploader.get("/upload").status_code == 200
    admin.submit(f"/admin/users/{uid}/flags", {"flag": "can_upload", "value": "0"}, form_page="/admin/users")
    assert uploader.get("/upload").status_code == 403
    assert "Upload files" not in uploader.get("/").text


def test_users_change_their_own_password_and_their_other_sessions_end(stack: Stack, admin: Browser) -> None:
    add_user(admin, "self.service", "first password 1")
    elsewhere = Browser(stack, "self.service", "first password 1")
    here = Browser(stack, "self.service", "first password 1")
    wrong = here.submit(
        "/account/password",
        {"current": "not it", "password": "second password 2", "confirm": "second password 2"},
    )
    assert "This is not your current password" in wrong.text
    short = here.submit(
        "/account/password", {"current": "first password 1", "password": "short", "confirm": "short"}
    )
    assert "at least 12 characters" in short.text
    done = here.submit(
        "/account/password",
        {"current": "first password 1", "password": "second password 2", "confirm": "second password 2"},
    )
    assert "Your password is changed" in done.text
    assert "Signed in as <strong>self.service</strong>" in here.get("/").text
    assert "Signed in as" not in elsewhere.get("/").text
    Browser(stack, "self.service", "second password 2")
