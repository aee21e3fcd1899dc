"""Memorization mitigation: the second half of Ren et al., ECCV 2024 (arXiv 2403.11052).

* :func:`mitigate` -- inference-time mitigation on a user's own diffusers Stable Diffusion pipeline
  (attention processors installed by module name on every ``attn2`` layer, restored on exit)::

      with audit.mitigation.mitigate(pipe, c1=1.25):
          image = pipe(prompt).images[0]

* :class:`DetectAndMitigate` -- detection and mitigation in one generation: the first step's cross-attention
  is captured during the real generation, scored with the attention entropy, compared with a calibrated
  threshold, and the mitigation is switched on from the second step for flagged prompts (no extra forward).
* :mod:`audit.mitigation.training` -- a per-batch hook for a diffusers-style training loop that drops
  flagged samples from the loss.

Importing this package imports no torch or diffusers; the submodules do.
"""

from __future__ import annotations

__all__ = ["mitigate", "Mitigation", "MitigationError", "DetectAndMitigate", "MemorizationFilter"]


def __getattr__(name):  # lazy: `import audit.mitigation` stays light
    if name in ("mitigate", "Mitigation", "MitigationError", "MitigationRule"):
        from audit.mitigation import inference

        return getattr(inference, name)
    if name == "DetectAndMitigate":
        from audit.mitigation.detect import DetectAndMitigate

        return DetectAndMitigate
    if name == "MemorizationFilter":
        from audit.mitigation.training import MemorizationFilter

        return MemorizationFilter
    raise AttributeError(f"module 'audit.mitigation' has no attribute {name!r}")
