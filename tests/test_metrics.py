"""The Prometheus metrics endpoint: what it counts across gunicorn's workers, and who may read it.

Admins and this machine itself (127.0.0.1 as Caddy sees it) read ``/metrics``; any other client,
here one on another loopback address, gets the 404 of a page that does not exist, signed in or not.
"""

from __future__ import annotations

import re

import pytest
import requests
from requests.adapters import HTTPAdapter

from conftest import Stack, c_store, fresh_study, orthanc_id, sign_in

pytestmark = pytest.mark.stack


class FromAddress(HTTPAdapter):
    """Connections from another address of this machine: a client that is not the machine itself."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def elsewhere() -> requests.Session:
    session = requests.Session()
    session.mount("http://", FromAddress("127.0.0.7"))
    return session


def value(text: str, name: str, **labels: str) -> float:
    """A sample's value in Prometheus' text format (0 when it is not there yet)."""
    wanted = ",".join(f'{key}="{label}"' for key, label in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def scrape(stack: Stack) -> str:
    response = requests.get(f"{stack.url}/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return response.text


def test_the_machine_itself_reads_the_archive_state(stack: Stack) -> None:
    text = scrape(stack)
    assert value(text, "pacs_archive_up") == 1
    assert value(text, "pacs_database_up") == 1
    assert value(text, "pacs_disk_free_bytes") > 0
    assert value(text, "pacs_disk_size_bytes") >= value(text, "pacs_disk_free_bytes")
    studies = requests.get(f"{stack.orthanc_url}/statistics", auth=stack.orthanc_auth).json()["CountStudies"]
    assert value(text, "pacs_archive_resources", level="studies") == studies
    user, password = stack.orthanc_auth
    assert password not in text and user not in text


def test_other_clients_are_refused_unless_signed_in_as_admin(stack: Stack) -> None:
    outsider = elsewhere()
    refused = outsider.get(f"{stack.url}/metrics")
    assert refused.status_code == 404
    assert "pacs_" not in refused.text
    assert sign_in(outsider, stack.url, "admin", "correct horse battery staple").status_code == 200
    admitted = outsider.get(f"{stack.url}/metrics")
    assert admitted.status_code == 200
    assert "pacs_archive_up" in admitted.text


def test_a_user_who_is_not_admin_is_refused_from_elsewhere(stack: Stack) -> None:
    made = stack.pacs("user", "add", "metrics-doctor", input="a long doctor's password\n")
    assert made.returncode == 0, made.stderr
    doctor = elsewhere()
    assert sign_in(doctor, stack.url, "metrics-doctor", "a long doctor's password").status_code == 200
    assert doctor.get(f"{stack.url}/query").status_code == 200
    assert doctor.get(f"{stack.url}/metrics").status_code == 404


def test_requests_sign_in_failures_and_downloads_are_counted_across_workers(stack: Stack) -> None:
    dataset = fresh_study("CT_small.dcm")
    assert c_store(stack, dataset) == 0
    study = orthanc_id(stack, dataset.StudyInstanceUID)
    before = scrape(stack)
    # Enough requests that both workers answer some.
    for _ in range(30):
        assert requests.get(f"{stack.url}/login").status_code == 200
    sign_in(requests.Session(), stack.url, "admin", "not the password")
    admin = stack.sign_in()
    zip_file = admin.get(f"{stack.url}/query/studies/{study}/archive")
    assert zip_file.status_code == 200
    after = scrape(stack)
    login_pages = value(after, "pacs_http_requests_total", kind="sign-in", status="200") - value(
        before, "pacs_http_requests_total", kind="sign-in", status="200"
    )
    assert login_pages >= 30
    refused = {"action": "sign-in", "outcome": "refused"}
    assert (
        value(after, "pacs_activity_events_total", **refused)
        == value(before, "pacs_activity_events_total", **refused) + 1
    )
    sent = value(after, "pacs_transfer_sent_bytes_total", kind="download") - value(
        before, "pacs_transfer_sent_bytes_total", kind="download"
    )
    assert sent == len(zip_file.content)
    assert value(after, "pacs_transfers_in_progress", kind="download") == 0
