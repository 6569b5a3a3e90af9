"""Every site setting of the portal, declared once.

A setting has a name, a type, a default, a label and help text, and says what the running portal
must do when it changes (its ``effect``; ``control.runtime.apply`` does it). Each is one field of
``SiteSettings`` below, the typed values that code reads (``settings.token_days``); ``SETTINGS`` lists
the same declarations, from which the admin's setup page, the ``./pacs config`` commands and the
settings section of the documentation are built, so a setting added here appears everywhere at once.

Values live in the ``settings`` table of the control plane's database (see ``control.db``): the
running portal and every instance sharing that database read the same values. On the first run the
defaults can be given by environment variables (``PACS_WEB_PORT=8443 ./pacs up``); after that the
database wins, so a second ``up`` keeps what the admin chose.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar, get_type_hints


class Effect(enum.Enum):
    """What the running portal must do when a setting changes."""

    # The control plane reads settings at every request: the next page has the new value.
    NOTHING = "nothing"
    # In the web front's configuration: Caddy loads a new one, which ends every transfer in progress.
    WEB_FRONT = "reload the web front"
    # Told to the archive through its REST API at once, and written into its configuration file.
    ARCHIVE_API = "tell the archive"
    # In the archive's configuration file only: the archive restarts, which ends its transfers.
    ARCHIVE_RESTART = "restart the archive"
    # Read by the processes when they start only: stored now, in force from the next start.
    NEXT_START = "next start"

    @property
    def described(self) -> str:
        """What changing it does, in the documentation's words."""
        return {
            Effect.NOTHING: "at once",
            Effect.WEB_FRONT: "reloads the web front ¹",
            Effect.ARCHIVE_API: "at once, told to the archive",
            Effect.ARCHIVE_RESTART: "restarts the archive ¹",
            Effect.NEXT_START: "at the next start",
        }[self]


@dataclass(frozen=True)
class Setting:
    """One site setting: what it is called, what it holds and what it means to an admin."""

    name: str
    kind: type
    default: Any
    label: str
    help: str
    env: str | None = None
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[tuple[str, str], ...] = ()  # (value, what the admin sees)
    check: Callable[[str], None] | None = None  # raises ValueError for a value it refuses
    effect: Effect = Effect.NOTHING
    # A port one of the stack's processes listens on: it must be free before the stack takes it.
    listening_port: bool = False

    def parse(self, text: str) -> Any:
        """Turn text from a form, a shell or the environment into a value, or raise ValueError."""
        text = text.strip()
        if self.kind is bool:
            lowered = text.lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(f"{self.label}: expected yes or no, got {text!r}")
        if self.choices and text not in {value for value, _label in self.choices}:
            allowed = ", ".join(value for value, _label in self.choices)
            raise ValueError(f"{self.label}: expected one of {allowed}, got {text!r}")
        if self.kind is int:
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"{self.label}: expected a whole number, got {text!r}") from None
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"{self.label}: must be at least {self.minimum}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"{self.label}: must be at most {self.maximum}")
            return value
        if self.check:
            try:
                self.check(text)
            except ValueError as error:
                raise ValueError(f"{self.label}: {error}") from None
        return text


def _time_zone(name: str) -> None:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not a time zone name such as Europe/Athens or UTC") from None


_HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$|^\[?[0-9A-Fa-f:.]+\]?$")


def _host_name(text: str) -> None:
    if text and not _HOST_NAME.match(text):
        raise ValueError(f"{text!r} is not a host name or an address")


_PHONE = re.compile(r"^\+?\(?[0-9][0-9 ()./-]{2,38}$")
_EMAIL = re.compile(r"^[^@\s<>\"]{1,64}@[A-Za-z0-9.-]{1,252}\.[A-Za-z]{2,63}$")


def _phone(text: str) -> None:
    if text and not _PHONE.match(text):
        raise ValueError(f"{text!r} is not a phone number (digits, spaces, + ( ) . / -)")


def _email(text: str) -> None:
    if text and not _EMAIL.match(text):
        raise ValueError(f"{text!r} is not an e-mail address")


