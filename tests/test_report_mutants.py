"""Behaviours of report, calibrate and diff that a mutation review found unpinned: each test asserts values derived
by hand (or by numpy) on small run folders written here, with known risks (no model is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.gates import gated_reasons
from audit.tables import arrow_schema
from audit.report import build_report, render_html, render_terminal

SCORE_CONFIG = {"scorer": "attention_entropy", "layers": ["down.0"], "noise_draws": 1, "seed": 0, "dtype": "float32"}
MODEL = {"name": "tiny", "fingerprint": "fp-a"}


def make_run(path: Path, rows, rejects=(), threshold: float | None = None, fpr: float = 0.1, model=None,
             score_config=None, extra: dict | None = None, reject_extra: dict | None = None) -> Path:
    """A finished run folder with the given rows: ``rows`` are ``(prompt, risk)`` or ``(prompt, risk, source)``;
    ranked by risk (highest first, ties by prompt_id) as a run ranks them; ``threshold`` makes it a calibrated run
    (flagged = risk > threshold). ``extra``: kept input columns (name -> one value per row, in ``rows`` order)."""
    path.mkdir(parents=True)
    rows = [(r[0], float(r[1]), r[2] if len(r) > 2 else "in/a.parquet") for r in rows]
    n = len(rows)
    ids = [f"{src}#{i}" for i, (_, _, src) in enumerate(rows)]
    order = sorted(range(n), key=lambda i: (-rows[i][1], ids[i]))
    values = {
        "rank": list(range(1, n + 1)), "prompt_id": [ids[i] for i in order], "prompt": [rows[i][0] for i in order],
        "risk": [rows[i][1] for i in order], "attn_entropy": [0.0] * n, "bos_mass": [0.0] * n,
        "trigger_tokens": [[] for _ in range(n)], "n_tokens": [1] * n, "truncated": [False] * n,
        "source": [rows[i][2] for i in order], "row": order, "prompt_hash": ["h:" + rows[i][0] for i in order],
        "flagged": [rows[i][1] > threshold for i in order] if threshold is not None else [None] * n,
    }
    schema = arrow_schema("risk")
    table = pa.table({f.name: pa.array(values.get(f.name, [None] * n), f.type) for f in schema}, schema=schema)
    for name, col in (extra or {}).items():
        table = table.append_column(name, pa.array([col[i] for i in order]))
    pq.write_table(table, path / "risk.parquet")
    rschema = arrow_schema("rejects")
    rej = {"prompt_id": [f"{s}#r{j}" for j, (s, _) in enumerate(rejects)], "source": [s for s, _ in rejects],
           "row": list(range(len(rejects))), "reason": [why for _, why in rejects]}
    rtable = pa.table({f.name: pa.array(rej.get(f.name, [None] * len(rejects)), f.type) for f in rschema},
                      schema=rschema)
    for name, col in (reject_extra or {}).items():
        rtable = rtable.append_column(name, pa.array(col, pa.string()))
    pq.write_table(rtable, path / "rejects.parquet")
    manifest = {"model": model or MODEL, "score_config": score_config or SCORE_CONFIG,
                "counts": {"rows_read": n + len(rejects), "scored": n, "rejected": len(rejects),
                           "flagged": sum(r[1] > threshold for r in rows) if threshold is not None else None},
                "started_at": "2026-11-28T00:00:00+00:00",
                "gated_reasons": gated_reasons()}  # judged as a run of today's memaudit
    if threshold is not None:
        manifest["calibration"] = {"path": "cal.json", "version": 2, "threshold": threshold, "fpr": fpr,
                                   "reference_size": 100, "model_fingerprint": (model or MODEL)["fingerprint"]}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_helper_writes_a_run_the_report_accepts(tmp_path):
    from audit.report import build_report

    rows = [("a", 1.0), ("b", 2.0), ("a", 1.0)]
    r = build_report(make_run(tmp_path / "r", rows, rejects=[("in/a.parquet", "empty_prompt")]))
    assert (r.counts["scored"], r.counts["unique_prompts"], r.counts["rejected"]) == (3, 2, 1)
    assert r.top["prompt"].to_list() == ["b", "a"] and r.top["rows"].to_list() == [1, 2]


# ---------------------------------------------------------------- report: histogram

def test_histogram_reaches_a_threshold_outside_the_risks_and_counts_the_highest_in_the_last_bin(tmp_path):
    """Bins span the risks and the threshold: a threshold above every risk (a calibration from another reference)
    widens the range up to it; below every risk, down to it. The highest risk lies on the last edge and counts in
    the last bin."""
    from audit.report import build_report

    rows = [(f"p{i}", float(i)) for i in range(4)]  # risks 0, 1, 2, 3
    high = build_report(make_run(tmp_path / "high", rows, threshold=7.0), bins=7)
    # lo 0, hi 7, width 1: [0,1) [1,2) [2,3) [3,4) [4,5) [5,6) [6,7]
    assert high.hist["lo"].to_list() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and high.hist["hi"][-1] == 7.0
    assert high.hist["count"].to_list() == [1, 1, 1, 1, 0, 0, 0]
    assert not any(high.hist["above"].to_list())  # no bin reaches above 7: nothing can be flagged
    low = build_report(make_run(tmp_path / "low", rows, threshold=-1.0), bins=4)
    # lo -1, hi 3, width 1: [-1,0) [0,1) [1,2) [2,3]: risk 3 on the last edge is in the last bin
    assert low.hist["lo"].to_list() == [-1.0, 0.0, 1.0, 2.0] and low.hist["count"].to_list() == [0, 1, 1, 2]
    assert all(low.hist["above"].to_list())


def test_a_bin_ending_at_the_threshold_is_not_marked_above_it(tmp_path):
    """A bin is marked when it reaches above the threshold (hi > threshold): one ending exactly at it holds no
    flagged risk (flagged = risk > threshold). A threshold at the highest risk marks no bin, and the Markdown draws
    no threshold line."""
    from audit.report import build_report, render_markdown

    rows = [(f"p{i}", float(i)) for i in range(5)]  # risks 0..4
    mid = build_report(make_run(tmp_path / "mid", rows, threshold=2.0), bins=4)  # edges 0, 1, 2, 3, 4
    assert mid.hist["above"].to_list() == [False, False, True, True]
    top = build_report(make_run(tmp_path / "top", rows, threshold=4.0), bins=4)
    assert top.hist["above"].to_list() == [False] * 4 and top.counts["flagged"] == 0
    assert "-" * 27 + " flag threshold" not in render_markdown(top)
    assert "-" * 27 + " flag threshold 2\n" in render_markdown(mid)


# ---------------------------------------------------------------- report: top prompts and breakdowns

def test_top_prompts_are_found_past_hundreds_of_rows_of_one_prompt(tmp_path):
    """300 rows of one prompt rank 1-300: the next prompts (ranks 301, 302) are still listed, each once."""
    from audit.report import build_report

    rows = [("dup", 10.0)] * 300 + [("p1", 5.0), ("p2", 4.0), ("p3", 3.0)]
    r = build_report(make_run(tmp_path / "r", rows), top=3)
    assert r.top.select("prompt", "rank", "rows").rows() == [("dup", 1, 300), ("p1", 301, 1), ("p2", 302, 1)]


def test_breakdown_mean_p95_and_max_per_group(tmp_path):
    """Group a: 21 risks 0..20 (mean 10, max 20, 95th percentile 19: position 0.95 * 20 = 19 exactly, so every
    interpolation gives 19). Group b: 0, 0, 0, 0 (one prompt twice), 10: mean 2 (the median would be 0)."""
    from audit.report import build_report

    rows = [(f"a{i}", float(i)) for i in range(21)] + [("b0", 0.0), ("b1", 0.0), ("b2", 0.0), ("b2", 0.0), ("b4", 10.0)]
    grp = ["a"] * 21 + ["b"] * 5
    r = build_report(make_run(tmp_path / "r", rows, extra={"grp": grp}), by=["grp"])
    frame = r.breakdowns[-1][2].sort("grp")
    assert r.breakdowns[-1][0] == "By grp"
    a = np.arange(21.0)
    b = np.array([0.0, 0.0, 0.0, 0.0, 10.0])
    assert frame["rows"].to_list() == [21, 5] and frame["unique"].to_list() == [21, 4]
    assert frame["mean_risk"].to_list() == pytest.approx([a.mean(), b.mean()]) == [10.0, 2.0]
    assert frame["p95_risk"][0] == pytest.approx(np.quantile(a, 0.95)) == 19.0
    assert frame["max_risk"].to_list() == [20.0, 10.0]


def test_groups_with_more_flagged_rows_come_first_when_calibrated(tmp_path):
    """Calibrated: groups by flagged rows (most first), then max risk; uncalibrated: by max risk."""
    from audit.report import build_report

    rows = [("x9", 9.0), ("y8", 8.0), ("y7", 7.0), ("y6", 6.0), ("z1", 1.0)]
    grp = ["x", "y", "y", "y", "z"]
    cal = build_report(make_run(tmp_path / "cal", rows, threshold=5.0, extra={"grp": grp}), by=["grp"])
    assert cal.breakdowns[-1][2].select("grp", "flagged", "max_risk").rows() == [
        ("y", 3, 8.0), ("x", 1, 9.0), ("z", 0, 1.0)]
    plain = build_report(make_run(tmp_path / "plain", rows, extra={"grp": grp}), by=["grp"])
    assert plain.breakdowns[-1][2]["grp"].to_list() == ["x", "y", "z"]


def test_fifty_groups_are_all_shown_and_the_fifty_first_is_counted(tmp_path):
    """MAX_GROUPS is 50: 50 groups are shown with no '... more groups' line; 51 show 50 and say 1 more."""
    from audit.report import build_report, render_markdown

    for n, left in ((50, None), (51, 1)):
        rows = [(f"p{i}", float(i)) for i in range(n)]
        r = build_report(make_run(tmp_path / f"g{n}", rows, extra={"g": [f"g{i:02d}" for i in range(n)]}), by=["g"])
        assert [t for t, _, _ in r.breakdowns] == ["By source file", "By g"]  # no date partition in in/a.parquet
        assert r.breakdowns[1][2].height == 50 and r.truncated_groups.get(1) == left
        md = render_markdown(r)
        assert ("more groups" in md) == (left is not None)
        if left:
            assert "... 1 more groups" in md


def test_more_than_fifty_files_show_the_riskiest_listed_by_name(tmp_path, monkeypatch):
    """60 source files, file i's one prompt at risk i: the 50 shown are f10..f59 (the highest max risk), listed by
    name, and the line under them says why (the first 50 by name, f00..f49, were shown: a risky file further down
    was left out). Calibrated, the file with the most flagged rows comes before one with a higher max risk."""
    import audit.report
    from audit.report import build_report, render_html, render_markdown

    rows = [(f"p{i}", float(i), f"logs/f{i:02d}.parquet") for i in range(60)]
    r = build_report(make_run(tmp_path / "plain", rows))
    assert r.breakdowns[0][2]["source"].to_list() == [f"logs/f{i:02d}.parquet" for i in range(10, 60)]
    assert r.truncated_groups == {0: 10}
    line = "... 10 more groups (those shown have the highest max risk)"
    assert line in render_markdown(r) and f'<p class="meta">{line}</p>' in render_html(r)
    rows = [("a", 101.0, "logs/a.parquet"), ("b", 101.0, "logs/a.parquet"), ("c", 500.0, "logs/b.parquet"),
            ("d", 1.0, "logs/c.parquet")]
    monkeypatch.setattr(audit.report, "MAX_GROUPS", 1)
    cal = build_report(make_run(tmp_path / "cal", rows, threshold=100.0))
    assert cal.breakdowns[0][2].select("source", "flagged").rows() == [("logs/a.parquet", 2)]
    assert "... 2 more groups (those shown have the most flagged rows, then highest max risk)" in render_markdown(cal)
    monkeypatch.setattr(audit.report, "MAX_GROUPS", 2)  # then listed by name, not by risk
    cal = build_report(make_run(tmp_path / "cal2", rows, threshold=100.0))
    assert cal.breakdowns[0][2]["source"].to_list() == ["logs/a.parquet", "logs/b.parquet"]


def test_null_labels_of_scored_and_rejected_rows_are_one_group(tmp_path):
    """A kept column that is null on 2 scored rows and on 1 rejected row: one null group (2 rows, 1 rejected),
    not a scored null group and a rejected one."""
    from audit.report import build_report

    rows = [("p0", 3.0), ("p1", 2.0), ("p2", 1.0)]
    r = build_report(make_run(tmp_path / "r", rows, rejects=[("in/a.parquet", "empty_prompt")] * 2,
                              extra={"user": ["u1", None, None]}, reject_extra={"user": [None, "u1"]}), by=["user"])
    frame = r.breakdowns[-1][2].sort("user", nulls_last=True)
    assert frame.select("user", "rows", "rejected").rows() == [("u1", 1, 1), (None, 2, 1)]
    # shown as '(none)', not '-' (which a kept value '-' shows as too)
    from audit.report import render_markdown

    md = render_markdown(r).split("## By user", 1)[1]
    assert "| (none) | 2 |" in md


def test_date_breakdown_only_with_date_partitions(tmp_path):
    """No source path holds a date: no 'By date partition' table. YYYY/MM/DD folders give one (a day folder, not
    a file name: a file named 28 under 2026/11 is no partition)."""
    from audit.report import build_report, partition_date

    plain = build_report(make_run(tmp_path / "plain", [("a", 1.0, "logs/a.parquet"), ("b", 2.0, "logs/b.parquet")]))
    assert [t for t, _, _ in plain.breakdowns] == ["By source file"]
    dated = build_report(make_run(tmp_path / "dated", [("a", 1.0, "logs/2026/11/27/a.parquet"),
                                                         ("b", 2.0, "logs/2026/11/28/b.parquet"),
                                                         ("c", 3.0, "logs/2026/11/28/c.parquet")]))
    assert [t for t, _, _ in dated.breakdowns] == ["By source file", "By date partition"]
    assert dated.breakdowns[1][2].select("date", "rows").rows() == [("2026-11-27", 1), ("2026-11-28", 2)]
    assert partition_date("logs/2026/11/28") is None


# ---------------------------------------------------------------- diff: ranks among the prompts in both runs

def _rises(d):
    return d.rank_rises.select("prompt", "rise", "old_rank", "rank").rows()


def test_diff_ranks_of_equal_risks_are_shared_and_the_best(tmp_path):
    """Equal risks share the best rank (``rank("min")``). Old: A 3, B 2, C 2 -> A 1, B 2, C 2. New: B 3, C 2, A 1
    -> B 1, C 2, A 3. B rose 1, C kept rank 2 (tied in the old run, alone now), A fell 2."""
    from audit.diff import diff_runs

    old = make_run(tmp_path / "old", [("A", 3.0), ("B", 2.0), ("C", 2.0)])
    new = make_run(tmp_path / "new", [("A", 1.0), ("B", 3.0), ("C", 2.0)])
    d = diff_runs(old, new)
    assert _rises(d) == [("B", 1, 2, 1)]
    assert (d.summary["rank_risen"], d.summary["rank_fallen"]) == (1, 1)
    # the same tie in both runs moves nothing
    same = diff_runs(old, make_run(tmp_path / "same", [("A", 3.5), ("B", 2.5), ("C", 2.5)]))
    assert _rises(same) == [] and (same.summary["rank_risen"], same.summary["rank_fallen"]) == (0, 0)


def test_diff_equal_rises_are_listed_by_new_rank(tmp_path):
    """Old order A, B, C, D; new order C, D, A, B: C and D both rise 2, C (new rank 1) before D (new rank 2)."""
    from audit.diff import diff_runs

    old = make_run(tmp_path / "old", [("A", 4.0), ("B", 3.0), ("C", 2.0), ("D", 1.0)])
    new = make_run(tmp_path / "new", [("C", 4.0), ("D", 3.0), ("A", 2.0), ("B", 1.0)])
    d = diff_runs(old, new)
    assert _rises(d) == [("C", 2, 3, 1), ("D", 2, 4, 2)]
    assert diff_runs(old, new, top=1).rank_rises["prompt"].to_list() == ["C"]


def test_diff_newly_flagged_excludes_prompts_already_flagged(tmp_path):
    """Both runs calibrated at threshold 5: A flagged in both (not listed), B flagged now and not before ("was not
    flagged"), N a new prompt flagged ("new prompt"), C not flagged now. Listed by rank in the new run."""
    from audit.diff import diff_runs

    old = make_run(tmp_path / "old", [("A", 9.0), ("B", 4.0), ("C", 3.0)], threshold=5.0)
    new = make_run(tmp_path / "new", [("A", 9.5), ("N", 8.0), ("B", 6.0), ("C", 3.0)], threshold=5.0)
    d = diff_runs(old, new)
    assert d.newly_flagged.select("prompt", "rank", "old_rank", "status").rows() == [
        ("N", 2, None, "new prompt"), ("B", 3, 2, "was not flagged")]
    assert d.summary["newly_flagged"] == 2 and d.flag_warnings == [] and d.warnings == []
    assert (d.summary["only_new"], d.summary["only_old"], d.summary["in_both"]) == (1, 0, 3)


# ---------------------------------------------------------------- calibrate

def test_reference_cdf_keeps_every_distinct_risk_when_ties_make_more_prompts_than_1001(tmp_path):
    """1001 distinct risks 0..1000 on 1201 prompts (200 more at 0): all 1001 are stored (the rule counts distinct
    risks, not prompts), each with its exact count at or below: 201 at 0, then 202, ..., 1201 at 1000."""
    from audit.calibrate import reference_cdf

    risks = np.r_[np.arange(1001.0), np.zeros(200)]
    cdf = reference_cdf(risks)
    assert cdf["risk"] == [float(v) for v in range(1001)]
    assert cdf["at_or_below"] == [int(np.sum(risks <= v)) for v in range(1001)] == list(range(201, 1202))


def test_calibration_numbers_of_a_reference_run(tmp_path):
    """A reference of 5 unique prompts (one on 2 rows) with risks 1, 2, 3, 4, 10: fpr 0.2 allows k = 1, so the
    threshold is the 4th smallest, 4; min 1, median 3 (not the mean 4), max 10; rows 6, size 5."""
    from audit.calibrate import calibrate

    ref = make_run(tmp_path / "ref", [("a", 1.0), ("b", 2.0), ("c", 3.0), ("c", 3.0), ("d", 4.0), ("e", 10.0)])
    cal = calibrate(ref, fpr=0.2)
    assert cal["threshold"] == 4.0
    assert cal["reference"] | {"run": None, "inputs": None} == {
        "run": None, "inputs": None, "size": 5, "rows": 6, "allowed_flags": 1, "flagged": 1, "risk_min": 1.0,
        "risk_median": float(np.median([1, 2, 3, 4, 10])), "risk_max": 10.0}
    assert cal["reference"]["risk_median"] == 3.0
    assert cal["reference_cdf"] == {"risk": [1.0, 2.0, 3.0, 4.0, 10.0], "at_or_below": [1, 2, 3, 4, 5]}


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1])
def test_calibrate_refuses_an_fpr_outside_0_to_1(tmp_path, fpr):
    from audit.calibrate import CalibrationError, calibrate

    ref = make_run(tmp_path / "ref", [("a", 1.0), ("b", 2.0)])
    with pytest.raises(CalibrationError, match="must be between 0 and 1"):
        calibrate(ref, fpr=fpr)


