"""Findings of a data engineer's trial of ``--prompt-column`` given several times and ``memaudit run --dry-run`` over a
prompt-log bucket whose schema drifted (``text`` renamed ``prompt``; Parquet, gzipped JSON lines, spreadsheet CSV):
each test fails on the code before its fix."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from audit.sources import Unit, read_unit


def _read(path, fmt, rows, names):
    """``(prompts, errors)`` of every row of one file read as one unit under the prompt ``names``."""
    prompts, errors = [], []
    for batch in read_unit(Unit(0, str(path), fmt, 0, rows), tuple(names)):
        prompts += batch.prompts
        errors += batch.errors
    return prompts, errors


def test_a_quoted_empty_csv_field_in_the_first_name_reads_the_second(tmp_path):
    """A spreadsheet export quotes every field: the migration week's old column holds ``""`` where the new one holds
    the prompt. Each row reads the first name holding a value, and in a CSV an empty field holds none (README), as
    the record-by-record reader already read it: the columnar reader took the ``""`` (an empty_prompt reject)."""
    body = 'text,prompt\r\n"","a red cat"\r\n,"a blue dog"\r\n"old only",\r\n"old two",""\r\n'
    (tmp_path / "a.csv").write_text(body)
    assert _read(tmp_path / "a.csv", "csv", 4, ["text", "prompt"]) == (
        ["a red cat", "a blue dog", "old only", "old two"], [None] * 4)
    (tmp_path / "b.csv").write_text(body + "x,y,z\r\n")  # a ragged row: read record by record, as before
    assert _read(tmp_path / "b.csv", "csv-records", 5, ["text", "prompt"]) == (
        ["a red cat", "a blue dog", "old only", "old two", "x,y,z"], [None] * 4 + ["invalid_csv_row"])
    # a single name keeps its documented reading: a quoted "" is an empty prompt (empty_prompt), not null
    assert _read(tmp_path / "a.csv", "csv", 4, ["text"])[0] == ["", None, "old only", "old two"]


def _dry(*args):
    from typer.testing import CliRunner

    from audit.cli import app

    return CliRunner().invoke(app, ["run", *map(str, args), "--dry-run"])


def test_a_dry_run_counts_json_lines_files_without_any_name_as_the_run_rejects_them(tmp_path):
    """A JSON-lines file none of whose 2 lines has 'prompt' or 'text', one that has 'prompt', a CSV with neither: the
    run's warning (printed by the dry run too) and the run reject 3 rows as missing_prompt_column; the summary line
    said 1 row in 1 file and counted the keyless file among the files read line by line."""
    root = tmp_path / "logs"
    root.mkdir()
    (root / "x.jsonl").write_text('{"caption": "a"}\n{"caption": "b"}\n')
    (root / "y.jsonl").write_text('{"prompt": "a cat"}\n')
    (root / "z.csv").write_text("caption\nz\n")
    res = _dry(root, "--prompt-column", "prompt", "--prompt-column", "text", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[1:3] == [
        "inputs: 3 files (csv 1, jsonl 2): 4 rows in 3 units of work",
        "prompt column: none of the names in 2 files (3 rows to be rejected as missing_prompt_column); "
        "1 JSON-lines file: each line reads the first name holding a value"]
    assert "2 of 3 input files have no column 'prompt' or 'text', so their 3 rows are rejected" in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_dry_run_under_limit_counts_only_the_files_the_run_reads(tmp_path):
    """--limit 3 over a Parquet file of 3 rows with 'text' and a CSV without any name: the run reads the Parquet file
    only (no row rejected, no warning); the summary said 'none of the names in 1 file (0 rows to be rejected ...)'
    and named no file as beyond the limit."""
    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), root / "a.parquet")
    (root / "b.csv").write_text("caption\nz\ny\n")
    res = _dry(root, "--prompt-column", "prompt", "--prompt-column", "text", "--limit", 3, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[1:3] == [
        "inputs: 2 files (csv 1, parquet 1): 3 rows in 1 unit of work (--limit: 1 file with rows not reached, "
        "not read)",
        "prompt column: 'text' in 1 file"]
    assert "missing_prompt_column" not in res.output


def test_a_dry_run_refuses_the_calibration_options_the_run_refuses(tmp_path):
    """A nightly config naming a calibration file not made yet (docs/audits.md, step 1), a file that is not a
    calibration, or --fail-on-flagged without --calibration: the run stops before scoring (exit 2, one line); the
    dry run said 'a new run folder' and exited 0, so the first night failed although the check passed."""
    pq.write_table(pa.table({"prompt": ["a red cat"]}), tmp_path / "a.parquet")
    (tmp_path / "other.json").write_text('{"x": 1}')
    base = [tmp_path / "a.parquet", "--out", tmp_path / "out"]
    res = _dry(*base, "--calibration", tmp_path / "cal.json")
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.splitlines()[-1] == f"memaudit: error: --calibration {tmp_path / 'cal.json'}: no such file"
    res = _dry(*base, "--calibration", tmp_path / "other.json")
    assert res.exit_code == 2 and res.stderr.splitlines()[-1] == (
        f"memaudit: error: --calibration {tmp_path / 'other.json'}: not a memaudit calibration file (make one with "
        "`memaudit calibrate REFERENCE_RUN`)")
    res = _dry(*base, "--fail-on-flagged", 3)
    assert res.exit_code == 2 and res.stderr.splitlines()[-1] == (
        "memaudit: error: --fail-on-flagged needs --calibration (flags come from a calibrated threshold)")
    assert not (tmp_path / "out").exists()


def test_a_dry_run_refuses_a_cache_around_the_default_run_folder(tmp_path, monkeypatch):
    """No --out and --cache memaudit-runs: the run refuses the cache around its default folder before scoring; the
    dry run said 'a new run folder' (exit 0)."""
    pq.write_table(pa.table({"prompt": ["a red cat"]}), tmp_path / "a.parquet")
    monkeypatch.chdir(tmp_path)
    res = _dry(tmp_path / "a.parquet", "--cache", "memaudit-runs")
    assert res.exit_code == 2 and res.stdout == ""
    last = res.stderr.splitlines()[-1]
    assert last.startswith("memaudit: error: --cache memaudit-runs and the default run folder memaudit-runs/")
    assert last.endswith(": give the score cache a folder of its own, neither the run folder nor inside it (nor the "
                         "run inside the cache)")
    assert not (tmp_path / "memaudit-runs").exists()


def test_a_dry_run_on_a_folder_a_run_is_writing_says_it_would_be_refused(tmp_path):
    """While last night's run still writes --out (its lock held: a scheduler's overlap), a run started now is refused
    at once (exit 75); the dry run said the folder was new (or resumable) and exited 0. It now says the run would be
    refused, with the run's message, and only tries the lock: the lock file is not created, nor the folder written."""
    import fcntl

    from audit.pipeline import out_lock
    from audit.tables import lock_holder
    from audit.sources import LOCK_NAME

    pq.write_table(pa.table({"prompt": ["a red cat"]}), tmp_path / "a.parquet")
    out = tmp_path / "out"
    with out_lock(out):
        res = _dry(tmp_path / "a.parquet", "--out", out)
        assert res.exit_code == 75  # as the run exits on a busy folder (EX_TEMPFAIL: retry later)
        assert res.stdout.splitlines()[-1] == (
            f"--out {out}: would be refused now (exit 75): --out {out} is being written by another memaudit run right "
            f"now ({lock_holder(out)}); wait for it to finish (then rerun to resume or reuse it) or choose another --out")
        assert lock_holder(out).startswith(f"process {os.getpid()} on host ")  # the holder (ukill: named since)
        assert res.stderr.splitlines()[-1] == ("memaudit: error: the run would be refused while the other run writes "
                                               "the folder (above)")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    with open(out / LOCK_NAME, "rb") as fh:  # the dry run let go of the lock it tried
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    res = _dry(tmp_path / "a.parquet", "--out", out)  # the lock released: the folder holds only the empty lock file
    assert res.exit_code == 0 and res.stdout.splitlines()[-1] == f"--out {out}: a new run folder"


