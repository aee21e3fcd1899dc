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


def test_the_empty_inputs_hold_no_rows_or_give_each_row_a_reason(tmp_path):
    """A CSV of a header alone, an empty .txt and a .jsonl of blank lines: no rows, or each row with its reason."""
    (tmp_path / "h.csv").write_text("id,prompt\n")
    (tmp_path / "e.txt").write_bytes(b"")
    (tmp_path / "b.jsonl").write_text("\n\r\n\n")
    (tmp_path / "b.txt").write_text("\n \n")
    plan = _plan([tmp_path / n for n in ("h.csv", "e.txt", "b.jsonl", "b.txt")])
    assert plan.file_rows == {str(tmp_path / "h.csv"): 0, str(tmp_path / "e.txt"): 0, str(tmp_path / "b.jsonl"): 3,
                              str(tmp_path / "b.txt"): 2}
    assert plan.columns == {str(tmp_path / "h.csv"): ["id", "prompt"], str(tmp_path / "e.txt"): ["prompt"],
                            str(tmp_path / "b.jsonl"): [], str(tmp_path / "b.txt"): ["prompt"]}
    assert [(u.url, u.start, u.stop) for u in plan.units] == [(str(tmp_path / "b.jsonl"), 0, 3),
                                                              (str(tmp_path / "b.txt"), 0, 2)]
    blank = "empty_prompt"  # a blank JSON line holds no prompt, as a blank .txt line (not an invalid_json line)
    assert _read_all(plan) == [(0, "", None, blank), (1, "", None, blank),
                               (2, "", None, blank), (0, "", None, None), (1, " ", None, None)]
    with pytest.raises(SourceError, match="no input has the prompt column 'text'; columns found: id, prompt"):
        _plan([tmp_path / "h.csv"], "text")


@pytest.mark.parametrize("end", ["\n", ""])
def test_line_files_are_cut_at_unit_rows_with_each_units_byte_offset(tmp_path, end):
    """Six lines at 2 rows a unit: three units whose byte offsets are the starts of lines 0, 2 and 4, the last line
    read whether or not a line break ends it; a leading BOM is dropped from row 0 only (not from a later unit's
    first row that begins with one)."""
    lines = ["\ufeffa cat", "b dog", "\ufeffc cow", "d elk", "e fox", "f gnu"]
    text = "\n".join(lines) + end
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    (tmp_path / "p.jsonl").write_text("\ufeff" + "\n".join(f'{{"prompt": "{s[-5:]}", "i": {i}}}' for i, s in
                                                            enumerate(lines)) + end, encoding="utf-8")
    plan = _plan([tmp_path / "p.txt", tmp_path / "p.jsonl"], unit_rows=2)
    raw = text.encode()
    starts = [0, raw.index(b"\xef\xbb\xbfc cow"), raw.index(b"e fox")]
    txt_units = [(u.start, u.stop, u.byte_offset) for u in plan.units if u.fmt == "txt"]
    assert txt_units == [(0, 2, starts[0]), (2, 4, starts[1]), (4, 6, starts[2])]
    jl = (tmp_path / "p.jsonl").read_bytes()
    jl_starts = [0] + [i + 1 for i, b in enumerate(jl) if b == 0x0A][1:4:2]
    assert [(u.start, u.stop, u.byte_offset) for u in plan.units if u.fmt == "jsonl"] == [
        (0, 2, jl_starts[0]), (2, 4, jl_starts[1]), (4, 6, jl_starts[2])]
    rows = _read_all(plan)
    assert rows[:6] == [(0, "a cat", None, None), (1, "b dog", None, None), (2, "\ufeffc cow", None, None),
                        (3, "d elk", None, None), (4, "e fox", None, None), (5, "f gnu", None, None)]
    assert rows[6:] == [(i, s[-5:], None, None) for i, s in enumerate(lines)]
    assert plan.file_rows == {str(tmp_path / "p.txt"): 6, str(tmp_path / "p.jsonl"): 6}
    five = _plan([tmp_path / "p.txt"], unit_rows=5)
    assert [(u.start, u.stop, u.byte_offset) for u in five.units] == [(0, 5, 0), (5, 6, raw.index(b"f gnu"))]
    six = _plan([tmp_path / "p.txt"], unit_rows=6)  # the whole file: one unit, none after its last line
    assert [(u.start, u.stop, u.byte_offset) for u in six.units] == [(0, 6, 0)]


