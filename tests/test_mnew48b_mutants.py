"""Mutation review of session 48's changes (runner gates, dry-run forecasts, shard merge, diff, tables): each test
kills a mutant that the suite let survive, with exact values."""

from __future__ import annotations

import json

import pytest


def _run_args(path, model, out):
    return ["run", str(path), "--model", str(model), "--device", "cpu", "--batch-size", "8", "--no-progress",
            "--out", str(out)]


def test_ragged_csv_rows_count_toward_the_coverage_gate_with_their_hint(tmp_path, tiny_model_dir):
    """A CSV whose prompts hold unquoted commas loses those rows as invalid_csv_row: more than --max-error-fraction
    of them exits 4 (after the outputs are written), naming the reason and what to check; under the bound, exit 0."""
    from typer.testing import CliRunner

    from audit.cli import app

    rows = [f"a cat, oil painting, number {i}" if i % 4 == 0 else f"a dog number {i}" for i in range(8)]
    (tmp_path / "p.csv").write_text("prompt\n" + "\n".join(rows) + "\n")
    res = CliRunner().invoke(app, _run_args(tmp_path / "p.csv", tiny_model_dir, tmp_path / "r1"))
    assert res.exit_code == 4, res.output
    assert res.stderr.splitlines()[-1] == (
        "memaudit: error: 2 of 8 rows read (25.0%) could not be read as prompts (invalid_csv_row 2), more than "
        "--max-error-fraction 0.01: the audit covers only part of its input (a CSV whose prompts hold unquoted "
        "commas? quote them; rejects.parquet names each row's file)")
    manifest = json.loads((tmp_path / "r1" / "manifest.json").read_text())
    assert (manifest["counts"]["scored"], manifest["counts"]["rejected_by_reason"]) == (6, {"invalid_csv_row": 2})
    res = CliRunner().invoke(app, _run_args(tmp_path / "p.csv", tiny_model_dir, tmp_path / "r2")
                             + ["--max-error-fraction", "0.25"])
    assert res.exit_code == 0, res.output  # 2 of 8 is not more than 0.25


def test_recorded_failures_leave_out_a_run_that_scored_nothing_and_use_its_recorded_fraction(tmp_path):
    """A finished run's exit-4 reasons as the report, diff and calibrate read them: none for a run that scored
    nothing (nothing_scored says that, not "3 of 3 rows could not be scored"), the error gate's and the coverage
    gate's messages otherwise, under the run's own --max-error-fraction."""
    from audit.gates import recorded_failures

    def manifest(scored, rejected, fraction=None):
        m = {"counts": {"scored": scored, "rejected_by_reason": rejected,
                        "rows_read": scored + sum(rejected.values())},
             "memaudit_build": "0123456789ab"}  # made by a memaudit that gated undecodable rows
        if fraction is not None:
            m["run_config"] = {"max_error_fraction": fraction}
        return m

    assert recorded_failures(tmp_path, manifest(0, {"scoring_error": 3})) == []
    assert recorded_failures(tmp_path, manifest(0, {"invalid_utf8": 3})) == []
    assert recorded_failures(tmp_path, manifest(1, {"scoring_error": 3})) == [
        f"3 of 4 rows (75.0%) could not be scored (scoring_error 3), more than --max-error-fraction 0.01. The "
        f"outputs in {tmp_path} hold what was scored"]
    assert recorded_failures(tmp_path, manifest(3, {"scoring_error": 1}, fraction=0.25)) == []  # 1 of 4: not more
    assert recorded_failures(tmp_path, manifest(3, {"invalid_json": 1}, fraction=0.2)) == [
        "1 of 4 rows read (25.0%) could not be read as prompts (invalid_json 1), more than --max-error-fraction 0.2: "
        "the audit covers only part of its input (lines that are not JSON objects? rejects.parquet's detail says why; "
        "rejects.parquet names each row's file)"]


