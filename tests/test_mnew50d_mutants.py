"""Mutation review (session 50, mnew50d) of the code changed on 2026-12-07: the exit-4 limit, the printed shares,
the digits that keep printed risks and thresholds apart, the score cache's notes and columns, and the sources'
line-break checks. Each test kills a hand-applied mutant that every other test let pass."""

from __future__ import annotations

from test_report_mutants import make_run


def test_a_share_at_or_under_its_limit_keeps_one_decimal():
    """share() adds decimals only to a share *above* the limit that would print as the limit: 1 of 200 rows under a
    limit of 0.01 is 0.5%, and 1 of 100 at a limit of 0.01 (equal, not above) is 1.0%. A share() that added digits
    whenever the shown value was at most the limit ran to its 16-decimal fallback ('0.5000000000000000%')."""
    from audit.text import share

    assert share(1, 200, 0.01) == "0.5%"
    assert share(1, 100, 0.01) == "1.0%"
    assert share(29, 100, 0.29) == "29.0%"
    assert share(0, 100, 0.01) == "0.0%"


def test_equal_rank_rises_list_in_the_new_runs_row_order(tmp_path):
    """Twelve prompts tied at old risk 1.0 all rise to a tied new risk 5.0 (old rank 4, new rank 1: a rise of 3
    each). Their order is the new run's row order (its ranking breaks risk ties by prompt_id, so rows #0, #1, #10,
    #11, #2, ...), the same in every diff of the two runs; the old run holds them in reverse. A sort on rise and rank
    alone left them in whatever order the join made, and one that took best_row descending reversed them."""
    from audit.diff import diff_runs

    tied = [f"t{i}" for i in range(12)]
    before = make_run(tmp_path / "before", [("h0", 10.0), ("h1", 9.0), ("h2", 8.0)] + [(p, 1.0) for p in tied[::-1]])
    after = make_run(tmp_path / "after", [(p, 5.0) for p in tied] + [("h0", 0.5), ("h1", 0.4), ("h2", 0.3)])
    d = diff_runs(before, after)
    order = ["t0", "t1", "t10", "t11", "t2", "t3", "t4", "t5", "t6", "t7", "t8", "t9"]
    assert d.rank_rises["prompt"].to_list() == order
    assert d.rank_rises.select("rise", "old_rank", "rank").unique().rows() == [(3, 4, 1)]
    assert diff_runs(before, after, top=3).rank_rises["prompt"].to_list() == order[:3]


def test_the_shipped_scorers_cache_parts_keep_every_result_column(tmp_path):
    """cache_columns drops only the columns of scorers registered after import (a plugin's), never a shipped
    scorer's: attention_entropy's parts hold noise_magnitude's and guidance_geometry's columns as they always did, in
    this process and in a Ray worker alike. One that dropped every other scorer's columns wrote attention_entropy parts
    of 38 columns that a cache written before found 'not the cache's' and set aside."""
    from audit.cache import ScoreCache, cache_columns
    from audit.scorers import Column, ScorerSpec, register, result_columns, unregister

    shipped = result_columns()
    assert len(shipped) == 45 and "noise_magnitude" in shipped and "late_entropy" in shipped
    for name in (None, "attention_entropy", "noise_magnitude", "guidance_geometry", "attention_entropy_late"):
        assert cache_columns(name) == shipped
    register(ScorerSpec(name="toy50d", description="1 - BOS mass", forward="partial_conditional",
                        compute=lambda *a, **k: None, risk_column="toy50d_score",
                        columns=(Column("toy50d_score", "double", "1 - bos_mass"),)))
    try:
        assert cache_columns("attention_entropy") == shipped and cache_columns("noise_magnitude") == shipped
        assert cache_columns("toy50d") == result_columns() and set(result_columns()) == {*shipped, "toy50d_score"}
        cache = ScoreCache(tmp_path / "c", "fp", {"scorer": "guidance_geometry", "seed": 0})
        assert cache.schema.names == ["prompt_hash", *shipped, "trigger_tokens"]
    finally:
        unregister("toy50d")


def _old_folder(root, fp: str, config: dict, fmt: int):
    import json

    from audit.cache import cache_key

    folder = root / cache_key(fp, config, fmt)
    folder.mkdir(parents=True)
    (folder / "key.json").write_text(json.dumps({"model_fingerprint": fp, "score_config": config}))
    return folder


