"""The report says when its run ran (first start to finish) and, for a run killed and rerun, how many units the rerun
found done: a report read months later, or handed to someone diagnosing it, said nothing of either."""

import json

from typer.testing import CliRunner

from audit.cli import app
from test_report_mutants import make_run


def _run(tmp_path, **manifest):
    run = make_run(tmp_path / "r", [("a red fox in the snow", 3.0), ("ordinary caption", 2.0)])
    m = json.loads((run / "manifest.json").read_text())
    m.update(manifest)
    (run / "manifest.json").write_text(json.dumps(m))
    return run


def test_a_resumed_run_says_when_it_ran_and_what_the_rerun_found_done(tmp_path):
    run = _run(tmp_path, first_started_at="2026-12-08T05:00:33+00:00", started_at="2026-12-08T05:01:32+00:00",
               finished_at="2026-12-08T05:01:40+00:00", units={"total": 20, "resumed": 16})
    line = ("run 2026-12-08T05:00:33+00:00 to 2026-12-08T05:01:40+00:00 (16 of 20 units resumed from an earlier "
            "invocation)")
    res = CliRunner().invoke(app, ["report", str(run)], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and line in res.output.splitlines()
    assert CliRunner().invoke(app, ["report", str(run), "--format", "md"]).exit_code == 0
    assert line in (run / "report.md").read_text()
    assert CliRunner().invoke(app, ["report", str(run), "--format", "html"]).exit_code == 0
    assert line in (run / "report.html").read_text()


def test_a_run_in_one_go_gives_its_times_only_and_an_old_manifest_nothing(tmp_path):
    run = _run(tmp_path, started_at="2026-12-08T05:00:33+00:00", finished_at="2026-12-08T05:01:40+00:00",
               units={"total": 20, "resumed": 0})
    out = CliRunner().invoke(app, ["report", str(run)], env={"COLUMNS": "200"}).output.splitlines()
    assert "run 2026-12-08T05:00:33+00:00 to 2026-12-08T05:01:40+00:00" in out
    old = _run(tmp_path / "old", started_at=None, finished_at=None, first_started_at=None)
    assert not any(ln.startswith("run ") for ln in
                   CliRunner().invoke(app, ["report", str(old)], env={"COLUMNS": "200"}).output.splitlines())
