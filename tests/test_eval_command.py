"""``memaudit eval`` and :func:`audit.evaluate.evaluate` against scikit-learn on a fixed toy table."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score, roc_curve
from typer.testing import CliRunner

from audit.cli import app
from audit.errors import RunError
from audit.evaluate import evaluate, forwards_per_prompt
from audit.scorers import SCORERS, ScoreConfig, Scorer

PROMPTS = ["a red cat", "a blue dog on a beach", "old city street at night", "portrait of a woman",
           "oil painting of a boat", "a green tree in the forest", "sunset over the lake", "a small house"]
LABELS = np.array([True, False, True, False, False, True, False, False])


def _toy_table(tmp_path, labels=LABELS, prompt_column="prompt"):
    path = tmp_path / "labelled.parquet"
    pq.write_table(pa.table({prompt_column: PROMPTS, "memorized": labels}), path)
    return path


def test_evaluate_matches_sklearn_on_a_toy_table(tiny_model):
    res = evaluate(PROMPTS, LABELS, tiny_model, ("attention_entropy", "noise_magnitude"), layers="all", n_boot=200,
                   batch_size=3)
    assert (res["n_memorized"], res["n_ordinary"]) == (3, 5)
    for name in ("attention_entropy", "noise_magnitude"):
        risk = Scorer(tiny_model, ScoreConfig(name, tuple(tiny_model.default_layers))).score(PROMPTS)["risk"]
        fig = res["scorers"][name]
        assert fig["auroc"] == pytest.approx(roc_auc_score(LABELS, risk), abs=1e-12)
        fpr, tpr, _ = roc_curve(LABELS, risk, drop_intermediate=False)
        assert fig["tpr_at_1pct_fpr"] == tpr[np.flatnonzero(fpr <= 0.01)[-1]]  # 5 negatives: only FPR 0 qualifies
        assert fig["tpr_at_3pct_fpr"] == tpr[np.flatnonzero(fpr <= 0.03)[-1]]
        fpr_kept, tpr_kept, _ = roc_curve(LABELS, risk)  # Ren's detect.py: the first kept point nearest 1%
        assert fig["tpr_at_1pct_fpr_nearest"] == tpr_kept[np.argmin(np.abs(fpr_kept - 0.01))]
        lo, hi = fig["auroc_ci"]
        assert 0.0 <= lo <= hi <= 1.0 and len(fig["tpr_at_1pct_fpr_ci"]) == 2
        assert fig["prompts_per_s"] > 0
    assert res["scorers"]["attention_entropy"]["forwards_per_prompt"] == 1.0
    assert res["scorers"]["noise_magnitude"]["forwards_per_prompt"] == 2.0
    layers = res["layers"]["attention_entropy"]
    assert len(layers) == 7
    for layer, fig in layers.items():  # each layer on its own = the scorer with that one layer
        risk = Scorer(tiny_model, ScoreConfig("attention_entropy", (layer,))).score(PROMPTS)["risk"]
        assert fig["auroc"] == pytest.approx(roc_auc_score(LABELS, risk), abs=1e-12)


def test_forwards_per_prompt_counts_sampling_steps():
    assert forwards_per_prompt(SCORERS["attention_entropy_late"], 1, 50) == 100
    assert forwards_per_prompt(SCORERS["attention_entropy_late"], 4, 5) == 40
    assert forwards_per_prompt(SCORERS["guidance_geometry"], 4) == 16


def test_evaluate_refuses_one_class_and_unknown_scorers(tiny_model):
    with pytest.raises(RunError, match="no memorized prompt"):
        evaluate(PROMPTS, np.zeros(8, bool), tiny_model)
    with pytest.raises(RunError, match="did you mean 'noise_magnitude'"):
        evaluate(PROMPTS, LABELS, tiny_model, ("noise_magnitud",))


def test_evaluate_checks_its_arguments_as_the_command_does(tiny_model):
    """From Python, evaluate() took None prompts to the tokenizer, batch_size=0 to range(), n_boot=0 to numpy, and
    counted a prompt labelled both ways in both classes; it now refuses or normalizes as `memaudit eval` does."""
    bad = [({"prompts": [None, *PROMPTS[1:]]}, "item 0 is NoneType, not text"),
           ({"batch_size": 0}, "must be at least 1"), ({"n_boot": 0}, "must be at least 1"),
           ({"noise_draws": 0}, "must be at least 1"), ({"num_inference_steps": 0}, "must be at least 1"),
           ({"noise_draws": 1025}, "--noise-draws 1025: give 1 to 1,024"),
           ({"seed": 1.5}, "seed must be an integer, not float"),
           ({"prompts": [*PROMPTS, PROMPTS[0]], "labels": [*LABELS, not LABELS[0]]}, "labelled both memorized and"),
           ({"labels": LABELS.astype(float)}, "labels are float64, not boolean"),
           ({"scorers": ""}, "give at least one scorer"),
           ({"prompts": [], "labels": np.array([], bool)}, "prompts: no rows"),
           ({"labels": LABELS[:, None]}, r"one boolean per prompt \(a 1-D array\), not an array of shape \(8, 1\)")]
    for kwargs, match in bad:
        args = {"prompts": PROMPTS, "labels": LABELS, "model": tiny_model, **kwargs}
        with pytest.raises(RunError, match=match):
            evaluate(**args)
    # a repeated prompt (after normalization) counts once; 0/1 labels; scorers as a comma list
    res = evaluate([*PROMPTS, f" {PROMPTS[0]} "], [*LABELS.astype(int), int(LABELS[0])], tiny_model,
                   "attention_entropy,noise_magnitude", n_boot=20)
    assert (res["n_memorized"], res["n_ordinary"]) == (3, 5) and list(res["scorers"]) == ["attention_entropy",
                                                                                         "noise_magnitude"]


def test_eval_command_json(tmp_path, tiny_model_dir):
    res = CliRunner().invoke(app, ["eval", str(_toy_table(tmp_path)), "--model", str(tiny_model_dir), "--scorers",
                                   "attention_entropy,guidance_geometry", "--json", "--device", "cpu",
                                   "--bootstrap", "50"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["n_memorized"], out["n_ordinary"]) == (3, 5)
    assert list(out["scorers"]) == ["attention_entropy", "guidance_geometry"]
    for fig in out["scorers"].values():
        assert {"auroc", "auroc_ci", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_ci", "forwards_per_prompt",
                "prompts_per_s"} <= set(fig)
    assert out["scorers"]["guidance_geometry"]["forwards_per_prompt"] == 4.0


@pytest.mark.parametrize("case, message", [
    ("no_positives", "no memorized prompt"),
    ("no_negatives", "no ordinary prompt"),
    ("int_labels", "is int64, not boolean (true/false, or integers 0/1); values seen: 0, 1, 3"),
    ("no_prompt_column", "no prompt column 'prompt'"),
    ("int_prompts", "prompt column 'prompt' is int64, not text"),
    ("blank_prompts", "2 row(s) with a null or empty prompt (row 1, 4)"),
    ("both_labels", "labelled both memorized and ordinary"),
])
def test_eval_command_bad_input_is_one_line_exit_2(tmp_path, tiny_model_dir, case, message):
    if case == "int_labels":
        path = tmp_path / "labelled.csv"
        path.write_text("prompt,memorized\n" + "".join(f"{p},{int(y) + 2 * (i == 0)}\n"  # a 2 among 0/1 labels
                                                        for i, (p, y) in enumerate(zip(PROMPTS, LABELS))))
    elif case in ("int_prompts", "blank_prompts", "both_labels"):
        prompts = {"int_prompts": list(range(8)),
                   "blank_prompts": [PROMPTS[0], None, *PROMPTS[2:4], " \u200b ", *PROMPTS[5:]],
                   "both_labels": [*PROMPTS[:7], PROMPTS[0] + " "]}[case]  # row 7: row 0's prompt (True), False
        path = tmp_path / "labelled.parquet"
        pq.write_table(pa.table({"prompt": prompts, "memorized": LABELS}), path)
    else:
        labels = {"no_positives": np.zeros(8, bool), "no_negatives": np.ones(8, bool)}.get(case, LABELS)
        path = _toy_table(tmp_path, labels, "text" if case == "no_prompt_column" else "prompt")
    res = CliRunner().invoke(app, ["eval", str(path), "--model", str(tiny_model_dir), "--device", "cpu"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.output


def test_zero_one_integer_labels_are_booleans(tmp_path):
    """A CSV's 1/0 labels read as integers: taken as true/false (they were refused as 'int64, not boolean')."""
    from audit.evaluate import labelled_rows

    table = pa.table({"prompt": PROMPTS, "memorized": pa.array([int(y) for y in LABELS], pa.int64())})
    prompts, labels = labelled_rows(table, tmp_path / "t.csv")
    assert prompts == PROMPTS and labels.dtype == bool and labels.tolist() == list(LABELS)


