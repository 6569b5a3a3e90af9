"""The settings declaration: parsing what admins type, and the documentation that lists them."""

from __future__ import annotations

import pytest

from control import settings
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
    assert values["web_port"] == 8080
    assert values["institution"] == "Clinic"
    assert values["dicom_aet"] == "ORTHANC"


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
        return next(value for value, _label in setting.choices if value != str(setting.default))
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
    base = {**settings.with_defaults({}), "ssl_enabled": setting.name != "ssl_enabled"}
    changed = {**base, setting.name: other_value(setting)}
    web_front = configs.render_caddy(site, base, topology) != configs.render_caddy(site, changed, topology)
    archive = configs.render_orthanc(site, base, topology) != configs.render_orthanc(site, changed, topology)
    Effect = settings.Effect
    if setting.effect is Effect.NEXT_START:
        return
    assert web_front == (setting.effect is Effect.WEB_FRONT)
    assert archive == (setting.effect in (Effect.ARCHIVE_API, Effect.ARCHIVE_RESTART))
