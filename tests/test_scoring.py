"""Exact checks of the score on a tiny seeded model (DESIGN.md "The score"; issue 2 "Correctness")."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from audit.capture import CrossAttentionCapture, IncompleteCaptureError, cross_attention_layers
from audit.scorers import ScoreConfig, Scorer, attention_entropy, prompt_seed, tokenize

PROMPTS = ["a red cat", "a photo of a dog on the beach at sunset", "🎨🎨", "東京の夜景", "old oil painting of a house",
           "a blue car", "portrait of a woman in the city"]


def test_entropy_uniform_onehot_and_zeros():
    L = 77
    uniform = torch.full((L,), 1.0 / L, dtype=torch.float64)
    assert attention_entropy(uniform).item() == pytest.approx(math.log(L), abs=1e-12)
    onehot = torch.zeros(L, dtype=torch.float64)
    onehot[0] = 1.0
    assert attention_entropy(onehot).item() == 0.0
    half = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    value = attention_entropy(half)
    assert not torch.isnan(value) and value.item() == pytest.approx(math.log(2))
    # numpy path gives the same numbers
    assert attention_entropy(np.array([0.5, 0.5, 0.0])) == pytest.approx(math.log(2))
    assert attention_entropy(np.full(L, 1.0 / L)) == pytest.approx(math.log(L))
    # a negative entry is no probability: NaN from both paths (numpy dropped it: 0.653 for this row), per row
    bad = [[0.5, 0.6, -0.1], [0.25, 0.25, 0.5]]
    for value in (attention_entropy(torch.tensor(bad, dtype=torch.float64)).numpy(), attention_entropy(bad)):
        assert np.isnan(value[0]) and value[1] == pytest.approx(1.5 * math.log(2), abs=1e-12)
    half32 = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float32)
    assert attention_entropy(half32).dtype == torch.float32
    assert attention_entropy([[0.5, 0.5, 0.0]]).dtype == np.float64


def test_sd1_layout_default_layer_and_first_timestep(scorer, tiny_model):
    layers = cross_attention_layers(tiny_model.unet)
    assert layers[0].startswith("down_blocks.0") and layers[2].startswith("mid_block")  # call order
    assert tiny_model.default_layers == [layers[3]]
    assert scorer.first_timestep == 981  # DDIM, SD v1 scheduler config, 50 steps


def test_tokenize_truncation_keeps_eos_and_true_length(tiny_model):
    tok = tiny_model.tokenizer
    long_prompt = " ".join(["cat"] * 120)
    t = tokenize(tok, ["a red cat", long_prompt], 77)
    assert t.input_ids.shape == (2, 77)
    assert t.input_ids[0, 0] == tok.bos_token_id and t.input_ids[0, 4] == tok.eos_token_id
    assert t.n_tokens.tolist() == [5, 122]
    assert t.input_ids[1, 76] == tok.eos_token_id and t.n_kept.tolist() == [5, 77]
    ref = tok([long_prompt], padding="max_length", max_length=77, truncation=True)["input_ids"][0]
    assert t.input_ids[1].tolist() == ref  # same as the SD pipelines' call


def _recompute_probs(unet, layer, run_forward):
    """softmax(Q K^T * scale) from the layer's own projections, captured with forward hooks."""
    attn = unet.get_submodule(layer)
    seen = {}
    h1 = attn.to_q.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o.detach()))
    h2 = attn.to_k.register_forward_hook(lambda m, i, o: seen.__setitem__("k", o.detach()))
    try:
        run_forward()
    finally:
        h1.remove()
        h2.remove()
    b, n, inner = seen["q"].shape
    d = inner // attn.heads
    q = seen["q"].view(b, n, attn.heads, d).transpose(1, 2)
    k = seen["k"].view(b, -1, attn.heads, d).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # [B, H, N, L]


def _inputs(scorer, prompts):
    tokens = tokenize(scorer.model.tokenizer, prompts, 77)
    with torch.no_grad():
        c = scorer.encode(tokens.input_ids)
    return scorer.latents(prompts), scorer.t0, c


def test_captured_probabilities_equal_recomputed_softmax(scorer, tiny_model):
    unet = tiny_model.unet
    layer = tiny_model.default_layers[0]
    x, t, c = _inputs(scorer, PROMPTS[:3])
    with torch.no_grad():
        with CrossAttentionCapture(unet, [layer], early_exit=False) as cap:
            got = cap.run(lambda: unet(x, t, encoder_hidden_states=c).sample)[layer]
        ref = _recompute_probs(unet, layer, lambda: unet(x, t, encoder_hidden_states=c))
    assert got.shape == (3, 77) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref.mean(dim=(1, 2)), rtol=0, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=-1), torch.ones(3), rtol=0, atol=1e-5)


