"""Findings of an outside contributor who added a scorer by the documented seam (docs/architecture.md, "How to add
a scorer"): what a broken ``compute`` did, what the registry accepted, and what the cache served."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from audit.cli import app
from audit.errors import ScorerError
from audit.scorers import Column, ScoreConfig, Scorer, ScorerSpec, register, unregister
from audit.unit import score_prompts

PROMPTS = ["a red cat on a beach", "old city street at night", "a blue dog"]


def _spread(ctx):
    """1 - BOS mass, float64 [B] on the device: a well-behaved toy score."""
    return 1.0 - ctx.a[:, 0]


def _bos(ctx):
    """BOS mass, float64 [B]."""
    return ctx.a[:, 0]


BAD_OUTPUTS = {
    # what compute returned -> the one line the run stops with (batch of 3 prompts on the CPU)
    "column": (lambda ctx: _spread(ctx)[:, None],
               "scorer uc_toy: compute(ctx) returned uc_score as a float64 tensor of shape [3, 1] on cpu; it must be "
               "a float64 torch tensor of shape [3] (one value per prompt of the batch) on cpu (.double() converts "
               "the dtype)"),
    "short": (lambda ctx: _spread(ctx)[:-1],
              "returned uc_score as a float64 tensor of shape [2] on cpu"),
    "per_draw": (lambda ctx: _spread(ctx).repeat(2),
                 "returned uc_score as a float64 tensor of shape [6] on cpu"),
    "scalar": (lambda ctx: _spread(ctx).sum(), "returned uc_score as a float64 tensor of shape [] on cpu"),
    "float32": (lambda ctx: _spread(ctx).float(), "returned uc_score as a float32 tensor of shape [3] on cpu"),
    "complex": (lambda ctx: _spread(ctx).to(torch.complex128),
                "returned uc_score as a complex128 tensor of shape [3] on cpu"),
    "bool": (lambda ctx: _spread(ctx) > 0.5, "returned uc_score as a bool tensor of shape [3] on cpu"),
    "meta": (lambda ctx: _spread(ctx).to("meta"), "returned uc_score as a float64 tensor of shape [3] on meta"),
    "numpy": (lambda ctx: _spread(ctx).numpy(),
              "returned uc_score as ndarray; it must be a float64 torch tensor of shape [3]"),
    "missing": (lambda ctx: {"other": _spread(ctx)},
                "scorer uc_toy: compute(ctx) returned no uc_score (its keys: other; registered columns: uc_score)"),
    "extra": (lambda ctx: {"uc_score": _spread(ctx), "debug": _spread(ctx)},
              "returned debug, not registered as its columns (its keys: uc_score, debug; registered columns: "
              "uc_score)"),
    "none": (lambda ctx: None, "scorer uc_toy: compute(ctx) returned NoneType, not a dict of its columns (uc_score)"),
}


def _toy(compute):
    """Register the toy scorer ``uc_toy`` whose compute is ``compute`` (a dict is returned as is, anything else as
    its one column ``uc_score``)."""
    def wrapped(ctx):
        out = compute(ctx)
        return out if isinstance(out, dict) or out is None else {"uc_score": out}

    return register(ScorerSpec(name="uc_toy", description="1 - BOS mass (test)", forward="partial_conditional",
                               compute=wrapped, risk_column="uc_score",
                               columns=(Column("uc_score", "double", "1 - bos_mass"),)))


@pytest.fixture
def toy():
    yield _toy
    unregister("uc_toy")


@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_a_compute_that_breaks_the_contract_stops_with_one_line_naming_scorer_and_column(tiny_model, toy, case):
    """A wrong shape was a torch ``stack`` error in every prompt's scoring_error (each prompt retried alone first), a
    float32 / bool value was cast silently, a complex one lost its imaginary part with a ComplexWarning, an extra
    key was dropped silently, a missing one was ``KeyError: 'uc_score'`` per row."""
    compute, message = BAD_OUTPUTS[case]
    toy(compute)
    s = Scorer(tiny_model, ScoreConfig("uc_toy", tuple(tiny_model.default_layers)))
    with pytest.raises(ScorerError) as err:
        score_prompts(s, PROMPTS, batch_size=3)
    assert message in str(err.value)


def test_a_well_behaved_compute_scores_as_before(tiny_model, toy):
    toy(_spread)
    s = Scorer(tiny_model, ScoreConfig("uc_toy", tuple(tiny_model.default_layers)))
    scores, _triggers, errors = score_prompts(s, PROMPTS, batch_size=3)
    assert errors == {}
    np.testing.assert_array_equal(scores["uc_score"], 1.0 - scores["bos_mass"])
    np.testing.assert_array_equal(scores["risk"], scores["uc_score"])


def test_memaudit_run_with_a_broken_scorer_exits_2_in_one_line_without_rejecting_rows(tmp_path, tiny_model_dir, toy):
    toy(BAD_OUTPUTS["column"][0])
    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"),
                                   "--scorer", "uc_toy", "--batch-size", "3", "--no-progress"])
    assert res.exit_code == 2, res.output
    assert ("memaudit: error: scorer uc_toy: compute(ctx) returned uc_score as a float64 tensor of shape [3, 1] on "
            "cpu") in res.output
    assert "scoring_error" not in res.output and not (tmp_path / "run" / "risk.parquet").exists()


def _spec(name="uc_reg", columns=("uc_reg_score",), **kw):
    kw = {"compute": _spread, "risk_column": columns[0] if columns else "attn_entropy"} | kw
    return ScorerSpec(name=name, description="test", forward="partial_conditional",
                      columns=tuple(Column(c, "double", "x") for c in columns), **kw)


def test_registering_another_scorer_under_a_taken_name_is_refused_naming_the_registered_one():
    """register() replaced a registered scorer silently: a contributor's scorer named noise_magnitude took over the
    built-in, and with it the noise_magnitude cache entries and calibrations (keyed by the name)."""
    from audit.scorers import SCORERS

    builtin = SCORERS["noise_magnitude"]
    with pytest.raises(ValueError, match=r"^scorer noise_magnitude is already registered \(compute "
                                         r"audit\.scorers\.noise_magnitude\.compute\): give yours another name, or "
                                         r"unregister\('noise_magnitude'\) first$"):
        register(_spec("noise_magnitude", ("uc_other",)))
    assert SCORERS["noise_magnitude"] is builtin
    assert register(builtin) is builtin  # the same scorer again (a module imported twice): fine
    try:
        first = register(_spec())
        assert register(_spec()) is not first and SCORERS["uc_reg"] == first  # an equal spec again: fine
        assert register(_spec(unet_forwards=2.0)).unet_forwards == 2.0  # its module's compute again: a reload
        with pytest.raises(ValueError, match=r"^scorer uc_reg is already registered \(compute "
                                             r"test_ucontrib_findings\._spread\)"):
            register(_spec(compute=_bos))  # another compute under the name
        with pytest.raises(ValueError, match="^scorer uc_reg is already registered"):
            register(_spec(compute=lambda ctx: {"uc_reg_score": _spread(ctx)}))
        assert SCORERS["uc_reg"].compute is _spread
        assert register(_spec(compute=_bos), replace=True).compute is _bos
    finally:
        unregister("uc_reg")


@pytest.mark.parametrize("kwargs, message", [
    ({"name": ""}, "scorer name '': give a letter then letters, digits or underscores (at most 64 characters)"),
    ({"name": "a,b"}, "scorer name 'a,b': give a letter"),
    ({"name": "my scorer"}, "scorer name 'my scorer': give a letter"),
    ({"name": "-x"}, "scorer name '-x': give a letter"),
    ({"name": "x" * 65}, "scorer name 'xxxx"),
    ({"name": 3}, "scorer name 3: give a letter"),
    ({"columns": ("bad/col",)}, "scorer uc_reg: column 'bad/col': give a letter"),
    ({"columns": ("prompt",)}, "scorer uc_reg: column prompt is a column every risk table already has"),
    ({"columns": ("uc_a", "uc_a")}, "scorer uc_reg: column uc_a is named twice"),
    ({"risk_column": "uc_typo"}, "scorer uc_reg: risk_column 'uc_typo' is neither one of its columns (uc_reg_score) "
                                 "nor attn_entropy"),
    ({"compute": None}, "scorer uc_reg: columns uc_reg_score but no compute to fill them"),
    ({"unet_forwards": 0}, "scorer uc_reg: unet_forwards 0 is not a positive number"),
    ({"min_steps": 0}, "scorer uc_reg: min_steps 0 is not a whole number from 1"),
])
def test_a_malformed_spec_is_refused_at_construction(kwargs, message):
    """Each of these was accepted: a name with a comma cannot be given to ``memaudit eval --scorers a,b``; a
    column named ``prompt`` duplicated a risk-table column; a risk_column typo or columns without a compute made
    every row a ``KeyError`` scoring_error."""
    kw = dict(kwargs)
    name, columns = kw.pop("name", "uc_reg"), kw.pop("columns", ("uc_reg_score",))
    with pytest.raises(ValueError) as err:
        _spec(name, columns, **kw)
    assert str(err.value).startswith(message)


def test_a_column_type_other_than_double_is_refused():
    with pytest.raises(ValueError, match="^scorer uc_reg: column uc_n has type 'int32'; a score column is 'double'"):
        ScorerSpec(name="uc_reg", description="t", forward="partial_conditional", compute=_spread,
                   risk_column="uc_n", columns=(Column("uc_n", "int32", "x"),))


def _times_ten(ctx):
    """10 x (1 - BOS mass): the toy formula after its author edited it."""
    return {"uc_reg_score": 10.0 * (1.0 - ctx.a[:, 0])}


def test_the_cache_does_not_serve_a_contributed_scorer_the_scores_of_its_previous_code(tmp_path, tiny_model_dir):
    """A contributor ran --cache, edited the formula (here: replaced compute) and ran again: every prompt was a cache
    hit and risk.parquet held the old formula's values (keyed by the scorer's name only). Now the second run scores
    every prompt anew; the same code again hits."""
    import pyarrow.parquet as pq

    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS) + "\n")

    def run(i):
        res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / f"r{i}"),
                                       "--scorer", "uc_reg", "--cache", str(tmp_path / "cache"), "--no-progress"])
        assert res.exit_code == 0, res.output
        return res.output, pq.read_table(tmp_path / f"r{i}" / "risk.parquet").to_pydict()

    try:
        register(_spec(compute=lambda ctx: {"uc_reg_score": _spread(ctx)}))
        out0, first = run(0)
        register(_spec(compute=_times_ten), replace=True)
        out1, second = run(1)
        _out2, third = run(2)
    finally:
        unregister("uc_reg")
    assert all("cache 0 rows hit, 3 rows scored by the model" in out for out in (out0, out1))
    assert first["prompt"] == second["prompt"] == third["prompt"]
    np.testing.assert_allclose(second["risk"], 10 * (1 - np.asarray(second["bos_mass"])), rtol=1e-12)
    np.testing.assert_allclose(second["risk"], 10 * np.asarray(first["risk"]), rtol=1e-12)
    assert third == second  # the same code: served from the cache


def test_editing_a_scorer_module_and_reloading_it_gives_a_cold_cache(tmp_path, tiny_model_dir, monkeypatch):
    """The contributor's loop: a scorer module, a run with --cache, the formula edited in the file, the module
    reloaded (it registers itself again), the same command: the edited formula's values, not the cached ones."""
    import importlib
    import sys

    import pyarrow.parquet as pq

    mod = tmp_path / "uc_edit_scorer.py"
    body = ('from audit.scorers import Column, ScorerSpec, register\n'
            'def compute(ctx):\n    return {"uc_edit": FACTOR * (1.0 - ctx.a[:, 0])}\n'
            'SPEC = register(ScorerSpec(name="uc_edit", description="t", forward="partial_conditional", '
            'compute=compute, risk_column="uc_edit", columns=(Column("uc_edit", "double", "x"),)))\n')
    mod.write_text("FACTOR = 1.0\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    risks = []
    try:
        module = importlib.import_module("uc_edit_scorer")
        for i in range(2):
            if i:
                mod.write_text("FACTOR = 3.0\n" + body)
                importlib.reload(module)
            res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out",
                                           str(tmp_path / f"r{i}"), "--scorer", "uc_edit", "--cache",
                                           str(tmp_path / "cache"), "--no-progress"])
            assert res.exit_code == 0, res.output
            assert "cache 0 rows hit, 3 rows scored by the model" in res.output
            risks.append(np.asarray(pq.read_table(tmp_path / f"r{i}" / "risk.parquet").column("risk")))
    finally:
        unregister("uc_edit")
        sys.modules.pop("uc_edit_scorer", None)
    np.testing.assert_allclose(risks[1], 3.0 * risks[0], rtol=1e-12)


