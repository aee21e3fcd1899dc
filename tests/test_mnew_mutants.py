"""Mutation review of session 45's changes (helper mnew): ``memaudit run --retry-failed`` (audit.runner
``_retry_failed_units``, audit.unit ``failed_rows``/``forget_unit``), ``audit.diff.previous_run`` and the other
code changed that day, pinned with real values."""

from __future__ import annotations

import json

import numpy as np

import pytest

from audit.config import RunConfig


def _failing_launch(monkeypatch):
    """``Scorer.launch`` fails a batch holding 'poison' with an out-of-memory error and one holding 'broken' with
    another error (the engines then score those batches' prompts one by one: just those prompts fail)."""
    import torch

    from audit.scorers import Scorer

    original = Scorer.launch

    def launch(self, batch):
        if any("poison" in p for p in batch.prompts):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any("broken" in p for p in batch.prompts):
            raise ValueError("this prompt breaks the model")
        return original(self, batch)

    monkeypatch.setattr(Scorer, "launch", launch)
    return original


PROMPTS = "a poison apple\na blue dog\nan old city\nsome green tea\na tall tower\na broken clock\n"


def _execute(src, model, out, **kw):
    from audit.runner import execute

    lines = []
    cfg = RunConfig(inputs=(str(src),), model=str(model), out=str(out), unit_rows=2, batch_size=2,
                    max_error_fraction=0.5, **kw)
    return execute(cfg, progress=False, log=lines.append)[1], lines


def test_retry_failed_counts_every_failing_unit_by_reason(tmp_path, tiny_model_dir, monkeypatch):
    """Two finished units, the first with two scoring_error rows, the last with an out_of_memory row: a plain
    rerun names both units, the rows and both reasons (sorted by name, plural forms); --retry-failed scores only
    those two units again, and the tables then equal a clean run's."""
    import polars as pl

    from audit.scorers import Scorer

    src = tmp_path / "p.txt"
    src.write_text("a broken clock\na broken vase\nan old city\nsome green tea\na tall tower\na poison apple\n")
    out = tmp_path / "out"
    original = _failing_launch(monkeypatch)
    first, _ = _execute(src, tiny_model_dir, out)
    assert first["counts"]["rejected_by_reason"] == {"out_of_memory": 1, "scoring_error": 2}
    assert first["counts"]["scored"] == 3
    monkeypatch.setattr(Scorer, "launch", original)

    kept, lines = _execute(src, tiny_model_dir, out)
    assert kept["units"] == {"total": 3, "resumed": 3}
    assert (f"memaudit: note: 2 finished units of {out} hold 3 rows the model failed to score "
            "(out_of_memory 1, scoring_error 2); --retry-failed scores them again") in lines

    retried, lines = _execute(src, tiny_model_dir, out, retry_failed=True)
    assert (f"memaudit: --retry-failed: 2 finished units of {out} hold 3 rows the model failed to score "
            "(out_of_memory 1, scoring_error 2): scoring them again") in lines
    assert retried["units"] == {"total": 3, "resumed": 1}
    assert retried["counts"]["scored"] == 6 and retried["counts"]["rejected_by_reason"] == {}
    _execute(src, tiny_model_dir, tmp_path / "ref")
    assert pl.read_parquet(out / "risk.parquet").equals(pl.read_parquet(tmp_path / "ref" / "risk.parquet"))