def test_early_exit_equals_full_forward_and_skips_the_rest(scorer, tiny_model):
    unet = tiny_model.unet
    layers = cross_attention_layers(unet)
    chosen = [layers[1], layers[3]]
    x, t, c = _inputs(scorer, PROMPTS)
    calls = []
    hook = unet.conv_out.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            with CrossAttentionCapture(unet, chosen, early_exit=False) as cap:
                full = cap.run(lambda: unet(x, t, encoder_hidden_states=c).sample)
            assert len(calls) == 1
            with CrossAttentionCapture(unet, chosen, early_exit=True) as cap:
                early = cap.run(lambda: unet(x, t, encoder_hidden_states=c).sample)
            assert cap.output is None and len(calls) == 1  # conv_out never ran
    finally:
        hook.remove()
    for name in chosen:
        torch.testing.assert_close(early[name], full[name], rtol=0, atol=0)


def test_processors_restored_after_capture(tiny_model):
    unet = tiny_model.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with CrossAttentionCapture(unet, tiny_model.default_layers):
        assert any(type(v).__name__ == "_CaptureProcessor" for v in unet.attn_processors.values())
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_probability_flags_only_its_prompt(tiny_model, bad):
    """The per-prompt flag is read on the mean over heads and queries: one non-finite probability in one head
    of one prompt flags that prompt and no other (float32 and float16 probabilities)."""
    layer = tiny_model.default_layers[0]
    for dtype in (torch.float32, torch.float16):
        probs = torch.softmax(torch.randn(3, 2, 16, 77, generator=torch.Generator().manual_seed(0)), -1).to(dtype)
        probs[1, 1, 5, 3] = bad
        cap = CrossAttentionCapture(tiny_model.unet, [layer])
        cap._record(layer, probs)
        assert cap.nonfinite[layer].tolist() == [False, True, False]
        assert torch.allclose(cap.probs[layer][0].float(), probs[0].float().mean(dim=(0, 1)), atol=1e-3)


def test_replaced_processor_fails_loudly(scorer, tiny_model):
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = tiny_model.unet
    layer = tiny_model.default_layers[0]
    x, t, c = _inputs(scorer, PROMPTS[:2])
    with CrossAttentionCapture(unet, [layer]) as cap:
        unet.get_submodule(layer).set_processor(AttnProcessor2_0())  # someone swaps it back
        with pytest.raises(IncompleteCaptureError, match=layer):
            cap.run(lambda: unet(x, t, encoder_hidden_states=c).sample)


def test_unknown_layer_lists_candidates(tiny_model):
    with pytest.raises(KeyError, match="down_blocks.0.attentions.0.transformer_blocks.0.attn2"):
        CrossAttentionCapture(tiny_model.unet, ["down_blocks.9.attn2"])


def test_score_alone_equals_in_batch_any_order_and_across_runs(scorer, tiny_model):
    target = PROMPTS[1]
    alone = scorer.score([target])
    batch = scorer.score(PROMPTS)
    shuffled = list(reversed(PROMPTS))
    again = Scorer(tiny_model, scorer.config).score(shuffled)
    i, j = PROMPTS.index(target), shuffled.index(target)
    for key in ("attn_entropy", "bos_mass"):
        assert abs(alone[key][0] - batch[key][i]) <= 1e-6
        assert abs(alone[key][0] - again[key][j]) <= 1e-6
    # distinct prompts get distinct scores (the score depends on the text)
    assert len(set(np.round(batch["attn_entropy"], 9))) == len(PROMPTS)


