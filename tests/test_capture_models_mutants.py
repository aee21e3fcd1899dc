"""Pins what the capture, the tokenizer, the tiny models and the family adapters promise where the family tests' tiny
models cannot tell: the capture processor computes what a diffusers attention layer computes whatever its options
(spatial and group norms, norm_cross, q/k norms, the mask, dropout, residual and rescaling, a 4-D input, bfloat16),
the joint (SD 3.x) capture applies the q and added-k norms in float32 and stops the forward, layers sort by numeric
index (28 PixArt blocks, 24 SD 3.x blocks), the capture refuses what it cannot capture and counts its forwards,
CLIP's byte alphabet and BPE merges are the published ones, the tiny models have SD v1's scheduler and layout, and
the adapters' notes, scheduler default, SDXL empty prompt and mask, SD 3.x first input and PixArt's learned-sigma
half are as documented. References are diffusers' own processors with a hand softmax, numpy, or hand counts."""

from __future__ import annotations

import pytest
import torch

from audit.capture import CrossAttentionCapture, IncompleteCaptureError


class _Holder(torch.nn.Module):
    """A one-layer 'UNet': the attention module under the name the capture selects."""

    def __init__(self, name: str, module: torch.nn.Module):
        super().__init__()
        self.add_module(name, module)


def _randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter redrawn N(0, 0.25), so that norms' scales and biases matter (their init is 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module.eval()


def _hooked(module: torch.nn.Module, names: tuple[str, ...], run):
    """``run()``, with the outputs of ``module``'s submodules ``names`` recorded."""
    seen = {}
    handles = [getattr(module, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach()))
               for n in names]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return out, seen


def _cross_layer(dtype=torch.float32):
    """A cross-attention layer with every option the capture mirrors: spatial norm, group norm, layer-norm of the
    text states, q and k layer norms, residual connection and an output rescale factor."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    attn = Attention(query_dim=32, cross_attention_dim=12, heads=2, dim_head=4, norm_num_groups=4, spatial_norm_dim=6,
                     qk_norm="layer_norm", cross_attention_norm="layer_norm", residual_connection=True,
                     rescale_output_factor=2.0, processor=AttnProcessor2_0())
    return _randomized(attn, 0).to(dtype)


def _cross_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 32, 3, 3, generator=g)  # 4-D: [B, C, H, W], 9 query pixels
    zq = torch.randn(2, 6, 3, 3, generator=g)  # the spatial norm's conditioning
    c = torch.randn(2, 5, 12, generator=g)
    bias = torch.zeros(2, 1, 5)
    bias[1, 0, 3:] = -10000.0  # the UNet's encoder_attention_mask bias: prompt 1 attends to its first 3 positions
    return h.to(dtype), zq.to(dtype), c.to(dtype), bias.to(dtype)


def test_cross_capture_equals_a_hand_softmax_and_its_output_the_layers_own():
    """a = mean over heads and pixels of softmax(q k^T * scale + bias), q and k as diffusers' AttnProcessor2_0
    computes them (after the spatial and group norms, norm_cross and the q/k norms); the layer's output is the
    original processor's (4-D reshape, residual, rescale)."""
    attn = _cross_layer()
    h, zq, c, bias = _cross_inputs()
    with torch.no_grad():
        ref_out, seen = _hooked(attn, ("norm_q", "norm_k"),
                                lambda: attn(h, encoder_hidden_states=c, attention_mask=bias, temb=zq))
        q, k = seen["norm_q"], seen["norm_k"]  # [B, H, N, d], [B, H, L, d]
        assert q.shape == (2, 2, 9, 4) and k.shape == (2, 2, 5, 4)
        logits = torch.einsum("bhnd,bhld->bhnl", q, k) / 2.0 + bias[:, None]  # scale 1/sqrt(4)
        e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
        expected = (e / e.sum(dim=-1, keepdim=True)).mean(dim=(1, 2))
        holder = _Holder("attn2", attn)
        with CrossAttentionCapture(holder, ["attn2"], early_exit=False) as cap:
            got = cap.run(lambda: holder.attn2(h, encoder_hidden_states=c, attention_mask=bias, temb=zq))["attn2"]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got[1, 3:].abs().max() < 1e-6 and got[0, 3:].min() > 1e-3  # the mask reached the softmax
    assert cap.output.shape == (2, 32, 3, 3)
    torch.testing.assert_close(cap.output, ref_out, rtol=0, atol=1e-5)


