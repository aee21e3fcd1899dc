"""Mutation review of audit/eval.py, audit/evaluate.py and audit/calibrate.py (session 49, mnew49d): the metrics,
thresholds and flags users trust, against scikit-learn and hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from audit.eval import _fast_figures, bootstrap_ci, metrics, tpr_at_fpr


def test_a_nonfinite_score_ranks_strictly_below_a_least_score_past_2_53():
    """A NaN score (a failed forward) is least risky, below every finite score, also when the least finite score is
    so large in magnitude that ``least - 1`` is ``least`` itself: it tied with it and took half a pair (AUROC 0.5
    for 4/6 here). Every figure equals the one of the same order written by hand (NaN lowest), and scikit-learn's."""
    from sklearn.metrics import roc_auc_score

    y = np.array([1, 0, 0, 1, 0], bool)
    ranked = np.array([2.0, 1.0, 4.0, 5.0, 3.0])  # the positive at index 0 is the least finite score, above the NaN
    assert roc_auc_score(y, ranked) == pytest.approx(4 / 6)
    for least in (-1e17, 1e17, -1e300, -np.finfo(np.float64).max):  # the last: no float below it (ranks are used)
        s = np.array([least, np.nan, 3.0, 4.0, 2.0]) if least < 0 else least + np.array([0, np.nan, 4e3, 5e3, 2e3])
        assert metrics(y, s) == metrics(y, ranked)
        assert _fast_figures(y, s) == _fast_figures(y, ranked)
        assert bootstrap_ci(y, s, n_boot=50) == bootstrap_ci(y, ranked, n_boot=50)
        assert tpr_at_fpr(y, s, 0.5, "nearest") == tpr_at_fpr(y, ranked, 0.5, "nearest") == 0.5


def _calibration_file(tmp_path, risks, fpr, name="cal.json"):
    """A version-2 calibration document built from ``risks`` as :func:`audit.calibrate.calibrate` builds its
    threshold and distribution, written and read back by :func:`load_calibration` (which checks the threshold)."""
    import json

    from audit.calibrate import CALIBRATION_KIND, load_calibration, order_threshold, reference_cdf

    threshold, k = order_threshold(risks, fpr)
    cal = {"kind": CALIBRATION_KIND, "version": 2, "fpr": fpr, "threshold": threshold,
           "reference": {"size": int(np.asarray(risks).size), "allowed_flags": k},
           "reference_cdf": reference_cdf(risks, threshold), "model": {"fingerprint": "f"}, "score_config": {}}
    (tmp_path / name).write_text(json.dumps(cal))
    return load_calibration(tmp_path / name)


def test_a_thinned_reference_cdf_stores_a_threshold_off_its_rank_grid(tmp_path):
    """20,000 distinct risks 1..20000, fpr 1.23%: k = 246, the threshold is the 19,754th smallest (19754.0), a rank
    that the 1001 evenly spaced stored ranks miss (988 * 19999 / 1000 rounds to 19759). Its own entry is stored, so
    the file loads (without it the threshold check read 19760, the next stored risk, and refused the file as edited),
    and the percentile at the threshold is exact: 100 * 19754 / 20000. The existing test's fpr 1% put the threshold
    on the grid, where a cdf without that entry passed."""
    from audit.calibrate import risk_percentile

    risks = np.random.default_rng(5).permutation(np.arange(1.0, 20001.0))
    cal = _calibration_file(tmp_path, risks, 0.0123)
    assert cal["threshold"] == 19754.0 and cal["reference"]["allowed_flags"] == 246
    assert 19754.0 in cal["reference_cdf"]["risk"] and len(cal["reference_cdf"]["risk"]) == 1002
    assert int((risks > cal["threshold"]).sum()) == 246
    assert risk_percentile(np.array([19754.0, 19754.5, 19753.0]), cal).tolist() == [98.77, 98.77, 98.7]  # 19753: the stored 19740


def test_version_1_percentile_of_a_nan_risk_stays_nan_on_a_flat_reference():
    """risk_percentile's contract, NaN stays NaN, held for version 2 and for a version-1 file with distinct
    quantiles, but a version-1 file whose reference risks were all equal (1001 equal quantiles) gave a NaN risk the
    percentile 100 (np.interp on one point, and the branch for it, read NaN as at or above it)."""
    from audit.calibrate import risk_percentile

    flat = {"reference_quantiles": [2.0] * 1001}
    got = risk_percentile(np.array([np.nan, 1.0, 2.0, 3.0]), flat)
    assert np.isnan(got[0]) and got[1:].tolist() == [0.0, 100.0, 100.0]
    spread = {"reference_quantiles": [float(v) for v in np.quantile(np.arange(101.0), np.linspace(0, 1, 1001))]}
    got = risk_percentile(np.array([np.nan, 25.0, -1.0, 101.0]), spread)
    assert np.isnan(got[0]) and got[1:].tolist() == pytest.approx([25.0, 0.0, 100.0])


def test_calibrate_refuses_fpr_0_and_1_before_reading_the_run(tmp_path):
    """``calibrate(run, fpr)`` with fpr 0 or 1 (no ``parse_fpr`` in between, as a Python caller passes it) is
    refused by its range, before the run is read: fpr 1 gave k = n and the highest risk as the threshold (0 flagged
    while 'allowing' n), fpr 0 the same threshold. The existing test tried only 1.5. A mutant allowing either end got
    the run's own error instead."""
    from audit.calibrate import CalibrationError, calibrate

    for fpr in (0.0, 1.0, -0.01):
        with pytest.raises(CalibrationError, match=rf"^--fpr {fpr}: must be between 0 and 1, both excluded"):
            calibrate(tmp_path / "no-run", fpr=fpr)


