"""Mutation review of session 48's changes (helper mnew48): ``memaudit run --dry-run`` (its counts, exit-4
forecast, run-folder states and exit codes), the several-prompt-columns reader, the report's and diff's new
outputs, and the confirm stage's --retry-failed. Each test pins a behaviour a hand-applied mutant changed without
any test failing, or a bug the review found."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from audit.cli import app


def _dry(*args):
    return CliRunner().invoke(app, ["run", *map(str, args), "--dry-run"])


def _run(*args):
    return CliRunner().invoke(app, ["run", *map(str, args), "--no-progress"])


def test_a_dry_run_counts_the_units_left_and_a_resumed_ray_run_is_not_split_again(tmp_path, tiny_model_dir):
    """A run folder of 2 units, one of whose commit markers is gone (a run killed mid-unit): the dry run says 1 of
    2 units committed, as the rerun finds (it scored the lost unit again); given --engine ray it does not say the
    units may be cut smaller (the rerun keeps the folder's units whatever the engine)."""
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog", "a green frog"]}), tmp_path / "a.parquet")
    out = tmp_path / "out"
    base = [tmp_path / "a.parquet", "--model", tiny_model_dir, "--device", "cpu", "--out", out, "--unit-rows", 2]
    assert _run(*base).exit_code == 0
    (out / "shards" / "unit-000001.done.json").unlink()
    res = _dry(*base, "--engine", "ray", "--workers", 2)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[1] == "inputs: 1 file (parquet 1): 3 rows in 2 units of work"
    assert lines[-1] == (f"--out {out}: holds this run, 1 of 2 units committed: the same command resumes it (the "
                         "model and score configuration are checked when it starts)")
    rerun = _run(*base)
    assert rerun.exit_code == 0 and "1 of 2 units already done" in rerun.stderr, rerun.output


def test_the_exit_4_forecast_takes_the_run_s_bound_and_counts_the_id_column(tmp_path, tiny_model_dir):
    """Exactly --max-error-fraction of the rows lacking the prompt column (1 of 2 at 0.5) is not too many: the run
    exits 0, and the dry run forecasts no exit 4. Rows lacking only the --id-column count toward the forecast as
    toward the run's exit 4 (1 of 3 rows)."""
    root = tmp_path / "one"
    root.mkdir()
    pq.write_table(pa.table({"prompt": ["a red cat"]}), root / "a.parquet")
    (root / "b.csv").write_text("caption\na blue dog\n")
    base = [root, "--model", tiny_model_dir, "--device", "cpu", "--max-error-fraction", "0.5"]
    res = _dry(*base, "--out", tmp_path / "n1")
    assert res.exit_code == 0, res.output
    assert "exit 4" not in res.stdout and res.stdout.splitlines()[-1] == f"--out {tmp_path / 'n1'}: a new run folder"
    assert _run(*base, "--out", tmp_path / "n1").exit_code == 0

    root = tmp_path / "two"
    root.mkdir()
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog"], "rid": ["r1", "r2"]}), root / "a.parquet")
    pq.write_table(pa.table({"prompt": ["a green frog"]}), root / "b.parquet")
    base = [root, "--model", tiny_model_dir, "--device", "cpu", "--id-column", "rid"]
    res = _dry(*base, "--out", tmp_path / "n2")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-2] == (
        "exit 4 expected: 1 of 3 rows (33.3%) to be rejected for want of the prompt or id column, more than "
        "--max-error-fraction 0.01: the run writes its outputs, then exits 4 (give the other name with "
        "--prompt-column, or raise --max-error-fraction)")
    assert _run(*base, "--out", tmp_path / "n2").exit_code == 4


