"""Findings of running memaudit in constrained environments (an ops engineer's trial): a low open-file limit
(`ulimit -n`), a read-only working folder, standard output on a full disk, a low memory limit. Each test fails on
the code before its fix."""

from __future__ import annotations

import errno
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from audit.cli import app
from helpers import prompts_file, run_audit


def _cli(args) -> "CliRunner.invoke":
    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------ the open-file limit (ulimit -n)

def _too_many_open_files(path: str = "logs/b.txt") -> OSError:
    return OSError(errno.EMFILE, "Too many open files", path)


def test_a_unit_read_at_the_open_file_limit_stops_the_run_under_skip_bad_files(tmp_path, tiny_model_dir,
                                                                             monkeypatch):
    """`(ulimit -n 12; memaudit run logs/ --skip-bad-files)`: a unit whose file could not be opened because the
    process had reached its open-file limit was rejected whole as `unreadable_rows` (370 of 600 rows of 60
    one-unit files, the run going on, the final merge exiting 0 where it found descriptors enough), as a damaged
    file is: the limit says nothing about the file. The run now stops at that unit, exit 2, naming the limit and
    its fix; the rerun under a raised limit equals a clean run."""
    import audit.unit

    logs = tmp_path / "logs"
    logs.mkdir()
    prompts_file(logs / "a.txt", 20, seed=1)
    prompts_file(logs / "b.txt", 20, seed=2)
    real = audit.unit.read_unit

    def read_unit(unit, *args, **kw):
        if unit.url.endswith("b.txt"):
            raise _too_many_open_files(unit.url)
        return real(unit, *args, **kw)

    monkeypatch.setattr(audit.unit, "read_unit", read_unit)
    monkeypatch.setattr("audit.faults._nofile_limit", lambda: "12", raising=False)
    from audit.errors import RunError

    kw = dict(device="cpu", batch_size=8, skip_bad_files=True)
    with pytest.raises(RunError) as err:
        run_audit([logs], tiny_model_dir, tmp_path / "run", **kw)
    b = str(logs / "b.txt")
    assert str(err.value) == (
        f"unit 1 ({b} rows 0-20): cannot be read, the process reached its open-file limit (ulimit -n 12) "
        f"(OSError: [Errno 24] Too many open files: '{b}'); raise it (ulimit -n 4096 in the job's shell, or its "
        "scheduler's nofile limit), then rerun the same command to resume: finished units are kept")
    assert not (tmp_path / "run" / "risk.parquet").exists()
    monkeypatch.setattr(audit.unit, "read_unit", real)
    _, resumed = run_audit([logs], tiny_model_dir, tmp_path / "run", **kw)
    _, clean = run_audit([logs], tiny_model_dir, tmp_path / "clean", **kw)
    assert resumed["counts"] == clean["counts"]
    assert resumed["counts"]["scored"] == 40 and resumed["counts"]["rejected_by_reason"] == {}
    assert pl.read_parquet(tmp_path / "run" / "risk.parquet").equals(
        pl.read_parquet(tmp_path / "clean" / "risk.parquet"))


def test_a_unit_read_at_the_open_file_limit_is_not_called_damaged_without_skip_bad_files(monkeypatch):
    """Without --skip-bad-files the same limit said "cannot read (...); --skip-bad-files rejects such rows as
    unreadable_rows and goes on": advice that would drop the rows. It names the limit instead; a Parquet unit read
    again one row group at a time (under --skip-bad-files) stops the same way."""
    import audit.unit
    from audit.errors import RunError
    from audit.pipeline import RunConfig
    from audit.sources import Unit

    monkeypatch.setattr(audit.unit, "_sort_rows", lambda unit, cfg: (_ for _ in ()).throw(_too_many_open_files()))
    monkeypatch.setattr("audit.faults._nofile_limit", lambda: "256", raising=False)
    for skip in (False, True):
        with pytest.raises(RunError) as err:
            audit.unit.prepare_unit(Unit(4, "logs/b.txt", "txt", 0, 30),
                                    RunConfig(inputs=("logs",), skip_bad_files=skip))
        assert str(err.value).startswith("unit 4 (logs/b.txt rows 0-30): cannot be read, the process reached its "
                                         "open-file limit (ulimit -n 256) (OSError: [Errno 24] Too many open files: "
                                         "'logs/b.txt'); raise it"), str(err.value)
    # a Parquet unit of two row groups: the first attempts fail, then its groups are read one by one
    calls = []

    def sort_rows(unit, cfg):
        calls.append((unit.start, unit.stop))
        raise _too_many_open_files("logs/c.parquet") if len(calls) > 3 else OSError("Invalid BYTE_ARRAY value")

    monkeypatch.setattr(audit.unit, "_sort_rows", sort_rows)
    monkeypatch.setattr(audit.unit, "row_group_ranges", lambda unit: [(0, 10), (10, 20)])
    with pytest.raises(RunError) as err:
        audit.unit.prepare_unit(Unit(2, "logs/c.parquet", "parquet", 0, 20), RunConfig(inputs=("logs",),
                                                                                      skip_bad_files=True))
    assert calls == [(0, 20)] * 3 + [(0, 10)]
    assert str(err.value).startswith("unit 2 (logs/c.parquet rows 0-10): cannot be read, the process reached its "
                                     "open-file limit")


