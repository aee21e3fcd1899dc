"""``memaudit run`` as a function (the driver): check the options, plan, identify the model, run the units
on an engine, finalize.

Owns the order of a run's steps and its log lines. Must not hold unit, scoring, model-loading or engine
logic itself (each lives in its module); torch is imported only through them, when a run starts.
"""

from __future__ import annotations

from collections import Counter
import contextlib
import datetime as dt
from pathlib import Path
import sys
import time
from typing import Callable

from audit.config import RunConfig, expand_out, validate_config  # noqa: F401 (expand_out: also read from here)
from audit.errors import ModelError, RunError
from audit.gates import over_limit
from audit.text import counted, share, threshold_text, visible
from audit.pipeline import (Plan, beside_note, build_plan, check_out_dir, default_out_dir, finalize, out_lock,
                            prepare_out_dir, respelled, run_identity, settings_warnings)
from audit.unit import committed_stats, failed_rows, forget_unit, group_units, stale_units, unit_done

def default_model() -> str:
    """The bundled lab model folder (``audit/lab/model``), used when ``--model`` is not given.

    Raises:
        audit.errors.ModelError: the package was installed without the lab model.
    """
    try:
        from audit.lab import LAB_MODEL_DIR
    except ImportError:
        LAB_MODEL_DIR = None
    if LAB_MODEL_DIR is None or not Path(LAB_MODEL_DIR, "model_index.json").exists():
        raise ModelError("no --model given and no bundled lab model in this install: pass --model "
                         "(a hub id such as CompVis/stable-diffusion-v1-4, or a local diffusers folder)")
    return str(LAB_MODEL_DIR)


def _retry_failed_units(cfg: RunConfig, plan: Plan, todo: list, shard_dir: Path, log: Callable[[str], None]) -> list:
    """The units to score: ``todo`` and, with ``--retry-failed``, the finished units holding rows the model failed
    to score (:func:`audit.unit.failed_rows`), uncommitted first. Without it, a rerun that finds such units says
    so: an out-of-memory or a passing device error is kept only while the user lets it be."""
    pending = {u.index for u in todo}
    failed = {u.index: f for u in plan.units if u.index not in pending and (f := failed_rows(shard_dir, u))}
    if not failed:
        return todo
    by_reason = Counter()
    for f in failed.values():
        by_reason.update(f)
    units, rows = len(failed), sum(by_reason.values())
    what = (f"{units} finished unit{'s' if units > 1 else ''} of {shard_dir.parent} hold{'s' if units == 1 else ''} "
            f"{rows} row{'s' if rows > 1 else ''} the model failed to score "
            f"({', '.join(f'{r} {n}' for r, n in sorted(by_reason.items()))})")
    if not cfg.retry_failed:
        log(f"memaudit: note: {what}; --retry-failed scores {'them' if units > 1 else 'it'} again")
        return todo
    log(f"memaudit: --retry-failed: {what}: scoring {'them' if units > 1 else 'it'} again")
    for u in plan.units:
        if u.index in failed:
            forget_unit(shard_dir, u)
    return [u for u in plan.units if u.index in pending or u.index in failed]


def missing_column_note(plan: Plan, prompt_column: str | tuple[str, ...]) -> str | None:
    """A warning naming the input files whose schema lacks the prompt column while others have it (a run over
    prompt logs whose writer renamed the column): their rows are all rejected as ``missing_prompt_column``, which
    the run's summary line alone would leave easy to miss. A JSON-lines file counts when none of its lines has the
    key (its columns are the keys found in any line; one with no JSON object at all, whose lines are invalid_json,
    shows none and is left out). None when every file has the column (one of the names, given several).
    """
    return _lacking_column_note(plan, rows_lacking_prompt_column(plan, prompt_column), prompt_column,
                                "missing_prompt_column")


def rows_lacking_prompt_column(plan: Plan, prompt_column: str | tuple[str, ...]) -> dict[str, int]:
    """File -> rows the run reads from it, for the files lacking every prompt name: a Parquet or CSV file whose
    schema has none, a JSON-lines file none of whose lines has any as a key (its columns are the keys found in
    any line; one with no JSON object at all shows none and is left out). What the run's warning
    (:func:`missing_column_note`) and ``--dry-run``'s summary count as rows to be rejected for want of the column."""
    from audit.sources import first_present, prompt_names

    names = prompt_names(prompt_column)
    fmts = {f.url: f.fmt for f in plan.files}
    rows: dict[str, int] = {}
    for u in plan.units:
        columns = plan.columns.get(u.url) or []
        if u.missing_column or (fmts.get(u.url) == "jsonl" and columns and first_present(names, columns) is None):
            rows[u.url] = rows.get(u.url, 0) + u.rows
    return rows


def missing_id_column_note(plan: Plan, id_column: str | None,
                           prompt_column: str | tuple[str, ...] = "prompt") -> str | None:
    """The same warning as :func:`missing_column_note` for ``--id-column``: the files with rows whose columns lack
    it (a .txt file has none; a JSON-lines file none of whose lines has the key) while others have it (no input
    with it is refused before scoring); their rows are all rejected as ``missing_id_column`` and count toward
    :func:`coverage_gate`. A file that lacks the prompt column too is left out: its rows are rejected as
    ``missing_prompt_column`` (:func:`missing_column_note` names them), and counting them here as well told of
    twice the rows rejected. None without ``--id-column``."""
    if not id_column:
        return None
    return _lacking_column_note(plan, rows_lacking_id_column(plan, id_column, prompt_column), id_column,
                                "missing_id_column")


def rows_lacking_id_column(plan: Plan, id_column: str | None,
                           prompt_column: str | tuple[str, ...] = "prompt") -> dict[str, int]:
    """File -> rows the run reads from it, for the files that have a prompt column but not ``id_column`` (what
    :func:`missing_id_column_note` and ``--dry-run``'s summary count as rows to be rejected as
    ``missing_id_column``); ``{}`` without ``--id-column``."""
    if not id_column:
        return {}
    from audit.sources import first_present, prompt_names

    names = prompt_names(prompt_column)
    fmts = {f.url: f.fmt for f in plan.files}
    rows: dict[str, int] = {}
    for u in plan.units:
        # (a JSON-lines file's columns are the keys found in any of its lines: without the key, no line has it)
        columns = plan.columns.get(u.url) or []
        if fmts.get(u.url) in ("parquet", "csv", "txt", "jsonl") and id_column not in columns \
                and (fmts.get(u.url) == "txt" or first_present(names, columns) is not None):
            rows[u.url] = rows.get(u.url, 0) + u.rows
    return rows


def _lacking_column_note(plan: Plan, rows: dict[str, int], column: str | tuple[str, ...],
                         reason: str) -> str | None:
    """The warning line for ``rows`` (file -> rows) of files without ``column`` (or any of several names), rejected
    as ``reason``."""
    rows = {url: n for url, n in rows.items() if n}
    if not rows:
        return None
    first = next(iter(rows))
    cols = plan.columns.get(first) or []
    shown = ", ".join(cols[:8]) + (f", ... ({len(cols)} in all)" if len(cols) > 8 else "")
    n, total = len(rows), sum(rows.values())
    from audit.sources import near_name_note, prompt_column_text, prompt_names

    near = near_name_note(list(prompt_names(column)), sorted({c for url in rows for c in plan.columns.get(url) or []}))
    # a JSON-lines file's rows are its lines, and a line that is no JSON object, or whose prompt is no text, keeps
    # that reason: 11 rows "rejected as missing_id_column" were 7 in the run's counts beside it
    fmts = {f.url: f.fmt for f in plan.files}
    others = (" (or as invalid_json, invalid_utf8 or prompt_not_string, a JSON line that is that first)"
              if any(fmts.get(url) == "jsonl" for url in rows) else "")
    return (f"{n} of {len(plan.files)} input file{'' if len(plan.files) == 1 else 's'} {'has' if n == 1 else 'have'} "
            f"no column {prompt_column_text(column)}, so {'its' if n == 1 else 'their'} {total:,} "
            f"{'row is' if total == 1 else 'rows are'} rejected as {reason}{others}; "
            f"the first: {first} (columns: {shown or '(none)'}){'.' + near if near else ''}")


