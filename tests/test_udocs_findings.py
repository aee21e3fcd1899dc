"""Findings of a check of README.md and docs/ against the code: where the docs describe the intended behaviour
and the code did otherwise, the code was fixed and the behaviour is pinned here."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit.errors import RunError
from audit.evaluate import read_labelled
from helpers import labels_csv


@pytest.mark.parametrize("labels, message", [
    # README: "A missing, null or other label is refused in one line naming its rows and the values seen". One
    # 'yes' among true/false makes pyarrow read the whole CSV column as text, and the line named the values only,
    # not the row holding the 'yes' (in a large table the user had to search for it)
    (["true", "false", "yes", "true", "false", "false"],
     "values seen: 'false', 'true', 'yes' (row 2 not true/false or 0/1)"),
    (["1", "0", "n/a", "1", "maybe", "0"], "values seen: '0', '1', 'maybe', 'n/a' (row 2, 4 not true/false or 0/1)"),
    # every row is no label at all: the values say it, no row list (as for numbers)
    (["yes", "no", "no", "yes", "no", "no"], "values seen: 'no', 'yes'"),
])
def test_text_labels_name_the_rows_that_are_no_label(tmp_path, labels, message):
    path = labels_csv(tmp_path, labels)
    with pytest.raises(RunError) as err:
        read_labelled(path)
    assert str(err.value) == (f"{path}: label column 'memorized' is string, not boolean (true/false, or integers "
                              f"0/1); {message}")


def test_text_zero_one_labels_in_parquet_name_no_rows(tmp_path):
    # every value is a label's spelling, only the column's type is wrong: no row is singled out
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog", "a fox"], "memorized": ["1", "0", " True"]}), path)
    with pytest.raises(RunError) as err:
        read_labelled(path)
    assert str(err.value) == (f"{path}: label column 'memorized' is string, not boolean (true/false, or integers 0/1); "
                              "values seen: ' True', '0', '1'")


def test_lab_examples_help_prints_usage_and_writes_no_file(tmp_path, monkeypatch, capsys):
    # docs/lab.md: "regenerate: `python -m audit.lab.examples`". A new user's `python -m audit.lab.examples --help`
    # wrote the example table to a Parquet file named "--help" in the working folder, and printed its name
    from audit.lab.examples import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "usage: python -m audit.lab.examples [-h] [path]" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as exit_:  # an unknown option is refused, not taken as the path
        main(["-q"])
    assert exit_.value.code == 2 and list(tmp_path.iterdir()) == []
    assert main(["ex.parquet"]) == Path("ex.parquet")
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "ex.parquet")
    assert table.column_names == ["prompt_id", "prompt"] and table.num_rows == 576
    assert table.column("prompt_id")[0].as_py() == "lab-0000"


def test_eval_json_warnings_hold_every_warning_printed(tmp_path):
    # README: `--json` prints `"warnings": the lines printed as warnings`. On the bundled lab model (the README's
    # `memaudit eval audit/lab/prompts.parquet --model audit/lab/model ... --json`) the line saying it fails its
    # acceptance criteria was printed on stderr but left out of the JSON, which a script reading it never saw
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.cli.eval import lab_criteria_note
    from audit.lab import LAB_MODEL_DIR

    path = tmp_path / "labelled.parquet"
    prompts = ["a red cat", "a blue dog on a sofa", "old city street at night", "portrait of a woman",
               "a green bird", "a yellow house", "a painting of a boat", "two cats on a bed"]
    pq.write_table(pa.table({"prompt": prompts, "memorized": [True, True, False, False, False, False, False, False]}),
                   path)
    res = CliRunner().invoke(app, ["eval", str(path), "--model", str(LAB_MODEL_DIR), "--json", "--device", "cpu",
                                   "--bootstrap", "20"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    note = lab_criteria_note(str(LAB_MODEL_DIR))
    assert note.startswith("this lab model fails its acceptance criteria")
    assert out["warnings"] == [
        "6 ordinary prompts cannot measure TPR at 1% FPR (one false positive is already 16.7% FPR, not below 1%; it "
        "needs at least 101)",
        "6 ordinary prompts cannot measure TPR at 3% FPR (one false positive is already 16.7% FPR, not below 3%; it "
        "needs at least 34)",
        "2 memorized and 6 ordinary prompts: too few for a stable AUROC (its bootstrap CI understates the uncertainty "
        "with under 10 of a class)", note]
    printed = [line.removeprefix("memaudit: warning: ") for line in res.stderr.splitlines()
               if line.startswith("memaudit: warning: ")]
    assert out["warnings"] == printed
