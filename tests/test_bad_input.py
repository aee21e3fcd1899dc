"""Bad input never costs a run, and nothing is skipped or failed silently (issue 15): every reproduction of
the issue, each ending with every input row in exactly one of risk.parquet or rejects.parquet."""

from __future__ import annotations

import bz2
import gzip
import json
import os

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import audit
from audit.pipeline import RunConfig
from audit.runner import execute
from helpers import fail_batches_with

BAD = b"he\xffllo"


def run_warnings(tmp_path, tiny_model_dir, inputs, **kw) -> tuple[dict, list[str]]:
    """The manifest of a run over ``inputs`` (into tmp_path/run) and the warning lines it logged."""
    cfg = RunConfig(inputs=tuple(str(i) for i in inputs), model=str(tiny_model_dir), out=str(tmp_path / "run"),
                    device="cpu", **kw)
    logs: list[str] = []
    _, manifest = execute(cfg, progress=False, log=logs.append)
    return manifest, [m for m in logs if "warning" in m]


def run(tmp_path, tiny_model_dir, inputs, name="run", **kw):
    cfg = RunConfig(inputs=tuple(str(i) for i in inputs), model=str(tiny_model_dir), out=str(tmp_path / name),
                    device="cpu", **kw)
    logs: list[str] = []
    out, manifest = execute(cfg, progress=False, log=logs.append)
    risk, rejects = pl.read_parquet(out / "risk.parquet"), pl.read_parquet(out / "rejects.parquet")
    reconcile(risk, rejects, manifest)
    return risk, rejects, manifest


def reconcile(risk, rejects, manifest, read=None):
    """Every row read is in exactly one of the two tables, and the manifest counts agree with them."""
    c = manifest["counts"]
    assert c["rows_read"] == c["scored"] + c["rejected"]
    assert c["scored"] == risk.height and c["rejected"] == rejects.height
    if read is not None:
        assert c["rows_read"] == read
    keys = list(zip(risk["source"], risk["row"])) + list(zip(rejects["source"], rejects["row"]))
    assert len(keys) == len(set(keys))  # no row in both, none twice
    by_reason = rejects.group_by("reason").len()
    assert dict(zip(by_reason["reason"], by_reason["len"])) == c["rejected_by_reason"]


def _bad_strings(type_):
    arr = pa.array([b"a red apple", BAD, b"a blue car", None], pa.binary()).view(pa.string())
    if type_ == "large_string":
        return arr.cast(pa.large_string())
    if type_ == "dictionary":
        return arr.dictionary_encode()
    if type_ == "binary":  # Spark and Hive write strings as BYTE_ARRAY without the UTF-8 annotation
        return arr.view(pa.binary())
    if type_ == "large_binary_dictionary":
        return arr.view(pa.binary()).cast(pa.large_binary()).dictionary_encode()
    return arr


@pytest.mark.parametrize("type_", ["string", "large_string", "dictionary", "binary", "large_binary_dictionary"])
def test_invalid_utf8_in_a_parquet_prompt_rejects_that_row_only(tmp_path, tiny_model_dir, type_):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": _bad_strings(type_)}), path)
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path])
    reconcile(risk, rejects, manifest, 4)
    assert sorted(risk["prompt"]) == ["a blue car", "a red apple"]
    assert dict(zip(rejects["row"], rejects["reason"])) == {1: "invalid_utf8", 3: "null_prompt"}
    bad = rejects.filter(pl.col("row") == 1).row(0, named=True)
    assert bad["source"] == str(path) and bad["prompt"] == "he\\xffllo"  # the file, the row, the text escaped


def test_invalid_utf8_in_an_id_column_rejects_that_row_only(tmp_path, tiny_model_dir):
    path = tmp_path / "ids.parquet"
    ids = pa.array([b"k0", BAD, b"k2"], pa.binary()).view(pa.string()).dictionary_encode()
    pq.write_table(pa.table({"prompt": ["one cat", "two cats", "three cats"], "key": ids,
                             "user": pa.array([b"u0", b"u\xff", b"u2"], pa.binary()).view(pa.string())}), path)
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path], id_column="key", keep_columns=("user",))
    reconcile(risk, rejects, manifest, 3)
    assert sorted(risk["prompt_id"]) == ["k0", "k2"]
    assert rejects["reason"].to_list() == ["invalid_utf8"] and rejects["row"].to_list() == [1]
    assert rejects["user"].to_list() == ["u\\xff"]  # a kept column is carried, its bad bytes escaped


def test_invalid_utf8_in_csv_quoted_and_unquoted_fields(tmp_path, tiny_model_dir):
    path = tmp_path / "x.csv"
    path.write_bytes(b'id,prompt\na,good one\nb,bad \xff byte\nc,"quoted \xff, field"\nd,"fine, quoted"\n'
                     b'e\xff,an ok prompt with a bad id\n')
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path], id_column="id")
    reconcile(risk, rejects, manifest, 5)
    assert sorted(risk["prompt"]) == ["fine, quoted", "good one"]
    assert dict(zip(rejects["row"], rejects["reason"])) == {1: "invalid_utf8", 2: "invalid_utf8", 4: "invalid_utf8"}


def test_skip_bad_files_with_a_bad_byte_keeps_every_good_row(tmp_path, tiny_model_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": [f"good prompt {i}" for i in range(500)]}), folder / "a-good.parquet")
    pq.write_table(pa.table({"prompt": pa.array([b"ok", BAD], pa.binary()).view(pa.string())}),
                   folder / "b-bad-byte.parquet")
    (folder / "c-corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    (folder / "d.csv").write_bytes(b"prompt\ngood one\nbad \xff byte\n")
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [folder], skip_bad_files=True, unit_rows=200)
    reconcile(risk, rejects, manifest, 504)
    assert risk.height == 502 and rejects["reason"].to_list() == ["invalid_utf8", "invalid_utf8"]
    assert [s["path"] for s in manifest["skipped_files"]] == [str(folder / "c-corrupt.parquet")]


def test_txt_and_jsonl_invalid_utf8_keep_the_escaped_text(tmp_path, tiny_model_dir):
    (tmp_path / "p.txt").write_bytes(b"a cat\nbad \xff cat\n")
    (tmp_path / "p.jsonl").write_bytes(b'{"prompt": "a dog"}\n{"prompt": "bad \xff dog"}\n')
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [tmp_path / "p.txt", tmp_path / "p.jsonl"])
    reconcile(risk, rejects, manifest, 4)
    assert sorted(rejects["prompt"]) == ['bad \\xff cat', '{"prompt": "bad \\xff dog"}']


# ---------------------------------------------------------------- 2. byte-order marks

def test_a_leading_bom_is_stripped_in_every_text_reader(tmp_path, tiny_model_dir):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.txt").write_bytes(bom + b"a red apple on a table\nsecond\n")
    (tmp_path / "b.jsonl").write_bytes(bom + b'{"prompt": "a red apple on a table"}\n')
    (tmp_path / "c.csv").write_bytes(bom + b"prompt\na red apple on a table\n")
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [tmp_path / n for n in ("a.txt", "b.jsonl", "c.csv")])
    reconcile(risk, rejects, manifest, 4)
    assert rejects.height == 0
    apples = risk.filter(pl.col("row") == 0)
    assert apples["prompt"].to_list() == ["a red apple on a table"] * 3
    assert apples["risk"].n_unique() == 1 and apples["n_tokens"].n_unique() == 1
    assert manifest["counts"]["unique_prompts"] == 2


# ---------------------------------------------------------------- 3. compressed inputs, skipped files said

def test_compressed_inputs_are_read(tmp_path, tiny_model_dir):
    zstandard = pytest.importorskip("zstandard", reason="zstandard is a dependency (pyproject.toml)")
    folder = tmp_path / "in"
    folder.mkdir()
    lines = "".join(json.dumps({"prompt": f"a prompt number {i}"}) + "\n" for i in range(30)).encode()
    (folder / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (folder / "b.txt.bz2").write_bytes(bz2.compress(b"".join(b"line %d\n" % i for i in range(7))))
    (folder / "c.csv.zst").write_bytes(zstandard.ZstdCompressor().compress(b"prompt\none\ntwo\n"))
    (folder / "d.parquet.gz").write_bytes(gzip.compress(b"not read"))
    # zstandard's reader neither iterates by lines nor seeks: TXT and JSONL units after the first start mid-stream
    (folder / "e.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(b"zst %d\n" % i for i in range(20))))
    (folder / "f.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines[:200]))
    n_f = lines[:200].count(b"\n") + 1  # the last line cut mid-object: an invalid_json reject
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [folder], unit_rows=8)
    reconcile(risk, rejects, manifest, 39 + 20 + n_f)
    assert rejects["reason"].to_list() == ["invalid_json"]
    assert sorted(risk.filter(pl.col("source").str.ends_with("a.jsonl.gz"))["row"]) == list(range(30))
    assert sorted(risk.filter(pl.col("source").str.ends_with("e.txt.zst"))["prompt"]) == sorted(f"zst {i}" for i in range(20))
    assert [s["path"] for s in manifest["skipped_files"]] == [str(folder / "d.parquet.gz")]


def test_skipped_files_are_said_on_the_console_and_in_every_report(tmp_path, tiny_model_dir):
    from rich.console import Console
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.report import write_report

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text("one\ntwo\nthree\nfour\n")
    (folder / "notes.docx").write_bytes(b"x")
    (folder / "broken.parquet").write_bytes(b"PAR1 not parquet")
    res = CliRunner().invoke(app, ["run", str(folder), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"),
                                   "--skip-bad-files", "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "4 rows read" in res.output
    line = next(ln for ln in res.output.splitlines() if "skipped" in ln)
    assert "2 input files skipped" in line and "broken.parquet" in line and "notes.docx" in line
    run_dir = tmp_path / "r"
    reconcile(pl.read_parquet(run_dir / "risk.parquet"), pl.read_parquet(run_dir / "rejects.parquet"),
              json.loads((run_dir / "manifest.json").read_text()), 4)
    console = Console(record=True, width=200)
    write_report(run_dir, "terminal", console=console)
    md = write_report(run_dir, "md").read_text()
    html = write_report(run_dir, "html").read_text()
    for text in (console.export_text(), md, html):
        assert "Skipped files: 2" in text and "broken.parquet" in text and "notes.docx" in text, text[:300]


# ---------------------------------------------------------------- 4. a model that cannot score is not a clean audit

@pytest.fixture
def two_bad_of_100(tmp_path, monkeypatch):
    """A 100-line prompt file whose 2 prompts containing "bad" break the model (as an unsupported layout breaks
    every prompt): Scorer.launch raises on their batches."""
    fail_batches_with(monkeypatch, "bad", ValueError("mat1 and mat2 shapes cannot be multiplied"))
    src = tmp_path / "p.txt"
    src.write_text("".join(f"good prompt {i}\n" for i in range(98)) + "a bad one\nanother bad one\n")
    return src


def test_scoring_errors_above_the_fraction_exit_non_zero_after_writing(tmp_path, tiny_model_dir, two_bad_of_100):
    from typer.testing import CliRunner

    from audit.cli import app

    src = two_bad_of_100
    args = ["run", str(src), "--model", str(tiny_model_dir), "--no-progress", "--device", "cpu", "--batch-size", "8"]
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "r1")])
    assert res.exit_code == 4, res.output
    assert "2 of 100 rows (2.0%) could not be scored (scoring_error 2)" in res.output
    assert "--max-error-fraction 0.01" in res.output and "mat1 and mat2" in res.output
    run_dir = tmp_path / "r1"
    manifest = json.loads((run_dir / "manifest.json").read_text())  # written before the exit
    reconcile(pl.read_parquet(run_dir / "risk.parquet"), pl.read_parquet(run_dir / "rejects.parquet"), manifest, 100)
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "r2"), "--max-error-fraction", "0.05"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "r3"), "--max-error-fraction", "2"])
    assert res.exit_code == 2 and "--max-error-fraction 2.0: give a fraction" in res.output


