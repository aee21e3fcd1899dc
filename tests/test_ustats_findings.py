"""Findings of the statistics review (session 53, ustats): figures checked against independent computations."""

from __future__ import annotations

import json

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


def test_eval_zero_width_warning_names_each_layer_of_layers_all():
    # `memaudit eval --layers all` and `memaudit lab eval` print each cross-attention layer's figures with their CIs;
    # the lab's test split shows "TPR@1%FPR 0.000 [0.000, 0.000]" for two layers (docs/lab.md)
    from audit.eval import metrics_with_ci
    from audit.evaluate import result_warnings, zero_width_warnings

    rng = np.random.default_rng(2)
    y = np.r_[np.ones(78, bool), np.zeros(207, bool)]
    spread = metrics_with_ci(y, np.r_[rng.normal(1, 1, 78), rng.normal(0, 1, 207)], n_boot=100)
    low = metrics_with_ci(y, np.r_[rng.normal(-3, 0.1, 78), rng.normal(0, 1, 207)], n_boot=100)  # none detected
    res = _result("attention_entropy", spread, 78, 207) | {"layers": {"attention_entropy": {"down.attn2": spread,
                                                                                            "up.attn2": low}}}
    w = result_warnings(res)
    assert len(w) == 1 and w[0].startswith("attention_entropy @ up.attn2: AUROC 0.000 [0.000, 0.000], TPR at 1% FPR "
                                           "0.000 [0.000, 0.000] and TPR at 3% FPR 0.000 [0.000, 0.000]: ")
    assert w[0].endswith(f"a TPR of 0 of 78 memorized prompts has the exact (Clopper-Pearson) 95% interval [0.000, "
                         f"{1 - 0.025 ** (1 / 78):.3f}] as a binomial proportion") and "0.046]" in w[0]
    assert zero_width_warnings({}, {}, 78, 207) == []


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir):
    """A finished run over 20 distinct prompts of the tiny model, whose risks a test replaces (keeping the ranks)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audit.pipeline import RunConfig
    from audit.runner import execute
    from audit.tiny import TINY_WORDS

    root = tmp_path_factory.mktemp("ustats-ref")
    prompts = [" ".join(TINY_WORDS[(i * 7 + j) % len(TINY_WORDS)] for j in range(3 + i % 5)) + f" {i}"
               for i in range(20)]
    pq.write_table(pa.table({"prompt": prompts}), root / "reference.parquet")
    execute(RunConfig(inputs=(str(root / "reference.parquet"),), model=str(tiny_model_dir), device="cpu",
                      out=str(root / "ref")), progress=False, log=lambda m: None)
    return root / "ref"


def _with_risks(run, dest, risks):
    """A copy of ``run`` whose risks are ``risks`` (assigned by rank, so the table stays ranked)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(run, dest)
    t = pq.read_table(dest / "risk.parquet")
    assert t.num_rows == len(risks) and t["rank"].to_pylist() == sorted(t["rank"].to_pylist())
    values = pa.array(sorted(risks, reverse=True), pa.float64())
    for col in ("risk", "attn_entropy"):
        t = t.set_column(t.schema.get_field_index(col), t.schema.field(col), values)
    pq.write_table(t, dest / "risk.parquet")
    return dest


def _calibrate(run, fpr, out):
    from typer.testing import CliRunner

    from audit.cli import app

    res = CliRunner().invoke(app, ["calibrate", str(run), "--fpr", fpr, "-o", str(out)])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text()), [line.removeprefix("memaudit: warning: ") for line in res.stderr.splitlines()
                                         if line.startswith("memaudit: warning: ")]


def test_calibrate_says_when_ties_leave_the_threshold_flagging_fewer_than_allowed(reference_run, tmp_path):
    # 15 of 20 reference prompts at risk 1.0, 5 at 2.0: --fpr 0.3 allows 6, but the threshold (1.0, the 14th of 20)
    # flags 5 (25%) and said only "threshold 1 at FPR 0.3"; a reference of equal risks flagged none, silently
    risks = [1.0] * 15 + [2.0] * 5
    cal, warnings = _calibrate(_with_risks(reference_run, tmp_path / "ties", risks), "0.3", tmp_path / "c.json")
    r = np.array(risks)
    assert cal["threshold"] == np.sort(r)[20 - 6 - 1] == 1.0 and int((r > 1.0).sum()) == 5
    assert warnings[-1] == ("the threshold 1 is the risk of more than one reference prompt: it flags 5 of the 20 "
                            "(25%), fewer than the 6 that fpr 0.3 allows, and any lower threshold flags more than 6")
    cal, warnings = _calibrate(_with_risks(reference_run, tmp_path / "flat", [3.0] * 20), "0.25", tmp_path / "f.json")
    assert cal["reference"]["flagged"] == 0 and cal["reference"]["allowed_flags"] == 5
    assert warnings[-1] == ("the threshold 3 is the risk of more than one reference prompt (every reference prompt "
                            "has this risk): it flags 0 of the 20 (0%), fewer than the 5 that fpr 0.25 allows, and any "
                            "lower threshold flags more than 5")
    distinct = [float(i) for i in range(20)]  # no ties: flags exactly k, no such warning
    cal, warnings = _calibrate(_with_risks(reference_run, tmp_path / "d", distinct), "0.25", tmp_path / "d.json")
    assert cal["reference"]["flagged"] == 5 and not any("more than one reference prompt" in w for w in warnings)


