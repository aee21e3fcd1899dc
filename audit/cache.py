"""A score cache for scheduled audits: ``memaudit run --cache DIR``.

Scores are keyed by (model fingerprint, score configuration, normalized-prompt hash). A prompt's score
depends on nothing else (its noise is seeded by the run seed and its own hash, which the score
configuration holds), so a cached score equals a fresh one bit for bit, and a nightly rerun over a
growing log scores only the prompts it has not seen.

Layout: ``DIR/<model fingerprint>-<score-config key>/`` holds ``key.json`` (what the key stands for) and
Parquet files ``part-<unit>-<random>.parquet``, one per unit that scored new prompts, written
atomically; concurrent runs and Ray actors never write the same file. A lookup streams the files
through a pyarrow dataset filtered on the unit's prompt hashes, so memory holds one record batch and
the hits, never the whole cache. At the end of a run (``finalize``) the files are merged into one when
there are more than 32 (:meth:`ScoreCache.compact`), so a nightly cache does not grow a file per unit
per night forever; one run compacts at a time (an exclusive ``flock`` on ``.compact.lock``; a run that finds
it taken leaves the compaction to the other). A part that cannot be read (a damaged file) is moved aside to
``damaged/`` with a warning, and its prompts are scored again: the cache is an optimization, never a reason
for a run to fail.

Owns the cache folder and its lookups. Must not import torch, engines or the pipeline (its columns come
from the scorer registry).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
import uuid
import warnings

import numpy as np

from audit.scorers import result_columns



def __getattr__(name):
    if name == "SCORE_COLUMNS":  # the float64 columns of a cache file, from the scorer registry
        return result_columns()
    raise AttributeError(name)


# bumped when what a cache entry holds changes for the same score configuration (2: trigger tokens spell whole
# characters; 3: noise_magnitude converted to eps for v/x0 models, per-layer attention columns), so entries
# written by an older memaudit are not mixed with new ones
CACHE_FORMAT = 4  # 4: trigger tokens carry their character span (start, end)


def cache_key(model_fingerprint: str, score_config: dict) -> str:
    """Folder name for a (model, score configuration) pair, under the current :data:`CACHE_FORMAT`."""
    keyed = {"cache_format": CACHE_FORMAT, "score_config": score_config}
    digest = hashlib.blake2b(json.dumps(keyed, sort_keys=True).encode(), digest_size=8).hexdigest()
    return f"{model_fingerprint}-{digest}"


def _schema():
    import pyarrow as pa

    from audit.tables import TRIGGER_TYPE

    return pa.schema([("prompt_hash", pa.string())] + [(c, pa.float64()) for c in result_columns()]
                     + [("trigger_tokens", TRIGGER_TYPE)])


class ScoreCache:
    """Scores already computed for one model and score configuration, under ``root``."""

    def __init__(self, root: str | Path, model_fingerprint: str, score_config: dict):
        from audit.tables import write_json_atomic

        self.dir = Path(root) / cache_key(model_fingerprint, score_config)
        self.dir.mkdir(parents=True, exist_ok=True)
        key = self.dir / "key.json"
        if not key.exists():
            write_json_atomic({"model_fingerprint": model_fingerprint, "score_config": score_config}, key)

    def files(self) -> list[Path]:
        """The cache's Parquet files (finished writes only)."""
        return sorted(self.dir.glob("part-*.parquet"))

    def lookup(self, hashes: list[str]):
        """Cached rows for ``hashes`` as a pyarrow table (one row per hash found, cache schema)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        if not hashes:
            return _schema().empty_table()
        for attempt in range(3):  # a concurrent compaction may remove files between listing and reading
            files = self.files()
            if not files:
                return _schema().empty_table()
            try:
                dataset = ds.dataset([str(f) for f in files], schema=_schema(), format="parquet")
                found = dataset.to_table(filter=pc.field("prompt_hash").isin(pa.array(hashes, pa.string())))
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
            except (pa.ArrowInvalid, OSError):  # a damaged part: moved aside, then read again without it
                if not self.quarantine_damaged() or attempt == 2:
                    raise
        if found.num_rows:
            _, first = np.unique(found.column("prompt_hash").to_numpy(zero_copy_only=False), return_index=True)
            found = found.take(pa.array(np.sort(first)))
        return found

    def put(self, hashes: list[str], scores: dict, triggers: list, tag: str = "") -> None:
        """Store freshly scored prompts (arrays indexed like ``hashes``) as one new Parquet file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from audit.tables import atomic_path

        if not hashes:
            return
        cols = {"prompt_hash": pa.array(hashes, pa.string())}
        cols |= {c: pa.array(np.asarray(scores[c], dtype=np.float64)) for c in result_columns()}
        cols["trigger_tokens"] = pa.array(triggers, _schema().field("trigger_tokens").type)
        table = pa.table(cols, schema=_schema())
        name = f"part-{tag}{'-' if tag else ''}{uuid.uuid4().hex[:12]}.parquet"
        with atomic_path(self.dir / name) as tmp:
            pq.write_table(table, tmp)

    def quarantine_damaged(self) -> list[Path]:
        """Move the parts whose Parquet footer or schema cannot be read to ``damaged/`` (kept for inspection,
        never read again), warning once per file; returns the moved files' new paths."""
        import pyarrow.parquet as pq

        moved = []
        for f in self.files():
            try:
                if not pq.ParquetFile(f).schema_arrow.equals(_schema()):
                    raise ValueError("another schema")
            except FileNotFoundError:
                continue
            except Exception as exc:  # noqa: BLE001 - any reason a part cannot be read
                target = self.dir / "damaged" / f.name
                target.parent.mkdir(exist_ok=True)
                try:
                    f.replace(target)
                except FileNotFoundError:
                    continue
                warnings.warn(f"score cache: {f} cannot be read ({type(exc).__name__}: {exc}); moved to {target}, "
                              "its prompts are scored again", RuntimeWarning, stacklevel=2)
                moved.append(target)
        return moved

    def compact(self, max_files: int = 32, batch_rows: int = 65_536, big_rows: int = 2_000_000) -> int:
        """Merge the small Parquet files into one when there are more than ``max_files`` (a nightly cache
        adds a file per unit per night; each lookup opens every file). Files of ``big_rows`` rows or more
        are left alone, so a night never rewrites the whole cache. Streams record batches: memory stays
        bounded. Returns the number of files merged (0 when nothing was done, or when another run holds the
        compaction lock)."""
        import fcntl

        import pyarrow.parquet as pq

        from audit.tables import atomic_path

        with open(self.dir / ".compact.lock", "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another run is compacting these files
            self.quarantine_damaged()
            files = []
            for f in self.files():
                try:
                    if pq.ParquetFile(f).metadata.num_rows < big_rows:
                        files.append(f)
                except FileNotFoundError:  # moved aside by a lookup that found it damaged
                    continue
            if len(files) <= max_files:
                return 0
            name = f"part-compact-{uuid.uuid4().hex[:12]}.parquet"
            with atomic_path(self.dir / name) as tmp, pq.ParquetWriter(tmp, _schema()) as writer:
                for f in files:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                        writer.write_batch(batch)
            for f in files:
                f.unlink(missing_ok=True)
            return len(files)


def open_cache(root: str | Path | None, scorer) -> ScoreCache | None:
    """The cache of ``scorer``'s model and score configuration under ``root`` (None without ``--cache``)."""
    if not root:
        return None
    sc = scorer.config.to_dict() | {"first_timestep": scorer.first_timestep}
    return ScoreCache(root, scorer.model.fingerprint, sc)


def cached_scores(cache: ScoreCache, prompts: list[str], hashes: list[str], score_fn, progress=None, tag: str = ""):
    """Like :func:`audit.pipeline.score_prompts`, reading known prompts from ``cache``.

    ``score_fn(prompts)`` scores the misses and returns ``(scores, triggers, errors)``. Newly scored
    prompts without errors are added to the cache. Returns ``(scores, triggers, errors, hits)``.
    """
    n = len(prompts)
    found = cache.lookup(hashes)
    pos = {h: i for i, h in enumerate(hashes)}
    hit_idx = np.asarray([pos[h] for h in found.column("prompt_hash").to_pylist()], dtype=np.int64)
    is_hit = np.zeros(n, dtype=bool)
    is_hit[hit_idx] = True
    miss_idx = np.flatnonzero(~is_hit)
    scores = {c: np.zeros(n, dtype=np.float64) for c in result_columns()}
    triggers: list = [None] * n
    if len(hit_idx):
        for c in result_columns():
            scores[c][hit_idx] = found.column(c).to_numpy()
        for i, trig in zip(hit_idx.tolist(), found.column("trigger_tokens").to_pylist()):
            triggers[i] = trig
        if progress:
            progress(len(hit_idx))
    errors: dict[int, str] = {}
    if len(miss_idx):
        m_scores, m_triggers, m_errors = score_fn([prompts[i] for i in miss_idx])
        for c in result_columns():
            scores[c][miss_idx] = m_scores[c]
        for j, i in enumerate(miss_idx.tolist()):
            triggers[i] = m_triggers[j]
        errors = {int(miss_idx[j]): reason for j, reason in m_errors.items()}
        ok = [j for j in range(len(miss_idx)) if j not in m_errors]
        cache.put([hashes[miss_idx[j]] for j in ok], {c: m_scores[c][ok] for c in result_columns()},
                  [m_triggers[j] for j in ok], tag=tag)
    return scores, triggers, errors, int(len(hit_idx))
