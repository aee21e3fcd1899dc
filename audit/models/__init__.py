"""Model families behind one adapter interface, and loading a model by hub id or local folder.

Owns the family registry: ``model_index.json``'s pipeline class picks the adapter
(:mod:`audit.models.sd1` for SD 1.x and the lab model, :mod:`audit.models.sd2`, :mod:`audit.models.sdxl`,
:mod:`audit.models.pixart`, :mod:`audit.models.sd3`; :data:`REFUSED` names known classes memaudit refuses, with the reason). Adding a family is one adapter module plus one
:func:`register_family` line here. Must not import scorers, engines, the pipeline or outputs; importing
this package imports no torch (adapters import it when they load).
"""

from __future__ import annotations

from pathlib import Path

from audit.errors import ModelError
from audit.models.base import (COMPONENTS, MEMAUDIT_FILE, LoadedModel, ModelAdapter, ModelIdentity,
                               fingerprint_files, read_extra, read_json, resolve_device, resolve_dtype,
                               resolve_model_dir)
from audit.models.sd1 import SD1, SD1_DEFAULT_LAYER, default_layers
from audit.models.sd2 import SD2
from audit.models.sdxl import SDXL
from audit.models.pixart import PIXART
from audit.models.sd3 import SD3

FAMILIES: dict[str, ModelAdapter] = {}

# pipeline classes memaudit knows and refuses, with the reason (said in the one-line error before scoring)
REFUSED = {
    "StableDiffusionXLImg2ImgPipeline": "the SDXL refiner / img2img (text_encoder_2 only, aesthetic-score "
    "time_ids) denoises a given image from an intermediate step; memaudit scores the text-to-image first step "
    "from pure noise",
    "FluxPipeline": "FLUX.1 (joint and single blocks) has no adapter yet; its guidance-distilled variants have "
    "no unconditional branch, so the noise-based scorers cannot apply to them",
}


def register_family(adapter: ModelAdapter, replace: bool = False) -> ModelAdapter:
    """Add a model family (an adapter instance) to :data:`FAMILIES`; returns it. The family registered last is asked
    first for a pipeline class it shares with others (:func:`detect_family`). Registering an instance of the same
    adapter class again replaces it; another adapter under a registered name only with ``replace`` (it would take
    over every folder of that family: ``name = "sd1"`` in a subclass replaced SD 1.x silently).

    Raises:
        ValueError: not a :class:`ModelAdapter` instance (a class, not an instance); a ``name`` that is not a letter
            then letters, digits or underscores; ``pipeline_classes`` or ``components`` not a non-empty tuple of
            non-empty strings (a bare string matched every class that is a substring of it:
            ``"StableDiffusionPipeline"`` claimed ``Pipeline``-named folders and, registered last, SD 1.x's); a name
            taken by another adapter (without ``replace``).
    """
    import re

    if not isinstance(adapter, ModelAdapter):
        raise ValueError(f"register_family() takes a ModelAdapter instance, not {adapter!r}")
    name = adapter.name
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", name):
        raise ValueError(f"model family name {name!r}: give a letter then letters, digits or underscores")
    for field in ("pipeline_classes", "components"):
        value = getattr(adapter, field)
        if not isinstance(value, (tuple, list)) or not value or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"model family {name}: {field} {value!r} is not a non-empty tuple of names "
                             f"(write ({value!r},) for one)" if isinstance(value, str) else
                             f"model family {name}: {field} {value!r} is not a non-empty tuple of names")
    old = FAMILIES.get(name)
    if old is not None and not replace and type(old) is not type(adapter):
        raise ValueError(f"model family {name} is already registered ({type(old).__module__}.{type(old).__qualname__}): "
                         f"give yours another name, or register_family(adapter, replace=True)")
    FAMILIES[name] = adapter
    return adapter


register_family(SD1)
register_family(SD2)
register_family(SDXL)
register_family(PIXART)
register_family(SD3)


