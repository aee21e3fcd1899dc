"""`run --cache` (a rerun over a growing log scores only new prompts; outputs equal an uncached run) and
`run --config FILE.toml` (every option from TOML, flags overriding the file)."""

from __future__ import annotations

from dataclasses import fields, replace
import datetime as dt
import inspect
import json
import re
import sys

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import audit.unit
from audit.config import ConfigError, build_run_config, load_config_file
from audit.pipeline import RunConfig, RunError
from audit.runner import execute

DAY1 = ["a red cat", "a blue dog", "old city street", "a red cat", "sunset over the lake", None,
        "portrait of a woman", "a small boat", "night sky over the mountain", "  a blue dog  "]
DAY2 = ["a red cat", "green forest river", "white house by the sea", "a small boat", "big yellow flower",
        "", "black car at night", "a blue dog"]


def _write(path, prompts):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string()),
                             "user": [f"u{i % 3}" for i in range(len(prompts))]}), path)


def test_cache_rerun_scores_only_new_prompts_and_equals_uncached(tmp_path, tiny_model_dir, monkeypatch):
    scored: list[str] = []
    real = audit.unit.score_prompts

    def counting(scorer, prompts, *a, **kw):
        scored.extend(prompts)
        return real(scorer, prompts, *a, **kw)

    monkeypatch.setattr(audit.unit, "score_prompts", counting)
    logs = tmp_path / "logs"
    _write(logs / "date=2026-11-27" / "part-0.parquet", DAY1)
    base = RunConfig(inputs=(str(logs),), model=str(tiny_model_dir), device="cpu", keep_columns=("user",),
                     cache=str(tmp_path / "cache"), batch_size=4)
    _, m1 = execute(replace(base, out=str(tmp_path / "night1")), progress=False, log=lambda m: None)
    day1_unique = {p.strip() for p in DAY1 if p and p.strip()}
    assert sorted(scored) == sorted(day1_unique)
    # rows, as counts.scored: 7 unique prompts on 9 scored rows, each row's score from the model
    assert m1["cache"] == {"dir": str(tmp_path / "cache"), "hits": 0, "scored": 9, "compacted_files": 0}

    _write(logs / "date=2026-11-28" / "part-0.parquet", DAY2)  # the log grows
    scored.clear()
    _, m2 = execute(replace(base, out=str(tmp_path / "night2")), progress=False, log=lambda m: None)
    new = {p for p in DAY2 if p and p.strip()} - day1_unique
    assert sorted(scored) == sorted(new)  # only prompts never seen are scored
    # hits are counted in rows: night 2 reads day 1's 9 scored rows again and 3 repeats in day 2; day 2's 4 new
    # prompts on 4 rows are scored, and the two add up to the 16 rows scored
    assert m2["cache"]["hits"] == 9 + 3 and m2["cache"]["scored"] == len(new) == 4
    assert m2["cache"]["hits"] + m2["cache"]["scored"] == m2["counts"]["scored"] == 16

    scored.clear()
    _, m3 = execute(replace(base, out=str(tmp_path / "uncached"), cache=None), progress=False, log=lambda m: None)
    assert len(scored) == 7 + 4  # the two days' units are scored together (audit.unit.group_units): 3 repeats once
    cached = pl.read_parquet(tmp_path / "night2" / "risk.parquet")
    fresh = pl.read_parquet(tmp_path / "uncached" / "risk.parquet")
    assert cached.height == 9 + 7 and cached.equals(fresh)  # bit-identical scores, ranks, triggers
    assert pl.read_parquet(tmp_path / "night2" / "rejects.parquet").equals(
        pl.read_parquet(tmp_path / "uncached" / "rejects.parquet"))
    assert m2["counts"] == m3["counts"] and "cache" not in m3

    scored.clear()  # another score configuration has its own cache entries
    _, m4 = execute(replace(base, out=str(tmp_path / "seed1"), seed=1), progress=False, log=lambda m: None)
    assert m4["cache"]["hits"] == 3 and len(scored) == 7 + 4  # day 2's repeats hit day 1's fresh entries
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_resumed_runs_cache_figures_are_its_units_not_this_invocations_option(tmp_path, tiny_model_dir):
    """A run scored without --cache, resumed with it, said 'cache 0 hits, 7 sent to the model' and named the new
    cache, which none of its units had used; a cached run resumed with --cache '' lost its cache section. The
    figures are now those of the units that used a cache, each unit recording its cache folder, and the units
    scored without one are counted apart."""
    logs = tmp_path / "logs"
    _write(logs / "day1.parquet", DAY1)
    _write(logs / "day2.parquet", DAY2)
    base = RunConfig(inputs=(str(logs / "day1.parquet"),), model=str(tiny_model_dir), device="cpu", batch_size=4)
    plain = replace(base, out=str(tmp_path / "plain"))
    execute(plain, progress=False, log=lambda m: None)
    _, m = execute(replace(plain, cache=str(tmp_path / "cache")), progress=False, log=lambda m: None)
    assert m["units"]["resumed"] == 1 and m["cache"] == {"dir": str(tmp_path / "cache"), "hits": 0, "scored": 0,
                                                         "units_without_cache": 1, "compacted_files": 0}

    cached = replace(base, out=str(tmp_path / "cached"), cache=str(tmp_path / "cache"))
    _, m1 = execute(cached, progress=False, log=lambda m: None)
    assert m1["cache"] == {"dir": str(tmp_path / "cache"), "hits": 0, "scored": 9, "compacted_files": 0}  # rows
    _, m2 = execute(replace(cached, cache=None), progress=False, log=lambda m: None)  # resumed without the cache
    assert m2["units"]["resumed"] == 1 and m2["cache"] == m1["cache"]
    _, m3 = execute(replace(cached, cache=str(tmp_path / "other")), progress=False, log=lambda m: None)
    assert m3["cache"] == {"dir": str(tmp_path / "other"), "hits": 0, "scored": 9,
                           "dirs": [str(tmp_path / "cache")], "compacted_files": 0}
    done = json.loads(next((tmp_path / "cached" / "shards").glob("*.done.json")).read_text())
    assert done["stats"]["cache_dir"] == str(tmp_path / "cache") and done["stats"]["cache_hits"] == 0


