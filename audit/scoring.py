"""Memorization scores of prompts at the first denoising step.

Two scorers share one preparation (tokenize, encode, seeded first-step latents):

* ``attention_entropy`` (default) -- Ren et al., "Unveiling and Mitigating Memorization in Text-to-image
  Diffusion Models through Cross Attention", ECCV 2024 (arXiv 2403.11052), sec. 3.2 and 4.1: with a the
  cross-attention probabilities of the selected layer(s) averaged over heads and query pixels (a
  distribution over the L token positions), the risk is the entropy E = -sum_i a_i log a_i (natural log,
  0 log 0 = 0). One partial UNet forward on the conditional branch, stopped after the last selected layer.
* ``noise_magnitude`` -- Wen et al., "Detecting, Explaining, and Mitigating Memorization in Diffusion
  Models", ICLR 2024, sec. 3: the text-conditional noise prediction magnitude
  ||eps(x_t0, c) - eps(x_t0, c_empty)||_2 at the first step; one conditional and one unconditional
  full forward.

Step by step (DESIGN.md, "The score"): tokens padded to the tokenizer's L (77 for CLIP); c = last
hidden state of the text encoder; t0 = the first timestep of a DDIM scheduler built from the model's
scheduler config after ``set_timesteps(50)`` (981 for SD v1.x); x = noise * init_noise_sigma, then
``scale_model_input(x, t0)``; the noise comes from a generator seeded by (run seed, hash of the
normalized prompt), so a prompt's score does not depend on its batch, order, engine or worker.
Several noise draws or layers: a is averaged over them before the entropy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, asdict
import hashlib
import threading

import numpy as np

SCORERS = {
    "attention_entropy": "cross-attention entropy at the first step (Ren et al., ECCV 2024); higher = riskier",
    "noise_magnitude": "text-conditional noise prediction magnitude (Wen et al., ICLR 2024); higher = riskier",
}
TOP_TRIGGER_TOKENS = 5


@dataclass(frozen=True)
class ScoreConfig:
    """Everything that changes a score besides the model; recorded in every output.

    Attributes:
        scorer: a key of :data:`SCORERS`.
        layers: cross-attention module paths whose attention is averaged.
        noise_draws: K, number of seeded first-step latents per prompt (a is averaged over them).
        seed: run seed mixed with the prompt hash to seed each prompt's noise.
        num_inference_steps: steps given to ``set_timesteps``; the first of them is t0.
        dtype: model dtype name (attention probabilities are float32 regardless).
    """

    scorer: str
    layers: tuple[str, ...]
    noise_draws: int = 1
    seed: int = 0
    num_inference_steps: int = 50
    dtype: str = "float32"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


def attention_entropy(a, dim: int = -1):
    """Entropy E = -sum_i a_i log a_i of distributions ``a`` along ``dim`` (natural log, 0 log 0 = 0).

    Works on torch tensors (via ``torch.special.xlogy``) and numpy arrays (``scipy``-free: masked log).
    Source: Ren et al., ECCV 2024 (arXiv 2403.11052), sec. 4.1, eq. for attention entropy.
    """
    try:
        import torch

        if isinstance(a, torch.Tensor):
            return -torch.special.xlogy(a, a).sum(dim=dim)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    a = np.asarray(a, dtype=np.float64)
    safe = np.where(a > 0, a, 1.0)
    return -(a * np.log(safe)).sum(axis=dim)


def prompt_seed(run_seed: int, normalized_prompt: str) -> int:
    """Seed of a prompt's noise generator: 63 bits of BLAKE2b over (run seed, normalized prompt)."""
    h = hashlib.blake2b(f"{int(run_seed)}\x00{normalized_prompt}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


def prompt_hash(normalized_prompt: str) -> str:
    """Hex BLAKE2b-128 of a normalized prompt: its identity for deduplication and caches."""
    return hashlib.blake2b(normalized_prompt.encode("utf-8"), digest_size=16).hexdigest()


@dataclass
class Tokens:
    """Tokenized prompts. ``input_ids``: int64 [B, L]; ``n_tokens``: true length with BOS/EOS before
    truncation; ``n_kept``: length kept (<= L)."""

    input_ids: np.ndarray
    n_tokens: np.ndarray
    n_kept: np.ndarray


def tokenize(tokenizer, prompts: list[str], max_length: int) -> Tokens:
    """Tokenize with BOS/EOS, truncate to ``max_length`` keeping EOS last, pad with the pad token.

    This matches ``tokenizer(..., padding="max_length", truncation=True)`` as the SD pipelines call it,
    while also returning the untruncated length ``n_tokens``.
    """
    enc = tokenizer(prompts, add_special_tokens=True, truncation=False, padding=False, verbose=False)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = np.full((len(prompts), max_length), pad, dtype=np.int64)
    n_tokens = np.empty(len(prompts), dtype=np.int32)
    for i, seq in enumerate(enc):
        n_tokens[i] = len(seq)
        if len(seq) > max_length:
            seq = seq[: max_length - 1] + seq[-1:]
        ids[i, : len(seq)] = seq
    return Tokens(ids, n_tokens, np.minimum(n_tokens, max_length).astype(np.int32))


MASK_DECLARATIONS = ("bos_and_prompt_tokens",)


def encoder_attention_mask(model, input_ids):
    """The UNet cross-attention mask a model declares, or None (the SD default: every position attended).

    A model folder's ``memaudit.json`` may declare ``"unet_encoder_attention_mask": "bos_and_prompt_tokens"``
    (the memaudit lab's masked variant, docs/lab.md): the UNet attends only to BOS and the prompt tokens,
    i.e. the positions before the first EOS. Scoring, sampling and mitigation must pass this mask as the
    UNet's ``encoder_attention_mask`` wherever the model declares one.

    Args:
        model: a loaded model (``extra`` = its memaudit.json, ``tokenizer``).
        input_ids: token ids, int [B, L] (numpy or torch).
    Returns:
        int64 torch tensor [B, L] on ``input_ids``' device (1 = attend), or None.
    Raises:
        ValueError: an unknown declaration.
    """
    decl = (getattr(model, "extra", None) or {}).get("unet_encoder_attention_mask")
    if not decl:
        return None
    if decl not in MASK_DECLARATIONS:
        raise ValueError(f"unknown unet_encoder_attention_mask {decl!r}; known: {', '.join(MASK_DECLARATIONS)}")
    import torch

    ids = torch.as_tensor(input_ids)
    first = (ids == model.tokenizer.eos_token_id).int().argmax(dim=1, keepdim=True)
    return (torch.arange(ids.shape[1], device=ids.device)[None] < first).long()


def eps_difference_factor(scheduler, t) -> float:
    """Factor f with eps(x_t, c) - eps(x_t, c') = f * (out(x_t, c) - out(x_t, c')) for the scheduler's
    prediction type, at timestep ``t`` and the same x_t (Wen et al.'s measure is on the NOISE prediction):
    1 for epsilon; sqrt(alpha_bar_t) for v-prediction (eps = sqrt(ab) v + sqrt(1 - ab) x_t; Salimans & Ho 2022,
    sec. 4); -sqrt(ab) / sqrt(1 - ab) for sample (x0) prediction (eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)).
    At a zero-terminal-SNR step (ab = 0) the v factor is 0: eps = x_t for every prompt.

    Raises:
        ValueError: an unknown prediction type.
    """
    kind = scheduler.config.prediction_type
    ab = float(scheduler.alphas_cumprod[int(t)])
    if kind == "epsilon":
        return 1.0
    if kind == "v_prediction":
        return ab ** 0.5
    if kind == "sample":
        return -(ab ** 0.5) / (1 - ab) ** 0.5
    raise ValueError(f"unknown prediction_type {kind!r}")


@dataclass
class PreparedBatch:
    """A batch after its host-side work (:meth:`Scorer.prepare`): normalized ``prompts`` [B], their
    ``tokens``, and ``noise``, the seeded first-step noise, float32 [B*K, C, H, W] on the host."""

    prompts: list
    tokens: Tokens
    noise: object


def batch_size_for_memory(free_bytes: float, bytes_per_prompt: float, cap: int = 2048, fraction: float = 0.7) -> int:
    """Largest power of two n <= cap with n * bytes_per_prompt <= fraction * free_bytes (at least 1)."""
    if bytes_per_prompt <= 0:
        return cap
    n = int(fraction * free_bytes // bytes_per_prompt)
    if n < 1:
        return 1
    return min(cap, 1 << (n.bit_length() - 1))


def batch_size_from_probes(available_bytes: float, small: tuple[int, float], large: tuple[int, float],
                           cap: int = 2048, fraction: float = 0.7) -> int:
    """Batch size from the peak memory of two probe batches ``(prompts, peak bytes)``: the memory grows by
    ``per = (p2 - p1) / (n2 - n1)`` per prompt over a fixed part ``p1 - n1 * per`` (workspaces, the text
    encoder's and scheduler's buffers), so one probe alone would charge the fixed part to every prompt.
    Returns :func:`batch_size_for_memory` of what is left after the fixed part."""
    (n1, p1), (n2, p2) = small, large
    per = (p2 - p1) / (n2 - n1) if n2 > n1 else 0.0
    if per <= 0:  # no growth measured: charge everything to the prompts, as one probe would (conservative)
        per, fixed = p2 / max(n2, 1), 0.0
    else:
        fixed = max(p1 - n1 * per, 0.0)
    return batch_size_for_memory(max(available_bytes - fixed, 0.0), per, cap, fraction)


class Scorer:
    """Scores batches of normalized prompts with one loaded model.

    Args:
        model: a :class:`audit.model.LoadedModel`.
        config: the :class:`ScoreConfig`.
        compile: wrap the text encoder and UNet in ``torch.compile`` and keep the capture processors
            installed for the scorer's life (so compiled graphs are not invalidated batch after batch; call
            :meth:`close` to restore the originals). Scores agree with eager ones to float32 rounding.

    ``score(prompts)`` returns a dict of numpy arrays, one entry per prompt:
        ``risk`` float64 [B]; ``attn_entropy`` float64 [B]; ``bos_mass`` float64 [B];
        ``token_mass`` float32 [B, L] (a, for trigger tokens); ``noise_magnitude`` float64 [B] (NaN for
        the attention scorer); ``nonfinite`` bool [B]; ``n_tokens`` int32 [B]; ``truncated`` bool [B].

    Raises:
        ValueError: unknown scorer name.
        KeyError: a selected layer is not a cross-attention (``attn2``) layer of the UNet.
        audit.capture.IncompleteCaptureError: a selected layer was not captured.
    """

    def __init__(self, model, config: ScoreConfig, compile: bool = False):
        import torch
        from diffusers import DDIMScheduler

        if config.scorer not in SCORERS:
            raise ValueError(f"unknown scorer {config.scorer!r}; choose from {', '.join(SCORERS)}")
        from audit.capture import cross_attention_layers

        known = cross_attention_layers(model.unet)
        unknown = [name for name in config.layers if name not in known]
        if unknown or not config.layers:
            raise KeyError(f"not a cross-attention layer of this UNet: {', '.join(unknown) or '(none given)'}. "
                           f"Cross-attention layers: {', '.join(known)}")
        self.model = model
        self.config = config
        self.torch = torch
        scheduler = DDIMScheduler.from_config(model.scheduler_config)
        scheduler.set_timesteps(config.num_inference_steps)
        self.scheduler = scheduler
        self.t0 = scheduler.timesteps[0]
        self._t0_device = self.t0.to(model.device)  # copied once, not once per batch
        unet_cfg = model.unet.config
        self.latent_shape = (unet_cfg.in_channels, unet_cfg.sample_size, unet_cfg.sample_size)
        self._empty_embedding = None
        self._token_cache: dict[tuple[int, ...], str] = {}
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to call from two threads
        self._text_encoder, self._unet, self._capture = model.text_encoder, model.unet, None
        self.compiled = compile
        if compile:
            from audit.capture import CrossAttentionCapture

            self._capture = CrossAttentionCapture(model.unet, list(config.layers),
                                                  early_exit=config.scorer != "noise_magnitude").__enter__()
            self._text_encoder = torch.compile(model.text_encoder, dynamic=False)
            self._unet = torch.compile(model.unet, dynamic=False)

    @property
    def first_timestep(self) -> int:
        """t0, the first timestep after ``set_timesteps(num_inference_steps)``."""
        return int(self.t0)

    def noise(self, prompts: list[str]):
        """Seeded first-step noise on the host, float32 [B*K, C, H, W] (prompt-major; pinned on CUDA so the
        copy to the device is asynchronous). Each prompt's generator is seeded by :func:`prompt_seed`."""
        torch = self.torch
        k = self.config.noise_draws
        noise = torch.empty((len(prompts), k, *self.latent_shape), dtype=torch.float32,
                            pin_memory=self.model.device.type == "cuda")
        for i, p in enumerate(prompts):
            g = torch.Generator().manual_seed(prompt_seed(self.config.seed, p))
            noise[i] = torch.randn((k, *self.latent_shape), generator=g)
        return noise.flatten(0, 1)

    def latents(self, prompts: list[str], noise=None):
        """Seeded first-step UNet input, shape [B*K, C, H, W] (prompt-major), model dtype, on the device:
        ``scale_model_input(noise * init_noise_sigma, t0)`` (diffusers' DDIM pipeline, first step)."""
        noise = self.noise(prompts) if noise is None else noise
        x = noise.to(self.model.device, non_blocking=True) * self.scheduler.init_noise_sigma
        x = self.scheduler.scale_model_input(x, self.t0)
        return x.to(self.model.dtype)

    def encode(self, input_ids: np.ndarray):
        """Text embeddings c = text_encoder(tokens)[0], shape [B, L, D] (last hidden state)."""
        torch = self.torch
        ids = torch.from_numpy(input_ids).to(self.model.device, non_blocking=True)
        kwargs = {}
        if getattr(self.model.text_encoder.config, "use_attention_mask", False):
            pad = self.model.tokenizer.pad_token_id
            kwargs["attention_mask"] = (ids != pad).long()
        return self._text_encoder(ids, **kwargs)[0]

    def prepare(self, prompts: list[str], tokens: Tokens | None = None) -> PreparedBatch:
        """The host-side work of a batch: tokenize and draw the seeded noise. Thread-safe, so the pipeline
        prepares the next batch while the device scores this one (:func:`audit.pipeline.score_prompts`)."""
        if tokens is None:
            with self._tokenizer_lock:
                tokens = tokenize(self.model.tokenizer, prompts, self.model.max_length)
        return PreparedBatch(list(prompts), tokens, self.noise(prompts))

    def launch(self, batch: PreparedBatch):
        """Queue the device work of a prepared batch and return its results still on the device, packed as
        float64 [B, 4 + L]: entropy, BOS mass, noise magnitude (NaN for the attention scorer), non-finite
        flag, then a (the attention probabilities over the L token positions). No host synchronization."""
        from audit.capture import CrossAttentionCapture

        torch = self.torch
        b, k = len(batch.prompts), self.config.noise_draws
        full = self.config.scorer == "noise_magnitude"
        with torch.inference_mode():
            c = self.encode(batch.tokens.input_ids)  # [B, L, D]
            c_rep = c.repeat_interleave(k, dim=0)  # [B*K, L, D], prompt-major like the latents
            mask = encoder_attention_mask(self.model, batch.tokens.input_ids)  # declared by the model, or None
            if mask is not None:
                mask = mask.to(self.model.device).repeat_interleave(k, dim=0)
            x = self.latents(batch.prompts, batch.noise)
            t = self._t0_device
            context = contextlib.nullcontext(self._capture) if self._capture is not None else \
                CrossAttentionCapture(self.model.unet, list(self.config.layers), early_exit=not full)
            with context as cap:
                probs = cap.run(lambda: self._unet(x, t, encoder_hidden_states=c_rep,
                                                   encoder_attention_mask=mask).sample)
                eps_cond = cap.output
                nonfinite = torch.stack(list(cap.nonfinite.values())).any(dim=0).view(b, k).any(dim=1)
            a = torch.stack(list(probs.values())).mean(dim=0)  # [B*K, L], mean over layers
            a = a.view(b, k, -1).mean(dim=1).double()  # [B, L], mean over noise draws
            entropy = attention_entropy(a)
            nonfinite = nonfinite | ~torch.isfinite(entropy)
            if full:
                e_mask = encoder_attention_mask(self.model, self._empty_ids)
                if e_mask is not None:
                    e_mask = e_mask.to(self.model.device).expand(b * k, -1)
                eps_uncond = self._unet(x, t, encoder_hidden_states=self._empty(b * k),
                                        encoder_attention_mask=e_mask).sample
                # Wen et al.'s quantity is on the noise prediction: convert v / x0 outputs (factor 1 for eps)
                factor = abs(eps_difference_factor(self.scheduler, self.t0))
                diff = factor * (eps_cond.float() - eps_uncond.float()).flatten(1).norm(dim=1)  # [B*K]
                magnitude = diff.view(b, k).mean(dim=1).double()
                nonfinite = nonfinite | ~torch.isfinite(magnitude)
            else:
                magnitude = torch.full((b,), float("nan"), dtype=torch.float64, device=a.device)
            head = torch.stack([entropy, a[:, 0], magnitude, nonfinite.double()], dim=1)  # [B, 4]
            return torch.cat([head, a], dim=1)

    def collect(self, batch: PreparedBatch, packed) -> dict[str, np.ndarray]:
        """Bring a launched batch's results to the host in one transfer; see the class docstring."""
        host = packed.cpu().numpy()  # the one device-to-host transfer (and synchronization) per batch
        entropy, bos, magnitude, nonfinite = host[:, 0], host[:, 1], host[:, 2], host[:, 3] != 0
        tokens = batch.tokens
        full = self.config.scorer == "noise_magnitude"
        return {
            "risk": magnitude if full else entropy,
            "attn_entropy": entropy,
            "bos_mass": bos,
            "token_mass": host[:, 4:].astype(np.float32),  # exact: a was float32 before packing
            "noise_magnitude": magnitude,
            "nonfinite": nonfinite,
            "n_tokens": tokens.n_tokens,
            "n_kept": tokens.n_kept,
            "truncated": tokens.n_tokens > self.model.max_length,
        }

    def score(self, prompts: list[str], tokens: Tokens | None = None) -> dict[str, np.ndarray]:
        """Score normalized prompts (prepare, launch, collect); see the class docstring for the arrays."""
        batch = self.prepare(prompts, tokens)
        return self.collect(batch, self.launch(batch))

    def close(self) -> None:
        """Restore the UNet's original attention processors (only ``compile=True`` keeps ours installed)."""
        if self._capture is not None:
            self._capture.__exit__(None, None, None)
            self._capture = None

    def auto_batch_size(self, probes: tuple[int, int] = (4, 16), cpu_default: int = 32, cap: int = 2048) -> int:
        """The batch size for ``--batch-size auto``: on CPU ``cpu_default``; on a GPU the largest power of
        two that fits 70% of the available memory, from the peak memory of two probe batches (see
        :func:`batch_size_from_probes`). Cached; an out-of-memory error later still halves it (``max_batch``)."""
        if getattr(self, "_auto_batch", None):
            return self._auto_batch
        torch = self.torch
        if self.model.device.type != "cuda":
            self._auto_batch = cpu_default
            return cpu_default
        peaks = []
        for n in probes:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            self.score([f"probe prompt {i}" for i in range(n)])
            torch.cuda.synchronize()
            peaks.append((n, torch.cuda.max_memory_allocated() - before))
        free, _total = torch.cuda.mem_get_info()
        # memory the caching allocator holds but does not use is available too
        available = free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
        self._auto_batch = batch_size_from_probes(available, peaks[0], peaks[1], cap)
        return self._auto_batch

    def _decode(self, ids: tuple[int, ...]) -> str:
        """Text of a run of token ids (``</w>`` and byte-level symbols decoded), cached."""
        text = self._token_cache.get(ids)
        if text is None:
            with self._tokenizer_lock:
                text = self._token_cache[ids] = self.model.tokenizer.decode(list(ids)).strip()
        return text

    def _token_run(self, ids: np.ndarray, p: int, stop: int) -> tuple[str, int]:
        """Readable text of the token at position ``p`` and where its run starts. A byte-level BPE token can
        hold part of a UTF-8 character (accents, CJK, Arabic, emoji): then the text is that of the shortest
        run of neighbouring tokens in ``[1, stop)`` that decodes to whole characters (``é`` for either half of
        ``Ã©``), and the run's first position identifies it."""
        text = self._decode((int(ids[p]),))
        if "\ufffd" not in text:
            return text, p
        for width in range(2, 9):
            for a in range(max(1, p - width + 1), min(p, stop - width) + 1):
                wide = self._decode(tuple(int(i) for i in ids[a:a + width]))
                if wide and "\ufffd" not in wide:
                    return wide, a
        return text, p

    @property
    def _empty_ids(self) -> np.ndarray:
        """Token ids of the empty prompt, int64 [1, L]."""
        with self._tokenizer_lock:
            return tokenize(self.model.tokenizer, [""], self.model.max_length).input_ids

    def _empty(self, n: int):
        if self._empty_embedding is None:
            self._empty_embedding = self.encode(self._empty_ids)
        return self._empty_embedding.expand(n, -1, -1)

    def trigger_tokens(self, input_ids: np.ndarray, token_mass: np.ndarray, n_kept: np.ndarray) -> list[list[dict]]:
        """Top prompt tokens by attention mass (BOS, EOS and padding excluded), at most 5 per prompt.

        The tokens that together spell one character (byte-level pieces of é, 東, 🎨) count as one entry:
        its text is the character, its mass the sum of theirs, its position that of its first token.

        Returns for each prompt a list of ``{"token": str, "position": int, "mass": float}``, by mass desc.
        """
        out = []
        for ids, mass, n in zip(input_ids, token_mass, n_kept):
            stop = int(n) - 1
            positions = np.arange(1, max(stop, 1))
            if len(positions) == 0:
                out.append([])
                continue
            order = positions[np.argsort(-mass[positions], kind="stable")]
            top = [(p, *self._token_run(ids, int(p), stop)) for p in order[:TOP_TRIGGER_TOKENS]]
            if all(start == p for p, _, start in top):  # whole-character tokens only (the common case)
                out.append([{"token": text, "position": int(p), "mass": float(mass[p])} for p, text, _ in top])
                continue
            runs: dict[int, dict] = {}  # run start -> entry; mass summed over the run's tokens
            for p in order:
                text, start = self._token_run(ids, int(p), stop)
                entry = runs.setdefault(start, {"token": text, "position": int(start), "mass": 0.0})
                entry["mass"] += float(mass[p])
            out.append(sorted(runs.values(), key=lambda e: (-e["mass"], e["position"]))[:TOP_TRIGGER_TOKENS])
        return out
