"""Table schemas (from ``schemas/*.json``) and checked, atomic Parquet/JSON writes.

Every table memaudit writes is checked against its schema first; a mismatch is a bug and raises
:class:`SchemaError` instead of writing a file other tools would misread. Files are written to a
temporary name in the same folder and renamed into place, so a reader (or a rerun after a kill) never
sees half a file.

Owns the table schemas, the one atomic-write helper (:func:`atomic_path`) and the one finished-run check
(:func:`finished_run`). Must not import torch or any module that does work (the risk table's score columns
come from the light scorer registry).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
import json
import math
import os
import re
from pathlib import Path
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from audit.errors import RunError, SchemaError
from audit.sources import LOCK_NAME
from audit.text import threshold_text

TRIGGER_TYPE = pa.list_(pa.struct([("token", pa.string()), ("position", pa.int32()), ("mass", pa.float64()),
                                    ("start", pa.int32()), ("end", pa.int32())]))
_TYPES = {
    "int64": pa.int64(), "int32": pa.int32(), "double": pa.float64(), "bool": pa.bool_(),
    "string": pa.string(), str(TRIGGER_TYPE): TRIGGER_TYPE,
}



@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    """The JSON schema document ``schemas/<name>.json`` (shipped as package data ``audit.schemas``)."""
    return json.loads(resources.files("audit.schemas").joinpath(f"{name}.json").read_text())


def schema_fields(name: str) -> list[dict]:
    """The fields of table ``name`` as ``schemas/<name>.json`` lists them, except that the risk table's score
    columns (from ``risk`` up to ``trigger_tokens``) come from the scorer registry
    (:func:`audit.scorers.score_columns`), the one place they are defined; the test suite checks that
    ``schemas/risk.json`` lists the same for the built-in scorers."""
    fields = load_schema(name)["fields"]
    if name != "risk":
        return fields
    from audit.scorers import score_columns

    names = [f["name"] for f in fields]
    start, stop = names.index("risk"), names.index("trigger_tokens")
    scores = [{"name": c.name, "type": c.type, "nullable": nullable, "description": c.description}
              for c, nullable in score_columns()]
    return fields[:start] + scores + fields[stop:]


def arrow_schema(name: str, extra_columns: tuple[str, ...] = (), metadata: dict | None = None) -> pa.Schema:
    """Arrow schema of table ``name`` with ``extra_columns`` (strings) appended."""
    doc = load_schema(name)
    fields = [pa.field(f["name"], _TYPES[f["type"]], nullable=f["nullable"]) for f in schema_fields(name)]
    fields += [pa.field(c, pa.string()) for c in extra_columns if c not in {f.name for f in fields}]
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    meta["memaudit.schema"] = f"{doc['name']}/{doc['version']}"
    return pa.schema(fields, metadata=meta)


def check_table(table: pa.Table, name: str, extra_columns: tuple[str, ...] = ()) -> None:
    """Raise :class:`SchemaError` unless ``table`` has exactly the schema's columns, types and nullability."""
    expected = arrow_schema(name, extra_columns)
    got = [(f.name, str(f.type)) for f in table.schema]
    want = [(f.name, str(f.type)) for f in expected]
    if got != want:
        raise SchemaError(f"{name} table does not match schemas/{name}.json: got {got}, expected {want}")
    for f in expected:
        if not f.nullable and table.column(f.name).null_count:
            raise SchemaError(f"{name}.{f.name} has nulls but the schema says it is not nullable")


