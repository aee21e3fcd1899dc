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

from contextlib import contextmanager
from dataclasses import dataclass, field
import hashlib
import json
import os
from pathlib import Path
import threading
from typing import Any

import numpy as np

from audit.errors import ModelError

COMPONENTS = ("tokenizer", "text_encoder", "unet", "scheduler")  # what SD 1.x / 2.x need
# every folder that is fingerprinted when present (the families with two text encoders or a transformer add theirs)
FINGERPRINTED = COMPONENTS + ("tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3", "transformer")
MEMAUDIT_FILE = "memaudit.json"  # optional, in the model folder: {"default_layers": [...], "description": ...}


_QUIET = {"lock": threading.Lock(), "depth": 0, "saved": None}  # quiet_loading's state, shared by threads


@contextmanager
def quiet_loading():
    """Inside the block, transformers logs only errors, diffusers only critical messages, and neither (nor the
    Hugging Face hub) draws progress bars, so that a model loads with memaudit's one-line messages only; on exit
    the levels and progress-bar switches are put back as they were. Loading used to leave them set for the whole
    process: a service that imports memaudit as a library lost transformers' and diffusers' warnings and its own
    download bars after its first ``audit.score``. Nested or concurrent blocks (threads) restore once, when the
    last one ends."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    with _QUIET["lock"]:
        if _QUIET["depth"] == 0:
            _QUIET["saved"] = (hf_logging.get_verbosity(), diffusers_logging.get_verbosity(),
                               hf_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled(),
                               hub_utils.are_progress_bars_disabled())
        _QUIET["depth"] += 1
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        with _QUIET["lock"]:
            _QUIET["depth"] -= 1
            if _QUIET["depth"] == 0:
                hf_level, diffusers_level, hf_bar, diffusers_bar, hub_bars_off = _QUIET["saved"]
                hf_logging.set_verbosity(hf_level)
                diffusers_logging.set_verbosity(diffusers_level)
                if hf_bar:
                    hf_logging.enable_progress_bar()  # (also the hub's: put back below as it was)
                if diffusers_bar:
                    diffusers_logging.enable_progress_bar()
                if hub_bars_off != hub_utils.are_progress_bars_disabled():
                    (hub_utils.disable_progress_bars if hub_bars_off else hub_utils.enable_progress_bars)()


@dataclass
class LoadedModel:
    """The components memaudit needs, on one device, in one dtype.

    Attributes:
        name: the model as given (hub id or folder); path: its local folder; fingerprint: the weights' hash.
        tokenizer, text_encoder: the (first) tokenizer and text encoder.
        unet: the denoiser: a UNet, or a transformer (PixArt, SD 3.x).
        scheduler_config: the folder's ``scheduler/scheduler_config.json``.
        device: torch.device; dtype: torch.dtype of the text encoder and denoiser.
        default_layers: the attention module paths scored by default.
        extra: the folder's ``memaudit.json`` ({} without one).
        adapter: the family's :class:`ModelAdapter`; family: family-specific components and settings.
    """

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
    # family-specific components and settings (SDXL: tokenizer_2, text_encoder_2, time_ids); ``unet`` above
    # holds the denoiser, a UNet or a transformer (PixArt)
    family: dict = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        """The tokenizer's padded length L (77 for CLIP)."""
        return int(self.tokenizer.model_max_length)


def names_hub_id(model: str) -> bool:
    """Whether ``--model`` names a hub id (``owner/name``) rather than a local folder: no such path here, one ``/``,
    and not starting with ``.``, ``/`` or ``~`` (``~/name`` is a path; a hub id has no ``~``)."""
    return (not Path(os.path.expanduser(model)).exists() and model.count("/") == 1
            and not model.startswith((".", "/", "~")))


def resolve_model_dir(model: str, vae: bool = False) -> tuple[str, Path]:
    """Return ``(display name, local folder)`` for a local diffusers folder or a hub id.

    From the hub only what scoring reads is fetched (the VAE's config, not its weights); ``vae=True`` (``memaudit
    generate``, which decodes images) fetches the VAE's safetensors weights too.

    Raises:
        ModelError: ``model`` is empty or a file, neither an existing folder nor a hub id of the form owner/name (a name
            starting with ``.``, ``/`` or ``~`` is a path, never sent to the hub), or the hub id cannot be fetched
            (offline, unknown id, no access). (The components are checked later, by the family's adapter,
            :func:`check_components`.)
    """
    if not str(model).strip():  # Path("") is the working folder
        from audit.errors import EMPTY_MODEL

        raise ModelError(EMPTY_MODEL)
    path = Path(os.path.expanduser(model))
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {model}: not a folder in diffusers layout")
        from audit.sources import name_not_utf8, locale_hint

        resolved = path.resolve()
        if (shown := name_not_utf8(str(resolved))) is not None:  # safetensors opens UTF-8 paths only: it was
            # "text_encoder/model.safetensors is not a readable safetensors file ... a damaged or partial download"
            given = name_not_utf8(str(model)) or str(model)
            where = "" if given == shown else f" ({shown})"
            raise ModelError(f"--model {given}: its path{where} is not UTF-8 text{locale_hint()}, and safetensors "
                             "opens only UTF-8 paths: rename it")
        return str(model), resolved
    if not names_hub_id(model):
        raise ModelError(f"--model {model}: no such folder, and not a hub id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            model,
            allow_patterns=["model_index.json", MEMAUDIT_FILE, "tokenizer/*", "tokenizer_2/*", "scheduler/*",
                            "text_encoder/*.json", "text_encoder/*.safetensors",
                            "text_encoder_2/*.json", "text_encoder_2/*.safetensors", "tokenizer_3/*",
                            "text_encoder_3/*.json", "text_encoder_3/*.safetensors",
                            "unet/*.json", "unet/*.safetensors", "transformer/*.json",
                            "transformer/*.safetensors", "vae/config.json"] + (["vae/*.safetensors"] if vae else []),
        )
    except Exception as exc:  # network, auth, offline mode: one clear line
        raise ModelError(f"--model {model}: cannot fetch from the hub ({type(exc).__name__}: {exc})") from exc
    return model, Path(local)


# memaudit.json settings that change a model's scores (the UNet's cross-attention mask, guidance_geometry's
# weights): part of the model's fingerprint, so that a cache, a calibration or a resumed run of the same weights
# without them is never taken for this model's. ``default_layers`` is not: the layers are in the score
# configuration. Its description and lab figures are not either (they change no score).
SCORE_SETTINGS = ("unet_encoder_attention_mask", "guidance_geometry_weights")


# the files of a component that the fingerprint hashes: weights, configs, tokenizer vocabularies and merges, and
# sentencepiece tokenizers (T5's spiece.model)
FINGERPRINT_SUFFIXES = frozenset({".safetensors", ".json", ".txt", ".model"})


def fingerprint_files(root: Path, components: tuple[str, ...] = FINGERPRINTED, settings: bool = True,
                      suffixes: frozenset[str] = FINGERPRINT_SUFFIXES, index: bool = True,
                      loaded_only: bool = True) -> str:
    """SHA-256 (hex, first 16 characters) over names and contents of the weight, tokenizer and scheduler files
    (:data:`FINGERPRINT_SUFFIXES`) of ``components`` (default: every one that scores), with ``loaded_only`` leaving
    out the weight files the load does not read (:func:`unloaded_files`: a fp16 variant beside the plain weights,
    whose addition or removal changes no score), and with ``settings`` over
    the :data:`SCORE_SETTINGS` that the folder's ``memaudit.json`` sets and, with ``index`` too, the settings
    outside the components that change its scores (:func:`settings_outside_components`: an SDXL folder's
    ``force_zeros_for_empty_prompt`` and VAE scale factor where they depart from SDXL base's). A folder that sets
    none has the fingerprint of its files alone, as before these settings existed.

    Raises:
        ModelError: a file or component folder this user may not read, named."""
    digest = hashlib.sha256()
    files = []
    try:
        for comp in components:
            d = root / comp
            if d.is_dir():
                skipped = set(unloaded_files(d)) if loaded_only else set()
                files += sorted(p for p in d.iterdir() if p.is_file() and p.suffix in suffixes and p not in skipped)
        for p in files:
            digest.update(f"{p.parent.name}/{p.name}\0".encode())
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(chunk)
    except PermissionError as exc:  # a rerun of a finished folder hashes the files before anything else reads them
        raise ModelError(f"{exc.filename}: cannot be read ({exc.strerror})") from None
    chosen = {k: v for k, v in read_extra(root).items() if k in SCORE_SETTINGS} if settings else {}
    if chosen:
        digest.update(f"{MEMAUDIT_FILE}\0{json.dumps(chosen, sort_keys=True)}".encode())
    if settings and index and (outside := settings_outside_components(root)):
        digest.update(f"model_index.json\0{json.dumps(outside, sort_keys=True)}".encode())
    return digest.hexdigest()[:16]


SDXL_PIPELINE = "StableDiffusionXLPipeline"
# what an SDXL folder's scores read from outside its fingerprinted components, with the values the pipeline (and
# SDXL base) takes: model_index.json's force_zeros_for_empty_prompt (the unconditional branch) and the VAE scale
# factor (which sizes time_ids); audit.models.sdxl reads both through the functions below
SDXL_DEFAULTS = {"force_zeros_for_empty_prompt": True, "vae_scale_factor": 8}


def sdxl_vae_scale_factor(root: Path) -> int:
    """The VAE scale factor an SDXL pipeline sizes ``time_ids`` with: 2 ** (len(``vae/config.json``
    ``block_out_channels``) - 1), or 8 (the pipeline's default) without a ``vae/config.json`` (diffusers
    ``StableDiffusionXLPipeline.__init__``).

    Raises:
        ModelError: ``vae/config.json`` unreadable, or without a non-empty ``block_out_channels`` list."""
    cfg = Path(root) / "vae" / "config.json"
    if not cfg.is_file():
        return SDXL_DEFAULTS["vae_scale_factor"]
    channels = read_json(cfg).get("block_out_channels")
    if not isinstance(channels, list) or not channels:
        raise ModelError(f"{cfg}: no block_out_channels list, which sizes SDXL's time_ids (a broken config)")
    return 2 ** (len(channels) - 1)


