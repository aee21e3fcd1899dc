"""Behaviours of the score cache, the fault handling, the local engine, the Python API and the runner's planning and
progress that a mutation review found no test pinned: the cache key's formula, a cache folder gone before its
compaction, a part rewritten in place, a compaction running between a lookup's listing and its read, a store that
fails, what compaction merges, counts and keeps, the schema messages, cache hits as progress; which errors a unit is
not retried on, a stall whose interrupt was swallowed; the local engine's single read of each unit and its watchdog's
heartbeat; audit.run's default folder and audit.score's silence; the unit split for workers, the plain progress
lines, the model's identity records, the inputs-changed check, an empty input's model load, ``--model lab`` and the
planning warnings. Each expected value is derived by hand from the inputs the test writes."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.cache import SCORE_COLUMNS, ScoreCache, cached_scores
from audit.errors import RunError
from helpers import CACHE_HASHES, filled_cache, flip_a_bit_in_the_risk_page, prompts_file, run_audit

SC = {"scorer": "attention_entropy", "seed": 0}


# ---- the score cache (audit.cache)


def test_the_cache_key_hashes_the_format_and_the_configuration_whatever_the_key_order(monkeypatch):
    """The folder name is ``<fingerprint>-<blake2b-8 of the sorted JSON of {cache_format, score_config}>``: the
    same configuration built in another key order names the same folder, and a bump of CACHE_FORMAT a new one
    (entries written by an older memaudit are never mixed with new ones)."""
    import audit.cache
    from audit.cache import CACHE_FORMAT, cache_key

    text = f'{{"cache_format": {CACHE_FORMAT}, "score_config": {{"a": 2, "b": [1, "x"]}}}}'
    expected = "fp-" + hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    assert cache_key("fp", {"b": [1, "x"], "a": 2}) == cache_key("fp", {"a": 2, "b": [1, "x"]}) == expected
    monkeypatch.setattr(audit.cache, "CACHE_FORMAT", CACHE_FORMAT + 1)
    assert cache_key("fp", {"a": 2, "b": [1, "x"]}) != expected


def test_a_cache_folder_gone_before_the_runs_end_is_noted_and_not_compacted(tmp_path):
    """ScoreCache.existing on a key folder that is no longer a folder (removed, or a file put in its place) is
    unusable with one note saying it was not compacted; compact() then does nothing and creates nothing."""
    for make in (None, "file"):
        root = tmp_path / f"root-{make}"
        root.mkdir()
        if make:
            (root / "fp-key").write_text("not a folder")
        cache = ScoreCache.existing(root, "fp-key")
        folder = root / "fp-key"
        assert cache.unusable == f"{folder} is not a folder"
        assert cache.notes == [f"score cache: {folder} is not a folder (any more); it was not compacted"]
        assert cache.compact(max_files=0) == 0 and len(cache.notes) == 1 and cache.files() == []
        assert sorted(p.name for p in root.iterdir()) == (["fp-key"] if make else [])


def test_a_part_rewritten_in_place_after_its_check_is_checked_again(tmp_path):
    """A part's schema check is remembered by (name, size, mtime): a part replaced in place under the same name
    by one without the risk column (a sync tool, a hand edit) is checked again and set aside, never read with
    its risk filled with nulls."""
    cache = filled_cache(tmp_path / "cache")
    assert cache.lookup(CACHE_HASHES).num_rows == 12  # every part checked
    victim = cache.files()[0]
    table = pq.read_table(victim)
    gone = sorted(table.column("prompt_hash").to_pylist())
    pq.write_table(table.drop_columns(["risk"]), victim)
    again = ScoreCache(tmp_path / "cache", "fp", SC)  # a later unit of the same process
    found = again.lookup(CACHE_HASHES)
    assert found.num_rows == 8 and found.column("risk").null_count == 0
    assert sorted(found.column("prompt_hash").to_pylist()) == sorted(set(CACHE_HASHES) - set(gone))
    assert (again.dir / "damaged" / victim.name).exists()
    assert again.notes == [f"score cache: {victim} cannot be read (ValueError: its schema is not the cache's: no "
                           f"column risk); moved to {again.dir / 'damaged' / victim.name}; its prompts are scored "
                           "again"]


def test_a_compaction_between_listing_and_reading_is_read_again_and_three_misses_give_up(tmp_path, monkeypatch):
    """Another run compacts the parts after a lookup listed them: the lookup lists again and finds all 12
    entries in the merged part, with no note. Files that vanish three times in a row make the cache unusable for
    the run (one note), never an error."""
    cache = filled_cache(tmp_path / "cache")
    real = ScoreCache._read
    calls = []

    def compacted_meanwhile(files, want, schema=None):
        calls.append(len(files))
        if len(calls) == 1:
            assert ScoreCache(tmp_path / "cache", "fp", SC).compact(max_files=0) == 3
        return real(files, want, schema)

    monkeypatch.setattr(ScoreCache, "_read", staticmethod(compacted_meanwhile))
    found = cache.lookup(CACHE_HASHES)
    assert sorted(found.column("risk").to_pylist()) == [float(i) for i in range(12)]
    assert calls == [3, 1] and cache.notes == [] and not cache.unusable

    def vanishing(files, want, schema=None):
        calls.append(len(files))
        raise FileNotFoundError(files[0])

    calls.clear()
    monkeypatch.setattr(ScoreCache, "_read", staticmethod(vanishing))
    assert cache.lookup(CACHE_HASHES).num_rows == 0 and calls == [1, 1, 1]
    assert cache.unusable == f"{cache.dir}: its files kept changing while read"
    assert cache.notes == [f"score cache: {cache.dir}: its files kept changing while read; scoring without the cache"]


def test_a_part_that_vanishes_while_the_parts_are_read_one_by_one_is_no_damage(tmp_path, monkeypatch):
    """When the read of all parts fails (a damaged page somewhere) they are read one by one; a part removed
    meanwhile (by a concurrent compaction) is skipped without a note: it was not damaged, nor unreadable."""
    cache = filled_cache(tmp_path / "cache")
    victim = cache.files()[1]
    kept = sorted(set(CACHE_HASHES) - set(pq.read_table(victim).column("prompt_hash").to_pylist()))
    real = ScoreCache._read

    def read(files, want, schema=None):
        if len(files) > 1:
            victim.unlink()
            raise OSError("Corrupt page")  # as pyarrow says it, no errno
        return real(files, want, schema)

    monkeypatch.setattr(ScoreCache, "_read", staticmethod(read))
    found = cache.lookup(CACHE_HASHES)
    assert sorted(found.column("prompt_hash").to_pylist()) == kept and len(kept) == 8
    assert cache.notes == [] and not (cache.dir / "damaged").exists()


def test_a_store_that_fails_is_a_note_and_leaves_no_file(tmp_path, monkeypatch):
    """A full disk while storing new scores: put() raises nothing (the run has the scores), notes how many were
    not stored and why, and leaves neither a part nor a temporary file."""
    cache = ScoreCache(tmp_path / "cache", "fp", SC)

    def full(table, where, **kw):
        Path(where).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    cache.put(CACHE_HASHES[:2], {c: np.ones(2) for c in SCORE_COLUMNS}, [[]] * 2)
    assert cache.notes == [f"score cache: cannot store 2 new scores in {cache.dir} (OSError: [Errno 28] No space "
                           "left on device); they are in this run's table, and scored again next time"]
    assert sorted(p.name for p in cache.dir.iterdir()) == ["key.json"]


def test_quarantine_damaged_returns_the_parts_it_moved_this_time(tmp_path):
    """quarantine_damaged moves the parts whose schema is not the cache's and returns their new paths; a second
    call, with nothing left to move, returns none."""
    cache = filled_cache(tmp_path / "cache")
    victim = cache.files()[2]
    table = pq.read_table(victim)
    pq.write_table(table.set_column(table.schema.get_field_index("risk"), "risk",
                                    table.column("risk").cast(pa.float32())), victim)
    assert cache.quarantine_damaged() == [cache.dir / "damaged" / victim.name]
    assert cache.quarantine_damaged() == [] and len(cache.files()) == 2


def test_compaction_leaves_a_link_named_like_a_stale_temporary_file(tmp_path):
    """Stale temporary files of killed writes are removed; a link with such a name (not a write of ours) is
    left, as is what it points to."""
    import os

    from audit.cache import STALE_TMP_S

    cache = filled_cache(tmp_path / "cache")
    target = tmp_path / "elsewhere.bin"
    target.write_bytes(b"someone's file")
    link = cache.dir / ".part-link.parquet.ab.tmp"
    link.symlink_to(target)
    stale = cache.dir / ".part-x.parquet.cd.tmp"
    stale.write_bytes(b"half a file")
    old = time.time() - STALE_TMP_S - 60
    for p in (target, stale):
        os.utime(p, (old, old))
    assert cache.compact(max_files=0) == 3
    assert link.is_symlink() and target.read_bytes() == b"someone's file" and not stale.exists()


def test_compaction_counts_and_deletes_only_the_parts_it_merged(tmp_path, monkeypatch):
    """Of 4 parts (3 entries each): one with a corrupt page is moved aside, one that cannot be opened now
    (permission) stays in place with its entries; compact() returns 2, the parts really merged, and only they are
    deleted: the merged part and the untouched one hold the 9 entries that were readable."""
    cache = filled_cache(tmp_path / "cache", parts=4)
    parts = cache.files()
    corrupt, locked = parts[0], parts[1]
    entries = {p: sorted(pq.read_table(p).column("prompt_hash").to_pylist()) for p in parts}
    flip_a_bit_in_the_risk_page(corrupt)
    real = pq.ParquetFile

    def parquet_file(path, *a, **kw):
        if Path(path) == locked and kw.get("page_checksum_verification"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(pq, "ParquetFile", parquet_file)
    assert cache.compact(max_files=0) == 2
    monkeypatch.setattr(pq, "ParquetFile", real)
    assert locked.exists() and not corrupt.exists() and (cache.dir / "damaged" / corrupt.name).exists()
    assert not any(p.exists() for p in parts[2:])
    fresh = ScoreCache(tmp_path / "cache", "fp", SC)
    assert sorted(fresh.lookup(CACHE_HASHES).column("prompt_hash").to_pylist()) == sorted(
        entries[locked] + entries[parts[2]] + entries[parts[3]])


def test_the_schema_difference_names_what_differs():
    """The note says which columns are missing (the first three, then '...'), else the first column of another
    type, else that other columns or metadata differ."""
    from audit.cache import _schema, _schema_difference

    want = _schema()
    names = want.names
    risk = want.get_field_index("risk")
    assert _schema_difference(pa.schema([f for f in want if f.name != "risk"])) == "no column risk"
    assert _schema_difference(pa.schema(list(want)[3:])) == f"no column {names[0]}, {names[1]}, {names[2]}"
    assert _schema_difference(pa.schema(list(want)[4:])) == f"no column {names[0]}, {names[1]}, {names[2]} ..."
    assert _schema_difference(want.set(risk, pa.field("risk", pa.float32()))) == "column risk is float, not double"
    assert _schema_difference(want.append(pa.field("other", pa.int64()))) == "other columns or metadata"


def test_cache_hits_count_as_progress(tmp_path):
    """The hits of a lookup are reported to the progress callback at once (the misses by the scorer): 2 of 4
    prompts cached, a scorer that reports nothing, so the callback hears 2."""
    cache = ScoreCache(tmp_path / "cache", "fp", SC)
    cache.put(CACHE_HASHES[:2], {c: np.zeros(2) for c in SCORE_COLUMNS}, [[]] * 2)
    heard = []

    def score_fn(ps):
        return {c: np.ones(len(ps)) * (c != "nonfinite") for c in SCORE_COLUMNS}, [[] for _ in ps], {}

    scores, _, errors, hits = cached_scores(cache, list("abcd"), CACHE_HASHES[:4], score_fn, progress=heard.append)
    assert (heard, hits, errors) == ([2], 2, {}) and scores["risk"].tolist() == [0.0, 0.0, 1.0, 1.0]


# ---- fault handling (audit.faults) and the local engine


class _Unit:
    index, url, start, stop = 7, "logs/a.parquet", 0, 20


@pytest.mark.parametrize("error", [RunError("10 rows planned, 1 read"), "capture"])
def test_run_errors_and_incomplete_captures_are_not_retried(error):
    """A RunError (a unit that read other rows than planned) and an incomplete attention capture (a broken
    scorer) fail at once, as they are: retrying cannot mend them."""
    from audit.errors import IncompleteCaptureError
    from audit.faults import run_unit_with_retries

    exc = IncompleteCaptureError("layer 3 missing") if error == "capture" else error
    calls = []

    def fn():
        calls.append(1)
        raise exc

    with pytest.raises(type(exc)) as got:
        run_unit_with_retries(fn, _Unit(), retries=2)
    assert got.value is exc and calls == [1]


def test_a_units_last_error_is_quoted_up_to_300_characters():
    from audit.faults import run_unit_with_retries

    long = "x" * 299 + "yz"

    def fn():
        raise OSError(long)

    with pytest.raises(RunError) as got:
        run_unit_with_retries(fn, _Unit(), retries=2)
    assert str(got.value) == (f"unit 7 (logs/a.parquet rows 0-20) failed 3 times, last with OSError: {'x' * 299}y; "
                              "finished units are kept: rerun the same command to resume")


def test_a_stall_whose_interrupt_was_swallowed_fails_the_run_and_is_interrupted_once(monkeypatch):
    """On a fake clock that stands still after 1 s without progress (timeout 0.4 s): the watchdog interrupts the
    main thread once (it counts the stall from then on, and the clock does not move), and a block that swallowed
    the interrupt and ended normally still fails with the stall message."""
    import signal
    import threading

    import audit.faults
    from audit.faults import StallWatchdog

    sent = []
    monkeypatch.setattr(audit.faults.signal, "pthread_kill", lambda ident, sig: sent.append((ident, sig)))
    now = [0.0]
    with pytest.raises(RunError, match=r"^the run made no progress for 0.4 s \(--stall-timeout\); finished units"):
        with StallWatchdog(0.4, clock=lambda: now[0]) as watchdog:
            now[0] = 1.0
            deadline = time.monotonic() + 30
            while not watchdog.fired and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(1.0)  # about ten more polls of the watchdog
    assert sent == [(threading.main_thread().ident, signal.SIGINT)]


def test_a_watchdog_entered_off_the_main_thread_never_interrupts_the_main_thread(monkeypatch):
    """audit.run called from a worker thread (a web server, a notebook's background job): its SIGINT would land in
    the caller's main thread, which is not running the audit (on a stall the main thread got one KeyboardInterrupt
    a second while the stalled run went on). Off the main thread the stall is recorded, never signalled, and the
    block still fails with the stall message when it ends. The signal set-up the engines do there is a no-op (a
    signal handler can be set in the main thread only)."""
    import threading

    import audit.faults
    from audit.faults import StallWatchdog, sigint_raises, terminate_as_interrupt

    sent, got = [], []
    monkeypatch.setattr(audit.faults.signal, "pthread_kill", lambda ident, sig: sent.append((ident, sig)))
    now = [0.0]

    def worker():
        try:
            terminate_as_interrupt()
            with sigint_raises(), StallWatchdog(0.4, clock=lambda: now[0]) as watchdog:
                now[0] = 1.0
                deadline = time.monotonic() + 30
                while not watchdog.fired and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.3)
        except RunError as exc:
            got.append(str(exc))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(60)
    assert sent == [] and got == ["the run made no progress for 0.4 s (--stall-timeout); finished units are kept: "
                                  "rerun the same command to resume"]


def test_the_local_engine_reads_each_unit_once_and_its_progress_feeds_the_watchdog(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    """12 prompts in units of 4: each unit is read once (the read-ahead is what the unit scores, not read again),
    every progress report also beats the stall watchdog (one beat on entering it, then one per report: 12 rows
    in 4-row batches, 3 reports), and a rerun of the finished folder says it resumes all 3 units."""
    import audit.engines.local as local
    import audit.unit
    from audit.faults import StallWatchdog

    reads, beats = [], []
    real_read = audit.unit.read_unit

    def read_unit(unit, *a, **k):
        reads.append(unit.index)
        return real_read(unit, *a, **k)

    class Counting(StallWatchdog):
        def beat(self):
            beats.append(1)
            super().beat()

    monkeypatch.setattr(audit.unit, "read_unit", read_unit)
    monkeypatch.setattr(local, "StallWatchdog", Counting)
    src = prompts_file(tmp_path / "p.txt", 12)
    out = tmp_path / "run"
    _, manifest = run_audit([src], tiny_model_dir, out, device="cpu", unit_rows=4, batch_size=4, stall_timeout=600)
    assert manifest["counts"]["scored"] == 12 and sorted(reads) == [0, 1, 2]
    assert len(beats) == 1 + 3
    from audit.pipeline import RunConfig
    from audit.runner import execute

    logs = []
    execute(RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(out), device="cpu", unit_rows=4,
                      batch_size=4), progress=False, log=logs.append)
    assert f"memaudit: resuming {out}: 3 of 3 units already done" in logs


# ---- the Python API (audit.api)


def test_run_without_out_writes_a_time_stamped_folder_under_memaudit_runs(tmp_path, tiny_model_dir, monkeypatch):
    import audit

    src = prompts_file(tmp_path / "p.txt", 2)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out, manifest = audit.run(src, model=str(tiny_model_dir), device="cpu", log=lambda m: None)
    assert out.parent == Path("memaudit-runs") and len(out.name) == len("20261205-101500")
    assert (work / out / "risk.parquet").exists() and manifest["counts"]["scored"] == 2
    assert sorted(p.name for p in work.iterdir()) == ["memaudit-runs"]


def test_score_with_the_bundled_lab_model_prints_nothing(capfd):
    """README: with no model, audit.score() uses the lab model "without printing" (the CLI says it in a line)."""
    import audit

    df = audit.score(["a red cat on a beach"])
    assert df["risk"].is_not_null().all()
    out, err = capfd.readouterr()
    assert "memaudit" not in out + err


# ---- the runner: planning, units, progress, identity


def test_units_are_not_split_when_there_are_as_many_as_workers_or_one_row(tmp_path):
    """Two files (3 and 17 rows) are already 2 units for 2 workers: unchanged, no log line. One row for 4 workers
    is one unit whatever its size: unchanged, no log line."""
    from audit.config import RunConfig
    from audit.pipeline import build_plan
    from audit.runner import _units_for_workers

    def workers(n):
        return SimpleNamespace(worker_count=lambda cfg: n)

    (tmp_path / "a.txt").write_text("".join(f"a{i}\n" for i in range(3)))
    (tmp_path / "b.txt").write_text("".join(f"b{i}\n" for i in range(17)))
    (tmp_path / "c.txt").write_text("c0\n")
    logs: list[str] = []
    two = RunConfig(inputs=(str(tmp_path / "a.txt"), str(tmp_path / "b.txt")))
    plan = build_plan(two)
    assert [u.rows for u in plan.units] == [3, 17]
    assert _units_for_workers(two, plan, workers(2), logs.append) == (two, plan)
    one = RunConfig(inputs=(str(tmp_path / "c.txt"),))
    plan = build_plan(one)
    assert _units_for_workers(one, plan, workers(4), logs.append) == (one, plan) and logs == []


def test_plain_progress_lines_on_a_fake_clock(monkeypatch):
    """Not a terminal, no --progress choice: a line when ``every_s`` (5 s) passed since the last line (or the
    start), with rows done, percent, the rate since the start and the time left at that rate; none at 100%."""
    import rich.console

    import audit.runner
    from audit.runner import _Progress

    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: False))
    now = [0.0]
    monkeypatch.setattr(audit.runner, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    lines: list[str] = []
    bar = _Progress(1000, None, lines.append, every_s=5)
    for t, n in ((3, 100), (8, 300), (10, 100), (14, 100), (30, 400)):
        now[0] = t
        bar.advance(n)
    # t=8: 400 rows in 8 s = 50 rows/s, 600 left = 12 s; t=10: 2 s after that line; t=14: 600 in 14 s = 42.9/s,
    # 400 left = 9.3 s; t=30: all done
    assert lines == ["memaudit: 400 of 1,000 rows (40%), 50 rows/s, about 12s left",
                     "memaudit: 600 of 1,000 rows (60%), 43 rows/s, about 9s left"]
    quiet = _Progress(1000, False, lines.append, every_s=0)
    quiet.advance(10)
    assert len(lines) == 2


def test_the_models_identity_records_the_dtype_bare_and_the_run_options_in_its_score_config():
    import torch

    from audit.config import RunConfig
    from audit.runner import model_info, score_config_for

    info = model_info("m", "fp", Path("/m"), torch.device("cpu"), torch.bfloat16, {"class": "T"})
    assert info == {"name": "m", "fingerprint": "fp", "path": "/m", "device": "cpu", "dtype": "bfloat16",
                    "tokenizer": {"class": "T"}}
    cfg = RunConfig(inputs=("x",), scorer="noise_magnitude", noise_draws=3, seed=5, steps=20,
                    noise_generator="philox")
    sc = score_config_for(cfg, ["d.attn2"], torch.float16)
    assert (sc.scorer, sc.layers, sc.noise_draws, sc.seed, sc.num_inference_steps, sc.dtype, sc.noise_generator) == (
        "noise_magnitude", ("d.attn2",), 3, 5, 20, "float16", "philox")
    assert score_config_for(RunConfig(inputs=("x",), layers=("u.attn2",)), ["d.attn2"], "float32").layers == (
        "u.attn2",)


def test_the_tokenizer_identity_hashes_every_tokenizer_folder_by_name_and_content(tmp_path):
    """SHA-256 over ``<folder>/<file>\\0`` and the bytes of each file of each ``tokenizer*`` folder, sorted,
    first 16 hex: SDXL's tokenizer_2 counts, and so does a file's name."""
    from audit.runner import tokenizer_identity

    for folder, name, data in (("tokenizer", "vocab.json", b"{}"), ("tokenizer_2", "merges.txt", b"a b"),
                               ("text_encoder", "config.json", b"not hashed")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(data)
    expected = hashlib.sha256(b"tokenizer/vocab.json\0{}tokenizer_2/merges.txt\0a b").hexdigest()[:16]
    ident = tokenizer_identity(tmp_path, tokenizer=SimpleNamespace(is_fast=True))
    assert (ident["files_sha256"], ident["class"], ident["fast"]) == (expected, "SimpleNamespace", True)
    (tmp_path / "tokenizer_2" / "merges.txt").rename(tmp_path / "tokenizer_2" / "merges2.txt")
    assert tokenizer_identity(tmp_path, tokenizer=SimpleNamespace())["files_sha256"] == hashlib.sha256(
        b"tokenizer/vocab.json\0{}tokenizer_2/merges2.txt\0a b").hexdigest()[:16]


def test_inputs_changed_or_gone_are_named_three_at_most(tmp_path):
    """Every input is checked (not only the first); a vanished one reads 'gone'; three are named, a fourth is
    '...'."""
    from audit.runner import check_inputs_unchanged
    from audit.sources import file_version

    files = [tmp_path / f"{i}.txt" for i in range(5)]
    for f in files:
        f.write_text("a red cat\n")
    versions = {str(f): file_version(str(f)) for f in files}
    check_inputs_unchanged(versions)  # nothing changed: no error
    files[1].unlink()
    with pytest.raises(RunError) as err:
        check_inputs_unchanged(versions)
    assert str(err.value).startswith(f"1 input file(s) changed while the run read them: {files[1]} "
                                     f"({versions[str(files[1])]} -> gone); their rows may mix")
    changed = {str(f): "old" for f in files[2:]}
    with pytest.raises(RunError) as err:
        check_inputs_unchanged(changed)
    assert str(err.value).startswith("3 input file(s) changed") and "; their rows" in str(err.value)
    assert " ...;" not in str(err.value)
    changed["gone.txt"] = "old"
    with pytest.raises(RunError) as err:
        check_inputs_unchanged(changed)
    assert str(err.value).startswith("4 input file(s) changed") and "gone.txt" not in str(err.value)
    assert " ...; their rows may mix" in str(err.value)


def test_an_empty_input_answers_without_loading_the_model_and_two_ray_only_flags_are_named(tmp_path,
                                                                                             tiny_model_dir,
                                                                                             monkeypatch):
    import audit.models
    from audit.pipeline import RunConfig
    from audit.runner import execute

    loads = []
    real = audit.models.load_model
    monkeypatch.setattr(audit.models, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    logs: list[str] = []
    _, manifest = execute(RunConfig(inputs=(str(empty),), model=str(tiny_model_dir), out=str(tmp_path / "r"),
                                    device="cpu", workers=2, address="ray://head:10001"), progress=False,
                          log=logs.append)
    assert loads == [] and manifest["counts"]["rows_read"] == 0
    assert "memaudit: --workers and --address apply to --engine ray only; ignored with --engine local" in logs


def test_model_lab_is_a_folder_named_lab_when_there_is_one_and_the_lab_figure(tmp_path, monkeypatch):
    """``--model lab`` is the bundled lab model unless the working directory holds a folder named lab; the no
    --model line quotes the lab's test AUROC (0.48, README), and a folder without that record adds nothing."""
    from audit.lab import LAB_MODEL_DIR
    from audit.runner import _lab_figure, model_argument

    monkeypatch.chdir(tmp_path)
    assert model_argument("lab") == str(LAB_MODEL_DIR)
    (tmp_path / "lab").mkdir()
    assert model_argument("lab") == "lab"
    assert _lab_figure(str(LAB_MODEL_DIR)) == " (attention_entropy test AUROC 0.48 on its own lab, `memaudit docs lab`)"
    assert _lab_figure(str(tmp_path / "lab")) == ""


