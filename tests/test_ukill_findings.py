"""Findings of an SRE whose nightly memaudit jobs are killed (OOM killer, node preemption, deploys) at any moment:
each kill point is simulated in-process."""

from __future__ import annotations

import os
import signal

from typer.testing import CliRunner

from helpers import prompts_file, run_audit
from test_cli_api_mutants import stub  # noqa: F401 - the fixture: `memaudit run` with the engine replaced


def _invoke(*args):
    from audit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


class _DefaultSigterm(Exception):
    """Stands in for SIGTERM's default action (the process ends at once, no cleanup, no line said)."""


def _sigterm_while_writing(monkeypatch):
    """Make every atomic write of an output file (audit.tables.atomic_path flushes the written temporary file with
    ``os.fsync`` before renaming it) send SIGTERM to this process, as a deploy stopping the job while its output file
    is written, whichever way the file's text was written (``write_text``, or a report's JSON in pieces). SIGTERM's
    handler starts as a stand-in for the default action (an earlier test's run may have left memaudit's own handler
    installed in this process)."""
    real = os.fsync

    def fsync(fd):
        real(fd)
        os.kill(os.getpid(), signal.SIGTERM)

    def default(signum, frame):
        raise _DefaultSigterm()

    old = signal.signal(signal.SIGTERM, default)
    monkeypatch.setattr(os, "fsync", fsync)
    return old


def test_sigterm_while_report_calibrate_or_diff_writes_its_file_exits_143_and_leaves_the_old_file(
        tmp_path, tiny_model_dir, monkeypatch):
    """`memaudit report -o`, `calibrate -o` and `diff -o` took no SIGTERM handler (only `run` and `generate` did):
    a deploy's SIGTERM while one wrote its file ended it at once, exit 143 with no line said, and left the
    temporary file (.report.md.1ca92461.tmp) beside the output, never removed. Now each says "terminated (SIGTERM);
    nothing was kept" with exit 143, the temporary file is removed and the previous output is left whole."""
    src = prompts_file(tmp_path / "p.txt", 6)
    run, _ = run_audit([src], tiny_model_dir, tmp_path / "run", device="cpu", batch_size=8)
    out = tmp_path / "o"
    out.mkdir()
    cases = (("report", run, "-f", "md", "-o", out / "r.md"), ("calibrate", run, "-o", out / "c.json"),
             ("diff", run, run, "-f", "md", "-o", out / "d.md"))
    for args in cases:  # the previous night's files
        assert _invoke(*args).exit_code == 0
    before = {p.name: p.read_text() for p in out.iterdir()}
    old = _sigterm_while_writing(monkeypatch)  # each command's output file
    try:
        for args in cases:
            res = _invoke(*args)
            assert res.exit_code == 143, (args[0], res.exit_code, res.output)
            assert res.output.endswith("memaudit: error: terminated (SIGTERM); nothing was kept: rerun the command "
                                       "to start again\n"), (args[0], res.output)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert sorted(before) == ["c.json", "d.md", "r.md"]
    assert {p.name: p.read_text() for p in out.iterdir()} == before  # no temporary file left, the old files whole


def test_the_next_write_of_a_report_diff_or_calibration_removes_what_a_sigkill_left(tmp_path, tiny_model_dir):
    """A SIGKILL (the OOM killer) while `report -o`, `diff -o` or `calibrate -o` wrote its file left
    .r.md.1ca92461.tmp beside it, and no later command ever removed it (a run folder's sweep covers only the run's
    own tables): a nightly job killed now and then piled them up. The next write of the same file now removes its
    temporaries older than an hour; a younger one (a write of it in progress elsewhere) and another file's are kept."""
    src = prompts_file(tmp_path / "p.txt", 6)
    run, _ = run_audit([src], tiny_model_dir, tmp_path / "run", device="cpu", batch_size=8)
    out = tmp_path / "o"
    out.mkdir()
    old = os.path.getmtime(src) - 7200
    for name in (".r.md.0123abcd.tmp", ".c.json.0123abcd.tmp", ".d.md.0123abcd.tmp", ".x.md.0123abcd.tmp",
                 ".r.md.notmine.tmp"):
        (out / name).write_text("half a file")
        os.utime(out / name, (old, old))
    (out / ".r.md.4567cdef.tmp").write_text("a write in progress")  # young: kept
    for args in (("report", run, "-f", "md", "-o", out / "r.md"), ("calibrate", run, "-o", out / "c.json"),
                 ("diff", run, run, "-f", "md", "-o", out / "d.md")):
        res = _invoke(*args)
        assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [".r.md.4567cdef.tmp", ".r.md.notmine.tmp", ".x.md.0123abcd.tmp",
                                                     "c.json", "d.md", "r.md"]


