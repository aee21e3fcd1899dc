"""Findings of a safety analyst who reads memaudit's outputs (the report's page, Markdown and terminal views, the
diff) and recomputes their figures from risk.parquet: each test fails on the code before its fix. Run folders are
written by hand with known risks (``make_run``), so no model is loaded."""

from __future__ import annotations

import re

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.report import build_report, histogram_figure, render_html, render_markdown, render_terminal
from test_report_mutants import make_run


def _terminal(r, width: int = 120) -> str:
    from rich.console import Console

    console = Console(record=True, width=width, color_system=None)
    render_terminal(r, console)
    return console.export_text()


# ---------------------------------------------------------------- histogram: flagged rows per bin

def test_the_histograms_flagged_part_adds_up_to_the_flagged_count(tmp_path):
    """Risks 0..4, threshold 2, 4 bins [0,1) [1,2) [2,3) [3,4]: the bin [2,3) reaches above the threshold but holds
    risk 2, which is not flagged (flagged = risk > 2). The page drew every bin reaching above the threshold in red,
    so its red bars showed 3 rows where the counts table said 2 were flagged. Now each bin counts its flagged rows
    (0, 0, 0, 2), the page stacks them in red on the unflagged ones (blue 1, 1, 1, 0), and the terminal and Markdown
    histograms have a flagged column that adds up to the flagged count."""
    rows = [(f"p{i}", float(i)) for i in range(5)]
    r = build_report(make_run(tmp_path / "r", rows, threshold=2.0), bins=4)
    assert r.counts["flagged"] == 2
    assert r.hist["count"].to_list() == [1, 1, 1, 2] and r.hist["above"].to_list() == [False, False, True, True]
    assert r.hist["flagged"].to_list() == [0, 0, 0, 2] and int(r.hist["flagged"].sum()) == r.counts["flagged"]

    ax = histogram_figure(r).axes[0]
    heights = {}
    for patch in ax.patches:
        rgb = tuple(round(c, 3) for c in patch.get_facecolor()[:3])
        heights.setdefault(rgb, []).append(patch.get_height())
    red = tuple(round(int("c62828"[i:i + 2], 16) / 255, 3) for i in (0, 2, 4))
    blue = tuple(round(int("1e88e5"[i:i + 2], 16) / 255, 3) for i in (0, 2, 4))
    assert heights == {blue: [1, 1, 1, 0], red: [0, 0, 0, 2]}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["flag threshold 2 (FPR 0.1)", "flagged rows (2)"]

    md = render_markdown(r)
    assert "   risk from           to     rows  flagged\n" in md
    assert re.search(r"\n +2 +3 +1 +0 ! █+\n +3 +4 +2 +2 ! █+\n", md)
    text = _terminal(r)
    assert re.search(r"┃ risk from ┃ +to ┃ rows ┃ flagged ┃", text)
    assert re.search(r"│ +2 │ +3 │ +1 │ +0 │ █+ +│", text) and re.search(r"│ +3 │ +4 │ +2 │ +2 │ █+ +│", text)


def test_the_terminal_bar_splits_at_the_bins_flagged_rows():
    """The terminal's bar of a bin is cut in two, its flagged part drawn red: in proportion to the flagged rows, at
    least one cell when one row is flagged, one cell at least left unflagged when one row is not, all of it when
    every row is flagged, none of it when no row is."""
    from audit.report import _split_bar

    full = "█" * 40
    assert _split_bar(10, 3, 10) == ("█" * 28, "█" * 12)
    assert _split_bar(10, 0, 10) == (full, "") and _split_bar(10, 10, 10) == ("", full)
    assert _split_bar(100, 1, 100) == ("█" * 39, "█")  # 0.4 of a cell: one cell still shows the flagged row
    assert _split_bar(100, 99, 100) == ("█", "█" * 39)  # 39.6 cells: one stays for the unflagged row
    assert _split_bar(1, 1, 1000) == ("", "▏") and _split_bar(2, 1, 1000) == ("", "▏")  # a sliver: one cell
    assert _split_bar(0, 0, 10) == ("", "")


