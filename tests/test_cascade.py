"""Two-stage scoring: ``memaudit run --confirm SCORER --confirm-top N``: the rows, their ranks, the values of
both stages, the manifest's counts, resuming, and refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from audit.cascade import parse_top, top_size
from audit.cli import app
from audit.errors import RunError
from audit.models import load_model
from audit.scorers import ScoreConfig, Scorer

LINES = ["a red cat", "a blue dog on a beach", "old city street", "a red cat", "portrait of a woman",
         "oil painting of a boat", "sunset over the lake", "a small house", "a blue dog on a beach"]


def _run(tmp_path, model_dir, out, *extra):
    src = tmp_path / "p.txt"
    if not src.exists():  # written once: a rerun must see the same input file to resume
        src.write_text("\n".join(LINES) + "\n")
    return CliRunner().invoke(app, ["run", str(src), "--model", str(model_dir), "--out", str(out), "--device", "cpu",
                                    "--no-progress", "--batch-size", "4", *extra])


def test_parse_top():
    assert parse_top("5%") == ("fraction", 0.05) and parse_top("0.25") == ("fraction", 0.25)
    assert parse_top("500") == ("count", 500) and parse_top("1") == ("count", 1)
    assert top_size("0.5", 7) == 4 and top_size("100", 7) == 7
    for bad in ("0", "-1", "1.5", "abc", "0%"):
        with pytest.raises(RunError, match="--confirm-top"):
            parse_top(bad)


def test_cascade_rows_ranks_values_counts_and_resume(tmp_path, tiny_model_dir, tiny_model):
    res = _run(tmp_path, tiny_model_dir, tmp_path / "two", "--confirm", "noise_magnitude", "--confirm-top", "3")
    assert res.exit_code == 0, res.output
    rows = pq.read_table(tmp_path / "two" / "risk.parquet").to_pylist()
    assert len(rows) == len(LINES)
    # the screening stage: the default scorer's risk, as a direct Scorer computes it
    distinct = list(dict.fromkeys(LINES))
    ae = Scorer(tiny_model, ScoreConfig("attention_entropy", tuple(tiny_model.default_layers))).score(distinct)["risk"]
    screen_risk = dict(zip(distinct, ae))
    np.testing.assert_allclose([r["risk"] for r in rows], [screen_risk[r["prompt"]] for r in rows], rtol=1e-6)
    # the top 3 distinct prompts of the screening ranking are confirmed, with all their duplicate rows
    top3 = sorted(distinct, key=lambda p: -screen_risk[p])[:3]
    confirmed = [r for r in rows if r["noise_magnitude"] is not None]
    assert {r["prompt"] for r in confirmed} == set(top3)
    assert len(confirmed) == sum(p in top3 for p in LINES)
    # confirmed rows rank first, by the confirming score; the others follow by screening risk
    assert rows[:len(confirmed)] == confirmed
    mags = [r["noise_magnitude"] for r in confirmed]
    assert mags == sorted(mags, reverse=True)
    rest = [r["risk"] for r in rows[len(confirmed):]]
    assert rest == sorted(rest, reverse=True)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    # the confirming score is the confirming scorer's own
    direct = Scorer(tiny_model, ScoreConfig("noise_magnitude", tuple(tiny_model.default_layers))).score(top3)
    want = dict(zip(top3, direct["noise_magnitude"]))
    np.testing.assert_allclose([r["noise_magnitude"] for r in confirmed], [want[r["prompt"]] for r in confirmed],
                               rtol=1e-6)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    c = manifest["confirm"]
    assert (c["scorer"], c["screened_unique_prompts"], c["unique_prompts_confirmed"]) == ("noise_magnitude", 7, 3)
    assert (c["rows_confirmed"], c["scored_prompts"], c["resumed_prompts"]) == (len(confirmed), 3, 0)
    assert c["forwards_per_prompt"] == {"screen": 1.0, "confirm": 2.0}
    assert c["forwards_total"] == 7 * 1.0 + 3 * 2.0
    assert manifest["counts"]["scored"] == len(LINES)
    # a rerun on the same folder resumes: nothing is scored again, the table is the same
    again = _run(tmp_path, tiny_model_dir, tmp_path / "two", "--confirm", "noise_magnitude", "--confirm-top", "3")
    assert again.exit_code == 0, again.output
    assert pq.read_table(tmp_path / "two" / "risk.parquet").to_pylist() == rows
    c2 = json.loads((tmp_path / "two" / "manifest.json").read_text())["confirm"]
    assert (c2["resumed_prompts"], c2["scored_prompts"]) == (3, 0)
    other = _run(tmp_path, tiny_model_dir, tmp_path / "two", "--confirm", "guidance_geometry", "--confirm-top", "3")
    assert other.exit_code == 2 and "another confirming scorer" in other.output


def test_a_damaged_confirm_part_is_removed_and_its_prompts_confirmed_again(tmp_path, tiny_model_dir):
    """A `confirm/part-*.parquet` damaged after it was written (cut short, overwritten) stopped the rerun with
    pyarrow's raw error: it is now removed with a note naming it, and its prompts are scored again, so the
    table equals the first run's."""
    first = _run(tmp_path, tiny_model_dir, tmp_path / "c", "--confirm", "noise_magnitude", "--confirm-top", "3")
    assert first.exit_code == 0, first.output
    rows = pq.read_table(tmp_path / "c" / "risk.parquet").to_pylist()
    parts = sorted((tmp_path / "c" / "confirm").glob("part-*.parquet"))
    assert [pq.read_metadata(p).num_rows for p in parts] == [3]  # one batch of 4 holds the 3 prompts
    parts[0].write_bytes(parts[0].read_bytes()[:40])  # cut short: no footer
    again = _run(tmp_path, tiny_model_dir, tmp_path / "c", "--confirm", "noise_magnitude", "--confirm-top", "3")
    assert again.exit_code == 0, again.output
    assert f"memaudit: confirm/{parts[0].name} cannot be read (" in again.output
    assert "removed, its prompts are confirmed again" in again.output
    assert not parts[0].exists()
    assert pq.read_table(tmp_path / "c" / "risk.parquet").to_pylist() == rows
    c = json.loads((tmp_path / "c" / "manifest.json").read_text())["confirm"]
    assert (c["resumed_prompts"], c["scored_prompts"]) == (0, 3)


