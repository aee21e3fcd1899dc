"""`memaudit run` end to end on the tiny model: outputs, schemas, counts, and every kind of bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.pipeline import RunConfig, RunError
from audit.runner import execute
from audit.sources import SourceError
from audit.tables import arrow_schema
from helpers import open_parquet_files


def run(tmp_path, tiny_model_dir, inputs, name="run", **kw):
    cfg = RunConfig(inputs=tuple(str(i) for i in inputs), model=str(tiny_model_dir), out=str(tmp_path / name),
                    device="cpu", **kw)
    out, manifest = execute(cfg, progress=False, log=lambda m: None)
    return pl.read_parquet(out / "risk.parquet"), pl.read_parquet(out / "rejects.parquet"), manifest


def reconcile(risk, rejects, manifest, read):
    c = manifest["counts"]
    assert c["rows_read"] == read == c["scored"] + c["rejected"]
    assert c["scored"] == risk.height and c["rejected"] == rejects.height
    assert sum(c["rejected_by_reason"].values()) == rejects.height


def test_real_prompt_lists_all_scored_and_ranked(tmp_path, tiny_model_dir, real_prompts):
    path = tmp_path / "real.parquet"
    pq.write_table(pa.table({"prompt": real_prompts}), path, row_group_size=300)
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path], unit_rows=400, batch_size=64)
    reconcile(risk, rejects, manifest, 845)
    assert risk.height == 845 and rejects.height == 0
    assert risk["rank"].to_list() == list(range(1, 846))
    assert risk["risk"].is_sorted(descending=True)
    assert risk["prompt_id"].n_unique() == 845
    assert (risk["risk"] == risk["attn_entropy"]).all()
    assert risk["trigger_tokens"].list.len().max() == 5
    # the real captions include duplicates after normalization? count unique prompts exactly
    from audit.sources import normalize_prompt

    assert manifest["counts"]["unique_prompts"] == len({normalize_prompt(p) for p in real_prompts})
    meta = pq.read_schema(tmp_path / "run" / "risk.parquet").metadata
    assert json.loads(meta[b"memaudit.model"])["fingerprint"] == manifest["model"]["fingerprint"]
    assert json.loads(meta[b"memaudit.score_config"])["layers"] == manifest["score_config"]["layers"]
    assert meta[b"memaudit.schema"] == b"risk/2"


def test_bad_rows_are_rejected_with_reasons_and_nothing_is_lost(tmp_path, tiny_model_dir):
    prompts = [None, "", "   ", "\n\n", "a red cat", "  a red cat  ", "🎨🖼️", "東京の夜景", " ".join(["cat"] * 100),
               "a blue car", "\u200b", " \u200b\ufeff\u2060 ", "👩\u200d🔬 a scientist",
               "\x00", "\x00\x1b\x7f \x85"]  # invisible only (format or control characters): empty
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": prompts}), path)
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path])
    reconcile(risk, rejects, manifest, len(prompts))
    reasons = dict(zip(rejects["row"].to_list(), rejects["reason"].to_list()))
    assert reasons == {0: "null_prompt", 1: "empty_prompt", 2: "empty_prompt", 3: "empty_prompt", 10: "empty_prompt",
                       11: "empty_prompt", 13: "empty_prompt", 14: "empty_prompt"}
    assert manifest["counts"]["rejected_by_reason"] == {"empty_prompt": 7, "null_prompt": 1}
    by_row = {r["row"]: r for r in risk.iter_rows(named=True)}
    assert set(by_row) == {4, 5, 6, 7, 8, 9, 12}  # a zero-width joiner inside a visible prompt is kept
    assert by_row[12]["prompt"] == "👩\u200d🔬 a scientist"
    # normalization: rows 4 and 5 are one prompt, scored once, same score
    assert by_row[4]["prompt"] == by_row[5]["prompt"] == "a red cat"
    assert by_row[4]["risk"] == by_row[5]["risk"]
    assert manifest["counts"]["unique_prompts"] == 6 and manifest["counts"]["duplicates"] == 1
    # long prompt: scored on kept tokens, truncated, true length
    assert by_row[8]["truncated"] is True and by_row[8]["n_tokens"] == 102
    assert all(by_row[r]["truncated"] is False for r in (4, 6, 7, 9))
    assert np.isfinite(risk["risk"].to_numpy()).all()


def test_null_and_non_string_columns_missing_column_and_marker_files(tmp_path, tiny_model_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["a red cat", "a dog"]}), folder / "a.parquet")
    pq.write_table(pa.table({"prompt": pa.array([None, None], pa.null())}), folder / "b.parquet")
    pq.write_table(pa.table({"prompt": pa.array([1, 2, 3, None], pa.int64())}), folder / "c.parquet")
    pq.write_table(pa.table({"caption": ["a cat"]}), folder / "d.parquet")
    (folder / "_SUCCESS").write_text("")
    (folder / ".part-0.crc").write_text("x")
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [folder])
    reconcile(risk, rejects, manifest, 9)
    assert risk.height == 2
    assert manifest["counts"]["rejected_by_reason"] == {"missing_prompt_column": 1, "null_prompt": 3,
                                                         "prompt_not_string": 3}
    skipped = {s["path"].rsplit("/", 1)[-1] for s in manifest["skipped_files"]}
    assert skipped == {"_SUCCESS", ".part-0.crc"}
    # --keep-columns: the file without a prompt column (d) gives its reject row, with its kept column read
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [folder], name="kept", keep_columns=("caption",))
    reconcile(risk, rejects, manifest, 9)
    missing = rejects.filter(pl.col("reason") == "missing_prompt_column")
    assert missing.height == 1 and missing["caption"].to_list() == ["a cat"]


def test_missing_prompt_column_everywhere_names_columns_and_option(tmp_path, tiny_model_dir):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"caption": ["a"], "url": ["u"]}), path)
    with pytest.raises(SourceError, match=r"caption, url.*--prompt-column"):
        run(tmp_path, tiny_model_dir, [path])
    risk, _, _ = run(tmp_path, tiny_model_dir, [path], name="ok", prompt_column="caption")
    assert risk.height == 1


def test_corrupt_parquet_is_one_clear_line(tmp_path, tiny_model_dir):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match="broken.parquet: cannot read as parquet"):
        run(tmp_path, tiny_model_dir, [path])
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": ["a cat"]}), good)
    risk, _, manifest = run(tmp_path, tiny_model_dir, [path, good], name="skip", skip_bad_files=True)
    assert risk.height == 1 and "broken.parquet" in manifest["skipped_files"][0]["path"]


def test_empty_table_gives_empty_outputs(tmp_path, tiny_model_dir, monkeypatch):
    """No rows: empty outputs with the full schema, the model's identity in the manifest, and no model load."""
    import audit.models

    monkeypatch.setattr(audit.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path])
    assert manifest["model"]["fingerprint"] and manifest["score_config"]["layers"]
    assert risk.height == 0 and rejects.height == 0 and manifest["counts"]["rows_read"] == 0
    assert pq.read_schema(tmp_path / "run" / "risk.parquet").names == arrow_schema("risk").names


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_an_empty_line_file_plans_no_unit_and_loads_no_model(tmp_path, tiny_model_dir, monkeypatch, name):
    """A 0-byte .txt or .jsonl file holds 0 rows: no unit is planned (not one of rows [0, 0)), so the model is
    never loaded, as for an empty Parquet table."""
    import audit.models

    monkeypatch.setattr(audit.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = tmp_path / name
    path.write_bytes(b"")
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path])
    assert manifest["units"]["total"] == 0 and manifest["counts"]["rows_read"] == 0
    assert risk.height == 0 and rejects.height == 0
    assert not list((tmp_path / "run" / "shards").glob("unit-*"))


