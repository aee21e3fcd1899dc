"""Findings of a data engineer's trial of ``--prompt-column`` given several times and ``memaudit run --dry-run`` over a
prompt-log bucket whose schema drifted (``text`` renamed ``prompt``; Parquet, gzipped JSON lines, spreadsheet CSV):
each test fails on the code before its fix."""

from __future__ import annotations

from audit.sources import Unit, read_unit


def _read(path, fmt, rows, names):
    """``(prompts, errors)`` of every row of one file read as one unit under the prompt ``names``."""
    prompts, errors = [], []
    for batch in read_unit(Unit(0, str(path), fmt, 0, rows), tuple(names)):
        prompts += batch.prompts
        errors += batch.errors
    return prompts, errors


def test_a_quoted_empty_csv_field_in_the_first_name_reads_the_second(tmp_path):
    """A spreadsheet export quotes every field: the migration week's old column holds ``""`` where the new one holds
    the prompt. Each row reads the first name holding a value, and in a CSV an empty field holds none (README), as
    the record-by-record reader already read it: the columnar reader took the ``""`` (an empty_prompt reject)."""
    body = 'text,prompt\r\n"","a red cat"\r\n,"a blue dog"\r\n"old only",\r\n"old two",""\r\n'
    (tmp_path / "a.csv").write_text(body)
    assert _read(tmp_path / "a.csv", "csv", 4, ["text", "prompt"]) == (
        ["a red cat", "a blue dog", "old only", "old two"], [None] * 4)
    (tmp_path / "b.csv").write_text(body + "x,y,z\r\n")  # a ragged row: read record by record, as before
    assert _read(tmp_path / "b.csv", "csv-records", 5, ["text", "prompt"]) == (
        ["a red cat", "a blue dog", "old only", "old two", "x,y,z"], [None] * 4 + ["invalid_csv_row"])
    # a single name keeps its documented reading: a quoted "" is an empty prompt (empty_prompt), not null
    assert _read(tmp_path / "a.csv", "csv", 4, ["text"])[0] == ["", None, "old only", "old two"]
