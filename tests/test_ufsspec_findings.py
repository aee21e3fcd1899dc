"""Findings of a data-platform engineer auditing partitioned prompt logs from object storage through fsspec URLs
(presigned https URLs, hive partitions, Spark folders, compressed text): each test fails on the code before its fix."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from fsspec.implementations.memory import MemoryFileSystem

from audit import sources
from audit.errors import ReportError


class _FakeHTTPS(MemoryFileSystem):
    """An in-memory stand-in for fsspec's HTTPFileSystem (which needs aiohttp and a server): as that one, its paths
    are the whole URLs, query strings included, so ``https://h/x.parquet?sig=1`` is one object."""

    protocol = ("https", "http")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return path

    def unstrip_protocol(self, name):
        return name


@pytest.fixture()
def https():
    """``https://`` and ``http://`` served from memory for the test, fsspec's own implementations restored after."""
    from fsspec.registry import _registry

    saved = {p: _registry.get(p) for p in ("http", "https")}
    for p in ("http", "https"):
        fsspec.register_implementation(p, _FakeHTTPS, clobber=True)
    _FakeHTTPS.store.clear()
    _FakeHTTPS.clear_instance_cache()
    try:
        yield _FakeHTTPS()
    finally:
        _FakeHTTPS.store.clear()
        _FakeHTTPS.clear_instance_cache()
        for p, cls in saved.items():
            if cls is None:
                _registry.pop(p, None)
            else:
                _registry[p] = cls


def _read(files) -> list[tuple]:
    plan = sources.plan_units(files, "prompt", unit_rows=1000)
    sources._STREAMS.clear()
    return [(u.url, i, p) for u in plan.units for b in sources.read_unit(u, "prompt")
            for i, p in zip(b.rows, b.prompts)]


# ------------------------------------------------------------------ presigned https URLs (a ?query after the name)

def test_presigned_https_urls_are_read_by_the_extension_before_their_query(https):
    # A presigned object-store URL ends in its signature: https://bucket/.../part-0.parquet?X-Amz-Signature=...
    # Before: "unsupported file type .parquet?x-amz-signature=abc&v=1" (the query taken as the extension), and a
    # .jsonl.gz?sig=1 would have been opened without decompression (fsspec infers compression from the ending).
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["red cat", "blue dog"]}), buf)
    parquet = "https://h/logs/dt=2026-12-01/part-0.parquet?X-Amz-Signature=abc&X-Amz-Credential=K/20261207/s3"
    jsonl = "https://h/logs/p.jsonl.gz?sig=1"
    csv_zst = "https://h/logs/p.csv.zst?sig=2"
    csv_bz2 = "http://h/logs/p.csv.bz2#part"
    https.pipe(parquet, buf.getvalue())
    https.pipe(jsonl, gzip.compress(b'{"prompt": "green tree"}\n{"prompt": "sun"}\n'))
    https.pipe(csv_zst, zstandard.ZstdCompressor().compress(b"prompt\nzst one\nzst two\nzst three\n"))
    https.pipe(csv_bz2, bz2.compress(b"prompt\nbz one\n"))

    files, skipped = sources.discover([parquet, jsonl, csv_zst, csv_bz2])

    assert [(f.url, f.fmt) for f in files] == [(parquet, "parquet"), (jsonl, "jsonl"), (csv_zst, "csv"),
                                               (csv_bz2, "csv")]
    assert skipped == []
    assert _read(files) == [(parquet, 0, "red cat"), (parquet, 1, "blue dog"), (jsonl, 0, "green tree"),
                            (jsonl, 1, "sun"), (csv_zst, 0, "zst one"), (csv_zst, 1, "zst two"),
                            (csv_zst, 2, "zst three"), (csv_bz2, 0, "bz one")]


def test_a_query_does_not_make_a_missing_https_file_a_glob_or_hide_a_bad_extension(https):
    # the '?' of a query is not a glob wildcard: a missing presigned URL is "no such file", not "matches no file"
    with pytest.raises(sources.SourceError, match=r"\?sig=1: no such file or folder$"):
        sources.discover(["https://h/gone.parquet?sig=1"])
    https.pipe("https://h/x.json?sig=1", b"{}")  # the name's own extension is judged, and named, without the query
    with pytest.raises(sources.SourceError, match=r"unsupported file type \.json;"):
        sources.discover(["https://h/x.json?sig=1"])


