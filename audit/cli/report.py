"""Commands ``report``, ``calibrate`` and ``diff`` (mounted by :mod:`audit.cli`).

Owns these commands' options and messages only. Must not import polars, matplotlib or the audit modules
behind the commands at import time (they are imported inside the commands, so ``memaudit --help`` stays
light), nor :mod:`audit.cli` itself (it mounts this module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


MAX_BINS = 1000


def check_output_file(path: Path, suffixes: tuple[str, ...], what: str) -> None:
    """``--output`` of report, diff and calibrate: its extension is one of ``suffixes``; it is not one of the
    files a run or generate writes in its folder (:data:`audit.sources.RUN_FILES`, ``GENERATE_FILES``, in a
    folder holding that command's identity file), nor an existing JSON of another kind, nor an existing non-empty
    Markdown or HTML file that memaudit did not write (its heading or title), so that no command overwrites a run,
    its inputs or the user's own files.

    Raises:
        RunError: naming the path and why.
    """
    import json
    import os

    from audit.errors import RunError
    from audit.sources import GENERATE_FILES, RUN_FILES

    if path.suffix.lower() not in suffixes:
        raise RunError(f"--output {path}: {what} is written to a {' or '.join(suffixes)} file")
    real = Path(os.path.realpath(path))
    if not real.parent.is_dir():
        raise RunError(f"--output {path}: no such folder {path.parent}")
    for owned in (RUN_FILES, GENERATE_FILES):  # the first is the command's identity file
        if real.name in owned and (real.parent / owned[0]).is_file():
            raise RunError(f"--output {path} is a file of the memaudit output folder {real.parent}: write "
                           "elsewhere (nothing was written)")
    from audit.calibrate import CALIBRATION_KIND
    from audit.diff import DIFF_KIND
    from audit.report import REPORT_KIND

    kinds = {"a calibration": (CALIBRATION_KIND, "a memaudit calibration"),
             "a JSON report": (REPORT_KIND, "a memaudit report"),
             "a JSON diff": (DIFF_KIND, "a memaudit diff")}
    if what in kinds and real.is_file():
        try:
            kind = json.loads(real.read_bytes()).get("kind")
        except (ValueError, AttributeError, OSError):
            kind = None
        if kind != kinds[what][0]:
            raise RunError(f"--output {path} exists and is not {kinds[what][1]}: not overwritten")
    # a Markdown or HTML file is overwritten only when memaudit wrote it (its heading or title) or it is empty:
    # `memaudit report RUN -o README.md` replaced the user's README without a word
    pages = {"a Markdown report": ("# memaudit report", "a memaudit report"),
             "an HTML report": ("<title>memaudit report", "a memaudit report"),
             "a Markdown diff": ("# memaudit diff", "a memaudit diff")}
    if what in pages and real.is_file():
        try:
            with open(real, "rb") as fh:
                head = fh.read(4096).decode("utf-8", "replace")
        except OSError:
            head = None
        if head and pages[what][0] not in head:
            raise RunError(f"--output {path} exists and is not {pages[what][1]}: not overwritten")


def replaced_calibration(path: Path) -> dict | None:
    """What an existing calibration file at ``path`` holds, before ``memaudit calibrate -o`` replaces it: its
    threshold, fpr, model, score configuration and reference run (None: no file, or not readable as JSON; a file
    of another kind was refused by :func:`check_output_file`)."""
    import json

    try:
        old = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(old, dict):
        return None
    model = old.get("model") if isinstance(old.get("model"), dict) else {}
    reference = old.get("reference") if isinstance(old.get("reference"), dict) else {}
    return {"threshold": old.get("threshold"), "fpr": old.get("fpr"), "model": model.get("name"),
            "fingerprint": model.get("fingerprint"), "score_config": old.get("score_config"),
            "reference": reference.get("run"), "size": reference.get("size")}


def replaced_calibration_warning(old: dict | None, path: Path) -> str | None:
    """The warning after ``memaudit calibrate -o PATH`` replaced a calibration (``old``: :func:`replaced_calibration`
    before the write) whose threshold, fpr, model, score configuration or reference run differ from the one now at
    ``path`` (None: no earlier file, or the same calibration made again). A calibration is an input of later runs,
    not only an output: a ``--config`` file, a scheduled job or a run folder rerun with ``--calibration PATH`` flags
    with the new threshold from its next run (a finished run re-merges with it), and ``memaudit run`` says nothing of
    it; the old values are named so that the change is seen, and can be undone. As report and diff, calibrate
    overwrites its own kind of file rather than refusing it (a nightly recalibration into one path is a use); it
    refuses any other file (:func:`check_output_file`)."""
    new = replaced_calibration(path)
    if old is None or new is None or new == old:
        return None

    from audit.text import threshold_text

    def said(c: dict) -> str:
        threshold = threshold_text(c['threshold']) if isinstance(c.get("threshold"), (int, float)) else "none"
        fpr = f"{c['fpr']:g}" if isinstance(c.get("fpr"), (int, float)) else "none"
        return (f"threshold {threshold} at FPR {fpr}, model {c.get('model')} [{c.get('fingerprint')}], "
                f"{c.get('size')} reference prompts of {c.get('reference')}")

    config = ", another score configuration" if old.get("score_config") != new.get("score_config") else ""
    return (f"--output {path} held an earlier calibration, now replaced (it held {said(old)}; now {said(new)}"
            f"{config}): a --config file, scheduled job or run folder naming it flags with the new threshold from "
            "its next run (a finished run rerun re-merges with it); write to another -o to keep both")


def register(app: typer.Typer) -> None:
    """Add ``report``, ``calibrate`` and ``diff`` to the memaudit app."""

    def format_from(output: Optional[Path], formats: tuple[str, ...]) -> Optional[str]:
        """The format an --output file's extension names (``.md``/``.markdown``, ``.html``/``.htm``), if allowed."""
        ext = {".md": "md", ".markdown": "md", ".html": "html", ".htm": "html",
               ".json": "json"}.get(output.suffix.lower()) \
            if output is not None else None
        return ext if ext in formats else None

    from audit.cli.common import _split, echo_path, fail, guarded, say

    @app.command("report", short_help="Summarize a run: counts, risk histogram, top prompts with trigger tokens, "
                 "breakdowns (terminal, markdown, an HTML page with plots or JSON).")
    def report_cmd(
        run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A finished run folder (risk.parquet, rejects.parquet, manifest.json)."),
        fmt: Optional[str] = typer.Option(None, "--format", "-f", help="terminal (rich tables), md (writes "
                                          "report.md), html (writes a self-contained report.html) or json (writes "
                                          "report.json: "
                                          "the figures as data, every breakdown group, prompts unescaped). Default: "
                                          "terminal, or from --output's extension (.md, .html, .json)."),
        top: Optional[int] = typer.Option(None, "--top", "-n", show_default=False, help="How many of the "
                                          "highest-risk prompts to list (default 20, at most 1,000: a larger N lists "
                                          "1,000, with a note on stderr; every scored prompt is in the run's "
                                          "risk.parquet)."),
        by: Optional[list[str]] = typer.Option(None, "--by", help="Also break down by these risk.parquet columns "
                                               "(e.g. ones kept with run --keep-columns); repeat or comma separate "
                                               "(a name holding a comma in double quotes)."),
        bins: int = typer.Option(30, "--bins", help="Histogram bins (1 to 1,000)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write report.md/report.html/"
                                              "report.json (default: in the run folder); - for standard output."),
    ) -> None:
        """Summarize a run: counts, risk histogram with the flag threshold, top prompts with trigger tokens
        highlighted, breakdowns by source file, date partition and --by columns."""

        def go():
            from audit.report import FORMATS, build_report, emit_report, top_note
            from audit.text import visible

            listed = 20 if top is None else top  # the default lists 20 without a note on a smaller run
            for flag, value in (("--top", listed), ("--bins", bins)):  # the one given wrong, by name and value
                if value < 1:
                    fail(f"{flag} {value}: must be at least 1")
            if bins > MAX_BINS:
                fail(f"--bins {bins}: at most {MAX_BINS:,} (a histogram wider than a screen or page shows nothing more)")
            to_stdout = output is not None and str(output) == "-"
            form = fmt or (None if to_stdout else format_from(output, ("md", "html", "json"))) or "terminal"
            if form not in FORMATS:  # first: an unknown format is not "an HTML report" to its output file
                fail(f"--format {form}: choose one of {', '.join(FORMATS)}")
            if to_stdout and form == "terminal":
                fail("-o - writes report.md, report.html or report.json to standard output: add --format md, html "
                     "or json")
            if output is not None and form == "terminal":
                fail("--output writes report.md, report.html or report.json: add --format md or --format html "
                     "(or --format json)")
            if output is not None and not to_stdout:
                suffixes, what = {"md": ((".md", ".markdown"), "a Markdown report"),
                                  "html": ((".html", ".htm"), "an HTML report"),
                                  "json": ((".json",), "a JSON report")}[form]
                check_output_file(output, suffixes, what)
            every = {"all_groups": True} if form == "json" else {}  # data for analysis: every breakdown group
            r = build_report(run_dir, top=listed, by=_split(by, "--by"), bins=bins, **every)
            if to_stdout:  # for a pipe (jq, a ticket's API): the text alone on stdout, warnings on stderr
                from audit.report import iter_json, report_text

                if form == "json":  # every group of every breakdown: written in pieces, never held whole
                    chunk: list[str] = []
                    for piece in iter_json(r):
                        chunk.append(piece)
                        if len(chunk) >= 4096:
                            typer.echo("".join(chunk), nl=False)
                            chunk = []
                    typer.echo("".join(chunk), nl=False)  # the text ends with its line end
                else:
                    text = report_text(r, form)
                    typer.echo(text, nl=not text.endswith("\n"))
            elif (path := emit_report(r, form, output)) is not None:
                echo_path(path)
            for warning in r.warnings:  # a run that scored nothing: the page's warning, on stderr too
                typer.echo(visible(f"memaudit: warning: {warning}", one_line=True), err=True)
            if top is not None and (note := top_note(top, r.top.height, str(run_dir / "risk.parquet"),
                                                     r.counts["unique_prompts"])):
                say(f"memaudit: note: {note}")

        guarded(go, resumable=False, output_option="-o / --output")

    @app.command("calibrate")
    def calibrate_cmd(
        reference_run: Path = typer.Argument(..., metavar="REFERENCE_RUN", help="A finished run over prompts known to be ordinary."),
        fpr: str = typer.Option("0.01", "--fpr", help="Most false positives on the reference, as a fraction (0.01) or "
                                "a percentage (1%): of its n unique prompts at most floor(FPR x n) are flagged (the "
                                "threshold is the reference risk ranked floor(FPR x n) + 1 from the top; flagged = "
                                "risk > threshold)."),
        output: Path = typer.Option(Path("calibration.json"), "--output", "-o", help="Calibration file to write. An "
                                      "earlier calibration there is replaced, with a warning naming its threshold and "
                                      "the new one (runs and --config files that name it flag with the new one); any "
                                      "other existing file is refused."),
    ) -> None:
        """Make a calibration: a flag threshold from a reference run, for `memaudit run --calibration`."""

        def go():
            from audit.calibrate import calibrate, calibration_warnings, parse_fpr, write_calibration
            from audit.text import threshold_text

            check_output_file(output, (".json",), "a calibration")
            cal = calibrate(reference_run, parse_fpr(fpr))
            for warning in calibration_warnings(cal):  # a small reference, an fpr below 1 / n, ties
                say(f"memaudit: warning: {warning}")
            old = replaced_calibration(output) if output.is_file() else None
            write_calibration(cal, output)
            if replaced := replaced_calibration_warning(old, output):
                say(f"memaudit: warning: {replaced}")
            say(f"memaudit: threshold {threshold_text(cal['threshold'])} at FPR {cal['fpr']:g} from "
                f"{cal['reference']['size']} reference prompts; model {cal['model']['name']} [{cal['model']['fingerprint']}]")
            echo_path(output)

        guarded(go, resumable=False, output_option="-o / --output")

    @app.command("diff")
    def diff_cmd(
        old_run: Path = typer.Argument(..., metavar="OLD_RUN", help="The earlier run folder, or the folder holding the run folders "
                                       "(e.g. audits/nightly): then the latest run first started before NEW_RUN that "
                                       "scored a row, with NEW_RUN's model and score settings where one has them, "
                                       "named on stderr."),
        new_run: Path = typer.Argument(..., metavar="NEW_RUN", help="The later run folder."),
        fmt: Optional[str] = typer.Option(None, "--format", "-f", help="terminal (rich tables), md (Markdown) or json "
                                          "(the lists as data, prompts unescaped). Default: terminal, or from "
                                          "--output's extension (.md, .json)."),
        top: int = typer.Option(20, "--top", "-n", help="Prompts per list (at most 1,000: a larger N lists 1,000, "
                                "with a note on stderr; every scored prompt is in each run's risk.parquet)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the Markdown or JSON here instead "
                                              "of printing it (--format md or json; - prints it)."),
    ) -> None:
        """Compare two runs: prompts newly and no longer flagged, the largest rank rises, prompts added and gone."""

        def go():
            from audit import diff as d

            if top < 1:  # first, and in the words of report's (diff said "--top must be at least 1", no value)
                fail(f"--top {top}: must be at least 1")
            to_stdout = output is not None and str(output) == "-"
            form = fmt or (None if to_stdout else format_from(output, ("md", "json"))) or "terminal"
            if form not in ("terminal", "md", "json"):
                fail(f"--format {form}: choose terminal, md or json")
            if to_stdout and form == "terminal":
                fail("-o - prints the Markdown or JSON: add --format md or --format json")
            output_file = None if to_stdout else output
            if output_file is not None and form == "terminal":
                fail("--output writes Markdown: add --format md (or --format json)")
            if output_file is not None:
                if form == "json":
                    check_output_file(output, (".json",), "a JSON diff")
                else:
                    check_output_file(output, (".md", ".markdown"), "a Markdown diff")
            old = old_run
            try:
                parent = old_run.is_dir() and not (old_run / "manifest.json").exists() \
                    and not (old_run / "run.json").exists()
            except OSError:  # a name over 255 bytes: diff_runs says why it cannot be read
                parent = False
            if parent:
                old = d.previous_run(old_run, new_run, log=say)  # a folder of run folders
                say(f"memaudit: compared with {old}")
            result = d.diff_runs(old, new_run, top=top)
            from audit.report import MAX_TOP, top_note

            if top > MAX_TOP:
                say("memaudit: note: " + top_note(top, MAX_TOP, "each run folder's risk.parquet"))
            if form == "terminal":  # its warnings are among its lines (once on a terminal: not again on stderr)
                d.render_terminal(result)
                return
            text = d.render_json(result) if form == "json" else d.render_markdown(result)
            if output_file:
                from audit.tables import atomic_path

                with atomic_path(output_file, sweep=True) as tmp:
                    tmp.write_text(text + "\n", encoding="utf-8")
                echo_path(output_file)
            else:
                typer.echo(text)
            # the file or text says why the runs may not compare; whoever ran the diff sees it on stderr too, as
            # `report` says its warnings: a nightly script's log, `diff --format json -o - | jq`, `--format md > f`
            for w in result.warnings:
                say(f"memaudit: warning: {w}; rank changes may reflect that, not the prompts")
            for w in result.flag_warnings:
                say(f"memaudit: warning: {w}")

        guarded(go, resumable=False, output_option="-o / --output")
