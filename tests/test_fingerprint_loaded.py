"""The model fingerprint covers the weight files the load reads, not a variant lying beside them: adding or removing
`unet/diffusion_pytorch_model.fp16.safetensors` (which `from_pretrained` without `variant=` never reads) changed the
fingerprint, so the cache and every calibration refused a folder whose scores had not changed."""

import json
import shutil

from typer.testing import CliRunner

from audit.cli import app
from audit.models.base import earlier_fingerprint_note, fingerprint_files, model_notes, unloaded_files


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_variant_beside_the_weights_leaves_the_fingerprint_as_it_was(tmp_path, tiny_model_dir):
    root = _copy(tiny_model_dir, tmp_path / "m")
    plain = fingerprint_files(root)
    # a folder without unread files: the fingerprint every earlier run and calibration of it recorded, bit for bit
    assert plain == fingerprint_files(root, loaded_only=False)
    unet = root / "unet"
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.fp16.safetensors")
    (unet / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(json.dumps(
        {"weight_map": {"conv_in.weight": "diffusion_pytorch_model.fp16-00001-of-00001.safetensors"}}))
    assert [p.name for p in unloaded_files(unet)] == ["diffusion_pytorch_model.fp16.safetensors",
                                                      "diffusion_pytorch_model.safetensors.index.fp16.json"]
    assert fingerprint_files(root) == plain
    # the rule before: every file hashed; a run or calibration of it recorded that, and is told it is the same model
    before = fingerprint_files(root, loaded_only=False)
    assert before != plain
    assert earlier_fingerprint_note(root, before).endswith(
        "or left out weight files the load does not read (a fp16 variant beside the weights)")
    # the same rule warns of both files as not loaded
    (note,) = [n for n in model_notes("m", root, ("unet",), config_keys=False) if "not loaded" in n]
    assert ("not loaded: unet/diffusion_pytorch_model.fp16.safetensors, "
            "unet/diffusion_pytorch_model.safetensors.index.fp16.json: ") in note
    # the weights themselves still count: changing the plain file changes the fingerprint
    data = bytearray((unet / "diffusion_pytorch_model.safetensors").read_bytes())
    data[-1] ^= 1
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(bytes(data))
    assert fingerprint_files(root) != plain


def test_a_folder_with_only_a_variant_is_hashed_whole_as_before(tmp_path, tiny_model_dir):
    """No plain weights (the load refuses the folder, naming the variant): nothing is left out."""
    root = _copy(tiny_model_dir, tmp_path / "m")
    unet = root / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    assert unloaded_files(unet) == []
    assert fingerprint_files(root) == fingerprint_files(root, loaded_only=False)


def test_a_calibration_made_before_a_variant_was_added_still_applies(tmp_path, tiny_model_dir):
    root = _copy(tiny_model_dir, tmp_path / "m")
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a photo of thing number {i}\n" for i in range(12)))
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(prompts), "--model", str(root), "--out", str(tmp_path / "ref"),
                              "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["calibrate", str(tmp_path / "ref"), "--fpr", "0.1", "-o", str(tmp_path / "cal.json")])
    assert res.exit_code == 0, res.output
    unet = root / "unet"
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.fp16.safetensors")
    res = runner.invoke(app, ["run", str(prompts), "--model", str(root), "--out", str(tmp_path / "night"),
                              "--device", "cpu", "--no-progress", "--calibration", str(tmp_path / "cal.json")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "night" / "manifest.json").read_text())
    reference = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert manifest["model"]["fingerprint"] == reference["model"]["fingerprint"]