def test_name_part_leaves_local_names_with_query_characters_alone():
    assert sources.name_part("https://h/a/b.csv.gz?x=1/2#f") == "https://h/a/b.csv.gz"
    assert sources.name_part("HTTP://h/b.pq?x") == "HTTP://h/b.pq"
    assert sources.name_part("/data/what?.parquet") == "/data/what?.parquet"
    assert sources.name_part("file:///data/a#1.csv") == "file:///data/a#1.csv"
    assert sources.name_part("s3://b/k.parquet?versionId=3") == "s3://b/k.parquet?versionId=3"


# ------------------------------------------------------------------ a glob that matches partition folders

def _spark_partition(folder, prompts):
    """A Spark-written partition: part files, an empty part, _SUCCESS, .crc files and a _temporary/ attempt."""
    (folder / "_temporary" / "0").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": prompts}), folder / "part-00000.parquet")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), folder / "part-00001.parquet")
    pq.write_table(pa.table({"prompt": ["half-written attempt"]}), folder / "_temporary" / "0" / "part-00000.parquet")
    (folder / "_SUCCESS").write_bytes(b"")
    (folder / ".part-00000.parquet.crc").write_bytes(b"crc")


def test_a_glob_over_partition_folders_reads_the_files_in_them(tmp_path):
    # `memaudit run 'logs/dt=2026-12-0[12]'` (or 'logs/dt=*', 's3://bucket/logs/*') chose two partitions by their
    # folder names; before: "no readable prompt file in logs/dt=2026-12-0[12]: nothing found" (matched folders were
    # dropped as not files). The matched folders are now read as a folder input reads them.
    logs = tmp_path / "logs"
    _spark_partition(logs / "dt=2026-12-01", ["one a", "one b"])
    _spark_partition(logs / "dt=2026-12-02", ["two a"])
    _spark_partition(logs / "dt=2026-12-03", ["three a"])
    (logs / "_staging").mkdir()
    pq.write_table(pa.table({"prompt": ["staged"]}), logs / "_staging" / "s.parquet")

    files, skipped = sources.discover([f"{logs}/dt=2026-12-0[12]"])
    d1, d2 = logs / "dt=2026-12-01", logs / "dt=2026-12-02"
    assert [f.url for f in files] == [f"{d1}/part-00000.parquet", f"{d1}/part-00001.parquet",
                                      f"{d2}/part-00000.parquet", f"{d2}/part-00001.parquet"]
    assert sorted((s["path"], s["reason"]) for s in skipped) == sorted(
        [(f"{d}/_temporary", "hidden or marker folder") for d in (d1, d2)]
        + [(f"{d}/{m}", "marker or hidden file") for d in (d1, d2) for m in ("_SUCCESS", ".part-00000.parquet.crc")])
    assert _read(files) == [(f"{d1}/part-00000.parquet", 0, "one a"), (f"{d1}/part-00000.parquet", 1, "one b"),
                            (f"{d2}/part-00000.parquet", 0, "two a")]

    # 'logs/*' matches the _staging folder too: a wildcard does not enter it (as a folder input), and it is listed once
    files, skipped = sources.discover([f"{logs}/*"])
    assert [f.url for f in files if f.url.endswith("00000.parquet")] == [
        f"{logs}/dt=2026-12-0{i}/part-00000.parquet" for i in (1, 2, 3)]
    assert [s["path"] for s in skipped].count(f"{logs}/_staging") == 1
    assert f"{logs}/_staging/s.parquet" not in [f.url for f in files]

    # 'logs/**' matches each _temporary folder and the files in it: each is listed once, never read
    files, skipped = sources.discover([f"{logs}/**"])
    assert len(files) == 6 and not any("_temporary" in f.url or "_staging" in f.url for f in files)
    assert len(skipped) == len({(s["path"], s["reason"]) for s in skipped}) == 1 + 3 * 3  # _staging; each _temporary, _SUCCESS, .crc


def test_a_glob_reads_a_spark_table_folder_named_like_a_file(tmp_path):
    # Spark's df.write.parquet("out/events.parquet") writes a FOLDER named events.parquet; 'out/*.parquet' matched
    # it and read nothing from it (before: "no readable prompt file ...: nothing found").
    _spark_partition(tmp_path / "out" / "events.parquet", ["spark row"])
    pq.write_table(pa.table({"prompt": ["plain file row"]}), tmp_path / "out" / "plain.parquet")
    files, _ = sources.discover([f"{tmp_path}/out/*.parquet"])
    assert _read(files) == [(f"{tmp_path}/out/events.parquet/part-00000.parquet", 0, "spark row"),
                            (f"{tmp_path}/out/plain.parquet", 0, "plain file row")]


