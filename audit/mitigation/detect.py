"""Detect and mitigate in one generation, at zero extra UNet forwards: memaudit's design, built from Ren et al.'s
(ECCV 2024) first-step attention entropy (their detection metric E) and inference-time mitigation rule; the paper
detects and mitigates in separate steps.

During the real generation, the first UNet forward (step 0, t0 = 981 for SD 1.x DDIM at 50 steps) runs
unmitigated while the processors of the detection layers record the cross-attention of the conditional
rows. Just before the second forward (a forward pre-hook on the UNet), the attention entropy of each
conditional row is computed exactly as ``memaudit run`` scores a prompt:

    a = mean over heads and query pixels of P = softmax(Q K^T * scale)   float32 [n_cond, L], per layer
    a = mean over the detection layers;  E = -sum_j a_j log a_j   (float64, natural log, 0 log 0 = 0)

(README, "The method"; Ren et al.'s metric E; reference renjie3/MemAttn ``detect.py`` mode E: layer index 3, step 0).
A row is flagged when E > threshold (``memaudit calibrate``'s rule), and from the second step on the
inference-time rule (:mod:`audit.mitigation.inference`) applies to the flagged rows only (both halves of
their guidance pair). The first step is never mitigated in ``flagged`` mode: detection needs it. In ``always``
mode every layer is mitigated from the first step, so no unmitigated first-step attention exists to detect on
(the detection layers' inputs come from mitigated layers): ``entropy``, ``bos_mass`` and ``flagged`` stay None.

The entropy is the scorer's for the same first-step latent: the scorer draws that latent from the prompt
hash, a generation from its own seed, so a threshold calibrated by ``memaudit calibrate`` applies as a
distribution-level threshold (same model, layers, t0 and one noise draw: :func:`check_detection_calibration`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from audit.mitigation.inference import (Mitigation, MitigationError, _call_parameters, _PerThread, check_flag_options,
                                        timesteps_other_than)

MODES = ("off", "always", "flagged")


class DetectAndMitigate(Mitigation):
    """Context manager: first-step detection plus mitigation from the second step, in one pipeline call.

    Usage::

        with DetectAndMitigate(pipe, calibration="cal.json") as dm:   # a `memaudit calibrate` file
            images = pipe(prompts, num_images_per_prompt=2).images
        dm.entropy, dm.flagged, dm.mitigated     # float64 / bool tensors [n_cond], prompt-major

    Args:
        pipe: a diffusers SD 1.x/2.x pipeline (see :func:`audit.mitigation.inference.check_pipeline`).
        threshold: flag when E > threshold, E in nats (natural log): the ``threshold`` of a ``memaudit calibrate``
            file of the attention_entropy scorer (a number, not NaN); None only with ``mode`` "off" or "always"
            (no flags).
        layers: ``attn2`` module paths whose attention is averaged; default: the 4th in call order
            (``down_blocks.1.attentions.1.transformer_blocks.0.attn2`` in SD 1.x), or the last if fewer.
        c1, mask_summary, mask_eos: the inference-time rule.
        mode: "flagged" (mitigate flagged rows from step 1), "always" (every row from step 0; no detection:
            see the module docstring), "off" (detection only).
        calibration: a ``memaudit calibrate`` file (its path, or its JSON as a dict) instead of ``threshold`` and
            ``layers``: they are read from it, and it is checked as ``memaudit generate --calibration`` checks it
            where a pipeline call can tell: attention-entropy scorer, one noise draw, the model's fingerprint when
            the pipeline was loaded from a local folder (``pipe.name_or_path``), and at each call's first UNet
            forward (before any image is made) the first timestep, which depends on ``num_inference_steps`` and
            the scheduler (SD 1.x DDIM at 50 steps: 981; at 25: 961; DPM-Solver or Euler with ``linspace``
            spacing: 999), and the UNet's dtype. A plain ``threshold`` is not checked: the pipeline call must then
            match the calibration's ``num_inference_steps``, scheduler and dtype by hand.

    Attributes (after a pipeline call; each call in the block replaces them, so they describe the last
    one made in the thread that reads them; calls from several threads at once each detect on their own
    prompts): ``entropy`` float64 [n_cond] (NaN if not finite), ``bos_mass``
    float64 [n_cond] (a_0, the first step's attention mass on BOS), ``flagged`` bool
    [n_cond] (E > threshold; all False without a threshold), all three None in "always" mode; ``mitigated`` bool
    [n_cond], True where at least one UNet forward ran with the rule on the row (in "flagged" mode, from the second
    forward: a flagged image of a one-step call is not mitigated; a row whose entropy is NaN, such as a float16
    overflow, cannot be cleared and is mitigated too, though not flagged);
    ``forwards``: UNet forwards counted in this context; ``scored_with``: what the call's entropy was scored with
    (:func:`detection_scored_with`: the rows of its UNet forward as ``batch_size``, ``compile``, ``device``), None
    in "always" mode. With a ``calibration`` that records its reference run's settings (``memaudit calibrate``
    does), a call scored with other settings that move risks by float rounding (another batch size, ``--compile``,
    device) is warned once, with the line ``memaudit run --calibration`` prints (``UserWarning``,
    :func:`settings_warning`): an image whose risk is at the threshold may be flagged or not by that rounding alone.

    Raises:
        MitigationError: bad mode, a threshold that is not a number (or NaN), a ``calibration`` given with
            ``threshold`` or ``layers``, or one that does not fit (another scorer, several noise draws; at a
            pipeline call, another first timestep or dtype), layers that are not a list of
            this UNet's attn2 names, a pipeline that starts from an input image (img2img, inpainting: its first
            step is not the one the threshold was calibrated at), or the first forward did not report every
            detection layer; the rule's options or the pipeline, as :class:`audit.mitigation.inference.Mitigation`
            refuses them; entering it while another Mitigation is active on the pipeline.
    """

    detects = True  # never nested with another Mitigation on the same pipeline (Mitigation.__enter__)

    # one pipeline call's detection, per thread as the rest of a call's state (Mitigation)
    _step = _PerThread(0)
    entropy = _PerThread()
    bos_mass = _PerThread()
    flagged = _PerThread()
    mitigated = _PerThread()
    scored_with = _PerThread()

    def __init__(self, pipe, threshold: float | None = None, layers: Sequence[str] | None = None,
                 c1: float = 1.25, mask_summary: bool = True, mask_eos: bool = False, mode: str = "flagged",
                 calibration=None):
        super().__init__(pipe, c1=c1, mask_summary=mask_summary, mask_eos=mask_eos)
        self.calibration_t0 = self.calibration_dtype = None
        self.reference_scored_with = None  # a calibration's reference settings (reference.scored_with), if recorded
        self._warned: set[str] = set()
        if calibration is not None:
            threshold, layers = self._read_calibration(calibration, threshold, layers)
        if "image" in _call_parameters(pipe):  # img2img, inpainting, depth2img, upscalers
            raise MitigationError(f"{type(pipe).__name__} starts from an input image: its first step is not pure "
                                  "noise at the first timestep, where the entropy and its calibrated threshold are "
                                  "defined (Ren et al.'s metric E); detect with a text-to-image pipeline "
                                  "(StableDiffusionPipeline), or mitigate without detection (mitigate(pipe))")
        if mode not in MODES:
            raise MitigationError(f"mode {mode!r}: choose off, always or flagged")
        if mode == "flagged" and threshold is None:
            raise MitigationError("mode 'flagged' needs a threshold (from a calibration of this model)")
        check_flag_options(threshold, layers)
        if layers is None:
            layers = [self.layers[3] if len(self.layers) > 3 else self.layers[-1]]
        layers = list(layers)
        unknown = [name for name in layers if name not in self.layers]
        if not layers:
            raise MitigationError(f"layers is empty: give one or more of this UNet's cross-attention layers "
                                  f"({', '.join(self.layers)}), or None for the default")
        if unknown:
            raise MitigationError(f"not a cross-attention layer of this UNet: {', '.join(unknown)}; "
                                  f"cross-attention layers: {', '.join(self.layers)}")
        self.mode = mode
        self.threshold = None if threshold is None else float(threshold)
        self.record_layers = set(layers)
        self.detect_layers = list(layers)
        self.forwards = 0
        self._step = 0
        self._hook = None
        self.entropy: torch.Tensor | None = None
        self.bos_mass: torch.Tensor | None = None
        self.flagged: torch.Tensor | None = None
        self.mitigated: torch.Tensor | None = None
        self.scored_with: dict | None = None

    def _read_calibration(self, calibration, threshold, layers):
        """``(threshold, layers)`` of a calibration (path or dict); records the first timestep and dtype that each
        pipeline call is checked against (:meth:`_check_call`)."""
        from pathlib import Path

        if threshold is not None or layers is not None:
            raise MitigationError("give calibration, or threshold and layers, not both: the calibration's threshold "
                                  "holds for its own layers")
        if isinstance(calibration, (str, Path)):
            from audit.calibrate import load_calibration

            calibration = load_calibration(calibration)
        if not isinstance(calibration, dict) or not isinstance(calibration.get("score_config"), dict) \
                or "threshold" not in calibration:
            raise MitigationError("calibration must be a `memaudit calibrate` file (its path or its JSON as a dict)")
        sc = calibration["score_config"]
        steps = sc.get("num_inference_steps")
        layers = check_detection_calibration(calibration, steps if isinstance(steps, int) else 0)
        self._check_model(calibration)
        t0, dtype = sc.get("first_timestep"), sc.get("dtype")
        self.calibration_t0 = t0 if isinstance(t0, int) and not isinstance(t0, bool) else None
        self.calibration_steps = steps
        self.calibration_dtype = dtype if isinstance(dtype, str) else None
        reference = calibration.get("reference")
        used = reference.get("scored_with") if isinstance(reference, dict) else None
        self.reference_scored_with = used if isinstance(used, dict) else None
        return calibration["threshold"], layers

    def _check_model(self, calibration: dict) -> None:
        """Refuse a calibration made for another model, when the pipeline was loaded from a local folder
        (``pipe.name_or_path``, as ``from_pretrained(FOLDER)`` sets it): its fingerprint (``memaudit run``'s, over the
        weight, tokenizer and scheduler files) must be the calibration's. A pipeline from a hub id or assembled in
        code carries no folder to compare: not checked."""
        from pathlib import Path

        recorded = calibration.get("model", {}).get("fingerprint") if isinstance(calibration.get("model"), dict) \
            else None
        folder = getattr(self.pipe, "name_or_path", None)
        if not isinstance(recorded, str) or not isinstance(folder, str) or not folder or not Path(folder).is_dir():
            return
        if (found := folder_fingerprint(Path(folder))) != recorded:
            raise MitigationError(f"the calibration was made for another model [{recorded}], not this pipeline's "
                                  f"{folder} [{found}]: calibrate on a `memaudit run` of this model")

    def _check_call(self, module, args, kwargs) -> None:
        """At a call's first UNet forward: refuse a first timestep or dtype other than the calibration's (its
        threshold holds at its own t0 and dtype only), before any step is taken."""
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        values = None if self.calibration_t0 is None or t is None else timesteps_other_than(t, self.calibration_t0)
        if values is not None:
            raise MitigationError(f"the calibration was scored at first timestep {self.calibration_t0}; this call's "
                                  f"first step is at {values[0]:g} (another num_inference_steps or scheduler), where "
                                  "its threshold does not apply: call with the calibration's num_inference_steps "
                                  f"({self.calibration_steps}) and the scheduler memaudit scores with (SD 1.x: DDIM "
                                  "from the model's scheduler config; SD 2.x: the folder's own), or calibrate on a run "
                                  "at that first timestep")
        dtype = str(getattr(module, "dtype", "")).replace("torch.", "")
        if self.calibration_dtype is not None and dtype and dtype != self.calibration_dtype:
            raise MitigationError(f"the calibration was scored in {self.calibration_dtype}; this UNet runs in {dtype}, "
                                  "which moves the entropy by more than a threshold's margin: calibrate on a run "
                                  f"made with --dtype {dtype}")

    def __enter__(self):
        super().__enter__()
        self._hook = self.unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self._post_hook = self.unet.register_forward_hook(self._post_forward)
        return self

    def __exit__(self, *exc) -> None:
        self._check_exit_order()  # before the hook goes: a refused exit changes nothing
        if self._hook is not None:
            self._hook.remove()
            self._post_hook.remove()
            self._hook = self._post_hook = None
        super().__exit__(*exc)
        return None

    def _needs_lengths(self) -> bool:
        return self.mode != "off" and super()._needs_lengths()  # "off" never mitigates

    def _on_prompts(self) -> None:
        self._step = 0
        self.recording = self.mode != "always"  # always: mitigated from step 0, nothing unmitigated to detect on
        self.recorded = {}
        self.entropy = self.bos_mass = self.flagged = self.mitigated = self.scored_with = None
        n = self.n_cond
        self.active = torch.ones(n, dtype=torch.bool) if self.mode == "always" else torch.zeros(n, dtype=torch.bool)
        if self.mode == "always":
            self.mitigated = self.active.clone() if not self.rule.identity else torch.zeros(n, dtype=torch.bool)

    def _pre_forward(self, module, args, kwargs) -> None:
        if self._step == 0 and self.recording:  # the first forward of a call that detects
            self._check_call(module, args, kwargs)
            self._note_settings(module, args, kwargs)
        self.forwards += 1
        if self._step == 1 and self.recording:
            self._decide()
        if self._step == 1 and self.mode == "flagged" and self.active is not None and not self.rule.identity:
            self.mitigated = self.active.clone()  # the flagged rows' first mitigated forward is this one
        self._step += 1

    def _note_settings(self, module, args, kwargs) -> None:
        """At a detecting call's first UNet forward: record what its entropy is scored with (:attr:`scored_with`,
        :func:`detection_scored_with`) and, where the calibration recorded its reference run's settings and they
        differ in a setting that moves risks by float rounding, warn once per line (``UserWarning``,
        :func:`settings_warning`), as ``memaudit run --calibration`` warns."""
        import warnings

        sample = args[0] if args else kwargs.get("sample")
        rows = int(sample.shape[0]) if getattr(sample, "shape", None) else None
        self.scored_with = detection_scored_with(module, rows)
        line = settings_warning(self.reference_scored_with, self.scored_with)
        if line is not None and line not in self._warned:
            self._warned.add(line)
            warnings.warn(line, UserWarning, stacklevel=2)

    def _post_forward(self, module, args, output) -> None:
        """After the first step's UNet forward: decide at once, so that the detection of a one-step call is there
        when the call returns (it waited for a second forward, or the block's exit)."""
        if self._step == 1 and self.recording and self.recorded:
            self._decide()

    def _decide(self) -> None:
        """Entropy of the first step's conditional rows, flags, and the rows mitigated from now on."""
        from audit.scorers.attention_entropy import attention_entropy

        self.recording = False
        missing = [name for name in self.detect_layers if name not in self.recorded]
        if missing:
            raise MitigationError(f"first-step capture incomplete: no attention from {', '.join(missing)} "
                                  "(was the layer's processor replaced?)")
        n = self.n_cond
        a = torch.stack([self.recorded[name][-n:] for name in self.detect_layers]).mean(dim=0)  # [n, L]
        entropy = attention_entropy(a.double()).cpu()  # the one host synchronization of the generation
        undecided = ~torch.isfinite(entropy)
        entropy = torch.where(undecided, torch.full_like(entropy, float("nan")), entropy)
        self.recorded = {}
        self.entropy = entropy
        self.bos_mass = a[:, 0].double().cpu()
        self.flagged = entropy > self.threshold if self.threshold is not None else torch.zeros(n, dtype=torch.bool)
        if self.mode == "flagged":  # mitigated from the next forward on: none yet (a one-step call has none)
            # a row whose entropy is not finite cannot be cleared: mitigated as a flagged one is (fail closed, as
            # the training filter drops such samples), though not flagged, which says E > threshold
            self.active = self.flagged | undecided
            self.mitigated = torch.zeros(n, dtype=torch.bool)
        else:
            self.mitigated = self.active.clone() if not self.rule.identity else torch.zeros(n, dtype=torch.bool)
        self._cache = {}


def detection_scored_with(unet, rows: int | None) -> dict:
    """What a generation's first-step entropy is scored with, in the form of a run manifest's ``scored_with``
    (:func:`audit.pipeline.scored_with_summary`: per setting a list of its values; ``mixed`` empty): ``batch_size``,
    the rows of the UNet forward (``rows``: prompts x images per prompt, twice that with classifier-free guidance,
    whose unconditional rows share the forward: :func:`generation_rows`; a calibration's reference run of the
    attention-entropy scorer at one noise draw, the only kind detection takes, ran ``--batch-size`` rows a forward;
    ``auto`` when unknown), ``compile`` (the UNet compiled with ``torch.compile``: an ``OptimizedModule`` or a module
    compiled in place) and ``device`` (:func:`audit.models.base.device_kind` of the UNet's device: the kind of
    device, its torch threads, a reduced float32 precision). These are :data:`audit.pipeline.ROUNDING_SETTINGS`, the
    settings whose change moves a risk by float rounding."""
    from audit.models.base import device_kind

    compiled = hasattr(unet, "_orig_mod") or getattr(unet, "_compiled_call_impl", None) is not None
    device = getattr(unet, "device", None)
    if device is None:
        device = next(unet.parameters()).device
    return {"batch_size": [rows if rows else "auto"], "compile": [bool(compiled)], "device": [device_kind(device)],
            "mixed": []}


def generation_rows(pipe, images: int, guidance: float) -> int:
    """The rows of a ``StableDiffusionPipeline`` call's UNet forward for one prompt and ``images`` images per prompt:
    twice ``images`` when the call runs classifier-free guidance (diffusers' ``do_classifier_free_guidance``:
    ``guidance_scale > 1`` and a UNet without ``time_cond_proj_dim``), else ``images``."""
    cond_proj = getattr(getattr(pipe.unet, "config", None), "time_cond_proj_dim", None)
    return images * (2 if guidance > 1 and cond_proj is None else 1)


def settings_warning(reference: dict | None, used: dict | None, whose: str = "this generation") -> str | None:
    """The warning line when a generation's first-step detection (``used``: :func:`detection_scored_with`) is scored
    with other settings that move risks by float rounding than the calibration's reference run (``reference``: the
    calibration's ``reference.scored_with``, recorded by :func:`audit.calibrate.calibrate`), else None (also when
    either is None: a calibration of an earlier memaudit makes no claim). The line and its rule are
    :func:`audit.pipeline.reference_settings_warning`'s, ``whose`` naming the generation: a prompt at the threshold
    may be flagged or not by that rounding alone."""
    from audit.pipeline import reference_settings_warning

    return reference_settings_warning({"calibration": {"reference_scored_with": reference}, "scored_with": used},
                                      whose)


_FINGERPRINTS: dict = {}


def folder_fingerprint(root) -> str:
    """:func:`audit.models.base.fingerprint_files` of a model folder, computed once per process for the same files
    (names, sizes and modification times), since hashing SD's weights takes seconds."""
    from pathlib import Path

    from audit.models.base import FINGERPRINT_SUFFIXES, FINGERPRINTED, MEMAUDIT_FILE, fingerprint_files

    root = Path(root).resolve()
    stats = []
    for comp in FINGERPRINTED:
        if (root / comp).is_dir():
            stats += [(f"{comp}/{p.name}", p.stat().st_size, p.stat().st_mtime_ns)
                      for p in sorted((root / comp).iterdir()) if p.is_file() and p.suffix in FINGERPRINT_SUFFIXES]
    # memaudit.json, and the files holding an SDXL folder's settings outside the components (model_index.json,
    # vae/config.json: audit.models.base.settings_outside_components)
    extras = tuple(p.stat().st_mtime_ns if p.is_file() else None
                   for p in (root / MEMAUDIT_FILE, root / "model_index.json", root / "vae" / "config.json"))
    key = (str(root), tuple(stats), extras)
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = fingerprint_files(root)
    return _FINGERPRINTS[key]


def check_detection_calibration(cal: dict, steps: int, model_fingerprint: str | None = None,
                                first_timestep: int | None = None, dtype: str | None = None) -> list[str]:
    """Check a ``memaudit calibrate`` file fits first-step detection in a generation; return its layers.

    The threshold means something only for the same model, the attention-entropy scorer, the same layers,
    the same first timestep (``num_inference_steps``, since t0 depends on it, and ``first_timestep``: the
    generation's sampler's t0, against the one the calibration records, since SD 2.0's scorer steps with the
    folder's Euler scheduler, t0 = 999, and a DDIM generation starts at 981), one noise draw (the entropy of
    a mean over K draws is on another scale) and, when ``dtype`` is given (``float32``, ``bfloat16``, ...), the
    dtype the reference was scored in (bfloat16 moves a risk by more than a float32 threshold's margin, and
    ``memaudit run --calibration`` refuses it too).

    Raises:
        MitigationError: naming what differs, or a malformed field (score_config or model not an object, no
            integer num_inference_steps or noise_draws, no list of layers).
    """
    where = cal.get("_path", "calibration")
    sc, model = cal.get("score_config"), cal.get("model")
    if not isinstance(sc, dict) or not isinstance(model, dict):
        raise MitigationError(f"--calibration {where}: score_config and model must be objects; make it again with "
                              "`memaudit calibrate`")
    if not isinstance(sc.get("num_inference_steps"), int) or isinstance(sc.get("num_inference_steps"), bool):
        raise MitigationError(f"--calibration {where} records no num_inference_steps (the first timestep depends "
                              "on it); make it again with `memaudit calibrate`")
    draws = sc.get("noise_draws", 1)
    if not isinstance(draws, int) or isinstance(draws, bool):
        raise MitigationError(f"--calibration {where}: noise_draws {draws!r} is not an integer")
    if model_fingerprint is not None and model.get("fingerprint") != model_fingerprint:
        raise MitigationError(f"--calibration {where} was made for another model "
                              f"[{model.get('fingerprint')}], not this one [{model_fingerprint}]")
    if sc.get("scorer") != "attention_entropy":
        raise MitigationError(f"--calibration {where} is for scorer {sc.get('scorer')!r}; detection during a "
                              "generation uses attention_entropy")
    if draws != 1:
        raise MitigationError(f"--calibration {where} averages {sc.get('noise_draws')} noise draws; a generation "
                              "sees one: calibrate a run made with --noise-draws 1")
    if sc["num_inference_steps"] != int(steps):
        raise MitigationError(f"--calibration {where} was made at num_inference_steps "
                              f"{sc.get('num_inference_steps')} (another first timestep); generate with --steps "
                              f"{sc.get('num_inference_steps')} or calibrate again")
    if dtype is not None and isinstance(sc.get("dtype"), str) and sc["dtype"] != dtype:
        raise MitigationError(f"--calibration {where} was scored in {sc['dtype']}; this generation runs in {dtype}: "
                              f"generate with --dtype {sc['dtype']} or calibrate on a run made with --dtype {dtype}")
    recorded = sc.get("first_timestep")  # the scorer's t0: the model's scheduler (SD 2.0: Euler, 999)
    if first_timestep is not None and isinstance(recorded, int) and recorded != int(first_timestep):
        raise MitigationError(f"--calibration {where} was scored at first timestep {recorded}; this generation's "
                              f"sampler starts at {int(first_timestep)} (another scheduler or timestep spacing), so "
                              "its threshold does not apply: sample with the scheduler the scorer took, as memaudit "
                              "generate does (DDIM from the model's scheduler config for SD 1.x, the folder's own "
                              "for SD 2.x: SD 2.0's Euler starts at 999)")
    layers = sc.get("layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(x, str) for x in layers):
        raise MitigationError(f"--calibration {where} names no layers (a list of attn2 module paths)")
    return layers
