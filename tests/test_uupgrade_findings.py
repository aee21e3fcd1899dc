"""Findings of upgrading memaudit under a nightly job: run folders, calibration files and caches written by older
versions, used by this one. Each must work with the numbers of a fresh run, or be refused in one line that says
what to do. The old shapes are written by hand here (as the older versions wrote them), not taken from git
history. Each test fails on the code before its fix."""

from __future__ import annotations

import polars as pl
import pyarrow.parquet as pq

from helpers import prompts_file, run_audit

# the risk columns memaudit wrote before the per-layer and guidance columns (schemas/risk.json of 2026-12-03)
_OLD_RISK_COLUMNS = ["rank", "prompt_id", "prompt", "prompt_raw", "risk", "attn_entropy", "bos_mass",
                     "noise_magnitude", "trigger_tokens", "n_tokens", "truncated", "source", "row", "prompt_hash",
                     "flagged", "risk_percentile"]


def _as_old_shards(out) -> int:
    """Rewrite every committed risk shard of run folder ``out`` with the older version's columns only; returns how
    many were rewritten."""
    shards = sorted((out / "shards").glob("*.risk.parquet"))
    for path in shards:
        table = pq.read_table(path)
        meta = table.schema.metadata
        pq.write_table(table.select(_OLD_RISK_COLUMNS).replace_schema_metadata(meta), path)
    return len(shards)


def test_a_folder_with_shards_of_an_older_table_is_resumed_with_this_versions_columns(tmp_path, tiny_model_dir):
    """A run folder interrupted under an older memaudit, whose risk shards lacked the columns added since
    (attn_entropy_l00.., guidance_geometry, ...), then rerun after the upgrade: the rerun scored every unit left,
    then failed at the merge with a pyarrow error ("Schema at index N was different", exit 1), the night's
    scoring lost. Now those units are scored again (a note says how many) and the tables equal a fresh run's."""
    src = prompts_file(tmp_path / "p.txt", 24, seed=3)
    src.write_text(src.read_text() + "   \n")  # a rejected row too: its unit has a rejects shard
    fresh, _ = run_audit([src], tiny_model_dir, tmp_path / "fresh", unit_rows=4, batch_size=4)
    old = tmp_path / "old"
    run_audit([src], tiny_model_dir, old, unit_rows=4, batch_size=4)
    assert _as_old_shards(old) == 7
    for name in ("risk.parquet", "rejects.parquet", "manifest.json"):  # as if it was cut before the merge
        (old / name).unlink(missing_ok=True)
    notes = []
    from audit.pipeline import RunConfig
    from audit.runner import execute

    cfg = RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(old), unit_rows=4, batch_size=4)
    _, manifest = execute(cfg, progress=False, log=notes.append)
    assert f"memaudit: 7 units of {old} were committed by an earlier memaudit whose tables had other columns: " \
           "scored again with this version" in notes
    assert manifest["counts"]["scored"] == 24 and manifest["counts"]["rejected_by_reason"] == {"empty_prompt": 1}
    got, want = pl.read_parquet(old / "risk.parquet"), pl.read_parquet(fresh / "risk.parquet")
    assert pl.read_parquet(old / "rejects.parquet").equals(pl.read_parquet(fresh / "rejects.parquet"))
    assert got.columns == want.columns
    assert got.equals(want)
    # every shard now has this version's columns: a second rerun scores nothing again
    notes.clear()
    execute(cfg, progress=False, log=notes.append)
    assert f"memaudit: resuming {old}: 7 of 7 units already done" in notes
    assert not any("earlier memaudit" in n for n in notes)
