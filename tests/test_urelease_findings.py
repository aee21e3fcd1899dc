"""Findings of a safety-team developer who screens a fine-tuned checkpoint before release and wires memaudit into a
CI release gate: calibrate on a reference run, screen with ``--fail-on-flagged``, diff two checkpoints, attach the
report to the ticket. Each test fails on the code before its fix. Run folders are written by hand with known risks
(``make_run``), so no model is loaded."""

from __future__ import annotations

import json

import pytest

from audit.calibrate import calibrate
from audit.errors import CalibrationError
from test_report_mutants import make_run


def _with_counts(run, rejected_by_reason: dict, run_config: dict | None = None):
    """Give a ``make_run`` folder's manifest the rejects of a run whose model or inputs failed on some rows (the
    counts reconcile: rows_read = scored + rejected), and the ``run_config`` it ran with."""
    path = run / "manifest.json"
    m = json.loads(path.read_text())
    m["counts"]["rejected_by_reason"] = dict(rejected_by_reason)
    m["counts"]["rejected"] = sum(rejected_by_reason.values())
    m["counts"]["rows_read"] = m["counts"]["scored"] + m["counts"]["rejected"]
    if run_config is not None:
        m["run_config"] = run_config
    path.write_text(json.dumps(m))
    return run


# ---------------------------------------------------------------- calibrate: a reference run that failed (exit 4)

def test_calibrate_refuses_a_reference_run_that_failed_its_coverage_gate(tmp_path):
    """A reference run over two files, one with its prompts under another column: 20 of 300 rows scored, 280
    rejected as missing_prompt_column, and the run exited 4 ("the audit covers only part of its input"). `memaudit
    calibrate` made a threshold from the 20 (exit 0), which the release gate then trusted. Now it refuses, naming the
    run's failure and how to accept it."""
    rows = [(f"p{i}", float(i)) for i in range(20)]
    run = _with_counts(make_run(tmp_path / "ref", rows), {"missing_prompt_column": 280})
    with pytest.raises(CalibrationError) as err:
        calibrate(run, 0.01)
    msg = str(err.value)
    assert msg.startswith(f"{run} is a run that failed (exit 4): 280 of 300 rows read (93.3%) could not be read as "
                          "prompts (missing_prompt_column 280), more than --max-error-fraction 0.01")
    assert "rerun it with a larger --max-error-fraction to accept it as it is" in msg


def test_calibrate_refuses_a_reference_the_model_failed_on_and_takes_it_under_its_own_fraction(tmp_path):
    """3 of 10 rows that reached the model failed (scoring_error): the run exited 4 and a calibration refuses it. The
    same counts under the run's recorded --max-error-fraction 0.5 passed that run's gate, and calibrate takes it: the
    threshold is the order statistic of the 10 scored risks (fpr 0.1: k = 1, the 9th smallest, 8.0)."""
    rows = [(f"p{i}", float(i)) for i in range(10)]
    failed = _with_counts(make_run(tmp_path / "failed", rows), {"scoring_error": 3, "empty_prompt": 2})
    with pytest.raises(CalibrationError, match=r"failed \(exit 4\): 3 of 13 rows \(23\.1%\) could not be scored "
                                               r"\(scoring_error 3\), more than --max-error-fraction 0\.01"):
        calibrate(failed, 0.1)
    accepted = _with_counts(make_run(tmp_path / "accepted", rows), {"scoring_error": 3, "empty_prompt": 2},
                            {"max_error_fraction": 0.5})
    cal = calibrate(accepted, 0.1)
    assert (cal["threshold"], cal["reference"]["size"], cal["reference"]["allowed_flags"]) == (8.0, 10, 1)
    # rows that hold no prompt (null, empty) are not failures: 2 empty prompts of 12 rows pass the 0.01 gate
    clean = _with_counts(make_run(tmp_path / "clean", rows), {"empty_prompt": 2})
    assert calibrate(clean, 0.1)["threshold"] == 8.0


# ---------------------------------------------------------------- diff: a run that failed (exit 4)

