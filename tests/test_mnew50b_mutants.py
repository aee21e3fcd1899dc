"""Mutation review (session 50, mnew50b) of ``memaudit diff`` (audit/diff.py) and of the scorer registry's checks
(audit/scorers/registry.py, the output checks of audit/scorers/base.py): each test pins a value derived by hand on
small run folders written by ``make_run`` (no model is loaded) or on specs registered here."""

from __future__ import annotations

from test_calib_diff_mutants import _night
from test_report_mutants import make_run


def _rises(d):
    return d.rank_rises.select("prompt", "rise", "old_rank", "rank").rows()


def test_old_ranks_among_the_common_prompts_share_the_best_rank_and_skip_after_a_tie(tmp_path):
    """Old: A 3, B 2, C 2, D 1 -> A 1, B 2, C 2, D 4 (rank "min": the tie takes two places; "dense" gave D 3).
    New: D 4, A 3, B 2, C 1 -> D 1, A 2, B 3, C 4. D rose 3 (4 -> 1); A, B and C fell."""
    from audit.diff import diff_runs

    old = make_run(tmp_path / "old", [("A", 3.0), ("B", 2.0), ("C", 2.0), ("D", 1.0)])
    new = make_run(tmp_path / "new", [("A", 3.0), ("B", 2.0), ("C", 1.0), ("D", 4.0)])
    d = diff_runs(old, new)
    assert _rises(d) == [("D", 3, 4, 1)]
    assert (d.summary["rank_risen"], d.summary["rank_fallen"]) == (1, 3)


def test_no_longer_flagged_is_in_the_old_runs_order_not_the_new_runs(tmp_path):
    """Old (threshold 3): X 5 (rank 1), Y 4 (rank 2), both flagged. New: Y 2 (rank 2), X 1 (rank 3) under Z 9, none
    flagged. The list is the old run's riskiest first: X then Y (by the new ranks it read Y, X); --top 1 keeps X."""
    from audit.diff import diff_runs

    old = make_run(tmp_path / "old", [("X", 5.0), ("Y", 4.0), ("Z", 0.0)], threshold=3.0)
    new = make_run(tmp_path / "new", [("X", 1.0), ("Y", 2.0), ("Z", 9.0)], threshold=10.0)
    d = diff_runs(old, new)
    assert d.no_longer_flagged.select("prompt", "old_rank", "rank").rows() == [("X", 1, 3), ("Y", 2, 2)]
    assert diff_runs(old, new, top=1).no_longer_flagged["prompt"].to_list() == ["X"]
    assert d.summary["no_longer_flagged"] == 2


def test_a_prompt_is_flagged_when_any_of_its_rows_is(tmp_path):
    """A prompt on two rows of which one is flagged (risks 3 and 1 at threshold 2) counts as flagged: newly flagged
    against an old run that flagged nothing (threshold 9), and no longer flagged against a new run that flags
    nothing; its rows are 2 in both lists."""
    from audit.diff import diff_runs

    two = make_run(tmp_path / "two", [("a", 3.0), ("a", 1.0), ("b", 0.5)], threshold=2.0)
    none = make_run(tmp_path / "none", [("a", 0.2), ("b", 0.1)], threshold=9.0)
    up = diff_runs(none, two)
    assert up.newly_flagged.select("prompt", "status", "rows").rows() == [("a", "was not flagged", 2)]
    assert up.summary["new_flagged"] == 1
    down = diff_runs(two, none)
    assert down.no_longer_flagged.select("prompt", "old_rank", "rank").rows() == [("a", 1, 1)]
    assert (down.summary["old_flagged"], down.summary["no_longer_flagged"]) == (1, 1)


