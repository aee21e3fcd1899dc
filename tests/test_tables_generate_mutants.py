"""What a mutation review of audit/tables.py (schemas, atomic writes, the finished-run check) and audit/cli/generate.py
(`memaudit generate`) found untested, and the bugs behind some of it. Tables are built by hand from the schemas,
generation is stubbed where no image is needed; CPU, seconds."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from audit.cli import app


# --- audit/cli/generate.py --------------------------------------------------------------------------------------
def _row(i, seed, status="image", reason=None):
    """One generations row of prompt ``i`` (an image row unless ``status`` says otherwise)."""
    return {"prompt_index": i, "prompt": f"p{i}", "seed": seed,
            "image_path": f"images/{i:08d}_s{seed}.png" if status == "image" else None, "risk": 0.5,
            "flagged": None, "mitigated": False, "status": status, "reason": reason}


def _oom(i, prompt):
    raise RuntimeError("CUDA out of memory (simulated)")


OFF = {"mitigate": "off", "calibration": None}


def test_a_damaged_part_whose_prompt_fails_again_is_not_read_as_its_rows(tmp_path):
    """A part copied over from another prompt (or cut short) is generated again; when that generation failed, the
    failed placeholder was written beside the damaged part, and _finalize read the damaged part first: another
    prompt's rows listed twice (the failure hidden, 2 images counted for 1), or an ArrowInvalid traceback."""
    from audit.cli.generate import _finalize, _generate_missing

    (tmp_path / "parts").mkdir()
    rows_in = [("p0", None), ("p1", None)]
    assert _generate_missing(tmp_path, rows_in, 1, False, lambda i, p: [_row(i, 0)]) == 2
    parts = tmp_path / "parts"
    shutil.copy(parts / "00000000.parquet", parts / "00000001.parquet")  # prompt 0's part copied over prompt 1's
    assert _generate_missing(tmp_path, rows_in, 1, False, _oom) == 0
    assert sorted(p.name for p in parts.iterdir()) == ["00000000.parquet", "00000001.failed.parquet"]
    summary = _finalize(tmp_path, 2, 1, OFF, 0, 1.0)
    assert (summary["images"], summary["rejected_by_reason"]) == (1, {"generation_failed": 1})
    rows = pq.read_table(tmp_path / "generations.parquet").to_pylist()
    assert [(r["prompt_index"], r["status"]) for r in rows] == [(0, "image"), (1, "rejected")]
    assert rows[1]["reason"] == "generation_failed: RuntimeError: CUDA out of memory (simulated)"
    (parts / "00000001.parquet").write_bytes(b"PAR1 not a whole file")  # cut short, then fails again
    _generate_missing(tmp_path, rows_in, 1, False, _oom)
    assert _finalize(tmp_path, 2, 1, OFF, 0, 1.0)["rejected_by_reason"] == {"generation_failed": 1}
    # and once it generates, the placeholder goes
    assert _generate_missing(tmp_path, rows_in, 1, False, lambda i, p: [_row(i, 0)]) == 1
    assert sorted(p.name for p in parts.iterdir()) == ["00000000.parquet", "00000001.parquet"]
