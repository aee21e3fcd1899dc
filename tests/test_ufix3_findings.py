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
    written = tmp_path / "risk.parquet"
    assert capsys.readouterr().err == (f"memaudit: error: the file system is read-only writing {written}: make it "
                                       "writable (or write elsewhere) and rerun the same command; a run resumes from "
                                       "its finished units\n")


# ------------------------------------------------------------------ 2. tables under an ASCII locale

def _ascii_console(width: int):
    """A rich console writing to an ASCII stream that escapes what ASCII lacks, as the command's stdout does under
    LC_ALL=C PYTHONUTF8=0 (audit.cli._encodable_output)."""
    import io

    from rich.console import Console

    buffer = io.BytesIO()
    stream = io.TextIOWrapper(buffer, encoding="ascii", errors="backslashreplace", newline="\n")
    return Console(file=stream, width=width, color_system=None), stream, buffer


def _tables(lines: list[str]) -> list[list[str]]:
    """The runs of consecutive table lines (an ASCII box's borders and rows: starting with + or |)."""
    groups, current = [], []
    for line in lines:
        if line[:1] in ("+", "|"):
            current.append(line)
        elif current:
            groups.append(current)
            current = []
    return groups + ([current] if current else [])


@pytest.mark.parametrize("width", [80, 120])
def test_the_terminal_report_and_diff_under_an_ascii_locale_keep_their_tables_aligned(tmp_path, tiny_model_dir,
                                                                                     width):
    """Under LC_ALL=C PYTHONUTF8=0 the stream wrote a Japanese prompt as \\u6771... after rich had sized its
    table with the characters: that row's borders were pushed right, past the terminal's width. The escapes are
    made before rich sizes the columns: every line of a table is as wide as its borders, within the width."""
    from audit.diff import diff_runs, render_terminal as render_diff
    from audit.report import build_report, render_terminal

    (tmp_path / "東京.txt").write_text("東京の夜景 tower at night\nカフェ latte art café\nplain prompt here\n",
                                      encoding="utf-8")
    (tmp_path / "b.txt").write_text("nouveau café 東 ok\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("an old prompt gone since\n", encoding="utf-8")  # a gone prompt: a second table
    # (the diff prints no table of headers only: a table is drawn for the new and for the gone prompts)
    old, _ = run_audit([tmp_path / "東京.txt", tmp_path / "c.txt"], tiny_model_dir, tmp_path / "old", device="cpu")
    new, _ = run_audit([tmp_path / "東京.txt", tmp_path / "b.txt"], tiny_model_dir, tmp_path / "new", device="cpu")
    for render in (lambda c: render_terminal(build_report(new), console=c),
                   lambda c: render_diff(diff_runs(old, new), console=c)):
        console, stream, buffer = _ascii_console(width)
        render(console)
        stream.flush()
        text = buffer.getvalue().decode("ascii")
        assert "\\u6771" in text and "caf\\xe9" in text  # the escapes are there, as before
        tables = _tables(text.splitlines())
        assert len(tables) >= 2
        for table in tables:
            assert {len(line) for line in table} == {len(table[0])}, "\n".join(table)
            assert len(table[0]) <= width


# ------------------------------------------------------------------ 3. a SIGTERM once the run's outputs are complete

@pytest.mark.parametrize("gated", [False, True])
def test_a_sigterm_while_the_summary_is_printed_says_the_outputs_are_complete(tmp_path, tiny_model_dir,
                                                                             monkeypatch, gated):
    """A scheduler's SIGTERM after the run wrote every output, while it printed its summary, said "terminated
    (SIGTERM); rerun with --out RUN to resume" (nothing to resume). It now says the outputs are complete, exit 143;
    a gate's exit code stands, as for a log on a full disk."""
    import audit.cli
    from audit.faults import Terminated

    src = prompts_file(tmp_path / "p.txt", 12)
    run_audit([src], tiny_model_dir, tmp_path / "ref", device="cpu", batch_size=8)
    assert _invoke("calibrate", tmp_path / "ref", "--fpr", "0.5", "-o", tmp_path / "cal.json").exit_code == 0

    def echo_path(path):
        raise Terminated()

    monkeypatch.setattr(audit.cli, "echo_path", echo_path)
    args = ["run", src, "--model", tiny_model_dir, "--out", tmp_path / "run", "--device", "cpu", "--no-progress"]
    res = _invoke(*args, *(["--calibration", tmp_path / "cal.json", "--fail-on-flagged", "0"] if gated else []))
    assert (tmp_path / "run" / "manifest.json").is_file()
    last = res.output.splitlines()[-1]
    if gated:
        assert res.exit_code == 3, res.output
        assert last.startswith("memaudit: error: 6 rows flagged (risk > ") and last.endswith(
            "more than --fail-on-flagged 0; outputs are complete in the run folder")
    else:
        assert (res.exit_code, last) == (143, "memaudit: error: terminated (SIGTERM) after the run finished: its "
                                              f"outputs are complete in {tmp_path / 'run'}")


@pytest.mark.parametrize("when", ["after the command", "at exit"])
def test_a_sigterm_after_the_command_finished_keeps_its_exit_code(finished_run, when):
    """A SIGTERM once the command had finished (its lines printed) ended a finished run with exit 143 and no line
    (the interpreter's exit had put back the default action), or a Terminated that nothing caught. The command's
    exit code now stands and nothing more is printed."""
    import subprocess
    import sys

    kill = "os.kill(os.getpid(), signal.SIGTERM)"
    script = ("import atexit, os, signal, sys\n"
              "import audit.cli as cli\n"
              "real_exit = sys.exit\n"
              + (f"def leave(code):\n    {kill}\n    real_exit(code)\n"  # as main's sys.exit(code) begins
                 "sys.exit = leave\n" if when == "after the command" else
                 f"atexit.register(lambda: {kill})\n")
              + f"sys.argv = ['memaudit', 'report', {str(finished_run)!r}, '--format', 'md', '-o', '-']\n"
              "cli.main()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith("# memaudit report")


# ------------------------------------------------------------------ 4. manifest.json's paths, absolute

def test_the_manifest_records_the_run_folder_cache_and_calibration_absolute(tmp_path, tiny_model_dir, monkeypatch):
    """`memaudit run p.txt --out r32a --cache cache` recorded run_config.out "r32a" and cache.dir "cache": read from
    another folder, the manifest could not locate them. run_config keeps them as typed and run_config_paths holds
    them absolute. A folder whose manifest predates it (no run_config_paths) still resumes, from another working
    folder too, and the rerun's manifest gains it."""
    import json

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    prompts_file(work / "p.txt", 5)
    run_audit(["p.txt"], tiny_model_dir, "r32a", cache="cache", device="cpu")
    assert _invoke("calibrate", "r32a", "--fpr", "0.5", "-o", "cal.json").exit_code == 0
    _, manifest = run_audit(["p.txt"], tiny_model_dir, "r32a", cache="cache", calibration="cal.json", device="cpu")
    on_disk = json.loads((work / "r32a" / "manifest.json").read_text())
    assert on_disk == manifest
    assert (manifest["run_config"]["out"], manifest["run_config"]["cache"], manifest["cache"]["dir"],
            manifest["run_config"]["calibration"]) == ("r32a", "cache", "cache", "cal.json")
    assert manifest["run_config_paths"] == {"out": str(work / "r32a"), "cache": str(work / "cache"),
                                            "calibration": str(work / "cal.json")}

    # an old folder: its manifest without the section, its paths relative
    del on_disk["run_config_paths"]
    (work / "r32a" / "manifest.json").write_text(json.dumps(on_disk))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _, again = run_audit([str(work / "p.txt")], tiny_model_dir, str(work / "r32a"), device="cpu")
    assert again["rows_this_run"] == 0 and again["counts"]["scored"] == 5  # resumed: every unit was done
    assert again["run_config_paths"] == {"out": str(work / "r32a"), "cache": None, "calibration": None}