def test_a_dry_run_names_the_model_folder_given_and_leaves_out_empty_txt_files(tmp_path, tiny_model_dir):
    """--model <folder> is named as given, --model lab as the bundled model; an empty .txt file beside the logs
    (no line, so no prompt read from it) is not counted among the .txt files whose lines are prompts, while one
    with a line is."""
    pq.write_table(pa.table({"prompt": ["a red cat"]}), tmp_path / "a.parquet")
    (tmp_path / "empty.txt").write_text("")
    res = _dry(tmp_path / "a.parquet", tmp_path / "empty.txt", "--model", tiny_model_dir, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[2:4] == [
        "prompt column: 'prompt' in 1 file",
        f"model: {tiny_model_dir}: family sd1; its identity and weights are read when the run starts"]
    (tmp_path / "one.txt").write_text("a blue dog\n")
    res = _dry(tmp_path / "a.parquet", tmp_path / "empty.txt", tmp_path / "one.txt", "--model", "lab",
               "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[2:4] == [
        "prompt column: 'prompt' in 1 file; 1 .txt file: each line a prompt, no columns",
        "model: lab (bundled): family sd1; its identity and weights are read when the run starts"]


def test_the_id_column_line_warns_that_json_lines_are_judged_line_by_line(tmp_path, tiny_model_dir):
    """--id-column over JSON-lines logs: a file none of whose lines has the id counts whole (1 row); a file some of
    whose lines lack it is judged line by line, which the id line says (the run rejects 2 rows: one of each)."""
    import json

    root = tmp_path / "logs"
    root.mkdir()
    (root / "a.jsonl").write_text(json.dumps({"prompt": "a red cat", "rid": "r1"}) + "\n"
                                  + json.dumps({"prompt": "a blue dog"}) + "\n")
    (root / "b.jsonl").write_text(json.dumps({"prompt": "a green frog"}) + "\n")
    base = [root, "--id-column", "rid", "--model", tiny_model_dir, "--device", "cpu", "--max-error-fraction", "1"]
    res = _dry(*base, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[2:4] == [
        "prompt column: 2 JSON-lines files: judged line by line",
        "id column 'rid': not in 1 file with prompts (1 row to be rejected as missing_id_column); JSON lines: each "
        "line without it is rejected as missing_id_column"]
    from audit.config import RunConfig
    from audit.runner import execute

    cfg = RunConfig(inputs=(str(root),), model=str(tiny_model_dir), out=str(tmp_path / "out"), device="cpu",
                    id_column="rid", max_error_fraction=1.0)
    assert execute(cfg, progress=False, log=lambda _: None)[1]["counts"]["rejected_by_reason"] == {
        "missing_id_column": 2}


def test_the_separator_and_comma_notes_speak_only_for_a_wanted_name(tmp_path):
    """The note on a header separated by ';' finds a wanted name quoted in it ('id;"prompt"', as a spreadsheet
    quotes it), and says nothing for a column holding a ';' but no wanted name; the note on names joined by a comma
    is given only when a part is a column found."""
    import pytest

    from audit import sources
    from audit.errors import SourceError

    note = (" The column 'id;\"prompt\"' is a whole header separated by ';' (a spreadsheet export in a locale whose "
            "list separator is not a comma?): memaudit reads CSV separated by commas; export the file with commas.")
    assert sources.near_name_note(["prompt"], ['id;"prompt"']) == note
    assert sources.near_name_note(["prompt"], ["a;b", "c\td", "e|f"]) == ""
    pq.write_table(pa.table({"text": ["a red cat"], "user": ["u1"]}), tmp_path / "a.parquet")
    files, _ = sources.discover([str(tmp_path / "a.parquet")])
    with pytest.raises(SourceError) as exc:
        sources.plan_units(files, "caption,title")
    assert str(exc.value) == ("no input has the prompt column 'caption,title'; columns found: text, user. Choose one "
                              "with --prompt-column.")


def _with_names(run, names):
    """``run``'s manifest recording ``names`` as its --prompt-column (a string or a list, as run.json keeps them)."""
    import json

    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps(manifest | {"run_config": {"prompt_column": names}}))
    return run


def test_the_diff_warns_of_other_prompt_names_past_the_first_and_not_of_one_name_spelled_twice(tmp_path):
    """Runs read under 'prompt' or 'text' and under 'prompt' or 'caption' read other rows' prompts (a row empty in
    'prompt' reads the second name): the diff warns though the first names agree. One name recorded as a string
    and as a one-name list is the same name: no warning."""
    from audit.diff import diff_runs
    from test_report_mutants import make_run

    old = _with_names(make_run(tmp_path / "old", [("a", 1.0)]), ["prompt", "text"])
    new = _with_names(make_run(tmp_path / "new", [("a", 1.0)]), ["prompt", "caption"])
    assert diff_runs(old, new).flag_warnings == [
        "the runs read their prompts under different --prompt-column names ('prompt' or 'text' vs 'prompt' or "
        "'caption'): a prompt new or gone may be a row read from another column or rejected (rejects.parquet), not a "
        "change in the inputs"]
    one = _with_names(make_run(tmp_path / "one", [("a", 1.0)]), "prompt")
    listed = _with_names(make_run(tmp_path / "listed", [("a", 1.0)]), ["prompt"])
    assert diff_runs(one, listed).flag_warnings == []


def test_the_new_and_gone_lists_show_flags_of_their_own_run_only(tmp_path):
    """An uncalibrated old night and a calibrated new one: the new prompts list has the new run's flags (FLAG for d,
    blank for e), the gone prompts list no flag column (the old run has no flags); and the other way round."""
    from audit.diff import diff_runs, render_markdown as diff_md
    from test_report_mutants import make_run

    old = make_run(tmp_path / "old", [("a", 3.0), ("b", 2.0)])
    new = make_run(tmp_path / "new", [("d", 5.0), ("b", 2.0), ("e", 0.5)], threshold=2.5)
    md = diff_md(diff_runs(old, new))
    assert ("| rank | risk | flagged | rows | prompt | prompt\\_id |\n|---|---|---|---|---|---|\n"
            "| 1 | 5.00000 | FLAG | 1 | d | in/a.parquet\\#0 |\n| 3 | 0.50000 |  | 1 | e | in/a.parquet\\#2 |\n") in md
    assert ("| old rank | old risk | rows | prompt | prompt\\_id |\n|---|---|---|---|---|\n"
            "| 1 | 3.00000 | 1 | a | in/a.parquet\\#0 |\n") in md
    md = diff_md(diff_runs(new, old))
    assert ("| rank | risk | rows | prompt | prompt\\_id |\n|---|---|---|---|---|\n"
            "| 1 | 3.00000 | 1 | a | in/a.parquet\\#0 |\n") in md
    assert ("| old rank | old risk | old flagged | rows | prompt | prompt\\_id |\n|---|---|---|---|---|---|\n"
            "| 1 | 5.00000 | FLAG | 1 | d | in/a.parquet\\#0 |\n| 3 | 0.50000 |  | 1 | e | in/a.parquet\\#2 |\n") in md


def test_the_report_gates_a_run_whose_manifest_records_no_fraction_at_the_default(tmp_path):
    """A manifest without run_config (a folder written before the option was recorded) is judged under the default
    --max-error-fraction 0.01: 1 row of 10 lacking the prompt column is more (the run exited 4), and the report
    says so; 0 such rows, no warning."""
    import json

    from audit.report import build_report
    from test_report_mutants import make_run

    run = make_run(tmp_path / "r", [(f"p{i}", float(i)) for i in range(9)],
                   rejects=[("in/b.csv", "missing_prompt_column")])
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["counts"]["rejected_by_reason"] = {"missing_prompt_column": 1}
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert build_report(run).warnings == [
        "the run failed (exit 4): 1 of 10 rows read (10.0%) could not be read as prompts (missing_prompt_column 1), "
        "more than --max-error-fraction 0.01: the audit covers only part of its input (a file with another prompt "
        "column? --prompt-column; rejects.parquet names each row's file)"]
    (run / "manifest.json").write_text(json.dumps(manifest | {"run_config": {"max_error_fraction": 0.1}}))
    assert build_report(run).warnings == []


def test_a_confirm_part_row_with_a_null_score_is_unconfirmed_and_retried(tmp_path, tiny_model_dir):
    """A confirm/ part whose score for one prompt is null (a part edited, or written by a tool that keeps NaN as
    null): the rerun takes it as a non-finite score (2 of 3 confirmed, a note), not a crash; --retry-failed scores
    that prompt again (3 of 3)."""
    import json

    from tests.test_cascade import _run

    out = tmp_path / "out"

    def rerun(*extra):
        res = _run(tmp_path, tiny_model_dir, out, "--confirm", "noise_magnitude", "--confirm-top", "3", *extra)
        assert res.exit_code == 0, res.output
        c = json.loads((out / "manifest.json").read_text())["confirm"]
        return res.output, (c["unique_prompts_confirmed"], c["resumed_prompts"], c["scored_prompts"])

    assert rerun()[1] == (3, 0, 3)
    (part,) = (out / "confirm").glob("part-*.parquet")
    table = pq.read_table(part)
    i = table.schema.get_field_index("noise_magnitude")
    values = table.column(i).to_pylist()
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array([None, *values[1:]], pa.float64())), part)
    text, counts = rerun()
    assert counts == (2, 3, 0)
    assert ("1 prompt of the confirm/ stage had a non-finite noise_magnitude score and stays unconfirmed; "
            "--retry-failed scores it again") in text
    text, counts = rerun("--retry-failed")
    assert counts == (3, 2, 1)