def test_text_formats_and_ids(tmp_path, tiny_model_dir):
    (tmp_path / "p.txt").write_text("a red cat\n\na blue car\nlast line no newline", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text('{"id": "x1", "prompt": "a dog"}\n{"id": "x2", "prompt": 5}\n'
                                      'not json\n{"id": "x4"}\n{"id": null, "prompt": "a cat"}\n', encoding="utf-8")
    (tmp_path / "p.csv").write_text('id,prompt\nc1,"a cat, on a mat"\nc2,\nc3,"multi\nline"\n', encoding="utf-8")
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [tmp_path / "p.txt"], name="txt")
    reconcile(risk, rejects, manifest, 4)
    assert rejects["reason"].to_list() == ["empty_prompt"] and sorted(risk["row"].to_list()) == [0, 2, 3]
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [tmp_path / "p.jsonl"], name="jsonl", id_column="id")
    reconcile(risk, rejects, manifest, 5)
    assert risk["prompt_id"].to_list() == ["x1"]
    assert dict(zip(rejects["row"], rejects["reason"])) == {1: "prompt_not_string", 2: "invalid_json",
                                                            3: "missing_prompt_column", 4: "null_id"}
    assert dict(zip(rejects["row"], rejects["detail"]))[1] == "int"  # the type, beside the reason the manifest counts
    assert dict(zip(rejects["row"], rejects["prompt"]))[2] == "not json"  # the raw line is kept
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [tmp_path / "p.csv"], name="csv", id_column="id")
    reconcile(risk, rejects, manifest, 3)
    assert sorted(risk["prompt_id"].to_list()) == ["c1", "c3"] and rejects["reason"].to_list() == ["null_prompt"]


