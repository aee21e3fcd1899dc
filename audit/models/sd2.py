"""The Stable Diffusion 2.x family (SD 2.0, 2.1, their -base 512 px variants): the SD 1.x pipeline class
(``StableDiffusionPipeline``) and conditioning, with SD 2's conventions:

* tokenizer: OpenCLIP's vocabulary through a CLIP tokenizer whose pad token is ``!`` (id 0 in the real
  vocabulary), a real token that can occur in a prompt. Lengths, the EOS position and any mask come from
  the tokenizer's attention mask (:func:`audit.models.base.tokenize`), never from comparing ids with the pad id.
* text encoder: ``CLIPTextModel`` (OpenCLIP ViT-H, stored already cut at its penultimate layer), its last
  hidden state as ``StableDiffusionPipeline.encode_prompt`` uses it (diffusers
  ``pipelines/stable_diffusion/pipeline_stable_diffusion.py``).
* UNet: per-block head counts (``attention_head_dim`` a list: 5, 10, 20, 20), linear projections in the
  transformer blocks (``use_linear_projection``), ``upcast_attention`` in 2.1: the capture computes the
  softmax in float32 whatever the layer's flags (:mod:`audit.capture`).
* scheduler: the class the folder's ``scheduler_config.json`` names (EulerDiscreteScheduler for 2.0, DDIM
  for 2.1), as the pipeline would load it; t0 = its ``timesteps[0]`` after ``set_timesteps(50)``; the
  first-step input is ``scale_model_input(noise * init_noise_sigma, t0)`` (the Euler scaling included).
* prediction type: the scheduler config's ``prediction_type`` (``epsilon`` for the -base models,
  ``v_prediction`` for the 768 px ones).

A folder is SD 2.x when its UNet config sets ``use_linear_projection`` or its tokenizer pads with ``!``;
otherwise the same pipeline class is SD 1.x (:mod:`audit.models.sd1`). Default layer: the 4th
cross-attention layer in call order, the SD 1.x paper's position, labelled "not validated" for SD 2.x.

Must not import scorers, engines, the pipeline or outputs; torch and diffusers are imported inside methods.
"""

from __future__ import annotations

from pathlib import Path

from audit.errors import ModelError
from audit.models.base import ModelAdapter, check_ddpm_scheduler, read_json
from audit.models.sd1 import SD1Adapter

# schedulers an SD 2.x folder may name (diffusers' KarrasDiffusionSchedulers that SD 2 checkpoints ship with)
SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "PNDMScheduler", "DDPMScheduler",
              "DPMSolverMultistepScheduler", "LMSDiscreteScheduler", "EulerAncestralDiscreteScheduler")


def _json(path: Path) -> dict:
    return read_json(path, missing={})


class SD2Adapter(SD1Adapter):
    """SD 2.x: see the module docstring."""

    name = "sd2"
    pipeline_classes = ("StableDiffusionPipeline",)
    default_layer_note = "same position as SD 1.x (4th cross-attention layer in call order), not validated"
    layer_note = ModelAdapter.layer_note  # (not SD 1.x's: the paper's layer is not validated here whatever it is)

    def matches(self, root: Path) -> bool:
        """SD 2.x layout: ``unet/config.json`` sets ``use_linear_projection``, or the tokenizer's pad token is
        ``!`` (``tokenizer/tokenizer_config.json`` or ``special_tokens_map.json``)."""
        root = Path(root)
        if _json(root / "unet" / "config.json").get("use_linear_projection"):
            return True
        for f in ("tokenizer_config.json", "special_tokens_map.json"):
            pad = _json(root / "tokenizer" / f).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad == "!":
                return True
        return False

    def scheduler(self, scheduler_config: dict, num_inference_steps: int):
        """The scheduler class the config names (one of :data:`SCHEDULERS`), built from it, after
        ``set_timesteps(num_inference_steps)``: t0 = 999 for SD 2.0's Euler config (linspace spacing), 981 for
        SD 2.1's DDIM (leading spacing, ``steps_offset`` 1).

        Raises:
            ModelError: a scheduler class outside :data:`SCHEDULERS`.
        """
        return configured_scheduler(scheduler_config, num_inference_steps)


def configured_scheduler(scheduler_config: dict, num_inference_steps: int):
    """The scheduler class ``scheduler_config`` names (one of :data:`SCHEDULERS`; DDIM when it names none),
    built from it, after ``set_timesteps(num_inference_steps)``, as a diffusers pipeline loads its folder's
    scheduler. Raises ModelError for any other class."""
    import diffusers

    cls = scheduler_config.get("_class_name", "DDIMScheduler")
    check_ddpm_scheduler(cls)
    if cls not in SCHEDULERS:
        raise ModelError(f"scheduler {cls}: memaudit builds first steps with one of {', '.join(SCHEDULERS)}")
    scheduler = getattr(diffusers, cls).from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


SD2 = SD2Adapter()