def test_layers_all_on_a_model_with_a_unet_attention_mask():
    """--layers all on the bundled lab model, which passes the tokenizer's attention mask to the UNet: each
    layer on its own equals the scorer with that one layer (it failed on the mask before)."""
    from pathlib import Path

    from audit.models import load_model

    lab = load_model(str(Path(__file__).resolve().parents[1] / "audit" / "lab" / "model"), "cpu", "float32")
    res = evaluate(PROMPTS, LABELS, lab, ("attention_entropy",), layers="all", n_boot=50, batch_size=4)
    layers = res["layers"]["attention_entropy"]
    assert len(layers) >= 2
    for layer, fig in layers.items():
        risk = Scorer(lab, ScoreConfig("attention_entropy", (layer,))).score(PROMPTS)["risk"]
        assert fig["auroc"] == pytest.approx(roc_auc_score(LABELS, risk), abs=1e-12)


def test_eval_counts_each_prompt_once_and_says_what_a_small_table_cannot_measure(tmp_path):
    import numpy as np
    import pyarrow as pa

    from audit.cli.eval import small_sample_warnings
    from audit.evaluate import labelled_rows

    table = pa.table({"prompt": ["a cat", "a dog", " a cat", "a bird"], "memorized": [True, False, True, False]})
    prompts, labels = labelled_rows(table, "t.parquet")
    assert prompts == ["a cat", "a dog", "a bird"] and labels.tolist() == [True, False, False]
    assert isinstance(labels, np.ndarray) and labels.dtype == bool
    assert small_sample_warnings(50, 500) == []
    w = small_sample_warnings(50, 40)  # 40 ordinary: 1% needs 100, 3% needs 34
    assert len(w) == 1 and w[0].startswith("40 ordinary prompts cannot measure TPR at 1% FPR") and "2.5%" in w[0]
    w = small_sample_warnings(3, 20)
    assert len(w) == 3 and "at least 34" in w[1] and w[2].startswith("3 memorized and 20 ordinary prompts")
    # FPR strictly below the target: with 100 ordinary prompts one false positive is 1.00%, so TPR at 1% is read at
    # FPR 0 as with 16 (no warning was printed at 100); 33 / 34 for 3%
    w = small_sample_warnings(50, 100)
    assert len(w) == 1 and "already 1% FPR, not below 1%; it needs at least 101" in w[0]
    assert small_sample_warnings(50, 101) == []
    assert len(small_sample_warnings(50, 33)) == 2 and len(small_sample_warnings(50, 34)) == 1