def test_units_batches_and_limit_do_not_change_scores(tmp_path, tiny_model_dir, real_prompts):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": real_prompts[:120]}), path, row_group_size=50)
    a, _, _ = run(tmp_path, tiny_model_dir, [path], name="a", unit_rows=1000, batch_size=64)
    b, _, mb = run(tmp_path, tiny_model_dir, [path], name="b", unit_rows=7, batch_size=3)
    assert mb["units"]["total"] == 18
    assert a.height == b.height == 120
    a, b = a.sort("prompt_id"), b.sort("prompt_id")
    exact = [c for c, t in a.schema.items() if c not in ("rank", "trigger_tokens") and not t.is_float()]
    assert a.select(exact).equals(b.select(exact))  # ids, prompts, rows, token counts, hashes: identical
    for col in ("risk", "attn_entropy", "bos_mass"):
        np.testing.assert_allclose(a[col].to_numpy(), b[col].to_numpy(), rtol=0, atol=1e-6)
    assert [[t["token"] for t in r] for r in a["trigger_tokens"].to_list()] == \
        [[t["token"] for t in r] for r in b["trigger_tokens"].to_list()]
    c, _, mc = run(tmp_path, tiny_model_dir, [path], name="c", limit=30, unit_rows=7)
    assert c.height == 30 and mc["counts"]["rows_read"] == 30 and sorted(c["row"].to_list()) == list(range(30))
    assert mc["units"]["total"] == 5  # 7 + 7 + 7 + 7 + 2 rows: no empty unit after the limit is reached


def test_rerun_resumes_and_mismatch_is_refused(tmp_path, tiny_model_dir):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": [f"a red cat {i}" for i in range(20)]}), path)
    first, _, _ = run(tmp_path, tiny_model_dir, [path], unit_rows=5)
    again, _, m2 = run(tmp_path, tiny_model_dir, [path], unit_rows=5)
    assert m2["units"]["resumed"] == 4 and first.equals(again)
    with pytest.raises(RunError, match="different run.*seed"):
        run(tmp_path, tiny_model_dir, [path], unit_rows=5, seed=1)


def test_keep_columns_carried(tmp_path, tiny_model_dir):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a cat", None], "day": ["2026-11-28", "2026-11-29"], "n": [1, 2]}), path)
    risk, rejects, _ = run(tmp_path, tiny_model_dir, [path], keep_columns=("day", "n"))
    assert risk.select("day", "n").to_dicts() == [{"day": "2026-11-28", "n": "1"}]
    assert rejects.select("day", "n").to_dicts() == [{"day": "2026-11-29", "n": "2"}]


