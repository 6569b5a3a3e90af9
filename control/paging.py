"""One page of a list and where it sits: what the query pages, the JSON answers and QIDO show.

The archive's finder and the catalog both answer in pages; the templates and the pager read them
the same way, whichever answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Page:
    """One page of rows. ``total`` is None where counting would cost a full read of the archive
    (see control.query.finder); ``after`` and ``before`` are the catalog's cursors for the links
    to the next and previous pages."""

    rows: list[Any]
    offset: int
    limit: int
    total: int | None
    has_next: bool
    after: str | None = None
    before: str | None = None

    @property
    def first_number(self) -> int:
        return self.offset + 1

    @property
    def last_number(self) -> int:
        return self.offset + len(self.rows)
