"""What a mutation review of the command line's wiring (audit/cli/__init__.py, audit/cli/common.py,
audit/cli/report.py) and of the Python API (audit/api.py) found unpinned: the defaults and flag values that reach
the run's configuration, the summary and warning lines, each exit code the README and ``memaudit run --help``
promise (0, 1, 2, 3, 4, 130, 143), the one-line error of each known exception, ``--debug`` anywhere before ``--``,
the options report, calibrate and diff pass on and their ``--output`` checks, and audit.run's and audit.score's
defaults and errors. Most tests replace the engine (``audit.runner.execute``) with a stub returning a manifest
written here, so the lines and exit codes are checked against counts set by hand, with no model loaded."""

from __future__ import annotations

import errno
import json
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

import audit.runner as runner
from audit.cli import app
from audit.config import RunConfig


def _manifest(rows_read: int = 2, scored: int = 2, reasons: dict | None = None, **extra) -> dict:
    """A finished run's manifest: ``rows_read`` rows, ``scored`` of them scored, the rest rejected as ``reasons``."""
    reasons = reasons if reasons is not None else ({} if rows_read == scored else {"empty_prompt": rows_read - scored})
    counts = {"rows_read": rows_read, "scored": scored, "rejected": rows_read - scored,
              "rejected_by_reason": reasons, "unique_prompts": scored}
    counts.update(extra.pop("counts", {}))
    return {"counts": counts, "wall_time_s": 2.0, "throughput_rows_per_s": 1.0,
            "model": {"name": "m", "fingerprint": "f00d"}, "files": [{"format": "txt", "rows": rows_read}], **extra}


@pytest.fixture
def stub(tmp_path, monkeypatch):
    """``memaudit run`` with the engine replaced: ``stub.manifest`` is what the run returns (or ``stub.raises``, an
    exception it raises); ``stub.seen`` records each call's config and progress; ``stub.run(*flags)`` invokes the
    command on one prompt file."""
    src = tmp_path / "p.txt"
    src.write_text("a photo\n")

    class Stub:
        manifest = _manifest()
        raises = None
        seen: list = []

        def run(self, *flags, out=None):
            out = str(out or tmp_path / "out")
            return CliRunner().invoke(app, ["run", str(src), "--out", out, *map(str, flags)])

    s = Stub()
    s.src, s.seen = src, []

    def execute(cfg, progress=None):
        s.seen.append((cfg, progress))
        if s.raises is not None:
            raise s.raises
        return Path(cfg.out), s.manifest

    monkeypatch.setattr(runner, "execute", execute)
    return s


# ---------------------------------------------------------------- what reaches the run's configuration


def test_run_without_flags_gets_the_documented_defaults(stub, tmp_path):
    """Each default as `memaudit run --help` and the README give it (not read from RunConfig): the lab model, Ren
    et al.'s scorer at 50 steps, seed 0, one noise draw, mt19937, 20,000-row units, a 900 s stall timeout, 1% of
    rows allowed to fail; the progress bar left to the terminal (None)."""
    res = stub.run()
    assert res.exit_code == 0, res.output
    cfg, progress = stub.seen[-1]
    assert cfg == RunConfig(
        inputs=(str(stub.src),), model=None, out=str(tmp_path / "out"), prompt_column="prompt", id_column=None,
        batch_size="auto", device="auto", dtype="auto", layers=None, noise_draws=1, steps=50, seed=0,
        noise_generator="mt19937", limit=None, scorer="attention_entropy", unit_rows=20_000, keep_columns=(),
        skip_bad_files=False, engine="local", workers=None, address=None, stall_timeout=900.0, calibration=None,
        fail_on_flagged=None, cache=None, compile=False, confirm=None, confirm_top=None, max_error_fraction=0.01,
        prepare_threads="auto")
    assert progress is None


def test_flag_values_reach_the_configuration(stub):
    """Lists from repeated and comma-separated flags (a quoted name keeps its comma), integers for --batch-size and
    --prepare-threads, --stall-timeout 0 as None (never), and the other flags as given."""
    res = stub.run("--layers", "a.attn2, b.attn2", "--layers", "c.attn2", "--keep-columns", 'id,"a,b"',
                   "--keep-columns", "c", "--batch-size", "16", "--prepare-threads", "2", "--stall-timeout", "0",
                   "--workers", "3", "--confirm", "noise_magnitude", "--confirm-top", "5%", "--no-progress")
    assert res.exit_code == 0, res.output
    cfg, progress = stub.seen[-1]
    assert cfg.layers == ("a.attn2", "b.attn2", "c.attn2") and cfg.keep_columns == ("id", "a,b", "c")
    assert (cfg.batch_size, cfg.prepare_threads, cfg.stall_timeout, cfg.workers) == (16, 2, None, 3)
    assert (cfg.confirm, cfg.confirm_top, progress) == ("noise_magnitude", "5%", False)