def test_python_api_run_raises_after_writing_when_scoring_errors_exceed_the_fraction(tmp_path, tiny_model_dir,
                                                                                       two_bad_of_100):
    import audit
    from audit.errors import ScoringFailedError

    src = two_bad_of_100
    opts = dict(model=str(tiny_model_dir), device="cpu", batch_size=8, log=lambda m: None)
    with pytest.raises(ScoringFailedError, match=r"2 of 100 rows \(2.0%\) could not be scored") as exc:
        audit.run(str(src), out=tmp_path / "r1", **opts)
    assert exc.value.manifest["counts"]["scored"] == 98 and exc.value.out == tmp_path / "r1"
    reconcile(pl.read_parquet(tmp_path / "r1" / "risk.parquet"), pl.read_parquet(tmp_path / "r1" / "rejects.parquet"),
              exc.value.manifest, 100)  # written before the error
    _, manifest = audit.run(str(src), out=tmp_path / "r2", max_error_fraction=0.05, **opts)
    assert manifest["counts"]["rejected_by_reason"] == {"scoring_error": 2}
    # audit.score's run folder is temporary: the error carries the rows, and its message names no folder
    prompts = src.read_text().splitlines()
    opts.pop("log")
    with pytest.raises(ScoringFailedError, match=r"2 of 100 rows .*\. The error's \.frame holds every prompt") as exc:
        audit.score(prompts, **opts)
    frame = exc.value.frame
    assert "memaudit-score-" not in str(exc.value) and exc.value.out is None
    assert frame["row"].to_list() == list(range(100)) and frame["risk"].null_count() == 2
    assert frame.filter(pl.col("reason") == "scoring_error")["row"].to_list() == [98, 99]


# ---------------------------------------------------------------- 7. rejects.parquet and the manifest agree

def test_reject_reasons_are_the_names_the_manifest_counts(tmp_path, tiny_model_dir):
    pq.write_table(pa.table({"prompt": pa.array([1, 2], pa.int64())}), tmp_path / "ints.parquet")
    (tmp_path / "p.jsonl").write_text('{"prompt": 5}\n{"prompt": "fine"}\n{"prompt": null}\n')
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [tmp_path / "ints.parquet", tmp_path / "p.jsonl"])
    reconcile(risk, rejects, manifest, 5)
    assert manifest["counts"]["rejected_by_reason"] == {"prompt_not_string": 3, "null_prompt": 1}
    assert rejects["reason"].to_list() == ["prompt_not_string"] * 3 + ["null_prompt"]  # JSON null: a null prompt,
    assert rejects["detail"].to_list() == ["int64", "int64", "int", None]  # as a Parquet null, not a NoneType


# ---------------------------------------------------------------- 5. tokenizer identity recorded and compared

def test_tokenizer_identity_in_manifest_and_metadata_and_diff_and_calibration_warn(tmp_path, tiny_model_dir):
    from audit.calibrate import calibrate, write_calibration
    from audit.diff import diff_runs

    src = tmp_path / "p.txt"
    src.write_text("".join(f"an ordinary prompt {i}\n" for i in range(12)))
    _, _, manifest = run(tmp_path, tiny_model_dir, [src], name="a")
    tok = manifest["model"]["tokenizer"]
    assert tok["class"].startswith("CLIPTokenizer") and isinstance(tok["fast"], bool)
    assert len(tok["files_sha256"]) == 16 and isinstance(tok["ftfy"], bool)
    meta = pq.read_schema(tmp_path / "a" / "risk.parquet").metadata
    assert json.loads(meta[b"memaudit.model"])["tokenizer"] == tok
    _, _, manifest_b = run(tmp_path, tiny_model_dir, [src], name="b")
    assert manifest_b["model"]["tokenizer"] == tok
    assert not any("tokenized" in w for w in diff_runs(tmp_path / "a", tmp_path / "b").warnings)
    # the same files under another implementation: the slow tokenizer, as when `tokenizers` is missing
    path = tmp_path / "b" / "manifest.json"
    manifest_b["model"]["tokenizer"] = tok | {"fast": not tok["fast"]}
    path.write_text(json.dumps(manifest_b))
    warnings = diff_runs(tmp_path / "a", tmp_path / "b").warnings
    assert any("tokenized differently" in w and "fast" in w for w in warnings), warnings
    cal = calibrate(tmp_path / "b", 0.1)
    write_calibration(cal, tmp_path / "cal.json")
    logs: list[str] = []
    cfg = RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(tmp_path / "c"), device="cpu",
                    calibration=str(tmp_path / "cal.json"))
    execute(cfg, progress=False, log=logs.append)
    assert any("calibration and this run tokenized differently" in m for m in logs), logs


# ---------------------------------------------------------------- 6. the raw text of a normalized prompt is kept

def test_raw_text_kept_when_it_differs_from_the_normalized_prompt(tmp_path, tiny_model_dir):
    import unicodedata

    nfc = "café crème"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfd != nfc
    pq.write_table(pa.table({"prompt": [nfc, nfd, f"  {nfc} ", "plain"]}), tmp_path / "p.parquet")
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [tmp_path / "p.parquet"])
    reconcile(risk, rejects, manifest, 4)
    by_row = {r["row"]: r for r in risk.iter_rows(named=True)}
    assert [by_row[i]["prompt"] for i in range(3)] == [nfc] * 3
    assert [by_row[i]["prompt_raw"] for i in range(4)] == [None, nfd, f"  {nfc} ", None]
    assert manifest["counts"]["unique_prompts"] == 2  # still scored once
    from audit.tables import load_schema

    assert "prompt_raw" in [f["name"] for f in load_schema("risk")["fields"]]


# ---------------------------------------------------------------- 7. figures and messages

def test_throughput_after_a_resume_counts_only_this_invocations_rows(tmp_path, tiny_model_dir):
    src = tmp_path / "p.txt"
    src.write_text("".join(f"prompt {i}\n" for i in range(12)))
    _, _, first = run(tmp_path, tiny_model_dir, [src], unit_rows=4)
    assert first["rows_this_run"] == 12 and first["throughput_rows_per_s"] > 0
    done = sorted((tmp_path / "run" / "shards").glob("*.done.json"))
    done[-1].unlink()  # the last unit as if killed: it is scored again, the other two are resumed
    _, _, again = run(tmp_path, tiny_model_dir, [src], unit_rows=4)
    assert again["units"]["resumed"] == 2 and again["rows_this_run"] == 4
    assert again["throughput_rows_per_s"] == pytest.approx(4 / again["wall_time_s"], rel=0.05, abs=0.05)
    _, _, nothing = run(tmp_path, tiny_model_dir, [src], unit_rows=4)  # all resumed: nothing scored, 0 rows/s
    assert nothing["rows_this_run"] == 0 and nothing["throughput_rows_per_s"] == 0.0


def test_refusal_of_a_changed_rerun_names_each_difference_readably(tmp_path, tiny_model_dir):
    from audit.errors import RunError

    folder = tmp_path / "logs"
    (folder / "date=2026-12-01").mkdir(parents=True)
    (folder / "date=2026-12-01" / "a.txt").write_text("one\ntwo\n")
    run(tmp_path, tiny_model_dir, [folder])
    (folder / "date=2026-12-02").mkdir()
    (folder / "date=2026-12-02" / "b.txt").write_text("three\n")
    with pytest.raises(RunError) as err:
        run(tmp_path, tiny_model_dir, [folder])
    msg = str(err.value)
    assert f"new input file {folder / 'date=2026-12-02' / 'b.txt'};" not in msg  # one clause, then the advice
    assert f"new input file {folder / 'date=2026-12-02' / 'b.txt'}." in msg and "files." not in msg
    assert "--out 'runs/{date}-{time}'" in msg and "--cache" in msg
    with pytest.raises(RunError) as err:
        run(tmp_path, tiny_model_dir, [folder / "date=2026-12-01"], seed=3)
    msg = str(err.value)
    assert "inputs: [" in msg and "score_config.seed: 0 -> 3" in msg and "Choose another --out" in msg


def test_layers_help_names_no_sd_v1_layer():
    from typer.testing import CliRunner

    from audit.cli import app

    res = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert "down_blocks.1.attentions.1" not in res.output and "memaudit layers" in res.output


def test_scorer_help_names_every_registered_scorer():
    """``--scorer``'s help is written by hand (the CLI imports no scorer module): it must name them all."""
    from typer.testing import CliRunner

    import audit.scorers  # noqa: F401 (registers every scorer)
    from audit.cli import app
    from audit.scorers.registry import SCORERS

    res = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0
    assert len(SCORERS) >= 4 and all(name in res.output for name in SCORERS), sorted(SCORERS)


def test_run_help_lists_outputs_and_exit_codes_one_per_line():
    """rich keeps a docstring's line breaks after its first paragraph: wrapped source lines came out ragged."""
    from typer.testing import CliRunner

    from audit.cli import app

    res = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    lines = [line.strip() for line in res.output.splitlines()]
    for start in ("risk.parquet: one row per scored input row", "rejects.parquet: every row not scored",
                  "manifest.json: counts that reconcile", "0 done;", "2 an error said in one line",
                  "3 more rows flagged than --fail-on-flagged", "4 too many rows failed to score",
                  "130, 143, 129 interrupted, terminated, hung up", "1 anything unexpected"):
        assert any(line.startswith(start) for line in lines), (start, res.output[:1500])


