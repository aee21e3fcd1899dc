"""Mutation review of session 47's changes (helper mnew47): several prompt column names, --retry-failed for the
--confirm stage, the report's breakdowns past MAX_GROUPS, and the prediction_type warning. Each test pins a
behaviour a hand-applied mutant changed without any test failing, or a bug the review found."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq

from audit import sources

NAMES = ("prompt", "text")


def _read(path, names=NAMES, unit_rows=1000):
    """Every row of one input file as ``(row, prompt, error)``, through plan_units and read_unit."""
    files, _ = sources.discover([str(path)])
    plan = sources.plan_units(files, names, unit_rows=unit_rows)
    return [(r, p, e) for u in plan.units for b in sources.read_unit(u, names)
            for r, p, e in zip(b.rows, b.prompts, b.errors)]


def test_a_null_first_name_reads_the_second_in_every_format(tmp_path):
    """A writer that renamed 'prompt' to 'text' and still writes the old key or column empty: each row reads the
    first name holding a value. They were read from the first name present and rejected as null prompts (a whole
    Parquet file of them), though the text was there. An empty JSON or Parquet string is a value (empty_prompt
    later); a CSV's empty field is null, in both CSV readers; a row null in both is a null prompt."""
    lines = [{"prompt": None, "text": "a red cat"}, {"text": "a blue dog", "prompt": None},
             {"prompt": "first", "text": "second"}, {"prompt": None, "text": None}, {"prompt": "", "text": "x"},
             {"prompt": None}]
    want = [(0, "a red cat", None), (1, "a blue dog", None), (2, "first", None), (3, None, None), (4, "", None),
            (5, None, None)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(o) + "\n" for o in lines))
    assert _read(tmp_path / "a.jsonl") == want
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(o) + "\n" for o in lines))
    assert _read(tmp_path / "b.jsonl.gz") == want
    pq.write_table(pa.table({"prompt": pa.array([None, None], pa.string()), "text": ["old city", "a house"]}),
                   tmp_path / "c.parquet")
    assert _read(tmp_path / "c.parquet") == [(0, "old city", None), (1, "a house", None)]
    pq.write_table(pa.table({"prompt": pa.nulls(2), "text": ["old city", None]}), tmp_path / "d.parquet")
    assert _read(tmp_path / "d.parquet") == [(0, "old city", None), (1, None, None)]
    pq.write_table(pa.table({"prompt": [None, 7, None], "text": ["a", "b", None],
                             "other": ["x", "y", "z"]}), tmp_path / "e.parquet")
    assert _read(tmp_path / "e.parquet") == [(0, "a", None), (1, None, "prompt_not_string:int64"), (2, None, None)]
    (tmp_path / "f.csv").write_text("prompt,text\n,a red cat\nfirst,second\n,\n")
    assert _read(tmp_path / "f.csv") == [(0, "a red cat", None), (1, "first", None), (2, None, None)]
    (tmp_path / "g.csv").write_text("prompt,text\n,a red cat\nfirst,second\n,\na, ragged, row\n")
    assert _read(tmp_path / "g.csv") == [(0, "a red cat", None), (1, "first", None), (2, None, None),
                                         (3, "a, ragged, row", "invalid_csv_row")]
