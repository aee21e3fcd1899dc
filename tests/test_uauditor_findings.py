"""An independent auditor's findings: every figure that report, diff and the gates print, recomputed by hand from
risk.parquet, rejects.parquet and manifest.json, must not contradict the counts it stands beside."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from audit.cli import app
from audit.gates import coverage_gate, error_gate
from audit.report import build_report, render_json, render_markdown
from audit.text import share
from test_report_mutants import make_run


# ---------------------------------------------------------------- percentages in the exit-4 messages

def test_a_share_never_reads_zero_all_or_the_limit_it_exceeds():
    """One decimal where it is true to the counts; more where one decimal read 0.0% for 1 row of 3,000, 100.0% for
    2,999 of 3,000, or 1.0% for 101 of 10,001 said to be more than 0.01."""
    assert share(1, 3000, 0.0) == "0.03%"
    assert share(2999, 3000, 0.999) == "99.97%"
    assert share(101, 10001, 0.01) == "1.01%"
    assert share(1, 30000) == "0.003%"
    assert share(2901, 10000, 0.29) == "29.01%"  # 0.29 * 100 is 28.999999999999996 in binary: not 29.0%
    assert (share(2, 4, 0.01), share(1, 8), share(3, 3), share(0, 5), share(30, 1000, 0.01)) == \
        ("50.0%", "12.5%", "100.0%", "0.0%", "3.0%")


def test_the_gates_do_not_print_0_0_percent_of_rows_that_failed():
    """1 of 3,000 rows (100 * 1 / 3000 = 0.0333%) over --max-error-fraction 0 was '(0.0%) ... more than 0'; 101 of
    10,001 rows (1.0099%) over 0.01 was '(1.0%) ... more than --max-error-fraction 0.01'."""
    limits = SimpleNamespace(max_error_fraction=0.0, fail_on_flagged=None)
    lost = {"counts": {"rows_read": 3000, "scored": 2999, "rejected_by_reason": {"missing_prompt_column": 1}}}
    assert coverage_gate(limits, lost).startswith("1 of 3000 rows read (0.03%) could not be read as prompts "
                                                  "(missing_prompt_column 1), more than --max-error-fraction 0:")
    failed = {"counts": {"rows_read": 10001, "scored": 9900, "rejected_by_reason": {"scoring_error": 101}}}
    msg = error_gate(SimpleNamespace(max_error_fraction=0.01, fail_on_flagged=None), Path("/nonexistent"), failed)
    assert msg.startswith("101 of 10001 rows (1.01%) could not be scored (scoring_error 101), more than "
                          "--max-error-fraction 0.01")


def test_a_report_of_a_run_that_failed_on_one_row_of_3000_says_0_03_percent(tmp_path):
    """The report's warning (every format) repeats the gate's message: recomputed, 1 / 3000 = 0.0333%."""
    run = make_run(tmp_path / "r", [(f"p{i}", i / 3000) for i in range(2999)],
                   rejects=[("in/b.parquet", "missing_prompt_column")])
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["run_config"] = {"max_error_fraction": 0.0}
    manifest["counts"]["rejected_by_reason"] = {"missing_prompt_column": 1}
    (run / "manifest.json").write_text(json.dumps(manifest))
    r = build_report(run)
    assert r.counts["rows_read"] == 3000 and r.counts["rejected_by_reason"] == {"missing_prompt_column": 1}
    assert r.warnings[0].startswith("the run failed (exit 4): 1 of 3000 rows read (0.03%) could not be read as "
                                    "prompts (missing_prompt_column 1), more than --max-error-fraction 0:")
    assert json.loads(render_json(r))["warnings"] == r.warnings
    assert "(0.03%)" in render_markdown(r) and "(0.0%)" not in render_markdown(r)


def test_a_dry_run_says_0_03_percent_for_one_row_of_3000_without_the_prompt_column(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    pq.write_table(pa.table({"prompt": [f"a red cat {i}" for i in range(2999)]}), logs / "a.parquet")
    pq.write_table(pa.table({"text": ["a blue dog"]}), logs / "b.parquet")
    res = CliRunner().invoke(app, ["run", str(logs), "--out", str(tmp_path / "out"), "--max-error-fraction", "0",
                                   "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "exit 4 expected: 1 of 3,000 rows (0.03%) to be rejected for want of the prompt or id column, more than " \
           "--max-error-fraction 0:" in " ".join(res.output.split())


# ---------------------------------------------------------------- the page's plots

def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_the_histogram_legend_hides_no_bar_and_the_tallest_bar_stays_below_the_frame(tmp_path):
    """A calibrated run whose tallest bin is the first: 10 rows at risk 1.0, 3 flagged rows at 2.0-2.02 (threshold
    1.5). The flagged bars, stacked on the unflagged ones, pinned the y axis to exactly 10 (the tallest bar flush
    with the frame), and the legend, drawn inside at the upper left, covered that bar."""
    from audit.report import histogram_figure

    rows = [(f"p{i}", 1.0) for i in range(10)] + [(f"q{i}", 2.0 + i * 0.01) for i in range(3)]
    r = build_report(make_run(tmp_path / "r", rows, threshold=1.5))
    assert r.hist["count"].to_list()[0] == 10 and int(r.hist["flagged"].sum()) == 3
    fig = histogram_figure(r)
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 10.5)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for p in ax.patches if p.get_height() > 0]
    assert len(bars) == 2  # the first bin's 10 rows; the last bin's 3 flagged rows (width (2.02 - 1) / 30)
    assert not [b for b in bars if _overlaps(b, legend)]
    assert legend.y0 >= ax.get_window_extent(renderer).y1  # above the plot


# ---------------------------------------------------------------- risks beside the threshold they are flagged by

def _top_cells(md: str) -> list[list[str]]:
    """The top table of report.md: rank, risk, percentile, flagged."""
    lines = md.split("## Top", 1)[1].split("\n## ", 1)[0].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")][:4] for line in lines if line.startswith("| ")][1:]


def test_a_flagged_risk_never_prints_as_the_threshold_it_exceeds(tmp_path):
    """Threshold 1.7935721; a flagged prompt at 1.7935740 (above it by 1.9e-6) and the unflagged prompt at the
    threshold both printed 1.79357, under 'flagged: risk > 1.79357'. Now the threshold prints as every command prints
    it (risk > 1.7935721) and the listed risks carry one more digit: '1.793574 FLAG', '1.793572' not flagged, 1.79356
    as '1.793560'."""
    from audit.report import render_html, render_terminal
    from rich.console import Console

    rows = [("top", 1.9, "in/a.parquet"), ("flagged near", 1.7935740, "in/a.parquet"),
            ("at the threshold", 1.7935721, "in/b.parquet"), ("below", 1.79356, "in/b.parquet"), ("low", 0.5)]
    r = build_report(make_run(tmp_path / "r", rows, threshold=1.7935721, fpr=0.01))
    assert r.top["flagged"].to_list() == [True, True, False, False, False]
    md = render_markdown(r)
    assert _top_cells(md) == [["1", "1.900000", "-", "FLAG"], ["2", "1.793574", "-", "FLAG"],
                              ["3", "1.793572", "-", ""], ["4", "1.793560", "-", ""], ["5", "0.500000", "-", ""]]
    assert "flagged: risk &gt; 1.7935721." in md and "| flagged | 2 rows (risk &gt; 1.7935721, calibrated" in md
    assert "flag threshold 1.7935721" in md
    page = render_html(r)
    assert "<td class=\"num\">1.793574</td>" in page and "risk &gt; 1.7935721" in page
    console = Console(width=200, record=True)
    render_terminal(r, console)
    text = console.export_text()
    assert "Risk distribution (threshold 1.7935721)" in text and "1.793574" in text
    # without such a prompt listed, 5 decimals as before, and the same threshold text
    r2 = build_report(make_run(tmp_path / "r2", [("a", 1.9), ("b", 1.7)], threshold=1.7935721, fpr=0.01))
    assert _top_cells(render_markdown(r2)) == [["1", "1.90000", "-", "FLAG"], ["2", "1.70000", "-", ""]]
    assert r2.threshold_text == "1.7935721"


def test_an_unflagged_risk_above_10_never_prints_above_the_threshold(tmp_path):
    """A threshold of 15.345712 printed '15.3457' (6 significant digits) and an unflagged risk of 15.34571 (below
    it) printed '15.34571' (5 decimals): above the threshold as printed, yet not flagged. The threshold now prints all
    its digits, 15.345712, and the risks keep 5 decimals."""
    rows = [("over", 15.5), ("under", 15.34571)]
    r = build_report(make_run(tmp_path / "r", rows, threshold=15.345712, fpr=0.01))
    assert r.threshold_text == "15.345712"
    assert _top_cells(render_markdown(r)) == [["1", "15.50000", "-", "FLAG"], ["2", "15.34571", "-", ""]]


# ---------------------------------------------------------------- two thresholds said to differ

def test_a_diff_of_runs_flagged_by_two_thresholds_prints_two_thresholds(tmp_path):
    """The reference scored again at another batch size moves the threshold by about 1e-7: the diff warned 'the runs
    flagged with different calibrations (risk > 1.79357 at FPR 0.01 vs risk > 1.79357 at FPR 0.01)'. Thresholds
    that differ at 6 digits print as before (1.78841 vs 1.79357)."""
    from audit.diff import diff_runs

    rows = [("a", 1.9), ("b", 1.0)]
    old = make_run(tmp_path / "old", rows, threshold=1.7935721, fpr=0.01)
    new = make_run(tmp_path / "new", rows, threshold=1.7935724, fpr=0.01)
    assert diff_runs(old, new).flag_warnings == [
        "the runs flagged with different calibrations (risk > 1.7935721 at FPR 0.01 vs risk > 1.7935724 at FPR "
        "0.01): a prompt can be newly flagged with the same risk"]


def test_a_table_flagged_by_a_threshold_1e_7_from_the_manifests_names_both(tmp_path, tiny_model_dir):
    """risk.parquet's calibration metadata 1.7935724, manifest.json's 1.7935721 (a re-merge with a calibration made
    again, killed before the manifest): the refusal read '(risk > 1.79357) than manifest.json records (risk >
    1.79357)'."""
    from helpers import torn_calibration_refusal

    run, said = torn_calibration_refusal(tmp_path, tiny_model_dir, b'{"threshold": 1.7935724}',
                                         {"threshold": 1.7935721, "fpr": 0.01})
    assert said == (
        f"{run / 'risk.parquet'} was flagged with another calibration (risk > 1.7935724) than manifest.json records "
        "(risk > 1.7935721): a rerun of this folder stopped before it finished; rerun its command with the same --out "
        "to finish it")