def test_parquet_units_cut_across_row_groups(tmp_path):
    """Row groups of 3, 3, 0 and 4 rows at 4 rows a unit: units [0, 4), [4, 8), [8, 10), each read with exactly its
    rows (a unit spanning two groups, a group spanning two units); at 10 rows a unit, one unit."""
    import pyarrow.parquet as pq

    path = tmp_path / "g.parquet"
    with pq.ParquetWriter(path, pa.schema([("prompt", pa.string())])) as w:
        for rows in ([0, 1, 2], [3, 4, 5], [], [6, 7, 8, 9]):
            w.write_table(pa.table({"prompt": pa.array([f"p{i}" for i in rows], pa.string())}))
    assert [pq.ParquetFile(path).metadata.row_group(g).num_rows for g in range(4)] == [3, 3, 0, 4]
    plan = _plan([path], unit_rows=4)
    assert [(u.start, u.stop) for u in plan.units] == [(0, 4), (4, 8), (8, 10)]
    assert [sources.row_group_ranges(u) for u in plan.units] == [[(0, 3), (3, 4)], [(4, 6), (6, 8)], [(8, 10)]]
    assert _read_all(plan) == [(i, f"p{i}", None, None) for i in range(10)]
    real, groups = pq.ParquetFile.iter_batches, []

    def spy(self, *a, **k):
        groups.append(k.get("row_groups"))
        assert k.get("columns") == ["prompt"]  # only the columns asked for are read
        return real(self, *a, **k)

    threes = _plan([path], unit_rows=3)
    pq.ParquetFile.iter_batches = spy
    try:  # each unit alone, out of order, reading only the groups holding its rows (the empty one is harmless)
        for unit in plan.units[::-1] + threes.units:
            assert [r for b in sources.read_unit(unit, "prompt") for r in b.rows] == list(range(unit.start, unit.stop))
    finally:
        pq.ParquetFile.iter_batches = real
    assert groups == [[3], [1, 2, 3], [0, 1], [0], [1], [3], [3]]
    assert [(u.start, u.stop) for u in _plan([path], unit_rows=10).units] == [(0, 10)]
    assert [(u.start, u.stop) for u in _plan([path], unit_rows=3).units] == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_csv_units_cut_at_unit_rows(tmp_path):
    """Seven records (one holding a line break) at 3 rows a unit: [0, 3), [3, 6), [6, 7), every row read once."""
    (tmp_path / "p.csv").write_text('prompt\nr0\n"r1\nmore"\nr2\nr3\nr4\nr5\nr6\n')
    plan = _plan([tmp_path / "p.csv"], unit_rows=3)
    assert [(u.start, u.stop, u.fmt) for u in plan.units] == [(0, 3, "csv"), (3, 6, "csv"), (6, 7, "csv")]
    expect = [(i, "r1\nmore" if i == 1 else f"r{i}", None, None) for i in range(7)]
    assert _read_all(plan) == expect
    sources._STREAMS.clear()
    assert [(r, p) for u in plan.units[::-1] for b in sources.read_unit(u, "prompt") for r, p in
            zip(b.rows, b.prompts)] == [(6, "r6"), (3, "r3"), (4, "r4"), (5, "r5"), (0, "r0"), (1, "r1\nmore"),
                                        (2, "r2")]


HALF = ", half of a UTF-16 surrogate pair without its other half (an emoji or other character cut in two), which is no " \
       "character"


