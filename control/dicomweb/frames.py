"""The viewer's frames, from Orthanc's own raw frames rather than from its DICOMweb plugin.

A viewer asks for every frame of a series, one request each (WADO-RS "retrieve frames"). Orthanc's
DICOMweb plugin 1.7 answers such a request at about 2.3 ms of CPU for a 512x512 CT frame, because
it reads and parses the whole instance for each; Orthanc's core hands the same bytes out of
``/instances/{id}/frames/{n}/raw`` for 0.3 to 0.9 ms (bench/, README: speed). So the control plane
answers these requests itself: it finds the instance, asks the core for the frame and wraps it in
the multipart answer the plugin would have given, byte for byte the same frame, with the same
``Content-Type``, ``Content-Location`` and transfer syntax labels. The viewer's other requests
(metadata, rendered images, bulk data) still go to the plugin through Caddy.

The fast way is taken only where its answer is known to equal the plugin's: one frame, a client
that accepts the stored transfer syntax (``transfer-syntax=*``, or the stored one, or none for
native pixels), and a syntax from ``SERVED`` (checked against the plugin for every sample file in
tests/test_frames.py). Anything else, and anything unexpected on the way (an unknown instance, a
frame number past the last), is relayed from the plugin as it answers, so errors stay Orthanc's.

Orthanc names an instance by the SHA-1 of its patient ID and UIDs, so one look-up of the study's
patient ID (kept per process) is enough to address every frame of the study, and the id can only
name an instance of that patient's study and of the series the URL gives, the ones the gate
checked. A Study Instance UID that two patients' studies share is refused (``StudyShared``), and a
grant's frames come only from the study its link was made for (``NotTheGrantedStudy``): the
plugin, which finds an instance by its own UID, is asked only after the study is looked up again.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import urllib3

from control import dicomweb_routes as routes
from control.archive_version import ArchiveVersions
from control.dicomweb.relay import Answer, Relayed, relay
from control.orthanc import ArchiveClient, OrthancError, resource_id

# One frame number, as a frame of the route table names it: 1 to 999,999,999, no leading zero
# (lists, and any other spelling, go to the plugin).
FRAME_NUMBER = re.compile(r"[1-9][0-9]{0,8}")
NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
# The syntaxes whose raw frames Orthanc 1.10's core gives exactly as DICOMweb 1.7 does (each checked
# on pydicom's sample files), with the media type the plugin names them by. Left to the plugin: big
# endian and deflated (it fails on them), RLE (it refuses multi-frame RLE), syntaxes no sample
# file has (JPEG lossless process 14, .4.57, say), and whatever else a modality may send.
MEDIA_TYPES = {
    **dict.fromkeys(NATIVE, "application/octet-stream"),
    "1.2.840.10008.1.2.4.50": "image/jpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "image/jpeg",  # JPEG extended
    "1.2.840.10008.1.2.4.70": "image/jpeg",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.80": "image/jls",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "image/jls",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "image/jp2",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "image/jp2",  # JPEG 2000
}
SERVED = frozenset(MEDIA_TYPES)
EXPLICIT_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
OCTETS = "application/octet-stream"
KEPT_STUDIES = 4096


def _parameters(media_range: str) -> tuple[str, dict[str, str]]:
    kind, *rest = media_range.split(";")
    parameters = {}
    for item in rest:
        name, _, value = item.partition("=")
        parameters[name.strip().lower()] = value.strip().strip('"')
    return kind.strip().lower(), parameters


def _quality(parameters: dict[str, str]) -> float:
    try:
        return float(parameters.get("q", "1"))
    except ValueError:
        return 1.0


def answered_syntax(accept: str, stored: str, *, native_named_as_stored: bool = False) -> str | None:
    """The transfer syntax an ``Accept`` header gets for a frame stored in ``stored``, when that
    takes no transcoding; None when it does (or asks for something else entirely).

    ``multipart/related`` of ``application/octet-stream`` with ``transfer-syntax=*`` gets the
    stored syntax; native pixels are then named as the plugin names them: by the stored syntax
    (``native_named_as_stored``, DICOMweb 1.7) or as explicit little endian (1.20; see
    control.archive_version). Native pixels are the same bytes in explicit little endian, the default
    when no syntax is named (nor any type: ``*/*``): asked for that way, they are named so.
    Compressed frames named by their syntax must be asked for with their own media type
    (``image/jpeg``...), which the plugin answers.
    """
    for media_range in accept.split(","):
        kind, parameters = _parameters(media_range)
        if _quality(parameters) == 0:
            continue  # explicitly not wanted
        if kind == "*/*":
            wanted = None
        elif kind == "multipart/related" and parameters.get("type", OCTETS) == OCTETS:
            wanted = parameters.get("transfer-syntax")
        else:
            continue
        if wanted == "*":
            return EXPLICIT_LITTLE_ENDIAN if stored in NATIVE and not native_named_as_stored else stored
        if stored in NATIVE and wanted in (None, stored, EXPLICIT_LITTLE_ENDIAN):
            return wanted or EXPLICIT_LITTLE_ENDIAN
    return None


@dataclass(frozen=True)
class FrameRequest:
    """One frame of one instance, as the URL names it."""

    study: str
    series: str
    instance: str
    frame: int

    @classmethod
    def of(cls, uri: str) -> FrameRequest | None:
        """The frame a request target names, or None for anything else (a query string included)."""
        parts = routes.FRAME.match(uri)
        if parts is None or not FRAME_NUMBER.fullmatch(parts["frame"]):
            return None
        return cls(parts["study"], parts["series"], parts["instance"], int(parts["frame"]))

    @property
    def path(self) -> str:
        return (
            f"/dicom-web/studies/{self.study}/series/{self.series}"
            f"/instances/{self.instance}/frames/{self.frame}"
        )


class StudyShared(Exception):
    """The frame's Study Instance UID is held by several patients' studies."""


class NotTheGrantedStudy(Exception):
    """The archive's study under the UID is not the one the grant's link was made for."""


@dataclass(frozen=True)
class Holder:
    """The archive's one study under a Study Instance UID."""

    orthanc_id: str
    patient_id: str


class FrameSource:
    """Frames from Orthanc's core, answered as the DICOMweb plugin answers them."""

    def __init__(self, orthanc: ArchiveClient, versions: ArchiveVersions) -> None:
        self.orthanc = orthanc
        self.versions = versions
        self._holders: OrderedDict[str, Holder] = OrderedDict()
        self._lock = threading.Lock()

    def answer(self, wanted: FrameRequest, accept: str, origin: str, granted_study: str = "") -> Answer:
        """The answer to ``GET wanted.path`` with ``accept``; ``origin`` (``https://host:port``)
        is where the client reached the portal, for the part's ``Content-Location``;
        ``granted_study`` the archive's study a grant holder's link names ('' for signed-in users).

        Raises StudyShared or NotTheGrantedStudy (see the module)."""
        frame = self.from_core(wanted, accept, granted_study)
        if frame is None:
            self._holder(wanted.study, granted_study, fresh=True)
            return relay(self.orthanc, wanted.path, accept, origin)
        syntax, upstream = frame
        length = int(upstream.headers["Content-Length"])
        media_type = f"{MEDIA_TYPES[syntax]}; transfer-syntax={syntax}"
        boundary = uuid.uuid4().hex
        head = (
            f"--{boundary}\r\n"
            f"Content-Location: {origin}{wanted.path}\r\n"
            f"Content-Type: {media_type}\r\n"
            f"Content-Length: {length}\r\n"
            "MIME-Version: 1.0\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        headers = [
            ("Content-Type", f'multipart/related; type="{media_type}"; boundary={boundary}'),
            ("Content-Length", str(len(head) + length + len(tail))),
        ]
        return Answer("200 OK", headers, Relayed(upstream, head, tail))

    def from_core(
        self, wanted: FrameRequest, accept: str, granted_study: str = ""
    ) -> tuple[str, urllib3.BaseHTTPResponse] | None:
        """The syntax to name and the open answer of the core's raw frame, or None: ask the plugin."""
        holder = self._holder(wanted.study, granted_study)
        if holder is None:
            return None
        instance_id = resource_id(holder.patient_id, wanted.study, wanted.series, wanted.instance)
        try:
            stored = self.orthanc.get_text(f"/instances/{instance_id}/metadata/TransferSyntax")
        except OrthancError:
            self._forget(wanted.study)  # the study may have been sent again under another patient
            return None
        if stored not in SERVED:
            return None
        named_as_stored = self.versions.current().native_frames_named_as_stored
        syntax = answered_syntax(accept, stored, native_named_as_stored=named_as_stored)
        if syntax is None:
            return None
        upstream = self.orthanc.open_raw(f"/instances/{instance_id}/frames/{wanted.frame - 1}/raw")
        if upstream.status != 200 or "Content-Length" not in upstream.headers:
            upstream.close()
            upstream.release_conn()
            return None
        return syntax, upstream

    def _holder(self, study_uid: str, granted_study: str, *, fresh: bool = False) -> Holder | None:
        """The study under ``study_uid`` (None when the archive has none), kept per process unless
        ``fresh``; raises StudyShared or NotTheGrantedStudy."""
        holder = None
        with self._lock:
            if not fresh and study_uid in self._holders:
                self._holders.move_to_end(study_uid)
                holder = self._holders[study_uid]
        if holder is None:
            # Two tell that the UID is shared; more are not needed.
            found = self.orthanc.find("Study", {"StudyInstanceUID": study_uid}, expand=True, limit=2)
            if len(found) > 1:
                self._forget(study_uid)
                raise StudyShared(study_uid)
            if not found:
                if granted_study:
                    raise NotTheGrantedStudy(study_uid)
                return None
            holder = Holder(found[0]["ID"], found[0].get("PatientMainDicomTags", {}).get("PatientID", ""))
            with self._lock:
                self._holders[study_uid] = holder
                while len(self._holders) > KEPT_STUDIES:
                    self._holders.popitem(last=False)
        if granted_study and holder.orthanc_id != granted_study:
            raise NotTheGrantedStudy(study_uid)
        return holder

    def _forget(self, study_uid: str) -> None:
        with self._lock:
            self._holders.pop(study_uid, None)