def test_risk_percentile_keeps_nan():
    """NaN stays NaN (a table a reader altered); the others read off reference_cdf."""
    from audit.calibrate import risk_percentile

    cal = {"version": 2, "reference": {"size": 4}, "reference_cdf": {"risk": [1.0, 2.0, 3.0, 4.0],
                                                                      "at_or_below": [1, 2, 3, 4]}}
    out = risk_percentile(np.array([np.nan, 0.5, 2.0, 2.5, 9.0]), cal)
    assert np.isnan(out[0]) and out[1:].tolist() == [0.0, 50.0, 50.0, 100.0]


def _v1_calibration(tmp_path, quantiles: list[float], fpr: float = 0.1) -> dict:
    """A version-1 calibration document (no version key, 'reference_quantiles') of a 2-prompt reference run."""
    from audit.calibrate import calibrate

    ref = make_run(tmp_path / "v1ref", [("a", 1.0), ("b", 2.0)])
    cal = {k: v for k, v in calibrate(ref, fpr=fpr).items() if k not in ("version", "reference_cdf", "threshold_rule")}
    return cal | {"threshold": float(np.quantile(quantiles, 1 - fpr)) if len(quantiles) == 1001 else 1.0,
                  "reference_quantiles": quantiles}


def test_version_1_file_with_another_number_of_quantiles_is_refused(tmp_path):
    """Version 1 stored exactly 1001 quantiles: 1000 (or 1002) is refused naming the count (its percentiles
    would be interpolated on another grid), as a CalibrationError before anything is scored."""
    from audit.calibrate import CalibrationError, load_calibration

    for n in (1000, 1002):
        q = [float(v) for v in np.linspace(0.0, 1.0, n)]
        path = tmp_path / f"v1-{n}.json"
        path.write_text(json.dumps(_v1_calibration(tmp_path / str(n), q) | {"threshold": 0.9}))
        with pytest.raises(CalibrationError, match=f"reference_quantiles has {n} values, not 1001"):
            load_calibration(path)


