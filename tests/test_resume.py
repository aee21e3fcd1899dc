"""Resumable runs and faults on the local engine (the Ray engine's are in test_ray.py).

A run killed with SIGKILL midway and rerun loses no row and duplicates none; an exception on one prompt
becomes that prompt's reject row; a unit that keeps failing fails the run naming it (finished units stay);
a run with no progress for ``--stall-timeout`` seconds fails with a message.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from audit.errors import RunFolderBusyError
from audit.pipeline import RunConfig, RunError
from helpers import WORDS, fail_batches_with, prompts_file, run_audit  # noqa: F401



def _prompts_file(path, n: int):
    return prompts_file(path, n, seed=1)


_run = run_audit


def _table(out):
    import polars as pl

    return pl.read_parquet(out / "risk.parquet").sort("prompt_id")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP], ids=["SIGKILL", "SIGTERM", "SIGHUP"])
def test_local_sigkill_midway_then_rerun_loses_and_duplicates_nothing(tmp_path, tiny_model_dir, sig):
    """Killed midway (SIGKILL: no chance to clean up; SIGTERM, SIGHUP: unwind and say how to resume, exit 143 or 129,
    naming the folder: with a templated --out, "rerun the same command" would start a new one and orphan this
    one)."""
    src = _prompts_file(tmp_path / "p.txt", 40)
    cmd = [sys.executable, "-m", "audit.cli", "run", str(src), "--model", str(tiny_model_dir), "--out",
           str(tmp_path / "killed-{date}-{time}"), "--unit-rows", "4", "--batch-size", "4", "--no-progress"]
    # SIGHUP as from a terminal, even where the tests run under nohup (which ignores it, and the child inherits that)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    out = tmp_path / "none yet"
    try:
        while len(list((out / "shards").glob("*.done.json"))) < 2:
            out = next(tmp_path.glob("killed-*"), out)
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no unit finished in 120 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(sig)
        proc.wait(timeout=60)
    assert len(list((out / "shards").glob("*.done.json"))) < 10, "the run was not killed midway"
    if sig != signal.SIGKILL:  # SIGHUP (a closed terminal) ended the run at once, exit 129 with no line said
        assert proc.returncode == 128 + sig
        assert f"terminated ({sig.name}); rerun with --out {out} to resume" in proc.stderr.read().decode()
    _, manifest = _run([src], tiny_model_dir, out, unit_rows=4, batch_size=4)
    assert manifest["units"]["resumed"] >= 2
    assert manifest["counts"]["rows_read"] == manifest["counts"]["scored"] == 40
    resumed = _table(out)
    assert sorted(resumed["prompt_id"].to_list()) == sorted(f"{src}#{r}" for r in range(40))
    ref_out, _ = _run([src], tiny_model_dir, tmp_path / "ref", unit_rows=4, batch_size=4)
    ref = _table(ref_out)
    assert resumed.drop("rank").equals(ref.drop("rank"))


def test_exception_on_one_prompt_becomes_its_reject_row(tmp_path, tiny_model_dir, monkeypatch):
    fail_batches_with(monkeypatch, "poison")
    src = tmp_path / "p.txt"
    src.write_text("a red cat\na blue dog\na poison apple\nan old city\n")
    out, manifest = _run([src], tiny_model_dir, tmp_path / "out")
    import polars as pl

    rejects = pl.read_parquet(out / "rejects.parquet")
    assert rejects["row"].to_list() == [2]
    assert rejects["reason"][0] == "scoring_error"  # the name the manifest counts; the exception in detail
    assert rejects["detail"][0] == "ValueError: this prompt breaks the model"
    assert sorted(_table(out)["row"].to_list()) == [0, 1, 3]
    assert manifest["counts"]["rejected_by_reason"] == {"scoring_error": 1}


def test_unit_that_keeps_failing_fails_the_run_naming_it(tmp_path, tiny_model_dir, monkeypatch):
    import audit.engines.local

    original = audit.engines.local.process_units

    def process_units(group, *args, **kwargs):  # (units of 5 rows, --unit-rows 5: a group each)
        if group.index == 1:
            raise OSError("disk on fire")
        return original(group, *args, **kwargs)

    monkeypatch.setattr(audit.engines.local, "process_units", process_units)
    src = _prompts_file(tmp_path / "p.txt", 15)
    with pytest.raises(RunError, match=r"unit 1 \(.*p\.txt rows 5-10\) failed 3 times.*OSError: disk on fire"):
        _run([src], tiny_model_dir, tmp_path / "out", unit_rows=5)
    assert (tmp_path / "out" / "shards" / "unit-000000.done.json").exists()


@pytest.mark.parametrize("foreign_handler", [False, True])
def test_local_run_without_progress_fails_after_stall_timeout(tmp_path, tiny_model_dir, monkeypatch,
                                                              foreign_handler):
    """A stalled local run fails within seconds, also when another SIGINT handler that swallows the
    interrupt was installed before (seen in a full CI run, where libraries loaded by earlier tests share the
    process); that handler is back in place afterwards."""
    import signal

    from audit.scorers import Scorer

    monkeypatch.setattr(Scorer, "launch", lambda self, batch: time.sleep(60))
    src = _prompts_file(tmp_path / "p.txt", 4)
    swallow = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGINT, swallow) if foreign_handler else None
    before = signal.getsignal(signal.SIGINT)
    try:
        t0 = time.monotonic()
        with pytest.raises(RunError, match=r"no progress for 2 s \(--stall-timeout\)"):
            _run([src], tiny_model_dir, tmp_path / "out", stall_timeout=2)
        assert time.monotonic() - t0 < 30
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        if foreign_handler:
            signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_both_engines_stop_on_sigint_even_when_it_was_inherited_ignored(tmp_path, monkeypatch, engine):
    """A driver started with `&` from a script inherits SIGINT ignored: the local engine stopped on it (its stall
    watchdog installs Python's handler) while the Ray engine ran on to the end. Both now stop (and with
    --stall-timeout 0 the local one too); the handler before is restored after the run."""
    import importlib
    import os

    from audit.config import RunConfig
    from audit.engines import EngineJob
    from audit.sources import Unit

    module = importlib.import_module(f"audit.engines.{engine}")

    def interrupted(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the signal is delivered before this returns
        raise AssertionError("SIGINT was ignored")

    monkeypatch.setattr(module, "run_ray" if engine == "ray" else "run_unit_with_retries", interrupted)
    unit = Unit(0, str(tmp_path / "p.txt"), "txt", 0, 1)
    job = EngineJob([unit], RunConfig(inputs=("x",), stall_timeout=0), tmp_path, lambda n: None, "m", None, "f")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt):
            module.run(job)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigint_inherited_ignored_is_restored_before_the_run_starts(monkeypatch):
    """The engines make SIGINT raise only while they run: a `kill -INT` in the seconds before (planning, the model's
    identity, ray.init) to a job started with `&` from a script was dropped and the run went on to exit 0. The
    console script's first step gives an ignored SIGINT Python's handler (another handler is left alone; a
    library caller's is never touched: terminate_as_interrupt, which the engines call, handles SIGTERM only)."""
    import audit.cli
    from audit.faults import sigint_not_ignored, terminate_as_interrupt

    previous_term = signal.getsignal(signal.SIGTERM)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        terminate_as_interrupt()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        monkeypatch.setattr(sys, "argv", ["memaudit", "--help"])
        with pytest.raises(SystemExit):
            audit.cli.main()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        own = lambda *a: None  # noqa: E731
        signal.signal(signal.SIGINT, own)
        sigint_not_ignored()
        assert signal.getsignal(signal.SIGINT) is own
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)