# ---------------------------------------------------------------- 8. scheduled audits

def test_out_template_expands_the_utc_date_and_time(tmp_path):
    import datetime as dt

    from audit.runner import expand_out

    now = dt.datetime(2026, 12, 3, 7, 5, 9, tzinfo=dt.timezone.utc)
    assert expand_out("runs/{date}", now) == "runs/2026-12-03"
    assert expand_out("runs/{date}-{time}", now) == "runs/2026-12-03-070509"
    assert expand_out("runs/plain") == "runs/plain"
    assert expand_out("runs/{{a}}-{date}", now) == "runs/{a}-2026-12-03"  # {{ }}: a brace in the name


@pytest.mark.parametrize("out, near", [("runs/T-{Date}", "runs/T-{Date}"), ("runs/{date", "runs/{date"),
                                       ("nightly/runs/{config_dir}/x", "ly/runs/{config_d"), ("a}b", "a}b")])
def test_an_out_brace_that_is_no_field_is_refused_before_any_work(tmp_path, monkeypatch, out, near):
    """`--out 'runs/T-{Date}'` and `--out 'runs/{date'` made folders of those names, exit 0: a typo in a cron line
    then gave every night the same folder, each run resuming the last. A brace that is not {date}, {time}, {{ or }}
    is refused in one line before any work, the CLI's exit 2."""
    from typer.testing import CliRunner

    from audit.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a red cat\n")
    res = CliRunner().invoke(app, ["run", "p.txt", "--out", out, "--no-progress"])
    assert res.exit_code == 2 and res.stderr == (
        f"memaudit: error: --out {out}: a brace that is not {{date}} or {{time}} (near '{near}'); --out expands {{date}} "
        "and {time} (UTC), and {{ and }} are a brace in the folder's name\n"), res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]  # no folder made


def test_shipped_pipelines_run_as_shipped_on_the_lab_model(tmp_path, monkeypatch):
    """The nightly config as shipped with --model lab only: night 1, then a new partition the same day is
    refused with the way forward, which then works and scores only the new prompts."""
    import datetime as dt
    from pathlib import Path

    from typer.testing import CliRunner

    from audit.calibrate import calibrate, write_calibration
    from audit.cli import app

    pipelines = Path(__file__).resolve().parents[1] / "pipelines"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "audits").mkdir()
    (tmp_path / "ref.txt").write_text("".join(f"an ordinary photo of a thing {i}\n" for i in range(20)))
    res = CliRunner().invoke(app, ["run", "ref.txt", "--model", "lab", "--out", "ref", "--no-progress"])
    assert res.exit_code == 0, res.output
    write_calibration(calibrate(tmp_path / "ref", 0.05), tmp_path / "audits" / "calibration.json")
    day = tmp_path / "prompt-logs" / "date=2026-12-02"
    day.mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["a red apple", "a blue car", "a dog"], "user_id": ["u1", "u2", "u1"],
                             "app": ["web"] * 3}), day / "part-0.parquet")
    nightly = ["run", "--config", str(pipelines / "nightly-prompt-log.toml"), "--model", "lab", "--no-progress"]
    res = CliRunner().invoke(app, nightly)
    assert res.exit_code == 0, res.output
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    first = json.loads((tmp_path / "audits" / "nightly" / today / "manifest.json").read_text())
    assert first["counts"]["scored"] == 3
    day2 = tmp_path / "prompt-logs" / "date=2026-12-03"
    day2.mkdir()
    pq.write_table(pa.table({"prompt": ["a green tree", "a red apple"], "user_id": ["u3", "u1"], "app": ["web"] * 2}),
                   day2 / "part-0.parquet")
    res = CliRunner().invoke(app, nightly)  # the same night, a new partition: refused, saying how to proceed
    assert res.exit_code == 2 and "new input file" in res.output and "{date}-{time}" in res.output
    res = CliRunner().invoke(app, nightly + ["--out", "audits/nightly/{date}-{time}"])
    assert res.exit_code == 0, res.output
    second = json.loads((Path(res.stdout.strip().splitlines()[-1]) / "manifest.json").read_text())
    assert second["counts"]["scored"] == 5 and second["cache"]["scored"] == 1  # only "a green tree" scored
    for config, data in (("training-captions.toml", "captions"), ("pre-release.toml", "screening")):
        (tmp_path / data).mkdir()
    pq.write_table(pa.table({"caption": ["a cat", "a cat", "a hat"], "key": ["k0", "k1", "k2"], "shard": ["s"] * 3,
                             "url": ["u"] * 3}), tmp_path / "captions" / "shard-0.parquet")
    pq.write_table(pa.table({"prompt": ["a photo of a lake", "a painting"]}), tmp_path / "screening" / "prompts.parquet")
    write_calibration(calibrate(tmp_path / "ref", 0.05), tmp_path / "audits" / "calibration-candidate.json")
    for config in ("training-captions.toml", "pre-release.toml"):
        res = CliRunner().invoke(app, ["run", "--config", str(pipelines / config), "--model", "lab", "--no-progress"])
        assert res.exit_code == 0, (config, res.output)


def test_units_are_sized_so_that_every_worker_gets_work_and_a_rerun_keeps_its_units(tmp_path):
    from audit.config import RunConfig as Cfg
    from audit.pipeline import build_plan
    from audit.runner import _units_for_workers

    src = tmp_path / "p.txt"
    src.write_text("".join(f"p{i}\n" for i in range(5)))

    class FourWorkers:
        @staticmethod
        def worker_count(cfg):
            return 4

    logs: list[str] = []
    cfg = Cfg(inputs=(str(src),), unit_rows=20_000)
    cfg2, plan = _units_for_workers(cfg, build_plan(cfg), FourWorkers, logs.append)
    assert cfg2.unit_rows == 2 and [u.rows for u in plan.units] == [2, 2, 1] and "every worker" in logs[0]
    cfg3, plan3 = _units_for_workers(cfg2, build_plan(cfg2), FourWorkers, logs.append)  # a rerun: same units
    assert cfg3 == cfg2 and plan3.units == plan.units
    big = Cfg(inputs=(str(src),), unit_rows=1)  # enough units already: unchanged
    assert _units_for_workers(big, build_plan(big), FourWorkers, logs.append)[0] is big
    two_files = tmp_path / "q.txt"
    two_files.write_text("q0\nq1\n")
    many = Cfg(inputs=(str(src), str(two_files)), unit_rows=4)  # 3 units for 4 workers: split further
    assert _units_for_workers(many, build_plan(many), FourWorkers, logs.append)[0].unit_rows == 2
    spread = Cfg(inputs=(str(src), str(two_files)), unit_rows=2)  # 4 units for 4 workers already: unchanged
    assert _units_for_workers(spread, build_plan(spread), FourWorkers, logs.append)[0] is spread
    local = object()  # an engine without workers of its own (local): unchanged
    assert _units_for_workers(cfg, build_plan(cfg), local, logs.append)[0] is cfg
    # a run folder cut in units of 20,000 (5 rows in one unit) resumes with those units, whatever the workers now:
    # re-split into units of 2, every row would be scored again
    whole = build_plan(cfg)
    got, got_plan = _units_for_workers(cfg, whole, FourWorkers, logs.append, {"unit_rows": 20_000})
    assert got is cfg and got_plan is whole and [u.rows for u in whole.units] == [5]


