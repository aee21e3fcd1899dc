"""Mutation review of the score cache (audit/cache.py), the run tables' checks (audit/tables.py) and the Ray engine's
split into groups and join by unit index (audit/engines/ray.py), session 49: each test kills a mutant that the suite
let through (named in its docstring), or pins a bug fixed with it."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from audit.cache import SCORE_COLUMNS, ScoreCache
from helpers import CACHE_HASHES, filled_cache

SC = {"scorer": "attention_entropy", "seed": 0}


def _row(value: float) -> dict:
    return {c: np.full(1, value) for c in SCORE_COLUMNS}


# ---------------------------------------------------------------- audit/cache.py

def test_a_later_unit_reads_no_part_footer_an_earlier_one_checked(tmp_path, monkeypatch):
    """Each part's schema is read once per file version and process (``_checked``), not once per unit: after a
    first lookup over 3 parts, a later unit's cache reads no footer; a part added since is the one footer read.
    (Mutant: the checked part was not remembered, so every unit read every footer again.)"""
    cache = filled_cache(tmp_path / "cache", 3)
    assert cache.lookup(CACHE_HASHES).num_rows == 12
    read = []
    real = pq.read_schema
    monkeypatch.setattr(pq, "read_schema", lambda f, *a, **k: read.append(f.name) or real(f, *a, **k))
    later = ScoreCache(tmp_path / "cache", "fp", SC)
    assert later.lookup(CACHE_HASHES).num_rows == 12 and read == []
    later.put(["f" * 32], _row(99.0), [[]], tag="new")
    found = later.lookup(CACHE_HASHES + ["f" * 32])
    assert found.num_rows == 13 and len(read) == 1 and read[0].startswith("part-new-")
    assert found.column("risk").to_pylist()[-1] == 99.0


def test_a_score_config_holding_a_tuple_reopens_its_own_folder(tmp_path):
    """key.json holds the configuration as JSON (a tuple becomes a list): the folder's next opening compares it with
    the configuration as JSON too, so it is the same key and serves its scores. (Mutant: compared with the dict as
    given, a tuple never equalled its list and every later unit gave the cache up as 'names another model'.)"""
    config = {"scorer": "attention_entropy", "seed": 0, "layers": ("down_blocks.1.attentions.1",)}
    first = ScoreCache(tmp_path, "fp", config)
    first.put(CACHE_HASHES[:2], {c: np.array([1.0, 2.0]) for c in SCORE_COLUMNS}, [[], []])
    again = ScoreCache(tmp_path, "fp", config)
    assert again.unusable is None and again.notes == []
    assert again.lookup(CACHE_HASHES).column("risk").to_pylist() == [1.0, 2.0]


def test_a_failure_cached_in_a_part_that_sorts_first_does_not_hide_the_prompts_finite_row(tmp_path):
    """A failure (``nonfinite`` set, NaN scores) cached before failures were kept out sat in a part sorting before the
    prompt's later finite row (a merged ``part-compact-`` sorts before the units' ``part-u``): the lookup kept the
    first row of each prompt, the failure, which cached_scores then dropped, so the prompt was a miss on every
    run, scored again each time and stored again (a part more per run, never a hit). Now a failure gives way to
    the prompt's finite row."""
    from audit.cache import cached_scores

    cache = ScoreCache(tmp_path, "fp", SC)
    h = CACHE_HASHES[0]
    failure = {c: np.full(1, 1.0 if c == "nonfinite" else np.nan) for c in SCORE_COLUMNS}
    cache.put([h], failure, [[]], tag="compact")
    finite = _row(0.0) | {"risk": np.full(1, 4.25)}
    cache.put([h], finite, [[{"token": "cat", "position": 2, "mass": 0.5, "start": 2, "end": 5}]], tag="u000001")
    assert [f.name.split("-")[1] for f in cache.files()] == ["compact", "u000001"]
    found = cache.lookup([h])
    assert found.column("risk").to_pylist() == [4.25] and found.column("nonfinite").to_pylist() == [0.0]
    scored = []
    scores, triggers, errors, hits = cached_scores(cache, ["a cat"], [h], lambda ps: scored.append(ps))
    assert hits == 1 and scored == [] and errors == {}
    assert scores["risk"].tolist() == [4.25] and triggers == [[{"token": "cat", "position": 2, "mass": 0.5,
                                                                 "start": 2, "end": 5}]]
    assert len(cache.files()) == 2