def test_every_run_option_can_come_from_toml(tmp_path):
    values = {"inputs": '["a.parquet", "b/"]', "model": '"m"', "out": '"runs/{date}"', "prompt_column": '"text"',
              "id_column": '"id"', "batch_size": "7", "device": '"cpu"', "dtype": '"float32"',
              "layers": '"x.attn2, y.attn2"', "noise_draws": "3", "seed": "5", "limit": "100",
              "scorer": '"noise_magnitude"', "unit_rows": "50", "keep_columns": '["user", "app"]',
              "skip_bad_files": "true", "engine": '"ray"', "workers": "4", "address": '"auto"',
              "stall_timeout": "60", "calibration": '"{config_dir}/cal.json"', "fail_on_flagged": "2",
              "cache": '"cache"', "compile": "true", "confirm": '"guidance_geometry"', "confirm_top": '"1%"',
              "max_error_fraction": "0.05", "prepare_threads": "3", "noise_generator": '"philox"', "steps": "25",
              "retry_failed": "true"}
    missing = {f.name for f in fields(RunConfig)} - set(values)
    assert not missing, f"add the new RunConfig options to this test: {missing}"
    text = "\n".join(f"{k.replace('_', '-') if i % 2 else k} = {v}" for i, (k, v) in enumerate(values.items()))
    (tmp_path / "c.toml").write_text(text)
    got = load_config_file(tmp_path / "c.toml")
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    cfg = RunConfig(**got)
    assert cfg.inputs == ("a.parquet", "b/") and cfg.out == f"runs/{today}" and cfg.layers == ("x.attn2", "y.attn2")
    assert cfg.keep_columns == ("user", "app") and cfg.skip_bad_files is True and cfg.stall_timeout == 60.0
    assert cfg.calibration == str(tmp_path.resolve() / "cal.json") and cfg.fail_on_flagged == 2 and cfg.limit == 100
    assert cfg.compile is True and (cfg.confirm, cfg.confirm_top) == ("guidance_geometry", "1%")
    assert cfg.max_error_fraction == 0.05 and cfg.prepare_threads == 3 and cfg.noise_generator == "philox"
    assert cfg.steps == 25 and cfg.retry_failed is True