def test_an_uncalibrated_histogram_has_no_flagged_column_and_no_red(tmp_path):
    """Without a calibration nothing is flagged: the bins count 0 flagged rows, no flagged column is printed and the
    page draws blue bars only."""
    r = build_report(make_run(tmp_path / "r", [(f"p{i}", float(i)) for i in range(5)]), bins=4)
    assert r.hist["flagged"].to_list() == [0, 0, 0, 0]
    assert "flagged\n" not in render_markdown(r).split("```text")[1]
    assert "flagged ┃" not in _terminal(r)
    ax = histogram_figure(r).axes[0]
    assert [p.get_height() for p in ax.patches] == [1, 1, 1, 2] and ax.get_legend() is None


# ---------------------------------------------------------------- what risk, percentile and p95 are, on the page

def test_the_report_says_what_risk_is_and_how_p95_is_taken(tmp_path):
    """The page, report.md and the terminal named the scorer but never said what its risk measures, in which unit,
    which way is riskier, what the percentile is, or how a breakdown's p95 was taken: an analyst recomputing p95 with
    pandas (interpolated) got other numbers than the page. Each view now says it. The p95 of a group of 31 risks
    0..30 is 29 (position 0.95 x 30 = 28.5, rounded up), where pandas' default gives 28.5 and numpy's 'nearest' 28."""
    import html

    from audit.report import BREAKDOWN_NOTE, md_escape

    rows = [(f"p{i}", float(i)) for i in range(31)]
    r = build_report(make_run(tmp_path / "ae", rows, threshold=27.5, extra={"grp": ["g"] * 31}), by=["grp"])
    grp = r.breakdowns[-1][2]
    assert grp["p95_risk"].to_list() == [29.0] and grp["mean_risk"].to_list() == [15.0]
    note = ("risk = attention_entropy: cross-attention entropy at the first step (Ren et al., ECCV 2024), in nats "
            "(also in column attn_entropy); higher = riskier. Risks compare only between runs of the same model and "
            "score settings (named above). percentile: the percentage of the calibration's reference prompts whose "
            "risk is at or below this one; flagged: risk > 27.5.")
    md, page = render_markdown(r), render_html(r)
    assert md.count(md_escape(note)) == 1 and page.count(html.escape(note)) == 1
    assert md.count(md_escape(BREAKDOWN_NOTE)) == 1 and page.count(html.escape(BREAKDOWN_NOTE)) == 1
    assert "round(0.95 x (n - 1))" in BREAKDOWN_NOTE and "not interpolated" in BREAKDOWN_NOTE
    text = re.sub(r"\s+", " ", _terminal(r))
    assert note in text and BREAKDOWN_NOTE in text

    nm = dict(scorer="noise_magnitude", layers=["down.0"], noise_draws=1, seed=0, dtype="float32")
    r = build_report(make_run(tmp_path / "nm", rows, score_config=nm))
    assert ("risk = noise_magnitude: text-conditional noise prediction magnitude at the first step (Wen et al., ICLR "
            "2024) (also in column noise_magnitude); higher = riskier. Risks compare only between runs of the same "
            "model and score settings (named above).") in html.unescape(render_html(r))
    assert "percentile:" not in render_html(r)  # not calibrated: no percentile column to explain


# ---------------------------------------------------------------- right-to-left trigger tokens on the page

