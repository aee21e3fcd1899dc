"""Detection metrics with confidence intervals: AUROC and TPR at a fixed FPR, bootstrap percentile CIs.

Conventions (memorized = positive class; a higher score means riskier):

* AUROC: ``sklearn.metrics.roc_auc_score`` (ties count one half).
* TPR at x% FPR, ``"last"`` convention, exactly Wen et al.'s (ICLR 2024; their evaluation notebook,
  YuxinWenRick/diffusion_memorization ``examples/det_mem_viz.ipynb``:
  ``fpr, tpr, _ = metrics.roc_curve(labels, scores, pos_label=1)``; ``tpr[np.where(fpr < .01)[0][-1]]``): on
  ``sklearn.metrics.roc_curve`` with its default ``drop_intermediate=True``, the TPR of the LAST ROC point
  whose FPR is STRICTLY below x. A point exactly at x does not count (with 100 ordinary prompts, the one
  false positive that makes FPR 1% is excluded); the FPR reached is always below x. With tied scores,
  ``drop_intermediate`` can remove a collinear point below x, and then the figure is that of the point
  before it, as in Wen's code; without ties it removes no point that could be the answer.
* TPR at x% FPR, ``"nearest"`` convention, exactly Ren et al.'s (renjie3/MemAttn ``detect.py``; Asthana &
  Belagiannis's ``detect_eval.py`` is the same): ``fpr, tpr, _ = roc_curve(labels, scores)`` (default
  ``drop_intermediate=True``), then ``tpr[np.argmin(np.abs(fpr - x))]``: the FIRST kept ROC point whose FPR is
  nearest to x (it can exceed x; where several kept points share that FPR, the first has the lowest TPR).
  Reported separately and labelled; never mixed.
* 95% confidence intervals: percentile bootstrap (Efron & Tibshirani 1993, ch. 13) over ``n_boot`` resamples
  drawn with replacement WITHIN each class (positives and negatives resampled separately, so every resample
  has both classes and the class counts of the data), from ``numpy.random.default_rng(seed)`` with a fixed
  seed: the interval is the (2.5, 97.5) percentiles of the resampled statistic.
"""

from __future__ import annotations

import numpy as np

FPR_TARGETS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_3pct_fpr": 0.03}
N_BOOT = 1000
BOOT_SEED = 0