def test_an_edited_threshold_1e_7_off_is_refused_naming_both_values(tmp_path):
    """A calibration file whose threshold was edited from 0.8 to 0.8000001: 'threshold 0.8 is not the reference risk
    ranked 2 from the top (0.8 ...)' read as a refusal of the right value."""
    import pytest

    from audit.calibrate import calibrate, load_calibration, write_calibration
    from audit.errors import CalibrationError

    run = make_run(tmp_path / "ref", [(f"p{i}", i / 10) for i in range(10)])
    cal = calibrate(run, fpr=0.1)
    assert cal["threshold"] == 0.8  # of 10 risks 0.0-0.9, k = 1: the 9th smallest
    cal["threshold"] = 0.8000001
    path = write_calibration(cal, tmp_path / "cal.json")
    with pytest.raises(CalibrationError) as err:
        load_calibration(path)
    assert "threshold 0.8000001 is not the reference risk ranked 2 from the top (0.8 by its reference_cdf: fpr 0.1 " \
           "of 10 allows 1 flagged): the file was edited" in str(err.value)


def _section_rows(md: str, title: str) -> list[list[str]]:
    lines = md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")][1:]


def test_a_group_whose_max_risk_is_just_under_the_threshold_never_reads_above_it(tmp_path):
    """Threshold 1.7935721. File b's riskiest row is 1.793569 (not flagged): its max printed 1.7936, above 'risk >
    1.79357', beside flagged 0. The max risk then carries the digits that keep it and the flags in agreement (the mean
    and p95, which say nothing of the flags, keep 4 decimals)."""
    rows = [("a1", 1.9, "in/a.parquet"), ("a2", 1.0, "in/a.parquet"), ("b1", 1.793569, "in/b.parquet"),
            ("b2", 1.2, "in/b.parquet")]
    r = build_report(make_run(tmp_path / "r", rows, threshold=1.7935721, fpr=0.01))
    md = render_markdown(r)
    # recomputed: a: mean (1.9 + 1.0) / 2 = 1.45, p95 = max = 1.9, 1 flagged; b: mean 1.4967845, max 1.793569, 0
    assert _section_rows(md, "By source file") == [
        ["in/a.parquet", "2", "2", "1.4500", "1.9000", "1.90000", "1", "0"],
        ["in/b.parquet", "2", "2", "1.4968", "1.7936", "1.79357", "0", "0"]]
    assert r.threshold_text == "1.7935721" and "flagged: risk &gt; 1.7935721." in md
    groups = json.loads(render_json(r))["breakdowns"][0]["groups"]
    assert [(g["max_risk"], g["flagged"]) for g in groups] == [(1.9, 1), (1.793569, 0)]


