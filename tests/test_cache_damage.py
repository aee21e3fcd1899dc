"""The score cache is an optimization, never a reason for a run to fail or be wrong: what is keyed (device,
compile, the model's score settings), parts that must not be served (near-right schemas, corrupt pages), and a
cache folder damaged around its parts. Found by an adversarial helper (session 29): each case below failed a run
or served wrong scores before."""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from audit.cache import (SCORE_COLUMNS, STALE_TMP_S, ScoreCache, _schema, cache_config, cache_dir, cache_key,
                         open_cache)
from helpers import CACHE_HASHES, filled_cache, flip_a_bit_in_the_risk_page as _flip_a_bit_in_the_risk_page

HASHES = CACHE_HASHES


def _filled(tmp_path, parts: int = 3) -> ScoreCache:
    """A cache of 12 entries (risk = 0..11) in ``parts`` files, under ``tmp_path/cache``."""
    return filled_cache(tmp_path / "cache", parts)


def test_device_kind_and_compile_are_keyed_and_the_key_is_what_open_cache_uses(tmp_path, monkeypatch):
    import torch

    from audit.models.base import device_kind

    sc = {"scorer": "attention_entropy", "seed": 0, "first_timestep": 981}
    kinds = ("cpu:1", "cpu:2", "cuda:NVIDIA H200", "cuda:NVIDIA A100-SXM4-80GB")
    keys = {cache_key("fp", cache_config(sc, dev, comp)) for dev in kinds for comp in (False, True)}
    assert len(keys) == 8
    threads = torch.get_num_threads()
    try:  # the CPU thread count splits reductions differently: keyed
        torch.set_num_threads(1)
        assert device_kind("cpu") == device_kind(torch.device("cpu")) == "cpu:1"
    finally:
        torch.set_num_threads(threads)

    config = SimpleNamespace(to_dict=lambda: {"scorer": "attention_entropy", "seed": 0})
    model = SimpleNamespace(fingerprint="fp")
    eager = open_cache(tmp_path, SimpleNamespace(config=config, first_timestep=981, model=model, compiled=False),
                       "cpu:2")
    compiled = open_cache(tmp_path, SimpleNamespace(config=config, first_timestep=981, model=model, compiled=True),
                          "cpu:2")
    assert eager.dir.name == cache_key("fp", cache_config(sc, "cpu:2", False)) != compiled.dir.name
    eager.put(HASHES[:2], {c: np.ones(2) for c in SCORE_COLUMNS}, [[]] * 2)
    assert compiled.lookup(HASHES[:2]).num_rows == 0 and eager.lookup(HASHES[:2]).num_rows == 2
    assert json.loads((eager.dir / "key.json").read_text())["score_config"]["compiled"] is False


def test_the_models_score_settings_are_in_its_fingerprint(tmp_path, tiny_model_dir):
    from audit.models import fingerprint_files

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    plain = fingerprint_files(model)
    (model / "memaudit.json").write_text(json.dumps({"description": "a note", "default_layers": ["x"]}))
    assert fingerprint_files(model) == plain  # a description and the layers (in the score config) change nothing
    (model / "memaudit.json").write_text(json.dumps({"unet_encoder_attention_mask": "bos_and_prompt_tokens"}))
    masked = fingerprint_files(model)
    (model / "memaudit.json").write_text(json.dumps({"guidance_geometry_weights": [1.0, 2.0, 3.0]}))
    weighted = fingerprint_files(model)
    assert len({plain, masked, weighted}) == 3


@pytest.mark.parametrize("change", ["float32", "missing", "extra"])
def test_a_part_with_a_near_right_schema_is_set_aside_before_any_row_is_served(tmp_path, change):
    cache = _filled(tmp_path)
    victim = cache.files()[0]
    table = pq.read_table(victim)
    kept = sorted(set(range(12)) - set(table.column("risk").to_pylist()))
    if change == "float32":  # a dataset given the cache schema would cast it and serve rounded scores
        table = table.set_column(table.schema.get_field_index("risk"), "risk",
                                 table.column("risk").cast(pa.float32()))
    elif change == "missing":  # ... or fill the column with nulls
        table = table.drop_columns(["risk"])
    else:
        table = table.append_column("other", pa.array(np.zeros(table.num_rows)))
    pq.write_table(table, victim)
    found = cache.lookup(HASHES)
    assert sorted(found.column("risk").to_pylist()) == kept and len(kept) == 8
    assert found.column("risk").null_count == 0
    assert (cache.dir / "damaged" / victim.name).exists() and not victim.exists()
    assert len(cache.notes) == 1 and "schema is not the cache's" in cache.notes[0]