def test_version_1_percentile_at_tied_quantiles_is_the_highest(tmp_path):
    """Quantiles 0 at probabilities 0 .. 50% (501 tied), then 0.002 .. 1 evenly up to 100%: a risk of 0 is at
    the 50th percentile (at most it: the highest tied probability), 0.5 at 75, 1 at 100, below 0 at 0."""
    from audit.calibrate import risk_percentile

    q = np.r_[np.zeros(500), np.linspace(0.0, 1.0, 501)]  # index 500 + j holds j / 500
    cal = {"reference_quantiles": q.tolist()}
    assert risk_percentile(np.array([-1.0, 0.0, 0.5, 1.0, 2.0]), cal).tolist() == pytest.approx(
        [0.0, 50.0, 75.0, 100.0, 100.0])


def test_version_warning_is_for_version_1_files_only():
    from audit.calibrate import version_warning

    assert version_warning({"version": 2}) is None
    assert version_warning({}).startswith("a version-1 calibration file: its threshold is interpolated")
    assert version_warning({"version": 1}) == version_warning({})


def test_tokenizer_warning_names_each_difference_including_ftfy():
    from audit.calibrate import tokenizer_warning

    old = {"class": "CLIPTokenizer", "fast": False, "files_sha256": "x", "ftfy": True}
    assert tokenizer_warning(old, dict(old)) is None and tokenizer_warning(old, None) is None
    assert tokenizer_warning(old, old | {"ftfy": False}) == "tokenized differently (ftfy True -> False)"
    assert tokenizer_warning(old, old | {"fast": True, "files_sha256": "y"}) == (
        "tokenized differently (fast False -> True; files_sha256 'x' -> 'y')")


