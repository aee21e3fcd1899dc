"""Findings of a platform engineer's scale trial (session 49, uscale): memory and disk of large runs, resumes.

Each test is the small-input version of what the trial measured on 100,000-300,000 prompts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from audit.tables import arrow_schema


def _record_collects(monkeypatch) -> list[tuple[list[str], int]]:
    """Record each polars LazyFrame.collect's (columns, height) from now on, in the returned list."""
    import polars as pl

    collected = []
    orig = pl.LazyFrame.collect

    def collect(self, *a, **kw):
        frame = orig(self, *a, **kw)
        collected.append((frame.columns, frame.height))
        return frame

    monkeypatch.setattr(pl.LazyFrame, "collect", collect)
    return collected


def _wide_shards(tmp_path, sizes, width):
    """Sorted risk shards with a kept column ``blob`` of ``width`` characters a row; returns (paths, keys)."""
    schema = arrow_schema("risk", ("blob",))
    filler = {"int64": 0, "int32": 0, "double": 0.0, "bool": False, "string": "x"}
    shards, keys = [], []
    for k, n in enumerate(sizes):
        t = pa.table({f.name: pa.nulls(n, f.type) if f.nullable else
                      pa.array([filler.get(str(f.type), [])] * n, f.type) for f in schema},
                     schema=schema.remove_metadata())
        risk = [round(((k * 37 + i * 11) % 100) / 100, 2) for i in range(n)]
        for name, values in (("prompt_id", [f"s{k}-{i:04d}" for i in range(n)]), ("risk", risk),
                             ("prompt_hash", [f"{k:08x}{i:024x}" for i in range(n)]),
                             ("blob", [f"{k}-{i}-" + "b" * width for i in range(n)])):
            t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, t.schema.field(name).type))
        path = tmp_path / f"s{k}.parquet"
        pq.write_table(t.sort_by([("risk", "descending"), ("prompt_id", "ascending")]), path, row_group_size=64)
        shards.append(path)
        keys += list(zip(risk, t["prompt_id"].to_pylist()))
    return shards, keys, schema


def test_merge_chunk_rows_bounds_a_chunk_by_bytes():
    """65,536 rows a chunk for ordinary rows (245 bytes decoded, as a tiny-model run's shards), fewer for wide ones:
    8 KB rows (a kept column of 8,000 characters) get 4,096 (32 MiB), and never fewer than 64."""
    from audit.pipeline import MERGE_CHUNK_BYTES, merge_chunk_rows

    assert MERGE_CHUNK_BYTES == 32 << 20
    assert merge_chunk_rows(100_000, 245 * 100_000) == 65_536
    assert merge_chunk_rows(120_000, 8192 * 120_000) == 4_096
    assert merge_chunk_rows(10, 10 << 30) == 64
    assert merge_chunk_rows(0, 0) == 65_536
    assert merge_chunk_rows(10, 10 << 30, chunk_rows=3) == 3  # a smaller chunk asked for is kept


def test_the_final_merge_holds_a_bounded_number_of_bytes_of_wide_rows(tmp_path, monkeypatch):
    """A run whose --keep-columns column is wide (8 KB a row) peaked at 2.9 GB in its final merge, 120,000 rows: the
    merge gathered 65,536 rows per output chunk whatever their width. Now a chunk holds about MERGE_CHUNK_BYTES
    (here lowered to 100,000 bytes over rows of about 2,000): each chunk handed to chunk_fn stays near it, the
    row groups of the output follow, and the table is still the plain sort of the shards."""
    import audit.pipeline as pipeline

    monkeypatch.setattr(pipeline, "MERGE_CHUNK_BYTES", 100_000)
    shards, keys, schema = _wide_shards(tmp_path, [300, 250, 170], 2000)
    sizes = []

    def seen(chunk):
        sizes.append((chunk.num_rows, chunk.column("blob").nbytes))
        return chunk

    n, hashes = pipeline.merge_ranked(shards, tmp_path / "out.parquet", schema, chunk_fn=seen)
    assert n == 720 and len(hashes) == 720
    assert len(sizes) > 10 and max(b for _, b in sizes) < 2 * 100_000  # was one chunk of 720 rows, 1.46 MB
    assert sum(r for r, _ in sizes) == 720
    meta = pq.read_metadata(tmp_path / "out.parquet")
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [r for r, _ in sizes]
    out = pq.read_table(tmp_path / "out.parquet")
    assert list(zip(out["risk"].to_pylist(), out["prompt_id"].to_pylist())) == sorted(keys, key=lambda r: (-r[0], r[1]))
    assert out["rank"].to_pylist() == list(range(1, 721))
    assert out["blob"][0].as_py().endswith("b" * 2000)


