"""HL7 order messages read into worklist orders, and orders written as worklist entries (no stack)."""

from __future__ import annotations

import pydicom
import pytest

from control.uploads import hl7orders, worklist

pytestmark = pytest.mark.inprocess

ORDER = (
    "MSH|^~\\&|RIS|HOSP|PACS|HOSP|20240102120000||ORM^O01|MSG1|P|2.3\r"
    "PID|1||PAT001^^^HOSP^MR||Παπαδόπουλος^Γιώργος^Κ||19700101|M\r"
    "PV1|1|O||||||123^Smith^Anna\r"
    "ORC|NW|PLC1|FIL1||SC||^^^202403150930\r"
    "OBR|1|PLC1|FIL1|CTHEAD^CT Head^L||||||||||||^Jones^Bob||ACC001|RP01|SPS01|CT01|||CT\r"
)


def message(*segments: str, kind: str = "ORM^O01") -> str:
    return "\r".join([f"MSH|^~\\&|RIS|HOSP|PACS|HOSP|20240102120000||{kind}|MSG|P|2.3", *segments])


def test_an_order_is_read_field_by_field() -> None:
    orders, refusals = hl7orders.read_orders(ORDER)
    assert refusals == []
    (order,) = orders
    assert order.control == "NW"
    assert (order.patient_id, order.issuer_of_patient_id) == ("PAT001", "HOSP")
    assert order.patient_name == "Παπαδόπουλος^Γιώργος^Κ"
    assert (order.birth_date, order.sex) == ("19700101", "M")
    assert (order.accession_number, order.requested_procedure_id, order.step_id) == (
        "ACC001",
        "RP01",
        "SPS01",
    )
    assert (order.modality, order.station_aet) == ("CT", "CT01")
    assert (order.procedure_code, order.procedure_text, order.procedure_scheme) == ("CTHEAD", "CT Head", "L")
    assert (order.scheduled_date, order.scheduled_time) == ("20240315", "0930")
    assert order.referring_physician == "Smith^Anna"
    assert (order.placer_order_number, order.filler_order_number) == ("PLC1", "FIL1")


def test_line_feeds_batches_and_a_byte_order_mark_are_accepted() -> None:
    text = (
        "\ufeffFHS|^~\\&\nBHS|^~\\&\n"
        + ORDER.replace("\r", "\r\n")
        + ORDER.replace("ACC001", "ACC002")
        + "BTS|2\nFTS|1\n"
    )
    orders, refusals = hl7orders.read_orders(hl7orders.decode(text.encode("utf-8")))
    assert refusals == []
    assert [order.accession_number for order in orders] == ["ACC001", "ACC002"]


def test_an_omi_order_takes_its_identifiers_from_ipc() -> None:
    text = message(
        "PID|1||P9||Roe^Richard",
        "ORC|NW|PLC9",
        "TQ1|1||||||20240401083000",
        "OBR|1|PLC9||MRBRAIN^MR Brain",
        "IPC|ACC9|RP9|1.2.3.4.5|SPS9|MR||||MR01",
        kind="OMI^O23",
    )
    (order,), refusals = hl7orders.read_orders(text)
    assert refusals == []
    assert (order.accession_number, order.requested_procedure_id, order.step_id) == ("ACC9", "RP9", "SPS9")
    assert (order.study_instance_uid, order.modality, order.station_aet) == ("1.2.3.4.5", "MR", "MR01")
    assert (order.scheduled_date, order.scheduled_time) == ("20240401", "083000")


