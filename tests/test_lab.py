"""The lab (v2): deterministic tokenizer and data, SD 1.x conventions of the shipped model, the criteria it
was accepted on, the metrics' conventions, and every scorer held to its measured figure.

CPU only. The evaluation of the shipped model scores a few hundred 16x16 prompts (about a minute on 2 shared
cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from audit.errors import RunError  # noqa: E402
from audit.lab import LAB_MODEL_DIR, LAB_PROMPTS  # noqa: E402
from audit.lab.data import DataConfig, planted, planted_step, render, sample_scenes, training_batch  # noqa: E402

META = json.loads((LAB_MODEL_DIR / "memaudit.json").read_text())


def test_tokenizer_is_the_same_in_two_processes():
    # issue 11: tokenizers' BpeTrainer broke ties by hash order, so each process got its own vocabulary
    code = ("import json; from audit.tokenizer import build_clip_tokenizer; from audit.lab.data import VOCAB; "
            "t = build_clip_tokenizer(VOCAB); from audit.tokenizer import learn_merges; "
            "print(json.dumps([sorted(t.get_vocab().items()), learn_merges(VOCAB)]))")
    outs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout)
    assert outs[0] == outs[1]
    vocab, merges = json.loads(outs[0])
    assert len(vocab) == 2 + 512 + len(merges) and len(merges) > 100


def test_every_lab_word_is_one_token_and_the_shipped_tokenizer_is_the_built_one():
    from transformers import CLIPTokenizer

    from audit.lab.data import VOCAB
    from audit.tokenizer import build_clip_tokenizer

    built = build_clip_tokenizer(VOCAB)
    assert all(len(built(w, add_special_tokens=False).input_ids) == 1 for w in VOCAB)
    shipped = CLIPTokenizer.from_pretrained(str(LAB_MODEL_DIR / "tokenizer"))
    assert shipped.get_vocab() == built.get_vocab()


def test_data_is_a_pure_function_of_the_seed():
    cfg = DataConfig()
    a_img, a_cap, a_idx = training_batch(cfg, 17)
    b_img, b_cap, b_idx = training_batch(cfg, 17)
    c_img, _, _ = training_batch(cfg, 18)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and np.array_equal(a_idx, b_idx)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (cfg.batch_size, 3, 16, 16) and a_img.dtype == np.float32
    assert a_img.min() >= -1 and a_img.max() <= 1
    assert (a_idx[: cfg.planted_per_batch] >= 0).all() and (a_idx[cfg.planted_per_batch:] == -1).all()
    scenes, caps = planted(cfg)
    flat = [c for cs in caps for c in cs]
    assert len(set(flat)) == len(flat) == int(cfg.n_captions().sum()) == 96
    assert [len(c) for c in caps] == cfg.n_captions().tolist()
    assert np.array_equal(render(scenes), render(planted(cfg)[0]))


def test_planted_kinds_and_levels():
    cfg = DataConfig()
    kinds = cfg.planted_kinds()
    assert kinds.count("fixed") == 4 * cfg.fixed_per_tier and kinds.count("varied") == 4 * cfg.varied_per_tier
    # a varied image is shown with several captions; a fixed one always with caption 0
    idx = np.concatenate([planted_step(cfg, s)[0] for s in range(400)])
    cap = np.concatenate([planted_step(cfg, s)[1] for s in range(400)])
    fixed = np.asarray([kinds[i] == "fixed" for i in idx])
    assert (cap[fixed] == 0).all() and len(np.unique(cap[~fixed])) == cfg.captions_per_varied
    # duplication levels follow the tier weights 1:2:4:8 (per image)
    per_tier = np.bincount(cfg.planted_tiers()[idx], minlength=4) / len(idx)
    assert np.allclose(per_tier / per_tier[0], [1, 2, 4, 8], rtol=0.25)


def test_render_draws_shapes_on_a_gradient():
    img = render(sample_scenes(np.random.default_rng(0), 8))
    assert img.shape == (8, 3, 16, 16)
    assert all(len(np.unique(im.reshape(3, -1).T, axis=0)) > 2 for im in img)


def test_adherence_probe_on_true_and_mismatched_images():
    from audit.lab.adherence import adheres, named_pairs, probe_references
    from audit.lab.data import fresh_pairs

    assert named_pairs("old cat with a red circle and a blue pillar, poster") == [(0, 0), (5, 6)]
    scenes, caps = fresh_pairs(DataConfig(), 300, 9)
    ref = probe_references(scenes, caps)
    # measured when the probe was fixed (300 captions of stream 9): ~0.87 on true images, ~0.19 on others
    assert ref["true_images"] > 0.8 and ref["other_images"] < 0.3
    flat = np.zeros((1, 3, 16, 16), np.float32)
    assert not adheres(flat, ["a red circle"]).any()


@pytest.fixture(scope="module")
def lab_table():
    import polars as pl

    return pl.read_parquet(LAB_PROMPTS)


def test_shipped_model_has_sd_conventions(lab_model):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from audit.capture import cross_attention_layers

    m = lab_model
    assert isinstance(m.unet, UNet2DConditionModel) and isinstance(m.text_encoder, CLIPTextModel)
    tok = m.tokenizer
    ids = tok("a red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and m.max_length == 77 and ids[0] == tok.bos_token_id
    n = len(tok("a red circle").input_ids)
    assert ids[n - 1] == tok.eos_token_id and all(i == tok.pad_token_id for i in ids[n:])
    assert tok.pad_token_id == tok.eos_token_id
    cfg = m.scheduler_config
    assert (cfg["prediction_type"], cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"],
            cfg["num_train_timesteps"], cfg["steps_offset"], cfg["timestep_spacing"]) == (
        "epsilon", "scaled_linear", 0.00085, 0.012, 1000, 1, "leading")
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(50)
    assert int(sched.timesteps[0]) == 981
    assert abs(float(sched.alphas_cumprod[981]) - 0.0058) < 2e-4
    assert m.default_layers and set(m.default_layers) <= set(cross_attention_layers(m.unet))
    size = sum(p.stat().st_size for p in LAB_MODEL_DIR.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    assert not list(LAB_MODEL_DIR.rglob("*.bin")) and len(list(LAB_MODEL_DIR.rglob("*.safetensors"))) == 2
    assert META["default_layers"] == m.default_layers


def test_declared_mask_is_the_training_mask(lab_model):
    import torch

    from audit.lab.train import MASK_DECLARATION, padding_mask
    from audit.models.base import declared_encoder_mask, tokenize

    tok = tokenize(lab_model.tokenizer, ["", "old cat with a red circle"], 77)
    ids = torch.from_numpy(tok.input_ids)
    declared = declared_encoder_mask(lab_model.extra, torch.from_numpy(tok.attention_mask))
    if META.get("mask_padding"):
        assert META["unet_encoder_attention_mask"] == MASK_DECLARATION
        assert torch.equal(declared, padding_mask(ids, lab_model.tokenizer.eos_token_id))
        assert declared.sum(1).tolist() == [1, 7]  # BOS alone; BOS + 6 prompt tokens
    else:
        assert declared is None


def test_criteria_were_recorded_and_met(lab_table):
    crit = META["criteria"]
    assert crit["schedule"]["first_timestep"] == 981 and crit["schedule"]["prediction_type"] == "epsilon"
    c = crit["counts"]
    assert c["memorized"] == int(lab_table["memorized"].sum()) and c["not_memorized"] == int((~lab_table["memorized"]).sum())
    assert c["memorized"] >= 40 and c["not_memorized"] >= 400
    for name in ("schedule_is_sd1x", "memorized_ge_40", "not_memorized_ge_400"):
        assert crit["checks"][name], name
    te = crit["text_encoder"]
    assert te["pad_cos_across_prompts"] < 0.5  # padding carries the prompt (random encoder: 0.92-0.98)
    layers = crit["attention_regime"]["layers"]
    for masses in layers.values():
        assert abs(sum(masses.values()) - 1) < 1e-6
        if META.get("mask_padding"):
            assert masses["eos"] == 0 and masses["pad"] == 0


def test_shipped_labels(lab_table):
    t = lab_table
    for col in ("prompt", "memorized", "similarity", "duplication", "image_duplication", "split", "kind"):
        assert col in t.columns
    assert set(t["split"].unique()) == {"validation", "test"}
    assert t["prompt"].n_unique() == len(t)
    _, caps = planted(DataConfig())
    held = set(t.filter(t["group"] == "heldout")["prompt"].to_list())
    assert not held & {c for cs in caps for c in cs}
    assert set(t.filter(t["group"] == "planted")["kind"].unique()) == {"fixed", "varied"}


def test_tpr_conventions_differ_where_they_should():
    from audit.eval import metrics, tpr_at_fpr

    # 10 positives, 100 negatives; ROC points (FPR, TPR): (0, .3), (.01, .3), (.01, .9), (.02, .9), (1, .9), (1, 1)
    y = np.array([1] * 10 + [0] * 100, bool)
    s = np.concatenate([[10, 10, 10] + [6.5] * 6 + [-2], [7, 6], np.full(98, -1.0)])
    assert tpr_at_fpr(y, s, 0.008, "last") == 0.3  # the last point with FPR below 0.8% is (0, .3)
    # Ren's code: FPR 1% is nearest, the first kept point there is (.01, .3); one that is not at a vertical step:
    assert tpr_at_fpr(y, s, 0.008, "nearest") == 0.3
    assert tpr_at_fpr(y, s, 0.018, "nearest") == 0.9  # (.02, .9) is nearest, beyond the target
    m = metrics(y, s)
    assert m["tpr_at_1pct_fpr"] == 0.3  # Wen's code: FPR strictly below 1%, so (.01, .9) does not count
    assert m["tpr_at_1pct_fpr_nearest"] == 0.3
    assert m["tpr_at_3pct_fpr"] == 0.9
    # AUROC by hand: 3 positives above all 100 negatives, 6 above 99 (below the 7), 1 below all
    assert abs(m["auroc"] - (3 * 100 + 6 * 99 + 0) / 1000) < 1e-12


def test_fast_bootstrap_figures_match_sklearn():
    from audit.eval import _fast_figures, bootstrap_ci, metrics

    rng = np.random.default_rng(3)
    for _ in range(10):
        y = rng.random(200) < 0.2
        s = np.round(rng.normal(size=200) + y, 1)  # ties on purpose
        assert np.allclose(list(metrics(y, s).values()), _fast_figures(y, s))
    ci = bootstrap_ci(y, s)
    assert ci == bootstrap_ci(y, s)  # fixed seed
    est = metrics(y, s)["auroc"]
    assert ci["auroc"][0] < est < ci["auroc"][1]


def test_examples_table_is_generated_from_the_lab():
    from pathlib import Path

    import polars as pl

    from audit.lab.examples import examples_table

    path = Path(__file__).resolve().parents[1] / "examples" / "prompts.parquet"
    shipped = pl.read_parquet(path)
    assert shipped.equals(examples_table())
    assert shipped["prompt_id"].n_unique() == len(shipped)


# the lab evaluation scores the lab's prompts with every scorer once for the module, in the setup of the first test
# that asks for it: 38 s alone on 2 cores, but past the suite's 240 s on a loaded machine (a full suite
# beside other jobs), so its tests get 900 s before pytest-timeout stops them (a timeout, not a timed assertion)
SLOW_EVALUATION = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def evaluation(lab_model, lab_table):
    from audit.lab.evaluate import evaluate

    return evaluate(lab_model, lab_table)


def _margin(measured: dict, key: str) -> float:
    """Allowed deviation of a re-evaluated figure: half the distance from the measured value to the lower end
    of its 95% bootstrap CI (re-scoring is deterministic up to float summation order, which can swap
    near-tied prompts; a figure moving by half its sampling uncertainty is a change, not noise)."""
    lo = measured[key + "_ci"][0]
    return max((measured[key] - lo) / 2, 1e-3)


@SLOW_EVALUATION
def test_scorers_reproduce_their_measured_figures(evaluation):
    measured = META["evaluation"]
    for split in ("validation", "test"):
        got = evaluation[split]
        assert got["n_memorized"] == measured[split]["n_memorized"]
        layer = META["default_layers"][0]
        scorers = dict(got["scorers"], attention_entropy=got["layers"][layer])
        for name, m in measured[split]["scorers"].items():
            for key in ("auroc", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_nearest"):
                assert abs(scorers[name][key] - m[key]) <= _margin(m, key), (split, name, key)
        for name, m in measured[split]["layers"].items():
            assert abs(got["layers"][name]["auroc"] - m["auroc"]) <= _margin(m, "auroc"), (split, name)


@SLOW_EVALUATION
def test_eval_json_has_the_issue_shape(evaluation):
    from audit.lab.cli import lab_payload

    p = lab_payload(evaluation, "all", META)
    assert p["n_memorized"] >= 40 and p["n_ordinary"] >= 400
    assert p["lab"]["prediction_type"] == "epsilon" and p["lab"]["first_timestep"] == 981
    assert p["lab"]["adherence"] == META["criteria"]["adherence"]["w7.5"]
    assert set(p["lab"]["bos_mass"]) == set(evaluation["all"]["layers"])
    for name in ("attention_entropy", "noise_magnitude"):
        fig = p["scorers"][name]
        for key in ("auroc", "auroc_ci", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_ci"):
            assert key in fig
        assert fig["auroc_ci"][0] <= fig["auroc"] <= fig["auroc_ci"][1]


@SLOW_EVALUATION
def test_figures_by_positive_group_partition_the_positives(evaluation, lab_table):
    from audit.eval import metrics

    res = evaluation["all"]
    groups = res["by_positive_group"]
    assert sum(g["n_memorized"] for g in groups.values()) == res["n_memorized"]
    y = lab_table["memorized"].to_numpy()
    group = lab_table["group"].to_numpy()
    s = evaluation["_scores"].scorers["noise_magnitude"]
    for g, r in groups.items():
        assert r["n_memorized"] == int((y & (group == g)).sum())
        keep = ~y | (group == g)  # this group's positives against every ordinary prompt
        assert r["scorers"]["noise_magnitude"]["auroc"] == metrics(y[keep], s[keep])["auroc"]


def test_prepare_run_builds_and_saves_the_tokenizer_once(tmp_path, monkeypatch):
    """A resumed run loads its saved tokenizer instead of building a new one (train.py's module docstring)."""
    import audit.lab.encoder as encoder
    import audit.tokenizer as tokenizer
    from audit.lab.train import prepare_run

    monkeypatch.setattr(encoder, "pretrain", lambda *a, **k: None)  # the encoder is not what is tested here
    built = []
    real = tokenizer.build_clip_tokenizer
    monkeypatch.setattr(tokenizer, "build_clip_tokenizer", lambda vocab: built.append(1) or real(vocab))
    prepare_run(tmp_path)
    saved = (tmp_path / "tokenizer" / "tokenizer.json").read_bytes()
    prepare_run(tmp_path)
    assert len(built) == 1
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == saved


def _run_from_the_shipped_model(tmp_path, step: int = 10):
    """A run folder holding the shipped lab model's tokenizer, frozen text encoder and UNet as a checkpoint at
    ``step`` (fresh optimizer state): what :func:`audit.lab.train.init_run` branches from."""
    import shutil

    import torch

    from audit.lab.train import build_components

    src = tmp_path / "src"
    shutil.copytree(LAB_MODEL_DIR / "tokenizer", src / "tokenizer")
    shutil.copytree(LAB_MODEL_DIR / "text_encoder", src / "text_encoder")
    (src / "text_encoder" / "pretrain.json").write_text("{}")
    _, _, unet = build_components(src)
    from safetensors.torch import load_file

    unet.load_state_dict(load_file(LAB_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors"))
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)  # as train() makes it
    state = {"unet": unet.state_dict(), "ema": {k: v.clone() for k, v in unet.state_dict().items()},
             "opt": opt.state_dict(), "step": step, "elapsed": 0.0, "data": {}, "mask_padding": True}
    torch.save(state, src / f"ckpt_{step:06d}.pt")
    return src / f"ckpt_{step:06d}.pt", unet.state_dict()


def test_training_filter_gives_flagged_samples_zero_loss_weight(tmp_path, monkeypatch):
    """The training-time mitigation arm (audit.lab.train --filter-layer): with every sample flagged, a step
    leaves the UNet exactly as it was (zero gradient, fresh AdamW moments); with none flagged, the step equals
    the unfiltered step; the threshold is the calibration captions' 99th percentile of E."""
    import torch

    import audit.lab.train as tr

    ckpt, before = _run_from_the_shipped_model(tmp_path)
    layer = json.loads((LAB_MODEL_DIR / "memaudit.json").read_text())["default_layers"]
    steps_run = {}
    for arm, thr in (("all_flagged", float("-inf")), ("none_flagged", float("inf")), ("off", None)):
        run = tmp_path / arm
        tr.init_run(run, ckpt)
        if thr is not None:
            monkeypatch.setattr(tr.TrainingFilter, "calibrate",
                                lambda self, unet, thr=thr: setattr(self.filter, "threshold", thr) or thr)
        tr.train(run, 11, mask_padding=True, filter_layers=layer if thr is not None else None, log=lambda m: None)
        state = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)
        assert state["step"] == 11 and state["filter_layers"] == (layer if thr is not None else None)
        steps_run[arm] = state["unet"]
        monkeypatch.undo()
    for k, v in before.items():
        assert torch.equal(steps_run["all_flagged"][k], v), k
    changed = [k for k, v in before.items() if not torch.equal(steps_run["off"][k], v)]
    assert len(changed) > 10
    for k in before:
        torch.testing.assert_close(steps_run["none_flagged"][k], steps_run["off"][k], rtol=1e-4, atol=1e-6)

    # the real calibration: the 99th percentile of E on the calibration captions, ~1% of them above it
    tok, te, unet = tr.build_components(ckpt.parent)
    unet.load_state_dict(before)
    filt = tr.TrainingFilter(tok, te, tr.DataConfig(), layer, mask_padding=True)
    thr = filt.calibrate(unet)
    e = filt.scores(unet, filt.cal_cond, filt.cal_mask, filt.cal_x0, filt.cal_noise)
    assert thr == float(torch.quantile(e, 0.99))
    assert 1 <= int((e > thr).sum()) <= 3
    # a resumed run with another filter setting is refused
    with pytest.raises(RunError, match="filter_layers"):
        tr.train(tmp_path / "all_flagged", 12, mask_padding=True, filter_layers=None, log=lambda m: None)


def test_sigterm_while_training_saves_the_finished_steps_and_raises(tmp_path, monkeypatch):
    """SIGTERM ended `lab build` with no message and lost up to 249 steps since the last checkpoint. Training now
    finishes the step it is in, saves, and raises Terminated (the CLI's "terminated; rerun ... to resume"); the
    resumed run continues from there, and train.log holds no step twice."""
    import signal

    import torch

    import audit.lab.train as tr
    from audit.faults import Terminated

    ckpt, _ = _run_from_the_shipped_model(tmp_path)  # at step 10
    run = tmp_path / "run"
    tr.init_run(run, ckpt)
    # 50: past the checkpoint; the last line cut by a kill while it was written
    (run / "train.log").write_text('{"step": 10, "loss": 1.0}\n{"step": 50, "loss": 0.5}\n{"step": 6')
    real, calls = tr.training_batch, []

    def batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # during step 11: it completes, then the loop stops
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(tr, "training_batch", batch)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        tr.train(run, 30, mask_padding=True, log=lambda m: None)
    assert signal.getsignal(signal.SIGTERM) is before
    assert torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)["step"] == 12
    assert [json.loads(x)["step"] for x in (run / "train.log").read_text().splitlines()] == [10]


