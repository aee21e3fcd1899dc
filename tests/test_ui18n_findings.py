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
    mixed = "e\u0301t\u00e9"  # neither composed nor decomposed
    assert near_name_note(["\u00e9t\u00e9"], [mixed]).startswith(
        " The column 'e\\u0301t\\u00e9' differs from '\\u00e9t\\u00e9' only in Unicode normalization: the file's name "
        "is not in composed form (NFC), and the two print alike")
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

    prompt = "a " * 73 + "🎨"  # the cut character is the prompt's last: its pieces run to the EOS
    tokens = tokenize(tiny_model.tokenizer, [prompt], 77)  # BOS, 73 x a, 2 of 🎨's 4 pieces, EOS
    assert (int(tokens.n_tokens[0]), int(tokens.n_kept[0])) == (79, 77)
    mass = np.full((1, 77), 0.001, dtype=np.float32)
    mass[0, 74:76] = [0.3, 0.2]
    mass[0, 5] = 0.1
    trig = scorer.trigger_tokens(tokens, mass)[0]
    assert [(t["token"], t["position"], round(t["mass"], 6), t["start"], t["end"]) for t in trig[:2]] == [
        ("🎨", 74, 0.5, 146, 147), ("a", 5, 0.1, 8, 9)]
    assert prompt[146:147] == "🎨" and len(trig) == 5
    slow = scorer.trigger_tokens(dataclasses.replace(tokens, offsets=tokens.offset_mapping(), encodings=None), mass)[0]
    assert (slow[0]["token"], slow[0]["position"], round(slow[0]["mass"], 6)) == ("\ufffd\ufffd", 74, 0.5)


def _borders_mirrored(line: str) -> list[int]:
    """Where the Unicode bidi algorithm, as a terminal that lays out bidirectional text applies it to each printed
    line (GNOME Terminal's VTE, Konsole; paragraph left to right), would make a table border ``│`` part of a
    right-to-left run and so move it: rule N1, neutral characters between two right-to-left ones take their
    direction, where numbers count as right-to-left unless the last strong character before them is left-to-right
    (rule W7). The columns of such a run are drawn mirrored (libfribidi's log2vis shows it)."""
    kinds, last = [], "L"
    for c in line:
        b = unicodedata.bidirectional(c)
        if b in ("L", "R", "AL"):
            last = kinds.append("L" if b == "L" else "R") or kinds[-1]
        else:
            kinds.append(("L" if b == "EN" and last == "L" else "R") if b in ("EN", "AN") else None)
    moved = []
    for i, c in enumerate(line):
        if c in "│┃":
            left = next((k for k in reversed(kinds[:i]) if k), "L")
            right = next((k for k in kinds[i + 1:] if k), "L")
            if left == right == "R":
                moved.append(i)
    return moved


def _terminal(render, what, width: int, encoding: str | None = None) -> str:
    import io

    from rich.console import Console

    buf = io.BytesIO()
    stream = io.TextIOWrapper(buf, encoding=encoding or "utf-8", errors="backslashreplace", write_through=True)
    render(what, Console(file=stream, width=width, color_system=None))
    return buf.getvalue().decode(encoding or "utf-8")


