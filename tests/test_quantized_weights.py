"""A quantized checkpoint (weights stored as integers) is refused before it loads: transformers cast an int8
text-encoder weight to float and scored with it (exit 0, scores of a model that does not exist); diffusers failed
with "Only Tensors of floating point and complex dtype can require gradients". Integer buffers that are not
weights (an old CLIP checkpoint's int64 ``position_ids``) stay allowed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from audit.errors import ModelError

TE_KEY_PART = "layers.0.self_attn.q_proj.weight"
UNET_KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def _quantize(weights: Path, key_part: str, dtype=torch.int8) -> str:
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith(key_part))
    tensors[key] = (tensors[key] * 100).round().to(dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    return key


def _run(src, model, out):
    from audit.cli import app

    res = CliRunner().invoke(app, ["run", str(src), "--model", str(model), "--out", str(out), "--device", "cpu",
                                   "--no-progress"])
    return res, [ln for ln in res.output.splitlines() if ln.strip()]


@pytest.mark.parametrize("component, part, dtype, code", [("text_encoder", TE_KEY_PART, torch.int8, "I8"),
                                                          ("unet", UNET_KEY, torch.uint8, "U8")])
def test_an_integer_weight_is_refused_in_one_line(tiny_model_dir, tmp_path, component, part, dtype, code):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    weights = next((model / component).glob("*.safetensors"))
    key = _quantize(weights, part, dtype)
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    res, lines = _run(src, model, tmp_path / "out")
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0] == (f"memaudit: error: --model {model}: {component}/ stores 1 weight tensor(s) as integers, the "
                        f"first {key} ({code}): a quantized checkpoint, which would be scored as if its integers were "
                        "the weights; memaudit scores float32, float16 or bfloat16 weights: dequantize it first")
    assert not (tmp_path / "out" / "risk.parquet").exists()


def test_the_shards_an_index_names_are_read_and_an_integer_buffer_is_not_a_weight(tiny_model_dir, tmp_path):
    from audit.models.base import check_float_weights

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    unet = model / "unet"
    tensors = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(tensors)
    half = len(keys) // 2
    names = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:half],
             "diffusion_pytorch_model-00002-of-00002.safetensors": keys[half:]}
    for fname, ks in names.items():
        save_file({k: tensors[k] for k in ks}, unet / fname, metadata={"format": "pt"})
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in names.items() for k in ks}}))
    check_float_weights("m", unet, "unet")  # all float: accepted
    last = names["diffusion_pytorch_model-00002-of-00002.safetensors"]
    shard = {k: tensors[k] for k in last}
    shard["position_ids"] = torch.arange(4)  # an int64 buffer, not a weight
    save_file(shard, unet / "diffusion_pytorch_model-00002-of-00002.safetensors", metadata={"format": "pt"})
    check_float_weights("m", unet, "unet")
    bias = next(k for k in last if k.endswith(".bias"))
    shard[bias] = shard[bias].to(torch.int32)
    shard[last[-1] if last[-1] != bias else last[-2]] = torch.zeros(1, dtype=torch.bool)
    save_file(shard, unet / "diffusion_pytorch_model-00002-of-00002.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"unet/ stores 2 weight tensor\(s\) as integers, the first "):
        check_float_weights("m", unet, "unet")
    # a variant file beside the main one is not what from_pretrained reads without a variant
    (unet / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    with pytest.raises(ModelError):
        check_float_weights("m", unet, "unet")
