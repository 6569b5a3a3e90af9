"""The admin's setup page refuses bad values next to their fields and changes nothing, in process.

The form is sent as the page fills it in, with one field typed over, as an admin's browser sends
it. Changes that reach Caddy or Orthanc (ports, SSL, the archive's DICOM settings) are tested
against a running portal in test_setup.py and test_ssl_switch_browser.py; here are the checks
that come before anything is applied, and the settings that apply by being stored.
"""

from __future__ import annotations

import io

import pytest

from control.settings import SiteSettings

from conftest import activity_rows, field_error, form_values

pytestmark = pytest.mark.inprocess

BAD_VALUES = [
    ("token_days", "5", "expected one of 7, 14, 30"),
    ("session_idle_minutes", "0", "must be at least 1"),
    ("session_lifetime_hours", "twelve", "expected a whole number, got 'twelve'"),
    ("web_port", "70000", "must be at most 65535"),
    ("time_zone", "Mars/Olympus", "is not a time zone name"),
    ("date_format", "%s", "expected one of"),
    ("contact_email", "imaging at example.org", "is not an e-mail address"),
    ("contact_phone", "call <script>", "is not a phone number"),
    ("public_address", "ftp://pacs.example.org", "is not a host name or an address"),
    ("password_min_length", "4", "must be at least 8"),
    ("dicom_modalities", "CT1@10.0.0.21", "is not AET@host:port"),
    # Orthanc 1.10.1 does not start with an AE title that is empty or longer than 16 characters.
    ("dicom_aet", "", "AE title"),
    ("dicom_aet", "MAIN ARCHIVE OF ST TEST", "at most 16 characters"),
]


def stored_settings(app) -> SiteSettings:
    return app.extensions["site"].load_settings()


def send_settings(client, **typed: str):
    page = client.get("/admin/settings")
    assert page.status_code == 200
    values = form_values(page.text, "institution") | typed
    return client.post("/admin/settings", data=values)


@pytest.mark.parametrize(("name", "text", "message"), BAD_VALUES)
def test_a_bad_value_is_refused_next_to_its_field_and_nothing_changes(
    app, client, auth, name, text, message
) -> None:
    auth.login()
    before = stored_settings(app)
    response = send_settings(client, **{name: text}, institution="St. Elsewhere")
    assert response.status_code == 400
    assert message in (field_error(response.text, name) or "")
    # The admin's typing stays on the page, to be put right.
    assert form_values(response.text, "institution")["institution"] == "St. Elsewhere"
    assert stored_settings(app) == before
    assert activity_rows(app, action="settings-changed") == []


def test_every_bad_value_is_named_at_once(app, client, auth) -> None:
    auth.login()
    response = send_settings(client, token_days="5", time_zone="Nowhere", web_port="port")
    assert response.status_code == 400
    assert all(field_error(response.text, name) for name in ("token_days", "time_zone", "web_port"))


def test_a_certificate_that_is_not_one_is_refused_and_ssl_stays_off(app, client, auth) -> None:
    auth.login()
    page = client.get("/admin/settings")
    values = form_values(page.text, "institution") | {"ssl_enabled": "yes"}
    files = {
        "certificate": (io.BytesIO(b"not a certificate"), "site.crt"),
        "key": (io.BytesIO(b"not a key"), "site.key"),
    }
    response = client.post("/admin/settings", data=values | files, content_type="multipart/form-data")
    assert response.status_code == 400
    assert 'class="field-error" role="alert"' in response.text
    assert stored_settings(app).ssl_enabled is False
    assert not (app.extensions["site"].secrets_dir / "tls" / "site.crt").exists()


def test_half_a_pair_is_refused_with_what_is_missing(app, client, auth) -> None:
    auth.login()
    values = form_values(client.get("/admin/settings").text, "institution")
    response = client.post(
        "/admin/settings",
        data={**values, "certificate": (io.BytesIO(b"-----BEGIN CERTIFICATE-----"), "site.crt")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 400
    assert "Select both the certificate file and the private key file." in response.text


def test_a_stored_setting_is_saved_shown_and_logged_with_old_and_new(app, client, auth) -> None:
    auth.login()
    response = send_settings(client, institution="St. Elsewhere", token_days="30", token_identity_check="yes")
    assert response.status_code == 302
    assert response.headers["Location"] == "/admin/settings?saved=1"
    stored = stored_settings(app)
    assert (stored.institution, stored.token_days, stored.token_identity_check) == (
        "St. Elsewhere",
        30,
        True,
    )
    assert "St. Elsewhere" in client.get("/login").text
    [row] = activity_rows(app, action="settings-changed")
    assert row.username == "admin"
    assert '"institution": {"old": "Sante Radiology", "new": "St. Elsewhere"}' in row.detail


def test_the_page_as_it_stands_saves_nothing(app, client, auth) -> None:
    auth.login()
    before = stored_settings(app)
    response = send_settings(client)
    assert response.status_code == 302
    assert stored_settings(app) == before
    assert activity_rows(app, action="settings-changed") == []


def test_no_token_changes_nothing(app, client, auth) -> None:
    auth.login()
    values = form_values(client.get("/admin/settings").text, "institution")
    values.pop("csrf_token")
    response = client.post("/admin/settings", data={**values, "institution": "St. Elsewhere"})
    assert response.status_code == 400
    assert stored_settings(app).institution != "St. Elsewhere"