def test_a_second_training_seed_changes_the_initialization_and_the_draws_not_the_data(tmp_path):
    """--training-seed K (issue 11's second seed): another UNet initialization; from the same checkpoint one
    step with K = 1 moves the weights elsewhere than K = 0 (other noise and timestep draws), K = 0 is the
    default; a run is not resumed with another seed; the exported memaudit.json records it; the caller's
    torch thread count is restored."""
    import torch

    import audit.lab.train as tr

    ckpt, before = _run_from_the_shipped_model(tmp_path)
    _, _, u0 = tr.build_components(ckpt.parent)
    _, _, u1 = tr.build_components(ckpt.parent, tr.MODEL_SEED + tr.TRAINING_SEED_STRIDE)
    w = "conv_in.weight"
    assert not torch.equal(u0.state_dict()[w], u1.state_dict()[w])
    got = {}
    for name, kw in (("default", {}), ("seed0", {"training_seed": 0}), ("seed1", {"training_seed": 1})):
        tr.init_run(tmp_path / name, ckpt)
        if kw.get("training_seed"):  # as if that run had reached step 10 itself (a run keeps its seed)
            state = torch.load(tmp_path / name / "ckpt.pt", map_location="cpu", weights_only=True)
            torch.save(state | {"training_seed": kw["training_seed"]}, tmp_path / name / "ckpt.pt")
        threads_before = torch.get_num_threads()
        tr.train(tmp_path / name, 11, mask_padding=True, log=lambda m: None, threads=threads_before + 1, **kw)
        assert torch.get_num_threads() == threads_before  # the caller's setting is restored
        state = torch.load(tmp_path / name / "ckpt.pt", map_location="cpu", weights_only=True)
        assert state["training_seed"] == kw.get("training_seed", 0)
        got[name] = state["unet"][w]
    assert torch.equal(got["default"], got["seed0"])
    assert not torch.equal(got["seed0"], got["seed1"]) and not torch.equal(got["seed1"], before[w])
    with pytest.raises(RunError, match="training_seed"):
        tr.train(tmp_path / "seed1", 12, mask_padding=True, log=lambda m: None, threads=1)
    out = tr.export(tmp_path / "seed1" / "ckpt.pt", tmp_path / "exported")
    assert json.loads((out / "memaudit.json").read_text())["training_seed"] == 1


