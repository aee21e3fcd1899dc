"""Behaviours of the run path (audit.unit, audit.pipeline, audit.runner, audit.cache) that a mutation review found no
test pinned: what a unit records it was scored with (nothing when the model scored none of its prompts; the batch size
as halved after an out-of-memory error), and the other gaps listed with each test. Each expected value is derived
by hand from the inputs the test writes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from audit.config import RunConfig
from helpers import prompts_file, run_audit


def _markers(out: Path) -> list[dict]:
    """The units' ``.done.json`` stats of run folder ``out``, in unit order."""
    return [json.loads(p.read_text())["stats"] for p in sorted((out / "shards").glob("unit-*.done.json"))]


# ---- what a unit was scored with (audit.unit.scored_with, UnitStats.scored_with)


def test_a_unit_the_model_scored_nothing_of_records_no_settings(tmp_path, tiny_model_dir):
    """A unit whose rows were all rejected before scoring, and every unit of a rerun served wholly from --cache, record
    ``scored_with`` {}: the model scored none of their prompts, so no batch size, device or --compile of theirs can
    mix with another's; a unit the model scored records them."""
    import torch

    src = tmp_path / "p.txt"
    src.write_text("   \n \t \na red cat 1\na blue dog 2\n")  # unit 0: two blank prompts; unit 1: two prompts
    cache = tmp_path / "cache"
    out, manifest = run_audit([src], tiny_model_dir, tmp_path / "one", device="cpu", unit_rows=2, batch_size=2,
                              cache=str(cache))
    device = f"cpu:{torch.get_num_threads()}"
    assert [m["scored_with"] for m in _markers(out)] == [
        {}, {"batch_size": 2, "compile": False, "device": device, "engine": "local"}]
    assert [(m["rows_read"], m["scored"], m["unique_scored"], m["cache_hits"]) for m in _markers(out)] == [
        (2, 0, 0, 0), (2, 2, 2, 0)]
    assert manifest["counts"]["rejected_by_reason"] == {"empty_prompt": 2}
    # again into a new folder with another batch size: both prompts come from the cache, nothing is scored
    out, manifest = run_audit([src], tiny_model_dir, tmp_path / "two", device="cpu", unit_rows=2, batch_size=3,
                              cache=str(cache))
    assert [(m["cache_hits"], m["scored_with"]) for m in _markers(out)] == [(0, {}), (2, {})]
    assert manifest["cache"]["hits"] == 2 and manifest["cache"]["scored"] == 0
    # the run's settings are those the cached scores were computed with (their part records them), not none
    assert [m["served_with"] for m in _markers(out)] == [
        {}, {"batch_size": [2], "compile": [False], "device": [device], "engine": ["local"]}]
    assert manifest["scored_with"]["batch_size"] == [2] and manifest["scored_with"]["mixed"] == []


def test_scored_with_records_the_batch_size_as_halved_after_out_of_memory():
    """``scored_with`` records the batch size the unit was scored at: the given one, lowered to the scorer's
    ``max_batch`` once an out-of-memory error halved it (a later unit of the run is scored at the halved size); with
    ``--batch-size auto`` the size auto chose, halved the same way, or "auto" when it was never resolved."""
    import torch

    from audit.unit import scored_with

    cfg = RunConfig(inputs=("x",), batch_size=16)
    model = SimpleNamespace(device=torch.device("cpu"))
    device = f"cpu:{torch.get_num_threads()}"
    assert scored_with(SimpleNamespace(model=model), cfg) == {"batch_size": 16, "compile": False, "device": device,
                                                              "engine": "local"}
    assert scored_with(SimpleNamespace(model=model, max_batch=4), cfg)["batch_size"] == 4
    assert scored_with(SimpleNamespace(model=model, max_batch=32), cfg)["batch_size"] == 16
    auto = RunConfig(inputs=("x",), batch_size="auto")
    assert scored_with(SimpleNamespace(model=model, chosen_batch_size=24), auto)["batch_size"] == 24
    assert scored_with(SimpleNamespace(model=model, chosen_batch_size=24, max_batch=12), auto)["batch_size"] == 12
    assert scored_with(SimpleNamespace(model=model, compiled=True), auto) == {
        "batch_size": "auto", "compile": True, "device": device, "engine": "local"}


# ---- progress (audit.unit.process_unit's progress callback: input rows done)


