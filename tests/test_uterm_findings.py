"""Findings of a new-user trial in terminals that are not a developer's: a screen reader's TERM=dumb, a 40-column
terminal (COLUMNS=40), output piped or logged, an ASCII console."""

from __future__ import annotations

import pytest

from test_report_mutants import make_run


@pytest.fixture(autouse=True, scope="module")
def _library_loggers_on_the_real_stderr():
    """diffusers and transformers give their loggers a stream handler on the stderr of the moment they are first
    used: first used inside a CliRunner invocation (the eval tests below load the lab model there), it is
    CliRunner's stream, closed afterwards, and a later test's warning printed '--- Logging error ---'. Configured
    here first, outside any invocation, as a module that builds a model in a fixture does."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.get_logger("diffusers")
    transformers_logging.get_logger("transformers")
    yield

BEFORE = [("a red fox in the snow", 3.0), ("a blue whale at sea", 1.0), ("ordinary caption", 2.0)]
AFTER = [("a red fox in the snow", 1.5), ("a blue whale at sea", 2.987654), ("ordinary caption", 1.0)]


def _diff_text(tmp_path, width: int) -> str:
    from rich.console import Console

    from audit.diff import diff_runs, render_terminal

    d = diff_runs(make_run(tmp_path / "before", BEFORE, threshold=2.5), make_run(tmp_path / "after", AFTER,
                                                                                 threshold=2.5))
    console = Console(record=True, width=width, color_system=None)
    render_terminal(d, console)
    return console.export_text()


def test_diff_at_40_columns_lists_each_prompt_as_a_block_with_whole_numbers(tmp_path):
    """`COLUMNS=40 memaudit diff OLD NEW`: the rank-rise table's six number columns left the prompt 2 cells and rich
    folded every risk over several lines ('2.' / '98' / '76' / '5'), the prompt one or two letters a line. Now each
    listed prompt is a block: its numbers named as diff.json names them, the prompt and its id whole on lines of
    their own; no line wider than the terminal."""
    text = _diff_text(tmp_path, 40)
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= 40
    words = " ".join(text.split())
    assert "rise=2 old_rank=3 rank=1 old_risk=1.00000 risk=2.98765 rows=1 a blue whale at sea" in words
    assert "a blue whale at sea" in lines and "id: a.parquet#1" in lines  # whole, on a line of its own
    # the newly flagged and no-longer-flagged lists too: their numbers named, the prompts whole
    assert "a red fox in the snow" in lines
    assert "status=" in text and "old_rank=1" in text
    assert "│" not in text and "┃" not in text  # no table squeezed to slivers


def test_diff_at_72_columns_keeps_a_table_whose_numbers_are_not_cut(tmp_path):
    """At 72 columns rich fitted the rank-rise table by folding number columns: '2.12480' printed as '2.1248' over
    '0'. A number column is now as wide as its widest value (its header wrapped at a space, 'old' over 'rank'), the
    prompt and its id taking the rest; every line fits the terminal."""
    text = _diff_text(tmp_path, 72)
    assert max(len(ln) for ln in text.splitlines()) <= 72
    row = next(ln for ln in text.splitlines() if "a blue" in ln and ln.startswith("│"))
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[:6] == ["2", "3", "1", "1.00000", "2.98765", "1"] and cells[6].startswith("a blue")


def test_diff_at_160_columns_is_unchanged_one_header_line(tmp_path):
    """A wide terminal keeps one header line per table ('old rank' not wrapped)."""
    text = _diff_text(tmp_path, 160)
    assert any("│ rise │ old rank │ new rank │ old risk │ new risk │ rows │" in ln.replace("┃", "│")
               for ln in text.splitlines())


def _help(*args: str, columns: int) -> str:
    from typer.testing import CliRunner

    from audit.cli import app

    res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(columns), "NO_COLOR": "1", "TERM": "dumb"})
    assert res.exit_code == 0, res.output
    return res.output


def test_help_at_40_columns_names_every_option_whole():
    """`COLUMNS=40 memaudit run --help`: typer's six-column panels cut the option names ('--noise…' for both
    --noise-draws and --noise-generator, '--max-e…') and the help's long words ('attentio…', 'noise_ma…'), the help
    running down a 9-cell column. Where a name would be cut, each option is now a block: its names and type whole on
    a line, its help under it; nothing is cut to '…' and no line is wider than the terminal."""
    for columns in (40, 70):  # at 70 typer's table still cut '--skip-bad-fil…' and '--prepare-threa…'
        for command in (("run",), ("report",), ("diff",), ("calibrate",), ("eval",), ("generate",), ("docs",)):
            text = _help(*command, columns=columns)
            assert "…" not in text, (command, [ln for ln in text.splitlines() if "…" in ln])
            assert max(len(ln) for ln in text.splitlines()) <= columns
    run = _help("run", columns=40)
    lines = [ln.strip() for ln in run.splitlines()]
    assert "--noise-draws <int>" in lines and "--noise-generator <str>" in lines
    assert "--max-error-fraction <float>" in lines and "--model, -m <str>" in lines
    assert "--dry-run" in lines and "--progress, --no-progress" in lines and "INPUT <list[str]>" in lines
    words = " ".join(run.split())
    assert "attention_entropy (Ren et al. 2024's first-step cross-attention entropy" in words
    assert "noise_magnitude (Wen et al. 2024" in words
    assert len(run.splitlines()) < 400


def test_help_at_80_columns_keeps_typers_panels():
    """Where every panel's names fit whole beside the help (run at 80 columns), the options stay in typer's panels;
    at 70 the whole help is blocks, not some panels tables and some blocks."""
    text = _help("run", columns=80)
    assert any(ln.startswith("│ --model") and "Hub id" in ln for ln in text.splitlines())
    narrower = _help("run", columns=70)
    assert "╭" not in narrower and "Model and score:" in narrower.splitlines()


def test_eval_in_a_narrow_terminal_prints_a_block_a_scorer(tmp_path, monkeypatch):
    """`memaudit eval` printed its 130-odd-column table whatever the terminal: at 80 columns (or COLUMNS=40) every
    row wrapped mid-number and the figures stood under no header. Where COLUMNS (or stdout's terminal) is narrower,
    each scorer and layer is a block, one named figure a line; a pipe or a file without COLUMNS keeps the table,
    unchanged."""
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.cli.eval import render
    from audit.lab import LAB_MODEL_DIR
    from test_generate_eval_mutants import RESULT, _stub_evaluate

    _stub_evaluate(monkeypatch, RESULT)
    path = tmp_path / "t.csv"
    path.write_text("prompt,memorized\na red cat,true\nblue sky,false\n")
    args = ["eval", str(path), "--model", str(LAB_MODEL_DIR), "--bootstrap", "7"]
    res = CliRunner().invoke(app, args, env={"COLUMNS": "40"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == "model tiny [abc123]: 3 memorized, 2 ordinary prompts; 2 noise draw(s); 95% bootstrap CIs"
    figures = [ln for ln in lines if ln.startswith("  ")]  # (the heading, notes and section titles: one line each)
    assert len(figures) == 9 and max(len(ln) for ln in figures) <= 40
    at = lines.index("attention_entropy")
    assert lines[at + 1:at + 7] == ["  AUROC 0.814 [0.512, 0.976]", "  TPR@1%FPR 0.250 [0.000, 0.667]†",
                                    "  TPR@3%FPR 0.375 [0.125, 0.750]†", "  TPR@1% nearest* 0.500",
                                    "  fwd/prompt 2", "  prompts/s 12.35"]
    assert lines[lines.index("  down.attn2") + 1:][:2] == ["    AUROC 0.600 [0.400, 0.900]",
                                                           "    TPR@1%FPR 0.100 [0.000, 0.300]†"]
    wide = CliRunner().invoke(app, args, env={"COLUMNS": None})  # a pipe: the table, as render() without a width
    assert wide.exit_code == 0, wide.output
    table = render(RESULT)
    assert table in wide.stdout and render(RESULT, 200) == table
    assert any(ln.startswith("attention_entropy        0.814 [0.512, 0.976]   0.250") for ln in table.splitlines())


def test_terminal_width_reads_columns_then_the_terminal(monkeypatch):
    """COLUMNS when a positive integer; else None for a stdout that is not a terminal (a pipe, a file)."""
    import io

    from audit.cli.common import terminal_width

    monkeypatch.setattr("sys.stdout", io.StringIO())
    monkeypatch.setenv("COLUMNS", "40")
    assert terminal_width() == 40
    for bad in ("", "0", "abc", "-5"):
        monkeypatch.setenv("COLUMNS", bad)
        assert terminal_width() is None


def test_diff_warnings_are_on_stderr_whatever_the_output(tmp_path):
    """`memaudit diff OLD NEW --format json -o - | jq` and `--format md > diff.md` said that the runs used different
    score settings only inside the text on stdout (only `-o FILE` printed it on stderr), so the person or log
    watching the command saw nothing; `report` says its warnings on stderr in every format. Now a Markdown or JSON
    diff does too, printed or written; the terminal format prints it once, among its lines
    (test_ufixout_findings)."""
    from typer.testing import CliRunner

    from audit.cli import app
    from test_report_mutants import SCORE_CONFIG

    old = make_run(tmp_path / "old", BEFORE)
    new = make_run(tmp_path / "new", AFTER, score_config=dict(SCORE_CONFIG, seed=3))
    line = ("memaudit: warning: the runs used different score settings (seed 0 -> 3); rank changes may reflect that, "
            "not the prompts")
    for extra in (["--format", "json", "-o", "-"], ["--format", "json"], ["--format", "md"],
                  ["-o", str(tmp_path / "d.md")]):
        res = CliRunner().invoke(app, ["diff", str(old), str(new), *extra], env={"COLUMNS": "200"})
        assert res.exit_code == 0, res.output
        assert res.stderr.splitlines().count(line) == 1, (extra, res.stderr)
        assert "memaudit: warning" not in res.stdout  # stdout: the diff itself (its own warning lines, unprefixed)


def test_the_progress_bar_at_40_columns_keeps_the_rows_and_the_time_left(monkeypatch):
    """`memaudit run` on a 40-column terminal drew 'scoring ━  rows   0% - prompts/s … ETA …': rich squeezed the
    nine columns of the bar, and the rows done and the time left were gone; at 60, 'scoring      1… rows  12% ...
    0:… ETA -:-…'. The bar is now what fits: without the bar and elapsed time, then without the rate, down to the
    rows done, their share and the time left; the full bar where it fits."""
    import io

    from rich.console import Console

    from audit.runner import _Progress

    def drawn(columns: int) -> str:
        monkeypatch.setenv("COLUMNS", str(columns))
        bar = _Progress(10_000, True)
        bar.advance(1234)
        out = Console(file=io.StringIO(), width=columns, color_system=None)
        out.print(bar.bar.make_tasks_table(bar.bar.tasks))
        return out.file.getvalue()

    narrow = drawn(40)
    assert "1234/10000 rows  12% ETA" in narrow and "…" not in narrow
    assert len(narrow.rstrip("\n")) <= 40
    middle = drawn(60)
    assert "1234/10000 rows  12% " in middle and " prompts/s ETA " in middle and "scoring" not in middle
    assert "…" not in middle and len(middle.rstrip("\n")) <= 60
    wide = drawn(100)
    assert "scoring" in wide and "1234/10000 rows  12%" in wide and "prompts/s" in wide and "…" not in wide


def test_lab_eval_in_a_narrow_terminal_prints_a_block_a_layer(monkeypatch):
    """`memaudit lab eval` on an 80-column terminal: each layer's row (its 50-character attn2 path, then the
    figures: about 125 columns) wrapped mid-number, the figures under no header. Where COLUMNS or the terminal is
    narrower than the table, each scorer and layer is a block of named figures; a pipe keeps the table."""
    import audit.lab.evaluate
    from typer.testing import CliRunner

    from audit.cli import app

    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    fig = {"auroc": 0.5204, "auroc_ci": [0.464, 0.571], "tpr_at_1pct_fpr": 0.0189, "tpr_at_1pct_fpr_ci": [0.0, 0.082],
           "tpr_at_3pct_fpr": 0.0881, "tpr_at_3pct_fpr_ci": [0.031, 0.15]}
    result = {"model": "lab", "fingerprint": "fp", "default_layers": [layer], "noise_draws": 1, "first_timestep": 981,
              "_scores": None, "test": {"n_memorized": 78, "n_ordinary": 207, "by_positive_group": {},
                                        "scorers": {"attention_entropy": dict(fig), "noise_magnitude": dict(fig)},
                                        "layers": {layer: dict(fig)}}}
    monkeypatch.setattr(audit.lab.evaluate, "evaluate", lambda model, table: dict(result))
    res = CliRunner().invoke(app, ["lab", "eval"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    at = lines.index(f"attention_entropy @ {layer} *")
    assert lines[at + 1:at + 4] == ["  AUROC 0.520 [0.464,0.571]", "  TPR@1% 0.019 [0.000,0.082]", "  TPR@3% 0.088"]
    assert max(len(ln) for ln in lines[at:at + 4]) <= 80
    table = CliRunner().invoke(app, ["lab", "eval"], env={"COLUMNS": None})
    assert table.exit_code == 0, table.output
    row = next(ln for ln in table.stdout.splitlines() if ln.startswith(f"attention_entropy @ {layer} *"))
    assert row.split()[4:] == ["0.520", "[0.464,0.571]", "0.019", "[0.000,0.082]", "0.088"]


@pytest.mark.parametrize("encoding", ["cp1252", "ascii", "latin-1"])
def test_the_run_folder_line_is_the_folders_bytes_whatever_stdouts_encoding(tmp_path, tiny_model_dir, encoding):
    """`OUT=$(memaudit run ...)` in a console whose encoding cannot write the folder's name: under
    PYTHONIOENCODING=cp1252 the run folder 東京 was printed `\\u6771\\u4eac` (a path that does not exist), under
    ascii as its UTF-8 bytes (click's choice). The line a script reads back is now the file system's bytes under
    every encoding; the run's messages on stderr stay escaped as before."""
    import os
    import subprocess
    import sys

    (tmp_path / "東京.txt").write_text("a red cat\na blue dog\n", encoding="utf-8")
    out = tmp_path / f"東京_{encoding}"
    env = {**os.environ, "PYTHONIOENCODING": encoding, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "audit.cli", "run", str(tmp_path / "東京.txt"), "--model",
                           str(tiny_model_dir), "--out", str(out), "--no-progress"], capture_output=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == os.fsencode(out)
    assert (out / "risk.parquet").is_file()