def test_stall_watchdog_rule_on_a_fake_clock():
    """One stall rule for both engines (audit.faults.StallWatchdog): stalled strictly after `timeout` seconds
    without a beat, not before; a beat (or a wrapped progress call) resets it; 0 or None disables it; the
    message names the rule, the detail and how to resume."""
    from audit.faults import StallWatchdog

    now = [100.0]
    w = StallWatchdog(5, "the Ray run", clock=lambda: now[0])
    now[0] = 105.0
    assert not w.stalled()  # exactly the timeout: not yet
    now[0] = 105.01
    assert w.stalled()
    seen = []
    w.wrap(seen.append)(3)  # progress resets the clock
    assert seen == [3] and not w.stalled()
    now[0] = 110.0
    assert not w.stalled()
    now[0] = 110.02
    assert w.stalled()
    assert w.message("waiting on unit 4") == ("the Ray run made no progress for 5 s (--stall-timeout); waiting on "
                                             "unit 4; finished units are kept: rerun the same command to resume")
    for off in (None, 0, -1):
        d = StallWatchdog(off, clock=lambda: now[0])
        now[0] += 1e6
        assert not d.stalled()


def test_a_finished_or_refused_local_rerun_does_not_load_the_model(tmp_path, tiny_model_dir, monkeypatch):
    """Rerunning a finished run folder reads the model's identity only (no weights): it answers with the same
    outputs and manifest counts; a different command on that folder is refused before any model load; an
    unfinished one loads the model and completes."""
    import io

    import polars as pl

    import audit.models

    src = prompts_file(tmp_path / "p.txt", 30)
    out = tmp_path / "run"
    _, first = run_audit([src], tiny_model_dir, out, device="cpu", unit_rows=10)
    risk = (out / "risk.parquet").read_bytes()
    loads = []
    real = audit.models.load_model
    monkeypatch.setattr(audit.models, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    _, again = run_audit([src], tiny_model_dir, out, device="cpu", unit_rows=10)
    assert loads == [] and again["counts"] == first["counts"] and again["units"]["resumed"] == 3
    assert again["model"] == first["model"] and again["score_config"] == first["score_config"]
    assert pl.read_parquet(out / "risk.parquet").equals(pl.read_parquet(io.BytesIO(risk)))
    with pytest.raises(RunError, match="holds a different run"):
        run_audit([src], tiny_model_dir, out, device="cpu", unit_rows=10, seed=7)
    assert loads == []
    (out / "shards" / "unit-000001.done.json").unlink()  # one unit left to score: the model is loaded
    _, resumed = run_audit([src], tiny_model_dir, out, device="cpu", unit_rows=10)
    assert len(loads) == 1 and resumed["units"]["resumed"] == 2 and resumed["counts"] == first["counts"]


@pytest.mark.parametrize("which", ["tiny_sd1", "lab"])
def test_identity_without_weights_equals_the_loaded_model_sd1_and_lab(which, tiny_model_dir):
    """As ``test_families.test_identity_without_weights_equals_the_loaded_models``, for SD 1.x and the lab."""
    from audit.lab import LAB_MODEL_DIR
    from audit.models import load_model
    from helpers import assert_identity_matches_loaded

    folder = str(tiny_model_dir if which == "tiny_sd1" else LAB_MODEL_DIR)
    assert_identity_matches_loaded(folder, load_model(folder, "cpu", "float32"))


def test_an_out_folder_that_is_not_this_runs_is_refused_before_the_model_loads(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    """--out holding a run's file names but no run.json (a run would overwrite them), or a damaged run.json, is
    refused before the model loads, and nothing in it changes; other files get a note and the run writes
    beside them."""
    import audit.models

    src = prompts_file(tmp_path / "p.txt", 5)
    loads = []
    real = audit.models.load_model
    monkeypatch.setattr(audit.models, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "risk.parquet").write_bytes(b"someone else's table")
    with pytest.raises(RunError, match=r"holds risk.parquet but no run.json.*nothing was overwritten"):
        run_audit([src], tiny_model_dir, foreign, device="cpu")
    assert (foreign / "risk.parquet").read_bytes() == b"someone else's table" and loads == []
    assert sorted(p.name for p in foreign.iterdir()) == ["risk.parquet"]
    stopped = tmp_path / "stopped"  # a run stopped between making shards/ and writing run.json resumes
    (stopped / "shards").mkdir(parents=True)
    assert run_audit([src], tiny_model_dir, stopped, device="cpu")[1]["counts"]["scored"] == 5
    loads.clear()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "run.json").write_text('{"inputs": [')
    with pytest.raises(RunError, match=r"its run.json is damaged \(JSONDecodeError"):
        run_audit([src], tiny_model_dir, damaged, device="cpu")
    assert loads == []

    from audit.runner import execute

    beside = tmp_path / "beside"
    beside.mkdir()
    (beside / "notes.txt").write_text("mine")
    (beside / ".hidden").write_text("")
    logged = []
    _, manifest = execute(RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(beside), device="cpu"),
                          progress=False, log=logged.append)
    assert manifest["counts"]["scored"] == 5 and (beside / "notes.txt").read_text() == "mine"
    assert [m for m in logged if "note:" in m] == [f"memaudit: note: --out {beside} also holds 1 other entry "
                                                    "(notes.txt); the run's files go beside them"]