def test_confirm_refused_before_scoring(tmp_path, tiny_model_dir):
    flow = tmp_path / "flow"
    shutil.copytree(tiny_model_dir, flow)
    cfg = flow / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"prediction_type": "flow"}))
    res = _run(tmp_path, flow, tmp_path / "out", "--confirm", "noise_magnitude", "--confirm-top", "2")
    assert res.exit_code == 2 and "--confirm noise_magnitude: model" in res.output and "cannot run it" in res.output
    assert not (tmp_path / "out").exists()  # nothing scored, no run folder
    same = _run(tmp_path, tiny_model_dir, tmp_path / "o2", "--confirm", "attention_entropy", "--confirm-top", "2")
    assert same.exit_code == 2 and "already scores with it" in same.output
    typo = _run(tmp_path, tiny_model_dir, tmp_path / "o3", "--confirm", "guidance_geometri", "--confirm-top", "2")
    assert typo.exit_code == 2 and "did you mean 'guidance_geometry'" in typo.output
    assert load_model  # the flow variant loads; only the confirming scorer cannot run on it


def test_report_and_diff_of_a_confirm_run_say_what_ranks(tmp_path, tiny_model_dir):
    """The top table of a --confirm run is in the confirming score's order: the report showed only the screening
    risk (a table that looked unsorted) and never named the confirming scorer; diff against a one-stage run of the
    same prompts said nothing though the orders differ."""
    from audit.diff import diff_runs
    from audit.report import build_report, render_html, render_markdown

    assert _run(tmp_path, tiny_model_dir, tmp_path / "two", "--confirm", "noise_magnitude",
                "--confirm-top", "3").exit_code == 0
    assert _run(tmp_path, tiny_model_dir, tmp_path / "one").exit_code == 0
    r = build_report(tmp_path / "two", top=5)
    assert r.confirm_column == "noise_magnitude"
    risk = pq.read_table(tmp_path / "two" / "risk.parquet").to_pylist()
    first = {}
    for row in risk:
        first.setdefault(row["prompt"], row)
    assert r.top["noise_magnitude"].to_list() == [first[p]["noise_magnitude"] for p in r.top["prompt"]]
    assert r.top["noise_magnitude"][:3].to_list() == sorted(r.top["noise_magnitude"][:3], reverse=True)
    assert r.top["noise_magnitude"][3:].null_count() == 2
    md = render_markdown(r)
    assert "| rank | risk | noise\\_magnitude | prompt |" in md  # uncalibrated: no percentile or flag column
    assert "confirmed with noise\\_magnitude (top 3 prompts, ranked first by it)" in md
    assert "rank first by its score (column noise\\_magnitude; higher = riskier)" in md
    page = render_html(r)
    assert "<th>noise_<wbr>magnitude</th>" in page and "ranked first by it" in page  # (a header breaks at _)
    assert page.count('<td class="num">') >= 5 * 4  # rank, risk, the confirming score, rows numeric
    plain = build_report(tmp_path / "one", top=5)
    assert plain.confirm_column is None and "confirmed" not in render_markdown(plain)
    d = diff_runs(tmp_path / "one", tmp_path / "two")
    assert any("the old run was not confirmed, the new one confirmed with noise_magnitude (--confirm-top 3); the rank "
               "rises compare screening risks, not the confirmed order, and each list's ranks follow its own run's "
               "order" in w for w in d.warnings), d.warnings
    assert d.summary["rank_risen"] == d.summary["rank_fallen"] == 0  # the same screening risks: what the rises read
    assert not any("rank differently" in w for w in diff_runs(tmp_path / "two", tmp_path / "two").warnings)
    # a run confirmed by a scorer this install lacks (a plugin's): the report ranks it as a one-stage run, it
    # does not fail (get_scorer's RunError was not caught)
    shutil.copytree(tmp_path / "two", tmp_path / "plugin")
    manifest = json.loads((tmp_path / "plugin" / "manifest.json").read_text())
    manifest["confirm"]["scorer"] = "plugin_scorer"
    (tmp_path / "plugin" / "manifest.json").write_text(json.dumps(manifest))
    other = build_report(tmp_path / "plugin", top=5)
    assert other.confirm_column is None and other.top.height == 5
    assert "| rank | risk | prompt |" in render_markdown(other)


