"""Helpers shared by test modules (imported as ``helpers``: pytest puts this folder on sys.path)."""

from __future__ import annotations

import random
from pathlib import Path

from audit.pipeline import RunConfig

WORDS = "a photo of red blue cat dog city street beach sunset painting portrait old new small big".split()


def prompts_file(path: Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` distinct random prompts of 2-8 words (one a line) to ``path``."""
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) + f" {i}\n"
                            for i in range(n)))
    return path


def run_audit(inputs, model, out, **kw):
    """``execute`` a run quietly; returns ``(run folder, manifest)``."""
    from audit.runner import execute

    cfg = RunConfig(inputs=tuple(str(i) for i in inputs), model=str(model), out=str(out), **kw)
    return execute(cfg, progress=False, log=lambda msg: None)