def tmp_path(path: Path) -> Path:
    """A unique temporary name beside ``path`` (same folder, so the final rename is atomic), :data:`TMP_NAME`."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


TMP_NAME = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}\.tmp")  # tmp_path's names; ``name``: the file it becomes

# a temporary file of an output that is older than this was left by a killed write (a report, diff or calibration is
# written in seconds): removed by the next write of the same file (atomic_path's ``sweep``)
STALE_OUTPUT_TMP_S = 3600


def sweep_stale_temporaries(path: Path, older_than: float = STALE_OUTPUT_TMP_S) -> int:
    """Remove the temporary files of ``path`` (:func:`tmp_path`'s names for it) last modified more than
    ``older_than`` seconds ago: what a SIGKILL (the OOM killer, a preempted node) left while ``path`` was written,
    which no run folder's sweep reaches (a report, diff or calibration written anywhere with ``-o``). A write of the
    same file in progress elsewhere is younger and kept. Returns how many were removed."""
    import glob
    import time

    removed, now = 0, time.time()
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        m = TMP_NAME.fullmatch(p.name)
        try:
            if m and m["name"] == path.name and p.is_file() and not p.is_symlink() \
                    and now - p.stat().st_mtime > older_than:
                p.unlink()
                removed += 1
        except OSError:  # gone meanwhile, or not ours to remove: never a reason not to write
            pass
    return removed


@contextmanager
def atomic_path(path: str | Path, sweep: bool = False) -> Iterator[Path]:
    """The one atomic-write helper: yields a temporary path beside ``path`` to write to; on a clean exit
    it is flushed to disk (``fsync``) and renamed onto ``path`` (``os.replace``), on an error removed. A reader,
    or a rerun after a kill or a power cut, never sees half a file.

    A link is written through (its target is replaced, the link kept); a device, pipe or socket at ``path``
    is refused, never replaced by a plain file. ``sweep``: first remove the stale temporary files a killed write of
    ``path`` left (:func:`sweep_stale_temporaries`; for the outputs of report, diff and calibrate).

    Raises:
        RunError: ``path`` is a folder or not a regular file, or its folder does not exist, or writing there is not
            permitted (a read-only folder: named, not the temporary file).
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_dir() and not path.is_file():
        raise RunError(f"{path} is not a regular file (a device, pipe or socket): give a file path to write")
    if path.is_dir():
        raise RunError(f"{path} is a folder: give a file path to write")
    if not path.parent.is_dir():
        raise RunError(f"{path}: no such folder {path.parent}")
    if sweep:
        sweep_stale_temporaries(path)
    tmp = tmp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as fh:  # on disk before the rename: a power cut leaves the old file or the whole new one
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if _no_permission(exc):  # a read-only run folder: said with the file meant, not the temporary one
            denied = RunError(f"cannot write {path}: no write permission in {path.parent} (make it writable, or "
                              "write elsewhere)")
            denied.memaudit_path = str(path)  # guarded names the command's option that writes elsewhere
            raise denied from exc
        # the file meant, for the command's one line (audit.cli.common.guarded): a write that fails on a full disk
        # names no file (`report -o /other/disk/r.html` said only "no space left on the device"), and setting
        # ``filename`` would change the text of pyarrow's errors, which carry no errno ("[Errno None] None: ...")
        exc.memaudit_path = str(path)
        raise
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only or vanished folder: the error that stopped the write is the one to report
            pass


def _no_permission(exc: OSError) -> bool:
    """Whether ``exc`` is a denied permission: Python's ``PermissionError`` (EACCES, EPERM) or pyarrow's OSError,
    which carries no errno, only ``[errno 13] Permission denied`` in its text."""
    return isinstance(exc, PermissionError) or (exc.errno is None and "[errno 13] Permission denied" in str(exc))


def column_ranges(meta, name: str) -> list[tuple | None]:
    """Per non-empty row group of a Parquet file's footer (``pq.read_metadata``), the ``(min, max)`` statistics of
    top-level column ``name``, or None for a group without exact ones (none written, or truncated: a very long
    string). Reads no data page.

    Raises:
        ValueError: no column ``name``.
    """
    index = [meta.schema.column(j).path for j in range(meta.num_columns)].index(name)  # nested columns: several
    out = []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        if group.num_rows == 0:  # an empty file's one empty group has no statistics
            continue
        stats = group.column(index).statistics
        exact = stats is not None and stats.has_min_max and getattr(stats, "is_min_value_exact", True) \
            and getattr(stats, "is_max_value_exact", True)
        out.append((stats.min, stats.max) if exact else None)
    return out


def finished_run(run_dir: str | Path, needs: tuple[str, ...] = ("risk.parquet", "manifest.json"),
                 error: type[Exception] = RunError) -> dict:
    """The one check that ``run_dir`` is a finished run: every file of ``needs`` exists.

    Returns the run's manifest (``manifest.json``) as a dict.

    Raises:
        error (a :class:`audit.errors.RunError` subclass by default): naming the first missing file.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.stat()
    except FileNotFoundError:
        pass  # said below, with what to give instead
    except OSError as exc:  # a name over 255 bytes, a folder above it that cannot be searched, a loop of links
        raise error(f"{run_dir} cannot be read ({exc.strerror or type(exc).__name__}): give a run folder (the --out "
                    "of memaudit run)") from None
    from audit.sources import name_not_utf8, locale_hint

    if run_dir.exists() and (shown := name_not_utf8(str(run_dir))) is not None:  # pyarrow opens UTF-8 paths only:
        # `memaudit report`, `diff` and `calibrate` of such a folder exited 1 with "UnicodeEncodeError: 'utf-8' codec
        # can't encode character '\udcff' ... surrogates not allowed"
        raise error(f"{shown}: its name is not UTF-8 text{locale_hint()}, and the tables' reader opens only UTF-8 "
                    "paths: rename it (or the folder above it that is not), e.g. convmv -f latin1 -t utf8 --notest")
    if run_dir.is_file():  # RUN/risk.parquet given for RUN
        raise error(f"{run_dir} is a file: give the run folder{f' ({run_dir.parent})' if run_dir.name in needs else ''}")
    if not run_dir.exists():
        raise error(f"{run_dir} does not exist: give a run folder (the --out of memaudit run)")
    for name in needs:
        if not (run_dir / name).exists():
            started = (run_dir / "run.json").exists()  # written when a run starts in the folder
            if started and being_written(run_dir):
                raise error(f"{run_dir} is being written by a memaudit run right now{held_by(run_dir)} "
                            f"(no {name} yet): wait for it to finish")
            if name != "manifest.json" and (run_dir / "manifest.json").is_file():  # written last: it had finished
                raise error(f"{run_dir} is a finished memaudit run that lost its {name}: rerun its command with the "
                            "same --out to write it again")
            raise error(f"{run_dir} is not a finished memaudit run (no {name})" + (
                f": a run started there{unfinished_progress(run_dir)} and did not finish; rerun its command with the "
                "same --out to resume it" if started else ""))
        if not (run_dir / name).is_file():
            raise error(f"{run_dir / name} is a folder, not a file: not an intact memaudit run")
    path = run_dir / "manifest.json"
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # also an integer of 4,300+ digits, deep nesting
        raise error(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}): not an intact memaudit "
                    "run") from None
    counts = manifest.get("counts") if isinstance(manifest, dict) else None
    whole = isinstance(counts, dict) and all(type(counts.get(k)) is int  # (a bool is an int to isinstance)
                                             for k in ("rows_read", "scored", "rejected"))
    if not whole or not isinstance(manifest.get("model"), dict):
        raise error(f"{path} lacks the run's counts or model: not an intact memaudit run")
    for key, kind in (("score_config", dict), ("skipped_files", list), ("calibration", dict), ("confirm", dict),
                      ("cache", dict)):
        if manifest.get(key) is not None and not isinstance(manifest[key], kind):
            raise error(f"{path}: {key} is a {type(manifest[key]).__name__}, not a{'' if kind is list else 'n'} "
                        f"{'list' if kind is list else 'object'}: not an intact memaudit run")
    cal = manifest.get("calibration")
    if cal is not None and (not isinstance(cal.get("threshold"), (int, float)) or isinstance(cal["threshold"], bool)
                            or not math.isfinite(cal["threshold"])):  # json reads NaN and Infinity
        raise error(f"{path}: calibration.threshold {cal.get('threshold')!r} is not a finite number: not an intact "
                    "memaudit run")
    if cal is not None and cal.get("fpr") is not None and (  # the reports print it as a number (None: unknown)
            not isinstance(cal["fpr"], (int, float)) or isinstance(cal["fpr"], bool) or not 0 < cal["fpr"] < 1):
        raise error(f"{path}: calibration.fpr {cal.get('fpr')!r} is not a number between 0 and 1: not an intact "
                    "memaudit run")
    if any(not isinstance(s, dict) for s in manifest.get("skipped_files") or []):
        raise error(f"{path}: skipped_files holds an entry that is not an object: not an intact memaudit run")
    cache = manifest.get("cache")
    if cache is not None and (type(cache.get("hits")) is not int or cache["hits"] < 0):
        raise error(f"{path}: cache.hits {cache.get('hits')!r} is not a whole number: not an intact memaudit run")
    for name, columns in RUN_TABLE_COLUMNS.items():
        if name in needs:
            _check_run_table(run_dir / name, columns, manifest, error)
    return manifest


def unfinished_progress(run_dir: Path) -> str:
    """How far the run that started in ``run_dir`` and did not finish got, from what it left: ``" at 2026-12-08T05:00:33
    +00:00 (16 of 20 units finished)"`` (its ``run.json``'s start time and planned units, and the committed units'
    ``shards/unit-*.done.json``), for the line that refuses to read the folder: someone handed the folder can tell a run
    killed at its start from one killed near its end; ``" at ... (all 20 units finished, not its final tables)"`` where
    every unit was committed (a rerun writes the tables from the shards). Empty where ``run.json`` cannot be read or
    records neither."""
    try:
        identity = json.loads((Path(run_dir) / "run.json").read_bytes())
        done = sum(1 for _ in (Path(run_dir) / "shards").glob("unit-*.done.json"))
    except (OSError, ValueError, RecursionError):
        return ""
    if not isinstance(identity, dict):
        return ""
    started, units = identity.get("started_at"), identity.get("units")
    when = f" at {started}" if isinstance(started, str) else ""
    if isinstance(units, int) and not isinstance(units, bool) and done >= units > 0:  # stopped (or a table lost)
        return f"{when} (all {units} units finished, not its final tables)"  # after its last unit
    planned = f" of {units}" if isinstance(units, int) and not isinstance(units, bool) else ""
    return f"{when} ({done}{planned} units finished)" if when or planned else ""


def being_written(run_dir: Path) -> bool:
    """Whether a run holds the folder's lock now (:func:`audit.pipeline.out_lock`); the lock is only tried."""
    import fcntl

    try:
        with open(run_dir / LOCK_NAME, "rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    except OSError:  # no lock file: no run holds it
        return False
    return False


def lock_holder(out: Path) -> str | None:
    """Who holds ``out``'s lock, as :func:`out_lock` records it in the lock file ("process 4242 on host node-7,
    since 2026-12-07T02:00:03+00:00"); ``None`` when the file says nothing readable (written by an earlier memaudit)."""
    try:
        with open(Path(out) / LOCK_NAME, "rb") as fh:
            words = fh.read(512).decode("utf-8").split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(words) != 3 or not words[0].isdigit():
        return None
    return f"process {words[0]} on host {words[1]}, since {words[2]}"


def held_by(out: Path) -> str:
    """:func:`lock_holder` as the clause the busy messages put after "right now": ``" (process ...)"``, or ``""``."""
    holder = lock_holder(out)
    return f" ({holder})" if holder else ""


# the columns of a run's tables that reading it relies on (report, diff, calibrate)
RUN_TABLE_COLUMNS = {"risk.parquet": ("prompt_id", "prompt", "prompt_hash", "risk", "rank"),
                     "rejects.parquet": ("row", "reason")}
_COUNT_OF = {"risk.parquet": "scored", "rejects.parquet": "rejected"}


def _check_run_table(path: Path, columns: tuple[str, ...], manifest: dict, error: type[Exception]) -> None:
    """``path`` (a run's risk or rejects table) has ``columns`` with the schema's types, as many rows as
    the manifest counts, the manifest's model and score configuration in its metadata, and (risk) only finite
    risks: a swapped, truncated or hand-edited table is refused, never summarized."""
    name = path.name
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except (OSError, pa.ArrowException) as exc:
        raise error(f"{path} cannot be read as Parquet ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}): not an intact memaudit run") from None
    if missing := [c for c in columns if c not in schema.names]:
        raise error(f"{path} lacks column(s) {', '.join(missing)}: not a memaudit {name}")
    if twice := sorted({c for c in schema.names if schema.names.count(c) > 1}):  # pyarrow finds no such column
        raise error(f"{path} has column(s) {', '.join(twice)} more than once: not an intact memaudit run")
    want = arrow_schema(name.split(".")[0])
    for f in want:
        if f.name in schema.names and schema.field(f.name).type != f.type:
            raise error(f"{path}: column {f.name} is {schema.field(f.name).type}, expected {f.type}: "
                        "not an intact memaudit run")
    count = manifest["counts"][_COUNT_OF[name]]
    if meta.num_rows != count:
        raise error(f"{path} has {meta.num_rows} rows but manifest.json counts {count} "
                    f"{_COUNT_OF[name]}: the table or the manifest was replaced or truncated")
    table_meta = schema.metadata or {}
    for key in ("score_config", "model"):
        raw = table_meta.get(f"memaudit.{key}".encode())
        if raw is None or manifest.get(key) is None:
            continue
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            value = None
        mine = manifest[key]
        same = value == mine if key == "score_config" else (
            isinstance(value, dict) and value.get("fingerprint") == mine.get("fingerprint"))
        if not same:
            raise error(f"{path} was written with another {key.replace('_', ' ')} than manifest.json records: "
                        "the table comes from another run")
    if name == "risk.parquet" and b"memaudit.model" in table_meta:  # written by a run's finalize, not by hand
        _check_table_calibration(path, table_meta.get(b"memaudit.calibration"), manifest.get("calibration"), error)
    if name == "risk.parquet" and count:
        import pyarrow.compute as pc

        risk = pq.read_table(path, columns=["risk"])["risk"]
        bad = risk.null_count + int(pc.sum(pc.invert(pc.is_finite(risk.drop_null()))).as_py() or 0)
        if bad:
            raise error(f"{path}: {bad} of {count} risks are null or not finite numbers: not an intact memaudit run")


def _check_table_calibration(path: Path, raw: bytes | None, recorded: dict | None, error: type[Exception]) -> None:
    """Refuse a risk table whose flags came from another calibration than manifest.json records: finalize writes
    risk.parquet, then the manifest, so a rerun that re-merged a finished run with a new ``--calibration`` (or without
    one) and was killed between the two left the new flags beside the old threshold; the report counted 106 rows
    flagged "risk > 4.34351", a threshold that flags 8. ``raw``: the table's ``memaudit.calibration`` metadata
    (absent when it was merged without a calibration)."""
    try:
        table_cal = json.loads(raw) if raw is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        table_cal = {}
    threshold = table_cal.get("threshold") if isinstance(table_cal, dict) else None
    recorded_threshold = recorded.get("threshold") if isinstance(recorded, dict) else None
    if (table_cal is None) != (recorded is None) or threshold != recorded_threshold:
        def said(t, side):  # two thresholds 1e-7 apart read as two numbers (threshold_text reads back exactly)
            return "no calibration" if t is None else f"risk > {threshold_text(t)}" \
                if isinstance(t, (int, float)) else repr(t)
        why = (f"a memaudit run is writing this folder right now{held_by(path.parent)}: wait for it to "
               "finish" if being_written(path.parent)
               else "a rerun of this folder stopped before it finished; rerun its command with the same --out to "
                    "finish it")
        table_side = ("calibration metadata that cannot be read" if table_cal is not None and threshold is None
                      else said(threshold if table_cal is not None else None, "table"))
        manifest_side = said(recorded_threshold if recorded is not None else None, "manifest")
        raise error(f"{path} was flagged with another calibration ({table_side}) than manifest.json records "
                    f"({manifest_side}): {why}")


def write_parquet_atomic(table: pa.Table, path: Path, name: str, extra_columns: tuple[str, ...] = (),
                         metadata: dict | None = None, row_group_size: int | None = None) -> None:
    """Check ``table`` against schema ``name``, attach ``metadata`` and write it to ``path`` atomically.

    ``row_group_size`` bounds the rows a reader decodes at once (shards: the k-way merge holds one row
    group per shard in memory).

    Raises:
        audit.errors.SchemaError: ``table`` does not match schema ``name``.
        audit.errors.RunError: ``path`` is a folder or not a regular file, or its folder does not exist.
    """
    check_table(table, name, extra_columns)
    table = table.replace_schema_metadata(arrow_schema(name, extra_columns, metadata).metadata)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)


