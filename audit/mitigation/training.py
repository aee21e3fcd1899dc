"""Training-time mitigation: drop samples that look memorized from the loss, batch by batch.

A diffusers-style training loop (``train_text_to_image.py``) calls the hook once per batch with what it
already has (its UNet, text embeddings, noisy latents and timesteps); the hook returns a per-sample score
and a boolean ``keep`` mask, and :func:`masked_loss` averages the loss over the kept samples only.

Two scores, both at the batch's own (random) training timesteps:

* ``attention_entropy`` (Ren et al., ECCV 2024, arXiv 2403.11052): a = mean over heads and query pixels
  of P = softmax(Q K^T * scale) (float32) in the selected ``attn2`` layer(s), averaged over layers;
  E = -sum_j a_j log a_j over the L token positions (``torch.special.xlogy``). Flagged when E > threshold.
  The paper describes removing samples whose attention marks them as memorized from the training loss;
  its repository (renjie3/MemAttn) has NO code for it, and we could not read the paper's section here,
  so the timestep, layers and threshold are ours to choose: the batch's timesteps, the scorer's default
  layer, and a threshold from ``memaudit calibrate`` (flag when E > threshold, as ``memaudit run`` does).
* ``noise_magnitude`` (Wen et al., ICLR 2024; reference ``train_text_to_image.py`` of
  YuxinWenRick/diffusion_memorization, ``--hard_threshold``): d = || eps(x_t, c) - eps(x_t, c_empty) ||_2
  over all latent elements of each sample; the sample is dropped when d >= threshold (kept when
  d < threshold; 2 in their README for SD 1.4 fine-tuning). The reference uses the model output as is;
  we convert a v-prediction to eps first (eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t, so the difference
  is sqrt(abar_t) (v_c - v_empty)), since the published quantity is defined on eps.

Cost: ``attention_entropy`` is one no-grad partial forward stopped after the last selected layer, or none
with :meth:`MemorizationFilter.capturing` around the training forward itself; ``noise_magnitude`` is one
no-grad unconditional forward (the conditional one is the training forward's output, ``model_pred``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from audit.mitigation.inference import check_flag_options, timesteps_other_than

SCORES = ("attention_entropy", "noise_magnitude")


@dataclass
class FilterResult:
    """Per-sample scores and the loss mask of one batch.

    Attributes:
        scores: float64 [B] (entropy in nats, or the noise-difference L2 norm).
        keep: bool [B], True = the sample stays in the loss.
    """

    scores: torch.Tensor
    keep: torch.Tensor

    @property
    def dropped(self) -> int:
        """Number of samples removed from this batch's loss."""
        return int((~self.keep).sum())

    @property
    def nonfinite(self) -> torch.Tensor:
        """bool [B]: samples whose score is NaN or infinite (their attention or noise prediction was); they are
        dropped, whatever the threshold, and counted in :attr:`dropped`."""
        return ~torch.isfinite(self.scores)


def entropy_of(a: torch.Tensor) -> torch.Tensor:
    """E = -sum_j a_j log a_j along the last axis, in nats (0 log 0 = 0, ``torch.special.xlogy``): [B, L] -> [B].

    ``a``: attention probabilities averaged over heads and query pixels (Ren et al., ECCV 2024, arXiv 2403.11052:
    the entropy of their detection metric E; renjie3/MemAttn ``detect.py``), non-negative and summing to 1 along
    the last axis; a negative entry gives NaN (log of a negative number), which the filter drops
    (:attr:`FilterResult.nonfinite`). A one-hot row gives +0.0.
    """
    return 0.0 - torch.special.xlogy(a, a).sum(dim=-1)


