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
