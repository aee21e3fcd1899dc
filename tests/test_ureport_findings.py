"""What a safety team reading report.html (on screen, printed, with a screen reader, forwarded by email) found: each
test renders a run folder written by hand with known risks (``make_run``; no model is loaded), some in headless
Chromium."""

from __future__ import annotations

import json
from pathlib import Path
import re
import subprocess

import pytest

from audit.report import build_report, render_html
from test_report_mutants import make_run


def _probe(browser: str, page: str, script: str, tmp_path: Path, width: int = 720, print_media: bool = False) -> str:
    """Load ``page`` in headless Chromium at ``width`` pixels with ``script`` appended (the page's
    Content-Security-Policy removed: it forbids scripts); ``script`` sets document.title, which is returned.
    ``print_media``: the page's ``@media print`` rules apply as if printing (Chromium's command line cannot emulate
    print media; ``--print-to-pdf`` gives a PDF that nothing here can measure)."""
    probe = page.replace(re.search(r'<meta http-equiv="Content-Security-Policy"[^>]*>', page).group(0), "")
    if print_media:
        probe = probe.replace("@media print{", "@media all{")
    probe = probe.replace("</body>", f"<script>{script}</script></body>")
    (tmp_path / "probe.html").write_text(probe, encoding="utf-8")
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},1000", "--dump-dom",
                           (tmp_path / "probe.html").as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(.*?)</title>", proc.stdout, re.S)
    assert title, proc.stdout[:2000] + proc.stderr[-2000:]
    return title.group(1)


def with_tokens(run: Path, spans: list[list[tuple[int, int]]]) -> Path:
    """``run`` (a ``make_run`` folder) with trigger tokens at the given character spans of each row's prompt (rows in
    rank order), mass 0.5 each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(run / "risk.parquet")
    prompts = t["prompt"].to_pylist()
    tokens = [[{"token": p[s:e], "position": 1 + k, "mass": 0.5, "start": s, "end": e} for k, (s, e) in enumerate(row)]
              for p, row in zip(prompts, spans)]
    i = t.schema.get_field_index("trigger_tokens")
    pq.write_table(t.set_column(i, t.schema.field(i), pa.array(tokens, t.schema.field(i).type)), run / "risk.parquet")
    return run


# ---------------------------------------------------------------- printing (or saving as PDF to forward)

def test_a_printed_page_shows_each_prompt_whole_with_its_trigger_tokens_marked(tmp_path):
    """Printed (or saved as PDF), a 2,000-character prompt was cut at the 7.5 lines its cell shows on screen (paper
    cannot scroll; nothing said the rest was missing), and the trigger tokens' highlight was gone (browsers print no
    backgrounds unless told to). With the page's print rules applied, in headless Chromium at a sheet's width: no
    prompt cell hides text, the highlight and the header cells keep their colours, and no row or plot is split
    between pages."""
    from helpers import chromium_or_skip

    browser = chromium_or_skip("the print layout test")
    long = " ".join(f"word{i}" for i in range(400))  # about 3,000 characters: cut at the page's 2,000
    run = with_tokens(make_run(tmp_path / "r", [(long, 2.0), ("a cat", 1.0)]), [[(0, 5)], [(2, 5)]])
    page = render_html(build_report(run))
    assert "<mark>word0</mark>" in page and "<mark>cat</mark>" in page
    script = ("const s = [...document.querySelectorAll('td.prompt .scroll')];"
              "const m = getComputedStyle(document.querySelector('mark'));"
              "document.title = JSON.stringify({hidden: s.map(e => e.scrollHeight - e.clientHeight),"
              " heights: s.map(e => e.clientHeight), mark: m.printColorAdjust, markBg: m.backgroundColor,"
              " th: getComputedStyle(document.querySelector('th')).printColorAdjust,"
              " tr: getComputedStyle(document.querySelector('#top tbody tr')).breakInside,"
              " img: getComputedStyle(document.querySelector('#histogram')).breakInside});")
    screen = json.loads(_probe(browser, page, script, tmp_path))
    assert screen["hidden"][0] > 1000 and screen["hidden"][1] == 0  # on screen the long prompt scrolls, as before
    printed = json.loads(_probe(browser, page, script, tmp_path, print_media=True))
    assert printed["hidden"] == [0, 0], printed  # every line of the cell is on paper
    assert printed["heights"][0] > 20 * screen["heights"][0] / 7.5  # the 2,000 characters fill many more lines
    assert printed["mark"] == "exact" and printed["th"] == "exact" and printed["markBg"] == "rgb(255, 213, 79)"
    assert printed["tr"] == "avoid" and printed["img"] == "avoid"


def test_a_long_id_scrolls_in_its_cell_on_screen_and_prints_whole(tmp_path):
    """An --id-column id (or a source path) of 2,000 characters, shown whole up to the page's cut, made its row of
    the top table 70 lines tall on screen (the prompt beside it scrolls past 7.5 lines): the id's cell now scrolls as
    the prompt's does, at the same height, and prints whole."""
    from helpers import chromium_or_skip

    browser = chromium_or_skip("the id layout test")
    run = make_run(tmp_path / "r", [("a cat", 2.0, "in/" + "x" * 2500 + ".parquet"), ("a dog", 1.0)])
    page = render_html(build_report(run))
    cut = "in/" + "x" * 1997 + " … (+" + f"{2500 + 13 - 2000:,}" + " chars)"
    region = '<div class="scroll" dir="auto" tabindex="0" role="region" aria-label="prompt_id ranked {}">'
    assert f'<td class="id">{region.format(1)}{cut}</div></td>' in page
    assert f'<td class="id">{region.format(2)}in/a.parquet#1</div></td>' in page
    script = ("const s = [...document.querySelectorAll('#top td.id .scroll')];"
              "const p = document.querySelector('#top td.prompt .scroll');"
              "document.title = JSON.stringify({hidden: s.map(e => e.scrollHeight - e.clientHeight),"
              " heights: s.map(e => e.clientHeight), line: p.clientHeight,"
              " row: document.querySelector('#top tbody tr').getBoundingClientRect().height});")
    screen = json.loads(_probe(browser, page, script, tmp_path, width=1000))
    assert screen["hidden"][0] > 300 and screen["hidden"][1] == 0, screen
    assert screen["heights"][0] <= 7.5 * screen["line"] + 1 and screen["row"] < 10 * screen["line"], screen
    printed = json.loads(_probe(browser, page, script, tmp_path, print_media=True))
    assert printed["hidden"] == [0, 0] and printed["heights"][0] > 20 * screen["line"], printed