def test_calibrate_says_an_fpr_below_one_over_n_is_not_what_the_threshold_gives(reference_run, tmp_path):
    # --fpr 0.01 of 20 reference prompts: k = 0, the threshold is the highest risk (the same at --fpr 0.001), flags
    # none, and a new ordinary prompt exceeds the highest of 20 exchangeable risks with probability 1/21 (4.8%)
    run = _with_risks(reference_run, tmp_path / "d", [float(i) for i in range(20)])
    cal, warnings = _calibrate(run, "0.01", tmp_path / "a.json")
    cal2, _ = _calibrate(run, "0.001", tmp_path / "b.json")
    assert cal["threshold"] == cal2["threshold"] == 19.0 and cal["reference"]["flagged"] == 0
    assert warnings[-1] == ("fpr 0.01 is below 1/20, the least share of 20 reference prompts: the threshold is their "
                            "highest risk, the same for any fpr under 1/20, and flags none of them; a new ordinary "
                            "prompt scored alike exceeds it with probability about 1/21 (4.8%), not 1%")
    # the 1/(n + 1): the share of new draws above the highest of 20, over many exchangeable samples
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(20000, 21))
    assert abs((draws[:, 20] > draws[:, :20].max(axis=1)).mean() - 1 / 21) < 0.005


def test_eval_warns_that_too_few_bootstrap_resamples_give_no_95_percent_interval():
    # `memaudit eval --bootstrap 10` printed "95% bootstrap CIs" whose limits, the 2.5th and 97.5th percentiles of 10
    # resampled figures, are about their least and greatest: no 95% interval
    from audit.eval import bootstrap_ci
    from audit.evaluate import bootstrap_warnings, result_warnings

    rng = np.random.default_rng(3)
    y = np.r_[np.ones(60, bool), np.zeros(300, bool)]
    s = np.r_[rng.normal(1, 1, 60), rng.normal(0, 1, 300)]
    ci = bootstrap_ci(y, s, n_boot=10)["auroc"]
    # independently: the same 10 resamples' AUROCs (the module's seed and draws), their range against the limits
    from sklearn.metrics import roc_auc_score

    draws = np.random.default_rng(0)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    aurocs = [roc_auc_score(np.r_[np.ones(60), np.zeros(300)],
                            s[np.r_[draws.choice(pos, 60), draws.choice(neg, 300)]]) for _ in range(10)]
    assert np.allclose(ci, np.percentile(aurocs, [2.5, 97.5]), rtol=0, atol=1e-12)
    lo2, hi2 = sorted(aurocs)[:2], sorted(aurocs)[-2:]  # 2.5% of 10: 0.225 of the way from the least to the next
    assert np.isclose(ci[0], lo2[0] + 0.225 * (lo2[1] - lo2[0]))
    assert np.isclose(ci[1], hi2[1] - 0.225 * (hi2[1] - hi2[0]))
    line = ("--bootstrap 10 (n_boot): a 95% CI's limits are the 2.5th and 97.5th percentiles of the resampled figures, "
            "and 10 resample(s) put fewer than one in each tail, so every CI printed is about their range, not a 95% "
            "interval; give 1,000 (the default) or more")
    assert bootstrap_warnings(10) == [line] and bootstrap_warnings(39) != [] and bootstrap_warnings(40) == []
    assert result_warnings({"n_memorized": 60, "n_ordinary": 300, "scorers": {}, "n_boot": 10}) == [line]
    assert result_warnings({"n_memorized": 60, "n_ordinary": 300, "scorers": {}, "n_boot": 1000}) == []
    # one resample: every CI is one point; the bootstrap line says so, not a zero-width line per figure
    from audit.eval import metrics_with_ci

    one = {"n_memorized": 60, "n_ordinary": 300, "n_boot": 1,
           "scorers": {"s": metrics_with_ci(y, s, n_boot=1) | {"n_nonfinite": 0}}}
    assert one["scorers"]["s"]["auroc_ci"][0] == one["scorers"]["s"]["auroc_ci"][1]
    assert result_warnings(one) == [line.replace("--bootstrap 10", "--bootstrap 1").replace("and 10 resample(s)",
                                                                                           "and 1 resample(s)")]