def test_an_input_rewritten_during_the_run_fails_it_instead_of_losing_or_mixing_rows(tmp_path, tiny_model_dir,
                                                                                       monkeypatch):
    """A log rotated while a run read it: fewer rows than planned used to be marked done with rows_read 0 (rows
    lost, exit 0); as many rows mixed two versions. Now a unit that reads other than its planned rows fails, and
    a run whose inputs changed writes no table."""
    import os

    import audit.runner

    real = audit.runner.prepare_out_dir
    src = prompts_file(tmp_path / "log.txt", 30)

    def rotate_after_planning(text):
        def prepare(out, identity, *rest):
            src.write_text(text)
            st = os.stat(src)
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a clock tick even on coarse timestamps
            return real(out, identity, *rest)
        return prepare

    monkeypatch.setattr(audit.runner, "prepare_out_dir", rotate_after_planning("just one prompt\n"))
    with pytest.raises(RunError, match=r"rows 0-10\): 10 rows planned, 1 read: the file changed during the run"):
        run_audit([src], tiny_model_dir, tmp_path / "shrunk", device="cpu", unit_rows=10)
    assert not (tmp_path / "shrunk" / "risk.parquet").exists()
    prompts_file(src, 30)
    monkeypatch.setattr(audit.runner, "prepare_out_dir", rotate_after_planning(src.read_text().upper()))  # same rows
    with pytest.raises(RunError, match=r"1 input file\(s\) changed while the run read them: .*log.txt \(size="):
        run_audit([src], tiny_model_dir, tmp_path / "mixed", device="cpu", unit_rows=10)
    assert not (tmp_path / "mixed" / "risk.parquet").exists()


