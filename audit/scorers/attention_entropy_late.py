"""The ``attention_entropy_late`` scorer: Ren et al.'s detector D, "Unveiling and Mitigating Memorization
in Text-to-image Diffusion Models through Cross Attention", ECCV 2024 (arXiv 2403.11052)
(reference code renjie3/MemAttn: ``detect.py --mode D`` and ``read_results.py``). Expensive by design: a
whole sampling loop per prompt and draw; for parity with the paper and for confirming a short list.

Sampling: the scheduler the model's family builds (:meth:`audit.models.base.ModelAdapter.scheduler`: DDIM
for SD 1.x, as their ``text2img.py`` replaces the pipeline's with DDIM; the folder's own class for SD 2.x: their
``text2img.py`` keeps the folder's scheduler for ``stabilityai/stable-diffusion-2`` only (its Euler) and uses DDIM for
every other model, so this agrees with theirs on SD 2.0 and on SD 2.x folders that name DDIM, and is our own
generalization on a folder naming another class), N = ``num_inference_steps`` steps (50 by default, as in
the paper; fewer only for tests), classifier-free guidance 7.5 with the empty prompt. Step 0 is the shared
forward pair of :class:`audit.scorers.Scorer`; the loop starts from the same seeded sample, ``noise *
init_noise_sigma`` before ``scale_model_input`` (a diffusers pipeline's ``latents``). Each batch samples with
its own copy of the scheduler (``step`` keeps a step index, and multistep solvers keep past outputs), so a
prompt's D never depends on the batches scored before it. A scheduler whose ``step`` draws noise (DDPM,
Euler ancestral) gets one generator per prompt and draw, seeded from the prompt's seed, so D does not depend
on the batch either. A prediction type the scheduler cannot step is refused before scoring
(:func:`audit.scorers.base.check_sampler_prediction`).

Attention (per step s = 0..N-1): in EVERY cross-attention layer, the conditional forward's probabilities
averaged over heads and query pixels, then averaged over layers with equal weights -> a_s over the L token
positions. (Their code repeats each layer's heads to a common count before averaging, i.e. equal weights
per layer; with equal head counts, as in SD 1.x's 8 heads, this is the mean over layers AND heads.)

With len = the prompt's kept tokens including BOS and EOS (the EOS at index len-1):

* E_s = -sum_{i=0}^{L-1} a_s,i log a_s,i (all positions; nats);
* H_s = -sum_{i=len-1}^{L-1} a_s,i log a_s,i, the "summary" entropy, UNnormalized (no renormalization);
* D = mean_{s in late} E_s + ( mean_{s in late} H_s - H_0 ), late = the last N/5 steps (40..49 of 50).

The signed difference of means is their code's (one later paper writes an absolute value). Higher = riskier.
Several noise draws: D is computed per draw, then averaged (their stored results hold one generation per
prompt; how they aggregate several is not in the code we read). Cost: 2 * N UNet forwards per prompt and
draw (100 at N = 50). Columns: ``attention_entropy_late`` (D) and its two parts.

Owns this formula and its registration. Must not import torch at module level, nor any ``audit`` module
but the scorer registry, the entropy formula and the capture (imported when computing).
"""

from __future__ import annotations

from audit.scorers.attention_entropy import attention_entropy
from audit.scorers.registry import Column, ScorerSpec, register

GUIDANCE_SCALE = 7.5  # the SD pipelines' default, with which their text2img.py samples (detect.py reads results)


