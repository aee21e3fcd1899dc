"""The lab: deterministic data, the shipped model's conventions, the shipped labels, and measured AUROCs.

CPU only and fast: the evaluation of the shipped model scores a few hundred 16x16 prompts.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from audit.lab import LAB_MODEL_DIR, LAB_PROMPTS  # noqa: E402
from audit.lab.data import DataConfig, planted, render, sample_scenes, training_batch  # noqa: E402

# AUROC measured on the shipped model (docs/lab.md), per split; the test allows MARGIN below it
# (the evaluation is deterministic; the margin absorbs BLAS / platform differences only).
MARGIN = 0.02
MEASURED_AUROC = {  # docs/lab.md, "Measured figures"
    "validation": {"noise_magnitude": 0.998, "attention_entropy": 0.565},
    "test": {"noise_magnitude": 0.999, "attention_entropy": 0.465},
}


def test_data_is_a_pure_function_of_the_seed():
    cfg = DataConfig()
    a_img, a_cap, a_idx = training_batch(cfg, 17)
    b_img, b_cap, b_idx = training_batch(cfg, 17)
    c_img, _, _ = training_batch(cfg, 18)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and np.array_equal(a_idx, b_idx)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (cfg.batch_size, 3, 16, 16) and a_img.dtype == np.float32
    assert a_img.min() >= -1 and a_img.max() <= 1
    assert (a_idx[: cfg.planted_per_batch] >= 0).all() and (a_idx[cfg.planted_per_batch:] == -1).all()
    scenes, caps = planted(cfg)
    assert len(set(caps)) == cfg.n_planted
    assert np.array_equal(render(scenes), render(planted(cfg)[0]))


def test_render_draws_shapes_on_a_gradient():
    img = render(sample_scenes(np.random.default_rng(0), 8))
    assert img.shape == (8, 3, 16, 16)
    # every scene has at least two distinct colours per image (background gradient + shapes)
    assert all(len(np.unique(im.reshape(3, -1).T, axis=0)) > 2 for im in img)


@pytest.fixture(scope="module")
def lab_model():
    from audit.models import load_model

    return load_model(str(LAB_MODEL_DIR), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def lab_table():
    import polars as pl

    return pl.read_parquet(LAB_PROMPTS)


def test_shipped_model_has_sd_conventions(lab_model):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from audit.capture import cross_attention_layers

    m = lab_model
    assert isinstance(m.unet, UNet2DConditionModel) and isinstance(m.text_encoder, CLIPTextModel)
    tok = m.tokenizer
    ids = tok("a red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and m.max_length == 77
    assert ids[0] == tok.bos_token_id
    n = len(tok("a red circle").input_ids)
    assert ids[n - 1] == tok.eos_token_id and all(i == tok.pad_token_id for i in ids[n:])
    assert tok.pad_token_id == tok.eos_token_id
    assert m.default_layers and set(m.default_layers) <= set(cross_attention_layers(m.unet))
    assert m.scheduler_config["prediction_type"] == "v_prediction"
    assert m.scheduler_config["rescale_betas_zero_snr"] is True
    size = sum(p.stat().st_size for p in LAB_MODEL_DIR.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    assert not list(LAB_MODEL_DIR.rglob("*.bin")) and len(list(LAB_MODEL_DIR.rglob("*.safetensors"))) == 2
    extra = json.loads((LAB_MODEL_DIR / "memaudit.json").read_text())
    assert extra["default_layers"] == m.default_layers


def test_shipped_labels(lab_table):
    t = lab_table
    for col in ("prompt", "memorized", "similarity", "duplication", "split"):
        assert col in t.columns
    assert t["memorized"].sum() >= 10
    assert (~t["memorized"]).sum() >= 200
    assert set(t["split"].unique()) == {"validation", "test"}
    assert t["prompt"].n_unique() == len(t)
    # held-out prompts were never training captions: none equals a planted caption
    _, caps = planted(DataConfig())
    held = set(t.filter(t["group"] == "heldout")["prompt"].to_list())
    assert not held & set(caps)


def test_tpr_convention_is_last_point_at_or_below_target():
    from audit.lab.evaluate import metrics

    y = np.array([1] * 4 + [0] * 100, bool)
    s = np.concatenate([[10, 9, 0.5, 0.4], np.linspace(0, 1, 100)])
    m = metrics(y, s)
    # two positives above every negative; the other two below the top negatives
    assert m["tpr_at_1pct_fpr"] == 0.5
    assert 0.5 < m["auroc"] < 1


def test_examples_table_is_generated_from_the_lab():
    from pathlib import Path

    import polars as pl

    from audit.lab.examples import examples_table

    path = Path(__file__).resolve().parents[1] / "examples" / "prompts.parquet"
    shipped = pl.read_parquet(path)
    assert shipped.equals(examples_table())
    assert shipped["prompt_id"].n_unique() == len(shipped)


def test_scorers_reach_the_measured_auroc(lab_model, lab_table):
    from audit.lab.evaluate import evaluate

    measured = json.loads((LAB_MODEL_DIR / "memaudit.json").read_text())["evaluation"]
    result = evaluate(lab_model, lab_table)
    for split, floors in MEASURED_AUROC.items():
        for name, auroc in floors.items():
            assert result[split]["scorers"][name]["auroc"] >= auroc - MARGIN, (split, name)
    for split in ("validation", "test"):
        assert result[split]["n_memorized"] == measured[split]["n_memorized"]
        for name, m in measured[split]["scorers"].items():
            assert result[split]["scorers"][name]["auroc"] >= m["auroc"] - MARGIN, (split, name)
        for name, m in measured[split]["layers"].items():
            assert result[split]["layers"][name]["auroc"] >= m["auroc"] - MARGIN, (split, name)
