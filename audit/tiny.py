"""Tiny seeded Stable-Diffusion-architecture models built from configs (no download), for tests and benchmarks.

The components follow SD v1's conventions (``UNet2DConditionModel`` with cross-attention, a causal
``CLIPTextModel``, a CLIP-convention tokenizer padded to 77, SD v1's DDIM scheduler configuration) at a
size that runs in milliseconds on a CPU. Weights are random (seeded): such a model exercises the code
paths, not the science; the lab model (``audit.lab``) is the one with measured memorization.

Owns the test-sized components. Must not import scorers, engines or outputs (tests and benchmarks build
models with it).
"""

from __future__ import annotations

import json
from pathlib import Path

SD1_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
}

TINY_WORDS = (
    "a an the of on in with and at by photo painting portrait red blue green yellow black white cat dog "
    "man woman city street beach sunset sunrise mountain lake river forest house car boat tree flower sky "
    "night light dark old new small big poster cover art style oil canvas"
).split()


def write_model_index(root: Path, unet_class: str = "UNet2DConditionModel") -> None:
    """Write a diffusers ``model_index.json`` naming the four components memaudit loads."""
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", unet_class],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def tiny_components(seed: int = 0, sample_size: int = 8, words=TINY_WORDS, layout: str = "tiny"):
    """Return ``(tokenizer, text_encoder, unet, scheduler)``: a seeded tiny SD-architecture model.

    ``layout="tiny"``: 2 cross-attention down blocks (16, 32 channels), a cross-attention mid block and 2
    cross-attention up blocks: 7 ``attn2`` layers, 2 and 4 heads, cross-attention dim 32.
    ``layout="sd1"``: SD v1's block layout (3 cross-attention down blocks and a plain one, 2 layers per
    block, the mirror-image up blocks: 16 ``attn2`` layers, the 4th being
    ``down_blocks.1.attentions.1.transformer_blocks.0.attn2``) with 8-16 channels, so that the early exit
    skips as much of the UNet as it does in SD v1.
    Text encoder: 2-layer causal CLIP, hidden size 32, 77 positions.
    Seeded on a fork of torch's CPU random state: the caller's own random draws are not changed by building one.
    """
    import torch
    from diffusers import DDIMScheduler

    from audit.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(words)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=32, seed=seed)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was (a notebook's draws)
        torch.manual_seed(seed + 1)
        unet = _tiny_unet(layout, sample_size)
    scheduler = DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG)
    return tokenizer, text_encoder, unet, scheduler


def _tiny_unet(layout: str, sample_size: int):
    """:func:`tiny_components`' UNet, initialized from torch's current random state."""
    from diffusers import UNet2DConditionModel

    if layout == "sd1":
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(8, 16, 16, 16), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ).eval()
    else:
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=(2, 4),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        ).eval()
    return unet


def clip_text_encoder(tokenizer, hidden_size: int, seed: int, num_layers: int = 2, heads: int = 4):
    """A seeded causal ``CLIPTextModel`` (intermediate size 2 x hidden, 77 positions) whose BOS, EOS and
    pad ids are the tokenizer's; in eval mode."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        return CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=heads, max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )).eval()


def save_components(root: str | Path, tokenizer, text_encoder, unet, scheduler, extra: dict | None = None) -> Path:
    """Save components in diffusers layout with safetensors weights; returns the folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(root / "tokenizer")
    text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    scheduler.save_pretrained(root / "scheduler")
    write_model_index(root)
    if extra:
        (root / "memaudit.json").write_text(json.dumps(extra, indent=2))
    return root


def tiny_vae(seed: int = 0):
    """A seeded tiny ``AutoencoderKL`` (2 blocks of 8 channels, 4 latent channels, downscale 2) in eval mode:
    decodes the tiny models' latents in tests and benchmarks of image generation."""
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        return AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=4,
                             down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                             norm_num_groups=8).eval()


def build_tiny_model(root: str | Path, seed: int = 0, sample_size: int = 8, vae: bool = False) -> Path:
    """Build and save a tiny seeded model folder at ``root`` (see :func:`tiny_components`); with ``vae``, also
    :func:`tiny_vae` in ``vae/``, so that ``memaudit generate`` and diffusers' ``StableDiffusionPipeline`` can
    make (meaningless) images from it on a CPU in seconds."""
    root = save_components(root, *tiny_components(seed=seed, sample_size=sample_size))
    if vae:
        tiny_vae(seed).save_pretrained(root / "vae", safe_serialization=True)
        index = json.loads((root / "model_index.json").read_text())
        index["vae"] = ["diffusers", "AutoencoderKL"]
        (root / "model_index.json").write_text(json.dumps(index))
    return root


# Stable Diffusion v1.4 architecture, from its published configuration values (unet/config.json and
# text_encoder/config.json of CompVis/stable-diffusion-v1-4); nothing is downloaded, weights are random.
SD1_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
SD1_TEXT_ENCODER_CONFIG = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}


def sd1_components(sample_size: int = 64, seed: int = 0, text_layers: int | None = None):
    """``(tokenizer, text_encoder, unet, scheduler)`` with SD v1.4's architecture and random weights.

    Args:
        sample_size: latent side (64 for 512 px; tests use a reduced size to stay fast on CPU).
        text_layers: override the text encoder depth (12 in SD v1.4) for cheaper tests.

    The tokenizer is the CLIP-convention tokenizer of :func:`audit.tokenizer.build_clip_tokenizer` (ids
    below 49,408), since CLIP's own vocabulary cannot be downloaded here.
    """
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from audit.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(TINY_WORDS)
    text_cfg = dict(SD1_TEXT_ENCODER_CONFIG, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if text_layers is not None:
        text_cfg["num_hidden_layers"] = text_layers
    with torch.device("meta"):  # build without the default init, then fill fast (below)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
        unet = UNet2DConditionModel(**dict(SD1_UNET_CONFIG, sample_size=sample_size))
    text_encoder = _fill_random(text_encoder, seed)
    unet = _fill_random(unet, seed + 1)
    return tokenizer, text_encoder, unet, DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG)


def _fill_random(module, seed: int):
    """Materialize a meta-device module on the CPU with seeded random weights: matrices and kernels
    N(0, 1/fan_in), norm scales 1, biases 0 (a variance-preserving init, much cheaper than the default
    per-layer init at 10^9 parameters; throughput and code paths do not depend on weight values)."""
    import torch

    module = module.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
            else:
                raise RuntimeError(f"unexpected buffer {name}: cannot initialize it")
    return module.eval()
