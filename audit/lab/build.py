"""End to end: train the lab model, measure its ground truth, label and split the prompts, pick the default
layer on the validation split, and write the shipped artefacts.

``build_lab(out)`` writes ``out/model/`` (diffusers layout), ``out/prompts.parquet``, ``out/generations.png``
and ``out/report.json``; the training run (checkpoints, log) lives in ``out/run/`` and resumes when rerun.
The shipped copies are ``audit/lab/model/``, ``audit/lab/prompts.parquet`` and ``audit/lab/generations.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
import shutil

import numpy as np

from audit.lab.data import DataConfig

TRAIN_STEPS = 1750
SPLIT_SEED = 7


def assign_splits(rows: list[dict], seed: int = SPLIT_SEED) -> None:
    """Set ``row["split"]`` to validation/test, half each within every stratum (group x tier x measured
    label), after a seeded shuffle; odd strata give the extra row to validation."""
    rng = np.random.default_rng(seed)
    strata: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        strata.setdefault((r["group"], r["tier"], r["memorized"]), []).append(i)
    for key in sorted(strata, key=str):
        idx = np.asarray(strata[key])
        rng.shuffle(idx)
        for k, i in enumerate(idx):
            rows[int(i)]["split"] = "validation" if k % 2 == 0 else "test"


def write_prompts(rows: list[dict], path: Path) -> None:
    """Write the labelled prompts table (schema in docs/lab.md) as Parquet."""
    import polars as pl

    cols = ["prompt", "memorized", "similarity", "distance", "duplication", "split", "group", "tier",
            "planted_index", "train_step", "nearest_source", "nearest_is_own"]
    cols += sorted(k for k in rows[0] if k.startswith("rep_w"))
    df = pl.DataFrame({c: [r[c] for r in rows] for c in cols})
    df = df.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
    df.write_parquet(path)


def picture_rows(rows: list[dict], per_tier: int = 2, n_heldout: int = 3) -> list[int]:
    """Rows shown in the picture: ``per_tier`` planted prompts of each tier, every ordinary prompt measured as
    memorized, and ``n_heldout`` held-out prompts that are not."""
    chosen = []
    for t in sorted({r["tier"] for r in rows if r["group"] == "planted"}):
        chosen += [i for i, r in enumerate(rows) if r["group"] == "planted" and r["tier"] == t][:per_tier]
    chosen += [i for i, r in enumerate(rows) if r["group"] != "planted" and r["memorized"]]
    chosen += [i for i, r in enumerate(rows) if r["group"] == "heldout" and not r["memorized"]][:n_heldout]
    return chosen


def picture(rows: list[dict], images: np.ndarray, config: DataConfig, steps: int, path: Path,
            per_tier: int = 2, n_heldout: int = 3, scale: int = 4) -> None:
    """Save a PNG: one row per chosen prompt, first the training image (the planted image, or for ordinary
    prompts the nearest training image), a gap, then the ``SEEDS`` generations at guidance 7.5 and at 1.

    ``images``: float32 [P, G, S, 3, 16, 16] from :func:`audit.lab.groundtruth.measure` (or a mapping from
    row index to [G, S, 3, 16, 16] covering the chosen rows).
    """
    from PIL import Image

    from audit.lab.data import planted, render
    from audit.lab.groundtruth import GUIDANCE, training_images

    p_scenes, _ = planted(config)
    p_imgs = render(p_scenes)
    chosen = picture_rows(rows, per_tier, n_heldout)
    want = {rows[i]["nearest_source"] for i in chosen if rows[i]["group"] != "planted" and rows[i]["nearest_source"] < 0}
    found = {}
    if want:
        for imgs, src in training_images(config, steps):
            for k in np.flatnonzero(np.isin(src, list(want))):
                found[int(src[k])] = imgs[k]
    g_hi, g_lo = GUIDANCE.index(7.5), GUIDANCE.index(1.0)
    blank = np.ones((3, 16, 16), np.float32)
    lines = []
    for i in chosen:
        r = rows[i]
        ref = p_imgs[r["planted_index"]] if r["group"] == "planted" else (
            p_imgs[r["nearest_source"]] if r["nearest_source"] >= 0 else found[r["nearest_source"]])
        tiles = [ref, blank] + list(images[i][g_hi]) + [blank] + list(images[i][g_lo])
        lines.append(np.concatenate(tiles, axis=2))
    grid = np.concatenate(lines, axis=1)  # [3, H*rows, W*cols]
    arr = ((grid.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    img.save(path, optimize=True)


def build_lab(out: str | Path, steps: int = TRAIN_STEPS, log=print, run_dir: str | Path | None = None) -> dict:
    """Train (resuming from ``out/run``), measure, label, choose the default layer, write the artefacts.

    Returns the report dict (also written to ``out/report.json``).
    """
    from audit.lab.train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = DataConfig()
    run = Path(run_dir) if run_dir else out / "run"
    ckpt = train(run, steps, config, log=log)
    return finish_lab(out, ckpt, config, log)


def finish_lab(out: Path, ckpt: Path, config: DataConfig, log=print) -> dict:
    """Everything after training (see :func:`build_lab`), from checkpoint ``ckpt``."""
    import torch

    from audit.lab.evaluate import choose_layer, evaluate
    from audit.lab.groundtruth import measure
    from audit.lab.train import export
    from audit.models import load_model
    import polars as pl

    out = Path(out)
    steps = int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"])
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export(ckpt, tmp)
    model = load_model(str(tmp), device="cpu", dtype="float32")
    rows, info = measure(model, config, steps, log=log)
    images = info.pop("_images")
    np.save(out / "generations.npy", images)
    assign_splits(rows)
    write_prompts(rows, out / "prompts.parquet")
    table = pl.read_parquet(out / "prompts.parquet")
    result = evaluate(model, table)
    result.pop("_scores")
    layer = choose_layer(result)
    log(f"default layer (validation AUROC of attention entropy): {layer}")
    summary = {}
    for split in ("validation", "test", "all"):
        r = result[split]
        scorers = dict(r["scorers"], attention_entropy=r["layers"][layer])
        summary[split] = {"n_memorized": r["n_memorized"], "n_ordinary": r["n_ordinary"],
                          "scorers": scorers, "layers": r["layers"], "bos_mass_mean": r["bos_mass_mean"]}
    final = out / "model"
    shutil.rmtree(final, ignore_errors=True)
    export(ckpt, final, default_layers=[layer], extra={"ground_truth": info, "evaluation": summary})
    shutil.rmtree(tmp, ignore_errors=True)
    model = load_model(str(final), device="cpu", dtype="float32")
    result = evaluate(model, table)
    result.pop("_scores")
    for split in ("validation", "test"):
        got = result[split]["scorers"]["attention_entropy"]["auroc"]
        want = summary[split]["scorers"]["attention_entropy"]["auroc"]
        if abs(got - want) > 0.02:  # float noise can swap near-tied prompts; more is a bug
            raise RuntimeError(f"re-evaluation differs on {split}: {got} != {want}")
        log(f"re-evaluated attention entropy AUROC on {split}: {got:.4f} (stored {want:.4f})")
    picture(rows, images, config, steps, out / "generations.png")
    report = {"train_steps": steps, "ground_truth": info, "evaluation": result,
              "replication_by_group": replication_summary(table)}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def replication_summary(table) -> list[dict]:
    """Memorized fraction per group and duplication tier, with the mean duplication count."""
    import polars as pl

    return (table.group_by("group", "tier")
            .agg(pl.len().alias("n"), pl.col("memorized").sum().alias("n_memorized"),
                 pl.col("duplication").mean().alias("mean_duplication"),
                 pl.col("distance").median().alias("median_distance"))
            .sort("group", "tier").to_dicts())
