"""Findings of wiring `memaudit run` and `memaudit report` into a scheduler (cron, a Kubernetes CronJob) over a
prompt-log folder: exit codes a scheduler acts on, a full disk or a file size limit mid-run, read-only folders,
runs killed and resumed. Each test fails on the code before its fix."""

from __future__ import annotations

import errno
import resource
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from audit.cli import app
from helpers import prompts_file, run_audit

ROOT = Path(__file__).resolve().parents[1]


def _cli(args) -> "CliRunner.invoke":
    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------ a file size limit (ulimit -f) hit mid-run

def test_a_file_size_limit_is_a_disk_problem_not_retried():
    """`ulimit -f` (a batch system's or a container's file size limit) makes writes fail with EFBIG, as a full
    disk fails them with ENOSPC: nothing another attempt can cure. It was not known, so the final merge's EFBIG
    exited 1 ("anything unexpected") with pyarrow's raw OSError."""
    from audit.faults import disk_fix, disk_problem

    what = "a file reached the file size limit (ulimit -f)"
    assert disk_problem(OSError(errno.EFBIG, "File too large")) == what
    # pyarrow's OSError carries no errno, only the C library's words
    assert disk_problem(OSError("[Errno 27] Error writing bytes to file. Detail: [errno 27] File too large")) == what
    assert disk_fix(what) == "raise the limit (or write elsewhere)"
    assert disk_fix("no space left on the device") == "free some"
    assert disk_fix("the file system is read-only") == "make it writable (or write elsewhere)"


def test_a_unit_that_hits_the_file_size_limit_is_not_tried_again():
    """A shard write that fails with EFBIG was tried three times over (each time scoring the unit again), then
    reported as "failed 3 times, last with OSError ... File too large"; it stops at the first attempt, saying why."""
    from audit.errors import RunError
    from audit.faults import run_unit_with_retries
    from audit.sources import Unit

    calls = []

    def write():
        calls.append(1)
        raise OSError("[Errno 27] Error writing bytes to file. Detail: [errno 27] File too large")

    unit = Unit(index=3, url="logs/a.parquet", fmt="parquet", start=0, stop=30)
    with pytest.raises(RunError) as err:
        run_unit_with_retries(write, unit)
    assert len(calls) == 1
    assert str(err.value) == (
        "unit 3 (logs/a.parquet rows 0-30) could not be written, a file reached the file size limit (ulimit -f) "
        "(OSError: [Errno 27] Error writing bytes to file. Detail: [errno 27] File too large); raise the file size "
        "limit, then rerun the same command to resume: finished units are kept")


@pytest.mark.parametrize("code, fix", [
    (errno.ENOSPC, "free space on the output's disk"),
    (errno.EDQUOT, "free space within the quota"),
    (errno.EROFS, "make the output's file system writable"),
    (errno.EFBIG, "raise the file size limit"),
])
def test_a_unit_that_cannot_be_written_says_the_one_fix_for_its_problem(code, fix):
    """A unit that hit a full disk was told "free space on the output's disk (or make it writable)", a read-only
    one the same: each problem gets its own fix."""
    from audit.errors import RunError
    from audit.faults import run_unit_with_retries
    from audit.sources import Unit

    def write():
        raise OSError(code, "write failed")

    with pytest.raises(RunError) as err:
        run_unit_with_retries(write, Unit(index=0, url="a.txt", fmt="txt", start=0, stop=5))
    assert str(err.value).endswith(f"(OSError: [Errno {code}] write failed); {fix}, then rerun the same command to "
                                   "resume: finished units are kept")


def _limited(limit: int):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return set_limit


