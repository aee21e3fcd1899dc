"""Findings of the new-user trial 'usmall' (session 46): a nightly audit of a text-to-image service's prompt logs
landing as many small hive-partitioned files (one to a few prompts each), scored in groups of small units."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from audit.config import RunConfig


def _execute(inputs, model, out, **kw):
    """``execute`` a run; returns ``(manifest, the lines it logged)``."""
    from audit.runner import execute

    lines: list[str] = []
    cfg = RunConfig(inputs=tuple(str(i) for i in inputs), model=str(model), out=str(out), device="cpu",
                    max_error_fraction=1.0, **kw)
    return execute(cfg, progress=False, log=lines.append)[1], lines


def test_a_one_row_file_holding_an_empty_prompt_is_not_named_as_an_emptied_column(tmp_path, tiny_model_dir):
    """A service that logs each request to a file of its own writes a user's empty prompt as a file of one blank
    row. Every such file was named in the warning meant for a writer that stopped filling the column ('3 of 6 input
    files have no text in column 'prompt' on any row ... a renamed or emptied column?'), every night, for ordinary
    empty prompts. Now a one-row file is not named (its row is still an empty_prompt or null_prompt reject); a
    file of several rows, all blank, still is."""
    day = tmp_path / "logs" / "dt=2026-12-01" / "hour=00"
    day.mkdir(parents=True)
    for i, prompt in enumerate(["a red cat on a beach", "a blue dog in a city", "an old tower at sunset"]):
        (day / f"part-{i}.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    (day / "part-3.jsonl").write_text(json.dumps({"prompt": ""}) + "\n")  # a user's empty prompt
    (day / "part-4.jsonl").write_text(json.dumps({"prompt": None}) + "\n")
    pq.write_table(pa.table({"prompt": pa.array([None, None, None], pa.string())}), day / "part-5.parquet")
    (day / "part-6.jsonl").write_text(json.dumps({"prompt": ""}) + "\n" + json.dumps({"prompt": " "}) + "\n")

    manifest, lines = _execute([tmp_path / "logs"], tiny_model_dir, tmp_path / "out")
    c = manifest["counts"]
    assert (c["rows_read"], c["scored"], c["rejected"]) == (10, 3, 7)
    assert c["rejected_by_reason"] == {"empty_prompt": 3, "null_prompt": 4}
    assert [line for line in lines if "no text in column" in line] == [
        "memaudit: warning: 2 of 7 input files have no text in column 'prompt' on any row (5 rows rejected as "
        "null_prompt or empty_prompt), where the other files have prompts: a renamed or emptied column? the first: "
        f"{day / 'part-5.parquet'}"]

    (day / "part-5.parquet").unlink()  # only the one-row blank files left: no warning at all
    (day / "part-6.jsonl").unlink()
    manifest, lines = _execute([tmp_path / "logs"], tiny_model_dir, tmp_path / "out2")
    assert manifest["counts"]["rejected_by_reason"] == {"empty_prompt": 1, "null_prompt": 1}
    assert not [line for line in lines if "no text in column" in line]


def _one_prompt_files(folder, names_and_prompts):
    """JSON-lines files of one prompt each under ``folder``; a name may be bytes (not UTF-8)."""
    import os

    folder.mkdir(parents=True)
    for name, prompt in names_and_prompts:
        name = os.fsdecode(name) if isinstance(name, bytes) else name  # b"\xff" -> "\udcff", as listings read it
        (folder / name).write_text(json.dumps({"prompt": prompt}) + "\n")
    return folder


def test_a_file_whose_name_is_not_utf8_is_refused_at_planning_naming_it(tmp_path, tiny_model_dir):
    """A log file named in Latin-1 (``part-1\\xff.jsonl`` on Linux) was planned and read with the small files of its
    group; writing its shard's source column then failed, so the whole group failed three times: 'units 0-2 (3 units
    scored together, .../part-0.jsonl rows 0-1 to .../part-2.jsonl rows 0-1) failed 3 times, last with
    UnicodeEncodeError ...; rerun the same command to resume', a message that named other files and a rerun that
    failed the same way, every unit of the group lost. Now planning refuses the file in one line naming it (its
    bytes escaped), before any model loads; --skip-bad-files skips it, listed in the manifest, and the run goes on."""
    import pytest

    from audit.errors import SourceError

    day = _one_prompt_files(tmp_path / "logs" / "dt=2026-12-01", [
        ("part-0.jsonl", "a red cat on a beach"), (b"part-1\xff.jsonl", "a blue dog"),
        ("part-2.jsonl", "an old tower at sunset")])
    shown = f"{day}/part-1\\xff.jsonl"
    why = ("its name is not UTF-8 (bytes the file system keeps, which the outputs' source column and prompt ids, "
           "text, cannot hold); rename it, e.g. convmv -f latin1 -t utf8 --notest")
    with pytest.raises(SourceError) as err:
        _execute([tmp_path / "logs"], tiny_model_dir, tmp_path / "out")
    assert str(err.value) == f"{shown}: {why} (--skip-bad-files skips such files and goes on)"
    assert not (tmp_path / "out").exists()  # refused before the run folder is made

    manifest, _ = _execute([tmp_path / "logs"], tiny_model_dir, tmp_path / "skip", skip_bad_files=True)
    c = manifest["counts"]
    assert (c["rows_read"], c["scored"], c["rejected"]) == (2, 2, 0)
    assert [f["path"] for f in manifest["files"]] == [str(day / "part-0.jsonl"), str(day / "part-2.jsonl")]
    assert manifest["skipped_files"] == [{"path": shown, "reason": f"{shown}: {why}", "unreadable": True}]


def test_a_skipped_file_whose_name_is_not_utf8_leaves_a_report_that_can_be_written(tmp_path, tiny_model_dir):
    """A file skipped by its extension (``notes\\xff.bak``) was listed in the manifest with its raw name; the run
    exited 0, then ``memaudit report RUN --format md`` (and html), as nightly.sh runs it, failed: 'UnicodeEncodeError:
    'utf-8' codec can't encode character '\\udcff' ... surrogates not allowed' (exit 1). Its name is now recorded with
    the bytes escaped, and both reports are written, naming it."""
    from audit.report import md_escape, write_report

    day = _one_prompt_files(tmp_path / "logs", [("part-0.jsonl", "a red cat on a beach"),
                                                (b"notes\xff.bak", "not a prompt file")])
    manifest, _ = _execute([tmp_path / "logs"], tiny_model_dir, tmp_path / "out")
    assert manifest["counts"]["scored"] == 1
    assert manifest["skipped_files"] == [{"path": f"{day}/notes\\xff.bak", "reason": "unsupported extension .bak"}]
    md = write_report(tmp_path / "out", "md").read_text()
    shown = f"{day}/notes\\xff.bak"
    assert f"| {md_escape(shown)} | unsupported extension .bak |" in md
    html = write_report(tmp_path / "out", "html").read_text()
    assert shown in html


def test_the_source_breakdown_is_titled_with_the_folder_of_every_file_not_of_the_files_shown(tmp_path,
                                                                                               tiny_model_dir):
    """1,500 log files in 24 hour folders: the terminal report lists the first 50 files by name, all in hour=00/,
    and titled the table 'By source file under .../hour=00/', above '... 1450 more groups' from the other hours: a
    title that said every file was in hour=00/. The title names the folder common to all the run's files now (the
    day's), and the files are shown under it with their hour folder."""
    from rich.console import Console

    from audit.report import build_report, render_terminal

    day = tmp_path / "logs" / "dt=2026-12-01"
    for hour, files in (("00", 52), ("01", 3)):
        folder = day / f"hour={hour}"
        folder.mkdir(parents=True)
        for i in range(files):
            (folder / f"part-{i:03d}.jsonl").write_text(json.dumps({"prompt": f"a red cat number {hour}-{i}"}) + "\n")
    _execute([tmp_path / "logs"], tiny_model_dir, tmp_path / "out")
    r = build_report(tmp_path / "out")
    console = Console(record=True, width=250, color_system=None)
    render_terminal(r, console=console)
    text = "".join(console.export_text().split())  # the title wraps at the table's width
    assert f"Bysourcefileunder{day}/(risk:mean,p95,max)" in text
    assert "hour=00/part-000.jsonl" in text and "...5moregroups" in text
    assert f"under{day}/hour=00/" not in text
    assert r.source_folder == f"{day}/"