def test_previous_run_breaks_a_tie_of_start_times_alike_for_the_latest_and_the_best(tmp_path):
    """Two earlier runs of the new run's settings started in the same second: the first by name is taken, and no run
    is "passed over" (the latest and the best are the same run; taking the last of a tie as the latest logged that
    x1 passed over x2, a run of the same model and settings)."""
    from audit.diff import previous_run

    runs = tmp_path / "nightly"
    runs.mkdir()
    new = _night(runs, "d", "2026-01-04T00:00:00+00:00", "2026-01-04T00:00:00+00:00", 4)
    _night(runs, "x1", "2026-01-03T00:00:00+00:00", "2026-01-03T00:00:00+00:00", 1)
    _night(runs, "x2", "2026-01-03T00:00:00+00:00", "2026-01-03T00:00:00+00:00", 1)
    said = []
    assert previous_run(runs, new, log=said.append) == runs / "x1"
    assert said == []



def test_confirm_runs_of_one_scorer_and_cut_with_other_confirm_settings_rank_differently():
    """Two --confirm runs of noise_magnitude at --confirm-top 5 whose confirming score configurations differ (seed 0
    vs 1) confirmed with other scores: the diff warns that they rank differently (one warning); the same settings
    get none."""
    from audit.diff import _comparability

    def manifest(seed):
        return {"model": {"fingerprint": "f"}, "score_config": {}, "counts": {"scored": 3},
                "confirm": {"scorer": "noise_magnitude", "top": "5", "score_config": {"seed": seed}}}

    assert _comparability(manifest(0), manifest(0)) == []
    differ = _comparability(manifest(0), manifest(1))
    assert len(differ) == 1 and differ[0].startswith(
        "the runs rank differently: the old run was confirmed with noise_magnitude (--confirm-top 5), the new one "
        "confirmed with noise_magnitude (--confirm-top 5); ")


def test_a_prompt_column_recorded_as_one_name_is_compared_with_a_list_of_names():
    """A manifest recording --prompt-column as one string ("text") against one recording a list: ["caption", "text"]
    is another choice (a note naming both), ["text"] the same one (no note), and a string against another string a
    note too."""
    from audit.diff import _prompt_column_note

    def m(value):
        return {"run_config": {"prompt_column": value}}

    tail = ": a prompt new or gone may be a row read from another column or rejected (rejects.parquet), not a change " \
           "in the inputs"
    assert _prompt_column_note(m("text"), m(["caption", "text"])) == [
        "the runs read their prompts under different --prompt-column names ('text' vs 'caption' or 'text')" + tail]
    assert _prompt_column_note(m("text"), m(["text"])) == []
    assert _prompt_column_note(m("prompt"), m("text")) == [
        "the runs read their prompts under different --prompt-column names ('prompt' vs 'text')" + tail]


def test_rises_tied_in_rise_and_rank_keep_the_new_runs_order_and_the_same_top(tmp_path):
    """2,000 prompts risk 1 under A (2) in the old run and 3 over A (0) in the new one all rose 1 to new rank 1: a tie
    in (rise, rank). Polars' multi-threaded sort left them in another order on each call, so two diffs of the same
    runs listed other prompts under --top; they are in the new run's row order (its ties by prompt_id), and --top 5
    keeps the first five. (A list holds at most MAX_TOP = 1,000 prompts: --top 2,000 lists the first 1,000 of the
    2,000 tied, sorted with all of them.)"""
    from audit.diff import diff_runs
    from audit.report import MAX_TOP

    n = 2000
    old = make_run(tmp_path / "old", [("A", 2.0)] + [(f"T{i:05d}", 1.0) for i in range(n)])
    new = make_run(tmp_path / "new", [("A", 0.0)] + [(f"T{i:05d}", 3.0) for i in range(n)])
    in_order = sorted(f"in/a.parquet#{i}" for i in range(1, n + 1))  # the new run's ranks 1..n
    for _ in range(3):
        d = diff_runs(old, new, top=n)
        assert d.rank_rises.select("rise", "old_rank", "rank").unique().rows() == [(1, 2, 1)]
        assert d.rank_rises["prompt_id"].to_list() == in_order[:MAX_TOP] and MAX_TOP < n
    assert diff_runs(old, new, top=5).rank_rises["prompt_id"].to_list() == in_order[:5]

PROMPTS = ["a red cat on a beach", "old city street at night", "a blue dog"]