def test_cli_help_imports_no_heavy_libraries():
    code = ("import sys; from typer.testing import CliRunner; from audit.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(app, ['run', '--help']); assert r.exit_code == 0 and '--prompt-column' in r.output; "
            "heavy = [m for m in ('torch', 'diffusers', 'ray', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from audit.cli import app

    path = tmp_path / "broken.parquet"
    path.write_bytes(b"garbage")
    r = CliRunner().invoke(app, ["run", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "broken.parquet" in lines[0] and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["run", str(tmp_path / "nope.parquet"), "--model", str(tiny_model_dir)])
    assert r.exit_code == 2 and "no such file" in r.output
    good = tmp_path / "g.parquet"
    pq.write_table(pa.table({"prompt": ["a cat"]}), good)
    r = CliRunner().invoke(app, ["run", str(good), "--model", str(tmp_path / "nomodel")])
    assert r.exit_code == 2 and "--model" in r.output
    r = CliRunner().invoke(app, ["run", str(good), "--model", str(tiny_model_dir), "--layers", "bogus.attn2",
                                 "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in r.output


def test_changed_input_is_refused_not_silently_resumed(tmp_path, tiny_model_dir):
    path = tmp_path / "p.txt"
    path.write_text("alpha\nbeta\n")
    run(tmp_path, tiny_model_dir, [path])
    path.write_text("alpha\nbeta\ngamma\ndelta\n")
    with pytest.raises(RunError, match="different run.*p.txt"):
        run(tmp_path, tiny_model_dir, [path])


@pytest.mark.parametrize("kw, message", [
    ({"unit_rows": 0}, "--unit-rows must be at least 1"),
    ({"limit": -1}, "--limit must be 0 or more"),
    ({"batch_size": 0}, "--batch-size 0"),
    ({"prepare_threads": -1}, "--prepare-threads -1"),
    ({"prepare_threads": "many"}, "--prepare-threads many"),
    ({"noise_draws": 0}, "--noise-draws"),
    ({"scorer": "foo"}, "--scorer foo"),
    ({"dtype": "int8"}, "--dtype int8"),
    ({"device": "gpu"}, "--device gpu"),
    ({"max_error_fraction": -0.01}, "--max-error-fraction -0.01: give a fraction from 0 to 1"),
    ({"max_error_fraction": 1.5}, "--max-error-fraction 1.5: give a fraction from 0 to 1"),
])
def test_bad_options_fail_before_reading_or_loading(tmp_path, kw, message):
    cfg = RunConfig(inputs=(str(tmp_path / "missing.parquet"),), model=str(tmp_path / "no-model"), **kw)
    with pytest.raises(RunError, match=message):
        execute(cfg, progress=False, log=lambda m: None)


def test_the_bounds_of_the_fractions_and_counts_are_accepted():
    """--max-error-fraction 0 (no failed row allowed) and 1, --limit 0 and --unit-rows 1 are valid settings."""
    from audit.config import validate_config

    for kw in ({"max_error_fraction": 0.0}, {"max_error_fraction": 1.0}, {"limit": 0}, {"unit_rows": 1}):
        validate_config(RunConfig(inputs=("x.parquet",), **kw))


def test_inputs_that_give_nothing_to_read_are_errors(tmp_path, tiny_model_dir):
    tsv = tmp_path / "x.tsv"
    tsv.write_text("prompt\ta cat\n")
    with pytest.raises(SourceError, match="unsupported file type .tsv"):
        run(tmp_path, tiny_model_dir, [tsv])
    only_markers = tmp_path / "markers"  # (a folder of only _SUCCESS is a day of no rows: test_ufsspec_findings)
    only_markers.mkdir()
    (only_markers / "_committed_1").write_text("")
    with pytest.raises(SourceError, match="no readable prompt file.*_committed_1"):
        run(tmp_path, tiny_model_dir, [only_markers])
    good = tmp_path / "g.parquet"
    pq.write_table(pa.table({"prompt": ["a cat"], "key": ["k"]}), good)
    with pytest.raises(SourceError, match="no input has the id column 'nope'.*key, prompt"):
        run(tmp_path, tiny_model_dir, [good], id_column="nope")
    # a file without the id column, beside one with it: its rows are rejected saying so (not null_id)
    no_key = tmp_path / "n.parquet"
    pq.write_table(pa.table({"prompt": ["a dog", "a cow"]}), no_key)
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [good, no_key], name="ids", id_column="key")
    reconcile(risk, rejects, manifest, 3)
    assert risk["prompt_id"].to_list() == ["k"] and rejects["reason"].to_list() == ["missing_id_column"] * 2
    assert manifest["counts"]["duplicate_ids"] == 0
    dup = tmp_path / "dup.parquet"
    pq.write_table(pa.table({"prompt": ["a dog", "a cow", "a cat"], "key": ["k", "k", "j"]}), dup)
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [dup], name="dup", id_column="key")
    assert risk.height == 3 and manifest["counts"]["duplicate_ids"] == 2  # both rows with "k" are kept
    with pytest.raises(SourceError, match=r"no input has the --keep-columns column\(s\) 'user'; columns found: key, "):
        run(tmp_path, tiny_model_dir, [good], keep_columns=("key", "user"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunError, match="is a file"):
        execute(RunConfig(inputs=(str(good),), model=str(tiny_model_dir), out=str(tmp_path / "afile"), device="cpu"),
                progress=False, log=lambda m: None)


def test_multi_pass_merge_equals_a_plain_sort(tmp_path):
    from audit.pipeline import merge_ranked, reduce_shards

    rng = np.random.default_rng(0)
    schema = arrow_schema("risk")
    shards, rows = [], []
    for k in range(11):  # more shards than the merge fan-in: two passes
        n = int(rng.integers(0, 40))
        risk = np.round(rng.random(n), 2)  # ties on risk, broken by prompt_id
        filler = {"int64": 0, "int32": 0, "double": 0.0, "bool": False, "string": "x"}
        t = pa.table({f.name: pa.nulls(n, f.type) if f.nullable else
                      pa.array([filler.get(str(f.type), [])] * n, f.type) for f in schema},
                     schema=schema.remove_metadata())
        t = t.set_column(t.schema.get_field_index("prompt_id"), "prompt_id", pa.array([f"s{k}-{i}" for i in range(n)]))
        t = t.set_column(t.schema.get_field_index("risk"), "risk", pa.array(risk))
        t = t.set_column(t.schema.get_field_index("prompt_hash"), "prompt_hash",
                         pa.array([f"{k:08x}{i:024x}" for i in range(n)]))
        t = t.sort_by([("risk", "descending"), ("prompt_id", "ascending")])
        path = tmp_path / f"s{k}.parquet"
        pq.write_table(t, path, row_group_size=7)
        shards.append(path)
        rows += list(zip(t["risk"].to_pylist(), t["prompt_id"].to_pylist()))
    reduced = reduce_shards(shards, tmp_path / "merge", schema, fan_in=3, batch_rows=7)  # 21 rows held at most
    assert len(reduced) <= 3 and (tmp_path / "merge" / "level-0").is_dir()
    n, hashes = merge_ranked(reduced, tmp_path / "out.parquet", schema, chunk_rows=5)
    out = pq.read_table(tmp_path / "out.parquet")
    expected = sorted(rows, key=lambda r: (-r[0], r[1]))
    assert n == len(rows) == out.num_rows and len(hashes) == n
    assert list(zip(out["risk"].to_pylist(), out["prompt_id"].to_pylist())) == expected
    assert out["rank"].to_pylist() == list(range(1, n + 1))


def test_heap_frozen_exempts_the_heap_and_hands_it_back(monkeypatch):
    """``heap_frozen`` freezes the objects alive at entry for the block (nested blocks share one freeze) and
    unfreezes them on exit, even after an error; a caller's own freeze is left alone. (Calls are counted: the
    freeze count itself drifts while other threads free objects.)"""
    import gc

    from audit.unit import heap_frozen

    calls = []
    for name in ("freeze", "unfreeze"):
        real = getattr(gc, name)
        monkeypatch.setattr(gc, name, lambda real=real, name=name: calls.append(name) or real())
    assert gc.get_freeze_count() == 0
    with heap_frozen():
        assert gc.get_freeze_count() > 1000  # the test process's modules at least
        with heap_frozen():
            assert calls == ["freeze"]  # nested: no second freeze
        assert calls == ["freeze"] and gc.get_freeze_count() > 1000  # the inner exit does not unfreeze
    assert calls == ["freeze", "unfreeze"] and gc.get_freeze_count() == 0
    with pytest.raises(ValueError):
        with heap_frozen():
            raise ValueError("a unit failed")
    assert calls == ["freeze", "unfreeze"] * 2 and gc.get_freeze_count() == 0
    gc.freeze()  # the caller's own
    try:
        with heap_frozen():
            pass
        assert calls == ["freeze", "unfreeze"] * 2 + ["freeze"]  # only the caller's
    finally:
        gc.unfreeze()


def test_merge_groups_hold_fan_in_full_shards_or_more_small_ones_up_to_max_files():
    from audit.pipeline import _merge_groups

    # batch_rows 10, fan_in 2: 20 rows held; a shard counts min(rows, 10), an empty one 1
    assert _merge_groups([10, 10, 10, 25], 2, 10, 256) == [(0, 2), (2, 4)]
    assert _merge_groups([1] * 45, 2, 10, 256) == [(0, 20), (20, 40), (40, 45)]
    # max_files bounds the shards a merge keeps open, those over batch_rows (a smaller one is read whole and closed)
    assert _merge_groups([11] * 7, 4, 10, 3) == [(0, 3), (3, 6), (6, 7)]
    assert _merge_groups([0] * 7, 2, 10, 3) == [(0, 7)]
    assert _merge_groups([11, 1, 11, 10, 11, 11], 9, 10, 2) == [(0, 4), (4, 6)]
    assert _merge_groups([100], 2, 10, 256) == [(0, 1)] and _merge_groups([], 2, 10, 256) == []
    assert _merge_groups([3, 9, 9, 1], 2, 10, 256) == [(0, 2), (2, 4)]  # 3 + 9 + 9 = 21 > 20


def test_a_merge_of_many_small_shards_equals_one_in_groups_of_few_and_keeps_ties_in_shard_order(tmp_path, monkeypatch):
    """60 shards of 0-3 rows, with equal (risk, prompt_id) keys in different shards: reduced in merges of at most
    256 files (one pass) or of 4 (three levels), the ranked tables are the same, and tied rows follow their shards'
    order (their source column)."""
    from audit.pipeline import merge_ranked, reduce_shards

    rng = np.random.default_rng(1)
    schema = arrow_schema("risk")
    filler = {"int64": 0, "int32": 0, "double": 0.0, "bool": False, "string": "x"}
    shards = []
    for k in range(60):
        n = int(rng.integers(0, 4))
        t = pa.table({f.name: pa.nulls(n, f.type) if f.nullable else
                      pa.array([filler.get(str(f.type), [])] * n, f.type) for f in schema},
                     schema=schema.remove_metadata())
        for name, values in (("prompt_id", [f"id{int(rng.integers(0, 3))}" for _ in range(n)]),
                             ("risk", [float(rng.integers(0, 3)) for _ in range(n)]),
                             ("source", [f"shard{k:02d}"] * n), ("prompt_hash", [f"{k:08x}{i:024x}" for i in range(n)])):
            t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, t.schema.field(name).type))
        path = tmp_path / f"s{k:02d}.parquet"
        pq.write_table(t.sort_by([("risk", "descending"), ("prompt_id", "ascending")]), path)
        shards.append(path)
    tables = []
    for name, kw in (("wide", {}), ("narrow", {"fan_in": 2, "batch_rows": 2, "max_files": 4})):
        reduced = reduce_shards(shards, tmp_path / name, schema, **kw)
        merge_ranked(reduced, tmp_path / f"{name}.parquet", schema)
        tables.append(pq.read_table(tmp_path / f"{name}.parquet"))
    assert not (tmp_path / "wide").exists() and (tmp_path / "narrow" / "level-2").is_dir()
    assert tables[0].equals(tables[1])
    keys = list(zip((-r for r in tables[0]["risk"].to_pylist()), tables[0]["prompt_id"].to_pylist(),
                    tables[0]["source"].to_pylist()))
    assert keys == sorted(keys) and len(keys) == sum(pq.read_metadata(p).num_rows for p in shards)
    # given the shards' rows (finalize: from the commit markers), no footer is read to group them, and the levels and
    # table are the same; rows of another length than the shards are not trusted
    rows = [pq.read_metadata(p).num_rows for p in shards]
    read = []
    real = pq.read_metadata
    monkeypatch.setattr(pq, "read_metadata", lambda p, *a, **k: read.append(p) or real(p, *a, **k))
    narrow = {"fan_in": 2, "batch_rows": 2, "max_files": 4}
    reduced = reduce_shards(shards, tmp_path / "given", schema, rows=rows, **narrow)
    levels = lambda name: sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*"))  # noqa: E731
    assert read == [] and levels("given") == levels("narrow")
    merge_ranked(reduced, tmp_path / "given.parquet", schema)
    assert pq.read_table(tmp_path / "given.parquet").equals(tables[1])
    reduce_shards(shards, tmp_path / "short", schema, rows=rows[:-1], **narrow)
    assert read == shards


def test_merge_intermediates_are_removed_once_the_table_is_written(tmp_path, tiny_model_dir, monkeypatch):
    """A run of more units than the merge's fan-in merges in passes through shards/merge/; those files (198 MB
    of a 1,000,000-row run) are removed once risk.parquet is written, and the table equals a one-pass merge's."""
    import audit.pipeline as pipeline

    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"prompt number {i} of a red cat" for i in range(12)) + "\n")
    one_pass, _, _ = run(tmp_path, tiny_model_dir, [path], name="one", unit_rows=2, batch_size=4)
    passes = []
    orig = pipeline.reduce_shards

    def reduce_in_pairs(shards, work, schema, rows=None):
        # the shards' rows come from the units' commit markers (their footers are not read twice)
        assert rows == [pq.read_metadata(p).num_rows for p in shards] and sum(rows) == 12
        out = orig(shards, work, schema, fan_in=2, batch_rows=2, rows=rows)  # units of 2 rows: 2 shards a merge
        passes.append(sorted(p.name for p in work.rglob("*.parquet")))
        return out

    monkeypatch.setattr(pipeline, "reduce_shards", reduce_in_pairs)
    risk, _, manifest = run(tmp_path, tiny_model_dir, [path], name="two", unit_rows=2, batch_size=4)
    assert manifest["units"]["total"] == 6 and len(passes[0]) >= 3  # 6 shards -> 3 -> 2: two levels written
    assert not (tmp_path / "two" / "shards" / "merge").exists()
    assert (tmp_path / "two" / "shards").is_dir()  # the units' shards stay (a rerun re-merges from them)
    assert risk.select("prompt", "risk").equals(one_pass.select("prompt", "risk"))