def test_fail_on_flagged_gate_allows_exactly_n_rows():
    """--fail-on-flagged N fails when more than N rows are flagged: N passes, N + 1 fails."""
    from types import SimpleNamespace

    from audit.calibrate import flagged_gate

    manifest = {"counts": {"flagged": 3}, "calibration": {"threshold": 1.5}}
    assert flagged_gate(SimpleNamespace(fail_on_flagged=3), manifest) is None
    assert flagged_gate(SimpleNamespace(fail_on_flagged=None), manifest) is None
    assert flagged_gate(SimpleNamespace(fail_on_flagged=2), manifest) == (
        "3 rows flagged (risk > 1.5), more than --fail-on-flagged 2; outputs are complete in the run folder")


def test_diff_warns_when_model_tokenizer_or_score_settings_differ(tmp_path):
    """Each difference is named in one warning: the model's fingerprint, its tokenizer, a score setting (a setting
    left at its default in one manifest is no difference), and a side that scored nothing."""
    from audit.diff import diff_runs

    tok = {"class": "CLIPTokenizerFast", "fast": True, "files_sha256": "s1", "ftfy": False}
    rows = [("A", 2.0), ("B", 1.0)]
    base = make_run(tmp_path / "base", rows, model=MODEL | {"tokenizer": tok})
    assert diff_runs(base, base).warnings == []
    other = make_run(tmp_path / "other", rows, model={"name": "big", "fingerprint": "fp-b", "tokenizer": tok})
    assert diff_runs(base, other).warnings == ["the runs used different models (tiny [fp-a] vs big [fp-b])"]
    retok = make_run(tmp_path / "retok", rows, model=MODEL | {"tokenizer": tok | {"ftfy": True}})
    assert diff_runs(base, retok).warnings == ["the runs tokenized differently (ftfy False -> True)"]
    seeded = make_run(tmp_path / "seeded", rows, model=MODEL | {"tokenizer": tok},
                      score_config=SCORE_CONFIG | {"seed": 1, "noise_generator": "mt19937"})
    assert diff_runs(base, seeded).warnings == ["the runs used different score settings (seed 0 -> 1)"]
    empty = make_run(tmp_path / "empty", [], rejects=[("in/a.parquet", "empty_prompt")],
                     model=MODEL | {"tokenizer": tok})
    assert diff_runs(empty, base).warnings == ["the old run scored nothing (1 row read, 1 rejected)"]


