"""`memaudit report`: counts, histogram, top prompts, breakdowns, escaping, and the page in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.calibrate import calibrate, write_calibration
from audit.pipeline import RunConfig
from audit.report import build_report, md_escape, render_html, render_markdown, render_terminal, trigger_spans, write_report
from audit.runner import execute

SCRIPT = "<script>alert('x')</script> a dog"
MARKDOWN = "**bold** | pipe _under_ [link](http://example.com/x) `code` #tag"
RICH = "[bold red]rich markup[/] cat"
CONTROL = "control\x1b[31mred\x1b[0m null\x00 \u202eevil cat"  # terminal escape, NUL, right-to-left override
DAY1 = ["a red cat on the beach", SCRIPT, MARKDOWN, RICH, "a red cat on the beach", None, "  ", "old oil painting"]
DAY2 = ["a photo of a city at night", "a red cat on the beach", "sunset over the lake", "", "a blue car",
        "portrait of a woman", CONTROL]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """One calibrated run over two hive date partitions (scored once; the calibrated rerun only re-finalizes)."""
    root = tmp_path_factory.mktemp("report")
    for day, prompts in (("2026-11-27", DAY1), ("2026-11-28", DAY2)):
        d = root / "logs" / f"date={day}"
        d.mkdir(parents=True)
        users = [f"u{i % 2}" for i in range(len(prompts))]
        pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string()), "user": users}), d / "part-0.parquet")
    cfg = RunConfig(inputs=(str(root / "logs"),), model=str(tiny_model_dir), out=str(root / "run"), device="cpu",
                    keep_columns=("user",), batch_size=16)
    execute(cfg, progress=False, log=lambda m: None)
    cal = calibrate(root / "run", fpr=0.25)
    write_calibration(cal, root / "cal.json")
    from dataclasses import replace

    execute(replace(cfg, calibration=str(root / "cal.json")), progress=False, log=lambda m: None)
    return root / "run"


def test_counts_histogram_and_breakdowns_are_exact(run_dir):
    risk = pl.read_parquet(run_dir / "risk.parquet")
    r = build_report(run_dir, top=5, by=["user"], bins=12)
    c = r.counts
    assert c["scored"] == 12 == risk.height
    assert list(c["rejected_by_reason"].items()) == [("empty_prompt", 2), ("null_prompt", 1)]  # most first
    assert c["rows_read"] == 15 and c["rejected"] == 3
    assert c["unique_prompts"] == 10 and c["duplicates"] == 2  # "a red cat on the beach" 3 times
    assert r.calibrated and c["flagged"] == int((risk["risk"] > r.threshold).sum()) == risk["flagged"].sum()
    assert c["flagged"] >= 1
    # histogram: every row in exactly one bin, same counts as numpy over the same edges
    assert r.hist.height == 12 and int(r.hist["count"].sum()) == 12
    lo, hi = r.hist["lo"][0], r.hist["hi"][-1]
    assert lo <= r.threshold <= hi
    expected, _ = np.histogram(risk["risk"].to_numpy(), bins=12, range=(lo, hi))
    assert r.hist["count"].to_list() == expected.tolist()
    assert r.hist.filter(~pl.col("above"))["hi"].max() <= r.threshold < r.hist.filter(pl.col("above"))["hi"].min()
    assert r.hist.filter(pl.col("above"))["count"].sum() >= c["flagged"]
    # breakdowns: source, date derived from the hive path, the kept column
    titles = [t for t, _, _ in r.breakdowns]
    assert titles == ["By source file", "By date partition", "By user"]
    by_date = r.breakdowns[1][2].sort("date")
    assert by_date["date"].to_list() == ["2026-11-27", "2026-11-28"]
    assert by_date["rows"].to_list() == [6, 6] and by_date["rejected"].to_list() == [2, 1]
    assert by_date["flagged"].sum() == c["flagged"]
    by_user = r.breakdowns[2][2].sort("user")
    assert by_user["rows"].to_list() == risk.group_by("user").len().sort("user")["len"].to_list()
    assert by_user["max_risk"].to_list() == risk.group_by("user").agg(pl.col("risk").max()).sort("user")["risk"].to_list()


def test_top_prompts_are_unique_and_ranked(run_dir):
    r = build_report(run_dir, top=20)
    assert r.top.height == 10  # unique prompts
    assert r.top["rank"].is_sorted() and r.top["prompt_hash"].n_unique() == 10
    dup = r.top.filter(pl.col("prompt") == "a red cat on the beach")
    assert dup["rows"].to_list() == [3]
    assert r.top["flagged"].sum() == r.top.filter(pl.col("risk") > r.threshold).height
    # every rank is a row of risk.parquet: a prompt's 3 rows hold 3 ranks, and the report says why ranks skip
    assert r.top["rank"].to_list() == (r.top["rank"].head(1) + r.top["rows"].cum_sum().shift(1, fill_value=0)).to_list()
    note = "holds that many ranks"
    assert note in render_markdown(r) and note in render_html(r)
    from rich.console import Console

    console = Console(record=True, width=200)
    render_terminal(r, console=console)
    wide = console.export_text()
    assert note in wide
    # breakdowns: source paths under their common folder, named once in the title; risk columns headed mean / p95
    # / max, so that at 80 columns (a CI log) a date fits on one line and a path is folded in 12-character pieces
    logs = f"{run_dir.parent / 'logs'}/"
    assert f"By source file under {logs} (risk: mean, p95, max)" in wide
    narrow = Console(record=True, width=80, color_system=None)
    render_terminal(r, console=narrow)
    lines = narrow.export_text().splitlines()
    # (the max column has 5 decimals here: 2026-11-27's riskiest row is the threshold's own, 4.3433930 unflagged,
    # which at 4 decimals read 4.3434, above 'risk > 4.34339', with 0 flagged: test_uauditor_findings)
    assert "┃ source      ┃ rows ┃ unique ┃   mean ┃    p95 ┃     max ┃ flagged ┃ rejected ┃" in lines
    assert any(line.startswith("│ date=2026-1 │    6 │      5 │") for line in lines)
    assert any(line.startswith("│ 2026-11-27 │    6 │      5 │") for line in lines)
    from dataclasses import replace

    single = replace(r, top=r.top.filter(pl.col("rows") == 1))
    assert note not in render_markdown(single) and note not in render_html(single)


def test_trigger_spans_follow_token_positions():
    p = "A Red cat, red dog *bold*"
    # tokens: a(1) red(2) cat(3) ,(4) red(5) dog(6) *(7) bo(8) ld(9) *(10)
    assert trigger_spans(p, [{"token": "red", "position": 5, "mass": .1}]) == [(11, 14)]
    assert trigger_spans(p, [{"token": "red", "position": 2, "mass": .1}]) == [(2, 5)]
    assert trigger_spans(p, [{"token": "bo", "position": 8, "mass": .1}, {"token": "ld", "position": 9, "mass": .1}]) \
        == [(20, 24)]
    assert trigger_spans(p, [{"token": "zebra", "position": 3, "mass": .1}]) == []
    # a recorded span (the fast tokenizer's offset mapping) is used as is, merged with its neighbours
    assert trigger_spans(p, [{"token": "red", "position": 5, "mass": .1, "start": 11, "end": 14},
                             {"token": "dog", "position": 6, "mass": .1, "start": 15, "end": 18}]) == [(11, 14), (15, 18)]
    assert trigger_spans(p, [{"token": "bo", "position": 8, "mass": .1, "start": 20, "end": 22},
                             {"token": "ld", "position": 9, "mass": .1, "start": 22, "end": 24}]) == [(20, 24)]


def test_long_prompts_are_clipped_in_tables_with_the_rest_counted():
    from audit.report import clip_text, segments

    long = "red " * 1000  # 4,000 characters
    assert clip_text(long) == long[:300] + " … (+3,700 chars)"
    assert clip_text("a cat") == "a cat"
    pieces = segments(long, [{"token": "red", "position": 2, "mass": .1}], max_chars=10)
    # the second "red" stays highlighted; the text stops after 10 characters and says what was left out
    assert pieces == [("red ", False), ("red", True), (" re", False), (" … (+3,990 chars)", False)]
    assert segments(long, None, max_chars=None) == [(long, False)]
    # a line break or tab inside a prompt is shown as written in every table cell, not as a new line
    assert clip_text("two\nlines\tand a tab\r") == r"two\nlines\tand a tab\x0d"
    assert segments("a red\ncar", [{"token": "red", "position": 2, "mass": .1}]) == [
        ("a ", False), ("red", True), (r"\ncar", False)]


def test_markdown_and_terminal_escape_untrusted_text(run_dir):
    from rich.console import Console

    r = build_report(run_dir, top=20, by=["user"])
    md = render_markdown(r)
    plain = re.sub(r"</?b>", "", md)
    assert "<script" not in md and "&lt;script&gt;alert('x')&lt;/script&gt; a dog" in plain
    assert re.search(r"\| <b>[^<]+</b>", md)  # trigger tokens highlighted in the prompt cells
    assert md_escape(MARKDOWN) == (r"\*\*bold\*\* \| pipe \_under\_ \[link\](http://example.com/x) \`code\` \#tag")
    table_rows = [line for line in plain.splitlines() if line.startswith("| ") and "under" in line]
    assert table_rows and all(line.count(" | ") == 7 for line in table_rows)  # the escaped | does not split cells
    console = Console(record=True, width=250, color_system=None)
    render_terminal(r, console)
    text = console.export_text()
    assert "[bold red]rich markup[/] cat" in text  # shown as text, not applied as rich markup
    assert "<script>alert('x')</script> a dog" in text
    for rendered in (text, md):  # control characters never reach the terminal or the file raw
        assert "\x1b" not in rendered and "\x00" not in rendered and "\u202e" not in rendered
    assert r"control\x1b[31mred\x1b[0m null\x00 \u202eevil cat" in text
    assert r"control\\x1b\[31mred\\x1b\[0m null\\x00 \\u202eevil cat" in plain


def test_visible_escapes_controls_and_bidi_and_keeps_text():
    from audit.report import md_code, visible

    assert visible("a\x1b[2Jb\rc\x7f\x85\u202e\u2066d") == r"a\x1b[2Jb\x0dc\x7f\x85\u202e\u2066d"
    assert visible("tab\tnew\nline 東京 🎨 café") == "tab\tnew\nline 東京 🎨 café"
    assert visible("tab\tnew\nline\x1b", one_line=True) == r"tab\tnew\nline\x1b"
    assert visible("zero\u200bwidth\ufeffbom\u2060") == r"zero\u200bwidth\ufeffbom\u2060"
    assert visible("👨\u200d👩\u200d👧") == "👨\u200d👩\u200d👧"  # ZWJ emoji sequences stay intact
    assert md_code("runs/r_hA") == "`runs/r_hA`"  # no backslashes inside a code span
    assert md_code("a`b") == "``a`b``" and md_code("`x") == "`` `x ``"


def test_html_is_escaped_and_self_contained(run_dir):
    path = write_report(run_dir, "html", top=20, by=["user"])
    assert path == run_dir / "report.html"
    page = path.read_text()
    assert "<script" not in page  # the prompt is text; the page itself has no scripts
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page.replace("<mark>", "").replace("</mark>", "")
    assert "\x1b" not in page and "\x00" not in page and "\u202e" not in page
    assert r"\x1b[31mred" in page.replace("<mark>", "").replace("</mark>", "")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)  # nothing loaded from a network
    assert page.count('src="data:image/png;base64,') == 2  # histogram and dates plot
    assert "Content-Security-Policy" in page and 'id="top"' in page


def test_report_cli_writes_markdown_and_rejects_unknown_column(run_dir):
    from typer.testing import CliRunner

    from audit.cli import app

    res = CliRunner().invoke(app, ["report", str(run_dir), "--format", "md", "--top", "3", "--by", "user"])
    assert res.exit_code == 0, res.output
    md = (run_dir / "report.md").read_text()
    assert "## Top 3 prompts" in md and "## By user" in md and "## By date partition" in md
    res = CliRunner().invoke(app, ["report", str(run_dir), "--by", "nope"])
    assert res.exit_code == 2 and "--by nope" in res.output and "user" in res.output


def test_output_extension_picks_the_format(run_dir, tmp_path):
    """`report RUN -o page.html` was refused ('add --format html'); the extension now says it. An extension that
    names no format, or an explicit --format terminal with -o, is still refused."""
    from typer.testing import CliRunner

    from audit.cli import app

    for name, marker in (("page.html", "<!doctype html>"), ("page.md", "## Top 3 prompts")):
        res = CliRunner().invoke(app, ["report", str(run_dir), "--top", "3", "-o", str(tmp_path / name)])
        assert res.exit_code == 0 and marker in (tmp_path / name).read_text(), res.output
    for args in (["-o", str(tmp_path / "page.txt")], ["-f", "terminal", "-o", str(tmp_path / "x.md")]):
        res = CliRunner().invoke(app, ["report", str(run_dir), *args])
        assert res.exit_code == 2 and "add --format md or --format html" in res.output, res.output
    from audit.errors import ReportError
    from audit.report import build_report, emit_report

    with pytest.raises(ReportError, match="--format pdf: choose one of terminal, md, html"):  # wrote HTML before
        emit_report(build_report(run_dir, top=3), "pdf", tmp_path / "page.pdf")
    assert not (tmp_path / "page.pdf").exists()
    res = CliRunner().invoke(app, ["diff", str(run_dir), str(run_dir), "-o", str(tmp_path / "d.md")])
    assert res.exit_code == 0 and (tmp_path / "d.md").read_text().startswith("# memaudit diff")
    res = CliRunner().invoke(app, ["diff", str(run_dir), str(run_dir)])
    assert res.exit_code == 0 and res.output.startswith("memaudit diff:")  # terminal by default


def _load_in_chromium(browser: str, page, tmp_path) -> tuple[str, list[str]]:
    """Load a file in headless Chromium; return the DOM after load and the console messages."""
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--enable-logging=stderr",
         "--v=0", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


def test_report_html_in_chromium(request, tmp_path):
    """The page loads in a real headless Chromium without console errors and shows the top table.

    Runs where Chromium is installed (`.ci/install-chromium.sh` installs it from the Debian packages)."""
    from helpers import chromium_or_skip

    browser = chromium_or_skip("the report.html browser test")
    run_dir = request.getfixturevalue("run_dir")  # after the check: no scoring where the test cannot run
    # the console capture works: a page with a script error reports it
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><html><body><p>x</p><script>undefinedFn()</script></body></html>")
    _, console = _load_in_chromium(browser, bad, tmp_path)
    assert any("undefinedFn" in line for line in console)

    page = write_report(run_dir, "html", top=20, by=["user"])
    dom, console = _load_in_chromium(browser, page, tmp_path)
    assert console == []
    top = re.search(r'<table id="top">(.*?)</table>', dom, re.S)
    assert top, dom[:2000]
    assert top.group(1).count("<tr>") == 1 + 10  # header + one row per unique prompt
    plain = re.sub(r"</?mark>", "", top.group(1))
    assert "&lt;script&gt;alert('x')&lt;/script&gt; a dog" in plain  # shown as text, never run
    assert r"control\x1b[31mred\x1b[0m null\x00 \u202eevil cat" in plain  # control characters shown escaped
    assert "<script" not in dom


def test_terminal_prompt_id_is_the_file_name_and_row():
    """The terminal's narrow id column shows a default id as file name and row; --id-column ids unchanged."""
    from audit.report import _short_id

    assert _short_id("/data/logs/day=1/part-0.parquet#41", "/data/logs/day=1/part-0.parquet") == "part-0.parquet#41"
    assert _short_id("s3://bucket/p.parquet#0", "s3://bucket/p.parquet") == "p.parquet#0"
    assert _short_id("user/42#x", "/data/p.parquet") == "user/42#x"
    assert _short_id("abc", None) == "abc"


