"""Findings of a new user's pre-release screening of their own SD 1.x-family model (build it from configs, score
captions and prompts, eval, calibrate, report, generate, mitigate), each pinned by a test that failed before its fix.

* A model folder whose weights do not match their config (a half-saved ``unet/`` missing a tensor, a text encoder
  config with fewer layers than its weights) loaded and scored: diffusers and transformers fill a missing tensor
  with random values and drop an extra one, saying so only in a log line memaudit silences. A shape mismatch in
  the text encoder said "look at the above report", which was never shown.
* Another model's tokenizer (more tokens than the text encoder embeds) loaded, then every prompt failed with
  ``IndexError: index out of range in self``.
* ``memaudit generate`` loaded a VAE with a missing tensor (random decoder weights), printed diffusers' 25-line
  ``clip_sample`` FutureWarning for a scheduler config without ``clip_sample`` (a PNDM config as diffusers saves
  it), and applied a float32 calibration to a bfloat16 generation (``memaudit run`` refuses that).
* A run whose every row had non-finite attention ended its message "the first: nonfinite_attention: ." (an empty
  detail); ``memaudit eval`` on a CSV naming the label column twice said only pyarrow's "Field ... exists 2 times".
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

UNET_KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _drop_tensor(weights: Path, key: str) -> None:
    tensors = load_file(weights)
    assert key in tensors  # the edit below means something only if the key was there
    del tensors[key]
    save_file(tensors, weights)


def _run(args):
    from audit.cli import app

    res = CliRunner().invoke(app, args)
    return res, [ln for ln in res.output.splitlines() if ln.strip()]


def test_half_saved_unet_is_refused_in_one_line_before_scoring(tiny_model_dir, tmp_path):
    model = _copy(tiny_model_dir, tmp_path / "model")
    _drop_tensor(model / "unet" / "diffusion_pytorch_model.safetensors", UNET_KEY)
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    res, lines = _run(["run", str(src), "--model", str(model), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert f"unet/ weights lack 1 tensor(s) that unet/config.json describes, the first {UNET_KEY}" in lines[0]
    assert not (tmp_path / "out" / "risk.parquet").exists()


def test_text_encoder_config_wider_than_its_weights_names_the_first_tensor(tiny_model_dir, tmp_path):
    from audit.errors import ModelError
    from audit.models import load_model

    model = _copy(tiny_model_dir, tmp_path / "model")
    cfg = json.loads((model / "text_encoder" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (32, 64, 2)
    _edit_config(model / "text_encoder" / "config.json", hidden_size=64)
    with pytest.raises(ModelError) as err:
        load_model(str(model), "cpu", "float32")
    # hidden 32 -> 64: both embeddings; per layer q/k/v/out weights and biases (8), two layer norms (4), fc1's
    # weight, fc2's weight and bias (fc1's bias is intermediate-sized, 64 either way): 15 x 2 layers; final norm 2
    assert ("text_encoder/ weights do not match text_encoder/config.json: 34 tensor(s) differ in shape, the first "
            "embeddings.position_embedding.weight ([77, 32] in the weights, [77, 64] by the config)") in str(err.value)
    assert "above report" not in str(err.value)


def test_text_encoder_config_with_fewer_layers_than_its_weights_is_refused(tiny_model_dir, tmp_path):
    from audit.errors import ModelError
    from audit.models import load_model

    model = _copy(tiny_model_dir, tmp_path / "model")
    _edit_config(model / "text_encoder" / "config.json", num_hidden_layers=1)
    with pytest.raises(ModelError) as err:
        load_model(str(model), "cpu", "float32")
    # layer 1's tensors: q/k/v/out weight and bias (8), layer_norm1/2 weight and bias (4), fc1/fc2 weight and bias (4)
    assert ("text_encoder/ weights hold 16 tensor(s) that text_encoder/config.json does not describe, the first "
            "encoder.layers.1.layer_norm1.bias") in str(err.value)


def test_unet_config_of_another_width_is_one_short_line(tiny_model_dir, tmp_path):
    from audit.errors import ModelError
    from audit.models import load_model

    model = _copy(tiny_model_dir, tmp_path / "model")
    _edit_config(model / "unet" / "config.json", cross_attention_dim=64)
    with pytest.raises(ModelError) as err:
        load_model(str(model), "cpu", "float32")
    msg = str(err.value)
    # diffusers' own message listed all 14 attn2 key/value projections (7 layers x 2), 3,000 characters on one line
    first = f"the first {UNET_KEY} ([16, 32] in the weights, [16, 64] by the config)"
    assert f"14 tensor(s) differ in shape, {first}" in msg
    assert "\n" not in msg and len(msg) < 400


def test_another_models_tokenizer_is_refused_at_load(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from audit.errors import ModelError
    from audit.lab import LAB_MODEL_DIR
    from audit.models import load_model

    model = _copy(tiny_model_dir, tmp_path / "model")
    shutil.rmtree(model / "tokenizer")
    shutil.copytree(LAB_MODEL_DIR / "tokenizer", model / "tokenizer")
    tokens = len(AutoTokenizer.from_pretrained(model / "tokenizer"))
    embedded = json.loads((model / "text_encoder" / "config.json").read_text())["vocab_size"]
    assert tokens > embedded
    with pytest.raises(ModelError) as err:
        load_model(str(model), "cpu", "float32")
    assert f"tokenizer/ has {tokens:,} tokens but text_encoder/ embeds only {embedded:,}" in str(err.value)


def test_generate_refuses_a_vae_missing_a_tensor(gen_pipeline, tmp_path):
    from audit.cli.generate import build_pipeline
    from audit.errors import ModelError

    model = _copy(gen_pipeline[0], tmp_path / "model")
    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    key = sorted(k for k in load_file(vae) if k.startswith("decoder."))[0]
    _drop_tensor(vae, key)
    with pytest.raises(ModelError) as err:
        build_pipeline(str(model), device="cpu", dtype="float32")
    assert f"vae/ weights lack 1 tensor(s) that vae/config.json describes, the first {key}" in str(err.value)


def test_generate_with_a_pndm_config_prints_no_clip_sample_warning(gen_pipeline, tmp_path):
    from audit.cli.generate import build_pipeline

    model = _copy(gen_pipeline[0], tmp_path / "model")
    sched = model / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    cfg = {k: v for k, v in cfg.items() if k != "clip_sample"}  # as diffusers saves a PNDMScheduler
    cfg.update(_class_name="PNDMScheduler", skip_prk_steps=True)
    sched.write_text(json.dumps(cfg))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe, _ = build_pipeline(str(model), device="cpu", dtype="float32")
    assert not [w for w in seen if "clip_sample" in str(w.message)]
    assert pipe.scheduler.config.clip_sample is False  # what the pipeline made of it before, after its warning


def _calibration(path: Path, fingerprint: str, layers: list[str], dtype: str) -> Path:
    quantiles = [-1.0 + i / 1000 for i in range(1001)]
    path.write_text(json.dumps({
        "kind": "memaudit.calibration", "threshold": quantiles[990], "fpr": 0.01, "reference_quantiles": quantiles,
        "reference": {"size": 100}, "model": {"name": "tiny", "fingerprint": fingerprint},
        "score_config": {"scorer": "attention_entropy", "layers": layers, "noise_draws": 1, "seed": 0,
                         "num_inference_steps": 2, "dtype": dtype}}))
    return path


def test_generate_refuses_a_calibration_scored_in_another_dtype(gen_pipeline, tmp_path):
    import polars as pl

    from audit.cli.generate import build_pipeline, run_generate
    from audit.errors import MitigationError

    model_dir = gen_pipeline[0]
    pipe, loaded = build_pipeline(str(model_dir), device="cpu", dtype="bfloat16")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    kw = dict(mitigate="flagged", steps=2, dtype="bfloat16", progress=False, log=lambda *_: None,
              _pipeline=(pipe, loaded))
    f32 = _calibration(tmp_path / "f32.json", loaded.fingerprint, loaded.default_layers, "float32")
    with pytest.raises(MitigationError, match="was scored in float32; this generation runs in bfloat16"):
        run_generate(prompts, str(model_dir), tmp_path / "out32", calibration=f32, **kw)
    assert not (tmp_path / "out32" / "generations.parquet").exists()
    bf16 = _calibration(tmp_path / "bf16.json", loaded.fingerprint, loaded.default_layers, "bfloat16")
    run_generate(prompts, str(model_dir), tmp_path / "out16", calibration=bf16, **kw)
    # every entropy is >= 0 > the threshold -0.01: the image is flagged and mitigated
    assert pl.read_parquet(tmp_path / "out16" / "generations.parquet")["flagged"].to_list() == [True]


def test_nonfinite_attention_failure_message_has_no_empty_detail(tmp_path):
    """A model with NaN attention weights rejected every row as nonfinite_attention, whose detail is null: the
    message ended "the first: nonfinite_attention: . The outputs ..."."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audit.config import RunConfig
    from audit.gates import error_gate

    rejects = tmp_path / "rejects.parquet"
    pq.write_table(pa.table({"reason": ["nonfinite_attention", "scoring_error"],
                             "detail": pa.array([None, "IndexError: boom"], pa.string())}), rejects)
    manifest = {"counts": {"rows_read": 3, "scored": 1,
                           "rejected_by_reason": {"nonfinite_attention": 1, "scoring_error": 1}}}
    assert error_gate(RunConfig(inputs=("x.txt",)), tmp_path, manifest) == (
        "2 of 3 rows (66.7%) could not be scored (nonfinite_attention 1, scoring_error 1), more than "
        f"--max-error-fraction 0.01; the first: nonfinite_attention. The outputs in {tmp_path} hold what was scored.")
    pq.write_table(pa.table({"reason": ["scoring_error"], "detail": ["IndexError: boom"]}), rejects)
    manifest["counts"]["rejected_by_reason"] = {"scoring_error": 2}
    assert "; the first: scoring_error: IndexError: boom. The outputs" in error_gate(
        RunConfig(inputs=("x.txt",)), tmp_path, manifest)


def test_eval_refuses_a_label_column_named_twice_naming_the_file(tmp_path):
    from audit.errors import RunError
    from audit.evaluate import read_labelled

    labels = tmp_path / "labels.csv"
    labels.write_text("prompt,memorized,memorized\na red cat,true,false\na blue dog,false,true\n")
    with pytest.raises(RunError) as err:
        read_labelled(labels)
    assert str(err.value) == (f"{labels}: the header names column 'memorized' 2 times: which one holds the prompts "
                              "or labels is ambiguous")