def test_a_dictionary_encoded_prompt_column_is_text(tmp_path):
    """pandas writes a `category` column dictionary-encoded: its prompts are text (it was refused as 'not text')."""
    from audit.evaluate import labelled_rows

    for values in (pa.array(PROMPTS), pa.array(PROMPTS, pa.large_string())):
        table = pa.table({"prompt": values.dictionary_encode(), "memorized": LABELS})
        prompts, labels = labelled_rows(table, tmp_path / "t.parquet")
        assert prompts == PROMPTS and labels.tolist() == list(LABELS)


def test_a_scorer_named_twice_is_scored_once(tiny_model, monkeypatch):
    import audit.scorers
    from audit.evaluate import evaluate

    built = []

    class Counting(audit.scorers.Scorer):
        def __init__(self, model, config, **kw):
            built.append(config.scorer)
            super().__init__(model, config, **kw)

    monkeypatch.setattr(audit.scorers, "Scorer", Counting)
    res = evaluate(PROMPTS, LABELS.astype(int), tiny_model, "attention_entropy,attention_entropy", n_boot=20)
    assert list(res["scorers"]) == ["attention_entropy"] and built == ["attention_entropy"]


def test_non_finite_scores_are_counted_and_never_a_detection(tmp_path, tiny_model, tiny_model_dir, monkeypatch):
    """NaN and +inf scores were ranked least risky with no count anywhere, and the scorer's own non-finite flag
    (what `memaudit run` rejects as nonfinite_attention) was ignored. They still count as least risky (a failed
    forward is no evidence), but a prompt flagged non-finite is one too, and every such prompt is counted (JSON and
    a warning)."""
    real = Scorer.score

    def broken(self, prompts, tokens=None):
        out = real(self, prompts, tokens)
        risk, flag = out["risk"].copy(), np.asarray(out["nonfinite"], bool).copy()
        for i, p in enumerate(prompts):
            if p == "a red cat":  # memorized: +inf, which the metrics must not read as the riskiest
                risk[i] = np.inf
            if p == "sunset over the lake":  # ordinary: a finite risk from a forward flagged non-finite
                flag[i], risk[i] = True, 1e9
        return dict(out, risk=risk, nonfinite=flag)

    monkeypatch.setattr(Scorer, "score", broken)
    res = evaluate(PROMPTS, LABELS, tiny_model, ("attention_entropy",), n_boot=50)
    fig = res["scorers"]["attention_entropy"]
    assert (fig["n_nonfinite"], fig["n_nonfinite_memorized"]) == (2, 1)
    risk = real(Scorer(tiny_model, ScoreConfig("attention_entropy", tuple(tiny_model.default_layers))),
                PROMPTS)["risk"].copy()
    risk[[0, 6]] = risk.min() - 1  # both least risky
    assert fig["auroc"] == pytest.approx(roc_auc_score(LABELS, risk), abs=1e-12)
    pq.write_table(pa.table({"prompt": PROMPTS + ["a red cat"], "memorized": list(LABELS) + [True]}),
                   tmp_path / "t.parquet")
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "t.parquet"), "--model", str(tiny_model_dir),
                                 "--bootstrap", "50"])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 0, r.output
    assert "memaudit: 9 rows, 8 distinct prompts after normalization (a prompt listed 1 more time(s) counts once)" in err
    assert ("memaudit: warning: attention_entropy: 2 prompt(s) (1 memorized) got a non-finite score, counted as "
            "least risky (never a detection)") in err