def _nan_for_dogs(ctx):
    """1 - BOS mass, NaN for the prompts that mention a dog (float64 [B])."""
    value = (1.0 - ctx.a[:, 0]).clone()
    dog = torch.tensor(["dog" in p for p in ctx.prompts], device=value.device)
    return {"uc_reg_score": torch.where(dog, torch.full_like(value, float("nan")), value)}


def test_a_scorer_value_that_is_not_finite_is_rejected_naming_the_column_not_the_attention(tmp_path, tiny_model_dir):
    """A contributed scorer returning NaN for one prompt had that prompt rejected as nonfinite_attention with no
    detail, although its attention was finite: the reject now says which value it was."""
    import pyarrow.parquet as pq

    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    try:
        register(_spec(compute=_nan_for_dogs))
        res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"),
                                       "--scorer", "uc_reg", "--max-error-fraction", "1", "--no-progress"])
    finally:
        unregister("uc_reg")
    assert res.exit_code == 0, res.output
    rejects = pq.read_table(tmp_path / "r" / "rejects.parquet").to_pydict()
    assert (rejects["prompt"], rejects["reason"], rejects["detail"]) == (
        ["a blue dog"], ["nonfinite_attention"], ["uc_reg_score = nan (the scorer's value; the attention is finite)"])
    assert sorted(pq.read_table(tmp_path / "r" / "risk.parquet").column("prompt").to_pylist()) == sorted(PROMPTS[:2])
    manifest = __import__("json").loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["counts"]["rejected_by_reason"] == {"nonfinite_attention": 1}