# ------------------------------------------------------------------ report --by a hive partition key

def test_report_by_a_hive_partition_key_breaks_down_by_its_folders(tmp_path, tiny_model_dir):
    # `memaudit run logs/ --keep-columns region` is refused (region is a folder name, not a column: the message says
    # so), and `memaudit report RUN --by region` was refused too, listing 60 columns: no way to break a run down by
    # its partitions but the date's. --by now takes a hive key of the source paths when no column has its name.
    from audit.report import build_report
    from helpers import run_audit

    logs = tmp_path / "logs"
    for region, prompts in (("eu", ["a red cat", "a blue dog", None]), ("us", ["a green tree"]), ("apac", [])):
        (logs / f"region={region}").mkdir(parents=True)
        pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), logs / f"region={region}" / "p.parquet")
    out, manifest = run_audit([logs], tiny_model_dir, tmp_path / "run", device="cpu", dtype="float32")
    assert manifest["counts"]["rows_read"] == 4 and manifest["counts"]["rejected"] == 1

    report = build_report(out, by=["region"])
    title, name, frame = report.breakdowns[-1]
    assert (title, name) == ("By region (partition folder)", "region")
    assert frame.select("region", "rows", "unique", "rejected").rows() == [("apac", 0, 0, 0), ("eu", 2, 2, 1),
                                                                           ("us", 1, 1, 0)]
    with pytest.raises(ReportError, match=r"--by lang: risk.parquet has no such column; columns: rank, .*"
                                          r"--keep-columns`\); partition keys in the source paths: region$"):
        build_report(out, by=["lang"])  # neither a column nor a partition key: refused, naming the keys there are


def test_partition_value_reads_the_nearest_folder_and_decodes_http_listings():
    from audit.report import partition_value

    assert partition_value("http://h/logs/region%3Deu/p.parquet", "region") == "eu"  # an HTTP listing's folder
    assert partition_value("/data/a=1/region=eu/sub/region=us/p.parquet", "region") == "us"  # the nearest folder
    assert partition_value("/data/region=eu.parquet", "region") is None  # a file name is no partition folder
    assert partition_value("/data/region=a%20b/p.parquet", "region") == "a%20b"  # a local folder: as written
    assert partition_value("s3://b/region=eu/p.parquet", "regio") is None  # the whole key, not a prefix of it


# ------------------------------------------------------------------ compressed data without its suffix


@pytest.mark.parametrize("name, data, said", [
    # a gzip file that lost its .gz (an uploader, Content-Encoding): read as text it gave 2 invalid_utf8 rows in
    # place of its 10 prompts, and the run exited 0
    ("logs.jsonl", gzip.compress(b'{"prompt": "a"}\n' * 10, mtime=0),
     r"gzip-compressed data, not text \(its first bytes are that format's signature\): add .gz to its name"),
    ("logs.csv", zstandard.ZstdCompressor().compress(b"prompt\na\nb\n"), "zstd-compressed data, not text"),
    ("logs.txt", bz2.compress(b"a\nb\n"), "bz2-compressed data, not text"),
    ("logs.jsonl.gz", gzip.compress(gzip.compress(b'{"prompt": "a"}\n', mtime=0), mtime=0),
     "gzip-compressed data, not text"),
    ("logs.csv", b"PK\x03\x04\x14\x00\x06\x00" + b"\x00" * 30, r"a zip archive \(an .xlsx workbook is one\)"),
    ("logs.txt", lzma.compress(b"a\n"), "xz-compressed data, not text .*: memaudit does not read xz"),
    # ids of their own, and gzip without its time stamp: test ids made of the bytes differed between pytest-xdist's
    # workers collecting in different seconds, which stops the whole suite ("Different tests were collected")
    # an image, a document or a program under a text name: its first line was a CSV header of junk columns, or its
    # lines rows of binary
    ("upload.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "a PNG image, not text .*: give "
     "memaudit the prompt table, or move the file out of the inputs"),
    ("photo.txt", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "a JPEG image, not text"),
    ("anim.jsonl", b"GIF89a\x01\x00\x01\x00", "a GIF image, not text"),
    ("pic.csv", b"RIFF\x24\x00\x00\x00WEBPVP8 ", "a WebP image, not text"),
    ("report.csv", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "a PDF document, not text"),
    ("tool.txt", b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 8, r"an executable \(ELF\), not text"),
], ids=["gzip-as-jsonl", "zstd-as-csv", "bz2-as-txt", "gzip-in-gzip", "zip-as-csv", "xz-as-txt", "png-as-csv",
        "jpeg-as-txt", "gif-as-jsonl", "webp-as-csv", "pdf-as-csv", "elf-as-txt"])
