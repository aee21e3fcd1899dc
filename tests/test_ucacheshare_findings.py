"""Findings of an ML-platform team sharing one score cache folder (``memaudit run --cache DIR``) among many
scheduled jobs: Ray jobs on a cluster started elsewhere, folders other jobs made, and what each run says."""

from __future__ import annotations

from dataclasses import asdict
import os

import polars as pl

from audit.pipeline import RunConfig
from audit.runner import execute

PROMPTS = ["a red cat on a beach", "old city street at night", "a blue dog", "portrait of a woman",
           "sunset over the lake", "a small boat", "green forest river", "black car at night", "a red cat on a beach"]


def _txt(path, prompts):
    path.write_text("".join(p + "\n" for p in prompts))
    return path


def _actors_in(folder, monkeypatch):
    """Run the Ray engine's units as its actors do (process_units in a worker process) but in this process, from
    ``folder``: the working folder of Ray workers started by ``ray start`` elsewhere, or on another pod."""
    import audit.engines.ray as r
    from audit.models import load_model
    from audit.scorers import Scorer
    from audit.unit import process_units

    def fake_run(ray, units, cfg, shard_dir, progress, model_arg, score_config, fingerprint, log=None):
        here = os.getcwd()
        os.chdir(folder)
        try:
            scorer = Scorer(load_model(model_arg, "cpu", score_config.dtype), score_config)
            out = []
            for group in [r.as_group(u) for u in units]:
                out += [asdict(s) for s in process_units(group, scorer, cfg, shard_dir)]
            return sorted(out, key=lambda s: s["unit"])
        finally:
            os.chdir(here)

    monkeypatch.setattr(r, "connect", lambda address: False)
    monkeypatch.setattr(r, "worker_count", lambda cfg: 1)
    monkeypatch.setattr(r, "_run", fake_run)


def test_ray_actors_use_the_drivers_relative_cache_folder(tmp_path, tiny_model_dir, monkeypatch):
    """``--engine ray --address auto --cache score-cache`` from /srv/jobs: the actors, whose working folder is where
    ``ray start`` ran, wrote the cache there (``/tmp/head/score-cache``); the job's own folder stayed empty, the end
    of the run warned "score-cache/<key> is not a folder (any more); it was not compacted", and a local job sharing
    the folder never saw those scores. Now the actors get the folder made absolute on the driver."""
    import shutil

    driver, head = tmp_path / "jobs", tmp_path / "head"
    driver.mkdir()
    head.mkdir()
    _txt(driver / "p.txt", PROMPTS)
    monkeypatch.chdir(driver)
    _actors_in(head, monkeypatch)
    base = RunConfig(inputs=("p.txt",), model=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=8,
                     cache="score-cache")
    _, m1 = execute(RunConfig(**{**base.to_dict(), "out": str(tmp_path / "ray1"), "engine": "ray"}),
                    progress=False, log=lambda m: None)
    assert list(head.iterdir()) == []  # nothing written in the workers' folder
    parts = list((driver / "score-cache").glob("*/part-*.parquet"))
    assert len(parts) == 1 and pl.read_parquet(parts[0]).height == 8
    # no warning, no dirs; rows: 8 prompts on 9 rows
    assert m1["cache"] == {"dir": "score-cache", "hits": 0, "scored": 9, "compacted_files": 0}
    # a local job sharing the folder is served the Ray job's scores, bit for bit
    _, m2 = execute(RunConfig(**{**base.to_dict(), "out": str(tmp_path / "local")}), progress=False,
                    log=lambda m: None)
    assert m2["cache"] == {"dir": "score-cache", "hits": 9, "scored": 0, "compacted_files": 0}
    cols = ["row", "prompt_hash", "risk", "attn_entropy", "bos_mass"]
    ray_t = pl.read_parquet(tmp_path / "ray1" / "risk.parquet").select(cols).sort("row")
    local_t = pl.read_parquet(tmp_path / "local" / "risk.parquet").select(cols).sort("row")
    assert ray_t.height == 9 and ray_t.equals(local_t)
    # the end of a Ray run compacts the folder its actors used (34 parts: more than 32), as a local run's does
    for i in range(33):
        shutil.copy(parts[0], parts[0].with_name(f"part-copy{i:02d}.parquet"))
    _, m3 = execute(RunConfig(**{**base.to_dict(), "out": str(tmp_path / "ray2"), "engine": "ray"}),
                    progress=False, log=lambda m: None)
    assert m3["cache"] == {"dir": "score-cache", "hits": 9, "scored": 0, "compacted_files": 34}
    assert len(list((driver / "score-cache").glob("*/part-*.parquet"))) == 1


