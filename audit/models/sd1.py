"""The Stable Diffusion 1.x family (SD v1.1-1.5, and the bundled lab model, which has its architecture):
a CLIP tokenizer and text encoder, a ``UNet2DConditionModel`` conditioned through ``encoder_hidden_states``
on the text encoder's last hidden state, and a DDIM scheduler built from the model's scheduler config.

Owns what is SD-1.x specific. Must not import scorers, engines, the pipeline or outputs; torch,
transformers and diffusers are imported inside methods only. The next family (SD 2.x, SDXL, PixArt, SD3)
is a sibling module with its own :class:`~audit.models.base.ModelAdapter` and one ``register_family`` line.
"""

from __future__ import annotations

from pathlib import Path

from audit.errors import ModelError
from audit.models.base import (COMPONENTS, Conditioning, LoadedModel, ModelAdapter, Tokens, as_tokens, cannot_load,
                               check_components, check_vocab, check_width, declared_encoder_mask, fingerprint_files,
                               load_tokenizer, load_weights, read_extra, read_json, resolve_device, resolve_dtype,
                               to_device)

SD1_DEFAULT_LAYER = "down_blocks.1.attentions.1.transformer_blocks.0.attn2"


class SD1Adapter(ModelAdapter):
    """SD 1.x: see the module docstring."""

    name = "sd1"
    pipeline_classes = ("StableDiffusionPipeline",)
    default_layer_note = "the paper's layer (Ren et al.'s code for SD v1.x): validated there"

    def load(self, name: str, root: Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
        """Load tokenizer, text encoder, UNet (safetensors only) and the scheduler config from ``root``.

        Args:
            name: the ``--model`` value (hub id or folder), for messages and outputs.
            root: the local diffusers folder.
            device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
            dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16`` (the text encoder and UNet weights).

        Raises:
            ModelError: missing components, non-safetensors weights, an unloadable folder, a UNet that needs
                conditioning the pipeline does not pass, or one whose input and output channels differ (inpainting).
        """
        from diffusers import UNet2DConditionModel
        from diffusers.utils import logging as diffusers_logging
        from transformers import CLIPTextModel
        from transformers import logging as hf_logging

        check_components(name, root, self.pipeline_classes[0], COMPONENTS)
        unet_config = read_json(root / "unet" / "config.json")
        needs = {k: unet_config.get(k) for k in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type")
                 if unet_config.get(k) is not None}
        if needs and self.pipeline_classes[0] == "StableDiffusionPipeline":  # (SDXL's load checks its own)
            # e.g. an SDXL UNet in a folder whose model_index.json names StableDiffusionPipeline
            said = ", ".join(f"{k} {v!r}" for k, v in needs.items())
            raise ModelError(f"--model {name}: the UNet needs extra conditioning ({said}) that "
                             f"{self.pipeline_classes[0]} does not pass; an SDXL UNet's folder names "
                             "StableDiffusionXLPipeline in model_index.json")
        channels = (unet_config.get("in_channels", 4), unet_config.get("out_channels", 4))
        is_unet = unet_config.get("_class_name", "UNet2DConditionModel") == "UNet2DConditionModel"  # else: load_weights
        if is_unet and channels[0] != channels[1]:
            # an inpainting (9) or depth (5) UNet: its extra input channels are a mask and image latents, which
            # pure noise would stand in for; the pipeline itself cannot step it (diffusers' scheduler step fails)
            raise ModelError(f"--model {name}: unet/ takes {channels[0]} input channels but predicts {channels[1]}: "
                             "memaudit scores text-to-image UNets from pure noise, whose input and output channels "
                             "are equal (an inpainting UNet takes 9: its mask and image latents besides the noise)")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        # critical: diffusers logs a folder it cannot load at error level, before memaudit's own one-line ModelError
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
        diffusers_logging.disable_progress_bar()
        try:
            tokenizer = load_tokenizer(root, "tokenizer")
            text_encoder = load_weights(name, root, "text_encoder", CLIPTextModel, dt)
            unet = load_weights(name, root, "unet", UNet2DConditionModel, dt)
        except Exception as exc:
            raise cannot_load(name, root, exc) from exc
        check_vocab(name, tokenizer, text_encoder)
        self.check_text_width(name, text_encoder, unet)
        scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
        text_encoder.to(dev).eval().requires_grad_(False)
        unet.to(dev).eval().requires_grad_(False)
        extra = read_extra(root)
        return LoadedModel(
            name=name, path=root, fingerprint=fingerprint_files(root), tokenizer=tokenizer,
            text_encoder=text_encoder, unet=unet, scheduler_config=scheduler_config, device=dev, dtype=dt,
            default_layers=self.default_layers(unet, extra), extra=extra, adapter=self,
        )

    def check_text_width(self, name: str, text_encoder, unet) -> None:
        """Refuse a text encoder whose hidden size is not the UNet's ``cross_attention_dim``
        (:func:`audit.models.base.check_width`): another model's UNet or text encoder.

        Raises:
            ModelError: naming both widths.
        """
        check_width(name, int(text_encoder.config.hidden_size), "text_encoder/'s hidden_size",
                    unet.config.cross_attention_dim, "unet/'s cross_attention_dim")

    def encode(self, model: LoadedModel, tokens: Tokens, text_encoder=None):
        """c = text_encoder(tokens)[0], the last hidden state [B, L, D], as ``StableDiffusionPipeline.
        encode_prompt`` builds it: the tokenizer's attention mask goes to the text encoder only when its
        config sets ``use_attention_mask``.

        Args:
            tokens: :class:`Tokens` (or bare int64 ids [B, L], numpy) on the host.
        Returns:
            the embeddings tensor [B, L, D], or a :class:`Conditioning` with the UNet's
            ``encoder_attention_mask`` when ``memaudit.json`` declares one
            (:func:`audit.models.base.declared_encoder_mask`).
        Raises:
            ModelError: a mask is needed (declared, or ``use_attention_mask``) but ``tokens`` has none.
        """
        tokens = as_tokens(tokens)
        text_encoder = text_encoder if text_encoder is not None else model.text_encoder
        ids = to_device(tokens.input_ids, model.device)
        mask = to_device(tokens.attention_mask, model.device)
        kwargs = {}
        if getattr(model.text_encoder.config, "use_attention_mask", False):
            if mask is None:
                raise ModelError("this text encoder uses an attention mask: pass Tokens, not bare token ids")
            kwargs["attention_mask"] = mask
        embeddings = text_encoder(ids, **kwargs)[0]
        unet_mask = declared_encoder_mask(model.extra, mask)
        return embeddings if unet_mask is None else Conditioning(embeddings, unet_mask)

    def scheduler(self, scheduler_config: dict, num_inference_steps: int):
        """DDIM from the model's scheduler config after ``set_timesteps`` (t0 = 981 for SD v1.x at 50 steps):
        :func:`audit.models.base.ddim_from_config`.

        Raises:
            ModelError: a flow-matching or unknown scheduler class.
        """
        from audit.models.base import ddim_from_config

        return ddim_from_config(scheduler_config, num_inference_steps)

    def layer_note(self, default_layers: list[str]) -> str:
        """The paper's layer is validated only where the 4th layer in call order is its module: not in another
        block layout (a distilled or small SD 1.x UNet)."""
        if list(default_layers) == [SD1_DEFAULT_LAYER]:
            return self.default_layer_note
        return (f"4th cross-attention layer in call order (the SD 1.x rule; the paper's is {SD1_DEFAULT_LAYER}), "
                "not validated for this UNet's layout")

    def default_layers(self, unet, extra: dict | None = None) -> list[str]:
        """The default cross-attention layer(s) to score.

        A model folder's ``memaudit.json`` may name them (the lab model does, chosen on its validation
        split). Otherwise: the 4th cross-attention layer in call order, as in the paper's code for SD v1.x
        (``down_blocks.1.attentions.1.transformer_blocks.0.attn2``), or the last one when there are fewer.

        Raises:
            ModelError: the UNet has no cross-attention layer.
        """
        if extra and extra.get("default_layers"):
            return list(extra["default_layers"])
        layers = self.cross_attention_layers(unet)
        if not layers:
            raise ModelError("the UNet has no cross-attention (attn2) layers")
        return [layers[3] if len(layers) > 3 else layers[-1]]

    def denoiser_from_config(self, root: Path):
        """The UNet built from ``unet/config.json`` on the meta device (module paths only: no weights are read or
        allocated)."""
        import torch
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(Path(root) / "unet"))


SD1 = SD1Adapter()


def default_layers(unet, extra: dict | None = None) -> list[str]:
    """:meth:`SD1Adapter.default_layers` of the SD 1.x family."""
    return SD1.default_layers(unet, extra)
