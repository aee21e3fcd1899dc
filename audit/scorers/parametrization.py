"""Prediction-type conversion: the noise prediction eps from what a model predicts.

Owns :func:`to_epsilon` and :func:`alpha_bar`, small pure functions shared by every scorer that is defined
on the NOISE prediction (Wen et al., ICLR 2024; Asthana & Belagiannis, ICLR 2026) and by every model
family (the family only declares its prediction type: :meth:`audit.models.base.ModelAdapter.prediction_type`,
read from the scheduler config). Must not import any ``audit`` module; torch is used through the tensors
it is given.

Variance-preserving forward process (Ho et al. 2020, eq. 4; DDPM/DDIM as diffusers implements them):
``x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps`` with ``ab = alpha_bar_t`` (``scheduler.alphas_cumprod[t]``).
``x_t`` here is the UNet's INPUT: for DDIM ``scale_model_input`` is the identity and the input is x_t; for
the sigma-parametrized schedulers (Euler) the input ``x / sqrt(sigma^2 + 1)`` is again this VP x_t.

* ``epsilon``: eps = output.
* ``v_prediction`` (Salimans & Ho, ICLR 2022, sec. 4 and appendix D: v = sqrt(ab) eps - sqrt(1 - ab) x_0):
  eps = sqrt(ab) v + sqrt(1 - ab) x_t.  At a zero-terminal-SNR step (ab = 0; Lin et al. 2024) eps = x_t
  whatever the prompt, so any text-conditional difference of eps is 0 there by construction.
* ``sample`` (x_0 prediction): eps = (x_t - sqrt(ab) x_0) / sqrt(1 - ab) (undefined at ab = 1). At ab = 0 it
  is x_t whatever the prompt too.
"""

from __future__ import annotations

import math

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def alpha_bar(scheduler, t) -> float:
    """alpha_bar_t (dimensionless, in [0, 1]) at timestep ``t`` (number or 0-d tensor), as a Python float:
    ``scheduler.alphas_cumprod[t]`` at an integer t. The sigma-parametrized schedulers with ``linspace``
    spacing (Euler, SD 2.0's configuration) step through fractional timesteps (40.78 at index -3 of 50) and
    condition the model on them; there, as their ``set_timesteps`` does, sigma = sqrt((1 - ab) / ab) is
    interpolated linearly between the two integer timesteps around t, and alpha_bar_t = 1 / (1 + sigma^2)
    (diffusers ``EulerDiscreteScheduler.set_timesteps``: ``np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)``
    over ``sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5``)."""
    t = float(t)
    lo = int(t)  # t >= 0: the floor
    if t == lo:
        return float(scheduler.alphas_cumprod[lo])

    def sigma(i: int) -> float:
        ab = float(scheduler.alphas_cumprod[i])
        return math.sqrt((1.0 - ab) / ab)

    s = sigma(lo) + (t - lo) * (sigma(lo + 1) - sigma(lo))
    return 1.0 / (1.0 + s * s)


def to_epsilon(output, x_t, alpha_bar_t: float, prediction_type: str):
    """The noise prediction eps from a model ``output`` (tensor [N, C, H, W], any float dtype) at the
    noised input ``x_t`` (same shape) and ``alpha_bar_t`` (float in [0, 1]); see the module docstring for
    the formulas and sources. Computed in float32; returns float32 [N, C, H, W].

    Raises:
        ValueError: an unknown ``prediction_type`` (flow matching and others need their own definition),
            or ``sample`` prediction at alpha_bar_t = 1 (eps undefined).
    """
    out = output.float()
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return alpha_bar_t ** 0.5 * out + (1.0 - alpha_bar_t) ** 0.5 * x_t.float()
    if prediction_type == "sample":
        if alpha_bar_t >= 1.0:
            raise ValueError("sample prediction at alpha_bar = 1: the noise prediction is undefined")
        return (x_t.float() - alpha_bar_t ** 0.5 * out) / (1.0 - alpha_bar_t) ** 0.5
    raise ValueError(f"prediction_type {prediction_type!r}: memaudit converts {', '.join(PREDICTION_TYPES)} to "
                     "the noise prediction; no other is supported")
