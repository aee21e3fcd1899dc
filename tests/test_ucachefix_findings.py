"""Findings of session 51's cache and identity fixes (helper ucachefix): runs sharing one score cache, a run killed
with SIGKILL and resumed, callable-object scorers, and CSV ids read by either CSV reader."""

from __future__ import annotations

import os
from pathlib import Path
import subprocess
import sys

import polars as pl

from helpers import run_audit

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


class Inner:
    """A setting held in an object without a ``__repr__`` of its own (its repr names its memory address)."""

    def __init__(self, k):
        self.k = k


class Scaled:
    """A callable-class scorer: ``factor`` x (1 - BOS mass)."""

    def __init__(self, factor, inner=None):
        self.factor = factor
        self.inner = inner

    def __call__(self, ctx):
        return {"uc_obj": self.factor * (1.0 - ctx.a[:, 0])}

    def method(self, ctx):
        return self(ctx)


class Stateless:
    def __call__(self, ctx):
        return {"uc_obj": 1.0 - ctx.a[:, 0]}


def obj_spec(compute):
    from audit.scorers import Column, ScorerSpec

    return ScorerSpec(name="uc_obj", description="t", forward="partial_conditional", compute=compute,
                      risk_column="uc_obj", columns=(Column("uc_obj", "double", "x"),))


def test_two_instances_of_a_callable_class_scorer_with_other_attributes_have_other_code_identities():
    """code_identity of a callable object read its class's module file and name only: Scaled(10.0) and Scaled(3.0)
    (or a bound method of each) were one code, one cache key and one run identity, so the second was served the
    first's scores. Now its attributes are keyed: equal ones give one code, in this process and in another (an
    attribute whose repr holds a memory address is keyed by its own attributes), other ones another code; an
    instance without attributes keeps the code it had (module file and class name)."""
    import hashlib

    from audit.cache import cache_config, cache_key
    from audit.scorers.registry import code_identity, recorded_config

    def code(compute):
        return code_identity(obj_spec(compute))["code"]

    ten = code(Scaled(10.0, Inner(1)))
    assert code(Scaled(10.0, Inner(1))) == ten
    others = [code(c) for c in (Scaled(3.0, Inner(1)), Scaled(10.0, Inner(2)), Scaled(10.0), Stateless())]
    assert len(set(others)) == 4 and ten not in others
    assert code(Scaled(10.0).method) != code(Scaled(3.0).method)
    assert code(Scaled(10.0).method) == code(Scaled(10.0).method)
    with open(__file__, "rb") as f:
        body = f.read()
    assert code(Stateless()) == hashlib.blake2b(body + f"{__name__}.Stateless".encode(), digest_size=8).hexdigest()
    # another process computes the same code for equal settings (no memory address in it)
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import test_ucachefix_findings as t; "
              "from audit.scorers.registry import code_identity; "
              "print(code_identity(t.obj_spec(t.Scaled(10.0, t.Inner(1))))['code'])")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", script, str(TESTS)], capture_output=True, text=True, env=env,
                         cwd=TESTS, check=True).stdout.split()
    assert out == [code(Scaled(10.0, Inner(1)))]
    # ... and so the cache keys differ
    from audit.scorers import register, unregister

    keys = []
    for factor in (10.0, 3.0):
        register(obj_spec(Scaled(factor)), replace=True)
        try:
            keys.append(cache_key("fp", cache_config(recorded_config({"scorer": "uc_obj", "seed": 0}), "cpu:1",
                                                     False)))
        finally:
            unregister("uc_obj")
    assert keys[0] != keys[1]


