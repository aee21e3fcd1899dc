"""Behaviours of the two-stage scoring (audit/cascade.py) that a mutation review found no test pinned: the tie
rules of the re-ranking, a NaN confirming score, resumed counts after a rerun with another cut, the forwards of
a full-sampling confirming scorer, and the option and probe refusals. Stage 2 runs on a hand-made risk table
with a stub confirming scorer whose scores are chosen by hand, so every expected row is derived by hand."""

from __future__ import annotations

import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.errors import ModelError, RunError


class _StubScorer:
    """What run_confirm uses of a Scorer: a full-sampling spec (2 forwards a step: CFG), 4 steps, 2 noise draws."""

    def __init__(self, values):
        self.values = values  # prompt -> (score, nonfinite)
        self.scored = []
        self.spec = types.SimpleNamespace(name="toy", columns=[types.SimpleNamespace(name="toy")], risk_column="toy",
                                          higher_is_riskier=True, forward="full_sampling", unet_forwards=1.0)
        self.config = types.SimpleNamespace(num_inference_steps=4, noise_draws=2,
                                            to_dict=lambda: {"scorer": "toy", "num_inference_steps": 4})
        self.model = types.SimpleNamespace(fingerprint="F")

    def score(self, prompts):
        self.scored.extend(prompts)
        return {"toy": np.array([self.values[p][0] for p in prompts]),
                "nonfinite": np.array([self.values[p][1] for p in prompts])}


def _stage1(out):
    """Five rows in the screening rank order; prompt A twice (prompt_id 3 listed before 1)."""
    rows = [(3, "A", 0.9), (1, "A", 0.9), (2, "B", 0.8), (0, "C", 0.7), (4, "D", 0.6)]
    out.mkdir()
    pq.write_table(pa.table({"prompt_id": [r[0] for r in rows], "prompt": [r[1] for r in rows],
                             "prompt_hash": ["h" + r[1] for r in rows], "risk": [r[2] for r in rows],
                             "rank": list(range(1, 6)), "toy": pa.array([None] * 5, pa.float64())}),
                   out / "risk.parquet")


def test_confirm_ranking_ties_nan_scores_forwards_and_resumed_counts(tmp_path):
    """Top 3 distinct prompts (A, B, C) confirmed; A and B tie on the confirming score (5.0) so the screening risk
    orders them (A 0.9 before B 0.8), A's two rows by prompt_id ascending (1, 3); C's score is NaN without the
    nonfinite flag: not confirmed, ranked with D by screening risk. Forwards: screening 1 a prompt (attention
    entropy, 1 draw), confirming 2 x 4 steps x 2 draws = 16: total 4 x 1 + 3 x 16 = 52."""
    from audit.cascade import run_confirm

    out = tmp_path / "run"
    _stage1(out)
    stub = _StubScorer({"A": (5.0, False), "B": (5.0, False), "C": (float("nan"), False), "D": (9.0, False)})
    cfg = types.SimpleNamespace(confirm_top="3", batch_size=8, scorer="attention_entropy")
    screen = types.SimpleNamespace(num_inference_steps=50, noise_draws=1)
    manifest = run_confirm(out, stub, cfg, {}, screen, log=lambda m: None)
    rows = pq.read_table(out / "risk.parquet").to_pylist()
    assert [(r["prompt"], r["prompt_id"]) for r in rows] == [("A", 1), ("A", 3), ("B", 2), ("C", 0), ("D", 4)]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["toy"] for r in rows] == [5.0, 5.0, 5.0, None, None]
    c = manifest["confirm"]
    assert (c["screened_unique_prompts"], c["unique_prompts_confirmed"], c["rows_confirmed"], c["nonfinite"]) == \
        (4, 2, 3, 1)
    assert c["forwards_per_prompt"] == {"screen": 1.0, "confirm": 16.0} and c["forwards_total"] == 52.0
    assert sorted(stub.scored) == ["A", "B", "C"]
    # a rerun with a smaller cut resumes: its 2 chosen prompts were both scored before (3 are on disk)
    stub2 = _StubScorer(stub.values)
    again = run_confirm(out, stub2, types.SimpleNamespace(confirm_top="2", batch_size=8, scorer="attention_entropy"),
                        {}, screen, log=lambda m: None)["confirm"]
    assert (again["resumed_prompts"], again["scored_prompts"], stub2.scored) == (2, 0, [])
    assert again["forwards_total"] == 4 * 1.0 + 2 * 16.0


def test_top_size_rounds_a_fraction_up():
    """ceil(fraction x distinct prompts): 5% of 10 is 1 prompt (0.5 up), 0.3 of 7 is 3 (2.1 up), 1% of 250 is 3."""
    from audit.cascade import top_size

    assert top_size("5%", 10) == 1 and top_size("0.3", 7) == 3 and top_size("1%", 250) == 3
    assert top_size("0.5", 4) == 2 and top_size("3", 2) == 2


def test_confirm_option_refusals():
    """--confirm-top without --confirm, --confirm without --confirm-top, and another engine than local."""
    from audit.cascade import check_confirm_options

    def cfg(**kw):
        return types.SimpleNamespace(**{"confirm": "noise_magnitude", "confirm_top": "5", "scorer":
                                        "attention_entropy", "engine": "local", **kw})

    check_confirm_options(cfg())
    check_confirm_options(cfg(confirm=None, confirm_top=None))
    for bad, match in ((cfg(confirm=None), "--confirm-top needs --confirm SCORER"),
                       (cfg(confirm_top=None), "--confirm needs --confirm-top"),
                       (cfg(engine="ray"), "--confirm runs with --engine local only")):
        with pytest.raises(RunError, match=match):
            check_confirm_options(bad)


def test_a_non_finite_probe_score_is_refused(monkeypatch):
    """prepare_confirm scores one probe prompt; a non-finite score there refuses the confirming scorer."""
    import audit.scorers
    from audit.cascade import prepare_confirm
    from audit.scorers import ScoreConfig

    class Probe:
        def __init__(self, model, config):
            self.config = config

        def score(self, prompts):
            return {"nonfinite": np.array([True] * len(prompts))}

    monkeypatch.setattr(audit.scorers, "Scorer", Probe)
    model, cfg = types.SimpleNamespace(name="tiny"), types.SimpleNamespace(confirm="noise_magnitude")
    with pytest.raises(ModelError, match="--confirm noise_magnitude: model tiny gives a non-finite score"):
        prepare_confirm(cfg, model, ScoreConfig("attention_entropy", ("L",)))
