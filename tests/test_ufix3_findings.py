"""Session 51, third wave (ufix3): the report/calibrate/diff refusal of a read-only folder names -o / --output, the
ASCII-locale terminal report's tables, a SIGTERM after a run's summary, and the run folder and cache paths in
manifest.json. Each test fails on the code before its fix."""

from __future__ import annotations

import errno
import os

import pytest
from typer.testing import CliRunner

from helpers import prompts_file, run_audit


def _invoke(*args):
    from audit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("ufix3")
    out, _ = run_audit([prompts_file(tmp / "p.txt", 6)], tiny_model_dir, tmp / "run", device="cpu", batch_size=6)
    return out


# ------------------------------------------------------------------ 1. a read-only output folder names -o / --output

@pytest.mark.parametrize("failure", ["read-only file system", "no write permission"])
def test_a_report_calibration_or_diff_that_cannot_be_written_names_the_output_option(finished_run, tmp_path,
                                                                                    monkeypatch, failure):
    """`memaudit report RUN --format md` on a read-only run folder said "make it writable (or write elsewhere)"
    and not how: the run folder is where the report goes by default. It names -o / --output, for a read-only file
    system (EROFS, root's case too) and a folder this user may not write (EACCES); so do calibrate and diff -o."""
    def refuse(*args, **kwargs):  # the rename onto the output (os.replace), as a read-only folder refuses it
        if failure == "no write permission":
            raise PermissionError(errno.EACCES, "Permission denied")
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    for args, written in ((["report", finished_run, "--format", "md"], finished_run / "report.md"),
                          (["report", finished_run, "--format", "html"], finished_run / "report.html"),
                          (["calibrate", finished_run, "-o", tmp_path / "cal.json"], tmp_path / "cal.json"),
                          (["diff", finished_run, finished_run, "-o", tmp_path / "d.md"], tmp_path / "d.md")):
        res = _invoke(*args)
        line = res.stderr.splitlines()[-1]
        if failure == "no write permission":
            expected = (f"memaudit: error: cannot write {written}: no write permission in {written.parent} (make it "
                        "writable, or write elsewhere with -o / --output)")
        else:
            expected = (f"memaudit: error: the file system is read-only writing {written}: make it writable and "
                        "rerun the same command, or write elsewhere with -o / --output")
        assert (res.exit_code, line) == (2, expected), args
        assert not written.exists()


def test_a_run_keeps_its_read_only_advice_without_an_output_option(tmp_path, capsys):
    """`run` resumes in its --out, so writing elsewhere is not its advice: its line is unchanged."""
    import typer

    from audit.cli.common import guarded

    def fails():
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "risk.parquet"))

    with pytest.raises(typer.Exit):
        guarded(fails)
    assert capsys.readouterr().err == (f"memaudit: error: the file system is read-only writing {tmp_path / 'risk.parquet'}"
                                       ": make it writable (or write elsewhere) and rerun the same command; a run "
                                       "resumes from its finished units\n")
