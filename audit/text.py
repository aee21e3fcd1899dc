"""Untrusted text made safe to print: :func:`visible` escapes what a terminal would act on.

Owns the one definition of "invisible" characters. Imports nothing but ``re``, so the CLI's error path
(:mod:`audit.cli.common`), the reports and the diff share it at no import cost.
"""

from __future__ import annotations

import math
import re

# control characters (C0 but tab and newline, DEL, C1) and bidirectional overrides/isolates: a terminal would
# act on them (escape sequences, carriage return, reordering the rest of the line), so they are shown escaped
# zero-width space, word joiner and BOM are shown too (ZWJ/ZWNJ are not: emoji sequences and scripts use them),
# and so are the interlinear annotation characters U+FFF9-U+FFFB and the tag characters U+E0000-U+E007F, which
# no font draws: tags spell hidden ASCII ("ASCII smuggling": U+E0041 is an invisible "A")
# (also the deprecated format characters U+206A-U+206F, which draw nothing), and the characters drawn as nothing or as
# a blank that running text has no use for: the soft hyphen U+00AD (drawn only where a line breaks at it), the
# combining grapheme joiner U+034F, the Hangul fillers U+115F, U+1160, U+3164 and U+FFA0, the Khmer inherent vowels
# U+17B4-17B5, the Mongolian vowel separator U+180E, the braille blank U+2800, the shorthand format controls
# U+1BCA0-1BCA3 and the musical format characters U+1D173-1D17A: "ca\u00adt" was shown as "cat" and "a\u3164cat" as
# "a cat", so two prompts that differ looked the same (sources.is_blank already reads them as showing nothing)
_CHARS = ("\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b\u200e\u200f"
          "\u2028\u2029\u202a-\u202e\u2060-\u2064\u2066-\u206f\u2800\u3164\ufeff\uffa0\ufff9-\ufffb"
          "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e007f")
# variation selectors: one after a character picks its form (❤️, a CJK ideograph's variant) and is kept; a second
# in a row selects nothing, and a run of them can carry hidden bytes ("variation-selector smuggling"): escaped, and
# so is a supplementary selector (U+E0100-E01EF, ideographic variants only) after anything but a CJK ideograph
_VS = "\ufe00-\ufe0f\U000e0100-\U000e01ef"
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_ODD_VS = f"(?<=[{_VS}])[{_VS}]|(?<![{_CJK}])[\U000e0100-\U000e01ef]"
# the one legitimate use of tag characters: the flags of England, Scotland and Wales (U+1F3F4 WAVING BLACK FLAG,
# the subdivision code gbeng/gbsct/gbwls in tags, U+E007F CANCEL TAG), the only emoji tag sequences that Unicode
# recommends and fonts draw as flags; they are kept. Tags anywhere else (another code after U+1F3F4 draws a
# black flag with hidden text) are escaped
_TAG_FLAGS = "\U0001f3f4\U000e0067\U000e0062(?:\U000e0065\U000e006e\U000e0067|\U000e0073\U000e0063\U000e0074|" \
             "\U000e0077\U000e006c\U000e0073)\U000e007f"
_INVISIBLE = re.compile(f"{_TAG_FLAGS}|[{_CHARS}]|{_ODD_VS}")
_INVISIBLE_LINE = re.compile(f"{_TAG_FLAGS}|[\t\n{_CHARS}]|{_ODD_VS}")
_LINE = {"\t": "\\t", "\n": "\\n"}


def visible(text, one_line: bool = False) -> str:
    """``text`` with control characters, bidi controls and invisible characters written as escapes (``\\x1b``,
    ``\\u202e``, a tag character as ``\\U000e0041``), so untrusted text cannot drive a terminal, reorder what
    follows it or carry text a reader cannot see; the flags of England, Scotland and Wales (emoji tag sequences)
    are kept. Tab and newline are kept, or with ``one_line`` written as ``\\t`` and ``\\n`` (a table cell shows
    a prompt's line breaks as they are in it)."""
    def esc(m: re.Match) -> str:
        c = m.group()
        if len(c) > 1:  # a flag's emoji tag sequence (_TAG_FLAGS): drawn as one flag, kept
            return c
        if c in _LINE:
            return _LINE[c]
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"

    return (_INVISIBLE_LINE if one_line else _INVISIBLE).sub(esc, str(text))


def encodable(text: str, encoding: str | None) -> str:
    """``text`` with the characters ``encoding`` lacks written as backslash escapes (``\\u6771``, ``caf\\xe9``), as
    the command's stdout writes them under an ASCII or Latin-1 locale (``LC_ALL=C PYTHONUTF8=0``:
    ``audit.cli._encodable_output``); unchanged for UTF-8 or an encoding Python does not know. A rich table must be
    given text escaped this way: it sized its columns with the characters, and the stream's escapes, added when the
    lines were written, pushed each border of a row holding one to the right (a Japanese prompt's row of the report
    at 80 columns was 16 characters wider than the table)."""
    name = (encoding or "utf-8").lower()
    if name.replace("-", "").replace("_", "").startswith("utf"):
        return text
    try:
        return text.encode(name, "backslashreplace").decode(name)
    except LookupError:
        return text


