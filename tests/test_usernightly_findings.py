"""Findings of a nightly prompt-log audit run as a new user would (cron, dated log folders, a shared score cache,
runs killed and resumed, a full disk): each test fails on the code before its fix."""

from __future__ import annotations

import errno

import polars as pl
import pytest

from helpers import run_audit


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

    def reduce_in_pairs(shards, work, schema):
        seen.append(sorted(p.name for p in work.rglob("*")) if work.exists() else [])
        return orig_reduce(shards, work, schema, fan_in=2)

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
