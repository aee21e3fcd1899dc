"""Findings of a platform engineer who uses memaudit as a Python library (session 45, "ulibrary"): a request
handler that keeps a model loaded and scores a few prompts per request from several threads, a pipeline step that
scores a table of captions and joins the scores back, and a notebook that reads a run folder.

Pinned here:
- ``audit.score`` left transformers' logging at ERROR, diffusers' at CRITICAL and both libraries' (and the hub's)
  progress bars off for the whole process after its first call: a service lost those libraries' warnings. Loading
  now puts them back (:func:`test_score_leaves_the_callers_logging_levels_and_progress_bars_as_they_were`).
- The public API had no way to keep a model loaded: ``audit.score`` loads it (and hashes its weight files) on every
  call, 0.70 s of a 4-prompt call on the lab model, seconds for Stable Diffusion. ``audit.Auditor`` keeps it
  (0.11 s a call; RSS flat over 200 calls) and returns what ``audit.score`` returns; concurrent calls take turns, as
  two forwards at once on the shared layers raised IncompleteCaptureError or returned another call's values
  (:func:`test_auditor_loads_the_model_once_and_returns_what_score_returns`,
  :func:`test_auditor_takes_calls_from_several_threads_in_turn`,
  :func:`test_auditor_refuses_other_engines_and_bad_options_before_loading_and_after_close`).
- After a bare ``import audit``, ``audit.errors.ModelError`` raised AttributeError (until a call imported the module),
  and ``dir(audit)`` listed no public name
  (:func:`test_audit_errors_and_the_lazy_names_are_reachable_after_a_bare_import`).
- ``audit.run`` without ``out`` in a loop over small tables: the default folder is named to the second, so the next
  call within that second raised RunError ("holds a different run"), or, repeating a command, returned the first
  run's folder (:func:`test_runs_without_out_within_one_second_each_get_their_own_folder`).
- An Auditor accepted a calibration it could not use and refused every call instead
  (:func:`test_auditor_refuses_an_unusable_calibration_when_created_not_at_the_first_request`).
- No common base class for memaudit's errors: a service had to catch RuntimeError (torch's too) or keep a tuple
  (:func:`test_one_base_class_catches_every_memaudit_error`).
- Each call read 8 package versions from disk (18 ms of a 140 ms Auditor call): read once per process now
  (:func:`test_a_kept_models_calls_read_package_versions_once_per_process`).
- ``audit.run(dataframe)`` read the table's column names as paths, and audited a folder named like a column
  (:func:`test_run_refuses_a_table_instead_of_reading_its_column_names_as_paths`).
"""

from __future__ import annotations

import pytest

PROMPTS = ["a red cat on a beach", "an old city street at sunset", "a portrait of a small blue dog"]


