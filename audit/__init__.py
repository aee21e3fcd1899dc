"""memaudit: score text-to-image prompts for training-image memorization risk.

The score is the cross-attention entropy at the first denoising step (Ren et al., "Unveiling and
Mitigating Memorization in Text-to-image Diffusion Models through Cross Attention", ECCV 2024,
arXiv 2403.11052). Importing this package imports no torch, diffusers or ray.
"""

__version__ = "0.1.0"
