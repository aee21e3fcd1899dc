"""Findings of a safety analyst who reads memaudit's outputs (the report's page, Markdown and terminal views, the
diff) and recomputes their figures from risk.parquet: each test fails on the code before its fix. Run folders are
written by hand with known risks (``make_run``), so no model is loaded."""

from __future__ import annotations

import re

import polars as pl

from audit.report import build_report, histogram_figure, render_html, render_markdown, render_terminal
from test_report_mutants import make_run


def _terminal(r, width: int = 120) -> str:
    from rich.console import Console

    console = Console(record=True, width=width, color_system=None)
    render_terminal(r, console)
    return console.export_text()


# ---------------------------------------------------------------- histogram: flagged rows per bin

def test_the_histograms_flagged_part_adds_up_to_the_flagged_count(tmp_path):
    """Risks 0..4, threshold 2, 4 bins [0,1) [1,2) [2,3) [3,4]: the bin [2,3) reaches above the threshold but holds
    risk 2, which is not flagged (flagged = risk > 2). The page drew every bin reaching above the threshold in red,
    so its red bars showed 3 rows where the counts table said 2 were flagged. Now each bin counts its flagged rows
    (0, 0, 0, 2), the page stacks them in red on the unflagged ones (blue 1, 1, 1, 0), and the terminal and Markdown
    histograms have a flagged column that adds up to the flagged count."""
    rows = [(f"p{i}", float(i)) for i in range(5)]
    r = build_report(make_run(tmp_path / "r", rows, threshold=2.0), bins=4)
    assert r.counts["flagged"] == 2
    assert r.hist["count"].to_list() == [1, 1, 1, 2] and r.hist["above"].to_list() == [False, False, True, True]
    assert r.hist["flagged"].to_list() == [0, 0, 0, 2] and int(r.hist["flagged"].sum()) == r.counts["flagged"]

    ax = histogram_figure(r).axes[0]
    heights = {}
    for patch in ax.patches:
        rgb = tuple(round(c, 3) for c in patch.get_facecolor()[:3])
        heights.setdefault(rgb, []).append(patch.get_height())
    red = tuple(round(int("c62828"[i:i + 2], 16) / 255, 3) for i in (0, 2, 4))
    blue = tuple(round(int("1e88e5"[i:i + 2], 16) / 255, 3) for i in (0, 2, 4))
    assert heights == {blue: [1, 1, 1, 0], red: [0, 0, 0, 2]}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["flag threshold 2 (FPR 0.1)", "flagged rows (2)"]

    md = render_markdown(r)
    assert "   risk from           to     rows  flagged\n" in md
    assert re.search(r"\n +2 +3 +1 +0 ! █+\n +3 +4 +2 +2 ! █+\n", md)
    text = _terminal(r)
    assert re.search(r"┃ risk from ┃ +to ┃ rows ┃ flagged ┃", text)
    assert re.search(r"│ +2 │ +3 │ +1 │ +0 │ █+ +│", text) and re.search(r"│ +3 │ +4 │ +2 │ +2 │ █+ +│", text)


def test_an_uncalibrated_histogram_has_no_flagged_column_and_no_red(tmp_path):
    """Without a calibration nothing is flagged: the bins count 0 flagged rows, no flagged column is printed and the
    page draws blue bars only."""
    r = build_report(make_run(tmp_path / "r", [(f"p{i}", float(i)) for i in range(5)]), bins=4)
    assert r.hist["flagged"].to_list() == [0, 0, 0, 0]
    assert "flagged\n" not in render_markdown(r).split("```text")[1]
    assert "flagged ┃" not in _terminal(r)
    ax = histogram_figure(r).axes[0]
    assert [p.get_height() for p in ax.patches] == [1, 1, 1, 2] and ax.get_legend() is None
