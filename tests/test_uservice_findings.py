"""Findings of the long-lived-process trial (a service or notebook calling audit.score / Auditor / run many times)."""

from __future__ import annotations

import contextlib

import pytest
import torch

PROMPTS = ["a red cat on a beach", "an old city street at sunset", "a portrait of a small blue dog"]


@contextlib.contextmanager
def float32_matmul(precision: str):
    """``torch.set_float32_matmul_precision(precision)`` for the block, then the backends' settings put back."""
    saved = {b: b.fp32_precision for b in (torch.backends.mkldnn.matmul, torch.backends.cuda.matmul)}
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        for backend, value in saved.items():
            backend.fp32_precision = value


def test_reduced_float32_precision_names_what_a_process_set_per_device():
    from audit.models.base import device_kind, reduced_float32_precision

    threads = torch.get_num_threads()
    assert reduced_float32_precision("cpu") is None and device_kind("cpu") == f"cpu:{threads}"
    with float32_matmul("medium"):  # bfloat16 matmuls through oneDNN on a CPU, TF32 on CUDA
        assert reduced_float32_precision("cpu") == "float32 matmul bf16"
        assert device_kind("cpu") == f"cpu:{threads} (float32 matmul bf16)"
        assert reduced_float32_precision("cuda") == "float32 matmul tf32"
    with float32_matmul("high"):
        assert reduced_float32_precision("cpu") == "float32 matmul tf32"
    with float32_matmul("highest"):  # IEEE, set explicitly: what a fresh process has
        assert reduced_float32_precision("cpu") is None and reduced_float32_precision("cuda") is None
    torch.backends.cudnn.allow_tf32 = False  # cuDNN's default is TF32 convolutions: IEEE ones depart from it
    try:
        assert reduced_float32_precision("cuda") == "float32 conv ieee"
    finally:
        torch.backends.cudnn.allow_tf32 = True
    conv = torch.backends.mkldnn.conv.fp32_precision
    torch.backends.mkldnn.conv.fp32_precision = "bf16"
    try:
        assert reduced_float32_precision("cpu") == "float32 conv bf16"
    finally:
        torch.backends.mkldnn.conv.fp32_precision = conv
    # a process that used both of torch's APIs: torch.get_float32_matmul_precision() raises there, this does not
    matmul = torch.backends.mkldnn.matmul.fp32_precision
    torch.set_float32_matmul_precision("highest")
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        with pytest.raises(RuntimeError):
            torch.get_float32_matmul_precision()
        assert reduced_float32_precision("cpu") == "float32 matmul bf16"
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = matmul
        torch.backends.cuda.matmul.fp32_precision = "none"


def test_a_notebooks_reduced_matmul_precision_is_not_served_ieee_scores_from_the_cache(tmp_path, tiny_model_dir):
    """A notebook that set torch.set_float32_matmul_precision("medium") was served, from a shared --cache, the
    scores of a run at IEEE float32 (and stored its own bfloat16-matmul scores where the nightly run read them):
    the setting was in no cache key and no manifest."""
    import audit

    model, cache = str(tiny_model_dir), str(tmp_path / "cache")
    ieee = audit.score(PROMPTS, model=model, cache=cache)["risk"].to_list()
    with float32_matmul("medium"):
        fresh = audit.score(PROMPTS, model=model)["risk"].to_list()
        cached = audit.score(PROMPTS, model=model, cache=cache)["risk"].to_list()
        src = tmp_path / "p.txt"
        src.write_text("\n".join(PROMPTS + ["a green tree by a lake"]) + "\n")  # one not cached
        _, manifest = audit.run(str(src), out=str(tmp_path / "run"), model=model, cache=cache, log=lambda m: None)
    assert cached == fresh  # scored at the precision set, not served the IEEE values
    assert ieee == audit.score(PROMPTS, model=model, cache=cache)["risk"].to_list()  # and the IEEE key kept its own
    assert manifest["scored_with"]["device"] == [f"cpu:{torch.get_num_threads()} (float32 matmul bf16)"]
    assert manifest["counts"]["scored"] == 4 and manifest["cache"]["hits"] == 3
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2


