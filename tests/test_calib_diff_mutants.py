"""Mutation review of calibrate.py, diff.py and cascade.py (session 43): tests that pin what the others left open."""

from __future__ import annotations

import pytest

from audit.cascade import top_size


def test_confirm_top_fraction_is_read_as_the_decimal_given():
    # in binary 0.07 * 100 = 7.000000000000001, whose ceiling is 8: --confirm-top 0.07 of 100 prompts must be 7
    assert top_size("0.07", 100) == 7 and top_size("7%", 100) == 7 and top_size(0.07, 100) == 7
    assert top_size("0.14", 200) == 28 and top_size("55%", 100) == 55 and top_size("0.28", 300) == 84
    # still rounded up when the product is not a whole number, and a count is a count
    assert top_size("0.07", 101) == 8 and top_size("0.5%", 1001) == 6 and top_size("7", 100) == 7


# ------------------------------------------------------------------ calibration files

import json  # noqa: E402

import numpy as np  # noqa: E402

from audit.calibrate import CalibrationError, load_calibration, risk_percentile  # noqa: E402


def _v2(**changes) -> dict:
    """A valid version-2 calibration of the reference risks 1, 2, 3, 4 at fpr 0.25: k = 1, threshold 3 (the 3rd
    smallest)."""
    cal = {"kind": "memaudit.calibration", "version": 2, "fpr": 0.25, "threshold": 3.0,
           "model": {"name": "m", "fingerprint": "abc"}, "score_config": {}, "reference": {"size": 4},
           "reference_cdf": {"risk": [1.0, 2.0, 3.0, 4.0], "at_or_below": [1, 2, 3, 4]}}
    return cal | changes


def _v1(**changes) -> dict:
    """A valid version-1 calibration (no version key) of the reference risks 1, 2, 3, 4 at fpr 0.25."""
    q = [float(v) for v in np.quantile([1.0, 2.0, 3.0, 4.0], np.linspace(0, 1, 1001))]
    cal = {"kind": "memaudit.calibration", "fpr": 0.25, "threshold": float(np.quantile([1.0, 2.0, 3.0, 4.0], 0.75)),
           "model": {"name": "m", "fingerprint": "abc"}, "score_config": {}, "reference": {"size": 4},
           "reference_quantiles": q}
    return cal | changes


def _load(tmp_path, cal: dict, name: str = "cal.json") -> dict:
    (tmp_path / name).write_text(json.dumps(cal))
    return load_calibration(tmp_path / name)


def test_the_synthetic_calibrations_are_valid(tmp_path):
    assert _load(tmp_path, _v2())["threshold"] == 3.0 and _load(tmp_path, _v1())["threshold"] == 3.25


def test_a_calibration_of_an_empty_reference_is_refused_in_either_version(tmp_path):
    for cal in (_v1(reference={"size": 0}), _v2(reference={"size": 0})):
        with pytest.raises(CalibrationError, match="reference.size is missing; make it again"):
            _load(tmp_path, cal)


def test_a_reference_cdf_with_a_zero_count_or_a_repeated_risk_is_refused(tmp_path):
    # a count of 0 at a stored risk: no reference prompt at or below a risk the reference holds
    with pytest.raises(CalibrationError, match="at_or_below must be counts that increase to the reference size 4"):
        _load(tmp_path, _v2(reference_cdf={"risk": [1.0, 2.0, 3.0, 4.0], "at_or_below": [0, 2, 3, 4]}))
    with pytest.raises(CalibrationError, match="reference_cdf.risk must be finite numbers that increase"):
        _load(tmp_path, _v2(reference_cdf={"risk": [1.0, 3.0, 3.0, 4.0], "at_or_below": [1, 2, 3, 4]}))


def test_an_unknown_confirm_scorer_is_named_as_the_confirm_option():
    from types import SimpleNamespace

    from audit.cascade import check_confirm_options
    from audit.errors import RunError

    cfg = SimpleNamespace(confirm="guidance_geometri", confirm_top="2", scorer="attention_entropy", engine="local")
    with pytest.raises(RunError) as err:
        check_confirm_options(cfg)
    text = str(err.value)
    assert text.startswith("--confirm guidance_geometri: choose one of ") and "--scorer" not in text
    assert text.endswith("(did you mean 'guidance_geometry'?)")


# ------------------------------------------------------------------ diff: the run a folder of runs compares with