def test_a_shipped_name_replaced_by_its_own_compute_with_other_settings_is_keyed_not_served_the_shipped_scores(
        tmp_path, tiny_model_dir):
    """A spec registered with replace=True under ``attention_entropy`` (compute None, as the shipped one) or
    ``noise_magnitude`` (the shipped compute) but with ``higher_is_riskier`` flipped passed as the shipped scorer: no
    code identity, so its runs shared the shipped scorer's cache entries and calibrations. A second run with --cache
    was served the shipped risks (3 hits), not their negation. Now such a spec is keyed (``scorer_code`` with
    higher_is_riskier False) and the run scores every prompt anew; the shipped spec put back is shipped again."""
    import dataclasses

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.scorers import SCORERS, register
    from audit.scorers.registry import code_identity, is_shipped, recorded_config

    for name in ("attention_entropy", "noise_magnitude"):
        builtin = SCORERS[name]
        try:
            mine = register(dataclasses.replace(builtin, higher_is_riskier=False), replace=True)
            assert not is_shipped(mine)
            ident = code_identity(mine)
            assert (ident["forward"], ident["higher_is_riskier"]) == (builtin.forward, False)
            assert recorded_config({"scorer": name, "seed": 0}) == {"scorer": name, "seed": 0, "scorer_code": ident}
        finally:
            register(builtin, replace=True)
        assert SCORERS[name] is builtin and is_shipped(builtin) and code_identity(builtin) is None
        assert recorded_config({"scorer": name, "seed": 0}) == {"scorer": name, "seed": 0}

    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS) + "\n")

    def run(i):
        res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out",
                                       str(tmp_path / f"r{i}"), "--cache", str(tmp_path / "cache"), "--no-progress"])
        assert res.exit_code == 0, res.output
        table = pq.read_table(tmp_path / f"r{i}" / "risk.parquet").to_pydict()
        return " ".join(res.output.split()), dict(zip(table["prompt"], table["risk"]))

    builtin = SCORERS["attention_entropy"]
    out0, first = run(0)
    try:
        register(dataclasses.replace(builtin, higher_is_riskier=False), replace=True)
        out1, second = run(1)
    finally:
        register(builtin, replace=True)
    assert all("cache 0 rows hit, 3 rows scored by the model" in out for out in (out0, out1))
    assert sorted(first) == sorted(PROMPTS) and all(first[p] > 0 for p in PROMPTS)
    assert {p: -r for p, r in second.items()} == first


def _scaled(ctx, factor=1.0):
    """factor x (1 - BOS mass): a formula with a setting, bound by functools.partial."""
    return {"uc_p": factor * (1.0 - ctx.a[:, 0])}


def _other(ctx, factor=1.0):
    return {"uc_p": factor * ctx.a[:, 0]}


def test_a_partial_compute_is_keyed_by_the_function_it_wraps_and_its_arguments_and_registers_again_cleanly():
    """compute=functools.partial(f, factor=...) was keyed by functools.py and the name "functools.": factor 10 and
    factor 3, or another function, had one code identity, so the cache served the old setting's scores. Registering
    a second partial under the name read its __qualname__ and raised AttributeError; now it is refused as another
    scorer (not known to be the same code), and replace=True takes it."""
    import functools

    import pytest

    from audit.scorers import Column, ScorerSpec, register, unregister
    from audit.scorers.registry import code_identity

    def spec(compute):
        return ScorerSpec(name="uc_part", description="t", forward="partial_conditional", compute=compute,
                          risk_column="uc_p", columns=(Column("uc_p", "double", "x"),))

    ten = code_identity(spec(functools.partial(_scaled, factor=10.0)))["code"]
    assert code_identity(spec(functools.partial(_scaled, factor=10.0)))["code"] == ten
    others = {code_identity(spec(c))["code"] for c in (functools.partial(_scaled, factor=3.0),
                                                        functools.partial(_other, factor=10.0), _scaled)}
    assert len(others) == 3 and ten not in others
    try:
        first = register(spec(functools.partial(_scaled, factor=10.0)))
        with pytest.raises(ValueError, match=r"^scorer uc_part is already registered \('t'\): give yours another "
                                             r"name, or unregister\('uc_part'\) first$"):
            register(spec(functools.partial(_scaled, factor=3.0)))
        from audit.scorers import SCORERS

        assert SCORERS["uc_part"] is first
        assert register(spec(functools.partial(_scaled, factor=3.0)), replace=True).compute.keywords == {"factor": 3.0}
    finally:
        unregister("uc_part")


