#!/usr/bin/env python3
"""pacs-download: save a patient, study or series from the PACS web portal as one zip file.

    python3 pacs_download.py --user alice https://pacs.example.org/query/studies/<id>/manifest
    python3 pacs_download.py --open "myviewer {}" <a study's link>

The address is a patient's study link (no account needed), what the portal's "Downloader" action
shows, or the address of any patient, study or series page of the portal. When the portal asks for
a sign-in, the downloader signs in like a browser (username, then the password from
``PACS_PASSWORD`` or a prompt); when a study link asks for the patient's date of birth, it answers
as the link's page does (``--birth-date``, ``PACS_BIRTH_DATE`` or a prompt). A page that answers
JSON with a ``manifest`` address, or the manifest itself (``MANIFEST_FORMAT``: the series to
fetch, each with its zip address, file count and size), is all it needs from the portal.

How it resumes: the downloader fetches the series one by one, each into its own part file in
``<output>.parts/``. The portal's zips of stored files have a known length and answer byte ranges,
so a series whose connection drops is continued from the last byte received (``Range``, with
``If-Range`` so that a series that changed in the meantime is fetched again whole); zips the
portal makes whole before sending (transcoded ones) start again. A series that arrived whole
(its zip reads back, with as many files as the portal announced) is never fetched again: not
when the connection drops, nor when the command is run again after being stopped (the part file
and its ``ETag`` stay behind for that). When every series is there, the parts are joined into the
output zip, which is checked in turn (every file's CRC, and the number of files), and the parts
are removed. ``--open`` then runs a viewer on the result. A download that cannot be finished
says so, and that running the same command again resumes it.

Only Python's standard library is used, so this one file runs anywhere Python 3.9+ does.
"""

from __future__ import annotations

import argparse
import getpass
import http.client
import http.cookiejar
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

__version__ = "0.3.0"

MANIFEST_FORMAT = "pacs-download-manifest/1"
CHUNK = 256 * 1024
TIMEOUT = 60
USER_AGENT = f"pacs-download/{__version__}"
# What a dropped or stalled connection looks like from urllib (URLError and timeouts are OSErrors).
NETWORK_ERRORS = (http.client.HTTPException, OSError)


class DownloadError(Exception):
    """Something the user must hear about; the message says what."""


class DamagedZip(DownloadError):
    """A zip that does not read back whole: fetched again."""


class SignInNeeded(Exception):
    """The portal answered with its sign-in page."""


class IdentityNeeded(Exception):
    """A study link that asks for the patient's date of birth first; the message is the portal's."""

    def __init__(self, message: str, csrf_token: str) -> None:
        super().__init__(message)
        self.csrf_token = csrf_token


