"""The viewer's frames, answered by the control plane from Orthanc's core (control.dicomweb.frames).

The promise: whatever a viewer asks, the answer is the one Orthanc's DICOMweb plugin gives, only
cheaper. So every sample file pydicom ships with pixel data, in every transfer syntax it comes in,
is stored as a study of its own, and each frame is asked for through the portal and from the
plugin directly, with the Accept headers viewers send: same status, same pixels, same labels.
"""

from __future__ import annotations

import re

import pytest
import requests
import sqlalchemy as sa
from pydicom.uid import generate_uid

from control import db
from control.activity import Action
from control.archive_version import ArchiveVersions
from control.dicomweb.frames import SERVED, FrameRequest, FrameSource, answered_syntax
from control.orthanc import Orthanc
from control.site import Site

from conftest import ADMIN_PASSWORD, Stack, wait_until
from samples import read_samples, send

OCTETS = 'multipart/related; type="application/octet-stream"'
ANY = f"{OCTETS}; transfer-syntax=*"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
FRAME = "/dicom-web/studies/1.2.3/series/1.2.4/instances/1.2.5/frames/1"


# ---- pure logic ------------------------------------------------------------------------------


@pytest.mark.inprocess
@pytest.mark.parametrize(
    ("accept", "stored", "named"),
    [
        (ANY, EXPLICIT_LE, EXPLICIT_LE),
        (ANY, JPEG_BASELINE, JPEG_BASELINE),
        # OHIF writes the type without quotes.
        ("multipart/related; type=application/octet-stream; transfer-syntax=*", JPEG_BASELINE, JPEG_BASELINE),
        # Compressed frames by name come with their own media type (image/jpeg): the plugin's.
        (f"{OCTETS}; transfer-syntax={JPEG_BASELINE}", JPEG_BASELINE, None),
        # No syntax asked: explicit little endian, the same bytes as any native pixels.
        (OCTETS, IMPLICIT_LE, EXPLICIT_LE),
        (OCTETS, JPEG_BASELINE, None),
        (f"{OCTETS}; transfer-syntax={EXPLICIT_LE}", IMPLICIT_LE, EXPLICIT_LE),
        (f"{OCTETS}; transfer-syntax={IMPLICIT_LE}", IMPLICIT_LE, IMPLICIT_LE),
        # Another syntax than the stored one needs transcoding: the plugin's work.
        (f"{OCTETS}; transfer-syntax={JPEG_BASELINE}", EXPLICIT_LE, None),
        (f"{OCTETS}; transfer-syntax={EXPLICIT_LE}", JPEG_BASELINE, None),
        ('multipart/related; type="image/jpeg"', JPEG_BASELINE, None),
        ("*/*", JPEG_BASELINE, None),  # the default syntax: the plugin transcodes
        ("*/*", IMPLICIT_LE, EXPLICIT_LE),
        (f"application/json, {ANY}", EXPLICIT_LE, EXPLICIT_LE),
        (f"{ANY}; q=0", EXPLICIT_LE, None),
        ("application/octet-stream", EXPLICIT_LE, None),
        ("", EXPLICIT_LE, None),
    ],
)
def test_the_core_answers_only_what_it_answers_as_the_plugin(accept: str, stored: str, named) -> None:
    assert answered_syntax(accept, stored) == named
    assert answered_syntax(accept, stored, native_named_as_stored=True) == named


@pytest.mark.inprocess
@pytest.mark.parametrize(
    ("named_as_stored", "named"),
    [(True, IMPLICIT_LE), (False, EXPLICIT_LE)],
    ids=["DICOMweb 1.7", "DICOMweb 1.20"],
)
def test_native_frames_of_any_syntax_are_named_as_the_plugin_names_them(named_as_stored, named) -> None:
    assert answered_syntax(ANY, IMPLICIT_LE, native_named_as_stored=named_as_stored) == named


@pytest.mark.inprocess
@pytest.mark.parametrize(
    ("uri", "frame"),
    [
        (FRAME, 1),
        (FRAME.replace("/frames/1", "/frames/12"), 12),
        (FRAME.replace("/frames/1", "/frames/1,2"), None),  # lists: the plugin
        (FRAME.replace("/frames/1", "/frames/0"), None),  # frames count from 1
        (FRAME + "?x=1", None),
        (FRAME + "/rendered", None),
        (FRAME.replace("1.2.4", "1.2%2E4"), None),
        (FRAME.replace("/series/", "//series/"), None),
    ],
)
def test_a_frame_request_names_one_frame_in_canonical_form(uri: str, frame: int | None) -> None:
    wanted = FrameRequest.of(uri)
    assert (wanted.frame if wanted else None) == frame
    if wanted:
        assert wanted.path == uri


