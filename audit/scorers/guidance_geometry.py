"""The ``guidance_geometry`` scorer: Asthana & Belagiannis, ICLR 2026 (arXiv 2601.20642), reference code
rohanasthana/memorization-anisotropy (``detect_mem.py``, ``local_model/pipe.py``, ``detect_eval.py``):
the norm of the guidance direction at a high-noise step and its cosine with the unconditional prediction
at a low-noise step, both on the SAME pure-noise latent, with no denoising in between.

Per prompt and noise draw, with x the first-step UNet input (pure noise, :class:`audit.scorers.Scorer`),
eps_c / eps_u the conditional / unconditional (empty prompt) noise predictions, and the timesteps of
``set_timesteps(num_inference_steps)`` (50 by default) of DDIM built from the model's scheduler
configuration whatever class it names (their ``detect_mem.py``: ``DDIMScheduler.from_config`` for SD 1.x
and 2.x alike; DDIM reads the configuration's ``timestep_spacing``, so an SD 2.x Euler configuration gives
t_hi = 981 when it names no spacing (DDIM's default, leading) and 999 when it says linspace, t_lo = 41 either
way, where Euler itself would start at 999 and step through 40.78):

* t_hi = timesteps[0] (981 for SD 1.x), t_lo = timesteps[-3] (41 for SD 1.x: 50 leading steps, offset 1);
* norm = || eps_c(x, t_hi) - eps_u(x, t_hi) ||_2 over the flattened latent (C*H*W values);
* cos = mean over pixels (h, w) of cos( eps_u(x, t_lo)[:, h, w], (eps_c - eps_u)(x, t_lo)[:, h, w] ),
  the cosine over the C latent channels (their ``cosine_similarity(..., dim=1)`` on [B, C, H, W]);
* score = gamma1 * mean_draws(norm) + gamma2 * mean_draws(cos); weights from their ``detect_eval.py``:
  SD 1.x gamma1 = 1.0, gamma2 = 2.0; SD 2.x gamma1 = 1.0, gamma2 = 0.1. Higher = riskier.

The input at t_lo is the same x: their code applies ``scale_model_input`` again, which is the identity
for DDIM (:attr:`ScorerSpec.scheduler` ``"ddim"``), so x is the seeded noise itself. Cost: 4 full UNet
forwards per prompt and draw (the t_hi pair is the shared forward of :class:`audit.scorers.Scorer`; the t_lo
pair is run here).

Deviation from the reference code, stated: we convert every prediction to eps
(:func:`audit.scorers.parametrization.to_epsilon`) before both parts. For v-prediction (SD 2.x) their code
takes the norm of ((alpha v - x) / sigma^2)_c - (...)_u = ||eps_c - eps_u|| / sigma^2 (sigma^2 = 1 -
alpha_bar_t_hi ~ 0.99 at t_hi: a constant factor per model) and the cosine on the RAW v-predictions, not on
eps; so on v-prediction models our figures are not theirs. For epsilon models (SD 1.x) they agree.

Weights: by model family (:meth:`audit.models.base.ModelAdapter`'s ``name``): ``sd2`` -> SD 2.x weights;
``sd1`` -> SD 1.x weights, except a 1024-wide cross-attention (the SD 2.x text encoder, loaded through the
same pipeline class) -> SD 2.x; a model folder's ``memaudit.json`` may set ``"guidance_geometry_weights":
[gamma1, gamma2]`` (two finite numbers; anything else is refused, as is a family without weights). Any other
family: ValueError (no published weights).

Owns this formula, the weights and the registration. Must not import torch at module level, nor any
``audit`` module but the scorer registry (and :mod:`audit.errors` for the refusal).
"""

from __future__ import annotations

import json
import math

from audit.scorers.registry import Column, ScorerSpec, register

WEIGHTS = {"sd1": (1.0, 2.0), "sd2": (1.0, 0.1)}  # (gamma1: norm, gamma2: cosine), their detect_eval.py
LOW_NOISE_INDEX = -3  # t_lo = timesteps[-3]


