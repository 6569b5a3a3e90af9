"""The zips the portal builds itself from the archive's stored files, at the speed of the disk.

Orthanc's own ``/archive`` deflates on one core (about 12 MB/s) and streams with no length. Here
the control plane asks Orthanc for each instance's stored file (``GET /instances/{id}/file``, at
several hundred MB/s) and writes the zip around them with stream-zip (``stream_zip``; the zip
format itself is that library's: local headers, Zip64, the central directory). Why stream-zip:
it takes each member's time stamp, size and CRC-32 from the caller, writes them into the local
header (no data descriptors, which some streaming unzippers refuse for stored members) and
checks that the bytes it was given match them, so a member that changed or came short breaks
the zip off instead of ending it normally. (zipstream-ng, the other well-kept candidate, stamps
members given as data with the time they are zipped, so two downloads of one study would
differ and a resumed download would not fit its first part.)

What fixes a zip's bytes is a ``ZipPlan``: the members in order (folder names a person can read:
patient, study, series, file), each with Orthanc's id, the id of its stored attachment
(``FileUuid``, new whenever an instance is stored again) and its size, one time stamp (when the
archive last changed the resource), and what the zip holds. So for stored files:

- the zip's exact length is known before the first byte: stream-zip is run once over the same
  members with no data (a member's framing does not depend on its size or CRC), and the sizes
  are added;
- every download of one plan gives the same bytes, so a ``Range`` request resumes a broken one
  and its strong ``ETag`` (a digest of the plan) answers ``If-Range``. The CRC-32s the local
  headers and the central directory need are computed as the files are read (ISA-L's CRC-32,
  several GB/s); a range that starts in the middle reads again the files before it, at disk speed,
  and sends nothing of them (a CRC per stored attachment would have to be kept somewhere and
  checked against the attachment; reading again costs about a second per 400 MB, on a resume
  only).

Files are read a few ahead of the one being sent, on threads of the download's own, each whole
in memory up to ``WHOLE_FILE_LIMIT`` (larger ones are read twice: once for their CRC, once to
send), so memory stays flat whatever the study. A client that goes away closes the generator,
which drops the files read ahead. Anything that goes wrong upstream (Orthanc gone, a short file,
a CRC that does not match) raises in the generator: the server then breaks the answer off
before its end (no terminating chunk, or short of its ``Content-Length``), so a cut zip never
looks whole.

"JPEG lossless" zips hold each instance as Orthanc transcodes it (``POST /instances/{id}/modify``
with ``Transcode``, keeping its UIDs: the same bytes Orthanc's own transcoding archive holds),
several at once; their length is known only at the end. A compressed zip deflates each member
with ISA-L at its fastest level. A DICOMDIR (pydicom's ``FileSet``) puts the files in the DICOM
media layout (``PT000000/ST000000/SE000000/IM000000``) and adds ``DICOMDIR`` last, written from
the headers of the files as they pass.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pydicom
from isal import isal_zlib
from pydicom.fileset import FileSet
from stream_zip import NO_COMPRESSION_32, NO_COMPRESSION_64, ZIP_32, ZIP_64, stream_zip

from control.orthanc import STREAM_CHUNK, ArchiveClient, OrthancError, OrthancUnavailable

log = logging.getLogger(__name__)

JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
# Files up to this size are read whole into memory (a CT or MR slice is about 0.5 MB); larger ones
# are streamed twice, so that a download's memory does not follow the size of a multi-frame file.
WHOLE_FILE_LIMIT = 16 * 1024 * 1024
# Stored files read ahead of the one being sent (at most that many, and that many bytes), and how
# many Orthanc reads at once: enough to keep the disk and Orthanc busy while one file goes out.
READ_AHEAD = 4
READ_AHEAD_BYTES = 24 * 1024 * 1024
READERS = 2
# Transcoding is Orthanc's CPU: as many at once as it has cores, and a few waiting.
TRANSCODERS = 2
TRANSCODE_AHEAD = 6
# ISA-L's level 1: on the benchmark's CT it leaves 52% of the bytes (level 0: 58%) for about a fifth
# more CPU (129 against 158 MB/s of one core here); a compressed zip is for slow links, where
# bytes count more than CPU. zlib's level 1 gives the same size at a third of the speed.
DEFLATE_LEVEL = 1
FILE_MODE = 0o100644
DICOMDIR_HEADER_BYTES = 4 * 1024 * 1024  # kept of a large file to read its header for the DICOMDIR
ZIP32_MOST = 0xFFFFFFFF
ZIP32_MEMBERS = 0xFFFF
# Transcoded and deflated members are usually smaller than the stored files, rarely much larger:
# their zip is made Zip64 when the stored files, with this margin, could pass 4 GB.
UNSIZED_MARGIN = 1.25
PLAN_FORMAT = "pacs-zip/1"  # in the ETag: a change of layout must change every ETag


class ZipBroken(RuntimeError):
    """The zip cannot be finished: the archive went away, or gave other bytes than planned."""


@dataclass(frozen=True)
class Member:
    """One stored instance in the zip: its path in the zip, and what identifies its stored bytes."""

    name: str
    instance_id: str
    file_uuid: str
    size: int


@dataclass(frozen=True)
class ZipPlan:
    """Everything that fixes a zip's bytes (see the module's docstring)."""

    members: tuple[Member, ...]
    modified_at: dt.datetime
    transcode: str | None = None
    compress: bool = False
    dicomdir: bool = False

    @property
    def sized(self) -> bool:
        """Whether the zip's length is known before it is made (stored files, no DICOMDIR)."""
        return not (self.transcode or self.compress or self.dicomdir)

    @property
    def stored_size(self) -> int:
        return sum(member.size for member in self.members)

    @cached_property
    def zip64(self) -> bool:
        if len(self.members) + self.dicomdir >= ZIP32_MEMBERS:
            return True
        if self.sized:
            return _framing(self, zip64=False) + self.stored_size > ZIP32_MOST
        return self.stored_size * UNSIZED_MARGIN + _framing(self, zip64=False) > ZIP32_MOST

    @cached_property
    def length(self) -> int | None:
        """The zip's exact length in bytes, when it is known beforehand."""
        if not self.sized:
            return None
        return _framing(self, self.zip64) + self.stored_size

    @property
    def etag(self) -> str:
        """A strong entity tag: the same for every download that gives the same bytes."""
        digest = hashlib.sha256()
        head = [PLAN_FORMAT, self.modified_at.isoformat(), self.transcode, self.compress, self.dicomdir]
        digest.update(json.dumps(head).encode())
        for member in self.members:
            digest.update(f"\n{member.name}\0{member.file_uuid}\0{member.size}".encode())
        return f'"{digest.hexdigest()[:40]}"'


