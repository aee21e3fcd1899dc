"""Mutation review (session 53, helper mnew53) of session 52's changes (git diff 6a65ef4 008fd72 -- audit/): the
settings a cache part records and their reading, the diff's rounding warning and empty lists, the Ray engine's
settings_kept, registry._globals_text, faults.termination_held, the report's histogram table and report.json, and the
empty-path refusal. Each test pins a behaviour that a hand-made change of the code (named in its docstring) left
passing the tests before it."""

from __future__ import annotations

from collections import Counter
import json
import os

import numpy as np
import pytest


# ------------------------------------------------------------------ cache: the settings each part records

def _cache(tmp_path):
    from audit.cache import ScoreCache, cache_config

    sc = cache_config({"scorer": "attention_entropy", "seed": 0}, "cpu:2", False)
    return ScoreCache(tmp_path / "cache", "fp", sc), sc


def _put(cache, hashes, settings):
    cache.put(hashes, {c: np.full(len(hashes), 1.0) for c in cache.columns}, [[]] * len(hashes), scored_with=settings)


def test_parts_of_one_setting_give_it_once_and_each_footer_is_read_once_per_process(tmp_path, monkeypatch):
    """Two parts stored with the same settings serve one value per setting (served_with keeps the distinct values:
    appending each part's gave ``batch_size [8, 8]``); their compacted part records each value once (extending with
    every part's values wrote ``[8, 8]`` in the merged footer); and a part's footer is read once per process, also
    by another ScoreCache of the same folder (a unit group's), as bb4f891 made it (reading it at every served_with
    passed the tests)."""
    import pyarrow.parquet as pq

    from audit.cache import SCORED_WITH_KEY, ScoreCache

    cache, sc = _cache(tmp_path)
    hashes = [f"{i:032x}" for i in range(4)]
    same = {"batch_size": 8, "compile": False, "device": "cpu:2", "engine": "local"}
    _put(cache, hashes[:2], same)
    _put(cache, hashes[2:], same)
    want = {"batch_size": [8], "compile": [False], "device": ["cpu:2"], "engine": ["local"]}
    real = pq.read_schema
    reads = Counter()

    def counting(where, *args, **kwargs):
        reads[str(where)] += 1
        return real(where, *args, **kwargs)

    monkeypatch.setattr(pq, "read_schema", counting)
    assert cache.lookup(hashes).num_rows == 4
    assert cache.served_with(hashes) == want
    parts = {str(p) for p in cache.files()}
    assert len(parts) == 2 and all(reads[p] for p in parts)
    reads.clear()  # (each part read so far: its check, its settings)
    assert cache.served_with(hashes[:1]) == want
    other = ScoreCache(tmp_path / "cache", "fp", sc)
    assert other.lookup(hashes).num_rows == 4
    assert other.served_with(hashes) == want
    assert not any(reads[p] for p in parts), reads
    assert cache.compact(max_files=1) == 2
    (part,) = cache.files()
    assert json.loads(real(part).metadata[SCORED_WITH_KEY]) == want



