"""Findings of a nightly prompt-log audit run as a new user would (cron, dated log folders, a shared score cache,
runs killed and resumed, a full disk): each test fails on the code before its fix."""

from __future__ import annotations

import errno
import gzip

import numpy as np
import polars as pl
import pytest

from audit import sources
from audit.errors import SourceError
from helpers import run_audit


# ------------------------------------------------------------------ a CSV that ends inside a quoted field

def _plan(path, skip: bool = False):
    files, _ = sources.discover([str(path)])
    return sources.plan_units(files, "prompt", unit_rows=1000, skip_bad_files=skip, id_column="id")


def _read(plan) -> list[tuple]:
    sources._STREAMS.clear()
    return [(i, p) for u in plan.units for b in sources.read_unit(u, "prompt", "id") for i, p in zip(b.ids, b.prompts)]


@pytest.mark.parametrize("name, text", [
    # a writer killed in the middle of a quoted multi-line prompt: the last record's field never closes
    ("cut.csv", 'id,prompt\na1,red cat\na2,"blue dog on\n'),
    # a stray quote opened in row a2 made rows a3 and a4 the text of a2's prompt: 4 records read as 2
    ("stray.csv", 'id,prompt\na1,red cat\na2,"unterminated\na3,green tree\na4,sun\n'),
    # the same with the quote in a middle column (the record then lacks fields: read by records)
    ("ragged.csv", 'id,prompt,app\na1,red cat,x\na2,"unterminated,y\na3,green tree,z\n'),
    # escaped quotes ("") at the end do not close it
    ("escaped.csv", 'id,prompt\na1,red cat\na2,"say ""hi""\na3,sun ""\n'),
])
def test_a_csv_that_ends_inside_a_quoted_field_is_not_read_as_a_shorter_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SourceError, match="ends inside a quoted field that never closes") as exc:
        _plan(path)
    assert str(path) in str(exc.value) and "--skip-bad-files" in str(exc.value)
    gz = tmp_path / (name + ".gz")  # the same text compressed: the tail is read through the stream
    gz.write_bytes(gzip.compress(text.encode()))
    with pytest.raises(SourceError, match="ends inside a quoted field that never closes"):
        _plan(gz)
    plan = _plan(path, skip=True)  # --skip-bad-files: skipped and listed, not read as 2 rows
    assert plan.units == [] and [s["path"] for s in plan.skipped] == [str(path)]


def test_a_csv_whose_last_quoted_multiline_field_closes_is_read_whole(tmp_path):
    path = tmp_path / "ok.csv"
    # the last field holds line breaks and escaped quotes and closes; a CRLF and a blank line follow it
    path.write_text('id,prompt\na1,red cat\na2,"two\nlines ""q"""\r\n\n', encoding="utf-8")
    assert _read(_plan(path)) == [("a1", "red cat"), ("a2", 'two\nlines "q"')]
    one = tmp_path / "one.csv"  # a multi-line quoted field that closes, then EOF without a line break
    one.write_text('id,prompt\nb1,"a\nb"', encoding="utf-8")
    assert _read(_plan(one)) == [("b1", "a\nb")]


# ------------------------------------------------------------------ a failed final merge (a full disk)

def test_a_failed_final_merge_leaves_no_intermediate_files_and_a_rerun_ignores_old_ones(
        tmp_path, tiny_model_dir, monkeypatch):
    """The external merge writes intermediate files about the table's size under shards/merge. A finalize that
    failed (no space left while writing risk.parquet) left them there, so "free some and rerun" found that space
    still taken; a rerun must not find an earlier attempt's files in its merge folder either."""
    import audit.pipeline as pipeline

    path = tmp_path / "p.txt"
    path.write_text("".join(f"prompt number {i} of a red cat\n" for i in range(12)))
    orig_reduce, orig_merge = pipeline.reduce_shards, pipeline.merge_ranked
    seen = []

    def reduce_in_pairs(shards, work, schema, **kw):
        seen.append(sorted(p.name for p in work.rglob("*")) if work.exists() else [])
        return orig_reduce(shards, work, schema, fan_in=2, batch_rows=2, **kw)

    def full_disk(shards, out, schema, **kw):
        if out.name == "risk.parquet":
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig_merge(shards, out, schema, **kw)

    monkeypatch.setattr(pipeline, "reduce_shards", reduce_in_pairs)
    monkeypatch.setattr(pipeline, "merge_ranked", full_disk)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        run_audit([path], tiny_model_dir, out, device="cpu", unit_rows=2, batch_size=4)
    assert (out / "shards" / "unit-000005.done.json").exists()  # the 6 units finished; only the merge failed
    assert not (out / "shards" / "merge").exists()
    # an earlier attempt's file in the merge folder (a finalize killed with SIGKILL) is gone before the merge
    (out / "shards" / "merge" / "level-0").mkdir(parents=True)
    (out / "shards" / "merge" / "level-0" / "part-000009.parquet").write_bytes(b"x" * 1000)
    monkeypatch.setattr(pipeline, "merge_ranked", orig_merge)
    folder, manifest = run_audit([path], tiny_model_dir, out, device="cpu", unit_rows=2, batch_size=4)
    assert seen == [[], []] and not (out / "shards" / "merge").exists()
    assert manifest["counts"]["scored"] == 12 and pl.read_parquet(folder / "risk.parquet").height == 12


