"""Findings of the statistics review (session 53, ustats): figures checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest


def _result(name, figures, n_memorized, n_ordinary):
    return {"n_memorized": n_memorized, "n_ordinary": n_ordinary,
            "scorers": {name: figures | {"n_nonfinite": 0, "n_nonfinite_memorized": 0}}}


def test_eval_warns_of_a_bootstrap_ci_of_zero_width_with_the_exact_binomial_interval():
    # `memaudit eval` printed "TPR@1%FPR 1.000 [1.000, 1.000]" for 50 memorized prompts all above every ordinary one,
    # and "0.000 [0.000, 0.000]" for 0 of 3 detected, as 95% CIs, without a word: the percentile bootstrap resamples
    # the observed prompts only, so a figure at 0 or 1 gives an interval of one point
    from scipy.stats import beta

    from audit.eval import metrics_with_ci
    from audit.evaluate import result_warnings

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(50, bool), np.zeros(500, bool)]
    s = np.r_[rng.normal(10, 1, 50), rng.normal(0, 1, 500)]  # separated: AUROC 1, TPR 1 in every resample
    f = metrics_with_ci(y, s, n_boot=200)
    assert (f["auroc"], f["auroc_ci"], f["tpr_at_1pct_fpr"], f["tpr_at_1pct_fpr_ci"]) == (1.0, [1.0, 1.0], 1.0,
                                                                                         [1.0, 1.0])
    lo = beta.ppf(0.025, 50, 1)  # Clopper-Pearson lower bound of 50 of 50, independently
    assert f"{lo:.3f}" == "0.929"
    assert result_warnings(_result("noise_magnitude", f, 50, 500)) == [
        "noise_magnitude: AUROC 1.000 [1.000, 1.000], TPR at 1% FPR 1.000 [1.000, 1.000] and TPR at 3% FPR 1.000 "
        "[1.000, 1.000]: a 95% bootstrap CI of zero width is no interval (every resample gave the same value, as the "
        "percentile bootstrap does for a figure at 0 or 1 or for scores all equal); a TPR of 50 of 50 memorized "
        "prompts has the exact (Clopper-Pearson) 95% interval [0.929, 1.000] as a binomial proportion"]

    y = np.r_[np.ones(3, bool), np.zeros(200, bool)]
    s = np.r_[[-0.1, 0.0, 0.1], rng.normal(0, 1, 200)]  # mid-ranked: none detected at 1% or 3% FPR
    f = metrics_with_ci(y, s, n_boot=200)
    hi = beta.ppf(0.975, 1, 3)
    warnings = result_warnings(_result("attention_entropy", f, 3, 200))
    assert warnings[0].startswith("3 memorized and 200 ordinary prompts: too few for a stable AUROC")
    assert warnings[1] == (
        "attention_entropy: TPR at 1% FPR 0.000 [0.000, 0.000] and TPR at 3% FPR 0.000 [0.000, 0.000]: a 95% "
        "bootstrap CI of zero width is no interval (every resample gave the same value, as the percentile bootstrap "
        "does for a figure at 0 or 1 or for scores all equal); a TPR of 0 of 3 memorized prompts has the exact "
        f"(Clopper-Pearson) 95% interval [0.000, {hi:.3f}] as a binomial proportion")
    assert f"{hi:.3f}" == "0.708"


def test_eval_zero_width_warning_spares_ordinary_figures_and_unmeasurable_tprs():
    from audit.eval import metrics_with_ci
    from audit.evaluate import result_warnings

    rng = np.random.default_rng(1)
    y = np.r_[np.ones(60, bool), np.zeros(300, bool)]
    f = metrics_with_ci(y, np.r_[rng.normal(1, 1, 60), rng.normal(0, 1, 300)], n_boot=200)
    assert f["auroc_ci"][0] < f["auroc_ci"][1] and result_warnings(_result("s", f, 60, 300)) == []
    # scores all equal: AUROC 0.5 in every resample; with 30 ordinary prompts neither TPR is measurable (the
    # small-table warnings say so), so only the AUROC is named
    y = np.r_[np.ones(20, bool), np.zeros(30, bool)]
    f = metrics_with_ci(y, np.ones(50), n_boot=50)
    w = result_warnings(_result("flat", f, 20, 30))
    assert w[-1] == ("flat: AUROC 0.500 [0.500, 0.500]: a 95% bootstrap CI of zero width is no interval (every "
                     "resample gave the same value, as the percentile bootstrap does for a figure at 0 or 1 or for "
                     "scores all equal)")
    assert len(w) == 3 and "cannot measure TPR at 1% FPR" in w[0] and "cannot measure TPR at 3% FPR" in w[1]