def test_training_filter_with_wens_score_is_the_noise_prediction_difference(tmp_path):
    """The Wen arm (audit.lab.train --filter-score noise_magnitude): d = ||eps(x_t0, c) - eps(x_t0, "")||_2 with
    each branch's own encoder mask, computed here by hand from two UNet calls; the threshold is the
    calibration captions' 99th percentile of d and flags d >= it; a resume with another score is refused."""
    import torch

    import audit.lab.train as tr

    ckpt, before = _run_from_the_shipped_model(tmp_path)
    tok, te, unet = tr.build_components(ckpt.parent)
    unet.load_state_dict(before)
    filt = tr.TrainingFilter(tok, te, tr.DataConfig(), [], mask_padding=True, score="noise_magnitude")
    cond, mask = filt.cal_cond[:3], filt.cal_mask[:3]
    x0, noise = filt.cal_x0[:3], filt.cal_noise[:3]
    d = filt.scores(unet, cond, mask, x0, noise)
    empty, empty_mask = tr.encode(tok, te, [""])
    xt = filt.a0 * x0 + filt.s0 * noise
    t = torch.full((3,), tr.FILTER_T0, dtype=torch.long)
    with torch.no_grad():
        e_c = unet(xt, t, encoder_hidden_states=cond, encoder_attention_mask=mask).sample
        e_u = unet(xt, t, encoder_hidden_states=empty.expand(3, -1, -1),
                   encoder_attention_mask=empty_mask.expand(3, -1)).sample
    torch.testing.assert_close(d, (e_c - e_u).flatten(1).norm(dim=1).double(), rtol=1e-5, atol=1e-6)
    assert (d > 0).all()
    thr = filt.calibrate(unet)
    all_d = filt.scores(unet, filt.cal_cond, filt.cal_mask, filt.cal_x0, filt.cal_noise)
    assert thr == float(torch.quantile(all_d, 0.99)) and 1 <= int(filt.filter.flag(all_d).sum()) <= 3
    assert filt.describe()["score"] == "noise_magnitude"
    run = tmp_path / "wen"
    tr.init_run(run, ckpt)
    state = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)
    state["filter_score"] = "noise_magnitude"
    torch.save(state, run / "ckpt.pt")
    with pytest.raises(RunError, match="filter_score"):
        tr.train(run, state["step"] + 1, mask_padding=True, log=lambda m: None)


