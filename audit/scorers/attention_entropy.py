"""The ``attention_entropy`` scorer (the default): Ren et al., "Unveiling and Mitigating Memorization in
Text-to-image Diffusion Models through Cross Attention", ECCV 2024 (arXiv 2403.11052), sec. 3.2 and 4.1.

With a the cross-attention probabilities of the selected layer(s) averaged over heads and query pixels (a
distribution over the L token positions), the risk is the entropy E = -sum_i a_i log a_i (natural log,
0 log 0 = 0). One partial UNet forward on the conditional branch, stopped after the last selected layer.

Owns the entropy formula and this scorer's registration. Must not import torch at module level, nor any
``audit`` module but the scorer registry (the shared forward in :mod:`audit.scorers.base` computes E for
every scorer, since the trigger tokens and ``attn_entropy`` column come from it).
"""

from __future__ import annotations

import numpy as np

from audit.scorers.registry import ScorerSpec, register


def attention_entropy(a, dim: int = -1):
    """Entropy E = -sum_i a_i log a_i of distributions ``a`` along ``dim`` (natural log, 0 log 0 = 0).

    Works on torch tensors (via ``torch.special.xlogy``) and numpy arrays (``scipy``-free: masked log).
    Source: Ren et al., ECCV 2024 (arXiv 2403.11052), sec. 4.1, eq. for attention entropy.
    """
    try:
        import torch

        if isinstance(a, torch.Tensor):
            return -torch.special.xlogy(a, a).sum(dim=dim)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    a = np.asarray(a, dtype=np.float64)
    safe = np.where(a > 0, a, 1.0)
    return -(a * np.log(safe)).sum(axis=dim)


SPEC = register(ScorerSpec(
    name="attention_entropy",
    description="cross-attention entropy at the first step (Ren et al., ECCV 2024); higher = riskier",
    forward="partial_conditional",
    compute=None,  # the shared forward computes attn_entropy; this scorer adds no column
    risk_column="attn_entropy",
    unet_forwards=1.0,
))
