"""Behaviours of the data path (sources, unit, pipeline, tables, cache) that a mutation review found no test
pinned: each test names what it pins, and each expected value is derived by hand from the inputs it writes."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from audit import sources
from audit.pipeline import RunConfig
from audit.runner import execute
from helpers import fail_batches_with


def run(tmp_path, tiny_model_dir, inputs, name="run", **kw):
    cfg = RunConfig(inputs=tuple(str(i) for i in inputs), model=str(tiny_model_dir), out=str(tmp_path / name),
                    device="cpu", **kw)
    out, manifest = execute(cfg, progress=False, log=lambda m: None)
    risk, rejects = pl.read_parquet(out / "risk.parquet"), pl.read_parquet(out / "rejects.parquet")
    c = manifest["counts"]
    assert c["rows_read"] == c["scored"] + c["rejected"] == risk.height + rejects.height
    return risk, rejects, manifest


def test_prompts_are_nfc_normalized_not_nfkc(tmp_path, tiny_model_dir):
    """Normalization is Unicode NFC (README, normalize_prompt): compatibility characters (the ligature U+FB01,
    full-width letters, a superscript two) are kept as written; only canonical equivalents are composed."""
    lig = "\ufb01sh in a \uff46\uff55\uff4c\uff4c moon x\u00b2"  # 'ﬁsh in a ｆｕｌｌ moon x²'
    decomposed = "cafe\u0301"  # NFD 'café'
    (tmp_path / "p.txt").write_text(f"{lig}\n{decomposed}\n", encoding="utf-8")
    risk, rejects, _ = run(tmp_path, tiny_model_dir, [tmp_path / "p.txt"])
    by_row = {r["row"]: r for r in risk.iter_rows(named=True)}
    assert rejects.height == 0
    assert (by_row[0]["prompt"], by_row[0]["prompt_raw"]) == (lig, None)  # unchanged by NFC
    assert (by_row[1]["prompt"], by_row[1]["prompt_raw"]) == ("caf\u00e9", decomposed)


def test_hidden_and_marker_files_of_a_readable_format_are_skipped(tmp_path):
    """A file whose name starts with '.' or '_' is skipped as a marker or hidden file even when its extension is
    one memaudit reads (a writer's '.part-0.parquet' in progress, '_metadata.parquet')."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.txt", ".hidden.txt", "_marker.txt"):
        (folder / name).write_text("a red cat\n")
    files, skipped = sources.discover([str(folder)])
    assert [f.url for f in files] == [f"{folder}/a.txt"]
    assert sorted((s["path"], s["reason"]) for s in skipped) == [
        (f"{folder}/.hidden.txt", "marker or hidden file"), (f"{folder}/_marker.txt", "marker or hidden file")]


def test_a_byte_order_mark_is_dropped_only_at_the_start_of_the_file(tmp_path, tiny_model_dir):
    """A leading UTF-8 BOM is not part of the first prompt; U+FEFF at the start of a later line is part of that
    line's prompt (a zero-width no-break space, which strip() keeps), also when that line starts a unit."""
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa red cat\na dog\n\ufeffa blue car\na bird\n".encode("utf-8"))
    for unit_rows in (2, 10):  # row 2 starts the second unit, or lies inside the only one
        risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path], name=f"u{unit_rows}", unit_rows=unit_rows)
        assert manifest["units"]["total"] == (2 if unit_rows == 2 else 1)
        assert dict(zip(risk["row"], risk["prompt"])) == {0: "a red cat", 1: "a dog", 2: "\ufeffa blue car",
                                                          3: "a bird"}, unit_rows
        assert risk["prompt_raw"].null_count() == 4


def test_crlf_line_ends_are_line_ends_and_a_lone_cr_stays_in_the_prompt(tmp_path, tiny_model_dir):
    """README: a line ends with LF or CRLF (the CR is part of the line end, not of the prompt: prompt_raw stays
    null), and a lone CR stays inside the prompt."""
    path = tmp_path / "p.txt"
    path.write_bytes(b"a red cat\r\na dog\rsits here\r\nlast one")
    risk, rejects, _ = run(tmp_path, tiny_model_dir, [path])
    assert rejects.height == 0
    assert sorted(zip(risk["row"], risk["prompt"], risk["prompt_raw"])) == [
        (0, "a red cat", None), (1, "a dog\rsits here", None), (2, "last one", None)]


