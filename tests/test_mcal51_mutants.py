"""Mutation review of calibrate.py and gates.py (session 51): tests that pin what the others left open."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.calibrate import CalibrationError, reference_risks


def test_reference_risks_keep_the_first_row_of_each_prompt_hash_in_file_order(tmp_path):
    # a prompt on 3 rows is one reference prompt; its first row's risk stands for it (documented: "first row per
    # prompt_hash"), and the order is the file's, not sorted by hash or risk
    pq.write_table(pa.table({"prompt_hash": ["h2", "h1", "h2", "h3", "h1"], "risk": [0.5, 0.9, 0.7, 0.1, 0.2]}),
                   tmp_path / "risk.parquet")
    risks = reference_risks(tmp_path)
    assert risks.dtype == np.float64 and risks.tolist() == [0.5, 0.9, 0.1]


def test_reference_risks_of_a_folder_without_a_risk_table_name_it(tmp_path):
    with pytest.raises(CalibrationError, match=f"^{tmp_path} is not a finished memaudit run \\(no risk.parquet\\)$"):
        reference_risks(tmp_path)


@pytest.mark.parametrize("text, near", [("1e-330", 0), ("1e-500", 0), ("0.5e-400%", 0), ("0.99999999999999999", 1),
                                        ("99.999999999999999%", 1)])
def test_an_fpr_a_float_cannot_tell_from_0_or_1_is_refused_as_given(tmp_path, text, near):
    # --fpr 1e-330 (0.0 as a float) was refused as "--fpr 0.0: must be between 0 and 1", naming what the user did not
    # write, and --fpr 1e-500 as not between 0 and 1, which it is
    from typer.testing import CliRunner

    from audit.cli import app

    res = CliRunner().invoke(app, ["calibrate", str(tmp_path / "ref"), "--fpr", text, "-o", str(tmp_path / "c.json")])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        f"memaudit: error: --fpr {text}: too close to {near} to tell apart from it (it reads as {float(near)!r}); give "
        "a fraction between 0 and 1, both excluded (e.g. 0.01 or 1%)"], res.output
    assert not (tmp_path / "c.json").exists()


def test_an_fpr_of_zero_or_below_written_with_a_long_exponent_is_out_of_range():
    from audit.calibrate import parse_fpr

    for text in ("-1e-500", "0e-500", "0.000e-400", "-0"):
        with pytest.raises(CalibrationError, match=f"^--fpr {text}: must be between 0 and 1 \\(0% and 100%\\), both "):
            parse_fpr(text)
    assert parse_fpr("1e-320") == 1e-320 and parse_fpr("4.9e-324") == 5e-324  # the smallest floats still calibrate


def test_a_share_is_the_exact_decimal_written_up_to_exponent_10000_and_none_past_the_float_range():
    from fractions import Fraction

    from audit.calibrate import decimal_share

    # exact up to a decimal exponent of 10000 (the float of 1e-300 is not 1/10**300; 1e-401 was read as the float 0,
    # so --confirm-top 1e-500 was refused as 0 while 1e-300 confirmed one prompt: test_ufixcli_findings); past it,
    # +-10**-10000, the sign kept
    assert decimal_share("1e-300") == Fraction(1, 10**300) and decimal_share("3e-400") == Fraction(3, 10**400)
    assert decimal_share("1e-401") == Fraction(1, 10**401) and decimal_share("-2.5e+2%") == Fraction(-5, 2)
    # 1e309 and 1e400 are past the largest float, as 1e99999 is: not a number memaudit can use
    for text in ("1e309", "1e400", "-1e400", "1e400%"):
        assert decimal_share(text) is None, text
    assert decimal_share("1e308") == 10**308 and decimal_share("1/2") is None and decimal_share(" 1/2 %") is None
    # the space before a % is not part of the exponent: "1e-99999999 %" would otherwise build 10**99999999
    assert decimal_share("1e-500 %") == Fraction(1, 10**502)
    assert decimal_share("1e-99999999  %") == Fraction(1, 10**10002)


@pytest.mark.parametrize("rejects", [(), (("in/a.parquet", "empty_prompt"),) * 3])
def test_a_finished_run_that_scored_no_prompt_is_refused_as_a_reference(tmp_path, rejects):
    # an empty input, or every row empty: the run finished (exit 0, a warning), with an empty risk table; calibrate
    # refuses it by name rather than failing on the threshold of no risks
    from audit.calibrate import calibrate
    from test_report_mutants import make_run

    run = make_run(tmp_path / "ref", [], rejects=rejects)
    with pytest.raises(CalibrationError, match=f"^{run} has no scored prompts to calibrate on$"):
        calibrate(run, 0.01)


def test_the_error_gate_s_hint_of_a_failure_without_detail_ends_at_its_reason(tmp_path):
    # a null detail (a scoring failure recorded without an exception text) reads "the first: scoring_error", not
    # "the first: scoring_error: None"
    from types import SimpleNamespace

    from audit.gates import error_gate

    pq.write_table(pa.table({"reason": ["null_prompt", "scoring_error"],
                             "detail": pa.array([None, None], pa.string())}), tmp_path / "rejects.parquet")
    manifest = {"counts": {"rows_read": 4, "scored": 2, "rejected_by_reason": {"null_prompt": 1, "scoring_error": 1}}}
    assert error_gate(SimpleNamespace(max_error_fraction=0.01), tmp_path, manifest) == (
        "1 of 3 rows (33.3%) could not be scored (scoring_error 1), more than --max-error-fraction 0.01; the first: "
        f"scoring_error. The outputs in {tmp_path} hold what was scored.")


def test_a_calibration_records_the_reference_run_its_inputs_and_its_tokenizer(tmp_path):
    # what a reader of the file has to find the reference again, and what a run's tokenizer warning compares
    import json

    from audit.calibrate import calibrate
    from test_report_mutants import make_run

    run = make_run(tmp_path / "ref", [("a", 1.0), ("b", 2.0)])
    manifest = json.loads((run / "manifest.json").read_text())
    tokenizer = {"class": "CLIPTokenizer", "fast": False, "files_sha256": "ab12", "ftfy": True}
    manifest["inputs"], manifest["model"]["tokenizer"] = ["data/ordinary.parquet", "more.txt"], tokenizer
    (run / "manifest.json").write_text(json.dumps(manifest))
    cal = calibrate(tmp_path / "ref" / ".." / "ref", 0.25)
    assert cal["reference"]["run"] == str(run.resolve()) and cal["reference"]["inputs"] == manifest["inputs"]
    assert cal["model"] == {"name": manifest["model"]["name"], "fingerprint": manifest["model"]["fingerprint"],
                            "tokenizer": tokenizer}


def test_counts_from_a_billion_keep_three_significant_digits():
    from audit.calibrate import _count, small_reference_warning

    assert _count(999_999_999) == "999,999,999" and _count(1_234_567_902) == "1.23e+09"
    # 10 / 8.1e-9 = 1,234,567,901.2...: the warning asks for 1.23e+09 reference prompts, not 1.2e+09
    assert small_reference_warning({"reference": {"size": 2}, "fpr": 8.1e-9}).endswith(
        "; 1.23e+09 or more reference prompts give a steadier threshold")


def test_the_gates_write_a_zero_fraction_as_the_option_takes_it(tmp_path):
    # --max-error-fraction 0.0 reads "more than --max-error-fraction 0", as --help and the dry run write it, not 0.0
    from types import SimpleNamespace

    from audit.gates import coverage_gate, error_gate

    limits = SimpleNamespace(max_error_fraction=0.0)
    manifest = {"counts": {"rows_read": 10, "scored": 8, "rejected_by_reason": {"scoring_error": 1, "invalid_json": 1}}}
    assert error_gate(limits, tmp_path, manifest) == (  # no rejects.parquet: no hint, the counts still gate
        "1 of 9 rows (11.1%) could not be scored (scoring_error 1), more than --max-error-fraction 0. The outputs in "
        f"{tmp_path} hold what was scored.")
    assert coverage_gate(limits, manifest).startswith(
        "1 of 10 rows read (10.0%) could not be read as prompts (invalid_json 1), more than --max-error-fraction 0: ")


def test_the_small_reference_warning_stands_until_10_flags_are_allowed():
    from audit.calibrate import small_reference_warning

    assert small_reference_warning({"reference": {"size": 999}, "fpr": 0.01}) == (
        "fpr 0.01 of 999 reference prompts allows 9 flagged (the threshold is the reference risk ranked 10 from the "
        "top); 1,000 or more reference prompts give a steadier threshold")
    assert small_reference_warning({"reference": {"size": 950}, "fpr": 0.01}).startswith("fpr 0.01 of 950 reference "
                                                                                          "prompts allows 9 flagged")
    assert small_reference_warning({"reference": {"size": 1000}, "fpr": 0.01}) is None  # 10 allowed
    assert small_reference_warning({"reference": {"size": 5}, "fpr": 0.2}).startswith(
        "fpr 0.2 of 5 reference prompts allows 1 flagged (the threshold is the reference risk ranked 2 from the top)")


def test_writing_a_calibration_removes_the_stale_temporary_a_killed_write_left(tmp_path):
    import os

    from audit.calibrate import write_calibration
    from test_calib_diff_mutants import _v2

    stale, fresh = tmp_path / ".cal.json.0123abcd.tmp", tmp_path / ".cal.json.4567cdef.tmp"
    stale.write_text("{")
    fresh.write_text("{")  # a write of the same file in progress elsewhere: kept
    os.utime(stale, (1, 1))
    assert write_calibration(_v2(), tmp_path / "cal.json") == tmp_path / "cal.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cal.json.4567cdef.tmp", "cal.json"]


def test_a_missing_calibration_or_a_folder_is_named_as_such(tmp_path):
    from audit.calibrate import load_calibration

    with pytest.raises(CalibrationError, match=f"^--calibration {tmp_path / 'none.json'}: no such file$"):
        load_calibration(tmp_path / "none.json")
    with pytest.raises(CalibrationError, match=f"^--calibration {tmp_path}: a folder, not a calibration file$"):
        load_calibration(tmp_path)


def test_the_coverage_gate_of_a_damaged_manifest_with_no_row_read_is_none():
    # counts a hand edit left inconsistent (rows scored, none read): no verdict rather than a ZeroDivisionError in
    # the report's warning of it
    from types import SimpleNamespace

    from audit.gates import coverage_gate

    manifest = {"counts": {"rows_read": 0, "scored": 2, "rejected_by_reason": {"invalid_json": 1}}}
    assert coverage_gate(SimpleNamespace(max_error_fraction=0.01), manifest) is None


@pytest.mark.parametrize("text", ['{"kind": "memaudit.report", "threshold": 1.0}', "[1, 2]", '"memaudit.calibration"'])
def test_json_that_is_not_a_calibration_is_refused_as_such(tmp_path, text):
    # a JSON object of another kind, a JSON list, a JSON string
    from audit.calibrate import load_calibration

    (tmp_path / "other.json").write_text(text)
    with pytest.raises(CalibrationError, match=f"^--calibration {tmp_path / 'other.json'}: not a memaudit calibration "
                                               "file \\(make one with `memaudit calibrate REFERENCE_RUN`\\)$"):
        load_calibration(tmp_path / "other.json")


def test_a_run_is_judged_by_the_scoring_reasons_its_manifest_records(tmp_path):
    # a run whose memaudit gated only scoring_error exited 0 with 2 of 3 rows out_of_memory: afterwards it is not
    # "failed (exit 4)"; today's reasons judge a manifest whose record is damaged (a list missing)
    from audit.gates import SCORING_FAILURES, recorded_failures, recorded_reasons

    counts = {"rows_read": 3, "scored": 1, "rejected_by_reason": {"out_of_memory": 2}}
    earlier = {"counts": counts, "gated_reasons": {"scoring": ["scoring_error"], "input": []}}
    assert recorded_reasons(earlier) == (["scoring_error"], []) and recorded_failures(tmp_path, earlier) == []
    assert recorded_failures(tmp_path, earlier | {"gated_reasons": {"scoring": list(SCORING_FAILURES), "input": []}}) \
        == ["2 of 3 rows (66.7%) could not be scored (out_of_memory 2), more than --max-error-fraction 0.01. The "
            f"outputs in {tmp_path} hold what was scored"]
    for damaged in ({"scoring": ["scoring_error"]}, {"input": []}, {"scoring": "scoring_error", "input": []}, ["x"]):
        assert recorded_reasons({"gated_reasons": damaged, "memaudit_build": "0123"}) == (
            list(SCORING_FAILURES), ["missing_prompt_column", "missing_id_column", "invalid_utf8", "invalid_csv_row",
                                     "invalid_json"]), damaged


def test_a_calibration_with_an_integer_past_the_float_range_is_refused_and_a_good_one_remembers_its_path(tmp_path):
    import json

    from audit.calibrate import calibration_summary, load_calibration
    from test_calib_diff_mutants import _v1, _v2

    (tmp_path / "big.json").write_text(json.dumps(_v2(threshold=10**400)))  # 401 digits: JSON reads it, a float cannot
    with pytest.raises(CalibrationError, match=f"^--calibration {tmp_path / 'big.json'}: a value cannot be read as a "
                                               "number \\(OverflowError: int too large to convert to float\\); make it "
                                               "again with `memaudit calibrate REFERENCE_RUN`$"):
        load_calibration(tmp_path / "big.json")
    (tmp_path / "cal.json").write_text(json.dumps(_v2()))
    cal = load_calibration(tmp_path / "cal.json")
    assert cal["_path"] == str(tmp_path / "cal.json")  # what a run's manifest and its refusals name
    assert calibration_summary(cal) == {"path": str(tmp_path / "cal.json"), "version": 2, "threshold": 3.0,
                                        "fpr": 0.25, "reference_size": 4, "model_fingerprint": "abc"}
    (tmp_path / "v1.json").write_text(json.dumps(_v1()))  # no version key: recorded as version 1
    assert calibration_summary(load_calibration(tmp_path / "v1.json"))["version"] == 1


@pytest.mark.parametrize("reason", ["missing_prompt_column", "prompt_not_string", "null_prompt", "empty_prompt"])
def test_nothing_scored_of_a_table_suggests_the_prompt_column_for_each_column_like_reason(reason):
    from audit.gates import nothing_scored

    manifest = {"counts": {"rows_read": 3, "scored": 0, "rejected_by_reason": {reason: 3}},
                "files": [{"format": "parquet", "rows": 3}]}
    assert nothing_scored(manifest) == (f"nothing was scored: all 3 rows read were rejected ({reason} 3); "
                                        "rejects.parquet says why for each (a wrong --prompt-column?)")
    manifest["counts"]["rejected_by_reason"] = {"invalid_json": 3}  # not a column's fault: no hint
    assert nothing_scored(manifest).endswith("(invalid_json 3); rejects.parquet says why for each")


def test_a_calibration_without_its_distribution_or_with_a_threshold_not_a_number_is_refused(tmp_path):
    import json

    from audit.calibrate import load_calibration
    from test_calib_diff_mutants import _v1, _v2

    v2, v1 = _v2(), _v1(reference_cdf=_v2()["reference_cdf"])  # a version-1 file is read by its quantiles only
    del v2["reference_cdf"], v1["reference_quantiles"]
    for cal, problem in ((v2, "missing 'reference_cdf'"), (v1, "missing 'reference_quantiles'"),
                         (_v2(threshold="3.0"), "threshold '3.0' is not a finite number"),
                         (_v2(threshold=None), "threshold None is not a finite number"),
                         (_v1(threshold=True), "threshold True is not a finite number")):
        (tmp_path / "cal.json").write_text(json.dumps(cal))
        with pytest.raises(CalibrationError, match=f"^--calibration {tmp_path / 'cal.json'}: {problem}; make it "
                                                   "again with `memaudit calibrate REFERENCE_RUN`$"):
            load_calibration(tmp_path / "cal.json")


def test_a_calibration_whose_fpr_is_not_a_number_is_refused_naming_it(tmp_path):
    import json

    from audit.calibrate import load_calibration
    from test_calib_diff_mutants import _v2

    for fpr, said in (("0.25", "'0.25'"), (None, "None"), ([0.25], "[0.25]")):
        (tmp_path / "cal.json").write_text(json.dumps(_v2(fpr=fpr)))
        with pytest.raises(CalibrationError, match=f"^--calibration {tmp_path / 'cal.json'}: fpr {re.escape(said)} is "
                                                   "not a number between 0 and 1; make it again"):
            load_calibration(tmp_path / "cal.json")


def _refusal(tmp_path, cal: dict) -> str:
    import json

    from audit.calibrate import load_calibration

    (tmp_path / "cal.json").write_text(json.dumps(cal))
    with pytest.raises(CalibrationError) as info:
        load_calibration(tmp_path / "cal.json")
    head, problem = f"--calibration {tmp_path / 'cal.json'}: ", str(info.value)
    assert problem.startswith(head)
    return problem[len(head):].removesuffix("; make it again with `memaudit calibrate REFERENCE_RUN`")


def test_each_damaged_part_of_a_calibration_is_named(tmp_path):
    from test_calib_diff_mutants import _v1, _v2

    one = {"risk": [1.0], "at_or_below": [1]}  # a reference of one prompt: size true would pass the checks after it
    q = _v1()["reference_quantiles"]
    for cal, problem in (
            (_v2(reference={"size": True}, reference_cdf=one, threshold=1.0), "reference.size is missing"),
            (_v2(reference={"size": 4.0}), "reference.size is missing"),
            (_v2(reference=[4]), "reference.size is missing"),
            (_v2(model={"name": "m", "fingerprint": 7}), "model.fingerprint is missing"),
            (_v2(model={"name": "m"}), "model.fingerprint is missing"),
            (_v2(model="abc"), "model.fingerprint is missing"),
            (_v2(score_config=[]), "score_config is not a table of settings"),
            (_v2(reference_cdf=[1.0, 2.0]), "reference_cdf must hold the lists 'risk' and 'at_or_below'"),
            (_v2(reference_cdf={"risk": [1.0, 2.0, 3.0, 4.0]}), "reference_cdf must hold the lists 'risk' and "
                                                                 "'at_or_below'"),
            (_v2(reference_cdf={"risk": [1.0, 2.0, 3.0, 4.0], "at_or_below": "1234"}), "reference_cdf must hold the "
                                                                                      "lists 'risk' and 'at_or_below'"),
            (_v2(reference_cdf={"risk": [1.0, 2.0, 3.0, "4"], "at_or_below": [1, 2, 3, 4]}),
             "reference_cdf.risk must be finite numbers that increase"),
            (_v2(reference_cdf={"risk": [False, 2.0, 3.0, 4.0], "at_or_below": [1, 2, 3, 4]}),
             "reference_cdf.risk must be finite numbers that increase"),
            (_v2(reference={"size": 1}, reference_cdf={"risk": [3.0], "at_or_below": [True]}, threshold=3.0),
             "reference_cdf.at_or_below must be counts that increase to the reference size 1"),
            (_v2(reference_cdf={"risk": [1.0, 2.0, 3.0, 4.0], "at_or_below": [1, 2, 3.0, 4]}),
             "reference_cdf.at_or_below must be counts that increase to the reference size 4"),
            (_v1(reference_quantiles=q[:-1] + [None]),
             "reference_quantiles must be a list of at least 2 finite numbers"),
            (_v1(reference_quantiles=[3.25]), "reference_quantiles must be a list of at least 2 finite numbers"),
            (_v1(reference_quantiles={"0.75": 3.25}),
             "reference_quantiles must be a list of at least 2 finite numbers")):
        assert _refusal(tmp_path, cal) == problem, cal


def test_the_coverage_gate_s_hint_for_the_other_four_reasons_and_the_reasons_a_run_records():
    from types import SimpleNamespace

    from audit.gates import coverage_gate, gated_reasons

    manifest = {"counts": {"rows_read": 10, "scored": 6, "rejected_by_reason": {
        "missing_id_column": 1, "invalid_csv_row": 1, "invalid_json": 1, "prompt_not_string": 1}}}
    assert coverage_gate(SimpleNamespace(max_error_fraction=0.01), manifest) == (
        "4 of 10 rows read (40.0%) could not be read as prompts (missing_id_column 1, invalid_csv_row 1, "
        "invalid_json 1, prompt_not_string 1), more than --max-error-fraction 0.01: the audit covers only part of its "
        "input (a file without the --id-column?; a CSV whose prompts hold unquoted commas? quote them; lines that "
        "are not JSON objects? rejects.parquet's detail says why; a prompt column of numbers or lists? "
        "rejects.parquet's detail names the type; give the text column with --prompt-column; rejects.parquet names "
        "each row's file)")
    assert gated_reasons() == {"scoring": ["scoring_error", "out_of_memory", "nonfinite_attention"],
                               "input": ["missing_prompt_column", "missing_id_column", "invalid_utf8",
                                         "invalid_csv_row", "invalid_json", "prompt_not_string"]}


def test_a_reference_cdf_with_fewer_counts_than_risks_is_refused(tmp_path):
    from test_calib_diff_mutants import _v2

    # without the length check the threshold 3.0 would pass: the 3rd count (4) is the first with n - k = 3 at or below
    cal = _v2(reference_cdf={"risk": [1.0, 2.0, 3.0, 4.0], "at_or_below": [1, 2, 4]})
    assert _refusal(tmp_path, cal) == "reference_cdf must hold 1 to 1002 risks, each with its count"


def test_a_version_1_file_is_read_by_its_quantiles_even_beside_a_reference_cdf(tmp_path):
    # the version decides how a file is read, never which keys it holds: a version-1 file with a stray reference_cdf
    # (an edit, a tool) keeps its interpolated percentiles
    import json

    from audit.calibrate import load_calibration, risk_percentile
    from test_calib_diff_mutants import _v1

    (tmp_path / "plain.json").write_text(json.dumps(_v1()))
    (tmp_path / "stray.json").write_text(json.dumps(_v1(reference_cdf={"risk": [100.0], "at_or_below": [4]})))
    risks = np.array([0.5, 1.0, 2.5, 3.25, 4.0])
    plain = risk_percentile(risks, load_calibration(tmp_path / "plain.json"))
    assert plain.tolist() == pytest.approx([0.0, 0.0, 50.0, 75.0, 100.0])
    assert risk_percentile(risks, load_calibration(tmp_path / "stray.json")).tolist() == plain.tolist()


def test_reference_counts_that_repeat_or_end_off_the_reference_size_are_refused(tmp_path):
    from test_calib_diff_mutants import _v2

    # each would otherwise pass: its threshold is the risk at the first count of at least n - k = 3
    for counts, threshold in (([1, 2, 2, 4], 4.0), ([1, 2, 3, 5], 3.0)):
        cal = _v2(threshold=threshold, reference_cdf={"risk": [1.0, 2.0, 3.0, 4.0], "at_or_below": counts})
        assert _refusal(tmp_path, cal) == "reference_cdf.at_or_below must be counts that increase to the reference " \
                                          "size 4", counts


def test_a_version_1_threshold_a_rounding_past_its_grid_quantile_is_read(tmp_path):
    # a threshold and the grid quantiles were two numpy.quantile calls: a rounding apart is the same threshold
    import json

    from audit.calibrate import load_calibration
    from test_calib_diff_mutants import _v1

    high = _v1()["reference_quantiles"][751]  # the grid quantile above the 0.75 one (750 of 1000)
    (tmp_path / "cal.json").write_text(json.dumps(_v1(threshold=high + 1e-12)))
    assert load_calibration(tmp_path / "cal.json")["threshold"] == high + 1e-12


def test_fail_on_flagged_below_0_or_without_a_calibration_is_refused():
    from types import SimpleNamespace

    from audit.calibrate import calibration_for_run

    with pytest.raises(CalibrationError, match="^--fail-on-flagged must be 0 or more$"):
        calibration_for_run(SimpleNamespace(fail_on_flagged=-1, calibration="cal.json"))
    with pytest.raises(CalibrationError, match="^--fail-on-flagged needs --calibration"):
        calibration_for_run(SimpleNamespace(fail_on_flagged=0, calibration=None))
    assert calibration_for_run(SimpleNamespace(fail_on_flagged=None, calibration=None)) is None


def test_the_flagged_gate_counts_rows_over_the_limit_and_passes_a_run_without_flags():
    from types import SimpleNamespace

    from audit.calibrate import flagged_gate

    manifest = {"counts": {"flagged": 3}, "calibration": {"threshold": 1.7935721}}
    assert flagged_gate(SimpleNamespace(fail_on_flagged=2), manifest) == (
        "3 rows flagged (risk > 1.7935721), more than --fail-on-flagged 2; outputs are complete in the run folder")
    assert flagged_gate(SimpleNamespace(fail_on_flagged=3), manifest) is None  # at the limit: passes
    assert flagged_gate(SimpleNamespace(fail_on_flagged=0), {"counts": {"flagged": None}}) is None  # no flags counted
    assert flagged_gate(SimpleNamespace(fail_on_flagged=None), manifest) is None
