"""The lab's training loops (audit/lab/train.py ``train``/``export``, audit/lab/encoder.py ``pretrain``) pinned on
a few steps of a tiny data configuration (batch 4): the gradient of each step is recomputed here from the published
objective (Ho et al. 2020 eq. 14 on SD 1.x's scaled-linear schedule; the encoder's recipe "E"), the AdamW step,
learning-rate warmup and EMA from their formulas, and resuming, logging, checkpoint copies, the time budget, export
and the command line from their docstrings. The lab model's shipped tokenizer and text encoder stand in for a
pretrained run (no pretraining), so each test runs in a few seconds on a CPU."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import types

import numpy as np
import pytest
import torch

from audit.errors import RunError
from audit.lab import LAB_MODEL_DIR
from audit.lab.data import DataConfig, training_batch

# 4 images a step (2 planted, 2 ordinary); 4 planted images (a fixed and a varied one at each of 2 levels). With
# this seed, step 0 shows the varied image 1 with its SECOND caption and the varied image 3, and drops the
# caption of row 2 for guidance: every branch of the batch assembly is exercised.
TINY = DataConfig(seed=10, tier_weights=(1, 2), fixed_per_tier=1, varied_per_tier=1, captions_per_varied=2,
                  batch_size=4, planted_per_batch=2, cfg_drop=0.3)
LR, WARMUP, EMA_MAX = 1e-3, 200, 0.998  # docs/lab.md, train.py's module docstring
QUIET = {"log": lambda m: None}


def _alphas_bar() -> np.ndarray:
    """SD 1.x's alpha_bar: betas linear in sqrt between 0.00085 and 0.012 over 1000 steps (float64)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    return np.cumprod(1 - betas)


def _new_run(path):
    """A run folder with the shipped tokenizer and frozen encoder standing in for a pretrained one."""
    shutil.copytree(LAB_MODEL_DIR / "tokenizer", path / "tokenizer")
    shutil.copytree(LAB_MODEL_DIR / "text_encoder", path / "text_encoder")
    (path / "text_encoder" / "pretrain.json").write_text("{}")
    return path


def _recording_adamw(monkeypatch):
    """Replace ``torch.optim.AdamW`` by a subclass that records, at each ``step()``: lr, weight decay, the
    parameters before and after, and their gradients (as the loop leaves them: clipped)."""
    records = []

    class Recorder(torch.optim.AdamW):
        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            rec = {"lr": self.param_groups[0]["lr"], "wd": self.param_groups[0]["weight_decay"],
                   "before": [p.detach().clone() for p in params],
                   "grad": [p.grad.detach().clone() for p in params]}
            out = super().step(closure)
            rec["after"] = [p.detach().clone() for p in params]
            records.append(rec)
            return out

    monkeypatch.setattr(torch.optim, "AdamW", Recorder)
    return records


def _clipped(grads):
    """``clip_grad_norm_(.., 1.0)``: scaled by min(1, 1 / (total L2 norm + 1e-6))."""
    total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    return [g * min(1.0, 1.0 / (total + 1e-6)) for g in grads]


def _first_adam_step(p, g, lr):
    """AdamW's first step from fresh moments, no weight decay: p - lr * g / (|g| + 1e-8)."""
    return p - lr * g / (g.abs() + 1e-8)


