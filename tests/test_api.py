"""The public Python API: importable without torch, and ``audit.score`` equals ``memaudit run``."""

from __future__ import annotations

import subprocess
import sys

import polars as pl
import pytest
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


def test_score_rejects_bad_items_with_the_runs_reasons_and_refuses_a_bare_string(tiny_model_dir):
    import pytest

    import audit

    prompts = [None, 3, "a red cat", "bad \ud800 half", "", b"bytes", "a blue car"]
    df = audit.score(iter(prompts), model=str(tiny_model_dir))  # any iterable
    assert df["row"].to_list() == list(range(7))
    assert df["reason"].to_list() == ["null_prompt", "prompt_not_string", None, "invalid_utf8", "empty_prompt",
                                      "prompt_not_string", None]
    assert df["detail"][1] == "int" and df["detail"][5] == "bytes" and df["prompt"][3] == "bad \\ud800 half"
    scored = df.filter(df["reason"].is_null())
    assert scored["prompt"].to_list() == ["a red cat", "a blue car"] and scored["risk"].is_not_null().all()
    alone = audit.score(["a blue car"], model=str(tiny_model_dir))
    assert abs(alone["risk"][0] - scored["risk"][1]) <= 1e-6  # the same score as among the bad items
    for bad in ("a red cat", b"a red cat", {"a red cat": 1}):
        with pytest.raises(TypeError, match="wrap a single prompt in a list"):
            audit.score(bad, model=str(tiny_model_dir))
    assert audit.score([None, ""], model=str(tiny_model_dir))["reason"].to_list() == ["null_prompt", "empty_prompt"]


