"""The final merge of a run: memaudit's external k-way merge vs a polars out-of-core sort (issue 10).

A run ends by merging its sorted unit shards (risk desc, prompt_id asc) into one ranked ``risk.parquet``.
memaudit does it with :func:`audit.pipeline.reduce_shards` + :func:`audit.pipeline.merge_ranked` (a
multi-pass heap merge holding one record batch per open shard). The alternative is a library sort:
``polars.scan_parquet(shards).sort(...).sink_parquet(...)`` with the streaming engine. Each arm runs in its
own subprocess (its peak resident memory is that arm's: ``VmHWM``, not ``ru_maxrss``, which starts at the
parent's peak), on the same shards, ``--repeats``
times interleaved; the script checks that both produce the same ranking (prompt ids in order) and prints
seconds and peak RSS (MiB) per arm, medians, as one JSON line.

Shards: ``--rows`` rows in ``--shards`` files shaped like memaudit's risk shards (a 60-100 character prompt,
its id, a hex hash, three float columns, row groups of ``SHARD_ROW_GROUP_ROWS``), with ties in risk.

    python benchmarks/merge.py [--rows 1000000] [--shards 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([("rank", pa.int64()), ("risk", pa.float64()), ("prompt_id", pa.string()),
                    ("prompt", pa.string()), ("prompt_hash", pa.string()), ("attn_entropy", pa.float64()),
                    ("bos_mass", pa.float64()), ("source", pa.string())])


def make_shards(folder: Path, rows: int, shards: int, seed: int = 0) -> list[Path]:
    """Write ``shards`` sorted shards holding ``rows`` rows in all; returns their paths."""
    from audit.unit import SHARD_ROW_GROUP_ROWS

    rng = np.random.default_rng(seed)
    paths = []
    words = np.array("a photo of the red cat sitting on blue chair in garden with light painting style by".split())
    for s, idx in enumerate(np.array_split(np.arange(rows), shards)):
        n = len(idx)
        risk = np.round(rng.normal(2.0, 0.3, n), 3)  # rounded: ties, broken by prompt_id
        ids = [f"p{i:09d}" for i in idx]
        prompts = [" ".join(words[rng.integers(0, len(words), 14)]) for _ in range(n)]
        t = pa.table({"rank": np.zeros(n, np.int64), "risk": risk, "prompt_id": ids, "prompt": prompts,
                      "prompt_hash": [f"{(int(i) * 2654435761) % (1 << 64):016x}{int(i):016x}" for i in idx],
                      "attn_entropy": risk, "bos_mass": rng.random(n), "source": [f"shard{s}.parquet"] * n},
                     schema=SCHEMA)
        t = t.sort_by([("risk", "descending"), ("prompt_id", "ascending")])
        path = folder / f"unit-{s:06d}.parquet"
        pq.write_table(t, path, row_group_size=SHARD_ROW_GROUP_ROWS)
        paths.append(path)
    return paths


def arm_kway(shards: list[Path], out: Path) -> None:
    from audit.pipeline import merge_ranked, reduce_shards

    merged = reduce_shards(shards, out.parent / "work", SCHEMA)
    merge_ranked(merged, out, SCHEMA)


def arm_polars(shards: list[Path], out: Path) -> None:
    import polars as pl

    (pl.scan_parquet([str(p) for p in shards])
     .sort(["risk", "prompt_id"], descending=[True, False], maintain_order=True)
     .with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("rank"))
     .sink_parquet(out, engine="streaming"))


def child(arm: str, folder: Path) -> None:
    """Run one arm in this (child) process and print seconds and peak RSS (its own: VmHWM, see
    :func:`audit.engines.ray.peak_rss_mib`; ``ru_maxrss`` would start at the parent's peak)."""
    import time

    from audit.engines.ray import peak_rss_mib

    shards = sorted(folder.glob("unit-*.parquet"))
    out = folder / f"out-{arm}" / "risk.parquet"
    out.parent.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    {"kway": arm_kway, "polars": arm_polars}[arm](shards, out)
    seconds = time.perf_counter() - t0
    print(json.dumps({"arm": arm, "seconds": seconds,
                      "peak_rss_mib": peak_rss_mib()}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("ARM", "FOLDER"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child[0], Path(a.child[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_shards(folder, a.rows, a.shards)
        runs: dict[str, list[dict]] = {"kway": [], "polars": []}
        for _ in range(a.repeats):
            for arm in runs:
                res = subprocess.run([sys.executable, __file__, "--child", arm, str(folder)], check=True,
                                     capture_output=True, text=True)
                runs[arm].append(json.loads(res.stdout.strip().splitlines()[-1]))
        ids = {arm: pq.read_table(folder / f"out-{arm}" / "risk.parquet", columns=["prompt_id", "rank"]).to_pydict()
               for arm in runs}  # compared as values: polars writes large strings
        same = ids["kway"] == ids["polars"]
        result = {"rows": a.rows, "shards": a.shards, "same_ranking": same}
        for arm, rs in runs.items():
            result[f"{arm}_seconds"] = round(statistics.median(r["seconds"] for r in rs), 3)
            result[f"{arm}_peak_rss_mib"] = round(statistics.median(r["peak_rss_mib"] for r in rs), 1)
        result["polars_vs_kway_seconds"] = round(result["polars_seconds"] / result["kway_seconds"], 3)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