def _resize(path, by: int):
    """Rewrite the Parquet table at ``path`` with ``by`` rows fewer (negative) or its first rows repeated."""
    t = pq.read_table(path)
    pq.write_table(t.slice(0, t.num_rows + by) if by < 0 else pa.concat_tables([t, t.slice(0, by)]), path)


def test_damaged_run_folders_are_refused_naming_the_file(run_dir, tmp_path):
    """report, diff and calibrate read a run only when its files are intact: each damage is named in one line."""
    import json
    import shutil

    from typer.testing import CliRunner

    from audit.cli import app

    def damaged(name, damage):
        d = tmp_path / name
        shutil.copytree(run_dir, d)
        damage(d)
        return d

    cases = {
        "bad_json": (lambda d: (d / "manifest.json").write_text("{\n,"), "manifest.json is not valid JSON"),
        "no_counts": (lambda d: (d / "manifest.json").write_text("{}"), "lacks the run's counts or model"),
        "truncated": (lambda d: (d / "risk.parquet").write_bytes((d / "risk.parquet").read_bytes()[:100]),
                      "risk.parquet cannot be read as Parquet"),
        "other_table": (lambda d: shutil.copy(d / "rejects.parquet", d / "risk.parquet"),
                        "risk.parquet lacks column(s) prompt_hash, risk, rank"),
        # same columns and metadata, one row fewer or more than manifest.json counts: only the count tells
        "short_risk": (lambda d: _resize(d / "risk.parquet", -1), "risk.parquet has 11 rows but manifest.json "
                       "counts 12 scored"),
        "short_rejects": (lambda d: _resize(d / "rejects.parquet", -1), "rejects.parquet has 2 rows but "
                          "manifest.json counts 3 rejected"),
        "long_rejects": (lambda d: _resize(d / "rejects.parquet", 1), "rejects.parquet has 4 rows but "
                         "manifest.json counts 3 rejected"),
    }
    for name, (damage, message) in cases.items():
        d = damaged(name, damage)
        readers = [["report", str(d)], ["diff", str(run_dir), str(d)], ["calibrate", str(d), "-o",
                                                                        str(tmp_path / "c.json")]]
        for args in readers[:1] if "rejects" in name else readers:  # diff and calibrate read risk.parquet only
            res = CliRunner().invoke(app, args)
            assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (name, args, res.output)
    assert json.loads((run_dir / "manifest.json").read_text())["counts"]  # the fixture itself untouched
    res = CliRunner().invoke(app, ["report", str(run_dir), "--bins", "1001"])
    assert res.exit_code == 2 and "at most 1,000" in res.output
    res = CliRunner().invoke(app, ["diff", str(run_dir), str(run_dir), "--top", "0"])
    assert res.exit_code == 2 and "--top 0: must be at least 1" in res.output