def test_jsonl_ids_that_are_not_strings_are_their_json_text(tmp_path, tiny_model_dir):
    """A JSON-lines id that is not a string becomes its JSON text (sources._json_text: ``true``, ``1.5``,
    ``{"k": [1, null]}``), as kept columns do: not Python's spelling (``True``, ``{'k': [1, None]}``)."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a red cat", "id": true}\n{"prompt": "a dog", "id": 1.5}\n'
                    '{"prompt": "a bird", "id": {"k": [1, null]}}\n{"prompt": "a fish", "id": "s1"}\n'
                    '{"prompt": "a cow", "id": "caf\u00e9"}\n', encoding="utf-8")
    risk, rejects, _ = run(tmp_path, tiny_model_dir, [path], id_column="id")
    assert rejects.height == 0
    assert dict(zip(risk["row"], risk["prompt_id"])) == {0: "true", 1: "1.5", 2: '{"k": [1, null]}', 3: "s1",
                                                         4: "caf\u00e9"}


def test_a_text_unit_that_cannot_be_read_has_its_rows_rejected_not_lost(tmp_path, tiny_model_dir, monkeypatch):
    """Under --skip-bad-files a unit of a line file that keeps failing to read (a remote file system's error)
    has every row rejected as unreadable_rows, its error in detail; its rows are not silently dropped (the
    per-row-group retry is for Parquet units only)."""
    import audit.unit

    txt = tmp_path / "a.txt"
    txt.write_text("a red cat\na dog\na bird\n")
    good = tmp_path / "b.parquet"
    pq.write_table(pa.table({"prompt": ["a blue car", "a green tree"]}), good)
    real = audit.unit.read_unit

    def flaky(unit, *a, **k):
        if unit.url.endswith(".txt"):
            raise OSError("flaky disk")
        return real(unit, *a, **k)

    monkeypatch.setattr(audit.unit, "read_unit", flaky)
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [txt, good], skip_bad_files=True)
    assert manifest["counts"]["rows_read"] == 5 and manifest["counts"]["rejected_by_reason"] == {"unreadable_rows": 3}
    assert rejects.select("prompt_id", "row", "reason", "detail").rows() == [
        (f"{txt}#{i}", i, "unreadable_rows", "OSError: flaky disk") for i in range(3)]
    assert sorted(risk["prompt"]) == ["a blue car", "a green tree"]


def test_check_table_refuses_nulls_in_a_non_nullable_column():
    """A table with a null where its schema says the column is not nullable is a bug, refused before writing."""
    import pytest

    from audit.errors import SchemaError
    from audit.tables import arrow_schema, check_table

    schema = arrow_schema("rejects")
    row = {"prompt_id": ["x#0"], "source": ["x"], "row": [0], "reason": ["null_prompt"], "detail": [None],
           "prompt": [None]}
    check_table(pa.table(row, schema=schema), "rejects")  # nullable columns may hold nulls
    row["prompt_id"] = [None]
    with pytest.raises(SchemaError, match="rejects.prompt_id has nulls"):
        check_table(pa.table(row, schema=schema.set(0, schema.field(0).with_nullable(True))), "rejects")


def test_the_temporary_files_of_atomic_writes_are_the_ones_a_rerun_sweeps(tmp_path):
    """What tables.tmp_path names (a write killed before its rename) is what sweep_temporaries removes: the run's
    own tables in --out and every shard's; a user's other dotfile is left alone."""
    from audit.pipeline import sweep_temporaries
    from audit.tables import tmp_path as tmp_name

    out, shards = tmp_path / "out", tmp_path / "out" / "shards"
    shards.mkdir(parents=True)
    left = [tmp_name(out / "risk.parquet"), tmp_name(out / "manifest.json"),
            tmp_name(shards / "unit-000003.risk.parquet")]
    for p in left:
        p.write_bytes(b"half a file")
    mine = out / ".notes.tmp"
    mine.write_text("keep")
    assert sweep_temporaries(out, shards) == 3
    assert not any(p.exists() for p in left) and mine.read_text() == "keep"


def test_equal_prompts_in_a_unit_are_scored_once_and_the_cache_counts_them_so(tmp_path, tiny_model_dir):
    """Prompts equal after normalization are scored once per unit: two distinct prompts in four rows are two
    prompts sent to the model (one cache part row each) and four rows scored by it (manifest cache.scored counts
    rows, as counts.scored), and a second run over the same cache scores none of them again: four rows hit."""
    path = tmp_path / "p.txt"
    path.write_text("a red cat\n  a red cat\na dog\na dog\n")
    cache = tmp_path / "cache"
    risk, _, m1 = run(tmp_path, tiny_model_dir, [path], name="r1", cache=str(cache))
    assert risk.height == 4 and m1["counts"]["unique_prompts"] == 2 and m1["counts"]["duplicates"] == 2
    assert (m1["cache"]["hits"], m1["cache"]["scored"]) == (0, 4)
    parts = sorted(cache.glob("*/part-*.parquet"))
    assert len(parts) == 1 and pq.read_metadata(parts[0]).num_rows == 2  # one part for the unit, one row a prompt
    _, _, m2 = run(tmp_path, tiny_model_dir, [path], name="r2", cache=str(cache))
    assert (m2["cache"]["hits"], m2["cache"]["scored"]) == (4, 0)
    assert sorted(cache.glob("*/part-*.parquet")) == parts  # nothing new scored: no new part


def test_the_manifest_lists_each_file_with_its_format_and_rows(tmp_path, tiny_model_dir):
    (tmp_path / "a.txt").write_text("a red cat\n\na dog\n")  # 3 rows, one of them empty
    pq.write_table(pa.table({"prompt": ["a blue car", None]}), tmp_path / "b.parquet")
    _, _, manifest = run(tmp_path, tiny_model_dir, [tmp_path / "a.txt", tmp_path / "b.parquet"])
    assert manifest["files"] == [{"path": str(tmp_path / "a.txt"), "format": "txt", "rows": 3},
                                 {"path": str(tmp_path / "b.parquet"), "format": "parquet", "rows": 2}]
    assert manifest["counts"]["rows_read"] == 5


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    import pytest

    from audit.tables import atomic_path

    target = tmp_path / "t.json"
    target.write_text("old")
    with pytest.raises(ValueError, match="stopped"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise ValueError("stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"] and target.read_text() == "old"


def test_a_unit_is_read_three_times_before_it_counts_as_unreadable(tmp_path, monkeypatch):
    """prepare_unit reads a unit that raises again, READ_ATTEMPTS (3) reads in all: two passing errors cost
    nothing, three make its rows unreadable_rows (under --skip-bad-files), after exactly three reads."""
    import audit.unit

    path = tmp_path / "p.txt"
    path.write_text("a red cat\na dog\n")
    files, _ = sources.discover([str(path)])
    unit = sources.plan_units(files, "prompt").units[0]
    cfg = RunConfig(inputs=(str(path),), skip_bad_files=True)
    real, calls = audit.unit.read_unit, []

    def failing(times):
        def read(u, *a, **k):
            calls.append(u.index)
            if len(calls) <= times:
                raise OSError(f"passing error {len(calls)}")
            return real(u, *a, **k)
        return read

    monkeypatch.setattr(audit.unit, "read_unit", failing(2))
    prep = audit.unit.prepare_unit(unit, cfg)
    assert (prep.prompts, prep.rej_reasons, len(calls)) == (["a red cat", "a dog"], [], 3)
    calls.clear()
    monkeypatch.setattr(audit.unit, "read_unit", failing(3))
    prep = audit.unit.prepare_unit(unit, cfg)
    assert prep.prompts == [] and prep.rej_reasons == ["unreadable_rows:OSError: passing error 3"] * 2
    assert len(calls) == 3


def test_a_unit_whose_every_miss_failed_adds_no_cache_part(tmp_path):
    """Only prompts scored without error are stored; when none was (every miss failed), no part is written,
    not an empty one (a part per unit that scored new prompts, cache layout)."""
    import numpy as np

    from audit.cache import ScoreCache, cached_scores
    from audit.scorers import result_columns

    cache = ScoreCache(tmp_path, "fp", {"scorer": "attention_entropy", "seed": 0})
    hashes = [f"{i:032x}" for i in range(2)]

    def all_fail(ps):
        return {c: np.zeros(len(ps)) for c in result_columns()}, [[] for _ in ps], {0: "scoring_error: x",
                                                                                    1: "scoring_error: y"}

    scores, _, errors, hits = cached_scores(cache, ["a", "b"], hashes, all_fail, tag="u000000")
    assert (errors, hits) == ({0: "scoring_error: x", 1: "scoring_error: y"}, 0)
    assert cache.files() == [] and list(cache.dir.glob("part-*")) == []


def test_rows_that_fail_to_score_keep_their_raw_prompt_in_rejects(tmp_path, tiny_model_dir, monkeypatch):
    """rejects.parquet's prompt is "the raw prompt when it was a string" (schemas/rejects.json): also for a row the
    model failed on (scoring_error), whose prompt was normalized before scoring. Both rows of the failing prompt
    (one with surrounding spaces, one as is) are rejected, each with its own text; the others are scored."""
    fail_batches_with(monkeypatch, "poison")
    path = tmp_path / "p.txt"
    path.write_text("a red cat\n  a poison apple \na poison apple\na dog\n")
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path], max_error_fraction=1.0)
    assert sorted(risk["row"]) == [0, 3]
    assert sorted(rejects.select("row", "reason", "prompt").rows()) == [
        (1, "scoring_error", "  a poison apple "), (2, "scoring_error", "a poison apple")]
    assert manifest["counts"]["rejected_by_reason"] == {"scoring_error": 2}


def test_a_prompt_with_nonfinite_attention_is_rejected_not_ranked(tmp_path, tiny_model_dir, monkeypatch):
    """A prompt whose scores come back with ``nonfinite`` set is rejected as nonfinite_attention (every row of it),
    never ranked; the other prompts are scored."""
    import numpy as np

    import audit.unit

    real = audit.unit.score_prompts

    def score(scorer, prompts, *a, **k):
        scores, triggers, errors = real(scorer, prompts, *a, **k)
        bad = np.array(["nan" in p for p in prompts])
        scores["nonfinite"] = np.where(bad, 1.0, scores["nonfinite"])
        return scores, triggers, errors

    monkeypatch.setattr(audit.unit, "score_prompts", score)
    path = tmp_path / "p.txt"
    path.write_text("a red cat\na nan dog\na blue car\na nan dog\n")
    risk, rejects, manifest = run(tmp_path, tiny_model_dir, [path], max_error_fraction=1.0)
    assert sorted(risk["row"]) == [0, 2]
    assert sorted(rejects.select("row", "reason", "prompt").rows()) == [
        (1, "nonfinite_attention", "a nan dog"), (3, "nonfinite_attention", "a nan dog")]
    assert manifest["counts"]["rejected_by_reason"] == {"nonfinite_attention": 2}


def test_a_rerun_of_a_finished_folder_keeps_its_first_start(tmp_path):
    """first_started_at is the first finished invocation's start: a folder run three times keeps the first one,
    not the previous invocation's started_at (which the second rerun would otherwise take)."""
    import json

    from audit.pipeline import _first_started_at

    (tmp_path / "manifest.json").write_text(json.dumps({"first_started_at": "2026-01-01T00:00:00+00:00",
                                                         "started_at": "2026-01-02T00:00:00+00:00"}))
    assert _first_started_at(tmp_path, "2026-01-03T00:00:00+00:00") == "2026-01-01T00:00:00+00:00"
    (tmp_path / "manifest.json").write_text(json.dumps({"started_at": "2026-01-02T00:00:00+00:00"}))  # older
    assert _first_started_at(tmp_path, "2026-01-03T00:00:00+00:00") == "2026-01-02T00:00:00+00:00"
    assert _first_started_at(tmp_path / "new", "2026-01-03T00:00:00+00:00") == "2026-01-03T00:00:00+00:00"
