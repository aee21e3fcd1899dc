"""Findings of running memaudit from cron, systemd timers and CI containers, whose environment is not a
developer's shell (FORCE_COLOR set by a CI image, a working folder deleted under a job). Each test fails on the
code before its fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from helpers import prompts_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
       "PYTHONDONTWRITEBYTECODE": "1"}


# ------------------------------------------------------------------ FORCE_COLOR with stderr in a log file

def test_force_color_does_not_draw_the_progress_bar_into_a_log_file(monkeypatch):
    """rich reads FORCE_COLOR (and TTY_COMPATIBLE) as "this file is a terminal", so with stderr in a log file the
    run drew its live bar there (cursor codes, colours, carriage returns) instead of the plain line a minute."""
    from audit.runner import _Progress

    lines = []
    for var, value in (("FORCE_COLOR", "1"), ("TTY_COMPATIBLE", "1")):
        monkeypatch.setenv(var, value)
        with open(os.devnull, "w") as log_file:
            monkeypatch.setattr(sys, "stderr", log_file)
            bar = _Progress(100, None, lines.append, every_s=0.0)
            assert (bar.enabled, bar.bar, bar.lines) == (False, None, lines.append)
            with bar:
                bar.advance(40)
        monkeypatch.delenv(var)
    assert len(lines) == 2  # one plain line for each variable's run
    for line in lines:
        assert line.startswith("memaudit: 40 of 100 rows (40%), ") and line.endswith(" rows/s, about 0s left")


def test_force_color_run_writes_a_readable_log(tmp_path, tiny_model_dir):
    """`FORCE_COLOR=1 memaudit run ... 2>>nightly.log` (a CI image that sets FORCE_COLOR for every job): the log
    got the progress bar's escape codes and carriage returns. It now holds only memaudit's plain lines."""
    src = prompts_file(tmp_path / "p.txt", 6)
    log = tmp_path / "nightly.log"
    with open(log, "w") as err:
        run = subprocess.run([sys.executable, "-m", "audit.cli", "run", str(src), "--model", str(tiny_model_dir),
                              "--device", "cpu", "--batch-size", "2", "--out", str(tmp_path / "run")],
                             env={**ENV, "FORCE_COLOR": "1", "TERM": "xterm-256color"}, stdout=subprocess.PIPE,
                             stderr=err, stdin=subprocess.DEVNULL, text=True)
    assert run.returncode == 0
    text = log.read_text()
    assert "\x1b" not in text and "\r" not in text, repr(text)
    lines = text.splitlines()
    assert all(line.startswith("memaudit: ") for line in lines), lines
    assert lines[-1].startswith("memaudit: 6 rows read, 6 scored, 0 rejected (none), 6 unique prompts")
    assert pl.read_parquet(tmp_path / "run" / "risk.parquet").height == 6


def test_a_real_terminal_still_gets_the_bar_and_tty_interactive_asks_for_it(monkeypatch):
    """The bar stays on a real terminal (a pseudo-terminal here), with or without FORCE_COLOR; on a log file
    TTY_INTERACTIVE=1, rich's own switch for live displays, still asks for it (with FORCE_COLOR to make rich draw)."""
    from audit.runner import _Progress, live_terminal

    primary, secondary = os.openpty()
    try:
        with open(secondary, "w", closefd=False) as tty:
            monkeypatch.setattr(sys, "stderr", tty)
            assert _Progress(10, None, print).bar is not None
            monkeypatch.setenv("FORCE_COLOR", "1")
            assert _Progress(10, None, print).bar is not None
    finally:
        os.close(primary)
        os.close(secondary)
    with open(os.devnull, "w") as log_file:
        monkeypatch.setattr(sys, "stderr", log_file)
        assert _Progress(10, None, print).bar is None
        monkeypatch.setenv("TTY_INTERACTIVE", "1")
        assert _Progress(10, None, print).bar is not None
        from rich.console import Console

        monkeypatch.delenv("FORCE_COLOR")
        assert live_terminal(Console(file=log_file)) is False  # nothing says the file is a terminal


# ------------------------------------------------------------------ a working folder deleted under the job