def test_by_refuses_columns_that_are_not_labels(run_dir):
    from audit.errors import ReportError

    for col in ("trigger_tokens", "risk", "flagged", "attn_entropy"):
        with pytest.raises(ReportError, match=f"--by {col}: not a column to group by"):
            build_report(run_dir, by=[col])
    twice = build_report(run_dir, by=["source", "source"])  # named twice: one breakdown
    assert [title for title, _, _ in twice.breakdowns].count("By source") == 1


def test_an_unfinished_run_says_how_to_resume_and_outputs_must_be_files(run_dir, tmp_path):
    import shutil

    from audit.errors import ReportError
    from audit.tables import atomic_path

    d = tmp_path / "cut"
    shutil.copytree(run_dir, d)
    (d / "risk.parquet").unlink()  # as a run stopped before its merge leaves it (run.json present, no manifest.json:
    (d / "manifest.json").unlink()  # written last; with it, the run had finished and lost its table)
    with pytest.raises(ReportError, match="did not finish; rerun its command with the same --out to resume"):
        build_report(d)
    from audit.pipeline import out_lock

    with out_lock(d):  # a run writing the folder now: not "rerun it"
        with pytest.raises(ReportError, match="is being written by a memaudit run right now"):
            build_report(d)
    # the table given for its folder, or a folder that is not there: said as such (it said "RUN/risk.parquet is not
    # a finished memaudit run (no risk.parquet)")
    from typer.testing import CliRunner

    from audit.cli import app

    for args in (["report", str(run_dir / "risk.parquet")], ["diff", str(run_dir), str(run_dir / "risk.parquet")],
                 ["calibrate", str(run_dir / "risk.parquet"), "-o", str(tmp_path / "c.json")]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and f"{run_dir / 'risk.parquet'} is a file: give the run folder ({run_dir})" \
            in res.output, res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "nope does not exist: give a run folder" in res.output
    # a name the file system refuses to look up (over 255 bytes): a usage error naming why, for each command that
    # reads a run folder (it was an internal error, exit 1, "OSError: [Errno 36] File name too long")
    long = tmp_path / ("a" * 300)
    for args in (["report", str(long)], ["diff", str(run_dir), str(long)], ["diff", str(long), str(run_dir)],
                 ["calibrate", str(long), "-o", str(tmp_path / "c.json")]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and f"{long} cannot be read (File name too long): give a run folder" in res.output, \
            (args, res.output)
    from audit.errors import RunError

    for bad, message in ((tmp_path, "is a folder"), (tmp_path / "missing" / "x.md", "no such folder")):
        with pytest.raises(RunError, match=message):
            with atomic_path(bad):
                pass


def test_breakdown_labels_are_clipped_like_prompts():
    from audit.report import PROMPT_DISPLAY_CHARS, _breakdown_cells

    frame = pl.DataFrame({"prompt": ["x" * 5000, "short\u200b"], "rows": [1, 2], "mean_risk": [0.5, 0.25]})
    cells = _breakdown_cells(frame, ["prompt", "rows", "mean_risk"], "prompt")
    assert cells[0][0] == "x" * PROMPT_DISPLAY_CHARS + f" … (+{5000 - PROMPT_DISPLAY_CHARS:,} chars)"
    assert cells[1] == ["short\\u200b", "2", "0.2500"]  # invisible characters shown, numbers formatted


def test_outputs_never_replace_a_run_a_device_or_another_kind_of_file(run_dir, tmp_path):
    """-o of report, diff and calibrate: the extension must fit the format, a run's own files and a JSON that
    is not a calibration are refused, a link is written through and a FIFO is refused (not replaced)."""
    from typer.testing import CliRunner

    from audit.cli import app

    runner = CliRunner()
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    (tmp_path / "other.json").write_text('{"a": 1}')
    os.mkfifo(tmp_path / "fifo.md")
    (tmp_path / "link.md").symlink_to(tmp_path / "target.md")
    refusals = [
        (["report", str(d), "--format", "html", "-o", str(d / "risk.parquet")], "written to a .html or .htm file"),
        (["report", str(d), "--format", "md", "-o", str(tmp_path / "fifo.md")], "not a regular file"),
        (["diff", str(d), str(d), "--format", "md", "-o", str(tmp_path / "x.html")], "written to a .md"),
        (["calibrate", str(d), "--fpr", "0.5", "-o", str(d / "manifest.json")], "a file of the memaudit output folder"),
        (["calibrate", str(d), "--fpr", "0.5", "-o", str(tmp_path / "other.json")], "is not a memaudit calibration"),
        (["calibrate", str(d), "--fpr", "0.5", "-o", str(tmp_path / "no" / "c.json")], "no such folder"),
    ]
    for args, message in refusals:
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and message in r.output, (args, r.output)
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == before
    assert (tmp_path / "fifo.md").is_fifo() and (tmp_path / "other.json").read_text() == '{"a": 1}'
    r = runner.invoke(app, ["report", str(d), "-o", str(tmp_path / "link.md")])
    assert r.exit_code == 0 and (tmp_path / "link.md").is_symlink()
    assert (tmp_path / "target.md").read_text().startswith("# memaudit report")


def test_by_column_names_are_shown_as_text_in_the_terminal(run_dir, tmp_path):
    """A --by column's name comes from the user's input: its markup and escape codes are shown, not obeyed."""
    from typer.testing import CliRunner

    from audit.cli import app

    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    table = pq.read_table(d / "risk.parquet")
    name = "\x1b[5m[red]col"
    pq.write_table(table.append_column(name, pa.array(["g"] * table.num_rows)), d / "risk.parquet")
    r = CliRunner().invoke(app, ["report", str(d), "--by", name])
    assert r.exit_code == 0, r.output
    assert "By \\x1b[5m[red]col" in r.output and "\x1b" not in r.output


def test_histogram_of_equal_risks_is_one_bin():
    from audit.report import _histogram

    lf = pl.LazyFrame({"risk": [1.5, 1.5, 1.5]})
    one = _histogram(lf, 30, None)
    assert one.height == 1 and one["count"].to_list() == [3] and one["lo"][0] < 1.5 < one["hi"][0]
    spread = _histogram(pl.LazyFrame({"risk": [0.0, 1.0, 2.0, 4.0]}), 4, None)
    assert spread["count"].to_list() == [1, 1, 1, 1] and spread["lo"].to_list() == [0.0, 1.0, 2.0, 3.0]


# ---------------------------------------------------------------- diff: ranks among the common prompts, calibration

@pytest.fixture(scope="module")
def day2_run(run_dir, tiny_model_dir):
    """An uncalibrated run over the second date partition only: 6 of the fixture run's 10 unique prompts, scored
    with the same model and settings, so each has the same risk in both runs. Started in a later second than the
    fixture run (the manifests' times are to the second: a fast machine started both in one second, and the diff's
    "old run was first started after the new one" warning, which tests of this pair expect, was not given)."""
    import datetime as dt
    import time

    first = json.loads((run_dir / "manifest.json").read_text())["first_started_at"]
    while dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds") <= first:
        time.sleep(0.05)
    cfg = RunConfig(inputs=(str(run_dir.parent / "logs" / "date=2026-11-28"),), model=str(tiny_model_dir),
                    out=str(run_dir.parent / "day2"), device="cpu", keep_columns=("user",), batch_size=16)
    execute(cfg, progress=False, log=lambda m: None)
    return run_dir.parent / "day2"


def _with_risks(src, dst, risks: dict[str, float]):
    """A copy of run folder ``src`` whose prompts have the ``risks`` given (prompt -> risk), ranked again."""
    shutil.copytree(src, dst)
    table = pq.read_table(dst / "risk.parquet")
    new = pa.array([risks.get(p, r) for p, r in zip(table["prompt"].to_pylist(), table["risk"].to_pylist())],
                   pa.float64())
    table = table.set_column(table.schema.get_field_index("risk"), "risk", new)
    table = table.sort_by([("risk", "descending"), ("prompt_id", "ascending")])
    table = table.set_column(table.schema.get_field_index("rank"), "rank", pa.array(range(1, table.num_rows + 1)))
    pq.write_table(table, dst / "risk.parquet")
    return dst


def test_diff_ranks_prompts_among_those_in_both_runs(run_dir, day2_run, tmp_path):
    """Two runs of different sizes with the same risks: no prompt rose or fell (ranks over each whole run listed
    every prompt of the smaller run as risen, the least risky first). A real change of order is measured among
    the common prompts."""
    from audit.diff import diff_runs, render_markdown, render_terminal
    from rich.console import Console

    common = pl.read_parquet(day2_run / "risk.parquet").unique("prompt_hash")
    assert common.height == 6
    for old, new in ((run_dir, day2_run), (day2_run, run_dir)):
        d = diff_runs(old, new, top=50)
        assert (d.summary["in_both"], d.summary["rank_risen"], d.rank_rises.height) == (6, 0, 0), d.rank_rises
        assert d.summary["rank_fallen"] == 0
        # run_dir holds 10 distinct prompts, day2_run 6 of them
        assert (d.summary["only_new"], d.summary["only_old"]) == ((0, 4) if new == day2_run else (4, 0))
    # the least risky common prompt becomes the riskiest: it rises 5 places among the 6, the 5 others fall 1
    low = common.sort("risk")["prompt"][0]
    moved = _with_risks(day2_run, tmp_path / "moved", {low: float(common["risk"].max()) + 1.0})
    for old in (run_dir, day2_run):
        d = diff_runs(old, moved, top=50)
        assert (d.summary["rank_risen"], d.summary["rank_fallen"]) == (1, 5)
        assert d.rank_rises.select("rise", "old_rank", "rank", "prompt").rows() == [(5, 6, 1, low)]
    # the other way, the 5 others rise by 1 in run_dir: each listed with its best-ranked row's id and all its rows
    back = diff_runs(moved, run_dir, top=50)
    best = pl.read_parquet(run_dir / "risk.parquet").sort("rank").group_by("prompt", maintain_order=True).agg(
        pl.col("prompt_id").first(), rows=pl.len())
    want = {p: (i, n) for p, i, n in best.rows()}
    assert back.rank_rises.height == 5 and low not in back.rank_rises["prompt"].to_list()
    assert {p: (i, n) for p, i, n in back.rank_rises.select("prompt", "prompt_id", "rows").rows()} == {
        p: want[p] for p in back.rank_rises["prompt"]}
    assert "a red cat on the beach" in back.rank_rises["prompt"].to_list() or low == "a red cat on the beach"
    md = render_markdown(d)
    assert "1 rose and 5 fell in rank among the 6 in both" in md
    assert "Old rank and new rank: the prompt's place among the 6 prompts in both runs" in md
    console = Console(record=True, width=200, color_system=None)
    render_terminal(d, console)
    text = console.export_text()
    assert "Old rank and new rank: the prompt's place among the 6 prompts in both runs" in text
    # default ids (<source path>#<row>) as the file's name and row, as the report shows them (the whole path
    # wrapped over several lines of the cell); the Markdown keeps the whole id
    pid = d.rank_rises["prompt_id"][0]
    assert pid.startswith("/") and f"part-0.parquet#{pid.rsplit('#', 1)[1]}" in text
    assert pid.rsplit("/", 1)[0] not in text and md_escape(pid) in md


def test_diff_from_an_uncalibrated_run_says_the_old_run_had_no_flags(run_dir, day2_run):
    """Old run uncalibrated, new calibrated: every flagged prompt is listed, those the old run scored with status
    'old run not calibrated' (was 'was not flagged', with no warning), and every format warns."""
    from audit.diff import diff_runs, render_markdown, render_terminal
    from rich.console import Console

    risk = pl.read_parquet(run_dir / "risk.parquet")
    old_hashes = set(pl.read_parquet(day2_run / "risk.parquet")["prompt_hash"])
    flagged = risk.filter(pl.col("flagged")).sort("rank").unique("prompt_hash", keep="first", maintain_order=True)
    expected = ["old run not calibrated" if h in old_hashes else "new prompt" for h in flagged["prompt_hash"]]
    assert "old run not calibrated" in expected  # the fixture flags a prompt of both runs
    d = diff_runs(day2_run, run_dir, top=50)
    assert d.newly_flagged["prompt"].to_list() == flagged["prompt"].to_list()
    # the id and row count of a prompt on several rows: its best-ranked row's id, all its rows
    assert d.newly_flagged["prompt_id"].to_list() == flagged["prompt_id"].to_list()
    n_rows = dict(zip(*risk.group_by("prompt_hash").len().get_columns()))
    assert d.newly_flagged["rows"].to_list() == [n_rows[h] for h in flagged["prompt_hash"]]
    assert d.newly_flagged["status"].to_list() == expected
    # (the fixture's "old" run was made after the new one: the diff says they may be swapped, nothing else)
    assert [w[:49] for w in d.warnings] == ["the old run was first started after the new one ("]
    assert len(d.flag_warnings) == 1
    assert d.flag_warnings[0].startswith("the old run was not calibrated: it has no flags, so every prompt flagged")
    md = render_markdown(d)
    assert "**Warning:** the old run was not calibrated" in md and "| old run not calibrated |" in md
    assert "was not flagged" not in md and "(old run not calibrated: no flags to compare)" in md
    console = Console(record=True, width=250, color_system=None)
    render_terminal(d, console)
    text = console.export_text()
    assert "warning: the old run was not calibrated" in text and "old run not calibrated │" in text
    # the reverse: a calibrated old run and an uncalibrated new one lists no flags at all, and says so
    back = diff_runs(run_dir, day2_run)
    assert back.flag_warnings == [] and back.summary["newly_flagged"] is None
    assert "new run not calibrated: no flags to compare" in render_markdown(back)
    assert "## Newly flagged" not in render_markdown(back)
    # both calibrated: no warning, and the status is as before
    same = diff_runs(run_dir, run_dir)
    assert same.flag_warnings == [] and same.newly_flagged.height == 0


# ---------------------------------------------------------------- report: labels, warnings, ids, clusters, invisibles

def test_histogram_is_labelled_as_counting_rows(run_dir):
    """The histogram counts rows of risk.parquet (a prompt on 3 rows counts 3 times), and says so in every format
    (it was labelled "prompts")."""
    from rich.console import Console

    r = build_report(run_dir, bins=5)
    assert int(r.hist["count"].sum()) == r.counts["scored"] == 12 and r.counts["unique_prompts"] == 10
    console = Console(record=True, width=120, color_system=None)
    render_terminal(r, console)
    text = console.export_text()
    assert re.search(r"┃ risk from ┃ +to ┃ rows ┃", text) and "prompts ┃" not in text
    assert "Each bar counts rows of risk.parquet" in text
    md = render_markdown(r)
    assert "   risk from           to     rows" in md and "Each bar counts rows of risk.parquet" in md
    page = render_html(r)
    assert 'alt="risk histogram: rows per risk bin"' in page and "Each bar counts rows of risk.parquet" in page
    from audit.report import histogram_figure

    assert histogram_figure(r).axes[0].get_ylabel() == "rows"


def test_a_run_that_scored_nothing_says_so_in_report_md_and_html(tmp_path, tiny_model_dir):
    """Every input file skipped (--skip-bad-files): report.md and report.html carry the warning, naming the
    skipped files, not only stderr. A run whose rows were all rejected says it too; a run that scored says nothing."""
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "blank.txt").write_text("\n  \n\u200b\n")
    for name, inputs, skip in (("skipped", ["broken.parquet"], True), ("rejected", ["blank.txt"], False)):
        execute(RunConfig(inputs=tuple(str(tmp_path / i) for i in inputs), model=str(tiny_model_dir),
                          out=str(tmp_path / name), device="cpu", skip_bad_files=skip), progress=False,
                log=lambda m: None)
    md = write_report(tmp_path / "skipped", "md").read_text()
    assert ("**Warning:** the run scored nothing (0 rows read, 0 rejected; 1 input file skipped, not read: see "
            "Skipped files): this report summarizes no scores.") in md
    assert md.index("**Warning:**") < md.index("## Counts")
    page = write_report(tmp_path / "skipped", "html").read_text()
    assert ('<p class="warning">Warning: the run scored nothing (0 rows read, 0 rejected; 1 input file skipped, not '
            'read: see Skipped files): this report summarizes no scores.</p>') in page
    from typer.testing import CliRunner

    from audit.cli import app

    res = CliRunner().invoke(app, ["report", str(tmp_path / "skipped")])  # the terminal's stderr line: the same words
    assert res.exit_code == 0 and ("memaudit: warning: the run scored nothing (0 rows read, 0 rejected; 1 input file "
                                   "skipped, not read: see Skipped files)") in res.output, res.output
    assert build_report(tmp_path / "skipped").warnings == [
        "the run scored nothing (0 rows read, 0 rejected; 1 input file skipped, not read: see Skipped files): this "
        "report summarizes no scores"]
    rejected = build_report(tmp_path / "rejected")
    assert rejected.counts["rows_read"] == 3
    assert "<p class=\"warning\">Warning: the run scored nothing (3 rows read, 3 rejected)" in render_html(rejected)
    assert rejected.warnings == ["the run scored nothing (3 rows read, 3 rejected): this report summarizes no scores"]


def test_report_without_warning_when_rows_were_scored(run_dir):
    r = build_report(run_dir)
    assert r.warnings == [] and "**Warning:**" not in render_markdown(r) and 'class="warning"' not in render_html(r)


def test_html_ids_are_unique_with_by_date_and_by_source(run_dir, tmp_path, monkeypatch):
    """`--by date` on a run with date partitions and a kept `date` column gave two `id="by-date"` tables (and two
    `id="dates"` plots), `--by source` two `id="by-source"`: each id is now unique. The groups left out of each
    breakdown are counted per breakdown (they were keyed by column name, shared by the two)."""
    import audit.report

    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    table = pq.read_table(d / "risk.parquet")
    dates = ["2026-12-01" if i % 2 else "2026-12-02" for i in range(table.num_rows)]
    pq.write_table(table.append_column("date", pa.array(dates)), d / "risk.parquet")
    r = build_report(d, by=["date", "source"])
    assert [(title, key) for title, key, _ in r.breakdowns] == [
        ("By source file", "source"), ("By date partition", "date"), ("By date", "date"), ("By source", "source")]
    page = render_html(r)
    ids = re.findall(r'\sid="([^"]*)"', page)
    assert ids == ["counts", "histogram", "histogram-bins", "top", "by-source", "dates", "by-date", "dates-2",
                   "by-date-2", "by-source-2"]
    monkeypatch.setattr(audit.report, "MAX_GROUPS", 1)
    r = build_report(d, by=["date"])
    assert r.truncated_groups == {0: 1, 1: 1, 2: 1}
    assert render_markdown(r).count("... 1 more groups") == 3
    # a --by column whose title repeats a built-in one keeps its own count (they were keyed by title)
    t = pq.read_table(d / "risk.parquet")
    pq.write_table(t.append_column("source file", pa.array([f"s{i}" for i in range(t.num_rows)])), d / "risk.parquet")
    monkeypatch.setattr(audit.report, "MAX_GROUPS", 5)
    r = build_report(d, by=["source file"])
    assert [title for title, _, _ in r.breakdowns] == ["By source file", "By date partition", "By source file"]
    assert r.truncated_groups == {2: t.num_rows - 5}
    md = render_markdown(r)
    assert md.count("more groups") == 1 and f"... {t.num_rows - 5} more groups" in md


def test_a_clipped_prompt_is_cut_between_grapheme_clusters_and_counts_what_was_left():
    from audit.report import clip_text, segments

    family = "👩\u200d👩\u200d👧\u200d👦"
    prompt = "x" * 298 + family + " tail"  # the 300-character cut falls inside the family
    pieces = segments(prompt, None)
    assert "".join(t for t, _ in pieces) == "x" * 298 + " … (+12 chars)"
    assert clip_text(prompt) == "x" * 298 + " … (+12 chars)"
    assert clip_text("x" * 296 + family) == "x" * 296 + " … (+7 chars)"  # the whole sequence goes, not 4 of 7
    assert clip_text("x" * 301) == "x" * 300 + " … (+1 chars)"  # no cluster: cut at 300 as before


CLUSTER_PROMPTS = {  # prompts and trigger-token spans as the lab model's fast tokenizer gives them
    "a family 👩\u200d👩\u200d👧\u200d👦 at the beach END1": [(30, 32, "en"), (13, 14, "👧"), (15, 16, "👦"), (33, 34, "1"),
                                                           (12, 13, "\u200d")],
    "🏳\ufe0f\u200d🌈 flag over a castle END3": [(24, 26, "en"), (0, 1, "🏳"), (5, 6, "f"), (15, 16, "a"), (3, 4, "🌈")],
}


def test_trigger_highlights_never_split_a_grapheme_cluster(run_dir):
    """A highlight cut inside an emoji ZWJ sequence or before a variation selector made rich drop characters of the
    prompt in the terminal ('a family 👩‍👩‍👧‍ at the beach', '🏳️‍🌈 flag ove a castle'): spans are widened to whole
    grapheme clusters, and the terminal shows every character of the prompt."""
    from dataclasses import replace

    from rich.console import Console

    from audit.report import segments

    fam, flag = CLUSTER_PROMPTS

    def tokens(prompt):
        return [{"token": t, "position": i + 1, "mass": 0.5 - 0.05 * i, "start": s, "end": e}
                for i, (s, e, t) in enumerate(CLUSTER_PROMPTS[prompt])]

    top = pl.DataFrame({
        "rank": [1, 2], "risk": [2.5, 2.1], "risk_percentile": [None, None], "flagged": [None, None],
        "prompt": [fam, flag], "trigger_tokens": [tokens(fam), tokens(flag)], "prompt_id": ["z.txt#0", "z.txt#1"],
        "source": ["z.txt", "z.txt"], "prompt_hash": ["a", "b"], "rows": [1, 1]},
        schema_overrides={"risk_percentile": pl.Float64, "flagged": pl.Boolean})
    r = replace(build_report(run_dir), top=top, breakdowns=[])
    for width in (80, 100, 200):
        console = Console(record=True, width=width, color_system=None)
        render_terminal(r, console)
        lines = console.export_text().split("Top 2 prompts")[1].splitlines()
        cells: list[list[str]] = []
        for line in lines:
            parts = line.split("│")
            if len(parts) < 9:
                continue
            if parts[1].strip():
                cells.append([])
            cells[-1].append(parts[5].strip())
        shown = ["".join(c).replace(" ", "") for c in cells]
        assert shown == [fam.replace(" ", ""), flag.replace(" ", "")], (width, shown)
    assert trigger_spans(fam, tokens(fam)) == [(9, 16), (30, 32), (33, 34)]
    assert trigger_spans(flag, tokens(flag)) == [(0, 4), (5, 6), (15, 16), (24, 26)]
    assert segments(fam, tokens(fam))[:3] == [("a family ", False), ("👩\u200d👩\u200d👧\u200d👦", True),
                                              (" at the beach ", False)]
    # flags of two regional indicators, skin tones, combining accents and keycaps stay whole too
    assert trigger_spans("🇺🇸🇫🇷 x", [{"token": "s", "position": 1, "mass": .1, "start": 1, "end": 2}]) == [(0, 2)]
    mixed = [{"token": t, "position": i + 1, "mass": .1, "start": s, "end": s + 1} for i, (t, s) in
             enumerate((("t", 3), ("e", 6), ("1", 9)))]
    assert trigger_spans("ok 👍🏽 e\u0301 1\ufe0f\u20e3", mixed) == [(3, 5), (6, 8), (9, 12)]


def test_visible_escapes_tag_characters_and_interlinear_annotations_but_keeps_tag_flags():
    """Tag characters (U+E0000-U+E007F: invisible ASCII, "ASCII smuggling") and the interlinear annotation
    characters (U+FFF9-U+FFFB) are shown escaped; the flags of England, Scotland and Wales, the emoji tag
    sequences fonts draw, are kept."""
    from audit.report import md_escape
    from audit.text import visible

    smuggled = "\U000e0041\U000e0042 tag chars"
    assert visible(smuggled) == r"\U000e0041\U000e0042 tag chars"
    assert visible("a\ufff9b\ufffac\ufffbd\U000e0001x\U000e007f") == r"a\ufff9b\ufffac\ufffbd\U000e0001x\U000e007f"
    england = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
    scotland = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"
    wales = "\U0001f3f4\U000e0067\U000e0062\U000e0077\U000e006c\U000e0073\U000e007f"
    for flag in (england, scotland, wales):
        assert visible(f"the flag {flag} of it") == f"the flag {flag} of it"
        assert visible(f"{flag}\n{flag}", one_line=True) == f"{flag}\\n{flag}"
    # other tags after a black flag draw a plain flag with hidden text: escaped; and so are tags not after one
    assert visible("\U0001f3f4\U000e0068\U000e0069\U000e007f") == "\U0001f3f4" + r"\U000e0068\U000e0069\U000e007f"
    assert visible(england[1:]) == r"\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
    assert visible(england[:-1]) == "\U0001f3f4" + r"\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067"
    assert md_escape(smuggled) == r"\\U000e0041\\U000e0042 tag chars"


def test_a_narrow_terminal_still_shows_the_prompts(run_dir):
    """At 50 columns or fewer the prompt column of the top table got 0-1 cells and showed nothing: it keeps 16."""
    from rich.console import Console

    r = build_report(run_dir, top=3)
    for width in (40, 44, 50, 80):
        console = Console(record=True, width=width, color_system=None)
        render_terminal(r, console=console)
        shown = console.export_text()
        for prompt in r.top["prompt"]:
            assert prompt.split()[0] in shown, (width, prompt, shown[:2000])


def test_visible_escapes_variation_selector_runs_but_keeps_a_selected_form():
    """A run of variation selectors after an emoji hides bytes ("variation-selector smuggling": 0xE0100 + byte)
    and drew nothing; one selector choosing a form (❤️, 1️⃣, a CJK ideographic variant) is kept."""
    from audit.text import visible

    hidden = "".join(chr(0xE0100 + b) for b in b"secret")
    assert visible("cat \U0001f60a" + hidden) == "cat \U0001f60a" + "".join(f"\\U{0xE0100 + b:08x}" for b in b"secret")
    for kept in ("\u2764\ufe0f love", "1\ufe0f\u20e3", "\u8fbb\U000e0100 street", "\U0001f3f3\ufe0f\u200d\U0001f308"):
        assert visible(kept) == kept
    assert visible("a\ufe0f\ufe0f\u206ab") == "a\ufe0f\\ufe0f\\u206ab"


def test_date_partition_is_the_one_nearest_the_file_and_a_calendar_date():
    """The first date anywhere in an absolute path was taken: a dated parent folder (a backup, a release, the
    user's working folder) merged every partition under it into one day, and 2026-13-45 passed as a date."""
    from audit.report import partition_date

    cases = {
        "/srv/backup-2025-12-31/logs/2026-11-28/a.parquet": "2026-11-28",
        "/srv/backup-2025-12-31/logs/2026-11-29/b.parquet": "2026-11-29",
        "/data/v2026-11-28.1/2026/11/29/y.parquet": "2026-11-29",  # y/m/d folders nearer than the dated name
        "/data/logs/2026-13-45/z.parquet": None,  # not a calendar date
        "/data/2026-11-01/logs/2026-13-45/z.parquet": "2026-11-01",  # the nearest valid one
        "/work/2025-01-01-project/logs/date=2026-11-27/p.parquet": "2026-11-27",  # hive style
        "/work/logs/date=2026-11-27/export-2026-11-29.parquet": "2026-11-27",  # hive style wins over a name
        "s3://bucket/logs/dt=2026-02-28/part-0.parquet": "2026-02-28",
        "s3://bucket/ds=2025-01-01/logs/date=2026-11-28/p.parquet": "2026-11-28",  # two hive dates: the nearest
        "s3://bucket/logs/dt=2026-02-30/part-0.parquet": None,
        "C:\\logs\\2026\\03\\04\\p.csv": "2026-03-04",
        "/logs/2026/03/04.parquet": None,  # the day must be a folder, as before
        "/logs/prompts-20261128.parquet": None,
        "/logs/12026-11-28/p.parquet": None,  # digits around a date: not one
        "/logs/p.parquet": None,
    }
    assert {path: partition_date(path) for path in cases} == cases


def test_by_a_kept_column_named_like_a_breakdown_figure(run_dir, tmp_path):
    """`run --keep-columns rows` was accepted and `report --by rows` then refused the column (a breakdown's own
    figure is called rows): it is broken down now, its label marked as the column."""
    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    table = pq.read_table(d / "risk.parquet")
    n = table.num_rows
    table = table.append_column("rows", pa.array(["a" if i < 5 else "b" for i in range(n)]))
    table = table.append_column("mean_risk", pa.array(["x"] * n))
    pq.write_table(table, d / "risk.parquet")
    r = build_report(d, by=["rows", "mean_risk"])
    (_, key1, f1), (_, key2, f2) = r.breakdowns[-2:]
    assert (key1, key2) == ("rows (column)", "mean_risk (column)")
    assert dict(zip(f1[key1], f1["rows"])) == {"a": 5, "b": n - 5}
    assert f2["rows"].to_list() == [n] and f2["mean_risk"][0] == pytest.approx(table["risk"].to_numpy().mean())
    assert "| rows (column) | rows |" in render_markdown(r) and 'id="by-rows-column"' in render_html(r)
    for col in ("risk", "rank", "risk_percentile", "flagged"):  # memaudit's own scores stay refused
        with pytest.raises(Exception, match=f"--by {col}: not a column to group by"):
            build_report(d, by=[col])


def test_a_long_prompt_id_is_cut_as_prompts_are(run_dir, tmp_path):
    """An --id-column id of 50,000 characters filled 1,311 terminal lines and 52 KB of report.md."""
    import io

    from rich.console import Console

    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    t = pq.read_table(d / "risk.parquet")
    ids = ["x" * 50_000 if i == 0 else f"id{i}" for i in range(t.num_rows)]
    pq.write_table(t.set_column(t.schema.get_field_index("prompt_id"), "prompt_id", pa.array(ids)), d / "risk.parquet")
    r = build_report(d, top=20)
    assert "x" * 50_000 in r.top["prompt_id"].to_list()
    md, page = render_markdown(r), render_html(r)
    assert "x" * 300 + " … (+49,700 chars)" in md and "x" * 301 not in md
    assert "x" * 2000 + " … (+48,000 chars)" in page and "x" * 2001 not in page
    buf = io.StringIO()
    render_terminal(r, Console(file=buf, width=120))
    assert "(+49,700 chars)" in buf.getvalue() and len(buf.getvalue()) < 40_000


def test_a_reader_that_closes_stdout_ends_the_command_with_141_and_no_message(run_dir, tmp_path):
    """`memaudit report RUN | head` exited 1 (documented as "anything unexpected") with no word: the reader
    going away now ends report, diff and the plain-text commands as SIGPIPE ends other tools, 141, silently."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="120")
    for args in (["report", str(run_dir), "--top", "10"], ["diff", str(run_dir), str(run_dir)],
                 ["diff", str(run_dir), str(run_dir), "--format", "md"], ["layers"], ["--help"], ["run", "--help"]):
        proc = subprocess.Popen([sys.executable, "-m", "audit.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=tmp_path)
        proc.stdout.close()  # no reader left: the first write fails with EPIPE
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 141, (args, err)
        assert err.strip() == "" or (err.startswith(f"memaudit: no --model given: using the bundled lab model "
                                                    f"({_lab_dir()}), a demonstration model")
                                     and len(err.strip().splitlines()) == 1), (args, err)


def _lab_dir():
    from audit.lab import LAB_MODEL_DIR

    return LAB_MODEL_DIR


def test_a_column_name_holding_a_comma_is_given_in_double_quotes(tiny_model_dir, tmp_path):
    """`--keep-columns` and `--by` split on commas, so a column named `city, state` could not be given at all: a
    value is now read as one CSV record, so the name is given in double quotes; an unclosed quote exits 2."""
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.cli.common import _split

    assert _split(['id, "city, state"', 'x,,"say ""hi"""', ' y '], "--by") == ("id", "city, state", "x", 'say "hi"', "y")
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog", "an old house"], "id": ["i0", "i1", "i2"],
                             "city, state": ["Austin, TX", "Austin, TX", "Reno, NV"]}), src)
    runner = CliRunner()
    r = runner.invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"),
                            "--keep-columns", 'id,"city, state"', "--no-progress", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    risk = pl.read_parquet(tmp_path / "r" / "risk.parquet").sort("row")
    assert risk["city, state"].to_list() == ["Austin, TX", "Austin, TX", "Reno, NV"]
    assert risk["id"].to_list() == ["i0", "i1", "i2"]
    rep = build_report(tmp_path / "r", by=_split(['"city, state"'], "--by"))
    _, key, frame = rep.breakdowns[-1]
    assert key == "city, state" and dict(zip(frame[key], frame["rows"])) == {"Austin, TX": 2, "Reno, NV": 1}
    r = runner.invoke(app, ["report", str(tmp_path / "r"), "--by", '"city, state'])
    assert r.exit_code == 2 and "--by \"city, state: unexpected end of data" in r.output
    # a config file's string value is read the same way (it split on every comma: 'city' and 'state')
    from audit.config import ConfigError, load_config_file

    cfg = tmp_path / "c.toml"
    cfg.write_text('inputs = ["in.parquet"]\nkeep_columns = \'id, "city, state"\'\nlayers = "a,,b"\n')
    assert load_config_file(cfg)["keep_columns"] == ("id", "city, state")
    assert load_config_file(cfg)["layers"] == ("a", "b")
    cfg.write_text('keep_columns = \'"city, state\'\n')
    with pytest.raises(ConfigError, match="'keep_columns' '\"city, state': unexpected end of data"):
        load_config_file(cfg)


