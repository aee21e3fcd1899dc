"""The attention regime at the first denoising step: where cross-attention mass goes, per layer.

For each cross-attention (``attn2``) layer of the UNet, the attention probabilities of the conditional
branch at t0 (the first DDIM timestep, 981 for SD 1.x's schedule), averaged over heads and query pixels
(as Ren et al., ECCV 2024, average them: renjie3/MemAttn ``detect.py``), are summed over four position
kinds: BOS (position 0), prompt tokens (1 .. first EOS - 1), the first EOS, and padding (after the first
EOS); then averaged over prompts and noise draws. SD 1.4 puts about 0.9-0.99 of this mass on BOS (one
public measurement, fp32, unmodified pipeline).

Attention probabilities are recomputed by :class:`audit.capture.CrossAttentionCapture` (which applies the
UNet's ``encoder_attention_mask`` when given one), so a masked model's padding gets exactly 0.
"""

from __future__ import annotations

import numpy as np

KINDS = ("bos", "prompt", "eos", "pad")


def attention_regime(unet, tokenizer, text_encoder, scheduler_config: dict, prompts: list[str],
                     mask_padding: bool, noise_draws: int = 4, seed: int = 0, batch: int = 64) -> dict:
    """Mean cross-attention mass per position kind and layer at the first step.

    Args:
        unet, tokenizer, text_encoder: the model's components (float32, CPU or GPU).
        scheduler_config: the model's scheduler config; t0 = first timestep after ``set_timesteps(50)``.
        prompts: the prompts (ordinary ones, for the report).
        mask_padding: pass the model's padding mask (:func:`audit.lab.train.padding_mask`) to the UNet.
        noise_draws: K seeded noise images per prompt (the generator of prompt p, draw k seeded
            ``seed * 100003 + p * noise_draws + k``).

    Returns:
        ``{"t0": int, "layers": {attn2 path: {"bos", "prompt", "eos", "pad": float}}}``; the four masses of a
        layer sum to 1.
    """
    import torch
    from diffusers import DDIMScheduler

    from audit.capture import CrossAttentionCapture, cross_attention_layers
    from audit.lab.train import padding_mask

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(50)
    t0 = sched.timesteps[0]
    layers = cross_attention_layers(unet)
    sums = {name: np.zeros(4) for name in layers}
    n = 0
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    for b0 in range(0, len(prompts), batch):
        chunk = prompts[b0:b0 + batch]
        ids = torch.tensor(tokenizer(chunk, padding="max_length", max_length=77, truncation=True).input_ids)
        mask = padding_mask(ids, tokenizer.eos_token_id)
        with torch.inference_mode():
            c = text_encoder(ids)[0].repeat_interleave(noise_draws, dim=0)
            m = mask.repeat_interleave(noise_draws, dim=0)
            x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100003 + (b0 + i) * noise_draws + k))
                             for i in range(len(chunk)) for k in range(noise_draws)]) * sched.init_noise_sigma
            with CrossAttentionCapture(unet, layers, early_exit=False) as cap:
                probs = cap.run(lambda: unet(x, t0, encoder_hidden_states=c,
                                             encoder_attention_mask=m if mask_padding else None).sample)
        first_eos = (ids == tokenizer.eos_token_id).int().argmax(1).repeat_interleave(noise_draws)  # [B*K]
        pos = torch.arange(77)[None]
        kinds = torch.stack([(pos == 0).expand(len(first_eos), -1), (pos > 0) & (pos < first_eos[:, None]), pos == first_eos[:, None],
                             pos > first_eos[:, None]], dim=1).double()  # [B*K, 4, 77]
        for name in layers:
            a = probs[name].double()  # [B*K, 77], mean over heads and pixels
            sums[name] += (kinds * a[:, None]).sum(-1).sum(0).numpy()
        n += len(chunk) * noise_draws
    return {"t0": int(t0), "layers": {name: dict(zip(KINDS, (s / n).tolist())) for name, s in sums.items()}}