def test_a_failed_batchs_other_prompts_keep_their_batch_scores_in_the_cache(tmp_path, tiny_model_dir, monkeypatch):
    """A batch that fails (not out of memory) is scored prompt by prompt; each prompt was scored alone, a shape of
    one row, so its batch-mate got a score 2.2e-8 off its batch value, and --cache kept that value for every later
    run: --retry-failed --cache then did not give a clean run's table. Each prompt is now scored at the batch's
    shape (padded as a short batch is), so the batch-mate's score, the cache and the retried run equal a clean
    run's exactly."""
    import polars as pl

    from audit.scorers import Scorer

    src = tmp_path / "p.txt"
    src.write_text(PROMPTS.replace("a poison apple", "a red apple"))  # only 'a broken clock' fails, a ValueError
    ref, _ = _execute(src, tiny_model_dir, tmp_path / "ref")
    clean = pl.read_parquet(tmp_path / "ref" / "risk.parquet")
    original = _failing_launch(monkeypatch)
    out, cache = tmp_path / "out", tmp_path / "cache"
    first, _ = _execute(src, tiny_model_dir, out, cache=str(cache))
    assert first["counts"]["rejected_by_reason"] == {"scoring_error": 1}
    risk = pl.read_parquet(out / "risk.parquet")
    mate = risk.filter(pl.col("prompt") == "a tall tower")["risk"].item()
    assert mate == clean.filter(pl.col("prompt") == "a tall tower")["risk"].item()
    monkeypatch.setattr(Scorer, "launch", original)
    retried, _ = _execute(src, tiny_model_dir, out, cache=str(cache), retry_failed=True)
    assert retried["counts"]["scored"] == 6 and retried["units"] == {"total": 3, "resumed": 2}
    assert pl.read_parquet(out / "risk.parquet").equals(clean)


def test_retry_failed_leaves_a_unit_with_a_missing_shard_to_the_plain_resume(tmp_path, tiny_model_dir, monkeypatch):
    """A unit whose marker counts a failure but whose risk shard is gone is not finished: every rerun scores it
    again, and the note counts only the finished unit that still holds a failure."""
    from audit.scorers import Scorer
    from audit.unit import Unit, failed_rows, shard_paths, unit_done

    src = tmp_path / "p.txt"
    src.write_text(PROMPTS)
    out = tmp_path / "out"
    original = _failing_launch(monkeypatch)
    _execute(src, tiny_model_dir, out)
    monkeypatch.setattr(Scorer, "launch", original)
    shards = out / "shards"
    units = [Unit(**json.loads(p.read_text())["unit"]) for p in sorted(shards.glob("*.done.json"))]
    assert [failed_rows(shards, u) for u in units] == [{"out_of_memory": 1}, {}, {"scoring_error": 1}]
    shard_paths(shards, units[0])[0].unlink()  # unit 0's risk shard deleted; its marker still counts the failure
    assert not unit_done(shards, units[0]) and failed_rows(shards, units[0]) == {"out_of_memory": 1}

    kept, lines = _execute(src, tiny_model_dir, out)
    assert (f"memaudit: note: 1 finished unit of {out} holds 1 row the model failed to score "
            "(scoring_error 1); --retry-failed scores it again") in lines
    assert kept["units"] == {"total": 3, "resumed": 2}
    assert kept["counts"]["rejected_by_reason"] == {"scoring_error": 1} and kept["counts"]["scored"] == 5


