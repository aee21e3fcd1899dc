"""A unit that rejected no row writes no rejects shard (an empty Parquet file and its fsync per unit were a third of
a folder of small files' host time): which shards exist, a stale one an uncommitted try left, a deleted one, and a
run folder from before (an empty rejects shard beside each unit) resuming as it was."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from audit.tables import arrow_schema
from audit.unit import Unit, shard_paths, unit_done

from tests.test_bad_input import run


def _units(shards):
    return [Unit(**json.loads(p.read_text())["unit"]) for p in sorted(shards.glob("*.done.json"))]


def test_only_a_unit_with_rejects_has_a_rejects_shard(tmp_path, tiny_model_dir):
    """12 lines in units of 4, one empty line in the first unit: unit 0 alone has a rejects shard (its 1 row); the
    run's tables reconcile (test_bad_input.run checks every count). A stale rejects shard that an uncommitted try
    of unit 1 left is removed when unit 1 is scored again; a deleted shard of unit 0 has it scored again; an empty
    rejects shard beside a unit (as runs before this wrote one for every unit) still counts as done."""
    src = tmp_path / "p.txt"
    src.write_text("".join(("" if i == 2 else f"prompt {i}") + "\n" for i in range(12)))
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [src], unit_rows=4)
    assert (manifest["counts"]["scored"], manifest["counts"]["rejected"]) == (11, 1)
    assert rejects["row"].to_list() == [2] and rejects["reason"].to_list() == ["empty_prompt"]
    shards = tmp_path / "run" / "shards"
    units = _units(shards)
    assert [shard_paths(shards, u)[1].exists() for u in units] == [True, False, False]
    assert pq.read_metadata(shard_paths(shards, units[0])[1]).num_rows == 1
    assert all(unit_done(shards, u) for u in units)

    stale = shard_paths(shards, units[1])[1]  # unit 1 uncommitted, a rejects shard of another unit left beside it
    stale.write_bytes(shard_paths(shards, units[0])[1].read_bytes())
    shard_paths(shards, units[1])[2].unlink()
    again, rej, manifest = run(tmp_path, tiny_model_dir, [src], unit_rows=4)
    assert manifest["units"]["resumed"] == 2 and not stale.exists()
    assert again.equals(risk) and rej.equals(rejects)

    shard_paths(shards, units[0])[1].unlink()  # unit 0 rejected a row: without its shard it is not done
    assert not unit_done(shards, units[0])
    again, rej, manifest = run(tmp_path, tiny_model_dir, [src], unit_rows=4)
    assert manifest["units"]["resumed"] == 2 and again.equals(risk) and rej.equals(rejects)

    pq.write_table(arrow_schema("rejects").empty_table(), stale)  # a folder written before: an empty shard
    assert unit_done(shards, units[1])
    again, rej, manifest = run(tmp_path, tiny_model_dir, [src], unit_rows=4)
    assert manifest["units"]["resumed"] == 3 and again.equals(risk) and rej.equals(rejects)