@pytest.mark.parametrize("flags, line", [
    (["--batch-size", "x"], "memaudit: error: --batch-size x: give an integer or auto"),
    (["--prepare-threads", "two"], "memaudit: error: --prepare-threads two: give an integer or auto"),
    (["--keep-columns", '"a,b'], 'memaudit: error: --keep-columns "a,b: unexpected end of data, reading it as'),
    (["--layers", 'x,"y'], 'memaudit: error: --layers x,"y: unexpected end of data, reading it as'),
])
def test_values_that_cannot_be_read_are_one_line_with_exit_2(stub, flags, line):
    res = stub.run(*flags)
    assert res.exit_code == 2 and res.stderr.startswith(line), res.output
    assert len(res.stderr.splitlines()) == 1 and stub.seen == []


# ---------------------------------------------------------------- the lines a run prints


def test_summary_of_a_run_that_read_no_row_ends_with_the_wall_time(stub):
    """Nothing read: the summary ends with the time alone (nothing was resumed either), then the warning."""
    stub.manifest = _manifest(0, 0, rows_this_run=0)
    res = stub.run()
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == [
        "memaudit: 0 rows read, 0 scored, 0 rejected (none), 0 unique prompts; model m [f00d]; 2.0 s",
        "memaudit: warning: the inputs hold no rows; nothing was scored"]


def test_a_manifest_without_rows_this_run_counts_every_row_as_read_now(stub):
    """A manifest without ``rows_this_run`` (every row read in this invocation): rows/s, no resumed note."""
    stub.manifest = _manifest(4, 4)
    res = stub.run()
    assert res.exit_code == 0, res.output
    assert res.stderr == ("memaudit: 4 rows read, 4 scored, 0 rejected (none), 4 unique prompts; model m [f00d]; "
                          "1.0 rows/s in 2.0 s\n")


def test_warning_lines_duplicate_ids_unreadable_rows_truncated_flagged_and_cache(stub, tmp_path):
    """Each optional line, worded as the run's counts give it; the run folder alone on stdout."""
    stub.manifest = _manifest(7, 6, {"unreadable_rows": 1},
                              counts={"duplicate_ids": 2, "truncated": 3, "flagged": 1},
                              calibration={"threshold": 0.123456789}, cache={"hits": 5, "scored": 1})
    res = stub.run()
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines()[1:] == [
        "memaudit: warning: 2 scored rows share their --id-column value with another row",
        "memaudit: warning: 1 row could not be read (unreadable_rows: a damaged part of an input file); "
        "rejects.parquet names each one's file, row and error",
        "memaudit: 3 scored rows longer than the text encoder's maximum, scored on the first tokens (the truncated "
        "column)",
        "memaudit: 1 row flagged (risk > 0.123456789)",
        "memaudit: cache 5 rows hit, 1 row scored by the model"]
    assert res.stdout == f"{tmp_path / 'out'}\n"


def test_zero_flagged_rows_are_said_and_an_uncalibrated_run_says_nothing_of_flags(stub, tmp_path):
    stub.manifest = _manifest(counts={"flagged": 0}, calibration={"threshold": 2.5})
    res = stub.run()
    assert res.exit_code == 0 and "memaudit: 0 rows flagged (risk > 2.5)\n" in res.stderr, res.output
    stub.manifest = _manifest()
    res = stub.run()
    assert res.exit_code == 0 and "flagged" not in res.stderr, res.output


def test_the_run_folder_on_stdout_is_the_path_as_given_when_stdout_is_not_a_terminal(stub, tmp_path):
    """A script reads the folder back (OUT=$(memaudit run ...)): a tab in --out is printed as it is."""
    out = tmp_path / "runs\tnightly"
    res = stub.run(out=out)
    assert res.exit_code == 0 and res.stdout == f"{out}\n", res.output


# ---------------------------------------------------------------- exit codes (README "Exit codes", run --help)


def test_exit_4_after_writing_when_nothing_was_scored_and_no_empty_inputs_warning_beside_it(stub, tmp_path):
    """Rows read, none scored: the run folder on stdout, then the error, exit 4. Every input skipped as unreadable
    (nothing read): exit 4 with its own error, and no "the inputs hold no rows" warning contradicting it."""
    stub.manifest = _manifest(2, 0)
    res = stub.run()
    assert res.exit_code == 4 and res.stdout == f"{tmp_path / 'out'}\n", res.output
    assert res.stderr.endswith("memaudit: error: nothing was scored: all 2 rows read were rejected (empty_prompt 2); "
                               "rejects.parquet says why for each\n")
    stub.manifest = _manifest(0, 0, skipped_files=[{"path": "a.parquet", "reason": "not Parquet", "unreadable": True}])
    res = stub.run()
    assert res.exit_code == 4 and "every input file with rows was skipped as unreadable" in res.stderr, res.output
    assert "the inputs hold no rows" not in res.stderr