def test_calibration_files_with_fpr_1_or_an_off_quantile_threshold_are_refused(tmp_path):
    """A version-2 file edited to fpr 1 (k = n: its threshold the lowest risk, which its reference_cdf would accept)
    is refused for its fpr; a version-1 file whose threshold is not its (1 - fpr) quantile (0.5 where its
    quantiles 0 .. 1 put the 0.9 one at 0.9) is refused as edited."""
    from audit.calibrate import CalibrationError, calibrate, load_calibration

    ref = make_run(tmp_path / "ref", [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)])
    cal = calibrate(ref, fpr=0.25)
    assert cal["threshold"] == 3.0
    (tmp_path / "fpr1.json").write_text(json.dumps(cal | {"fpr": 1.0, "threshold": 1.0}))
    with pytest.raises(CalibrationError, match="fpr 1.0 is not a number between 0 and 1"):
        load_calibration(tmp_path / "fpr1.json")
    q = [float(v) for v in np.linspace(0.0, 1.0, 1001)]
    v1 = _v1_calibration(tmp_path, q)
    assert v1["threshold"] == pytest.approx(0.9)
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    assert load_calibration(tmp_path / "v1.json")["threshold"] == v1["threshold"]
    (tmp_path / "v1-edited.json").write_text(json.dumps(v1 | {"threshold": 0.5}))
    with pytest.raises(CalibrationError, match="threshold 0.5 is not the reference's 0.9 quantile"):
        load_calibration(tmp_path / "v1-edited.json")