def test_a_run_folder_being_written_is_refused_to_a_second_process(tmp_path, tiny_model_dir):
    """Two identical cron jobs on one --out both scored everything; the second is now refused while the first
    holds the folder's lock (RunFolderBusyError, a RunError; exit 75), and runs (resuming) once it is free."""
    import fcntl

    src = prompts_file(tmp_path / "p.txt", 5)
    out = tmp_path / "run"
    _, first = run_audit([src], tiny_model_dir, out, device="cpu")
    with open(out / ".memaudit.lock", "a+b") as other:  # as the first process holds it while it runs
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunFolderBusyError, match="is being written by another memaudit run right now"):
            run_audit([src], tiny_model_dir, out, device="cpu")
        # the command line exits 75 (EX_TEMPFAIL: retry later), which a scheduler tells from an error's 2
        from typer.testing import CliRunner

        from audit.cli import app

        res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out", str(out),
                                       "--device", "cpu", "--no-progress"])
        assert res.exit_code == 75
        assert res.stderr.splitlines()[-1].startswith(f"memaudit: error: --out {out} is being written by another "
                                                      "memaudit run right now")
    _, again = run_audit([src], tiny_model_dir, out, device="cpu")
    assert again["counts"] == first["counts"]


def test_a_busy_run_folder_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    """The second of two overlapping runs loaded the model (minutes for a real checkpoint) before the lock refused
    it; the held lock is now tried first, so neither the model nor its identity is read."""
    import fcntl

    import audit.runner

    src = prompts_file(tmp_path / "p.txt", 3)
    out = tmp_path / "run"
    run_audit([src], tiny_model_dir, out, device="cpu")

    def no_model(*a, **k):
        raise AssertionError("the model was read")

    monkeypatch.setattr(audit.runner, "_load_scorer", no_model)
    monkeypatch.setattr(audit.runner, "_identity_info", no_model)
    with open(out / ".memaudit.lock", "a+b") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunFolderBusyError, match=f"^--out {out} is being written by another memaudit run"):
            run_audit([src], tiny_model_dir, out, device="cpu")