@pytest.mark.parametrize(
    ("segments", "kind", "reason"),
    [
        (
            ["PID|1||P1||Doe^Jane", "ORC|NW|X", "OBR|1|X||||||||||||||||A1||||||CT"],
            "ADT^A01",
            "MSH-9 (message type) is ADT^A01",
        ),
        (
            ["PID|1||||Doe^Jane", "ORC|NW|X", "OBR|1|X|||||||||||||||||||||CT"],
            "ORM^O01",
            "PID-3 (patient ID) is missing",
        ),
        (
            ["PID|1||P1", "ORC|NW|X", "OBR|1|X||||||||||||||||A1||||||CT"],
            "ORM^O01",
            "PID-5 (patient name) is missing",
        ),
        (
            ["PID|1||P1||Doe^Jane", "ORC|NW|X", "OBR|1|X||||||||||||||||A1"],
            "ORM^O01",
            "OBR-24 (modality) is missing",
        ),
        (
            ["PID|1||P1||Doe^Jane", "ORC|NW", "OBR|1||||||||||||||||||||||CT"],
            "ORM^O01",
            "OBR-18 (accession number) is missing",
        ),
        (["PID|1||P1||Doe^Jane"], "ORM^O01", "ORC (common order) segment is missing"),
        (
            ["PID|1||P1||Doe^Jane", "ORC|HD|X", "OBR|1|X||||||||||||||||A1||||||CT"],
            "ORM^O01",
            "ORC-1 (order control) 'HD'",
        ),
        (
            ["PID|1||P1||Doe^Jane", "ORC|NW|X", "OBR|1|X||||||||||||||||A1||||||CT||||||||||||tomorrow"],
            "ORM^O01",
            "not a date",
        ),
        (
            ["PID|1||P1||Doe^Jane", "ORC|NW|X", "OBR|1|X||||||||||||||||ACCESSION-TOO-LONG-1||||||CT"],
            "ORM^O01",
            "longer than 16",
        ),
    ],
)
def test_bad_messages_are_refused_with_the_field_named(segments: list[str], kind: str, reason: str) -> None:
    good = ORDER
    orders, refusals = hl7orders.read_orders(good + message(*segments, kind=kind))
    assert [order.accession_number for order in orders] == ["ACC001"]  # the good one still goes in
    (refusal,) = refusals
    assert refusal.message == 2
    assert str(refusal).startswith("message 2: ")
    assert reason in str(refusal)


def test_garbage_is_refused_as_a_whole() -> None:
    orders, refusals = hl7orders.read_orders("this is not HL7\nat all\n")
    assert orders == []
    assert [str(refusal) for refusal in refusals] == [
        "before the first message: no HL7 message found: a message starts with an MSH segment"
    ]


def test_a_cancel_needs_only_the_order_it_names() -> None:
    (order,), refusals = hl7orders.read_orders(
        message(
            "PID|1||PAT001||Doe^John", "ORC|CA|PLC1|FIL1", "OBR|1|PLC1|FIL1||||||||||||||||ACC001|RP01|SPS01"
        )
    )
    assert refusals == []
    assert order.cancels


def test_entries_are_named_by_a_hash_and_replaced_then_cancelled(tmp_path) -> None:
    (order,), _ = hl7orders.read_orders(ORDER)
    assert worklist.apply(tmp_path, order) is worklist.Change.SCHEDULED
    (path,) = tmp_path.iterdir()
    assert path.name == worklist.entry_name(order) and "ACC001" not in path.name
    entry = pydicom.dcmread(path)
    assert entry.file_meta.MediaStorageSOPClassUID == worklist.WORKLIST_SOP_CLASS
    assert entry.PatientName == "Παπαδόπουλος^Γιώργος^Κ"
    step = entry.ScheduledProcedureStepSequence[0]
    assert (step.Modality, step.ScheduledStationAETitle, step.ScheduledProcedureStepStartDate) == (
        "CT",
        "CT01",
        "20240315",
    )
    first_uid = entry.StudyInstanceUID

    (changed,), _ = hl7orders.read_orders(
        ORDER.replace("ORC|NW", "ORC|XO").replace("CT Head", "CT Head and Neck")
    )
    assert worklist.apply(tmp_path, changed) is worklist.Change.REPLACED
    (again,) = worklist.list_entries(tmp_path)
    assert again.procedure == "CT Head and Neck"
    assert pydicom.dcmread(path).StudyInstanceUID == first_uid  # the same order keeps its study

    (cancel,), _ = hl7orders.read_orders(ORDER.replace("ORC|NW", "ORC|CA"))
    assert worklist.apply(tmp_path, cancel) is worklist.Change.CANCELLED
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(worklist.NothingToCancel, match="accession number ACC001"):
        worklist.apply(tmp_path, cancel)


def test_an_unknown_entry_id_deletes_nothing(tmp_path) -> None:
    (order,), _ = hl7orders.read_orders(ORDER)
    worklist.apply(tmp_path, order)
    assert worklist.delete_entry(tmp_path, "../" + worklist.entry_name(order)[:-3]) is None
    assert worklist.delete_entry(tmp_path, "*") is None
    assert len(worklist.list_entries(tmp_path)) == 1
    deleted = worklist.delete_entry(tmp_path, worklist.entry_name(order)[:-3])
    assert deleted is not None and deleted.accession_number == "ACC001"
    assert worklist.list_entries(tmp_path) == []
