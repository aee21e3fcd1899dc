"""Findings of a new-user trial as a data engineer screening a fine-tune's training captions (Parquet shards,
gzipped JSON lines and CSV exports) before training: every caption row scored or rejected with a reason, its
image id round-tripping exactly to the manifest."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.errors import SourceError
from audit.pipeline import RunConfig
from audit.runner import execute


def _run(tmp_path, model, inputs, name="run", **kw):
    """Run quietly into tmp_path/name; returns (risk, rejects, manifest) and checks every row is accounted for."""
    cfg = RunConfig(inputs=tuple(str(i) for i in inputs), model=str(model), out=str(tmp_path / name),
                    device="cpu", **kw)
    out, manifest = execute(cfg, progress=False, log=lambda msg: None)
    risk, rejects = pl.read_parquet(out / "risk.parquet"), pl.read_parquet(out / "rejects.parquet")
    assert manifest["counts"]["rows_read"] == risk.height + rejects.height
    return risk, rejects, manifest


def _flipped_caption_shard(path):
    """300 captions in 3 row groups of 100, written with page CRC checksums (as parquet-mr and Spark write them),
    then the digits of caption 150 (second row group) overwritten in place: pyarrow without checksum verification
    reads it as 'caption 999 ...', a caption that is not in the training set."""
    caps = [f"caption {i:03d} a red cat on a beach" for i in range(300)]
    pq.write_table(pa.table({"caption": caps, "image_id": list(range(300))}), path, compression="NONE",
                   write_page_checksum=True, row_group_size=100, use_dictionary=False)
    data = bytearray(path.read_bytes())
    at = data.find(b"caption 150 a red")
    data[at + 8:at + 11] = b"999"
    path.write_bytes(bytes(data))
    assert pq.read_table(path)["caption"][150].as_py() == "caption 999 a red cat on a beach"  # silently altered
    return path


def test_a_shard_page_failing_its_crc_is_damage_not_another_caption(tmp_path, tiny_model_dir):
    shard = _flipped_caption_shard(tmp_path / "part-0.parquet")
    with pytest.raises(SourceError, match=r"part-0\.parquet rows 0-300\): cannot read \(OSError: could not verify "
                                          r"page integrity, CRC checksum verification failed"):
        _run(tmp_path, tiny_model_dir, [shard], prompt_column="caption", id_column="image_id")
    risk, rejects, manifest = _run(tmp_path, tiny_model_dir, [shard], name="skip", prompt_column="caption",
                                   id_column="image_id", skip_bad_files=True)
    assert manifest["counts"]["rows_read"] == 300
    assert manifest["counts"]["rejected_by_reason"] == {"unreadable_rows": 100}
    assert sorted(rejects["row"]) == list(range(100, 200))
    assert rejects["detail"].str.contains("CRC checksum verification failed").all()
    assert sorted(int(i) for i in risk["prompt_id"]) == list(range(100)) + list(range(200, 300))
    assert risk.filter(pl.col("prompt").str.contains("999")).height == 0


def test_a_shard_without_the_caption_and_the_id_column_is_not_warned_about_twice(tmp_path, tiny_model_dir):
    """A shard of another schema lacks both --prompt-column and --id-column: its 50 rows are rejected once, as
    missing_prompt_column. The id column's warning counted them again ('so its 50 rows are rejected as
    missing_id_column'), telling of 100 rejected rows where the manifest has 50."""
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"text": [f"x {i}" for i in range(50)]}), other)
    noid = tmp_path / "noid.parquet"
    pq.write_table(pa.table({"caption": [f"no id {i}" for i in range(5)]}), noid)
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"caption": [f"cap {i}" for i in range(50)], "image_id": list(range(50))}), good)
    cfg = RunConfig(inputs=(str(other), str(noid), str(good)), model=str(tiny_model_dir), out=str(tmp_path / "run"),
                    device="cpu", prompt_column="caption", id_column="image_id", max_error_fraction=1.0)
    logs: list[str] = []
    _, manifest = execute(cfg, progress=False, log=logs.append)
    assert manifest["counts"]["rejected_by_reason"] == {"missing_id_column": 5, "missing_prompt_column": 50}
    warned = [m for m in logs if "has no column" in m]
    assert warned == [
        f"memaudit: warning: 1 of 3 input files has no column 'caption', so its 50 rows are rejected as "
        f"missing_prompt_column; the first: {other} (columns: text)",
        f"memaudit: warning: 1 of 3 input files has no column 'image_id', so its 5 rows are rejected as "
        f"missing_id_column; the first: {noid} (columns: caption)"], logs


