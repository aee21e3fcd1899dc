"""Small units scored together (audit.unit.group_units, process_units): a folder of many small files is scored in
full batches, each file still its own unit, shard and commit; the scores equal those of the same prompts in one
file, a resumed group is scored at its planned batch shape, and the cache's figures count each forward once. Many
files are planned, stat'ed, read and written several at once, with results in the inputs' order."""

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
    assert describe_unit(UnitGroup((a, c), 4)) == ("units 0-2 (2 of them left, scored together, /d/f0.txt rows 0-1 "
                                                   "to /d/f2.txt rows 0-2)")  # unit 1 was done before


def _one_prompt_files(folder, prompts):
    folder.mkdir()
    for i, p in enumerate(prompts):
        (folder / f"part-{i:03d}.txt").write_text(p + "\n")
    return folder


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
    # no unit scored a prompt with the model: the settings are those the cache's scores were computed with
    assert again["scored_with"]["batch_size"] == [8] and again["scored_with"]["mixed"] == []


# ---------------------------------------------------------------- reading a group: files at once, a file in order

def test_a_groups_files_are_read_at_once_and_returned_in_its_order(monkeypatch):
    """Three files' units are in flight together (a barrier of three would time out on reads one after another);
    the two units of one file are read in order by one thread; the results come back in the group's order."""
    import threading

    import audit.unit
    from audit.config import RunConfig

    barrier, seen = threading.Barrier(3, timeout=10), []
    a0, b0, a1, c0 = (Unit(0, "/d/a.csv", "csv", 0, 2), Unit(1, "/d/b.txt", "txt", 0, 1),
                      Unit(2, "/d/a.csv", "csv", 2, 3), Unit(3, "/d/c.txt", "txt", 0, 1))

    def prepare_unit(unit, cfg):
        seen.append((unit.index, threading.current_thread().name))
        if unit.index != 2:  # a.csv's second unit comes after its first, in the same thread
            barrier.wait()
        return f"P{unit.index}"

    monkeypatch.setattr(audit.unit, "prepare_unit", prepare_unit)
    assert audit.unit.prepare_group(UnitGroup((a0, b0, a1, c0), 5), RunConfig(inputs=("x",))) == ["P0", "P1", "P2",
                                                                                                   "P3"]
    threads = dict(seen)
    assert threads[0] == threads[2] and [i for i, _ in seen if threads[i] == threads[0]] == [0, 2]
    assert len({threads[0], threads[1], threads[3]}) == 3


def test_reading_a_group_raises_the_first_failing_unit_in_its_order(tmp_path):
    """Units 1 and 3 of a group have no file: the error names unit 1, whichever thread failed first."""
    from audit.config import RunConfig
    from audit.errors import SourceError
    from audit.unit import prepare_group, prepare_unit

    good = tmp_path / "good.txt"
    good.write_text("a red cat\n")
    units = (Unit(0, str(good), "txt", 0, 1), Unit(1, str(tmp_path / "gone1.txt"), "txt", 0, 1),
             Unit(2, str(good), "txt", 0, 1), Unit(3, str(tmp_path / "gone3.txt"), "txt", 0, 1))
    cfg = RunConfig(inputs=(str(tmp_path),))
    with pytest.raises(SourceError, match=r"^unit 1 \(.*gone1\.txt rows 0-1\): cannot read"):
        prepare_group(UnitGroup(units, 4), cfg)
    read = prepare_group(UnitGroup((units[0], units[2]), 2), cfg)
    assert [p.prompts for p in read] == [["a red cat"], ["a red cat"]] == [prepare_unit(units[0], cfg).prompts] * 2


def test_a_group_read_at_once_equals_its_units_read_one_by_one(tmp_path):
    """A CSV cut in two units (the second continues the first's stream), a gzip JSON-lines file and a text file, in
    one group: the same prompts, ids and rejects as reading each unit alone, in order."""
    import gzip

    from audit.config import RunConfig
    from audit.pipeline import build_plan
    from audit.unit import prepare_group, prepare_unit

    (tmp_path / "a.csv").write_text('prompt,id\n"a red, cat",r0\nblue dog,r1\n,r2\n"multi\nline",r3\nfox,r4\n')
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write('{"prompt": "green owl", "id": "j0"}\n{"prompt": 7, "id": "j1"}\n')
    (tmp_path / "c.txt").write_text("a small boat\n")
    cfg = RunConfig(inputs=(str(tmp_path),), unit_rows=3, id_column="id")
    units = build_plan(cfg).units
    assert [(u.url.rsplit("/", 1)[1], u.start, u.stop) for u in units] == [("a.csv", 0, 3), ("a.csv", 3, 5),
                                                                           ("b.jsonl.gz", 0, 2), ("c.txt", 0, 1)]
    together = prepare_group(UnitGroup(tuple(units), 8), cfg)
    alone = [prepare_unit(u, cfg) for u in units]
    fields = ("ids", "rows", "prompts", "rej_ids", "rej_rows", "rej_reasons", "rows_read")
    assert [[getattr(p, f) for f in fields] for p in together] == [[getattr(p, f) for f in fields] for p in alone]
    assert together[1].prompts == ["multi\nline", "fox"] and together[0].rej_reasons == ["null_prompt"]


