"""Findings of a security review of "untrusted input stays inert" (weights from safetensors only, no code from a model
folder, untrusted text escaped wherever it is rendered), each pinned by a test that failed before its fix.

* A model folder whose ``tokenizer/tokenizer_config.json`` names its own tokenizer class through ``auto_map`` (with
  the ``.py`` file beside it) made transformers ask on stdin "Do you wish to run the custom code? [y/N]"; answering
  ``y`` (or a ``yes |`` pipe in a script) ran the folder's code and the run went on, exit 0. memaudit now refuses
  any ``auto_map`` or custom component class in one line before loading, and loads tokenizers with
  ``trust_remote_code=False``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner


def _run(args, **kw):
    from audit.cli import app

    res = CliRunner().invoke(app, args, **kw)
    return res, [ln for ln in res.output.splitlines() if ln.strip()]


def _edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _remote_code_folder(tiny_model_dir: Path, dst: Path, marker: Path) -> Path:
    """A copy of the tiny model whose tokenizer names a class of its own, defined in the folder: loading it runs
    ``evil_tok.py``, which writes ``marker``."""
    model = Path(shutil.copytree(tiny_model_dir, dst))
    _edit_json(model / "tokenizer" / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
               auto_map={"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]})
    (model / "tokenizer" / "evil_tok.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import CLIPTokenizerFast\n\n\nclass EvilTokenizer(CLIPTokenizerFast):\n    pass\n")
    return model


def test_tokenizer_auto_map_is_refused_and_its_code_never_runs(tiny_model_dir, tmp_path):
    marker = tmp_path / "PWNED"
    model = _remote_code_folder(tiny_model_dir, tmp_path / "model", marker)
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    # "y" on stdin: what transformers' question would have taken as consent to run the folder's code
    res, lines = _run(["run", str(src), "--model", str(model), "--out", str(tmp_path / "out"), "--no-progress"],
                      input="y\n")
    assert res.exit_code == 2, res.output
    assert not marker.exists()
    assert lines == [f"memaudit: error: --model {model}: tokenizer/tokenizer_config.json names code of its own "
                     '(auto_map {"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]}): memaudit '
                     "never runs code from a model folder (no trust_remote_code); use a folder whose components are "
                     "diffusers and transformers classes"]
    assert not (tmp_path / "out" / "risk.parquet").exists()


def test_tokenizer_loader_never_runs_folder_code_even_if_asked(tiny_model_dir, tmp_path, monkeypatch):
    """The loader itself (behind the folder check) passes trust_remote_code=False: transformers neither asks nor runs."""
    from audit.models.base import load_tokenizer

    marker = tmp_path / "PWNED"
    model = _remote_code_folder(tiny_model_dir, tmp_path / "model", marker)
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")
    with pytest.raises(ValueError, match="custom code"):
        load_tokenizer(model, "tokenizer")
    assert asked == [] and not marker.exists()


@pytest.mark.parametrize("where", ["text_encoder/config.json", "unet/config.json", "model_index.json"])
def test_auto_map_in_any_config_is_refused(tiny_model_dir, tmp_path, where):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    _edit_json(model / where, auto_map={"AutoModel": "custom.Model"})
    res, lines = _run(["layers", "--model", str(model)])
    assert res.exit_code == 2
    assert lines == [f"memaudit: error: --model {model}: {where} names code of its own (auto_map "
                     '{"AutoModel": "custom.Model"}): memaudit never runs code from a model folder (no '
                     "trust_remote_code); use a folder whose components are diffusers and transformers classes"]


def test_model_index_naming_a_custom_unet_class_is_refused(tiny_model_dir, tmp_path):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    _edit_json(model / "model_index.json", unet=["my_unet", "MyUNet"])
    (model / "unet" / "my_unet.py").write_text("raise SystemExit('folder code ran')\n")
    res, lines = _run(["layers", "--model", str(model)])
    assert res.exit_code == 2
    assert lines == [f'memaudit: error: --model {model}: model_index.json names unet as ["my_unet", "MyUNet"], a '
                     "class from the folder's own code: memaudit loads unet with diffusers or transformers classes "
                     "only and never runs code from a model folder"]


def test_model_index_of_a_hub_sd_folder_still_loads(tiny_model_dir, tmp_path):
    """SD v1.4's model_index.json names its safety checker from the diffusers module ``stable_diffusion`` and a
    null feature extractor: components memaudit does not load, so they are not refused."""
    from audit.models import read_identity

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    _edit_json(model / "model_index.json", safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
               feature_extractor=[None, None], requires_safety_checker=True)
    assert read_identity(str(model)).pipeline_class == "StableDiffusionPipeline"


def test_tokenizer_without_vocabulary_is_refused(tiny_model_dir, tmp_path):
    """A tokenizer folder whose tokenizer.json is missing loaded as a 2-token tokenizer: every prompt scored as a row
    of unknown tokens (trigger tokens all <|endoftext|>), exit 0."""
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    (model / "tokenizer" / "tokenizer.json").unlink()
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    res, lines = _run(["run", str(src), "--model", str(model), "--out", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert lines == [f"memaudit: error: --model {model}: tokenizer/ holds no vocabulary, only its 2 special token(s) "
                     "(its tokenizer.json, or vocab.json and merges.txt, missing or empty): every prompt would be read "
                     "as unknown tokens"]