def test_score_matches_formula_from_capture(scorer, tiny_model):
    """risk == entropy of the head/pixel-mean attention, BOS mass == a_0, with K noise draws averaged."""
    cfg = ScoreConfig("attention_entropy", tuple(tiny_model.default_layers), noise_draws=3, seed=7)
    s = Scorer(tiny_model, cfg)
    res = s.score(PROMPTS[:2])
    x = s.latents(PROMPTS[:2])  # [2*3, C, H, W]
    tokens = tokenize(tiny_model.tokenizer, PROMPTS[:2], 77)
    with torch.no_grad():
        c = s.encode(tokens.input_ids).repeat_interleave(3, dim=0)
        p = _recompute_probs(tiny_model.unet, cfg.layers[0], lambda: tiny_model.unet(x, s.t0, encoder_hidden_states=c))
    a = p.mean(dim=(1, 2)).view(2, 3, 77).mean(dim=1).double()
    expected = -(a * torch.log(a)).sum(dim=-1)
    np.testing.assert_allclose(res["attn_entropy"], expected.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(res["bos_mass"], a[:, 0].numpy(), rtol=0, atol=1e-7)
    assert (res["risk"] == res["attn_entropy"]).all()


def test_noise_is_seeded_by_prompt_and_run_seed(scorer):
    a = scorer.latents(["a red cat", "a blue car"])
    b = scorer.latents(["a blue car", "a red cat"])
    torch.testing.assert_close(a[0], b[1], rtol=0, atol=0)
    assert prompt_seed(0, "a red cat") != prompt_seed(1, "a red cat")
    assert prompt_seed(0, "a red cat") == prompt_seed(0, "a red cat")


def test_trigger_tokens_exclude_bos_eos_padding(scorer, tiny_model):
    tokens = tokenize(tiny_model.tokenizer, ["a red cat sitting"], 77)
    mass = np.zeros((1, 77), dtype=np.float32)
    mass[0, 0], mass[0, 2], mass[0, 3], mass[0, 10] = 0.9, 0.05, 0.03, 0.5  # BOS and padding big
    trig = scorer.trigger_tokens(tokens, mass)[0]
    n_prompt = int(tokens.n_kept[0]) - 2
    assert len(trig) == min(5, n_prompt)
    assert [t["position"] for t in trig[:2]] == [2, 3]
    assert trig[0]["token"] == "red" and trig[0]["mass"] == pytest.approx(0.05)
    assert all(1 <= t["position"] <= n_prompt for t in trig)


def test_trigger_tokens_spell_whole_characters(scorer, tiny_model):
    """Byte-level pieces of one character (🎨 is 4 tokens here, é 2) form one entry with the summed mass,
    so no trigger token is a lone byte shown as U+FFFD."""
    prompts = ["🎨 cat", "café au lait", "東京", "مرحبا بالعالم"]
    tokens = tokenize(tiny_model.tokenizer, prompts, 77)
    mass = np.full((len(prompts), 77), 0.01, dtype=np.float32)
    mass[0, 1:5] = [0.1, 0.01, 0.02, 0.03]  # the emoji's four byte tokens; "cat" at 5
    mass[0, 5] = 0.15
    trig = scorer.trigger_tokens(tokens, mass)
    assert [(t["token"], t["position"]) for t in trig[0]] == [("🎨", 1), ("cat", 5)]
    assert trig[0][0]["mass"] == pytest.approx(0.16) and trig[0][1]["mass"] == pytest.approx(0.15)
    assert ("é", 4) in [(t["token"], t["position"]) for t in trig[1]]
    assert {t["token"] for t in trig[2]} == {"東", "京"}
    assert all("\ufffd" not in t["token"] for entries in trig for t in entries)
    assert {t["token"] for t in trig[3]} <= set("مرحبا بالعالم")


def test_the_tokens_a_normalizer_makes_of_one_character_are_one_entry(scorer, tiny_model):
    """CLIP's normalizer makes "İ" "i" and a combining dot, each a valid string with the span of "İ" (or the dot's
    byte-level pieces, by vocabulary): they were two trigger entries with one span."""
    prompt = "CAT İ RED cat"
    tokens = tokenize(tiny_model.tokenizer, [prompt], 77)
    spans = tokens.offset_mapping()[0]
    pieces = [p for p in range(1, int(tokens.n_kept[0]) - 1) if prompt[spans[p][0]:spans[p][1]] == "İ"]
    assert len(pieces) >= 2, pieces  # the case this is about ("i", then the dot: one token or its bytes)
    mass = np.full((1, 77), 0.01, dtype=np.float32)
    mass[0, pieces] = 0.5 / len(pieces)
    trig = scorer.trigger_tokens(tokens, mass)[0]
    assert prompt[trig[0]["start"]:trig[0]["end"]] == "İ" and trig[0]["position"] == pieces[0]
    assert trig[0]["mass"] == pytest.approx(0.5)
    assert len({(t["start"], t["end"]) for t in trig}) == len(trig)


def test_trigger_tokens_carry_exact_character_spans(scorer, tiny_model):
    """Each entry's [start, end) comes from the fast tokenizer's offset mapping: the span of that very token
    (a repeated word at each of its places, punctuation, case kept in the prompt), the union of a character's
    byte-level pieces, and nothing past truncation at 77 tokens."""
    assert tiny_model.tokenizer.is_fast
    prompts = ["A Red cat, red cat!", "🎨 cat", " ".join(["dog"] * 90) + " RED"]
    tokens = tokenize(tiny_model.tokenizer, prompts, 77)
    mass = np.zeros((3, 77), dtype=np.float32)
    mass[0, 1:7] = [0.1, 0.2, 0.3, 0.05, 0.4, 0.35]  # a Red cat , red cat
    mass[1, 1:6] = [0.1, 0.01, 0.02, 0.03, 0.15]  # the emoji's four byte tokens, then cat
    mass[2, 1:76] = np.linspace(0.01, 0.5, 75)  # the last kept dogs weigh most
    assert tokens.encodings is not None and tokens.offsets is None  # spans read only where asked
    trig = scorer.trigger_tokens(tokens, mass)
    spans = [(t["token"], t["position"], t["start"], t["end"]) for t in trig[0]]
    assert spans == [("red", 5, 11, 14), ("cat", 6, 15, 18), ("cat", 3, 6, 9), ("red", 2, 2, 5), ("a", 1, 0, 1)]
    assert [prompts[0][t["start"]:t["end"]] for t in trig[0]] == ["red", "cat", "cat", "Red", "A"]
    assert [(t["token"], t["start"], t["end"]) for t in trig[1]] == [("🎨", 0, 1), ("cat", 2, 5)]
    assert [t["position"] for t in trig[2]] == [75, 74, 73, 72, 71]
    assert [(t["start"], t["end"]) for t in trig[2]] == [(4 * (p - 1), 4 * (p - 1) + 3) for p in (75, 74, 73, 72, 71)]
    # without offsets (a slow tokenizer) the spans are null and the rest unchanged
    bare = scorer.trigger_tokens(dataclasses.replace(tokens, encodings=None), mass)
    # the offset mapping as an array (the tokenizer's own call) gives the same entries as the encodings
    array = dataclasses.replace(tokens, offsets=tokens.offset_mapping(), encodings=None)
    assert scorer.trigger_tokens(array, mass) == trig
    assert [(t["token"], t["position"], t["start"]) for t in bare[0]] == [(t[0], t[1], None) for t in spans]


def test_noise_magnitude_scorer_formula(tiny_model):
    cfg = ScoreConfig("noise_magnitude", tuple(tiny_model.default_layers), noise_draws=2)
    s = Scorer(tiny_model, cfg)
    res = s.score(PROMPTS[:2])
    x = s.latents(PROMPTS[:2])
    tokens = tokenize(tiny_model.tokenizer, PROMPTS[:2] + [""], 77)
    with torch.no_grad():
        c = s.encode(tokens.input_ids)
        cond = tiny_model.unet(x, s.t0, encoder_hidden_states=c[:2].repeat_interleave(2, dim=0)).sample
        unc = tiny_model.unet(x, s.t0, encoder_hidden_states=c[2:].expand(4, -1, -1)).sample
    mag = (cond - unc).flatten(1).norm(dim=1).view(2, 2).mean(dim=1)
    np.testing.assert_allclose(res["risk"], mag.double().numpy(), rtol=1e-5)
    assert np.isfinite(res["attn_entropy"]).all()  # attention is reported too


def test_tokens_take_copies_the_rows_of_every_array_and_list():
    """A short batch is padded with copies of a row's tokens (Tokens.take) instead of tokenizing its prompt again:
    every array's and list's rows follow, the families' extras too (SDXL's second ids, SD 3.x's prompts)."""
    from audit.models.base import Tokens

    ids = np.arange(6).reshape(3, 2)
    t = Tokens(ids, np.array([5, 6, 7]), np.array([2, 2, 1]), ids % 2, {"input_ids_2": ids * 10, "prompts": ["a", "b", "c"]},
               np.arange(12).reshape(3, 2, 2), ["e0", "e1", "e2"])
    u = t.take([0, 2, 2])
    np.testing.assert_array_equal(u.input_ids, [[0, 1], [4, 5], [4, 5]])
    assert u.n_tokens.tolist() == [5, 7, 7] and u.n_kept.tolist() == [2, 1, 1]
    np.testing.assert_array_equal(u.attention_mask, [[0, 1], [0, 1], [0, 1]])
    np.testing.assert_array_equal(u.extra["input_ids_2"], [[0, 10], [40, 50], [40, 50]])
    assert u.extra["prompts"] == ["a", "c", "c"] and u.encodings == ["e0", "e2", "e2"]
    np.testing.assert_array_equal(u.offsets[:, 0, 0], [0, 8, 8])
    assert Tokens(ids, ids[:, 0], ids[:, 0]).take([1]).attention_mask is None
    with pytest.raises(TypeError, match="cannot take rows of int"):
        Tokens(ids, ids[:, 0], ids[:, 0], extra={"n": 3}).take([0])