def test_a_key_json_nested_past_the_parsers_depth_is_damage_not_a_failed_unit(tmp_path):
    """key.json holding 100,000 nested lists (a damaged or hostile file) makes json.loads raise RecursionError, not
    ValueError: the cache is given up with the same note as for any key.json that is not JSON, and the run scores
    without it. (Mutant: only ValueError was caught, and the RecursionError failed the unit, three times.)"""
    first = ScoreCache(tmp_path, "fp", SC)
    key = first.dir / "key.json"
    key.write_text("[" * 100_000 + "]" * 100_000)
    again = ScoreCache(tmp_path, "fp", SC)
    why = f"{key} is damaged (not JSON): move {key.parent} aside or delete it, and the next run starts it anew"
    assert again.unusable == why
    assert again.notes == [f"score cache: {why}; scoring without the cache"]
    assert again.lookup(CACHE_HASHES).num_rows == 0


def test_a_compaction_that_reads_no_row_commits_no_empty_part(tmp_path):
    """Both parts of a cache have a corrupt first page: compaction moves them aside and merges nothing. It used to
    commit an empty part-compact-*.parquet all the same (returning 0, "nothing was done"), a part every later lookup
    opened; now the cache holds no part, and the 12 prompts are misses."""
    from helpers import flip_a_bit_in_the_risk_page

    cache = filled_cache(tmp_path / "cache", 2)
    parts = cache.files()
    for part in parts:
        flip_a_bit_in_the_risk_page(part)
    assert cache.compact(max_files=0) == 0
    assert cache.files() == [] and sorted(p.name for p in cache.dir.glob("*.parquet")) == []
    assert sorted(p.name for p in (cache.dir / "damaged").iterdir()) == sorted(p.name for p in parts)
    assert [n.split(" cannot be read")[0] for n in cache.notes] == [f"score cache: {p}" for p in parts]
    assert list(cache.dir.glob(".part-*.tmp")) == []
    assert cache.lookup(CACHE_HASHES).num_rows == 0


# ---------------------------------------------------------------- audit/tables.py

def _manifest_only_run(path, **changes):
    """A run folder holding only a manifest that counts 2 rows scored and 1 rejected, with ``changes``."""
    import json

    path.mkdir()
    manifest = {"counts": {"rows_read": 3, "scored": 2, "rejected": 1}, "model": {"fingerprint": "f"}} | changes
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_a_calibration_fpr_of_0_or_1_is_refused_and_one_between_passes(tmp_path):
    """calibration.fpr is a false-positive rate strictly between 0 and 1 (the reports print it as such); 0 and 1 are
    a hand-edited or damaged manifest. (Mutant: 0 passed.)"""
    import pytest

    from audit.errors import ReportError
    from audit.tables import finished_run

    for k, fpr in enumerate((0, 0.0, 1, 1.0)):
        run = _manifest_only_run(tmp_path / f"r{k}", calibration={"threshold": 4.5, "fpr": fpr})
        with pytest.raises(ReportError) as err:
            finished_run(run, ("manifest.json",), ReportError)
        assert str(err.value) == (f"{run / 'manifest.json'}: calibration.fpr {fpr!r} is not a number between 0 and 1: "
                                  "not an intact memaudit run")
    ok = _manifest_only_run(tmp_path / "ok", calibration={"threshold": 4.5, "fpr": 0.01})
    assert finished_run(ok, ("manifest.json",))["calibration"] == {"threshold": 4.5, "fpr": 0.01}


def test_negative_cache_hits_are_refused_and_zero_passes(tmp_path):
    """cache.hits counts prompts served from the score cache: a whole number, never negative. (Mutant: -1 passed.)"""
    import pytest

    from audit.errors import ReportError
    from audit.tables import finished_run

    run = _manifest_only_run(tmp_path / "neg", cache={"dir": "/c", "hits": -1, "scored": 3})
    with pytest.raises(ReportError) as err:
        finished_run(run, ("manifest.json",), ReportError)
    assert str(err.value) == (f"{run / 'manifest.json'}: cache.hits -1 is not a whole number: not an intact memaudit "
                              "run")
    zero = _manifest_only_run(tmp_path / "zero", cache={"dir": "/c", "hits": 0, "scored": 3})
    assert finished_run(zero, ("manifest.json",))["cache"]["hits"] == 0