def test_a_rerun_groups_the_units_as_the_first_invocation_recorded(tmp_path, tiny_model_dir, launches, monkeypatch):
    """The first invocation's group bound (here split for 2 workers: 6 rows) is recorded in run.json; a rerun with
    one worker keeps it, so the units left are scored at their groups' planned shape (batch 8), not regrouped into
    one group of 12 rows (batch 16). run.json's group_rows is not part of the run's identity: the rerun resumes."""
    import audit.engines.local as local

    folder = _one_prompt_files(tmp_path / "files", PROMPTS[:12])
    monkeypatch.setattr(local, "worker_count", lambda cfg: 2, raising=False)
    out, _ = run_audit([folder], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=16)
    assert json.loads((out / "run.json").read_text())["group_rows"] == 6 and launches == [8, 8]
    clean = pl.read_parquet(out / "risk.parquet")
    monkeypatch.delattr(local, "worker_count")
    for i in (0, 1, 7):
        (out / "shards" / f"unit-{i:06d}.done.json").unlink()
    launches.clear()
    _, manifest = run_audit([folder], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=16)
    assert launches == [8, 8] and manifest["units"] == {"total": 12, "resumed": 9}
    assert pl.read_parquet(out / "risk.parquet").equals(clean)
    assert json.loads((out / "run.json").read_text())["group_rows"] == 6


def test_a_groups_units_are_written_at_once_and_the_first_failure_in_its_order_is_raised(tmp_path, tiny_model_dir,
                                                                                         monkeypatch):
    """Two units of a group are written together (a barrier of two would time out on writes one after another); when
    units 1 and 2 fail to write, the error is unit 1's, and the units that were written are committed."""
    import threading

    import audit.unit
    from audit.errors import RunError

    folder = _one_prompt_files(tmp_path / "files", PROMPTS[:2])
    barrier, original = threading.Barrier(2, timeout=10), audit.unit._write_unit

    def write_unit(unit, *args):
        barrier.wait()
        return original(unit, *args)

    monkeypatch.setattr(audit.unit, "_write_unit", write_unit)
    _, manifest = run_audit([folder], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=8)
    assert manifest["counts"]["scored"] == 2

    def failing(unit, *args):
        if unit.index in (1, 2):
            raise OSError(f"cannot write unit {unit.index}")
        return original(unit, *args)

    monkeypatch.setattr(audit.unit, "_write_unit", failing)
    folder3 = _one_prompt_files(tmp_path / "three", PROMPTS[:3])
    with pytest.raises(RunError, match=r"^units 0-2 \(3 units scored together, .*\) failed 3 times, last with OSError: "
                                       r"cannot write unit 1;"):
        run_audit([folder3], tiny_model_dir, tmp_path / "out3", device="cpu", batch_size=8)
    assert sorted(p.name for p in (tmp_path / "out3" / "shards").glob("*.done.json")) == ["unit-000000.done.json"]


# ---------------------------------------------------------------- planning: files at once, taken in their order

def test_files_are_planned_at_once_and_taken_in_their_order(tmp_path, monkeypatch):
    """Three files' footers or lines are read together (a barrier of three would time out one after another); the
    units, skips and refusals come out as a plan made one file after another makes them: the first bad file in the
    inputs' order is the one named, and with --skip-bad-files the skips keep that order."""
    import threading

    from audit import sources
    from audit.errors import SourceError

    good = tmp_path / "a.txt"
    good.write_text("a red cat\na blue dog\n")
    bad1, bad2 = tmp_path / "b.parquet", tmp_path / "c.parquet"
    bad1.write_bytes(b"not parquet at all")
    bad2.write_bytes(b"neither is this file")
    files = [sources.InputFile(str(good), "txt"), sources.InputFile(str(bad1), "parquet"),
             sources.InputFile(str(bad2), "parquet"), sources.InputFile(str(good), "txt")]
    barrier, real = threading.Barrier(3, timeout=10), sources._plan_file

    def plan_file(f, *args):
        if f.fmt == "parquet" or f is files[0]:
            barrier.wait()
        return real(f, *args)

    monkeypatch.setattr(sources, "_plan_file", plan_file)
    with pytest.raises(SourceError, match=r"^.*b\.parquet: cannot read as parquet"):
        sources.plan_units(files, "prompt")
    barrier.reset()
    plan = sources.plan_units(files, "prompt", skip_bad_files=True)
    assert [s["path"] for s in plan.skipped] == [str(bad1), str(bad2)]
    assert [(u.index, u.url, u.start, u.stop) for u in plan.units] == [(0, str(good), 0, 2), (1, str(good), 0, 2)]


def test_file_versions_are_asked_at_once_and_kept_in_order_with_a_gone_file_as_its_error(tmp_path, monkeypatch):
    from audit import sources

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x\n")
    b.write_text("yy\n")
    urls = [str(a), str(tmp_path / "gone.txt"), str(b)]
    got = sources.file_versions(urls)
    assert got[0] == sources.file_version(str(a)) and got[2] == sources.file_version(str(b))
    assert got[0].startswith("size=2 ") and got[2].startswith("size=3 ") and isinstance(got[1], FileNotFoundError)
    import threading

    barrier, real = threading.Barrier(3, timeout=10), sources.file_version

    def file_version(url):  # three asked together, or the barrier times out
        barrier.wait()
        return real(url)

    monkeypatch.setattr(sources, "file_version", file_version)
    assert sources.file_versions([str(a), str(b), str(a)]) == [got[0], got[2], got[0]]
