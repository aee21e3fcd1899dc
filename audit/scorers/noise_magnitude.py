"""The ``noise_magnitude`` scorer: Wen et al., "Detecting, Explaining, and Mitigating Memorization in
Diffusion Models", ICLR 2024, sec. 3: the text-conditional noise prediction magnitude
||eps(x_t0, c) - eps(x_t0, c_empty)||_2 at the first step, averaged over the noise draws; one full
conditional and one full unconditional UNet forward per prompt and draw.

Owns this formula and its registration. Must not import torch at module level, nor any ``audit`` module
but the scorer registry.
"""

from __future__ import annotations

from audit.scorers.registry import Column, ScorerSpec, register


def compute(ctx) -> dict:
    """``{"noise_magnitude": float64 [B]}`` on the device, from ``ctx.eps_cond`` and ``ctx.eps_uncond``
    ([B*K, C, H, W], prompt-major): the L2 norm over (C, H, W) of their difference, mean over the K draws."""
    diff = (ctx.eps_cond.float() - ctx.eps_uncond.float()).flatten(1).norm(dim=1)  # [B*K]
    return {"noise_magnitude": diff.view(ctx.b, ctx.k).mean(dim=1).double()}


SPEC = register(ScorerSpec(
    name="noise_magnitude",
    description="text-conditional noise prediction magnitude (Wen et al., ICLR 2024); higher = riskier",
    forward="full_conditional_unconditional",
    compute=compute,
    risk_column="noise_magnitude",
    columns=(Column("noise_magnitude", "double", "text-conditional noise magnitude (Wen et al. 2024); null "
                    "unless --scorer noise_magnitude"),),
    unet_forwards=2.0,
))
