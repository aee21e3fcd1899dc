"""Training the lab model: a pixel-space Stable-Diffusion-architecture model, from a fixed seed, resumable.

Architecture (Stable Diffusion's classes at a CPU size):
* text encoder: ``transformers.CLIPTextModel`` (causal, 2 layers, width 64, 4 heads, 77 positions),
  randomly initialised from the seed and FROZEN (a feasibility run found joint training weakened every
  memorization signal; SD v1 also keeps its text encoder frozen);
* tokenizer: :func:`audit.tokenizer.build_clip_tokenizer` over the lab vocabulary (BOS first, EOS after the
  prompt, EOS padding to 77);
* UNet: ``diffusers.UNet2DConditionModel`` on 16x16 RGB pixels (no VAE), blocks 32-64-64 with
  cross-attention only at 8x8 and 4x4 (8 ``attn2`` layers), cross-attention width 64.

Objective: v-prediction (Salimans & Ho 2022) on SD's scaled-linear betas rescaled to zero terminal SNR,
trailing timestep spacing at sampling (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
are Flawed", sec. 3.1-3.4): without it a pixel-space model learns the image's mean colour from the
never-fully-destroyed signal and drifts in colour when sampling from pure noise. Loss
``mean((unet(x_t, t, c) - v)^2)``, ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps``,
``v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0``. AdamW, EMA of the UNet weights (saved), captions dropped to the
empty prompt with probability 0.1 for classifier-free guidance (Ho & Salimans 2022).

Run ``python -m audit.lab.train --run-dir DIR --steps N``: it checkpoints to ``DIR/ckpt.pt`` (atomically,
every ``--ckpt-every`` steps) and resumes from it; the batch of step s is a pure function of (seed, s).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import time

from audit.lab.data import VOCAB, DataConfig, planted, training_batch

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}
MODEL_SEED = 1234
LR = 1e-3
WARMUP = 200
EMA_DECAY = 0.998


def build_components(seed: int = MODEL_SEED):
    """Return ``(tokenizer, text_encoder, unet)``: the untrained lab model, seeded."""
    import torch
    from diffusers import UNet2DConditionModel

    from audit.tiny import clip_text_encoder
    from audit.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(VOCAB)
    text_encoder = clip_text_encoder(tokenizer, hidden_size=64, seed=seed).requires_grad_(False)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=64, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    return tokenizer, text_encoder, unet


def encode(tokenizer, text_encoder, captions: list[str]):
    """Last hidden state of the frozen text encoder, float32 [B, 77, 64]."""
    import torch

    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def _train_scheduler():
    from diffusers import DDPMScheduler

    cfg = {k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("_class_name", "set_alpha_to_one")}
    return DDPMScheduler.from_config(cfg)


def train(run_dir: str | Path, steps: int, data: DataConfig = DataConfig(), ckpt_every: int = 250,
          max_minutes: float | None = None, threads: int = 2, log=print) -> Path:
    """Train (or resume) up to ``steps`` steps; returns the checkpoint path.

    The checkpoint holds the UNet, its EMA, the optimizer state and the step; the text encoder is frozen
    and rebuilt from the seed. A JSON line per 50 steps goes to ``run_dir/train.log``.
    """
    import torch

    torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "ckpt.pt"
    tokenizer, text_encoder, unet = build_components()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        unet.load_state_dict(state["unet"])
        ema = state["ema"]
        opt.load_state_dict(state["opt"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        log(f"resumed at step {step} ({elapsed / 60:.1f} min trained)")
    sched = _train_scheduler()
    ab = sched.alphas_cumprod.float()  # [1000], ab[-1] == 0 (zero terminal SNR)
    p_scenes, p_caps = planted(data)
    p_emb = encode(tokenizer, text_encoder, p_caps)
    empty = encode(tokenizer, text_encoder, [""])[0]
    unet.train()
    t_start = time.time()
    logf = open(run_dir / "train.log", "a")

    def save():
        state = {"unet": unet.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step,
                 "elapsed": elapsed + time.time() - t_start, "data": data.__dict__}
        tmp = run_dir / "ckpt.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, ckpt)

    losses = []
    while step < steps:
        if max_minutes is not None and time.time() - t_start > max_minutes * 60:
            break
        images, caps, pidx = training_batch(data, step, (p_scenes, p_caps))
        x0 = torch.from_numpy(images)
        n_pl = data.planted_per_batch
        cond = torch.empty(data.batch_size, 77, 64)
        cond[:n_pl] = p_emb[torch.from_numpy(pidx[:n_pl])]
        cond[n_pl:] = encode(tokenizer, text_encoder, [c or "" for c in caps[n_pl:]])
        drop = torch.tensor([c == "" for c in caps])
        cond[drop] = empty
        g = torch.Generator().manual_seed(data.seed * 7919 + step)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (data.batch_size,), generator=g)
        a = ab[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * noise
        v = a * noise - s * x0
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        loss = torch.nn.functional.mse_loss(pred, v)
        for group in opt.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in unet.state_dict().items():
                if p.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(p.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(p)
        step += 1
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            rec = {"step": step, "loss": sum(losses) / len(losses),
                   "minutes": (elapsed + time.time() - t_start) / 60}
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            losses = []
        if step % ckpt_every == 0:
            save()
        if step % 1000 == 0:
            import shutil

            shutil.copyfile(ckpt, run_dir / f"ckpt_{step:06d}.pt")
    save()
    logf.close()
    return ckpt


def export(ckpt: str | Path, out: str | Path, default_layers: list[str] | None = None, extra: dict | None = None,
           use_ema: bool = True) -> Path:
    """Write the trained model (EMA weights by default) in diffusers layout to ``out``; returns ``out``.

    ``memaudit.json`` records the default layer(s), the training step and the data design.
    """
    import torch
    from diffusers import DDIMScheduler

    from audit.tiny import save_components

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    tokenizer, text_encoder, unet = build_components()
    unet.load_state_dict(state["ema"] if use_ema else state["unet"])
    unet.eval()
    info = {"description": "memaudit lab model: tiny pixel-space SD-architecture model trained on synthetic "
                           "scenes with planted duplicates (see docs/lab.md)",
            "train_steps": int(state["step"]), "train_minutes": round(float(state["elapsed"]) / 60, 1),
            "data": state.get("data", {})}
    if default_layers:
        info["default_layers"] = list(default_layers)
    info.update(extra or {})
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    return save_components(out, tokenizer, text_encoder, unet, scheduler, info)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="train the memaudit lab model (resumable)")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=9000)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    train(args.run_dir, args.steps, ckpt_every=args.ckpt_every, max_minutes=args.max_minutes, threads=args.threads)


if __name__ == "__main__":
    main()