class Portal:
    """One portal, spoken to like a browser: cookies kept, sign-in through the form with its CSRF token."""

    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))
        self.opener.addheaders = [("User-Agent", USER_AGENT)]

    def open(
        self, url: str, data: bytes | None = None, accept: str = "*/*", headers: dict[str, str] | None = None
    ) -> http.client.HTTPResponse:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise DownloadError(f"{url} is not a web address")
        headers = {"Accept": accept, **(headers or {})}
        request = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310 - checked
        try:
            response = self.opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            if error.code == 401:
                raise SignInNeeded from None
            detail = error.read(2000).decode("utf-8", "replace")
            if error.code == 503:
                # The archive is down or restarting for a moment: worth trying again.
                raise ConnectionError(_json_message(detail) or "the portal is not available") from None
            question = _json_answer(detail)
            if error.code == 403 and question.get("error") == "identity check":
                message, csrf_token = question.get("message", ""), question.get("csrf_token", "")
                raise IdentityNeeded(str(message), str(csrf_token)) from None
            message = _json_message(detail) or f"{error.code} {error.reason}"
            raise DownloadError(f"the portal refused {url}: {message}") from None
        if urllib.parse.urlsplit(response.geturl()).path == "/login":
            response.close()
            raise SignInNeeded
        return response

    def get_json(self, url: str) -> Any:
        with self.open(url, accept="application/json") as response:
            try:
                return json.load(response)
            except ValueError:
                raise DownloadError(f"{url} is not an address the downloader understands") from None

    def sign_in(self, url: str, username: str, password: str) -> None:
        """Sign in through the portal's form, as a browser does."""
        login = urllib.parse.urljoin(url, "/login")
        with self.opener.open(login, timeout=self.timeout) as page:
            html = page.read().decode("utf-8", "replace")
        match = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', html) or re.search(
            r'value="([^"]+)"[^>]*name="csrf_token"', html
        )
        if not match:
            raise DownloadError(f"{login} is not the sign-in page of a PACS web portal")
        form = urllib.parse.urlencode(
            {"username": username, "password": password, "csrf_token": match.group(1), "next": "/"}
        ).encode()
        try:
            with self.opener.open(login, data=form, timeout=self.timeout) as answer:
                still_on_login = urllib.parse.urlsplit(answer.geturl()).path == "/login"
        except urllib.error.HTTPError as error:
            still_on_login = error.code in (400, 401, 429)
        if still_on_login:
            raise DownloadError("the portal did not accept that username and password")

    def confirm_identity(self, url: str, birth_date: str, csrf_token: str) -> None:
        """Answer a study link's question for the patient's date of birth, as its page's form does."""
        form = urllib.parse.urlencode({"birth_date": birth_date, "csrf_token": csrf_token}).encode()
        self.open(url, data=form, accept="application/json").close()


def _json_answer(text: str) -> dict[str, Any]:
    try:
        answer = json.loads(text)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _json_message(text: str) -> str:
    answer = _json_answer(text)
    return str(answer.get("message") or answer.get("error") or "")


def find_manifest(portal: Portal, url: str) -> dict[str, Any]:
    """The list of series to fetch, from the manifest itself or a page that links to it."""
    answer = portal.get_json(url)
    if isinstance(answer, dict) and answer.get("format") != MANIFEST_FORMAT and answer.get("manifest"):
        answer = portal.get_json(answer["manifest"])
    if not isinstance(answer, dict) or answer.get("format") != MANIFEST_FORMAT:
        raise DownloadError(f"{url} names no patient, study or series to download")
    return answer


