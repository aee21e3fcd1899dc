"""Fixes of session 52's ufollow list: a run served from --cache records what the cached scores were computed with
(so report and diff can warn of their rounding settings), and the other items listed with each test."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import torch

from helpers import prompts_file, run_audit


def _rounding_lines(warnings: list[str]) -> list[str]:
    return [w for w in warnings if "float rounding" in w]


def test_a_run_served_from_the_cache_records_the_filling_runs_settings(tmp_path, tiny_model_dir):
    """x1 scored 12 prompts at batch 8 without a cache, x2 filled a cache at batch 32, x3 (batch 8) was served all 12
    from it: x3's manifest had no ``scored_with``, so ``memaudit diff x1 x3`` said nothing of the batch sizes that
    differ (8 / 32). Now each cache part records what its scores were computed with, and x3 reports it; a run that
    scores new prompts at batch 8 beside hits of batch 32 is mixed."""
    from audit.diff import diff_runs
    from audit.report import build_report

    src = prompts_file(tmp_path / "p12.txt", 12)
    cache = str(tmp_path / "xc")
    device = f"cpu:{torch.get_num_threads()}"
    x1, _ = run_audit([src], tiny_model_dir, tmp_path / "x1", device="cpu", batch_size=8)
    run_audit([src], tiny_model_dir, tmp_path / "x2", device="cpu", batch_size=32, cache=cache)
    x3, m3 = run_audit([src], tiny_model_dir, tmp_path / "x3", device="cpu", batch_size=8, cache=cache)
    assert m3["cache"]["hits"] == 12 and m3["cache"]["scored"] == 0
    assert m3["scored_with"] == {"batch_size": [32], "compile": [False], "device": [device], "engine": ["local"],
                                 "mixed": []}
    assert _rounding_lines(diff_runs(x1, x3).warnings) == [
        "the two runs were scored with different settings (batch_size: old run 8, new run 32): a prompt's risk may "
        "differ between "
        "them by float rounding (about 1e-7), so near-equal risks may swap ranks with the prompt unchanged"]
    # the part records it in its Parquet metadata
    parts = sorted((tmp_path / "xc").glob("*/part-*.parquet"))
    assert len(parts) == 1
    assert json.loads(pq.read_schema(parts[0]).metadata[b"memaudit.scored_with"]) == {
        "batch_size": [32], "compile": [False], "device": [device], "engine": ["local"]}
    # 16 prompts, 12 of them cached at batch 32, 4 scored now at batch 8: one run of mixed settings
    more = prompts_file(tmp_path / "p16.txt", 16)
    x4, m4 = run_audit([more], tiny_model_dir, tmp_path / "x4", device="cpu", batch_size=8, cache=cache)
    assert (m4["cache"]["hits"], m4["cache"]["scored"]) == (12, 4)
    assert m4["scored_with"]["batch_size"] == [8, 32] and m4["scored_with"]["mixed"] == ["batch_size"]
    assert any("(batch_size 8 / 32:" in w for w in build_report(x4).warnings)
    # a diff names each run's values: the new run is mixed itself, not "old 8, new 32" (unewday's finding)
    assert [w for w in diff_runs(x1, x4).warnings if "float rounding" in w][0].startswith(
        "the two runs were scored with different settings (batch_size: old run 8, new run 8 / 32): ")


def test_cached_scores_of_an_older_memaudit_have_an_unknown_batch_size(tmp_path, tiny_model_dir):
    """A part stored before parts recorded their settings: its batch size and engine are ``unknown`` (the device and
    --compile are the cache folder's key), not guessed; beside scores made now at batch 8 that is a mix."""
    src = prompts_file(tmp_path / "p12.txt", 12)
    cache = tmp_path / "xc"
    run_audit([src], tiny_model_dir, tmp_path / "fill", device="cpu", batch_size=32, cache=str(cache))
    for part in cache.glob("*/part-*.parquet"):  # as an older memaudit wrote it: no record
        table = pq.read_table(part).replace_schema_metadata(None)
        pq.write_table(table, part, write_page_checksum=True)
        assert b"memaudit.scored_with" not in (pq.read_schema(part).metadata or {})
    _, m = run_audit([src], tiny_model_dir, tmp_path / "old", device="cpu", batch_size=8, cache=str(cache))
    assert m["scored_with"] == {"batch_size": ["unknown"], "compile": [False],
                                "device": [f"cpu:{torch.get_num_threads()}"], "engine": ["unknown"], "mixed": []}
    more = prompts_file(tmp_path / "p14.txt", 14)
    _, m = run_audit([more], tiny_model_dir, tmp_path / "mix", device="cpu", batch_size=8, cache=str(cache))
    assert m["scored_with"]["batch_size"] == [8, "unknown"] and m["scored_with"]["mixed"] == ["batch_size"]


def test_a_compaction_keeps_each_parts_settings_true_of_its_rows(tmp_path):
    """Compaction merged every part into one, which recorded the settings of all of them, so a run served two rows
    scored at batch 8 reported (and its report and diff warned of) batch sizes 8, 32 and unknown. It now merges the
    parts of each record into one part (an unrecorded one's as unknown): every served row reports what it was
    scored with, after the compaction as before it."""
    from audit.cache import SCORED_WITH_KEY, ScoreCache, cache_config

    sc = cache_config({"scorer": "attention_entropy", "seed": 0}, "cpu:2", False)
    cache = ScoreCache(tmp_path / "cache", "fp", sc)
    hashes = [f"{i:032x}" for i in range(8)]

    def put(idx, settings):
        cache.put([hashes[i] for i in idx], {c: np.full(len(idx), float(idx[0])) for c in cache.columns},
                  [[]] * len(idx), scored_with=settings)

    at8 = {"batch_size": 8, "compile": False, "device": "cpu:2", "engine": "local"}
    put([0, 1], at8)
    put([2, 3], {"batch_size": 32, "compile": False, "device": "cpu:2", "engine": "ray"})
    put([4, 5], None)  # unrecorded
    put([6, 7], at8)
    assert cache.lookup(hashes).num_rows == 8
    served = {"8": {"batch_size": [8], "compile": [False], "device": ["cpu:2"], "engine": ["local"]},
              "32": {"batch_size": [32], "compile": [False], "device": ["cpu:2"], "engine": ["ray"]},
              "unknown": {"batch_size": ["unknown"], "compile": [False], "device": ["cpu:2"], "engine": ["unknown"]}}
    assert cache.served_with(hashes[:2]) == cache.served_with(hashes[6:]) == served["8"]
    assert cache.served_with(hashes[4:6]) == served["unknown"]
    assert cache.served_with([]) == {}
    assert cache.compact(max_files=1) == 4
    parts = cache.files()  # one a record: the two batch-8 parts merged
    records = sorted(json.dumps(json.loads(pq.read_schema(p).metadata[SCORED_WITH_KEY]), sort_keys=True)
                     for p in parts)
    assert records == sorted(json.dumps(v, sort_keys=True) for v in served.values())
    again = ScoreCache(tmp_path / "cache", "fp", sc)
    found = again.lookup(hashes)
    assert found.num_rows == 8 and found.column_names == again.schema.names
    assert sorted(zip(found.column("prompt_hash").to_pylist(), found.column("risk").to_pylist())) == [
        (h, float(i - i % 2)) for i, h in enumerate(hashes)]  # every score as stored
    assert again.served_with(hashes[:1]) == again.served_with(hashes[6:]) == served["8"]
    assert again.served_with(hashes[2:4]) == served["32"] and again.served_with(hashes[5:6]) == served["unknown"]
    mixed = again.served_with(hashes[:4])  # rows of two records: both named
    assert mixed["batch_size"] == [8, 32] or mixed["batch_size"] == [32, 8]


def test_nothing_readable_beside_unlisted_folders_is_named_as_a_run_names_them(tmp_path, monkeypatch):
    """``memaudit run /proc/1 --dry-run`` listed five "path (path: cannot list the folder ...)" entries and no word of
    what to do, where ``memaudit run /`` (other files found) names the first folder, how many more, and
    --skip-bad-files. Now both name the folders the one way (audit.sources.unlisted_summary); with nothing else
    readable the line says that skipping them leaves nothing, with or without --skip-bad-files."""
    import os

    import pytest
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.config import RunConfig
    from audit.errors import SourceError
    from audit.pipeline import build_plan

    root = tmp_path / "in"
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
    real_scandir = os.scandir

    def scandir(path="."):  # a and b cannot be listed (as another user's mode 700 folders; tests run as root)
        if os.path.basename(os.fspath(path)) in ("a", "b"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    nothing = (f"no readable prompt file in {root}: {root / 'a'}: cannot list the folder (Permission denied), and 1 "
               "more folder (--skip-bad-files skips such folders, and finds no other prompt file here: give a folder "
               "memaudit can read)")
    for skip in (False, True):
        with pytest.raises(SourceError) as err:
            build_plan(RunConfig(inputs=(str(root),), model="m", out=str(tmp_path / "o"), skip_bad_files=skip))
        assert str(err.value) == nothing
    (root / "c" / "p.txt").write_text("a prompt\n")  # something readable beside them: the run's refusal
    with pytest.raises(SourceError) as err:
        build_plan(RunConfig(inputs=(str(root),), model="m", out=str(tmp_path / "o")))
    assert str(err.value) == (f"{root / 'a'}: cannot list the folder (Permission denied), and 1 more folder "
                              "(--skip-bad-files skips such files and goes on)")
    (root / "c" / "p.txt").unlink()
    res = CliRunner().invoke(app, ["run", str(root), "--model", "m", "--dry-run"])
    assert res.exit_code == 2 and " ".join(res.stderr.split()) == f"memaudit: error: {nothing}"


def test_generate_names_out_when_its_folder_becomes_read_only_while_it_writes(tmp_path, monkeypatch):
    """A write in --out that fails after the start check (the folder made read-only meanwhile) said
    "memaudit: error: x: Read-only file system; fix the cause ...", naming no --out; now the option, what is wrong and
    what to do, as run's check says it; a failure of another kind keeps its own words."""
    from typer.testing import CliRunner

    import audit.cli.generate as gen
    from audit.cli import app

    out = tmp_path / "g"

    def read_only(*a, **kw):
        raise OSError(30, "Read-only file system", "x")

    monkeypatch.setattr(gen, "run_generate", read_only)
    res = CliRunner().invoke(app, ["generate", "p.txt", "--model", "m", "--out", str(out)])
    assert res.exit_code == 2
    assert res.stderr.splitlines() == [f"memaudit: error: --out {out}: the file system is read-only writing x: make it "
                                       "writable, then rerun the same command"]
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "00000000.parquet").write_bytes(b"")
    res = CliRunner().invoke(app, ["generate", "p.txt", "--model", "m", "--out", str(out)])
    assert res.stderr.splitlines() == [f"memaudit: error: --out {out}: the file system is read-only writing x: make it "
                                       "writable, then rerun the same command to resume; the finished prompts are "
                                       f"kept in {out}/parts"]

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied", "y")

    monkeypatch.setattr(gen, "run_generate", denied)
    res = CliRunner().invoke(app, ["generate", "p.txt", "--model", "m", "--out", str(out)])
    assert res.stderr.splitlines() == [f"memaudit: error: y: Permission denied; the finished prompts are kept in "
                                       f"{out}/parts: fix the cause, then rerun the same command to resume"]


def _contrast(rgb, other=(1.0, 1.0, 1.0)) -> float:
    """WCAG 2.1's contrast ratio of two sRGB colours (components 0..1)."""
    def lum(c):
        lin = [x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4 for x in c[:3]]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((lum(rgb), lum(other)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_the_plots_bars_have_3_to_1_contrast_and_one_colour_per_meaning():
    """The date plot's bars were #90caf9, 1.75:1 against the white page (WCAG asks 3:1 for graphics), and another
    blue than the histogram's rows. Now rows are one colour in both plots and flagged rows one, each at least 3:1."""
    import polars as pl

    from audit.report import FLAGGED_COLOUR, ROWS_COLOUR, dates_figure

    frame = pl.DataFrame({"date": ["2026-12-01", "2026-12-02"], "rows": [3, 5], "flagged": [1, 2],
                          "mean_risk": [1.0, 2.0], "max_risk": [2.0, 3.0]})
    colours = {}
    for calibrated in (False, True):
        ax = dates_figure(frame, calibrated).axes[0]
        colours[calibrated] = {tuple(round(c, 3) for c in p.get_facecolor()[:3]) for p in ax.patches}
    hexed = {k: {"#" + "".join(f"{round(c * 255):02x}" for c in rgb) for rgb in v} for k, v in colours.items()}
    assert hexed == {False: {ROWS_COLOUR}, True: {FLAGGED_COLOUR}}
    assert (ROWS_COLOUR, FLAGGED_COLOUR) == ("#1e88e5", "#c62828")  # the histogram's (test_uanalyst_findings)
    for rgb in colours[False] | colours[True]:
        assert _contrast(rgb) >= 3.0


def test_a_report_of_a_run_that_scored_nothing_says_so_in_place_of_empty_plots_and_tables(tmp_path):
    """report.html of a run that scored nothing drew empty plot axes (the histogram, the date plot) and a top table
    of headers only, and the terminal printed the empty tables; each is now one line "no scored rows" (the run's
    warning stays). A run with scores keeps its plots and tables."""
    from rich.console import Console

    from audit.report import build_report, render_html, render_markdown, render_terminal
    from test_report_mutants import make_run

    def terminal(r) -> str:
        console = Console(record=True, width=120, color_system=None)
        render_terminal(r, console)
        return console.export_text()

    rejects = [("logs/dt=2026-12-01/a.parquet", "empty_prompt"), ("logs/dt=2026-12-02/a.parquet", "empty_prompt")]
    empty = build_report(make_run(tmp_path / "e", [], rejects=rejects), by=("dt",))
    assert any("scored nothing" in w for w in empty.warnings)
    page = render_html(empty)
    assert '<p class="meta" id="histogram">no scored rows</p>' in page
    assert '<p class="meta" id="top">no scored rows</p>' in page
    assert "<img" not in page and '<table id="top"' not in page
    assert "scored nothing" in page  # the warning
    assert '<table id="by-dt"' in page  # the breakdown still counts the rejected rows per date
    text = terminal(empty)
    assert "Risk distribution: no scored rows\n" in text and "Top prompts: no scored rows\n" in text
    assert "risk from" not in text and "trigger tokens" not in text
    md = render_markdown(empty)
    assert md.count("_no scored rows_") == 2 and "```text" not in md
    # scores: the plots and tables as before, no such line
    full = build_report(make_run(tmp_path / "f", [("a", 1.0, "logs/dt=2026-12-01/a.parquet"),
                                                  ("b", 2.0, "logs/dt=2026-12-02/a.parquet")]), by=("dt",))
    page = render_html(full)
    assert '<img id="histogram"' in page and '<table id="top"' in page and 'alt="risk by date"' in page
    assert "no scored rows" not in page + terminal(full) + render_markdown(full)