def _clean(scores: np.ndarray) -> np.ndarray:
    """Scores as float64 with non-finite values (NaN and both infinities) replaced by a value strictly below every
    finite score (least finite - 1, or the next float below it where - 1 does not change it, past 2**53): they count
    as least risky. A non-finite score is a failed forward (an overflow in half precision), not evidence, so it is
    never a detection, whichever its sign; :func:`audit.evaluate.evaluate` counts such prompts. Where no float lies
    below the least finite score (it is the most negative float), the finite scores are replaced by their ranks
    1, 2, ... (the ROC and AUROC depend only on their order) and the non-finite ones by 0."""
    s = np.asarray(scores, dtype=np.float64)
    fin = np.isfinite(s)
    if fin.all():
        return s
    if not fin.any():
        return np.zeros_like(s)
    least = s[fin].min()
    with np.errstate(over="ignore"):  # -1e17 - 1 is -1e17: a NaN tied with the least score
        low = least - 1 if least - 1 < least else np.nextafter(least, -np.inf)
    if np.isfinite(low):
        return np.where(fin, s, low)
    ranks = np.zeros_like(s)
    ranks[fin] = np.unique(s[fin], return_inverse=True)[1] + 1.0
    return ranks


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, target: float, convention: str = "last") -> float:
    """TPR at FPR ``target`` under ``convention`` "last" (Wen et al.'s code: the last point of ``roc_curve``
    (``drop_intermediate=True``) with FPR strictly below target) or "nearest" (Ren et al.'s code: the first point
    of the same ``roc_curve`` with FPR nearest to target, ``np.argmin``). Needs both classes.

    Args:
        labels: bool [N], True = memorized (positive).
        scores: float [N], higher = riskier; non-finite scores count as least risky (:func:`_clean`).
        target: the FPR, a fraction in (0, 1] (0.01 for 1%).
        convention: "last" or "nearest" (module docstring).

    Returns:
        The TPR, a fraction in [0, 1].

    Raises:
        ValueError: unknown convention, a single class, or ``target`` not in (0, 1].
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(labels, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("TPR at FPR needs both classes")
    if not 0 < target <= 1:  # no ROC point has an FPR below 0 ("last" was an IndexError), none above 1
        raise ValueError(f"TPR at FPR: the target FPR is a fraction in (0, 1], got {target}")
    if convention == "last":
        fpr, tpr, _ = roc_curve(y, _clean(scores))  # drop_intermediate=True, sklearn's default, as Wen's notebook
        return float(tpr[np.flatnonzero(fpr < target)[-1]])  # FPR 0 at the first point: never empty for target > 0
    if convention == "nearest":
        fpr, tpr, _ = roc_curve(y, _clean(scores))  # drop_intermediate=True, as Ren's detect.py
        return float(tpr[np.argmin(np.abs(fpr - target))])  # the first of the nearest points, as np.argmin picks
    raise ValueError(f"unknown convention {convention!r}: last or nearest")


def min_nonzero_fpr(labels: np.ndarray, scores: np.ndarray) -> float:
    """The least FPR above 0 that any threshold on ``scores`` (float [N]) reaches against bool ``labels`` [N]: the
    share of the ordinary (False) prompts that tie at the highest ordinary score (after :func:`_clean`), a fraction in
    (0, 1]; 1 / n_ordinary without a tie there. A TPR at x% FPR where this is x or more can only be read at FPR 0
    (no threshold flags more than none but fewer than x% of the ordinary prompts): too few ordinary prompts
    (:func:`audit.evaluate.unmeasurable`) or tied top ordinary scores. (The "last" convention's ROC point may be at
    FPR 0 in other cases too, where ``drop_intermediate`` removed the end of a flat stretch from 0: its TPR is then
    that of thresholds below x%, a measured figure.) NaN without ordinary prompts."""
    y = np.asarray(labels, dtype=bool)
    if y.all():
        return float("nan")
    ordinary = _clean(scores)[~y]
    return float(np.count_nonzero(ordinary == ordinary.max()) / len(ordinary))


def metrics(labels: np.ndarray, scores: np.ndarray) -> dict:
    """AUROC and TPR at 1% / 3% FPR ("last" convention: Wen et al.'s, FPR strictly below the target) of
    ``scores`` (float [N]) against bool ``labels`` [N], plus the same TPRs under Ren's "nearest" convention
    (keys ``..._nearest``). NaN for every figure when only one class is present, or when no score is finite (every
    prompt's forward failed: ranked all alike, they read AUROC 0.5 and TPR 0, a measurement of nothing)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=bool)
    names = ["auroc", *FPR_TARGETS, *(k + "_nearest" for k in FPR_TARGETS)]
    if y.all() or not y.any() or not np.isfinite(np.asarray(scores, dtype=np.float64)).any():
        return {k: float("nan") for k in names}
    s = _clean(scores)
    out = {"auroc": float(roc_auc_score(y, s))}
    for name, target in FPR_TARGETS.items():
        out[name] = tpr_at_fpr(y, s, target, "last")
    for name, target in FPR_TARGETS.items():
        out[name + "_nearest"] = tpr_at_fpr(y, s, target, "nearest")
    return out


def _fast_figures(y: np.ndarray, s: np.ndarray) -> list[float]:
    """The figures of :func:`metrics` in the order of ``_NAMES``, computed directly from the ROC points
    (the same points as ``roc_curve(drop_intermediate=False)``: one per distinct score, plus (0, 0); for the
    TPRs at x% FPR, thinned as ``roc_curve``'s default ``drop_intermediate=True`` thins them); used for the
    bootstrap resamples, where scikit-learn's per-call overhead dominates. A test checks it against
    :func:`metrics`."""
    order = np.argsort(-s, kind="mergesort")
    ss, yy = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ss) != 0), len(ss) - 1]  # last index of each distinct score
    tp = np.cumsum(yy)[last]
    fp = np.cumsum(~yy)[last]
    n_pos, n_neg = tp[-1], fp[-1]
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    auroc = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
    out = [auroc]
    if len(tp) > 2:  # sklearn's drop_intermediate: drop a point where neither fps nor tps changes its step
        keep = np.r_[True, (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0), True]
        tp, fp = tp[keep], fp[keep]
    tpr_kept, fpr_kept = np.r_[0.0, tp / n_pos], np.r_[0.0, fp / n_neg]
    for target in FPR_TARGETS.values():
        out.append(float(tpr_kept[np.flatnonzero(fpr_kept < target)[-1]]))
    for target in FPR_TARGETS.values():
        out.append(float(tpr_kept[np.argmin(np.abs(fpr_kept - target))]))
    return out


_NAMES = ["auroc", *FPR_TARGETS, *(k + "_nearest" for k in FPR_TARGETS)]


def bootstrap_ci(labels: np.ndarray, scores: np.ndarray, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                 level: float = 0.95) -> dict:
    """Percentile bootstrap CIs (class-stratified; see the module docstring) of every figure of
    :func:`metrics`: ``{name: [lo, hi]}``. NaN bounds when only one class is present or no score is finite."""
    y = np.asarray(labels, dtype=bool)
    s = _clean(scores)
    if y.all() or not y.any() or not np.isfinite(np.asarray(scores, dtype=np.float64)).any():
        return {k: [float("nan"), float("nan")] for k in _NAMES}
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(seed)
    lab = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    stats = np.empty((n_boot, len(_NAMES)))
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        stats[b] = _fast_figures(lab, s[idx])
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {k: [float(v) for v in np.percentile(stats[:, i], q)] for i, k in enumerate(_NAMES)}


def metrics_with_ci(labels: np.ndarray, scores: np.ndarray, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """:func:`metrics` plus ``{name}_ci`` = [lo, hi] for every figure (:func:`bootstrap_ci`), and
    ``min_nonzero_fpr`` (:func:`min_nonzero_fpr`, no CI: a TPR at a target FPR at or below it is read at FPR 0;
    NaN where :func:`metrics` gives no figure)."""
    out = metrics(labels, scores)
    for k, v in bootstrap_ci(labels, scores, n_boot, seed).items():
        out[k + "_ci"] = v
    out["min_nonzero_fpr"] = float("nan") if out["auroc"] != out["auroc"] else min_nonzero_fpr(labels, scores)
    return out
