"""Loading a Stable-Diffusion-family model: tokenizer, text encoder, UNet and scheduler only.

A model is a hub id or a local folder in diffusers layout (``model_index.json``, ``tokenizer/``,
``text_encoder/``, ``unet/``, ``scheduler/``). No VAE and no safety checker are loaded, and weights load
from safetensors only (never pickle). The model's identity is its name and a fingerprint: SHA-256 over
the weight, tokenizer and scheduler files, recorded in every output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from audit.errors import ModelError

SD1_DEFAULT_LAYER = "down_blocks.1.attentions.1.transformer_blocks.0.attn2"
COMPONENTS = ("tokenizer", "text_encoder", "unet", "scheduler")
MEMAUDIT_FILE = "memaudit.json"  # optional, in the model folder: {"default_layers": [...], "description": ...}



@dataclass
class LoadedModel:
    """The components memaudit needs, on one device, in one dtype."""

    name: str
    path: Path
    fingerprint: str
    tokenizer: Any
    text_encoder: Any
    unet: Any
    scheduler_config: dict
    device: Any
    dtype: Any
    default_layers: list[str]
    extra: dict = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        """The tokenizer's padded length L (77 for CLIP)."""
        return int(self.tokenizer.model_max_length)


def resolve_model_dir(model: str) -> tuple[str, Path]:
    """Return ``(display name, local folder)`` for a local diffusers folder or a hub id.

    Raises:
        ModelError: the folder lacks a component, or the hub id cannot be fetched (offline, unknown id).
    """
    path = Path(os.path.expanduser(model))
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {model}: not a folder in diffusers layout")
        return str(model), path.resolve()
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise ModelError(f"--model {model}: no such folder, and not a hub id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            model,
            allow_patterns=["model_index.json", MEMAUDIT_FILE, "tokenizer/*", "scheduler/*",
                            "text_encoder/*.json", "text_encoder/*.safetensors",
                            "unet/*.json", "unet/*.safetensors"],
        )
    except Exception as exc:  # network, auth, offline mode: one clear line
        raise ModelError(f"--model {model}: cannot fetch from the hub ({type(exc).__name__}: {exc})") from exc
    return model, Path(local)


def fingerprint_files(root: Path) -> str:
    """SHA-256 (hex, first 16 characters) over names and contents of the weight, tokenizer and scheduler files."""
    digest = hashlib.sha256()
    files = []
    for comp in COMPONENTS:
        d = root / comp
        if d.is_dir():
            files += sorted(p for p in d.iterdir() if p.is_file() and p.suffix in {".safetensors", ".json", ".txt"})
    for p in files:
        digest.update(f"{p.parent.name}/{p.name}\0".encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def resolve_device(device: str = "auto"):
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` as given.

    Raises:
        ModelError: the device is not there (no CUDA, ``cuda:N`` past the last GPU, no MPS).
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: no CUDA device is available")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelError("--device mps: no Apple MPS device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device) -> Any:
    """``auto`` -> bfloat16 on GPUs with native bfloat16 (Ampere and later), else float16 on GPU, float32 on
    CPU. GPUs that only emulate bfloat16 (slowly) get float16.

    Raises:
        ModelError: an unknown dtype name.
    """
    import torch

    if dtype == "auto":
        if device.type == "cuda":
            with torch.cuda.device(device):
                try:
                    native = torch.cuda.is_bf16_supported(including_emulation=False)
                except TypeError:  # older torch: no emulation flag
                    native = torch.cuda.is_bf16_supported()
            return torch.bfloat16 if native else torch.float16
        return torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ModelError(f"--dtype {dtype}: choose auto, float32, float16 or bfloat16") from None


def load_model(model: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load tokenizer, text encoder, UNet (safetensors only) and the scheduler config of ``model``.

    Args:
        model: hub id (``CompVis/stable-diffusion-v1-4``) or local diffusers folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16`` (the text encoder and UNet weights).

    Raises:
        ModelError: missing components, non-safetensors weights, or an unloadable folder.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel
    from transformers import logging as hf_logging

    name, root = resolve_model_dir(model)
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise ModelError(f"--model {model}: not a diffusers folder, missing {', '.join(missing)}/ "
                         "(memaudit needs tokenizer, text_encoder, unet and scheduler)")
    for comp in ("text_encoder", "unet"):
        if not any(p.suffix == ".safetensors" for p in (root / comp).iterdir()):
            raise ModelError(f"--model {model}: {comp}/ has no .safetensors weights (memaudit never loads pickled weights)")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    from diffusers.utils import logging as diffusers_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", use_safetensors=True, torch_dtype=dt)
        unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True, torch_dtype=dt)
    except Exception as exc:
        raise ModelError(f"--model {model}: cannot load ({type(exc).__name__}: {exc})") from exc
    with open(root / "scheduler" / "scheduler_config.json") as fh:
        scheduler_config = json.load(fh)
    text_encoder.to(dev).eval().requires_grad_(False)
    unet.to(dev).eval().requires_grad_(False)
    extra = {}
    if (root / MEMAUDIT_FILE).is_file():
        with open(root / MEMAUDIT_FILE) as fh:
            extra = json.load(fh)
    return LoadedModel(
        name=name, path=root, fingerprint=fingerprint_files(root), tokenizer=tokenizer,
        text_encoder=text_encoder, unet=unet, scheduler_config=scheduler_config, device=dev, dtype=dt,
        default_layers=default_layers(unet, extra), extra=extra,
    )


def default_layers(unet, extra: dict | None = None) -> list[str]:
    """The default cross-attention layer(s) to score.

    A model folder's ``memaudit.json`` may name them (the lab model does, chosen on its validation
    split). Otherwise: the 4th cross-attention layer in call order, as in the paper's code for SD v1.x
    (``down_blocks.1.attentions.1.transformer_blocks.0.attn2``), or the last one when there are fewer.
    """
    from audit.capture import cross_attention_layers

    if extra and extra.get("default_layers"):
        return list(extra["default_layers"])
    layers = cross_attention_layers(unet)
    if not layers:
        raise ModelError("the UNet has no cross-attention (attn2) layers")
    return [layers[3] if len(layers) > 3 else layers[-1]]
