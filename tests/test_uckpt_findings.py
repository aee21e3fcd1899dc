"""Findings of the new-user trial of session 53 (uckpt): a model developer auditing the checkpoints of their own
fine-tuning runs, saved in diffusers layout in several ways (fp16 variants, shards, pickled weights, LoRA)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from audit.errors import ModelError


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


# ---------------------------------------------------------------- pickled weights: how to convert them

def test_pickled_weights_are_refused_with_the_command_that_converts_them(tmp_path, tiny_model_dir):
    """A folder saved with save_pretrained(safe_serialization=False) holds unet/diffusion_pytorch_model.bin (and
    text_encoder/pytorch_model.bin). The refusal said only "(memaudit never loads pickled weights)"; it now names the
    pickled files and gives one command that converts them, which, run as printed, makes the folder load and score
    as the safetensors original does."""
    import torch
    from safetensors.torch import load_file

    import audit
    from audit.models import read_identity

    model = _copy(tiny_model_dir, tmp_path / "my ckpt")
    for comp, stem, pickled in (("unet", "diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
                                ("text_encoder", "model", "pytorch_model.bin")):
        src = model / comp / f"{stem}.safetensors"
        torch.save({k: v.clone() for k, v in load_file(src).items()}, model / comp / pickled)
        src.unlink()
    with pytest.raises(ModelError) as err:
        read_identity(str(model))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"--model {model}: text_encoder/ has no .safetensors weights, only pickled ones "
                              "(text_encoder/pytorch_model.bin, unet/diffusion_pytorch_model.bin), and memaudit never "
                              "loads pickle: convert them once, in place, where you trust the files: python -c ")
    argv = shlex.split(message.split("where you trust the files: ", 1)[1])
    assert argv[0] == "python" and argv[3:] == [
        str(model / "text_encoder" / "pytorch_model.bin"), str(model / "text_encoder" / "model.safetensors"),
        str(model / "unet" / "diffusion_pytorch_model.bin"), str(model / "unet" / "diffusion_pytorch_model.safetensors")]
    done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    prompts = ["a red cat on a beach", "old city street at night"]
    assert (audit.score(prompts, model=str(model))["risk"].to_list()
            == audit.score(prompts, model=str(tiny_model_dir))["risk"].to_list())


def test_a_component_with_no_weight_file_at_all_is_not_called_pickled(tmp_path, tiny_model_dir):
    from audit.models import read_identity

    model = _copy(tiny_model_dir, tmp_path / "m")
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError) as err:
        read_identity(str(model))
    assert str(err.value) == (f"--model {model}: unet/ has no .safetensors weights, nor any weight file (a folder "
                              "copied in part?)")


def test_generate_names_a_pickled_vae_and_how_to_convert_it(tmp_path, gen_pipeline):
    """memaudit generate said "no vae/ folder with .safetensors weights" for a vae/ holding diffusion_pytorch_model.bin."""
    from audit.cli.generate import GenerateError, build_pipeline

    model = _copy(gen_pipeline[0], tmp_path / "g")
    for weights in (model / "vae").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(GenerateError) as err:
        build_pipeline(str(model), device="cpu")
    assert str(err.value).startswith(f"--model {model}: vae/ has no .safetensors weights, only pickled ones "
                                     "(vae/diffusion_pytorch_model.bin), and memaudit never loads pickle: convert them once")
    assert str(err.value).endswith("; generate decodes images with the model's VAE")