def test_a_corrupt_data_page_fails_its_checksum_and_is_set_aside(tmp_path):
    cache = _filled(tmp_path)
    victim = cache.files()[1]
    kept = sorted(set(range(12)) - set(pq.read_table(victim).column("risk").to_pylist()))
    _flip_a_bit_in_the_risk_page(victim)
    found = cache.lookup(HASHES)
    assert sorted(found.column("prompt_hash").to_pylist()) == [HASHES[i] for i in kept]
    assert sorted(found.column("risk").to_pylist()) == kept and len(kept) == 8
    assert (cache.dir / "damaged" / victim.name).exists() and len(cache.notes) == 1
    assert cache.lookup(HASHES).num_rows == 8  # and the next lookup reads only the good parts


def test_damage_around_the_parts_never_fails_the_cache(tmp_path):
    cache = _filled(tmp_path)
    (cache.dir / ".compact.lock").unlink(missing_ok=True)
    (cache.dir / ".compact.lock").mkdir()  # compaction cannot lock: a note, nothing merged
    assert cache.compact(max_files=0) == 0 and "was not compacted" in cache.notes[-1]
    assert len(cache.files()) == 3

    (cache.dir / "damaged").write_text("a file where the damaged folder goes")
    victim = cache.files()[0]
    victim.write_bytes(victim.read_bytes()[:50])
    assert cache.lookup(HASHES).num_rows == 8  # the truncated part is skipped although it cannot be moved
    assert victim.exists() and "left in place" in cache.notes[-1]
    assert victim not in cache.files()

    root = tmp_path / "blocked"
    root.mkdir()
    key = cache_key("fp", {"scorer": "attention_entropy"})
    (root / key).write_text("a file where the key folder goes")
    blocked = ScoreCache(root, "fp", {"scorer": "attention_entropy"})
    assert blocked.unusable and "scoring without the cache" in blocked.notes[0]
    blocked.put(HASHES[:1], {c: np.ones(1) for c in SCORE_COLUMNS}, [[]])  # nothing stored, no error
    assert blocked.lookup(HASHES).num_rows == 0 and blocked.compact(max_files=0) == 0


def test_compaction_removes_temporary_files_of_killed_writes_only_when_stale(tmp_path):
    cache = _filled(tmp_path)
    stale, fresh = cache.dir / ".part-u000001-aaaa.parquet.1234abcd.tmp", cache.dir / ".part-u2.parquet.ff.tmp"
    stale.write_bytes(b"half a file")
    fresh.write_bytes(b"being written now")
    old = time.time() - STALE_TMP_S - 60
    os.utime(stale, (old, old))
    assert cache.compact(max_files=0) == 3
    assert not stale.exists() and fresh.exists()
    merged = cache.files()
    assert len(merged) == 1 and pq.ParquetFile(merged[0]).metadata.row_group(0).column(1).statistics is not None
    assert sorted(cache.lookup(HASHES).column("risk").to_pylist()) == [float(i) for i in range(12)]


def test_parts_are_written_with_page_checksums(tmp_path):
    cache = _filled(tmp_path, parts=1)
    assert pq.read_schema(cache.files()[0]).equals(_schema())
    part = cache.files()[0]
    pq.read_table(part, page_checksum_verification=True)  # verifies when checksums exist
    _flip_a_bit_in_the_risk_page(part)
    with pytest.raises(OSError, match="(?i)crc|checksum"):  # only a file with checksums fails so: ours have them
        pq.read_table(part, page_checksum_verification=True)


