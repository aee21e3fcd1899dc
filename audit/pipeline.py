"""The run's outputs: plan units, check or create the run folder, merge the unit shards into the ranked outputs.

What runs is separate from where it runs (the datatrove pattern): :func:`audit.unit.process_units` turns a
group of units into a shard each; an engine only decides where groups run (:mod:`audit.engines`). :func:`finalize` then
merges the shards into ``risk.parquet`` (ranked, an external k-way merge in bounded memory),
``rejects.parquet`` and ``manifest.json``. Owns the plan, the run identity (``run.json``), the merge and the
manifest. Must not import torch, the scorers, the engines or the driver (:mod:`audit.runner`).

Run folder layout::

    run.json                 what this run is (inputs, model fingerprint, score config); a rerun must match
                             (its group_rows, how units were grouped, is kept by every rerun, not compared)
    shards/unit-000042.*     per unit: risk and rejects shards, then .done.json (the commit point)
    risk.parquet rejects.parquet manifest.json
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import replace
import contextlib
import datetime as dt
import errno
from functools import lru_cache
import heapq
import json
import os
from pathlib import Path
import platform
import shutil
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit import __version__
from audit.build import memaudit_build
from audit.config import RunConfig
from audit.errors import RunError, RunFolderBusyError, SourceError
from audit.gates import gated_reasons
from audit.sources import (LOCK_NAME, RUN_FILES, SKIP_BAD_FILES_HINT, Plan, discover, file_versions, plan_units,
                           unlisted_summary)
from audit.tables import TMP_NAME, arrow_schema, atomic_path, check_manifest, write_json_atomic
from audit.unit import SHARD_ROW_GROUP_ROWS, committed_stats, shard_paths

SCHEMA_VERSION = 2  # 2: risk.prompt_raw, rejects.detail (a run folder of version 1 is refused, not mixed)



def default_out_dir(stamp: str | None = None) -> Path:
    """``./memaudit-runs/<UTC time stamp>``, or ``<time stamp>-2``, ``-3``, ... when a folder of that name exists
    already: a second run started within the same second (``audit.run`` in a loop over small tables, two scheduled
    jobs) was refused as "holds a different run", or, with the same command, handed back the first run's outputs
    as its own. ``stamp``: that time stamp instead of now's. (Two processes that pick a name at the same moment
    meet at the folder's lock, taken later: the second then takes the next free name, ``audit.runner``.)"""
    stamp = stamp or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out, n = Path("memaudit-runs") / stamp, 1
    while out.exists() or out.is_symlink():
        n += 1
        out = Path("memaudit-runs") / f"{stamp}-{n}"
    return out


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


# ---------------------------------------------------------------- merging shards

class _ShardCursor:
    """Streams one risk shard (sorted by risk desc, prompt_id asc) in record batches.

    A shard of at most ``batch_rows`` rows is read whole at once and its file closed (a cursor holds one batch of
    that size anyway); a larger one stays open and is read one batch at a time."""

    def __init__(self, path: Path, batch_rows: int):
        # pre_buffer=False: read one row group at a time (pre-buffering read the whole file ahead, so that
        # the final pass of a merge held nearly the whole table: docs/architecture.md, "The final merge")
        file = pq.ParquetFile(path, pre_buffer=False)
        self.rows = file.metadata.num_rows
        meta = file.metadata  # the decoded size of its rows, which sizes the merge's output chunks (merge_chunk_rows)
        self.nbytes = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        if self.rows <= batch_rows:  # one small decode on this thread: threads of its own cost more than it
            self.batches = iter(file.read(use_threads=False).to_batches())
            file.close()
        else:
            self.batches = file.iter_batches(batch_size=batch_rows)
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


MERGE_READ_THREADS = 8  # shards opened (and small ones read whole) at once when a merge starts


def _open_cursors(shards: list[Path], batch_rows: int) -> list[_ShardCursor]:
    """A :class:`_ShardCursor` on each of ``shards``, in their order, opened by up to :data:`MERGE_READ_THREADS`
    threads: a folder of small files gives a shard each, and one by one their opening and first read (58 columns of
    a row or two each) took 2-5 ms a shard, a third of a run over 1,000 one-prompt files (``benchmarks/
    many_files.py --stand-in``). Parquet's decoding releases the GIL."""
    if len(shards) < 2:
        return [_ShardCursor(p, batch_rows) for p in shards]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(MERGE_READ_THREADS, len(shards)), thread_name_prefix="memaudit-merge") as pool:
        return list(pool.map(lambda p: _ShardCursor(p, batch_rows), shards))


MERGE_CHUNK_ROWS = 65_536  # rows of one output chunk of a merge (and so of a row group of risk.parquet), at most
MERGE_CHUNK_BYTES = 32 << 20  # ... and about this many decoded bytes: fewer rows when the rows are wide
MERGE_CHUNK_MIN_ROWS = 64