def _framing(plan: ZipPlan, zip64: bool) -> int:
    """The zip's bytes apart from the members' data: stream-zip run over the members, empty.

    A stored member's local header and central directory entry have fixed-width fields, so their
    length does not depend on the member's size or CRC; the end records depend only on whether the
    zip is Zip64, which is chosen for the whole zip (``ZipPlan.zip64``).
    """
    method = NO_COMPRESSION_64 if zip64 else NO_COMPRESSION_32
    empty = ((member.name, plan.modified_at, FILE_MODE, method(0, 0), ()) for member in plan.members)
    return sum(len(chunk) for chunk in stream_zip(empty, chunk_size=STREAM_CHUNK))


def crc32(data: bytes | memoryview, value: int = 0) -> int:
    return isal_zlib.crc32(data, value)


@dataclass
class _Read:
    """A member's file as read: whole (``data``), or only its CRC and the start of it."""

    member: Member
    crc: int
    data: bytes | None
    head: bytes = b""


class _Reader:
    """Reads the members' files from Orthanc a few ahead of the zip, in order, on threads."""

    def __init__(self, orthanc: ArchiveClient, plan: ZipPlan) -> None:
        self.orthanc = orthanc
        self.plan = plan
        transcoding = plan.transcode is not None
        self.ahead = TRANSCODE_AHEAD if transcoding else READ_AHEAD
        self.pool = ThreadPoolExecutor(TRANSCODERS if transcoding else READERS, thread_name_prefix="zip")
        self.waiting: deque[tuple[Future[_Read], int]] = deque()
        self.upcoming = deque(plan.members)

    def __iter__(self) -> Iterator[_Read]:
        self._fill()
        while self.waiting:
            future, _size = self.waiting.popleft()
            read = future.result()
            self._fill()
            yield read

    def _fill(self) -> None:
        waiting_bytes = sum(min(size, WHOLE_FILE_LIMIT) for _future, size in self.waiting)
        while self.upcoming and len(self.waiting) < self.ahead:
            member = self.upcoming[0]
            if self.waiting and waiting_bytes + min(member.size, WHOLE_FILE_LIMIT) > READ_AHEAD_BYTES:
                return
            self.upcoming.popleft()
            self.waiting.append((self.pool.submit(self._read, member), member.size))
            waiting_bytes += min(member.size, WHOLE_FILE_LIMIT)

    def _read(self, member: Member) -> _Read:
        if self.plan.transcode:
            data = self._transcoded(member)
            return _Read(member, crc32(data), data)
        if member.size <= WHOLE_FILE_LIMIT:
            data = self.orthanc.instance_file(member.instance_id)
            if len(data) != member.size:
                raise ZipBroken(_changed(member, len(data)))
            return _Read(member, crc32(data), data)
        value, head = 0, bytearray()
        for chunk in self.file_chunks(member):
            value = crc32(chunk, value)
            if self.plan.dicomdir and len(head) < DICOMDIR_HEADER_BYTES:
                head += chunk[: DICOMDIR_HEADER_BYTES - len(head)]
        return _Read(member, value, None, bytes(head))

    def _transcoded(self, member: Member) -> bytes:
        try:
            return self.orthanc.transcoded_instance(member.instance_id, self.plan.transcode or "")
        except OrthancUnavailable:
            raise
        except OrthancError as error:
            # As Orthanc's own archive does: what it cannot transcode goes in as stored.
            log.info("instance %s goes in as stored: %s", member.instance_id, error)
            return self.orthanc.instance_file(member.instance_id)

    def file_chunks(self, member: Member) -> Iterator[bytes]:
        """A stored file in ``STREAM_CHUNK`` blocks, checked against its planned size."""
        received = 0
        for chunk in self.orthanc.stream_instance_file(member.instance_id):
            received += len(chunk)
            yield chunk
        if received != member.size:
            raise ZipBroken(_changed(member, received))

    def close(self) -> None:
        for future, _size in self.waiting:
            future.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _changed(member: Member, size: int) -> str:
    return f"the file of instance {member.instance_id} changed: {size} bytes, not {member.size}"


