"""Findings of a user who learns memaudit from `--help` alone (session 50, uhelp): each option's help text checked
against what the command does at and beyond its limits, and the exit codes each failure gets."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from helpers import prompts_file, run_audit


def _invoke(*args, **kw):
    from audit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def _help_lines(command: str, heading: str) -> list[str]:
    """The lines of ``memaudit COMMAND --help`` (300 columns, stripped) after the line ``heading``, to the end."""
    res = _invoke(command, "--help", env={"COLUMNS": "300"})
    assert res.exit_code == 0
    lines = [line.strip() for line in res.output.splitlines()]
    return lines[lines.index(heading) + 1:]


@pytest.fixture(autouse=True)
def _no_debug_left_behind(monkeypatch):
    """A test's `--debug` sets the process's debug state and MEMAUDIT_RAY_LOGS: both are restored after it."""
    from audit.cli.common import _STATE

    monkeypatch.setitem(_STATE, "debug", False)
    monkeypatch.delenv("MEMAUDIT_RAY_LOGS", raising=False)


def _main(capsys, *args) -> tuple[int, str, str]:
    """``memaudit ARGS`` as the console script runs them (usage errors in one line): (exit code, stdout, stderr)."""
    from audit.cli import _invoke as invoke

    code = invoke([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    """Two finished runs of the tiny model: 12 prompts, and the first 5 of them."""
    root = tmp_path_factory.mktemp("uhelp_runs")
    prompts = prompts_file(root / "p.txt", 12)
    few = root / "few.txt"
    few.write_text("".join(prompts.read_text().splitlines(keepends=True)[:5]))
    old, _ = run_audit([prompts], tiny_model_dir, root / "old")
    new, _ = run_audit([few], tiny_model_dir, root / "new")
    return old, new


@pytest.mark.parametrize("top", ["4294967296", "999999999999999999999"])
def test_a_top_beyond_every_prompt_lists_them_all_in_report_and_diff(two_runs, top):
    """`--top N`: "How many of the highest-risk prompts to list" / "Prompts per list". A count above polars' row
    index (2**32) ended `report` and `diff` in "OverflowError: ... (run with --debug for the traceback)", exit 1; it
    now lists every prompt, as a count of the table's size does."""
    old, new = two_runs
    res = _invoke("report", old, "--top", top, "--format", "json", "--output", "-")
    assert res.exit_code == 0, res.output
    listed = json.loads(res.stdout)["top"]
    assert [row["rank"] for row in listed] == list(range(1, 13))
    res = _invoke("diff", old, new, "--top", top, "--format", "json")
    assert res.exit_code == 0, res.output
    gone = json.loads(res.stdout)["gone_prompts"]
    assert len(gone) == 7  # the 7 prompts of the old run that the new one lacks, every one listed


def test_eval_names_the_option_given_wrong_and_bounds_bootstrap_before_scoring(tmp_path):
    """`memaudit eval --noise-draws 0` said "--noise-draws, --steps, --batch-size and --bootstrap (...) must be at least
    1", naming four options for one; and --bootstrap ("Bootstrap resamples for the CIs.") took any count: 10**20
    scored every prompt, then ended in numpy's "ValueError: Maximum allowed dimension exceeded", exit 1. Each is now
    refused by name and value before the table is read or the model loaded (the labelled file is missing here, and
    the option's line comes first)."""
    missing = tmp_path / "nope.csv"
    for flag, value, name in (("--noise-draws", "0", "noise_draws"), ("--steps", "-2", "num_inference_steps"),
                              ("--batch-size", "0", "batch_size"), ("--bootstrap", "0", "n_boot")):
        res = _invoke("eval", missing, flag, value)
        assert (res.exit_code, res.output) == (2, f"memaudit: error: {flag} {value} ({name}): must be at least 1\n")
    for value in ("100001", "99999999999999999999"):
        res = _invoke("eval", missing, "--bootstrap", value)
        assert (res.exit_code, res.output) == (
            2, f"memaudit: error: --bootstrap {value} (n_boot): give 1 to 100,000 resamples (each one recomputes every "
               "figure; the default 1,000 gives stable 95% CIs)\n")
    res = _invoke("eval", missing, "--bootstrap", "100000")  # the bound itself passes: the missing file is next
    assert res.exit_code == 2 and "--bootstrap" not in res.output and "nope.csv" in res.output, res.output
    res = _invoke("eval", "--help", env={"COLUMNS": "200"})
    assert "Bootstrap resamples for the CIs (1 to 100,000)." in res.output