def _hive_shards(root):
    """Caption shards in hive partition folders, lang=en/ and lang=de/, as Spark or polars write a dataset."""
    for lang in ("en", "de"):
        (root / f"lang={lang}").mkdir(parents=True)
        pq.write_table(pa.table({"caption": [f"{lang} caption"], "image_id": [1], "url": ["u"]}),
                       root / f"lang={lang}" / "part-0.parquet")
    return root


@pytest.mark.parametrize("option, message", [
    ({"keep_columns": ("url", "lang")}, "no input has the --keep-columns column(s) 'lang'; columns found: caption, "
                                        "image_id, url. 'lang' is a hive partition key"),
    ({"id_column": "lang"}, "no input has the id column 'lang'; columns found: caption, image_id, url. Choose one "
                            "with --id-column, or leave it out. 'lang' is a hive partition key"),
    ({"prompt_column": "lang"}, "no input has the prompt column 'lang'; columns found: caption, image_id, url. "
                                "Choose one with --prompt-column. 'lang' is a hive partition key"),
])
def test_a_hive_partition_key_named_as_a_column_is_explained(tmp_path, option, message):
    """polars, pyarrow datasets and Spark read lang=en/ as a column 'lang'; memaudit reads each file's columns only.
    The refusal listed the files' columns and no reason why 'lang', in every path, was not one of them."""
    from audit.pipeline import build_plan

    root = _hive_shards(tmp_path / "caps")
    cfg = RunConfig(inputs=(str(root),), **{"prompt_column": "caption", **option})
    with pytest.raises(SourceError) as err:
        build_plan(cfg)
    assert str(err.value).startswith(message)
    assert str(err.value).endswith(" in the inputs' folder names (lang=...), not a column of the files: memaudit "
                                   "reads each file's own columns; the outputs' source column holds each row's file "
                                   "path, its partition folders included (`memaudit report RUN --by lang` breaks a "
                                   "run down by them).")
    # a column that is no partition key gets no such sentence
    with pytest.raises(SourceError) as err:
        build_plan(RunConfig(inputs=(str(root),), prompt_column="caption", keep_columns=("url", "shard")))
    assert str(err.value) == "no input has the --keep-columns column(s) 'shard'; columns found: caption, image_id, url."


def test_keeping_a_source_partition_says_the_source_column_holds_it(tmp_path):
    """--keep-columns url,source over source=laion/ shards: 'source' is an output column (each row's file path),
    so it is refused; the refusal said only to rename the input column, which is no column of the files."""
    from audit.config import validate_config
    from audit.errors import RunError

    with pytest.raises(RunError) as err:
        validate_config(RunConfig(inputs=(str(tmp_path),), prompt_column="caption", keep_columns=("url", "source")))
    assert str(err.value) == (
        "--keep-columns source: memaudit's output tables have a column of that name; rename the input column (or "
        "keep another one) (their source column holds each row's input file path, so a hive partition folder such "
        "as source=laion/ is in it already)")
    with pytest.raises(RunError) as err:
        validate_config(RunConfig(inputs=(str(tmp_path),), keep_columns=("rank",)))
    assert str(err.value) == ("--keep-columns rank: memaudit's output tables have a column of that name; rename the "
                              "input column (or keep another one)")


def test_the_shipped_training_captions_config_runs_on_img2dataset_shards(tmp_path, tiny_model_dir, monkeypatch):
    """pipelines/training-captions.toml names 'LAION-style shards with a caption and a key column'; img2dataset
    writes them (key, caption, url, width, height, status: no 'shard' column, the shard is the file). The config
    kept a 'shard' column, so it stopped at once: "no input has the --keep-columns column(s) 'shard'"."""
    from pathlib import Path

    from typer.testing import CliRunner

    from audit.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "captions").mkdir()
    for s in range(2):
        pq.write_table(pa.table({"key": [f"{s:05d}{i:04d}" for i in range(3)], "url": [f"u{s}{i}" for i in range(3)],
                                 "caption": ["a red cat", f"shard {s} caption", None], "width": [64] * 3,
                                 "height": [64] * 3, "status": ["success"] * 3}),
                       tmp_path / "captions" / f"{s:05d}.parquet")
    config = Path(__file__).resolve().parents[1] / "pipelines" / "training-captions.toml"
    res = CliRunner().invoke(app, ["run", "--config", str(config), "--model", str(tiny_model_dir), "--out", "run",
                                   "--batch-size", "8", "--no-progress"])
    assert res.exit_code == 0, res.output
    risk = pl.read_parquet(tmp_path / "run" / "risk.parquet")
    rejects = pl.read_parquet(tmp_path / "run" / "rejects.parquet")
    assert sorted(risk["prompt_id"]) == ["000000000", "000000001", "000010000", "000010001"]
    assert sorted(rejects["prompt_id"]) == ["000000002", "000010002"] and set(rejects["reason"]) == {"null_prompt"}
    assert dict(zip(risk["prompt_id"], risk["url"]))["000010001"] == "u11"