def merge_chunk_rows(rows: int, nbytes: int, chunk_rows: int = MERGE_CHUNK_ROWS,
                     chunk_bytes: int | None = None) -> int:
    """Rows per output chunk of a merge over shards holding ``rows`` rows of ``nbytes`` decoded bytes (their
    Parquet row groups' ``total_byte_size``): ``chunk_rows``, or fewer so that a chunk holds about ``chunk_bytes``,
    but not fewer than :data:`MERGE_CHUNK_MIN_ROWS` for that reason. A chunk is held two or three times over while it is gathered, put in
    rank order and written: at 65,536 rows a run with an 8 KB ``--keep-columns`` column (a long negative prompt,
    a JSON request) peaked at 2.9 GB in its final merge, 120,000 rows; 1.4 GB (its scoring) with chunks of 32 MiB.
    ``chunk_bytes``: :data:`MERGE_CHUNK_BYTES` unless given."""
    chunk_bytes = MERGE_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if rows <= 0 or nbytes <= 0:
        return chunk_rows
    return min(chunk_rows, max(MERGE_CHUNK_MIN_ROWS, int(chunk_bytes * rows // nbytes)))


def merge_ranked(shards: list[Path], out: Path, schema: pa.Schema, chunk_rows: int = MERGE_CHUNK_ROWS,
                 chunk_fn: Callable[[pa.Table], pa.Table] | None = None,
                 row_group_rows: int | None = None) -> tuple[int, np.ndarray]:
    """K-way merge of sorted risk shards into one ranked Parquet file, in bounded memory.

    ``chunk_fn`` transforms each ranked output chunk before it is written (calibrated flags). An output chunk
    holds at most ``chunk_rows`` rows, fewer where the rows are wide (:func:`merge_chunk_rows`).

    Memory holds one record batch per shard plus one output chunk, whatever the number of rows
    (:func:`reduce_shards` bounds the shards' rows and count).
    Returns ``(rows written, uint64 prefixes of the prompt hashes)`` for counting unique prompts.

    Raises:
        audit.errors.RunError: the merge wrote another number of rows than the shards hold (nothing is
            committed), or ``out`` cannot be written (:func:`audit.tables.atomic_path`).
    """
    cursors = _open_cursors(shards, SHARD_ROW_GROUP_ROWS)
    chunk_rows = merge_chunk_rows(sum(c.rows for c in cursors), sum(c.nbytes for c in cursors), chunk_rows)
    heap = []
    for s, c in enumerate(cursors):
        k = c.next_key()
        if k is not None:
            heap.append((k, s))
    heapq.heapify(heap)
    rank = 0
    hashes = np.empty(sum(c.rows for c in cursors), np.uint64)  # filled in rank order, never copied
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
            hashes[rank:rank + chunk.num_rows] = np.frombuffer(
                bytes.fromhex("".join(h[:16] for h in chunk.column("prompt_hash").to_pylist())), dtype=">u8")
            rank += chunk.num_rows
            writer.write_table(chunk.cast(schema), row_group_size=row_group_rows)
        if rank != len(hashes):  # before the file is committed
            raise RunError(f"merging {len(shards)} shards wrote {rank} rows of the {len(hashes)} they hold")
    return rank, hashes


MERGE_FAN_IN = 8  # full shards merged at once: finalize's memory ~ MERGE_FAN_IN x one row group, whatever the input
MERGE_MAX_FILES = 256  # files open at once in one merge, however small (a folder of small files: a shard each)
MERGE_SPARE_FILES = 32  # descriptors left free beside a merge's shards (its output, the lock, libraries' own)


def merge_max_files(limit: int = MERGE_MAX_FILES) -> int:
    """How many shards one merge may hold open: ``limit``, or fewer where the process's open-file limit (``ulimit
    -n``: 256 by default on macOS, set low by some schedulers and containers) leaves less room beside the
    descriptors it already holds and :data:`MERGE_SPARE_FILES`. At ``ulimit -n 256`` the final merge of a run
    over 300 one-prompt files failed with "Too many open files" (exit 1), and so did every rerun. At least 2."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # pragma: no cover - no resource module (Windows)
        return limit
    if soft == resource.RLIM_INFINITY:
        return limit
    try:
        held = len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - no /proc (macOS): a process's usual count after loading a model
        held = 64
    return max(2, min(limit, soft - held - MERGE_SPARE_FILES))


def _merge_groups(rows: list[int], fan_in: int, batch_rows: int, max_files: int) -> list[tuple[int, int]]:
    """Cut consecutive shards of ``rows`` rows into ``[start, stop)`` groups that one merge holds in memory together:
    each shard's cursor holds at most ``batch_rows`` of its rows, so a group's ``min(rows, batch_rows)`` (an empty
    shard counts 1) sum to at most ``fan_in * batch_rows``, with at most ``max_files`` shards of more than
    ``batch_rows`` rows, the ones a merge keeps open (:class:`_ShardCursor` reads a smaller one whole and closes it).
    A shard alone always forms a group."""
    groups, start, held, open_files = [], 0, 0, 0
    for i, n in enumerate(rows):
        w = max(1, min(n, batch_rows))
        opens = n > batch_rows
        if i > start and (held + w > fan_in * batch_rows or (opens and open_files >= max_files)):
            groups.append((start, i))
            start, held, open_files = i, 0, 0
        held += w
        open_files += opens
    if start < len(rows):
        groups.append((start, len(rows)))
    return groups


def reduce_shards(shards: list[Path], work: Path, schema: pa.Schema, fan_in: int = MERGE_FAN_IN,
                  batch_rows: int = SHARD_ROW_GROUP_ROWS, max_files: int | None = None,
                  rows: list[int] | None = None) -> list[Path]:
    """Merge sorted shards, consecutive ones together, into sorted intermediate files until the remaining ones fit
    one merge (a multi-pass external merge sort), so the final merge holds a bounded number of rows and files.

    A merge holds about ``batch_rows`` rows of each shard it reads (one row group), so it takes ``fan_in`` full
    shards, or more small ones, as many as hold ``fan_in * batch_rows`` rows in all, up to ``max_files``
    (:func:`_merge_groups`): a folder of 2,000 one-prompt files, a shard each, took 286 merges in groups of 8 (each
    an intermediate file written and flushed to disk), then 8 of 256 and one, now one (a shard of at most
    ``batch_rows`` rows is read whole and closed, so only larger ones count toward ``max_files``). Consecutive shards keep ties in shard
    order whatever the grouping, so the result does not depend on it.

    ``rows``: each shard's rows where the caller knows them (finalize: the units' commit markers), which only decide
    the grouping (each merge reads its shards' footers and checks the rows it writes); else read from the footers.

    Intermediate files live in ``work`` (rewritten on every finalize; the shards stay untouched). ``max_files``
    defaults to :func:`merge_max_files` (:data:`MERGE_MAX_FILES`, or fewer under a low open-file limit).
    """
    if max_files is None:
        max_files = merge_max_files()
    level = 0
    if rows is None or len(rows) != len(shards):  # then each intermediate's, as its merge counts them
        rows = [pq.read_metadata(p).num_rows for p in shards]
    while len(groups := _merge_groups(rows, fan_in, batch_rows, max_files)) > 1:
        level_dir = work / f"level-{level}"
        level_dir.mkdir(parents=True, exist_ok=True)
        merged, counts = [], []
        for g, (a, b) in enumerate(groups):
            path = level_dir / f"part-{g:06d}.parquet"
            counts.append(merge_ranked(shards[a:b], path, schema, row_group_rows=batch_rows)[0])
            merged.append(path)
        shards, rows, level = merged, counts, level + 1
    return shards


def concat_shards(shards: list[Path], out: Path, schema: pa.Schema) -> int:
    """Concatenate reject shards, streaming, into one Parquet file; returns rows written.

    Raises:
        RunError: a shard is gone (removed while the run merged: a rerun scores its unit again); ``out`` is then
            not written.
    """
    n = 0
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for p in shards:
            try:
                shard = pq.ParquetFile(p)
            except FileNotFoundError:  # a raw "[Errno 2]" named no unit and no way on
                raise RunError(f"{p} is gone: a unit's rejects shard was removed while the run merged its outputs; "
                               "rerun the same command to score that unit again") from None
            for rb in shard.iter_batches(batch_size=65_536):
                writer.write_batch(rb)
                n += rb.num_rows
        if n == 0:
            writer.write_table(schema.empty_table())
    return n


# ---------------------------------------------------------------- the run

def _listed_versions(plan: Plan) -> dict:
    """:func:`audit.sources.file_version` of each planned input file.

    Raises:
        SourceError: a file listed and planned a moment ago is gone (a writer replacing the folder, as a Spark
            overwrite does): said as such, not as a bare ``[Errno 2] No such file or directory``.
    """
    from audit.errors import SourceError

    versions = {}
    for f, version in zip(plan.files, file_versions([f.url for f in plan.files])):
        if isinstance(version, FileNotFoundError):
            raise SourceError(f"{f.url}: the input file is gone: it was listed when the run began and removed before "
                              "the run started reading (a writer replacing the folder, as a Spark overwrite does?); "
                              "rerun once the inputs are complete") from None
        if isinstance(version, OSError):
            raise version
        versions[f.url] = version
    return versions


def run_config_paths(cfg: RunConfig, out) -> dict:
    """``run_config``'s folder and file paths made absolute (``os.path.abspath``, against the working folder of the
    invocation that writes the manifest; a link is kept as named): ``out`` (the run folder), ``cache`` (its
    :func:`audit.cache.cache_dir`) and ``calibration``, None for an option not given. ``run_config`` keeps them as
    typed (relative ``r32a``, ``cache``), which name nothing to a reader in another folder; it is not part of the
    run's identity (:func:`run_identity`), so a folder whose manifest lacks this section resumes as before."""
    from audit.cache import cache_dir

    def absolute(path) -> str | None:  # (a URL, were one given, is kept as it is)
        if path is None:
            return None
        text = os.fspath(path)
        return text if "://" in text else os.path.abspath(text)

    return {"out": absolute(out), "cache": absolute(cache_dir(cfg.cache)) if cfg.cache else None,
            "calibration": absolute(cfg.calibration) if cfg.calibration else None}


def run_identity(cfg: RunConfig, plan: Plan, model_info: dict, score_config: dict) -> dict:
    """What must match for a rerun on the same folder to resume rather than be refused."""
    return {
        "schema_version": SCHEMA_VERSION,
        "inputs": list(cfg.inputs),
        "files": _listed_versions(plan),  # a changed input is refused, not skipped
        "units": len(plan.units),
        # one name as a string (as every run folder recorded it), several as a list (as run.json reads back)
        "prompt_column": cfg.prompt_column if isinstance(cfg.prompt_column, str) else list(cfg.prompt_column),
        "id_column": cfg.id_column,
        "keep_columns": list(cfg.keep_columns),
        "limit": cfg.limit,
        "unit_rows": cfg.unit_rows,
        "model_fingerprint": model_info["fingerprint"],
        "score_config": score_config,
    }


def check_out_dir(out: Path, identity_file: str = "run.json",
                  owned: tuple[str, ...] = RUN_FILES) -> tuple[dict | None, list[str]]:
    """Check ``--out`` before any work: a file, a folder whose identity file is damaged, or a folder that holds
    some of the files a command writes but not its identity file (it would overwrite them) is refused.

    Args:
        out: the output folder (it may not exist yet).
        identity_file: the file that marks a folder as this command's (``run.json``; ``generate.json``).
        owned: every name the command writes in ``out``, ``identity_file`` included.

    Returns:
        ``(identity, others)``: the identity document the folder holds (None when it holds none), and the other
        entries of a folder without one (names, sorted; dotfiles left out), which the command writes beside
        (:func:`beside_note`).

    Raises:
        RunError: one line naming the folder and the problem (its name not UTF-8 text, which the tables' writer
            cannot open, among them).

    An empty folder of ``owned`` is not a clash: the command stopped after making it, before its identity file.
    """
    out = Path(out)
    from audit.sources import name_not_utf8, locale_hint

    if (shown := name_not_utf8(str(out))) is not None:  # pyarrow writes to UTF-8 paths: every shard would fail
        raise RunError(f"--out {shown}: its name is not UTF-8 text{locale_hint()}; choose another --out")
    if not out.exists():
        return None, []
    if not out.is_dir():
        raise RunError(f"--out {out}: is a file, not a folder")
    ident = out / identity_file
    if ident.exists():
        try:
            identity = json.loads(ident.read_bytes().decode("utf-8"))
            if not isinstance(identity, dict):
                raise ValueError("not a JSON object")
            if not isinstance(identity.get("files", {}), dict):  # compared file by file with a rerun's
                raise ValueError(f"files is a {type(identity['files']).__name__}, not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise RunError(f"--out {out}: its {identity_file} is damaged ({type(exc).__name__}: {str(exc)[:200]}); "
                           "choose another --out, or delete the folder to start over") from None
        return identity, []
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    empty_dir = lambda n: (out / n).is_dir() and not any((out / n).iterdir())  # noqa: E731 - made, then stopped
    if clash := [n for n in names if n in owned and not empty_dir(n)]:
        raise RunError(f"--out {out}: holds {', '.join(clash)} but no {identity_file}, so it is not a folder this "
                       "command made; choose another --out (nothing was overwritten)")
    return None, names


def beside_note(out: Path, others: list[str], what: str) -> str | None:
    """The one-line note that ``--out`` holds ``others`` (:func:`check_out_dir`) and ``what`` goes beside them."""
    if not others:
        return None
    return (f"memaudit: note: --out {out} also holds {len(others)} other entr{'y' if len(others) == 1 else 'ies'} "
            f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); {what} go beside them")


# flock's errors on a file system without locks (an NFS mount without its lock service, some FUSE and SMB mounts)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def busy_message(out: Path, command: str = "memaudit run") -> str:
    """Why a command is refused a folder whose lock another process holds (:func:`out_lock`), naming that process
    when the lock file records it: a run stopped (SIGSTOP, a frozen node) or hung holds the lock, and the message
    said only "another run", leaving the operator to find which process to end."""
    from audit.tables import held_by

    return (f"--out {out} is being written by another {command} right now{held_by(out)}; wait for it to finish "
            "(then rerun to resume or reuse it) or choose another --out")


@contextlib.contextmanager
def out_lock(out: Path, command: str = "memaudit run", log=None):
    """Hold an exclusive lock on the run folder ``out`` (``flock`` on ``out/.memaudit.lock``) while a run writes
    it: a second process running on the same folder (a cron job started twice) is refused at once instead of
    scoring everything a second time beside the first. The folder is created if needed; the run's identity is
    checked and written under the lock (:func:`prepare_out_dir`), so that two runs started together cannot
    both take a new folder for theirs. On a file system that has no locks (``flock`` fails with ENOLCK or
    EOPNOTSUPP: an NFS mount without its lock service) the command goes on unlocked, after a warning through
    ``log`` (default: stderr) that a second one would not be refused.

    Raises:
        audit.errors.RunFolderBusyError: another process holds the lock (the CLI exits 75).
        RunError: ``out`` is a file, or the folder or its lock cannot be made.
    """
    import fcntl

    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fh = open(Path(out) / LOCK_NAME, "a+b")
    except OSError as exc:  # a read-only or special file system (/proc, /sys) that the checks before could not tell
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the full disk's own message (audit.cli.common)
        folder = "run folder" if command == "memaudit run" else "output folder"
        raise RunError(f"--out {out}: cannot make the {folder} or its lock there ({exc.strerror or exc})") from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusyError(busy_message(out, command)) from None
        except OSError as exc:  # flock failed with "No locks available": without a lock, not without the run
            if exc.errno not in _NO_LOCKS:
                raise
            note = (f"memaudit: warning: --out {out}: its file system has no file locks ({exc.strerror}): a second "
                    f"{command} started on this folder while this one runs would not be refused")
            if log is not None:
                log(note)
            else:
                print(note, file=sys.stderr)
        else:  # who holds it, for a second command's refusal (busy_message); the file is opened for appending
            with contextlib.suppress(OSError):
                import socket

                fh.truncate(0)
                stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
                host = "".join(socket.gethostname().split()) or "?"
                fh.write(f"{os.getpid()} {host} {stamp}\n".encode())
                fh.flush()
        yield


def prepare_out_dir(out: Path, identity: dict, model_path=None) -> tuple[Path, dict]:
    """Identify the run folder ``out`` (made by :func:`out_lock`, which this runs under): write ``identity`` into a
    new one, or check that an existing one holds the same run (:func:`same_run`). Returns the shard folder and the
    identity the folder holds (a rerun that names its files otherwise, through a link, reads them under the
    folder's spellings: :func:`respelled`). ``model_path``: the model's local folder, which a refusal names when the
    folder's fingerprint is an earlier memaudit's of the same files (:func:`refusal`).

    Raises:
        RunError: the folder holds a different run (other inputs, model or score configuration).
    """
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    sweep_temporaries(out, shard_dir)
    ident_path = out / "run.json"
    if ident_path.exists():
        old = json.loads(ident_path.read_text())
        if not same_run(old, identity):
            raise RunError(refusal(out, old, identity, model_path))
        return shard_dir, old
    write_json_atomic(identity, ident_path)
    return shard_dir, identity


def sweep_temporaries(out: Path, shard_dir: Path) -> int:
    """Remove the temporary files that a run killed while writing left (``.risk.parquet.1ca92461.tmp``: never
    renamed into place, so never read): those of the run's own tables in ``out`` and every one in ``shard_dir``
    and in the ``--confirm`` stage's folder. Called under :func:`out_lock`, so no run of this folder is writing
    them. Returns how many were removed."""
    removed = 0
    for folder, names in ((out, {"run.json", "risk.parquet", "rejects.parquet", "manifest.json"}), (shard_dir, None),
                          (out / "confirm", None)):
        for p in folder.glob(".*.tmp"):
            m = TMP_NAME.fullmatch(p.name)
            if m and (names is None or m["name"] in names) and p.is_file() and not p.is_symlink():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed += 1
    return removed


# what run.json records beside the run's identity, never compared: how the first invocation grouped the units
# (audit.runner.group_rows), which every rerun keeps so that a group's batch shape does not follow the worker count;
# the memaudit build that made the folder (memaudit_build), so that a folder resumed across an upgrade says so; and
# when the first invocation started (started_at), which the manifest's first_started_at keeps (_first_started_at)
RECORDED_NOT_COMPARED = ("group_rows", "memaudit_build", "started_at")


def same_run(old: dict, new: dict) -> bool:
    """Whether two run identities (:func:`run_identity`) are the same run: equal in everything but how the inputs
    were spelled (``data/x.parquet`` from one folder, ``../data/x.parquet`` or ``data/*.parquet`` from another),
    which is left to the files they name, compared in order (unit numbers follow it); a local file named through
    a link is the file it names. :data:`RECORDED_NOT_COMPARED` is left out."""
    def rest(identity: dict) -> dict:
        return {k: v for k, v in identity.items() if k not in ("inputs", "files", *RECORDED_NOT_COMPARED)}

    old_files, new_files = list(old.get("files", {}).items()), list(new.get("files", {}).items())
    return rest(old) == rest(new) and len(old_files) == len(new_files) and all(
        v == w and _same_file(p, q) for (p, v), (q, w) in zip(old_files, new_files))


def respelled(plan: Plan, stored: dict, identity: dict) -> Plan:
    """``plan`` (whose run identity is ``identity``) with its files named as the run folder's identity ``stored``
    names them, where a rerun names the same files otherwise (through a link): ``source`` and ``prompt_id`` then
    stay those of the rows already scored, and a rerun ends with the tables a run in one go makes. ``plan`` itself
    when the spellings are the same."""
    spelled = {new: old for new, old in zip(identity["files"], stored.get("files", {})) if new != old}
    if not spelled:
        return plan
    return replace(plan, files=[replace(f, url=spelled.get(f.url, f.url)) for f in plan.files],
                   units=[replace(u, url=spelled.get(u.url, u.url)) for u in plan.units],
                   file_rows={spelled.get(k, k): v for k, v in plan.file_rows.items()})


def _same_file(a: str, b: str) -> bool:
    """Whether two input paths of run identities name the same file: equal, or two local paths to one file (a
    link's spelling and its target's)."""
    if a == b:
        return True
    if "://" in a or "://" in b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is gone: not the same run's file any more
        return False


def _models_named(out: Path, old_fp: str, new_fp, model_path=None) -> str:
    """A clause naming the two models behind a ``model_fingerprint`` difference, so that a refusal to rerun another
    model (or checkpoint) into ``out`` says which ones, not only two hexadecimal fingerprints: the folder's model as
    its ``manifest.json`` names it (``model.name``; "a model" where the run wrote no manifest, one killed early) and
    ``model_path``, the model this command names (when given), and what to do."""
    from audit.text import visible

    name = None
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        model = json.loads((out / "manifest.json").read_text()).get("model") or {}
        if model.get("fingerprint") == old_fp and isinstance(model.get("name"), str):
            name = model["name"]
    was = f"model {visible(name)} [{old_fp}]" if name else f"a model with fingerprint {old_fp}"
    now = f"model {visible(str(model_path))} [{new_fp}]" if model_path is not None else f"model [{new_fp}]"
    return (f"It was scored with {was}; this command names {now}, another model or checkpoint (each model's "
            "run needs its own --out; memaudit diff compares two runs).")


def refusal(out: Path, old: dict, new: dict, model_path=None) -> str:
    """Why a run folder holding another run is refused, readably (one clause per difference: an input file
    changed, new or gone by its path; any other key with its old and new value), and how to proceed. With
    ``model_path`` (the model's local folder), a folder whose model fingerprint an earlier memaudit computed for the
    same files is told so (:func:`audit.models.base.earlier_fingerprint_note`), not taken for another model."""
    was, now = old.get("schema_version"), new.get("schema_version")
    if was != now:  # another memaudit's folder: no rerun of any command resumes it, whatever else differs
        which = ("a newer memaudit" if isinstance(was, int) and not isinstance(was, bool) and isinstance(now, int)
                 and was > now else "an earlier memaudit")
        return (f"{out} was made by {which} (run folder schema version {was!r}; this memaudit writes version "
                f"{now!r}), which this one cannot resume or rerun: run into a new --out (memaudit report, diff and "
                "calibrate still read the old folder).")
    diff = []
    old_files, new_files = old.get("files", {}), new.get("files", {})
    for path in sorted(set(old_files) | set(new_files)):
        if path not in old_files:
            diff.append(f"new input file {path}")
        elif path not in new_files:
            diff.append(f"input file gone: {path}")
        elif old_files[path] != new_files[path]:
            diff.append(f"input file {path} changed ({old_files[path]} -> {new_files[path]})")
    from audit.scorers import ScoreConfig

    def shown(identity: dict) -> dict:  # score configurations with their left-out defaults named
        rest = {k: v for k, v in identity.items() if k not in ("files", *RECORDED_NOT_COMPARED)}
        if isinstance(rest.get("score_config"), dict):
            rest["score_config"] = ScoreConfig.complete(rest["score_config"])
        return _flatten(rest)

    a, b = shown(old), shown(new)
    inputs_only = all(k in ("inputs", "units") for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    diff += [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k) and not (k == "units" and diff)]  # units follow from the files
    if unrecorded := sorted(set(b) - set(a)):  # what this memaudit records and the folder's does not
        return (f"{out} was made by an earlier memaudit, which did not record {', '.join(unrecorded)} in its run.json: "
                "this one cannot resume or rerun it; run into a new --out (memaudit report, diff and calibrate still "
                "read the old folder).")
    why = f"{out} holds a different run: " + "; ".join(diff) + "."
    old_fp, new_fp = old.get("model_fingerprint"), new.get("model_fingerprint")
    if old_fp != new_fp and isinstance(old_fp, str) and model_path is not None:
        from audit.models.base import earlier_fingerprint_note

        if note := earlier_fingerprint_note(model_path, old_fp):
            return why + (f" The model is the same: {note}. This memaudit cannot resume or rerun that folder: run "
                          "into a new --out (memaudit report and diff still read the old folder).")
    if old_fp != new_fp and isinstance(old_fp, str):  # another model: say which two, not only two fingerprints
        why += " " + _models_named(out, old_fp, new_fp, model_path)
    if any(k.startswith("score_config.scorer_code") and a.get(k) != b.get(k) for k in set(a) | set(b)):
        return why + (" The scorer's code changed since this folder was started (a contributed scorer's formula, "
                      "`memaudit docs architecture`): its units hold the old code's scores, so it is not resumed; "
                      "run into a new --out.")
    if inputs_only and old_files != new_files:
        return (why + " Its inputs changed since it ran (a growing folder). For a scheduled audit give each run "
                "its own folder, e.g. --out 'runs/{date}-{time}' (UTC; in a --config file too), with --cache DIR "
                "so that prompts scored before are read, not scored again; or rerun over the original inputs "
                "to resume this folder.")
    return why + " Choose another --out, or rerun the original command to resume it."


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@lru_cache(maxsize=None)
def package_version(pkg: str) -> str | None:
    """The installed version of distribution ``pkg`` (None when it is not installed), read once per process: each
    read parses the package's metadata files (8 reads took 18 ms of each 140 ms ``audit.Auditor.score`` call on the
    lab model), and a package upgraded while the process runs is still imported at the version read first."""
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def package_versions() -> dict:
    """Versions of Python, memaudit and the libraries that change scores or tables (missing ones omitted)."""
    versions = {"python": platform.python_version(), "memaudit": __version__}
    for pkg in ("torch", "diffusers", "transformers", "pyarrow", "polars", "ray"):
        if (version := package_version(pkg)) is not None:
            versions[pkg] = version
    return versions


def _first_started_at(out: Path, started_at: str) -> str:
    """When the run in ``out`` was first started: the ``started_at`` its run.json recorded when the first invocation
    made the folder (so a run killed before it wrote a manifest, then resumed, keeps the killed invocation's start,
    not the resumption's, which could fall after a later night's run and so reorder ``memaudit diff RUNS NEW``);
    for a folder made before run.json recorded it, the ``first_started_at`` of the manifest ``out`` already holds
    (its ``started_at`` for one written before that field); else ``started_at``: a rerun of a finished run folder
    keeps when the run was first made."""
    for name, keys in (("run.json", ("started_at",)), ("manifest.json", ("first_started_at", "started_at"))):
        try:
            before = json.loads((out / name).read_text())
            kept = next((before.get(k) for k in keys if before.get(k)), None)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(kept, str) and kept:
            return kept
    return started_at


ID_HASH_SEED = 0x6D656D61  # any fixed seed: the hashes are compared within one finalize only


def id_hash_values(ids) -> np.ndarray:
    """64-bit hashes (polars' ``hash`` at :data:`ID_HASH_SEED`) of a string column's values, as uint64."""
    import polars as pl

    return pl.Series("prompt_id", ids, dtype=pl.String).hash(seed=ID_HASH_SEED).to_numpy()


def duplicate_id_rows(risk_path: Path, id_hashes: np.ndarray) -> int:
    """Rows of ``risk_path`` whose ``prompt_id`` another row has, from ``id_hashes`` (:func:`id_hash_values` of every
    row's id): only the rows whose hash another row shares are read back, and their ids compared, so a collision of
    two hashes counts nothing. Reading every id into memory at once took about 170 bytes a row at the end of a run
    (1,000,000 rows: 975 MB peak, where the run without ``--id-column`` took 838 MB); the hashes take 8."""
    import polars as pl

    values, counts = np.unique(id_hashes, return_counts=True)
    shared = values[counts > 1]
    if not len(shared):
        return 0
    rows = (pl.scan_parquet(risk_path, glob=False).select("prompt_id")
            .filter(pl.col("prompt_id").hash(seed=ID_HASH_SEED).is_in(pl.Series(shared).implode())).collect())
    return int(rows["prompt_id"].is_duplicated().sum())


def finalize(out: Path, shard_dir: Path, plan: Plan, cfg: RunConfig, model_info: dict, score_config: dict,
             started: float, started_at: str, extra_manifest: dict | None = None,
             calibration: dict | None = None, resumed_units: set[int] | frozenset = frozenset()) -> dict:
    """Merge shards into ``risk.parquet``/``rejects.parquet`` and write ``manifest.json``; returns the manifest.

    With ``calibration`` (:func:`audit.calibrate.load_calibration`, already checked against the model and
    score configuration) the ``flagged`` and ``risk_percentile`` columns are filled and counted; without
    it they stay null and ``counts.flagged`` is null. ``resumed_units`` (indices of units an earlier invocation
    finished) are left out of the throughput, which counts the rows this invocation read.

    Raises:
        RunError: a planned unit has no finished shard (its ``.done.json`` is missing).
        audit.errors.SchemaError: the manifest lacks a required key or its counts do not reconcile.
    """
    stats = []
    for u in plan.units:
        done = shard_paths(shard_dir, u)[2]
        if not done.exists():
            raise RunError(f"unit {u.index} ({u.url} rows {u.start}-{u.stop}) has no finished shard")
        stats.append(committed_stats(shard_dir, u))
    meta = {"memaudit.model": model_info, "memaudit.score_config": score_config, "memaudit.version": __version__}
    chunk_fn, n_flagged = None, [0]
    if calibration is not None:
        from audit.calibrate import apply_calibration, calibration_summary

        meta["memaudit.calibration"] = calibration_summary(calibration)

        def flag_chunk(chunk: pa.Table) -> pa.Table:
            chunk = apply_calibration(chunk, calibration)
            n_flagged[0] += int(chunk.column("flagged").to_numpy(zero_copy_only=False).sum())
            return chunk
        chunk_fn = flag_chunk
    id_hashes = None
    if cfg.id_column:  # each ranked row's id, hashed as the merge writes it (duplicate_id_rows counts them)
        id_hashes, filled, flag = np.empty(sum(int(s["scored"]) for s in stats), np.uint64), [0], chunk_fn

        def id_chunk(chunk: pa.Table) -> pa.Table:
            h = id_hash_values(chunk.column("prompt_id"))
            id_hashes[filled[0]:filled[0] + len(h)] = h
            filled[0] += len(h)
            return flag(chunk) if flag is not None else chunk
        chunk_fn = id_chunk
    risk_schema = arrow_schema("risk", cfg.keep_columns, meta)
    # the intermediate files (about the table's size) are removed before the merge, whatever an earlier finalize that
    # failed left there (a full disk: "free some and rerun" must not find them still holding the space), and after
    # it, whether or not it succeeded
    work = shard_dir / "merge"
    shutil.rmtree(work, ignore_errors=True)
    try:
        risk_shards = reduce_shards([shard_paths(shard_dir, u)[0] for u in plan.units], work, risk_schema,
                                    rows=[int(s["scored"]) for s in stats])  # no footer read twice
        n_scored, hashes = merge_ranked(risk_shards, out / "risk.parquet",
                                        risk_schema, chunk_fn=chunk_fn)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # a unit that rejected nothing has no rejects shard; one whose shard is missing though it counts rejects is
    # listed, so concat_shards refuses it (RunError: a rerun scores that unit again), not read as empty in silence
    n_rej = concat_shards([p for u, s in zip(plan.units, stats) if (p := shard_paths(shard_dir, u)[1]).exists()
                           or sum(s["rejected_by_reason"].values())], out / "rejects.parquet",
                          arrow_schema("rejects", cfg.keep_columns, meta))
    by_reason: Counter = Counter()
    for s in stats:
        by_reason.update(s["rejected_by_reason"])
    rows_read = sum(s["rows_read"] for s in stats)
    rows_this_run = sum(s["rows_read"] for s in stats if s["unit"] not in resumed_units)
    unique = int(len(np.unique(hashes)))
    import polars as pl

    # scored rows whose prompt is longer than the text encoder's maximum (77 CLIP tokens; PixArt's T5 120 or 300),
    # scored on the first tokens only; and with an id column, scored rows whose id another scored row has (ids are
    # meant to join results back: such rows are counted, not dropped)
    tallies = pl.scan_parquet(out / "risk.parquet", glob=False).select(truncated=pl.col("truncated").sum()).collect()
    n_truncated = int(tallies["truncated"][0] or 0)
    if id_hashes is not None and filled[0] != len(id_hashes):  # every ranked row's id hashed, once
        raise RunError(f"the merge hashed {filled[0]} ids of the {len(id_hashes)} rows it wrote")
    duplicate_ids = duplicate_id_rows(out / "risk.parquet", id_hashes) if cfg.id_column else None
    wall = time.perf_counter() - started
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "memaudit_version": __version__,
        "memaudit_build": memaudit_build(),
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
            "truncated": n_truncated,
            "flagged": n_flagged[0] if calibration is not None else None,
            "duplicate_ids": duplicate_ids,  # scored rows whose --id-column value another scored row has
        },
        "gated_reasons": gated_reasons(),  # the reasons this memaudit's exit 4 counts (audit.gates.recorded_reasons)
        "units": {"total": len(plan.units)},
        "model": model_info,
        "score_config": score_config,
        "run_config": cfg.to_dict(),
        # its paths as typed (`--out r32a`, `--cache cache`: the rerun's own words) made absolute against this
        # invocation's working folder, so a manifest read elsewhere (a report job, an archive) can locate them
        "run_config_paths": run_config_paths(cfg, out),
        "versions": package_versions(),
        "started_at": started_at,
        # the first finished invocation's start, kept when a finished folder is run again (a scheduler's retry of an
        # earlier night): what orders a folder's runs by when they were made (pipelines/nightly.sh)
        "first_started_at": _first_started_at(out, started_at),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(wall, 3),
        "rows_this_run": rows_this_run,  # rows read by this invocation (a resumed run read the others before)
        "throughput_rows_per_s": round(rows_this_run / wall, 2) if wall > 0 else 0.0,
    }
    if calibration is not None:
        manifest["calibration"] = meta["memaudit.calibration"]
    if used := scored_with_summary(stats):
        manifest["scored_with"] = used
    cached = [s for s in stats if s.get("cache_key")]  # the units scored with a cache, whenever they were
    if cfg.cache or cached:
        from audit.cache import ScoreCache, cache_dir

        # scored rows served by the cache and scored by the model, each row once (UnitStats.cache_hits, model_rows):
        # with every unit cached they add up to counts.scored (check_manifest); a unit an earlier memaudit committed
        # (no model_rows) counted unique prompts per unit
        hits = sum(s.get("cache_hits", 0) for s in cached)
        by_model = sum(s["model_rows"] if "model_rows" in s else s.get("unique_scored", 0) - s.get("cache_hits", 0)
                       for s in cached)
        # each unit records its cache folder (cache_dir); one committed before that field was scored with --cache
        this = str(cache_dir(cfg.cache)) if cfg.cache else None
        # one folder however spelled: the Ray engine's actors record it absolute (audit.engines.ray.absolute_cache)
        by_folder: dict = {}
        for s in cached:
            by_folder.setdefault(os.path.abspath(s.get("cache_dir") or this), s.get("cache_dir") or this)
        dirs = list(by_folder.values())
        manifest["cache"] = {"dir": this or dirs[0], "hits": hits, "scored": by_model}
        if len(cached) == len(stats) and all("model_rows" in s for s in cached) and hits + by_model != n_scored:
            raise RunError(f"the cache counts do not reconcile: {hits} rows served by the cache + {by_model} scored by "
                           f"the model != {n_scored} rows scored")
        if len(dirs) > 1 or (this and dirs and os.path.abspath(dirs[0]) != os.path.abspath(this)):
            manifest["cache"]["dirs"] = dirs  # units resumed from an invocation with another --cache
        if len(cached) < len(stats):  # units scored by an invocation without --cache: not in the figures above
            manifest["cache"]["units_without_cache"] = len(stats) - len(cached)
        notes = [n for s in stats for n in s.get("cache_notes", [])]
        compacted = 0
        if cfg.cache:  # this invocation's cache, the folders its units used
            for key in sorted({s["cache_key"] for s in cached
                               if os.path.abspath(s.get("cache_dir") or this) == os.path.abspath(this)}):
                folder = ScoreCache.existing(cfg.cache, key, cfg.scorer)
                compacted += folder.compact()
                notes += folder.notes
        manifest["cache"]["compacted_files"] = compacted
        if notes:  # each once, in the order met (the units of a run meet the same damage)
            from audit.cache import merge_notes

            manifest["cache"]["warnings"] = merge_notes(notes)
    if extra_manifest:
        manifest.update(extra_manifest)
    check_manifest(manifest)
    write_json_atomic(manifest, out / "manifest.json")
    return manifest