def test_generate_bounds_seeds_before_the_folder_keeps_them_and_an_empty_model_is_not_told_to_be_left_out(tmp_path):
    """`memaudit generate --seeds N` ("Images per prompt, seeds 0..N-1") took any N: 10**20 first wrote --out's
    generate.json with it (so a rerun with the intended count was refused as other options), then filled the memory
    with one generator per seed until killed. N above 1,024 is now refused in one line, before --out is made.
    `--model ''` said "(or leave it out for the bundled lab model)": generate's --model is required, and the lab model
    is refused (no VAE)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    out = tmp_path / "g"
    for seeds in ("1025", "99999999999999999999"):
        res = _invoke("generate", prompts, "--model", tmp_path / "no-model", "--out", out, "--seeds", seeds)
        assert (res.exit_code, res.output) == (2, f"memaudit: error: --seeds {seeds}: give 1 to 1,024 (a prompt's "
                                                  "images are generated in one batch, one per seed)\n")
        assert not out.exists()
    res = _invoke("generate", prompts, "--model", tmp_path / "no-model", "--out", out, "--seeds", "1024")
    assert res.exit_code == 2 and "--seeds" not in res.output and "no-model" in res.output, res.output  # next: the model
    res = _invoke("generate", prompts, "--model", "", "--out", out)
    assert (res.exit_code, res.output) == (2, "memaudit: error: --model is empty: give a Stable Diffusion 1.x/2.x "
                                              "folder with vae/ or its hub id (generate has no default model)\n")
    res = _invoke("generate", "--help", env={"COLUMNS": "200"})
    assert "Images per prompt, seeds 0..N-1 (N from 1 to 1,024)." in res.output


def test_lab_mitigation_refuses_more_steps_than_the_scheduler_and_bounds_seeds(capsys):
    """`memaudit lab mitigation --steps N` ("DDIM steps", [x>=2]) above the scheduler's 1,000 training timesteps
    loaded the model and ended in diffusers' "ValueError: `num_inference_steps`: ... cannot be larger than ...", exit
    1 ("run with --debug for the traceback"); it is now one line naming --steps, exit 2, before anything is sampled.
    --seeds had no upper bound (10**20 seeds: one noise tensor each); --help now shows [2<=x<=1024]."""
    res = _invoke("lab", "mitigation", "--limit", "1", "--steps", "1001")
    assert (res.exit_code, res.output) == (2, "memaudit: error: --steps 1001: more than the 1000 training timesteps "
                                              "of the model's scheduler (the lab samples with 10)\n")
    assert _main(capsys, "lab", "mitigation", "--seeds", "1025") == (2, "", (
        "memaudit: error: Invalid value for '--seeds': Input should be less than or equal to 1024; see memaudit lab "
        "mitigation --help\n"))
    res = _invoke("lab", "mitigation", "--help", env={"COLUMNS": "200"})
    assert "[2<=x<=1024]" in res.output


@pytest.mark.parametrize("command", [[], ["run"], ["layers"], ["report"], ["calibrate"], ["diff"], ["eval"],
                                     ["generate"], ["lab"], ["lab", "build"], ["lab", "eval"], ["lab", "mitigation"]])
def test_dash_h_is_help_in_every_command(capsys, command):
    """`memaudit -h` and `memaudit run -h` said "No such option: -h", exit 2: every command now takes -h for --help,
    and its help lists it beside --help."""
    code, out, err = _main(capsys, *command, "-h")
    assert (code, err) == (0, "") and f"Usage: memaudit {' '.join(command)}".rstrip() in out
    assert _main(capsys, *command, "--help") == (0, out, "")
    import re

    assert re.search(r"│ +--help +-h +Show this message", out), out
    assert "<bool>" not in out  # typer 0.29 wrote it beside every flag, as if it took a value (--dry-run true)


def test_run_help_says_each_exit_code_on_one_line_at_a_wide_terminal():
    """`memaudit run --help` cut its exit codes mid-sentence at any width ("2 an error said in one line (options,
    inputs, model, a unit that kept failing," then "a full disk);" on the next line of a 200-column terminal): typer
    keeps the line breaks of a docstring's later paragraphs. Each output and exit code is now one line of the text."""
    from audit.cli import RUN_HELP

    codes = RUN_HELP.split("Exit codes:\n")[1].split("\n")  # each item one line of the text, 8 of them
    assert len(codes) == 8 and codes[0] == "0 done;" and codes[-1].startswith("1 anything unexpected")
    assert _help_lines("run", "Exit codes:")[:9] == codes + [""]
    res = _invoke("run", "--help", env={"COLUMNS": "300"})
    lines = [line.strip() for line in res.output.splitlines()]
    start = lines.index("Exit codes:")
    assert lines[start - 5:start] == [
        "Outputs in the run folder:", "risk.parquet: one row per scored input row, rank 1 = highest risk;",
        "rejects.parquet: every row not scored, with the reason;",
        "manifest.json: counts that reconcile, model identity, score configuration, versions, throughput.", ""]


