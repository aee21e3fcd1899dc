"""Findings of a new-user trial (an ML researcher comparing scorers on a labelled prompt CSV): the labelled table
that ``memaudit eval`` reads, its errors, and its figures against scikit-learn on a run's risk.parquet."""

from __future__ import annotations

import pytest

from audit.errors import RunError
from audit.evaluate import read_labelled


def test_csv_prompts_that_look_like_numbers_are_text(tmp_path):
    # pyarrow typed a CSV prompt column holding only numbers as int64 (or double), and eval refused
    # it ("prompt column 'prompt' is int64, not text") where `memaudit run` reads every CSV field as text
    path = tmp_path / "labels.csv"
    path.write_text("id,prompt,memorized\n0,1984,1\n1,007,0\n2,3.50,0\n3,1e5,1\n", encoding="utf-8")
    prompts, labels = read_labelled(path)
    assert prompts == ["1984", "007", "3.50", "1e5"]  # exactly as written: no 7, no 3.5, no 100000.0
    assert labels.tolist() == [True, False, False, True]


def test_csv_not_in_utf8_names_its_rows(tmp_path):
    # a CSV saved from a spreadsheet in cp1252 was refused as "prompt column 'prompt' is binary, not text"
    path = tmp_path / "labels.csv"
    path.write_bytes("prompt,memorized\ncaf\u00e9 au lait,1\na blue dog,0\nna\u00efve,0\na fox,1\n".encode("cp1252"))
    with pytest.raises(RunError) as err:
        read_labelled(path)
    assert str(err.value) == (f"{path}: 2 row(s) whose prompt is not valid UTF-8 (row 0, 2; 0-based data rows): save "
                              "the table as UTF-8 (`memaudit run` rejects such rows as invalid_utf8)")