def test_ray_run_prints_only_our_lines_and_every_worker_gets_a_unit(tmp_path):
    """A new user's Ray run (a local Ray started by memaudit): no token-auth notice, no Ray Data warnings."""
    import os
    import subprocess
    import sys

    pytest.importorskip("ray")
    src = tmp_path / "three.txt"
    src.write_text("a red apple\na blue car\na dog\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([sys.executable, "-m", "audit.cli", "run", str(src), "--model", "lab", "--engine", "ray",
                           "--workers", "2", "--out", str(tmp_path / "r"), "--no-progress", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr
    for noise in ("Token authentication", "UserWarning", "warnings.warn", "Progress bars disabled", "Traceback"):
        assert noise not in proc.stderr, proc.stderr
    assert "units of 2 rows" in proc.stderr and "2 unit(s)" in proc.stderr
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["units"]["total"] == 2 and manifest["counts"]["scored"] == 3


def test_output_folders_inside_an_input_folder_are_not_read_as_prompts(tmp_path, tiny_model_dir):
    """`memaudit run data/ --out data/run1` then `--out data/run2`: the second run read run1's risk, rejects and
    shard tables as prompts (the counts tripled) and made run1 unresumable. Output folders are skipped, named;
    a user's own run.json (not memaudit's keys) is not taken for one."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "p.txt").write_text("a red cat\nold boat\n")
    (data / "mine").mkdir()
    (data / "mine" / "run.json").write_text('{"experiment": 1}')
    (data / "mine" / "q.txt").write_text("blue sky\n")
    reconcile(*run(tmp_path, tiny_model_dir, [data], name="data/run1"), read=3)
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [data], name="data/run2")
    reconcile(risk, rejects, manifest, read=3)
    assert {s["path"]: s["reason"] for s in manifest["skipped_files"]} == {
        str(data / "run1"): "a memaudit output folder", str(data / "mine" / "run.json"): "unsupported extension .json"}
    again = run(tmp_path, tiny_model_dir, [data], name="data/run1")[2]  # run1 still resumes
    assert again["units"]["resumed"] == again["units"]["total"] and again["counts"]["rows_read"] == 3


def _touch(root, *names, text=""):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


RUN_ID = json.dumps({"schema_version": 1, "model_fingerprint": "f", "score_config": {}})


def test_a_glob_skips_earlier_outputs_and_the_hidden_folders_a_wildcard_matched(tmp_path):
    """`memaudit run 'data/**/*.parquet'` read an earlier run's risk, rejects and shard tables (and a score cache's
    parts, and a writer's _temporary/) as prompts, which a folder input never did: 40 prompts became 120 rows.
    A glob now leaves out what a folder input leaves out; a hidden folder the pattern names itself is read."""
    from audit.errors import SourceError
    from audit.sources import discover

    data = tmp_path / "data"
    _touch(data, "p.parquet", "_temporary/c.parquet", ".hid/h.parquet", "_staging/s.parquet", "mine/q.parquet",
           "run1/risk.parquet", "run1/rejects.parquet", "run1/shards/unit-000000.risk.parquet",
           "cache/f-k/part-0-0123456789ab.parquet", "spark/part-00000-1b2c3d4e-c000.snappy.parquet")
    _touch(data, "run1/run.json", text=RUN_ID)
    _touch(data, "mine/run.json", text='{"experiment": 1}')  # a user's own run.json: not memaudit's
    _touch(data, "cache/f-k/key.json", text=json.dumps({"model_fingerprint": "f", "score_config": {}}))
    files, skipped = discover([f"{data}/**/*.parquet"])
    assert [f.url for f in files] == [str(data / "mine" / "q.parquet"), str(data / "p.parquet"),
                                      str(data / "spark" / "part-00000-1b2c3d4e-c000.snappy.parquet")]
    assert sorted((s["path"], s["reason"]) for s in skipped) == sorted([
        (str(data / ".hid"), "hidden or marker folder"), (str(data / "_staging"), "hidden or marker folder"),
        (str(data / "_temporary"), "hidden or marker folder"), (str(data / "run1"), "a memaudit output folder"),
        (str(data / "cache" / "f-k"), "a memaudit output folder")])
    files, _ = discover([f"{data}/_staging/*.parquet", f"{data}/*.parquet"])  # named in the pattern: read
    assert [f.url for f in files] == [str(data / "_staging" / "s.parquet"), str(data / "p.parquet")]
    with pytest.raises(SourceError, match="no readable prompt file"):
        discover([f"{data}/run1/*.parquet"])  # the glob's own folder is a run folder: as `memaudit run data/run1`
    assert [f.url for f in discover([str(data / "run1" / "risk.parquet")])[0]] == [str(data / "run1" / "risk.parquet")]


def test_a_damaged_earlier_run_or_cache_inside_an_input_folder_is_still_not_read(tmp_path):
    """An old run folder whose run.json was deleted (or cut short) inside a log folder had its risk, rejects and
    shard tables read as prompts: 83 rows became 585, exit 0. Its manifest.json or a committed unit's .done.json
    still mark it as a run's; a cache whose key.json is not JSON still marks its parts. A user's own risk.parquet
    in a folder with none of these is read."""
    from audit.sources import discover

    logs = tmp_path / "logs"
    _touch(logs, "p.parquet", "gone/risk.parquet", "gone/rejects.parquet", "gone/shards/unit-000000.risk.parquet",
           "cut/risk.parquet", "cut/shards/unit-000000.risk.parquet", "cut/shards/unit-000000.done.json",
           "cache/f-k/part-0-0123456789ab.parquet", "mine/risk.parquet")
    _touch(logs, "gone/manifest.json", text=json.dumps({"schema_version": 1, "memaudit_version": "0.1.0",
                                                         "counts": {}, "score_config": {}}))
    _touch(logs, "cut/run.json", text=RUN_ID[:20])
    _touch(logs, "cache/f-k/key.json", text="{bad")
    _touch(logs, "mine/manifest.json", text='{"counts": 3}')  # not a run's manifest
    files, skipped = discover([str(logs)])
    assert [f.url for f in files] == [str(logs / "mine" / "risk.parquet"), str(logs / "p.parquet")]
    assert sorted((s["path"], s["reason"]) for s in skipped if s["reason"] == "a memaudit output folder") == [
        (str(logs / "cache" / "f-k"), "a memaudit output folder"), (str(logs / "cut"), "a memaudit output folder"),
        (str(logs / "gone"), "a memaudit output folder")]
    files, _ = discover([f"{logs}/**/*.parquet"])  # a glob too
    assert [f.url for f in files] == [str(logs / "mine" / "risk.parquet"), str(logs / "p.parquet")]


def test_a_folder_that_was_a_runs_out_still_reads_the_users_own_files(tmp_path):
    """`memaudit run data/p.parquet --out data` (accepted, with a note) made data/ a run folder, and every later
    `memaudit run data/` refused it whole: 'no readable prompt file ... (a memaudit output folder)'. Only the
    entries a run writes are left out now; the user's files beside them are read, and the reason says so."""
    from audit.sources import discover

    data = tmp_path / "data"
    _touch(data, "p.parquet", "sub/q.txt", "risk.parquet", "rejects.parquet", "shards/unit-000000.risk.parquet",
           "manifest.json", ".memaudit.lock", "run1/risk.parquet")
    _touch(data, "run.json", text=RUN_ID)
    _touch(data, "run1/run.json", text=RUN_ID)
    files, skipped = discover([str(data)])
    assert [f.url for f in files] == [str(data / "p.parquet"), str(data / "sub" / "q.txt")]
    reasons = {s["path"]: s["reason"] for s in skipped}
    assert reasons[str(data)] == ("a memaudit output folder: its rejects.parquet, risk.parquet, shards skipped, "
                                  "its other files read")
    assert reasons[str(data / "run1")] == "a memaudit output folder"  # nothing else in it: skipped whole


def test_a_finished_units_deleted_shard_is_scored_again(tmp_path, tiny_model_dir):
    """A shard deleted after its unit was committed failed the rerun at the merge ('rerun to resume', forever);
    the unit is now scored again and the tables are the same."""
    src = tmp_path / "p.txt"
    src.write_text("".join(f"prompt {i}\n" for i in range(12)))
    risk, _, _ = run(tmp_path, tiny_model_dir, [src], unit_rows=4)
    (tmp_path / "run" / "shards" / "unit-000001.risk.parquet").unlink()
    again, _, manifest = run(tmp_path, tiny_model_dir, [src], unit_rows=4)
    assert manifest["units"]["resumed"] == 2 and again.equals(risk)
    # cut short (a power cut before the file reached the disk), emptied, or replaced by another unit's shard:
    # each stopped every rerun with pyarrow's "magic bytes not found" naming no file, or gave wrong counts
    shards = tmp_path / "run" / "shards"
    cut = shards / "unit-000000.risk.parquet"
    cut.write_bytes(cut.read_bytes()[:-100])
    assert not (shards / "unit-000001.rejects.parquet").exists()  # nothing rejected: no rejects shard, and an
    (shards / "unit-000001.rejects.parquet").write_bytes(b"")  # empty file there is no shard either
    from audit.tables import arrow_schema

    pq.write_table(arrow_schema("rejects").empty_table(), shards / "unit-000002.risk.parquet")  # another table
    again, _, manifest = run(tmp_path, tiny_model_dir, [src], unit_rows=4)
    assert manifest["units"]["resumed"] == 0 and again.equals(risk)
    (shards / "unit-000002.done.json").write_text('{"stats": ')  # a damaged marker: the unit is scored again
    again, _, manifest = run(tmp_path, tiny_model_dir, [src], unit_rows=4)
    assert manifest["units"]["resumed"] == 2 and again.equals(risk)
    # another unit's shard copied over, with the same row count (and then its marker too): ranked twice, lost once
    (shards / "unit-000000.risk.parquet").write_bytes((shards / "unit-000001.risk.parquet").read_bytes())
    again, _, manifest = run(tmp_path, tiny_model_dir, [src], unit_rows=4)
    assert manifest["units"]["resumed"] == 2 and again.equals(risk)
    for kind in ("risk.parquet", "done.json"):
        (shards / f"unit-000000.{kind}").write_bytes((shards / f"unit-000001.{kind}").read_bytes())
    again, _, manifest = run(tmp_path, tiny_model_dir, [src], unit_rows=4)
    assert manifest["units"]["resumed"] == 2 and again.equals(risk) and again["prompt_id"].n_unique() == 12


def test_names_from_the_inputs_cannot_drive_the_terminal(tmp_path, tiny_model_dir):
    """A column or file name holding escape sequences was printed raw to stderr (a real terminal would clear the
    screen or recolour it); errors and warnings now show them escaped. Unknown URL protocols and a TOML file
    that is not UTF-8 or is a folder are one-line errors."""
    from typer.testing import CliRunner

    from audit.cli import app

    pq.write_table(pa.table({"pr\x1b[31mompt\x1b[2J": ["x"]}), tmp_path / "evil.parquet")
    res = CliRunner().invoke(app, ["run", str(tmp_path / "evil.parquet"), "--model", str(tiny_model_dir),
                                   "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code == 2 and "\x1b" not in res.output and r"pr\x1b[31mompt\x1b[2J" in res.output, res.output
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text("a cat\n")
    (folder / "x\x1b]0;title\x07.bin").write_bytes(b"")
    res = CliRunner().invoke(app, ["run", str(folder), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o2"),
                                   "--no-progress"])
    assert res.exit_code == 0 and "\x1b" not in res.output and "\x07" not in res.output
    assert r"x\x1b]0;title\x07.bin (unsupported extension .bin)" in res.output
    (tmp_path / "c.toml").write_bytes(b'\xff\xfeinputs = ["x"]\n')
    for args, message in ((["foo://x"], "foo://x: Protocol not known: foo"),
                          (["--config", str(tmp_path / "c.toml")], "not UTF-8 text"),
                          (["--config", str(tmp_path)], "is a folder, not a TOML file")):
        res = CliRunner().invoke(app, ["run", *args, "--out", str(tmp_path / "o3"), "--no-progress"])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (args, res.output)


# ---------------------------------------------------------------- 5. what adversarial inputs found (session 32)

def _cli(args):
    from typer.testing import CliRunner

    from audit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args] + ["--no-progress", "--device", "cpu"])


def test_jsonl_rows_are_judged_line_by_line_whatever_the_first_lines_hold(tmp_path, tiny_model_dir):
    late = tmp_path / "late.jsonl"  # the prompt key first appears after the 100-line probe
    late.write_text("".join(json.dumps({"meta": i}) + "\n" for i in range(150))
                    + "".join(json.dumps({"prompt": f"late prompt {i}", "app": "x"}) + "\n" for i in range(50)))
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("".join(f"garbage line {i}\n" for i in range(120))
                       + "".join(json.dumps({"prompt": f"valid prompt {i}"}) + "\n" for i in range(30)))
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [late, garbage], keep_columns=("app",))
    reconcile(risk, rejects, manifest, 350)
    assert risk.height == 80 and set(risk["app"].drop_nulls()) == {"x"} and risk["app"].null_count() == 30
    assert dict(zip(*rejects.group_by("reason").len().to_dict().values())) == {"missing_prompt_column": 150,
                                                                               "invalid_json": 120}
    # the refusal still holds for a column no line has; a string value equal to the name is not the key
    res = _cli(["run", late, "--model", tiny_model_dir, "--out", tmp_path / "r2", "--prompt-column", "x"])
    assert res.exit_code == 2 and "no input has the prompt column 'x'" in res.output, res.output
    escaped = tmp_path / "escaped.jsonl"  # a key spelled with a JSON escape, first met after the probe
    escaped.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(150)) + '{"\\u0070rompt": "late one"}\n')
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [escaped], name="escaped")
    assert risk["prompt"].to_list() == ["late one"] and rejects.height == 150