def test_an_invalid_json_line_says_why_in_detail(tmp_path, tiny_model_dir):
    """A database export's line with a raw tab inside a caption looks like valid JSON; strict JSON (Python's,
    polars') refuses it. The reject kept the line with an empty detail, so nothing said where it was wrong."""
    path = tmp_path / "export.jsonl"
    path.write_bytes(b'{"caption": "raw\ttab caption", "image_id": 1}\n{"caption": "fine", "image_id": 2}\n\n'
                     b'[1, 2]\n"text"\n3.5\ntrue\nnull\n{"caption": "cut", "image_id": 3')
    risk, rejects, manifest = _run(tmp_path, tiny_model_dir, [path], prompt_column="caption", id_column="image_id")
    assert risk["prompt_id"].to_list() == ["2"]
    assert manifest["counts"]["rejected_by_reason"] == {"empty_prompt": 1, "invalid_json": 7}
    assert rejects.sort("row").select("row", "reason", "detail").rows() == [
        (0, "invalid_json", "Invalid control character at: line 1 column 17 (char 16)"),
        (2, "empty_prompt", None),  # a blank line: no prompt, not a line that is not JSON
        (3, "invalid_json", "a JSON array, not an object"),
        (4, "invalid_json", "a JSON string, not an object"),
        (5, "invalid_json", "a JSON number, not an object"),
        (6, "invalid_json", "a JSON boolean, not an object"),
        (7, "invalid_json", "a JSON null, not an object"),
        (8, "invalid_json", "Expecting ',' delimiter: line 1 column 33 (char 32)")]
    assert rejects.sort("row")["prompt"][0] == '{"caption": "raw\ttab caption", "image_id": 1}'


@pytest.mark.parametrize("name, encoding, label", [("export.csv", "utf-16", "UTF-16-LE"),
                                                   ("export.jsonl", "utf-16-be", "UTF-16-BE"),
                                                   ("export.csv.gz", "utf-16", "UTF-16-LE"),
                                                   ("export.txt", "utf-32", "UTF-32-LE"),
                                                   ("export.jsonl", "utf-32-be", "UTF-32-BE")])
def test_a_utf16_export_is_refused_naming_its_encoding(tmp_path, name, encoding, label):
    """SQL Server and Excel write "Unicode" exports as UTF-16 with a byte-order mark. A CSV failed with
    "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0", and a one-line JSON-lines file was
    read as two rejected rows (invalid_json, invalid_utf8): its line break bytes fall inside UTF-16 characters."""
    import gzip

    from audit.pipeline import build_plan

    text = ('image_id,caption\r\n007,a red cat\r\n' if ".csv" in name else
            '{"caption": "a red cat", "image_id": "007"}\n' if ".jsonl" in name else "a red cat\n")
    if encoding.endswith("-be"):  # (Python writes no BOM for an explicit byte order)
        data = "\ufeff".encode(encoding) + text.encode(encoding)
    else:
        data = text.encode(encoding)  # (Python's utf-16 and utf-32 write the little-endian BOM first)
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    columns = {} if name.endswith(".txt") else {"prompt_column": "caption"}
    with pytest.raises(SourceError) as err:
        build_plan(RunConfig(inputs=(str(path),), **columns))
    assert str(err.value) == (f"{path}: cannot read as {name.split('.')[1]} (ValueError: it is {label} text (it begins "
                              f"with that byte-order mark); memaudit reads UTF-8: convert it, e.g. iconv -f "
                              f"{label[:6]} -t UTF-8) (--skip-bad-files skips such files and goes on)")
    plan = build_plan(RunConfig(inputs=(str(path),), skip_bad_files=True, **columns))
    assert plan.units == [] and [s["path"] for s in plan.skipped] == [str(path)]
    # a UTF-8 file with its byte-order mark is read as before
    utf8 = b"\xef\xbb\xbf" + text.encode()
    path.write_bytes(gzip.compress(utf8) if name.endswith(".gz") else utf8)
    assert build_plan(RunConfig(inputs=(str(path),), **columns)).file_rows == {str(path): 1}


