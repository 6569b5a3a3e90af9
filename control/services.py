"""The control plane's parts, each behind one typed accessor.

``create_app`` builds each part once and keeps it in ``app.extensions`` (``install``); code that
serves a request, and the worker hooks, ask for a part here by name, so that a reader and the type
checker both know what they get. Tests may put a stand-in under the same key (``KEYS``). The site
settings a request reads are asked for here too (``settings``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from flask import Flask, current_app, g

if TYPE_CHECKING:
    import sqlalchemy as sa

    from control.archive_version import ArchiveVersions
    from control.dicomweb.frames import FrameSource
    from control.nodes import Archive
    from control.settings import SiteSettings
    from control.site import Site
    from control.watch import ArchiveWatch

KEYS = ("site", "orthanc", "archive_version", "frames", "study_holders", "archive_watch")


def install(
    app: Flask,
    *,
    site: Site,
    archive: Archive,
    versions: ArchiveVersions,
    frames: FrameSource,
    study_holders: Callable[[str], list[str]],
    watch: ArchiveWatch,
) -> None:
    app.extensions.update(zip(KEYS, (site, archive, versions, frames, study_holders, watch), strict=True))


def _of(app: Flask | None) -> dict:
    return (app or current_app).extensions


def site(app: Flask | None = None) -> Site:
    """The installation: its data directory, secrets, settings and database."""
    return _of(app)["site"]


def settings() -> SiteSettings:
    """The site settings of the request being served, read once as it began (``create_app``), so
    that one page sees one set of values."""
    return g.settings


def engine(app: Flask | None = None) -> sa.Engine:
    """The portal's own database."""
    return site(app).engine


def archive(app: Flask | None = None) -> Archive:
    """The archive's nodes behind one Orthanc client (control.nodes)."""
    return _of(app)["orthanc"]


def archive_versions(app: Flask | None = None) -> ArchiveVersions:
    """What the portal knows of the archive's Orthanc and DICOMweb plugin versions."""
    return _of(app)["archive_version"]


def frames(app: Flask | None = None) -> FrameSource:
    """The viewer's frames, answered without the DICOMweb plugin (control.dicomweb.frames)."""
    return _of(app)["frames"]


def study_holders(study_uid: str, app: Flask | None = None) -> list[str]:
    """The archive's studies that hold ``study_uid`` now (more than one: the UID is shared)."""
    return _of(app)["study_holders"](study_uid)


def archive_watch(app: Flask | None = None) -> ArchiveWatch:
    """The watch that flags studies whose UID another patient's study shares (control.watch)."""
    return _of(app)["archive_watch"]
