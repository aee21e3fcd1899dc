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
            missing_id_column, invalid_utf8, invalid_csv_row, invalid_json, prompt_not_string), or rows were read and
            none was scored; raised after the outputs were written (the
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
         caller: str = "audit.run()", not_options=(), loaded=None):
    """:func:`run` with its ``options`` as a dict (so that a caller's option can never set the ones below);
    ``nothing_scored_ok`` leaves out the check that some row was scored (:func:`score` returns every row's reason
    instead); ``caller`` names the function in messages; ``not_options``: run options the caller does not take
    (:data:`SCORE_REFUSES`), left out of the unknown-option message's list; ``loaded``: ``(scorer, confirmer)``
    already loaded for these options (:class:`Auditor`), used instead of loading the model."""
    from audit.calibrate import flagged_gate
    from audit.config import RunConfig
    from audit.errors import FlaggedPromptsError, ScoringFailedError
    from audit.gates import run_failure
    from audit.runner import execute

    options = _checked_options(options, caller, not_options)
    given = inputs
    if hasattr(inputs, "columns") or hasattr(inputs, "column_names") or isinstance(inputs, Mapping):
        # iterating a DataFrame gives its column names, a mapping its keys: they were taken as paths ("prompt: no
        # such file or folder"), and a column named like a folder beside the caller audited that folder
        raise TypeError(f"inputs must be a path, glob or URL (str or Path), or a non-empty list of them, not a "
                        f"{type(inputs).__name__}: write the table to Parquet and pass its path, or score its "
                        "prompts in memory with audit.score(table['prompt'])")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = list(inputs) if hasattr(inputs, "__iter__") else None
    if not inputs or not all(isinstance(i, (str, os.PathLike)) for i in inputs):
        raise TypeError(f"inputs must be a path, glob or URL (str or Path), or a non-empty list of them, not "
                        f"{given!r:.80}")
    cfg = RunConfig(inputs=tuple(str(i) for i in inputs), out=str(out) if out is not None else None, **options)
    from contextlib import nullcontext

    from audit.faults import termination_handlers_kept

    if cfg.engine == "ray":
        from audit.engines.ray import settings_kept
    else:
        settings_kept = nullcontext
    # the Ray engine installs memaudit's signal handlers, and quiets Ray, for the run: the caller's come back
    with termination_handlers_kept(), settings_kept():
        run_dir, manifest = execute(cfg, progress=progress, log=log, **({"loaded": loaded} if loaded else {}))
    failed = run_failure(cfg, run_dir, manifest, nothing_scored_ok)
    if failed:
        raise ScoringFailedError(failed, run_dir, manifest)
    if flagged := flagged_gate(cfg, manifest):
        raise FlaggedPromptsError(flagged, run_dir, manifest)
    return run_dir, manifest


def _checked_options(options: dict, caller: str, not_options=()) -> dict:
    """``options`` (run options by name) checked as the CLI's parser checks them, with their values normalized
    (:func:`audit.config.checked_option`).

    Raises:
        TypeError: an unknown option (``not_options`` are left out of the list of known ones) or one of the wrong
            type.
    """
    from audit.config import RunConfig, checked_option
    from audit.errors import ConfigError

    known = {f.name for f in dataclasses.fields(RunConfig)} - {"inputs", "out", *not_options}
    if unknown := sorted(set(options) - known):
        raise TypeError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: the options are "
                        f"{', '.join(sorted(known))}")
    try:  # the types the CLI's parser enforces: seed="x" failed every row as scoring_error
        return {name: checked_option(name, value, caller) for name, value in options.items()}
    except ConfigError as exc:
        raise TypeError(str(exc)) from None


# run options that make no sense for score(): it writes its prompts to a temporary table of its own
SCORE_REFUSES = {"out": "it writes no run folder", "inputs": "it scores the prompts given",
                 "limit": "every prompt gets a row", "prompt_column": "the prompts are given as a list",
                 "id_column": "rows are identified by position", "keep_columns": "the prompts are given as a list",
                 "skip_bad_files": "the prompts are given as a list",
                 "fail_on_flagged": "filter the returned table's flagged column instead",
                 "retry_failed": "each call scores into a new folder: call it again to retry"}