class MemorizationFilter:
    """Per-batch memorization scores and a keep mask for a training loop.

    Args:
        threshold: the flag threshold (see the module docstring for each score's direction): nats for
            attention_entropy (flag E > threshold); for noise_magnitude the L2 norm of the eps difference over
            the C*H*W latent values, not normalized by their number (flag d >= threshold; 2 in Wen et al.'s
            README for SD 1.4's 4x64x64 latent). May be changed later (``filt.threshold = ...``, checked the
            same way).
        score: "attention_entropy" (default) or "noise_magnitude".
        layers: ``attn2`` module paths (attention_entropy); default (None): the 4th cross-attention layer in call
            order (SD 1.x ``down_blocks.1.attentions.1.transformer_blocks.0.attn2``), or the last if fewer.
        uncond_embeddings: noise_magnitude only: the empty prompt's text embeddings, [1, L, D] or [B, L, D].
        scheduler: noise_magnitude with a v-prediction model: the training noise scheduler (its
            ``alphas_cumprod`` and ``config.prediction_type``); x0/sample prediction is refused. Without it the
            model is taken to predict eps (nothing in a UNet says otherwise).
        uncond_attention_mask: noise_magnitude with a model trained with an ``encoder_attention_mask`` (the
            lab's masked variant): the empty prompt's mask, int64 [1, L] or [B, L] (1 = attended).
        timestep: the diffusion timestep the threshold was calibrated at (a ``memaudit calibrate`` file's
            ``score_config.first_timestep``: 981 for SD 1.x at 50 steps; :meth:`from_calibration` sets it), or
            None. When given, every batch must be scored at it, and one scored at other timesteps is refused:
            both scores' scale depends on t, so a threshold calibrated at t0 means nothing at the batch's random
            training timesteps (on the lab model a 5% FPR threshold from t0 flagged 13% of ordinary samples at
            uniform random timesteps, 32% at t = 10). Score at it with the noise of the training step:
            ``t0 = torch.full_like(timesteps, filt.timestep)``,
            ``filt(unet, c, noise_scheduler.add_noise(latents, noise, t0), t0)``.

    Layer names may be given without the prefixes of a ``torch.compile``'d or DDP-wrapped UNet
    (``_orig_mod.``, ``module.``): a calibration's names apply to the wrapped model.

    A sample whose score is NaN or infinite (a non-finite latent, embedding or prediction) is dropped whatever
    the threshold (:attr:`FilterResult.nonfinite` says which).

    Raises:
        ValueError: a threshold that is not a number (or NaN), unknown score, empty ``layers``, missing or
            misshapen uncond_embeddings, unsupported prediction type (noise_magnitude), a ``timestep`` that is
            not a non-negative integer; at a batch, timesteps other than ``timestep`` (when given).
        KeyError: at the first batch, a layer is not a cross-attention layer of the UNet.
    """

    def __init__(self, threshold: float, score: str = "attention_entropy", layers: Sequence[str] | None = None,
                 uncond_embeddings: torch.Tensor | None = None, scheduler=None,
                 uncond_attention_mask: torch.Tensor | None = None, timestep: int | None = None):
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
        if layers is not None and not isinstance(layers, (str, bytes)) and hasattr(layers, "__iter__"):
            layers = list(layers)  # a generator is read once, here
            if not layers:
                raise ValueError("layers is empty: give attn2 module paths, or None for the default layer")
        self.threshold = threshold  # checked by the setter
        check_flag_options(threshold, layers)  # MitigationError, a ValueError
        if score == "noise_magnitude" and uncond_embeddings is None:
            raise ValueError("noise_magnitude needs uncond_embeddings (the empty prompt's text embeddings)")
        if uncond_embeddings is not None and uncond_embeddings.ndim != 3:
            raise ValueError(f"uncond_embeddings must be [1, L, D] or [B, L, D], got shape "
                             f"{list(uncond_embeddings.shape)}")
        prediction = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
        if score == "noise_magnitude" and prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction!r}: noise_magnitude is defined on eps; epsilon and "
                             "v_prediction are supported")
        self.score = score
        self.layers = layers
        self.uncond_embeddings = uncond_embeddings
        self.uncond_attention_mask = uncond_attention_mask
        self.scheduler = scheduler
        self.prediction = prediction
        if timestep is not None and (isinstance(timestep, bool) or not isinstance(timestep, int) or timestep < 0):
            raise ValueError(f"timestep must be a non-negative integer (the calibration's first_timestep), got "
                             f"{timestep!r}")
        self.timestep = timestep

    @classmethod
    def from_calibration(cls, calibration, **kwargs) -> "MemorizationFilter":
        """A filter with a ``memaudit calibrate`` file's threshold, score, layers and timestep.

        Args:
            calibration: the file's path, or its dict (``json.load``).
            kwargs: ``uncond_embeddings``, ``scheduler``, ``uncond_attention_mask`` (noise_magnitude), as for
                the constructor; the threshold, score, layers and timestep come from the calibration.

        The filter scores at the calibration's first timestep only (``timestep``, see the class docstring).

        Raises:
            ValueError: not a calibration; a scorer other than attention_entropy or noise_magnitude; a mean over
                several noise draws (a training sample has one); no first timestep recorded (a calibration older
                than version 2: make it again with ``memaudit calibrate``); kwargs naming what the calibration
                sets. audit.errors.CalibrationError: an unreadable or malformed file.
        """
        from pathlib import Path

        if isinstance(calibration, (str, Path)):
            from audit.calibrate import load_calibration

            calibration = load_calibration(calibration)
        if not isinstance(calibration, dict) or not isinstance(calibration.get("score_config"), dict):
            raise ValueError("calibration must be a `memaudit calibrate` file (its path or its JSON as a dict)")
        if fixed := sorted(set(kwargs) & {"threshold", "score", "layers", "timestep"}):
            raise ValueError(f"{', '.join(fixed)}: set by the calibration; construct MemorizationFilter(...) to "
                             "choose them yourself")
        sc = calibration["score_config"]
        where = calibration.get("_path", "the calibration")
        if sc.get("scorer") not in SCORES:
            raise ValueError(f"{where} is for scorer {sc.get('scorer')!r}; the training filter scores "
                             f"{' or '.join(SCORES)}")
        if sc.get("noise_draws", 1) != 1:
            raise ValueError(f"{where} averages {sc.get('noise_draws')} noise draws; a training sample has one: "
                             "calibrate a run made with --noise-draws 1")
        t0 = sc.get("first_timestep")
        if isinstance(t0, bool) or not isinstance(t0, int):
            raise ValueError(f"{where} records no first_timestep (the timestep its threshold holds at): make it "
                             "again with `memaudit calibrate`")
        layers = sc.get("layers") if sc["scorer"] == "attention_entropy" else None
        return cls(calibration.get("threshold"), score=sc["scorer"], layers=layers, timestep=t0, **kwargs)

    def _check_timestep(self, timesteps) -> None:
        """Refuse a batch scored at timesteps other than :attr:`timestep` (when set)."""
        if self.timestep is None:
            return
        if (values := timesteps_other_than(timesteps, self.timestep)) is not None:
            seen = sorted(set(values))
            shown = ", ".join(f"{x:g}" for x in seen[:4]) + (", ..." if len(seen) > 4 else "")
            raise ValueError(f"this filter's threshold was calibrated at timestep {self.timestep}, and the batch is "
                             f"scored at timesteps {shown}: the score's scale depends on t, so the threshold does "
                             "not apply there; score the batch at it: t0 = torch.full_like(timesteps, "
                             "filt.timestep); filt(unet, c, noise_scheduler.add_noise(latents, noise, t0), t0)")

    @property
    def threshold(self) -> float:
        """The flag threshold (float); setting it checks it as the constructor does."""
        return self._threshold

    @threshold.setter
    def threshold(self, value) -> None:
        if value is None:
            raise ValueError("threshold must be a number (inf: never flag), got None")
        check_flag_options(value, None)  # MitigationError (a ValueError): not a number, or NaN
        self._threshold = float(value)

    def _layers(self, unet) -> list[str]:
        from audit.capture import cross_attention_layers, unwrapped_name

        _check_unet(unet)
        known = cross_attention_layers(unet)
        if not known:
            raise KeyError(f"{type(unet).__name__} has no cross-attention (attn2) layers: pass the UNet "
                           "(pipe.unet) being trained")
        if self.layers is None:
            return [known[3] if len(known) > 3 else known[-1]]
        by_bare = {unwrapped_name(n): n for n in known}
        unknown = [n for n in self.layers if n not in known and unwrapped_name(n) not in by_bare]
        if unknown:
            raise KeyError(f"not a cross-attention layer of this UNet: {', '.join(unknown)}")
        return [n if n in known else by_bare[unwrapped_name(n)] for n in self.layers]

    def flag(self, scores: torch.Tensor) -> torch.Tensor:
        """bool [B], True = memorized-looking: E > threshold (entropy), d >= threshold (Wen's rule), or a
        non-finite score."""
        bad = ~torch.isfinite(scores)
        if self.score == "attention_entropy":
            return bad | (scores > self.threshold)
        return bad | (scores >= self.threshold)

    # --- attention entropy -------------------------------------------------------------------------
    @contextmanager
    def capturing(self, unet):
        """Capture the selected layers' attention during the training forward itself (zero extra forwards).

        Usage::

            with filt.capturing(unet) as cap:
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
            result = filt.from_capture(cap)

        Inside, the selected layers compute attention explicitly in float32 (differentiable), which costs
        a little memory in those layers only. Original processors are restored on exit. One UNet forward per
        block (:meth:`from_capture` refuses more).

        Raises:
            ValueError: the filter scores noise_magnitude (it needs two forwards: use the filter as a hook); the
                UNet has gradient checkpointing on (``backward()`` recomputes the forward after the block has
                restored the processors, and the recomputation differs from the forward: use the hook,
                ``filt(unet, ...)``, which leaves the training forward alone).
            MitigationError (a ValueError): a selected layer's processor is not one of diffusers' plain ones
                (a trainable or custom processor would be replaced during the training forward).
            KeyError: a layer is not a cross-attention layer of the UNet; TypeError: ``unet`` is not a module.
        """
        from audit.capture import CrossAttentionCapture
        from audit.mitigation.inference import check_processors

        if self.score != "attention_entropy":
            raise ValueError("capturing() scores attention_entropy; a noise_magnitude filter needs the unconditional "
                             "forward too: call the filter as a hook, filt(unet, ...)")
        layers = self._layers(unet)
        if getattr(unet, "is_gradient_checkpointing", False):
            raise ValueError("capturing() cannot be used with gradient checkpointing: backward() recomputes the "
                             "forward after the block restored the attention processors, and the recomputation "
                             "then differs from the forward; call the filter as a hook, filt(unet, ...) (one "
                             "extra no-grad partial forward), instead")
        check_processors(unet, layers, what="capturing() during the training forward")
        cap = CrossAttentionCapture(unet, layers, early_exit=False)
        cap.timesteps = []

        def record_timestep(module, args, kwargs):  # the forward's timesteps, checked by from_capture
            cap.timesteps.append(args[1] if len(args) > 1 else kwargs.get("timestep"))

        hook = unet.register_forward_pre_hook(record_timestep, with_kwargs=True)
        try:
            with cap:
                cap.probs, cap.nonfinite, cap.calls = {}, {}, {}
                yield cap
        finally:
            hook.remove()

    def from_capture(self, cap) -> FilterResult:
        """Scores (float64 [B], nats) and the keep mask from a :meth:`capturing` block (attention_entropy only).

        Raises:
            ValueError: a noise_magnitude filter.
            RuntimeError: the block ran no UNet forward, or ran several (only one batch can be scored: open one
                block per forward).
        """
        if self.score != "attention_entropy":
            raise ValueError("from_capture() gives attention entropies; this filter scores noise_magnitude")
        missing = [n for n in cap.layers if n not in cap.probs]
        if missing:
            raise RuntimeError(f"no attention captured from {', '.join(missing)}: run the UNet inside capturing()")
        calls = max(getattr(cap, "calls", {}).values(), default=1)
        if calls > 1:
            raise RuntimeError(f"the capturing() block ran {calls} UNet forwards; from_capture() scores one batch: "
                               "open one block per forward (a prior-preservation or teacher forward outside it)")
        for t in getattr(cap, "timesteps", []):
            if t is not None:
                self._check_timestep(t)
        a = torch.stack([cap.probs[n].detach() for n in cap.layers]).mean(dim=0)  # [B, L] float32
        scores = entropy_of(a.double())
        return FilterResult(scores, ~self.flag(scores))

    def attention_entropy(self, unet, encoder_hidden_states, noisy_latents, timesteps,
                          encoder_attention_mask: torch.Tensor | None = None,
                          added_cond_kwargs: dict | None = None) -> torch.Tensor:
        """E per sample (float64 [B], nats) from one no-grad partial forward, stopped after the last selected layer.

        E = -sum_j a_j log a_j of the attention probabilities a [B, L] averaged over heads, query pixels and the
        selected layers (Ren et al., ECCV 2024, arXiv 2403.11052; ``detect.py``), at the batch's own timesteps.

        Args:
            encoder_hidden_states: [B, L, D] text embeddings; noisy_latents: [B, C, H, W] x_t;
            timesteps: int [B], [1] or a scalar; encoder_attention_mask: the UNet's ``encoder_attention_mask``
            int64 [B, L] (1 = attended) for a model trained with one (the lab's masked variant), or None;
            added_cond_kwargs: SDXL's ``{"text_embeds", "time_ids"}`` (the UNet's own argument), or None.

        Raises:
            ValueError: shapes that do not fit together or the UNet (:func:`check_batch`); an SDXL UNet without
                ``added_cond_kwargs``. KeyError: a layer is not a cross-attention layer of the UNet.
            TypeError: ``unet`` is not a module (a pipeline: pass ``pipe.unet``).
            audit.errors.IncompleteCaptureError: a selected layer did not report during the forward.
        """
        from audit.capture import CrossAttentionCapture

        check_batch(unet, encoder_hidden_states, noisy_latents, timesteps, added_cond_kwargs)
        self._check_timestep(timesteps)
        kw = {} if encoder_attention_mask is None else {"encoder_attention_mask": encoder_attention_mask}
        if added_cond_kwargs is not None:
            kw["added_cond_kwargs"] = added_cond_kwargs
        with torch.no_grad(), CrossAttentionCapture(unet, self._layers(unet), early_exit=True) as cap:
            probs = cap.run(lambda: unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states, **kw))
        a = torch.stack(list(probs.values())).mean(dim=0)
        return entropy_of(a.double())

    # --- noise magnitude ---------------------------------------------------------------------------
    def noise_magnitude(self, unet, encoder_hidden_states, noisy_latents, timesteps,
                        model_pred: torch.Tensor | None = None,
                        encoder_attention_mask: torch.Tensor | None = None,
                        added_cond_kwargs: dict | None = None) -> torch.Tensor:
        """d = ||eps(x_t, c) - eps(x_t, c_empty)||_2 over all latent elements, per sample (float64 [B]); Wen et
        al., ICLR 2024, training-time mitigation (reference ``train_text_to_image.py``, ``--hard_threshold``). A
        v-prediction model's difference is converted to eps: eps_c - eps_u = sqrt(abar_t) (v_c - v_u), since
        eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t.

        Args:
            encoder_hidden_states: [B, L, D]; noisy_latents: [B, C, H, W] x_t; timesteps: int [B], [1] or a
                scalar (integers in the scheduler's range for a v-prediction model).
            model_pred: the training forward's output for (x_t, c), a tensor [B, C, H, W] (the output's
                ``.sample``); computed (no grad) if None. Refused for a filter with a ``timestep`` (made from a
                calibration): the training forward is not at that timestep.
            encoder_attention_mask: int64 [B, L] (1 = attended) for a model trained with one (the lab's
                masked variant); the unconditional branch then takes ``uncond_attention_mask``.
            added_cond_kwargs: refused (SDXL's unconditional branch would need the empty prompt's pooled
                embeddings, which this filter does not take): use attention_entropy on SDXL.

        Raises:
            ValueError: a mask for the conditional branch without ``uncond_attention_mask``; uncond_embeddings that
                do not fit the batch; shapes that do not fit (:func:`check_batch`); ``model_pred`` not of the
                latents' shape; for v-prediction, timesteps that are not integers in ``[0, len(alphas_cumprod))``;
                ``added_cond_kwargs`` or an SDXL UNet.
            TypeError: ``unet`` is not a module, or ``model_pred`` is not a tensor.
        """
        if added_cond_kwargs is not None or _needs_added_cond(unet):
            raise ValueError("noise_magnitude on an SDXL UNet (added_cond_kwargs) is not supported: its "
                             "unconditional forward needs the empty prompt's pooled embeddings; use "
                             "score='attention_entropy'")
        check_batch(unet, encoder_hidden_states, noisy_latents, timesteps, None)
        self._check_timestep(timesteps)
        b = noisy_latents.shape[0]
        if model_pred is not None and self.timestep is not None:
            raise ValueError(f"model_pred with a filter scoring at its calibration's timestep {self.timestep}: the "
                             "training forward's prediction is at the batch's own timesteps, not at it; leave "
                             "model_pred out (the filter runs the conditional forward at that timestep itself)")
        if model_pred is not None:
            if not isinstance(model_pred, torch.Tensor):
                raise TypeError(f"model_pred must be a tensor [B, C, H, W] (the UNet output's .sample), got "
                                f"{type(model_pred).__name__}")
            if model_pred.shape != noisy_latents.shape:
                raise ValueError(f"model_pred {list(model_pred.shape)} must have the noisy latents' shape "
                                 f"{list(noisy_latents.shape)}: one prediction per sample")
        if encoder_attention_mask is not None and self.uncond_attention_mask is None:
            raise ValueError("encoder_attention_mask given: construct the filter with uncond_attention_mask too")
        abar = self._alphas_cumprod(timesteps, b) if self.prediction == "v_prediction" else None
        kw_c = {} if encoder_attention_mask is None else {"encoder_attention_mask": encoder_attention_mask}
        with torch.no_grad():
            if model_pred is None:
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                  **kw_c).sample
            unc = self.uncond_embeddings.to(encoder_hidden_states.device, encoder_hidden_states.dtype)
            if unc.shape[0] not in (1, b) or unc.shape[1:] != encoder_hidden_states.shape[1:]:
                raise ValueError(f"uncond_embeddings {list(unc.shape)} do not fit a batch of text embeddings "
                                 f"{list(encoder_hidden_states.shape)}: give [1, L, D] or [B, L, D]")
            unc = unc.expand(b, -1, -1) if unc.shape[0] == 1 else unc
            kw_u = {}
            if encoder_attention_mask is not None:
                m = self.uncond_attention_mask.to(encoder_attention_mask.device)
                kw_u["encoder_attention_mask"] = m.expand(b, -1) if m.shape[0] == 1 else m
            pred_uncond = unet(noisy_latents, timesteps, encoder_hidden_states=unc, **kw_u).sample
            diff = (model_pred.detach().float() - pred_uncond.float()).flatten(1)
            if abar is not None:
                diff = diff * abar.to(diff.device).sqrt()[:, None]  # eps_c - eps_u = sqrt(abar) (v_c - v_u)
            return diff.norm(dim=1).double()

    def _alphas_cumprod(self, timesteps, b: int) -> torch.Tensor:
        """abar_t float32 [B] of a v-prediction model's training scheduler at integer timesteps."""
        abar = self.scheduler.alphas_cumprod
        t = torch.as_tensor(timesteps).detach().cpu().reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ValueError(f"timesteps {t.tolist()[:4]}: a v-prediction model's conversion to eps needs integer "
                                 "training timesteps (alphas_cumprod is defined at those)")
        if int(t.min()) < 0 or int(t.max()) >= len(abar):
            raise ValueError(f"timesteps from {int(t.min())} to {int(t.max())}: the scheduler's alphas_cumprod covers "
                             f"0 to {len(abar) - 1}")
        return abar[t.long()].to(torch.float32)

    # --- the hook ------------------------------------------------------------------------------------
    def __call__(self, unet, encoder_hidden_states, noisy_latents, timesteps,
                 model_pred: torch.Tensor | None = None,
                 encoder_attention_mask: torch.Tensor | None = None,
                 added_cond_kwargs: dict | None = None) -> FilterResult:
        """Scores (float64 [B]) and the keep mask (bool [B]) of one batch (see the class and module docstrings).
        Arguments as :meth:`attention_entropy` and :meth:`noise_magnitude` (``model_pred``: noise_magnitude only).

        Raises:
            what :meth:`attention_entropy` or :meth:`noise_magnitude` raises; TypeError: ``unet`` is not a
            module (a pipeline: pass ``pipe.unet``).
        """
        if self.score == "attention_entropy":
            scores = self.attention_entropy(unet, encoder_hidden_states, noisy_latents, timesteps,
                                            encoder_attention_mask, added_cond_kwargs)
        else:
            scores = self.noise_magnitude(unet, encoder_hidden_states, noisy_latents, timesteps, model_pred,
                                          encoder_attention_mask, added_cond_kwargs)
        return FilterResult(scores, ~self.flag(scores))