def test_generate_says_an_unexpected_error_in_one_line_and_its_traceback_only_with_debug(capsys, monkeypatch, tmp_path):
    """`memaudit --help`: "--debug  Show full tracebacks instead of one-line errors." `generate` printed Python's whole
    traceback for any error it did not know, with or without --debug; it now says one line, exit 1, as every other
    command does, and --debug adds the traceback before that line."""
    import audit.cli.generate as generate

    def broken(*args, **kwargs):
        raise RuntimeError("the pipeline broke")

    monkeypatch.setattr(generate, "run_generate", broken)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    args = ("generate", prompts, "--model", tmp_path / "m", "--out", tmp_path / "g")
    said = "memaudit: error: RuntimeError: the pipeline broke (run with --debug for the traceback)\n"
    assert _main(capsys, *args) == (1, "", said)
    code, out, err = _main(capsys, "--debug", *args)
    assert (code, out) == (1, "") and err.startswith("Traceback (most recent call last):") and err.endswith(
        "RuntimeError: the pipeline broke\n" + said)


def test_the_command_list_names_every_report_format():
    """`memaudit --help` listed report's formats as "terminal, markdown or an HTML page with plots"; `report --format`
    also writes json (report.json: the figures as data), which only `report --help` told."""
    res = _invoke("--help", env={"COLUMNS": "250"})
    assert res.exit_code == 0
    line = next(x for x in res.output.splitlines() if "│ report " in x)
    assert "breakdowns (terminal, markdown, an HTML page with plots or JSON)." in line, line


def test_generate_help_lists_its_exit_codes_and_exit_4_is_what_it_says(capsys, tmp_path, gen_pipeline):
    """`memaudit generate --help` listed no exit codes, though generate exits 4 when every row was rejected (a user
    gating on `generate && next-step` met an undocumented 4), 75 when --out is busy, 130/143/129 when stopped. The
    help now lists them, one a line; and a prompts file of rows without a prompt exits 4 as it says."""
    assert _help_lines("generate", "Exit codes:")[:7] == [
        "0 done (rows that failed to generate are said in a warning; a rerun tries them again);",
        "2 an error said in one line (options, the prompts file, the model, the calibration, a full disk);",
        "4 every row was rejected, no image made (generations.parquet says why for each);",
        "130, 143, 129 interrupted, terminated, hung up (the finished prompts are kept: rerun the same command to "
        "resume);",
        "75 --out is being written by another memaudit generate right now (nothing done, retry later);",
        "1 anything unexpected (--debug shows the traceback).", ""]
    model_dir, _ = gen_pipeline
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": null}\n{"prompt": ""}\n')
    code, out, err = _main(capsys, "generate", prompts, "--model", model_dir, "--out", tmp_path / "g", "--steps", "2",
                           "--device", "cpu", "--dtype", "float32", "--no-progress")
    assert (code, err) == (4, "memaudit: error: nothing was generated: all 2 rows were rejected (null_prompt 1, "
                              "empty_prompt 1); generations.parquet says why for each\n")
    assert json.loads(out)["rejected_by_reason"] == {"null_prompt": 1, "empty_prompt": 1}


