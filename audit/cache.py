"""A score cache for scheduled audits: ``memaudit run --cache DIR``.

Scores are keyed by (model fingerprint, score configuration, the device's kind and ``--compile``, normalized-prompt
hash). A prompt's score depends on nothing else (its noise is seeded by the run seed and its own hash, which the
score configuration holds; the model's ``memaudit.json`` settings that change scores are in its fingerprint,
:data:`audit.models.base.SCORE_SETTINGS`), so a cached score equals a fresh one bit for bit at the same batch size
(where the kernels do not round a row by its place in the batch: on the CPU, ``attention_entropy`` at batch sizes
that are multiples of 4; the other scorers' full forwards within about 1e-6 relative; docs/audits.md),
and within the batch rounding (at most 3.8e-7 measured, docs/audits.md) at another; a nightly rerun over a growing
log scores only the prompts it has not seen. The device's kind (CPU threads, GPU model) and ``torch.compile`` are
keyed because their kernels round differently (on the lab model on CPU a compiled scorer differed from an eager one by
up to 1.4e-6 in risk, ``benchmarks/rounding.py``); the batch size is not, as ``--batch-size auto`` may pick another
size each night and the rounding it changes is that of a fresh run; each part records what its scores were computed
with (:data:`SCORED_WITH_KEY` in its Parquet metadata), which a run they serve reports as its own ``scored_with``
(:meth:`ScoreCache.served_with`), so its report and ``memaudit diff`` warn of a cache filled at another batch size.

Layout: ``DIR/<model fingerprint>-<score-config key>/`` holds ``key.json`` (what the key stands for) and
Parquet files ``part-<unit>-<random>.parquet``, one per unit that scored new prompts, written
atomically with page checksums; concurrent runs and Ray actors never write the same file, and write one at a time
(an exclusive ``flock`` on ``key.json``), each leaving out the prompts that another stored since its lookup, so
two runs that both missed a prompt store it once (a prompt stored twice all the same, by an older memaudit or a put
that could not lock, is read once by a lookup and merged once by a compaction). A lookup streams the
files through a pyarrow dataset filtered on the unit's prompt hashes, verifying the checksums, so memory holds one
record batch and the hits, never the whole cache. At the end of a run (``finalize``) the files are merged into
one per distinct record of what they were scored with when there are more than 32 (:meth:`ScoreCache.compact`),
so a nightly cache does not grow a file per unit
per night forever, and so does a run that has just added a part to more than :data:`COMPACT_WHILE_RUNNING` (each
lookup opens every part: thousands of small input files, a unit each, made lookups slower with every unit), then
leaving the parts of :data:`BIG_ROWS_WHILE_RUNNING` rows or more alone (earlier nights' merged part); one
run compacts at a time (an exclusive ``flock`` on ``.compact.lock``; a run that finds
it taken leaves the compaction to the other).

The cache is an optimization, never a reason for a run to fail or to be wrong. A part that cannot be read, or
whose schema is not the cache's (checked before any row of it is read, as a dataset would cast or null-fill a
near-right one), or whose pages fail their checksums, is moved aside to ``damaged/`` and its prompts are scored
again. A cache folder that cannot be used at all (a file where a folder must be, no permission) leaves the run
scoring without it. A cache folder that cannot be written (a team's filled cache on a read-only mount) is used for
lookups only (:attr:`ScoreCache.read_only`): its hits are served, and nothing is made, stored, compacted or moved
aside in it; one note counts the scores not stored. Each such event is a note (:attr:`ScoreCache.notes`) that the run's manifest keeps and
``memaudit run`` prints as a warning.

Owns the cache folder and its lookups. Must not import torch, engines or the pipeline (its columns come
from the scorer registry).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
import re
import time
import uuid

import numpy as np

from audit.errors import RunError
from audit.scorers import result_columns



def __getattr__(name):
    if name == "SCORE_COLUMNS":  # the float64 columns of a cache file, from the scorer registry
        return result_columns()
    raise AttributeError(name)


# bumped when what a cache entry holds changes for the same score configuration (2: trigger tokens spell whole
# characters; 3: noise_magnitude converted to eps for v/x0 models, per-layer attention columns; 4: trigger tokens
# carry their character span), so entries written by an older memaudit are not mixed with new ones
# 5: the device kind (CPU threads, GPU model) and --compile are keyed (older entries may hold compiled or GPU scores);
# 6: attention_entropy_late on SD 2.x folders with Euler (and other stateful or stochastic) schedulers and
# noise_magnitude and guidance_geometry on folders whose scheduler is not DDIM (now DDIM from the config, as
# their reference code) changed values
CACHE_FORMAT = 6
STALE_TMP_S = 24 * 3600  # a part's temporary file older than this was left by a killed run (removed at compaction)


PUT_LOCK_WAIT_S = 10.0  # how long a put waits for another's (ScoreCache._put_lock) before it writes unchecked
COMPACT_WHILE_RUNNING = 16  # a run merges the small parts (ScoreCache.compact) when a put leaves more than this
# ... leaving alone the parts of this many rows or more: a cache of earlier nights (compacted at their ends into one
# part of up to 2,000,000 rows) would otherwise be rewritten every 16 units
BIG_ROWS_WHILE_RUNNING = 1 << 16
# a part's Parquet metadata key holding what its scores were computed with (setting -> list of values,
# audit.unit.scored_with): the batch size is not keyed, so a run served from the cache reports the filling run's
SCORED_WITH_KEY = b"memaudit.scored_with"
UNKNOWN = "unknown"  # a setting of scores stored by a memaudit that did not record it


def cache_dir(root: str | Path) -> Path:
    """The local folder ``--cache`` names, with ``~`` expanded (a TOML file or a quoted flag leaves it to us).

    Raises:
        ValueError: a URL (``scheme://``): the cache is a local or mounted folder.
    """
    text = os.fspath(root)
    if "://" in text:
        raise ValueError(f"--cache {text}: give a local (or mounted) folder; the score cache is not read from URLs")
    return Path(os.path.expanduser(text))


def cache_key(model_fingerprint: str, score_config: dict, cache_format: int | None = None) -> str:
    """Folder name for a (model, score configuration) pair, under :data:`CACHE_FORMAT` (or an earlier
    ``cache_format``: format 1 hashed the score configuration alone)."""
    cache_format = CACHE_FORMAT if cache_format is None else cache_format
    keyed = score_config if cache_format == 1 else {"cache_format": cache_format, "score_config": score_config}
    digest = hashlib.blake2b(json.dumps(keyed, sort_keys=True).encode(), digest_size=8).hexdigest()
    return f"{model_fingerprint}-{digest}"


def earlier_format_folders(root: str | Path, model_fingerprint: str) -> list[tuple[Path, int]]:
    """The folders under ``root`` that an earlier memaudit wrote for this model in an older :data:`CACHE_FORMAT`,
    each with its format: a folder whose name is :func:`cache_key` of its own ``key.json`` under that format. This
    memaudit never reads them (their entries may hold other values), so after an upgrade the first run scores every
    prompt again; they are what a team can remove from a shared cache."""
    found = []
    try:
        folders = sorted(Path(root).glob(f"{model_fingerprint}-*"))
    except OSError:
        return []
    for folder in folders:
        try:
            held = json.loads((folder / "key.json").read_bytes())
            fingerprint, config = held["model_fingerprint"], held["score_config"]
        except (OSError, ValueError, RecursionError, KeyError, TypeError):
            continue
        for fmt in range(1, CACHE_FORMAT):
            if isinstance(config, dict) and folder.name == cache_key(fingerprint, config, fmt):
                found.append((folder, fmt))
                break
    return found


def cache_config(score_config: dict, device: str, compiled: bool) -> dict:
    """What a cache folder is keyed on besides the model fingerprint: the run's score configuration (with its
    ``first_timestep``), the scoring device's kind (:func:`audit.models.base.device_kind`: ``cpu:<threads>``,
    ``cuda:<GPU name>``) and whether the model is compiled."""
    return dict(score_config) | {"device": str(device), "compiled": bool(compiled)}


def cache_columns(scorer: str | None = None) -> tuple[str, ...]:
    """The float64 columns of the parts of ``scorer``'s cache folders: :func:`audit.scorers.result_columns` less the
    own columns of the scorers that a ``register()`` call added to this process (not :data:`audit.scorers.ON_IMPORT`),
    but for ``scorer``'s own.

    The parts of a key folder hold the same columns in every process: the registry's columns (every registered
    scorer's) made a job that had registered a scorer of its own write its ``attention_entropy`` parts with that
    scorer's column too, and a job without it (the CLI) found those parts' schema "not the cache's" and moved them to
    ``damaged/``, as the first job did to the CLI's: two jobs sharing one cache set each other's scores aside every
    run. The shipped scorers' parts keep the columns they always had."""
    from audit.scorers import ON_IMPORT, SCORERS

    added = {c.name for name, spec in SCORERS.items() if name not in ON_IMPORT and name != scorer
             for c in spec.columns}
    return tuple(c for c in result_columns() if c not in added)


