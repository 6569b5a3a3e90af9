"""What an activity event records: one frozen dataclass per kind of event, one kind per action.

Every event is one row of ``db.activity`` written by ``control.activity.record_activity``. The row's
columns are the same for all of them: when, the action's stored name (``Action``), how it went
(``activity.Outcome``), who (a user's id and the name they had then, or a study link's public id),
the client's address and browser, and what it was about (the patient as pages show them, their
patient ID, the Study Instance UID). What differs from one kind to the next is its ``detail``, a
JSON object whose keys are the fields of its class below, in their order, and nothing else:
a class takes keyword arguments only, so a detail it does not declare is a TypeError when the
event is made (and an error of the type checker before that).

A field with a default of None is a detail some events of the kind have and others not (a
download's byte range, a refusal's reason): it is left out of the row when it is None. A field
without a default is always recorded, None included (the total of a search that was not counted).

One class per action, so that one action has one shape, whichever page, command or thread records
it: ``EVENTS`` maps each action to its class, and defining a second class for an action, or one
that names none, fails when this module is imported (tests/test_activity_events.py checks that
every action has its class). The stored names and keys are those of the rows already in the log:
the admin's pages, the CSV export and the retention exports read old and new rows alike.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


class Action(enum.StrEnum):
    """What happened. The values are what the log stores and the admin filters on."""

    SIGN_IN = "sign-in"
    SIGN_OUT = "sign-out"
    LOCKED_OUT = "locked-out"
    SIGN_IN_LOCK_LIFTED = "sign-in-lock-lifted"
    SESSION_EXPIRED = "session-expired"
    ACCESS_DENIED = "access-denied"
    SEARCH = "search"
    LIST_OPENED = "list-opened"
    DOWNLOAD = "download"
    USER_CREATED = "user-created"
    USER_CHANGED = "user-changed"
    USER_DELETED = "user-deleted"
    SETTINGS_CHANGED = "settings-changed"
    UPLOAD = "upload"
    PDF_ATTACHED = "pdf-attached"
    WORKLIST_ORDER = "worklist-order"
    WORKLIST_DELETED = "worklist-deleted"
    TOKEN_MADE = "token-made"
    TOKEN_COPIED = "token-copied"
    TOKEN_USED = "token-used"
    TOKEN_REFUSED = "token-refused"
    TOKEN_IDENTITY = "token-identity-check"
    TOKEN_IDENTITY_LOCKED = "token-identity-locked"
    TOKEN_IDENTITY_RELEASED = "token-identity-released"
    TOKEN_REVOKED = "token-revoked"
    TOKEN_EXTENDED = "token-extended"
    VIEWER_OPENED = "viewer-opened"
    DICOMWEB_DENIED = "dicomweb-denied"
    DICOM_REFUSED = "dicom-refused"  # a modality's request the archive refused (from its log)
    STUDY_UID_SHARED = "study-uid-shared"  # two patients' studies arrived with one Study Instance UID
    ARCHIVE_ORPHANS = "archive-orphans"  # stored files no index row names, counted and removed
    DESKTOP_VIEWER_OPENED = "desktop-viewer-opened"
    VIEWER_TOKEN_MADE = "viewer-token-made"
    VIEWER_TOKEN_USED = "viewer-token-used"
    VIEWER_TOKEN_REVOKED = "viewer-token-revoked"


EVENTS: dict[Action, type[Event]] = {}


@dataclass(frozen=True, kw_only=True)
class Event:
    """One kind of event: its ``action`` and, as fields, the details it records."""

    action: ClassVar[Action]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        action = cls.__dict__.get("action")
        if not isinstance(action, Action):
            raise TypeError(f"{cls.__name__} names no action of its own")
        if action in EVENTS:
            raise TypeError(f"{action} is already recorded as {EVENTS[action].__name__}")
        EVENTS[action] = cls

    def detail(self) -> dict[str, Any]:
        """What the row's ``detail`` holds: every field, but an optional one that is None."""
        return {
            field.name: value
            for field in dataclasses.fields(self)
            if (value := getattr(self, field.name)) is not None or field.default is not None
        }


# ---- signing in and access ----


@dataclass(frozen=True, kw_only=True)
class SignInEvent(Event):
    """A sign-in, done or refused (the name typed is the row's username)."""

    action = Action.SIGN_IN


@dataclass(frozen=True, kw_only=True)
class SignOutEvent(Event):
    action = Action.SIGN_OUT


