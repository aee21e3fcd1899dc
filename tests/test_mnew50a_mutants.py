"""audit.sources and audit.text where hand-applied mutants survived (mutation review mnew50a): which reason a row
gets when several apply, row counts and ids, checked with exact rows, ids and reasons."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from audit import sources


def _read(root, prompt_column="prompt", id_column=None, keep_columns=(), **kw):
    """``{file name: [(row, prompt, id, error)]}`` of every unit planned over ``root``, read in order."""
    files, _ = sources.discover([str(root)])
    plan = sources.plan_units(files, prompt_column, id_column=id_column, keep_columns=keep_columns, **kw)
    sources._STREAMS.clear()
    out: dict[str, list] = {}
    for unit in plan.units:
        for b in sources.read_unit(unit, prompt_column, id_column, keep_columns):
            ids = b.ids if b.ids is not None else [None] * len(b.rows)
            out.setdefault(unit.url.rsplit("/", 1)[-1], []).extend(zip(b.rows, b.prompts, ids, b.errors))
    sources._STREAMS.clear()
    return out


def test_a_row_with_a_prompt_reason_keeps_it_when_its_id_is_not_utf8(tmp_path):
    """--id-column rid over files whose rid holds bytes that are not UTF-8 in some rows. A Parquet or CSV file
    without the prompt column rejected those rows as invalid_utf8 and its others as missing_prompt_column (a JSON
    line, a CSV read record by record, and the same file read without --id-column: missing_prompt_column in every
    row, as the run's warning counts them); a Parquet row whose prompt is a number was invalid_utf8, where the JSON
    line is prompt_not_string. The prompt's reason comes first now; a null prompt with such an id stays
    invalid_utf8 (as a JSON line's)."""
    pq.write_table(pa.table({"caption": ["a", "b", "c"], "rid": pa.array([b"r1", b"\xff", b"r3"], pa.binary())}),
                   tmp_path / "a.parquet")
    pq.write_table(pa.table({"prompt": pa.array([5, None, 6]), "rid": pa.array([b"\xff", b"\xfe", b"r9"],
                                                                                 pa.binary())}), tmp_path / "b.parquet")
    (tmp_path / "c.csv").write_bytes(b"caption,rid\na,r1\nb,\xff\n")
    (tmp_path / "d.jsonl").write_text('{"caption": "a", "rid": "\\udc00"}\n{"prompt": 5, "rid": "\\udc00"}\n'
                                      '{"prompt": "fine", "rid": "ok"}\n')
    got = _read(tmp_path, id_column="rid")
    assert got["a.parquet"] == [(0, None, "r1", "missing_prompt_column"), (1, None, None, "missing_prompt_column"),
                                (2, None, "r3", "missing_prompt_column")]
    assert got["b.parquet"] == [(0, None, None, "prompt_not_string:int64"), (1, None, None, "invalid_utf8"),
                                (2, None, "r9", "prompt_not_string:int64")]
    assert got["c.csv"] == [(0, None, "r1", "missing_prompt_column"), (1, None, None, "missing_prompt_column")]
    assert [(r, e) for r, _, _, e in got["d.jsonl"]] == [(0, "missing_prompt_column"), (1, "prompt_not_string:int"),
                                                         (2, None)]


def test_code_points_escapes_control_characters_and_both_ends_of_the_bmp():
    """code_points writes every character beyond printable ASCII as an escape: a tab, an escape character and DEL
    too (kept raw, a column name's escape sequence reached the terminal in the near-name note, and a tab did not
    show); U+FFFF as \\uffff and U+10000 as \\U00010000; with printf, backslash, % and ' as bash's printf types them."""
    from audit.text import code_points

    assert code_points("a\tb\x1b[2J\x7f ~") == "a\\u0009b\\u001b[2J\\u007f ~"
    assert code_points("\uffff\U00010000\u00e9") == "\\uffff\\U00010000\\u00e9"
    assert code_points("50% it's a\\b\t", printf=True) == "50%% it'\\''s a\\\\b\\u0009"
    assert code_points("50% it's", printf=False) == "50% it's"


def test_a_csv_with_carriage_return_line_breaks_ending_inside_a_quote_is_refused(tmp_path):
    """A CSV with old-Mac line breaks (a lone CR) whose quote never closes: its 3 records after the quote are the
    text of one field, a field holding CRs and no LF. It is refused, naming the 3 lines (a check looking for LF only
    read the file as 1 invalid_csv_row, its 3 prompts lost); a closed quoted field holding a CR reads 2 rows."""
    import pytest

    from audit.errors import SourceError

    (tmp_path / "cr.csv").write_bytes(b'prompt,id\r"a cat,1\rb dog,2\rc hen,3\r')
    with pytest.raises(SourceError, match=r"cr\.csv: cannot read as csv \(ValueError: it ends inside a quoted field "
                                          r"that never closes: its last 3 line\(s\)"):
        _read(tmp_path / "cr.csv")
    (tmp_path / "cr.csv").write_bytes(b'prompt,id\r"a\rcat",1\rb dog,2\r')
    assert _read(tmp_path / "cr.csv") == {"cr.csv": [(0, "a\rcat", None, None), (1, "b dog", None, None)]}


def test_a_file_without_the_prompt_column_is_read_for_its_kept_columns(tmp_path):
    """--keep-columns app over a Parquet and a CSV file without the prompt column: their rows are all
    missing_prompt_column, each with its own 'app' value for the rejects table (not read, the unit's rows would keep
    none: a rejected row's context lost); with neither --keep-columns nor --id-column nothing is read, and every row
    is still counted."""
    pq.write_table(pa.table({"text": ["a", "b", "c"], "app": ["web", None, "ios"]}), tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("text,app\na,android\nb,\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red cat", "app": "web"}\n')
    files, _ = sources.discover([str(tmp_path)])
    plan = sources.plan_units(files, "prompt", keep_columns=("app",))
    got = {u.url.rsplit("/", 1)[-1]: [(r, e, a) for b in sources.read_unit(u, "prompt", None, ("app",))
                                      for r, e, a in zip(b.rows, b.errors, b.extras["app"])] for u in plan.units}
    assert got == {"m.parquet": [(0, "missing_prompt_column", "web"), (1, "missing_prompt_column", None),
                                 (2, "missing_prompt_column", "ios")],
                   "m.csv": [(0, "missing_prompt_column", "android"), (1, "missing_prompt_column", None)],
                   "p.jsonl": [(0, None, "web")]}
    bare = {u.url.rsplit("/", 1)[-1]: [(r, e) for b in sources.read_unit(u, "prompt") for r, e in zip(b.rows, b.errors)]
            for u in sources.plan_units(files, "prompt").units}
    assert bare == {"m.parquet": [(0, "missing_prompt_column"), (1, "missing_prompt_column"),
                                  (2, "missing_prompt_column")],
                    "m.csv": [(0, "missing_prompt_column"), (1, "missing_prompt_column")], "p.jsonl": [(0, None)]}


def test_a_nan_or_infinite_kept_value_is_null_in_parquet_and_json_lines(tmp_path):
    """A kept float column holding NaN or an infinity: Parquet gave 'nan' and 'inf' (float32 '-inf'), a JSON line
    'NaN' and 'Infinity', so one value kept two texts by input format (a report's --by groups split) while the same
    value inside a list or struct, and as an id, is null. It is null now in both; finite values keep their text
    (a float32 0.1 as '0.1', a float64 2.5 as '2.5')."""
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "s": pa.array([float("nan"), float("inf"), 2.5]),
                             "s32": pa.array([float("nan"), float("-inf"), 0.1], pa.float32())}),
                   tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"prompt": "a", "s": NaN, "s32": -Infinity}\n'
                                      '{"prompt": "b", "s": Infinity, "s32": 0.1}\n{"prompt": "c", "s": 2.5}\n')
    files, _ = sources.discover([str(tmp_path)])
    plan = sources.plan_units(files, "prompt", keep_columns=("s", "s32"))
    got = {u.url.rsplit("/", 1)[-1]: [(b.extras["s"], b.extras["s32"], b.errors)
                                      for b in sources.read_unit(u, "prompt", None, ("s", "s32"))] for u in plan.units}
    assert got == {"a.parquet": [([None, None, "2.5"], [None, None, "0.1"], [None, None, None])],
                   "b.jsonl": [([None, None, "2.5"], [None, "0.1", None], [None, None, None])]}