def test_check_table_refuses_a_column_of_the_right_name_and_another_type():
    """A rejects table whose row column is int32 (the schema's is int64) is refused before it is written, naming
    both column lists with their types; the schema's own types pass. (Mutant: only the names were compared, and
    the int32 table was written as a rejects table.)"""
    import pyarrow as pa
    import pytest

    from audit.errors import SchemaError
    from audit.tables import arrow_schema, check_table

    schema = arrow_schema("rejects")
    rows = [{"prompt_id": "p.txt#9", "source": "p.txt", "row": 9, "reason": "empty_prompt"}]
    check_table(pa.Table.from_pylist(rows, schema=schema), "rejects")
    narrow = schema.set(schema.get_field_index("row"), pa.field("row", pa.int32(), nullable=False))
    with pytest.raises(SchemaError) as err:
        check_table(pa.Table.from_pylist(rows, schema=narrow), "rejects")
    got = [(f.name, str(f.type)) for f in narrow]
    want = [(f.name, str(f.type)) for f in schema]
    assert ("row", "int32") in got and ("row", "int64") in want
    assert str(err.value) == f"rejects table does not match schemas/rejects.json: got {got}, expected {want}"


def test_a_risk_column_of_another_type_is_refused_though_reading_does_not_need_it(tmp_path):
    """Every column of the risk schema that a run's risk.parquet holds must have the schema's type, not only the
    five that reading relies on: a table whose bos_mass was rewritten as text is not a memaudit table. (Mutant: only
    the five were checked.)"""
    import json

    import pyarrow as pa
    import pytest

    from audit.errors import ReportError
    from audit.tables import arrow_schema, finished_run

    schema = arrow_schema("risk")
    schema = schema.set(schema.get_field_index("bos_mass"), pa.field("bos_mass", pa.string()))
    schema = pa.schema([f.with_nullable(True) for f in schema])  # the other score columns left null
    rows = [{"rank": k + 1, "prompt_id": f"p.txt#{k}", "prompt": f"prompt {k}", "prompt_hash": f"{k:032x}",
             "risk": 2.0 - k, "bos_mass": "0.5"} for k in range(2)]
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), run / "risk.parquet")
    (run / "manifest.json").write_text(json.dumps({"counts": {"rows_read": 2, "scored": 2, "rejected": 0},
                                                   "model": {"fingerprint": "f"}}))
    with pytest.raises(ReportError) as err:
        finished_run(run, ("risk.parquet", "manifest.json"), ReportError)
    assert str(err.value) == (f"{run / 'risk.parquet'}: column bos_mass is string, expected double: not an intact "
                              "memaudit run")


def test_an_atomic_write_to_a_link_replaces_its_target_and_keeps_the_link(tmp_path):
    """A link is written through: the file it points to gets the new content and the link stays a link (a run
    folder's manifest linked into a shared folder keeps pointing there). (Mutant: the link itself was replaced by a
    plain file and its target kept the old content.)"""
    import json

    from audit.tables import write_json_atomic

    (tmp_path / "shared").mkdir()
    target = tmp_path / "shared" / "real.json"
    target.write_text("old\n")
    link = tmp_path / "out.json"
    link.symlink_to(target)
    write_json_atomic({"a": 1}, link)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "shared"]
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["real.json"]


# ---------------------------------------------------------------- audit/engines/ray.py

def test_explain_failure_names_three_units_whose_workers_kept_dying_most_attempts_first(tmp_path):
    """Four units each killed their worker more than the 3 retries allow, none finished: the message names the three
    with the most attempts, in that order, and says the first one's attempts. (Mutant: two were named.)"""
    import audit.engines.ray as r
    from audit.sources import Unit
    from audit.unit import as_group

    by_group = {i: as_group(Unit(i, "/d/p.txt", "txt", 10 * i, 10 * i + 10)) for i in range(4)}
    snap = {"attempts": {0: 4, 1: 7, 2: 5, 3: 6}}
    msg = r._explain_failure(RuntimeError("ActorDiedError\nThe actor died"), by_group, {}, snap, 3, tmp_path)
    assert msg == ("unit 1 (/d/p.txt rows 10-20), unit 3 (/d/p.txt rows 30-40), unit 2 (/d/p.txt rows 20-30): its "
                   "scoring worker died on each of 7 attempts (RuntimeError: The actor died); finished units are "
                   "kept: rerun the same command to resume")


def test_a_single_cpu_actor_gets_every_core_of_its_machine(monkeypatch):
    """One CPU actor (a 1-CPU cluster, or --workers 1) splits this machine's 8 cores with no other actor: 8 torch
    threads; two actors get 4 each. (Mutant: the cores were split as if among at least 2 actors, 4 for one.)"""
    import audit.engines.ray as r

    monkeypatch.setattr(r.os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert r.plan_resources({"CPU": 1.0}, None) == {"workers": 1, "num_gpus": 0, "num_cpus": 0.75, "threads": 8,
                                                    "capped_from": None}
    assert r.plan_resources({"CPU": 8.0}, 1)["threads"] == 8 and r.plan_resources({"CPU": 8.0}, 2)["threads"] == 4
