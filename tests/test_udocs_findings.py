"""Findings of a check of README.md and docs/ against the code: where the docs describe the intended behaviour
and the code did otherwise, the code was fixed and the behaviour is pinned here."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit.errors import RunError
from audit.evaluate import read_labelled
from helpers import labels_csv


@pytest.mark.parametrize("labels, message", [
    # README: "A missing, null or other label is refused in one line naming its rows and the values seen". One
    # 'yes' among true/false makes pyarrow read the whole CSV column as text, and the line named the values only,
    # not the row holding the 'yes' (in a large table the user had to search for it)
    (["true", "false", "yes", "true", "false", "false"],
     "values seen: 'false', 'true', 'yes' (row 2 not true/false or 0/1)"),
    (["1", "0", "n/a", "1", "maybe", "0"], "values seen: '0', '1', 'maybe', 'n/a' (row 2, 4 not true/false or 0/1)"),
    # every row is no label at all: the values say it, no row list (as for numbers)
    (["yes", "no", "no", "yes", "no", "no"], "values seen: 'no', 'yes'"),
])
def test_text_labels_name_the_rows_that_are_no_label(tmp_path, labels, message):
    path = labels_csv(tmp_path, labels)
    with pytest.raises(RunError) as err:
        read_labelled(path)
    assert str(err.value) == (f"{path}: label column 'memorized' is string, not boolean (true/false, or integers "
                              f"0/1); {message}")


def test_text_zero_one_labels_in_parquet_name_no_rows(tmp_path):
    # every value is a label's spelling, only the column's type is wrong: no row is singled out
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog", "a fox"], "memorized": ["1", "0", " True"]}), path)
    with pytest.raises(RunError) as err:
        read_labelled(path)
    assert str(err.value) == (f"{path}: label column 'memorized' is string, not boolean (true/false, or integers 0/1); "
                              "values seen: ' True', '0', '1'")


def test_lab_examples_help_prints_usage_and_writes_no_file(tmp_path, monkeypatch, capsys):
    # docs/lab.md: "regenerate: `python -m audit.lab.examples`". A new user's `python -m audit.lab.examples --help`
    # wrote the example table to a Parquet file named "--help" in the working folder, and printed its name
    from audit.lab.examples import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "usage: python -m audit.lab.examples [-h] [path]" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as exit_:  # an unknown option is refused, not taken as the path
        main(["-q"])
    assert exit_.value.code == 2 and list(tmp_path.iterdir()) == []
    assert main(["ex.parquet"]) == Path("ex.parquet")
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "ex.parquet")
    assert table.column_names == ["prompt_id", "prompt"] and table.num_rows == 576
    assert table.column("prompt_id")[0].as_py() == "lab-0000"


def test_eval_json_warnings_hold_every_warning_printed(tmp_path):
    # README: `--json` prints `"warnings": the lines printed as warnings`. On the bundled lab model (the README's
    # `memaudit eval audit/lab/prompts.parquet --model audit/lab/model ... --json`) the line saying it fails its
    # acceptance criteria was printed on stderr but left out of the JSON, which a script reading it never saw
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from audit.cli import app
    from audit.cli.eval import lab_criteria_note
    from audit.lab import LAB_MODEL_DIR

    path = tmp_path / "labelled.parquet"
    prompts = ["a red cat", "a blue dog on a sofa", "old city street at night", "portrait of a woman",
               "a green bird", "a yellow house", "a painting of a boat", "two cats on a bed"]
    pq.write_table(pa.table({"prompt": prompts, "memorized": [True, True, False, False, False, False, False, False]}),
                   path)
    res = CliRunner().invoke(app, ["eval", str(path), "--model", str(LAB_MODEL_DIR), "--json", "--device", "cpu",
                                   "--bootstrap", "20"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    note = lab_criteria_note(str(LAB_MODEL_DIR))
    assert note.startswith("this lab model fails its acceptance criteria")
    assert out["warnings"] == [
        "6 ordinary prompts cannot measure TPR at 1% FPR (one false positive is already 16.7% FPR, not below 1%; it "
        "needs at least 101)",
        "6 ordinary prompts cannot measure TPR at 3% FPR (one false positive is already 16.7% FPR, not below 3%; it "
        "needs at least 34)",
        "2 memorized and 6 ordinary prompts: too few for a stable AUROC (its bootstrap CI understates the uncertainty "
        "with under 10 of a class)", note,
        "--bootstrap 20 (n_boot): a 95% CI's limits are the 2.5th and 97.5th percentiles of the resampled figures, and "
        "20 resample(s) put fewer than one in each tail, so every CI printed is about their range, not a 95% interval; "
        "give 1,000 (the default) or more"]  # (test_ustats_findings)
    printed = [line.removeprefix("memaudit: warning: ") for line in res.stderr.splitlines()
               if line.startswith("memaudit: warning: ")]
    assert out["warnings"] == printed


def _command(*path):
    """The click command of ``memaudit PATH...`` (typer's app as click sees it)."""
    import typer

    from audit.cli import app

    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def _synopsis(doc: str, head: str) -> str:
    """The usage synopsis in ``doc`` that starts with ``head`` (``memaudit run INPUT...``): in a fenced block, its
    continuation lines joined; inline (in backquotes), up to the closing backquote."""
    import re

    text = (Path(__file__).parent.parent / doc).read_text(encoding="utf-8")
    start = text.index(head)
    if text[start - 1] == "`":
        return text[start:text.index("`", start)]
    lines = [text[start:].split("\n")[0]]
    for line in text[start:].split("\n")[1:]:
        if not re.match(r"\s+\[", line):
            break
        lines.append(line)
    return " ".join(lines)


@pytest.mark.parametrize("doc, head, path", [
    ("README.md", "memaudit run INPUT...", ("run",)),
    ("README.md", "memaudit eval LABELLED", ("eval",)),
    ("docs/audits.md", "memaudit report RUN_DIR [", ("report",)),
    ("docs/audits.md", "memaudit diff OLD_RUN NEW_RUN [", ("diff",)),
    ("docs/audits.md", "memaudit calibrate REFERENCE_RUN --fpr", ("calibrate",)),
    ("docs/mitigation.md", "memaudit generate PROMPTS --model M --out DIR [", ("generate",)),
    ("docs/lab.md", "memaudit lab eval [", ("lab", "eval")),
    ("docs/lab.md", "memaudit lab build --out DIR [", ("lab", "build")),
    ("docs/mitigation.md", "memaudit lab mitigation [", ("lab", "mitigation")),
])
def test_each_usage_synopsis_in_the_docs_lists_every_option_and_no_other(doc, head, path):
    # docs/mitigation.md's `memaudit generate` synopsis left out --prompt-column, --device and --dtype, and
    # docs/lab.md's `memaudit lab eval` its --prompts (used a page later): a user reading the synopsis did not know
    # that a CSV with a `caption` column can be generated from. Each synopsis names every option of its command
    # (one of each option's names), and no option the command lacks
    import re

    synopsis = _synopsis(doc, head)
    named = set(re.findall(r"(?<![\w-])--?[a-z][a-z0-9-]*", synopsis))
    options = [p for p in _command(*path).params if p.opts[0].startswith("-") and p.name != "help"]
    missing = [p.opts[0] for p in options if not named & set(p.opts + p.secondary_opts)]
    assert missing == [], f"{doc}: {head}... lacks {missing}"
    known = {o for p in options for o in p.opts + p.secondary_opts}
    assert named - known == set(), f"{doc}: {head}... names {named - known}, not options of the command"


@pytest.mark.parametrize("args, name", [
    (["report"], "RUN_DIR"), (["calibrate"], "REFERENCE_RUN"), (["diff"], "OLD_RUN"), (["diff", "runs/a"], "NEW_RUN"),
    (["generate", "--model", "m", "--out", "o"], "PROMPTS"), (["eval"], "LABELLED"),
])
def test_arguments_are_named_in_help_and_errors_as_the_docs_name_them(args, name):
    # the docs write `memaudit diff OLD_RUN NEW_RUN`, `memaudit report RUN_DIR`, ...; --help's usage line showed
    # {old_run} {new_run} (and diff's own help text says NEW_RUN), and a missing one was "Missing argument 'old_run'"
    from typer.testing import CliRunner

    from audit.cli import app

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and f"Missing argument '{name}'" in res.output, res.output
    usage = next(line for line in CliRunner().invoke(app, [args[0], "--help"]).output.splitlines() if "Usage:" in line)
    assert name in usage, usage


def test_run_usage_names_its_inputs_as_the_readme():
    from typer.testing import CliRunner

    from audit.cli import app

    usage = next(line for line in CliRunner().invoke(app, ["run", "--help"]).output.splitlines() if "Usage:" in line)
    assert "[INPUT]..." in usage and "INPUT..." in _synopsis("README.md", "memaudit run INPUT...")


def _schema_fields(name: str) -> list[str]:
    import json

    return [f["name"] for f in json.loads((Path(__file__).parent.parent / "schemas" / f"{name}.json").read_text())["fields"]]


def test_readme_risk_table_lists_every_column_of_the_schema_in_order():
    # README's risk.parquet table is the reader's list of columns: each schema column once, in the file's order
    import re

    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| column | meaning |"):].split("\n\n")[0].splitlines()[2:]
    names = []
    for row in table:
        first = row.split(" | ")[0]
        if "--keep-columns" in first:
            continue
        for name in re.findall(r"`([a-z_]+(?:NN)?)`", first):
            names += [name.replace("NN", f"{i:02d}") for i in range(16)] if name.endswith("NN") else [name]
    fields = _schema_fields("risk")
    per_layer = [f for f in fields if re.search(r"_l\d\d$", f)]
    # the table lists the per-layer columns as one row (entropy then BOS mass); compare as sets there
    assert [n for n in names if n not in per_layer] == [f for f in fields if f not in per_layer]
    assert sorted(n for n in names if n in per_layer) == sorted(per_layer)


def test_docs_list_the_rejects_and_generations_columns_of_their_schemas():
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    said = readme[readme.index("`rejects.parquet` has "):readme.index("`manifest.json` has the inputs")]
    columns = [n for n in re.findall(r"`([a-z_]+)`", said) if n in _schema_fields("rejects")]
    assert list(dict.fromkeys(columns)) == _schema_fields("rejects")  # each, in the file's order
    mitigation = (Path(__file__).parent.parent / "docs" / "mitigation.md").read_text(encoding="utf-8")
    listed = re.search(r"\(schema `schemas/generations.json`: ([a-z_, \n]+)\)", mitigation).group(1)
    assert [n.strip() for n in listed.split(",")] == _schema_fields("generations")


@pytest.mark.parametrize("line, key, why", [
    ("progress = false", "progress",
     "the progress display depends on the terminal; give --progress or --no-progress on the command line"),
    ("dry-run = true", "dry-run", "a check is asked for on the command line; give --dry-run there"),
])
def test_config_says_why_progress_and_dry_run_are_not_read_from_it(tmp_path, line, key, why):
    # docs/audits.md: `--config` "reads any option of `run` but `--progress`, which depends on the terminal, and
    # `--dry-run`, which is the command line's". A config holding one was refused as an "unknown option" followed
    # by the list of 31 options, which made a user look for a misspelling
    from audit.config import load_config_file
    from audit.errors import ConfigError

    path = tmp_path / "c.toml"
    path.write_text(f'{line}\ninputs = ["x.txt"]\n')
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    assert str(err.value) == f"--config {path}: '{key}' is not read from a config file: {why}"


@pytest.mark.parametrize("extra, line", [
    (["--workers", "2"], "memaudit: --workers applies to --engine ray only; ignored with --engine local"),
    (["--workers", "2", "--address", "auto"],
     "memaudit: --workers and --address apply to --engine ray only; ignored with --engine local"),
])
def test_dry_run_gives_the_runs_warning_for_ray_options_with_the_local_engine(tmp_path, extra, line):
    # README: "`--dry-run` checks the options and plans the inputs as the run would (the same refusals and
    # warnings)". `memaudit run two.txt --workers 2` says the option is ignored with the local engine; the same
    # command with --dry-run said nothing, so a job's check did not show that its --workers does nothing
    from typer.testing import CliRunner

    from audit.cli import app

    src = tmp_path / "two.txt"
    src.write_text("a red cat\na blue dog\n")
    res = CliRunner().invoke(app, ["run", str(src), "--out", str(tmp_path / "o"), *extra, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines().count(line) == 1, res.stderr
    assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(app, ["run", str(src), "--out", str(tmp_path / "o"), "--dry-run"])
    assert "engine ray only" not in res.output


@pytest.mark.parametrize("c1", [0.0, 150.0, float("inf")])
def test_generate_names_a_bad_c1_once(tmp_path, c1):
    # `memaudit generate ... --c1 0` said "--c1 0: must be finite, > 0 and at most 100 (1.25 in the paper's
    # script), got 0.0": the value twice, in two spellings
    from audit.cli.generate import GenerateError, run_generate

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    with pytest.raises(GenerateError) as err:
        run_generate(prompts, str(tmp_path / "no-such-model"), tmp_path / "out", c1=c1)
    assert str(err.value) == f"--c1 {c1:g}: must be finite, > 0 and at most 100 (1.25 in the paper's script)"


def test_two_runs_started_in_the_same_second_without_out_get_two_folders(tmp_path, monkeypatch, tiny_model_dir):
    # README: "--out, default ./memaudit-runs/<UTC time>/, <UTC time>-2/ ... for a second run started within the
    # same second". Two `memaudit run two.txt` started together both named memaudit-runs/<time> (the folder is made
    # only after the model loads), and the second was refused: "--out memaudit-runs/<time> is being written by
    # another memaudit run right now" (exit 75). Here the other run takes the folder (and holds its lock) between
    # this run naming it and locking it
    import audit
    import audit.runner as runner
    from audit.pipeline import out_lock

    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.txt").write_text("a red cat\na blue dog\n")
    import contextlib

    named = []
    real_check = runner.check_not_busy
    other = contextlib.ExitStack()

    def other_run_takes_it(out):
        real_check(out)  # free when this run looks (before its model loads) ...
        named.append(out)
        other.enter_context(out_lock(out))  # ... then the other run takes it, and holds its lock while this one goes on

    monkeypatch.setattr(runner, "check_not_busy", other_run_takes_it)
    with other:
        out, manifest = audit.run("two.txt", model=str(tiny_model_dir), device="cpu")
    assert named[0].parent == Path("memaudit-runs") and named[0].name.count("-") == 1  # <date>-<time>
    assert out == Path("memaudit-runs") / f"{named[0].name}-2"
    assert manifest["counts"]["scored"] == 2 and (tmp_path / out / "risk.parquet").exists()
    assert sorted(p.name for p in (tmp_path / "memaudit-runs").iterdir()) == [named[0].name, f"{named[0].name}-2"]


def test_a_same_second_run_never_resumes_the_other_runs_default_folder(tmp_path, monkeypatch, tiny_model_dir):
    # the same two runs, when the other one has finished its run in the folder before this one locks it (a short
    # input): this one "resumed" it and handed back the other run's outputs as its own ("1 of 1 units already
    # done", both printing the one folder). Here the other run is a whole audit.run into that folder
    import audit
    import audit.runner as runner

    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.txt").write_text("a red cat\na blue dog\n")
    named = []
    real_check = runner.check_not_busy

    def other_run_finishes_in_it(out):
        real_check(out)
        named.append(out)
        monkeypatch.setattr(runner, "check_not_busy", real_check)
        audit.run("two.txt", out=str(out), model=str(tiny_model_dir), device="cpu")  # the same command, done

    monkeypatch.setattr(runner, "check_not_busy", other_run_finishes_in_it)
    logs = []
    out, manifest = audit.run("two.txt", model=str(tiny_model_dir), device="cpu", log=logs.append)
    assert out == Path("memaudit-runs") / f"{named[0].name}-2"
    assert not any("resuming" in line for line in logs) and manifest["rows_this_run"] == 2


def test_architecture_names_every_field_of_scorer_spec_in_order():
    # docs/architecture.md, "How to add a scorer", lists ScorerSpec's fields for register(...); it left out
    # min_steps (guidance_geometry's 3: --steps 2 failed every prompt), which a new scorer reading a late timestep
    # needs
    import dataclasses
    import re

    from audit.scorers.registry import ScorerSpec

    text = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    listed = re.search(r"`register\(ScorerSpec\(([^)]*)\)\)`", text).group(1)
    assert [n.strip() for n in listed.split(",")] == [f.name for f in dataclasses.fields(ScorerSpec)]


def test_report_by_a_column_whose_name_holds_a_comma_says_to_quote_it(tmp_path, tiny_model_dir):
    # README: --keep-columns and --by take "a name holding a comma in double quotes: 'id,"a,b"'". A user who kept
    # such a column and wrote `memaudit report RUN --by a,b` got "--by a: risk.parquet has no such column" with a
    # column list ending "..., id, a,b": nothing said that the name was split at its comma
    from typer.testing import CliRunner

    from audit.cli import app

    src = tmp_path / "kc.csv"
    src.write_text('prompt,id,"a,b"\na red cat,007,x1\nblue dog,008,x2\n')
    run = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--device", "cpu",
                                   "--keep-columns", 'id,"a,b"', "--out", str(tmp_path / "r")])
    assert run.exit_code == 0, run.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "r"), "--by", "a,b"])
    assert res.exit_code == 2
    assert res.output.endswith("(carry input columns with `memaudit run --keep-columns`); the column 'a,b' holds a "
                               "comma: name it in double quotes, --by '\"a,b\"'\n"), res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "r"), "--by", '"a,b"', "--format", "json"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "r"), "--by", "nope"])  # no comma column involved
    assert res.exit_code == 2 and "holds a comma" not in res.output


