"""The ready configs in pipelines/, each run through `memaudit run --config` on small data with the tiny model
(relative paths as in the configs, from a scratch working directory; only --model, --out and
--batch-size overridden)."""

from __future__ import annotations

import json
import os
from pathlib import Path
import random
import subprocess
import sys

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from audit.calibrate import calibrate, write_calibration
from audit.cli import app
from audit.pipeline import RunConfig
from audit.runner import execute
from audit.tiny import TINY_WORDS

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def _prompts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model_dir):
    """A scratch working directory with a calibration for the tiny model (reference: 20 ordinary prompts).

    The reference run fills the nightly config's score cache; the other configs reuse it with --cache, so
    the tests score few prompts (a loaded 2-core machine scores a batch in seconds)."""
    root = tmp_path_factory.mktemp("ws")
    ref = _prompts(11, 20)
    pq.write_table(pa.table({"prompt": ref}), root / "reference.parquet")
    execute(RunConfig(inputs=(str(root / "reference.parquet"),), model=str(tiny_model_dir), out=str(root / "ref"),
                      device="cpu", batch_size=8, cache=str(root / "audits" / "score-cache")),
            progress=False, log=lambda m: None)
    cal = calibrate(root / "ref", fpr=0.05)
    write_calibration(cal, root / "audits" / "calibration.json")
    write_calibration(cal, root / "audits" / "calibration-candidate.json")
    risk = pl.read_parquet(root / "ref" / "risk.parquet")
    above = risk.filter(pl.col("risk") > cal["threshold"])["prompt"].to_list()
    assert len(above) == 1  # 20 prompts, the 0.95 quantile: one lies above it
    return root, ref, above[0]


def _run(config: str, *args: str):
    return CliRunner().invoke(app, ["run", "--config", str(PIPELINES / config), *args])


