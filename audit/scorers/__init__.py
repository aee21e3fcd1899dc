"""Scorers: one module per scorer, a registry, and the forward they share.

Owns what a score is. :mod:`audit.scorers.registry` names each scorer (the forward it needs, the columns it
writes, higher-is-riskier, its cost in UNet forwards); :mod:`audit.scorers.base` runs the shared forward
(:class:`Scorer`); each scorer's module adds its formula and registers itself. Adding a scorer is one new
module plus its name in :data:`BUILTIN` (or a :func:`register` call from anywhere, for the local engine only: a Ray
worker imports this package, not the script that called it). Must not import
engines, the pipeline, outputs or reporting; importing this package imports no torch (numpy only).
"""

from __future__ import annotations

import importlib

from audit.scorers.registry import (CAPTURE_COLUMNS, FORWARDS, SCORERS, Column, ScorerSpec, get_scorer,
                                    register, result_columns, score_columns, unregister)

BUILTIN = ("attention_entropy", "noise_magnitude", "guidance_geometry", "attention_entropy_late")  # modules of audit.scorers that register a scorer
for _name in BUILTIN:
    importlib.import_module(f"audit.scorers.{_name}")
# the scorers any process has once it imports this package (a Ray worker too); one registered later, by a register()
# call in a script, exists only in the process that made the call
ON_IMPORT = frozenset(SCORERS)

from audit.scorers.attention_entropy import attention_entropy  # noqa: E402
from audit.scorers.base import (ForwardContext, PreparedBatch, ScoreConfig, Scorer, Tokens,  # noqa: E402
                                batch_size_for_memory, batch_size_from_probes, prompt_hash, prompt_seed, tokenize)

__all__ = ["BUILTIN", "ON_IMPORT", "CAPTURE_COLUMNS", "FORWARDS", "SCORERS", "Column", "ForwardContext", "PreparedBatch",
           "ScoreConfig", "Scorer", "ScorerSpec", "Tokens", "attention_entropy", "batch_size_for_memory",
           "batch_size_from_probes", "get_scorer", "prompt_hash", "prompt_seed", "register", "result_columns", "score_columns",
           "tokenize", "unregister"]