def test_confirm_top_100_percent_is_every_prompt():
    """100% is the fraction 1 (0 < f <= 1), as 1.0 is."""
    from audit.cascade import parse_top, top_size

    assert parse_top("100%") == ("fraction", 1.0) == parse_top("1.0")
    assert top_size("100%", 7) == 7


def _cascade(tmp_path, model_dir, *extra):
    res = _run(tmp_path, model_dir, tmp_path / "out", *extra)
    assert res.exit_code == 0, res.output
    return pq.read_table(tmp_path / "out" / "risk.parquet").to_pylist(), \
        json.loads((tmp_path / "out" / "manifest.json").read_text())["confirm"]


def test_a_confirmed_prompt_flagged_nonfinite_is_not_confirmed_and_still_costs(tmp_path, tiny_model_dir, tiny_model,
                                                                               monkeypatch):
    """The confirming scorer flags one of the 3 chosen prompts non-finite (finite value): it is not
    confirmed (null column, ranked with the others), counted in "nonfinite", and its forwards still count:
    forwards_total = 7 * 1 + 3 * 2 = 13."""
    distinct = list(dict.fromkeys(LINES))
    ae = Scorer(tiny_model, ScoreConfig("attention_entropy", tuple(tiny_model.default_layers))).score(distinct)["risk"]
    top3 = sorted(distinct, key=lambda p: -ae[distinct.index(p)])[:3]
    real = Scorer.score

    def flag_one(self, prompts, tokens=None):
        out = real(self, prompts, tokens)
        if self.spec.name == "noise_magnitude":
            out["nonfinite"] = np.array([p == top3[0] for p in prompts]) | out["nonfinite"]
        return out

    monkeypatch.setattr(Scorer, "score", flag_one)
    rows, c = _cascade(tmp_path, tiny_model_dir, "--confirm", "noise_magnitude", "--confirm-top", "3")
    assert (c["unique_prompts_confirmed"], c["nonfinite"]) == (2, 1)
    assert c["forwards_total"] == 7 * 1.0 + 3 * 2.0
    assert all(r["noise_magnitude"] is None for r in rows if r["prompt"] == top3[0])