def test_eval_gives_no_figure_when_every_score_is_non_finite(tiny_model_dir, tmp_path, monkeypatch):
    # every prompt's forward non-finite (an fp16 overflow on every prompt): `memaudit eval` printed AUROC 0.500
    # [0.500, 0.500] and TPR 0.000 for a scorer that had measured nothing (all prompts tied as least risky)
    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.eval import metrics_with_ci
    from audit.scorers import Scorer

    real = Scorer.score

    def broken(self, prompts, tokens=None):
        out = real(self, prompts, tokens)
        return dict(out, risk=np.full(len(out["risk"]), np.nan))

    monkeypatch.setattr(Scorer, "score", broken)
    prompts = ["a red cat", "a blue dog on a sofa", "old city street at night", "portrait of a woman", "a green bird",
               "a yellow house", "a painting of a boat", "two cats on a bed", "a fox", "a small house"]
    pq.write_table(pa.table({"prompt": prompts, "memorized": [True] * 4 + [False] * 6}), tmp_path / "l.parquet")
    args = ["eval", str(tmp_path / "l.parquet"), "--model", str(tiny_model_dir), "--device", "cpu", "--bootstrap", "50"]
    res = CliRunner().invoke(app, args + ["--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)  # strict JSON: null, not NaN
    fig = out["scorers"]["attention_entropy"]
    assert fig["auroc"] is None and fig["auroc_ci"] == [None, None] and fig["tpr_at_1pct_fpr"] is None
    assert fig["n_nonfinite"] == 10 and "NaN" not in res.stdout
    line = ("attention_entropy: every prompt's score (10, 4 memorized) was non-finite: no AUROC or TPR (n/a, null in "
            "--json); `memaudit run` rejects such prompts as nonfinite_attention")
    assert line in out["warnings"] and not any("zero width" in w for w in out["warnings"])
    res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})  # the table (a narrower terminal gets blocks)
    row = next(r for r in res.stdout.splitlines() if r.startswith("attention_entropy "))
    assert row.split()[1:4] == ["n/a", "n/a†", "n/a†"]
    blocks = CliRunner().invoke(app, args, env={"COLUMNS": "40"}).stdout.splitlines()
    at = blocks.index("attention_entropy")
    assert blocks[at + 1].split()[:2] == ["AUROC", "n/a"], blocks[at:at + 4]
    # one finite score is still a ranking (the rest least risky, as documented): figures are given
    s = np.r_[np.nan, 1.0, np.full(8, np.nan)]
    assert metrics_with_ci(np.r_[True, True, np.zeros(8, bool)], s, n_boot=20)["auroc"] == 0.75


def test_lab_eval_json_is_strict_where_a_scorer_has_no_figure(tmp_path, monkeypatch):
    # with no finite score a figure is NaN (audit.eval.metrics); `lab eval --json` wrote it as NaN, which strict JSON
    # readers (polars' json_decode, JavaScript) refuse
    import polars as pl
    from typer.testing import CliRunner

    import audit.lab.evaluate as lab_evaluate
    from audit.cli import app
    from audit.lab import LAB_PROMPTS

    test = pl.read_parquet(LAB_PROMPTS).filter(pl.col("split") == "test")
    pl.concat([test.filter(pl.col("memorized")).head(12), test.filter(~pl.col("memorized")).head(30)]).write_parquet(
        tmp_path / "t.parquet")

    def scores(model, prompts, **kw):  # no forward: finite entropies; a noise scorer that failed on every prompt
        n = len(prompts)
        rng = np.random.default_rng(0)
        layers = {name: rng.normal(size=n) for name in ("a.attn2", "b.attn2")}
        return lab_evaluate.LabScores({"attention_entropy": rng.normal(size=n), "noise_magnitude": np.full(n, np.nan)},
                                      layers, {name: np.full(n, 0.05) for name in layers})

    monkeypatch.setattr(lab_evaluate, "score_prompts", scores)
    res = CliRunner().invoke(app, ["lab", "eval", "--prompts", str(tmp_path / "t.parquet"), "--json"])
    assert res.exit_code == 0, res.output

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    out = json.loads(res.stdout, parse_constant=refuse)
    assert out["scorers"]["noise_magnitude"]["auroc"] is None and out["scorers"]["noise_magnitude"]["auroc_ci"] == [
        None, None]
    assert isinstance(out["scorers"]["attention_entropy"]["auroc"], float)