def test_keep_columns_split_at_a_names_comma_says_to_quote_it(tmp_path):
    # the same for `memaudit run kc.csv --keep-columns a,b`: "no input has the --keep-columns column(s) 'a', 'b';
    # columns found: a,b, id, prompt." and nothing more (seen with --dry-run: nothing loaded)
    from typer.testing import CliRunner

    from audit.cli import app

    src = tmp_path / "kc.csv"
    src.write_text('prompt,id,"a,b"\na red cat,007,x1\n')
    res = CliRunner().invoke(app, ["run", str(src), "--keep-columns", "a,b", "--dry-run"])
    assert res.exit_code == 2
    assert res.output == ("memaudit: error: no input has the --keep-columns column(s) 'a', 'b'; columns found: a,b, "
                          "id, prompt. The column 'a,b' holds a comma: name it in double quotes, --keep-columns "
                          "'\"a,b\"'.\n"), res.output
    res = CliRunner().invoke(app, ["run", str(src), "--keep-columns", 'id,"a,b"', "--dry-run"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("name, what, kind", [
    ("README.md", "a Markdown report", "report"), ("page.html", "an HTML report", "report"),
    ("notes.md", "a Markdown diff", "diff"),
])
def test_output_never_overwrites_a_markdown_or_html_file_memaudit_did_not_write(tmp_path, name, what, kind):
    # docs/audits.md: "an existing JSON file that is not a memaudit report is not overwritten"; a Markdown or HTML
    # one was: `memaudit report RUN -o README.md` replaced the user's README with the report
    from audit.cli.report import check_output_file
    from audit.errors import RunError

    suffixes = (".html", ".htm") if name.endswith(".html") else (".md", ".markdown")
    mine = tmp_path / name
    mine.write_text("# my project\n\nnotes\n")
    with pytest.raises(RunError) as err:
        check_output_file(mine, suffixes, what)
    assert str(err.value) == f"--output {mine} exists and is not a memaudit {kind}: not overwritten"
    assert mine.read_text() == "# my project\n\nnotes\n"
    ours = {"a Markdown report": "# memaudit report: run1\n", "an HTML report":
            "<!doctype html>\n<html><head><title>memaudit report: run1</title>", "a Markdown diff": "# memaudit diff\n"}
    mine.write_text(ours[what])  # one memaudit wrote: overwritten, as is an empty file or a new one
    check_output_file(mine, suffixes, what)
    mine.write_text("")
    check_output_file(mine, suffixes, what)
    check_output_file(tmp_path / f"new{mine.suffix}", suffixes, what)


@pytest.mark.parametrize("doc, head, path", [
    ("README.md", "memaudit eval LABELLED", ("eval",)),
    ("docs/audits.md", "memaudit calibrate REFERENCE_RUN --fpr", ("calibrate",)),
    ("docs/mitigation.md", "memaudit generate PROMPTS --model M --out DIR [", ("generate",)),
    ("docs/mitigation.md", "memaudit lab mitigation [", ("lab", "mitigation")),
])
def test_a_value_written_in_a_synopsis_is_the_options_default(doc, head, path):
    # a synopsis that writes a value rather than a placeholder (`[--seed 0]`, `[--c1 1.25]`, `--fpr 0.01`) shows
    # the default: each such value equals the option's default in the command
    import re

    synopsis = _synopsis(doc, head).split("#")[0]
    params = {o: p for p in _command(*path).params for o in p.opts}
    shown = [(flag, value) for flag, value in re.findall(r"(--?[a-z][a-z0-9-]*) ([a-z0-9_.]+)(?=[\]\s]|$)", synopsis)
             if flag in params]
    assert shown, synopsis
    for flag, value in shown:
        default = params[flag].default
        assert default is not None and value in (str(default), f"{default:g}" if isinstance(default, float) else ""), \
            (flag, value, default)


@pytest.mark.parametrize("doc, phrase, flag, default", [
    ("README.md", "(`--unit-rows`, 20,000 rows by default)", "--unit-rows", 20000),
    ("README.md", "`--max-error-fraction` (default 0.01)", "--max-error-fraction", 0.01),
    ("docs/ray.md", "`--stall-timeout SECONDS` (default 900,", "--stall-timeout", 900.0),
    ("docs/ray.md", "(`--unit-rows`, default\n20,000 rows)", "--unit-rows", 20000),
])
def test_run_defaults_said_in_prose_are_the_run_commands(doc, phrase, flag, default):
    text = (Path(__file__).parent.parent / doc).read_text(encoding="utf-8")
    assert phrase in text
    (param,) = [p for p in _command("run").params if flag in p.opts]
    assert param.default == default


def test_every_option_of_every_command_is_documented():
    # the task of the docs: every option the CLI has is named somewhere in README.md or docs/ (memaudit --version
    # was in none of them); --help and the --no- halves of on/off flags aside
    import re

    root = Path(__file__).parent.parent
    text = "\n".join(p.read_text(encoding="utf-8") for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))

    def walk(cmd, path):
        for p in cmd.params:
            if p.param_type_name == "option" and p.name != "help":  # (typer vendors click: no click classes)
                yield path, [o for o in p.opts if o.startswith("--")]
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, (*path, name))

    undocumented = [(" ".join(path), opts) for path, opts in walk(_command(), ("memaudit",)) if not named & set(opts)]
    assert undocumented == []