def _ae_title(text: str) -> None:
    # Orthanc does not start with an empty AE title or one longer than DICOM's 16 characters; a
    # backslash or a control character is not allowed in one either (DICOM PS3.5, AE).
    if not text:
        raise ValueError("the archive needs an AE title")
    if len(text) > 16:
        raise ValueError(f"{text!r} is longer than an AE title may be (at most 16 characters)")
    if "\\" in text or not text.isprintable():
        raise ValueError(f"{text!r}: an AE title may not hold a backslash or control characters")


@dataclass(frozen=True)
class Modality:
    """A DICOM modality allowed to query the worklist and the archive (``dicom_modalities``)."""

    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"

    @property
    def host_is_address(self) -> bool:
        """Whether the host is an IPv4 address written plainly, the only form the archive can match.

        Orthanc (``DicomCheckModalityHost``) compares a caller's address with the registered host as
        text: a host name, or an address written another way (``010.0.0.1``), never matches.
        """
        try:
            return str(ipaddress.IPv4Address(self.host)) == self.host
        except ValueError:
            return False

    def as_orthanc(self) -> dict[str, Any]:
        """What Orthanc is told about it: its ``DicomModalities`` entry, the same in the
        configuration file and in ``PUT /modalities/{aet}`` (so both always agree)."""
        return {"AET": self.aet, "Host": self.host, "Port": self.port}


# AE titles are kept to letters, digits and _ . - so that one can also name the modality in
# Orthanc's REST API (``/modalities/{name}``) without any escaping.
_MODALITY = re.compile(
    r"^([A-Za-z0-9_.-]{1,16})@([A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):([0-9]{1,5})$"
)


def parse_modalities(text: str) -> list[Modality]:
    """The modalities of ``text``: ``AET@host:port`` items separated by spaces or commas."""
    found: list[Modality] = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        match = _MODALITY.match(item)
        if not match:
            raise ValueError(
                f"{item!r} is not AET@host:port (an AE title of up to 16 letters, digits, _ . or -)"
            )
        modality = Modality(match.group(1), match.group(2), int(match.group(4)))
        if not 1 <= modality.port <= 65535:
            raise ValueError(f"{item!r}: the port must be between 1 and 65535")
        if any(other.aet.upper() == modality.aet.upper() for other in found):
            raise ValueError(f"the AE title {modality.aet} is listed twice")
        found.append(modality)
    return found


def registrable(text: str) -> list[Modality]:
    """The modalities of ``text`` as a new registration must give them: each host an IPv4 address."""
    modalities = parse_modalities(text)
    for modality in modalities:
        if not modality.host_is_address:
            raise ValueError(
                f"{modality}: give the modality's IP address (such as 10.0.0.21), not a name: the archive "
                "checks that each call comes from that address"
            )
    return modalities


def _modalities(text: str) -> None:
    registrable(text)


T = TypeVar("T")


def declare(
    default: T,
    label: str,
    help: str,
    *,
    env: str | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
    choices: tuple[tuple[str, str], ...] = (),
    check: Callable[[str], None] | None = None,
    effect: Effect = Effect.NOTHING,
    listening_port: bool = False,
) -> T:
    """One field of ``SiteSettings``: the setting's default and what the admin reads about it
    (its name and type are the field's; see ``Setting`` for the rest)."""
    details = {
        "label": label,
        "help": help,
        "env": env,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "check": check,
        "effect": effect,
        "listening_port": listening_port,
    }
    return field(default=default, metadata={"setting": details})


def _port(default: int, label: str, help: str, env: str, effect: Effect, minimum: int = 1) -> int:
    return declare(
        default, label, help, env=env, minimum=minimum, maximum=65535, effect=effect, listening_port=True
    )