def test_a_callable_class_scorer_run_with_other_attributes_is_not_served_the_first_ones_cached_scores(
        tmp_path, tiny_model_dir):
    """Two runs sharing --cache, the first with Scaled(1.0), the second with Scaled(-2.0): the second had 4 hits and
    the first one's risks. Now it scores every prompt (0 hits) and its risks are -2 times the first's."""
    from audit.scorers import register, unregister

    src = tmp_path / "p.txt"
    src.write_text("a red cat on a beach\nold city street at night\na blue dog\nportrait of a woman\n")
    risks, caches = [], []
    for i, factor in enumerate((1.0, -2.0)):
        register(obj_spec(Scaled(factor)), replace=True)
        try:
            run, manifest = run_audit([src], tiny_model_dir, tmp_path / f"r{i}", device="cpu", batch_size=8,
                                      scorer="uc_obj", cache=str(tmp_path / "cache"))
        finally:
            unregister("uc_obj")
        caches.append(manifest["cache"])
        t = pl.read_parquet(run / "risk.parquet").sort("prompt")
        risks.append(t["risk"].to_list())
    assert [(c["hits"], c["scored"]) for c in caches] == [(0, 4), (0, 4)]
    assert all(r > 0 for r in risks[0])
    assert risks[1] == [-2.0 * r for r in risks[0]]


def test_a_quoted_empty_csv_id_or_prompt_reads_the_same_whether_or_not_another_row_of_the_file_is_ragged(
        tmp_path, tiny_model_dir):
    """A CSV row `"",a red cat` under --id-column id was scored with prompt_id "" in a file whose rows all match the
    header, but rejected as null_id in the same file with one more, unrelated, ragged row (read record by record by
    Python's csv module, which reads a quoted "" as an empty field); a quoted "" prompt was empty_prompt or
    null_prompt alike. Now both readers read a quoted "" as the empty string and an empty field as null."""
    rows = ['"",a red cat', ',a blue dog', 'b,""', 'c,', 'd,"a ""quoted"" cat"', '"",""']
    outcomes = {}
    for name, extra in (("clean", []), ("ragged", ["e,a, ragged"])):
        src = tmp_path / f"{name}.csv"
        src.write_text("id,prompt\n" + "".join(r + "\n" for r in rows + extra))
        run, manifest = run_audit([src], tiny_model_dir, tmp_path / name, device="cpu", batch_size=8, id_column="id",
                                  max_error_fraction=1.0)
        risk = pl.read_parquet(run / "risk.parquet")
        rejects = pl.read_parquet(run / "rejects.parquet")
        got = {r: ("scored", i, p) for r, i, p in risk.select("row", "prompt_id", "prompt").iter_rows()}
        got |= {r: (reason, i.replace(str(src), "FILE"), p)
                for r, reason, i, p in rejects.select("row", "reason", "prompt_id", "prompt").iter_rows()}
        outcomes[name] = got
    assert outcomes["clean"] == {0: ("scored", "", "a red cat"), 1: ("null_id", "FILE#1", "a blue dog"),
                                 2: ("empty_prompt", "b", ""), 3: ("null_prompt", "c", None),
                                 4: ("scored", "d", 'a "quoted" cat'), 5: ("empty_prompt", "", "")}
    assert outcomes["ragged"] == outcomes["clean"] | {6: ("invalid_csv_row", "FILE#6", "e,a, ragged")}


HASHES = [f"{i:032x}" for i in range(12)]
SC = {"scorer": "attention_entropy", "seed": 0}


def _scores(values, nonfinite=None):
    import numpy as np

    from audit.cache import SCORE_COLUMNS

    scores = {c: np.asarray(values, dtype=float) for c in SCORE_COLUMNS}
    scores["nonfinite"] = np.zeros(len(values)) if nonfinite is None else np.asarray(nonfinite, dtype=float)
    return scores


def _rows(paths):
    import pyarrow.parquet as pq

    return sorted((h, r, n) for p in paths
                  for h, r, n in zip(*pq.read_table(p, columns=["prompt_hash", "risk", "nonfinite"]).to_pydict()
                                     .values()))