def test_a_deleted_working_folder_is_one_clear_line(tmp_path, tiny_model_dir):
    """A cron line `cd /srv/app/current && memaudit run /abs/logs --out /abs/runs/...` after a deploy removed that
    folder: torch's import printed "Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so." (no line end,
    exit 2), or with the config's relative paths "memaudit: error: [Errno 2] No such file or directory", naming
    no file, while `--dry-run` called the run fine. Both now say that the working folder is gone (exit 2)."""
    src = prompts_file(tmp_path / "p.txt", 3)
    gone = tmp_path / "gone"
    gone.mkdir()
    expected = ("memaudit: error: the working folder cannot be read (No such file or directory: deleted or moved "
                "away since the job started in it); start memaudit from an existing folder (cron: `cd /srv/audits "
                "&& ...`)\n")
    for extra in ([], ["--dry-run"]):
        proc = subprocess.run([sys.executable, "-m", "audit.cli", "run", str(src), "--model", str(tiny_model_dir),
                               "--device", "cpu", "--out", str(tmp_path / "run"), *extra], env=ENV, cwd=gone,
                              preexec_fn=lambda: os.rmdir(gone), capture_output=True, text=True)
        assert (proc.returncode, proc.stderr, proc.stdout) == (2, expected, "")
        gone.mkdir()
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ a report or calibration into a read-only folder

def test_a_read_only_output_folder_names_the_file_and_no_run_advice(tmp_path, capsys):
    """`memaudit report RUN --format md -o rel.md` from a read-only working folder (a cron job's) said "the file
    system is read-only writing .rel.md.7bf848ea.tmp: ... and rerun the same command; a run resumes from its
    finished units": a temporary name the user never gave, and a run's advice for a report. It names rel.md and
    says only to rerun; `run` keeps its resume advice."""
    import errno

    import typer

    from audit.cli.common import guarded

    def fails(name):
        def write():
            raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / name))
        return write

    for name, resumable, tail in ((".rel.md.7bf848ea.tmp", False, ""),
                                  (".risk.parquet.0123abcd.tmp", True, "; a run resumes from its finished units"),
                                  ("plain.json", False, "")):
        with pytest.raises(typer.Exit) as exit_:
            guarded(fails(name), resumable=resumable)
        shown = {".rel.md.7bf848ea.tmp": "rel.md", ".risk.parquet.0123abcd.tmp": "risk.parquet"}.get(name, name)
        assert exit_.value.exit_code == 2
        assert capsys.readouterr().err == (f"memaudit: error: the file system is read-only writing {tmp_path / shown}: "
                                           f"make it writable (or write elsewhere) and rerun the same command{tail}\n")


# ------------------------------------------------------------------ a home folder that does not exist

def test_an_html_report_does_not_create_a_missing_home_folder(tmp_path, tiny_model_dir):
    """A service user's `HOME=/nonexistent` (or a container's home that was never made): `memaudit report RUN
    --format html` made that folder, with .cache/matplotlib/fontlist-*.json and .config/matplotlib/ in it,
    wherever the user may create it (root). The page is written and the home folder stays absent."""
    from helpers import run_audit

    run, _ = run_audit([prompts_file(tmp_path / "p.txt", 4)], tiny_model_dir, tmp_path / "run", device="cpu",
                       batch_size=4)
    home, tmp = tmp_path / "nonexistent", tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "audit.cli", "report", str(run), "--format", "html"],
                          env={**ENV, "HOME": str(home), "TMPDIR": str(tmp)}, capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{run / 'report.html'}\n", "")
    assert "<img" in (run / "report.html").read_text()
    assert not home.exists() and list(tmp.iterdir()) == []  # matplotlib's temporary folder removed at exit
    home.mkdir()  # a home that exists keeps matplotlib's font cache, as before (no temporary folder each night)
    again = subprocess.run([sys.executable, "-m", "audit.cli", "report", str(run), "--format", "html"],
                           env={**ENV, "HOME": str(home)}, capture_output=True, text=True)
    assert (again.returncode, again.stderr) == (0, "")
    from matplotlib import font_manager

    fontlist = f"fontlist-v{font_manager.FontManager.__version__}.json"
    assert [p.name for p in (home / ".cache" / "matplotlib").iterdir()] == [fontlist]


# ------------------------------------------------------------------ a relative input from cron's working folder