def test_api_refuses_unknown_options_and_inputs_that_are_not_paths(tmp_path):
    """A misspelt option, score()'s out, or inputs that are not paths: a TypeError that says so, before any
    model is loaded (they used to surface as RunConfig's or _run()'s own TypeError, or 'int is not iterable')."""
    import pytest

    import audit

    with pytest.raises(TypeError, match=r"unknown option batchsize: the options are address, batch_size,"):
        audit.score(["a cat"], batchsize=8)
    with pytest.raises(TypeError, match=r"unknown options bogus, other:"):
        audit.run(str(tmp_path), bogus=1, other=2)
    with pytest.raises(TypeError, match=r"score\(\) takes no limit, out \(every prompt gets a row; it writes no run "
                                        r"folder\); audit.run\(inputs, out=..., ...\) runs a whole audit"):
        audit.score(["a cat"], out=str(tmp_path / "r"), limit=1)
    for bad, match in (({"seed": "x"}, r"audit.score\(\): 'seed' must be int, not str"),
                       ({"compile": "no"}, "'compile' must be bool, not str"),
                       ({"layers": [3]}, "'layers' must be a string or a list of strings"),
                       ({"model": 5}, "'model' must be str, not int")):
        with pytest.raises(TypeError, match=match):  # seed="x" failed every prompt as scoring_error
            audit.score(["a cat"], **bad)
    from audit.config import checked_option

    assert checked_option("stall_timeout", 0, "audit.run()") is None  # never, as --stall-timeout 0 (a Ray GPU probe
    assert checked_option("stall_timeout", 30, "audit.run()") == 30.0  # took 0 as a zero-second timeout)
    assert checked_option("layers", "a, b", "audit.run()") == ("a", "b") and checked_option("model", None, "x") is None
    assert checked_option("confirm_top", 500, "x") == "500" and checked_option("confirm_top", 0.05, "x") == "0.05"
    with pytest.raises(TypeError, match=r"audit.run\(\): 'noise_draws' must be int, not str"):
        audit.run(str(tmp_path), noise_draws="2")
    for bad in (None, 5):
        with pytest.raises(TypeError, match="prompts must be a list"):
            audit.score(bad)
    for bad in (5, [str(tmp_path), 3], b"prompts.parquet", []):
        with pytest.raises(TypeError, match="inputs must be a path, glob or URL"):
            audit.run(bad, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_nothing_scored_suggests_the_prompt_column_only_for_files_with_columns():
    """All rows rejected as empty or not text: the message asks about --prompt-column when an input file with rows
    has columns; a run of .txt files (one prompt a line, no columns; --prompt-column is refused for them) was told
    the same. Nothing read: only files skipped as unreadable make it a failure."""
    from audit.gates import nothing_scored

    def manifest(*formats, reason="empty_prompt"):
        return {"counts": {"scored": 0, "rows_read": 3, "rejected_by_reason": {reason: 3}},
                "files": [{"path": f"in.{fmt}", "format": fmt, "rows": 3} for fmt in formats]}

    assert nothing_scored(manifest("txt")) == ("nothing was scored: all 3 rows read were rejected (empty_prompt 3); "
                                               "rejects.parquet says why for each")
    for formats in (("parquet",), ("txt", "csv"), ("jsonl",)):
        assert nothing_scored(manifest(*formats)).endswith("says why for each (a wrong --prompt-column?)")
    assert not nothing_scored(manifest("parquet", reason="invalid_utf8")).endswith("?)")
    # nothing read: a clean empty input unless every file with rows was skipped as unreadable (--skip-bad-files);
    # markers and files of other types skipped while discovering the inputs do not count
    empty = {"counts": {"scored": 0, "rows_read": 0, "rejected_by_reason": {}},
             "skipped_files": [{"path": "logs/_SUCCESS", "reason": "marker or hidden file"}]}
    assert nothing_scored(empty) is None
    empty["skipped_files"].append({"path": "logs/a.parquet", "reason": "not Parquet", "unreadable": True})
    assert nothing_scored(empty).startswith("nothing was scored: every input file with rows was skipped as "
                                            "unreadable (1 under --skip-bad-files")


def test_run_that_scores_nothing_fails_after_writing(tmp_path, tiny_model_dir):
    """Rows were read and every one was rejected: exit 4 (the API raises), never a clean-looking run."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    import audit
    from audit.errors import ScoringFailedError

    src = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"prompt": [1, 2, 3]}), src)
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"),
                                   "--no-progress"])
    assert res.exit_code == 4 and "nothing was scored: all 3 rows read were rejected (prompt_not_string 3)" in res.output
    assert pl.read_parquet(tmp_path / "r" / "rejects.parquet").height == 3
    rep = CliRunner().invoke(app, ["report", str(tmp_path / "r")])  # its report and a diff say so too
    assert rep.exit_code == 0 and "warning: the run scored nothing (3 rows read, 3 rejected)" in rep.output
    dif = CliRunner().invoke(app, ["diff", str(tmp_path / "r"), str(tmp_path / "r")])
    assert dif.exit_code == 0 and "the old run scored nothing" in dif.output and "the new run scored nothing" in dif.output
    assert audit.ScoringFailedError is ScoringFailedError  # catchable from the package, as the README says
    with pytest.raises(audit.ScoringFailedError, match="nothing was scored") as err:
        audit.run(src, out=tmp_path / "api", model=str(tiny_model_dir))
    assert err.value.manifest["counts"]["rejected"] == 3 and (tmp_path / "api" / "rejects.parquet").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = CliRunner().invoke(app, ["run", str(empty), "--model", str(tiny_model_dir), "--out", str(tmp_path / "e"),
                                   "--no-progress"])
    assert res.exit_code == 0 and "the inputs hold no rows" in res.output  # no rows at all: a warning


def test_score_takes_columns_and_refuses_whole_tables(tiny_model_dir):
    """A Series or an Arrow array of prompts is scored as the list; a DataFrame or Arrow table is refused (a pandas
    DataFrame iterates its column NAMES: it scored the one string "prompt" as if it were the audit)."""
    import pandas as pd
    import pyarrow as pa

    import audit

    prompts = ["a red cat", "a blue car", None]
    expected = audit.score(prompts, model=str(tiny_model_dir))
    for column in (pa.array(prompts), pa.chunked_array([prompts[:1], prompts[1:]]), pl.Series(prompts),
                   pd.Series(prompts)):
        got = audit.score(column, model=str(tiny_model_dir))
        assert got["risk"].to_list() == expected["risk"].to_list(), type(column)
        assert got["reason"].to_list() == [None, None, "null_prompt"]  # pandas' missing value (NaN) too
    frames = (pd.DataFrame({"prompt": prompts}), pl.DataFrame({"prompt": prompts}), pa.table({"prompt": prompts}),
              pa.record_batch({"prompt": pa.array(prompts)}))
    for frame in frames:
        with pytest.raises(TypeError, match=r"not a table .*pass its prompt column, e.g. df\['prompt'\]"):
            audit.score(frame, model=str(tiny_model_dir))
