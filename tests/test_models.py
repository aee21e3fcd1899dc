"""Model families: the adapter is picked from model_index.json, an unsupported pipeline class is named, and
the identity is read without loading weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from audit.errors import ModelError
from audit.models import FAMILIES, SD1, detect_family, read_identity


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


def test_identity_is_read_without_loading_weights(tiny_model_dir, tiny_model):
    code = (f"import sys; from audit.models import read_identity; i = read_identity({str(tiny_model_dir)!r}); "
            "print(i.fingerprint, i.family, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [tiny_model.fingerprint, "sd1", "False"]


def test_what_the_ray_driver_reads_without_weights_matches_the_loaded_model(tiny_model_dir, tiny_model, scorer):
    ident = read_identity(str(tiny_model_dir))
    assert ident.adapter.default_layers_from_config(ident.path, ident.extra) == tiny_model.default_layers
    assert int(ident.adapter.scheduler(ident.scheduler_config, 50).timesteps[0]) == scorer.first_timestep