def test_retry_failed_interrupted_leaves_the_unit_uncommitted(tmp_path, tiny_model_dir, monkeypatch):
    """--retry-failed uncommits a failing unit before scoring it: interrupted while scoring it again, the unit is
    no longer finished, so the next plain rerun scores it (the failure is not kept by the interruption)."""
    from audit.scorers import Scorer
    from audit.unit import Unit, failed_rows, unit_done

    src = tmp_path / "p.txt"
    src.write_text(PROMPTS)
    out = tmp_path / "out"
    original = _failing_launch(monkeypatch)
    _execute(src, tiny_model_dir, out)

    def interrupted(self, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(Scorer, "launch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _execute(src, tiny_model_dir, out, retry_failed=True)
    shards = out / "shards"
    units = {u.index: u for u in (Unit(**json.loads(p.read_text())["unit"]) for p in shards.glob("*.done.json"))}
    assert sorted(units) == [1]  # units 0 and 2 (the failing ones) are uncommitted, unit 1 untouched
    assert unit_done(shards, units[1]) and failed_rows(shards, units[1]) == {}
    monkeypatch.setattr(Scorer, "launch", original)
    again, lines = _execute(src, tiny_model_dir, out)
    assert again["units"] == {"total": 3, "resumed": 1}
    assert again["counts"]["scored"] == 6 and again["counts"]["rejected_by_reason"] == {}
    assert not any("failed to score" in line for line in lines), lines


def _night(runs, name, day, scored=3, **fields):
    """A finished run folder under ``runs``: a manifest started on 2026-01-0<day>, ``scored`` rows, and ``fields``."""
    d = runs / name
    d.mkdir()
    start = f"2026-01-0{day}T00:00:00+00:00"
    manifest = {"started_at": start, "first_started_at": start, "counts": {"scored": scored},
                "model": {"name": "m", "fingerprint": "fp1"},
                "score_config": {"scorer": "attention_entropy", "layers": ["x"], "seed": 0}} | fields
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_previous_run_passes_over_a_damaged_manifest_and_says_nothing_when_the_latest_is_taken(tmp_path):
    """A run folder whose manifest's counts is not a mapping (edited, damaged) made previous_run (memaudit diff
    RUNS NEW) die with AttributeError: 'list' object has no attribute 'get'; it is no baseline (its scored count
    cannot be read) and is passed over. When the latest earlier run has the new run's settings, nothing is said
    about passing one over."""
    from audit.diff import previous_run

    runs = tmp_path / "nightly"
    runs.mkdir()
    _night(runs, "a", 1)
    _night(runs, "b", 2)
    _night(runs, "c", 3, counts=[3])
    _night(runs, "d", 4, counts="3")
    new = _night(runs, "e", 5)
    said = []
    assert previous_run(runs, new, log=said.append) == runs / "b" and said == []


def test_a_generation_folder_of_another_scheduler_is_refused_naming_both(tmp_path):
    """generate.json records the sampler: a folder generated with DDIM (every folder before SD 2.x took its own
    scheduler) resumed by a generation on Euler is refused, naming the scheduler then and now."""
    from audit.cli.generate import _claim_folder
    from audit.errors import GenerateError

    options = {"model_fingerprint": "fp", "steps": 4, "scheduler": "EulerDiscreteScheduler"}
    previous = options | {"scheduler": "DDIMScheduler"}
    (tmp_path / "generate.json").write_text(json.dumps(previous))
    with pytest.raises(GenerateError) as err:
        _claim_folder(tmp_path, options, previous)
    assert str(err.value) == (f"--out {tmp_path} holds a generation with other options (scheduler: DDIMScheduler "
                              "then, EulerDiscreteScheduler now); use another --out or the same options to resume")
    _claim_folder(tmp_path, previous, previous)  # the same sampler resumes


@pytest.mark.parametrize("option, message", [
    ({"fpr": 1.0}, "fpr 1.0: must be a number strictly between 0 and 1"),
    ({"fpr": True}, "fpr True: must be a number strictly between 0 and 1"),
    ({"limit": True}, "limit True: must be an integer >= 1"),
    ({"steps": 2.0}, "steps 2.0: must be an integer >= 1"),
])
def test_lab_mitigation_measure_refuses_edge_options_before_the_model_loads(monkeypatch, option, message):
    """measure() (the Python API under ``memaudit lab mitigation``): an fpr of exactly 1 (a threshold at the
    lowest ordinary entropy), a bool for fpr or limit, a float step count are refused before anything loads."""
    import audit.lab.mitigation as lm
    from audit.lab import LAB_MODEL_DIR, LAB_PROMPTS

    monkeypatch.setattr(lm, "_lab", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(ValueError) as err:
        lm.measure(str(LAB_MODEL_DIR), str(LAB_PROMPTS), **option)
    assert str(err.value).startswith(message)


def test_ground_truth_key_changes_with_the_weights_the_mask_variant_and_the_data_only():
    """The lab build's ground-truth cache key (audit.lab.build.ground_truth_key): equal for the same EMA weights,
    mask variant and data configuration whatever the dict order or the raw (non-EMA) weights; different when any
    EMA tensor's bytes, a tensor's name, the mask variant or a data setting differs."""
    import dataclasses

    import torch

    from audit.lab.build import ground_truth_key
    from audit.lab.data import DataConfig

    config = DataConfig(seed=10, tier_weights=(1, 2), fixed_per_tier=1, varied_per_tier=1, captions_per_varied=2,
                        batch_size=4, planted_per_batch=2, cfg_drop=0.3)
    ema = {"b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.ones(2)}
    state = {"ema": ema, "unet": {"b.weight": torch.zeros(2, 3)}, "step": 4}
    key = ground_truth_key(state, config)
    assert len(key) == 64 and int(key, 16) >= 0
    reordered = {"ema": dict(reversed(list(ema.items()))), "unet": {}, "step": 5, "mask_padding": False}
    assert ground_truth_key(reordered, config) == key
    nudged = {**ema, "a.bias": torch.tensor([1.0, float(np.nextafter(np.float32(1), np.float32(2)))])}
    renamed = {"c.weight" if k == "b.weight" else k: v for k, v in ema.items()}
    others = [ground_truth_key({"ema": nudged}, config), ground_truth_key({"ema": renamed}, config),
              ground_truth_key({"ema": ema, "mask_padding": True}, config),
              ground_truth_key(state, dataclasses.replace(config, seed=11)),
              ground_truth_key(state, dataclasses.replace(config, tier_weights=(1, 3)))]
    assert len({key, *others}) == 6


def test_strict_json_makes_what_default_returns_standard_too():
    """strict_json (criteria.json, report.json, the lab model's memaudit.json, rejects' detail) wrote NaN as null
    only where the value was a float or numpy scalar: one that went through ``default=float`` (a 0-d tensor, a
    Decimal) raised ValueError 'Out of range float values are not JSON compliant', failing the lab build at its
    end. It is null too; finite ones keep their value."""
    from decimal import Decimal

    import torch

    from audit.sources import strict_json

    value = {"auroc": torch.tensor(float("nan")), "tpr": torch.tensor(0.5), "fpr": Decimal("Infinity"),
             "n": [np.float32("nan"), np.int64(3), Decimal("0.25")], "ok": 1.5}
    assert strict_json(value, default=float) == ('{"auroc": null, "tpr": 0.5, "fpr": null, "n": [null, 3, 0.25], '
                                                  '"ok": 1.5}')
    assert strict_json({"a": float("-inf"), "b": (1, float("nan"))}) == '{"a": null, "b": [1, null]}'


def test_an_infinite_first_step_entropy_is_nan_unflagged_and_mitigated(pipe, monkeypatch):
    """DetectAndMitigate reports a non-finite entropy as NaN (its documented value), whatever the non-finite value:
    an entropy of +inf compared above every threshold and read as flagged, -inf as cleared; both decide nothing,
    are not flagged, and are mitigated in 'flagged' mode (fail closed), the finite row as before."""
    import importlib

    from audit.mitigation import DetectAndMitigate
    from helpers import generate_np

    ae = importlib.import_module("audit.scorers.attention_entropy")
    real = ae.attention_entropy
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    prompts = ["a red cat", "an old boat on the lake at sunset", "a blue house"]

    def overflows(a):
        e = real(a)
        e[0], e[1] = float("inf"), float("-inf")
        return e

    monkeypatch.setattr(ae, "attention_entropy", overflows)
    with DetectAndMitigate(pipe, threshold=1e9, layers=[layer]) as dm:  # no finite entropy is above it
        generate_np(pipe, prompts, 3, 0)
    assert np.isnan(dm.entropy[:2].numpy()).all() and 0 < dm.entropy[2].item() < np.log(77)
    assert dm.flagged.tolist() == [False, False, False]
    assert dm.mitigated.tolist() == [True, True, False]


def test_build_pipeline_on_a_ddim_config_with_clip_sample_prints_no_deprecation(gen_pipeline, tmp_path):
    """build_pipeline sets DDIM's clip_sample to False itself: a scheduler config with clip_sample true (DDIM's
    default, so any PNDM or Euler config saved by diffusers) made StableDiffusionPipeline print a 25-line
    FutureWarning on every `memaudit generate`. The pipeline samples with DDIM, clip_sample False, no warning."""
    import warnings

    from audit.cli.generate import build_pipeline

    import shutil

    folder = shutil.copytree(gen_pipeline[0], tmp_path / "model")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"clip_sample": True}))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe, _ = build_pipeline(str(folder), device="cpu", dtype="float32")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.clip_sample is False
    assert [str(w.message)[:80] for w in seen if "clip_sample" in str(w.message)] == []


def test_read_ground_truth_takes_only_a_whole_matching_cache(tmp_path):
    """audit.lab.build.read_ground_truth: the cache is used only when both files are there and readable, of this
    step and model key, with one 6-d generations block per row; otherwise None, saying why in one line. A
    groundtruth.json whose rows were not a list of records (an int: TypeError from len(); a mapping of two: taken
    as two rows) or whose info was not a record failed the build instead of being measured again."""
    from audit.lab.build import read_ground_truth

    rows, info = [{"prompt": "a"}, {"prompt": "b"}], {"tau": 0.5}
    images = np.zeros((2, 1, 1, 3, 2, 2), np.float32)

    def cache(saved, generations=images):
        (tmp_path / "groundtruth.json").write_text(json.dumps(saved))
        np.save(tmp_path / "generations.npy", generations)
        said = []
        return read_ground_truth(tmp_path, 4, "k1", said.append), said

    assert read_ground_truth(tmp_path, 4, "k1", lambda m: pytest.fail(m)) is None  # no cache: nothing said
    (tmp_path / "groundtruth.json").write_text(json.dumps({"train_steps": 4, "model": "k1", "rows": rows,
                                                           "info": info}))
    assert read_ground_truth(tmp_path, 4, "k1", lambda m: pytest.fail(m)) is None  # half a cache: none either
    got, said = cache({"train_steps": 4, "model": "k1", "rows": rows, "info": info})
    assert said == [] and got[0] == rows and got[1] == info and got[2].shape == (2, 1, 1, 3, 2, 2)
    where = tmp_path / "groundtruth.json"
    for saved, generations, line in [
        ({"train_steps": 5, "model": "k1", "rows": rows, "info": info}, images,
         f"ground truth in {where} was measured at step 5, not 4: measuring again"),
        ({"train_steps": 4, "model": "k2", "rows": rows, "info": info}, images,
         f"ground truth in {where} was measured on another model at step 4 (other weights or data): measuring again"),
        ({"train_steps": 4, "rows": rows, "info": info}, images,
         f"ground truth in {where} was measured on another model at step 4 (other weights or data): measuring again"),
        ({"train_steps": 4, "model": "k1", "rows": rows, "info": info}, np.zeros((2, 12), np.float32),
         f"ground truth in {where}: generations.npy holds (2, 12) generations for 2 prompts: measuring again"),
        ({"train_steps": 4, "model": "k1", "rows": rows, "info": info}, images[:1],
         f"ground truth in {where}: generations.npy holds (1, 1, 1, 3, 2, 2) generations for 2 prompts: "
         "measuring again"),
        ([rows], images, f"ground truth in {where} is unreadable (TypeError: list indices must be integers or slices, "
                         "not str): measuring again"),
    ] + [({"train_steps": 4, "model": "k1", "rows": bad_rows, "info": bad_info}, images,
          f"ground truth in {where} is unreadable (TypeError: its rows are not a list of records, or its info not a "
          "record): measuring again")
         for bad_rows, bad_info in ((5, info), ({"0": rows[0], "1": rows[1]}, info), ([1, 2], info), (rows, None))]:
        assert cache(saved, generations) == (None, [line])


@pytest.mark.parametrize("option, value", [("workers", 2), ("address", "ray://head:10001"), ("engine", "local"),
                                           ("limit", 3), ("inputs", ["p.txt"])])
def test_auditor_refuses_every_option_of_another_engine_or_of_a_run_before_loading(tiny_model_dir, monkeypatch,
                                                                                     option, value):
    """audit.Auditor scores in this process with the model it keeps: --workers and --address (Ray's), --engine
    (even local), and run-only options are refused in one TypeError naming the option and why, before the model
    loads (workers=2 was otherwise taken and ignored)."""
    import audit
    import audit.models
    from audit.api import AUDITOR_REFUSES

    monkeypatch.setattr(audit.models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(TypeError) as err:
        audit.Auditor(model=str(tiny_model_dir), **{option: value})
    assert str(err.value) == (f"Auditor() takes no {option} ({AUDITOR_REFUSES[option]}); audit.run(inputs, out=..., "
                              "...) runs a whole audit")
    kept = "it scores in this process, with the model it keeps"
    assert AUDITOR_REFUSES["workers"] == AUDITOR_REFUSES["address"] == AUDITOR_REFUSES["engine"] == kept
