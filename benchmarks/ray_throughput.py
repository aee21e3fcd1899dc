"""Ray engine benchmark: throughput with 1 and 2 workers, Ray against local, and peak memory vs input size.

    python benchmarks/ray_throughput.py            # 4,000 prompts; memory on 100,000 vs 1,000,000 rows
    python benchmarks/ray_throughput.py --quick    # 800 prompts; memory on 10,000 vs 100,000 rows

(a) Throughput: the same prompts (distinct, short) through ``memaudit run`` on the tiny seeded model with
    the local engine and with the Ray engine at 1 and 2 workers, on one local Ray instance started once.
    ``rows/s`` is end to end (driver model load and actor start included); ``scoring rows/s`` leaves out
    model loading, actor start and the final merge (Ray: from a first actor starting a unit to the last
    unit's stats; local: the time spent in units): closer to a long run's rate.
(b) Peak memory: ``memaudit run --engine ray --workers 1`` on N and 10 N rows, each in a fresh process
    that starts its own local Ray; the driver's peak RSS and the largest scoring worker's peak RSS. The
    model is the cheap configuration (4x4 latents); the rows cycle through ``--distinct`` prompts (each
    row has its own id, every row is read, validated, written, merged and ranked; a unit scores each of
    its distinct prompts once), so a million rows fit in minutes on a CPU.

The last lines are the ratios: ``ray_2_vs_1_workers``, ``ray_vs_local`` (Ray with 2 workers against the
local engine with torch's default threads, and ``_1_thread`` against the local engine with one torch thread,
as each of 2 CPU actors gets), ``driver_peak_rss_ratio`` and ``worker_peak_rss_ratio`` (goal: at most 1.3).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

WORDS = ("a an the of on in with red blue green cat dog man woman city street beach sunset mountain lake "
         "forest house car boat tree flower sky night old new small big poster art style oil canvas").split()


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct short prompts."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) + f" {i}" for i in range(n)]


def write_rows(path: Path, rows: int, distinct: int) -> Path:
    """A Parquet table of ``rows`` prompts cycling through ``distinct`` ones, written in 100k-row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = make_prompts(distinct, seed=1)
    with pq.ParquetWriter(path, pa.schema([("prompt", pa.string())])) as w:
        for start in range(0, rows, 100_000):
            stop = min(rows, start + 100_000)
            w.write_table(pa.table({"prompt": [base[i % distinct] for i in range(start, stop)]}))
    return path


def timed_run(src: Path, model: Path, out: Path, **kw) -> dict:
    """``memaudit run`` in this process; returns rows, wall seconds and the Ray engine's timings."""
    from audit.pipeline import RunConfig
    from audit.runner import execute
    import audit.engines.ray as ray_engine

    cfg = RunConfig(inputs=(str(src),), model=str(model), out=str(out), device="cpu", **kw)
    t0 = time.perf_counter()
    _, manifest = execute(cfg, progress=False, log=lambda msg: None)
    wall = time.perf_counter() - t0
    rows = manifest["counts"]["rows_read"]
    res = {"rows": rows, "wall_s": wall, "rows_per_s": rows / wall}
    if kw.get("engine") == "ray":  # from a first actor starting a unit to the last unit's stats
        info = dict(ray_engine.LAST_RUN)
        res["scoring_rows_per_s"] = rows / max(info["wall_s"] - info.get("first_unit_s", 0.0), 1e-9)
        res["actor_start"] = info.get("actor_start")  # per actor: spawn_s, import_s, load_s, scorer_s
        res["first_unit_s"] = info.get("first_unit_s")  # run start -> a first actor with its model starts a unit
        res["engine_wall_s"] = info["wall_s"]
    else:  # the time spent in the units (process_unit), model load and final merge left out
        unit_s = sum(json.loads(p.read_text())["stats"]["wall_s"] for p in (out / "shards").glob("*.done.json"))
        res["scoring_rows_per_s"] = rows / max(unit_s, 1e-9)
    return res


MEMORY_CHILD = r"""
import json, sys, time
from audit.pipeline import RunConfig
from audit.runner import execute
import audit.engines.ray as ray_engine
src, model, out, unit_rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
_, m = execute(RunConfig(inputs=(src,), model=model, out=out, device="cpu", batch_size=256, unit_rows=unit_rows,
                         engine="ray", workers=1), progress=False, log=lambda msg: None)
print(json.dumps({"rows": m["counts"]["rows_read"], "scored": m["counts"]["scored"],
                  "wall_s": time.perf_counter() - t0,
                  "driver_peak_rss_mib": ray_engine.peak_rss_mib(),
                  "worker_peak_rss_mib": ray_engine.LAST_RUN.get("worker_peak_rss_mib")}))
"""


