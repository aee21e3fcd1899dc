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


def test_a_filled_cache_on_a_read_only_mount_serves_its_scores_and_stores_nothing(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    """`memaudit run logs/ --cache /mnt/team-cache` with the team's filled cache mounted read-only was refused
    ("--cache ...: cannot write in ... (on a read-only file system)"), so a job that could only read it scored every
    prompt without it. Now the cache is used for lookups only: its hits are served (the very scores it holds), the
    prompts it lacks are sent to the model and not stored, one warning says so with the run's total not stored, the
    dry run says so, and the counts reconcile. Three input files in one group of units: the total is counted once."""
    cache = tmp_path / "cache"
    kw = dict(model=str(tiny_model_dir), device="cpu", batch_size=8, cache=str(cache))
    _, first = execute(RunConfig(inputs=(_txt(tmp_path / "old.txt", OLD),), out=str(tmp_path / "r1"), **kw),
                       progress=False, log=lambda m: None)
    assert (first["cache"]["hits"], first["cache"]["scored"]) == (0, 4)
    before = _snapshot(cache)
    _read_only(monkeypatch, cache)

    inputs = (_txt(tmp_path / "a.txt", OLD[:2] + NEW[:1]), _txt(tmp_path / "b.txt", OLD[2:] + NEW[1:2]),
              _txt(tmp_path / "c.txt", NEW[2:] + OLD[:1]))
    cfg = RunConfig(inputs=inputs, out=str(tmp_path / "r2"), **kw)
    summary = dry_run(cfg, log=lambda m: None)
    assert summary["cache"] == {"path": str(cache), "folders": 1, "read_only": "on a read-only file system"}
    from audit.cli import dry_run_lines

    assert ("cache: read-only (on a read-only file system): lookups only, its scores are served and the prompts it "
            "lacks are sent to the model and not stored") in dry_run_lines(summary)

    lines: list[str] = []
    _, m = execute(cfg, progress=False, log=lines.append)
    assert m["units"]["total"] == 3
    assert (m["counts"]["rows_read"], m["counts"]["scored"], m["counts"]["unique_prompts"]) == (8, 8, 7)
    # per unit's unique prompts (3 + 3 + 2), as the cache figures count: 5 served (the first prompt in a.txt and
    # c.txt), 3 sent to the model, each once over the group's units
    assert (m["cache"]["hits"], m["cache"]["scored"]) == (5, 3)
    key = next(cache.iterdir())
    warning = (f"score cache: {key} cannot be written (on a read-only file system): lookups only, its scores are "
               "served and new scores are not stored (3 this run; they are in this run's table, and scored again "
               "next time)")
    assert m["cache"]["warnings"] == [warning]
    assert [x for x in lines if "score cache" in x] == [f"memaudit: warning: {warning}"]
    assert _snapshot(cache) == before  # nothing made, stored, compacted or moved
    risk = pl.read_parquet(tmp_path / "r2" / "risk.parquet")
    old_risk = dict(pl.read_parquet(tmp_path / "r1" / "risk.parquet").select("prompt", "risk").iter_rows())
    served = risk.filter(pl.col("prompt").is_in(OLD))
    assert served.height == 5 and all(r == old_risk[p] for p, r in served.select("prompt", "risk").iter_rows())
    assert risk.filter(pl.col("prompt").is_in(NEW))["risk"].is_finite().all()


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


def test_a_read_only_cache_without_this_configurations_scores_says_so(tmp_path, tiny_model_dir, monkeypatch):
    """The read-only cache holds no folder for this model and score configuration (another scorer's): nothing can
    be served or stored, and its folder cannot be made; the run scores without it, saying why, rather than warning
    of a folder that "cannot be used (PermissionError ...)"."""
    cache = tmp_path / "cache"
    (cache / "0123456789abcdef-0123456789abcdef").mkdir(parents=True)
    _read_only(monkeypatch, cache)
    lines: list[str] = []
    _, m = execute(RunConfig(inputs=(_txt(tmp_path / "p.txt", OLD),), model=str(tiny_model_dir), device="cpu",
                             batch_size=8, out=str(tmp_path / "r"), cache=str(cache)), progress=False, log=lines.append)
    assert sorted(p.name for p in cache.iterdir()) == ["0123456789abcdef-0123456789abcdef"]
    assert m["cache"]["units_without_cache"] == 1 and m["counts"]["scored"] == 4
    [warning] = m["cache"]["warnings"]
    assert warning.startswith(f"score cache: {cache} cannot be written (on a read-only file system) and holds no "
                              "scores of this model and score configuration (no folder ")
    assert warning.endswith("); scoring without the cache")


def test_a_cache_that_cannot_be_read_either_is_still_refused(tmp_path, monkeypatch):
    """Lookups need a folder that can be listed: one without read permission is refused as before."""
    from audit.config import validate_config
    from audit.errors import RunError

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False)
    with pytest.raises(RunError, match=r"--cache .*: cannot write in .* \(no write permission\)"):
        validate_config(RunConfig(inputs=("p.txt",), model="m", cache=str(cache)))


