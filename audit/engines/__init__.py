"""Engines: WHERE units run, behind one interface; nothing else.

An engine is a module with ``IN_PROCESS`` (True: it scores with the driver's own
:class:`audit.scorers.Scorer`, so the driver loads the model; False: its workers load it, and the driver
reads only the model's identity) and ``run(job: EngineJob) -> list of unit stats``; an engine whose
workers may have other devices than the driver also has ``probe_dtype(cfg) -> str | None``
(``--dtype auto`` as its workers resolve it). Every engine runs the same engine-agnostic unit function
on groups of units (:func:`audit.unit.process_units`; ``job.units`` holds :class:`audit.unit.UnitGroup` objects or
single units, :func:`audit.unit.as_group`) with the same bounded retries (:func:`audit.faults.run_unit_with_retries`)
and reports progress in input rows through ``job.progress``. Adding an engine is one module plus one line
in :data:`ENGINES`. Must not import torch or ray at import time (engines import them inside ``run``), nor
the driver (:mod:`audit.runner`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import importlib
import os
from pathlib import Path
import sys

ENGINES = {"local": "audit.engines.local", "ray": "audit.engines.ray"}  # --engine name -> module
# --engine name -> (the package it imports when it runs, the pip requirement that brings it): memaudit's optional
# extras, absent from a minimal install (pip install memaudit without [ray])
REQUIRES = {"ray": ("ray", "memaudit[ray]")}


def missing_requirement(name: str) -> str | None:
    """Why ``--engine name`` cannot run in this environment (its package is not installed: a minimal install
    without the extra that brings it), or None. Looks the package up without importing it (``import ray`` takes
    seconds), so a run or ``--dry-run`` says so in one line before it plans, instead of a ``ModuleNotFoundError``
    once it reaches the engine."""
    if name not in REQUIRES:
        return None
    import importlib.util

    package, extra = REQUIRES[name]
    try:
        if importlib.util.find_spec(package) is not None:
            return None
    except (ImportError, ValueError):  # a broken or half-removed install: as not installed
        pass
    return (f"--engine {name} needs the {package} package, which is not installed in this environment "
            f"({os.path.dirname(sys.executable)}): pip install '{extra}', or use --engine local")


@dataclass
class EngineJob:
    """What an engine is given: the units still to do (groups of units scored together, or single units), the
    run's options, where shards go, a progress callback
    (input rows done), the model as workers load it (hub id or folder), the run's score configuration and
    model fingerprint, for in-process engines the driver's scorer, and the run's ``log`` (one-line messages; None:
    printed to stderr)."""

    units: list
    cfg: object
    shard_dir: Path
    progress: Callable[[int], None]
    model_arg: str
    score_config: object
    fingerprint: str
    scorer: object = None
    log: Callable[[str], None] | None = None


def get_engine(name: str):
    """The engine module for ``--engine name``.

    Raises:
        audit.errors.RunError: unknown name (the message lists the engines), or an engine whose package is not
            installed (:func:`missing_requirement`).
    """
    from audit.errors import RunError

    if name not in ENGINES:
        raise RunError(f"--engine {name}: choose one of {', '.join(ENGINES)}")
    if problem := missing_requirement(name):
        raise RunError(problem)
    return importlib.import_module(ENGINES[name])