def test_json_lines_reasons_row_by_row(tmp_path):
    """Each kind of bad JSON line gets its own reason, the raw line kept where the JSON cannot be read."""
    lines = [b'{"prompt": "a cat", "id": "i0", "k": 1.5}', b'{"prompt": 3, "id": "i1"}', b'{"prompt": true}',
             b'{"prompt": null, "id": "i3"}', b'{"id": "i4"}', b"[1, 2]", b'"just text"', b"not json",
             b'{"prompt": "half \\ud83d", "id": "i8"}', b'{"prompt": "ok", "id": 9, "k": {"a": [1, null]}}',
             b'{"prompt": "ok2"}', b'{"prompt": "ok3", "id": null}', b"{}", b'{"prompt": "x", "id": "bad \\udc00"}',
             b'{"prompt": ["a"], "id": "i14"}', b'{"prompt": "bad \xff", "id": "u"}']
    (tmp_path / "r.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    plan = _plan([tmp_path / "r.jsonl"], id_column="id", keep_columns=("k",))
    sources._STREAMS.clear()
    got = [x for u in plan.units for b in sources.read_unit(u, "prompt", "id", ("k",))
           for x in zip(b.rows, b.prompts, b.ids, b.extras["k"], b.errors)]
    assert got == [
        (0, "a cat", "i0", "1.5", None), (1, None, "i1", None, "prompt_not_string:int"),
        (2, None, None, None, "prompt_not_string:bool"), (3, None, "i3", None, None),
        (4, None, "i4", None, "missing_prompt_column"),
        (5, "[1, 2]", None, None, "invalid_json:a JSON array, not an object"),
        (6, '"just text"', None, None, "invalid_json:a JSON string, not an object"),
        (7, "not json", None, None, "invalid_json:Expecting value: line 1 column 1 (char 0)"),
        (8, '{"prompt": "half \\ud83d", "id": "i8"}', "i8", None, f"invalid_utf8:the prompt holds the JSON escape "
                                                                  f"\\ud83d{HALF}"),
        (9, "ok", "9", '{"a": [1, null]}', None), (10, "ok2", None, None, "missing_id_column"),
        (11, "ok3", None, None, None), (12, None, None, None, "missing_prompt_column"),
        (13, "x", "bad \\udc00", None, f"invalid_utf8:the id holds the JSON escape \\udc00{HALF}"),
        (14, None, "i14", None, "prompt_not_string:list"),
        (15, '{"prompt": "bad \\xff", "id": "u"}', None, None, "invalid_utf8")]
    plain = [b for u in plan.units for b in sources.read_unit(u, "prompt")]
    assert [b.ids for b in plain] == [None] and plain[0].errors[10] is None  # without --id-column: no ids, no reason


def test_columnar_reasons_row_by_row(tmp_path):
    """Parquet: a prompt column that is not text rejects its non-null rows only (a null is a null prompt), an
    all-null column gives null prompts, an id that is not UTF-8 rejects its row, and kept columns that are not text
    are written as text (a float32 at its shortest, a boolean as JSON, a list as JSON)."""
    bad = pa.array([b"a", b"b\xff", None], pa.binary())
    pq.write_table(pa.table({"prompt": pa.array([1, None, 3, None], pa.int64()),
                             "id": pa.array([b"a", b"b\xff", None, b"d"], pa.binary()),
                             "f": pa.array([0.1, None, 2.5, 1], pa.float32()), "b": pa.array([True, False, None, True]),
                             "l": pa.array([[1, 2], None, [], [3]], pa.list_(pa.int32()))}), tmp_path / "n.parquet")
    pq.write_table(pa.table({"prompt": pa.array([None, None], pa.null()), "id": pa.array(["x", "y"])}),
                   tmp_path / "z.parquet")
    pq.write_table(pa.table({"prompt": ["ok", "fine", None], "id": bad}), tmp_path / "s.parquet")
    plan = _plan([tmp_path / "n.parquet", tmp_path / "z.parquet", tmp_path / "s.parquet"], id_column="id",
                 keep_columns=("f", "b", "l"))
    sources._STREAMS.clear()
    got = [x for u in plan.units for b in sources.read_unit(u, "prompt", "id", ("f", "b", "l"))
           for x in zip(b.rows, b.prompts, b.ids, b.extras["f"], b.extras["b"], b.extras["l"], b.errors)]
    assert got == [(0, None, "a", "0.1", "true", "[1, 2]", "prompt_not_string:int64"),
                   (1, None, None, None, "false", None, "invalid_utf8"),
                   (2, None, None, "2.5", None, "[]", "prompt_not_string:int64"),
                   (3, None, "d", "1.0", "true", "[3]", None),
                   (0, None, "x", None, None, None, None), (1, None, "y", None, None, None, None),
                   (0, "ok", "a", None, None, None, None), (1, "fine", None, None, None, None, "invalid_utf8"),
                   (2, None, None, None, None, None, None)]


def test_files_without_the_prompt_column_are_marked_and_keep_their_ids(tmp_path):
    """A Parquet or CSV file without the prompt column, beside one with it: its units are marked (the run warns of
    them) and every row is rejected as missing_prompt_column, each with its id when --id-column is given; a .txt
    file beside a file with the named column is read (its lines are the prompts), .txt files alone are refused."""
    pq.write_table(pa.table({"text": ["a", "b"], "id": ["m0", "m1"]}), tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("text,id\na,c0\n")
    (tmp_path / "p.csv").write_text("id,text2\nq0,a red cat\n")
    (tmp_path / "t.txt").write_text("a blue dog\n")
    plan = _plan([tmp_path / "m.parquet", tmp_path / "m.csv", tmp_path / "p.csv", tmp_path / "t.txt"], "text2",
                 id_column="id")
    assert [(u.url.rsplit("/", 1)[-1], u.missing_column) for u in plan.units] == [
        ("m.parquet", True), ("m.csv", True), ("p.csv", False), ("t.txt", False)]
    assert _read_all(plan, "text2", "id") == [(0, None, "m0", "missing_prompt_column"),
                                              (1, None, "m1", "missing_prompt_column"),
                                              (0, None, "c0", "missing_prompt_column"), (0, "a red cat", "q0", None),
                                              (0, "a blue dog", None, None)]
    with pytest.raises(SourceError, match="--prompt-column 'text2': the inputs are .txt files"):
        _plan([tmp_path / "t.txt"], "text2")


def test_csv_with_ragged_records_is_read_record_by_record(tmp_path):
    """A CSV holding records whose fields do not match the header (too many: an unquoted comma; too few) is read
    record by record: those rows are invalid_csv_row with their fields joined as text, the others as pyarrow reads
    them (an empty field null, a quoted "" the empty string, bytes that are not UTF-8 invalid_utf8), in order or
    not."""
    (tmp_path / "rag.csv").write_bytes(b'id,prompt,k\nr0,a cat,x\nr1,a, dog,y\n\nr2,,z\nr3,"q\nline",w\nr4\n'
                                       b'r5,bad \xff,v\nr6,"",u\nr\xff7,ok,t\n')  # a blank line is no record
    plan = _plan([tmp_path / "rag.csv"], id_column="id", keep_columns=("k",), unit_rows=3)
    assert [(u.start, u.stop, u.fmt) for u in plan.units] == [(0, 3, "csv-records"), (3, 6, "csv-records"),
                                                              (6, 8, "csv-records")]
    expect = [(0, "a cat", "r0", "x", None), (1, "r1,a, dog,y", None, None, "invalid_csv_row"),
              (2, None, "r2", "z", None), (3, "q\nline", "r3", "w", None), (4, "r4", None, None, "invalid_csv_row"),
              (5, "bad \\xff", "r5", "v", "invalid_utf8"), (6, "", "r6", "u", None),
              (7, "ok", None, "t", "invalid_utf8")]  # an id that is not UTF-8: no id, the row rejected

    def read(units):
        return [x for u in units for b in sources.read_unit(u, "prompt", "id", ("k",))
                for x in zip(b.rows, b.prompts, b.ids, b.extras["k"], b.errors)]

    sources._STREAMS.clear()
    assert read(plan.units) == expect
    sources._STREAMS.clear()
    assert read([plan.units[1], plan.units[0], plan.units[2]]) == expect[3:6] + expect[:3] + expect[6:]
    sources._STREAMS.clear()
    (tmp_path / "rag2.csv").write_text("id,text\nm0,a,b\nm1,c\n")  # ragged, and without the prompt column
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "p.parquet")
    plan = _plan([tmp_path / "rag2.csv", tmp_path / "p.parquet"], id_column="id")
    assert [(u.fmt, u.missing_column) for u in plan.units] == [("csv-records", True), ("parquet", False)]
    # (a ragged row of a file without the prompt column is missing_prompt_column, as it is when the file is not read
    # at all, without --id-column: the reason does not depend on that option; tests/test_mnew48_mutants.py)
    assert _read_all(plan, "prompt", "id") == [(0, None, None, "missing_prompt_column"),
                                               (1, None, "m1", "missing_prompt_column"), (0, "x", None, None)]


def test_a_csv_ending_inside_a_quoted_field_is_refused_and_a_closed_one_read(tmp_path):
    """The last field holds a line break: closed (its quote after an escaped one too), the file is read; never
    closed, it is refused rather than read as one prompt swallowing the records after the quote."""
    (tmp_path / "ok.csv").write_text('id,prompt\na,"one\ntwo"\nb,"three\n""four"""\n\n')
    plan = _plan([tmp_path / "ok.csv"])
    assert _read_all(plan) == [(0, "one\ntwo", None, None), (1, 'three\n"four"', None, None)]
    (tmp_path / "cut.csv").write_text('id,prompt\na,"one\nb,two\nc,three\n')
    with pytest.raises(SourceError, match=r"cut.csv: cannot read as csv \(ValueError: it ends inside a quoted field "
                                          r"that never closes: its last 3 line\(s\)"):
        _plan([tmp_path / "cut.csv"])
    (tmp_path / "cut2.csv").write_text('id,prompt\na,"one\nb,""two""\n')  # escaped quotes only: still open
    with pytest.raises(SourceError, match="never closes"):
        _plan([tmp_path / "cut2.csv"])
    plan = _plan([tmp_path / "cut.csv", tmp_path / "ok.csv"], skip_bad_files=True)
    assert [f.url for f in plan.files] == [str(tmp_path / "ok.csv")] and plan.skipped[0]["unreadable"] is True


def test_csv_units_read_in_order_share_one_reader(tmp_path, monkeypatch):
    """Seven rows at 6 a unit: the second unit continues the reader the first left (its batch holds row 6)."""
    (tmp_path / "p.csv").write_text("prompt\n" + "".join(f"r{i}\n" for i in range(7)))
    plan = _plan([tmp_path / "p.csv"], unit_rows=6)
    opened, real = [], sources._csv_reader
    monkeypatch.setattr(sources, "_csv_reader", lambda *a, **k: opened.append(1) or real(*a, **k))
    assert _read_all(plan) == [(i, f"r{i}", None, None) for i in range(7)]
    assert len(opened) == 1


def test_compressed_line_units_read_after_a_skipped_unit_get_their_own_rows(tmp_path):
    """A compressed .txt read unit 0 then unit 2 (unit 1 done elsewhere): the stream unit 0 left is at row 2, not
    unit 2's first row, so unit 2 reopens the file rather than reading rows 2-3 under the numbers 4-5."""
    import gzip

    (tmp_path / "p.txt.gz").write_bytes(gzip.compress("".join(f"line {i}\n" for i in range(6)).encode()))
    plan = _plan([tmp_path / "p.txt.gz"], unit_rows=2)
    sources._STREAMS.clear()
    got = [(r, p) for u in (plan.units[0], plan.units[2], plan.units[1]) for b in sources.read_unit(u, "prompt")
           for r, p in zip(b.rows, b.prompts)]
    sources._STREAMS.clear()
    assert got == [(0, "line 0"), (1, "line 1"), (4, "line 4"), (5, "line 5"), (2, "line 2"), (3, "line 3")]


def test_text_prompt_columns_of_every_arrow_text_type(tmp_path):
    """Binary (as Spark writes strings), large_string and dictionary prompt columns are text, decoded as UTF-8."""
    pq.write_table(pa.table({"prompt": pa.array([b"a cat", b"b\xffd"], pa.binary()),
                             "l": pa.array(["x", "y"], pa.large_string()),
                             "d": pa.array(["u", "v"]).dictionary_encode()}), tmp_path / "b.parquet")
    assert _read_all(_plan([tmp_path / "b.parquet"])) == [(0, "a cat", None, None),
                                                          (1, "b\\xffd", None, "invalid_utf8")]
    assert _read_all(_plan([tmp_path / "b.parquet"], "l"), "l") == [(0, "x", None, None), (1, "y", None, None)]
    assert _read_all(_plan([tmp_path / "b.parquet"], "d"), "d") == [(0, "u", None, None), (1, "v", None, None)]


def test_id_and_kept_columns_named_twice_or_nowhere_are_refused(tmp_path):
    """A CSV header naming the id column twice is refused (which is the id?); an id column no input has, too."""
    (tmp_path / "t.csv").write_text("id,prompt,id\na,b,c\n")
    with pytest.raises(SourceError, match=r"t.csv: cannot read as csv \(ValueError: the column name\(s\) 'id' appear "
                                          "more than once in its header\\)"):
        _plan([tmp_path / "t.csv"], id_column="id")
    assert _read_all(_plan([tmp_path / "t.csv"])) == [(0, "b", None, None)]  # without --id-column it is read
    (tmp_path / "k.csv").write_text("k,prompt,k\na,b,c\n")
    with pytest.raises(SourceError, match=r"the column name\(s\) 'k' appear more than once"):
        _plan([tmp_path / "k.csv"], keep_columns=("k",))
    with pytest.raises(SourceError, match="no input has the id column 'uid'; columns found: id, k, prompt. Choose"):
        _plan([tmp_path / "t.csv", tmp_path / "k.csv"], id_column="uid")


def test_json_lines_columns_come_from_the_first_objects_and_a_scan_for_the_named_ones(tmp_path):
    """The columns of a JSON-lines file: every key of its first 100 objects (the first line's after its BOM), and a
    named column (prompt, id, kept) met only later, found by a scan; other later keys are not looked for."""
    lines = ['{"a": 1}', '["c", 3]', '{"prompt": "x", "b": 2}'] + ['{"prompt": "y"}'] * 99 + ['{"id": "i", "late": 1}']
    (tmp_path / "c.jsonl").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    plan = _plan([tmp_path / "c.jsonl"], id_column="id")
    assert plan.columns == {str(tmp_path / "c.jsonl"): ["a", "prompt", "b", "id"]}
    assert _plan([tmp_path / "c.jsonl"]).columns == {str(tmp_path / "c.jsonl"): ["a", "prompt", "b"]}
    assert _plan([tmp_path / "c.jsonl"], keep_columns=("late",)).columns[str(tmp_path / "c.jsonl")][-1] == "late"
    with pytest.raises(SourceError, match=r"no input has the id column 'nope'; columns found: a, b, prompt\. Choose"):
        _plan([tmp_path / "c.jsonl"], id_column="nope")


def test_a_csv_whose_last_column_name_repeats_is_still_refused_when_its_quote_never_closes(tmp_path):
    """Header "k,prompt,k": the row count read the first k (the last one's name is not unique), and the check for a
    quote that never closes looked at that column's last value, so a stray quote in the last column swallowed the
    records after it silently (1 row planned of 3, exit 0). It is refused as with a unique last name; a closed
    quote there is read."""
    (tmp_path / "dq.csv").write_text('k,prompt,k\n1,a,"2\n3,b,4\n5,c,6\n')
    with pytest.raises(SourceError, match=r"dq.csv: cannot read as csv \(ValueError: it ends inside a quoted field "
                                          r"that never closes: its last 3 line\(s\)"):
        _plan([tmp_path / "dq.csv"])
    (tmp_path / "ok.csv").write_text('k,prompt,k\n1,a,"2\nx"\n5,b,\n3,c,"y\nz"\n')
    plan = _plan([tmp_path / "ok.csv"])
    assert plan.file_rows == {str(tmp_path / "ok.csv"): 3}
    assert _read_all(plan) == [(0, "a", None, None), (1, "b", None, None), (2, "c", None, None)]


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl"])
def test_a_damaged_zstd_file_is_a_file_that_cannot_be_read(tmp_path, fmt):
    """Bytes that are not zstd in a .zst input raised zstandard's ZstdError, which is no OSError: the run stopped with
    "error: ZstdError: ..." even with --skip-bad-files, where a damaged .gz or .bz2 is skipped and named."""
    path = tmp_path / f"g.{fmt}.zst"
    path.write_bytes(b"this is not a zstd frame\n" * 4)
    good = tmp_path / "ok.txt"
    good.write_text("a red cat\n")
    msg = (f"{path}: cannot read as {fmt} (OSError: the zstd stream cannot be decompressed (zstd decompressor "
           "error: Unknown frame descriptor))")
    plan = _plan([path, good], skip_bad_files=True)
    assert plan.skipped == [{"path": str(path), "reason": msg, "unreadable": True}]
    assert _read_all(plan) == [(0, "a red cat", None, None)]
    with pytest.raises(SourceError) as err:
        _plan([path])
    assert str(err.value) == msg + " (--skip-bad-files skips such files and goes on)"


def test_json_lines_nested_too_deep_are_invalid_json_rows(tmp_path):
    """A line of 100,000 "[" (or a value nested deeper than Python's json reads) raised RecursionError, which is no
    ValueError: planning stopped the run ("error: RecursionError", --skip-bad-files or not) instead of one
    invalid_json row. Every depth around the limit gives a row: scored with its kept value written as JSON, or
    invalid_json keeping the raw line, never an error."""
    import sys

    deep = "[" * 100_000
    (tmp_path / "d.jsonl").write_text('{"prompt": "a cat", "x": 1}\n' + deep + "\n" + '{"prompt": "b", "x": ' + deep
                                      + "}\n")
    plan = _plan([tmp_path / "d.jsonl"], keep_columns=("x",))
    assert plan.file_rows == {str(tmp_path / "d.jsonl"): 3}
    assert _read_all(plan) == [(0, "a cat", None, None), (1, deep, None, "invalid_json:nested too deep"),
                               (2, '{"prompt": "b", "x": ' + deep + "}", None, "invalid_json:nested too deep")]
    limit = sys.getrecursionlimit()
    kinds = set()
    for depth in range(200, limit + 20, 5):  # json reads it, but writing the kept value back may fail
        value = "[" * depth + "]" * depth
        line = '{"prompt": "b", "x": ' + value + "}"
        (tmp_path / "n.jsonl").write_text(line + "\n")
        plan = _plan([tmp_path / "n.jsonl"], keep_columns=("x",))
        got = [(p, e, x) for u in plan.units for b in sources.read_unit(u, "prompt", None, ("x",))
               for p, e, x in zip(b.prompts, b.errors, b.extras["x"])]
        assert got in ([("b", None, value)], [(line, "invalid_json:nested too deep", None)]), depth
        kinds.add(got[0][1])
    assert kinds == {None, "invalid_json:nested too deep"}


def test_csv_values_are_text_as_written(tmp_path):
    """Every CSV value is text as written: NA, null, NaN and 007 stay so, only an unquoted empty field is null, a
    quoted "" is the empty string, bytes that are not UTF-8 reject their row alone; an id column missing from one
    file gives no ids there (missing_id_column)."""
    (tmp_path / "v.csv").write_bytes(b'id,prompt\n007,NA\nb,null\nc,NaN\nd,\ne,""\nf,bad \xff\n')
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "noid.parquet")
    plan = _plan([tmp_path / "v.csv", tmp_path / "noid.parquet"], id_column="id")
    assert _read_all(plan, id_column="id") == [(0, "NA", "007", None), (1, "null", "b", None), (2, "NaN", "c", None),
                                               (3, None, "d", None), (4, "", "e", None),
                                               (5, "bad \\xff", "f", "invalid_utf8"), (0, "x", None, None)]
    sources._STREAMS.clear()
    ids = [b.ids for b in sources.read_unit(plan.units[1], "prompt", "id")]
    assert ids == [None]  # no ids at all (missing_id_column), not a null id a row (null_id)


