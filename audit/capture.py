"""Cross-attention capture through diffusers attention processors, with an early exit.

A :class:`CrossAttentionCapture` installs our own processor, by module name, on the selected ``attn2``
(cross-attention) modules of a ``UNet2DConditionModel`` and restores the original processors on exit
(the pattern of castorini/daam; nothing in the UNet is edited or copied). The processor follows the
diffusers processor contract ``processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)``
and computes the attention probabilities explicitly, always in float32:

    P = softmax(Q K^T * scale)            shape [batch, heads, query_pixels, L]

(Vaswani et al. 2017, eq. 1; ``scale`` = the layer's ``attn.scale``, 1/sqrt(head_dim) by default). It
stores a = mean of P over heads and query pixels, shape [batch, L] (Ren et al., ECCV 2024, arXiv
2403.11052; reference ``detect.py``: the distribution of cross-attention over token positions), and a flag saying
whether any probability was non-finite. Once every selected layer has stored its probabilities the
processor raises :class:`EarlyExit`, so the rest of the UNet never runs (README, "The method").

A JOINT attention layer (SD 3.x: image and text tokens in one softmax, text keys through ``add_k_proj``) gets
:class:`_JointCaptureProcessor` instead: it records the image-to-text block of the joint map, renormalized
over the text positions, and leaves the layer's output to the original processor.

Owns the attention processors and their installation by module path. Must not import scorers, models
or anything above them: scorers (and mitigation) build on it.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
import re

import torch

from audit.errors import IncompleteCaptureError


class EarlyExit(Exception):
    """Raised inside the UNet forward once every selected cross-attention layer has been captured."""



_INDEX = re.compile(r"\d+")
_WRAPPERS = re.compile(r"^(?:(?:_orig_mod|module)\.)+")  # torch.compile's and DDP/accelerate's wrapper prefixes


def unwrapped_name(name: str) -> str:
    """A module path without the prefixes that ``torch.compile`` (``_orig_mod.``) and DistributedDataParallel
    or accelerate (``module.``) add: ``_orig_mod.down_blocks.1...attn2`` -> ``down_blocks.1...attn2``."""
    return _WRAPPERS.sub("", name)


def call_order_key(name: str) -> tuple:
    """Sort key that puts ``UNet2DConditionModel`` attention modules in the order the forward calls them.

    ``named_modules`` lists ``up_blocks`` before ``mid_block`` (registration order), but the forward
    runs down blocks, then the mid block, then up blocks; within a block, indices run in call order. Wrapper
    prefixes (:func:`unwrapped_name`) are ignored, so a compiled or DDP-wrapped UNet sorts the same.
    """
    bare = unwrapped_name(name)
    stage = 0 if bare.startswith("down_blocks") else 1 if bare.startswith("mid_block") else 2
    return (stage, [int(i) for i in _INDEX.findall(bare)], name)


def cross_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names of the cross-attention (``attn2``) modules of ``unet``, in call order.

    Returns:
        Module paths such as ``down_blocks.1.attentions.1.transformer_blocks.0.attn2``.
    """
    names = [n for n, m in unet.named_modules() if n.endswith("attn2") and hasattr(m, "set_processor")]
    return sorted(names, key=call_order_key)



def _no_autocast(device_type: str):
    """A context that switches autocast off on ``device_type`` when it is on; a no-op otherwise (and on devices
    autocast does not know, such as ``meta``)."""
    try:
        on = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # torch < 2.4 takes no device; unknown device types
        on = False
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


def attention_logits(attn, hidden_states, encoder_hidden_states, attention_mask=None, temb=None):
    """The pre-softmax cross-attention logits of a diffusers ``Attention`` layer, in float32, and the state
    :func:`attention_output` needs to finish the layer. Shared by the capture (here) and the mitigation
    processors (:mod:`audit.mitigation.inference`), so both compute exactly what the layer computes.

    Mirrors the steps of diffusers' ``AttnProcessor`` (spatial/group norm, ``norm_cross``, q/k/v projections,
    ``norm_q``/``norm_k``, the attention-mask bias) without copying it: S = Q K^T * scale, with the layer's
    ``attention_mask`` (diffusers' additive bias from ``encoder_attention_mask``) added.

    Args:
        attn: the ``diffusers.models.attention_processor.Attention`` module.
        hidden_states: [B, N, C] (or [B, C, H, W]) query input; encoder_hidden_states: [B, L, D].
    Returns:
        ``(logits, state)``: logits float32 [B, heads, N, L]; ``state`` a tuple for :func:`attention_output`.
    """
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    shape4 = None
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        shape4 = (channel, height, width)
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

    query = attn.to_q(hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, N, d]
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [B, H, L, d]
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)

    # float32 whatever the model dtype (autocast off, which would run the matmul in its lower dtype): this
    # subsumes the layer's upcast_attention/upcast_softmax.
    with _no_autocast(query.device.type):
        logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale  # [B, H, N, L]
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            logits = logits + mask.view(batch, attn.heads, -1, mask.shape[-1]).float()
    return logits, (value, residual, shape4)


