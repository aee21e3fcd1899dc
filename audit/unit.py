"""The work on one unit, the same under every engine: read and validate its rows, score its unique prompts
(through the score cache when there is one), write its risk and rejects shards, then commit it.

:func:`process_unit` reads one unit, validates and deduplicates its prompts, scores them and writes one
shard atomically; an engine (:mod:`audit.engines`) only decides where units run. Owns the unit's
rows-in = scored + rejected accounting, the out-of-memory retry (halve the batch) and the shard files
(``shards/unit-000042.{risk,rejects}.parquet``, then ``.done.json``, the commit point; with ``--cache``, ``.sent``
from the scoring to the commit: :func:`write_sent`). Must not import
engines, the run driver (:mod:`audit.runner`) or the merge (:mod:`audit.pipeline`); torch and the scorers
are imported inside the functions that score.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, asdict, replace
import contextlib
from functools import lru_cache
import gc
import json
import math
from pathlib import Path
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit.config import RunConfig
from audit.errors import IncompleteCaptureError, RunError, ScorerError, SourceError
from audit.faults import describe_unit, files_limit_fix, files_limit_problem
from audit.gates import SCORING_FAILURES
from audit.sources import Unit, error_line, is_blank, normalize_prompt, read_unit, row_group_ranges
from audit.tables import TRIGGER_TYPE, arrow_schema, column_ranges, write_json_atomic, write_parquet_atomic

SHARD_ROW_GROUP_ROWS = 2048  # finalize's merge decodes about one row group per shard: memory ~ shards x this


@dataclass
class UnitStats:
    """What one unit did: rows read, scored, rejected by reason, and unique prompts scored."""

    unit: int
    rows_read: int = 0
    scored: int = 0
    rejected_by_reason: dict = field(default_factory=dict)
    unique_scored: int = 0
    wall_s: float = 0.0
    # with --cache, the unit's scored rows (as ``scored`` counts them) whose score came from the cache, and those the
    # model scored for it (in this invocation, or in one killed before the unit's commit: its sent marker); the two add
    # up to ``scored``. A prompt of a group's earlier unit counts as a hit in a later one (one forward for both, as
    # when the units are scored one after the other and the later finds it in the cache); a prompt on several rows of
    # a unit counts on each. A marker without ``model_rows`` (an earlier memaudit) counted unique prompts per unit.
    cache_hits: int = 0
    cache_key: str | None = None  # the --cache folder the unit used (audit.cache.cache_key), compacted at the end
    cache_notes: list = field(default_factory=list)  # what went wrong with the cache (ScoreCache.notes)
    # what the unit was scored with, of the settings a rerun may change (they move risks by float rounding only):
    # batch size (after any out-of-memory halving; "auto" when nothing was scored before it was resolved),
    # torch.compile, the device kind (audit.models.base.device_kind) and the engine; empty when the unit scored no
    # prompt with the model (every row rejected before scoring, or every prompt from the cache)
    scored_with: dict = field(default_factory=dict)
    cache_dir: str | None = None  # the --cache folder (as given, ~ expanded) holding cache_key; None without a cache
    model_rows: int = 0  # with --cache: the scored rows the model scored for this unit (above: cache_hits)
    # with --cache, what the scores the cache served this unit were computed with (setting -> values, in the form of
    # a manifest's scored_with; "unknown" batch size and engine for parts stored before memaudit recorded them,
    # audit.cache.ScoreCache.served_with): the cache keys the device and --compile but not the batch size
    served_with: dict = field(default_factory=dict)


@dataclass(frozen=True)
class UnitGroup:
    """Units whose prompts are scored together: several small units (a folder of small files, each its own unit)
    make one set of full batches instead of one short forward each, and each unit is still written and committed
    as its own shard (:func:`process_units`).

    ``units``: the units to do now, in plan order; ``shape_rows``: the planned rows of the whole group, the units
    already done included, which set the batch shape (:func:`batch_size_for_rows`), so a resumed group is scored
    at the shape a clean run scores it at. :func:`group_units` forms groups from the whole plan.
    """

    units: tuple
    shape_rows: int

    @property
    def index(self) -> int:
        """The group's key: its first unit's index."""
        return self.units[0].index

    @property
    def rows(self) -> int:
        """Rows of the units to do now."""
        return sum(u.rows for u in self.units)

    def to_dict(self) -> dict:
        """The group as a JSON-ready dict (:meth:`from_dict` reads it back)."""
        return {"units": [u.to_dict() for u in self.units], "shape_rows": self.shape_rows}

    @classmethod
    def from_dict(cls, d: dict) -> "UnitGroup":
        """The group :meth:`to_dict` wrote."""
        return cls(tuple(Unit(**u) for u in d["units"]), int(d["shape_rows"]))


def as_group(work) -> UnitGroup:
    """``work`` as a :class:`UnitGroup`: a group as it is, a single :class:`Unit` as a group of one."""
    return work if isinstance(work, UnitGroup) else UnitGroup((work,), work.rows)


MAX_GROUP_UNITS = 256  # units in a group at most: a group's files are read before any is scored (a stall check)


def group_units(units: list[Unit], max_rows: int, todo: set[int] | None = None,
                max_units: int = MAX_GROUP_UNITS) -> list[UnitGroup]:
    """Pack consecutive units of the plan into groups of at most ``max_rows`` planned rows (a unit of more stands
    alone) and ``max_units`` units: a folder of many small files is scored in full batches, not one forward per
    file (2,000 one-row Parquet files on the lab model, 2 CPU cores: 61.9 s with one forward each, 25.7 s in
    groups; ``benchmarks/many_files.py``). A group's files are all read before its first batch is scored, so
    ``max_units`` bounds that read (256 files from an object store at 50 ms each: 13 s without progress, against
    the 900 s of ``--stall-timeout``). Groups are cut from the whole plan (``units``), then keep only the units in
    ``todo`` (indexes; None: all), and groups left empty are dropped, so a resumed run scores a group's remaining
    units at the same :attr:`UnitGroup.shape_rows`.

    Raises:
        ValueError: ``max_rows`` or ``max_units`` < 1.
    """
    if max_rows < 1 or max_units < 1:
        raise ValueError(f"max_rows and max_units must be at least 1, got {max_rows} and {max_units}")
    groups: list[list[Unit]] = []
    rows = 0
    for u in units:
        if not groups or rows + u.rows > max_rows or len(groups[-1]) >= max_units:
            groups.append([])
            rows = 0
        groups[-1].append(u)
        rows += u.rows
    out = []
    for g in groups:
        keep = tuple(u for u in g if todo is None or u.index in todo)
        if keep:
            out.append(UnitGroup(keep, sum(u.rows for u in g)))
    return out


def shard_paths(shard_dir: Path, unit: Unit) -> tuple[Path, Path, Path]:
    """The unit's risk shard, rejects shard and commit marker (``.done.json``) under ``shard_dir``. A unit that
    rejected no row has no rejects shard (:func:`_write_unit`)."""
    stem = shard_dir / f"unit-{unit.index:06d}"
    return Path(f"{stem}.risk.parquet"), Path(f"{stem}.rejects.parquet"), Path(f"{stem}.done.json")


def unit_done(shard_dir: Path, unit: Unit) -> bool:
    """True when the unit's shard was committed (its ``.done.json`` exists) and its shard files are still
    there (no rejects shard where it rejected no row), each a Parquet file (its footer read) holding the rows the
    marker counts, of this unit (the marker's
    unit record, the shards' ``source`` and ``row`` statistics: a shard deleted, cut short or copied over another
    makes the unit scored again, not a run that fails at the merge or ranks rows twice), and none was rejected
    as ``unreadable_rows``: a rerun reads such a unit again, so a passing read error is not kept for good, and a
    rerun without ``--skip-bad-files`` stops on the file as a first run would."""
    risk, rejects, done = shard_paths(shard_dir, unit)
    try:
        marker = json.loads(done.read_text())
        stats, rejected = marker["stats"], marker["stats"]["rejected_by_reason"]
        if marker["unit"] != unit.to_dict() or rejected.get("unreadable_rows"):  # another unit's marker, or
            return False
        for path, rows in ((risk, stats["scored"]), (rejects, sum(rejected.values()))):
            if path is rejects and rows == 0 and not path.exists():  # nothing rejected: no shard written
                continue
            meta = pq.read_metadata(path)
            if meta.num_rows != rows or not _rows_of(meta, unit) or not current_columns(meta, path):
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException):
        return False  # a file missing or damaged: the unit is scored again


def _type_name(t: pa.DataType) -> str:
    """``t`` as text, a list's item named alike however its Parquet file named it (``list<element: ...>``)."""
    return f"list<{_type_name(t.value_type)}>" if pa.types.is_list(t) else str(t)