def _night(root, name: str, first: str | None, started: str, scored: int):
    d = root / name
    d.mkdir()
    manifest = {"started_at": started, "counts": {"scored": scored}}
    if first is not None:
        manifest["first_started_at"] = first
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_previous_run_is_the_latest_first_started_before_that_scored(tmp_path):
    from audit.diff import previous_run

    runs = tmp_path / "nightly"
    runs.mkdir()
    _night(runs, "a", "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00", 3)
    # first started before the new run, resumed after it: a night before the new one, the latest such
    _night(runs, "b", "2026-01-02T00:00:00+00:00", "2026-01-06T00:00:00+00:00", 2)
    _night(runs, "c", "2026-01-03T00:00:00+00:00", "2026-01-03T00:00:00+00:00", 0)  # scored nothing: no baseline
    new = _night(runs, "d", "2026-01-04T00:00:00+00:00", "2026-01-04T00:00:00+00:00", 4)
    _night(runs, "e", "2026-01-05T00:00:00+00:00", "2026-01-05T00:00:00+00:00", 5)  # after the new run
    assert previous_run(runs, new) == runs / "b"
    # a run started in the same second as the new one is before it; of two such, the first by name
    _night(runs, "x2", "2026-01-04T00:00:00+00:00", "2026-01-04T00:00:00+00:00", 1)
    _night(runs, "x1", "2026-01-04T00:00:00+00:00", "2026-01-04T00:00:00+00:00", 1)
    assert previous_run(runs, new) == runs / "x1"
    # the new run itself, though it started "at or before" itself, is never its own baseline
    alone = tmp_path / "alone"
    alone.mkdir()
    new = _night(alone, "n", "2026-01-04T00:00:00+00:00", "2026-01-04T00:00:00+00:00", 4)
    _night(alone, "o", "2026-01-03T00:00:00+00:00", "2026-01-03T00:00:00+00:00", 4)
    assert previous_run(alone, new) == alone / "o"
    (alone / "o" / "manifest.json").unlink()
    with pytest.raises(Exception, match="no finished run started before .* that scored a row"):
        previous_run(alone, new)


def test_a_version_1_file_whose_quantiles_decrease_is_refused(tmp_path):
    q = _v1()["reference_quantiles"]
    assert q[0] < q[1]
    swapped = [q[1], q[0]] + q[2:]  # the threshold's quantiles (near 750 of 1000) untouched
    with pytest.raises(CalibrationError, match="reference_quantiles must not decrease; make it again"):
        _load(tmp_path, _v1(reference_quantiles=swapped))


def test_diff_reads_confirm_top_as_the_cut_it_makes():
    from audit.diff import _comparability

    def manifest(top):
        return {"model": {"fingerprint": "f"}, "score_config": {}, "counts": {"scored": 3},
                "confirm": {"scorer": "noise_magnitude", "top": top, "score_config": {"a": 1}}}

    # 5% and 0.05 are one cut: the runs rank alike (the diff warned that they rank differently)
    assert _comparability(manifest("5%"), manifest("0.05")) == []
    assert _comparability(manifest("0.050"), manifest(" 5% ")) == []
    assert _comparability(manifest("0.7%"), manifest("0.007")) == []  # 0.7 / 100 is 0.006999999999999999
    differ = _comparability(manifest("3"), manifest("5"))
    assert len(differ) == 1 and differ[0].startswith(
        "the runs rank differently: the old run was confirmed with noise_magnitude (--confirm-top 3), the new one "
        "confirmed with noise_magnitude (--confirm-top 5)")
    assert len(_comparability(manifest("0.05"), manifest("5"))) == 1  # a fraction is not a count


def test_a_calibration_at_fpr_0_or_1_is_refused(tmp_path):
    # fpr 0 allows no flag: its threshold would be the highest reference risk, which the file check accepted
    for fpr, threshold in ((0, 4.0), (0.0, 4.0), (1, 1.0), (True, 3.0)):
        with pytest.raises(CalibrationError, match=f"fpr {fpr!r} is not a number between 0 and 1"):
            _load(tmp_path, _v2(fpr=fpr, threshold=threshold))


def test_a_calibration_of_an_unknown_version_is_refused(tmp_path):
    for version in (0, -1, 3, "2", 2.0, True):
        with pytest.raises(CalibrationError, match=f"version {version!r}: this memaudit reads versions 1 to 2"):
            _load(tmp_path, _v1(version=version))
    assert _load(tmp_path, _v1(version=1))["threshold"] == 3.25  # 1 written out is the version absent means


def test_risk_percentile_keeps_nan_and_reads_the_cdf_at_or_below(tmp_path):
    cal = _load(tmp_path, _v2())
    pct = risk_percentile(np.array([np.nan, 0.5, 1.0, 2.5, 4.0, 9.0]), cal)
    assert np.isnan(pct[0]) and pct[1:].tolist() == [0.0, 25.0, 50.0, 100.0, 100.0]