class Progress:
    """A one-line progress bar on a terminal (size, rate, time left); a line per series otherwise."""

    def __init__(self, total: int, series_count: int, stream: Any = sys.stderr) -> None:
        self.total = max(total, 1)
        self.series_count = series_count
        self.stream = stream
        self.live = stream.isatty()
        self.done = 0  # in announced bytes: a finished series counts its full announced size
        self.received = 0  # bytes that really arrived in this run
        self.started = time.monotonic()
        self.shown_at = 0.0
        self.series_number = 0

    def start_series(self, number: int) -> None:
        self.series_number = number

    def show(self, current: int = 0, force: bool = False) -> None:
        now = time.monotonic()
        if not self.live or (not force and now - self.shown_at < 0.2):
            return
        self.shown_at = now
        elapsed = max(now - self.started, 1e-6)
        rate = self.received / elapsed
        done = min(self.done + current, self.total)
        fraction = done / self.total
        left = (self.total - done) / rate if rate > 0 else 0
        bar = "#" * int(fraction * 24)
        self.stream.write(
            f"\r{fraction:4.0%} [{bar:<24}] {_size(done)} of {_size(self.total)}  {_size(rate)}/s  "
            f"{_duration(left)} left  series {self.series_number}/{self.series_count} "
        )
        self.stream.flush()

    def say(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()


def _size(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def check_zip(path: Path, expected_files: int) -> None:
    """Raise DownloadError unless ``path`` is a whole zip holding ``expected_files`` files."""
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
            files = sum(1 for entry in archive.infolist() if not entry.is_dir())
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise DamagedZip(f"{path.name} is not a whole zip file ({error})") from None
    if broken is not None:
        raise DamagedZip(f"{path.name}: {broken} is damaged")
    if files != expected_files:
        raise DamagedZip(f"{path.name} holds {files} files where {expected_files} were expected")


def fetch_series(portal: Portal, series: dict[str, Any], part: Path, progress: Progress) -> None:
    """Fetch one series' zip into ``part`` (through a temporary file) and check it.

    What a broken attempt left in the temporary file is kept when the portal said the zip can be
    resumed (its ``ETag``, kept beside it): the next attempt asks only for the rest.
    """
    partial = part.with_name(part.name + ".partial")
    tag_file = part.with_name(part.name + ".etag")
    have = partial.stat().st_size if partial.exists() and tag_file.exists() else 0
    headers = {"Range": f"bytes={have}-", "If-Range": tag_file.read_text().strip()} if have else {}
    received = 0

    def count(size: int) -> None:
        nonlocal received
        received += size
        progress.received += size
        progress.show(min(have + received, series["size"]))

    with portal.open(series["archive"], accept="application/zip", headers=headers) as response:
        resumed = response.status == 206
        if not resumed:
            have = 0
        tag = response.headers.get("ETag", "")
        if tag and response.headers.get("Accept-Ranges") == "bytes":
            tag_file.write_text(tag)
        else:
            tag_file.unlink(missing_ok=True)
        expected = response.headers.get("Content-Length")
        with partial.open("ab" if resumed else "wb") as output:
            copy_in_chunks(response, output, count)
    if expected is not None and received < int(expected):
        raise ConnectionError(f"the connection broke off after {have + received} bytes")
    if received == 0 and not resumed:
        raise ConnectionError("the connection closed before any data came")
    try:
        check_zip(partial, series["instances"])
    except DamagedZip:
        partial.unlink()
        tag_file.unlink(missing_ok=True)
        raise
    partial.replace(part)
    tag_file.unlink(missing_ok=True)


def copy_in_chunks(source: BinaryIO, target: BinaryIO, on_chunk: Callable[[int], None]) -> None:
    while True:
        chunk = source.read(CHUNK)
        if not chunk:
            return
        target.write(chunk)
        on_chunk(len(chunk))


def join_parts(manifest: dict[str, Any], parts: list[Path], output: Path) -> None:
    """Join the series' zips into one (files stored as they are: DICOM barely compresses further)."""
    temporary = output.with_name(output.name + ".joining")
    names: set[str] = set()
    with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED, allowZip64=True) as joined:
        for part in parts:
            with zipfile.ZipFile(part) as archive:
                renamed_folders: dict[str, str] = {}
                for entry in archive.infolist():
                    if entry.is_dir():
                        continue
                    name = _unique(entry.filename, names, renamed_folders)
                    names.add(name)
                    info = zipfile.ZipInfo(name, date_time=entry.date_time)
                    info.compress_type = zipfile.ZIP_STORED
                    info.file_size = entry.file_size
                    with archive.open(entry) as source, joined.open(info, "w", force_zip64=True) as target:
                        shutil.copyfileobj(source, target, CHUNK)
    check_zip(temporary, manifest["expected_instances"])
    temporary.replace(output)


def _unique(name: str, taken: set[str], renamed_folders: dict[str, str]) -> str:
    """``name``, or, when another series' zip used the same folder, the folder renamed ``folder (2)``."""
    folder, _, file_name = name.rpartition("/")
    if folder in renamed_folders:
        return f"{renamed_folders[folder]}/{file_name}"
    if name not in taken:
        return name
    number = 2
    while any(existing.startswith(f"{folder} ({number})/") for existing in taken):
        number += 1
    renamed_folders[folder] = f"{folder} ({number})"
    return f"{renamed_folders[folder]}/{file_name}"


def download(
    portal: Portal,
    manifest: dict[str, Any],
    output: Path,
    retries: int,
    retry_wait: float,
    progress: Progress,
) -> None:
    """Fetch every series not already in the parts folder, retrying dropped ones, then join them."""
    parts_folder = output.with_name(output.name + ".parts")
    parts_folder.mkdir(parents=True, exist_ok=True)
    series_list = manifest["series"]
    parts = [parts_folder / f"{series['id']}.zip" for series in series_list]
    for number, (series, part) in enumerate(zip(series_list, parts), 1):
        progress.start_series(number)
        if part.exists():
            try:
                check_zip(part, series["instances"])
            except DamagedZip:
                part.unlink()
            else:
                progress.done += series["size"]
                progress.say(f"series {number}/{len(series_list)} already here")
                continue
        for attempt in range(retries + 1):
            try:
                fetch_series(portal, series, part, progress)
                break
            except (*NETWORK_ERRORS, DamagedZip) as error:
                if attempt == retries:
                    raise DownloadError(
                        f"series {number}/{len(series_list)} could not be downloaded ({error}), "
                        f"{retries + 1} tries. What arrived is kept: run the same command again later "
                        "to resume"
                    ) from None
                wait = min(retry_wait * 2**attempt, 60)
                progress.say(f"series {number}: connection lost ({error}); retrying in {wait:g} s")
                time.sleep(wait)
        progress.done += series["size"]
        progress.show(force=True)
        description = series.get("description") or series.get("modality") or ""
        progress.say(
            f"series {number}/{len(series_list)} done: {series['instances']} files {description}".rstrip()
        )
    join_parts(manifest, parts, output)
    shutil.rmtree(parts_folder)


def open_viewer(command: str, path: Path) -> int:
    """Run the viewer command, ``{}`` replaced by the zip's path (added at the end if absent)."""
    words = shlex.split(command, posix=os.name != "nt")
    if not any("{}" in word for word in words):
        words.append("{}")
    return subprocess.call([word.replace("{}", str(path)) for word in words])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pacs-download",
        description="Save a patient, study or series from the PACS web portal as one checked zip file.",
    )
    parser.add_argument("url", help="the portal address the Downloader action shows, or a study's link")
    parser.add_argument("-u", "--user", help="username, when the portal asks for a sign-in")
    parser.add_argument("-o", "--output", help="the zip file to write (default: the name the portal gives)")
    parser.add_argument(
        "--open", metavar="COMMAND", help='run COMMAND on the zip when done, e.g. "viewer {}"'
    )
    parser.add_argument("--retries", type=int, default=5, help="tries per series after the first (default 5)")
    parser.add_argument(
        "--retry-wait", type=float, default=2, help="seconds before the first retry (doubles)"
    )
    parser.add_argument(
        "--birth-date",
        metavar="YYYY-MM-DD",
        help="the patient's date of birth, when a study link asks for it (or PACS_BIRTH_DATE; else a prompt)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    arguments = parser.parse_args(argv)

    portal = Portal()
    try:
        try:
            manifest = find_manifest(portal, arguments.url)
        except SignInNeeded:
            username = arguments.user or input("Username: ")
            password = os.environ.get("PACS_PASSWORD") or getpass.getpass(f"Password for {username}: ")
            portal.sign_in(arguments.url, username, password)
            manifest = find_manifest(portal, arguments.url)
        except IdentityNeeded as question:
            birth_date = (
                arguments.birth_date
                or os.environ.get("PACS_BIRTH_DATE")
                or input(f"{question} Date of birth (YYYY-MM-DD): ")
            )
            portal.confirm_identity(arguments.url, birth_date, question.csrf_token)
            manifest = find_manifest(portal, arguments.url)
        output = Path(arguments.output or manifest["file_name"]).expanduser().resolve()
        progress = Progress(manifest["expected_size"], len(manifest["series"]))
        progress.say(
            f"{manifest['title']}: {len(manifest['series'])} series, {manifest['expected_instances']} files, "
            f"about {_size(manifest['expected_size'])}"
        )
        download(portal, manifest, output, arguments.retries, arguments.retry_wait, progress)
    except SignInNeeded:
        print("pacs-download: the portal still asks for a sign-in", file=sys.stderr)
        return 1
    except IdentityNeeded as question:
        print(f"pacs-download: {question}", file=sys.stderr)
        return 1
    except DownloadError as error:
        print(f"pacs-download: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\npacs-download: stopped; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"Saved {output} ({manifest['expected_instances']} files, checked)")
    if arguments.open:
        status = open_viewer(arguments.open, output)
        if status != 0:
            print(f"pacs-download: the viewer command ended with status {status}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
