"""Reading uploaded zips member by member (control.uploads.archive), without the stack.

The stack tests (test_uploads.py) send hostile zips through the portal; these check, quickly and
for every compression method zipfile writes, that the faster inflater hands Orthanc exactly the
bytes that were zipped, and that damage inside a member is that member's refusal, not the upload's.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from control.uploads import archive

pytestmark = pytest.mark.inprocess

LIMITS = archive.ZipLimits(max_unpacked=1024 * 1024 * 1024)
SAMPLES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")


def sample(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def read_all(data: bytes) -> dict[str, archive.Member]:
    found = {}
    for member in archive.members(io.BytesIO(data), LIMITS):
        if member.body is not None:
            member = archive.Member(member.name, body=io.BytesIO(member.body.read()), size=member.size)
        found[member.name] = member
    return found


@pytest.mark.parametrize(
    ("method", "level"),
    [
        (zipfile.ZIP_DEFLATED, 1),
        (zipfile.ZIP_DEFLATED, 6),
        (zipfile.ZIP_DEFLATED, 9),
        (zipfile.ZIP_STORED, None),
        (zipfile.ZIP_BZIP2, None),
        (zipfile.ZIP_LZMA, None),
    ],
)
def test_every_member_comes_out_byte_for_byte(method: int, level: int | None) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method, compresslevel=level) as packed:
        for name in SAMPLES:
            packed.writestr(f"study/{name}", sample(name))
    found = read_all(buffer.getvalue())
    for name in SAMPLES:
        member = found[f"study/{name}"]
        assert member.problem == ""
        assert member.size == len(sample(name))
        assert member.body is not None and member.body.read() == sample(name)


def damaged(offset: int) -> bytes:
    """A zip of two deflated DICOM files whose first has 200 bytes overwritten ``offset`` bytes into
    its packed data."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as packed:
        packed.writestr("first.dcm", sample("CT_small.dcm"))
        packed.writestr("second.dcm", sample("MR_small.dcm"))
    data = bytearray(buffer.getvalue())
    header = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("first.dcm").header_offset
    start = header + 30 + len("first.dcm")  # the local header's fixed part, then the name
    data[start + offset : start + offset + 200] = b"\xff" * 200
    return bytes(data)


@pytest.mark.parametrize("offset", [0, 200, 5000])
def test_a_damaged_member_is_refused_and_the_next_one_still_read(offset: int) -> None:
    found = read_all(damaged(offset))
    assert found["first.dcm"].body is None
    assert found["first.dcm"].problem.startswith("damaged in the zip")
    assert found["second.dcm"].body is not None
    assert found["second.dcm"].body.read() == sample("MR_small.dcm")


def test_a_member_whose_checksum_does_not_match_is_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as packed:
        packed.writestr("first.dcm", sample("CT_small.dcm"))
    data = bytearray(buffer.getvalue())
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("first.dcm")
    wrong = ((info.CRC + 1) % 2**32).to_bytes(4, "little")
    data[info.header_offset + 14 : info.header_offset + 18] = wrong  # the local header
    entry = data.find(b"PK\x01\x02")
    data[entry + 16 : entry + 20] = wrong  # the central directory
    found = read_all(bytes(data))
    assert found["first.dcm"].body is None
    assert "damaged in the zip" in found["first.dcm"].problem and "CRC" in found["first.dcm"].problem
