"""Model families: the adapter is picked from model_index.json, an unsupported pipeline class is named, and
the identity is read without loading weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from audit.errors import ModelError
from audit.models import FAMILIES, SD1, adapter_of, detect_family, read_identity


def test_sd1_is_the_first_family_and_loads_the_lab_model(tiny_model_dir, tiny_model):
    assert list(FAMILIES)[0] == "sd1"
    assert detect_family(tiny_model_dir) == (SD1, "StableDiffusionPipeline")
    assert tiny_model.adapter is SD1
    assert SD1.prediction_type(tiny_model) == tiny_model.scheduler_config.get("prediction_type", "epsilon")


def test_unsupported_pipeline_class_names_it_and_the_supported_ones(tmp_path, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "xl")
    index = json.loads((model / "model_index.json").read_text()) | {"_class_name": "KandinskyV22Pipeline"}
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"declares KandinskyV22Pipeline, which memaudit does not support; "
                                         r"supported: StableDiffusionPipeline \(sd1, sd2\)"):
        read_identity(str(model))


@pytest.mark.parametrize("name,text,message", [
    ("model_index.json", "{not json", "model_index.json: not a valid JSON file"),
    ("model_index.json", '["StableDiffusionPipeline"]', "model_index.json: holds a JSON list, not an object"),
    ("model_index.json", b"\xff\xfe{}", "model_index.json: not a valid JSON file"),
    ("memaudit.json", "{", "memaudit.json: not a valid JSON file"),
    ("scheduler/scheduler_config.json", "null", "scheduler_config.json: holds a JSON NoneType, not an object"),
])
def test_a_broken_json_file_of_the_model_folder_is_named(tmp_path, tiny_model_dir, name, text, message):
    """A model folder's JSON that does not parse (or is not an object) fails loading with a ModelError naming
    the file (it was a bare JSONDecodeError or AttributeError, naming nothing), and the CLI prints it in one
    line (exit 2)."""
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.models import load_model

    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    target = model / name
    target.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ModelError, match=message.replace(".", r"\.")) as err:
        load_model(str(model), device="cpu", dtype="float32")
    assert str(target) in str(err.value)
    (tmp_path / "p.txt").write_text("a red circle\n")
    res = CliRunner().invoke(app, ["run", str(tmp_path / "p.txt"), "--model", str(model), "--out",
                                   str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


def test_identity_is_read_without_loading_weights(tiny_model_dir, tiny_model):
    code = (f"import sys; from audit.models import read_identity; i = read_identity({str(tiny_model_dir)!r}); "
            "print(i.fingerprint, i.family, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [tiny_model.fingerprint, "sd1", "False"]


def test_what_the_ray_driver_reads_without_weights_matches_the_loaded_model(tiny_model_dir, tiny_model, scorer):
    ident = read_identity(str(tiny_model_dir))
    assert ident.adapter.default_layers_from_config(ident.path, ident.extra) == tiny_model.default_layers
    # and the cross-attention layers, which `run --dry-run` checks --layers against, are the loaded UNet's
    loaded = adapter_of(tiny_model).cross_attention_layers(tiny_model.unet)
    assert ident.adapter.layers_from_config(ident.path) == loaded
    assert int(ident.adapter.scheduler(ident.scheduler_config, 50).timesteps[0]) == scorer.first_timestep


@pytest.mark.parametrize("key, value, message", [
    ("num_train_timesteps", 10**10, "num_train_timesteps 10000000000 is not a whole number from 1 to 100,000"),
    ("num_train_timesteps", "abc", "num_train_timesteps 'abc' is not a whole number from 1 to 100,000"),
    ("num_train_timesteps", True, "num_train_timesteps True is not a whole number"),
    ("beta_schedule", "evil", "diffusers cannot build the scheduler from it (NotImplementedError: evil is not "
                              "implemented"),
    ("beta_start", "x", "diffusers cannot build the scheduler from it (TypeError"),
])
def test_odd_scheduler_config_values_are_one_line_model_errors(tmp_path, key, value, message):
    """A model folder's scheduler_config.json with num_train_timesteps 1e10 made diffusers allocate 40 GB of betas;
    "abc" printed a 6-line torch signature, an unknown beta_schedule a NotImplementedError: all exit 1. They are
    ModelErrors (one line, exit 2) before any weights load."""
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.lab import LAB_MODEL_DIR

    model = tmp_path / "m"
    shutil.copytree(LAB_MODEL_DIR, model)
    path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    (tmp_path / "p.txt").write_text("a red cat\n")
    res = CliRunner().invoke(app, ["run", str(tmp_path / "p.txt"), "--model", str(model), "--out",
                                   str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 2, res.output
    line = " ".join(res.output.split())
    assert f"memaudit: error: scheduler_config.json: {message}" in line
    if key == "num_train_timesteps":  # refused with the folder's identity, before any weights (or scheduler) load
        with pytest.raises(ModelError, match="num_train_timesteps"):
            detect_family(model)


def test_an_sd3_folder_with_a_huge_num_train_timesteps_is_refused_before_its_scheduler_is_built(tmp_path):
    """SD 3.x builds its flow-matching scheduler while the model loads: num_train_timesteps 1e9 took 42 s and
    20 GB there before the one-line error. It is refused with the folder's identity now."""
    from test_families import build_sd3

    from audit.models import load_model

    build_sd3(tmp_path / "sd3")
    path = tmp_path / "sd3" / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), num_train_timesteps=10**10)))
    with pytest.raises(ModelError, match="num_train_timesteps 10000000000 is not a whole number"):
        load_model(str(tmp_path / "sd3"), device="cpu", dtype="float32")
