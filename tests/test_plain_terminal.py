"""On a terminal that draws only text (TERM=dumb or unknown: a screen reader's console, Emacs' shell), `memaudit
report` and `memaudit diff` print their tables without box-drawing characters and the report's histogram without
bars: a screen reader read every border and block aloud, row after row. Other terminals keep rich's tables."""

import re

import pytest
from typer.testing import CliRunner

from audit.cli import app
from test_report_mutants import make_run

DRAWN = re.compile("[\u2500-\u259f]")  # box drawing and block elements


@pytest.fixture()
def runs(tmp_path):
    a = make_run(tmp_path / "a", [("a red fox in the snow", 3.0), ("a blue whale at sea", 1.0),
                                  ("ordinary caption", 2.0)], threshold=2.5)
    b = make_run(tmp_path / "b", [("a red fox in the snow", 1.5), ("a blue whale at sea", 2.98),
                                  ("ordinary caption", 1.0)], threshold=2.5)
    return a, b


def _out(args, term):
    res = CliRunner().invoke(app, args, env={"TERM": term, "COLUMNS": "100", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("term", ["dumb", "unknown", "DUMB"])
def test_report_and_diff_on_a_plain_terminal_draw_no_lines_or_bars(runs, term):
    a, b = runs
    report = _out(["report", str(a)], term)
    assert not DRAWN.findall(report)
    lines = report.splitlines()
    # the tables' cells are all there, separated by spaces: counts, each bin with its rows, the threshold, the top list
    assert any(re.fullmatch(r"\s*rows read\s+3\s*", ln) for ln in lines)
    assert any(re.fullmatch(r"\s*2\.9333\s+3\s+1\s+1\s*", ln) for ln in lines)  # the last bin: 1 row, 1 flagged
    assert any(ln.strip() == "-- flag threshold 2.5 --" for ln in lines)
    assert any(re.fullmatch(r"\s*1\s+3\.00000\s+-\s+FLAG\s+a red fox in the snow\s+1\s+a\.parquet#0\s*", ln)
               for ln in lines)
    assert "Each bin counts rows of risk.parquet" in report and "Each bar" not in report
    diff = _out(["diff", str(a), str(b)], term)
    assert not DRAWN.findall(diff)
    assert any(re.fullmatch(r"\s*2\s+3\s+1\s+1\.00000\s+2\.98000\s+1\s+a blue whale at sea\s+a\.parquet#1\s*", ln)
               for ln in diff.splitlines())


def test_other_terminals_keep_the_drawn_tables(runs):
    a, b = runs
    report = _out(["report", str(a)], "xterm-256color")
    assert "┃" in report and "█" in report and "Each bar counts rows" in report
    assert "┃" in _out(["diff", str(a), str(b)], "xterm-256color")
