"""TPR at x% FPR as Wen et al.'s evaluation code computes it (audit.eval's "last" convention), on hand-made ROCs
where "FPR < x" and "FPR <= x" (and sklearn's drop_intermediate) give different answers."""

from __future__ import annotations

import numpy as np
import pytest

from audit.eval import _fast_figures, bootstrap_ci, metrics, tpr_at_fpr


def _wen(labels, scores, target=0.01) -> float:
    """Wen et al.'s notebook (YuxinWenRick/diffusion_memorization, examples/det_mem_viz.ipynb), verbatim but for
    the target: ``fpr, tpr, thresholds = metrics.roc_curve(t_labels, preds, pos_label=1)``;
    ``low = tpr[np.where(fpr<.01)[0][-1]]``."""
    from sklearn import metrics as skm

    fpr, tpr, thresholds = skm.roc_curve(np.asarray(labels, int).tolist(), list(scores), pos_label=1)
    return tpr[np.where(fpr < target)[0][-1]]


def _ren(labels, scores, target=0.01) -> float:
    """Ren et al.'s detect.py (renjie3/MemAttn), verbatim but for the target (Asthana & Belagiannis's
    detect_eval.py is the same): ``fpr, tpr, thresholds = roc_curve(labels, scores)``;
    ``closest_fpr_index = np.argmin(np.abs(fpr - target_fpr))``; ``tpr[closest_fpr_index]``."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(labels, scores)
    closest_fpr_index = np.argmin(np.abs(fpr - target))
    return tpr[closest_fpr_index]


def test_a_point_exactly_at_1pct_fpr_does_not_count():
    # 10 positives, 100 negatives; ROC points (FPR, TPR): (0, .3), (.01, .3), (.01, .9), (.02, .9), (1, .9), (1, 1).
    # The negative at 7 makes FPR exactly 1%: Wen's "< 1%" stops before it (TPR 0.3), "<= 1%" passed it (0.9).
    y = np.array([1] * 10 + [0] * 100, bool)
    s = np.concatenate([[10, 10, 10] + [6.5] * 6 + [-2], [7, 6], np.full(98, -1.0)])
    m = metrics(y, s)
    assert m["tpr_at_1pct_fpr"] == 0.3 == _wen(y, s)
    assert tpr_at_fpr(y, s, 0.01, "last") == 0.3
    # Ren's code: the FIRST kept point nearest 1%, (.01, .3), not the highest TPR at that FPR, (.01, .9)
    assert m["tpr_at_1pct_fpr_nearest"] == 0.3 == _ren(y, s)
    assert m["tpr_at_3pct_fpr"] == 0.9 == _wen(y, s, 0.03)  # FPR 2% is below 3%
    assert np.allclose(list(m.values()), _fast_figures(y, s))
    # the same at 3%: the third negative above every other makes FPR exactly 3%
    s3 = np.concatenate([[10] * 4 + [6.5] * 6, [9, 8, 7], np.full(97, -1.0)])
    m3 = metrics(y, s3)
    assert m3["tpr_at_3pct_fpr"] == 0.4 == _wen(y, s3, 0.03)  # TPR 0.4 up to FPR 2%; "<= 3%" gave 1.0
    assert m3["tpr_at_1pct_fpr"] == 0.4 == _wen(y, s3)  # (0, 0.4)
    assert np.allclose(list(m3.values()), _fast_figures(y, s3))


def test_ties_follow_roc_curves_default_drop_intermediate():
    # 10 positives, 200 negatives: 5 positives at 10, then one positive and one negative tied at 9 and again at 8,
    # 3 positives at 0, 198 negatives at -1. Points: (0, .5), (.005, .6), (.01, .7), (.01, 1), (1, 1). sklearn's
    # default drop_intermediate removes (.005, .6), collinear with its neighbours, so Wen's code reads 0.5 where
    # every point gives 0.6 below 1% and "<= 1%" gives 1.0.
    y = np.array([1] * 5 + [1, 0] + [1, 0] + [1] * 3 + [0] * 198, bool)
    s = np.array([10.0] * 5 + [9, 9] + [8, 8] + [0] * 3 + [-1] * 198)
    m = metrics(y, s)
    assert m["tpr_at_1pct_fpr"] == 0.5 == _wen(y, s)
    assert np.allclose(list(m.values()), _fast_figures(y, s))


def test_fast_figures_match_wens_code_on_bootstrap_resamples():
    """Resampling with replacement makes tie groups everywhere: the bootstrap's own ROC code must thin them as
    roc_curve does."""
    rng = np.random.default_rng(7)
    y0 = np.r_[np.ones(60, bool), np.zeros(300, bool)]
    s0 = np.round(rng.normal(size=360) + 1.5 * y0, 1)
    for _ in range(200):
        idx = np.r_[rng.choice(60, 60), 60 + rng.choice(300, 300)]
        y, s = y0[idx], s0[idx]
        fast = _fast_figures(y, s)
        assert fast[1] == _wen(y, s, 0.01) and fast[2] == _wen(y, s, 0.03)
        assert fast[3] == _ren(y, s, 0.01) and fast[4] == _ren(y, s, 0.03)
        assert np.allclose(list(metrics(y, s).values()), fast)
    ci = bootstrap_ci(y0, s0, n_boot=200)
    assert ci["tpr_at_1pct_fpr"][0] <= metrics(y0, s0)["tpr_at_1pct_fpr"] <= ci["tpr_at_1pct_fpr"][1]


def test_unknown_convention_and_single_class_are_refused():
    with pytest.raises(ValueError, match="unknown convention"):
        tpr_at_fpr(np.array([1, 0], bool), np.array([1.0, 0.0]), 0.01, "at_or_below")
    with pytest.raises(ValueError, match="both classes"):
        tpr_at_fpr(np.array([1, 1], bool), np.array([1.0, 0.0]), 0.01)
    for target in (0.0, -0.01, 1.5, float("nan")):  # target 0 under "last" was an IndexError
        for convention in ("last", "nearest"):
            with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
                tpr_at_fpr(np.array([1, 0], bool), np.array([1.0, 0.0]), target, convention)
    assert tpr_at_fpr(np.array([1, 0], bool), np.array([0.0, 1.0]), 1.0) == 0.0  # inverted: 100% FPR not below 1
    assert tpr_at_fpr(np.array([1, 0], bool), np.array([1.0, 0.0]), 1.0) == 1.0


def test_nearest_is_ren_codes_point_on_random_and_tied_scores():
    """The "nearest" TPR is Ren's code's figure exactly, on continuous and on heavily tied scores; at a vertical
    ROC step the first (lowest) point is taken, where the highest-TPR reading differs."""
    rng = np.random.default_rng(3)
    for draw in range(300):
        y = np.r_[np.ones(50, bool), np.zeros(200, bool)]
        s = rng.normal(size=250) + 2.0 * y
        if draw % 2:
            s = np.round(s, 1)
        for target in (0.01, 0.03):
            assert tpr_at_fpr(y, s, target, "nearest") == _ren(y, s, target)
        m = metrics(y, s)
        assert (m["tpr_at_1pct_fpr_nearest"], m["tpr_at_3pct_fpr_nearest"]) == (_ren(y, s), _ren(y, s, 0.03))
    # 10 positives, 100 negatives: 3 positives at 10, then a tie of 6 positives and 1 negative at 7 (a diagonal step
    # to (.01, .9)): nearest 0.8% is FPR 1% (TPR .9), beyond the target; Wen's rule stays at (0, .3)
    y = np.array([1] * 10 + [0] * 100, bool)
    s = np.concatenate([[10, 10, 10] + [7] * 6 + [-2], [7], np.full(99, -1.0)])
    assert tpr_at_fpr(y, s, 0.008, "nearest") == 0.9 == _ren(y, s, 0.008)
    assert tpr_at_fpr(y, s, 0.008, "last") == 0.3


def test_bootstrap_ci_is_the_stratified_percentile_interval():
    """The CI recomputed from its definition (module docstring) with scikit-learn: resamples drawn with replacement
    within each class from default_rng(seed) (positives first), the figure of each resample, then the 2.5th and
    97.5th percentiles. A CI at the wrong percentiles, or from resamples without replacement (each one the data
    itself: a zero-width interval), passed the old test, which only checked the point estimate lay inside."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = np.r_[np.ones(40, bool), np.zeros(120, bool)]
    rng.shuffle(y)
    s = rng.normal(size=160) + 1.2 * y
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    draw = np.random.default_rng(11)
    aurocs, tprs = [], []
    for _ in range(300):
        idx = np.r_[draw.choice(pos, len(pos)), draw.choice(neg, len(neg))]
        aurocs.append(roc_auc_score(y[idx], s[idx]))
        tprs.append(_wen(y[idx], s[idx], 0.03))
    ci = bootstrap_ci(y, s, n_boot=300, seed=11)
    np.testing.assert_allclose(ci["auroc"], np.percentile(aurocs, [2.5, 97.5]), rtol=0, atol=1e-12)
    assert ci["tpr_at_3pct_fpr"] == list(np.percentile(tprs, [2.5, 97.5]))
    assert ci["auroc"][1] - ci["auroc"][0] > 0.05  # resampled with replacement: a real interval
