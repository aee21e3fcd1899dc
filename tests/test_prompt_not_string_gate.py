"""Rows whose prompt is not text are an input failure for the exit-4 gate (found by the release-candidate trial,
session 50): a Parquet file whose prompt column holds integers rejected every row as prompt_not_string, a reason
no gate counted, so a whole file went unaudited and the run exited 0."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from audit.cli import app
from audit.gates import INPUT_FAILURES, gated_reasons


def test_a_file_whose_prompt_column_holds_integers_fails_the_run(tmp_path, tiny_model_dir):
    logs = tmp_path / "logs"
    logs.mkdir()
    pq.write_table(pa.table({"prompt": ["a red cat", "the blue sofa", "a city at night", "an old tower"]}),
                   logs / "a.parquet")
    pq.write_table(pa.table({"prompt": [7, 8]}), logs / "b.parquet")  # an export that wrote ids as prompts
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", str(logs), "--model", str(tiny_model_dir), "--device", "cpu", "--out",
                                   str(out), "--no-progress"])
    assert res.exit_code == 4, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert (c["rows_read"], c["scored"], c["rejected"], c["rejected_by_reason"]) == (6, 4, 2, {"prompt_not_string": 2})
    assert "prompt_not_string" in manifest["gated_reasons"]["input"] and "prompt_not_string" in INPUT_FAILURES
    assert ("memaudit: error: 2 of 6 rows read (33.3%) could not be read as prompts (prompt_not_string 2), more than "
            "--max-error-fraction 0.01: the audit covers only part of its input (a prompt column of numbers or "
            "lists? rejects.parquet's detail names the type; give the text column with --prompt-column; "
            "rejects.parquet names each row's file)") in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["run", str(logs), "--model", str(tiny_model_dir), "--device", "cpu", "--out",
                                   str(tmp_path / "run2"), "--no-progress", "--max-error-fraction", "0.34"])
    assert res.exit_code == 0, res.output  # 2 of 6 is within a limit the user chose
    assert gated_reasons()["input"][-1] == "prompt_not_string"