PLAIN_TERMS = ("dumb", "unknown")  # TERM values of a terminal that draws only text (rich treats these as dumb too)


def plain_terminal() -> bool:
    """Whether ``TERM`` names a terminal that draws only text (:data:`PLAIN_TERMS`: a screen reader's console, Emacs'
    shell), where memaudit's tables have no box-drawing characters and the report's histogram no bars: a screen
    reader read every ``│``, ``━`` and ``█`` aloud, row after row. Read from the environment whether or not stdout
    is a terminal, so that ``memaudit report R > log`` in such a session writes what the screen showed."""
    import os

    return os.environ.get("TERM", "").lower() in PLAIN_TERMS


def table_box():
    """The ``box`` of every rich table memaudit prints (report and diff): None (columns separated by spaces, no
    lines) on a :func:`plain_terminal`, else rich's default ``HEAVY_HEAD``."""
    from rich import box

    return None if plain_terminal() else box.HEAVY_HEAD


def counted(n: int, noun: str, fmt: str = "") -> str:
    """``n`` and ``noun`` agreeing in number: ``counted(1, "row")`` is ``"1 row"``, ``counted(20000, "row", ",")``
    is ``"20,000 rows"``, ``counted(2, "unique prompt")`` is ``"2 unique prompts"`` (``fmt``: the number's format
    spec; the plural adds an ``s`` to the noun's last word)."""
    return f"{n:{fmt}} {noun}" if n == 1 else f"{n:{fmt}} {noun}s"


def fraction_text(x: float) -> str:
    """A fraction option as a message prints it: ``f"{x:g}"`` (``0.01``, ``1``, ``0``) where that reads back as the
    same number, else the shortest decimal that does (``repr``): ``:g`` keeps six digits, so --max-error-fraction
    0.1249999 printed as ``0.125`` and 1 of 8 rows (12.5%) read as "more than --max-error-fraction 0.125"."""
    text = f"{x:g}"
    return text if float(text) == float(x) else repr(float(x))


def share(n: int, total: int, limit: float | None = None, decimals: int = 1) -> str:
    """``n`` of ``total`` as a percentage for a message, one decimal (``"2.5%"``), more where one would contradict the
    counts beside it: a nonzero count never reads ``0.0%`` (1 of 3,000 rows is ``0.03%``), a count short of the total
    never ``100.0%`` (2,999 of 3,000 is ``99.97%``), and a share above ``limit`` (a fraction, ``--max-error-fraction``)
    never reads as equal to it (101 of 10,001 rows, more than 0.01, is ``1.01%``, not ``1.0%``). ``decimals``: the
    fewest shown (0 for a progress line's ``40%``)."""
    from decimal import Decimal

    frac = n / total
    # the limit as the decimal it prints as (--max-error-fraction 0.29 is 29%, though 0.29 * 100 is 28.999...)
    cap = Decimal(repr(float(limit))) * 100 if limit is not None else None
    for digits in range(decimals, 16):
        text = f"{frac:.{digits}%}"
        shown = Decimal(text[:-1])
        if (n and shown == 0) or (n < total and shown == 100) or (cap is not None and frac > limit and shown <= cap):
            continue
        return text
    return f"{frac:.16%}"


def threshold_text(threshold: float) -> str:
    """A calibrated flag threshold (a float, the risk scale) as every command prints it: the shortest ``.Ng`` text,
    N from 6 to 17 significant digits, that reads back as the same float (``4.5`` stays ``4.5``; an order-statistic
    threshold such as 4.343418926861595 keeps all its digits). It depends on the threshold alone, so ``calibrate``,
    ``run``, ``report``, ``diff`` and ``generate`` print one calibration alike, and a risk above the threshold never
    prints equal to it: 6 digits printed 4.343418926861595 as ``4.34342`` beside listed risks that round alike, and
    the report's extra digits made that ``4.343419`` there while the other commands said ``4.34342``. A value that is
    not a number (an edited file) is its ``repr``; NaN and infinities print as ``nan`` and ``inf``."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        return repr(threshold)
    t = float(threshold)
    if not math.isfinite(t):
        return f"{t:g}"
    for digits in range(6, 18):
        text = f"{t:.{digits}g}"
        if float(text) == t:
            return text
    return repr(t)


def code_points(text: str, printf: bool = False) -> str:
    """``text`` with every character beyond printable ASCII written as a ``\\u`` escape (``\\U`` beyond the BMP):
    ``"cafe\\u0301"`` for a decomposed 'café' (NFD, as macOS writes names), ``"caf\\u00e9"`` for a composed one, two
    names that print alike. With ``printf`` the result is also bash's ``printf`` format in single quotes for that
    text (backslash, ``%`` and ``'`` written so that it types them)."""
    plain = {"\\": "\\\\", "%": "%%", "'": "'\\''"} if printf else {}
    return "".join(plain.get(c, c) if c.isascii() and c.isprintable() else f"\\u{ord(c):04x}" if ord(c) < 0x10000
                   else f"\\U{ord(c):08x}" for c in text)