def test_per_layer_figures_count_non_finite_attention(tiny_model):
    """`--layers all`: a prompt whose attention in a layer is not finite gets a NaN entropy there (least risky, never
    a detection) and is counted in that layer's n_nonfinite, as the scorers' figures count theirs."""
    import torch

    from audit.capture import cross_attention_layers

    first = cross_attention_layers(tiny_model.unet)[0]
    to_k = tiny_model.unet.get_submodule(first).to_k.weight
    saved = to_k.detach().clone()
    try:
        with torch.no_grad():
            to_k[0, 0] = float("nan")  # NaN keys: this layer's attention probabilities are NaN for every prompt
        res = evaluate(PROMPTS, LABELS, tiny_model, ("attention_entropy",), layers="all", n_boot=20)
    finally:
        with torch.no_grad():
            to_k.copy_(saved)
    per_layer = res["layers"]["attention_entropy"]
    assert per_layer[first]["n_nonfinite"] == len(PROMPTS)
    assert all("n_nonfinite" in v for v in per_layer.values())


def test_eval_on_a_lab_model_that_fails_its_criteria_says_so(tiny_model_dir):
    """`lab eval` warned that the shipped lab model fails its acceptance criteria (no BOS sink); the README's
    `memaudit eval ... --model audit/lab/model` on the same model did not. Other models get no such line."""
    from audit.cli.eval import lab_criteria_note
    from audit.lab import LAB_MODEL_DIR

    assert lab_criteria_note(str(LAB_MODEL_DIR)).startswith(
        "this lab model fails its acceptance criteria bos_mass_gt_0_5_in_some_layer")
    assert lab_criteria_note(str(tiny_model_dir)) is None and lab_criteria_note("CompVis/stable-diffusion-v1-4") is None



