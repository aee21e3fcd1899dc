"""The lab's text encoder: CLIP's architecture, pretrained on its own objective BEFORE the UNet, then frozen.

Stable Diffusion v1 conditions on a frozen CLIP ViT-L/14 text encoder that was trained contrastively on
image-text pairs long before the UNet (Rombach et al. 2022, sec. 4.3; Radford et al. 2021). The lab does the
same at its size: a causal ``transformers.CLIPTextModel`` (2 layers, width 64, 4 heads, 77 positions, the
lab tokenizer's BOS/EOS/pad ids) trained against a small CNN image encoder on lab scenes and captions drawn
from a stream the UNet never sees (``STREAM_ENCODER``), then frozen and saved.

Objective (recipe "E" of the feasibility study, in the team's notes, not in this repository; chosen so that the
padding outputs carry the prompt, as CLIP's do, instead of being one near-constant vector that the UNet uses as a
free "do-nothing" slot):

* contrastive (InfoNCE, symmetric, learned temperature; Radford et al. 2021, eq. in Fig. 3) between the
  image embedding and the text embedding pooled as the MEAN of the last hidden state over the EOS position
  and every padding position after it (CLIP pools at EOS alone);
* bag-of-words: from every position at or after EOS, a linear head predicts which vocabulary tokens the
  caption contains (binary cross-entropy), so each of those positions must carry the whole caption;
  (trained on EOS, the last position and two random positions between them per caption and step);
* a penalty ``PAD_COS_WEIGHT * mean_{i != j} cos(h_i[76], h_j[76])`` on the cross-prompt cosine of the last
  padding position, which the two terms above do not forbid from being large.

BOS stays what causality makes it: the same output for every prompt (it sees only itself).

Run by :func:`pretrain` (deterministic: the batch of step s is a pure function of (seed, s); the whole
pretraining is short, so an interrupted one restarts from scratch and gives the same weights).
"""

from __future__ import annotations

from pathlib import Path
import json
import os
import shutil
import time

import numpy as np

from audit.lab.data import DataConfig, caption, render, sample_scenes

STREAM_ENCODER = 6
ENCODER_SEED = 4321
HIDDEN = 64
LAYERS = 2
HEADS = 4
PRETRAIN_STEPS = 1000
BATCH = 128
BOW_POSITIONS = 4
LR = 2e-3
PAD_COS_WEIGHT = 1.0
BOW_WEIGHT = 1.0


def new_text_encoder(tokenizer, seed: int = ENCODER_SEED):
    """A seeded, untrained causal ``CLIPTextModel`` with the lab's size and the tokenizer's special ids."""
    from audit.tiny import clip_text_encoder

    return clip_text_encoder(tokenizer, hidden_size=HIDDEN, seed=seed, num_layers=LAYERS, heads=HEADS)


class _ImageEncoder:
    """Four 3x3 conv layers (3->32->64->64->64, stride 1,2,2,1, SiLU) + mean pool + linear to 64: the image
    tower of the contrastive objective (discarded after pretraining)."""

    def __new__(cls):
        import torch.nn as nn

        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64))


def encoder_batch(config: DataConfig, step: int, n: int = BATCH) -> tuple[np.ndarray, list[str]]:
    """Pretraining pairs of step ``step``: images float32 [n, 3, 16, 16] in [-1, 1] and captions, from the
    encoder's own stream (never shown to the UNet)."""
    rng = np.random.default_rng([config.seed, STREAM_ENCODER, step])
    scenes = sample_scenes(rng, n)
    return render(scenes), caption(rng, scenes)


def eos_positions(input_ids, eos_id: int):
    """Index of the first EOS in each row of ``input_ids`` (int [B, L]) -> int64 [B]."""
    import torch

    ids = torch.as_tensor(input_ids)
    return (ids == eos_id).int().argmax(dim=1)