def write_json_atomic(obj, path: Path, sweep: bool = False) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (``sweep``: as :func:`atomic_path`'s).

    Raises:
        audit.errors.RunError: ``path`` is a folder or not a regular file, or its folder does not exist.
    """
    with atomic_path(path, sweep=sweep) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def check_manifest(manifest: dict) -> None:
    """Raise :class:`SchemaError` if ``manifest`` lacks a required key or its counts do not reconcile."""
    doc = load_schema("manifest")
    kinds = {"int": int, "str": str, "list": list, "dict": dict, "float": (int, float)}
    for key, kind in doc["required"].items():
        if not isinstance(manifest.get(key), kinds[kind]):
            raise SchemaError(f"manifest.{key} missing or not a {kind}")
    counts = manifest["counts"]
    for key in doc["counts"]:
        if key not in counts:
            raise SchemaError(f"manifest.counts.{key} missing")
    if counts["rows_read"] != counts["scored"] + counts["rejected"]:
        raise SchemaError(f"counts do not reconcile: read {counts['rows_read']} != scored {counts['scored']} "
                          f"+ rejected {counts['rejected']}")
    if counts["rejected"] != sum(counts["rejected_by_reason"].values()):
        raise SchemaError("counts do not reconcile: rejected != sum of rejected_by_reason")
