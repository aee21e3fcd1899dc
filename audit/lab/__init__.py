"""The lab: a tiny Stable-Diffusion-architecture model trained to memorize planted images, with measured
ground truth (docs/lab.md). ``LAB_MODEL_DIR`` is the bundled model folder (diffusers layout) and
``LAB_PROMPTS`` its labelled evaluation prompts (Parquet)."""

from pathlib import Path

LAB_DIR = Path(__file__).resolve().parent
LAB_MODEL_DIR = LAB_DIR / "model"
LAB_PROMPTS = LAB_DIR / "prompts.parquet"
LAB_PICTURE = LAB_DIR / "generations.png"

__all__ = ["LAB_DIR", "LAB_MODEL_DIR", "LAB_PROMPTS", "LAB_PICTURE"]