# ------------------------------------------------------------------ the score cache during a run of many units

def test_the_cache_is_compacted_while_a_run_adds_parts(tmp_path):
    """Every lookup opens every part, and a run added one part per unit and merged them only at its end: a night of
    3,000 small log files (a unit each) read a cache of ~1,000 parts per unit, about 3 s a lookup, and slowed to
    2 rows/s. A put that leaves more than COMPACT_WHILE_RUNNING parts now merges them."""
    from audit.cache import SCORE_COLUMNS, ScoreCache

    counts = []
    for i in range(40):  # one ScoreCache a unit, as the units open it
        cache = ScoreCache(tmp_path, "fp", {"scorer": "attention_entropy", "seed": 0})
        cache.put([f"{i:016x}{j:016x}" for j in range(2)],
                  {c: np.array([10.0 * i, 10.0 * i + 1]) for c in SCORE_COLUMNS}, [[]] * 2)
        counts.append(len(cache.files()))
    # 1..16 parts, then the 17th put merges them into one (COMPACT_WHILE_RUNNING = 16): 1..16, 1..16, 1..8
    assert counts == list(range(1, 17)) * 2 + list(range(1, 9))
    assert cache.notes == []
    want = [f"{i:016x}{j:016x}" for i in range(40) for j in range(2)]
    found = cache.lookup(want[::-1])
    got = dict(zip(found.column("prompt_hash").to_pylist(), found.column("risk").to_pylist()))
    assert got == {h: 10.0 * (k // 2) + k % 2 for k, h in enumerate(want)}  # every score kept, none twice


def test_compaction_while_running_leaves_an_earlier_nights_big_part_alone(tmp_path, monkeypatch):
    """The in-run compaction merges only parts under BIG_ROWS_WHILE_RUNNING rows: a cache compacted at the end of
    earlier nights into one part of up to 2,000,000 rows was otherwise rewritten every 16 units. The bound is
    lowered to 50 rows here, so that a 60-row part stands for a night's merged one."""
    import audit.cache as cache_mod
    from audit.cache import SCORE_COLUMNS, ScoreCache

    monkeypatch.setattr(cache_mod, "BIG_ROWS_WHILE_RUNNING", 50)
    key = {"scorer": "attention_entropy", "seed": 0}
    night = ScoreCache(tmp_path, "fp", key)
    night.put([f"{j:032x}" for j in range(60)], {c: np.arange(60, dtype=float) for c in SCORE_COLUMNS}, [[]] * 60)
    (big,) = night.files()
    stamp = big.stat().st_mtime_ns
    counts = []
    for i in range(20):
        cache = ScoreCache(tmp_path, "fp", key)
        cache.put([f"{i + 1:016x}{j:016x}" for j in range(2)],
                  {c: np.array([100.0 + i, 200.0 + i]) for c in SCORE_COLUMNS}, [[]] * 2)
        counts.append(len(cache.files()))
    # the big part and 1..16 small ones (17 files, but only 16 small: nothing to merge); the 17th small part is
    # merged with the others into one
    assert counts == list(range(2, 18)) + [2, 3, 4, 5]
    assert big.exists() and big.stat().st_mtime_ns == stamp  # never rewritten
    found = cache.lookup([f"{j:032x}" for j in range(60)]
                         + [f"{i + 1:016x}{j:016x}" for i in range(20) for j in range(2)])
    assert found.num_rows == 100 and sorted(found.column("risk").to_pylist()) == sorted(
        list(range(60)) + [100.0 + i for i in range(20)] + [200.0 + i for i in range(20)])


# ------------------------------------------------------------------ wording

def test_one_file_without_the_prompt_column_is_counted_in_the_singular():
    from audit.runner import _lacking_column_note
    from audit.sources import InputFile, Plan

    plan = Plan([InputFile("a.csv", "csv")], [], [], {"a.csv": 1}, {"a.csv": ["text"]})
    assert _lacking_column_note(plan, {"a.csv": 1}, "prompt", "missing_prompt_column") == (
        "1 of 1 input file has no column 'prompt', so its 1 row is rejected as missing_prompt_column; "
        "the first: a.csv (columns: text)")
