"""A finished run is judged afterwards (report, diff, calibrate) by the reject reasons its own exit 4 counted, which
its manifest records (``gated_reasons``), not by a later memaudit's. Run folders are written by hand with known
risks (``make_run``) except where a real run's manifest is read."""

from __future__ import annotations

import json

import pytest

from audit.calibrate import calibrate
from audit.errors import CalibrationError
from audit.gates import INPUT_FAILURES, SCORING_FAILURES, gated_reasons, recorded_failures, recorded_reasons
from test_report_mutants import make_run

ROWS = [(f"p{i}", float(i)) for i in range(98)]


def _rejects(run, rejected_by_reason: dict, **keys):
    """Give a ``make_run`` folder's manifest these rejects (counts reconcile) and these top-level keys; a key set to
    None is removed (a manifest written before that key existed)."""
    path = run / "manifest.json"
    m = json.loads(path.read_text())
    m["counts"].update(rejected_by_reason=dict(rejected_by_reason), rejected=sum(rejected_by_reason.values()))
    m["counts"]["rows_read"] = m["counts"]["scored"] + m["counts"]["rejected"]
    for k, v in keys.items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    path.write_text(json.dumps(m))
    return run


def test_a_real_run_records_the_reasons_its_exit_4_counts(tmp_path, tiny_model_dir):
    """manifest.json's gated_reasons are the gates' two reason lists, in their order."""
    from test_mnew48b_mutants import _run_args
    from typer.testing import CliRunner

    from audit.cli import app

    (tmp_path / "p.txt").write_text("a red cat\na blue dog\n")
    res = CliRunner().invoke(app, _run_args(tmp_path / "p.txt", tiny_model_dir, tmp_path / "r"))
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["gated_reasons"] == {"scoring": list(SCORING_FAILURES), "input": list(INPUT_FAILURES)}
    assert gated_reasons() == manifest["gated_reasons"]


def test_a_run_gated_by_fewer_reasons_keeps_its_verdict(tmp_path):
    """98 scored and 2 invalid_utf8 (2% > the default 1%): under today's reasons that is exit 4, and calibrate
    refuses it. A run whose manifest records that invalid_utf8 was not gated (it exited 0) is judged as it ran:
    no failure, and calibrate takes it (fpr 0.05 of 98 risks 0..97: k = 4, the 94th smallest, 93.0)."""
    today = _rejects(make_run(tmp_path / "today", ROWS), {"invalid_utf8": 2})
    assert recorded_failures(today, json.loads((today / "manifest.json").read_text())) == [
        "2 of 100 rows read (2.0%) could not be read as prompts (invalid_utf8 2), more than --max-error-fraction "
        "0.01: the audit covers only part of its input (a file in another encoding than UTF-8? convert it, e.g. "
        "iconv -f latin1 -t utf-8; or JSON escapes of half an emoji (\\ud83d), named in rejects.parquet's detail; "
        "rejects.parquet names each row's file)"]
    with pytest.raises(CalibrationError, match=r"failed \(exit 4\): 2 of 100 rows read"):
        calibrate(today, 0.05)
    earlier = _rejects(make_run(tmp_path / "earlier", ROWS), {"invalid_utf8": 2},
                       gated_reasons={"scoring": list(SCORING_FAILURES), "input": ["missing_prompt_column"]})
    assert recorded_failures(earlier, json.loads((earlier / "manifest.json").read_text())) == []
    assert calibrate(earlier, 0.05)["threshold"] == 93.0