def test_ray_actors_load_the_drivers_relative_model_and_write_the_drivers_relative_out(tmp_path, tiny_model_dir,
                                                                                       monkeypatch):
    """``--engine ray --address auto --model m1 --out runs/x`` from the job's folder: the actors, in the workers'
    working folder, failed the run with "the scoring workers could not start: --model m1: no such folder" (with an
    absolute --model, "runs/x/shards/unit-000000.risk.parquet: no such folder runs/x/shards"), though both exist
    where the job started. Now both reach the actors absolute; the run scores every row."""
    import shutil

    driver, head = tmp_path / "jobs", tmp_path / "head"
    head.mkdir()
    shutil.copytree(tiny_model_dir, driver / "m1")
    _txt(driver / "p.txt", PROMPTS)
    monkeypatch.chdir(driver)
    _actors_in(head, monkeypatch)
    out, m = execute(RunConfig(inputs=("p.txt",), model="m1", out="runs/x", engine="ray", device="cpu",
                               dtype="float32", batch_size=8), progress=False, log=lambda m: None)
    assert (m["counts"]["rows_read"], m["counts"]["scored"], m["counts"]["unique_prompts"]) == (9, 9, 8)
    assert list(head.iterdir()) == []
    assert (driver / "runs" / "x" / "shards" / "unit-000000.risk.parquet").is_file()
    assert pl.read_parquet(driver / "runs" / "x" / "risk.parquet").height == 9


def test_a_cache_folder_that_refuses_writes_is_one_warning_with_the_runs_total(tmp_path, tiny_model_dir, monkeypatch):
    """A key folder that another job's user made (755) or a read-only mount under a writable --cache: every unit's
    store failed and warned, each line naming its own temporary file (one warning a unit, in the terminal and the
    manifest: 7 for a run of 415 rows at --unit-rows 40). Now the run warns once, with the total not stored and the
    system's reason."""
    import errno

    import pyarrow.parquet as pq

    real = pq.write_table

    def read_only(table, where, **kw):
        if os.path.basename(str(where)).startswith(".part-"):  # a cache part; the run's shards are written as ever
            raise OSError(errno.EROFS, f"Failed to open local file '{where}'. Detail: [errno 30] Read-only file "
                                       "system")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", read_only)
    _txt(tmp_path / "p.txt", PROMPTS)
    lines: list[str] = []
    _, m = execute(RunConfig(inputs=(str(tmp_path / "p.txt"),), model=str(tiny_model_dir), out=str(tmp_path / "r"),
                             device="cpu", batch_size=8, unit_rows=3, cache=str(tmp_path / "c")),
                   progress=False, log=lines.append)
    assert m["units"]["total"] == 3
    folder = next((tmp_path / "c").iterdir())
    # 9: the repeated prompt of the third unit was not in the cache either, so it was scored (and not stored) again
    warning = (f"score cache: cannot store 9 new scores in {folder} (OSError: [Errno 30] Read-only file system); "
               "they are in this run's table, and scored again next time")
    assert m["cache"]["warnings"] == [warning]
    assert [x for x in lines if "score cache" in x] == [f"memaudit: warning: {warning}"]
    assert (m["cache"]["hits"], m["cache"]["scored"], m["counts"]["scored"]) == (0, 9, 9)


def test_a_cache_on_a_read_only_mount_is_refused_saying_so(tmp_path, monkeypatch):
    """A shared cache mounted read-only for a job was refused with "(no write permission)", which sent the team to
    chmod and chown (both right); the line now says the file system is read-only. A folder that is merely not
    writable keeps its words. (The tests run as root: os.access and os.statvfs are stubbed.)"""
    import types

    from audit.config import check_folder_creatable
    from audit.errors import RunError
    import pytest

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_flag=os.ST_RDONLY | os.ST_NOSUID))
    with pytest.raises(RunError) as err:
        check_folder_creatable(tmp_path, "--cache shared")
    assert str(err.value) == f"--cache shared: cannot write in {tmp_path} (on a read-only file system)"
    with pytest.raises(RunError) as err:
        check_folder_creatable(tmp_path / "new", "--cache shared/new")
    assert str(err.value) == f"--cache shared/new: cannot make a folder in {tmp_path} (on a read-only file system)"
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_flag=os.ST_NOSUID))
    with pytest.raises(RunError) as err:
        check_folder_creatable(tmp_path, "--cache shared")
    assert str(err.value) == f"--cache shared: cannot write in {tmp_path} (no write permission)"


def _toy_compute(ctx):
    """1 - BOS mass (float64 [B], on the device): a team's own scorer."""
    return {"toy_score": 1.0 - ctx.a[:, 0]}