def test_a_missing_relative_input_names_the_working_folder(tmp_path):
    """Cron starts a job in the home folder: `memaudit run --config /srv/audits/nightly.toml` without the `cd`
    said only "prompt-logs/: no such file or folder", not where it was looked for (a config's relative paths are
    relative to the working folder, not to the config). The line now names the working folder; an absolute path
    or a URL is shown as before."""
    audits, home = tmp_path / "audits", tmp_path / "home"
    (audits / "prompt-logs").mkdir(parents=True)
    home.mkdir()
    (audits / "prompt-logs" / "a.txt").write_text("a red cat\n")
    config = audits / "nightly.toml"
    config.write_text('inputs = ["prompt-logs/"]\nout = "runs/{date}"\n')
    proc = subprocess.run([sys.executable, "-m", "audit.cli", "run", "--config", str(config), "--dry-run"], env=ENV,
                          cwd=home, capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (
        2, f"memaudit: error: prompt-logs/: no such file or folder (relative to the working folder {home})\n")
    from audit.sources import SourceError, discover

    for absolute in (str(home / "gone.parquet"), f"file://{home}/gone.parquet"):
        with pytest.raises(SourceError) as err:
            discover([absolute])
        assert str(err.value) == f"{absolute}: no such file or folder"
    ok = subprocess.run([sys.executable, "-m", "audit.cli", "run", "--config", str(config), "--dry-run"], env=ENV,
                        cwd=audits, capture_output=True, text=True)
    assert ok.returncode == 0 and "inputs: 1 file (txt 1): 1 row in 1 unit of work" in ok.stdout, ok.stdout


# ------------------------------------------------------------------ a run folder whose name is not UTF-8

def test_a_run_folder_whose_name_is_not_utf8_is_refused_in_one_line(tmp_path, tiny_model_dir):
    """A run folder under a Latin-1 named folder (a copy from an older system; `--out` itself refuses such names):
    `memaudit report`, `diff` and `calibrate` of it exited 1, the code for a bug, with "UnicodeEncodeError: 'utf-8'
    codec can't encode character '\\udcff' ... surrogates not allowed". They now refuse it (exit 2) naming it."""
    import shutil

    from audit.calibrate import calibrate
    from audit.diff import diff_runs
    from audit.errors import CalibrationError, ReportError
    from audit.report import build_report
    from helpers import run_audit

    good, _ = run_audit([prompts_file(tmp_path / "p.txt", 4)], tiny_model_dir, tmp_path / "good", device="cpu",
                        batch_size=4)
    bad = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/nuit-\xe9t\xe9"))
    shutil.copytree(good, bad)
    line = (f"{tmp_path}/nuit-\\xe9t\\xe9: its name is not UTF-8 text, and the tables' reader opens only UTF-8 "
            "paths: rename it (or the folder above it that is not), e.g. convmv -f latin1 -t utf8 --notest")
    proc = subprocess.run([sys.executable, "-m", "audit.cli", "report", bad, "--format", "md"], env=ENV,
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"memaudit: error: {line}\n")
    for call, error in ((lambda: build_report(bad), ReportError), (lambda: calibrate(bad), CalibrationError),
                        (lambda: diff_runs(good, bad), ReportError), (lambda: diff_runs(bad, good), ReportError)):
        with pytest.raises(error) as err:
            call()
        assert str(err.value) == line
    assert build_report(good).counts["scored"] == 4  # the same tables under a UTF-8 name read as before


def test_a_cache_folder_whose_name_is_not_utf8_is_refused_before_the_run(tmp_path, tiny_model_dir):
    """`--cache /srv/caché` made under a Latin-1 locale: the dry run called the night fine, then every unit failed
    3 times (scored 3 times over) with "UnicodeEncodeError: ... surrogates not allowed" and the run exited 2 telling
    the user to rerun the same command, which fails the same way. It is refused before the run, as such an --out
    is, and the dry run says so too."""
    src = prompts_file(tmp_path / "p.txt", 3)
    cache = os.fsdecode(os.fsencode(str(tmp_path)) + b"/cach\xe9")
    line = f"memaudit: error: --cache {tmp_path}/cach\\xe9: its name is not UTF-8 text; choose another --cache\n"
    for extra in (["--dry-run"], []):
        proc = subprocess.run([sys.executable, "-m", "audit.cli", "run", str(src), "--model", str(tiny_model_dir),
                               "--device", "cpu", "--cache", cache, "--out", str(tmp_path / "run"), *extra],
                              env=ENV, capture_output=True, text=True)
        assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", line)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]  # no run folder, no cache folder


def test_a_model_folder_whose_path_is_not_utf8_is_named_as_such(tmp_path, tiny_model_dir):
    """A model copied under a Latin-1 named folder: the run stopped with "text_encoder/model.safetensors is not a
    readable safetensors file (SafetensorError: Path .../m\\udcff/... is not valid UTF-8): a damaged or partial
    download", sending the user to download it again. The line now says the path is the problem."""
    import shutil

    from audit.models import ModelError
    from audit.models.base import resolve_model_dir

    model = os.fsdecode(os.fsencode(str(tmp_path)) + b"/mod\xe8le")
    shutil.copytree(tiny_model_dir, model)
    src = prompts_file(tmp_path / "p.txt", 3)
    proc = subprocess.run([sys.executable, "-m", "audit.cli", "run", str(src), "--model", model, "--device", "cpu",
                           "--out", str(tmp_path / "run")], env=ENV, capture_output=True, text=True)
    line = (f"--model {tmp_path}/mod\\xe8le: its path is not UTF-8 text, and safetensors opens only UTF-8 paths: "
            "rename it")
    assert (proc.returncode, proc.stderr) == (2, f"memaudit: error: {line}\n")
    os.symlink(model, tmp_path / "link")  # a UTF-8 name whose target is not: the target's path is shown
    with pytest.raises(ModelError) as err:
        resolve_model_dir(str(tmp_path / "link"))
    assert str(err.value) == (f"--model {tmp_path}/link: its path ({tmp_path}/mod\\xe8le) is not UTF-8 text, and "
                              "safetensors opens only UTF-8 paths: rename it")
    assert resolve_model_dir(str(tiny_model_dir)) == (str(tiny_model_dir), Path(tiny_model_dir).resolve())


# ------------------------------------------------------------------ nightly.sh where /tmp and the working folder are read-only

def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def test_nightly_sh_runs_where_tmp_and_the_working_folder_are_read_only(tmp_path):
    """A container with a read-only root file system and no /tmp volume, started in a read-only folder:
    nightly.sh stopped before running anything, exit 2, with only "mktemp: failed to create file via template
    './tmp.XXXXXXXXXX': Read-only file system" in the log. It now keeps memaudit run's output in RUNS (where the
    nights are written), removes it after, and where no folder can hold it says so in one line. (mktemp is a stub
    failing as on a read-only file system; root writes in any folder; memaudit a stub printing the run folder.)"""
    bin_, runs = tmp_path / "bin", tmp_path / "runs"
    bin_.mkdir()
    _stub(bin_ / "mktemp", f'case "$*" in *"{runs}"*) [ -n "$WRITABLE_RUNS" ] && exec /usr/bin/mktemp "$@";; esac\n'
                           "echo \"mktemp: failed to create file via template './tmp.XXXXXXXXXX': Read-only file "
                           "system\" >&2\nexit 1\n")
    _stub(tmp_path / "memaudit", f'echo "$*" >> {tmp_path}/calls\n[ "$1" = run ] && echo {runs}/night1\nexit 0\n')
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "MEMAUDIT": str(tmp_path / "memaudit"), "RUNS": str(runs),
           "CONFIG": "nightly.toml", "WRITABLE_RUNS": "1"}
    script = str(ROOT / "pipelines" / "nightly.sh")
    proc = subprocess.run(["bash", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (0, f"{runs}/night1\n"), proc.stderr
    assert "mktemp" not in proc.stderr
    assert (tmp_path / "calls").read_text().splitlines()[0] == "run --config nightly.toml"
    assert list(runs.iterdir()) == []  # the temporary file is gone
    (tmp_path / "calls").unlink()
    runs.rmdir()
    proc = subprocess.run(["bash", script], env={**env, "WRITABLE_RUNS": ""}, cwd=tmp_path, capture_output=True,
                          text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2, "", "memaudit: error: nightly.sh found no folder to hold a temporary file for memaudit run's output: "
               f"neither $TMPDIR (or /tmp), the working folder nor RUNS ({runs}) can be written; set TMPDIR to a "
               "writable folder\n")
    assert not (tmp_path / "calls").exists()  # memaudit was not started


def test_no_usable_temporary_folder_says_to_set_tmpdir(capsys):
    """A container with a read-only root file system and no /tmp volume: torch's import (through diffusers) asks
    tempfile for its compile cache folder, and `memaudit run` stopped with "[Errno 2] No usable temporary directory
    found in ['/tmp', '/var/tmp', '/usr/tmp', '/app']", no remedy. The line now says to set TMPDIR; any other
    missing file keeps its own line."""
    import errno

    import typer

    from audit.cli.common import guarded

    def raises(exc):
        def go():
            raise exc
        return go

    for exc, line in (
            (FileNotFoundError(errno.ENOENT, "No usable temporary directory found in ['/tmp', '/app']"),
             "No usable temporary directory found in ['/tmp', '/app']: no folder for temporary files can be written, "
             "and torch needs one to load; set TMPDIR to a writable folder (a container with a read-only root file "
             "system: mount a volume at /tmp)"),
            (FileNotFoundError(errno.ENOENT, "No such file or directory", "/srv/x.json"),
             "[Errno 2] No such file or directory: '/srv/x.json'")):
        with pytest.raises(typer.Exit) as exit_:
            guarded(raises(exc))
        assert (exit_.value.exit_code, capsys.readouterr().err) == (2, f"memaudit: error: {line}\n")
