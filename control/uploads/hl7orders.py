"""HL7 v2 order messages read into worklist orders, or refused with the segment and field named.

A text file may hold one message or many (also wrapped in FHS/BHS batch segments); segments may end
with CR, LF or CRLF. Messages are read one by one with the ``hl7`` library, so one bad message is
refused while the others go in. Orders come from ORM^O01, OMG^O19 and OMI^O23 messages; every
ORC/OBR group in a message is one order. Fields are read where the IHE Scheduled Workflow profile
puts them, first non-empty field wins:

=========================== ======================================= =========================
worklist attribute           HL7 field                                DICOM attribute
=========================== ======================================= =========================
order control                ORC-1 (NW, XO, SC, RP schedule;          (what happens to the
                             CA, DC, OC, OD cancel)                  entry)
patient ID (required)        PID-3.1 (issuer PID-3.4)                 PatientID (IssuerOfPatientID)
patient name (required)      PID-5                                    PatientName
birth date, sex              PID-7, PID-8                             PatientBirthDate, PatientSex
accession number (required)  IPC-1, OBR-18, ORC-3, OBR-3              AccessionNumber
requested procedure ID       IPC-2, OBR-19                            RequestedProcedureID
study instance UID           IPC-3, ZDS-1                             StudyInstanceUID (else one
                                                                      derived from the order)
scheduled step ID            IPC-4, OBR-20                            ScheduledProcedureStepID
modality (required)          IPC-5, OBR-24                            Modality
scheduled station AE title   IPC-9, OBR-21                            ScheduledStationAETitle
requested procedure          OBR-4 (code^text^scheme)                 RequestedProcedureDescription
                                                                      and its code sequence
scheduled date/time          TQ1-7, ORC-7.4, OBR-27.4, OBR-36, OBR-7  ScheduledProcedureStep
                                                                      StartDate/StartTime
referring physician          PV1-8, OBR-16, ORC-12                    ReferringPhysicianName
placer / filler order no.    ORC-2, ORC-3                             PlacerOrderNumber... /
                                                                      FillerOrderNumber...
=========================== ======================================= =========================

Nothing here touches the disk: ``control.uploads.worklist`` turns orders into entries.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import hl7

from control.identifiers import is_uid

ORDER_MESSAGES = {("ORM", "O01"), ("OMG", "O19"), ("OMI", "O23")}
SCHEDULING_CONTROLS = {"NW", "XO", "SC", "RP"}
CANCELLING_CONTROLS = {"CA", "DC", "OC", "OD"}
WRAPPER_SEGMENTS = ("FHS", "FTS", "BHS", "BTS")

# DICOM value lengths of the attributes an order fills (PS3.5 table 6.2-1): longer values are refused
# rather than silently cut, since a cut accession number would match another order.
_SHORT_STRING = 16
_LONG_STRING = 64
_CODE_STRING = re.compile(r"^[A-Z0-9_ ]{1,16}$")
_AE_TITLE = re.compile(r"^[^\\\x00-\x1f]{1,16}$")
_HL7_TIMESTAMP = re.compile(r"^(\d{8})(\d{2}(?:\d{2}(?:\d{2})?)?)?(\.\d+)?([+-]\d{4})?$")


@dataclass(frozen=True)
class Order:
    """One order as the worklist needs it; DICOM-ready values (dates YYYYMMDD, names PN)."""

    message: int
    control: str
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    accession_number: str
    requested_procedure_id: str
    study_instance_uid: str
    step_id: str
    modality: str
    station_aet: str
    procedure_code: str
    procedure_scheme: str
    procedure_text: str
    scheduled_date: str
    scheduled_time: str
    referring_physician: str
    placer_order_number: str
    filler_order_number: str

    @property
    def cancels(self) -> bool:
        return self.control in CANCELLING_CONTROLS

    @property
    def key(self) -> str:
        """What makes a repeated order the same order: its accession number and step."""
        return "\\".join((self.accession_number, self.requested_procedure_id, self.step_id))


@dataclass(frozen=True)
class Refusal:
    """A message (or a part of the file) that is not taken, and why, in the sender's terms."""

    message: int
    reason: str

    def __str__(self) -> str:
        where = f"message {self.message}" if self.message else "before the first message"
        return f"{where}: {self.reason}"


