"""Findings of the on-call nightly prompt-log audit trial (session 50): the nightly run, its reports and diff,
then bad inputs and odd options."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_cli_api_mutants import stub  # noqa: F401 - the fixture: `memaudit run` with the engine replaced

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
       "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200"}


# ------------------------------------------------------------------ exit 4: the limit printed as it was given

def test_exit_4_prints_the_fraction_as_given_not_rounded_to_six_digits(tmp_path, monkeypatch):
    """`memaudit run night.jsonl --max-error-fraction 0.1249999` with 1 bad line in 8 exited 4 with "1 of 8 rows
    read (12.5%) could not be read as prompts ..., more than --max-error-fraction 0.125": 12.5% is not more than
    0.125 (`:g` keeps six digits). The limit now prints as given, in the run's gates and in --dry-run's line."""
    from audit.gates import coverage_gate, error_gate
    from audit.text import fraction_text

    assert [fraction_text(x) for x in (0.01, 1.0, 0.0, 0.1249999, 1e-05, 0.29, 1.234567e-07)] == [
        "0.01", "1", "0", "0.1249999", "1e-05", "0.29", "1.234567e-07"]

    class Limits:
        max_error_fraction = 0.1249999
        fail_on_flagged = None

    manifest = {"counts": {"rows_read": 8, "scored": 7, "rejected_by_reason": {"invalid_json": 1}}}
    assert coverage_gate(Limits(), manifest) == (
        "1 of 8 rows read (12.5%) could not be read as prompts (invalid_json 1), more than --max-error-fraction "
        "0.1249999: the audit covers only part of its input (lines that are not JSON objects? rejects.parquet's "
        "detail says why; rejects.parquet names each row's file)")
    manifest = {"counts": {"rows_read": 8, "scored": 7, "rejected_by_reason": {"scoring_error": 1}}}
    assert error_gate(Limits(), tmp_path, manifest) == (
        "1 of 8 rows (12.5%) could not be scored (scoring_error 1), more than --max-error-fraction 0.1249999. "
        f"The outputs in {tmp_path} hold what was scored.")

    logs = tmp_path / "logs"
    logs.mkdir()
    pq.write_table(pa.table({"prompt": [f"a red cat {i}" for i in range(7)]}), logs / "a.parquet")
    pq.write_table(pa.table({"text": ["a blue dog"]}), logs / "b.parquet")
    from typer.testing import CliRunner

    from audit.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", ENV["COLUMNS"])  # in process, as the subprocess this was (its imports cost 2 CPU s)
    proc = CliRunner().invoke(app, ["run", str(logs), "--max-error-fraction", "0.1249999", "--out",
                                    str(tmp_path / "run"), "--dry-run"])
    assert proc.exit_code == 0, proc.stderr
    assert ("exit 4 expected: 1 of 8 rows (12.5%) to be rejected for want of the prompt or id column, more than "
            "--max-error-fraction 0.1249999: the run writes its outputs") in proc.stdout, proc.stdout


# ------------------------------------------------------------------ CR lines with an LF line appended

def test_cr_lines_with_an_lf_line_appended_are_refused_not_merged(tmp_path):
    """A prompt log of classic-Mac CR lines to which a tool appended a line with LF (`echo ... >> night.txt`):
    'a red cat\\ra blue dog\\ra green bird\\n' held an LF, so it was read as one row holding all three prompts,
    scored, exit 0. A file whose lone CRs are at least as many as its LFs is now refused like a CR-only one;
    a CR inside a line of an LF file still stays in its prompt."""
    from audit.config import RunConfig
    from audit.errors import SourceError
    from audit.pipeline import build_plan

    cases = {"night.txt": b"a red cat\ra blue dog\ra green bird\n",
             "night.jsonl": b'{"prompt": "a"}\r{"prompt": "b"}\n'}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(SourceError) as err:
            build_plan(RunConfig(inputs=(str(path),)))
        lone = 2 if name == "night.txt" else 1
        assert str(err.value) == (
            f"{path}: cannot read as {name.split('.')[1]} (ValueError: {lone} of its line breaks are a lone carriage "
            "return (CR, as classic Mac OS wrote text) and 1 LF or CRLF, so the lines ended by CR would be read as "
            "one: convert them, e.g. tr '\\r' '\\n' < IN > OUT) (--skip-bad-files skips such files and goes on)")
        plan = build_plan(RunConfig(inputs=(str(path),), skip_bad_files=True))
        assert plan.units == [] and [s["path"] for s in plan.skipped] == [str(path)]
    ok = tmp_path / "ok.txt"
    ok.write_bytes(b"a red cat\r\nthe blue\rsofa\r\na city\n")  # one CR inside a line, 3 line ends
    assert build_plan(RunConfig(inputs=(str(ok),))).file_rows == {str(ok): 3}


# ------------------------------------------------------------------ diff: one prompt flagged the night before

def test_diff_summary_says_1_prompt_flagged_before_not_1_prompts(tmp_path):
    """`memaudit diff` between two nights with one prompt flagged on the first said "1 newly flagged, 0 no longer
    flagged (1 prompts flagged before, 2 now)". It now says "1 prompt flagged before"; the plural stays for others."""
    from audit.diff import _summary_line, diff_runs
    from test_report_mutants import make_run

    old = make_run(tmp_path / "old", [("p0", 0.0), ("p3", 3.0)], threshold=2.5)
    new = make_run(tmp_path / "new", [("p0", 0.0), ("p3", 3.0), ("p4", 4.0)], threshold=2.5)
    assert ("1 newly flagged, 0 no longer flagged (1 prompt flagged before, 2 now);"
            in _summary_line(diff_runs(old, new)))
    assert ("0 newly flagged, 0 no longer flagged (2 prompts flagged before, 1 now);"  # p4 gone
            in _summary_line(diff_runs(new, old)))


