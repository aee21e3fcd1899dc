"""Findings of the new-user trial of session 52's changes (unewday)."""

import os
import subprocess
import sys


def test_a_closed_stdout_ends_the_dry_run_docs_and_version_with_141_and_no_message(tmp_path):
    """`memaudit run --dry-run ... | head -1` exited 1 with no word (typer caught the EPIPE of the dry run's lines,
    echoed outside the command's error handling, and exited 1: "anything unexpected" to a scheduler), as did
    `memaudit --version`; README promises 141, silent, as `report | head` gives (`docs` kept with them)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a photo of prompt {i}\n" for i in range(12)), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="120")
    for args in (["run", str(prompts), "--dry-run", "--out", str(tmp_path / "r")], ["docs", "audits"],
                 ["docs"], ["--version"]):
        r, w = os.pipe()
        os.close(r)  # no reader from the start: the first write to stdout fails with EPIPE, every time
        try:
            proc = subprocess.run([sys.executable, "-m", "audit", *args], stdout=w, stderr=subprocess.PIPE,
                                  env=env, cwd=tmp_path, timeout=300)
        finally:
            os.close(w)
        err = proc.stderr.decode()
        assert proc.returncode == 141, (args, proc.returncode, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert all(line.startswith("memaudit: no --model given: using the bundled lab model") for line in lines), (
            args, err)
        assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_an_empty_or_blank_id_column_is_refused_naming_the_option(tmp_path):
    """`memaudit run logs.csv --id-column "$ID"` with ID unset ran with '<source>#<row>' ids and no word (the empty
    name read as no --id-column), where an empty --prompt-column or path option is refused: now one line, exit 2,
    from the config check, so the dry run, the run, --config and audit.run all refuse it."""
    import pytest
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.config import RunConfig, validate_config
    from audit.errors import RunError

    src = tmp_path / "a.csv"
    src.write_text("prompt,id\na cat,1\na dog,2\n", encoding="utf-8")
    for bad in ("", "  "):
        with pytest.raises(RunError, match=r"^--id-column '\s*': give a column name, or leave the option out"):
            validate_config(RunConfig(inputs=(str(src),), id_column=bad))
        r = CliRunner().invoke(app, ["run", str(src), "--id-column", bad, "--dry-run", "--out", str(tmp_path / "r")])
        assert r.exit_code == 2, r.output
        assert f"memaudit: error: --id-column {bad!r}: give a column name" in r.output
    validate_config(RunConfig(inputs=(str(src),), id_column="id"))  # a name, and no option at all, pass
    validate_config(RunConfig(inputs=(str(src),)))
    config = tmp_path / "c.toml"
    config.write_text(f'inputs = ["{src}"]\nid_column = ""\n', encoding="utf-8")
    r = CliRunner().invoke(app, ["run", "--config", str(config), "--dry-run", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and f"--config {config}: 'id_column' is empty: give a value" in r.output, r.output


def test_a_config_files_tiny_confirm_top_is_read_as_written_and_other_floats_stay_plain(tmp_path):
    """`confirm_top = 1e-500` in a --config file was parsed by TOML to the float 0.0 and refused as
    '--confirm-top 0.0' (not what the file says), where `--confirm-top 1e-500` confirms one prompt (README: any
    fraction above 0). The file's number is now read as its text, as the flag's; other floats stay floats, and a
    float given where another type goes is named 'float' in the refusal."""
    import pytest
    from typer.testing import CliRunner

    from audit.cascade import top_size
    from audit.cli import app
    from audit.config import load_config_file
    from audit.errors import ConfigError

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a photo of prompt {i}\n" for i in range(12)), encoding="utf-8")
    config = tmp_path / "c.toml"

    def load(body: str) -> dict:
        config.write_text(f'inputs = ["{prompts}"]\n{body}\n', encoding="utf-8")
        return load_config_file(config)

    for written, confirms in (("1e-500", 1), ("1e-300", 1), ("1_0e-1", 12), ("0.07", 1), ("0.5", 6), ("1.0", 12),
                              ("1", 1), ("13", 12)):
        values = load(f'confirm = "noise_magnitude"\nconfirm_top = {written}')
        assert values["confirm_top"] == written.replace("_", ""), written
        assert top_size(values["confirm_top"], 12) == confirms, written
    r = CliRunner().invoke(app, ["run", "--config", str(config), "--dry-run", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    load('confirm = "noise_magnitude"\nconfirm_top = 1e-500')
    r = CliRunner().invoke(app, ["run", "--config", str(config), "--dry-run", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0 and "--confirm-top" not in r.output, r.output
    load('confirm = "noise_magnitude"\nconfirm_top = 0.0')
    r = CliRunner().invoke(app, ["run", "--config", str(config), "--dry-run", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "--confirm-top 0.0: give a fraction" in r.output, r.output
    values = load("max_error_fraction = 0.5\nstall_timeout = 2.5")
    assert type(values["max_error_fraction"]) is float and values["max_error_fraction"] == 0.5
    assert type(values["stall_timeout"]) is float and values["stall_timeout"] == 2.5
    with pytest.raises(ConfigError, match=r"'seed' must be int, not float$"):
        load("seed = 2.0")


def test_a_report_that_scored_nothing_heads_its_top_line_top_prompts_without_the_trigger_note(tmp_path):
    """report.md and report.html of a run that scored nothing headed the line 'no scored rows' 'Top 0 prompts' and
    explained the trigger tokens of a table that is not there; they now say 'Top prompts' over the line, as the
    terminal does ('Top prompts: no scored rows'). A run with scores keeps 'Top N prompts' and the note."""
    from test_report_mutants import make_run

    from audit.report import build_report, render_html, render_markdown

    rejects = [("logs/a.txt", "empty_prompt")]
    empty = build_report(make_run(tmp_path / "e", [], rejects=rejects))
    md, page = render_markdown(empty), render_html(empty)
    assert "## Top prompts\n\n_no scored rows_\n" in md and "Top 0" not in md and "Trigger tokens" not in md
    assert '<h2>Top prompts</h2>\n<p class="meta" id="top">no scored rows</p>' in page
    assert "Top 0" not in page and "Trigger tokens" not in page
    full = build_report(make_run(tmp_path / "f", [("a", 1.0, "logs/a.txt"), ("b", 2.0, "logs/a.txt")]))
    md, page = render_markdown(full), render_html(full)
    assert "## Top 2 prompts\n\nTrigger tokens (highest attention mass) in <b>bold</b>." in md
    assert "<h2>Top 2 prompts</h2>\n<p class=\"meta\">Trigger tokens (highest attention mass)" in page


RAY_BREAKPOINT_CALLER = r'''
import os, sys
import audit

before = {k: os.environ.get(k) for k in ("PYTHONBREAKPOINT", "RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
audit.run(sys.argv[1], out=sys.argv[2], model=sys.argv[3], engine="ray", workers=1, log=lambda line: None)
import ray
print("initialized", ray.is_initialized())
print("changed", sorted(k for k, v in before.items() if os.environ.get(k) != v))
'''


def test_a_library_ray_run_leaves_the_callers_breakpoint_hook_and_ray_auth_mode(tmp_path, tiny_model_dir):
    """audit.run(engine="ray") put back the RAY_* variables memaudit sets, but not what its ray.init sets in the
    caller's environment: PYTHONBREAKPOINT=ray.util.rpdb._driver_set_trace stayed, so a notebook's breakpoint()
    after the call started Ray's remote debugger (ray_debugpy) with Ray shut down, instead of pdb; and
    RAY_AUTH_MODE=token stayed. Both are now given back as the caller had them (unset here)."""
    src = tmp_path / "p.txt"
    src.write_text("a red cat on a beach\na blue dog\n", encoding="utf-8")
    script = tmp_path / "caller.py"
    script.write_text(RAY_BREAKPOINT_CALLER)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONBREAKPOINT", "RAY_AUTH_MODE",
                                                            "RAY_USAGE_STATS_ENABLED")}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, str(script), str(src), str(tmp_path / "run"), str(tiny_model_dir)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["initialized False", "changed []"], done.stdout


def test_an_empty_or_blank_text_value_in_a_config_file_is_refused_naming_the_file_and_key(tmp_path):
    """`cache = ""` in a --config file (a template whose variable was unset) ran without the cache, and
    `calibration = ""` ran uncalibrated (no flags, no gate), with no word; `confirm = ""` said '--confirm : choose
    one of ...'. '' on the command line drops the file's value; in the file it means nothing, so it is refused in
    one line naming the file and the key, before anything runs (exit 2). The command line's '' keeps its meaning."""
    import pytest
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.config import load_config_file
    from audit.errors import ConfigError

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n", encoding="utf-8")
    config = tmp_path / "c.toml"
    for key, value in (("cache", '""'), ("calibration", '"  "'), ("out", '""'), ("confirm", '""'), ("model", '""')):
        config.write_text(f'inputs = ["{prompts}"]\n{key} = {value}\n', encoding="utf-8")
        with pytest.raises(ConfigError, match=rf"^--config .*c\.toml: '{key}' is empty: give a value, or remove"):
            load_config_file(config)
        r = CliRunner().invoke(app, ["run", "--config", str(config), "--dry-run"])
        assert r.exit_code == 2 and f"'{key}' is empty" in r.output, (key, r.output)
    config.write_text(f'inputs = ["{prompts}"]\ncache = "{tmp_path / "cache"}"\n', encoding="utf-8")
    assert load_config_file(config)["cache"] == str(tmp_path / "cache")
    r = CliRunner().invoke(app, ["run", "--config", str(config), "--cache", "", "--dry-run", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0 and "--cache '' runs without the --config file's" in r.output, r.output


def test_a_diff_against_a_run_that_scored_nothing_prints_no_tables_of_headers_only(tmp_path):
    """`memaudit diff` against a run that scored nothing printed the rank-rise and new-prompt tables as headers only
    (the report says "no scored rows" instead); any empty table of a diff is now one line: `None.` in report.md, and
    `TITLE: none.` in the terminal, the rank-rise note kept (it says why); a table with rows is unchanged."""
    from rich.console import Console

    from audit.diff import diff_runs, render_markdown, render_terminal
    from test_report_mutants import make_run

    old = make_run(tmp_path / "old", [("a red cat", 1.0), ("b", 2.0)])
    empty = make_run(tmp_path / "empty", [])
    d = diff_runs(old, empty)
    md = render_markdown(d)
    assert md.count("None.") == 2 and "| rise |" not in md and "| rank | risk |" not in md
    assert "## New prompts (0 of 0 shown)\n\nNone.\n" in md
    assert "## Largest rank rises\n\nNo prompt is in both runs, so no rank can rise.\n\nNone.\n" in md
    assert "| old rank | old risk | rows | prompt | prompt\\_id |\n|---|---|---|---|---|\n| 1 | 2.00000 | 1 | b |" in md
    console = Console(width=200, record=True, force_terminal=False)
    render_terminal(d, console=console)
    lines = console.export_text().splitlines()
    assert "Largest rank rises (0 shown): none. No prompt is in both runs, so no rank can rise" in lines
    assert "New prompts (0 of 0 shown): none." in lines
    assert sum("┃ old rank" in line for line in lines) == 1 and not any("┃ rise" in line for line in lines)