def test_diff_warns_when_a_run_failed_its_error_gates(tmp_path):
    """Before/after a mitigation: the new checkpoint failed on 2 of the 4 prompts (scoring_error; the run exited 4),
    so the diff listed those 2 as gone, with no warning, while the report of the same run warns "the run failed (exit
    4)". Now the diff says so in its flag warnings (JSON and the -o stderr lines alike); a run that passed its gates
    gets none."""
    from audit.diff import diff_runs, render_json

    rows = [(f"p{i}", float(i)) for i in range(4)]
    old = make_run(tmp_path / "old", rows, threshold=2.5)
    new = _with_counts(make_run(tmp_path / "new", rows[:2], threshold=2.5), {"scoring_error": 2})
    d = diff_runs(old, new)
    assert d.summary["only_old"] == 2
    assert d.flag_warnings == [
        "the new run failed (exit 4): 2 of 4 rows (50.0%) could not be scored (scoring_error 2), more than "
        f"--max-error-fraction 0.01. The outputs in {new} hold what was scored; a prompt it did not score is missing "
        "from its side of the lists"]
    assert json.loads(render_json(d))["flag_warnings"] == d.flag_warnings
    assert diff_runs(new, old).flag_warnings[0].startswith("the old run failed (exit 4): 2 of 4 rows (50.0%)")
    assert diff_runs(old, make_run(tmp_path / "same", rows, threshold=2.5)).flag_warnings == []


# ---------------------------------------------------------------- report: the --fail-on-flagged verdict

def _gated(run, limit):
    """The run's manifest records the ``--fail-on-flagged`` limit it last ran with (``run_config``)."""
    m = json.loads((run / "manifest.json").read_text())
    m["run_config"] = {"fail_on_flagged": limit}
    (run / "manifest.json").write_text(json.dumps(m))
    return run


def test_the_report_says_when_the_run_failed_its_fail_on_flagged_gate(tmp_path):
    """A pre-release screening flagged 2 rows with --fail-on-flagged 1: the run exited 3, but its report, the file
    attached to the release ticket, showed "flagged 2" and nothing about the gate (it warns of exit 4 only). Now
    every format leads with the verdict, and report.json's calibration holds the limit; at the limit (2 flagged,
    --fail-on-flagged 2: exit 0) there is no warning."""
    from audit.report import build_report, render_html, render_json, render_markdown

    rows = [(f"p{i}", float(i)) for i in range(5)]  # risks 0..4, threshold 2.5: p3 and p4 flagged
    r = build_report(_gated(make_run(tmp_path / "over", rows, threshold=2.5), 1))
    line = "the run failed its --fail-on-flagged gate (exit 3): 2 rows flagged (risk > 2.5), more than --fail-on-flagged 1"
    assert r.counts["flagged"] == 2 and r.warnings == [line]
    doc = json.loads(render_json(r))
    assert doc["warnings"] == [line]
    assert doc["calibration"] == {"threshold": 2.5, "fpr": 0.1, "fail_on_flagged": 1}
    assert f"**Warning:** {line.replace('>', '&gt;')}." in render_markdown(r)
    assert line.replace('>', '&gt;') in render_html(r)
    at = build_report(_gated(make_run(tmp_path / "at", rows, threshold=2.5), 2))
    assert at.warnings == [] and json.loads(render_json(at))["calibration"]["fail_on_flagged"] == 2
    ungated = build_report(make_run(tmp_path / "ungated", rows, threshold=2.5))
    assert ungated.warnings == [] and json.loads(render_json(ungated))["calibration"]["fail_on_flagged"] is None


def test_a_run_that_exited_4_names_its_flag_gate_without_exit_3(tmp_path):
    """A run that failed its error gate exits 4 before its flags are gated: the report lists both failures, the flag
    gate without "(exit 3)", which the run never returned."""
    from audit.report import build_report

    rows = [(f"p{i}", float(i)) for i in range(5)]
    run = make_run(tmp_path / "r", rows, rejects=[("in/a.parquet", "scoring_error")] * 5, threshold=2.5)
    run = _gated(_with_counts(run, {"scoring_error": 5}), 0)
    assert build_report(run).warnings == [
        "the run failed (exit 4): 5 of 10 rows (50.0%) could not be scored (scoring_error 5), more than "
        f"--max-error-fraction 0.01; the first: scoring_error. The outputs in {run} hold what was scored",
        "the run failed its --fail-on-flagged gate: 2 rows flagged (risk > 2.5), more than --fail-on-flagged 0"]


