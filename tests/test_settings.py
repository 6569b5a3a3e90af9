"""The settings declaration: parsing what admins type, the typed values code reads, and the
documentation that lists them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from flask import Flask

from control import db, services, settings
from control.runtime import configs
from control.site import Site

from conftest import REPOSITORY

pytestmark = pytest.mark.inprocess


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("web_port", "8443", 8443),
        ("web_port", " 0 ", 0),
        ("dicom_port", "104", 104),
        ("institution", "  St. Mary's  ", "St. Mary's"),
        ("zip_content", "jpeg-lossless", "jpeg-lossless"),
        ("session_idle_minutes", "45", 45),
        ("dicom_aet", " ST_TEST-PACS.1 ", "ST_TEST-PACS.1"),
    ],
)
def test_values_are_parsed(name: str, text: str, expected: object) -> None:
    assert settings.BY_NAME[name].parse(text) == expected


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("web_port", "http", "expected a whole number"),
        ("web_port", "70000", "at most 65535"),
        ("web_port", "-1", "at least 0"),
        ("dicom_port", "0", "at least 1"),
        ("zip_content", "jpeg2000", "expected one of dicom, jpeg-lossless"),
        ("session_lifetime_hours", "0", "at least 1"),
        ("dicom_aet", "  ", "needs an AE title"),
        ("dicom_aet", "ARCHIVE-OF-ST-TEST", "at most 16 characters"),
        ("dicom_aet", "PACS\\1", "backslash"),
    ],
)
def test_bad_values_are_refused_with_the_setting_named(name: str, text: str, message: str) -> None:
    setting = settings.BY_NAME[name]
    with pytest.raises(ValueError, match=message) as error:
        setting.parse(text)
    assert str(error.value).startswith(setting.label)


def test_first_run_values_come_from_the_environment() -> None:
    values = settings.first_run_values(
        {"PACS_WEB_PORT": "8080", "PACS_INSTITUTION": "Clinic", "PACS_DICOM_AET": ""}
    )
    assert values.web_port == 8080
    assert values.institution == "Clinic"
    assert values.dicom_aet == "ORTHANC"


def test_the_readme_lists_every_setting_as_declared() -> None:
    readme = (REPOSITORY / "README.md").read_text()
    start = readme.index("<!-- settings:")
    table = readme[readme.index("\n", start) + 1 : readme.index("<!-- end of settings -->")]
    assert table == settings.markdown_table(), "README.md is out of date: paste ./pacs config docs into it"


OTHER_TEXT = {
    "dicom_modalities": "CT1@10.0.0.21:104",
    "time_zone": "Europe/Athens",
    "web_server_name": "pacs.example.org",
    "public_address": "203.0.113.7",
    "contact_phone": "+30 210 555 0100",
    "contact_email": "radiology@example.org",
}


def other_value(setting: settings.Setting) -> object:
    """A valid value other than the default, as an admin might choose."""
    if setting.kind is bool:
        return not setting.default
    if setting.choices:
        return setting.parse(
            next(value for value, _label in setting.choices if value != str(setting.default))
        )
    if setting.kind is int:
        return setting.parse(str(setting.default + 1))
    return setting.parse(OTHER_TEXT.get(setting.name, "Somewhere Else"))


@pytest.mark.parametrize("setting", settings.SETTINGS, ids=[setting.name for setting in settings.SETTINGS])
def test_each_setting_declares_which_configuration_holds_it(setting: settings.Setting, tmp_path) -> None:
    """A setting that reaches the web front's or the archive's configuration must say so, or a
    change would never reach it; one that says so must be in it, or a change would cut transfers
    for nothing."""
    site = Site(tmp_path)
    topology = configs.Topology.from_environment(site)
    # SSL on, so that what only an https site holds (its server name) shows too.
    base = settings.SiteSettings(ssl_enabled=setting.name != "ssl_enabled")
    changed = dataclasses.replace(base, **{setting.name: other_value(setting)})
    web_front = configs.render_caddy(site, base, topology) != configs.render_caddy(site, changed, topology)
    archive = configs.render_orthanc(site, base, topology) != configs.render_orthanc(site, changed, topology)
    Effect = settings.Effect
    if setting.effect is Effect.NEXT_START:
        return
    assert web_front == (setting.effect is Effect.WEB_FRONT)
    assert archive == (setting.effect in (Effect.ARCHIVE_API, Effect.ARCHIVE_RESTART))


def test_the_typed_settings_hold_each_declared_setting_with_its_type() -> None:
    """One attribute a setting, of the declared type and default, and nothing besides."""
    defaults = settings.SiteSettings()
    assert list(vars(defaults)) == [setting.name for setting in settings.SETTINGS]
    hints = typing.get_type_hints(settings.SiteSettings)
    for setting in settings.SETTINGS:
        assert hints[setting.name] is setting.kind, setting.name
        assert type(getattr(defaults, setting.name)) is setting.kind, setting.name
        assert getattr(defaults, setting.name) == setting.default, setting.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults.token_days = 7  # type: ignore[misc]


def test_a_misspelled_setting_is_a_type_error(tmp_path: Path) -> None:
    """What the typed object is for: mypy, not a patient's page, finds a setting that does not
    exist, or one read as what it is not."""
    (tmp_path / "page.py").write_text(MISSPELLED)
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--cache-dir",
            str(REPOSITORY / ".mypy_cache"),
            str(tmp_path / "page.py"),
        ],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 1, checked.stdout
    assert '"SiteSettings" has no attribute "token_dayz"' in checked.stdout
    assert checked.stdout.count("error:") == 2, checked.stdout  # and a str is not an int


MISSPELLED = """
from control import services
days: int = services.settings().token_dayz
port: int = services.settings().institution
"""


def test_stored_values_are_read_with_their_types(app: Flask) -> None:
    """What ``./pacs config set`` or the setup page stored is what a page reads, typed."""
    site = services.site(app)
    with site.engine.begin() as connection:
        db.put_settings(
            connection,
            {
                "token_days": 30,
                "token_identity_check": True,
                "institution": "St. Elsewhere",
                "web_port": 8443,
            },
        )
    with app.test_request_context("/"):
        app.preprocess_request()
        read = services.settings()
        assert (read.token_days, read.token_identity_check, read.institution, read.web_port) == (
            30,
            True,
            "St. Elsewhere",
            8443,
        )
        assert read.time_zone == "UTC"  # not stored: the declared default
    assert site.load_settings() == read
    assert app.test_client().get("/").text.count("St. Elsewhere") >= 2


def test_a_stored_value_of_another_type_is_refused_by_name(app: Flask) -> None:
    """A row edited by hand to hold text where a number belongs fails with the setting named,
    rather than as a string multiplied somewhere in an upload."""
    site = services.site(app)
    with site.engine.begin() as connection:
        db.put_settings(connection, {"upload_max_mb": "2048"})
    with pytest.raises(TypeError, match="upload_max_mb holds '2048', of type str rather than int"):
        site.load_settings()