def test_cli_options_match_run_config():
    from audit.cli import run_cmd

    params = set(inspect.signature(run_cmd).parameters) - {"ctx", "config", "progress", "dry_run"}  # CLI only
    assert params == {f.name for f in fields(RunConfig)}


def test_flags_override_the_file_and_bad_files_are_clear(tmp_path):
    (tmp_path / "c.toml").write_text('inputs = "logs/"\nseed = 3\nbatch_size = 8\n[run]\ncache = "c"\n')
    defaults = {f.name: f.default for f in fields(RunConfig) if f.name != "inputs"} | {"inputs": ()}
    cfg = build_run_config(defaults | {"seed": 9}, {"seed"}, tmp_path / "c.toml")
    assert cfg.seed == 9 and cfg.batch_size == 8 and cfg.cache == "c" and cfg.inputs == ("logs/",)
    cfg = build_run_config(defaults | {"inputs": ("x.parquet",)}, {"inputs"}, tmp_path / "c.toml")
    assert cfg.inputs == ("x.parquet",)
    (tmp_path / "typo.toml").write_text('inputs = "a"\nbatch-sise = 4\n')
    with pytest.raises(ConfigError, match="unknown option 'batch-sise' .did you mean 'batch_size'"):
        load_config_file(tmp_path / "typo.toml")
    (tmp_path / "auto.toml").write_text('inputs = "a"\nbatch_size = "auto"\n')
    assert load_config_file(tmp_path / "auto.toml")["batch_size"] == "auto"
    (tmp_path / "type.toml").write_text('inputs = "a"\nseed = "zero"\n')
    with pytest.raises(ConfigError, match="'seed' must be int"):
        load_config_file(tmp_path / "type.toml")
    (tmp_path / "broken.toml").write_text('inputs = [\n')
    with pytest.raises(ConfigError, match="not valid TOML") as err:
        load_config_file(tmp_path / "broken.toml")
    assert "in quotes" not in str(err.value)
    (tmp_path / "bare.toml").write_text('inputs = ["a"]\nbatch_size = auto\n')
    with pytest.raises(ConfigError, match=r"not valid TOML .*text values go in quotes \(batch_size = \"auto\""):
        load_config_file(tmp_path / "bare.toml")
    (tmp_path / "twice.toml").write_text('inputs = "a"\nseed = 1\n[run]\nseed = 2\n')  # [run] used to win silently
    with pytest.raises(ConfigError, match=r"seed given both at the top level and in \[run\]"):
        load_config_file(tmp_path / "twice.toml")
    for text in ('batch-size = 64\nbatch_size = 32\n', 'batch-size = 64\n[run]\nbatch_size = 32\n'):  # the last won
        (tmp_path / "spelled.toml").write_text(text)
        with pytest.raises(ConfigError, match=r"^--config .*spelled\.toml: 'batch-size' and 'batch_size' are one "
                                              r"option given twice; keep one$"):
            load_config_file(tmp_path / "spelled.toml")

    from typer.testing import CliRunner

    from audit.cli import app

    (tmp_path / "empty.toml").write_text("seed = 1\n")
    res = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "empty.toml")])
    assert res.exit_code == 2 and "no inputs" in res.output
    res = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "typo.toml")])
    assert res.exit_code == 2 and "did you mean 'batch_size'" in res.output


