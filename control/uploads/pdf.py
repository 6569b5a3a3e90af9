"""PDF reports attached to a study as Encapsulated PDF instances.

A file must be a real PDF: it starts with the ``%PDF-`` signature and pypdf can read its page tree.
Orthanc's ``/tools/create-dicom`` then makes the instance, with the study as parent, in a new
series (modality DOC). That call takes the document base64-encoded inside a JSON body; the body is
written to an anonymous temporary file chunk by chunk and sent from there, so a report is never held
in memory whole on this side.
"""

from __future__ import annotations

import base64
import json
import tempfile
from typing import IO

import pypdf
from pypdf.errors import PyPdfError

SIGNATURE = b"%PDF-"
DEFAULT_TITLE = "PDF report"
_BASE64_CHUNK = 3 * 256 * 1024  # base64 pads only at the end: whole groups of 3 bytes go in between


class NotAPdf(ValueError):
    """The file is not a PDF the viewer can show, and why."""


def check_pdf(file: IO[bytes]) -> int:
    """The page count of the PDF ``file``, or NotAPdf; the file is left at its start."""
    file.seek(0)
    head = file.read(1024)
    file.seek(0)
    if not head.startswith(SIGNATURE):
        raise NotAPdf("not a PDF file (it does not start with %PDF-)")
    try:
        reader = pypdf.PdfReader(file)
        if reader.is_encrypted:
            raise NotAPdf("a password-protected PDF, which the viewer cannot open")
        pages = len(reader.pages)
    except NotAPdf:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as error:
        raise NotAPdf(f"a damaged PDF ({type(error).__name__}: {error})") from None
    finally:
        file.seek(0)
    if pages < 1:
        raise NotAPdf("a PDF without pages")
    return pages


def title_of(text: str, filename: str) -> str:
    """The series description and document title: the one typed, else the file's name, else a default."""
    title = " ".join(text.split())
    if not title:
        stem = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
        title = " ".join(stem.removesuffix(".pdf").removesuffix(".PDF").split())
    return (title or DEFAULT_TITLE)[:64]


def create_dicom_body(file: IO[bytes], size: int, study_id: str, title: str) -> IO[bytes]:
    """The JSON body of ``POST /tools/create-dicom`` for the PDF ``file``, in a temporary file."""
    tags = {
        "Modality": "DOC",
        "SeriesDescription": title,
        "DocumentTitle": title,
        "InstanceNumber": "1",
        # The DICOM value is padded to an even length: readers trim the document back with this.
        "EncapsulatedDocumentLength": str(size),
    }
    before = (
        json.dumps({"Parent": study_id, "Tags": tags})[:-1] + ', "Content": "data:application/pdf;base64,'
    )
    body = tempfile.TemporaryFile()  # noqa: SIM115 - returned to the caller, who closes it
    body.write(before.encode())
    file.seek(0)
    pending = b""
    while chunk := file.read(_BASE64_CHUNK):
        pending += chunk
        whole = len(pending) - len(pending) % 3
        body.write(base64.b64encode(pending[:whole]))
        pending = pending[whole:]
    body.write(base64.b64encode(pending) + b'"}')
    body.seek(0)
    file.seek(0)
    return body