def test_nonfinite_detail_names_the_attention_when_it_is_the_attention():
    from audit.unit import nonfinite_detail

    scores = {"attn_entropy": np.array([np.nan, 1.0, 1.0]), "uc": np.array([np.nan, np.inf, 2.0])}
    assert nonfinite_detail(scores, 0, ["uc"]) == "attn_entropy = nan"
    assert nonfinite_detail(scores, 1, ["uc"]) == "uc = inf (the scorer's value; the attention is finite)"
    assert nonfinite_detail(scores, 2, ["uc"]) == "attention probabilities not finite in a selected layer"


def test_a_calibration_or_run_folder_of_a_scorers_previous_code_is_refused(tmp_path, tiny_model_dir):
    """A calibration made on a reference run of a contributed scorer was applied to the risks of its edited formula
    (every prompt flagged: the threshold of one formula against the values of another), and a run folder started
    with the old formula resumed with the new one. Both are now refused naming scorer_code; a shipped scorer's
    recorded configuration is unchanged."""
    from audit.scorers.registry import recorded_config

    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS) + "\n")

    def cli(*args):
        return CliRunner().invoke(app, [*args, "--no-progress"] if args[0] == "run" else list(args))

    run = ["run", str(src), "--model", str(tiny_model_dir), "--scorer", "uc_reg"]
    try:
        register(_spec(compute=lambda ctx: {"uc_reg_score": _spread(ctx)}))
        assert cli(*run, "--out", str(tmp_path / "ref")).exit_code == 0
        res = cli("calibrate", str(tmp_path / "ref"), "--fpr", "0.5", "-o", str(tmp_path / "cal.json"))
        assert res.exit_code == 0, res.output
        assert cli(*run, "--out", str(tmp_path / "ok"), "--calibration", str(tmp_path / "cal.json")).exit_code == 0
        register(_spec(compute=_times_ten), replace=True)
        res = cli(*run, "--out", str(tmp_path / "new"), "--calibration", str(tmp_path / "cal.json"))
        assert res.exit_code == 2 and "was made for another score configuration (scorer_code: " in res.output
        res = cli(*run, "--out", str(tmp_path / "ref"))
        assert res.exit_code == 2 and "holds a different run: score_config.scorer_code.code: " in res.output
        assert "The scorer's code changed since this folder was started" in " ".join(res.output.split())
        assert "rerun the original command" not in res.output
    finally:
        unregister("uc_reg")
    assert recorded_config({"scorer": "noise_magnitude", "seed": 0}) == {"scorer": "noise_magnitude", "seed": 0}


