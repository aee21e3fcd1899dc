"""Throughput of the scorer at Stable Diffusion v1.4 scale, against a full forward, the reference
procedure and the hardware's FLOP ceiling.

SD v1.4 architecture from its published configuration (``audit.tiny.sd1_components``), random weights
(throughput does not depend on weight values). For each dtype and batch size it reports, all measured in
this process:
  * ``scorer``: memaudit's scorer on one batch (tokenize, seeded noise, text encoder, partial UNet up to
    the default layer, entropy, one transfer to the host); with ``--compile`` also the torch.compile'd
    scorer (``compiled_prompts_per_s``);
  * ``full_forward``: the text encoder plus one full conditional UNet forward;
  * ``reference``: the paper's procedure, 50 DDIM steps with classifier-free guidance (a batch of 2 per
    prompt); ``--ref-steps`` steps are timed and scaled to 50 (each step costs the same); only for batches
    up to ``--ref-max-batch`` (its throughput is flat beyond);
  * peak GPU memory of the scorer, FLOPs per prompt of the scorer and of the full forward counted with
    ``torch.utils.flop_counter.FlopCounterMode``, and the fraction of the GPU's dense bf16/fp16 peak the
    scorer reaches.
On a GPU, ``Scorer.launch`` also runs once under ``torch.cuda.set_sync_debug_mode("error")``
(``launch_host_synchronizations``: "none", or the first synchronizing call). Then, at the largest batch that
fit, the pipeline's batch loop (``audit.unit.score_prompts``: the next
batch tokenized in the background while the device works, trigger tokens) against the same batches scored
one after another with no overlap (``pipeline_vs_sequential``; >= 1 means the overlap pays).

On a GPU (default): 512 px (64x64 latents), float16 and bfloat16, batch 1, 2, 4, ... up to --max-batch
or out of memory. On a CPU (or ``--cpu``) it runs a reduced configuration, 8x8 latents, a 1-layer text
encoder, float32 and bfloat16, batches 1 and 2, so that the script itself is tested
(tests/test_benchmarks.py); CPU figures say nothing about a GPU.

Usage: python benchmarks/gpu_throughput.py [--max-batch 1024] [--compile] [--cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# dense (no sparsity) tensor-core bf16/fp16 peaks, FLOP/s, from the vendors' data sheets (SXM parts)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def gpu_peak(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its ``torch.cuda.get_device_name()``, or None if unknown."""
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
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