BLANK_REASONS = ("null_prompt", "empty_prompt")  # a row whose prompt cell holds no text
# rows a file holds at least for the blank-file warning to name it: a one-row file whose prompt is blank is one
# empty prompt (a request log of one file a request), not a writer that stopped filling the column
BLANK_FILE_MIN_ROWS = 2


def blank_file_note(plan: Plan, shard_dir: Path, prompt_column: str | tuple[str, ...]) -> str | None:
    """A warning naming the input files whose every row was rejected as :data:`BLANK_REASONS` (the prompt column
    there but null or empty throughout: a writer that renamed or stopped filling it), when other files had
    prompts; their rows are counted among the run's rejects, where one file's silence was easy to miss. Read from
    the units' commit markers. None when no such file, or when no file had a prompt (the run's own failure says
    that). A file of one row is not named (:data:`BLANK_FILE_MIN_ROWS`): a service that logs each request to a file
    of its own writes an empty prompt a user sent as such a file, and one blank prompt says nothing of the column."""
    per_file: dict[str, list[int]] = {}  # url -> [rows read, blank rows]
    for u in plan.units:
        try:
            stats = committed_stats(shard_dir, u)
        except (OSError, ValueError, KeyError):
            return None  # a marker unreadable now: the run's own checks speak for it
        seen = per_file.setdefault(u.url, [0, 0])
        seen[0] += int(stats.get("rows_read", 0))
        seen[1] += sum(int(stats.get("rejected_by_reason", {}).get(r, 0)) for r in BLANK_REASONS)
    blank = {url: rows for url, (rows, b) in per_file.items() if rows and b == rows}
    if not blank or len(blank) == sum(1 for rows, _ in per_file.values() if rows):
        return None
    blank = {url: rows for url, rows in blank.items() if rows >= BLANK_FILE_MIN_ROWS}
    if not blank:
        return None
    from audit.sources import prompt_column_text

    first, n, total = next(iter(blank)), len(blank), sum(blank.values())
    return (f"{n} of {len(plan.files)} input files {'has' if n == 1 else 'have'} no text in column "
            f"{prompt_column_text(prompt_column)} on any row ({total:,} {'row' if total == 1 else 'rows'} rejected as "
            f"null_prompt or empty_prompt), where the other files have prompts: a renamed or emptied column? the first: {first}")


def empty_parquet_note(plan: Plan) -> str | None:
    """A warning naming the zero-byte .parquet inputs, which are read as holding no rows (a writer's placeholder)
    but are not Parquet at all: a failed or cut upload that looks like a day without logs. None when there are
    none."""
    from audit.sources import _is_empty

    empty = [f.url for f in plan.files if f.fmt == "parquet" and not plan.file_rows.get(f.url) and _is_empty(f.url)]
    if not empty:
        return None
    return (f"{len(empty)} input .parquet file{'s are' if len(empty) > 1 else ' is'} zero bytes, read as holding no "
            f"rows (a writer's placeholder, or a failed upload?): {empty[0]}{' ...' if len(empty) > 1 else ''}")


def txt_column_note(plan: Plan, prompt_column: str | tuple[str, ...]) -> str | None:
    """A warning when ``--prompt-column`` names a column and some inputs are .txt files, one prompt a line, with no
    columns: their lines are scored as prompts whatever the option says (inputs of .txt files alone are refused
    with --prompt-column, :func:`audit.sources.plan_units`)."""
    txt = [f.url for f in plan.files if f.fmt == "txt" and plan.file_rows.get(f.url)]
    from audit.sources import prompt_column_text, prompt_names

    if prompt_names(prompt_column) == ("prompt",) or not txt:
        return None
    return (f"{len(txt)} input file{'s are' if len(txt) > 1 else ' is'} .txt, one prompt a line with no columns: "
            f"{'their' if len(txt) > 1 else 'its'} lines are scored as prompts, whatever --prompt-column "
            f"{prompt_column_text(prompt_column)} says (the first: {txt[0]})")


def _lab_figure(path: str) -> str:
    """``" (attention_entropy test AUROC 0.48 on its own lab, `memaudit docs lab`)"``, from the lab model's
    ``memaudit.json`` (``evaluation.test.scorers.attention_entropy.auroc``), or ``""`` where it has none."""
    from audit.models import read_extra

    try:
        auroc = read_extra(Path(path))["evaluation"]["test"]["scorers"]["attention_entropy"]["auroc"]
        return f" (attention_entropy test AUROC {float(auroc):.2f} on its own lab, `memaudit docs lab`)"
    except (ModelError, KeyError, TypeError, ValueError):
        return ""


LAB_MODEL_NAME = "lab"  # --model lab: the bundled lab model (a folder named "lab" in the working directory wins)


def model_argument(model: str | None, log: Callable[[str], None] | None = None) -> str:
    """The model to load for ``--model`` (None or ``lab``: the bundled lab model, said in one line).

    Raises:
        audit.errors.ModelError: ``model`` is None or ``lab`` and this install has no bundled lab model.
    """
    if model is None:
        path = default_model()
        if log:
            log(f"memaudit: no --model given: using the bundled lab model ({path}), a demonstration model trained "
                f"on synthetic scenes{_lab_figure(path)}: its ranking shows the pipeline, not a real model's "
                "memorization; pass --model for yours")
        return path
    if model == LAB_MODEL_NAME and not Path(model).exists():
        return default_model()
    return model


LOG_PROGRESS_EVERY_S = 60.0  # a plain progress line this often when stderr is not a terminal (cron, CI logs)


def live_terminal(console) -> bool:
    """Whether a live progress bar may be drawn on ``console``: only when its file is a terminal. rich takes
    ``FORCE_COLOR`` (which CI systems and container images set to colour their logs) and ``TTY_COMPATIBLE`` as
    saying that a file is a terminal, so under them a run whose stderr went to a log file wrote the bar there,
    escape codes and carriage returns, instead of the plain line a minute; colour may be forced, a live display
    is not. ``TTY_INTERACTIVE=1`` (rich's own switch for live displays) still asks for the bar."""
    import os

    if os.environ.get("TTY_INTERACTIVE", "") == "1":
        return bool(console.is_terminal)
    try:
        return bool(console.is_terminal and console.file.isatty())
    except (AttributeError, ValueError, OSError):  # a closed or replaced stream
        return False