def test_cache_format_1_folders_are_found_and_the_note_lists_three_then_dots(tmp_path):
    """Format 1 named a folder by the hash of the score configuration alone (no cache_format around it):
    earlier_format_folders finds such a folder as format 1, beside formats 4 and 5. The new folder's note counts all
    four, names the formats once each in order (1, 4, 5), and the first three folders by name, then '...'; with
    three it names all three and no dots."""
    import hashlib
    import json

    from audit.cache import CACHE_FORMAT, ScoreCache, cache_key, earlier_format_folders

    config = {"scorer": "attention_entropy", "seed": 1}
    digest = hashlib.blake2b(json.dumps(config, sort_keys=True).encode(), digest_size=8).hexdigest()
    assert cache_key("fp", config, 1) == f"fp-{digest}" != cache_key("fp", config, 2)
    root = tmp_path / "shared"
    made = [_old_folder(root, "fp", {"scorer": "attention_entropy", "seed": s}, f)
            for s, f in ((1, 1), (2, 5), (3, 4), (4, 5))]
    _old_folder(root, "other", {"scorer": "attention_entropy", "seed": 1}, 1)  # another model's
    found = earlier_format_folders(root, "fp")
    assert sorted(found) == sorted(zip(made, (1, 5, 4, 5))) and [f for f, _ in found] == sorted(made)
    names = [f.name for f, _ in found]
    cache = ScoreCache(root, "fp", {"scorer": "attention_entropy", "seed": 9})
    assert cache.notes == [
        f"score cache: {root} holds 4 folder(s) of this model that an earlier memaudit wrote in an older cache format "
        f"(1, 4, 5; this one writes {CACHE_FORMAT}) and this one does not read: the prompts they hold are scored again "
        f"into {cache.dir.name}; remove them to free the space ({', '.join(names[:3])} ...)"]
    import shutil

    shutil.rmtree(cache.dir)
    shutil.rmtree(found[-1][0])
    again = ScoreCache(root, "fp", {"scorer": "attention_entropy", "seed": 9})
    assert again.notes[0].endswith(f"remove them to free the space ({', '.join(names[:3])})")
    assert "holds 3 folder(s)" in again.notes[0]


def test_a_store_failure_without_an_errno_names_the_reason_and_does_not_raise(tmp_path, monkeypatch):
    """A write that fails with an OSError carrying no errno (a filesystem driver's, a FUSE mount's) is noted with
    its message, not an errno: without _os_reason's errno check, os.strerror(None) raised TypeError inside put's
    handler and ended the run."""
    import numpy as np
    import pyarrow.parquet as pq

    from audit.cache import ScoreCache, _os_reason

    cache = ScoreCache(tmp_path / "c", "fp", {"scorer": "attention_entropy", "seed": 0})

    def refused(table, where, **kw):
        raise OSError("the mount went away")

    monkeypatch.setattr(pq, "write_table", refused)
    cache.put(["h1", "h2", "h3"], {c: np.ones(3) for c in cache.columns}, [[], [], []])
    assert len(cache.notes) == 1 and cache.notes[0].startswith(f"score cache: cannot store 3 new scores in {cache.dir} (")
    assert "the mount went away" in cache.notes[0] and "Errno" not in cache.notes[0]
    assert _os_reason(OSError("no errno")) == "OSError: no errno"
    assert _os_reason(OSError(28, "No space left on device")) == "OSError: [Errno 28] No space left on device"