def settings_outside_components(root: Path) -> dict:
    """The score-changing settings a folder holds outside its fingerprinted components, where they depart from
    :data:`SDXL_DEFAULTS`: for an SDXL folder (``model_index.json`` ``_class_name``
    ``StableDiffusionXLPipeline``) ``force_zeros_for_empty_prompt`` and ``vae_scale_factor``; ``{}`` for every
    other folder and for SDXL base. Hashed into :func:`fingerprint_files`, so that a cache or calibration made
    with one unconditional branch or one ``time_ids`` size is never taken for another's, while folders at the
    defaults keep the fingerprint they had.

    Raises:
        ModelError: an unreadable ``model_index.json`` or ``vae/config.json`` (:func:`sdxl_vae_scale_factor`)."""
    index = read_json(Path(root) / "model_index.json", missing={})
    if index.get("_class_name") != SDXL_PIPELINE:
        return {}
    return {k: v for k, v in sdxl_settings(root, index).items() if v != SDXL_DEFAULTS[k]}


def sdxl_settings(root: Path, index: dict | None = None) -> dict:
    """An SDXL folder's :data:`SDXL_DEFAULTS` keys as the folder sets them: ``force_zeros_for_empty_prompt`` from
    ``model_index.json`` (``index``, read when not given) and the VAE scale factor (:func:`sdxl_vae_scale_factor`).
    What :mod:`audit.models.sdxl` scores with, and what :func:`settings_outside_components` fingerprints.

    Raises:
        ModelError: an unreadable ``model_index.json`` or ``vae/config.json``."""
    if index is None:
        index = read_json(Path(root) / "model_index.json")
    return {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt",
                                                           SDXL_DEFAULTS["force_zeros_for_empty_prompt"])),
            "vae_scale_factor": sdxl_vae_scale_factor(root)}


# how earlier memaudit versions fingerprinted a folder: (file suffixes, score settings hashed); before 2026-12-05 the
# weight, config and vocabulary files alone, then with memaudit.json's score settings, then also sentencepiece files
# (suffixes, memaudit.json settings hashed, settings outside the components hashed); before 2026-12-07 without the
# settings outside the components (an SDXL folder's force_zeros_for_empty_prompt and VAE scale factor); before
# 2026-12-08 (suffixes, settings, index, loaded_only) over every weight file, a variant the load does not read too
EARLIER_FINGERPRINTS = ((frozenset({".safetensors", ".json", ".txt"}), False, False, False),
                        (frozenset({".safetensors", ".json", ".txt"}), True, False, False),
                        (FINGERPRINT_SUFFIXES, True, False, False),
                        (FINGERPRINT_SUFFIXES, True, True, False))


def earlier_fingerprint_note(root, fingerprint: str) -> str | None:
    """When ``fingerprint`` (recorded in a run folder or a calibration file) is what an earlier memaudit computed
    for the files now in model folder ``root`` (:data:`EARLIER_FINGERPRINTS`), a clause saying so: the same model
    files, whose fingerprint this version computes over more of them, not another model. None otherwise (another
    model, or a folder that cannot be read)."""
    try:
        if root is None or not Path(root).is_dir() or not any(
                fingerprint_files(Path(root), settings=settings, suffixes=suffixes, index=index,
                                  loaded_only=loaded_only) == fingerprint
                for suffixes, settings, index, loaded_only in EARLIER_FINGERPRINTS):
            return None
    except (OSError, ModelError):
        return None
    return (f"an earlier memaudit fingerprinted this model's same files as [{fingerprint}], before the fingerprint "
            "also covered memaudit.json's score settings, sentencepiece tokenizer files and SDXL's model_index.json "
            "and VAE settings, or left out weight files the load does not read (a fp16 variant beside the weights)")


def device_name_problem(device) -> str | None:
    """Why ``device`` is not a device name memaudit takes (``auto``, ``cpu``, ``mps``, ``cuda``, ``cuda:N``; one line),
    or None. The command line says it before loading a model (:func:`audit.config.device_dtype_problem`),
    :func:`resolve_device` for library callers."""
    import re

    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        return f"--device {device}: choose auto, cpu, cuda or cuda:N"
    return None


