"""Seeded first-step noise drawn on the scoring device: Philox4x32-10 and the Box-Muller transform.

memaudit seeds each prompt's noise by (run seed, normalized prompt) (:func:`audit.scorers.base.prompt_seed`).
Two generators turn that seed into the standard normal noise of the first denoising step
(:data:`NOISE_GENERATORS`):

- ``mt19937`` (the default): torch's CPU generator, one per prompt, on the host. 44-77 us a prompt at
  SD 1.4's latent (4 x 64 x 64) on one core, depending on the machine (docs/gpu.md, "The host's ceiling"):
  the largest host cost of scoring SD 1.4 on a GPU after the tokenizer.
- ``philox``: the counter-based Philox4x32-10 generator (Salmon, Moraes, Dror and Shaw, "Parallel random
  numbers: as easy as 1, 2, 3", SC 2011, the Philox family; the constants and round function of
  ``philox.h`` in Random123, the authors' reference code), written in elementwise int64 tensor ops and run on the scoring device for the whole batch at
  once: a fixed number of tensor operations per batch (about 210), whatever its size, and nothing per prompt
  on the host but the seed. The integer stream is exact on every device (every product is split into 16-bit
  halves so that it stays below 2^63); the Box-Muller transform runs in float64 and rounds to float32 once, so
  CPU and GPU give the same noise up to float64 rounding in ``log``, ``cos`` and ``sin`` (a float32 value
  differs, if at all, by one unit in the last place). On a CPU it is slower than ``mt19937`` (int64 tensor
  ops: about 44 us a prompt at 3 x 16 x 16, 1.4 ms at 4 x 64 x 64 on one core): it is the GPU's generator.

The two generators give different noise for the same seed, so scores differ between them by the noise's
effect (as between two run seeds); the generator is part of a run's score configuration.
"""

from __future__ import annotations

import math

NOISE_GENERATORS = ("mt19937", "philox")

# Philox4x32 constants (Salmon et al. 2011; Random123 philox.h): multipliers and Weyl key bumps
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def _mulhilo(a, m):
    """High and low 32-bit words of ``a * m`` for int64 tensors holding unsigned 32-bit values (``m`` may be a
    broadcastable tensor). Exact: the product is formed from ``a``'s 16-bit halves, each part below 2^48."""
    lo16, hi16 = a & 0xFFFF, a >> 16
    p_lo, p_hi = lo16 * m, hi16 * m  # < 2^48 each
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counters (c0, c1, c2, c3) under keys (k0, k1): four int64 tensors of unsigned 32-bit
    words (broadcastable; any shape, any device), returned as a tuple of four.

    Each round (Salmon et al. 2011; Random123 ``philox.h``): ``(hi0, lo0) = M0 * c0``, ``(hi1, lo1) = M1 * c2`` (64-bit
    products split in words), then ``(c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``; the keys
    advance by the Weyl constants (W0, W1) between rounds. Checked against Random123's known-answer vectors.
    """
    import torch

    a = torch.stack(torch.broadcast_tensors(c0, c2))  # [2, ...]: the words that are multiplied
    b = torch.stack(torch.broadcast_tensors(c1, c3))  # [2, ...]: the words that are xored in
    # the per-lane constants made on the device (a tensor built from host data would be a blocking copy: a host
    # synchronization per batch on a GPU)
    lane = torch.arange(2, dtype=torch.int64, device=a.device).view((2,) + (1,) * (a.dim() - 1))
    m = PHILOX_M0 + (PHILOX_M1 - PHILOX_M0) * lane
    w = PHILOX_W0 + (PHILOX_W1 - PHILOX_W0) * lane
    k = torch.stack(torch.broadcast_tensors(k0, k1))
    for r in range(PHILOX_ROUNDS):
        if r:
            k = (k + w) & _MASK32
        hi, lo = _mulhilo(a, m)
        a, b = hi.flip(0) ^ b ^ k, lo.flip(0)
    return a[0], b[0], a[1], b[1]


def philox_normal(seeds, n: int):
    """Standard normal float32 [B, n] on ``seeds``' device: row i is the first ``n`` values of the stream of
    prompt seed ``seeds[i]``, so a prompt's noise never depends on its batch or its position in it.

    Args:
        seeds: int64 [B], each in [0, 2^63) (:func:`audit.scorers.base.prompt_seed`); the Philox key is
            (low 32 bits, high 32 bits).
        n: values per row (noise draws x channels x height x width).

    Block j (j = 0 .. ceil(n / 4) - 1) is Philox4x32-10 of counter (j, 0, 0, 0) under the row's key:
    words (x0, x1, x2, x3). Two Box-Muller pairs (Box and Muller 1958) give its four values: with
    ``u1 = (x + 1) / 2^32`` in (0, 1] and ``u2 = y / 2^32`` in [0, 1),
    ``sqrt(-2 ln u1) * (cos 2 pi u2, sin 2 pi u2)`` for (x, y) = (x0, x1), then (x2, x3); in float64
    (float32 on MPS, which has no float64), rounded once to float32.

    Raises:
        ValueError: ``seeds`` is not a 1-d integer tensor, or ``n`` < 1.
    """
    import torch

    if seeds.dim() != 1 or seeds.dtype != torch.int64:
        raise ValueError(f"seeds must be int64 [B], got {seeds.dtype} {tuple(seeds.shape)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    device = seeds.device
    blocks = (n + 3) // 4
    j = torch.arange(blocks, dtype=torch.int64, device=device).view(1, blocks)  # counter word 0
    zero = torch.zeros((1, 1), dtype=torch.int64, device=device)
    x0, x1, x2, x3 = philox4x32_10(j, zero, zero, zero, (seeds & _MASK32).view(-1, 1), (seeds >> 32).view(-1, 1))
    work = torch.float32 if device.type == "mps" else torch.float64
    u1 = (torch.stack([x0, x2]).to(work) + 1.0) * 2.0 ** -32  # [2, B, blocks] in (0, 1]
    theta = torch.stack([x1, x3]).to(work) * (2.0 ** -32 * 2.0 * math.pi)
    r = torch.sqrt(-2.0 * torch.log(u1))
    z = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=-1)  # [2 pairs, B, blocks, (cos, sin)]
    z = z.permute(1, 2, 0, 3).reshape(len(seeds), blocks * 4)  # per block: pair 0 (cos, sin), pair 1 (cos, sin)
    return z[:, :n].to(torch.float32)