def test_right_to_left_prompts_keep_the_terminal_tables_columns_in_a_bidi_terminal(tmp_path, tiny_model_dir):
    """Arabic and Hebrew prompts, ids and --by groups: in a terminal that lays out bidirectional text (GNOME Terminal,
    Konsole), the Unicode bidi algorithm joined the spaces and border between an Arabic prompt and its Arabic trigger
    token into one right-to-left run and mirrored it: the row count '2' was drawn in the prompt's column, the
    trigger tokens left of the prompt, and in `memaudit diff` a Hebrew id took the prompt's column and the prompt the
    id's. Each line of a cell holding right-to-left letters now ends with a left-to-right mark (U+200E, no width),
    and so does each such trigger token (so it stays beside its mass): no border is in a right-to-left run, at any
    width, and the layout is otherwise the same. A console that cannot encode the mark gets none."""
    from audit.diff import diff_runs, render_terminal as render_diff
    from audit.report import build_report, render_terminal
    from helpers import run_audit

    prompts = ["قطة تجلس على سجادة حمراء", "חתול יושב על שטיח אדום", "a red cat", "כלב", "a blue dog"]
    ids = ["ع-1", "אבג-7", "c", "ד-4", "e"]
    apps = ["تطبيق", "אפליקציה", "x", "אפליקציה", "y"]
    pq.write_table(pa.table({"id": ids, "prompt": prompts, "app": apps}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ids[2:], "prompt": prompts[2:], "app": apps[2:]}), tmp_path / "old.parquet")
    new, _ = run_audit([tmp_path / "a.parquet"], tiny_model_dir, tmp_path / "new", id_column="id",
                       keep_columns=("app",), device="cpu")
    old, _ = run_audit([tmp_path / "old.parquet"], tiny_model_dir, tmp_path / "old", id_column="id", device="cpu")
    report = build_report(new, by=("app",))
    diff = diff_runs(old, new)
    outputs = {f"report at {w}": _terminal(render_terminal, report, w) for w in (50, 100, 160)}
    outputs["diff"] = _terminal(render_diff, diff, 120)
    for name, out in outputs.items():
        lines = out.split("\n")
        assert [(i, line) for i, line in enumerate(lines) if _borders_mirrored(line)] == [], name
    wide = outputs["report at 160"]
    row = next(line for line in wide.split("\n") if "ع-1" in line)
    assert row.count("\u200e") == 3 + 5 and row.split("│")[-3].strip() == "1"  # prompt, tokens, id; 5 tokens
    assert row.split("│")[-2].replace(" ", "") == "ع-1\u200e"
    cells = {c.replace(" ", "") for line in wide.split("\n") for c in line.split("│")}
    assert {"אבג-7\u200e", "تطبيق\u200e", "אפליקציה\u200e"} <= cells and "a red cat" in wide
    assert "\u200e" not in next(line for line in wide.split("\n") if "a red cat" in line)  # no mark without RTL
    narrow = outputs["report at 50"]  # one block a prompt: the token list alone marks its tokens
    tokens = next(line for line in narrow.split("\n") if line.startswith("tokens: ") and "\u200e" in line)
    assert tokens.count("\u200e (") == tokens.count(" (")
    # without the marks the report is the same, character for character
    unmarked = _terminal(render_terminal, report, 160).replace("\u200e", "")
    assert unmarked.split("\n")[3:] == [line.replace("\u200e", "") for line in wide.split("\n")][3:]
    ascii_out = _terminal(render_terminal, report, 160, encoding="ascii")
    assert "\\u05d0" in ascii_out and "\\u200e" not in ascii_out


def test_eval_names_the_rows_of_a_prompt_labelled_both_ways_when_they_print_alike(tmp_path, tiny_model_dir):
    """A labelled table holding 'café crème' composed (NFC) as memorized and decomposed (NFD) as ordinary: `memaudit
    eval` refused with "the prompt 'café crème' is labelled both memorized and ordinary", naming no row, and the two
    rows print alike, so the user searching the file saw no such pair. The refusal now names both rows and their
    labels, and says why two rows that differ are one prompt."""
    from typer.testing import CliRunner

    from audit.cli import app

    nfc = "café crème"
    prompts = ["a red cat", nfc, "a blue dog", unicodedata.normalize("NFD", nfc), "a green hat"]
    path = tmp_path / "labelled.parquet"
    pq.write_table(pa.table({"prompt": prompts, "memorized": [False, True, False, False, True]}), path)
    res = CliRunner().invoke(app, ["eval", str(path), "--model", str(tiny_model_dir), "--device", "cpu"])
    assert res.exit_code == 2
    assert res.output == (f"memaudit: error: {path}: the prompt 'café crème' is labelled both memorized and ordinary "
                          "(row 1 memorized, row 3 ordinary; 0-based data rows, whose text differs only in Unicode "
                          "normalization (NFC) or surrounding spaces, one prompt to memaudit)\n")
    pq.write_table(pa.table({"prompt": [*prompts[:3], "a red cat", "a green hat"],  # the same text twice
                             "memorized": [False, True, False, True, True]}), path)
    res = CliRunner().invoke(app, ["eval", str(path), "--model", str(tiny_model_dir), "--device", "cpu"])
    assert res.output == (f"memaudit: error: {path}: the prompt 'a red cat' is labelled both memorized and ordinary "
                          "(row 0 ordinary, row 3 memorized; 0-based data rows)\n")