def test_nonfinite_memorized_counts_only_memorized_prompts(tiny_model, monkeypatch):
    """Two memorized prompts and one ordinary prompt non-finite: (n_nonfinite, n_nonfinite_memorized) = (3, 2)."""
    real = Scorer.score

    def broken(self, prompts, tokens=None):
        out = real(self, prompts, tokens)
        risk = out["risk"].copy()
        for i, p in enumerate(prompts):
            if p in ("a red cat", "old city street at night", "portrait of a woman"):  # memorized, memorized, not
                risk[i] = np.nan
        return dict(out, risk=risk)

    monkeypatch.setattr(Scorer, "score", broken)
    fig = evaluate(PROMPTS, LABELS, tiny_model, ("attention_entropy",), n_boot=10)["scorers"]["attention_entropy"]
    assert (fig["n_nonfinite"], fig["n_nonfinite_memorized"]) == (3, 2)


def test_a_tsv_table_is_read_with_tabs(tmp_path):
    """read_table: "Parquet, or CSV/TSV/JSONL by suffix": a .tsv splits at tabs, so a prompt may hold commas."""
    from audit.evaluate import read_labelled

    path = tmp_path / "t.tsv"
    path.write_text("prompt\tmemorized\na red cat, on a mat\ttrue\nsunset, lake\tfalse\n")
    prompts, labels = read_labelled(path)
    assert prompts == ["a red cat, on a mat", "sunset, lake"] and labels.tolist() == [True, False]


def test_eval_options_need_one_of_each_and_each_scorers_fewest_steps():
    """As `memaudit run`: one step suffices but for guidance_geometry (3: it reads timesteps[-3]); eval refused
    --steps under 3 for every scorer."""
    from audit.evaluate import eval_options_problem

    assert eval_options_problem(1, 1, 1, 1) is None
    assert eval_options_problem(1, 1, 1, 1, 0, ["attention_entropy", "noise_magnitude"]) is None
    assert eval_options_problem(1, 3, 1, 1, 0, ["attention_entropy", "guidance_geometry"]) is None
    assert eval_options_problem(1, 2, 1, 1, 0, ["attention_entropy", "guidance_geometry"]) == (
        "--steps 2: guidance_geometry needs at least 3 scheduler steps (every prompt would fail to score)")
    for args, said in (((1, 0, 1, 1), "--steps 0 (num_inference_steps)"), ((0, 50, 1, 1), "--noise-draws 0 (noise_draws)"),
                       ((1, 50, 0, 1), "--batch-size 0 (batch_size)"), ((1, 50, 1, 0), "--bootstrap 0 (n_boot)")):
        assert eval_options_problem(*args) == f"{said}: must be at least 1", args  # the one given wrong (uhelp)
    assert "must be an integer" in eval_options_problem(1, 3.0, 1, 1)