def test_replication_of_several_arms_in_one_pass_equals_each_arm_alone():
    """`memaudit lab mitigation` measures every arm's replication in one pass over the training set: the same
    flags as one pass per arm (small training set: 3 steps), with both outcomes present."""
    from audit.lab.groundtruth import nearest
    from audit.lab.mitigation import replicated, replicated_arms

    config = DataConfig()
    p_scenes, _ = planted(config)
    own = render(p_scenes)[:6]  # planted images themselves: distance 0
    fresh = render(sample_scenes(np.random.default_rng(7), 12))
    arms = [np.stack([own[:3], fresh[:3]], axis=1), np.stack([fresh[3:7], fresh[7:11]], axis=1),
            np.stack([own[3:6], own[3:6]], axis=1)]  # [P, S=2, 3, 16, 16]
    d, _ = nearest(fresh, config, 3)
    tau = float(np.median(d))
    together = replicated_arms(arms, config, 3, tau)
    alone = [replicated(a, config, 3, tau) for a in arms]
    assert [r.tolist() for r in together] == [r.tolist() for r in alone]
    assert alone[2].all() and not alone[1].all()  # planted images replicate; half the fresh ones are above tau


def test_lab_mitigation_command(tmp_path, monkeypatch):
    """`memaudit lab mitigation --json` on the shipped lab (1 memorized + 1 ordinary prompt, 2 seeds, 2 steps):
    the issue's JSON shape; on this masked model the summary mask is a no-op, so c1 = 1 reproduces the baseline
    generations up to float32 softmax rounding while c1 = 1.5 moves them; the training figures of a build read
    back its own criteria (planted prompts per tier sum to the criteria's). One untimed warm-up sample comes
    first (the baseline arm, timed first, paid the warm-up: time_ratio read 0.085 with --limit 3)."""
    from typer.testing import CliRunner

    import audit.lab.mitigation as lab_mitigation
    from audit.cli import app

    calls, real = [], lab_mitigation.sample_arm
    monkeypatch.setattr(lab_mitigation, "sample_arm", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))

    res = CliRunner().invoke(app, ["lab", "mitigation", "--limit", "1", "--seeds", "2", "--steps", "2",
                                   "--c1", "1", "--c1", "1.5", "--training-on",
                                   str(LAB_MODEL_DIR / "memaudit.json"), "--json"])
    assert res.exit_code == 0, res.output
    # the warm-up, then memorized and ordinary for the baseline, each c1 and detect, and the validation threshold
    assert calls == [1] + [1, 1] * 3 + [1] + [1, 1]
    out = json.loads(res.stdout[res.stdout.index("{"):])
    inf = out["inference"]
    assert {"baseline", "c1"} <= set(inf)
    assert set(inf["c1"]) == {"1", "1.5"}
    assert inf["c1"]["1"]["distance_to_baseline"] < 1e-4
    assert inf["c1"]["1.5"]["distance_to_baseline"] > 1e-2
    for arm in [inf["baseline"], *inf["c1"].values(), out["detect"]]:
        assert arm["replication_rate"] in (0.0, 1.0) and 0.0 <= arm["adherence"] <= 1.0
    assert out["lab"]["n_memorized"] == 1 and out["lab"]["n_ordinary"] == 1
    # detection in the lab model's own default layer (the mid block's), not the 4th attn2 layer in call order
    assert out["detect"]["layers"] == META["default_layers"] == ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert "note" not in out["detect"]  # the test split: the threshold never saw these prompts
    tr = out["training"]
    assert tr["off"] == tr["on"]
    planted = [r for r in META["criteria"]["replication"] if r["group"] == "planted"]
    assert tr["off"]["planted_prompts"] == sum(r["n_prompts"] for r in planted)
    assert tr["off"]["memorized_planted"] == sum(r["n_memorized"] for r in planted)
    assert tr["off"]["adherence"] == META["criteria"]["adherence"]["w7.5"]

    bad = CliRunner().invoke(app, ["lab", "mitigation", "--c1", "0"])
    assert bad.exit_code == 2 and "c1" in bad.output
    one = CliRunner().invoke(app, ["lab", "mitigation", "--seeds", "1"])  # replication needs 2 of N seeds
    assert one.exit_code == 2 and "--seeds" in one.output