def _noisy(ctx):
    """1 - BOS mass plus torch's global uniform noise: not a function of the prompt."""
    return {"uc_reg_score": 1.0 - ctx.a[:, 0] + torch.rand(ctx.b, dtype=torch.float64)}


def _seeded_noise(ctx):
    """1 - BOS mass plus noise from a generator seeded by each prompt: deterministic."""
    from audit.scorers import prompt_seed

    extra = [torch.rand(1, generator=torch.Generator().manual_seed(prompt_seed(0, p)), dtype=torch.float64)
             for p in ctx.prompts]
    return {"uc_reg_score": 1.0 - ctx.a[:, 0] + torch.cat(extra)}


def test_a_scorer_drawing_from_the_global_generator_is_refused_on_its_first_batch(tiny_model):
    """A compute using torch.rand scored, cached and calibrated other values on every run, silently."""
    try:
        register(_spec(compute=_noisy))
        s = Scorer(tiny_model, ScoreConfig("uc_reg", tuple(tiny_model.default_layers)))
        with pytest.raises(ScorerError, match=r"^scorer uc_reg: compute\(ctx\) gave other uc_reg_score values when "
                                              r"called twice on the same batch \(largest difference 0\.\d+"):
            score_prompts(s, PROMPTS, batch_size=3)
        register(_spec(compute=_seeded_noise), replace=True)
        s = Scorer(tiny_model, ScoreConfig("uc_reg", tuple(tiny_model.default_layers)))
        scores, _t, errors = score_prompts(s, PROMPTS, batch_size=3)
        assert errors == {}
        again, _t, _e = score_prompts(Scorer(tiny_model, ScoreConfig("uc_reg", tuple(tiny_model.default_layers))),
                                      PROMPTS, batch_size=3)
        np.testing.assert_array_equal(scores["uc_reg_score"], again["uc_reg_score"])
        assert not np.array_equal(scores["uc_reg_score"], 1.0 - scores["bos_mass"])
    finally:
        unregister("uc_reg")