# settings outside the run identity whose change moves risks by float rounding (the engine alone does not)
ROUNDING_SETTINGS = ("batch_size", "compile", "device")


def scored_with_summary(stats: list[dict]) -> dict:
    """What the units were scored with (each unit's ``scored_with``, :func:`audit.unit.scored_with`): per
    setting, its distinct values in unit order, and ``mixed``, the :data:`ROUNDING_SETTINGS` that differ between units
    (a run resumed with another ``--batch-size``, ``--compile`` or device, or a batch size halved after an out-of-memory
    error; a unit that scored nothing with the model, or nothing before ``auto`` was resolved, does not count), and
    ``unrecorded_units`` where some markers predate the record. The scores a ``--cache`` served count with the settings
    of the run that filled it (each unit's ``served_with``, :meth:`audit.cache.ScoreCache.served_with`: ``unknown``
    batch size for scores an older memaudit stored), so a run served by a cache filled at another batch size is mixed.
    Empty when no unit recorded it (shards of an older memaudit)."""
    used: dict = {}
    unrecorded = 0
    for s in sorted(stats, key=lambda s: s["unit"]):
        if "scored_with" not in s:  # a marker written before memaudit recorded it
            unrecorded += 1
        for key, value in (s.get("scored_with") or {}).items():
            _add_distinct(used, key, [value])
        for key, values in (s.get("served_with") or {}).items():
            if isinstance(values, list):
                _add_distinct(used, key, values)
    if used:
        used["mixed"] = rounding_mix(used)
        if unrecorded:  # beside recorded ones: their settings are unknown, so a mix cannot be ruled out
            used["unrecorded_units"] = unrecorded
    return used


