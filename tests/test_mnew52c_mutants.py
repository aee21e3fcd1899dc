"""Mutation review (session 52, helper mnew52c) of the changes merged today (git diff 6a65ef4 HEAD -- audit/): the
report's cache warnings, histogram table, date plot and plot sizes, audit.text.visible's new characters, the diff's
rounding warning, calibrate.decimal_share, faults.termination_held and the cache-count reconciliation. Each test
pins a behaviour that a hand-made change of the code (named in its docstring) left passing the tests before it."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from test_report_mutants import make_run


def _with_manifest(run: Path, **fields) -> Path:
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.update(fields)
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


# ------------------------------------------------------------------ report: what the run warned of its cache

def test_a_run_that_scored_nothing_still_reports_its_cache_warnings_and_only_text_lines(tmp_path):
    """Report.warnings adds the manifest's cache.warnings in both branches: a run that scored nothing (every row
    rejected) keeps its "scored nothing" line and then the cache's, in the run's order; an empty line or one that is
    not text is left out; warnings that are not a list give none. Dropping the cache lines from the
    scored-nothing branch, or keeping '' each passed the suite."""
    from audit.report import build_report, render_html

    lines = ["score cache: C cannot be written (on a read-only file system): lookups only", "damaged part set aside"]
    empty = _with_manifest(make_run(tmp_path / "e", [], rejects=[("in/a.parquet", "empty_prompt")]),
                           cache={"dir": "C", "hits": 0, "scored": 0, "warnings": [lines[0], "", 7, lines[1]]})
    r = build_report(empty)
    assert r.warnings[0].startswith("the run scored nothing (1 row read, 1 rejected)")
    assert r.warnings[1:] == lines and r.cache_warnings == lines
    assert render_html(r).count('<p class="warning">Warning: ') == 3
    scored = _with_manifest(make_run(tmp_path / "s", [("a", 1.0)]), cache={"dir": "C", "hits": 0, "warnings": ["", lines[1]]})
    assert build_report(scored).warnings == [lines[1]]
    assert build_report(_with_manifest(scored, cache={"dir": "C", "hits": 0, "warnings": "one"})).warnings == []


def test_a_manifest_whose_cache_is_null_is_reported_as_a_run_without_cache(tmp_path):
    """finished_run accepts "cache": null as no cache (as it does a null calibration or confirm), but the report then
    read manifest["cache"]["hits"]: `memaudit report` said "TypeError: 'NoneType' object is not subscriptable",
    exit 1. Now the run is reported as one without --cache: no cache row, no cache warning."""
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.report import _count_rows, build_report

    run = _with_manifest(make_run(tmp_path / "r", [("a", 1.0)]), cache=None)
    r = build_report(run)
    assert "cache_hits" not in r.counts and r.warnings == [] and r.cache_warnings == []
    assert not [k for k, _ in _count_rows(r) if k.startswith("cache")]
    res = CliRunner().invoke(app, ["report", str(run), "--format", "md", "-o", str(tmp_path / "r.md")])
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------ report.shown_size: the size a plot is shown at

def _png_uri(width: int, height: int) -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def test_shown_size_halves_a_pngs_pixels_and_gives_none_for_what_is_no_png_header():
    """The page shows a plot at half its pixels (PLOT_DPI 200, PAGE_DPI 100), width then height, rounded half to even
    and at least 1 CSS pixel; a data URI that is not base64, holds another format, ends inside the IHDR chunk or has
    another chunk first gives None (the page then shows the image at its own size). Swapping width and height,
    allowing 0, dropping the length or IHDR checks, or letting base64's error out each passed the suite."""
    from audit.report import shown_size

    assert shown_size(_png_uri(1600, 900)) == (800, 450)
    assert shown_size(_png_uri(3, 5)) == (2, 2) and shown_size(_png_uri(1, 1)) == (1, 1)
    png = base64.b64decode(_png_uri(40, 30).split(",", 1)[1])
    for head in (png[:20], png[:12] + b"IHDX" + png[16:], b"GIF89a" + png[6:]):
        assert shown_size("data:image/png;base64," + base64.b64encode(head).decode("ascii")) is None, head[:16]
    assert shown_size("data:image/png;base64,a") is None  # a base64 text of 1 character: not decodable