class _Progress:
    """A rich progress bar (rows, prompts/s, ETA) on a terminal, as much of it as fits the terminal's width: without
    the bar and the elapsed time, then without the rate, down to the rows done, their share and the time left
    (``1234/10000 rows  12% ETA 0:01:00``, 28 to 37 columns). By default (``enabled`` None) when stderr is
    not a terminal (a log file, cron), a plain line through ``log`` every :data:`LOG_PROGRESS_EVERY_S` seconds
    instead; ``enabled`` False (``--no-progress``): silent."""

    def __init__(self, total: int, enabled: bool | None, log: Callable[[str], None] | None = None,
                 every_s: float | None = None):
        from rich.console import Console

        console = Console(stderr=True)
        self.enabled = live_terminal(console) if enabled is None else enabled
        self.lines = log if enabled is None and not self.enabled else None
        self.total, self.done = total, 0
        self.every_s = LOG_PROGRESS_EVERY_S if every_s is None else every_s
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            count = 2 * len(str(total)) + 1  # '1234/10000': rich's MofNCompleteColumn
            rate, elapsed, bar = TextColumn("{task.fields[rate]} prompts/s"), TimeElapsedColumn(), BarColumn()
            # what fits the terminal, the rows done and the time left kept to the last (each column's text plus a
            # space; a rate of up to 99,999 prompts/s; the bar at least 10 cells): at 40 columns the full line kept
            # only 'scoring ━  rows   0% - prompts/s … ETA …', at 60 'scoring      1… rows  12% ... 0:… ETA -:-…'
            if console.width >= count + 66:
                columns = (TextColumn("scoring"), bar, MofNCompleteColumn(), TextColumn("rows"), TaskProgressColumn(),
                           rate, elapsed, TextColumn("ETA"), TimeRemainingColumn())
            elif console.width >= count + 40:
                columns = (MofNCompleteColumn(), TextColumn("rows"), TaskProgressColumn(), rate, TextColumn("ETA"),
                           TimeRemainingColumn())
            else:
                columns = (MofNCompleteColumn(), TextColumn("rows"), TaskProgressColumn(), TextColumn("ETA"),
                           TimeRemainingColumn())
            self.bar = Progress(*columns, console=console)
            self.task = self.bar.add_task("scoring", total=total, rate="-")
            self.t0 = time.perf_counter()
            self.done = 0

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def advance(self, n: int) -> None:
        if self.bar:
            self.done += n
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:,.0f}")
        elif self.lines is not None:
            self.done += n
            now = time.perf_counter()
            if now - self.last >= self.every_s and self.done < self.total:
                self.last = now
                rate = self.done / max(now - self.t0, 1e-9)
                left = (self.total - self.done) / max(rate, 1e-9)
                # (999,600 of 1,000,000 rows is 99.96%, not 100% while rows are left; 3 of 1,000 is 0.3%, not 0%)
                pct = share(self.done, self.total, decimals=0)
                self.lines(f"memaudit: {self.done:,} of {self.total:,} rows ({pct}), "
                           f"{rate:,.0f} rows/s, about {_duration(left)} left")


