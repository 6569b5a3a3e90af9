"""Guessing passwords against the real stack: spellings of a name, several addresses, the admin's locks.

The attackers are Python clients bound to other loopback source addresses (127.0.0.x): Caddy
forwards each one's address to the control plane as it would a remote client's. The admin looks at
the locks and lifts one in Chromium.
"""

from __future__ import annotations

import datetime as dt
import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import sqlalchemy as sa
from requests.adapters import HTTPAdapter

from control import accounts, db
from control.site import Site

from browser import chromium
from conftest import ADMIN_PASSWORD, Stack, sign_in

pytestmark = pytest.mark.stack

# Spellings that sign-in takes for "kristoss" (NFC, then case folding) and that a lowercase
# comparison does not: the Kelvin sign for K, the long s for s, the sharp s for ss.
SPELLINGS = ["\u212aristoss", "kri\u017ftoss", "kristo\u00df", "\u212aRI\u017fTOSS", "KRISTO\u00df"]
_addresses = (f"127.0.{third}.{fourth}" for third, fourth in itertools.product(range(40, 250), range(2, 250)))


class SourceAddressAdapter(HTTPAdapter):
    """Connections that leave from one loopback address, as a client elsewhere would."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def client_from(address: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", SourceAddressAdapter(address))
    return session


def make_account(stack: Stack, username: str, password: str) -> None:
    with Site(stack.data).engine.begin() as connection:
        accounts.create_user(connection, username, password)


def signs_in(response: requests.Response, username: str) -> bool:
    return response.status_code == 200 and f"Signed in as <strong>{username}</strong>" in response.text


def logged(stack: Stack, action: str) -> list[sa.Row]:
    with Site(stack.data).engine.connect() as connection:
        return connection.execute(
            sa.select(db.activity).where(db.activity.c.action == action).order_by(db.activity.c.id)
        ).all()


def test_other_spellings_of_a_name_count_against_its_account(stack: Stack) -> None:
    make_account(stack, "kristoss", "a lighthouse keeper's key")
    checker, attacker = next(_addresses), next(_addresses)
    # Sign-in takes every one of these spellings as the account kristoss ...
    for spelling in SPELLINGS:
        assert signs_in(
            sign_in(client_from(checker), stack.url, spelling, "a lighthouse keeper's key"), "kristoss"
        )
    # ... so wrong passwords under them are guesses at kristoss, and lock it for the guesser.
    guesser = client_from(attacker)
    codes = [
        sign_in(guesser, stack.url, spelling, f"guess {n}").status_code
        for n, spelling in enumerate(SPELLINGS)
    ]
    assert codes == [401] * 5
    locked = sign_in(guesser, stack.url, "kristoss", "a lighthouse keeper's key")
    assert locked.status_code == 429
    assert "Too many failed sign-ins for this account from your address" in locked.text
    # The log keeps what was typed.
    typed = [row.username for row in logged(stack, "sign-in") if row.client_address == attacker]
    assert typed[-5:] == SPELLINGS


def test_guesses_from_one_address_do_not_keep_the_owner_out(stack: Stack) -> None:
    make_account(stack, "dr.owner", "the owner's own passphrase")
    attacker, owner = next(_addresses), next(_addresses)
    guesser = client_from(attacker)
    for n in range(5):
        assert sign_in(guesser, stack.url, "dr.owner", f"guess {n}").status_code == 401
    assert sign_in(guesser, stack.url, "dr.owner", "the owner's own passphrase").status_code == 429
    assert signs_in(
        sign_in(client_from(owner), stack.url, "dr.owner", "the owner's own passphrase"), "dr.owner"
    )


def test_guesses_from_many_addresses_lock_new_addresses_only(stack: Stack) -> None:
    make_account(stack, "dr.target", "many places, one account")
    usual = next(_addresses)
    assert signs_in(
        sign_in(client_from(usual), stack.url, "dr.target", "many places, one account"), "dr.target"
    )

    def guess_from(address: str) -> list[int]:
        guesser = client_from(address)
        return [
            sign_in(guesser, stack.url, "dr.target", f"{address} guess {n}").status_code for n in range(5)
        ]

    # 5 guesses from each of 10 addresses: 50 in all, the account-wide limit of a day.
    botnet = [next(_addresses) for _ in range(10)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(guess_from, botnet))
    assert answers == [[401] * 5] * len(botnet)

    newcomer = sign_in(client_from(next(_addresses)), stack.url, "dr.target", "many places, one account")
    assert newcomer.status_code == 429
    assert "from many places" in newcomer.text
    # Where the owner signed in lately still works, with the right password only.
    assert signs_in(
        sign_in(client_from(usual), stack.url, "dr.target", "many places, one account"), "dr.target"
    )
    assert sign_in(client_from(usual), stack.url, "dr.target", "not it").status_code == 401


def test_the_admin_sees_a_lock_and_lifts_it(stack: Stack) -> None:
    make_account(stack, "dr.locked", "locked out passphrase")
    attacker = next(_addresses)
    guesser = client_from(attacker)
    for n in range(5):
        sign_in(guesser, stack.url, "DR.LOCKED", f"guess {n}")
    assert sign_in(guesser, stack.url, "dr.locked", "locked out passphrase").status_code == 429

    with chromium() as browser:
        page = browser.new_page()
        page.goto(f"{stack.url}/login")
        page.fill("#username", "admin")
        page.fill("#password", ADMIN_PASSWORD)
        with page.expect_navigation():
            page.click("button[type=submit]")
        page.goto(f"{stack.url}/admin/users")
        row = page.locator("#sign-in-locks tr", has_text=attacker)
        assert row.count() == 1
        text = row.inner_text()
        assert "dr.locked" in text and "account from one address" in text and "5" in text
        with page.expect_navigation():
            row.get_by_role("button", name="Lift").click()
        assert f"Lifted the sign-in lock of dr.locked from {attacker}" in page.content()
        assert page.locator("#sign-in-locks tr", has_text=attacker).count() == 0

    assert signs_in(sign_in(guesser, stack.url, "dr.locked", "locked out passphrase"), "dr.locked")
    lifted = [row for row in logged(stack, "sign-in-lock-lifted") if attacker in row.detail]
    assert len(lifted) == 1 and lifted[0].username == "admin"


def test_a_lock_ends_by_itself_after_its_window(stack: Stack) -> None:
    make_account(stack, "dr.patient", "waits a quarter hour")
    attacker = next(_addresses)
    guesser = client_from(attacker)
    for n in range(5):
        sign_in(guesser, stack.url, "dr.patient", f"guess {n}")
    assert sign_in(guesser, stack.url, "dr.patient", "waits a quarter hour").status_code == 429
    # A quarter of an hour later (the failures are moved back in time) the right password works.
    with Site(stack.data).engine.begin() as connection:
        failures = db.sign_in_failures
        connection.execute(
            failures.update()
            .where(failures.c.client_address == attacker)
            .values(at=failures.c.at - dt.timedelta(minutes=15, seconds=1))
        )
    assert signs_in(sign_in(guesser, stack.url, "dr.patient", "waits a quarter hour"), "dr.patient")