def test_code_identity_holds_each_value_setting_and_the_digest_of_the_module_file_and_function_name():
    """code_identity of a contributed spec, computed by hand: forward, risk_column, higher_is_riskier, scheduler and
    the column names as given, and code = BLAKE2b-64 of this module file's bytes then "<module>.<qualname>"; the
    same spec with scheduler "family" or another function of this file differs only where it should."""
    import dataclasses
    import hashlib
    import sys

    from audit.scorers import Column, ScorerSpec
    from audit.scorers.registry import code_identity

    spec = ScorerSpec(name="uc_ident", description="t", forward="full_conditional_unconditional", compute=_scaled,
                      risk_column="uc_p", columns=(Column("uc_p", "double", "x"),), higher_is_riskier=False,
                      scheduler="ddim")
    module = sys.modules[_scaled.__module__]
    with open(module.__file__, "rb") as f:
        code = hashlib.blake2b(f.read() + f"{_scaled.__module__}._scaled".encode(), digest_size=8).hexdigest()
    assert code_identity(spec) == {"forward": "full_conditional_unconditional", "risk_column": "uc_p",
                                   "higher_is_riskier": False, "scheduler": "ddim", "columns": ["uc_p"], "code": code}
    family = code_identity(dataclasses.replace(spec, scheduler="family"))
    assert family == code_identity(spec) | {"scheduler": "family"}
    other = code_identity(dataclasses.replace(spec, compute=_other))
    assert other["code"] != code and other | {"code": code} == code_identity(spec)


def test_a_value_not_finite_in_one_of_two_calls_is_named_not_said_as_a_difference_of_0():
    """check_deterministic: NaN then 2.0 on row 1 (row 0 equal) was "largest difference 0", a difference that is no
    difference; it names the values and the row. A finite difference is still the largest (0.5); values within the
    tolerance and NaN on both calls pass."""
    import types

    import pytest
    import torch

    from audit.errors import ScorerError
    from audit.scorers.base import check_deterministic

    spec = types.SimpleNamespace(name="uc_det", columns=[types.SimpleNamespace(name="uc_c")])

    def check(a, b):
        check_deterministic(spec, {"uc_c": torch.tensor(a, dtype=torch.float64)},
                            {"uc_c": torch.tensor(b, dtype=torch.float64)})

    head = "scorer uc_det: compute(ctx) gave other uc_c values when called twice on the same batch "
    with pytest.raises(ScorerError) as err:
        check([1.0, float("nan")], [1.0, 2.0])
    assert str(err.value).startswith(head + "(nan then 2.0 for row 1 of the batch): a prompt's score must depend")
    with pytest.raises(ScorerError) as err:
        check([1.0, float("inf"), 5.0], [1.5, float("nan"), 5.0])
    assert str(err.value).startswith(head + "(largest difference 0.5): ")
    check([1.0, float("nan")], [1.00001, float("nan")])


def test_every_risk_table_column_is_refused_as_a_score_column_and_the_risk_column_is_its_own_or_attn_entropy():
    """Each column every risk table has (rank, flagged, prompt_hash, reason, ...), not only ``prompt``, is refused as a
    scorer's column, naming it; a risk_column that is another shared column (bos_mass, risk, a per-layer column) is
    refused too, listing the scorer's columns."""
    import pytest

    from audit.scorers import Column, ScorerSpec
    from audit.scorers.registry import TABLE_COLUMNS

    def spec(column, risk_column=None):
        return ScorerSpec(name="uc_cols", description="t", forward="partial_conditional", compute=_scaled,
                          risk_column=risk_column or column, columns=(Column(column, "double", "x"),))

    assert len(TABLE_COLUMNS) == 17
    for name in sorted(TABLE_COLUMNS):
        with pytest.raises(ValueError) as err:
            spec(name)
        assert str(err.value) == f"scorer uc_cols: column {name} is a column every risk table already has"
    for risk in ("bos_mass", "risk", "attn_entropy_l00"):
        with pytest.raises(ValueError) as err:
            spec("uc_p", risk)
        assert str(err.value) == (f"scorer uc_cols: risk_column {risk!r} is neither one of its columns (uc_p) nor "
                                  "attn_entropy")
    assert spec("uc_p", "attn_entropy").risk_column == "attn_entropy"