# ------------------------------------------------------------------ audit.text.visible: both ends of each range

@pytest.mark.parametrize("char", ["\u17b5", "\U0001bca3", "\U0001d17a", "\u1160", "\u034f", "\u00ad", "\u2800",
                                  "\U0001bca1", "\U0001d176"])
def test_every_character_of_the_new_ranges_is_shown_as_an_escape(char):
    """The characters drawn as nothing or a blank that visible() now escapes, at the last code point of each range
    (U+17B5, U+1BCA3, U+1D17A) and inside it: the tests named the first of each, so narrowing a range by one
    (U+1BCA0-1BCA2, U+1D173-1D179, U+17B4 alone, U+115F without U+1160) passed the suite. The character just past
    each range is a drawn one and is kept."""
    from audit.text import visible

    escaped = f"\\x{ord(char):02x}" if ord(char) < 0x100 else (
        f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
    assert visible(f"a{char}b") == f"a{escaped}b"


@pytest.mark.parametrize("char", ["\u17b6", "\U0001d17b", "\u1161", "\u2801"])
def test_the_drawn_character_after_each_range_is_kept(char):
    from audit.text import visible

    assert visible(f"a{char}b") == f"a{char}b"


# ------------------------------------------------------------------ report.histogram_cells: the bins' table

def test_the_histogram_tables_edges_have_six_significant_digits_as_report_md_prints_them(tmp_path):
    """The page's table of bins prints its edges with at least 6 significant digits, as report.md does: the tests'
    edges (1, 1.5, 2) printed alike at 2 digits, so edge_format(hist, 2) passed the suite; so did a flagged count without its thousands separator."""
    from audit.report import build_report, histogram_cells, render_markdown

    run = make_run(tmp_path / "r", [("a", 1.0), ("b", 1.123456), ("c", 1.2469)], threshold=1.1)
    r = build_report(run, bins=2)
    header, rows = histogram_cells(r)
    assert header == ["risk from", "to", "rows", "flagged"]
    assert rows == [["1", "1.12345", "1", "0"], ["1.12345", "1.2469", "2", "2"]]
    md = render_markdown(r).split("## Risk distribution")[1].split("## ")[0]
    assert "1.12345" in md and "1.1235 " not in md
    # a calibrated run's flagged rows per bin with thousands separators, as its rows
    r = build_report(make_run(tmp_path / "k", [(f"p{i}", 1.0 + (i % 2)) for i in range(2400)], threshold=1.5), bins=2)
    assert histogram_cells(r)[1] == [["1", "1.5", "1,200", "0"], ["1.5", "2", "1,200", "1,200"]]


# ------------------------------------------------------------------ calibrate.decimal_share: exact to 10**-10000

def test_decimal_share_is_exact_up_to_exponent_10000_and_keeps_the_sign_past_it():
    """A decimal exponent up to 10000 is read exactly (5e-10000 is 5/10**10000, 5e-500 is 5/10**500), one past it as
    +-10**-10000, a zero as 0 however it is written: the tests read only 1e-N, whose value is 10**-N either way, so
    reading exactly only up to 400, or only below 10000, passed the suite."""
    from fractions import Fraction

    from audit.calibrate import decimal_share

    assert decimal_share("5e-500") == Fraction(5, 10 ** 500)
    assert decimal_share("5e-10000") == Fraction(5, 10 ** 10000)
    assert decimal_share("-5e-10000") == Fraction(-5, 10 ** 10000)
    assert decimal_share("5e-10001") == Fraction(1, 10 ** 10000)
    assert decimal_share("-5e-10001") == Fraction(-1, 10 ** 10000)
    assert decimal_share("0e-10001") == 0 and decimal_share("-0.000e-99999") == 0
    assert decimal_share("5e-10001%") == Fraction(1, 10 ** 10002)
    assert decimal_share("1e10001") is None  # not finite


# ------------------------------------------------------------------ faults.termination_held: the main thread only

def test_a_hold_in_another_thread_does_not_hold_the_main_threads_signal():
    """Signal handlers run in the main thread: a worker thread's termination_held is a no-op, so a SIGTERM that
    arrives while a worker holds is raised at once in the main thread, and the worker's hold ends without raising.
    Holding in every thread passed the suite (the main thread's SIGTERM was then only noted, and raised in the
    worker)."""
    import signal
    import threading

    from audit.faults import Terminated, _raise_terminated, termination_held

    entered, leave, outcome = threading.Event(), threading.Event(), []

    def worker():
        try:
            with termination_held():
                entered.set()
                leave.wait(30)
            outcome.append("ended")
        except BaseException as exc:  # noqa: BLE001 - what the hold raised in the worker
            outcome.append(type(exc).__name__)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert entered.wait(30)
        with pytest.raises(Terminated) as got:
            _raise_terminated(signal.SIGTERM, None)
        assert got.value.signum == signal.SIGTERM
    finally:
        leave.set()
        t.join(30)
    assert outcome == ["ended"]


# ------------------------------------------------------------------ pipeline.finalize: an earlier memaudit's units

def test_a_unit_committed_by_an_earlier_memaudit_counts_its_unique_prompts_sent(tmp_path, tiny_model_dir):
    """A unit whose .done.json has no model_rows (committed by a memaudit before the row counts) counts, as that
    memaudit did, its unique prompts less its hits as sent to the model, and the reconciliation of rows is not
    applied to it: reading such a unit as 0 sent passed the suite, and so did dropping that reconciliation."""
    from helpers import run_audit

    (tmp_path / "a.txt").write_text("a red cat\na red cat\na blue dog\n")
    kw = dict(device="cpu", batch_size=8, cache=str(tmp_path / "c"))
    m = run_audit([tmp_path / "a.txt"], tiny_model_dir, tmp_path / "r", **kw)[1]
    assert (m["cache"]["hits"], m["cache"]["scored"], m["counts"]["scored"]) == (0, 3, 3)  # rows
    (done,) = (tmp_path / "r").rglob("*.done.json")
    doc = json.loads(done.read_text())
    assert (doc["stats"]["unique_scored"], doc["stats"].pop("model_rows")) == (2, 3)
    done.write_text(json.dumps(doc))
    m = run_audit([tmp_path / "a.txt"], tiny_model_dir, tmp_path / "r", **kw)[1]  # resumes: nothing left to score
    assert (m["cache"]["hits"], m["cache"]["scored"], m["counts"]["scored"]) == (0, 2, 3)  # unique prompts
    # a unit of this memaudit whose row figures do not add up to its rows scored: the run says so, not a manifest
    # whose figures contradict its counts (the check at finalize, which no test reached)
    from audit.errors import RunError

    doc["stats"]["model_rows"] = 2
    done.write_text(json.dumps(doc))
    with pytest.raises(RunError, match=r"^the cache counts do not reconcile: 0 rows served by the cache \+ 2 scored by "
                                       r"the model != 3 rows scored$"):
        run_audit([tmp_path / "a.txt"], tiny_model_dir, tmp_path / "r", **kw)


# ------------------------------------------------------------------ pipeline.combined_scored_with (memaudit diff)

def test_combined_scored_with_adds_both_runs_unrecorded_units_and_is_empty_without_records():
    """Both runs' units scored by an older memaudit are summed (2 + 3: "5 unit(s) of the two runs"); runs that
    recorded nothing, or whose scored_with is not an object, give {} (no claim); the values are merged in order.
    Keeping the last run's count, returning {"mixed": []} for no record, reading any non-empty scored_with as an
    object, or reading a scored_with without "mixed" as no mix each passed the suite."""
    from audit.pipeline import combined_scored_with, mixed_settings_warning

    one = {"batch_size": [8], "compile": [False], "device": ["cpu:2"], "mixed": []}
    a, b = dict(one, unrecorded_units=2), dict(one, unrecorded_units=3)
    both = combined_scored_with([{"scored_with": a}, {"scored_with": b}])
    assert both == {"batch_size": [8], "compile": [False], "device": ["cpu:2"], "mixed": [], "unrecorded_units": 5}
    assert mixed_settings_warning({"scored_with": both}, "the two runs").startswith("5 unit(s) of the two runs were")
    assert combined_scored_with([{}, {"scored_with": None}]) == {}
    assert combined_scored_with([{"scored_with": ["batch_size"]}, {"scored_with": "cpu"}]) == {}
    assert combined_scored_with([{"scored_with": dict(one, batch_size=[8, 4])}, {"scored_with": dict(one,
                                 batch_size=[16], unrecorded_units=True)}]) == {
        "batch_size": [8, 4, 16], "compile": [False], "device": ["cpu:2"], "mixed": ["batch_size"]}
    # a scored_with without its "mixed" list is judged by the same rule (rounding_mix), not read as no mix
    assert "(batch_size 8 / 4, device cpu:1 / cpu:2: a rerun" in mixed_settings_warning(
        {"scored_with": {"batch_size": ["auto", 8, 4], "device": ["cpu:1", "cpu:2"], "compile": [False]}})
    assert mixed_settings_warning({"scored_with": {"batch_size": ["auto", 8], "compile": [False]}}) is None


# ------------------------------------------------------------------ report.dates_figure: rows without a date

def test_the_date_plot_leaves_out_the_group_of_rows_without_a_date():
    """A date breakdown has a group for rows outside any date partition (date null): the plot draws one bar and tick
    a date, and none for that group. Plotting the frame unfiltered passed the suite (a bar labelled 'None')."""
    import polars as pl

    from audit.report import dates_figure

    frame = pl.DataFrame({"date": ["2026-12-01", None, "2026-12-02"], "rows": [10, 99, 20], "flagged": [1, 9, 2],
                          "mean_risk": [1.0, 5.0, 1.5], "max_risk": [2.0, 9.0, 2.5]})
    for calibrated, bars in ((True, [1, 2]), (False, [10, 20])):
        ax, ax2 = dates_figure(frame, calibrated).axes
        assert [p.get_height() for p in ax.patches] == bars
        assert [t.get_text() for t in ax.get_xticklabels()] == ["2026-12-01", "2026-12-02"]
        assert [list(line.get_ydata()) for line in ax2.get_lines()] == [[2.0, 2.5], [1.0, 1.5]]
        assert ax.get_ylabel() == ("flagged rows" if calibrated else "scored rows")


def test_a_terminated_raised_by_the_body_is_kept_over_the_held_signal():
    """A body that itself raises Terminated (the signal pending from an import, raise_pending_termination) while a
    SIGHUP is held ends with its own exception, the same object, not a new one for the held signal; the hold is
    released (a later hold raises nothing). Wrapping every exception, a Terminated too, passed the suite."""
    import signal

    from audit.faults import Terminated, _raise_terminated, termination_held

    own = Terminated(signal.SIGTERM)
    with pytest.raises(Terminated) as got:
        with termination_held():
            _raise_terminated(signal.SIGHUP, None)
            raise own
    assert got.value is own and got.value.signum == signal.SIGTERM
    with termination_held():
        pass


# ------------------------------------------------------------------ models.base.reduced_float32_precision, torch < 2.9

def test_reduced_float32_precision_reads_torch_before_2_9_by_its_one_setting(monkeypatch):
    """Without the backends' fp32_precision attributes (torch before 2.9) the CPU's matmul precision is read from
    torch.get_float32_matmul_precision(): "medium" is bfloat16 matmuls through oneDNN, "high" and "highest" change
    nothing on a CPU, and a RuntimeError from it reads as the default; CUDA's from allow_tf32. This torch has the
    attributes, so mapping "high" instead of "medium", catching another error, or ignoring allow_tf32 passed the
    suite."""
    from types import SimpleNamespace

    import torch

    from audit.models.base import reduced_float32_precision

    monkeypatch.setattr(torch.backends, "mkldnn", SimpleNamespace(matmul=SimpleNamespace(), conv=SimpleNamespace()))
    cuda_matmul = SimpleNamespace(allow_tf32=False)
    monkeypatch.setattr(torch.backends, "cuda", SimpleNamespace(matmul=cuda_matmul))
    monkeypatch.setattr(torch.backends, "cudnn", SimpleNamespace(allow_tf32=True))
    for legacy, want in (("medium", "float32 matmul bf16"), ("high", None), ("highest", None)):
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda legacy=legacy: legacy)
        assert reduced_float32_precision("cpu") == want, legacy

    def both_apis():
        raise RuntimeError("both APIs used")

    monkeypatch.setattr(torch, "get_float32_matmul_precision", both_apis)
    assert reduced_float32_precision("cpu") is None
    assert reduced_float32_precision("cuda") is None
    cuda_matmul.allow_tf32 = True
    assert reduced_float32_precision("cuda") == "float32 matmul tf32"