def test_a_scorer_registered_by_a_script_is_refused_for_ray_before_ray_starts(tmp_path):
    """audit.run(..., scorer=<registered in this script>, engine="ray") started Ray and its actors, then failed
    with 'the scoring workers could not start: --scorer rr: choose one of attention_entropy, ...' (the workers
    import audit.scorers, not the script). Now refused in one line before anything starts; the local engine runs it."""
    from audit.config import RunConfig, validate_config
    from audit.errors import RunError
    from audit.scorers import ON_IMPORT

    assert {"attention_entropy", "noise_magnitude"} <= ON_IMPORT
    try:
        register(_spec())
        with pytest.raises(RunError, match=r"^--scorer uc_reg was registered by a register\(\) call in this process, "
                                           r"which the --engine ray workers do not run"):
            validate_config(RunConfig(inputs=("x.txt",), scorer="uc_reg", engine="ray", workers=1))
        validate_config(RunConfig(inputs=("x.txt",), scorer="uc_reg", engine="local"))
    finally:
        unregister("uc_reg")
    validate_config(RunConfig(inputs=("x.txt",), scorer="noise_magnitude", engine="ray", workers=1))


def test_register_family_refuses_a_taken_name_and_a_bare_string_of_pipeline_classes(tiny_model_dir):
    """A contributor's adapter subclass that kept name = "sd1" replaced SD 1.x silently; one whose pipeline_classes
    was a bare string ("StableDiffusionPipeline", not a tuple) was registered and, asked first, claimed every SD 1.x
    folder (``cls in "StableDiffusionPipeline"`` is a substring test)."""
    from audit.models import FAMILIES, SD1, detect_family, register_family
    from audit.models.sd1 import SD1Adapter

    class Mine(SD1Adapter):
        name = "sd1"

    class Bare(SD1Adapter):
        name = "uc_bare"
        pipeline_classes = "StableDiffusionPipeline"

    class Nameless(SD1Adapter):
        name = "uc bad"

    with pytest.raises(ValueError, match=r"^model family sd1 is already registered \(audit\.models\.sd1\.SD1Adapter\)"):
        register_family(Mine())
    with pytest.raises(ValueError, match=r"^model family uc_bare: pipeline_classes 'StableDiffusionPipeline' is not a "
                                         r"non-empty tuple of names \(write \('StableDiffusionPipeline',\) for one\)$"):
        register_family(Bare())
    with pytest.raises(ValueError, match=r"^model family name 'uc bad': give a letter"):
        register_family(Nameless())
    with pytest.raises(ValueError, match="^register_family.. takes a ModelAdapter instance"):
        register_family(SD1Adapter)
    assert FAMILIES["sd1"] is SD1 and "uc_bare" not in FAMILIES
    assert register_family(SD1Adapter()) is FAMILIES["sd1"]  # the same adapter class again: replaced
    try:
        assert detect_family(tiny_model_dir)[0] is FAMILIES["sd1"]
    finally:
        register_family(SD1, replace=True)
    assert FAMILIES["sd1"] is SD1


