"""DICOMweb stores (STOW-RS, ``POST /dicom-web/studies[/{study}]``) through the upload page's checks.

A STOW request is another door into the archive, so it gets what an upload gets: the upload right,
the size limit (``upload_max_mb``, enforced by Caddy too), the disk reserve, pydicom's check of every
instance before Orthanc parses it, Orthanc's own refusals reported, and one activity event with the
counts. Orthanc never sees the request itself, only the instances that passed, one by one.

The body (``multipart/related; type="application/dicom"``) is parsed as it arrives by
python-multipart's streaming parser into one temporary file in the data directory's spool: never
in memory. Nothing is stored until the whole body has arrived with its closing boundary, so that a
body that ends early (shorter than its ``Content-Length``, or cut) stores nothing, and the answer
and the activity log both say so. The instances then go to Orthanc as the upload page's do
(``control.uploads.store.Upload``), each read from its place in that one file.

Answers follow DICOM PS3.18: 200 when every instance was stored, 202 when some were, 409 when none
was, with the ``ReferencedSOPSequence`` and ``FailedSOPSequence`` of the standard and one
``Warning`` header per reason of refusal; 400 for a malformed or incomplete body, 413 too large,
415 not ``multipart/related`` of ``application/dicom`` or with a ``Content-Encoding``, 507 while the
disk is nearly full: then as JSON errors ``{"error", "message", "status"}``, like the portal's.

No CSRF token is asked: a browser sends a cross-site request with the ``multipart/related`` type
only after a CORS preflight, which the portal never answers, and the session cookie is
``SameSite=Lax``; anything else is refused with 415 before its body is read.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from flask import Response, request
from python_multipart.multipart import MultipartParser
from werkzeug.http import parse_options_header

from control import services
from control.activity import Outcome, record_activity
from control.dicomweb.relay import origin
from control.errors import error_response
from control.events import UploadEvent
from control.orthanc import STREAM_CHUNK
from control.uploads import archive, discard_small_body, store

DICOM = "application/dicom"
MOST_PARTS = 20000  # as many as a zip may hold
# Failure reasons of PS3.18 (Table 10.5.3-?): what a FailedSOPSequence item says.
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
PROCESSING_FAILURE = 0x0110


class StowRefused(Exception):
    """The request as a whole is refused: ``status`` and a message for the client and the log."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def boundary_of(content_type: str) -> str:
    """The multipart boundary of a STOW request's ``Content-Type``, or raise StowRefused (415)."""
    kind, options = parse_options_header(content_type)
    if kind.lower() != "multipart/related" or options.get("type", DICOM).lower() != DICOM:
        raise StowRefused(
            415, 'Send instances as multipart/related; type="application/dicom" (DICOM PS3.18 STOW-RS).'
        )
    boundary = options.get("boundary", "")
    if not boundary or len(boundary) > 70:
        raise StowRefused(400, "The multipart/related body has no valid boundary.")
    return boundary


class PartFile(io.RawIOBase):
    """One part of the spooled body, read from its place in the shared file (``os.pread``, so that
    several sender threads read their parts at once)."""

    name = "(part of a DICOMweb store)"  # what pydicom asks of a file

    def __init__(self, fd: int, start: int, size: int) -> None:
        self.fd, self.start, self.size, self.position = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self.size - self.position)
        if wanted <= 0:
            return 0
        data = os.pread(self.fd, wanted, self.start + self.position)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position


@dataclass
class Part:
    start: int
    size: int = 0
    content_type: str = ""


@dataclass
class SpooledBody:
    """A STOW body taken apart: its parts' places in one temporary file."""

    file: IO[bytes]
    parts: list[Part] = field(default_factory=list)
    received: int = 0

    def open(self, part: Part) -> PartFile:
        return PartFile(self.file.fileno(), part.start, part.size)

    def close(self) -> None:
        self.file.close()


def spool(
    read: Callable[[int], bytes], content_type: str, declared: int | None, limit_bytes: int
) -> SpooledBody:
    """Read a whole STOW body with ``read`` into a temporary file, part by part.

    Raises StowRefused: 413 past ``limit_bytes``, 400 when the body ends before its declared
    length or its closing boundary, or is not multipart.
    """
    boundary = boundary_of(content_type)
    body = SpooledBody(tempfile.TemporaryFile())  # noqa: SIM115 - closed by the caller
    header: dict[str, list[bytes]] = {"field": [], "value": []}
    ended = False

    def part_begin() -> None:
        if len(body.parts) >= MOST_PARTS:
            raise StowRefused(413, f"One request may hold {MOST_PARTS} instances at most.")
        body.parts.append(Part(body.file.tell()))

    def header_field(data: bytes, start: int, end: int) -> None:
        header["field"].append(data[start:end])

    def header_value(data: bytes, start: int, end: int) -> None:
        header["value"].append(data[start:end])

    def header_end() -> None:
        name = b"".join(header["field"]).decode("latin-1").strip().lower()
        if name == "content-type":
            body.parts[-1].content_type = b"".join(header["value"]).decode("latin-1").strip()
        header["field"], header["value"] = [], []

    def part_data(data: bytes, start: int, end: int) -> None:
        body.file.write(data[start:end])
        body.parts[-1].size += end - start

    def end() -> None:
        nonlocal ended
        ended = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": part_begin,
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_header_end": header_end,
            "on_part_data": part_data,
            "on_end": end,
        },
    )
    try:
        while True:
            chunk = read(STREAM_CHUNK)
            if not chunk:
                break
            body.received += len(chunk)
            if body.received > limit_bytes:
                raise StowRefused(
                    413, f"This request is larger than the {limit_bytes // store.MB} MB this server accepts."
                )
            parser.write(chunk)
        if declared is not None and body.received < declared:
            raise StowRefused(
                400,
                f"The request ended after {body.received:,} of its {declared:,} bytes: nothing was stored. "
                "Please send it again.",
            )
        if not ended:
            raise StowRefused(
                400, "The multipart body ends without its closing boundary: nothing was stored."
            )
    except StowRefused:
        body.close()
        raise
    except Exception as error:  # python-multipart raises several kinds on a malformed body
        body.close()
        raise StowRefused(400, f"The body is not a readable multipart/related message ({error}).") from None
    return body


