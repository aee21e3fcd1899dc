"""Behaviours of the run configuration, the runner's exit gates and the published scorers that a mutation
review found no test pinned: the bounds of each option (:func:`audit.config.validate_config`), the types
:func:`audit.config.checked_option` takes and refuses, ``{config_dir}`` and a path with a comma in a config file,
which flags count as given, the gates' denominators and boundaries, and the scorers' formulas checked against
values derived by hand."""

from __future__ import annotations

import math
import types

import pytest

from audit.config import RunConfig, checked_option, load_config_file, run_config, validate_config
from audit.errors import ConfigError, RunError


def _cfg(**kw) -> RunConfig:
    return RunConfig(inputs=("x.parquet",), **kw)


# ---- validate_config: each bound, both sides


@pytest.mark.parametrize("kw, message", [
    ({"steps": 0}, "--steps must be at least 1"),
    ({"workers": 0}, "--workers must be at least 1"),
    ({"stall_timeout": math.inf}, "--stall-timeout inf: give 0 (never) or a finite number of seconds"),
    ({"stall_timeout": -1.0}, "--stall-timeout -1.0: give 0 (never) or a finite number of seconds"),
    ({"batch_size": True}, "--batch-size True: give an integer from 1 to 65,536"),
    ({"batch_size": 65_537}, "--batch-size 65537: give an integer from 1 to 65,536"),
    ({"layers": ("down_blocks.0.attn2", "")}, "--layers: give cross-attention module paths, comma separated"),
    ({"noise_generator": "pcg64"}, "--noise-generator 'pcg64': choose mt19937 or philox"),
    ({"engine": "dask"}, "--engine dask: choose one of local, ray"),
    ({"keep_columns": ("user", "reason")}, "--keep-columns reason: memaudit's output tables have a column"),
    ({"device": "cuda:1x"}, "--device cuda:1x: choose auto, cpu, cuda or cuda:N"),
    ({"device": "cpu0"}, "--device cpu0: choose auto, cpu, cuda or cuda:N"),
])
def test_each_bad_option_is_refused_with_its_message(kw, message):
    """--steps 0 (no timestep), --workers 0, --stall-timeout inf (never, yet written as Infinity: invalid JSON),
    --batch-size true from a TOML file, an empty layer in a list, an unknown noise generator or engine, a kept
    column named like a rejects.parquet column (reason), and a device name with trailing characters."""
    with pytest.raises(RunError) as err:
        validate_config(_cfg(**kw))
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize("kw", [{"steps": 1}, {"workers": 1}, {"batch_size": 65_536}, {"batch_size": 1},
                                {"prepare_threads": 0}, {"prepare_threads": 1}, {"stall_timeout": 0.0},
                                {"stall_timeout": None}, {"device": "cuda:12"}, {"device": "mps"},
                                {"layers": ("a.attn2", "b.attn2")}, {"noise_generator": "philox"}])
def test_the_edges_of_each_option_are_accepted(kw):
    """--steps 1, --workers 1, --batch-size 65,536 (the largest), --prepare-threads 0 (in the scoring thread, as
    --help says), a zero stall timeout (never), cuda:N with several digits."""
    validate_config(_cfg(**kw))


# ---- checked_option (TOML files and audit.run's keyword options)


def test_checked_option_converts_ints_to_floats_and_refuses_bools_and_none():
    """An int for a float option becomes a float (``max_error_fraction = 1`` in TOML is recorded as 1.0), a bool
    is not a number nor an int (``seed = true``), and None is refused where the option has no None."""
    got = checked_option("max_error_fraction", 1, "--config c.toml")
    assert got == 1.0 and type(got) is float
    with pytest.raises(ConfigError, match=r"^--config c.toml: 'max_error_fraction' must be a number$"):
        checked_option("max_error_fraction", True, "--config c.toml")
    with pytest.raises(ConfigError, match=r"^audit.run\(\): 'seed' must be int, not bool$"):
        checked_option("seed", True, "audit.run()")
    with pytest.raises(ConfigError, match=r"^audit.run\(\): 'seed' must be int, not None$"):
        checked_option("seed", None, "audit.run()")
    with pytest.raises(ConfigError, match=r"^audit.run\(\): 'batch_size' must be int or str, not None$"):
        checked_option("batch_size", None, "audit.run()")
    assert checked_option("limit", None, "x") is None and checked_option("seed", 7, "x") == 7


