"""The downloader's window (downloader/pacs_download_gui.py) on a real X display (Xvfb) against the
real stack: it downloads a study with its progress bar moving, carries on after a cut connection
without fetching the finished series again, says what the portal asks for, and installs with the
one command the portal's downloader page shows. A screenshot of the window goes into the test
output."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import ImageGrab
from test_downloader import CuttingRelay, Study, check_zip, stored_for_download

from browser import TEST_OUTPUT, chromium, sign_in
from conftest import ADMIN_PASSWORD, REPOSITORY, Stack
from samples import make_study

pytestmark = pytest.mark.stack

sys.path.insert(0, str(REPOSITORY / "downloader"))
import pacs_download_gui  # noqa: E402

tkinter = pytest.importorskip("tkinter")

# A guard against a window that never finishes, not a measure: the study takes seconds.
HANG = 180


@pytest.fixture(scope="module")
def study(stack: Stack) -> Study:
    """Three series of noise (which no zip shrinks), some 2 MB each: a download that takes a while."""
    return stored_for_download(
        stack, make_study("Window^Wendy", series=(("CT", 16), ("MR", 16), ("CT", 16)), size=256, noise=True)
    )


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    """A virtual X display of our own (Xvfb picks a free number and tells it)."""
    read_end, write_end = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_end), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    with os.fdopen(read_end) as told:
        number = told.readline().strip()
    assert number, "Xvfb did not start"
    yield f":{number}"
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def window(
    display: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[pacs_download_gui.DownloaderWindow]:
    monkeypatch.setenv("DISPLAY", display)
    root = tkinter.Tk()
    made = pacs_download_gui.DownloaderWindow(root)
    made.folder.delete(0, "end")
    made.folder.insert(0, str(tmp_path))
    root.update()
    yield made
    root.destroy()


def type_into(entry, text: str) -> None:
    entry.delete(0, "end")
    entry.insert(0, text)


def press_download(window: pacs_download_gui.DownloaderWindow) -> list[float]:
    """Press Download and keep the window running until it is done; return every value its
    progress bar showed, in order."""
    root = window.root
    values: list[float] = []
    window.done.trace_add("write", lambda *_: values.append(window.done.get()))
    window.download_button.invoke()
    deadline = time.monotonic() + HANG
    while str(window.download_button.cget("state")) == "disabled":
        assert time.monotonic() < deadline, "the window never finished"
        root.update()
        time.sleep(0.01)
    root.update()
    return values


def log_of(window: pacs_download_gui.DownloaderWindow) -> str:
    return window.log.get("1.0", "end")


def test_the_window_downloads_a_study_and_carries_on_after_a_cut(
    stack: Stack, study: Study, window: pacs_download_gui.DownloaderWindow, display: str, tmp_path: Path
) -> None:
    # Some 3 MB/s, a hospital's remote link: the bar has seconds to move.
    relay = CuttingRelay(stack.web_port, cut={2}, rate=3_000_000)
    try:
        # The address the downloader page tells the user to paste: the page's own.
        type_into(window.address, relay.url(f"{stack.url}/query/studies/{study.orthanc_id}/downloader"))
        type_into(window.username, "admin")
        type_into(window.password, ADMIN_PASSWORD)
        seen = press_download(window)
    finally:
        relay.close()
    status = window.status.cget("text")
    assert status.startswith("Saved ") and status.endswith("(48 files, checked)."), log_of(window)
    assert seen == sorted(seen), seen
    assert len({value for value in seen if 0 < value < 1}) >= 6, f"the bar did not move: {seen}"
    assert seen[-1] == 1
    assert "connection lost" in log_of(window)
    assert [relay.fetched(f"/query/series/{series}/archive") for series in study.series_ids] == [1, 2, 1]
    (saved,) = tmp_path.glob("*.zip")
    check_zip(saved, study.facts)
    assert str(window.open_button.cget("state")) == "normal"
    shot = TEST_OUTPUT / "screenshots" / "downloader-window.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    ImageGrab.grab(xdisplay=display).save(shot)


def test_the_window_says_what_the_portal_asks_for(
    stack: Stack, study: Study, window: pacs_download_gui.DownloaderWindow, tmp_path: Path
) -> None:
    type_into(window.address, f"{stack.url}/query/studies/{study.orthanc_id}/downloader")
    press_download(window)
    assert window.status.cget("text") == (
        "Not downloaded: The portal asks you to sign in: enter your username and password."
    )
    type_into(window.username, "admin")
    type_into(window.password, "not the password")
    press_download(window)
    assert (
        window.status.cget("text") == "Not downloaded: the portal did not accept that username and password"
    )
    assert not list(tmp_path.glob("*.zip"))


def test_the_one_command_on_the_downloader_page_installs_the_window(
    stack: Stack, study: Study, display: str, tmp_path: Path
) -> None:
    with chromium() as browser:
        page = browser.new_page()
        sign_in(page, stack, "admin", ADMIN_PASSWORD)
        page.goto(f"{stack.url}/query/studies/{study.orthanc_id}/downloader")
        install = shlex.split(page.inner_text("pre.command.install"))
        start = shlex.split(page.inner_text("pre.command.start"))
    assert install[:5] == ["python3", "-m", "pip", "install", "--upgrade"]
    assert start == ["pacs-downloader", f"{stack.url}/query/studies/{study.orthanc_id}/downloader"]
    # A computer's own Python, here a new virtual environment of it, with nothing installed.
    home = tmp_path / "python"
    venv.create(home, with_pip=True, system_site_packages=False)
    python = str(home / "bin" / "python")
    installed = subprocess.run(
        [python, *install[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    for command, name in (("pacs-downloader", "pacs-downloader"), ("pacs-download", "pacs-download")):
        version = subprocess.run([str(home / "bin" / command), "--version"], capture_output=True, text=True)
        assert version.stdout.strip() == f"{name} {pacs_download_gui.core.__version__}", version.stderr
    # The installed window opens on the display with the address it was given.
    opened = subprocess.run(
        [
            python,
            "-c",
            "import sys, tkinter, pacs_download_gui as gui; root = tkinter.Tk(); "
            "window = gui.DownloaderWindow(root, sys.argv[1]); root.update(); print(window.address.get())",
            start[1],
        ],
        env={**os.environ, "DISPLAY": display},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout.strip() == start[1]