def test_exit_3_for_flagged_rows_and_4_first_when_rows_also_failed(stub, tmp_path):
    """--fail-on-flagged N: 3 flagged rows > 2 exits 3; when rows also failed to score (1 of 4 > 1%), the scoring
    failure is the one said, exit 4."""
    (tmp_path / "cal.json").write_text("{}")
    flags = ("--calibration", tmp_path / "cal.json", "--fail-on-flagged", "2")
    stub.manifest = _manifest(4, 4, counts={"flagged": 3}, calibration={"threshold": 0.5})
    res = stub.run(*flags)
    assert res.exit_code == 3, res.output
    assert res.stderr.endswith("memaudit: error: 3 rows flagged (risk > 0.5), more than --fail-on-flagged 2; outputs "
                               "are complete in the run folder\n")
    stub.manifest = _manifest(4, 3, {"scoring_error": 1}, counts={"flagged": 3}, calibration={"threshold": 0.5})
    res = stub.run(*flags)
    assert res.exit_code == 4 and "1 of 4 rows (25.0%) could not be scored (scoring_error 1)" in res.stderr
    assert "more than --fail-on-flagged" not in res.stderr


@pytest.mark.parametrize("raised, code, line", [
    (KeyboardInterrupt(), 130, "memaudit: error: interrupted; rerun the same command with the same --out to resume"),
    ("terminated", 143, "memaudit: error: terminated (SIGTERM); rerun the same command with the same --out to resume"),
    ("hung up", 129, "memaudit: error: terminated (SIGHUP); rerun the same command with the same --out to resume"),
    (ValueError("boom"), 1, "memaudit: error: ValueError: boom (run with --debug for the traceback)"),
    (KeyError("layer x: the layers are a, b"), 2, "memaudit: error: layer x: the layers are a, b"),
    ("quoted", 2, "memaudit: error: a message in quotes"),
    (OSError(errno.ENOSPC, "write failed", "/runs/r/risk.parquet"), 2,  # by its errno
     "memaudit: error: no space left on the device writing /runs/r/risk.parquet: free some and rerun the same "
     "command; a run resumes from its finished units"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 2,
     "memaudit: error: the disk quota is exceeded: free some and rerun the same command; a run resumes from its "
     "finished units"),
    (OSError("Detail: [errno 30] Read-only file system"), 2,  # pyarrow's words for EROFS
     "memaudit: error: the file system is read-only: make it writable (or write elsewhere) and rerun the same "
     "command; a run resumes from its finished units"),
    (OSError("IOError: No space left on device"), 2,  # pyarrow's: no errno
     "memaudit: error: no space left on the device: free some and rerun the same command; a run resumes from its "
     "finished units"),
])
def test_each_exception_is_one_line_with_its_exit_code(stub, monkeypatch, raised, code, line):
    """130 interrupted, 143 terminated, 2 a known error (a KeyError's message without its quotes, a RunError's
    without surrounding double quotes, a full disk or quota), 1 anything else."""
    from audit import faults
    from audit.errors import RunError

    monkeypatch.setitem(faults.RUN_FOLDER, "path", None)
    stub.raises = {"terminated": faults.Terminated(), "hung up": faults.Terminated(signal.SIGHUP), "quoted": RunError('"a message in quotes"')}.get(raised, raised)
    res = stub.run()
    assert res.exit_code == code and res.stderr == line + "\n", res.output


def test_an_interrupted_run_names_its_folder(stub, monkeypatch):
    from audit import faults

    monkeypatch.setitem(faults.RUN_FOLDER, "path", "runs/2026-01-01")
    stub.raises = KeyboardInterrupt()
    res = stub.run()
    assert res.exit_code == 130 and res.stderr == ("memaudit: error: interrupted; rerun with --out runs/2026-01-01 to "
                                                   "resume\n"), res.output


def test_an_error_whose_text_spans_lines_is_said_in_one_line(stub):
    """The hub client's error has a second line ('An error happened while trying to locate the files on the Hub...'),
    which came out as a second line of memaudit's error: line breaks and the spaces around them are one space."""
    from audit.errors import ModelError

    stub.raises = ModelError("--model a/b: cannot fetch from the hub (LocalEntryNotFoundError: Got: ConnectError  \n"
                             "  An error happened.\r\nPlease check your internet connection.)\n")
    res = stub.run()
    assert res.exit_code == 2 and res.stderr == ("memaudit: error: --model a/b: cannot fetch from the hub "
                                                 "(LocalEntryNotFoundError: Got: ConnectError An error happened. "
                                                 "Please check your internet connection.)\n"), res.output