class _Hand:
    """The lab UNet's objective recomputed here: the batch of step s (data.training_batch), its captions encoded
    one batch at a time by the frozen encoder ("" where dropped), the mask BOS + prompt tokens, noise and
    timesteps from ``Generator(seed * 7919 + s + K * 10**9)`` (noise first), x_t = sqrt(ab) x0 + sqrt(1 - ab) eps,
    and mean((unet(x_t, t, c) - eps)^2)."""

    def __init__(self, run, data=TINY):
        from audit.lab.train import build_components

        self.tok, self.te, self.unet = build_components(run)
        self.data, self.ab = data, torch.from_numpy(_alphas_bar())
        self.params = [p for p in self.unet.parameters()]

    def batch(self, step, training_seed=0):
        images, caps, _ = training_batch(self.data, step)
        ids = self.tok(caps, padding="max_length", max_length=77, truncation=True).input_ids
        with torch.no_grad():
            cond = self.te(torch.tensor(ids))[0]
        first = [row.index(self.tok.eos_token_id) for row in ids]
        mask = torch.tensor([[1 if p < f else 0 for p in range(77)] for f in first])
        g = torch.Generator().manual_seed(self.data.seed * 7919 + step + training_seed * 10**9)
        noise = torch.randn(images.shape, generator=g)
        t = torch.randint(0, 1000, (len(images),), generator=g)
        ab = self.ab[t].view(-1, 1, 1, 1)
        xt = (ab.sqrt() * torch.from_numpy(images).double() + (1 - ab).sqrt() * noise.double()).float()
        return xt, t, cond, mask, noise

    def loss(self, weights, step, mask_padding, keep=None, grad=False, training_seed=0):
        """The step's loss (and the clipped gradient when ``grad``) at parameter values ``weights``."""
        with torch.no_grad():
            for p, w in zip(self.params, weights):
                p.copy_(w)
        xt, t, cond, mask, noise = self.batch(step, training_seed)
        with torch.set_grad_enabled(grad):
            pred = self.unet(xt, t, encoder_hidden_states=cond,
                             encoder_attention_mask=mask if mask_padding else None).sample
            per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
            loss = per.mean() if keep is None else per[keep].mean()
        if not grad:
            return float(loss)
        self.unet.zero_grad(set_to_none=True)
        loss.backward()
        return float(loss.detach()), _clipped([p.grad.clone() for p in self.params])


def _close(got, want, what, rtol=1e-4):
    scale = max(float(b.detach().abs().max()) for b in want) + 1e-12  # one scale: some gradients are 0 up to rounding
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}[{i}]: {m}")


def _ckpt(run):
    return torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)


def _at_step(run, step, ema_scale=None):
    """Rewrite ``run``'s checkpoint as if it had reached ``step`` (fresh optimizer moments); the EMA is kept, or
    set to ``ema_scale`` x the UNet's weights."""
    from audit.lab.train import build_components

    state = _ckpt(run)
    _, _, unet = build_components(run)
    state["opt"] = torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=0.0).state_dict()
    state["step"] = step
    if ema_scale is not None:
        state["ema"] = {k: v * ema_scale for k, v in state["unet"].items()}
    torch.save(state, run / "ckpt.pt")
    return state


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """A masked run trained one step from scratch on TINY (copied by the tests that go on from it)."""
    import audit.lab.train as tr

    run = _new_run(tmp_path_factory.mktemp("one") / "run")
    tr.train(run, 1, TINY, mask_padding=True, **QUIET)
    return run


def _copy(run, dest):
    shutil.copytree(run, dest)
    return dest


# ---------------------------------------------------------------- train: the objective and the update
@pytest.mark.parametrize("mask_padding", [True, False])
def test_a_step_is_the_published_objective_with_adamw_warmup_clipping_and_ema(tmp_path, monkeypatch, mask_padding):
    """Step 0 from scratch: the gradient is that of mean((unet(x_t, t, c) - eps)^2) recomputed here (the masked
    variant passes the BOS + prompt-token mask, the faithful one none), clipped to norm 1; lr = 1e-3 * 1/200
    (warmup); no weight decay; the weights move by AdamW's first step; the EMA is decay * init + (1 - decay) * new
    with decay = min(0.998, 1/10); the checkpoint records the step, the variant and the data."""
    import audit.lab.train as tr

    run = _new_run(tmp_path / "run")
    rec = _recording_adamw(monkeypatch)
    tr.train(run, 1, TINY, mask_padding=mask_padding, **QUIET)
    assert len(rec) == 1
    hand = _Hand(run)
    init = [p.detach().clone() for p in hand.params]  # the seeded, untrained UNet
    _close(rec[0]["before"], init, "init", rtol=0)
    _, grads = hand.loss(init, 0, mask_padding, grad=True)
    _close(rec[0]["grad"], grads, "grad")
    assert rec[0]["lr"] == pytest.approx(LR / WARMUP, rel=1e-12) and rec[0]["wd"] == 0
    state = _ckpt(run)
    names = [n for n, _ in hand.unet.named_parameters()]
    new = [_first_adam_step(p, g, LR / WARMUP) for p, g in zip(init, rec[0]["grad"])]
    d = min(EMA_MAX, 1 / 10)
    ema = [d * p0 + (1 - d) * p1 for p0, p1 in zip(init, new)]
    for n, p1, e in zip(names, new, ema):  # the steps are ~5e-6: compared to float32 rounding of |w| < 2
        torch.testing.assert_close(state["unet"][n], p1, rtol=0, atol=2.5e-7)
        torch.testing.assert_close(state["ema"][n], e, rtol=0, atol=2.5e-7)
    assert state["step"] == 1 and state["mask_padding"] is mask_padding and state["training_seed"] == 0
    assert state["filter_layers"] is None and state["filter_score"] is None
    assert state["data"] == TINY.__dict__ and state["elapsed"] >= 0