def test_an_input_file_with_no_rows_is_shown_with_zero_rows(tiny_model_dir, tmp_path):
    """An empty day of logs (a 0-row file) appeared in neither the source nor the date breakdown: for a prompt-log
    audit, the day with no logs is what an operator needs to see."""
    for day, prompts in (("2026-12-02", ["a red cat", "a blue dog"]), ("2026-12-03", [])):
        d = tmp_path / "logs" / f"date={day}"
        d.mkdir(parents=True)
        pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), d / "part-0.parquet")
    execute(RunConfig(inputs=(str(tmp_path / "logs"),), model=str(tiny_model_dir), out=str(tmp_path / "run"),
                      device="cpu", batch_size=4), progress=False, log=lambda m: None)
    r = build_report(tmp_path / "run")
    frames = {title: frame for title, _, frame in r.breakdowns}
    by_source = dict(zip(frames["By source file"]["source"], frames["By source file"]["rows"]))
    assert by_source == {str(tmp_path / "logs/date=2026-12-02/part-0.parquet"): 2,
                         str(tmp_path / "logs/date=2026-12-03/part-0.parquet"): 0}
    by_date = frames["By date partition"]
    assert dict(zip(by_date["date"], by_date["rows"])) == {"2026-12-02": 2, "2026-12-03": 0}
    assert "| 2026-12-03 | 0 |" in render_markdown(r)