def test_evaluate_refuses_more_labels_than_prompts():
    """3 labels for 2 prompts: one RunError naming both counts, before any model is loaded (a check that only
    caught fewer labels let pyarrow raise on the unequal columns)."""
    from audit.errors import RunError
    from audit.evaluate import evaluate

    for prompts, labels in ((["a cat", "a dog"], [True, False, True]), (["a cat", "a dog", "a cow"], [True, False])):
        with pytest.raises(RunError, match=rf"^{len(prompts)} prompts but {len(labels)} labels$"):
            evaluate(prompts, labels, model=None)


def test_labelled_table_takes_a_prompt_of_exactly_the_longest_length_run_takes():
    """`memaudit run` rejects a prompt of more than 1,000,000 characters as prompt_too_long and scores one of
    exactly 1,000,000; eval's table check draws the same line (a '>=' there refused a prompt run scores)."""
    import pyarrow as pa

    from audit.errors import RunError
    from audit.evaluate import labelled_rows
    from audit.unit import MAX_PROMPT_CHARS

    assert MAX_PROMPT_CHARS == 1_000_000
    table = pa.table({"prompt": ["x" * MAX_PROMPT_CHARS, "a dog"], "memorized": [True, False]})
    prompts, labels = labelled_rows(table, "t.parquet")
    assert [len(p) for p in prompts] == [1_000_000, 5] and labels.tolist() == [True, False]
    table = pa.table({"prompt": ["a dog", "x" * (MAX_PROMPT_CHARS + 1)], "memorized": [True, False]})
    with pytest.raises(RunError, match=r"^t\.parquet: 1 row\(s\) with a prompt of more than 1,000,000 characters "
                                       r"\(row 1\): `memaudit run` rejects such prompts as prompt_too_long$"):
        labelled_rows(table, "t.parquet")


def test_a_version_1_file_with_other_than_1001_quantiles_is_refused(tmp_path):
    """A version-1 file holds 1001 quantiles; one with 11 (sorted, finite, its threshold among them) is refused by
    name. Without the count check the threshold check indexed the 1001-point grid on 11 values: an IndexError,
    which load_calibration does not catch (a traceback, not a one-line refusal)."""
    import json

    from audit.calibrate import CALIBRATION_KIND, CalibrationError, load_calibration

    cal = {"kind": CALIBRATION_KIND, "fpr": 0.1, "threshold": 9.0, "reference": {"size": 11},
           "reference_quantiles": [float(v) for v in range(11)], "model": {"fingerprint": "f"}, "score_config": {}}
    (tmp_path / "v1.json").write_text(json.dumps(cal))
    with pytest.raises(CalibrationError, match=r"reference_quantiles has 11 values, not 1001; make it again"):
        load_calibration(tmp_path / "v1.json")


def test_evaluate_names_each_repeated_layer_once(tiny_model):
    """layers="A, A,B" scores on (A, B), as layers=[A, B] does: score_layers lists each layer once, and the AUROC is
    that of the risks of a scorer configured with (A, B) (a repeated layer was kept twice in the configuration)."""
    from sklearn.metrics import roc_auc_score

    from audit.capture import cross_attention_layers
    from audit.evaluate import evaluate
    from audit.scorers import ScoreConfig, Scorer

    prompts = ["a red cat", "a blue dog on a beach", "old city street at night", "portrait of a woman",
               "oil painting of a boat", "a green tree in the forest"]
    labels = np.array([True, False, True, False, False, True])
    names = cross_attention_layers(tiny_model.unet)
    a, b = names[0], names[-1]
    got = evaluate(prompts, labels, tiny_model, layers=f"{a}, {a},{b}", n_boot=5)
    assert got["score_layers"] == [a, b] and got["score_layers_given"] is True
    risk = Scorer(tiny_model, ScoreConfig("attention_entropy", (a, b))).score(prompts)["risk"]
    assert got["scorers"]["attention_entropy"]["auroc"] == pytest.approx(roc_auc_score(labels, risk), abs=1e-12)


def test_exactly_1001_distinct_risks_are_all_stored_however_many_prompts(tmp_path):
    """1001 distinct risks 0..1000 over 3001 prompts (2000 more at 500.0): every distinct risk is stored, so every
    percentile is the exact ECDF (a '>=' against N_CDF thinned it to the evenly spaced ranks, losing 0..1000's
    values between the ranks that the 2001 prompts at 500 cover)."""
    from audit.calibrate import risk_percentile

    risks = np.r_[np.arange(1001.0), np.full(2000, 500.0)]
    cal = _calibration_file(tmp_path, risks, 0.1)
    assert cal["reference_cdf"]["risk"] == [float(v) for v in range(1001)]
    assert cal["threshold"] == 700.0 and cal["reference"]["allowed_flags"] == 300  # the 2701st smallest
    probe = np.array([0.0, 499.0, 500.0, 501.0, 1000.0])
    ecdf = 100.0 * np.searchsorted(np.sort(risks), probe, side="right") / risks.size
    assert risk_percentile(probe, cal).tolist() == ecdf.tolist() == [100 / 3001, 50000 / 3001, 250100 / 3001,
                                                                     250200 / 3001, 100.0]