@lru_cache(maxsize=None)
def _written_columns(table: str) -> tuple:
    """The (name, type) of each column this memaudit writes first in a shard of ``table`` ("risk" or "rejects")."""
    return tuple((f.name, _type_name(f.type)) for f in arrow_schema(table))


def current_columns(meta, path: Path) -> bool:
    """Whether a shard's footer ``meta`` lists the columns this memaudit writes, in order and type, before the
    ``--keep-columns`` ones: a unit committed by an earlier memaudit whose table had fewer columns (the per-layer
    and guidance columns of December 2026) is scored again rather than merged with this version's shards, which
    failed the whole run at the merge, after scoring, with pyarrow's "Schema at index N was different"."""
    table = "rejects" if path.name.endswith(".rejects.parquet") else "risk"
    want = _written_columns(table)
    got = tuple((f.name, _type_name(f.type)) for f in meta.schema.to_arrow_schema())[:len(want)]
    return got == want


def stale_units(shard_dir: Path, units) -> int:
    """How many of ``units`` hold a commit marker and a risk shard whose columns are not this memaudit's
    (:func:`current_columns`): units an earlier memaudit committed, which a rerun scores again."""
    stale = 0
    for unit in units:
        risk, _, done = shard_paths(shard_dir, unit)
        with contextlib.suppress(OSError, ValueError, pa.ArrowException):
            if done.exists() and not current_columns(pq.read_metadata(risk), risk):
                stale += 1
    return stale


def committed_stats(shard_dir: Path, unit: Unit) -> dict:
    """The :class:`UnitStats` (as a dict) that a committed unit's ``.done.json`` records.

    Raises:
        OSError: no marker (the unit is not committed); ValueError, KeyError: a marker that is not one.
    """
    return json.loads(shard_paths(shard_dir, unit)[2].read_text())["stats"]