def _schema(columns: tuple[str, ...] | None = None):
    """The cache parts' Arrow schema, for ``columns`` (default: :func:`cache_columns` of a shipped scorer)."""
    import pyarrow as pa

    from audit.tables import TRIGGER_TYPE

    columns = cache_columns() if columns is None else columns
    return pa.schema([("prompt_hash", pa.string())] + [(c, pa.float64()) for c in columns]
                     + [("trigger_tokens", TRIGGER_TYPE)])


def _parquet_format():
    """Parquet reading that verifies page checksums (a flipped bit is an error, not a wrong score)."""
    import pyarrow.dataset as ds

    return ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(
        page_checksum_verification=True))


_CHECKED: dict[str, set] = {}
_PART_SETTINGS: dict[str, dict] = {}  # per cache folder: ScoreCache._settings_of's record of each part read


class ScoreCache:
    """Scores already computed for one model and cache configuration (:func:`cache_config`), under ``root``.

    A cache that cannot be set up (its folder cannot be made, ``key.json`` cannot be written) is
    :attr:`unusable` (the reason): lookups find nothing and nothing is stored. :attr:`notes` lists what went
    wrong (unusable folder, parts moved aside), one line each, for the run's manifest and warnings.
    """

    def __init__(self, root: str | Path, model_fingerprint: str, score_config: dict):
        from audit.tables import write_json_atomic

        self._setup(cache_dir(root) / cache_key(model_fingerprint, score_config), score_config.get("scorer"))
        ident = {"model_fingerprint": model_fingerprint, "score_config": score_config}
        if self.read_only:  # a team's filled cache on a read-only mount: lookups only (nothing made, nothing stored)
            if not (self.dir / "key.json").is_file():
                self._give_up(f"{self.dir.parent} cannot be written ({self.read_only}) and holds no scores of this "
                              f"model and score configuration (no folder {self.dir.name})")
                return
        try:
            if not self.read_only:
                self.dir.mkdir(parents=True, exist_ok=True)
            key = self.dir / "key.json"
            if not key.exists():
                write_json_atomic(ident, key)
                # a new folder: say why the first run after an upgrade scores every prompt again
                if old := earlier_format_folders(self.dir.parent, model_fingerprint):
                    named = ", ".join(f.name for f, _ in old[:3]) + (" ..." if len(old) > 3 else "")
                    formats = ", ".join(str(n) for n in sorted({n for _, n in old}))
                    self.notes.append(f"score cache: {self.dir.parent} holds {len(old)} folder(s) of this model that "
                                      f"an earlier memaudit wrote in an older cache format ({formats}; this one "
                                      f"writes {CACHE_FORMAT}) and this one does not read: the prompts they hold "
                                      f"are scored again into {self.dir.name}; remove them to free the space "
                                      f"({named})")
            else:  # the folder's name is a hash of its key: a folder renamed or copied over another holds other scores
                try:
                    held = json.loads(key.read_bytes())
                except (ValueError, RecursionError):  # not JSON; nested past the parser's depth (a unit failed 3x)
                    held = "damaged"
                # every later run of this model and configuration would give up alike: say how to end it
                remedy = f": move {self.dir} aside or delete it, and the next run starts it anew"
                if held == "damaged":
                    self._give_up(f"{key} is damaged (not JSON){remedy}")
                elif held != json.loads(json.dumps(ident)):
                    self._give_up(f"{key} names another model or score configuration than its folder's name stands "
                                  f"for (a folder renamed, or copied over another?){remedy}")
        except (OSError, RunError) as exc:
            self._give_up(f"{self.dir} cannot be used ({_reason(exc)})")
        if self.read_only and not self.unusable:  # (one whose key.json is wrong is not used: its note says so)
            self._unstored = 0
            self.notes.append(self._read_only_note())

    def _setup(self, folder: Path, scorer: str | None) -> None:
        self.dir = folder
        # why the folder (or, not made yet, the cache folder holding it) cannot be written, None when it can: a
        # read-only cache serves its scores and stores nothing (:meth:`put`, :meth:`compact`, :meth:`_set_aside`)
        self.read_only: str | None = not_writable(folder if folder.is_dir() else folder.parent)
        self.columns = cache_columns(scorer)  # the score columns its parts hold (the same in every process)
        self.schema = _schema(self.columns)
        self.notes: list[str] = []
        self.unusable: str | None = None
        # (name, size, mtime_ns) of parts whose schema was found right, shared by the instances of a process (one a
        # unit): parts are never rewritten in place, so a unit does not read again the footers an earlier one read
        self._checked: set[tuple] = _CHECKED.setdefault(str(folder), set())
        self._bad: set[str] = set()  # parts found damaged that could not be moved aside: never read again here
        self.moved: list[Path] = []  # parts moved to damaged/ by this instance
        # the parts the last lookup read (None before one): a put checks the others, which another run (or a Ray
        # actor) stored since, for the prompts it is about to store (:meth:`put`)
        self._looked: set[str] | None = None
        # the part each hit of the last lookup came from (prompt hash -> part name): :meth:`served_with`
        self._hit_parts: dict[str, str] = {}
        # part name -> what its scores were computed with, shared by the instances of a process (one a unit group):
        # a part is never rewritten in place, and its name is its own
        self._part_settings: dict[str, dict] = _PART_SETTINGS.setdefault(str(folder), {})

    @classmethod
    def existing(cls, root: str | Path, key: str, scorer: str | None = None) -> "ScoreCache":
        """The cache folder ``root/key`` that a run's units used (:func:`cache_key`; the units record it), for
        :meth:`compact` at the end of the run; unusable when it is not a folder. ``scorer``: the scorer it holds
        (which columns its parts have, :func:`cache_columns`); None reads it from its ``key.json``, and a folder
        whose ``key.json`` cannot say is unusable (compacting it with another scorer's columns would set every part
        aside)."""
        self = cls.__new__(cls)
        folder = cache_dir(root) / key
        if scorer is None:
            try:
                scorer = json.loads((folder / "key.json").read_bytes())["score_config"]["scorer"]
            except (OSError, ValueError, RecursionError, KeyError, TypeError):
                pass
        self._setup(folder, scorer)
        if not self.dir.is_dir():
            self.unusable = f"{self.dir} is not a folder"
            self.notes.append(f"score cache: {self.unusable} (any more); it was not compacted")
        elif scorer is None:
            self.unusable = f"{self.dir / 'key.json'} does not say which scorer the folder holds"
            self.notes.append(f"score cache: {self.unusable}; it was not compacted")
        return self

    def _read_only_note(self) -> str:
        return (f"score cache: {self.dir} cannot be written ({self.read_only}): {READ_ONLY_MIDDLE}{self._unstored} "
                f"this run{NOT_STORED_TAIL})")

    def _give_up(self, why: str) -> None:
        self.unusable = why
        self.notes.append(f"score cache: {why}; scoring without the cache")

    def files(self) -> list[Path]:
        """The cache's Parquet files (finished writes only; not those found damaged)."""
        if self.unusable:
            return []
        try:
            return sorted(f for f in self.dir.glob("part-*.parquet") if f.name not in self._bad and f.is_file())
        except OSError as exc:
            self._give_up(f"{self.dir} cannot be listed ({_reason(exc)})")
            return []

    def _checked_files(self) -> list[Path]:
        """:meth:`files`, each with its schema checked (footer only, once per file version) before any row is
        read: a dataset given the cache's schema would cast a near-right file (a float32 column) or fill a missing
        column with nulls, and so serve wrong scores."""
        out = []
        for f in self.files():
            try:
                st = f.stat()
            except FileNotFoundError:  # removed by a concurrent compaction
                continue
            stamp = (f.name, st.st_size, st.st_mtime_ns)
            if stamp not in self._checked:
                import pyarrow.parquet as pq

                try:
                    schema = pq.read_schema(f)
                except FileNotFoundError:
                    continue
                except Exception as exc:  # noqa: BLE001 - any reason a footer cannot be read
                    self._set_aside(f, exc)
                    continue
                if not schema.equals(self.schema):
                    self._set_aside(f, ValueError(f"its schema is not the cache's: "
                                                  f"{_schema_difference(schema, self.schema)}"))
                    continue
                self._checked.add(stamp)
            out.append(f)
        return out

    def lookup(self, hashes: list[str]):
        """Cached rows for ``hashes`` as a pyarrow table (one row per hash found, cache schema). A hash held twice
        (two runs stored it) gives its first row in part order, one without ``nonfinite`` set when there is one: a
        failure cached before failures were kept out gives way to the prompt's finite row (:func:`cached_scores`
        takes a failure for a miss). Parts that fail to read are set aside (:meth:`_set_aside`) and the rest read
        again; never raises for the cache's own damage."""
        import pyarrow as pa

        self._hit_parts = {}
        if not hashes or self.unusable:
            return self.schema.empty_table()
        want = pa.array(hashes, pa.string())
        for _ in range(3):  # a concurrent compaction may remove files between listing and reading
            files = self._checked_files()
            self._looked = {f.name for f in files}
            if not files:
                return self.schema.empty_table()
            try:
                found = self._read(files, want, self.schema)
                break
            except FileNotFoundError:
                continue
            except Exception:  # noqa: BLE001 - a damaged page: find the part(s), set them aside, read the rest
                found = self._read_each(files, want)
                break
        else:
            self._give_up(f"{self.dir}: its files kept changing while read")
            return self.schema.empty_table()
        if found.num_rows:
            order = np.arange(found.num_rows)
            if "nonfinite" in found.column_names:  # the rows of failures last, else in part order
                order = np.argsort(found.column("nonfinite").to_numpy(zero_copy_only=False).astype(bool), kind="stable")
            _, first = np.unique(found.column("prompt_hash").to_numpy(zero_copy_only=False)[order], return_index=True)
            found = found.take(pa.array(np.sort(order[first])))
            self._hit_parts = dict(zip(found.column("prompt_hash").to_pylist(),
                                       (os.path.basename(f) for f in found.column("__filename").to_pylist())))
        return found.select(self.schema.names)

    def served_with(self, hashes) -> dict:
        """What the scores the last :meth:`lookup` found for ``hashes`` (a subset of its hits) were computed with:
        setting -> the distinct values of their parts (``batch_size``, ``compile``, ``device``, ``engine``, as
        :func:`audit.unit.scored_with` names them), the form of a run manifest's ``scored_with``. The cache keys the
        device and ``--compile`` but not the batch size, so a part stored by a memaudit that did not record it gives
        ``unknown`` for the batch size and the engine (and the folder's key for the device and ``--compile``).
        Empty for no hashes."""
        used: dict = {}
        for name in dict.fromkeys(self._hit_parts[h] for h in hashes if h in self._hit_parts):
            for key, values in self._settings_of(name).items():
                for value in values:
                    if value not in used.setdefault(key, []):
                        used[key].append(value)
        return used

    def _settings_of(self, name: str) -> dict:
        """The recorded settings (setting -> list of values) of part ``name``, from its footer's
        :data:`SCORED_WITH_KEY`; ``unknown`` where the part holds no (readable) record."""
        if name not in self._part_settings:
            import pyarrow.parquet as pq

            try:
                record = json.loads((pq.read_schema(self.dir / name).metadata or {})[SCORED_WITH_KEY])
                record = {str(k): list(v) for k, v in record.items() if isinstance(v, list)}
            except Exception:  # noqa: BLE001 - no record (an older memaudit), or a part compacted meanwhile
                record = {}
            keyed = self._keyed_settings()
            self._part_settings[name] = record or {"batch_size": [UNKNOWN], **keyed, "engine": [UNKNOWN]}
        return self._part_settings[name]

    def _keyed_settings(self) -> dict:
        """The settings this folder's key holds (the device's kind and ``--compile``, :func:`cache_config`), as
        lists; empty when ``key.json`` cannot be read."""
        try:
            config = json.loads((self.dir / "key.json").read_bytes())["score_config"]
            return {"compile": [bool(config["compiled"])], "device": [str(config["device"])]}
        except Exception:  # noqa: BLE001
            return {}

    @staticmethod
    def _read(files: list[Path], want, schema=None):
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        schema = _schema() if schema is None else schema
        dataset = ds.dataset([str(f) for f in files], schema=schema, format=_parquet_format())
        # with the part each row came from (ScoreCache.served_with)
        return dataset.to_table(columns=schema.names + ["__filename"], filter=pc.field("prompt_hash").isin(want))

    def _read_each(self, files: list[Path], want):
        import pyarrow as pa

        tables = []
        for f in files:
            try:
                tables.append(self._read([f], want, self.schema))
            except FileNotFoundError:
                continue
            except Exception as exc:  # noqa: BLE001 - a corrupt page, a checksum mismatch
                self._set_aside(f, exc)
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def put(self, hashes: list[str], scores: dict, triggers: list, tag: str = "",
            scored_with: dict | None = None) -> None:
        """Store freshly scored prompts (arrays indexed like ``hashes``) as one new Parquet file, with page
        checksums, and ``scored_with`` (what they were scored with, :func:`audit.unit.scored_with`) in its metadata
        (:data:`SCORED_WITH_KEY`; a run they serve reports it, :meth:`served_with`). A write that fails (disk full,
        permission) is a note, not an error: the run has the scores."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from audit.tables import atomic_path

        if not hashes or self.unusable:
            return
        if self.read_only:  # counted in the one note that says the cache is read-only (merged over the units)
            at = self.notes.index(self._read_only_note())
            self._unstored += len(hashes)
            self.notes[at] = self._read_only_note()
            return
        cols = {"prompt_hash": pa.array(hashes, pa.string())}
        cols |= {c: pa.array(np.asarray(scores[c], dtype=np.float64)) for c in self.columns}
        cols["trigger_tokens"] = pa.array(triggers, self.schema.field("trigger_tokens").type)
        table = pa.table(cols, schema=self.schema)
        if scored_with:
            table = table.replace_schema_metadata({SCORED_WITH_KEY: json.dumps(
                {k: v if isinstance(v, list) else [v] for k, v in scored_with.items()}, sort_keys=True)})
        name = f"part-{tag}{'-' if tag else ''}{uuid.uuid4().hex[:12]}.parquet"
        try:
            # one put at a time in the folder, so that two runs (or Ray actors) that both missed a prompt do not both
            # store it: under the lock, the rows that another stored since this one's lookup are left out
            with self._put_lock() as locked:
                if locked:
                    table = self._not_stored_since_lookup(table)
                    if not table.num_rows:
                        return
                with atomic_path(self.dir / name) as tmp:
                    pq.write_table(table, tmp, write_page_checksum=True)
        except (OSError, RunError) as exc:
            # the reason without the part's (temporary) file name: every unit of a run meets the same read-only or
            # full folder, and merge_notes makes their notes one line (a run of 1,000 units warned 1,000 times)
            self.notes.append(f"score cache: cannot store {table.num_rows} new scores in {self.dir} "
                              f"({_os_reason(exc)}){NOT_STORED_TAIL}")
            return
        # every lookup opens every part: a run of thousands of units (a night of thousands of small files) would
        # otherwise read a cache of thousands of parts for each unit, its time growing with the square of the units
        if len(self.files()) > COMPACT_WHILE_RUNNING:
            self.compact(max_files=COMPACT_WHILE_RUNNING, big_rows=BIG_ROWS_WHILE_RUNNING)

    @contextlib.contextmanager
    def _put_lock(self):
        """Hold the folder's put lock (an exclusive ``flock`` on its ``key.json``, which every usable folder has and
        which is never replaced: no lock file beside the parts) while a part is checked and written; yields whether
        it is held. A lock not had within :data:`PUT_LOCK_WAIT_S` (a put stuck on a slow mount), or one that cannot
        be taken (no ``flock`` on the file system), yields False: the part is written unchecked, and a prompt stored
        twice is read once (:meth:`lookup`) and merged once (:meth:`compact`)."""
        import fcntl

        try:
            lock = open(self.dir / "key.json", "rb")
        except OSError:
            yield False
            return
        with lock:  # the lock goes with the file's closing
            deadline, held = time.monotonic() + PUT_LOCK_WAIT_S, False
            while not held:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = True
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.02)
                except OSError:
                    break
            yield held

    def _not_stored_since_lookup(self, table):
        """``table`` (a part about to be written) without the rows whose prompts a part written since this
        instance's lookup holds with a finite score (another run or Ray actor missed and scored them too, and stored
        them first); the parts the lookup read are not read again, and without a lookup nothing is left out. When
        they cannot be read: ``table`` whole (a damaged part is the lookup's to set aside; a prompt stored twice is
        read once)."""
        import pyarrow as pa

        if self._looked is None:  # no lookup: nothing to compare with (the units of a run always look up first)
            return table
        files = [f for f in self._checked_files() if f.name not in self._looked]
        if not files:
            return table
        try:
            found = self._read(files, table.column("prompt_hash").combine_chunks(), self.schema)
        except Exception:  # noqa: BLE001 - a part removed by a compaction meanwhile, or damaged
            return table
        if found.num_rows and "nonfinite" in found.column_names:  # a failure stored by an older memaudit: a miss
            found = found.filter(pa.array(~found.column("nonfinite").to_numpy(zero_copy_only=False).astype(bool)))
        stored = set(found.column("prompt_hash").to_pylist())
        if not stored:
            return table
        return table.filter(pa.array([h not in stored for h in table.column("prompt_hash").to_pylist()]))

    def _set_aside(self, f: Path, exc: BaseException) -> Path | None:
        """Move a damaged part to ``damaged/`` (kept for inspection, never read again), with a note; when it
        cannot be moved (``damaged`` is a file, no permission), it is skipped for this run's life.

        An operating-system error (an ``OSError`` with an errno: permission, EIO or too many open files on a
        network mount) says nothing about the file's content: such a part is skipped for this run, not moved."""
        self._bad.add(f.name)
        if isinstance(exc, OSError) and exc.errno is not None:
            self.notes.append(f"score cache: {f} cannot be read now ({_reason(exc)}); not read by this run, left "
                              "in place; its prompts are scored again")
            return None
        if self.read_only:
            self.notes.append(f"score cache: {f} cannot be read ({_reason(exc)}); left in place, not read (the "
                              f"cache cannot be written: {self.read_only}); its prompts are scored again")
            return None
        target = self.dir / "damaged" / f.name
        if target.exists():  # a part of the same name set aside before: keep both
            target = target.with_name(f"{target.stem}-{uuid.uuid4().hex[:6]}{target.suffix}")
        try:
            target.parent.mkdir(exist_ok=True)
            f.replace(target)
        except FileNotFoundError:
            if not f.exists():
                self._bad.discard(f.name)
                return None  # moved by another run
            moved, why = None, "it vanished while moved"
        except OSError as err:
            moved, why = None, _reason(err)
        else:
            moved = target
            self.moved.append(target)
        where = f"moved to {target}" if moved else f"left in place, not read (it cannot be moved aside: {why})"
        self.notes.append(f"score cache: {f} cannot be read ({_reason(exc)}); {where}; its prompts are scored again")
        return moved

    def quarantine_damaged(self) -> list[Path]:
        """Move the parts whose Parquet footer or schema is not the cache's to ``damaged/`` (see
        :meth:`_checked_files`); returns the moved files' new paths."""
        before = len(self.moved)
        self._checked_files()
        return self.moved[before:]

    def compact(self, max_files: int = 32, batch_rows: int = 65_536, big_rows: int = 2_000_000) -> int:
        """Merge the small Parquet files when there are more than ``max_files`` (a nightly cache adds a file per unit
        per night; each lookup opens every file): into one part per distinct record of what they were scored with
        (:meth:`served_with`: batch size, ``--compile``, device, engine), so a merged part's record is true of each of
        its rows. Files of ``big_rows`` rows or more
        are left alone, so a night never rewrites the whole cache. Streams record batches (their page checksums
        verified): memory stays bounded. Also removes the temporary files of writes killed more than
        :data:`STALE_TMP_S` ago. Returns the number of files merged (0 when nothing was done, when another run
        holds the compaction lock, or when the cache cannot be compacted: a note says why)."""
        if self.unusable or self.read_only:  # (a read-only cache is compacted by whoever fills it)
            return 0
        try:
            return self._compact(max_files, batch_rows, big_rows)
        except Exception as exc:  # noqa: BLE001 - a write error of any kind: nothing was changed
            self.notes.append(f"score cache: {self.dir} was not compacted ({_reason(exc)})")
            return 0

    def _compact(self, max_files: int, batch_rows: int, big_rows: int) -> int:
        import fcntl

        import pyarrow.parquet as pq

        with open(self.dir / ".compact.lock", "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another run is compacting these files
            now = time.time()
            for tmp in self.dir.glob(".part-*.tmp"):
                try:
                    if tmp.is_file() and not tmp.is_symlink() and now - tmp.stat().st_mtime > STALE_TMP_S:
                        tmp.unlink()
                except OSError:  # gone meanwhile, or not ours to remove: never a reason not to compact
                    pass
            files = []
            for f in self._checked_files():
                try:
                    if pq.ParquetFile(f).metadata.num_rows < big_rows:
                        files.append(f)
                except FileNotFoundError:  # moved aside by a lookup that found it damaged
                    continue
            if len(files) <= max_files:
                return 0
            # one merged part per distinct record of what the parts were scored with (batch size, engine, ...; an
            # unrecorded part's: unknown), so that each merged part's record is true of every row it holds: one part
            # claiming all its parts' settings made a run served a few of its rows report (and its report and diff
            # warn of) batch sizes none of them was scored at
            groups: dict[str, list[Path]] = {}
            for f in files:
                groups.setdefault(json.dumps(self._settings_of(f.name), sort_keys=True), []).append(f)
            merged: list[Path] = []
            seen = np.empty(0, dtype=np.int64)  # the prompts written with a finite score, sorted (_hash_keys)
            # a part alone with its record is rewritten too (without its own copies of a prompt, as every part is);
            # a write error after an earlier group merged leaves that group merged and the rest as they were
            for record, group in groups.items():
                done, seen = self._merge(group, record, batch_rows, seen)
                merged += done
            return len(merged)

    def _merge(self, files: list[Path], record: str, batch_rows: int, seen: np.ndarray):
        """Merge the parts ``files`` (scored with the settings ``record``, JSON, written into the merged part's
        metadata) into one new part, leaving out the prompts already written with a finite score (``seen``,
        :func:`_first_rows`), then remove them. Returns the parts merged and ``seen`` with their prompts added."""
        import pyarrow.parquet as pq

        from audit.tables import atomic_path

        merged, written = [], 0
        name = f"part-compact-{uuid.uuid4().hex[:12]}.parquet"
        schema = self.schema.with_metadata({SCORED_WITH_KEY: record})
        try:
            with (atomic_path(self.dir / name) as tmp,
                  pq.ParquetWriter(tmp, schema, write_page_checksum=True) as w):
                for f in files:
                    # only READ errors blame the part (rows written before a bad page are verified ones; the
                    # lookup dedupes their rescoring); a WRITE error (disk full, quota) propagates: the temporary
                    # file is removed, no part is touched, and compact() notes that nothing was compacted
                    try:
                        batches = pq.ParquetFile(f, page_checksum_verification=True).iter_batches(batch_rows)
                    except FileNotFoundError:
                        continue
                    except Exception as exc:  # noqa: BLE001 - a footer that cannot be read
                        self._set_aside(f, exc)
                        continue
                    while True:
                        try:
                            batch = next(batches)
                        except StopIteration:
                            merged.append(f)
                            break
                        except FileNotFoundError:
                            break
                        except Exception as exc:  # noqa: BLE001 - a corrupt page
                            self._set_aside(f, exc)
                            break
                        batch, seen = _first_rows(batch, seen)
                        w.write_batch(batch)
                        written += batch.num_rows
                if not written:  # every part failed before its first row (or held none): commit no empty part
                    raise _NothingWritten
        except _NothingWritten:
            pass
        for f in merged:
            f.unlink(missing_ok=True)
        return merged, seen


def _hash_keys(column) -> np.ndarray:
    """A 64-bit key of each prompt hash of a part's ``prompt_hash`` column (Python's ``hash`` of its text: the same
    within a process, which a compaction is), as int64: what a compaction tells prompts apart by, in 8 bytes a prompt
    (two prompts sharing a key, about one chance in 10^7 for 2,000,000 prompts, would leave one of them out of the
    merged part: scored again, never a wrong score)."""
    return np.fromiter((hash(h) for h in column.to_pylist()), dtype=np.int64, count=len(column))


def _first_rows(batch, seen: np.ndarray):
    """``batch`` of a part being compacted without the rows of prompts already written with a finite score (``seen``,
    sorted keys, :func:`_hash_keys`) or earlier in the batch: two runs sharing a cache, or an earlier memaudit, may
    have stored a prompt twice, and the merged part keeps its first finite row, the one a lookup reads. A row with
    ``nonfinite`` set (a failure an older memaudit stored) is kept: a lookup prefers the prompt's finite row to it.
    Returns the batch and ``seen`` with its prompts added."""
    import pyarrow as pa

    keys = _hash_keys(batch.column(batch.schema.get_field_index("prompt_hash")))
    finite = np.ones(len(keys), dtype=bool)
    if "nonfinite" in batch.schema.names:
        finite = ~batch.column(batch.schema.get_field_index("nonfinite")).to_numpy(zero_copy_only=False).astype(bool)
    idx = np.flatnonzero(finite)
    k = keys[idx]
    first = np.zeros(len(idx), dtype=bool)
    first[np.unique(k, return_index=True)[1]] = True  # the first row of each prompt in the batch
    if len(seen):
        at = np.minimum(np.searchsorted(seen, k), len(seen) - 1)
        first &= seen[at] != k
    if first.all():
        return batch, np.union1d(seen, k)
    keep = ~finite
    keep[idx[first]] = True
    return batch.filter(pa.array(keep)), np.union1d(seen, k[first])


class _NothingWritten(Exception):
    """A compaction read no row: its new part is not committed (:func:`audit.tables.atomic_path` removes it)."""


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _os_reason(exc: BaseException) -> str:
    """The operating system's reason for ``exc`` (or for the ``OSError`` that caused it), without the file name
    that pyarrow and :func:`audit.tables.atomic_path` put in their messages; else :func:`_reason`."""
    err = exc if isinstance(exc, OSError) else exc.__cause__
    if isinstance(err, OSError) and err.errno:
        return f"{type(err).__name__}: [Errno {err.errno}] {os.strerror(err.errno)}"
    return _reason(exc)


NOT_STORED_TAIL = "; they are in this run's table, and scored again next time"
_NOT_STORED = re.compile(r"score cache: cannot store (\d+) new scores in (.*)" + re.escape(NOT_STORED_TAIL))
READ_ONLY_MIDDLE = "lookups only, its scores are served and new scores are not stored ("
_READ_ONLY = re.compile(r"(score cache: .* cannot be written \(.*\): " + re.escape(READ_ONLY_MIDDLE) + r")(\d+)"
                        + re.escape(" this run" + NOT_STORED_TAIL + ")"))


def not_writable(folder: Path) -> str | None:
    """Why the existing ``folder`` cannot be written in ("on a read-only file system", "no write permission"), or
    None when it can (or does not exist: whoever makes it says why not). ``os.access`` answers for root too on a
    read-only mount (``EROFS``); ``statvfs``'s ``ST_RDONLY`` tells a read-only mount from a permission. A path
    that cannot even be looked at (a name longer than the file system takes, a loop of links) is None too: the
    check that makes the folder names that."""
    try:
        if not folder.is_dir() or os.access(folder, os.W_OK | os.X_OK):
            return None
    except OSError:  # Path.is_dir raises ENAMETOOLONG and ELOOP (it answers False only for a missing path)
        return None
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (not POSIX), or the folder vanished
        read_only = False
    return "on a read-only file system" if read_only else "no write permission"


def counts_prompts(note: str) -> bool:
    """Whether ``note`` counts the prompts a cache instance did not store (summed by :func:`merge_notes`)."""
    return bool(_NOT_STORED.fullmatch(note) or _READ_ONLY.fullmatch(note))


def merge_notes(notes: list[str]) -> list[str]:
    """The cache notes of a run's units, each once in the order met, the units' "cannot store N new scores in DIR
    (reason)" notes of one folder and reason made one, their N summed (the run's total not stored)."""
    merged: dict[tuple[str, str], int | None] = {}
    for note in notes:
        if m := _NOT_STORED.fullmatch(note):
            merged[("store", m.group(2))] = (merged.get(("store", m.group(2))) or 0) + int(m.group(1))
        elif m := _READ_ONLY.fullmatch(note):  # a read-only cache's line, with the run's total not stored
            merged[("read-only", m.group(1))] = (merged.get(("read-only", m.group(1))) or 0) + int(m.group(2))
        else:
            merged.setdefault(("", note), None)
    return [note if kind == "" else
            f"score cache: cannot store {n} new scores in {note}{NOT_STORED_TAIL}" if kind == "store" else
            f"{note}{n} this run{NOT_STORED_TAIL})" for (kind, note), n in merged.items()]


def _schema_difference(schema, want=None) -> str:
    want = _schema() if want is None else want
    missing = [n for n in want.names if n not in schema.names]
    if missing:
        return f"no column {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    for field in want:
        got = schema.field(field.name).type
        if got != field.type:
            return f"column {field.name} is {got}, not {field.type}"
    return "other columns or metadata"


def open_cache(root: str | Path | None, scorer, device: str) -> ScoreCache | None:
    """The cache of ``scorer``'s model, score configuration, compilation and ``device`` (its kind,
    :func:`audit.models.base.device_kind`) under ``root`` (None without ``--cache``). For a scorer memaudit does not
    ship, its code is keyed too (:func:`audit.scorers.registry.code_identity`): an edited formula, or a
    ``higher_is_riskier`` flipped, was served the old scores from the cache."""
    if not root:
        return None
    from audit.scorers.registry import recorded_config

    # a contributed scorer's code is keyed too (recorded_config)
    score_config = recorded_config(scorer.config.to_dict() | {"first_timestep": scorer.first_timestep})
    sc = cache_config(score_config, device, getattr(scorer, "compiled", False))
    return ScoreCache(root, scorer.model.fingerprint, sc)


def cached_scores(cache: ScoreCache, prompts: list[str], hashes: list[str], score_fn, progress=None, tag: str = "",
                  settings=None):
    """Like :func:`audit.unit.score_prompts`, reading known prompts from ``cache``.

    ``score_fn(prompts)`` scores the misses and returns ``(scores, triggers, errors)``. Newly scored
    prompts without errors and with finite attention (``nonfinite`` unset, else the run rejects them as
    ``nonfinite_attention``) are added to the cache, with ``settings()`` (called after ``score_fn``: what they were
    scored with, :func:`audit.unit.scored_with`; :meth:`ScoreCache.served_with` gives it back); a cached row with
    ``nonfinite`` set (written before that rule) is a miss, so a failure is never served again. Returns
    ``(scores, triggers, errors, hits)``.
    """
    n = len(prompts)
    found = cache.lookup(hashes)
    if found.num_rows and "nonfinite" in found.column_names:
        bad = found.column("nonfinite").to_numpy(zero_copy_only=False).astype(bool)
        if bad.any():
            import pyarrow as pa

            found = found.filter(pa.array(~bad))
    pos = {h: i for i, h in enumerate(hashes)}
    hit_idx = np.asarray([pos[h] for h in found.column("prompt_hash").to_pylist()], dtype=np.int64)
    is_hit = np.zeros(n, dtype=bool)
    is_hit[hit_idx] = True
    miss_idx = np.flatnonzero(~is_hit)
    # NaN where a fresh run leaves a column unset: another scorer's own columns, which the cache does not hold
    scores = {c: np.full(n, np.nan) for c in result_columns()}
    triggers: list = [None] * n
    if len(hit_idx):
        for c in cache.columns:
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
        ok = [j for j in range(len(miss_idx)) if j not in m_errors and not m_scores["nonfinite"][j]]
        cache.put([hashes[miss_idx[j]] for j in ok], {c: m_scores[c][ok] for c in cache.columns},
                  [m_triggers[j] for j in ok], tag=tag, scored_with=settings() if settings else None)
    return scores, triggers, errors, int(len(hit_idx))