def test_rejection_reasons_are_listed_most_first_then_by_name(tmp_path):
    from audit.report import build_report

    rejects = [("in/a.parquet", why) for why in ("null_prompt", "null_prompt", "too_long", "empty_prompt",
                                                 "empty_prompt", "too_long", "too_long")]
    r = build_report(make_run(tmp_path / "r", [("a", 1.0)], rejects=rejects))
    assert list(r.counts["rejected_by_reason"].items()) == [("too_long", 3), ("empty_prompt", 2), ("null_prompt", 2)]


def test_undated_sources_come_last_and_the_date_nearest_the_end_of_a_name_counts(tmp_path):
    """A run over a date partition and an undated folder: the date table lists the date, then the undated rows
    (null). A file name holding two dates is in the partition of the later-written one, nearest the file."""
    from audit.report import build_report, partition_date

    r = build_report(make_run(tmp_path / "r", [("a", 1.0, "logs/date=2026-11-28/a.parquet"),
                                                ("b", 2.0, "logs/undated/b.parquet"),
                                                ("c", 3.0, "logs/undated/c.parquet")]))
    assert r.breakdowns[1][0] == "By date partition"
    assert r.breakdowns[1][2].select("date", "rows").rows() == [("2026-11-28", 1), (None, 2)]
    assert partition_date("logs/export-2025-12-31-to-2026-11-28.parquet") == "2026-11-28"


def test_markdown_cells_never_hold_a_line_break():
    """md_escape writes line breaks and tabs as spaces (a line break ends a Markdown table row), after escaping."""
    from audit.report import md_escape

    assert md_escape("a\nb\t|c\n\nd") == "a b \\|c d"
    assert md_escape("x\r\ny") == "x\\\\x0d y"  # a carriage return is shown as the escape \x0d (backslash escaped)