class _Dicomdir:
    """The DICOMDIR of the files as they pass, with the DICOM media names it gives them."""

    def __init__(self, modified_at: dt.datetime) -> None:
        self.file_set = FileSet()
        self.file_set.ID = "PACS_ZIP"
        self.count = 0
        # What a record needs and some files lack (DICOM PS3.3 F.5 makes them type 1): the file
        # itself goes in unchanged, only its DICOMDIR record gets these.
        self.fallbacks = {
            "PatientID": "UNKNOWN",
            "StudyDate": modified_at.strftime("%Y%m%d"),
            "StudyTime": modified_at.strftime("%H%M%S"),
            "StudyID": "1",
            "Modality": "OT",
            "SeriesNumber": "1",
        }

    def name_for(self, read: _Read) -> str:
        header = pydicom.dcmread(io.BytesIO(read.data or read.head), stop_before_pixels=True, force=True)
        self.count += 1
        for keyword, value in {**self.fallbacks, "InstanceNumber": str(self.count)}.items():
            if not header.get(keyword):
                setattr(header, keyword, value)
        instance = self.file_set.add(header)
        return Path(instance.FileID).as_posix()

    def written(self) -> bytes:
        folder = Path(tempfile.mkdtemp(prefix="dicomdir-"))
        try:
            self.file_set.write(folder)
            return (folder / "DICOMDIR").read_bytes()
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def zip_bytes(
    orthanc: ArchiveClient, plan: ZipPlan, start: int = 0, stop: int | None = None
) -> Iterator[bytes]:
    """The zip's bytes from ``start`` up to ``stop`` (its end when None), as they are made.

    Raises ``ZipBroken`` (or ``OrthancUnavailable``) when the zip cannot be finished; closing the
    generator early stops the reading at once.
    """
    reader = _Reader(orthanc, plan)
    position = 0
    try:
        for chunk in stream_zip(
            _member_files(reader, plan),
            chunk_size=STREAM_CHUNK,
            # stream_zip names zlib's class, though any object with its compress and flush will do.
            get_compressobj=lambda: isal_zlib.compressobj(  # type: ignore[arg-type, return-value]
                DEFLATE_LEVEL, isal_zlib.DEFLATED, -15
            ),
        ):
            end = position + len(chunk)
            if end > start:
                yield chunk[max(start - position, 0) : None if stop is None else stop - position]
            position = end
            if stop is not None and position >= stop:
                return
    except (ZipBroken, OrthancUnavailable):
        raise
    except Exception as error:  # stream-zip's integrity errors, urllib3's broken reads
        raise ZipBroken(f"{type(error).__name__}: {error}") from error
    finally:
        reader.close()


MemberFile = tuple[str, dt.datetime, int, Any, Iterable[bytes]]  # what stream_zip takes


def _member_files(reader: _Reader, plan: ZipPlan) -> Iterator[MemberFile]:
    dicomdir = _Dicomdir(plan.modified_at) if plan.dicomdir else None
    zip64 = plan.zip64
    for read in reader:
        name = dicomdir.name_for(read) if dicomdir else read.member.name
        chunks: Iterable[bytes] = (read.data,) if read.data is not None else reader.file_chunks(read.member)
        size = len(read.data) if read.data is not None else read.member.size
        yield name, plan.modified_at, FILE_MODE, _method(plan, zip64, size, read.crc), chunks
    if dicomdir:
        data = dicomdir.written()
        yield "DICOMDIR", plan.modified_at, FILE_MODE, _method(plan, zip64, len(data), crc32(data)), (data,)


def _method(plan: ZipPlan, zip64: bool, size: int, crc: int) -> Any:
    if plan.compress:
        return ZIP_64 if zip64 else ZIP_32
    return (NO_COMPRESSION_64 if zip64 else NO_COMPRESSION_32)(size, crc)