@pytest.fixture()
def hf_logging_state():
    """Transformers' and diffusers' logging levels and progress-bar switches set to values memaudit would change,
    put back after the test."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    saved = (hf_logging.get_verbosity(), diffusers_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
             diffusers_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled())
    hf_logging.set_verbosity_warning()
    diffusers_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    diffusers_logging.enable_progress_bar()
    yield hf_logging, diffusers_logging, hub_utils
    hf_logging.set_verbosity(saved[0])
    diffusers_logging.set_verbosity(saved[1])
    (hf_logging.enable_progress_bar if saved[2] else hf_logging.disable_progress_bar)()
    (diffusers_logging.enable_progress_bar if saved[3] else diffusers_logging.disable_progress_bar)()
    (hub_utils.disable_progress_bars if saved[4] else hub_utils.enable_progress_bars)()


def test_score_leaves_the_callers_logging_levels_and_progress_bars_as_they_were(tiny_model_dir, hf_logging_state):
    import logging

    import audit

    hf_logging, diffusers_logging, hub_utils = hf_logging_state
    df = audit.score(PROMPTS[:1], model=str(tiny_model_dir))
    assert df["reason"].to_list() == [None]
    assert hf_logging.get_verbosity() == logging.WARNING
    assert diffusers_logging.get_verbosity() == logging.INFO
    assert hf_logging.is_progress_bar_enabled() is True
    assert diffusers_logging.is_progress_bar_enabled() is True
    assert hub_utils.are_progress_bars_disabled() is False


def test_auditor_loads_the_model_once_and_returns_what_score_returns(tiny_model_dir, monkeypatch):
    """A service keeps an Auditor: three calls load the model once (audit.score loaded it on every call), and each
    call's frame equals audit.score's for the same prompts and options, rejected items included."""
    import audit
    import audit.models

    loads = []
    real_load = audit.models.load_model
    monkeypatch.setattr(audit.models, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    requests = [PROMPTS, [None, PROMPTS[0], 3, "", PROMPTS[0]], [PROMPTS[2]]]
    with audit.Auditor(model=str(tiny_model_dir), batch_size=4) as auditor:
        frames = [auditor.score(r) for r in requests]
        assert len(loads) == 1
        assert auditor.fingerprint == audit.models.read_identity(str(tiny_model_dir)).fingerprint
    assert frames[1]["reason"].to_list() == ["null_prompt", None, "prompt_not_string", "empty_prompt", None]
    assert frames[1]["detail"][2] == "int"
    assert frames[1]["risk"][1] == frames[1]["risk"][4] == frames[0]["risk"][0]
    for request, frame in zip(requests, frames):
        expected = audit.score(request, model=str(tiny_model_dir), batch_size=4)
        assert frame.columns == expected.columns
        assert frame.equals(expected)
    assert len(loads) == 1 + 3  # and audit.score loads the model on each of its calls


def test_auditor_takes_calls_from_several_threads_in_turn(tiny_model_dir):
    """Concurrent calls on one kept model give each caller the values a call alone gives. Without the Auditor's
    lock, two forwards on the shared layers raised IncompleteCaptureError or returned another call's values."""
    from concurrent.futures import ThreadPoolExecutor

    import audit

    words = ["red", "blue", "green", "old", "small", "bright", "dark", "quiet", "busy", "tall", "wet", "cold"]
    requests = [[f"a {w} house by the sea", f"a {w} cat on a chair", f"a {w} street at night"] for w in words]
    auditor = audit.Auditor(model=str(tiny_model_dir), batch_size=4, prepare_threads=0)
    alone = [auditor.score(r) for r in requests]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(auditor.score, requests))
    assert [t.equals(a) for t, a in zip(together, alone)] == [True] * len(requests)
    assert [t["prompt"].to_list() for t in together] == requests
    auditor.close()


def test_auditor_refuses_other_engines_and_bad_options_before_loading_and_after_close(tiny_model_dir, monkeypatch):
    import re

    import audit
    import audit.models
    from audit.errors import RunError

    loads = []
    monkeypatch.setattr(audit.models, "load_model", lambda *a, **k: loads.append(a))
    for options, message in (({"engine": "ray"}, "Auditor() takes no engine (it scores in this process"),
                             ({"out": "x"}, "Auditor() takes no out (it writes no run folder)"),
                             ({"batchsize": 4}, "unknown option batchsize"),
                             ({"seed": "3"}, "'seed' must be int, not str")):
        with pytest.raises(TypeError, match=re.escape(message)):
            audit.Auditor(model=str(tiny_model_dir), **options)
    with pytest.raises(RunError, match="--batch-size 0"):
        audit.Auditor(model=str(tiny_model_dir), batch_size=0)
    assert loads == []
    monkeypatch.undo()
    auditor = audit.Auditor(model=str(tiny_model_dir))
    with pytest.raises(TypeError, match="wrap a single prompt in a list"):
        auditor.score("a red cat")
    auditor.close()
    auditor.close()
    with pytest.raises(RunError, match="this Auditor was closed"):
        auditor.score(["a red cat"])


def test_audit_errors_and_the_lazy_names_are_reachable_after_a_bare_import():
    """``import audit`` then ``audit.errors.ModelError`` (a service's tuple of errors to catch, built at import) raised
    AttributeError until some call had imported audit.errors; ``dir(audit)`` (tab completion) listed none of the
    public functions. Still no torch imported."""
    import subprocess
    import sys

    code = ("import sys, audit; caught = (audit.errors.ModelError, audit.errors.RunError); "
            "print(caught[0].__module__, caught[1].__name__); "
            "print(sorted(n for n in dir(audit) if not n.startswith('_'))); "
            "print([m for m in ('torch', 'diffusers', 'ray', 'polars') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "audit.errors RunError",
        "['Auditor', 'FlaggedPromptsError', 'ScoringFailedError', 'errors', 'run', 'score']",
        "[]"]


def _freeze_run_folder_clock(monkeypatch, tmp_path) -> None:
    """Stop the clock that names default run folders at 2026-12-07 04:17:24 UTC (the datetime module itself is left
    alone) and work in ``tmp_path``."""
    import datetime as dt
    import types

    import audit.pipeline

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2026, 12, 7, 4, 17, 24, tzinfo=tz)

    monkeypatch.setattr(audit.pipeline, "dt", types.SimpleNamespace(datetime=Frozen, timezone=dt.timezone))
    monkeypatch.chdir(tmp_path)


