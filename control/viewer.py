"""Set-up of the OHIF viewer: the pinned prebuilt ``@ohif/app`` from the npm registry.

``npm pack`` fetches the package tarball; its SHA-512 must equal the integrity pinned in
ohif/pin.json before anything is unpacked. Only the regular files and folders of ``package/dist``
are extracted, into the cache, and the portal's own ohif/app-config.js replaces the build's.
Nothing of the viewer is ever committed.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from control.configs import OHIF_PIN, viewer_directory
from control.site import REPOSITORY, Site

APP_CONFIG = REPOSITORY / "ohif" / "app-config.js"


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
    if not (dist / "app-config.js").exists() or (
        (dist / "app-config.js").read_bytes() != APP_CONFIG.read_bytes()
    ):
        shutil.copyfile(APP_CONFIG, dist / "app-config.js")
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