def test_a_run_that_hits_the_file_size_limit_stops_in_one_line_with_exit_2_and_resumes(tmp_path, tiny_model_dir):
    """`(ulimit -f 60; memaudit run ...)`: the shards fit under 60 KiB, the final risk.parquet does not. The run
    exited 1 with "OSError: [Errno 27] Error writing bytes to file. Detail: [errno 27] File too large (run with
    --debug for the traceback)", the code for a bug, so a scheduler could not tell a full disk from a crash; it is
    now exit 2 with the one line a full disk gets, and the rerun without the limit equals a clean run."""
    src = tmp_path / "p.txt"
    src.write_text("".join(f"a red cat number {i} on a beach\n" for i in range(300)))
    args = ["run", str(src), "--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "8",
            "--unit-rows", "30", "--no-progress"]
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "PYTHONDONTWRITEBYTECODE": "1"}  # a .pyc cut at the limit would break every later import
    proc = subprocess.run([sys.executable, "-m", "audit.cli", *args, "--out", str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, preexec_fn=_limited(32 << 10))
    shards = sorted(p.name for p in (tmp_path / "run" / "shards").glob("*.done.json"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"memaudit: error: a file reached the file size limit (ulimit -f) writing {tmp_path / 'run' / 'risk.parquet'}: "
        "raise the limit (or write elsewhere) and rerun the same command; a run resumes from its finished units"), \
        proc.stderr
    assert shards == [f"unit-{i:06d}.done.json" for i in range(10)]  # every unit committed before the merge
    assert not (tmp_path / "run" / "risk.parquet").exists()
    _, resumed = run_audit([src], tiny_model_dir, tmp_path / "run", device="cpu", batch_size=8, unit_rows=30)
    _, clean = run_audit([src], tiny_model_dir, tmp_path / "clean", device="cpu", batch_size=8, unit_rows=30)
    assert resumed["units"] == {"total": 10, "resumed": 10} and resumed["counts"] == clean["counts"]
    assert resumed["counts"]["scored"] == 300
    assert pl.read_parquet(tmp_path / "run" / "risk.parquet").equals(pl.read_parquet(tmp_path / "clean" / "risk.parquet"))


# ------------------------------------------------------------------ a run folder without write permission

@pytest.mark.parametrize("raised", [
    PermissionError(errno.EACCES, "Permission denied"),  # Python's open()
    OSError("Failed to open local file 'x.tmp'. Detail: [errno 13] Permission denied"),  # pyarrow's: no errno
])
def test_a_denied_write_names_the_file_meant_not_the_temporary_one(tmp_path, raised):
    """A write into a folder without write permission raised the raw error naming the temporary file
    (``PermissionError: [Errno 13] Permission denied: 'run/.report.md.3403960b.tmp'``), which `memaudit report`
    turned into exit 1, "anything unexpected"; it is a RunError naming the file meant and its folder."""
    from audit.errors import RunError
    from audit.tables import atomic_path

    with pytest.raises(RunError) as err:
        with atomic_path(tmp_path / "report.md"):
            raise raised
    assert str(err.value) == (f"cannot write {tmp_path / 'report.md'}: no write permission in {tmp_path} (make it "
                              "writable, or write elsewhere)")
    with pytest.raises(OSError) as other:  # any other error stays itself
        with atomic_path(tmp_path / "report.md"):
            raise OSError(errno.EIO, "Input/output error")
    assert type(other.value) is OSError and other.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


def test_report_into_a_read_only_run_folder_is_one_line_with_exit_2(tmp_path, tiny_model_dir, monkeypatch):
    """A scheduler's `memaudit report RUN --format md` on a run folder it may read but not write (a run made by
    another user, a read-only mount) exited 1 with "PermissionError: [Errno 13] Permission denied:
    'RUN/.report.md.3403960b.tmp' (run with --debug for the traceback)"; it is exit 2 naming report.md."""
    import pathlib

    src = prompts_file(tmp_path / "p.txt", 5)
    run_audit([src], tiny_model_dir, tmp_path / "run", device="cpu", batch_size=8)
    real_write = pathlib.Path.write_text

    def denied(self, *a, **k):  # what a folder without write permission does (tests may run as root)
        if self.parent == tmp_path / "run":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_write(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", denied)
    res = _cli(["report", tmp_path / "run", "--format", "md"])
    assert res.exit_code == 2, res.output
    assert res.stderr == (f"memaudit: error: cannot write {tmp_path / 'run' / 'report.md'}: no write permission in "
                          f"{tmp_path / 'run'} (make it writable, or write elsewhere with -o / --output)\n")
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".report")) == []


def test_a_shard_folder_made_read_only_mid_run_stops_at_once(tmp_path, tiny_model_dir, monkeypatch):
    """`chmod 555 RUN/shards` while a run writes it: each later unit was scored three times, each time failing on
    its temporary file ("failed 3 times, last with PermissionError: ... '.unit-000001.risk.parquet.1a2b3c4d.tmp'");
    the unit is tried once and the run stops naming the shard and its folder; a rerun resumes."""
    import pyarrow.parquet as pq

    from audit import tables
    from audit.errors import RunError

    src = prompts_file(tmp_path / "p.txt", 12)
    writes = []
    real = pq.write_table

    def read_only_after_first(table, where, *a, **k):
        writes.append(Path(where).name)
        if "unit-000001.risk" in str(where):
            raise OSError(f"Failed to open local file '{where}'. Detail: [errno 13] Permission denied")
        return real(table, where, *a, **k)

    monkeypatch.setattr(tables.pq, "write_table", read_only_after_first)
    with pytest.raises(RunError) as err:
        run_audit([src], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=8, unit_rows=6)
    shard_dir = tmp_path / "out" / "shards"
    assert str(err.value) == (f"cannot write {shard_dir / 'unit-000001.risk.parquet'}: no write permission in "
                              f"{shard_dir} (make it writable, or write elsewhere)")
    assert sum("unit-000001.risk" in w for w in writes) == 1  # one attempt
    monkeypatch.setattr(tables.pq, "write_table", real)
    _, manifest = run_audit([src], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=8, unit_rows=6)
    assert manifest["units"] == {"total": 2, "resumed": 1} and manifest["counts"]["scored"] == 12


# ------------------------------------------------------------------ nightly.sh stopped by its scheduler

STUB = """#!/usr/bin/env python3
import pathlib, signal, sys, time
log = pathlib.Path(sys.argv[0]).with_name("stub.log")
if sys.argv[1] != "run":
    log.open("a").write(sys.argv[1] + "\\n")
    sys.exit(0)
def stop(signum, frame):
    log.open("a").write(f"signal {signum}\\n")
    print("memaudit: error: terminated (SIGTERM); rerun with --out audits/nightly/x to resume", file=sys.stderr)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGHUP, stop)
log.open("a").write("started\\n")
time.sleep(60)
print("audits/nightly/x")
"""


def _default_signals() -> None:
    """In a child before exec: SIGINT, SIGTERM and SIGHUP at their default disposition and unblocked."""
    import signal as signals

    wanted = (signals.SIGINT, signals.SIGTERM, signals.SIGHUP)
    for s in wanted:
        signals.signal(s, signals.SIG_DFL)
    signals.pthread_sigmask(signals.SIG_UNBLOCK, wanted)


@pytest.mark.parametrize("sig, code", [("TERM", 143), ("INT", 130), ("HUP", 129)])
def test_stopping_nightly_sh_stops_its_memaudit_run(tmp_path, sig, code):
    """`kill -TERM` on pipelines/nightly.sh (a scheduler stopping the job, `timeout 6h nightly.sh`, Kubernetes
    stopping a container whose command is the script) killed bash at once and left `memaudit run` running, holding
    the run folder's lock: the scheduler's retry was refused ("--out ... is being written by another memaudit run
    right now") until the orphan finished. The script passes the signal on, and exits with memaudit's code."""
    import signal as signals
    import time

    stub = tmp_path / "memaudit"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "stub.log"
    (tmp_path / "tmp").mkdir()
    env = {"PATH": "/usr/bin:/bin", "MEMAUDIT": str(stub), "RUNS": str(tmp_path / "none"), "TMPDIR": str(tmp_path / "tmp")}
    # the signals as a scheduler's job has them: a shell cannot trap a signal ignored when it started (POSIX), and
    # a test run started in the background (`cmd &` from a script) has SIGINT ignored, which the child inherited
    script = subprocess.Popen(["bash", str(ROOT / "pipelines" / "nightly.sh")], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=_default_signals)
    for _ in range(600):  # until the stub has started and installed its handlers (a poll, not a timed assertion)
        if log.exists() and "started" in log.read_text():
            break
        time.sleep(0.05)
    script.send_signal(getattr(signals, f"SIG{sig}"))
    out, err = script.communicate(timeout=30)
    assert script.returncode == code, err
    assert log.read_text() == f"started\nsignal {getattr(signals, f'SIG{sig}').value}\n"  # no report, no diff
    assert err == "memaudit: error: terminated (SIGTERM); rerun with --out audits/nightly/x to resume\n"
    assert out == "" and list((tmp_path / "tmp").iterdir()) == []  # its temporary file removed


# ------------------------------------------------------------------ folders and files the job's user may not read

def _deny(monkeypatch, module, denied):
    """Make ``module``'s ``open`` (and ``os.scandir``) refuse the paths for which ``denied(path)`` holds, as for a
    user without permission (the tests may run as root, which chmod does not stop)."""
    import builtins
    import os

    real_open, real_scandir = builtins.open, os.scandir

    def fake_open(path, *a, **k):
        if denied(str(path)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    def fake_scandir(path="."):
        if denied(str(path)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(module, "open", fake_open, raising=False)
    monkeypatch.setattr(module.os, "scandir", fake_scandir)


def _day(root: Path, day: str, prompts: list[str]) -> Path:
    folder = root / f"dt={day}"
    folder.mkdir(parents=True)
    (folder / "part-0.txt").write_text("".join(p + "\n" for p in prompts))
    return folder


def test_an_input_folder_that_cannot_be_listed_is_refused_or_skipped_not_a_crash(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    """A day folder of the prompt log written by another user with mode 700: `memaudit run logs` exited 1 with
    "PermissionError: [Errno 13] Permission denied: '.../dt=2026-12-07' (run with --debug for the traceback)", and
    --skip-bad-files did not help. Its files are unknown, so it is refused as an unreadable file is (exit 2, one
    line naming it and --skip-bad-files); with the flag it is skipped, listed in the manifest, and the rest scored."""
    from audit import sources

    _day(tmp_path / "logs", "2026-12-06", ["a red cat", "a blue dog"])
    hidden = _day(tmp_path / "logs", "2026-12-07", ["a green tree"])
    _deny(monkeypatch, sources, lambda p: p == str(hidden))
    args = ["run", tmp_path / "logs", "--model", tiny_model_dir, "--device", "cpu", "--batch-size", "8"]
    res = _cli(args + ["--out", tmp_path / "refused"])
    assert res.exit_code == 2, res.output
    assert res.stderr == (f"memaudit: error: {hidden}: cannot list the folder (Permission denied) (--skip-bad-files "
                          "skips such files and goes on)\n")
    assert not (tmp_path / "refused").exists()
    res = _cli(args + ["--out", tmp_path / "skipped", "--skip-bad-files"])
    assert res.exit_code == 0, res.output
    manifest = __import__("json").loads((tmp_path / "skipped" / "manifest.json").read_text())
    assert manifest["counts"]["scored"] == 2 and manifest["counts"]["rows_read"] == 2
    assert manifest["skipped_files"] == [{"path": str(hidden), "reason": f"{hidden}: cannot list the folder "
                                                                          "(Permission denied)", "unreadable": True}]


def test_several_folders_that_cannot_be_listed_are_counted_in_the_refusal(tmp_path, monkeypatch):
    """The refusal names the first folder and counts the others, so a night with three unreadable partitions is
    not mistaken for one."""
    from audit import sources
    from audit.config import RunConfig
    from audit.errors import SourceError
    from audit.pipeline import build_plan

    _day(tmp_path / "logs", "2026-12-05", ["a red cat"])
    denied = [_day(tmp_path / "logs", d, ["a blue dog"]) for d in ("2026-12-06", "2026-12-07", "2026-12-08")]
    for n, more in ((3, ", and 2 more folders"), (2, ", and 1 more folder")):
        _deny(monkeypatch, sources, lambda p, n=n: p in {str(d) for d in denied[3 - n:]})
        with pytest.raises(SourceError) as err:
            build_plan(RunConfig(inputs=(str(tmp_path / "logs"),)))
        assert str(err.value) == (f"{denied[3 - n]}: cannot list the folder (Permission denied){more} "
                                  "(--skip-bad-files skips such files and goes on)")
        monkeypatch.undo()


def test_a_glob_over_a_folder_that_cannot_be_listed_does_not_drop_its_files_silently(tmp_path, tiny_model_dir,
                                                                                       monkeypatch):
    """`memaudit run 'logs/*/part-0.txt'` with one day folder another user's mode 700: fsspec's glob passed the
    folder over without a word, and the run scored the other day alone, exit 0, its rows missing from the audit
    and from every count. The folder is refused as a folder input's is (exit 2), or skipped and listed with
    --skip-bad-files; a pattern that then matches nothing says why."""
    from audit import sources

    _day(tmp_path / "logs", "2026-12-06", ["a red cat", "a blue dog"])
    hidden = _day(tmp_path / "logs", "2026-12-07", ["a green tree"])
    _deny(monkeypatch, sources, lambda p: p.rstrip("/") == str(hidden))
    args = ["run", f"{tmp_path}/logs/*/part-0.txt", "--model", tiny_model_dir, "--device", "cpu", "--batch-size", "8"]
    res = _cli(args + ["--out", tmp_path / "refused"])
    assert res.exit_code == 2, res.output
    assert res.stderr == (f"memaudit: error: {hidden}: cannot list the folder (Permission denied) (--skip-bad-files "
                          "skips such files and goes on)\n")
    res = _cli(args + ["--out", tmp_path / "skipped", "--skip-bad-files"])
    assert res.exit_code == 0, res.output
    manifest = __import__("json").loads((tmp_path / "skipped" / "manifest.json").read_text())
    assert manifest["counts"]["rows_read"] == 2
    assert manifest["skipped_files"] == [{"path": str(hidden), "reason": f"{hidden}: cannot list the folder "
                                                                          "(Permission denied)", "unreadable": True}]
    plan_of = lambda pattern: sources.discover([pattern])  # noqa: E731
    _, skipped = plan_of(f"{tmp_path}/logs/**/*.txt")  # every folder under '**' is looked into
    assert [s["path"] for s in skipped] == [str(hidden)]
    hour = _day(tmp_path / "logs" / "dt=2026-12-08", "hour-00", ["a sun"])  # two levels down
    monkeypatch.undo()
    _deny(monkeypatch, sources, lambda p: p.rstrip("/") == str(hour))
    files, skipped = plan_of(f"{tmp_path}/logs/**/*.txt")
    assert len(files) == 2 and [s["path"] for s in skipped] == [str(hour)]
    scratch = tmp_path / "logs" / "_temporary"  # a writer's folder the wildcard matches: never entered, never refused
    scratch.mkdir()
    monkeypatch.undo()
    _deny(monkeypatch, sources, lambda p: p.rstrip("/") == str(scratch))
    for pattern, n in (("logs/*/part-0.txt", 2), ("logs/**/*.txt", 3)):
        files, skipped = plan_of(f"{tmp_path}/{pattern}")
        assert len(files) == n and all(s.get("unreadable") is None for s in skipped), skipped
    monkeypatch.undo()
    _deny(monkeypatch, sources, lambda p: p.rstrip("/") == str(hidden))
    res = _cli(["run", f"{tmp_path}/logs/dt=2026-12-07/*.txt", "--model", tiny_model_dir, "--out", tmp_path / "x"])
    assert res.exit_code == 2 and res.stderr == (
        f"memaudit: error: {tmp_path}/logs/dt=2026-12-07/*.txt: the pattern matches no file it can read ({hidden}: "
        "cannot list the folder (Permission denied))\n"), res.output


def test_model_files_the_job_may_not_read_are_one_line_with_exit_2(tmp_path, tiny_model_dir, monkeypatch):
    """A model folder copied with another user's permissions: a first run exited 2 saying the readable-looking
    weights were "not a readable safetensors file (FileNotFoundError: No such file or directory ...): a damaged or
    partial download"; the rerun of a finished run (which hashes the files first) exited 1 with a raw
    PermissionError. Both now name the file and say it cannot be read (exit 2)."""
    from audit.models import base

    src = prompts_file(tmp_path / "p.txt", 4)
    args = ["run", src, "--model", tiny_model_dir, "--device", "cpu", "--batch-size", "8"]
    assert _cli(args + ["--out", tmp_path / "done"]).exit_code == 0
    weights = tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    _deny(monkeypatch, base, lambda p: p == str(weights))
    rerun = _cli(args + ["--out", tmp_path / "done"])  # a finished run: the identity is read first
    assert rerun.exit_code == 2, rerun.output
    # (the weight files' check, check_weight_files, comes before the identity's hashing since 2d10344)
    assert rerun.stderr == (f"memaudit: error: --model {tiny_model_dir}: unet/diffusion_pytorch_model.safetensors "
                            "cannot be read (Permission denied)\n")
    monkeypatch.setattr(base, "fingerprint_files", lambda *a, **k: "0" * 16)  # past the identity: the weights' check
    with pytest.raises(__import__("audit.errors").errors.ModelError) as err:
        base.check_float_weights("M", tiny_model_dir / "unet", "unet")
    assert str(err.value) == "--model M: unet/diffusion_pytorch_model.safetensors cannot be read (Permission denied)"


def test_a_model_config_the_job_may_not_read_is_not_called_invalid_json(tmp_path, monkeypatch):
    """read_json said "not a valid JSON file ([Errno 13] Permission denied ...)" for a config it may not read, and
    a folder it may not search raised a raw PermissionError from ``is_file`` (exit 1)."""
    import pathlib

    from audit.errors import ModelError
    from audit.models import base

    cfg = tmp_path / "unet" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text("{}")
    real_read = pathlib.Path.read_text
    monkeypatch.setattr(pathlib.Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(self))) if self == cfg else real_read(self, *a, **k))
    with pytest.raises(ModelError) as err:
        base.read_json(cfg)
    assert str(err.value) == f"{cfg}: cannot be read (Permission denied)"
    real_is_file = pathlib.Path.is_file
    monkeypatch.setattr(pathlib.Path, "is_file", lambda self: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(self))) if self == cfg else real_is_file(self))
    with pytest.raises(ModelError) as err:
        base.read_json(cfg, missing={})
    assert str(err.value) == f"{cfg}: cannot be read (Permission denied)"