def detect_family(root: Path, name: str | None = None) -> tuple[ModelAdapter, str]:
    """The adapter for the diffusers folder ``root`` and the pipeline class it declares, after checking that
    the folder holds the components that family needs (config files only: no weights are read).

    Families that share a pipeline class are told apart by :meth:`ModelAdapter.matches`; the one registered
    last is asked first (SD 2.x refines SD 1.x's ``StableDiffusionPipeline``).

    Raises:
        ModelError (one line, before anything is scored): a scheduler config's ``num_train_timesteps`` out of
            range (:func:`audit.models.base.check_scheduler_config`); no ``model_index.json``; a pipeline class of no
            registered family (naming it, the reason when memaudit knows one, and the supported classes);
            a missing component folder or weights that are not safetensors; a folder naming code of its own
            (``auto_map``, a custom class: :func:`audit.models.base.check_no_remote_code`).
    """
    from audit.models.base import check_components, check_no_remote_code, check_scheduler_config

    index = Path(root) / "model_index.json"
    by_class: dict[str, list[str]] = {}
    for a in FAMILIES.values():
        for c in a.pipeline_classes:
            by_class.setdefault(c, []).append(a.name)
    supported = ", ".join(f"{c} ({', '.join(names)})" for c, names in by_class.items())
    try:
        has_index = index.is_file()
    except OSError as exc:  # a folder this user may not search (chmod 700 by another user)
        raise ModelError(f"--model {name or root}: cannot be read ({exc.strerror or exc})") from None
    if not has_index:
        raise ModelError(f"--model {name or root}: no model_index.json, so not a diffusers pipeline folder; "
                         f"supported: {supported}")
    cls = read_json(index).get("_class_name", "")
    for adapter in reversed(list(FAMILIES.values())):
        if cls in adapter.pipeline_classes and adapter.matches(Path(root)):
            check_components(name or str(root), Path(root), cls, adapter.components)
            check_no_remote_code(name or str(root), Path(root))
            check_scheduler_config(read_json(Path(root) / "scheduler" / "scheduler_config.json", missing={}))
            return adapter, cls
    why = f" ({REFUSED[cls]})" if cls in REFUSED else ""
    raise ModelError(f"--model {name or root}: model_index.json declares {cls or 'no _class_name'}, which memaudit "
                     f"does not support{why}; supported: {supported}")


def adapter_of(model: LoadedModel) -> ModelAdapter:
    """The adapter of a loaded model (SD 1.x for a :class:`LoadedModel` assembled in code without one)."""
    return model.adapter if model.adapter is not None else SD1


def read_identity(model: str) -> ModelIdentity:
    """The identity of ``model`` (hub id or local folder) without loading any weights: its folder, family and
    fingerprint (config and weight files are hashed, not loaded). Raises ModelError, also for weight files that
    loading would refuse (:func:`audit.models.base.check_weight_files`: headers read, no tensor)."""
    from audit.models.base import check_weight_files

    name, root = resolve_model_dir(model)
    adapter, cls = detect_family(root, model)
    check_weight_files(model, root, adapter.components)  # as loading would refuse them: a Ray run's driver, a rerun
    return ModelIdentity(name, root, fingerprint_files(root), adapter, cls, read_extra(root),
                         read_json(root / "scheduler" / "scheduler_config.json", missing={}))


def load_model(model: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load ``model`` (hub id such as ``CompVis/stable-diffusion-v1-4``, or a local diffusers folder) with its
    family's adapter, onto ``device`` (auto, cpu, mps, cuda, cuda:N) in ``dtype`` (auto, float32, float16,
    bfloat16). Transformers' and diffusers' logging levels and progress bars are quieted while it loads and
    put back as they were afterwards (:func:`audit.models.base.quiet_loading`).

    Raises:
        ModelError: unfetchable hub id, unsupported pipeline class, missing components, non-safetensors
            weights, or an unloadable folder.
    """
    from audit.models.base import quiet_loading

    from audit.models.base import check_weight_files

    name, root = resolve_model_dir(model)
    adapter, _ = detect_family(root, model)
    check_weight_files(model, root, adapter.components)  # only variants, a dangling link, missing shards: said plainly
    with quiet_loading():  # the caller's logging levels and progress bars are put back afterwards
        return adapter.load(name, root, device, dtype)


__all__ = ["COMPONENTS", "FAMILIES", "MEMAUDIT_FILE", "PIXART", "REFUSED", "SD1", "SD2", "SD3", "SDXL", "SD1_DEFAULT_LAYER", "LoadedModel", "adapter_of", "ModelAdapter",
           "ModelError", "ModelIdentity", "default_layers", "detect_family", "fingerprint_files", "load_model",
           "read_extra", "read_identity", "register_family", "resolve_device", "resolve_dtype", "resolve_model_dir"]