@pytest.mark.parametrize("args", [
    ["run", "{two}", "--model", "", "--dry-run"], ["run", "{two}", "--model", " ", "--dry-run"],
    ["layers", "--model", ""], ["generate", "{two}", "--model", "", "--out", "{tmp}/g"],
    # lab eval and lab mitigation took an empty --model for the bundled lab model, evaluating that in silence
    ["lab", "eval", "--model", ""], ["lab", "mitigation", "--model", "", "--limit", "2"],
])
def test_an_empty_model_is_refused_not_read_as_the_working_folder(tmp_path, monkeypatch, args):
    # `memaudit run two.txt --model "$MODEL"` with MODEL unset (a job script) said "--model /srv/audits: no
    # model_index.json, so not a diffusers pipeline folder": the empty name was read as the working folder
    from typer.testing import CliRunner

    from audit.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.txt").write_text("a red cat\na blue dog\n")
    res = CliRunner().invoke(app, [a.format(two=tmp_path / "two.txt", tmp=tmp_path) for a in args])
    assert res.exit_code == 2
    said = ("give a Stable Diffusion 1.x/2.x folder with vae/ or its hub id (generate has no default model)"
            if args[0] == "generate" else  # (uhelp: "leave it out" was wrong there: --model is required, lab refused)
            "give a hub id or a model folder (or leave it out for the bundled lab model)")
    assert res.output == f"memaudit: error: --model is empty: {said}\n", res.output
    assert not (tmp_path / "g").exists()