def test_a_file_planned_at_the_open_file_limit_is_not_skipped_as_unreadable(tmp_path, monkeypatch):
    """Planning reads each file's schema and rows; a file it could not open for the open-file limit was skipped as
    unreadable under --skip-bad-files (its rows in no count, a warning) or refused as "cannot read as parquet". It
    is refused naming the limit, with or without --skip-bad-files."""
    import audit.sources
    from audit.errors import SourceError
    from audit.sources import discover, plan_units

    a = tmp_path / "a.parquet"
    pl.DataFrame({"prompt": ["a red cat", "a blue dog"]}).write_parquet(a)
    monkeypatch.setattr(audit.sources, "_plan_file", lambda *args, **kw: (_ for _ in ()).throw(
        OSError(errno.EMFILE, "Too many open files", str(a))))
    monkeypatch.setattr("audit.faults._nofile_limit", lambda: "64", raising=False)
    files, _ = discover([str(a)])
    for skip in (False, True):
        with pytest.raises(SourceError) as err:
            plan_units(files, "prompt", skip_bad_files=skip)
        assert str(err.value) == (
            f"{a}: cannot be opened, the process reached its open-file limit (ulimit -n 64) (OSError: [Errno 24] "
            f"Too many open files: '{a}'); raise it (ulimit -n 4096 in the job's shell, or its scheduler's nofile "
            "limit) and rerun the same command")


def test_the_merge_at_the_open_file_limit_is_one_line_with_exit_2(tmp_path, tiny_model_dir, monkeypatch):
    """Every unit done, the final merge could not open a shard: `memaudit: error: OSError: [Errno 24] Failed to
    open local file '.../unit-000055.risk.parquet'. Detail: [errno 24] Too many open files (run with --debug for the
    traceback)`, exit 1, the code of a bug. It is exit 2 with the limit and its fix; the rerun resumes."""
    import audit.pipeline

    src = prompts_file(tmp_path / "p.txt", 12)
    args = ["run", src, "--model", tiny_model_dir, "--out", tmp_path / "run", "--device", "cpu", "--no-progress"]

    def merge(*a, **k):
        raise OSError(errno.EMFILE, "Failed to open local file 'run/shards/unit-000000.risk.parquet'. Detail: "
                                    "[errno 24] Too many open files")

    monkeypatch.setattr(audit.pipeline, "merge_ranked", merge)
    monkeypatch.setattr("audit.faults._nofile_limit", lambda: "12", raising=False)
    res = _cli(args)
    assert res.exit_code == 2, res.output
    assert res.output.splitlines()[-1] == (
        "memaudit: error: the process reached its open-file limit (ulimit -n 12): raise it (ulimit -n 4096 in the "
        "job's shell, or its scheduler's nofile limit) and rerun the same command; a run resumes from its finished "
        "units")
    monkeypatch.undo()
    res = _cli(args)
    assert res.exit_code == 0, res.output
    assert pl.read_parquet(tmp_path / "run" / "risk.parquet").height == 12


# ------------------------------------------------------------------ no --out, in a read-only working folder

