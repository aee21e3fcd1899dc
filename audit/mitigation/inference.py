"""Inference-time mitigation through cross-attention (Ren et al., ECCV 2024, arXiv 2403.11052).

The rule, in every cross-attention (``attn2``) layer at every denoising step, as the reference code
applies it (renjie3/MemAttn, ``refactored_classes/refactored_attention_processor.py``:
``my_simple_scaled_dot_product_attention`` and the mask built in ``AttnProcessor2_0.__call__``; options
from ``text2img.py`` and ``local_cmd_inference_time_mitigation.sh``)::

    S = Q K^T * scale                         [batch, heads, query_pixels, L]   (pre-softmax logits)
    S[cond rows, :, :, 0] *= c1               BOS logit scaled, conditional rows of the CFG batch only
    S[all rows, :, :, j] = -inf  for j >= n   summary tokens masked out of the softmax, both halves
    P = softmax(S);  out = P V

* c1: 1.25 in the authors' mitigation script (``--c1 1.25``); must be > 0.
* n: the CONDITIONAL prompt's token count with BOS and the first EOS (the reference computes it by
  tokenizing the prompt without padding, truncated to 77; we read it from the tokenizer's attention mask
  of the padded tokens, which is the same count and never compares ids with the pad id). The same n is
  applied to the unconditional row of the same image, as the reference does (it repeats one mask over
  the batch of 2, its unconditional prompt being empty). Kept positions: 0 .. n-1 (BOS, the prompt tokens,
  the first EOS). With a ``negative_prompt`` (not in the reference), the unconditional row keeps
  max(n, n_negative) positions, so no token of the negative prompt is masked out (given only as
  ``negative_prompt_embeds``, its length unknown: every position). Prompts are counted after
  the pipeline's own textual-inversion conversion (``maybe_convert_prompt``), as its text encoder sees them.
* ``mask_eos=True`` (the reference's ``--mask_length_minis1``): n-1 instead, so the first EOS is masked too.
* ``mask_summary=False`` (the reference without ``--cross_attn_mask``): BOS scaling only.

Our differences from the reference, all about shapes and not about the rule: the reference hard-codes
8 heads, 77 tokens, a guidance batch of 2 (it scales rows ``1::2``) and CUDA; here the conditional rows
are the second half of a guidance batch of 2 x n_cond rows (diffusers' ``torch.cat([negative, positive])``)
or all rows without guidance, and shapes come from the tensors. Logits and softmax are float32 whatever
the model dtype. When the rule is the identity (c1 = 1 and no masking) or switched off for every row,
the layer's ORIGINAL processor runs, so the output is exactly the unmitigated one.

Supported: diffusers ``StableDiffusionPipeline``-style pipelines with a ``UNet2DConditionModel`` whose
``attn2`` layers attend to one CLIP text encoder's token states (SD 1.x, 2.x), with diffusers' own attention
processors on those layers (:data:`STOCK_PROCESSORS`: plain, SDPA, sliced, fused, xformers, NPU, XLA). Other
families, and ``attn2`` layers carrying another processor (attention control, IP-Adapter, custom code, whose
work the rule would silently replace), are refused with :class:`MitigationError` before anything is installed.

The processors are the pipeline's while a context is open: a call of the same pipeline from another thread is
mitigated too, each thread's call with its own prompts' rows (the per-call state, :class:`_PerThread`, is kept
per thread: two threads generating at once through one block each get their own prompts' token counts and, with
detection, their own flags). One :class:`Mitigation` object is entered once at a time (nesting it in itself is refused);
processors replaced inside the block (``set_attn_processor``, ``enable_attention_slicing``) fail the block on
exit, since the calls after the replacement were not mitigated, and are left in place.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
import math
import operator
import threading

import torch


from audit.capture import attention_logits, attention_output
from audit.errors import MitigationError  # noqa: E402  (re-exported)

# diffusers processors that compute plain attention softmax(Q K^T * scale) V (these class names, defined in
# STOCK_MODULE): the rule replaces their computation with the same one plus the rule; any other processor on an
# attn2 layer is refused
STOCK_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "FusedAttnProcessor2_0",
                    "XFormersAttnProcessor", "AttnProcessorNPU", "XLAFlashAttnProcessor2_0")
STOCK_MODULE = "diffusers.models.attention_processor"


def _is_stock(cls: type) -> bool:
    """Whether a processor class is one of diffusers' own plain-attention processors (name and defining module:
    a class of another package that only shares the name is not)."""
    return cls.__name__ in STOCK_PROCESSORS and cls.__module__ == STOCK_MODULE
class _PerThread:
    """An attribute of a :class:`Mitigation` kept per thread: the state of one pipeline call (its conditional rows,
    token counts, the detection's recordings and flags). The processors and the wrapped ``encode_prompt`` are
    shared by every thread that calls the pipeline while a block is open, and a call runs its UNet forwards in
    its own thread, so per-thread state is per-call state: a second thread's call can no longer overwrite the rows
    of one still denoising (found by a test: thread A's images were mitigated with thread B's token counts).

    ``default``: a value, or a zero-argument callable for a fresh mutable default per thread (``dict``)."""

    def __init__(self, default=None):
        self.default = default

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        local = obj.__dict__["_local"]
        try:
            return getattr(local, self.name)
        except AttributeError:
            value = self.default() if callable(self.default) else self.default
            setattr(local, self.name, value)
            return value

    def __set__(self, obj, value):
        setattr(obj.__dict__["_local"], self.name, value)


C1_MAX = 100.0  # larger factors overflow half-precision logits (and are far beyond the paper's 1.1-1.5)


def is_number(value) -> bool:
    """True for a real number (Python, numpy or a one-element tensor); False for bool, str, bytes, None."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        return False
    try:
        float(value)
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


def check_flag_options(threshold, layers) -> None:
    """The options that detection (:class:`audit.mitigation.detect.DetectAndMitigate`) and the training filter
    (:class:`audit.mitigation.training.MemorizationFilter`) share.

    Raises:
        MitigationError (a ValueError): ``threshold`` not None and not a number, or NaN (which flags nothing;
            inf means never flag); ``layers`` given as one string instead of a list of attn2 module paths, or
            holding something other than strings.
    """
    if threshold is not None and (not is_number(threshold) or math.isnan(float(threshold))):
        raise MitigationError(f"threshold must be a number (inf: never flag), got {threshold!r}")
    if isinstance(layers, (str, bytes)):
        raise MitigationError(f"layers must be a list of attn2 module paths, got the string {layers!r}")
    if layers is not None and (not hasattr(layers, "__iter__") or not all(isinstance(n, str) for n in layers)):
        raise MitigationError(f"layers must be a list of attn2 module paths (strings), got {layers!r:.120}")


def timesteps_other_than(timesteps, expected: int) -> list[float] | None:
    """The timesteps of a UNet call or a training batch (a tensor of any shape, or a number) as a flat list of floats
    when any of them is not ``expected``, else None: a threshold calibrated at one timestep (a calibration's
    ``first_timestep``) holds there only, which detection (:class:`audit.mitigation.detect.DetectAndMitigate`) and
    the training filter (:class:`audit.mitigation.training.MemorizationFilter`) both check."""
    values = torch.as_tensor(timesteps).detach().reshape(-1).double().cpu()
    if not values.numel() or bool((values == float(expected)).all()):
        return None
    return values.tolist()


@dataclass(frozen=True)
class MitigationRule:
    """The options of the inference-time rule (see the module docstring for the formula).

    Attributes:
        c1: factor on the BOS pre-softmax logit in the conditional rows; a real number in (0, 100] (1 = off).
        mask_summary: mask the summary tokens (after the first EOS) in both halves of the CFG batch.
        mask_eos: also mask the first EOS (reference: ``--mask_length_minis1``); needs ``mask_summary``.

    Raises:
        MitigationError: c1 not a real number in (0, C1_MAX]; ``mask_summary`` or ``mask_eos`` not a bool;
            ``mask_eos`` without ``mask_summary``.
    """

    c1: float = 1.25
    mask_summary: bool = True
    mask_eos: bool = False

    def __post_init__(self):
        if not is_number(self.c1):
            raise MitigationError(f"c1 must be a number > 0, got {self.c1!r}")
        c1 = float(self.c1)
        if not math.isfinite(c1) or c1 <= 0 or c1 > C1_MAX:
            raise MitigationError(f"c1 must be finite, > 0 and at most {C1_MAX:g} (1.25 in the paper's script), "
                                  f"got {self.c1!r}")
        for name in ("mask_summary", "mask_eos"):
            if not isinstance(getattr(self, name), bool):  # "no" would be truthy: mask silently
                raise MitigationError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.mask_eos and not self.mask_summary:
            raise MitigationError("mask_eos masks the EOS in addition to the summary tokens: it needs mask_summary=True")

    @property
    def identity(self) -> bool:
        """True when the rule changes nothing (c1 = 1 and no masking)."""
        return float(self.c1) == 1.0 and not self.mask_summary


def prompt_lengths(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token count n of each prompt with BOS and the first EOS, truncated to the padded length L.

    Read from the attention mask of ``tokenizer(prompts, padding="max_length", truncation=True)`` (the
    tokenization the SD pipelines use), never by comparing ids with the pad id (SD 1.x pads with EOS).

    Returns:
        int64 tensor [len(prompts)] on the CPU.
    """
    enc = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt", return_attention_mask=True)
    return enc["attention_mask"].sum(dim=1).to(torch.int64)


def keep_positions(lengths: torch.Tensor, num_positions: int, mask_eos: bool = False) -> torch.Tensor:
    """Key positions that stay in the softmax: j < n (j < n - 1 with ``mask_eos``).

    Args:
        lengths: int [B], n per row (BOS + prompt tokens + first EOS).
        num_positions: L, the key length (77 for CLIP).

    Returns:
        bool [B, L]. BOS (j = 0) is always kept, so no row is all -inf.
    """
    limit = lengths.to(torch.int64) - int(mask_eos)
    limit = limit.clamp(min=1)
    return torch.arange(num_positions, device=lengths.device)[None, :] < limit[:, None]


def mitigated_logits(logits: torch.Tensor, cond: torch.Tensor, keep: torch.Tensor | None, c1: float) -> torch.Tensor:
    """Apply the rule to pre-softmax logits (Ren et al.'s inference-time mitigation; reference
    renjie3/MemAttn ``refactored_attention_processor.py``).

    Args:
        logits: float [B, H, N, L], Q K^T * scale (plus any attention mask), float32.
        cond: bool [B], rows whose BOS logit is multiplied by ``c1``.
        keep: bool [B, L] or None; False positions are set to -inf (excluded from the softmax).
        c1: the BOS factor.

    Returns:
        A new float tensor [B, H, N, L]; ``logits`` is not modified.
    """
    out = logits.clone()
    if float(c1) != 1.0:
        factor = torch.where(cond, torch.tensor(float(c1), dtype=out.dtype, device=out.device),
                             torch.tensor(1.0, dtype=out.dtype, device=out.device))
        out[..., 0] = out[..., 0] * factor[:, None, None]
    if keep is not None:
        out = out.masked_fill(~keep[:, None, None, :], float("-inf"))
    return out


def check_pipeline(pipe) -> list[str]:
    """Refuse model families the rule is not defined for; return the ``attn2`` layer names in call order.

    Raises:
        MitigationError: no UNet (transformer denoisers: DiT, MMDiT), a UNet other than
            ``UNet2DConditionModel``, SDXL-style extra text encoders or added conditioning, a UNet whose
            cross-attention does not attend to the text encoder's token states, a three-way guidance batch
            (InstructPix2Pix's ``image_guidance_scale``), no tokenizer.
    """
    from audit.capture import cross_attention_layers

    kind = type(pipe).__name__
    unet = getattr(pipe, "unet", None)
    if unet is None:
        what = "a transformer denoiser (joint or DiT attention)" if getattr(pipe, "transformer", None) is not None \
            else "no UNet (pass the pipeline, not its UNet)" if hasattr(pipe, "attn_processors") else "no UNet"
        raise MitigationError(f"{kind} has {what}: the cross-attention mitigation is defined for Stable Diffusion "
                              "1.x/2.x UNets (UNet2DConditionModel with attn2 layers over CLIP token states)")
    if type(unet).__name__ != "UNet2DConditionModel":
        hint = (" (for torch.compile, compile in place with pipe.unet.compile(): the module stays a "
                "UNet2DConditionModel)" if type(unet).__name__ == "OptimizedModule" else "")
        raise MitigationError(f"{kind}: unet is a {type(unet).__name__}; supported: UNet2DConditionModel "
                              f"(SD 1.x/2.x){hint}")
    cfg = unet.config
    if getattr(pipe, "text_encoder_2", None) is not None or getattr(cfg, "addition_embed_type", None) is not None:
        raise MitigationError(f"{kind}: a second text encoder or added conditioning (SDXL family); the rule is "
                              "published and implemented for SD 1.x/2.x (one CLIP text encoder) only")
    if getattr(cfg, "encoder_hid_dim_type", None) is not None:
        raise MitigationError(f"{kind}: the UNet projects its encoder states first ({cfg.encoder_hid_dim_type}, "
                              "e.g. an IP-Adapter's image tokens): its cross-attention keys are not only the CLIP "
                              "prompt tokens, so the BOS and summary positions of the rule are undefined")
    params = _call_parameters(pipe)
    if "image_guidance_scale" in params:  # InstructPix2Pix: [text+image; image only; unconditional]
        raise MitigationError(f"{kind}: a three-way guidance batch (text and image guidance); the rule is defined for "
                              "the two-way classifier-free guidance batch [unconditional; conditional] of "
                              "text-to-image pipelines")
    layers = cross_attention_layers(unet)
    if not layers:
        raise MitigationError(f"{kind}: the UNet has no cross-attention (attn2) layers over prompt tokens")
    if getattr(pipe, "tokenizer", None) is None:
        raise MitigationError(f"{kind}: no tokenizer; the summary mask needs each prompt's token count")
    check_processors(unet, layers)
    return layers


def _call_parameters(pipe) -> set[str]:
    """The parameter names of the pipeline class's ``__call__`` (empty for a plain object holding a UNet)."""
    import inspect

    call = getattr(type(pipe), "__call__", None)
    try:
        return set(inspect.signature(call).parameters) if call is not None else set()
    except (TypeError, ValueError):
        return set()


def check_processors(unet, layers: list[str], what: str = "the rule") -> None:
    """Refuse ``attn2`` layers whose processor is not one of diffusers' plain ones (:data:`STOCK_PROCESSORS`):
    ``what`` (the mitigation rule, the training filter's capture) would replace their computation.

    Raises:
        MitigationError: naming the processor classes and how many layers carry them.
    """
    other: dict[str, int] = {}
    for name in layers:
        proc = type(unet.get_submodule(name).get_processor())
        # by class, not name: a third-party class named AttnProcessor2_0 (Ren et al.'s code defines one) is not ours
        if not (_is_stock(proc) or proc is _MitigationProcessor):
            key = f"{proc.__module__}.{proc.__name__}"
            other[key] = other.get(key, 0) + 1
    if other:
        found = ", ".join(f"{cls} on {n} layer(s)" for cls, n in other.items())
        raise MitigationError(f"attn2 processors other than diffusers' plain attention ({found}): {what} would "
                              "replace their computation silently; restore them (unet.set_default_attn_processor()) "
                              f"or use one of {', '.join(STOCK_PROCESSORS)}")


class _MitigationProcessor:
    """Processor for one ``attn2`` layer: the rule of :func:`mitigated_logits` where the owner says so,
    the layer's original processor otherwise. Follows the diffusers processor contract
    ``processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)``."""

    def __init__(self, owner: "Mitigation", name: str, original):
        self.owner = owner
        self.name = name
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        owner = self.owner
        if encoder_hidden_states is None:  # not cross-attention: nothing to do
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        record = owner.recording and self.name in owner.record_layers
        rows = owner._rows(encoder_hidden_states.shape[0], encoder_hidden_states.shape[1], encoder_hidden_states.device)
        if rows is None and not record and not owner.keep_probs:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        logits, state = attention_logits(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if rows is None:
            probs = logits.softmax(dim=-1)
            if record:
                owner._record(self.name, probs)
        else:
            if record:  # the detection score is the UNmitigated attention, as the scorer sees it
                owner._record(self.name, logits.softmax(dim=-1))
            cond, keep = rows
            probs = mitigated_logits(logits, cond, keep, owner.rule.c1).softmax(dim=-1)
        if owner.keep_probs:
            owner.probs[self.name] = probs.detach()

        return attention_output(attn, probs, state)


class Mitigation(AbstractContextManager):
    """Context manager that installs the mitigation processors on every ``attn2`` layer of ``pipe.unet``.

    Nesting: a Mitigation entered inside another on the same pipeline replaces the outer rule for its block, and
    the outer rule applies again after it; a :class:`audit.mitigation.detect.DetectAndMitigate` is never nested
    with another (refused: its detection needs the first step's unmitigated attention).

    Usage::

        with Mitigation(pipe, c1=1.25) as m:      # or audit.mitigation.mitigate(pipe, c1=1.25)
            images = pipe(prompts).images

    While installed, ``pipe.encode_prompt`` is wrapped (an instance attribute, removed on exit) so that each
    call learns its conditional rows: their number (rows of the returned prompt embeddings) and each
    prompt's token count n from the tokenizer's attention mask, repeated ``num_images_per_prompt`` times.
    A pipeline call with ``prompt_embeds`` and no prompt text has no token counts: with ``mask_summary``
    the call raises :class:`MitigationError` at its ``encode_prompt``, before any step, unless
    :meth:`set_prompts` declared one count per conditional row just before that call (they apply to that one
    call; a declaration for another number of rows is refused). Calling ``pipe.unet`` directly needs :meth:`set_prompts`
    first.

    Attributes:
        rule: the :class:`MitigationRule`.
        layers: the ``attn2`` module paths, in call order.
        active: None (every prompt mitigated) or bool [n_cond], per conditional row (used by detection).
        keep_probs: when True, ``probs[name]`` holds each layer's last attention probabilities
            (float32 [B, H, N, L], after the rule); for inspection and tests.

    Raises:
        MitigationError: bad options, an unsupported family or attn2 processors not of diffusers (at
            construction); entering an object that is already entered, or attn2 processors not of diffusers
            (checked again at entry: they may have changed since); an unexpected batch layout or
            missing token counts (during the forward); attn2 processors replaced inside the block (at exit,
            when no other exception is on its way); exiting while a Mitigation entered after it is still active
            (at exit, changing nothing: exit the inner one first).
    """

    detects = False  # DetectAndMitigate: reads the first step's unmitigated attention (never nested with another)

    # the state of one pipeline call, per thread (_PerThread): each thread calling the pipeline has its own
    active = _PerThread()
    n_cond = _PerThread()
    lengths = _PerThread()
    uncond_lengths = _PerThread()
    _declared = _PerThread()
    recording = _PerThread(False)
    recorded = _PerThread(dict)
    probs = _PerThread(dict)
    _cache = _PerThread(dict)

    def __init__(self, pipe, c1: float = 1.25, mask_summary: bool = True, mask_eos: bool = False):
        self._local = threading.local()
        self.rule = MitigationRule(c1, mask_summary, mask_eos)
        self.layers = check_pipeline(pipe)
        self.pipe = pipe
        self.unet = pipe.unet
        self.tokenizer = pipe.tokenizer
        self.enabled = True
        self.active: torch.Tensor | None = None
        self.n_cond: int | None = None
        self.lengths: torch.Tensor | None = None
        self.uncond_lengths: torch.Tensor | None = None  # a negative prompt's own n per conditional row, or None
        self._declared: tuple | None = None  # set_prompts' (n_cond, lengths) for the next pipeline call
        self.record_layers: set[str] = set()
        self.recording = False
        self.recorded: dict[str, torch.Tensor] = {}
        self.keep_probs = False
        self.probs: dict[str, torch.Tensor] = {}
        self._originals: dict | None = None
        self._wrapped = False
        self._cache: dict = {}

    # --- installation -------------------------------------------------------------------------------
    def __enter__(self):
        if self._originals is not None:
            raise MitigationError("this Mitigation is already entered: nest a new object (mitigate(pipe, ...)) "
                                  "instead of entering the same one twice")
        check_processors(self.unet, self.layers)  # they may have changed since construction
        active = self._active_mitigations()
        if active and (self.detects or any(o.detects for o in active)):
            # inside another: its detection would read mitigated attention; around another: it would see none
            raise MitigationError(f"a {type(self).__name__} cannot be entered while a "
                                  f"{' / '.join(sorted({type(o).__name__ for o in active}))} is active on the same "
                                  "pipeline: detection needs the first step's unmitigated attention; use one "
                                  "DetectAndMitigate (its mode says which images are mitigated)")
        modules = {name: self.unet.get_submodule(name) for name in self.layers}
        self._originals = {name: m.get_processor() for name, m in modules.items()}
        try:
            for name, module in modules.items():
                module.set_processor(_MitigationProcessor(self, name, self._originals[name]))
            if hasattr(self.pipe, "encode_prompt"):
                self._saved_encode = self.pipe.__dict__.get("encode_prompt")
                original = self.pipe.encode_prompt
                self.pipe.encode_prompt = self._wrap_encode(original)
                self._wrapped = True
        except BaseException as exc:  # restore what was installed; the exception goes on as it is (with None,
            # the layers not yet installed would read as "replaced inside the block" and that error replace it)
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _active_mitigations(self) -> set:
        """The entered Mitigations whose processors are installed on this one's layers now."""
        return {p.owner for name in self.layers
                if isinstance(p := self.unet.get_submodule(name).get_processor(), _MitigationProcessor)
                and p.owner._originals is not None}

    def _check_exit_order(self) -> None:
        """Raise MitigationError, changing nothing, while a Mitigation entered after this one on the same UNet is
        still active (its exit would restore this one's processors: the pipeline would stay mitigated)."""
        if self._originals is None:
            return
        inner = {type(o).__name__ for o in self._active_mitigations() if o is not self}
        if inner:
            raise MitigationError(f"a {' / '.join(sorted(inner))} entered after this one on the same pipeline is "
                                  "still active: exit the inner one first (with-blocks and ExitStack do); "
                                  "nothing was changed")

    def __exit__(self, *exc) -> None:
        self._check_exit_order()
        replaced = []
        if self._originals is not None:
            for name, processor in self._originals.items():
                module = self.unet.get_submodule(name)
                current = module.get_processor()
                if isinstance(current, _MitigationProcessor) and current.owner is self:
                    module.set_processor(processor)
                else:  # someone installed another processor inside the block: theirs stays
                    replaced.append(name)
            self._originals = None
        if self._wrapped:
            if self._saved_encode is None:
                self.pipe.__dict__.pop("encode_prompt", None)
            else:
                self.pipe.encode_prompt = self._saved_encode
            self._wrapped = False
        if replaced and exc[0] is None:
            raise MitigationError(f"the processors of {len(replaced)} attn2 layer(s) were replaced inside the "
                                  "mitigation block (set_attn_processor, enable_attention_slicing?): the UNet calls "
                                  "after that were NOT mitigated; set processors before entering the block")
        return None

    def _wrap_encode(self, original):
        def encode_prompt(*args, **kwargs):
            out = original(*args, **kwargs)
            prompt = args[0] if args else kwargs.get("prompt")
            n_images = args[2] if len(args) > 2 else kwargs.get("num_images_per_prompt", 1)
            negative = args[4] if len(args) > 4 else kwargs.get("negative_prompt")
            negative_embeds = args[6] if len(args) > 6 else kwargs.get("negative_prompt_embeds")
            self._begin(prompt, int(n_images or 1), int(out[0].shape[0]), negative, negative_embeds is not None)
            return out

        return encode_prompt

    def _count(self, prompts: list[str]) -> torch.Tensor:
        """n of each prompt as the pipeline's text encoder sees it (after textual-inversion conversion)."""
        convert = getattr(self.pipe, "maybe_convert_prompt", None)
        if convert is not None:
            prompts = [convert(p, self.tokenizer) for p in prompts]
        return prompt_lengths(self.tokenizer, prompts)

    def _begin(self, prompt, n_images: int, n_cond: int, negative=None, negative_embeds: bool = False) -> None:
        """A new pipeline call: its conditional rows and their token counts (None without prompt text, unless
        :meth:`set_prompts` declared them for this call), and a negative prompt's counts. A negative prompt
        given only as embeddings (``negative_prompt_embeds``: Compel and other prompt-weighting tools) has no
        token count: its rows keep every position, so none of its tokens is masked out."""
        declared, self._declared = self._declared, None
        lengths = uncond = None
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, (list, tuple)) and prompt:
            lengths = self._count(list(prompt)).repeat_interleave(n_images)
            if len(lengths) != n_cond:
                raise MitigationError(f"{len(prompt)} prompts x {n_images} images is not the {n_cond} conditional rows")
        elif declared is not None:
            if declared[0] != n_cond:  # e.g. declared per prompt, called with num_images_per_prompt > 1
                raise MitigationError(f"set_prompts declared {declared[0]} conditional rows, this call has {n_cond} "
                                      f"({n_images} image(s) per prompt): declare one count per row, e.g. "
                                      f"set_prompts({n_cond}, lengths.repeat_interleave({n_images}))")
            lengths = declared[1]
        if lengths is None and self._needs_lengths():  # refused before step 0, whatever the prompts turn out to be
            raise MitigationError("mask_summary needs each prompt's token count, and this call gives only "
                                  "prompt_embeds: pass the prompt text, call set_prompts(n_rows, lengths) just "
                                  "before the call, or use mask_summary=False")
        if isinstance(negative, str):
            negative = [negative] * (n_cond // max(n_images, 1))
        if isinstance(negative, (list, tuple)) and negative and all(isinstance(x, str) for x in negative):
            uncond = self._count(list(negative)).repeat_interleave(n_images)
            if len(uncond) != n_cond:
                uncond = None  # the pipeline itself refuses a negative prompt list of another length
        elif negative_embeds:  # n_negative unknown: at least every position (keep_positions keeps j < n)
            uncond = torch.full((n_cond,), torch.iinfo(torch.int32).max, dtype=torch.int64)
        self._set_rows(n_cond, lengths, uncond)

    def _needs_lengths(self) -> bool:
        """Whether a call may mask summary tokens, and so needs each prompt's token count."""
        return self.rule.mask_summary and not self.rule.identity

    def set_prompts(self, n_cond: int, lengths: torch.Tensor | None = None) -> None:
        """Declare the conditional rows of the next UNet calls (the pipeline wrapper does this itself from the
        prompt text). Before a pipeline call with ``prompt_embeds`` and no text, the declared ``lengths`` are
        used by that one call.

        Args:
            n_cond: number of conditional rows (an int, or a numpy or torch integer); a UNet batch of ``n_cond``
                is taken as conditional rows only (no guidance), a batch of ``2 * n_cond`` as
                ``[unconditional; conditional]``.
            lengths: int [n_cond], token count n of each conditional row (BOS..first EOS); needed when
                ``mask_summary``.

        Raises:
            MitigationError: ``n_cond`` not a positive integer; ``lengths`` not ``n_cond`` integers from 2 (BOS and
                EOS) to the tokenizer's maximum length (77 for CLIP).
        """
        try:  # an int, or a numpy or one-element torch integer (len(), np.count_nonzero, tensor.sum())
            count = None if isinstance(n_cond, bool) or getattr(n_cond, "dtype", None) == torch.bool \
                else operator.index(n_cond)
        except TypeError:
            count = None
        if count is None or count < 1:
            raise MitigationError(f"n_cond must be a positive integer (conditional rows), got {n_cond!r}")
        n_cond = count
        if lengths is not None:
            try:
                raw = torch.as_tensor(lengths)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise MitigationError(f"lengths must be integer token counts, got {lengths!r:.80} ({exc})") from None
            if raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
                raise MitigationError(f"lengths must be integer token counts, got {raw.dtype}")
            lengths = raw.to(torch.int64).flatten()
            if len(lengths) != n_cond:
                raise MitigationError(f"{len(lengths)} token counts for {n_cond} conditional rows")
            longest = min(int(getattr(self.tokenizer, "model_max_length", 77) or 77), 100_000)
            if len(lengths) and (int(lengths.min()) < 2 or int(lengths.max()) > longest):
                raise MitigationError(f"token counts must be from 2 (BOS and EOS) to {longest}, got "
                                      f"{lengths.tolist()[:8]}")
        self._set_rows(n_cond, lengths, None)
        self._declared = (int(n_cond), lengths)

    def _set_rows(self, n_cond: int, lengths: torch.Tensor | None, uncond: torch.Tensor | None) -> None:
        self.n_cond, self.lengths, self.uncond_lengths = int(n_cond), lengths, uncond
        self._cache = {}
        self._on_prompts()

    def _on_prompts(self) -> None:
        """Hook for subclasses: a new set of prompts (a new generation) begins."""

    # --- the per-forward row layout -------------------------------------------------------------------
    def _rows(self, batch: int, num_positions: int, device) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(cond [B] bool, keep [B, L] bool or None)`` for a UNet batch of ``batch`` rows, or None when no
        row is mitigated (then the original processor runs)."""
        if not self.enabled or self.rule.identity:
            return None
        if self.active is not None and not bool(self.active.any()):
            return None
        key = (batch, num_positions, str(device), None if self.active is None else tuple(self.active.tolist()))
        if key in self._cache:
            return self._cache[key]
        n = self.n_cond
        if n is None:
            raise MitigationError("the conditional rows are unknown: call the pipeline (its encode_prompt is "
                                  "wrapped) or Mitigation.set_prompts() before calling the UNet directly")
        if batch == n:
            halves = 1
        elif batch == 2 * n:
            halves = 2
        else:
            raise MitigationError(f"UNet batch of {batch} rows is neither the {n} conditional rows nor the "
                                  f"guidance batch of 2 x {n}")
        active = torch.ones(n, dtype=torch.bool) if self.active is None else self.active.to("cpu", torch.bool)
        cond = torch.cat([torch.zeros(n, dtype=torch.bool)] * (halves - 1) + [active])
        keep = None
        if self.rule.mask_summary:
            if self.lengths is None:
                raise MitigationError("mask_summary needs each prompt's token count: pass the prompt text to the "
                                      "pipeline (not only prompt_embeds), call set_prompts(lengths=...), or use "
                                      "mask_summary=False")
            keep_c = keep_positions(self.lengths.cpu(), num_positions, self.rule.mask_eos) | ~active[:, None]
            keep_u = keep_c
            if halves == 2 and self.uncond_lengths is not None:  # a negative prompt keeps all of its tokens
                n_u = torch.maximum(self.lengths.cpu(), self.uncond_lengths.cpu())
                keep_u = keep_positions(n_u, num_positions, self.rule.mask_eos) | ~active[:, None]
            keep = torch.cat([keep_u, keep_c][2 - halves:]).to(device)
        rows = (cond.to(device), keep)
        self._cache[key] = rows
        return rows

    def _record(self, name: str, probs: torch.Tensor) -> None:
        # probs [B, H, N, L] float32 -> a [B, L], the mean over heads and query pixels (audit.capture's a)
        self.recorded[name] = probs.detach().mean(dim=(1, 2))


def mitigate(pipe, c1: float = 1.25, mask_summary: bool = True, mask_eos: bool = False) -> Mitigation:
    """Inference-time mitigation on a diffusers SD 1.x/2.x pipeline, as a context manager.

    ``with mitigate(pipe, c1=1.25): pipe(prompt)``: during the call, every ``attn2`` layer at every step
    scales the BOS logit by ``c1`` in the conditional rows and masks the summary tokens after the first
    EOS in both halves of the guidance batch (module docstring; Ren et al.'s inference-time mitigation, reference code
    ``refactored_attention_processor.py``). The original processors are restored on exit, also on error.

    Raises:
        MitigationError: c1 not a real number in (0, C1_MAX]; ``mask_summary`` or ``mask_eos`` not a bool;
            ``mask_eos`` without ``mask_summary``; an unsupported model family, or attn2 processors other than
            diffusers' plain ones (:func:`check_pipeline`).
    """
    return Mitigation(pipe, c1=c1, mask_summary=mask_summary, mask_eos=mask_eos)