def test_lone_surrogate_escapes_in_jsonl_reject_their_row_or_are_kept_escaped(tmp_path, tiny_model_dir):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "a cat", "id": "c"}\n'
                    '{"prompt": "emoji half \\ud83d end", "id": "h"}\n'
                    '{"prompt": "a dog", "id": "x\\udc00"}\n'
                    '{"prompt": "a bird", "id": "b", "k": "y\\ud800"}\n'
                    '{"prompt": "a fish", "id": 7, "k": {"a": true, "b": [1, 2.5]}}\n')
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path], id_column="id", keep_columns=("k",))
    reconcile(risk, rejects, manifest, 5)
    assert dict(zip(risk["prompt_id"], risk["k"])) == {"c": None, "b": "y\\ud800", "7": '{"a": true, "b": [1, 2.5]}'}
    assert rejects.select("prompt_id", "reason", "prompt").rows() == [
        ("h", "invalid_utf8", '{"prompt": "emoji half \\ud83d end", "id": "h"}'),
        ("x\\udc00", "invalid_utf8", "a dog")]


def test_csv_fields_are_read_as_text_exactly_as_written(tmp_path, tiny_model_dir):
    path = tmp_path / "t.csv"
    path.write_text('prompt,id,zip\nNA,0001,01234\nnull,1,1.50\nNaN,99999999999999999999,x\n"",007,\n'
                    ',7,\n"NULL",00042,"N/A"\na cat,008,\n')
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path], id_column="id", keep_columns=("zip",))
    reconcile(risk, rejects, manifest, 7)
    assert dict(zip(risk["prompt_id"], risk["prompt"])) == {
        "0001": "NA", "1": "null", "99999999999999999999": "NaN", "00042": "NULL", "008": "a cat"}
    assert dict(zip(risk["prompt_id"], risk["zip"])) == {
        "0001": "01234", "1": "1.50", "99999999999999999999": "x", "00042": "N/A", "008": None}
    assert rejects.select("prompt_id", "reason", "prompt").rows() == [("007", "empty_prompt", ""),
                                                                      ("7", "null_prompt", None)]


def test_a_csv_column_that_changes_type_after_the_first_block_is_read(tmp_path, tiny_model_dir):
    pad = "a watercolor painting of a quiet harbor at dawn with small fishing boats and gulls, soft light, " * 3
    path = tmp_path / "late-type.csv"  # about 1.8 MB: pyarrow's type inference sees only the first 1 MB block
    path.write_text("prompt,meta\n" + "".join(f'"{pad}{i}",{i if i < 5990 else "x"}\n' for i in range(6000)))
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path], keep_columns=("meta",), limit=3)
    reconcile(risk, rejects, manifest, 3)
    res = _cli(["run", path, "--model", tiny_model_dir, "--out", tmp_path / "r2", "--unit-rows", "3000",
                "--keep-columns", "meta", "--limit", "6000"])
    assert res.exit_code == 0, res.output
    risk = pl.read_parquet(tmp_path / "r2" / "risk.parquet")
    assert risk.height == 6000 and risk.filter(pl.col("row") == 5999)["meta"].to_list() == ["x"]


def _corrupt_parquet(path, rows=3000):
    """A Parquet file whose footer is valid and whose middle data page is garbage."""
    pq.write_table(pa.table({"prompt": [f"prompt number {i}" for i in range(rows)]}), path, compression="none",
                   row_group_size=max(rows // 3, 1000))
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 2000] = b"\xab" * 2000
    path.write_bytes(bytes(data))
    return path


def test_a_file_that_fails_while_read_is_named_or_its_rows_rejected(tmp_path, tiny_model_dir):
    from audit.errors import SourceError

    good = tmp_path / "a-good.txt"
    good.write_text("".join(f"good prompt {i}\n" for i in range(10)))
    bad = _corrupt_parquet(tmp_path / "b-corrupt.parquet")
    # the corrupt file's units are read ahead while the good file scores: the error is still the unit's, named
    with pytest.raises(SourceError, match=r"unit \d \(.*b-corrupt\.parquet rows \d+-\d+\): cannot read \(OSError"):
        run(tmp_path, tiny_model_dir, [good, bad], unit_rows=1000)
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [good, bad], name="skip", unit_rows=1000,
                                  skip_bad_files=True)
    reconcile(risk, rejects, manifest, 3010)
    unreadable = rejects.filter(pl.col("reason") == "unreadable_rows")
    assert 0 < unreadable.height < 3000 and unreadable.height % 1000 == 0  # whole units, not the whole file
    assert set(unreadable["source"]) == {str(bad)} and unreadable["detail"].str.starts_with("OSError").all()
    assert risk.filter(pl.col("source") == str(bad)).height == 3000 - unreadable.height
    # one unit of three row groups: only the group that cannot be read on its own is rejected
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [bad], name="one-unit", skip_bad_files=True)
    reconcile(risk, rejects, manifest, 3000)
    assert rejects["reason"].to_list() == ["unreadable_rows"] * 1000 and risk.height == 2000
    lost = sorted(rejects["row"])
    assert lost == list(range(lost[0], lost[0] + 1000)) and lost[0] % 1000 == 0
    broken = _corrupt_parquet(tmp_path / "c-one-group.parquet", rows=1000)  # one group: nothing readable
    res = _cli(["run", broken, "--model", tiny_model_dir, "--out", tmp_path / "r3", "--skip-bad-files"])
    assert res.exit_code == 4 and "all 1000 rows read were rejected (unreadable_rows 1000)" in res.output, res.output
    # rows lost to a damaged page under --skip-bad-files: the run goes on (the user's choice) and warns in a line
    res = _cli(["run", bad, "--model", tiny_model_dir, "--out", tmp_path / "r4", "--skip-bad-files"])
    assert res.exit_code == 0 and ("warning: 1000 rows could not be read (unreadable_rows: a damaged part of an "
                                   "input file)") in " ".join(res.output.split()), res.output


def test_a_unit_across_two_row_groups_keeps_the_rows_of_the_readable_one(tmp_path, tiny_model_dir):
    """Row groups of 1000 rows, the second one damaged, units of 700 rows: unit [700, 1400) starts inside the first
    group and ends inside the second. Under --skip-bad-files it is read a group at a time, cut to the unit: its rows
    700-999 are scored, 1000-1399 rejected; unit [1400, 2000) lies in the damaged group and is rejected whole."""
    path = tmp_path / "two-groups.parquet"
    pq.write_table(pa.table({"prompt": [f"prompt number {i}" for i in range(2000)]}), path, compression="none",
                   row_group_size=1000)
    chunk = pq.read_metadata(path).row_group(1).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    mid = start + chunk.total_compressed_size // 2
    data[mid:mid + 200] = b"\xab" * 200  # inside the second group's column chunk; the footer stays valid
    path.write_bytes(bytes(data))
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path], unit_rows=700, skip_bad_files=True)
    reconcile(risk, rejects, manifest, 2000)
    assert manifest["units"]["total"] == 3
    assert sorted(risk["row"]) == list(range(1000)) and sorted(rejects["row"]) == list(range(1000, 2000))
    assert set(rejects["reason"]) == {"unreadable_rows"}


def test_units_with_unreadable_rows_are_read_again_on_a_rerun(tmp_path, tiny_model_dir):
    """A unit whose rows were rejected as unreadable (--skip-bad-files) is not a finished unit: a rerun without
    the flag stops on the file as a first run would, and once the file reads, its rows are scored."""
    from audit.errors import SourceError

    good = tmp_path / "a-good.txt"
    good.write_text("".join(f"good prompt {i}\n" for i in range(10)))
    bad = _corrupt_parquet(tmp_path / "b-corrupt.parquet")
    _, rejects, manifest = run(tmp_path, tiny_model_dir, [good, bad], unit_rows=1000, skip_bad_files=True)
    lost = rejects.filter(pl.col("reason") == "unreadable_rows").height
    assert lost == 1000 and manifest["units"] == {"total": 4, "resumed": 0}
    with pytest.raises(SourceError, match="b-corrupt.parquet"):  # it resumed as if the rows had been read
        run(tmp_path, tiny_model_dir, [good, bad], unit_rows=1000)
    _, rejects, manifest = run(tmp_path, tiny_model_dir, [good, bad], unit_rows=1000, skip_bad_files=True)
    assert manifest["units"] == {"total": 4, "resumed": 3} and rejects.height == 1000  # only the bad unit again
    # the file mended in place, same size and modification time (a passing read error): its rows are scored
    stat = bad.stat()
    pq.write_table(pa.table({"prompt": [f"prompt number {i}" for i in range(3000)]}), tmp_path / "fixed.parquet",
                   compression="none", row_group_size=1000)
    fixed = (tmp_path / "fixed.parquet").read_bytes()
    assert len(fixed) == stat.st_size
    bad.write_bytes(fixed)
    os.utime(bad, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [good, bad], unit_rows=1000)
    reconcile(risk, rejects, manifest, 3010)
    assert manifest["units"] == {"total": 4, "resumed": 3} and rejects.height == 0 and risk.height == 3010


def test_a_rerun_through_a_link_to_the_inputs_resumes_the_run(tmp_path, tiny_model_dir):
    from audit.errors import RunError

    (tmp_path / "data").mkdir()
    src = tmp_path / "data" / "p.txt"
    src.write_text("".join(f"prompt {i}\n" for i in range(6)))
    (tmp_path / "alias").symlink_to(tmp_path / "data")
    risk, _, _ = run(tmp_path, tiny_model_dir, [src], unit_rows=2)
    _, _, manifest = run(tmp_path, tiny_model_dir, [tmp_path / "alias" / "p.txt"], unit_rows=2)
    assert manifest["units"] == {"total": 3, "resumed": 3} and manifest["counts"]["scored"] == 6
    # a unit scored again through the link: its rows keep the folder's spelling (source, prompt_id, so ranks)
    (tmp_path / "run" / "shards" / "unit-000001.done.json").unlink()
    again, _, manifest = run(tmp_path, tiny_model_dir, [tmp_path / "alias" / "p.txt"], unit_rows=2)
    assert manifest["units"] == {"total": 3, "resumed": 2} and again.equals(risk)
    assert [f["path"] for f in manifest["files"]] == [str(src)]
    other = tmp_path / "other.txt"
    other.write_text(src.read_text())  # the same bytes in another file is another input
    with pytest.raises(RunError, match="holds a different run"):
        run(tmp_path, tiny_model_dir, [other], unit_rows=2)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_header_naming_a_used_column_twice_is_refused_before_scoring_or_skipped(tmp_path, tiny_model_dir, fmt):
    from audit.errors import SourceError

    path = tmp_path / f"dup.{fmt}"
    if fmt == "csv":
        path.write_text("prompt,prompt,x,x\na,b,1,2\nc,d,3,4\n")
    else:
        pq.write_table(pa.Table.from_arrays([pa.array(["a", "c"]), pa.array(["b", "d"])], names=["prompt", "prompt"]),
                       path)
    with pytest.raises(SourceError, match=f"dup.{fmt}: cannot read as {fmt} .*'prompt' appear more than once"):
        run(tmp_path, tiny_model_dir, [path])
    res = _cli(["run", path, "--model", tiny_model_dir, "--out", tmp_path / "r", "--skip-bad-files"])
    assert res.exit_code == 4, res.output  # the only input skipped: nothing scored is not a clean audit
    assert "every input file with rows was skipped as unreadable" in res.output
    if fmt == "csv":  # a duplicate that is not used is no obstacle
        path.write_text("prompt,x,x\na,1,2\nc,3,4\n")
        risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path], name="unused")
        assert risk.height == 2


