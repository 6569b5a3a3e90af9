"""One upload request's files, checked and sent on, with a result for every file.

Werkzeug spools each uploaded file (in memory up to 500 kB, then in an anonymous temporary file).
Each file is recognised by its first bytes (``control.uploads.dicom.sniff``):

- a DICOM file is checked with pydicom and sent to Orthanc (``POST /instances``) as a stream;
- a zip is opened here (``control.uploads.archive``) and its DICOM members are sent one by one;
- an HL7 file's orders become worklist entries (``control.uploads.worklist``);
- anything else is refused with the reason, and so is a PDF (it needs a study: see the PDF form).

A few threads check and send DICOM files while the next zip member is inflated: Orthanc stores in
parallel, and the check (Python) overlaps with Orthanc's work. At most ``IN_FLIGHT`` files wait
for a sender, so memory stays bounded however large the zip. Results keep the files' order.

A file is "stored" only once Orthanc has answered that it stored it. Anything else that keeps it
out (the archive gone or restarting, its own failure, a disk too full) says "not stored" with
"please send it again": sending again is safe, as a file already stored comes back as a duplicate.
"""

from __future__ import annotations

import enum
import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from control import formatting
from control.orthanc import ArchiveClient, OrthancRefused, OrthancUnavailable
from control.uploads import archive, hl7orders, worklist
from control.uploads.dicom import HEAD_SIZE, Kind, NotForTheArchive, check_dicom, sniff

SENDERS = 4
IN_FLIGHT = 2 * SENDERS
HL7_MAX_BYTES = 10 * 1024 * 1024  # an order is a few hundred bytes; a file is read whole to parse
MB = 1024 * 1024
PROGRESS_SECONDS = 2.0  # how often a long upload says how far it got (``Upload.on_progress``)

log = logging.getLogger(__name__)


class Outcome(enum.StrEnum):
    """What became of one file (or zip member, or HL7 message). The values are what pages show."""

    STORED = "stored"
    DUPLICATE = "already in the archive"
    REFUSED = "refused"
    SKIPPED = "skipped"
    SCHEDULED = "scheduled"
    REPLACED = "replaced"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class FileResult:
    """One row of the results table."""

    name: str
    outcome: Outcome
    detail: str = ""
    study: str = ""
    patient: str = ""
    # The archive's id of the study the file went into (Orthanc's ``ParentStudy``), once stored.
    study_id: str = ""
    # For DICOMweb's answer to a store (control.uploads.stow): which instance this was.
    series: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""

    def as_json(self) -> dict[str, str]:
        """The row as the upload page's JSON answer has it (its docstring's fields)."""
        return {
            "name": self.name,
            "outcome": self.outcome.name.lower(),
            "detail": self.detail,
            "study": self.study,
            "study_id": self.study_id,
            "patient": self.patient,
        }


class DiskGuard:
    """Whether the archive's disk can take more without eating into the reserve."""

    def __init__(self, storage: Path, reserve_bytes: int) -> None:
        self.storage = storage
        self.reserve_bytes = reserve_bytes

    def problem(self, incoming: int = 0) -> str:
        """Why ``incoming`` more bytes cannot be taken now, or '' when they can."""
        free = shutil.disk_usage(self.storage).free
        if free - incoming >= self.reserve_bytes:
            return ""
        return (
            f"The archive's disk is nearly full ({free // MB} MB free, {self.reserve_bytes // MB} MB "
            "kept in reserve): uploads are refused until an administrator makes room."
        )


def shown_counts(counts: dict[str, int]) -> dict[str, int]:
    """The counts an upload's activity event shows: those that happened, and the three main ones."""
    return {
        name: count for name, count in counts.items() if count or name in ("stored", "duplicate", "refused")
    }