# ---------------------------------------------------------------- diff: both runs' risks of a prompt

def test_a_rank_rise_never_reads_as_two_equal_risks(tmp_path):
    """Two nights at different batch sizes move risks by about 1e-7, which swaps near-equal prompts: b rose from
    rank 2 to 1 (its risk 1.0 -> 1.0000001, a's 1.0000001 -> 1.0) and the diff read 'rise 1, old risk 1.00000, new
    risk 1.00000'. Such a pair gets the decimals that tell it apart; other risks keep 5."""
    from audit.diff import diff_runs, render_json, render_markdown as diff_markdown, render_terminal
    from rich.console import Console

    old = make_run(tmp_path / "o", [("a", 1.0000001), ("b", 1.0), ("c", 0.5)])
    new = make_run(tmp_path / "n", [("a", 1.0), ("b", 1.0000001), ("c", 0.25)])
    d = diff_runs(old, new)
    assert (d.summary["rank_risen"], d.summary["rank_fallen"]) == (1, 1)
    md = diff_markdown(d)
    assert _section_rows(md, "Largest rank rises") == [["1", "2", "1", "1.0000000", "1.0000001", "1", "b",
                                                         "in/a.parquet\\#1"]]
    assert json.loads(render_json(d))["rank_rises"][0]["old_risk"] == 1.0
    console = Console(width=200, record=True)
    render_terminal(d, console)
    assert "1.0000000 │ 1.0000001" in console.export_text()