def test_only_unreadable_inputs_under_skip_bad_files_exit_4_and_empty_inputs_only_warn(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not parquet")
    res = _cli(["run", broken, "--model", tiny_model_dir, "--out", tmp_path / "r1", "--skip-bad-files"])
    assert res.exit_code == 4 and "broken.parquet: cannot read as parquet" in res.output, res.output
    assert "the inputs hold no rows" not in res.output
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    res = _cli(["run", empty, "--model", tiny_model_dir, "--out", tmp_path / "r2", "--skip-bad-files"])
    assert res.exit_code == 0 and "the inputs hold no rows" in res.output, res.output


def test_local_paths_are_normalized_read_once_and_resumed_under_any_spelling(tmp_path, tiny_model_dir, monkeypatch):
    from audit.errors import RunError

    (tmp_path / "d").mkdir()
    src = tmp_path / "d" / "p.txt"
    src.write_text("".join(f"prompt {i}\n" for i in range(6)))
    other = tmp_path / "q.txt"
    other.write_text("another prompt\n")
    monkeypatch.chdir(tmp_path)
    odd = "d/../d/./p.txt"
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [odd, f"{tmp_path}/d/p.txt", other], unit_rows=2)
    reconcile(risk, rejects, manifest, 7)
    assert set(risk["source"]) == {str(src), str(other)} and str(src) + "#0" in risk["prompt_id"].to_list()
    # a rerun from another folder, spelling the same files otherwise, resumes the run
    monkeypatch.chdir(tmp_path / "d")
    _, again, manifest2 = run(tmp_path, tiny_model_dir, ["p.txt", "../q.txt"], unit_rows=2)
    assert manifest2["units"] == {"total": 4, "resumed": 4}
    with pytest.raises(RunError, match="holds a different run"):  # the same files in another order are another run
        run(tmp_path, tiny_model_dir, ["../q.txt", "p.txt"], unit_rows=2)


def test_prompt_column_for_text_inputs_only_is_refused_and_blank_looking_prompts_rejected(tmp_path, tiny_model_dir):
    path = tmp_path / "p.txt"
    path.write_text("a red cat\n\u3164\n\u2800\u2800\n\ufe0f\n\U000e0041\U000e0042\na \u3164 cat\n")
    res = _cli(["run", path, "--model", tiny_model_dir, "--out", tmp_path / "r1", "--prompt-column", "nonsense"])
    assert res.exit_code == 2 and "the inputs are .txt files" in res.output, res.output
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path])
    reconcile(risk, rejects, manifest, 6)
    assert sorted(risk["row"]) == [0, 5] and rejects["reason"].to_list() == ["empty_prompt"] * 4


def test_a_newline_in_a_skipped_file_name_cannot_forge_a_log_line(tmp_path, tiny_model_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ok.txt").write_text("a red cat\n")
    (folder / "evil\nmemaudit: 0 rows flagged.dat").write_text("x")
    res = _cli(["run", folder, "--model", tiny_model_dir, "--out", tmp_path / "r"])
    assert res.exit_code == 0, res.output
    assert not any(line.startswith("memaudit: 0 rows flagged") for line in res.output.splitlines())
    assert "evil\\nmemaudit: 0 rows flagged.dat" in res.output


def test_a_csv_row_whose_fields_do_not_match_the_header_is_rejected_alone(tmp_path, tiny_model_dir):
    good = (b'\xef\xbb\xbfprompt,id,k\na cat,1,x\n"multi\nline, quoted",2,y\n"NA",007,\nbad \xff byte,5,w\n'
            b'"say ""hi""",6,v\n\nlast one,8,u\n')
    ragged = good + b"a dog, oil painting,3,z\nlonely\n"
    (tmp_path / "good.csv").write_bytes(good)
    (tmp_path / "ragged.csv").write_bytes(ragged)
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [tmp_path / "ragged.csv"], name="ragged", unit_rows=2,
                                  id_column="id", keep_columns=("k",))
    reconcile(risk, rejects, manifest, 8)
    assert rejects.select("row", "reason", "prompt").rows() == [
        (3, "invalid_utf8", "bad \\xff byte"), (6, "invalid_csv_row", "a dog, oil painting,3,z"),
        (7, "invalid_csv_row", "lonely")]
    # every other row is what the columnar reader gives for the file without the two ragged rows
    risk_g, rejects_g, _ = run(tmp_path, tiny_model_dir, [tmp_path / "good.csv"], name="good", unit_rows=2,
                               id_column="id", keep_columns=("k",))
    cols = ["prompt_id", "prompt", "k", "row", "risk"]
    assert risk.select(cols).equals(risk_g.select(cols)) and risk.height == 5
    assert risk.filter(pl.col("prompt_id") == "6")["prompt"].to_list() == ['say "hi"']
    assert rejects.filter(pl.col("row") == 3).drop("source").equals(rejects_g.drop("source"))


def test_a_compressed_input_cut_short_is_named_and_a_multi_frame_zst_read_whole(tmp_path, tiny_model_dir):
    import zstandard

    from audit.errors import SourceError

    lines = b"".join(b"prompt number %d\n" % i for i in range(3000))
    zc = zstandard.ZstdCompressor(level=1)
    (tmp_path / "frames.txt.zst").write_bytes(zc.compress(lines[:20000]) + zc.compress(lines[20000:]))
    full = zc.compress(lines)
    (tmp_path / "cut.txt.zst").write_bytes(full[:len(full) * 3 // 5])
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(lines)[:-100])
    (tmp_path / "cut.csv.bz2").write_bytes(bz2.compress(b"prompt\n" + lines)[:-100])
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [tmp_path / "frames.txt.zst"], unit_rows=1000, limit=3000)
    assert risk.height == 3000 and sorted(risk["row"]) == list(range(3000))  # both frames, every line
    for name in ("cut.txt.zst", "cut.txt.gz", "cut.csv.bz2"):  # it was a shorter file (zst) or an unnamed EOFError
        with pytest.raises(SourceError, match=f"{name}: cannot read as (txt|csv) \\(EOFError"):
            run(tmp_path, tiny_model_dir, [tmp_path / name], name=f"r-{name}")
    res = _cli(["run", tmp_path / "frames.txt.zst", tmp_path / "cut.txt.zst", "--model", tiny_model_dir,
                "--out", tmp_path / "r2", "--skip-bad-files", "--limit", "5"])
    assert res.exit_code == 0 and "cut.txt.zst (cannot read as txt (EOFError" in res.output, res.output


def test_the_record_reader_takes_what_the_columnar_one_takes(tmp_path, tiny_model_dir, monkeypatch):
    from audit import sources

    ragged = b"an,unquoted,comma\n"
    files = {  # each with one ragged row, so read record by record
        "long.csv": b"prompt,id\n" + b"x" * 200_000 + b",1\na blue bike,2\n" + ragged,  # a field over 128 KiB
        "bom-quoted.csv": b'\xef\xbb\xbf"prompt","id"\na blue bike,1\n' + ragged,
        "blank-first.csv": b"\n\nprompt,id\na blue bike,1\n" + ragged,
        "bad-id.csv": b"prompt,id\na blue bike,\xff1\n" + ragged,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [tmp_path / n for n in files], id_column="id")
    reconcile(risk, rejects, manifest, 9)
    assert sorted(risk["prompt_id"]) == ["1", "1", "1", "2"] and risk.filter(pl.col("prompt_id") == "1")["prompt"] \
        .str.len_chars().max() == 200_000
    bad = rejects.filter(pl.col("reason") == "invalid_utf8")
    assert bad["prompt_id"].to_list() == [f"{tmp_path / 'bad-id.csv'}#0"]  # as the columnar reader names it
    assert rejects.filter(pl.col("reason") == "invalid_csv_row").height == 4
    # one pass over the file for all its units, as the columnar reader streams
    opened = []
    real = sources._csv_records
    monkeypatch.setattr(sources, "_csv_records", lambda url: opened.append(url) or real(url))
    big = tmp_path / "many.csv"
    big.write_bytes(b"prompt\n" + b"".join(b"prompt %d\n" % i for i in range(50)) + ragged)
    plan = sources.plan_units(sources.discover([str(big)])[0], "prompt", unit_rows=7)
    opened.clear()
    sources._STREAMS.clear()
    rows = [r for u in plan.units for b in sources.read_unit(u, "prompt") for r in b.rows]
    assert rows == list(range(51)) and len(opened) == 1


def test_quoted_line_breaks_across_csv_blocks_keep_their_records(tmp_path, tiny_model_dir, monkeypatch):
    from audit import sources

    monkeypatch.setattr(sources, "CSV_BLOCK_BYTES", 4096)  # many block boundaries, some inside quoted fields
    path = tmp_path / "multi.csv"
    path.write_text("id,prompt\n" + "".join(f'{i},"line one of {i}\nline two, {i}\nq,r"\n' for i in range(600)))
    plan = sources.plan_units(sources.discover([str(path)])[0], "prompt", unit_rows=100)
    assert plan.total_rows == 600 and {u.fmt for u in plan.units} == {"csv"}
    got = [(i, p) for u in plan.units for b in sources.read_unit(u, "prompt", "id") for i, p in zip(b.ids, b.prompts)]
    assert got == [(str(i), f"line one of {i}\nline two, {i}\nq,r") for i in range(600)]


