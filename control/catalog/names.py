"""The matching form of text: what the catalog compares, so that capitals and accents do not matter.

``fold`` is applied to stored values (into the ``_key`` columns) and to what users type, so that
both meet in one form: compatibility-normalised (a full-width letter is its ASCII letter, a half-width
katakana its full-width letter), Latin, Greek and Cyrillic accents removed ("Müller" and "Muller"
meet, so do "Ζωή" and "ΖΩΗ"), a few letters that carry no separable accent written out (``ø``,
``ł``, ``đ``, ``ß`` ...), then upper-cased. Marks that change a letter in other scripts (the
Japanese voicing marks of ``ガ``, Hangul syllables) are kept whole: they are not accents.

Everything else of a value stays as stored, the DICOM separators included: ``^`` between name
parts and ``=`` before the ideographic and phonetic groups. The query form's patterns (``*`` any
text, ``?`` one character, a space standing for one character) are folded the same way and matched
against the whole key, as Orthanc matches them against the whole value.
"""

from __future__ import annotations

import re
import unicodedata

# Combining Diacritical Marks: what Latin, Greek and Cyrillic accents decompose into.
ACCENTS = re.compile("[\u0300-\u036f]")
# Letters whose accent or stroke does not decompose, written as people type them without it.
WRITTEN_OUT = str.maketrans(
    {
        "ø": "o",
        "Ø": "O",
        "ł": "l",
        "Ł": "L",
        "đ": "d",
        "Đ": "D",
        "ħ": "h",
        "Ħ": "H",
        "ı": "i",
        "æ": "ae",
        "Æ": "AE",
        "œ": "oe",
        "Œ": "OE",
        "þ": "th",
        "Þ": "TH",
    }
)


def fold(text: str | None) -> str:
    """``text`` in its matching form (see the module)."""
    if not text:
        return ""
    decomposed = unicodedata.normalize("NFKD", text.translate(WRITTEN_OUT))
    return unicodedata.normalize("NFC", ACCENTS.sub("", decomposed)).upper()


def has_wildcard(pattern: str) -> bool:
    return "*" in pattern or "?" in pattern


def longest_literal(pattern: str) -> int:
    """The longest run of characters without a wildcard: trigram indexes need three."""
    return max((len(run) for run in re.split(r"[*?]", pattern)), default=0)


def glob_pattern(pattern: str) -> str:
    """A folded DICOM pattern as SQLite's GLOB reads it (``*`` and ``?`` mean the same there)."""
    return pattern.replace("[", "[[]")


def like_pattern(pattern: str) -> str:
    """A folded DICOM pattern as SQL's LIKE reads it, with ``\\`` as the escape character."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")