def test_a_header_name_differing_only_in_spaces_or_case_is_pointed_out(tmp_path):
    """A database export's header 'image_id ,caption\\xa0' (a trailing space, a no-break space): the refusal listed
    "columns found: caption , image_id ." where the names read as the ones asked for, and said nothing more."""
    from audit.pipeline import build_plan

    path = tmp_path / "export.csv"
    path.write_bytes("image_id ,caption\xa0,URL\n1,a cat,u\n".encode())
    with pytest.raises(SourceError) as err:
        build_plan(RunConfig(inputs=(str(path),), prompt_column="caption"))
    assert str(err.value) == (
        "no input has the prompt column 'caption'; columns found: URL, caption\xa0, image_id . Choose one with "
        "--prompt-column. The column 'caption\\xa0' differs from 'caption' only in spaces or case: give the name "
        "exactly as the file has it (quoted), or fix the header.")
    with pytest.raises(SourceError) as err:
        build_plan(RunConfig(inputs=(str(path),), prompt_column="caption\xa0", id_column="image_id"))
    assert str(err.value).endswith(". The column 'image_id ' differs from 'image_id' only in spaces or case: give the "
                                   "name exactly as the file has it (quoted), or fix the header.")
    with pytest.raises(SourceError) as err:
        build_plan(RunConfig(inputs=(str(path),), prompt_column="caption\xa0", keep_columns=("url", "width")))
    assert str(err.value) == (
        "no input has the --keep-columns column(s) 'url', 'width'; columns found: URL, caption\xa0, image_id . The "
        "column 'URL' differs from 'url' only in spaces or case: give the name exactly as the file has it (quoted), "
        "or fix the header.")
    plan = build_plan(RunConfig(inputs=(str(path),), prompt_column="caption\xa0", id_column="image_id ",
                                keep_columns=("URL",)))
    assert plan.file_rows == {str(path): 1}


def test_one_shard_whose_header_differs_in_case_is_pointed_out_in_the_warning(tmp_path):
    """One shard of a set written with 'Caption' (another exporter): its rows are rejected as missing_prompt_column
    and the warning listed its columns; with a trailing space ('caption ') the list read as if it had the column."""
    from audit.pipeline import build_plan
    from audit.runner import missing_column_note

    pq.write_table(pa.table({"caption": ["a cat"], "image_id": [1]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"caption ": ["a dog", "a hat"], "image_id": [2, 3]}), tmp_path / "b.parquet")
    plan = build_plan(RunConfig(inputs=(str(tmp_path),), prompt_column="caption"))
    assert missing_column_note(plan, "caption") == (
        f"1 of 2 input files has no column 'caption', so its 2 rows are rejected as missing_prompt_column; the first: "
        f"{tmp_path / 'b.parquet'} (columns: caption , image_id). The column 'caption ' differs from 'caption' only "
        f"in spaces or case: give the name exactly as the file has it (quoted), or fix the header.")
    pq.write_table(pa.table({"text": ["a dog"]}), tmp_path / "b.parquet")  # no near name: the line as before
    plan = build_plan(RunConfig(inputs=(str(tmp_path),), prompt_column="caption"))
    assert missing_column_note(plan, "caption").endswith(f"the first: {tmp_path / 'b.parquet'} (columns: text)")


def test_mutants_of_the_notes(tmp_path):
    """Pins the parts of the notes above that their scenario tests leave free: a .txt file's lines lack any
    --id-column whatever --prompt-column says (its lines are the prompts), a key=value in a file's own name is no
    partition folder, and a name compared loosely is compatibility-normalized (a fullwidth 'ＵＲＬ')."""
    from audit.pipeline import build_plan
    from audit.runner import missing_id_column_note
    from audit.sources import _partition_note, near_name_note

    (tmp_path / "a.txt").write_text("a red cat\na dog\n")
    pq.write_table(pa.table({"caption": ["x"], "uid": ["1"]}), tmp_path / "b.parquet")
    plan = build_plan(RunConfig(inputs=(str(tmp_path / "a.txt"), str(tmp_path / "b.parquet")), prompt_column="caption",
                                id_column="uid"))
    assert missing_id_column_note(plan, "uid", "caption") == (
        f"1 of 2 input files has no column 'uid', so its 2 rows are rejected as missing_id_column; the first: "
        f"{tmp_path / 'a.txt'} (columns: prompt)")
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "lang=en.parquet")
    files = build_plan(RunConfig(inputs=(str(tmp_path / "lang=en.parquet"),), prompt_column="caption")).files
    assert _partition_note(["lang"], files) == ""
    assert near_name_note(["url"], ["\uff35\uff32\uff2c"]).startswith(" The column 'ＵＲＬ' differs from 'url'")