def test_a_reference_cdf_of_no_risks_or_too_many_is_refused(tmp_path):
    for n in (0, 1003):
        cdf = {"risk": [float(i) for i in range(n)], "at_or_below": list(range(1, n + 1))}
        with pytest.raises(CalibrationError, match="reference_cdf must hold 1 to 1002 risks, each with its count"):
            _load(tmp_path, _v2(reference_cdf=cdf, reference={"size": max(n, 1)}))


# ------------------------------------------------------------------ diff: runs without calibrations

def test_diff_of_two_uncalibrated_runs_has_no_flag_list_and_no_flag_warning(tmp_path):
    from rich.console import Console

    from audit.diff import diff_runs, render_markdown, render_terminal
    from test_report_mutants import make_run

    old = make_run(tmp_path / "old", [("A", 3.0), ("B", 2.0)])
    new = make_run(tmp_path / "new", [("A", 1.0), ("B", 2.0)])
    d = diff_runs(old, new)
    assert (d.old_calibrated, d.new_calibrated, d.summary["newly_flagged"]) == (False, False, None)
    assert d.flag_warnings == [] and d.warnings == [] and d.newly_flagged.height == 0
    console = Console(record=True, width=200)
    render_terminal(d, console)
    text = console.export_text()
    assert "Newly flagged" not in text and "Largest rank rises (1 shown)" in text
    assert "new run not calibrated: no flags to compare (run with --calibration)" in text
    md = render_markdown(d)
    assert "## Newly flagged" not in md and "**Warning:**" not in md and "## Largest rank rises" in md


def test_a_calibration_missing_a_required_key_is_refused_naming_it(tmp_path):
    for key in ("threshold", "model", "score_config"):
        cal = _v2()
        del cal[key]
        with pytest.raises(CalibrationError, match=f"--calibration .*cal.json: missing '{key}'$"):
            _load(tmp_path, cal)


def test_a_version_1_threshold_off_its_quantile_by_a_little_is_refused(tmp_path):
    # the 0.75 quantile of 1..4 is 3.25, between the grid quantiles 3.247 and 3.253 around it; 3.2535 is outside
    with pytest.raises(CalibrationError, match="threshold 3.2535 is not the reference's 0.75 quantile"):
        _load(tmp_path, _v1(threshold=3.2535))
    assert _load(tmp_path, _v1(threshold=3.253))["threshold"] == 3.253  # within the grid: accepted


def test_small_reference_warning_of_an_fpr_past_the_float_range():
    from audit.calibrate import small_reference_warning

    # memaudit calibrate --fpr 1e-320 failed with "OverflowError: cannot convert float infinity to integer": 10 / fpr
    # is past the largest float; the count is now exact
    head = "reference prompts allows 0 flagged (the threshold is the highest reference risk); "
    assert small_reference_warning({"reference": {"size": 2}, "fpr": 1e-320}) == (
        "fpr 1e-320 of 2 " + head + "1e+321 or more reference prompts give a steadier threshold")
    assert small_reference_warning({"reference": {"size": 2}, "fpr": 5e-324}) == (
        "fpr 5e-324 of 2 " + head + "2e+324 or more reference prompts give a steadier threshold")
    assert small_reference_warning({"reference": {"size": 2}, "fpr": 1e-300}).endswith(
        "; 1e+301 or more reference prompts give a steadier threshold")
    assert small_reference_warning({"reference": {"size": 5}, "fpr": 0.07}).endswith("; 143 or more reference prompts "
                                                                                     "give a steadier threshold")


def test_a_confirm_top_of_zero_written_as_a_fraction_is_refused():
    from audit.cascade import parse_top
    from audit.errors import RunError

    for bad in ("0.0", "0.00", "0e0", "0%", "0.0%", "-0.0"):
        with pytest.raises(RunError, match=f"--confirm-top {bad}: give a fraction of the distinct prompts"):
            parse_top(bad)
    assert parse_top("1e-9") == ("fraction", 1e-9) and top_size("1e-9", 5) == 1  # the smallest cut: one prompt


def test_counts_from_a_billion_are_written_in_scientific_notation():
    from audit.calibrate import small_reference_warning

    # 10 / 1e-8 is a billion reference prompts
    assert small_reference_warning({"reference": {"size": 2}, "fpr": 1e-8}).endswith("; 1e+09 or more reference "
                                                                                      "prompts give a steadier threshold")
    assert small_reference_warning({"reference": {"size": 2}, "fpr": 1e-7}).endswith("; 100,000,000 or more "
                                                                                     "reference prompts give a "
                                                                                     "steadier threshold")


def test_counts_past_the_float_range_round_to_three_digits():
    from audit.calibrate import _count

    assert _count(123456 * 10**400) == "1.23e+405" and _count(9996 * 10**400) == "1e+404"  # 9.996 rounds to 10
    assert _count(10**309) == "1e+309" and _count(2 * 10**308) == "2e+308"