def test_cross_capture_of_a_bfloat16_layer_is_float32_and_its_output_bfloat16():
    attn = _cross_layer(torch.bfloat16)
    h, zq, c, bias = _cross_inputs(torch.bfloat16)
    holder = _Holder("attn2", attn)
    with torch.no_grad():
        ref_out, seen = _hooked(attn, ("norm_q", "norm_k"),
                                lambda: attn(h, encoder_hidden_states=c, attention_mask=bias, temb=zq))
        logits = seen["norm_q"].float() @ seen["norm_k"].float().transpose(-1, -2) / 2.0 + bias.float()[:, None]
        with CrossAttentionCapture(holder, ["attn2"], early_exit=False) as cap:
            got = cap.run(lambda: holder.attn2(h, encoder_hidden_states=c, attention_mask=bias, temb=zq))["attn2"]
    assert got.dtype == torch.float32 and cap.output.dtype == torch.bfloat16
    torch.testing.assert_close(got, logits.softmax(-1).mean(dim=(1, 2)), rtol=0, atol=1e-6)
    torch.testing.assert_close(cap.output.float(), ref_out.float(), rtol=0, atol=0.05)


def test_cross_capture_in_training_mode_applies_the_layers_output_dropout():
    """A training forward that goes on past the captured layer (the mitigation's capturing()) gets the layer's own
    output: the dropout of to_out included, with the same random draws as the original processor."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    attn = _randomized(Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=4, dropout=0.5,
                                 processor=AttnProcessor2_0()), 5).train()
    g = torch.Generator().manual_seed(6)
    h, c = torch.randn(2, 9, 16, generator=g), torch.randn(2, 5, 12, generator=g)
    holder = _Holder("attn2", attn)
    with torch.no_grad():
        torch.manual_seed(7)
        ref_out = attn(h, encoder_hidden_states=c)
        with CrossAttentionCapture(holder, ["attn2"], early_exit=False) as cap:
            torch.manual_seed(7)
            cap.run(lambda: holder.attn2(h, encoder_hidden_states=c))
    assert (ref_out == 0).float().mean() > 0.2  # the dropout did drop
    torch.testing.assert_close(cap.output, ref_out, rtol=0, atol=1e-5)


def test_the_record_is_detached_from_a_training_forwards_graph():
    """A training forward keeps its graph through the layer's output, not through the captured probabilities."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    attn = _randomized(Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=4,
                                 processor=AttnProcessor2_0()), 5).train()
    holder = _Holder("attn2", attn)
    h, c = torch.randn(2, 9, 16, requires_grad=True), torch.randn(2, 5, 12)
    with CrossAttentionCapture(holder, ["attn2"], early_exit=False) as cap:
        probs = cap.run(lambda: holder.attn2(h, encoder_hidden_states=c))["attn2"]
    assert cap.output.requires_grad and not probs.requires_grad and probs.grad_fn is None


