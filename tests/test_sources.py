"""The CSV reader streams: a unit continues where the previous unit of the file ended, with the same rows
as a fresh read, and a unit read out of order (a retry, another worker) still gets its own rows."""

from __future__ import annotations

from audit import sources


def _rows(plan, fresh: bool):
    out = []
    for unit in plan.units:
        if fresh:
            sources._STREAMS.clear()
        for b in sources.read_unit(unit, "prompt", "id", ("user",)):
            out += list(zip(b.rows, b.prompts, b.ids, b.extras["user"], b.errors))
    return out


def test_csv_units_stream_with_the_rows_of_a_fresh_read(tmp_path, monkeypatch):
    path = tmp_path / "p.csv"
    lines = ["id,prompt,user"] + [f'p{i},"a cat, {i}",u{i}' if i % 7 else f'p{i},"two\nlines {i}",u{i}'
                                  for i in range(5000)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(sources, "READ_BATCH_ROWS", 64)
    files, _ = sources.discover([str(path)])
    plan = sources.plan_units(files, "prompt", unit_rows=700)
    assert len(plan.units) == 8
    opened = []
    real = sources._csv_reader
    monkeypatch.setattr(sources, "_csv_reader", lambda *a, **k: opened.append(1) or real(*a, **k))
    sources._STREAMS.clear()
    streamed = _rows(plan, fresh=False)
    assert len(opened) == 1  # one reader for all eight units: the file is read once
    assert streamed == _rows(plan, fresh=True) and [r[0] for r in streamed] == list(range(5000))
    assert streamed[7][1] == "two\nlines 7" and streamed[8][1] == "a cat, 8"
    sources._STREAMS.clear()
    back = [b.rows[0] for u in (plan.units[3], plan.units[1]) for b in sources.read_unit(u, "prompt")]
    assert back[0] == plan.units[3].start and plan.units[1].start in back  # out of order: reopened, right rows


def test_compressed_line_files_are_decompressed_once_when_read_in_order(tmp_path, monkeypatch):
    """A compressed .txt or .jsonl file cannot seek: each unit decompressed the file from byte 0 up to its rows,
    so reading every unit cost quadratic time in the file. Units read in order now continue one stream, with the
    rows of a fresh read; a unit read out of order, or the same one again, still gets its own rows."""
    import gzip
    import json

    monkeypatch.setattr(sources, "READ_BATCH_ROWS", 64)
    for name, text in (("p.txt.gz", "".join(f"prompt {i}\n" for i in range(3000))),
                       ("p.jsonl.gz", "".join(json.dumps({"prompt": f"prompt {i}", "id": f"p{i}", "user": f"u{i}"})
                                              + "\n" for i in range(3000)))):
        path = tmp_path / name
        path.write_bytes(gzip.compress(("\ufeff" + text).encode()))  # a leading BOM too
        files, _ = sources.discover([str(path)])
        plan = sources.plan_units(files, "prompt", unit_rows=400)
        assert len(plan.units) == 8
        opened = []
        real = sources._open
        monkeypatch.setattr(sources, "_open", lambda url: opened.append(url) or real(url))
        sources._STREAMS.clear()
        streamed = [(r, p) for u in plan.units for b in sources.read_unit(u, "prompt") for r, p in zip(b.rows, b.prompts)]
        assert len(opened) == 1, name  # one decompressing stream for the eight units
        assert streamed == [(i, f"prompt {i}") for i in range(3000)]
        sources._STREAMS.clear()
        fresh = [(r, p) for u in plan.units if not sources._STREAMS.clear()
                 for b in sources.read_unit(u, "prompt") for r, p in zip(b.rows, b.prompts)]
        assert fresh == streamed
        again = [b.rows[0] for u in (plan.units[5], plan.units[2], plan.units[2]) for b in sources.read_unit(u, "prompt")]
        assert again[0] == 2000 and 800 in again and again.count(800) == 2  # out of order: reopened, right rows
        monkeypatch.setattr(sources, "_open", real)


def test_folder_inputs_follow_links_and_skip_hidden_folders(tmp_path):
    """A linked folder is read (once, even when a link points back up the tree); ``.*`` and ``_*`` folders
    are not entered and are named among the skipped, on a local disk and on an fsspec URL alike."""
    import fsspec

    root, real = tmp_path / "in", tmp_path / "real"
    for folder in (root / "sub", root / ".cache", root / "_temporary", real):
        folder.mkdir(parents=True)
    for f in (real / "x.csv", root / "a.csv", root / ".cache" / "h.csv", root / "_temporary" / "t.csv"):
        f.write_text("prompt\nq\n")
    (root / "linked").symlink_to(real, target_is_directory=True)
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # a cycle
    files, skipped = sources.discover([str(root)])
    assert [f.url for f in files] == [f"{root}/a.csv", f"{root}/linked/x.csv"]
    assert sorted((s["path"], s["reason"]) for s in skipped) == [
        (f"{root}/.cache", "hidden or marker folder"), (f"{root}/_temporary", "hidden or marker folder"),
        (f"{root}/sub/up", "a link to a folder already read")]

    fs = fsspec.filesystem("memory")
    for p in ("/t/a.csv", "/t/.h/b.csv", "/t/.h/c/d.csv", "/t/x/_t/e.csv", "/t/x/f.csv"):
        fs.pipe(p, b"prompt\nq\n")
    try:
        files, skipped = sources.discover(["memory://t"])
    finally:
        fs.rm("/t", recursive=True)
    assert [f.url for f in files] == ["memory:///t/a.csv", "memory:///t/x/f.csv"]
    assert [s["path"] for s in skipped] == ["memory:///t/.h", "memory:///t/x/_t"]


def test_file_urls_are_percent_decoded_as_rfc_8089_writes_them(tmp_path):
    """pathlib's as_uri() percent-encodes ("with space" is "with%20space"): such a URL was "no such file"; a file
    whose name really holds "%20" is still taken as named."""
    folder = tmp_path / "sp ace dir"
    folder.mkdir()
    (folder / "with space.txt").write_text("a red cat\n")
    (folder / "lit%20eral.txt").write_text("a blue dog\n")
    files, _ = sources.discover([(folder / "with space.txt").as_uri(), f"file://{folder}/lit%20eral.txt"])
    assert [f.url for f in files] == [str(folder / "with space.txt"), str(folder / "lit%20eral.txt")]


def test_a_link_to_nothing_is_named_as_such(tmp_path):
    import pytest

    from audit.errors import SourceError

    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    for name, target in (("loop.txt", "loop.txt"), ("gone.txt", "nowhere.txt")):
        with pytest.raises(SourceError, match=f"{name}: a link whose target does not exist .*{target}"):
            sources.discover([str(tmp_path / name)])


def test_chained_fsspec_urls_are_refused_in_one_line(tmp_path):
    """zip://member::archive.zip lost its archive when files were found (exit 1 naming the working folder), and
    simplecache::URL silently lost its cache: a chain is refused, naming the input."""
    import zipfile

    import pytest

    from audit.errors import SourceError

    with zipfile.ZipFile(tmp_path / "logs.zip", "w") as z:
        z.writestr("x/a.txt", "a red cat\n")
    for url in (f"zip://x/a.txt::{tmp_path / 'logs.zip'}", f"simplecache::file://{tmp_path / 'logs.zip'}"):
        with pytest.raises(SourceError, match="chained fsspec URLs .* are not supported"):
            sources.discover([url])
    odd = tmp_path / "a::b.txt"  # a local file whose name holds '::' is still a file
    odd.write_text("a blue dog\n")
    files, _ = sources.discover([str(odd)])
    assert [f.url for f in files] == [str(odd)]