def attention_output(attn, probs, state):
    """Finish an ``Attention`` layer from its attention probabilities ``probs`` [B, heads, N, L]: P V, the
    output projection and dropout, the 4-D reshape, residual connection and output rescaling, as diffusers'
    ``AttnProcessor`` does. ``state`` comes from :func:`attention_logits`. Returns the layer's output, [B, N, C]
    (or [B, C, H, W] for a 4-D ``hidden_states``), in ``value``'s dtype."""
    value, residual, shape4 = state
    batch, heads, _, head_dim = value.shape
    out = torch.matmul(probs.to(value.dtype), value)  # [B, H, N, d]
    out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if shape4 is not None:
        out = out.transpose(-1, -2).reshape(batch, *shape4)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class _CaptureProcessor:
    """Attention processor for one cross-attention layer that records attention probabilities.

    Stores into ``capture.probs[name]`` a float32 tensor of shape [batch, L]: the attention probabilities
    averaged over heads and query pixels. The layer's output is P V as in any attention layer, so layers
    after it (when the forward continues) see the ordinary computation.
    """

    def __init__(self, capture: "CrossAttentionCapture", name: str):
        self.capture = capture
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:
            raise IncompleteCaptureError(f"layer {self.name} is not a cross-attention layer (no encoder states)")
        logits, state = attention_logits(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        probs = logits.softmax(dim=-1)
        self.capture._record(self.name, probs)
        if self.capture._complete():
            raise EarlyExit()

        return attention_output(attn, probs, state)


class _JointCaptureProcessor:
    """Capture for a JOINT attention layer (SD 3.x ``JointTransformerBlock.attn``: image and text tokens in one
    softmax). It records the image-to-text block of the joint attention map, renormalized per image query over
    the text positions: P = softmax(Q_img K_txt^T * scale), [batch, heads, image_tokens, L], in float32, with
    Q_img = norm_q(to_q(h)) and K_txt = norm_added_k(add_k_proj(c)) per head; a = mean over heads and image
    queries, [batch, L]. (Renormalizing the joint softmax's image->text block row by row gives exactly this
    softmax over the text logits.) The layer's output comes from the ORIGINAL processor, called unchanged,
    unless the forward exits early here.
    """

    def __init__(self, capture: "CrossAttentionCapture", name: str, original):
        self.capture = capture
        self.name = name
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise IncompleteCaptureError(f"layer {self.name} is a joint layer called without text states")
        batch = hidden_states.shape[0]
        head_dim = attn.to_k.out_features // attn.heads
        query = attn.to_q(hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = attn.add_k_proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_added_k is not None:
            key = attn.norm_added_k(key)
        with _no_autocast(query.device.type):  # float32 under autocast too, as the cross-attention capture
            logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale  # [B, H, N, L]
            probs = logits.softmax(dim=-1)
        self.capture._record(self.name, probs)
        if self.capture._complete():
            raise EarlyExit()
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


def is_joint_attention(module) -> bool:
    """Whether an attention module is a joint one (text keys through ``add_k_proj``: SD 3.x, FLUX)."""
    return getattr(module, "add_k_proj", None) is not None


def joint_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names of the joint-attention modules of an SD 3.x transformer (``transformer_blocks.N.attn``, text keys
    through ``add_k_proj``: :func:`is_joint_attention`), in call order; empty for a UNet or PixArt."""
    names = [n for n, m in unet.named_modules() if hasattr(m, "set_processor") and is_joint_attention(m)]
    return sorted(names, key=call_order_key)


def _text_attention_layers(unet: torch.nn.Module) -> list[str]:
    """The layers a capture can record, in call order: ``attn2`` modules that attend to the text (a UNet's, PixArt's;
    not SD 3.5's image-only ``attn2``) and joint layers (:func:`joint_attention_layers`, SD 3.x)."""
    cross = [n for n in cross_attention_layers(unet) if getattr(unet.get_submodule(n), "is_cross_attention", True)]
    return sorted(cross + joint_attention_layers(unet), key=call_order_key)


class CrossAttentionCapture(AbstractContextManager):
    """Context manager that captures cross-attention probabilities of selected layers of a UNet.

    Usage::

        with CrossAttentionCapture(unet, ["down_blocks.1.attentions.1.transformer_blocks.0.attn2"]) as cap:
            probs = cap.run(lambda: unet(x, t, encoder_hidden_states=c))
        # probs: {layer name: float32 tensor [batch, L]}; original processors restored here

    Args:
        unet: a ``UNet2DConditionModel`` (any diffusers model with ``attn_processors``/``set_attn_processor``).
        layers: module paths of ``attn2`` modules; order does not matter.
        early_exit: stop the forward once every selected layer has been captured (default). With False
            the full forward runs (used by tests and by scorers that need the noise prediction).

    Attributes (after :meth:`run`):
        probs: ``{layer: float32 [batch, L]}``, the attention over token positions (mean over heads and query
            pixels).
        nonfinite: ``{layer: bool [batch]}``, whether any of the row's probabilities was non-finite.
        calls: ``{layer: int}``, the forwards each layer recorded since :meth:`run` began (1 each, normally).
        output: what the forward returned; None when it exited early.

    Raises:
        KeyError: ``layers`` is empty, or a layer name is not an attention module of ``unet`` (the message lists
            the layers that attend to the text: cross-attention ``attn2`` layers, or SD 3.x's joint layers).
        IncompleteCaptureError: from :meth:`run`, when a forward did not capture every selected layer.
        TypeError: ``layers`` is one string, not a list of them.
        RuntimeError: entering a capture that is already entered (its block still open).
    """

    def __init__(self, unet: torch.nn.Module, layers: list[str], early_exit: bool = True):
        if isinstance(layers, (str, bytes)):  # read as its characters, it named a layer 'd'
            raise TypeError(f"layers must be a list of module paths, not one string: give [{layers!r}]")
        names = list(dict.fromkeys(layers))  # a generator is read once, here; a name given twice is one layer
        if not names:
            raise KeyError("no cross-attention layer selected")
        modules = {}
        for name in names:
            try:
                module = unet.get_submodule(name)
            except AttributeError:
                module = None
            if module is None or not hasattr(module, "set_processor"):
                options = ", ".join(_text_attention_layers(unet))
                raise KeyError(f"not an attention layer of this UNet: {name}. Cross-attention layers: {options}")
            modules[name] = module
        self.unet = unet
        self.layers = list(modules)
        self._modules = modules
        self.early_exit = early_exit
        self.probs: dict[str, torch.Tensor] = {}
        self.nonfinite: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}  # forwards each layer recorded since run() (or a reset): 1 each, normally
        self._originals: dict | None = None

    def __enter__(self) -> "CrossAttentionCapture":
        if self._originals is not None:  # the inner exit would restore our own processors, and the outer none
            raise RuntimeError("this CrossAttentionCapture is already entered: enter a new one (or run() again in "
                               "the open block) instead of entering the same one twice")
        # swap the processors of the selected modules only, by name (cheap: no walk over the whole UNet)
        self._originals = {name: m.get_processor() for name, m in self._modules.items()}
        for name, module in self._modules.items():
            module.set_processor(_JointCaptureProcessor(self, name, self._originals[name]) if is_joint_attention(module)
                                 else _CaptureProcessor(self, name))
        return self

    def __exit__(self, *exc) -> None:
        if self._originals is not None:
            for name, processor in self._originals.items():
                self._modules[name].set_processor(processor)
            self._originals = None
        return None

    def _record(self, name: str, probs: torch.Tensor) -> None:
        # probs [B, H, N, L] -> a [B, L]; the non-finite flag per prompt stays on the device (no host sync).
        # Read on the mean, not on every probability: probabilities lie in [0, 1], so the mean (accumulated in
        # float32 for half inputs) is non-finite exactly when some probability of the prompt is.
        # detached: a record, not part of the model's graph (a training forward would otherwise keep that graph
        # alive as long as the capture is held)
        a = probs.detach().mean(dim=(1, 2))
        self.nonfinite[name] = ~torch.isfinite(a).all(dim=1)
        self.probs[name] = a
        self.calls[name] = self.calls.get(name, 0) + 1

    def _complete(self) -> bool:
        return self.early_exit and len(self.probs) == len(self.layers)

    def run(self, forward) -> dict[str, torch.Tensor]:
        """Run ``forward()`` (a UNet call) and return ``{layer: a}``, a float32 [batch, L] per layer.

        Raises:
            IncompleteCaptureError: if any selected layer did not report, e.g. because its processor was
                replaced after this context was entered.
        """
        self.probs, self.nonfinite, self.calls = {}, {}, {}
        self.output = None
        try:
            self.output = forward()
        except EarlyExit:
            pass
        missing = [n for n in self.layers if n not in self.probs]
        if missing:
            raise IncompleteCaptureError(
                f"cross-attention capture incomplete: no probabilities from {', '.join(missing)} "
                "(was the layer's attention processor replaced?)"
            )
        return dict(self.probs)
