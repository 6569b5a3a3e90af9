"""What a study link says about itself before anyone hands it out: until when it works, or that
it no longer would, and what can be done about it.

The study results' "Copy study link" and ``./pacs token`` say the same words, from here: a link
counts from its study date, so one made for an old study may have expired before it is ever sent.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

EXTEND_WHERE = "An administrator can extend it on Administration, Study links."


@dataclass(frozen=True)
class LinkPeriod:
    """The last day a link works, seen from ``today``."""

    until: dt.date
    today: dt.date

    @property
    def expired(self) -> bool:
        return self.today > self.until

    def note(self, date_format: str) -> str:
        """One or two sentences for the person about to hand the link out."""
        shown = self.until.strftime(date_format)
        if self.expired:
            return f"This link expired on {shown}: it would not open the study. {EXTEND_WHERE}"
        days = (self.until - self.today).days
        left = "today is its last day" if days == 0 else f"{days} day{'s' if days != 1 else ''} from today"
        return f"This link works until {shown} ({left})."