def test_empty_flags_clear_the_files_options_and_batch_size_in_quotes(tmp_path, monkeypatch):
    """`--calibration ''` used to become the folder '.', and skip_bad_files = true could not be undone."""
    from typer.testing import CliRunner

    import audit.runner
    from audit.cli import app

    seen = []

    def capture(cfg, **_):
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(audit.runner, "execute", capture)
    (tmp_path / "c.toml").write_text('inputs = ["logs/"]\ncalibration = "cal.json"\nfail_on_flagged = 3\n'
                                      'cache = "c"\nskip_bad_files = true\nconfirm = "noise_magnitude"\n'
                                      'confirm_top = 10\n')
    res = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "c.toml")])
    assert res.exit_code == 0, res.output
    assert (seen[-1].calibration, seen[-1].fail_on_flagged, seen[-1].cache, seen[-1].skip_bad_files,
            seen[-1].confirm) == ("cal.json", 3, "c", True, "noise_magnitude")
    res = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "c.toml"), "--calibration", "", "--cache", "",
                                   "--no-skip-bad-files", "--confirm", "", "--confirm-top", ""])
    assert res.exit_code == 0, res.output
    assert (seen[-1].calibration, seen[-1].fail_on_flagged, seen[-1].cache, seen[-1].skip_bad_files,
            seen[-1].confirm, seen[-1].confirm_top) == (None, None, None, False, None, None)
    res = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "c.toml"), "--calibration", "",
                                   "--fail-on-flagged", "2"])
    assert res.exit_code == 0 and (seen[-1].calibration, seen[-1].fail_on_flagged) == (None, 2)  # given: kept
    (tmp_path / "q.toml").write_text('inputs = ["logs/"]\nbatch_size = "64"\n')
    from audit.config import validate_config

    defaults = {f.name: f.default for f in fields(RunConfig) if f.name != "inputs"} | {"inputs": ()}
    with pytest.raises(RunError, match="a number in quotes is text; write 64 without quotes"):
        validate_config(build_run_config(defaults, set(), tmp_path / "q.toml"))


def test_cache_compaction_keeps_every_entry_in_one_file(tmp_path):
    import numpy as np

    from audit.cache import SCORE_COLUMNS, ScoreCache

    cache = ScoreCache(tmp_path, "fp", {"scorer": "attention_entropy", "seed": 0})
    hashes = [f"{i:032x}" for i in range(40)]
    for i in range(0, 40, 4):  # 10 files of 4 entries
        part = hashes[i:i + 4]
        cache.put(part, {c: np.arange(i, i + 4, dtype=float) for c in SCORE_COLUMNS},
                  [[{"token": "cat", "position": 1, "mass": 0.5}]] * 4)
    before = cache.lookup(hashes[::3]).sort_by("prompt_hash")
    assert cache.compact(max_files=32) == 0 and len(cache.files()) == 10
    assert cache.compact(max_files=10) == 0 and len(cache.files()) == 10  # "more than max_files": 10 is not
    assert cache.compact(max_files=4) == 10 and len(cache.files()) == 1
    after = cache.lookup(hashes[::3]).sort_by("prompt_hash")
    assert after.equals(before) and after.num_rows == 14
    assert after.column("risk").to_pylist() == [float(i) for i in range(0, 40, 3)]
    cache.put(hashes[:2], {c: np.zeros(2) for c in SCORE_COLUMNS}, [[]] * 2)
    assert cache.compact(max_files=0, big_rows=40) == 1  # the 40-row file counts as big: left alone
    assert len(cache.files()) == 2


def test_a_damaged_cache_part_is_moved_aside_and_compaction_is_one_run_at_a_time(tmp_path):
    """A damaged part used to fail every run that used the cache (each unit three times, then the run); two
    runs compacting at once deleted the files the other was merging."""
    import fcntl

    import numpy as np

    from audit.cache import SCORE_COLUMNS, ScoreCache

    cache = ScoreCache(tmp_path, "fp", {"scorer": "attention_entropy", "seed": 0})
    hashes = [f"{i:032x}" for i in range(12)]
    for i in range(0, 12, 4):
        cache.put(hashes[i:i + 4], {c: np.arange(i, i + 4, dtype=float) for c in SCORE_COLUMNS}, [[]] * 4)
    damaged = cache.files()[1]
    damaged.write_bytes(damaged.read_bytes()[:100])
    found = cache.lookup(hashes)
    assert found.num_rows == 8 and len(cache.files()) == 2
    assert len(cache.notes) == 1 and re.search(r"cannot be read .* moved to .*damaged", cache.notes[0])
    assert (cache.dir / "damaged" / damaged.name).stat().st_size == 100  # kept for inspection
    with open(cache.dir / ".compact.lock", "a+b") as other:  # another run is compacting
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cache.compact(max_files=0) == 0 and len(cache.files()) == 2
    assert cache.compact(max_files=0) == 2 and len(cache.files()) == 1


