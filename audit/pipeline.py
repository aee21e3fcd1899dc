"""The run: plan units, score each unit into a shard, merge shards into the ranked outputs.

What runs is separate from where it runs (the datatrove pattern): :func:`process_unit` reads one unit,
validates and deduplicates its prompts, scores them and writes one shard atomically; an engine only
decides where units run (:mod:`audit.engines`). :func:`finalize` then merges the shards into
``risk.parquet`` (ranked), ``rejects.parquet`` and ``manifest.json``.

Run folder layout::

    run.json                 what this run is (inputs, model fingerprint, score config); a rerun must match
    shards/unit-000042.*     per unit: risk and rejects shards, then .done.json (the commit point)
    risk.parquet rejects.parquet manifest.json
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, asdict, replace
import datetime as dt
import heapq
import json
from pathlib import Path
import platform
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit import __version__
from audit.errors import RunError
from audit.sources import Plan, Unit, discover, file_version, normalize_prompt, plan_units, read_unit
from audit.tables import (TRIGGER_TYPE, arrow_schema, atomic_path, check_manifest, write_json_atomic,
                          write_parquet_atomic)

SCHEMA_VERSION = 1
SHARD_ROW_GROUP_ROWS = 2048  # finalize's merge decodes about one row group per shard: memory ~ shards x this



@dataclass(frozen=True)
class RunConfig:
    """All options of ``memaudit run`` (CLI flags or a TOML file build one)."""

    inputs: tuple[str, ...]
    model: str | None = None
    out: str | None = None
    prompt_column: str = "prompt"
    id_column: str | None = None
    batch_size: int | str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    layers: tuple[str, ...] | None = None
    noise_draws: int = 1
    seed: int = 0
    limit: int | None = None
    scorer: str = "attention_entropy"
    unit_rows: int = 20_000
    keep_columns: tuple[str, ...] = ()
    skip_bad_files: bool = False
    engine: str = "local"
    workers: int | None = None
    address: str | None = None
    stall_timeout: float | None = 900.0  # seconds without progress before the run fails; None/0: never
    calibration: str | None = None  # calibration.json from `memaudit calibrate`: adds flagged, risk_percentile
    fail_on_flagged: int | None = None  # exit non-zero when more prompts than this are flagged (after writing)
    cache: str | None = None  # score cache folder (audit.cache): prompts seen before are not scored again
    compile: bool = False  # torch.compile the text encoder and UNet (not part of the run identity)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


@dataclass
class UnitStats:
    """What one unit did: rows read, scored, rejected by reason, and unique prompts scored."""

    unit: int
    rows_read: int = 0
    scored: int = 0
    rejected_by_reason: dict = field(default_factory=dict)
    unique_scored: int = 0
    wall_s: float = 0.0
    cache_hits: int = 0  # unique prompts whose scores came from --cache


def default_out_dir() -> Path:
    """``./memaudit-runs/<UTC time stamp>``."""
    return Path("memaudit-runs") / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def apply_limit(plan: Plan, limit: int | None) -> Plan:
    """Keep only the first ``limit`` rows of the plan (in input order)."""
    if limit is None:
        return plan
    units, left = [], limit
    for u in plan.units:
        if left <= 0:
            break
        units.append(replace(u, stop=u.start + min(u.rows, left)) if u.rows > left else u)
        left -= units[-1].rows
    return replace(plan, units=units)


def _shard_paths(shard_dir: Path, unit: Unit) -> tuple[Path, Path, Path]:
    stem = shard_dir / f"unit-{unit.index:06d}"
    return Path(f"{stem}.risk.parquet"), Path(f"{stem}.rejects.parquet"), Path(f"{stem}.done.json")


def unit_done(shard_dir: Path, unit: Unit) -> bool:
    """True when the unit's shard was committed (its ``.done.json`` exists)."""
    return _shard_paths(shard_dir, unit)[2].exists()


@dataclass
class _Prepared:
    """Rows of one unit after validation: scored candidates and rejects."""

    ids: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    prompts: list = field(default_factory=list)  # normalized
    extras: dict = field(default_factory=dict)
    rej_ids: list = field(default_factory=list)
    rej_rows: list = field(default_factory=list)
    rej_reasons: list = field(default_factory=list)
    rej_prompts: list = field(default_factory=list)
    rej_extras: dict = field(default_factory=dict)
    rows_read: int = 0