def test_a_compute_without_a_module_file_is_keyed_by_its_compiled_code_and_constants():
    """A compute defined where no module file is (a notebook, ``python -c``): its code identity is the marshalled code
    object, so the same source executed twice (another function object, at another address) keeps its identity, and
    an edited constant changes it."""
    import sys
    import types

    from audit.scorers import Column, ScorerSpec
    from audit.scorers.registry import code_identity

    def compiled(factor):
        module = types.ModuleType("uc_nofile_module")  # no __file__
        sys.modules["uc_nofile_module"] = module
        exec(f"def compute(ctx):\n    return {{'uc_p': {factor} * ctx.a[:, 0]}}\n", module.__dict__)
        return module.compute

    def code(compute):
        return code_identity(ScorerSpec(name="uc_nofile", description="t", forward="partial_conditional",
                                        compute=compute, risk_column="uc_p",
                                        columns=(Column("uc_p", "double", "x"),)))["code"]

    try:
        first, again, edited = compiled(2.0), compiled(2.0), compiled(3.0)
        assert first is not again and code(first) == code(again)
        assert code(edited) != code(first)
    finally:
        sys.modules.pop("uc_nofile_module", None)


class _Doubled:
    """A compute written as a callable object: 2 x (1 - BOS mass)."""

    def __call__(self, ctx):
        return {"uc_p": 2.0 * (1.0 - ctx.a[:, 0])}


class _Halved:
    """Another callable class of the same module: 0.5 x (1 - BOS mass)."""

    def __call__(self, ctx):
        return {"uc_p": 0.5 * (1.0 - ctx.a[:, 0])}


def test_callable_objects_of_two_classes_of_one_module_have_other_code_identities():
    """A compute that is an instance of a class with __call__ has no __qualname__: code_identity keyed it by the
    module file and "<module>." alone, so _Doubled() and _Halved() of this file shared one identity (and the cache
    served one's scores to the other). The class's name is keyed now; two instances of one class agree."""
    from audit.scorers import Column, ScorerSpec
    from audit.scorers.registry import code_identity

    def code(compute):
        return code_identity(ScorerSpec(name="uc_obj", description="t", forward="partial_conditional", compute=compute,
                                        risk_column="uc_p", columns=(Column("uc_p", "double", "x"),)))["code"]

    assert code(_Doubled()) == code(_Doubled())
    assert code(_Doubled()) != code(_Halved())


def test_two_calls_differing_by_a_thousandth_are_refused_and_by_rounding_pass():
    """check_deterministic's default tolerance is 1e-4 (relative, and absolute near 0): 1.0 then 1.001 is refused as
    "largest difference 0.001"; 1.0 then 1.00005, and 0 then 5e-5, are float rounding and pass."""
    import types

    import pytest
    import torch

    from audit.errors import ScorerError
    from audit.scorers.base import check_deterministic

    spec = types.SimpleNamespace(name="uc_det", columns=[types.SimpleNamespace(name="uc_c")])

    def check(a, b):
        check_deterministic(spec, {"uc_c": torch.tensor(a, dtype=torch.float64)},
                            {"uc_c": torch.tensor(b, dtype=torch.float64)})

    with pytest.raises(ScorerError, match=r"same batch \(largest difference 0\.001\): "):
        check([1.0, 2.0], [1.001, 2.0])
    check([1.0, 0.0], [1.00005, 5e-5])