def resolve_device(device: str = "auto"):
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` as given.

    Raises:
        ModelError: the device is not there (no CUDA, ``cuda:N`` past the last GPU, no MPS), or not a name of one
            (``gpu``, ``CPU``: :func:`device_name_problem`; torch's own RuntimeError reached library callers).
    """
    import torch

    if problem := device_name_problem(device):
        raise ModelError(problem)
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


def device_kind(device) -> str:
    """What of the scoring device changes a score's float rounding, as a cache key part: ``cpu:<torch threads>`` (the
    thread count changes how reductions are split: up to 3.2e-7 in risk between 1 and 2 threads on the lab model,
    ``benchmarks/rounding.py``), ``cuda:<GPU name>`` (another GPU model runs other kernels), else the device type
    (``mps``); followed by torch's reduced float32 precision for that device's kernels where the process set one
    (:func:`reduced_float32_precision`: ``cpu:2 (float32 matmul bf16)`` after
    ``torch.set_float32_matmul_precision("medium")``), so that scores computed so are neither served from nor stored
    under the key of IEEE float32 scores."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        kind = f"cpu:{torch.get_num_threads()}"
    elif device.type == "cuda":
        kind = f"cuda:{torch.cuda.get_device_name(device)}"
    else:
        kind = device.type
    reduced = reduced_float32_precision(device)
    return f"{kind} ({reduced})" if reduced else kind


def reduced_float32_precision(device) -> str | None:
    """torch's process-wide float32 precision settings for ``device``'s kernels where they depart from a fresh
    process's (what ``memaudit run`` scores with), as ``"float32 matmul bf16"``, ``"float32 matmul tf32, conv ieee"``;
    None where they do not.

    A notebook or service sets them for speed: ``torch.set_float32_matmul_precision("high")`` (TF32 matmuls on
    CUDA, as PyTorch Lightning advises) or ``"medium"`` (bfloat16 matmuls through oneDNN on a CPU),
    ``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32 = False``, or the
    ``fp32_precision`` attributes of ``torch.backends`` (torch 2.9 and later). They round every float32 matmul (the
    attention's Q K^T included) to fewer mantissa bits: on the lab model in float32, ``"medium"`` moved risks by up
    to 0.025 (mean 0.0074) over the first 64 prompts of ``nonmemorized_500.txt`` at batch 8 on a 2-core CPU with
    AMX-BF16, where 1 thread against 2 moves them by up to 3.2e-7. Read only: nothing is changed. Read through
    the backends' own attributes, not ``torch.get_float32_matmul_precision()``, which raises RuntimeError once a
    process has used both of torch's APIs for it."""
    import torch

    device = torch.device(device)
    backends = torch.backends
    found = []
    if device.type == "cpu":
        mkldnn = getattr(backends, "mkldnn", None)
        for op in ("matmul", "conv"):
            value = getattr(getattr(mkldnn, op, None), "fp32_precision", None)
            if value is None and op == "matmul":  # torch before 2.9: the one setting, which "medium" sets
                try:
                    legacy = torch.get_float32_matmul_precision()
                except RuntimeError:
                    legacy = "highest"
                value = {"medium": "bf16"}.get(legacy)
            if value not in (None, "none", "ieee"):
                found.append(f"{op} {value}")
    elif device.type == "cuda":
        matmul = getattr(backends.cuda.matmul, "fp32_precision", None)
        if matmul is None:  # torch before 2.9
            matmul = "tf32" if backends.cuda.matmul.allow_tf32 else "ieee"
        if matmul not in ("none", "ieee"):
            found.append(f"matmul {matmul}")
        if not backends.cudnn.allow_tf32:  # TF32 convolutions are cuDNN's default: IEEE ones depart from it
            found.append("conv ieee")
    return f"float32 {', '.join(found)}" if found else None


def resolve_dtype(dtype: str, device) -> Any:
    """``auto`` -> bfloat16 on CUDA GPUs with native bfloat16 (Ampere and later), float16 on other CUDA GPUs (those
    that only emulate bfloat16, slowly), float32 on CPU and on Apple MPS.

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


def read_json(path: Path, missing: dict | None = None) -> dict:
    """A model folder's JSON file (``model_index.json``, a component's config, ``memaudit.json``) as a dict.

    Args:
        path: the file.
        missing: returned when ``path`` is not a file; None makes a missing file an error.

    Raises:
        ModelError: the file is missing (when ``missing`` is None), unreadable, not UTF-8 JSON, or not a JSON
            object; the message names the file.
    """
    path = Path(path)
    try:
        is_file = path.is_file()
    except OSError as exc:  # a folder on the way that this user may not search (chmod 700 by another user)
        raise ModelError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not is_file:
        if missing is not None:
            return missing
        raise ModelError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:  # no permission: the file is there, nothing says it is not JSON
        raise ModelError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ModelError(f"{path}: not a valid JSON file ({str(exc)[:200]})") from None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also 4,300+ digits
        raise ModelError(f"{path}: not a valid JSON file ({str(exc)[:200]})") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: holds a JSON {type(value).__name__}, not an object")
    return value


def read_extra(root: Path) -> dict:
    """The folder's optional ``memaudit.json`` (default layers, description), or ``{}``.

    Raises:
        ModelError: not a JSON object (:func:`read_json`), or ``default_layers`` not a list of layer names.
    """
    extra = read_json(Path(root) / MEMAUDIT_FILE, missing={})
    layers = extra.get("default_layers")
    if layers is not None and (not isinstance(layers, list) or not all(isinstance(x, str) and x for x in layers)):
        got = type(layers).__name__ if not isinstance(layers, list) else "a list holding other values"
        raise ModelError(f"{Path(root) / MEMAUDIT_FILE}: default_layers must be a list of layer names (got {got})")
    return extra


@dataclass
class Tokens:
    """Tokenized prompts, on the host (numpy).

    Attributes:
        input_ids: int64 [B, L], the family's first tokenizer, padded to L with its pad token.
        n_tokens: int32 [B], the true length (special tokens included) before truncation.
        n_kept: int32 [B], the length kept (<= L): the number of ones in ``attention_mask``.
        attention_mask: int64 [B, L], the tokenizer's attention mask (1 = a token of the prompt, special
            tokens included; 0 = padding). None only for ids assembled without a tokenizer (callers that pass
            bare ids to :meth:`audit.scorers.Scorer.encode`); families that need it then raise.
        extra: further tokenizers' arrays by name (SDXL: ``input_ids_2``, ``attention_mask_2``, int64 [B, L]).
        offsets: int32 [B, L, 2], each kept token's character span ``[start, end)`` in its prompt, from a fast
            tokenizer's offset mapping (``return_offsets_mapping``); ``(0, 0)`` for special tokens and padding;
            None with a slow tokenizer, and None when ``encodings`` holds the spans (read them with
            :meth:`spans` or :meth:`offset_mapping`).
        encodings: the fast tokenizer's Rust ``Encoding`` of each prompt [B] (untruncated), or None. The spans
            are read from it only where asked (:meth:`spans`): converting every token's span to Python
            objects cost about a fifth of the host's work per prompt (benchmarks/host_ceiling.py profile),
            and only the trigger tokens' spans are used.
    """

    input_ids: np.ndarray
    n_tokens: np.ndarray
    n_kept: np.ndarray
    attention_mask: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    offsets: np.ndarray | None = None
    encodings: list | None = field(default=None, repr=False, compare=False)

    def take(self, rows) -> "Tokens":
        """These tokens' rows ``rows`` (int [B'], repeats allowed), in that order: every array's rows, every list's
        items (the encodings, ``extra``'s arrays and lists). A batch is padded this way with copies of a row's
        tokens, instead of tokenizing its prompt again (:meth:`audit.scorers.Scorer.prepare`).

        Raises:
            TypeError: an ``extra`` value that is neither a numpy array nor a list.
        """
        idx = np.asarray(rows, dtype=np.intp)

        def pick(v):
            if v is None:
                return None
            if isinstance(v, np.ndarray):
                return v[idx]
            if isinstance(v, list):
                return [v[i] for i in idx.tolist()]
            raise TypeError(f"Tokens.take: cannot take rows of {type(v).__name__}")

        return Tokens(pick(self.input_ids), pick(self.n_tokens), pick(self.n_kept), pick(self.attention_mask),
                      {k: pick(v) for k, v in self.extra.items()}, pick(self.offsets), pick(self.encodings))

    @property
    def has_spans(self) -> bool:
        """Whether character spans are known (a fast tokenizer)."""
        return self.offsets is not None or self.encodings is not None

    def spans(self, positions: np.ndarray) -> np.ndarray | None:
        """Character spans ``[start, end)`` of the tokens at ``positions`` (int [B', K], row b of the first B'
        prompts), int32 [B', K, 2]; None without spans. Positions must be kept prompt tokens (below
        ``n_kept - 1``, the last kept token being EOS after truncation), where the truncated and untruncated
        token sequences agree."""
        positions = np.asarray(positions)
        if self.offsets is not None:
            return np.take_along_axis(self.offsets[:len(positions)], positions[..., None], axis=1)
        if self.encodings is None:
            return None
        none = (0, 0)
        spans = [[(enc.token_to_chars(p) if p < n else None) or none for p in row]
                 for enc, n, row in zip(self.encodings, self.n_tokens.tolist(), positions.tolist())]
        return np.asarray(spans, dtype=np.int32).reshape(*positions.shape, 2)

    def offset_mapping(self) -> np.ndarray | None:
        """Every kept token's span, int32 [B, L, 2] (``offsets``, computed from ``encodings`` when needed: the
        offset mapping of ``tokenizer(..., padding="max_length", truncation=True)``); None without spans."""
        if self.offsets is not None or self.encodings is None:
            return self.offsets
        b, length = self.input_ids.shape
        out = np.zeros((b, length, 2), dtype=np.int32)
        for i, enc in enumerate(self.encodings):
            spans = enc.offsets
            kept = int(self.n_kept[i])
            if len(spans) > length:  # truncated: the last special token (EOS) kept last
                spans = spans[:length - 1] + spans[-1:]
            out[i, :kept] = spans[:kept]
        return out


LONG_PROMPT_CHARS = 8192  # longer prompts are tokenized from a head, their full length counted in pieces


def _token_count(tokenizer, backend, text: str, special: bool) -> int:
    """Tokens of ``text`` (with the special tokens when ``special``), through the Rust backend when there is one."""
    if backend is not None:
        return len(backend.encode(text, add_special_tokens=special).ids)
    return len(tokenizer(text, add_special_tokens=special, truncation=False, verbose=False)["input_ids"])


def _cut_at_space(text: str, limit: int) -> int:
    """An index at most ``limit`` where ``text`` may be cut between words (after the last whitespace), else
    ``limit``."""
    if limit >= len(text):
        return len(text)
    space = max(text.rfind(" ", 0, limit), text.rfind("\n", 0, limit), text.rfind("\t", 0, limit))
    return space + 1 if space > 0 else limit


def _long_prompt(tokenizer, backend, text: str, max_length: int) -> tuple[str, int]:
    """``(head, n_tokens)`` of a prompt over :data:`LONG_PROMPT_CHARS` characters: the whole text's token count,
    summed over pieces of about :data:`LONG_PROMPT_CHARS` characters cut between words, and a head, cut at the
    end of the first piece where that count passes ``max_length`` + 8, so its first ``max_length - 1`` tokens
    are the whole text's (a word is tokenized on its own); a text with no more tokens than that is its own head.
    Tokenizing a 10 MB prompt whole held about 0.5 GB and took 5 s, for 77 tokens kept; memory is now bounded
    by the piece size, and the text is read once (a head that grew by fours and was tokenized again each time,
    then counted whole, read a 10 MB run of whitespace about 3 times: 32 s on the lab tokenizer, 2 CPU cores).
    The count is exact where the pieces are cut at whitespace (CLIP's pre-tokenizer splits there first); a run of
    more than :data:`LONG_PROMPT_CHARS` characters without whitespace is cut inside, and may count a token or so
    more."""
    n, start, head_end = _token_count(tokenizer, backend, "", True), 0, None  # the special tokens (BOS, EOS)
    while start < len(text):
        stop = start + _cut_at_space(text[start:start + LONG_PROMPT_CHARS + 1], LONG_PROMPT_CHARS)
        n += _token_count(tokenizer, backend, text[start:stop], False)
        start = stop
        if head_end is None and n > max_length + 8:
            head_end = stop
    return text[:head_end or len(text)], n


def tokenize(tokenizer, prompts: list[str], max_length: int) -> Tokens:
    """Tokenize with the tokenizer's special tokens, truncate to ``max_length`` keeping the last special
    token (EOS) last, pad with the pad token (EOS when the tokenizer has none).

    This matches ``tokenizer(..., padding="max_length", max_length=L, truncation=True)`` as the diffusers
    pipelines call it (``StableDiffusionPipeline.encode_prompt``, ``PixArtAlphaPipeline.encode_prompt``),
    with its ``attention_mask`` (ones over each row's tokens, as the tokenizer's mask of an unpadded call
    always is, padded with zeros; lengths and summary positions are never found by comparing ids with the pad
    id, which is a real token for SD 2.x's ``!``), while also returning the untruncated length ``n_tokens``.
    A prompt over :data:`LONG_PROMPT_CHARS` characters is tokenized from a head that yields the same kept tokens
    (:func:`_long_prompt`).
    """
    from itertools import chain

    fast = bool(getattr(tokenizer, "is_fast", False))
    backend = getattr(tokenizer, "_tokenizer", None) if fast else None
    if backend is not None and not (hasattr(backend, "encode_batch") and backend.padding is None
                                    and backend.truncation is None):
        backend = None  # a backend set to pad or truncate: through the tokenizer's own call
    counted = {}
    if any(len(p) > LONG_PROMPT_CHARS for p in prompts):
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if len(p) > LONG_PROMPT_CHARS:
                prompts[i], counted[i] = _long_prompt(tokenizer, backend, p, max_length)
    if backend is not None:
        # the Rust backend directly: what ``tokenizer(...)`` returns for an unpadded, untruncated batch (the
        # same encodings; transformers only converts them), 1.6x faster on one core; the spans stay in the
        # encodings until asked for (Tokens.spans)
        encodings = backend.encode_batch(list(prompts), add_special_tokens=True)
        seqs = [e.ids for e in encodings]
        spans = None
    else:
        encodings = None
        enc = tokenizer(prompts, add_special_tokens=True, truncation=False, padding=False, verbose=False,
                        return_attention_mask=False, **({"return_offsets_mapping": True} if fast else {}))
        seqs = enc["input_ids"]
        spans = enc["offset_mapping"] if fast else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    b = len(prompts)
    ids = np.full((b, max_length), pad, dtype=np.int64)
    offsets = np.zeros((b, max_length, 2), dtype=np.int32) if spans is not None else None
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=b)
    n_tokens = lengths.astype(np.int32)
    for i, n in counted.items():  # a long prompt's whole length, not its head's
        n_tokens[i] = n
    fits = np.flatnonzero(lengths <= max_length)
    if len(fits):  # the common case, at once: the rows' tokens scattered left-aligned into the padded arrays
        pick = (lambda xs: xs) if len(fits) == b else (lambda xs: [xs[i] for i in fits])
        total = int(lengths[fits].sum())
        where = np.arange(max_length)[None] < lengths[fits][:, None]  # [F, L], row-major = token order
        block = ids[fits]
        block[where] = np.fromiter(chain.from_iterable(pick(seqs)), dtype=np.int64, count=total)
        ids[fits] = block
        if offsets is not None:
            block = offsets[fits]
            block[where] = np.fromiter(chain.from_iterable(chain.from_iterable(pick(spans))), dtype=np.int32,
                                       count=2 * total).reshape(-1, 2)
            offsets[fits] = block
    for i in np.flatnonzero(lengths > max_length):  # truncated: keep the last special token (EOS) last
        ids[i] = seqs[i][: max_length - 1] + seqs[i][-1:]
        if offsets is not None:
            offsets[i] = spans[i][: max_length - 1] + spans[i][-1:]
    n_kept = np.minimum(lengths, max_length).astype(np.int32)  # from the tokens themselves (a long prompt's head)
    mask = (np.arange(max_length)[None] < n_kept[:, None]).astype(np.int64)
    return Tokens(ids, n_tokens, n_kept, mask, offsets=offsets, encodings=encodings)


@dataclass
class Conditioning:
    """A batch's text conditioning on the device, as a family's denoiser takes it (batch-first tensors).

    Attributes:
        embeddings: ``encoder_hidden_states`` [B, L, D] (model dtype).
        mask: the denoiser's ``encoder_attention_mask`` int64 [B, L] (1 = attended), or None (every position
            attended: SD 1.x/2.x and SDXL as their pipelines call the UNet).
        added: further conditioning tensors, each [B, ...] (SDXL: ``text_embeds`` [B, 1280] and ``time_ids``
            [B, 6], passed as ``added_cond_kwargs``).

    It supports the two batch operations the scorers apply to embeddings, so code written for a plain
    [B, L, D] tensor keeps working: ``repeat_interleave(k, dim=0)`` and ``expand(n, -1, -1)`` (from B = 1).
    """

    embeddings: Any
    mask: Any = None
    added: dict = field(default_factory=dict)

    def _map(self, fn) -> "Conditioning":
        return Conditioning(fn(self.embeddings), None if self.mask is None else fn(self.mask),
                            {k: fn(v) for k, v in self.added.items()})

    def repeat_interleave(self, repeats: int, dim: int = 0) -> "Conditioning":
        """Every tensor repeated ``repeats`` times along the batch: [B, ...] -> [B * repeats, ...].

        Raises:
            ValueError: ``dim`` other than 0.
        """
        if dim != 0:
            raise ValueError("Conditioning repeats along the batch dimension only")
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def expand(self, n: int, *rest) -> "Conditioning":
        """A batch of ``n`` views of a batch of one (other dimensions kept)."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    @property
    def shape(self):
        """The embeddings' shape [B, L, D]."""
        return self.embeddings.shape

    def __len__(self) -> int:
        return self.embeddings.shape[0]


def as_tokens(tokens) -> Tokens:
    """``tokens`` as :class:`Tokens`: bare int ids [B, L] (numpy) get no attention mask and unknown lengths."""
    if isinstance(tokens, Tokens):
        return tokens
    ids = np.asarray(tokens, dtype=np.int64)
    unknown = np.full(len(ids), -1, dtype=np.int32)
    return Tokens(ids, unknown, unknown)


def to_device(array: np.ndarray | None, device):
    """A host array (token ids, attention mask: int64 [B, L]) as a tensor on ``device``, or None for None.
    Copied with ``non_blocking=True`` so that queuing a batch's device work never waits on the GPU (a blocking
    copy synchronized the host once per batch on an H200: docs/gpu.md); the source array is not written to
    afterwards, so the asynchronous copy is safe."""
    import torch

    return None if array is None else torch.from_numpy(array).to(device, non_blocking=True)


MASK_DECLARATIONS = ("bos_and_prompt_tokens",)  # memaudit.json "unet_encoder_attention_mask" values


def declared_encoder_mask(extra: dict | None, attention_mask):
    """The denoiser's ``encoder_attention_mask`` that a model folder's ``memaudit.json`` declares, or None.

    ``"unet_encoder_attention_mask": "bos_and_prompt_tokens"`` (the lab's masked variant, docs/lab.md): the
    UNet attends to BOS and the prompt tokens only, i.e. the tokenizer's attended positions but the last
    (the EOS, kept last under truncation): position i is attended iff i < (sum of the mask) - 1.

    Args:
        extra: the folder's memaudit.json (may be None or empty).
        attention_mask: the tokenizer's attention mask, int64 torch tensor [B, L] (1 = token, 0 = padding).
    Returns:
        int64 tensor [B, L] on ``attention_mask``'s device, or None when nothing is declared.
    Raises:
        ModelError: an unknown declaration, or a declaration without a tokenizer mask to derive it from.
    """
    decl = (extra or {}).get("unet_encoder_attention_mask")
    if not decl:
        return None
    if decl not in MASK_DECLARATIONS:
        raise ModelError(f"memaudit.json: unknown unet_encoder_attention_mask {decl!r}; known: "
                         f"{', '.join(MASK_DECLARATIONS)}")
    if attention_mask is None:
        raise ModelError("this model declares unet_encoder_attention_mask: pass Tokens (with the tokenizer's "
                         "attention mask), not bare token ids")
    import torch

    kept = attention_mask.sum(dim=1, keepdim=True)  # [B, 1]: BOS + prompt + EOS
    return (torch.arange(attention_mask.shape[1], device=attention_mask.device)[None] < kept - 1).long()


# the libraries whose classes memaudit loads a component with; a model_index.json entry naming any other module for
# a component memaudit loads names code in the folder (a custom class diffusers would import from it)
_LIBRARIES = ("diffusers", "transformers")
# every JSON file a loaded component is configured by (transformers reads auto_map from the first two)
_CONFIG_FILES = ("config.json", "tokenizer_config.json", "scheduler_config.json", "special_tokens_map.json")


def check_no_remote_code(name: str, root: Path) -> None:
    """Refuse a model folder that names code of its own to run: an ``auto_map`` (transformers' and diffusers' key
    for classes defined in the folder's ``.py`` files, loaded with ``trust_remote_code``) in ``model_index.json`` or
    in a component's configuration, or a ``model_index.json`` entry whose library is not diffusers or transformers
    for a component memaudit loads (a custom class from the folder). memaudit never runs a model folder's code:
    transformers would ask on stdin whether to run it (and run it on "y") or fail with advice to pass
    ``trust_remote_code=True``, which memaudit has no option for.

    Raises:
        ModelError: one line naming the file and the key or component.
    """
    root = Path(root)
    index = read_json(root / "model_index.json", missing={})
    loaded = FINGERPRINTED + ("vae",)  # the components memaudit loads (vae: memaudit generate)
    files = [root / "model_index.json"] + [root / d / f for d in loaded for f in _CONFIG_FILES]
    for f in files:
        if f.is_file() and (value := read_json(f)).get("auto_map"):
            where = f.relative_to(root).as_posix()
            named = json.dumps(value["auto_map"])
            named = named if len(named) <= 200 else named[:200] + " ..."
            raise ModelError(f"--model {name}: {where} names code of its own (auto_map {named}): memaudit never runs "
                             "code from a model folder (no trust_remote_code); use a folder whose components are "
                             "diffusers and transformers classes")
    for comp, entry in index.items():
        if comp in loaded and isinstance(entry, list) and entry and entry[0] is not None and entry[0] not in _LIBRARIES:
            raise ModelError(f"--model {name}: model_index.json names {comp} as {json.dumps(entry)}, a class from "
                             f"the folder's own code: memaudit loads {comp} with diffusers or transformers classes "
                             "only and never runs code from a model folder")


def load_tokenizer(root: Path, component: str = "tokenizer"):
    """``AutoTokenizer.from_pretrained(root / component)`` with ``trust_remote_code=False``: never the folder's own
    code, and never transformers' question on stdin whether to run it (:func:`check_no_remote_code` refuses such a
    folder first, in one line)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(root) / component, trust_remote_code=False)


# suffixes of pickled PyTorch weights (diffusers' and transformers' .bin, a training script's .ckpt / .pt / .pth)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
# the one-file safetensors name from_pretrained reads: diffusers' components, and transformers' (text encoders)
_SAFETENSORS_NAME = {"text_encoder": "model.safetensors"}  # (text_encoder_2, _3 too); others: diffusers'
# converts pickled state dicts (argv: source, destination, ...) to safetensors, unpickling tensors only (no single
# quote inside: shlex.quote wraps it in one pair)
_CONVERT = ("import sys, torch, safetensors.torch as st; a = sys.argv[1:]; [st.save_file({k: v.contiguous().clone() "
            'for k, v in torch.load(s, map_location="cpu", weights_only=True).items()}, d, metadata={"format": "pt"}) '
            "for s, d in zip(a[::2], a[1::2])]")


def pickled_only(root: Path, components) -> dict[str, list[str]]:
    """The weights components among ``components`` (``text_encoder*``, ``unet``, ``transformer``, ``vae``) whose
    folders under ``root`` hold pickled weights (:data:`PICKLE_SUFFIXES`) and no ``.safetensors`` file:
    ``{component: [file names]}``, in ``components``' order."""
    found = {}
    for comp in components:
        folder = Path(root) / comp
        if comp.startswith(("text_encoder", "unet", "transformer", "vae")) and folder.is_dir():
            files = sorted(p.name for p in folder.iterdir() if p.is_file())
            if not any(f.endswith(".safetensors") for f in files) and (
                    pickled := [f for f in files if f.endswith(PICKLE_SUFFIXES)]):
                found[comp] = pickled
    return found


def no_safetensors_error(name: str, root: Path, component: str, components=()) -> ModelError | None:
    """The one-line refusal of a component folder ``root / component`` that holds no ``.safetensors`` file, or None
    where it holds one.

    Where it holds pickled weights (``diffusion_pytorch_model.bin``, which ``save_pretrained(safe_serialization=
    False)`` writes) the line names them and gives one command that converts, in place, the one pickled file of
    each such folder among ``component`` and ``components`` (:func:`pickled_only`) to the safetensors file
    ``from_pretrained`` reads (``diffusion_pytorch_model.safetensors``; ``model.safetensors`` for a text encoder),
    to run where the files are trusted (``torch.load(weights_only=True)``): memaudit itself never unpickles. A
    component with several pickled files (shards) is named, with ``save_pretrained`` as the way. Where it holds no
    weight file at all it says so (a half-copied folder; for a hub id, a repository that publishes no safetensors
    for it, since memaudit fetches those only).
    """
    import shlex

    from audit.text import visible

    folder = Path(root) / component
    if any(p.suffix == ".safetensors" for p in folder.iterdir()):
        return None
    pickled = pickled_only(root, dict.fromkeys((component, *components)))
    if component in pickled:
        shown = ", ".join(f"{c}/{f}" for c, files in pickled.items() for f in files)
        if all(len(files) == 1 for files in pickled.values()):
            paths = [str(Path(root) / c / x) for c, files in pickled.items()
                     for x in (files[0], _SAFETENSORS_NAME.get(c.rstrip("_23"), "diffusion_pytorch_model.safetensors"))]
            how = (f"convert them once, in place, where you trust the files: python -c {shlex.quote(_CONVERT)} "
                   + " ".join(shlex.quote(x) for x in paths))
        else:
            how = ("load each such component with diffusers or transformers where you trust the files and "
                   "save_pretrained it again (safetensors is their default)")
        return ModelError(visible(f"--model {name}: {component}/ has no .safetensors weights, only pickled ones "
                                  f"({shown}), and memaudit never loads pickle: {how}"))
    if names_hub_id(str(name)):
        return ModelError(f"--model {name}: {component}/ has no .safetensors weights: memaudit fetches and loads "
                          ".safetensors only, and this repository publishes none for it")
    return ModelError(f"--model {name}: {component}/ has no .safetensors weights, nor any weight file (a folder "
                      "copied in part?)")


def check_components(name: str, root: Path, pipeline_class: str, components) -> None:
    """Raise a one-line ModelError when ``root`` lacks one of ``components`` (sub-folders) or when a
    weights folder among them has no ``.safetensors`` file (memaudit never loads pickled weights:
    :func:`no_safetensors_error` says how to convert them)."""
    missing = [c for c in components if not (Path(root) / c).is_dir()]
    if missing:
        raise ModelError(f"--model {name}: a {pipeline_class or 'diffusers'} folder missing "
                         f"{', '.join(c + '/' for c in missing)} (memaudit needs {', '.join(components)})")
    for comp in components:
        if comp.startswith(("text_encoder", "unet", "transformer")):
            if (error := no_safetensors_error(name, root, comp, components)) is not None:
                raise error


class ModelAdapter:
    """One model family: how to load it and drive its denoiser (UNet or transformer) at the first step.
    Subclass per family (:mod:`audit.models.sd1`, :mod:`audit.models.sd2`, :mod:`audit.models.sdxl`,
    :mod:`audit.models.pixart`, :mod:`audit.models.sd3`) and register an instance with
    :func:`audit.models.register_family`.

    Attributes:
        name: family name (``sd1``).
        pipeline_classes: ``model_index.json`` ``_class_name`` values this family loads.
        components: the sub-folders it needs.
        has_bos: position 0 of every tokenized prompt is a BOS token (CLIP). False for T5 (PixArt): then
            ``bos_mass`` is NaN (not applicable) and trigger tokens start at position 0.
        default_layer_note: how the default layer was chosen and whether it is validated (shown by
            ``memaudit layers``).
    """

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()
    components: tuple[str, ...] = COMPONENTS
    has_bos: bool = True
    default_layer_note: str = ""

    def matches(self, root: Path) -> bool:
        """Whether the folder ``root`` (whose pipeline class is one of ``pipeline_classes``) is this family's;
        refined by families that share a pipeline class (SD 2.x and SD 1.x both declare
        ``StableDiffusionPipeline``). Reads config files only."""
        return True

    def load(self, name: str, root: Path, device, dtype) -> LoadedModel:
        """Load the components (torch modules) onto ``device`` (a name: auto, cpu, mps, cuda, cuda:N) in ``dtype``
        (auto, float32, float16, bfloat16), resolved by :func:`resolve_device` / :func:`resolve_dtype`.

        Raises:
            ModelError: the folder cannot be loaded (missing or non-safetensors weights, a bad configuration).
        """
        raise NotImplementedError

    def tokenize(self, model: LoadedModel, prompts: list[str]) -> Tokens:
        """The family's tokenization of normalized prompts (:func:`tokenize` with the first tokenizer and
        L = ``model.max_length``); not thread-safe (the scorer holds a lock around it)."""
        return tokenize(model.tokenizer, prompts, model.max_length)

    def encode(self, model: LoadedModel, tokens: Tokens, text_encoder=None):
        """Text conditioning of ``tokens`` (host arrays; the adapter moves them to the device): a
        :class:`Conditioning`, or a bare embeddings tensor [B, L, D] when there is nothing else to carry.
        ``text_encoder`` may be a compiled wrapper of ``model.text_encoder``."""
        raise NotImplementedError

    def unconditional(self, model: LoadedModel, tokens: Tokens, text_encoder=None):
        """The conditioning of classifier-free guidance's unconditional branch, batch of one, given the
        empty prompt's ``tokens``: by default the encoded empty prompt (SD 1.x/2.x, PixArt)."""
        return self.encode(model, tokens, text_encoder)

    def unet_kwargs(self, cond) -> dict:
        """Keyword arguments of the denoiser call that carry the conditioning ``cond`` (a
        :class:`Conditioning` or an embeddings tensor [N, L, D]): ``encoder_hidden_states``, plus
        ``encoder_attention_mask`` when the conditioning has a mask (the ONE place it is produced) and
        ``added_cond_kwargs`` when it has added tensors."""
        if not isinstance(cond, Conditioning):
            return {"encoder_hidden_states": cond}
        kwargs = {"encoder_hidden_states": cond.embeddings}
        if cond.mask is not None:
            kwargs["encoder_attention_mask"] = cond.mask
        if cond.added:
            kwargs["added_cond_kwargs"] = dict(cond.added)
        return kwargs

    def forward(self, denoiser, x, t, cond):
        """The denoiser's prediction at input ``x`` [N, C, H, W] (model dtype), timestep ``t`` (0-d tensor on
        the device) and conditioning ``cond``, in the model's parametrization (:meth:`prediction_type`),
        [N, C, H, W]. Default: ``unet(x, t, **unet_kwargs(cond)).sample`` (the SD pipelines' call)."""
        return denoiser(x, t, **self.unet_kwargs(cond)).sample

    def scheduler(self, scheduler_config: dict, num_inference_steps: int):
        """The scheduler built from ``scheduler_config`` after ``set_timesteps(num_inference_steps)``; its
        ``timesteps[0]`` is t0 (no weights needed)."""
        raise NotImplementedError

    def first_input(self, scheduler, noise, t0):
        """The denoiser's input at the first step from standard normal ``noise`` [N, C, H, W]:
        ``scale_model_input(noise * init_noise_sigma, t0)``, as the diffusers pipelines prepare it (the
        identity for DDIM; Euler's 1/sqrt(sigma^2 + 1) scaling of its sigma-scaled latents)."""
        return scheduler.scale_model_input(noise * scheduler.init_noise_sigma, t0)

    def check_scorer(self, forward: str) -> None:
        """Raise a one-line ModelError when a scorer needing ``forward`` (a key of
        :data:`audit.scorers.registry.FORWARDS`) cannot be defined on this family; called before scoring."""
        return None

    def layer_note(self, default_layers: list[str]) -> str:
        """How the default layers were chosen and whether they are validated (``memaudit layers``):
        :attr:`default_layer_note`."""
        return self.default_layer_note

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

    def denoiser_from_config(self, root: Path):
        """The family's denoiser (UNet or transformer) built from the folder's configuration file on the meta device:
        its module paths only, no weights read or allocated."""
        raise NotImplementedError

    def default_layers_from_config(self, root: Path, extra: dict | None = None) -> list[str]:
        """:meth:`default_layers` from the folder's configuration files only (no weights are loaded), unless
        ``memaudit.json`` names the layers."""
        if extra and extra.get("default_layers"):
            return list(extra["default_layers"])
        return self.default_layers(self.denoiser_from_config(root), extra)

    def layers_from_config(self, root: Path) -> list[str]:
        """:meth:`cross_attention_layers` from the folder's configuration files only (no weights are loaded): what
        ``memaudit run --dry-run`` checks ``--layers`` against, as the run checks them against the loaded model."""
        return self.cross_attention_layers(self.denoiser_from_config(root))

    @property
    def denoiser_component(self) -> str:
        """The folder of the denoiser: ``transformer`` for the families that have one (PixArt, SD 3.x), else
        ``unet``."""
        return "transformer" if "transformer" in self.components else "unet"

    def cross_attention_names(self, modules: set[str]) -> set[str]:
        """Among the module paths ``modules`` of the denoiser's weights (:func:`weight_module_names`), those that
        :meth:`cross_attention_layers` lists: an ``attn2`` attention module (one with a ``to_q`` projection: a
        diffusers ``Attention``), as :func:`audit.capture.cross_attention_layers` selects them. Equal to
        :meth:`layers_from_config` as a set on every family's folder (tested); overridden with the family's rule
        where :meth:`cross_attention_layers` is."""
        return {m for m in modules if m.endswith("attn2") and f"{m}.to_q" in modules}

    def layers_from_weights(self, root: Path) -> set[str] | None:
        """:meth:`cross_attention_layers` as a set, read from the names in the denoiser's safetensors headers
        (:func:`weight_module_names`: no torch, diffusers or weights; about a millisecond for the lab model), or
        None where there is no weights file or a header cannot be read. What ``memaudit run --dry-run`` accepts a
        ``memaudit.json``'s default layers by without building the denoiser
        (:func:`audit.runner.check_default_layers`)."""
        modules = weight_module_names(Path(root) / self.denoiser_component)
        return None if modules is None else self.cross_attention_names(modules)


def ddim_from_config(scheduler_config: dict, num_inference_steps: int):
    """DDIM built from a model's scheduler configuration, whatever DDPM-family class it names (PNDM, LMS, Euler,
    DPM-Solver: their betas and spacing), after ``set_timesteps(num_inference_steps)``, as Ren et al.'s code
    (SD 1.x) and Wen et al.'s and Asthana & Belagiannis's ``detect_mem.py`` replace a pipeline's scheduler
    (``DDIMScheduler.from_config``).

    Raises:
        ModelError: a flow-matching scheduler (it has no betas: DDIM would fall back to its default linear schedule
            and score at a first step the model was never trained on) or a class diffusers does not have.
    """
    import diffusers

    cls = scheduler_config.get("_class_name", "DDIMScheduler")
    check_ddpm_scheduler(cls)
    if not (isinstance(cls, str) and cls.endswith("Scheduler") and hasattr(diffusers, cls)):
        raise ModelError(f"scheduler {cls!r}: not a diffusers scheduler class; memaudit builds this family's first "
                         "step with DDIM from the folder's noise schedule")
    scheduler = diffusers.DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


MAX_TRAIN_TIMESTEPS = 100_000  # a scheduler config's num_train_timesteps above this is refused (SD: 1000)


def check_scheduler_config(scheduler_config: dict) -> None:
    """Refuse a ``num_train_timesteps`` that is not a whole number from 1 to :data:`MAX_TRAIN_TIMESTEPS` before
    any scheduler is built from it: diffusers allocates that many betas (10**10 asked for 40 GB; SD 3.x's
    flow-matching scheduler is built while the model loads). Called from :func:`audit.models.detect_family`, so
    reading a model's identity and loading it both check it first.

    Raises:
        ModelError: naming the value.
    """
    trained = scheduler_config.get("num_train_timesteps", 1000)
    if isinstance(trained, bool) or not isinstance(trained, int) or not 1 <= trained <= MAX_TRAIN_TIMESTEPS:
        raise ModelError(f"scheduler_config.json: num_train_timesteps {trained!r} is not a whole number from 1 to "
                         f"{MAX_TRAIN_TIMESTEPS:,} (1000 for every Stable Diffusion)")


def check_steps_trained(scheduler_config: dict, num_inference_steps: int) -> None:
    """Refuse more scheduler steps (``--steps``) than the scheduler's training timesteps, from its configuration
    alone (no scheduler is built: ``run --dry-run`` checks it without importing diffusers).

    Raises:
        ModelError: naming ``--steps`` and the scheduler's count.
    """
    check_scheduler_config(scheduler_config)
    trained = scheduler_config.get("num_train_timesteps", 1000)
    if num_inference_steps > trained:
        raise ModelError(f"--steps {num_inference_steps}: more than the {trained} training timesteps of the model's "
                         "scheduler (50, the default, is what the published scores use)")


def check_ddpm_scheduler(cls) -> None:
    """Refuse a flow-matching scheduler class for a family scored on a DDPM noise schedule (every family but SD
    3.x).

    Raises:
        ModelError: ``cls`` names a flow-matching scheduler (``FlowMatch...``).
    """
    if isinstance(cls, str) and cls.startswith("FlowMatch"):
        raise ModelError(f"scheduler {cls}: a flow-matching schedule in a family memaudit scores on a DDPM noise "
                         "schedule (its first timestep, the noise-prediction conversion and DDIM's betas would all "
                         "be invented); flow-matching models are scored as SD 3.x folders")


def _shape(s) -> str:
    return "[" + ", ".join(str(int(d)) for d in s) + "]"


# safetensors' names of the dtypes that no float model's weights are stored in: an integer or boolean tensor named
# as a weight or bias is a quantized checkpoint (its scales elsewhere, or lost), which the libraries cast to float
_NOT_FLOAT = ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL")
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files ``from_pretrained(path)`` reads with no variant: the component's one file, or the
    shards its ``*.safetensors.index.json`` names."""
    for stem in _WEIGHT_FILES:
        index = path / f"{stem}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            except (ValueError, AttributeError, OSError):
                return []  # from_pretrained says what is wrong with it
            return [path / s for s in shards if isinstance(s, str) and (path / s).is_file()]
        if (path / stem).is_file():
            return [path / stem]
    return []


WEIGHT_COMPONENTS = ("text_encoder", "unet", "transformer", "vae")  # folder-name prefixes of weights components


def unloaded_files(folder: Path) -> list[Path]:
    """The weight files of the component folder ``folder`` (a ``text_encoder*``, ``unet``, ``transformer`` or ``vae``
    folder, :data:`WEIGHT_COMPONENTS`) that loading it does not read, sorted: its ``.safetensors`` files other than
    :func:`_weight_files` (a ``fp16`` or ``non_ema`` variant beside the plain file or shards, which ``from_pretrained``
    without ``variant=`` never reads) and a variant's shard index (``*.safetensors.index.fp16.json``). Empty for any
    other folder, and where :func:`_weight_files` finds no plain weights (the load refuses the folder then, saying
    why). The one rule :func:`unloaded_weights_note` warns by and :func:`fingerprint_files` leaves out by."""
    folder = Path(folder)
    if not folder.name.startswith(WEIGHT_COMPONENTS) or not folder.is_dir():
        return []
    loaded = set(_weight_files(folder))
    if not loaded:
        return []
    indexes = {folder / f"{stem}.index.json" for stem in _WEIGHT_FILES}
    return sorted(p for p in folder.iterdir() if p.is_file() and p not in loaded and (
        p.suffix == ".safetensors" or (p.suffix == ".json" and ".safetensors.index." in p.name and p not in indexes)))


def unloaded_weights_note(name: str, root: Path, components) -> str | None:
    """The warning for ``.safetensors`` files in a local model folder that memaudit does not load, or None: in a
    weights component of ``components`` (``text_encoder*``, ``unet``, ``transformer``, ``vae``) the files
    :func:`unloaded_files` names (a ``fp16`` or ``non_ema`` variant beside the plain file: ``from_pretrained`` without
    ``variant=`` reads the plain one, whatever the variant holds), and any at the folder's top level (a LoRA such
    as ``pytorch_lora_weights.safetensors``, or a single-file checkpoint: never applied). Without it a newer
    fine-tune saved with ``variant="fp16"`` beside an older plain file was scored as the older one, and a LoRA left
    beside the weights was not applied, in silence. None for a hub id (its variants are the publisher's copies).
    Reads the folder's file names only."""
    from audit.text import visible

    root = Path(root)
    if names_hub_id(str(name)) or not root.is_dir():
        return None
    unused: list[str] = []
    variants = False
    for comp in components:
        extra = [p.name for p in unloaded_files(root / comp)]
        variants = variants or bool(extra)
        unused += [f"{comp}/{f}" for f in extra]
    outside = sorted(p.name for p in root.iterdir() if p.suffix == ".safetensors" and p.is_file())
    unused += outside
    if not unused:
        return None
    shown = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
    why = []
    if variants:
        why.append("each component is scored with the weights from_pretrained reads without variant= (its plain file, "
                   "or the shards its .index.json names), never a variant such as fp16 nor a file beside the shards "
                   "(save the pipeline again without variant= to score a variant)")
    if outside:
        why.append("a file beside the components, such as a LoRA, is not applied (fuse it into the weights and save "
                   "the pipeline to score it)")
    return visible(f"--model {name}: not loaded: {shown}: {'; '.join(why)}")


def ignored_config_keys_note(name: str, root: Path, components) -> str | None:
    """The warning for keys of a diffusers component's ``config.json`` (``unet``, ``transformer``, ``vae`` among
    ``components``) that its class does not take, or None: diffusers builds the model without them (a key
    misspelled, ``cross_attention_dims``, leaves the real one at its default) and says so only in a log line
    ("... are not expected and will be ignored. Please verify your config.json"), which memaudit's quiet loading
    hides. The keys are those ``cls.extract_init_dict`` leaves unused, ``_``-prefixed metadata excepted; the class
    is the one the config's ``_class_name`` names. Reads config files (imports diffusers)."""
    import diffusers

    from audit.text import visible

    found = []
    for comp in components:
        config_file = Path(root) / comp / "config.json"
        if not comp.startswith(("unet", "transformer", "vae")) or not config_file.is_file():
            continue
        config = read_json(config_file, missing={})
        cls = getattr(diffusers, str(config.get("_class_name")), None)
        if not isinstance(cls, type) or not hasattr(cls, "extract_init_dict"):
            continue
        try:
            _, unused, _ = cls.extract_init_dict(dict(config))
        except Exception:  # noqa: BLE001 - loading the component says what is wrong with its config
            continue
        found += [f"{comp}/config.json {k}" for k in sorted(unused) if not str(k).startswith("_")]
    if not found:
        return None
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    return visible(f"--model {name}: ignored, as keys the installed diffusers {diffusers.__version__} does not take: "
                   f"{shown} (the model is built without them: a misspelled key leaves the real one at its default, "
                   "a key of a newer diffusers is not applied)")


def index_class_note(name: str, root: Path, components) -> str | None:
    """The warning for a weights component (``text_encoder*``, ``unet``, ``transformer``, ``vae`` among
    ``components``) that ``model_index.json`` names with a class other than the one its own ``config.json``
    describes (diffusers' ``_class_name``, transformers' first ``architectures`` entry; :data:`CLASS_ALIASES` taken
    as equal), or None. memaudit builds the component its family loads from that config (a UNet whose config names
    another class is refused, :func:`load_weights`), where diffusers' pipeline would build model_index.json's class:
    a folder whose two files disagree (``["diffusers", "UNet2DModel"]``, a class diffusers does not have) was scored
    without a word. Reads config files only."""
    from audit.text import visible

    index = read_json(Path(root) / "model_index.json", missing={})
    found = []
    for comp in components:
        entry = index.get(comp)
        config_file = Path(root) / comp / "config.json"
        if (not comp.startswith(("text_encoder", "unet", "transformer", "vae")) or not isinstance(entry, list)
                or len(entry) != 2 or not isinstance(entry[1], str) or not config_file.is_file()):
            continue
        config = read_json(config_file, missing={})
        architectures = config.get("architectures")
        described = config.get("_class_name") or (architectures[0] if isinstance(architectures, list) and architectures
                                                  else None)
        named = entry[1]
        if (isinstance(described, str) and named != described and named not in CLASS_ALIASES.get(described, ())
                and described not in CLASS_ALIASES.get(named, ())):
            found.append(f"{comp} as {named} where {comp}/config.json describes a {described}")
    if not found:
        return None
    return visible(f"--model {name}: model_index.json names {'; '.join(found)}: memaudit loads what the config "
                   "describes, where diffusers' pipeline would build model_index.json's class; fix the one that is "
                   "wrong")


# the keys of SD v1.4's unet/config.json as first published (diffusers 0.2): every diffusers save of a
# UNet2DConditionModel has written them since, so a config without one was written by hand or cut
UNET_CORE_KEYS = ("sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
                  "down_block_types", "up_block_types", "block_out_channels", "layers_per_block", "downsample_padding",
                  "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
                  "attention_head_dim")


def missing_core_keys_note(name: str, root: Path, components) -> str | None:
    """The warning for a ``UNet2DConditionModel`` config (``unet`` among ``components``) that lacks one of
    :data:`UNET_CORE_KEYS`, or None. diffusers builds the UNet with the class's default, and where that default
    changes no tensor's shape (``attention_head_dim``: the number of heads; ``norm_eps``, ``act_fn``) the weights
    load and the model scores, computed otherwise than it was trained (a config without ``attention_head_dim`` of a
    model trained with 2 heads scored with 8). Reads config files only."""
    from audit.text import visible

    config_file = Path(root) / "unet" / "config.json"
    if "unet" not in components or not config_file.is_file():
        return None
    config = read_json(config_file, missing={})
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        return None
    lacking = [k for k in UNET_CORE_KEYS if k not in config]
    if not lacking:
        return None
    return visible(f"--model {name}: unet/config.json lacks {', '.join(lacking)}, which every diffusers save writes: "
                   "the UNet is built with the class's default for it, which may not be how it was trained (the "
                   "number of attention heads, a norm's epsilon); restore it from the training run's config")


def model_notes(name: str, root: Path, components, config_keys: bool = True) -> list[str]:
    """The warnings about a local model folder that loading it does not raise: weights not loaded
    (:func:`unloaded_weights_note`), component classes model_index.json names otherwise than their configs
    (:func:`index_class_note`), a UNet config without a key every diffusers save writes
    (:func:`missing_core_keys_note`) and config keys ignored (:func:`ignored_config_keys_note`, left out with
    ``config_keys=False``: it imports diffusers, which ``memaudit run --dry-run`` does not), for the run, the
    Python API, ``memaudit generate`` and the dry run to say in one line each."""
    notes = (unloaded_weights_note, index_class_note, missing_core_keys_note) + (
        (ignored_config_keys_note,) if config_keys else ())
    return [n for n in (note(name, root, components) for note in notes) if n]


def weight_module_names(path: Path) -> set[str] | None:
    """Every module path above a tensor of the component folder ``path``'s safetensors files
    (:func:`_weight_files`; a module ``P`` holds the tensors ``P.*``, so ``a.b.weight`` gives ``a`` and ``a.b``),
    read from the files' headers alone, without torch or diffusers (the safetensors format: an 8-byte little-endian
    header length, then a JSON object naming each tensor; https://github.com/huggingface/safetensors#format);
    ``None`` where there is no file or a header cannot be read (loading the model says why)."""
    files = _weight_files(Path(path))
    if not files:
        return None
    keys: set[str] = set()
    for f in files:
        try:
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                if not 2 <= size <= 100_000_000:  # safetensors' own limit on a header is 100 MB
                    return None
                header = json.loads(fh.read(size))
        except (OSError, ValueError):
            return None
        if not isinstance(header, dict):
            return None
        keys.update(k for k in header if k != "__metadata__")
    return {k[:i] for k in keys for i, c in enumerate(k) if c == "."}  # every module path above a tensor


def names_without_weights(path: Path, names) -> list[str] | None:
    """The module paths among ``names`` under which the component folder ``path``'s safetensors files hold no
    tensor (:func:`weight_module_names`), in ``names``' order; ``None`` where there is no file or a header cannot
    be read. A name that holds tensors may still not be a cross-attention layer (an ``attn1``, a whole block):
    :meth:`ModelAdapter.layers_from_weights` applies the family's rule to these names."""
    modules = weight_module_names(path)
    return None if modules is None else [n for n in names if n not in modules]


def check_float_weights(name: str, path: Path, component: str) -> None:
    """Refuse a component whose safetensors files store a weight or bias (a tensor named ``*.weight`` or ``*.bias``)
    as integers or booleans (int8, uint8, ...): a quantized checkpoint. transformers casts such a tensor to the
    model's float dtype and scores with it (int8 values of a weight scaled by 100 scored, exit 0); diffusers fails
    with "Only Tensors of floating point and complex dtype can require gradients". Reads only the files' headers.

    Raises:
        ModelError: naming the first such tensor, its dtype and how many there are; or a file whose header safetensors
            cannot read (naming it and safetensors' reason).
    """
    from safetensors import safe_open

    found: list[tuple[str, str]] = []
    for f in _weight_files(path):
        try:
            open(f, "rb").close()
        except OSError as exc:  # safetensors reports a file it may not open as "No such file or directory"
            raise ModelError(f"--model {name}: {component}/{f.name} cannot be read ({exc.strerror or exc})") from None
        try:
            with safe_open(str(f), framework="numpy") as fh:  # headers only: no torch import (read_identity)
                for key in fh.keys():
                    if key.endswith((".weight", ".bias")) and (dt := fh.get_slice(key).get_dtype()) in _NOT_FLOAT:
                        found.append((key, dt))
        except Exception as exc:  # noqa: BLE001 - a header that lies (offsets past the file, a size of 2**62), not
            # safetensors at all, unreadable: from_pretrained said only "Unable to load weights from checkpoint file"
            raise ModelError(f"--model {name}: {component}/{f.name} is not a readable safetensors file "
                             f"({type(exc).__name__}: {str(exc)[:200]}): a damaged or partial download, or another "
                             "format under this name") from None
    if found:
        key, dt = sorted(found)[0]
        raise ModelError(f"--model {name}: {component}/ stores {len(found)} weight tensor(s) as integers, the first "
                         f"{key} ({dt}): a quantized checkpoint, which would be scored as if its integers were the "
                         "weights; memaudit scores float32, float16 or bfloat16 weights: dequantize it first")


def check_weight_files(name: str, root: Path, components) -> None:
    """Refuse, from file names and safetensors headers only (no tensor is read), a weights component of
    ``components`` (``text_encoder*``, ``unet``, ``transformer``) whose weights ``from_pretrained`` could not read:
    no plain weights file (a folder holding only ``fp16`` variant weights: :func:`cannot_load`'s hint), a plain
    file that is a link to nothing (a hub cache copied without its blobs), shards that its ``.index.json`` names
    but the folder lacks, and a file whose header is not safetensors or does not cover the file (empty, truncated:
    :func:`check_float_weights`). Called by :func:`audit.models.read_identity`, :func:`audit.models.load_model` and
    ``memaudit run --dry-run``, so that the dry run and a Ray run's driver refuse such a folder as loading it would,
    before any worker starts.

    Raises:
        ModelError: one line naming the component and the file.
    """
    root = Path(root)
    for comp in components:
        path = root / comp
        if not comp.startswith(("text_encoder", "unet", "transformer")) or not path.is_dir():
            continue
        for stem in _WEIGHT_FILES:
            index, plain = path / f"{stem}.index.json", path / stem
            if index.is_file():
                try:
                    names = json.loads(index.read_text()).get("weight_map", {}).values()
                except (ValueError, AttributeError, OSError) as exc:
                    raise ModelError(f"--model {name}: {comp}/{index.name} is not a shard index "
                                     f"({type(exc).__name__}: {str(exc)[:120]})") from None
                lacking = sorted({n for n in names if isinstance(n, str) and not (path / n).is_file()})
                if lacking:
                    raise ModelError(f"--model {name}: {comp}/{index.name} names {len(lacking)} shard(s) the folder "
                                     f"lacks, the first {lacking[0]}: a partial download or copy")
                break
            if plain.is_symlink() and not plain.exists():
                raise ModelError(f"--model {name}: {comp}/{stem} is a link to {os.readlink(plain)}, which does not "
                                 "exist (a hub cache copied without its blobs?)")
        if not _weight_files(path):
            held = sorted(p.name for p in path.iterdir() if p.suffix == ".safetensors")
            if not held:
                continue  # check_components says what the folder holds instead
            expected = _SAFETENSORS_NAME.get(comp.rstrip("_23"), "diffusion_pytorch_model.safetensors")
            variants = sorted({f.split(".")[-2] for f in held if f.count(".") >= 2})
            shown = ", ".join(held[:3]) + (" ..." if len(held) > 3 else "")
            if variants:
                raise ModelError(f"--model {name}: {comp}/ holds only {', '.join(repr(v) for v in variants)} variant "
                                 f"weights ({shown}) and no {expected}: memaudit loads each component's plain "
                                 "weights, as from_pretrained without variant= does; save the pipeline again without "
                                 f"variant= (or copy the variant file to {expected})")
            raise ModelError(f"--model {name}: {comp}/ has no {expected} (it holds {shown}): weights under another "
                             "name are not loaded")
        check_float_weights(name, path, comp)


# class names a component's config.json may give for the class memaudit loads it with: PixArt-alpha's published
# transformer/config.json names Transformer2DModel, from before diffusers had PixArtTransformer2DModel
CLASS_ALIASES = {"PixArtTransformer2DModel": ("Transformer2DModel",)}


# parts of the tensor names of LoRA adapters saved unmerged (peft's lora_A / lora_B over a base_layer, DoRA's
# magnitude vector, diffusers' older lora_layer and kohya-style lora_down / lora_up)
LORA_MARKERS = (".lora_A.", ".lora_B.", ".base_layer.", ".lora_magnitude_vector", ".lora_layer.", ".lora_down.",
                ".lora_up.")


def _config_defaults(cls, config_file: Path) -> dict:
    """``{key: default}`` for the keys of ``cls``'s configuration (a diffusers class's ``__init__`` arguments, a
    transformers model's ``config_class`` attributes) that ``config_file`` lacks: what ``from_pretrained`` fills in.
    ``{}`` where it cannot tell (no config file, a class of neither kind)."""
    import inspect

    config = read_json(config_file, missing={}) if config_file.is_file() else None
    if config is None:
        return {}
    try:
        if (config_class := getattr(cls, "config_class", None)) is not None:
            known = config_class().to_dict()
        else:
            known = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                     if p.default is not inspect.Parameter.empty}
    except Exception:  # noqa: BLE001 - a message helper: never the reason a load fails
        return {}
    return {k: v for k, v in known.items() if k not in config and not k.startswith("_")}


def load_weights(name: str, root: Path, component: str, cls, dtype):
    """``cls.from_pretrained(root / component)`` from safetensors only, refusing weights that do not match the
    component's ``config.json``.

    diffusers and transformers load a checkpoint that lacks some of the tensors its config describes (a
    half-saved file, a config from another model) and fill the missing ones with random values, saying so only in
    a log line; they also load one whose extra tensors the config leaves out (a text encoder config with fewer
    layers), dropping them. Either way the model scores, and its scores mean nothing. Shape mismatches they
    refuse, but transformers' message points at a log report that is not shown, and diffusers' lists every
    tensor on one line; the first mismatched tensor is named here instead.

    Args:
        name: the ``--model`` value, for the message; root: the model folder; component: its sub-folder
            (``unet``, ``text_encoder``, ...); cls: the diffusers or transformers class; dtype: ``torch_dtype``.
    Returns:
        the loaded module.
    Raises:
        ModelError: a diffusers component whose config.json names another class (another family's denoiser);
            missing, unexpected or mismatched tensors (one line, naming the first and how many), LoRA adapters
            saved unmerged (:data:`LORA_MARKERS`, said as such rather than as missing tensors); weights
            stored as integers (:func:`check_float_weights`).
        Exception: whatever ``from_pretrained`` raises otherwise (callers wrap it with :func:`cannot_load`).
    """
    path = Path(root) / component
    named = read_json(path / "config.json", missing={}).get("_class_name") if (path / "config.json").is_file() else None
    if isinstance(named, str) and named != cls.__name__ and named not in CLASS_ALIASES.get(cls.__name__, ()):
        # another model's denoiser in this folder (a PixArt transformer in unet/): diffusers' own error was about
        # a config key it could not use ("can't multiply sequence by non-int of type 'NoneType'")
        raise ModelError(f"--model {name}: {component}/config.json describes a {named}, but this folder's pipeline "
                         f"needs a {cls.__name__} there (a component from another model family)")
    check_float_weights(name, path, component)
    where = f"--model {name}: {component}/"
    defaults = _config_defaults(cls, path / "config.json")  # the keys config.json lacks, with the values taken
    try:
        try:
            module, info = cls.from_pretrained(path, use_safetensors=True, torch_dtype=dtype, output_loading_info=True)
        except RuntimeError as exc:
            if "ignore_mismatched_sizes" not in str(exc):
                raise
            try:  # load again keeping the mismatched tensors out, only to name them
                module, info = cls.from_pretrained(path, use_safetensors=True, torch_dtype=dtype,
                                                   output_loading_info=True, ignore_mismatched_sizes=True)
            except Exception:
                raise exc from None
            if not info.get("mismatched_keys"):
                raise
    except Exception as exc:
        # diffusers' ValueError names the default it took ("`block_out_channels`: (320, 640, 1280, 1280)"), not that
        # config.json lacks the key
        if lacking := [k for k in defaults if k in str(exc)]:
            raise ModelError(f"{where}config.json lacks {', '.join(lacking)}, so its class's default was taken, and "
                             f"the model cannot be built ({type(exc).__name__}: {str(exc)[:300]})") from None
        raise
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        key, ckpt, model = mismatched[0]
        # a lacking key whose default is one of the config's side of the shape: hidden_size 512 in [77, 512]
        lacking = [k for k, v in defaults.items() if isinstance(v, int) and not isinstance(v, bool)
                   and v in {int(d) for d in model} and v not in {int(d) for d in ckpt}]
        said = (f" ({component}/config.json lacks {', '.join(lacking)}: its class's default "
                f"{', '.join(str(defaults[k]) for k in lacking)} was taken)") if lacking else ""
        raise ModelError(f"{where} weights do not match {component}/config.json: {len(mismatched)} tensor(s) differ in "
                         f"shape, the first {key} ({_shape(ckpt)} in the weights, {_shape(model)} by the config)"
                         f"{said}")
    lora = sorted(k for k in info.get("unexpected_keys") or [] if any(m in f".{k}" for m in LORA_MARKERS))
    if lora:  # the base weights sit under .base_layer., so the layers' own tensors read as missing: not a half-save
        raise ModelError(f"{where} weights hold {len(lora)} LoRA tensor(s) not merged into the layers, the first "
                         f"{lora[0]} (a model saved with its LoRA adapters unfused): merge them and save the pipeline "
                         "again (diffusers: pipe.fuse_lora(), then pipe.unload_lora_weights(); peft: "
                         "merge_and_unload())")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(f"{where} weights lack {len(missing)} tensor(s) that {component}/config.json describes, "
                         f"the first {missing[0]} (a half-saved folder, or a config from another model): "
                         "memaudit does not score randomly initialized weights")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        raise ModelError(f"{where} weights hold {len(unexpected)} tensor(s) that {component}/config.json does not "
                         f"describe, the first {unexpected[0]} (a config from another model)")
    return module


def check_vocab(name: str, tokenizer, text_encoder, tokenizer_dir: str = "tokenizer",
                encoder_dir: str = "text_encoder") -> None:
    """Refuse a tokenizer whose token ids reach past its text encoder's embedding table (another model's
    tokenizer): every prompt would fail to score with an ``IndexError``.

    Also refuse a tokenizer with no vocabulary besides its special tokens (a folder whose ``tokenizer.json`` is
    missing, with no ``vocab.json`` either: transformers loads it, and every prompt reads as unknown tokens, scored
    as such, exit 0).

    Raises:
        ModelError: ``len(tokenizer)`` exceeds the text encoder's input embeddings (one line, naming both), the
            tokenizer holds only its special tokens, or its ``model_max_length`` is not from 2 to the text encoder's
            ``max_position_embeddings`` (a CLIP encoder; a T5 encoder has no such limit).
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if len(tokenizer) <= len(special):
        raise ModelError(f"--model {name}: {tokenizer_dir}/ holds no vocabulary, only its {len(tokenizer)} special "
                         "token(s) (its tokenizer.json, or vocab.json and merges.txt, missing or empty): every prompt "
                         "would be read as unknown tokens")
    length = getattr(tokenizer, "model_max_length", None)
    limit = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and (not isinstance(length, int) or isinstance(length, bool) or not 2 <= length <= limit):
        # a CLIP text encoder (learned positions) takes at most `limit` tokens; the tokenizer pads every prompt to
        # model_max_length, so any other value failed every prompt ("Maximum allowed dimension exceeded", "could not
        # broadcast ...") after the model loaded
        raise ModelError(f"--model {name}: {tokenizer_dir}/ pads prompts to model_max_length {length!r} tokens but "
                         f"{encoder_dir}/ takes 2 to {limit:,} (max_position_embeddings): fix model_max_length in "
                         f"{tokenizer_dir}/tokenizer_config.json")
    table = text_encoder.get_input_embeddings().num_embeddings
    if len(tokenizer) > table:
        raise ModelError(f"--model {name}: {tokenizer_dir}/ has {len(tokenizer):,} tokens but {encoder_dir}/ embeds "
                         f"only {table:,}: the tokenizer belongs to another model")


def check_width(name: str, produced: int, produced_by: str, expected, expected_by: str) -> None:
    """Refuse text conditioning whose width the denoiser does not take: ``produced`` features per token (or per
    pooled vector) from ``produced_by`` (e.g. ``text_encoder/'s hidden_size``) against ``expected`` (an int,
    or a per-block list or tuple of ints, as ``UNet2DConditionModel``'s ``cross_attention_dim`` may be) from
    ``expected_by``. Without this check every prompt failed to score with a matrix-shape error after the model
    loaded (exit 4, a run folder of ``scoring_error`` rows).

    Raises:
        ModelError: one line naming both widths and where each comes from.
    """
    widths = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    if any(isinstance(w, int) and not isinstance(w, bool) and w != produced for w in widths):
        said = expected if not isinstance(expected, (list, tuple)) else list(expected)
        raise ModelError(f"--model {name}: the text conditioning is {produced} wide ({produced_by}) but {expected_by} "
                         f"is {said}: the components come from different models")


def cannot_load(name: str, root: Path, exc: BaseException) -> ModelError:
    """The one-line error for a model folder that diffusers or transformers could not load, naming the weight
    variants found where the plain weights are missing (``diffusion_pytorch_model.fp16.safetensors`` only: memaudit
    loads a folder's plain weights, as ``from_pretrained`` does without ``variant=``). A :class:`ModelError`
    (from :func:`load_weights`) is returned as it is."""
    if isinstance(exc, ModelError):
        return exc
    variants = sorted({p.name.split(".")[-2] for p in Path(root).glob("*/*.safetensors")
                       if p.name.count(".") >= 2 and not (p.parent / (p.name.split(".")[0] + ".safetensors")).exists()})
    hint = (f"; the folder holds only {', '.join(repr(v) for v in variants)} variant weights: save the pipeline "
            "again without variant= (or copy the variant file to the plain name)") if variants else ""
    return ModelError(f"--model {name}: cannot load ({type(exc).__name__}: {exc}){hint}")