def test_kept_values_are_standard_json_and_bad_utf8_is_per_row(tmp_path):
    """Kept values: NaN inside a list is null (strict JSON), a boolean true, a struct an object, a map a list of
    pairs; a string column holding invalid UTF-8 in one row rejects that row alone."""
    lines = [b'{"prompt": "a", "k": [NaN, 1, Infinity]}', b'{"prompt": "b", "k": true}', b'{"prompt": "c", "k": 2}']
    (tmp_path / "k.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    plan = _plan([tmp_path / "k.jsonl"], keep_columns=("k",))
    sources._STREAMS.clear()
    assert [x for u in plan.units for b in sources.read_unit(u, "prompt", None, ("k",)) for x in b.extras["k"]] == [
        "[null, 1, null]", "true", "2"]
    prompts = pa.array([b"ok", b"b\xffd", b"fine"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"prompt": prompts, "s": pa.array([{"a": 1, "b": "x"}, None, {"a": None, "b": "y"}]),
                             "m": pa.array([[("k", 1), ("k", 2)], [], None], pa.map_(pa.string(), pa.int64())),
                             "l": pa.array([[1.5, float("nan")], None, [float("inf")]])}), tmp_path / "k.parquet")
    plan = _plan([tmp_path / "k.parquet"], keep_columns=("s", "m", "l"))
    got = [x for u in plan.units for b in sources.read_unit(u, "prompt", None, ("s", "m", "l"))
           for x in zip(b.prompts, b.errors, b.extras["s"], b.extras["m"], b.extras["l"])]
    assert got == [("ok", None, '{"a": 1, "b": "x"}', '[["k", 1], ["k", 2]]', "[1.5, null]"),
                   ("b\\xffd", "invalid_utf8", None, "[]", None),
                   ("fine", None, '{"a": null, "b": "y"}', None, "[null]")]