def test_a_bad_parameter_found_late_is_a_usage_error_exit_2(stub):
    """typer.BadParameter raised by a command is click's usage error (its box, exit 2), not "unexpected" (1)."""
    import typer

    stub.raises = typer.BadParameter("no good")
    res = stub.run()
    assert res.exit_code == 2 and "Invalid value: no good" in res.output and "unexpected" not in res.output


# ---------------------------------------------------------------- the console script: --debug anywhere before --


def _main(monkeypatch, *args):
    import sys

    from audit import cli

    monkeypatch.setattr(sys, "argv", ["memaudit", *args])
    monkeypatch.setitem(cli._STATE, "debug", False)
    with pytest.raises(SystemExit) as info:
        cli.main()
    return info.value.code


def test_debug_right_after_the_command_name_and_not_after_double_dash(tmp_path, monkeypatch, capsys):
    """`memaudit run --debug X`: the traceback, then the line, exit 2. After `--` it is an input named --debug."""
    monkeypatch.chdir(tmp_path)
    for var in ("MEMAUDIT_RAY_LOGS", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        monkeypatch.delenv(var, raising=False)
    assert _main(monkeypatch, "run", "--debug", "nope.txt") == 2
    err = capsys.readouterr().err
    import os

    assert "Traceback (most recent call last)" in err and err.endswith("memaudit: error: nope.txt: no such file or "
                                                                        f"folder (relative to the working folder "
                                                                        f"{os.getcwd()})\n")
    assert os.environ.get("MEMAUDIT_RAY_LOGS") == "1"  # the Ray actors' output is forwarded with --debug
    monkeypatch.delenv("MEMAUDIT_RAY_LOGS")
    assert _main(monkeypatch, "run", "--", "--debug") == 2
    err = capsys.readouterr().err
    assert err == (f"memaudit: error: --debug: no such file or folder (relative to the working folder {os.getcwd()})"
                   "\n") and "MEMAUDIT_RAY_LOGS" not in os.environ


@pytest.mark.parametrize("args, line", [
    (("run", "p.txt", "--bogus"), "No such option: --bogus (Possible options: --out); see memaudit run --help"),
    (("run", "p.txt", "--seed", "abc"), "Invalid value for '--seed': Input should be a valid integer, unable to "
                                        "parse string as an integer; see memaudit run --help"),
    (("generate", "p.txt"), "Missing option '--model' / '-m'; see memaudit generate --help"),
    (("nosuchcmd",), "No such command 'nosuchcmd'; see memaudit --help"),
    (("lab", "eval", "--split", "foo"), "Invalid value for --split: choose validation, test or all; see memaudit lab "
                                        "eval --help"),
])
def test_a_usage_error_is_one_line_naming_the_commands_help_exit_2(tmp_path, monkeypatch, capsys, args, line):
    """The console script's usage errors were typer's usage line, a hint and a box of three lines or more, where
    `run --help` promises 'an error said in one line' for exit 2; they are now one line as every other error."""
    monkeypatch.chdir(tmp_path)
    assert _main(monkeypatch, *args) == 2
    captured = capsys.readouterr()
    assert captured.err == f"memaudit: error: {line}\n" and captured.out == ""


def test_the_console_script_exits_0_after_help_and_with_a_commands_own_code(tmp_path, monkeypatch, capsys):
    """`--help` exits 0 with the help on stdout; a command's own exit code (typer.Exit) comes through unchanged."""
    monkeypatch.chdir(tmp_path)
    assert _main(monkeypatch, "calibrate", "--help") == 0
    assert "Usage: memaudit calibrate" in capsys.readouterr().out
    assert _main(monkeypatch) == 2  # no command: the help, as `memaudit` alone always printed it
    assert "Usage: memaudit [OPTIONS] COMMAND" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert _main(monkeypatch, "report", "empty") == 2
    assert capsys.readouterr().err.startswith("memaudit: error: ")


def test_version_prints_the_installed_version_and_exits_0(tmp_path, monkeypatch, capsys):
    """`memaudit --version` was 'No such option'. It prints the version the package metadata records (pyproject's)."""
    from importlib.metadata import version

    monkeypatch.chdir(tmp_path)
    assert _main(monkeypatch, "--version") == 0
    from audit.build import memaudit_build

    # and the build, which run folders record and a rerun's note names (uhelp)
    assert capsys.readouterr().out == f"memaudit {version('memaudit')} (build {memaudit_build()})\n"


def test_library_notices_are_silenced_unless_debug(tmp_path, monkeypatch, capsys):
    """Without --debug, transformers' and diffusers' own notices are turned down (TRANSFORMERS_VERBOSITY=error,
    DIFFUSERS_VERBOSITY=critical, unless the user set them); with --debug they are left as they are."""
    import os

    monkeypatch.chdir(tmp_path)
    for var in ("MEMAUDIT_RAY_LOGS", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        monkeypatch.delenv(var, raising=False)
    _main(monkeypatch, "run", "nope.txt", "--debug")
    assert "TRANSFORMERS_VERBOSITY" not in os.environ and "DIFFUSERS_VERBOSITY" not in os.environ
    _main(monkeypatch, "run", "nope.txt")
    assert (os.environ["TRANSFORMERS_VERBOSITY"], os.environ["DIFFUSERS_VERBOSITY"]) == ("error", "critical")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    _main(monkeypatch, "run", "nope.txt")
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info"
    capsys.readouterr()


def test_a_command_module_missing_a_dependency_is_not_hidden(tmp_path, monkeypatch):
    """A command module that is not installed is left out; one that is there but fails to import a dependency
    raises (it used to be a missing command with no word of why)."""
    import sys

    import typer

    import audit.cli as cli

    (tmp_path / "memaudit_test_cmds.py").write_text("import memaudit_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "app", typer.Typer())
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("memaudit_no_such_module",))
    cli._mount_optional()  # not installed: skipped
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("memaudit_test_cmds",))
    with pytest.raises(ModuleNotFoundError, match="memaudit_no_such_dependency"):
        cli._mount_optional()
    sys.modules.pop("memaudit_test_cmds", None)


def test_layers_says_when_the_default_comes_from_memaudit_json(tmp_path, tiny_model_dir, tiny_model):
    """A model folder whose memaudit.json names the default layer (the 2nd here): the first line says so, and
    that layer alone is marked."""
    import shutil

    from audit.models import adapter_of

    names = adapter_of(tiny_model).cross_attention_layers(tiny_model.unet)
    folder = shutil.copytree(tiny_model_dir, tmp_path / "m")
    meta = folder / "memaudit.json"
    meta.write_text(json.dumps((json.loads(meta.read_text()) if meta.exists() else {}) | {"default_layers": [names[1]]}))
    res = CliRunner().invoke(app, ["layers", "--model", str(folder)])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == (["family sd1; default layer: named by the model folder's memaudit.json"]
                                       + [f"{i:3d}  {n}" + ("  (default)" if i == 2 else "")
                                          for i, n in enumerate(names, 1)])


# ---------------------------------------------------------------- report, calibrate, diff: options and outputs


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def a_run(tmp_path):
    from test_report_mutants import make_run

    return make_run(tmp_path / "run", [("a red cat", 2.0), ("a blue dog", 1.0)], extra={"app": ["x", "y"]})


def test_report_passes_its_defaults_and_options_and_prints_the_written_path(a_run, monkeypatch):
    """--top 20 and --bins 30 by default (--help), --by read as a list; the report file's path alone on stdout."""
    import audit.report as rep

    seen = []
    build = rep.build_report
    monkeypatch.setattr(rep, "build_report", lambda run_dir, top, by, bins: seen.append((top, by, bins))
                        or build(run_dir, top=top, by=by, bins=bins))
    res = _invoke("report", a_run, "-f", "md")
    assert res.exit_code == 0 and res.stdout == f"{a_run / 'report.md'}\n" and res.stderr == "", res.output
    res = _invoke("report", a_run, "--top", "3", "--bins", "7", "--by", "app", "-f", "md")
    assert res.exit_code == 0, res.output
    assert seen == [(20, (), 30), (3, ("app",), 7)]


def test_a_report_of_a_run_that_scored_nothing_warns_on_stderr(tmp_path):
    from test_report_mutants import make_run

    run = make_run(tmp_path / "run", [], rejects=[("in/a.parquet", "empty_prompt")] * 2)
    res = _invoke("report", run, "-f", "md")
    assert res.exit_code == 0 and res.stdout == f"{run / 'report.md'}\n", res.output
    assert res.stderr == ("memaudit: warning: the run scored nothing (2 rows read, 2 rejected): this report summarizes "
                          "no scores\n")


def test_report_output_extensions_in_any_case_and_a_format_that_contradicts_its_extension(a_run, tmp_path):
    """.MD and .markdown are Markdown, .HTML an HTML page (the extension read in any case); --format md with
    -o x.html is refused, naming the extensions Markdown takes, and writes nothing."""
    for name, start in (("R.MD", "# "), ("r.markdown", "# "), ("page.HTML", "<!doctype html>")):
        res = _invoke("report", a_run, "-o", tmp_path / name)
        assert res.exit_code == 0 and res.stdout == f"{tmp_path / name}\n", (name, res.output)
        assert (tmp_path / name).read_text(encoding="utf-8").lower().startswith(start), name
    res = _invoke("report", a_run, "-f", "md", "-o", tmp_path / "x.html")
    assert res.exit_code == 2 and res.stderr == (f"memaudit: error: --output {tmp_path / 'x.html'}: a Markdown report "
                                                 "is written to a .md or .markdown file\n"), res.output
    assert not (tmp_path / "x.html").exists()


def test_an_existing_report_is_replaced_but_not_a_json_that_is_not_a_calibration(a_run, tmp_path):
    """A report file memaudit wrote is written again (a Markdown file it did not write is refused: udocs); calibrate
    -o refuses a JSON list, another kind of document and a file that is not JSON."""
    (tmp_path / "r.md").write_text("# memaudit report: an older run\n\nold\n")
    res = _invoke("report", a_run, "-o", tmp_path / "r.md")
    assert res.exit_code == 0 and (tmp_path / "r.md").read_text().startswith("# memaudit report: "), res.output
    assert "old\n" not in (tmp_path / "r.md").read_text()
    for name, text in (("list.json", "[1]"), ("other.json", '{"kind": "memaudit.other"}'), ("text.json", "x")):
        (tmp_path / name).write_text(text)
        res = _invoke("calibrate", a_run, "-o", tmp_path / name)
        assert res.exit_code == 2 and res.stderr == (f"memaudit: error: --output {tmp_path / name} exists and is not "
                                                     "a memaudit calibration: not overwritten\n"), (name, res.output)
        assert (tmp_path / name).read_text() == text


def test_no_output_is_written_over_a_file_of_a_generate_folder(a_run, tmp_path):
    """A folder holding generate.json is memaudit generate's: its summary.json (not written yet) is refused too."""
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "generate.json").write_text("{}")
    res = _invoke("calibrate", a_run, "-o", gen / "summary.json")
    assert res.exit_code == 2 and res.stderr == (f"memaudit: error: --output {gen / 'summary.json'} is a file of the "
                                                 f"memaudit output folder {gen.resolve()}: write elsewhere (nothing "
                                                 "was written)\n"), res.output
    assert sorted(p.name for p in gen.iterdir()) == ["generate.json"]