def _run(root, model, out, names):
    from audit.config import RunConfig
    from audit.runner import execute

    cfg = RunConfig(inputs=(str(root),), model=str(model), out=str(out), device="cpu", prompt_column=names,
                    max_error_fraction=1.0)
    return execute(cfg, progress=False, log=lambda _: None)[1]


def test_a_diff_of_nights_read_under_other_prompt_names_says_so(tmp_path, tiny_model_dir):
    """Night 1 read a migration-week file (both columns filled) with --prompt-column prompt --prompt-column text,
    night 2 with the names the other way round: night 2 took the old column's text, so the diff counts 3 prompts
    'gone' and 3 'new' from unchanged logs. It said nothing of why; it now warns that the runs read other names."""
    from audit.diff import diff_runs, render_markdown

    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"text": ["old red cat", "old blue dog", "old green frog", "an old tower"],
                             "prompt": ["a red cat", "a blue dog", "a green frog", None]}), root / "a.parquet")
    m1 = _run(root, tiny_model_dir, tmp_path / "n1", ("prompt", "text"))
    m2 = _run(root, tiny_model_dir, tmp_path / "n2", ("text", "prompt"))
    assert (m1["counts"]["scored"], m2["counts"]["scored"]) == (4, 4)
    d = diff_runs(tmp_path / "n1", tmp_path / "n2")
    assert (d.summary["in_both"], d.summary["only_old"], d.summary["only_new"]) == (1, 3, 3)
    note = ("the runs read their prompts under different --prompt-column names ('prompt' or 'text' vs 'text' or "
            "'prompt'): a prompt new or gone may be a row read from another column or rejected (rejects.parquet), "
            "not a change in the inputs")
    assert d.flag_warnings == [note]
    assert f"**Warning:** {note}.  " in render_markdown(d).splitlines()
    assert diff_runs(tmp_path / "n1", tmp_path / "n1").flag_warnings == []  # the same names: no warning