def test_a_run_logged_to_a_file_gets_plain_progress_lines(tmp_path, tiny_model_dir, monkeypatch):
    """stderr not a terminal (cron, a CI log) and no --progress/--no-progress: a line every
    LOG_PROGRESS_EVERY_S seconds with rows done, rate and time left (the log stayed empty for a 32-minute
    run); --no-progress stays silent."""
    import dataclasses

    import audit.runner as runner

    monkeypatch.setattr(runner, "LOG_PROGRESS_EVERY_S", 0.0)
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"prompt number {i} of a red cat" for i in range(12)) + "\n")
    lines = []
    cfg = RunConfig(inputs=(str(path),), model=str(tiny_model_dir), out=str(tmp_path / "auto"), device="cpu",
                    unit_rows=4, batch_size=4)
    execute(cfg, progress=None, log=lines.append)
    progress = [ln for ln in lines if " rows (" in ln]
    assert progress and progress[0].startswith("memaudit: 4 of 12 rows (33%), "), lines
    assert all(ln.endswith(" left") and " rows/s, about " in ln for ln in progress)
    assert not any(ln.startswith("memaudit: 12 of 12") for ln in progress)  # the summary line says the end
    quiet = []
    execute(dataclasses.replace(cfg, out=str(tmp_path / "quiet")), progress=False, log=quiet.append)
    assert not [ln for ln in quiet if " rows (" in ln]