@pytest.mark.parametrize("dry", [True, False])
def test_the_default_run_folder_is_checked_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch, dry):
    """`cd /app && memaudit run /data/logs` (a container whose working folder is read-only, cron's `/`) without
    --out: the dry run said "--out memaudit-runs/<time>: a new run folder", exit 0, and the run loaded the model
    (28 s on the tiny one) before "cannot make the run folder or its lock there (Read-only file system)". An
    explicit --out was checked with the other options; the default folder is now checked the same way, in both."""
    import os

    import audit.runner

    src = prompts_file(tmp_path / "p.txt", 5)
    work = tmp_path / "app"
    work.mkdir()
    monkeypatch.chdir(work)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(work) and mode & os.W_OK
                        else real_access(p, mode, **kw))
    monkeypatch.setattr("audit.config._read_only_mount", lambda folder: str(folder) == str(work))
    monkeypatch.setattr(audit.runner, "_load_scorer", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(audit.runner, "default_out_dir", lambda stamp=None: Path("memaudit-runs") / "20261207-193746")
    res = _cli(["run", src, "--model", tiny_model_dir, "--device", "cpu", "--no-progress"]
               + (["--dry-run"] if dry else []))
    assert res.exit_code == 2, res.output
    assert res.output.splitlines()[-1] == (
        f"memaudit: error: the default run folder memaudit-runs/20261207-193746 (no --out given): cannot make a "
        f"folder in {work} (on a read-only file system); give --out a folder this job can write")
    assert list(work.iterdir()) == []


# ------------------------------------------------------------------ a memory limit (ulimit -v)

def _limited_address_space(limit: int):
    def set_limit():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    return set_limit


def test_a_run_under_too_low_a_memory_limit_says_so_in_one_line_with_exit_2(tmp_path, tiny_model_dir):
    """`(ulimit -v 1000000; memaudit run ...)`: importing the model's libraries could not map a shared library, and
    the run exited 1, the code of a bug, with "RuntimeError: Failed to import diffusers.models.unets.
    unet_2d_condition because of the following error ...: .../_fblas...so: failed to map segment from shared
    object (run with --debug for the traceback)". It is exit 2, saying that memory ran out under the limit."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    src = prompts_file(tmp_path / "p.txt", 5)
    env = {"PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "audit.cli", "run", str(src), "--model", str(tiny_model_dir),
                           "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, preexec_fn=_limited_address_space(1000000 << 10))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "memaudit: error: memory ran out (the process may use 0.954 GiB: ulimit -v): give the job more memory "
        "(raise ulimit -v, or the container's memory limit; a smaller --batch-size lowers a run's peak), then rerun "
        "the same command; a run resumes from its finished units"), proc.stderr


@pytest.mark.parametrize("raised", [
    MemoryError(),
    OSError(errno.ENOMEM, "Cannot allocate memory"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_memory_that_ran_out_is_told_from_a_bug(raised, monkeypatch, capsys):
    """A MemoryError, an ENOMEM and torch's CPU allocator's RuntimeError, raised by a command, were "memaudit:
    error: MemoryError:  (run with --debug for the traceback)", exit 1; each is the memory line, exit 2."""
    from audit.cli.common import guarded

    monkeypatch.setattr("audit.faults._address_space_limit", lambda: None, raising=False)

    def command():
        raise raised

    with pytest.raises(__import__("typer").Exit) as exit_:
        guarded(command, resumable=False)
    assert exit_.value.exit_code == 2
    assert capsys.readouterr().err == (
        "memaudit: error: memory ran out: give the job more memory (raise ulimit -v, or the container's memory "
        "limit; a smaller --batch-size lowers a run's peak), then rerun the same command\n")


# ------------------------------------------------------------------ the job's log on a full disk

@pytest.mark.parametrize("gated", [True, False])
def test_a_log_on_a_full_disk_keeps_the_gates_exit_code(tmp_path, tiny_model_dir, monkeypatch, gated):
    """`memaudit run ... --calibration cal.json --fail-on-flagged 0 >> /var/log/memaudit.log 2>&1` with /var full:
    the run wrote every output, then printing the run folder failed and the gate's exit 3 became exit 2, "no space
    left on the device: free some and rerun the same command; a run resumes from its finished units". The gate's
    code now stands; without a gate the line says that the run finished and where its outputs are."""
    import audit.cli

    src = prompts_file(tmp_path / "p.txt", 12)
    run_audit([src], tiny_model_dir, tmp_path / "ref", device="cpu", batch_size=8)
    assert _cli(["calibrate", tmp_path / "ref", "--fpr", "0.5", "-o", tmp_path / "cal.json"]).exit_code == 0

    def echo_path(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit.cli, "echo_path", echo_path)
    args = ["run", src, "--model", tiny_model_dir, "--out", tmp_path / "run", "--device", "cpu", "--no-progress"]
    res = _cli(args + (["--calibration", tmp_path / "cal.json", "--fail-on-flagged", "0"] if gated else []))
    assert (tmp_path / "run" / "manifest.json").is_file()
    if gated:
        assert res.exit_code == 3, res.output
        assert res.output.splitlines()[-1] == ("memaudit: error: 6 rows flagged (risk > "
                                               f"{res.output.split('(risk > ')[1].split(')')[0]}), more than "
                                               "--fail-on-flagged 0; outputs are complete in the run folder")
    else:
        assert res.exit_code == 2, res.output
        assert res.output.splitlines()[-1] == (
            "memaudit: error: no space left on the device writing this command's output (standard output or error): "
            f"the run finished, its outputs are complete in {tmp_path / 'run'}; free some where the output goes")


# ------------------------------------------------------------------ SIGTERM where Python ignores exceptions

@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed Terminated itself
def test_a_sigterm_swallowed_by_a_finalizer_still_stops_the_run(tmp_path, tiny_model_dir, monkeypatch):
    """A SIGTERM that arrived while Python ran an import-lock callback printed "Exception ignored in: <function
    _get_module_lock.<locals>.cb ...> audit.faults.Terminated" and the run went on to exit 0: the scheduler's stop
    was lost (in a long run, until its SIGKILL). Such a signal now stops the run at the next group of units,
    which is kept: the same command resumes it to the clean run's table."""
    import signal

    import audit.unit
    from audit.faults import Terminated, terminate_as_interrupt

    src = prompts_file(tmp_path / "p.txt", 90)
    real = audit.unit.process_units
    calls, swallowed = [], []

    class Finalized:
        def __del__(self):  # the handler runs where Python ignores what it raises
            swallowed.append(1)
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)

    def process_units(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            Finalized()  # dropped at once: its __del__ swallows the Terminated
        return real(*args, **kw)

    monkeypatch.setattr("audit.engines.local.process_units", process_units)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        terminate_as_interrupt()
        kw = dict(device="cpu", batch_size=8, unit_rows=30)
        with pytest.raises(Terminated):
            run_audit([src], tiny_model_dir, tmp_path / "run", **kw)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert swallowed == [1] and len(calls) == 1 and not (tmp_path / "run" / "risk.parquet").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "shards").glob("*.done.json")) == ["unit-000000.done.json"]
    monkeypatch.undo()
    _, resumed = run_audit([src], tiny_model_dir, tmp_path / "run", **kw)
    _, clean = run_audit([src], tiny_model_dir, tmp_path / "clean", **kw)
    assert resumed["units"] == {"total": 3, "resumed": 1} and resumed["counts"] == clean["counts"]
    assert pl.read_parquet(tmp_path / "run" / "risk.parquet").equals(
        pl.read_parquet(tmp_path / "clean" / "risk.parquet"))