def test_docs_hold_the_shipped_models_measured_figures():
    """docs/lab.md's "Measured figures" section is exactly the rendering of the shipped model's memaudit.json
    (`python -m audit.lab.docs`), so every figure there is the measured one."""
    from pathlib import Path

    from audit.lab.docs import measured_figures

    doc = (Path(__file__).resolve().parents[1] / "docs" / "lab.md").read_text()
    section = measured_figures(META)
    assert section in doc
    assert f"{META['criteria']['adherence']['w7.5']:.3f}" in section


def test_lab_commands_bound_their_counts_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from audit.cli import app

    for args in (["--limit", "0"], ["--limit", "-1"], ["--seeds", "0"], ["--steps", "1"]):
        res = CliRunner().invoke(app, ["lab", "mitigation", *args])
        assert res.exit_code == 2 and "Invalid value" in res.output, (args, res.output)
    res = CliRunner().invoke(app, ["lab", "build", "--out", str(tmp_path / "lb"), "--steps", "-5"])
    assert res.exit_code == 2 and not (tmp_path / "lb").exists()


def test_lab_mitigation_refuses_bad_options_before_sampling(tmp_path, monkeypatch, tiny_model_dir):
    """`--c1 1000` failed with exit 1 after the baseline arm was sampled; `--guidance nan` exited 0 with NaN
    images counted as never replicated (every arm 0.0: a broken run read as perfect mitigation) and bare NaN in
    the JSON; a bad `--training-on` file failed after the whole measurement (about 20 minutes) with "error:
    replication"; a model that is not a lab exited 1 without the one-line error. Now each exits 2 first."""
    from typer.testing import CliRunner

    import audit.lab.mitigation as lab_mitigation
    from audit.cli import app

    sampled = []
    monkeypatch.setattr(lab_mitigation, "sample_arm", lambda *a, **k: sampled.append(1) / 0)
    (tmp_path / "bad.json").write_text('{"criteria": {"counts": {}}}')
    for args, said in ((["--c1", "1000"], "at most 100"), (["--c1", "inf"], "at most 100"),
                       (["--guidance", "nan"], "finite number >= 0"), (["--guidance", "-5"], "finite number >= 0"),
                       (["--training-on", str(tmp_path / "bad.json")], "not a lab build"),
                       (["--model", str(tiny_model_dir)], "not a memaudit lab model")):
        res = CliRunner().invoke(app, ["lab", "mitigation", "--limit", "1", "--seeds", "2", "--steps", "2", *args])
        assert res.exit_code == 2 and said in " ".join(res.output.replace("│", " ").split()), (args, res.output)
    assert sampled == []
    with pytest.raises(ValueError, match="finite number"):
        lab_mitigation.measure(str(LAB_MODEL_DIR), str(LAB_MODEL_DIR.parent / "prompts.parquet"), guidance=float("nan"))