def _add_distinct(used: dict, key: str, values: list) -> None:
    """Append to ``used[key]`` (made a list where missing) each of ``values`` it does not hold yet, in order: the
    distinct values of a setting over units or runs (:func:`scored_with_summary`, :func:`combined_scored_with`)."""
    have = used.setdefault(key, [])
    for value in values:
        if value not in have:
            have.append(value)


def rounding_mix(used: dict) -> list[str]:
    """The :data:`ROUNDING_SETTINGS` that hold more than one value in ``used`` (setting -> list of the values met,
    as :func:`scored_with_summary` gathers them; ``auto``, a batch size not yet chosen, is no value): the settings
    whose change moves a prompt's risk by float rounding. The one rule a run, its report and a diff of two runs
    warn by."""
    return [k for k in ROUNDING_SETTINGS if len([v for v in used.get(k, []) if v != "auto"]) > 1]


def combined_scored_with(manifests: list[dict]) -> dict:
    """What the units of several finished runs were scored with, as :func:`scored_with_summary` gives it for one
    run: per setting the distinct values of all of them in order, ``mixed`` by :func:`rounding_mix`, and
    ``unrecorded_units``, the sum of theirs (units an older memaudit scored beside recorded ones). A manifest with
    no ``scored_with`` adds nothing, as its own report says nothing of it. Empty when no run recorded them."""
    used: dict = {}
    unrecorded = 0
    for manifest in manifests:
        own = manifest.get("scored_with")
        if not isinstance(own, dict):  # none of its units scored with the model (served by --cache), or an
            continue  # older memaudit: as for one run, no claim (mixed_settings_warning)
        for key, values in own.items():
            if key not in ("mixed", "unrecorded_units") and isinstance(values, list):
                _add_distinct(used, key, values)
        if type(own.get("unrecorded_units")) is int:
            unrecorded += own["unrecorded_units"]
    if not used:
        return {}
    used["mixed"] = rounding_mix(used)
    if unrecorded:
        used["unrecorded_units"] = unrecorded
    return used


