"""The downloader as a package that pip installs straight from the portal: ``pip install URL``.

A physician has no copy of this repository, so the downloader page cannot say ``pip install
./downloader``: the portal serves a wheel of its own downloader instead (``/downloader/
pacs_download-VERSION-py3-none-any.whl``, the name pip requires), which installs the command line
(``pacs-download``) and the window (``pacs-downloader``, ``python3 -m pacs_download_gui``). Both
files are taken as they are from ``downloader/``; the wheel around them is a zip with the metadata
of the wheel format (PEP 427, core metadata 2.1), made once per process and kept.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import re
import zipfile

from flask import Response, abort, url_for

from control.public import bp
from control.site import REPOSITORY

FOLDER = REPOSITORY / "downloader"
MODULES = ("pacs_download.py", "pacs_download_gui.py")
ENTRY_POINTS = """[console_scripts]
pacs-download = pacs_download:main

[gui_scripts]
pacs-downloader = pacs_download_gui:main
"""


def version() -> str:
    """The downloader's version, as its module declares it."""
    match = re.search(r'^__version__ = "([^"]+)"', (FOLDER / "pacs_download.py").read_text(), re.M)
    assert match, "pacs_download.py declares no __version__"
    return match.group(1)


def wheel_name() -> str:
    return f"pacs_download-{version()}-py3-none-any.whl"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


@functools.cache
def build_wheel(name: str) -> bytes:
    """The wheel ``name`` (the downloader's two modules and their metadata), as bytes."""
    release = version()
    info = f"pacs_download-{release}.dist-info"
    files = {module: (FOLDER / module).read_bytes() for module in MODULES}
    files[f"{info}/METADATA"] = (
        "Metadata-Version: 2.1\n"
        "Name: pacs-download\n"
        f"Version: {release}\n"
        "Summary: Save a patient, study or series from the PACS web portal as one checked zip file, "
        "in a window or a terminal\n"
        "License: MIT\n"
        "Requires-Python: >=3.9\n"
    ).encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: pacs-web-portal\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{info}/entry_points.txt"] = ENTRY_POINTS.encode()
    record = [_record_line(path, data) for path, data in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as wheel:
        for path, data in files.items():
            wheel.writestr(zipfile.ZipInfo(path, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


@bp.app_template_global()
def downloader_package_url() -> str:
    """The wheel's full address, for the command the downloader page shows."""
    return url_for("public.downloader_package", name=wheel_name(), _external=True)


@bp.get("/downloader/<name>")
def downloader_package(name: str):
    """The downloader's wheel, for anyone (the window and the command line, Python 3.9 or later)."""
    if name != wheel_name():
        abort(404)
    response = Response(build_wheel(name), mimetype="application/zip")
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response
