"""Lab figures by positive group, the criteria note, and `memaudit lab mitigation`'s arithmetic (replication
rule, distance, training figures, detection threshold and counts, time ratio, per-row prompt lengths), on
hand-made inputs with the sampling replaced. CPU only, a few seconds."""

from __future__ import annotations

import types

import numpy as np


def test_by_positive_group_keeps_every_negative_and_one_groups_positives():
    from audit.lab.evaluate import by_positive_group

    y_all = np.array([True, True, True, False, False, False, True, False])
    group_all = np.array(["planted", "planted", "heldout", "planted", "heldout", "heldout", "planted", "planted"])
    rows = np.array([True] * 6 + [False, False])  # the split: the first six rows
    score = {"s": np.arange(8, dtype=float)}
    seen = []

    def fig(y, s):
        seen.append((y.tolist(), s.tolist()))
        return {"n": len(y)}

    out = by_positive_group(y_all[rows], group_all[rows], score, rows, fig)
    assert out == {"heldout": {"n_memorized": 1, "scorers": {"s": {"n": 4}}},
                   "planted": {"n_memorized": 2, "scorers": {"s": {"n": 5}}}}
    assert seen == [([True, False, False, False], [2.0, 3.0, 4.0, 5.0]),
                    ([True, True, False, False, False], [0.0, 1.0, 3.0, 4.0, 5.0])]


def test_criteria_note_narrows_to_attention_claims_only_when_bos_is_the_one_failure():
    from audit.lab.evaluate import criteria_note

    both = criteria_note({"bos_mass_gt_0_5_in_some_layer": False, "memorized_ge_40": False, "schedule_is_sd1x": True})
    assert both.startswith("this lab model fails its acceptance criteria bos_mass_gt_0_5_in_some_layer, "
                           "memorized_ge_40: it is not an accepted instrument; its figures are findings")
    assert "attention-based" not in both


def test_replicated_needs_two_seeds_strictly_below_tau(monkeypatch):
    import audit.lab.groundtruth as gt
    from audit.lab.data import DataConfig
    from audit.lab.mitigation import replicated

    d = np.array([[0.1, 0.9, 0.9, 0.9], [0.1, 0.2, 0.9, 0.9], [0.5, 0.5, 0.1, 0.9]])
    monkeypatch.setattr(gt, "nearest", lambda q, config, steps: (d.reshape(-1), np.zeros(d.size, np.int64)))
    images = np.zeros((3, 4, 3, 16, 16), np.float32)
    assert replicated(images, DataConfig(), 10, 0.5).tolist() == [False, True, False]


def test_distance_to_baseline_is_relative_to_the_baseline_contrast():
    from audit.lab.mitigation import distance_to

    rng = np.random.default_rng(0)
    ref = rng.uniform(-1, 1, size=(2, 3, 3, 16, 16)).astype(np.float32)
    centred = ref - ref.mean(axis=(3, 4), keepdims=True)
    images = ref + 0.5 * centred + 0.2  # the centred difference is half the reference's own centred image
    assert abs(distance_to(images, ref) - 0.5) < 1e-5
    assert distance_to(ref + 0.3, ref) < 1e-5  # a colour offset costs nothing


def test_training_figures_weigh_each_kind_by_its_prompts_and_skip_ordinary_groups():
    from audit.lab.mitigation import training_figures

    def doc(n_mem_fixed):
        return {"criteria": {
            "replication": [
                {"group": "heldout", "tier": -1, "kind": "", "n_prompts": 240, "n_memorized": 41,
                 "caption_duplication_mean": 0.0, "nearest_is_own": 0},
                {"group": "planted", "tier": 0, "kind": "fixed", "n_prompts": 8, "n_memorized": n_mem_fixed,
                 "caption_duplication_mean": 1327.0, "nearest_is_own": 6},
                {"group": "planted", "tier": 0, "kind": "varied", "n_prompts": 16, "n_memorized": 4,
                 "caption_duplication_mean": 336.0, "nearest_is_own": 3},
                {"group": "planted", "tier": 1, "kind": "fixed", "n_prompts": 8, "n_memorized": 8,
                 "caption_duplication_mean": 2665.0, "nearest_is_own": 8}],
            "adherence": {"w7.5": 0.76, "w1": 0.37}, "counts": {"memorized": 159, "not_memorized": 417}}}

    out = training_figures(doc(7), doc(5))
    off = out["off"]
    assert off["planted_prompts"] == 32 and off["memorized_planted"] == 19 and off["memorized_all"] == 159
    assert off["replication_rate"] == 19 / 32 and off["adherence"] == 0.76
    t0 = off["by_tier"]["0"]
    assert (t0["n_prompts"], t0["n_memorized"], t0["nearest_is_own"]) == (24, 11, 9)
    assert abs(t0["caption_duplication_mean"] - (8 * 1327 + 16 * 336) / 24) < 1e-9  # 666.33, per prompt
    assert t0["replication_rate"] == 11 / 24
    assert out["on"]["memorized_planted"] == 17