def test_compressed_or_binary_data_under_a_text_name_is_refused_not_read_as_rows(tmp_path, name, data, said):
    (tmp_path / name).write_bytes(data)
    files, _ = sources.discover([str(tmp_path / name)])
    with pytest.raises(sources.SourceError, match=f"{name}: cannot read as .*: it is {said}"):
        sources.plan_units(files, "prompt", unit_rows=1000)
    plan = sources.plan_units(files, "prompt", unit_rows=1000, skip_bad_files=True)  # skipped, listed, not read
    assert plan.units == [] and [s["path"] for s in plan.skipped] == [str(tmp_path / name)]


def test_a_parquet_file_named_csv_is_refused_and_text_that_looks_like_a_signature_is_read(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "export.csv")
    files, _ = sources.discover([str(tmp_path / "export.csv")])
    with pytest.raises(sources.SourceError, match=r"it is a Parquet file, not text .*: name it \.parquet"):
        sources.plan_units(files, "prompt", unit_rows=1000)
    # text prompts that begin like a signature, but are text, are read as ever
    (tmp_path / "p.txt").write_text("BZh9 and PAR1 are not signatures here\nPK is a name\nGIF8 and %PDF are words\n")
    files, _ = sources.discover([str(tmp_path / "p.txt")])
    assert [p for _, _, p in _read(files)] == ["BZh9 and PAR1 are not signatures here", "PK is a name",
                                               "GIF8 and %PDF are words"]


# ------------------------------------------------------------------ one http file under two spellings

def test_an_http_file_named_raw_and_percent_encoded_is_read_once(https):
    # `memaudit run http://h/logs/ http://h/logs/dt=2026-12-01/` read the 2026-12-01 partition twice: the server's
    # listing names the folder dt%3D2026-12-01, the user wrote dt=2026-12-01, and the two spellings were two files
    # (1200 rows counted for 600). A local file named twice is read once; an http(s) file now too.
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["red cat", "blue dog"]}), buf)
    raw, encoded = "https://h/logs/dt=2026-12-01/p q.parquet", "https://h/logs/dt%3D2026-12-01/p%20q.parquet"
    for url in (raw, encoded):  # one object on the server, answering to both spellings
        https.pipe(url, buf.getvalue())
    files, _ = sources.discover([raw, encoded])
    assert [f.url for f in files] == [raw]  # the first spelling kept
    assert sources.plan_units(files, "prompt", unit_rows=1000).file_rows == {raw: 2}
    files, _ = sources.discover([encoded, raw])
    assert [f.url for f in files] == [encoded]


# ------------------------------------------------------------------ an http glob over percent-encoded listings

def test_an_http_glob_matches_the_names_a_server_lists_percent_encoded(https):
    # A web server's folder listing names dt=2026-12-01/ as dt%3D2026-12-01/ (python -m http.server, and others):
    # 'http://h/logs/dt=2026-12-0[12]/' and 'http://h/logs/my dir/*.parquet' matched nothing ("the pattern matches
    # no file") though '.../logs/*/*.parquet' read the same files; 'logs/dt*/' (a trailing slash) matched nothing too.
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["red cat"]}), buf)
    listed = ["https://h/logs/dt%3D2026-12-01/p.parquet", "https://h/logs/dt%3D2026-12-02/p.parquet",
              "https://h/logs/dt%3D2026-12-03/p.parquet", "https://h/logs/my%20dir/q.parquet"]
    for url in listed:
        https.pipe(url, buf.getvalue())

    def found(pattern):
        files, _ = sources.discover([pattern])
        return [f.url for f in files]

    assert found("https://h/logs/dt=2026-12-0[12]/") == listed[:2]
    assert found("https://h/logs/dt=2026-12-03/*.parquet") == listed[2:3]
    assert found("https://h/logs/my dir/*.parquet") == listed[3:]
    assert found("https://h/logs/dt*/") == listed[:3]
    assert found("https://h/logs/**/*.parquet") == listed
    with pytest.raises(sources.SourceError, match=r"dt=2026-12-09/\*\.parquet: the pattern matches no file$"):
        found("https://h/logs/dt=2026-12-09/*.parquet")


