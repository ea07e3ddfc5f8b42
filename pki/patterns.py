"""Regular expressions for the API document's JSON schemas that say exactly what `pki.requests` accepts.

The request models validate in Python; their JSON schemas must accept the same values and no others (schemathesis
checks both directions against the live API). These build the patterns that a hand-written one gets wrong: number
ranges (`days` up to the CA's remaining life), Python's idea of a blank string (`str.strip()` strips 29 characters,
not JSON Schema's `\\s`), and words compared case-insensitively with '_' ignored (revocation reasons).
"""

from __future__ import annotations

import sys

# Every character `str.isspace()` (and so `str.strip()`) treats as white space, as a character class body.
WHITESPACE = "".join(f"\\u{c:04x}" for c in range(sys.maxunicode + 1) if chr(c).isspace())
BLANK = f"^[{WHITESPACE}]*$"


def _same_length(low: str, high: str) -> str:
    """A regex for the decimal numbers low..high, both written with the same number of digits."""
    if low == high:
        return low
    if len(low) == 1:
        return f"[{low}-{high}]"
    if low[0] == high[0]:
        return low[0] + f"(?:{_same_length(low[1:], high[1:])})"
    rest = len(low) - 1
    parts = []
    first, last = int(low[0]), int(high[0])
    if low[1:] != "0" * rest:
        parts.append(low[0] + f"(?:{_same_length(low[1:], '9' * rest)})")
        first += 1
    tail = None
    if high[1:] != "9" * rest:
        tail = high[0] + f"(?:{_same_length('0' * rest, high[1:])})"
        last -= 1
    if first <= last:
        parts.append((str(first) if first == last else f"[{first}-{last}]") + f"[0-9]{{{rest}}}")
    if tail:
        parts.append(tail)
    return "|".join(parts)


def integer_range(low: int, high: int) -> str:
    """A regex (no anchors, no leading zeros) for the whole numbers low..high, 0 <= low <= high."""
    parts = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        start = max(low, 10 ** (digits - 1) if digits > 1 else 0)
        end = min(high, 10**digits - 1)
        if start <= end:
            parts.append(_same_length(str(start), str(end)))
    return "|".join(parts)


def words_ignoring_case_and_underscores(words: tuple[str, ...]) -> str:
    """An anchored regex for `words`, any letter case, with any number of '_' anywhere."""

    def one(word: str) -> str:
        return "_*" + "".join(f"[{c.lower()}{c.upper()}]_*" if c.isalpha() else f"{c}_*" for c in word)

    return "^(?:" + "|".join(one(word) for word in words) + ")$"