# ------------------------------------------------------------------ report: a night rerun by an upgraded memaudit

def test_report_names_the_build_that_started_a_run_rerun_by_another(tmp_path):
    """Night 1 finished by build A; after an upgrade the same command was rerun (nothing left to score: "its units
    keep the scores that version gave"), the manifest was rewritten by build B, and `memaudit report` said "made
    by memaudit 0.1.0, build B" though every score came from A. The header now names both; a run started and
    finished by one build keeps "made by"."""
    import json

    from audit.report import _model_lines, build_report
    from test_report_mutants import make_run

    run = make_run(tmp_path / "r", [("p0", 0.0), ("p1", 1.0)])
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps(manifest | {"memaudit_version": "0.1.0",
                                                              "memaudit_build": "bbbbbbbbbbbb"}))
    run_json = run / "run.json"
    old = json.loads(run_json.read_text()) if run_json.exists() else {}
    run_json.write_text(json.dumps(old | {"memaudit_build": "aaaaaaaaaaaa"}))
    assert _model_lines(build_report(run))[3] == (
        "finished by memaudit 0.1.0, build bbbbbbbbbbbb; started by build aaaaaaaaaaaa (the units scored before the "
        "rerun keep that build's scores)")
    run_json.write_text(json.dumps(old | {"memaudit_build": "bbbbbbbbbbbb"}))
    assert _model_lines(build_report(run))[3] == "made by memaudit 0.1.0, build bbbbbbbbbbbb"


def test_a_crlf_file_written_again_as_cr_cr_lf_is_read_not_refused(tmp_path):
    """A CRLF log written again through a text-mode CRLF writer ends its lines in CR CR LF: each line holds one
    CR before its CRLF, no CR followed by text, so it is read line by line (2 rows), not refused as lone-CR lines.
    Only a CR followed by more text counts as a lone CR line break."""
    from audit.config import RunConfig
    from audit.pipeline import build_plan

    path = tmp_path / "night.txt"
    path.write_bytes(b"a red cat\r\r\nthe blue sofa\r\r\n")
    assert build_plan(RunConfig(inputs=(str(path),))).file_rows == {str(path): 2}