def test_a_lower_is_riskier_confirming_scorer_ranks_its_lowest_first(tmp_path, tiny_model_dir):
    """A confirming scorer with higher_is_riskier=False (BOS mass: lower = riskier) ranks the confirmed rows
    by its column ASCENDING."""
    from audit.scorers import Column, ScorerSpec, register, unregister

    register(ScorerSpec(name="toy_low", description="BOS mass, lower = riskier (a test scorer)",
                        forward="partial_conditional", compute=lambda ctx: {"toy_low": ctx.a[:, 0]},
                        risk_column="toy_low", columns=(Column("toy_low", "double", "BOS mass"),),
                        higher_is_riskier=False))
    try:
        rows, c = _cascade(tmp_path, tiny_model_dir, "--confirm", "toy_low", "--confirm-top", "4")
    finally:
        unregister("toy_low")
    values = [r["toy_low"] for r in rows if r["toy_low"] is not None]
    assert c["unique_prompts_confirmed"] == 4 and len(set(values)) == 4
    assert values == sorted(values) and rows[:len(values)] == [r for r in rows if r["toy_low"] is not None]


def test_a_rerun_without_confirm_on_a_confirmed_folder_says_the_stage_is_not_applied(tmp_path, tiny_model_dir):
    """The rerun ranks risk.parquet by the screening score alone (as its command asks) and said nothing, so a
    scheduled job that lost its --confirm re-ranked the folder silently; it now says so, and adding --confirm back
    applies the kept stage without scoring it again."""
    out = tmp_path / "c"
    first = _run(tmp_path, tiny_model_dir, out, "--confirm", "noise_magnitude", "--confirm-top", "3")
    assert first.exit_code == 0, first.output
    confirmed = pq.read_table(out / "risk.parquet").to_pylist()
    plain = _run(tmp_path, tiny_model_dir, out)
    assert plain.exit_code == 0, plain.output
    notes = [ln for ln in plain.output.splitlines() if "memaudit: note: this folder's confirm/" in ln]
    assert notes == ["memaudit: note: this folder's confirm/ stage (noise_magnitude) is not applied: the command has no "
                     "--confirm, so risk.parquet ranks by the screening score alone; add --confirm noise_magnitude "
                     "--confirm-top ... to apply it again (its scores are kept)"], plain.output
    rows = pq.read_table(out / "risk.parquet").to_pylist()
    assert all(r["noise_magnitude"] is None for r in rows)
    assert [r["risk"] for r in rows] == sorted((r["risk"] for r in rows), reverse=True)
    assert "confirm" not in json.loads((out / "manifest.json").read_text())
    back = _run(tmp_path, tiny_model_dir, out, "--confirm", "noise_magnitude", "--confirm-top", "3")
    assert back.exit_code == 0 and "note: this folder's confirm/" not in back.output, back.output
    assert pq.read_table(out / "risk.parquet").to_pylist() == confirmed
    c = json.loads((out / "manifest.json").read_text())["confirm"]
    assert (c["resumed_prompts"], c["scored_prompts"]) == (3, 0)
    never = _run(tmp_path, tiny_model_dir, tmp_path / "plain")  # a folder never confirmed: no note
    assert never.exit_code == 0 and "memaudit: note: this folder" not in never.output


