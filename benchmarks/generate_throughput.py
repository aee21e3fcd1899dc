"""Throughput of ``memaudit generate``, without and with mitigation (issue 14).

The command's own code path (:func:`audit.cli.generate.run_generate`: read prompts, detect at the first step,
mitigate, DDIM sampling with classifier-free guidance, PNG and Parquet writing, the summary), with the pipeline
built once by the command's :func:`audit.cli.generate.build_pipeline` and passed in (model loading left out).
The model: a seeded model with SD v1's block layout (``audit.tiny.tiny_components(layout="sd1")``: 16 ``attn2``
layers, random weights, ``--sample-size`` latents) and a tiny VAE, saved as a diffusers folder; or ``--model``.
The bundled lab model cannot be used: it declares a UNet encoder attention mask that diffusers'
``StableDiffusionPipeline`` does not pass, and ``generate`` refuses it. Arms, interleaved over
``--repeats`` rounds (the machine is shared: each round runs every arm within a minute), each a fresh output
folder:

* ``off``: ``--mitigate off`` (detection still runs: it costs no extra forward);
* ``always``: ``--mitigate always`` (Ren et al.'s inference-time rule at c1 = 1.25 in every ``attn2`` layer, every
  step);
* ``flagged``: ``--mitigate flagged`` with a calibration (``memaudit calibrate``: the 99th percentile of the
  lab's validation ordinary prompts), so only flagged images are mitigated, from step 1.

Prompts: the first ``--prompts`` of the lab's test split (their text only), memorized and ordinary
alternating; the calibration's reference: the lab's validation ordinary prompts. Prints per arm
the median images/s (``summary.json``'s ``this_run.images_per_second``) and the ratio of seconds per image
against ``off`` (issue 14's goal: overhead under 5%), then one JSON line.

    python benchmarks/generate_throughput.py [--prompts 12] [--seeds 1] [--steps 50] [--repeats 3]
                                             [--sample-size 16] [--model DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ARMS = ("off", "always", "flagged")


def lab_prompts(n: int) -> tuple[list[str], list[str]]:
    """``n`` test prompts (memorized and ordinary alternating) and the validation ordinary prompts."""
    import polars as pl

    from audit.lab import LAB_DIR

    t = pl.read_parquet(LAB_DIR / "prompts.parquet")
    test = t.filter(pl.col("split") == "test")
    mem = test.filter(pl.col("memorized"))["prompt"].to_list()
    ordinary = test.filter(~pl.col("memorized"))["prompt"].to_list()
    picked = [p for pair in zip(mem, ordinary) for p in pair][:n]
    reference = t.filter((pl.col("split") == "validation") & ~pl.col("memorized"))["prompt"].to_list()
    return picked, reference


def build_model(root: Path, sample_size: int) -> Path:
    """A seeded SD v1-layout model with a tiny VAE, saved at ``root`` (safetensors)."""
    from audit.tiny import save_components, tiny_components, tiny_vae

    save_components(root, *tiny_components(seed=0, sample_size=sample_size, layout="sd1"))
    vae = tiny_vae(0)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    return root


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--sample-size", type=int, default=16, help="latent side of the built model")
    ap.add_argument("--model", help="a diffusers folder with vae/ instead of the built model")
    a = ap.parse_args(argv)

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import audit
    from audit.calibrate import calibrate, write_calibration
    from audit.cli.generate import build_pipeline, run_generate

    work = Path(tempfile.mkdtemp(prefix="memaudit-genbench-"))
    model = a.model or str(build_model(work / "model", a.sample_size))
    prompts, reference = lab_prompts(a.prompts)
    src = work / "prompts.txt"
    src.write_text("\n".join(prompts) + "\n")
    ref = work / "reference.txt"
    ref.write_text("\n".join(reference) + "\n")
    ref_run, _ = audit.run([ref], work / "reference-run", model=model, device="cpu")
    cal = write_calibration(calibrate(ref_run, fpr=0.01), work / "calibration.json")
    pipeline = build_pipeline(model, "cpu", "float32")
    # warm-up (first-call allocations), not timed
    run_generate(src, model, work / "warm", mitigate="always", seeds=1, steps=2, progress=False,
                 _pipeline=pipeline)
    rates: dict[str, list[float]] = {arm: [] for arm in ARMS}
    summaries = {}
    for r in range(a.repeats):
        for arm in ARMS:
            s = run_generate(src, model, work / f"{arm}{r}", mitigate=arm, seeds=a.seeds, steps=a.steps,
                             calibration=cal if arm == "flagged" else None, progress=False, _pipeline=pipeline)
            assert s["images"] == a.prompts * a.seeds, s
            rates[arm].append(s["this_run"]["images_per_second"])
            summaries[arm] = {k: s[k] for k in ("images", "flagged", "mitigated")}
    med = {arm: statistics.median(v) for arm, v in rates.items()}
    ratio = {arm: med["off"] / med[arm] for arm in ARMS}  # seconds per image against off
    print(f"memaudit generate, {a.model or f'SD v1 layout, random weights, {a.sample_size}x{a.sample_size} latents'}, "
          f"{a.prompts} prompts x {a.seeds} seed(s), {a.steps} DDIM steps, "
          f"CPU {torch.get_num_threads()} thread(s); median of {a.repeats} interleaved rounds:")
    for arm in ARMS:
        print(f"  {arm:8s} {med[arm]:.3f} images/s  (rounds: {', '.join(f'{x:.3f}' for x in rates[arm])}); "
              f"seconds per image vs off {ratio[arm]:.3f}; flagged {summaries[arm]['flagged']}, "
              f"mitigated {summaries[arm]['mitigated']}")
    print(json.dumps({"images_per_second": med, "rounds": rates, "seconds_per_image_vs_off": ratio,
                      "counts": summaries, "model": a.model or f"sd1-layout-{a.sample_size}", "prompts": a.prompts, "seeds": a.seeds, "steps": a.steps,
                      "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