# ------------------------------------------------------------------ a finished run folder on a read-only mount

def _cli(*args):
    from typer.testing import CliRunner

    from audit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_finished_run_on_a_read_only_mount_reruns_writing_nothing_with_its_verdict(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):
    """`memaudit run logs.jsonl --out /ro/run` over a finished run folder mounted read-only (a scheduler's retry, an
    auditor re-checking an archived run) was refused ("--out /ro/run: cannot write in /ro/run (on a read-only file
    system)", exit 2), though the rerun had nothing to write. Now it says the run is complete and nothing is written,
    prints the run's figures and exits with its verdict (here exit 4: a row without the prompt column, over --max-error-fraction 0);
    the dry run says so. The folder is unchanged: no lock, manifest or table written."""
    logs = tmp_path / "logs.jsonl"
    logs.write_text("".join(f'{{"prompt": "{p}"}}\n' for p in OLD) + '{"text": "a cat"}\n')
    args = ("run", logs, "--model", tiny_model_dir, "--device", "cpu", "--out", tmp_path / "r",
            "--max-error-fraction", "0")
    first = _cli(*args)
    assert first.exit_code == 4, first.output
    before = _snapshot(tmp_path / "r")
    _read_only(monkeypatch, tmp_path / "r")

    dry = _cli(*args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert (f"--out {tmp_path / 'r'}: cannot be written (on a read-only file system): its run is complete, so the run "
            "writes nothing there and exits with its verdict (if the model and score configuration are the same)"
            ) in dry.output
    again = _cli(*args)
    assert again.exit_code == 4, again.output
    assert (f"memaudit: {tmp_path / 'r'} cannot be written (on a read-only file system); its run is complete (every "
            "unit committed, outputs written): nothing to do, nothing written; its figures and verdict follow"
            ) in again.output
    assert "memaudit: 5 rows read, 4 scored, 1 rejected (" in again.output
    assert "nothing left to score, every row resumed" in again.output
    # the same run, its input named through a link (the folder's units are recorded under the file's first name)
    (tmp_path / "link.jsonl").symlink_to(logs)
    linked = _cli(*("run", tmp_path / "link.jsonl", *args[2:]))
    assert linked.exit_code == 4 and "nothing to do, nothing written" in linked.output, linked.output
    assert _snapshot(tmp_path / "r") == before


def test_a_rerun_that_must_write_in_a_read_only_run_folder_says_why(tmp_path, tiny_model_dir, monkeypatch):
    """A run folder with a unit left to score (a run killed, then archived read-only) is refused before anything is
    scored, saying what the rerun must write and how to go on, rather than "cannot write in ..." alone; the dry run
    says the run would be refused and why. A --calibration it was not flagged with must write too."""
    from audit.errors import RunError

    out = tmp_path / "r"
    cfg = RunConfig(inputs=(_txt(tmp_path / "p.txt", OLD),), model=str(tiny_model_dir), device="cpu", batch_size=8,
                    out=str(out), unit_rows=2)
    execute(cfg, progress=False, log=lambda m: None)
    (out / "shards" / "unit-000001.done.json").unlink()
    before = _snapshot(out)
    _read_only(monkeypatch, out)
    summary = dry_run(cfg, log=lambda m: None)
    assert summary["out_read_only"] == {"why": "on a read-only file system", "needs": ["1 of 2 units to score"]}
    with pytest.raises(RunError) as err:
        execute(cfg, progress=False, log=lambda m: None)
    assert str(err.value) == (f"--out {out}: cannot write in {out} (on a read-only file system), and this rerun must "
                              "write there: 1 of 2 units to score; make it writable, or copy the folder to a writable "
                              "place and give that as --out (the copy resumes)")
    assert _snapshot(out) == before


def test_a_read_only_cache_leaves_a_damaged_part_in_place_and_is_never_compacted(tmp_path, monkeypatch):
    """A read-only cache holding a damaged part: the part is not read (its prompts are misses) and left in place
    (moving it to damaged/ would write), the others are served; a put stores nothing and counts its prompts in the
    one read-only note; compaction, which rewrites parts, is not tried."""
    import numpy as np

    from audit.cache import SCORE_COLUMNS, ScoreCache
    from helpers import CACHE_HASHES, filled_cache

    root = tmp_path / "cache"
    filled = filled_cache(root, parts=3)
    import pyarrow.parquet as pq

    bad = filled.files()[0]
    lost = set(pq.read_table(bad).column("risk").to_pylist())
    bad.write_bytes(b"not parquet")
    before = _snapshot(root)
    _read_only(monkeypatch, root)
    cache = ScoreCache(root, "fp", {"scorer": "attention_entropy", "seed": 0})
    assert cache.read_only == "on a read-only file system" and not cache.unusable
    found = cache.lookup(CACHE_HASHES)
    assert len(lost) == 4 and sorted(found.column("risk").to_pylist()) == sorted(set(map(float, range(12))) - lost)
    cache.put(CACHE_HASHES[:4], {c: np.zeros(4) for c in SCORE_COLUMNS}, [[]] * 4)
    assert cache.compact(max_files=0) == 0
    assert _snapshot(root) == before
    assert cache.notes == [
        f"score cache: {cache.dir} cannot be written (on a read-only file system): lookups only, its scores are "
        "served and new scores are not stored (4 this run; they are in this run's table, and scored again next time)",
        f"score cache: {bad} cannot be read (ArrowInvalid: Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet file.); left in "
        "place, not read (the cache cannot be written: on a read-only file system); its prompts are scored again"]


def test_a_read_only_cache_whose_key_json_names_another_configuration_is_not_used_and_not_called_served(
        tmp_path, monkeypatch):
    """A read-only cache folder whose key.json names another configuration than its name (copied over another) is
    not used, as a writable one is: its one note says so, without the read-only line saying its scores are served."""
    import json

    from audit.cache import ScoreCache
    from helpers import CACHE_HASHES, filled_cache

    root = tmp_path / "cache"
    filled = filled_cache(root, parts=1)
    (filled.dir / "key.json").write_text(json.dumps({"model_fingerprint": "other", "score_config": {}}))
    _read_only(monkeypatch, root)
    cache = ScoreCache(root, "fp", {"scorer": "attention_entropy", "seed": 0})
    assert cache.lookup(CACHE_HASHES).num_rows == 0
    assert cache.notes == [f"score cache: {filled.dir / 'key.json'} names another model or score configuration than "
                           "its folder's name stands for (a folder renamed, or copied over another?): move "
                           f"{filled.dir} aside or delete it, and the next run starts it anew; scoring without the "
                           "cache"]


def test_the_dry_run_counts_the_committed_units_of_a_run_named_through_a_link(tmp_path, tiny_model_dir):
    """`memaudit run link.txt --out r --dry-run` over a finished run whose input is named through a link said
    "holds this run, 0 of 1 units committed" (its units were looked up under the link's name), while the run itself
    resumed the one unit; now the dry run counts it, as the run does."""
    out = tmp_path / "r"
    kw = dict(model=str(tiny_model_dir), device="cpu", batch_size=8, out=str(out))
    execute(RunConfig(inputs=(_txt(tmp_path / "p.txt", OLD),), **kw), progress=False, log=lambda m: None)
    (tmp_path / "link.txt").symlink_to(tmp_path / "p.txt")
    summary = dry_run(RunConfig(inputs=(str(tmp_path / "link.txt"),), **kw), log=lambda m: None)
    assert (summary["out_state"], summary["units_done"], summary["units"]) == ("resumes", 1, 1)