def test_a_job_with_its_own_scorer_and_a_cli_job_share_the_cache_without_setting_parts_aside(tmp_path,
                                                                                           tiny_model_dir):
    """A Python job that registers a scorer of its own (register()) and a CLI job both run attention_entropy on one
    cache. The first wrote its parts with its scorer's column too (the cache's columns were every registered
    scorer's); the CLI job found them "not the cache's schema: no column toy_score", moved them to damaged/ and
    scored every prompt again, and the next run of the first job did the same to the CLI's parts, every night. Now a
    key folder's parts hold the same columns in every process: each job gets the other's scores, bit for bit."""
    import audit.cache
    from audit.scorers import Column, ScorerSpec, register, unregister

    _txt(tmp_path / "p.txt", PROMPTS)
    cfg = RunConfig(inputs=(str(tmp_path / "p.txt"),), model=str(tiny_model_dir), device="cpu", batch_size=8,
                    cache=str(tmp_path / "shared"))

    def job(name, plugin):
        if plugin:
            register(ScorerSpec(name="toy", description="1 - BOS mass", forward="partial_conditional",
                                compute=_toy_compute, risk_column="toy_score",
                                columns=(Column("toy_score", "double", "1 - bos_mass"),)))
        audit.cache._CHECKED.clear()  # each job is its own process: no footer known checked
        lines: list[str] = []
        try:
            out, m = execute(RunConfig(**{**cfg.to_dict(), "out": str(tmp_path / name)}), progress=False,
                             log=lines.append)
        finally:
            if plugin:
                unregister("toy")
        return pl.read_parquet(out / "risk.parquet").sort("row"), m, [x for x in lines if "score cache" in x]

    t1, m1, w1 = job("plugin1", True)
    t2, m2, w2 = job("cli", False)
    t3, m3, w3 = job("plugin2", True)
    assert [(m["cache"]["hits"], m["cache"]["scored"]) for m in (m1, m2, m3)] == [(0, 9), (9, 0), (9, 0)]
    assert w1 == w2 == w3 == [] and "warnings" not in m2["cache"] and "warnings" not in m3["cache"]
    folder = next((tmp_path / "shared").iterdir())
    assert not (folder / "damaged").exists() and len(list(folder.glob("part-*.parquet"))) == 1
    assert t1.equals(t3) and t1["toy_score"].is_null().all()  # the plugin job's table, served from the cache
    assert t1.drop("toy_score").equals(t2)


def test_the_end_of_run_compaction_takes_the_folders_columns_from_its_key(tmp_path):
    """ScoreCache.existing (the end-of-run compaction) without a scorer reads it from key.json: a folder of a
    registered scorer's compacts with that scorer's column, not set aside as another schema; a folder whose
    key.json is gone (a cleanup job) is left alone with a note, never compacted with a guessed schema."""
    import numpy as np

    from audit.cache import ScoreCache, cache_columns
    from audit.scorers import Column, ScorerSpec, register, unregister

    register(ScorerSpec(name="toy", description="1 - BOS mass", forward="partial_conditional", compute=_toy_compute,
                        risk_column="toy_score", columns=(Column("toy_score", "double", "1 - bos_mass"),)))
    try:
        assert "toy_score" in cache_columns("toy") and "toy_score" not in cache_columns("attention_entropy")
        cache = ScoreCache(tmp_path / "c", "fp", {"scorer": "toy", "seed": 0})
        for i in range(3):
            cache.put([f"h{i}"], {c: np.array([float(i)]) for c in cache.columns}, [[]])
        again = ScoreCache.existing(tmp_path / "c", cache.dir.name)
        assert again.columns == cache.columns and again.compact(max_files=1) == 3 and again.notes == []
        assert sorted(cache.lookup(["h0", "h1", "h2"]).column("toy_score").to_pylist()) == [0.0, 1.0, 2.0]
        (cache.dir / "key.json").unlink()
        gone = ScoreCache.existing(tmp_path / "c", cache.dir.name)
        assert gone.compact(max_files=0) == 0 and gone.notes == [
            f"score cache: {cache.dir / 'key.json'} does not say which scorer the folder holds; it was not compacted"]
    finally:
        unregister("toy")


