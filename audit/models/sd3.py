"""The Stable Diffusion 3.x family (SD 3 Medium, SD 3.5 in the same layout): ``StableDiffusion3Pipeline``, an
MM-DiT (``SD3Transformer2DModel``) whose blocks attend JOINTLY over image and text tokens, trained by
rectified flow (flow matching).

Conventions, from diffusers ``pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py``:

* text: three tokenizers and encoders (CLIP-L and CLIP-G with projection, T5; T5 optional). The conditioning
  is built by calling the pipeline's own ``encode_prompt`` (a ``StableDiffusion3Pipeline`` assembled from the
  loaded components, without a VAE): CLIP-L and CLIP-G penultimate hidden states concatenated on features
  and zero-padded to T5's width, then T5's 256 tokens appended on the SEQUENCE axis: L = 77 + 256 = 333
  positions (CLIP BOS at 0, CLIP prompt and padding, then T5 tokens and padding; zeros when there is no
  T5). ``pooled_projections`` [B, 768 + 1280] = both CLIP pooled projections. No attention mask (the
  pipeline passes none): padding positions are attended.
* denoiser call: ``transformer(hidden_states=x, timestep=t expanded, encoder_hidden_states=,
  pooled_projections=)``; its output is the flow velocity.
* scheduler: ``FlowMatchEulerDiscreteScheduler`` from the folder's config (static ``shift``; dynamic
  shifting refused), t0 = its ``timesteps[0]`` after ``set_timesteps(50)``: 1000, sigma = 1; the first input
  is the unscaled noise (the pipeline's ``prepare_latents``).

Attention entropy on SD 3.x (Ren et al.'s E transferred, not validated): at the selected joint layer
(``transformer_blocks.N.attn``) the image-to-text block of the joint attention map, renormalized per image
query over the 333 text positions (:class:`audit.capture._JointCaptureProcessor`), averaged over heads and
image tokens. ``bos_mass`` = the mass on CLIP's BOS (position 0); trigger tokens are the CLIP prompt tokens.
Default layer: the 4th joint layer in call order (``transformer_blocks.3.attn``), the SD 1.x rule, not
validated.

Noise-based scorers are REFUSED (:meth:`SD3Adapter.check_scorer`): they are defined on the noise prediction
(REFERENCES.md, Wen et al.); for rectified flow x_t = (1 - sigma) x_0 + sigma eps and v = eps - x_0, so
eps = x_t + (1 - sigma) v, and at the first step sigma = 1: eps = x_t for every prompt, the quantity is 0 by
construction. (Sources: Esser et al., ICML 2024, rectified flow; diffusers'
``FlowMatchEulerDiscreteScheduler.scale_noise``, ``sigma * noise + (1.0 - sigma) * sample``, and the SD 3
training target ``noise - model_input`` of diffusers' ``examples/dreambooth/train_dreambooth_sd3.py``.)
A velocity difference is another quantity that would need its own name.

Must not import scorers, engines, the pipeline or outputs; torch, transformers and diffusers are imported
inside methods.
"""

from __future__ import annotations

import copy
from pathlib import Path

from audit.errors import ModelError
from audit.models.base import (Conditioning, LoadedModel, ModelAdapter, Tokens, as_tokens, cannot_load,
                               check_components, check_vocab, check_width, fingerprint_files, load_tokenizer, load_weights,
                               read_extra, read_json, resolve_device, resolve_dtype, tokenize)

SD3_COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "transformer", "scheduler")
T5_LENGTH = 256  # the pipeline's max_sequence_length default
NOISE_REFUSAL = ("SD 3.x is a flow-matching model: the noise scorers are defined on the noise prediction, and at "
                 "the first step (sigma = 1) it equals x_t for every prompt, so Wen's magnitude is 0 by "
                 "construction; use --scorer attention_entropy")
# guidance_geometry's refusal: the message above named Wen's magnitude to a user who asked for Asthana's score
GEOMETRY_REFUSAL = ("SD 3.x is a flow-matching model: guidance_geometry (Asthana & Belagiannis) is defined on "
                    "the noise prediction at DDIM timesteps of a DDPM-family schedule, which a flow-matching model "
                    "does not have; "
                    "use --scorer attention_entropy")