def test_run_names_layers_when_a_layer_is_not_the_models(capsys, tmp_path, tiny_model_dir):
    """`memaudit run --layers nope` ("Cross-attention layers by module path, comma separated") said "not a
    cross-attention layer of this UNet: nope. Cross-attention layers: ...", naming no option (a --config file's layers
    or a flag?); the line now begins with the option and the value given. No run folder is made."""
    from audit.models import adapter_of, load_model

    known = adapter_of(model := load_model(str(tiny_model_dir), "cpu", "float32")).cross_attention_layers(model.unet)
    prompts = prompts_file(tmp_path / "p.txt", 3)
    out = tmp_path / "run"
    code, stdout, err = _main(capsys, "run", prompts, "--model", tiny_model_dir, "--out", out, "--layers",
                              f"nope,{known[0]}", "--no-progress")
    assert (code, stdout) == (2, "")
    assert err == (f"memaudit: error: --layers nope,{known[0]}: not a cross-attention layer of this UNet: nope. "
                   f"Cross-attention layers: {', '.join(known)}\n")
    assert not out.exists()


def test_a_gate_over_limit_0_says_limit_0_read_no_row_not_that_the_inputs_hold_none(capsys, tmp_path, two_runs,
                                                                                      tiny_model_dir):
    """--fail-on-flagged's help: "and with 4 when no row was read". With --limit 0 over inputs that hold rows, the
    exit-4 line (and the dry run's) said "the inputs hold no rows ... (an empty screening set, or a file that failed
    to upload?)", sending the user to inspect inputs that were fine; it now says that --limit 0 reads no row."""
    old, _ = two_runs
    cal = tmp_path / "cal.json"
    assert _main(capsys, "calibrate", old, "--fpr", "0.25", "--output", cal)[0] == 0
    prompts = prompts_file(tmp_path / "p.txt", 4)
    args = ("run", prompts, "--model", tiny_model_dir, "--out", tmp_path / "run", "--limit", "0", "--calibration", cal,
            "--fail-on-flagged", "5", "--no-progress")
    code, out, err = _main(capsys, *args, "--dry-run")
    assert code == 0 and ("exit 4 expected: --limit 0 reads no row, so --fail-on-flagged 5 has no prompt to judge (a "
                          "gate over no prompts does not pass)") in out.splitlines(), out
    code, out, err = _main(capsys, *args)
    assert code == 4 and err.splitlines()[-1] == ("memaudit: error: nothing was scored: --limit 0 reads no row, so "
                                                  "--fail-on-flagged 5 has no prompt to judge; a gate over no prompts "
                                                  "does not pass"), err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["counts"]["rows_read"] == 0


@pytest.mark.parametrize("args, said", [
    (["run", "p.txt", "--steps"], "Option '--steps' requires an argument; see memaudit run --help"),
    (["--debug", "run", "p.txt", "--compile=true"], "Option '--compile' does not take a value; see memaudit run --help"),
    (["lab", "build", "--out"], "Option '--out' requires an argument; see memaudit lab build --help"),
    (["report", "--top"], "Option '--top' requires an argument; see memaudit report --help"),
])
def test_an_option_without_its_value_names_the_commands_help(capsys, args, said):
    """Every other usage error ends "; see memaudit CMD --help"; an option given without its value ("Option '--steps'
    requires an argument") or a flag given one ("--compile=true") said no help to read: click raises those without
    the command's context. The command is now found from the arguments."""
    assert _main(capsys, *args) == (2, "", f"memaudit: error: {said}\n")


