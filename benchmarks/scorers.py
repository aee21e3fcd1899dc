"""Cost of each registered scorer, side by side, each as a ratio to ``attention_entropy`` (the default).

Measured in one run of this script:
  * ``prompts_per_s``: :class:`audit.scorers.Scorer` (prepare, launch, collect) on the same tiny seeded
    model with SD v1.x's block layout (``audit.tiny.tiny_components(layout="sd1")``: 16 cross-attention
    layers, the default layer the 4th), the same prompts, batch size and noise draws, after one warm-up
    batch; on CPU unless ``--device cuda``. A tiny model's timings are dominated by per-call overhead, so
    read the ratios, not the absolute figures;
  * ``gflops_per_prompt``: FLOPs of one :meth:`Scorer.launch` (text encoder, every UNet forward the scorer
    runs, the attention capture) at full SD v1.4 scale (64x64 latents, 12-layer CLIP text encoder, the
    published configuration, ``audit.tiny.SD1_UNET_CONFIG``), counted with
    ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no memory, no compute), divided by the
    batch. The empty prompt's embedding is cached by the scorer and not counted.

``--steps`` sets the scheduler steps of every scorer (``attention_entropy_late`` samples that many steps;
50 by default, as published). Prints a table; ``--json PATH`` also writes the figures.

Usage: python benchmarks/scorers.py [--prompts 64] [--batch 16] [--steps 50] [--draws 1] [--scorers a,b]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = "a photo of red blue cat dog city street beach sunset painting portrait old new small big".split()


def prompts(n: int) -> list[str]:
    """``n`` distinct seeded prompts of 3-8 words."""
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + f" {i}" for i in range(n)]


def measure_speed(names, n_prompts: int, batch: int, steps: int, draws: int, device: str) -> dict:
    """``{scorer: prompts/s}`` on the tiny SD-1.x-layout model (see the module docstring)."""
    import torch

    from audit.models import load_model
    from audit.scorers import ScoreConfig, Scorer
    from audit.tiny import save_components, tiny_components

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = save_components(Path(tmp) / "model", *tiny_components(layout="sd1"))
        model = load_model(str(root), device, "float32")
    ps = prompts(n_prompts)
    out = {}
    for name in names:
        scorer = Scorer(model, ScoreConfig(name, tuple(model.default_layers), draws, 0, steps))
        scorer.score(ps[:batch])  # warm-up
        start = time.perf_counter()
        for i in range(0, n_prompts, batch):
            scorer.score(ps[i:i + batch])
        out[name] = n_prompts / (time.perf_counter() - start)
    return out


def count_flops(names, batch: int, steps: int, draws: int) -> dict:
    """``{scorer: GFLOP per prompt}`` of one launch at SD v1.4 scale on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    from audit.models import LoadedModel, SD1_DEFAULT_LAYER
    from audit.scorers import ScoreConfig, Scorer
    from audit.tiny import SD1_SCHEDULER_CONFIG, SD1_TEXT_ENCODER_CONFIG, SD1_UNET_CONFIG, TINY_WORDS
    from audit.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(TINY_WORDS)
    with torch.device("meta"):
        text_encoder = CLIPTextModel(CLIPTextConfig(**dict(
            SD1_TEXT_ENCODER_CONFIG, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))).eval()
        unet = UNet2DConditionModel(**SD1_UNET_CONFIG).eval()
    model = LoadedModel(name="sd1.4-architecture (meta)", path=Path("."), fingerprint="meta", tokenizer=tokenizer,
                        text_encoder=text_encoder, unet=unet, scheduler_config=dict(SD1_SCHEDULER_CONFIG),
                        device=torch.device("meta"), dtype=torch.float32, default_layers=[SD1_DEFAULT_LAYER])
    ps = prompts(batch)
    out = {}
    for name in names:
        scorer = Scorer(model, ScoreConfig(name, (SD1_DEFAULT_LAYER,), draws, 0, steps))
        with torch.inference_mode():
            scorer.empty_embeddings(1)  # cached once per scorer: not a per-prompt cost
            prepared = scorer.prepare(ps)
            with FlopCounterMode(display=False) as counter:
                scorer.launch(prepared)
        out[name] = counter.get_total_flops() / batch / 1e9
    return out


def main(argv=None) -> dict:
    from audit.scorers import SCORERS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--draws", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--flop-batch", type=int, default=2)
    ap.add_argument("--scorers", default="", help="comma separated (default: every registered scorer); "
                    "attention_entropy is always measured, as the base of the ratios")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import torch

    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    names = list(SCORERS) if not args.scorers else \
        list(dict.fromkeys(["attention_entropy", *(n.strip() for n in args.scorers.split(",") if n.strip())]))
    speed = measure_speed(names, args.prompts, args.batch, args.steps, args.draws, args.device)
    flops = count_flops(names, args.flop_batch, args.steps, args.draws)
    base = "attention_entropy"
    rows = {name: {"unet_forwards_per_prompt": (2.0 * args.steps if SCORERS[name].forward == "full_sampling"
                                                else SCORERS[name].unet_forwards) * args.draws,
                   "prompts_per_s": speed[name], "prompts_per_s_ratio": speed[name] / speed[base],
                   "gflops_per_prompt_sd14": flops[name], "gflops_ratio": flops[name] / flops[base]}
            for name in names}
    print(f"{'scorer':<24} {'fwd/prompt':>10} {'prompts/s (tiny)':>17} {'x AE':>8} {'GFLOP/prompt (SD1.4)':>21} {'x AE':>8}")
    for name, r in rows.items():
        print(f"{name:<24} {r['unet_forwards_per_prompt']:>10g} {r['prompts_per_s']:>17.1f} "
              f"{r['prompts_per_s_ratio']:>8.3f} {r['gflops_per_prompt_sd14']:>21.1f} {r['gflops_ratio']:>8.2f}")
    print(f"(x AE: ratio to attention_entropy; {args.steps} scheduler steps, {args.draws} noise draw(s), "
          f"device {args.device})")
    result = {"config": vars(args) | {"json": str(args.json) if args.json else None}, "scorers": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
