"""`memaudit diff` lists each prompt no longer flagged, not only their count: the prompts a mitigation or a
retrained checkpoint fixed are what its reviewer reads. Run folders are written by hand (``make_run``)."""

from __future__ import annotations

import json

from test_report_mutants import make_run

BEFORE = [("p0", 0.0), ("p3", 3.0), ("p4", 4.0), ("p5", 5.0), ("p6", 6.0), ("p7", 1.0)]
AFTER = [("p0", 0.0), ("p3", 1.0), ("p4", 2.0), ("p5", 2.5), ("p6", 7.0), ("p7", 3.0)]
# both calibrated at 2.5: p3..p6 flagged before, p6 and p7 after; p3, p4 and p5 no longer flagged


def test_the_prompts_no_longer_flagged_are_listed_old_riskiest_first(tmp_path):
    """Old ranks p6 1, p5 2, p4 3, p3 4; new ranks p6 1, p7 2, p5 3, p4 4, p3 5. The list holds p5, p4, p3 with both
    ranks and risks and the new run's ids (its rows 3, 2, 1); --top 2 keeps the first two, the title saying of how
    many; the JSON carries the list, null when a run is not calibrated."""
    from audit.diff import diff_runs, render_json, render_markdown

    before = make_run(tmp_path / "before", BEFORE, threshold=2.5)
    after = make_run(tmp_path / "after", AFTER, threshold=2.5)
    d = diff_runs(before, after)
    assert d.no_longer_flagged.drop("source").rows() == [
        (2, 5.0, 3, 2.5, 1, "p5", "in/a.parquet#3"), (3, 4.0, 4, 2.0, 1, "p4", "in/a.parquet#2"),
        (4, 3.0, 5, 1.0, 1, "p3", "in/a.parquet#1")]
    assert d.summary["no_longer_flagged"] == 3
    top2 = diff_runs(before, after, top=2)
    assert top2.no_longer_flagged["prompt"].to_list() == ["p5", "p4"]
    doc = json.loads(render_json(top2))
    assert [(r["prompt"], r["old_rank"], r["rank"]) for r in doc["no_longer_flagged"]] == [("p5", 2, 3), ("p4", 3, 4)]
    md = render_markdown(top2)
    assert "## No longer flagged (2 of 3 shown)" in md
    assert "| 2 | 5.00000 | 3 | 2.50000 | 1 | p5 | in/a.parquet\\#3 |" in md
    plain = make_run(tmp_path / "plain", BEFORE)
    for d in (diff_runs(plain, after), diff_runs(before, plain)):
        assert d.no_longer_flagged is None and json.loads(render_json(d))["no_longer_flagged"] is None
        assert "No longer flagged" not in render_markdown(d)


def test_the_terminal_shows_the_list_with_short_ids(tmp_path):
    """The terminal's table, titled with how many of how many, shows the rows' ids by file name and row."""
    from rich.console import Console

    from audit.diff import diff_runs, render_terminal

    d = diff_runs(make_run(tmp_path / "before", BEFORE, threshold=2.5), make_run(tmp_path / "after", AFTER,
                                                                                 threshold=2.5))
    console = Console(record=True, width=160, color_system=None)
    render_terminal(d, console)
    text = console.export_text()
    assert "No longer flagged (3 of 3 shown)" in text
    line = next(ln for ln in text.splitlines() if " p5 " in ln and "a.parquet#3" in ln)
    assert [c.strip() for c in line.strip("│ ").split("│")] == ["2", "5.00000", "3", "2.50000", "1", "p5",
                                                                 "a.parquet#3"]


def test_report_and_diff_print_to_stdout_with_o_dash(tmp_path):
    """`memaudit report RUN --format json -o -` was refused ("- is not a .json file"): a CI step piping the report
    into jq had to write a file and read it back. `-o -` prints the text alone (the JSON parses; the report's path is
    not echoed), warnings on stderr; without --format it is a usage error, as is `diff -o -` without one."""
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.report import build_report, render_markdown

    before = make_run(tmp_path / "before", BEFORE, threshold=2.5)
    after = make_run(tmp_path / "after", AFTER, threshold=2.5)
    runner = CliRunner()
    res = runner.invoke(app, ["report", str(after), "--format", "json", "-o", "-"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["kind"] == "memaudit.report" and doc["counts"]["scored"] == 6
    assert not (after / "report.json").exists() and not (tmp_path / "-").exists()
    res = runner.invoke(app, ["report", str(after), "-f", "md", "-o", "-"])
    assert res.exit_code == 0 and res.stdout == render_markdown(build_report(after)).rstrip("\n") + "\n"
    res = runner.invoke(app, ["report", str(after), "-o", "-"])
    assert res.exit_code == 2 and "add --format md, html or json" in res.stderr
    res = runner.invoke(app, ["diff", str(before), str(after), "--format", "json", "-o", "-"])
    assert res.exit_code == 0 and json.loads(res.stdout)["summary"]["no_longer_flagged"] == 3
    res = runner.invoke(app, ["diff", str(before), str(after), "-o", "-"])
    assert res.exit_code == 2 and "add --format md or --format json" in res.stderr


def test_the_report_names_the_memaudit_that_made_the_run(tmp_path):
    """The report did not say which memaudit made a run, so two nights' reports across an upgrade looked alike.
    The header gets "made by memaudit <version>, build <build>" where the manifest records the build, and the JSON
    both keys (null for a manifest that records none)."""
    from audit.report import _model_lines, build_report, render_json

    run = make_run(tmp_path / "r", BEFORE)
    assert json.loads(render_json(build_report(run)))["memaudit_build"] is None
    assert not any(line.startswith("made by") for line in _model_lines(build_report(run)))
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps(manifest | {"memaudit_version": "0.1.0",
                                                              "memaudit_build": "0123456789ab"}))
    r = build_report(run)
    assert _model_lines(r)[3] == "made by memaudit 0.1.0, build 0123456789ab"
    doc = json.loads(render_json(r))
    assert (doc["memaudit_version"], doc["memaudit_build"]) == ("0.1.0", "0123456789ab")
