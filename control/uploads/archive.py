"""Reading an uploaded zip member by member, within limits that hold whatever its headers claim.

Clients' zips are never handed to Orthanc: Debian's Orthanc 1.10.1 predates the fixes for
malicious archives. The control plane opens them itself, from the spooled upload, one member at a
time, and hands each DICOM member on as its own small file:

- Nothing is ever written under a name from the archive. A member is read into memory, or when
  large into an anonymous temporary file (``tempfile.TemporaryFile``: no name on the disk at all),
  so ``..``, absolute paths and links cannot reach any folder. Such members are refused anyway, as
  the attacks they are; folders are passed over; other files are skipped unread.
- Limits count the bytes actually inflated, not the sizes the headers state: the total unpacked
  size, the number of members, and the compression ratio of each member (beyond a floor, so that a
  small blank image is no "bomb"). A header that understates a member's size makes Python's
  zipfile stop at the stated size and the CRC check refuse the member.
- The central directory, which ``zipfile`` reads whole into memory, is bounded before it is read.
- Damage inside a member (bad deflate data, a wrong CRC) refuses that member; the next is read.

Deflated members are inflated by ISA-L (``isal``) instead of zlib: see ``_inflate_faster``.
"""

from __future__ import annotations

import io
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from isal import isal_zlib

from control.uploads.dicom import HEAD_SIZE, Kind, sniff

CHUNK = 1024 * 1024
IN_MEMORY_LIMIT = 4 * 1024 * 1024  # larger members go to an anonymous temporary file
CENTRAL_DIRECTORY_BYTES_PER_MEMBER = 1024


@dataclass(frozen=True)
class ZipLimits:
    """How far one zip may go. ``max_unpacked`` is in bytes."""

    max_unpacked: int
    max_members: int = 20_000
    max_ratio: int = 100
    ratio_floor: int = 4 * 1024 * 1024  # members inflating to less are never called bombs


class ZipRefused(ValueError):
    """The whole zip is refused (not a zip, too many members), with the reason."""


@dataclass
class Member:
    """One member: ``body`` (positioned at 0) when it is a DICOM candidate, else the reason it is not.

    ``skipped`` members are left out on purpose (not DICOM, a folder index); the others with a
    ``problem`` are refused.
    """

    name: str
    body: IO[bytes] | None = None
    size: int = 0
    problem: str = ""
    skipped: bool = False


def display_name(name: str) -> str:
    """A member's name as the results table shows it: no control characters, at most 200."""
    cleaned = "".join(character if character.isprintable() else "?" for character in name)
    return cleaned if len(cleaned) <= 200 else cleaned[:99] + "…" + cleaned[-100:]