def test_line_files_are_read_in_batches_of_8192_rows(tmp_path):
    """A unit's rows come in batches of at most READ_BATCH_ROWS (8192) rows."""
    (tmp_path / "p.txt").write_text("".join(f"p{i}\n" for i in range(8193)))
    plan = _plan([tmp_path / "p.txt"])
    sources._STREAMS.clear()
    assert [len(b.rows) for u in plan.units for b in sources.read_unit(u, "prompt")] == [8192, 1]


def test_error_line_is_the_first_line_of_the_message_cut_at_300_characters():
    assert sources.error_line(ValueError("first\nsecond")) == "ValueError: first"
    assert sources.error_line(OSError("x" * 400)) == "OSError: " + "x" * 300
    assert sources.error_line(EOFError()) == "EOFError: "


def test_discover_takes_existing_names_literally_and_names_an_unsupported_file(tmp_path):
    """A file whose name holds glob characters is read as named (not as a pattern matching in1.txt); a file given
    by name in a format memaudit does not read is refused naming its extension and the formats read."""
    (tmp_path / "in[1].txt").write_text("a red cat\n")
    (tmp_path / "in1.txt").write_text("a blue dog\n")
    files, skipped = sources.discover([str(tmp_path / "in[1].txt")])
    assert (files, skipped) == ([sources.InputFile(str(tmp_path / "in[1].txt"), "txt")], [])
    files, _ = sources.discover([str(tmp_path / "in[0-9].txt")])  # a name that does not exist is a pattern
    assert [f.url for f in files] == [str(tmp_path / "in1.txt")]
    (tmp_path / "notes.md").write_text("# notes\n")
    with pytest.raises(SourceError) as err:
        sources.discover([str(tmp_path / "notes.md")])
    assert str(err.value) == (f"{tmp_path / 'notes.md'}: unsupported file type .md; memaudit reads .csv, .jsonl, "
                              ".ndjson, .parquet, .pq, .txt (the text formats also compressed: .gz, .zst, .bz2)")
    (tmp_path / "x.parquet.gz").write_bytes(b"x")  # Parquet needs random access: not read compressed
    with pytest.raises(SourceError, match=r"x\.parquet\.gz: unsupported file type \.parquet\.gz; memaudit reads"):
        sources.discover([str(tmp_path / "x.parquet.gz")])


