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


def test_a_character_cut_by_the_token_limit_is_a_trigger_token_by_its_text(scorer, tiny_model):
    """A prompt past 77 tokens whose last kept character is cut inside its bytes ('🎨' is 4 byte-level tokens; the
    first 2 kept before the EOS): when the model attended to those pieces, risk.parquet's trigger token was '��'
    (the pieces decoded alone) and the report listed "��" (0.500). The entry is now the character itself, with the
    mass of its kept pieces and its span in the prompt; a slow tokenizer's (no untruncated ids) keeps the old text."""
    import dataclasses

    import numpy as np

    from audit.scorers import tokenize

    prompt = "a " * 73 + "🎨 cat"
    tokens = tokenize(tiny_model.tokenizer, [prompt], 77)  # BOS, 73 x a, 2 of 🎨's 4 pieces, EOS
    assert (int(tokens.n_tokens[0]), int(tokens.n_kept[0])) == (80, 77)
    mass = np.full((1, 77), 0.001, dtype=np.float32)
    mass[0, 74:76] = [0.3, 0.2]
    mass[0, 5] = 0.1
    trig = scorer.trigger_tokens(tokens, mass)[0]
    assert [(t["token"], t["position"], round(t["mass"], 6), t["start"], t["end"]) for t in trig[:2]] == [
        ("🎨", 74, 0.5, 146, 147), ("a", 5, 0.1, 8, 9)]
    assert prompt[146:147] == "🎨" and len(trig) == 5
    slow = scorer.trigger_tokens(dataclasses.replace(tokens, offsets=tokens.offset_mapping(), encodings=None), mass)[0]
    assert (slow[0]["token"], slow[0]["position"], round(slow[0]["mass"], 6)) == ("\ufffd\ufffd", 74, 0.5)
