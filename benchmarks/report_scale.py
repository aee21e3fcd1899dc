"""`memaudit report`, `diff` and `calibrate` on large runs: time and peak memory at N and 10 N scored rows.

A scheduled audit over a prompt log ends with a run of millions of rows, and the report reads it. This script
scores a small input once with the tiny seeded model (a real run folder: manifest, tables, Parquet metadata),
then writes run folders of ``--rows`` and 10 x ``--rows`` rows shaped like it: each row a copy of a scored
row with its own prompt (the original text and a serial number), prompt id, prompt hash, and a risk moved
by a small deterministic amount, ranked again, every ``--dup``-th row repeating the prompt before it (logs
hold duplicates), a few hundred rejects, and the manifest's counts made to reconcile. Each command then runs in
its own subprocess (its peak resident memory is ``VmHWM``: ``ru_maxrss`` would start at this script's peak) on each size, ``--repeats`` times:

* ``report``: :func:`audit.report.build_report` with ``--by source`` and the HTML page rendered;
* ``report_json``: ``report --format json`` (every breakdown group; the text written to /dev/null), no ``--by``;
* ``report_json_by_prompt``: the same with ``--by prompt`` (a group per unique prompt: 900,000 at 1,000,000 rows),
  also printed as ``report_json_by_prompt_vs_plain_<size>``, its time over ``report_json``'s on the same run (its
  encoding of the groups took 42 s of 54 s before they were encoded a column at a time: about 8 times the plain
  report's time then);
* ``diff``: :func:`audit.diff.diff_runs` of the run against itself with the risks moved;
* ``calibrate``: :func:`audit.calibrate.calibrate` at 1% FPR.

It prints seconds and peak RSS (MiB) per command and size (medians) and, last, the ratios of the large size
to the small one: ``<command>_time_ratio`` (10 means linear in the rows) and ``<command>_rss_ratio`` (1 means
memory independent of the run's size; a command that holds the whole table reaches about 10). The ratios say
something only where the commands take well over a process's start and imports (about a second): at the
default 300,000 rows, not at the 1,000-row minimum, which checks that the script runs.

    python benchmarks/report_scale.py [--rows 300000] [--repeats 3] [--commands report,report_json,...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
import statistics
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHILD = r"""
import json, sys, time
from audit.engines.ray import peak_rss_mib
cmd, run, other = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
if cmd == "report":
    from audit.report import build_report, render_html
    r = build_report(run, top=20, by=["source"])
    html = render_html(r)
    check = {"scored": r.counts["scored"], "top": r.top.height, "html_kib": len(html) // 1024}
elif cmd.startswith("report_json"):
    import os
    from audit.report import build_report, iter_json
    r = build_report(run, top=20, by=["prompt"] if cmd == "report_json_by_prompt" else [], all_groups=True)
    with open(os.devnull, "w", encoding="utf-8") as fh:
        size = sum(fh.write(piece) for piece in iter_json(r))
    check = {"groups": sum(frame.height for _, _, frame in r.breakdowns), "json_mib": size // 2**20}
elif cmd == "diff":
    from audit.diff import diff_runs
    d = diff_runs(other, run, top=20)
    check = {k: d.summary[k] for k in ("in_both", "only_new", "only_old") if k in d.summary}
else:
    from audit.calibrate import calibrate
    c = calibrate(run, fpr=0.01)
    check = {"threshold": c["threshold"]}
print(json.dumps({"s": time.perf_counter() - t0, "rss_mib": peak_rss_mib(),
                  "check": check}))
"""


COMMANDS = ("report", "report_json", "report_json_by_prompt", "diff", "calibrate")


def scale_run(small: Path, out: Path, rows: int, dup: int, shift: float) -> Path:
    """Write a run folder of ``rows`` scored rows copied from the run ``small`` (see the module docstring)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    base = pq.read_table(small / "risk.parquet")
    serial = np.arange(rows)
    serial[dup - 1::dup] -= 1  # every dup-th row repeats the prompt of the row before it
    t = base.take(pa.array(serial % base.num_rows))
    prompts = pc.binary_join_element_wise(t["prompt"], pa.array([f"#{i}" for i in serial]), " ")
    hashes = pa.array([hashlib.blake2b(p.encode(), digest_size=16).hexdigest() for p in prompts.to_pylist()])
    rng = np.random.default_rng(0)
    risk = np.asarray(t["risk"]) + rng.uniform(-0.05, 0.05, rows)[serial] + shift * np.sin(serial)  # one per prompt
    cols = {"prompt": prompts, "prompt_raw": prompts, "prompt_hash": hashes, "risk": pa.array(risk),
            "attn_entropy": pa.array(risk), "prompt_id": pa.array([f"log.parquet:{i}" for i in range(rows)]),
            "row": pa.array(np.arange(rows)), "source": pa.array(np.where(serial % 2 == 0, "day1.parquet", "day2.parquet"))}
    for name, col in cols.items():
        t = t.set_column(t.schema.get_field_index(name), t.schema.field(name), col)
    order = np.lexsort((np.asarray(t["prompt_id"]).astype(str), -risk))
    t = t.take(pa.array(order))
    t = t.set_column(t.schema.get_field_index("rank"), t.schema.field("rank"), pa.array(np.arange(1, rows + 1)))
    pq.write_table(t.cast(base.schema), out / "risk.parquet", row_group_size=64 * 1024)
    rej = pq.read_table(small / "rejects.parquet")
    n_rej = 300
    rejects = pa.table({"prompt_id": [f"log.parquet:{rows + i}" for i in range(n_rej)],
                        "source": ["day2.parquet"] * n_rej, "row": list(range(rows, rows + n_rej)),
                        "reason": ["empty_prompt"] * 200 + ["null_prompt"] * 100, "detail": [None] * n_rej,
                        "prompt": [""] * 200 + [None] * 100}, schema=rej.schema)
    pq.write_table(rejects, out / "rejects.parquet")
    manifest = json.loads((small / "manifest.json").read_text())
    unique = len(set(hashes.to_pylist()))
    manifest["counts"].update(rows_read=rows + n_rej, scored=rows, rejected=n_rej,
                              rejected_by_reason={"empty_prompt": 200, "null_prompt": 100}, unique_prompts=unique,
                              duplicates=rows - unique)
    manifest["files"] = [{"path": "day1.parquet", "format": "parquet", "rows": (rows + 1) // 2},
                         {"path": "day2.parquet", "format": "parquet", "rows": rows // 2 + n_rej}]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def measure(cmd: str, run: Path, other: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, cmd, str(run), str(other)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} on {run} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000, help="scored rows of the small run (the large: 10x)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dup", type=int, default=10, help="every DUP-th row repeats the prompt before it")
    parser.add_argument("--work", help="folder for the runs (default: a new temporary folder)")
    parser.add_argument("--commands", default=",".join(COMMANDS), help="which to measure, comma separated "
                        f"(default: {','.join(COMMANDS)})")
    args = parser.parse_args()
    if args.rows < 1000 or args.dup < 2 or args.repeats < 1:
        parser.error("--rows at least 1000, --dup at least 2, --repeats at least 1")
    commands = [c for c in args.commands.split(",") if c]
    if not commands or set(commands) - set(COMMANDS):
        parser.error(f"--commands: choose among {', '.join(COMMANDS)}")

    from audit.pipeline import RunConfig
    from audit.runner import execute
    from audit.tiny import build_tiny_model

    work = Path(args.work or tempfile.mkdtemp(prefix="memaudit-reportbench-"))
    model = build_tiny_model(work / "tiny")
    src = work / "prompts.txt"
    words = "a red cat on the beach old oil painting of a city at night portrait of a woman".split()
    src.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 9)) + f" {i}"
                             for i in range(500)) + "\n\n")
    small, _ = execute(RunConfig(inputs=(str(src),), model=str(model), out=str(work / "scored"), device="cpu"),
                       progress=False, log=lambda m: None)
    sizes = {"small": args.rows, "large": 10 * args.rows}
    runs = {k: (scale_run(small, work / f"{k}", n, args.dup, 0.0), scale_run(small, work / f"{k}_moved", n, args.dup,
                                                                             0.02)) for k, n in sizes.items()}
    results: dict = {}
    for cmd in commands:
        for size in sizes:
            run, moved = runs[size]
            got = [measure(cmd, moved if cmd == "diff" else run, run) for _ in range(args.repeats)]
            results[(cmd, size)] = {"s": statistics.median(g["s"] for g in got),
                                    "rss_mib": statistics.median(g["rss_mib"] for g in got), "check": got[0]["check"]}
            r = results[(cmd, size)]
            print(f"{cmd:9s} {sizes[size]:>10,} rows: {r['s']:6.2f} s, peak RSS {r['rss_mib']:7.0f} MiB  {r['check']}",
                  flush=True)
    for cmd in commands:
        small_r, large_r = results[(cmd, "small")], results[(cmd, "large")]
        print(f"{cmd}_time_ratio: {large_r['s'] / small_r['s']:.2f}")
        print(f"{cmd}_rss_ratio: {large_r['rss_mib'] / small_r['rss_mib']:.2f}")
    if {"report_json", "report_json_by_prompt"} <= set(commands):
        for size in sizes:
            ratio = results[("report_json_by_prompt", size)]["s"] / results[("report_json", size)]["s"]
            print(f"report_json_by_prompt_vs_plain_{size}: {ratio:.2f}")


if __name__ == "__main__":
    main()