def test_resuming_gives_the_bit_identical_run(tmp_path):
    """Steps 0-2 in one go and steps 0, then 1-2 after a resume: the same UNet, EMA, optimizer state and step,
    bit for bit (the batch of step s is a pure function of (seed, s))."""
    import audit.lab.train as tr

    a, b = _new_run(tmp_path / "a"), _new_run(tmp_path / "b")
    tr.train(a, 3, TINY, mask_padding=True, **QUIET)
    tr.train(b, 1, TINY, mask_padding=True, **QUIET)
    tr.train(b, 3, TINY, mask_padding=True, **QUIET)
    sa, sb = _ckpt(a), _ckpt(b)
    assert sa["step"] == sb["step"] == 3
    for part in ("unet", "ema"):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), (part, k)
    oa, ob = sa["opt"]["state"], sb["opt"]["state"]
    assert oa.keys() == ob.keys() and len(oa) > 0
    for i in oa:
        for k in oa[i]:
            assert torch.equal(oa[i][k], ob[i][k]), (i, k)
    assert not any(torch.equal(sa["ema"][k], sa["unet"][k]) for k in sa["unet"] if k.endswith("weight"))


def test_warmup_and_ema_decay_at_chosen_steps(tmp_path, monkeypatch, one_step_run):
    """lr(s) = 1e-3 * min(1, (s + 1) / 200) and decay(s) = min(0.998, (1 + s) / (10 + s)), read at steps 98-100,
    198-200 and 5000 (each from a checkpoint made to stand at that step with fresh AdamW moments: the first
    moved step is then AdamW's first step)."""
    import audit.lab.train as tr

    rec = _recording_adamw(monkeypatch)
    for start, stop in ((98, 101), (198, 201), (5000, 5001)):
        run = _copy(one_step_run, tmp_path / f"r{start}")
        state = _at_step(run, start, ema_scale=0.5)
        rec.clear()
        tr.train(run, stop, TINY, mask_padding=True, **QUIET)
        assert [r["lr"] for r in rec] == pytest.approx([LR * min(1, (s + 1) / WARMUP) for s in range(start, stop)],
                                                       rel=1e-12)
        # the first step's update and the EMA after it
        d = min(EMA_MAX, (1 + start) / (10 + start))
        names = list(state["unet"])  # parameters only: the UNet has no buffers
        p1 = [_first_adam_step(p, g, rec[0]["lr"]) for p, g in zip(rec[0]["before"], rec[0]["grad"])]
        _close(rec[0]["after"], p1, f"step {start}", rtol=1e-5)
        if stop == start + 1:
            ema = _ckpt(run)["ema"]
            _close([ema[n] for n in names], [d * state["ema"][n] + (1 - d) * p for n, p in zip(names, p1)],
                   f"ema at {start}", rtol=1e-5)


def test_later_steps_of_a_second_training_seed_draw_their_own_noise_and_drop_planted_captions(tmp_path, monkeypatch):
    """Training seed 1, steps 0-2: the gradients of steps 1 and 2 are their own (noise and timesteps from
    ``Generator(seed * 7919 + s + 10**9)``, gradients zeroed between steps) at the weights the step before left;
    step 2 drops a PLANTED caption (row 1), which is conditioned on the empty prompt."""
    import audit.lab.train as tr

    run = _new_run(tmp_path / "run")
    rec = _recording_adamw(monkeypatch)
    tr.train(run, 3, TINY, mask_padding=True, training_seed=1, **QUIET)
    assert training_batch(TINY, 2)[1][1] == ""
    hand = _Hand(run)
    for s in (1, 2):
        _close(rec[s]["before"], rec[s - 1]["after"], "weights", rtol=0)
        _, grads = hand.loss(rec[s]["before"], s, True, grad=True, training_seed=1)
        _close(rec[s]["grad"], grads, f"grad step {s}")