# ------------------------------------------------------------------ a locale whose encoding is not UTF-8

def test_report_under_an_ascii_locale_escapes_what_it_cannot_print(tmp_path, tiny_model_dir):
    """`LC_ALL=C PYTHONUTF8=0 memaudit report RUN` (a cron or container environment without a UTF-8 locale, where
    Python's UTF-8 mode is off): the first prompt outside ASCII, or the histogram's block characters, ended the
    report with "UnicodeEncodeError: 'ascii' codec can't encode characters ..." (exit 1) after half the tables.
    What the encoding lacks is written as a backslash escape, and the bars are drawn in '#'."""
    src = tmp_path / "p.txt"
    src.write_text("un café au lait\na red cat on a beach\n", encoding="utf-8")
    run_audit([src], tiny_model_dir, tmp_path / "run", device="cpu", batch_size=8)
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "COLUMNS": "100",
           "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    proc = subprocess.run([sys.executable, "-m", "audit.cli", "report", str(tmp_path / "run")], env=env,
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode("ascii", "replace")
    out = proc.stdout.decode("ascii")  # nothing but ASCII was written
    assert "un caf\\xe9 au lait" in out
    bars = [line for line in out.splitlines() if line.count("|") == 5 and "#" in line]
    assert len(bars) == 2 and all("#" * 40 in line for line in bars)  # two bins of one row each: full bars
    assert proc.stderr == b""