def test_a_dry_run_does_not_count_files_without_rows_as_lacking_the_column(tmp_path):
    """A day's zero-byte Parquet placeholder and a CSV export holding only a header without the names, beside a file
    with 'text': the run reads no row of them, rejects none and warns of no missing column (only of the zero-byte
    file); the summary said 'none of the names in 2 files (0 rows to be rejected as missing_prompt_column)'."""
    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), root / "a.parquet")
    (root / "b.parquet").write_bytes(b"")
    (root / "c.csv").write_text("caption,n\r\n")
    res = _dry(root, "--prompt-column", "prompt", "--prompt-column", "text", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[1:3] == ["inputs: 3 files (csv 1, parquet 2): 2 rows in 1 unit of work",
                                            "prompt column: 'text' in 1 file"]
    assert "missing_prompt_column" not in res.output
    assert "1 input .parquet file is zero bytes" in res.stderr


def test_a_dry_run_names_the_txt_files_read_as_prompts_in_its_prompt_column_line(tmp_path):
    """A README.txt left in the log bucket is read as prompts, one a line (README): the prompt column line accounted
    for the Parquet and JSON-lines files only, so the file's 2 lines appeared in the rows but in no file of the line."""
    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), root / "a.parquet")
    (root / "README.txt").write_text("bucket notes\nsecond line\n")
    res = _dry(root, "--prompt-column", "prompt", "--prompt-column", "text", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[1:3] == [
        "inputs: 2 files (parquet 1, txt 1): 4 rows in 2 units of work",
        "prompt column: 'text' in 1 file; 1 .txt file: each line a prompt, no columns"]


def test_the_report_of_a_run_given_several_prompt_names_says_which(tmp_path, tiny_model_dir):
    """Two nights read under other names score other rows (above): the report's header named the model, scorer and
    layers but not the names, so two reports could not be told apart. It now names them in their order; a run with
    one name keeps its header."""
    from audit.report import build_report, render_markdown

    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"text": ["", "an old tower"], "prompt": ["a red cat", None]}), root / "a.parquet")
    _run(root, tiny_model_dir, tmp_path / "n1", ("prompt", "text"))
    _run(root, tiny_model_dir, tmp_path / "n2", "prompt")
    head = render_markdown(build_report(tmp_path / "n1")).splitlines()[2]
    assert head.endswith(", prompts read from 'prompt' or 'text' (each row the first holding a value)"), head
    assert "prompts read from" not in render_markdown(build_report(tmp_path / "n2"))


