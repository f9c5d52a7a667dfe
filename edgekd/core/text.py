"""Text from files and devices made safe to print: one line, nothing hidden, nothing that moves the
cursor or the reading order. Every table cell and report line rendered from user data goes through
``clean`` (bench rows, the catalog's tables)."""

from __future__ import annotations

import re

# characters that would break a table row or a line, or change how text shows: C0/C1 controls (newline,
# carriage return, escape sequences), DEL, Unicode line/paragraph separators, zero-width and bidi controls
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def clean(text) -> str:
    """``text`` (any value) as one line that shows what it holds: every control, line-breaking or
    invisible character becomes its escape (``\\n``, ``\\x1b``, ``\\u202e``). Applied to every cell and
    line rendered from rows, whose names, errors and environment come from files edgekd reads."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