def test_run_options_checked_before_any_work(tmp_path):
    """Options that used to fail late or be accepted: a --cache through a file (each unit failed three times,
    then 'rerun to resume'), a --cache URL (a local folder named 's3:'), an empty --out (the run went into the
    current folder), --stall-timeout nan (written to the manifest as invalid JSON), a kept column named like an
    output column (the input's values were dropped), a batch size no machine can pad to."""
    from typer.testing import CliRunner

    from audit.cli import app

    src = tmp_path / "p.txt"
    src.write_text("a cat\n")
    (tmp_path / "afile").write_text("x")
    cases = [(["--cache", str(tmp_path / "afile" / "sub")], "afile is a file, not a folder"),
             (["--cache", "s3://bucket/cache"], "not read from URLs"),
             (["--out", ""], "--out is empty"),
             (["--stall-timeout", "nan"], "--stall-timeout nan: give 0 (never) or a finite number"),
             (["--keep-columns", "risk"], "--keep-columns risk: memaudit's output tables have a column"),
             (["--batch-size", "65537"], "give an integer from 1 to 65,536")]
    for args, message in cases:
        out = ["--out", str(tmp_path / "o")] if "--out" not in args else []
        res = CliRunner().invoke(app, ["run", str(src), *out, *args, "--no-progress"])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "p.txt"]


def test_debug_flag_after_the_subcommand_and_device_errors(tmp_path, monkeypatch, capsys):
    """`memaudit run ... --debug` works like `memaudit --debug run ...` (errors suggest adding it), and a device
    that is not there is named as given."""
    from audit import cli
    from audit.models import ModelError, resolve_device

    missing = str(tmp_path / "nope.parquet")
    monkeypatch.setattr(sys, "argv", ["memaudit", "run", missing])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2 and "no such file or folder" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["memaudit", "run", missing, "--debug"])
    with pytest.raises(SystemExit) as exit_info:  # the traceback, then the same line and exit code
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback (most recent call last)" in err
    assert "SourceError" in err and err.rstrip().endswith("no such file or folder")
    cli._STATE["debug"] = False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match=r"--device cuda:1: no CUDA device is available"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ModelError, match=r"--device cuda:1: this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        resolve_device("cuda:1")
    with pytest.raises(RunError, match=r"--stall-timeout -5: give 0 \(never\) or a finite number"):
        execute(RunConfig(inputs=(missing,), stall_timeout=-5), progress=False, log=lambda m: None)