def test_two_runs_started_together_cannot_both_take_a_new_folder(tmp_path, tiny_model_dir):
    """The folder's identity is checked and written under the lock: a run that finds the lock held leaves no
    run.json of its own behind (one written before the lock let two runs with other settings both pass the check,
    the second's scores then filed under the first's identity)."""
    import fcntl

    src = prompts_file(tmp_path / "p.txt", 5)
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".memaudit.lock", "a+b") as other:  # the first run holds the new folder, not yet identified
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunError, match="is being written by another memaudit run right now"):
            run_audit([src], tiny_model_dir, out, device="cpu", seed=1)
        assert not (out / "run.json").exists()
    _, first = run_audit([src], tiny_model_dir, out, device="cpu")  # the first run's own settings: seed 0
    assert json.loads((out / "run.json").read_text())["score_config"].get("seed", 0) == 0
    with pytest.raises(RunError, match="holds a different run"):
        run_audit([src], tiny_model_dir, out, device="cpu", seed=1)


def test_a_rerun_cuts_the_units_its_folder_was_made_with(tmp_path, tiny_model_dir):
    """A folder whose units were split smaller (for a Ray run's workers, or an explicit --unit-rows) is resumed by
    the same command with another worker count or engine: rerunning with a larger --unit-rows used to be refused
    ('unit_rows: 150 -> 100'), naming an option the user never set."""
    src = prompts_file(tmp_path / "p.txt", 12)
    out = tmp_path / "run"
    _, first = run_audit([src], tiny_model_dir, out, device="cpu", unit_rows=4)
    _, again = run_audit([src], tiny_model_dir, out, device="cpu")  # default --unit-rows 20,000
    assert again["units"] == {"total": 3, "resumed": 3} and again["counts"] == first["counts"]
    with pytest.raises(RunError, match="unit_rows: 4 -> 3"):  # a smaller unit than the folder's: another command
        run_audit([src], tiny_model_dir, out, device="cpu", unit_rows=3)


def test_the_manifest_says_what_each_unit_was_scored_with_when_a_rerun_changes_it(tmp_path, tiny_model_dir):
    """--batch-size, --compile, the device and the engine are not part of a run's identity (a rerun may change
    them; the batch size also changes inside a run, halved on out-of-memory). A resumed run's manifest claimed the
    rerun's settings for every unit; it now lists what the units were scored with and warns when the settings
    that move risks by float rounding differ."""
    import torch

    from audit.runner import execute

    src = prompts_file(tmp_path / "p.txt", 12)
    out = tmp_path / "run"
    _, first = run_audit([src], tiny_model_dir, out, device="cpu", unit_rows=4, batch_size=2)
    device = f"cpu:{torch.get_num_threads()}"
    assert first["scored_with"] == {"batch_size": [2], "compile": [False], "device": [device], "engine": ["local"],
                                    "mixed": []}
    (out / "shards" / "unit-000002.done.json").unlink()  # as if the run had been stopped before its last unit
    logs: list[str] = []
    _, again = execute(RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(out), device="cpu",
                                 unit_rows=4, batch_size=3), progress=False, log=logs.append)
    assert again["units"] == {"total": 3, "resumed": 2}
    assert again["scored_with"]["batch_size"] == [2, 3] and again["scored_with"]["mixed"] == ["batch_size"]
    assert again["run_config"]["batch_size"] == 3  # this invocation's options, as before
    warning = [m for m in logs if "scored with different settings" in m]
    assert warning == ["memaudit: warning: this run's units were scored with different settings (batch_size 2 / 3: "
                       "a rerun with other options, scores served by --cache that another run computed, or a batch size halved "
                       "after an out-of-memory error): a "
                       "prompt's risk may differ between them by float rounding (about 1e-7), so ranks of "
                       "near-equal risks may differ from a run scored in one go"]
    # the report says it too (only the run's stderr and the manifest did), in every format
    from audit.report import build_report, render_json, render_markdown

    report = build_report(out)
    assert report.warnings == [warning[0].removeprefix("memaudit: warning: ")]
    assert json.loads(render_json(report))["warnings"] == report.warnings
    assert "**Warning:** this run's units were scored with different settings (batch\\_size 2 / 3" in \
        render_markdown(report)
    from audit.pipeline import mixed_settings_warning, scored_with_summary

    # a unit that scored nothing before --batch-size auto was resolved (all cache hits) is no other setting
    stats = [{"unit": 0, "scored_with": {"batch_size": "auto"}}, {"unit": 1, "scored_with": {"batch_size": 32}}]
    assert scored_with_summary(stats) == {"batch_size": ["auto", 32], "mixed": []}
    # a unit that scored nothing with the model records nothing; markers of an older memaudit are counted
    stats += [{"unit": 2, "scored_with": {}}, {"unit": 3}]
    assert scored_with_summary(stats) == {"batch_size": ["auto", 32], "mixed": [], "unrecorded_units": 1}
    assert "1 unit(s) of this run were scored by an older memaudit" in mixed_settings_warning(
        {"scored_with": scored_with_summary(stats)})