def test_a_csv_header_alone_is_empty_and_a_record_longer_than_a_block_is_refused(tmp_path, monkeypatch):
    """A header without a line break holds no rows (pyarrow cannot read it: an empty block); a header and one
    record longer than pyarrow's CSV block (here 1 KiB) is refused, not planned as a header alone (a lost row)."""
    (tmp_path / "h.csv").write_text("id,prompt")
    plan = _plan([tmp_path / "h.csv"])
    assert (plan.file_rows, plan.columns, plan.units) == ({str(tmp_path / "h.csv"): 0},
                                                          {str(tmp_path / "h.csv"): ["id", "prompt"]}, [])
    monkeypatch.setattr(sources, "CSV_BLOCK_BYTES", 1024)
    (tmp_path / "big.csv").write_text("prompt\n" + "x" * 3000 + "\n")
    with pytest.raises(SourceError, match=r"big.csv: cannot read as csv \(ArrowInvalid: straddling object"):
        _plan([tmp_path / "big.csv"])


def test_a_ragged_record_with_bytes_that_are_not_utf8_is_read_record_by_record(tmp_path, capfd):
    """pyarrow cannot hand a ragged row that is not UTF-8 to its handler and fails the count: the file is read
    record by record all the same, that row invalid_csv_row with its bytes escaped, and nothing printed."""
    (tmp_path / "bad.csv").write_bytes(b"id,prompt\nc1,a red car\nc2,bad \xff bytes, with a comma\nc3,a blue dog\n")
    plan = _plan([tmp_path / "bad.csv"])
    assert [u.fmt for u in plan.units] == ["csv-records"]
    assert _read_all(plan) == [(0, "a red car", None, None), (1, "c2,bad \\xff bytes, with a comma", None,
                                                              "invalid_csv_row"), (2, "a blue dog", None, None)]
    assert "Exception ignored" not in capfd.readouterr().err