def test_runs_without_out_within_one_second_each_get_their_own_folder(tmp_path, tiny_model_dir, monkeypatch):
    """A pipeline step calling audit.run on each small table without ``out``: the default folder is named to the
    second, and the next call in the same second was refused ("holds a different run"); the same command twice
    got the first run's folder back as its own (no new run). Each call now writes a folder of its own."""
    import polars as pl

    import audit
    import audit.pipeline

    _freeze_run_folder_clock(monkeypatch, tmp_path)
    tables = []
    for k, words in enumerate((["red", "blue"], ["old", "new", "tall"], ["red", "blue"])):
        (tmp_path / f"t{k}.txt").write_text("".join(f"a {w} house\n" for w in words))
        tables.append(tmp_path / f"t{k % 2}.txt")  # the third call repeats the first command
    outs = [audit.run(t, model=str(tiny_model_dir), batch_size=4, log=lambda m: None)[0] for t in tables]
    assert [str(o) for o in outs] == ["memaudit-runs/20261207-041724", "memaudit-runs/20261207-041724-2",
                                      "memaudit-runs/20261207-041724-3"]
    assert [pl.read_parquet(o / "risk.parquet").sort("row")["prompt"].to_list() for o in outs] == [
        ["a red house", "a blue house"], ["a old house", "a new house", "a tall house"],
        ["a red house", "a blue house"]]


def test_run_refuses_a_table_instead_of_reading_its_column_names_as_paths(tmp_path, monkeypatch):
    """A pipeline step passing its DataFrame to audit.run: iterating the table gave its column names, read as paths
    ("prompt: no such file or folder", a SourceError), and a column named like a folder in the working directory
    (here ``captions``) audited that folder's files instead. The docstring promises a TypeError."""
    import pandas as pd
    import polars as pl
    import pyarrow as pa

    import audit

    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "other.txt").write_text("a prompt from another file\n")
    monkeypatch.chdir(tmp_path)
    for table in (pd.DataFrame({"captions": ["a red cat"]}), pl.DataFrame({"captions": ["a red cat"]}),
                  pa.table({"captions": ["a red cat"]}), {"captions": ["a red cat"]}):
        with pytest.raises(TypeError) as err:
            audit.run(table, out=str(tmp_path / "run"), log=lambda m: None)
        assert str(err.value) == (
            f"inputs must be a path, glob or URL (str or Path), or a non-empty list of them, not a "
            f"{type(table).__name__}: write the table to Parquet and pass its path, or score its prompts in memory "
            "with audit.score(table['prompt'])")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions"]