def test_progress_durations_read_as_hours_minutes_seconds():
    from audit.runner import _duration

    assert [_duration(s) for s in (0, 42.4, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]


def test_truncated_rows_are_counted_in_the_manifest_the_summary_and_the_report(tmp_path, tiny_model_dir):
    """Prompts past the text encoder's maximum were marked only row by row: nothing said how many were scored on
    their first tokens only."""
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.report import build_report, render_markdown

    long = " ".join(["red cat"] * 60)  # 120 words: past CLIP's 77 tokens
    src = tmp_path / "p.txt"
    src.write_text(f"{long}\na dog\n{long} blue\n")
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"),
                                   "--no-progress", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "2 scored rows longer than the text encoder's maximum, scored on the first tokens" in res.output
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["counts"]["truncated"] == 2
    report = build_report(tmp_path / "r")
    assert report.counts["truncated"] == 2 and "| truncated (scored on the first tokens) | 2 |" in render_markdown(report)


def test_tied_risks_rank_by_prompt_id_within_a_unit_and_across_units(tmp_path, tiny_model_dir):
    """Rows of one prompt have one risk: they rank by prompt_id ascending ("p.txt#10" before "p.txt#2", as text),
    whether they share a unit (the shard's own sort) or not (the merge). Input order would put #2 first."""
    path = tmp_path / "p.txt"
    lines = [f"a small house {i}" for i in range(12)]
    lines[2] = lines[10] = "a red cat on a boat"
    path.write_text("\n".join(lines) + "\n")
    for name, unit_rows in (("one", 100), ("split", 4)):
        risk, _, manifest = run(tmp_path, tiny_model_dir, [path], name=name, unit_rows=unit_rows)
        assert manifest["units"]["total"] == (1 if unit_rows == 100 else 3)
        assert risk.equals(risk.sort(["risk", "prompt_id"], descending=[True, False]))
        cat = risk.filter(pl.col("prompt") == "a red cat on a boat")
        assert cat["prompt_id"].to_list() == [f"{path}#10", f"{path}#2"] and cat["rank"].diff()[1] == 1


def test_a_merge_keeps_open_only_the_shards_larger_than_a_batch(tmp_path, monkeypatch):
    """A shard of at most a batch's rows is read whole and its file closed when the merge starts (a folder of small
    files gives one each: opened one by one, they took a third of the run); larger ones stay open and are read batch
    by batch. Counted through /proc/self/fd while the merge writes its first chunk; the table is the plain sort."""
    from audit.pipeline import merge_ranked

    schema = arrow_schema("risk")
    filler = {"int64": 0, "int32": 0, "double": 0.0, "bool": False, "string": "x"}
    shards, keys = [], []
    for k, n in enumerate([1, 5, 2, 0, 9, 3, 6]):  # batch 4 rows: the 5, 9 and 6-row shards stay open
        t = pa.table({f.name: pa.nulls(n, f.type) if f.nullable else
                      pa.array([filler.get(str(f.type), [])] * n, f.type) for f in schema},
                     schema=schema.remove_metadata())
        risk = [round((k * 7 + i * 3) % 10 / 10, 1) for i in range(n)]
        for name, values in (("prompt_id", [f"s{k}-{i}" for i in range(n)]), ("risk", risk),
                             ("prompt_hash", [f"{k:08x}{i:024x}" for i in range(n)])):
            t = t.set_column(t.schema.get_field_index(name), name, pa.array(values, t.schema.field(name).type))
        path = tmp_path / f"s{k}.parquet"
        pq.write_table(t.sort_by([("risk", "descending"), ("prompt_id", "ascending")]), path, row_group_size=4)
        shards.append(path)
        keys += list(zip(risk, t["prompt_id"].to_pylist()))
    seen = []

    def held(chunk):
        seen.append(open_parquet_files(tmp_path))
        return chunk

    import audit.pipeline as pipeline

    monkeypatch.setattr(pipeline, "SHARD_ROW_GROUP_ROWS", 4)
    n, _ = merge_ranked(shards, tmp_path / "out.parquet", schema, chunk_rows=3, chunk_fn=held)
    assert seen[0] == ["s1.parquet", "s4.parquet", "s6.parquet"]
    out = pq.read_table(tmp_path / "out.parquet")
    assert n == 26 and list(zip(out["risk"].to_pylist(), out["prompt_id"].to_pylist())) == sorted(
        keys, key=lambda r: (-r[0], r[1]))
