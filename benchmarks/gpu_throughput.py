"""Throughput of the scorers at Stable Diffusion v1.4 scale, against a full forward, the reference
procedure, the hardware's FLOP ceiling, and ``memaudit run`` end to end.

SD v1.4 architecture from its published configuration (``audit.tiny.sd1_components``), random weights
(throughput does not depend on weight values), saved in diffusers layout and loaded with
``audit.models.load_model`` as a user's checkpoint would be. Everything is measured in this process, in
sections, each written to ``--json`` as soon as it is done (so a run cut short keeps what it measured; a
section that fails records its error and the next one runs):

  * ``env``: versions, the device, and on a GPU the measured bf16 matrix-multiply rate (an 8192^3 product,
    mean of 10 after 3 warm-ups): the practical ceiling beside the data sheet's dense peak.
  * ``rows``: for each dtype, scorer (``--scorers``) and batch size, prompts/s of ``Scorer.score`` (tokenize,
    seeded noise, text encoder, the scorer's forward, one transfer to the host), FLOPs per prompt counted
    with ``torch.utils.flop_counter.FlopCounterMode`` on the forward actually executed (the partial UNet for
    ``attention_entropy``, two full UNet forwards for ``noise_magnitude``), the fraction of the data-sheet
    peak and of the measured matmul rate this reaches, and peak GPU memory. For ``attention_entropy`` also
    one full conditional UNet forward (plus the text encoder) and, up to ``--ref-max-batch``, the paper's
    reference procedure (50 DDIM steps with classifier-free guidance; ``--ref-steps`` timed and scaled).
  * ``launch``: on a GPU, ``Scorer.launch`` once under ``torch.cuda.set_sync_debug_mode("error")``
    ("none", or the first synchronizing call), and the batch size ``--batch-size auto`` chooses; the host time
    of queueing the Philox noise draw of one batch at auto's batch size (``Scorer.device_noise``, no
    synchronization: what ``--noise-generator philox`` costs the host per batch) against the host drawing the
    same batch's noise with ``mt19937``.
  * ``end_to_end``: ``memaudit run`` (``audit.runner.execute``: Parquet read, normalization, dedup, scoring
    with ``--batch-size auto``, trigger tokens, shards, merge, manifest; the model loaded from disk once) on
    ``--e2e-prompts`` prompts (on a GPU by default what the bare loop scores in ``--e2e-seconds``) against the
    bare scoring loop (tokenize and ``Scorer.score`` per batch, the same batch size, nothing else),
    ``--e2e-rounds`` alternated rounds; ``end_to_end_vs_bare_forward`` is the median of the rounds' ratios.
    The model's load time is measured separately (``load_s``, a warm load, as the run's own finds the files in
    the page cache) and the ratio without it is given too (null when a run took no longer than that).
  * ``pipeline``: the pipeline's batch loop (``audit.unit.score_prompts``: the next batches prepared in the
    background, batch i+1 launched before batch i is collected) against the same batches scored one after
    another (``pipeline_vs_sequential``; >= 1 means the overlap pays).
  * ``variants``: with ``--variants``, ``attention_entropy`` at auto's batch with the UNet in channels-last
    memory format, with cuDNN's autotuner, with fused q/k/v projections (diffusers' ``fuse_qkv_projections``),
    with the other noise generator (``philox_noise`` or ``mt19937_noise``) and, on a GPU, with
    scaled-dot-product attention restricted to cuDNN's or the memory-efficient kernel, against the default
    timed first and last; each with the largest change of a prompt's entropy from the default's
    (``max_entropy_change``: rounding, except for the other noise generator).
  * ``ops``: with ``--profile-ops``, one ``Scorer.launch`` of ``attention_entropy`` at auto's batch under
    ``torch.profiler``: the device time (CPU time on a CPU) by kind of operation (convolution, matrix
    multiply, attention, normalization, the rest), the top operations by their own time, and the device's busy
    fraction of the launch's wall time: where the time of the partial forward goes.
  * ``compiled``: with ``--compile``, the torch.compile'd ``attention_entropy`` scorer at one batch size
    (``--compile-batch``, default the one ``auto`` chose) for each of ``--compile-modes``: compile time,
    prompts/s, ``compiled_vs_eager``.
    Last, since its compile time is the least predictable.

On a GPU (default): 512 px (64x64 latents), bfloat16, ``--batches`` (default 1,16,128,512,1024,2048).
On a CPU (or ``--cpu``) it runs a reduced configuration (8x8 latents, a 1-layer text encoder, float32,
batches 1 and 2, a small end-to-end run); with ``--tiny`` also SD v1's block layout at 8-16 channels, which
is how tests/test_benchmarks.py runs every section in seconds. CPU figures say nothing about a GPU.

Figures on an H200 (2026-12-04) are in docs/gpu.md.

Usage: python benchmarks/gpu_throughput.py [--compile] [--variants] [--cpu] [--json out.json] [--e2e-prompts N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# the same prompts and bare scoring loop as the CPU end-to-end benchmark (this folder is on sys.path when run)
from scoring_vs_reference import bare_forward, make_prompts  # noqa: E402

# dense (no sparsity) tensor-core bf16/fp16 peaks, FLOP/s, from the vendors' data sheets (SXM parts)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def gpu_peak(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its ``torch.cuda.get_device_name()``, or None if unknown."""
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def flops_of(fn) -> int:
    """FLOPs of one ``fn()`` call (matmuls, convolutions and attention, as ``FlopCounterMode`` counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_tflops(device) -> float:
    """Measured bf16 rate of an 8192^3 matrix product (TFLOP/s): mean of 10 after 3 warm-ups."""
    import torch

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * 8192 ** 3 * 10 / (time.perf_counter() - t) / 1e12


class Report:
    """The benchmark's result, written to ``path`` (if any) after every section."""

    def __init__(self, path: str | None):
        self.path = path
        self.data: dict = {"env": {}, "rows": [], "launch": [], "end_to_end": None, "compiled": [],
                           "pipeline": [], "variants": None, "ops": None, "errors": []}

    def section(self, name: str, fn) -> None:
        """Run one section; an exception is recorded (with its traceback's tail) and the next section runs."""
        t = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # a benchmark keeps what it measured; the error says where it stopped
            self.data["errors"].append({"section": name, "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                                        "traceback": traceback.format_exc()[-2000:]})
            print(f"section {name} failed: {type(exc).__name__}: {exc}", flush=True)
        print(f"section {name}: {time.perf_counter() - t:.1f} s", flush=True)
        self.write()

    def write(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=1))


# what a --compile-modes entry may add to torch.compile's mode, after "+": the settings of diffusers' published
# recipe for compiling a UNet (channels-last memory format, fused q/k/v projections, inductor's tuning flags)
# and the attention kernel of scaled-dot-product attention
COMPILE_OPTIONS = {
    "channels_last": "the UNet's weights in channels-last memory format",
    "fused_qkv": "fused q/k/v projections (diffusers' fuse_qkv_projections)",
    "inductor_tuned": "inductor: conv_1x1_as_mm, coordinate_descent_tuning (all directions), no epilogue_fusion",
    "sdpa_cudnn": "scaled-dot-product attention restricted to cuDNN's kernel",
    "sdpa_flash": "scaled-dot-product attention restricted to the flash kernel",
}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@contextlib.contextmanager
def unet_layout(unet, channels_last: bool = False, fused: bool = False):
    """The UNet in channels-last memory format and/or with fused q/k/v projections (diffusers'
    ``fuse_qkv_projections``: one projection for q, k, v in self-attention, for k, v in cross-attention) for the
    block, back to the default after it. Enter it before a scorer installs its capture processors over them."""
    import torch

    unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if fused:
        unet.fuse_qkv_projections()
    try:
        yield
    finally:
        if fused:
            unet.unfuse_qkv_projections()
        unet.to(memory_format=torch.contiguous_format)


def compile_recipes(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """``--compile-modes``: comma-separated ``MODE[+OPTION...]`` (MODE a torch.compile mode, each OPTION a key of
    :data:`COMPILE_OPTIONS`), as (mode, options) pairs; checked before any GPU time is spent."""
    recipes = []
    for item in (t.strip() for t in text.split(",")):
        mode, *options = item.split("+")
        if mode not in COMPILE_MODES:
            raise argparse.ArgumentTypeError(f"{item!r}: the mode must be one of {', '.join(COMPILE_MODES)}")
        if unknown := [o for o in options if o not in COMPILE_OPTIONS]:
            raise argparse.ArgumentTypeError(f"{item!r}: unknown option {', '.join(unknown)}; options: "
                                             f"{', '.join(COMPILE_OPTIONS)}")
        recipes.append((mode, tuple(options)))
    return recipes


def batch_list(text: str) -> list[int]:
    """``--batches``: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by commas, e.g. 1,16,128")
    return values


DTYPES = ("float32", "float16", "bfloat16")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="force the reduced CPU configuration")
    ap.add_argument("--tiny", action="store_true", help="SD v1's block layout at 8-16 channels instead of SD v1.4's "
                    "widths (audit.tiny.tiny_components(layout='sd1')): exercises every section in seconds, as the "
                    "test suite does; its figures measure nothing")
    ap.add_argument("--batches", type=batch_list, default=None, help="comma-separated batch sizes (default 1,16,128,512,1024,2048 "
                    "on a GPU, 1,2 on CPU); a scorer's sweep stops at its first out-of-memory batch")
    ap.add_argument("--max-batch", type=int, default=None, help="leave out batches above this")
    ap.add_argument("--scorers", default="attention_entropy,noise_magnitude", help="comma-separated registered "
                    "scorers (memaudit scorers lists them; default attention_entropy,noise_magnitude)")
    ap.add_argument("--noise-max-batch", type=int, default=512, help="largest batch noise_magnitude is timed at "
                    "(two full UNet forwards a prompt: its throughput is flat well before; default 512)")
    ap.add_argument("--ref-steps", type=int, default=None, help="reference steps timed (default 50 GPU, 1 CPU)")
    ap.add_argument("--ref-max-batch", type=int, default=8, help="largest batch the reference is timed at "
                    "(default 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (median; default 3 GPU, 1 CPU)")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd attention_entropy scorer")
    ap.add_argument("--compile-batch", type=int, default=None, help="batch size compiled (default: auto's choice)")
    ap.add_argument("--compile-modes", type=compile_recipes, default="default", help="comma-separated "
                    "torch.compile modes timed in turn (default, reduce-overhead, max-autotune, "
                    "max-autotune-no-cudagraphs; memaudit's --compile uses default), each optionally followed by "
                    "+OPTION: " + "; ".join(f"{k}: {v}" for k, v in COMPILE_OPTIONS.items()))
    ap.add_argument("--pipeline-batches", type=int, default=8, help="batches in the pipeline comparison (0: skip; "
                    "default 8)")
    ap.add_argument("--e2e-prompts", type=int, default=None, help="prompts of the end-to-end comparison "
                    "(default on a GPU: what the bare loop scores in --e2e-seconds at the sweep's rate, 20,000 to "
                    "200,000; on CPU 64; 0: skip)")
    ap.add_argument("--e2e-compile", action="store_true", help="end to end with --compile: the run compiles its "
                    "own scorer (its compile time counted), against the bare loop of a compiled scorer (compiled "
                    "before the rounds)")
    ap.add_argument("--e2e-seconds", type=float, default=20.0, help="see --e2e-prompts (default 20)")
    ap.add_argument("--e2e-rounds", type=int, default=3, help="alternated end-to-end / bare rounds (median ratio; "
                    "default 3)")
    ap.add_argument("--dtypes", default=None, help="comma-separated dtypes (default bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--variants", action="store_true", help="also time attention_entropy at auto's batch with the "
                    "UNet in channels-last memory format, with cuDNN's autotuner (torch.backends.cudnn.benchmark) "
                    "and, on a GPU, with scaled-dot-product attention restricted to cuDNN's or the memory-efficient "
                    "kernel, each against the default in the same minutes")
    ap.add_argument("--noise-generator", choices=["mt19937", "philox"], default="mt19937",
                    help="the scorers' and the end-to-end run's noise generator (memaudit run --noise-generator; "
                         "default mt19937, drawn on the host)")
    ap.add_argument("--profile-ops", action="store_true", help="also profile one launch of attention_entropy at "
                    "auto's batch (torch.profiler): device time by kind of operation and the top operations")
    ap.add_argument("--json", default=None, help="write the result to this JSON file (after every section)")
    args = ap.parse_args(argv)
    if args.dtypes and not set(d.strip() for d in args.dtypes.split(",")) <= set(DTYPES):
        ap.error(f"--dtypes {args.dtypes}: use {', '.join(DTYPES)}")
    import torch

    from audit.scorers import SCORERS

    scorer_names = [s.strip() for s in args.scorers.split(",")]
    if unknown := [s for s in scorer_names if s not in SCORERS]:
        ap.error(f"--scorers: unknown {', '.join(unknown)}; registered: {', '.join(sorted(SCORERS))}")

    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    sample = 64 if gpu else 8
    dtypes = [d.strip() for d in (args.dtypes or ("bfloat16" if gpu else "float32")).split(",")]
    batches = args.batches or ([1, 16, 128, 512, 1024, 2048] if gpu else [1, 2])
    batches = [b for b in batches if args.max_batch is None or b <= args.max_batch]
    ref_steps = args.ref_steps or (50 if gpu else 1)
    repeats = args.repeats or (3 if gpu else 1)
    e2e_prompts = args.e2e_prompts if args.e2e_prompts is not None else (None if gpu else 64)
    report = Report(args.json)
    env = report.data["env"]
    name = torch.cuda.get_device_name() if gpu else "cpu"
    peak = gpu_peak(name) if gpu else None

    def environment():
        import diffusers
        import transformers

        env.update({"device": name, "latents": sample, "noise_generator": args.noise_generator,
                    "torch": torch.__version__, "diffusers": diffusers.__version__,
                    "transformers": transformers.__version__, "cuda": torch.version.cuda,
                    "peak_tflops": peak / 1e12 if peak else None})
        if gpu:
            env["measured_matmul_tflops"] = round(matmul_tflops(device), 1)
        print(json.dumps(env), flush=True)

    report.section("env", environment)
    from audit.models import load_model
    from audit.scorers import ScoreConfig, Scorer, tokenize
    from audit.tiny import save_components, sd1_components, tiny_components
    from audit.unit import score_prompts

    work = Path(tempfile.mkdtemp(prefix="memaudit-gpu-bench-"))
    model_dir = work / "sd14-arch"
    state: dict = {}

    def build():
        t = time.perf_counter()
        if args.tiny:
            tokenizer, text_encoder, unet, scheduler = tiny_components(sample_size=sample, layout="sd1")
        else:
            tokenizer, text_encoder, unet, scheduler = sd1_components(sample_size=sample,
                                                                      text_layers=None if gpu else 1)
        # saved in bfloat16 (half the bytes to write, hash and read); loaded in each timed dtype
        save_components(model_dir, tokenizer, text_encoder.to(torch.bfloat16), unet.to(torch.bfloat16), scheduler)
        env["build_and_save_s"] = round(time.perf_counter() - t, 1)

    report.section("build", build)

    def sweep(dtype: str):
        from diffusers import DDIMScheduler

        t = time.perf_counter()
        model = load_model(str(model_dir), device.type, dtype)
        env[f"load_s_{dtype}"] = round(time.perf_counter() - t, 2)
        state[dtype] = model
        ddim = DDIMScheduler.from_config(model.scheduler_config)
        ddim.set_timesteps(50)
        measured = env.get("measured_matmul_tflops")
        for scorer_name in scorer_names:
            scorer = Scorer(model, ScoreConfig(scorer_name, tuple(model.default_layers), dtype=dtype,
                                               noise_generator=args.noise_generator))
            state[(dtype, scorer_name)] = scorer
            per_prompt = None
            for b in batches:
                if scorer_name == "noise_magnitude" and b > args.noise_max_batch:
                    break
                prompts = make_prompts(b)
                tokens = tokenize(model.tokenizer, prompts, model.max_length)

                def full_forward():
                    with torch.inference_mode():
                        c = scorer.encode(tokens.input_ids)
                        model.unet(scorer.latents(prompts), scorer.t0, encoder_hidden_states=c)

                def reference():
                    with torch.inference_mode():
                        c = scorer.encode(tokenize(model.tokenizer, prompts + [""], model.max_length).input_ids)
                        cond = torch.cat([c[b:].expand(b, -1, -1), c[:b]])  # [uncond; cond]
                        x = scorer.latents(prompts)
                        for t in ddim.timesteps[:ref_steps]:
                            eps = model.unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample
                            u, cc = eps.chunk(2)
                            x = ddim.step(u + 7.5 * (cc - u), t, x).prev_sample

                entropy = scorer_name == "attention_entropy"
                try:
                    if gpu:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    t_score = timed(lambda: scorer.score(prompts), device, repeats)
                    mem = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
                    t_full = timed(full_forward, device, repeats) if entropy else None
                    t_ref = (timed(reference, device, 1) * 50 / ref_steps
                             if entropy and b <= args.ref_max_batch else None)
                except torch.cuda.OutOfMemoryError:
                    report.data["rows"].append({"dtype": dtype, "scorer": scorer_name, "batch": b,
                                                "out_of_memory": True})
                    break
                if per_prompt is None:  # FLOPs per prompt do not depend on the batch size (tested on CPU)
                    k = min(b, 2)
                    per_prompt = (flops_of(lambda: scorer.score(prompts[:k])) / k,
                                  flops_of(lambda: full_forward()) / b if entropy else None)
                flops, full_flops = per_prompt
                achieved = flops * b / t_score
                row = {
                    "dtype": dtype, "scorer": scorer_name, "batch": b,
                    "scorer_prompts_per_s": round(b / t_score, 2),
                    "full_forward_prompts_per_s": round(b / t_full, 2) if t_full else None,
                    "reference_prompts_per_s": round(b / t_ref, 4) if t_ref else None,
                    "scorer_vs_full_forward": round(t_full / t_score, 2) if t_full else None,
                    "scorer_vs_reference": round(t_ref / t_score, 1) if t_ref else None,
                    "peak_gpu_memory_gib": round(mem, 3) if mem is not None else None,
                    "scorer_gflops_per_prompt": round(flops / 1e9, 6),
                    "full_forward_gflops_per_prompt": round(full_flops / 1e9, 6) if full_flops else None,
                    "scorer_tflops_per_s": round(achieved / 1e12, 4),
                    "fraction_of_peak": round(achieved / peak, 3) if peak else None,
                    "fraction_of_measured_matmul": round(achieved / 1e12 / measured, 3) if measured else None,
                }
                report.data["rows"].append(row)
                print(json.dumps(row), flush=True)
            report.write()

    for dtype in dtypes:
        report.section(f"sweep_{dtype}", lambda: sweep(dtype))
    dtype = dtypes[-1]

    def launch_checks():
        for scorer_name in scorer_names:
            scorer = state[(dtype, scorer_name)]
            entry = {"dtype": dtype, "scorer": scorer_name}
            if gpu:  # the device work of a batch must queue without any host synchronization
                batch = scorer.prepare(make_prompts(16))
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    scorer.launch(batch)
                    entry["launch_host_synchronizations"] = "none"
                except RuntimeError as exc:  # where: the innermost frames of the call that synchronized
                    frames = traceback.extract_tb(exc.__traceback__)[-8:]
                    entry["launch_host_synchronizations"] = str(exc).splitlines()[0]
                    entry["synchronized_at"] = [f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} "
                                                f"{f.name}: {f.line}" for f in frames]
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                    torch.cuda.synchronize()
                torch.cuda.empty_cache()
            t = time.perf_counter()
            entry["auto_batch_size"] = b = scorer.auto_batch_size()
            entry["auto_batch_probe_s"] = round(time.perf_counter() - t, 2)
            # the host's cost of the noise of one batch of b: queueing the device-side Philox draw, or drawing
            # it with mt19937 on the host (median of 5 each; the device's own time for the draw is not counted)
            philox = Scorer(scorer.model, dataclasses.replace(scorer.config, noise_generator="philox"))
            mt = Scorer(scorer.model, dataclasses.replace(scorer.config, noise_generator="mt19937"))
            prompts = make_prompts(b, seed=5)
            seeds = philox.seeds(prompts)
            for label, draw in (("philox_queue", lambda: philox.device_noise(seeds)),
                                ("mt19937", lambda: mt.noise(prompts))):
                draw()
                walls = []
                for _ in range(5):
                    sync(device)
                    t = time.perf_counter()
                    draw()
                    walls.append(time.perf_counter() - t)
                entry[f"noise_{label}_host_ms_per_batch"] = round(statistics.median(walls) * 1e3, 3)
            sync(device)
            report.data["launch"].append(entry)
            print(json.dumps(entry), flush=True)

    report.section("launch", launch_checks)

    def auto_batch() -> int:
        return state[(dtype, "attention_entropy")].auto_batch_size()

    def end_to_end():
        from audit.config import RunConfig
        from audit.runner import execute
        import pyarrow as pa
        import pyarrow.parquet as pq

        scorer = state[(dtype, "attention_entropy")]
        batch = auto_batch()
        compile_s = None
        if args.e2e_compile:  # the bare loop's scorer compiled (and its batch shape traced) before the rounds
            scorer = state["e2e_compiled"] = Scorer(scorer.model, scorer.config, compile=True)
            t = time.perf_counter()
            scorer.score(make_prompts(batch, seed=7))
            sync(device)
            compile_s = round(time.perf_counter() - t, 1)
        n = e2e_prompts
        if n is None:  # sized from the sweep's rate at the nearest batch size
            rows = [r for r in report.data["rows"] if r["scorer"] == "attention_entropy" and "scorer_prompts_per_s" in r]
            rate = min(rows, key=lambda r: abs(r["batch"] - batch))["scorer_prompts_per_s"]
            n = int(min(max(rate * args.e2e_seconds, 20_000), 200_000))
        if args.e2e_compile:  # whole batches only: the bare loop does not pad, and a short last batch would be a new
            n = -(-n // batch) * batch  # shape, compiled inside the timed rounds (the run pads it to the batch size)
        prompts = make_prompts(n, seed=1)
        src = work / "e2e.parquet"
        pq.write_table(pa.table({"prompt": prompts}), src)
        load_model(str(model_dir), device.type, dtype)  # the run's loads find the files in the page cache
        t = time.perf_counter()
        load_model(str(model_dir), device.type, dtype)
        sync(device)
        load_s = time.perf_counter() - t
        rounds = []
        for r in range(args.e2e_rounds):  # alternated, so that both arms see the same machine
            sync(device)
            t = time.perf_counter()
            bare_forward(scorer, prompts, batch)
            sync(device)
            bare_s = time.perf_counter() - t
            if gpu:
                torch.cuda.empty_cache()
            t = time.perf_counter()
            out, manifest = execute(RunConfig(inputs=(str(src),), model=str(model_dir), out=str(work / f"e2e{r}"),
                                              device=device.type, dtype=dtype, batch_size="auto",
                                              noise_generator=args.noise_generator, compile=args.e2e_compile),
                                    progress=False, log=lambda m: None)
            e2e_s = time.perf_counter() - t
            counts = manifest["counts"]
            if counts["scored"] != n or counts["rejected"] != 0:
                raise RuntimeError(f"end-to-end run scored {counts['scored']} and rejected {counts['rejected']} "
                                   f"of {n}")
            rounds.append((bare_s, e2e_s))
            print(f"round {r + 1}: end to end {n / e2e_s:.0f} prompts/s vs bare "
                  f"{n / bare_s:.0f} prompts/s, ratio {bare_s / e2e_s:.3f}", flush=True)
        report.data["end_to_end"] = {
            "dtype": dtype, "prompts": n, "batch": batch, "rounds": len(rounds), "load_s": round(load_s, 2),
            "compiled": args.e2e_compile, "bare_compile_s": compile_s,
            "bare_prompts_per_s": round(n / statistics.median(b for b, _ in rounds), 1),
            "end_to_end_prompts_per_s": round(n / statistics.median(e for _, e in rounds), 1),
            "ratios": [round(b / e, 3) for b, e in rounds],
            "end_to_end_vs_bare_forward": round(statistics.median(b / e for b, e in rounds), 3),
            # null where a run took no longer than a load alone: too short to tell
            "end_to_end_vs_bare_forward_without_load": round(
                statistics.median(b / (e - load_s) for b, e in rounds), 3) if all(e > load_s for _, e in rounds)
            else None,
        }
        print(json.dumps(report.data["end_to_end"]), flush=True)

    def end_to_end_section():
        try:
            end_to_end()
        finally:  # a compiled bare scorer's processors off the shared model, its graphs dropped
            if (compiled := state.pop("e2e_compiled", None)) is not None:
                compiled.close()
                torch._dynamo.reset()

    if e2e_prompts != 0:
        report.section("end_to_end", end_to_end_section)

    def pipeline():
        scorer = state[(dtype, "attention_entropy")]
        model = scorer.model
        b = auto_batch() if gpu else batches[-1]
        prompts = make_prompts(b * args.pipeline_batches, seed=3)

        def sequential():
            for i in range(0, len(prompts), b):
                res = scorer.score(prompts[i:i + b])
                tok = tokenize(model.tokenizer, prompts[i:i + b], model.max_length)
                scorer.trigger_tokens(tok, res["token_mass"])

        t_seq = timed(sequential, device, repeats)
        t_pipe = timed(lambda: score_prompts(scorer, prompts, b), device, repeats)
        entry = {"dtype": dtype, "batch": b, "prompts": len(prompts),
                 "pipeline_prompts_per_s": round(len(prompts) / t_pipe, 2),
                 "sequential_prompts_per_s": round(len(prompts) / t_seq, 2),
                 "pipeline_vs_sequential": round(t_seq / t_pipe, 3)}
        report.data["pipeline"].append(entry)
        print(json.dumps(entry), flush=True)

    if args.pipeline_batches:
        report.section("pipeline", pipeline)

    def variants():
        scorer = state[(dtype, "attention_entropy")]
        unet = scorer.model.unet
        b = auto_batch() if gpu else batches[-1]
        prompts = make_prompts(b, seed=4)
        from contextlib import contextmanager, nullcontext

        from torch.nn.attention import SDPBackend, sdpa_kernel

        other = "philox" if scorer.config.noise_generator == "mt19937" else "mt19937"
        other_noise = Scorer(scorer.model, dataclasses.replace(scorer.config, noise_generator=other))

        @contextmanager
        def setting(channels_last=False, autotune=False, fused=False):
            """The UNet and cuDNN in a variant's state for the block, back to the default after it."""
            torch.backends.cudnn.benchmark = autotune
            try:
                with unet_layout(unet, channels_last, fused):
                    yield
            finally:
                torch.backends.cudnn.benchmark = False

        # (label, context, scorer): the default first and last, so that drift shows
        variants = [("default", nullcontext, scorer),
                    ("cudnn_benchmark", lambda: setting(autotune=True), scorer),
                    ("channels_last", lambda: setting(channels_last=True), scorer),
                    ("channels_last_cudnn_benchmark", lambda: setting(channels_last=True, autotune=True), scorer),
                    ("fused_qkv_projections", lambda: setting(fused=True), scorer),
                    (f"{other}_noise", nullcontext, other_noise)]
        if gpu:  # the self-attention's kernel (head dim 40 in SD v1's first blocks); CUDA-only backends
            variants += [("sdpa_cudnn_attention", lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION), scorer),
                         ("sdpa_efficient_attention", lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), scorer)]
        variants.append(("default_again", nullcontext, scorer))
        rates, entropy_change = {}, {}
        reference = scorer.score(prompts)["attn_entropy"]
        for label, context, run in variants:
            try:
                with context():
                    rates[label] = round(b / timed(lambda: run.score(prompts), device, repeats), 2)
                    # the same scores, to the dtype's rounding (another noise generator: other scores)
                    entropy_change[label] = float(abs(run.score(prompts)["attn_entropy"] - reference).max())
            except RuntimeError as exc:  # a backend this GPU or build lacks
                rates[label] = None
                print(f"variant {label}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            print(json.dumps({"variant": label, "batch": b, "prompts_per_s": rates[label],
                              "max_entropy_change": entropy_change.get(label)}), flush=True)
        base = (rates["default"] + rates["default_again"]) / 2
        report.data["variants"] = {"dtype": dtype, "batch": b, "prompts_per_s": rates,
                                   "vs_default": {k: round(v / base, 3) if v else None for k, v in rates.items()},
                                   "max_entropy_change": entropy_change}

    if args.variants:
        report.section("variants", variants)

    def ops():
        from torch.profiler import ProfilerActivity, profile

        scorer = state[(dtype, "attention_entropy")]
        b = auto_batch() if gpu else batches[-1]
        batch = scorer.prepare(make_prompts(b, seed=6))
        scorer.collect(batch, scorer.launch(batch))  # warm
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            scorer.launch(batch)
            sync(device)
            wall_us = (time.perf_counter() - t) * 1e6

        def own_us(event) -> float:  # the operation's own time (its kernels on a GPU), microseconds
            if gpu:
                return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0))
            return float(event.self_cpu_time_total)

        def kind(op: str) -> str:
            if "conv" in op:
                return "convolution"
            if "attention" in op or "softmax" in op:
                return "attention"
            if any(k in op for k in ("::mm", "addmm", "bmm", "matmul", "::linear")):
                return "matrix_multiply"
            if "norm" in op:
                return "normalization"
            return "other"

        # aten operators only (their own time excludes the aten operators they call); on a GPU, the kernels'
        # time is attributed to the operator that launched them
        events = [e for e in prof.key_averages() if e.key.startswith("aten::") and own_us(e) > 0]
        total = sum(own_us(e) for e in events)
        by_kind: dict[str, float] = {}
        for e in events:
            by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + own_us(e)
        top = sorted(events, key=own_us, reverse=True)[:15]
        report.data["ops"] = {
            "dtype": dtype, "batch": b, "clock": "device" if gpu else "cpu", "wall_ms": round(wall_us / 1e3, 3),
            "busy_fraction": round(total / wall_us, 3) if gpu else None,
            "ms_by_kind": {k: round(v / 1e3, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "fraction_by_kind": {k: round(v / total, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [{"op": e.key, "ms": round(own_us(e) / 1e3, 3), "calls": e.count} for e in top],
        }
        print(json.dumps(report.data["ops"]), flush=True)

    if args.profile_ops:
        report.section("ops", ops)

    def compiled():
        from contextlib import ExitStack

        from torch.nn.attention import SDPBackend, sdpa_kernel

        model = state[dtype]
        unet = model.unet
        b = args.compile_batch or auto_batch()
        prompts = make_prompts(b, seed=2)
        config = ScoreConfig("attention_entropy", tuple(model.default_layers), dtype=dtype,
                             noise_generator=args.noise_generator)
        eager = state[(dtype, "attention_entropy")]
        t_eager = timed(lambda: eager.score(prompts), device, repeats)
        reference = eager.score(prompts)["attn_entropy"]
        for mode, options in args.compile_modes:
            label = "+".join((mode, *options))
            with ExitStack() as stack:  # every option undone at the end of its recipe
                stack.enter_context(unet_layout(unet, "channels_last" in options, "fused_qkv" in options))
                if "inductor_tuned" in options:
                    stack.enter_context(torch._inductor.config.patch(
                        conv_1x1_as_mm=True, coordinate_descent_tuning=True, epilogue_fusion=False,
                        coordinate_descent_check_all_directions=True))
                if "sdpa_cudnn" in options:
                    stack.enter_context(sdpa_kernel(SDPBackend.CUDNN_ATTENTION))
                if "sdpa_flash" in options:
                    stack.enter_context(sdpa_kernel(SDPBackend.FLASH_ATTENTION))
                real_compile = torch.compile
                if mode != "default":  # the scorer calls torch.compile(module, dynamic=False): add the mode
                    torch.compile = functools.partial(real_compile, mode=mode)
                try:
                    scorer = Scorer(model, config, compile=True)
                finally:
                    torch.compile = real_compile
                stack.callback(torch._dynamo.reset)  # the next recipe compiles afresh
                stack.callback(scorer.close)  # first: the processors back before the projections are unfused
                t = time.perf_counter()
                scores = scorer.score(prompts)  # compiles for this batch shape
                sync(device)
                compile_s = time.perf_counter() - t
                t_comp = timed(lambda: scorer.score(prompts), device, repeats)
            entry = {"dtype": dtype, "batch": b, "mode": mode, "options": list(options), "recipe": label,
                     "compile_s": round(compile_s, 1), "eager_prompts_per_s": round(b / t_eager, 2),
                     "compiled_prompts_per_s": round(b / t_comp, 2), "compiled_vs_eager": round(t_eager / t_comp, 3),
                     # the same scores as eager, to the dtype's rounding
                     "max_entropy_change": float(abs(scores["attn_entropy"] - reference).max())}
            report.data["compiled"].append(entry)
            report.write()
            print(json.dumps(entry), flush=True)

    if args.compile:
        report.section("compiled", compiled)

    rows = [r for r in report.data["rows"] if r.get("scorer") == "attention_entropy" and "scorer_prompts_per_s" in r]
    best = max(rows, key=lambda r: r["scorer_prompts_per_s"]) if rows else None
    summary = {"device": name, "latents": sample, "peak_tflops": env.get("peak_tflops"),
               "measured_matmul_tflops": env.get("measured_matmul_tflops"), "errors": len(report.data["errors"])}
    if best:
        summary.update({"best_scorer_prompts_per_s": best["scorer_prompts_per_s"], "best_dtype": best["dtype"],
                        "best_batch": best["batch"], "best_fraction_of_peak": best["fraction_of_peak"],
                        "best_fraction_of_measured_matmul": best["fraction_of_measured_matmul"]})
    report.data["summary"] = summary
    report.write()
    print(f"device: {name}; latents {sample}x{sample}; peak {summary['peak_tflops'] or 'unknown'} TFLOP/s")
    if best:
        print(f"best_scorer_prompts_per_s: {best['scorer_prompts_per_s']} ({best['dtype']}, batch {best['batch']})")
        print(f"best_fraction_of_peak: {best['fraction_of_peak']}")
    if report.data["end_to_end"]:
        print(f"end_to_end_vs_bare_forward: {report.data['end_to_end']['end_to_end_vs_bare_forward']}")
    if report.data["errors"]:
        print(f"{len(report.data['errors'])} section(s) failed: "
              + ", ".join(e["section"] for e in report.data["errors"]))
    return report.data


if __name__ == "__main__":
    raise SystemExit(1 if main()["errors"] else 0)