def score(prompts, model: str | None = None, scorer: str = "attention_entropy", **options):
    """Score ``prompts`` (a list of strings) and return a polars DataFrame, one row per prompt in input order.

    Columns: ``row`` (int64, position in ``prompts``), the risk columns of ``risk.parquet`` (null for rejected
    prompts; ``schemas/risk.json`` lists them all), among them ``risk`` (float64, the scorer's value, higher =
    riskier), ``attn_entropy`` (float64, nats, from 0 to ln L: ln 77 = 4.34 for CLIP), ``bos_mass`` (float64, the
    attention probability on BOS, 0 to 1), ``trigger_tokens`` (a list of up to 5 structs ``token``, ``position``,
    ``mass``, ``start``, ``end``), ``n_tokens`` and ``truncated``, ``prompt`` (normalized: NFC, stripped) and
    ``rank`` (int64, 1 = riskiest among this call's prompts; ties by ``memaudit run``'s text order of
    ``<file>#<row>``, in which row 10 sorts before row 2); then ``reason`` (why a prompt was rejected, null when
    scored) and ``detail``. Values equal those of ``memaudit run`` on the same prompts with the same options, at torch's
    default float32 precision (a process's ``torch.set_float32_matmul_precision("high")`` or ``"medium"`` changes
    them, and is recorded and cache-keyed with the device: :func:`audit.models.base.reduced_float32_precision`). The
    model is loaded on every call: :class:`Auditor` keeps it loaded for many calls. Calls from several threads at
    once are safe, each with its own copy of the model in memory. Prints nothing (messages go to ``log``).

    Args:
        prompts: an iterable of prompt texts (a list, a pandas or polars Series, an Arrow array). An item that
            is None or a missing value (a float NaN, ``pandas.NA``, ``pandas.NaT``: ``null_prompt``, in a list as in a
            Series), not a string (``prompt_not_string``, its type in ``detail``) or
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
    _refuse_run_options(options, "score()")
    log, progress = options.pop("log", lambda msg: None), options.pop("progress", False)
    return _score(prompts, dict(options, model=model, scorer=scorer), log, progress, "audit.score()")


def _refuse_run_options(options: dict, caller: str, refused: Mapping = None) -> None:
    """Raise TypeError for an option of ``options`` that ``caller`` does not take (``refused``, by default
    :data:`SCORE_REFUSES`: option -> why)."""
    refused = SCORE_REFUSES if refused is None else refused
    if given := sorted(set(refused) & set(options)):
        raise TypeError(f"{caller} takes no {', '.join(given)} ({'; '.join(refused[g] for g in given)}); "
                        "audit.run(inputs, out=..., ...) runs a whole audit")


def _score(prompts, options: dict, log, progress, caller: str, loaded=None, not_options=None):
    """:func:`score`'s work, with every run option (``model`` and ``scorer`` among them) in ``options``;
    ``loaded``: the ``(scorer, confirmer)`` an :class:`Auditor` keeps, used instead of loading the model;
    ``not_options``: the run options ``caller`` does not take (default :data:`SCORE_REFUSES`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

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
        if _missing(p):  # a missing value as pandas writes it into a list (df["prompt"].tolist()): a null prompt
            p = prompts[i] = None
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
        try:
            out, _ = _run([src], Path(tmp) / "run", options, progress=progress, log=log, nothing_scored_ok=True,
                          caller=caller, not_options=SCORE_REFUSES if not_options is None else not_options,
                          loaded=loaded)
        except ScoringFailedError as exc:  # the run folder is temporary: the error carries the rows instead
            # the run's last sentence names its folder; the message already ends with a full stop without it
            message = str(exc).replace(f" The outputs in {exc.out} hold what was scored.", "").rstrip(".")
            failed = ScoringFailedError(f"{message}. The error's .frame holds every prompt's row (scored, or "
                                        "rejected with the reason).", None, exc.manifest)
            failed.frame = _score_frame(exc.out, kept, local)
            raise failed from None
        return _score_frame(out, kept, local)


def _missing(value) -> bool:
    """Whether an item of :func:`score`'s prompts is a missing value of pandas or NumPy rather than a prompt of
    another type: a float NaN (what an object column's missing values are, ``df["prompt"].tolist()`` included),
    ``pandas.NA`` or ``pandas.NaT``. Such an item is a null prompt (``null_prompt``), as it is in a pandas Series and
    as a null is in a Parquet column; it was ``prompt_not_string`` in a list and ``null_prompt`` in the Series."""
    if isinstance(value, float):
        return value != value  # NaN
    return type(value).__module__.startswith("pandas") and type(value).__name__ in ("NAType", "NaTType")


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


def _fixed_paths(options: dict) -> dict:
    """``options``' ``cache`` folder and ``calibration`` file made absolute against the working folder now (``~``
    expanded), for an :class:`Auditor`, whose options hold for its life: each :meth:`Auditor.score` call resolved a
    relative one against the working folder of that call, so after a notebook's ``%cd`` (``os.chdir``) a relative
    ``cache="cache"`` made a second, empty cache there and ``calibration="cal.json"`` was not found. A URL is left
    as given (the options' own checks refuse it)."""
    fixed = {}
    for name in ("cache", "calibration"):
        value = options.get(name)
        if isinstance(value, (str, os.PathLike)) and os.fspath(value) and "://" not in os.fspath(value):
            fixed[name] = str(Path(os.path.expanduser(os.fspath(value))).absolute())
    return fixed


# options an Auditor takes at creation only from score()'s, and those it refuses besides SCORE_REFUSES
AUDITOR_REFUSES = {**SCORE_REFUSES, "engine": "it scores in this process, with the model it keeps",
                   "workers": "it scores in this process, with the model it keeps",
                   "address": "it scores in this process, with the model it keeps"}


class Auditor:
    """A model loaded once and kept, for many :meth:`score` calls (a service scoring a few prompts per request).

    ``Auditor(model, scorer, **options)`` loads the model and builds the scorer at once; each :meth:`score` then
    scores with them, where :func:`audit.score` loads the model again on every call (a full load and a SHA-256
    over the weight files: seconds for Stable Diffusion). :meth:`score` returns exactly what
    ``audit.score(prompts, model, scorer, **options)`` returns: the same DataFrame, equal values, the same reasons
    for rejected items, and so the values of ``memaudit run`` on the same prompts with the same options.

    Calls from several threads are safe: they take turns on the kept model (one call scores at a time; the
    attention capture is installed on the model's own layers, which two concurrent forwards would share). For
    parallel scoring, keep one Auditor per thread or process (each holds its own copy of the model).

    Values equal a bulk run's (``memaudit run`` or one :func:`audit.score` over many prompts) bit for bit only at
    a batch size of 8 or less: a call with fewer prompts than ``batch_size`` is scored at its count rounded up to a
    multiple of 8, and float32 kernels round another batch shape differently (measured on the lab model, 200 real
    prompts in requests of 3: at ``batch_size=8`` all 200 equal the bulk run's, at 32 or ``auto`` none, by at most
    3.1e-7; docs/audits.md).

    The model's identity (name, fingerprint) is read once, when it loads: replace the files and make a new Auditor.
    A relative ``cache`` or ``calibration`` path is taken against the working folder at creation (a later
    ``os.chdir`` does not move it).
    A batch size lowered after an out-of-memory error stays lowered for the Auditor's later calls (the run's rule
    for its later units). :meth:`close` (or leaving a ``with Auditor(...) as a:`` block) frees the model.

    Args:
        model: hub id or local diffusers folder (default: the bundled lab model).
        scorer: a registered scorer (:data:`audit.scorers.SCORERS`).
        **options: :func:`audit.score`'s other options (``batch_size``, ``device``, ``dtype``, ``layers``,
            ``noise_draws``, ``seed``, ``cache``, ``calibration``, ``compile``, ``log``, ...), fixed for the
            Auditor's life.

    Raises:
        TypeError: an unknown option, one of the wrong type, one that only :func:`run` takes
            (:data:`SCORE_REFUSES`), or ``engine``, ``workers`` or ``address`` (it scores in this process).
        KeyError: ``layers`` names a layer the model does not have (the message lists them).
        audit.errors.RunError: an option out of range or an unknown scorer, as :func:`audit.score` raises it; a
            ``calibration`` that cannot be read or was made for another model or score configuration
            (:class:`audit.errors.CalibrationError`), here rather than at the first call.
        audit.errors.ModelError: the model cannot be found or loaded, or its family refuses the scorer.
    """

    def __init__(self, model: str | None = None, scorer: str = "attention_entropy", **options):
        import threading

        from audit.calibrate import calibration_for_run, check_calibration
        from audit.config import RunConfig, validate_config
        from audit.runner import _load_scorer, model_argument, model_info

        _refuse_run_options(options, "Auditor()", AUDITOR_REFUSES)
        self._log = options.pop("log", lambda msg: None)
        self._progress = options.pop("progress", False)
        self._options = _checked_options(dict(options, model=model, scorer=scorer), "audit.Auditor()",
                                         AUDITOR_REFUSES)
        self._options.update(_fixed_paths(self._options))
        cfg = RunConfig(inputs=(), **self._options)
        validate_config(cfg)  # a typo fails here, before the model loads
        calibration = calibration_for_run(cfg)  # an unreadable calibration too, not at the first request
        self._loaded = _load_scorer(cfg, model_argument(cfg.model), None, self._log)
        if calibration is not None:  # made for another model or score configuration: refused here, as each call would
            scorer = self._loaded[0]
            info = model_info(scorer.model.name, scorer.model.fingerprint, scorer.model.path, scorer.model.device,
                              scorer.model.dtype)
            from audit.scorers.registry import recorded_config

            check_calibration(calibration, info, recorded_config(scorer.config.to_dict()
                                                                 | {"first_timestep": scorer.first_timestep}))
        self._lock = threading.Lock()
        self.model = self._loaded[0].model.name
        """The model's name (a hub id or the folder, as loaded)."""
        self.fingerprint = self._loaded[0].model.fingerprint
        """SHA-256 over the model's weight, tokenizer and scheduler files, as every run records it."""

    def score(self, prompts):
        """Score ``prompts`` with the kept model: the DataFrame :func:`audit.score` returns for them with this
        Auditor's model and options (one row per prompt in input order; ``row``, the risk columns, ``reason`` and
        ``detail``). Thread-safe: concurrent calls take turns.

        Raises:
            TypeError: ``prompts`` is a single string, bytes, a mapping, a table or not iterable.
            audit.errors.RunError: the Auditor was closed.
            audit.errors.ScoringFailedError: the model failed on more than ``max_error_fraction`` of the prompts;
                its ``.frame`` is the DataFrame.
        """
        from audit.errors import RunError

        with self._lock:
            if self._loaded is None:
                raise RunError("this Auditor was closed: create a new one (audit.Auditor(model, ...))")
            return _score(prompts, dict(self._options), self._log, self._progress, "audit.Auditor.score()",
                          loaded=self._loaded, not_options=AUDITOR_REFUSES)

    def close(self) -> None:
        """Free the kept model (and restore a compiled scorer's attention processors); later :meth:`score` calls
        raise :class:`audit.errors.RunError`. Closing twice does nothing."""
        with self._lock:
            loaded, self._loaded = self._loaded, None
        for part in loaded or ():
            if part is not None and hasattr(part, "close"):
                part.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Auditor(model={self.model!r}, scorer={self._options['scorer']!r}"
                f"{', closed' if self._loaded is None else ''})")