def test_the_planning_warnings_name_txt_files_for_an_id_column_and_list_at_most_8_columns(tmp_path):
    """A .txt file has no --id-column (its rows are rejected as missing_id_column: warned); a file without the
    prompt column shows its first 8 columns and the count; with the default --prompt-column, .txt inputs beside
    tables need no warning."""
    from audit.config import RunConfig
    from audit.pipeline import build_plan
    from audit.runner import missing_column_note, missing_id_column_note, txt_column_note

    txt = tmp_path / "a.txt"
    txt.write_text("a red cat\na dog\n")
    pq.write_table(pa.table({"prompt": ["x", "y", "z"], "uid": ["1", "2", "3"]}), tmp_path / "b.parquet")
    wide = tmp_path / "c.parquet"
    pq.write_table(pa.table({f"c{i}": ["x", "y"] for i in range(10)}), wide)
    plan = build_plan(RunConfig(inputs=(str(txt), str(tmp_path / "b.parquet"), str(wide)), id_column="uid"))
    # (c.parquet lacks 'uid' too, but its rows are rejected as missing_prompt_column, the note below)
    assert missing_id_column_note(plan, "uid") == (
        f"1 of 3 input files has no column 'uid', so its 2 rows are rejected as missing_id_column; the first: "
        f"{txt} (columns: prompt)")
    assert missing_column_note(plan, "prompt") == (
        f"1 of 3 input files has no column 'prompt', so its 2 rows are rejected as missing_prompt_column; the first: "
        f"{wide} (columns: c0, c1, c2, c3, c4, c5, c6, c7, ... (10 in all))")
    assert txt_column_note(plan, "prompt") is None