def _joint_layer(dtype=torch.float32):
    """An SD 3.5-style joint attention layer (text keys through add_k_proj) with RMS q/k norms."""
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    attn = Attention(query_dim=16, cross_attention_dim=None, added_kv_proj_dim=16, dim_head=4, heads=4, out_dim=16,
                     context_pre_only=False, bias=True, qk_norm="rms_norm", eps=1e-6, processor=JointAttnProcessor2_0())
    return _randomized(attn, 2).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joint_capture_is_the_image_to_text_softmax_after_the_q_and_added_k_norms(dtype):
    """a = mean over heads and image tokens of softmax over the TEXT keys of norm_q(q) norm_added_k(k_txt)^T * scale
    (q and k as JointAttnProcessor2_0 computes them), float32 for a bfloat16 layer; the output is the layer's own."""
    attn = _joint_layer(dtype)
    g = torch.Generator().manual_seed(3)
    h, c = torch.randn(2, 9, 16, generator=g).to(dtype), torch.randn(2, 5, 16, generator=g).to(dtype)
    with torch.no_grad():
        ref_out, seen = _hooked(attn, ("norm_q", "norm_added_k"),
                                lambda: attn(hidden_states=h, encoder_hidden_states=c))
        q, k = seen["norm_q"].float(), seen["norm_added_k"].float()  # [B, H, 9, 4], [B, H, 5, 4]
        assert q.shape == (2, 4, 9, 4) and k.shape == (2, 4, 5, 4)
        logits = torch.einsum("bhnd,bhld->bhnl", q, k) / 2.0  # scale 1/sqrt(4)
        e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
        expected = (e / e.sum(dim=-1, keepdim=True)).mean(dim=(1, 2))
        holder = _Holder("attn", attn)
        with CrossAttentionCapture(holder, ["attn"], early_exit=False) as cap:
            got = cap.run(lambda: holder.attn(hidden_states=h, encoder_hidden_states=c))["attn"]
    assert got.dtype == torch.float32 and got.shape == (2, 5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    for ours, theirs in zip(cap.output, ref_out):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_joint_capture_stops_the_forward_once_its_layers_are_captured():
    attn = _joint_layer()
    holder = _Holder("attn", attn)
    h, c = torch.randn(1, 9, 16), torch.randn(1, 5, 16)
    after = []

    def forward():
        out = holder.attn(hidden_states=h, encoder_hidden_states=c)
        after.append(1)  # what the rest of the transformer would run
        return out

    with torch.no_grad(), CrossAttentionCapture(holder, ["attn"]) as cap:
        probs = cap.run(forward)
        assert after == [] and cap.output is None and probs["attn"].shape == (1, 5)
        with pytest.raises(IncompleteCaptureError, match="layer attn is a joint layer called without text states"):
            cap.run(lambda: holder.attn(hidden_states=h))


def _unet_inputs(b: int = 2):
    g = torch.Generator().manual_seed(4)
    return torch.randn(b, 4, 8, 8, generator=g), torch.tensor(981), torch.randn(b, 77, 32, generator=g)


def test_capture_refuses_no_layer_and_a_module_that_is_no_attention_layer(tiny_model):
    unet = tiny_model.unet
    with pytest.raises(KeyError, match="no cross-attention layer selected"):
        CrossAttentionCapture(unet, [])
    with pytest.raises(KeyError, match=r"not an attention layer of this UNet: conv_in\. Cross-attention layers: "
                                       r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2, "):
        CrossAttentionCapture(unet, ["conv_in"])  # a real module, but no attention processor to swap


def test_a_layer_named_twice_is_captured_once_and_still_stops_the_forward(tiny_model):
    unet, layer = tiny_model.unet, tiny_model.default_layers[0]
    x, t, c = _unet_inputs()
    with torch.no_grad(), CrossAttentionCapture(unet, [layer, layer]) as cap:
        probs = cap.run(lambda: unet(x, t, encoder_hidden_states=c).sample)
    assert cap.layers == [layer] and list(probs) == [layer] and cap.calls == {layer: 1}
    assert cap.output is None  # exited early: both names are the one layer


def test_a_self_attention_layer_is_refused_when_the_forward_reaches_it(tiny_model):
    unet = tiny_model.unet
    layer = tiny_model.default_layers[0].replace("attn2", "attn1")
    x, t, c = _unet_inputs()
    before = type(unet.get_submodule(layer).processor)
    with torch.no_grad(), CrossAttentionCapture(unet, [layer]) as cap:
        with pytest.raises(IncompleteCaptureError, match=f"layer {layer} is not a cross-attention layer"):
            cap.run(lambda: unet(x, t, encoder_hidden_states=c).sample)
    assert type(unet.get_submodule(layer).processor) is before


def test_calls_count_the_forwards_of_each_run(tiny_model):
    unet, layer = tiny_model.unet, tiny_model.default_layers[0]
    x, t, c = _unet_inputs()
    with torch.no_grad(), CrossAttentionCapture(unet, [layer], early_exit=False) as cap:
        cap.run(lambda: (unet(x, t, encoder_hidden_states=c), unet(x[:1], t, encoder_hidden_states=c[:1])))
        assert cap.calls == {layer: 2} and cap.probs[layer].shape == (1, 77)  # the last forward's
        cap.run(lambda: unet(x, t, encoder_hidden_states=c))
        assert cap.calls == {layer: 1} and cap.probs[layer].shape == (2, 77)


def test_layers_sort_by_numeric_block_index_in_28_and_24_block_transformers():
    """PixArt-alpha has 28 blocks and SD 3 Medium 24: block 10 runs after block 9, not after block 1 (the 4th
    layer, the default, is block 3). SD 3.5's image-only attn2 is no text attention."""
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

    from audit.capture import call_order_key
    from audit.models import PIXART, SD3

    assert sorted(["up_blocks.10.attn2", "up_blocks.9.attn2", "up_blocks.1.attn2"], key=call_order_key) == \
        ["up_blocks.1.attn2", "up_blocks.9.attn2", "up_blocks.10.attn2"]
    with torch.device("meta"):
        pixart = PixArtTransformer2DModel(
            sample_size=8, num_layers=28, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
            caption_channels=16, cross_attention_dim=16, out_channels=8, norm_type="ada_norm_single",
            num_embeds_ada_norm=1000)
        sd35 = SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, num_layers=24, attention_head_dim=8, num_attention_heads=2,
            caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16, out_channels=4,
            dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    assert PIXART.cross_attention_layers(pixart) == [f"transformer_blocks.{i}.attn2" for i in range(28)]
    assert PIXART.default_layers(pixart) == ["transformer_blocks.3.attn2"]
    assert SD3.cross_attention_layers(sd35) == [f"transformer_blocks.{i}.attn" for i in range(24)]
    assert SD3.default_layers(sd35) == ["transformer_blocks.3.attn"]


def test_byte_alphabet_is_gpt2_and_clips_bytes_to_unicode():
    """The published table: printable bytes (! to ~, ¡ to ¬, ® to ÿ) stand for themselves; the other 68 bytes, in
    byte order, get chr(256), chr(257), ...: NUL chr(256), newline "Ċ" (chr(266)), space "Ġ" (chr(288)), DEL the
    34th (chr(289)), the soft hyphen the 68th (chr(323))."""
    from audit.tokenizer import _byte_alphabet

    table = _byte_alphabet()
    assert len(table) == len(set(table)) == 256
    for b in (*range(33, 127), *range(161, 173), *range(174, 256)):
        assert table[b] == chr(b), b
    assert (table[0], table[10], table[32], table[127], table[173]) == (chr(256), "Ċ", "Ġ", chr(289), chr(323))


def test_merges_take_the_most_frequent_pair_first():
    """"x y" occurs in two words, every other pair in one: BPE merges it first, although ("a", "b</w>") is smaller."""
    from audit.tokenizer import learn_merges

    assert learn_merges(["xyc", "xyd", "ab"]) == [("x", "y"), ("a", "b</w>"), ("xy", "c</w>"), ("xy", "d</w>")]


def test_merges_count_each_word_once():
    """A repeated word is one word of the set: "cd" twice does not outrank "ab", and the tie goes to ("a", "b</w>")."""
    from audit.tokenizer import learn_merges

    assert learn_merges(["cd", "cd", "ab"]) == learn_merges(["ab", "cd"]) == [("a", "b</w>"), ("c", "d</w>")]


def test_clip_tokenizer_ids_and_lower_cased_words():
    """BOS id 0, EOS id 1 (also padding and unknown); words are lower-cased, so "Photo" makes "photo" one token."""
    from audit.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(["Photo", "two words"])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (0, 1, 1, 1)
    assert tok("a photo", add_special_tokens=False).input_ids[-1] == tok.get_vocab()["photo</w>"]
    # BOS, EOS, 256 bytes, 256 bytes + </w>, and photo's 4 merges (ho, hot, hoto</w>, photo</w>): no merge of the
    # phrase, which has whitespace
    assert len(tok.get_vocab()) == 2 + 256 + 256 + 4


def test_tokenize_through_a_padding_backend_keeps_the_eos_span_empty_after_truncation():
    """A fast tokenizer whose backend pads is tokenized through its own call; a truncated row's last kept token is
    EOS, with the empty span (0, 0), and the one before it is the 75th token's ("red" of the 38th "red cat ")."""
    from audit.models.base import tokenize
    from audit.tiny import TINY_WORDS
    from audit.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(TINY_WORDS)
    tok._tokenizer.enable_padding(pad_id=tok.pad_token_id, pad_token=tok.pad_token)
    t = tokenize(tok, [" ".join(["red cat"] * 50), "a dog"], 77)
    assert t.encodings is None and t.n_tokens.tolist() == [102, 4] and t.n_kept.tolist() == [77, 4]
    assert t.input_ids[0, 76] == tok.eos_token_id
    assert t.offsets[0, 75].tolist() == [37 * 8, 37 * 8 + 3] and t.offsets[0, 76].tolist() == [0, 0]
    assert t.offsets[1, :4].tolist() == [[0, 0], [0, 1], [2, 5], [0, 0]]


def test_tiny_sd1_scheduler_is_sd_v1s_ddim():
    """SD v1's DDIM: scaled-linear betas 0.00085 to 0.012 over 1000 steps, leading spacing offset by 1 (981, 961, ...,
    1 at 50 steps) and the final step's alpha the first training alpha (set_alpha_to_one False): numpy by hand."""
    import numpy as np
    from diffusers import DDIMScheduler

    from audit.tiny import SD1_SCHEDULER_CONFIG

    sch = DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG)
    sch.set_timesteps(50)
    bar = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    np.testing.assert_allclose(sch.alphas_cumprod.numpy(), bar, rtol=1e-5)
    assert sch.timesteps.tolist() == list(range(981, 0, -20))
    assert float(sch.final_alpha_cumprod) == pytest.approx(1 - 0.00085, rel=1e-6)
    assert sch.config.prediction_type == "epsilon"


def test_tiny_sd1_layout_has_sd_v1s_16_cross_attention_layers_in_its_blocks():
    from audit.capture import cross_attention_layers
    from audit.models import SD1_DEFAULT_LAYER
    from audit.tiny import tiny_components

    unet = tiny_components(layout="sd1")[2]
    expected = ([f"down_blocks.{b}.attentions.{i}.transformer_blocks.0.attn2" for b in range(3) for i in range(2)]
                + ["mid_block.attentions.0.transformer_blocks.0.attn2"]
                + [f"up_blocks.{b}.attentions.{i}.transformer_blocks.0.attn2" for b in (1, 2, 3) for i in range(3)])
    assert cross_attention_layers(unet) == expected and expected[3] == SD1_DEFAULT_LAYER


def test_tiny_text_encoder_pools_at_the_eos(tiny_model):
    """CLIP's pooled output is the last hidden state at the EOS (the text encoder knows the tokenizer's EOS id)."""
    from audit.models.base import tokenize

    tokens = tokenize(tiny_model.tokenizer, ["a red cat", "old oil painting of a house"], 77)
    with torch.no_grad():
        out = tiny_model.text_encoder(torch.from_numpy(tokens.input_ids))
    for i, n in enumerate(tokens.n_kept.tolist()):
        torch.testing.assert_close(out.pooler_output[i], out.last_hidden_state[i, n - 1], rtol=0, atol=0)


def test_fill_random_is_variance_preserving_with_unit_norms_and_position_ids():
    """Matrices and kernels N(0, 1/fan_in) (fan_in 400 for the Linear, 4 x 5 x 5 for the conv), norm scales 1, biases
    0, position ids 0..n-1; any other buffer is refused."""
    from audit.tiny import _fill_random

    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Linear(400, 300), torch.nn.LayerNorm(300), torch.nn.Conv2d(4, 50, 5))
        m.register_buffer("position_ids", torch.zeros(1, 77, dtype=torch.long))
    m = _fill_random(m, 0)
    assert float(m[0].weight.detach().std()) == pytest.approx(400 ** -0.5, rel=0.03)
    assert float(m[2].weight.detach().std()) == pytest.approx(100 ** -0.5, rel=0.05)
    assert (m[1].weight == 1).all() and (m[0].bias == 0).all() and (m[1].bias == 0).all() and (m[2].bias == 0).all()
    assert m.position_ids.tolist() == [list(range(77))] and not m.training
    with torch.device("meta"):
        bad = torch.nn.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="unexpected buffer running_mean"):
        _fill_random(bad, 0)