def prepare_unit(unit: Unit, cfg: RunConfig) -> _Prepared:
    """Read a unit and sort its rows into prompts to score and rejects with a reason."""
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
                else:
                    text = normalize_prompt(raw)
                    if not text:
                        reason = "empty_prompt"
            if reason is None:
                prep.ids.append(pid)
                prep.rows.append(row)
                prep.prompts.append(text)
                for c in cfg.keep_columns:
                    prep.extras[c].append(batch.extras[c][i])
            else:
                prep.rej_ids.append(pid)
                prep.rej_rows.append(row)
                prep.rej_reasons.append(reason)
                prep.rej_prompts.append(raw if isinstance(raw, str) else None)
                for c in cfg.keep_columns:
                    prep.rej_extras[c].append(batch.extras[c][i])
    return prep


def score_prompts(scorer, prompts: list[str], batch_size: int | str,
                  progress: Callable[[int], None] | None = None) -> tuple[dict, list, dict]:
    """Score unique normalized prompts in batches.

    Returns ``(scores, trigger_tokens, errors)``: arrays indexed like ``prompts``; ``errors`` maps an
    index to a reason for prompts that could not be scored (a batch that raises is retried prompt by
    prompt, so one bad prompt never fails the others). An out-of-memory error halves the batch size and
    retries the same prompts. An incomplete capture is not caught: it means the scorer is broken, and the
    run fails loudly.

    The host-side work of the next batch (tokenization, seeded noise: :meth:`Scorer.prepare`) runs in a
    background thread while the device scores the current one, so the accelerator does not wait on it.
    """
    from concurrent.futures import ThreadPoolExecutor

    from audit.errors import IncompleteCaptureError
    from audit.scorers import result_columns

    n = len(prompts)
    cols = result_columns()
    out = {c: np.zeros(n, dtype=np.float64) for c in cols}
    triggers: list = [None] * n
    errors: dict[int, str] = {}

    def prepare(idx: list[int], pad_to: int):
        batch = [prompts[i] for i in idx]
        # a short batch is padded to the full batch size: the kernels then always see one shape, so a
        # prompt's score is bit-identical whatever its batch-mates (float32 kernels round differently for
        # other batch shapes, ~1e-9); cached and freshly scored prompts then agree exactly (audit.cache)
        batch += [batch[-1]] * max(0, pad_to - len(batch))
        return scorer.prepare(batch)

    def run(idx: list[int], prepared) -> None:
        k = len(idx)
        res = scorer.collect(prepared, scorer.launch(prepared))
        trig = scorer.trigger_tokens(prepared.tokens.input_ids[:k], res["token_mass"][:k], prepared.tokens.n_kept[:k])
        for c in cols:
            out[c][idx] = res[c][:k]
        for j, i in enumerate(idx):
            triggers[i] = trig[j]

    if batch_size == "auto":
        batch_size = scorer.auto_batch_size()
    pos = 0
    ahead = None  # ((pos, size), future) of the batch being prepared in the background
    with ThreadPoolExecutor(1, thread_name_prefix="memaudit-prepare") as pool:
        while pos < n:
            # the scorer remembers a batch size that ran out of memory, for every later unit too
            size = min(batch_size, getattr(scorer, "max_batch", batch_size) or batch_size)
            idx = list(range(pos, min(pos + size, n)))
            future = ahead[1] if ahead is not None and ahead[0] == (pos, size) else pool.submit(prepare, idx, size)
            nxt = idx[-1] + 1
            ahead = ((nxt, size), pool.submit(prepare, list(range(nxt, min(nxt + size, n))), size)) if nxt < n else None
            try:
                run(idx, future.result())
            except IncompleteCaptureError:
                raise
            except Exception as exc:
                if is_out_of_memory(exc) and len(idx) > 1:
                    scorer.max_batch = max(1, len(idx) // 2)  # halve and retry the same prompts
                    free_accelerator_memory()
                    continue
                for i in idx:
                    try:
                        run([i], pool.submit(prepare, [i], 1).result())
                    except IncompleteCaptureError:
                        raise
                    except Exception as exc1:  # one prompt's failure becomes its reject reason
                        reason = "out_of_memory" if is_out_of_memory(exc1) else "scoring_error"
                        errors[i] = f"{reason}: {type(exc1).__name__}: {str(exc1)[:200]}"
            pos += len(idx)
            if progress:
                progress(len(idx))
    return out, triggers, errors


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


def process_unit(unit: Unit, scorer, cfg: RunConfig, shard_dir: Path,
                 progress: Callable[[int], None] | None = None, prepared: "_Prepared | None" = None) -> UnitStats:
    """Read, score and write one unit as a shard; idempotent (a rerun rewrites the same shard).

    Prompts equal after normalization are scored once per unit; every row gets its prompt's score.
    ``progress(n)`` is called with input rows done; ``prepared`` is the unit already read by
    :func:`prepare_unit` (engines read the next unit while the model scores this one).
    """
    t_start = time.perf_counter()
    prep = prepared if prepared is not None else prepare_unit(unit, cfg)
    unique: dict[str, int] = {}
    inverse = np.fromiter((unique.setdefault(p, len(unique)) for p in prep.prompts), dtype=np.int64,
                          count=len(prep.prompts))
    uniq_prompts = list(unique)
    n_rejected_before = len(prep.rej_ids)
    if progress and n_rejected_before:
        progress(n_rejected_before)
    rows_per_prompt = len(prep.prompts) / max(len(uniq_prompts), 1)
    reported = [0.0, 0]

    def on_batch(k: int) -> None:  # unique prompts done -> input rows done
        reported[0] += k * rows_per_prompt
        step = int(round(reported[0])) - reported[1]
        reported[1] += step
        if progress and step:
            progress(step)

    from audit.scorers import prompt_hash, score_columns

    hashes = [prompt_hash(p) for p in uniq_prompts]
    cache_hits = 0
    if cfg.cache:
        from audit.cache import cached_scores, open_cache

        scores, triggers, errors, cache_hits = cached_scores(
            open_cache(cfg.cache, scorer), uniq_prompts, hashes,
            lambda ps: score_prompts(scorer, ps, cfg.batch_size, progress=on_batch), progress=on_batch,
            tag=f"u{unit.index:06d}")
    else:
        scores, triggers, errors = score_prompts(scorer, uniq_prompts, cfg.batch_size, progress=on_batch)
    keep = []
    for r, u in enumerate(inverse):
        reason = errors.get(int(u))
        if reason is None and scores["nonfinite"][u]:
            reason = "nonfinite_attention"
        if reason is None:
            keep.append(r)
        else:
            prep.rej_ids.append(prep.ids[r])
            prep.rej_rows.append(prep.rows[r])
            prep.rej_reasons.append(reason)
            prep.rej_prompts.append(prep.prompts[r])
            for c in cfg.keep_columns:
                prep.rej_extras[c].append(prep.extras[c][r])
    keep_arr = np.asarray(keep, dtype=np.int64)
    u_idx = inverse[keep_arr] if len(keep) else np.zeros(0, dtype=np.int64)
    risk_cols = {
        "rank": pa.array(np.zeros(len(keep), dtype=np.int64)),
        "prompt_id": pa.array([prep.ids[r] for r in keep], pa.string()),
        "prompt": pa.array([prep.prompts[r] for r in keep], pa.string()),
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
        "reason": pa.array(prep.rej_reasons, pa.string()),
        "prompt": pa.array(prep.rej_prompts, pa.string()),
    }
    for c in cfg.keep_columns:
        rej_cols.setdefault(c, pa.array(prep.rej_extras[c], pa.string()))
    rejects = pa.table(rej_cols, schema=arrow_schema("rejects", cfg.keep_columns))
    risk_path, rej_path, done_path = _shard_paths(shard_dir, unit)
    write_parquet_atomic(risk, risk_path, "risk", cfg.keep_columns, row_group_size=SHARD_ROW_GROUP_ROWS)
    write_parquet_atomic(rejects, rej_path, "rejects", cfg.keep_columns)
    stats = UnitStats(unit.index, prep.rows_read, risk.num_rows, dict(Counter(_reason_key(r) for r in prep.rej_reasons)),
                      len(uniq_prompts), time.perf_counter() - t_start, cache_hits)
    if stats.rows_read != stats.scored + sum(stats.rejected_by_reason.values()):
        raise RunError(f"unit {unit.index} lost rows: read {stats.rows_read}, scored {stats.scored}, "
                       f"rejected {sum(stats.rejected_by_reason.values())}")
    write_json_atomic({"unit": unit.to_dict(), "stats": asdict(stats)}, done_path)
    return stats


def _reason_key(reason: str) -> str:
    """Group reasons for counting: ``scoring_error: <details>`` counts as ``scoring_error``."""
    return reason.split(":", 1)[0] if reason.startswith(("scoring_error", "prompt_not_string", "out_of_memory")) else reason


# ---------------------------------------------------------------- merging shards

class _ShardCursor:
    """Streams one risk shard (sorted by risk desc, prompt_id asc) in record batches."""

    def __init__(self, path: Path, batch_rows: int):
        self.batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
        self.pending: list[pa.RecordBatch] = []  # batches holding rows not yet emitted
        self.emitted = 0  # rows of pending[0] already emitted
        self.keys: list[tuple] = []
        self.pos = 0

    def next_key(self):
        if self.pos >= len(self.keys):
            try:
                rb = next(self.batches)
            except StopIteration:
                return None
            self.pending.append(rb)
            self.keys = list(zip((-r for r in rb.column("risk").to_numpy()), rb.column("prompt_id").to_pylist()))
            self.pos = 0
            if not self.keys:
                return self.next_key()
        key = self.keys[self.pos]
        self.pos += 1
        return key

    def take(self, n: int) -> pa.Table:
        """The next ``n`` rows not yet emitted (they were all reached by :meth:`next_key`)."""
        parts, left = [], n
        while left:
            rb = self.pending[0]
            avail = rb.num_rows - self.emitted
            k = min(avail, left)
            parts.append(rb.slice(self.emitted, k))
            self.emitted += k
            left -= k
            if self.emitted == rb.num_rows:
                self.pending.pop(0)
                self.emitted = 0
        return pa.Table.from_batches(parts)


def merge_ranked(shards: list[Path], out: Path, schema: pa.Schema, chunk_rows: int = 65_536,
                 chunk_fn: Callable[[pa.Table], pa.Table] | None = None,
                 row_group_rows: int | None = None) -> tuple[int, np.ndarray]:
    """K-way merge of sorted risk shards into one ranked Parquet file, in bounded memory.

    ``chunk_fn`` transforms each ranked output chunk before it is written (calibrated flags).

    Memory holds one record batch per shard plus one output chunk, whatever the number of rows
    (:func:`reduce_shards` bounds the number of shards).
    Returns ``(rows written, uint64 prefixes of the prompt hashes)`` for counting unique prompts.
    """
    cursors = [_ShardCursor(p, SHARD_ROW_GROUP_ROWS) for p in shards]
    heap = []
    for s, c in enumerate(cursors):
        k = c.next_key()
        if k is not None:
            heap.append((k, s))
    heapq.heapify(heap)
    rank = 0
    hash_parts = []
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        while heap:
            order = []
            while heap and len(order) < chunk_rows:
                key, s = heap[0]
                order.append(s)
                nk = cursors[s].next_key()
                if nk is None:
                    heapq.heappop(heap)
                else:
                    heapq.heapreplace(heap, (nk, s))
            seq = np.asarray(order, dtype=np.int64)
            shard_ids, counts = np.unique(seq, return_counts=True)
            tables, offsets = [], {}
            base = 0
            for s, n in zip(shard_ids.tolist(), counts.tolist()):
                offsets[s] = base
                tables.append(cursors[s].take(n))
                base += n
            chunk = pa.concat_tables(tables)
            # position of each merged row in `chunk`: its shard's offset + how many of that shard came before
            within = np.empty(len(seq), dtype=np.int64)
            for s in shard_ids.tolist():
                mask = seq == s
                within[mask] = offsets[s] + np.arange(mask.sum())
            chunk = chunk.take(pa.array(within))
            ranks = pa.array(np.arange(rank + 1, rank + 1 + chunk.num_rows, dtype=np.int64))
            chunk = chunk.set_column(0, "rank", ranks)
            if chunk_fn is not None:
                chunk = chunk_fn(chunk)
            rank += chunk.num_rows
            hash_parts.append(np.frombuffer(bytes.fromhex("".join(h[:16] for h in chunk.column("prompt_hash").to_pylist())),
                                            dtype=">u8").astype(np.uint64) if chunk.num_rows else np.zeros(0, np.uint64))
            writer.write_table(chunk.cast(schema), row_group_size=row_group_rows)
    return rank, np.concatenate(hash_parts) if hash_parts else np.zeros(0, np.uint64)


MERGE_FAN_IN = 8  # shards merged at once: finalize's memory ~ MERGE_FAN_IN x one row group, whatever the input


def reduce_shards(shards: list[Path], work: Path, schema: pa.Schema, fan_in: int = MERGE_FAN_IN) -> list[Path]:
    """Merge sorted shards in groups of ``fan_in`` into sorted intermediate files until at most ``fan_in``
    remain (a multi-pass external merge sort), so the final merge opens a bounded number of files.

    Intermediate files live in ``work`` (rewritten on every finalize; the shards stay untouched).
    """
    level = 0
    while len(shards) > fan_in:
        level_dir = work / f"level-{level}"
        level_dir.mkdir(parents=True, exist_ok=True)
        merged = []
        for g in range(0, len(shards), fan_in):
            path = level_dir / f"part-{g // fan_in:06d}.parquet"
            merge_ranked(shards[g:g + fan_in], path, schema, row_group_rows=SHARD_ROW_GROUP_ROWS)
            merged.append(path)
        shards, level = merged, level + 1
    return shards


def concat_shards(shards: list[Path], out: Path, schema: pa.Schema) -> int:
    """Concatenate reject shards, streaming, into one Parquet file; returns rows written."""
    n = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for p in shards:
            for rb in pq.ParquetFile(p).iter_batches(batch_size=65_536):
                writer.write_batch(rb)
                n += rb.num_rows
        if n == 0:
            writer.write_table(schema.empty_table())
    return n


# ---------------------------------------------------------------- the run

def run_identity(cfg: RunConfig, plan: Plan, model_info: dict, score_config: dict) -> dict:
    """What must match for a rerun on the same folder to resume rather than be refused."""
    return {
        "schema_version": SCHEMA_VERSION,
        "inputs": list(cfg.inputs),
        "files": {f.url: file_version(f.url) for f in plan.files},  # a changed input is refused, not skipped
        "units": len(plan.units),
        "prompt_column": cfg.prompt_column,
        "id_column": cfg.id_column,
        "keep_columns": list(cfg.keep_columns),
        "limit": cfg.limit,
        "unit_rows": cfg.unit_rows,
        "model_fingerprint": model_info["fingerprint"],
        "score_config": score_config,
    }


def prepare_out_dir(out: Path, identity: dict) -> Path:
    """Create the run folder, or check that an existing one is the same run.

    Raises:
        RunError: the folder holds a different run (other inputs, model or score configuration).
    """
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    ident_path = out / "run.json"
    if ident_path.exists():
        old = json.loads(ident_path.read_text())
        if old != identity:
            a, b = _flatten(old), _flatten(identity)
            diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            raise RunError(f"{out} holds a different run (differs in {'; '.join(diff)}); "
                           "choose another --out, or rerun the original command to resume it")
    else:
        write_json_atomic(identity, ident_path)
    return shard_dir


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def package_versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "memaudit": __version__}
    for pkg in ("torch", "diffusers", "transformers", "pyarrow", "polars", "ray"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return versions


def finalize(out: Path, shard_dir: Path, plan: Plan, cfg: RunConfig, model_info: dict, score_config: dict,
             started: float, started_at: str, extra_manifest: dict | None = None,
             calibration: dict | None = None) -> dict:
    """Merge shards into ``risk.parquet``/``rejects.parquet`` and write ``manifest.json``; returns the manifest.

    With ``calibration`` (:func:`audit.calibrate.load_calibration`, already checked against the model and
    score configuration) the ``flagged`` and ``risk_percentile`` columns are filled and counted; without
    it they stay null and ``counts.flagged`` is null.
    """
    stats = []
    for u in plan.units:
        done = _shard_paths(shard_dir, u)[2]
        if not done.exists():
            raise RunError(f"unit {u.index} ({u.url} rows {u.start}-{u.stop}) has no finished shard")
        stats.append(json.loads(done.read_text())["stats"])
    meta = {"memaudit.model": model_info, "memaudit.score_config": score_config, "memaudit.version": __version__}
    chunk_fn, n_flagged = None, [0]
    if calibration is not None:
        from audit.calibrate import apply_calibration, calibration_summary

        meta["memaudit.calibration"] = calibration_summary(calibration)

        def chunk_fn(chunk: pa.Table) -> pa.Table:
            chunk = apply_calibration(chunk, calibration)
            n_flagged[0] += int(chunk.column("flagged").to_numpy(zero_copy_only=False).sum())
            return chunk
    risk_schema = arrow_schema("risk", cfg.keep_columns, meta)
    risk_shards = reduce_shards([_shard_paths(shard_dir, u)[0] for u in plan.units], shard_dir / "merge", risk_schema)
    n_scored, hashes = merge_ranked(risk_shards, out / "risk.parquet",
                                    risk_schema, chunk_fn=chunk_fn)
    n_rej = concat_shards([_shard_paths(shard_dir, u)[1] for u in plan.units], out / "rejects.parquet",
                          arrow_schema("rejects", cfg.keep_columns, meta))
    by_reason: Counter = Counter()
    for s in stats:
        by_reason.update(s["rejected_by_reason"])
    rows_read = sum(s["rows_read"] for s in stats)
    unique = int(len(np.unique(hashes)))
    duplicate_ids = None
    if cfg.id_column:  # ids are meant to join results back: rows that share one are counted, not dropped
        import polars as pl

        duplicate_ids = int(pl.scan_parquet(out / "risk.parquet", glob=False)
                            .select(pl.col("prompt_id").is_duplicated().sum()).collect().item())
    wall = time.perf_counter() - started
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "memaudit_version": __version__,
        "inputs": list(cfg.inputs),
        "files": [{"path": f.url, "format": f.fmt, "rows": plan.file_rows.get(f.url)} for f in plan.files],
        "skipped_files": plan.skipped,
        "counts": {
            "rows_read": rows_read,
            "scored": n_scored,
            "rejected": n_rej,
            "rejected_by_reason": dict(sorted(by_reason.items())),
            "unique_prompts": unique,
            "duplicates": n_scored - unique,
            "flagged": n_flagged[0] if calibration is not None else None,
            "duplicate_ids": duplicate_ids,  # scored rows whose --id-column value another scored row has
        },
        "units": {"total": len(plan.units)},
        "model": model_info,
        "score_config": score_config,
        "run_config": cfg.to_dict(),
        "versions": package_versions(),
        "started_at": started_at,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(wall, 3),
        "throughput_rows_per_s": round(rows_read / wall, 2) if wall > 0 else 0.0,
    }
    if calibration is not None:
        manifest["calibration"] = meta["memaudit.calibration"]
    if cfg.cache:
        hits = sum(s.get("cache_hits", 0) for s in stats)
        manifest["cache"] = {"dir": str(cfg.cache), "hits": hits,
                             "scored": sum(s.get("unique_scored", 0) for s in stats) - hits}
        from audit.cache import ScoreCache

        manifest["cache"]["compacted_files"] = ScoreCache(cfg.cache, model_info["fingerprint"], score_config).compact()
    if extra_manifest:
        manifest.update(extra_manifest)
    check_manifest(manifest)
    write_json_atomic(manifest, out / "manifest.json")
    return manifest


def build_plan(cfg: RunConfig) -> Plan:
    """Discover inputs and cut them into units (honouring ``--limit``)."""
    files, skipped = discover(list(cfg.inputs))
    plan = plan_units(files, cfg.prompt_column, cfg.unit_rows, cfg.skip_bad_files, cfg.id_column, cfg.keep_columns)
    plan.skipped = skipped + plan.skipped
    return apply_limit(plan, cfg.limit)
