"""The forward all scorers share, and the :class:`Scorer` that runs a registered scorer on a batch.

Owns the host-side preparation (tokenize, seeded first-step noise), the text encoding, the first-step
latents, the attention capture of the selected layers and the packing of a batch's results into one
device tensor (one device-to-host transfer per batch), and the trigger tokens. What a scorer adds is in
its own module (:mod:`audit.scorers.attention_entropy`, :mod:`audit.scorers.noise_magnitude`), named by
the registry (:mod:`audit.scorers.registry`). Must not import engines, pipeline or output code; torch,
diffusers and :mod:`audit.capture` are imported when a :class:`Scorer` is built.

Step by step (README, "The method"): tokens padded to the tokenizer's L (77 for CLIP); c = last
hidden state of the text encoder; t0 = the first timestep after ``set_timesteps(steps)`` (50 by default) of the
scheduler the scorer samples with (:func:`scorer_scheduler`): the family's own for ``attention_entropy`` and
``attention_entropy_late`` (DDIM for SD v1.x: t0 = 981; the folder's class for SD 2.x: 999 for SD 2.0's Euler),
DDIM from the model's scheduler config for ``noise_magnitude`` and ``guidance_geometry``; x = the family's
first input: noise * init_noise_sigma, then ``scale_model_input(x, t0)`` (the unscaled noise for flow matching,
SD 3.x); the noise comes from a generator seeded by (run seed, hash of the
normalized prompt), so a prompt's score does not depend on its batch, order, engine or worker.
Several noise draws or layers: a is averaged over them before the entropy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, asdict
import hashlib
import math
import threading

import numpy as np

from audit.errors import ModelError, ScorerError
from audit.models.base import Tokens, tokenize  # noqa: F401 (re-exported: the family's tokenization)
from audit.scorers.attention_entropy import attention_entropy
from audit.scorers.layers import per_layer_values
from audit.scorers.parametrization import alpha_bar, to_epsilon
from audit.scorers.registry import LAYER_COLUMNS, get_scorer, score_columns

TOP_TRIGGER_TOKENS = 5


@dataclass(frozen=True)
class ScoreConfig:
    """Everything that changes a score besides the model; recorded in every output.

    Attributes:
        scorer: a registered scorer's name (:data:`audit.scorers.registry.SCORERS`).
        layers: cross-attention module paths whose attention is averaged.
        noise_draws: K, number of seeded first-step latents per prompt (a is averaged over them).
        seed: run seed mixed with the prompt hash to seed each prompt's noise.
        num_inference_steps: steps given to ``set_timesteps``; the first of them is t0.
        dtype: model dtype name (attention probabilities are float32 regardless).
        noise_generator: what turns a prompt's seed into its noise (:data:`audit.scorers.noise.NOISE_GENERATORS`):
            ``mt19937``, torch's CPU generator on the host (the default), or ``philox``, Philox4x32-10 drawn on
            the scoring device (:func:`audit.scorers.noise.philox_normal`).

    A layer named twice is one layer (first-mention order kept): the capture records it once, and the mean over
    the configured layers counted it twice (``(X, X, Y)`` weighed X 2/3).

    Raises:
        ValueError: an unknown ``noise_generator``.
    """

    scorer: str
    layers: tuple[str, ...]
    noise_draws: int = 1
    seed: int = 0
    num_inference_steps: int = 50
    dtype: str = "float32"
    noise_generator: str = "mt19937"

    def __post_init__(self):
        from audit.scorers.noise import NOISE_GENERATORS

        if self.noise_generator not in NOISE_GENERATORS:
            raise ValueError(f"noise generator {self.noise_generator!r}: choose {' or '.join(NOISE_GENERATORS)}")
        if isinstance(self.layers, (list, tuple)):
            object.__setattr__(self, "layers", tuple(dict.fromkeys(self.layers)))

    def to_dict(self) -> dict:
        """The fields as JSON types. ``noise_generator`` is left out when it is ``mt19937``, the only generator
        before it became a choice: the score configurations (and so the cache keys, calibrations and resumable
        runs) recorded before then stay equal to today's."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        if d["noise_generator"] == "mt19937":
            del d["noise_generator"]
        return d

    @staticmethod
    def complete(recorded: dict) -> dict:
        """A recorded score configuration (:meth:`to_dict`, a manifest's or calibration's) with the fields that
        are left out at their defaults filled in, for comparing and showing two of them."""
        return {"noise_generator": "mt19937"} | dict(recorded)