# ---------------------------------------------------------------- diff: prompts no longer flagged

def test_diff_counts_the_prompts_no_longer_flagged_after_a_mitigation(tmp_path):
    """Before/after a mitigation, both calibrated at 2.5: before, p3, p4 (on 2 rows) and p5 were flagged; after, p4
    and a new prompt p9, p5 gone. The diff said "1 newly flagged" and listed rank rises, but nothing counted what the
    mitigation fixed: p3, no longer flagged. The summary now has old_flagged (3 prompts), new_flagged (2: p4, p9)
    and no_longer_flagged (1: p3; p5 is gone, not unflagged), in the JSON and the summary line; null where a run
    has no flags."""
    from audit.diff import _summary_line, diff_runs, render_json

    before = make_run(tmp_path / "before", [("p0", 0.0), ("p1", 1.0), ("p3", 3.0), ("p4", 4.0), ("p4", 4.0),
                                            ("p5", 5.0)], threshold=2.5)  # p5: flagged, then gone (not "no longer")
    after = make_run(tmp_path / "after", [("p0", 0.0), ("p1", 1.0), ("p3", 2.0), ("p4", 3.5), ("p9", 9.0)],
                     threshold=2.5)
    d = diff_runs(before, after)
    s = json.loads(render_json(d))["summary"]
    assert (s["newly_flagged"], s["old_flagged"], s["new_flagged"], s["no_longer_flagged"]) == (1, 3, 2, 1)
    assert s["only_old"] == 1
    assert "1 newly flagged, 1 no longer flagged (3 prompts flagged before, 2 now);" in _summary_line(d)
    uncalibrated = make_run(tmp_path / "plain", [("p0", 0.0), ("p3", 3.0)])
    s = diff_runs(uncalibrated, after).summary
    assert (s["old_flagged"], s["new_flagged"], s["no_longer_flagged"]) == (None, 2, None)
    s = diff_runs(before, uncalibrated).summary
    assert (s["old_flagged"], s["new_flagged"], s["no_longer_flagged"]) == (3, None, None)


# ---------------------------------------------------------------- run: a gate over no prompts

def test_a_fail_on_flagged_gate_over_no_rows_exits_4(tmp_path, tiny_model_dir):
    """CI screened a candidate with --fail-on-flagged 0 over a screening file that failed to upload (zero bytes):
    "0 rows flagged", exit 0, the release passed on an audit of nothing. Now a gated run that read no row exits 4
    (after writing its outputs), saying why; the same run without the gate still only warns (exit 0), as a day of
    logs without rows does; audit.run raises ScoringFailedError (exit 4's) for it."""
    from typer.testing import CliRunner

    import audit
    from audit.calibrate import write_calibration
    from audit.cli import app
    from helpers import prompts_file, run_audit

    ref, _ = run_audit([prompts_file(tmp_path / "ref.txt", 20)], tiny_model_dir, tmp_path / "ref", device="cpu",
                       batch_size=8)
    write_calibration(calibrate(ref, 0.1), tmp_path / "cal.json")
    (tmp_path / "screening.parquet").write_bytes(b"")
    args = ["run", str(tmp_path / "screening.parquet"), "--model", str(tiny_model_dir), "--device", "cpu",
            "--batch-size", "8", "--calibration", str(tmp_path / "cal.json"), "--no-progress"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "gated"), "--fail-on-flagged", "0"])
    assert res.exit_code == 4, res.output
    assert ("memaudit: error: nothing was scored: the inputs hold no rows, so --fail-on-flagged 0 has no prompt to "
            "judge") in res.output
    manifest = json.loads((tmp_path / "gated" / "manifest.json").read_text())
    assert (manifest["counts"]["rows_read"], manifest["counts"]["flagged"]) == (0, 0)
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ungated")])
    assert res.exit_code == 0 and "the inputs hold no rows; nothing was scored" in res.output, res.output
    with pytest.raises(audit.ScoringFailedError, match="has no prompt to judge"):
        audit.run(tmp_path / "screening.parquet", out=tmp_path / "api", model=str(tiny_model_dir), device="cpu",
                  batch_size=8, calibration=str(tmp_path / "cal.json"), fail_on_flagged=3, log=lambda m: None)