# ------------------------------------------------------------------ a struct field named as a column

def test_a_struct_field_named_as_the_prompt_column_is_explained(tmp_path):
    # Spark logs nest the request: --prompt-column request.prompt was refused with "columns found: id, request" and
    # no word on why the field was not one of them.
    pq.write_table(pa.table({"request": [{"prompt": "a cat", "seed": 1}], "id": [1],
                             "prompt_meta": [{"prompt": "x"}]}), tmp_path / "n.parquet")
    files, _ = sources.discover([str(tmp_path)])
    with pytest.raises(sources.SourceError) as err:
        sources.plan_units(files, "request.prompt", unit_rows=1000)
    assert str(err.value) == (
        "no input has the prompt column 'request.prompt'; columns found: id, prompt_meta, request. Choose one with "
        "--prompt-column. 'request.prompt' names a field inside the column 'request': memaudit reads top-level "
        "columns only; write the field out as a column of its own (polars: df.unnest('request'), Spark: "
        "select('request.prompt')).")
    with pytest.raises(sources.SourceError) as err:  # a dotted name whose head is no column gets no such sentence
        sources.plan_units(files, "req.prompt", unit_rows=1000)
    assert str(err.value).endswith("Choose one with --prompt-column.")


# ------------------------------------------------------------------ bytes inside a kept struct

def test_bytes_inside_a_kept_struct_are_kept_as_a_binary_column_is(tmp_path):
    # Spark writes strings without the UTF-8 annotation (binary); inside a kept struct they came out as Python's
    # repr, {"ua": "b'curl/8'"}, where the same bytes in a column of their own are kept as curl/8.
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"], "ua": pa.array([b"curl/8", b"\xff"]),
                             "req": pa.array([{"ua": b"curl/8", "n": 1}, {"ua": b"\xff", "n": None}])}),
                   tmp_path / "p.parquet")
    files, _ = sources.discover([str(tmp_path / "p.parquet")])
    plan = sources.plan_units(files, "prompt", unit_rows=1000, keep_columns=("ua", "req"))
    (batch,) = list(sources.read_unit(plan.units[0], "prompt", keep_columns=("ua", "req")))
    assert batch.extras == {"ua": ["curl/8", "\\xff"],
                            "req": ['{"ua": "curl/8", "n": 1}', '{"ua": "\\\\xff", "n": null}']}


# ------------------------------------------------------------------ the extension a skip names