@dataclass(frozen=True)
class SiteSettings:
    """The site settings with their values, each typed as declared here (one field a setting).

    Code reads a setting as an attribute (``settings.token_days`` is an int), so that a misspelled
    name is an error for the type checker rather than a KeyError on a page. The values are
    read-only: a change goes through ``control.runtime.apply.change_settings``, which stores it.
    """

    institution: str = declare(
        "Sante Radiology",
        "Institution",
        "Shown on every page so that users know which archive they reached.",
        env="PACS_INSTITUTION",
    )
    department: str = declare(
        "Imaging Department",
        "Department",
        "Shown beside the institution on every page.",
        env="PACS_DEPARTMENT",
    )
    web_port: int = _port(
        3000,
        "Web port",
        "The port browsers connect to; forward it on the router for access from outside. "
        "0 turns web access off entirely (the DICOM port keeps working).",
        "PACS_WEB_PORT",
        Effect.WEB_FRONT,
        minimum=0,
    )
    dicom_port: int = _port(
        4242,
        "DICOM port",
        "The port modalities send studies to and query (C-STORE, C-FIND, worklist).",
        "PACS_DICOM_PORT",
        Effect.ARCHIVE_RESTART,
    )
    dicom_aet: str = declare(
        "ORTHANC",
        "DICOM AE title",
        "The archive's application entity title, as modalities must call it.",
        env="PACS_DICOM_AET",
        check=_ae_title,
        effect=Effect.ARCHIVE_RESTART,
    )
    orthanc_http_port: int = _port(
        8042,
        "Archive's internal HTTP port",
        "Loopback port of the archive's own HTTP interface. Only the portal reaches it, with "
        "credentials of its own; browsers never do.",
        "PACS_ORTHANC_HTTP_PORT",
        Effect.NEXT_START,
    )
    ssl_enabled: bool = declare(
        False,
        "Enable SSL encryption",
        "Serve https only, with the site's own certificate and private key (from its certificate "
        "provider, for the web server name). Strongly recommended: without it, use the portal only "
        "over a VPN.",
        effect=Effect.WEB_FRONT,
    )
    hsts_include_subdomains: bool = declare(
        False,
        "HSTS for subdomains too",
        "With SSL on, browsers are told to reach this server name over https only, for a year "
        "(HSTS). Ticked, that holds for every name under it as well (includeSubDomains): only when "
        "all of them serve https.",
        effect=Effect.WEB_FRONT,
    )
    web_server_name: str = declare(
        "",
        "Web server name",
        "The portal's DNS name (e.g. pacs.example.org), used in the links sent to patients. Keep it "
        "blank when there is no valid DNS name: links then use the internet address.",
        env="PACS_WEB_SERVER_NAME",
        check=_host_name,
        # With SSL on, the web front answers browsers that give no server name with this one's
        # certificate; without SSL its configuration does not hold it.
        effect=Effect.WEB_FRONT,
    )
    public_address: str = declare(
        "",
        "Internet address (true IP)",
        "The address the portal is reached at from the internet, used in patients' links when there "
        "is no web server name. Blank: this machine's own address is used.",
        env="PACS_PUBLIC_ADDRESS",
        check=_host_name,
    )
    token_days: int = declare(
        60,
        "Studies are accessible via tokens for",
        "How long patients' links work, counted from the study date (or from the day the link was "
        "first issued when the study has no date or a future one).",
        choices=tuple(
            (str(days), label)
            for days, label in (
                (7, "1 week"),
                (14, "2 weeks"),
                (30, "1 month (30 days)"),
                (60, "2 months (60 days)"),
                (90, "3 months (90 days)"),
                (180, "6 months (180 days)"),
                (365, "1 year"),
            )
        ),
    )
    token_identity_check: bool = declare(
        False,
        "Ask patients for their birth date",
        "Before a patient's link shows the study, ask for the patient's date of birth; repeated wrong "
        "answers lock the link for a while.",
    )
    contact_phone: str = declare(
        "",
        "Patients' contact phone",
        "The phone number patients call about their links (one expired, one that does not open, a "
        "question about a study), shown on patients' pages, e.g. +30 210 123 4567. Blank: none shown.",
        check=_phone,
    )
    contact_email: str = declare(
        "",
        "Patients' contact e-mail",
        "The e-mail address patients write to about their links, shown on patients' pages beside the "
        "phone, e.g. imaging@example.org. Blank: none shown.",
        check=_email,
    )
    zip_content: str = declare(
        "dicom",
        "Zip files contain",
        "What downloads hold: the DICOM files as stored, or recompressed to JPEG lossless "
        "(transfer syntax 1.2.840.10008.1.2.4.70), smaller for most images and still exact.",
        choices=(
            ("dicom", "DICOM files as stored"),
            ("jpeg-lossless", "DICOM files JPEG lossless compressed"),
        ),
    )
    zip_dicomdir: bool = declare(
        False,
        "Add a DICOMDIR to zip files",
        "Zips then hold the files in the layout of a DICOM CD (PT000000/ST000000/...) with a "
        "DICOMDIR index, which many viewers open directly. The zip page lets each download "
        "choose otherwise.",
    )
    date_format: str = declare(
        "%Y-%m-%d",
        "Date format",
        "How dates are shown on every page.",
        choices=(
            ("%Y-%m-%d", "2024-03-31 (ISO)"),
            ("%d/%m/%Y", "31/03/2024"),
            ("%m/%d/%Y", "03/31/2024"),
            ("%d.%m.%Y", "31.03.2024"),
        ),
    )
    time_zone: str = declare(
        "UTC",
        "Time zone",
        "Times in the activity log are stored in UTC and shown in this zone (an IANA name such as "
        "Europe/Athens).",
        env="PACS_TIME_ZONE",
        check=_time_zone,
    )
    activity_keep_years: int = declare(
        0,
        "Keep the activity log for (years)",
        "Activity older than this many years is exported to a compressed CSV file in the data "
        "directory's activity-exports/ folder and then removed from the log, once a day. 0 keeps "
        "everything.",
        minimum=0,
        maximum=100,
    )
    session_idle_minutes: int = declare(
        30,
        "Idle sign-out (minutes)",
        "A signed-in user who does nothing for this long must sign in again.",
        minimum=1,
        maximum=24 * 60,
    )
    session_lifetime_hours: int = declare(
        12,
        "Longest session (hours)",
        "However active, a session ends this long after sign-in.",
        minimum=1,
        maximum=24 * 30,
    )
    password_min_length: int = declare(
        12,
        "Shortest password",
        "New passwords need at least this many characters (8 at the least). Whatever their length, "
        "passwords on the shipped list of common and breached passwords, and passwords that contain "
        "the username, are refused. Existing passwords keep working; the web users page shows which "
        "ones fall short, as found at their owner's last sign-in.",
        minimum=8,
        maximum=64,
    )
    upload_max_mb: int = declare(
        2048,
        "Largest upload (MB)",
        "The most one upload request may carry (a DICOM file, a zip, an HL7 file or a PDF report). "
        "The control plane refuses larger ones with a clear page before they are sent (the web "
        "front asks it first).",
        env="PACS_UPLOAD_MAX_MB",
        minimum=1,
        maximum=1024 * 1024,
    )
    upload_max_unpacked_mb: int = declare(
        16384,
        "Largest unpacked zip (MB)",
        "The most one uploaded zip may unpack to, counted as it is read (whatever its headers claim); "
        "the members past it are refused.",
        minimum=1,
        maximum=1024 * 1024,
    )
    disk_reserve_mb: int = declare(
        2048,
        "Free disk space kept (MB)",
        "Uploads are refused while the archive's disk has less free space than this, so that the "
        "archive never fills its disk.",
        env="PACS_DISK_RESERVE_MB",
        minimum=0,
        maximum=1024 * 1024 * 1024,
    )
    dicom_modalities: str = declare(
        "",
        "Registered modalities",
        "The modalities that may query the worklist and the archive over DICOM (C-FIND, C-MOVE, "
        "C-GET), as AET@address:port separated by spaces, e.g. CT1@10.0.0.21:104. A call is let in "
        "only when its AE title and the IP address it comes from are both those registered: DICOM has "
        "no passwords, so that pair is the only lock. Give each modality a fixed address.",
        check=_modalities,
        effect=Effect.ARCHIVE_API,
    )
    default_encoding: str = declare(
        "Utf8",
        "Character set of files that name none",
        "How the archive reads the text of DICOM files that do not say their character set "
        "(no Specific Character Set), as older modalities send them: with the wrong one, letters "
        "such as ü or é are lost from names. Most European sites with older modalities need "
        "Latin-1. Applies to files stored from now on; those stored before keep their names.",
        # Orthanc's own names for them (its DefaultEncoding, and PUT /tools/default-encoding).
        choices=(
            ("Utf8", "Unicode (UTF-8)"),
            ("Ascii", "ASCII only"),
            ("Latin1", "Western European (Latin-1, ISO 8859-1)"),
            ("Latin2", "Central European (Latin-2, ISO 8859-2)"),
            ("Latin3", "South European (Latin-3, ISO 8859-3)"),
            ("Latin4", "North European (Latin-4, ISO 8859-4)"),
            ("Latin5", "Turkish (Latin-5, ISO 8859-9)"),
            ("Cyrillic", "Cyrillic (ISO 8859-5)"),
            ("Windows1251", "Cyrillic (Windows-1251)"),
            ("Greek", "Greek (ISO 8859-7)"),
            ("Arabic", "Arabic (ISO 8859-6)"),
            ("Hebrew", "Hebrew (ISO 8859-8)"),
            ("Thai", "Thai (TIS 620-2533)"),
            ("Japanese", "Japanese (JIS X 0201)"),
            ("JapaneseKanji", "Japanese (JIS X 0208, Kanji)"),
            ("Korean", "Korean (KS X 1001)"),
            ("Chinese", "Chinese (GB18030)"),
            ("SimplifiedChinese", "Simplified Chinese (GB2312)"),
        ),
        effect=Effect.ARCHIVE_API,
    )
    dicom_store_from: str = declare(
        "any",
        "Modalities that may store",
        "Who may send studies to the archive over DICOM (C-STORE). Refused stores are recorded in "
        "the activity log with the caller's AE title and address. Changing this restarts the archive "
        "for a few seconds.",
        choices=(
            ("any", "Any modality"),
            ("registered", "Registered modalities only (AE title and address)"),
        ),
        effect=Effect.ARCHIVE_RESTART,
    )

    def __post_init__(self) -> None:
        # Values come from the database as JSON: one of another type (a row edited by hand, a port
        # stored as the text "8443") would otherwise fail far from here, on a page or in Caddy.
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if type(value) is not setting.kind:
                raise TypeError(
                    f"the setting {setting.name} holds {value!r}, "
                    f"of type {type(value).__name__} rather than {setting.kind.__name__}"
                )

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> SiteSettings:
        """Stored values over the declared defaults; names no longer declared are left out."""
        return cls(**{name: value for name, value in stored.items() if name in BY_NAME})

    def as_dict(self) -> dict[str, Any]:
        """Every value by its setting's name, for what goes through the declarations one by one
        (the setup page, ``./pacs config show``, the record of the running configuration)."""
        return {setting.name: getattr(self, setting.name) for setting in SETTINGS}