def test_an_empty_or_blank_old_column_reads_the_new_one_in_parquet_and_json_lines(tmp_path, tiny_model_dir):
    """The migration week wrote both columns, the old one null or empty. With the old name first (--prompt-column
    text --prompt-column prompt, the order the log's history suggests) the rows whose 'text' was "" or blank took it
    and were rejected as empty_prompt, with exit 0 and no warning: 3 of 5 Parquet rows and 2 of 4 JSON lines lost
    to the audit although 'prompt' held them. A cell that shows nothing holds no value: the next name is read. A
    row blank in every name is still rejected (empty_prompt), and a null in every name is null_prompt."""
    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"text": ["", " \u200b", None, "an old tower", ""],
                             "prompt": ["a red cat", "a blue dog", "a green frog", None, None]}), root / "a.parquet")
    lines = [{"text": "", "prompt": "a small house"}, {"text": "\t", "prompt": "a tall tree"},
             {"text": "old city", "prompt": "new city"}, {"text": "", "prompt": ""}]
    (root / "b.jsonl").write_text("".join(json.dumps(o) + "\n" for o in lines))
    assert _read(root / "a.parquet", "parquet", 5, ["text", "prompt"]) == (
        ["a red cat", "a blue dog", "a green frog", "an old tower", ""], [None] * 5)
    assert _read(root / "b.jsonl", "jsonl", 4, ["text", "prompt"]) == (
        ["a small house", "a tall tree", "old city", ""], [None] * 4)
    m = _run(root, tiny_model_dir, tmp_path / "out", ("text", "prompt"))
    assert (m["counts"]["rows_read"], m["counts"]["scored"], m["counts"]["rejected_by_reason"]) == (
        9, 7, {"empty_prompt": 2})
    scored = {(r["source"].rsplit("/", 1)[-1], r["row"]): r["prompt"]
              for r in pq.read_table(tmp_path / "out" / "risk.parquet").to_pylist()}
    assert scored == {("a.parquet", 0): "a red cat", ("a.parquet", 1): "a blue dog", ("a.parquet", 2): "a green frog",
                      ("a.parquet", 3): "an old tower", ("b.jsonl", 0): "a small house", ("b.jsonl", 1): "a tall tree",
                      ("b.jsonl", 2): "old city"}