def weights_for(model, family: str) -> tuple[float, float]:
    """(gamma1, gamma2) for a loaded ``model`` of adapter ``family``; see the module docstring.

    Raises:
        ValueError: a family without published weights and no ``guidance_geometry_weights`` override, or an
            override that is not two finite numbers (a string, an empty list, three numbers, a bool, NaN).
    """
    override = (getattr(model, "extra", None) or {}).get("guidance_geometry_weights")
    if override is not None:
        if not (isinstance(override, (list, tuple)) and len(override) == 2 and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in override)):
            raise ValueError(f"guidance_geometry: guidance_geometry_weights in the model's memaudit.json must be two "
                             f"finite numbers [gamma1, gamma2] (got {_json_text(override)})")
        return float(override[0]), float(override[1])
    if family == "sd1" and int(getattr(model.unet.config, "cross_attention_dim", 768) or 768) == 1024:
        family = "sd2"
    if family not in WEIGHTS:
        raise ValueError(f"guidance_geometry: no published weights for model family {family!r} (known: "
                         f"{', '.join(WEIGHTS)}); set guidance_geometry_weights in the model's memaudit.json")
    return WEIGHTS[family]


def _json_text(value, limit: int = 60) -> str:
    """``value`` as JSON text (its ``repr`` where JSON cannot say it), cut to ``limit`` characters, for a message."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_weights(model, family: str) -> None:
    """Refuse a model without weights before scoring (:attr:`ScorerSpec.check`).

    Raises:
        audit.errors.ModelError: :func:`weights_for`'s reason, in one line.
    """
    from audit.errors import ModelError

    try:
        weights_for(model, family)
    except ValueError as exc:
        raise ModelError(str(exc)) from None


def channel_cosine(u, g, eps: float = 1e-8):
    """Per-pixel cosine over channels of ``u`` and ``g`` ([N, C, H, W]) averaged over pixels -> [N] float32.
    Each norm is clamped at ``eps`` as ``torch.nn.functional.cosine_similarity`` does."""
    import torch.nn.functional as F

    return F.cosine_similarity(u.float(), g.float(), dim=1, eps=eps).flatten(1).mean(dim=1)


def compute(ctx) -> dict:
    """``{"guidance_geometry", "guidance_norm", "guidance_cosine": float64 [B]}`` on the device; runs the two
    low-noise forwards (conditional, unconditional) on ``ctx.x`` and reuses the shared t_hi pair
    (``ctx.eps_cond``, ``ctx.eps_uncond``, raw outputs [B*K, C, H, W]).

    Raises:
        ValueError: no weights for the model's family, or an unconvertible prediction type.
    """
    s = ctx.scorer
    g1, g2 = weights_for(s.model, s.adapter.name)
    eps_c = s.epsilon(ctx.eps_cond, ctx.x, s.t0)  # t_hi = t0 (host copy: no device sync)
    eps_u = s.epsilon(ctx.eps_uncond, ctx.x, s.t0)
    norm = (eps_c - eps_u).flatten(1).norm(dim=1).view(ctx.b, ctx.k).mean(dim=1).double()
    t_lo = s.scheduler.timesteps[LOW_NOISE_INDEX]  # host
    t_lo_dev = t_lo.to(ctx.x.device)
    lo_c = s.epsilon(s.model_output(ctx.x, t_lo_dev, ctx.c), ctx.x, t_lo)
    lo_u = s.epsilon(s.model_output(ctx.x, t_lo_dev, s.empty_embeddings(ctx.x.shape[0])), ctx.x, t_lo)
    cos = channel_cosine(lo_u, lo_c - lo_u).view(ctx.b, ctx.k).mean(dim=1).double()
    return {"guidance_geometry": g1 * norm + g2 * cos, "guidance_norm": norm, "guidance_cosine": cos}


SPEC = register(ScorerSpec(
    name="guidance_geometry",
    description="guidance norm at a high-noise step + its cosine with the unconditional prediction at a "
                "low-noise step (Asthana & Belagiannis, ICLR 2026); higher = riskier",
    forward="several_timesteps",
    compute=compute,
    risk_column="guidance_geometry",
    columns=(
        Column("guidance_geometry", "double", "gamma1 * guidance_norm + gamma2 * guidance_cosine (Asthana & "
               "Belagiannis 2026); null unless --scorer guidance_geometry"),
        Column("guidance_norm", "double", "||eps_c - eps_u|| at the first timestep; null unless --scorer "
               "guidance_geometry"),
        Column("guidance_cosine", "double", "channel-wise cos(eps_u, eps_c - eps_u) at timesteps[-3], mean over "
               "pixels; null unless --scorer guidance_geometry"),
    ),
    unet_forwards=4.0,
    scheduler="ddim",
    check=check_weights,
    min_steps=-LOW_NOISE_INDEX,  # t_lo = timesteps[-3]: --steps 2 failed every prompt (IndexError)
))
