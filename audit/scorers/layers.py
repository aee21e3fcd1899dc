"""Per-layer attention columns: the entropy and BOS mass of every cross-attention layer, written by each
scorer that pays for a full conditional forward (there is no extra UNet forward: the capture processor
records every ``attn2`` layer as the forward passes through it).

Owns :func:`per_layer_values`. The columns are :data:`audit.scorers.registry.LAYER_COLUMNS`:
``attn_entropy_lNN`` and ``bos_mass_lNN`` for layer index NN (00-15) in call order
(:func:`audit.capture.cross_attention_layers`); null after a partial forward and for indices past the
model's last layer; a model with more than 16 layers has only its first 16 written. Must not import torch
at module level, nor any ``audit`` module but the scorer registry and the entropy formula.

Per layer l (Ren et al., ECCV 2024; reference code renjie3/MemAttn ``detect.py``): a_l = the layer's attention
probabilities averaged over heads and query pixels, and over the noise draws; E_l = -sum_i a_l,i log a_l,i
(nats); BOS mass a_l,0.
"""

from __future__ import annotations

from audit.scorers.attention_entropy import attention_entropy
from audit.scorers.registry import MAX_LAYER_COLUMNS


def per_layer_values(probs: dict, b: int, k: int) -> dict:
    """``{"attn_entropy_lNN": float64 [B], "bos_mass_lNN": float64 [B]}`` for NN in 0..15, on the device.

    Args:
        probs: ``{layer: float32 [B*K, L]}`` for every cross-attention layer, in call order (prompt-major).
        b, k: prompts and noise draws per prompt.
    Indices past the last layer are NaN (written as null).
    """
    import torch

    layers = list(probs)
    any_a = probs[layers[0]]
    nan = torch.full((b,), float("nan"), dtype=torch.float64, device=any_a.device)
    out = {}
    for i in range(MAX_LAYER_COLUMNS):
        if i < len(layers):
            a = probs[layers[i]].view(b, k, -1).mean(dim=1).double()  # [B, L], mean over draws
            out[f"attn_entropy_l{i:02d}"], out[f"bos_mass_l{i:02d}"] = attention_entropy(a), a[:, 0]
        else:
            out[f"attn_entropy_l{i:02d}"], out[f"bos_mass_l{i:02d}"] = nan, nan
    return out
