"""The public Python API: :func:`score` for notebooks and other tools, :func:`run` for what ``memaudit run``
does. Both are re-exported by :mod:`audit` and import torch only when called.

Owns turning Python values into a run and a run's outputs into a DataFrame. Must not import torch,
diffusers, ray or polars at import time, nor the CLI (the CLI is a thin layer over this module).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os
from pathlib import Path
import tempfile


def run(inputs=None, out: str | Path | None = None, *, config: str | Path | None = None, progress: bool | None = False,
        log=None, **options):
    """Run an audit, as ``memaudit run`` does; returns ``(run folder, manifest dict)``.

    Args:
        inputs: a path, glob or URL, or a list of them (Parquet, JSONL, CSV, TXT); may come from ``config``.
        out: the run folder (default ``./memaudit-runs/<time>``); rerunning on it resumes.
        config: a TOML file of options, as ``memaudit run --config`` reads it (``pipelines/*.toml``); ``inputs``,
            ``out`` and the options given here win over the file's.
        progress: True: a progress bar; False (default): none; None: as the CLI, a bar when stderr is a terminal,
            else a plain line through ``log`` every minute.
        log: callable taking one-line messages (default: print to stderr).
        **options: any other :class:`audit.config.RunConfig` field (``model``, ``scorer``, ``batch_size``,
            ``engine``, ``cache``, ...), with Python values (tuples or lists for ``layers``/``keep_columns``).

    Raises:
        audit.errors.RunError, audit.errors.SourceError, audit.errors.ModelError: as the CLI reports them; an
            unreadable ``config`` file or one with unknown options (:class:`audit.errors.ConfigError`).
        audit.errors.ScoringFailedError: more than ``max_error_fraction`` (default 0.01) of the rows reaching the
            model could not be scored, or of the rows read could not be read as prompts (missing_prompt_column,
            missing_id_column), or rows were read and none was scored; raised after the outputs were written (the
            CLI exits 4 there).
        audit.errors.FlaggedPromptsError: with ``calibration`` and ``fail_on_flagged``, more rows were flagged
            than that (a prompt on 3 rows counts 3); raised after the outputs were written (the CLI exits 3 there).
        TypeError: an unknown option or one of the wrong type (``seed="x"``), or ``inputs`` not a path or a
            non-empty list of paths.
        KeyError: ``layers`` names a layer the model does not have (the message lists them).
    """
    if config is not None:
        from audit.config import load_config_file

        from_file = load_config_file(config)
        file_inputs, file_out = from_file.pop("inputs", None), from_file.pop("out", None)
        inputs = file_inputs if inputs is None else inputs
        out = file_out if out is None else out
        options = {**from_file, **options}
    return _run(inputs, out, options, progress=progress, log=log)


def _run(inputs, out, options: dict, *, progress=False, log=None, nothing_scored_ok: bool = False,
         caller: str = "audit.run()", not_options=()):
    """:func:`run` with its ``options`` as a dict (so that a caller's option can never set the ones below);
    ``nothing_scored_ok`` leaves out the check that some row was scored (:func:`score` returns every row's reason
    instead); ``caller`` names the function in messages; ``not_options``: run options the caller does not take
    (:data:`SCORE_REFUSES`), left out of the unknown-option message's list."""
    from audit.calibrate import flagged_gate
    from audit.config import RunConfig, checked_option
    from audit.errors import ConfigError, FlaggedPromptsError, ScoringFailedError
    from audit.runner import execute, run_failure

    known = {f.name for f in dataclasses.fields(RunConfig)} - {"inputs", "out", *not_options}
    if unknown := sorted(set(options) - known):
        raise TypeError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: the options are "
                        f"{', '.join(sorted(known))}")
    try:  # the types the CLI's parser enforces: seed="x" failed every row as scoring_error
        options = {name: checked_option(name, value, caller) for name, value in options.items()}
    except ConfigError as exc:
        raise TypeError(str(exc)) from None
    given = inputs
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs) if hasattr(inputs, "__iter__") else None
    if not inputs or not all(isinstance(i, (str, os.PathLike)) for i in inputs):
        raise TypeError(f"inputs must be a path, glob or URL (str or Path), or a non-empty list of them, not "
                        f"{given!r:.80}")
    cfg = RunConfig(inputs=tuple(str(i) for i in inputs), out=str(out) if out is not None else None, **options)
    run_dir, manifest = execute(cfg, progress=progress, log=log)
    failed = run_failure(cfg, run_dir, manifest, nothing_scored_ok)
    if failed:
        raise ScoringFailedError(failed, run_dir, manifest)
    if flagged := flagged_gate(cfg, manifest):
        raise FlaggedPromptsError(flagged, run_dir, manifest)
    return run_dir, manifest


# run options that make no sense for score(): it writes its prompts to a temporary table of its own
SCORE_REFUSES = {"out": "it writes no run folder", "inputs": "it scores the prompts given",
                 "limit": "every prompt gets a row", "prompt_column": "the prompts are given as a list",
                 "id_column": "rows are identified by position", "keep_columns": "the prompts are given as a list",
                 "skip_bad_files": "the prompts are given as a list",
                 "fail_on_flagged": "filter the returned table's flagged column instead"}


def score(prompts, model: str | None = None, scorer: str = "attention_entropy", **options):
    """Score ``prompts`` (a list of strings) and return a polars DataFrame, one row per prompt in input order.

    Columns: ``row`` (position in ``prompts``), the risk columns of ``risk.parquet`` (``risk``,
    ``attn_entropy``, ``bos_mass``, ``trigger_tokens``, ..., rank 1 = riskiest; null for rejected prompts),
    ``reason`` (why a prompt was rejected, null when scored) and ``detail``. Values equal those of
    ``memaudit run`` on the same prompts with the same options.

    Args:
        prompts: an iterable of prompt texts (a list, a pandas or polars Series, an Arrow array). An item that
            is None (or pandas' missing value), not a string (``prompt_not_string``, its type in ``detail``) or
            not encodable as UTF-8 (``invalid_utf8``: a lone surrogate) is rejected with a reason, as
            ``memaudit run`` rejects such rows; nothing is raised for it.
        model: hub id or local diffusers folder (default: the bundled lab model).
        scorer: a registered scorer (:data:`audit.scorers.SCORERS`).
        **options: other ``run`` options (``batch_size``, ``device``, ``dtype``, ``layers``, ``noise_draws``,
            ``noise_generator``, ``seed``, ``cache``, ...).

    Raises:
        TypeError: ``prompts`` is a single string, bytes, a mapping, a table (a DataFrame: pass its prompt column)
            or not iterable; an unknown option, an option of the wrong type, or one that only :func:`run` takes
            (:data:`SCORE_REFUSES`: ``out``, ``limit``, ...).
        KeyError: ``layers`` names a layer the model does not have (the message lists them).
        audit.errors.RunError: an option out of range (``batch_size=0``, ``noise_draws=0``, a bad device or
            dtype) or an unknown scorer (with a "did you mean"); an unusable ``calibration``
            (:class:`audit.errors.CalibrationError`, a RunError).
        audit.errors.ModelError: the model cannot be found or loaded, or its family refuses the scorer.
        audit.errors.ScoringFailedError: the model failed on more than ``max_error_fraction`` of the prompts; its
            ``.frame`` is the DataFrame above (the run folder was temporary).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if given := sorted(set(SCORE_REFUSES) & set(options)):
        raise TypeError(f"score() takes no {', '.join(given)} ({'; '.join(SCORE_REFUSES[g] for g in given)}); "
                        "audit.run(inputs, out=..., ...) runs a whole audit")
    if hasattr(prompts, "columns") or hasattr(prompts, "column_names"):  # pandas / polars DataFrame, Arrow table
        raise TypeError(f"prompts must be a list (or another iterable) of strings, not a table "
                        f"({type(prompts).__name__}: iterating it gives its column names or rows): pass its prompt "
                        "column, e.g. df['prompt']")
    single = (str, bytes, bytearray, Mapping)  # a mapping iterates its keys: not a list of prompts either
    if isinstance(prompts, single) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts must be a list (or another iterable) of strings, not a {type(prompts).__name__}"
                        + (": wrap a single prompt in a list" if isinstance(prompts, single) else ""))
    # an Arrow array or chunked array iterates Arrow scalars: its Python values are the prompts; a pandas Series
    # holds its missing values as NaN (or pd.NA): they are null prompts, as a null in a Parquet column
    if hasattr(prompts, "to_pylist"):
        prompts = prompts.to_pylist()
    elif hasattr(prompts, "isna") and hasattr(prompts, "tolist"):
        prompts = [None if missing else p for p, missing in zip(prompts.tolist(), prompts.isna().tolist())]
    else:
        prompts = list(prompts)
    kept, local = [], []  # rows passed to the run, and rows rejected here (with the run's reasons)
    for i, p in enumerate(prompts):
        if p is None or isinstance(p, str):
            try:
                (p or "").encode("utf-8")
                kept.append(i)
            except UnicodeEncodeError as exc:
                escaped = p.encode("utf-8", "backslashreplace").decode("utf-8")
                local.append({"row": i, "reason": "invalid_utf8", "prompt": escaped, "detail": str(exc)})
        else:
            local.append({"row": i, "reason": "prompt_not_string", "prompt": None, "detail": type(p).__name__})
    from audit.errors import ScoringFailedError

    with tempfile.TemporaryDirectory(prefix="memaudit-score-") as tmp:
        src = Path(tmp) / "prompts.parquet"
        pq.write_table(pa.table({"prompt": pa.array([prompts[i] for i in kept], pa.string())}), src)
        log, progress = options.pop("log", lambda msg: None), options.pop("progress", False)
        try:
            out, _ = _run([src], Path(tmp) / "run", dict(options, model=model, scorer=scorer), progress=progress,
                          log=log, nothing_scored_ok=True, caller="audit.score()", not_options=SCORE_REFUSES)
        except ScoringFailedError as exc:  # the run folder is temporary: the error carries the rows instead
            # the run's last sentence names its folder; the message already ends with a full stop without it
            message = str(exc).replace(f" The outputs in {exc.out} hold what was scored.", "").rstrip(".")
            failed = ScoringFailedError(f"{message}. The error's .frame holds every prompt's row (scored, or "
                                        "rejected with the reason).", None, exc.manifest)
            failed.frame = _score_frame(exc.out, kept, local)
            raise failed from None
        return _score_frame(out, kept, local)


def _score_frame(out: Path, kept: list[int], local: list[dict]):
    """:func:`score`'s DataFrame from its run folder ``out``: one row per prompt, by position in the prompts
    (``kept``: the positions the run scored or rejected; ``local``: rows rejected before the run)."""
    import polars as pl

    risk = pl.read_parquet(out / "risk.parquet").drop("source", "prompt_id")
    rejects = pl.read_parquet(out / "rejects.parquet").select("row", "reason", "prompt", "detail")
    # the run's rows count the kept prompts: back to positions in ``prompts``
    position = pl.Series("position", kept, dtype=pl.Int64)
    risk = risk.with_columns(position.gather(risk["row"]).alias("row"))
    rejects = rejects.with_columns(position.gather(rejects["row"]).alias("row"))
    parts = [risk.with_columns(pl.lit(None, pl.String).alias("reason"), pl.lit(None, pl.String).alias("detail")),
             rejects]
    if local:
        parts.append(pl.DataFrame(local, schema={"row": pl.Int64, "reason": pl.String, "prompt": pl.String,
                                                 "detail": pl.String}))
    table = pl.concat(parts, how="diagonal_relaxed")
    return table.sort("row").select("row", *[c for c in table.columns if c != "row"])