def test_a_float64_kept_value_keeps_every_digit_as_json_lines_gives_it(tmp_path):
    """A kept float64 column prints as Python prints the double (0.123456789012345 whole, 1e+300), the text a JSON
    line gives the same value; only float32 and float16 columns take their shortest float32 form. Reading float64 as
    float32 too gave '0.12345679' and 'inf' for 1e300, so the same data grouped apart by input format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audit import sources

    pq.write_table(pa.table({"prompt": ["a", "b"], "s": pa.array([0.123456789012345, 1e300]),
                             "id": pa.array([2.000000001, 3.0])}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"prompt": "a", "s": 0.123456789012345, "id": 2.000000001}\n'
                                      '{"prompt": "b", "s": 1e300, "id": 3.0}\n')
    files, _ = sources.discover([str(tmp_path)])
    plan = sources.plan_units(files, "prompt", id_column="id", keep_columns=("s",))
    got = {u.url.rsplit("/", 1)[-1]: [(b.extras["s"], b.ids, b.errors)
                                      for b in sources.read_unit(u, "prompt", "id", ("s",))] for u in plan.units}
    assert got == {"a.parquet": [(["0.123456789012345", "1e+300"], ["2.000000001", "3.0"], [None, None])],
                   "b.jsonl": [(["0.123456789012345", "1e+300"], ["2.000000001", "3.0"], [None, None])]}


def test_a_dry_run_predicts_exit_4_from_rows_without_the_id_column_and_counts_only_key_folders(tmp_path,
                                                                                              tiny_model_dir):
    """--id-column id: a.parquet has it (2 rows), b.parquet lacks it (3 rows, each to be rejected): 3 of 5 rows lost
    is more than --max-error-fraction 0.5, so the dry run predicts exit 4 for 3 of 5 rows; at 0.6 (3 is not more than
    3.0) it predicts none. A prediction summing only the rows without the prompt column (0 here) passed every
    other test: the dry run would say nothing and the run then exit 4. The cache line counts the folders holding a key.json (one), not a stray
    file or a folder without one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audit.config import RunConfig
    from audit.runner import dry_run

    data = tmp_path / "in"
    data.mkdir()
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog"], "id": ["x1", "x2"]}), data / "a.parquet")
    pq.write_table(pa.table({"prompt": ["one", "two", "three"]}), data / "b.parquet")
    cache = tmp_path / "cache"
    (cache / "fp-0123456789abcdef").mkdir(parents=True)
    (cache / "fp-0123456789abcdef" / "key.json").write_text("{}")
    (cache / "scratch").mkdir()
    (cache / "README.txt").write_text("shared score cache")
    base = dict(inputs=(str(data),), model=str(tiny_model_dir), device="cpu", id_column="id", cache=str(cache))
    s = dry_run(RunConfig(**base, out=str(tmp_path / "o1"), max_error_fraction=0.5), log=lambda m: None)
    assert s["id_column"] == {"name": "id", "files_without": 1, "rows_without": 3}
    assert s["exit_4"] == {"rows": 3, "of": 5, "max_error_fraction": 0.5}
    assert s["cache"] == {"path": str(cache), "folders": 1}
    s = dry_run(RunConfig(**base, out=str(tmp_path / "o2"), max_error_fraction=0.6), log=lambda m: None)
    assert "exit_4" not in s
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_model_folder_under_home_is_made_absolute_with_home_expanded(tmp_path, monkeypatch):
    """absolute_model('~/models/m1') names the folder in the home directory, as the driver found it; one that made
    the unexpanded argument absolute gave the Ray actors '<cwd>/~/models/m1', no such folder. A '~/' name that is
    no folder (a hub id never starts so, but a typo may) is left as given; absolute_cache expands '~' alike."""
    from audit.config import RunConfig
    from audit.engines.ray import absolute_cache, absolute_model

    home = tmp_path / "home"
    (home / "models" / "m1").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert absolute_model("~/models/m1") == str(home / "models" / "m1")
    assert absolute_model("~/models/none") == "~/models/none"
    assert absolute_cache(RunConfig(inputs=("x",), cache="~/sc")).cache == str(home / "sc")
    assert absolute_cache(RunConfig(inputs=("x",), cache="sc")).cache == str(tmp_path / "sc")
    assert absolute_cache(RunConfig(inputs=("x",))).cache is None


def test_the_gates_judge_their_own_denominators(tmp_path):
    """error_gate judges the scoring failures against the rows that reached the scorer (75: 70 scored, 5 failed),
    not the rows read (100: 25 more lacked the prompt column): 5 > 0.06 * 75 fails, as 5 > 6 would not. coverage_gate
    leaves a run that scored nothing to nothing_scored. empty_gate blames --limit 0 only when it was given: a run of
    inputs without rows, --limit unset (None), is told its inputs hold no rows."""
    from types import SimpleNamespace

    from audit.gates import coverage_gate, empty_gate, error_gate

    cfg = SimpleNamespace(max_error_fraction=0.06, fail_on_flagged=0, limit=None)
    m = {"counts": {"rows_read": 100, "scored": 70,
                    "rejected_by_reason": {"scoring_error": 5, "missing_prompt_column": 25}}}
    assert error_gate(cfg, tmp_path, m) == (
        f"5 of 75 rows (6.7%) could not be scored (scoring_error 5), more than --max-error-fraction 0.06. "
        f"The outputs in {tmp_path} hold what was scored.")
    none = {"counts": {"rows_read": 10, "scored": 0, "rejected_by_reason": {"missing_prompt_column": 10}}}
    assert coverage_gate(cfg, none) is None
    some = {"counts": {"rows_read": 10, "scored": 1, "rejected_by_reason": {"missing_prompt_column": 9}}}
    assert coverage_gate(cfg, some).startswith("9 of 10 rows read (90.0%) could not be read as prompts "
                                               "(missing_prompt_column 9), more than --max-error-fraction 0.06")
    empty = {"counts": {"rows_read": 0, "scored": 0, "rejected_by_reason": {}}}
    assert empty_gate(cfg, empty) == (
        "nothing was scored: the inputs hold no rows, so --fail-on-flagged 0 has no prompt to judge (an empty "
        "screening set, or a file that failed to upload?); a gate over no prompts does not pass")
    assert empty_gate(SimpleNamespace(**{**vars(cfg), "limit": 0}), empty).startswith(
        "nothing was scored: --limit 0 reads no row, so --fail-on-flagged 0")