RAY_CALLER = r'''
import signal, sys
import audit

def mine(signum, frame):
    print("mine", signum)

signal.signal(signal.SIGTERM, mine)
hook = sys.unraisablehook
import logging, os, warnings
import torch, diffusers  # their import-time warnings filters are not the run's (README)
import ray.data  # the service's own Ray Data jobs, with progress bars
ctx = ray.data.DataContext.get_current()
ctx.enable_progress_bars = True
env, filters = dict(os.environ), list(warnings.filters)
levels = {name: logging.getLogger(name).level for name in ("ray.data", "ray._private.authentication")}
lines = []
_, manifest = audit.run(sys.argv[1], out=sys.argv[2], model=sys.argv[3], engine="ray", workers=1, log=lines.append)
print("scored", manifest["counts"]["scored"])
print("sigterm kept", signal.getsignal(signal.SIGTERM) is mine, "hook kept", sys.unraisablehook is hook)
print("logged", [line for line in lines if line.startswith("memaudit: ray:")])
print("env", sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k) and k.startswith("RAY_")))
print("filters added", [f[3].pattern for f in warnings.filters if f not in filters if f[3] is not None])
print("levels kept", {n: logging.getLogger(n).level for n in levels} == levels, "progress bars",
      ray.data.DataContext.get_current().enable_progress_bars)
'''


def test_a_library_ray_run_gives_back_the_callers_sigterm_handler_and_logs_through_its_log(tmp_path, tiny_model_dir):
    """A service that called audit.run(engine="ray") kept memaudit's SIGTERM handler (which raises Terminated
    wherever the main thread is) instead of its own graceful shutdown, and sys.unraisablehook wrapped, for the rest of
    the process; and the engine's "memaudit: ray: 1 scoring actor(s) ..." line went to stderr past the log= given.
    It also kept RAY_ENABLE_AUTO_CONNECT=0 in its environment, an ignore filter for ray.data's warnings, ray.data's
    logger at CRITICAL and Ray Data's progress bars off (audit.engines.ray.settings_kept)."""
    import os
    import subprocess
    import sys

    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    script = tmp_path / "caller.py"
    script.write_text(RAY_CALLER)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(script), str(src), str(tmp_path / "run"), str(tiny_model_dir)],
                          capture_output=True, text=True, env=env, timeout=200)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout.splitlines()
    assert out[0] == "scored 3"
    assert out[1] == "sigterm kept True hook kept True"
    assert out[2].startswith("logged ['memaudit: ray: 1 scoring actor(s), ") and "1 unit(s) in 1 group(s)" in out[2]
    assert "memaudit: ray:" not in done.stderr
    # what the engine set for its run is put back: the environment, the warnings filter, the loggers' levels and Ray
    # Data's progress bars (they stayed changed for the rest of the service's process)
    assert out[3:] == ["env []", "filters added []", "levels kept True progress bars True"]


def test_missing_values_in_a_list_are_null_prompts_as_in_a_pandas_series(tiny_model_dir):
    """df["prompt"].tolist() of an object column holds NaN for its missing prompts: audit.score rejected them as
    prompt_not_string ('float'), where audit.score(df["prompt"]) rejected the same rows as null_prompt."""
    import numpy as np
    import pandas as pd

    import audit

    items = ["a red cat on a beach", float("nan"), np.nan, pd.NA, pd.NaT, None, 3.5, b"x"]
    listed = audit.score(items, model=str(tiny_model_dir))
    assert listed["reason"].to_list() == [None] + ["null_prompt"] * 5 + ["prompt_not_string"] * 2
    assert listed["detail"].to_list()[5:] == [None, "float", "bytes"]
    assert listed["row"].to_list() == list(range(8)) and listed["risk"][0] is not None
    series = pd.Series(["a red cat on a beach", np.nan, None])
    assert audit.score(series.tolist(), model=str(tiny_model_dir))["reason"].to_list() == \
        audit.score(series, model=str(tiny_model_dir))["reason"].to_list() == [None, "null_prompt", "null_prompt"]
    assert items[1] != items[1]  # the caller's list is not changed