def _duration(seconds: float) -> str:
    """``seconds`` as ``1h02m``, ``3m05s`` or ``42s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def model_info(name: str, fingerprint: str, path, device, dtype, tokenizer: dict | None = None,
               family: str | None = None) -> dict:
    """Identity of a model for manifests and Parquet metadata (device and dtype as the driver resolved them;
    ``tokenizer``: :func:`tokenizer_identity`; ``family``: the name of the :class:`audit.models.ModelAdapter` that
    ran it, ``sd1``, ``sd2``, ...). Recorded, not compared: the fingerprint identifies the model."""
    info = {"name": name, "fingerprint": fingerprint, "path": str(path), "device": str(device),
            "dtype": str(dtype).replace("torch.", "")}
    if tokenizer is not None:
        info["tokenizer"] = tokenizer
    if family is not None:
        info["family"] = family
    return info


def tokenizer_identity(model_path, tokenizer=None) -> dict:
    """What decides the token ids besides the model's files: the tokenizer class, fast or slow, whether
    ``ftfy`` is installed (CLIP's slow tokenizer cleans text with it when present), and a SHA-256 (16 hex) over
    the files of the model's ``tokenizer*`` folders. ``tokenizer`` is the loaded one; without it (an engine
    whose workers load the model) it is loaded here as they load it (tokenizer files only, no weights)."""
    import hashlib
    import importlib.util

    root = Path(model_path)
    digest = hashlib.sha256()
    for d in sorted(p for p in root.glob("tokenizer*") if p.is_dir()):
        for f in sorted(p for p in d.iterdir() if p.is_file()):
            digest.update(f"{d.name}/{f.name}\0".encode())
            digest.update(f.read_bytes())
    if tokenizer is None:
        try:
            from audit.models.base import load_tokenizer

            tokenizer = load_tokenizer(root, "tokenizer")
        except Exception:  # the identity is a record, not a check: the workers report a real load failure
            tokenizer = None
    ident = {"class": type(tokenizer).__name__ if tokenizer is not None else None,
             "fast": bool(getattr(tokenizer, "is_fast", False)) if tokenizer is not None else None,
             "files_sha256": digest.hexdigest()[:16],
             "ftfy": importlib.util.find_spec("ftfy") is not None}
    from audit.pipeline import package_version

    for pkg in ("transformers", "tokenizers"):
        if (version := package_version(pkg)) is not None:
            ident[pkg] = version
    return ident


def score_config_for(cfg: RunConfig, default_layers, dtype):
    """The :class:`audit.scorers.ScoreConfig` of a run (layers default to the model's default)."""
    from audit.scorers import ScoreConfig

    layers = tuple(cfg.layers) if cfg.layers else tuple(default_layers)
    return ScoreConfig(scorer=cfg.scorer, layers=layers, noise_draws=cfg.noise_draws, seed=cfg.seed,
                       num_inference_steps=cfg.steps,
                       dtype=str(dtype).replace("torch.", ""), noise_generator=cfg.noise_generator)


def _units_for_workers(cfg: RunConfig, plan: Plan, engine, log,
                       previous: dict | None = None) -> tuple[RunConfig, Plan]:
    """With fewer rows than ``--unit-rows`` x workers, smaller units (the rows split evenly), so that every
    worker of an engine with several (ray) gets work; the run records the unit size used.

    ``previous``: the identity of the run already in ``--out``. When it was cut in units of at most
    ``--unit-rows`` rows (split for its workers, or an explicit smaller size), the same units are cut again,
    whatever the worker count or engine now (a cluster that grew, the other engine), so a rerun resumes: a
    unit's rows, not its size, decide its scores."""
    import dataclasses

    recorded = (previous or {}).get("unit_rows")
    if isinstance(recorded, int) and 0 < recorded <= cfg.unit_rows:
        if recorded == cfg.unit_rows:  # the plan already has those units
            return cfg, plan
        log(f"memaudit: going on with the run folder's units of {recorded} rows (cut when the run started; "
            f"--unit-rows {cfg.unit_rows} applies to new run folders)")
        cfg = dataclasses.replace(cfg, unit_rows=recorded)
        return cfg, build_plan(cfg)
    count = getattr(engine, "worker_count", None)
    rows = plan.total_rows
    if count is None or rows < 2:
        return cfg, plan
    workers = count(cfg)
    if workers < 2 or rows >= cfg.unit_rows * workers or len(plan.units) >= workers:
        return cfg, plan
    unit_rows = -(-rows // workers)
    if unit_rows >= cfg.unit_rows:
        return cfg, plan
    log(f"memaudit: {rows} rows for {workers} workers: units of {unit_rows} rows (--unit-rows {cfg.unit_rows}), "
        "so that every worker gets work")
    cfg = dataclasses.replace(cfg, unit_rows=unit_rows)
    return cfg, build_plan(cfg)


def group_rows(cfg: RunConfig, plan: Plan, engine) -> int:
    """The most planned rows of units scored together (:func:`audit.unit.group_units`): ``--unit-rows``, and for
    an engine with several workers (ray) at most the rows divided evenly among them, so that a folder of many small
    files still gives every worker a group. A new run folder records it in run.json (``group_rows``), and a rerun
    keeps the recorded value whatever its engine or worker count, so a resumed group is scored at the batch shape
    the first invocation planned.

    Raises:
        audit.errors.RunError: as the engine's ``worker_count`` (the Ray cluster cannot be joined).
    """
    count = getattr(engine, "worker_count", None)
    if count is None or plan.total_rows < 2:
        return cfg.unit_rows
    workers = count(cfg)
    return min(cfg.unit_rows, -(-plan.total_rows // workers)) if workers >= 2 else cfg.unit_rows


def recorded_group_rows(identity: dict | None) -> int | None:
    """The ``group_rows`` a run folder's first invocation recorded in run.json (:func:`group_rows`), which every
    rerun groups its units by; None where there is none (a new folder, or one from before groups)."""
    bound = (identity or {}).get("group_rows")
    return bound if isinstance(bound, int) and not isinstance(bound, bool) and bound >= 1 else None


def work_split(cfg: RunConfig, plan: Plan, engine, previous: dict | None) -> dict:
    """How a run of ``cfg`` (its units already cut for the engine's workers by :func:`_units_for_workers`) splits
    ``plan`` into the groups of units that its workers score: ``{"engine", "workers", "workers_asked", "unit_rows",
    "units", "group_rows", "groups"}`` (``workers_asked``: ``--workers``, None for the default; more than ``workers``
    where Ray cut CPU actors to the cluster's CPUs), by the functions the run uses (the engine's ``worker_count``, which for Ray joins the
    cluster or starts a local Ray; :func:`group_rows`, or the ``group_rows`` a run folder recorded,
    :func:`recorded_group_rows`; :func:`audit.unit.group_units`). ``groups`` counts the whole plan's groups (a
    resumed run scores those holding units still to do). A run folder that recorded its ``group_rows`` keeps its
    units and groups whatever the workers now, so they are not counted (``workers`` None: no Ray started for a
    resumed folder's dry run). ``memaudit run --dry-run`` prints it.

    Raises:
        audit.errors.RunError: as the engine's ``worker_count`` (the Ray cluster cannot be joined).
    """
    count = getattr(engine, "worker_count", None)
    if recorded := recorded_group_rows(previous):
        bound, workers = recorded, None
    else:
        bound, workers = group_rows(cfg, plan, engine), count(cfg) if count is not None else 1
    return {"engine": cfg.engine, "workers": workers, "workers_asked": cfg.workers, "unit_rows": cfg.unit_rows,
            "units": len(plan.units), "group_rows": bound,
            "groups": len(group_units(plan.units, bound)) if plan.units else 0}


def _load_scorer(cfg: RunConfig, model_arg: str, score_config, log):
    """Load the model in this process and build its scorer (and the confirming scorer of ``--confirm``);
    ``score_config`` None derives it from the loaded model. Returns ``(scorer, confirmer or None)``."""
    from audit.models import adapter_of, load_model
    from audit.scorers import Scorer

    model = load_model(model_arg, cfg.device, cfg.dtype)
    score_config = score_config or score_config_for(cfg, model.default_layers, model.dtype)
    try:
        scorer = Scorer(model, score_config, compile=cfg.compile)
    except KeyError as exc:  # a layer the model lacks: the line named no option ("not a cross-attention layer ...")
        if not cfg.layers and not model.extra.get("default_layers"):
            raise
        raise KeyError(layers_refusal(cfg, model.path, list(score_config.layers), exc.args[0])) from None
    from audit.scorers.base import prediction_type_note

    if note := prediction_type_note(scorer.prediction_type, scorer.spec.name):
        log(f"memaudit: warning: {note}")
    from audit.models.base import model_notes

    for note in model_notes(model.name, model.path, adapter_of(model).components):
        log(f"memaudit: warning: {note}")
    if cfg.compile and model.device.type == "cpu":
        log("memaudit: --compile on CPU was measured slower than eager (0.6-0.8x, `memaudit docs gpu`); it pays, if "
            "at all, on GPUs")
    confirmer = None
    if cfg.confirm:  # refused here, before scoring, when the model cannot run the confirming scorer
        from audit.cascade import prepare_confirm

        confirmer = prepare_confirm(cfg, model, score_config)
    return scorer, confirmer


def _identity_info(cfg: RunConfig, model_arg: str, engine, log=None) -> tuple[dict, object, int]:
    """The model's identity for the manifest, the score configuration and t0, from its config files and file
    hashes without loading any weights (:func:`audit.models.read_identity`): what an engine whose workers load
    the model (ray) records, and what a local rerun checks before it loads the model. Equal to what a loaded
    model gives (tested for every family). Returns ``(info, score_config, first_timestep)``; ``log`` gets the
    warning of :func:`audit.scorers.base.prediction_type_note`."""
    from audit.models import read_identity, resolve_device, resolve_dtype
    from audit.scorers import get_scorer
    from audit.scorers.base import check_noise_prediction, prediction_type_note, scorer_scheduler

    ident = read_identity(model_arg)
    device = resolve_device(cfg.device)
    # --dtype auto as the engine's workers resolve it on their own devices (a CPU head may drive GPUs)
    probe = getattr(engine, "probe_dtype", None)
    dtype = (probe(cfg) if probe else None) or resolve_dtype(cfg.dtype, device)
    adapter, spec = ident.adapter, get_scorer(cfg.scorer)
    adapter.check_scorer(spec.forward)  # refused before any worker starts
    check_layers_from_config(cfg, adapter, ident.path, model_arg, ident.extra)  # as well
    score_config = score_config_for(cfg, adapter.default_layers_from_config(ident.path, ident.extra), dtype)
    info = model_info(ident.name, ident.fingerprint, ident.path, device, dtype, tokenizer_identity(ident.path),
                      adapter.name)
    scheduler = scorer_scheduler(adapter, spec, ident.scheduler_config, score_config.num_inference_steps)
    first_timestep = int(scheduler.timesteps[0])
    check_noise_prediction(spec, adapter.prediction_type(ident), scheduler)  # as the workers' Scorer, before they start
    if log is not None and (note := prediction_type_note(adapter.prediction_type(ident), spec.name)):
        log(f"memaudit: warning: {note}")
    from audit.models.base import model_notes

    for note in model_notes(ident.name, ident.path, adapter.components) if log is not None else ():
        log(f"memaudit: warning: {note}")
    return info, score_config, first_timestep


def check_inputs_unchanged(versions: dict[str, str]) -> None:
    """Refuse to finish a run whose inputs changed while it scored them (a log rotated or rewritten in place):
    its units would hold rows of two versions of a file, or miss rows. ``versions``: url -> the
    :func:`audit.sources.file_version` recorded when the run started.

    Raises:
        RunError: naming the first changed (or vanished) files, before any output table is written.
    """
    from audit.sources import file_versions

    changed = []
    for (url, version), now in zip(versions.items(), file_versions(list(versions))):
        if isinstance(now, OSError):
            now = "gone"
        if now != version:
            changed.append(f"{url} ({version} -> {now})")
    if changed:
        raise RunError(f"{len(changed)} input file(s) changed while the run read them: {'; '.join(changed[:3])}"
                       f"{' ...' if len(changed) > 3 else ''}; their rows may mix two versions or be missing, so no "
                       "table was written: score them again into a new --out")


def _run_folder(cfg: RunConfig) -> tuple[Path, dict | None, list[str]]:
    """``--out`` as a run and ``--dry-run`` take it: the folder (a dated default without ``--out``, checked apart
    from ``--cache``), and what :func:`audit.pipeline.check_out_dir` finds there, ``(out, previous identity or None,
    other entries)``.

    Raises:
        audit.errors.RunError: as :func:`audit.pipeline.check_out_dir`, or a default folder inside or around the
            cache, or one that cannot be made in the working folder (:func:`audit.config.check_folder_creatable`).
    """
    out = Path(expand_out(cfg.out)) if cfg.out else default_out_dir()
    if not cfg.out:  # an explicit --out was checked with the other options (audit.config.validate_config)
        from audit.config import check_folder_creatable

        # a job started in a read-only working folder (a container's /app, cron's /) without --out loaded the model,
        # then failed to make memaudit-runs/, and its dry run said "a new run folder"
        try:
            check_folder_creatable(out, f"the default run folder {out} (no --out given)")
        except RunError as exc:
            raise RunError(f"{exc}; give --out a folder this job can write") from None
    if cfg.cache and not cfg.out:  # an explicit --out was checked with the other options
        from audit.config import check_cache_apart

        check_cache_apart(cfg.cache, out, f"the default run folder {out}")
    previous, others = check_out_dir(out)  # the identity of a run already in --out, or what else is there
    return out, previous, others


def dropped_calibration_note(out: Path) -> str | None:
    """When the finished run in ``out`` was flagged with a calibration (its manifest's ``calibration`` section), what
    a rerun without ``--calibration`` does to it: its flags are dropped (``flagged`` null) and its
    ``--fail-on-flagged`` gate with them. A scheduler's retry that left the option out un-flagged a release gate's
    run without a word. None for a folder without a readable manifest or one never calibrated."""
    import json

    try:
        had = json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("calibration")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(had, dict) or not isinstance(had.get("threshold"), (int, float)):
        return None
    path = f" {had['path']}" if isinstance(had.get("path"), str) else ""
    return (f"{out} was flagged with --calibration{path} (risk > {threshold_text(had['threshold'])}); this rerun "
            f"gives none, so "
            "its flags are dropped (flagged null, and no --fail-on-flagged gate): rerun with the same --calibration "
            "to keep them")


def read_only_rerun_needs(cfg: RunConfig, plan: Plan, out: Path, previous: dict, identity: dict,
                          calibration) -> list[str]:
    """Why a rerun of the run folder ``out`` (holding ``previous``, the same run as ``identity``, the rerun's) must
    write in it, one reason
    each; empty when its run is complete and this invocation would leave everything as it is, so a folder that
    cannot be written (a finished run on a read-only mount) needs no write: units left to score (or, with
    ``--retry-failed``, to score again), outputs not all written or from an older memaudit (their manifest does
    not pass :func:`audit.tables.check_manifest`), another calibration than its flags were set by, or
    ``--confirm`` (its stage is checked and written)."""
    import json

    from audit.tables import check_manifest

    plan = respelled(plan, previous, identity)  # a rerun naming the files through a link: the folder's names
    shard_dir = out / "shards"
    needs = []
    todo = [u for u in plan.units if not unit_done(shard_dir, u)]
    if cfg.retry_failed:
        todo += [u for u in plan.units if u not in todo and failed_rows(shard_dir, u)]
    if todo:
        needs.append(f"{len(todo)} of {counted(len(plan.units), 'unit')} to score")
    try:
        manifest = json.loads((out / "manifest.json").read_bytes())
        check_manifest(manifest)
        complete = (all((out / f).is_file() for f in ("risk.parquet", "rejects.parquet"))
                    and manifest.get("units", {}).get("total") == len(plan.units))
    except Exception:  # noqa: BLE001 - missing, not JSON, or not this memaudit's manifest
        manifest, complete = {}, False
    if not todo and not complete:
        needs.append("its outputs to write (manifest.json, risk.parquet, rejects.parquet are not all there, or are "
                     "an older memaudit's)")
    had = (manifest.get("calibration") or {}).get("threshold")
    if complete and had != (None if calibration is None else calibration["threshold"]):
        needs.append("its flags to set with " + ("this --calibration" if calibration is not None else
                                                 "no --calibration (it was flagged with one)"))
    if cfg.confirm:
        needs.append(f"its --confirm {cfg.confirm} stage to check and write")
    return needs


def _read_only_rerun(cfg: RunConfig, plan: Plan, out: Path, previous: dict, identity: dict, why: str, calibration,
                     started: float, model_path, log: Callable[[str], None]) -> dict:
    """A rerun of the run folder ``out`` that cannot be written (``why``): the folder's manifest, unchanged on
    disk, when its run is complete and nothing is to be written (:func:`read_only_rerun_needs`), with this
    invocation's figures (nothing read, its wall time), so that the CLI says its summary and exits with its
    verdict.

    Raises:
        RunError: the folder holds another run (as a writable one is refused), or the rerun must write, saying why.
    """
    import json

    from audit.pipeline import refusal, same_run

    if not same_run(previous, identity):
        raise RunError(refusal(out, previous, identity, model_path))
    if needs := read_only_rerun_needs(cfg, plan, out, previous, identity, calibration):
        raise RunError(f"--out {cfg.out or out}: cannot write in {out} ({why}), and this rerun must write there: "
                       f"{'; '.join(needs)}; make it writable, or copy the folder to a writable place and give "
                       "that as --out (the copy resumes)")
    manifest = json.loads((out / "manifest.json").read_bytes())
    log(f"memaudit: {out} cannot be written ({why}); its run is complete (every unit committed, outputs written): "
        "nothing to do, nothing written; its figures and verdict follow")
    for note in settings_warnings(manifest):  # as a writable rerun of the finished folder prints them (and its report)
        log(f"memaudit: warning: {note}")
    wall = time.perf_counter() - started
    return manifest | {"rows_this_run": 0, "wall_time_s": round(wall, 3), "throughput_rows_per_s": 0.0}


@contextlib.contextmanager
def _locked_run_folder(cfg: RunConfig, out: Path, log: Callable[[str], None]):
    """Hold :func:`audit.pipeline.out_lock` on ``out`` and yield the folder. Without ``--out``, a dated default
    folder that another run took since this one named it (two runs started in the same second both pick
    ``<time>``; the folder is made only here, after the model loads) is neither a refusal nor a folder to resume:
    whether the other run holds its lock still or has written its run there already, the next free name of that
    second (``<time>-2``, ...) is taken, as the README says.

    Raises:
        audit.errors.RunFolderBusyError: a folder given with ``--out`` that another run holds.
    """
    from audit.errors import RunFolderBusyError
    from audit.faults import RUN_FOLDER

    stamp = out.name
    with contextlib.ExitStack() as stack:
        while True:
            try:
                with contextlib.ExitStack() as attempt:
                    attempt.enter_context(out_lock(out, log=log))
                    if cfg.out or not (out / "run.json").exists():  # a default folder is new to this run
                        stack.enter_context(attempt.pop_all())  # keep the lock
                        break
            except RunFolderBusyError:
                if cfg.out:
                    raise
            out = default_out_dir(stamp)  # skips the folder the other run took
            RUN_FOLDER["path"] = str(out)
        yield out


def check_not_busy(out: Path) -> None:
    """Refuse a run folder another memaudit process writes now (its lock held), before any model is read; the lock
    is only tried (:func:`audit.tables.being_written`), and taken where the folder is written (:func:`out_lock`).

    Raises:
        audit.errors.RunFolderBusyError: the folder is busy (the CLI exits 75).
    """
    from audit.tables import being_written

    if out.is_dir() and being_written(out):
        from audit.errors import RunFolderBusyError
        from audit.pipeline import busy_message

        raise RunFolderBusyError(busy_message(out))


def _checked_plan(cfg: RunConfig, log: Callable[[str], None]) -> Plan:
    """The options checked (:func:`audit.config.validate_config`) and the inputs planned (:func:`build_plan`), with
    the plan's warnings through ``log``: the first steps of a run and of ``--dry-run`` alike.

    Raises:
        audit.errors.RunError, audit.errors.SourceError: a bad option, or inputs the plan refuses.
    """
    validate_config(cfg)
    if cfg.engine == "local":  # said by --dry-run too (the same warnings as the run)
        ignored = [flag for flag, value in (("--workers", cfg.workers), ("--address", cfg.address)) if value]
        if ignored:
            verb = "applies" if len(ignored) == 1 else "apply"
            log(f"memaudit: {' and '.join(ignored)} {verb} to --engine ray only; ignored with --engine local")
    plan = build_plan(cfg)
    for note in (missing_column_note(plan, cfg.prompt_column),
                 missing_id_column_note(plan, cfg.id_column, cfg.prompt_column),
                 txt_column_note(plan, cfg.prompt_column), empty_parquet_note(plan)):
        if note:
            log(f"memaudit: warning: {note}")
    return plan


def layers_refusal(cfg: RunConfig, root: Path, layers: list[str], problem: str) -> str:
    """The line refusing the scored ``layers`` (:func:`audit.scorers.base.layers_problem`'s ``problem``), naming
    where they came from: ``--layers``, or the model folder ``root``'s ``memaudit.json`` (its ``default_layers``,
    which said only "not a cross-attention layer of this UNet: nope", so that the user looked for a --layers they
    had not given), with what to do."""
    if cfg.layers:
        return f"--layers {','.join(cfg.layers)}: {problem}"
    from audit.models.base import MEMAUDIT_FILE

    return (f"{Path(root) / MEMAUDIT_FILE}: default_layers {','.join(layers)}: {problem} (fix or remove default_layers "
            f"in {MEMAUDIT_FILE}, or give --layers)")


def check_layers_from_config(cfg: RunConfig, adapter, root: Path, model_arg: str, extra: dict | None = None) -> None:
    """Refuse ``--layers`` naming a layer that the denoiser of the model folder ``root``, built from its config on
    the meta device (:meth:`audit.models.base.ModelAdapter.layers_from_config`, no weights), does not have, with the
    line a local run says once its model has loaded (:func:`_load_scorer`): for ``--dry-run`` (which passed
    ``--layers nope``, exit 0), and for an engine whose workers load the model (ray: each worker's scorer refused the
    layer once the cluster had started, the actors' tracebacks on the terminal and the line cut). Without
    ``--layers``, the ``default_layers`` of ``extra`` (the folder's ``memaudit.json``) when given (the run's
    identity check, :func:`_identity_info`, which imports diffusers anyway); nothing otherwise.

    Raises:
        KeyError: a layer the denoiser lacks (:func:`audit.scorers.base.layers_problem`, naming the option or the
            memaudit.json file: :func:`layers_refusal`).
        audit.errors.ModelError: a config diffusers cannot build (as the run's loading says it).
    """
    layers = list(cfg.layers or (extra or {}).get("default_layers") or [])
    if not layers:
        return
    from audit.models.base import cannot_load
    from audit.scorers.base import layers_problem

    try:
        known = adapter.layers_from_config(root)
    except Exception as exc:  # a config diffusers cannot build ("Nope2D does not exist"): as the run says it
        raise cannot_load(model_arg, root, exc) from exc
    if problem := layers_problem(layers, known):
        raise KeyError(layers_refusal(cfg, root, layers, problem))


def check_default_layers(cfg: RunConfig, adapter, root: Path, model_arg: str) -> None:
    """``--dry-run`` without ``--layers``: refuse the folder's ``memaudit.json`` ``default_layers`` as the run
    refuses them, with the run's line (:func:`check_layers_from_config`: a module the denoiser lacks, or one that is
    no cross-attention layer of it, such as an ``attn1``, which the dry run passed with exit 0 and the run refused
    with exit 2). Names that are all among the cross-attention layers its safetensors headers show
    (:meth:`audit.models.base.ModelAdapter.layers_from_weights`: no torch, diffusers or weights) are accepted from
    them alone; any other (or headers that cannot be read) is judged on the denoiser built from its config, as the
    run judges it, which imports torch and diffusers (on the bundled lab model, 2 shared cores: a dry run took 0.6 s
    of CPU without it and 6.4 s with it), a cost paid only where the names are not plainly the model's
    cross-attention layers, mostly by the refusal itself.

    Raises:
        KeyError: a name that is not a cross-attention layer of the denoiser (the run's line naming memaudit.json,
            the names and the layers: :func:`layers_refusal`).
        audit.errors.ModelError: ``default_layers`` not a list of names, or a config diffusers cannot build (as the
            run's loading says it).
    """
    from audit.models.base import read_extra

    layers = read_extra(root).get("default_layers") or []
    if not layers:
        return
    known = adapter.layers_from_weights(root)
    if known is not None and all(name in known for name in layers):
        return
    check_layers_from_config(cfg, adapter, root, model_arg, {"default_layers": layers})


def _dry_run_model(model: str | None, cfg: RunConfig | None = None) -> dict:
    """The model as ``--dry-run`` checks it without reading weights: a local folder (the bundled lab model with no
    ``--model``) is found and its family detected from its ``model_index.json`` (:func:`audit.models.detect_family`:
    a missing folder or an unsupported pipeline is refused here, as the run refuses it); a hub id is not fetched.
    With ``cfg``, ``--steps`` is checked against the folder's scheduler configuration
    (:func:`audit.models.base.check_steps_trained`), so that more steps than the scheduler's training timesteps is
    refused here as the run refuses it (the dry run passed ``--steps 5000``, exit 0, and the run then exited 2);
    and ``--layers`` against the cross-attention layers of the denoiser built from its config on the meta device
    (:meth:`audit.models.base.ModelAdapter.layers_from_config`: the dry run passed ``--layers nope``, exit 0, which
    the run refuses once the model has loaded); without ``--layers``, the default layers the folder's
    ``memaudit.json`` names, with the run's line (:func:`check_default_layers`). Returns
    ``{"model", "family"}`` (and ``"notes"``: the run's warnings of weights not loaded and of model_index.json's
    classes, :func:`audit.models.base.unloaded_weights_note`, :func:`audit.models.base.index_class_note`, which
    :func:`dry_run` says) or ``{"model", "hub_id": True}``
    (with ``--layers``, ``"layers_unchecked": True``: they are checked when the run starts).

    Raises:
        audit.errors.ModelError: as the run's model loading for a local folder, and its scheduler check.
        KeyError: ``--layers`` or ``memaudit.json``'s default layers name a layer that is no cross-attention layer
            of the folder's denoiser (the run's message, listing them).
    """
    from audit.models import detect_family, resolve_model_dir
    from audit.models.base import names_hub_id, read_json

    arg = model_argument(model)
    if names_hub_id(arg):
        return {"model": arg, "hub_id": True} | ({"layers_unchecked": True} if cfg is not None and cfg.layers else {})
    name, root = resolve_model_dir(arg)  # a local path: no hub request
    adapter, _ = detect_family(root, arg)
    from audit.models.base import check_weight_files, model_notes

    check_weight_files(arg, root, adapter.components)  # headers only: weight files the run would refuse
    notes = model_notes(arg, root, adapter.components, config_keys=False)  # (no diffusers import)
    if cfg is not None:
        from audit.models.base import check_steps_trained

        check_steps_trained(read_json(root / "scheduler" / "scheduler_config.json", missing={}), cfg.steps)
        check_layers_from_config(cfg, adapter, root, arg)  # as the run's Scorer refuses them
        if not cfg.layers:
            check_default_layers(cfg, adapter, root, arg)  # memaudit.json's, as the run checks them
    return ({"model": "lab (bundled)" if model is None or arg != model else name, "family": adapter.name}
            | ({"notes": notes} if notes else {}))


def dry_run(cfg: RunConfig, log: Callable[[str], None] | None = None) -> dict:
    """What ``memaudit run`` would do with ``cfg``, without loading a model, scoring or writing anything
    (``memaudit run --dry-run``): the options checked and the inputs planned as a run checks and plans them (the
    same refusals, the same warnings through ``log``), then a summary. For a scheduler's first night, or a new log
    folder: which files are read, how many rows and units, which prompt column(s) each file has, which rows will be
    rejected for want of it, and whether ``--out`` is new, a run the same command resumes, or a run it would
    refuse. The model is not read: its identity and score configuration are compared when the run starts.

    Returns a JSON-ready dict: ``files``, ``formats`` (format -> files), ``rows``, ``units``, ``prompt_column``
    (a list of ``{"columns": [...], "files": n}``: the Parquet and CSV files having those of the names, in their
    order; several are read row by row, the first holding a value, :func:`audit.sources.first_filled`; ``[]``:
    files with rows and none of them, and JSON-lines files none of whose lines has one, whose rows are rejected as
    ``missing_prompt_column``: :func:`rows_lacking_prompt_column`, as the run's warning counts them),
    ``rows_without_prompt_column``, ``jsonl_files`` (the other JSON-lines files, judged line by line),
    ``txt_files`` (.txt files with rows: each line a prompt, whatever ``--prompt-column`` says),
    ``files_beyond_limit`` (files with rows that ``--limit`` stops before: not read, in no other count but
    ``files``), ``id_column`` (with ``--id-column``: ``{"name", "files_without", "rows_without"}``, the files
    read that have a prompt column but not the id, whose rows are rejected as ``missing_id_column``),
    ``skipped_files``, ``exit_4`` (``{"rows", "of", "max_error_fraction"}`` when the rows to be rejected for want
    of the prompt or id column are more than ``--max-error-fraction`` of the rows: the run will exit 4 after
    writing its outputs, :func:`coverage_gate`; ``{"unreadable_files"}`` when every file with rows is skipped as
    unreadable, so nothing is read: the run exits 4 too, :func:`nothing_scored`), ``out``, ``out_state``
    (``new``, ``resumes``, ``refused``, ``busy``: another run holds the folder's lock now, ``not_a_run``) with
    ``units_done`` (resumes) or ``refusal`` (refused, busy), ``split`` (:func:`work_split`: the engine's workers,
    the units as cut for them, ``--engine ray`` cutting smaller ones so that each worker gets one, and the groups of
    units scored together: the run's own functions, so ``--engine ray`` joins the cluster, or starts a local Ray
    and stops it, to count the workers), ``model`` (:func:`_dry_run_model`: a local folder found
    and its family detected, a hub id not fetched) and, with ``--calibration``, ``calibration`` (``path``,
    ``threshold``, ``fpr``: the file read and checked as a run reads it; against the model when the run starts);
    with ``--cache``, ``cache`` (``path``, ``folders``: how many folders of scores it holds, one per model and score
    configuration, None for a cache not made yet; ``read_only``, why, for one that cannot be written: lookups only).

    Raises:
        audit.errors.SourceError, audit.errors.RunError: as :func:`execute` before it loads the model.
    """
    from audit.pipeline import refusal, same_run
    from audit.sources import prompt_names

    log = log or (lambda msg: print(visible(msg), file=sys.stderr))
    plan: Plan = _checked_plan(cfg, log)
    from audit.calibrate import calibration_for_run

    # refused as the run refuses them before it reads the model: a --calibration that is missing or not a
    # calibration, --fail-on-flagged without one (whether it fits the model is checked when the run starts)
    calibration = calibration_for_run(cfg)
    out, previous, others = _run_folder(cfg)
    # a folder whose run cut smaller units (split among a Ray run's workers, or an earlier --unit-rows) is planned
    # in those units again, as the rerun plans it: it resumes (planned in --unit-rows units it read as a different
    # run). A new folder is cut for the engine's workers as the run cuts it: --engine ray joins the cluster (or
    # starts a local Ray, shut down below) to count them, by the run's own functions
    from audit.engines import get_engine

    engine = get_engine(cfg.engine)
    try:
        cfg, plan = _units_for_workers(cfg, plan, engine, log, previous)
        split = work_split(cfg, plan, engine, previous)
    finally:
        if release := getattr(engine, "release", None):
            release()
    names = prompt_names(cfg.prompt_column)
    lacking = rows_lacking_prompt_column(plan, cfg.prompt_column)
    reached = {u.url for u in plan.units}
    takes: Counter = Counter()  # the names a schema file has -> files
    jsonl = txt = beyond = 0
    for f in plan.files:
        if plan.file_rows.get(f.url) and f.url not in reached:  # --limit stops before it: not read
            beyond += 1
        elif f.url in lacking:  # a schema without any of the names, or JSON lines none of which has one
            takes[()] += 1
        elif f.fmt in ("parquet", "csv"):
            if have := tuple(c for c in names if c in (plan.columns.get(f.url) or [])):
                takes[have] += 1  # (none of the names and no row, a zero-byte file: nothing read, nothing rejected)
        elif f.fmt == "jsonl":
            jsonl += 1
        elif f.fmt == "txt" and plan.file_rows.get(f.url):
            txt += 1
    missing = sum(lacking.values())
    summary = {
        "files": len(plan.files), "formats": dict(Counter(f.fmt for f in plan.files)), "rows": plan.total_rows,
        "units": len(plan.units), "prompt_column": [{"columns": list(k), "files": n}  # in the files' order, those with none last
                          for k, n in sorted(takes.items(), key=lambda kv: not kv[0])],
        "rows_without_prompt_column": missing, "jsonl_files": jsonl, "txt_files": txt, "files_beyond_limit": beyond,
        "skipped_files": plan.skipped, "out": str(out),
        "split": split,  # workers, units and groups of units as the run cuts them (work_split)
        "model": _dry_run_model(cfg.model, cfg),
    }
    if log is not None:  # the run's warnings about the folder that need no import of diffusers (variants, LoRA files
        # not loaded; model_index.json's classes against the configs): ignored config keys are said by the run only
        for note in summary["model"].get("notes", []):
            log(f"memaudit: warning: {note}")
    if cfg.cache:  # what the run will find there: the scores of earlier runs, one folder per model and configuration
        from audit.cache import cache_dir

        root = cache_dir(cfg.cache)
        try:
            folders = sum(1 for d in root.iterdir() if (d / "key.json").is_file()) if root.is_dir() else None
        except OSError:  # (a folder the run cannot read is refused when it starts, as now)
            folders = None
        summary["cache"] = {"path": str(root), "folders": folders}
        from audit.cache import not_writable

        if read_only := not_writable(root):  # (validate_config refused one it cannot read)
            summary["cache"]["read_only"] = read_only
    if calibration is not None:
        summary["calibration"] = {"path": str(cfg.calibration), "threshold": calibration["threshold"],
                                  "fpr": calibration.get("fpr"), "fail_on_flagged": cfg.fail_on_flagged}
    if cfg.id_column:  # the files read that have a prompt column but not the id: all their rows missing_id_column
        no_id = {url: n for url, n in rows_lacking_id_column(plan, cfg.id_column, cfg.prompt_column).items() if n}
        summary["id_column"] = {"name": cfg.id_column, "files_without": len(no_id), "rows_without": sum(no_id.values())}
    # the rows known now to be rejected for want of a column: more than --max-error-fraction of the rows read makes
    # the run exit 4 after writing its outputs (coverage_gate; JSON lines lacking a key one by one may add more)
    lost = missing + (summary.get("id_column") or {}).get("rows_without", 0)
    if plan.total_rows and over_limit(lost, plan.total_rows, cfg.max_error_fraction):
        summary["exit_4"] = {"rows": lost, "of": plan.total_rows, "max_error_fraction": cfg.max_error_fraction}
    if not plan.total_rows and cfg.fail_on_flagged is not None:  # a gate over no prompts (empty_gate)
        summary["exit_4_no_rows"] = cfg.fail_on_flagged
    # nothing to read because every file with rows was skipped as unreadable (--skip-bad-files): the run writes its
    # empty outputs, then exits 4 (nothing_scored)
    if not plan.total_rows and (unreadable := [s for s in plan.skipped if s.get("unreadable")]):
        summary["exit_4"] = {"unreadable_files": len(unreadable)}
    from audit.errors import RunFolderBusyError

    try:  # a run started now is refused at once, whatever the folder holds
        check_not_busy(out)
    except RunFolderBusyError as exc:
        return summary | {"out_state": "busy", "refusal": str(exc)}
    if previous is None:
        summary["out_state"] = "not_a_run" if others else "new"
        if others:
            summary["out_entries"] = len(others)
        return summary
    # the folder's own model and score configuration stand in for the model's, which is not read here
    identity = run_identity(cfg, plan, {"fingerprint": previous.get("model_fingerprint")},
                            previous.get("score_config"))
    if same_run(previous, identity):
        shard_dir = out / "shards"
        # its units are recorded under the folder's names of the files (a rerun naming them through a link: "0 of 1
        # units committed" of a finished run that the run then resumed whole)
        done = respelled(plan, previous, identity).units
        summary |= {"out_state": "resumes", "units_done": sum(unit_done(shard_dir, u) for u in done)}
        from audit.cache import not_writable

        if why := not_writable(out):  # what the run will do: nothing, or be refused saying why it must write
            summary["out_read_only"] = {"why": why, "needs": read_only_rerun_needs(cfg, plan, out, previous,
                                                                                  identity, calibration)}
    else:
        summary |= {"out_state": "refused", "refusal": refusal(out, previous, identity)}
    return summary


def execute(cfg: RunConfig, progress: bool | None = None, log: Callable[[str], None] | None = None,
            loaded=None) -> tuple[Path, dict]:
    """Run an audit end to end; returns ``(run folder, manifest)``.

    An in-process engine (local) scores with a model loaded here, or with ``loaded``: the ``(scorer, confirmer)``
    that :func:`_load_scorer` built for these options earlier (:class:`audit.api.Auditor` keeps them); an engine
    whose workers load the model (ray) gets only its identity, read here without loading weights
    (:func:`audit.models.read_identity`).

    Raises:
        audit.errors.SourceError, audit.errors.ModelError, audit.errors.RunError: bad inputs, model or run folder.
        KeyError: ``cfg.layers`` names a layer the model does not have (local engine).

    A scorer loaded here is closed when the run ends, however it ends (:meth:`audit.scorers.Scorer.close`): a
    compiled one (``cfg.compile``) keeps its capture processors installed on its UNet, a reference cycle that held
    the whole model (on a GPU, its memory) after ``audit.score(..., compile=True)`` returned, until Python's
    cyclic garbage collector happened to run. ``loaded`` scorers are the caller's to close.
    """
    owned: list = []  # the scorers _execute loads
    try:
        return _execute(cfg, progress, log, loaded, owned)
    finally:
        for part in owned:
            if part is not None and hasattr(part, "close"):
                part.close()


def _execute(cfg: RunConfig, progress, log, loaded, owned: list) -> tuple[Path, dict]:
    """:func:`execute`'s work; appends the scorers it loads to ``owned``."""
    log = log or (lambda msg: print(visible(msg), file=sys.stderr))
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    plan: Plan = _checked_plan(cfg, log)
    from audit.calibrate import calibration_for_run, check_calibration
    from audit.engines import EngineJob, get_engine

    calibration = calibration_for_run(cfg)
    engine = get_engine(cfg.engine)
    out, previous, others = _run_folder(cfg)
    from audit.faults import RUN_FOLDER

    RUN_FOLDER["path"] = str(out)  # an interruption names the folder to resume (audit.faults.resume_hint)
    check_not_busy(out)  # refused before the model loads (the lock itself is taken below)
    if note := beside_note(out, others, "the run's files"):
        log(note)
    cfg, plan = _units_for_workers(cfg, plan, engine, log, previous)
    model_arg = model_argument(cfg.model, log)
    # a local rerun of an existing run folder, or a run of inputs that hold no rows, first reads the model's
    # identity (config and file hashes, no weights): a finished run, one refused as a different command, or an
    # empty input then answers without loading the model
    if loaded is not None and not engine.IN_PROCESS:  # pragma: no cover - audit.Auditor refuses another engine
        raise RunError(f"--engine {cfg.engine} loads the model in its workers: a loaded model cannot be given")
    identity_first = (loaded is None and engine.IN_PROCESS and not cfg.confirm
                      and (previous is not None or not plan.units))
    scorer = confirmer = None
    if engine.IN_PROCESS and not identity_first:
        from audit.models import adapter_of

        scorer, confirmer = loaded if loaded is not None else _load_scorer(cfg, model_arg, None, log)
        if loaded is None:
            owned.extend((scorer, confirmer))
        model = scorer.model
        score_config = scorer.config
        info = model_info(model.name, model.fingerprint, model.path, model.device, model.dtype,
                          tokenizer_identity(model.path, model.tokenizer), adapter_of(model).name)
        first_timestep = scorer.first_timestep
    else:
        # a local rerun warns when it loads the model for units left to score (_load_scorer), not twice
        info, score_config, first_timestep = _identity_info(cfg, model_arg, engine, None if identity_first else log)
    from audit.scorers.registry import recorded_config

    sc = recorded_config(score_config.to_dict() | {"first_timestep": first_timestep})  # + a contributed scorer's code
    if calibration is not None:
        check_calibration(calibration, info, sc)
        from audit.calibrate import tokenizer_warning, version_warning

        if warning := version_warning(calibration):
            log(f"memaudit: warning: {warning}")
        if warning := tokenizer_warning(calibration["model"].get("tokenizer"), info.get("tokenizer")):
            log(f"memaudit: warning: the calibration and this run {warning}: token ids, and so risks, may differ")
    identity = run_identity(cfg, plan, info, sc)
    if previous is None:  # a new run folder records how its units are grouped: every rerun groups them alike
        identity["group_rows"] = group_rows(cfg, plan, engine)
        from audit.build import memaudit_build

        identity["memaudit_build"] = memaudit_build()  # recorded, not compared: RECORDED_NOT_COMPARED
        identity["started_at"] = started_at  # recorded, not compared: the manifest's first_started_at
    from audit.cache import not_writable

    if previous is not None and (why := not_writable(out)):  # a finished run on a read-only mount: no lock taken
        return out, _read_only_rerun(cfg, plan, out, previous, identity, why, calibration, started, info.get("path"),
                                     log)
    if previous is not None and calibration is None and (note := dropped_calibration_note(out)):
        log(f"memaudit: warning: {note}")
    with _locked_run_folder(cfg, out, log) as out:  # one memaudit process writes a run folder at a time
        # under the lock: two runs started together cannot both pass the check
        shard_dir, stored = prepare_out_dir(out, identity, info.get("path"))
        plan = respelled(plan, stored, identity)  # the folder's spellings of its files (a rerun through a link)
        todo = [u for u in plan.units if not unit_done(shard_dir, u)]
        if stale := stale_units(shard_dir, todo):
            log(f"memaudit: {counted(stale, 'unit')} of {out} were committed by an earlier memaudit whose tables had "
                "other columns: scored again with this version")
        todo = _retry_failed_units(cfg, plan, todo, shard_dir, log)
        resumed = len(plan.units) - len(todo)
        if resumed:
            log(f"memaudit: resuming {out}: {resumed} of {len(plan.units)} units already done")
            from audit.build import memaudit_build

            if (started_by := stored.get("memaudit_build")) != memaudit_build():
                by = (f"build {started_by}" if isinstance(started_by, str)
                      else "a memaudit from before builds were recorded")
                log(f"memaudit: note: {out} was started by another memaudit ({by}; this is build {memaudit_build()}): "
                    "its units keep the scores that version gave")
        if identity_first and todo:  # a resumed local run: now the model is needed
            scorer, confirmer_ = _load_scorer(cfg, model_arg, score_config, log)
            owned.extend((scorer, confirmer_))
            if scorer.model.fingerprint != info["fingerprint"]:  # pragma: no cover - the files changed meanwhile
                raise RunError(f"--model {model_arg}: its files changed while the run started; run it again")
        if todo:
            bound = recorded_group_rows(stored) or group_rows(cfg, plan, engine)
            groups = group_units(plan.units, bound, {u.index for u in todo})
            with _Progress(sum(u.rows for u in todo), progress, log) as bar:
                engine.run(EngineJob(groups, cfg, shard_dir, bar.advance, model_arg, score_config,
                                     info["fingerprint"], scorer, log))
            check_inputs_unchanged(identity["files"])
        from audit.faults import raise_pending_termination

        raise_pending_termination()  # a SIGTERM swallowed before the merge stops it (every unit is committed)
        manifest = finalize(out, shard_dir, plan, cfg, info, sc, started, started_at,
                            extra_manifest={"engine": cfg.engine, "units": {"total": len(plan.units),
                                                                             "resumed": resumed}},
                            calibration=calibration,
                            resumed_units={u.index for u in plan.units} - {u.index for u in todo})
        for note in manifest.get("cache", {}).get("warnings", []):  # the CLI's stderr, or audit.run's log=
            log(f"memaudit: warning: {note}")
        for note in settings_warnings(manifest):  # units scored otherwise; its flags: a threshold rounded otherwise
            log(f"memaudit: warning: {note}")
        if note := blank_file_note(plan, shard_dir, cfg.prompt_column):
            log(f"memaudit: warning: {note}")
        if confirmer is not None:
            from audit.cascade import run_confirm

            manifest = run_confirm(out, confirmer, cfg, manifest, score_config, log)
        else:
            from audit.cascade import unapplied_note

            if note := unapplied_note(out):
                log(f"memaudit: note: {note}")
    return out, manifest