def test_a_skipped_compressed_file_names_its_whole_extension(tmp_path):
    # Spark's df.write.json(compression="gzip") writes part-00000-...-c000.json.gz: the folder was refused naming
    # "(unsupported extension .gz)", though .gz is read; what memaudit does not read is .json (or .parquet.gz).
    part = tmp_path / "dt=2026-12-01"
    part.mkdir()
    (part / "part-00000-abc-c000.json.gz").write_bytes(gzip.compress(b'{"prompt": "a"}\n'))
    (part / "t.parquet.gz").write_bytes(gzip.compress(b"PAR1"))
    (part / "p.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "a"}\n'))
    files, skipped = sources.discover([str(tmp_path)])
    assert [f.url for f in files] == [str(part / "p.jsonl.gz")]
    assert skipped == [{"path": str(part / "part-00000-abc-c000.json.gz"),
                        "reason": "unsupported extension .json.gz; Spark's write.json writes JSON lines, which memaudit "
                                  "reads named .jsonl"},
                       {"path": str(part / "t.parquet.gz"), "reason": "unsupported extension .parquet.gz"}]
    with pytest.raises(sources.SourceError, match=r"t\.parquet\.gz: unsupported file type \.parquet\.gz;"):
        sources.discover([str(part / "t.parquet.gz")])


# ------------------------------------------------------------------ an input removed between listing and reading

def test_an_input_removed_after_it_was_listed_is_named_as_gone(tmp_path):
    # A Spark overwrite of the partition while `memaudit run logs/` started: the run stopped with the bare
    # "memaudit: error: [Errno 2] No such file or directory: '.../part-01997.parquet'" (exit 2), naming no cause.
    from audit.config import RunConfig
    from audit.pipeline import run_identity

    for i in range(2):
        pq.write_table(pa.table({"prompt": [f"p{i}"]}), tmp_path / f"part-{i}.parquet")
    files, _ = sources.discover([str(tmp_path)])
    plan = sources.plan_units(files, "prompt", unit_rows=1000)
    (tmp_path / "part-1.parquet").unlink()
    with pytest.raises(sources.SourceError) as err:
        run_identity(RunConfig(inputs=(str(tmp_path),)), plan, {"fingerprint": "f"}, {})
    assert str(err.value) == (
        f"{tmp_path}/part-1.parquet: the input file is gone: it was listed when the run began and removed before the "
        "run started reading (a writer replacing the folder, as a Spark overwrite does?); rerun once the inputs are "
        "complete")


def test_a_file_url_with_the_localhost_host_names_the_local_file(tmp_path):
    # RFC 8089 spells file:///data/x as file://localhost/data/x too (Java's URI, some schedulers); fsspec read the
    # host as a relative folder 'localhost' and the run stopped with "no such file or folder".
    pq.write_table(pa.table({"prompt": ["a cat"]}), tmp_path / "p.parquet")
    files, _ = sources.discover([f"file://localhost{tmp_path}/p.parquet", f"FILE://LOCALHOST{tmp_path}/"])
    assert [f.url for f in files] == [f"{tmp_path}/p.parquet"]


def test_a_spark_output_holding_only_its_success_marker_is_a_day_of_no_rows(tmp_path, tiny_model_dir):
    """Spark writes _SUCCESS and no part file for a day without rows: the run stopped with exit 2 ("no readable
    prompt file"), failing a nightly job on a complete, empty day, where a file of no rows only warns. It is now
    read as inputs with no rows (exit 0, the warning); a folder with nothing in it, or only other markers, is still
    refused."""
    from typer.testing import CliRunner

    from audit.cli import app

    day = tmp_path / "dt=2026-12-01"
    day.mkdir()
    (day / "_SUCCESS").write_text("")
    (day / "._SUCCESS.crc").write_text("")
    args = ["run", "--model", str(tiny_model_dir), "--device", "cpu", "--no-progress"]
    res = CliRunner().invoke(app, [*args, str(day), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "memaudit: warning: the inputs hold no rows; nothing was scored" in res.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["rows_read"] == 0 and manifest["files"] == []
    assert {s["path"] for s in manifest["skipped_files"]} == {str(day / "_SUCCESS"), str(day / "._SUCCESS.crc")}
    (day / "_SUCCESS").unlink()  # only the checksum marker: no success said
    res = CliRunner().invoke(app, [*args, str(day), "--out", str(tmp_path / "out2")])
    assert res.exit_code == 2 and "no readable prompt file" in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(app, [*args, str(empty), "--out", str(tmp_path / "out3")])
    assert res.exit_code == 2 and f"no readable prompt file in {empty}: nothing found" in res.stderr


def test_spark_json_output_is_skipped_saying_how_to_read_it(tmp_path):
    """Spark's write.json leaves part-*.json files of JSON lines: skipped as 'unsupported extension .json' with no
    hint that memaudit reads the same lines named .jsonl. Other .json files (a run.json, a config) get no hint."""
    out = tmp_path / "events"
    out.mkdir()
    (out / "part-00000-1a2b-c000.json").write_text('{"prompt": "a red cat"}\n')
    (out / "part-00001-1a2b-c000.json.gz").write_bytes(gzip.compress(b'{"prompt": "a blue dog"}\n'))
    (out / "settings.json").write_text("{}")
    (out / "part-00002-1a2b-c000.jsonl").write_text('{"prompt": "an old city"}\n')
    files, skipped = sources.discover([str(out)])
    assert [f.url for f in files] == [str(out / "part-00002-1a2b-c000.jsonl")]
    hint = "; Spark's write.json writes JSON lines, which memaudit reads named .jsonl"
    assert {s["path"]: s["reason"] for s in skipped} == {
        str(out / "part-00000-1a2b-c000.json"): "unsupported extension .json" + hint,
        str(out / "part-00001-1a2b-c000.json.gz"): "unsupported extension .json.gz" + hint,
        str(out / "settings.json"): "unsupported extension .json"}