def mixed_settings_warning(manifest: dict, whose: str = "this run", sides: dict | None = None,
                           effect: str | None = None) -> str | None:
    """A warning line when the units of a run (``manifest``'s ``scored_with``, :func:`scored_with_summary`) were
    scored with different rounding-relevant settings (:func:`rounding_mix`: batch size, ``--compile``, the device and
    its torch thread count), or when some of them recorded none beside others that did; else None. ``whose`` names
    the units in the line: ``this run`` (the run, its report) or ``the two runs`` (:func:`audit.diff.diff_runs`, with
    :func:`combined_scored_with` of both manifests); ``sides`` (label -> that run's ``scored_with``, e.g. ``old run``
    and ``new run``) spells each setting's values run by run (``batch_size: old run 8, new run 8 / 32``), so a run
    that is mixed itself is not read as one side of the change; ``effect`` replaces what the line says follows
    for a ``whose`` other than ``this run`` (the default: near-equal risks may swap ranks; a run and its
    calibration's reference, :func:`reference_settings_warning`: a risk at the threshold may be
    flagged or not). The size of the effect is measured in docs/audits.md."""
    used = manifest.get("scored_with") or {}
    mixed = used["mixed"] if isinstance(used.get("mixed"), list) else rounding_mix(used)
    if not mixed:
        if used.get("unrecorded_units"):
            return (f"{used['unrecorded_units']} unit(s) of {whose} were scored by an older memaudit that did not "
                    "record their batch size, --compile and device: if a rerun changed them, a prompt's risk may "
                    "differ between units by float rounding (about 1e-7)")
        return None
    def values(of: dict, k: str) -> str:
        shown = [str(v) for v in (of.get(k) if isinstance(of.get(k), list) else []) if v != "auto"]
        return " / ".join(shown) or "not recorded"

    if sides:
        parts = ", ".join(f"{k}: " + ", ".join(f"{label} {values(of if isinstance(of, dict) else {}, k)}"
                                               for label, of in sides.items()) for k in mixed)
    else:
        parts = ", ".join(f"{k} {values(used, k)}" for k in mixed)
    if whose == "this run":
        return (f"this run's units were scored with different settings ({parts}: a rerun with other options, scores "
                "served by --cache that another run computed, or a batch size halved after an out-of-memory error): "
                "a prompt's risk may differ between them by float rounding (about 1e-7), so ranks of near-equal "
                "risks may differ from a run scored in one go")
    return (f"{whose} were scored with different settings ({parts}): a prompt's risk may differ between them by "
            f"float rounding (about 1e-7), so {effect or 'near-equal risks may swap ranks with the prompt unchanged'}")