# ---------------------------------------------------------------- train: log, checkpoints, time
def test_a_numbered_copy_is_kept_every_500_steps(tmp_path, one_step_run):
    import audit.lab.train as tr

    run = _copy(one_step_run, tmp_path / "run")
    _at_step(run, 499)
    tr.train(run, 501, TINY, mask_padding=True, **QUIET)
    assert sorted(p.name for p in run.glob("ckpt*")) == ["ckpt.pt", "ckpt_000500.pt"]
    copy = torch.load(run / "ckpt_000500.pt", map_location="cpu", weights_only=True)
    assert copy["step"] == 500 and _ckpt(run)["step"] == 501


def test_max_minutes_stops_between_steps_and_elapsed_adds_up_across_resumes(tmp_path, monkeypatch):
    """--max-minutes 1 with 25 s a step: the check before each step stops it after 3 steps (75 s > 60 s); the
    resumed run adds its own time to the checkpoint's elapsed."""
    import audit.lab.train as tr

    clock = [5000.0]
    monkeypatch.setattr(tr, "time", types.SimpleNamespace(time=lambda: clock[0]))
    real_batch = tr.training_batch

    def batch(*a, **k):
        clock[0] += 25.0
        return real_batch(*a, **k)

    monkeypatch.setattr(tr, "training_batch", batch)
    run = _new_run(tmp_path / "run")
    tr.train(run, 10, TINY, mask_padding=True, max_minutes=1, **QUIET)
    assert (_ckpt(run)["step"], _ckpt(run)["elapsed"]) == (3, 75.0)
    tr.train(run, 4, TINY, mask_padding=True, **QUIET)
    assert (_ckpt(run)["step"], _ckpt(run)["elapsed"]) == (4, 100.0)


def test_a_checkpoint_is_never_trained_backwards_nor_resumed_as_the_other_variant(tmp_path, one_step_run):
    import audit.lab.train as tr

    run = _copy(one_step_run, tmp_path / "run")
    before = _ckpt(run)
    said = []
    tr.train(run, 0, TINY, mask_padding=True, log=said.append)
    after = _ckpt(run)
    assert after["step"] == 1 and all(torch.equal(after["unet"][k], v) for k, v in before["unet"].items())
    assert any("--steps 0 is below the checkpoint's step 1" in m for m in said)
    said.clear()
    tr.train(run, 1, TINY, mask_padding=True, log=said.append)
    assert not any("below" in m for m in said)
    with pytest.raises(RunError, match="mask_padding=True"):
        tr.train(run, 2, TINY, mask_padding=False, **QUIET)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_a_signal_finishes_the_step_saves_and_raises(tmp_path, monkeypatch, one_step_run, sig):
    """SIGINT raises KeyboardInterrupt after the step, saved; SIGHUP (a closed terminal, which ended `lab build`
    mid-step with no message, the steps since the last checkpoint lost) stops as SIGTERM does, raising
    Terminated(SIGHUP) (exit 129). The handler in place before is put back."""
    import audit.lab.train as tr
    from audit.faults import Terminated

    run = _copy(one_step_run, tmp_path / "run")
    real_batch, calls = tr.training_batch, []

    def batch(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), sig)
        return real_batch(*a, **k)

    monkeypatch.setattr(tr, "training_batch", batch)
    # SIGHUP as from a terminal (under nohup, which the tests may run under, it is ignored and not trapped)
    before = signal.signal(sig, signal.SIG_DFL) if sig == signal.SIGHUP else signal.getsignal(sig)
    try:
        with pytest.raises(KeyboardInterrupt) as stopped:
            tr.train(run, 5, TINY, mask_padding=True, **QUIET)
        assert signal.getsignal(sig) is (signal.SIG_DFL if sig == signal.SIGHUP else before)
    finally:
        signal.signal(sig, before)
    if sig == signal.SIGINT:
        assert type(stopped.value) is KeyboardInterrupt  # Terminated (a subclass) is SIGTERM's and SIGHUP's
    else:
        assert isinstance(stopped.value, Terminated)
        assert (stopped.value.signame, stopped.value.exit_code) == ("SIGHUP", 129)
    assert _ckpt(run)["step"] == 2 and len(calls) == 1