def test_lab_tables_are_checked_before_the_model_loads(tmp_path, lab_table):
    """`lab eval` and `lab mitigation` name a bad labelled table in one line (exit 2) instead of a polars
    error after loading the model: no split column, an unknown split, a split without memorized prompts, a
    file that is not Parquet; `--split bogus` is a usage error. `--split all` selects every row (it used
    to select the rows whose split is "all": none)."""
    import polars as pl
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.lab.evaluate import read_lab_table, split_rows

    cases = {
        "nosplit.parquet": (lab_table.drop("split"), "no split column"),
        "train.parquet": (lab_table.with_columns(split=pl.lit("train")), "split column holds 'train'"),
        "nopos.parquet": (lab_table.filter(~((pl.col("split") == "test") & pl.col("memorized"))),
                          "split test: no memorized prompt"),
        "nolabel.parquet": (lab_table.drop("memorized"), "no label column 'memorized'"),
    }
    for name, (df, message) in cases.items():
        df.write_parquet(tmp_path / name)
        for command in (["lab", "eval"], ["lab", "mitigation", "--limit", "1"]):
            if name == "nosplit.parquet" and command[1] == "mitigation":
                continue  # mitigation takes a table without splits as one split
            res = CliRunner().invoke(app, [*command, "--prompts", str(tmp_path / name)])
            assert res.exit_code == 2 and message in res.output, (name, command, res.output)
            assert "using the bundled lab model" not in res.output
    (tmp_path / "bad.parquet").write_text("not parquet")
    res = CliRunner().invoke(app, ["lab", "eval", "--prompts", str(tmp_path / "bad.parquet")])
    assert res.exit_code == 2 and "bad.parquet: cannot read" in res.output
    res = CliRunner().invoke(app, ["lab", "eval", "--split", "bogus"])
    assert res.exit_code == 2 and "choose validation, test or all" in res.output

    table = read_lab_table(LAB_PROMPTS, "all")
    assert table.height == lab_table.height and table["prompt"].to_list() == lab_table["prompt"].to_list()
    assert split_rows(table, "all").height == table.height
    assert split_rows(table, "test").height == (lab_table["split"] == "test").sum()
    assert split_rows(table.drop("split"), "test").height == table.height
    # 0/1 integer labels (the reader accepts them) are the checked booleans: the raw column, used as a mask by lab
    # eval, printed "-44 ordinary" and NaN group figures; a repeated prompt was an IndexError (exit 1)
    as_int = lab_table.with_columns(pl.col("memorized").cast(pl.Int64))
    as_int.write_parquet(tmp_path / "int.parquet")
    table = read_lab_table(tmp_path / "int.parquet", "all")
    assert table["memorized"].dtype == pl.Boolean
    assert table["memorized"].to_list() == lab_table["memorized"].to_list()
    pl.concat([lab_table, lab_table.head(1)]).write_parquet(tmp_path / "dup.parquet")
    res = CliRunner().invoke(app, ["lab", "eval", "--prompts", str(tmp_path / "dup.parquet")])
    assert res.exit_code == 2 and "is listed 2 times; a lab table has one row per prompt (1 repeated row(s))" in \
        " ".join(res.output.split()), res.output