def test_a_config_files_inputs_string_is_one_path_and_config_dir_is_absolute(tmp_path, monkeypatch):
    """``inputs = "a,b.parquet"`` names one file (only layers and keep_columns are comma lists), and
    ``{config_dir}`` is the file's folder as an absolute path even when --config is given relative."""
    (tmp_path / "c.toml").write_text('inputs = "logs/a,b.parquet"\nkeep_columns = "user, app"\n'
                                     'calibration = "{config_dir}/cal.json"\n')
    monkeypatch.chdir(tmp_path)
    got = load_config_file("c.toml")
    assert got["inputs"] == ("logs/a,b.parquet",) and got["keep_columns"] == ("user", "app")
    assert got["calibration"] == str(tmp_path.resolve()) + "/cal.json"


def test_only_flags_from_the_command_line_override_the_file(tmp_path):
    """A value from click's default map (DEFAULT_MAP) or the default (DEFAULT) is not a given flag: the file's
    value wins; a value from the command line (or the environment) wins over the file."""
    (tmp_path / "c.toml").write_text('inputs = "logs/"\nseed = 3\nsteps = 25\n')
    from dataclasses import fields

    values = {f.name: f.default for f in fields(RunConfig) if f.name != "inputs"} | {"inputs": ()}
    values |= {"seed": 9, "steps": 10}
    sources = {"seed": "DEFAULT_MAP", "steps": "DEFAULT"}

    def ctx(src):
        return types.SimpleNamespace(get_parameter_source=lambda name: (
            types.SimpleNamespace(name=src[name]) if name in src else None))

    cfg = run_config(ctx(sources), tmp_path / "c.toml", values)
    assert (cfg.seed, cfg.steps, cfg.inputs) == (3, 25, ("logs/",))
    cfg = run_config(ctx({"seed": "COMMANDLINE", "steps": "ENVIRONMENT"}), tmp_path / "c.toml", values)
    assert (cfg.seed, cfg.steps) == (9, 10)


def test_a_cache_inside_the_run_folder_is_refused(tmp_path):
    """--cache OUT/cache (the run folder around the cache) is refused like --out CACHE/run."""
    run, cache = tmp_path / "run", tmp_path / "run" / "cache"
    with pytest.raises(RunError) as err:
        validate_config(_cfg(out=str(run), cache=str(cache)))
    assert str(err.value) == (f"--cache {cache} and --out {run}: give the score cache a folder of its own, neither "
                              "the run folder nor inside it (nor the run inside the cache)")
    validate_config(_cfg(out=str(tmp_path / "run"), cache=str(tmp_path / "cache")))  # side by side: fine


# ---- the runner's exit gates (audit.runner): pure functions of the manifest's counts


def _counts(rows_read, scored, **reasons):
    return {"counts": {"rows_read": rows_read, "scored": scored, "rejected_by_reason": reasons}}


def test_out_of_memory_rows_count_as_scoring_failures(tmp_path):
    """A row that ran out of memory reached the model and was not scored: 3 of 100 is past 2%."""
    from audit.gates import error_gate

    cfg = _cfg(max_error_fraction=0.02)
    assert error_gate(cfg, tmp_path, _counts(100, 97, out_of_memory=3)) == (
        f"3 of 100 rows (3.0%) could not be scored (out_of_memory 3), more than --max-error-fraction 0.02. "
        f"The outputs in {tmp_path} hold what was scored.")
    assert error_gate(cfg, tmp_path, _counts(100, 98, out_of_memory=2)) is None


def test_coverage_gate_counts_rows_without_the_id_column_and_leaves_nothing_scored_to_its_own_gate():
    """Rows of a file without the --id-column are input failures (5 of 100 read, past 1%); a run that scored
    nothing gets nothing_scored's message, not the coverage gate's."""
    from audit.gates import coverage_gate, nothing_scored, run_failure

    cfg = _cfg(max_error_fraction=0.01)
    msg = coverage_gate(cfg, _counts(100, 95, missing_id_column=5))
    assert msg.startswith("5 of 100 rows read (5.0%) could not be read as prompts (missing_id_column 5), more "
                          "than --max-error-fraction 0.01: the audit covers only part of its input"), msg
    none = _counts(100, 0, missing_prompt_column=100)
    assert coverage_gate(cfg, none) is None
    expected = ("nothing was scored: all 100 rows read were rejected (missing_prompt_column 100); rejects.parquet "
                "says why for each")
    assert nothing_scored(none) == expected and run_failure(cfg, None, none) == expected
    assert run_failure(cfg, None, none, nothing_scored_ok=True) is None