def test_a_dry_run_counts_neither_invalid_json_lines_nor_spares_txt_lines_without_the_id(tmp_path, tiny_model_dir):
    """A JSON-lines file of lines that are not JSON has no columns: its rows are invalid_json rejects, not rows
    lacking the prompt column (no exit 4 forecast for them). A .txt file beside Parquet logs read with
    --prompt-column text and --id-column rid has no id: its 2 lines are counted as the run rejects them,
    missing_id_column."""
    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"text": ["a red cat", "a blue dog"], "rid": ["r1", "r2"]}), root / "a.parquet")
    (root / "b.jsonl").write_text("not json\nnor this\n")
    base = [root, "--prompt-column", "text", "--model", tiny_model_dir, "--device", "cpu"]
    res = _dry(*base, "--out", tmp_path / "o1", "--max-error-fraction", "1")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[2] == "prompt column: 'text' in 1 file; 1 JSON-lines file: judged line by line"
    (root / "b.jsonl").unlink()
    (root / "c.txt").write_text("an old tower\na small house\n")
    res = _dry(*base, "--id-column", "rid", "--out", tmp_path / "o2", "--max-error-fraction", "1")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[3] == (
        "id column 'rid': not in 1 file with prompts (2 rows to be rejected as missing_id_column)")
    from audit.config import RunConfig
    from audit.runner import execute

    cfg = RunConfig(inputs=(str(root),), model=str(tiny_model_dir), out=str(tmp_path / "o2"), device="cpu",
                    prompt_column="text", id_column="rid", max_error_fraction=1.0)
    assert execute(cfg, progress=False, log=lambda _: None)[1]["counts"]["rejected_by_reason"] == {
        "missing_id_column": 2}