def test_an_out_folder_whose_name_is_not_utf8_is_refused_before_scoring(tmp_path, tiny_model_dir):
    """`--out $'runs/night\\xff'` (or any non-ASCII --out under an ASCII locale, where Python reads it as bytes
    that are not text): the folder was made, then every unit was scored three times and failed writing its shard
    ("failed 3 times, last with UnicodeEncodeError: 'utf-8' codec can't encode characters ...: surrogates not
    allowed"), as pyarrow opens UTF-8 paths only. It is refused before anything is loaded or made."""
    import os

    src = prompts_file(tmp_path / "p.txt", 3)
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/night\xff")
    res = _cli(["run", src, "--model", tiny_model_dir, "--device", "cpu", "--out", out])
    assert res.exit_code == 2, res.output
    assert res.stderr == f"memaudit: error: --out {tmp_path}/night\\xff: its name is not UTF-8 text; choose another --out\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]


def test_utf8_names_under_an_ascii_locale_are_not_called_badly_named(tmp_path):
    """Under `LC_ALL=C PYTHONUTF8=0` Python reads every non-ASCII file name as bytes that are not text: a log file
    correctly named `café.txt` was refused with "its name is not UTF-8 ...; rename it, e.g. convmv -f latin1 -t
    utf8" (a rename that breaks a correct name), and a non-ASCII --out scored every unit three times before
    failing. Both now say the locale is the cause and how to run instead (exit 2, nothing scored)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "café.txt").write_text("a red cat\n")
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "LC_ALL": "C", "PYTHONUTF8": "0",
           "PYTHONCOERCECLOCALE": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    hint = "(this process reads file names as ascii, not UTF-8: run it with LC_ALL=C.UTF-8 or PYTHONUTF8=1)"
    proc = subprocess.run([sys.executable, "-m", "audit.cli", "run", str(logs), "--out", str(tmp_path / "run")],
                          env=env, capture_output=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.decode("utf-8").splitlines()[-1] == (  # click writes UTF-8 to an ASCII stderr
        f"memaudit: error: {logs}/café.txt: its name is not text under this process's locale {hint} "
        "(--skip-bad-files skips such files and goes on)")
    (tmp_path / "plain.txt").write_text("a red cat\n")
    proc = subprocess.run([sys.executable, "-m", "audit.cli", "run", str(tmp_path / "plain.txt"), "--out",
                           str(tmp_path / "nuit-été")], env=env, capture_output=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.decode("utf-8").splitlines()[-1] == (
        f"memaudit: error: --out {tmp_path}/nuit-été: its name is not UTF-8 text {hint}; choose another --out")
    assert not (tmp_path / "nuit-été").exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the job's log

def test_an_html_report_with_an_unwritable_home_writes_nothing_to_stderr(tmp_path, tiny_model_dir):
    """A nightly job whose HOME cannot hold ~/.config (a read-only container file system, a service user): every
    `memaudit report RUN --format html` wrote matplotlib's "mkdir -p failed for path .../.config/matplotlib" and
    "Matplotlib created a temporary cache directory at /tmp/matplotlib-... it is highly recommended to set the
    MPLCONFIGDIR environment variable ..." to stderr, two lines of noise in each night's log. The page is written
    and stderr stays empty."""
    src = prompts_file(tmp_path / "p.txt", 4)
    run_audit([src], tiny_model_dir, tmp_path / "run", device="cpu", batch_size=8)
    home = tmp_path / "home"
    home.write_text("")  # a file: ~/.config cannot be made, even by root
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(home),
           "TMPDIR": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "audit.cli", "report", str(tmp_path / "run"), "--format", "html"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{tmp_path / 'run' / 'report.html'}\n" and proc.stderr == ""
    assert "data:image/png;base64," in (tmp_path / "run" / "report.html").read_text()


def test_a_run_started_without_stdout_finishes_with_exit_0(tmp_path, tiny_model_dir):
    """`memaudit run ... >&-` (a supervisor that closes stdout, a crontab line ending in `>&-`): the run scored
    everything, then ended with "AttributeError: 'NoneType' object has no attribute 'isatty'" (exit 1) where it
    prints the run folder, so the scheduler saw a failed night; `memaudit report` failed the same way. Both exit 0
    and the run's tables are whole."""
    import os

    src = prompts_file(tmp_path / "p.txt", 5)
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "PYTHONDONTWRITEBYTECODE": "1"}
    run = subprocess.run([sys.executable, "-m", "audit.cli", "run", str(src), "--model", str(tiny_model_dir),
                          "--device", "cpu", "--batch-size", "8", "--out", str(tmp_path / "run")],
                         env=env, stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines()[-1].startswith("memaudit: 5 rows read, 5 scored, 0 rejected (none), 5 unique")
    assert pl.read_parquet(tmp_path / "run" / "risk.parquet").height == 5
    report = subprocess.run([sys.executable, "-m", "audit.cli", "report", str(tmp_path / "run")], env=env,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1))
    assert report.returncode == 0 and report.stderr == "", report.stderr


