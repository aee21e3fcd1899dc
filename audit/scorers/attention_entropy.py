"""The ``attention_entropy`` scorer (the default): Ren et al., "Unveiling and Mitigating Memorization in
Text-to-image Diffusion Models through Cross Attention", ECCV 2024 (arXiv 2403.11052): their detection metric E
(reference code renjie3/MemAttn ``detect.py``, layer index 3, step 0).

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
    """Entropy E = -sum_i a_i log a_i of distributions ``a`` along ``dim``, in nats (natural log, 0 log 0 = 0).

    Args:
        a: probabilities, e.g. float [B, L] (the attention over the L token positions of each prompt), non-negative
            and summing to 1 along ``dim``: a torch tensor, a numpy array or nested lists.
        dim: the axis of the distribution (token positions).

    Returns:
        ``a``'s shape without ``dim``, in nats: a torch tensor of ``a``'s dtype and device for a tensor (computed
        with ``torch.special.xlogy``), else a float64 numpy array (a masked log; no scipy). A negative or NaN entry
        gives NaN with both.

    Source: Ren et al., ECCV 2024 (arXiv 2403.11052), the attention entropy of the detection metric E; reference
    code renjie3/MemAttn ``detect.py``, ``(- attn * np.log(attn)).sum(...)`` over the 77 positions.
    """
    try:
        import torch

        if isinstance(a, torch.Tensor):
            return -torch.special.xlogy(a, a).sum(dim=dim)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    a = np.asarray(a, dtype=np.float64)
    safe = np.where(a > 0, a, 1.0)
    terms = np.where(a >= 0, a * np.log(safe), np.nan)  # a negative entry is no probability: NaN, as xlogy gives
    return -terms.sum(axis=dim)


SPEC = register(ScorerSpec(
    name="attention_entropy",
    description="cross-attention entropy at the first step (Ren et al., ECCV 2024); higher = riskier",
    forward="partial_conditional",
    compute=None,  # the shared forward computes attn_entropy; this scorer adds no column
    risk_column="attn_entropy",
    unet_forwards=1.0,
))