def _check_unet(unet) -> None:
    """Refuse what is not a UNet called as ``unet(x_t, t, encoder_hidden_states=c)``: not a module (a pipeline),
    or a transformer denoiser (PixArt's, SD 3.x's, DiT's), whose forward takes its arguments in another order and
    whose text input is projected first (it failed with a misleading width message, then inside diffusers)."""
    if not isinstance(unet, torch.nn.Module):
        hint = ": pass pipe.unet" if hasattr(unet, "unet") else ""
        raise TypeError(f"expected the UNet being trained (a torch module), got {type(unet).__name__}{hint}")
    inner = unet
    for _ in range(4):  # DDP / accelerate (.module), torch.compile (._orig_mod)
        inner = getattr(inner, "module", None) or getattr(inner, "_orig_mod", None) or inner
    if "Transformer" in type(inner).__name__:
        raise TypeError(f"{type(inner).__name__} is a transformer denoiser: the training filter scores a "
                        "UNet2DConditionModel (Stable Diffusion 1.x/2.x/XL) called as unet(x_t, t, "
                        "encoder_hidden_states=c)")


def _needs_added_cond(unet) -> bool:
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) in ("text_time", "text", "image")


def check_batch(unet, encoder_hidden_states, noisy_latents, timesteps, added_cond_kwargs) -> None:
    """Check one training batch before a forward, so that a misfit is named here rather than deep in the UNet.

    Expects ``encoder_hidden_states`` [B, L, D] with D the UNet's ``cross_attention_dim`` (when its config says),
    ``noisy_latents`` [B, C, H, W], ``timesteps`` a scalar or [1] or [B]; an SDXL-style UNet
    (``addition_embed_type``) needs ``added_cond_kwargs``.

    Raises:
        TypeError: ``unet`` is not a module (a pipeline: pass ``pipe.unet``).
        ValueError: naming the misfit.
    """
    _check_unet(unet)
    if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.ndim != 3:
        raise ValueError(f"encoder_hidden_states must be a tensor [B, L, D], got "
                         f"{list(getattr(encoder_hidden_states, 'shape', [])) or type(encoder_hidden_states).__name__}")
    if not isinstance(noisy_latents, torch.Tensor) or noisy_latents.ndim != 4:
        raise ValueError(f"noisy_latents must be a tensor [B, C, H, W], got "
                         f"{list(getattr(noisy_latents, 'shape', [])) or type(noisy_latents).__name__}")
    b = noisy_latents.shape[0]
    if encoder_hidden_states.shape[0] != b:
        raise ValueError(f"encoder_hidden_states has {encoder_hidden_states.shape[0]} samples, noisy_latents {b}")
    dim = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    if isinstance(dim, int) and encoder_hidden_states.shape[2] != dim:
        raise ValueError(f"encoder_hidden_states have width {encoder_hidden_states.shape[2]}; this UNet's "
                         f"cross_attention_dim is {dim}")
    n_t = torch.as_tensor(timesteps).numel()
    if torch.as_tensor(timesteps).ndim > 1 or n_t not in (1, b):
        raise ValueError(f"timesteps must be a scalar, [1] or [B] = [{b}], got shape "
                         f"{list(torch.as_tensor(timesteps).shape)}")
    if added_cond_kwargs is None and _needs_added_cond(unet):
        raise ValueError("this UNet takes added conditions (SDXL's addition_embed_type "
                         f"{unet.config.addition_embed_type!r}): pass added_cond_kwargs, the training forward's own "
                         "{'text_embeds': ..., 'time_ids': ...}")


