"""What every model family shares: the model folder (hub id or local diffusers layout), its identity, the
device and dtype, and the :class:`ModelAdapter` interface each family implements.

A model is a hub id or a local folder in diffusers layout (``model_index.json`` naming the pipeline class,
one folder per component). No VAE and no safety checker are loaded, and weights load from safetensors only
(never pickle). The model's identity is its name and a fingerprint: SHA-256 over the weight, tokenizer and
scheduler files, recorded in every output and readable without loading weights (:func:`read_identity`).

Owns model folders, identity, device/dtype resolution and the adapter interface. Must not import scorers,
engines, the pipeline or outputs; torch, transformers and diffusers are imported inside functions only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from audit.errors import ModelError

COMPONENTS = ("tokenizer", "text_encoder", "unet", "scheduler")  # fingerprinted folders (every family so far)
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
    adapter: Any = None  # the family's ModelAdapter (None: SD 1.x, for models assembled in code)

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


@dataclass(frozen=True)
class ModelIdentity:
    """Who a model is, read from its folder without loading weights: ``name`` (as given), ``path`` (local
    folder), ``fingerprint`` (:func:`fingerprint_files`), ``adapter`` (its family's :class:`ModelAdapter`),
    ``pipeline_class`` (``model_index.json``'s ``_class_name``), ``extra`` (``memaudit.json``, may be empty)
    and ``scheduler_config`` (``scheduler/scheduler_config.json``, ``{}`` when absent)."""

    name: str
    path: Path
    fingerprint: str
    adapter: Any
    pipeline_class: str
    extra: dict
    scheduler_config: dict

    @property
    def family(self) -> str:
        """The family's name (``sd1``)."""
        return self.adapter.name


def read_extra(root: Path) -> dict:
    """The folder's optional ``memaudit.json`` (default layers, description), or ``{}``."""
    path = Path(root) / MEMAUDIT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class ModelAdapter:
    """One model family: how to load it and drive its UNet at the first step. Subclass per family
    (:mod:`audit.models.sd1`) and register an instance with :func:`audit.models.register_family`.

    Attributes:
        name: family name (``sd1``).
        pipeline_classes: ``model_index.json`` ``_class_name`` values this family loads.
        components: the sub-folders it needs.
    """

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()
    components: tuple[str, ...] = COMPONENTS

    def load(self, name: str, root: Path, device, dtype) -> LoadedModel:
        """Load the components onto ``device`` in ``dtype`` (torch objects). Raises ModelError."""
        raise NotImplementedError

    def encode(self, model: LoadedModel, input_ids, text_encoder=None):
        """Text conditioning for int64 token ids [B, L] on the device -> [B, L, D] (``text_encoder`` may be a
        compiled wrapper of ``model.text_encoder``)."""
        raise NotImplementedError

    def unet_kwargs(self, embeddings) -> dict:
        """Keyword arguments of the UNet call that carry the conditioning ``embeddings`` [N, L, D]."""
        raise NotImplementedError

    def scheduler(self, scheduler_config: dict, num_inference_steps: int):
        """The scheduler built from ``scheduler_config`` after ``set_timesteps(num_inference_steps)``; its
        ``timesteps[0]`` is t0 (no weights needed)."""
        raise NotImplementedError

    def prediction_type(self, model: LoadedModel) -> str:
        """What the UNet predicts: ``epsilon``, ``v_prediction`` or ``sample`` (from the scheduler config)."""
        return model.scheduler_config.get("prediction_type", "epsilon")

    def cross_attention_layers(self, unet) -> list[str]:
        """Module paths of the UNet's cross-attention layers, in call order."""
        from audit.capture import cross_attention_layers

        return cross_attention_layers(unet)

    def default_layers(self, unet, extra: dict | None = None) -> list[str]:
        """The layer(s) scored when ``--layers`` is not given."""
        raise NotImplementedError

    def default_layers_from_config(self, root: Path, extra: dict | None = None) -> list[str]:
        """:meth:`default_layers` from the folder's configuration files only (no weights are loaded)."""
        raise NotImplementedError