def prompt_seed(run_seed: int, normalized_prompt: str) -> int:
    """Seed of a prompt's noise generator: 63 bits of BLAKE2b over (run seed, normalized prompt)."""
    h = hashlib.blake2b(f"{int(run_seed)}\x00{normalized_prompt}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


def scorer_scheduler(adapter, spec, scheduler_config: dict, num_inference_steps: int):
    """The scheduler a scorer samples its timesteps with, after ``set_timesteps(num_inference_steps)``: the
    family's (:meth:`audit.models.base.ModelAdapter.scheduler`), or for a spec whose ``scheduler`` is
    ``"ddim"`` DDIM built from the model's scheduler configuration whatever class it names, as Wen et al.'s and
    Asthana & Belagiannis's ``detect_mem.py`` replace every pipeline's scheduler (``DDIMScheduler.from_config``). No
    weights are needed: the Ray driver computes t0 with it too.

    Raises:
        audit.errors.ModelError: more steps than the scheduler's training timesteps (diffusers' own ValueError); a
            flow-matching or unknown scheduler class where DDIM is built (:func:`audit.models.base.ddim_from_config`);
            a ``num_train_timesteps`` that is not a whole number from 1 to 100,000
            (:func:`audit.models.base.check_scheduler_config`), or any other value diffusers cannot build the
            scheduler from (an unknown ``beta_schedule``, a ``beta_start`` in quotes), in one line.
    """
    from audit.models.base import check_steps_trained

    check_steps_trained(scheduler_config, num_inference_steps)
    try:
        if spec.scheduler == "ddim":
            from audit.models.base import ddim_from_config

            return ddim_from_config(scheduler_config, num_inference_steps)
        return adapter.scheduler(scheduler_config, num_inference_steps)
    except ModelError:
        raise
    except (TypeError, ValueError, NotImplementedError, RuntimeError, KeyError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelError(f"scheduler_config.json: diffusers cannot build the scheduler from it ({type(exc).__name__}"
                         f"{': ' + first if first else ''})") from exc



def checked_outputs(spec, own, b: int, device) -> dict:
    """What a scorer's ``compute(ctx)`` returned (``own``), checked against the seam's contract: a dict holding
    exactly ``spec``'s registered columns, each a float64 torch tensor of shape [``b``] (one value per prompt of
    the batch, padding rows included) on ``device`` (the scoring device). A NaN or infinite value is allowed
    here: that prompt alone is rejected (``nonfinite_attention``, naming the column in ``detail``).

    Raises:
        audit.errors.ScorerError: naming the scorer, the column and what was returned instead (a wrong shape
            was a torch ``stack`` error on every prompt, a float32, integer or boolean value was cast silently,
            a complex one lost its imaginary part, a missing column was a ``KeyError``).
    """
    import torch

    names = [c.name for c in spec.columns]
    where = f"scorer {spec.name}: compute(ctx) returned"
    if not isinstance(own, dict):
        raise ScorerError(f"{where} {type(own).__name__}, not a dict of its columns ({', '.join(names)})")
    missing = [n for n in names if n not in own]
    extra = [str(k) for k in own if k not in names]
    if missing or extra:
        got = ", ".join(map(str, own)) or "no key"
        what = f"no {', '.join(missing)}" if missing else f"{', '.join(extra)}, not registered as its columns"
        raise ScorerError(f"{where} {what} (its keys: {got}; registered columns: {', '.join(names) or 'none'})")
    need = f"it must be a float64 torch tensor of shape [{b}] (one value per prompt of the batch) on {device}"
    for n in names:
        v = own[n]
        if not isinstance(v, torch.Tensor):
            raise ScorerError(f"{where} {n} as {type(v).__name__}; {need}")
        if v.dtype != torch.float64 or tuple(v.shape) != (b,) or v.device != device:
            raise ScorerError(f"{where} {n} as a {str(v.dtype).removeprefix('torch.')} tensor of shape "
                              f"{list(v.shape)} on {v.device}; {need} (.double() converts the dtype)")
    return own


def check_deterministic(spec, first: dict, second: dict, rtol: float = 1e-4) -> None:
    """Compare two ``compute(ctx)`` results of one batch (:class:`Scorer` calls a contributed scorer's ``compute``
    twice on its first batch): a prompt's score must be a function of the prompt and the run's options, as the score
    cache, resuming, calibrations and the engines assume. A ``compute`` that draws from torch's global generator
    (``torch.rand``) gave other values on every call, and its run, cached and calibrated, looked like any other.
    NaN equals NaN; ``rtol`` (relative, with the same absolute tolerance on values near 0) leaves room for a device's
    non-deterministic kernels (atomic adds), whose differences are float rounding.

    Raises:
        audit.errors.ScorerError: naming the column and the largest difference.
    """
    import torch

    for c in spec.columns:
        x, y = first[c.name], second[c.name]
        if not torch.allclose(x, y, rtol=rtol, atol=rtol, equal_nan=True):
            both = torch.isfinite(x) & torch.isfinite(y)
            apart = ~torch.isclose(x, y, rtol=rtol, atol=rtol, equal_nan=True)
            if bool((apart & both).any()):
                what = f"largest difference {float((x - y)[both].abs().max()):.3g}"
            else:  # a value not finite in one call, another in the other: not "largest difference 0"
                i = int(apart.nonzero()[0])
                what = f"{float(x[i])} then {float(y[i])} for row {i} of the batch"
            raise ScorerError(f"scorer {spec.name}: compute(ctx) gave other {c.name} values when called twice on the "
                              f"same batch ({what}): a prompt's score must depend only on the "
                              "prompt and the run's options (draw random numbers from a generator seeded per prompt, "
                              "audit.scorers.prompt_seed, not from torch's global one)")


EPS_FORWARDS = ("full_conditional_unconditional", "several_timesteps")  # scorers that convert to the noise prediction


def check_noise_prediction(spec, prediction_type: str, scheduler) -> None:
    """For a scorer defined on the noise prediction eps (``spec.forward`` in :data:`EPS_FORWARDS`: Wen et al.;
    Asthana & Belagiannis), with the scheduler it samples its first timestep t0 from: refuse it where memaudit
    cannot convert the model's output to eps (:data:`audit.scorers.parametrization.PREDICTION_TYPES`), and
    ``noise_magnitude`` where eps is x_t for every prompt: v- or x0-prediction at alpha_bar_t0 = 0 (a
    zero-terminal-SNR first step; :func:`audit.scorers.parametrization.to_epsilon`), where Wen's d is 0 by
    construction and the ranking would carry nothing. ``guidance_geometry`` keeps its cosine term there (README).
    A scorer that samples (``attention_entropy_late``) is refused where its sampler cannot step the model's
    prediction type (:func:`check_sampler_prediction`).

    Raises:
        audit.errors.ModelError: naming the prediction type or the timestep.
    """
    from audit.scorers.parametrization import PREDICTION_TYPES

    if spec.forward == "full_sampling":
        check_sampler_prediction(spec, prediction_type, scheduler)
        return
    if spec.forward not in EPS_FORWARDS:
        return
    scorer, t0 = spec.name, scheduler.timesteps[0]
    if prediction_type not in PREDICTION_TYPES:
        raise ModelError(f"--scorer {scorer} is defined on the noise prediction, and the scheduler config's "
                         f"prediction_type {prediction_type!r} is not one memaudit converts to it "
                         f"({', '.join(PREDICTION_TYPES)})")
    if scorer == "noise_magnitude" and prediction_type != "epsilon" and alpha_bar(scheduler, t0) == 0.0:
        source = "v" if prediction_type == "v_prediction" else "x0"
        raise ModelError(f"--scorer noise_magnitude: at this model's first timestep ({int(t0)}) alpha_bar = 0 (a "
                         f"zero-terminal-SNR schedule), where the noise prediction from {source} is x_t for every "
                         "prompt, so Wen's magnitude is 0 for every prompt by construction; use attention_entropy")


def prediction_type_note(prediction_type: str, scorer: str) -> str | None:
    """A warning line when the scheduler config's ``prediction_type`` is none that memaudit or diffusers' samplers
    know (a typo such as ``v-prediction``), for a scorer that :func:`check_noise_prediction` let through because it
    reads only the cross-attention probabilities of the first step (``attention_entropy``, Ren et al. 2024, Sec. 3.2:
    no noise prediction, so the model's parametrization does not enter the score). The run scores; the note says the
    model folder itself is suspect (sampling it, as ``memaudit generate`` and the mitigation do, fails). None for
    :data:`audit.scorers.parametrization.PREDICTION_TYPES` and a flow-matching family's ``flow_velocity``."""
    from audit.scorers.parametrization import PREDICTION_TYPES

    if prediction_type in (*PREDICTION_TYPES, "flow_velocity"):
        return None
    return (f"the model's scheduler config names prediction_type {prediction_type!r}, none of "
            f"{', '.join(PREDICTION_TYPES)}: --scorer {scorer} reads cross-attention only and scores it, but check "
            "the spelling in scheduler/scheduler_config.json (a sampler refuses it: memaudit generate, mitigation)")


def check_sampler_prediction(spec, prediction_type: str, scheduler) -> None:
    """Refuse a sampling scorer (``spec.forward`` ``full_sampling``) whose ``scheduler`` cannot step the model's
    ``prediction_type`` (DDIM and Euler: epsilon, v_prediction or sample; PNDM and LMS: not sample; none of them
    an unknown type), before any prompt is scored: one ``step`` of a fresh copy of the scheduler on a 1-value zero
    sample, where diffusers checks the type (it raised on every prompt while scoring, each row a scoring error).
    Any other error of that step is left to the scoring itself.

    Raises:
        audit.errors.ModelError: naming the scorer, the scheduler class and the prediction type.
    """
    import inspect

    import torch

    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(len(scheduler.timesteps))
    zero, t = torch.zeros((1, 1, 1, 1)), sched.timesteps[0]
    takes_generator = "generator" in inspect.signature(sched.step).parameters  # a stochastic step: no global RNG
    kwargs = {"generator": torch.Generator().manual_seed(0)} if takes_generator else {}
    try:
        sched.step(zero, t, sched.scale_model_input(zero, t), **kwargs)
    except Exception as exc:  # noqa: BLE001 - only diffusers' prediction_type check is this function's business
        if "prediction_type" not in str(exc):
            return
        raise ModelError(f"--scorer {spec.name} samples with {type(scheduler).__name__}, which cannot step the "
                         f"scheduler config's prediction_type {prediction_type!r}; use attention_entropy") from None


def prompt_hash(normalized_prompt: str) -> str:
    """Hex BLAKE2b-128 of a normalized prompt: its identity for deduplication and caches."""
    return hashlib.blake2b(normalized_prompt.encode("utf-8"), digest_size=16).hexdigest()


@dataclass
class PreparedBatch:
    """A batch after its host-side work (:meth:`Scorer.prepare`): normalized ``prompts`` [B], their
    ``tokens``, and either ``noise``, the seeded first-step noise, float32 [B*K, C, H, W] on the host (noise
    generator ``mt19937``), or ``seeds``, the prompts' noise seeds, int64 [B] on the host, from which
    :meth:`Scorer.launch` draws the noise on the device (``philox``); the other is None."""

    prompts: list
    tokens: Tokens
    noise: object
    seeds: object = None


@dataclass
class ForwardContext:
    """What a scorer's ``compute`` sees of a batch's forward (all on the device, prompt-major).

    Attributes:
        scorer: the :class:`Scorer` (model, scheduler, :meth:`Scorer.encode` for further forwards).
        x: first-step UNet input [B*K, C, H, W], model dtype; ``t``: t0 on the device.
        c: the conditioning repeated per draw: text embeddings [B*K, L, D], or a
            :class:`audit.models.base.Conditioning` that carries them with a mask or added tensors (SDXL, PixArt,
            SD 3.x, a UNet mask declared in memaudit.json).
        a: attention over token positions float64 [B, L] (mean over layers, heads, pixels, draws).
        eps_cond: the conditional UNet output [B*K, C, H, W] in the model's prediction type (eps, v or x0;
            :meth:`Scorer.epsilon` converts it to eps); None after a partial forward.
        eps_uncond: the unconditional (empty prompt) one (every forward but ``partial_conditional``).
        b, k: prompts and noise draws per prompt.
        probs: after a full forward, ``{layer: float32 [B*K, L]}`` for EVERY cross-attention layer in call
            order (mean over heads and query pixels of the conditional forward); None after a partial one.
        tokens: the batch's :class:`Tokens` (``n_kept`` [B]: tokens kept, BOS and EOS included).
        prompts: the batch's normalized prompts [B], for scorers that draw further noise per prompt from its
            seed (a stochastic sampler's steps: :meth:`Scorer.seeds`).
    """

    scorer: object
    x: object
    t: object
    c: object
    a: object
    eps_cond: object
    eps_uncond: object
    b: int
    k: int
    probs: dict | None = None
    tokens: Tokens | None = None
    prompts: list[str] | None = None


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


def layers_problem(layers, known: list[str]) -> str | None:
    """Why ``layers`` cannot be scored on a denoiser whose cross-attention layers are ``known`` (one line naming
    them all), or None: a name that is not among them, or no name. The one message of the run (:class:`Scorer`)
    and of ``memaudit run --dry-run`` (which reads ``known`` from the model's config, no weights)."""
    unknown = [name for name in layers if name not in known]
    if unknown or not layers:
        return (f"not a cross-attention layer of this UNet: {', '.join(unknown) or '(none given)'}. "
                f"Cross-attention layers: {', '.join(known)}")
    return None


class Scorer:
    """Scores batches of normalized prompts with one loaded model.

    Args:
        model: a :class:`audit.models.LoadedModel` (its adapter drives encoding, conditioning and scheduler).
        config: the :class:`ScoreConfig`.
        compile: wrap the text encoder and UNet in ``torch.compile`` and keep the capture processors
            installed for the scorer's life (so compiled graphs are not invalidated batch after batch; call
            :meth:`close` to restore the originals). Scores agree with eager ones to float32 rounding.

    ``score(prompts)`` returns a dict of numpy arrays, one entry per prompt:
        ``risk`` float64 [B]; ``attn_entropy`` float64 [B]; ``bos_mass`` float64 [B];
        ``token_mass`` float32 [B, L] (a, for trigger tokens); each registered scorer's own columns
        float64 [B] (``noise_magnitude``, ``guidance_*``, ...; NaN unless that scorer runs); after a full
        forward ``attn_entropy_lNN`` and ``bos_mass_lNN`` float64 [B] for each cross-attention layer NN
        (:mod:`audit.scorers.layers`; NaN otherwise); ``nonfinite`` bool [B];
        ``n_tokens`` int32 [B]; ``n_kept`` int32 [B] (tokens kept after truncation, BOS and EOS included);
        ``truncated`` bool [B].

    Raises:
        audit.errors.RunError: unknown scorer name (the message lists the scorers, with a "did you mean").
        audit.errors.ModelError: the model's family refuses this scorer (SD 3.x: the noise scorers and
            ``attention_entropy_late``); more steps than the scheduler's training timesteps, or a scheduler
            diffusers cannot build (:func:`scorer_scheduler`); a prediction type that cannot be converted to
            eps, or that ``attention_entropy_late``'s sampler cannot step, or ``noise_magnitude`` at a
            zero-terminal-SNR first step (:func:`check_noise_prediction`);
            ``guidance_geometry`` without published weights for the family.
        KeyError: a selected layer is not a cross-attention layer of the denoiser (the family's list).
        audit.errors.IncompleteCaptureError: a selected layer was not captured.
        audit.errors.RunError: fewer ``num_inference_steps`` than the scorer is defined for
            (:func:`audit.scorers.registry.steps_problem`).
        audit.errors.ScorerError: the scorer's ``check`` raised anything but a ModelError (naming the scorer).
    """

    def __init__(self, model, config: ScoreConfig, compile: bool = False):
        import torch

        from audit.models import adapter_of

        self.spec = get_scorer(config.scorer)
        from audit.scorers.registry import steps_problem

        if problem := steps_problem(self.spec, config.num_inference_steps):  # before the model is touched
            from audit.errors import RunError

            raise RunError(problem)
        self.adapter = adapter_of(model)
        self.adapter.check_scorer(self.spec.forward)  # e.g. noise scorers on flow-matching models: refused
        if self.spec.check is not None:  # e.g. guidance_geometry without published weights for the family
            try:
                self.spec.check(model, self.adapter.name)
            except ModelError:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken check: one line naming the scorer, not a bare exception
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                raise ScorerError(f"scorer {self.spec.name}: its check(model, family) raised {type(exc).__name__}"
                                  f"{': ' + first if first else ''} (a check refuses a model by raising "
                                  "audit.errors.ModelError)") from exc
        known = self.adapter.cross_attention_layers(model.unet)
        if problem := layers_problem(config.layers, known):
            raise KeyError(problem)
        self.model = model
        self.config = config
        self.torch = torch
        scheduler = scorer_scheduler(self.adapter, self.spec, model.scheduler_config, config.num_inference_steps)
        self.scheduler = scheduler
        self.t0 = scheduler.timesteps[0]
        self.prediction_type = self.adapter.prediction_type(model)
        check_noise_prediction(self.spec, self.prediction_type, scheduler)  # before any prompt is scored
        self.all_layers = tuple(known)
        # a full forward captures every cross-attention layer (per-layer columns at no extra UNet forward)
        self._capture_layers = list(config.layers) if self.spec.forward == "partial_conditional" else \
            list(dict.fromkeys([*config.layers, *known]))
        self._t0_device = self.t0.to(model.device)  # copied once, not once per batch
        unet_cfg = model.unet.config
        self.latent_shape = (unet_cfg.in_channels, unet_cfg.sample_size, unet_cfg.sample_size)
        self._empty_embedding = None
        self._token_cache: dict[tuple[int, ...], str] = {}
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to call from two threads
        self._text_encoder, self._unet, self._capture = model.text_encoder, model.unet, None
        self.compiled = compile
        from audit.scorers.registry import is_shipped

        self._determinism_checked = is_shipped(self.spec)  # a contributed scorer: checked on its first batch
        if compile:
            from audit.capture import CrossAttentionCapture

            self._capture = CrossAttentionCapture(model.unet, self._capture_layers,
                                                  early_exit=self.spec.forward == "partial_conditional").__enter__()
            self._text_encoder = torch.compile(model.text_encoder, dynamic=False)
            self._unet = torch.compile(model.unet, dynamic=False)

    @property
    def first_timestep(self) -> int:
        """t0, the first timestep after ``set_timesteps(num_inference_steps)``."""
        return int(self.t0)

    @property
    def draws_on_device(self) -> bool:
        """Whether the noise is drawn on the scoring device (generator ``philox``) rather than on the host."""
        return self.config.noise_generator == "philox"

    def seeds(self, prompts: list[str]):
        """The prompts' noise seeds (:func:`prompt_seed` under the run seed), int64 [B] on the host (pinned on
        CUDA so the copy to the device is asynchronous)."""
        torch = self.torch
        seeds = torch.tensor([prompt_seed(self.config.seed, p) for p in prompts], dtype=torch.int64)
        return seeds.pin_memory() if self.model.device.type == "cuda" else seeds

    def noise(self, prompts: list[str]):
        """Seeded first-step noise, float32 [B*K, C, H, W] (prompt-major): for generator ``mt19937`` on the
        host (pinned on CUDA so the copy to the device is asynchronous), one torch CPU generator seeded by
        :func:`prompt_seed` per prompt; for ``philox`` on the model's device (:meth:`device_noise`)."""
        torch = self.torch
        if self.draws_on_device:
            return self.device_noise(self.seeds(prompts))
        k = self.config.noise_draws
        noise = torch.empty((len(prompts), k, *self.latent_shape), dtype=torch.float32,
                            pin_memory=self.model.device.type == "cuda")
        g = torch.Generator()  # one per call (calls run in several preparing threads), reseeded per prompt
        for i, p in enumerate(prompts):
            g.manual_seed(prompt_seed(self.config.seed, p))
            torch.randn((k, *self.latent_shape), generator=g, out=noise[i])  # in place: no copy
        return noise.flatten(0, 1)

    def device_noise(self, seeds):
        """The ``philox`` noise of prompt seeds int64 [B] (host or device), drawn on the model's device for the
        whole batch at once (:func:`audit.scorers.noise.philox_normal`): float32 [B*K, C, H, W], prompt-major,
        draw k of a prompt being values [k*C*H*W, (k+1)*C*H*W) of its stream. No host synchronization."""
        from audit.scorers.noise import philox_normal

        k = self.config.noise_draws
        seeds = seeds.to(self.model.device, non_blocking=True)
        return philox_normal(seeds, k * math.prod(self.latent_shape)).view(len(seeds) * k, *self.latent_shape)

    def latents(self, prompts: list[str], noise=None, seeds=None):
        """Seeded first-step UNet input, shape [B*K, C, H, W] (prompt-major), model dtype, on the device: the
        family's ``first_input`` (``scale_model_input(noise * init_noise_sigma, t0)`` as diffusers' pipelines
        prepare it; the unscaled noise for flow matching). ``noise`` (host or device) or ``seeds`` (``philox``:
        drawn on the device) as :meth:`prepare` made them; neither: drawn for ``prompts``."""
        if noise is None:
            noise = self.noise(prompts) if seeds is None else self.device_noise(seeds)
        x = self.adapter.first_input(self.scheduler, noise.to(self.model.device, non_blocking=True), self.t0)
        return x.to(self.model.dtype)

    def encode(self, tokens):
        """The text conditioning of ``tokens`` (:class:`Tokens`, or bare int64 ids [B, L]) by the model's
        family (:meth:`audit.models.base.ModelAdapter.encode`): embeddings [B, L, D] (SD 1.x: the last
        hidden state) or a :class:`audit.models.base.Conditioning` carrying them with a mask or added
        conditioning (SDXL, PixArt, a model that declares a UNet attention mask)."""
        return self.adapter.encode(self.model, tokens, self._text_encoder)

    def prepare(self, prompts: list[str], tokens: Tokens | None = None, pad_to: int | None = None) -> PreparedBatch:
        """The host-side work of a batch: tokenize and draw the seeded noise (``mt19937``) or only compute the
        prompts' seeds (``philox``: the noise is drawn on the device by :meth:`launch`). Thread-safe, so the
        pipeline prepares the next batch while the device scores this one (:func:`audit.unit.score_prompts`).

        ``pad_to``: a batch of fewer prompts is padded to that many rows with copies of its shortest prompt,
        tokenized once (:meth:`audit.models.base.Tokens.take`): the kernels then see one shape. The pad rows'
        results are the copied prompt's; the caller drops them."""
        if tokens is None:
            with self._tokenizer_lock:
                tokens = self.adapter.tokenize(self.model, prompts)
        if pad_to is not None and 0 < len(prompts) < pad_to:
            pad = min(range(len(prompts)), key=lambda i: len(prompts[i]))
            rows = list(range(len(prompts))) + [pad] * (pad_to - len(prompts))
            prompts, tokens = [prompts[i] for i in rows], tokens.take(rows)
        if self.draws_on_device:
            return PreparedBatch(list(prompts), tokens, None, self.seeds(prompts))
        return PreparedBatch(list(prompts), tokens, self.noise(prompts))

    def launch(self, batch: PreparedBatch):
        """Queue the device work of a prepared batch and return its results still on the device, packed as
        float64 [B, 4 + m + P + L]: risk, entropy, BOS mass, the scorer's m own columns, the P per-layer columns
        (after a full forward P = 2 x MAX_LAYER_COLUMNS: ``attn_entropy_l00..`` then ``bos_mass_l00..``; after a
        partial forward P = 0), the non-finite flag, then a (the attention probabilities over the L token
        positions). No host synchronization."""
        from audit.capture import CrossAttentionCapture

        torch = self.torch
        spec = self.spec
        b, k = len(batch.prompts), self.config.noise_draws
        partial = spec.forward == "partial_conditional"
        with torch.inference_mode():
            c = self.encode(batch.tokens)  # [B, L, D] (or a Conditioning)
            c_rep = c.repeat_interleave(k, dim=0)  # [B*K, L, D], prompt-major like the latents
            x = self.latents(batch.prompts, batch.noise, batch.seeds)
            t = self._t0_device
            context = contextlib.nullcontext(self._capture) if self._capture is not None else \
                CrossAttentionCapture(self.model.unet, self._capture_layers, early_exit=partial)
            with context as cap:
                probs = cap.run(lambda: self.adapter.forward(self._unet, x, t, c_rep))
                eps_cond = cap.output
                nonfinite = torch.stack([cap.nonfinite[n] for n in self.config.layers]).any(dim=0).view(b, k).any(dim=1)
            a = torch.stack([probs[n] for n in self.config.layers]).mean(dim=0)  # [B*K, L], mean over layers
            a = a.view(b, k, -1).mean(dim=1).double()  # [B, L], mean over noise draws
            entropy = attention_entropy(a)
            nonfinite = nonfinite | ~torch.isfinite(entropy)
            eps_uncond = None
            if not partial:
                eps_uncond = self.adapter.forward(self._unet, x, t, self._empty(b * k))
            ctx = ForwardContext(self, x, t, c_rep, a, eps_cond, eps_uncond, b, k,
                                 None if partial else {n: probs[n] for n in self.all_layers}, batch.tokens,
                                 batch.prompts)
            own = checked_outputs(spec, spec.compute(ctx), b, a.device) if spec.compute else {}
            if own and not self._determinism_checked:  # once, for a scorer memaudit does not ship
                self._determinism_checked = True
                check_deterministic(spec, own, checked_outputs(spec, spec.compute(ctx), b, a.device))
            # a_0 is the BOS mass for CLIP families; T5 families have no BOS: NaN (not applicable)
            bos = a[:, 0] if self.adapter.has_bos else torch.full_like(a[:, 0], float("nan"))
            values = {"attn_entropy": entropy, "bos_mass": bos}
            if not partial:
                values |= per_layer_values(ctx.probs, b, k)
            for col in spec.columns:
                values[col.name] = own[col.name]
                nonfinite = nonfinite | ~torch.isfinite(own[col.name])
            risk = values[spec.risk_column] if spec.higher_is_riskier else -values[spec.risk_column]
            names = ["attn_entropy", "bos_mass", *(c.name for c in spec.columns)]
            names += [c.name for c in LAYER_COLUMNS] if not partial else []
            head = torch.stack([risk, *(values[n] for n in names), nonfinite.double()], dim=1)  # [B, 4 + m + P]
            return torch.cat([head, a], dim=1)

    def model_output(self, x, t, embeddings):
        """The raw UNet output (the model's prediction type) for input ``x`` [N, C, H, W] (model dtype) at
        timestep ``t`` (0-d tensor on the device) and conditioning ``embeddings`` [N, L, D]; one full forward."""
        return self.adapter.forward(self._unet, x, t, embeddings)

    def epsilon(self, output, x, t):
        """The noise prediction float32 [N, C, H, W] of a UNet ``output`` at input ``x`` and timestep ``t``
        (:func:`audit.scorers.parametrization.to_epsilon` with this model's prediction type). ``t`` is a
        HOST timestep (int or CPU tensor, e.g. ``self.t0``): alpha_bar_t is read without a device sync.

        Raises:
            ValueError: a prediction type memaudit cannot convert.
        """
        return to_epsilon(output, x, alpha_bar(self.scheduler, t), self.prediction_type)

    def empty_embeddings(self, n: int):
        """The empty prompt's embeddings (the unconditional branch of classifier-free guidance), [n, L, D]."""
        return self._empty(n)

    def collect(self, batch: PreparedBatch, packed) -> dict[str, np.ndarray]:
        """Bring a launched batch's results to the host in one transfer; see the class docstring."""
        host = packed.cpu().numpy()  # the one device-to-host transfer (and synchronization) per batch
        names = ["risk", "attn_entropy", "bos_mass", *(c.name for c in self.spec.columns)]
        if self.spec.forward != "partial_conditional":
            names += [c.name for c in LAYER_COLUMNS]
        tokens = batch.tokens
        out = {name: np.full(len(host), np.nan) for name in (c.name for c, _ in score_columns())}
        out.update({name: host[:, i] for i, name in enumerate(names)})
        m = len(names)
        return out | {
            "token_mass": host[:, m + 1:].astype(np.float32),  # exact: a was float32 before packing
            "nonfinite": host[:, m] != 0,
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

    @property
    def chosen_batch_size(self) -> int | None:
        """The batch size :meth:`auto_batch_size` chose, None before it ran (an out-of-memory halving is in
        ``max_batch``)."""
        return getattr(self, "_auto_batch", None)

    def auto_batch_size(self, probes: tuple[int, int] = (4, 16), cpu_default: int = 32, cap: int = 2048) -> int:
        """The batch size for ``--batch-size auto``: on CPU ``cpu_default``; on a GPU the largest power of
        two that fits 70% of the available memory, from the peak memory of two probe batches (see
        :func:`batch_size_from_probes`). Cached; an out-of-memory error later still halves it (``max_batch``).
        A compiled scorer (``compile=True``) probes with the eager text encoder and UNet, so that the probes'
        batch shapes are not compiled."""
        if getattr(self, "_auto_batch", None):
            return self._auto_batch
        torch = self.torch
        if self.model.device.type != "cuda":
            self._auto_batch = cpu_default
            return cpu_default
        peaks = []
        # a compiled scorer probes with the eager modules: each probe's batch shape would otherwise be compiled
        # (tens of seconds each at SD scale) for two batches that are never scored again; eager forwards hold at
        # least the compiled graphs' memory, so the estimate errs on the safe side
        compiled = self._text_encoder, self._unet
        self._text_encoder, self._unet = self.model.text_encoder, self.model.unet
        try:
            for n in probes:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                self.score([f"probe prompt {i}" for i in range(n)])
                torch.cuda.synchronize()
                peaks.append((n, torch.cuda.max_memory_allocated() - before))
        finally:
            self._text_encoder, self._unet = compiled
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

    def _token_run(self, ids, p: int, stop: int) -> tuple[str, int]:
        """Readable text of the token at position ``p`` and where its run starts. A byte-level BPE token can
        hold part of a UTF-8 character (accents, CJK, Arabic, emoji): then the text is that of the shortest
        run of neighbouring tokens in ``[1, stop)`` that decodes to whole characters (``é`` for either half of
        ``Ã©``), and the run's first position identifies it. ``ids`` may be the prompt's untruncated tokens
        (``stop`` their EOS), so that a character cut by the text encoder's limit is still read whole."""
        text = self._decode((int(ids[p]),))
        if "\ufffd" not in text:
            return text, p
        for width in range(2, 9):
            for a in range(max(1, p - width + 1), min(p, stop - width) + 1):
                wide = self._decode(tuple(int(i) for i in ids[a:a + width]))
                if wide and "\ufffd" not in wide:
                    return wide, a
        return text, p

    def _empty(self, n: int):
        if self._empty_embedding is None:
            with self._tokenizer_lock:
                tok = self.adapter.tokenize(self.model, [""])
            self._empty_embedding = self.adapter.unconditional(self.model, tok, self._text_encoder)
        return self._empty_embedding.expand(n, -1, -1)

    def trigger_tokens(self, tokens: Tokens, token_mass: np.ndarray) -> list[list[dict]]:
        """Top prompt tokens by attention mass (BOS, EOS and padding excluded), at most 5 per prompt (from
        position 0 for families without a BOS token: T5).

        The tokens that together spell one character (byte-level pieces of é, 東, 🎨, or the pieces a
        normalizer made of it, with one character span: CLIP's "İ" as "i" and a combining dot) count as one
        entry: its text is theirs joined, its mass the sum of theirs, its position that of its first token.

        Args:
            tokens: the batch's :class:`audit.models.base.Tokens` (its first B rows are used: a batch padded to
                the batch size has more); token_mass: float32 [B, L] (attention mass per position).

        Returns for each prompt a list of ``{"token": str, "position": int, "mass": float, "start": int | None,
        "end": int | None}``, by mass desc; ``[start, end)`` is the entry's character span in the prompt (the
        union of its tokens' spans, read from the fast tokenizer's offset mapping for these positions only:
        :meth:`audit.models.base.Tokens.spans`), None without it (a slow tokenizer).
        """
        b, length = token_mass.shape
        input_ids, n_kept = tokens.input_ids[:b], tokens.n_kept[:b]
        first = 1 if self.adapter.has_bos else 0
        stop = np.asarray(n_kept, dtype=np.int64) - 1
        pos = np.arange(length)
        valid = (pos[None] >= first) & (pos[None] < stop[:, None])  # [B, L] prompt tokens
        # the top positions of every prompt at once: mass desc, ties by position (a stable sort)
        order = np.argsort(np.where(valid, -token_mass.astype(np.float64), np.inf), axis=1,
                           kind="stable")[:, :TOP_TRIGGER_TOKENS]
        n_top = np.minimum(valid.sum(axis=1), TOP_TRIGGER_TOKENS).tolist()
        finite = np.isfinite(np.where(valid, token_mass, 0.0)).all(axis=1).tolist()
        top_pos = order.tolist()
        top_ids = np.take_along_axis(input_ids, order, axis=1).tolist()
        top_mass = np.take_along_axis(token_mass, order, axis=1).astype(np.float64).tolist()
        spans = tokens.spans(order)
        top_off = spans.tolist() if spans is not None else None
        offsets = None
        out = []
        for i in range(b):
            k = n_top[i]
            texts = [self._decode((top_ids[i][j],)) for j in range(k)]
            if not finite[i] or any("\ufffd" in t for t in texts):  # pieces of a character: merge runs
                if offsets is None and tokens.has_spans:
                    offsets = tokens.offset_mapping()
                out.append(self._trigger_runs(input_ids[i], token_mass[i], int(stop[i]), first,
                                              offsets[i] if offsets is not None else None,
                                              tokens.encodings[i].ids if tokens.encodings is not None else None))
                continue
            off = top_off[i] if top_off is not None else None
            spans_i = [tuple(o) for o in off[:k] if o[1] > o[0]] if off else []
            if len(set(spans_i)) < len(spans_i):  # tokens of one character (CLIP's "İ" is "i" and a combining dot)
                if offsets is None:
                    offsets = tokens.offset_mapping()
                out.append(self._trigger_runs(input_ids[i], token_mass[i], int(stop[i]), first, offsets[i]))
                continue
            out.append([{"token": texts[j], "position": top_pos[i][j], "mass": top_mass[i][j],
                         "start": off[j][0] if off else None, "end": off[j][1] if off else None}
                        for j in range(k)])
        return out

    def _trigger_runs(self, ids: np.ndarray, mass: np.ndarray, stop: int, first: int,
                      off: np.ndarray | None, full_ids: list[int] | None = None) -> list[dict]:
        """One prompt's trigger entries when a top token is a piece of a character (or a mass is not finite):
        the tokens that spell one character form one entry (see :meth:`trigger_tokens`). ``full_ids``: the
        prompt's untruncated token ids (a fast tokenizer's), so that the last character of a prompt cut at the
        text encoder's limit inside its bytes (the first 3 of an emoji's 4 byte tokens kept) reads as that
        character, not as replacement characters (``���``); its mass is that of the kept pieces only."""
        positions = np.arange(first, max(stop, first))
        if len(positions) == 0:
            return []
        order = positions[np.argsort(-mass[positions], kind="stable")]
        cut = full_ids is not None and len(full_ids) - 1 > stop  # truncated: the text may continue past stop
        runs: dict[int, dict] = {}  # run start -> entry; mass summed over the run's tokens
        for p in order:
            text, start = self._token_run(full_ids, int(p), len(full_ids) - 1) if cut else \
                self._token_run(ids, int(p), stop)
            entry = runs.setdefault(start, {"token": text, "position": int(start), "mass": 0.0,
                                            "start": None, "end": None})
            entry["mass"] += float(mass[p])
            if off is not None:
                s0, e0 = int(off[p, 0]), int(off[p, 1])
                entry["start"] = s0 if entry["start"] is None else min(entry["start"], s0)
                entry["end"] = e0 if entry["end"] is None else max(entry["end"], e0)
        # runs with one character span are one character too (a normalizer's decomposition: "İ" as "i" + U+0307)
        by_span: dict[tuple[int, int], dict] = {}
        entries = []
        for entry in sorted(runs.values(), key=lambda e: e["position"]):
            key = (entry["start"], entry["end"])
            same = by_span.get(key) if entry["start"] is not None and entry["end"] > entry["start"] else None
            if same is None:
                by_span[key] = entry
                entries.append(entry)
            else:
                same["token"] += entry["token"]
                same["mass"] += entry["mass"]
        return sorted(entries, key=lambda e: (-e["mass"], e["position"]))[:TOP_TRIGGER_TOKENS]
