"""Where the stack's logs go, and how they are kept from filling the disk.

Every program's output ends in ``logs/`` of the data directory, each file rotated by size
(``PACS_LOG_MAX_MB``, 50 MB) with a bounded number of older files kept beside it
(``PACS_LOG_KEEP``, 10: ``orthanc.log.1`` ... ``orthanc.log.10``):

- ``orthanc.log``, ``control.log`` (gunicorn's own messages), ``access.log`` (gunicorn's access
  log) and ``caddy-process.log``: the runner reads each program's output from a pipe and writes it
  through the standard library's ``RotatingFileHandler``. One process writes each file, so
  rotating it is safe; gunicorn's master and workers all write to the same pipe.
- ``caddy.log``: Caddy's own log file, rolled by Caddy itself (``roll_size``, ``roll_keep``).
- ``pacs.log``: the output of a runner started with ``./pacs up --detach``, the same way.

Run as a systemd service (``JOURNAL_STREAM`` is set), or with ``PACS_LOGS=journal``, every line
goes to the runner's output instead, named by its program, for the journal to keep and rotate;
only a log the portal itself reads is written to its file as well: ``orthanc.log``, where the
archive watcher (``control.watch``) finds the DICOM calls Orthanc refused.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
from pathlib import Path
from typing import IO

MB = 1024 * 1024


def max_bytes() -> int:
    return max(1, int(os.environ.get("PACS_LOG_MAX_MB", "50"))) * MB


def keep() -> int:
    return max(1, int(os.environ.get("PACS_LOG_KEEP", "10")))


def to_journal() -> bool:
    """True when the logs go to the journal rather than to files."""
    chosen = os.environ.get("PACS_LOGS", "")
    return chosen == "journal" or (chosen != "files" and bool(os.environ.get("JOURNAL_STREAM")))


def describe(folder: Path) -> str:
    """Where the logs are, in a sentence for the admin."""
    if to_journal():
        return "logs go to the journal (journalctl)"
    return f"logs in {folder}, each rotated at {max_bytes() // MB} MB, {keep()} older files kept"


_lock = threading.Lock()


def _file_writer(path: Path) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=max_bytes(), backupCount=keep(), encoding="utf-8", errors="replace"
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def _journal_writer(program: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"{program}: %(message)s"))
    return handler


def relay(stream: IO[bytes], path: Path, program: str, *, read_back: bool = False) -> threading.Thread:
    """Copy ``stream`` line by line into the rotating log ``path`` (or the journal) until it ends.

    ``read_back``: the portal reads this log, so it is written to ``path`` even when the lines go
    to the journal.
    """
    journal = to_journal()
    handlers = [_journal_writer(program)] if journal else []
    if read_back or not journal:
        handlers.append(_file_writer(path))

    def copy() -> None:
        try:
            for line in stream:
                record = logging.LogRecord(
                    program, logging.INFO, "", 0, line.decode(errors="replace").rstrip("\r\n"), None, None
                )
                with _lock:
                    for handler in handlers:
                        handler.handle(record)
        finally:
            stream.close()
            for handler in handlers:
                handler.close()

    thread = threading.Thread(target=copy, name=f"log-{program}", daemon=True)
    thread.start()
    return thread


def capture_own_output(path: Path, program: str = "pacs") -> None:
    """Send this process's standard output and error (file descriptors 1 and 2) to ``path``.

    For the journal they are left as they are: they already go there.
    """
    if to_journal():
        return
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(write, 1)
    os.dup2(write, 2)
    os.close(write)
    relay(os.fdopen(read, "rb"), path, program)