def test_a_trigger_token_with_a_null_mass_is_shown_as_a_dash(run_dir, tmp_path):
    """The schema lets a trigger token's mass be null; every report format failed on one with a TypeError (exit 1)."""
    from typer.testing import CliRunner

    from audit.cli import app

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    table = pq.read_table(run / "risk.parquet")
    df = pl.from_arrow(table).sort("rank")
    triggers = df["trigger_tokens"].to_list()
    triggers[0] = [{"token": "zebra", "position": 1, "mass": None, "start": 0, "end": 1}]
    df = df.with_columns(pl.Series("trigger_tokens", triggers, dtype=df.schema["trigger_tokens"]))
    pq.write_table(df.to_arrow().cast(table.schema), run / "risk.parquet")
    for fmt in ("terminal", "md", "html"):
        res = CliRunner().invoke(app, ["report", str(run), "-f", fmt, "--top", "3",
                                       *(["-o", str(tmp_path / f"r.{fmt}")] if fmt != "terminal" else [])])
        assert res.exit_code == 0, (fmt, res.output)
    assert "<bdi>zebra</bdi> (-)" in (tmp_path / "r.md").read_text()


def test_written_paths_are_escaped_on_a_terminal_and_kept_in_a_pipe(monkeypatch):
    """run, report and calibrate printed the path they wrote raw on stdout: an --out holding an OSC title sequence
    reached the terminal, while every stderr line escaped it. On a terminal it is escaped now; in a pipe (a script
    reading the folder back) it is kept as given."""
    import io

    from audit.cli.common import echo_path

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, expected in ((Terminal(), "run\\x1b]0;PWNED\\x07x\n"), (io.StringIO(), "run\x1b]0;PWNED\x07x\n")):
        monkeypatch.setattr("sys.stdout", stream)
        echo_path("run\x1b]0;PWNED\x07x")
        assert stream.getvalue() == expected