def failed_rows(shard_dir: Path, unit: Unit) -> dict[str, int]:
    """The rows of a committed unit the model failed to score, by reason (:data:`SCORING_FAILURES`:
    ``scoring_error``, ``out_of_memory``, ``nonfinite_attention``), as its ``.done.json`` counts them; empty for a
    unit without any or without a readable marker. ``memaudit run --retry-failed`` scores such units again
    (:func:`forget_unit`)."""
    try:
        rejected = committed_stats(shard_dir, unit)["rejected_by_reason"]
        return {r: int(rejected[r]) for r in SCORING_FAILURES if rejected.get(r)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def forget_unit(shard_dir: Path, unit: Unit) -> None:
    """Uncommit a finished unit (remove its ``.done.json``, then its shards) so that the run scores it again; an
    interruption in between leaves an uncommitted unit, which any rerun scores."""
    for path in reversed(shard_paths(shard_dir, unit)):
        path.unlink(missing_ok=True)


def _rows_of(meta, unit: Unit) -> bool:
    """Whether a shard's footer statistics say its rows are ``unit``'s: ``source`` its file, ``row`` within
    ``[start, stop)`` (a shard copied over another unit's, with the same row count, is not). A group without
    exact statistics (a very long path) is left to the row count."""
    sources = column_ranges(meta, "source")
    rows = column_ranges(meta, "row")
    return (all(r is None or r[0] == r[1] == unit.url for r in sources)
            and all(r is None or (unit.start <= r[0] and r[1] < unit.stop) for r in rows))


@dataclass
class _Prepared:
    """Rows of one unit after validation: scored candidates and rejects."""

    ids: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    prompts: list = field(default_factory=list)  # normalized
    raws: list = field(default_factory=list)  # the prompt as read when it differs from the normalized one, else None
    extras: dict = field(default_factory=dict)
    rej_ids: list = field(default_factory=list)
    rej_rows: list = field(default_factory=list)
    rej_reasons: list = field(default_factory=list)
    rej_prompts: list = field(default_factory=list)
    rej_extras: dict = field(default_factory=dict)
    rows_read: int = 0

    def extend(self, other: "_Prepared") -> None:
        """Append ``other``'s rows (a later part of the same unit) to these."""
        for name in ("ids", "rows", "prompts", "raws", "rej_ids", "rej_rows", "rej_reasons", "rej_prompts"):
            getattr(self, name).extend(getattr(other, name))
        for c in self.extras:
            self.extras[c].extend(other.extras[c])
            self.rej_extras[c].extend(other.rej_extras[c])
        self.rows_read += other.rows_read


READ_ATTEMPTS = 3  # reads of a unit before it counts as unreadable (a remote file system's passing error)


def prepare_unit(unit: Unit, cfg: RunConfig) -> _Prepared:
    """Read a unit and sort its rows into prompts to score and rejects with a reason.

    A unit that cannot be read (a corrupt Parquet page behind a valid footer, a file cut short: anything the
    reader raises) is read again, :data:`READ_ATTEMPTS` times in all; then with ``cfg.skip_bad_files`` its rows
    are rejected as ``unreadable_rows`` (the error in ``detail``: nothing is lost, the run goes on), for a
    Parquet unit only those of the row groups that cannot be read on their own; else the run stops naming the
    file and its rows.

    Raises:
        SourceError: the unit could not be read and ``cfg.skip_bad_files`` is off.
        RunError: the unit held other than its planned rows (the file changed since the run was planned), or a
            file could not be opened for the process's open-file limit (:func:`audit.faults.files_limit_problem`:
            not the file's fault, so never rejected as ``unreadable_rows``, whatever ``cfg.skip_bad_files`` says).
    """
    last: Exception | None = None
    for _ in range(READ_ATTEMPTS):
        try:
            return _sort_rows(unit, cfg)
        except RunError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader error: read again, then reject or stop, named
            last = exc
    if limit := files_limit_problem(last):  # the process's limit, not the file's damage: never unreadable_rows
        raise RunError(_files_limit_message(unit, limit, last)) from last
    if not cfg.skip_bad_files:
        raise SourceError(f"{describe_unit(unit)}: cannot read ({error_line(last)}); --skip-bad-files rejects "
                          "such rows as unreadable_rows and goes on") from last
    parts = [replace(unit, start=a, stop=b) for a, b in row_group_ranges(unit)]
    if len(parts) < 2:
        return _unreadable(unit, cfg, error_line(last))
    whole = _Prepared(extras={c: [] for c in cfg.keep_columns}, rej_extras={c: [] for c in cfg.keep_columns})
    for part in parts:  # a Parquet unit, one row group at a time: only the groups that cannot be read are rejected
        try:
            prep = _sort_rows(part, cfg)
        except RunError:
            raise
        except Exception as exc:  # noqa: BLE001 - this row group's rows are rejected, the others kept
            if limit := files_limit_problem(exc):
                raise RunError(_files_limit_message(part, limit, exc)) from exc
            prep = _unreadable(part, cfg, error_line(exc))
        whole.extend(prep)
    return whole


def _files_limit_message(unit: Unit, limit: str, exc: BaseException) -> str:
    """Why ``unit`` was not read when a file could not be opened for the open-file limit ``limit``
    (:func:`audit.faults.files_limit_problem`): the run stops, whatever ``--skip-bad-files`` says."""
    return (f"{describe_unit(unit)}: cannot be read, {limit} ({error_line(exc)}); {files_limit_fix(limit)}, then rerun "
            "the same command to resume: finished units are kept")


def _unreadable(unit: Unit, cfg: RunConfig, detail: str) -> _Prepared:
    """Every row of ``unit`` rejected as ``unreadable_rows`` (``detail``: the reader's error)."""
    prep = _Prepared(extras={c: [] for c in cfg.keep_columns},
                     rej_extras={c: [None] * unit.rows for c in cfg.keep_columns}, rows_read=unit.rows)
    prep.rej_rows = list(range(unit.start, unit.stop))
    prep.rej_ids = [f"{unit.url}#{row}" for row in prep.rej_rows]
    prep.rej_reasons = [f"unreadable_rows:{detail}"] * unit.rows
    prep.rej_prompts = [None] * unit.rows
    return prep


# a prompt longer than this is rejected (prompt_too_long) before it is normalized, tokenized or stored: a 97 KB
# .txt.gz holding one 100 MB line took 60 s and 1.55 GB, one of 400 MB ended the run with a MemoryError, for the 77
# tokens a CLIP model keeps (about 300 characters of English)
MAX_PROMPT_CHARS = 1_000_000
REJECTED_PROMPT_CHARS = 10_000  # what rejects.parquet keeps of such a prompt's text


def _sort_rows(unit: Unit, cfg: RunConfig) -> _Prepared:
    """:func:`prepare_unit`'s one reading of the unit."""
    prep = _Prepared(extras={c: [] for c in cfg.keep_columns}, rej_extras={c: [] for c in cfg.keep_columns})
    for batch in read_unit(unit, cfg.prompt_column, cfg.id_column, cfg.keep_columns):
        for i, row in enumerate(batch.rows):
            prep.rows_read += 1
            raw = batch.prompts[i]
            pid = f"{unit.url}#{row}"
            reason = batch.errors[i]
            if cfg.id_column:
                value = batch.ids[i] if batch.ids is not None else None
                if value is None:  # no ids at all in this batch: the file lacks the column
                    reason = reason or ("null_id" if batch.ids is not None else "missing_id_column")
                else:
                    pid = str(value)
            text = None
            if reason is None:
                if raw is None:
                    reason = "null_prompt"
                elif len(raw) > MAX_PROMPT_CHARS:
                    reason = f"prompt_too_long:{len(raw):,} characters, more than {MAX_PROMPT_CHARS:,}"
                else:
                    text = normalize_prompt(raw)
                    if is_blank(text):
                        reason = "empty_prompt"
            if reason is None:
                prep.ids.append(pid)
                prep.rows.append(row)
                prep.prompts.append(text)
                prep.raws.append(raw if raw != text else None)
                for c in cfg.keep_columns:
                    prep.extras[c].append(batch.extras[c][i])
            else:
                prep.rej_ids.append(pid)
                prep.rej_rows.append(row)
                prep.rej_reasons.append(reason)
                if isinstance(raw, str) and len(raw) > MAX_PROMPT_CHARS:  # prompt_too_long's, an invalid_json line
                    raw = raw[:REJECTED_PROMPT_CHARS]  # of 400 MB: the row is still found by its id, not kept whole
                prep.rej_prompts.append(raw if isinstance(raw, str) else None)
                for c in cfg.keep_columns:
                    prep.rej_extras[c].append(batch.extras[c][i])
    if prep.rows_read != unit.rows:  # the file was cut or rewritten after the run planned it
        raise RunError(f"{describe_unit(unit)}: {unit.rows} rows planned, {prep.rows_read} read: the file changed "
                       "during the run; score it again into a new --out")
    return prep


def prepare_threads_for(scorer, requested: int | str = "auto") -> int:
    """Threads that prepare batches (tokenize, draw the seeded noise) ahead of the device; 0 prepares each batch
    in the scoring thread. ``auto``: 1 when the model runs on the CPU (measured better than 0 there even though
    the forward uses every core: docs/gpu.md), else one per usable host core but one, at most 4: SD 1.4's host
    work is about 140 us a prompt on one core (tokenizer 59, noise 4 x 64 x 64 77; docs/gpu.md), so 2-3 threads
    feed an H200's 2,000 prompts/s with headroom. The tokenizer and torch's random number generator release the
    GIL, so the threads run in parallel."""
    import os

    if requested != "auto":
        return max(0, int(requested))
    if scorer.model.device.type == "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores - 1))


class _Inline:
    """``prepare_threads=0``: an executor that runs each submitted call at once in the calling thread."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def submit(fn, *args):
        from concurrent.futures import Future

        future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # raised again by .result(), where a thread pool would raise it
            future.set_exception(exc)
        return future


BATCH_ROUNDING = 8  # a batch size lowered to the rows there are is rounded up to a multiple of this


def batch_size_for_rows(batch_size: int, rows: int | None) -> int:
    """The batch size for ``rows`` rows to score: ``batch_size``, or, where it is larger than ``rows``, ``rows``
    rounded up to a multiple of :data:`BATCH_ROUNDING` (8). Every batch is padded to the batch size (one kernel
    shape), so without this a 2-row input at ``--batch-size 20000`` computed 20,000 rows' forwards (102 s and
    9.8 GB on the lab model, 2 CPU cores, where batch size 8 took 0.3 s of scoring). ``rows`` is a unit's planned
    row count, which a cache or duplicate prompts do not change, so the shape a unit's prompts are scored at
    does not depend on what the cache held. On the CPU the scores at 8 and 32 were bit-identical
    (``attention_entropy``, lab model); on a GPU another shape may round differently (docs/audits.md). None:
    ``batch_size``."""
    if rows is None or batch_size <= rows:
        return batch_size
    return min(batch_size, -(-max(rows, 1) // BATCH_ROUNDING) * BATCH_ROUNDING)


def score_prompts(scorer, prompts: list[str], batch_size: int | str,
                  progress: Callable[[int], None] | None = None,
                  prepare_threads: int | str = "auto", rows: int | None = None) -> tuple[dict, list, dict]:
    """Score unique normalized prompts in batches of ``batch_size`` (``"auto"``: :meth:`Scorer.auto_batch_size`),
    lowered to the ``rows`` to score where it is larger (:func:`batch_size_for_rows`; ``rows``: the unit's
    planned row count, None for ``len(prompts)``), except for a compiled scorer, where a new batch shape would
    be compiled again (a short batch is padded to the batch size, one shape per run).

    Returns ``(scores, trigger_tokens, errors)``: arrays indexed like ``prompts``; ``errors`` maps an
    index to a reason for prompts that could not be scored (a batch that raises is retried prompt by
    prompt, so one bad prompt never fails the others). An out-of-memory error halves the batch size (the rows
    the kernels saw: a short last batch is padded to it) and retries the same prompts; at batch size 1 the
    prompts are scored one by one, and one that still does not fit is an ``out_of_memory`` error. An incomplete
    capture is not caught: it means the scorer is broken, and the run fails loudly.

    The host-side work of the next batches (tokenization, seeded noise: :meth:`Scorer.prepare`) runs in
    ``prepare_threads`` background threads (:func:`prepare_threads_for`), each preparing one of the batches
    that follow the current one while the device scores it, so the accelerator does not wait on the host.
    Which thread prepares a batch does not change its values (the noise is seeded per prompt). The device
    work of batch i+1 is queued (:meth:`Scorer.launch`, no host synchronization) before batch i's results
    are brought back and its trigger tokens decoded, so on an accelerator that host work overlaps the next
    forward instead of leaving the device idle (on the CPU, where a launch computes, the order is all that
    changes). A batch whose results fail to come back is retried prompt by prompt like one whose launch
    fails.

    Raises:
        audit.errors.ScorerError: the scorer's ``compute`` returned something other than its columns as float64
            tensors [B] (:func:`audit.scorers.base.checked_outputs`; the scorer is broken; never retried).
        audit.errors.IncompleteCaptureError: a selected layer did not report (the scorer is broken; never
            retried).
    """
    from concurrent.futures import ThreadPoolExecutor

    from audit.scorers import result_columns

    n = len(prompts)
    cols = result_columns()
    out = {c: np.zeros(n, dtype=np.float64) for c in cols}
    triggers: list = [None] * n
    errors: dict[int, str] = {}

    def prepare(idx: list[int], pad_to: int):
        batch = [prompts[i] for i in idx]
        # a short batch is padded to the full batch size: the kernels then see one shape per unit, so a
        # prompt's score is bit-identical whatever its batch-mates where the kernels do not round a row by its
        # place in the batch (on the CPU: batch sizes that are multiples of 4; at 5-7 up to 2e-7, docs/audits.md);
        # cached and freshly scored prompts then agree exactly (audit.cache)
        # (with copies of its shortest prompt's tokens, Scorer.prepare: a 10 MB prompt is not tokenized again)
        return scorer.prepare(batch, pad_to=pad_to)

    def finish(idx: list[int], prepared, packed) -> None:
        k = len(idx)
        res = scorer.collect(prepared, packed)
        trig = scorer.trigger_tokens(prepared.tokens, res["token_mass"][:k])
        for c in cols:
            out[c][idx] = res[c][:k]
        for j, i in enumerate(idx):
            triggers[i] = trig[j]

    def one_by_one(idx: list[int], pool, size: int = 1) -> None:
        """A batch that failed: each prompt alone (a batch of one), its failure its reject reason; then the prompts
        that scored are scored again together, padded to ``size`` (the failed batch's: the kernels' shape), so that
        a batch-mate of a failing prompt keeps the score a clean run gives it, and the cache holds that score (one
        more batch, not ``size`` rows a prompt). Should that batch fail, the scores alone stand."""
        for i in idx:
            try:
                prepared = pool.submit(prepare, [i], 1).result()
                finish([i], prepared, scorer.launch(prepared))
            except BROKEN_SCORER:
                raise
            except Exception as exc1:  # one prompt's failure becomes its reject reason
                reason = "out_of_memory" if is_out_of_memory(exc1) else "scoring_error"
                errors[i] = f"{reason}: {type(exc1).__name__}: {str(exc1)[:200]}"
        scored = [i for i in idx if i not in errors]
        if size > 1 and scored:
            try:
                prepared = pool.submit(prepare, scored, size).result()
                finish(scored, prepared, scorer.launch(prepared))
            except BROKEN_SCORER:
                raise
            except Exception:  # noqa: BLE001 - the prompts' scores alone, taken above, stand
                pass

    def complete(launched, pool) -> None:
        """Bring a launched batch back (collect, trigger tokens) and count it as done."""
        idx, prepared, packed = launched
        try:
            finish(idx, prepared, packed)
        except BROKEN_SCORER:
            raise
        except Exception:
            one_by_one(idx, pool)
        if progress:
            progress(len(idx))

    if batch_size == "auto":
        batch_size = scorer.auto_batch_size()
    if not getattr(scorer, "compiled", False):  # compiled: a new shape recompiles (seconds to minutes); pad instead
        batch_size = batch_size_for_rows(batch_size, n if rows is None else rows)
    threads = prepare_threads_for(scorer, prepare_threads)
    pos = 0
    ahead: dict = {}  # (pos, size) -> future of a batch being prepared in the background
    in_flight = None  # (idx, prepared, packed): launched, its results not yet brought back
    with (ThreadPoolExecutor(threads, thread_name_prefix="memaudit-prepare") if threads else _Inline()) as pool:
        while pos < n:
            # the scorer remembers a batch size that ran out of memory, for every later unit too
            size = min(batch_size, getattr(scorer, "max_batch", batch_size) or batch_size)
            idx = list(range(pos, min(pos + size, n)))
            # this batch and the `threads` after it: queued once each (a changed size queues them anew)
            for start in range(pos, min(pos + (threads + 1) * size, n), size):
                if (start, size) not in ahead:
                    ahead[(start, size)] = pool.submit(prepare, list(range(start, min(start + size, n))), size)
            future = ahead.pop((pos, size))
            for key in [k for k in ahead if k[0] < pos + size or k[1] != size]:  # stale after a size change
                ahead.pop(key).cancel()
            try:
                prepared = future.result()
                packed = scorer.launch(prepared)  # queued behind the batch still in flight
            except BROKEN_SCORER:
                raise
            except Exception as exc:
                if in_flight is not None:
                    complete(in_flight, pool)
                    in_flight = None
                if is_out_of_memory(exc) and size > 1:
                    # halve the batch size the kernels saw (a short last batch is padded to it), not the prompts
                    # the batch held, and retry the same prompts
                    scorer.max_batch = max(1, size // 2)
                    free_accelerator_memory()
                    continue
                one_by_one(idx, pool, size)
                pos += len(idx)
                if progress:
                    progress(len(idx))
                continue
            if in_flight is not None:
                complete(in_flight, pool)  # while the device runs the batch just launched
            in_flight = (idx, prepared, packed)
            pos += len(idx)
        if in_flight is not None:
            complete(in_flight, pool)
    return out, triggers, errors


BROKEN_SCORER = (IncompleteCaptureError, ScorerError)  # the scorer is broken, not a prompt: never retried, never a reject


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA (or other accelerator) out-of-memory error."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return isinstance(exc, (MemoryError, RuntimeError)) and "out of memory" in str(exc).lower()


def free_accelerator_memory() -> None:
    """Release cached accelerator memory after an out-of-memory error."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_freeze_lock = threading.Lock()