def test_calibrate_default_fpr_line_and_output(tmp_path, monkeypatch):
    """1000 reference prompts with risks i / 7: the default --fpr 0.01 allows floor(10) flags, so the threshold is
    the 11th highest risk, 989 / 7 = 141.2857...; no small-reference warning (0.01 x 1000 = 10); written to
    ./calibration.json by default, its path alone on stdout."""
    from test_report_mutants import make_run

    ref = make_run(tmp_path / "ref", [(f"prompt {i}", i / 7) for i in range(1000)])
    monkeypatch.chdir(tmp_path)
    res = _invoke("calibrate", ref)
    assert res.exit_code == 0, res.output
    assert res.stderr == ("memaudit: threshold 141.28571428571428 at FPR 0.01 from 1000 reference prompts; "
                          "model tiny [fp-a]\n")
    assert res.stdout == "calibration.json\n"
    cal = json.loads((tmp_path / "calibration.json").read_text())
    assert cal["threshold"] == pytest.approx(989 / 7) and cal["fpr"] == 0.01


def test_diff_options_outputs_and_refusals(a_run, tmp_path, monkeypatch):
    """--top 20 by default; --top 0 refused; -o x.md writes the Markdown printed by -f md (with its final newline)
    and prints its path; -o x.html is not a diff format (terminal, so -o is refused); -f md -o x.json is refused naming
    Markdown's extensions; -f terminal -o x.md is refused."""
    import audit.diff as d

    seen = []
    diff_runs = d.diff_runs
    monkeypatch.setattr(d, "diff_runs", lambda old, new, top: seen.append(top) or diff_runs(old, new, top=top))
    printed = _invoke("diff", a_run, a_run, "-f", "md")
    assert printed.exit_code == 0, printed.output
    res = _invoke("diff", a_run, a_run, "-o", tmp_path / "d.md", "-n", "3")
    assert res.exit_code == 0 and res.stdout == f"{tmp_path / 'd.md'}\n", res.output
    assert seen == [20, 3]
    text = (tmp_path / "d.md").read_text(encoding="utf-8")
    assert text == printed.stdout  # the Markdown and the newline that ends the printed text
    for args, line in (
            (["--top", "0"], "--top 0: must be at least 1"),
            (["-o", tmp_path / "d.html"], "--output writes Markdown: add --format md (or --format json)"),
            (["-f", "terminal", "-o", tmp_path / "e.md"], "--output writes Markdown: add --format md (or --format json)"),
            (["-f", "md", "-o", tmp_path / "d.json"],
             f"--output {tmp_path / 'd.json'}: a Markdown diff is written to a .md or .markdown file")):
        res = _invoke("diff", a_run, a_run, *args)
        assert res.exit_code == 2 and res.stderr == f"memaudit: error: {line}\n", (args, res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.md", "run"]


def test_diff_with_a_folder_of_runs_names_the_run_it_chose(tmp_path):
    """OLD_RUN a folder of run folders: the latest started before NEW_RUN is used and named on stderr."""
    from test_report_mutants import make_run

    nightly = tmp_path / "nightly"
    for name, day in (("a", "01"), ("b", "02"), ("c", "03")):
        run = make_run(nightly / name, [("a red cat", 1.0)])
        manifest = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps(manifest | {"started_at": f"2026-12-{day}T00:00:00+00:00"}))
    res = _invoke("diff", nightly, nightly / "c", "-f", "md")
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines()[0] == f"memaudit: compared with {nightly / 'b'}"