def test_lab_mitigation_threshold_counts_and_time_ratio(tmp_path, monkeypatch):
    """measure() with the sampler replaced: the detect threshold is the (1 - fpr) quantile of the entropies of the
    VALIDATION split's ORDINARY prompts; false flags count the ordinary prompts' images; time_ratio is
    seconds(c1 = 1.25) / seconds(baseline)."""
    import polars as pl

    import audit.lab.mitigation as lm
    from audit.lab.data import DataConfig

    pl.DataFrame({"row": [0, 1, 2, 3, 4, 5],
                  "prompt": ["m test", "o test one", "o test two", "v ord one", "v ord two", "v mem"],
                  "memorized": [True, False, False, False, False, True],
                  "split": ["test", "test", "test", "validation", "validation", "validation"]}).write_parquet(
        tmp_path / "t.parquet")
    entropy = {"m test": [5, 6], "o test one": [1, 1], "o test two": [2, 2], "v ord one": [1, 2], "v ord two": [3, 4],
               "v mem": [10, 20]}
    flags = {"m test": [True, True], "o test one": [False, True], "o test two": [False, False],
             "v ord one": [False, False], "v ord two": [False, True], "v mem": [True, True]}
    clock, calls = [0.0], []
    advance = {2: 1.0, 3: 1.0, 4: 3.0, 5: 3.0}  # baseline 2 s, c1 = 1.25 6 s (call 1 is the warm-up)

    def sample_arm(model, prompts, noise_ids, guidance, seeds, steps, chunk, arm=None):
        calls.append(list(prompts))
        clock[0] += advance.get(len(calls), 0.0)
        e = np.array([entropy[p] for p in prompts], float)
        return (np.zeros((len(prompts), seeds, 3, 16, 16), np.float32),
                (e, np.full_like(e, 0.1), np.array([flags[p] for p in prompts])))

    model = types.SimpleNamespace(default_layers=["L"], fingerprint="fp",
                                  scheduler_config={"num_train_timesteps": 1000})
    monkeypatch.setattr(lm, "_lab", lambda d: (model, DataConfig(), 10, 0.5))
    monkeypatch.setattr(lm, "sample_arm", sample_arm)
    monkeypatch.setattr(lm, "replicated_arms", lambda arms, config, steps, tau: [np.ones(len(a), bool) for a in arms])
    monkeypatch.setattr(lm, "adherence", lambda images, prompts: 0.5)
    monkeypatch.setattr(lm, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    res = lm.measure("lab", str(tmp_path / "t.parquet"), c1s=(1.25,), split="test", fpr=0.25, seeds=2, steps=2,
                     log=lambda m: None)
    assert calls[5] == ["v ord one", "v ord two"]  # the calibration prompts
    det = res["detect"]
    assert det["threshold"] == 3.25  # 75th percentile of 1, 2, 3, 4
    assert det["calibration_prompts"] == 2 and det["fpr_target"] == 0.25
    assert det["false_flags_ordinary"] == 1 and det["ordinary_images"] == 4 and det["flagged_memorized"] == 1.0
    assert "note" not in det
    inf = res["inference"]
    assert inf["time_ratio"] == 3.0
    assert inf["baseline"]["entropy"] == {"memorized": 5.5, "ordinary": 1.5}
    assert inf["baseline"]["replication_rate"] == 1.0 and inf["c1"]["1.25"]["distance_to_baseline"] == 0.0


def test_sample_arm_declares_each_rows_prompt_length_in_generation_order(monkeypatch):
    """generate() lays out rows prompt-major ([P*S]: prompt 0's seeds, then prompt 1's): the lengths given to
    set_prompts must follow that order."""
    import torch

    import audit.lab.groundtruth as gt
    import audit.mitigation.inference as inference
    from audit.lab.mitigation import sample_arm

    lengths = {"a red circle": 5, "old cat with a red circle and a blue ring": 11}
    monkeypatch.setattr(inference, "prompt_lengths", lambda tok, part: torch.tensor([lengths[p] for p in part]))
    monkeypatch.setattr(gt, "generate", lambda model, part, w, seeds, **kw: np.zeros((len(part), seeds, 3, 16, 16)))
    declared = []

    class Arm:
        entropy = None

        def __init__(self, view):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def set_prompts(self, n, lens):
            declared.append((n, lens.tolist()))

    model = types.SimpleNamespace(unet=None, tokenizer=None)
    images, det = sample_arm(model, list(lengths), [0, 1], 7.5, 3, 2, 8, Arm)
    assert images.shape == (2, 3, 3, 16, 16) and det is None
    assert declared == [(6, [5, 5, 5, 11, 11, 11])]


def test_per_layer_entropy_averages_the_draws_as_the_scorer_and_bos_mass_is_position_0(lab_model):
    """The per-layer attention entropy of the default layer is the attention_entropy scorer's (same latents, the
    draws' attention averaged before the entropy); on the masked lab model the empty prompt can attend to BOS alone,
    so its BOS mass is exactly 1 in every layer."""
    from audit.lab.evaluate import score_prompts

    prompts = ["", "old cat with a red circle and a blue ring", "harbor with a green square, poster"]
    s = score_prompts(lab_model, prompts, noise_draws=2)
    layer = lab_model.default_layers[0]
    np.testing.assert_allclose(s.layers[layer], s.scorers["attention_entropy"], rtol=1e-5, atol=1e-6)
    for name, bos in s.bos_mass.items():
        assert abs(bos[0] - 1.0) < 1e-6, name
        assert (bos[1:] < 1.0).all() and (bos[1:] >= 0).all(), name


def test_lab_evaluate_counts_each_split_on_its_own(lab_model):
    import polars as pl

    from audit.lab.evaluate import evaluate

    table = pl.DataFrame({
        "prompt": ["a red circle", "a blue ring", "old cat with a red circle", "harbor with a green square",
                   "poster with a black pillar", "fox with a white stripe", "quiet lake with a pink diamond",
                   "tiny owl with a cyan triangle"],
        "memorized": [True, True, False, False, True, False, False, False],
        "split": ["validation"] * 4 + ["test"] * 4,
        "group": ["planted", "heldout", "heldout", "seen_once", "planted", "heldout", "heldout", "seen_once"]})
    out = evaluate(lab_model, table, noise_draws=1, with_ci=False)
    assert [(out[s]["n_memorized"], out[s]["n_ordinary"]) for s in ("validation", "test", "all")] == [
        (2, 2), (1, 3), (3, 5)]
    assert out["test"]["by_positive_group"]["planted"]["n_memorized"] == 1


# ---------------------------------------------------------------- `memaudit lab mitigation` options
def _invoke(monkeypatch, args):
    from typer.testing import CliRunner

    import audit.lab.cli as lab_cli
    from audit.cli import app

    got = []
    monkeypatch.setattr(lab_cli, "_mitigation", lambda *a: got.append(a))
    res = CliRunner().invoke(app, ["lab", "mitigation", *args])
    return res, got


def test_lab_mitigation_defaults_and_guidance_zero(monkeypatch):
    """Without --c1 the arms are c1 = 1.1, 1.25 and 1.5 (the help's default; 1.25 gives time_ratio); guidance 0 is a
    finite number >= 0 (the unconditional model) and is accepted."""
    res, got = _invoke(monkeypatch, [])
    assert res.exit_code == 0, res.output
    (model, prompts, c1s, split, guidance, limit, seeds, steps, training_on, as_json), = got
    assert c1s == (1.1, 1.25, 1.5) and split == "test" and guidance == 7.5
    res, got = _invoke(monkeypatch, ["--guidance", "0"])
    assert res.exit_code == 0, res.output
    assert got[0][4] == 0.0
    res, got = _invoke(monkeypatch, ["--guidance", "-0.5"])
    assert res.exit_code == 2 and got == []