def test_lab_build_refuses_what_it_cannot_finish_before_training(tmp_path):
    """`lab build --steps 300` pretrained the encoder and trained the UNet (about 15 min here), then crashed in the
    ground truth (480 distinct steps are drawn); a --training-seed of 2e10 overflowed a 64-bit seed after the
    encoder's pretraining; an --out that is a file was a FileExistsError: each exited 1. Now exit 2 at once."""
    from typer.testing import CliRunner

    from audit.cli import app

    (tmp_path / "f").write_text("")
    cases = [(["--out", str(tmp_path / "a"), "--steps", "479"], "--steps 479: a lab build needs at least 480"),
             (["--out", str(tmp_path / "b"), "--training-seed", "20000000000"],
              "--training-seed 20000000000: give 0 to 1,000,000,000"),
             (["--out", str(tmp_path / "f"), "--steps", "500"], "a file is there; give a folder")]
    for args, message in cases:
        res = CliRunner().invoke(app, ["lab", "build", *args])
        assert res.exit_code == 2 and message in " ".join(res.output.split()), (args, res.output)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_no_layer_is_chosen_from_a_validation_split_without_both_classes():
    """A 500-step build with 0 memorized prompts wrote a default layer "chosen on validation" from all-NaN AUROCs
    (max() returned the first layer) and said nothing."""
    from audit.lab.evaluate import criteria_note
    from audit.lab.evaluate import choose_layer

    nan = float("nan")
    result = {"validation": {"n_memorized": 3, "n_ordinary": 9,
                             "layers": {"a": {"auroc": 0.4}, "b": {"auroc": 0.7}, "c": {"auroc": nan}}}}
    assert choose_layer(result) == "b"
    result["validation"]["n_memorized"] = 0
    assert choose_layer(result) is None
    result["validation"].update(n_memorized=3, layers={"a": {"auroc": nan}})
    assert choose_layer(result) is None
    assert criteria_note({"schedule_is_sd1x": True, "memorized_ge_40": True}) is None
    note = criteria_note({"bos_mass_gt_0_5_in_some_layer": False, "memorized_ge_40": True})
    assert note.startswith("this lab model fails its acceptance criteria bos_mass_gt_0_5_in_some_layer: it is not "
                           "an accepted instrument for attention-based claims")


