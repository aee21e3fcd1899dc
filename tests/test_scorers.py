"""The scorer registry: the columns derive from it, unknown names get a "did you mean", and a new scorer
is one module plus its registration (a toy one runs through ``memaudit run``, the cache and the report)."""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from audit.cli import app
from audit.errors import RunError
from audit.scorers import SCORERS, Column, ScorerSpec, get_scorer, register, score_columns, unregister
from audit.tables import arrow_schema, load_schema, schema_fields


def test_builtin_scorers_are_registered_with_what_they_need():
    assert list(SCORERS)[:2] == ["attention_entropy", "noise_magnitude"]
    ent, mag = SCORERS["attention_entropy"], SCORERS["noise_magnitude"]
    assert (ent.forward, ent.unet_forwards, ent.higher_is_riskier, ent.columns) == ("partial_conditional", 1.0, True, ())
    assert (mag.forward, mag.unet_forwards, [c.name for c in mag.columns]) == \
        ("full_conditional_unconditional", 2.0, ["noise_magnitude"])


def test_schemas_risk_json_lists_the_registry_columns():
    """risk.json is the published schema; its score columns must be what the registry derives."""
    assert schema_fields("risk") == load_schema("risk")["fields"]


def test_unknown_scorer_lists_the_scorers_and_suggests_one():
    # every registered scorer, in registration order (the shipped four first: a contributed scorer added to BUILTIN
    # extends the list, docs/architecture.md, and needs no change here)
    assert list(SCORERS)[:4] == ["attention_entropy", "noise_magnitude", "guidance_geometry", "attention_entropy_late"]
    with pytest.raises(RunError, match=re.escape(f"choose one of {', '.join(SCORERS)} (did you mean "
                                                 "'attention_entropy'?)")):
        get_scorer("attention_entropie")
    res = CliRunner().invoke(app, ["run", "x.txt", "--scorer", "noise_magnitud"])
    assert res.exit_code == 2 and "did you mean 'noise_magnitude'" in res.output


def _toy_compute(ctx):
    """Toy score: 1 - BOS mass (float64 [B], on the device)."""
    return {"toy_score": 1.0 - ctx.a[:, 0]}


@pytest.fixture
def toy_scorer():
    spec = register(ScorerSpec(name="toy", description="1 - BOS mass (a test scorer)", forward="partial_conditional",
                               compute=_toy_compute, risk_column="toy_score",
                               columns=(Column("toy_score", "double", "1 - bos_mass"),)))
    yield spec
    unregister("toy")


def test_a_toy_scorer_runs_through_run_cache_and_report(tmp_path, tiny_model_dir, toy_scorer):
    src = tmp_path / "p.txt"
    src.write_text("a red cat\na blue dog on a beach\nold city street\na red cat\n")
    assert "toy_score" in [c.name for c, _ in score_columns()]
    assert "toy_score" in arrow_schema("risk").names
    runs = []
    for i in range(2):  # the second run reads every score from the cache
        out = tmp_path / f"run{i}"
        res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out", str(out),
                                       "--scorer", "toy", "--cache", str(tmp_path / "cache"), "--no-progress"])
        assert res.exit_code == 0, res.output
        runs.append(pq.read_table(out / "risk.parquet").to_pydict())
    assert "cache 4 rows hit, 0 rows scored by the model" in res.output  # rows: 3 prompts on 4 rows
    first, second = runs
    assert first == second and len(first["risk"]) == 4
    np.testing.assert_array_equal(first["risk"], first["toy_score"])
    np.testing.assert_allclose(first["toy_score"], 1 - np.asarray(first["bos_mass"]), rtol=0, atol=1e-12)
    assert first["noise_magnitude"] == [None] * 4  # another scorer's column stays null
    assert all(first["trigger_tokens"])
    res = CliRunner().invoke(app, ["report", str(tmp_path / "run0"), "--format", "md"])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "run0" / "report.md").read_text()
    assert "scorer toy" in text and "beach" in text