def test_a_gated_dry_run_over_rows_forecasts_no_exit_4(tmp_path, tiny_model_dir):
    """The exit_4_no_rows forecast is for a gate over inputs with no row only: a gated dry run over two prompts
    shows the gate and no exit 4 (summary without exit_4_no_rows); over an empty input it forecasts exit 4."""
    from audit.calibrate import write_calibration
    from audit.config import RunConfig
    from audit.runner import dry_run
    from test_report_mutants import make_run

    from audit.calibrate import calibrate

    ref = make_run(tmp_path / "ref", [(f"p{i}", float(i)) for i in range(10)])
    write_calibration(calibrate(ref, 0.1), tmp_path / "cal.json")
    (tmp_path / "two.txt").write_text("a red cat\na blue dog\n")
    (tmp_path / "none.txt").write_text("")
    kw = dict(model=str(tiny_model_dir), calibration=str(tmp_path / "cal.json"), fail_on_flagged=0, device="cpu")
    summary = dry_run(RunConfig(inputs=[str(tmp_path / "two.txt")], out=str(tmp_path / "o1"), **kw), log=lambda m: None)
    assert summary["rows"] == 2 and summary["calibration"]["fail_on_flagged"] == 0
    assert "exit_4_no_rows" not in summary and "exit_4" not in summary
    summary = dry_run(RunConfig(inputs=[str(tmp_path / "none.txt")], out=str(tmp_path / "o2"), **kw),
                      log=lambda m: None)
    assert summary["exit_4_no_rows"] == 0 and "exit_4" not in summary


def test_empty_shards_count_one_row_each_toward_a_merge_group():
    """_merge_groups: an empty shard counts 1 toward the fan_in * batch_rows a group holds (its docstring), so a
    run of 25 empty shards with room for 20 is cut in two groups, not merged as one."""
    from audit.pipeline import _merge_groups

    assert _merge_groups([0] * 25, 2, 10, 256) == [(0, 20), (20, 25)]
    assert _merge_groups([0] * 19 + [2], 2, 10, 256) == [(0, 19), (19, 20)]  # 19 + 2 = 21 > 20


def test_the_stale_note_counts_only_committed_units_of_an_older_table(tmp_path, tiny_model_dir):
    """A unit with an older table's risk shard but no commit marker (cut before its commit) is not "committed by
    an earlier memaudit": the rerun's note counts the 5 committed units of 6, and the tables equal a fresh run's."""
    import polars as pl

    from audit.pipeline import RunConfig
    from audit.runner import execute
    from helpers import prompts_file, run_audit
    from test_uupgrade_findings import _as_old_shards

    src = prompts_file(tmp_path / "p.txt", 24, seed=3)
    fresh, _ = run_audit([src], tiny_model_dir, tmp_path / "fresh", unit_rows=4, batch_size=4)
    old = tmp_path / "old"
    run_audit([src], tiny_model_dir, old, unit_rows=4, batch_size=4)
    assert _as_old_shards(old) == 6
    (old / "shards" / "unit-000002.done.json").unlink()  # cut before its commit
    for name in ("risk.parquet", "rejects.parquet", "manifest.json"):
        (old / name).unlink(missing_ok=True)
    notes = []
    cfg = RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(old), unit_rows=4, batch_size=4)
    _, manifest = execute(cfg, progress=False, log=notes.append)
    assert [n for n in notes if "earlier memaudit whose tables" in n] == [
        f"memaudit: 5 units of {old} were committed by an earlier memaudit whose tables had other columns: scored "
        "again with this version"]
    assert manifest["counts"]["scored"] == 24
    cols = ["prompt_id", "risk"]
    assert pl.read_parquet(old / "risk.parquet", columns=cols).equals(pl.read_parquet(fresh / "risk.parquet",
                                                                                       columns=cols))


def test_a_score_setting_one_run_did_not_record_is_told_apart_from_a_chosen_none():
    """_comparability: a score setting the old run's memaudit did not record, which the new run records as None,
    is a difference said as "not recorded", not two equal Nones passed over; a None both record is no difference."""
    from audit.diff import _comparability

    model = {"name": "m", "fingerprint": "f" * 16}
    old = {"model": model, "score_config": {"seed": 0}, "counts": {"scored": 2}}
    new = {"model": model, "score_config": {"seed": 0, "unet_encoder_attention_mask": None}, "counts": {"scored": 2}}
    assert _comparability(old, new) == [
        "the runs used different score settings (unet_encoder_attention_mask (not recorded by that run's earlier "
        "memaudit) -> None)"]
    assert _comparability(new, new) == []