def test_several_names_are_read_in_the_order_given_whatever_the_file_s_column_order(tmp_path):
    """A Parquet file, a CSV and JSON lines whose columns (keys) come 'text' then 'prompt', both filled:
    --prompt-column prompt --prompt-column text reads 'prompt' (the names' order), and the names the other way
    round read 'text'; a row with 'prompt' empty reads 'text' either way."""
    from audit import sources

    pq.write_table(pa.table({"text": ["old cat", "old dog"], "prompt": ["a red cat", None]}), tmp_path / "a.parquet")
    (tmp_path / "b.csv").write_text("text,prompt\nold cat,a red cat\nold dog,\n")
    (tmp_path / "c.jsonl").write_text('{"text": "old cat", "prompt": "a red cat"}\n{"text": "old dog", "prompt": ""}\n')
    for name in ("a.parquet", "b.csv", "c.jsonl"):
        for names, want in ((("prompt", "text"), ["a red cat", "old dog"]),
                            (("text", "prompt"), ["old cat", "old dog"])):
            files, _ = sources.discover([str(tmp_path / name)])
            plan = sources.plan_units(files, names)
            got = [p for u in plan.units for b in sources.read_unit(u, names) for p in b.prompts]
            assert got == want, (name, names)


def test_the_refusal_names_a_near_spelling_of_the_second_name(tmp_path):
    """No input has 'prompt' or 'text', one has 'Text': the refusal says it differs from 'text' only in case."""
    import pytest

    from audit import sources
    from audit.errors import SourceError

    pq.write_table(pa.table({"Text": ["a red cat"]}), tmp_path / "a.parquet")
    files, _ = sources.discover([str(tmp_path / "a.parquet")])
    with pytest.raises(SourceError) as exc:
        sources.plan_units(files, ("prompt", "text"))
    assert str(exc.value) == (
        "no input has any of the prompt columns 'prompt', 'text'; columns found: Text. Choose one with "
        "--prompt-column. The column 'Text' differs from 'text' only in spaces or case: give the name exactly as the "
        "file has it (quoted), or fix the header.")


