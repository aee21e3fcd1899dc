"""Findings of a user who learns memaudit from `--help` alone (session 50, uhelp): each option's help text checked
against what the command does at and beyond its limits, and the exit codes each failure gets."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from helpers import prompts_file, run_audit


def _invoke(*args, **kw):
    from audit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], **kw)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    """Two finished runs of the tiny model: 12 prompts, and the first 5 of them."""
    root = tmp_path_factory.mktemp("uhelp_runs")
    prompts = prompts_file(root / "p.txt", 12)
    few = root / "few.txt"
    few.write_text("".join(prompts.read_text().splitlines(keepends=True)[:5]))
    old, _ = run_audit([prompts], tiny_model_dir, root / "old")
    new, _ = run_audit([few], tiny_model_dir, root / "new")
    return old, new


@pytest.mark.parametrize("top", ["4294967296", "999999999999999999999"])
def test_a_top_beyond_every_prompt_lists_them_all_in_report_and_diff(two_runs, top):
    """`--top N`: "How many of the highest-risk prompts to list" / "Prompts per list". A count above polars' row
    index (2**32) ended `report` and `diff` in "OverflowError: ... (run with --debug for the traceback)", exit 1; it
    now lists every prompt, as a count of the table's size does."""
    old, new = two_runs
    res = _invoke("report", old, "--top", top, "--format", "json", "--output", "-")
    assert res.exit_code == 0, res.output
    listed = json.loads(res.stdout)["top"]
    assert [row["rank"] for row in listed] == list(range(1, 13))
    res = _invoke("diff", old, new, "--top", top, "--format", "json")
    assert res.exit_code == 0, res.output
    gone = json.loads(res.stdout)["gone_prompts"]
    assert len(gone) == 7  # the 7 prompts of the old run that the new one lacks, every one listed
