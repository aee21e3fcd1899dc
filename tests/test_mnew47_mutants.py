"""Mutation review of session 47's changes (helper mnew47): several prompt column names, --retry-failed for the
--confirm stage, the report's breakdowns past MAX_GROUPS, and the prediction_type warning. Each test pins a
behaviour a hand-applied mutant changed without any test failing, or a bug the review found."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq

from audit import sources

NAMES = ("prompt", "text")


def _read(path, names=NAMES, unit_rows=1000):
    """Every row of one input file as ``(row, prompt, error)``, through plan_units and read_unit."""
    files, _ = sources.discover([str(path)])
    plan = sources.plan_units(files, names, unit_rows=unit_rows)
    return [(r, p, e) for u in plan.units for b in sources.read_unit(u, names)
            for r, p, e in zip(b.rows, b.prompts, b.errors)]


def test_a_null_first_name_reads_the_second_in_every_format(tmp_path):
    """A writer that renamed 'prompt' to 'text' and still writes the old key or column empty: each row reads the
    first name holding a value. They were read from the first name present and rejected as null prompts (a whole
    Parquet file of them), though the text was there. An empty (or blank) JSON or Parquet string holds no value
    either: the next name is read (tests/test_uschema_findings.py); a CSV's empty field is null, in both CSV
    readers; a row null in both is a null prompt."""
    lines = [{"prompt": None, "text": "a red cat"}, {"text": "a blue dog", "prompt": None},
             {"prompt": "first", "text": "second"}, {"prompt": None, "text": None}, {"prompt": "", "text": "x"},
             {"prompt": None}]
    want = [(0, "a red cat", None), (1, "a blue dog", None), (2, "first", None), (3, None, None), (4, "x", None),
            (5, None, None)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(o) + "\n" for o in lines))
    assert _read(tmp_path / "a.jsonl") == want
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(o) + "\n" for o in lines))
    assert _read(tmp_path / "b.jsonl.gz") == want
    pq.write_table(pa.table({"prompt": pa.array([None, None], pa.string()), "text": ["old city", "a house"]}),
                   tmp_path / "c.parquet")
    assert _read(tmp_path / "c.parquet") == [(0, "old city", None), (1, "a house", None)]
    pq.write_table(pa.table({"prompt": pa.nulls(2), "text": ["old city", None]}), tmp_path / "d.parquet")
    assert _read(tmp_path / "d.parquet") == [(0, "old city", None), (1, None, None)]
    pq.write_table(pa.table({"prompt": [None, 7, None], "text": ["a", "b", None],
                             "other": ["x", "y", "z"]}), tmp_path / "e.parquet")
    assert _read(tmp_path / "e.parquet") == [(0, "a", None), (1, None, "prompt_not_string:int64"), (2, None, None)]
    (tmp_path / "f.csv").write_text("prompt,text\n,a red cat\nfirst,second\n,\n")
    assert _read(tmp_path / "f.csv") == [(0, "a red cat", None), (1, "first", None), (2, None, None)]
    (tmp_path / "g.csv").write_text("prompt,text\n,a red cat\nfirst,second\n,\na, ragged, row\n")
    assert _read(tmp_path / "g.csv") == [(0, "a red cat", None), (1, "first", None), (2, None, None),
                                         (3, "a, ragged, row", "invalid_csv_row")]


def _plan(*paths, names=NAMES, **kw):
    files, _ = sources.discover([str(p) for p in paths])
    return sources.plan_units(files, names, **kw)


def test_any_of_the_names_is_enough_and_the_notes_count_the_files_lacking_all(tmp_path):
    """Inputs holding only the first name, or only the second, are not refused; the warnings about files lacking
    the prompt column count a file (JSON lines included) only when it has none of the names, the --id-column one
    counts a file that has the second name and no id, and the .txt one speaks for any names but 'prompt' alone."""
    from audit.runner import missing_column_note, missing_id_column_note, txt_column_note

    (tmp_path / "p.csv").write_text("prompt\na red cat\n")
    (tmp_path / "t.jsonl").write_text('{"text": "a blue dog"}\n{"text": "an old tower"}\n')
    (tmp_path / "n.jsonl").write_text('{"caption": "x"}\n')
    (tmp_path / "l.txt").write_text("a line\n")
    for only in ("p.csv", "t.jsonl"):
        assert _plan(tmp_path / only).file_rows == {str(tmp_path / only): 1 if only == "p.csv" else 2}
    plan = _plan(tmp_path / "p.csv", tmp_path / "t.jsonl")
    assert missing_column_note(plan, NAMES) is None
    plan = _plan(tmp_path / "p.csv", tmp_path / "t.jsonl", tmp_path / "n.jsonl")
    assert missing_column_note(plan, NAMES) == (
        f"1 of 3 input files has no column 'prompt' or 'text', so its 1 row is rejected as missing_prompt_column (or "
        f"as invalid_json, invalid_utf8 or prompt_not_string, a JSON line that is that first); "
        f"the first: {tmp_path / 'n.jsonl'} (columns: caption)")
    (tmp_path / "i.csv").write_text("prompt,id\na red cat,7\n")
    plan = _plan(tmp_path / "i.csv", tmp_path / "t.jsonl", id_column="id")
    assert missing_id_column_note(plan, "id", NAMES) == (
        f"1 of 2 input files has no column 'id', so its 2 rows are rejected as missing_id_column (or as "
        f"invalid_json, invalid_utf8 or prompt_not_string, a JSON line that is that first); "
        f"the first: {tmp_path / 't.jsonl'} (columns: text)")
    plan = _plan(tmp_path / "p.csv", tmp_path / "l.txt")
    assert txt_column_note(plan, NAMES) == (
        "1 input file is .txt, one prompt a line with no columns: its lines are scored as prompts, whatever "
        f"--prompt-column 'prompt' or 'text' says (the first: {tmp_path / 'l.txt'})")
    assert txt_column_note(plan, "prompt") is None


def test_the_second_name_first_met_late_in_a_json_lines_file_is_found(tmp_path):
    """A JSON-lines file whose first 100 lines have neither name and whose 101st has the second: the plan finds
    the key past its probe, so the file is not refused as having no prompt column; its rows read 100
    missing_prompt_column rejects and the one prompt."""
    (tmp_path / "late.jsonl").write_text('{"other": 1}\n' * 100 + '{"text": "a red cat"}\n')
    rows = _read(tmp_path / "late.jsonl")
    assert rows[:100] == [(i, None, "missing_prompt_column") for i in range(100)]
    assert rows[100:] == [(100, "a red cat", None)]


def test_a_header_repeating_the_second_name_is_refused(tmp_path):
    """A CSV header naming the second prompt column twice is refused as ambiguous, as the first name twice is:
    a row whose first column is empty would read the second, and which of the two?"""
    import pytest

    from audit.errors import SourceError

    (tmp_path / "d.csv").write_text("prompt,text,text\na red cat,x,y\n")
    with pytest.raises(SourceError, match="the column name\\(s\\) 'text' appear more than once in its header"):
        _plan(tmp_path / "d.csv")


def test_a_run_whose_workers_load_the_model_warns_from_the_driver(tmp_path, tiny_model_dir, monkeypatch):
    """execute() with an engine whose workers load the model (ray; here a stand-in that stops the run where the
    workers would start) logs the prediction_type warning once before scoring, read from the config files: the
    driver loads no model, so nothing else would say it."""
    import shutil
    import types

    import pytest

    import audit.engines
    from audit.config import RunConfig
    from audit.runner import execute

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    path = model / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"prediction_type": "v-prediction"}))
    (tmp_path / "p.txt").write_text("a red cat\n")

    class Started(Exception):
        pass

    def run(job):
        raise Started

    monkeypatch.setattr(audit.engines, "get_engine", lambda name: types.SimpleNamespace(IN_PROCESS=False, run=run))
    lines: list[str] = []
    cfg = RunConfig(inputs=(str(tmp_path / "p.txt"),), model=str(model), out=str(tmp_path / "out"), device="cpu",
                    engine="ray")
    with pytest.raises(Started):
        execute(cfg, progress=False, log=lines.append)
    assert [line for line in lines if "prediction_type" in line] == [
        "memaudit: warning: the model's scheduler config names prediction_type 'v-prediction', none of epsilon, "
        "v_prediction, sample: --scorer attention_entropy reads cross-attention only and scores it, but check the "
        "spelling in scheduler/scheduler_config.json (a sampler refuses it: memaudit generate, mitigation)"]


def test_past_max_groups_a_file_of_rejects_only_and_ties_give_way(tmp_path, monkeypatch):
    """Past MAX_GROUPS (3 here) the groups dropped are those with no max risk (a file whose rows were all rejected)
    before any scored one, and of two files at the same max risk the one first by name is kept; the shown files
    are then listed by name, while a --by breakdown stays riskiest first."""
    import audit.report
    from audit.report import build_report
    from tests.test_report_mutants import make_run

    monkeypatch.setattr(audit.report, "MAX_GROUPS", 3)
    rows = [("p1", 1.0, "logs/a.parquet"), ("p2", 5.0, "logs/c.parquet"), ("p3", 3.0, "logs/e.parquet"),
            ("p4", 3.0, "logs/d.parquet"), ("p5", 3.0, "logs/f.parquet")]
    r = build_report(make_run(tmp_path / "r", rows, rejects=[("logs/b.parquet", "null_prompt")],
                              extra={"user": ["z1", "z9", "z3", "z4", "z5"]}), by=("user",))
    assert r.breakdowns[0][2]["source"].to_list() == ["logs/c.parquet", "logs/d.parquet", "logs/e.parquet"]
    assert r.breakdowns[1][2]["user"].to_list() == ["z9", "z3", "z4"]
    assert r.truncated_groups == {0: 3, 1: 2}
    from rich.console import Console

    from audit.report import render_terminal

    console = Console(record=True, width=200, color_system=None)
    render_terminal(r, console)
    text = console.export_text()
    assert "... 3 more groups (those shown have the highest max risk)" in text
    assert "... 2 more groups (those shown have the highest max risk)" in text


def test_the_finite_confirm_row_wins_in_either_part_order(tmp_path, tiny_model_dir, tiny_model, monkeypatch):
    """The third of the top 3 confirmed prompts comes out non-finite. A rerun confirming the top 2 only says
    nothing about it (it is not among those chosen); --retry-failed with the top 3 scores it alone again; then the
    part holding its finite row is put first, then last, by name, and each rerun still confirms all 3 with no
    note (the part files' names are random, so which one sorted first was left to chance)."""
    import numpy as np

    from audit.scorers import ScoreConfig, Scorer
    from tests.test_cascade import LINES, _run

    distinct = list(dict.fromkeys(LINES))
    ae = Scorer(tiny_model, ScoreConfig("attention_entropy", tuple(tiny_model.default_layers))).score(distinct)["risk"]
    third = sorted(distinct, key=lambda p: -ae[distinct.index(p)])[2]
    real = Scorer.score
    fault = {"on": True}

    def flag_third(self, prompts, tokens=None):
        out = real(self, prompts, tokens)
        if self.spec.name == "noise_magnitude" and fault["on"]:
            out["nonfinite"] = np.array([p == third for p in prompts]) | out["nonfinite"]
        return out

    monkeypatch.setattr(Scorer, "score", flag_third)
    out = tmp_path / "out"

    def rerun(top, *extra):
        res = _run(tmp_path, tiny_model_dir, out, "--confirm", "noise_magnitude", "--confirm-top", top, *extra)
        assert res.exit_code == 0, res.output
        c = json.loads((out / "manifest.json").read_text())["confirm"]
        return res.output, (c["unique_prompts_confirmed"], c["nonfinite"], c["resumed_prompts"], c["scored_prompts"])

    assert rerun("3")[1] == (2, 1, 0, 3)
    fault["on"] = False
    text, counts = rerun("2")
    assert counts == (2, 0, 2, 0) and "non-finite" not in text
    text, counts = rerun("3", "--retry-failed")
    assert counts == (3, 0, 2, 1) and "1 prompt of the confirm/ stage had a non-finite" in text
    parts = sorted((out / "confirm").glob("part-*.parquet"), key=lambda f: pq.read_table(f).num_rows)
    assert [pq.read_table(f).num_rows for f in parts] == [1, 3]
    for i, finite_first in enumerate((True, False)):
        one, three = parts
        parts = [one.rename(out / "confirm" / f"part-{'0' if finite_first else 'f'}{i}.parquet"),
                 three.rename(out / "confirm" / f"part-{'f' if finite_first else '0'}{i}.parquet")]
        first = sorted(f.name for f in (out / "confirm").glob("part-*.parquet"))[0]
        assert first == parts[0 if finite_first else 1].name
        text, counts = rerun("3")
        assert counts == (3, 0, 3, 0) and "non-finite" not in text


def test_a_config_with_no_prompt_column_name_is_refused_before_any_input_is_read(tmp_path):
    """RunConfig(prompt_column=()) (the Python API past audit.run's checks) is refused by validate_config in the
    one line asking for a name, not later as 'no input has any of the prompt columns ;'; so is a blank name."""
    import pytest

    from audit.config import RunConfig, validate_config
    from audit.errors import RunError

    with pytest.raises(RunError, match=r"^--prompt-column: give a column name \(again for files that name the "
                                       r"column otherwise: --prompt-column prompt --prompt-column text\)$"):
        validate_config(RunConfig(inputs=(str(tmp_path),), prompt_column=()))
    with pytest.raises(RunError, match=r"^--prompt-column: give a column name"):  # a name of spaces is no name
        validate_config(RunConfig(inputs=(str(tmp_path),), prompt_column=("prompt", "  ")))


def test_a_run_scores_a_renamed_column_and_warns_only_of_the_file_blank_in_both(tmp_path, tiny_model_dir):
    """End to end: a Parquet file whose 'prompt' column is null throughout and whose 'text' holds the prompts is
    scored (it was rejected whole as null_prompt, and the blank-file warning named it); a file null in both
    columns is the one the warning names, with both names."""
    from audit.config import RunConfig
    from audit.runner import execute

    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"prompt": pa.array([None, None], pa.string()), "text": ["old city", "a house"]}),
                   root / "a.parquet")
    pq.write_table(pa.table({"prompt": pa.array([None, None], pa.string()), "text": pa.array([None, None],
                                                                                             pa.string())}),
                   root / "b.parquet")
    (root / "c.jsonl").write_text('{"prompt": "a red cat"}\n')
    lines: list[str] = []
    cfg = RunConfig(inputs=(str(root),), model=str(tiny_model_dir), out=str(tmp_path / "out"), device="cpu",
                    prompt_column=NAMES, max_error_fraction=1.0)
    manifest = execute(cfg, progress=False, log=lines.append)[1]
    c = manifest["counts"]
    assert (c["rows_read"], c["scored"], c["rejected"], c["rejected_by_reason"]) == (5, 3, 2, {"null_prompt": 2})
    assert sorted(pq.read_table(tmp_path / "out" / "risk.parquet")["prompt"].to_pylist()) == [
        "a house", "a red cat", "old city"]
    assert [line for line in lines if "no text in column" in line] == [
        "memaudit: warning: 1 of 3 input files has no text in column 'prompt' or 'text' on any row (2 rows rejected "
        f"as null_prompt or empty_prompt), where the other files have prompts: a renamed or emptied column? the "
        f"first: {root / 'b.parquet'}"]