_freeze_depth = 0


@contextlib.contextmanager
def heap_frozen():
    """Exempt the objects alive at entry (the imported libraries, the model: about 470,000 objects in a run
    of the lab model) from Python's cyclic garbage collector while the block runs (``gc.freeze``), and hand
    them back on exit (``gc.unfreeze``). A unit allocates many small containers (trigger tokens, rows), so
    the collector runs full collections during it, and each one walked the whole heap: in
    ``benchmarks/host_ceiling.py`` (one core, 20,000 prompts) 10 full collections took 1.7 s, and freezing
    raised the host's throughput by about 10% (8,096 / 9,348 -> 8,972 / 10,361 prompts/s, alternated).
    Nothing is collected less: garbage among the frozen objects waits for the exit. A no-op when the caller
    froze objects itself (its freeze is left alone) or when nested (thread-safe depth count)."""
    global _freeze_depth
    with _freeze_lock:
        own = _freeze_depth > 0 or gc.get_freeze_count() == 0
        if own:
            if _freeze_depth == 0:
                gc.freeze()
            _freeze_depth += 1
    try:
        yield
    finally:
        if own:
            with _freeze_lock:
                _freeze_depth -= 1
                if _freeze_depth == 0:
                    gc.unfreeze()


WRITE_THREADS = 4  # units of a group written and committed at once (a commit waits on two or three fsyncs)
READ_THREADS = 8  # files of a group read at once: an object store's latency per file, not its bandwidth, bounds them