def test_check_manifest_refuses_counts_that_do_not_reconcile(run_dir):
    """The run's manifest passes; one whose rows read are not scored + rejected, or whose rejected count is not the
    sum of its reasons, is a SchemaError naming the counts (no test reached these checks: finished runs always
    reconcile)."""
    import json

    from audit.errors import SchemaError
    from audit.tables import check_manifest

    manifest = json.loads((run_dir / "manifest.json").read_text())
    check_manifest(manifest)
    c = manifest["counts"]
    read, scored, rejected = c["rows_read"], c["scored"], c["rejected"]
    lost = json.loads(json.dumps(manifest))
    lost["counts"]["rows_read"] = read + 1
    with pytest.raises(SchemaError, match=f"read {read + 1} != scored {scored} \\+ rejected {rejected}"):
        check_manifest(lost)
    uncounted = json.loads(json.dumps(manifest))
    uncounted["counts"]["rejected_by_reason"] = dict(c["rejected_by_reason"], prompt_too_long=7)
    uncounted["counts"]["rejected"] = rejected  # the by-reason sum is now 7 more than rejected
    with pytest.raises(SchemaError, match="rejected != sum of rejected_by_reason"):
        check_manifest(uncounted)


def test_breakdown_keeps_groups_with_only_rejects_and_counts_zero_rejects(tmp_path, tiny_model_dir):
    """--by user: a user whose rows were all rejected still has a row (0 scored, 1 rejected), and users without
    rejects count 0 rejected, not null (the rejects are joined to the scored groups in full)."""
    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog", "old city street", ""],
                             "user": ["a", "a", "b", "c"]}), src)
    execute(RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(tmp_path / "r"), device="cpu",
                      keep_columns=("user",)), progress=False, log=lambda m: None)
    frame = dict((t, f) for t, _, f in build_report(tmp_path / "r", by=["user"]).breakdowns)["By user"]
    frame = frame.sort("user")
    assert frame["user"].to_list() == ["a", "b", "c"]
    assert frame["rows"].to_list() == [2, 1, 0] and frame["unique"].to_list() == [2, 1, 0]
    assert frame["rejected"].to_list() == [0, 0, 1]