def test_a_percentile_a_hair_from_100_or_0_gets_the_digits_that_show_it():
    """_percentile keeps adding decimals while the value would read 100.00 or 0.00: 99.9999 (a prompt above 999,999
    of 1,000,000 reference prompts) is '99.9999', not '100.000'; 0.00001 is '0.00001'; 98.09 keeps 2."""
    from audit.report import _percentile

    assert (_percentile(99.9999), _percentile(0.00001), _percentile(98.09), _percentile(100.0)) == \
        ("99.9999", "0.00001", "98.09", "100.00")


def test_a_share_just_over_the_limit_reads_over_it_in_the_coverage_gate_and_the_dry_run(tmp_path):
    """101 of 10,001 rows without the prompt column is more than --max-error-fraction 0.01 (101 > 100.01) yet 1.0%
    at one decimal: the coverage gate's exit-4 message and the dry run's prediction both say 1.01%, never a share
    equal to the limit it is said to exceed."""
    from types import SimpleNamespace

    from audit.gates import coverage_gate

    cfg = SimpleNamespace(max_error_fraction=0.01, fail_on_flagged=None)
    m = {"counts": {"rows_read": 10001, "scored": 9900, "rejected_by_reason": {"missing_prompt_column": 101}}}
    assert coverage_gate(cfg, m).startswith("101 of 10001 rows read (1.01%) could not be read as prompts")
    from helpers import dry_run_of_logs_lacking_the_column

    res = dry_run_of_logs_lacking_the_column(tmp_path, 9900, 101, "0.01")
    assert res.exit_code == 0, res.output
    assert "exit 4 expected: 101 of 10,001 rows (1.01%) to be rejected for want of the prompt or id column, more " \
           "than --max-error-fraction 0.01:" in " ".join(res.output.split())


def test_the_terminal_narrow_blocks_and_breakdowns_carry_the_digits_that_agree_with_the_flags(tmp_path):
    """Threshold 1.7935721 (as every command prints it). File a's max risk 1.793574 (flagged) needs 6 decimals to read
    above the threshold, so risks and max risks print 6. A narrow terminal (one block a prompt) prints the flagged
    1.793574 and the unflagged prompt at the threshold, 1.793572, apart (both read '1.79357' at the usual 5); the terminal's source-file breakdown prints the max risks 1.793574 (flagged 1) and 1.793572 (flagged 0), as
    the Markdown page does, not 1.7936 twice (the p95 column keeps 4 decimals)."""
    from rich.console import Console

    from audit.report import build_report, render_terminal

    rows = [("flagged near", 1.7935740, "in/a.parquet"), ("at the threshold", 1.7935721, "in/b.parquet"),
            ("low", 0.5, "in/b.parquet")]
    r = build_report(make_run(tmp_path / "r", rows, threshold=1.7935721, fpr=0.01))
    assert (r.threshold_text, r.risk_decimals, r.group_decimals) == ("1.7935721", 6, 6)
    narrow = Console(width=50, record=True, color_system=None)
    render_terminal(r, narrow)
    lines = [" ".join(ln.split()) for ln in narrow.export_text().splitlines()]
    assert [ln for ln in lines if ln.startswith("#")] == [
        "#1 risk 1.793574 pct - FLAG rows 1", "#2 risk 1.793572 pct - rows 1", "#3 risk 0.500000 pct - rows 1"]
    wide = Console(width=200, record=True, color_system=None)
    render_terminal(r, wide)
    cells = [[c.strip() for c in ln.strip("│ ").split("│")] for ln in wide.export_text().splitlines()
             if ln.startswith("│ a.parquet │") or ln.startswith("│ b.parquet │")]
    assert [c[:1] + c[-4:] for c in cells if len(c) > 4] == [
        ["a.parquet", "1.7936", "1.793574", "1", "0"], ["b.parquet", "1.7936", "1.793572", "0", "0"]]