def test_a_cached_failure_scored_again_now_does_not_count_the_settings_of_its_part(tmp_path, tiny_model_dir):
    """A prompt whose cached row is a failure (``nonfinite`` set: an older memaudit stored failures, without a record
    of its settings) is a miss and scored again now: its part did not serve it, so it adds nothing to the run's
    scored_with. Asking served_with for every scored prompt of the unit (the misses too) passed the tests; the run
    then read ``batch_size [8, 'unknown']``, mixed, and warned of rounding it does not have."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpers import prompts_file, run_audit

    src = prompts_file(tmp_path / "p6.txt", 6)
    cache = tmp_path / "xc"
    run_audit([src], tiny_model_dir, tmp_path / "fill", device="cpu", batch_size=8, cache=str(cache))
    parts = list(cache.glob("*/part-*.parquet"))
    assert parts
    for part in parts:  # as an older memaudit stored failures: nonfinite set, no record of the settings
        table = pq.read_table(part)
        i = table.schema.get_field_index("nonfinite")
        failed = pa.array([True] * table.num_rows).cast(table.schema.field(i).type)
        table = table.set_column(i, table.schema.field(i), failed).replace_schema_metadata(None)
        pq.write_table(table, part, write_page_checksum=True)
    _, m = run_audit([src], tiny_model_dir, tmp_path / "again", device="cpu", batch_size=8, cache=str(cache))
    assert (m["cache"]["hits"], m["cache"]["scored"]) == (0, 6)
    assert m["scored_with"]["batch_size"] == [8] and m["scored_with"]["mixed"] == []


# ------------------------------------------------------------------ diff: each run's values in the rounding warning

def _scored(run, scored_with):
    manifest = json.loads((run / "manifest.json").read_text())
    if scored_with is None:
        manifest.pop("scored_with", None)
    else:
        manifest["scored_with"] = scored_with
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def test_the_diffs_rounding_warning_names_each_runs_values_without_auto_and_says_what_a_run_did_not_record(tmp_path):
    """The warning spells each run's values (mixed_settings_warning's sides): ``auto`` (a batch size not yet chosen)
    is no value there either (``old run auto / 8`` passed the tests), and a run without a record (an older memaudit)
    beside a new run mixed within itself reads ``old run not recorded`` (an empty ``old run ,`` passed)."""
    from audit.diff import diff_runs
    from test_report_mutants import make_run

    one = {"batch_size": [8], "compile": [False], "device": ["cpu:2"], "engine": ["local"], "mixed": []}
    rows = [("a red cat", 1.0), ("b", 2.0)]
    old = _scored(make_run(tmp_path / "old", rows), dict(one, batch_size=["auto", 8]))
    new = _scored(make_run(tmp_path / "new", rows), dict(one, batch_size=[32]))

    def rounding(a, b):
        return [w for w in diff_runs(a, b).warnings if "float rounding" in w]

    assert rounding(old, new) == [
        "the two runs were scored with different settings (batch_size: old run 8, new run 32): a prompt's risk may "
        "differ between them by float rounding (about 1e-7), so near-equal risks may swap ranks with the prompt "
        "unchanged"]
    _scored(old, None)
    _scored(new, dict(one, batch_size=[8, 32], mixed=["batch_size"]))
    (line,) = rounding(old, new)
    assert line.startswith("the two runs were scored with different settings (batch_size: old run not recorded, "
                           "new run 8 / 32): ")
    _scored(new, dict(one, batch_size=[8]))
    assert rounding(old, new) == []


# ------------------------------------------------------------------ registry: the module-level values a scorer reads

A_FACTOR = 2.0
Z_SHIFT = 1
M_NAME = "m"
B_POWER = 3
Y_SCALE = 0.5
C_FLAGS = (1, 2)


def _reads_in_a_lambda(ctx):
    return {"uc_obj": (lambda a: A_FACTOR * a)(1.0 - ctx.a[:, 0])}


def _reads_six(ctx):
    return {"uc_obj": Z_SHIFT + Y_SCALE * B_POWER * A_FACTOR * len(M_NAME) * len(C_FLAGS) * (1.0 - ctx.a[:, 0])}


class _BoundReader:
    def compute(self, ctx):
        return {"uc_obj": A_FACTOR * (1.0 - ctx.a[:, 0])}


def test_the_values_read_in_nested_code_or_a_bound_method_are_keyed_in_name_order(monkeypatch):
    """_globals_text keys the plain values a function's nested code reads (a lambda inside it: not walking co_consts
    passed the tests, so A_FACTOR = 3 was served A_FACTOR = 2's scores), those of a bound method's function (without
    ``__func__`` a bound method read as an object with no methods, so none were keyed) and spells them in name order
    (in the order of a set of names, which another process's hash seed orders otherwise: another code for the same
    function after a kernel restart)."""
    import sys

    from audit.scorers.registry import _globals_text, code_identity
    from test_ucachefix_findings import obj_spec

    assert _globals_text(_reads_in_a_lambda) == "|A_FACTOR=2.0"
    assert _globals_text(_BoundReader().compute) == "|A_FACTOR=2.0"
    assert _globals_text(_reads_six) == "|A_FACTOR=2.0|B_POWER=3|C_FLAGS=(1, 2)|M_NAME='m'|Y_SCALE=0.5|Z_SHIFT=1"

    def codes():
        return [code_identity(obj_spec(f))["code"] for f in (_reads_in_a_lambda, _BoundReader().compute)]

    before = codes()
    monkeypatch.setattr(sys.modules[__name__], "A_FACTOR", 3.0)
    assert all(a != b for a, b in zip(codes(), before))


# ------------------------------------------------------------------ the Ray engine's settings, given back

class _DataContext:
    """A stand-in for ray.data.DataContext: settings_kept reads only ``sys.modules['ray.data']``."""
    current = None

    def __init__(self):
        self.enable_progress_bars = True
        self.print_on_execution_start = True

    @classmethod
    def get_current(cls):
        if cls.current is None:
            cls.current = cls()
        return cls.current


@pytest.mark.parametrize("imported_before", [False, True])
def test_settings_kept_gives_back_each_variable_logger_filter_and_progress_setting_as_the_caller_had_it(
        monkeypatch, imported_before):
    """What the Ray engine sets for its run is put back as the caller had it: a variable the caller had set gets its
    value back (not only those it lacked removed), the loggers their levels, the warnings filters their list (the
    engine's ray.data filter gone) and Ray Data's progress settings the caller's, or Ray Data's defaults where the
    run imported it. Checked without Ray: the tests that run it set none of these beforehand."""
    import logging
    import sys
    import types
    import warnings

    from audit.engines.ray import _ENV_SET, quiet_ray, settings_kept

    for name in _ENV_SET:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("PYTHONBREAKPOINT", "pdb.set_trace")
    monkeypatch.setattr(_DataContext, "current", None)
    monkeypatch.delitem(sys.modules, "ray.data", raising=False)
    module = types.SimpleNamespace(DataContext=_DataContext)
    if imported_before:  # the caller's own Ray Data job, its bars off
        monkeypatch.setitem(sys.modules, "ray.data", module)
        _DataContext.get_current().enable_progress_bars = False
    loggers = {name: logging.getLogger(name) for name in ("ray.data", "ray._private.authentication")}
    levels = {name: logger.level for name, logger in loggers.items()}
    try:
        loggers["ray.data"].setLevel(logging.WARNING)
        loggers["ray._private.authentication"].setLevel(logging.INFO)
        with warnings.catch_warnings():
            filters = list(warnings.filters)
            with settings_kept():
                for name in _ENV_SET:
                    monkeypatch.setenv(name, "set by the run")
                quiet_ray()
                loggers["ray.data"].setLevel(logging.CRITICAL)
                monkeypatch.setitem(sys.modules, "ray.data", module)
                ctx = _DataContext.get_current()
                ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
                assert warnings.filters != filters
            assert warnings.filters == filters
        assert {name: os.environ.get(name) for name in _ENV_SET} == {
            "RAY_USAGE_STATS_ENABLED": None, "RAY_ENABLE_AUTO_CONNECT": None, "PYTHONBREAKPOINT": "pdb.set_trace",
            "RAY_AUTH_MODE": "disabled"}
        assert [loggers[n].level for n in ("ray.data", "ray._private.authentication")] == [logging.WARNING,
                                                                                            logging.INFO]
        assert (ctx.enable_progress_bars, ctx.print_on_execution_start) == (not imported_before, True)
    finally:
        for name, level in levels.items():
            loggers[name].setLevel(level)


def test_termination_handlers_kept_gives_back_the_callers_sigterm_handler_and_unraisablehook():
    """audit.run in a library caller installs memaudit's SIGTERM/SIGHUP handlers and wraps sys.unraisablehook (the
    Ray engine, after ray.init); termination_handlers_kept puts the caller's back, the hook too (leaving it wrapped
    passed the tests: they run Ray in a subprocess)."""
    import signal
    import sys

    from audit.faults import termination_handlers_kept, terminate_as_interrupt

    def own(signum, frame):  # a service's graceful shutdown
        pass

    def hook(unraisable):
        pass

    saved = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP), sys.unraisablehook)
    try:
        signal.signal(signal.SIGTERM, own)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        sys.unraisablehook = hook
        with termination_handlers_kept():
            terminate_as_interrupt()
            assert signal.getsignal(signal.SIGTERM) is not own and sys.unraisablehook is not hook
        assert signal.getsignal(signal.SIGTERM) is own and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
        assert sys.unraisablehook is hook
    finally:
        signal.signal(signal.SIGTERM, saved[0])
        signal.signal(signal.SIGHUP, saved[1])
        sys.unraisablehook = saved[2]


# ------------------------------------------------------------------ report.json of a run without calibration

def test_report_json_groups_of_an_uncalibrated_run_hold_flagged_null_after_max_risk(tmp_path):
    """report.json's groups have the same keys calibrated or not: an uncalibrated run's ``flagged`` is null (as
    counts.flagged and the histogram's bins: 0 would read "none flagged"), placed after max_risk. Leaving it out of
    an uncalibrated run's groups passed the tests."""
    from audit.report import build_report, render_json
    from test_report_mutants import make_run

    run = make_run(tmp_path / "r", [("a", 1.0, "in/a.parquet"), ("b", 2.0, "in/b.parquet"), ("c", 4.0, "in/b.parquet")])
    doc = json.loads(render_json(build_report(run)))
    assert doc["counts"]["flagged"] is None
    (source,) = doc["breakdowns"]
    assert source["key"] == "source"
    assert source["groups"] == [
        {"group": "in/a.parquet", "rows": 1, "unique": 1, "mean_risk": 1.0, "p95_risk": 1.0, "max_risk": 1.0,
         "flagged": None, "rejected": 0},
        {"group": "in/b.parquet", "rows": 2, "unique": 2, "mean_risk": 3.0, "p95_risk": 4.0, "max_risk": 4.0,
         "flagged": None, "rejected": 0}]
    assert list(source["groups"][0]) == ["group", "rows", "unique", "mean_risk", "p95_risk", "max_risk", "flagged",
                                         "rejected"]


# ------------------------------------------------------------------ audit.text.visible: the character before each range

@pytest.mark.parametrize("char", ["\u00ac", "\u034e", "\u115e", "\u17b3", "\u27ff", "\u3163", "\uff9f", "\U0001bc9f",
                                  "\U0001d172"])
def test_the_drawn_character_before_each_new_range_is_kept(char):
    """The character just before each character or range that visible() escapes since 845be6b is a drawn one
    (U+00AC NOT SIGN before the soft hyphen, U+27FF before the braille blank, U+1D172 before the musical format
    characters, ...) and is shown as is: widening a range one code point down (U+00AC-00AD, U+1D172-1D17A,
    U+17B3-17B5, U+27FF beside U+2800) passed the tests, which checked each range's ends and the character after."""
    from audit.text import visible

    assert visible(f"a{char}b") == f"a{char}b"


def test_report_json_of_a_report_with_groups_left_out_counts_them(tmp_path):
    """A report built without ``all_groups`` keeps a breakdown's first MAX_GROUPS groups; its report.json counts the
    others in ``groups_left_out`` of that breakdown (0 for one with all its groups). Writing 0 for every breakdown
    (the pieces of iter_json) passed the tests, which render report.json of reports built with all groups."""
    from audit.report import MAX_GROUPS, build_report, render_json
    from test_report_mutants import make_run

    n = MAX_GROUPS + 7
    run = make_run(tmp_path / "r", [(f"prompt {i}", 1.0 + i / n) for i in range(n)])
    doc = json.loads(render_json(build_report(run, by=["prompt"])))
    assert [(b["key"], len(b["groups"]), b["groups_left_out"]) for b in doc["breakdowns"]] == [
        ("source", 1, 0), ("prompt", MAX_GROUPS, 7)]