# ------------------------------------------------------------------ nightly.sh -h

def test_nightly_sh_help_prints_usage_and_runs_nothing(tmp_path):
    """`pipelines/nightly.sh -h` passed -h to `memaudit run`, took its help text for the run folder, tried both
    reports and the diff on it (pages of "cannot be read (File name too long)") and printed the help again as
    the night's folder, exit 0. -h and --help now print the script's usage, then `memaudit run --help`, and run
    nothing else. (memaudit is a stub recording its calls.)"""
    stub = tmp_path / "memaudit"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/calls\n[ "$1" = run ] && echo "Usage: memaudit run"\n'
                    "exit 0\n")
    stub.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "MEMAUDIT": str(stub), "RUNS": str(tmp_path / "runs"), "CONFIG": "n.toml"}
    for flag in ("-h", "--help"):
        proc = subprocess.run(["bash", str(ROOT / "pipelines" / "nightly.sh"), "--fail-on-flagged", "3", flag],
                              env=env, cwd=tmp_path, capture_output=True, text=True)
        lines = proc.stdout.splitlines()
        assert (proc.returncode, proc.stderr) == (0, "")
        assert lines[0] == ("Nightly prompt-log audit: run (cached), write the reports, and diff against the previous "
                            "night.")
        assert lines[-1] == "Usage: memaudit run" and len(lines) == 10
        assert (tmp_path / "calls").read_text().splitlines() == ["run --help"]
        (tmp_path / "calls").unlink()


# ------------------------------------------------------------------ a night rerun with every unit resumed

def test_a_fully_resumed_rerun_says_its_cache_counts_are_the_whole_runs(tmp_path, tiny_model_dir, monkeypatch):
    """Rerunning last night's command (nothing left to score) printed "nothing left to score, every row resumed"
    and then "cache 0 hits, 3 sent to the model", as if this invocation had scored 3 prompts. The counts are the
    run's, its resumed units' included, and the line now says so; a run scored in one go keeps the bare line.
    (In process, with the subprocess's COLUMNS and working folder: two `python -m audit.cli` cost 12 CPU s of
    imports and showed the same stderr.)"""
    from typer.testing import CliRunner

    from audit.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", ENV["COLUMNS"])
    src = tmp_path / "night.txt"
    src.write_text("a red cat\na blue dog\na red cat\na green bird\n")
    cmd = ["run", str(src), "--model", str(tiny_model_dir), "--device", "cpu", "--cache", str(tmp_path / "cache"),
           "--out", str(tmp_path / "run")]
    first = CliRunner().invoke(app, cmd)
    assert first.exit_code == 0, first.stderr
    assert first.stderr.splitlines()[-1] == "memaudit: cache 0 rows hit, 4 rows scored by the model"  # 4 rows
    again = CliRunner().invoke(app, cmd)
    assert again.exit_code == 0, again.stderr
    assert "nothing left to score, every row resumed" in again.stderr
    assert again.stderr.splitlines()[-1] == ("memaudit: cache 0 rows hit, 4 rows scored by the model (over the "
                                             "whole run: nothing was sent in this invocation, every unit resumed)")


def test_a_partly_resumed_run_says_its_cache_counts_include_the_resumed_units(stub):
    """A night stopped after some units and rerun: "cache 23 hits, 3,902 sent to the model" counts the whole run,
    the units scored before the stop included; the line now says so. (The engine is a stub returning the
    manifest.)"""
    from test_cli_api_mutants import _manifest

    stub.manifest = _manifest(4000, 4000, rows_this_run=1000, cache={"hits": 23, "scored": 3902},
                              units={"total": 4, "resumed": 3})
    res = stub.run()
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines()[-1] == ("memaudit: cache 23 rows hit, 3,902 rows scored by the model (over the "
                                           "whole run, its resumed units included)")
    assert "(1,000 rows read in this invocation, the rest resumed)" in res.stderr.splitlines()[0]
