"""What a mutation review of the final merge (audit.pipeline) and of the report's top prompts, histogram and
breakdowns (audit.report) found unpinned (session 49, mnew49c): each test asserts values worked out by hand on small
shards or run folders written here (no model is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.tables import arrow_schema
from helpers import open_parquet_files

FILLER = {"int64": 0, "int32": 0, "double": 0.0, "bool": False, "string": "x"}


def _shard(path: Path, k: int, risks: list[float]) -> list[tuple[float, str]]:
    """A sorted risk shard of ``len(risks)`` rows (ids ``s{k}-{i}``) in row groups of 4; returns its (risk, id) keys."""
    schema = arrow_schema("risk")
    n = len(risks)
    t = pa.table({f.name: pa.nulls(n, f.type) if f.nullable else pa.array([FILLER.get(str(f.type), [])] * n, f.type)
                  for f in schema}, schema=schema.remove_metadata())
    for name, values in (("prompt_id", [f"s{k}-{i}" for i in range(n)]), ("risk", risks),
                         ("prompt_hash", [f"{k:08x}{i:024x}" for i in range(n)])):
        t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, t.schema.field(name).type))
    pq.write_table(t.sort_by([("risk", "descending"), ("prompt_id", "ascending")]), path, row_group_size=4)
    return list(zip(risks, t["prompt_id"].to_pylist()))


# ---------------------------------------------------------------- the merge

def test_a_shard_of_exactly_one_batch_is_read_whole_and_closed(tmp_path, monkeypatch):
    """_merge_groups counts a shard of at most ``batch_rows`` rows as one the merge does not keep open (``n >
    batch_rows`` opens); the cursor must agree at the edge: a shard of exactly 4 rows (batch 4) is read whole and
    closed, one of 5 stays open. (A cursor that kept the 4-row shard open held more files than max_files allows.)"""
    import audit.pipeline as pipeline

    keys = _shard(tmp_path / "s0.parquet", 0, [0.9, 0.5, 0.3, 0.1])
    keys += _shard(tmp_path / "s1.parquet", 1, [0.8, 0.6, 0.4, 0.2, 0.0])
    seen = []

    def held(chunk):
        seen.append(open_parquet_files(tmp_path))
        return chunk

    monkeypatch.setattr(pipeline, "SHARD_ROW_GROUP_ROWS", 4)
    n, _ = pipeline.merge_ranked([tmp_path / "s0.parquet", tmp_path / "s1.parquet"], tmp_path / "out.parquet",
                                 arrow_schema("risk"), chunk_rows=3, chunk_fn=held)
    assert seen[0] == ["s1.parquet"]
    assert pipeline._merge_groups([4, 5], 8, 4, 1) == [(0, 2)]  # one open file: the 5-row shard
    out = pq.read_table(tmp_path / "out.parquet")
    assert n == 9 and out["prompt_id"].to_pylist() == [i for _, i in sorted(keys, key=lambda r: (-r[0], r[1]))]


def test_merge_chunk_rows_of_shards_that_declare_no_bytes_is_the_chunk_asked_for():
    """A footer may declare 0 decoded bytes for rows it holds (another writer's shard): the chunk is then the rows
    asked for, not a division by zero."""
    from audit.pipeline import MERGE_CHUNK_ROWS, merge_chunk_rows

    assert merge_chunk_rows(10, 0) == MERGE_CHUNK_ROWS == 65_536
    assert merge_chunk_rows(10, 0, chunk_rows=3) == 3
    assert merge_chunk_rows(0, 500) == 65_536


def test_merge_chunks_hold_at_most_chunk_rows_rows(tmp_path):
    """chunk_rows=3 over 9 rows: three chunks (and row groups) of 3, ranked 1-9; ``chunk_fn`` sees each chunk once.
    (Gathering while ``len(order) <= chunk_rows`` wrote chunks of 4, 4, 1.)"""
    from audit.pipeline import merge_ranked

    keys = _shard(tmp_path / "s0.parquet", 0, [0.9, 0.5, 0.3, 0.1])
    keys += _shard(tmp_path / "s1.parquet", 1, [0.8, 0.6, 0.4, 0.2, 0.0])
    sizes = []
    n, hashes = merge_ranked([tmp_path / "s0.parquet", tmp_path / "s1.parquet"], tmp_path / "out.parquet",
                             arrow_schema("risk"), chunk_rows=3,
                             chunk_fn=lambda c: sizes.append(c["rank"].to_pylist()) or c)
    assert n == 9 and sizes == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    meta = pq.read_metadata(tmp_path / "out.parquet")
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [3, 3, 3]
    out = pq.read_table(tmp_path / "out.parquet")
    assert out["risk"].to_pylist() == [0.9, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    # the hashes' 16-hex-digit prefixes, in rank order: shard k's prompt_hash begins f"{k:08x}00000000"
    assert hashes.tolist() == [k << 32 for k in (0, 1, 1, 0, 1, 0, 1, 0, 1)]


def test_a_merge_that_writes_fewer_rows_than_its_shards_hold_is_an_error_and_commits_nothing(tmp_path, monkeypatch):
    """A shard that yields fewer rows than its footer counts (here its cursor stops after 2 of 4) leaves the merge 2
    rows short: a RunError saying so, and no risk.parquet (a table missing rows is never committed)."""
    from audit.errors import RunError
    import audit.pipeline as pipeline

    _shard(tmp_path / "s0.parquet", 0, [0.9, 0.5, 0.3, 0.1])
    _shard(tmp_path / "s1.parquet", 1, [0.8, 0.6, 0.4, 0.2, 0.0])
    orig = pipeline._ShardCursor.next_key
    given = {}

    def short(self):
        if self.rows == 4 and given.get(id(self), 0) == 2:
            return None
        given[id(self)] = given.get(id(self), 0) + 1
        return orig(self)

    monkeypatch.setattr(pipeline._ShardCursor, "next_key", short)
    with pytest.raises(RunError, match=r"^merging 2 shards wrote 7 rows of the 9 they hold$"):
        pipeline.merge_ranked([tmp_path / "s0.parquet", tmp_path / "s1.parquet"], tmp_path / "out.parquet",
                              arrow_schema("risk"), chunk_rows=3)
    assert not (tmp_path / "out.parquet").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_empty_shards_count_one_row_each_toward_a_merge_group():
    """Each shard a merge reads holds a cursor, so an empty one counts 1 toward the ``fan_in * batch_rows`` a group
    holds: 25 empty shards at fan-in 2, batch 10, are groups of 20 and 5 (counted as 0 they were one group of any
    size)."""
    from audit.pipeline import _merge_groups

    assert _merge_groups([0] * 25, 2, 10, 256) == [(0, 20), (20, 25)]


def test_a_merge_that_hashes_no_id_is_an_error_not_a_count_of_unset_hashes(tmp_path, tiny_model_dir, monkeypatch):
    """With --id-column, finalize counts duplicate ids from the hashes the merge's chunk function fills: a merge
    that filled none (here chunk_fn dropped) is a RunError naming the counts, before any manifest is written (the
    count otherwise came from uninitialized memory). The same log counts its 2 rows sharing id "k"."""
    from helpers import run_audit

    from audit.errors import RunError
    import audit.pipeline as pipeline

    src = tmp_path / "log.parquet"
    pq.write_table(pa.table({"prompt": [f"a red cat {i}" for i in range(6)], "req": ["k", "a", "k", "b", "c", "d"]}),
                   src)
    _, manifest = run_audit([src], tiny_model_dir, tmp_path / "ok", device="cpu", id_column="req")
    assert manifest["counts"]["duplicate_ids"] == 2 and manifest["counts"]["scored"] == 6
    orig = pipeline.merge_ranked
    monkeypatch.setattr(pipeline, "merge_ranked", lambda *a, chunk_fn=None, **kw: orig(*a, **kw))
    with pytest.raises(RunError, match=r"^the merge hashed 0 ids of the 6 rows it wrote$"):
        run_audit([src], tiny_model_dir, tmp_path / "bad", device="cpu", id_column="req")
    assert not (tmp_path / "bad" / "manifest.json").exists()


# ---------------------------------------------------------------- the report

def _report_run(path: Path, rows, **kw) -> Path:
    from test_report_mutants import make_run

    return make_run(path, rows, **kw)


def test_rejection_reasons_of_equal_counts_are_listed_by_name(tmp_path):
    """Reasons of equal counts are listed by name whatever order the rows come in (sorting by count alone left them
    in the order polars' group_by gave)."""
    from audit.report import build_report

    names = ["too_long", "null_prompt", "scoring_error", "empty_prompt", "bad_type", "missing_id_column",
             "non_string_prompt", "decode_error"]
    rejects = [("in/a.parquet", why) for why in names] + [("in/a.parquet", "zz_most")] * 2
    r = build_report(_report_run(tmp_path / "r", [("a", 1.0)], rejects=rejects))
    assert list(r.counts["rejected_by_reason"].items()) == [("zz_most", 2)] + [(n, 1) for n in sorted(names)]
    assert r.counts["rejected"] == 10 and r.counts["rows_read"] == 11


def test_the_common_source_folder_is_named_only_when_there_is_one(tmp_path):
    """The source breakdown is titled with the folder all the run's files share ("logs/"), and with none when they
    share no folder: files "a.parquet" and "b.parquet" (common prefix "", taken as "/" before the length check) and
    "/a.parquet" and "/b.parquet" (the root alone is not shown as a folder)."""
    from audit.report import build_report

    cases = {"logs": (["logs/x/a.parquet", "logs/b.parquet"], "logs/"), "bare": (["a.parquet", "b.parquet"], ""),
             "root": (["/a.parquet", "/b.parquet"], "")}
    for name, (sources, folder) in cases.items():
        r = build_report(_report_run(tmp_path / name, [("p", 2.0, sources[0]), ("q", 1.0, sources[1])]))
        assert r.source_folder == folder, name


def test_a_calibrated_manifest_over_a_table_without_flagged_or_truncated_columns(tmp_path):
    """A risk table without the optional ``flagged`` and ``truncated`` columns (a table written by other tools
    from a run's rows) is reported as uncalibrated with an unknown truncated count (None), not as 0 truncated or
    an error for a missing column, though its manifest names a calibration. Its counts said flagged None while the
    report was still taken as calibrated, so every renderer failed (TypeError formatting None)."""
    from audit.report import build_report, render_html, render_json, render_markdown

    run = _report_run(tmp_path / "r", [("a", 3.0), ("b", 1.0)], threshold=2.0)
    table = pq.read_table(run / "risk.parquet")
    pq.write_table(table.drop_columns(["flagged", "truncated"]), run / "risk.parquet")
    r = build_report(run)
    assert r.counts["flagged"] is None and r.counts["truncated"] is None and r.counts["scored"] == 2
    assert not r.calibrated and r.hist["count"].to_list()[0] + r.hist["count"].to_list()[-1] == 2
    md = render_markdown(r)  # rendering read counts["flagged"] as calibrated: TypeError on None
    assert "| scored | 2 |" in md and "| flagged | not calibrated (run with --calibration) |" in md
    assert json.loads(render_json(r))["counts"]["flagged"] is None
    render_html(r)


def test_a_second_shard_starts_a_new_group_when_the_first_is_full():
    """The first shard of a group always stays; from the second on, a shard that would pass ``fan_in * batch_rows``
    rows held, or ``max_files`` open files, starts the next group: two 11-row shards (batch 10, both kept open) with
    max_files 1 are two merges, and so are two full shards at fan-in 1 (a mutant keeping every second shard in its
    group held 2 open files, 20 rows)."""
    from audit.pipeline import _merge_groups

    assert _merge_groups([11, 11], 4, 10, 1) == [(0, 1), (1, 2)]
    assert _merge_groups([10, 10, 10], 1, 10, 256) == [(0, 1), (1, 2), (2, 3)]


def test_a_run_without_an_id_column_records_no_duplicate_id_count(tmp_path, tiny_model_dir):
    """duplicate_ids counts rows sharing an --id-column value: without one it is null (unknown), not 0, which
    would say the ids were checked and none repeated."""
    from helpers import run_audit

    src = tmp_path / "log.txt"
    src.write_text("a red cat\na red cat\na blue dog\n")
    _, manifest = run_audit([src], tiny_model_dir, tmp_path / "r", device="cpu")
    counts = manifest["counts"]
    assert counts["duplicate_ids"] is None and (counts["scored"], counts["duplicates"]) == (3, 1)


def test_an_empty_file_of_a_partition_folder_is_its_group_with_no_rows(tmp_path):
    """--by dt over files in dt=... folders: a file that held no row (a day without logs, listed in the manifest
    with 0 rows) is its partition's group with 0 rows, listed in date order with the others."""
    from audit.report import build_report

    rows = [("a", 3.0, "logs/dt=2026-12-01/p.parquet"), ("b", 1.0, "logs/dt=2026-12-03/p.parquet")]
    run = _report_run(tmp_path / "r", rows)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["files"] = [{"path": p, "format": "parquet", "rows": n} for p, n in
                         (("logs/dt=2026-12-01/p.parquet", 1), ("logs/dt=2026-12-02/p.parquet", 0),
                          ("logs/dt=2026-12-03/p.parquet", 1))]
    (run / "manifest.json").write_text(json.dumps(manifest))
    r = build_report(run, by=["dt"])
    title, name, frame = r.breakdowns[-1]
    assert title == "By dt (partition folder)"
    assert frame.select(name, "rows", "rejected").rows() == [("2026-12-01", 1, 0), ("2026-12-02", 0, 0),
                                                              ("2026-12-03", 1, 0)]


def test_the_top_prompt_search_reaches_the_last_row_of_a_table_of_exactly_its_window(tmp_path):
    """The search reads rows ``rank <= k`` for k = 256, 1024, ... and stops at ``k >= rows``: in a table of exactly
    256 rows whose second prompt is on the last row (255 rows of one prompt first), that row is still read and
    listed (a window of ``rank < k`` stopped one row short and listed 1 of the 2 prompts)."""
    from audit.report import build_report

    rows = [("dup", 5.0)] * 255 + [("last", 1.0)]
    r = build_report(_report_run(tmp_path / "r", rows), top=2)
    assert r.top.select("prompt", "rank", "rows").rows() == [("dup", 1, 255), ("last", 256, 1)]


def test_a_rejects_shard_removed_before_the_merge_is_a_run_error_naming_it(tmp_path):
    """A unit counted rejects but its rejects shard was removed between its commit check and the merge: a raw
    FileNotFoundError ended the run. It is a RunError naming the shard and saying a rerun scores the unit again, and
    no rejects.parquet is left."""
    from audit.errors import RunError
    from audit.pipeline import concat_shards

    schema = arrow_schema("rejects")
    kept = tmp_path / "unit-000000.rejects.parquet"
    pq.write_table(schema.empty_table(), kept)
    gone = tmp_path / "unit-000001.rejects.parquet"
    with pytest.raises(RunError) as err:
        concat_shards([kept, gone], tmp_path / "rejects.parquet", schema)
    assert str(err.value) == (f"{gone} is gone: a unit's rejects shard was removed while the run merged its outputs; "
                              "rerun the same command to score that unit again")
    assert not (tmp_path / "rejects.parquet").exists()
    assert concat_shards([kept], tmp_path / "rejects.parquet", schema) == 0
