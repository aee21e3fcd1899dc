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


def visible(text) -> str:
    """``text`` with control characters and bidi controls written as escapes (``\\x1b``, ``\\u202e``), so
    untrusted text cannot drive a terminal or reorder what follows it; tab and newline are kept."""
    def esc(m: re.Match) -> str:
        c = ord(m.group())
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"

    return _INVISIBLE.sub(esc, str(text))
