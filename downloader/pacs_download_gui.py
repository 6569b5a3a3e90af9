#!/usr/bin/env python3
"""pacs-downloader: the PACS web portal's downloader in a window, for those who never open a terminal.

    pacs-downloader [ADDRESS]            (or: python3 -m pacs_download_gui [ADDRESS])

The same code as the command line underneath (``pacs_download``): the address is what the portal's
"Downloader" action shows, a patient's study link, or any patient, study or series page; the study
is fetched series by series with a progress bar, a dropped connection is retried from the series it
broke in, running it again later carries on where it stopped, the zip is checked, and a viewer can
open it. The window asks what the terminal would ask: the username and password when the portal
wants a sign-in, the patient's date of birth when a study link asks for it.

The window is Tk (Python's standard ``tkinter``): on Windows and macOS it comes with Python; on
Debian and Ubuntu it is the ``python3-tk`` package. The download runs in a thread of its own and
tells the window how far it got through a queue, which the window reads ten times a second (Tk may
only be touched from its own thread).
"""

from __future__ import annotations

import argparse
import io
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

try:
    import tkinter as tk
    from tkinter import filedialog, ttk
except ImportError:  # Debian and Ubuntu ship Tk for Python separately
    tk = None  # type: ignore[assignment]

import pacs_download as core

TITLE = "PACS downloader"
POLL_MS = 100


class Stopped(Exception):
    """The user pressed Stop: the download ends where it is, to be resumed later."""


class WindowProgress(core.Progress):
    """The downloader's progress, sent to the window instead of written to a terminal."""

    def __init__(self, total: int, series_count: int, events: queue.Queue, stop: threading.Event) -> None:
        super().__init__(total, series_count, stream=io.StringIO())
        self.events = events
        self.stop = stop

    def show(self, current: int = 0, force: bool = False) -> None:
        # Called for every chunk that arrives: the one place where a download can be stopped.
        if self.stop.is_set():
            raise Stopped
        now = time.monotonic()
        if not force and now - self.shown_at < 0.1:
            return
        self.shown_at = now
        rate = self.received / max(now - self.started, 1e-6)
        done = min(self.done + current, self.total)
        left = (self.total - done) / rate if rate > 0 else 0
        self.events.put(("progress", done, self.total, rate, left, self.series_number, self.series_count))

    def say(self, text: str) -> None:
        self.events.put(("say", text))


def default_folder() -> Path:
    downloads = Path.home() / "Downloads"
    return downloads if downloads.is_dir() else Path.home()


def open_with_system(path: Path) -> None:
    """Open a file with the program the computer uses for it."""
    if sys.platform == "win32":
        os.startfile(path)  # type: ignore[attr-defined]  # noqa: S606 - the user's own file
    else:
        subprocess.Popen(["open" if sys.platform == "darwin" else "xdg-open", str(path)])