def test_nightly_sh_dry_run_checks_the_night_and_stops(tmp_path):
    """pipelines/nightly.sh --dry-run, the way to check the job before its first night: the script took the dry
    run's summary on stdout for the run folder's name and ran report (twice) and diff on it, printing three
    'File name too long' errors and warnings. It now runs the dry run alone, with its exit code and lines."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pipelines = Path(__file__).resolve().parent.parent / "pipelines"
    (tmp_path / "logs").mkdir()
    pq.write_table(pa.table({"text": ["a red cat", ""], "prompt": [None, "a blue dog"]}),
                   tmp_path / "logs" / "a.parquet")
    (tmp_path / "night.toml").write_text('inputs = ["logs"]\nprompt_column = ["prompt", "text"]\n'
                                         'out = "audits/nightly/night1"\n')
    env = os.environ | {"PATH": "/usr/bin:/bin", "MEMAUDIT": str(Path(sys.executable).parent / "memaudit"),
                        "HF_HUB_OFFLINE": "1", "CONFIG": str(tmp_path / "night.toml")}
    res = subprocess.run(["bash", str(pipelines / "nightly.sh"), "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "memaudit: dry run: no model loaded, nothing scored or written",
        "inputs: 1 file (parquet 1): 2 rows in 1 unit of work",
        "prompt column: 'prompt' and 'text' in 1 file (each row reads the first holding a value)",
        "model: lab (bundled): family sd1; its identity and weights are read when the run starts",
        "--out audits/nightly/night1: a new run folder"]
    assert "report" not in res.stderr and "diff" not in res.stderr, res.stderr
    assert not (tmp_path / "audits").exists()


def test_a_semicolon_separated_spreadsheet_export_is_named_as_such(tmp_path):
    """A spreadsheet exported in a locale whose list separator is ';' reads as one column, 'text;"prompt"': the
    refusal listed it among the columns found and said nothing more, which reads as if the file had the names. It
    now says the header is separated by ';' and that memaudit reads comma-separated CSV; so does the run's warning
    when other files have the column. A tab-separated header too."""
    (tmp_path / "semi.csv").write_bytes('\ufeff"text";"prompt"\r\n"a";"b"\r\n'.encode())
    res = _dry(tmp_path / "semi.csv", "--prompt-column", "prompt", "--prompt-column", "text")
    assert res.exit_code == 2 and res.stderr.splitlines()[-1] == (
        "memaudit: error: no input has any of the prompt columns 'prompt', 'text'; columns found: text;\"prompt\". "
        "Choose one with --prompt-column. The column 'text;\"prompt\"' is a whole header separated by ';' (a "
        "spreadsheet export in a locale whose list separator is not a comma?): memaudit reads CSV separated by "
        "commas; export the file with commas.")
    (tmp_path / "tab.csv").write_text("id\tprompt\n1\ta cat\n")
    pq.write_table(pa.table({"prompt": ["a red cat"]}), tmp_path / "a.parquet")
    res = _dry(tmp_path / "a.parquet", tmp_path / "tab.csv", "--out", tmp_path / "out")
    assert res.exit_code == 0
    assert res.stderr.splitlines()[0].endswith(
        "(columns: id\tprompt). The column 'id\\tprompt' is a whole header separated by tabs (a spreadsheet export in a "
        "locale whose list separator is not a comma?): memaudit reads CSV separated by commas; export the file with "
        "commas.")


def test_a_dry_run_counts_the_rows_to_be_rejected_for_want_of_the_id_column(tmp_path, tiny_model_dir):
    """--id-column request_id over Spark days that have it and older days that do not: the summary said nothing of
    the id (only a stderr warning did), so its 'rows to be rejected' left out the run's largest reason. It now has
    an id column line whose count equals the run's missing_id_column rejects (3 rows of the file without it)."""
    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog"], "request_id": ["r1", "r2"]}), root / "a.parquet")
    pq.write_table(pa.table({"text": ["old one", "old two", "old three"]}), root / "b.parquet")
    names = ["--prompt-column", "prompt", "--prompt-column", "text", "--id-column", "request_id"]
    res = _dry(root, *names, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[3] == (
        "id column 'request_id': not in 1 file with prompts (3 rows to be rejected as missing_id_column)")
    from audit.config import RunConfig
    from audit.runner import execute

    cfg = RunConfig(inputs=(str(root),), model=str(tiny_model_dir), out=str(tmp_path / "out"), device="cpu",
                    prompt_column=("prompt", "text"), id_column="request_id", max_error_fraction=1.0)
    assert execute(cfg, progress=False, log=lambda _: None)[1]["counts"]["rejected_by_reason"] == {
        "missing_id_column": 3}
    res = _dry(root / "a.parquet", *names, "--out", tmp_path / "out2")
    assert res.stdout.splitlines()[3] == "id column 'request_id': in every file read with a prompt column"


def test_a_skipped_unreadable_file_is_named_once_on_its_line(tmp_path):
    """--skip-bad-files over a day with a Parquet file cut short: the dry run's (and the run's) line named the path
    twice, '/x/part-0.parquet (/x/part-0.parquet: cannot read as parquet (...))', doubling a long line."""
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes((tmp_path / "a.parquet").read_bytes()[:100])
    res = _dry(tmp_path / "a.parquet", tmp_path / "b.parquet", "--prompt-column", "text", "--skip-bad-files",
               "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    line = res.stdout.splitlines()[3]
    assert line.startswith(f"1 input file skipped, not read (manifest.json skipped_files): {tmp_path / 'b.parquet'} "
                           "(cannot read as parquet (ArrowInvalid: "), line
    assert line.count(str(tmp_path / "b.parquet")) == 1


def test_a_dry_run_says_when_the_rows_without_the_column_will_make_the_run_exit_4(tmp_path, tiny_model_dir):
    """The spreadsheet export whose header is 'prompt ' (trailing space): its 2 rows of 5 are missing_prompt_column,
    more than the default --max-error-fraction 0.01, so the first night writes its outputs and exits 4. The dry
    run exited 0 saying only 'a new run folder'; it now says the run will exit 4 and why. With the fraction raised
    the line goes, and the run exits 0."""
    from typer.testing import CliRunner

    from audit.cli import app

    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"text": ["a red cat", "a blue dog", "a green frog"]}), root / "a.parquet")
    (root / "b.csv").write_bytes('\ufeff"prompt ",id\r\n"a small house",1\r\n"a tall tree",2\r\n'.encode())
    base = [root, "--prompt-column", "prompt", "--prompt-column", "text", "--model", tiny_model_dir, "--device", "cpu"]
    res = _dry(*base, "--out", tmp_path / "n1")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-2:] == [
        "exit 4 expected: 2 of 5 rows (40.0%) to be rejected for want of the prompt or id column, more than "
        "--max-error-fraction 0.01: the run writes its outputs, then exits 4 (give the other name with "
        "--prompt-column, or raise --max-error-fraction)",
        f"--out {tmp_path / 'n1'}: a new run folder"]
    run = CliRunner().invoke(app, ["run", *map(str, base), "--out", str(tmp_path / "n1"), "--no-progress"])
    assert run.exit_code == 4 and (tmp_path / "n1" / "risk.parquet").exists()
    res = _dry(*base, "--out", tmp_path / "n2", "--max-error-fraction", "0.5")
    assert res.exit_code == 0 and "exit 4" not in res.stdout
    run = CliRunner().invoke(app, ["run", *map(str, base), "--out", str(tmp_path / "n2"), "--no-progress",
                                   "--max-error-fraction", "0.5"])
    assert run.exit_code == 0, run.output


