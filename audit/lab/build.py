"""End to end: train the lab model, measure its ground truth, check and RECORD the acceptance criteria, then
evaluate every scorer once, and write the shipped artefacts.

``build_lab(out)`` writes ``out/model/`` (diffusers layout), ``out/prompts.parquet``, ``out/generations.png``,
``out/criteria.json`` and ``out/report.json``; the training run (tokenizer, pretrained text encoder,
checkpoints, log) lives in ``out/run/`` and resumes when rerun. Order (the lab is an instrument, issue 11):
(1) train; (2) measure replication and label the prompts; (3) measure the criteria (schedule, text-encoder
outputs, adherence, attention regime, replication per duplication level and kind, counts) and write them
into ``memaudit.json`` and ``criteria.json``; only then (4) evaluate every scorer, once. Nothing about data
or model is chosen from (4) except the scorer's default layer (on the validation split).
The shipped copies are ``audit/lab/model/``, ``audit/lab/prompts.parquet`` and ``audit/lab/generations.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
import shutil

import numpy as np

from audit.lab.data import DataConfig
from audit.sources import strict_json

TRAIN_STEPS = 15000
SPLIT_SEED = 7
ADHERENCE_TARGET = 0.70
COUNT_TARGETS = {"memorized": 40, "not_memorized": 400}
BOS_SINK_TARGET = 0.5


def assign_splits(rows: list[dict], seed: int = SPLIT_SEED) -> None:
    """Set ``row["split"]`` to validation/test, half each within every stratum (group x tier x kind x measured
    label), strata in sorted order, after a seeded shuffle; odd strata give the extra row to validation."""
    rng = np.random.default_rng(seed)
    strata: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        strata.setdefault((r["group"], r["tier"], r.get("kind", ""), r["memorized"]), []).append(i)
    for key in sorted(strata, key=str):
        idx = np.asarray(strata[key])
        rng.shuffle(idx)
        for k, i in enumerate(idx):
            rows[int(i)]["split"] = "validation" if k % 2 == 0 else "test"


def write_prompts(rows: list[dict], path: Path) -> None:
    """Write the labelled prompts table (schema in docs/lab.md) as Parquet."""
    import polars as pl

    cols = ["prompt", "memorized", "similarity", "distance", "duplication", "image_duplication", "split", "group",
            "tier", "kind", "planted_index", "caption_index", "train_step", "nearest_source", "nearest_is_own",
            "adheres_w7_5", "adheres_w1"]
    cols += sorted(k for k in rows[0] if k.startswith("rep_w"))
    df = pl.DataFrame({c: [r[c] for r in rows] for c in cols})
    df = df.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
    df.write_parquet(path)


def picture_rows(rows: list[dict], per_tier: int = 2, n_heldout: int = 3) -> list[int]:
    """Rows shown in the picture: ``per_tier`` planted prompts of each tier (half fixed, half varied), the
    first 6 ordinary prompts measured as memorized, and ``n_heldout`` held-out prompts that are not."""
    chosen = []
    for t in sorted({r["tier"] for r in rows if r["group"] == "planted"}):
        for kind in ("fixed", "varied"):
            chosen += [i for i, r in enumerate(rows) if r["group"] == "planted" and r["tier"] == t
                       and r.get("kind") == kind][:per_tier // 2 or 1]
    chosen += [i for i, r in enumerate(rows) if r["group"] != "planted" and r["memorized"]][:6]
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


MIN_TRAIN_STEPS = 480  # N_SEEN_ONCE * 2 distinct training steps feed the ground truth's seen-once captions
MAX_TRAINING_SEED = 10**9  # training_seed * 10**9 + step seeds a torch generator (a signed 64-bit integer)


def build_lab(out: str | Path, steps: int = TRAIN_STEPS, log=print, run_dir: str | Path | None = None,
              mask_padding: bool = True, threads: int | None = None, training_seed: int = 0) -> dict:
    """Train (resuming from ``out/run``), measure, check the criteria, evaluate the scorers, write the
    artefacts. ``mask_padding``: the shipped variant masks EOS and padding out of the UNet's cross-attention
    (a deviation from SD, docs/lab.md); False trains the faithful variant. ``threads``: torch threads for
    training (default: torch's, every core unless ``OMP_NUM_THREADS`` says otherwise). ``training_seed``: 0
    the shipped run, K a second run on the same data (:func:`audit.lab.train.train`). Returns the report dict
    (also ``out/report.json``).

    Raises:
        RunError: before any training, ``steps`` below :data:`MIN_TRAIN_STEPS`, a ``training_seed`` outside 0 to
            :data:`MAX_TRAINING_SEED`, an ``out`` that is a file; when resuming, a checkpoint trained with other
            options.
    """
    from audit.errors import RunError
    from audit.lab.groundtruth import N_SEEN_ONCE
    from audit.lab.train import train

    # checked before the encoder's pretraining (minutes): a --steps 300 build crashed after it, in the ground truth
    if steps < MIN_TRAIN_STEPS:
        raise RunError(f"--steps {steps}: a lab build needs at least {MIN_TRAIN_STEPS} training steps (its ground "
                       f"truth draws {N_SEEN_ONCE} captions seen once in training from distinct steps); the "
                       f"shipped model trained {TRAIN_STEPS:,}")
    if not 0 <= training_seed <= MAX_TRAINING_SEED:
        raise RunError(f"--training-seed {training_seed}: give 0 to {MAX_TRAINING_SEED:,} (the seeds of the "
                       "initialization and noise draws are 64-bit integers derived from it)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: a file is there; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    config = DataConfig()
    run = Path(run_dir) if run_dir else out / "run"
    ckpt = train(run, steps, config, mask_padding=mask_padding, log=log, threads=threads, training_seed=training_seed)
    return finish_lab(out, ckpt, config, log)


def measure_criteria(model, rows: list[dict], images: np.ndarray, config: DataConfig, log=print) -> dict:
    """The acceptance criteria of issue 11, measured on the exported model and its labelled prompts.

    ``images``: the ground-truth generations, float32 [P, len(GUIDANCE), SEEDS, 3, 16, 16].
    Returns ``{"schedule", "text_encoder", "adherence", "attention_regime", "replication", "counts",
    "checks"}`` (``checks``: name -> bool against the issue's targets).
    """
    from diffusers import DDIMScheduler

    from audit.lab.adherence import GUIDANCE as ADH_W, adheres, probe_references
    from audit.lab.data import fresh_pairs
    from audit.lab.encoder import position_report
    from audit.lab.groundtruth import GUIDANCE, N_HELDOUT
    from audit.lab.regime import attention_regime
    from audit.lab.data import STREAM_HELDOUT

    sched = DDIMScheduler.from_config(model.scheduler_config)
    sched.set_timesteps(50)
    t0 = int(sched.timesteps[0])
    cfg = model.scheduler_config
    schedule = {k: cfg.get(k) for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps",
                                        "prediction_type", "steps_offset", "timestep_spacing")}
    schedule.update(first_timestep=t0, alpha_bar_t0=float(sched.alphas_cumprod[t0]))
    held = [i for i, r in enumerate(rows) if r["group"] == "heldout"]
    held_caps = [rows[i]["prompt"] for i in held]
    text = position_report(model.tokenizer, model.text_encoder, held_caps[:100])
    adherence = {}
    for gi, w in enumerate(GUIDANCE):
        flat = images[held][:, gi]  # [H, S, 3, 16, 16]
        ok = adheres(flat.reshape(-1, *flat.shape[2:]), [c for c in held_caps for _ in range(flat.shape[1])])
        ok = ok.reshape(len(held), -1)
        adherence[f"w{w:g}"] = float(ok.mean())
        for k, i in enumerate(held):
            rows[i][f"adheres_w{w:g}".replace(".", "_")] = int(ok[k].sum())
    for r in rows:
        for w in GUIDANCE:
            r.setdefault(f"adheres_w{w:g}".replace(".", "_"), -1)
    # the very draw evaluation_prompts took the held-out captions from (N_HELDOUT * 2 pairs: another n draws
    # other scenes, even when fewer than N_HELDOUT captions survived its filter)
    scenes, caps = fresh_pairs(config, N_HELDOUT * 2, STREAM_HELDOUT)
    keep = [caps.index(c) for c in held_caps]
    from audit.lab.data import take
    adherence["references"] = probe_references(take(scenes, np.asarray(keep)), held_caps)
    adherence["guidance_of_target"] = ADH_W
    regime = attention_regime(model.unet, model.tokenizer, model.text_encoder, model.scheduler_config,
                              held_caps, mask_padding=bool(model.extra.get("unet_encoder_attention_mask")))
    replication = []
    for group, tier, kind in sorted({(r["group"], r["tier"], r.get("kind", "")) for r in rows}, key=str):
        sel = [r for r in rows if (r["group"], r["tier"], r.get("kind", "")) == (group, tier, kind)]
        replication.append({
            "group": group, "tier": tier, "kind": kind, "n_prompts": len(sel),
            "n_memorized": sum(r["memorized"] for r in sel),
            "caption_duplication_mean": float(np.mean([r["duplication"] for r in sel])),
            "image_duplication_mean": float(np.mean([r["image_duplication"] for r in sel])),
            "median_distance": float(np.median([r["distance"] for r in sel])),
            "nearest_is_own": sum(r["nearest_is_own"] for r in sel if r["memorized"]),
            "rep_w1_ge2": sum(r["rep_w1"] >= 2 for r in sel), "rep_w7_5_ge2": sum(r["rep_w7_5"] >= 2 for r in sel)})
    n_mem = sum(r["memorized"] for r in rows)
    counts = {"memorized": n_mem, "not_memorized": len(rows) - n_mem,
              "by_split": {sp: {"memorized": sum(r["memorized"] for r in rows if r["split"] == sp),
                                "not_memorized": sum(not r["memorized"] for r in rows if r["split"] == sp)}
                           for sp in ("validation", "test")}}
    bos = {k: v["bos"] for k, v in regime["layers"].items()}
    checks = {
        "schedule_is_sd1x": schedule["prediction_type"] == "epsilon" and t0 == 981,
        "adherence_w7_5_ge_0_70": adherence["w7.5"] >= ADHERENCE_TARGET,
        "bos_mass_gt_0_5_in_some_layer": max(bos.values()) > BOS_SINK_TARGET,
        "memorized_ge_40": n_mem >= COUNT_TARGETS["memorized"],
        "not_memorized_ge_400": len(rows) - n_mem >= COUNT_TARGETS["not_memorized"],
    }
    log(f"criteria: {json.dumps(checks)}")
    return {"schedule": schedule, "text_encoder": text, "adherence": adherence, "attention_regime": regime,
            "replication": replication, "counts": counts, "checks": checks}


def ground_truth_key(state: dict, config: DataConfig) -> str:
    """What the ground truth measured from checkpoint ``state`` depends on, as a SHA-256 hex digest: the UNet
    weights that :func:`audit.lab.train.export` ships (the EMA), the cross-attention mask variant and the data
    configuration (the same step of another run, or of a run retrained after its folder was removed, differs)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(state["ema"]):
        h.update(name.encode())
        h.update(state["ema"][name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps({"mask_padding": bool(state.get("mask_padding", False)), "data": config.__dict__},
                        sort_keys=True, default=list).encode())
    return h.hexdigest()


def read_ground_truth(out: Path, steps: int, key: str, log=print) -> tuple[list[dict], dict, np.ndarray] | None:
    """The cached ground truth ``(rows, info, images)`` of ``out/groundtruth.json`` + ``out/generations.npy``, or
    None (saying why with ``log`` when a cache is there) when it is missing, unreadable, of another training step
    or model (:func:`ground_truth_key`), or its generations do not match its rows."""
    cache, npy = out / "groundtruth.json", out / "generations.npy"
    if not (cache.exists() and npy.exists()):
        return None
    try:
        saved = json.loads(cache.read_text())
        rows, info = saved["rows"], saved["info"]
        if not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows) and isinstance(info, dict)):
            raise TypeError("its rows are not a list of records, or its info not a record")
        images = np.load(npy)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log(f"ground truth in {cache} is unreadable ({type(exc).__name__}: {exc}): measuring again")
        return None
    if saved.get("train_steps") != steps:
        log(f"ground truth in {cache} was measured at step {saved.get('train_steps')}, not {steps}: measuring again")
        return None
    if saved.get("model") != key:
        log(f"ground truth in {cache} was measured on another model at step {steps} (other weights or data): "
            "measuring again")
        return None
    if images.ndim != 6 or len(images) != len(rows):
        log(f"ground truth in {cache}: {npy.name} holds {images.shape} generations for {len(rows)} prompts: "
            "measuring again")
        return None
    return rows, info, images


def finish_lab(out: Path, ckpt: Path, config: DataConfig, log=print) -> dict:
    """Everything after training (see :func:`build_lab`), from checkpoint ``ckpt``. The ground-truth
    measurement is cached in ``out/groundtruth.json`` + ``out/generations.npy`` with its training step and
    :func:`ground_truth_key` (a rerun from the same checkpoint skips it; another step, other weights or other
    data measure again)."""
    import torch

    from audit.lab.evaluate import choose_layer, evaluate
    from audit.lab.groundtruth import measure
    from audit.lab.train import export
    from audit.models import load_model
    import polars as pl

    out = Path(out)
    ckpt = Path(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    steps = int(state["step"])
    key = ground_truth_key(state, config)
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export(ckpt, tmp)
    model = load_model(str(tmp), device="cpu", dtype="float32")
    cache = out / "groundtruth.json"
    saved = read_ground_truth(out, steps, key, log)
    if saved is not None:
        rows, info, images = saved
        log(f"ground truth read from {cache}")
    else:
        rows, info = measure(model, config, steps, log=log)
        images = info.pop("_images")
        # each file replaced whole (an interrupted write left a truncated cache that failed every rerun), the
        # record last: it names the model the generations belong to
        with open(out / "generations.npy.tmp", "wb") as fh:
            np.save(fh, images)
        (out / "generations.npy.tmp").replace(out / "generations.npy")
        (out / "groundtruth.json.tmp").write_text(json.dumps({"train_steps": steps, "model": key, "rows": rows,
                                                              "info": info}, default=float))
        (out / "groundtruth.json.tmp").replace(cache)
    assign_splits(rows)
    # (3) the criteria, measured and recorded BEFORE any scorer is evaluated
    criteria = measure_criteria(model, rows, images, config, log=log)
    (out / "criteria.json").write_text(strict_json(criteria, indent=2, default=float))
    write_prompts(rows, out / "prompts.parquet")
    final = out / "model"
    shutil.rmtree(final, ignore_errors=True)
    export(ckpt, final, extra={"ground_truth": info, "criteria": criteria})
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"criteria written to {final / 'memaudit.json'} and {out / 'criteria.json'}; now evaluating the scorers once")
    # (4) every scorer, once
    model = load_model(str(final), device="cpu", dtype="float32")
    table = pl.read_parquet(out / "prompts.parquet")
    result = evaluate(model, table)
    result.pop("_scores")
    layer = choose_layer(result)
    meta = json.loads((final / "memaudit.json").read_text())
    if layer is None:
        layer = model.default_layers[0]
        val = result["validation"]
        meta["default_layers_note"] = (f"not chosen: the validation split has {val['n_memorized']} memorized and "
                                       f"{val['n_ordinary']} ordinary prompts, so no AUROC; the family's default")
        log(f"warning: default layer NOT chosen ({meta['default_layers_note']}, {layer}); the scorers' figures "
            "below are undefined")
    else:
        log(f"default layer (validation AUROC of attention entropy): {layer}")
    summary = {}
    for split in ("validation", "test", "all"):
        r = result[split]
        # the attention-entropy scorer's figures are those of its default layer (chosen on validation)
        scorers = dict(r["scorers"], attention_entropy=r["layers"][layer])
        summary[split] = {"n_memorized": r["n_memorized"], "n_ordinary": r["n_ordinary"],
                          "scorers": scorers, "layers": r["layers"], "bos_mass_mean": r["bos_mass_mean"]}
    meta["default_layers"] = [layer]
    meta["evaluation"] = summary
    (final / "memaudit.json").write_text(strict_json(meta, indent=2, default=float))
    picture(rows, images, config, steps, out / "generations.png")
    report = {"train_steps": steps, "ground_truth": info, "criteria": criteria, "evaluation": summary,
              "default_layers": [layer], "replication_by_group": replication_summary(table)}
    if "default_layers_note" in meta:  # the layer was not chosen on validation: why
        report["default_layers_note"] = meta["default_layers_note"]
    text = strict_json(report, indent=2, default=float)
    (out / "report.json").write_text(text)
    return json.loads(text)  # what report.json holds (a first build returned chance quantiles keyed by floats)


def replication_summary(table) -> list[dict]:
    """Memorized fraction per group and duplication tier, with the mean duplication count."""
    import polars as pl

    return (table.group_by("group", "tier", "kind")
            .agg(pl.len().alias("n"), pl.col("memorized").sum().alias("n_memorized"),
                 pl.col("duplication").mean().alias("mean_duplication"),
                 pl.col("distance").median().alias("median_distance"))
            .sort("group", "tier", "kind").to_dicts())