def test_log_lines_saves_and_the_training_filter_over_a_resumed_stretch(tmp_path, monkeypatch, one_step_run):
    """Resumed at step 249 (600 s already trained; the clock advances 6 s per batch) with the training-time filter
    on and its decision fixed (rows 0, 1 (planted) and 3 (ordinary) flagged each step): the threshold is calibrated
    at the first step and again at step 250; train.log gets a line at 250 and one at 300, each with the mean loss of
    the steps since the line before (a step's loss: its kept row's alone), the minutes trained in total, the
    threshold and the samples dropped since the line before (2 / 1, then 100 / 50); the checkpoint is saved every
    ``ckpt_every`` = 25 steps and at the end, records the filter setting and the elapsed time; no numbered copy
    before step 500."""
    import audit.lab.train as tr

    layer = json.loads((LAB_MODEL_DIR / "memaudit.json").read_text())["default_layers"]
    run = _copy(one_step_run, tmp_path / "run")
    state = _at_step(run, 249)
    state["elapsed"] = 600.0
    torch.save(state, run / "ckpt.pt")
    keep = torch.tensor([False, False, True, False])
    clock, calibrated, batches, saved = [1000.0], [], [], []
    real_batch, real_save = tr.training_batch, torch.save

    def batch(data, step, *a):
        clock[0] += 6.0
        batches.append(step)
        return real_batch(data, step, *a)

    monkeypatch.setattr(tr, "time", types.SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(tr, "training_batch", batch)
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: saved.append(obj["step"]) or real_save(obj, f, *a, **k))
    monkeypatch.setattr(tr.TrainingFilter, "calibrate",
                        lambda self, unet: calibrated.append(batches[-1]) or setattr(self.filter, "threshold", 1.0))
    monkeypatch.setattr(tr.TrainingFilter, "keep", lambda self, *a: (keep, None))
    rec = _recording_adamw(monkeypatch)
    tr.train(run, 300, TINY, mask_padding=True, filter_layers=layer, ckpt_every=25, **QUIET)
    monkeypatch.undo()
    assert calibrated == [249, 250] and batches == list(range(249, 300))
    assert saved == [250, 275, 300, 300]
    assert sorted(p.name for p in run.glob("ckpt*")) == ["ckpt.pt"]
    state = _ckpt(run)
    assert (state["step"], state["elapsed"], state["filter_layers"], state["filter_score"]) == (
        300, pytest.approx(600 + 51 * 6), layer, "attention_entropy")
    lines = [json.loads(x) for x in (run / "train.log").read_text().splitlines()]
    assert [(x["step"], x["dropped_planted"], x["dropped_ordinary"], x["threshold"]) for x in lines] == [
        (250, 2, 1, 1.0), (300, 100, 50, 1.0)]
    assert lines[0]["minutes"] == pytest.approx((600 + 6) / 60)
    assert lines[1]["minutes"] == pytest.approx((600 + 51 * 6) / 60)
    hand = _Hand(run)
    losses = [hand.loss(r["before"], s, True, keep=keep) for s, r in zip(range(249, 300), rec)]
    assert lines[0]["loss"] == pytest.approx(losses[0], rel=1e-4)
    assert lines[1]["loss"] == pytest.approx(np.mean(losses[1:]), rel=1e-4)