def test_a_rerun_removes_the_temporary_files_a_killed_run_left(tmp_path, tiny_model_dir):
    """A run killed while writing a table leaves its hidden temporary file (never renamed, never read); a rerun
    left them forever (a 10 MB .risk.parquet.<hex>.tmp after a kill in the final merge). The rerun removes the
    run's own, and nothing else of the folder."""
    src = _prompts_file(tmp_path / "p.txt", 12)
    out = tmp_path / "run"
    _run([src], tiny_model_dir, out, unit_rows=4, batch_size=4)
    (out / "confirm").mkdir()  # the --confirm stage's folder
    left = [out / ".risk.parquet.1ca92461.tmp", out / ".manifest.json.0badf00d.tmp",
            out / "shards" / ".unit-000001.risk.parquet.a9a3b663.tmp",
            out / "confirm" / ".part-0a1b.parquet.12345678.tmp"]
    kept = [out / ".report.html.1ca92461.tmp", out / "notes.tmp", out / ".risk.parquet.tmp"]
    for p in left + kept:
        p.write_bytes(b"partial")
    _, manifest = _run([src], tiny_model_dir, out, unit_rows=4, batch_size=4)
    assert manifest["units"]["resumed"] == 3
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)


def test_a_shard_copied_over_another_files_unit_is_not_taken_as_done(tmp_path, tiny_model_dir):
    """Two files of 3 prompts, one unit each: their shards hold the same rows (0-2) and counts, so only the
    shards' source statistics tell them apart. Unit 0's shards replaced by unit 1's (its marker kept) make unit 0
    not done, so a rerun scores it again instead of ranking file b's rows twice; nor is a shard whose rows are
    shifted past the unit's end."""
    import shutil

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from audit.unit import Unit, shard_paths, unit_done

    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text("".join(f"a {name} house {i}\n" for i in range(3)))
    out, _ = run_audit([tmp_path / "a.txt", tmp_path / "b.txt"], tiny_model_dir, tmp_path / "r", unit_rows=3)
    shards = out / "shards"
    units = [Unit(**json.loads(p.read_text())["unit"]) for p in sorted(shards.glob("*.done.json"))]
    assert [u.url.rsplit("/", 1)[-1] for u in units] == ["a.txt", "b.txt"] and all(unit_done(shards, u) for u in units)
    assert not any(shard_paths(shards, u)[1].exists() for u in units)  # no row rejected: no rejects shard
    shutil.copyfile(shard_paths(shards, units[1])[0], shard_paths(shards, units[0])[0])
    assert not unit_done(shards, units[0]) and unit_done(shards, units[1])
    # a shard of unit 1 whose rows are shifted by one (rows 1-3 of a unit of rows 0-2: its last row is the unit's
    # end, outside it) is not unit 1's either
    risk = shard_paths(shards, units[1])[0]
    table = pq.read_table(risk)
    shifted = pc.add(table["row"], pa.scalar(1, table.schema.field("row").type))
    pq.write_table(table.set_column(table.schema.get_field_index("row"), "row", shifted), risk)
    assert not unit_done(shards, units[1])


