"""The Stable Diffusion XL family (SDXL 1.0 base and fine-tunes in its layout): ``StableDiffusionXLPipeline``.

Conventions, as ``StableDiffusionXLPipeline.encode_prompt`` and ``__call__`` build them (diffusers
``pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py``):

* two CLIP tokenizers and text encoders: ``tokenizer``/``text_encoder`` (CLIP ViT-L, ``CLIPTextModel``, pads
  with EOS) and ``tokenizer_2``/``text_encoder_2`` (OpenCLIP bigG, ``CLIPTextModelWithProjection``, pads
  with ``!``). Each tokenizes the prompt to its own ``model_max_length`` (77) with its own padding; the
  tokenizer's attention mask is kept for each (:func:`audit.models.base.tokenize`). No attention mask
  goes to either text encoder (the pipeline passes none).
* ``encoder_hidden_states`` [B, 77, 768 + 1280] = the PENULTIMATE hidden states of both encoders
  (``hidden_states[-2]``), concatenated on the feature axis: cross-attention is over the 77 positions of
  that concatenation (BOS at 0, both tokenizers agreeing on positions up to the EOS; padding differs in id
  only, and is attended as in the pipeline).
* ``added_cond_kwargs``: ``text_embeds`` [B, 1280] = text_encoder_2's projected pooled output
  (``text_embeds``), and ``time_ids`` [B, 6] = original size + crop top-left + target size =
  (H, W, 0, 0, H, W) with H = W = ``unet.config.sample_size`` x the VAE scale factor
  (2 ** (len(vae block_out_channels) - 1) from ``vae/config.json`` when present, else 8, as the pipeline
  defaults): 1024 px for SDXL base.
* unconditional branch (classifier-free guidance, Wen's c_empty): with ``force_zeros_for_empty_prompt``
  (``model_index.json``, True unless set False, as for SDXL base) the pipeline uses ZEROS for both the
  embeddings and the pooled embeddings, with the same ``time_ids``; otherwise the encoded empty prompt.
* scheduler and prediction type: the folder's scheduler class and ``prediction_type``
  (EulerDiscreteScheduler, epsilon, for SDXL base; :func:`audit.models.sd2.configured_scheduler`).

The refiner (``StableDiffusionXLImg2ImgPipeline``: text_encoder_2 only, aesthetic-score ``time_ids``) is
refused (:data:`audit.models.REFUSED`). Default layer: the 4th cross-attention layer in call order
(``down_blocks.1.attentions.1.transformer_blocks.1.attn2`` in SDXL base, which has two transformer blocks
per attention in its second down block), the SD 1.x rule, not validated for SDXL.

Must not import scorers, engines, the pipeline or outputs; torch, transformers and diffusers are imported
inside methods.
"""

from __future__ import annotations

from pathlib import Path

from audit.errors import ModelError
from audit.models.base import (COMPONENTS, Conditioning, LoadedModel, Tokens, as_tokens, cannot_load, check_vocab,
                               check_width, declared_encoder_mask, load_tokenizer, load_weights, read_json,
                               sdxl_settings, to_device, tokenize)
from audit.models.sd2 import SD2Adapter

SDXL_COMPONENTS = COMPONENTS + ("tokenizer_2", "text_encoder_2")


