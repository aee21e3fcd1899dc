"""Mutation review (session 52, mnew52b) of audit/unit.py, audit/gates.py, audit/faults.py and the count
reconciliation of audit/pipeline.py: tests that kill mutants the suite let live."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter on this checkout; its stdout (the exit status must be 0)."""
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_sighup_that_nohup_ignores_stays_ignored_and_a_default_one_is_taken():
    """terminate_as_interrupt takes SIGHUP only where it has its default action: under nohup (SIG_IGN) a closed
    terminal must not stop the run; SIGTERM is taken either way."""
    out = _python("""
import os, signal
from audit import faults
signal.signal(signal.SIGHUP, signal.SIG_IGN)
faults.terminate_as_interrupt()
print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is faults._raise_terminated)
os.kill(os.getpid(), signal.SIGHUP)  # ignored: the process goes on
signal.signal(signal.SIGHUP, signal.SIG_DFL)
faults.terminate_as_interrupt()
print(signal.getsignal(signal.SIGHUP) is faults._raise_terminated)
try:
    os.kill(os.getpid(), signal.SIGHUP)
    signal.pthread_sigmask(signal.SIG_BLOCK, [])  # a point where the handler runs
    print("not raised")
except faults.Terminated as exc:
    print(exc.signame, exc.exit_code)
""")
    assert out.split("\n")[:3] == ["True True", "True", "SIGHUP 129"]


def test_the_end_of_a_command_ignores_only_the_signals_memaudit_took():
    """finished_ignores_termination ignores SIGTERM and SIGHUP where terminate_as_interrupt installed its handler,
    and leaves another disposition as it was: the default action, or a handler of the caller's own."""
    out = _python("""
import signal
from audit import faults
own = lambda signum, frame: None
signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.signal(signal.SIGHUP, own)
faults.finished_ignores_termination()
print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, signal.getsignal(signal.SIGHUP) is own)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
faults.terminate_as_interrupt()
faults.finished_ignores_termination()
print(signal.getsignal(signal.SIGTERM) is signal.SIG_IGN, signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)
""")
    assert out.split("\n")[:2] == ["True True", "True True"]


def _nan_for(monkeypatch, word: str) -> None:
    """Make every prompt holding ``word`` come back from scoring with ``nonfinite`` set (a nonfinite_attention
    reject), as a model whose attention overflows for it."""
    import numpy as np

    import audit.unit

    real = audit.unit.score_prompts

    def score(scorer, prompts, *a, **k):
        scores, triggers, errors = real(scorer, prompts, *a, **k)
        scores["nonfinite"] = np.where(np.array([word in p for p in prompts], dtype=bool), 1.0, scores["nonfinite"])
        return scores, triggers, errors

    monkeypatch.setattr(audit.unit, "score_prompts", score)


def _mixed_inputs(folder: Path) -> Path:
    """Three small files (12 rows): repeats within and across files, a blank line, a prompt the model fails on
    ("poison"), one whose attention is not finite ("nan"), a null prompt, a line that is not JSON, a JSON line
    without the prompt key."""
    folder.mkdir()
    (folder / "a.txt").write_text("red cat\nblue dog\nred cat\n\na poison apple\n")
    (folder / "b.txt").write_text("blue dog\na nan bird\ngreen tree\n")
    (folder / "c.jsonl").write_text('{"prompt": "red cat"}\n{"prompt": null}\nnot json\n{"x": 1}\n')
    return folder


EXPECTED_REJECTS = {("a.txt", 3): "empty_prompt", ("a.txt", 4): "scoring_error",
                    ("b.txt", 1): "nonfinite_attention", ("c.jsonl", 1): "null_prompt",
                    ("c.jsonl", 2): "invalid_json", ("c.jsonl", 3): "missing_prompt_column"}


