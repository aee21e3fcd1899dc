"""How far a prompt's risk moves with the batch size and with ``--compile`` (float32 rounding, not a speed).

A score does not depend on its batch-mates (a short batch is padded to the full batch size), but float32 kernels
round differently for other batch shapes and for compiled graphs: these differences bound what the score cache
(docs/audits.md) may serve across batch sizes, and why it keys ``--compile`` and the device type.

    python benchmarks/rounding.py [--model lab] [--prompts 64] [--batch-sizes 1,3,7,64] [--compile-prompts 32]

Prints one JSON object: per batch size, the largest and mean |risk difference| against the first batch size; one
torch thread against the default count (when above one), at batch 8; and, unless ``--compile-prompts 0``, the same for a compiled scorer against an eager one at batch 8 (the compilation
takes about half a minute on CPU). Data: the first prompts of ``../shared/data/nonmemorized_500.txt`` (or
``--prompts-file``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import time

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nonmemorized_500.txt"


def _diff(a, b) -> dict:
    d = np.abs(a["risk"].to_numpy() - b["risk"].to_numpy())
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="lab")
    ap.add_argument("--prompts-file", type=Path, default=DATA)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,3,7,64")
    ap.add_argument("--compile-prompts", type=int, default=32, help="0: skip the compiled comparison")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch

    import audit

    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [line.strip() for line in args.prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = lines[:args.prompts]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    t0 = time.perf_counter()
    runs = {b: audit.score(prompts, model=args.model, batch_size=b, device="cpu", dtype="float32") for b in sizes}
    base = runs[sizes[0]]
    out = {"model": args.model, "data": str(args.prompts_file), "prompts": len(prompts), "dtype": "float32",
           "risk_range": [float(base["risk"].min()), float(base["risk"].max())],
           "batch_size_vs_first": {str(b): _diff(runs[b], base) for b in sizes[1:]}}
    threads = torch.get_num_threads()
    if threads > 1:  # the CPU thread count splits reductions differently (the cache keys it)
        torch.set_num_threads(1)
        try:
            one = audit.score(prompts, model=args.model, batch_size=8, device="cpu", dtype="float32")
        finally:
            torch.set_num_threads(threads)
        many = audit.score(prompts, model=args.model, batch_size=8, device="cpu", dtype="float32")
        out["threads_1_vs_%d" % threads] = {"batch_size": 8} | _diff(one, many)
    if args.compile_prompts:
        few = prompts[:args.compile_prompts]
        eager = audit.score(few, model=args.model, batch_size=8, device="cpu", dtype="float32")
        compiled = audit.score(few, model=args.model, batch_size=8, device="cpu", dtype="float32", compile=True)
        out["compiled_vs_eager"] = {"prompts": len(few), "batch_size": 8} | _diff(compiled, eager)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
