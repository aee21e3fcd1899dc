"""Throughput of the scorer at Stable Diffusion v1.4 scale, against a full forward, the reference
procedure and the hardware's FLOP ceiling.

SD v1.4 architecture from its published configuration (``audit.tiny.sd1_components``), random weights
(throughput does not depend on weight values). For each dtype and batch size it reports prompts/s of:
  * memaudit's scorer (tokenize, text encoder, partial UNet up to the default layer, entropy);
  * one full conditional UNet forward (plus the text encoder);
  * the reference procedure: 50 DDIM steps with classifier-free guidance (batch 2 per prompt); on CPU,
    ``--ref-steps`` steps are timed and scaled to 50 (each step costs the same);
and peak GPU memory, FLOPs per prompt counted with ``torch.utils.flop_counter.FlopCounterMode`` and the
fraction of the GPU's dense bf16/fp16 peak that the scorer reaches.

On a GPU (default): 512 px (64x64 latents), float16 and bfloat16, batch 1, 2, 4, ... up to --max-batch
or out of memory. On a CPU it runs a reduced configuration (16x16 latents, 2 text layers, float32 and
bfloat16, batches 1 and 2) so that the script itself is tested.

Usage: python benchmarks/gpu_throughput.py [--max-batch 1024] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# dense (no sparsity) tensor-core peaks, FLOP/s, from the vendors' data sheets
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def gpu_peak(name: str) -> float | None:
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="force the reduced CPU configuration")
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--ref-steps", type=int, default=None, help="reference steps timed (default 50 GPU, 2 CPU)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    import torch
    from diffusers import DDIMScheduler
    from torch.utils.flop_counter import FlopCounterMode

    from audit.model import LoadedModel, SD1_DEFAULT_LAYER
    from audit.scoring import ScoreConfig, Scorer, tokenize
    from audit.tiny import sd1_components

    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    sample = 64 if gpu else 16
    dtypes = [torch.float16, torch.bfloat16] if gpu else [torch.float32, torch.bfloat16]
    batches = [2 ** i for i in range(0, 12) if 2 ** i <= args.max_batch] if gpu else [1, 2]
    ref_steps = args.ref_steps or (50 if gpu else 2)
    repeats = args.repeats or (5 if gpu else 2)
    tokenizer, text_encoder, unet, scheduler = sd1_components(sample_size=sample, text_layers=None if gpu else 2)
    name = torch.cuda.get_device_name() if gpu else "cpu"
    peak = gpu_peak(name) if gpu else None
    rows = []
    for dtype in dtypes:
        model = LoadedModel(name="sd1-arch", path=None, fingerprint="random", tokenizer=tokenizer,
                            text_encoder=text_encoder.to(device, dtype), unet=unet.to(device, dtype),
                            scheduler_config=dict(scheduler.config), device=device, dtype=dtype,
                            default_layers=[SD1_DEFAULT_LAYER])
        scorer = Scorer(model, ScoreConfig("attention_entropy", (SD1_DEFAULT_LAYER,), dtype=str(dtype)))
        ddim = DDIMScheduler.from_config(model.scheduler_config)
        ddim.set_timesteps(50)
        for b in batches:
            prompts = [f"a photo of a red cat number {i}" for i in range(b)]
            tokens = tokenize(tokenizer, prompts, 77)
            try:
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                t_score = timed(lambda: scorer.score(prompts, tokens), device, repeats)
                mem = torch.cuda.max_memory_allocated() / 2**30 if gpu else None

                def full_forward():
                    with torch.inference_mode():
                        c = scorer.encode(tokens.input_ids)
                        model.unet(scorer.latents(prompts), scorer.t0, encoder_hidden_states=c)

                t_full = timed(full_forward, device, repeats)

                def reference():
                    with torch.inference_mode():
                        c = scorer.encode(tokenize(tokenizer, prompts + [""], 77).input_ids)
                        cond = torch.cat([c[b:].expand(b, -1, -1), c[:b]])
                        x = scorer.latents(prompts)
                        for t in ddim.timesteps[:ref_steps]:
                            eps = model.unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample
                            u, cc = eps.chunk(2)
                            x = ddim.step(u + 7.5 * (cc - u), t, x).prev_sample

                t_ref = timed(reference, device, 1) * 50 / ref_steps
            except torch.cuda.OutOfMemoryError:
                break
            with FlopCounterMode(display=False) as counter:
                scorer.score(prompts, tokens)
            flops = counter.get_total_flops() / b
            achieved = flops * b / t_score
            rows.append({
                "dtype": str(dtype).replace("torch.", ""), "batch": b,
                "scorer_prompts_per_s": round(b / t_score, 2),
                "full_forward_prompts_per_s": round(b / t_full, 2),
                "reference_prompts_per_s": round(b / t_ref, 4),
                "scorer_vs_full_forward": round(t_full / t_score, 2),
                "scorer_vs_reference": round(t_ref / t_score, 1),
                "peak_gpu_memory_gib": round(mem, 3) if mem is not None else None,
                "scorer_gflops_per_prompt": round(flops / 1e9, 2),
                "scorer_tflops_per_s": round(achieved / 1e12, 3),
                "fraction_of_peak": round(achieved / peak, 3) if peak else None,
            })
            print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda r: r["scorer_prompts_per_s"])
    print(f"device: {name}; latents {sample}x{sample}; peak {peak / 1e12 if peak else 'unknown'} TFLOP/s")
    print(f"best_scorer_prompts_per_s: {best['scorer_prompts_per_s']} ({best['dtype']}, batch {best['batch']})")
    print(f"best_fraction_of_peak: {best['fraction_of_peak']}")


if __name__ == "__main__":
    main()
