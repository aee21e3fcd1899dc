"""Untrusted text made safe to print: :func:`visible` escapes what a terminal would act on.

Owns the one definition of "invisible" characters. Imports nothing but ``re``, so the CLI's error path
(:mod:`audit.cli.common`), the reports and the diff share it at no import cost.
"""

from __future__ import annotations

import re

# control characters (C0 but tab and newline, DEL, C1) and bidirectional overrides/isolates: a terminal would
# act on them (escape sequences, carriage return, reordering the rest of the line), so they are shown escaped
# zero-width space, word joiner and BOM are shown too (ZWJ/ZWNJ are not: emoji sequences and scripts use them)
_INVISIBLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028\u2029\u202a-\u202e"
                        "\u2060-\u2064\u2066-\u2069\ufeff]")
_INVISIBLE_LINE = re.compile(_INVISIBLE.pattern[:1] + "\t\n" + _INVISIBLE.pattern[1:])
_LINE = {"\t": "\\t", "\n": "\\n"}


def visible(text, one_line: bool = False) -> str:
    """``text`` with control characters and bidi controls written as escapes (``\\x1b``, ``\\u202e``), so
    untrusted text cannot drive a terminal or reorder what follows it; tab and newline are kept, or with
    ``one_line`` written as ``\\t`` and ``\\n`` (a table cell shows a prompt's line breaks as they are in it)."""
    def esc(m: re.Match) -> str:
        c = m.group()
        if c in _LINE:
            return _LINE[c]
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"

    return (_INVISIBLE_LINE if one_line else _INVISIBLE).sub(esc, str(text))