# ------------------------------------------------------------------ cascade: what the confirm stage records

def test_confirm_records_its_summary_in_the_parquet_metadata_and_the_manifest(tmp_path):
    import types

    import pyarrow.parquet as pq

    from audit.cascade import run_confirm
    from test_cascade_mutants import _stage1, _StubScorer

    out = tmp_path / "run"
    _stage1(out)
    stub = _StubScorer({"A": (5.0, False), "B": (7.0, False), "C": (1.0, False), "D": (9.0, False)})
    cfg = types.SimpleNamespace(confirm_top="50%", batch_size=8, scorer="attention_entropy")
    screen = types.SimpleNamespace(num_inference_steps=50, noise_draws=1)
    manifest = run_confirm(out, stub, cfg, {"counts": {"scored": 5}}, screen, log=lambda m: None)
    c = manifest["confirm"]
    assert manifest["counts"] == {"scored": 5}
    assert c["score_config"] == {"scorer": "toy", "num_inference_steps": 4}
    meta = json.loads(pq.read_schema(out / "risk.parquet").metadata[b"memaudit.confirm"])
    # what the invocation did (resumed, scored now, its time) is in the manifest only: the table's bytes stay put
    assert meta == {k: v for k, v in c.items() if k not in ("score_config", "resumed_prompts", "scored_prompts",
                                                              "seconds")}
    assert {"resumed_prompts", "scored_prompts", "seconds"} <= set(c)
    assert (meta["scorer"], meta["top"], meta["screened_unique_prompts"], meta["unique_prompts_confirmed"],
            meta["rows_confirmed"], meta["forwards_total"]) == ("toy", "50%", 4, 2, 3, 4 * 1.0 + 2 * 16.0)
    assert json.loads((out / "manifest.json").read_text())["confirm"] == c


def test_a_damaged_confirm_identity_is_refused_naming_it(tmp_path):
    import types

    from audit.cascade import run_confirm
    from audit.errors import RunError
    from test_cascade_mutants import _stage1, _StubScorer

    out = tmp_path / "run"
    _stage1(out)
    (out / "confirm").mkdir()
    (out / "confirm" / "confirm.json").write_text('{"scorer": "toy", ')  # cut short by an edit
    stub = _StubScorer({p: (1.0, False) for p in "ABCD"})
    cfg = types.SimpleNamespace(confirm_top="2", batch_size=8, scorer="attention_entropy")
    with pytest.raises(RunError, match=r"--out .*run: its confirm/confirm.json cannot be read \(JSONDecodeError: "
                                       r".*\); remove its confirm/ folder to confirm again, or use a new --out"):
        run_confirm(out, stub, cfg, {}, types.SimpleNamespace(num_inference_steps=1, noise_draws=1),
                    log=lambda m: None)
    assert stub.scored == []


def test_previous_run_passes_over_a_later_run_with_another_scorer_or_model(tmp_path):
    """A one-off run with another scorer (or model) in the nightly folder became the next night's baseline: every
    risk then compared across scales (the diff only warned). The latest run with the new run's model and score
    settings is taken, saying which was passed over; with none, the latest, as before."""
    from audit.diff import previous_run

    runs = tmp_path / "nightly"
    runs.mkdir()

    def night(name, day, scorer="attention_entropy", fingerprint="fp1"):
        d = _night(runs, name, f"2026-01-0{day}T00:00:00+00:00", f"2026-01-0{day}T00:00:00+00:00", 3)
        manifest = json.loads((d / "manifest.json").read_text())
        manifest |= {"model": {"name": "m", "fingerprint": fingerprint},
                     "score_config": {"scorer": scorer, "layers": ["x"], "seed": 0}}
        (d / "manifest.json").write_text(json.dumps(manifest))
        return d

    night("a", 1)
    night("b", 2, scorer="noise_magnitude")
    night("c", 3, fingerprint="fp2")
    new = night("d", 4)
    said = []
    assert previous_run(runs, new, log=said.append) == runs / "a"
    assert said == [f"memaudit: passed over {runs / 'c'}, a later run with another model or other score settings"]
    # the same settings spelled with the default noise generator written out are the same settings
    manifest = json.loads((runs / "b" / "manifest.json").read_text())
    manifest["score_config"] = {"scorer": "attention_entropy", "layers": ["x"], "seed": 0, "noise_generator": "mt19937"}
    (runs / "b" / "manifest.json").write_text(json.dumps(manifest))
    assert previous_run(runs, new) == runs / "b"
    odd = night("e", 5, scorer="guidance_geometry")  # no earlier run of its settings: the latest, as before
    said.clear()
    assert previous_run(runs, odd, log=said.append) == runs / "d" and said == []
