"""Findings of the read-only trial (session 51): a team's filled score cache on a read-only mount, and a finished run
folder on one. Each test fails on the code before its fix.

The tests run as root, whom ``chmod a-w`` does not stop, so a read-only mount is simulated as the other tests do
(tests/test_ucacheshare_findings.py): ``os.access`` and ``os.statvfs`` answer for the read-only folder as the kernel
answers on a read-only mount (``EROFS``, ``ST_RDONLY``); a write that happened all the same would show in the folder,
which each test compares before and after.
"""

from __future__ import annotations

import os
from pathlib import Path
import types

import polars as pl
import pytest

from audit.pipeline import RunConfig
from audit.runner import dry_run, execute

OLD = ["a red cat on a beach", "old city street at night", "a blue dog", "portrait of a woman"]
NEW = ["sunset over the lake", "a small boat", "green forest river"]


def _txt(path: Path, prompts: list[str]) -> str:
    path.write_text("".join(p + "\n" for p in prompts))
    return str(path)


def _read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` and everything under it answer as a read-only mount does."""
    real_access, real_statvfs = os.access, os.statvfs
    inside = lambda p: Path(os.path.abspath(p)) == folder or folder in Path(os.path.abspath(p)).parents

    def access(path, mode, **kw):
        return False if inside(path) and mode & os.W_OK else real_access(path, mode, **kw)

    def statvfs(path):
        st = real_statvfs(path)
        return types.SimpleNamespace(f_flag=st.f_flag | os.ST_RDONLY) if inside(path) else st

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "statvfs", statvfs)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_scores_not_stored_by_a_group_of_units_are_counted_once(tmp_path, tiny_model_dir, monkeypatch):
    """Small input files are scored in groups of units that share one cache lookup and one store; each unit carried
    the group's "cannot store N new scores" note, and the manifest summed the notes over the units: 3 files of a
    run that could not store 3 new scores warned of 9. Now the count is the first unit's, and the warning says 3."""
    import errno

    import pyarrow.parquet as pq

    real = pq.write_table

    def refused(table, where, **kw):
        if os.path.basename(str(where)).startswith(".part-"):  # a cache part; the run's shards are written as ever
            raise OSError(errno.EROFS, "Read-only file system")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", refused)
    inputs = tuple(_txt(tmp_path / f"{n}.txt", [p]) for n, p in zip("abc", NEW))
    _, m = execute(RunConfig(inputs=inputs, model=str(tiny_model_dir), device="cpu", batch_size=8,
                             out=str(tmp_path / "r"), cache=str(tmp_path / "c")), progress=False, log=lambda m: None)
    assert m["units"]["total"] == 3 and (m["cache"]["hits"], m["cache"]["scored"]) == (0, 3)
    folder = next((tmp_path / "c").iterdir())
    assert m["cache"]["warnings"] == [f"score cache: cannot store 3 new scores in {folder} (OSError: [Errno 30] "
                                      "Read-only file system); they are in this run's table, and scored again next "
                                      "time"]