def test_cache_paths(tmp_path, monkeypatch):
    from audit.config import validate_config
    from audit.pipeline import RunConfig, RunError
    from audit.runner import execute

    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir("~/scores") == tmp_path / "scores"
    assert cache_dir("cc:d") == Path("cc:d")  # a colon is a folder name, not a URL
    with pytest.raises(ValueError, match="not read from URLs"):
        cache_dir("s3://bucket/cache")
    ok = RunConfig(inputs=("x.txt",), cache="~/scores", out=str(tmp_path / "run"))
    validate_config(ok)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")  # links resolved: the check used to compare paths as written
    with pytest.raises(RunError, match="a folder of its own"):
        validate_config(RunConfig(inputs=("x.txt",), cache=str(tmp_path / "link"), out=str(tmp_path / "real")))
    (tmp_path / "x.txt").write_text("a red cat\n")
    monkeypatch.chdir(tmp_path)  # no --out: the default run folder ./memaudit-runs/<time> may not be inside the cache
    with pytest.raises(RunError, match="the default run folder memaudit-runs/.*a folder of its own"):
        execute(RunConfig(inputs=("x.txt",), cache="memaudit-runs"), progress=False, log=lambda m: None)
    for out, cache in [("run", "run"), ("run", "run/cache"), ("cache/run", "cache"), ("~/c", "~/c/x")]:
        with pytest.raises(RunError, match="a folder of its own"):
            validate_config(RunConfig(inputs=("x.txt",), cache=str(tmp_path / cache) if "~" not in cache else cache,
                                      out=str(tmp_path / out) if "~" not in out else out))


def test_a_run_with_a_blocked_cache_scores_everything_and_warns(tmp_path, tiny_model_dir):
    """The key folder is a file: before, every unit failed (FileExistsError); now the run scores without the
    cache, warns once, and its manifest says why."""
    import audit
    from audit.cli import app
    from audit.pipeline import RunConfig
    from audit.runner import execute

    prompts = tmp_path / "in" / "p.txt"
    prompts.parent.mkdir()
    prompts.write_text("a red cat\na blue dog\nold city street\n")
    cfg = RunConfig(inputs=(str(prompts),), model=str(tiny_model_dir), device="cpu", cache=str(tmp_path / "c"),
                    out=str(tmp_path / "r1"), batch_size=2, unit_rows=2)
    _, m1 = execute(cfg, progress=False, log=lambda m: None)
    assert m1["cache"]["scored"] == 3 and "warnings" not in m1["cache"]
    key = next((tmp_path / "c").iterdir())
    shutil.rmtree(key)
    key.write_text("not a folder")
    res = CliRunner().invoke(app, ["run", str(prompts), "--model", str(tiny_model_dir), "--device", "cpu",
                                   "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r2"),
                                   "--batch-size", "2", "--unit-rows", "2"])
    assert res.exit_code == 0, res.output
    m2 = json.loads((tmp_path / "r2" / "manifest.json").read_text())
    assert m2["counts"]["scored"] == 3 and m2["cache"]["hits"] == 0
    assert len(m2["cache"]["warnings"]) == 1 and "scoring without the cache" in m2["cache"]["warnings"][0]
    assert res.output.count("memaudit: warning: score cache:") == 1
    logs: list[str] = []  # audit.run's log= gets the same warning
    audit.run(str(prompts), out=str(tmp_path / "r3"), model=str(tiny_model_dir), device="cpu", batch_size=2,
              unit_rows=2, cache=str(tmp_path / "c"), log=logs.append)
    assert sum("memaudit: warning: score cache:" in m for m in logs) == 1
    assert pq.read_table(tmp_path / "r2" / "risk.parquet").column("risk").equals(
        pq.read_table(tmp_path / "r1" / "risk.parquet").column("risk"))


def test_a_cache_inside_an_input_folder_is_not_read_as_prompts(tmp_path):
    from audit.sources import discover

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "day1.txt").write_text("a red cat\n")
    _filled(logs / "inner")
    files, skipped = discover([str(logs)])
    assert [Path(f.url).name for f in files] == ["day1.txt"]
    assert any(s["reason"] == "a memaudit output folder" and "cache" in s["path"] for s in skipped)


def test_a_write_error_while_compacting_changes_nothing(tmp_path, monkeypatch):
    """A full disk during compaction used to blame the parts being read (moved to damaged/), commit a truncated
    merged file and delete the parts merged so far: their scores were lost."""
    import errno

    cache = _filled(tmp_path, parts=6)
    before = sorted(f.name for f in cache.files())
    calls = {"n": 0}
    real = pq.ParquetWriter.write_batch

    def failing(self, batch, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.EFBIG, "File too large")
        return real(self, batch, *a, **kw)

    monkeypatch.setattr(pq.ParquetWriter, "write_batch", failing)
    assert cache.compact(max_files=0) == 0
    assert "was not compacted (OSError: [Errno 27] File too large)" in cache.notes[-1] and len(cache.notes) == 1
    assert sorted(f.name for f in cache.files()) == before and not (cache.dir / "damaged").exists()
    assert not list(cache.dir.glob(".*.tmp")) and not list(cache.dir.glob("part-compact-*"))
    monkeypatch.setattr(pq.ParquetWriter, "write_batch", real)
    assert sorted(cache.lookup(HASHES).column("risk").to_pylist()) == [float(i) for i in range(12)]
    assert cache.compact(max_files=0) == 6 and len(cache.files()) == 1