def prepare_group(group: UnitGroup, cfg: RunConfig) -> list[_Prepared]:
    """Read and validate each unit of ``group`` (:func:`prepare_unit`); returns them in the group's order.

    The units of different files are read by up to :data:`READ_THREADS` threads at once: a group of small files on
    an object store waits on each file's latency (tens of milliseconds an open), not on the bytes, so one file after
    another would leave the device idle. Units of one file are read in order by one thread (a CSV or compressed
    file's next unit continues the stream the previous one left, :mod:`audit.sources`).

    Raises:
        audit.errors.SourceError, audit.errors.RunError: as :func:`prepare_unit`, for the first unit in the group's
            order that raises (the others are read to the end first).
    """
    if len(group.units) == 1:
        return [prepare_unit(group.units[0], cfg)]
    from concurrent.futures import ThreadPoolExecutor

    files: dict[str, list[int]] = {}  # url -> positions of its units in the group, in order
    for i, u in enumerate(group.units):
        files.setdefault(u.url, []).append(i)
    out: list = [None] * len(group.units)

    def read(positions: list[int]) -> None:
        for i in positions:
            try:
                out[i] = prepare_unit(group.units[i], cfg)
            except Exception as exc:  # noqa: BLE001 - raised below in the group's order
                out[i] = exc
                return  # the file's later units are not read after a failed one (their stream is not where it was)

    with ThreadPoolExecutor(min(READ_THREADS, len(files)), thread_name_prefix="memaudit-read-file") as pool:
        for f in [pool.submit(read, positions) for positions in files.values()]:
            f.result()
    for prep in out:
        if isinstance(prep, Exception):
            raise prep
    return out