@dataclass(frozen=True, kw_only=True)
class LockedOutEvent(Event):
    """A sign-in refused without a look at the password: too many failures before."""

    action = Action.LOCKED_OUT
    lock: str  # which lock (``auth.throttle.LockKind``)


@dataclass(frozen=True, kw_only=True)
class SignInLockLiftedEvent(Event):
    action = Action.SIGN_IN_LOCK_LIFTED
    lock: str
    account: str
    address: str
    failures: int  # the failed attempts forgotten


@dataclass(frozen=True, kw_only=True)
class SessionExpiredEvent(Event):
    action = Action.SESSION_EXPIRED


@dataclass(frozen=True, kw_only=True)
class AccessDeniedEvent(Event):
    """A page that the signed-in user may not reach (or a viewer token that is not theirs)."""

    action = Action.ACCESS_DENIED
    path: str
    method: str
    viewer_token: str | None = None


# ---- the query pages and downloads ----


@dataclass(frozen=True, kw_only=True)
class SearchEvent(Event):
    action = Action.SEARCH
    level: str  # patients or studies
    criteria: dict[str, Any]  # as the search's URL arguments
    page: int
    total: int | None  # None: not counted


@dataclass(frozen=True, kw_only=True)
class ListOpenedEvent(Event):
    """A patient's list of studies, or a study's list of series."""

    action = Action.LIST_OPENED
    level: str  # studies or series: what the list shows
    patient_orthanc_id: str | None = None
    study_orthanc_id: str | None = None
    page: int


@dataclass(frozen=True, kw_only=True)
class DownloadEvent(Event):
    """A zip of a patient, study or series: recorded as not completed before its first byte, then
    brought up to date when it ends (``activity.update_activity``)."""

    action = Action.DOWNLOAD
    level: str
    orthanc_id: str
    content: str  # the ``zip_content`` setting
    bytes_sent: int
    completed: bool
    compressed: bool | None = None
    dicomdir: bool | None = None
    range: str | None = None  # of a 206 answer: "first-last/length"
    stopped_by: str | None = None  # of one not completed: server, client or archive


# ---- accounts and settings ----


@dataclass(frozen=True, kw_only=True)
class UserCreatedEvent(Event):
    action = Action.USER_CREATED
    account: str
    is_admin: bool
    can_upload: bool


@dataclass(frozen=True, kw_only=True)
class UserChangedEvent(Event):
    """What of an account changed: its names in ``changed``; a flag's values, a new username."""

    action = Action.USER_CHANGED
    account: str
    changed: Sequence[str]
    old: dict[str, bool] | None = None
    new: dict[str, bool] | None = None
    old_username: str | None = None
    new_username: str | None = None


@dataclass(frozen=True, kw_only=True)
class UserDeletedEvent(Event):
    action = Action.USER_DELETED
    account: str


@dataclass(frozen=True, kw_only=True)
class SettingsChangedEvent(Event):
    """A change of settings, from the setup page, the worklist's modalities or a shell: ``changed``
    maps each setting to ``{"old": ..., "new": ...}`` (and ``certificate`` to what was done with
    the site's certificate). One the web front refused is put back and recorded as failed."""

    action = Action.SETTINGS_CHANGED
    reason: str | None = None
    changed: dict[str, Any]


# ---- uploads and the worklist ----


@dataclass(frozen=True, kw_only=True)
class UploadEvent(Event):
    """Files sent from the upload page (recorded as not completed first, with a ``state``, then
    brought up to date) or by DICOMweb STOW-RS (``via``); the counts are of the files' outcomes,
    those that happened and the three main ones (``uploads.store.shown_counts``)."""

    action = Action.UPLOAD
    via: str | None = None
    files: Sequence[str] | None = None  # names, the first 20
    reason: str | None = None  # why it was refused as a whole
    state: str | None = None
    studies: int | None = None
    bytes: int | None = None
    limit_mb: int | None = None
    stored: int | None = None
    duplicate: int | None = None
    refused: int | None = None
    skipped: int | None = None
    scheduled: int | None = None
    replaced: int | None = None
    cancelled: int | None = None


@dataclass(frozen=True, kw_only=True)
class PdfAttachedEvent(Event):
    action = Action.PDF_ATTACHED
    file: str
    reason: str | None = None  # why it was refused
    title: str | None = None
    pages: int | None = None
    bytes: int | None = None
    series: str | None = None  # the archive's id of the new series


@dataclass(frozen=True, kw_only=True)
class WorklistOrderEvent(Event):
    """An HL7 order uploaded into the worklist."""

    action = Action.WORKLIST_ORDER
    accession: str
    change: str  # what it did to the worklist (``uploads.worklist.Change``)
    modality: str
    station: str


