"""benchmarks/scorers.py in a reduced configuration (3 steps; three scorers, to stay fast: each SD 1.4-scale
forward on the meta device takes ~2 s here): each scorer gets a speed and an SD 1.4-scale FLOP count, and
the FLOP counts follow the forward counts (text encoder + n full UNet forwards). The full run's figures
(guidance_geometry: 13.3 + 4 x 803.3 GFLOP) are in the README."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_scorer_benchmark_reduced(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_scorers", ROOT / "benchmarks" / "scorers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--prompts", "2", "--batch", "2", "--steps", "3", "--flop-batch", "1", "--scorers",
                      "noise_magnitude,attention_entropy_late", "--json", str(tmp_path / "b.json")])["scorers"]
    assert list(res) == ["attention_entropy", "noise_magnitude", "attention_entropy_late"]
    assert all(r["prompts_per_s"] > 0 for r in res.values())
    assert res["attention_entropy"]["gflops_ratio"] == 1.0
    text, partial, full = 13.3, 164.3, 803.3  # SD 1.4, per prompt (tests/test_sd_architecture.py)
    assert res["attention_entropy"]["gflops_per_prompt_sd14"] == pytest.approx(text + partial, abs=1.0)
    assert res["noise_magnitude"]["gflops_per_prompt_sd14"] == pytest.approx(text + 2 * full, abs=2.0)
    assert res["attention_entropy_late"]["gflops_per_prompt_sd14"] == pytest.approx(text + 6 * full, abs=6.0)
    assert res["attention_entropy_late"]["unet_forwards_per_prompt"] == 6