def _ledger(out: Path) -> tuple[dict, dict]:
    """``({(file, row): prompt} of risk.parquet, {(file, row): reason} of rejects.parquet)``, each row once."""
    import polars as pl

    risk, rejects = pl.read_parquet(out / "risk.parquet"), pl.read_parquet(out / "rejects.parquet")
    scored = {(Path(s).name, r): p for s, r, p in risk.select("source", "row", "prompt").rows()}
    rejected = {(Path(s).name, r): why for s, r, why in rejects.select("source", "row", "reason").rows()}
    assert len(scored) == risk.height and len(rejected) == rejects.height  # no row twice
    return scored, rejected


def _check_mixed_run(out: Path, manifest: dict) -> None:
    scored, rejected = _ledger(out)
    assert rejected == EXPECTED_REJECTS
    assert scored == {("a.txt", 0): "red cat", ("a.txt", 1): "blue dog", ("a.txt", 2): "red cat",
                      ("b.txt", 0): "blue dog", ("b.txt", 2): "green tree", ("c.jsonl", 0): "red cat"}
    c = manifest["counts"]
    assert (c["rows_read"], c["scored"], c["rejected"], c["unique_prompts"], c["duplicates"]) == (12, 6, 6, 3, 3)
    assert c["rejected_by_reason"] == {"empty_prompt": 1, "invalid_json": 1, "missing_prompt_column": 1,
                                       "nonfinite_attention": 1, "null_prompt": 1, "scoring_error": 1}
    assert list(c["rejected_by_reason"]) == sorted(c["rejected_by_reason"])  # as the manifest documents them


def test_every_row_of_a_mixed_run_is_in_one_table_and_counted_once(tmp_path, tiny_model_dir, monkeypatch):
    """A run over small files scored together (one group) and the same files one unit per group of one: each of the
    12 input rows is in risk.parquet or rejects.parquet exactly once, and the manifest's counts (read, scored,
    rejected by reason, unique prompts, duplicates) are those rows', whichever way the units were grouped."""
    from helpers import fail_batches_with, run_audit

    fail_batches_with(monkeypatch, "poison")
    _nan_for(monkeypatch, "nan")
    inputs = _mixed_inputs(tmp_path / "in")
    for name, unit_rows in (("grouped", 20_000), ("per_unit", 1)):
        out, manifest = run_audit([inputs], tiny_model_dir, tmp_path / name, device="cpu", unit_rows=unit_rows,
                                  max_error_fraction=1.0)
        _check_mixed_run(out, manifest)
        assert manifest["units"]["total"] == (3 if unit_rows > 1 else 12)


def test_a_new_command_forgets_a_swallowed_signal_an_earlier_command_took():
    """A SIGTERM swallowed by a finalizer (recorded in _PENDING) stops the command it arrived in
    (raise_pending_termination); the next command in the same process (audit.run called again after the
    caller handled the first Terminated) starts without it and is not stopped by it."""
    out = _python("""
import signal
from audit import faults
faults.terminate_as_interrupt()
class Finalized:
    def __del__(self):
        raise faults.Terminated(signal.SIGTERM)
Finalized()  # "Exception ignored in": the hook records it
try:
    faults.raise_pending_termination()
    print("not raised")
except faults.Terminated as exc:
    print("raised", exc.signame)
faults.raise_pending_termination()  # taken once
print("once")
faults._PENDING["signum"] = signal.SIGTERM  # swallowed at the end of an earlier command
faults.terminate_as_interrupt()
faults.raise_pending_termination()
print("forgotten")
""")
    assert out.split("\n")[:3] == ["raised SIGTERM", "once", "forgotten"]