# ------------------------------------------------------------------ report -o, calibrate -o on a full disk

def test_a_report_or_calibration_that_fills_the_disk_names_the_file(tmp_path, tiny_model_dir, monkeypatch):
    """`memaudit report RUN -o /other/disk/r.html` (or `calibrate -o`) on a full disk said only "no space left on
    the device: free some and rerun the same command": not which disk, the run folder's or the -o file's. The line
    names the file meant (not its temporary file); the old file stays whole."""
    src = prompts_file(tmp_path / "p.txt", 6)
    run, _ = run_audit([src], tiny_model_dir, tmp_path / "run", device="cpu", batch_size=8)
    out = tmp_path / "other"
    out.mkdir()
    assert _cli(["report", run, "-o", out / "r.md"]).exit_code == 0
    before = (out / "r.md").read_text()
    real_write = Path.write_text

    def full(self, *a, **k):
        if self.name.startswith("."):  # the atomic write's temporary file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    res = _cli(["report", run, "-o", out / "r.md"])
    assert res.exit_code == 2, res.output
    assert res.output.splitlines()[-1] == (f"memaudit: error: no space left on the device writing {out / 'r.md'}: "
                                           "free some and rerun the same command")
    assert [(p.name, p.read_text()) for p in out.iterdir()] == [("r.md", before)]
    res = _cli(["calibrate", run, "-o", out / "c.json"])
    assert res.exit_code == 2, res.output
    assert res.output.splitlines()[-1] == (f"memaudit: error: no space left on the device writing {out / 'c.json'}: "
                                           "free some and rerun the same command")
