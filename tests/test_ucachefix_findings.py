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