# ------------------------------------------------------------------ models.base: cross-attention names from weights

def test_cross_attention_names_need_an_attn2_with_a_query_projection(tiny_model_dir):
    """From the module paths of a denoiser's weights, only an attn2 holding a to_q projection (a diffusers
    Attention) is a cross-attention layer, as audit.capture selects them: an attn2 that is another module (a norm's
    weights alone), an attn1 or a to_q elsewhere is not. Accepting every path ending in attn2 passed the suite."""
    from audit.models import detect_family

    adapter, _ = detect_family(Path(tiny_model_dir), str(tiny_model_dir))
    modules = {"down.0.attn2", "down.0.attn2.to_q", "down.0.attn2.to_k", "mid.attn2", "mid.attn2.norm",
               "up.0.attn1", "up.0.attn1.to_q", "up.0.to_q", "up.0.attn2x", "up.0.attn2x.to_q"}
    assert adapter.cross_attention_names(modules) == {"down.0.attn2"}


def test_diff_reads_a_null_calibration_as_none_as_report_does(tmp_path):
    """A manifest holding "calibration": null (finished_run accepts it, report reads it as not calibrated) made
    `memaudit diff` take the run as calibrated: "old flagged" columns and flag counts for runs never calibrated. Now
    the diff of two such runs is the diff of the same runs without the key (mnew52c's finding)."""
    import json

    from audit.diff import diff_runs, render_json
    from test_report_mutants import make_run

    rows = [("a", 1.0), ("b", 2.0)]
    plain = [make_run(tmp_path / f"plain{i}", rows) for i in (0, 1)]
    null = [make_run(tmp_path / f"null{i}", rows) for i in (0, 1)]
    for run in null:
        manifest = json.loads((run / "manifest.json").read_text())
        assert "calibration" not in manifest
        (run / "manifest.json").write_text(json.dumps(manifest | {"calibration": None}))
    want, got = json.loads(render_json(diff_runs(*plain))), json.loads(render_json(diff_runs(*null)))
    for d in (want, got):  # the run folders' paths differ, nothing else may
        d.pop("old_run", None), d.pop("new_run", None)
    assert got == want
    assert (got["old_calibrated"], got["new_calibrated"], got["summary"]["new_flagged"]) == (False, False, None)
