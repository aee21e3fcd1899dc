"""Outputs: the fixes of session 52's ufixout list (diff of runs scored with other rounding settings, ...)."""

from __future__ import annotations

import pytest
import torch

from helpers import prompts_file, run_audit


@pytest.fixture(scope="module")
def rounding_runs(tiny_model_dir, tmp_path_factory):
    """Four finished runs of the same 12 prompts: ``base`` (batch 4, one torch thread), ``same`` (its settings
    again), ``batch`` (batch 8) and ``threads`` (batch 4, two torch threads: device ``cpu:2``)."""
    root = tmp_path_factory.mktemp("rounding")
    src = prompts_file(root / "p.txt", 12)
    runs = {}
    before = torch.get_num_threads()
    try:
        for name, batch, threads in (("base", 4, 1), ("same", 4, 1), ("batch", 8, 1), ("threads", 4, 2)):
            torch.set_num_threads(threads)
            runs[name] = run_audit([src], tiny_model_dir, root / name, device="cpu", batch_size=batch)[0]
    finally:
        torch.set_num_threads(before)
    return runs


def _rounding_lines(warnings: list[str]) -> list[str]:
    return [w for w in warnings if "float rounding" in w]


def test_diff_warns_when_the_runs_were_scored_with_other_rounding_settings(rounding_runs):
    """Two nights at other batch sizes (or torch thread counts) differ by float rounding, which reorders near-equal
    risks: ``memaudit report`` warned of such a mix within one run, ``memaudit diff`` of two such runs said nothing, so
    its rank rises read as change. Now one line names the settings, by the report's rule."""
    from audit.diff import diff_runs, render_json, render_markdown

    assert _rounding_lines(diff_runs(rounding_runs["base"], rounding_runs["same"]).warnings) == []
    d = diff_runs(rounding_runs["base"], rounding_runs["batch"])
    assert _rounding_lines(d.warnings) == [
        "the two runs were scored with different settings (batch_size: old run 4, new run 8): a prompt's risk may "
        "differ between "
        "them by float rounding (about 1e-7), so near-equal risks may swap ranks with the prompt unchanged"]
    said = "batch_size: old run 4, new run 8"
    assert said.replace("_", r"\_") in render_markdown(d) and said in render_json(d)
    threads = _rounding_lines(diff_runs(rounding_runs["base"], rounding_runs["threads"]).warnings)
    assert len(threads) == 1 and "(device: old run cpu:1, new run cpu:2)" in threads[0]
    both = _rounding_lines(diff_runs(rounding_runs["batch"], rounding_runs["threads"]).warnings)
    assert len(both) == 1 and "(batch_size: old run 8, new run 4, device: old run cpu:1, new run cpu:2)" in both[0]


def test_diff_of_rounding_settings_on_the_command_line(rounding_runs):
    """The terminal shows the line once, as a warning."""
    from typer.testing import CliRunner

    from audit.cli import app

    res = CliRunner().invoke(app, ["diff", str(rounding_runs["base"]), str(rounding_runs["batch"])])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert flat.count("were scored with different settings (batch_size: old run 4, new run 8)") == 1


def test_combined_scored_with_is_the_reports_rule():
    """``auto`` (a batch size not yet chosen) is no value; a mix within one run counts; a run recorded by an older
    memaudit that recorded some units and not others is named; a run that recorded none: no line."""
    from audit.pipeline import combined_scored_with, mixed_settings_warning

    def line(*scored_with):
        manifests = [{"scored_with": s, "units": {"total": 3}} if s is not None else {"units": {"total": 3}}
                     for s in scored_with]
        return mixed_settings_warning({"scored_with": combined_scored_with(manifests)}, "the two runs")

    one = {"batch_size": [8], "compile": [False], "device": ["cpu:2"], "engine": ["local"], "mixed": []}
    assert line(one, dict(one)) is None
    assert line(one, dict(one, batch_size=["auto", 8])) is None
    assert line(one, dict(one, engine=["ray"])) is None  # the engine alone does not round otherwise
    assert "(compile False / True)" in line(one, dict(one, compile=[True]))
    within = dict(one, batch_size=[8, 4], mixed=["batch_size"])  # a run halved after an out-of-memory error
    assert "(batch_size 8 / 4)" in line(one, within)
    older = dict(one, unrecorded_units=2)  # a run resumed across the upgrade that began recording them
    assert line(one, older) == ("2 unit(s) of the two runs were scored by an older memaudit that did not record their "
                                "batch size, --compile and device: if a rerun changed them, a prompt's risk may differ "
                                "between units by float rounding (about 1e-7)")
    # no record at all (every prompt served by --cache, or an older memaudit): no claim, as its own report makes none
    assert line(one, None) is None and line(None, None) is None
    # one run's own line is unchanged
    assert mixed_settings_warning({"scored_with": within}).startswith(
        "this run's units were scored with different settings (batch_size 8 / 4: a rerun")


