"""Findings of checking this session's README and docs/ claims against what a user sees (udocs53)."""

from __future__ import annotations

import json
import re

from test_report_mutants import make_run

OLD = [("a red fox in the snow", 3.0), ("a blue whale at sea", 1.0), ("ordinary caption", 2.0),
       ("gone prompt", 0.5)]
NEW = [("a red fox in the snow", 1.5), ("a blue whale at sea", 2.987654), ("ordinary caption", 1.0),
       ("added prompt", 2.75)]


def test_diff_blocks_at_40_columns_name_each_number_as_diff_json_names_it(tmp_path):
    """README: in a terminal too narrow for a list's table each prompt is a block, "its numbers on one line named as
    diff.json names them". The rank-rise block said `new_rank=1  ...  new_risk=2.98765` where diff.json's
    rank_rises records say `rank` and `risk`; every block's names are now the keys of its list's diff.json records."""
    from rich.console import Console

    from audit.diff import diff_runs, render_json, render_terminal

    d = diff_runs(make_run(tmp_path / "old", OLD, threshold=2.5), make_run(tmp_path / "new", NEW, threshold=2.5))
    console = Console(record=True, width=40, color_system=None)
    render_terminal(d, console)
    text = console.export_text()
    doc = json.loads(render_json(d))
    lists = ("newly_flagged", "no_longer_flagged", "rank_rises", "new_prompts", "gone_prompts")
    assert all(doc[k] for k in lists)  # each list has a prompt, so each prints a block
    keys = set().union(*(rec.keys() for k in lists for rec in doc[k]))
    named = set(re.findall(r"(?:^|\s)([a-z_]+)=", text))
    assert named and named <= keys, named - keys
    words = " ".join(text.split())
    assert "rise=2 old_rank=3 rank=1 old_risk=1.00000 risk=2.98765 rows=1 a blue whale at sea" in words
    assert "new_rank" not in text and "new_risk" not in text


def test_dry_run_ray_line_says_when_workers_are_cut_to_the_cluster_cpus(tmp_path, tiny_model_dir):
    """docs/ray.md's dry-run line ("--engine ray: 3 workers; ...", `--workers 3`) read "2 workers" on a 2-CPU machine
    with no word of why: the run cuts CPU actors to the cluster's CPUs (and says so when it starts), the dry run
    printed the cut count silently. work_split records --workers, and the line names the cut."""
    from types import SimpleNamespace

    from audit.cli import dry_run_lines
    from audit.pipeline import RunConfig
    from audit.runner import dry_run, work_split

    plan = SimpleNamespace(total_rows=10, units=[SimpleNamespace(rows=5, index=0), SimpleNamespace(rows=5, index=1)])
    engine = SimpleNamespace(worker_count=lambda cfg: 2)  # Ray's plan_resources on 2 CPUs
    cfg = RunConfig(inputs=("x",), engine="ray", workers=3)
    split = work_split(cfg, plan, engine, None)
    assert (split["workers"], split["workers_asked"]) == (2, 3)
    (tmp_path / "a.txt").write_text("a red fox\nthe blue sea\n")
    summary = {**dry_run(RunConfig(inputs=(str(tmp_path / "a.txt"),), model=str(tiny_model_dir),
                                   out=str(tmp_path / "out"), device="cpu")), "split": split}
    line = next(ln for ln in dry_run_lines(summary) if ln.startswith("--engine"))
    assert line.startswith("--engine ray: 2 workers (--workers 3 cut to the cluster's CPUs, as the run cuts them); ")
    for asked in (2, None):  # as many as asked, or Ray's default (the CPUs): nothing cut, nothing said
        split = work_split(RunConfig(inputs=("x",), engine="ray", workers=asked), plan, engine, None)
        line = next(ln for ln in dry_run_lines({**summary, "split": split}) if ln.startswith("--engine"))
        assert line.startswith("--engine ray: 2 workers; units of at most 20,000 rows, ")