@pytest.mark.parametrize("build, failed", [(None, False), ("0123456789ab", True)])
def test_a_manifest_without_recorded_reasons_is_judged_by_the_memaudit_that_wrote_it(tmp_path, build, failed):
    """Before gated_reasons: a manifest without memaudit_build was written before undecodable rows were gated (only
    rows of files without the prompt or id column were); one with it, by a memaudit that gated today's reasons."""
    run = _rejects(make_run(tmp_path / "r", ROWS), {"invalid_csv_row": 2}, gated_reasons=None, memaudit_build=build)
    manifest = json.loads((run / "manifest.json").read_text())
    assert recorded_reasons(manifest) == (list(SCORING_FAILURES), (
        ["missing_prompt_column", "missing_id_column", "invalid_utf8", "invalid_csv_row", "invalid_json"] if build
        else ["missing_prompt_column", "missing_id_column"]))  # (prompt_not_string joined with gated_reasons recorded)
    assert bool(recorded_failures(run, manifest)) is failed
    missing = _rejects(make_run(tmp_path / "m", ROWS), {"missing_prompt_column": 2}, gated_reasons=None,
                       memaudit_build=build)
    assert recorded_failures(missing, json.loads((missing / "manifest.json").read_text())) == [
        "2 of 100 rows read (2.0%) could not be read as prompts (missing_prompt_column 2), more than "
        "--max-error-fraction 0.01: the audit covers only part of its input (a file with another prompt column? "
        "--prompt-column; rejects.parquet names each row's file)"]


def test_a_recorded_reason_this_memaudit_has_no_hint_for_still_gates(tmp_path):
    """A manifest recording a reason this build does not know (a later memaudit's) counts it, with the generic
    hint, rather than failing on a missing hint."""
    run = _rejects(make_run(tmp_path / "r", ROWS), {"invalid_avro": 2},
                   gated_reasons={"scoring": list(SCORING_FAILURES), "input": ["invalid_avro"]})
    assert recorded_failures(run, json.loads((run / "manifest.json").read_text())) == [
        "2 of 100 rows read (2.0%) could not be read as prompts (invalid_avro 2), more than --max-error-fraction "
        "0.01: the audit covers only part of its input (rejects.parquet's detail says why; rejects.parquet names "
        "each row's file)"]


def test_the_report_shows_the_verdict_the_run_had(tmp_path):
    """The report of the earlier run (2% invalid_utf8, not gated then) shows no "the run failed (exit 4)" line; the
    same counts under today's reasons do."""
    from audit.report import build_report

    bad = [("in/b.csv", "invalid_utf8")] * 2
    earlier = _rejects(make_run(tmp_path / "earlier", ROWS, rejects=bad), {"invalid_utf8": 2}, gated_reasons=None)
    today = _rejects(make_run(tmp_path / "today", ROWS, rejects=bad), {"invalid_utf8": 2})
    assert build_report(earlier).warnings == []
    assert build_report(today).warnings == [
        "the run failed (exit 4): 2 of 100 rows read (2.0%) could not be read as prompts (invalid_utf8 2), more than "
        "--max-error-fraction 0.01: the audit covers only part of its input (a file in another encoding than UTF-8? "
        "convert it, e.g. iconv -f latin1 -t utf-8; or JSON escapes of half an emoji (\\ud83d), named in rejects.parquet's "
        "detail; rejects.parquet names each row's file)"]


def test_blank_json_lines_are_empty_prompts_not_gated(tmp_path, tiny_model_dir):
    """A JSON-lines export with a blank line between records and two at its end (writers that end each record with
    a blank line): its 2 of 5 lines were invalid_json ("empty line"), 40% of the rows read, and the run exited 4
    ("the audit covers only part of its input"). A blank line holds no prompt, as a blank .txt line: it is an
    empty_prompt reject, kept and counted, and the run exits 0. A line that is not JSON still gates."""
    from test_mnew48b_mutants import _run_args
    from typer.testing import CliRunner

    from audit.cli import app

    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "a red cat"}\n \n{"prompt": "a blue dog"}\n\n')
    res = CliRunner().invoke(app, _run_args(src, tiny_model_dir, tmp_path / "r"))
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert (manifest["counts"]["rows_read"], manifest["counts"]["scored"],
            manifest["counts"]["rejected_by_reason"]) == (4, 2, {"empty_prompt": 2})
    import pyarrow.parquet as pq

    rejects = pq.read_table(tmp_path / "r" / "rejects.parquet").to_pylist()
    assert sorted((r["row"], r["reason"], r["prompt"]) for r in rejects) == [(1, "empty_prompt", " "),
                                                                              (3, "empty_prompt", "")]
    src.write_text('{"prompt": "a red cat"}\n{"prompt": "a blue dog"}\nnot json\n')
    res = CliRunner().invoke(app, _run_args(src, tiny_model_dir, tmp_path / "r2"))
    assert res.exit_code == 4 and "invalid_json 1" in res.output, res.output
