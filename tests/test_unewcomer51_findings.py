"""Findings of the session-51 new-user trial (a newcomer following README.md, then bad inputs to each command)."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from audit.cli import app


@pytest.mark.parametrize("blank", ["", " ", "\t"])
def test_an_empty_input_is_refused_not_read_as_the_working_folder(tmp_path, monkeypatch, blank):
    """``memaudit run "$LOGS"`` with LOGS unset passed '' as the input, which fsspec reads as the working folder:
    the dry run planned (and the run scored) every prompt file under it, exit 0. A blank name (' ') was said as
    ': no such file or folder', the name invisible. Both are refused in one line naming the value, exit 2."""
    (tmp_path / "notes.txt").write_text("a red cat\na blue dog\n")  # a prompt file the run must not pick up
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", blank, "--out", str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert f"memaudit: error: an input is empty ({blank!r}): give a file, folder, glob or URL" in result.output
    assert "notes.txt" not in result.output and "1 file" not in result.output
    assert not (tmp_path / "out").exists()


def test_an_empty_input_beside_real_ones_is_refused_and_dot_still_names_the_working_folder(tmp_path, monkeypatch):
    """'' among other inputs is refused too (a config's ``inputs = ["logs/", ""]``); '.' still reads the working
    folder, as a user who means it writes it."""
    from audit.errors import SourceError
    from audit.sources import discover

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.txt").write_text("a red cat\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match=r"an input is empty \(''\)"):
        discover(["logs/", ""])
    files, _ = discover(["."])
    assert [f.url for f in files] == [str(tmp_path / "logs" / "a.txt")]


def test_the_columns_found_list_is_bounded_for_a_binary_file_named_csv_and_a_wide_header(tmp_path):
    """A 2 MB binary file named .csv without a line break is read as a header of 2 MB: the "no input has the prompt
    column" refusal printed every column, a 7 MB "one-line" error. A CSV of 3,000 columns listed them all. Now at most
    50 names, each cut at 80 characters with its length, then how many more."""
    import random

    rng = random.Random(0)
    blob = bytes(rng.randrange(256) for _ in range(2_000_000)).replace(b"\n", b"x").replace(b"\r", b"x")
    (tmp_path / "img.csv").write_bytes(b"\x01" + blob)  # (no signature of a format memaudit names)
    result = CliRunner().invoke(app, ["run", str(tmp_path / "img.csv"), "--out", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 2, result.output[:2000]
    assert result.output.startswith("memaudit: error: no input has the prompt column 'prompt'; columns found: ")
    assert len(result.output) < 20_000 and "characters)" in result.output

    (tmp_path / "wide.csv").write_text(",".join(f"c{i:04d}" for i in range(3000)) + "\n"
                                       + ",".join("x" for _ in range(3000)) + "\n")
    result = CliRunner().invoke(app, ["run", str(tmp_path / "wide.csv"), "--out", str(tmp_path / "o"),
                                      "--prompt-column", "c0001", "--id-column", "nope", "--dry-run"])
    assert result.exit_code == 2, result.output[:2000]
    shown = ", ".join(f"c{i:04d}" for i in range(50))
    assert (f"no input has the id column 'nope'; columns found: {shown} and 2,950 more. Choose one with --id-column"
            in result.output)


def test_a_short_columns_found_list_is_written_whole():
    from audit.sources import _columns_found

    assert _columns_found([]) == "(none)"
    assert _columns_found(["id", "text"]) == "id, text"
    assert _columns_found(["a" * 80, "b" * 81]) == "a" * 80 + ", " + "b" * 80 + "... (81 characters)"


def test_the_missing_id_column_warning_says_a_json_line_keeps_an_earlier_reason(tmp_path):
    """A CSV with the --id-column beside a JSON-lines file without it: the warning said its 5 rows "are rejected as
    missing_id_column" where the run's counts beside it said 3 (a line that is no JSON object is invalid_json, a
    prompt that is a number prompt_not_string). Now it names those reasons for JSON lines; a CSV's note is as before."""
    from audit.runner import missing_id_column_note
    from audit.sources import discover, plan_units

    (tmp_path / "a.csv").write_text("id,prompt\n1,a red cat\n")
    (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n[1, 2]\nnot json\n{"prompt": 5}\n{"prompt": "y"}\n')
    (tmp_path / "c.csv").write_text("prompt\na blue dog\nan owl\n")
    files, _ = discover([str(tmp_path / "a.csv"), str(tmp_path / "b.jsonl")])
    note = missing_id_column_note(plan_units(files, "prompt", id_column="id"), "id")
    assert note == (f"1 of 2 input files has no column 'id', so its 5 rows are rejected as missing_id_column (or as "
                    "invalid_json, invalid_utf8 or prompt_not_string, a JSON line that is that first); the first: "
                    f"{tmp_path / 'b.jsonl'} (columns: prompt)")
    files, _ = discover([str(tmp_path / "a.csv"), str(tmp_path / "c.csv")])
    note = missing_id_column_note(plan_units(files, "prompt", id_column="id"), "id")
    assert note == (f"1 of 2 input files has no column 'id', so its 2 rows are rejected as missing_id_column; the "
                    f"first: {tmp_path / 'c.csv'} (columns: prompt)")