def test_a_dot_dot_after_a_link_names_the_file_the_system_opens(tmp_path, tiny_model_dir):
    (tmp_path / "deep" / "sub").mkdir(parents=True)
    (tmp_path / "deep" / "f.txt").write_text("the deep file\n")
    (tmp_path / "f.txt").write_text("the top file\n")
    (tmp_path / "link").symlink_to(tmp_path / "deep" / "sub")
    risk, _, _ = run(tmp_path, tiny_model_dir, [f"{tmp_path}/link/../f.txt"])
    assert risk.select("prompt", "source").rows() == [("the deep file", str(tmp_path / "deep" / "f.txt"))]
    # the same file through a link to its folder is read once, under the first spelling
    (tmp_path / "alias").symlink_to(tmp_path / "deep")
    risk, _, manifest = run(tmp_path, tiny_model_dir, [tmp_path / "deep" / "f.txt", tmp_path / "alias" / "f.txt"],
                            name="twice")
    assert manifest["counts"]["rows_read"] == 1 and risk["source"].to_list() == [str(tmp_path / "deep" / "f.txt")]


def test_kept_columns_that_are_not_text_are_written_readably(tmp_path, tiny_model_dir):
    path = tmp_path / "k.parquet"
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog"],
                             "meta": pa.array([{"a": 1, "b": "x<"}, None], pa.struct([("a", pa.int64()),
                                                                                      ("b", pa.string())])),
                             "tags": pa.array([["x", "y"], []], pa.list_(pa.string())),
                             "w": pa.array([0.1, 2.5], pa.float32()), "n": [3, 4], "ok": [True, False]}), path)
    risk, _, _ = run(tmp_path, tiny_model_dir, [path], keep_columns=("meta", "tags", "w", "n", "ok"))
    rows = {r["prompt"]: r for r in risk.select("prompt", "meta", "tags", "w", "n", "ok").to_dicts()}
    assert rows["a red cat"] == {"prompt": "a red cat", "meta": '{"a": 1, "b": "x<"}', "tags": '["x", "y"]',
                                 "w": "0.1", "n": "3", "ok": "true"}
    assert rows["a blue dog"] == {"prompt": "a blue dog", "meta": None, "tags": "[]", "w": "2.5", "n": "4",
                                  "ok": "false"}
    # a boolean reads the same from JSON lines ("True" from Parquet made the same data differ by input format)
    (tmp_path / "k.jsonl").write_text('{"prompt": "a green car", "ok": true}\n')
    risk, _, _ = run(tmp_path, tiny_model_dir, [tmp_path / "k.jsonl"], keep_columns=("ok",), name="jsonl")
    assert risk["ok"].to_list() == ["true"]


def test_a_file_without_the_prompt_column_is_named_in_a_warning(tmp_path, tiny_model_dir):
    # one log file of three lost the column (a renamed field): the run goes on, and says which file it was
    for name, col, n in (("a", "prompt", 3), ("b", "text", 250), ("c", "text", 4)):
        pq.write_table(pa.table({col: [f"{name} prompt {i}" for i in range(n)], "app": ["x"] * n}),
                       tmp_path / f"{name}.parquet")
    cfg = RunConfig(inputs=(str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"), str(tmp_path / "c.parquet")),
                    model=str(tiny_model_dir), out=str(tmp_path / "run"), device="cpu", unit_rows=100)
    logs: list[str] = []
    _, manifest = execute(cfg, progress=False, log=logs.append)
    warnings = [m for m in logs if "warning" in m]
    assert warnings == [f"memaudit: warning: 2 of 3 input files have no column 'prompt', so their 254 rows are "
                        f"rejected as missing_prompt_column; the first: {tmp_path / 'b.parquet'} (columns: text, app)"]
    assert manifest["counts"]["rejected_by_reason"] == {"missing_prompt_column": 254}
    logs.clear()  # every file has the column: no warning
    execute(RunConfig(inputs=(str(tmp_path / "a.parquet"),), model=str(tiny_model_dir), out=str(tmp_path / "r2"),
                      device="cpu"), progress=False, log=logs.append)
    assert not [m for m in logs if "warning" in m]


def test_a_run_that_could_not_read_most_of_its_input_exits_4(tmp_path, tiny_model_dir):
    """training-captions.toml with one shard whose caption column was renamed: "520 rows read, 20 scored, 500
    rejected (missing_prompt_column 500)" exited 0, as a complete audit does. More than --max-error-fraction of the
    rows read that could not be read as prompts now exits 4 after writing; null or empty prompts do not count."""
    from audit.errors import ScoringFailedError
    from audit.gates import coverage_gate

    pq.write_table(pa.table({"prompt": [f"caption {i}" for i in range(20)]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [f"caption {i}" for i in range(500)]}), tmp_path / "b.parquet")
    res = _cli(["run", tmp_path / "a.parquet", tmp_path / "b.parquet", "--model", tiny_model_dir,
                "--out", tmp_path / "r"])
    assert res.exit_code == 4, res.output
    assert ("500 of 520 rows read (96.2%) could not be read as prompts (missing_prompt_column 500), more than "
            "--max-error-fraction 0.01: the audit covers only part of its input") in " ".join(res.output.split())
    assert pl.read_parquet(tmp_path / "r" / "risk.parquet").height == 20  # the outputs were written first
    res = _cli(["run", tmp_path / "a.parquet", tmp_path / "b.parquet", "--model", tiny_model_dir,
                "--out", tmp_path / "r", "--max-error-fraction", "1"])
    assert res.exit_code == 0, res.output
    with pytest.raises(ScoringFailedError, match="could not be read as prompts"):
        audit.run([tmp_path / "a.parquet", tmp_path / "b.parquet"], out=tmp_path / "r2", model=str(tiny_model_dir),
                  device="cpu")
    manifest = {"counts": {"rows_read": 100, "scored": 40, "rejected_by_reason": {
        "null_prompt": 49, "missing_prompt_column": 1, "unreadable_rows": 10}}}
    cfg = RunConfig(inputs=("x",), max_error_fraction=0.01)
    # 1 of 100: within the fraction; null prompts are no failure, unreadable rows exist only under --skip-bad-files
    assert coverage_gate(cfg, manifest) is None
    manifest["counts"]["rejected_by_reason"]["missing_prompt_column"] = 2
    assert "2 of 100 rows read (2.0%) could not be read as prompts (missing_prompt_column 2)" in \
        coverage_gate(cfg, manifest)


def test_error_gate_counts_the_rows_that_reached_the_model(tmp_path):
    """The error gate's fraction is failed / (scored + failed): rows rejected before scoring (empty, too long) are
    not in it, a non-finite attention is a failure, and a fraction exactly at --max-error-fraction passes."""
    from audit.gates import error_gate

    cfg = RunConfig(inputs=("x",), max_error_fraction=0.02)

    def gate(**reasons):
        return error_gate(cfg, tmp_path, {"counts": {"scored": 98, "rejected_by_reason": reasons}})

    assert gate(scoring_error=2) is None  # 2 of 100 tried: exactly 2%, not more
    assert gate(scoring_error=2, empty_prompt=900) is None  # 900 never reached the model: still 2 of 100
    msg = gate(scoring_error=2, nonfinite_attention=1, empty_prompt=900)
    assert msg.startswith("3 of 101 rows (3.0%) could not be scored (scoring_error 2, nonfinite_attention 1), "
                          "more than --max-error-fraction 0.02"), msg  # no rejects.parquet here: no "first" hint
    assert gate(nonfinite_attention=3).startswith("3 of 101 rows (3.0%)")


def test_a_prompt_over_max_prompt_chars_is_rejected_with_its_text_clipped(tmp_path, tiny_model_dir, monkeypatch):
    """A 97 KB .txt.gz holding one 100 MB line took 60 s and 1.55 GB; one of 400 MB ended the whole run with a
    MemoryError and its good prompts unscored. A prompt over MAX_PROMPT_CHARS is now rejected (prompt_too_long,
    its length in detail) before it is normalized, tokenized or stored whole; the others are scored."""
    import audit.unit

    monkeypatch.setattr(audit.unit, "MAX_PROMPT_CHARS", 40)
    monkeypatch.setattr(audit.unit, "REJECTED_PROMPT_CHARS", 12)
    long = "a very long prompt about a red cat " * 2  # 70 characters
    (tmp_path / "p.txt").write_text(f"a red cat\n{long}\n{'x' * 40}\n")
    res = _cli(["run", tmp_path / "p.txt", "--model", tiny_model_dir, "--out", tmp_path / "r"])
    assert res.exit_code == 0, res.output
    assert "3 rows read, 2 scored, 1 rejected (prompt_too_long 1)" in " ".join(res.output.split())
    assert sorted(pl.read_parquet(tmp_path / "r" / "risk.parquet")["prompt"]) == ["a red cat", "x" * 40]
    rej = pl.read_parquet(tmp_path / "r" / "rejects.parquet").row(0, named=True)
    assert (rej["reason"], rej["detail"], rej["prompt"]) == ("prompt_too_long", "70 characters, more than 40",
                                                             long[:12])



def test_a_long_line_rejected_for_another_reason_keeps_only_the_clipped_text(tmp_path, tiny_model_dir, monkeypatch):
    """An invalid JSON line (or a bad CSV record) over MAX_PROMPT_CHARS kept its whole text in rejects.parquet,
    where a prompt_too_long row keeps REJECTED_PROMPT_CHARS of it: a 400 MB bad line was written whole."""
    import audit.unit

    monkeypatch.setattr(audit.unit, "MAX_PROMPT_CHARS", 40)
    monkeypatch.setattr(audit.unit, "REJECTED_PROMPT_CHARS", 12)
    bad = '{"prompt": "a very long prompt about a red cat and a blue dog", oops'  # 67 characters, not JSON
    short_bad = '{"prompt": "x",'
    (tmp_path / "p.jsonl").write_text(f'{{"prompt": "a red cat"}}\n{bad}\n{short_bad}\n')
    res = _cli(["run", tmp_path / "p.jsonl", "--model", tiny_model_dir, "--out", tmp_path / "r"])
    assert res.exit_code == 4, res.output  # 2 of 3 lines not read as prompts: the coverage gate
    assert "3 rows read, 1 scored, 2 rejected (invalid_json 2)" in " ".join(res.output.split())
    rej = pl.read_parquet(tmp_path / "r" / "rejects.parquet").sort("row")
    assert rej["reason"].to_list() == ["invalid_json", "invalid_json"]
    assert rej["prompt"].to_list() == [bad[:12], short_bad]  # a line at or under the limit is kept whole

def test_files_without_the_id_column_warn_and_count_toward_the_coverage_gate(tmp_path, tiny_model_dir):
    """`--id-column uid` over a day with the column and a day without it: "23 rows read, 2 scored, 21 rejected
    (missing_id_column 20, null_id 1)", exit 0, no warning. Rows of a file without the id column are an audit of
    part of the input, as rows of a file without the prompt column are: a warning names the files and the run
    exits 4 past --max-error-fraction. A null id stays a reject (null_id) that is not gated, like a null prompt."""
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog", "an old house"], "uid": ["u1", None, "u3"]}),
                   tmp_path / "day1.parquet")
    pq.write_table(pa.table({"prompt": [f"caption {i}" for i in range(20)]}), tmp_path / "day2.parquet")
    res = _cli(["run", tmp_path / "day1.parquet", tmp_path / "day2.parquet", "--model", tiny_model_dir,
                "--id-column", "uid", "--out", tmp_path / "r"])
    text = " ".join(res.output.split())
    assert res.exit_code == 4, res.output
    assert (f"warning: 1 of 2 input files has no column 'uid', so its 20 rows are rejected as missing_id_column; "
            f"the first: {tmp_path / 'day2.parquet'} (columns: prompt)") in text
    assert "20 of 23 rows read (87.0%) could not be read as prompts (missing_id_column 20)" in text
    rejects = pl.read_parquet(tmp_path / "r" / "rejects.parquet")
    assert rejects["reason"].value_counts().sort("reason").rows() == [("missing_id_column", 20), ("null_id", 1)]
    assert pl.read_parquet(tmp_path / "r" / "risk.parquet")["prompt_id"].sort().to_list() == ["u1", "u3"]
    # a JSON-lines file without the key: the same (its lines were null_id, ungated)
    (tmp_path / "day3.jsonl").write_text("".join(f'{{"prompt": "caption {i}"}}\n' for i in range(20)))
    res = _cli(["run", tmp_path / "day1.parquet", tmp_path / "day3.jsonl", "--model", tiny_model_dir,
                "--id-column", "uid", "--out", tmp_path / "r3"])
    assert res.exit_code == 4 and "so its 20 rows are rejected as missing_id_column" in " ".join(res.output.split())
    # a null id alone is not gated (3 rows read, 1 null_id): exit 0, no warning
    res = _cli(["run", tmp_path / "day1.parquet", "--model", tiny_model_dir, "--id-column", "uid",
                "--out", tmp_path / "r2"])
    assert res.exit_code == 0 and "warning" not in res.output, res.output