def flops_of(fn) -> int:
    """FLOPs of one ``fn()`` call (matmuls and convolutions, as ``FlopCounterMode`` counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="force the reduced CPU configuration")
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--ref-steps", type=int, default=None, help="reference steps timed (default 50 GPU, 1 CPU)")
    ap.add_argument("--ref-max-batch", type=int, default=8, help="largest batch the reference is timed at")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (median; default 5 GPU, 1 CPU)")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd scorer")
    ap.add_argument("--pipeline-batches", type=int, default=8, help="batches in the pipeline comparison")
    ap.add_argument("--dtypes", default=None, help="comma-separated dtypes (default float16,bfloat16 on GPU, "
                    "float32,bfloat16 on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="also write the rows and summary to this JSON file")
    args = ap.parse_args(argv)
    import torch
    from diffusers import DDIMScheduler

    from audit.models import SD1_DEFAULT_LAYER, LoadedModel
    from audit.unit import score_prompts
    from audit.scorers import ScoreConfig, Scorer, tokenize
    from audit.tiny import sd1_components

    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    sample = 64 if gpu else 8
    dtypes = [torch.float16, torch.bfloat16] if gpu else [torch.float32, torch.bfloat16]
    if args.dtypes:
        dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]
        if not all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
            ap.error(f"--dtypes {args.dtypes}: use float32, float16 or bfloat16")
    batches = [2 ** i for i in range(0, 12) if 2 ** i <= args.max_batch] if gpu else [1, 2]
    ref_steps = args.ref_steps or (50 if gpu else 1)
    repeats = args.repeats or (5 if gpu else 1)
    tokenizer, text_encoder, unet, scheduler = sd1_components(sample_size=sample, text_layers=None if gpu else 1)
    name = torch.cuda.get_device_name() if gpu else "cpu"
    peak = gpu_peak(name) if gpu else None
    rows, pipeline = [], []
    for dtype in dtypes:
        model = LoadedModel(name="sd1-arch", path=None, fingerprint="random", tokenizer=tokenizer,
                            text_encoder=text_encoder.to(device, dtype), unet=unet.to(device, dtype),
                            scheduler_config=dict(scheduler.config), device=device, dtype=dtype,
                            default_layers=[SD1_DEFAULT_LAYER])
        config = ScoreConfig("attention_entropy", (SD1_DEFAULT_LAYER,), dtype=str(dtype).replace("torch.", ""))
        scorer = Scorer(model, config)
        ddim = DDIMScheduler.from_config(model.scheduler_config)
        ddim.set_timesteps(50)
        fitted = []
        for b in batches:
            prompts = [f"a photo of a red cat number {i}" for i in range(b)]
            tokens = tokenize(tokenizer, prompts, model.max_length)

            def full_forward():
                with torch.inference_mode():
                    c = scorer.encode(tokens.input_ids)
                    model.unet(scorer.latents(prompts), scorer.t0, encoder_hidden_states=c)

            def reference():
                with torch.inference_mode():
                    c = scorer.encode(tokenize(tokenizer, prompts + [""], model.max_length).input_ids)
                    cond = torch.cat([c[b:].expand(b, -1, -1), c[:b]])  # [uncond; cond]
                    x = scorer.latents(prompts)
                    for t in ddim.timesteps[:ref_steps]:
                        eps = model.unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample
                        u, cc = eps.chunk(2)
                        x = ddim.step(u + 7.5 * (cc - u), t, x).prev_sample

            try:
                if gpu:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                t_score = timed(lambda: scorer.score(prompts), device, repeats)
                mem = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
                t_full = timed(full_forward, device, repeats)
                t_ref = timed(reference, device, 1) * 50 / ref_steps if b <= args.ref_max_batch else None
            except torch.cuda.OutOfMemoryError:
                break
            fitted.append(b)
            flops = flops_of(lambda: scorer.score(prompts)) / b
            full_flops = flops_of(full_forward) / b
            achieved = flops * b / t_score
            rows.append({
                "dtype": config.dtype, "batch": b,
                "scorer_prompts_per_s": round(b / t_score, 2),
                "full_forward_prompts_per_s": round(b / t_full, 2),
                "reference_prompts_per_s": round(b / t_ref, 4) if t_ref else None,
                "scorer_vs_full_forward": round(t_full / t_score, 2),
                "scorer_vs_reference": round(t_ref / t_score, 1) if t_ref else None,
                "peak_gpu_memory_gib": round(mem, 3) if mem is not None else None,
                "scorer_gflops_per_prompt": round(flops / 1e9, 3),
                "full_forward_gflops_per_prompt": round(full_flops / 1e9, 3),
                "scorer_tflops_per_s": round(achieved / 1e12, 4),
                "fraction_of_peak": round(achieved / peak, 3) if peak else None,
            })
            print(json.dumps(rows[-1]), flush=True)
        if not fitted:
            continue
        if gpu:  # the device work of a batch must queue without any host synchronization
            batch = scorer.prepare([f"a photo of a red cat number {i}" for i in range(fitted[-1])])
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                scorer.launch(batch)
                host_syncs = "none"
            except RuntimeError as exc:
                host_syncs = str(exc).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode(0)
            print(json.dumps({"dtype": config.dtype, "launch_host_synchronizations": host_syncs}), flush=True)
            for row in rows:
                if row["dtype"] == config.dtype:
                    row["launch_host_synchronizations"] = host_syncs
        if args.compile:
            compiled = Scorer(model, config, compile=True)
            try:
                for row in (r for r in rows if r["dtype"] == config.dtype):
                    b = row["batch"]
                    prompts = [f"a photo of a red cat number {i}" for i in range(b)]
                    t0 = time.perf_counter()
                    compiled.score(prompts)  # compiles for this batch shape
                    row["compile_s"] = round(time.perf_counter() - t0, 1)
                    row["compiled_prompts_per_s"] = round(b / timed(lambda: compiled.score(prompts), device, repeats), 2)
                    row["compiled_vs_eager"] = round(row["compiled_prompts_per_s"] / row["scorer_prompts_per_s"], 3)
                    print(json.dumps({k: row[k] for k in ("dtype", "batch", "compile_s", "compiled_prompts_per_s",
                                                          "compiled_vs_eager")}), flush=True)
            finally:
                compiled.close()
        # the pipeline's batch loop (background preparation) against the same batches one after another
        b = fitted[-1]
        prompts = [f"an old painting of a city at night {i}" for i in range(b * args.pipeline_batches)]

        def sequential():
            for i in range(0, len(prompts), b):
                res = scorer.score(prompts[i:i + b])
                tok = tokenize(tokenizer, prompts[i:i + b], model.max_length)
                scorer.trigger_tokens(tok, res["token_mass"])

        t_seq = timed(sequential, device, repeats)
        t_pipe = timed(lambda: score_prompts(scorer, prompts, b), device, repeats)
        pipeline.append({"dtype": config.dtype, "batch": b, "prompts": len(prompts),
                         "pipeline_prompts_per_s": round(len(prompts) / t_pipe, 2),
                         "sequential_prompts_per_s": round(len(prompts) / t_seq, 2),
                         "pipeline_vs_sequential": round(t_seq / t_pipe, 3)})
        print(json.dumps(pipeline[-1]), flush=True)
    best = max(rows, key=lambda r: r["scorer_prompts_per_s"])
    summary = {"device": name, "latents": sample, "peak_tflops": peak / 1e12 if peak else None,
               "best_scorer_prompts_per_s": best["scorer_prompts_per_s"], "best_dtype": best["dtype"],
               "best_batch": best["batch"], "best_fraction_of_peak": best["fraction_of_peak"]}
    print(f"device: {name}; latents {sample}x{sample}; peak {summary['peak_tflops'] or 'unknown'} TFLOP/s")
    print(f"best_scorer_prompts_per_s: {best['scorer_prompts_per_s']} ({best['dtype']}, batch {best['batch']})")
    print(f"best_fraction_of_peak: {best['fraction_of_peak']}")
    result = {"rows": rows, "pipeline": pipeline, "summary": summary}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