def test_the_first_run_after_an_upgrade_names_the_older_format_folders_it_does_not_read(tmp_path, tiny_model_dir):
    """A cache filled by an earlier memaudit (cache format 5) gave the upgraded jobs 0 hits without a word, and the
    shared folder then held two folders with the same key.json: nothing told the team which was dead. The run that
    makes the new folder now warns once, naming the older folder and its format; the next run says nothing."""
    import hashlib
    import json
    import shutil

    from audit.cache import CACHE_FORMAT

    _txt(tmp_path / "p.txt", PROMPTS)
    cfg = RunConfig(inputs=(str(tmp_path / "p.txt"),), model=str(tiny_model_dir), device="cpu", batch_size=8)
    execute(RunConfig(**{**cfg.to_dict(), "out": str(tmp_path / "r0"), "cache": str(tmp_path / "c0")}),
            progress=False, log=lambda m: None)
    new = next((tmp_path / "c0").iterdir())
    held = json.loads((new / "key.json").read_text())
    keyed = json.dumps({"cache_format": CACHE_FORMAT - 1, "score_config": held["score_config"]}, sort_keys=True)
    digest = hashlib.blake2b(keyed.encode(), digest_size=8).hexdigest()
    old = tmp_path / "shared" / f"{held['model_fingerprint']}-{digest}"
    shutil.copytree(new, old)  # as the earlier memaudit left it: the same key.json, under its format's name
    lines: list[str] = []
    _, m = execute(RunConfig(**{**cfg.to_dict(), "out": str(tmp_path / "r1"), "cache": str(tmp_path / "shared")}),
                   progress=False, log=lines.append)
    warning = (f"score cache: {tmp_path / 'shared'} holds 1 folder(s) of this model that an earlier memaudit wrote in "
               f"an older cache format ({CACHE_FORMAT - 1}; this one writes {CACHE_FORMAT}) and this one does not "
               f"read: the prompts they hold are scored again into {new.name}; remove them to free the space "
               f"({old.name})")
    assert m["cache"]["warnings"] == [warning] and f"memaudit: warning: {warning}" in lines
    assert (m["cache"]["hits"], m["cache"]["scored"]) == (0, 9)
    _, m2 = execute(RunConfig(**{**cfg.to_dict(), "out": str(tmp_path / "r2"), "cache": str(tmp_path / "shared")}),
                    progress=False, log=lambda m: None)
    assert "warnings" not in m2["cache"] and (m2["cache"]["hits"], m2["cache"]["scored"]) == (9, 0)


def test_store_failures_merge_per_folder_and_reason_and_name_no_file(tmp_path, monkeypatch):
    """merge_notes sums the "cannot store" notes of one folder and reason, keeps other reasons and other notes apart
    in the order met; a write refused for permission (atomic_path's RunError, caused by the PermissionError) gives
    the system's reason, not the part's name. absolute_model leaves a hub id alone and makes a folder absolute."""
    import errno

    import numpy as np
    import pyarrow.parquet as pq

    from audit.cache import ScoreCache, merge_notes
    from audit.engines.ray import absolute_model

    cache = ScoreCache(tmp_path / "c", "fp", {"scorer": "attention_entropy", "seed": 0})

    def refused(table, where, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(where))

    monkeypatch.setattr(pq, "write_table", refused)
    cache.put(["h1", "h2"], {c: np.ones(2) for c in cache.columns}, [[], []])
    tail = "; they are in this run's table, and scored again next time"
    perm = f"score cache: cannot store 2 new scores in {cache.dir} (PermissionError: [Errno 13] Permission denied)"
    assert cache.notes == [perm + tail]
    full = f"score cache: cannot store 5 new scores in {cache.dir} (OSError: [Errno 28] No space left on device)"
    other = f"score cache: {cache.dir}/part-x.parquet cannot be read (ValueError: x); moved aside"
    assert merge_notes([perm + tail, other, full + tail, perm + tail, other]) == [
        f"score cache: cannot store 4 new scores in {cache.dir} (PermissionError: [Errno 13] Permission denied)"
        + tail, other, full + tail]
    assert absolute_model("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    monkeypatch.chdir(tmp_path)
    assert absolute_model("c") == str(tmp_path / "c")


def test_a_cache_no_unit_could_use_says_not_used_not_zero_sent(tmp_path, tiny_model_dir):
    """A shared cache whose key.json a job damaged: the run scored all 8 prompts without it and ended "cache 0 hits, 0
    sent to the model; 1 unit scored without a cache", as if nothing had been scored. It now says the cache was not
    used; a run that used it keeps the hits line."""
    from typer.testing import CliRunner

    from audit.cli import app

    _txt(tmp_path / "p.txt", PROMPTS)
    args = ["run", str(tmp_path / "p.txt"), "--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "8",
            "--cache", str(tmp_path / "c"), "--no-progress"]
    first = CliRunner().invoke(app, args + ["--out", str(tmp_path / "r1")])
    assert first.exit_code == 0 and "memaudit: cache 0 rows hit, 9 rows scored by the model\n" in first.output
    key = next((tmp_path / "c").iterdir()) / "key.json"
    key.write_text('{"model_fingerprint": ')
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "r2")])
    assert res.exit_code == 0
    assert [x for x in res.output.splitlines() if x.startswith("memaudit: cache")] == [
        "memaudit: cache not used: 1 unit scored without a cache"]
    assert (f"memaudit: warning: score cache: {key} is damaged (not JSON): move {key.parent} aside or delete it, and "
            "the next run starts it anew; scoring without the cache") in res.output