def test_a_file_named_through_a_link_and_its_real_path_is_read_once(tmp_path):
    """Inputs 'real/' and 'alias/' (a link to real/), and the file through each: one file, its 2 rows planned once,
    named as first given; a mutant keying files by their spelling read its rows twice (4 rows, each prompt twice)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "p.txt").write_text("a red cat\na blue dog\n")
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    for inputs in ([tmp_path / "real", tmp_path / "alias"], [tmp_path / "alias" / "p.txt", tmp_path / "real"]):
        files, _ = sources.discover([str(p) for p in inputs])
        assert [f.url for f in files] == [str(inputs[0] / "p.txt" if inputs[0].is_dir() else inputs[0])]
        plan = sources.plan_units(files, "prompt")
        assert (plan.total_rows, [(u.start, u.stop) for u in plan.units]) == (2, [(0, 2)])


def test_blank_json_lines_keep_the_ids_and_kept_values_of_the_lines_after_them_in_place(tmp_path):
    """Blank lines between JSON lines, read with --id-column and --keep-columns: each blank line is an empty_prompt
    row with no id and no kept value, and every other line keeps its own id and value (a blank line that added no
    id or kept value shifted the later lines' ones onto the wrong rows, or dropped the last)."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red cat", "id": "r0", "app": "web"}\n\n'
                                      '{"prompt": "a blue dog", "id": "r2", "app": "ios"}\n \n'
                                      '{"prompt": "a green frog", "id": "r4", "app": "cli"}\n')
    files, _ = sources.discover([str(tmp_path / "p.jsonl")])
    plan = sources.plan_units(files, "prompt", id_column="id", keep_columns=("app",))
    got = [(r, p, i, e, a) for u in plan.units for b in sources.read_unit(u, "prompt", "id", ("app",))
           for r, p, i, e, a in zip(b.rows, b.prompts, b.ids, b.errors, b.extras["app"], strict=True)]
    assert got == [(0, "a red cat", "r0", None, "web"), (1, "", None, "empty_prompt", None),
                   (2, "a blue dog", "r2", None, "ios"), (3, " ", None, "empty_prompt", None),
                   (4, "a green frog", "r4", None, "cli")]


def test_prompts_of_mongolian_variation_selectors_alone_show_nothing():
    """The Mongolian free variation selectors (U+180B-180D, U+180F) select a letter's form and draw nothing alone,
    as the variation selectors U+FE00-FE0F: a prompt of only them (and spaces) was scored as a prompt; it is blank
    (an empty_prompt reject) now, and a Mongolian word holding one is not."""
    from audit.sources import holds_value, is_blank

    for blank in ("\u180b", "\u180c \u180d", "\u180f\u180e", "\ufe0f\u180b"):
        assert is_blank(blank) and not holds_value(blank), ascii(blank)
    assert not is_blank("\u182e\u180b\u1823") and not is_blank("\u1820")
