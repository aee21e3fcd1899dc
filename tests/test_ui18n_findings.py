"""Findings of a new-user trial as a trust-and-safety analyst screening a prompt log written in many languages and
scripts (CJK, Arabic and Hebrew, Devanagari, emoji sequences, combining marks, bidi and control characters, prompts
that differ only in Unicode normalization), each pinned by a test that failed before its fix."""

from __future__ import annotations

import subprocess
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.errors import SourceError
from audit.pipeline import RunConfig


def test_a_column_name_differing_only_in_unicode_normalization_is_said_so(tmp_path):
    """A CSV header 'légende' written decomposed (NFD: 'e' + U+0301, as macOS writes text) and `--prompt-column
    légende` typed composed: the refusal said "The column 'légende' differs from 'légende' only in spaces or case",
    two names that print alike and differ in neither. It now names the difference, writes both names with their
    code points, and gives a bash command that types the file's name."""
    from audit.pipeline import build_plan
    from audit.runner import missing_column_note

    nfd = unicodedata.normalize("NFD", "légende")
    (tmp_path / "a.csv").write_text(f"id,{nfd}\n1,un chat rouge\n", encoding="utf-8")
    with pytest.raises(SourceError) as err:
        build_plan(RunConfig(inputs=(str(tmp_path / "a.csv"),), prompt_column="légende"))
    note = ("The column 'le\\u0301gende' differs from 'l\\u00e9gende' only in Unicode normalization: the file's name is "
            "decomposed (NFD), and the two print alike (in bash, \"$(printf 'le\\u0301gende')\" types the file's): "
            "give the name exactly as the file has it (quoted), or fix the header.")
    assert str(err.value) == (f"no input has the prompt column 'légende'; columns found: id, {nfd}. Choose one with "
                              f"--prompt-column. {note}")
    typed = subprocess.run(["bash", "-c", "printf 'le\\u0301gende'"], capture_output=True, env={"LC_ALL": "C.UTF-8"})
    assert typed.stdout.decode("utf-8") == nfd
    # one file of two with the decomposed header: the run's warning says the same
    pq.write_table(pa.table({"légende": ["a cat"]}), tmp_path / "b.parquet")
    plan = build_plan(RunConfig(inputs=(str(tmp_path),), prompt_column="légende"))
    assert missing_column_note(plan, "légende") == (
        f"1 of 2 input files has no column 'légende', so its 1 row is rejected as missing_prompt_column; the first: "
        f"{tmp_path / 'a.csv'} (columns: id, {nfd}). {note}")
    # a name the shell's printf would read as a format or an escape is typed as written
    from audit.sources import near_name_note

    odd = unicodedata.normalize("NFD", "l'é%\\")
    said = near_name_note(["l'é%\\"], [odd])
    command = said.split('"$(')[1].split(')"')[0]
    assert subprocess.run(["bash", "-c", command], capture_output=True,
                          env={"LC_ALL": "C.UTF-8"}).stdout.decode("utf-8") == odd
    # names that differ in case or spaces are said as before
    assert near_name_note(["caption"], ["Caption "]) == (" The column 'Caption ' differs from 'caption' only in spaces "
                                                         "or case: give the name exactly as the file has it (quoted), "
                                                         "or fix the header.")