def test_nightly_prompt_log_config_with_cache_and_diff(workspace, tiny_model_dir, monkeypatch):
    root, ref, hot = workspace
    monkeypatch.chdir(root)
    day1 = [p for p in ref if p != hot][:6] + [ref[0]]
    day2 = [hot, ref[1], "a new prompt about a dog", "another new prompt of a cat"]
    for day, prompts in (("2026-11-27", day1), ("2026-11-28", day2)):
        if day == "2026-11-28":
            # night 1 sees only the first day of the log
            res = _run("nightly-prompt-log.toml", "--model", str(tiny_model_dir), "--out", "audits/nightly/2026-11-27",
                       "--batch-size", "8")
            assert res.exit_code == 0, res.output
        d = root / "prompt-logs" / f"date={day}"
        d.mkdir(parents=True)
        n = len(prompts)
        pq.write_table(pa.table({"prompt": prompts, "user_id": [f"user{i % 2}" for i in range(n)],
                                 "app": ["web"] * n}), d / "part-0.parquet")
    # night 2 as scheduled: pipelines/nightly.sh (run, both reports, diff with night 1), gated on flags. The gate's
    # exit 3 comes after the outputs are complete, so the script still writes the reports and the diff. As cron runs
    # it: a bare PATH, memaudit named by MEMAUDIT
    env = os.environ | {"PATH": "/usr/bin:/bin", "MEMAUDIT": str(Path(sys.executable).parent / "memaudit"),
                        "HF_HUB_OFFLINE": "1"}
    night = subprocess.run(["bash", str(PIPELINES / "nightly.sh"), "--model", str(tiny_model_dir), "--out",
                            "audits/nightly/2026-11-28", "--batch-size", "8", "--fail-on-flagged", "0"],
                           cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert night.returncode == 3, night.stderr
    assert night.stdout.splitlines()[-1] == "audits/nightly/2026-11-28"
    assert "1 row flagged (risk" in night.stderr and "compared with audits/nightly/2026-11-27" in night.stderr
    for name in ("report.html", "report.md", "diff.md"):
        assert (root / "audits/nightly/2026-11-28" / name).stat().st_size > 0
    night1 = json.loads((root / "audits/nightly/2026-11-27/manifest.json").read_text())
    night2 = json.loads((root / "audits/nightly/2026-11-28/manifest.json").read_text())
    # rows: day 1's 7 rows (6 prompts) all seen in the reference run; night 2 reads them again, and day 2's 2 prompts of
    # the reference are hits, its 2 new prompts scored
    assert night1["cache"]["hits"] == 7 and night1["cache"]["scored"] == 0
    assert night2["cache"]["hits"] == 7 + 2 and night2["cache"]["scored"] == 2
    assert night2["run_config"]["cache"] == "audits/score-cache" and night2["run_config"]["skip_bad_files"] is True
    risk = pl.read_parquet(root / "audits/nightly/2026-11-28/risk.parquet")
    assert {"user_id", "app"} <= set(risk.columns) and risk["flagged"].null_count() == 0
    assert risk.filter(pl.col("flagged"))["prompt"].to_list() == [hot]

    md = (root / "audits/nightly/2026-11-28/diff.md").read_text()
    newly = md.split("## Newly flagged")[1].split("## Largest rank rises")[0]
    rows = [line for line in newly.splitlines() if line.startswith("| ") and "rank" not in line]
    assert len(rows) == 1 and hot in rows[0] and "new prompt" in rows[0]
    res = CliRunner().invoke(app, ["report", "audits/nightly/2026-11-28", "--format", "html", "--by", "app"])
    assert res.exit_code == 0 and (root / "audits/nightly/2026-11-28/report.html").exists()

    # a scheduler's retry of night 2 after night 1's table was damaged: the diff fails and says so, but the script
    # still exits with the run's code (3) and names the folder (it exited 2, printed nothing, and wrote no diff)
    started = night2["first_started_at"]
    risk1 = root / "audits/nightly/2026-11-27/risk.parquet"
    risk1.write_bytes(risk1.read_bytes()[:50])
    again = subprocess.run(["bash", str(PIPELINES / "nightly.sh"), "--model", str(tiny_model_dir), "--out",
                            "audits/nightly/2026-11-28", "--batch-size", "8", "--fail-on-flagged", "0"],
                           cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 3, again.stderr
    assert again.stdout.splitlines()[-1] == "audits/nightly/2026-11-28"
    assert "warning: no diff written for audits/nightly/2026-11-28" in again.stderr
    rerun = json.loads((root / "audits/nightly/2026-11-28/manifest.json").read_text())
    assert rerun["first_started_at"] == started  # kept by the rerun (started_at is the rerun's)


def test_diff_against_a_folder_of_runs_picks_the_latest_earlier_run_that_scored(tmp_path):
    """nightly.sh took the most recently modified manifest.json as the previous night: a copied or restored folder,
    or a retried earlier night (whose rerun rewrote its manifest), became the baseline; so did a night that scored
    nothing, making every flagged prompt "newly flagged". memaudit diff RUNS NEW now picks by the manifests' first
    start, among runs that scored a row."""
    from audit.diff import previous_run
    from audit.errors import ReportError

    runs = tmp_path / "nightly"

    def night(name, first, scored=5, started=None):
        d = runs / name
        d.mkdir(parents=True)
        (d / "risk.parquet").write_bytes(b"")
        (d / "manifest.json").write_text(json.dumps({"first_started_at": first, "started_at": started or first,
                                                      "counts": {"scored": scored, "rows_read": 5, "rejected": 5 - scored},
                                                      "model": {}}))
        return d

    n1 = night("2026-11-01", "2026-11-01T02:00:00+00:00")
    n2 = night("2026-11-02", "2026-11-02T02:00:00+00:00")
    n3 = night("2026-11-03", "2026-11-03T02:00:00+00:00", started="2026-11-09T10:00:00+00:00")  # retried later
    n4 = night("2026-11-04", "2026-11-04T02:00:00+00:00", scored=0)  # an outage night
    n5 = night("2026-11-05", "2026-11-05T02:00:00+00:00")
    os.utime(n1 / "manifest.json")  # touched (restored from a backup): file times do not count
    assert previous_run(runs, n5) == n3  # not the outage night, not the touched one
    assert previous_run(runs, n3) == n2  # the retried night 3 is compared with the night before it
    with pytest.raises(ReportError, match="no finished run started before"):
        previous_run(runs, n1)
    (runs / "2026-11-06").mkdir()  # a run in progress (no manifest) is skipped
    assert previous_run(runs, n5) == n3 and n4.exists()
    # start times are to the second: a run started in the same second as the new one still counts as before it
    n7 = night("2026-11-07", "2026-11-07T02:00:00+00:00")
    n7b = night("2026-11-07-retry", "2026-11-07T02:00:00+00:00")
    assert previous_run(runs, n7b) == n7 and previous_run(runs, n7) == n7b


def test_training_captions_config(workspace, tiny_model_dir, monkeypatch):
    root, ref, _ = workspace
    monkeypatch.chdir(root)
    (root / "captions").mkdir()
    captions = ref[:5] + [ref[0], ref[0], None]
    pq.write_table(pa.table({"caption": pa.array(captions, pa.string()),
                             "key": [f"k{i:03d}" for i in range(len(captions))],
                             "shard": ["s0"] * len(captions), "url": [f"https://img/{i}.jpg" for i in range(len(captions))]}),
                   root / "captions" / "shard-00000.parquet")
    res = _run("training-captions.toml", "--model", str(tiny_model_dir), "--out", "audits/captions", "--batch-size", "8",
               "--cache", "audits/score-cache")
    assert res.exit_code == 0, res.output
    manifest = json.loads((root / "audits/captions/manifest.json").read_text())
    assert manifest["counts"]["scored"] == 7 and manifest["counts"]["duplicates"] == 2
    assert manifest["counts"]["rejected_by_reason"] == {"null_prompt": 1}
    risk = pl.read_parquet(root / "audits/captions/risk.parquet")
    assert sorted(risk["prompt_id"].to_list()) == [f"k{i:03d}" for i in range(7)]
    assert "url" in risk.columns and "shard" not in risk.columns  # (the shard is the source column)
    res = CliRunner().invoke(app, ["report", "audits/captions", "--format", "md"])
    assert res.exit_code == 0 and "## By source file" in (root / "audits/captions/report.md").read_text()


def test_pre_release_config_fails_on_flagged(workspace, tiny_model_dir, monkeypatch):
    root, ref, hot = workspace
    monkeypatch.chdir(root)
    (root / "screening").mkdir()
    pq.write_table(pa.table({"prompt": ref}), root / "screening" / "prompts.parquet")
    args = ["--model", str(tiny_model_dir), "--out", "audits/pre-release", "--batch-size", "8",
            "--cache", "audits/score-cache"]
    res = _run("pre-release.toml", *args)
    assert res.exit_code == 0, res.output  # 1 flagged, within the config's fail_on_flagged = 10
    manifest = json.loads((root / "audits/pre-release/manifest.json").read_text())
    assert manifest["counts"]["flagged"] == 1 and manifest["run_config"]["fail_on_flagged"] == 10
    assert manifest["cache"]["hits"] == 20
    res = _run("pre-release.toml", *args, "--fail-on-flagged", "0")  # CI gate: no flag tolerated
    assert res.exit_code == 3 and "1 row flagged (risk" in res.output
    assert pl.read_parquet(root / "audits/pre-release/risk.parquet").filter(pl.col("flagged"))["prompt"].to_list() == [hot]


def test_diff_newly_flagged_and_rank_rises(workspace, tiny_model_dir):
    from audit.diff import diff_runs, render_markdown

    root, ref, hot = workspace
    old = pl.read_parquet(root / "ref" / "risk.parquet")
    assert old["prompt"][0] == hot
    removed = old["prompt"][1:4].to_list()  # ranks 2-4 leave: among the 17 prompts in both runs none moves
    pq.write_table(pa.table({"prompt": [p for p in ref if p not in removed]}), root / "later.parquet")
    execute(RunConfig(inputs=(str(root / "later.parquet"),), model=str(tiny_model_dir), out=str(root / "later"),
                      device="cpu", batch_size=8, cache=str(root / "audits" / "score-cache"),
                      calibration=str(root / "audits" / "calibration.json")), progress=False, log=lambda m: None)
    d = diff_runs(root / "ref", root / "later", top=50)
    # (ranked over each whole run, the 16 prompts below them "rose" by 3 with the same risks)
    assert d.summary == {"old_prompts": 20, "new_prompts": 17, "in_both": 17, "only_new": 0, "only_old": 3,
                         "newly_flagged": 1, "rank_risen": 0, "rank_fallen": 0,
                         "old_flagged": None, "new_flagged": 1, "no_longer_flagged": None}
    # the reference run was not calibrated: its prompts have no flags, which the status and a warning say
    assert d.newly_flagged["prompt"].to_list() == [hot]
    assert d.newly_flagged["status"].to_list() == ["old run not calibrated"]
    assert len(d.flag_warnings) == 1 and d.flag_warnings[0].startswith("the old run was not calibrated")
    assert d.rank_rises.height == 0
    # ranks are among unique prompts: the top prompt on 4 more rows moves no other prompt (by row rank each
    # would have risen by 4 from that run to the reference)
    pq.write_table(pa.table({"prompt": ref + [hot] * 4}), root / "repeated.parquet")
    execute(RunConfig(inputs=(str(root / "repeated.parquet"),), model=str(tiny_model_dir), out=str(root / "repeated"),
                      device="cpu", batch_size=8, cache=str(root / "audits" / "score-cache")),
            progress=False, log=lambda m: None)
    back = diff_runs(root / "later", root / "ref", top=50)  # the 3 returning prompts are new: no other moves
    assert back.summary["rank_risen"] == back.summary["rank_fallen"] == 0 and back.summary["only_new"] == 3
    for a, b in (("ref", "repeated"), ("repeated", "ref")):
        same = diff_runs(root / a, root / b)
        assert same.summary["in_both"] == 20 and same.summary["rank_risen"] == 0, (a, b, same.rank_rises)
    md = render_markdown(d)
    assert "## Newly flagged" in md and "## Largest rank rises" in md
    rises = md.split("## Largest rank rises")[1].split("## New prompts")[0]
    assert rises.rstrip().endswith("\n\nNone.") and "| rise |" not in rises  # no rise: no table, one line
    from dataclasses import replace

    assert d.warnings == []  # same model and score settings
    import json
    import shutil

    shutil.copytree(root / "later", root / "later-dtype")
    manifest = json.loads((root / "later-dtype" / "manifest.json").read_text())
    manifest["score_config"]["dtype"] = "bfloat16"
    (root / "later-dtype" / "manifest.json").write_text(json.dumps(manifest))
    # the table's metadata says the same (a table from another run is refused)
    table = pq.read_table(root / "later-dtype" / "risk.parquet")
    meta = dict(table.schema.metadata) | {b"memaudit.score_config": json.dumps(manifest["score_config"]).encode()}
    pq.write_table(table.replace_schema_metadata(meta), root / "later-dtype" / "risk.parquet")
    warned = diff_runs(root / "ref", root / "later-dtype", top=5)
    assert warned.warnings == ["the runs used different score settings (dtype 'float32' -> 'bfloat16')"]
    assert "**Warning:** the runs used different score settings (dtype 'float32' -&gt; 'bfloat16')" in render_markdown(warned)
    long_md = render_markdown(replace(d, newly_flagged=d.newly_flagged.with_columns(prompt=pl.lit("x" * 1000))))
    assert long_md.count("x" * 300 + " … (+700 chars)") == 1 and "x" * 301 not in long_md