def test_top_table_counts_rows_even_when_they_share_an_id(tmp_path, tiny_model_dir):
    """A prompt on two rows that share their --id-column id (a log that wrote one event twice) holds 2 rows of
    risk.parquet: the top table says 2, as the breakdowns and the histogram count rows."""
    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a red cat", "a red cat", "a blue dog"], "id": ["x", "x", "y"]}), src)
    _, manifest = execute(RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(tmp_path / "r"),
                                    device="cpu", id_column="id"), progress=False, log=lambda m: None)
    assert manifest["counts"]["duplicate_ids"] == 2  # scored rows whose id another scored row has
    top = build_report(tmp_path / "r").top
    assert dict(zip(top["prompt"], top["rows"])) == {"a red cat": 2, "a blue dog": 1}


def test_breakdown_groups_with_equal_max_risk_are_in_key_order(tmp_path, tiny_model_dir):
    """Users u0 and u1 hold the same two prompts, so the same max risk: u0 comes before u1 whatever the order of
    their rows in the input (the key, ascending, breaks the tie after max_risk, descending)."""
    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog", "a red cat", "a blue dog", "old city street"],
                             "user": ["u1", "u1", "u0", "u0", "u2"]}), src)
    execute(RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(tmp_path / "r"), device="cpu",
                      keep_columns=("user",)), progress=False, log=lambda m: None)
    frame = dict((t, f) for t, _, f in build_report(tmp_path / "r", by=["user"]).breakdowns)["By user"]
    risk = dict(zip(frame["user"], frame["max_risk"]))
    assert risk["u0"] == risk["u1"] != risk["u2"]
    assert frame["max_risk"].to_list() == sorted(frame["max_risk"].to_list(), reverse=True)
    users = frame["user"].to_list()
    assert users.index("u0") + 1 == users.index("u1")