def test_a_skipped_data_file_is_named_before_spark_markers(tmp_path):
    """A Spark caption folder (_SUCCESS, a .crc beside each part) with one extra .json export: the warning named
    the first five skipped files, all markers, and hid the one file holding captions as 'and 28 more'."""
    from audit.cli import skipped_line
    from audit.sources import discover

    shards = tmp_path / "source=laion"
    shards.mkdir()
    for i in range(6):
        pq.write_table(pa.table({"caption": [f"c{i}"]}), shards / f"part-{i:05d}.snappy.parquet")
        (shards / f".part-{i:05d}.snappy.parquet.crc").write_bytes(b"")
    (tmp_path / "_SUCCESS").write_bytes(b"")
    (shards / "zz-extra.json").write_text('{"caption": "extra"}\n')
    files, skipped = discover([str(tmp_path)])
    assert len(files) == 6 and len(skipped) == 8
    line = skipped_line(skipped)
    assert line.startswith(f"memaudit: warning: 8 input files skipped, not read (manifest.json skipped_files): "
                           f"{shards / 'zz-extra.json'} (unsupported extension .json); ")
    assert line.endswith("; and 3 more") and line.count("(marker or hidden file)") == 4
    # nothing readable at all: the refusal names the data file first too
    for p in shards.glob("*.parquet"):
        p.unlink()
    with pytest.raises(SourceError) as err:
        discover([str(tmp_path)])
    assert str(err.value).startswith(f"no readable prompt file in {tmp_path}: {shards / 'zz-extra.json'} "
                                     "(unsupported extension .json); ")


def test_a_json_lines_export_without_the_caption_key_is_warned_about(tmp_path, tiny_model_dir):
    """A gzipped JSON-lines export whose key is 'text' beside caption shards: its 30 rows were rejected as
    missing_prompt_column with no warning naming it (a Parquet shard without the column gets one), and with
    --id-column the id warning alone named it, as if its rows lacked the id."""
    import gzip
    import json

    pq.write_table(pa.table({"caption": [f"cap {i}" for i in range(100)], "image_id": list(range(100))}),
                   tmp_path / "a.parquet")
    export = tmp_path / "b.jsonl.gz"
    export.write_bytes(gzip.compress("".join(json.dumps({"text": f"t {i}", "image_id": 100 + i}) + "\n"
                                             for i in range(30)).encode()))
    cfg = RunConfig(inputs=(str(tmp_path / "a.parquet"), str(export)), model=str(tiny_model_dir),
                    out=str(tmp_path / "run"), device="cpu", prompt_column="caption", id_column="image_id",
                    max_error_fraction=1.0)
    logs: list[str] = []
    _, manifest = execute(cfg, progress=False, log=logs.append)
    assert manifest["counts"]["rejected_by_reason"] == {"missing_prompt_column": 30}
    assert [m for m in logs if "has no column" in m] == [
        f"memaudit: warning: 1 of 2 input files has no column 'caption', so its 30 rows are rejected as "
        f"missing_prompt_column (or as invalid_json, invalid_utf8 or prompt_not_string, a JSON line that is that first); the first: {export} (columns: text, image_id)"]


def test_a_nan_or_infinite_id_is_a_null_id(tmp_path, tiny_model_dir):
    """A float id column holding NaN (numpy or polars write it, not null) gave prompt_id 'nan' (and 'NaN' from a
    JSON line's NaN token), an id that joins no manifest row: such a row is rejected as null_id, as a null id is."""
    pq.write_table(pa.table({"caption": ["a cat", "a dog", "a hat", "a mat"],
                             "image_id": pa.array([3.0, float("nan"), float("inf"), None], pa.float64())}),
                   tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"caption": "j cat", "image_id": NaN}\n{"caption": "j dog", "image_id": '
                                      '-Infinity}\n{"caption": "j hat", "image_id": 7}\n')
    risk, rejects, manifest = _run(tmp_path, tiny_model_dir, [tmp_path / "a.parquet", tmp_path / "b.jsonl"],
                                   prompt_column="caption", id_column="image_id")
    assert sorted(risk["prompt_id"]) == ["3.0", "7"]
    assert manifest["counts"]["rejected_by_reason"] == {"null_id": 5}
    assert sorted(rejects["prompt"]) == ["a dog", "a hat", "a mat", "j cat", "j dog"]