def process_unit(unit: Unit, scorer, cfg: RunConfig, shard_dir: Path,
                 progress: Callable[[int], None] | None = None, prepared: "_Prepared | None" = None) -> UnitStats:
    """Read, score and write one unit as a shard: :func:`process_units` on a group of this one unit.

    Raises:
        as :func:`process_units`.
    """
    return process_units(as_group(unit), scorer, cfg, shard_dir, progress,
                         None if prepared is None else [prepared])[0]


def process_units(group: UnitGroup, scorer, cfg: RunConfig, shard_dir: Path,
                  progress: Callable[[int], None] | None = None,
                  prepared: "list[_Prepared] | None" = None) -> list[UnitStats]:
    """Read a group of units, score their prompts together, and write and commit each unit as its own shard;
    idempotent (a rerun rewrites the same shards). Returns each unit's stats, in the group's order.

    Prompts equal after normalization are scored once per group; every row gets its prompt's score. The batch
    size is lowered to the group's planned rows (:attr:`UnitGroup.shape_rows`, :func:`batch_size_for_rows`).
    ``progress(n)`` is called with input rows done; ``prepared`` is the group already read by
    :func:`prepare_group` (engines read the next group while the model scores this one). Runs under
    :func:`heap_frozen`.

    Raises:
        audit.errors.SourceError, audit.errors.RunError: as :func:`prepare_unit` (a unit cannot be read
            without ``--skip-bad-files``; it held other rows than planned).
        audit.errors.IncompleteCaptureError: as :func:`score_prompts`.
    """
    with heap_frozen():
        return _process_units(group, scorer, cfg, shard_dir, progress, prepared)


def _process_units(group: UnitGroup, scorer, cfg: RunConfig, shard_dir: Path, progress, prepared) -> list[UnitStats]:
    t_start = time.perf_counter()
    preps = prepared if prepared is not None else prepare_group(group, cfg)
    unique: dict[str, int] = {}  # the group's unique prompts
    inverses = [np.fromiter((unique.setdefault(p, len(unique)) for p in prep.prompts), dtype=np.int64,
                            count=len(prep.prompts)) for prep in preps]
    uniq_prompts = list(unique)
    n_rejected_before = sum(len(prep.rej_ids) for prep in preps)
    if progress and n_rejected_before:
        progress(n_rejected_before)
    rows_per_prompt = sum(len(prep.prompts) for prep in preps) / max(len(uniq_prompts), 1)
    reported = [0.0, 0]

    def on_batch(k: int) -> None:  # unique prompts done -> input rows done
        reported[0] += k * rows_per_prompt
        step = int(round(reported[0])) - reported[1]
        reported[1] += step
        if progress and step:
            progress(step)

    from audit.scorers import prompt_hash

    hashes = [prompt_hash(p) for p in uniq_prompts]
    cache = None
    scored_now = np.ones(len(uniq_prompts), dtype=bool)  # scored by the model in this group (not from the cache)
    # per unit, the prompts an earlier, killed invocation scored with the model for it (its sent markers)
    sent_before = [np.zeros(len(uniq_prompts), dtype=bool) for _ in group.units]
    if cfg.cache:
        from audit.cache import cached_scores, counts_prompts, open_cache
        from audit.models.base import device_kind

        cache = open_cache(cfg.cache, scorer, device_kind(scorer.model.device))
        misses: list[str] = []
        sent_before = [read_sent(shard_dir, unit, hashes) for unit in group.units]

        def score_misses(ps):
            misses.extend(ps)
            result = score_prompts(scorer, ps, cfg.batch_size, progress=on_batch,
                                   prepare_threads=cfg.prepare_threads, rows=group.shape_rows)
            # before the cache stores them: a kill between that and the units' commits made the rerun read them as
            # hits, and "sent to the model" undercount the prompts the model was sent over the whole run
            sent = np.zeros(len(uniq_prompts), dtype=bool)
            sent[[unique[p] for j, p in enumerate(ps) if j not in result[2]]] = True
            for unit, idx in zip(group.units, sent_per_unit(inverses, sent, sent_before)):
                write_sent(shard_dir, unit, [hashes[i] for i in idx])
            return result

        scores, triggers, errors, _ = cached_scores(cache, uniq_prompts, hashes, score_misses, progress=on_batch,
                                                    tag=f"u{group.index:06d}",
                                                    settings=lambda: scored_with(scorer, cfg))
        missed = set(misses)
        scored_now = np.fromiter((p in missed for p in uniq_prompts), dtype=bool, count=len(uniq_prompts))
    else:
        scores, triggers, errors = score_prompts(scorer, uniq_prompts, cfg.batch_size, progress=on_batch,
                                                 prepare_threads=cfg.prepare_threads, rows=group.shape_rows)
    settings = scored_with(scorer, cfg)
    wall = time.perf_counter() - t_start
    total_rows = max(sum(prep.rows_read for prep in preps), 1)
    failed = np.zeros(len(uniq_prompts), dtype=bool)  # prompts the model could not score (rejects, not scores)
    failed[list(errors)] = True
    # a prompt scored now, or by a killed invocation for this unit, counts for the first unit holding it
    sent = sent_per_unit(inverses, scored_now & ~failed, [before & ~failed for before in sent_before])
    usable = cache is not None and not cache.unusable
    cache_key, cache_dir = (cache.dir.name, str(cache.dir.parent)) if usable else (None, None)
    # the cache's notes go to each unit of the group (the manifest keeps each once), those that count prompts not
    # stored to its first only: the manifest sums them over the units (a group of 3 warned of 3 times its total)
    notes = list(cache.notes) if cache else []
    uncounted = [n for n in notes if not counts_prompts(n)]
    jobs = []
    for k, (unit, prep, inverse, new) in enumerate(zip(group.units, preps, inverses, sent)):
        mine = np.unique(inverse)
        good = mine[~failed[mine]]  # the unit's unique prompts that got a score
        stats = UnitStats(unit.index, prep.rows_read, 0, {}, len(good), wall * prep.rows_read / total_rows,
                          0, cache_key, list(uncounted if k else notes),
                          settings if scored_now[mine].any() else {}, cache_dir)
        if cache is not None:  # the unit's scores the cache served were computed with the filling runs' settings
            stats.served_with = cache.served_with([hashes[i] for i in good[~scored_now[good]]])
        # the group's prompts the model scored for this unit: the unit's rows of the others that got a score came
        # from the cache, or from the forward of an earlier unit of its group (so the manifest's cache figures count
        # as units scored one after the other do); a prompt that failed is neither, in whichever unit it is.
        # _write_unit counts both by row
        from_model = None
        if cache:
            from_model = np.zeros(len(uniq_prompts), dtype=bool)
            from_model[new] = True
        jobs.append((unit, prep, inverse, scores, triggers, errors, hashes, cfg, shard_dir, stats, from_model))
    if len(jobs) == 1:
        return [_write_unit(*jobs[0])]
    from concurrent.futures import ThreadPoolExecutor

    # each unit's files are its own; writing and fsync release the GIL, so one unit's fsync waits while others build
    with ThreadPoolExecutor(min(WRITE_THREADS, len(jobs)), thread_name_prefix="memaudit-write") as pool:
        futures = [pool.submit(_write_unit, *job) for job in jobs]
        return [f.result() for f in futures]  # the first failure in the group's order is raised