def test_an_out_folder_taken_between_the_check_and_the_lock_is_refused_not_renamed(tmp_path, monkeypatch,
                                                                                      tiny_model_dir):
    """With --out, a folder another run locks after this run checked it (before its model loaded) is refused
    (RunFolderBusyError, exit 75), never swapped for a default-style folder: only a default --out takes the next
    free name of its second."""
    import contextlib

    import audit
    import audit.runner as runner
    from audit.errors import RunFolderBusyError
    from audit.pipeline import out_lock

    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.txt").write_text("a red cat\na blue dog\n")
    real_check = runner.check_not_busy
    other = contextlib.ExitStack()

    def other_run_takes_it(out):
        real_check(out)
        other.enter_context(out_lock(out))

    monkeypatch.setattr(runner, "check_not_busy", other_run_takes_it)
    with other, pytest.raises(RunFolderBusyError):
        audit.run("two.txt", out="mine", model=str(tiny_model_dir), device="cpu")
    assert not (tmp_path / "memaudit-runs").exists()
    assert not (tmp_path / "mine" / "risk.parquet").exists()


def test_a_model_folder_that_no_longer_holds_the_new_run_s_model_makes_no_same_files_claim(tmp_path, tiny_model_dir):
    """The diff's "not their model files" note needs the other run's model folder to hold that run's model still:
    when the folder's files now fingerprint otherwise (replaced since the new run), the old run's earlier-memaudit
    fingerprint of those files says nothing of the new run's model, and the runs are "different models"."""
    from audit.diff import _comparability
    from audit.models.base import fingerprint_files
    from test_uupgrade_findings import _model_with_sentencepiece_file

    model, earlier = _model_with_sentencepiece_file(tmp_path, tiny_model_dir)
    now = fingerprint_files(model)
    base = {"score_config": {"seed": 0}, "counts": {"scored": 2}}
    old = base | {"model": {"name": "m", "path": str(model), "fingerprint": earlier}}
    new = base | {"model": {"name": "m", "path": str(model), "fingerprint": "0123456789abcdef"}}
    assert _comparability(old, new) == ["the runs used different models (m [" + earlier + "] vs m [0123456789abcdef])"]
    new["model"]["fingerprint"] = now  # the folder holds the new run's model: the same files
    assert _comparability(old, new)[0].startswith(f"the runs' model fingerprints differ ([{earlier}] vs [{now}]), but "
                                                  "not their model files: an earlier memaudit fingerprinted")


def test_a_dry_run_refused_as_busy_forecasts_no_exit_4_for_a_gate_over_no_rows(tmp_path, tiny_model_dir):
    """A run that would be refused never reaches its gates: a gated dry run over an empty input whose --out another
    run holds says the folder is busy (exit 75), not that the run will exit 4; with the folder free, it says exit 4."""
    from typer.testing import CliRunner

    from audit.calibrate import calibrate, write_calibration
    from audit.cli import app
    from audit.pipeline import out_lock
    from test_report_mutants import make_run

    ref = make_run(tmp_path / "ref", [(f"p{i}", float(i)) for i in range(10)])
    write_calibration(calibrate(ref, 0.1), tmp_path / "cal.json")
    (tmp_path / "none.txt").write_text("")
    args = ["run", str(tmp_path / "none.txt"), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"),
            "--calibration", str(tmp_path / "cal.json"), "--fail-on-flagged", "0", "--dry-run"]
    with out_lock(tmp_path / "o"):
        res = CliRunner().invoke(app, args)
    assert res.exit_code == 75, res.output
    assert "exit 4 expected" not in res.stdout
    assert any(line.startswith(f"--out {tmp_path / 'o'}: would be refused now (exit 75)") for line in
               res.stdout.splitlines())
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "exit 4 expected: the inputs hold no rows" in res.stdout, res.output