def _with_triggers(run, triggers: list) -> None:
    """Set risk.parquet's trigger_tokens column (one list of {token, position, mass, start, end} a row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(run / "risk.parquet")
    i = table.schema.get_field_index("trigger_tokens")
    col = pa.array(triggers, table.schema.field(i).type)
    pq.write_table(table.set_column(i, table.schema.field(i), col), run / "risk.parquet")


def test_right_to_left_trigger_tokens_keep_their_masses_beside_them_on_the_page(tmp_path):
    """An Arabic prompt's trigger tokens were one run of text, `ر (0.228), ا (0.208), م (0.149)`: the browser's
    bidi algorithm drew it right to left, `(0.149) م ,(0.208) ا ,(0.228) ر`, so a reader going left to right saw
    each token before the mass of another. Each token is now isolated (`<bdi>`), the list stays in its order, and
    the prompt's cell takes its direction from its text (`dir="auto"`); report.md isolates the tokens too. Markup in
    a token stays escaped."""
    prompt = "مرحبا cat"
    run = make_run(tmp_path / "r", [(prompt, 1.0)])
    _with_triggers(run, [[{"token": "ر", "position": 1, "mass": 0.228, "start": 1, "end": 2},
                          {"token": "<b>", "position": 2, "mass": 0.208, "start": None, "end": None},
                          {"token": "cat", "position": 3, "mass": None, "start": 6, "end": 9}]])
    page = render_html(build_report(run))
    assert ('<td><bdi>ر</bdi> (0.228), <bdi>&quot;&lt;b&gt;&quot;</bdi> (0.208), <bdi>cat</bdi> (-)</td>'
            in page)
    assert ('<td class="prompt"><div class="scroll" dir="auto" tabindex="0" role="region" aria-label="prompt ranked 1">'
            'م<mark>ر</mark>حبا <mark>cat</mark></div></td>') in page
    md = render_markdown(build_report(run))  # Markdown viewers draw bidi too: the same isolation
    assert '| <bdi>ر</bdi> (0.228), <bdi>"&lt;b&gt;"</bdi> (0.208), <bdi>cat</bdi> (-) |' in md


# ---------------------------------------------------------------- breakdowns: groups of rejected rows only

def test_a_group_of_rejected_rows_only_flagged_zero_rows(tmp_path):
    """In a calibrated run, a source file whose every row was rejected showed flagged '-' (null) beside rows 0,
    while an input file with no row at all showed 0: an analyst summing the column in a spreadsheet saw a gap. It
    flagged 0 rows; its mean, p95 and max stay null (no scored row)."""
    rows = [("a", 3.0, "in/good.parquet"), ("b", 1.0, "in/good.parquet")]
    run = make_run(tmp_path / "r", rows, threshold=2.0,
                   rejects=[("in/bad.jsonl", "empty_prompt"), ("in/bad.jsonl", "null_prompt")])
    r = build_report(run)
    by_source = r.breakdowns[0][2].sort("source")
    assert by_source.select("source", "rows", "unique", "flagged", "rejected", "max_risk").rows() == [
        ("in/bad.jsonl", 0, 0, 0, 2, None), ("in/good.parquet", 2, 2, 1, 0, 3.0)]
    assert "| in/bad.jsonl | 0 | 0 | - | - | - | 0 | 2 |" in render_markdown(r)


def test_a_null_group_label_is_not_shown_as_an_input_value_dash(tmp_path):
    """`--by app` where some rows have app '-' and others none: both groups were labelled '-' (the null label was
    formatted as a missing number), two rows an analyst could not tell apart; a file outside any date partition was
    a '-' date. The rows without a value are now labelled '(none)' in every format; the value '-' stays '-'."""
    rows = [("a", 3.0, "in/date=2026-12-01/a.parquet"), ("b", 2.0, "in/date=2026-12-01/a.parquet"),
            ("c", 1.0, "in/misc/b.parquet")]
    r = build_report(make_run(tmp_path / "r", rows, extra={"app": ["-", None, "web"]}), by=["app"])
    by_date, by_app = r.breakdowns[1], r.breakdowns[2]
    assert by_date[0] == "By date partition" and by_date[2]["date"].to_list() == ["2026-12-01", None]
    assert by_app[2].select("app", "rows").rows() == [("-", 1), (None, 1), ("web", 1)]
    md = render_markdown(r)
    assert "\n| 2026-12-01 | 2 | 2 |" in md and "\n| (none) | 1 | 1 | 1.0000 |" in md
    assert "\n| - | 1 | 1 | 3.0000 |" in md and "\n| (none) | 1 | 1 | 2.0000 |" in md
    page = render_html(r)
    assert '<tr><td>(none)</td><td class="num">1</td><td class="num">1</td><td class="num">2.0000</td>' in page
    assert '<tr><td>-</td><td class="num">1</td><td class="num">1</td><td class="num">3.0000</td>' in page
    assert re.search(r"│ \(none\) +│ +1 │ +1 │ 2\.0000 │", _terminal(r))


# ---------------------------------------------------------------- diff: the prompts of one night only

def test_the_diff_lists_the_prompts_added_and_gone(tmp_path):
    """`memaudit diff` counted the prompts only in the new run and only in the old one but listed none of them, so
    the riskiest prompt of a night (new that night) appeared in no list of an uncalibrated diff, and a prompt that
    left the log could not be named. It now lists both, riskiest first, with their flags where the run was
    calibrated. Old: a 3.0, b 2.0, c 1.0; new: d 5.0 (2 rows), b 2.0, c 1.0, e 0.5; threshold 2.5 on both."""
    from audit.diff import diff_runs, render_markdown as diff_md, render_terminal as diff_terminal

    old = make_run(tmp_path / "old", [("a", 3.0), ("b", 2.0), ("c", 1.0)], threshold=2.5)
    new = make_run(tmp_path / "new", [("d", 5.0), ("d", 5.0), ("b", 2.0), ("c", 1.0), ("e", 0.5)], threshold=2.5)
    d = diff_runs(old, new)
    assert (d.summary["only_new"], d.summary["only_old"], d.summary["in_both"]) == (2, 1, 2)
    assert d.added.select("rank", "risk", "flagged", "rows", "prompt").rows() == [
        (1, 5.0, True, 2, "d"), (4, 0.5, False, 1, "e")]
    assert d.gone.select("old_rank", "old_risk", "old_flagged", "rows", "prompt", "prompt_id").rows() == [
        (1, 3.0, True, 1, "a", "in/a.parquet#0")]
    md = diff_md(d)
    assert ("## New prompts (2 of 2 shown)\n\nRank: the prompt's place among all the unique prompts of the new run, by "
            "risk; riskiest first.\n\n| rank | risk | flagged | rows | prompt | prompt\\_id |\n"
            "|---|---|---|---|---|---|\n"
            "| 1 | 5.00000 | FLAG | 2 | d | in/a.parquet\\#0 |\n| 4 | 0.50000 |  | 1 | e | in/a.parquet\\#4 |\n") in md
    assert ("## Gone prompts (1 of 1 shown)\n\nOld rank: the prompt's place among all the unique prompts of the old "
            "run, by risk; riskiest first.\n\n| old rank | old risk | old flagged | rows | prompt | prompt\\_id |\n"
            "|---|---|---|---|---|---|\n| 1 | 3.00000 | FLAG | 1 | a | in/a.parquet\\#0 |\n") in md
    assert "## New prompts (1 of 2 shown)" in diff_md(diff_runs(old, new, top=1))

    from rich.console import Console

    console = Console(record=True, width=120, color_system=None)
    diff_terminal(d, console)
    text = console.export_text()
    assert "New prompts (2 of 2 shown)" in text and "Gone prompts (1 of 1 shown)" in text
    assert re.search(r"│ +1 │ 5\.00000 │ +FLAG │ +2 │ d +│", text)

    # uncalibrated runs have no flags: the lists leave the column out
    plain = diff_runs(make_run(tmp_path / "o2", [("a", 3.0)]), make_run(tmp_path / "n2", [("z", 1.0)]))
    md = diff_md(plain)
    assert "| rank | risk | rows | prompt | prompt\\_id |\n|---|---|---|---|---|\n| 1 | 1.00000 | 1 | z |" in md
    assert "| old rank | old risk | rows | prompt | prompt\\_id |\n|---|---|---|---|---|\n| 1 | 3.00000 | 1 | a |" in md


# ---------------------------------------------------------------- the page opened in a spreadsheet

def test_formula_text_on_the_page_is_inert_in_a_spreadsheet(tmp_path):
    """LibreOffice Calc opening report.html (HTML import, as an analyst opens a page to sort it) ran prompt text as
    formulas: the prompt `=1+1` became the number 2, `=HYPERLINK("http://evil.example/x","click")` a live link
    named 'click' (`soffice --headless --infilter="HTML (StarCalc)" --convert-to csv report.html`). Every text cell
    or header that starts with =, +, -, @ (prompts, prompt ids, group labels, column names) now starts with a
    hidden apostrophe, which the browser does not show and a spreadsheet reads as 'this cell is text'; numbers
    (a negative risk) and other text are left alone."""
    hyper = '=HYPERLINK("http://evil.example/x","click")'
    rows = [(hyper, 3.0, "in/=cmd.parquet"), ("+1+2", 2.0), ("-2+3", 1.0), ("@SUM(A1)", -1.0), ("a cat", -2.0)]
    run = make_run(tmp_path / "r", rows, extra={"-app": ["=evil()", "web", "web", "web", "@x"]})
    page = render_html(build_report(run, by=["-app"]))
    guard = "<span hidden>'</span>"
    region = '<div class="scroll" dir="auto" tabindex="0" role="region" aria-label="prompt ranked {}">'
    assert ('<td class="prompt">' + region.format(1) + guard +
            "=HYPERLINK(&quot;http://evil.example/x&quot;,&quot;click&quot;)</div></td>") in page
    for rank, text in ((2, "+1+2"), (3, "-2+3"), (4, "@SUM(A1)")):
        assert f'{region.format(rank)}{guard}{text}</div>' in page
    assert region.format(5) + 'a cat</div>' in page
    assert f"<th>{guard}-app</th>" in page and f"<td>{guard}=evil()</td>" in page and f"<td>{guard}@x</td>" in page
    assert "<td>web</td>" in page and "<td>in/=cmd.parquet</td>" in page  # not at the start: inert
    assert '<td class="num">-1.00000</td>' in page and '<td class="num">-2.00000</td>' in page  # numbers stay numbers
    assert page.count(guard) == 7  # 4 prompts, the column name, 2 labels
    alone = render_html(build_report(make_run(tmp_path / "s", [("x", 1.0)], extra={"g": ["-"]}), by=["g"]))
    assert "<td>-</td>" in alone and guard not in alone  # a lone sign is no formula


# ---------------------------------------------------------------- diff -o: warnings reach the person who ran it

def test_diff_to_a_file_says_on_stderr_that_the_runs_do_not_compare(tmp_path):
    """`memaudit diff OLD NEW -o diff.md` with runs of different scorers (or models) wrote the warning only inside
    the file and printed just its path: a nightly job's log showed a clean diff of two scales. The warnings now go
    to stderr too; a diff of comparable runs prints none."""
    from typer.testing import CliRunner

    from audit.cli import app

    old = make_run(tmp_path / "old", [("a", 3.0), ("b", 1.0)], threshold=2.0)
    nm = dict(scorer="noise_magnitude", layers=["down.0"], noise_draws=1, seed=0, dtype="float32")
    new = make_run(tmp_path / "new", [("a", 0.5), ("b", 0.7)], threshold=0.6, score_config=nm)
    res = CliRunner().invoke(app, ["diff", str(old), str(new), "-o", str(tmp_path / "d.md")])
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{tmp_path / 'd.md'}\n"
    assert res.stderr.splitlines() == [
        "memaudit: warning: the runs used different score settings (scorer 'attention_entropy' -> "
        "'noise_magnitude'); rank changes may reflect that, not the prompts",
        "memaudit: warning: the runs flagged with different calibrations (risk > 2 at FPR 0.1 vs risk > 0.6 at FPR "
        "0.1): a prompt can be newly flagged with the same risk"]
    assert "**Warning:** the runs used different score settings" in (tmp_path / "d.md").read_text()
    same = CliRunner().invoke(app, ["diff", str(old), str(old), "-o", str(tmp_path / "e.md")])
    assert same.exit_code == 0 and same.stderr == "", same.output


# ---------------------------------------------------------------- the page's layout with long unbroken text

def test_long_unbroken_ids_and_labels_keep_the_page_within_the_window(tmp_path):
    """A 3,000-character source path (or --id-column id, or --by label) without a space or hyphen was one
    unbreakable line: the page grew 20,000 pixels wide, the breakdown's rows, risks and flags sat off-screen to the
    right and the top table's prompt column shrank to a word. Text cells now wrap anywhere (at most 30rem wide,
    numbers never wrapped). Measured in headless Chromium at a 1,000-pixel window: the page is no wider than it,
    and the by-source table shows its max_risk cell inside it."""
    import subprocess

    from helpers import chromium_or_skip

    browser = chromium_or_skip("the layout test")
    long_source = "in/" + "x" * 3000 + ".parquet"
    run = make_run(tmp_path / "r", [("a cat", 3.0, long_source), ("b dog", 2.0)], extra={"app": ["Z" * 3000, "web"]})
    page = render_html(build_report(run, by=["app"]))
    # the page forbids scripts; this copy (policy removed) measures its own layout and writes it into the DOM
    probe = page.replace(re.search(r'<meta http-equiv="Content-Security-Policy"[^>]*>', page).group(0), "")
    probe = probe.replace("</body>", "<script>const c = document.querySelector('#by-source tr:nth-child(2) "
                          "td:nth-child(6)').getBoundingClientRect(); document.title = "
                          "[document.documentElement.scrollWidth, Math.round(c.right)].join(',');</script></body>")
    (tmp_path / "probe.html").write_text(probe, encoding="utf-8")
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,800", "--dump-dom",
                           (tmp_path / "probe.html").as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(\d+),(\d+)</title>", proc.stdout)
    assert title, proc.stdout[:2000] + proc.stderr[-2000:]
    page_width, max_risk_right = int(title.group(1)), int(title.group(2))
    assert page_width <= 1000 and 0 < max_risk_right <= 1000, (page_width, max_risk_right)


# ---------------------------------------------------------------- report.json: the figures as data

def test_report_json_holds_every_group_and_the_exact_prompts(tmp_path):
    """The report offered no export: an analyst could read the figures only from a page or Markdown, with prompts
    escaped and cut (300 / 2,000 characters) and each breakdown cut at 50 groups ('... 10 more groups'), so a
    per-file breakdown of 60 files could not be had without recomputing it. `memaudit report RUN -f json` (or
    `-o x.json`) writes report.json: the counts, the histogram with each bin's flagged rows, the top prompts exactly
    as risk.parquet holds them (NUL, line breaks, right-to-left text, '=' first, 3,000 characters) and every
    breakdown group; it loads in pandas. An existing JSON file of another kind is not overwritten."""
    import json

    import pandas as pd
    from typer.testing import CliRunner

    from audit.cli import app

    odd = ["nul\x00inside", "line one\nline two", "مرحبا cat", '=HYPERLINK("http://x/y","click")', "A" * 3000]
    rows = [(p, 10.0 - i, "in/odd.parquet") for i, p in enumerate(odd)]
    rows += [(f"p{i}", i / 20, f"in/f{i:02d}.parquet") for i in range(60)]
    run = make_run(tmp_path / "r", rows, threshold=5.5, rejects=[("in/f00.parquet", "empty_prompt")])
    res = CliRunner().invoke(app, ["report", str(run), "-f", "json", "--top", "5", "--bins", "4"])
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{run / 'report.json'}\n"
    doc = json.loads((run / "report.json").read_text(encoding="utf-8"))
    assert doc["kind"] == "memaudit.report" and doc["calibration"] == {"threshold": 5.5, "fpr": 0.1,
                                                                      "fail_on_flagged": None}
    c = doc["counts"]
    assert (c["rows_read"], c["scored"], c["unique_prompts"], c["rejected"], c["flagged"]) == (66, 65, 65, 1, 5)
    assert sum(b["rows"] for b in doc["histogram"]) == 65 and sum(b["flagged"] for b in doc["histogram"]) == 5
    assert [t["prompt"] for t in doc["top"]] == odd  # unescaped, uncut
    assert [(t["rank"], t["risk"], t["flagged"], t["rows"]) for t in doc["top"]] == [
        (i + 1, 10.0 - i, True, 1) for i in range(5)]
    by_source = doc["breakdowns"][0]
    assert by_source["title"] == "By source file" and by_source["groups_left_out"] == 0
    assert len(by_source["groups"]) == 61  # the 60 files and in/odd.parquet: every group
    risk = pl.read_parquet(run / "risk.parquet")
    want = (risk.group_by("source").agg(rows=pl.len(), max_risk=pl.col("risk").max(),
                                        p95_risk=pl.col("risk").quantile(0.95, "nearest"),
                                        mean_risk=pl.col("risk").mean())
            .sort("source").rows(named=True))
    got = [{k: g[k] for k in ("rows", "max_risk", "p95_risk", "mean_risk")} | {"source": g["group"]}
           for g in sorted(by_source["groups"], key=lambda g: g["group"])]
    assert got == want
    assert [g["rejected"] for g in by_source["groups"] if g["group"] == "in/f00.parquet"] == [1]
    frame = pd.json_normalize(by_source["groups"])
    assert frame.shape == (61, 8) and int(frame["rows"].sum()) == 65 and int(frame["flagged"].sum()) == 5
    # the page and Markdown still cut at 50 groups; JSON of such a report (from Python) counts the groups left out
    capped = build_report(run)
    assert "... 11 more groups" in render_markdown(capped)
    from audit.report import render_json

    left = json.loads(render_json(capped))["breakdowns"][0]
    assert (len(left["groups"]), left["groups_left_out"]) == (50, 11)

    out = tmp_path / "figures.json"
    res = CliRunner().invoke(app, ["report", str(run), "-o", str(out)])  # the format from the extension
    assert res.exit_code == 0 and json.loads(out.read_text(encoding="utf-8"))["counts"] == c, res.output
    other = tmp_path / "calibration.json"
    other.write_text('{"kind": "memaudit.calibration"}')
    res = CliRunner().invoke(app, ["report", str(run), "-o", str(other)])
    assert res.exit_code == 2 and res.stderr == (f"memaudit: error: --output {other} exists and is not a memaudit "
                                                 "report: not overwritten\n")
    assert other.read_text() == '{"kind": "memaudit.calibration"}'


def test_diff_json_holds_the_lists_with_the_exact_prompts(tmp_path):
    """`memaudit diff` printed its lists only as rich tables or Markdown (prompts escaped and cut at 300 characters,
    risks to 5 decimals): comparing two nights in pandas meant recomputing the diff. `-f json` (or `-o x.json`)
    writes the summary, the warnings and the four lists with exact risks and the prompts as risk.parquet holds them.
    Old: a 3, 'x\\ny' (line break) 2.25, c 1; new: 'x\\ny' 4, c 4.5, '=d' 5; threshold 2.5 on both."""
    import json

    from typer.testing import CliRunner

    from audit.cli import app

    old = make_run(tmp_path / "old", [("a", 3.0), ("x\ny", 2.25), ("c", 1.0)], threshold=2.5)
    new = make_run(tmp_path / "new", [("x\ny", 4.0), ("c", 4.5), ("=d", 5.0)], threshold=2.5)
    res = CliRunner().invoke(app, ["diff", str(old), str(new), "-f", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["kind"] == "memaudit.diff" and doc["warnings"] == [] and doc["flag_warnings"] == []
    assert doc["summary"] == {"old_prompts": 3, "new_prompts": 3, "in_both": 2, "only_new": 1, "only_old": 1,
                              "newly_flagged": 3, "rank_risen": 1, "rank_fallen": 1,
                              "old_flagged": 1, "new_flagged": 3, "no_longer_flagged": 0}
    assert [(r["prompt"], r["risk"], r["old_risk"], r["status"]) for r in doc["newly_flagged"]] == [
        ("=d", 5.0, None, "new prompt"), ("c", 4.5, 1.0, "was not flagged"), ("x\ny", 4.0, 2.25, "was not flagged")]
    assert [(r["prompt"], r["rise"], r["old_rank"], r["rank"]) for r in doc["rank_rises"]] == [("c", 1, 2, 1)]
    assert [(r["prompt"], r["rank"], r["flagged"]) for r in doc["new_prompts"]] == [("=d", 1, True)]
    assert [(r["prompt"], r["old_rank"], r["old_risk"], r["prompt_id"]) for r in doc["gone_prompts"]] == [
        ("a", 1, 3.0, "in/a.parquet#0")]
    out = tmp_path / "d.json"
    res = CliRunner().invoke(app, ["diff", str(old), str(new), "-o", str(out)])
    assert res.exit_code == 0 and json.loads(out.read_text(encoding="utf-8")) == doc, res.output
    # a new run without calibration has no flags to compare: null, not an empty list
    from audit.diff import diff_runs, render_json

    plain = json.loads(render_json(diff_runs(old, make_run(tmp_path / "plain", [("a", 1.0)]))))
    assert plain["newly_flagged"] is None and plain["new_calibrated"] is False
    assert plain["gone_prompts"][0]["prompt"] == "x\ny"


def test_the_diff_keeps_an_id_column_id_that_looks_like_a_path_whole(tmp_path):
    """The diff's terminal tables shortened any id of the form 'x/y#digits' to 'y#digits', taking it for a default
    '<source>#<row>' id: an --id-column id 'users/alice#42' showed as 'alice#42', another id. Only a default id (the
    row's own source, '#', its row) is shortened now; the JSON carries the source too."""
    import json

    from rich.console import Console

    from audit.diff import diff_runs, render_json, render_terminal as diff_terminal

    old = make_run(tmp_path / "old", [("a", 1.0, "/data/day1/p.parquet")])
    new = make_run(tmp_path / "new", [("a", 1.0, "/data/day2/p.parquet"), ("b", 2.0, "/data/day2/p.parquet")])
    table = pq.read_table(new / "risk.parquet")  # give "b" the --id-column id users/alice#42
    ids = ["users/alice#42" if p == "b" else i for p, i in zip(table["prompt"].to_pylist(),
                                                                table["prompt_id"].to_pylist())]
    i = table.schema.get_field_index("prompt_id")
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array(ids, pa.string())), new / "risk.parquet")
    d = diff_runs(old, new)
    console = Console(record=True, width=140, color_system=None)
    diff_terminal(d, console)
    text = console.export_text()
    assert re.search(r"│ +1 │ 2\.00000 │ +1 │ b +│ users/alice#42 +│", text), text
    rows = json.loads(render_json(d))["new_prompts"]
    assert rows == [{"rank": 1, "risk": 2.0, "flagged": None, "rows": 1, "prompt": "b", "prompt_id": "users/alice#42",
                     "source": "/data/day2/p.parquet"}]
    from audit.diff import _short_default_id

    assert _short_default_id("/data/day2/p.parquet#7", "/data/day2/p.parquet") == "p.parquet#7"
    assert _short_default_id("users/alice#42", "/data/day2/p.parquet") == "users/alice#42"
    assert _short_default_id("/data/day2/p.parquet#x7", "/data/day2/p.parquet") == "/data/day2/p.parquet#x7"  # no row


@pytest.mark.parametrize("key", ["first_started_at", "started_at"])  # started_at: manifests from before the other
def test_the_diff_warns_when_the_old_run_is_the_later_one(tmp_path, key):
    """`memaudit diff today yesterday` (the arguments swapped) read silently backwards: yesterday's prompts were
    'newly flagged' and every fall a rise. The diff now warns when the old run was first started after the new one
    (the manifests' first_started_at); runs in order, or started in the same second, get no warning."""
    import json

    def started(run, when):
        manifest = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "first_started_at"}
                                                      | {key: when}))
        return run

    from audit.diff import diff_runs

    day1 = started(make_run(tmp_path / "d1", [("a", 1.0)]), "2026-12-06T02:00:00+00:00")
    day2 = started(make_run(tmp_path / "d2", [("a", 1.0)]), "2026-12-07T02:00:00+00:00")
    assert diff_runs(day1, day2).warnings == []
    assert diff_runs(day2, day1).warnings == [
        "the old run was first started after the new one (2026-12-07T02:00:00+00:00 vs 2026-12-06T02:00:00+00:00): "
        "OLD_RUN and NEW_RUN may be swapped, so that 'newly flagged' and the rises read backwards"]
    assert diff_runs(day2, day2).warnings == []
