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
