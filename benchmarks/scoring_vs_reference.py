"""Speed of memaudit's scoring against the paper's reference procedure, and pipeline overhead.

Measured in one process on the same tiny model (SD v1's block layout, 8-16 channels, 8x8 latents) and
prompts (ratios, since the machine is shared):

(a) reference: the procedure of the paper's code (Ren et al. 2024, renjie3/MemAttn): full 50-step DDIM
    sampling with classifier-free guidance (guidance 7.5, a batch of 2 per prompt), capturing the same
    cross-attention layer at every step -- against memaudit's score (one partial conditional forward).
(b) ``memaudit run`` end to end (reading Parquet, validation, dedup, scoring, trigger tokens, shards,
    merge, manifest) against the bare scoring forward (tokenize, encode, partial UNet) on the same batches,
    ``--repeats`` alternated rounds (default 3); the figure is the median of the rounds' ratios.
(c) peak resident memory of ``memaudit run`` on 1,000,000 vs 100,000 short prompts (``--quick``: 100,000 vs
    10,000), each in a fresh subprocess, with a cheap model configuration.

Last lines: ``speedup_vs_reference: X`` (goal >= 100), ``end_to_end_vs_bare_forward: Y`` (goal >= 0.9),
``peak_memory_ratio: Z`` (goal <= 1.3).

Usage: python benchmarks/scoring_vs_reference.py [--quick] [--threads N] [--repeats N] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORDS = "a photo of red blue cat dog on the beach at sunset old painting city night".split()


def make_prompts(n: int, seed: int = 0) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(WORDS), size=(n, 6))
    return [" ".join(WORDS[j] for j in row) + f" {i}" for i, row in enumerate(idx)]


def reference_procedure(model, layer: str, prompts: list[str], steps: int = 50, guidance: float = 7.5) -> None:
    """Full DDIM sampling with CFG, capturing ``layer`` at every step (the reference the paper's code runs)."""
    import torch
    from diffusers import DDIMScheduler

    from audit.capture import CrossAttentionCapture
    from audit.scorers import Scorer, ScoreConfig, tokenize

    s = Scorer(model, ScoreConfig("attention_entropy", (layer,)))
    sched = DDIMScheduler.from_config(model.scheduler_config)
    sched.set_timesteps(steps)
    b = len(prompts)
    with torch.inference_mode():
        tok = tokenize(model.tokenizer, prompts + [""], model.max_length)
        emb = s.encode(tok.input_ids)
        cond, uncond = emb[:b], emb[b:].expand(b, -1, -1)
        c = torch.cat([uncond, cond])
        x = s.latents(prompts) / sched.init_noise_sigma * sched.init_noise_sigma
        maps = []
        with CrossAttentionCapture(model.unet, [layer], early_exit=False) as cap:
            for t in sched.timesteps:
                xin = sched.scale_model_input(torch.cat([x, x]), t)
                cap.run(lambda: model.unet(xin, t, encoder_hidden_states=c).sample)
                eps_u, eps_c = cap.output.chunk(2)
                maps.append(cap.probs[layer][b:])
                x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample


def bare_forward(scorer, prompts: list[str], batch: int) -> None:
    """Tokenize, encode and run the partial UNet, nothing else."""
    from audit.scorers import tokenize

    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        scorer.score(chunk, tokenize(scorer.model.tokenizer, chunk, scorer.model.max_length))


def peak_rss_of_run(model_dir: Path, n: int, work: Path, threads: int | None = None) -> float:
    """Peak RSS (MiB) of a fresh process running ``memaudit run`` over ``n`` short prompts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = work / f"p{n}.parquet"
    with pq.ParquetWriter(src, pa.schema([("prompt", pa.string())])) as w:
        for start in range(0, n, 100_000):
            w.write_table(pa.table({"prompt": [f"a red cat number {i}" for i in range(start, min(n, start + 100_000))]}))
    code = (
        f"import sys, torch; torch.set_num_threads({threads or torch_threads()}); "
        "from audit.pipeline import RunConfig; from audit.runner import execute; "
        f"execute(RunConfig(inputs=({str(src)!r},), model={str(model_dir)!r}, out={str(work / f'run{n}')!r}, "
        "device='cpu', batch_size=256, unit_rows=20000), progress=False, log=lambda m: None); "
        "from audit.engines.ray import peak_rss_mib; print(peak_rss_mib())"  # VmHWM: ru_maxrss starts at our peak
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes on 2 cores)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3, help="alternated bare / end-to-end rounds for (b); the "
                    "figure is the median ratio (one round's ratio varies by 0.1-0.3 on a shared machine)")
    ap.add_argument("--skip-memory", action="store_true", help="leave out (c), the peak-memory runs (the "
                    "full size reads 1,000,000 rows twice)")
    args = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from audit.models import load_model
    from audit.pipeline import RunConfig
    from audit.runner import execute
    from audit.scorers import Scorer, ScoreConfig
    from audit.tiny import save_components, tiny_components

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="memaudit-bench-"))
    # a tiny model with SD v1's block layout: the default (4th) cross-attention layer sits where it does in SD
    model_dir = save_components(work / "tiny", *tiny_components(layout="sd1"))
    model = load_model(str(model_dir), "cpu", "float32")
    layer = model.default_layers[0]
    scorer = Scorer(model, ScoreConfig("attention_entropy", (layer,)))
    results: dict[str, float] = {}

    # (a) reference procedure vs memaudit score, same prompts, same batch
    n_ref = 8 if args.quick else 32
    prompts = make_prompts(n_ref)
    scorer.score(prompts[:2])  # warm-up
    t = time.perf_counter()
    reference_procedure(model, layer, prompts)
    ref_s = time.perf_counter() - t
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        scorer.score(prompts)
    ours_s = (time.perf_counter() - t) / reps
    results["reference_prompts_per_s"] = n_ref / ref_s
    results["memaudit_score_prompts_per_s"] = n_ref / ours_s
    results["speedup_vs_reference"] = ref_s / ours_s

    # (b) end to end vs bare forward on the same batches
    n = 4_000 if args.quick else 20_000
    batch = 128
    prompts = make_prompts(n, seed=1)
    src = work / "e2e.parquet"
    pq.write_table(pa.table({"prompt": prompts}), src)
    rounds = []  # (bare seconds, end-to-end seconds), alternated so that both see the same machine
    for r in range(args.repeats):
        t = time.perf_counter()
        bare_forward(scorer, prompts, batch)
        bare_s = time.perf_counter() - t
        t = time.perf_counter()
        execute(RunConfig(inputs=(str(src),), model=str(model_dir), out=str(work / f"e2e{r}"), device="cpu",
                          batch_size=batch), progress=False, log=lambda m: None)
        rounds.append((bare_s, time.perf_counter() - t))
        print(f"round {r + 1}: end to end {n / rounds[-1][1]:.0f} prompts/s vs bare {n / bare_s:.0f} prompts/s, "
              f"ratio {bare_s / rounds[-1][1]:.3f}", flush=True)
    ratios = sorted(b / e for b, e in rounds)
    results["bare_forward_prompts_per_s"] = n / statistics.median(b for b, _ in rounds)
    results["end_to_end_prompts_per_s"] = n / statistics.median(e for _, e in rounds)
    results["end_to_end_vs_bare_forward"] = statistics.median(ratios)

    print(f"end to end vs bare, {n:,} prompts, {len(rounds)} alternated rounds (the end to end time includes "
          f"loading the model once): ratios {', '.join(f'{x:.3f}' for x in ratios)}")
    if not args.skip_memory:  # (c) peak memory, large vs small input, cheap model (4x4 latents)
        cheap = save_components(work / "cheap", *tiny_components(sample_size=4))
        small, large = (10_000, 100_000) if args.quick else (100_000, 1_000_000)
        rss_small = peak_rss_of_run(cheap, small, work, args.threads)
        rss_large = peak_rss_of_run(cheap, large, work, args.threads)
        results[f"peak_rss_mib_{small}"] = rss_small
        results[f"peak_rss_mib_{large}"] = rss_large
        results["peak_memory_ratio"] = rss_large / rss_small

    print(json.dumps({k: round(v, 3) for k, v in results.items()}, indent=2))
    if not args.skip_memory:
        print(f"peak_memory_ratio: {results['peak_memory_ratio']:.3f}  ({large:,} vs {small:,} prompts)")
    print(f"end_to_end_vs_bare_forward: {results['end_to_end_vs_bare_forward']:.3f}")
    print(f"speedup_vs_reference: {results['speedup_vs_reference']:.1f}")


if __name__ == "__main__":
    main()