def test_a_line_to_a_closed_stderr_is_dropped_and_the_exit_code_still_says_sighup(monkeypatch):
    """After SIGHUP the terminal is gone and writing to stderr raises OSError (EIO): say() drops the line, and
    guarded() still ends the command with 129 (128 + SIGHUP), not with a traceback from the write."""
    import errno
    import signal

    import typer

    import audit.cli.common as common
    from audit.faults import Terminated

    def gone(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(typer, "echo", gone)
    common.say("memaudit: a line nobody reads")

    def hung_up():
        raise Terminated(signal.SIGHUP)

    with pytest.raises(typer.Exit) as exit_:
        common.guarded(hung_up)
    assert exit_.value.exit_code == 129


def test_a_risk_table_with_unreadable_calibration_metadata_is_refused_saying_so(tmp_path, tiny_model_dir):
    """A run's risk table whose memaudit.calibration metadata cannot be read (damaged), beside a manifest without a
    calibration, is refused: the table's flags come from no calibration the manifest records. The refusal said
    "flagged with another calibration (no calibration) than manifest.json records (no calibration)"; it now names
    the table's side as metadata that cannot be read."""
    from helpers import torn_calibration_refusal

    run, said = torn_calibration_refusal(tmp_path, tiny_model_dir, b"{not json")
    assert said == (
        f"{run / 'risk.parquet'} was flagged with another calibration (calibration metadata that cannot be read) than "
        "manifest.json records (no calibration): a rerun of this folder stopped before it finished; rerun its command "
        "with the same --out to finish it")


def test_a_default_folder_taken_by_another_run_moves_the_resume_hint_to_the_next_name(tmp_path, monkeypatch):
    """Without --out, a dated folder that another run finished in since this run named it is skipped for
    <stamp>-2, and an interruption from then on names that folder to resume, not the other run's."""
    from pathlib import Path

    from audit.config import RunConfig
    from audit.faults import RUN_FOLDER, resume_hint
    from audit.runner import _locked_run_folder

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(RUN_FOLDER, "path", "memaudit-runs/20261207-120000")
    taken = tmp_path / "memaudit-runs" / "20261207-120000"
    taken.mkdir(parents=True)
    (taken / "run.json").write_text("{}")  # the other run's
    cfg = RunConfig(inputs=("p.txt",))
    with _locked_run_folder(cfg, Path("memaudit-runs/20261207-120000"), log=lambda m: None) as out:
        assert out == Path("memaudit-runs/20261207-120000-2")
        assert resume_hint() == "rerun with --out memaudit-runs/20261207-120000-2 to resume"
    assert sorted(p.name for p in (tmp_path / "memaudit-runs").iterdir()) == ["20261207-120000",
                                                                              "20261207-120000-2"]


def test_the_coverage_gate_gives_a_hint_for_each_reason_in_order():
    """Rows lost for two reasons get both hints, in the order of the reasons."""
    from types import SimpleNamespace

    from audit.gates import coverage_gate

    manifest = {"counts": {"rows_read": 10, "scored": 6,
                           "rejected_by_reason": {"missing_prompt_column": 3, "invalid_utf8": 1, "null_prompt": 2}}}
    assert coverage_gate(SimpleNamespace(max_error_fraction=0.01), manifest) == (
        "4 of 10 rows read (40.0%) could not be read as prompts (missing_prompt_column 3, invalid_utf8 1), more than "
        "--max-error-fraction 0.01: the audit covers only part of its input (a file with another prompt column? "
        "--prompt-column; a file in another encoding than UTF-8? convert it, e.g. iconv -f latin1 -t utf-8; "
        "or JSON escapes of half an emoji (\\ud83d), named in rejects.parquet's detail; rejects.parquet names each "
        "row's file)")
    assert coverage_gate(SimpleNamespace(max_error_fraction=0.4), manifest) is None  # 4 of 10 is not more than 0.4


def test_a_dry_run_over_no_rows_beside_a_skipped_unsupported_file_forecasts_no_exit_4(tmp_path, tiny_model_dir):
    """Only files skipped as unreadable make a run over no rows exit 4 (nothing_scored); a folder whose one table
    holds no row, beside a README.md skipped for its extension, runs to exit 0 with a warning, and its dry run
    forecasts no exit 4."""
    from audit.config import RunConfig
    from audit.runner import dry_run

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p.csv").write_text("prompt\n")
    (tmp_path / "in" / "README.md").write_text("# prompts\n")
    summary = dry_run(RunConfig(inputs=(str(tmp_path / "in"),), model=str(tiny_model_dir), out=str(tmp_path / "o"),
                                device="cpu"), log=lambda m: None)
    assert summary["rows"] == 0 and [s["path"].rsplit("/", 1)[-1] for s in summary["skipped_files"]] == ["README.md"]
    assert "exit_4" not in summary


def test_the_empty_gate_is_for_no_row_read_not_for_rows_all_rejected():
    """empty_gate speaks only of inputs that hold no rows: a gated run that read 3 rows and rejected them all fails
    through nothing_scored (its reasons), which run_failure says first; with no row read, the gate's message."""
    from types import SimpleNamespace

    from audit.gates import empty_gate, run_failure

    cfg = SimpleNamespace(fail_on_flagged=0, max_error_fraction=0.01)
    rejected = {"counts": {"rows_read": 3, "scored": 0, "rejected_by_reason": {"empty_prompt": 3}}, "files": []}
    assert empty_gate(cfg, rejected) is None
    assert run_failure(cfg, None, rejected) == ("nothing was scored: all 3 rows read were rejected (empty_prompt 3); "
                                                "rejects.parquet says why for each")
    empty = {"counts": {"rows_read": 0, "scored": 0, "rejected_by_reason": {}}, "files": []}
    assert run_failure(cfg, None, empty) == empty_gate(cfg, empty) == (
        "nothing was scored: the inputs hold no rows, so --fail-on-flagged 0 has no prompt to judge (an empty "
        "screening set, or a file that failed to upload?); a gate over no prompts does not pass")
    assert empty_gate(SimpleNamespace(fail_on_flagged=None), empty) is None


def test_no_longer_flagged_counts_the_prompts_unflagged_not_those_still_flagged(tmp_path):
    """Before a mitigation p3..p6 are flagged (threshold 2.5); after it only p6 is, and p7 newly: 3 prompts no
    longer flagged (p3, p4, p5), 1 still flagged, 1 newly flagged."""
    from audit.diff import _summary_line, diff_runs
    from test_report_mutants import make_run

    before = make_run(tmp_path / "before", [("p0", 0.0), ("p3", 3.0), ("p4", 4.0), ("p5", 5.0), ("p6", 6.0),
                                            ("p7", 1.0)], threshold=2.5)
    after = make_run(tmp_path / "after", [("p0", 0.0), ("p3", 1.0), ("p4", 2.0), ("p5", 2.5), ("p6", 7.0),
                                          ("p7", 3.0)], threshold=2.5)
    d = diff_runs(before, after)
    s = d.summary
    assert (s["newly_flagged"], s["old_flagged"], s["new_flagged"], s["no_longer_flagged"]) == (1, 4, 2, 3)
    assert "1 newly flagged, 3 no longer flagged (4 prompts flagged before, 2 now);" in _summary_line(d)


def test_a_torn_calibration_under_a_run_that_writes_the_folder_says_to_wait(tmp_path, tiny_model_dir):
    """The same torn table while another memaudit run holds the folder's lock (its rerun between risk.parquet and
    manifest.json): the refusal says to wait for that run, not to rerun the command."""
    import pyarrow.parquet as pq

    from audit.errors import ReportError
    from audit.pipeline import out_lock
    from audit.report import build_report
    from audit.tables import lock_holder
    from helpers import prompts_file, run_audit

    run, _ = run_audit([prompts_file(tmp_path / "p.txt", 4)], tiny_model_dir, tmp_path / "run", device="cpu",
                       batch_size=8)
    table = pq.read_table(run / "risk.parquet")
    cal = b'{"threshold": 0.5}'
    pq.write_table(table.replace_schema_metadata(dict(table.schema.metadata) | {b"memaudit.calibration": cal}),
                   run / "risk.parquet")
    with out_lock(run), pytest.raises(ReportError) as err:
        build_report(run)
    assert str(err.value) == (
        f"{run / 'risk.parquet'} was flagged with another calibration (risk > 0.5) than manifest.json records (no "
        f"calibration): a memaudit run is writing this folder right now ({lock_holder(run)}): wait for it to finish")
    assert lock_holder(run).startswith("process ")  # the holder out_lock recorded, named since ukill


def test_a_real_html_report_is_overwritten_by_the_next_report(tmp_path):
    """check_output_file finds the <title> of the page memaudit renders (after its charset and Content-Security-Policy
    lines, some 200 bytes in: the hand-made head of the other test has it at once), so `memaudit report RUN -o
    page.html` run again replaces its own page."""
    from typer.testing import CliRunner

    from audit.cli import app
    from test_report_mutants import make_run

    run = make_run(tmp_path / "run", [("p0", 0.0), ("p1", 1.0)])
    page = tmp_path / "page.html"
    for _ in range(2):
        res = CliRunner().invoke(app, ["report", str(run), "--output", str(page)])
        assert res.exit_code == 0, res.output
    assert "<title>memaudit report: run</title>" in page.read_text()