def test_zstd_inputs_read_every_frame_refuse_a_cut_one_and_units_out_of_order(tmp_path):
    """A .zst of two frames (zstd of concatenated files) is read whole; one cut inside a frame is refused; a unit
    read first, without the stream of the one before, reads forward to its offset (zstd cannot seek)."""
    zstandard = pytest.importorskip("zstandard", reason="zstandard is a dependency (pyproject.toml)")
    c = zstandard.ZstdCompressor()
    two = c.compress("".join(f"line {i}\n" for i in range(3)).encode()) + c.compress(
        "".join(f"line {i}\n" for i in range(3, 7)).encode())
    (tmp_path / "two.txt.zst").write_bytes(two)
    plan = _plan([tmp_path / "two.txt.zst"], unit_rows=3)
    assert [(u.start, u.stop) for u in plan.units] == [(0, 3), (3, 6), (6, 7)]
    sources._STREAMS.clear()
    got = [(r, p) for u in (plan.units[1], plan.units[2], plan.units[0]) for b in sources.read_unit(u, "prompt")
           for r, p in zip(b.rows, b.prompts)]
    sources._STREAMS.clear()
    assert got == [(3, "line 3"), (4, "line 4"), (5, "line 5"), (6, "line 6"), (0, "line 0"), (1, "line 1"),
                   (2, "line 2")]
    (tmp_path / "long.txt.zst").write_bytes(c.compress(b"x" * (1 << 22) + b"\nafter\n"))  # offset 4 MiB + 1: read
    plan = _plan([tmp_path / "long.txt.zst"], unit_rows=1)  # forward in a 4 MiB chunk, then 1 byte
    assert [(u.start, u.byte_offset) for u in plan.units] == [(0, 0), (1, (1 << 22) + 1)]
    sources._STREAMS.clear()
    assert [p for b in sources.read_unit(plan.units[1], "prompt") for p in b.prompts] == ["after"]
    (tmp_path / "cut.txt.zst").write_bytes(two[:-5])
    with pytest.raises(SourceError, match=r"cut.txt.zst: cannot read as txt \(EOFError: the zstd stream ends inside "
                                          r"a frame"):
        _plan([tmp_path / "cut.txt.zst"])


