"""Behaviours of the mitigation code that a mutation review found no test pinned (audit/mitigation/*).

Each test names the behaviour it pins; expected values are derived by hand (token counts of short prompts,
softmax of a few logits) or by an independent computation from the layers' own projections, never copied
from the code's output. Tiny seeded models only (audit.tiny): CPU, no network."""

from __future__ import annotations

import types

import pytest
import torch

from helpers import embed, generate_np

PROMPTS = ["a red cat", "an old boat on the lake at sunset"]  # n = 5 and 10: BOS + words + first EOS
LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"


def _make_pipe(parts, unet=None):
    from diffusers import StableDiffusionPipeline

    tok, te, unet0, sch, vae = parts
    p = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet or unet0, scheduler=sch,
                                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def _gen(pipe, prompt, steps=1, seed=0, **kw):
    return generate_np(pipe, prompt, steps, seed, **kw)




def _kept(m, layer=None):
    """Key positions with any probability > 0, per UNet row, in the last forward of ``layer``."""
    return (m.probs[layer or m.layers[0]] > 0).any(dim=(1, 2)).sum(-1).tolist()


def _hand_probs(attn, hs, ehs, c1, cond, keep):
    """softmax(Q K^T * scale) in float64 from the layer's own projections, BOS logit times c1 in ``cond`` rows,
    ~keep positions -inf (independent of audit.capture)."""
    b, h = hs.shape[0], attn.heads
    q = attn.to_q(hs).view(b, -1, h, attn.to_q.out_features // h).transpose(1, 2).double()
    k = attn.to_k(ehs).view(b, -1, h, attn.to_k.out_features // h).transpose(1, 2).double()
    s = (q @ k.transpose(-1, -2)) * attn.scale
    for r in range(b):
        if cond[r]:
            s[r, :, :, 0] = s[r, :, :, 0] * c1
        s[r][:, :, ~keep[r]] = float("-inf")
    return s.softmax(-1).float()


def _rule_probs(pipe, ehs, x, **rule):
    """The mitigated probabilities of LAYER for one direct UNet call, and the hand ones' inputs."""
    from audit.mitigation.inference import Mitigation

    seen = {}
    handle = pipe.unet.get_submodule(LAYER).register_forward_pre_hook(
        lambda mod, args, kw: seen.update(hs=args[0] if args else kw["hidden_states"],
                                          ehs=kw.get("encoder_hidden_states")), with_kwargs=True)
    n_cond = rule.pop("n_cond")
    lengths = rule.pop("lengths")
    try:
        with torch.no_grad(), Mitigation(pipe, **rule) as m:
            m.keep_probs = True
            m.set_prompts(n_cond=n_cond, lengths=lengths)
            pipe.unet(x, 981, encoder_hidden_states=ehs)
    finally:
        handle.remove()
    return m.probs[LAYER], seen


def test_the_package_is_light_and_exports_the_rule():
    """``import audit.mitigation`` imports no torch or diffusers (the package docstring); its names resolve lazily
    to the submodules' objects, MitigationRule included."""
    import subprocess
    import sys

    code = "import sys, audit.mitigation; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    import audit.mitigation as pkg
    from audit.mitigation import detect, inference, training

    assert pkg.MitigationRule is inference.MitigationRule and pkg.mitigate is inference.mitigate
    assert pkg.DetectAndMitigate is detect.DetectAndMitigate and pkg.MemorizationFilter is training.MemorizationFilter
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        pkg.nothing  # noqa: B018


# --- the rule ------------------------------------------------------------------------------------------
def test_mitigated_logits_small_example_by_hand_and_input_untouched():
    """Two rows, three key positions, c1 = 2: row 0 unconditional (BOS not scaled), keeps 2 positions; row 1
    conditional (BOS logit 1 -> 2), keeps 1. The docstring: 'logits is not modified'."""
    from audit.mitigation.inference import mitigated_logits

    logits = torch.tensor([1.0, 2.0, 3.0]).expand(2, 1, 1, 3).clone()
    before = logits.clone()
    out = mitigated_logits(logits, torch.tensor([False, True]),
                           torch.tensor([[True, True, False], [True, False, False]]), 2.0)
    inf = float("-inf")
    assert out[0, 0, 0].tolist() == [1.0, 2.0, inf] and out[1, 0, 0].tolist() == [2.0, inf, inf]
    assert torch.equal(logits, before)


@pytest.mark.parametrize("c1, mask_summary", [(1.25, False), (1.0, True)])
def test_bos_scaling_alone_and_masking_alone_each_apply(pipe, c1, mask_summary):
    """The rule is the identity only when c1 = 1 AND nothing is masked: BOS scaling without the mask
    (the reference without --cross_attn_mask) still scales, the mask with c1 = 1 still masks."""
    lengths = torch.tensor([5, 10])
    c = torch.cat([embed(pipe, ["", ""]), embed(pipe, PROMPTS)])
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    got, seen = _rule_probs(pipe, c, x, c1=c1, mask_summary=mask_summary, n_cond=2, lengths=lengths)
    n = lengths.repeat(2)
    keep = (torch.arange(77)[None, :] < n[:, None]) if mask_summary else torch.ones(4, 77, dtype=torch.bool)
    cond = [False, False, True, True]
    with torch.no_grad():
        want = _hand_probs(pipe.unet.get_submodule(LAYER), seen["hs"], seen["ehs"], c1, cond, keep)
        plain = _hand_probs(pipe.unet.get_submodule(LAYER), seen["hs"], seen["ehs"], 1.0, cond,
                            torch.ones(4, 77, dtype=torch.bool))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert (got - plain).abs().max() > 1e-3  # not the unmitigated attention


def test_without_guidance_every_row_is_conditional(pipe):
    """A UNet batch of n_cond rows (guidance_scale <= 1: no unconditional half) is conditional rows only: BOS
    scaled and summary masked in every row."""
    lengths = torch.tensor([5, 10])
    c = embed(pipe, PROMPTS)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    got, seen = _rule_probs(pipe, c, x, c1=1.25, n_cond=2, lengths=lengths)
    keep = torch.arange(77)[None, :] < lengths[:, None]
    with torch.no_grad():
        want = _hand_probs(pipe.unet.get_submodule(LAYER), seen["hs"], seen["ehs"], 1.25, [True, True], keep)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    from audit.mitigation import mitigate

    with mitigate(pipe) as m:  # through the pipeline: guidance 1 gives a batch of 1
        m.keep_probs = True
        _gen(pipe, PROMPTS[0], guidance_scale=1.0)
        assert m.probs[LAYER].shape[0] == 1 and _kept(m) == [5]


def test_no_active_row_runs_the_original_processor_exactly(pipe):
    """With every row switched off (``active`` all False, as detection leaves unflagged prompts) the layer's
    ORIGINAL processor runs: the output is bit-identical to the plain UNet's (the explicit float32 path is not:
    about 1e-6 off)."""
    from audit.mitigation.inference import Mitigation

    g = torch.Generator().manual_seed(13)
    ehs, x = torch.randn(2, 77, 32, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        ref = pipe.unet(x, 981, encoder_hidden_states=ehs).sample
        with Mitigation(pipe) as m:
            m.set_prompts(1, torch.tensor([5]))
            m.active = torch.tensor([False])
            out = pipe.unet(x, 981, encoder_hidden_states=ehs).sample
    assert torch.equal(out, ref)


# --- option checks ---------------------------------------------------------------------------------
def test_mask_eos_without_mask_summary_is_refused(pipe):
    from audit.mitigation import MitigationError, mitigate
    from audit.mitigation.inference import MitigationRule

    with pytest.raises(MitigationError, match="mask_eos .* needs mask_summary=True"):
        MitigationRule(1.25, mask_summary=False, mask_eos=True)
    with pytest.raises(MitigationError, match="needs mask_summary=True"):
        mitigate(pipe, mask_summary=False, mask_eos=True)
    assert MitigationRule(1.25, mask_summary=True, mask_eos=True).mask_eos is True


def test_prompt_lengths_truncate_at_the_tokenizers_77():
    """n counts BOS + tokens + first EOS, truncated to 77 as the pipeline's own tokenization is: a 100-word
    prompt is 77, and a batch mixing it with a short prompt works."""
    from audit.mitigation.inference import prompt_lengths
    from audit.tiny import tiny_components

    tok = tiny_components(seed=0, sample_size=8)[0]
    assert prompt_lengths(tok, ["word " * 100, "a cat"]).tolist() == [77, 4]


def test_set_prompts_bounds(pipe):
    """n_cond >= 1; each count from 2 (BOS and EOS) to 77 inclusive; one count per conditional row."""
    from audit.mitigation import MitigationError
    from audit.mitigation.inference import Mitigation

    m = Mitigation(pipe)
    for n_cond, lengths, match in ((0, None, "n_cond must be a positive integer"),
                                   (1, [1], "token counts must be from 2"), (1, [78], "to 77, got \\[78\\]"),
                                   (1, [5, 6], "2 token counts for 1 conditional rows")):
        with pytest.raises(MitigationError, match=match):
            m.set_prompts(n_cond, lengths)
    m.set_prompts(2, [2, 77])  # both ends are valid
    assert m.lengths.tolist() == [2, 77] and m.n_cond == 2


def test_no_tokenizer_is_refused(pipe):
    from audit.mitigation import MitigationError, mitigate

    with pytest.raises(MitigationError, match="no tokenizer"):
        mitigate(types.SimpleNamespace(unet=pipe.unet, tokenizer=None))


# --- rows of a call ------------------------------------------------------------------------------------
def test_rows_with_several_images_and_a_list_of_negative_prompts(pipe):
    """Rows are prompt-major (diffusers repeats each prompt's embeddings num_images_per_prompt times): two prompts
    x 2 images keep [5, 5, 10, 10]; a list of negative prompts follows the same order, each unconditional row
    keeping max(n, n_negative); one negative string with 2 images applies to both."""
    from audit.mitigation import mitigate

    neg = "blurry ugly low quality photo of a dog at night"
    n_neg = len(pipe.tokenizer(neg).input_ids)  # unpadded: BOS + tokens + EOS
    n_dog = len(pipe.tokenizer("dog").input_ids)
    assert n_neg > 10 > 5 > n_dog
    with mitigate(pipe) as m:
        m.keep_probs = True
        _gen(pipe, PROMPTS, num_images_per_prompt=2, negative_prompt=[neg, "dog"])
        assert _kept(m) == [n_neg, n_neg, 10, 10, 5, 5, 10, 10]  # unconditional [max(5, n_neg), max(10, n_dog)]
        _gen(pipe, PROMPTS[0], num_images_per_prompt=2, negative_prompt=neg)
        assert _kept(m) == [n_neg, n_neg, 5, 5]


def test_unflagged_rows_keep_every_position_with_a_negative_prompt(pipe):
    """Flagged mode with a negative prompt: the unflagged prompt's unconditional row keeps every position (its
    rows are not mitigated), the flagged one's keeps max(n, n_negative)."""
    from audit.mitigation import DetectAndMitigate

    neg = "blurry ugly low quality photo of a dog at night"
    n_neg = len(pipe.tokenizer(neg).input_ids)  # unpadded: BOS + tokens + EOS
    assert n_neg > 10
    with DetectAndMitigate(pipe, threshold=None, layers=[LAYER], mode="off") as probe:
        _gen(pipe, PROMPTS, steps=2, negative_prompt=[neg, neg])
    hi = int(probe.entropy.argmax())
    e = probe.entropy  # a threshold between the two (at the lower one, float rounding may flag both)
    with DetectAndMitigate(pipe, threshold=float(e.min() + e.max()) / 2, layers=[LAYER]) as dm:
        dm.keep_probs = True
        _gen(pipe, PROMPTS, steps=2, negative_prompt=[neg, neg])
    assert dm.flagged.tolist() == [i == hi for i in range(2)]
    n = [5, 10]
    want = [77, 77, 77, 77]
    want[hi], want[2 + hi] = n_neg, n[hi]  # max(n, n_negative) = n_neg
    assert _kept(dm) == want


# --- entering and leaving ----------------------------------------------------------------------------
def test_processors_are_checked_again_on_entry(pipe):
    """A custom attn2 processor set after construction is refused when the block is entered, nothing installed."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from audit.mitigation import MitigationError, mitigate

    m = mitigate(pipe)

    class Controller(AttnProcessor2_0):
        pass

    pipe.unet.set_attn_processor(Controller())
    try:
        with pytest.raises(MitigationError, match=r"Controller on 7 layer"):
            m.__enter__()
        assert all(type(p) is Controller for p in pipe.unet.attn_processors.values())
        assert "encode_prompt" not in pipe.__dict__
    finally:
        pipe.unet.set_attn_processor(AttnProcessor2_0())


def test_an_instance_encode_prompt_is_restored_on_exit(pipe):
    """A pipeline whose encode_prompt is already an instance attribute (a user's wrapper) gets that wrapper back
    on exit, and the block's calls go through it."""
    from audit.mitigation import mitigate

    calls = []
    cls_encode = type(pipe).encode_prompt

    def mine(*args, **kwargs):
        calls.append(1)
        return cls_encode(pipe, *args, **kwargs)

    pipe.encode_prompt = mine
    with mitigate(pipe) as m:
        m.keep_probs = True
        _gen(pipe, PROMPTS[0])
        assert _kept(m) == [5, 5] and calls == [1]
    assert pipe.__dict__["encode_prompt"] is mine


def test_one_mitigation_object_can_be_entered_again_after_exit(pipe):
    """Entering is refused only while the object is entered: after its exit, a second block works and restores."""
    from audit.mitigation import mitigate

    before = dict(pipe.unet.attn_processors)
    m = mitigate(pipe)
    for _ in range(2):
        with m:
            m.keep_probs = True
            _gen(pipe, PROMPTS[0])
            assert _kept(m) == [5, 5]
        assert all(pipe.unet.attn_processors[k] is before[k] for k in before)
        assert "encode_prompt" not in pipe.__dict__


def test_a_failure_while_installing_is_raised_as_is_and_everything_restored(pipe):
    """An exception while the processors are being installed (here on the 3rd layer; a KeyboardInterrupt in real
    life) reaches the caller unchanged, and nothing stays installed. It used to be replaced by a MitigationError
    saying the processors 'were replaced inside the mitigation block' (the block never ran)."""
    from audit.mitigation import mitigate
    from audit.mitigation.inference import _MitigationProcessor

    m = mitigate(pipe)
    module = pipe.unet.get_submodule(m.layers[2])
    real = module.set_processor

    def fail(processor, *a, **k):
        if isinstance(processor, _MitigationProcessor):
            raise KeyboardInterrupt("interrupted while installing")
        return real(processor, *a, **k)

    before = dict(pipe.unet.attn_processors)
    module.set_processor = fail
    try:
        with pytest.raises(KeyboardInterrupt, match="interrupted while installing"):
            m.__enter__()
    finally:
        del module.set_processor
    assert all(pipe.unet.attn_processors[k] is before[k] for k in before)
    assert "encode_prompt" not in pipe.__dict__
    with m:  # and the object is usable afterwards
        pass


# --- detect and mitigate -------------------------------------------------------------------------------
def test_detect_refuses_an_unknown_mode_and_flagged_without_threshold(pipe):
    from audit.mitigation import DetectAndMitigate, MitigationError

    with pytest.raises(MitigationError, match="mode 'sometimes': choose off, always or flagged"):
        DetectAndMitigate(pipe, threshold=1.0, mode="sometimes")
    with pytest.raises(MitigationError, match="mode 'flagged' needs a threshold"):
        DetectAndMitigate(pipe)


def test_off_mode_with_a_threshold_flags_but_mitigates_nothing(pipe):
    """mode "off" is detection only: a threshold below every entropy flags every prompt, nothing is mitigated,
    and the images are those of the same block without a threshold."""
    from audit.mitigation import DetectAndMitigate

    with DetectAndMitigate(pipe, threshold=None, layers=[LAYER], mode="off") as ref:
        want = _gen(pipe, PROMPTS, steps=2)
    with DetectAndMitigate(pipe, threshold=-1.0, layers=[LAYER], mode="off") as dm:
        got = _gen(pipe, PROMPTS, steps=2)
    assert ref.flagged.tolist() == [False, False]
    assert dm.flagged.tolist() == [True, True] and dm.mitigated.tolist() == [False, False]
    assert (got == want).all()


@pytest.mark.parametrize("mode", ["always", "flagged"])
def test_an_identity_rule_mitigates_no_row(pipe, mode):
    """c1 = 1 without masking changes nothing: ``mitigated`` is all False whatever is flagged."""
    from audit.mitigation import DetectAndMitigate

    with DetectAndMitigate(pipe, threshold=-1.0, layers=[LAYER], c1=1.0, mask_summary=False, mode=mode) as dm:
        _gen(pipe, PROMPTS, steps=2)
    assert dm.mitigated.tolist() == [False, False]
    if mode == "flagged":
        assert dm.flagged.tolist() == [True, True]


def test_a_detection_layer_that_never_reported_stops_the_call_at_its_second_step(pipe):
    """The detection layer's processor replaced inside the block: the first forward records nothing, and the
    second forward raises "first-step capture incomplete" (the call would otherwise run on unmitigated, its
    detection None); the block then fails on exit for the replaced processor."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from audit.mitigation import DetectAndMitigate, MitigationError

    calls, handle = [], pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(MitigationError, match="replaced inside the mitigation block"):
            with DetectAndMitigate(pipe, threshold=1.0, layers=[LAYER]) as dm:
                pipe.unet.get_submodule(LAYER).set_processor(AttnProcessor2_0())
                with pytest.raises(MitigationError, match=f"first-step capture incomplete: no attention from {LAYER}"):
                    _gen(pipe, PROMPTS[0], steps=3)
                assert len(calls) == 2 and dm.flagged is None
    finally:
        handle.remove()
        pipe.unet.set_attn_processor(AttnProcessor2_0())


def test_exit_removes_both_hooks(pipe):
    from audit.mitigation import DetectAndMitigate

    pre, post = len(pipe.unet._forward_pre_hooks), len(pipe.unet._forward_hooks)
    with DetectAndMitigate(pipe, threshold=1.0, layers=[LAYER]):
        assert len(pipe.unet._forward_hooks) == post + 1
    assert (len(pipe.unet._forward_pre_hooks), len(pipe.unet._forward_hooks)) == (pre, post)


def _three_layer_unet():
    """A UNet with 3 attn2 layers in call order: mid_block, up_blocks.1.attentions.0, up_blocks.1.attentions.1."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def test_default_layer_of_a_unet_with_fewer_than_four_is_the_last(parts):
    """Fewer than 4 attn2 layers: the default detection and filter layer is the last in call order."""
    from audit.capture import cross_attention_layers
    from audit.mitigation import DetectAndMitigate
    from audit.mitigation.training import MemorizationFilter

    unet = _three_layer_unet()
    layers = cross_attention_layers(unet)
    assert layers == ["mid_block.attentions.0.transformer_blocks.0.attn2",
                      "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                      "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]
    assert DetectAndMitigate(_make_pipe(parts, unet), threshold=1.0).detect_layers == [layers[2]]
    assert MemorizationFilter(threshold=1.0)._layers(unet) == [layers[2]]


def test_detection_calibration_refusals():
    """Another model's fingerprint, another scorer, several noise draws, other steps, another t0: each refused."""
    from audit.mitigation import MitigationError
    from audit.mitigation.detect import check_detection_calibration

    ok = {"model": {"fingerprint": "F"}, "score_config": {"scorer": "attention_entropy", "layers": ["L"],
                                                          "noise_draws": 1, "num_inference_steps": 10,
                                                          "first_timestep": 901}}
    assert check_detection_calibration(ok, 10, "F", 901) == ["L"]
    sc = ok["score_config"]
    for cal, steps, fp, t0, match in (
            (ok, 10, "G", 901, r"made for another model \[F\], not this one \[G\]"),
            ({**ok, "score_config": {**sc, "scorer": "bos_mass"}}, 10, "F", 901, "is for scorer 'bos_mass'"),
            ({**ok, "score_config": {**sc, "noise_draws": 4}}, 10, "F", 901, "averages 4 noise draws"),
            (ok, 50, "F", 901, "made at num_inference_steps 10"),
            (ok, 10, "F", 981, "scored at first timestep 901")):
        with pytest.raises(MitigationError, match=match):
            check_detection_calibration(cal, steps, fp, t0)


# --- training filter ---------------------------------------------------------------------------------
def _hand_a(unet, names, x, t, c):
    """a [B, L] per layer from the layers' own projections (no audit.capture)."""
    seen, handles = {}, []
    for name in names:
        seen[name] = {}
        handles.append(unet.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, kw, s=seen[name]: s.update(hs=args[0] if args else kw["hidden_states"],
                                                         ehs=kw.get("encoder_hidden_states")), with_kwargs=True))
    try:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=c)
            b = x.shape[0]
            return {n: _hand_probs(unet.get_submodule(n), seen[n]["hs"], seen[n]["ehs"], 1.0, [False] * b,
                                   torch.ones(b, 77, dtype=torch.bool)).mean(dim=(1, 2)).double() for n in names}
    finally:
        for h in handles:
            h.remove()


def test_from_capture_averages_several_layers(parts):
    """capturing() + from_capture() with two layers: a = mean of the two layers' a, E = -sum a log a."""
    from audit.capture import cross_attention_layers
    from audit.mitigation.training import MemorizationFilter

    unet = parts[2]
    chosen = [cross_attention_layers(unet)[i] for i in (1, 4)]
    g = torch.Generator().manual_seed(14)
    c, x, t = torch.randn(2, 77, 32, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    hand = _hand_a(unet, chosen, x, t, c)
    a = (hand[chosen[0]] + hand[chosen[1]]) / 2
    filt = MemorizationFilter(threshold=0.0, layers=chosen)
    with torch.no_grad(), filt.capturing(unet) as cap:
        unet(x, t, encoder_hidden_states=c)
    torch.testing.assert_close(filt.from_capture(cap).scores, -(a * a.log()).sum(-1), rtol=1e-5, atol=1e-7)


def test_from_capture_without_a_forward_is_refused(parts):
    from audit.mitigation.training import MemorizationFilter

    filt = MemorizationFilter(threshold=1.0, layers=[LAYER])
    with filt.capturing(parts[2]) as cap:
        pass
    with pytest.raises(RuntimeError, match=f"no attention captured from {LAYER}"):
        filt.from_capture(cap)


def test_noise_magnitude_uses_the_given_model_pred_and_the_uncond_mask(parts):
    """d = ||model_pred - eps(x_t, c_empty)||: the given training prediction is used as is (not recomputed), and
    with an encoder_attention_mask the unconditional forward takes uncond_attention_mask."""
    from audit.mitigation.training import MemorizationFilter

    unet = parts[2]
    g = torch.Generator().manual_seed(15)
    c, x, t = torch.randn(2, 77, 32, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    u = torch.randn(1, 77, 32, generator=g)
    m_c = (torch.arange(77) < 6).long().expand(2, -1)
    m_u = (torch.arange(77) < 2).long()[None]
    with torch.no_grad():
        pred = unet(x, t, encoder_hidden_states=c, encoder_attention_mask=m_c).sample + 0.5
        unc = unet(x, t, encoder_hidden_states=u.expand(2, -1, -1), encoder_attention_mask=m_u.expand(2, -1)).sample
    want = (pred - unc).flatten(1).norm(dim=1).double()
    filt = MemorizationFilter(float("inf"), score="noise_magnitude", uncond_embeddings=u, uncond_attention_mask=m_u)
    got = filt(unet, c, x, t, model_pred=pred, encoder_attention_mask=m_c).scores
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="construct the filter with uncond_attention_mask"):
        MemorizationFilter(1.0, score="noise_magnitude", uncond_embeddings=u)(unet, c, x, t,
                                                                            encoder_attention_mask=m_c)


def test_training_filter_constructor_and_uncond_refusals(parts):
    from audit.mitigation.training import MemorizationFilter

    unet = parts[2]
    c, x, t = torch.randn(3, 77, 32), torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="noise_magnitude needs uncond_embeddings"):
        MemorizationFilter(2.0, score="noise_magnitude")
    with pytest.raises(ValueError, match=r"uncond_embeddings must be \[1, L, D\] or \[B, L, D\], got shape \[77, 32\]"):
        MemorizationFilter(2.0, score="noise_magnitude", uncond_embeddings=torch.randn(77, 32))
    with pytest.raises(ValueError, match="threshold must be a number .*got None"):
        MemorizationFilter(None)
    with pytest.raises(ValueError, match=r"uncond_embeddings \[2, 77, 32\] do not fit"):
        MemorizationFilter(2.0, score="noise_magnitude", uncond_embeddings=torch.randn(2, 77, 32))(unet, c, x, t)