def test_building_a_tiny_model_leaves_the_callers_random_state(tmp_path):
    """audit.tiny's builders called torch.manual_seed on the process's generator: a notebook that built a tiny model
    between its own seeded draws got other numbers after it. The models' weights are the same as before."""
    from audit.tiny import build_tiny_model, tiny_components, tiny_vae

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _, text_encoder, unet, _ = tiny_components(seed=0)
    build_tiny_model(tmp_path / "m", seed=1, vae=True)
    tiny_vae(2)
    assert torch.equal(torch.rand(3), expected)
    # the seeded weights did not move (sums of the seed-0 components as built before this change)
    assert float(sum(p.detach().double().sum() for p in unet.parameters())) == pytest.approx(1248.428516321144, abs=1e-9)
    assert float(sum(p.detach().double().sum() for p in text_encoder.parameters())) == pytest.approx(159.43590906299755, abs=1e-9)


def test_a_compiled_scorer_that_audit_score_loaded_is_closed_when_the_call_returns(tiny_model_dir, monkeypatch):
    """audit.score(..., compile=True) returned with its scorer's capture processors still installed on its UNet (a
    compiled scorer keeps them for its life): a reference cycle that held the whole model, on a GPU its memory,
    until Python's cyclic garbage collector happened to run, so a notebook's repeated calls piled models up. The
    run now closes the scorers it loaded. (torch.compile is replaced by the identity here: the cycle is the
    capture's, and compiling on a CPU takes minutes.)"""
    import gc
    import weakref

    import audit
    import audit.runner as runner

    monkeypatch.setattr(torch, "compile", lambda module, **kw: module)
    unets, load = [], runner._load_scorer

    def loading(*a, **kw):
        scorer, confirmer = load(*a, **kw)
        unets.append(weakref.ref(scorer.model.unet))
        return scorer, confirmer

    monkeypatch.setattr(runner, "_load_scorer", loading)
    gc.collect()
    gc.disable()
    try:
        df = audit.score(PROMPTS, model=str(tiny_model_dir), compile=True)
        assert [ref() for ref in unets] == [None]  # freed by reference counting alone
        with audit.Auditor(model=str(tiny_model_dir), compile=True) as auditor:  # kept until closed: the caller's
            auditor.score(PROMPTS)
            assert unets[1]() is not None
        assert unets[1]() is None
    finally:
        gc.enable()
    assert df["reason"].to_list() == [None] * 3


def test_an_auditors_relative_cache_and_calibration_stay_where_they_were_at_creation(tmp_path, tiny_model_dir,
                                                                                       monkeypatch):
    """An Auditor's options hold for its life, but each score() resolved a relative cache against the working folder
    of that call: after a notebook's %cd the same Auditor made a second, empty cache there (no hits), and a relative
    calibration file was not found."""
    import audit
    from audit.calibrate import calibrate, write_calibration

    (tmp_path / "ref.txt").write_text("".join(f"a {w} house by the sea\n" for w in ("red", "blue", "old", "new")))
    ref, _ = audit.run(tmp_path / "ref.txt", out=tmp_path / "ref", model=str(tiny_model_dir), batch_size=8,
                       log=lambda m: None)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_calibration(calibrate(ref, fpr=0.25), tmp_path / "a" / "cal.json")
    monkeypatch.chdir(tmp_path / "a")
    with audit.Auditor(model=str(tiny_model_dir), batch_size=8, cache="cache", calibration="cal.json") as auditor:
        first = auditor.score(PROMPTS)
        monkeypatch.chdir(tmp_path / "b")
        second = auditor.score(PROMPTS)
    assert second.equals(first) and first["flagged"].null_count() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "ref", "ref.txt"]
    assert list((tmp_path / "b").iterdir()) == [] and (tmp_path / "a" / "cache").is_dir()