def pretrain(tokenizer, out: str | Path, config: DataConfig = DataConfig(), steps: int = PRETRAIN_STEPS,
             log=print) -> Path:
    """Pretrain the text encoder (objective in the module docstring) and save it frozen to ``out``
    (``save_pretrained``, safetensors) with ``pretrain.json`` (losses, in-batch accuracy, minutes).

    Skips the work when ``out/pretrain.json`` exists (the save is atomic: a temporary folder renamed).
    Returns ``out``.
    """
    import torch
    import torch.nn.functional as F

    out = Path(out)
    if (out / "pretrain.json").exists():
        return out
    torch.manual_seed(ENCODER_SEED)
    te = new_text_encoder(tokenizer).train()
    img = _ImageEncoder()
    vocab = len(tokenizer)
    bow = torch.nn.Linear(HIDDEN, vocab)
    proj = torch.nn.Linear(HIDDEN, 64, bias=False)
    logit_scale = torch.nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))
    params = list(te.parameters()) + list(img.parameters()) + list(bow.parameters()) + list(proj.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    t_start = time.time()
    hist = []
    eos = tokenizer.eos_token_id
    pos = torch.arange(77)
    for step in range(steps):
        images, caps = encoder_batch(config, step)
        ids = torch.tensor(tokenizer(caps, padding="max_length", max_length=77, truncation=True).input_ids)
        h = te(ids).last_hidden_state  # [B, 77, D]
        e = eos_positions(ids, eos)  # [B]
        tail = (pos[None] >= e[:, None]).float()  # [B, 77], EOS and padding
        pooled = (h * tail[..., None]).sum(1) / tail.sum(1, keepdim=True)
        t_emb = F.normalize(proj(pooled), dim=-1)
        i_emb = F.normalize(img(torch.from_numpy(images)), dim=-1)
        logits = logit_scale.exp().clamp(max=100) * t_emb @ i_emb.T
        target = torch.arange(len(caps))
        l_clip = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        present = torch.zeros(len(caps), vocab)
        present.scatter_(1, ids, 1.0)
        present[:, [tokenizer.bos_token_id, eos]] = 0
        # a few positions per caption from EOS on (EOS, the last, and random ones between), for speed
        g = torch.Generator().manual_seed(config.seed * 31 + step)
        r = e[:, None] + (torch.rand(len(caps), BOW_POSITIONS - 2, generator=g) * (77 - e[:, None])).long()
        sel = torch.cat([e[:, None], torch.full_like(e[:, None], 76), r.clamp(max=76)], dim=1)  # [B, P]
        hs = h.gather(1, sel[..., None].expand(-1, -1, h.shape[-1]))  # [B, P, D]
        bl = bow(hs)  # [B, P, V]
        l_bow = F.binary_cross_entropy_with_logits(bl, present[:, None].expand_as(bl))
        last = F.normalize(h[:, -1], dim=-1)
        cos = last @ last.T
        l_cos = (cos.sum() - cos.diagonal().sum()) / (len(caps) * (len(caps) - 1))
        loss = l_clip + BOW_WEIGHT * l_bow + PAD_COS_WEIGHT * l_cos
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (step + 1) / 100) * (0.5 + 0.5 * np.cos(np.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            acc = float((logits.argmax(1) == target).float().mean())
            rec = {"step": step + 1, "clip": float(l_clip), "bow": float(l_bow), "pad_cos": float(l_cos),
                   "top1": acc, "minutes": (time.time() - t_start) / 60}
            hist.append(rec)
            log(f"encoder pretraining {json.dumps(rec)}")
    te.eval().requires_grad_(False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    te.save_pretrained(tmp, safe_serialization=True)
    (tmp / "pretrain.json").write_text(json.dumps({"steps": steps, "batch": BATCH, "lr": LR, "history": hist,
                                                   "minutes": (time.time() - t_start) / 60}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_text_encoder(path: str | Path):
    """The frozen pretrained encoder saved by :func:`pretrain` (eval mode, no gradients)."""
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(str(path)).eval().requires_grad_(False)


def position_report(tokenizer, text_encoder, captions: list[str]) -> dict:
    """Output statistics of the text encoder per position kind, over ``captions``.

    For BOS, prompt tokens, EOS and padding: the mean L2 norm of the last hidden state and the mean
    "largest channel over median channel" ratio ``max_c |h_c| / median_c |h_c|`` (the massive-activation
    measure of Sun et al. 2024, "Massive Activations in Large Language Models", arXiv 2402.17762; ``median_c`` is
    torch's: of an even number of channels, 64 here, the lower of the two middle values); plus the
    cross-prompt cosine of one padding position (the last, 76; mean over pairs of different prompts), the
    within-prompt cosine of padding positions (mean over pairs of positions of one prompt) and cos(BOS, padding).

    Returns a dict of floats (``{"bos": {"norm", "max_over_median"}, "prompt": ..., "eos": ..., "pad": ...,
    "pad_cos_across_prompts", "pad_cos_within_prompt", "bos_pad_cos"}``).
    """
    import torch
    import torch.nn.functional as F

    ids = torch.tensor(tokenizer(captions, padding="max_length", max_length=77, truncation=True).input_ids)
    with torch.no_grad():
        h = text_encoder(ids).last_hidden_state.double()  # [B, 77, D]
    e = eos_positions(ids, tokenizer.eos_token_id)
    pos = torch.arange(77)[None]
    kinds = {"bos": (pos == 0).expand(len(captions), -1), "prompt": (pos > 0) & (pos < e[:, None]), "eos": pos == e[:, None],
             "pad": pos > e[:, None]}
    a = h.abs()
    ratio = a.max(-1).values / a.median(-1).values.clamp_min(1e-12)
    norm = h.norm(dim=-1)
    out = {k: {"norm": float(norm[m].mean()), "max_over_median": float(ratio[m].mean())} for k, m in kinds.items()}
    last = F.normalize(h[:, -1], dim=-1)
    c = last @ last.T
    n = len(captions)
    out["pad_cos_across_prompts"] = float((c.sum() - c.diagonal().sum()) / (n * (n - 1)))
    within = []
    for i in range(n):
        p = F.normalize(h[i, int(e[i]) + 1:], dim=-1)
        cc = p @ p.T
        k = len(p)
        within.append(float((cc.sum() - cc.diagonal().sum()) / (k * (k - 1))))
    out["pad_cos_within_prompt"] = float(np.mean(within))
    out["bos_pad_cos"] = float((F.normalize(h[:, 0], dim=-1) * last).sum(-1).mean())
    return out
