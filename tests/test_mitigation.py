"""Mitigation (issue 14): the inference-time rule, detect-and-mitigate, the training filter, `generate`.

Everything runs on a tiny seeded SD-architecture model (audit.tiny) plus a tiny AutoencoderKL built from a
config as diffusers' own pipeline tests do (get_dummy_components); random weights exercise the code and
the exact formulas, not the science (the lab measures that)."""

from __future__ import annotations

import json
import math
from pathlib import Path
import types

import pytest
import torch

from helpers import embed, generate_np

PROMPTS = ["a red cat", "an old boat on the lake at sunset"]
LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


def _gen(pipe, prompt, steps=3, seed=0, **kw):
    return generate_np(pipe, prompt, steps, seed, **kw)




def _attn2_inputs(unet, name):
    """Record the (hidden_states, encoder_hidden_states) that reach module ``name``."""
    seen = {}

    def hook(module, args, kwargs):
        seen["hs"] = args[0] if args else kwargs["hidden_states"]
        seen["ehs"] = kwargs.get("encoder_hidden_states")

    return seen, unet.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)


def _hand_probs(attn, hs, ehs, c1, cond, keep):
    """softmax(Q K^T * scale) in float32 with the BOS logit times c1 in ``cond`` rows, ~keep positions -inf."""
    b, h = hs.shape[0], attn.heads
    q = attn.to_q(hs).view(b, -1, h, attn.to_q.out_features // h).transpose(1, 2)
    k = attn.to_k(ehs).view(b, -1, h, attn.to_k.out_features // h).transpose(1, 2)
    s = (q.float() @ k.float().transpose(-1, -2)) * attn.scale
    for r in range(b):
        if cond[r]:
            s[r, :, :, 0] = s[r, :, :, 0] * c1
        s[r][:, :, ~keep[r]] = float("-inf")
    return s.softmax(-1)


# --- inference-time rule ------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_eos", [False, True])
def test_rule_probabilities_equal_hand_softmax(pipe, mask_eos):
    from audit.mitigation.inference import Mitigation, prompt_lengths

    lengths = prompt_lengths(pipe.tokenizer, PROMPTS)
    assert lengths.tolist() == [5, 10]  # BOS + words + first EOS, from the tokenizer's attention mask
    c = embed(pipe, PROMPTS)
    u = embed(pipe, ["", ""])
    batch_c = torch.cat([u, c])  # diffusers' CFG layout [negative; positive]
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen, handle = _attn2_inputs(pipe.unet, LAYER)
    try:
        with torch.no_grad(), Mitigation(pipe, c1=1.25, mask_eos=mask_eos) as m:
            m.keep_probs = True
            m.set_prompts(n_cond=2, lengths=lengths)
            pipe.unet(x, 981, encoder_hidden_states=batch_c)
            got = m.probs[LAYER]
            n = (lengths - int(mask_eos)).repeat(2)  # the CONDITIONAL prompt's length in both halves
            keep = torch.arange(77)[None, :] < n[:, None]
            cond = torch.tensor([False, False, True, True])
            want = _hand_probs(pipe.unet.get_submodule(LAYER), seen["hs"], seen["ehs"], 1.25, cond, keep)
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert torch.all(got[~keep[:, None, None, :].expand_as(got)] == 0)  # summary positions exactly 0
    assert torch.all(got[keep[:, None, None, :].expand_as(got)] > 0)
    # the unconditional rows' BOS logit is not scaled: their BOS mass differs from the conditional rule's
    unscaled = _hand_probs(pipe.unet.get_submodule(LAYER), seen["hs"], seen["ehs"], 1.0, cond, keep)
    torch.testing.assert_close(got[:2], unscaled[:2], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got[2:], unscaled[2:], atol=1e-4)


def test_identity_rule_reproduces_the_unmitigated_unet(pipe):
    from audit.mitigation.inference import Mitigation, mitigate

    base = _gen(pipe, PROMPTS[0])
    with mitigate(pipe, c1=1.0, mask_summary=False):
        same = _gen(pipe, PROMPTS[0])
    assert (same == base).all()  # exactly: the original processors run
    # the explicit float32 path (forced by keep_probs) agrees with diffusers' SDPA processor
    c = torch.cat([embed(pipe, [""]), embed(pipe, PROMPTS[:1])])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = pipe.unet(x, 981, encoder_hidden_states=c).sample
        with Mitigation(pipe, c1=1.0, mask_summary=False) as m:
            m.keep_probs = True
            m.set_prompts(n_cond=1)
            out = pipe.unet(x, 981, encoder_hidden_states=c).sample
    assert len(m.probs) == 7
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with mitigate(pipe, c1=1.25):
        changed = _gen(pipe, PROMPTS[0])
    assert abs(changed - base).max() > 1e-3


def test_context_restores_processors_even_on_exception(pipe):
    from audit.mitigation import mitigate

    before = dict(pipe.unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with mitigate(pipe, c1=1.5):
            assert "encode_prompt" in pipe.__dict__
            assert any(type(p).__name__ == "_MitigationProcessor" for p in pipe.unet.attn_processors.values())
            raise RuntimeError("boom")
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert "encode_prompt" not in pipe.__dict__


def test_prompt_embeds_without_text_refused_with_reason(pipe):
    from audit.mitigation import MitigationError, mitigate

    c = embed(pipe, PROMPTS[:1])
    with pytest.raises(MitigationError, match="token count"):
        with mitigate(pipe):
            pipe(prompt_embeds=c, num_inference_steps=2, output_type="np")
    with mitigate(pipe, mask_summary=False):  # BOS scaling alone needs no token counts
        pipe(prompt_embeds=c, num_inference_steps=2, output_type="np")


def test_prompt_embeds_calls_are_refused_before_any_step_whatever_is_flagged(pipe):
    """DetectAndMitigate with only prompt_embeds ran through when nothing was flagged and raised halfway through
    the generation when something was; a set_prompts declaration for another number of rows (per prompt, called
    with num_images_per_prompt=2) was dropped without a word. Both are refused at encode_prompt now."""
    from audit.mitigation import DetectAndMitigate, MitigationError, mitigate
    from audit.mitigation.inference import prompt_lengths

    c = embed(pipe, PROMPTS)
    forwards = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        for threshold in (1e9, -1e9):  # nothing flagged, everything flagged: the same refusal, before step 0
            with pytest.raises(MitigationError, match="only prompt_embeds"):
                with DetectAndMitigate(pipe, threshold=threshold, layers=[LAYER]):
                    _gen(pipe, None, steps=2, prompt_embeds=c)
        assert forwards == []
        with DetectAndMitigate(pipe, threshold=None, layers=[LAYER], mode="off") as dm:  # never mitigates
            _gen(pipe, None, steps=2, prompt_embeds=c)
        assert dm.entropy.shape == (2,) and len(forwards) == 2
        lengths = prompt_lengths(pipe.tokenizer, PROMPTS)
        with mitigate(pipe) as m:
            m.set_prompts(2, lengths)
            with pytest.raises(MitigationError, match=r"declared 2 conditional rows, this call has 4 \(2 image"):
                _gen(pipe, None, steps=1, prompt_embeds=c, num_images_per_prompt=2)
            m.set_prompts(4, lengths.repeat_interleave(2))
            per_row = _gen(pipe, None, steps=1, prompt_embeds=c, num_images_per_prompt=2)
            assert (per_row == _gen(pipe, PROMPTS, steps=1, num_images_per_prompt=2)).all()
    finally:
        hook.remove()


def test_image_conditioned_pipelines_are_refused_for_detection_and_three_way_guidance_for_both(parts):
    """img2img was accepted by DetectAndMitigate, which then scored its first step at t = 751 on a noised input
    image against a threshold calibrated on pure noise at t0; InstructPix2Pix failed at its first forward with "the
    conditional rows are unknown: call the pipeline", though the user had called it."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline

    from audit.mitigation import DetectAndMitigate, MitigationError, mitigate

    tok, te, unet, sch, vae = parts
    kw = dict(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sch, safety_checker=None,
              feature_extractor=None, requires_safety_checker=False)
    img2img = StableDiffusionImg2ImgPipeline(**kw)
    with pytest.raises(MitigationError, match="StableDiffusionImg2ImgPipeline starts from an input image"):
        DetectAndMitigate(img2img, threshold=1.0, layers=[LAYER])
    with mitigate(img2img):  # the rule itself applies at every step of any two-way guidance batch
        pass
    for make in (lambda p: mitigate(p), lambda p: DetectAndMitigate(p, threshold=1.0, layers=[LAYER])):
        with pytest.raises(MitigationError, match="StableDiffusionInstructPix2PixPipeline: a three-way guidance"):
            make(StableDiffusionInstructPix2PixPipeline(**kw))


@pytest.mark.parametrize("c1", [0, -1.0, float("nan"), float("inf")])
def test_bad_c1_refused(pipe, c1):
    from audit.mitigation import MitigationError, mitigate

    with pytest.raises(MitigationError, match="c1"):
        mitigate(pipe, c1=c1)


def test_other_families_refused(pipe):
    from audit.mitigation import MitigationError, mitigate

    with pytest.raises(MitigationError, match="transformer"):
        mitigate(types.SimpleNamespace(transformer=object(), tokenizer=pipe.tokenizer))
    sdxl = types.SimpleNamespace(unet=pipe.unet, tokenizer=pipe.tokenizer, text_encoder_2=object())
    with pytest.raises(MitigationError, match="SDXL"):
        mitigate(sdxl)
    with pytest.raises(MitigationError, match="supported"):
        mitigate(types.SimpleNamespace(unet=torch.nn.Linear(2, 2), tokenizer=pipe.tokenizer))


# --- detect and mitigate ------------------------------------------------------------------------------
def _count_forwards(unet):
    calls = []
    return calls, unet.register_forward_pre_hook(lambda m, a: calls.append(1))


def test_detect_uses_no_extra_forward_and_matches_the_scorer(pipe, parts):
    from audit.mitigation import DetectAndMitigate
    from audit.models import LoadedModel
    from audit.scorers.base import PreparedBatch, ScoreConfig, Scorer, tokenize

    tok, te, unet, sch, _ = parts
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    calls, handle = _count_forwards(pipe.unet)
    try:
        base = pipe(PROMPTS[1], num_inference_steps=3, latents=noise.clone(), output_type="np").images
        n_plain = len(calls)
        calls.clear()
        with DetectAndMitigate(pipe, threshold=1e9, layers=[LAYER]) as dm:
            quiet = pipe(PROMPTS[1], num_inference_steps=3, latents=noise.clone(), output_type="np").images
        n_detect = len(calls)
    finally:
        handle.remove()
    assert n_plain == 3 and n_detect == 3 and dm.forwards == 3
    assert dm.flagged.tolist() == [False] and dm.mitigated.tolist() == [False]
    assert abs(quiet - base).max() < 1e-5  # not flagged: the generation is the unmitigated one

    model = LoadedModel(name="tiny", path=Path("."), fingerprint="x", tokenizer=tok, text_encoder=te, unet=unet,
                        scheduler_config=dict(sch.config), device=torch.device("cpu"), dtype=torch.float32,
                        default_layers=[LAYER])
    scorer = Scorer(model, ScoreConfig("attention_entropy", (LAYER,), num_inference_steps=3))  # the same t0
    batch = PreparedBatch([PROMPTS[1]], tokenize(tok, [PROMPTS[1]], 77), noise)
    risk = scorer.collect(batch, scorer.launch(batch))["risk"]
    torch.testing.assert_close(dm.entropy, torch.from_numpy(risk), rtol=1e-6, atol=1e-9)

    with DetectAndMitigate(pipe, threshold=float(risk[0]) - 1e-3, layers=[LAYER]) as dm2:
        flagged = pipe(PROMPTS[1], num_inference_steps=3, latents=noise.clone(), output_type="np").images
    assert dm2.flagged.tolist() == [True] and dm2.mitigated.tolist() == [True]
    torch.testing.assert_close(dm2.entropy, dm.entropy)  # step 0 unmitigated in both
    assert abs(flagged - base).max() > 1e-3


def test_detect_flags_per_image_in_a_batch(pipe):
    from audit.mitigation import DetectAndMitigate

    with DetectAndMitigate(pipe, threshold=None, layers=[LAYER], mode="off") as dm:
        _gen(pipe, PROMPTS, steps=2, num_images_per_prompt=2)
    e = dm.entropy
    assert e.shape == (4,) and torch.isfinite(e).all() and not dm.mitigated.any()
    thr = float(e.sort().values[1:3].mean())  # flags the two highest
    with DetectAndMitigate(pipe, threshold=thr, layers=[LAYER]) as dm2:
        _gen(pipe, PROMPTS, steps=2, num_images_per_prompt=2)
    assert dm2.flagged.tolist() == (e > thr).tolist() and dm2.mitigated.tolist() == (e > thr).tolist()
    with DetectAndMitigate(pipe, threshold=None, mode="always") as dm3:
        _gen(pipe, PROMPTS, steps=2)
    assert dm3.mitigated.all() and dm3.flagged is None and dm3.entropy is None  # no unmitigated step 0
    # one-step calls: each call's detection is there when it returns (it waited for the block's exit, and a
    # second call inside the block lost the first's)
    with DetectAndMitigate(pipe, threshold=thr, layers=[LAYER]) as dm4:  # alone in its block (another t0)
        _gen(pipe, PROMPTS, steps=1, num_images_per_prompt=2)
    e1 = dm4.entropy
    with DetectAndMitigate(pipe, threshold=thr, layers=[LAYER]) as dm5:
        _gen(pipe, PROMPTS, steps=1, num_images_per_prompt=2)
        assert dm5.entropy is not None and torch.equal(dm5.entropy, e1)
        assert dm5.flagged.tolist() == (e1 > thr).tolist()
        _gen(pipe, PROMPTS[:1], steps=1)
        assert dm5.entropy.shape == (1,) and torch.allclose(dm5.entropy, e1[:1], atol=1e-6)


def test_two_threads_generating_through_one_block_each_get_their_own_rows(pipe):
    """The per-call state lived on the shared Mitigation: a second thread's encode_prompt replaced the token counts
    and rows of a call still denoising, and its images came out mitigated with the other prompts' counts (0.06-0.09
    off, no error). Thread A waits at its second UNet forward until thread B has begun its own call."""
    import threading

    from audit.mitigation import DetectAndMitigate, mitigate

    a_prompt, b_prompts = "a red cat", ["an old boat on the lake at sunset with a dog", "blue sky"]
    for make in (lambda: mitigate(pipe), lambda: DetectAndMitigate(pipe, threshold=-1.0, layers=[LAYER])):
        with make() as m:  # one after the other: the reference
            ref = {"A": _gen(pipe, a_prompt), "B": _gen(pipe, b_prompts)}
            ref_flags = {}
            if isinstance(m, DetectAndMitigate):
                ref_flags["B"] = (m.entropy.clone(), m.mitigated.clone())
        # A encodes and takes its first step; B encodes (and takes its first step) while A waits before its second
        # step; then both denoise at once. The prompts are never tokenized by two threads at once: a pipeline's
        # tokenizer is not thread-safe on its own (diffusers' encode_prompt alone failed 1 in 300 so)
        a_stepped, b_began, forwards, out, errors = threading.Event(), threading.Event(), {"A": 0}, {}, []

        def interleave(module, args):
            who = threading.current_thread().name
            if who == "B":
                b_began.set()
            elif who == "A":
                forwards["A"] += 1
                if forwards["A"] == 1:
                    a_stepped.set()
                if forwards["A"] == 2:
                    assert b_began.wait(60)

        def call(prompt):
            try:
                if threading.current_thread().name == "B":
                    assert a_stepped.wait(60)
                out[threading.current_thread().name] = _gen(pipe, prompt)
                if isinstance(m, DetectAndMitigate):
                    out[threading.current_thread().name + " flags"] = (m.entropy.clone(), m.mitigated.clone())
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        hook = pipe.unet.register_forward_pre_hook(interleave)
        try:
            with make() as m:
                threads = [threading.Thread(target=call, args=(p,), name=n) for n, p in (("A", a_prompt), ("B", b_prompts))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
        finally:
            hook.remove()
        assert not errors, errors
        assert forwards["A"] == 3
        for who in ("A", "B"):
            assert (out[who] == ref[who]).all(), (type(m).__name__, who, abs(out[who] - ref[who]).max())
        if ref_flags:
            assert torch.equal(out["B flags"][0], ref_flags["B"][0]) and out["B flags"][1].all()
            assert out["A flags"][0].shape == (1,) and out["A flags"][1].all()


# --- training-time filter -----------------------------------------------------------------------------
def _hand_entropy(unet, name, x, t, c):
    seen, handle = _attn2_inputs(unet, name)
    try:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=c)
            attn = unet.get_submodule(name)
            b = x.shape[0]
            p = _hand_probs(attn, seen["hs"], seen["ehs"], 1.0, [False] * b, torch.ones(b, 77, dtype=torch.bool))
    finally:
        handle.remove()
    a = p.mean(dim=(1, 2)).double()
    return -(a * a.log()).sum(-1)  # every a_j > 0 here


def test_training_filter_entropy_mask_on_hand_made_batch(pipe):
    from audit.mitigation.training import MemorizationFilter, masked_loss

    unet = pipe.unet
    c = embed(pipe, ["a red cat", "a red cat", "night city street with old car"])
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([10, 500, 900])
    want = _hand_entropy(unet, LAYER, x, t, c)
    probe = MemorizationFilter(threshold=0.0, layers=[LAYER])
    scores = probe(unet, c, x, t).scores
    torch.testing.assert_close(scores, want, rtol=1e-6, atol=1e-9)
    thr = float(want.sort().values[1])  # flag E > thr: exactly the highest one
    res = MemorizationFilter(threshold=thr, layers=[LAYER])(unet, c, x, t)
    assert res.keep.tolist() == (want <= thr).tolist() and res.dropped == 1
    # zero extra forwards: the same scores captured from the training forward itself, gradients flow
    filt = MemorizationFilter(threshold=thr, layers=[LAYER])
    calls, handle = _count_forwards(unet)
    try:
        unet.requires_grad_(True)
        with filt.capturing(unet) as cap:
            pred = unet(x, t, encoder_hidden_states=c).sample
        res2 = filt.from_capture(cap)
        loss = masked_loss(((pred - x) ** 2).flatten(1).mean(1), res2.keep)
        loss.backward()
        assert unet.conv_in.weight.grad is not None
    finally:
        unet.zero_grad(set_to_none=True)
        unet.requires_grad_(False)
        handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(res2.scores, want, rtol=1e-5, atol=1e-7)
    assert res2.keep.tolist() == res.keep.tolist()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_training_filter_noise_magnitude_rule(pipe, prediction):
    from diffusers import DDPMScheduler

    from audit.mitigation.training import MemorizationFilter

    unet = pipe.unet
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction)
    c = embed(pipe, ["a red cat", "blue sky", "dog"])
    u = embed(pipe, [""])
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([100, 400, 981])
    with torch.no_grad():
        d = (unet(x, t, encoder_hidden_states=c).sample - unet(x, t, encoder_hidden_states=u.expand(3, -1, -1)).sample)
    d = d.flatten(1).norm(dim=1).double()
    if prediction == "v_prediction":
        d = d * sched.alphas_cumprod[t].double().sqrt()
    scores = MemorizationFilter(threshold=float("inf"), score="noise_magnitude", uncond_embeddings=u,
                                scheduler=sched)(unet, c, x, t).scores
    torch.testing.assert_close(scores, d, rtol=1e-5, atol=1e-7)
    thr = float(scores[1])  # the filter's own value as the threshold: tests the >= boundary exactly
    res = MemorizationFilter(threshold=thr, score="noise_magnitude", uncond_embeddings=u, scheduler=sched)(unet, c, x, t)
    assert res.keep.tolist() == (scores < thr).tolist() and not res.keep[1]  # d >= threshold is dropped (Wen)


def test_masked_loss():
    from audit.mitigation.training import masked_loss

    per = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    assert float(masked_loss(per, torch.tensor([True, False, True, False])).detach()) == 2.0
    zero = masked_loss(per, torch.zeros(4, dtype=torch.bool))
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.equal(per.grad, torch.zeros(4))


def test_masked_loss_refuses_non_bool_masks_and_ignores_dropped_non_finite_losses():
    """An int 0/1 mask used to index rows (a silently wrong mean); a dropped inf loss made the all-dropped
    zero NaN and a partial mean's gradient NaN."""
    from audit.mitigation.training import masked_loss

    with pytest.raises(ValueError, match="bool mask"):
        masked_loss(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match=r"must both be \[B\]"):
        masked_loss(torch.tensor([1.0, 2.0]), torch.tensor([True, False, True]))
    per = torch.tensor([1.0, float("inf"), 3.0], requires_grad=True)
    loss = masked_loss(per, torch.tensor([True, False, True]))
    loss.backward()
    assert float(loss.detach()) == 2.0 and per.grad.tolist() == [0.5, 0.0, 0.5]
    assert float(masked_loss(per, torch.zeros(3, dtype=torch.bool)).detach()) == 0.0


def test_a_mitigation_object_entered_twice_is_refused_and_restores_everything(pipe):
    """Entering the same object inside itself used to overwrite its saved processors: both exits then left the
    mitigation installed for good."""
    from audit.mitigation import DetectAndMitigate, MitigationError, mitigate

    before = {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()}
    plain = _gen(pipe, "a red cat", steps=2)
    for m in (mitigate(pipe, c1=1.25), DetectAndMitigate(pipe, threshold=1.0)):
        with pytest.raises(MitigationError, match="already entered"):
            with m:
                with m:
                    pass
        assert {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()} == before
        assert "encode_prompt" not in pipe.__dict__ and not pipe.unet._forward_pre_hooks
    assert (_gen(pipe, "a red cat", steps=2) == plain).all()


def test_nested_mitigations_exited_out_of_order_are_refused_and_change_nothing(pipe):
    """Exiting the outer of two nested mitigations first (by hand: with-blocks and ExitStack never do) blamed
    'processors replaced inside the block' and left the pipeline mitigated for good."""
    from contextlib import ExitStack

    from audit.mitigation import DetectAndMitigate, MitigationError, mitigate

    before = {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()}
    plain = _gen(pipe, "a red cat", steps=2)
    outer, inner = mitigate(pipe), mitigate(pipe, c1=1.5)
    outer.__enter__()
    inner.__enter__()
    with pytest.raises(MitigationError, match="a Mitigation entered after this one .* still active: "
                                              "exit the inner one first .* nothing was changed"):
        outer.__exit__(None, None, None)
    inner.__exit__(None, None, None)
    outer.__exit__(None, None, None)  # in order now: both restore
    assert {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()} == before
    assert "encode_prompt" not in pipe.__dict__ and not pipe.unet._forward_pre_hooks
    # a detection nested with another mitigation, either way round, read mitigated attention (inside) or
    # none ("first-step capture incomplete", around): refused on entering, the outer one untouched
    for first, second in ((mitigate(pipe), DetectAndMitigate(pipe, threshold=1.0)),
                          (DetectAndMitigate(pipe, threshold=1.0), mitigate(pipe))):
        with first:
            hooks = len(pipe.unet._forward_pre_hooks)
            with pytest.raises(MitigationError, match=f"a {type(second).__name__} cannot be entered while a "
                                                      f"{type(first).__name__} is active on the same pipeline"):
                second.__enter__()
            assert len(pipe.unet._forward_pre_hooks) == hooks
        assert {k: type(v).__name__ for k, v in pipe.unet.attn_processors.items()} == before
        assert "encode_prompt" not in pipe.__dict__ and not pipe.unet._forward_pre_hooks
    with ExitStack() as stack:
        stack.enter_context(mitigate(pipe))
        stack.enter_context(mitigate(pipe, c1=1.5))
    assert (_gen(pipe, "a red cat", steps=2) == plain).all()


def test_custom_attn2_processors_are_refused_and_replacing_processors_inside_fails_the_block(pipe):
    """A user's own attn2 processor would be bypassed by the rule (and lose its cross_attention_kwargs even when
    the rule is the identity): refused before anything is installed. Processors set inside the block meant
    unmitigated calls: the block fails on exit and the new processors stay."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

    from audit.mitigation import MitigationError, mitigate

    class Controller(AttnProcessor2_0):
        pass

    pipe.unet.set_attn_processor(Controller())
    try:
        with pytest.raises(MitigationError, match=r"Controller on \d+ layer"):
            mitigate(pipe)
        assert all(type(v) is Controller for v in pipe.unet.attn_processors.values())
    finally:
        pipe.unet.set_attn_processor(AttnProcessor2_0())
    # another package's class that only shares diffusers' name (Ren et al.'s code defines an AttnProcessor2_0)
    Impostor = type("AttnProcessor2_0", (AttnProcessor2_0,), {"__module__": "refactored_attention_processor"})
    pipe.unet.set_attn_processor(Impostor())
    try:
        with pytest.raises(MitigationError, match=r"refactored_attention_processor\.AttnProcessor2_0 on \d+ layer"):
            mitigate(pipe)
    finally:
        pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.unet.set_attn_processor(SlicedAttnProcessor(1))  # diffusers' own processors are accepted
    with mitigate(pipe):
        pass
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(MitigationError, match="were replaced inside the mitigation block"):
        with mitigate(pipe):
            pipe.unet.set_attn_processor(AttnProcessor())
    assert all(type(v) is AttnProcessor for v in pipe.unet.attn_processors.values())
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(ZeroDivisionError):  # another exception on its way is not replaced by ours
        with mitigate(pipe):
            pipe.unet.set_attn_processor(AttnProcessor())
            1 / 0
    pipe.unet.set_attn_processor(AttnProcessor2_0())


def test_token_counts_follow_textual_inversion_negative_prompts_and_declared_lengths(pipe):
    """n is counted as the pipeline's text encoder sees the prompt (a 4-vector textual-inversion token is 4
    tokens); a negative prompt keeps all its tokens in the unconditional rows (max(n, n_negative)); an empty one
    gives the reference's mask; set_prompts before a prompt_embeds call declares that call's counts."""
    from audit.mitigation import Mitigation, MitigationError, mitigate
    from audit.mitigation.inference import prompt_lengths

    def kept(m):
        return (m.probs[m.layers[0]] > 0).any(dim=(1, 2)).sum(-1).tolist()

    tok = pipe.tokenizer
    neg = "blurry ugly low quality photo of a dog at night"
    n_neg, n = prompt_lengths(tok, [neg]).item(), prompt_lengths(tok, ["a red cat"]).item()
    assert n_neg > n == 5
    with mitigate(pipe, c1=1.25) as m:
        m.keep_probs = True
        _gen(pipe, "a red cat", steps=1, negative_prompt=neg)
        assert kept(m) == [n_neg, n]  # [unconditional row, conditional row]
        _gen(pipe, "an old boat on the lake at sunset", steps=1, negative_prompt="")
        assert kept(m) == [10, 10]  # the reference: the prompt's n in both halves
        _gen(pipe, "a red cat", steps=1)
        assert kept(m) == [n, n]
        # a negative prompt given only as embeddings (its length unknown): every position kept in its row; the
        # conditional prompt's n cut it to n positions, masking most of the negative prompt out
        _gen(pipe, "a red cat", steps=1, negative_prompt_embeds=embed(pipe, [neg]))
        assert kept(m) == [pipe.tokenizer.model_max_length, n]
    embeds = embed(pipe, ["a red cat"])
    with Mitigation(pipe, c1=1.25) as m:
        m.keep_probs = True
        m.set_prompts(n_cond=1, lengths=prompt_lengths(tok, ["a red cat"]))
        _gen(pipe, None, steps=1, prompt_embeds=embeds)
        assert kept(m) == [n, n]
        with pytest.raises(MitigationError, match="needs each prompt's token count"):  # declared for one call
            _gen(pipe, None, steps=1, prompt_embeds=embeds)
        for n_cond, lengths, match in ((-1, None, "n_cond must be a positive integer"),
                                       (1.5, None, "n_cond must be a positive integer"),
                                       (1, [0], "token counts must be from 2"), (1, [1000], "to 77, got \\[1000\\]"),
                                       (1, ["a"], "lengths must be integer token counts"),
                                       (1, [3.5], "lengths must be integer token counts, got torch.float32")):
            with pytest.raises(MitigationError, match=match):  # accepted silently, or a torch ValueError
                m.set_prompts(n_cond=n_cond, lengths=lengths)

    import copy

    ti = copy.deepcopy(pipe)
    ti.load_textual_inversion({"<style>": torch.randn(4, ti.text_encoder.config.hidden_size,
                                                      generator=torch.Generator().manual_seed(0))},
                               token="<style>", text_encoder=ti.text_encoder, tokenizer=ti.tokenizer)
    seen = ti.maybe_convert_prompt("a cat in <style>", ti.tokenizer)
    n_ti = prompt_lengths(ti.tokenizer, [seen]).item()
    assert n_ti == prompt_lengths(ti.tokenizer, ["a cat in <style>"]).item() + 3
    with mitigate(ti, c1=1.25) as m:
        m.keep_probs = True
        _gen(ti, "a cat in <style>", steps=1)
        assert kept(m) == [n_ti, n_ti]


def test_bad_thresholds_layers_c1_and_calibrations_are_refused():
    """NaN thresholds flagged nothing, silently; a layer given as a string was split into characters; c1 =
    1e300 made NaN images; a calibration without num_inference_steps passed any --steps, and null fields raised
    raw AttributeErrors."""
    from audit.mitigation import MitigationError
    from audit.mitigation.detect import check_detection_calibration
    from audit.mitigation.inference import MitigationRule
    from audit.mitigation.training import MemorizationFilter

    for c1 in (1e300, "1.25", True, None, float("nan"), 0, -1):
        with pytest.raises(MitigationError, match="c1 must be"):
            MitigationRule(c1)
    assert MitigationRule(100).c1 == 100
    for flags in ({"mask_summary": "no"}, {"mask_eos": 1}, {"mask_summary": None}):  # "no" is truthy: it masked
        with pytest.raises(MitigationError, match="must be True or False"):
            MitigationRule(**flags)
    with pytest.raises(ValueError, match="threshold must be a number"):
        MemorizationFilter(float("nan"))
    with pytest.raises(ValueError, match="got the string"):
        MemorizationFilter(1.0, layers="down_blocks.1.attentions.0.transformer_blocks.0.attn2")
    for layers in ([3], 3):  # raised a TypeError from str.join, and "'int' object is not iterable"
        with pytest.raises(MitigationError, match=r"layers must be a list of attn2 module paths \(strings\)"):
            MemorizationFilter(1.0, layers=layers)
    assert MemorizationFilter(float("inf")).threshold == float("inf")  # never flag: allowed
    ok = {"model": {"fingerprint": "F"}, "score_config": {"scorer": "attention_entropy", "layers": ["L"],
                                                          "noise_draws": 1, "num_inference_steps": 10}}
    assert check_detection_calibration(ok, 10, "F") == ["L"]
    bad = [({**ok, "score_config": None}, "must be objects"), ({**ok, "model": None}, "must be objects"),
           ({**ok, "score_config": {**ok["score_config"], "noise_draws": None}}, "noise_draws None"),
           ({**ok, "score_config": {k: v for k, v in ok["score_config"].items() if k != "num_inference_steps"}},
            "records no num_inference_steps"),
           ({**ok, "score_config": {**ok["score_config"], "layers": "L"}}, "names no layers")]
    for cal, message in bad:
        with pytest.raises(MitigationError, match=message):
            check_detection_calibration(cal, 10, "F")
    # SD 2.0: the scorer's t0 is its Euler scheduler's (999); a DDIM generation starts at 981
    euler = {**ok, "score_config": {**ok["score_config"], "first_timestep": 999}}
    assert check_detection_calibration(euler, 10, "F", 999) == ["L"]
    assert check_detection_calibration(ok, 10, "F", 981) == ["L"]  # a calibration that records no t0
    with pytest.raises(MitigationError, match="scored at first timestep 999; this generation's sampler starts at 981"):
        check_detection_calibration(euler, 10, "F", 981)


def test_detect_refuses_nan_threshold_and_string_layers(pipe):
    from audit.mitigation import DetectAndMitigate, MitigationError

    with pytest.raises(MitigationError, match="threshold must be a number"):
        DetectAndMitigate(pipe, threshold=float("nan"))
    with pytest.raises(MitigationError, match="got the string"):
        DetectAndMitigate(pipe, threshold=1.0, layers=LAYER)
    with pytest.raises(MitigationError, match="layers is empty: give one or more"):  # it said "(none)"
        DetectAndMitigate(pipe, threshold=1.0, layers=[])


def test_wrapped_unets_get_the_same_default_layer_and_accept_bare_layer_names(parts):
    """A torch.compile'd (``_orig_mod.``) or DDP-wrapped (``module.``) UNet sorted every layer as an up-block
    layer, so the default layer was another one; the calibration's bare names raised KeyError."""
    from audit.capture import call_order_key, cross_attention_layers, unwrapped_name
    from audit.mitigation.training import MemorizationFilter

    unet = parts[2]

    class DDPLike(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    plain = cross_attention_layers(unet)
    filt = MemorizationFilter(threshold=2.0)
    for wrapped, prefix in ((DDPLike(unet), "module."), (torch.compile(unet, backend="eager"), "_orig_mod.")):
        assert [unwrapped_name(n) for n in cross_attention_layers(wrapped)] == plain
        assert filt._layers(wrapped) == [prefix + filt._layers(unet)[0]]
        assert MemorizationFilter(2.0, layers=[LAYER])._layers(wrapped) == [prefix + LAYER]
    assert call_order_key("module._orig_mod.mid_block.attentions.0.transformer_blocks.0.attn2")[0] == 1


def test_attention_logits_stay_float32_under_autocast(parts):
    """Under a bfloat16 autocast the Q K^T matmul ran in bfloat16 (0.011 off); the projections stay the model's."""
    from audit.capture import attention_logits

    attn = parts[2].get_submodule(LAYER)
    g = torch.Generator().manual_seed(0)
    hs, ehs = torch.randn(2, 16, attn.to_q.in_features, generator=g), torch.randn(2, 77, attn.to_k.in_features,
                                                                                   generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lg, _ = attention_logits(attn, hs, ehs)
        q, k = attn.to_q(hs), attn.to_k(ehs)  # the projections are the model's, in autocast's dtype
    assert q.dtype == torch.bfloat16
    h = attn.heads
    q, k = (x.view(2, -1, h, x.shape[-1] // h).transpose(1, 2).float() for x in (q, k))
    assert lg.dtype == torch.float32 and torch.equal(lg, (q @ k.transpose(-1, -2)) * attn.scale)  # Q K^T in float32


# --- memaudit generate --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from audit.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gen") / "model", seed=0, sample_size=8, vae=True)  # = parts


def _cli():
    import typer
    from typer.testing import CliRunner

    from audit.cli.generate import generate

    app = typer.Typer()
    app.command("generate")(generate)  # the one line audit/cli.py needs
    app.command("noop")(lambda: None)  # a second command keeps typer's subcommand parsing
    return app, CliRunner()


def _calibration(path, fingerprint, threshold, layers, steps=2):
    quantiles = [threshold + (i - 990) / 1000 for i in range(1001)]  # the 0.99 quantile is the threshold
    cal = {"kind": "memaudit.calibration", "threshold": threshold, "fpr": 0.01, "reference_quantiles": quantiles,
           "reference": {"size": 100}, "model": {"name": "tiny", "fingerprint": fingerprint},
           "score_config": {"scorer": "attention_entropy", "layers": layers, "noise_draws": 1, "seed": 0,
                            "num_inference_steps": steps, "dtype": "float32"}}
    path.write_text(json.dumps(cal))
    return path


def test_generate_rows_reconcile_and_resume(model_dir, tmp_path):
    import polars as pl

    from audit.cli.generate import build_pipeline, run_generate
    from audit.models import fingerprint_files

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "a red cat"}, {"prompt": "   "}, {"prompt": 7}, {"prompt": "boom"}, {"prompt": "blue sky"}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pipe, loaded = build_pipeline(str(model_dir), device="cpu", dtype="float32")
    layers = loaded.default_layers
    cal = _calibration(tmp_path / "cal.json", fingerprint_files(model_dir), 0.0, layers)

    class Failing(type(pipe)):  # a prompt that fails inside the pipeline becomes reject rows, never lost rows
        def __call__(self, prompt=None, *a, **kw):
            if prompt == "boom":
                raise RuntimeError("simulated failure")
            return super().__call__(prompt, *a, **kw)

    pipe.__class__ = Failing
    out = tmp_path / "out"
    kw = dict(mitigate="flagged", calibration=cal, seeds=2, steps=2, progress=False, _pipeline=(pipe, loaded))
    summary = run_generate(prompts, str(model_dir), out, **kw)
    df = pl.read_parquet(out / "generations.parquet")
    assert df.height == 5 * 2 == summary["rows"]
    assert sorted(zip(df["prompt_index"], df["seed"])) == [(i, s) for i in range(5) for s in range(2)]
    images = df.filter(pl.col("status") == "image")
    assert images["prompt_index"].unique().sort().to_list() == [0, 4]
    assert all((out / p).is_file() for p in images["image_path"])
    assert images["flagged"].all() and images["mitigated"].all() and images["risk"].is_not_null().all()
    reasons = dict(zip(df["prompt_index"], df["reason"]))
    assert reasons[1] == "empty_prompt" and reasons[2] == "prompt_not_string:int"
    assert reasons[3].startswith("generation_failed: RuntimeError: simulated failure")
    assert summary["rejected_by_reason"] == {"empty_prompt": 2, "prompt_not_string": 2, "generation_failed": 2}
    assert summary["flagged"] == 4 == summary["mitigated"]

    (out / "parts" / "00000004.parquet").unlink()  # as if killed before the last prompt finished
    (out / "generations.parquet").unlink()
    again = run_generate(prompts, str(model_dir), out, **kw)
    assert again["this_run"]["images"] == 2 and again["rows"] == 10
    assert pl.read_parquet(out / "generations.parquet").equals(df)  # same seeds, same rows

    with pytest.raises(Exception, match="other options"):
        run_generate(prompts, str(model_dir), out, **dict(kw, seeds=3))
    # the same calibration under another path resumes (it was refused: "other options (calibration)"); another
    # calibration content does not
    import shutil

    shutil.copy(cal, tmp_path / "copy.json")
    assert run_generate(prompts, str(model_dir), out, **dict(kw, calibration=tmp_path / "copy.json"))["rows"] == 10
    other = _calibration(tmp_path / "other.json", fingerprint_files(model_dir), 0.5, layers)
    with pytest.raises(Exception, match=r"other options \(calibration\)"):
        run_generate(prompts, str(model_dir), out, **dict(kw, calibration=other))
    # --steps above the scheduler's training timesteps: refused before the folder takes the options (every prompt
    # failed, and the folder then refused the intended --steps)
    from audit.cli.generate import GenerateError

    with pytest.raises(GenerateError, match="--steps 2000: more than the scheduler's 1000 training timesteps"):
        run_generate(prompts, str(model_dir), tmp_path / "s", **dict(kw, steps=2000, calibration=None, mitigate="off"))
    assert not (tmp_path / "s").exists()


def test_generate_keeps_nothing_wrong_on_disk_and_retries_what_failed(model_dir, tmp_path, monkeypatch):
    """generate's adversarial findings: a NaN image was saved black as an image row; a prompt that failed once
    (out of memory) was never tried again; a failed second save left the first PNG unlisted; CSV prompts that
    look like numbers were rejected; a rerun naming the same files by another path, or two processes on one
    folder, were refused or both generated; a calibration naming a layer the UNet lacks failed every prompt."""
    import fcntl

    import numpy as np
    import polars as pl

    from audit.cli.generate import GenerateError, build_pipeline, run_generate
    from audit.errors import RunFolderBusyError
    from audit.models import fingerprint_files

    pipe, loaded = build_pipeline(str(model_dir), device="cpu", dtype="float32")
    state = {"fail": {"boom"}}

    class Flaky(type(pipe)):
        def __call__(self, prompt=None, *a, **kw):
            if prompt in state["fail"]:
                state["fail"].discard(prompt)  # fails once, as an out-of-memory error would
                raise RuntimeError("CUDA out of memory (simulated)")
            out = super().__call__(prompt, *a, **kw)
            if prompt == "nan second":
                out.images[1] = np.nan  # NaN latents decode to NaN pixels
            return out

    pipe.__class__ = Flaky
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\n1984\ntrue\nboom\nnan second\n")
    out = tmp_path / "out"
    kw = dict(seeds=2, steps=2, progress=False, _pipeline=(pipe, loaded))
    summary = run_generate(prompts, str(model_dir), out, **kw)
    df = pl.read_parquet(out / "generations.parquet")
    assert df["prompt"].to_list() == ["1984", "1984", "true", "true", "boom", "boom", "nan second", "nan second"]
    assert df["reason"].to_list()[:4] == [None] * 4  # CSV cells are text
    assert df["reason"][4].startswith("generation_failed: RuntimeError: CUDA out of memory")
    assert df["reason"].to_list()[6:] == [None, "nonfinite_image"] and df["image_path"][7] is None
    assert summary["images"] == 5 and summary["rejected_by_reason"] == {"generation_failed": 2, "nonfinite_image": 1}
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "00000000_s0.png", "00000000_s1.png", "00000001_s0.png", "00000001_s1.png", "00000003_s0.png"]
    # the rerun tries the failed prompt again, whatever path names the same prompts file
    again = run_generate(str(prompts.resolve()), str(model_dir), out, **kw)
    assert again["this_run"]["images"] == 2 and again["images"] == 7 and again["rejected_by_reason"] == {
        "nonfinite_image": 1}
    assert not list((out / "parts").glob("*.failed.parquet"))
    assert pl.read_parquet(out / "generations.parquet")["status"].to_list()[4:6] == ["image", "image"]
    part = out / "parts" / "00000001.parquet"  # a part damaged outside memaudit: that prompt is generated again
    part.write_bytes(part.read_bytes()[:-50])
    again = run_generate(prompts, str(model_dir), out, **kw)
    assert again["this_run"]["images"] == 2 and again["images"] == 7
    part.write_bytes((out / "parts" / "00000000.parquet").read_bytes())  # another prompt's part copied over it
    again = run_generate(prompts, str(model_dir), out, **kw)
    assert again["this_run"]["images"] == 2 and pl.read_parquet(out / "generations.parquet")["prompt_index"].to_list() \
        == [0, 0, 1, 1, 2, 2, 3, 3]
    # the same model folder with another VAE (its fingerprint covers what scores, not the decoder): refused
    other = tmp_path / "other-model"
    import shutil

    shutil.copytree(model_dir, other)
    cfg = other / "vae" / "config.json"
    cfg.write_text(cfg.read_text().replace("{", '{"scaling_factor_note": 1, ', 1))
    pipe2, loaded2 = build_pipeline(str(other), device="cpu", dtype="float32")
    pipe2.__class__ = Flaky
    with pytest.raises(GenerateError, match=r"other options \(vae_fingerprint: another VAE\)"):
        run_generate(prompts, str(other), out, **dict(kw, _pipeline=(pipe2, loaded2)))
    # a save that fails for the second seed: the first seed's image does not stay behind unlisted
    prompts2 = tmp_path / "q.txt"
    prompts2.write_text("a red cat\n")
    out2 = tmp_path / "out2"
    import audit.tables

    real = audit.tables.atomic_path

    def second_save_fails(path, **kw):
        if str(path).endswith("_s1.png"):
            raise OSError(5, "Input/output error", str(path))
        return real(path, **kw)

    monkeypatch.setattr(audit.tables, "atomic_path", second_save_fails)
    summary = run_generate(prompts2, str(model_dir), out2, **kw)
    monkeypatch.setattr(audit.tables, "atomic_path", real)
    assert summary["images"] == 0 and summary["rejected_by_reason"] == {"generation_failed": 2}
    assert not list((out2 / "images").iterdir())  # seed 0's image was saved, then removed with its rows
    # two processes on one folder: the second is refused while the first holds it
    with open(out2 / ".memaudit.lock", "a+b") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunFolderBusyError, match="being written by another memaudit generate right now"):
            run_generate(prompts2, str(model_dir), out2, **kw)  # (the CLI exits 75, as memaudit run does)
    with pytest.raises(GenerateError, match="must be a finite number"):
        run_generate(prompts2, str(model_dir), tmp_path / "inf", **dict(kw, guidance=float("inf")))
    cal = _calibration(tmp_path / "cal.json", fingerprint_files(model_dir), 0.0, ["down_blocks.0.nope.attn2"])
    with pytest.raises(GenerateError, match="not cross-attention layers of this model's UNet: down_blocks.0.nope"):
        run_generate(prompts2, str(model_dir), tmp_path / "badcal", **dict(kw, mitigate="flagged", calibration=cal))
    assert not (tmp_path / "badcal" / "parts").exists() or not list((tmp_path / "badcal" / "parts").iterdir())


def test_generate_says_in_one_line_when_it_cannot_write(model_dir, tmp_path, monkeypatch):
    import audit.cli.generate as gen

    app, runner = _cli()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")

    def full(rows, path, metadata=None):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(gen, "_write_table_atomic", full)
    res = runner.invoke(app, ["generate", str(prompts), "--model", str(model_dir), "--out", str(tmp_path / "o"),
                              "--steps", "2", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    # the first part could not be written: nothing finished is kept, so nothing is said to be
    out = tmp_path / "o"
    assert (f"--out {out}: no space left on the device writing {out}/parts/00000000.parquet: free some, then rerun "
            "the same command\n") in res.output


def test_generate_cli_images_and_one_line_errors(model_dir, tmp_path):
    import polars as pl

    from audit.models import fingerprint_files

    app, runner = _cli()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nold boat\n")
    base = ["generate", str(prompts), "--model", str(model_dir), "--steps", "2", "--device", "cpu"]
    res = runner.invoke(app, base + ["--out", str(tmp_path / "o1"), "--mitigate", "always", "--seeds", "1"])
    assert res.exit_code == 0, res.output
    df = pl.read_parquet(tmp_path / "o1" / "generations.parquet")
    assert df.height == 2 and df["mitigated"].all() and df["flagged"].is_null().all()
    summary = json.loads((tmp_path / "o1" / "summary.json").read_text())
    assert summary["flagged"] is None and summary["mitigated"] == 2  # nothing was detected: not "0 flagged"
    assert "━" not in res.output  # the progress bar only on a terminal (it went into logs), as `run`'s

    def refused(args, match):
        r = runner.invoke(app, base + ["--out", str(tmp_path / "bad")] + args)
        lines = [ln for ln in r.output.strip().splitlines() if ln]
        assert r.exit_code == 2 and len(lines) == 1 and match in lines[0], r.output

    refused(["--c1", "0"], "c1")
    refused(["--mitigate", "flagged"], "--mitigate flagged needs --calibration")
    other = _calibration(tmp_path / "other.json", "0000000000000000", 1.0, ["x"])
    refused(["--mitigate", "flagged", "--calibration", str(other)], "another model")
    steps = _calibration(tmp_path / "steps.json", fingerprint_files(model_dir), 1.0, ["x"], steps=50)
    refused(["--mitigate", "flagged", "--calibration", str(steps)], "num_inference_steps")
    refused(["--mitigate", "sometimes"], "choose off, always or flagged")
    refused(["--device", "tpu"], "--device tpu: choose auto, cpu, cuda or cuda:N")
    refused(["--model", "lab"], "the bundled lab model has no VAE")  # was "no such folder" (run accepts lab)
    (tmp_path / "afile").write_text("x")
    r = runner.invoke(app, base + ["--out", str(tmp_path / "afile")])
    assert r.exit_code == 2 and "is a file, not a folder" in r.output, r.output
    # a CSV is read by `memaudit run`'s reader: a row whose bytes are not UTF-8 is one rejected row (the whole file
    # was refused, "cannot read as csv"), a file without the prompt column is refused naming its columns
    from audit.cli.generate import read_prompts

    (tmp_path / "bad.csv").write_bytes(b'prompt,x\na red cat,1\nbad \xff\xfe here,2\nblue sky,3\n')
    assert read_prompts(tmp_path / "bad.csv") == [("a red cat", None), ("bad \\xff\\xfe here", "invalid_utf8"),
                                                  ("blue sky", None)]  # the bad bytes escaped, as in run's rejects
    (tmp_path / "nocol.csv").write_text("p,x\na,1\n")
    r = runner.invoke(app, ["generate", str(tmp_path / "nocol.csv")] + base[2:] + ["--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "no input has the prompt column 'prompt'; columns found: p, x" in r.output, r.output
    # an empty file holds no prompts, as for `memaudit run`: said, not an error
    (tmp_path / "empty.csv").write_text("")
    r = runner.invoke(app, ["generate", str(tmp_path / "empty.csv")] + base[2:] + ["--out", str(tmp_path / "e")])
    assert r.exit_code == 0 and "holds no prompts; nothing was generated" in r.output, r.output
    assert pl.read_parquet(tmp_path / "e" / "generations.parquet").height == 0
    # every row rejected: the outputs are written, and the exit says nothing was generated
    (tmp_path / "blank.txt").write_text("\n  \n")
    r = runner.invoke(app, ["generate", str(tmp_path / "blank.txt")] + base[2:] + ["--out", str(tmp_path / "b")])
    assert r.exit_code == 4 and "nothing was generated: all 2 rows were rejected (empty_prompt 2)" in r.output
    assert pl.read_parquet(tmp_path / "b" / "generations.parquet").height == 2


def test_generate_out_folder_checks_and_interrupt(model_dir, tmp_path, monkeypatch):
    """--out holding generate's file names but no generate.json, or a damaged generate.json, is refused (exit 2,
    nothing overwritten); other files get a note. Ctrl-C keeps the finished prompts, says how to resume
    (exit 130), and the rerun finishes the rest."""
    import polars as pl

    import audit.cli.generate as gen

    app, runner = _cli()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nold boat\nblue sky\n")
    base = ["generate", str(prompts), "--model", str(model_dir), "--steps", "2", "--device", "cpu"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "summary.json").write_text("{}")
    r = runner.invoke(app, base + ["--out", str(foreign)])
    assert r.exit_code == 2 and "holds summary.json but no generate.json" in r.output, r.output
    assert sorted(p.name for p in foreign.iterdir()) == ["summary.json"]
    (foreign / "summary.json").unlink()
    (foreign / "generate.json").write_text("[")
    r = runner.invoke(app, base + ["--out", str(foreign)])
    assert r.exit_code == 2 and "its generate.json is damaged" in r.output, r.output

    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    real = gen._generate_prompt
    calls = []

    def interrupt_second(pipe, detector, i, *a):
        calls.append(i)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(pipe, detector, i, *a)

    monkeypatch.setattr(gen, "_generate_prompt", interrupt_second)
    r = runner.invoke(app, base + ["--out", str(out)])
    assert r.exit_code == 130, r.output
    assert "also holds 1 other entry (mine.txt)" in r.output
    assert f"interrupted; the finished prompts are kept in {out}/parts: rerun the same command to resume" in r.output
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["00000000.parquet"]
    monkeypatch.setattr(gen, "_generate_prompt", real)
    r = runner.invoke(app, base + ["--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["this_run"]["images"] == 2
    assert pl.read_parquet(out / "generations.parquet")["status"].to_list() == ["image"] * 3


def test_generate_reads_text_lines_as_run_does(tmp_path):
    """One prompt a line, split at newlines only (a form feed or U+2028 stays in its prompt), a line that is not
    UTF-8 rejected on its own, a leading byte-order mark and CRLF endings dropped."""
    from audit.cli.generate import read_prompts

    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfa red cat\r\nform\x0cfeed\nline sep\xe2\x80\xa8inside\nbad \xff byte\n\nlast")
    assert read_prompts(path) == [("a red cat", None), ("form\x0cfeed", None), ("line sep\u2028inside", None),
                                  ("bad \\xff byte", "invalid_utf8"), ("", "empty_prompt"), ("last", None)]
    lines = tmp_path / "p.jsonl"  # JSON lines: a blank line is a row, rejected as `memaudit run` rejects it
    lines.write_text('{"prompt": "a cat"}\n\n   \n{"prompt": "a dog"}\n')
    assert read_prompts(lines) == [("a cat", None), ("", "empty_prompt"), ("   ", "empty_prompt"), ("a dog", None)]


def test_docs_training_step_example_runs(parts):
    """The 20-line training step of docs/mitigation.md, run as written on the tiny model."""
    import copy
    import re

    from diffusers import DDPMScheduler

    text = (Path(__file__).resolve().parents[1] / "docs" / "mitigation.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def training_step" in b)
    assert len(block.strip().splitlines()) <= 30
    tok, te, unet, _, vae = parts
    unet = copy.deepcopy(unet).train().requires_grad_(True)
    scope = {"cal": {"threshold": 0.0, "score_config": {"scorer": "attention_entropy", "layers": [LAYER],
                                                       "noise_draws": 1, "first_timestep": 981}}}
    exec(compile(block, "docs/mitigation.md", "exec"), scope)
    ids = tok(["a red cat", "dog"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    batch = {"pixel_values": torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1,
             "input_ids": ids}
    before = unet.conv_in.weight.detach().clone()
    opt = torch.optim.SGD(unet.parameters(), lr=0.1)
    torch.manual_seed(0)
    loss, result = scope["training_step"](batch, unet, te, vae, DDPMScheduler(), opt)
    assert result.keep.tolist() == [False, False] and float(loss.detach()) == 0.0  # threshold 0: all dropped
    assert torch.equal(unet.conv_in.weight, before)  # zero gradient: nothing learned from dropped samples
    scope["filt"].threshold = 1e9
    loss, result = scope["training_step"](batch, unet, te, vae, DDPMScheduler(), opt)
    assert result.keep.all() and float(loss.detach()) > 0 and not torch.equal(unet.conv_in.weight, before)


def test_sd2_style_unet(parts):
    """SD 2.x attention options (linear projections, upcast attention, per-block heads, v-prediction) work."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from audit.mitigation import DetectAndMitigate, mitigate

    tok, te, _, sch, vae = parts
    torch.manual_seed(7)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
        upcast_attention=True, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    sched = DDIMScheduler.from_config(dict(sch.config, prediction_type="v_prediction"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    base = _gen(pipe, PROMPTS[0], steps=2)
    with mitigate(pipe, c1=1.0, mask_summary=False):
        assert (_gen(pipe, PROMPTS[0], steps=2) == base).all()
    with mitigate(pipe, c1=1.5, mask_eos=True):
        assert abs(_gen(pipe, PROMPTS[0], steps=2) - base).max() > 1e-4
    with DetectAndMitigate(pipe, threshold=0.0, mode="flagged") as dm:
        _gen(pipe, PROMPTS, steps=2)
    assert dm.flagged.all() and dm.mitigated.all() and dm.forwards == 2


# --- the training filter against an ML engineer's loop and bad inputs (an adversarial helper, session 30) ----------
def _batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(3, 77, 32, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.tensor([10, 500, 900])


def test_training_filter_drops_non_finite_samples_and_refuses_misuse_of_capturing(parts):
    """A NaN score used to mean keep (nan > thr is False); a noise_magnitude filter returned entropies from
    capturing(); gradient checkpointing crashed in backward(); a trainable attn2 processor lost its gradient."""
    import copy

    from diffusers.models.attention_processor import AttnProcessor2_0

    from audit.mitigation.inference import MitigationError
    from audit.mitigation.training import MemorizationFilter

    unet = parts[2]
    c, x, t = _batch()
    xn = x.clone()
    xn[1] = float("nan")
    res = MemorizationFilter(100.0, layers=[LAYER])(unet, c, xn, t)
    assert res.nonfinite.tolist() == [False, True, False] and res.keep.tolist() == [True, False, True]
    u = torch.randn(1, 77, 32)
    res = MemorizationFilter(1e9, score="noise_magnitude", uncond_embeddings=u)(unet, c, xn, t)
    assert res.keep.tolist() == [True, False, True] and res.dropped == 1

    noise = MemorizationFilter(2.0, score="noise_magnitude", uncond_embeddings=u)
    with pytest.raises(ValueError, match="capturing\\(\\) scores attention_entropy"):
        with noise.capturing(unet):
            pass
    filt = MemorizationFilter(100.0, layers=[LAYER])
    with filt.capturing(unet) as cap:
        unet(x, t, encoder_hidden_states=c)
    with pytest.raises(ValueError, match="this filter scores noise_magnitude"):
        noise.from_capture(cap)
    with filt.capturing(unet) as cap:  # two forwards in one block: only one batch can be scored
        unet(x, t, encoder_hidden_states=c)
        unet(x.flip(0), t, encoder_hidden_states=c.flip(0))
    with pytest.raises(RuntimeError, match="ran 2 UNet forwards"):
        filt.from_capture(cap)

    ckpt = copy.deepcopy(unet)
    ckpt.enable_gradient_checkpointing()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        with filt.capturing(ckpt):
            pass
    ckpt.train().requires_grad_(True)  # the hook path leaves the training forward alone: backward works
    keep = filt(ckpt, c, x, t).keep
    pred = ckpt(x, t, encoder_hidden_states=c).sample
    from audit.mitigation.training import masked_loss

    masked_loss(((pred - x) ** 2).flatten(1).mean(1), keep).backward()
    assert ckpt.conv_in.weight.grad is not None and torch.isfinite(ckpt.conv_in.weight.grad).all()

    class Gate(torch.nn.Module):  # a trainable processor (IP-Adapter, attention control): capturing would drop it
        def __init__(self):
            super().__init__()
            self.g, self.p = torch.nn.Parameter(torch.tensor(1.0)), AttnProcessor2_0()

        def __call__(self, attn, hs, ehs=None, mask=None, temb=None, **kw):
            return self.g * self.p(attn, hs, ehs, mask, temb)

    gated = copy.deepcopy(unet)
    gated.get_submodule(LAYER).set_processor(Gate())
    with pytest.raises(MitigationError, match="Gate on 1 layer.*capturing\\(\\) during the training forward"):
        with filt.capturing(gated):
            pass
    assert type(gated.get_submodule(LAYER).get_processor()).__name__ == "Gate"


def test_training_filter_checks_its_inputs_and_threshold(parts, pipe):
    from diffusers import DDPMScheduler

    from audit.mitigation.training import MemorizationFilter

    unet = parts[2]
    c, x, t = _batch()
    filt = MemorizationFilter(4.0, layers=[LAYER])
    with pytest.raises(TypeError, match="pass pipe.unet"):
        filt(pipe, c, x, t)
    with pytest.raises(KeyError, match="CLIPTextModel has no cross-attention"):
        filt(pipe.text_encoder, c, x, t)
    for bad_c, bad_x, bad_t, match in [
            (c[:2], x, t, "encoder_hidden_states has 2 samples, noisy_latents 3"),
            (c[0], x, t, r"encoder_hidden_states must be a tensor \[B, L, D\]"),
            (torch.randn(3, 77, 16), x, t, "cross_attention_dim is 32"),
            (c, x[0], t, r"noisy_latents must be a tensor \[B, C, H, W\]"),
            (c, x, t[:2], r"timesteps must be a scalar, \[1\] or \[B\] = \[3\]")]:
        with pytest.raises(ValueError, match=match):
            filt(unet, bad_c, bad_x, bad_t)
    for ok_t in (500, 500.0, torch.tensor(500), torch.tensor([500])):
        assert filt(unet, c, x, ok_t).scores.shape == (3,)
    with pytest.raises(ValueError, match="threshold must be a number"):
        filt.threshold = float("nan")
    with pytest.raises(ValueError, match="threshold must be a number"):
        filt.threshold = "4"
    filt.threshold = 1e9
    assert filt.threshold == 1e9 and filt(unet, c, x, t).dropped == 0
    with pytest.raises(ValueError, match="layers is empty"):
        MemorizationFilter(4.0, layers=[])
    assert MemorizationFilter(4.0, layers=(n for n in [LAYER])).layers == [LAYER]  # a generator, read once
    sample = DDPMScheduler(prediction_type="sample")
    assert MemorizationFilter(4.0, scheduler=sample).score == "attention_entropy"  # the scheduler is not used
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        MemorizationFilter(4.0, score="noise_magnitude", uncond_embeddings=torch.randn(1, 77, 32), scheduler=sample)

    u = torch.randn(1, 77, 32)
    v = MemorizationFilter(4.0, score="noise_magnitude", uncond_embeddings=u,
                           scheduler=DDPMScheduler(prediction_type="v_prediction"))
    with torch.no_grad():
        pred = unet(x, t, encoder_hidden_states=c).sample
    with pytest.raises(ValueError, match="model_pred \\[1, 4, 8, 8\\] must have the noisy latents' shape"):
        v(unet, c, x, t, model_pred=pred[:1])
    with pytest.raises(TypeError, match="the UNet output's .sample"):
        v(unet, c, x, t, model_pred=unet(x, t, encoder_hidden_states=c))
    for bad in (torch.tensor([10.0, 998.7, 3.0]), torch.tensor([-1, 5, 9]), torch.tensor([1000, 5, 9])):
        with pytest.raises(ValueError, match="timesteps"):
            v(unet, c, x, bad, model_pred=pred)
    assert torch.equal(v(unet, c, x, t.float(), model_pred=pred).scores, v(unet, c, x, t, model_pred=pred).scores)


def test_training_filter_on_an_sdxl_style_unet(parts):
    """The hook had no added_cond_kwargs: an SDXL UNet failed inside diffusers."""
    from diffusers import UNet2DConditionModel

    from audit.mitigation.training import MemorizationFilter

    torch.manual_seed(0)
    xl = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                              out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                              cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                              addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                              projection_class_embeddings_input_dim=80).eval()
    c = torch.randn(2, 77, 64)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    filt = MemorizationFilter(100.0)
    with pytest.raises(ValueError, match="pass added_cond_kwargs"):
        filt(xl, c, x, t)
    scores = filt(xl, c, x, t, added_cond_kwargs=added).scores
    with filt.capturing(xl) as cap:  # the same scores captured from the training forward
        xl(x, t, encoder_hidden_states=c, added_cond_kwargs=added)
    torch.testing.assert_close(filt.from_capture(cap).scores, scores, rtol=1e-5, atol=1e-7)
    assert bool(((scores > 0) & (scores <= math.log(77))).all())
    with pytest.raises(ValueError, match="SDXL UNet .* not supported"):
        MemorizationFilter(2.0, score="noise_magnitude", uncond_embeddings=torch.randn(1, 77, 64))(
            xl, c, x, t, added_cond_kwargs=added)


def test_masked_loss_float16_and_entropy_of_edge_values():
    from audit.mitigation.training import entropy_of, masked_loss

    per = torch.full((300,), 300.0, dtype=torch.float16)
    loss = masked_loss(per, torch.ones(300, dtype=torch.bool))
    assert loss.dtype == torch.float16 and float(loss) == 300.0  # a float16 sum overflowed to inf
    e = entropy_of(torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64))
    assert math.copysign(1.0, float(e[0])) == 1.0 and float(e[0]) == 0.0
    assert float(e[1]) == pytest.approx(math.log(2), abs=1e-15)


def test_a_calibration_for_generate_at_other_steps_comes_from_run_steps(model_dir, tmp_path):
    """generate --mitigate flagged needs a calibration at its --steps; `memaudit run` could only score t0 of 50
    steps, so detection at any other step count could not be calibrated."""
    import polars as pl
    from typer.testing import CliRunner

    from audit.cli import app

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nblue sky over the sea\nan old boat\nnight city street\n")
    runs = {}
    for steps in (50, 10):
        out = tmp_path / f"run{steps}"
        res = CliRunner().invoke(app, ["run", str(prompts), "--model", str(model_dir), "--device", "cpu",
                                       "--steps", str(steps), "--out", str(out)])
        assert res.exit_code == 0, res.output
        runs[steps] = json.loads((out / "manifest.json").read_text())
    sc10, sc50 = runs[10]["score_config"], runs[50]["score_config"]
    assert sc10["num_inference_steps"] == 10 and sc50["num_inference_steps"] == 50
    assert sc10["first_timestep"] == 901 and sc50["first_timestep"] == 981  # DDIM, leading spacing, offset 1
    assert not pl.read_parquet(tmp_path / "run10" / "risk.parquet")["risk"].equals(
        pl.read_parquet(tmp_path / "run50" / "risk.parquet")["risk"])
    res = CliRunner().invoke(app, ["calibrate", str(tmp_path / "run10"), "--fpr", "0.25", "-o", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    gen = ["generate", str(prompts), "--model", str(model_dir), "--device", "cpu", "--mitigate", "flagged",
           "--calibration", str(tmp_path / "c.json"), "--out"]
    res = CliRunner().invoke(app, gen + [str(tmp_path / "g10"), "--steps", "10"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "g10" / "summary.json").read_text())
    assert summary["rows"] == 4 and summary["flagged"] == 1  # the calibration's fpr 0.25 of the same 4 prompts
    res = CliRunner().invoke(app, gen + [str(tmp_path / "g50"), "--steps", "50"])
    assert res.exit_code == 2 and "num_inference_steps 10" in res.output
    res = CliRunner().invoke(app, ["run", str(prompts), "--steps", "0"])
    assert res.exit_code == 2 and "--steps must be at least 1" in res.output


def test_generate_names_the_folder_it_cannot_create(model_dir, tmp_path):
    """A generation folder whose parts/ became a file: the message named --out, not the parts/ in the way."""
    import shutil

    from audit.cli.generate import GenerateError, build_pipeline, run_generate

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    pipe, loaded = build_pipeline(str(model_dir), device="cpu", dtype="float32")
    kw = dict(steps=2, progress=False, _pipeline=(pipe, loaded))
    out = tmp_path / "out"
    run_generate(prompts, str(model_dir), out, **kw)
    shutil.rmtree(out / "parts")
    (out / "parts").write_text("not a folder")
    with pytest.raises(GenerateError, match=f"cannot create the folder {out / 'parts'} \\(FileExistsError"):
        run_generate(prompts, str(model_dir), out, **kw)


def _hand_a(unet, names, x, t, c):
    """a [B, L] per layer, mean over heads and query pixels of softmax(Q K^T * scale), from the layers' own
    projections (no audit.capture)."""
    seen, handles = {}, []
    for name in names:
        s, h = _attn2_inputs(unet, name)
        seen[name] = s
        handles.append(h)
    try:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=c)
            b = x.shape[0]
            out = {}
            for name in names:
                p = _hand_probs(unet.get_submodule(name), seen[name]["hs"], seen[name]["ehs"], 1.0, [False] * b,
                                torch.ones(b, 77, dtype=torch.bool))
                out[name] = p.mean(dim=(1, 2)).double()
    finally:
        for h in handles:
            h.remove()
    return out


def test_keep_positions_always_keeps_bos():
    """keep_positions' docstring: BOS (j = 0) is always kept, so no row is all -inf (n = 1 with mask_eos, n = 0)."""
    from audit.mitigation.inference import keep_positions

    keep = keep_positions(torch.tensor([1, 0, 3]), 5, mask_eos=True)
    assert keep.tolist() == [[True, False, False, False, False], [True, False, False, False, False],
                             [True, True, False, False, False]]


def test_unflagged_rows_keep_every_position(pipe):
    """Flagged mode, two prompts, one flagged: from step 1 the flagged prompt's rows (unconditional and
    conditional) have exactly 0 at the summary positions, the unflagged prompt's rows none (its attention is the
    unmitigated softmax: every probability > 0)."""
    from audit.mitigation import DetectAndMitigate
    from audit.mitigation.inference import prompt_lengths

    with DetectAndMitigate(pipe, threshold=None, layers=[LAYER], mode="off") as probe:
        _gen(pipe, PROMPTS, steps=2)
    e = probe.entropy
    assert e[0] != e[1]
    hi = int(e.argmax())
    # between the two entropies: a threshold at the lower one flagged both on a CPU where keeping the probabilities
    # moved that prompt's entropy by 3e-8 (4.3409041 -> 4.3409041; an AMX Xeon), so it was no longer <= threshold
    with DetectAndMitigate(pipe, threshold=float(e.min() + e.max()) / 2, layers=[LAYER]) as dm:
        dm.keep_probs = True
        _gen(pipe, PROMPTS, steps=2)
    assert dm.flagged.tolist() == [i == hi for i in range(2)]
    p = dm.probs[LAYER]  # step 1: [u0, u1, c0, c1]
    n = int(prompt_lengths(pipe.tokenizer, [PROMPTS[hi]]))
    lo = 1 - hi
    for row in (hi, 2 + hi):
        assert (p[row][..., n:] == 0).all() and (p[row][..., :n] > 0).all()
    for row in (lo, 2 + lo):
        assert (p[row] > 0).all()


def test_detection_threshold_is_strict(pipe):
    """Flagged when E > threshold (memaudit calibrate's rule): E == threshold is not flagged."""
    from audit.mitigation import DetectAndMitigate

    with DetectAndMitigate(pipe, threshold=None, layers=[LAYER], mode="off") as probe:
        _gen(pipe, PROMPTS[0], steps=1)
    with DetectAndMitigate(pipe, threshold=float(probe.entropy[0]), layers=[LAYER]) as dm:
        _gen(pipe, PROMPTS[0], steps=1)
    assert torch.equal(dm.entropy, probe.entropy) and dm.flagged.tolist() == [False]


def test_default_detection_and_filter_layer_is_the_fourth(pipe):
    """The default layer is the 4th attn2 layer in call order (the scorer's SD 1.x default)."""
    from audit.capture import cross_attention_layers
    from audit.mitigation import DetectAndMitigate
    from audit.mitigation.training import MemorizationFilter

    fourth = cross_attention_layers(pipe.unet)[3]
    assert DetectAndMitigate(pipe, threshold=1.0).detect_layers == [fourth]
    assert MemorizationFilter(threshold=1.0)._layers(pipe.unet) == [fourth]


def test_detection_entropy_and_bos_mass_average_several_layers(pipe):
    """Mode off, one step, two detection layers: a = mean of the two layers' conditional-row attention
    (recorded with keep_probs), E = -sum a log a, bos_mass = a_0."""
    from audit.capture import cross_attention_layers
    from audit.mitigation import DetectAndMitigate

    layers = cross_attention_layers(pipe.unet)
    chosen = [layers[1], layers[4]]
    with DetectAndMitigate(pipe, threshold=None, layers=chosen, mode="off") as dm:
        dm.keep_probs = True
        _gen(pipe, PROMPTS[0], steps=1)
    a = torch.stack([dm.probs[name][-1:].mean(dim=(1, 2)) for name in chosen]).mean(dim=0).double()
    torch.testing.assert_close(dm.entropy, -(a * a.log()).sum(-1), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(dm.bos_mass, a[:, 0], rtol=1e-6, atol=1e-9)


def test_training_filter_averages_several_layers(pipe):
    """Two layers: a = mean of the layers' a (from their own q/k projections), then E."""
    from audit.capture import cross_attention_layers
    from audit.mitigation.training import MemorizationFilter

    unet = pipe.unet
    layers = cross_attention_layers(unet)
    chosen = [layers[1], layers[4]]
    c = embed(pipe, ["a red cat", "night city street with old car"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([10, 900])
    hand = _hand_a(unet, chosen, x, t, c)
    a = (hand[chosen[0]] + hand[chosen[1]]) / 2
    scores = MemorizationFilter(threshold=0.0, layers=chosen)(unet, c, x, t).scores
    torch.testing.assert_close(scores, -(a * a.log()).sum(-1), rtol=1e-6, atol=1e-9)


def test_an_image_whose_entropy_is_not_finite_is_mitigated_fail_closed(pipe, monkeypatch):
    """A NaN first-step entropy (a float16 overflow in the detection layers) compared False with any threshold, so
    the image was generated unmitigated without a word; it cannot be cleared, so it is mitigated, not flagged."""
    import importlib

    from audit.mitigation import DetectAndMitigate

    ae = importlib.import_module("audit.scorers.attention_entropy")  # the module (the package's name is the function)

    with DetectAndMitigate(pipe, threshold=None, layers=[LAYER], mode="off") as dm:
        plain = _gen(pipe, PROMPTS, steps=3)
    real = ae.attention_entropy

    def first_row_overflows(a):
        e = real(a)
        e[0] = float("nan")
        return e

    monkeypatch.setattr(ae, "attention_entropy", first_row_overflows)
    with DetectAndMitigate(pipe, threshold=1e9, layers=[LAYER]) as dm2:  # nothing finite is above it
        images = _gen(pipe, PROMPTS, steps=3)
    assert math.isnan(dm2.entropy[0]) and dm2.entropy[1] == dm.entropy[1]
    assert dm2.flagged.tolist() == [False, False] and dm2.mitigated.tolist() == [True, False]
    assert abs(images[0] - plain[0]).max() > 1e-3 and abs(images[1] - plain[1]).max() < 1e-5
