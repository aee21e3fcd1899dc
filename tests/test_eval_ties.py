"""A TPR at x% FPR read at FPR 0 because the top ordinary scores tie (not because the ordinary prompts are too few) is
recorded (``min_nonzero_fpr``), marked † in `memaudit eval`'s table and warned of; checked against scikit-learn's
roc_curve as the independent computation."""

import numpy as np
from sklearn.metrics import roc_curve

from audit.cli.eval import UNMEASURABLE_NOTE, render
from audit.eval import metrics, metrics_with_ci
from audit.evaluate import result_warnings


def _tied(n_ordinary=1000, n_memorized=50, tied=20, seed=0):
    """``tied`` ordinary prompts share the top ordinary score 10.0; 5 memorized prompts score above it (11.0), the
    rest of both classes below (uniform in [0, 9))."""
    rng = np.random.default_rng(seed)
    ordinary = np.r_[np.full(tied, 10.0), rng.uniform(0, 9, n_ordinary - tied)]
    memorized = np.r_[np.full(5, 11.0), rng.uniform(0, 9, n_memorized - 5)]
    labels = np.r_[np.ones(n_memorized, bool), np.zeros(n_ordinary, bool)]
    return labels, np.r_[memorized, ordinary]


def test_min_nonzero_fpr_is_the_least_positive_fpr_of_sklearns_roc():
    """Independent: the least FPR above 0 among scikit-learn's ROC points with every threshold kept."""
    for tied in (20, 10, 9, 1):
        labels, scores = _tied(tied=tied)
        fpr, _, _ = roc_curve(labels, scores, drop_intermediate=False)
        m = metrics_with_ci(labels, scores, n_boot=1)
        assert m["min_nonzero_fpr"] == fpr[fpr > 0].min() == tied / 1000
    # 20 of 1,000 ordinary prompts tie at the top: the first threshold with a false positive is at FPR 2%, so TPR at
    # 1% FPR is that of FPR 0 (5/50 memorized above every ordinary prompt), as Wen's convention reads it too
    labels, scores = _tied()
    fpr, tpr, _ = roc_curve(labels, scores)
    assert metrics(labels, scores)["tpr_at_1pct_fpr"] == tpr[np.flatnonzero(fpr < 0.01)[-1]] == 0.1


def _result(labels, scores):
    f = metrics_with_ci(labels, scores, n_boot=50)
    f.update(n_nonfinite=0, n_nonfinite_memorized=0, forwards_per_prompt=1.0, prompts_per_s=1.0, seconds=1.0)
    return {"model": "m", "fingerprint": "f", "n_memorized": int(labels.sum()), "n_ordinary": int((~labels).sum()),
            "noise_draws": 1, "n_boot": 50, "scorers": {"attention_entropy": f},
            "layers": {"attention_entropy": {"mid.attn2": f}}}


def test_a_tpr_read_at_fpr_0_on_ties_is_marked_and_warned_of():
    """1,000 ordinary prompts are enough to measure TPR at 1% FPR, so the count alone marked nothing; the top 20
    tie, so the figure is read at FPR 0: it is marked †, with the note, and a warning names the scorer and layer."""
    labels, scores = _tied()
    result = _result(labels, scores)
    lines = render(result).splitlines()
    row = next(line for line in lines if line.startswith("attention_entropy "))
    assert "0.100 [" in row and row.count("†") == 1  # 1% marked; 3% (read at 2%) not
    assert next(line for line in lines if "mid.attn2" in line).endswith("†")
    assert lines[-1] == UNMEASURABLE_NOTE
    tied = [w for w in result_warnings(result) if "read at FPR 0" in w]
    assert tied == [f"{name}: TPR at 1% FPR read at FPR 0: its 20 highest ordinary scores tie (2% of 1000), so no "
                    "threshold flags more than none but fewer than 1% of the ordinary prompts (marked †)"
                    for name in ("attention_entropy", "attention_entropy @ mid.attn2")]


def test_no_mark_or_warning_without_ties_past_the_target():
    """9 of 1,000 tied at the top: a threshold reaches 0.9% FPR, so TPR at 1% FPR is measured (no mark); 10 tied
    (exactly 1%) is marked."""
    labels, scores = _tied(tied=10)
    assert render(_result(labels, scores)).splitlines()[-1] == UNMEASURABLE_NOTE
    labels, scores = _tied(tied=9)
    result = _result(labels, scores)
    lines = render(result).splitlines()
    assert not any("†" in line for line in lines) and UNMEASURABLE_NOTE not in lines
    assert not [w for w in result_warnings(result) if "read at FPR 0" in w]
