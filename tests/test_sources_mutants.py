"""audit.sources where hand-applied mutants survived: the empty inputs (zero bytes, a header alone, blank lines),
the unit split of each format, and the per-row reasons of each reader, with exact rows and reasons."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit import sources
from audit.errors import SourceError


def _read_all(plan, prompt_column="prompt", id_column=None, keep_columns=()):
    """``[(row, prompt, id, error)]`` of every unit of ``plan``, read in order from fresh streams."""
    sources._STREAMS.clear()
    out = []
    for unit in plan.units:
        for b in sources.read_unit(unit, prompt_column, id_column, keep_columns):
            ids = b.ids if b.ids is not None else [None] * len(b.rows)
            out += list(zip(b.rows, b.prompts, ids, b.errors))
    sources._STREAMS.clear()
    return out


def _plan(paths, prompt_column="prompt", **kw):
    files, _ = sources.discover([str(p) for p in paths])
    return sources.plan_units(files, prompt_column, **kw)


def test_a_zero_byte_parquet_claims_no_column(tmp_path):
    """A zero-byte .parquet was planned as holding exactly the prompt column, whatever it was named: beside a real
    file that lacks the column (a --prompt-column typo), the run was not refused and every real row was rejected as
    missing_prompt_column. It holds no rows and no columns: the typo is refused, naming the real file's columns."""
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog"], "id": ["x", "y"]}), tmp_path / "a.parquet")
    (tmp_path / "z.parquet").write_bytes(b"")
    with pytest.raises(SourceError, match=r"no input has the prompt column 'text'; columns found: id, prompt\."):
        _plan([tmp_path / "a.parquet", tmp_path / "z.parquet"], "text")
    plan = _plan([tmp_path / "a.parquet", tmp_path / "z.parquet"])
    assert plan.columns[str(tmp_path / "z.parquet")] == []
    assert plan.file_rows == {str(tmp_path / "a.parquet"): 2, str(tmp_path / "z.parquet"): 0}
    assert [(u.url, u.start, u.stop, u.missing_column) for u in plan.units] == [(str(tmp_path / "a.parquet"), 0, 2,
                                                                                 False)]
    assert _read_all(plan) == [(0, "a red cat", None, None), (1, "a blue dog", None, None)]
    alone = _plan([tmp_path / "z.parquet"], "text")  # alone: no rows, nothing to refuse (the run warns of it)
    assert (alone.units, alone.total_rows, alone.columns) == ([], 0, {str(tmp_path / "z.parquet"): []})
