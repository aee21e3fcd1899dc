"""Measured ground truth: does a prompt's full sampling replicate a training image?

For each evaluation prompt we sample ``SEEDS`` images at each guidance scale in ``GUIDANCE`` with DDIM
(``SAMPLING_STEPS`` steps, the model's own scheduler config: SD 1.x's scaled-linear betas, epsilon
prediction, leading spacing with steps_offset 1, so 10 steps start at t = 901; the UNet gets the model's
declared cross-attention mask, if any) and classifier-free guidance ``out = u + w (c - u)`` on the model output (Ho & Salimans
2022; w = 1 is the conditional model alone, the low scale the issue asks to check; 7.5 is SD's default).
Each generation is compared with every training image (the planted images and every ordinary image of every
trained step, re-drawn from the data seeds).

Similarity (fixed before any generation of a trained model was looked at): the *normalised centred
distance* ``d(x, y) = ||xc - yc|| / ||yc||`` with ``xc = x - mean_hw x`` (each image's per-channel mean
removed, on [-1, 1] pixels): the RMS pixel difference after removing global colour shifts, relative to the
training image's own contrast. Removing the means makes a global colour shift cost nothing (as copy-detection
descriptors such as SSCD are invariant to it; Pizzi et al. 2022); dividing by ``||yc||`` stops a flat or
blurred generation from counting as a copy of a low-contrast training image (a code-path trial with an
untrained model found exactly that with the plain centred RMSE). The nearest training image is the one of
least d. Column ``similarity`` = 1 - d (1 = identical up to a per-channel offset; 0 = as far as a flat image).

Threshold (fixed before any generation, from the data alone): ``tau`` = the 1st percentile of the nearest-
training-image distance of ``N_CHANCE`` freshly drawn scenes (a stream never used in training). A
generation *replicates* when d < tau: it is closer to some training image than 99% of genuinely new
images are. A prompt is *memorized* when, at some guidance scale, at least ``MIN_REPLICATING`` of its
``SEEDS`` generations replicate; the reported distance is the least over scales of the
``MIN_REPLICATING``-th smallest distance over seeds.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from audit.lab.data import (STREAM_FRESH, STREAM_HELDOUT, STREAM_ORDINARY, DataConfig, cfg_drop_mask, fresh_pairs,
                            ordinary_step, planted, render, sample_scenes)

SEEDS = 4
GUIDANCE = (1.0, 7.5)
SAMPLING_STEPS = 10
MIN_REPLICATING = 2
N_CHANCE = 2000
N_HELDOUT = 240
N_SEEN_ONCE = 240


def centred(images: np.ndarray) -> np.ndarray:
    """Per-image, per-channel mean removed and flattened: float32 [N, 3*H*W]."""
    x = images.astype(np.float32)
    return (x - x.mean(axis=(2, 3), keepdims=True)).reshape(len(x), -1)


def training_images(config: DataConfig, steps: int, chunk_steps: int = 500):
    """Yield the training set in chunks: ``(images [n,3,16,16], source)`` with source = planted image index
    (>= 0) for the planted images (once each) and ``-(1 + step)`` for an ordinary image of ``step``."""
    p_scenes, _ = planted(config)
    yield render(p_scenes), np.arange(config.n_planted)
    for s0 in range(0, steps, chunk_steps):
        imgs, src = [], []
        for s in range(s0, min(steps, s0 + chunk_steps)):
            rng = np.random.default_rng([config.seed, STREAM_ORDINARY, s])
            imgs.append(render(sample_scenes(rng, config.ordinary_per_batch)))
            src.append(np.full(config.ordinary_per_batch, -(1 + s)))
        yield np.concatenate(imgs), np.concatenate(src)


def nearest(queries: np.ndarray, config: DataConfig, steps: int, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest training image of each query image under the normalised centred distance ``||qc - tc|| / ||tc||``
    (memaudit's own measure for the lab's 16x16 scenes, docs/lab.md "Ground truth: measured"; not the SSCD
    similarity that published labels of SD's memorized prompts use).

    Args:
        queries: float32 [M, 3, 16, 16] in [-1, 1].
    Returns:
        ``(distance float64 [M], source int64 [M])``, source as in :func:`training_images`.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    q = torch.from_numpy(centred(queries)).double()
    qn = (q * q).sum(1, keepdim=True)
    best = torch.full((len(q),), float("inf"), dtype=torch.float64)
    best_src = torch.zeros(len(q), dtype=torch.int64)
    for imgs, src in training_images(config, steps):
        t = torch.from_numpy(centred(imgs)).double()
        tn = (t * t).sum(1)[None]
        rel = (qn + tn - 2 * q @ t.T) / tn.clamp_min(1e-12)  # [M, n], squared normalised distance
        val, arg = rel.min(dim=1)
        better = val < best
        best = torch.where(better, val, best)
        best_src = torch.where(better, torch.from_numpy(src)[arg], best_src)
    return best.clamp_min(0).sqrt().numpy(), best_src.numpy()


def chance_threshold(config: DataConfig, steps: int) -> tuple[float, np.ndarray]:
    """``(tau, distances)``: the 1st percentile of nearest-training-image distances of ``N_CHANCE`` fresh scenes."""
    rng = np.random.default_rng([config.seed, STREAM_FRESH])
    imgs = render(sample_scenes(rng, N_CHANCE))
    d, _ = nearest(imgs, config, steps)
    return float(np.quantile(d, 0.01)), d


def evaluation_prompts(config: DataConfig, steps: int) -> list[dict]:
    """The evaluation prompts: every caption of every planted image, ``N_HELDOUT`` held-out captions never
    seen in training, and ``N_SEEN_ONCE`` ordinary training captions seen exactly once: the first caption of a
    randomly chosen step's ordinary pairs not dropped for guidance, kept only when no planted caption equals it
    and no other ordinary pair of any step in ``0..steps-1`` was drawn with it (a short caption recurs across
    thousands of steps: the v2 lab's table, built before this check, holds 18 of 240 shown in 2-6 steps).

    Each row: prompt, group (planted / heldout / seen_once), tier (planted only, else -1), kind (fixed /
    varied for planted, else ""), planted_index and caption_index (-1 if not planted), train_step (seen_once
    only, else -1).
    """
    rows = []
    p_scenes, p_caps = planted(config)
    tiers = config.planted_tiers()
    kinds = config.planted_kinds()
    for i, caps in enumerate(p_caps):
        for j, c in enumerate(caps):
            rows.append({"prompt": c, "group": "planted", "tier": int(tiers[i]), "kind": kinds[i],
                         "planted_index": i, "caption_index": j, "train_step": -1})
    planted_caps = {c for caps in p_caps for c in caps}
    drawn = Counter()  # ordinary caption -> how many ordinary pairs of steps 0..steps-1 were drawn with it
    by_step = {}
    for s in range(steps):
        _, caps = ordinary_step(config, s)
        drawn.update(caps)
        by_step[s] = caps
    seen = planted_caps | drawn.keys()
    rng = np.random.default_rng([config.seed, STREAM_HELDOUT, 1])
    taken = set()
    for s in rng.choice(steps, size=N_SEEN_ONCE * 2, replace=False):
        drop = cfg_drop_mask(config, int(s))[config.planted_per_batch:]
        c = by_step[int(s)][int(np.flatnonzero(~drop)[0])]
        if c in taken or drawn[c] > 1 or c in planted_caps:
            continue
        taken.add(c)
        rows.append({"prompt": c, "group": "seen_once", "tier": -1, "kind": "", "planted_index": -1,
                     "caption_index": -1, "train_step": int(s)})
        if len(taken) == N_SEEN_ONCE:
            break
    _, held = fresh_pairs(config, N_HELDOUT * 2, STREAM_HELDOUT)
    held = [h for h in dict.fromkeys(held) if h not in seen][:N_HELDOUT]
    rows += [{"prompt": h, "group": "heldout", "tier": -1, "kind": "", "planted_index": -1, "caption_index": -1,
              "train_step": -1} for h in held]
    return rows


def generate(model, prompts: list[str], guidance: float, seeds: int | None = None, steps: int | None = None,
             batch: int = 512, base_seed: int = 0, noise_ids: list[int] | None = None) -> np.ndarray:
    """Full DDIM sampling with classifier-free guidance; returns float32 [len(prompts), seeds, 3, 16, 16].

    Noise of (prompt i, seed j) comes from ``torch.Generator().manual_seed(base_seed * 10007 + i * 101 + j)``
    (independent of the guidance scale, so scales are compared on the same starting noise); ``noise_ids`` replaces
    the position i (to redraw some prompts of a larger call). x0 predictions are not clipped; outputs are clipped
    to [-1, 1] at the end.
    """
    import torch
    from diffusers import DDIMScheduler

    from audit.models.base import declared_encoder_mask, tokenize

    seeds = SEEDS if seeds is None else seeds
    steps = SAMPLING_STEPS if steps is None else steps
    unet, te, tok = model.unet, model.text_encoder, model.tokenizer
    with torch.inference_mode():
        toks, e_toks = tokenize(tok, prompts, model.max_length), tokenize(tok, [""], model.max_length)
        cond = te(torch.from_numpy(toks.input_ids))[0]  # [P, L, D]
        empty = te(torch.from_numpy(e_toks.input_ids))[0]
        # the UNet attention mask the model declares (the lab's masked variant), [P, L], or None
        mask = declared_encoder_mask(model.extra, torch.from_numpy(toks.attention_mask))
        e_mask = declared_encoder_mask(model.extra, torch.from_numpy(e_toks.attention_mask))
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(base_seed * 10007 + i * 101 + j))
                         for i in (noise_ids if noise_ids is not None else range(len(prompts))) for j in range(seeds)])  # [P*S, C, H, W]
    c_rep = cond.repeat_interleave(seeds, dim=0)
    m_rep = mask.repeat_interleave(seeds, dim=0) if mask is not None else None
    out = torch.empty_like(noise)
    for b0 in range(0, len(noise), batch):
        sched = DDIMScheduler.from_config(model.scheduler_config)
        sched.set_timesteps(steps)
        x = noise[b0:b0 + batch] * sched.init_noise_sigma
        c = c_rep[b0:b0 + batch]
        u = empty.expand(len(x), -1, -1)
        mc = m_rep[b0:b0 + batch] if m_rep is not None else None
        mu = e_mask.expand(len(x), -1) if e_mask is not None else None
        with torch.inference_mode():
            for t in sched.timesteps:
                xin = sched.scale_model_input(x, t)
                if guidance == 1.0:
                    pred = unet(xin, t, encoder_hidden_states=c, encoder_attention_mask=mc).sample
                else:
                    both = unet(torch.cat([xin, xin]), t, encoder_hidden_states=torch.cat([u, c]),
                                encoder_attention_mask=torch.cat([mu, mc]) if mc is not None else None).sample
                    pu, pc = both.chunk(2)
                    pred = pu + guidance * (pc - pu)
                x = sched.step(pred, t, x).prev_sample
        out[b0:b0 + batch] = x
    return out.clamp(-1, 1).view(len(prompts), seeds, *shape).numpy()


def measure(model, config: DataConfig, steps: int, log=print) -> tuple[list[dict], dict]:
    """Label the evaluation prompts by measured replication.

    Returns ``(rows, info)``: rows of :func:`evaluation_prompts` plus ``distance``, ``similarity``,
    ``memorized``, ``duplication`` (times this caption was shown with its image), ``image_duplication``
    (times the image was shown, any caption), ``nearest_source`` (training image nearest to the best generation, see
    :func:`training_images`), ``nearest_is_own`` and per-scale replicating-seed counts ``rep_w{w}``; info holds
    tau, the chance distances' quantiles and the sampling settings. Also returns the generations in
    ``info["_images"]`` (float32 [P, len(GUIDANCE), SEEDS, 3, 16, 16]) for the picture.
    """
    import time

    from audit.lab.data import duplication_counts

    rows = evaluation_prompts(config, steps)
    img_counts, cap_counts = duplication_counts(config, steps)
    t0 = time.time()
    tau, chance = chance_threshold(config, steps)
    log(f"tau = {tau:.4f} (chance NN distance quantiles 1/50/99%: "
        f"{np.quantile(chance, [0.01, 0.5, 0.99]).round(4).tolist()}), {time.time() - t0:.0f}s")
    prompts = [r["prompt"] for r in rows]
    gens = []
    for w in GUIDANCE:
        t0 = time.time()
        gens.append(generate(model, prompts, w))
        log(f"sampled guidance {w}: {time.time() - t0:.0f}s")
    imgs = np.stack(gens, axis=1)  # [P, G, S, 3, H, W]
    t0 = time.time()
    d, src = nearest(imgs.reshape(-1, *imgs.shape[3:]), config, steps)
    log(f"nearest neighbours: {time.time() - t0:.0f}s")
    d = d.reshape(len(rows), len(GUIDANCE), SEEDS)
    src = src.reshape(len(rows), len(GUIDANCE), SEEDS)
    for i, r in enumerate(rows):
        dk = np.sort(d[i], axis=1)[:, MIN_REPLICATING - 1]  # [G]
        g = int(np.argmin(dk))
        s = int(np.argmin(d[i, g]))
        r["distance"] = float(dk[g])
        r["similarity"] = 1.0 - float(dk[g])
        r["memorized"] = bool(dk[g] < tau)
        for gi, w in enumerate(GUIDANCE):
            r[f"rep_w{w:g}".replace(".", "_")] = int((d[i, gi] < tau).sum())
        r["nearest_source"] = int(src[i, g, s])
        own = r["planted_index"] if r["group"] == "planted" else (-(1 + r["train_step"]) if r["group"] == "seen_once" else None)
        r["nearest_is_own"] = bool(own is not None and src[i, g, s] == own)
        if r["group"] == "planted":
            r["duplication"] = int(cap_counts[r["planted_index"], r["caption_index"]])  # this caption with its image
            r["image_duplication"] = int(img_counts[r["planted_index"]])  # the image, any caption
        else:
            r["duplication"] = r["image_duplication"] = 1 if r["group"] == "seen_once" else 0
    info = {"tau": tau, "chance_quantiles": {q: float(np.quantile(chance, q)) for q in (0.01, 0.05, 0.5, 0.99)},
            "guidance": list(GUIDANCE), "seeds": SEEDS, "sampling_steps": SAMPLING_STEPS,
            "min_replicating": MIN_REPLICATING, "train_steps": steps, "_images": imgs}
    return rows, info
