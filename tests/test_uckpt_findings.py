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
    assert "'\"'\"'" not in message  # the code is quoted in one pair of single quotes, not shlex's '"'"' splices
    argv = shlex.split(message.split("where you trust the files: ", 1)[1])
    assert argv[0] == "python" and argv[3:] == [
        str(model / "text_encoder" / "pytorch_model.bin"), str(model / "text_encoder" / "model.safetensors"),
        str(model / "unet" / "diffusion_pytorch_model.bin"),
        str(model / "unet" / "diffusion_pytorch_model.safetensors")]
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
    """memaudit generate said "no vae/ folder with .safetensors weights" for a vae/ holding
    diffusion_pytorch_model.bin."""
    from audit.cli.generate import GenerateError, build_pipeline

    model = _copy(gen_pipeline[0], tmp_path / "g")
    for weights in (model / "vae").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(GenerateError) as err:
        build_pipeline(str(model), device="cpu")
    assert str(err.value).startswith(f"--model {model}: vae/ has no .safetensors weights, only pickled ones "
                                     "(vae/diffusion_pytorch_model.bin), and memaudit never loads pickle: convert "
                                     "them once")
    assert str(err.value).endswith("; generate decodes images with the model's VAE")


# ---------------------------------------------------------------- weights in the folder that are not loaded

PROMPTS = ["a red cat on a beach", "old city street at night"]


def _fp16_variant_beside(model: Path, seed: int) -> None:
    """Save another model's UNet and text encoder as the "fp16" variant beside ``model``'s plain weights (a later
    fine-tune saved with save_pretrained(variant="fp16") into the folder of an earlier one)."""
    from audit.tiny import tiny_components

    _, text_encoder, unet, _ = tiny_components(seed=seed)
    unet.half().save_pretrained(model / "unet", safe_serialization=True, variant="fp16")
    text_encoder.half().save_pretrained(model / "text_encoder", safe_serialization=True, variant="fp16")


def test_a_fp16_variant_beside_the_plain_weights_is_said_not_loaded(tmp_path, tiny_model_dir):
    """The plain weights were scored and the fp16 variant beside them ignored, in silence (exit 0), whatever the
    variant held; a warning now names the variant files and which weights were scored."""
    import audit

    model = _copy(tiny_model_dir, tmp_path / "ckpt")
    _fp16_variant_beside(model, seed=5)
    lines: list[str] = []
    got = audit.score(PROMPTS, model=str(model), log=lines.append)
    assert got["risk"].to_list() == audit.score(PROMPTS, model=str(tiny_model_dir))["risk"].to_list()  # plain ones
    assert [line for line in lines if "not loaded" in line] == [
        f"memaudit: warning: --model {model}: not loaded: text_encoder/model.fp16.safetensors, "
        "unet/diffusion_pytorch_model.fp16.safetensors: each component is scored with the weights from_pretrained "
        "reads without variant= (its plain file, or the shards its .index.json names), never a variant such as fp16 "
        "nor a file beside the shards (save the pipeline again without variant= to score a variant)"]


def test_a_lora_file_beside_the_components_is_said_not_applied(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import save_file

    from audit.models.base import unloaded_weights_note

    model = _copy(tiny_model_dir, tmp_path / "lora")
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.ones(4, 32)},
              str(model / "pytorch_lora_weights.safetensors"))
    assert unloaded_weights_note(str(model), model, ("tokenizer", "text_encoder", "unet", "scheduler")) == (
        f"--model {model}: not loaded: pytorch_lora_weights.safetensors: a file beside the components, such as a "
        "LoRA, is not applied (fuse it into the weights and save the pipeline to score it)")


def test_plain_sharded_and_hub_folders_get_no_note(tmp_path, tiny_model_dir):
    """Shards named by their index are the weights loaded; a hub id's variants are the publisher's copies."""
    from diffusers import UNet2DConditionModel

    from audit.models.base import unloaded_weights_note

    components = ("tokenizer", "text_encoder", "unet", "scheduler")
    assert unloaded_weights_note(str(tiny_model_dir), tiny_model_dir, components) is None
    sharded = _copy(tiny_model_dir, tmp_path / "sharded")
    shutil.rmtree(sharded / "unet")
    UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").save_pretrained(sharded / "unet",
                                                                                  max_shard_size="50KB")
    assert len(list((sharded / "unet").glob("*.safetensors"))) > 1
    assert unloaded_weights_note(str(sharded), sharded, components) is None
    _fp16_variant_beside(sharded, seed=5)
    assert unloaded_weights_note("owner/name", sharded, components) is None


