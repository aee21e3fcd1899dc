"""The GPU benchmark's reduced CPU configuration runs end to end and reports consistent figures."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_throughput_reduced_cpu_configuration(tmp_path):
    out = tmp_path / "gpu_throughput.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--cpu", "--tiny", "--threads", "1",
                           "--pipeline-batches", "3", "--e2e-prompts", "24", "--e2e-rounds", "1", "--variants", "--profile-ops",
                           "--noise-max-batch", "1",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == []
    rows = result["rows"]
    assert [(r["dtype"], r["scorer"], r["batch"]) for r in rows] == [
        ("float32", "attention_entropy", 1), ("float32", "attention_entropy", 2), ("float32", "noise_magnitude", 1)]
    entropy = [r for r in rows if r["scorer"] == "attention_entropy"]
    noise = [r for r in rows if r["scorer"] == "noise_magnitude"]
    for r in entropy:
        # the partial forward stops at the 4th of 16 cross-attention layers: a fraction of the full forward's
        # FLOPs (which include the same text encoder), the same for every batch size
        assert 0 < r["scorer_gflops_per_prompt"] < 0.5 * r["full_forward_gflops_per_prompt"]
        assert r["scorer_gflops_per_prompt"] == entropy[0]["scorer_gflops_per_prompt"]
        # speed ratios are printed, not asserted (a loaded machine moves them): here only that they were measured
        assert r["scorer_vs_full_forward"] > 0 and r["scorer_vs_reference"] > 0
        assert r["fraction_of_peak"] is None and r["peak_gpu_memory_gib"] is None  # no GPU here
    for r in noise:  # a conditional and an unconditional full UNet forward per prompt, one text encoding
        full = entropy[0]["full_forward_gflops_per_prompt"]
        assert 1.5 * full < r["scorer_gflops_per_prompt"] < 2 * full
    assert [(e["scorer"], e["auto_batch_size"]) for e in result["launch"]] == [
        ("attention_entropy", 32), ("noise_magnitude", 32)]  # auto on CPU
    for e in result["launch"]:  # the host's time for one batch's noise, queued on the device or drawn on the host
        assert e["noise_philox_queue_host_ms_per_batch"] > 0 and e["noise_mt19937_host_ms_per_batch"] > 0
    e2e = result["end_to_end"]
    # every prompt scored (the script checks the run's counts), the ratio that of the one round
    assert e2e["prompts"] == 24 and e2e["rounds"] == 1 and e2e["batch"] == 32
    assert e2e["ratios"] == [e2e["end_to_end_vs_bare_forward"]] and 0 < e2e["ratios"][0]
    without_load = e2e["end_to_end_vs_bare_forward_without_load"]
    if without_load is None:  # the benchmark's null: the run took no longer than a load alone (a loaded machine)
        assert e2e["prompts"] / e2e["end_to_end_prompts_per_s"] <= 1.05 * e2e["load_s"] + 0.01, e2e
    else:
        assert without_load > e2e["end_to_end_vs_bare_forward"]
    [pipe] = result["pipeline"]
    assert pipe["batch"] == 2 and pipe["prompts"] == 6 and pipe["pipeline_prompts_per_s"] > 0
    assert set(result["variants"]["prompts_per_s"]) == {"default", "cudnn_benchmark", "channels_last",
                                                        "channels_last_cudnn_benchmark", "fused_qkv_projections",
                                                        "philox_noise", "default_again"}
    change = result["variants"]["max_entropy_change"]  # the same computation: float32 rounding at most
    assert all(change[k] < 1e-5 for k in change if k != "philox_noise") and change["philox_noise"] > 0
    ops = result["ops"]  # one launch profiled: every kind of the partial forward's work is there, shares sum to 1
    assert ops["batch"] == 2 and ops["clock"] == "cpu" and ops["busy_fraction"] is None
    assert {"convolution", "attention", "matrix_multiply", "normalization"} <= set(ops["fraction_by_kind"])
    assert abs(sum(ops["fraction_by_kind"].values()) - 1) < 0.01 and len(ops["top"]) == 15
    assert result["summary"]["best_scorer_prompts_per_s"] == max(r["scorer_prompts_per_s"] for r in entropy)
    assert "best_scorer_prompts_per_s:" in proc.stdout and "end_to_end_vs_bare_forward:" in proc.stdout


def test_merge_benchmark_arms_give_the_same_ranking(tmp_path):
    """benchmarks/merge.py compares memaudit's k-way merge with a polars sort; both arms must rank 20 tied-risk
    shards identically (risk desc, prompt_id asc), through a multi-pass reduction (20 > the fan-in of 8)."""
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import merge
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    shards = merge.make_shards(tmp_path, 6_000, 20)
    out = {}
    for arm, fn in (("kway", merge.arm_kway), ("polars", merge.arm_polars)):
        (tmp_path / arm).mkdir()
        fn(shards, tmp_path / arm / "risk.parquet")
        out[arm] = pq.read_table(tmp_path / arm / "risk.parquet", columns=["rank", "risk", "prompt_id"]).to_pydict()
    assert out["kway"] == out["polars"]
    assert out["kway"]["rank"] == list(range(1, 6_001))
    assert len(set(out["kway"]["risk"])) < 6_000  # ties were there to break


def test_host_ceiling_runs_the_whole_path_with_the_stand_in(tmp_path):
    """benchmarks/host_ceiling.py on 600 prompts: every row read is scored (the stand-in gives the entropy
    log(n_kept)), duplicates are counted, and it prints the figure it is named for."""
    out = tmp_path / "host.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_ceiling.py"), "--prompts", "600",
                           "--repeats", "1", "--batch-size", "64", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "host_prompts_per_s_one_core:" in proc.stdout
    res = json.loads(out.read_text())
    c = res["counts"]
    assert c["rows_read"] == 600 and c["scored"] == 600 and c["rejected"] == 0
    assert c["unique_prompts"] + c["duplicates"] == 600 and 0 < c["duplicates"] < 100
    assert res["torch_threads"] == 1 and res["host_prompts_per_s_one_core"] > 0


def test_many_files_benchmark_arms_score_the_same_table(tmp_path):
    """benchmarks/many_files.py on 40 files of 2 prompts, with the stand-in forward and 1 ms to open a file: the
    four arms (groups, one group per unit, groups read by one reader, groups writing an empty rejects shard per unit
    as before) score every row, their risk tables are equal, and it prints the ratios it is named for."""
    out = tmp_path / "many.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "many_files.py"), "--files", "40", "--rows", "2",
                           "--repeats", "1", "--batch-size", "16", "--stand-in", "--open-latency-ms", "1",
                           "--empty-rejects-shards", "--json", str(out)],
                          cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(f"grouped_vs_{arm}" in proc.stdout for arm in ("per_unit", "one_reader", "empty_rejects_shards"))
    res = json.loads(out.read_text())
    assert res["same_risk_table"] is True and res["stand_in"] is True
    assert (res["files"], res["rows_per_file"]) == (40, 2)
    assert set(res["files_per_s"]) == {"grouped", "per_unit", "grouped_one_reader", "empty_rejects_shards"}
    assert min(res["files_per_s"].values()) > 0 and res["read_threads"] == 8 and res["open_latency_ms"] == 1


def test_gpu_throughput_compile_recipes_are_checked_before_any_gpu_time():
    """--compile-modes takes MODE[+OPTION...] items; an unknown mode or option is refused at parse time (a typo
    found after minutes of GPU time costs the run)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_throughput
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    recipes = gpu_throughput.compile_recipes("default, max-autotune-no-cudagraphs+channels_last+fused_qkv")
    assert recipes == [("default", ()), ("max-autotune-no-cudagraphs", ("channels_last", "fused_qkv"))]
    for bad, says in (("fast", "the mode must be one of"), ("default+channels-last", "unknown option channels-last")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            gpu_throughput.compile_recipes(bad)


def test_report_scale_runs_are_valid_run_folders_with_the_counts_asked(tmp_path, tiny_model_dir):
    """benchmarks/report_scale.py's scaled run folders pass the report's checks (manifest counts against the
    tables) with the rows asked: every 10th row repeats the prompt before it, ranks follow risk, and a diff of
    the run with its risks moved finds every prompt in both runs."""
    from audit.calibrate import calibrate
    from audit.diff import diff_runs
    from audit.report import build_report
    import polars as pl

    from helpers import run_audit

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report_scale
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    src = tmp_path / "p.txt"
    src.write_text("a red cat\n\nold oil painting of a city\na blue dog on the beach\n")
    small, _ = run_audit([src], tiny_model_dir, tmp_path / "run", device="cpu")
    big = report_scale.scale_run(small, tmp_path / "big", 2_000, 10, 0.0)
    moved = report_scale.scale_run(small, tmp_path / "moved", 2_000, 10, 0.02)
    c = build_report(big, by=["source"]).counts
    assert (c["scored"], c["unique_prompts"], c["duplicates"], c["rejected"]) == (2_000, 1_800, 200, 300)
    assert c["rejected_by_reason"] == {"empty_prompt": 200, "null_prompt": 100}
    risk = pl.read_parquet(big / "risk.parquet")
    assert risk["rank"].to_list() == list(range(1, 2_001)) and risk["risk"].is_sorted(descending=True)
    assert risk.group_by("prompt_hash").agg(pl.col("risk").n_unique())["risk"].max() == 1  # a prompt, one risk
    d = diff_runs(big, moved)
    assert (d.summary["in_both"], d.summary["only_new"], d.summary["only_old"]) == (1_800, 0, 0)
    assert d.summary["rank_risen"] > 0
    assert calibrate(big, fpr=0.01)["threshold"] > 0