def test_eval_layers_repeated_scores_with_every_layer_given(capsys, tmp_path, tiny_model_dir):
    """`memaudit eval --layers` ("... as `memaudit run --layers`", which is repeatable) was a single-valued option:
    `--layers A --layers B` scored with B alone, said nowhere but in the result's layer list. Repeated values now
    add up, as run's do; `all` with names is refused."""
    from audit.models import adapter_of, load_model

    known = adapter_of(model := load_model(str(tiny_model_dir), "cpu", "float32")).cross_attention_layers(model.unet)
    labelled = tmp_path / "l.csv"
    labelled.write_text("prompt,memorized\n" + "".join(f"a photo of a cat {i},{str(i % 2 == 0).lower()}\n"
                                                       for i in range(6)))
    code, out, err = _main(capsys, "eval", labelled, "--model", tiny_model_dir, "--layers", known[0], "--layers",
                           f"{known[1]},{known[2]}", "--bootstrap", "5", "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["score_layers"], result["score_layers_given"]) == ([known[0], known[1], known[2]], True)
    assert _main(capsys, "eval", labelled, "--layers", "all", "--layers", known[0]) == (
        2, "", f"memaudit: error: --layers all,{known[0]}: give all alone (every layer's figures), or layer names\n")


def test_dry_run_refuses_more_steps_than_the_scheduler_as_the_run_does(capsys, tmp_path, tiny_model_dir):
    """--dry-run's help: "Exit 2 where the run would be refused." `run --steps 5000 --dry-run` planned the run, exit 0,
    and the run itself then exited 2 ("more than the 1000 training timesteps"): the dry run now reads the folder's
    scheduler configuration (no weights, no diffusers import) and refuses it with the run's own line."""
    prompts = prompts_file(tmp_path / "p.txt", 3)
    said = ("memaudit: error: --steps 1001: more than the 1000 training timesteps of the model's scheduler (50, the "
            "default, is what the published scores use)\n")
    args = ("run", prompts, "--model", tiny_model_dir, "--out", tmp_path / "run", "--no-progress")
    assert _main(capsys, *args, "--steps", "1001", "--dry-run") == (2, "", said)
    code, out, err = _main(capsys, *args, "--steps", "1000", "--dry-run")
    assert (code, err) == (0, "") and f"--out {tmp_path / 'run'}: a new run folder" in out.splitlines()
    assert _main(capsys, *args, "--steps", "1001") == (2, "", said)  # the run's own refusal: the same line
    assert not (tmp_path / "run").exists()


def test_max_error_fraction_help_names_every_reason_it_counts(capsys, tmp_path, tiny_model_dir):
    """--max-error-fraction's help named missing_prompt_column and missing_id_column as the rows "that could not be
    read as prompts", but the gate also counts invalid_utf8, invalid_csv_row and invalid_json: a Latin-1 CSV exited 4
    with no word of it in the help. The help now lists every reason the gate counts; the run below is one of them."""
    import re

    res = _invoke("run", "--help", env={"COLUMNS": "400"})
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.output).split())
    assert ("could not be scored (scoring_error, out_of_memory, nonfinite_attention), or of the rows read could not be "
            "read as prompts (missing_prompt_column, missing_id_column, invalid_utf8, invalid_csv_row, invalid_json, "
            "prompt_not_string: a file or JSON line without the prompt or --id-column, text not UTF-8, a ragged CSV "
            "record, a line that is not a JSON object, a prompt that is not text).") in text
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b'prompt\n"caf\xe9 au lait"\na red cat\n')
    code, out, err = _main(capsys, "run", latin, "--model", tiny_model_dir, "--out", tmp_path / "run", "--no-progress")
    assert code == 4 and "could not be read as prompts (invalid_utf8 1), more than --max-error-fraction 0.01" in err
    counts = json.loads((tmp_path / "run" / "manifest.json").read_text())["counts"]
    assert (counts["rows_read"], counts["scored"], counts["rejected_by_reason"]) == (2, 1, {"invalid_utf8": 1})


def test_version_names_the_build_that_run_folders_record(capsys, tmp_path, tiny_model_dir):
    """A rerun says "r1 was started by another memaudit (build X; this is build Y)" and report prints "made by memaudit
    0.1.0, build X", but `memaudit --version` printed "memaudit 0.1.0" alone: the user could not tell which build
    they run. It now prints the build too, the one a run folder made now records."""
    from audit import __version__

    code, out, err = _main(capsys, "--version")
    assert (code, err) == (0, "")
    run, _ = run_audit([prompts_file(tmp_path / "p.txt", 2)], tiny_model_dir, tmp_path / "run")
    build = json.loads((run / "manifest.json").read_text())["memaudit_build"]
    assert out == f"memaudit {__version__} (build {build})\n"


def test_eval_help_lists_its_exit_codes_and_an_interruption_exits_130(capsys, monkeypatch, tmp_path):
    """`memaudit eval --help` listed no exit codes (run's and generate's do). It now does; an interruption while
    scoring exits 130 as it says, keeping nothing."""
    assert _help_lines("eval", "Exit codes:")[:5] == [
        "0 done (warnings on stderr say what the table is too small to measure);",
        "2 an error said in one line (options, the labelled table, the model);",
        "130, 143, 129 interrupted, terminated, hung up (nothing is kept: rerun the command);",
        "1 anything unexpected (--debug shows the traceback).", ""]
    import audit.evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(audit.evaluate, "evaluate", interrupted)
    labelled = tmp_path / "l.csv"
    labelled.write_text("prompt,memorized\na red cat,true\na blue dog,false\n")
    assert _main(capsys, "eval", labelled, "--model", tmp_path / "m") == (
        130, "", "memaudit: error: interrupted; nothing was kept: rerun the command to start again\n")
    assert _main(capsys, "eval", tmp_path / "none.csv")[0] == 2