def test_html_content_security_policy_allows_no_script_and_no_load(tmp_path):
    """The page's policy: nothing by default (no script, no fetch, not even from its own origin), images only
    as data: URIs, inline styles, and no <base> or form target (which default-src does not cover)."""
    import re

    from audit.report import build_report, render_html

    page = render_html(build_report(make_run(tmp_path / "r", [("a", 1.0)])))
    assert re.findall(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page) == [
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"]


def test_diff_shows_prompts_as_text_in_the_terminal_and_escapes_warnings_in_markdown(tmp_path):
    """A prompt written in rich markup prints as written in the terminal diff (not styled, brackets kept); the
    Markdown writes the flag warnings as escaped text (``>`` as ``&gt;``), as it writes the other warnings."""
    from rich.console import Console

    from audit.diff import diff_runs, render_markdown, render_terminal

    markup = "[bold red]styled[/] cat"
    old = make_run(tmp_path / "old", [("A", 3.0), (markup, 1.0)], threshold=5.0, fpr=0.1)
    new = make_run(tmp_path / "new", [("A", 1.0), (markup, 3.0)], threshold=2.0, fpr=0.2)
    d = diff_runs(old, new)
    assert _rises(d) == [(markup, 1, 2, 1)]
    console = Console(record=True, width=250, color_system=None)
    render_terminal(d, console)
    assert markup in console.export_text()
    assert d.flag_warnings == ["the runs flagged with different calibrations (risk > 5 at FPR 0.1 vs risk > 2 at FPR "
                               "0.2): a prompt can be newly flagged with the same risk"]
    assert ("**Warning:** the runs flagged with different calibrations (risk &gt; 5 at FPR 0.1 vs risk &gt; 2 at FPR "
            "0.2): a prompt can be newly flagged with the same risk.") in render_markdown(d)


def test_calibrate_command_warns_on_stderr_when_the_reference_is_small(tmp_path):
    """2 reference prompts at --fpr 0.5: k = 1 (fpr * n = 1 < 10), so the command warns, naming the rank of the
    threshold; the threshold is the smaller risk, 1."""
    from typer.testing import CliRunner

    from audit.cli import app

    ref = make_run(tmp_path / "ref", [("a", 1.0), ("b", 2.0)])
    res = CliRunner().invoke(app, ["calibrate", str(ref), "--fpr", "0.5", "-o", str(tmp_path / "cal.json")])
    assert res.exit_code == 0, res.output
    assert ("memaudit: warning: fpr 0.5 of 2 reference prompts allows 1 flagged (the threshold is the reference risk "
            "ranked 2 from the top); 20 or more reference prompts give a steadier threshold") in res.stderr
    assert json.loads((tmp_path / "cal.json").read_text())["threshold"] == 1.0


def test_a_subsampled_reference_cdf_stores_the_threshold(tmp_path):
    """2500 distinct risks 0..2499 store 1001 evenly spaced ranks; at fpr 0.0004 (k = 1) the threshold is 2498, a
    rank not among them (round(999 * 2499 / 1000) = 2496, then 2499): it is stored too, with its count 2499, so
    the file passes its own check and percentiles at the threshold are exact."""
    from audit.calibrate import calibrate, load_calibration, reference_cdf, risk_percentile, write_calibration

    spaced = {int(v) for v in np.round(np.linspace(0, 2499, 1001))}
    assert 2498 not in spaced and 1 not in spaced
    cdf = reference_cdf(np.arange(2500.0), threshold=1.0)
    assert 1.0 in cdf["risk"] and cdf["at_or_below"][cdf["risk"].index(1.0)] == 2
    assert 1.0 not in reference_cdf(np.arange(2500.0))["risk"]
    ref = make_run(tmp_path / "ref", [(f"p{i}", float(i)) for i in range(2500)])
    cal = load_calibration(write_calibration(calibrate(ref, fpr=0.0004), tmp_path / "cal.json"))
    assert cal["threshold"] == 2498.0 and cal["reference"]["allowed_flags"] == 1
    assert risk_percentile(np.array([2498.0]), cal).tolist() == [100.0 * 2499 / 2500]


def test_diff_warns_of_calibrations_only_when_their_thresholds_differ(tmp_path):
    """Two calibrations with the same threshold at different FPRs flag exactly the same risks (risk > threshold):
    no warning that a prompt "can be newly flagged with the same risk" (it warned on any FPR difference). A prompt
    flagged only in the new run is there because its risk rose (1 -> 6 over the threshold 5)."""
    from audit.diff import diff_runs

    old = make_run(tmp_path / "old", [("A", 6.0), ("B", 1.0)], threshold=5.0, fpr=0.1)
    new = make_run(tmp_path / "new", [("A", 1.0), ("B", 6.0)], threshold=5.0, fpr=0.2)
    assert diff_runs(old, new).flag_warnings == []
    other = make_run(tmp_path / "other", [("A", 1.0), ("B", 6.0)], threshold=4.0, fpr=0.1)
    assert diff_runs(old, other).flag_warnings == [
        "the runs flagged with different calibrations (risk > 5 at FPR 0.1 vs risk > 4 at FPR 0.1): a prompt can be "
        "newly flagged with the same risk"]


def test_diff_rise_note_counts_the_prompts_in_both_and_says_when_there_are_none(tmp_path):
    """The rank-rises note named "the 0 prompts in both runs" for two runs with no prompt in common, and its
    sentence ended "move no other"; now it says that no rank can rise, and counts 1 prompt in the singular."""
    from audit.diff import diff_runs, render_markdown

    a = make_run(tmp_path / "a", [("A", 1.0), ("B", 2.0)])
    b = make_run(tmp_path / "b", [("C", 1.0)])
    assert "No prompt is in both runs, so no rank can rise." in render_markdown(diff_runs(a, b))
    c = make_run(tmp_path / "c", [("A", 3.0), ("D", 1.0)])
    assert ("Old rank and new rank: the prompt's place among the 1 prompt in both runs, by risk in each run (equal "
            "risks share a rank), so a prompt added or gone moves no other prompt's rank.") in \
        render_markdown(diff_runs(a, c))


def _terminal(r, width: int) -> list[str]:
    from rich.console import Console

    console = Console(record=True, width=width, color_system=None)
    render_terminal(r, console=console)
    return console.export_text().splitlines()


def test_the_terminal_top_table_has_pct_and_flag_only_for_a_calibrated_run(tmp_path):
    """Without a calibration pct and flag were '-' on every row (the flag's in bold red), taking 13 of 80 columns
    from the prompt. They are left out of an uncalibrated run's table and block view, and kept for a calibrated
    run, where FLAG marks the rows above the threshold."""
    rows = [("a red cat sitting on the old harbour wall at dawn", 3.0), ("blue sky", 1.0)]
    plain = build_report(make_run(tmp_path / "plain", rows))
    head = next(line for line in _terminal(plain, 120) if "┃ rank" in line)
    assert [c.strip() for c in head.strip("┃").split("┃")] == ["rank", "risk", "prompt", "trigger tokens", "rows",
                                                               "prompt_id"]
    block = _terminal(plain, 50)
    assert "#1  risk 3.00000  rows 1" in block and not any(" pct " in line for line in block)
    cal = build_report(make_run(tmp_path / "cal", rows, threshold=2.0))
    lines = _terminal(cal, 120)
    head = next(line for line in lines if "┃ rank" in line)
    assert [c.strip() for c in head.strip("┃").split("┃")] == ["rank", "risk", "pct", "flag", "prompt",
                                                               "trigger tokens", "rows", "prompt_id"]
    assert sum("FLAG" in line for line in lines) == 1  # risk 3 > 2; risk 1 is not
    assert any(line.startswith("#1  risk 3.00000  pct - ") and " FLAG  rows 1" in line for line in _terminal(cal, 50))


def test_a_confirm_runs_prompt_keeps_a_readable_width_at_80_columns(tmp_path):
    """A --confirm run's top table at 80 columns (a CI log) squeezed the prompt into 5 cells with the pct and flag
    columns beside the confirming score; uncalibrated, those are gone and the prompt gets 9."""
    rows = [("a red cat sitting on the old harbour wall at dawn", 3.0)]
    run = make_run(tmp_path / "r", rows)
    table = pq.read_table(run / "risk.parquet")
    i = table.schema.get_field_index("noise_magnitude")
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array([0.5], table.schema.field(i).type)),
                   run / "risk.parquet")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["confirm"] = {"scorer": "noise_magnitude", "top": 1, "unique_prompts_confirmed": 1}
    (run / "manifest.json").write_text(json.dumps(manifest))
    r = build_report(run)
    assert r.confirm_column == "noise_magnitude"
    lines = _terminal(r, 80)
    assert any(" 0.5000 │ a red cat │" in line for line in lines), "\n".join(lines)  # 9 cells: 5 before