def test_a_named_pipe_in_a_log_folder_is_skipped_not_waited_on(tmp_path):
    """A 'logs.jsonl' named pipe left in the bucket's folder (a log shipper's FIFO): the dry run, and the run, opened
    it while planning and waited for a writer forever, printing nothing. Discovery now skips it and names it, as
    marker files are (checked first: the old code fails there instead of hanging below); given alone it is refused
    in one line."""
    import os

    from audit.sources import discover

    root = tmp_path / "logs"
    root.mkdir()
    pq.write_table(pa.table({"prompt": ["a red cat"]}), root / "a.parquet")
    os.mkfifo(root / "logs.jsonl")
    files, skipped = discover([str(root)])
    assert [f.url for f in files] == [str(root / "a.parquet")]
    assert skipped == [{"path": str(root / "logs.jsonl"), "reason": "not a regular file (a named pipe, socket or "
                                                                      "device)"}]
    res = _dry(root, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[1] == "inputs: 1 file (parquet 1): 1 row in 1 unit of work"
    assert res.stdout.splitlines()[3] == (f"1 input file skipped, not read (manifest.json skipped_files): "
                                          f"{root / 'logs.jsonl'} (not a regular file (a named pipe, socket or device))")
    res = _dry(root / "logs.jsonl", "--out", tmp_path / "out")
    assert res.exit_code == 2 and res.stderr.splitlines()[-1] == (
        f"memaudit: error: no readable prompt file in {root / 'logs.jsonl'}: {root / 'logs.jsonl'} (not a regular "
        "file (a named pipe, socket or device))")


def test_prompt_names_joined_by_a_comma_are_refused_with_the_way_to_give_them(tmp_path):
    """--keep-columns takes 'a,b'; --prompt-column prompt,text (or prompt_column = "prompt,text" in a config) is one
    name, which no file has: the refusal listed the columns found, 'text' among them, with no word of why the name
    did not match. It now says how to give the names."""
    pq.write_table(pa.table({"text": ["a red cat"], "user": ["u1"]}), tmp_path / "a.parquet")
    res = _dry(tmp_path / "a.parquet", "--prompt-column", "prompt,text", "--out", tmp_path / "out")
    assert res.exit_code == 2 and res.stderr.splitlines()[-1] == (
        "memaudit: error: no input has the prompt column 'prompt,text'; columns found: text, user. Choose one with "
        "--prompt-column. 'prompt,text' is taken as one column name: give each name to its own --prompt-column "
        '(--prompt-column prompt --prompt-column text; in --config, prompt_column = ["prompt", "text"]).')


def test_a_dry_run_on_a_folder_cut_in_smaller_units_says_it_resumes(tmp_path, tiny_model_dir):
    """A run folder whose units are smaller than --unit-rows (a Ray run splits a small night among its workers and
    records the size; here an explicit --unit-rows 2): the rerun of the job's command plans those units again and
    resumes, but the dry run planned --unit-rows units and said 'would be refused: ... unit_rows: 2 -> 20000'
    (exit 2). It now plans as the rerun does, with the run's note. (A new folder's dry run with --engine ray prints
    the split the run will make: tests/test_ray.py, test_the_dry_run_predicts_..., with the module's Ray.)"""
    from typer.testing import CliRunner

    from audit.cli import app

    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog", "a green frog"]}), tmp_path / "a.parquet")
    out = tmp_path / "out"
    base = [str(tmp_path / "a.parquet"), "--model", str(tiny_model_dir), "--device", "cpu", "--out", str(out)]
    assert CliRunner().invoke(app, ["run", *base, "--unit-rows", "2", "--no-progress"]).exit_code == 0
    res = _dry(*base)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[1] == "inputs: 1 file (parquet 1): 3 rows in 2 units of work"
    assert res.stdout.splitlines()[-1] == (f"--out {out}: holds this run, 2 of 2 units committed: the same command "
                                           "resumes it (the model and score configuration are checked when it starts)")
    assert ("memaudit: going on with the run folder's units of 2 rows (cut when the run started; --unit-rows 20000 "
            "applies to new run folders)") in res.stderr
    rerun = CliRunner().invoke(app, ["run", *base, "--no-progress"])
    assert rerun.exit_code == 0 and "resuming" in rerun.stderr and "2 of 2 units already done" in rerun.stderr