def test_run_failure_applies_each_gate_in_order(tmp_path):
    """The error gate first (with or without nothing_scored_ok), then nothing scored, then coverage."""
    from audit.gates import run_failure

    cfg = _cfg(max_error_fraction=0.01)
    both = _counts(100, 50, scoring_error=10, missing_prompt_column=40)
    assert run_failure(cfg, tmp_path, both).startswith("10 of 60 rows (16.7%) could not be scored (scoring_error 10)")
    assert run_failure(cfg, tmp_path, both, nothing_scored_ok=True).startswith("10 of 60 rows (16.7%)")
    lost = _counts(100, 60, missing_prompt_column=40)
    assert run_failure(cfg, tmp_path, lost).startswith("40 of 100 rows read (40.0%) could not be read as prompts")
    failed_all = _counts(5, 0, scoring_error=5)
    assert run_failure(cfg, tmp_path, failed_all).startswith("5 of 5 rows (100.0%) could not be scored")


def test_nothing_scored_edges():
    """One row scored is a scored run; no rows and no unreadable files only warn (None); one unreadable file
    with nothing read is a failure naming it; one row read says 'the 1 row read was'."""
    from audit.gates import nothing_scored

    assert nothing_scored(_counts(10, 1, null_prompt=9)) is None
    assert nothing_scored(_counts(0, 0)) is None
    assert nothing_scored(_counts(0, 0) | {"skipped_files": [{"url": "a.parquet", "reason": "gone"}]}) is None
    bad = _counts(0, 0) | {"skipped_files": [{"url": "a.parquet", "reason": "not Parquet", "unreadable": True}]}
    assert nothing_scored(bad) == ("nothing was scored: every input file with rows was skipped as unreadable (1 "
                                   "under --skip-bad-files; manifest.json skipped_files says why for each), the "
                                   "first: not Parquet")
    one = _counts(1, 0, null_prompt=1) | {"files": [{"format": "parquet", "rows": 1}]}
    assert nothing_scored(one) == ("nothing was scored: the 1 row read was rejected (null_prompt 1); rejects.parquet "
                                   "says why for each (a wrong --prompt-column?)")
    txt = _counts(1, 0, empty_prompt=1) | {"files": [{"format": "txt", "rows": 1}, {"format": "csv", "rows": 0}]}
    assert nothing_scored(txt).endswith("rejects.parquet says why for each")  # .txt has no columns: no hint


def test_durations_at_the_minute_and_hour_boundaries():
    """3600 s is 1h00m (not 60m00s), 60 s is 1m00s, 59.6 s rounds to 1m00s and 3599.6 s to 1h00m."""
    from audit.runner import _duration

    assert [_duration(s) for s in (59.4, 59.6, 60, 3599.4, 3599.6, 3600, 7260)] == \
        ["59s", "1m00s", "1m00s", "59m59s", "1h00m", "1h00m", "2h01m"]



def test_steps_reaches_the_scorer(tmp_path, tiny_model_dir, tiny_model):
    """--steps 10 scores at the first timestep of a 10-step DDIM sampling: leading spacing, 1000 // 10 = 100
    apart, offset 1 -> 901 (not 981, the first of 50)."""
    import numpy as np
    import polars as pl

    from audit.scorers import ScoreConfig, Scorer

    from helpers import run_audit

    src = tmp_path / "p.txt"
    src.write_text("a red cat on the beach\nold city street at night\n")
    out, manifest = run_audit([src], tiny_model_dir, tmp_path / "r", steps=10, device="cpu")
    assert manifest["score_config"]["num_inference_steps"] == 10 and manifest["score_config"]["first_timestep"] == 901
    risk = pl.read_parquet(out / "risk.parquet").sort("row")["risk"].to_numpy()
    layers = tuple(tiny_model.default_layers)
    at10 = Scorer(tiny_model, ScoreConfig("attention_entropy", layers, num_inference_steps=10))
    at50 = Scorer(tiny_model, ScoreConfig("attention_entropy", layers))
    assert (at10.first_timestep, at50.first_timestep) == (901, 981)
    prompts = src.read_text().splitlines()
    np.testing.assert_allclose(risk, at10.score(prompts)["risk"], rtol=1e-6)
    assert not np.allclose(risk, at50.score(prompts)["risk"], rtol=1e-6)