def test_the_pages_prompt_cell_scrolls_past_a_few_lines_with_all_its_text(tmp_path):
    """A 2,000-character prompt filled a screen of report.html; its cell now scrolls past 7.5 lines, the text
    whole up to the page's 2,000 characters (then the cut says how much is left out)."""
    long = "word " * 500  # 2,500 characters
    page = render_html(build_report(make_run(tmp_path / "r", [(long.strip(), 1.0)])))
    assert "td.prompt .scroll{max-height:7.5em;overflow-y:auto}" in page
    cell = page[page.index('<td class="prompt"><div class="scroll" dir="auto" tabindex="0" role="region" '
                      'aria-label="prompt ranked 1">'):]
    cell = cell[:cell.index("</div></td>")]
    assert cell.count("word") == 400 and "(+499 chars)" in cell


def test_a_finished_folder_being_rerun_is_reported_with_a_warning(tmp_path):
    """A finished run folder that a memaudit run is writing again (its lock held: --retry-failed, --confirm, a
    scheduler's retry) was reported from its old tables without a word; the report now says so first, and not once
    the lock is free."""
    import fcntl

    from audit.report import build_report, render_markdown

    run = make_run(tmp_path / "r", [("a", 2.0), ("b", 1.0)])
    said = ("a memaudit run is writing this folder right now (a rerun): this report shows its last finish's tables, "
            "which that run replaces when it finishes")
    with open(run / ".memaudit.lock", "a+b") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = build_report(run)
        assert r.warnings == [said] and f"**Warning:** {said}." in render_markdown(r)
    assert build_report(run).warnings == []