def store_parts(body: SpooledBody, upload: store.Upload) -> None:
    """Hand every part to the upload pipeline (it checks and stores them, a few at a time)."""
    for number, part in enumerate(body.parts, 1):
        name = f"part {number}"
        kind = parse_options_header(part.content_type)[0].lower()
        if kind != DICOM:
            upload.results.append(
                store.FileResult(name, store.Outcome.REFUSED, f"a {kind or 'untyped'} part, not {DICOM}")
            )
            continue
        upload.receive_dicom(name, io.BufferedReader(body.open(part), STREAM_CHUNK), part.size)


def answer(results: list[store.FileResult], root: str) -> tuple[int, dict[str, Any]]:
    """The STOW-RS status and DICOM JSON for the files' results (PS3.18 10.5.3)."""
    referenced, failed = [], []
    for result in results:
        identifiers = {}
        if result.sop_class_uid:
            identifiers["00081150"] = {"vr": "UI", "Value": [result.sop_class_uid]}
        if result.sop_instance_uid:
            identifiers["00081155"] = {"vr": "UI", "Value": [result.sop_instance_uid]}
        if result.outcome in (store.Outcome.STORED, store.Outcome.DUPLICATE):
            url = f"{root}/studies/{result.study}/series/{result.series}/instances/{result.sop_instance_uid}"
            referenced.append({**identifiers, "00081190": {"vr": "UR", "Value": [url]}})
        else:
            failed.append({**identifiers, "00081197": {"vr": "US", "Value": [_failure_reason(result)]}})
    document: dict[str, Any] = {}
    stored = (store.Outcome.STORED, store.Outcome.DUPLICATE)
    studies = {result.study for result in results if result.outcome in stored}
    if len(studies) == 1:
        document["00081190"] = {"vr": "UR", "Value": [f"{root}/studies/{next(iter(studies))}"]}
    if referenced:
        document["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        document["00081198"] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else 202 if referenced else 409
    return status, document


def _failure_reason(result: store.FileResult) -> int:
    if "disk" in result.detail:
        return OUT_OF_RESOURCES
    if result.detail.startswith("the archive"):
        return PROCESSING_FAILURE
    if "study of the request" in result.detail:
        return DOES_NOT_MATCH
    return CANNOT_UNDERSTAND


def receive(study_uid: str) -> Response:
    """Answer the STOW request in flight (whose sender the gate has let through; see the module)."""
    settings = services.settings()
    limit = settings.upload_max_mb * store.MB
    declared = request.content_length
    site = services.site()
    disk = store.DiskGuard(site.orthanc_storage, settings.disk_reserve_mb * store.MB)
    try:
        if declared is not None and declared > limit:
            discard_small_body()
            raise StowRefused(
                413, f"This request is larger than the {settings.upload_max_mb} MB this server accepts."
            )
        problem = disk.problem(declared or 0)
        if problem:
            discard_small_body()
            raise StowRefused(507, problem)
        body = spool(request.environ["wsgi.input"].read, request.content_type or "", declared, limit)
    except StowRefused as refused:
        record_activity(UploadEvent(via="dicomweb", reason=refused.message, bytes=declared), Outcome.REFUSED)
        return error_response(refused.status, refused.message)
    upload = store.Upload(
        orthanc=services.archive(),
        worklists=site.worklists,
        zip_limits=archive.ZipLimits(max_unpacked=settings.upload_max_unpacked_mb * store.MB),
        disk=disk,
        only_study=study_uid,
    )
    try:
        store_parts(body, upload)
    finally:
        results = upload.finish()
        body.close()
    shown: dict[str, Any] = store.shown_counts(upload.counts())
    touched = store.summary(results)
    status, document = answer(results, f"{origin(request.environ)}/dicom-web")
    record_activity(
        UploadEvent(via="dicomweb", studies=touched["studies"], bytes=body.received, **shown),
        Outcome.OK if status != 409 else Outcome.REFUSED,
        patient=touched["patient"],
        study=touched["study"],
    )
    response = Response(json.dumps(document), status=status, mimetype="application/dicom+json")
    for reason in dict.fromkeys(
        result.detail for result in results if result.outcome is store.Outcome.REFUSED
    ):
        # PS3.18's way to say why, beside the failure codes: one warning per reason.
        response.headers.add("Warning", f'299 - "{_header_text(reason)}"')
    return response


def _header_text(text: str) -> str:
    """Text that can stand in a header's quoted string: printable ASCII, no quotes or backslashes."""
    cleaned = "".join(
        character if " " <= character <= "~" and character not in '"\\' else "?" for character in text
    )
    return cleaned[:200]