def test_a_text_file_that_cannot_be_read_under_skip_bad_files_has_every_row_rejected(tmp_path, tiny_model_dir,
                                                                                     monkeypatch):
    """A .txt unit whose reads keep failing (an I/O error on a flaky mount, after planning counted its rows) under
    --skip-bad-files: each of its rows is an unreadable_rows reject naming the error (a text file has no row groups
    to read one at a time), none lost; the other file is scored."""
    import polars as pl

    import audit.unit
    from helpers import run_audit

    good, flaky = tmp_path / "a.txt", tmp_path / "b.txt"
    good.write_text("red cat\nblue dog\ngreen tree\n")
    flaky.write_text("one\ntwo\nthree\nfour\n")
    real = audit.unit.read_unit

    def read_unit(unit, *a, **k):
        if unit.url.endswith("b.txt"):
            raise OSError(5, "Input/output error")
        return real(unit, *a, **k)

    monkeypatch.setattr(audit.unit, "read_unit", read_unit)
    out, manifest = run_audit([good, flaky], tiny_model_dir, tmp_path / "run", device="cpu", skip_bad_files=True)
    rejects = pl.read_parquet(out / "rejects.parquet")
    assert sorted(rejects.select("row", "reason").rows()) == [(r, "unreadable_rows") for r in range(4)]
    assert set(rejects["source"]) == {str(flaky)} and all("Input/output error" in d for d in rejects["detail"])
    c = manifest["counts"]
    assert (c["rows_read"], c["scored"], c["rejected"], c["rejected_by_reason"]) == (7, 3, 4, {"unreadable_rows": 4})