@dataclass
class Upload:
    """Everything one upload request needs, and what it did."""

    orthanc: ArchiveClient
    worklists: Path
    zip_limits: archive.ZipLimits
    disk: DiskGuard
    # A DICOMweb store to one study's URL takes that study's instances only.
    only_study: str = ""
    # Called with the counts so far (``counts``, files whose outcome is known) at most every
    # PROGRESS_SECONDS while the upload goes on, from the request's own thread.
    on_progress: Callable[[dict[str, int]], None] | None = None
    # How the results name scheduled dates (the ``date_format`` setting).
    date_format: str = "%Y-%m-%d"
    results: list[FileResult | Future[FileResult]] = field(default_factory=list)
    orders: list[tuple[hl7orders.Order, worklist.Change]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._senders = ThreadPoolExecutor(SENDERS, thread_name_prefix="upload")
        self._waiting = threading.BoundedSemaphore(IN_FLIGHT)
        self._last_progress = time.monotonic()

    def receive(self, name: str, file: IO[bytes]) -> None:
        """Take one uploaded file (positioned anywhere); its results are added in order."""
        name = archive.display_name(name or "(no name)")
        file.seek(0, 2)
        size = file.tell()
        file.seek(0)
        kind = sniff(file.read(HEAD_SIZE))
        file.seek(0)
        if kind is Kind.DICOM:
            self._send(name, file, size, owned=False)
        elif kind is Kind.ZIP:
            self._receive_zip(name, file)
        elif kind is Kind.HL7:
            self._receive_hl7(name, file, size)
        elif kind is Kind.PDF:
            self._refuse(name, "a PDF report is attached to a study: use the form for PDF reports")
        elif size == 0:
            self._refuse(name, "an empty file")
        else:
            self._refuse(name, "not a DICOM file, a zip of DICOM files or an HL7 order file")

    def receive_dicom(self, name: str, file: IO[bytes], size: int) -> None:
        """Take one file that must be DICOM (a DICOMweb store's part); it is closed when sent."""
        self._send(archive.display_name(name), file, size, owned=True)

    def finish(self) -> list[FileResult]:
        """Wait for the senders; every file's result, in the order the files came."""
        self._senders.shutdown(wait=True)
        finished = [item.result() if isinstance(item, Future) else item for item in self.results]
        self.results = list(finished)
        return finished

    def counts(self) -> dict[str, int]:
        """How many files had each outcome (all outcomes, zeros included)."""
        return _counted(self.finish())

    def _progress(self) -> None:
        if self.on_progress is None or time.monotonic() - self._last_progress < PROGRESS_SECONDS:
            return
        self._last_progress = time.monotonic()
        known = [
            item.result() if isinstance(item, Future) else item
            for item in self.results
            if not isinstance(item, Future) or item.done()
        ]
        self.on_progress(_counted(known))

    def _refuse(self, name: str, reason: str, *, skipped: bool = False) -> None:
        self.results.append(FileResult(name, Outcome.SKIPPED if skipped else Outcome.REFUSED, reason))

    def _receive_zip(self, name: str, file: IO[bytes]) -> None:
        try:
            for member in archive.members(file, self.zip_limits):
                member_name = f"{name}: {member.name}"
                if member.body is None:
                    self._refuse(member_name, member.problem, skipped=member.skipped)
                else:
                    self._send(member_name, member.body, member.size, owned=True)
        except archive.ZipRefused as error:
            self._refuse(name, str(error))

    def _send(self, name: str, body: IO[bytes], size: int, *, owned: bool) -> None:
        problem = self.disk.problem(size)
        if problem:
            if owned:
                body.close()
            self._refuse(name, problem)
            return
        self._waiting.acquire()
        future = self._senders.submit(self._store, name, body, size, owned)
        future.add_done_callback(lambda _done: self._waiting.release())
        self.results.append(future)
        self._progress()

    def _store(self, name: str, body: IO[bytes], size: int, owned: bool) -> FileResult:
        """Check one DICOM file and send it (in a sender thread)."""
        known: dict[str, str] = {}  # which instance it is, once its header is read
        try:
            header = check_dicom(body, size)
            known = {"sop_class_uid": header.sop_class_uid, "sop_instance_uid": header.sop_instance_uid}
            if self.only_study and header.study_instance_uid != self.only_study:
                raise NotForTheArchive(
                    f"its study {header.study_instance_uid} is not the study of the request's URL"
                )
            small = size <= archive.IN_MEMORY_LIMIT
            answer = self.orthanc.store_instance(body.read() if small else body, size)
        except NotForTheArchive as error:
            outcome = Outcome.SKIPPED if error.skipped else Outcome.REFUSED
            return FileResult(name, outcome, str(error), **known)
        except OrthancRefused as error:
            if error.status >= 500:
                # Not about the file: the archive failed to store it (a disk full, its database
                # busy, shutting down).
                return FileResult(
                    name, Outcome.REFUSED, f"not stored: {error.reason}; please send it again", **known
                )
            return FileResult(name, Outcome.REFUSED, f"the archive refused it: {error.reason}", **known)
        except OrthancUnavailable:
            detail = "the archive did not answer; please send it again"
            return FileResult(name, Outcome.REFUSED, detail, **known)
        except Exception:
            log.exception("Unexpected error storing %s", name)
            return FileResult(name, Outcome.REFUSED, "an unexpected error (logged for the administrator)")
        finally:
            if owned:
                body.close()
        outcome = Outcome.DUPLICATE if answer.get("Status") == "AlreadyStored" else Outcome.STORED
        return FileResult(
            name,
            outcome,
            study=header.study_instance_uid,
            study_id=str(answer.get("ParentStudy") or ""),
            patient=formatting.patient_label(header.patient_name, header.patient_id),
            series=header.series_instance_uid,
            sop_class_uid=header.sop_class_uid,
            sop_instance_uid=header.sop_instance_uid,
        )

    def _receive_hl7(self, name: str, file: IO[bytes], size: int) -> None:
        if size > HL7_MAX_BYTES:
            self._refuse(name, f"an HL7 file larger than {HL7_MAX_BYTES // MB} MB")
            return
        orders, refusals = hl7orders.read_orders(hl7orders.decode(file.read()))
        rows: list[tuple[int, FileResult]] = [
            (refusal.message, FileResult(name, Outcome.REFUSED, str(refusal))) for refusal in refusals
        ]
        for order in orders:
            rows.append((order.message, self._apply_order(name, order)))
        self.results.extend(row for _message, row in sorted(rows, key=lambda row: row[0]))

    def _apply_order(self, name: str, order: hl7orders.Order) -> FileResult:
        patient = formatting.patient_label(order.patient_name, order.patient_id) if order.patient_id else ""
        try:
            change = worklist.apply(self.worklists, order)
        except worklist.NothingToCancel as error:
            return FileResult(name, Outcome.REFUSED, str(error), patient=patient)
        self.orders.append((order, change))
        when = formatting.when(order.scheduled_date, order.scheduled_time, self.date_format)
        detail = f"message {order.message}: accession {order.accession_number}"
        if change is not worklist.Change.CANCELLED:
            # "CT Head" says its modality already: "CT CT Head" would say it twice.
            procedure = order.procedure_text
            if order.modality and order.modality not in procedure.split():
                procedure = " ".join(part for part in (procedure, f"({order.modality})") if part)
            detail += f", {procedure}" if procedure else ""
            detail += f", {when}" if when else ""
            detail += f" at {order.station_aet}" if order.station_aet else ""
        return FileResult(name, Outcome(change.value), detail, patient=patient)


def _counted(results: list[FileResult]) -> dict[str, int]:
    counted = Counter(result.outcome for result in results)
    return {outcome.name.lower(): counted[outcome] for outcome in Outcome}


def summary(results: list[FileResult]) -> dict[str, Any]:
    """Details for the activity log: the studies touched when there is just one."""
    studies = {result.study for result in results if result.study}
    patients = {result.patient for result in results if result.patient}
    return {
        "study": next(iter(studies)) if len(studies) == 1 else "",
        "patient": next(iter(patients)) if len(patients) == 1 else "",
        "studies": len(studies),
    }