def test_a_units_progress_counts_every_input_row_once(tmp_path, scorer):
    """``progress(n)`` gets input rows: rows rejected before scoring at once, then each scored batch's unique prompts
    times the unit's rows per unique prompt. Six rows (two blank, three of one prompt, one other) report 2 for the
    blanks, then 6 - 2 = 4 for the two unique prompts (2 rows each on average): 6 in all, the bar's total."""
    from audit.sources import Unit
    from audit.unit import process_unit

    src = tmp_path / "p.txt"
    src.write_text("  \na red cat\na red cat\n\t\na red cat\na blue dog\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    seen: list[int] = []
    cfg = RunConfig(inputs=(str(src),), batch_size=1)
    stats = process_unit(Unit(0, str(src), "txt", 0, 6), scorer, cfg, shards, progress=seen.append)
    assert (stats.rows_read, stats.scored, stats.rejected_by_reason, stats.unique_scored) == (
        6, 4, {"empty_prompt": 2}, 2)
    assert seen == [2, 2, 2] and sum(seen) == 6  # the blanks, then one unique prompt a batch (batch size 1)


# ---- finalize (audit.pipeline)


def test_shards_no_more_than_the_fan_in_are_merged_in_one_pass(tmp_path):
    """reduce_shards merges until the shards fit one merge: with exactly fan_in full shards (here of batch_rows =
    1 row; an empty shard counts as 1 row) the final merge reads them directly, with no intermediate pass over the
    whole table (none written, the list returned as given); one more shard than fan_in takes one pass into
    ceil(n / fan_in) files."""
    import pyarrow.parquet as pq

    from audit.pipeline import reduce_shards
    from audit.tables import arrow_schema

    schema = arrow_schema("risk")
    shards = []
    for k in range(4):
        path = tmp_path / f"s{k}.parquet"
        pq.write_table(schema.remove_metadata().empty_table(), path)
        shards.append(path)
    work = tmp_path / "merge"
    assert reduce_shards(shards[:3], work, schema, fan_in=3, batch_rows=1) == shards[:3] and not work.exists()
    reduced = reduce_shards(shards, work, schema, fan_in=3, batch_rows=1)
    assert reduced == [work / "level-0" / "part-000000.parquet", work / "level-0" / "part-000001.parquet"]
    assert [pq.read_metadata(p).num_rows for p in reduced] == [0, 0]


def test_a_rerun_with_one_more_input_file_is_refused_even_when_it_holds_no_rows(tmp_path, tiny_model_dir):
    """The run folder's identity lists its input files: a rerun naming one more (here an empty .txt, which adds no
    unit, so the unit count alone cannot tell) is another run, refused naming the new file, and one naming fewer
    files is refused naming the one gone; the folder is left as it was."""
    from audit.errors import RunError

    src = prompts_file(tmp_path / "a.txt", 3)
    empty = tmp_path / "b.txt"
    empty.write_text("")
    out = tmp_path / "run"
    run_audit([src], tiny_model_dir, out, device="cpu")
    with pytest.raises(RunError, match=rf"holds a different run: new input file {empty}"):
        run_audit([src, empty], tiny_model_dir, out, device="cpu")
    out2 = tmp_path / "run2"
    _, manifest = run_audit([src, empty], tiny_model_dir, out2, device="cpu")
    assert [f["path"] for f in manifest["files"]] == [str(src), str(empty)] and manifest["counts"]["scored"] == 3
    with pytest.raises(RunError, match=rf"holds a different run: input file gone: {empty}"):
        run_audit([src], tiny_model_dir, out2, device="cpu")
    assert list(json.loads((out / "run.json").read_text())["files"]) == [str(src)]


def test_finalize_refuses_a_planned_unit_without_a_finished_shard_and_writes_nothing(tmp_path, tiny_model_dir):
    """finalize merges only committed units: a planned unit whose ``.done.json`` is missing (a run stopped before it,
    an engine that lost it) is a RunError naming the unit, its file and rows, before any table is written (the
    finished folder's risk.parquet and manifest.json stay as they were), not a FileNotFoundError."""
    import time

    from audit.errors import RunError
    from audit.pipeline import build_plan, finalize

    src = prompts_file(tmp_path / "p.txt", 10)
    out = tmp_path / "run"
    _, manifest = run_audit([src], tiny_model_dir, out, device="cpu", unit_rows=4)
    before = {name: (out / name).read_bytes() for name in ("risk.parquet", "rejects.parquet", "manifest.json")}
    (out / "shards" / "unit-000001.done.json").unlink()
    cfg = RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(out), device="cpu", unit_rows=4)
    with pytest.raises(RunError, match=rf"^unit 1 \({src} rows 4-8\) has no finished shard$"):
        finalize(out, out / "shards", build_plan(cfg), cfg, manifest["model"], manifest["score_config"],
                 time.perf_counter(), "2026-01-01T00:00:00+00:00")
    assert {name: (out / name).read_bytes() for name in before} == before