def test_a_rejects_shard_removed_while_the_run_merges_stops_it_naming_the_shard(tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    """A unit's marker counts rejects but its rejects shard is gone when the final merge reads the shards: the run
    stops with the RunError that names the shard and says a rerun scores that unit again (not a manifest whose
    counts do not reconcile, or a rejects table short of that unit's rows)."""
    import pytest

    import audit.pipeline
    from audit.errors import RunError
    from helpers import run_audit

    path = tmp_path / "p.txt"
    path.write_text("red cat\n\nblue dog\n")
    real = audit.pipeline.reduce_shards

    def reduce_shards(shards, work, *a, **k):
        (shards[0].parent / "unit-000000.rejects.parquet").unlink()
        return real(shards, work, *a, **k)

    monkeypatch.setattr(audit.pipeline, "reduce_shards", reduce_shards)
    with pytest.raises(RunError, match=r"unit-000000\.rejects\.parquet is gone: a unit's rejects shard was removed "
                                       "while the run merged its outputs; rerun the same command"):
        run_audit([path], tiny_model_dir, tmp_path / "run", device="cpu")
    monkeypatch.undo()
    out, manifest = run_audit([path], tiny_model_dir, tmp_path / "run", device="cpu")  # the rerun mends it
    assert manifest["counts"]["rejected_by_reason"] == {"empty_prompt": 1} and manifest["counts"]["scored"] == 2


def test_a_group_that_cannot_store_its_scores_counts_each_prompt_not_stored_once(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    """Three small files scored together (one group) into a cache whose folder cannot take new parts (a full disk):
    the manifest's one warning counts the 5 prompts not stored, once, not once per unit of the group (the units share
    the group's cache notes; only the first carries the counted one)."""
    import errno

    from audit.cache import ScoreCache
    from helpers import run_audit

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ScoreCache, "_put_lock", full)
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_text("red cat\nblue dog\n")
    (inputs / "b.txt").write_text("green tree\nred cat\n")
    (inputs / "c.txt").write_text("old city\nsmall house\n")
    out, manifest = run_audit([inputs], tiny_model_dir, tmp_path / "run", device="cpu", cache=str(tmp_path / "cache"))
    assert manifest["units"]["total"] == 3 and manifest["counts"]["scored"] == 6
    [warning] = manifest["cache"]["warnings"]
    assert warning.startswith("score cache: cannot store 5 new scores in ") and "No space left on device" in warning


def test_a_group_scored_beside_a_blocked_cache_counts_no_hit(tmp_path, tiny_model_dir):
    """Two files scored together (one group) sharing a prompt, with a --cache whose key folder is a file (the run
    scores without it and warns): the manifest's cache figures count only units that used the cache, so no hit and
    nothing sent through it, both units without it (the second file's repeat of the first's prompt is no hit)."""
    import shutil

    from helpers import run_audit

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_text("red cat\nblue dog\n")
    (inputs / "b.txt").write_text("red cat\ngreen tree\n")
    cache = tmp_path / "cache"
    _, first = run_audit([inputs / "a.txt"], tiny_model_dir, tmp_path / "r1", device="cpu", cache=str(cache))
    assert first["cache"]["scored"] == 2
    key = next(cache.iterdir())
    shutil.rmtree(key)
    key.write_text("not a folder")
    _, manifest = run_audit([inputs], tiny_model_dir, tmp_path / "r2", device="cpu", cache=str(cache))
    assert manifest["units"]["total"] == 2 and manifest["counts"]["scored"] == 4
    figures = {k: manifest["cache"][k] for k in ("hits", "scored", "units_without_cache")}
    assert figures == {"hits": 0, "scored": 0, "units_without_cache": 2}


def test_a_rejects_shard_emptied_while_the_run_merges_is_not_a_clean_manifest(tmp_path, tiny_model_dir, monkeypatch):
    """A unit's marker counts a reject but its rejects shard holds no row when the final merge reads it (overwritten
    meanwhile): the manifest counts the rows rejects.parquet holds, so its counts do not reconcile and no manifest
    is written, rather than one that counts a reject rejects.parquet does not hold."""
    import pyarrow.parquet as pq
    import pytest

    import audit.pipeline
    from audit.errors import SchemaError
    from audit.tables import arrow_schema
    from helpers import run_audit

    path = tmp_path / "p.txt"
    path.write_text("red cat\n\nblue dog\n")
    real = audit.pipeline.reduce_shards

    def reduce_shards(shards, work, *a, **k):
        pq.write_table(arrow_schema("rejects").empty_table(), shards[0].parent / "unit-000000.rejects.parquet")
        return real(shards, work, *a, **k)

    monkeypatch.setattr(audit.pipeline, "reduce_shards", reduce_shards)
    with pytest.raises(SchemaError, match=r"counts do not reconcile: read 3 != scored 2 \+ rejected 0"):
        run_audit([path], tiny_model_dir, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_a_file_whose_unit_fails_to_read_is_not_read_further_in_its_group(tmp_path, monkeypatch):
    """prepare_group reads a file's units in order and stops at the first that fails (the stream of a CSV or
    compressed file is no longer where its next unit starts): the failure is raised and the file's later units are
    never read; another file of the group is read whole."""
    import pytest

    import audit.unit
    from audit.config import RunConfig
    from audit.sources import Unit
    from audit.unit import UnitGroup, prepare_group

    units = [Unit(i, "a.csv", "csv", 2 * i, 2 * i + 2) for i in range(3)] + [Unit(3, "b.csv", "csv", 0, 2)]
    read = []

    def prepare_unit(unit, cfg):
        read.append((unit.url, unit.index))
        if unit.index == 0:
            raise OSError("cut short")
        return audit.unit._Prepared(rows_read=unit.rows)

    monkeypatch.setattr(audit.unit, "prepare_unit", prepare_unit)
    with pytest.raises(OSError, match="cut short"):
        prepare_group(UnitGroup(tuple(units), 8), RunConfig(inputs=("x",)))
    assert sorted(read) == [("a.csv", 0), ("b.csv", 3)]


def test_the_open_file_limit_is_named_as_ulimit_prints_it(monkeypatch):
    """The open-file limit in the message is what ``ulimit -n`` prints: the soft limit's number, ``unlimited`` for
    RLIM_INFINITY (not its value, -1 or 2**64 - 1), ``?`` where it cannot be read."""
    import errno
    import resource

    from audit import faults

    emfile = OSError(errno.EMFILE, "Too many open files")
    for soft, shown in ((1024, "1024"), (resource.RLIM_INFINITY, "unlimited")):
        monkeypatch.setattr(resource, "getrlimit", lambda which, soft=soft: (soft, resource.RLIM_INFINITY))
        assert faults.files_limit_problem(emfile) == f"the process reached its open-file limit (ulimit -n {shown})"

    def unreadable(which):
        raise OSError("no limits here")

    monkeypatch.setattr(resource, "getrlimit", unreadable)
    assert faults.files_limit_problem(emfile) == "the process reached its open-file limit (ulimit -n ?)"
