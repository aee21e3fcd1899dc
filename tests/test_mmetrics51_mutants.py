"""Mutation review (session 51) of audit/eval.py, audit/evaluate.py, audit/lab/evaluate.py and audit/cascade.py:
behaviours that a hand-made change of the code left passing the suite, asserted here by their real values."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit.errors import RunError
from audit.eval import bootstrap_ci, metrics_with_ci


def test_default_bootstrap_is_1000_class_stratified_resamples_from_seed_0():
    """``memaudit lab eval`` records its CIs as "95% percentile bootstrap, 1000 class-stratified resamples, seed 0"
    (audit/lab/cli.py) and docs/lab.md says the same, but calls metrics_with_ci with its defaults: the CI recomputed
    with scikit-learn from exactly 1000 resamples of default_rng(0) (positives drawn first) is the default's. A default
    of 999 resamples or seed 1 passed the suite."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    y = np.r_[np.ones(30, bool), np.zeros(60, bool)]
    s = rng.normal(size=90) + 0.8 * y
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    draw = np.random.default_rng(0)
    aurocs = []
    for _ in range(1000):
        idx = np.r_[draw.choice(pos, len(pos)), draw.choice(neg, len(neg))]
        aurocs.append(roc_auc_score(y[idx], s[idx]))
    expected = np.percentile(aurocs, [2.5, 97.5])
    np.testing.assert_allclose(bootstrap_ci(y, s)["auroc"], expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(metrics_with_ci(y, s)["auroc_ci"], expected, rtol=0, atol=1e-12)
    # the data tells 999 from 1000 resamples, and seed 1 from seed 0 (bounds about 1e-5 and 2e-3 apart)
    assert np.abs(np.subtract(bootstrap_ci(y, s, n_boot=999)["auroc"], expected)).max() > 1e-5
    assert np.abs(np.subtract(bootstrap_ci(y, s, seed=1)["auroc"], expected)).max() > 1e-3


def test_a_scorer_failing_on_every_prompt_measures_nothing_and_tied_scores_chance():
    """Every score non-finite (a scorer that overflowed on every prompt) is every score tied: one ROC step from (0, 0)
    to (1, 1), so AUROC 0.5 and no TPR below 1% or 3% FPR, in the figures and in every bootstrap resample (the fast
    path's drop of intermediate points needs three points or more: applied to one, it raised IndexError)."""
    y = np.r_[np.ones(4, bool), np.zeros(8, bool)]
    names = ("tpr_at_1pct_fpr", "tpr_at_3pct_fpr", "tpr_at_1pct_fpr_nearest", "tpr_at_3pct_fpr_nearest")
    out = metrics_with_ci(y, np.full(12, 2.5), n_boot=20)
    assert out["auroc"] == 0.5 and out["auroc_ci"] == [0.5, 0.5]
    for name in names:
        assert out[name] == 0.0 and out[name + "_ci"] == [0.0, 0.0]
    # no finite score at all: a measurement of nothing, so no figure (NaN; null in eval --json) since ustats's
    # finding (test_ustats_findings), where it read AUROC 0.5 and TPR 0
    for scores in (np.full(12, np.nan), np.r_[np.full(6, np.inf), np.full(6, -np.inf)]):
        out = metrics_with_ci(y, scores, n_boot=20)
        assert all(np.isnan(out[k]) and np.isnan(out[k + "_ci"]).all() for k in ("auroc", *names))


def test_a_one_letter_prefix_before_a_slash_is_a_local_folder_not_a_url(tmp_path, monkeypatch):
    """A URL's scheme is read as two letters or more (s3://, gs://): ``c:/labels.csv`` is the file labels.csv in the
    folder ``c:`` (a Windows drive letter elsewhere), read as a table, not refused as a URL."""
    from audit.evaluate import read_labelled

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c:").mkdir()
    (tmp_path / "c:" / "labels.csv").write_text("prompt,memorized\na cat,true\na dog,false\n")
    prompts, labels = read_labelled("c:/labels.csv")
    assert prompts == ["a cat", "a dog"] and labels.tolist() == [True, False]


def test_a_folder_is_refused_as_a_folder_whatever_its_suffix_and_a_parquet_dataset_is_read(tmp_path):
    """`memaudit eval x.csv` on a folder said "cannot read (OSError: Expected file path, but ... is a directory)"
    (only a .jsonl folder said "is a folder"), and a folder without suffix holding no Parquet file said "no prompt
    column 'prompt' (columns: )". A folder of Parquet parts (Spark's x.parquet/) is still read as one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from audit.errors import RunError
    from audit.evaluate import read_labelled

    for name, kind in (("x.csv", "CSV"), ("x.TSV", "TSV"), ("x.jsonl", "JSONL"), ("x.json", "JSON")):
        (tmp_path / name).mkdir()
        with pytest.raises(RunError) as err:
            read_labelled(tmp_path / name)
        assert str(err.value) == f"{tmp_path / name}: is a folder, not a labelled table (give the {kind} file itself)"
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError) as err:
        read_labelled(tmp_path / "empty")
    assert str(err.value) == f"{tmp_path / 'empty'}: is a folder holding no Parquet file, not a labelled table"
    (tmp_path / "ds.parquet").mkdir()
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"], "memorized": [True, False]}),
                   tmp_path / "ds.parquet" / "part-0.parquet")
    pq.write_table(pa.table({"prompt": ["a fox"], "memorized": [False]}), tmp_path / "ds.parquet" / "part-1.parquet")
    prompts, labels = read_labelled(tmp_path / "ds.parquet")
    assert prompts == ["a cat", "a dog", "a fox"] and labels.tolist() == [True, False, False]


def test_a_bad_confirm_top_is_refused_by_the_config_check_before_any_scoring():
    """check_confirm_options (the config check, before the model loads) reads --confirm-top: without it a cut of 0,
    over 100% or not a number was refused by run_confirm only, after stage 1 had scored every prompt."""
    import types

    import pytest

    from audit.cascade import check_confirm_options
    from audit.errors import RunError

    for top in ("0", "0%", "1.5", "150%", "-3", "ten"):
        cfg = types.SimpleNamespace(confirm="noise_magnitude", confirm_top=top, scorer="attention_entropy",
                                    engine="local")
        with pytest.raises(RunError) as err:
            check_confirm_options(cfg)
        assert str(err.value) == (f"--confirm-top {top}: give a fraction of the distinct prompts (0.05 or 5%) or a "
                                  "count (500)")


def test_a_confirm_stage_of_another_model_is_refused_and_a_finite_rescore_wins_in_either_part_order(tmp_path):
    """confirm/confirm.json holds the model's fingerprint: the same scorer and configuration on another model is
    refused (dropping the fingerprint from the identity passed the suite). A prompt scored twice (non-finite, then
    finite after --retry-failed) keeps its finite row whichever part file sorts first (their names are random); a
    merge that took the last part read confirmed it or not by the names' order."""
    import types

    import pytest

    from audit.cascade import run_confirm
    from test_cascade_mutants import _stage1, _StubScorer

    screen = types.SimpleNamespace(num_inference_steps=50, noise_draws=1)
    cfg = types.SimpleNamespace(confirm_top="2", batch_size=8, scorer="attention_entropy")
    values = {"A": (5.0, False), "B": (4.0, False)}
    for finite_first in (True, False):
        out = tmp_path / f"run{finite_first}"
        _stage1(out)
        run_confirm(out, _StubScorer(values), cfg, {}, screen, log=lambda m: None)  # writes confirm.json, A and B
        for f in (out / "confirm").glob("part-*.parquet"):
            f.unlink()
        bad, good = ("part-b", "part-a") if finite_first else ("part-a", "part-b")
        pq.write_table(pa.table({"prompt_hash": ["hA"], "toy": [float("nan")], "nonfinite": [True]}),
                       out / "confirm" / f"{bad}.parquet")
        pq.write_table(pa.table({"prompt_hash": ["hA", "hB"], "toy": [7.0, 4.0], "nonfinite": [False, False]}),
                       out / "confirm" / f"{good}.parquet")
        stub = _StubScorer(values)
        c = run_confirm(out, stub, cfg, {}, screen, log=lambda m: None)["confirm"]
        assert (stub.scored, c["resumed_prompts"], c["unique_prompts_confirmed"], c["nonfinite"]) == ([], 2, 2, 0)
        rows = pq.read_table(out / "risk.parquet").to_pylist()
        assert [(r["prompt"], r["toy"]) for r in rows][:3] == [("A", 7.0), ("A", 7.0), ("B", 4.0)]
    other = _StubScorer(values)
    other.model = types.SimpleNamespace(fingerprint="G")
    with pytest.raises(RunError, match="its confirm/ stage was made with another confirming scorer or configuration"):
        run_confirm(tmp_path / "runTrue", other, cfg, {}, screen, log=lambda m: None)


def test_eval_takes_the_largest_noise_draws_and_resamples_it_names_and_refuses_one_more():
    """The bounds themselves pass eval's option check (1,024 draws, as `memaudit run` takes them; 100,000
    resamples) and one more is refused, naming the flag: a check at >= refused the largest value eval documents."""
    from audit.evaluate import eval_options_problem

    assert eval_options_problem(1024, 50, 32, 100_000) is None
    assert eval_options_problem(1025, 50, 32, 1000) == ("--noise-draws 1025: give 1 to 1,024 (each draw is one more "
                                                        "UNet row per prompt: K draws cost K times one)")
    assert eval_options_problem(1, 50, 32, 100_001) == ("--bootstrap 100001 (n_boot): give 1 to 100,000 resamples "
                                                        "(each one recomputes every figure; the default 1,000 gives "
                                                        "stable 95% CIs)")


def test_a_damaged_confirm_json_gives_no_unapplied_note_instead_of_a_crash(tmp_path):
    """unapplied_note (a rerun without --confirm on a folder confirmed before) reads confirm/confirm.json: a file that
    is not JSON or not UTF-8 (ValueError) gives no note, as a missing one does; without ValueError among the reasons
    such a file crashed the rerun, a case no test reached."""
    from audit.cascade import unapplied_note

    (tmp_path / "confirm").mkdir()
    assert unapplied_note(tmp_path) is None  # no confirm.json
    for damaged in (b'{"scorer": "noise_magn', b"\xff\xfe not utf-8", b"[1, 2]", b'{"other": 1}'):
        (tmp_path / "confirm" / "confirm.json").write_bytes(damaged)
        assert unapplied_note(tmp_path) is None
    (tmp_path / "confirm" / "confirm.json").write_text('{"scorer": "noise_magnitude"}')
    assert unapplied_note(tmp_path).startswith("this folder's confirm/ stage (noise_magnitude) is not applied")


def test_evaluate_refuses_an_unknown_noise_generator_before_loading_the_model(tmp_path):
    """evaluate() from Python (the CLI checks the option itself): an unknown noise generator is one RunError naming
    the choices, before the model is looked for (without the check, a ValueError came from ScoreConfig once the
    model had loaded; here the model does not even exist)."""
    import pytest

    from audit.evaluate import evaluate

    with pytest.raises(RunError) as err:
        evaluate(["a cat", "a dog"], [True, False], str(tmp_path / "no-model"), noise_generator="pcg64")
    assert str(err.value) == "--noise-generator 'pcg64': choose mt19937 or philox"


def test_a_confirm_stage_of_another_score_config_is_refused(tmp_path):
    """confirm/confirm.json holds the confirming scorer's whole ScoreConfig: the same scorer and model with another
    configuration (steps, draws) is refused rather than served the parts scored under the first (dropping the
    config from the identity passed the suite; through the CLI the run's own identity check refuses first)."""
    import types

    import pytest

    from audit.cascade import run_confirm
    from test_cascade_mutants import _stage1, _StubScorer

    screen = types.SimpleNamespace(num_inference_steps=50, noise_draws=1)
    cfg = types.SimpleNamespace(confirm_top="2", batch_size=8, scorer="attention_entropy")
    values = {"A": (5.0, False), "B": (4.0, False)}
    out = tmp_path / "run"
    _stage1(out)
    run_confirm(out, _StubScorer(values), cfg, {}, screen, log=lambda m: None)
    other = _StubScorer(values)
    other.config = types.SimpleNamespace(num_inference_steps=8, noise_draws=2,
                                         to_dict=lambda: {"scorer": "toy", "num_inference_steps": 8})
    with pytest.raises(RunError, match="its confirm/ stage was made with another confirming scorer or "
                                       "configuration; use a new --out"):
        run_confirm(out, other, cfg, {}, screen, log=lambda m: None)
    assert other.scored == []


def test_lab_eval_figures_each_layer_on_its_splits_rows(lab_model, monkeypatch):
    """`memaudit lab eval --split validation` reports each cross-attention layer's figures on the validation rows:
    with hand-made scores that rank the validation rows perfectly (AUROC 1) and the test rows backwards (AUROC 0),
    the per-layer figures of each split are those (figures of the layers over every row passed the suite, as only
    the scorers' figures were compared by split)."""
    import polars as pl

    import audit.lab.evaluate as lab_evaluate
    from audit.eval import metrics

    table = pl.DataFrame({"prompt": [f"p{i}" for i in range(8)],
                          "memorized": [True, True, False, False, True, False, False, False],
                          "split": ["validation"] * 4 + ["test"] * 4})
    v = np.array([0.9, 0.8, 0.1, 0.2, 0.1, 0.5, 0.6, 0.7])
    monkeypatch.setattr(lab_evaluate, "score_prompts", lambda model, prompts, noise_draws: lab_evaluate.LabScores(
        {"attention_entropy": v}, {"L": v}, {"L": np.full(8, 0.5)}))
    out = lab_evaluate.evaluate(lab_model, table, with_ci=False)
    y = table["memorized"].to_numpy()
    assert out["validation"]["layers"]["L"]["auroc"] == 1.0 == out["validation"]["scorers"]["attention_entropy"][
        "auroc"]
    assert out["test"]["layers"]["L"]["auroc"] == 0.0 == out["test"]["scorers"]["attention_entropy"]["auroc"]
    assert out["all"]["layers"]["L"] == metrics(y, v) and out["all"]["layers"]["L"]["auroc"] == 10.5 / 15


def test_a_scorer_breaking_its_contract_in_eval_is_said_as_it_is_not_as_a_scoring_failure(tiny_model, monkeypatch):
    """A ScorerError (a scorer whose compute broke its contract) raised while eval scores is raised as it is: it is
    not wrapped into "scorer ... raised while scoring", whose advice (`memaudit run` rejects the failing prompts)
    does not apply to a broken scorer (catching another class than MemauditError there passed the suite)."""
    import pytest

    import audit.scorers
    from audit.errors import ScorerError
    from audit.evaluate import evaluate

    def broken(self, prompts):
        raise ScorerError("toy scorer: compute returned 3 rows for 1 prompt")

    monkeypatch.setattr(audit.scorers.Scorer, "score", broken)
    with pytest.raises(ScorerError) as err:
        evaluate(["a cat", "a dog"], [True, False], tiny_model, n_boot=5)
    assert str(err.value) == "toy scorer: compute returned 3 rows for 1 prompt"