# ------------------------------------------------------------------ a run folder on a file system without locks

def test_a_run_folder_on_a_file_system_without_locks_is_written_with_a_warning(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    """--out on an NFS mount without its lock service (or a FUSE or SMB mount that has no flock): the run's lock
    failed with "OSError: [Errno 37] No locks available" and the command exited 1 ("anything unexpected") before
    scoring, on every night. It runs unlocked, after a warning that says what is lost, and its table is whole."""
    import fcntl

    def no_locks(fh, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    src = prompts_file(tmp_path / "p.txt", 6)
    res = _cli(["run", src, "--model", tiny_model_dir, "--device", "cpu", "--batch-size", "8", "--out",
                tmp_path / "run"])
    assert res.exit_code == 0, res.output
    assert (f"memaudit: warning: --out {tmp_path / 'run'}: its file system has no file locks (No locks available): a "
            "second memaudit run started on this folder while this one runs would not be refused\n") in res.stderr
    assert pl.read_parquet(tmp_path / "run" / "risk.parquet").height == 6

    def other(fh, op):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", other)  # any other failure of the lock is not taken for a missing one
    res = _cli(["run", src, "--model", tiny_model_dir, "--device", "cpu", "--batch-size", "8", "--out",
                tmp_path / "run2"])
    assert res.exit_code == 1 and "OSError: [Errno 5] Input/output error" in res.stderr, res.output


# ------------------------------------------------------------------ a low open-file limit

def test_a_run_over_many_small_files_finishes_under_a_low_open_file_limit(tmp_path, tiny_model_dir):
    """`ulimit -n 256` (macOS's default, or a scheduler's): a run over 300 one-prompt log files scored every unit,
    then its final merge, which held up to 256 shards open at once, failed with "OSError: [Errno 24] ... Too many
    open files" (exit 1), and so did every rerun. A merge now holds no more shards than the limit leaves room for.
    Here 120 files under a limit of 96 descriptors: the run exits 0 and its table equals an unlimited run's."""
    import os
    import resource

    logs = tmp_path / "logs"
    logs.mkdir()
    for i in range(120):
        (logs / f"req-{i:04d}.txt").write_text(f"a red cat number {i}\n")
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "PYTHONDONTWRITEBYTECODE": "1"}
    args = [sys.executable, "-m", "audit.cli", "run", str(logs), "--model", str(tiny_model_dir), "--device", "cpu",
            "--batch-size", "8", "--no-progress"]
    low = subprocess.run(args + ["--out", str(tmp_path / "low")], env=env, capture_output=True, text=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96)))
    assert low.returncode == 0, low.stderr
    _, clean = run_audit([logs], tiny_model_dir, tmp_path / "clean", device="cpu", batch_size=8)
    assert clean["counts"]["scored"] == 120
    assert pl.read_parquet(tmp_path / "low" / "risk.parquet").equals(pl.read_parquet(tmp_path / "clean" / "risk.parquet"))
    assert os.path.exists(tmp_path / "low" / "manifest.json")