def test_generate_says_the_fp16_variant_is_not_loaded(tmp_path, gen_pipeline):
    from audit.cli.generate import run_generate

    model = _copy(gen_pipeline[0], tmp_path / "g")
    _fp16_variant_beside(model, seed=5)
    (tmp_path / "p.txt").write_text("a red cat\n")
    lines: list[str] = []
    run_generate(tmp_path / "p.txt", str(model), tmp_path / "out", steps=2, device="cpu", log=lines.append)
    assert [line for line in lines if "not loaded" in line] == [
        f"memaudit: warning: --model {model}: not loaded: text_encoder/model.fp16.safetensors, "
        "unet/diffusion_pytorch_model.fp16.safetensors: each component is scored with the weights from_pretrained "
        "reads without variant= (its plain file, or the shards its .index.json names), never a variant such as fp16 "
        "nor a file beside the shards (save the pipeline again without variant= to score a variant)"]


# ---------------------------------------------------------------- a LoRA saved unmerged

def test_unmerged_lora_layers_are_named_as_such_not_as_a_half_saved_folder(tmp_path, tiny_model_dir):
    """A UNet saved with its peft LoRA adapters unfused keeps each adapted layer's weight under ``.base_layer.`` beside
    ``lora_A`` / ``lora_B``. The refusal said "weights lack 14 tensor(s) ... (a half-saved folder, or a config from
    another model)"; it now says they are LoRA tensors not merged, and how to merge them."""
    import torch
    from safetensors.torch import load_file, save_file

    from audit.models import load_model

    model = _copy(tiny_model_dir, tmp_path / "lora")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors, out = {k: v.clone() for k, v in load_file(weights).items()}, {}
    for key, value in tensors.items():
        if key.endswith(("attn2.to_k.weight", "attn2.to_q.weight")):
            base = key.removesuffix(".weight")
            out[f"{base}.base_layer.weight"] = value
            out[f"{base}.lora_A.default.weight"] = torch.zeros(4, value.shape[1])
            out[f"{base}.lora_B.default.weight"] = torch.zeros(value.shape[0], 4)
        else:
            out[key] = value
    save_file(out, str(weights))
    with pytest.raises(ModelError) as err:
        load_model(str(model), "cpu", "float32")
    assert str(err.value) == (
        f"--model {model}: unet/ weights hold 42 LoRA tensor(s) not merged into the layers, the first "
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.base_layer.weight (a model saved with its LoRA "
        "adapters unfused): merge them and save the pipeline again (diffusers: pipe.fuse_lora(), then "
        "pipe.unload_lora_weights(); peft: merge_and_unload())")


# ---------------------------------------------------------------- weight files the run refuses, refused by the dry run

def _dry(model: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from audit.cli import app

    (tmp_path / "p.txt").write_text("a red cat\n")
    res = CliRunner().invoke(app, ["run", str(tmp_path / "p.txt"), "--model", str(model), "--out",
                                   str(tmp_path / "out"), "--dry-run"])
    return res.exit_code, [line for line in res.output.splitlines() if line.strip()]


@pytest.mark.parametrize("case", ["fp16_only", "empty", "truncated", "shard_missing", "dangling_link"])
def test_the_dry_run_refuses_weight_files_the_run_refuses(case, tmp_path, tiny_model_dir):
    """`memaudit run --dry-run` passed (exit 0, "its identity and weights are read when the run starts") folders that
    the run then refused: only fp16 variant weights, an empty or truncated .safetensors, a shard its index names
    missing, a weights file that is a link to nothing. It now refuses them in the run's line, from the file names and
    safetensors headers (no tensor read), and so does the identity check a Ray run's driver makes."""
    import os

    from diffusers import UNet2DConditionModel

    from audit.models import read_identity

    model = _copy(tiny_model_dir, tmp_path / "m")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    if case == "fp16_only":
        weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
        said = (f"--model {model}: unet/ holds only 'fp16' variant weights (diffusion_pytorch_model.fp16.safetensors) "
                "and no diffusion_pytorch_model.safetensors: memaudit loads each component's plain weights, as "
                "from_pretrained without variant= does; save the pipeline again without variant= (or copy the variant "
                "file to diffusion_pytorch_model.safetensors)")
    elif case == "empty":
        weights.write_bytes(b"")
        said = (f"--model {model}: unet/diffusion_pytorch_model.safetensors is not a readable safetensors file "
                "(SafetensorError: Error while deserializing header: header too small): a damaged or partial download, "
                "or another format under this name")
    elif case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        said = (f"--model {model}: unet/diffusion_pytorch_model.safetensors is not a readable safetensors file "
                "(SafetensorError: Error while deserializing header: incomplete metadata, file not fully covered): a "
                "damaged or partial download, or another format under this name")
    elif case == "shard_missing":
        shutil.rmtree(model / "unet")
        UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").save_pretrained(model / "unet",
                                                                                      max_shard_size="50KB")
        shards = sorted((model / "unet").glob("diffusion_pytorch_model-*.safetensors"))
        shards[1].unlink()
        said = (f"--model {model}: unet/diffusion_pytorch_model.safetensors.index.json names 1 shard(s) the folder "
                f"lacks, the first {shards[1].name}: a partial download or copy")
    else:
        weights.unlink()
        os.symlink(tmp_path / "blobs" / "gone", weights)
        said = (f"--model {model}: unet/diffusion_pytorch_model.safetensors is a link to "
                f"{tmp_path / 'blobs' / 'gone'}, which does not exist (a hub cache copied without its blobs?)")
    code, lines = _dry(model, tmp_path)
    assert (code, lines) == (2, [f"memaudit: error: {said}"])
    with pytest.raises(ModelError) as err:
        read_identity(str(model))
    assert str(err.value) == said


# ---------------------------------------------------------------- config keys diffusers ignores

def test_a_config_key_diffusers_ignores_is_said(tmp_path, tiny_model_dir):
    """A unet/config.json key the class does not take (a misspelling: cross_attention_dims) was dropped by diffusers
    with a log line memaudit's quiet loading hid; the run scored without a word. The Python API's log now gets a
    warning naming the file and the key."""
    import json

    import audit

    model = _copy(tiny_model_dir, tmp_path / "cfg")
    config_file = model / "unet" / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"cross_attention_dims": 48}))
    lines: list[str] = []
    audit.score(PROMPTS[:1], model=str(model), log=lines.append)
    import diffusers

    assert [line for line in lines if "ignored" in line] == [
        f"memaudit: warning: --model {model}: ignored, as keys the installed diffusers {diffusers.__version__} does "
        "not take: unet/config.json cross_attention_dims (the model is built without them: a misspelled key leaves the "
        "real one at its default, a key of a newer diffusers is not applied)"]