def test_a_tiny_model_with_a_vae_loads_as_a_diffusers_pipeline(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from audit.tiny import build_tiny_model

    root = build_tiny_model(tmp_path / "m", vae=True)
    pipe = StableDiffusionPipeline.from_pretrained(root, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae_scale_factor == 2


def test_sd2_and_sdxl_layer_notes_are_their_own_not_sd1s():
    """SD 1.x's note says "validated" for the paper's layer; SD 2.x and SDXL (its subclass) say their own note for
    any layer, the paper's module path included."""
    from audit.models import SD1_DEFAULT_LAYER, SD2, SDXL

    for adapter in (SD2, SDXL):
        for layers in ([SD1_DEFAULT_LAYER], ["down_blocks.1.attentions.1.transformer_blocks.1.attn2"]):
            assert adapter.layer_note(layers) == adapter.default_layer_note, (adapter.name, layers)
    assert SDXL.layer_note([]).endswith("not validated for SDXL")


def test_configured_scheduler_defaults_to_ddim_and_refuses_a_class_outside_the_list():
    from diffusers import DDIMScheduler

    from audit.errors import ModelError
    from audit.models.sd2 import configured_scheduler
    from audit.tiny import SD1_SCHEDULER_CONFIG

    unnamed = {k: v for k, v in SD1_SCHEDULER_CONFIG.items() if k != "_class_name"}
    sch = configured_scheduler(unnamed, 50)
    assert type(sch) is DDIMScheduler and int(sch.timesteps[0]) == 981
    with pytest.raises(ModelError, match="scheduler UniPCMultistepScheduler: memaudit builds first steps with one of "
                                         "DDIMScheduler, EulerDiscreteScheduler"):
        configured_scheduler(dict(SD1_SCHEDULER_CONFIG, _class_name="UniPCMultistepScheduler"), 50)


def test_sd3_first_input_is_the_flows_x_t_at_sigma_1():
    """x_t = sigma noise + (1 - sigma) x_0 (diffusers' scale_noise) at the first timestep, sigma 1: the noise itself,
    whatever x_0."""
    from audit.models import SD3

    sch = SD3.scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, 50)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    x_t = sch.scale_noise(torch.full_like(noise, 5.0), sch.timesteps[:1], noise)
    torch.testing.assert_close(SD3.first_input(sch, noise, sch.timesteps[0]), x_t, rtol=0, atol=1e-6)


class _FakeTransformer:
    """A PixArt transformer stand-in: records its call and returns ``out``."""

    def __init__(self, out, in_channels):
        self.out, self.calls = out, []
        self.config = type("Config", (), {"in_channels": in_channels, "out_channels": out.shape[1]})()

    def __call__(self, x, **kwargs):
        self.calls.append(kwargs)
        return (self.out,)


def test_pixart_forward_is_the_noise_half_under_learned_sigma_and_the_timestep_per_prompt():
    """As PixArtAlphaPipeline: with out_channels = 2 x in_channels the prediction is chunk(2, dim=1)[0], the first
    in_channels channels (the rest is the variance); otherwise the whole output. The timestep goes to every prompt,
    the mask as encoder_attention_mask, and None micro-conditions below 1024 px."""
    from audit.models import PIXART
    from audit.models.base import Conditioning

    out = torch.arange(2 * 8 * 2 * 2, dtype=torch.float32).view(2, 8, 2, 2)
    x, t = torch.zeros(2, 4, 2, 2), torch.tensor(999)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    cond = Conditioning(torch.zeros(2, 3, 5), mask)
    learned = _FakeTransformer(out, in_channels=4)
    assert torch.equal(PIXART.forward(learned, x, t, cond), out.chunk(2, dim=1)[0])
    assert torch.equal(PIXART.forward(_FakeTransformer(out, in_channels=8), x, t, cond), out)
    call = learned.calls[0]
    assert call["timestep"].tolist() == [999, 999] and call["encoder_attention_mask"] is mask
    assert call["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}


def test_sdxl_without_force_zeros_in_its_index_zeroes_the_empty_prompt_and_takes_a_declared_unet_mask(tmp_path):
    """force_zeros_for_empty_prompt holds unless model_index.json sets it False (diffusers' default); a declared
    unet_encoder_attention_mask reaches SDXL's conditioning: position i attended iff i < n_kept - 1."""
    import json

    import numpy as np
    from test_families import build_sdxl

    from audit.models import load_model

    root = build_sdxl(tmp_path / "sdxl")
    index = json.loads((root / "model_index.json").read_text())
    index.pop("force_zeros_for_empty_prompt", None)
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "memaudit.json").write_text(json.dumps({"unet_encoder_attention_mask": "bos_and_prompt_tokens"}))
    m = load_model(str(root), "cpu", "float32")
    with torch.no_grad():
        uncond = m.adapter.unconditional(m, m.adapter.tokenize(m, [""]))
        cond = m.adapter.encode(m, m.adapter.tokenize(m, ["a red cat", "dog"]))
    assert (uncond.embeddings == 0).all() and (uncond.added["text_embeds"] == 0).all()
    expected = np.zeros((2, 77), dtype=np.int64)
    expected[0, :4], expected[1, :2] = 1, 1  # BOS a red cat | BOS dog (EOS and padding left out)
    np.testing.assert_array_equal(cond.mask.numpy(), expected)


def test_an_unknown_layer_of_an_sd3_transformer_lists_its_joint_layers_not_its_image_attention():
    """The KeyError's candidates are the layers a capture can select: SD 3.x's joint layers (the list was empty for SD 3
    Medium, and SD 3.5's image-only attn2 layers, which fail at the first forward, for SD 3.5)."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        sd35 = SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16, out_channels=4,
            dual_attention_layers=(0, 1))
    with pytest.raises(KeyError) as err:
        CrossAttentionCapture(sd35, ["transformer_blocks.9.attn"])
    assert err.value.args[0] == ("not an attention layer of this UNet: transformer_blocks.9.attn. Cross-attention "
                                 "layers: transformer_blocks.0.attn, transformer_blocks.1.attn, "
                                 "transformer_blocks.2.attn")