def reference_settings_warning(manifest: dict, whose: str = "this run") -> str | None:
    """The warning line when a calibrated run (``manifest``: its ``calibration`` section,
    :func:`audit.calibrate.calibration_summary`, and its ``scored_with``) was scored with other settings that move
    risks by float rounding (batch size, ``--compile``, the device and its torch thread count: :func:`rounding_mix`)
    than the calibration's reference run (``reference_scored_with``, recorded by :func:`audit.calibrate.calibrate`
    from the reference's manifest), else None. The threshold is one reference prompt's risk, so a prompt at it may
    be flagged or not by that rounding alone (docs/audits.md measures one: ``--batch-size 7`` flags 6 where the
    reference flagged 5). The line is :func:`mixed_settings_warning`'s over both (each side's values spelled),
    ``whose`` naming the run (``this run``: ``run --calibration`` and its report; ``the new run``, ``the old run``:
    ``memaudit diff``). None too when either side recorded no settings (a calibration made by an earlier memaudit, a
    run all of whose scores an older cache served): no claim, as :func:`combined_scored_with` makes none."""
    cal = manifest.get("calibration")
    reference = cal.get("reference_scored_with") if isinstance(cal, dict) else None
    run = manifest.get("scored_with")
    if not isinstance(reference, dict) or not isinstance(run, dict):
        return None
    both = combined_scored_with([{"scored_with": reference}, {"scored_with": run}])
    return mixed_settings_warning({"scored_with": both}, f"{whose} and its calibration's reference run",
                                  {"calibration reference": reference, whose: run},
                                  effect="a prompt at the threshold (one reference prompt's risk) may be flagged or "
                                         "not by that rounding alone; calibrate on a reference run scored with the "
                                         "run's settings")


