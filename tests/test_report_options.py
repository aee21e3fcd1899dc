"""The report/calibrate/diff options' bounds and --output checks (audit/cli/report.py). Most checks run
before the run folder is read, so a missing run folder shows whether the option passed (the run folder's own
"does not exist" error) or was refused (the option's message)."""

from __future__ import annotations

from typer.testing import CliRunner

from helpers import prompts_file, run_audit


def _invoke(*args):
    from audit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_bins_bounds_are_1_and_1000_inclusive(tmp_path):
    """--help: "Histogram bins (1 to 1,000)"."""
    missing = tmp_path / "nope"
    # each names the option given wrong (the line named both, whichever it was: udocs)
    res = _invoke("report", missing, "--bins", "0")
    assert res.exit_code == 2 and res.output == "memaudit: error: --bins 0: must be at least 1\n", res.output
    res = _invoke("report", missing, "--top", "-3")
    assert res.exit_code == 2 and res.output == "memaudit: error: --top -3: must be at least 1\n", res.output
    for ok in ("1", "1000"):  # accepted: the error is then the missing run folder's
        res = _invoke("report", missing, "--bins", ok)
        assert res.exit_code == 2 and "at most" not in res.output and "does not exist" in res.output, (ok, res.output)
    res = _invoke("report", missing, "--bins", "1001")
    assert res.exit_code == 2 and "--bins 1001: at most 1,000" in res.output, res.output


def test_diff_top_bound_and_html_is_not_a_diff_format(tmp_path):
    missing = tmp_path / "nope"
    res = _invoke("diff", missing, missing, "--top", "1")
    assert res.exit_code == 2 and "--top must be" not in res.output and "does not exist" in res.output, res.output
    res = _invoke("diff", missing, missing, "--format", "html")
    assert res.exit_code == 2 and "--format html: choose terminal, md or json" in res.output, res.output


def test_diff_of_an_unfinished_old_run_says_to_resume_it(tmp_path):
    """OLD_RUN holding run.json but no manifest.json is a run (unfinished), not a folder of run folders: diff says to
    resume it rather than looking for runs inside it."""
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    (unfinished / "run.json").write_text("{}")
    res = _invoke("diff", unfinished, tmp_path / "nope")
    assert res.exit_code == 2 and f"{unfinished} is not a finished memaudit run" in res.output \
        and "compared with" not in res.output, res.output


def test_calibration_is_never_written_as_a_file_of_an_unfinished_run(tmp_path):
    """A run folder is known by its identity file (run.json), written first: an unfinished run (no manifest.json
    yet) still owns manifest.json, and calibrate -o there is refused before anything is read or written."""
    unfinished = tmp_path / "run"
    unfinished.mkdir()
    (unfinished / "run.json").write_text("{}")
    res = _invoke("calibrate", tmp_path / "nope", "-o", unfinished / "manifest.json")
    assert res.exit_code == 2 and f"--output {unfinished / 'manifest.json'} is a file of the memaudit output folder" \
        in res.output, res.output
    assert not (unfinished / "manifest.json").exists()


def test_htm_output_writes_html(tmp_path, tiny_model_dir):
    """report -o page.htm: the extension picks html (--format's help: "from --output's extension (.md, .html)";
    format_from maps .htm to html)."""
    src = prompts_file(tmp_path / "p.txt", 6)
    run, _ = run_audit([src], tiny_model_dir, tmp_path / "run", device="cpu", batch_size=8)
    res = _invoke("report", run, "-o", tmp_path / "page.htm")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "page.htm").read_text(encoding="utf-8").lower().startswith("<!doctype html>")


def test_an_output_in_a_missing_folder_is_refused_before_the_run_is_read(tmp_path):
    """check_output_file runs first: the missing --output folder is the error, not the (also missing) run."""
    for args in (["report", tmp_path / "nope", "-f", "md", "-o", tmp_path / "missing" / "x.md"],
                 ["diff", tmp_path / "nope", tmp_path / "nope", "-o", tmp_path / "missing" / "x.md"],
                 ["calibrate", tmp_path / "nope", "-o", tmp_path / "missing" / "c.json"]):
        res = _invoke(*args)
        assert res.exit_code == 2 and f"no such folder {tmp_path / 'missing'}" in res.output, (args, res.output)


def test_an_unknown_format_is_named_before_its_output_file(tmp_path):
    """`report -f pdf -o x.pdf`: the format is what is wrong, so the message names it and the formats there are
    (it said "an HTML report is written to a .html or .htm file", the output check running first)."""
    res = _invoke("report", tmp_path / "nope", "-f", "pdf", "-o", tmp_path / "x.pdf")
    assert res.exit_code == 2 and "--format pdf: choose one of terminal, md, html" in res.output, res.output
    assert "HTML report" not in res.output


def test_a_finished_run_that_lost_a_table_says_so_and_a_rerun_writes_it_again(tmp_path, tiny_model_dir):
    """A finished run whose rejects.parquet was deleted was reported as 'a run started there and did not finish'.
    Its manifest.json (written last) says it finished: the report says which table it lost, and rerunning the
    command writes it again, equal to the one lost."""
    import pyarrow.parquet as pq

    src = prompts_file(tmp_path / "p.txt", 5)
    with open(src, "a") as fh:
        fh.write("\n")  # one empty line: a reject
    out, _ = run_audit([src], tiny_model_dir, tmp_path / "run", device="cpu")
    before = pq.read_table(out / "rejects.parquet")
    (out / "rejects.parquet").unlink()
    res = _invoke("report", out)
    assert res.exit_code == 2 and res.stderr == (f"memaudit: error: {out} is a finished memaudit run that lost its "
                                                 "rejects.parquet: rerun its command with the same --out to write it "
                                                 "again\n"), res.output
    run_audit([src], tiny_model_dir, tmp_path / "run", device="cpu")
    assert pq.read_table(out / "rejects.parquet").equals(before) and before.num_rows == 1
    assert _invoke("report", out).exit_code == 0


def test_a_run_folder_that_cannot_be_made_is_named_with_the_reason(tmp_path, monkeypatch):
    """`--out /proc/x` (as root, so no permission check fails first) ended with a bare '[Errno 2] No such file or
    directory: '/proc/x''. The folder and its lock are made in one step that names --out and the reason; a full
    disk keeps its own error (its one line says to free space)."""
    import errno
    from pathlib import Path

    import pytest

    from audit.errors import RunError
    from audit.pipeline import out_lock

    def refuse(self, *a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(RunError, match=r"^--out .*/x: cannot make the run folder or its lock there \(Read-only file "
                                       r"system\)$"):
        with out_lock(tmp_path / "x"):
            pass

    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "mkdir", full)
    with pytest.raises(OSError) as err:
        with out_lock(tmp_path / "y"):
            pass
    assert err.value.errno == errno.ENOSPC