def test_no_note_for_the_shipped_and_tiny_models_of_every_family(family_folders, tiny_model_dir, gen_pipeline):
    from audit.lab import LAB_MODEL_DIR
    from audit.models import detect_family
    from audit.models.base import model_notes

    folders = {"tiny": tiny_model_dir, "lab": LAB_MODEL_DIR, "gen": gen_pipeline[0], **family_folders}
    for key, folder in folders.items():
        adapter, _ = detect_family(Path(folder))
        assert model_notes(str(folder), Path(folder), adapter.components + ("vae",)) == [], key


# ---------------------------------------------------------------- model_index.json against the components' configs

def test_a_component_class_model_index_names_otherwise_than_its_config_is_said(tmp_path, tiny_model_dir):
    """model_index.json naming unet as ["diffusers", "UNet2DModel"] (or a class diffusers does not have), where
    unet/config.json describes the UNet2DConditionModel memaudit loads, was scored without a word."""
    import json

    import audit

    model = _copy(tiny_model_dir, tmp_path / "idx")
    index = json.loads((model / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DModel"]
    index["text_encoder"] = ["transformers", "MyTextEncoder"]
    (model / "model_index.json").write_text(json.dumps(index))
    lines: list[str] = []
    got = audit.score(PROMPTS[:1], model=str(model), log=lines.append)
    assert got["risk"].to_list() == audit.score(PROMPTS[:1], model=str(tiny_model_dir))["risk"].to_list()
    assert [line for line in lines if "model_index.json" in line] == [
        f"memaudit: warning: --model {model}: model_index.json names text_encoder as MyTextEncoder where "
        "text_encoder/config.json describes a CLIPTextModel; unet as UNet2DModel where unet/config.json describes a "
        "UNet2DConditionModel: memaudit loads what the config describes, where diffusers' pipeline would build "
        "model_index.json's class; fix the one that is wrong"]


def test_eval_warns_of_the_fp16_variant_it_did_not_load(tmp_path, tiny_model_dir):
    """memaudit eval (audit.evaluate.evaluate) loaded the plain weights beside a fp16 variant without a word, as the
    run did; its warnings (printed, in --json, and Python UserWarnings) now hold the run's line."""
    import warnings

    import numpy as np

    from audit.evaluate import evaluate

    model = _copy(tiny_model_dir, tmp_path / "ckpt")
    _fp16_variant_beside(model, seed=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = evaluate(PROMPTS + ["a blue boat", "a green tree"], np.array([True, False, True, False]), str(model),
                       n_boot=10, device="cpu", dtype="float32")
    note = (f"--model {model}: not loaded: text_encoder/model.fp16.safetensors, "
            "unet/diffusion_pytorch_model.fp16.safetensors: each component is scored with the weights from_pretrained "
            "reads without variant= (its plain file, or the shards its .index.json names), never a variant such as "
            "fp16 nor a file beside the shards (save the pipeline again without variant= to score a variant)")
    assert out["model_notes"] == [note] and out["warnings"][-1] == note
    assert f"memaudit eval: {note}" in [str(w.message) for w in caught]


def test_the_dry_run_says_the_fp16_variant_it_will_not_load(tmp_path, tiny_model_dir):
    import json

    model = _copy(tiny_model_dir, tmp_path / "ckpt")
    _fp16_variant_beside(model, seed=5)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps(index | {"unet": ["diffusers", "UNet2DModel"]}))
    code, lines = _dry(model, tmp_path)
    assert code == 0
    assert [line for line in lines if line.startswith("memaudit: warning:")] == [
        f"memaudit: warning: --model {model}: not loaded: text_encoder/model.fp16.safetensors, "
        "unet/diffusion_pytorch_model.fp16.safetensors: each component is scored with the weights from_pretrained "
        "reads without variant= (its plain file, or the shards its .index.json names), never a variant such as fp16 "
        "nor a file beside the shards (save the pipeline again without variant= to score a variant)",
        f"memaudit: warning: --model {model}: model_index.json names unet as UNet2DModel where unet/config.json "
        "describes a UNet2DConditionModel: memaudit loads what the config describes, where diffusers' pipeline would "
        "build model_index.json's class; fix the one that is wrong"]


# ---------------------------------------------------------------- a config.json that lacks keys

@pytest.mark.parametrize("component, key", [("unet", "block_out_channels"), ("text_encoder", "hidden_size")])
def test_a_config_key_missing_is_named_where_its_default_breaks_the_load(tmp_path, tiny_model_dir, component, key):
    """A config.json without block_out_channels failed with diffusers' "`block_out_channels`: (320, 640, 1280, 1280)",
    values found nowhere in the folder; one without hidden_size with "[77, 32] in the weights, [77, 512] by the
    config". Each now says the config lacks the key and that the class's default was taken."""
    import json

    from audit.models import load_model

    model = _copy(tiny_model_dir, tmp_path / "cfg")
    config_file = model / component / "config.json"
    config = json.loads(config_file.read_text())
    del config[key]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelError) as err:
        load_model(str(model), "cpu", "float32")
    if component == "unet":
        assert str(err.value).startswith(
            f"--model {model}: unet/config.json lacks block_out_channels, so its class's default was taken, and the "
            "model cannot be built (ValueError: Must provide the same number of `block_out_channels`")
    else:
        assert str(err.value).endswith("([77, 32] in the weights, [77, 512] by the config) (text_encoder/config.json "
                                       "lacks hidden_size: its class's default 512 was taken)")


def test_a_plain_file_beside_the_shards_the_index_names_is_said_not_loaded(tmp_path, tiny_model_dir):
    """from_pretrained reads the shards an index names over a plain file beside them (a re-save with max_shard_size
    into the folder of an earlier save): the note names the plain file, and says why, without calling it a variant."""
    from diffusers import UNet2DConditionModel

    from audit.models.base import unloaded_weights_note

    model = _copy(tiny_model_dir, tmp_path / "both")
    UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").save_pretrained(model / "unet", max_shard_size="50KB")
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert unloaded_weights_note(str(model), model, ("tokenizer", "text_encoder", "unet", "scheduler")) == (
        f"--model {model}: not loaded: unet/diffusion_pytorch_model.safetensors: each component is scored with the "
        "weights from_pretrained reads without variant= (its plain file, or the shards its .index.json names), never a "
        "variant such as fp16 nor a file beside the shards (save the pipeline again without variant= to score a "
        "variant)")


def test_a_unet_config_without_attention_head_dim_is_said(tmp_path, tiny_model_dir):
    """unet/config.json without attention_head_dim (the tiny UNet has 2 and 4 heads): diffusers took its default, 8
    heads, the weights loaded (no shape depends on it) and the run scored another computation than the trained one,
    in silence. The risks differ from the complete config's; the run now warns, naming the key."""
    import json

    import audit

    model = _copy(tiny_model_dir, tmp_path / "heads")
    config_file = model / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    del config["attention_head_dim"]
    config_file.write_text(json.dumps(config))
    lines: list[str] = []
    got = audit.score(PROMPTS, model=str(model), log=lines.append)["risk"].to_list()
    assert got != audit.score(PROMPTS, model=str(tiny_model_dir))["risk"].to_list()  # what the warning is for
    assert [line for line in lines if "lacks" in line] == [
        f"memaudit: warning: --model {model}: unet/config.json lacks attention_head_dim, which every diffusers save "
        "writes: the UNet is built with the class's default for it, which may not be how it was trained (the number of "
        "attention heads, a norm's epsilon); restore it from the training run's config"]