def test_training_filter_scores_at_t0_with_the_mask_of_the_masked_variant(one_step_run):
    """E of a sample is the attention entropy of x_t0 = sqrt(ab_981) x0 + sqrt(1 - ab_981) eps at t0 = 981, with
    the encoder mask when the variant masks; a sample stays when E is below the threshold."""
    import audit.lab.train as tr
    from audit.mitigation.training import MemorizationFilter

    layer = json.loads((LAB_MODEL_DIR / "memaudit.json").read_text())["default_layers"]
    tok, te, unet = tr.build_components(one_step_run)
    unet.load_state_dict(_ckpt(one_step_run)["unet"])
    filt = tr.TrainingFilter(tok, te, TINY, layer, mask_padding=True)
    ab = _alphas_bar()[981]
    assert (filt.a0, filt.s0) == (pytest.approx(ab ** 0.5, rel=1e-6), pytest.approx((1 - ab) ** 0.5, rel=1e-6))
    cond, mask, x0, noise = filt.cal_cond[:3], filt.cal_mask[:3], filt.cal_x0[:3], filt.cal_noise[:3]
    xt = (ab ** 0.5 * x0.double() + (1 - ab) ** 0.5 * noise.double()).float()
    want = MemorizationFilter(float("inf"), layers=layer).attention_entropy(unet, cond, xt, torch.full((3,), 981),
                                                                              mask)
    torch.testing.assert_close(filt.scores(unet, cond, mask, x0, noise), want, rtol=1e-5, atol=1e-6)
    low = want.sort().values
    filt.filter.threshold = thr = float(low[:2].mean())  # between the two lowest E: flagged, E above it
    kept, _ = filt.keep(unet, cond, mask, x0, noise)
    assert kept.tolist() == [bool(e < thr) for e in want] and sum(kept.tolist()) == 1


# ---------------------------------------------------------------- build, init, log trimming, export, CLI
def test_prepare_run_pretrains_the_encoder_into_the_run(tmp_path, monkeypatch):
    """prepare_run hands the run's saved tokenizer, ``RUN/text_encoder`` and the data design to pretrain."""
    import audit.lab.encoder as encoder
    from audit.lab.train import prepare_run

    calls = []
    monkeypatch.setattr(encoder, "pretrain", lambda tok, out, data, log: calls.append((type(tok).__name__, out, data)))
    assert prepare_run(tmp_path / "run", TINY, **QUIET) == tmp_path / "run"
    assert calls == [("CLIPTokenizer", tmp_path / "run" / "text_encoder", TINY)]


def test_the_unet_architecture_is_the_shipped_models(tmp_path):
    """docs/lab.md: the shipped model is this code's; its UNet config and build_components' agree."""
    from audit.lab.train import build_components

    shipped = json.loads((LAB_MODEL_DIR / "unet" / "config.json").read_text())
    _, _, unet = build_components(_new_run(tmp_path / "run"))
    keys = ("sample_size", "in_channels", "out_channels", "layers_per_block", "block_out_channels",
            "norm_num_groups", "cross_attention_dim", "attention_head_dim", "down_block_types", "up_block_types")
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in unet.config.items() if k in keys} == {
        k: shipped[k] for k in keys}


def test_init_run_leaves_a_run_with_a_checkpoint_alone(tmp_path, one_step_run):
    import audit.lab.train as tr

    run = _copy(one_step_run, tmp_path / "run")
    mine = (run / "ckpt.pt").read_bytes()
    other = _copy(one_step_run, tmp_path / "other")
    _at_step(other, 7)
    tr.init_run(run, other / "ckpt.pt")
    assert (run / "ckpt.pt").read_bytes() == mine
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        tr.init_run(tmp_path / "new", tmp_path / "missing.pt")


def test_trim_log_drops_lines_that_are_not_json_objects(tmp_path):
    from audit.lab.train import _trim_log

    log = tmp_path / "train.log"
    log.write_text('{"step": 50}\n[1, 2]\n7\n{"step": 100}\n{"step": 150}\n')
    _trim_log(log, 100)
    assert log.read_text() == '{"step": 50}\n{"step": 100}\n'