def test_a_newly_flagged_prompt_shows_its_two_risks_apart(tmp_path):
    """Old and new run flagged by the same threshold 1.7935721: prompt a at 1.7935720 (not flagged) then 1.7935723
    (flagged) read 'risk 1.79357, old risk 1.79357, was not flagged'."""
    from audit.diff import diff_runs, render_markdown as diff_markdown

    old = make_run(tmp_path / "o", [("a", 1.7935720), ("z", 0.1)], threshold=1.7935721)
    new = make_run(tmp_path / "n", [("a", 1.7935723), ("z", 0.1)], threshold=1.7935721)
    rows = _section_rows(diff_markdown(diff_runs(old, new)), "Newly flagged")
    assert rows == [["1", "1.7935723", "1", "1.7935720", "was not flagged", "1", "a", "in/a.parquet\\#0"]]
    # equal risks, newly flagged by a lower threshold: 5 decimals each, not 17
    old = make_run(tmp_path / "o2", [("a", 1.9), ("z", 0.1)], threshold=2.0)
    new = make_run(tmp_path / "n2", [("a", 1.9), ("z", 0.1)], threshold=1.5)
    rows = _section_rows(diff_markdown(diff_runs(old, new)), "Newly flagged")
    assert rows == [["1", "1.90000", "1", "1.90000", "was not flagged", "1", "a", "in/a.parquet\\#0"]]


def test_report_json_of_an_uncalibrated_run_counts_no_bin_as_flagged_none(tmp_path):
    """Without a calibration counts.flagged and each top prompt's flag are null, but every histogram bin said
    'flagged': 0, so a CI script summing the bins read 'nothing flagged' from a run that flags nothing at all."""
    r = build_report(make_run(tmp_path / "u", [("a", 1.0), ("b", 2.0), ("c", 2.0)]), bins=2)
    doc = json.loads(render_json(r))
    assert doc["counts"]["flagged"] is None and doc["top"][0]["flagged"] is None
    assert doc["histogram"] == [{"lo": 1.0, "hi": 1.5, "rows": 1, "flagged": None},
                                {"lo": 1.5, "hi": 2.0, "rows": 2, "flagged": None}]
    cal = json.loads(render_json(build_report(make_run(tmp_path / "c", [("a", 1.0), ("b", 2.0), ("c", 2.0)],
                                                       threshold=1.5), bins=2)))
    assert [(b["rows"], b["flagged"]) for b in cal["histogram"]] == [(1, 0), (2, 2)]