@dataclass(frozen=True, kw_only=True)
class WorklistDeletedEvent(Event):
    action = Action.WORKLIST_DELETED
    accession: str
    modality: str


# ---- patients' study links ----


@dataclass(frozen=True, kw_only=True)
class TokenMadeEvent(Event):
    """A study link made for a patient; ``identity_check`` says when it will not ask for a birth
    date; a refused one says why."""

    action = Action.TOKEN_MADE
    reason: str | None = None
    identity_check: str | None = None


@dataclass(frozen=True, kw_only=True)
class TokenCopiedEvent(TokenMadeEvent):
    """A study link that already existed, given out again: a made link's shape."""

    action = Action.TOKEN_COPIED


@dataclass(frozen=True, kw_only=True)
class TokenUsedEvent(Event):
    """A study link opened a page (``page``), or was held (refused, with a reason)."""

    action = Action.TOKEN_USED
    page: str | None = None
    reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class TokenRefusedEvent(Event):
    action = Action.TOKEN_REFUSED
    reason: str
    path: str


@dataclass(frozen=True, kw_only=True)
class TokenIdentityEvent(Event):
    """A birth date typed on a study link: done when right, refused when wrong."""

    action = Action.TOKEN_IDENTITY


@dataclass(frozen=True, kw_only=True)
class TokenIdentityLockedEvent(Event):
    action = Action.TOKEN_IDENTITY_LOCKED
    locks: int  # how many times it has been locked
    until: str


@dataclass(frozen=True, kw_only=True)
class TokenIdentityReleasedEvent(Event):
    action = Action.TOKEN_IDENTITY_RELEASED


@dataclass(frozen=True, kw_only=True)
class TokenRevokedEvent(Event):
    """One link revoked (its id in the row), or every link of a patient (how many)."""

    action = Action.TOKEN_REVOKED
    revoked: int | None = None


@dataclass(frozen=True, kw_only=True)
class TokenExtendedEvent(Event):
    action = Action.TOKEN_EXTENDED
    old: str  # the last day it worked until, ISO
    new: str


# ---- the viewers and DICOMweb ----


@dataclass(frozen=True, kw_only=True)
class ViewerOpenedEvent(Event):
    """The web viewer opened a study (``via`` dicomweb: seen by its first DICOMweb question)."""

    action = Action.VIEWER_OPENED
    via: str | None = None


@dataclass(frozen=True, kw_only=True)
class DicomwebDeniedEvent(Event):
    action = Action.DICOMWEB_DENIED
    method: str
    path: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class DesktopViewerOpenedEvent(Event):
    """A desktop viewer (Weasis) launched with a short-lived viewer token."""

    action = Action.DESKTOP_VIEWER_OPENED
    viewer_token: str
    expires: str
    scope: str | None = None
    studies: Sequence[str] | None = None
    series: str | None = None


@dataclass(frozen=True, kw_only=True)
class ViewerTokenMadeEvent(Event):
    """A viewer token for another viewer, made by a signed-in user."""

    action = Action.VIEWER_TOKEN_MADE
    viewer_token: str
    note: str  # for whom
    expires: str


@dataclass(frozen=True, kw_only=True)
class ViewerTokenUsedEvent(Event):
    action = Action.VIEWER_TOKEN_USED
    kind: str
    issued_by: str
    studies: Sequence[str]
    series: str | None = None
    path: str


@dataclass(frozen=True, kw_only=True)
class ViewerTokenRevokedEvent(Event):
    action = Action.VIEWER_TOKEN_REVOKED
    viewer_token: str
    kind: str


# ---- the archive ----


@dataclass(frozen=True, kw_only=True)
class DicomRefusedEvent(Event):
    """A modality's request the archive refused, read from its log (``control.watch``)."""

    action = Action.DICOM_REFUSED
    aet: str
    request: str
    reason: str | None = None
    node: str | None = None  # the archive node whose log said it, when there are several


@dataclass(frozen=True, kw_only=True)
class StudyUidSharedEvent(Event):
    action = Action.STUDY_UID_SHARED
    studies: int
    found_by: str


@dataclass(frozen=True, kw_only=True)
class ArchiveOrphansEvent(Event):
    """The sweep of the stored files that no index row names (``control.orphans``)."""

    action = Action.ARCHIVE_ORPHANS
    files: int
    orphans: int
    removed: int
    megabytes: float
    recent: int
