"""Small units scored together (audit.unit.group_units, process_units): a folder of many small files is scored in
full batches, each file still its own unit, shard and commit; the scores equal those of the same prompts in one
file, a resumed group is scored at its planned batch shape, and the cache's figures count each forward once."""

from __future__ import annotations

import json

import polars as pl
import pytest

from audit.faults import describe_unit
from audit.sources import Unit
from audit.unit import UnitGroup, as_group, group_units
from helpers import run_audit

PROMPTS = [f"a photo of a small red cat number {i}" for i in range(20)]


def _units(*rows: int) -> list[Unit]:
    return [Unit(i, f"/d/f{i}.txt", "txt", 0, n) for i, n in enumerate(rows)]


def test_group_units_packs_consecutive_units_up_to_max_rows_and_keeps_the_planned_shape():
    units = _units(1, 1, 2, 5, 1, 1)
    groups = group_units(units, 4)
    assert [[u.index for u in g.units] for g in groups] == [[0, 1, 2], [3], [4, 5]]  # 5 > 4: a unit alone
    assert [g.shape_rows for g in groups] == [4, 5, 2] and [g.rows for g in groups] == [4, 5, 2]
    resumed = group_units(units, 4, todo={1, 2, 5})  # units 0, 3, 4 were done: their groups' shapes stay
    assert [[u.index for u in g.units] for g in resumed] == [[1, 2], [5]]
    assert [(g.index, g.shape_rows, g.rows) for g in resumed] == [(1, 4, 3), (5, 2, 1)]
    assert [len(g.units) for g in group_units(units, 1)] == [1] * 6
    with pytest.raises(ValueError, match="max_rows and max_units must be at least 1, got 0 and 256"):
        group_units(units, 0)
    with pytest.raises(ValueError, match="got 4 and 0"):
        group_units(units, 4, max_units=0)


def test_a_group_holds_at_most_max_group_units_units():
    """A group's files are read before it is scored: 600 one-row files are 3 groups (256, 256, 88), not one read
    of 600 files without progress."""
    from audit.unit import MAX_GROUP_UNITS

    groups = group_units(_units(*[1] * 600), 20_000)
    assert MAX_GROUP_UNITS == 256 and [len(g.units) for g in groups] == [256, 256, 88]
    assert [g.shape_rows for g in groups] == [256, 256, 88] and groups[1].index == 256
    assert [len(g.units) for g in group_units(_units(1, 1, 1, 1, 1), 20_000, max_units=2)] == [2, 2, 1]


def test_a_group_round_trips_through_json_and_a_unit_is_a_group_of_one():
    group = group_units(_units(1, 2), 10)[0]
    assert UnitGroup.from_dict(json.loads(json.dumps(group.to_dict()))) == group
    unit = _units(3)[0]
    assert as_group(unit) == UnitGroup((unit,), 3) and as_group(group) is group


def test_errors_name_a_group_by_its_first_and_last_unit():
    a, b, c = _units(1, 1, 2)
    assert describe_unit(UnitGroup((a, b, c), 4)) == ("units 0-2 (3 units scored together, /d/f0.txt rows 0-1 to "
                                                      "/d/f2.txt rows 0-2)")
    assert describe_unit(UnitGroup((b,), 1)) == describe_unit(b) == "unit 1 (/d/f1.txt rows 0-1)"


def _one_prompt_files(folder, prompts):
    folder.mkdir()
    for i, p in enumerate(prompts):
        (folder / f"part-{i:03d}.txt").write_text(p + "\n")
    return folder


@pytest.fixture
def launches(monkeypatch):
    """The padded batch size of each Scorer.launch (each forward), in order."""
    from audit.scorers import Scorer

    seen, original = [], Scorer.launch

    def launch(self, batch):
        seen.append(len(batch.tokens.attention_mask))
        return original(self, batch)

    monkeypatch.setattr(Scorer, "launch", launch)
    return seen