def test_the_merge_holds_no_more_files_than_the_limit_leaves_room_for(monkeypatch):
    import os
    import resource

    from audit import pipeline

    held = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(resource, "getrlimit", lambda what: (held + 32 + 40, resource.RLIM_INFINITY))
    assert pipeline.merge_max_files() == 40 - (len(os.listdir("/proc/self/fd")) - held)
    monkeypatch.setattr(resource, "getrlimit", lambda what: (16, 16))
    assert pipeline.merge_max_files() == 2
    monkeypatch.setattr(resource, "getrlimit", lambda what: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert pipeline.merge_max_files() == 256
    monkeypatch.setattr(resource, "getrlimit", lambda what: (1 << 20, 1 << 20))
    assert pipeline.merge_max_files() == 256


# ------------------------------------------------------------------ the report of a run that failed its gates

def test_the_report_of_a_run_that_exited_4_says_so(tmp_path, tiny_model_dir, monkeypatch):
    """nightly.sh writes the reports of a run that exited 4 (more than --max-error-fraction of its rows could not
    be scored, or could not be read as prompts) before exiting 4, but report.md, report.html and the report's
    stderr looked like a clean audit's: only a run that scored nothing was warned about. Both gates' reasons are
    now the report's warnings, under the fraction the run used."""
    from helpers import fail_batches_with

    src = tmp_path / "p.txt"
    src.write_text("a red cat\npoison apple\na blue dog\npoison ivy\n")
    fail_batches_with(monkeypatch, "poison")
    res = _cli(["run", src, "--model", tiny_model_dir, "--device", "cpu", "--batch-size", "8", "--out",
                tmp_path / "run"])
    assert res.exit_code == 4, res.output
    monkeypatch.undo()
    rep = _cli(["report", tmp_path / "run", "--format", "md"])
    assert rep.exit_code == 0, rep.output
    why = ("the run failed (exit 4): 2 of 4 rows (50.0%) could not be scored (scoring_error 2), more than "
           "--max-error-fraction 0.01; the first: scoring_error: ValueError: this prompt breaks the model. The outputs "
           f"in {tmp_path / 'run'} hold what was scored")
    assert rep.stderr == f"memaudit: warning: {why}\n"
    from audit.report import md_escape

    assert f"**Warning:** {md_escape(why)}." in (tmp_path / "run" / "report.md").read_text()

    # the coverage gate: a file of 8 rows without the prompt column beside 2 prompts
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "a.csv").write_text("prompt\na red cat\na blue dog\n")
    (logs / "b.csv").write_text("text\n" + "".join(f"row {i}\n" for i in range(8)))
    res = _cli(["run", logs, "--model", tiny_model_dir, "--device", "cpu", "--batch-size", "8", "--out",
                tmp_path / "run2", "--max-error-fraction", "0.5"])
    assert res.exit_code == 4, res.output
    rep = _cli(["report", tmp_path / "run2", "--format", "md"])
    assert rep.exit_code == 0 and rep.stderr == (
        "memaudit: warning: the run failed (exit 4): 8 of 10 rows read (80.0%) could not be read as prompts "
        "(missing_prompt_column 8), more than --max-error-fraction 0.5: the audit covers only part of its input (a "
        "file with another prompt column? --prompt-column; rejects.parquet names each row's file)\n"), rep.output
    # under the run's own fraction, not the default 0.01: a run allowed 90% exited 0, and its report is clean
    res = _cli(["run", logs, "--model", tiny_model_dir, "--device", "cpu", "--batch-size", "8", "--out",
                tmp_path / "run3", "--max-error-fraction", "0.9"])
    assert res.exit_code == 0, res.output
    rep = _cli(["report", tmp_path / "run3", "--format", "md"])
    assert rep.exit_code == 0 and rep.stderr == "" and "**Warning:**" not in (tmp_path / "run3" / "report.md").read_text()


def test_a_model_folder_the_job_may_not_search_is_one_line(tmp_path, tiny_model_dir, monkeypatch):
    """`chmod 700` on a model folder of another user: looking for its model_index.json raised a raw PermissionError
    from ``is_file`` (exit 1); it is a ModelError naming --model."""
    import pathlib

    from audit.errors import ModelError
    from audit.models import detect_family

    index = tiny_model_dir / "model_index.json"
    real_is_file = pathlib.Path.is_file
    monkeypatch.setattr(pathlib.Path, "is_file", lambda self: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(self))) if self == index else real_is_file(self))
    with pytest.raises(ModelError) as err:
        detect_family(tiny_model_dir, "/models/sd")
    assert str(err.value) == "--model /models/sd: cannot be read (Permission denied)"