def test_a_cache_in_another_commands_output_folder_is_refused(capsys, tmp_path, two_runs, tiny_model_dir):
    """--cache ("Score cache folder") took the --out of last night's run (or a folder inside it, or a generate
    folder): the cache's folders were written into that run in silence. It is now refused before the model loads,
    naming the folder and its identity file; a new folder is taken."""
    old, _ = two_runs
    prompts = prompts_file(tmp_path / "p.txt", 2)
    args = ("run", prompts, "--model", tiny_model_dir, "--out", tmp_path / "run", "--dry-run")
    before = sorted(p.name for p in old.iterdir())
    for cache, how in ((old, "is"), (old / "cache", "is inside")):
        assert _main(capsys, *args, "--cache", cache) == (2, "", (
            f"memaudit: error: --cache {cache}: {how} the output folder of another memaudit command ({old}, with "
            "run.json); give the score cache a folder of its own (a new or empty folder, or a cache made before)\n"))
    generated = tmp_path / "gen"
    generated.mkdir()
    (generated / "generate.json").write_text("{}")
    code, out, err = _main(capsys, *args, "--cache", generated)
    assert code == 2 and f"({generated}, with generate.json)" in err
    assert sorted(p.name for p in old.iterdir()) == before
    code, out, err = _main(capsys, *args, "--cache", tmp_path / "cache")
    assert (code, err) == (0, "") and f"--out {tmp_path / 'run'}: a new run folder" in out.splitlines()


@pytest.mark.parametrize("args, said", [
    (["rnu"], "No such command 'rnu'. Did you mean 'run'? (see memaudit --help)"),
    (["lab", "buld"], "No such command 'buld'. Did you mean 'build'? (see memaudit lab --help)"),
    (["nosuchcmd"], "No such command 'nosuchcmd'; see memaudit --help"),
])
def test_a_mistyped_command_is_suggested_in_a_readable_line(capsys, args, said):
    """`memaudit rnu` said "No such command 'rnu'. Did you mean 'run'?; see memaudit --help": the hint after click's
    question now goes in parentheses; a line without a suggestion keeps its "; see"."""
    assert _main(capsys, *args) == (2, "", f"memaudit: error: {said}\n")


def test_eval_checks_noise_generator_with_the_other_options(capsys, tmp_path):
    """`memaudit eval T --noise-generator x` read the table and said the bundled lab model's note before refusing the
    option; it is now refused with the other options, first and alone (the table here does not even exist)."""
    assert _main(capsys, "eval", tmp_path / "none.csv", "--noise-generator", "x") == (
        2, "", "memaudit: error: --noise-generator 'x': choose mt19937 or philox\n")


def test_lab_cli_imports_first_without_a_cycle_and_bounds_seeds_as_generate():
    """audit.lab.cli imported audit.cli.generate for its seeds bound, which imports audit.cli, which mounts
    audit.lab.cli: imported first (a test module, a script), it failed with "cannot import name 'lab_app' from
    partially initialized module". The bound is its own constant, equal to generate's."""
    import subprocess
    import sys

    from pathlib import Path

    # from the repository root: `python -c` reads this checkout's audit package first
    proc = subprocess.run([sys.executable, "-c", "import audit.lab.cli"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert (proc.returncode, proc.stderr) == (0, "")
    from audit.cli.generate import MAX_SEEDS
    from audit.lab.cli import MAX_SEEDS as LAB_MAX_SEEDS

    assert LAB_MAX_SEEDS == MAX_SEEDS == 1024


def test_flags_show_no_type_and_options_that_take_a_value_keep_theirs(capsys):
    """`memaudit run --help` read `--dry-run <bool>`, `--progress/--no-progress <bool>` (typer 0.29 writes a type
    beside every option), as if the flags took a value; `memaudit run --dry-run true` then said "Got unexpected
    extra argument". A flag's row now shows no type; `--limit <int>` and `--out <path>` keep theirs."""
    import re

    code, out, _ = _main(capsys, "run", "-h")
    assert code == 0
    assert re.search(r"│ --dry-run +Check the options", out), out
    assert re.search(r"│ --limit +<int> +Read only", out), out
    assert "<bool>" not in out