def test_many_one_prompt_files_are_scored_in_full_batches_with_the_scores_of_one_file(tmp_path, tiny_model_dir,
                                                                                       launches):
    folder = _one_prompt_files(tmp_path / "files", PROMPTS)
    out, manifest = run_audit([folder], tiny_model_dir, tmp_path / "many", device="cpu", batch_size=8)
    assert launches == [8, 8, 8]  # 20 prompts in batches of 8: 3 forwards, not 20 of one prompt each
    assert manifest["counts"]["rows_read"] == manifest["counts"]["scored"] == 20
    assert manifest["units"] == {"total": 20, "resumed": 0}
    assert len(list((out / "shards").glob("unit-*.done.json"))) == 20  # each file still its own unit and shard
    done = json.loads((out / "shards" / "unit-000007.done.json").read_text())
    assert done["unit"]["url"].endswith("part-007.txt") and done["stats"]["rows_read"] == 1
    assert done["stats"]["unique_scored"] == 1 and done["stats"]["scored_with"]["batch_size"] == 8

    one = tmp_path / "one.txt"
    one.write_text("".join(p + "\n" for p in PROMPTS))
    launches.clear()
    out1, _ = run_audit([one], tiny_model_dir, tmp_path / "single", device="cpu", batch_size=8)
    assert launches == [8, 8, 8]
    many = pl.read_parquet(out / "risk.parquet").select("prompt", "risk", "attn_entropy", "rank")
    single = pl.read_parquet(out1 / "risk.parquet").select("prompt", "risk", "attn_entropy", "rank")
    assert many.sort("prompt").equals(single.sort("prompt"))  # bit-identical, ranks included


def test_unit_rows_bounds_a_group(tmp_path, tiny_model_dir, launches):
    folder = _one_prompt_files(tmp_path / "files", PROMPTS[:12])
    run_audit([folder], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=8, unit_rows=5)
    assert launches == [8, 8, 8]  # groups of 5, 5 and 2 files, each lowered to a batch of 8 (5 rounded up)


def test_a_resumed_group_scores_only_its_unfinished_units_at_the_groups_batch_shape(tmp_path, tiny_model_dir,
                                                                                     launches):
    folder = _one_prompt_files(tmp_path / "files", PROMPTS[:12])
    out, _ = run_audit([folder], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=16)
    clean = pl.read_parquet(out / "risk.parquet")
    assert launches == [16]  # one group of 12 rows: batch 16 (12 rounded up to a multiple of 8)
    for i in (2, 5, 11):  # three units uncommitted, as an interruption leaves them
        (out / "shards" / f"unit-{i:06d}.done.json").unlink()
    launches.clear()
    _, manifest = run_audit([folder], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=16)
    assert launches == [16]  # the 3 rows at the group's shape (12 planned rows), not a batch of 8
    assert manifest["units"] == {"total": 12, "resumed": 9} and manifest["counts"]["scored"] == 12
    assert pl.read_parquet(out / "risk.parquet").equals(clean)


def test_the_cache_counts_a_prompt_shared_by_units_of_a_group_as_one_forward(tmp_path, tiny_model_dir, launches):
    """Two files holding the same prompt, in one group: scored once; the manifest counts one scored, one hit, as
    when the units were scored one after the other (the second found the first's score in the cache)."""
    folder = _one_prompt_files(tmp_path / "files", [PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    _, manifest = run_audit([folder], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=8,
                            cache=str(tmp_path / "cache"))
    assert launches == [8] and manifest["cache"]["scored"] == 2 and manifest["cache"]["hits"] == 1
    assert manifest["scored_with"]
    launches.clear()
    _, again = run_audit([folder], tiny_model_dir, tmp_path / "out2", device="cpu", batch_size=8,
                         cache=str(tmp_path / "cache"))
    assert launches == [] and (again["cache"]["scored"], again["cache"]["hits"]) == (0, 3)
    assert "scored_with" not in again  # no unit scored a prompt with the model