def _raises(ctx):
    raise ZeroDivisionError("uc formula divided by zero")


def test_eval_with_a_scorer_that_raises_exits_2_naming_the_scorer(tmp_path, tiny_model_dir):
    """memaudit eval with a scorer whose compute raised printed 'memaudit: error: ZeroDivisionError: ...' and exited 1
    (anything unexpected), naming neither the scorer nor what to do."""
    src = tmp_path / "labelled.csv"
    src.write_text("prompt,memorized\n" + "\n".join(f"{p},{i % 2 == 0}" for i, p in enumerate(PROMPTS)) + "\n")
    try:
        register(_spec(compute=_raises))
        res = CliRunner().invoke(app, ["eval", str(src), "--model", str(tiny_model_dir), "--scorers",
                                       "attention_entropy,uc_reg", "--bootstrap", "10"])
    finally:
        unregister("uc_reg")
    assert res.exit_code == 2, res.output
    assert ("memaudit: error: scorer uc_reg raised while scoring (ZeroDivisionError: uc formula divided by zero); "
            "`memaudit run LABELLED --scorer uc_reg` scores prompt by prompt") in " ".join(res.output.split())


def _broken_check(model, family):
    return model.no_such_attribute


def _refusing_check(model, family):
    from audit.errors import ModelError

    raise ModelError(f"uc_reg is not defined for {family}")


def test_a_check_that_raises_is_a_one_line_error_naming_the_scorer(tmp_path, tiny_model_dir):
    """A contributed check(model, family) with a bug ended memaudit run with 'memaudit: error: AttributeError:
    'LoadedModel' object has no attribute ...' and exit 1; a ModelError (the documented refusal) is said as it is."""
    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    outputs = []
    try:
        for check in (_broken_check, _refusing_check):
            register(_spec(check=check), replace=True)
            res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out",
                                           str(tmp_path / check.__name__), "--scorer", "uc_reg", "--no-progress"])
            outputs.append((res.exit_code, " ".join(res.output.split())))
    finally:
        unregister("uc_reg")
    assert outputs[0][0] == 2 and ("memaudit: error: scorer uc_reg: its check(model, family) raised AttributeError: "
                                   "'LoadedModel' object has no attribute 'no_such_attribute' (a check refuses a model "
                                   "by raising audit.errors.ModelError)") in outputs[0][1]
    assert outputs[1][0] == 2 and "memaudit: error: uc_reg is not defined for sd1" in outputs[1][1]


def test_a_spec_replacing_a_shipped_scorer_is_keyed_by_its_code():
    """A spec registered under a shipped name with replace=True was keyed by the name alone, sharing the shipped
    scorer's cache entries and calibrations; the shipped four, as their modules register them, are not keyed."""
    from audit.scorers import SCORERS
    from audit.scorers.registry import SHIPPED, code_identity, is_shipped

    assert all(is_shipped(SCORERS[n]) and code_identity(SCORERS[n]) is None for n in SHIPPED)
    builtin = SCORERS["noise_magnitude"]
    try:
        mine = register(_spec("noise_magnitude", ("uc_nm",)), replace=True)
        assert not is_shipped(mine)
        assert code_identity(mine)["columns"] == ["uc_nm"] and len(code_identity(mine)["code"]) == 16
    finally:
        register(builtin, replace=True)
    assert SCORERS["noise_magnitude"] is builtin