def test_progress_reaches_the_rows_when_rows_per_prompt_does_not_add_up_in_floats(tmp_path, scorer):
    """Eight rows of six unique prompts: 8 / 6 rows per prompt, added six times in floats, is 7.999999999999999; the
    progress reported after each batch is rounded, not truncated, so the unit still reports its 8 rows (a bar
    one row short of its total at the end otherwise)."""
    from audit.sources import Unit
    from audit.unit import process_unit

    src = tmp_path / "p.txt"
    src.write_text("".join(f"{line}\n" for line in ["a cat", "a cat", "a dog", "a dog", "a cow", "a hen", "a pig",
                                                     "an owl"]))
    shards = tmp_path / "shards"
    shards.mkdir()
    seen: list[int] = []
    stats = process_unit(Unit(0, str(src), "txt", 0, 8), scorer, RunConfig(inputs=(str(src),), batch_size=1), shards,
                         progress=seen.append)
    assert (stats.scored, stats.unique_scored) == (8, 6)
    assert sum(seen) == 8 and len(seen) == 6 and set(seen) <= {1, 2}


def test_a_units_misses_are_scored_at_the_shape_of_its_planned_rows_not_of_what_the_cache_lacked(
        tmp_path, tiny_model_dir, monkeypatch):
    """With --cache, the batch size is lowered to the unit's planned rows (batch_size_for_rows), not to the number of
    prompts the cache lacked: a 20-row unit at --batch-size 32 pads its batches to 24 rows (20 rounded up to 8)
    whether it scores all 20 prompts or only the 2 the cache has not seen, so a prompt's score does not depend
    on what the cache held (docs/audits.md)."""
    from audit.scorers import Scorer

    pads: list[int] = []
    original = Scorer.prepare

    def prepare(self, prompts, tokens=None, pad_to=None):
        pads.append((len(prompts), pad_to))
        return original(self, prompts, tokens, pad_to=pad_to)

    monkeypatch.setattr(Scorer, "prepare", prepare)
    lines = [f"a small house number {i}" for i in range(20)]
    (tmp_path / "a.txt").write_text("\n".join(lines[:18]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(lines) + "\n")
    cache = str(tmp_path / "cache")
    run_audit([tmp_path / "a.txt"], tiny_model_dir, tmp_path / "one", device="cpu", batch_size=32, cache=cache)
    assert pads == [(18, 24)]
    pads.clear()
    _, manifest = run_audit([tmp_path / "b.txt"], tiny_model_dir, tmp_path / "two", device="cpu", batch_size=32,
                            cache=cache)
    assert pads == [(2, 24)] and manifest["cache"]["hits"] == 18 and manifest["cache"]["scored"] == 2


# ---- rows rejected after scoring keep their --keep-columns values


def test_a_row_the_model_fails_on_keeps_its_kept_columns_in_rejects(tmp_path, tiny_model_dir, monkeypatch):
    """--keep-columns values go with each row into whichever table it ends in: also for a row rejected after
    scoring (scoring_error), whose values were set aside with the prompts to score. Rows 1 and 3 hold the failing
    prompt (one with spaces around it); their users u2 and u4 are in rejects.parquet, u1 and u3 in risk.parquet."""
    import polars as pl

    from helpers import fail_batches_with

    fail_batches_with(monkeypatch, "poison")
    path = tmp_path / "p.csv"
    path.write_text('prompt,user\na red cat,u1\na poison apple,u2\na blue dog,u3\n" a poison apple ",u4\n')
    out, manifest = run_audit([path], tiny_model_dir, tmp_path / "run", device="cpu", keep_columns=("user",),
                              max_error_fraction=1.0)
    risk, rejects = pl.read_parquet(out / "risk.parquet"), pl.read_parquet(out / "rejects.parquet")
    assert sorted(risk.select("row", "user").rows()) == [(0, "u1"), (2, "u3")]
    assert sorted(rejects.select("row", "reason", "user", "prompt").rows()) == [
        (1, "scoring_error", "u2", "a poison apple"), (3, "scoring_error", "u4", " a poison apple ")]
    assert manifest["counts"]["rejected_by_reason"] == {"scoring_error": 2}


# ---- the score cache's end-of-run compaction (audit.cache.ScoreCache.compact)


def test_the_end_of_run_compaction_merges_only_more_than_32_parts(tmp_path, monkeypatch):
    """compact() with its defaults (what finalize calls) merges the parts "when there are more than 32": 32 parts
    of one entry each stay as they are; a 33rd makes it merge all 33 into one part that serves every entry. (The
    in-run compaction after each put is pushed out of the way so that the parts pile up.)"""
    import numpy as np

    import audit.cache as cache_mod
    from audit.cache import SCORE_COLUMNS, ScoreCache

    monkeypatch.setattr(cache_mod, "COMPACT_WHILE_RUNNING", 1000)
    cache = ScoreCache(tmp_path, "fp", {"scorer": "attention_entropy", "seed": 0})
    hashes = [f"{i:032x}" for i in range(33)]
    for i, h in enumerate(hashes[:32]):
        cache.put([h], {c: np.array([float(i)]) for c in SCORE_COLUMNS}, [[]])
    assert len(cache.files()) == 32 and cache.compact() == 0 and len(cache.files()) == 32
    cache.put([hashes[32]], {c: np.array([32.0]) for c in SCORE_COLUMNS}, [[]])
    assert cache.compact() == 33 and len(cache.files()) == 1 and cache.notes == []
    found = cache.lookup(hashes)
    assert sorted(zip(found.column("prompt_hash").to_pylist(), found.column("risk").to_pylist())) == [
        (h, float(i)) for i, h in enumerate(hashes)]


# ---- unit retries (audit.faults.run_unit_with_retries)


class _Unit:
    index, url, start, stop = 3, "logs/b.txt", 10, 20


def test_a_unit_is_tried_retries_plus_one_times_and_a_late_success_counts():
    """``retries=2`` means three attempts: a unit that fails twice (a passing error) and then succeeds returns its
    result, ``on_retry`` told of attempts 1 and 2 with their errors; one that fails every time is called exactly
    three times (``on_retry`` twice: not after the last) before the RunError naming it."""
    from audit.errors import RunError
    from audit.faults import run_unit_with_retries

    calls, retried = [], []
    errors = [OSError("first"), OSError("second")]

    def flaky():
        calls.append(1)
        if len(calls) <= 2:
            raise errors[len(calls) - 1]
        return "stats"

    assert run_unit_with_retries(flaky, _Unit(), retries=2, on_retry=lambda n, e: retried.append((n, e))) == "stats"
    assert calls == [1, 1, 1] and retried == [(1, errors[0]), (2, errors[1])]
    calls.clear(), retried.clear()

    def broken():
        calls.append(1)
        raise ValueError(f"try {len(calls)}")

    with pytest.raises(RunError, match=r"^unit 3 \(logs/b\.txt rows 10-20\) failed 3 times, last with ValueError: "
                                       r"try 3; finished units"):
        run_unit_with_retries(broken, _Unit(), retries=2, on_retry=lambda n, e: retried.append(n))
    assert calls == [1, 1, 1] and retried == [1, 2]


# ---- --id-column values that are not text


def test_an_integer_id_column_gives_its_numbers_as_prompt_ids(tmp_path, tiny_model_dir):
    """A Parquet --id-column of int64 (a log's numeric request id) names each row by its number as text ("1042"),
    in risk.parquet and rejects.parquet alike; a null id is a null_id reject named by its file and row."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog", "", "an old city"],
                             "rid": pa.array([1042, 7, 99, None], pa.int64())}), path)
    out, manifest = run_audit([path], tiny_model_dir, tmp_path / "run", device="cpu", id_column="rid")
    risk, rejects = pl.read_parquet(out / "risk.parquet"), pl.read_parquet(out / "rejects.parquet")
    assert sorted(risk.select("prompt_id", "row").rows()) == [("1042", 0), ("7", 1)]
    assert sorted(rejects.select("prompt_id", "row", "reason").rows(), key=lambda r: r[1]) == [
        ("99", 2, "empty_prompt"), (f"{path}#3", 3, "null_id")]
    assert manifest["counts"]["duplicate_ids"] == 0


def test_boolean_and_float32_ids_are_the_text_json_lines_gives_for_the_same_values(tmp_path, tiny_model_dir):
    """An id is text meant to join results back: a Parquet boolean id was Python's "True" where the same rows as JSON
    lines gave "true", and a float32 id 0.1 was "0.10000000149011612". Non-text ids are now written as kept columns
    are (audit.sources._kept_text): "true"/"false", a float32 in its shortest form, so the same data gives the same
    prompt_id in either format."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog"], "ok": pa.array([True, False]),
                             "w": pa.array([0.1, 2.5], pa.float32())}), tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red cat", "ok": true, "w": 0.1}\n'
                                      '{"prompt": "a blue dog", "ok": false, "w": 2.5}\n')
    for column, expected in (("ok", ["true", "false"]), ("w", ["0.1", "2.5"])):
        for name in ("p.parquet", "p.jsonl"):
            out, _ = run_audit([tmp_path / name], tiny_model_dir, tmp_path / f"{column}-{name}", device="cpu",
                               id_column=column)
            risk = pl.read_parquet(out / "risk.parquet").sort("row")
            assert risk["prompt_id"].to_list() == expected, (column, name)