def test_the_plots_risk_axis_names_the_scorer_and_its_unit(tmp_path, monkeypatch):
    """The report's text says risk is attention_entropy in nats; the histogram's x axis and the dates plot's risk
    axis read a bare 'risk'. noise_magnitude has no unit named: its scorer only."""
    import audit.report as report
    from audit.report import histogram_figure

    r = build_report(make_run(tmp_path / "r", [("a", 1.0, "d/date=2026-12-01/a.parquet"),
                                               ("b", 2.0, "d/date=2026-12-02/a.parquet")]))
    assert histogram_figure(r).axes[0].get_xlabel() == "risk (attention_entropy, nats)"
    figures = []
    monkeypatch.setattr(report, "_png_data_uri", lambda fig: figures.append(fig) or "data:image/png;base64,")
    report.render_html(r)
    assert [ax.get_ylabel() for ax in figures[0].axes] == ["scored rows", "risk (attention_entropy, nats)"]
    nm = dict(json.loads((r.run_dir / "manifest.json").read_text()))
    nm["score_config"] = {**nm["score_config"], "scorer": "noise_magnitude"}
    (r.run_dir / "manifest.json").write_text(json.dumps(nm))
    assert histogram_figure(build_report(r.run_dir)).axes[0].get_xlabel() == "risk (noise_magnitude)"


def test_the_cache_hits_row_says_it_counts_rows(tmp_path):
    """A run of 60 one-file units over 160 prompts, each file repeating one prompt, reported 'cache hits 358' beside
    'unique prompts 160': the manifest counted hits once per unit, and the row said so. Since session 52 it counts
    scored rows (with the rows the model scored, the rows scored), and the row says that."""
    run = make_run(tmp_path / "r", [("a", 1.0), ("b", 2.0), ("a", 1.0)])
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["cache"] = {"dir": "cache", "hits": 3, "scored": 0, "compacted_files": 0}
    (run / "manifest.json").write_text(json.dumps(manifest))
    r = build_report(run)
    assert (r.counts["unique_prompts"], r.counts["cache_hits"]) == (2, 3)
    assert "| cache hits (rows) | 3 |" in render_markdown(r)
    assert json.loads(render_json(r))["counts"]["cache_hits"] == 3


def test_counts_of_a_thousand_or_more_print_alike_in_every_table(tmp_path):
    """The terminal's histogram counted '1,200' rows where report.md's said '1200'; the diff's summary said '1200
    new' above 'New prompts (20 of 1,200 shown)' (here 2,400)."""
    from audit.diff import diff_runs, render_markdown as diff_markdown

    rows = [(f"p{i}", 1.0 + (i % 2)) for i in range(2400)]
    md = render_markdown(build_report(make_run(tmp_path / "r", rows, threshold=1.5), bins=2))
    hist = md.split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[2:4] for line in hist[1:] if not line.startswith("-")] == [["1,200", "0"], ["1,200", "1,200"]]
    old = make_run(tmp_path / "o", [("x", 0.5)])
    summary = diff_markdown(diff_runs(old, tmp_path / "r")).splitlines()[5]
    assert summary.startswith("2,400 prompts in the new run, 1 in the old; 0 in both, 2,400 new, 1 gone;")
    assert "## New prompts (20 of 2,400 shown)" in diff_markdown(diff_runs(old, tmp_path / "r"))


def test_a_trigger_token_of_small_nonzero_mass_never_reads_0_000(tmp_path):
    """On SD 1.x the BOS token holds 90-99% of the attention; a prompt's fifth trigger token with mass 0.00041 read
    '(0.000)' in every format. Masses of 0.0005 and more keep 3 decimals."""
    from audit.report import render_html, render_terminal
    from rich.console import Console

    run = make_run(tmp_path / "r", [("red cat", 1.0)])
    table = pq.read_table(run / "risk.parquet")
    tokens = [[{"token": "red", "position": 1, "mass": 0.2, "start": 0, "end": 3},
               {"token": "cat", "position": 2, "mass": 0.00041, "start": 4, "end": 7},
               {"token": ",", "position": 3, "mass": 0.0005, "start": None, "end": None},
               {"token": "x", "position": 4, "mass": 0.0, "start": None, "end": None}]]
    i = table.schema.get_field_index("trigger_tokens")
    table = table.set_column(i, table.schema.field(i), pa.array(tokens, table.schema.field(i).type))
    pq.write_table(table, run / "risk.parquet")
    r = build_report(run)
    assert "<bdi>red</bdi> (0.200), <bdi>cat</bdi> (0.00041), <bdi>\",\"</bdi> (0.001), <bdi>x</bdi> (0.000)" \
        in render_markdown(r)
    assert "<bdi>cat</bdi> (0.00041)" in render_html(r)
    console = Console(width=200, record=True)
    render_terminal(r, console)
    assert "red (0.200), cat (0.00041)" in console.export_text()
    assert json.loads(render_json(r))["top"][0]["trigger_tokens"][1]["mass"] == 0.00041