def test_an_os_error_on_read_skips_a_part_without_blaming_it(tmp_path, monkeypatch):
    """Permission, EIO or too many open files say nothing about a part's content: it stays in place."""
    import errno

    cache = _filled(tmp_path)
    victim = cache.files()[0]
    real = pq.read_schema

    def flaky(path, *a, **kw):
        if Path(path) == victim:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(pq, "read_schema", flaky)  # audit.cache imports pyarrow.parquet where it reads
    assert cache.lookup(HASHES).num_rows == 8
    assert victim.exists() and not (cache.dir / "damaged").exists()
    assert "cannot be read now (PermissionError" in cache.notes[0] and "left in place" in cache.notes[0]
    monkeypatch.setattr(pq, "read_schema", real)
    assert ScoreCache(tmp_path / "cache", "fp", {"scorer": "attention_entropy", "seed": 0}).lookup(HASHES).num_rows == 12


def test_stale_tmp_folders_and_repeated_damage_names(tmp_path):
    cache = _filled(tmp_path)
    (cache.dir / ".part-x.parquet.ab.tmp").mkdir()  # a folder of that name used to stop every compaction
    old = time.time() - STALE_TMP_S - 60
    os.utime(cache.dir / ".part-x.parquet.ab.tmp", (old, old))
    assert cache.compact(max_files=0) == 3 and not cache.notes
    part = cache.files()[0]
    for _ in range(2):  # the same part name damaged twice: both copies kept
        part.write_bytes(b"not parquet")
        assert cache.lookup(HASHES).num_rows == 0
        cache._bad.clear()
    assert len(list((cache.dir / "damaged").iterdir())) == 2


def test_a_cache_folder_whose_key_json_is_not_its_names_serves_nothing(tmp_path, tiny_model_dir):
    """A seed-1 cache folder renamed to the seed-0 folder's name served its seed-1 scores to a seed-0 run ('71 hits',
    risks up to 0.106 off): the folder's name is a hash of its key, and key.json was never compared with it. A
    key.json that names another configuration, or is not JSON, makes the cache unusable for the run: every prompt
    is scored, the run's risks equal an uncached run's, and one warning says why."""
    import audit

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nold boat\nblue sky\n")
    common = dict(model=str(tiny_model_dir), device="cpu", batch_size=4, log=lambda m: None)
    audit.run(str(prompts), out=str(tmp_path / "s1"), seed=1, cache=str(tmp_path / "c1"), **common)
    audit.run(str(prompts), out=str(tmp_path / "s0"), seed=0, cache=str(tmp_path / "c0"), **common)
    (seed0,) = list((tmp_path / "c0").iterdir())
    (seed1,) = list((tmp_path / "c1").iterdir())
    shutil.rmtree(seed0)
    shutil.copytree(seed1, seed0)  # the seed-1 folder under the seed-0 folder's name
    logs: list[str] = []
    _, m = audit.run(str(prompts), out=str(tmp_path / "again"), seed=0, cache=str(tmp_path / "c0"),
                     **(common | {"log": logs.append}))
    assert (m["cache"]["hits"], m["cache"]["units_without_cache"]) == (0, 1)
    assert pq.read_table(tmp_path / "again" / "risk.parquet")["risk"].to_pylist() == \
        pq.read_table(tmp_path / "s0" / "risk.parquet")["risk"].to_pylist()
    assert m["cache"]["warnings"] == [
        f"score cache: {seed0 / 'key.json'} names another model or score configuration than its folder's name stands "
        f"for (a folder renamed, or copied over another?): move {seed0} aside or delete it, and the next run starts it "
        "anew; scoring without the cache"]
    (seed0 / "key.json").write_text("{bad")
    _, m = audit.run(str(prompts), out=str(tmp_path / "again2"), seed=0, cache=str(tmp_path / "c0"), **common)
    assert m["cache"]["warnings"] == [f"score cache: {seed0 / 'key.json'} is damaged (not JSON): move {seed0} aside or "
                                      "delete it, and the next run starts it anew; scoring without the cache"] \
        and m["cache"]["hits"] == 0