def test_eval_at_one_step_scores_as_run_does_and_guidance_geometry_needs_three(tmp_path, tiny_model, tiny_model_dir):
    from sklearn.metrics import roc_auc_score

    res = CliRunner().invoke(app, ["eval", str(_toy_table(tmp_path)), "--model", str(tiny_model_dir), "--device",
                                   "cpu", "--steps", "1", "--bootstrap", "10", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    risk = Scorer(tiny_model, ScoreConfig("attention_entropy", tuple(tiny_model.default_layers),
                                          num_inference_steps=1)).score(PROMPTS)["risk"]
    assert got["num_inference_steps"] == 1
    assert got["scorers"]["attention_entropy"]["auroc"] == pytest.approx(roc_auc_score(LABELS, risk), abs=1e-12)
    bad = CliRunner().invoke(app, ["eval", str(_toy_table(tmp_path)), "--model", str(tmp_path / "no-model"),
                                   "--scorers", "attention_entropy,guidance_geometry", "--steps", "2"])
    assert bad.exit_code == 2 and bad.stderr.strip().splitlines() == [  # before the (missing) model is looked at
        "memaudit: error: --steps 2: guidance_geometry needs at least 3 scheduler steps (every prompt would fail to "
        "score)"], bad.output
    with pytest.raises(RunError, match="^--steps 2: guidance_geometry needs at least 3"):
        evaluate(PROMPTS, LABELS, tmp_path / "no-model", ("guidance_geometry",), num_inference_steps=2)


def test_eval_with_named_layers_scores_as_run_with_those_layers(tmp_path, tiny_model, tiny_model_dir):
    """A run scored with --layers A,B could not be evaluated on A,B: eval took only `all` or the defaults."""
    from audit.capture import cross_attention_layers

    names = cross_attention_layers(tiny_model.unet)
    chosen = [names[0], names[-1]]
    assert chosen != list(tiny_model.default_layers)
    res = CliRunner().invoke(app, ["eval", str(_toy_table(tmp_path)), "--model", str(tiny_model_dir), "--device",
                                   "cpu", "--layers", ",".join(chosen), "--scorers",
                                   "attention_entropy,noise_magnitude", "--bootstrap", "10", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["score_layers"] == chosen and got["score_layers_given"] is True and "layers" not in got
    for name in ("attention_entropy", "noise_magnitude"):
        risk = Scorer(tiny_model, ScoreConfig(name, tuple(chosen))).score(PROMPTS)["risk"]
        assert got["scorers"][name]["auroc"] == pytest.approx(roc_auc_score(LABELS, risk), abs=1e-12)
    text = CliRunner().invoke(app, ["eval", str(_toy_table(tmp_path)), "--model", str(tiny_model_dir), "--device",
                                    "cpu", "--layers", chosen[0], "--bootstrap", "10"])
    assert text.exit_code == 0 and f"; layers {chosen[0]}; 95% bootstrap CIs" in text.stdout.splitlines()[0]
    default = evaluate(PROMPTS, LABELS, tiny_model, n_boot=10)
    assert default["score_layers"] == list(tiny_model.default_layers) and default["score_layers_given"] is False
    bad = CliRunner().invoke(app, ["eval", str(_toy_table(tmp_path)), "--model", str(tiny_model_dir), "--device",
                                   "cpu", "--layers", "mid.attn2"])
    assert bad.exit_code == 2 and bad.stderr.strip().splitlines()[-1] == (
        "memaudit: error: --layers: not a cross-attention layer of this model: mid.attn2 (`memaudit layers --model M` "
        "lists them)"), bad.output


def test_lab_eval_of_a_model_with_two_default_layers_gives_the_scorers_own_figures(tmp_path, tiny_model_dir):
    """`lab eval --model M` replaced the attention_entropy scorer's figures with those of the model's FIRST default
    layer alone, so a model whose memaudit.json names two default layers showed a figure of neither its scorer nor
    its layers' mean. With two layers the scorer's own figures (the mean attention of both) are printed."""
    import shutil

    from audit.capture import cross_attention_layers
    from audit.eval import metrics
    from audit.lab.evaluate import NOISE_DRAWS
    from audit.models import load_model

    model_dir = tmp_path / "two"
    shutil.copytree(tiny_model_dir, model_dir)
    two = cross_attention_layers(load_model(str(tiny_model_dir), "cpu", "float32").unet)[:2]
    (model_dir / "memaudit.json").write_text(json.dumps({"default_layers": two}))
    model = load_model(str(model_dir), "cpu", "float32")
    assert model.default_layers == two
    both = Scorer(model, ScoreConfig("attention_entropy", tuple(two), NOISE_DRAWS, 0)).score(PROMPTS)["risk"]
    labels = both > np.median(both)  # the two layers' mean ranks perfectly; the first layer alone need not
    first = Scorer(model, ScoreConfig("attention_entropy", (two[0],), NOISE_DRAWS, 0)).score(PROMPTS)["risk"]
    assert metrics(labels, first)["auroc"] < 1.0
    table = tmp_path / "lab.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS, "memorized": labels, "split": ["test"] * len(PROMPTS)}), table)
    res = CliRunner().invoke(app, ["lab", "eval", "--model", str(model_dir), "--prompts", str(table), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout[res.stdout.index("{"):])
    assert payload["scorers"]["attention_entropy"]["auroc"] == 1.0
    assert payload["attention_entropy_per_layer"][two[0]]["auroc"] == metrics(labels, first)["auroc"]