# ---------------------------------------------------------------- the Python API


def _api_stub(monkeypatch, manifest):
    seen = []

    def execute(cfg, progress=None, log=None):
        seen.append((cfg, progress, log))
        return Path(cfg.out), manifest

    monkeypatch.setattr(runner, "execute", execute)
    return seen


def test_audit_run_shows_no_progress_by_default_and_passes_its_arguments(tmp_path, monkeypatch):
    """progress=False (the docstring's default: none), log as given; inputs a path or a list of str and Path."""
    import audit

    seen = _api_stub(monkeypatch, _manifest())
    audit.run(tmp_path / "p.txt", out=tmp_path / "o")
    cfg, progress, log = seen[-1]
    assert (cfg.inputs, cfg.out, progress, log) == ((str(tmp_path / "p.txt"),), str(tmp_path / "o"), False, None)
    audit.run(["a.txt", tmp_path / "b.txt"], out="o2", progress=True, log=print, seed=3)
    cfg, progress, log = seen[-1]
    assert (cfg.inputs, cfg.out, cfg.seed, progress, log) == (("a.txt", str(tmp_path / "b.txt")), "o2", 3, True, print)


def test_audit_run_lists_its_options_without_inputs_and_out():
    """inputs and out are run()'s own arguments: the list of options in the TypeError names every other RunConfig
    field and not them."""
    from dataclasses import fields

    import audit

    with pytest.raises(TypeError) as err:
        audit.run("x.txt", bogus=1)
    listed = str(err.value).split("the options are ")[1].split(", ")
    assert listed == sorted({f.name for f in fields(RunConfig)} - {"inputs", "out"})


