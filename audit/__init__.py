"""memaudit: score text-to-image prompts for training-image memorization risk.

The score is the cross-attention entropy at the first denoising step (Ren et al., "Unveiling and
Mitigating Memorization in Text-to-image Diffusion Models through Cross Attention", ECCV 2024,
arXiv 2403.11052). The public API is :func:`audit.score`, :class:`audit.Auditor` (a model loaded once for many
``score`` calls, from one thread or several) and :func:`audit.run` (:mod:`audit.api`), and the two errors ``audit.run``
raises after writing its outputs (:mod:`audit.errors`, where every memaudit error is), imported
on first use: importing this package imports no torch, diffusers or ray, and nothing else of ``audit``.
"""

__version__ = "0.1.0"
__all__ = ["__version__", "run", "score", "Auditor", "ScoringFailedError", "FlaggedPromptsError"]


def __getattr__(name: str):
    if name in ("score", "run", "Auditor"):
        from audit import api

        return getattr(api, name)
    if name in ("ScoringFailedError", "FlaggedPromptsError"):  # what audit.run raises after writing its outputs
        from audit import errors

        return getattr(errors, name)
    if name == "errors":  # `except audit.errors.ModelError` after a bare `import audit` (a module with no imports)
        import importlib

        return importlib.import_module("audit.errors")
    raise AttributeError(f"module 'audit' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, also those imported on first use (a notebook's tab completion, ``dir(audit)``)."""
    return sorted(set(globals()) | set(__all__) | {"errors"})
