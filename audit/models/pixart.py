"""The PixArt family (PixArt-alpha and PixArt-Sigma): a DiT (``PixArtTransformer2DModel``) whose blocks
cross-attend (``transformer_blocks.N.attn2``) to T5 token embeddings.

Conventions, as ``PixArtAlphaPipeline`` / ``PixArtSigmaPipeline`` build them (diffusers
``pipelines/pixart_alpha/pipeline_pixart_alpha.py`` and ``pipeline_pixart_sigma.py``):

* text: the prompt lower-cased and stripped (``_text_preprocessing`` without ``clean_caption``, whose
  HTML/URL cleaning needs bs4 and ftfy and is not applied here); T5 tokenizer, ``padding="max_length"``
  to ``max_sequence_length`` (120 for alpha, 300 for Sigma, the pipelines' defaults), truncation, EOS
  ``</s>`` appended, NO BOS token; ``T5EncoderModel(ids, attention_mask=mask)[0]`` with the tokenizer's
  attention mask.
* the same mask goes to the transformer as ``encoder_attention_mask`` (turned into a -10000 bias there), so
  padding gets exactly zero attention probability.
* ``added_cond_kwargs``: resolution and aspect ratio only for 1024 px models (``sample_size`` 128:
  (1024, 1024) and 1.0); None otherwise.
* denoiser call: ``transformer(x, encoder_hidden_states=, encoder_attention_mask=, timestep=t expanded to the
  batch, added_cond_kwargs=)``; with learned sigma (``out_channels`` = 2 x ``in_channels``) the noise
  prediction is the first half of the channels.
* scheduler and prediction type: the folder's scheduler class (DPMSolverMultistepScheduler) and
  ``prediction_type`` (epsilon) (:func:`audit.models.sd2.configured_scheduler`).

Attention entropy on PixArt (Ren et al.'s E transferred, not validated): a = the cross-attention
probabilities averaged over heads and image tokens, over the L positions; padding positions carry zero mass,
so E is the entropy over the ATTENDED positions (prompt tokens and ``</s>``, the tokenizer's attention mask).
T5 has no BOS: the ``bos_mass`` column is NaN (not applicable) and trigger tokens may start at position 0.
Default layer: the 4th cross-attention layer in call order (``transformer_blocks.3.attn2``), the SD 1.x rule,
not validated for PixArt.

Must not import scorers, engines, the pipeline or outputs; torch, transformers and diffusers are imported
inside methods.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from audit.errors import ModelError
from audit.models.base import (Conditioning, LoadedModel, ModelAdapter, Tokens, as_tokens, cannot_load,
                               check_components, check_vocab, check_width, fingerprint_files, load_tokenizer, load_weights,
                               read_extra, read_json, resolve_device, resolve_dtype, to_device, tokenize)
from audit.models.sd2 import configured_scheduler

PIXART_COMPONENTS = ("tokenizer", "text_encoder", "transformer", "scheduler")
MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


class PixArtAdapter(ModelAdapter):
    """PixArt-alpha / Sigma: see the module docstring."""

    name = "pixart"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    components = PIXART_COMPONENTS
    has_bos = False
    default_layer_note = "4th cross-attention layer in call order (the SD 1.x rule), not validated for PixArt"

    def load(self, name: str, root: Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
        """Load the T5 tokenizer and encoder, the transformer (as ``LoadedModel.unet``, safetensors only) and
        the scheduler config; the tokenizer's max length is set to the pipeline's ``max_sequence_length``.

        Raises:
            ModelError: missing components, non-safetensors weights, or an unloadable folder.
        """
        from diffusers import PixArtTransformer2DModel
        from diffusers.utils import logging as diffusers_logging
        from transformers import T5EncoderModel
        from transformers import logging as hf_logging

        for lib in (hf_logging, diffusers_logging):  # one-line output: no loading progress bars or warnings
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # its load errors: memaudit's one line says them

        cls = read_json(root / "model_index.json").get("_class_name", "PixArtAlphaPipeline")
        check_components(name, root, cls, PIXART_COMPONENTS)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        try:
            tokenizer = load_tokenizer(root, "tokenizer")
            text_encoder = load_weights(name, root, "text_encoder", T5EncoderModel, dt)
            transformer = load_weights(name, root, "transformer", PixArtTransformer2DModel, dt)
        except Exception as exc:
            raise cannot_load(name, root, exc) from exc
        check_vocab(name, tokenizer, text_encoder)
        check_width(name, int(text_encoder.config.d_model), "text_encoder/'s T5 d_model",
                    transformer.config.caption_channels, "transformer/'s caption_channels")
        tokenizer.model_max_length = MAX_SEQUENCE_LENGTH.get(cls, 120)
        scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
        text_encoder.to(dev).eval().requires_grad_(False)
        transformer.to(dev).eval().requires_grad_(False)
        extra = read_extra(root)
        return LoadedModel(
            name=name, path=root, fingerprint=fingerprint_files(root), tokenizer=tokenizer,
            text_encoder=text_encoder, unet=transformer, scheduler_config=scheduler_config, device=dev, dtype=dt,
            default_layers=self.default_layers(transformer, extra), extra=extra, adapter=self,
        )

    def tokenize(self, model: LoadedModel, prompts: list[str]) -> Tokens:
        """Lower-cased, stripped prompts (the pipeline's preprocessing without ``clean_caption``), T5-tokenized
        to L = ``max_sequence_length`` with the tokenizer's attention mask; the tokens' character spans index the
        prompt as given, also where lower-casing changes its length (``"İ".lower()`` is two characters)."""
        texts = [p.lower().strip() for p in prompts]
        tokens = tokenize(model.tokenizer, texts, model.max_length)
        # the text is the prompt character for character only when stripping removes nothing and lower-casing
        # keeps every character one character ("İ red cat " and its text have one length, not one alignment)
        moved = [i for i, p in enumerate(prompts) if p.strip() != p or len(p.lower()) != len(p)]
        if moved and tokens.has_spans:  # spans index the lower-cased text: back to the prompt's own characters
            offsets = tokens.offset_mapping().copy()
            for i in moved:
                offsets[i] = _spans_in_prompt(prompts[i], offsets[i])
            tokens = replace(tokens, offsets=offsets, encodings=None)
        return tokens

    def encode(self, model: LoadedModel, tokens: Tokens, text_encoder=None) -> Conditioning:
        """T5 embeddings [B, L, D] with the tokenizer's attention mask [B, L] (to the encoder and, as
        ``encoder_attention_mask``, to the transformer); ``added`` holds the resolution micro-conditions.

        Raises:
            ModelError: bare ids without an attention mask.
        """
        import torch

        tokens = as_tokens(tokens)
        if tokens.attention_mask is None:
            raise ModelError("PixArt needs the tokenizer's attention mask: pass Tokens, not bare ids")
        text_encoder = text_encoder if text_encoder is not None else model.text_encoder
        ids = to_device(tokens.input_ids, model.device)
        mask = to_device(tokens.attention_mask, model.device)
        embeddings = text_encoder(ids, attention_mask=mask)[0].to(model.dtype)
        added = {}
        if int(model.unet.config.sample_size) == 128:  # PixArtAlphaPipeline: 1024 px micro-conditions
            b = embeddings.shape[0]
            added = {"resolution": torch.tensor([[1024.0, 1024.0]], dtype=model.dtype, device=model.device).expand(b, -1),
                     "aspect_ratio": torch.ones((b, 1), dtype=model.dtype, device=model.device)}
        return Conditioning(embeddings, mask, added)

    def forward(self, denoiser, x, t, cond):
        """The noise prediction [N, C, H, W]: the transformer called as the pipeline calls it (keywords, the
        timestep expanded to the batch), the first ``in_channels`` channels under learned sigma."""
        added = dict(cond.added) if cond.added else {"resolution": None, "aspect_ratio": None}
        out = denoiser(x, encoder_hidden_states=cond.embeddings, encoder_attention_mask=cond.mask,
                       timestep=t.reshape(-1).expand(x.shape[0]), added_cond_kwargs=added, return_dict=False)[0]
        cfg = denoiser.config
        return out[:, : cfg.in_channels] if cfg.out_channels // 2 == cfg.in_channels else out

    def scheduler(self, scheduler_config: dict, num_inference_steps: int):
        """The folder's scheduler class after ``set_timesteps`` (:func:`audit.models.sd2.configured_scheduler`)."""
        return configured_scheduler(scheduler_config, num_inference_steps)

    def default_layers(self, unet, extra: dict | None = None) -> list[str]:
        """``memaudit.json``'s layers, else the 4th cross-attention layer in call order (the last when fewer).

        Raises:
            ModelError: the transformer has no cross-attention layer.
        """
        if extra and extra.get("default_layers"):
            return list(extra["default_layers"])
        layers = self.cross_attention_layers(unet)
        if not layers:
            raise ModelError("the transformer has no cross-attention (attn2) layers")
        return [layers[3] if len(layers) > 3 else layers[-1]]

    def denoiser_from_config(self, root: Path):
        """The transformer built from ``transformer/config.json`` on the meta device (no weights)."""
        import torch
        from diffusers import PixArtTransformer2DModel

        with torch.device("meta"):
            return PixArtTransformer2DModel.from_config(
                PixArtTransformer2DModel.load_config(Path(root) / "transformer"))


PIXART = PixArtAdapter()


def _spans_in_prompt(prompt: str, offsets):
    """Spans ``[start, end)`` int32 [L, 2] of ``prompt.lower().strip()`` mapped to ``prompt``'s characters: each
    character of the lower-cased text comes from one of the prompt (lowering is per character, and only its
    length may change); special tokens and padding, ``(0, 0)``, stay."""
    import numpy as np

    source = np.fromiter((i for i, c in enumerate(prompt) for _ in c.lower()), dtype=np.int64)
    lowered = prompt.lower()
    if len(source) != len(lowered):  # (no known case) spans then unknown, as with a slow tokenizer
        return np.zeros_like(offsets)
    lead = len(lowered) - len(lowered.lstrip())
    source = source[lead:lead + len(lowered.strip())]
    out = offsets.copy()
    real = offsets[:, 1] > offsets[:, 0]
    out[real, 0] = source[offsets[real, 0]]
    out[real, 1] = source[offsets[real, 1] - 1] + 1
    return out
