"""The control plane on PostgreSQL, and two instances sharing it as a larger site would.

Instance A is a whole stack (Orthanc, gunicorn, Caddy) whose database is a private PostgreSQL
server. Instance B is a second control plane (``./pacs serve``) on the same database and secrets
and the same archive, as a second machine behind a load balancer would be. Whatever one instance
does, the other sees at once: nothing but the database holds state.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import requests
import sqlalchemy as sa

from bench import processes
from control import db

from conftest import REPOSITORY, Stack, csrf_token, free_port, make_stack, sign_in
from postgres import PostgresServer, binaries

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(binaries() is None, reason="PostgreSQL is not installed"),
]


@pytest.fixture(scope="module")
def shared(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    """Instance A (a full stack) and the URL of instance B (a second control plane)."""
    url = postgres.create_database("pacs")
    secrets = {"PACS_SECRET_SESSION_KEY": "s" * 64, "PACS_SECRET_TOKEN_KEY": "t" * 64}
    first = make_stack(tmp_path_factory.mktemp("instance-a"), PACS_DATABASE_URL=url, **secrets)
    first.start()
    orthanc_user, orthanc_password = first.orthanc_auth
    port = free_port()
    second_env = {
        **first.env,
        "PACS_CONTROL_LISTEN": f"127.0.0.1:{port}",
        "PACS_OHIF_ROOT": str(tmp_path_factory.mktemp("no-viewer")),
        "PACS_SECRET_ORTHANC_USER": orthanc_user,
        "PACS_SECRET_ORTHANC_PASSWORD": orthanc_password,
    }
    second_data = tmp_path_factory.mktemp("instance-b")
    log = second_data / "serve.log"
    second = processes.start_logged(
        [sys.executable, "-m", "control", "--data", str(second_data), "serve"],
        log,
        cwd=REPOSITORY,
        env=second_env,
    )
    second_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return requests.get(f"{second_url}/healthz", timeout=10).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        processes.wait_until_ready(
            second,
            healthy,
            "the second instance",
            timeout=60,
            details=lambda: processes.log_tail(log),
            interval=0.2,
        )
        yield first, second_url
    finally:
        processes.stop(second)
        first.stop()


def test_the_store_is_postgresql(shared: tuple[Stack, str]) -> None:
    first, _second = shared
    assert not (first.data / "control.sqlite3").exists()
    engine = sa.create_engine(first.env["PACS_DATABASE_URL"])
    with engine.connect() as connection:
        assert connection.dialect.name == "postgresql"
        usernames = connection.execute(sa.select(db.users.c.username)).scalars().all()
        version = connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
    engine.dispose()
    assert usernames == ["admin"]
    assert (
        version
        == sorted(p.name.split("_")[0] for p in (REPOSITORY / "control/migrations/versions").glob("0*.py"))[
            -1
        ]
    )


def test_an_account_made_on_one_instance_signs_in_on_the_other(shared: tuple[Stack, str]) -> None:
    first, second = shared
    admin = first.sign_in()
    page = admin.get(f"{first.url}/admin/users/new")
    created = admin.post(
        f"{first.url}/admin/users/new",
        data={
            "username": "roaming",
            "password": "roams far and wide 1",
            "confirm": "roams far and wide 1",
            "csrf_token": csrf_token(page.text),
        },
    )
    assert "Created the account roaming" in created.text
    response = sign_in(requests.Session(), second, "roaming", "roams far and wide 1")
    assert "Signed in as <strong>roaming</strong>" in response.text


def test_a_session_lives_in_the_database_not_in_an_instance(shared: tuple[Stack, str]) -> None:
    first, second = shared
    session = first.sign_in()
    cookie = session.cookies.get("pacs_session")
    on_second = requests.get(f"{second}/", cookies={"pacs_session": cookie})
    assert "Signed in as <strong>admin</strong>" in on_second.text

    requests.post(
        f"{second}/logout", cookies={"pacs_session": cookie}, data={"csrf_token": csrf_token(on_second.text)}
    )
    assert "Signed in as" not in session.get(f"{first.url}/").text


def test_failed_sign_ins_count_across_instances(shared: tuple[Stack, str]) -> None:
    first, second = shared
    for url in (first.url, second, first.url, second, first.url):
        assert sign_in(requests.Session(), url, "roaming", "wrong guess").status_code == 401
    for url in (first.url, second):
        assert sign_in(requests.Session(), url, "roaming", "roams far and wide 1").status_code == 429


def test_a_setting_changed_through_one_instance_shows_on_the_other(shared: tuple[Stack, str]) -> None:
    first, second = shared
    changed = first.pacs("config", "set", "institution", "Shared Hospital Group")
    assert changed.returncode == 0, changed.stderr
    assert "Shared Hospital Group" in requests.get(f"{second}/").text
    assert "Shared Hospital Group" in requests.get(f"{first.url}/").text