def test_kept_nested_columns_with_nan_or_infinity_are_standard_json(tmp_path, tiny_model_dir):
    """Python's json wrote NaN / Infinity inside a kept list or struct, which strict JSON readers (polars'
    str.json_decode) refuse: they are null now, in Parquet and JSON-lines inputs alike."""
    path = tmp_path / "k.parquet"
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog"],
                             "emb": pa.array([[float("nan"), 1.5], [float("-inf")]], pa.list_(pa.float64())),
                             "meta": pa.array([{"score": float("inf")}, {"score": 2.0}],
                                              pa.struct([("score", pa.float64())]))}), path)
    jl = tmp_path / "k.jsonl"
    jl.write_text('{"prompt": "a green car", "emb": [NaN, 1.5], "meta": {"score": Infinity}}\n')
    risk, _, _ = run(tmp_path, tiny_model_dir, [path, jl], keep_columns=("emb", "meta"))
    rows = {r["prompt"]: (r["emb"], r["meta"]) for r in risk.to_dicts()}
    assert rows == {"a red cat": ("[null, 1.5]", '{"score": null}'), "a blue dog": ("[null]", '{"score": 2.0}'),
                    "a green car": ("[null, 1.5]", '{"score": null}')}
    decoded = risk.sort("prompt").select(pl.col("emb").str.json_decode(pl.List(pl.Float64)))["emb"].to_list()
    assert decoded == [[None], [None, 1.5], [None, 1.5]]


def test_run_options_refused_before_the_model_or_normalized(tmp_path, tiny_model_dir):
    """A column kept twice wrote two columns of one name (tables polars and pyarrow refuse to read); an --out that
    cannot be made and --steps above the scheduler's training timesteps exited 1 after the model loaded; a larger
    --unit-rows on a rerun went on with the old units without a word."""
    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog", "a green car"], "app": ["x", "y", "z"]}), src)
    risk, rejects, _ = run(tmp_path, tiny_model_dir, [src], keep_columns=("app", "app"))
    assert risk.columns.count("app") == 1 and rejects.columns.count("app") == 1
    assert sorted(risk["app"]) == ["x", "y", "z"]
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for out, message in ((tmp_path / "afile" / "sub", "afile is a file, not a folder"),
                         (tmp_path / ("n" * 300) / "r", "is longer than 255 bytes"),
                         (tmp_path / "dangling", "dangling is a link whose target does not exist"),
                         (tmp_path / "dangling" / "2026-12-05", "dangling is a link whose target does not exist"),
                         (tmp_path / "loop", "loop is a link whose target does not exist (or a loop of links)")):
        res = _cli(["run", src, "--model", tiny_model_dir, "--out", out])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    res = _cli(["run", src, "--model", tiny_model_dir, "--out", tmp_path / "steps", "--steps", "1001"])
    assert res.exit_code == 2 and "--steps 1001: more than the 1000 training timesteps" in res.output, res.output
    logs: list[str] = []
    for unit_rows in (2, 20_000):
        cfg = RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(tmp_path / "units"), device="cpu",
                        unit_rows=unit_rows)
        execute(cfg, progress=False, log=logs.append)
    assert "memaudit: going on with the run folder's units of 2 rows (cut when the run started; --unit-rows 20000 " \
           "applies to new run folders)" in logs


def test_txt_inputs_beside_a_named_prompt_column_are_said(tmp_path, tiny_model_dir):
    """--prompt-column app over a folder of Parquet and .txt files scored the .txt lines as prompts without a word."""
    pq.write_table(pa.table({"app": ["a red cat"], "prompt": ["unused"]}), tmp_path / "a.parquet")
    (tmp_path / "b.txt").write_text("a blue dog\n")
    manifest, warnings = run_warnings(tmp_path, tiny_model_dir, [tmp_path / "a.parquet", tmp_path / "b.txt"],
                                      prompt_column="app")
    assert manifest["counts"]["scored"] == 2
    assert warnings == [
        f"memaudit: warning: 1 input file is .txt, one prompt a line with no columns: its lines are scored as "
        f"prompts, whatever --prompt-column 'app' says (the first: {tmp_path / 'b.txt'})"]


def test_a_full_disk_is_said_in_one_line_with_exit_2(tmp_path, tiny_model_dir, monkeypatch):
    """A full disk exited 1 ("anything unexpected") with a raw OSError: it is the user's to fix, and the run
    resumes, so it is one line and exit 2, whether Python (errno ENOSPC) or pyarrow (no errno) raised it."""
    import errno

    import audit.pipeline

    src = tmp_path / "p.txt"
    src.write_text("a red cat\n")
    for exc in (OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "risk.parquet")),
                OSError("IOError: No space left on device. Detail: [errno 28] No space left on device")):
        def full(*a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(audit.pipeline, "finalize", full)
        monkeypatch.setattr("audit.runner.finalize", full)
        res = _cli(["run", src, "--model", tiny_model_dir, "--out", tmp_path / "run"])
        assert res.exit_code == 2 and "no space left on the device" in res.output and "rerun the same command" \
            in res.output, res.output


def test_a_ragged_csv_row_that_is_not_utf8_is_one_reject(tmp_path, tiny_model_dir, capfd):
    """A CSV row with an unquoted comma AND invalid UTF-8: pyarrow cannot hand it to the invalid-row handler (it
    decodes the row's text first), printed "Exception ignored ... UnicodeDecodeError" and failed the read, so the
    whole file was refused (exit 2). It is read record by record like any file with ragged rows: the row is an
    invalid_csv_row reject, the others are scored, and nothing is printed."""
    path = tmp_path / "bad.csv"
    path.write_bytes(b"id,prompt\nc1,a red car\nc2,bad \xff bytes, with a comma\nc3,a blue dog\n")
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path], id_column="id")
    assert sorted(risk["prompt_id"]) == ["c1", "c3"]
    assert rejects.select("reason", "prompt").rows() == [("invalid_csv_row", "c2,bad \\xff bytes, with a comma")]
    assert "Exception ignored" not in capfd.readouterr().err


def test_a_zero_byte_parquet_input_is_read_as_empty_with_a_warning(tmp_path, tiny_model_dir):
    """A zero-byte .parquet (a writer's placeholder, or a failed upload) is read as holding no rows, as before, but
    no longer silently: it looked like a day without logs."""
    pq.write_table(pa.table({"prompt": ["a red cat"]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"")
    manifest, warnings = run_warnings(tmp_path, tiny_model_dir, [tmp_path / "a.parquet", tmp_path / "b.parquet"])
    assert manifest["counts"]["scored"] == 1
    assert warnings == [
        f"memaudit: warning: 1 input .parquet file is zero bytes, read as holding no rows (a writer's placeholder, or "
        f"a failed upload?): {tmp_path / 'b.parquet'}"]


def test_a_file_whose_prompt_column_is_blank_throughout_is_named(tmp_path, tiny_model_dir):
    """A day whose writer kept the column but stopped filling it (every prompt null, or empty) was counted only
    among null_prompt rejects: the run exited 0 and no line named the file. Now a warning names it; a file with
    some blank rows among prompts, or a run where no file has any prompt (its own failure), gets none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audit.runner import execute
    from audit.config import RunConfig

    logs = tmp_path / "logs"
    logs.mkdir()
    pq.write_table(pa.table({"prompt": ["a red cat", None, "a blue dog", ""]}), logs / "a.parquet")
    pq.write_table(pa.table({"prompt": pa.array([None] * 5, pa.string())}), logs / "b.parquet")
    pq.write_table(pa.table({"prompt": ["", None, ""]}), logs / "c.parquet")

    def run(inputs, out):
        lines = []
        cfg = RunConfig(inputs=tuple(str(i) for i in inputs), model=str(tiny_model_dir), out=str(tmp_path / out),
                        device="cpu", unit_rows=2, max_error_fraction=1.0)
        try:
            execute(cfg, progress=False, log=lines.append)
        except Exception as exc:  # noqa: BLE001 - the test reads the lines either way
            lines.append(f"raised {type(exc).__name__}")
        return [line for line in lines if "no text in column" in line]

    assert run([logs], "all") == [
        f"memaudit: warning: 2 of 3 input files have no text in column 'prompt' on any row (8 rows rejected as "
        f"null_prompt or empty_prompt), where the other files have prompts: a renamed or emptied column? the first: "
        f"{logs / 'b.parquet'}"]
    assert run([logs / "a.parquet"], "some") == []  # blank rows among prompts: the reject counts say it
    assert run([logs / "b.parquet", logs / "c.parquet"], "none") == []  # nothing scored at all: its own message