def settings_warnings(manifest: dict) -> list[str]:
    """The warning lines a finished run's manifest gives of the settings its risks were scored with, in order:
    :func:`mixed_settings_warning` (units scored otherwise than each other) and :func:`reference_settings_warning`
    (a calibrated run scored otherwise than its calibration's reference); [] when neither applies. What the run
    prints when it finishes, a rerun of the finished folder on a read-only mount too, and what its report repeats."""
    return [w for w in (mixed_settings_warning(manifest), reference_settings_warning(manifest)) if w]


def build_plan(cfg: RunConfig) -> Plan:
    """Discover inputs and cut them into units (honouring ``--limit``).

    Raises:
        audit.errors.SourceError: an input matches nothing or is a chained URL; a file cannot be read, or a folder
            under an input cannot be listed (without ``--skip-bad-files``).
    """
    files, skipped = discover(list(cfg.inputs))
    if (unlisted := unlisted_summary(skipped)) and not cfg.skip_bad_files:  # its files would be left out unseen
        raise SourceError(f"{unlisted}{SKIP_BAD_FILES_HINT}")
    plan = plan_units(files, cfg.prompt_column, cfg.unit_rows, cfg.skip_bad_files, cfg.id_column, cfg.keep_columns)
    plan.skipped = skipped + plan.skipped
    return apply_limit(plan, cfg.limit)