def test_auditor_refuses_an_unusable_calibration_when_created_not_at_the_first_request(tmp_path, tiny_model_dir,
                                                                                         monkeypatch):
    """A service creates its Auditor at startup: a calibration file that cannot be read, or one made for another
    score configuration, was accepted there and refused by every request's score() instead."""
    import json

    import audit
    import audit.models
    from audit.calibrate import calibrate, write_calibration
    from audit.errors import CalibrationError

    words = ["red", "blue", "green", "old", "new", "tall", "wet", "dry", "dark", "quiet"]
    (tmp_path / "ref.txt").write_text("".join(f"a {w} house by the sea\n" for w in words))
    ref, _ = audit.run(tmp_path / "ref.txt", out=tmp_path / "ref", model=str(tiny_model_dir), batch_size=8,
                       log=lambda m: None)
    cal = write_calibration(calibrate(ref, fpr=0.1), tmp_path / "cal.json")
    (tmp_path / "junk.json").write_text('{"threshold": 1}')
    loads = []
    real_load = audit.models.load_model
    monkeypatch.setattr(audit.models, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    with pytest.raises(CalibrationError, match="junk.json: not a memaudit calibration"):
        audit.Auditor(model=str(tiny_model_dir), calibration=str(tmp_path / "junk.json"))
    assert loads == []  # refused before the model loads
    with pytest.raises(CalibrationError, match="score configuration .*seed: calibration 0, run 1"):
        audit.Auditor(model=str(tiny_model_dir), batch_size=8, seed=1, calibration=str(cal))
    prompts = ["a red house by the sea", "a small blue dog", None]
    with audit.Auditor(model=str(tiny_model_dir), batch_size=8, calibration=str(cal)) as auditor:
        frame = auditor.score(prompts)
    expected = audit.score(prompts, model=str(tiny_model_dir), batch_size=8, calibration=str(cal))
    assert frame.equals(expected)
    threshold = json.loads(cal.read_text())["threshold"]
    assert frame["flagged"].to_list() == [frame["risk"][0] > threshold, frame["risk"][1] > threshold, None]
    assert frame["risk_percentile"][0] is not None and frame["risk_percentile"][2] is None


def test_quiet_loading_restores_once_when_the_last_of_nested_blocks_ends(hf_logging_state):
    """Two loads at once (two threads' audit.score) must not put the caller's levels back while the other still
    loads, and must put back the caller's, not the quieted ones; the hub's bars, switched off by the caller while
    transformers' stay on, stay off (enabling transformers' bars switches the hub's on too)."""
    import logging

    from audit.models.base import quiet_loading

    hf_logging, diffusers_logging, hub_utils = hf_logging_state
    hub_utils.disable_progress_bars()
    with quiet_loading():
        with quiet_loading():
            assert (hf_logging.get_verbosity(), diffusers_logging.get_verbosity()) == (logging.ERROR, logging.CRITICAL)
        assert (hf_logging.get_verbosity(), diffusers_logging.get_verbosity()) == (logging.ERROR, logging.CRITICAL)
        assert hf_logging.is_progress_bar_enabled() is False and diffusers_logging.is_progress_bar_enabled() is False
    assert (hf_logging.get_verbosity(), diffusers_logging.get_verbosity()) == (logging.WARNING, logging.INFO)
    assert hf_logging.is_progress_bar_enabled() is True and diffusers_logging.is_progress_bar_enabled() is True
    assert hub_utils.are_progress_bars_disabled() is True


def test_default_run_folder_passes_over_a_dangling_link_of_its_name(tmp_path, monkeypatch):
    """A link left where the run folder would go (its target deleted) is taken, not written through."""
    import audit.pipeline

    _freeze_run_folder_clock(monkeypatch, tmp_path)
    (tmp_path / "memaudit-runs").mkdir()
    (tmp_path / "memaudit-runs" / "20261207-041724").symlink_to(tmp_path / "gone")
    assert str(audit.pipeline.default_out_dir()) == "memaudit-runs/20261207-041724-2"
    (tmp_path / "memaudit-runs" / "20261207-041724-2").mkdir()
    assert str(audit.pipeline.default_out_dir()) == "memaudit-runs/20261207-041724-3"


def test_one_base_class_catches_every_memaudit_error(tiny_model_dir):
    """A service wraps its handler in one except clause for memaudit's own errors: there was no common base (RunError,
    SourceError, ModelError are RuntimeErrors, SchemaError and MitigationError ValueErrors), so catching RuntimeError
    also caught torch's, and a tuple had to be kept in step with the module."""
    import audit
    import audit.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BaseException)]
    assert sorted(c.__name__ for c in classes if not issubclass(c, errors.MemauditError)) == []
    assert len(classes) == 16  # RunFolderBusyError (exit 75) the fifteenth, ScorerError (a scorer's broken seam) 16th
    assert issubclass(errors.ModelError, RuntimeError) and issubclass(errors.SchemaError, ValueError)
    for call in (lambda: audit.score(["a red cat"], model="/nonexistent/model"),
                 lambda: audit.score(["a red cat"], model=str(tiny_model_dir), batch_size=0),
                 lambda: audit.run("/nonexistent/prompts.parquet", out="/nonexistent/run")):
        with pytest.raises(errors.MemauditError) as err:
            call()
        assert type(err.value).__name__ in ("ModelError", "RunError", "SourceError")


def test_a_kept_models_calls_read_package_versions_once_per_process(tmp_path, tiny_model_dir, monkeypatch):
    """Every call read 8 package versions from their metadata files (18 ms of a 140 ms Auditor call on the lab model);
    they are read once per process. The manifest still records them."""
    import importlib.metadata
    import json

    import audit

    reads = []
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda pkg: reads.append(pkg) or real_version(pkg))
    auditor = audit.Auditor(model=str(tiny_model_dir), batch_size=4)
    auditor.score(PROMPTS[:1])
    before = len(reads)
    auditor.score(PROMPTS[1:2])
    assert reads[before:] == []
    out, manifest = audit.run(_lines(tmp_path / "v.txt", PROMPTS[:1]), out=tmp_path / "v",
                              model=str(tiny_model_dir), log=lambda m: None)
    assert reads[before:] == []
    versions = json.loads((out / "manifest.json").read_text())["versions"]
    assert versions["torch"] == real_version("torch") and versions["polars"] == real_version("polars")
    assert manifest["model"]["tokenizer"]["transformers"] == real_version("transformers")


def _lines(path, prompts):
    """``path`` written with one prompt a line; returns it."""
    path.write_text("".join(p + "\n" for p in prompts))
    return path
