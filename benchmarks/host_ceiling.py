"""The host's ceiling: how many prompts/s the whole `memaudit run` path feeds when the model costs nothing
(issue 16, item 1).

Everything a run does on the host runs for real (read Parquet, normalize, reject, dedup, tokenize, draw the
seeded noise, trigger tokens, write and commit shards, the ranked merge, the manifest), through
``audit.run`` with the local engine, on the bundled lab model. Only the device work is replaced: the
BENCHMARK FIXTURE :func:`zero_cost_launch` stands in for :meth:`audit.scorers.Scorer.launch` (text encoder +
partial UNet forward) and returns deterministic values of the right shape (attention probabilities uniform
over each prompt's kept tokens) at negligible cost. It is installed by this script in its own process only and
is never reachable from the CLI. Torch and the pipeline are limited to one core (``torch.set_num_threads(1)``
and the BLAS/OpenMP variables, set before torch is imported), and the whole process, the preparing threads
included, is pinned to ``--cores`` cores (default 1) with ``sched_setaffinity``.

Prints ``host_prompts_per_s_one_core`` (prompts read / wall seconds of ``audit.run``, median of ``--repeats``,
after a warm-up run that pays the imports: a run's fixed start-up, a few seconds, is not a per-prompt cost)
and a JSON line; ``--profile FILE`` writes a cProfile of one run (``python -m pstats FILE``).

Goal (issue 16): at least 10,000 prompts/s on one core, so that one host core feeds an H200 scoring SD 1.4's
partial forward at about 2,000 prompts/s with five times headroom.

``--latent sd14`` draws SD 1.4's noise (4 x 64 x 64 per prompt) instead of the lab model's (3 x 16 x 16): the
host work of a run on SD 1.4, which the figure for a GPU host must include.

``--cores 2 --prepare-threads 2`` measures how the host work scales with the cores a GPU host gives it.

``--noise-generator philox`` scores with the Philox generator (``memaudit run --noise-generator philox``): the
host computes only each prompt's seed, and the noise is drawn on the device inside ``launch``. The fixture then
also dispatches the draw's tensor operations once per batch (``audit.scorers.noise.philox_normal`` on one 4-value
row on the CPU: the operations' dispatch, with no work to speak of): the host's share of the device-side draw.
A CUDA launch costs a few microseconds more per operation than this dispatch; ``gpu_throughput.py``'s launch
section measures that on a GPU.

    python benchmarks/host_ceiling.py [--prompts 50000] [--repeats 3] [--batch-size 256] [--latent sd14]
                                      [--cores N] [--prepare-threads N] [--noise-generator G]
                                      [--profile FILE]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "POLARS_MAX_THREADS",
             "RAYON_NUM_THREADS", "ARROW_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def zero_cost_launch(self, batch):
    """BENCHMARK FIXTURE (not memaudit's scoring): a stand-in for ``Scorer.launch`` with the packed layout
    float64 [B, 4 + m + L] (risk, entropy, BOS mass, the scorer's m columns, non-finite flag, then a), where a
    is uniform over each prompt's kept tokens, so the entropy is log(n_kept) and the BOS mass 1 / n_kept."""
    import numpy as np
    import torch

    mask = batch.tokens.attention_mask.astype(np.float64)  # [B, L]
    a = mask / mask.sum(axis=1, keepdims=True)
    ent = np.log(mask.sum(axis=1))
    m = len(self.spec.columns)
    head = np.column_stack([ent, ent, a[:, 0]] + [ent] * m + [np.zeros(len(a))])
    if batch.seeds is not None:  # philox: the draw's operations, dispatched once per batch as launch would
        from audit.scorers.noise import philox_normal

        philox_normal(batch.seeds[:1], 4)
    return torch.from_numpy(np.concatenate([head, a], axis=1))


def write_prompts(path: Path, n: int, seed: int = 0) -> Path:
    """A Parquet of ``n`` prompts (an id and a 6-16 word caption), about 5% exact duplicates."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = ("a photo of the red blue green cat dog house tree on in with at by painting portrait city night "
             "sunset beautiful detailed art style oil watercolor man woman child car street river mountain "
             "trending artstation 4k highly realistic").split()
    lens = rng.integers(6, 17, n)
    prompts = [" ".join(rng.choice(words, k)) for k in lens]
    dup = rng.random(n) < 0.05
    for i in np.flatnonzero(dup):
        prompts[i] = prompts[int(rng.integers(0, n))]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "prompt": prompts}), path)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--unit-rows", type=int, default=20_000)
    ap.add_argument("--profile", help="write a cProfile of the first run here")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--latent", choices=["model", "sd14"], default="model",
                    help="the seeded noise's shape: the lab model's own (3 x 16 x 16) or SD 1.4's (4 x 64 x 64, "
                         "21x the values: the host work of scoring SD 1.4)")
    ap.add_argument("--cores", type=int, default=1,
                    help="CPU cores the process may use (sched_setaffinity; default 1: one core in truth, the "
                         "preparing thread included)")
    ap.add_argument("--prepare-threads", default="1", help="memaudit run's --prepare-threads (default 1)")
    ap.add_argument("--noise-generator", choices=["mt19937", "philox"], default="mt19937",
                    help="memaudit run's --noise-generator: mt19937 draws the noise on the host; philox on the "
                         "device (here: only its operations' dispatch, once per batch)")
    a = ap.parse_args(argv)
    allowed = sorted(os.sched_getaffinity(0))
    if a.cores > len(allowed):
        ap.error(f"--cores {a.cores}: this machine lets the process use {len(allowed)}")
    os.sched_setaffinity(0, allowed[:a.cores])  # before torch starts any thread
    threads = a.prepare_threads if a.prepare_threads == "auto" else int(a.prepare_threads)

    import torch

    torch.set_num_threads(1)
    import audit
    from audit.scorers import Scorer

    Scorer.launch = zero_cost_launch  # the fixture: this process only
    if a.latent == "sd14":  # the fixture's second part: SD 1.4's noise on the host (the launch ignores it)
        init = Scorer.__init__

        def init_sd14(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.latent_shape = (4, 64, 64)

        Scorer.__init__ = init_sd14
    with tempfile.TemporaryDirectory() as tmp:
        src = write_prompts(Path(tmp) / "prompts.parquet", a.prompts)
        # warm-up: imports and the first model load are paid once per process, not per prompt; a scheduled
        # audit of millions of prompts amortizes them, so they are left out of the figure
        options = dict(batch_size=a.batch_size, id_column="id", log=lambda m: None, prepare_threads=threads,
                       noise_generator=a.noise_generator)
        audit.run(write_prompts(Path(tmp) / "warm.parquet", 300, seed=1), out=Path(tmp) / "warm", **options)
        walls = []
        for r in range(a.repeats):
            out = Path(tmp) / f"run{r}"
            t0 = time.perf_counter()
            if a.profile and r == 0:
                import cProfile

                with cProfile.Profile() as prof:
                    _, manifest = audit.run(src, out=out, unit_rows=a.unit_rows, **options)
                prof.dump_stats(a.profile)
            else:
                _, manifest = audit.run(src, out=out, unit_rows=a.unit_rows, **options)
            walls.append(time.perf_counter() - t0)
            counts = manifest["counts"]
            assert counts["rows_read"] == a.prompts, counts
        wall = statistics.median(walls)
        key = "host_prompts_per_s_one_core" if a.cores == 1 else f"host_prompts_per_s_{a.cores}_cores"
        result = {"prompts": a.prompts, "batch_size": a.batch_size, "latent": a.latent, "cores": a.cores,
                  "prepare_threads": threads,
                  "noise_generator": a.noise_generator, "wall_s": [round(w, 3) for w in walls],
                  key: round(a.prompts / wall, 1), "counts": counts, "torch_threads": torch.get_num_threads()}
    print(f"{key}: {result[key]:,.0f} ({a.prompts:,} prompts, median of {a.repeats} runs: {wall:.2f} s; "
          f"latent {a.latent}, {threads} preparing thread(s), noise {a.noise_generator})")
    print(json.dumps(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