def test_audit_run_refuses_the_names_of_its_private_arguments(tmp_path, monkeypatch):
    """run()'s docstring: an unknown option is a TypeError. ``nothing_scored_ok`` and ``caller`` (what score() tells
    the shared code) were taken silently, the first turning off the nothing-scored gate."""
    import audit

    _api_stub(monkeypatch, _manifest(2, 0))
    for name, value in (("nothing_scored_ok", True), ("caller", "me")):
        with pytest.raises(TypeError, match=f"^unknown option {name}: the options are address,"):
            audit.run("p.txt", out=tmp_path / "o", **{name: value})
        with pytest.raises(TypeError, match=f"^unknown option {name}: the options are address,"):
            audit.score(["a red cat"], **{name: value})


def test_audit_run_raises_each_gates_error_with_the_folder_and_manifest(tmp_path, monkeypatch):
    """3 rows flagged with fail_on_flagged=2: FlaggedPromptsError; nothing scored: ScoringFailedError; both carry
    .out (the run folder) and .manifest, as the README says."""
    import audit

    flagged = _manifest(4, 4, counts={"flagged": 3}, calibration={"threshold": 0.5})
    _api_stub(monkeypatch, flagged)
    with pytest.raises(audit.FlaggedPromptsError) as err:
        audit.run("p.txt", out=tmp_path / "o", calibration="cal.json", fail_on_flagged=2)
    assert str(err.value) == ("3 rows flagged (risk > 0.5), more than --fail-on-flagged 2; outputs are complete in "
                              "the run folder")
    assert err.value.out == tmp_path / "o" and err.value.manifest is flagged
    audit.run("p.txt", out=tmp_path / "o", calibration="cal.json", fail_on_flagged=3)  # 3 allowed: no error
    nothing = _manifest(2, 0)
    _api_stub(monkeypatch, nothing)
    with pytest.raises(audit.ScoringFailedError, match="^nothing was scored: all 2 rows read") as err:
        audit.run("p.txt", out=tmp_path / "o")
    assert err.value.out == tmp_path / "o" and err.value.manifest is nothing