def test_terminal_header_is_model_then_scoring_then_layers_and_fits_80_columns(run_dir):
    """The header had one line of model, scorer, layers, noise draws and seed that wrapped mid-phrase at 80 columns;
    now three lines, each whole at 80 columns (the tiny model's names are short). Markdown keeps them as one line,
    and a report of one top prompt says "Top 1 prompt"."""
    from rich.console import Console

    manifest = json.loads((run_dir / "manifest.json").read_text())
    fp = manifest["model"]["fingerprint"]
    layers = ", ".join(manifest["score_config"]["layers"])
    console = Console(record=True, width=80, color_system=None)
    r = build_report(run_dir, top=1)
    render_terminal(r, console=console)
    shown = console.export_text()
    lines = shown.splitlines()
    assert manifest["model"]["family"] == "sd1"  # the adapter that ran it, recorded since 2026-12-07
    assert lines[1:4] == [f"model {manifest['model']['name']} [{fp}]",
                          "family sd1, scorer attention_entropy, noise draws 1 (mt19937), seed 0", f"layers {layers}"]
    # (no styles on this console, as under TERM=dumb or in a log file: no highlight, so the title does not claim one)
    assert "Top 1 prompt (trigger tokens listed with each prompt)" in shown and "highlighted" not in shown
    styled = Console(record=True, width=80, color_system="standard")
    render_terminal(r, console=styled)
    assert "Top 1 prompt (trigger tokens highlighted)" in styled.export_text()
    md = render_markdown(r)
    assert md_escape(f"model {manifest['model']['name']} [{fp}], family sd1, scorer attention_entropy, noise draws 1 (mt19937), "
                     f"seed 0, layers {layers}") in md
    assert "## Top 1 prompt\n" in md
    assert "<h2>Top 1 prompt</h2>" in render_html(r)
    assert "<h2>Top 3 prompts</h2>" in render_html(build_report(run_dir, top=3))


def test_histogram_edges_print_distinct_when_risks_are_packed(run_dir, tmp_path):
    """Risks within 7e-5 of each other (a random-weight model gave 4.3430..4.3437) over 30 bins: 5 or 6 significant
    digits print neighbouring edges alike ("4.343 -> 4.343" on several rows); the edges get the fewest digits that
    tell them apart, in the terminal and in Markdown, and keep 5 and 6 where those suffice."""
    import io

    from rich.console import Console

    from audit.report import edge_format

    table = pq.read_table(run_dir / "risk.parquet")
    prompts = table["prompt"].to_pylist()
    threshold = json.loads((run_dir.parent / "cal.json").read_text())["threshold"]
    # packed around the run's flag threshold, so the histogram's range is the risks' own
    packed = _with_risks(run_dir, tmp_path / "packed",
                         {p: threshold - 3e-5 + 7e-5 * i / (len(prompts) - 1) for i, p in enumerate(prompts)})
    r = build_report(packed, bins=30)
    edges = sorted(set(r.hist["lo"].to_list()) | set(r.hist["hi"].to_list()))
    assert len(edges) == 31 and len({f"{e:.6g}" for e in edges}) < 31  # the old labels collide

    def distinct(d):
        return len({f"{e:.{d}g}" for e in edges}) == 31

    fmt = edge_format(r.hist, 5)
    digits = int(fmt[1:-1])
    assert fmt == edge_format(r.hist, 6) and digits > 6 and distinct(digits) and not distinct(digits - 1)
    wide = pl.DataFrame({"lo": [0.0, 1.0], "hi": [1.0, 2.0]})
    assert edge_format(wide, 5) == ".5g" and edge_format(wide, 6) == ".6g"
    console = Console(file=io.StringIO(), width=120, color_system=None)
    render_terminal(r, console=console)
    text = console.file.getvalue()
    section = text[text.index("Risk distribution"):].split("└", 1)[0]  # the table's rows
    rows = [line.split("│")[1:4] for line in section.splitlines() if line.count("│") >= 5]
    ranges = [(lo.strip(), hi.strip()) for lo, hi, n in rows if n.strip().isdigit() and "." in lo]
    assert len(ranges) == 30 and len(set(ranges)) == 30 and all(lo != hi for lo, hi in ranges)
    assert ranges[0][0] == f"{edges[0]:{fmt}}" and ranges[-1][1] == f"{edges[-1]:{fmt}}"
    block = render_markdown(r).split("```text\n", 1)[1].split("```", 1)[0].splitlines()[1:]
    md_ranges = [tuple(line.split()[:2]) for line in block if not line.startswith("-")]
    assert len(md_ranges) == 30 and len(set(md_ranges)) == 30
    assert md_ranges[0][0] == f"{edges[0]:{fmt}}" and md_ranges[-1][1] == f"{edges[-1]:{fmt}}"


def test_top_and_bins_from_python_are_whole_numbers_of_at_least_one(run_dir):
    """`diff_runs(..., top=-1)` and `build_report(..., top=-1)` listed one prompt short of all (polars' head(-1)
    keeps all rows but the last): a count under 1, a bool or a float is refused, as the CLI refuses it."""
    from audit.diff import diff_runs
    from audit.errors import ReportError
    from audit.report import build_report

    whole = build_report(run_dir, top=1000)
    assert whole.top.height == whole.counts["unique_prompts"] == 10
    assert build_report(run_dir, top=1).top.height == 1
    same = diff_runs(run_dir, run_dir, top=1)
    assert (same.rank_rises.height, same.summary["in_both"]) == (0, 10)
    for bad in (-1, 0, True, 2.0):
        with pytest.raises(ReportError, match=f"top={bad!r}: give a whole number of at least 1"):
            diff_runs(run_dir, run_dir, top=bad)
        with pytest.raises(ReportError, match=f"top={bad!r}: give a whole number of at least 1"):
            build_report(run_dir, top=bad)
    with pytest.raises(ReportError, match="bins=0: give a whole number of at least 1"):
        build_report(run_dir, bins=0)


def test_percentile_and_flag_columns_only_for_a_calibrated_run_in_every_format(run_dir, day2_run):
    """Without a calibration the top table's percentile and flagged cells are `-` on every row: the terminal left
    them out, report.md and report.html showed them (a red `-` in each flagged cell). All three now agree."""
    from audit.report import build_report, render_html, render_markdown

    cal, plain = build_report(run_dir, top=3), build_report(day2_run, top=3)
    assert cal.calibrated and not plain.calibrated
    md_head = [ln for ln in render_markdown(cal).splitlines() if ln.startswith("| rank |")]
    assert md_head == ["| rank | risk | percentile | flagged | prompt | trigger tokens | rows | prompt\\_id |"]
    md_head = [ln for ln in render_markdown(plain).splitlines() if ln.startswith("| rank |")]
    assert md_head == ["| rank | risk | prompt | trigger tokens | rows | prompt\\_id |"]
    heads = re.findall(r'<table id="top"><thead><tr>(.*?)</tr>', render_html(plain))
    assert heads == ["<th>rank</th><th>risk</th><th>prompt</th><th>trigger tokens</th><th>rows</th>"
                     "<th>prompt_<wbr>id</th>"]
    page = render_html(cal)
    top = re.search(r'<table id="top">.*?</table>', page, re.S).group(0)
    first = re.search(r"<tbody><tr>(.*?)</tr>", top, re.S).group(1)
    cells = re.findall(r"<td( class=\"[^\"]*\")?>", first)
    # rank, risk, percentile numeric; the flag cell; the prompt; trigger tokens; rows numeric; prompt_id
    assert cells == [' class="num"', ' class="num"', ' class="num"', ' class="flag"', ' class="prompt"', "",
                     ' class="num"', ' class="id"']


def test_trigger_tokens_that_are_not_words_are_quoted():
    """A comma token was listed as `ring (0.161), , (0.104)`, read as an empty entry: tokens that are not words are
    now quoted as JSON strings."""
    from audit.report import _trigger_list

    triggers = [{"token": t, "mass": m} for t, m in (("amber", .44), (",", .104), ("don't", .1), ("x-ray", .05),
                                                      ("café", .02), ("", .01), (" ", None), ('"', .0))]
    assert _trigger_list(triggers) == ('amber (0.440), "," (0.104), don\'t (0.100), x-ray (0.050), café (0.020), '
                                       '"" (0.010), " " (-), "\\"" (0.000)')


def test_a_path_name_over_255_bytes_is_a_usage_error_naming_it(tmp_path, run_dir):
    """A name the file system refuses (ENAMETOOLONG) in --output, -o, --config, --calibration or --model: exit 2 and
    one line naming the path and why. Each was an internal error, exit 1, "OSError: [Errno 36] File name too long"."""
    from typer.testing import CliRunner

    from audit.cli import app

    long = tmp_path / ("a" * 300)
    clipped = str(long)[:120] + "..."
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt\na cat\n")
    for args in (["report", str(run_dir), "--output", f"{long}.html"],
                 ["calibrate", str(run_dir), "-o", f"{long}.json"],
                 ["run", str(prompts), "--out", str(tmp_path / "o"), "--config", f"{long}.toml"],
                 ["run", str(prompts), "--out", str(tmp_path / "o"), "--calibration", f"{long}.json", "--dry-run"],
                 ["run", str(prompts), "--out", str(tmp_path / "o"), "--model", str(long), "--dry-run"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert res.output.strip().splitlines()[-1] == (
            f"memaudit: error: {clipped}: a name in this path is longer than the file system takes (255 bytes on "
            "most)"), (args, res.output)
    assert not (tmp_path / "o").exists()