def late_steps(n: int) -> range:
    """The late window: the last n // 5 steps (at least one), 0-based; range(40, 50) for n = 50."""
    return range(n - max(n // 5, 1), n)


def summary_mask(n_kept, length: int, device):
    """bool [B, L]: positions from the EOS (index n_kept - 1) to L - 1, for kept lengths ``n_kept`` [B]."""
    import torch

    n = torch.as_tensor(n_kept, device=device).long().view(-1, 1)
    return torch.arange(length, device=device).view(1, -1) >= (n - 1)


def step_entropies(probs: dict, summary):
    """(E_s, H_s), float64 [N] each, from one step's ``probs`` {layer: float32 [N, L]} (every layer) and the
    ``summary`` mask bool [N, L]: a = mean over layers; E over all positions, H over the summary positions."""
    import torch

    a = torch.stack(list(probs.values())).mean(dim=0).double()  # [N, L]
    terms = -torch.special.xlogy(a, a)
    return attention_entropy(a), (terms * summary).sum(dim=1)


def fresh_scheduler(scheduler):
    """A new scheduler of ``scheduler``'s class and configuration with the same ``timesteps`` (its
    ``set_timesteps`` repeated): no step index nor past model outputs carried over from earlier batches."""
    copy = type(scheduler).from_config(scheduler.config)
    copy.set_timesteps(len(scheduler.timesteps))
    return copy


def draw_generators(seeds, k: int, device) -> list:
    """One torch generator on ``device`` per prompt and noise draw, prompt-major ([B*K], as the latents), for
    a scheduler whose ``step`` adds noise: draw j of a prompt of seed s is seeded with (s + 1 + j) mod 2^63, a
    stream apart from the first-step noise (seed s). ``seeds``: the prompts' int seeds [B] (host)."""
    import torch

    return [torch.Generator(device).manual_seed((int(seed) + 1 + j) % (1 << 63)) for seed in seeds for j in range(k)]


def compute(ctx) -> dict:
    """``{"attention_entropy_late", "late_entropy", "summary_entropy_change": float64 [B]}`` on the device:
    runs steps 1..N-1 of guided sampling (step 0 is the shared forward: ``ctx.probs``, ``ctx.eps_cond``,
    ``ctx.eps_uncond``) and applies the formula of the module docstring per draw, then the mean over draws."""
    import contextlib
    import inspect

    import torch

    from audit.capture import CrossAttentionCapture

    s = ctx.scorer
    sched = fresh_scheduler(s.scheduler)
    timesteps = sched.timesteps
    n = len(timesteps)
    late = set(late_steps(n))
    summary = summary_mask(ctx.tokens.n_kept, ctx.a.shape[1], ctx.x.device).repeat_interleave(ctx.k, dim=0)
    uncond = s.empty_embeddings(ctx.x.shape[0])
    e_late, h_late = [], []
    e0, h0 = step_entropies(ctx.probs, summary)
    if 0 in late:
        e_late.append(e0), h_late.append(h0)
    # the sample before scale_model_input: every scheduler memaudit builds scales the input by a scalar of the
    # timestep (the identity for DDIM, 1 / sqrt(sigma^2 + 1) for Euler), so dividing by it recovers the sample
    scale = sched.scale_model_input(torch.ones((), dtype=torch.float64), timesteps[0]).item()
    latents = ctx.x.float() / scale
    step_kwargs = {}
    takes_generator = "generator" in inspect.signature(sched.step).parameters  # used when its step adds noise
    if takes_generator and ctx.prompts is not None and ctx.x.device.type != "meta":  # meta: no generators
        step_kwargs["generator"] = draw_generators(s.seeds(ctx.prompts).tolist(), ctx.k, ctx.x.device)
    out_c, out_u = ctx.eps_cond, ctx.eps_uncond
    for i in range(1, n):
        guided = out_u.float() + GUIDANCE_SCALE * (out_c.float() - out_u.float())
        latents = sched.step(guided, timesteps[i - 1], latents, **step_kwargs).prev_sample
        t = timesteps[i].to(ctx.x.device)
        x = sched.scale_model_input(latents, t).to(ctx.x.dtype)
        capture = contextlib.nullcontext(s._capture) if s._capture is not None else \
            CrossAttentionCapture(s.model.unet, list(s.all_layers), early_exit=False)
        with capture as cap:
            probs = cap.run(lambda: s.model_output(x, t, ctx.c))
            out_c = cap.output
        out_u = s.model_output(x, t, uncond)
        if i in late:
            e, h = step_entropies({name: probs[name] for name in s.all_layers}, summary)
            e_late.append(e), h_late.append(h)
    e_mean = torch.stack(e_late).mean(dim=0)
    change = torch.stack(h_late).mean(dim=0) - h0
    per_draw = lambda v: v.view(ctx.b, ctx.k).mean(dim=1)  # noqa: E731
    return {"attention_entropy_late": per_draw(e_mean + change), "late_entropy": per_draw(e_mean),
            "summary_entropy_change": per_draw(change)}


SPEC = register(ScorerSpec(
    name="attention_entropy_late",
    description="Ren et al.'s D: late-step attention entropy plus the change of the summary-token entropy "
                "over guided 50-step sampling (ECCV 2024); higher = riskier",
    forward="full_sampling",
    compute=compute,
    risk_column="attention_entropy_late",
    columns=(
        Column("attention_entropy_late", "double", "Ren et al.'s D = late_entropy + summary_entropy_change; null "
               "unless --scorer attention_entropy_late"),
        Column("late_entropy", "double", "mean attention entropy over the last fifth of the sampling steps, all "
               "layers, nats; null unless --scorer attention_entropy_late"),
        Column("summary_entropy_change", "double", "mean summary-token entropy over the late steps minus that at "
               "step 0 (unnormalized), nats; null unless --scorer attention_entropy_late"),
    ),
    unet_forwards=100.0,
))