def test_export_writes_the_ema_or_the_raw_weights_and_the_run_record(tmp_path, one_step_run):
    """export: safetensors in diffusers layout; the EMA weights by default, the raw UNet with use_ema=False;
    memaudit.json has the step, data, variant, its mask declaration, the layers and the extra keys; the scheduler
    is SD 1.x's DDIM (scaled-linear 0.00085-0.012, steps_offset 1, leading)."""
    from safetensors.torch import load_file

    import audit.lab.train as tr

    state = _ckpt(one_step_run)
    out = tr.export(one_step_run / "ckpt.pt", tmp_path / "ema", default_layers=["mid.attn2"], extra={"note": "x"})
    w = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(w[k], state["ema"][k]) for k in state["ema"])
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    meta = json.loads((out / "memaudit.json").read_text())
    assert (meta["train_steps"], meta["data"], meta["mask_padding"], meta["unet_encoder_attention_mask"],
            meta["default_layers"], meta["note"], meta["training_seed"]) == (
        1, json.loads(json.dumps(TINY.__dict__)), True, "bos_and_prompt_tokens", ["mid.attn2"], "x", 0)
    sch = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sch["_class_name"], sch["beta_schedule"], sch["beta_start"], sch["beta_end"], sch["num_train_timesteps"],
            sch["steps_offset"], sch["timestep_spacing"], sch["prediction_type"]) == (
        "DDIMScheduler", "scaled_linear", 0.00085, 0.012, 1000, 1, "leading", "epsilon")
    raw = tr.export(one_step_run / "ckpt.pt", tmp_path / "raw", use_ema=False)
    w = load_file(raw / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(w[k], state["unet"][k]) for k in state["unet"])
    state["mask_padding"] = False
    torch.save(state, tmp_path / "faithful.pt")
    shutil.copytree(one_step_run / "tokenizer", tmp_path / "tokenizer")
    shutil.copytree(one_step_run / "text_encoder", tmp_path / "text_encoder")
    meta = json.loads((tr.export(tmp_path / "faithful.pt", tmp_path / "f") / "memaudit.json").read_text())
    assert meta["mask_padding"] is False and "unet_encoder_attention_mask" not in meta and "default_layers" not in meta


def test_the_command_line_passes_its_options(monkeypatch, tmp_path):
    import audit.lab.train as tr

    calls = []
    monkeypatch.setattr(tr, "init_run", lambda *a: calls.append(("init", a)))
    monkeypatch.setattr(tr, "train", lambda *a, **k: calls.append(("train", a, k)))
    tr.main(["--run-dir", "R", "--init-from", "X/ckpt_001000.pt", "--filter-layer", "L1", "--filter-layer", "L2",
             "--mask-padding", "--training-seed", "3", "--threads", "2"])
    assert calls == [("init", ("R", "X/ckpt_001000.pt")),
                     ("train", ("R", 15000), {"ckpt_every": 250, "max_minutes": None, "threads": 2,
                                              "mask_padding": True, "filter_layers": ["L1", "L2"],
                                              "filter_score": "attention_entropy", "training_seed": 3})]