def decode(data: bytes) -> str:
    """HL7 text from a file: UTF-8 (with or without a byte order mark), else Latin-1."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def split_messages(text: str) -> Iterator[tuple[int, str]]:
    """(position, text) of each message; position 0 holds text found before the first MSH."""
    number = 0
    current: list[str] = []
    for line in re.split(r"\r\n|\r|\n", text):
        segment = line.strip()
        if not segment or segment.startswith(WRAPPER_SEGMENTS):
            continue
        if segment.startswith("MSH"):
            if current:
                yield number, "\r".join(current)
            number += 1
            current = [segment]
        else:
            current.append(segment)
    if current:
        yield number, "\r".join(current)


def read_orders(text: str) -> tuple[list[Order], list[Refusal]]:
    """The orders of every good message in ``text``, and a refusal for every bad one."""
    orders: list[Order] = []
    refusals: list[Refusal] = []
    found_message = False
    for number, message_text in split_messages(text):
        if number == 0:
            refusals.append(Refusal(0, "text that is not part of an HL7 message (a message starts with MSH)"))
            continue
        found_message = True
        try:
            orders.extend(_orders_of(number, message_text))
        except OrderError as error:
            refusals.append(Refusal(number, str(error)))
    if not found_message:
        refusals = [Refusal(0, "no HL7 message found: a message starts with an MSH segment")]
    return orders, refusals


class OrderError(ValueError):
    """What is wrong with one message; the text names the segment and field."""


def _value(segment: hl7.Segment | None, field: int, component: int = 1) -> str:
    """A field's (or component's) unescaped text, '' when absent."""
    if segment is None:
        return ""
    try:
        return str(segment.extract_field(1, field, 1, component, 1)).strip()
    except IndexError:
        return ""


def _first(*values: str) -> str:
    return next((value for value in values if value), "")


def _components(segment: hl7.Segment | None, field: int, count: int) -> list[str]:
    return [_value(segment, field, component) for component in range(1, count + 1)]


def _person_name(parts: list[str]) -> str:
    """HL7 XPN family^given^middle^suffix^prefix as DICOM PN family^given^middle^prefix^suffix."""
    family, given, middle, suffix, prefix = (parts + [""] * 5)[:5]
    return "^".join((family, given, middle, prefix, suffix)).rstrip("^")


def _timestamp(text: str, label: str) -> tuple[str, str]:
    """(YYYYMMDD, HHMMSS) of an HL7 timestamp; raises OrderError naming ``label``."""
    if not text:
        return "", ""
    match = _HL7_TIMESTAMP.match(text)
    if not match:
        raise OrderError(f"{label} is not a date and time (YYYYMMDD[HHMM[SS]]): {text!r}")
    return match.group(1), match.group(2) or ""


def _segment_groups(message: hl7.Message) -> Iterator[dict[str, hl7.Segment]]:
    """Each ORC with the OBR, IPC, TQ1 and ZDS segments that follow it (up to the next ORC)."""
    group: dict[str, hl7.Segment] = {}
    for segment in message:
        name = str(segment[0])
        if name == "ORC":
            if group:
                yield group
            group = {"ORC": segment}
        elif group and name in ("OBR", "IPC", "TQ1", "ZDS") and name not in group:
            group[name] = segment
    if group:
        yield group


def _orders_of(number: int, text: str) -> list[Order]:
    try:
        message = hl7.parse(text)
    except (hl7.ParseException, ValueError, IndexError) as error:
        raise OrderError(f"not a readable HL7 message ({error})") from None
    msh = message.segments("MSH")[0]
    kind = (_value(msh, 9, 1), _value(msh, 9, 2))
    if kind not in ORDER_MESSAGES:
        shown = "^".join(part for part in kind if part) or "empty"
        raise OrderError(f"MSH-9 (message type) is {shown}, expected an order: ORM^O01, OMG^O19 or OMI^O23")
    pid = _one(message, "PID")
    pv1 = _one(message, "PV1")
    groups = list(_segment_groups(message))
    if not groups:
        raise OrderError("ORC (common order) segment is missing")
    return [_order(number, pid, pv1, group) for group in groups]


def _one(message: hl7.Message, name: str) -> hl7.Segment | None:
    return next((segment for segment in message if str(segment[0]) == name), None)


def _order(number: int, pid: hl7.Segment | None, pv1: hl7.Segment | None, group: dict) -> Order:
    orc, obr, ipc = group["ORC"], group.get("OBR"), group.get("IPC")
    control = _value(orc, 1).upper()
    problems: list[str] = []
    if not control:
        problems.append("ORC-1 (order control) is missing")
    elif control not in SCHEDULING_CONTROLS | CANCELLING_CONTROLS:
        problems.append(
            f"ORC-1 (order control) {control!r} is not handled: NW, XO, SC or RP schedule, "
            "CA, DC, OC or OD cancel"
        )
    accession = _first(_value(ipc, 1), _value(obr, 18), _value(orc, 3), _value(obr, 3))
    patient_id = _value(pid, 3)
    patient_name = _person_name(_components(pid, 5, 5))
    modality = _first(_value(ipc, 5), _value(obr, 24)).upper()
    if pid is None:
        problems.append("PID (patient identification) segment is missing")
    else:
        if not patient_id:
            problems.append("PID-3 (patient ID) is missing")
        if not patient_name.strip("^"):
            problems.append("PID-5 (patient name) is missing")
    if obr is None:
        problems.append("OBR (observation request) segment is missing")
    if not accession:
        problems.append("OBR-18 (accession number) is missing (nor is it in IPC-1 or ORC-3)")
    cancels = control in CANCELLING_CONTROLS
    if not cancels and not modality:
        problems.append("OBR-24 (modality) is missing (nor is it in IPC-5)")
    if problems:
        raise OrderError("; ".join(problems))

    scheduled = _first(
        _value(group.get("TQ1"), 7),
        _value(orc, 7, 4),
        _value(obr, 27, 4),
        _value(obr, 36),
        _value(obr, 7),
    )
    scheduled_date, scheduled_time = _timestamp(scheduled, "the scheduled date/time (TQ1-7, ORC-7 or OBR-7)")
    birth_date, _ = _timestamp(_value(pid, 7), "PID-7 (birth date)")
    referring = _first(
        _person_name(_components(pv1, 8, 6)[1:]),
        _person_name(_components(obr, 16, 6)[1:]),
        _person_name(_components(orc, 12, 6)[1:]),
    )
    order = Order(
        message=number,
        control=control,
        patient_id=patient_id,
        issuer_of_patient_id=_value(pid, 3, 4),
        patient_name=patient_name,
        birth_date=birth_date,
        sex={"M": "M", "F": "F", "O": "O", "A": "O", "N": "O"}.get(_value(pid, 8).upper(), ""),
        accession_number=accession,
        requested_procedure_id=_first(_value(ipc, 2), _value(obr, 19)),
        study_instance_uid=_first(_value(ipc, 3), _value(group.get("ZDS"), 1)),
        step_id=_first(_value(ipc, 4), _value(obr, 20)),
        modality=modality,
        station_aet=_first(_value(ipc, 9), _value(obr, 21)),
        procedure_code=_value(obr, 4, 1),
        procedure_text=_first(_value(obr, 4, 2), _value(obr, 4, 5)),
        procedure_scheme=_value(obr, 4, 3),
        scheduled_date=scheduled_date,
        scheduled_time=scheduled_time,
        referring_physician=referring,
        placer_order_number=_value(orc, 2),
        filler_order_number=_value(orc, 3),
    )
    _check_lengths(order)
    return order


def _check_lengths(order: Order) -> None:
    """Refuse values that do not fit their DICOM attribute, naming the HL7 field."""
    problems = []
    for value, limit, label in (
        (order.accession_number, _SHORT_STRING, "OBR-18 (accession number)"),
        (order.requested_procedure_id, _SHORT_STRING, "OBR-19 (requested procedure ID)"),
        (order.step_id, _SHORT_STRING, "OBR-20 (scheduled procedure step ID)"),
        (order.patient_id, _LONG_STRING, "PID-3 (patient ID)"),
    ):
        if len(value) > limit:
            problems.append(f"{label} is longer than {limit} characters")
    if order.modality and not _CODE_STRING.match(order.modality):
        problems.append(f"OBR-24 (modality) {order.modality!r} is not a DICOM modality such as CT or MR")
    if order.station_aet and not _AE_TITLE.match(order.station_aet):
        problems.append("OBR-21 (scheduled station AE title) is not an AE title of up to 16 characters")
    if order.study_instance_uid and not (
        len(order.study_instance_uid) <= _LONG_STRING and is_uid(order.study_instance_uid)
    ):
        problems.append("IPC-3/ZDS-1 (study instance UID) is not a UID")
    if problems:
        raise OrderError("; ".join(problems))