def _write_unit(unit: Unit, prep: _Prepared, inverse, scores: dict, triggers: list, errors: dict, hashes: list,
                cfg: RunConfig, shard_dir: Path, stats: UnitStats, from_model: np.ndarray | None = None) -> UnitStats:
    """Write one unit's risk and rejects shards from its group's scores (``inverse``: each of the unit's prompts'
    index into them), then commit it (``.done.json``); ``stats`` lacks only the scored and rejected counts and, with
    a cache, its counts of scored rows :attr:`UnitStats.cache_hits` and :attr:`UnitStats.model_rows` (``from_model``,
    a bool per group prompt: the model scored it for this unit), and its ``wall_s`` (the unit's share of the group's
    reading and scoring) gains the time of this write.

    Raises:
        audit.errors.RunError: the unit's rows do not reconcile (read != scored + rejected).
    """
    from audit.scorers import score_columns

    t_start = time.perf_counter()

    from audit.scorers import get_scorer

    own = [c.name for c in get_scorer(cfg.scorer).columns]
    keep = []
    for r, u in enumerate(inverse):
        reason = errors.get(int(u))
        if reason is None and scores["nonfinite"][u]:
            reason = f"nonfinite_attention: {nonfinite_detail(scores, int(u), own)}"
        if reason is None:
            keep.append(r)
        else:
            prep.rej_ids.append(prep.ids[r])
            prep.rej_rows.append(prep.rows[r])
            prep.rej_reasons.append(reason)
            prep.rej_prompts.append(prep.raws[r] if prep.raws[r] is not None else prep.prompts[r])  # as read
            for c in cfg.keep_columns:
                prep.rej_extras[c].append(prep.extras[c][r])
    keep_arr = np.asarray(keep, dtype=np.int64)
    u_idx = inverse[keep_arr] if len(keep) else np.zeros(0, dtype=np.int64)
    risk_cols = {
        "rank": pa.array(np.zeros(len(keep), dtype=np.int64)),
        "prompt_id": pa.array([prep.ids[r] for r in keep], pa.string()),
        "prompt": pa.array([prep.prompts[r] for r in keep], pa.string()),
        "prompt_raw": pa.array([prep.raws[r] for r in keep], pa.string()),
    }
    for col, nullable in score_columns():  # risk, attn_entropy, bos_mass, each scorer's own (null if not run)
        values = scores[col.name][u_idx]
        risk_cols[col.name] = pa.array(values, mask=np.isnan(values)) if nullable else pa.array(values)
    risk_cols |= {
        "trigger_tokens": pa.array([triggers[u] for u in u_idx], TRIGGER_TYPE),
        "n_tokens": pa.array(scores["n_tokens"][u_idx].astype(np.int32)),
        "truncated": pa.array(scores["truncated"][u_idx].astype(bool)),
        "source": pa.array([unit.url] * len(keep), pa.string()),
        "row": pa.array([prep.rows[r] for r in keep], pa.int64()),
        "prompt_hash": pa.array([hashes[u] for u in u_idx], pa.string()),
        "flagged": pa.nulls(len(keep), pa.bool_()),  # filled by finalize when calibrated
        "risk_percentile": pa.nulls(len(keep), pa.float64()),
    }
    for c in cfg.keep_columns:
        risk_cols.setdefault(c, pa.array([prep.extras[c][r] for r in keep], pa.string()))
    risk = pa.table(risk_cols, schema=arrow_schema("risk", cfg.keep_columns))
    if risk.num_rows:
        risk = risk.sort_by([("risk", "descending"), ("prompt_id", "ascending")])
    rej_cols = {
        "prompt_id": pa.array(prep.rej_ids, pa.string()),
        "source": pa.array([unit.url] * len(prep.rej_ids), pa.string()),
        "row": pa.array(prep.rej_rows, pa.int64()),
        "reason": pa.array([_reason_key(r) for r in prep.rej_reasons], pa.string()),
        "detail": pa.array([_reason_detail(r) for r in prep.rej_reasons], pa.string()),
        "prompt": pa.array(prep.rej_prompts, pa.string()),
    }
    for c in cfg.keep_columns:
        rej_cols.setdefault(c, pa.array(prep.rej_extras[c], pa.string()))
    rejects = pa.table(rej_cols, schema=arrow_schema("rejects", cfg.keep_columns))
    risk_path, rej_path, done_path = shard_paths(shard_dir, unit)
    write_parquet_atomic(risk, risk_path, "risk", cfg.keep_columns, row_group_size=SHARD_ROW_GROUP_ROWS)
    if rejects.num_rows:
        write_parquet_atomic(rejects, rej_path, "rejects", cfg.keep_columns)
    else:  # no rejects shard for a unit that rejected nothing: an empty file and its fsync per unit cost a folder
        # of small files a third of its host time (benchmarks/many_files.py); one an earlier, uncommitted try left
        # goes before the marker is written
        rej_path.unlink(missing_ok=True)
    stats = replace(stats, scored=risk.num_rows,
                    rejected_by_reason=dict(Counter(_reason_key(r) for r in prep.rej_reasons)),
                    wall_s=stats.wall_s + time.perf_counter() - t_start)  # (without the marker's own write)
    if from_model is not None:  # each scored row once, by where its score came from
        model_rows = int(np.count_nonzero(from_model[u_idx]))
        stats = replace(stats, cache_hits=len(keep) - model_rows, model_rows=model_rows)
    if stats.rows_read != stats.scored + sum(stats.rejected_by_reason.values()):
        raise RunError(f"unit {unit.index} lost rows: read {stats.rows_read}, scored {stats.scored}, "
                       f"rejected {sum(stats.rejected_by_reason.values())}")
    write_json_atomic({"unit": unit.to_dict(), "stats": asdict(stats)}, done_path)
    sent_path(shard_dir, unit).unlink(missing_ok=True)  # its counts are in the marker now
    return stats