def test_lab_eval_warns_about_small_splits_and_failed_criteria(tmp_path, lab_table):
    """`lab eval` printed TPR at 1% FPR from 20 ordinary prompts with no word, and attention tables of a model that
    fails its acceptance criteria (the shipped one: no BOS sink) with only the mask note. The warnings go to stderr,
    so `--json` stays one JSON object on stdout."""
    import polars as pl
    from typer.testing import CliRunner

    from audit.cli import app

    test = lab_table.filter(pl.col("split") == "test")
    small = pl.concat([test.filter(pl.col("memorized")).head(3), test.filter(~pl.col("memorized")).head(3)])
    small.write_parquet(tmp_path / "small.parquet")
    res = CliRunner().invoke(app, ["lab", "eval", "--prompts", str(tmp_path / "small.parquet"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["n_memorized"], out["n_ordinary"]) == (3, 3)
    err = " ".join(res.stderr.split())
    assert "memaudit: warning: 3 ordinary prompts cannot measure TPR at 1% FPR" in err
    assert "memaudit: warning: this lab model fails its acceptance criteria bos_mass_gt_0_5_in_some_layer" in err
    # the text table marks both TPRs read at FPR 0 (3 ordinary prompts: fewer than 101 for 1%, 34 for 3%)
    from audit.cli.eval import UNMEASURABLE_NOTE

    res = CliRunner().invoke(app, ["lab", "eval", "--prompts", str(tmp_path / "small.parquet")],
                             env={"COLUMNS": "200"})  # the table (conftest's 80 columns print a block a layer)
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("attention_entropy @ ")]
    assert rows and all(r[-3].endswith("†") and r[-1].endswith("†") for r in rows), res.stdout
    assert UNMEASURABLE_NOTE in res.stdout.splitlines()


def test_a_run_on_the_bundled_lab_model_says_what_its_ranking_is_worth(tmp_path):
    """No --model: the one line naming the lab model also says it is a demonstration model and gives the attention
    entropy's test AUROC on its own lab, read from its memaudit.json (0.48: at chance), so a first ranking is not
    read as a finding."""
    import json

    from typer.testing import CliRunner

    from audit.cli import app
    from audit.lab import LAB_MODEL_DIR

    auroc = json.loads((LAB_MODEL_DIR / "memaudit.json").read_text())["evaluation"]["test"]["scorers"][
        "attention_entropy"]["auroc"]
    assert round(auroc, 2) == 0.48
    (tmp_path / "p.txt").write_text("a red cat\n")
    res = CliRunner().invoke(app, ["run", str(tmp_path / "p.txt"), "--out", str(tmp_path / "r"), "--device", "cpu",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if "no --model given" in ln)
    assert "a demonstration model trained on synthetic scenes (attention_entropy test AUROC 0.48 on its own lab" in line
    assert line.endswith("pass --model for yours")
