"""Time per image of a Stable Diffusion v1.4-architecture pipeline without and with mitigation (issue 14 goal:
overhead under 5%).

Random weights (``audit.tiny.sd1_components``: SD v1.4's UNet configuration, 16 ``attn2`` layers, 8 heads) and
a tiny VAE; timing does not depend on weight values. Arms, interleaved over ``--repeats`` rounds and each
reported as the median seconds per image:

* ``off``: the unmodified pipeline;
* ``always``: ``mitigate(pipe, c1=1.25)`` (explicit float32 softmax in every ``attn2`` layer, every step);
* ``flagged``: ``DetectAndMitigate`` with a threshold that flags every prompt (worst case: step 0 captured,
  steps 1.. mitigated);
* ``detect_only``: ``DetectAndMitigate(mode="off")`` (step 0 captured in one layer, nothing mitigated).

Last line: ``{"seconds_per_image": {...}, "ratio_vs_off": {...}, ...}`` as JSON.

Usage: python benchmarks/mitigation_overhead.py [--device cuda] [--dtype float16] [--sample-size 64]
       [--steps 50] [--batch 4] [--repeats 3] [--text-layers 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(sample_size: int, text_layers: int, device: str, dtype):
    from diffusers import StableDiffusionPipeline

    from audit.tiny import sd1_components, tiny_vae

    tok, te, unet, sch = sd1_components(sample_size=sample_size, text_layers=text_layers)
    vae = tiny_vae(0)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sch,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def main(argv=None) -> None:
    import torch

    from audit.mitigation import DetectAndMitigate, mitigate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 or float16 (default: float16 on CUDA)")
    ap.add_argument("--sample-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4, help="prompts per pipeline call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--text-layers", type=int, default=12)
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype or ("float16" if a.device.startswith("cuda") else "float32"))
    pipe = build(a.sample_size, a.text_layers, a.device, dtype)
    prompts = [f"a photo of a red cat on the beach at sunset {i}" for i in range(a.batch)]
    arms = {
        "off": None,
        "always": lambda: mitigate(pipe, c1=1.25),
        "flagged": lambda: DetectAndMitigate(pipe, threshold=-1.0),
        "detect_only": lambda: DetectAndMitigate(pipe, threshold=None, mode="off"),
    }

    def once(arm):
        gen = [torch.Generator("cpu").manual_seed(i) for i in range(a.batch)]
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if arm is None:
            pipe(prompts, num_inference_steps=a.steps, generator=gen, output_type="np")
        else:
            with arm():
                pipe(prompts, num_inference_steps=a.steps, generator=gen, output_type="np")
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / a.batch

    with torch.inference_mode():
        for arm in arms.values():  # warm-up
            once(arm)
        times = {name: [] for name in arms}
        for _ in range(a.repeats):
            for name, arm in arms.items():
                times[name].append(once(arm))
    med = {name: statistics.median(v) for name, v in times.items()}
    print(json.dumps({
        "seconds_per_image": {k: round(v, 5) for k, v in med.items()},
        "ratio_vs_off": {k: round(v / med["off"], 4) for k, v in med.items()},
        "device": a.device, "dtype": str(dtype), "sample_size": a.sample_size, "steps": a.steps,
        "batch": a.batch, "repeats": a.repeats,
    }))


if __name__ == "__main__":
    main()
