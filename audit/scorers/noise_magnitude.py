"""The ``noise_magnitude`` scorer: Wen et al., "Detecting, Explaining, and Mitigating Memorization in
Diffusion Models", ICLR 2024, their detection metric (reference code YuxinWenRick/diffusion_memorization,
``local_sd_pipeline.py``, ``track_noise_norm``): the magnitude of the text-conditional NOISE prediction at
the first step, d = || eps(x_t0, c) - eps(x_t0, c_empty) ||_2 over the flattened latent (C*H*W values),
averaged over the K noise draws. The paper's cheapest setting (first step, one generation). t0 is the first
timestep of DDIM built from the model's scheduler configuration whatever class it names, as their
``detect_mem.py`` (``DDIMScheduler.from_config``) does for every model (an SD 2.x Euler configuration: t0 =
981 when it names no ``timestep_spacing``, DDIM's default being leading, 999 when it says linspace; Euler itself
starts at 999).

The quantity is defined on eps: a model predicting v or x_0 is converted first
(:func:`audit.scorers.parametrization.to_epsilon`, with x_t the UNet input at t0 and alpha_bar_{t0}):
for v-prediction d = sqrt(alpha_bar_t0) * || v_c - v_u || (x_0 prediction: sqrt(alpha_bar_t0 / (1 - alpha_bar_t0))
* || x0_c - x0_u ||), and at a zero-terminal-SNR first step (alpha_bar = 0) d = 0 for every prompt by
construction with either, so the scorer is refused there
(:func:`audit.scorers.base.check_noise_prediction`).
Cost: one full conditional and one full unconditional UNet forward per prompt and draw. Unit: the latent's
units (dimensionless), not normalized by the latent size.

Owns this formula and its registration. Must not import torch at module level, nor any ``audit`` module
but the scorer registry.
"""

from __future__ import annotations

from audit.scorers.registry import Column, ScorerSpec, register


def compute(ctx) -> dict:
    """``{"noise_magnitude": float64 [B]}`` on the device: from ``ctx.eps_cond`` and ``ctx.eps_uncond`` (the raw
    UNet outputs [B*K, C, H, W], prompt-major) converted to eps at ``ctx.x`` and ``ctx.t``, the L2 norm over
    (C, H, W) of their difference, mean over the K draws.

    Raises:
        ValueError: the model's prediction type cannot be converted to eps.
    """
    s = ctx.scorer
    diff = s.epsilon(ctx.eps_cond, ctx.x, s.t0) - s.epsilon(ctx.eps_uncond, ctx.x, s.t0)  # t0 on the host
    return {"noise_magnitude": diff.flatten(1).norm(dim=1).view(ctx.b, ctx.k).mean(dim=1).double()}


SPEC = register(ScorerSpec(
    name="noise_magnitude",
    description="text-conditional noise prediction magnitude at the first step (Wen et al., ICLR 2024); "
                "higher = riskier",
    forward="full_conditional_unconditional",
    compute=compute,
    risk_column="noise_magnitude",
    columns=(Column("noise_magnitude", "double", "text-conditional noise prediction magnitude ||eps_c - eps_u||, "
                    "converted to eps (Wen et al. 2024); null unless --scorer noise_magnitude"),),
    unet_forwards=2.0,
    scheduler="ddim",
))