def test_the_report_finds_its_top_prompts_without_reading_every_column_of_repeated_rows(tmp_path, monkeypatch):
    """A log whose prompts repeat (1,000,000 rows of 200 prompts) made `memaudit report` read 262,144 rows of every
    listed column (prompt, trigger tokens, ids) to find its top 20 unique prompts: 503 MB where 300,000 rows took
    273 MB. The search now reads rank and prompt_hash; the listed columns are read for the top rows alone. Checked
    on 2,000 rows of 10 prompts: the top 4 are each prompt's best row (by hand), and no frame the report collects
    holds a prompt column of more than 4 rows."""
    import polars as pl

    from audit.report import _top_unique

    n, k = 2_000, 10
    prompts = [f"prompt {(i * 7) % k}" for i in range(n)]  # rank i+1 holds prompt (7 i mod 10)
    pl.DataFrame({"rank": list(range(1, n + 1)), "risk": [2.0 - i / n for i in range(n)], "prompt": prompts,
                  "prompt_hash": [f"h{p[-1]}" for p in prompts], "prompt_id": [f"r{i}" for i in range(n)],
                  "trigger_tokens": [[{"token": "x", "mass": 0.5}]] * n}
                 ).write_parquet(tmp_path / "risk.parquet", row_group_size=100)
    collected = _record_collects(monkeypatch)
    top = _top_unique(pl.scan_parquet(tmp_path / "risk.parquet"), ["rank", "risk", "prompt", "trigger_tokens",
                                                                    "prompt_id", "prompt_hash"], 4, n)
    assert top["rank"].to_list() == [1, 2, 3, 4] and top["prompt"].to_list() == [
        "prompt 0", "prompt 7", "prompt 4", "prompt 1"]
    assert top["prompt_id"].to_list() == ["r0", "r1", "r2", "r3"]
    assert collected and max(h for cols, h in collected if "prompt" in cols) == 4
    # a prompt found only far down: its best row is the 300th (rank 300), past the first search of 256 rows
    prompts2 = ["common"] * 299 + ["rare"] + ["common"] * 100
    pl.DataFrame({"rank": list(range(1, 401)), "prompt": prompts2, "prompt_hash": prompts2}).write_parquet(
        tmp_path / "r2.parquet", row_group_size=50)
    collected.clear()
    top2 = _top_unique(pl.scan_parquet(tmp_path / "r2.parquet"), ["rank", "prompt", "prompt_hash"], 2, 400)
    assert top2["rank"].to_list() == [1, 300] and top2["prompt"].to_list() == ["common", "rare"]
    assert max(h for cols, h in collected if "prompt" in cols) == 2
    # more asked for than the table holds: the search stops at the last row with the 2 prompts there are
    top3 = _top_unique(pl.scan_parquet(tmp_path / "r2.parquet"), ["rank", "prompt", "prompt_hash"], 20, 400)
    assert top3["rank"].to_list() == [1, 300]


def _id_log(tmp_path):
    """150 rows of 150 prompts: ids unique but for "dup-a" on rows 3 and 117 and "dup-b" on rows 5, 76 and 130."""
    ids = [f"req-{i:03d}" for i in range(150)]
    ids[3] = ids[117] = "dup-a"
    ids[5] = ids[76] = ids[130] = "dup-b"
    src = tmp_path / "log.parquet"
    pq.write_table(pa.table({"prompt": [f"a red cat on a sofa {i}" for i in range(150)], "req": ids}), src)
    return src


def test_duplicate_ids_are_counted_from_hashes_not_by_holding_every_id(tmp_path, tiny_model_dir, monkeypatch):
    """With --id-column the end of a run read every id into memory to count the rows sharing one (about 150 bytes a
    row: 1,000,000 rows took 149 MB more, 975 MB peak against 838 MB without ids). The merge now hashes each ranked
    row's id (8 bytes a row) and reads back only the rows whose hash another row shares. The count is exact (5
    rows: dup-a twice, dup-b three times, over 3 chunks of the merge), and the only ids read back are those 5; with
    calibration the flags are still counted through the same merge."""
    import polars as pl

    from helpers import run_audit

    from audit.calibrate import calibrate, write_calibration

    src = _id_log(tmp_path)
    collected = _record_collects(monkeypatch)
    import audit.pipeline as pipeline

    monkeypatch.setattr(pipeline, "MERGE_CHUNK_BYTES", 1)  # chunks of 64 rows: the hashes of 3 chunks are gathered
    _, manifest = run_audit([src], tiny_model_dir, tmp_path / "r", device="cpu", id_column="req")
    assert manifest["counts"]["duplicate_ids"] == 5 and manifest["counts"]["scored"] == 150
    assert [h for cols, h in collected if "prompt_id" in cols] == [5]
    write_calibration(calibrate(tmp_path / "r", fpr=0.1), tmp_path / "cal.json")
    _, manifest = run_audit([src], tiny_model_dir, tmp_path / "c", device="cpu", id_column="req",
                            calibration=str(tmp_path / "cal.json"))
    risk = pl.read_parquet(tmp_path / "c" / "risk.parquet")
    assert manifest["counts"]["duplicate_ids"] == 5
    assert manifest["counts"]["flagged"] == risk["flagged"].sum() == 15  # 10% of 150 reference rows above it


def test_a_collision_of_two_id_hashes_counts_no_duplicate(tmp_path):
    """Two different ids whose 64-bit hashes collide are compared by their text: here row 1's id "b" is given the
    hash of "a", so three rows share that hash, and still only the rows that truly share an id are counted (a twice,
    c three times: 5, where the hashes alone would count 6)."""
    import audit.pipeline as pipeline

    table = pa.table({"prompt_id": ["a", "b", "a", "c", "d", "c", "c"]})
    pq.write_table(table, tmp_path / "risk.parquet")
    hashes = pipeline.id_hash_values(table.column("prompt_id"))
    assert hashes.dtype == np.uint64 and len(set(hashes.tolist())) == 4
    assert pipeline.duplicate_id_rows(tmp_path / "risk.parquet", hashes) == 5
    collided = hashes.copy()
    collided[1] = hashes[0]
    assert pipeline.duplicate_id_rows(tmp_path / "risk.parquet", collided) == 5
    assert pipeline.duplicate_id_rows(tmp_path / "risk.parquet", np.arange(7, dtype=np.uint64)) == 0
