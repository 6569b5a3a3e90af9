"""Which Orthanc and DICOMweb plugin the portal talks to, and what follows from their versions.

The portal runs with whatever Debian ships: Debian 12 has Orthanc 1.10.1 with DICOMweb 1.7,
Debian 13 has Orthanc 1.12.7 with DICOMweb 1.20 (and the official Docker images newer ones). The
version is asked of the running archive, never configured: ``GET /system`` names Orthanc's (and,
from 1.12.5, its ``Capabilities``), ``GET /plugins/dicom-web`` the plugin's. Each control-plane
process keeps the answer for ``MAX_AGE`` seconds, so that an archive upgraded and restarted under
a running portal is seen within a minute.

What differs between the two releases, and where the portal minds it:

- Frames of native pixels asked for with ``transfer-syntax=*``: DICOMweb 1.7 labels them with the
  stored syntax (implicit little endian stays ``1.2.840.10008.1.2``), 1.20 with explicit little
  endian, the syntax frames are in. ``control.dicomweb.frames`` answers as the plugin present does.
- Idle HTTP connections: 1.10.1 closes them after one second, fixed; from 1.11.3 the configuration's
  ``KeepAliveTimeout`` (5 s in orthanc/orthanc.json; 1.10.1 ignores options it does not know) keeps
  a pooled connection for the next request of a viewer's burst or a user's next click. No longer:
  an idle connection holds one of Orthanc's 50 HTTP threads (``HttpThreadsCount``), which the
  control plane's pools and Caddy's share. The Orthanc client's retries of reads stay, for 1.10.1.
- ``/tools/find``: from 1.12.5, where the index supports it (``HasExtendedFind``: SQLite yes,
  Debian 13's PostgreSQL plugin 5.0 no), it orders (``OrderBy``) and pages in that order; 1.10.1
  ignores ``OrderBy``, so ``control.query.finder`` orders the answers itself on either release.
  ``/tools/count-resources`` (1.12.5) counts without listing ids; labels exist from 1.12.0.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from control.orthanc import ArchiveClient, OrthancError

MAX_AGE = 60.0
Version = tuple[int, ...]
# Builds from Orthanc's development branch call themselves "mainline": newer than any release.
MAINLINE: Version = (999,)


def parse_version(text: str | None) -> Version | None:
    """``"1.12.7"`` as ``(1, 12, 7)``; ``"mainline"`` as newer than any release; None when absent."""
    if not text:
        return None
    if text.strip().lower() == "mainline":
        return MAINLINE
    numbers = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(part) for part in numbers.group(0).split(".")) if numbers else None


def version_text(version: Version | None) -> str | None:
    if version is None:
        return None
    return "mainline" if version == MAINLINE else ".".join(map(str, version))


@dataclass(frozen=True)
class ArchiveVersion:
    """The running Orthanc's version, its DICOMweb plugin's (None without it), and what they can do."""

    orthanc: Version
    dicomweb: Version | None
    extended_find: bool = False

    @classmethod
    def from_answers(cls, system: dict[str, Any], plugin: dict[str, Any] | None) -> ArchiveVersion:
        """From Orthanc's ``/system`` answer and the plugin's ``/plugins/dicom-web`` (None if absent)."""
        capabilities = system.get("Capabilities") or {}
        return cls(
            orthanc=parse_version(system.get("Version")) or (0,),
            dicomweb=parse_version((plugin or {}).get("Version")),
            extended_find=bool(capabilities.get("HasExtendedFind")),
        )

    @property
    def native_frames_named_as_stored(self) -> bool:
        """Whether the plugin labels native frames asked with ``transfer-syntax=*`` by the stored
        syntax (DICOMweb 1.7) rather than as explicit little endian (1.20)."""
        return self.dicomweb is not None and self.dicomweb <= (1, 7)

    def describe(self) -> dict[str, Any]:
        """For the health report: the versions as Orthanc writes them."""
        return {
            "version": version_text(self.orthanc),
            "dicomweb": version_text(self.dicomweb),
            "extended_find": self.extended_find,
        }


class ArchiveVersions:
    """The archive's version as last asked, asked again once it is older than ``max_age`` seconds.

    ``current()`` raises ``OrthancUnavailable`` while the archive does not answer.
    """

    def __init__(self, orthanc: ArchiveClient, max_age: float = MAX_AGE) -> None:
        self.orthanc = orthanc
        self.max_age = max_age
        self._known: tuple[float, ArchiveVersion] | None = None
        self._lock = threading.Lock()

    def current(self) -> ArchiveVersion:
        known = self._known
        if known is not None and time.monotonic() - known[0] < self.max_age:
            return known[1]
        with self._lock:
            known = self._known
            if known is None or time.monotonic() - known[0] >= self.max_age:
                known = (time.monotonic(), self._ask())
                self._known = known
        return known[1]

    def _ask(self) -> ArchiveVersion:
        system = self.orthanc.system()
        try:
            plugin = self.orthanc.get_json("/plugins/dicom-web", timeout=3)
        except OrthancError as error:
            if error.status != 404:
                raise
            plugin = None
        return ArchiveVersion.from_answers(system, plugin)