def test_a_csv_with_a_ragged_row_and_no_id_column_rejects_its_rows_as_missing_id_column(tmp_path, tiny_model_dir):
    """--id-column rid over a Parquet file that has it and a CSV that does not, with one row holding an unquoted
    comma (the CSV is then read record by record): the CSV's other rows were rejected as null_id, not
    missing_id_column as the columnar reader (and the run's warning and --dry-run) call them, so they escaped the
    --max-error-fraction gate and the run exited 0 with 2 of its 4 rows unaudited. They are missing_id_column
    now, and the run exits 4."""
    from audit import sources

    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"prompt": ["a red cat"], "rid": ["r1"]}), root / "a.parquet")
    (root / "b.csv").write_text('prompt\n"a blue dog"\na green, frog\nan old tower\n')
    files, _ = sources.discover([str(root)])
    plan = sources.plan_units(files, "prompt", id_column="rid")
    batches = [b for u in plan.units if u.url.endswith("b.csv") for b in sources.read_unit(u, "prompt", "rid")]
    assert [b.ids for b in batches] == [None]
    assert [e for b in batches for e in b.errors] == [None, "invalid_csv_row", None]
    from audit.config import RunConfig
    from audit.runner import execute

    cfg = RunConfig(inputs=(str(root),), model=str(tiny_model_dir), out=str(tmp_path / "o1"), device="cpu",
                    id_column="rid", max_error_fraction=1.0)
    assert execute(cfg, progress=False, log=lambda _: None)[1]["counts"]["rejected_by_reason"] == {
        "invalid_csv_row": 1, "missing_id_column": 2}
    res = _run(root, "--id-column", "rid", "--model", tiny_model_dir, "--device", "cpu", "--out", tmp_path / "o2",
               "--max-error-fraction", "0.4")
    assert res.exit_code == 4, res.output


def test_the_txt_warning_leaves_out_empty_txt_files(tmp_path):
    """--prompt-column text over Parquet logs beside an empty notes.txt: no line of it is read, so no warning that
    .txt lines are scored whatever --prompt-column says; with a line in it, the warning names it."""
    from audit import sources
    from audit.runner import txt_column_note

    pq.write_table(pa.table({"text": ["a red cat"]}), tmp_path / "a.parquet")
    (tmp_path / "notes.txt").write_text("")
    files, _ = sources.discover([str(tmp_path)])
    assert txt_column_note(sources.plan_units(files, "text"), "text") is None
    (tmp_path / "notes.txt").write_text("a blue dog\n")
    files, _ = sources.discover([str(tmp_path)])
    assert txt_column_note(sources.plan_units(files, "text"), "text") == (
        "1 input file is .txt, one prompt a line with no columns: its lines are scored as prompts, whatever "
        f"--prompt-column 'text' says (the first: {tmp_path / 'notes.txt'})")


def test_a_ragged_row_of_a_csv_without_the_prompt_column_is_missing_prompt_column_with_or_without_an_id(
        tmp_path, tiny_model_dir):
    """A CSV without the prompt column whose second row holds an unquoted comma: without --id-column its rows are
    not read (both missing_prompt_column, as the warning and --dry-run count them); with --id-column the file was
    read and the ragged row became invalid_csv_row, so the reasons, and the --max-error-fraction gate, depended on
    an unrelated option. Both rows are missing_prompt_column either way now."""
    from audit.config import RunConfig
    from audit.runner import execute

    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog"], "rid": ["r1", "r2"]}), root / "a.parquet")
    (root / "b.csv").write_text('caption,rid\n"a green frog",3\nan old, tower,4\n')
    for i, id_column in enumerate((None, "rid")):
        cfg = RunConfig(inputs=(str(root),), model=str(tiny_model_dir), out=str(tmp_path / f"o{i}"), device="cpu",
                        id_column=id_column, max_error_fraction=1.0)
        manifest = execute(cfg, progress=False, log=lambda _: None)[1]
        assert manifest["counts"]["rejected_by_reason"] == {"missing_prompt_column": 2}, id_column
        rejects = pq.read_table(tmp_path / f"o{i}" / "rejects.parquet").to_pylist()
        assert [(r["row"], r["reason"], r["prompt"]) for r in rejects] == [(0, "missing_prompt_column", None),
                                                                             (1, "missing_prompt_column", None)]