def test_a_glob_reads_a_hidden_folder_it_names_and_skips_one_a_wildcard_matched(tmp_path):
    """``_staging/*.txt`` and ``*/_part/*.txt`` read the folder they name; ``*/a.txt`` does not enter ``_staging``,
    ``_tmp`` or ``.cache``, and lists each folder left out once."""
    for folder in ("_staging", "_tmp", ".cache", "x"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.txt").write_text(f"from {folder}\n")
    files, skipped = sources.discover([str(tmp_path / "_staging" / "*.txt")])
    assert ([f.url for f in files], skipped) == ([str(tmp_path / "_staging" / "a.txt")], [])
    (tmp_path / "x" / "_part").mkdir()
    (tmp_path / "x" / "_part" / "b.txt").write_text("from x/_part\n")
    files, skipped = sources.discover([str(tmp_path / "*" / "_part" / "*.txt")])  # named after a wildcard: read
    assert ([f.url for f in files], skipped) == ([str(tmp_path / "x" / "_part" / "b.txt")], [])
    files, skipped = sources.discover([str(tmp_path / "*" / "a.txt")])
    assert [f.url for f in files] == [str(tmp_path / "x" / "a.txt")]
    assert skipped == [{"path": str(tmp_path / f), "reason": "hidden or marker folder"} for f in (".cache", "_staging",
                                                                                               "_tmp")]


def test_file_version_prefers_the_etag_and_an_unknown_size_is_not_empty(tmp_path, monkeypatch):
    """What identifies a file for resuming: its size and ETag where the store gives one (S3's ETag changes with the
    content, within the same second too), else its modification time; a file whose size cannot be told is not
    taken as zero bytes (it is unreadable, not empty)."""
    import fsspec

    local = fsspec.filesystem("file")

    class Store:
        protocol = "file"

        def info(self, path):
            return {"size": 7, "LastModified": "2026-01-01", "ETag": '"abc"', "mtime": 5.0}

        def size(self, path):
            raise OSError("size unknown")

        def open(self, path, mode="rb", **kw):
            return local.open(path, mode, **kw)

    monkeypatch.setattr(sources, "_fs", lambda url: (Store(), url))
    assert sources.file_version("s3://b/p.parquet") == 'size=7 modified="abc"'
    (tmp_path / "x.parquet").write_bytes(b"")  # zero bytes on disk, but the store cannot say so
    assert sources._is_empty(str(tmp_path / "x.parquet")) is False
    with pytest.raises(SourceError, match=r"x.parquet: cannot read as parquet \(ArrowInvalid"):
        sources.plan_units([sources.InputFile(str(tmp_path / "x.parquet"), "parquet")], "prompt")


def test_csv_records_with_line_breaks_across_pyarrow_blocks(tmp_path, monkeypatch):
    """Quoted line breaks in 40 records read in 64-byte blocks (pyarrow cuts blocks at line breaks unless told that
    values hold them): every record whole, at 7 rows a unit."""
    monkeypatch.setattr(sources, "CSV_BLOCK_BYTES", 64)
    (tmp_path / "nl.csv").write_text("prompt\n" + "".join(f'"line {i}\nsecond {i}"\n' for i in range(40)))
    plan = _plan([tmp_path / "nl.csv"], unit_rows=7)
    assert plan.file_rows == {str(tmp_path / "nl.csv"): 40} and len(plan.units) == 6
    assert _read_all(plan) == [(i, f"line {i}\nsecond {i}", None, None) for i in range(40)]


def test_a_key_of_a_nested_object_is_no_json_lines_column(tmp_path):
    """{"request": {"prompt": ...}} has no prompt column: the byte scan for a named key took the nested one as a
    column, so such a file was not refused ("no input has the prompt column") and every row was rejected as
    missing_prompt_column instead. A top-level key is still found wherever it first appears: after a nested one
    in the same line, after the first 100 lines, across the scan's 4 MiB reads."""
    (tmp_path / "n.jsonl").write_text('{"request": {"prompt": "a red cat"}, "user": "u1"}\n'
                                      '{"request": {"prompt": "a blue dog"}, "user": "u2"}\n')
    with pytest.raises(SourceError, match=r"no input has the prompt column 'prompt'; columns found: request, user\."):
        _plan([tmp_path / "n.jsonl"])
    (tmp_path / "end.jsonl").write_text('{"request": {"prompt": "x"}}\n' * 101 + '{"prompt": "y"}')  # no last break
    assert _plan([tmp_path / "end.jsonl"]).columns == {str(tmp_path / "end.jsonl"): ["request", "prompt"]}
    (tmp_path / "both.jsonl").write_text('{"request": {"prompt": "x"}, "prompt": "a red cat"}\n')
    assert _plan([tmp_path / "both.jsonl"]).columns == {str(tmp_path / "both.jsonl"): ["request", "prompt"]}
    filler = '{"a": "' + "x" * 1000 + '"}\n'
    head = filler * ((1 << 22) // len(filler))
    pad = (1 << 22) - len(head) - 5  # the key line starts 5 bytes before the first read's end: "prompt" spans it
    text = head + '{"a": "' + "y" * (pad - 10) + '"}\n' + '{"prompt": "late"}\n{"request": {"prompt": 1}}\n'
    assert text.index('{"prompt"') == (1 << 22) - 5
    (tmp_path / "late.jsonl").write_text(text)
    plan = _plan([tmp_path / "late.jsonl"])
    assert plan.columns == {str(tmp_path / "late.jsonl"): ["a", "prompt"]}
    assert _read_all(plan)[-2:] == [(plan.total_rows - 2, "late", None, None),
                                    (plan.total_rows - 1, None, None, "missing_prompt_column")]


def test_a_folder_that_was_a_runs_out_reads_the_users_files_and_names_only_the_run(tmp_path):
    """An input folder once given as --out: the user's a.txt is read; the run's tables, its run.json and the lock
    it held are not, said once for the folder (the lock is not listed as a hidden file of the user's)."""
    (tmp_path / "a.txt").write_text("a red cat\n")
    (tmp_path / "run.json").write_text('{"schema_version": 1, "model_fingerprint": "x", "score_config": {}}')
    pq.write_table(pa.table({"prompt": ["scored before"]}), tmp_path / "risk.parquet")
    (tmp_path / sources.LOCK_NAME).write_text("")
    assert sources.discover([str(tmp_path)]) == (
        [sources.InputFile(str(tmp_path / "a.txt"), "txt")],
        [{"path": str(tmp_path), "reason": "a memaudit output folder: its risk.parquet skipped, its other files read"}])


def test_txt_inputs_with_a_prompt_column_are_refused_beside_files_with_no_columns(tmp_path):
    """.txt files and a zero-byte .parquet (or an empty .jsonl) with --prompt-column text: no input has columns, so
    the option is refused as for .txt files alone (the empty file let the .txt lines be scored as 'text')."""
    (tmp_path / "a.txt").write_text("a red cat\n")
    (tmp_path / "z.parquet").write_bytes(b"")
    (tmp_path / "e.jsonl").write_text("")
    for other in ("z.parquet", "e.jsonl"):
        with pytest.raises(SourceError, match="--prompt-column 'text': the inputs are .txt files, one prompt a line"):
            _plan([tmp_path / "a.txt", tmp_path / other], "text")
    (tmp_path / "t.csv").write_text("text\nfrom csv\n")  # a file with the column: the .txt lines are read (warned)
    plan = _plan([tmp_path / "a.txt", tmp_path / "z.parquet", tmp_path / "t.csv"], "text")
    assert _read_all(plan, "text") == [(0, "a red cat", None, None), (0, "from csv", None, None)]
