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