def test_the_second_name_s_bytes_that_are_not_utf8_are_its_own_reject(tmp_path):
    """A Parquet file whose 'prompt' is null and whose 'text' (binary) holds bytes that are not UTF-8: the row
    reads 'text' and is rejected as invalid_utf8 with the bytes escaped, as with 'text' alone; a row whose 'prompt'
    holds text reads it."""
    from audit import sources

    pq.write_table(pa.table({"prompt": pa.array([None, "a red cat"], pa.string()),
                             "text": pa.array([b"bad \xff", b"old"], pa.binary())}), tmp_path / "a.parquet")
    files, _ = sources.discover([str(tmp_path / "a.parquet")])
    names = ("prompt", "text")
    plan = sources.plan_units(files, names)
    got = [(p, e) for u in plan.units for b in sources.read_unit(u, names) for p, e in zip(b.prompts, b.errors)]
    assert got == [("bad \\xff", "invalid_utf8"), ("a red cat", None)]


def test_a_dry_run_over_only_unreadable_files_says_the_run_will_exit_4(tmp_path, tiny_model_dir):
    """--skip-bad-files over a night whose every Parquet file is cut short: the run reads nothing, writes its empty
    outputs and exits 4 (nothing_scored), but the dry run exited 0 with no word of it. It now forecasts exit 4; a
    night with a readable file beside them gets no such line."""
    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog"]}), tmp_path / "whole.parquet")
    for name in ("b.parquet", "c.parquet"):
        (root / name).write_bytes((tmp_path / "whole.parquet").read_bytes()[:100])
    base = [root, "--skip-bad-files", "--model", tiny_model_dir, "--device", "cpu"]
    res = _dry(*base, "--out", tmp_path / "o1")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-2:] == [
        "exit 4 expected: every input file with rows is unreadable (2 files skipped under --skip-bad-files, above): "
        "nothing is read or scored; the run writes its outputs, then exits 4",
        f"--out {tmp_path / 'o1'}: a new run folder"]
    assert _run(*base, "--out", tmp_path / "o1").exit_code == 4
    (root / "a.parquet").write_bytes((tmp_path / "whole.parquet").read_bytes())
    res = _dry(*base, "--out", tmp_path / "o2")
    assert res.exit_code == 0 and "exit 4" not in res.stdout, res.output


def test_every_diff_table_header_escapes_prompt_id_alike(tmp_path):
    """The newly-flagged and rank-rise tables' headers read `prompt_id` where the no-longer-flagged, new and gone
    tables' read `prompt\\_id` (both render alike on GitHub, but one diff's headers were spelled two ways)."""
    from audit.diff import diff_runs, render_markdown as diff_md
    from test_report_mutants import make_run

    # "e" is gone, so the gone table has rows (an empty table is the line None.: diff._escaped_table)
    old = make_run(tmp_path / "old", [("a", 3.0), ("b", 2.0), ("c", 1.0), ("e", 0.1)], threshold=2.5)
    new = make_run(tmp_path / "new", [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 0.5)], threshold=2.5)
    md = diff_md(diff_runs(old, new)).splitlines()
    heads = [line for line in md if line.startswith("| ") and "prompt" in line]
    assert heads == ["| rank | risk | old rank | old risk | status | rows | prompt | prompt\\_id |",
                     "| rise | old rank | new rank | old risk | new risk | rows | prompt | prompt\\_id |",
                     "| old rank | old risk | rank | risk | rows | prompt | prompt\\_id |",
                     "| rank | risk | flagged | rows | prompt | prompt\\_id |",
                     "| old rank | old risk | old flagged | rows | prompt | prompt\\_id |"]