def test_retry_failed_scores_again_only_the_units_holding_scoring_failures(tmp_path, tiny_model_dir, monkeypatch):
    """A passing failure (an out-of-memory on a busy GPU, a device error) is kept by a plain rerun, which says how
    many rows it keeps failed; ``--retry-failed`` uncommits just the units holding them and scores those again, and
    the run then equals a clean run."""
    from audit.runner import execute
    import polars as pl

    src = tmp_path / "p.txt"
    src.write_text("a red cat\na blue dog\na poison apple\nan old city\nsome green tea\na tall tower\n")
    fail_batches_with(monkeypatch, "poison", RuntimeError("CUDA error: an illegal memory access was encountered"))
    out = tmp_path / "out"
    opts = dict(unit_rows=2, batch_size=2, max_error_fraction=0.5)
    _, first = _run([src], tiny_model_dir, out, **opts)
    assert first["counts"]["rejected_by_reason"] == {"scoring_error": 1}
    monkeypatch.undo()  # the device is well again

    def rerun(**kw):
        lines = []
        cfg = RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(out), **opts, **kw)
        return execute(cfg, progress=False, log=lines.append)[1], lines

    kept, lines = rerun()
    assert kept["counts"]["rejected_by_reason"] == {"scoring_error": 1} and kept["units"]["resumed"] == 3
    assert (f"memaudit: note: 1 finished unit of {out} holds 1 row the model failed to score (scoring_error 1); "
            "--retry-failed scores it again") in lines
    marks = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.done.json")}
    retried, lines = rerun(retry_failed=True)
    assert (f"memaudit: --retry-failed: 1 finished unit of {out} holds 1 row the model failed to score "
            "(scoring_error 1): scoring it again") in lines
    assert retried["units"] == {"total": 3, "resumed": 2} and retried["counts"]["scored"] == 6
    assert retried["counts"]["rejected_by_reason"] == {}
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.done.json")}
    assert [n for n in marks if marks[n] != after[n]] == ["unit-000001.done.json"]  # only the failed unit's
    ref, _ = _run([src], tiny_model_dir, tmp_path / "ref", **opts)
    assert pl.read_parquet(out / "risk.parquet").equals(pl.read_parquet(ref / "risk.parquet"))
    again, lines = rerun(retry_failed=True)  # nothing failed any more: a plain resume
    assert again["units"]["resumed"] == 3, lines
    assert not any("failed to score" in line for line in lines), lines


def test_generate_on_a_busy_folder_exits_75_as_run_does(tmp_path, monkeypatch):
    """memaudit generate refused a folder another generate writes with exit 2, as any error; it now exits 75
    (EX_TEMPFAIL: retry later) in one line, as memaudit run does."""
    from typer.testing import CliRunner

    import audit.cli.generate as generate
    from audit.cli import app
    from audit.pipeline import busy_message

    out = tmp_path / "gen"

    def busy(prompts, model, out, **kw):
        raise RunFolderBusyError(busy_message(out, "memaudit generate"))

    monkeypatch.setattr(generate, "run_generate", busy)
    (tmp_path / "p.txt").write_text("a red cat\n")
    res = CliRunner().invoke(app, ["generate", str(tmp_path / "p.txt"), "--model", str(tmp_path / "m"),
                                   "--out", str(out)])
    assert res.exit_code == 75
    assert res.stderr.splitlines()[-1] == (f"memaudit: error: --out {out} is being written by another memaudit "
                                           "generate right now; wait for it to finish (then rerun to resume or reuse "
                                           "it) or choose another --out")
