"""Model families behind one adapter interface, and loading a model by hub id or local folder.

Owns the family registry: ``model_index.json``'s pipeline class picks the adapter
(:mod:`audit.models.sd1` for SD 1.x and the lab model). Adding a family is one adapter module plus one
:func:`register_family` line here. Must not import scorers, engines, the pipeline or outputs; importing
this package imports no torch (adapters import it when they load).
"""

from __future__ import annotations

import json
from pathlib import Path

from audit.errors import ModelError
from audit.models.base import (COMPONENTS, MEMAUDIT_FILE, LoadedModel, ModelAdapter, ModelIdentity,
                               fingerprint_files, read_extra, resolve_device, resolve_dtype, resolve_model_dir)
from audit.models.sd1 import SD1, SD1_DEFAULT_LAYER, default_layers

FAMILIES: dict[str, ModelAdapter] = {}


def register_family(adapter: ModelAdapter) -> ModelAdapter:
    """Add a model family (an adapter instance) to :data:`FAMILIES`; returns it."""
    FAMILIES[adapter.name] = adapter
    return adapter


register_family(SD1)


def detect_family(root: Path, name: str | None = None) -> tuple[ModelAdapter, str]:
    """The adapter for the diffusers folder ``root`` and the pipeline class it declares.

    A folder without ``model_index.json`` is taken as SD 1.x (its loader then names what is missing).

    Raises:
        ModelError: the declared pipeline class belongs to no registered family (names both).
    """
    index = Path(root) / "model_index.json"
    if not index.is_file():
        return SD1, ""
    cls = json.loads(index.read_text()).get("_class_name", "")
    for adapter in FAMILIES.values():
        if cls in adapter.pipeline_classes:
            return adapter, cls
    supported = ", ".join(f"{c} ({a.name})" for a in FAMILIES.values() for c in a.pipeline_classes)
    raise ModelError(f"--model {name or root}: model_index.json declares {cls or 'no _class_name'}, which memaudit "
                     f"does not support; supported: {supported}")


def adapter_of(model: LoadedModel) -> ModelAdapter:
    """The adapter of a loaded model (SD 1.x for a :class:`LoadedModel` assembled in code without one)."""
    return model.adapter if model.adapter is not None else SD1


def read_identity(model: str) -> ModelIdentity:
    """The identity of ``model`` (hub id or local folder) without loading any weights: its folder, family and
    fingerprint (config and weight files are hashed, not loaded). Raises ModelError."""
    name, root = resolve_model_dir(model)
    adapter, cls = detect_family(root, model)
    sched = root / "scheduler" / "scheduler_config.json"
    return ModelIdentity(name, root, fingerprint_files(root), adapter, cls, read_extra(root),
                         json.loads(sched.read_text()) if sched.is_file() else {})


def load_model(model: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load ``model`` (hub id such as ``CompVis/stable-diffusion-v1-4``, or a local diffusers folder) with its
    family's adapter, onto ``device`` (auto, cpu, cuda, cuda:N) in ``dtype`` (auto, float32, float16,
    bfloat16).

    Raises:
        ModelError: unfetchable hub id, unsupported pipeline class, missing components, non-safetensors
            weights, or an unloadable folder.
    """
    name, root = resolve_model_dir(model)
    adapter, _ = detect_family(root, model)
    return adapter.load(name, root, device, dtype)


__all__ = ["COMPONENTS", "FAMILIES", "MEMAUDIT_FILE", "SD1", "SD1_DEFAULT_LAYER", "LoadedModel", "adapter_of", "ModelAdapter",
           "ModelError", "ModelIdentity", "default_layers", "detect_family", "fingerprint_files", "load_model",
           "read_extra", "read_identity", "register_family", "resolve_device", "resolve_dtype", "resolve_model_dir"]