def test_breakdown_groups_that_differ_only_in_unicode_normalization_are_told_apart(tmp_path, tiny_model_dir):
    """A kept column 'app' holding 'café' composed (NFC, a Linux client) and decomposed (NFD, a macOS one), and two
    log files named so: `memaudit report --by app` listed two groups 'café' with different counts (and two files
    'café.parquet'), which read as one group listed twice. Labels that differ only in normalization are now written
    with their characters beyond ASCII escaped, in the terminal, Markdown and the page; report.json keeps them as
    they are, and a label with no such twin prints as before."""
    import json

    from audit.report import build_report, render_html, render_markdown, render_terminal, render_json
    from helpers import run_audit

    nfc, nfd = "café", unicodedata.normalize("NFD", "café")
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog", "a green hat", "a pink cow"],
                             "app": [nfc, nfd, nfc, "thé"]}), tmp_path / f"{nfc}.parquet")
    pq.write_table(pa.table({"prompt": ["a tall tree"], "app": ["x"]}), tmp_path / f"{nfd}.parquet")
    run, manifest = run_audit([tmp_path], tiny_model_dir, tmp_path / "run", keep_columns=("app",), device="cpu")
    assert manifest["counts"]["scored"] == 5
    report = build_report(run, by=("app",))
    groups = {}
    for line in _terminal(render_terminal, report, 100).split("\n"):
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 9 and cells[2].isdigit():
            groups[cells[1]] = int(cells[2])
    assert groups == {"cafe\\u0301.parquet": 1, "caf\\u00e9.parquet": 4, "caf\\u00e9": 2, "cafe\\u0301": 1,
                      "thé": 1, "x": 1}
    md = render_markdown(report)
    assert "| caf\\\\u00e9 | 2 |" in md and "| cafe\\\\u0301 | 1 |" in md and "| thé | 1 |" in md
    page = render_html(report)
    assert "<td>caf\\u00e9</td>" in page and "<td>cafe\\u0301</td>" in page and "<td>thé</td>" in page
    by_app = json.loads(render_json(report))["breakdowns"][-1]
    assert {g["group"]: g["rows"] for g in by_app["groups"]} == {nfc: 2, nfd: 1, "thé": 1, "x": 1}


def test_a_json_line_holding_half_an_emoji_says_so(tmp_path, tiny_model_dir):
    """JSON lines from a client that cut a prompt between the two halves of an emoji's escape (``"\\ud83d"`` without
    its ``"\\ude00"``), and one whose id is such a half: both are invalid_utf8 rejects, as documented, but their
    ``detail`` was null and the exit-4 message said only "a file in another encoding than UTF-8? convert it, e.g.
    iconv -f latin1 -t utf-8", which does not apply to a UTF-8 file. The detail now names the escape, and the
    message says to look there."""
    import json

    import polars as pl
    from typer.testing import CliRunner

    from audit.cli import app

    lines = ['{"id": "a", "prompt": "a red cat"}', '{"id": "b", "prompt": "smile \\ud83d"}',
             '{"id": "c", "prompt": "a blue dog \\ud83d\\ude00"}', '{"id": "\\udfffd", "prompt": "a green hat"}']
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["run", str(tmp_path / "log.jsonl"), "--id-column", "id", "--model",
                                   str(tiny_model_dir), "--device", "cpu", "--out", str(tmp_path / "run"),
                                   "--no-progress"])
    assert res.exit_code == 4
    assert res.stderr.splitlines()[-1] == (
        "memaudit: error: 2 of 4 rows read (50.0%) could not be read as prompts (invalid_utf8 2), more than "
        "--max-error-fraction 0.01: the audit covers only part of its input (a file in another encoding than UTF-8? "
        "convert it, e.g. iconv -f latin1 -t utf-8; or JSON escapes of half an emoji (\\ud83d), named in "
        "rejects.parquet's detail; rejects.parquet names each row's file)")
    rejects = pl.read_parquet(tmp_path / "run" / "rejects.parquet").sort("row")
    half = ", half of a UTF-16 surrogate pair without its other half (an emoji or other character cut in two), " \
           "which is no character"
    assert rejects.select("prompt_id", "row", "reason", "detail", "prompt").rows() == [
        ("b", 1, "invalid_utf8", f"the prompt holds the JSON escape \\ud83d{half}", lines[1]),
        ("\\udfffd", 3, "invalid_utf8", f"the id holds the JSON escape \\udfff{half}", "a green hat")]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["counts"]["rejected_by_reason"] == {"invalid_utf8": 2} and manifest["counts"]["scored"] == 2