def unsafe_name(name: str) -> bool:
    """Whether a member's name climbs out of its folder or starts at a root (zip-slip)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts


def members(file: IO[bytes], limits: ZipLimits) -> Iterator[Member]:
    """The members of the zip ``file``, in the order of its central directory."""
    _check_central_directory(file, limits)
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise ZipRefused(f"not a readable zip file ({error})") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.max_members:
            raise ZipRefused(f"holds {len(infos)} files; at most {limits.max_members} are taken from one zip")
        unpacked = 0
        for info in infos:
            name = display_name(info.filename)
            if info.is_dir():
                continue
            if unsafe_name(info.filename):
                yield Member(name, problem="a name that leads outside the zip's folders (zip-slip)")
                continue
            if info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16):
                yield Member(name, problem="a link, not a file")
                continue
            if info.flag_bits & 0x1:
                yield Member(name, problem="encrypted")
                continue
            if unpacked >= limits.max_unpacked:
                yield Member(name, problem=_too_much(limits))
                continue
            member, inflated = _read_member(archive, info, name, limits, limits.max_unpacked - unpacked)
            unpacked += inflated
            yield member


def _too_much(limits: ZipLimits) -> str:
    return f"not unpacked: the zip unpacks to more than {limits.max_unpacked // 1024 // 1024} MB"


def _check_central_directory(file: IO[bytes], limits: ZipLimits) -> None:
    """Refuse a zip whose central directory is larger than its allowed members can need.

    ``zipfile.ZipFile`` reads the whole central directory into memory, sized by the end record, before
    anything can be checked; ``zipfile._EndRecData`` is how zipfile itself finds that record (a private
    function, stable since Python 2), so the bound applies to exactly what zipfile will read.
    """
    file.seek(0)
    end_record = zipfile._EndRecData(file)  # type: ignore[attr-defined]  # private: typeshed leaves it out
    file.seek(0)
    if end_record is None:
        raise ZipRefused("not a readable zip file (no end of central directory)")
    directory_size = end_record[zipfile._ECD_SIZE]  # type: ignore[attr-defined]  # the same
    if directory_size > limits.max_members * CENTRAL_DIRECTORY_BYTES_PER_MEMBER:
        raise ZipRefused(f"its index is too large for the {limits.max_members} files taken from one zip")


class _Stop(Exception):
    """Reading a member stops here, for the reason given."""


def _read_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limits: ZipLimits, allowance: int
) -> tuple[Member, int]:
    """Inflate one member within the limits; return it and how many bytes were inflated."""
    ratio_limit = max(limits.ratio_floor, limits.max_ratio * max(info.compress_size, 1))
    inflated = 0
    body: IO[bytes] = io.BytesIO()
    try:
        with archive.open(info) as stream:
            _inflate_faster(stream, info)
            head = stream.read(HEAD_SIZE)
            inflated = len(head)
            kind = sniff(head)
            if kind is Kind.ZIP:
                return Member(name, problem="a zip inside the zip is not opened", skipped=True), inflated
            if kind is not Kind.DICOM:
                return Member(name, problem=f"not a DICOM file ({kind.value})", skipped=True), inflated
            body.write(head)
            while chunk := stream.read(CHUNK):
                inflated += len(chunk)
                if inflated > allowance:
                    raise _Stop(_too_much(limits))
                if inflated > ratio_limit:
                    raise _Stop(f"inflates more than {limits.max_ratio} times its packed size (a zip bomb?)")
                if isinstance(body, io.BytesIO) and inflated > IN_MEMORY_LIMIT:
                    body = _to_temporary_file(body)
                body.write(chunk)
    except _Stop as stop:
        problem = str(stop)
    # isal's stub declares its error an instance; it is the exception class.
    except (zipfile.BadZipFile, zlib.error, isal_zlib.error) as error:  # type: ignore[misc]
        problem = f"damaged in the zip ({error})"
    except (NotImplementedError, RuntimeError, EOFError, OSError, ValueError) as error:
        problem = f"cannot be unpacked ({error})"
    else:
        body.seek(0)
        return Member(name, body=body, size=inflated), inflated
    body.close()
    return Member(name, problem=problem), inflated


def _inflate_faster(stream: IO[bytes], info: zipfile.ZipInfo) -> None:
    """Have ``stream`` inflate with ISA-L rather than zlib, when the member is deflated.

    ISA-L (``isal_zlib``, a drop-in for ``zlib``) inflates about 1.6 times as fast on this kind of
    data: unpacking is most of an upload's work in the control plane (see README: speed). zipfile
    keeps doing the rest (reading, limits, CRC). ``_decompressor`` is the attribute zipfile reads
    from (private, unchanged since Python 3.3); it is set before anything is read, and only for
    deflate, the one method whose decompressor ``isal_zlib`` replaces.
    """
    if info.compress_type == zipfile.ZIP_DEFLATED and hasattr(stream, "_decompressor"):
        stream._decompressor = isal_zlib.decompressobj(-15)  # raw deflate, as zipfile's own


def _to_temporary_file(buffer: io.BytesIO) -> IO[bytes]:
    spilled = tempfile.TemporaryFile()  # noqa: SIM115 - handed on to the sender, which closes it
    spilled.write(buffer.getbuffer())
    buffer.close()
    return spilled