def test_score_refuses_a_bytearray_and_says_why_an_item_is_not_utf8(tiny_model_dir):
    import audit

    with pytest.raises(TypeError, match="not a bytearray: wrap a single prompt in a list"):
        audit.score(bytearray(b"a red cat"))
    df = audit.score(["bad \ud800 half"], model=str(tiny_model_dir))
    assert df.columns[0] == "row" and "source" not in df.columns and "prompt_id" not in df.columns  # no run folder
    assert df["reason"].to_list() == ["invalid_utf8"]
    assert df["detail"].to_list() == ["'utf-8' codec can't encode character '\\ud800' in position 4: surrogates not "
                                      "allowed"]


def test_score_that_fails_carries_every_row_and_a_message_without_the_temporary_folder(tiny_model_dir, monkeypatch):
    """1 of 2 prompts fails (50% > 1%): ScoringFailedError whose message names no run folder (it was temporary) and
    says .frame holds the rows, one sentence after another; .out is None; .frame has both rows, in order."""
    import audit
    from helpers import fail_batches_with

    fail_batches_with(monkeypatch, "poison")
    with pytest.raises(audit.ScoringFailedError) as err:
        audit.score(["a red cat", "a poison apple"], model=str(tiny_model_dir), device="cpu")
    assert str(err.value) == ("1 of 2 rows (50.0%) could not be scored (scoring_error 1), more than "
                              "--max-error-fraction 0.01; the first: scoring_error: ValueError: this prompt breaks "
                              "the model. The error's .frame holds every prompt's row (scored, or rejected with the "
                              "reason).")
    assert err.value.out is None and err.value.manifest["counts"]["scored"] == 1
    frame = err.value.frame
    assert frame["row"].to_list() == [0, 1] and frame["reason"].to_list() == [None, "scoring_error"]
    assert frame["prompt"].to_list() == ["a red cat", "a poison apple"] and frame["risk"][0] is not None


def test_no_command_prints_the_help_exits_2_and_the_help_says_so(monkeypatch, capsys):
    """`memaudit` and `memaudit lab` alone print their help and exit 2 (click's usage error for a command line naming
    no command), which neither help nor the README's exit codes said: a user's script saw 2, "an error said in one
    line", and no line. Both helps now end saying it (and that --help exits 0), on stdout, nothing on stderr."""
    assert _main(monkeypatch) == 2
    out, err = capsys.readouterr()
    assert "Usage: memaudit [OPTIONS] COMMAND" in out and err == ""
    assert ("Without a command this help is printed (stdout) and the exit code is 2, a usage error as for any bad "
            "command line; --help exits 0.") in " ".join(out.split())
    assert _main(monkeypatch, "lab") == 2
    out, err = capsys.readouterr()
    assert "Usage: memaudit lab [OPTIONS] COMMAND" in out and err == ""
    assert ("Without a lab command this help is printed (stdout) and the exit code is 2, a usage error as for any "
            "bad command line; --help exits 0.") in " ".join(out.split())
    assert _main(monkeypatch, "lab", "--help") == 0 and "Without a lab command" in capsys.readouterr().out


def test_the_config_help_says_what_a_file_holds_without_pointing_to_the_repository(tmp_path):
    """`run --help` said of --config only "(see pipelines/)", a folder of the repository that a wheel install does
    not have. The help now says the file's form itself: which options, how they are named, the [run] table (shown
    as such, not eaten as rich markup), an example, the expansions and what relative paths are relative to; and the
    example, written one a line, is a file `run --config` reads, with the values it shows."""
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.config import load_config_file

    res = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "2000"})
    assert res.exit_code == 0
    line = next(line for line in res.output.splitlines() if "--config " in line and "TOML" in line)
    assert "pipelines" not in res.output
    assert " ".join(line.strip(" │").split()).endswith(
        "TOML file holding any of these options but --progress and --dry-run, by long name (batch_size or "
        "batch-size), at the top level or in a [run] table, one a line: inputs = [\"logs/\"]; model = \"lab\"; "
        "out = \"runs/{date}\"; cache = \"score-cache\"; batch_size = 64. {date} (UTC today) and {config_dir} (the "
        "file's folder) expand in its strings; other relative paths are from the working folder. Flags given here "
        "override it.")
    from audit.cli import CONFIG_EXAMPLE

    (tmp_path / "job.toml").write_text("[run]\n" + CONFIG_EXAMPLE.replace(", ", "\n") + "\n")
    got = load_config_file(tmp_path / "job.toml")
    assert got["inputs"] == ("logs/",) and got["model"] == "lab" and got["cache"] == "score-cache"
    assert got["batch_size"] == 64 and got["out"].startswith("runs/20") and "{" not in got["out"]