class SDXLAdapter(SD2Adapter):
    """SDXL: see the module docstring."""

    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    components = SDXL_COMPONENTS
    default_layer_note = "4th cross-attention layer in call order (the SD 1.x rule), not validated for SDXL"

    def matches(self, root: Path) -> bool:
        """Every ``StableDiffusionXLPipeline`` folder."""
        return True

    def load(self, name: str, root: Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
        """Load both tokenizers and text encoders, the UNet and the scheduler config (safetensors only);
        derive ``time_ids`` and read ``force_zeros_for_empty_prompt`` (see the module docstring).

        Raises:
            ModelError: missing components, non-safetensors weights, an unloadable folder, or a UNet whose
                added-embedding width is not 6 x ``addition_time_embed_dim`` + text_encoder_2's projection
                width (the refiner's 5 time ids, a broken config).
        """
        import torch
        from transformers import CLIPTextModelWithProjection

        unet_config = root / "unet" / "config.json"
        # before the weights load: a UNet config without text_time describes none of the weights' add_embedding
        # tensors, and the loader's "tensors the config does not describe" would hide this more precise reason
        if unet_config.is_file() and (kind := read_json(unet_config).get("addition_embed_type")) != "text_time":
            raise ModelError(f"--model {name}: an SDXL UNet must have addition_embed_type 'text_time', not {kind!r}")
        model = super().load(name, root, device, dtype)
        try:
            tokenizer_2 = load_tokenizer(root, "tokenizer_2")
            text_encoder_2 = load_weights(name, root, "text_encoder_2", CLIPTextModelWithProjection, model.dtype)
        except Exception as exc:
            raise cannot_load(name, root, exc) from exc
        check_vocab(name, tokenizer_2, text_encoder_2, "tokenizer_2", "text_encoder_2")
        widths = (int(model.text_encoder.config.hidden_size), int(text_encoder_2.config.hidden_size))
        check_width(name, sum(widths), f"text_encoder/ + text_encoder_2/ hidden sizes {widths[0]} + {widths[1]}",
                    model.unet.config.cross_attention_dim, "unet/'s cross_attention_dim")
        text_encoder_2.to(model.device).eval().requires_grad_(False)
        unet = model.unet
        expected = unet.add_embedding.linear_1.in_features
        passed = unet.config.addition_time_embed_dim * 6 + text_encoder_2.config.projection_dim
        if expected != passed:
            raise ModelError(f"--model {name}: the UNet's added embedding takes {expected} features, but 6 time ids "
                             f"x {unet.config.addition_time_embed_dim} + a pooled width of "
                             f"{text_encoder_2.config.projection_dim} make {passed} (a refiner, or a broken config)")
        settings = sdxl_settings(root)
        side = int(unet.config.sample_size) * settings["vae_scale_factor"]
        model.family = {
            "tokenizer_2": tokenizer_2,
            "text_encoder_2": text_encoder_2,
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]], dtype=model.dtype, device=model.device),
            "force_zeros_for_empty_prompt": settings["force_zeros_for_empty_prompt"],
        }
        return model

    def check_text_width(self, name: str, text_encoder, unet) -> None:
        """Nothing here: the UNet takes both encoders' widths together, checked in :meth:`load` once
        ``text_encoder_2`` is loaded."""

    def tokenize(self, model: LoadedModel, prompts: list[str]) -> Tokens:
        """Both tokenizations: ``input_ids``/``attention_mask`` from ``tokenizer`` and, in ``extra``,
        ``input_ids_2``/``attention_mask_2`` from ``tokenizer_2`` (each padded to its own max length)."""
        tokens = tokenize(model.tokenizer, prompts, model.max_length)
        tok2 = model.family["tokenizer_2"]
        second = tokenize(tok2, prompts, int(tok2.model_max_length))
        tokens.extra = {"input_ids_2": second.input_ids, "attention_mask_2": second.attention_mask}
        return tokens

    def encode(self, model: LoadedModel, tokens: Tokens, text_encoder=None) -> Conditioning:
        """The SDXL conditioning of ``tokens``: embeddings [B, 77, D1 + D2] (penultimate hidden states of
        both encoders, concatenated), ``text_embeds`` [B, P] (text_encoder_2's pooled projection) and
        ``time_ids`` [B, 6]; the UNet attention mask only when ``memaudit.json`` declares one.

        Raises:
            ModelError: ``tokens`` lacks the second tokenizer's ids (bare ids were passed).
        """
        import torch

        tokens = as_tokens(tokens)
        if "input_ids_2" not in tokens.extra:
            raise ModelError("SDXL needs both tokenizers' ids: pass Tokens from the adapter's tokenize(), not bare ids")
        text_encoder = text_encoder if text_encoder is not None else model.text_encoder
        dev = model.device
        ids_1 = to_device(tokens.input_ids, dev)
        ids_2 = to_device(tokens.extra["input_ids_2"], dev)
        out_1 = text_encoder(ids_1, output_hidden_states=True)
        out_2 = model.family["text_encoder_2"](ids_2, output_hidden_states=True)
        embeddings = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        pooled = out_2.text_embeds  # [B, P]
        b = embeddings.shape[0]
        time_ids = model.family["time_ids"].to(embeddings.dtype).expand(b, -1)
        mask = to_device(tokens.attention_mask, dev)
        return Conditioning(embeddings, declared_encoder_mask(model.extra, mask),
                            {"text_embeds": pooled, "time_ids": time_ids})

    def unconditional(self, model: LoadedModel, tokens: Tokens, text_encoder=None) -> Conditioning:
        """Zeros for the embeddings and pooled embeddings (same ``time_ids``) when the folder's
        ``force_zeros_for_empty_prompt`` holds (SDXL base), else the encoded empty prompt."""
        import torch

        cond = self.encode(model, tokens, text_encoder)
        if not model.family.get("force_zeros_for_empty_prompt", True):
            return cond
        added = dict(cond.added, text_embeds=torch.zeros_like(cond.added["text_embeds"]))
        return Conditioning(torch.zeros_like(cond.embeddings), cond.mask, added)


SDXL = SDXLAdapter()