def test_dry_run_shows_the_gate_and_that_a_gate_over_no_rows_exits_4(tmp_path, tiny_model_dir):
    """--dry-run, the check of a CI job before its first run, showed the calibration's threshold but not the
    --fail-on-flagged gate, and said nothing of a screening set with no rows, which the gated run fails (exit 4). It
    now shows both; an ungated dry run shows neither."""
    from typer.testing import CliRunner

    from audit.calibrate import write_calibration
    from audit.cli import app

    ref = make_run(tmp_path / "ref", [(f"p{i}", float(i)) for i in range(10)])
    write_calibration(calibrate(ref, 0.1), tmp_path / "cal.json")
    (tmp_path / "screening.parquet").write_bytes(b"")
    args = ["run", str(tmp_path / "screening.parquet"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"),
            "--calibration", str(tmp_path / "cal.json"), "--dry-run"]
    res = CliRunner().invoke(app, [*args, "--fail-on-flagged", "0"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert (f"calibration: {tmp_path / 'cal.json'}: flags risk > 8 at FPR 0.1 (checked against the model when the run "
            "starts); --fail-on-flagged 0: exit 3 when more rows are flagged") in lines
    assert ("exit 4 expected: the inputs hold no rows, so --fail-on-flagged 0 has no prompt to judge (a gate over no "
            "prompts does not pass)") in lines
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "exit 4 expected" not in res.stdout and "--fail-on-flagged" not in res.stdout


# ---------------------------------------------------------------- a re-merge with a new calibration, interrupted

def test_a_risk_table_flagged_with_another_calibration_than_the_manifest_is_refused(tmp_path, tiny_model_dir):
    """A finished screening is rerun with a new calibration (it only re-merges: risk.parquet first, then
    manifest.json) and CI's timeout kills it between the two (the cache compaction runs there). The folder then held
    the new flags beside the old threshold, and `memaudit report` counted the new flags under the old "risk > T".
    Now a table whose calibration metadata differs from the manifest's (another threshold, or none on one side) is
    refused by report, diff and calibrate alike, saying to rerun; the rerun makes the folder whole."""
    import shutil

    from audit.calibrate import write_calibration
    from audit.diff import diff_runs
    from audit.errors import ReportError
    from audit.report import build_report
    from helpers import prompts_file, run_audit

    src = prompts_file(tmp_path / "p.txt", 20)
    run, _ = run_audit([src], tiny_model_dir, tmp_path / "run", device="cpu", batch_size=8)
    write_calibration(calibrate(run, 0.1), tmp_path / "cal10.json")
    write_calibration(calibrate(run, 0.25), tmp_path / "cal25.json")
    shutil.copytree(run, tmp_path / "cal")
    cal, m = run_audit([src], tiny_model_dir, tmp_path / "cal", device="cpu", batch_size=8,
                       calibration=str(tmp_path / "cal10.json"))
    assert m["counts"]["flagged"] == 2
    shutil.copytree(cal, tmp_path / "new")
    new, m = run_audit([src], tiny_model_dir, tmp_path / "new", device="cpu", batch_size=8,
                       calibration=str(tmp_path / "cal25.json"))
    assert m["counts"]["flagged"] == 5
    threshold10 = json.loads((tmp_path / "cal10.json").read_text())["threshold"]
    threshold25 = json.loads((tmp_path / "cal25.json").read_text())["threshold"]

    torn = tmp_path / "torn"  # the rerun with cal25 killed after writing risk.parquet: cal10's manifest stays
    shutil.copytree(cal, torn)
    shutil.copy(new / "risk.parquet", torn / "risk.parquet")
    with pytest.raises(ReportError) as err:
        build_report(torn)
    assert str(err.value) == (
        f"{torn / 'risk.parquet'} was flagged with another calibration (risk > {threshold25!r}) than manifest.json "
        f"records (risk > {threshold10!r}): a rerun of this folder stopped before it finished; rerun its command "
        "with the same --out to finish it")
    with pytest.raises(ReportError, match="was flagged with another calibration"):
        diff_runs(cal, torn)
    with pytest.raises(CalibrationError, match="was flagged with another calibration"):
        calibrate(torn, 0.1)
    uncal = tmp_path / "uncal"  # a rerun without --calibration killed likewise: unflagged table, calibrated manifest
    shutil.copytree(cal, uncal)
    shutil.copy(run / "risk.parquet", uncal / "risk.parquet")
    with pytest.raises(ReportError, match=r"\(no calibration\) than manifest.json records \(risk > "):
        build_report(uncal)
    assert build_report(cal).counts["flagged"] == 2 and build_report(run).counts["flagged"] is None
    _, m = run_audit([src], tiny_model_dir, torn, device="cpu", batch_size=8, calibration=str(tmp_path / "cal25.json"))
    assert build_report(torn).counts["flagged"] == m["counts"]["flagged"] == 5


def test_a_caption_csv_in_latin1_fails_the_coverage_gate(tmp_path, tiny_model_dir):
    """A caption CSV written in Latin-1 lost every row with an accent as invalid_utf8 and the run exited 0: a
    release gate passed on an audit of half its captions. Rows whose text cannot be decoded or parsed
    (invalid_utf8, invalid_csv_row, invalid_json) count toward --max-error-fraction as rows without the prompt
    column do: exit 4 after the outputs are written, with what to check; one such row in 200 stays under 1%."""
    from typer.testing import CliRunner

    from audit.cli import app

    rows = [f"a photo of a {'café' if i % 2 else 'cat'} number {i}" for i in range(20)]
    (tmp_path / "captions.csv").write_bytes(("caption\n" + "\n".join(rows) + "\n").encode("latin-1"))
    args = ["run", str(tmp_path / "captions.csv"), "--prompt-column", "caption", "--model", str(tiny_model_dir),
            "--device", "cpu", "--batch-size", "8", "--no-progress"]
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "r1")])
    assert res.exit_code == 4, res.output
    assert res.stderr.splitlines()[-1] == (
        "memaudit: error: 10 of 20 rows read (50.0%) could not be read as prompts (invalid_utf8 10), more than "
        "--max-error-fraction 0.01: the audit covers only part of its input (a file in another encoding than "
        "UTF-8? convert it, e.g. iconv -f latin1 -t utf-8; or JSON escapes of half an emoji (\\ud83d), named in "
        "rejects.parquet's detail; rejects.parquet names each row's file)")
    manifest = json.loads((tmp_path / "r1" / "manifest.json").read_text())
    assert manifest["counts"]["scored"] == 10 and manifest["counts"]["rejected_by_reason"] == {"invalid_utf8": 10}
    one_bad = [f"a photo of a cat number {i}".encode() for i in range(199)] + ["un café".encode("latin-1")]
    (tmp_path / "big.csv").write_bytes(b"caption\n" + b"\n".join(one_bad) + b"\n")
    args[1] = str(tmp_path / "big.csv")
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "r2")])
    assert res.exit_code == 0, res.output  # 1 of 200: 0.5%
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red cat"}\n{"prompt": "a dog",\n[1, 2]\n')
    res = CliRunner().invoke(app, ["run", str(tmp_path / "p.jsonl")] + args[4:] + ["--out", str(tmp_path / "r3")])
    assert res.exit_code == 4 and "(invalid_json 2)" in res.stderr.splitlines()[-1], res.output
    assert "lines that are not JSON objects? rejects.parquet's detail says why" in res.stderr
