"""Report text as g2d's text encoders expect it: English, in ASCII.

The encoders g2d ships read English chest X-ray reports with an English (BERT uncased) vocabulary. A
non-ASCII character in such a report is nearly always typographic (curly quotes, dashes, non-breaking
spaces pasted from a word processor) or mojibake (a UTF-8 file read as Windows-1252: 'Ã©' for 'é'), so
`manifest.validate` lists reports holding one, and importers pass every report through `to_ascii`, which
replaces the typographic characters and accented letters deterministically and removes (and counts) the rest.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

# Typographic characters and their ASCII spelling; accented letters are handled by NFKD below.
_TYPOGRAPHIC = {
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u00b4", "'"),  # single quotes, prime, acute accent
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb", '"'),  # double quotes, double prime, guillemets
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u00ad", "-"),  # hyphens, dashes, minus, soft hyphen
    **dict.fromkeys("\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"
                    "\u0085\u2028\u2029", " "),  # non-breaking and other spaces, line separators
    **dict.fromkeys("\u200b\u200c\u200d\u2060\ufeff", ""),  # zero-width characters, byte-order mark
    "\u2026": "...", "\u2022": "-", "\u00b7": "-", "\u00d7": "x", "\u00b0": " degrees", "\u00b1": "+/-",
    "\u00b5": "u", "\u2264": "<=", "\u2265": ">=", "\u2192": "->", "\u2044": "/",
}
_TABLE = str.maketrans(_TYPOGRAPHIC)
_SPACES = re.compile(r" {2,}")


@dataclass
class AsciiText:
    text: str
    replaced: int = 0  # characters given an ASCII spelling (typographic, accented)
    removed: Counter = field(default_factory=Counter)  # characters with none, removed: char -> count


def to_ascii(text: str) -> AsciiText:
    """`text` in ASCII: typographic characters spelled in ASCII, accented letters without their accents
    (NFKD), anything else removed and counted; runs of spaces this leaves are collapsed. Deterministic."""
    if text.isascii():
        return AsciiText(text)
    out, replaced, removed = [], 0, Counter()
    for ch in text:
        if ch.isascii():
            out.append(ch)
            continue
        spelled = _TYPOGRAPHIC.get(ch)
        if spelled is None:
            spelled = "".join(c for c in unicodedata.normalize("NFKD", ch).translate(_TABLE) if c.isascii())
        if spelled or ch in _TYPOGRAPHIC:
            out.append(spelled)
            replaced += 1
        else:
            removed[ch] += 1
    return AsciiText(_SPACES.sub(" ", "".join(out)).strip(), replaced, removed)


def first_non_ascii(text: str) -> tuple[int, str] | None:
    """(position, character) of the first non-ASCII character, or None."""
    for k, ch in enumerate(text):
        if not ch.isascii():
            return k, ch
    return None


def describe(ch: str) -> str:
    """A character as a user can look it up: "'é' (U+00E9 LATIN SMALL LETTER E WITH ACUTE)"."""
    name = unicodedata.name(ch, "")
    return f"{ch!r} (U+{ord(ch):04X}{' ' + name if name else ''})"


def mojibake(text: str) -> str | None:
    """What `text` reads as when it is UTF-8 that was decoded as Windows-1252 or Latin-1 ('Ã©' -> 'é'), or
    None when it is not that."""
    for codec in ("cp1252", "latin-1"):
        try:
            fixed = text.encode(codec).decode("utf-8")
        except UnicodeError:
            continue
        if fixed != text:
            return fixed
    return None