# ---------------------------------------------------------------- encoder pretraining
def _hand_encoder_grads(tok, before, config, step):
    """Recipe "E" (encoder.py's module docstring) at parameter values ``before`` (the text encoder's, the image
    tower's, the bag-of-words head's, the projection's, then log(temperature)): its loss and clipped gradients."""
    from audit.lab.encoder import _ImageEncoder, encoder_batch, new_text_encoder

    te, img = new_text_encoder(tok), _ImageEncoder()
    bow, proj = torch.nn.Linear(64, len(tok)), torch.nn.Linear(64, 64, bias=False)
    ls = torch.nn.Parameter(torch.zeros(()))
    params = [*te.parameters(), *img.parameters(), *bow.parameters(), *proj.parameters(), ls]
    with torch.no_grad():
        for p, w in zip(params, before):
            p.copy_(w)
    images, caps = encoder_batch(config, step)
    rows = tok(caps, padding="max_length", max_length=77, truncation=True).input_ids
    eos = [r.index(tok.eos_token_id) for r in rows]
    h = te(torch.tensor(rows)).last_hidden_state
    n = len(caps)
    pooled = torch.stack([h[i, eos[i]:].mean(0) for i in range(n)])  # EOS and every padding position
    t_emb = proj(pooled)
    t_emb = t_emb / t_emb.norm(dim=1, keepdim=True)
    i_emb = img(torch.from_numpy(images))
    i_emb = i_emb / i_emb.norm(dim=1, keepdim=True)
    assert float(ls.detach().exp()) < 100  # below CLIP's cap on the scale
    logits = ls.exp() * t_emb @ i_emb.T
    diag = logits.diagonal()
    l_clip = ((logits.logsumexp(1) - diag).mean() + (logits.logsumexp(0) - diag).mean()) / 2
    present = torch.zeros(n, len(tok))
    for i, r in enumerate(rows):
        for tid in set(r) - {tok.bos_token_id, tok.eos_token_id}:
            present[i, tid] = 1.0
    u = torch.rand(n, 2, generator=torch.Generator().manual_seed(config.seed * 31 + step))
    sel = [[eos[i], 76] + [min(76, eos[i] + int(u[i, k] * (77 - eos[i]))) for k in range(2)] for i in range(n)]
    z = bow(torch.stack([h[i, sel[i]] for i in range(n)]))  # [n, 4, V]
    y = present[:, None].expand_as(z)
    l_bow = (z.clamp(min=0) - z * y + torch.log1p(torch.exp(-z.abs()))).mean()
    last = h[:, 76] / h[:, 76].norm(dim=1, keepdim=True)
    cos = last @ last.T
    l_cos = sum(cos[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    loss = l_clip + l_bow + l_cos
    loss.backward()
    return float(loss.detach()), _clipped([p.grad.clone() for p in params])


def test_pretrain_follows_recipe_e_and_saves_safetensors(tmp_path, monkeypatch):
    """Three pretraining steps: each gradient is recipe E's recomputed here (contrastive over the mean of EOS and
    padding outputs, bag of words at EOS, the last and two random positions, cross-prompt cosine of position 76),
    clipped to norm 1; lr = 2e-3 * min(1, (s + 1) / 100) * (1 + cos(pi s / steps)) / 2; AdamW weight decay
    0.01; the saved encoder is the last step's, as safetensors, with pretrain.json; a stale temporary folder
    and a stale unfinished output are replaced; a second run in a process whose RNG moved gives the same
    weights."""
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from audit.lab.encoder import new_text_encoder, pretrain

    tok = CLIPTokenizer.from_pretrained(str(LAB_MODEL_DIR / "tokenizer"))
    cfg, steps = DataConfig(), 3
    out = tmp_path / "te"
    out.mkdir()
    (out / "stale.txt").write_text("an unfinished pretraining")  # no pretrain.json: not finished
    (tmp_path / "te.tmp").mkdir()
    (tmp_path / "te.tmp" / "junk.bin").write_text("left by a kill")
    rec = _recording_adamw(monkeypatch)
    assert pretrain(tok, out, cfg, steps=steps, **QUIET) == out
    assert len(rec) == steps
    n_te = len(list(new_text_encoder(tok).parameters()))
    _close(rec[0]["before"][:n_te], list(new_text_encoder(tok).parameters()), "init", rtol=0)
    for s in range(steps):
        if s:
            _close(rec[s]["before"], rec[s - 1]["after"], f"before {s}", rtol=0)
        _, grads = _hand_encoder_grads(tok, rec[s]["before"], cfg, s)
        _close(rec[s]["grad"], grads, f"grad {s}")
        assert rec[s]["lr"] == pytest.approx(2e-3 * min(1, (s + 1) / 100) * (1 + math.cos(math.pi * s / steps)) / 2,
                                             rel=1e-12)
        assert rec[s]["wd"] == 0.01
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "pretrain.json"]
    assert not (tmp_path / "te.tmp").exists()
    saved = load_file(out / "model.safetensors")
    names = [n for n, _ in new_text_encoder(tok).named_parameters()]
    for n, w in zip(names, rec[-1]["after"][:n_te]):
        assert torch.equal(saved[n], w), n
    info = json.loads((out / "pretrain.json").read_text())
    assert (info["steps"], info["batch"], info["lr"], info["history"]) == (steps, 128, 2e-3, [])
    monkeypatch.undo()
    torch.manual_seed(99)
    torch.rand(5)
    again = pretrain(tok, tmp_path / "again", cfg, steps=steps, **QUIET)
    other = load_file(again / "model.safetensors")
    assert all(torch.equal(other[k], saved[k]) for k in saved)
