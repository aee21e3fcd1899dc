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

from audit.mitigation.inference import check_flag_options

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


def entropy_of(a: torch.Tensor) -> torch.Tensor:
    """E = -sum_j a_j log a_j along the last axis (natural log, 0 log 0 = 0): [B, L] -> [B]."""
    return -torch.special.xlogy(a, a).sum(dim=-1)


class MemorizationFilter:
    """Per-batch memorization scores and a keep mask for a training loop.

    Args:
        threshold: the flag threshold (see the module docstring for each score's direction).
        score: "attention_entropy" (default) or "noise_magnitude".
        layers: ``attn2`` module paths (attention_entropy); default: the 4th cross-attention layer in call
            order (SD 1.x ``down_blocks.1.attentions.1.transformer_blocks.0.attn2``), or the last if fewer.
        uncond_embeddings: noise_magnitude only: the empty prompt's text embeddings, [1, L, D] or [B, L, D].
        scheduler: noise_magnitude with a v-prediction model: the training noise scheduler (its
            ``alphas_cumprod`` and ``config.prediction_type``); x0/sample prediction is refused.
        uncond_attention_mask: noise_magnitude with a model trained with an ``encoder_attention_mask`` (the
            lab's masked variant): the empty prompt's mask, int64 [1, L] or [B, L] (1 = attended).

    Layer names may be given without the prefixes of a ``torch.compile``'d or DDP-wrapped UNet
    (``_orig_mod.``, ``module.``): a calibration's names apply to the wrapped model.

    Raises:
        ValueError: a threshold that is not a number (or NaN), unknown score, missing or misshapen
            uncond_embeddings, unsupported prediction type.
        KeyError: a layer is not a cross-attention layer of the UNet.
    """

    def __init__(self, threshold: float, score: str = "attention_entropy", layers: Sequence[str] | None = None,
                 uncond_embeddings: torch.Tensor | None = None, scheduler=None,
                 uncond_attention_mask: torch.Tensor | None = None):
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
        if threshold is None:
            raise ValueError("threshold must be a number (inf: never flag), got None")
        check_flag_options(threshold, layers)  # MitigationError, a ValueError
        if score == "noise_magnitude" and uncond_embeddings is None:
            raise ValueError("noise_magnitude needs uncond_embeddings (the empty prompt's text embeddings)")
        if uncond_embeddings is not None and uncond_embeddings.ndim != 3:
            raise ValueError(f"uncond_embeddings must be [1, L, D] or [B, L, D], got shape "
                             f"{list(uncond_embeddings.shape)}")
        prediction = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction!r}: noise_magnitude is defined on eps; epsilon and "
                             "v_prediction are supported")
        self.threshold = float(threshold)
        self.score = score
        self.layers = list(layers) if layers else None
        self.uncond_embeddings = uncond_embeddings
        self.uncond_attention_mask = uncond_attention_mask
        self.scheduler = scheduler
        self.prediction = prediction

    def _layers(self, unet) -> list[str]:
        from audit.capture import cross_attention_layers, unwrapped_name

        known = cross_attention_layers(unet)
        if self.layers is None:
            if not known:
                raise KeyError("the UNet has no cross-attention (attn2) layers")
            return [known[3] if len(known) > 3 else known[-1]]
        by_bare = {unwrapped_name(n): n for n in known}
        unknown = [n for n in self.layers if n not in known and unwrapped_name(n) not in by_bare]
        if unknown:
            raise KeyError(f"not a cross-attention layer of this UNet: {', '.join(unknown)}")
        return [n if n in known else by_bare[unwrapped_name(n)] for n in self.layers]

    def flag(self, scores: torch.Tensor) -> torch.Tensor:
        """bool [B], True = memorized-looking: E > threshold (entropy), d >= threshold (Wen's rule)."""
        if self.score == "attention_entropy":
            return scores > self.threshold
        return scores >= self.threshold

    # --- attention entropy -------------------------------------------------------------------------
    @contextmanager
    def capturing(self, unet):
        """Capture the selected layers' attention during the training forward itself (zero extra forwards).

        Usage::

            with filt.capturing(unet) as cap:
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
            result = filt.from_capture(cap)

        Inside, the selected layers compute attention explicitly in float32 (differentiable), which costs
        a little memory in those layers only. Original processors are restored on exit.
        """
        from audit.capture import CrossAttentionCapture

        cap = CrossAttentionCapture(unet, self._layers(unet), early_exit=False)
        with cap:
            cap.probs, cap.nonfinite = {}, {}
            yield cap

    def from_capture(self, cap) -> FilterResult:
        """Scores and mask from a :meth:`capturing` block (attention_entropy only)."""
        missing = [n for n in cap.layers if n not in cap.probs]
        if missing:
            raise RuntimeError(f"no attention captured from {', '.join(missing)}: run the UNet inside capturing()")
        a = torch.stack([cap.probs[n].detach() for n in cap.layers]).mean(dim=0)  # [B, L] float32
        scores = entropy_of(a.double())
        return FilterResult(scores, ~self.flag(scores))

    def attention_entropy(self, unet, encoder_hidden_states, noisy_latents, timesteps,
                          encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """E per sample (float64 [B]) from one no-grad partial forward, stopped after the last selected layer.

        Args:
            encoder_hidden_states: [B, L, D] text embeddings; noisy_latents: [B, C, H, W] x_t;
            timesteps: int [B] or scalar; encoder_attention_mask: the UNet's ``encoder_attention_mask``
            int64 [B, L] (1 = attended) for a model trained with one (the lab's masked variant), or None.
        """
        from audit.capture import CrossAttentionCapture

        kw = {} if encoder_attention_mask is None else {"encoder_attention_mask": encoder_attention_mask}
        with torch.no_grad(), CrossAttentionCapture(unet, self._layers(unet), early_exit=True) as cap:
            probs = cap.run(lambda: unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states, **kw))
        a = torch.stack(list(probs.values())).mean(dim=0)
        return entropy_of(a.double())

    # --- noise magnitude ---------------------------------------------------------------------------
    def noise_magnitude(self, unet, encoder_hidden_states, noisy_latents, timesteps,
                        model_pred: torch.Tensor | None = None,
                        encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """d = ||eps(x_t, c) - eps(x_t, c_empty)||_2 per sample (float64 [B]); Wen et al., sec. 3.

        Args:
            model_pred: the training forward's output for (x_t, c) [B, C, H, W]; computed (no grad) if None.
            encoder_attention_mask: int64 [B, L] (1 = attended) for a model trained with one (the lab's
                masked variant); the unconditional branch then takes ``uncond_attention_mask``.

        Raises:
            ValueError: a mask for the conditional branch without ``uncond_attention_mask``.
        """
        b = noisy_latents.shape[0]
        if encoder_attention_mask is not None and self.uncond_attention_mask is None:
            raise ValueError("encoder_attention_mask given: construct the filter with uncond_attention_mask too")
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
            if self.prediction == "v_prediction":
                t = torch.as_tensor(timesteps, device="cpu").long().expand(b)
                abar = self.scheduler.alphas_cumprod[t].to(diff.device, torch.float32)
                diff = diff * abar.sqrt()[:, None]  # eps_c - eps_u = sqrt(abar) (v_c - v_u)
            return diff.norm(dim=1).double()

    # --- the hook ------------------------------------------------------------------------------------
    def __call__(self, unet, encoder_hidden_states, noisy_latents, timesteps,
                 model_pred: torch.Tensor | None = None,
                 encoder_attention_mask: torch.Tensor | None = None) -> FilterResult:
        """Scores and the keep mask of one batch (see the class and module docstrings).
        ``encoder_attention_mask``: see :meth:`attention_entropy` and :meth:`noise_magnitude`."""
        if self.score == "attention_entropy":
            scores = self.attention_entropy(unet, encoder_hidden_states, noisy_latents, timesteps,
                                            encoder_attention_mask)
        else:
            scores = self.noise_magnitude(unet, encoder_hidden_states, noisy_latents, timesteps, model_pred,
                                          encoder_attention_mask)
        return FilterResult(scores, ~self.flag(scores))


def masked_loss(per_sample: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_sample`` losses [B] over kept samples (``keep`` bool [B]).

    Computed as sum(where(keep, loss, 0)) / max(kept, 1), so a dropped sample's loss, even inf or NaN, never
    reaches the result or the gradient. When every sample is dropped, the result is a zero that keeps the
    graph: ``backward()`` runs with zero gradients. The reference skips the loss instead (``if
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
    kept = torch.where(keep, per_sample, torch.zeros((), dtype=per_sample.dtype, device=per_sample.device))
    return kept.sum() / keep.sum().clamp(min=1).to(per_sample.dtype)