_KINDS = get_type_hints(SiteSettings)
SETTINGS: tuple[Setting, ...] = tuple(
    Setting(item.name, _KINDS[item.name], item.default, **item.metadata["setting"])
    for item in fields(SiteSettings)
)

BY_NAME: Mapping[str, Setting] = {setting.name: setting for setting in SETTINGS}


def first_run_values(environ: Mapping[str, str] | None = None) -> SiteSettings:
    """The values a new installation starts with: defaults, overridden by the environment."""
    environ = os.environ if environ is None else environ
    values = {}
    for setting in SETTINGS:
        if setting.env and environ.get(setting.env, "").strip():
            values[setting.name] = setting.parse(environ[setting.env])
        else:
            values[setting.name] = setting.default
    return SiteSettings(**values)


def markdown_table() -> str:
    """The settings as the README's table (``./pacs config docs`` prints it; a test keeps it current)."""

    def default_text(setting: Setting) -> str:
        if setting.kind is bool:
            return "yes" if setting.default else "no"
        return f"`{setting.default}`" if setting.default not in ("", None) else "(blank)"

    def meaning(setting: Setting) -> str:
        text = setting.help
        if setting.choices:
            text += " One of: " + ", ".join(f"`{value}` ({label})" for value, label in setting.choices) + "."
        return text.replace("|", "\\|")

    lines = [
        "| setting | first-run variable | default | applies | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for setting in SETTINGS:
        variable = f"`{setting.env}`" if setting.env else ""
        described = f"{setting.label}: {meaning(setting)}"
        lines.append(
            f"| `{setting.name}` | {variable} | {default_text(setting)} | {setting.effect.described} "
            f"| {described} |"
        )
    lines.append("")
    lines.append(
        "¹ Cuts the transfers in progress (downloads, uploads, viewers loading images): when some run, "
        "the setup page and `./pacs config set` say how many and change nothing unless told to go "
        "ahead (`--cut-transfers`)."
    )
    return "\n".join(lines) + "\n"
