"""Stable Diffusion v1.4 architecture (from its published config values, random weights, reduced sample
size): default layer, first timestep, early exit, and float32 scores equal to a full forward's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit.capture import CrossAttentionCapture, cross_attention_layers
from audit.models import SD1_DEFAULT_LAYER, LoadedModel, default_layers
from audit.scorers import ScoreConfig, Scorer, attention_entropy, tokenize


@pytest.fixture(scope="module")
def sd1():
    from audit.tiny import sd1_components

    tokenizer, text_encoder, unet, scheduler = sd1_components(sample_size=16, text_layers=2)
    return LoadedModel(name="sd1-arch", path=None, fingerprint="random", tokenizer=tokenizer,
                       text_encoder=text_encoder, unet=unet, scheduler_config=dict(scheduler.config),
                       device=torch.device("cpu"), dtype=torch.float32, default_layers=default_layers(unet))


def test_sd1_has_16_cross_attention_layers_and_the_papers_default(sd1):
    layers = cross_attention_layers(sd1.unet)
    assert len(layers) == 16
    assert layers[3] == SD1_DEFAULT_LAYER == "down_blocks.1.attentions.1.transformer_blocks.0.attn2"
    assert sd1.default_layers == [SD1_DEFAULT_LAYER]
    assert all(sd1.unet.get_submodule(n).heads == 8 for n in layers)


def test_sd1_ddim_first_timestep_is_981(sd1):
    s = Scorer(sd1, ScoreConfig("attention_entropy", (SD1_DEFAULT_LAYER,)))
    assert s.first_timestep == 981


def test_sd1_early_exit_skips_the_rest_and_equals_full_forward(sd1):
    s = Scorer(sd1, ScoreConfig("attention_entropy", (SD1_DEFAULT_LAYER,)))
    prompts = ["a red cat on the beach", "portrait of a woman"]
    res = s.score(prompts)
    called = []
    hooks = [sd1.unet.get_submodule(n).register_forward_hook(lambda *a, n=n: called.append(n))
             for n in ("mid_block", "up_blocks.1", "conv_out", "down_blocks.2")]
    try:
        s.score(prompts)
    finally:
        for h in hooks:
            h.remove()
    assert called == []  # nothing after down_blocks.1 ran
    tokens = tokenize(sd1.tokenizer, prompts, 77)
    with torch.no_grad():
        c = s.encode(tokens.input_ids)
        with CrossAttentionCapture(sd1.unet, [SD1_DEFAULT_LAYER], early_exit=False) as cap:
            full = cap.run(lambda: sd1.unet(s.latents(prompts), s.t0, encoder_hidden_states=c).sample)
    assert cap.output.shape == (2, 4, 16, 16)
    a = full[SD1_DEFAULT_LAYER].double()
    np.testing.assert_allclose(res["attn_entropy"], attention_entropy(a).numpy(), rtol=0, atol=1e-6)


def test_sd1_scale_flop_budget_on_the_meta_device():
    """At full SD v1.4 scale (64x64 latents, 12-layer CLIP text encoder), counted on the meta device (no
    memory, no compute): the early exit at the 4th cross-attention layer runs about a fifth of the UNet's
    FLOPs. Measured: text encoder 13.3, partial UNet 164.3, full UNet 803.3 GFLOP per prompt, so 2,000
    prompts/s needs 355 TFLOP/s (36% of an H100/H200's 989 TFLOP/s dense bf16 peak)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    from audit.tiny import SD1_TEXT_ENCODER_CONFIG, SD1_UNET_CONFIG

    b = 2
    with torch.device("meta"), torch.inference_mode():
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD1_TEXT_ENCODER_CONFIG)).eval()
        unet = UNet2DConditionModel(**SD1_UNET_CONFIG).eval()
        x, t = torch.zeros(b, 4, 64, 64), torch.tensor(981)
        with FlopCounterMode(display=False) as text:
            c = text_encoder(torch.zeros(b, 77, dtype=torch.long))[0]
        with FlopCounterMode(display=False) as partial:
            with CrossAttentionCapture(unet, [SD1_DEFAULT_LAYER]) as cap:
                cap.run(lambda: unet(x, t, encoder_hidden_states=c))
        with FlopCounterMode(display=False) as full:
            unet(x, t, encoder_hidden_states=c)
    per_prompt = {k: m.get_total_flops() / b / 1e9 for k, m in (("text", text), ("partial", partial), ("full", full))}
    assert per_prompt["text"] == pytest.approx(13.3, abs=0.1)
    assert per_prompt["partial"] == pytest.approx(164.3, abs=0.5)
    assert per_prompt["full"] == pytest.approx(803.3, abs=1.0)
    assert 0.18 < per_prompt["partial"] / per_prompt["full"] < 0.23