class DownloaderWindow:
    """The window: the address, what the portal may ask, where to save, the progress, a log."""

    def __init__(self, root: tk.Tk, address: str = "", username: str = "") -> None:
        self.root = root
        self.events: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.worker: threading.Thread | None = None
        self.saved: Path | None = None
        root.title(TITLE)
        root.minsize(560, 420)
        frame = ttk.Frame(root, padding=12)
        frame.grid(sticky="nsew")
        root.columnconfigure(0, weight=1)
        root.rowconfigure(0, weight=1)
        frame.columnconfigure(1, weight=1)

        self.address = self._entry(
            frame, 0, "Address (from the portal's Downloader page, or a study link)", address
        )
        self.username = self._entry(frame, 1, "Username (when the portal asks you to sign in)", username)
        self.password = self._entry(frame, 2, "Password", "", show="•")
        self.birth_label, self.birth_date = self._row(frame, 3, "Patient's date of birth (YYYY-MM-DD)")
        self.birth_label.grid_remove()
        self.birth_date.grid_remove()
        self.folder = self._entry(frame, 4, "Save in folder", str(default_folder()))
        ttk.Button(frame, text="Choose…", command=self._choose_folder).grid(row=4, column=2, padx=(6, 0))
        self.viewer = self._entry(frame, 5, "Viewer program to open it with (optional)", "")
        ttk.Button(frame, text="Choose…", command=self._choose_viewer).grid(row=5, column=2, padx=(6, 0))

        buttons = ttk.Frame(frame)
        buttons.grid(row=6, column=0, columnspan=3, sticky="w", pady=(10, 6))
        self.download_button = ttk.Button(buttons, text="Download", command=self.start)
        self.download_button.grid(row=0, column=0)
        self.stop_button = ttk.Button(buttons, text="Stop", command=self.stop.set, state="disabled")
        self.stop_button.grid(row=0, column=1, padx=6)
        self.open_button = ttk.Button(buttons, text="Open", command=self.open_saved, state="disabled")
        self.open_button.grid(row=0, column=2)

        # How much of the download is here, from 0 to 1: the progress bar shows this value.
        self.done = tk.DoubleVar(root, value=0)
        self.progress = ttk.Progressbar(frame, mode="determinate", maximum=1, variable=self.done)
        self.progress.grid(row=7, column=0, columnspan=3, sticky="ew")
        self.status = ttk.Label(frame, text="Paste the address, then press Download.")
        self.status.grid(row=8, column=0, columnspan=3, sticky="w", pady=(4, 6))
        self.log = tk.Text(frame, height=8, width=70, state="disabled", wrap="word")
        self.log.grid(row=9, column=0, columnspan=3, sticky="nsew")
        frame.rowconfigure(9, weight=1)
        root.after(POLL_MS, self._poll)

    @staticmethod
    def _row(frame: ttk.Frame, row: int, label: str, show: str = "") -> tuple[ttk.Label, ttk.Entry]:
        text = ttk.Label(frame, text=label)
        text.grid(row=row, column=0, sticky="w", padx=(0, 8), pady=2)
        entry = ttk.Entry(frame, show=show, width=50)
        entry.grid(row=row, column=1, sticky="ew", pady=2)
        return text, entry

    def _entry(self, frame: ttk.Frame, row: int, label: str, value: str, show: str = "") -> ttk.Entry:
        _text, entry = self._row(frame, row, label, show)
        entry.insert(0, value)
        return entry

    def _choose_folder(self) -> None:
        chosen = filedialog.askdirectory(initialdir=self.folder.get() or str(default_folder()))
        if chosen:
            self.folder.delete(0, "end")
            self.folder.insert(0, chosen)

    def _choose_viewer(self) -> None:
        chosen = filedialog.askopenfilename(title="The DICOM viewer program")
        if chosen:
            self.viewer.delete(0, "end")
            self.viewer.insert(0, shlex.quote(chosen) + " {}")

    def say(self, text: str) -> None:
        self.log.configure(state="normal")
        self.log.insert("end", text + "\n")
        self.log.see("end")
        self.log.configure(state="disabled")

    def start(self) -> None:
        """Download in a thread of its own; the window stays responsive and shows how far it got."""
        if self.worker and self.worker.is_alive():
            return
        address = self.address.get().strip()
        if not address:
            self.status.configure(text="Paste the address from the portal's Downloader page first.")
            return
        self.stop.clear()
        self.saved = None
        self.download_button.configure(state="disabled")
        self.stop_button.configure(state="normal")
        self.open_button.configure(state="disabled")
        self.done.set(0)
        self.status.configure(text="Asking the portal…")
        answers = {
            "address": address,
            "username": self.username.get().strip(),
            "password": self.password.get(),
            "birth_date": self.birth_date.get().strip(),
            "folder": Path(self.folder.get().strip() or default_folder()).expanduser(),
        }
        self.worker = threading.Thread(target=self._download, args=(answers,), daemon=True)
        self.worker.start()

    def _download(self, answers: dict[str, Any]) -> None:
        """The download (in the worker thread): what ``pacs_download.main`` does, told to the window."""
        put = self.events.put
        portal = core.Portal()
        try:
            manifest = self._manifest(portal, answers)
            if manifest is None:
                return
            output = answers["folder"] / manifest["file_name"]
            put(
                (
                    "say",
                    f"{manifest['title']}: {len(manifest['series'])} series, "
                    f"{manifest['expected_instances']} files, about {core._size(manifest['expected_size'])}",
                )
            )
            progress = WindowProgress(
                manifest["expected_size"], len(manifest["series"]), self.events, self.stop
            )
            core.download(portal, manifest, output, retries=5, retry_wait=2, progress=progress)
        except Stopped:
            put(("stopped",))
        except core.DownloadError as error:
            put(("failed", str(error)))
        except (core.SignInNeeded, core.IdentityNeeded):
            put(("failed", "the portal asked for a sign-in again; press Download to carry on."))
        except core.NETWORK_ERRORS as error:
            put(("failed", f"{error}. Press Download again to carry on where it stopped."))
        else:
            put(("done", output, manifest["expected_instances"]))

    def _manifest(self, portal: core.Portal, answers: dict[str, Any]) -> dict[str, Any] | None:
        address = answers["address"]
        try:
            return core.find_manifest(portal, address)
        except core.SignInNeeded:
            if not (answers["username"] and answers["password"]):
                self.events.put(
                    ("failed", "The portal asks you to sign in: enter your username and password.")
                )
                return None
            portal.sign_in(address, answers["username"], answers["password"])
        except core.IdentityNeeded as question:
            if not answers["birth_date"]:
                self.events.put(("ask birth date", str(question)))
                return None
            portal.confirm_identity(address, answers["birth_date"], question.csrf_token)
        try:
            return core.find_manifest(portal, address)
        except core.SignInNeeded:
            self.events.put(("failed", "The portal still asks for a sign-in."))
        except core.IdentityNeeded as question:
            self.events.put(("ask birth date", str(question)))
        return None

    def _poll(self) -> None:
        """Show what the download thread reported since the last look."""
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            self._show(*event)
        self.root.after(POLL_MS, self._poll)

    def _show(self, kind: str, *details: Any) -> None:
        if kind == "progress":
            done, total, rate, left, series, count = details
            self.done.set(done / total)
            self.status.configure(
                text=f"{done / total:.0%} · {core._size(done)} of {core._size(total)} · "
                f"{core._size(rate)}/s · {core._duration(left)} left · series {series} of {count}"
            )
            return
        if kind == "say":
            self.say(details[0])
            return
        self.download_button.configure(state="normal")
        self.stop_button.configure(state="disabled")
        if kind == "done":
            self.saved, files = details
            self.done.set(1)
            self.status.configure(text=f"Saved {self.saved} ({files} files, checked).")
            self.say(f"Saved {self.saved} ({files} files, checked)")
            self.open_button.configure(state="normal")
            if self.viewer.get().strip():
                self.open_saved()
        elif kind == "stopped":
            self.status.configure(text="Stopped. Press Download again to carry on where it stopped.")
        elif kind == "ask birth date":
            self.birth_label.grid()
            self.birth_date.grid()
            self.birth_date.focus_set()
            self.status.configure(text=f"{details[0]} Enter the date of birth, then press Download again.")
        else:
            self.status.configure(text=f"Not downloaded: {details[0]}")
            self.say(f"Not downloaded: {details[0]}")

    def open_saved(self) -> None:
        """Open the saved zip with the chosen viewer, or with what the computer opens zips with."""
        if self.saved is None:
            return
        command = self.viewer.get().strip()
        run: Callable[[], Any] = (
            (lambda: core.open_viewer(command, self.saved))
            if command
            else (lambda: open_with_system(self.saved))
        )
        threading.Thread(target=run, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pacs-downloader", description=f"{TITLE}: {core.__doc__.splitlines()[0]}"
    )
    parser.add_argument(
        "address", nargs="?", default="", help="the address the portal's Downloader page shows"
    )
    parser.add_argument("-u", "--user", default="", help="username, when the portal asks for a sign-in")
    parser.add_argument("--version", action="version", version=f"%(prog)s {core.__version__}")
    arguments = parser.parse_args(argv)
    if tk is None:
        print(
            "pacs-downloader: this Python has no Tk for windows (on Debian or Ubuntu: sudo apt install "
            "python3-tk); pacs-download does the same in a terminal.",
            file=sys.stderr,
        )
        return 1
    try:
        root = tk.Tk()
    except tk.TclError as error:
        print(f"pacs-downloader: no window can be opened here ({error})", file=sys.stderr)
        return 1
    DownloaderWindow(root, arguments.address, arguments.user)
    root.mainloop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
