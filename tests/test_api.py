"""The public Python API: importable without torch, and ``audit.score`` equals ``memaudit run``."""

from __future__ import annotations

import subprocess
import sys

import polars as pl
from typer.testing import CliRunner

from audit.cli import app

PROMPTS = ["a red cat on a beach", "an old city street at sunset", "a portrait of a small blue dog"]


def test_import_audit_loads_no_torch():
    code = "import sys, audit; audit.__getattr__; print([m for m in ('torch', 'diffusers', 'ray') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_score_equals_memaudit_run_in_input_order_with_rejects(tmp_path, tiny_model_dir):
    import audit

    df = audit.score(PROMPTS + [""], model=str(tiny_model_dir), batch_size=4)
    assert df["row"].to_list() == [0, 1, 2, 3]
    assert df["reason"].to_list() == [None, None, None, "empty_prompt"] and df["risk"][3] is None
    src = tmp_path / "p.txt"
    src.write_text("\n".join(PROMPTS) + "\n")
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"),
                                   "--batch-size", "4", "--no-progress"])
    assert res.exit_code == 0, res.output
    cli = pl.read_parquet(tmp_path / "r" / "risk.parquet").sort("row")
    for col in ("prompt", "risk", "attn_entropy", "bos_mass", "noise_magnitude", "trigger_tokens", "n_tokens",
                "truncated", "prompt_hash", "rank"):
        assert df[col][:3].to_list() == cli[col].to_list(), col
