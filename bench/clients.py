"""What the benchmark's clients do with HTTP: sign in, read streams, and reduce answers to digests.

The digests say "same content both ways" while ignoring what must differ between the two ways:
how a zip names and orders its files (Orthanc's and the portal's layouts differ), the boundaries
of multipart answers, and the host in DICOMweb bulk-data URLs (Orthanc's own address directly,
the portal's through it).
"""

from __future__ import annotations

import hashlib
import io
import re
import time
import zipfile
from pathlib import Path
from typing import BinaryIO

import pydicom
import requests

from control.identifiers import ORTHANC_ID

CHUNK = 1024 * 1024
_STUDY_LINK = re.compile(rf"/query/studies/({ORTHANC_ID})/series")
_CSRF = (
    re.compile(r'name="csrf_token"[^>]*value="([^"]+)"'),
    re.compile(r'value="([^"]+)"[^>]*name="csrf_token"'),
)


class Refused(RuntimeError):
    """An answer that was not the expected one (a benchmark run must fail loudly, not count it)."""


def expect(response: requests.Response, status: int = 200) -> requests.Response:
    if response.status_code != status:
        raise Refused(
            f"{response.request.method} {response.url} answered {response.status_code}: "
            f"{response.text[:200]!r}"
        )
    return response


def csrf_token(html: str) -> str:
    for pattern in _CSRF:
        match = pattern.search(html)
        if match:
            return match.group(1)
    raise Refused("the page has no CSRF token")


def sign_in(url: str, username: str, password: str, session: requests.Session | None = None):
    """A browser-like session signed in through the real form; the session and the landing page."""
    session = session or requests.Session()
    login = expect(session.get(f"{url}/login"))
    landing = session.post(
        f"{url}/login",
        data={"username": username, "password": password, "csrf_token": csrf_token(login.text)},
    )
    if landing.status_code != 200 or "/logout" not in landing.text:
        raise Refused(f"sign-in of {username} failed: {landing.status_code}")
    return session, landing


def stream_to(response: requests.Response, sink: BinaryIO, started: float) -> tuple[float, int]:
    """Read a streamed body into ``sink`` as it arrives; when its first byte came, and its size.

    ``read1`` hands over whatever has arrived (up to ``CHUNK``), so the first chunk marks the first
    byte both for Orthanc's plain close-delimited answer and for Caddy's chunked one.
    """
    first = None
    size = 0
    with response:
        expect(response)
        while chunk := response.raw.read1(CHUNK):
            if first is None:
                first = time.perf_counter() - started
            size += len(chunk)
            sink.write(chunk)
    return (first if first is not None else time.perf_counter() - started), size


def zip_files_digest(path: Path) -> str:
    """SHA-256 of the SOP Instance UID and MD5 of every file in a zip (whatever the layout).

    Orthanc's zip and the portal's name and order their members differently; what must agree is
    which instances they hold and their bytes. A DICOMDIR, not an instance, is left out.
    """
    found = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir() or info.filename.rsplit("/", 1)[-1] == "DICOMDIR":
                continue
            data = archive.read(info)
            uid = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
            found.append(f"{uid} {hashlib.md5(data).hexdigest()}")  # noqa: S324 - what Orthanc keeps
    return digest_of(*sorted(found))


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The contents of the parts of a ``multipart/related`` answer (DICOMweb frames)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise Refused(f"not a multipart answer: {content_type}")
    delimiter = b"--" + match.group(1).encode()
    parts = []
    for piece in body.split(delimiter)[1:]:
        if piece.startswith(b"--"):
            break
        _headers, _, content = piece.partition(b"\r\n\r\n")
        parts.append(content.removesuffix(b"\r\n"))
    return parts


def newest_first_ids(studies: list[dict]) -> list[str]:
    """Orthanc study ids in the portal's documented order: date, time, then id, newest first."""
    ordered = sorted(
        studies,
        key=lambda study: (
            study["MainDicomTags"].get("StudyDate") or "",
            study["MainDicomTags"].get("StudyTime") or "",
            study["ID"],
        ),
        reverse=True,
    )
    return [study["ID"] for study in ordered]


def page_study_ids(html: str) -> list[str]:
    """The studies a results page lists, in its order (each row links to the study's series)."""
    return list(dict.fromkeys(_STUDY_LINK.findall(html)))


def digest_of(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()
