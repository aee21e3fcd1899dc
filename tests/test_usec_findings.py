"""Findings of a security review of "untrusted input stays inert" (weights from safetensors only, no code from a model
folder, untrusted text escaped wherever it is rendered), each pinned by a test that failed before its fix.

* A model folder whose ``tokenizer/tokenizer_config.json`` names its own tokenizer class through ``auto_map`` (with
  the ``.py`` file beside it) made transformers ask on stdin "Do you wish to run the custom code? [y/N]"; answering
  ``y`` (or a ``yes |`` pipe in a script) ran the folder's code and the run went on, exit 0. memaudit now refuses
  any ``auto_map`` or custom component class in one line before loading, and loads tokenizers with
  ``trust_remote_code=False``.
* Other model-folder content that loaded and then failed (or scored garbage): a tokenizer without its vocabulary,
  a ``model_max_length`` past the CLIP encoder's positions, a safetensors header that lies (said with no reason).
* Terminal escapes from a model folder's name (calibrate, eval, generate), from file names in generate's --out, and
  rich markup from a hand-edited manifest in the report's caption.
* Hand-edited manifest.json / run.json / model configs / cache key.json with odd types or past the JSON parser's
  limits: exit 1 with a Python error (or a unit failing 3 times) instead of one line.
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


# ---------------------------------------------------------------- terminal escapes from a model folder's name

OSC_TITLE = "\x1b]0;PWN\x07"  # a terminal title change; in a folder name it reaches every line naming the model


@pytest.fixture(scope="module")
def escape_run(tiny_model_dir, tmp_path_factory):
    """A finished run of the tiny model given through a folder whose name holds an OSC sequence (a link to it)."""
    from helpers import prompts_file, run_audit

    tmp = tmp_path_factory.mktemp("esc")
    model = tmp / f"model{OSC_TITLE}"
    model.symlink_to(tiny_model_dir, target_is_directory=True)
    out, _ = run_audit([prompts_file(tmp / "p.txt", 30)], model, tmp / "run", device="cpu", dtype="float32")
    return model, out


def test_calibrate_escapes_the_model_name_it_prints(escape_run, tmp_path):
    model, run = escape_run
    res, lines = _run(["calibrate", str(run), "--fpr", "0.1", "-o", str(tmp_path / "cal.json")])
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\x07" not in res.output
    line = next(ln for ln in lines if ln.startswith("memaudit: threshold"))
    assert f"model {str(model).replace(OSC_TITLE, chr(92) + 'x1b]0;PWN' + chr(92) + 'x07')} [" in line


def test_eval_escapes_the_model_name_in_its_table(escape_run, tmp_path):
    import polars as pl

    model, _ = escape_run
    table = tmp_path / "labelled.parquet"
    pl.DataFrame({"prompt": [f"a red cat {i}" for i in range(6)] + [f"blue dog {i}" for i in range(6)],
                  "memorized": [True] * 6 + [False] * 6}).write_parquet(table)
    res, lines = _run(["eval", str(table), "--model", str(model), "--bootstrap", "10", "--device", "cpu",
                       "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\x07" not in res.output
    assert any(ln.startswith(f"model {model.parent}/model\\x1b]0;PWN\\x07 [") for ln in lines), lines


def test_generate_escapes_its_one_line_error(escape_run, tmp_path):
    model, _ = escape_run  # the tiny model has no VAE: generate refuses it, naming --model
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    res, lines = _run(["generate", str(src), "--model", str(model), "--out", str(tmp_path / "gen")])
    assert res.exit_code == 2, res.output
    assert "\x1b" not in res.output and "\x07" not in res.output
    assert lines[-1].startswith(f"memaudit: error: --model {model.parent}/model\\x1b]0;PWN\\x07")


def test_report_caption_from_the_manifest_is_not_rich_markup(escape_run, tmp_path):
    """A two-stage run's note under the top table names the manifest's confirm.unique_prompts_confirmed; it went to
    rich as markup, so a hand-edited manifest made a hyperlink (OSC 8) and wrote raw escapes (OSC 52: the clipboard)."""
    import io

    from rich.console import Console

    from audit.report import build_report, render_terminal

    _, run = escape_run
    edited = Path(shutil.copytree(run, tmp_path / "run"))
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["confirm"] = {"scorer": "attention_entropy",
                           "unique_prompts_confirmed": "[link=https://evil.example]here[/link]\x1b]52;c;cHduZWQ=\x07"}
    (edited / "manifest.json").write_text(json.dumps(manifest))
    r = build_report(edited)
    assert r.confirm_column is not None  # the caption is shown
    buf = io.StringIO()
    render_terminal(r, Console(file=buf, force_terminal=True, width=200, color_system="standard"))
    out = buf.getvalue()
    assert "\x1b]8;" not in out and "\x1b]52" not in out and "\x07" not in out
    assert "[link=https://evil.example]here[/link]\\x1b]52;c;cHduZWQ=\\x07" in out


def test_generate_note_on_other_files_in_out_is_escaped(tiny_model_dir, tmp_path):
    """`memaudit generate` names the other entries of its --out folder in a note, printed raw: a file named with an
    OSC sequence there retitled the terminal."""
    out = tmp_path / "gen"
    out.mkdir()
    (out / f"x{OSC_TITLE}").write_text("")
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    res, lines = _run(["generate", str(src), "--model", str(tiny_model_dir), "--out", str(out)])
    assert "\x1b" not in res.output and "\x07" not in res.output
    assert lines[0] == (f"memaudit: note: --out {out} also holds 1 other entry (x\\x1b]0;PWN\\x07); the images and "
                        "tables go beside them")


# ---------------------------------------------------------------- hand-edited manifest.json: odd types

@pytest.mark.parametrize("key, value, said", [
    ("skipped_files", ["x.parquet"], "skipped_files holds an entry that is not an object"),
    ("calibration", {"threshold": 4.3, "fpr": "1%"}, "calibration.fpr '1%' is not a number between 0 and 1"),
    ("confirm", ["noise_magnitude"], "confirm is a list, not an object"),
    ("cache", "runs/cache", "cache is a str, not an object"),
    ("cache", {"dir": "runs/cache"}, "cache.hits None is not a whole number"),
])
def test_report_of_a_manifest_with_odd_types_says_so_in_one_line(escape_run, tmp_path, key, value, said):
    """Each of these made `memaudit report` fail with exit 1 and a Python error (AttributeError: 'str' object has
    no attribute 'get', ValueError: Unknown format code 'g', TypeError: string indices must be integers, or just
    'memaudit: error: hits'). (A calibration without fpr is read, below.)"""
    _, run = escape_run
    edited = Path(shutil.copytree(run, tmp_path / "run"))
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest[key] = value
    (edited / "manifest.json").write_text(json.dumps(manifest))
    for fmt in ("terminal", "md", "html"):
        res, lines = _run(["report", str(edited), "--format", fmt])
        assert res.exit_code == 2, res.output
        assert lines[-1] == f"memaudit: error: {edited / 'manifest.json'}: {said}: not an intact memaudit run"


def test_report_of_a_manifest_with_a_null_score_config(escape_run, tmp_path):
    _, run = escape_run
    edited = Path(shutil.copytree(run, tmp_path / "run"))
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["score_config"] = None
    (edited / "manifest.json").write_text(json.dumps(manifest))
    res, lines = _run(["report", str(edited), "--format", "md"])
    assert res.exit_code == 0, res.output
    text = (edited / "report.md").read_text()
    assert "scorer None, noise draws None (mt19937), seed None, layers " in text


# ---------------------------------------------------------------- JSON that Python's json refuses past its limits

def _huge_int(text: str) -> str:
    """``text`` (a JSON object) with one more key holding an integer of 5,000 digits."""
    return text.rstrip().removesuffix("}") + ', "x": ' + "9" * 5000 + "}"


def _deep(text: str) -> str:
    return text.rstrip().removesuffix("}") + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"


@pytest.mark.parametrize("edit, why", [(_huge_int, "ValueError: Exceeds the limit (4300 digits)"),
                                       (_deep, "RecursionError: maximum recursion depth exceeded")])
def test_manifest_past_json_limits_is_a_one_line_error(escape_run, tmp_path, edit, why):
    """An integer of 5,000 digits or arrays nested 100,000 deep in manifest.json: exit 1 and a Python error."""
    _, run = escape_run
    edited = Path(shutil.copytree(run, tmp_path / "run"))
    path = edited / "manifest.json"
    path.write_text(edit(path.read_text()))
    res, lines = _run(["report", str(edited), "--format", "md"])
    assert res.exit_code == 2, res.output
    assert lines[-1].startswith(f"memaudit: error: {path} is not valid JSON ({why}")
    assert lines[-1].endswith("): not an intact memaudit run")


@pytest.mark.parametrize("edit, why", [(_huge_int, "Exceeds the limit (4300 digits)"),
                                       (_deep, "maximum recursion depth exceeded")])
def test_model_config_past_json_limits_is_a_one_line_error(tiny_model_dir, tmp_path, edit, why):
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    path = model / "model_index.json"
    path.write_text(edit(path.read_text()))
    res, lines = _run(["layers", "--model", str(model)])
    assert res.exit_code == 2, res.output
    assert lines[-1].startswith(f"memaudit: error: {path}: not a valid JSON file ({why}")


def test_run_json_nested_too_deep_is_a_one_line_error(escape_run, tmp_path):
    """(An integer past the limit was already said: a ValueError; a RecursionError was exit 1.)"""
    edit, why = _deep, "RecursionError: maximum recursion depth exceeded"
    model, run = escape_run
    edited = Path(shutil.copytree(run, tmp_path / "run"))
    path = edited / "run.json"
    path.write_text(edit(path.read_text()))
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    res, lines = _run(["run", str(src), "--model", str(model), "--out", str(edited), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert lines[-1].startswith(f"memaudit: error: --out {edited}: its run.json is damaged ({why}")


# ---------------------------------------------------------------- safetensors headers that lie

def _lying_header(weights: Path, how: str) -> None:
    import struct

    raw = weights.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    if how == "size":  # the header says it is 2**62 bytes long
        weights.write_bytes(struct.pack("<Q", 2 ** 62) + raw[8:])
        return
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [0, 10 ** 15]  # a tensor a petabyte long, past the file's end
    body = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])


@pytest.mark.parametrize("how, why", [("size", "header too large"),
                                      ("offsets", "invalid shape, data type, or offset for tensor")])
def test_safetensors_header_that_lies_is_named_with_its_reason(tiny_model_dir, tmp_path, how, why):
    """It said only "cannot load (OSError: Unable to load weights from checkpoint file for 'P' at 'P'. )"."""
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    _lying_header(model / "unet" / "diffusion_pytorch_model.safetensors", how)
    res, lines = _run(["layers", "--model", str(model)])
    assert res.exit_code == 2
    assert lines == [f"memaudit: error: --model {model}: unet/diffusion_pytorch_model.safetensors is not a readable "
                     f"safetensors file (SafetensorError: Error while deserializing header: {why}): a damaged or "
                     "partial download, or another format under this name"]


def test_cache_key_nested_too_deep_is_damaged_not_a_failed_unit(tiny_model_dir, tmp_path):
    """A shared --cache folder whose key.json nests arrays 100,000 deep failed every unit 3 times with a RecursionError
    and stopped the run ("rerun the same command to resume": no rerun could); a key.json that is not JSON was
    already set aside with a warning. Now both are: the run scores without the cache."""
    from helpers import prompts_file

    src = prompts_file(tmp_path / "p.txt", 4)
    cache = tmp_path / "cache"
    res, _ = _run(["run", str(src), "--model", str(tiny_model_dir), "--cache", str(cache), "--out",
                   str(tmp_path / "r1"), "--no-progress", "--device", "cpu", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    (key,) = cache.glob("*/key.json")
    key.write_text("[" * 100_000 + "]" * 100_000)
    res, lines = _run(["run", str(src), "--model", str(tiny_model_dir), "--cache", str(cache), "--out",
                       str(tmp_path / "r2"), "--no-progress", "--device", "cpu", "--dtype", "float32"])
    assert res.exit_code == 0, res.output
    assert (f"memaudit: warning: score cache: {key} is damaged (not JSON): move {key.parent} aside or delete it, and "
            "the next run starts it anew; scoring without the cache") in lines
    manifest = json.loads((tmp_path / "r2" / "manifest.json").read_text())
    assert manifest["counts"]["scored"] == 4 and manifest["cache"]["hits"] == 0


@pytest.mark.parametrize("files, kind", [("x", "str"), (["p.txt"], "list")])
def test_run_json_whose_files_is_not_an_object_is_damaged(escape_run, tmp_path, files, kind):
    """A hand-edited run.json whose 'files' is not an object ended a rerun with exit 1 and "AttributeError: 'str'
    object has no attribute 'items'"."""
    model, run = escape_run
    edited = Path(shutil.copytree(run, tmp_path / "run"))
    ident = json.loads((edited / "run.json").read_text())
    ident["files"] = files
    (edited / "run.json").write_text(json.dumps(ident))
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    res, lines = _run(["run", str(src), "--model", str(model), "--out", str(edited), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert lines[-1] == (f"memaudit: error: --out {edited}: its run.json is damaged (ValueError: files is a {kind}, "
                         "not a JSON object); choose another --out, or delete the folder to start over")


@pytest.mark.parametrize("length", [1000000000000000019884624838656, 100, 0, -5])
def test_tokenizer_model_max_length_past_the_text_encoder_is_refused_before_scoring(tiny_model_dir, tmp_path, length):
    """transformers' 'no limit' value (1e30), more positions than CLIP's 77, 0 or a negative length in
    tokenizer_config.json: the model loaded and every prompt failed to score (scoring_error: "Maximum allowed
    dimension exceeded", "Sequence length must be less than max_position_embeddings", "could not broadcast",
    "negative dimensions"), exit 4, instead of a refusal before scoring."""
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    _edit_json(model / "tokenizer" / "tokenizer_config.json", model_max_length=length)
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    res, lines = _run(["run", str(src), "--model", str(model), "--out", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert lines == [f"memaudit: error: --model {model}: tokenizer/ pads prompts to model_max_length {length!r} tokens "
                     "but text_encoder/ takes 2 to 77 (max_position_embeddings): fix model_max_length in "
                     "tokenizer/tokenizer_config.json"]
    assert not (tmp_path / "out" / "risk.parquet").exists()


def test_report_of_a_calibration_without_fpr_says_it_is_unknown(escape_run, tmp_path):
    """finished_run reads a manifest whose calibration holds only its threshold; the report then failed with exit 1
    and "TypeError: unsupported format string passed to NoneType.__format__"."""
    _, run = escape_run
    edited = Path(shutil.copytree(run, tmp_path / "run"))
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["calibration"] = {"threshold": 4.3}
    (edited / "manifest.json").write_text(json.dumps(manifest))
    import pyarrow.parquet as pq  # the table names the same calibration, as a calibrated run's does (else: torn)

    table = pq.read_table(edited / "risk.parquet")
    meta = dict(table.schema.metadata) | {b"memaudit.calibration": json.dumps({"threshold": 4.3}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), edited / "risk.parquet")
    for fmt in ("terminal", "md", "html"):
        res, lines = _run(["report", str(edited), "--format", fmt])
        assert res.exit_code == 0, res.output
    text = (edited / "report.md").read_text()
    assert "Flag threshold: risk > 4.3 (calibrated at FPR unknown); bins reaching above it are marked `!`, " in text
