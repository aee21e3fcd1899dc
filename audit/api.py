"""The public Python API: :func:`score` for notebooks and other tools, :func:`run` for what ``memaudit run``
does. Both are re-exported by :mod:`audit` and import torch only when called.

Owns turning Python values into a run and a run's outputs into a DataFrame. Must not import torch,
diffusers, ray or polars at import time, nor the CLI (the CLI is a thin layer over this module).
"""

from __future__ import annotations

from pathlib import Path
import tempfile


def run(inputs, out: str | Path | None = None, *, progress: bool | None = False, log=None, **options):
    """Run an audit, as ``memaudit run`` does; returns ``(run folder, manifest dict)``.

    Args:
        inputs: a path, glob or URL, or a list of them (Parquet, JSONL, CSV, TXT).
        out: the run folder (default ``./memaudit-runs/<time>``); rerunning on it resumes.
        progress: show a progress bar (default: no).
        log: callable taking one-line messages (default: print to stderr).
        **options: any other :class:`audit.config.RunConfig` field (``model``, ``scorer``, ``batch_size``,
            ``engine``, ``cache``, ...), with Python values (tuples or lists for ``layers``/``keep_columns``).

    Raises:
        audit.errors.RunError, audit.errors.SourceError, audit.errors.ModelError: as the CLI reports them.
        audit.errors.ScoringFailedError: more than ``max_error_fraction`` (default 0.01) of the rows reaching the
            model could not be scored; raised after the outputs were written (the CLI exits 4 there).
        TypeError: an unknown option.
    """
    from audit.config import RunConfig
    from audit.errors import ScoringFailedError
    from audit.runner import error_gate, execute

    inputs = (inputs,) if isinstance(inputs, (str, Path)) else tuple(inputs)
    for key in ("layers", "keep_columns"):
        if options.get(key) is not None:
            options[key] = tuple(options[key])
    cfg = RunConfig(inputs=tuple(str(i) for i in inputs), out=str(out) if out is not None else None, **options)
    run_dir, manifest = execute(cfg, progress=progress, log=log)
    failed = error_gate(cfg, run_dir, manifest)
    if failed:
        raise ScoringFailedError(failed, run_dir, manifest)
    return run_dir, manifest


def score(prompts, model: str | None = None, scorer: str = "attention_entropy", **options):
    """Score ``prompts`` (a list of strings) and return a polars DataFrame, one row per prompt in input order.

    Columns: ``row`` (position in ``prompts``), the risk columns of ``risk.parquet`` (``risk``,
    ``attn_entropy``, ``bos_mass``, ``trigger_tokens``, ..., rank 1 = riskiest; null for rejected prompts)
    and ``reason`` (why a prompt was rejected, null when scored). Values equal those of ``memaudit run``
    on the same prompts with the same options.

    Args:
        prompts: the prompt texts (None or non-strings are rejected with a reason, not raised).
        model: hub id or local diffusers folder (default: the bundled lab model).
        scorer: a registered scorer (:data:`audit.scorers.SCORERS`).
        **options: other ``run`` options (``batch_size``, ``device``, ``dtype``, ``layers``, ``noise_draws``,
            ``noise_generator``, ``seed``, ``cache``, ...).
    """
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = list(prompts)
    with tempfile.TemporaryDirectory(prefix="memaudit-score-") as tmp:
        src = Path(tmp) / "prompts.parquet"
        pq.write_table(pa.table({"prompt": pa.array([p if isinstance(p, str) else None for p in prompts],
                                                    pa.string())}), src)
        options.setdefault("log", lambda msg: None)
        out, _ = run([src], Path(tmp) / "run", model=model, scorer=scorer, **options)
        risk = pl.read_parquet(out / "risk.parquet").drop("source", "prompt_id")
        rejects = pl.read_parquet(out / "rejects.parquet").select("row", "reason", "prompt")
    table = pl.concat([risk.with_columns(pl.lit(None, pl.String).alias("reason")), rejects], how="diagonal")
    return table.sort("row").select("row", *[c for c in table.columns if c != "row"])