def sent_path(shard_dir: Path, unit: Unit) -> Path:
    """The unit's sent marker (:func:`write_sent`): ``shards/unit-000042.sent``."""
    return shard_dir / f"unit-{unit.index:06d}.sent"


def sent_per_unit(inverses: list, sent: np.ndarray, before: list) -> list[np.ndarray]:
    """Which of a group's unique prompts each unit counts as sent to the model (its rows of them are
    ``UnitStats.model_rows``, its other scored rows ``cache_hits``): those scored with the model now (``sent``) or,
    for that unit, by an earlier invocation killed before the unit was committed (``before``, one mask a unit:
    :func:`read_sent`), each for the first unit of the group holding it. ``inverses``: each unit's prompts' indexes
    into the group's unique prompts."""
    counted = np.zeros(len(sent), dtype=bool)
    out = []
    for inverse, earlier in zip(inverses, before):
        mine = np.unique(inverse)
        new = mine[(sent[mine] | earlier[mine]) & ~counted[mine]]
        counted[new] = True
        out.append(new)
    return out


def write_sent(shard_dir: Path, unit: Unit, hashes: list[str]) -> None:
    """Record the prompts (their hashes, 16 bytes each) that the model scored for ``unit``, before the score cache
    stores them: a run killed between that and the unit's commit finds them in the cache when resumed, and counts
    them as sent to the model all the same (:func:`read_sent`), as an uninterrupted run does. Removed once the unit
    is committed. Not synced to disk (the counts of a power cut at that moment are the only ones it could cost);
    a write that fails is not an error."""
    try:
        path = sent_path(shard_dir, unit)
        if hashes:
            path.write_bytes(b"".join(bytes.fromhex(h) for h in hashes))
        else:
            path.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass


def read_sent(shard_dir: Path, unit: Unit, hashes: list[str]) -> np.ndarray:
    """Which of ``hashes`` (a group's unique prompts) the unit's sent marker (:func:`write_sent`) holds: prompts an
    invocation killed before committing the unit scored with the model; none without a marker. A marker cut short
    by the kill holds its whole entries."""
    held = np.zeros(len(hashes), dtype=bool)
    try:
        data = sent_path(shard_dir, unit).read_bytes()
    except OSError:
        return held
    if data:
        marked = {data[i:i + 16].hex() for i in range(0, len(data), 16)}  # an entry cut short matches no hash
        held[[i for i, h in enumerate(hashes) if h in marked]] = True
    return held


def scored_with(scorer, cfg: RunConfig) -> dict:
    """The settings outside the run's identity that a unit was scored with (:attr:`UnitStats.scored_with`). The
    batch size is the one given (or auto's choice, or halved after an out-of-memory error), not as lowered to a
    short unit's rows (:func:`batch_size_for_rows`): the same command lowers the same unit the same way, so that
    is no mixing of settings to warn about."""
    from audit.models.base import device_kind

    size = getattr(scorer, "chosen_batch_size", None) if cfg.batch_size == "auto" else cfg.batch_size
    if size and getattr(scorer, "max_batch", None):
        size = min(size, scorer.max_batch)
    return {"batch_size": size or "auto", "compile": bool(getattr(scorer, "compiled", False)),
            "device": device_kind(scorer.model.device), "engine": cfg.engine}


# reasons that come as "<reason>:<detail>"
_DETAILED = ("scoring_error", "prompt_not_string", "out_of_memory", "unreadable_rows", "prompt_too_long",
             "invalid_json", "nonfinite_attention", "invalid_utf8")


def nonfinite_detail(scores: dict, u: int, own: list[str]) -> str:
    """The ``detail`` of a ``nonfinite_attention`` reject: which value of prompt ``u`` was not finite. The reason's
    name is the attention's, but a scorer's own column (``noise_magnitude``, a contributed scorer's) sets the same
    flag: ``noise_magnitude = nan (the scorer's value; the attention is finite)`` then says it was not the
    attention."""
    entropy = float(scores["attn_entropy"][u])
    for name in own:
        value = float(scores[name][u])
        if not math.isfinite(value) and math.isfinite(entropy):
            return f"{name} = {value} (the scorer's value; the attention is finite)"
    if not math.isfinite(entropy):
        return f"attn_entropy = {entropy}"
    return "attention probabilities not finite in a selected layer"


def _reason_key(reason: str) -> str:
    """The reason as rejects.parquet and the manifest both name it: ``scoring_error: <details>`` is
    ``scoring_error`` (the details go to the ``detail`` column, :func:`_reason_detail`)."""
    return reason.split(":", 1)[0] if reason.startswith(_DETAILED) else reason


def _reason_detail(reason: str) -> str | None:
    """The ``detail`` column: what follows the reason's name (``int64`` for ``prompt_not_string:int64``)."""
    if reason.startswith(_DETAILED) and ":" in reason:
        return reason.split(":", 1)[1].strip() or None
    return None
