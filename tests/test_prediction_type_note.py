"""A model folder whose scheduler config misspells ``prediction_type`` (``v-prediction``): attention_entropy, which
reads only the first step's cross-attention probabilities, scores it, and the run now says the folder is suspect
(it was scored in silence, and the same folder then failed in ``memaudit generate``)."""

from __future__ import annotations

import json
import shutil

from audit.config import RunConfig


def _misspelled(tiny_model_dir, root, prediction_type="v-prediction"):
    """A copy of the tiny model whose scheduler config names ``prediction_type``."""
    shutil.copytree(tiny_model_dir, root)
    path = root / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"prediction_type": prediction_type}))
    return root


def _execute(inputs, model, out):
    from audit.runner import execute

    lines: list[str] = []
    cfg = RunConfig(inputs=tuple(str(i) for i in inputs), model=str(model), out=str(out), device="cpu")
    return execute(cfg, progress=False, log=lines.append)[1], lines


NOTE = ("memaudit: warning: the model's scheduler config names prediction_type 'v-prediction', none of epsilon, "
        "v_prediction, sample: --scorer attention_entropy reads cross-attention only and scores it, but check the "
        "spelling in scheduler/scheduler_config.json (a sampler refuses it: memaudit generate, mitigation)")


def test_a_misspelled_prediction_type_is_scored_with_one_warning(tmp_path, tiny_model_dir):
    """The run scores its 3 prompts and logs the note once; its finished rerun answers without it (nothing to
    score); the tiny model as saved (epsilon) gets no note."""
    model = _misspelled(tiny_model_dir, tmp_path / "m")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\nan old tower\n")
    manifest, lines = _execute([prompts], model, tmp_path / "out")
    assert manifest["counts"]["scored"] == 3
    assert [line for line in lines if "prediction_type" in line] == [NOTE]
    _, lines = _execute([prompts], model, tmp_path / "out")
    assert not [line for line in lines if "prediction_type" in line]
    _, lines = _execute([prompts], tiny_model_dir, tmp_path / "out2")
    assert not [line for line in lines if "prediction_type" in line]


def test_the_ray_driver_warns_from_the_config_files(tmp_path, tiny_model_dir):
    """The driver of an engine whose workers load the model reads the identity without weights and warns alike;
    v_prediction and a flow-matching family's own flow_velocity are no notes."""
    from audit.engines import get_engine
    from audit.runner import _identity_info
    from audit.scorers.base import prediction_type_note

    model = _misspelled(tiny_model_dir, tmp_path / "m")
    lines: list[str] = []
    cfg = RunConfig(inputs=("x",), model=str(model), device="cpu", dtype="float32")
    _identity_info(cfg, str(model), get_engine("ray"), lines.append)
    assert lines == [NOTE]
    assert [prediction_type_note(t, "attention_entropy") for t in ("epsilon", "v_prediction", "sample",
                                                                     "flow_velocity")] == [None] * 4
