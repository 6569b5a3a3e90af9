"""The zip layer alone (``control.query.zips``), fed from memory instead of the archive: the length
it announces against the bytes it makes, Zip64, and a member that is not what was planned.

These need files of several gigabytes to reach Zip64 for real; with the limit lowered for the test,
the same code paths run on a few kilobytes (the stack's tests cover the rest with a real archive).
"""

from __future__ import annotations

import datetime as dt
import io
import os
import zipfile

import pytest

from control.query import zips

pytestmark = pytest.mark.inprocess


class Files:
    """Stands in for the Orthanc client: the stored files, by instance id."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def instance_file(self, instance_id: str) -> bytes:
        return self.files[instance_id]

    def stream_instance_file(self, instance_id: str):
        data = self.files[instance_id]
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]


def plan_of(files: dict[str, bytes], names: list[str]) -> zips.ZipPlan:
    members = tuple(
        zips.Member(name, instance_id, f"uuid-{instance_id}", len(data))
        for name, (instance_id, data) in zip(names, files.items(), strict=True)
    )
    return zips.ZipPlan(members, dt.datetime(2024, 1, 31, 10, 20, 30, tzinfo=dt.UTC))


@pytest.mark.parametrize("zip64_from", [zips.ZIP32_MOST, 10_000])
def test_the_announced_length_is_the_length_made(monkeypatch: pytest.MonkeyPatch, zip64_from: int) -> None:
    monkeypatch.setattr(zips, "ZIP32_MOST", zip64_from)
    files = {f"i{n}": os.urandom(size) for n, size in enumerate((0, 1, 5000, 7000, 123))}
    names = ["Müller/a/0001.dcm", "b/0002.dcm", "山田/c/0003.dcm", "d/0004.dcm", "e/0005.dcm"]
    plan = plan_of(files, names)
    assert plan.zip64 is (zip64_from != 0xFFFFFFFF)
    made = b"".join(zips.zip_bytes(Files(files), plan))
    assert len(made) == plan.length
    with zipfile.ZipFile(io.BytesIO(made)) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == names
        assert [archive.read(name) for name in names] == list(files.values())
        assert {info.date_time for info in archive.infolist()} == {(2024, 1, 31, 10, 20, 30)}


def test_large_files_are_read_twice_not_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zips, "WHOLE_FILE_LIMIT", 2000)
    files = {"big": os.urandom(9000), "small": os.urandom(100)}
    plan = plan_of(files, ["big.dcm", "small.dcm"])
    made = b"".join(zips.zip_bytes(Files(files), plan))
    assert len(made) == plan.length
    with zipfile.ZipFile(io.BytesIO(made)) as archive:
        assert archive.read("big.dcm") == files["big"]


def test_any_range_is_that_part_of_the_whole() -> None:
    files = {f"i{n}": os.urandom(3000) for n in range(4)}
    plan = plan_of(files, [f"{n}.dcm" for n in range(4)])
    whole = b"".join(zips.zip_bytes(Files(files), plan))
    for start, stop in ((0, 1), (29, 3100), (5000, len(whole)), (len(whole) - 22, len(whole))):
        assert b"".join(zips.zip_bytes(Files(files), plan, start, stop)) == whole[start:stop]


def test_a_file_that_changed_breaks_the_zip_off() -> None:
    files = {"a": os.urandom(3000), "b": os.urandom(3000)}
    plan = plan_of(files, ["a.dcm", "b.dcm"])
    files["b"] = files["b"][:-1]
    made = bytearray()
    with pytest.raises(zips.ZipBroken):
        for chunk in zips.zip_bytes(Files(files), plan):
            made += chunk
    assert len(made) < (plan.length or 0)


def test_the_etag_follows_the_stored_files() -> None:
    files = {"a": b"x" * 10}
    plan = plan_of(files, ["a.dcm"])
    stored_again = zips.ZipPlan((zips.Member("a.dcm", "a", "another-uuid", 10),), plan.modified_at)
    assert plan.etag == plan_of(files, ["a.dcm"]).etag
    assert plan.etag != stored_again.etag