def _in_another_process(code: str, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{TESTS}")
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_two_processes_that_both_missed_a_prompt_store_it_once(tmp_path, monkeypatch):
    """Two runs sharing one --cache that both miss a prompt (both looked up before either stored it) both stored
    it: `memaudit run` twice at once over 120 prompts left 160 rows for 120 prompts, and every night's overlap
    added more. Now a put, under an exclusive lock on the folder's key.json, leaves out the prompts another process
    stored since its lookup: here process B stores 8 of the 12 prompts between A's lookup and A's put; A's part
    holds only the other 4 and the cache holds each prompt once, with B's scores (the first stored)."""
    from audit.cache import ScoreCache

    a = ScoreCache(tmp_path / "cache", "fp", SC)
    assert a.lookup(HASHES).num_rows == 0  # A misses all 12 and scores them
    b = _in_another_process(
        "import sys, numpy as np; from audit.cache import ScoreCache; import test_ucachefix_findings as t; "
        "c = ScoreCache(sys.argv[1], 'fp', t.SC); hs = t.HASHES[:8]; assert c.lookup(hs).num_rows == 0; "
        "c.put(hs, t._scores(np.arange(100, 108)), [[]] * 8, tag='b'); print(c.notes)", tmp_path / "cache")
    assert b.communicate(timeout=120)[0].split() == ["[]"] and b.returncode == 0
    a.put(HASHES, _scores(range(12)), [[]] * 12, tag="a")
    assert not a.notes
    parts = sorted(p.name.split("-")[1] for p in a.files())
    assert parts == ["a", "b"]
    assert _rows([f for f in a.files() if "-a-" in f.name]) == [(h, float(i), 0.0) for i, h in enumerate(HASHES)][8:]
    assert _rows(a.files()) == sorted([(h, 100.0 + i, 0.0) for i, h in enumerate(HASHES[:8])]
                                      + [(h, float(i), 0.0) for i, h in enumerate(HASHES)][8:])
    found = ScoreCache(tmp_path / "cache", "fp", SC).lookup(HASHES)
    assert dict(zip(found.column("prompt_hash").to_pylist(), found.column("risk").to_pylist())) == {
        h: (100.0 + i if i < 8 else float(i)) for i, h in enumerate(HASHES)}
    # all of a put's prompts stored by the other: no part at all
    c = ScoreCache(tmp_path / "cache2", "fp", SC)
    c.lookup(HASHES[:2])
    ScoreCache(tmp_path / "cache2", "fp", SC).put(HASHES[:2], _scores([7, 8]), [[]] * 2, tag="x")
    c.put(HASHES[:2], _scores([1, 2]), [[]] * 2, tag="y")
    assert [p.name.split("-")[1] for p in c.files()] == ["x"] and not c.notes
    # a full disk then: the note counts the scores it could not store (5 less the 2 the other stored since)
    import errno

    import pyarrow.parquet as pq

    c.lookup(HASHES[:5])
    ScoreCache(tmp_path / "cache2", "fp", SC).put(HASHES[2:4], _scores([7, 8]), [[]] * 2, tag="z")

    def full(table, where, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    c.put(HASHES[:5], _scores(range(5)), [[]] * 5, tag="w")
    assert c.notes == [f"score cache: cannot store 3 new scores in {c.dir} (OSError: [Errno 28] No space left on "
                       "device); they are in this run's table, and scored again next time"]


def test_a_put_that_cannot_lock_stores_all_and_a_compaction_merges_each_prompt_once(tmp_path, monkeypatch):
    """Another process holds the put lock past PUT_LOCK_WAIT_S (a put stuck on a slow mount): the put writes its
    part unchecked rather than wait forever, so a prompt may be stored twice (as every memaudit before this one
    did). The compaction that merged such parts kept every copy; now the merged part keeps each prompt's first
    finite row in part order (the one a lookup reads) and a failure an older memaudit stored (nonfinite set)
    beside it, and lookups read the same values before and after."""
    import audit.cache
    from audit.cache import ScoreCache

    cache = ScoreCache(tmp_path / "cache", "fp", SC)
    holder = _in_another_process(
        "import fcntl, sys; f = open(sys.argv[1], 'rb'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); "
        "sys.stdin.read()", cache.dir / "key.json")
    try:
        assert holder.stdout.readline().split() == ["held"]
        monkeypatch.setattr(audit.cache, "PUT_LOCK_WAIT_S", 0.1, raising=False)
        for tag, hs, values, nonfinite in (("a", HASHES[0:6], range(6), None),
                                           ("b", HASHES[3:9], range(103, 109), None),
                                           ("c", [HASHES[0], HASHES[9]], [50, 9], [1, 0])):
            cache.lookup(hs)
            cache.put(hs, _scores(values, nonfinite), [[]] * len(hs), tag=tag)
    finally:
        holder.communicate("", timeout=60)
    assert not cache.notes and len(cache.files()) == 3
    assert len(_rows(cache.files())) == 14  # 0-5, 3-8, a failure of 0 and 9: 4 prompts twice
    before = cache.lookup(HASHES)
    assert cache.compact(max_files=0) == 3 and not cache.notes
    (merged,) = cache.files()
    assert merged.name.startswith("part-compact-")
    assert _rows([merged]) == sorted([(h, float(i), 0.0) for i, h in enumerate(HASHES[:6])]
                                     + [(h, float(100 + i), 0.0) for i, h in enumerate(HASHES[:9]) if i >= 6]
                                     + [(HASHES[0], 50.0, 1.0), (HASHES[9], 9.0, 0.0)])
    after = ScoreCache(tmp_path / "cache", "fp", SC).lookup(HASHES)
    assert after.sort_by("prompt_hash").to_pydict() == before.sort_by("prompt_hash").to_pydict()
    assert after.num_rows == 10


def test_a_run_killed_after_storing_a_units_scores_and_resumed_counts_them_as_sent_to_the_model(
        tmp_path, tiny_model_dir):
    """kill -9 of `memaudit run --cache` after a unit's new scores were stored in the cache but before the unit was
    committed: the resumed run found them in the cache and said "cache 16 hits, 30 sent to the model (over the whole
    run, its resumed units included)" where the model had been sent 40 prompts, as an uninterrupted run says (6
    hits: the prompts given again in the last unit). Now the unit records the prompts it sent
    (shards/unit-000002.sent) before the cache stores them, the resumed unit counts them as sent, and the marker
    goes with the commit."""
    import pyarrow.parquet as pq

    from helpers import prompts_file

    src = prompts_file(tmp_path / "p.txt", 40)
    lines = src.read_text().splitlines()
    src.write_text("\n".join(lines + lines[:6]) + "\n")  # 6 prompts again in the last unit: hits in any run
    kw = dict(device="cpu", batch_size=8, unit_rows=10)
    _, whole = run_audit([src], tiny_model_dir, tmp_path / "whole", cache=str(tmp_path / "cache-whole"), **kw)
    assert (whole["cache"]["hits"], whole["cache"]["scored"]) == (6, 40)

    killed = tmp_path / "killed"
    code = ("import os, signal, sys; import audit.unit as u; from helpers import run_audit\n"
            "real = u._write_unit\n"
            "def write(unit, *a, **k):\n"
            "    if unit.index == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(unit, *a, **k)\n"
            "u._write_unit = write\n"
            "run_audit([sys.argv[1]], sys.argv[2], sys.argv[3], cache=sys.argv[4], device='cpu', batch_size=8, "
            "unit_rows=10)\n")
    proc = _in_another_process(code, src, tiny_model_dir, killed, tmp_path / "cache")
    proc.communicate(timeout=300)
    assert proc.returncode == -9
    shards = killed / "shards"
    assert sorted(p.name for p in shards.glob("unit-*.done.json")) == ["unit-000000.done.json",
                                                                      "unit-000001.done.json"]
    marker = shards / "unit-000002.sent"
    marked = marker.stat().st_size if marker.exists() else None
    (cache_folder,) = (tmp_path / "cache").iterdir()
    stored = [p for p in cache_folder.glob("part-u000002-*.parquet")]
    assert len(stored) == 1 and pq.read_metadata(stored[0]).num_rows == 10  # ... and stored before the kill

    run, resumed = run_audit([src], tiny_model_dir, killed, cache=str(tmp_path / "cache"), **kw)
    assert (resumed["cache"]["hits"], resumed["cache"]["scored"]) == (6, 40)
    assert "warnings" not in resumed["cache"]
    assert marked == 16 * 10  # the unit's 10 prompts, sent to the model, as the kill left them
    assert not list(shards.glob("*.sent"))
    cols = ["row", "prompt_hash", "risk"]
    assert pl.read_parquet(run / "risk.parquet").select(cols).sort("row").equals(
        pl.read_parquet(tmp_path / "whole" / "risk.parquet").select(cols).sort("row"))


class Held:
    """A callable scorer whose formula is a function it holds."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, ctx):
        return {"uc_obj": self.transform(ctx.a[:, 0])}


HELD_TWO = Held(lambda a: 2 * a)


def test_a_callable_holding_a_function_is_keyed_by_that_functions_code():
    """A held function was keyed by its name alone: Held(lambda a: 2 * a) and Held(lambda a: 3 * a) were one code,
    so one was served the other's scores from the cache. Its code (bytecode, names, constants) and what it captured
    are keyed now, without its file's path or line, so equal code is one key in another process, and in a clone
    at another path."""
    from audit.scorers.registry import code_identity

    def code(compute):
        return code_identity(obj_spec(compute))["code"]

    two = code(Held(lambda a: 2 * a))
    assert code(Held(lambda a: 2 * a)) == two  # the same code (and name) on another line
    assert code(Held(lambda a: 3 * a)) != two and code(Held(lambda a: 2 + a)) != two

    def times(k):
        return lambda a: k * a

    assert code(Held(times(2))) != code(Held(times(3)))
    assert code(Held(times(2))) == code(Held(times(2)))
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import test_ucachefix_findings as t; "
              "from audit.scorers.registry import code_identity; print(code_identity(t.obj_spec(t.HELD_TWO))['code'])")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", script, str(TESTS)], capture_output=True, text=True, env=env,
                         cwd=TESTS, check=True).stdout.split()
    assert out == [code(HELD_TWO)]


FACTOR = 2.0  # a module-level setting a scorer reads (monkeypatched below, as a notebook cell's K = 3 would set it)


def _reads_factor(ctx):
    return {"uc_obj": FACTOR * (1.0 - ctx.a[:, 0])}


class ReadsFactor:
    def __call__(self, ctx):
        return {"uc_obj": FACTOR * (1.0 - ctx.a[:, 0])}


def test_a_module_level_value_a_scorer_reads_is_part_of_its_code_identity(monkeypatch):
    """A plain module-level value a contributed compute reads (``K = 2`` in a notebook cell, then ``K = 3``; or one
    set from the environment when its file is imported) was not keyed: the code was the same, so the second run was
    served the first's cached scores (mnew52a's finding). The value is keyed now, for a function, a held function, a
    callable object's methods and a function of a notebook (no file, another process); a function reading no plain
    value keeps its identity (a module, a function or an array it reads is not keyed)."""
    import numpy as np

    from audit.scorers.registry import _globals_text, code_identity

    def code(compute):
        return code_identity(obj_spec(compute))["code"]

    assert _globals_text(_reads_factor) == "|FACTOR=2.0"
    assert _globals_text(ReadsFactor()) == "|FACTOR=2.0"
    assert _globals_text(Stateless()) == "" and _globals_text(np.mean) == ""
    assert _globals_text(lambda a: np.sqrt(a) + Path(".").stat().st_size) == ""  # modules and classes: not keyed
    assert _globals_text(Scaled(1.0).method) == ""
    before = [code(_reads_factor), code(ReadsFactor()), code(Held(lambda a: FACTOR * a))]
    assert before == [code(_reads_factor), code(ReadsFactor()), code(Held(lambda a: FACTOR * a))]
    monkeypatch.setattr(sys.modules[__name__], "FACTOR", 3.0)
    after = [code(_reads_factor), code(ReadsFactor()), code(Held(lambda a: FACTOR * a))]
    assert all(a != b for a, b in zip(after, before)), (before, after)
    monkeypatch.setattr(sys.modules[__name__], "FACTOR", 2.0)
    assert [code(_reads_factor), code(ReadsFactor()), code(Held(lambda a: FACTOR * a))] == before

    script = ("import sys; sys.path.insert(0, sys.argv[1]); from test_ucachefix_findings import obj_spec; "
              "from audit.scorers.registry import code_identity\nK = {k}\n"
              "def compute(ctx):\n    return {{'uc_obj': K * (1.0 - ctx.a[:, 0])}}\n"
              "print(code_identity(obj_spec(compute))['code'])")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    codes = [subprocess.run([sys.executable, "-c", script.format(k=k), str(TESTS)], capture_output=True, text=True,
                            env=env, cwd=TESTS, check=True).stdout.strip() for k in (2, 3, 2)]
    assert codes[0] == codes[2] != codes[1] and len(codes[0]) == 16, codes
