"""The local engine's read-ahead is consumed by the first attempt only: a unit whose read-ahead failed
with a passing error is read again by its retry (run_unit_with_retries), not failed again by the same read."""

from __future__ import annotations

from helpers import prompts_file, run_audit


def test_a_failed_read_ahead_is_read_again_by_the_retry(tmp_path, tiny_model_dir, monkeypatch):
    import audit.engines.local as local

    real, calls = local.prepare_group, []

    def flaky(group, cfg):
        calls.append(group.index)
        if len(calls) == 1:
            raise OSError("transient read error")
        return real(group, cfg)

    monkeypatch.setattr(local, "prepare_group", flaky)
    src = prompts_file(tmp_path / "p.txt", 12)
    _, manifest = run_audit([src], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=8, unit_rows=6)
    assert (manifest["counts"]["rows_read"], manifest["counts"]["scored"]) == (12, 12)
    assert calls == [0, 1]  # unit 0's read-ahead failed; its retry read it itself (prepared=None)
    # (units of 6 rows, --unit-rows 6: a group each)


def test_a_full_disk_stops_the_run_at_the_first_attempt_saying_so(tmp_path, tiny_model_dir, monkeypatch):
    """pyarrow reports a full disk as a plain OSError with the C library's words and no errno: another attempt
    cannot cure it, so the unit is not tried three times (nor the run's log filled with retries)."""
    import pytest

    import audit.tables as tables
    from audit.errors import RunError

    writes = []

    def full(table, where, **kw):
        writes.append(str(where))
        raise OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(tables.pq, "write_table", full)
    src = prompts_file(tmp_path / "p.txt", 6)
    with pytest.raises(RunError, match=r"^unit 0 \(.*p\.txt rows 0-6\) could not be written, no space left on the "
                                       r"device \(OSError: .*\); free space on the output's disk"):
        run_audit([src], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=8, unit_rows=6)
    assert len(writes) == 1 and "unit-000000.risk" in writes[0]  # one attempt, at the first shard


def test_disk_problem_reads_errno_the_message_and_the_cause():
    import errno

    from audit.faults import disk_problem

    assert disk_problem(OSError(errno.ENOSPC, "x")) == "no space left on the device"
    assert disk_problem(OSError(errno.EDQUOT, "x")) == "the disk quota is exceeded"
    assert disk_problem(OSError("Detail: [errno 30] Read-only file system")) == "the file system is read-only"
    assert disk_problem(OSError(errno.EIO, "Input/output error")) is None
    assert disk_problem(ValueError("No space left on device")) is None  # only OSErrors
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("while writing the shard") from inner
    except RuntimeError as outer:
        assert disk_problem(outer) == "no space left on the device"


def test_the_progress_bar_a_terminal_gets_counts_every_row(tmp_path, tiny_model_dir, capfd):
    """The rich bar is what a user at a terminal sees by default (``progress`` None on a tty), yet no test drove
    it: a run with ``progress=True`` scores as a quiet one and the bar ends at every row of the run."""
    import polars as pl

    from audit.runner import execute
    from audit.config import RunConfig

    src = prompts_file(tmp_path / "p.txt", 12)
    cfg = RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(tmp_path / "bar"), device="cpu",
                    batch_size=8, unit_rows=5)
    _, manifest = execute(cfg, progress=True, log=lambda m: None)
    err = capfd.readouterr().err
    assert manifest["counts"]["scored"] == 12 and "scoring" in err and "12/12 rows" in err, err
    _, quiet = run_audit([src], tiny_model_dir, tmp_path / "quiet", device="cpu", batch_size=8, unit_rows=5)
    assert pl.read_parquet(tmp_path / "bar" / "risk.parquet").equals(pl.read_parquet(tmp_path / "quiet" / "risk.parquet"))