def masked_loss(per_sample: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_sample`` losses [B] over kept samples (``keep`` bool [B]).

    Computed as sum(where(keep, loss, 0)) / max(kept, 1), summed in float32 at least (a float16 sum of many
    losses would overflow), returned in ``per_sample``'s dtype. A dropped sample's loss, even inf or NaN, never
    reaches the result, and its entry of ``per_sample`` gets a zero gradient; but autograd multiplies that zero
    by the derivative of the dropped sample's own computation, and 0 x inf = NaN: a dropped sample whose loss
    has an infinite or NaN derivative (NaN latents, ``sqrt`` at 0, an infinite SNR weight) still puts NaN
    into the weights' gradients. To keep such samples out of the gradient too, index the batch before the
    loss, as the reference does: ``F.mse_loss(model_pred[keep], target[keep])``. When every sample is
    dropped, the result is a zero that keeps the graph: ``backward()`` runs with zero gradients. The reference skips the loss instead (``if
    len(model_pred) != 0``); note that an optimizer step on zero gradients still moves the weights under
    momentum or weight decay (AdamW, SGD with momentum), so skip ``optimizer.step()`` when
    ``result.dropped`` is the whole batch to match the reference exactly.

    Raises:
        ValueError: ``keep`` is not boolean, or not one value per sample.
    """
    if keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool mask (FilterResult.keep), got dtype {keep.dtype}")
    if per_sample.ndim != 1 or keep.shape != per_sample.shape:
        raise ValueError(f"per_sample losses {list(per_sample.shape)} and keep {list(keep.shape)} must both be [B]")
    keep = keep.to(per_sample.device)
    acc = torch.promote_types(per_sample.dtype, torch.float32)
    kept = torch.where(keep, per_sample.to(acc), torch.zeros((), dtype=acc, device=per_sample.device))
    return (kept.sum() / keep.sum().clamp(min=1).to(acc)).to(per_sample.dtype)