def memory_run(src: Path, model: Path, out: Path, unit_rows: int) -> dict:
    """Peak RSS of a Ray-engine run's driver (a fresh process with its own local Ray) and of its worker."""
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(src), str(model), str(out), str(unit_rows)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"memory run on {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--prompts", type=int, help="prompts for the throughput runs (default 4000; quick 800)")
    parser.add_argument("--distinct", type=int, default=200, help="distinct prompts in the memory runs")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    from audit.tiny import build_tiny_model, save_components, tiny_components

    work = Path(tempfile.mkdtemp(prefix="memaudit-raybench-"))
    lines = []
    if not args.skip_throughput:
        import ray

        n = args.prompts or (800 if args.quick else 4000)
        model = build_tiny_model(work / "tiny")
        src = work / "prompts.txt"
        src.write_text("\n".join(make_prompts(n)) + "\n")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
                 _temp_dir=str(work / "ray"))
        kw = {"batch_size": 32, "unit_rows": max(50, n // 16)}
        import torch

        local = timed_run(src, model, work / "local", **kw)
        default_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # what each CPU actor uses when 2 share this machine's cores
        local1 = timed_run(src, model, work / "local1", **kw)
        torch.set_num_threads(default_threads)
        one = timed_run(src, model, work / "ray1", engine="ray", workers=1, **kw)
        two = timed_run(src, model, work / "ray2", engine="ray", workers=2, **kw)
        ray.shutdown()
        print(f"throughput on {n} prompts, tiny model, {os.cpu_count()} CPU cores:")
        for name, r in ((f"local {default_threads} thr", local), ("local 1 thread", local1), ("ray 1 worker", one),
                        ("ray 2 workers", two)):
            print(f"  {name:14s} {r['wall_s']:7.1f} s  {r['rows_per_s']:7.1f} rows/s end to end, "
                  f"scoring {r['scoring_rows_per_s']:.1f} rows/s")
        for name, r in (("ray 1 worker", one), ("ray 2 workers", two)):
            starts = "; ".join(", ".join(f"{k} {v:.1f} s" for k, v in a.items()) for a in (r["actor_start"] or []))
            print(f"  {name}: first unit after {r['first_unit_s']:.1f} s (actor process start, imports, model "
                  f"load); engine {r['engine_wall_s']:.1f} s of {r['wall_s']:.1f} s; each actor: {starts}")
        lines += [f"ray_2_vs_1_workers: {two['rows_per_s'] / one['rows_per_s']:.2f}",
                  f"ray_2_vs_1_workers_scoring: {two['scoring_rows_per_s'] / one['scoring_rows_per_s']:.2f}",
                  f"ray_vs_local: {two['rows_per_s'] / local['rows_per_s']:.2f}",
                  f"ray_vs_local_scoring: {two['scoring_rows_per_s'] / local['scoring_rows_per_s']:.2f}",
                  f"ray_vs_local_1_thread: {two['rows_per_s'] / local1['rows_per_s']:.2f}",
                  f"ray_vs_local_1_thread_scoring: {two['scoring_rows_per_s'] / local1['scoring_rows_per_s']:.2f}"]
    if not args.skip_memory:
        cheap = save_components(work / "cheap", *tiny_components(sample_size=4))
        small, large = (10_000, 100_000) if args.quick else (100_000, 1_000_000)
        res = {}
        for rows in (small, large):
            src = write_rows(work / f"rows{rows}.parquet", rows, args.distinct)
            res[rows] = memory_run(src, cheap, work / f"mem{rows}", unit_rows=20_000)
            r = res[rows]
            print(f"memory, {rows:,} rows ({args.distinct} distinct prompts), ray engine 1 worker: driver peak "
                  f"{r['driver_peak_rss_mib']:.0f} MiB, worker peak {r['worker_peak_rss_mib']:.0f} MiB, "
                  f"{r['wall_s']:.0f} s")
        lines += [f"driver_peak_rss_ratio: {res[large]['driver_peak_rss_mib'] / res[small]['driver_peak_rss_mib']:.2f}",
                  f"worker_peak_rss_ratio: {res[large]['worker_peak_rss_mib'] / res[small]['worker_peak_rss_mib']:.2f}"]
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
