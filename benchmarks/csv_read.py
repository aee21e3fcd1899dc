"""CSV reading time against file size: a CSV of N prompts (with quoted commas and a multi-line field) is
planned into units and every unit read in order, as an engine reads them.

Prints seconds per 100k rows at 100k and 200k rows, streaming (each unit continues the reader the previous
unit left, :func:`audit.sources._read_csv`) and, for comparison, reopening the file for every unit (the old
reader, which re-read the file from byte 0 for each unit: quadratic in the file's size). Linear reading
shows as equal seconds per 100k rows at both sizes.

    python benchmarks/csv_read.py [--rows 100000 200000] [--unit-rows 20000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import tempfile
import time

from audit import sources


def write_csv(path: Path, n: int) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        fh.write("id,prompt,user\n")
        for i in range(n):
            text = f'"a photo of a cat, number {i}"' if i % 1000 else f'"two lines\nof prompt {i}"'
            fh.write(f"p{i},{text},u{i % 97}\n")
    return path


def read_all(path: Path, unit_rows: int, reopen: bool) -> tuple[float, int]:
    files, _ = sources.discover([str(path)])
    plan = sources.plan_units(files, "prompt", unit_rows)
    t0 = time.perf_counter()
    rows = 0
    for unit in plan.units:
        if reopen:
            sources._CSV_STREAMS.clear()
        for batch in sources.read_unit(unit, "prompt", "id", ("user",)):
            rows += len(batch.rows)
    return time.perf_counter() - t0, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 200_000])
    ap.add_argument("--unit-rows", type=int, default=20_000)
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.rows:
            path = write_csv(Path(tmp) / f"p{n}.csv", n)
            for mode, reopen in (("streaming", False), ("reopen_per_unit", True)):
                wall, rows = read_all(path, args.unit_rows, reopen)
                assert rows == n, (rows, n)
                out[f"{mode}_s_per_100k_rows_at_{n}"] = round(wall / n * 100_000, 4)
    print(json.dumps(out, indent=2))
    for n in args.rows:
        print(f"{n:,} rows: streaming {out[f'streaming_s_per_100k_rows_at_{n}']:.3f} s per 100k rows; "
              f"reopening per unit {out[f'reopen_per_unit_s_per_100k_rows_at_{n}']:.3f} s per 100k rows")


if __name__ == "__main__":
    main()
