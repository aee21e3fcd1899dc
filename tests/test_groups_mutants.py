"""Units scored together (audit.unit.group_units, process_units, audit.runner.group_rows and the engines' handling
of a group): behaviours a mutation review of the grouping found unpinned. Each unit of a group keeps its own stats:
its unique prompts, the cache hits (a prompt scored for an earlier unit of the group counts once), what it was
scored with, its share of the group's wall time; a group's progress counts every row once; the Ray pieces key a
group by its first unit. No Ray is started: the Ray engine's actor and driver loop run in this process with the
fakes of tests/test_ray_engine_mutants.py. Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import audit.engines.ray as r
from audit.config import RunConfig
from audit.errors import RunError
from audit.sources import Unit
from audit.unit import UnitGroup, UnitStats, process_units, scored_with
from helpers import run_audit
import test_ray_engine_mutants as ray_tests
from test_ray_engine_mutants import _batch, _row

actor, drive, ray_mod = ray_tests.actor, ray_tests.drive, ray_tests.ray_mod  # that module's fixtures, shared


def _one_line_files(folder, n: int):
    """``folder`` with ``n`` files p0.txt ... holding one prompt each."""
    folder.mkdir()
    for i in range(n):
        (folder / f"p{i}.txt").write_text(f"a small prompt {i}\n")
    return folder


def _files(tmp_path, *contents: str) -> list[Unit]:
    """One .txt file per ``contents`` (lines), each a unit of the plan, index in order."""
    units = []
    for i, text in enumerate(contents):
        path = tmp_path / f"f{i}.txt"
        path.write_text(text)
        units.append(Unit(i, str(path), "txt", 0, text.count("\n")))
    return units


def _shards(tmp_path) -> Path:
    shards = tmp_path / "shards"
    shards.mkdir()
    return shards


# ---------------------------------------------------------------- process_units: per-unit stats of a group

def test_each_unit_of_a_group_gets_its_own_prompts_rejects_share_of_time_and_settings(tmp_path, scorer, monkeypatch):
    """Three files in one group: A = two prompts, B = two blank lines (all rejected), C = a repeat of A's first
    prompt. Without a cache no unit has cache hits (C's prompt is not from a cache); B scored nothing with the model
    (no settings); the group's 10 s of reading and scoring are shared by rows read (A 2, B 2, C 1 of 5), and each
    unit adds its own write's 0.5 s (a clock that gives the group 0 then 10, each writing thread 100 then 100.5)."""
    import threading
    from types import SimpleNamespace

    import audit.unit

    a, b, c = _files(tmp_path, "a red cat\na blue dog\n", "  \n\t\n", "a red cat\n")
    cfg = RunConfig(inputs=(str(tmp_path),), batch_size=8)
    seen: list[int] = []
    group_clock, local = iter([0.0, 10.0]), threading.local()

    def perf_counter():
        if threading.current_thread().name.startswith("memaudit-write"):
            local.calls = getattr(local, "calls", -1) + 1
            return 100.0 + 0.5 * local.calls
        return next(group_clock)

    monkeypatch.setattr(audit.unit, "time", SimpleNamespace(perf_counter=perf_counter))
    out = process_units(UnitGroup((a, b, c), 5), scorer, cfg, _shards(tmp_path), progress=seen.append)
    assert [s.unit for s in out] == [0, 1, 2]
    assert [(s.rows_read, s.scored, s.rejected_by_reason) for s in out] == [(2, 2, {}), (2, 0, {"empty_prompt": 2}),
                                                                            (1, 1, {})]
    assert [s.unique_scored for s in out] == [2, 0, 1] and [s.cache_hits for s in out] == [0, 0, 0]
    assert [s.cache_key for s in out] == [None] * 3
    settings = scored_with(scorer, cfg)
    assert settings["batch_size"] == 8
    assert [s.scored_with for s in out] == [settings, {}, settings]
    assert [s.wall_s for s in out] == [4.5, 4.5, 2.5]
    # the 2 blanks at once, then the one batch of 2 unique prompts for the group's 3 prompt rows: 5, the rows read
    assert seen == [2, 3]


def test_a_group_with_a_cache_counts_a_repeat_of_an_earlier_unit_as_a_hit_but_scored_with_the_model(tmp_path, scorer):
    """A = p0 and p1, B = p0 (all repeats of A's), one group, a new cache: the model scores 2 prompts, counted for
    A; B's p0 counts as a hit (one forward, not two), yet B's score came from the model now, so B records the
    settings. A second group over the filled cache: every prompt a hit, no settings."""
    a, b = _files(tmp_path, "a red cat\na blue dog\n", "a red cat\n")
    cfg = RunConfig(inputs=(str(tmp_path),), batch_size=8, cache=str(tmp_path / "cache"))
    first = process_units(UnitGroup((a, b), 3), scorer, cfg, _shards(tmp_path))
    settings = scored_with(scorer, cfg)
    assert [(s.unique_scored, s.cache_hits) for s in first] == [(2, 0), (1, 1)]
    assert [s.scored_with for s in first] == [settings, settings]
    assert first[0].cache_key and first[1].cache_key == first[0].cache_key
    assert first[0].cache_dir == str(tmp_path / "cache")
    again = process_units(UnitGroup((a, b), 3), scorer, cfg, tmp_path / "shards")
    assert [(s.unique_scored, s.cache_hits, s.scored_with) for s in again] == [(2, 2, {}), (1, 1, {})]


def test_a_prompt_that_failed_is_neither_a_cache_hit_nor_scored_in_any_unit(tmp_path, scorer, monkeypatch):
    """A = p0 and "a poison apple", B = "a poison apple" (a repeat of A's), one group, a new cache, and a model that
    fails on the poison prompt (scoring_error in both units): the model scored 1 prompt, counted for A. B's repeat of
    the failed prompt counted as a cache hit and A's as a scored prompt (the manifest: hits 1, scored 2, for one
    score). Now A has 1 scored and 0 hits, B 0 and 0."""
    from helpers import fail_batches_with

    fail_batches_with(monkeypatch, "poison")
    a, b = _files(tmp_path, "a red cat\na poison apple\n", "a poison apple\n")
    cfg = RunConfig(inputs=(str(tmp_path),), batch_size=8, cache=str(tmp_path / "cache"))
    out = process_units(UnitGroup((a, b), 3), scorer, cfg, _shards(tmp_path))
    assert [(s.scored, s.rejected_by_reason) for s in out] == [(1, {"scoring_error": 1}), (0, {"scoring_error": 1})]
    assert [(s.unique_scored, s.cache_hits) for s in out] == [(1, 0), (0, 0)]


def test_a_resumed_group_through_the_cache_is_scored_at_the_groups_planned_shape(tmp_path, scorer, launches):
    """A group whose other units are done (shape_rows 12, one unit of 1 row left) and a cache that misses: the miss
    is scored at the batch of the group's 12 planned rows (16), as without a cache, not of the 1 row left (8)."""
    (unit,) = _files(tmp_path, "a lonely prompt\n")
    cfg = RunConfig(inputs=(str(tmp_path),), batch_size=64, cache=str(tmp_path / "cache"))
    [stats] = process_units(UnitGroup((unit,), 12), scorer, cfg, _shards(tmp_path))
    assert launches == [16] and (stats.scored, stats.unique_scored, stats.cache_hits) == (1, 1, 0)


def test_a_unit_whose_rows_are_all_rejected_is_still_committed_in_its_group(tmp_path, tiny_model_dir):
    """A group of a good file, a blank one and a repeat: each its own committed unit; the manifest's counts
    reconcile, and the cache figures count the repeat as the hit it is."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text("a red cat\na blue dog\n")
    (folder / "b.txt").write_text("  \n\n")
    (folder / "c.txt").write_text("a blue dog\n")
    out, manifest = run_audit([folder], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=8,
                              cache=str(tmp_path / "cache"))
    done = {int(p.name[5:11]): json.loads(p.read_text())["stats"] for p in (out / "shards").glob("*.done.json")}
    assert sorted(done) == [0, 1, 2]
    assert [(done[i]["scored"], done[i]["rejected_by_reason"], done[i]["unique_scored"], done[i]["cache_hits"])
            for i in range(3)] == [(2, {}, 2, 0), (0, {"empty_prompt": 2}, 0, 0), (1, {}, 1, 1)]
    assert done[1]["scored_with"] == {} and done[2]["scored_with"] == done[0]["scored_with"] != {}
    assert manifest["counts"]["rows_read"] == 5 and manifest["counts"]["scored"] == 3
    assert manifest["counts"]["rejected_by_reason"] == {"empty_prompt": 2}
    assert (manifest["cache"]["scored"], manifest["cache"]["hits"]) == (2, 1)


# ---------------------------------------------------------------- group_rows and execute

def test_group_rows_is_unit_rows_or_the_rows_split_among_several_workers():
    from audit.runner import group_rows

    cfg = RunConfig(inputs=("x",), unit_rows=20_000)
    local = SimpleNamespace()  # no worker_count: one worker

    def ray(workers):
        return SimpleNamespace(worker_count=lambda c: workers)

    def plan(rows):
        return SimpleNamespace(total_rows=rows)

    assert group_rows(cfg, plan(3), local) == 20_000
    assert group_rows(cfg, plan(3), ray(2)) == 2  # 3 rows for 2 workers: ceil(3 / 2), so both get a group
    assert group_rows(cfg, plan(10), ray(4)) == 3  # ceil(2.5)
    assert group_rows(cfg, plan(100_000), ray(2)) == 20_000  # never more than --unit-rows
    assert group_rows(cfg, plan(3), ray(1)) == 20_000
    assert group_rows(cfg, plan(1), ray(2)) == 20_000  # one row: nothing to split
    assert group_rows(cfg, plan(0), ray(2)) == 20_000  # empty inputs: a valid bound (group_units refuses 0)


def test_execute_packs_the_groups_with_group_rows(tmp_path, tiny_model_dir, monkeypatch):
    """The run's groups are cut at what group_rows says (here 2 rows: 5 one-line files make groups of 2, 2, 1)."""
    import audit.engines.local as local
    import audit.runner as runner

    folder = _one_line_files(tmp_path / "in", 5)
    monkeypatch.setattr(runner, "group_rows", lambda cfg, plan, engine: 2)
    sizes, original = [], local.process_units

    def process(group, *args, **kwargs):
        sizes.append(([u.index for u in group.units], group.shape_rows))
        return original(group, *args, **kwargs)

    monkeypatch.setattr(local, "process_units", process)
    _, manifest = run_audit([folder], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=8)
    assert sizes == [([0, 1], 2), ([2, 3], 2), ([4], 1)] and manifest["counts"]["scored"] == 5


# ---------------------------------------------------------------- Ray: a group keyed by its first unit

def _u(index: int, start: int, stop: int) -> Unit:
    return Unit(index, "/d/p.txt", "txt", start, stop)


def test_actor_progress_of_a_retried_group_restarts_under_its_first_unit(actor):
    """The group's first attempt reports 1 row, then fails; the second reports its 3 rows: the tracker says 3 rows
    done (the retry restarted the group's count), not 4."""
    group = UnitGroup((_u(4, 0, 1), _u(5, 1, 3)), 3)
    attempts = []

    def process(g, progress, prepared):
        attempts.append(g.index)
        if len(attempts) == 1:
            progress(1)
            raise ValueError("flaky")
        progress(3)
        return [UnitStats(unit=u.index, rows_read=u.rows, scored=u.rows) for u in g.units]

    actor.process = process
    out = actor.make(retries=1)(_batch((group, b"")))
    assert list(out["unit"]) == [4, 5] and list(out["error"]) == ["", ""]
    assert actor.tracker.snapshot()["rows"] == 3 and actor.tracker.attempts == {4: 2}


def test_drive_waits_for_every_unit_of_a_group(drive):
    """A group of units 0-2 whose unit 1 never came back: the run fails naming unit 1."""
    group = UnitGroup((_u(0, 0, 1), _u(1, 1, 2), _u(2, 2, 3)), 3)
    with pytest.raises(RunError, match=r"^the Ray run ended without 1 unit\(s\), first unit 1 \(/d/p.txt rows 1-2\); "
                                       r"rerun the same command to resume$"):
        drive.go([_row(0, 1), _row(2, 1), ("end", None)], [group])


def test_drive_names_the_group_whose_workers_kept_dying(drive):
    """The tracker counts attempts by a group's first unit (3): 4 attempts at retries 3 make it the suspect."""
    group = UnitGroup((_u(3, 0, 1), _u(4, 1, 2)), 2)
    drive.tracker.attempts[3] = 4
    with pytest.raises(RunError) as err:
        drive.go([("exc", RuntimeError("ActorDiedError"))], [UnitGroup((_u(0, 5, 6),), 1), group])
    assert str(err.value) == ("units 3-4 (2 units scored together, /d/p.txt rows 0-1 to /d/p.txt rows 1-2): its "
                              "scoring worker died on each of 4 attempts (RuntimeError: ActorDiedError); finished "
                              "units are kept: rerun the same command to resume")


def test_explain_failure_suspects_a_group_while_any_of_its_units_is_unfinished(tmp_path):
    g0 = UnitGroup((_u(0, 0, 1), _u(1, 1, 2)), 2)
    g2 = UnitGroup((_u(2, 2, 3), _u(3, 3, 4)), 2)
    snap = {"attempts": {0: 5, 2: 6}}
    exc = RuntimeError("died")
    # unit 0 came back, unit 1 did not: group 0 is a suspect; group 2 came back whole: not one
    msg = r._explain_failure(exc, {0: g0, 2: g2}, {0: {}, 2: {}, 3: {}}, snap, 3, tmp_path)
    assert msg == ("units 0-1 (2 units scored together, /d/p.txt rows 0-1 to /d/p.txt rows 1-2): its scoring worker "
                   "died on each of 5 attempts (RuntimeError: died); finished units are kept: rerun the same command "
                   "to resume")
    msg = r._explain_failure(exc, {0: g0, 2: g2}, {0: {}, 1: {}, 2: {}, 3: {}}, snap, 3, tmp_path)
    assert msg == "the Ray run failed (RuntimeError: died); finished units are kept: rerun the same command to resume"


# ---------------------------------------------------------------- a failed group is named as a group

def test_a_local_group_that_keeps_failing_fails_the_run_naming_all_its_units(tmp_path, tiny_model_dir, monkeypatch):
    import audit.engines.local as local

    folder = _one_line_files(tmp_path / "in", 3)

    def process(group, *args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(local, "process_units", process)
    with pytest.raises(RunError) as err:
        run_audit([folder], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=8)
    assert str(err.value) == (f"units 0-2 (3 units scored together, {folder}/p0.txt rows 0-1 to {folder}/p2.txt rows "
                              "0-1) failed 3 times, last with OSError: disk on fire; finished units are kept: rerun "
                              "the same command to resume")


def test_actor_names_a_failed_group_with_all_its_units(actor):
    from audit.errors import IncompleteCaptureError

    group = UnitGroup((_u(4, 0, 1), _u(5, 1, 2)), 2)
    named = "units 4-5 (2 units scored together, /d/p.txt rows 0-1 to /d/p.txt rows 1-2)"

    def process(g, progress, prepared):
        raise IncompleteCaptureError("no maps")

    actor.process = process
    out = actor.make(retries=1)(_batch((group, b"")))
    assert list(out["unit"]) == [4] and list(out["error"]) == [f"{named}: IncompleteCaptureError: no maps"]
    actor.tracker.attempts[4] = 2  # two earlier attempts killed their workers; retries=1 leaves none
    out = actor.make(retries=1)(_batch((group, b"")))
    assert list(out["error"]) == [f"{named}: its scoring worker died on each of 2 attempts; finished units are kept: "
                                  "rerun the same command to resume"]


def test_a_resumed_group_keeps_its_planned_shape_through_json(actor):
    """A Ray actor gets a group as JSON: a resumed group (units 0-2 of 4 planned rows, unit 1 left) still carries its
    4 planned rows to process_units, which set its batch shape, not the 1 row left."""
    from audit.unit import group_units

    units = [_u(0, 0, 1), _u(1, 1, 2), _u(2, 2, 4)]
    [group] = group_units(units, 4, todo={1})
    assert (group.rows, group.shape_rows) == (1, 4)
    seen = []
    actor.process = lambda g, progress, prepared: seen.append((g.rows, g.shape_rows)) or [UnitStats(unit=1)]
    actor.make()(_batch((group, b"")))
    assert seen == [(1, 4)]


def test_the_local_engine_reads_each_unit_once_ahead_of_its_group(tmp_path, tiny_model_dir, monkeypatch):
    """Groups of 2 rows over 3 one-line files: groups [0, 1] and [2], each read once by the read-ahead thread and
    scored with those rows (not read a second time in the scoring thread)."""
    import audit.runner as runner
    import audit.unit as unit_mod

    folder = _one_line_files(tmp_path / "in", 3)
    monkeypatch.setattr(runner, "group_rows", lambda cfg, plan, engine: 2)
    reads, original = [], unit_mod.prepare_unit
    monkeypatch.setattr(unit_mod, "prepare_unit", lambda u, cfg: reads.append(u.index) or original(u, cfg))
    _, manifest = run_audit([folder], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=8)
    assert sorted(reads) == [0, 1, 2] and manifest["counts"]["scored"] == 3