def test_run_on_inputs_without_rows_warns(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from audit.cli import app

    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty)
    res = CliRunner().invoke(app, ["run", str(empty), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"),
                                   "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "0 rows read, 0 scored, 0 rejected" in res.output
    assert "warning: the inputs hold no rows; nothing was scored" in res.output
    assert pl.read_parquet(tmp_path / "r" / "risk.parquet").height == 0
    (tmp_path / "empty.jsonl").write_text("")  # no lines, so no columns known: not a missing prompt column
    res = CliRunner().invoke(app, ["run", str(tmp_path / "empty.jsonl"), "--model", str(tiny_model_dir), "--out",
                                   str(tmp_path / "r2"), "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0 and "warning: the inputs hold no rows" in res.output, res.output
    for name in ("zero.csv", "zero.parquet", "zero.txt.gz"):  # zero-byte files hold no rows in every format
        (tmp_path / name).write_bytes(b"")  # (a CSV or Parquet one used to stop the run as unreadable)
    res = CliRunner().invoke(app, ["run", str(tmp_path / "zero.csv"), str(tmp_path / "zero.parquet"),
                                   str(tmp_path / "zero.txt.gz"), str(empty), "--model", str(tiny_model_dir),
                                   "--out", str(tmp_path / "r3"), "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0 and "warning: the inputs hold no rows" in res.output, res.output
    res = CliRunner().invoke(app, ["run", str(empty), "--limit", "0", "--model", str(tiny_model_dir), "--out",
                                   str(tmp_path / "r4"), "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0 and "warning: --limit 0 reads no row; nothing was scored" in res.output, res.output


def test_brackets_in_input_and_run_folder_names(tmp_path, tiny_model_dir):
    """A path that exists is used as it is, even with glob characters; report, diff and calibrate read a run
    folder named with [ ] (polars would otherwise expand the name as a glob)."""
    from typer.testing import CliRunner

    from audit.cli import app

    src = tmp_path / "in[1].parquet"
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue car", "an old house"]}), src)
    run = tmp_path / "run[2]"
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--no-progress"]
    res = CliRunner().invoke(app, ["run", str(src), "--out", str(run), *args])
    assert res.exit_code == 0, res.output
    assert "3 rows read, 3 scored" in res.output
    for cmd in (["report", str(run), "--format", "md"], ["diff", str(run), str(run), "--format", "md"],
                ["calibrate", str(run), "--fpr", "0.5", "-o", str(tmp_path / "cal.json")]):
        res = CliRunner().invoke(app, cmd)
        assert res.exit_code == 0, (cmd, res.output)
    assert (run / "report.md").exists() and (tmp_path / "cal.json").exists()
    res = CliRunner().invoke(app, ["report", str(run), "-o", str(tmp_path / "x.txt")])
    assert res.exit_code == 2 and "add --format md or --format html" in res.output


def test_the_cache_never_keeps_or_serves_a_nonfinite_result(tmp_path):
    """A model whose attention came out non-finite had its 80 prompts rejected (nonfinite_attention), their NaN
    scores cached, and the next run served them back as 80 hits without touching the model ("cache 80 hits")."""
    import numpy as np

    from audit.cache import SCORE_COLUMNS, ScoreCache, cached_scores
    from audit.scorers import result_columns

    cache = ScoreCache(tmp_path, "fp", {"scorer": "attention_entropy", "seed": 0})
    prompts, hashes = ["a", "b", "c"], [f"{i:032x}" for i in range(3)]
    calls = []

    def score_fn(ps):
        calls.append(list(ps))
        scores = {c: np.ones(len(ps)) for c in result_columns()}
        scores["nonfinite"] = np.array([p == "b" for p in ps])
        return scores, [[] for _ in ps], {}

    first = cached_scores(cache, prompts, hashes, score_fn)
    assert first[3] == 0 and first[0]["nonfinite"].tolist() == [0.0, 1.0, 0.0]
    assert sorted(cache.lookup(hashes).column("prompt_hash").to_pylist()) == [hashes[0], hashes[2]]
    again = cached_scores(cache, prompts, hashes, score_fn)
    assert again[3] == 2 and calls[-1] == ["b"]  # b is scored again, not served from the cache
    # a failure cached before this rule is a miss too
    cache.put([hashes[1]], {c: np.full(1, np.nan if c != "nonfinite" else 1.0) for c in SCORE_COLUMNS}, [[]])
    assert cached_scores(cache, prompts, hashes, score_fn)[3] == 2 and calls[-1] == ["b"]


def test_a_scoring_error_among_cache_misses_is_reported_for_its_own_prompt(tmp_path):
    """Prompts a and c are cached, b and d are not and d fails: the error is d's (index 3 of the unit's prompts),
    not the index d had among the misses (1, which is b's); neither failure nor b is served as a hit."""
    import numpy as np

    from audit.cache import ScoreCache, cached_scores
    from audit.scorers import result_columns

    cache = ScoreCache(tmp_path, "fp", {"scorer": "attention_entropy", "seed": 0})
    prompts, hashes = ["a", "b", "c", "d"], [f"{i:032x}" for i in range(4)]

    def score_fn(ps):
        scores = {c: np.arange(len(ps), dtype=np.float64) + 10 * len(ps) for c in result_columns()}
        scores["nonfinite"] = np.zeros(len(ps))
        triggers = [[{"token": p, "position": 1, "mass": 0.5, "start": 0, "end": 1}] for p in ps]
        return scores, triggers, {j: "scoring_error: boom" for j, p in enumerate(ps) if p == "d"}

    cached_scores(cache, ["a", "c"], [hashes[0], hashes[2]], score_fn)  # a and c cached
    scores, triggers, errors, hits = cached_scores(cache, prompts, hashes, score_fn)
    assert hits == 2 and errors == {3: "scoring_error: boom"}
    assert [t[0]["token"] for t in triggers] == ["a", "b", "c", "d"]
    assert scores["risk"].tolist() == [20.0, 20.0, 21.0, 21.0]  # a, c from the first call (2 prompts), b, d now
    assert sorted(cache.lookup(hashes).column("prompt_hash").to_pylist()) == [hashes[0], hashes[1], hashes[2]]


def test_a_prompt_cached_twice_is_one_hit(tmp_path):
    """Two runs sharing a cache may both add a prompt (each writes its own part): a lookup returns one row per
    prompt, so a unit counts it once among its hits and scores the rest."""
    import numpy as np

    from audit.cache import ScoreCache, cached_scores
    from audit.scorers import result_columns

    cache = ScoreCache(tmp_path, "fp", {"scorer": "attention_entropy", "seed": 0})
    hashes = [f"{i:032x}" for i in range(3)]
    row = {c: np.zeros(1) for c in result_columns()}
    cache.put([hashes[0]], row, [[]])
    cache.put([hashes[0]], row, [[]])  # the same prompt again, from another run
    assert cache.lookup(hashes).column("prompt_hash").to_pylist() == [hashes[0]]
    scored = []

    def score_fn(ps):
        scored.append(list(ps))
        return {c: np.zeros(len(ps)) for c in result_columns()}, [[] for _ in ps], {}

    assert cached_scores(cache, ["a", "b", "c"], hashes, score_fn)[3] == 1 and scored == [["b", "c"]]


def test_an_empty_confirm_drops_the_files_confirm_top_with_it(tmp_path):
    """`--confirm ''` over a config file with confirm and confirm_top kept the file's confirm_top, and the run (and its
    dry run) then refused it: "--confirm-top needs --confirm SCORER", an option the user never gave; the empty flag
    could drop a cascade only with `--confirm-top ''` too. Now it drops the file's confirm_top as `--calibration ''`
    drops its fail_on_flagged (both said by the dry run through ``cleared``); a --confirm-top given is kept, and
    refused as before."""
    from audit.config import validate_config

    (tmp_path / "c.toml").write_text('inputs = ["logs/"]\nconfirm = "noise_magnitude"\nconfirm_top = "1%"\n')
    defaults = {f.name: f.default for f in fields(RunConfig) if f.name != "inputs"} | {"inputs": ()}
    cleared: dict = {}
    cfg = build_run_config(defaults | {"confirm": None}, {"confirm"}, tmp_path / "c.toml", cleared)
    assert (cfg.confirm, cfg.confirm_top) == (None, None)
    assert cleared == {"confirm": "noise_magnitude", "confirm_top": "1%"}
    validate_config(cfg)  # one-stage scoring: nothing to refuse
    cfg = build_run_config(defaults, set(), tmp_path / "c.toml", cleared := {})
    assert (cfg.confirm, cfg.confirm_top, cleared) == ("noise_magnitude", "1%", {})  # no empty flag: the file's
    cfg = build_run_config(defaults | {"confirm": None, "confirm_top": "5"}, {"confirm", "confirm_top"},
                           tmp_path / "c.toml", cleared := {})
    assert (cfg.confirm, cfg.confirm_top, cleared) == (None, "5", {"confirm": "noise_magnitude"})
    with pytest.raises(RunError, match="--confirm-top needs --confirm SCORER"):
        validate_config(cfg)
