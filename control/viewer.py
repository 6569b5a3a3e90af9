"""The OHIF viewer: its set-up, and what it is told about the site it serves.

Set-up: ``npm pack`` fetches the pinned prebuilt ``@ohif/app``; its SHA-512 must equal the integrity
pinned in ohif/pin.json before anything is unpacked. Only the regular files and folders of
``package/dist`` are extracted, into the cache. Nothing of the viewer is ever committed, and none of
its bundles is changed.

Configuration: the build loads ``/app-config.js``, which Caddy hands to this blueprint rather than
serving the build's own. It is the portal's ohif/app-config.js after one line of data, so that the
viewer carries the institution's name and a way back to the portal for whoever opens it: a
signed-in user goes back to the results (or the query page), a patient to the page of their study
link. A bare ``/viewer`` (no study named) comes here too and is sent the same way back, rather than
showing an empty black page.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Blueprint, make_response, redirect, request, url_for
from flask_login import current_user

from control import db, services
from control.runtime.configs import OHIF_PIN, viewer_directory
from control.site import REPOSITORY, Site
from control.tokens import grants, store

APP_CONFIG = REPOSITORY / "ohif" / "app-config.js"

bp = Blueprint("viewer", __name__)


class ViewerSetupError(RuntimeError):
    """The viewer could not be fetched or did not match its pinned integrity."""


def integrity_of(path: Path) -> str:
    """The npm-style integrity string (``sha512-<base64>``) of a file."""
    digest = hashlib.sha512()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def inline_script_hashes(html: str) -> list[str]:
    """The CSP hashes (``sha256-...``) of the inline scripts in a page, in order."""
    scripts = re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", html, re.S)
    return ["sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() for body in scripts]


def ensure_viewer(site: Site, say: Callable[..., None] = print) -> Path:
    """Make sure the pinned viewer is unpacked in the cache; return its ``dist`` folder."""
    dist = viewer_directory(site)
    if not (dist / "index.html").exists():
        _install(dist, say)
    return dist


def _extract_plain(archive: tarfile.TarFile, member: tarfile.TarInfo, into: Path) -> None:
    """Extract a regular file or folder that stays inside ``into``; links and devices are skipped.

    (Debian 12's Python 3.11.2 predates tarfile's extraction filters, so this is done by hand.)
    """
    target = (into / member.name).resolve()
    if not target.is_relative_to(into.resolve()):
        raise ViewerSetupError(f"the viewer package holds a path outside its folder: {member.name!r}")
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
    elif member.isfile():
        target.parent.mkdir(parents=True, exist_ok=True)
        source = archive.extractfile(member)
        assert source is not None  # a file member has its bytes
        with source, target.open("wb") as output:
            shutil.copyfileobj(source, output, 1 << 20)


def _install(dist: Path, say: Callable[..., None]) -> None:
    spec = f"{OHIF_PIN['package']}@{OHIF_PIN['version']}"
    target = dist.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".ohif-") as work:
        say(f"pacs: fetching the OHIF viewer ({spec}, about 50 MB) ...")
        result = subprocess.run(
            ["npm", "pack", spec, "--pack-destination", work, "--silent"],
            capture_output=True,
            text=True,
            check=False,
        )
        tarballs = list(Path(work).glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            raise ViewerSetupError(f"npm pack {spec} failed: {result.stderr.strip()[-500:]}")
        tarball = tarballs[0]
        actual = integrity_of(tarball)
        if actual != OHIF_PIN["integrity"]:
            raise ViewerSetupError(
                f"{spec} does not match the pinned integrity: got {actual}, "
                f"expected {OHIF_PIN['integrity']}; refusing to install it"
            )
        say("pacs: unpacking the viewer ...")
        unpacked = Path(work) / "unpacked"
        with tarfile.open(tarball) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
            for done, member in enumerate(members, 1):
                _extract_plain(archive, member, unpacked)
                if done % 200 == 0 or done == len(members):
                    say(f"\r  {done}/{len(members)} files", end="" if done < len(members) else "\n")
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
        (unpacked / "package" / "dist").rename(dist)


def _patient_page() -> str | None:
    """The page of the newest study link whose viewer grant this browser holds, if one still works."""
    with services.engine().connect() as connection:
        held = grants.still_valid(
            connection, grants.read(request), services.settings().token_days, db.utcnow().date()
        )
        token = store.get(connection, held[0].token_id) if held else None
    if token is None:
        return None
    secret = services.site().secrets.token_key
    link = store.derive_token(secret, token.row.study_uid, token.row.generation)
    return f"{url_for('tokens.patient_page')}?{link}"


def way_back() -> dict[str, Any]:
    """Where the viewer's header link leads, and what it says.

    ``results`` tells the viewer to prefer the results page it was opened from (its referrer, which
    the portal's referrer policy sends within the site), when there is one.
    """
    if current_user.is_authenticated:
        return {"href": url_for("query.search"), "label": "Back to the results", "results": True}
    if grants.read(request):
        # The patient's page itself is not named here: the viewer's link asks for it (leave()).
        return {"href": url_for("viewer.leave"), "label": "Back to your study", "results": False}
    return {"href": url_for("public.index"), "label": "Back to the portal", "results": False}


@bp.get("/app-config.js")
def app_config():
    """The viewer's configuration for this site and this browser (never cached: it names both)."""
    portal = {
        "institution": services.settings().institution,
        "department": services.settings().department,
        "back": way_back(),
    }
    # A JSON literal is JavaScript: quotes and backslashes escaped, every non-ASCII character
    # (U+2028 and U+2029 too, line ends to older engines) written as \u escapes.
    body = f"window.pacsPortal = {json.dumps(portal)};\n{APP_CONFIG.read_text()}"
    response = make_response(body)
    response.headers["Content-Type"] = "text/javascript; charset=utf-8"
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/viewer")
@bp.get("/viewer/")
def leave():
    """A viewer address that names no study (Caddy sends only those here): back to the portal."""
    if current_user.is_authenticated:
        return redirect(url_for("query.search"))
    return redirect(_patient_page() or url_for("public.index"))