def test_exactly_the_allowed_fraction_of_failed_rows_does_not_fail_the_run(tmp_path):
    """--max-error-fraction 0.29 and 29 of 100 rows not read as prompts: not more than the limit, yet 0.29 * 100 is
    28.999999999999996 in binary, and the run failed (exit 4) saying '29 of 100 rows read (29.0%) ... more than
    --max-error-fraction 0.29'. 30 of 100 still fail; so does 1 of 100 over 0 (any)."""
    from audit.gates import over_limit

    assert (over_limit(29, 100, 0.29), over_limit(30, 100, 0.29), over_limit(57, 100, 0.57)) == (False, True, False)
    assert (over_limit(1, 100, 0.0), over_limit(0, 100, 0.0), over_limit(2, 100, 0.01)) == (True, False, True)
    limits = SimpleNamespace(max_error_fraction=0.29, fail_on_flagged=None)
    lost = {"counts": {"rows_read": 100, "scored": 71, "rejected_by_reason": {"missing_prompt_column": 29}}}
    assert coverage_gate(limits, lost) is None
    failed = {"counts": {"rows_read": 100, "scored": 71, "rejected_by_reason": {"scoring_error": 29}}}
    assert error_gate(limits, Path("/nonexistent"), failed) is None
    from helpers import dry_run_of_logs_lacking_the_column

    res = dry_run_of_logs_lacking_the_column(tmp_path, 71, 29, "0.29")
    assert res.exit_code == 0, res.output
    assert "exit 4 expected" not in res.output
    res = dry_run_of_logs_lacking_the_column(tmp_path, 71, 29, "0.28")
    assert "exit 4 expected: 29 of 100 rows (29.0%) to be rejected" in " ".join(res.output.split())


def test_a_progress_line_never_says_100_percent_with_rows_left(monkeypatch):
    """The plain progress line (stderr in a file) rounded to whole percents: 9,996 of 10,000 rows read '(100%)' with
    4 rows left, 3 of 1,000 '(0%)'. Whole percents where true, a decimal more where not."""
    import rich.console

    import audit.runner
    from audit.runner import _Progress

    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: False))
    now = [0.0]
    monkeypatch.setattr(audit.runner, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    lines: list[str] = []
    bar = _Progress(10000, None, lines.append, every_s=5)
    for t, n in ((10, 30), (20, 3970), (40, 5996), (50, 4)):
        now[0] = t
        bar.advance(n)
    assert [line.split(" rows/s")[0] for line in lines] == [
        "memaudit: 30 of 10,000 rows (0.3%), 3", "memaudit: 4,000 of 10,000 rows (40%), 200",
        "memaudit: 9,996 of 10,000 rows (99.96%), 250"]


def test_a_percentile_below_the_references_highest_never_reads_100(tmp_path):
    """A calibration of 100,000 reference prompts: a prompt above 99,999 of them has percentile 99.999, shown as
    '100.00', which means at or above the reference's highest risk; one above 4 of them (0.004) read '0.00'."""
    run = make_run(tmp_path / "r", [("a", 3.0), ("b", 2.0), ("c", 1.0), ("d", 0.5), ("e", 0.25)], threshold=1.5)
    table = pq.read_table(run / "risk.parquet")
    i = table.schema.get_field_index("risk_percentile")
    table = table.set_column(i, table.schema.field(i), pa.array([100.0, 99.999, 50.0, 0.004, 0.0], pa.float64()))
    pq.write_table(table, run / "risk.parquet")
    cells = _top_cells(render_markdown(build_report(run)))
    assert [c[2] for c in cells] == ["100.00", "99.999", "50.00", "0.004", "0.00"]


def test_a_table_whose_flags_disagree_with_its_risks_adds_no_digits(tmp_path):
    """Rows whose flag is not risk > threshold (a table rewritten by another tool) cannot be told apart by any number
    of digits: they are left out, and the report prints the threshold and risks as usual, not with 17 digits."""
    run = make_run(tmp_path / "r", [("a", 1.9), ("b", 1.0)], threshold=1.5)
    table = pq.read_table(run / "risk.parquet")
    i = table.schema.get_field_index("flagged")
    table = table.set_column(i, table.schema.field(i), pa.array([False, True], pa.bool_()))  # both wrong
    pq.write_table(table, run / "risk.parquet")
    r = build_report(run)
    assert (r.threshold_text, r.risk_decimals, r.group_decimals) == ("1.5", 5, 4)
    assert _top_cells(render_markdown(r)) == [["1", "1.90000", "-", ""], ["2", "1.00000", "-", "FLAG"]]
