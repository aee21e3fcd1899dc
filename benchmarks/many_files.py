"""A folder of many small files: small units scored together (``audit.unit.group_units``) against one group per
unit (each file's prompts in forwards of their own, as before groups), in the same process, alternated.

Writes ``--files`` Parquet files of ``--rows`` prompts each (distinct 6-16 word captions), then runs ``audit.run``
on the folder with the bundled lab model on the CPU: the "grouped" arm as memaudit runs it, and the "per_unit" arm
with the driver's group bound (``audit.runner.group_rows``) patched to 1 row, so that every unit is a group of one.
A warm-up run pays the imports and the first model load. Prints each arm's files/s (median of ``--repeats``) and
``grouped_vs_per_unit`` (the ratio of the medians), and checks that both arms give the same risk table.

``--stand-in`` replaces the model's forward with ``host_ceiling.py``'s zero-cost BENCHMARK FIXTURE (this process
only): what a file costs the host (read, shard writes, commit, merge) when the device is free, the ceiling for a
GPU host.

``--open-latency-ms MS`` (a BENCHMARK FIXTURE too) makes every open of an input file through fsspec wait MS
milliseconds first, as an object store does (tens of ms on S3): planning (a footer or the lines of each file) and
reading both pay it. It adds the arm "grouped_one_reader": files planned and read one after another
(``audit.sources.PLAN_THREADS`` and ``audit.unit.READ_THREADS`` = 1) instead of 8 at once.

``--empty-rejects-shards`` adds the arm "empty_rejects_shards": grouped, with each unit that rejected nothing also
given an empty rejects shard (written and fsync'ed as every unit's was before 2026-12-07, and read by the final
concatenation), to measure what leaving them out saves.

    python benchmarks/many_files.py [--files 2000] [--rows 1] [--repeats 3] [--batch-size 256] [--stand-in]
                                    [--open-latency-ms MS] [--empty-rejects-shards]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from pathlib import Path
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_files(folder: Path, files: int, rows: int, seed: int = 0) -> Path:
    """``files`` Parquet files of ``rows`` distinct prompts each under ``folder``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = ("a photo of the red blue green cat dog house tree on in with at by painting portrait city night "
             "sunset beautiful detailed art style oil watercolor man woman child car street river").split()
    folder.mkdir(parents=True)
    for f in range(files):
        prompts = [" ".join(rng.choice(words, int(rng.integers(6, 17)))) + f" {f}-{i}" for i in range(rows)]
        pq.write_table(pa.table({"prompt": prompts}), folder / f"part-{f:05d}.parquet")
    return folder


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=1, help="prompts per file")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--stand-in", action="store_true",
                    help="the zero-cost forward of host_ceiling.py (a benchmark fixture): the host's cost per file")
    ap.add_argument("--open-latency-ms", type=float, default=0.0,
                    help="wait this long at each open of an input file (a benchmark fixture: an object store's "
                         "latency)")
    ap.add_argument("--empty-rejects-shards", action="store_true",
                    help="add an arm writing an empty rejects shard for every unit (as before 2026-12-07)")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)

    import polars as pl

    import audit
    import audit.runner
    import audit.unit

    if a.stand_in:
        sys.path.insert(0, str(Path(__file__).parent))
        from host_ceiling import zero_cost_launch

        from audit.scorers import Scorer

        Scorer.launch = zero_cost_launch  # the fixture: this process only
    import audit.sources

    if a.open_latency_ms:
        from fsspec.implementations.local import LocalFileSystem

        local_open = LocalFileSystem._open

        def slow_open(self, path, *args, **kwargs):  # the fixture: this process only
            time.sleep(a.open_latency_ms / 1000)
            return local_open(self, path, *args, **kwargs)

        LocalFileSystem._open = slow_open
    grouped_rows, threads = audit.runner.group_rows, audit.unit.READ_THREADS
    arms = {"grouped": (grouped_rows, threads), "per_unit": (lambda cfg, plan, engine: 1, threads)}
    if a.open_latency_ms:
        arms["grouped_one_reader"] = (grouped_rows, 1)
    if a.empty_rejects_shards:
        arms["empty_rejects_shards"] = (grouped_rows, threads)
    write_unit = audit.unit._write_unit

    def with_empty_rejects_shard(*args, **kwargs):  # _write_unit's arguments, whatever they are
        out = write_unit(*args, **kwargs)
        given = inspect.signature(write_unit).bind(*args, **kwargs).arguments
        unit, cfg, shard_dir = given["unit"], given["cfg"], given["shard_dir"]
        path = audit.unit.shard_paths(shard_dir, unit)[1]
        if not path.exists():  # the shard the code wrote for every unit before 2026-12-07
            audit.unit.write_parquet_atomic(audit.unit.arrow_schema("rejects", cfg.keep_columns).empty_table(), path,
                                            "rejects", cfg.keep_columns)
        return out
    walls: dict[str, list[float]] = {k: [] for k in arms}
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_files(Path(tmp) / "files", a.files, a.rows)
        options = dict(batch_size=a.batch_size, device="cpu", log=lambda m: None)
        audit.run(write_files(Path(tmp) / "warm", 20, a.rows, seed=1), out=Path(tmp) / "warm-out", **options)
        for r in range(a.repeats):
            for name, (bound, readers) in (arms.items() if r % 2 == 0 else reversed(arms.items())):
                audit.runner.group_rows, audit.unit.READ_THREADS = bound, readers
                audit.sources.PLAN_THREADS = readers
                audit.unit._write_unit = with_empty_rejects_shard if name == "empty_rejects_shards" else write_unit
                out = Path(tmp) / f"{name}-{r}"
                t0 = time.perf_counter()
                _, manifest = audit.run(folder, out=out, **options)
                walls[name].append(time.perf_counter() - t0)
                counts = manifest["counts"]
                assert counts["rows_read"] == counts["scored"] == a.files * a.rows, counts
                tables[name] = pl.read_parquet(out / "risk.parquet").select("prompt_id", "risk").sort("prompt_id")
        audit.runner.group_rows, audit.unit.READ_THREADS = grouped_rows, threads
        audit.sources.PLAN_THREADS = threads
        audit.unit._write_unit = write_unit
    same = all(t.equals(tables["grouped"]) for t in tables.values())
    med = {k: statistics.median(v) for k, v in walls.items()}
    result = {"files": a.files, "rows_per_file": a.rows, "batch_size": a.batch_size, "stand_in": a.stand_in,
              "open_latency_ms": a.open_latency_ms, "read_threads": threads,
              "model": "lab (bundled)", "device": "cpu",
              "wall_s": {k: [round(w, 3) for w in v] for k, v in walls.items()},
              "files_per_s": {k: round(a.files / v, 1) for k, v in med.items()},
              "grouped_vs_per_unit": round(med["per_unit"] / med["grouped"], 3), "same_risk_table": same}
    if "grouped_one_reader" in med:
        result["grouped_vs_one_reader"] = round(med["grouped_one_reader"] / med["grouped"], 3)
    if "empty_rejects_shards" in med:
        result["grouped_vs_empty_rejects_shards"] = round(med["empty_rejects_shards"] / med["grouped"], 3)
    print(f"grouped: {result['files_per_s']['grouped']:,.1f} files/s, one group per unit: "
          f"{result['files_per_s']['per_unit']:,.1f} files/s; grouped_vs_per_unit {result['grouped_vs_per_unit']} "
          f"({a.files:,} files of {a.rows} prompt(s), median of {a.repeats}; same risk table: {same})")
    if "grouped_one_reader" in med:
        print(f"with {a.open_latency_ms:g} ms a file: {threads} readers vs one, grouped_vs_one_reader "
              f"{result['grouped_vs_one_reader']}")
    if "empty_rejects_shards" in med:
        print(f"empty rejects shards as before: {result['files_per_s']['empty_rejects_shards']:,.1f} files/s, "
              f"grouped_vs_empty_rejects_shards {result['grouped_vs_empty_rejects_shards']}")
    print(json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    if not same:
        raise SystemExit("the arms' risk tables differ")


if __name__ == "__main__":
    main()