# ---------------------------------------------------------------- a screen reader, or a reader who needs the figures

def _table(page: str, table_id: str) -> tuple[list[str], list[list[str]]]:
    """The header cells and the body rows (each a list of cell texts) of the page's table ``table_id``."""
    body = re.search(rf'<table id="{table_id}">(.*?)</table>', page, re.S).group(1)
    header = re.findall(r"<th>(.*?)</th>", body.split("</thead>")[0])
    rows = [re.findall(r"<td[^>]*>(.*?)</td>", tr) for tr in re.findall(r"<tr>(.*?)</tr>", body.split("</thead>")[1])]
    return header, rows


def test_the_histogram_has_its_figures_in_a_table_under_the_plot(tmp_path):
    """The risk distribution was only a PNG whose alt text said "risk histogram: rows per risk bin": a screen reader
    (or a reviewer needing the exact counts) got no figure of it from report.html. Its bins are now a table folded
    under the plot (<details>, no script), edges printed as report.md prints them, the flagged rows per bin in a
    calibrated run; a run that scored nothing has no bins, and the plot's alt text says so."""
    run = make_run(tmp_path / "r", [("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0)], threshold=2.5, fpr=0.1)
    page = render_html(build_report(run, bins=3))
    assert '<img id="histogram" alt="risk histogram: rows per risk bin"' in page
    assert "<summary>The histogram's figures as a table</summary>" in page
    assert _table(page, "histogram-bins") == (["risk from", "to", "rows", "flagged"],
                                              [["1", "2", "1", "0"], ["2", "3", "1", "0"], ["3", "4", "2", "2"]])
    assert page.index('id="histogram"') < page.index('id="histogram-bins"') < page.index('id="top"')
    # uncalibrated: no flagged column; thousands separated as in the counts table
    run = make_run(tmp_path / "u", [(f"p{i}", 1.0 + (i % 2)) for i in range(2500)])
    assert _table(render_html(build_report(run, bins=2)), "histogram-bins") == (
        ["risk from", "to", "rows"], [["1", "1.5", "1,250"], ["1.5", "2", "1,250"]])
    # nothing scored: no table, and no plot of bins that are not there: one line says so (test_ufollow_findings)
    empty = render_html(build_report(make_run(tmp_path / "e", [], rejects=[("in/a.parquet", "empty_prompt")])))
    assert '<p class="meta" id="histogram">no scored rows</p>' in empty and 'id="histogram-bins"' not in empty
    assert "<details" not in empty


def test_the_counts_table_has_no_empty_header_cell(tmp_path):
    """The counts table's first column header was empty (<th></th>): a screen reader announced a blank header for
    every row's label ("rows read", "scored", ...)."""
    page = render_html(build_report(make_run(tmp_path / "r", [("a", 1.0)], rejects=[("in/a.parquet", "null_prompt")])))
    header, rows = _table(page, "counts")
    assert header == ["count", "value"] and "<th></th>" not in page
    assert rows[:2] == [["rows read", "2"], ["scored", "1"]]


# ---------------------------------------------------------------- a run over many days

def test_the_date_plot_labels_do_not_overlap_with_many_dates():
    """A run over 50 date partitions or more (a breakdown shows 50) drew 50 date labels at 45 degrees in the plot's
    8 inches: they overlapped into an unreadable band. Every date keeps its bar and tick; with more than 25 dates
    every k-th is labelled (k = ceil(n / 25), from the first), and no two labels drawn overlap."""
    import datetime as dt
    import math

    import polars as pl

    from audit.report import dates_figure

    def days(n, step=1):
        return [(dt.date(2026, 1, 1) + dt.timedelta(days=i)).isoformat() for i in range(0, n, step)]

    def frame(n):
        return pl.DataFrame({"date": days(n), "rows": [10] * n, "flagged": [1] * n, "mean_risk": [1.0] * n,
                             "max_risk": [2.0] * n})

    for n, labelled in ((50, days(50, 2)), (26, days(26, 2)), (25, days(25)), (3, days(3))):
        fig = dates_figure(frame(n), calibrated=True)
        ax = fig.axes[0]
        assert len(ax.get_xticks()) == n and len(ax.patches) == n  # every date keeps its bar and tick
        texts = [t for t in ax.get_xticklabels() if t.get_text()]
        assert [t.get_text() for t in texts] == labelled, n
        # the labels are parallel lines of text at 45 degrees: two neighbours do not overlap where the distance
        # between their lines, (gap along the axis) x sin 45, is at least the text's height
        x = [ax.transData.transform((float(t.get_position()[0]), 0))[0] for t in texts]
        height = texts[0].get_fontsize() * fig.dpi / 72
        assert min(b - a for a, b in zip(x, x[1:])) * math.sin(math.radians(45)) >= height, n


# ---------------------------------------------------------------- report.json of a breakdown with many groups

def test_report_json_is_written_group_by_group(tmp_path):
    """`report --format json --by COLUMN` over a column of 900,000 values (1,000,000 rows) held every group as a
    Python dict, then the whole 248 MB text, then its bytes: 2.3 GB at its peak. The text is now written in pieces,
    each group encoded as it is written; it is the same text as before, json.dumps(doc, indent=1) and a line end.
    Measured with tracemalloc (Python's allocations; polars' frames are not counted): writing 60,000 groups peaks
    below a tenth of the file's size."""
    import tracemalloc

    from audit.report import emit_report, iter_json, render_json

    n = 60_000
    run = make_run(tmp_path / "r", [(f"prompt number {i}", 1.0 + i / n, f"in/d{i % 3}.parquet") for i in range(n)],
                   rejects=[("in/d9.parquet", "empty_prompt")], threshold=1.5)
    r = build_report(run, by=["prompt"], all_groups=True)
    text = render_json(r)
    doc = json.loads(text)
    assert text == json.dumps(doc, ensure_ascii=False, indent=1, allow_nan=False) + "\n"
    assert [b["key"] for b in doc["breakdowns"]] == ["source", "prompt"]
    # every prompt a group, and the rejected row's null prompt one more
    assert [len(b["groups"]) for b in doc["breakdowns"]] == [4, n + 1]
    assert doc["breakdowns"][1]["groups_left_out"] == 0
    assert doc["breakdowns"][0]["groups"][3] == {"group": "in/d9.parquet", "rows": 0, "unique": 0, "mean_risk": None,
                                                 "p95_risk": None, "max_risk": None, "flagged": 0, "rejected": 1}
    assert max(len(piece) for piece in iter_json(r)) < 20_000  # no piece holds the groups
    tracemalloc.start()
    try:
        path = emit_report(r, "json", tmp_path / "report.json")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = path.stat().st_size
    assert path.read_text(encoding="utf-8") == text and size > 10_000_000
    assert peak < size / 10, (peak, size)


def test_report_json_with_no_breakdown_or_an_empty_one_is_the_same_text(tmp_path):
    """The pieces give json.dumps's text at the edges: no breakdown at all, a breakdown with no group, and text
    holding line breaks, quotes and right-to-left marks (escaped inside JSON strings, never a raw line break)."""
    from audit.report import render_json

    run = make_run(tmp_path / "r", [("a\nb \"q\" \u202eevil", 1.0, "in/x\ny.parquet")], threshold=0.5)
    r = build_report(run, by=["prompt"], all_groups=True)
    for breakdowns in (r.breakdowns, [], [(t, k, f.head(0)) for t, k, f in r.breakdowns]):
        r.breakdowns = breakdowns
        text = render_json(r)
        assert text == json.dumps(json.loads(text), ensure_ascii=False, indent=1, allow_nan=False) + "\n"
    assert json.loads(text)["breakdowns"][0]["groups"] == []
    # the command line, to a file and to standard output (`-o -`, written in pieces too): the same text
    from typer.testing import CliRunner

    from audit.cli import app

    res = CliRunner().invoke(app, ["report", str(run), "-f", "json", "--by", "prompt", "-o", "-"])
    assert res.exit_code == 0, res.output
    r = build_report(run, by=["prompt"], all_groups=True)
    assert res.stdout == render_json(r)
    res = CliRunner().invoke(app, ["report", str(run), "--by", "prompt", "-o", str(tmp_path / "r.json")])
    assert res.exit_code == 0 and (tmp_path / "r.json").read_text(encoding="utf-8") == render_json(r)


# ---------------------------------------------------------------- the same run, the same report

def test_a_breakdowns_mean_risk_does_not_depend_on_the_order_it_reads_the_rows_in(tmp_path):
    """report.json of one run of 1,000,000 rows rendered three times gave three files (docs/audits.md: the same file
    each time): a breakdown's mean_risk changed in its last bits, 1.0598249627808045 then 1.0598249627808043, as
    polars' mean() added the chunks of risk.parquet's row groups in the order its threads delivered them. The mean
    is now taken over the group's risks in ascending order, so the order in which rows arrive cannot move it: the
    same 2,500 rows ranked, shuffled (these risks: a mean that moved by one bit) and in 50 row groups give one
    report.json, its mean within 1e-12 of numpy's."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audit.report import render_json

    risks = np.random.default_rng(5).random(2500) * 3
    run = make_run(tmp_path / "r", [(f"p{i}", float(x)) for i, x in enumerate(risks)])
    texts = {render_json(build_report(run, all_groups=True))}
    t = pq.read_table(run / "risk.parquet")
    for order, row_groups in ((np.random.default_rng(5).permutation(t.num_rows), None), (np.arange(t.num_rows), 50)):
        pq.write_table(t.take(pa.array(order)), run / "risk.parquet", row_group_size=row_groups)
        texts.add(render_json(build_report(run, all_groups=True)))
    assert len(texts) == 1
    (group,) = json.loads(texts.pop())["breakdowns"][0]["groups"]
    assert group["group"] == "in/a.parquet" and group["rows"] == 2500
    assert abs(group["mean_risk"] - float(np.mean(risks))) < 1e-12


# ---------------------------------------------------------------- text a reviewer cannot see

def test_characters_drawn_as_nothing_or_a_blank_are_shown_as_escapes(tmp_path):
    """A prompt with a soft hyphen inside a word ("mic\\u00adkey") was shown as "mickey", one with a Hangul filler
    ("a\\u3164cat") as "a cat": two prompts that differ, scored differently, looked the same in the top table. These
    characters, drawn as nothing or as a blank (Unicode's default-ignorables that running text has no use for, and
    the braille blank), are now shown as escapes in every format, as zero-width spaces were; a zero-width joiner
    inside an emoji sequence is kept."""
    from rich.console import Console

    from audit.report import render_markdown, render_terminal
    from audit.text import visible

    for raw, shown in (("mic\u00adkey", "mic\\xadkey"), ("a\u3164cat", "a\\u3164cat"), ("a\uffa0cat", "a\\uffa0cat"),
                       ("a\u2800cat", "a\\u2800cat"), ("a\u034fb", "a\\u034fb"), ("a\u180eb", "a\\u180eb"),
                       ("a\u115f\u1160b", "a\\u115f\\u1160b"), ("a\u17b4b", "a\\u17b4b"),
                       ("a\U0001bca0b", "a\\U0001bca0b"), ("a\U0001d173b", "a\\U0001d173b"),
                       ("👩\u200d👩\u200d👧 ok", "👩\u200d👩\u200d👧 ok"), ("한국어 é", "한국어 é")):
        assert visible(raw) == shown, raw
    run = make_run(tmp_path / "r", [("mickey mouse", 2.0), ("mic\u00adkey mouse", 1.5), ("a cat", 1.2),
                                    ("a\u3164cat", 1.0)])
    r = build_report(run)
    page = render_html(r)
    assert ">mic\\xadkey mouse</div>" in page and ">mickey mouse</div>" in page
    assert ">a\\u3164cat</div>" in page and "\u3164" not in page and "\u00ad" not in page
    md = render_markdown(r)
    assert "mic\\\\xadkey mouse" in md and "a\\\\u3164cat" in md  # Markdown escapes the backslash
    console = Console(record=True, width=200, color_system=None)
    render_terminal(r, console)
    text = console.export_text()
    assert "mic\\xadkey mouse" in text and "a\\u3164cat" in text and "\u00ad" not in text


# ---------------------------------------------------------------- plots on paper

def test_plots_are_drawn_at_twice_the_pixels_they_are_shown_at(tmp_path):
    """The plots were PNGs of 100 pixels an inch shown pixel for pixel: printed on an A4 sheet (about 115 dots an
    inch) or on a high-density screen their text and lines were soft. They are now drawn at 200 pixels an inch and
    shown at the same size as before (width and height given in the page, half their pixels), so a sheet gets twice
    the detail in each direction; in headless Chromium the plot takes those CSS pixels."""
    import base64
    import io

    from PIL import Image

    from audit.report import shown_size
    from helpers import chromium_or_skip

    run = make_run(tmp_path / "r", [(f"p{i}", 1.0 + i / 10, f"logs/date=2026-12-0{1 + i % 3}/a.parquet")
                                    for i in range(30)], threshold=3.0)
    page = render_html(build_report(run))
    sizes = {}
    for m in re.finditer(r'<img id="([^"]+)" alt="[^"]*" src="(data:image/png;base64,[^"]+)" width="(\d+)" '
                         r'height="(\d+)">', page):
        png = Image.open(io.BytesIO(base64.b64decode(m.group(2).split(",", 1)[1])))
        assert png.info["dpi"][0] == pytest.approx(200, abs=1)
        assert abs(png.width - 2 * int(m.group(3))) <= 1 and abs(png.height - 2 * int(m.group(4))) <= 1
        assert 1300 < png.width < 1800 and shown_size(m.group(2)) == (int(m.group(3)), int(m.group(4)))
        sizes[m.group(1)] = (int(m.group(3)), int(m.group(4)))
    assert list(sizes) == ["histogram", "dates"]  # both plots carry their size
    assert shown_size("data:image/png;base64,") is None and shown_size("data:image/svg+xml;base64,PHN2Zz4=") is None
    browser = chromium_or_skip("the plot size test")
    shown = json.loads(_probe(browser, page, "const i = document.querySelector('#histogram');"
                              "document.title = JSON.stringify([i.width, i.height]);", tmp_path, width=1200))
    assert shown == list(sizes["histogram"])