# ---- on the real stack -----------------------------------------------------------------------


def parts(response: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart answer: each part's headers and content."""
    boundary = re.search(r'boundary="?([^";]+)"?', response.headers["Content-Type"]).group(1).encode()
    found = []
    for piece in response.content.split(b"--" + boundary)[1:]:
        if piece.startswith(b"--"):
            break
        head, _, content = piece.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        found.append((headers, content.removesuffix(b"\r\n")))
    return found


def without_boundary(content_type: str) -> str:
    return re.sub(r";\s*boundary=[^;]+", "", content_type)


@pytest.fixture(scope="module")
def pictures(stack: Stack) -> list[tuple[str, str, str]]:
    """Every sample with pixel data as a study of its own (fresh UIDs, the file's own transfer
    syntax): (file name, stored syntax, the frame's path)."""
    copies = []
    for name, dataset in read_samples():
        if dataset is None or "PixelData" not in dataset or "SOPClassUID" not in dataset:
            continue
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        copies.append((name, dataset))
    stored = []
    for sent in send(stack, copies):
        if sent.stored:
            dataset = sent.dataset
            path = (
                f"/dicom-web/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}"
                f"/instances/{dataset.SOPInstanceUID}/frames/1"
            )
            stored.append((sent.name, str(dataset.file_meta.TransferSyntaxUID), path))
    assert len(stored) > 40, "too few samples stored to say much"
    return stored


@pytest.fixture(scope="module")
def doctor(stack: Stack) -> requests.Session:
    return stack.sign_in("admin", ADMIN_PASSWORD)


def from_plugin(stack: Stack, path: str, accept: str) -> requests.Response:
    return requests.get(
        f"{stack.orthanc_url}{path}",
        headers={"Accept": accept, "Forwarded": f"host={stack.url.split('://', 1)[1]};proto=http"},
        auth=stack.orthanc_auth,
    )


def assert_same_answer(portal: requests.Response, plugin: requests.Response, what: str) -> None:
    assert portal.status_code == plugin.status_code, what
    if plugin.status_code != 200:
        return
    assert without_boundary(portal.headers["Content-Type"]) == without_boundary(
        plugin.headers["Content-Type"]
    )
    ours, theirs = parts(portal), parts(plugin)
    assert [headers for headers, _ in ours] == [headers for headers, _ in theirs], what
    assert [content for _, content in ours] == [content for _, content in theirs], what


@pytest.mark.stack
def test_every_frame_is_the_plugins_frame(stack: Stack, doctor: requests.Session, pictures) -> None:
    for name, syntax, path in pictures:
        portal = doctor.get(f"{stack.url}{path}", headers={"Accept": ANY})
        plugin = from_plugin(stack, path, ANY)
        assert_same_answer(portal, plugin, f"{name} ({syntax})")
        if portal.status_code == 200:
            (headers, _content), *_ = parts(portal)
            assert headers["Content-Location"] == f"{stack.url}{path}"  # back through the portal


@pytest.mark.stack
def test_the_common_syntaxes_come_from_the_core(stack: Stack, pictures) -> None:
    """The cheap way is taken for every syntax it is meant for: native pixels, JPEG, JPEG-LS and
    JPEG 2000."""
    orthanc = Orthanc(stack.orthanc_url, *stack.orthanc_auth)
    source = FrameSource(orthanc, ArchiveVersions(orthanc))
    taken = set()
    for name, syntax, path in pictures:
        if syntax in SERVED and from_plugin(stack, path, ANY).status_code == 200:
            frame = source.from_core(FrameRequest.of(path), ANY)
            assert frame is not None, name
            frame[1].close()
            taken.add(syntax)
    assert taken == SERVED  # and each of them is checked against the plugin above


@pytest.mark.stack
@pytest.mark.parametrize(
    "accept",
    [
        'multipart/related; type="application/octet-stream"',
        f"{OCTETS}; transfer-syntax={EXPLICIT_LE}",
        f"{OCTETS}; transfer-syntax={IMPLICIT_LE}",
        f"{OCTETS}; transfer-syntax={JPEG_BASELINE}",
        "multipart/related; type=application/octet-stream; transfer-syntax=*",
        "*/*",
        "application/octet-stream",
    ],
)
def test_every_way_of_asking_gets_the_plugins_answer(
    stack: Stack, doctor: requests.Session, pictures, accept: str
) -> None:
    for name in ("CT_small.dcm", "MR_small_implicit.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm"):
        ((_name, syntax, path),) = [picture for picture in pictures if picture[0] == name]
        portal = doctor.get(f"{stack.url}{path}", headers={"Accept": accept})
        assert_same_answer(portal, from_plugin(stack, path, accept), f"{name} ({syntax}), {accept}")


@pytest.mark.stack
def test_a_frame_past_the_last_is_the_plugins_refusal(
    stack: Stack, doctor: requests.Session, pictures
) -> None:
    ((_name, _syntax, path),) = [picture for picture in pictures if picture[0] == "CT_small.dcm"]
    past = path.removesuffix("/frames/1") + "/frames/2"
    portal = doctor.get(f"{stack.url}{past}", headers={"Accept": ANY})
    assert portal.status_code == from_plugin(stack, past, ANY).status_code != 200
    unknown = path.replace("/instances/", "/instances/9").removesuffix("/frames/1") + "/frames/1"
    assert doctor.get(f"{stack.url}{unknown}", headers={"Accept": ANY}).status_code == 404


@pytest.mark.stack
def test_frames_are_refused_without_a_right_to_them(stack: Stack, pictures) -> None:
    ((_name, _syntax, path),) = [picture for picture in pictures if picture[0] == "CT_small.dcm"]
    engine = Site(stack.data).engine
    # The log keeps the first 200 characters of a refused path.
    refusals = sa.select(sa.func.count()).where(
        db.activity.c.action == Action.DICOMWEB_DENIED, db.activity.c.detail.contains(path[:200])
    )
    with engine.connect() as connection:
        before = connection.execute(refusals).scalar_one()
    assert requests.get(f"{stack.url}{path}", headers={"Accept": ANY}).status_code == 401
    forged = requests.get(
        f"{stack.url}{path}", headers={"Accept": ANY}, cookies={"pacs_grant": "forged.value"}
    )
    assert forged.status_code == 401
    assert "Sign-in needed" in forged.text
    with engine.connect() as connection:
        assert connection.execute(refusals).scalar_one() == before + 2


@pytest.mark.stack
def test_a_frame_while_the_archive_is_down_is_a_clear_503(
    stack: Stack, doctor: requests.Session, pictures
) -> None:
    ((_name, _syntax, path),) = [picture for picture in pictures if picture[0] == "MR_small.dcm"]
    stack.kill_archive()
    answer = doctor.get(f"{stack.url}{path}", headers={"Accept": ANY})
    assert answer.status_code == 503
    assert answer.json()["error"] == "The archive is not reachable"
    stack.wait_for_archive()
    assert doctor.get(f"{stack.url}{path}", headers={"Accept": ANY}).status_code == 200


@pytest.mark.stack
def test_the_access_log_keeps_refused_frames_not_every_frame_shown(
    stack: Stack, doctor: requests.Session, pictures
) -> None:
    ((_name, _syntax, path),) = [picture for picture in pictures if picture[0] == "SC_rgb_jpeg_gdcm.dcm"]
    log = stack.data / "logs" / "access.log"

    def statuses() -> list[str]:
        lines = [line for line in log.read_text().splitlines() if path in line]
        return [line.split('" ')[1].split()[0] for line in lines]

    before = statuses()
    assert doctor.get(f"{stack.url}{path}", headers={"Accept": ANY}).status_code == 200
    assert requests.get(f"{stack.url}{path}", headers={"Accept": ANY}).status_code == 401
    # The access log reaches its file through a pipe and the runner (control.runtime.logs), so a line comes
    # a little after its answer. gunicorn writes a request's line as its answer ends: a line for
    # the frame, were there one, is in the pipe before the refused request has even been sent.
    wait_until(lambda: len(statuses()) > len(before), "the refused frame's line in the access log")
    assert statuses() == [*before, "401"]