def test_report_shows_what_the_run_warned_of_a_read_only_cache(tmp_path, tiny_model_dir, monkeypatch):
    """A run with a filled --cache on a read-only mount warned "lookups only, ... new scores are not stored (N this
    run ...)" and kept the line in manifest.json, but `memaudit report` of the run showed it nowhere: the morning's
    reader of report.html did not learn that the night's new scores were not stored. Now the report shows the run's
    cache warnings with its other warnings: on stderr, in report.html, report.md and report.json."""
    import json

    from typer.testing import CliRunner

    from audit.cli import app
    from audit.report import build_report, render_html, render_markdown
    from audit.runner import execute
    from audit.pipeline import RunConfig
    from test_ureadonly_findings import _read_only, _txt

    cache = tmp_path / "cache"
    kw = dict(model=str(tiny_model_dir), device="cpu", batch_size=8, cache=str(cache))
    execute(RunConfig(inputs=(_txt(tmp_path / "old.txt", ["a red cat", "a blue dog"]),), out=str(tmp_path / "r1"),
                      **kw), progress=False, log=lambda m: None)
    assert build_report(tmp_path / "r1").warnings == []  # a writable cache: nothing to say
    _read_only(monkeypatch, cache)
    _, m = execute(RunConfig(inputs=(_txt(tmp_path / "new.txt", ["a red cat", "sunset", "a small boat"]),),
                             out=str(tmp_path / "r2"), **kw), progress=False, log=lambda m: None)
    key = next(cache.iterdir())
    line = (f"score cache: {key} cannot be written (on a read-only file system): lookups only, its scores are served "
            "and new scores are not stored (2 this run; they are in this run's table, and scored again next time)")
    assert m["cache"]["warnings"] == [line]
    r = build_report(tmp_path / "r2")
    assert r.warnings == [line]
    assert f"<p class=\"warning\">Warning: {line.replace(chr(39), '&#x27;')}.</p>" in render_html(r)
    assert "**Warning:** score cache: " in render_markdown(r)
    res = CliRunner().invoke(app, ["report", str(tmp_path / "r2"), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["warnings"] == [line]
    res = CliRunner().invoke(app, ["report", str(tmp_path / "r2")])
    assert res.exit_code == 0 and f"memaudit: warning: {line}\n" in res.output  # stderr: one line


def test_cache_figures_count_rows_and_add_up_to_the_rows_scored(tmp_path, tiny_model_dir, monkeypatch):
    """Small files scored as one group with a filled cache: the cache figures counted unique prompts per file, so a
    prompt on two rows of a file was one hit, and hits + sent (5) matched neither the rows scored (6) nor the unique
    prompts (3). Now they count rows, as the run's counts do: every scored row's score came from the cache (a hit) or
    from the model, and the two add up to the rows scored. A prompt of an earlier file of the group stays a hit in a
    later one (one forward for both, as when the files are scored one after the other)."""
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.report import build_report, _count_rows

    cache = str(tmp_path / "cache")
    (tmp_path / "first.txt").write_text("a red cat\n")
    run_audit([tmp_path / "first.txt"], tiny_model_dir, tmp_path / "r1", device="cpu", batch_size=8, cache=cache)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text("a red cat\na red cat\na blue dog\n")  # the cached prompt twice, a new one
    (folder / "b.txt").write_text("a red cat\nsunset over the lake\n")
    (folder / "c.txt").write_text("a blue dog\n")  # a's new prompt again: scored once, in a's forward
    res = CliRunner().invoke(app, ["run", str(folder), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r2"),
                                   "--device", "cpu", "--batch-size", "8", "--cache", cache, "--no-progress"])
    assert res.exit_code == 0, res.output
    import json

    m = json.loads((tmp_path / "r2" / "manifest.json").read_text())
    assert m["units"]["total"] == 3 and (m["counts"]["scored"], m["counts"]["unique_prompts"]) == (6, 3)
    # the red cat's 3 rows and c's blue dog from the cache or the group's forward; a's blue dog and b's sunset scored
    assert (m["cache"]["hits"], m["cache"]["scored"]) == (4, 2)
    assert m["cache"]["hits"] + m["cache"]["scored"] == m["counts"]["scored"]
    assert "memaudit: cache 4 rows hit, 2 rows scored by the model\n" in res.output
    assert ("cache hits (rows)", "4") in _count_rows(build_report(tmp_path / "r2"))
    # a new cache: the files as one group, and one unit after another (each its own group), count alike: a's red cat
    # on 2 rows scored by the model, b's a hit (the group's forward, or the cache), a's blue dog scored, c's a hit
    import audit.runner

    grouped = run_audit([folder], tiny_model_dir, tmp_path / "r3", device="cpu", batch_size=8,
                        cache=str(tmp_path / "cache2"))[1]
    monkeypatch.setattr(audit.runner, "group_rows", lambda *a: 1)
    alone = run_audit([folder], tiny_model_dir, tmp_path / "r4", device="cpu", batch_size=8,
                      cache=str(tmp_path / "cache3"))[1]
    assert (grouped["cache"]["hits"], grouped["cache"]["scored"]) == (alone["cache"]["hits"],
                                                                      alone["cache"]["scored"]) == (2, 4)


@pytest.mark.parametrize("line", ["read, ", "cache "])
def test_a_sigterm_while_the_summary_is_printed_still_prints_the_run_folder_on_stdout(tmp_path, tiny_model_dir, line):
    """A scheduler's SIGTERM (a real one, sent by the process to itself as the summary's first line, or its cache
    line, is printed) ended the summary before the run folder's line: `OUT=$(memaudit run ...)` got nothing although
    the run's outputs were complete. The signal is now held until the run folder is on stdout; then the command says
    the outputs are complete and exits 143."""
    import os
    import subprocess
    import sys

    src = prompts_file(tmp_path / "p.txt", 4)
    out = tmp_path / "run"
    script = ("import os, signal, sys\n"
              "import audit.cli as cli\n"
              "real = cli.say\n"
              "def say(message):\n"
              f"    if message.startswith('memaudit: ') and {line!r} in message:\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "    real(message)\n"
              "cli.say = say\n"
              "real_echo = cli.typer.echo\n"
              "def echo(message=None, *a, **kw):\n"
              f"    if isinstance(message, str) and message.startswith('memaudit: ' + {line!r}):\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "    real_echo(message, *a, **kw)\n"
              "cli.typer.echo = echo\n"
              f"sys.argv = ['memaudit', 'run', {str(src)!r}, '--model', {str(tiny_model_dir)!r}, '--out', {str(out)!r},"
              f" '--device', 'cpu', '--no-progress', '--cache', {str(tmp_path / 'cache')!r}]\n"
              "cli.main()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert (out / "manifest.json").is_file()
    assert proc.stdout == f"{out}\n", proc.stderr
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.splitlines()[-1] == ("memaudit: error: terminated (SIGTERM) after the run finished: its outputs "
                                            f"are complete in {out}")
    assert "memaudit: 4 rows read, 4 scored" in proc.stderr  # the summary was printed whole
    assert "memaudit: cache 0 rows hit, 4 rows scored by the model" in proc.stderr


def test_termination_held_raises_the_held_signal_when_its_body_ends():
    """The held SIGTERM is raised once, as the outermost hold ends, also in place of an exception the body raised
    after it (a closed terminal's EIO after SIGHUP); a body that raises with no signal held keeps its exception; a
    signal outside a hold is raised at once, as before."""
    import signal

    from audit.faults import Terminated, _raise_terminated, termination_held

    done = []
    with pytest.raises(Terminated) as got:
        with termination_held():
            with termination_held():
                _raise_terminated(signal.SIGTERM, None)
                _raise_terminated(signal.SIGHUP, None)  # the first signal's is raised
                done.append("inner")
            done.append("outer")
    assert done == ["inner", "outer"] and got.value.signum == signal.SIGTERM
    with pytest.raises(Terminated) as got:
        with termination_held():
            _raise_terminated(signal.SIGHUP, None)
            raise OSError(5, "Input/output error")
    assert got.value.signum == signal.SIGHUP and isinstance(got.value.__cause__, OSError)
    with pytest.raises(ValueError):
        with termination_held():
            raise ValueError("the body's own")
    with termination_held():  # nothing held over
        pass
    with pytest.raises(Terminated):
        _raise_terminated(signal.SIGTERM, None)


def test_risk_parquet_is_byte_stable_with_and_without_confirm(tmp_path, tiny_model_dir):
    """`run --confirm` wrote the confirm stage's seconds into risk.parquet's metadata, so two identical runs wrote
    different bytes (a checksum-based pipeline saw a change every night). The invocation's figures (seconds, prompts
    resumed or scored now) are in manifest.json only: two runs, and a rerun that resumes the stage, write the same
    bytes, as runs without --confirm do."""
    import json

    import pyarrow.parquet as pq

    src = prompts_file(tmp_path / "p.txt", 10)
    kw = dict(device="cpu", batch_size=8)
    for name in ("plain1", "plain2"):
        run_audit([src], tiny_model_dir, tmp_path / name, **kw)
    assert (tmp_path / "plain1" / "risk.parquet").read_bytes() == (tmp_path / "plain2" / "risk.parquet").read_bytes()
    confirm = dict(kw, confirm="noise_magnitude", confirm_top="3")
    for name in ("c1", "c2"):
        run_audit([src], tiny_model_dir, tmp_path / name, **confirm)
    first = (tmp_path / "c1" / "risk.parquet").read_bytes()
    assert first == (tmp_path / "c2" / "risk.parquet").read_bytes()
    _, again = run_audit([src], tiny_model_dir, tmp_path / "c1", **confirm)  # the finished folder: stage resumed
    assert again["confirm"]["resumed_prompts"] == 3 and again["confirm"]["scored_prompts"] == 0
    assert (tmp_path / "c1" / "risk.parquet").read_bytes() == first
    meta = json.loads(pq.read_schema(tmp_path / "c1" / "risk.parquet").metadata[b"memaudit.confirm"])
    assert not {"seconds", "resumed_prompts", "scored_prompts"} & set(meta)
    assert meta["unique_prompts_confirmed"] == 3 and isinstance(again["confirm"]["seconds"], float)