def test_a_busy_folder_names_the_process_that_holds_its_lock(tmp_path):
    """A run stopped by SIGSTOP (a frozen node) or hung holds its folder's lock: the next night's run exited 75 with
    "being written by another memaudit run right now" and nothing more, leaving the operator to guess which process
    to end. The lock file now records its holder, and both refusals (the early check and the lock itself) name it;
    a lock file that records nothing (an earlier memaudit's) gives the message as before."""
    import socket

    import pytest

    from audit.errors import RunFolderBusyError
    from audit.pipeline import out_lock
    from audit.runner import check_not_busy

    out = tmp_path / "run"
    host = "".join(socket.gethostname().split()) or "?"
    with out_lock(out):
        for refuse in (lambda: check_not_busy(out), lambda: out_lock(out, "memaudit generate").__enter__()):
            with pytest.raises(RunFolderBusyError) as err:
                refuse()
            said = str(err.value)
            head = f"--out {out} is being written by another memaudit "
            assert said.startswith(head) and f" right now (process {os.getpid()} on host {host}, since 20" in said \
                and said.endswith("); wait for it to finish (then rerun to resume or reuse it) or choose another --out"), said
    (out / ".memaudit.lock").write_text("")
    with open(out / ".memaudit.lock", "a+b") as other:  # held by a process that wrote nothing there
        import fcntl

        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunFolderBusyError) as err:
            check_not_busy(out)
    assert str(err.value) == (f"--out {out} is being written by another memaudit run right now; wait for it to "
                              "finish (then rerun to resume or reuse it) or choose another --out")


def test_the_cache_and_duplicate_id_lines_separate_thousands_as_the_summary_does(stub):
    """The run's summary line reads "4,000 rows read, 3,925 scored" and the cache line below it read "cache 23 hits,
    3902 sent to the model" (the duplicate-id warning likewise): a log grep or an eye comparing the two lines met
    two spellings of one count. Both now separate thousands."""
    from test_cli_api_mutants import _manifest

    stub.manifest = _manifest(4000, 3925, counts={"duplicate_ids": 1234}, cache={"hits": 23, "scored": 3902})
    res = stub.run()
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines()[1:] == [
        "memaudit: warning: 1,234 scored rows share their --id-column value with another row",
        "memaudit: cache 23 rows hit, 3,902 rows scored by the model"]


def test_report_on_a_folder_a_run_writes_names_that_run(tmp_path):
    """`memaudit report` (diff, calibrate) on a folder whose run holds its lock said "is being written by a memaudit
    run right now" without saying which: a run that hangs (a frozen node) left the operator guessing. It names the
    holder the lock file records, as the busy refusal of a second run does."""
    import socket

    import pytest

    from audit.errors import ReportError
    from audit.pipeline import out_lock
    from audit.tables import finished_run

    out = tmp_path / "run"
    host = "".join(socket.gethostname().split()) or "?"
    with out_lock(out):
        (out / "run.json").write_text("{}")
        with pytest.raises(ReportError) as err:
            finished_run(out, error=ReportError)
    said = str(err.value)
    assert said.startswith(f"{out} is being written by a memaudit run right now (process {os.getpid()} on host "
                           f"{host}, since 20") and said.endswith(") (no risk.parquet yet): wait for it to finish"), said