# ---- scorers


def test_guidance_geometry_weights_from_the_models_memaudit_json_win():
    """``"guidance_geometry_weights": [gamma1, gamma2]`` in a model's memaudit.json sets the norm and cosine
    weights, in that order, over the family's published ones and for a family without them."""
    from audit.scorers.guidance_geometry import check_weights, weights_for

    class Model:
        extra = {"guidance_geometry_weights": [3, 0.5]}
        unet = types.SimpleNamespace(config=types.SimpleNamespace(cross_attention_dim=1024))

    for family in ("sd1", "sd2", "sdxl"):
        got = weights_for(Model(), family)
        assert got == (3.0, 0.5) and all(type(w) is float for w in got)
    check_weights(Model(), "sdxl")  # not refused: the file gives weights


def test_the_registry_refuses_clashing_columns_and_bad_specs_and_replaces_by_name():
    """A scorer writing another scorer's column (noise_magnitude) or a per-layer column is refused; registering
    the same scorer again replaces it (no clash with its own columns), another under its name only with replace=True; a scheduler other than family or
    ddim, or an unknown forward, is refused at construction."""
    from audit.scorers.registry import SCORERS, Column, ScorerSpec, register, unregister

    def compute(ctx):  # never called: the specs are only registered
        return {}

    def spec(*columns, **kw):
        return ScorerSpec(name="toy_mutant", description="toy", forward="partial_conditional", compute=compute,
                          risk_column="attn_entropy", columns=tuple(Column(c, "double", "x") for c in columns), **kw)

    try:
        for taken in ("noise_magnitude", "attn_entropy_l03", "risk"):
            with pytest.raises(ValueError, match=f"^scorer toy_mutant: columns {taken} are already written by "
                                                 "another scorer$"):
                register(spec("toy_own", taken))
            assert "toy_mutant" not in SCORERS
        first = register(spec("toy_own"))
        with pytest.raises(ValueError, match="^scorer toy_mutant is already registered"):
            register(spec("toy_own", unet_forwards=2.0))  # another scorer under a taken name: refused
        assert SCORERS["toy_mutant"] is first
        assert register(spec("toy_own")) is not first  # an equal spec again: replaced
        again = register(spec("toy_own", unet_forwards=2.0), replace=True)  # replaced when asked
        assert SCORERS["toy_mutant"] is again and again is not first and again.unet_forwards == 2.0
        nm = SCORERS["noise_magnitude"]
        assert register(nm) is nm and SCORERS["noise_magnitude"] is nm
    finally:
        unregister("toy_mutant")
    assert "toy_mutant" not in SCORERS
    with pytest.raises(ValueError, match="^scorer toy_mutant: scheduler 'euler' is not 'family' or 'ddim'$"):
        spec(scheduler="euler")
    with pytest.raises(ValueError, match="^scorer toy_mutant: forward 'bogus' is not one of partial_conditional, "):
        ScorerSpec(name="toy_mutant", description="toy", forward="bogus", compute=None, risk_column="attn_entropy")


def test_nothing_scored_ok_leaves_out_only_the_nothing_scored_gate(tmp_path):
    """``nothing_scored_ok`` leaves out nothing_scored, as run_failure's docstring says, not the coverage gate too
    (``None if ok else a or b`` read the ``or`` inside the else). 40 of 100 rows without the prompt column, 60
    scored: the coverage gate fails the run either way; every row rejected: only without nothing_scored_ok."""
    from audit.gates import run_failure

    cfg = _cfg(max_error_fraction=0.01)
    lost = _counts(100, 60, missing_prompt_column=40)
    assert run_failure(cfg, tmp_path, lost, nothing_scored_ok=True).startswith(
        "40 of 100 rows read (40.0%) could not be read as prompts")
    none = _counts(3, 0, empty_prompt=3) | {"files": [{"format": "txt", "rows": 3}]}
    assert run_failure(cfg, tmp_path, none, nothing_scored_ok=True) is None
    assert run_failure(cfg, tmp_path, none).startswith("nothing was scored: all 3 rows read were rejected")
