"""Several prompt column names (``--prompt-column prompt --prompt-column text``): prompt logs whose writer renamed
the column. Each file with a schema, and each JSON line, takes the first of the names it has; a row with none of
them is a ``missing_prompt_column`` reject. Counts, prompts, the run's identity, the config file and the
refusals, each checked against the files the test writes."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from audit.config import RunConfig
from audit.errors import ConfigError, RunError, SourceError


def _logs(root):
    """Six files: JSON lines with 'prompt', 'text', neither, and both keys; a Parquet file with 'text' only; one
    with both columns; a CSV (read by pyarrow) with 'text'; a CSV with a ragged row (read record by record) with
    'text'; a CSV with neither column."""
    root.mkdir()
    lines = [{"prompt": "a red cat"}, {"text": "a blue dog"}, {"other": "x"}, {"text": "late", "prompt": "first"}]
    (root / "a.jsonl").write_text("".join(json.dumps(o) + "\n" for o in lines))
    pq.write_table(pa.table({"text": ["old city street", "a small house"]}), root / "b.parquet")
    pq.write_table(pa.table({"text": ["not this"], "prompt": ["sunset over the lake"]}), root / "c.parquet")
    (root / "d.csv").write_text("id,text\n1,oil painting of a boat\n2,portrait of a woman\n")
    (root / "e.csv").write_text("text,n\nan old tower,1\na, ragged, row\n")
    (root / "f.csv").write_text("caption\nhello\n")
    return root


SCORED = {("a.jsonl", 0): "a red cat", ("a.jsonl", 1): "a blue dog", ("a.jsonl", 3): "first",
          ("b.parquet", 0): "old city street", ("b.parquet", 1): "a small house",
          ("c.parquet", 0): "sunset over the lake", ("d.csv", 0): "oil painting of a boat",
          ("d.csv", 1): "portrait of a woman", ("e.csv", 0): "an old tower"}
REJECTED = {("a.jsonl", 2): "missing_prompt_column", ("e.csv", 1): "invalid_csv_row",
            ("f.csv", 0): "missing_prompt_column"}


def _execute(root, model, out, prompt_column=("prompt", "text")):
    from audit.runner import execute

    lines: list[str] = []
    cfg = RunConfig(inputs=(str(root),), model=str(model), out=str(out), device="cpu", prompt_column=prompt_column,
                    max_error_fraction=1.0)
    return execute(cfg, progress=False, log=lines.append)[1], lines


def _rows(out):
    name = lambda s: s.rsplit("/", 1)[-1]  # noqa: E731
    risk = pq.read_table(out / "risk.parquet").to_pylist()
    rej = pq.read_table(out / "rejects.parquet").to_pylist()
    return ({(name(r["source"]), r["row"]): r["prompt"] for r in risk},
            {(name(r["source"]), r["row"]): r["reason"] for r in rej})


def test_each_file_and_json_line_takes_the_first_name_it_has(tmp_path, tiny_model_dir):
    """12 rows read: 9 scored from whichever of the names each file (line) has, the first when both; 3 rejected
    (a line and a file with neither name, a ragged CSV row). The warning names both columns, and run.json
    records them as a list."""
    root = _logs(tmp_path / "logs")
    manifest, lines = _execute(root, tiny_model_dir, tmp_path / "out")
    c = manifest["counts"]
    assert (c["rows_read"], c["scored"], c["rejected"]) == (12, 9, 3)
    assert _rows(tmp_path / "out") == (SCORED, REJECTED)
    assert [line for line in lines if "no column" in line] == [
        f"memaudit: warning: 1 of 6 input files has no column 'prompt' or 'text', so its 1 row is rejected as "
        f"missing_prompt_column; the first: {root / 'f.csv'} (columns: caption)"]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["prompt_column"] == ["prompt", "text"]


def test_a_rerun_resumes_and_another_order_is_another_run(tmp_path, tiny_model_dir):
    """The same names resume the folder (nothing scored again); the names in the other order pick other rows of
    the files holding both (c.parquet, a.jsonl's last line), so the folder refuses them; one name is recorded
    as a string, as before several were possible, and a repeated name is one name."""
    root = _logs(tmp_path / "logs")
    _execute(root, tiny_model_dir, tmp_path / "out")
    manifest, lines = _execute(root, tiny_model_dir, tmp_path / "out")
    assert manifest["rows_this_run"] == 0 and manifest["counts"]["scored"] == 9
    assert f"memaudit: resuming {tmp_path / 'out'}: 6 of 6 units already done" in lines
    with pytest.raises(RunError, match=r"prompt_column: \['prompt', 'text'\] -> \['text', 'prompt'\]"):
        _execute(root, tiny_model_dir, tmp_path / "out", ("text", "prompt"))
    manifest, _ = _execute(root, tiny_model_dir, tmp_path / "other", ("text", "prompt"))
    scored, _ = _rows(tmp_path / "other")
    assert (scored[("c.parquet", 0)], scored[("a.jsonl", 3)]) == ("not this", "late")
    assert RunConfig(inputs=("x",), prompt_column=("text", "text")).prompt_column == "text"
    _execute(root, tiny_model_dir, tmp_path / "one", ("text",))
    assert json.loads((tmp_path / "one" / "run.json").read_text())["prompt_column"] == "text"


def test_refusals_name_every_prompt_column(tmp_path, tiny_model_dir):
    """No input with any of the names is refused naming them all; .txt inputs refuse them as they refuse one;
    an empty name is refused before any input is read."""
    from audit.runner import execute

    (tmp_path / "p.csv").write_text("caption\nhello\n")
    with pytest.raises(SourceError, match=r"^no input has any of the prompt columns 'prompt', 'text'; columns "
                                          r"found: caption\. Choose one with --prompt-column\.$"):
        _execute(tmp_path / "p.csv", tiny_model_dir, tmp_path / "out")
    (tmp_path / "p.txt").write_text("a red cat\n")
    with pytest.raises(SourceError, match=r"^--prompt-column 'prompt' or 'text': the inputs are \.txt files"):
        _execute(tmp_path / "p.txt", tiny_model_dir, tmp_path / "out2")
    cfg = RunConfig(inputs=(str(tmp_path / "p.csv"),), model=str(tiny_model_dir), device="cpu",
                    prompt_column=("caption", ""))
    with pytest.raises(RunError, match=r"^--prompt-column: give a column name"):
        execute(cfg, progress=False, log=lambda m: None)


def test_the_command_line_and_a_config_file(tmp_path, tiny_model_dir):
    """--prompt-column given twice on the command line, or a list in --config, scores the same 9 rows; a list
    holding a number is refused in one line."""
    from audit.cli import app
    from audit.config import build_run_config

    root = _logs(tmp_path / "logs")
    base = ["run", str(root), "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress",
            "--max-error-fraction", "1"]
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "cli"), "--prompt-column", "prompt",
                                   "--prompt-column", "text"])
    assert res.exit_code == 0, res.output
    assert _rows(tmp_path / "cli") == (SCORED, REJECTED)
    conf = tmp_path / "run.toml"
    conf.write_text(f'prompt_column = ["prompt", "text"]\nout = "{tmp_path / "toml"}"\n')
    res = CliRunner().invoke(app, [*base, "--config", str(conf)])
    assert res.exit_code == 0, res.output
    assert _rows(tmp_path / "toml") == (SCORED, REJECTED)
    conf.write_text('inputs = ["x"]\nprompt_column = ["prompt", 3]\n')
    with pytest.raises(ConfigError, match="'prompt_column' must be a string or a non-empty list of strings"):
        build_run_config({}, set(), conf)
