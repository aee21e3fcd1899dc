"""report.json's breakdown groups carry ``flagged`` in every run: null when the run is not calibrated, as
``counts.flagged`` and the histogram's bins (the key was left out, found by the auditor trial)."""
import json

from audit.report import build_report, render_json

from test_report_mutants import make_run


def test_breakdown_groups_have_flagged_null_without_a_calibration_and_counts_with_one(tmp_path):
    rows = [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    grp = ["x", "y", "y"]
    plain = json.loads(render_json(build_report(make_run(tmp_path / "plain", rows, extra={"g": grp}), by=["g"],
                                                all_groups=True)))
    groups = {g["group"]: g for g in plain["breakdowns"][-1]["groups"]}
    assert plain["counts"]["flagged"] is None
    assert list(groups["y"]) == ["group", "rows", "unique", "mean_risk", "p95_risk", "max_risk", "flagged"]  # (no rejects)
    assert (groups["x"]["rows"], groups["x"]["flagged"], groups["y"]["rows"], groups["y"]["flagged"]) == (1, None, 2, None)
    cal = json.loads(render_json(build_report(make_run(tmp_path / "cal", rows, threshold=1.5, extra={"g": grp}),
                                              by=["g"], all_groups=True)))
    groups = {g["group"]: g for g in cal["breakdowns"][-1]["groups"]}
    assert (groups["x"]["flagged"], groups["y"]["flagged"], cal["counts"]["flagged"]) == (0, 2, 2)
