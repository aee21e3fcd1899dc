"""Half precision, non-finite attention and batch sizing (issue 6), on CPU with the tiny model."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from audit.model import load_model
from audit.pipeline import RunConfig, score_prompts
from audit.runner import execute
from audit.scoring import ScoreConfig, Scorer, batch_size_for_memory

PROMPTS = ["a red cat", "a photo of a dog on the beach at sunset", "old oil painting of a house", "a blue car",
           "portrait of a woman in the city", "🎨", "東京の夜景", "night sky over the lake"]
BF16_TOLERANCE_NATS = 0.02  # |E_bf16 - E_fp32|; bfloat16 keeps ~3 significant digits in the projections


def test_bfloat16_scores_agree_with_float32(tiny_model_dir):
    fp32 = load_model(str(tiny_model_dir), "cpu", "float32")
    bf16 = load_model(str(tiny_model_dir), "cpu", "bfloat16")
    assert bf16.unet.dtype == torch.bfloat16
    layers = tuple(fp32.default_layers)
    a = Scorer(fp32, ScoreConfig("attention_entropy", layers)).score(PROMPTS)
    b = Scorer(bf16, ScoreConfig("attention_entropy", layers, dtype="bfloat16")).score(PROMPTS)
    assert b["token_mass"].dtype == np.float32  # probabilities are float32 whatever the model dtype
    diff = np.abs(a["attn_entropy"] - b["attn_entropy"])
    assert diff.max() <= BF16_TOLERANCE_NATS, diff
    assert np.abs(a["bos_mass"] - b["bos_mass"]).max() <= 0.01
    assert not b["nonfinite"].any()


def test_float16_overflow_is_rejected_never_ranked(tmp_path, tiny_model_dir):
    """A layer whose query projection overflows float16 (|q| > 65504) gives non-finite logits: every
    prompt is rejected with nonfinite_attention and nothing is ranked."""
    from safetensors.torch import load_file, save_file
    import shutil

    bad = tmp_path / "overflow"
    shutil.copytree(tiny_model_dir, bad)
    model = load_model(str(tiny_model_dir), "cpu", "float32")
    layer = model.default_layers[0]
    path = next((bad / "unet").glob("*.safetensors"))
    weights = load_file(path)
    weights[f"{layer}.to_q.weight"] = weights[f"{layer}.to_q.weight"] * 1e6
    save_file(weights, path, metadata={"format": "pt"})
    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS}), src)
    out, manifest = execute(RunConfig(inputs=(str(src),), model=str(bad), out=str(tmp_path / "run"), device="cpu",
                                      dtype="float16", batch_size=4), progress=False, log=lambda m: None)
    assert manifest["counts"]["rejected_by_reason"] == {"nonfinite_attention": len(PROMPTS)}
    assert pl.read_parquet(out / "risk.parquet").height == 0
    assert set(pl.read_parquet(out / "rejects.parquet")["reason"]) == {"nonfinite_attention"}


def test_out_of_memory_halves_the_batch_and_loses_nothing(scorer, monkeypatch):
    prompts = [f"a red cat {i}" for i in range(21)]
    reference, ref_trig, _ = score_prompts(scorer, prompts, 32)
    real_score = scorer.score
    seen_sizes = []

    def fake_score(batch, tokens=None):
        seen_sizes.append(len(batch))
        if len(batch) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_score(batch, tokens)

    monkeypatch.setattr(scorer, "score", fake_score)
    try:
        out, trig, errors = score_prompts(scorer, prompts, 16)
        assert errors == {}
        assert scorer.max_batch == 4 and seen_sizes[:3] == [16, 8, 4]
        np.testing.assert_allclose(out["risk"], reference["risk"], rtol=0, atol=1e-6)
        assert [t[0]["position"] for t in trig] == [t[0]["position"] for t in ref_trig]
        # after halving, 21 prompts take ceil(21 / 4) = 6 successful calls of 4 (the last one padded):
        # each prompt scored exactly once
        assert [s for s in seen_sizes if s <= 4] == [4] * 6
    finally:
        scorer.max_batch = None


def test_batch_size_for_memory():
    gib = 1 << 30
    assert batch_size_for_memory(10 * gib, 10 * (1 << 20)) == 512  # 0.7 * 10 GiB / 10 MiB = 716 -> 512
    assert batch_size_for_memory(100 * gib, 1 << 20) == 2048  # capped
    assert batch_size_for_memory(1 << 20, 1 << 30) == 1


def test_auto_batch_size_on_cpu(scorer):
    assert scorer.auto_batch_size() == 32