class SD3Adapter(ModelAdapter):
    """SD 3.x: see the module docstring."""

    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    components = SD3_COMPONENTS
    default_layer_note = "4th joint-attention layer in call order (the SD 1.x rule), not validated for SD 3.x"

    def load(self, name: str, root: Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
        """Load the tokenizers and text encoders (T5 when present), the transformer (as ``LoadedModel.unet``)
        and the scheduler config, and assemble the pipeline whose ``encode_prompt`` builds the conditioning.

        Raises:
            ModelError: missing components, non-safetensors weights, or an unloadable folder.
        """
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
        from diffusers.utils import logging as diffusers_logging
        from transformers import CLIPTextModelWithProjection, T5EncoderModel
        from transformers import logging as hf_logging

        for lib in (hf_logging, diffusers_logging):
            lib.set_verbosity_error()
            lib.disable_progress_bar()
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # its load errors: memaudit's one line says them
        check_components(name, root, "StableDiffusion3Pipeline", SD3_COMPONENTS)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        has_t5 = self._has_t5(name, root)
        try:
            parts = {
                "tokenizer": load_tokenizer(root, "tokenizer"),
                "tokenizer_2": load_tokenizer(root, "tokenizer_2"),
                "text_encoder": load_weights(name, root, "text_encoder", CLIPTextModelWithProjection, dt),
                "text_encoder_2": load_weights(name, root, "text_encoder_2", CLIPTextModelWithProjection, dt),
                "tokenizer_3": load_tokenizer(root, "tokenizer_3") if has_t5 else None,
                "text_encoder_3": load_weights(name, root, "text_encoder_3", T5EncoderModel, dt) if has_t5 else None,
                "transformer": load_weights(name, root, "transformer", SD3Transformer2DModel, dt),
            }
        except Exception as exc:
            raise cannot_load(name, root, exc) from exc
        for i in ("", "_2", "_3"):
            if parts["tokenizer" + i] is not None:
                check_vocab(name, parts["tokenizer" + i], parts["text_encoder" + i], f"tokenizer{i}",
                            f"text_encoder{i}")
        config = parts["transformer"].config
        if parts["text_encoder_3"] is not None:  # the pipeline pads CLIP's states to T5's width, then joins them
            check_width(name, int(parts["text_encoder_3"].config.d_model), "text_encoder_3/'s T5 d_model",
                        config.joint_attention_dim, "transformer/'s joint_attention_dim")
        pooled = (int(parts["text_encoder"].config.projection_dim), int(parts["text_encoder_2"].config.projection_dim))
        check_width(name, sum(pooled), f"text_encoder/ + text_encoder_2/ pooled projection_dim {pooled[0]} + "
                    f"{pooled[1]}", config.pooled_projection_dim, "transformer/'s pooled_projection_dim")
        scheduler_config = read_json(root / "scheduler" / "scheduler_config.json")
        for key, module in parts.items():
            if isinstance(module, torch.nn.Module):
                module.to(dev).eval().requires_grad_(False)
        # the pipeline gets its own copy of the first tokenizer: encode_prompt (the scoring thread) sets padding and
        # truncation on a fast tokenizer's backend while Scorer.prepare tokenizes the next batch (the prepare thread)
        # with model.tokenizer; sharing one object broke encodes ("Unable to create tensor") and token counts
        pipe = StableDiffusion3Pipeline(vae=None, scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config),
                                        **{**parts, "tokenizer": copy.deepcopy(parts["tokenizer"])})
        extra = read_extra(root)
        return LoadedModel(
            name=name, path=root, fingerprint=fingerprint_files(root), tokenizer=parts["tokenizer"],
            text_encoder=parts["text_encoder"], unet=parts["transformer"], scheduler_config=scheduler_config,
            device=dev, dtype=dt, default_layers=self.default_layers(parts["transformer"], extra), extra=extra,
            adapter=self, family={"pipeline": pipe},
        )

    @staticmethod
    def _has_t5(name: str, root: Path) -> bool:
        """Whether the folder holds T5 (``text_encoder_3/`` and ``tokenizer_3/``); SD 3.x runs without it when the
        folder declares neither.

        Raises:
            ModelError: one of the two without the other, or ``model_index.json`` declaring T5 that is not there
                (T5's positions would silently be zeros while the fingerprint names the folder's weights).
        """
        present = {part: (root / part).is_dir() for part in ("text_encoder_3", "tokenizer_3")}
        index = read_json(root / "model_index.json")
        declared = [part for part in present if isinstance(index.get(part), list) and index[part][:1] != [None]]
        if any(present.values()) or declared:
            if missing := [part for part, there in present.items() if not there]:
                where = "declared in model_index.json" if declared else "present"
                raise ModelError(f"--model {name}: T5 is {where} but {' and '.join(f'{m}/' for m in missing)} is "
                                 "missing: scoring would fill T5's positions with zeros; restore it, or drop T5 from "
                                 "the folder and its model_index.json")
            return True
        return False

    def check_scorer(self, forward: str) -> None:
        """Only the partial conditional forward (attention entropy) is defined; see the module docstring.

        Raises:
            ModelError: a scorer that needs the noise prediction, or one that samples (Ren et al.'s D).
        """
        if forward == "full_sampling":
            raise ModelError("SD 3.x: attention_entropy_late samples 50 guided steps with a DDPM-family sampler (Ren "
                             "et al.'s D); memaudit does not sample flow-matching models; use --scorer "
                             "attention_entropy")
        if forward == "several_timesteps":  # guidance_geometry: its own reason, not Wen's
            raise ModelError(GEOMETRY_REFUSAL)
        if forward != "partial_conditional":
            raise ModelError(NOISE_REFUSAL)

    def prediction_type(self, model: LoadedModel) -> str:
        """``flow_velocity``: the transformer predicts v = eps - x_0 (rectified flow)."""
        return "flow_velocity"

    def tokenize(self, model: LoadedModel, prompts: list[str]) -> Tokens:
        """CLIP-L's tokenization (positions 0..76 of the conditioning) with its attention mask; the prompts
        themselves ride along in ``extra["prompts"]`` for the pipeline's ``encode_prompt``."""
        tokens = tokenize(model.tokenizer, prompts, model.max_length)
        tokens.extra = {"prompts": list(prompts)}
        return tokens

    def encode(self, model: LoadedModel, tokens: Tokens, text_encoder=None) -> Conditioning:
        """``StableDiffusion3Pipeline.encode_prompt`` of the prompts: embeddings [B, 77 + 256, D] and
        ``pooled_projections`` [B, P] (in ``added``). ``text_encoder`` (a compiled wrapper) is not used.

        Raises:
            ModelError: bare ids (the pipeline encodes the prompt text).
        """
        tokens = as_tokens(tokens)
        if "prompts" not in tokens.extra:
            raise ModelError("SD 3.x encodes prompt text: pass Tokens from the adapter's tokenize(), not bare ids")
        emb, _, pooled, _ = model.family["pipeline"].encode_prompt(
            prompt=tokens.extra["prompts"], prompt_2=None, prompt_3=None, device=model.device,
            do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH)
        return Conditioning(emb, None, {"pooled_projections": pooled})

    def forward(self, denoiser, x, t, cond):
        """The velocity [N, C, H, W], the transformer called as the pipeline calls it."""
        return denoiser(hidden_states=x, timestep=t.reshape(-1).expand(x.shape[0]),
                        encoder_hidden_states=cond.embeddings,
                        pooled_projections=cond.added["pooled_projections"], return_dict=False)[0]

    def scheduler(self, scheduler_config: dict, num_inference_steps: int):
        """``FlowMatchEulerDiscreteScheduler`` from the config after ``set_timesteps``: t0 = 1000 (sigma = 1).

        Raises:
            ModelError: another scheduler class, or dynamic shifting (its ``mu`` depends on the image size).
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        cls = scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if cls != "FlowMatchEulerDiscreteScheduler" or scheduler_config.get("use_dynamic_shifting"):
            raise ModelError(f"scheduler {cls}: memaudit builds SD 3.x first steps with FlowMatchEulerDiscreteScheduler "
                             "without dynamic shifting")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(num_inference_steps)
        return scheduler

    def first_input(self, scheduler, noise, t0):
        """Pure noise: at sigma = 1 the flow's x_t is the noise (the pipeline's ``prepare_latents``)."""
        return noise

    def cross_attention_layers(self, unet) -> list[str]:
        """The joint-attention modules (``transformer_blocks.N.attn``, text keys via ``add_k_proj``) in call
        order; SD 3.5's image-only ``attn2`` is not a text attention and is left out."""
        from audit.capture import joint_attention_layers

        return joint_attention_layers(unet)

    def cross_attention_names(self, modules: set[str]) -> set[str]:
        """The joint-attention modules among the weights' module paths ``modules``: those with an ``add_k_proj``
        projection (:func:`audit.capture.is_joint_attention`), as :meth:`cross_attention_layers` selects them."""
        return {m for m in modules if f"{m}.add_k_proj" in modules}

    def default_layers(self, unet, extra: dict | None = None) -> list[str]:
        """``memaudit.json``'s layers, else the 4th joint layer in call order (the last when fewer).

        Raises:
            ModelError: the transformer has no joint-attention layer.
        """
        if extra and extra.get("default_layers"):
            return list(extra["default_layers"])
        layers = self.cross_attention_layers(unet)
        if not layers:
            raise ModelError("the transformer has no joint-attention layers")
        return [layers[3] if len(layers) > 3 else layers[-1]]

    def denoiser_from_config(self, root: Path):
        """The transformer built from ``transformer/config.json`` on the meta device (no weights)."""
        import torch
        from diffusers import SD3Transformer2DModel

        with torch.device("meta"):
            return SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(Path(root) / "transformer"))


SD3 = SD3Adapter()