def test_retry_failed_scores_a_nonfinite_confirmed_prompt_again(tmp_path, tiny_model_dir, tiny_model, monkeypatch):
    """A confirming score that came out non-finite (a passing device fault) stayed unconfirmed on every rerun:
    the stage resumed it as done. A rerun now says so, and with --retry-failed scores that one prompt again (one
    prompt scored, 2 resumed), confirming it with the value and rank a clean stage gives; the old non-finite part row
    stays on disk and the finite one wins whatever the parts' order."""
    distinct = list(dict.fromkeys(LINES))
    ae = Scorer(tiny_model, ScoreConfig("attention_entropy", tuple(tiny_model.default_layers))).score(distinct)["risk"]
    top3 = sorted(distinct, key=lambda p: -ae[distinct.index(p)])[:3]
    real = Scorer.score
    fault = {"on": True}

    def flag_one(self, prompts, tokens=None):
        out = real(self, prompts, tokens)
        if self.spec.name == "noise_magnitude" and fault["on"]:
            out["nonfinite"] = np.array([p == top3[0] for p in prompts]) | out["nonfinite"]
        return out

    monkeypatch.setattr(Scorer, "score", flag_one)
    args = ("--confirm", "noise_magnitude", "--confirm-top", "3")
    _, c = _cascade(tmp_path, tiny_model_dir, *args)
    assert (c["unique_prompts_confirmed"], c["nonfinite"]) == (2, 1)
    fault["on"] = False
    res = _run(tmp_path, tiny_model_dir, tmp_path / "out", *args)
    assert res.exit_code == 0, res.output
    assert ("memaudit: note: 1 prompt of the confirm/ stage had a non-finite noise_magnitude score and stays "
            "unconfirmed; --retry-failed scores it again") in res.output
    c = json.loads((tmp_path / "out" / "manifest.json").read_text())["confirm"]
    assert (c["unique_prompts_confirmed"], c["nonfinite"], c["scored_prompts"]) == (2, 1, 0)
    res = _run(tmp_path, tiny_model_dir, tmp_path / "out", *args, "--retry-failed")
    assert res.exit_code == 0, res.output
    assert ("memaudit: --retry-failed: 1 prompt of the confirm/ stage had a non-finite noise_magnitude score: "
            "scoring it again") in res.output
    c = json.loads((tmp_path / "out" / "manifest.json").read_text())["confirm"]
    assert (c["unique_prompts_confirmed"], c["nonfinite"], c["scored_prompts"], c["resumed_prompts"]) == (3, 0, 1, 2)
    rows = pq.read_table(tmp_path / "out" / "risk.parquet").to_pylist()
    (tmp_path / "clean").mkdir()
    clean_rows, _ = _cascade(tmp_path / "clean", tiny_model_dir, *args)
    assert [(r["prompt_id"].rsplit("#")[-1], r["rank"]) for r in rows] == \
        [(r["prompt_id"].rsplit("#")[-1], r["rank"]) for r in clean_rows]
    # scored alone, not in the clean stage's batch of 3: equal to float32 rounding
    nan = float("nan")
    assert [r["noise_magnitude"] or nan for r in rows] == pytest.approx(
        [r["noise_magnitude"] or nan for r in clean_rows], rel=1e-5, nan_ok=True)
    assert sum(r["noise_magnitude"] is not None for r in rows) == 4  # 3 distinct prompts, one of them twice
    assert sum(len(pq.read_table(f)) for f in (tmp_path / "out" / "confirm").glob("part-*.parquet")) == 4
    res = _run(tmp_path, tiny_model_dir, tmp_path / "out", *args)  # nothing left to retry: no note
    assert res.exit_code == 0 and "non-finite" not in res.output
