"""The ``memaudit`` command line (typer + rich): the ``run`` and ``layers`` commands, and the mounting of
the others (:mod:`audit.cli.report`, the lab). Owns argument parsing and the one-line messages only; the
work is done by :mod:`audit.runner` and the modules behind it. Must not import torch, diffusers, ray,
polars or any scoring module at import time (commands import them inside), so ``memaudit --help`` stays
instant."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from audit.cli.common import _STATE, _split, echo_path, fail, guarded, say  # noqa: F401 (tests reach _STATE here)
from audit.gates import INPUT_FAILURES, SCORING_FAILURES  # the reasons --max-error-fraction counts, for its --help
from audit.text import counted, fraction_text, share, threshold_text, visible

# `memaudit` and `memaudit lab` alone print their help and exit 2: click's (8.2 and later) exit for a command line
# that names no command, a usage error, which a script or CI step must not take for a finished audit; --help exits 0
NO_COMMAND_EPILOG = ("Without a command this help is printed (stdout) and the exit code is 2, a usage error as for "
                     "any bad command line; --help exits 0.")

app = typer.Typer(
    name="memaudit",
    help="Score text-to-image prompts for training-image memorization risk: the cross-attention entropy "
         "at the first denoising step (Ren et al., ECCV 2024), in bulk, on one machine or a Ray cluster.",
    no_args_is_help=True,
    epilog=NO_COMMAND_EPILOG,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},  # every command's (inherited): `-h` was "No such option"
)


def _flags_show_no_type() -> None:
    """typer 0.29's help writes a type beside every option, ``<bool>`` beside each flag too (``--dry-run <bool>``,
    ``--help <bool>``), which reads as an option that takes a value (``--dry-run true``): a flag's row shows none,
    as click's own help does. Options that take a value keep theirs (``<int>``, ``<path>``). A typer without
    ``TyperOption.display_type_rich`` is left as it is."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "memaudit_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag and self.metavar is None else shown(self, ctx)

    display_type_rich.memaudit_flags = True
    TyperOption.display_type_rich = display_type_rich


_flags_show_no_type()


MIN_HELP_CELLS = 24  # a help panel is typer's table only where its help column keeps this many cells (and its names)


def _help_table_fits(params, ctx, width: int) -> bool:
    """Whether typer's table for a help panel of ``params`` (options or arguments), ``width`` columns wide, shows
    every option's names whole beside a help column of at least :data:`MIN_HELP_CELLS` cells. Its name columns (long
    names, short names, the ``--no-`` names, the type) each take their widest cell plus 2 (padding), the panel 4
    (borders and edges); rich, fitting a table, narrows its widest columns first, so a name is cut once the help
    column would be narrower than the widest name column (measured on ``run --help``: at 70 columns
    ``--skip-bad-fil…``, ``--no-skip-bad-…``, ``--prepare-threa…``; at 60 ``--max-error-fract…``; at 80 all whole)."""
    from rich.cells import cell_len
    from typer.core import TyperArgument

    columns = [[], [], [], []]
    for param in params:
        if isinstance(param, TyperArgument):
            columns[1].append(param.display_name_raw + "...")
            continue
        opts = [*param.opts]
        columns[0].append(",".join(o for o in opts if o.startswith("--")))
        columns[1].append(",".join(o for o in opts if not o.startswith("--")))
        columns[2].append(",".join(o for o in param.secondary_opts if o.startswith("--")))
        columns[3].append(",".join(o for o in param.secondary_opts if not o.startswith("--")))
    types = [str(param.display_type_rich(ctx=ctx) or "") if hasattr(param, "display_type_rich") else ""
             for param in params]
    widths = [max(map(cell_len, cells), default=0) for cells in (*columns, types)]
    required = 2 if any(getattr(param, "required", False) for param in params) else 0
    help_cells = width - 4 - required - sum(w + 2 for w in widths if w)
    return help_cells >= max(MIN_HELP_CELLS, *widths)


def _narrow_help_lists_options() -> None:
    """typer 0.29 prints each help panel as a table of up to six columns (names, short names, type, help) whatever the
    width: at 40 columns the names were cut (``--noise…`` for both ``--noise-draws`` and ``--noise-generator``,
    ``--max-e…``, ``--prom…``), the help's words too (``attentio…``), the help running down a column of 9 cells; at
    70, ``--skip-bad-fil…``. Where a panel's table would cut a name (:func:`_help_table_fits`), every panel of the
    command (one layout a help) is its title and one block an option: its names and type whole on a line, its help
    indented under it. Where every panel's table fits, the help is typer's. A typer without
    ``rich_utils._print_options_panel`` is left as it is."""
    from typer import rich_utils

    built = getattr(rich_utils, "_print_options_panel", None)
    if built is None or getattr(built, "memaudit_narrow", False):
        return

    def _print_options_panel(*, name, params, ctx, markup_mode, console):
        from rich.padding import Padding
        from rich.text import Text
        from typer.core import TyperArgument

        panels = {}  # every panel of the command, as typer groups them: one layout for the whole help
        for param in ctx.command.get_params(ctx):
            if not getattr(param, "hidden", False):
                panels.setdefault((type(param).__name__, getattr(param, "rich_help_panel", None)), []).append(param)
        if not params or all(_help_table_fits(group, ctx, console.width) for group in panels.values()):
            return built(name=name, params=params, ctx=ctx, markup_mode=markup_mode, console=console)
        console.print(Text(f"{name}:", style="bold"))
        for param in params:
            if isinstance(param, TyperArgument):
                names = [param.display_name_raw + ("..." if param.metavar is None and param.nargs != 1 else "")]
            else:
                names = [*param.opts, *param.secondary_opts]
            head = Text("  " + ", ".join(names), style="bold cyan", overflow="fold")
            shown = param.display_type_rich(ctx=ctx) if hasattr(param, "display_type_rich") else None
            if shown:
                head.append(f" {shown}", style="yellow")
            if getattr(param, "required", False):
                head.append(" (required)", style="red")
            console.print(head)
            console.print(Padding(rich_utils._get_parameter_help(param=param, ctx=ctx, markup_mode=markup_mode),
                                  (0, 0, 0, 4)))

    _print_options_panel.memaudit_narrow = True
    rich_utils._print_options_panel = _print_options_panel


_narrow_help_lists_options()


def _print_version(value: bool) -> None:
    """``--version``: print memaudit's version and its build (:func:`audit.build.memaudit_build`) and exit 0 (eager:
    before the command's own options are read). The build is what run folders, manifests and calibrations record,
    and what a rerun's note names ("started by another memaudit (build X; this is build Y)"): the version alone
    stays one number across many changes, so it could not tell the user which build they run."""
    if value:
        from audit import __version__
        from audit.build import memaudit_build

        typer.echo(f"memaudit {__version__} (build {memaudit_build()})")
        raise typer.Exit(0)


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print memaudit's version and build (the build run folders record) and exit."),
) -> None:
    """Options of every command (before the command's name): ``--debug``; ``--version``."""
    _STATE["debug"] = debug
    if debug:  # the Ray engine then forwards its actors' output (their tracebacks) to this terminal
        os.environ["MEMAUDIT_RAY_LOGS"] = "1"


def _int_or_auto(value: str, flag: str) -> int | str:
    """An integer or ``auto`` (``--batch-size``, ``--prepare-threads``; ranges are checked with the other options,
    :func:`audit.config.validate_config`); exit 2 otherwise."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        fail(f"{flag} {value}: give an integer or auto")


# the panels of `memaudit run --help` (typer groups options by panel, in the order the panels first appear)
_score_option = functools.partial(typer.Option, rich_help_panel="Model and score")
_input_option = functools.partial(typer.Option, rich_help_panel="Inputs")
_output_option = functools.partial(typer.Option, rich_help_panel="Outputs and exit codes")
_scale_option = functools.partial(typer.Option, rich_help_panel="Speed and scale")


# `memaudit run --help`'s text: one line per output and per exit code. (typer keeps a docstring's line breaks after
# its first paragraph, so the wrapped docstring this was showed items cut mid-sentence at every terminal width.)
RUN_HELP = "\n".join([
    "Score prompts and write a ranked risk table.",
    "",
    "Outputs in the run folder:",
    "risk.parquet: one row per scored input row, rank 1 = highest risk;",
    "rejects.parquet: every row not scored, with the reason;",
    "manifest.json: counts that reconcile, model identity, score configuration, versions, throughput.",
    "",
    "Exit codes:",
    "0 done;",
    "2 an error said in one line (options, inputs, model, a unit that kept failing, a full disk);",
    "3 more rows flagged than --fail-on-flagged (outputs written);",
    "4 too many rows failed to score or could not be read as prompts, rows were read and none was scored, or every "
    "input file with rows was skipped as unreadable (outputs written; inputs with no rows at all only warn, exit 0);",
    "130, 143, 129 interrupted, terminated, hung up (SIGHUP: a closed terminal; rerun with the --out the message "
    "names to resume);",
    "141 the reader of stdout went away;",
    "75 --out is being written by another memaudit run right now (a scheduler's overlap: nothing done, retry later);",
    "1 anything unexpected (--debug shows the traceback).",
])


# --config's help: what a file holds, said in full (it pointed to pipelines/, which a wheel install does not have);
# the [run] table's brackets escaped from rich markup. tests/test_cli_api_mutants.py loads its example.
CONFIG_EXAMPLE = 'inputs = ["logs/"], model = "lab", out = "runs/{date}", cache = "score-cache", batch_size = 64'
CONFIG_HELP = ("TOML file holding any of these options but --progress and --dry-run, by long name (batch_size or "
               "batch-size), at the top level or in a \\[run] table, one a line: " + CONFIG_EXAMPLE.replace(", ", "; ")
               + ". {date} (UTC today) and {config_dir} (the file's folder) expand in its strings; other relative "
               "paths are from the working folder. Flags given here override it.")


@app.command("run", help=RUN_HELP)
def run_cmd(
    ctx: typer.Context,
    inputs: Optional[list[str]] = typer.Argument(None, metavar="INPUT", help="Prompt tables: Parquet files, folders or globs, local "
                                                 "or any fsspec URL (s3://, gs://, https://...); also .jsonl, .csv, "
                                                 ".txt. May come from --config instead."),
    model: Optional[str] = _score_option(None, "--model", "-m", help="Hub id or local diffusers folder, or "
                                         "'lab': the bundled lab model (the default)."),
    scorer: str = _score_option("attention_entropy", "--scorer", help="attention_entropy (Ren et al. 2024's first-step "
                                "cross-attention entropy, one partial forward), noise_magnitude (Wen et al. 2024, two "
                                "full forwards), guidance_geometry (Asthana & Belagiannis 2026, forwards at several "
                                "timesteps) or attention_entropy_late (Ren et al.'s D, a whole 50-step sampling). "
                                "`memaudit eval` compares them on labelled prompts."),
    layers: Optional[list[str]] = _score_option(None, "--layers", help="Cross-attention layers by module path, "
                                                "comma separated. Default: the model's own default layer, "
                                                "marked by `memaudit layers --model M` (for SD v1.x the paper's "
                                                "4th cross-attention layer)."),
    steps: int = _score_option(50, "--steps", help="Scheduler steps: the first timestep of a sampling with this "
                               "many steps is scored (t0 = 981 at 50 for SD 1.x). A score setting: a calibration for "
                               "`memaudit generate --mitigate flagged --steps N` is made from a run at --steps N."),
    seed: int = _score_option(0, "--seed", help="Run seed, mixed with each prompt's hash to seed its noise."),
    noise_draws: int = _score_option(1, "--noise-draws", help="Seeded first-step noise draws per prompt "
                                                              "(attention averaged over them)."),
    noise_generator: str = _score_option("mt19937", "--noise-generator", help="What draws each prompt's seeded "
                                         "noise: mt19937 (torch's CPU generator, on the host; tens of microseconds "
                                         "a prompt at SD 1.4's latent) or philox (Philox4x32-10 on the scoring device, the "
                                         "whole batch at once: nothing per prompt on the host; for GPUs). The "
                                         "two give different noise, so different scores; the run records which."),
    dtype: str = _score_option("auto", "--dtype", help="auto (bfloat16 on capable GPUs, float32 on CPU), float32, "
                                                       "float16, bfloat16. Attention is float32 regardless."),
    confirm: Optional[str] = _score_option(None, "--confirm", help="Two-stage scoring: re-score the top of the "
                                           "ranking with this scorer; confirmed prompts rank first by its score "
                                           "(--confirm '' runs without the --config file's)."),
    confirm_top: Optional[str] = _score_option(None, "--confirm-top", help="With --confirm: a fraction of the "
                                               "distinct prompts (0.01 or 1%), rounded up, so any fraction above 0 "
                                               "confirms at least one prompt, or a count (1000): a whole number is a "
                                               "count, so 1 is one prompt and 1.0 or 100% all of them."),
    prompt_column: list[str] = _input_option(["prompt"], "--prompt-column", help="Column holding the prompt text. "
                                             "Give it again for files that name it otherwise (logs whose writer "
                                             "renamed it: --prompt-column prompt --prompt-column text): each row "
                                             "reads the first that holds a value in it."),
    id_column: Optional[str] = _input_option(None, "--id-column", help="Column giving prompt_id. Default: "
                                             "'<source>#<row>'."),
    keep_columns: Optional[list[str]] = _input_option(None, "--keep-columns", help="Input columns to carry into "
                                                      "the outputs (as text); repeat or comma separate (a name "
                                                      "holding a comma in double quotes: 'id,\"a,b\"')."),
    limit: Optional[int] = _input_option(None, "--limit", help="Read only the first N rows."),
    skip_bad_files: bool = _input_option(False, "--skip-bad-files/--no-skip-bad-files", help="Skip unreadable "
                                         "files (listed in the manifest) instead of failing."),
    config: Optional[Path] = _input_option(None, "--config", help=CONFIG_HELP),
    out: Optional[str] = _output_option(None, "--out", "-o", help="Run folder. Default: ./memaudit-runs/<time>. "
                                         "Rerunning on the same folder resumes it. {date} (UTC YYYY-MM-DD) and "
                                         "{time} (UTC HHMMSS) expand: --out 'runs/{date}' gives scheduled runs "
                                         "one folder each (another brace is refused; {{ and }} for a brace)."),
    calibration: Optional[str] = _output_option(None, "--calibration", help="calibration.json from `memaudit "
                                                "calibrate`: adds flagged and risk_percentile to risk.parquet "
                                                "(--calibration '' runs without the --config file's)."),
    fail_on_flagged: Optional[int] = _output_option(None, "--fail-on-flagged", help="Exit with code 3 when more than "
                                                    "N rows are flagged (a prompt on 3 rows counts 3; after writing all outputs), "
                                                    "and with 4 when no row was read: a gate over no prompts does not pass."),
    max_error_fraction: float = _output_option(0.01, "--max-error-fraction", help="Exit with code 4 (after writing "
                                               "all outputs) when more than this fraction of the rows reaching the "
                                               f"model could not be scored ({', '.join(SCORING_FAILURES)}), or of the "
                                               "rows read could not be read as prompts "
                                               f"({', '.join(INPUT_FAILURES)}: a file or JSON line without the prompt "
                                               "or --id-column, text not UTF-8, a ragged CSV record, a line that is "
                                               "not a JSON object, a prompt that is not text)."),
    cache: Optional[str] = _output_option(None, "--cache", help="Score cache folder: prompts scored before (same "
                                           "model and score configuration) are read, not scored again (--cache '' "
                                           "runs without the --config file's)."),
    device: str = _scale_option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: str = _scale_option("auto", "--batch-size", "-b", help="Prompts per forward pass (a short input: its "
                                    "rows, rounded up to 8), or auto: the largest batch that fits free GPU memory "
                                    "(32 on CPU). Out of memory halves it."),
    prepare_threads: str = _scale_option("auto", "--prepare-threads", help="Threads that tokenize and draw the "
                                         "seeded noise ahead of the device (0: in the scoring thread), or auto: 1 "
                                         "on CPU, else one per host core but one, at most 4. Scores do not "
                                         "depend on it."),
    compile: bool = _scale_option(False, "--compile/--no-compile", help="torch.compile the text encoder and "
                                  "UNet: a slow first batch (compilation), then faster batches on GPU (1.26x on "
                                  "an H200 after 42 s of compiling: worth it for runs of several hundred thousand "
                                  "prompts); slower on CPU. Scores agree with eager ones to float32 rounding."),
    engine: str = _scale_option("local", "--engine", help="local (this process) or ray."),
    workers: Optional[int] = _scale_option(None, "--workers", help="Ray engine: scoring actors (default: one "
                                           "per GPU, or the CPUs Ray sees)."),
    address: Optional[str] = _scale_option(None, "--address", help="Ray engine: cluster address ('auto', "
                                           "'ray://host:10001'); default: start a local Ray."),
    unit_rows: int = _scale_option(20_000, "--unit-rows", help="Rows per unit of work (the resume granularity)."),
    retry_failed: bool = _scale_option(False, "--retry-failed/--no-retry-failed", help="On a rerun of an existing "
                                       "--out: score again the finished units holding rows the model failed to "
                                       "score (scoring_error, out_of_memory, nonfinite_attention), for instance "
                                       "after an out-of-memory on a busy GPU; and with --confirm, the "
                                       "confirmed prompts whose confirming score was non-finite. Without it "
                                       "those rows stay rejected (or unconfirmed), and the rerun says how many."),
    stall_timeout: float = _scale_option(900.0, "--stall-timeout", help="Fail the run when no prompt is scored "
                                         "for this many seconds (0: never)."),
    dry_run: bool = _input_option(False, "--dry-run", help="Check the options and plan the inputs, then say what "
                                  "a run would read (files, rows, units, the prompt columns each file has, rows "
                                  "without it), the model's family and whether --out is new or resumes: no "
                                  "weights are read, nothing is scored or written. Exit 2 where the run would be "
                                  "refused."),
    progress: Optional[bool] = _scale_option(None, "--progress/--no-progress", help="Progress bar (default: "
                                             "on a terminal; else a plain progress line every minute)."),
) -> None:
    """Score prompts and write a ranked risk table (``--help``: :data:`RUN_HELP`)."""
    from audit.config import run_config

    cleared: dict = {}  # the --config file's values that --cache '' (--calibration '', --confirm '') dropped
    cfg = guarded(lambda: run_config(ctx, config, dict(
        inputs=tuple(inputs or ()), model=model, out=out,
        prompt_column=prompt_column[0] if len(prompt_column) == 1 else tuple(prompt_column),
        id_column=id_column, batch_size=_int_or_auto(batch_size, "--batch-size"), device=device, dtype=dtype,
        layers=_split(layers, "--layers") or None,
        noise_draws=noise_draws, seed=seed, steps=steps, noise_generator=noise_generator, limit=limit, scorer=scorer, unit_rows=unit_rows,
        keep_columns=_split(keep_columns, "--keep-columns"), skip_bad_files=skip_bad_files, engine=engine,
        workers=workers,
        address=address, stall_timeout=stall_timeout or None,
        calibration=calibration or None, fail_on_flagged=fail_on_flagged,
        cache=cache or None, compile=compile, confirm=confirm or None, confirm_top=confirm_top or None,
        max_error_fraction=max_error_fraction, prepare_threads=_int_or_auto(prepare_threads, "--prepare-threads"),
        retry_failed=retry_failed,
    ), cleared))
    if dry_run:
        from audit.runner import dry_run as plan_only

        summary = guarded(lambda: plan_only(cfg, log=say)) | {"cleared": cleared}
        for line in dry_run_lines(summary, cfg.prompt_column):
            typer.echo(visible(line))
        if summary["out_state"] == "refused":
            fail("the run would be refused (above)", 2)
        if summary["out_state"] == "busy":  # as the run exits: another run writes the folder now, retry later
            fail("the run would be refused while the other run writes the folder (above)", 75)
        return
    for line in cleared_lines(cleared):  # as the dry run says them: a dropped value is said, not silent
        say(f"memaudit: {line}")

    def go():
        from audit.calibrate import flagged_gate
        from audit.faults import terminate_as_interrupt
        from audit.gates import nothing_scored, run_failure
        from audit.runner import execute

        terminate_as_interrupt()

        out_dir, manifest = execute(cfg, progress=progress)

        def tell():  # the summary lines (stderr); the run folder (stdout) follows them
            c = manifest["counts"]
            reasons = ", ".join(f"{k} {v:,}" for k, v in c["rejected_by_reason"].items()) or "none"
            this_run = manifest.get("rows_this_run", c["rows_read"])
            # rows/s counts the whole invocation (imports and model load included); with nothing read it says so
            wall = f"{manifest['wall_time_s']:.1f} s"
            if this_run:
                speed = f"{manifest['throughput_rows_per_s']:,.1f} rows/s in {wall}" + (
                    f" ({counted(this_run, 'row', ',')} read in this invocation, the rest resumed)"
                    if this_run != c["rows_read"] else "")
            else:
                speed = f"nothing left to score, every row resumed ({wall})" if c["rows_read"] else wall
            # thousands separated, as the progress line writes them (a log read "1,080" there and "1728" here)
            say(f"memaudit: {counted(c['rows_read'], 'row', ',')} read, {c['scored']:,} scored, "
                f"{c['rejected']:,} rejected "
                f"({reasons}), {counted(c['unique_prompts'], 'unique prompt', ',')}; model {manifest['model']['name']} "
                f"[{manifest['model']['fingerprint']}]; {speed}")
            if manifest.get("skipped_files"):
                say(skipped_line(manifest["skipped_files"]))
            if c.get("duplicate_ids"):
                typer.echo(f"memaudit: warning: {c['duplicate_ids']:,} scored rows share their --id-column value with "
                           "another row", err=True)
            if lost := c["rejected_by_reason"].get("unreadable_rows"):  # corrupt pages: rows known, not read
                typer.echo(f"memaudit: warning: {counted(lost, 'row')} could not be read (unreadable_rows: "
                           "a damaged part of an input file); rejects.parquet names each one's file, row and error",
                           err=True)
            if c.get("truncated"):
                typer.echo(f"memaudit: {counted(c['truncated'], 'scored row')} longer than the "
                           "text encoder's maximum, scored on the first tokens (the truncated column)", err=True)
            if c["rows_read"] == 0 and not nothing_scored(manifest):  # else the error below says why
                why = "--limit 0 reads no row" if cfg.limit == 0 else "the inputs hold no rows"
                typer.echo(f"memaudit: warning: {why}; nothing was scored", err=True)
            if c.get("flagged") is not None:
                typer.echo(f"memaudit: {counted(c['flagged'], 'row')} flagged "
                           f"(risk > {threshold_text(manifest['calibration']['threshold'])})", err=True)
            if "cache" in manifest:
                cache = manifest["cache"]
                without = (f"{counted(cache['units_without_cache'], 'unit')} scored without a cache"
                           if cache.get("units_without_cache") else "")
                if without and cache["units_without_cache"] >= manifest["units"]["total"]:
                    # no unit used it (a cache folder that could not be used: the warning above): "0 sent to the
                    # model" after a run that sent it every prompt read as if nothing had been scored
                    typer.echo(f"memaudit: cache not used: {without}", err=True)
                else:
                    # the run's counts, its resumed units' included: after "every row resumed", "180 sent to the
                    # model" read as if this invocation had scored them
                    when = ("" if this_run == c["rows_read"] else
                            " (over the whole run: nothing was sent in this invocation, every unit resumed)"
                            if not this_run else " (over the whole run, its resumed units included)")
                    # rows, as the counts above: hits + scored by the model = the rows scored (every unit cached)
                    typer.echo(f"memaudit: cache {counted(cache['hits'], 'row', ',')} hit, "
                               f"{counted(cache['scored'], 'row', ',')} scored by the model"
                               f"{'; ' + without if without else ''}{when}", err=True)

        from audit.faults import Terminated, disk_fix, disk_problem, termination_held

        unwritten = terminated = None
        try:
            # a scheduler's SIGTERM while the summary is printed is held until the run folder's line is on stdout
            # (it ended the summary before that line: a job reading `OUT=$(memaudit run ...)` got no folder), then
            # says the outputs are complete (exit 143)
            with termination_held():
                try:
                    tell()
                except OSError as exc:  # a log on a full disk (`>> /var/log/memaudit.log`): the outputs are
                    if disk_problem(exc) is None:  # complete, and a gate's exit 3 or 4 (said by fail, which ignores
                        raise  # a stderr it cannot write) must not become this exit 2
                    unwritten = exc
                finally:  # stdout, whatever became of the summary on stderr
                    echo_path(out_dir)
        except Terminated as exc:  # (it said "rerun with --out RUN to resume", or nothing at all, exit 143)
            terminated = exc
        except OSError as exc:  # stdout on a full disk: as for the log
            if disk_problem(exc) is None:
                raise
            unwritten = unwritten or exc
        try:
            errors, gate = run_failure(cfg, out_dir, manifest), flagged_gate(cfg, manifest)
        except Terminated as exc:
            terminated, errors, gate = terminated or exc, None, None
        if errors:
            fail(errors, 4)
        if gate:  # as for a log on a full disk, a gate's exit code stands
            fail(gate, 3)
        if terminated is not None:
            fail(f"terminated ({terminated.signame}) after the run finished: its outputs are complete in {out_dir}",
                 terminated.exit_code)
        if unwritten is not None:
            what = disk_problem(unwritten)
            fail(f"{what} writing this command's output (standard output or error): the run finished, its outputs "
                 f"are complete in {out_dir}; {disk_fix(what)} where the output goes")

    guarded(go)


def cleared_lines(cleared: dict) -> list[str]:
    """One line per --config file value that an empty flag dropped (``--cache ''``, ``--calibration ''``,
    ``--confirm ''``; :func:`audit.config.build_run_config` fills ``cleared``), with what the run does without it:
    said, not silent, by ``run --dry-run`` (stdout) and at a run's start (stderr, after ``memaudit: ``)."""
    lines = []
    for name in ("cache", "calibration", "confirm"):
        if (dropped := cleared.get(name)) is not None:
            gate = cleared.get("fail_on_flagged") if name == "calibration" else None
            top = cleared.get("confirm_top") if name == "confirm" else None
            dropped = f"{dropped}, confirm_top {top}" if top is not None else dropped
            lines.append(f"{name}: none: --{name} '' runs without the --config file's ({dropped})" + {
                "cache": ": every prompt read is sent to the model",
                "calibration": ": no flagged or risk_percentile column" + (
                    f", and no --fail-on-flagged {gate} gate (it needs the calibration)" if gate is not None else ""),
                "confirm": ": one-stage scoring"}[name])
    return lines


def dry_run_lines(summary: dict, prompt_column: str | tuple[str, ...] = "prompt") -> list[str]:
    """``memaudit run --dry-run``'s lines (stdout) from :func:`audit.runner.dry_run`'s summary."""
    formats = ", ".join(f"{fmt} {n}" for fmt, n in sorted(summary["formats"].items()))
    lines = ["memaudit: dry run: no model loaded, nothing scored or written",
             f"inputs: {counted(summary['files'], 'file')}{f' ({formats})' if formats else ''}: "
             f"{counted(summary['rows'], 'row', ',')} in {counted(summary['units'], 'unit')} of work"
             + (f" (--limit: {counted(beyond, 'file')} with rows not reached, not read)"
                if (beyond := summary.get("files_beyond_limit")) else "")]
    if (split := summary.get("split")) and split.get("engine") != "local":  # the local engine: one worker
        units = (f"units of at most {split['unit_rows']:,} rows, scored in {counted(split['groups'], 'group')} of at "
                 f"most {split['group_rows']:,} rows")
        asked = split.get("workers_asked")  # more CPU actors than the cluster's CPUs: the run cuts them and says so
        cut = (f" (--workers {asked} cut to the cluster's CPUs, as the run cuts them)"
               if split["workers"] and asked and asked > split["workers"] else "")
        lines.append(f"--engine {split['engine']}: " + (
            f"{counted(split['workers'], 'worker')}{cut}; {units} (the split the run makes)" if split["workers"] else
            f"the run folder's {units} (cut when it started: the workers are counted when the run starts)"))
    parts = []
    for entry in summary["prompt_column"]:
        cols, n = entry["columns"], entry["files"]
        if len(cols) == 1:
            parts.append(f"{cols[0]!r} in {counted(n, 'file')}")
        elif cols:
            parts.append(f"{' and '.join(map(repr, cols))} in {counted(n, 'file')} (each row reads the first "
                         "holding a value)")
        else:
            none = f"no {prompt_column!r} column" if isinstance(prompt_column, str) else "none of the names"
            parts.append(f"{none} in {counted(n, 'file')} ({counted(summary['rows_without_prompt_column'], 'row', ',')}"
                         " to be rejected as missing_prompt_column)")
    if summary["jsonl_files"]:
        how = "judged line by line" if isinstance(prompt_column, str) else \
            "each line reads the first name holding a value"
        parts.append(f"{counted(summary['jsonl_files'], 'JSON-lines file')}: {how}")
    if summary.get("txt_files"):  # no columns: every line is read as a prompt (a README.txt in a log folder too)
        parts.append(f"{counted(summary['txt_files'], '.txt file')}: each line a prompt, no columns")
    if parts:
        lines.append("prompt column: " + "; ".join(parts))
    if ident := summary.get("id_column"):
        n, rows = ident["files_without"], ident["rows_without"]
        lines.append(f"id column {ident['name']!r}: " + (
            f"not in {counted(n, 'file')} with prompts ({counted(rows, 'row', ',')} to be rejected as "
            "missing_id_column)" if n else "in every file read with a prompt column")
            + ("; JSON lines: each line without it is rejected as missing_id_column" if summary["jsonl_files"] else ""))
    if summary["skipped_files"]:
        lines.append(skipped_line(summary["skipped_files"]).removeprefix("memaudit: warning: "))
    m = summary["model"]
    if m.get("hub_id"):
        unchecked = "; --layers is checked against it when the run starts" if m.get("layers_unchecked") else ""
        lines.append(f"model: {m['model']}: a hub id, not fetched in a dry run{unchecked}")
    else:
        lines.append(f"model: {m['model']}: family {m['family']}; its identity and weights are read when the run "
                     "starts")
    if cache := summary.get("cache"):
        n = cache["folders"]
        lines.append(f"cache: {cache['path']}: " + (
            "a new score cache, made when the run starts" if n is None else
            f"{counted(n, 'folder')} of earlier runs' scores (one per model and score configuration); the run reads "
            "its own, if any, once the model's identity is read"))
        if why := cache.get("read_only"):
            lines.append(f"cache: read-only ({why}): lookups only, its scores are served and the prompts it lacks are "
                         "sent to the model and not stored")
    if cal := summary.get("calibration"):
        fpr = f" at FPR {cal['fpr']:g}" if isinstance(cal.get("fpr"), (int, float)) else ""
        gate = (f"; --fail-on-flagged {cal['fail_on_flagged']}: exit 3 when more rows are flagged"
                if cal.get("fail_on_flagged") is not None else "")
        lines.append(f"calibration: {cal['path']}: flags risk > {threshold_text(cal['threshold'])}{fpr} (checked "
                     f"against the model when the run starts){gate}")
    lines += cleared_lines(summary.get("cleared", {}))
    if (limit := summary.get("exit_4_no_rows")) is not None and summary["out_state"] not in ("refused", "busy"):
        why = "--limit 0 reads no row" if summary.get("files_beyond_limit") else "the inputs hold no rows"
        lines.append(f"exit 4 expected: {why}, so --fail-on-flagged {limit} has no prompt to judge "
                     "(a gate over no prompts does not pass)")
    if (gate := summary.get("exit_4")) and summary["out_state"] not in ("refused", "busy") \
            and "unreadable_files" in gate:  # (refused: it never gets there)
        skipped = counted(gate["unreadable_files"], "file")
        lines.append(f"exit 4 expected: every input file with rows is unreadable ({skipped} skipped under "
                     "--skip-bad-files, above): nothing is read or scored; the run writes its outputs, then exits 4")
    elif gate and summary["out_state"] not in ("refused", "busy"):
        n, of = gate["rows"], gate["of"]
        pct = share(n, of, gate["max_error_fraction"])  # 1 of 3,000 rows over a limit of 0 is 0.03%, not 0.0%
        lines.append(f"exit 4 expected: {n:,} of {counted(of, 'row', ',')} ({pct}) to be rejected for want "
                     "of the prompt or id column, more than --max-error-fraction "
                     f"{fraction_text(gate['max_error_fraction'])}: the run "
                     "writes its outputs, then exits 4 (give the other name with --prompt-column, or raise "
                     "--max-error-fraction)")
    state, out, entries = summary["out_state"], summary["out"], summary.get("out_entries", 0)
    lines.append({"new": f"--out {out}: a new run folder",
                  "not_a_run": f"--out {out}: exists, not a run folder: the run's files go beside the "
                               f"{entries} other {'entry' if entries == 1 else 'entries'} there",
                  "resumes": f"--out {out}: holds this run, {summary.get('units_done', 0)} of "
                             f"{summary['units']} units committed: the same command resumes it (the model and score "
                             "configuration are checked when it starts)",
                  "refused": f"--out {out}: would be refused: {summary.get('refusal', '')}",
                  "busy": f"--out {out}: would be refused now (exit 75): {summary.get('refusal', '')}"}[state])
    if ro := summary.get("out_read_only"):  # a run folder on a read-only mount
        lines.append(f"--out {out}: cannot be written ({ro['why']}): " + (
            f"the run would be refused, as it must write there: {'; '.join(ro['needs'])}" if ro["needs"] else
            "its run is complete, so the run writes nothing there and exits with its verdict (if the model and "
            "score configuration are the same)"))
    return lines


def skipped_line(skipped: list[dict], show: int = 5) -> str:
    """One console line naming the input files that were not read (they are not in the counts), those that may hold
    prompts first (:func:`audit.sources.data_first`)."""
    from audit.sources import data_first

    def why(s: dict) -> str:  # an unreadable file's reason begins with its path: not said twice on one line
        reason = str(s["reason"])
        return reason.removeprefix(f"{s['path']}: ")

    named = "; ".join(visible(f"{s['path']} ({why(s)})", one_line=True) for s in data_first(skipped)[:show])
    more = f"; and {len(skipped) - show} more" if len(skipped) > show else ""
    return (f"memaudit: warning: {counted(len(skipped), 'input file')} skipped, not read "
            f"(manifest.json skipped_files): {named}{more}")


@app.command("layers")
def layers_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id or local diffusers folder, or 'lab' "
                                        "(the default: the bundled lab model)."),
) -> None:
    """List the model's cross-attention layers in call order, marking the default."""

    def go():
        from audit.models import adapter_of, load_model
        from audit.runner import model_argument

        m = load_model(model_argument(model, say), "cpu", "float32")
        adapter = adapter_of(m)
        why = "named by the model folder's memaudit.json" if m.extra.get("default_layers") \
            else adapter.layer_note(m.default_layers)
        names = adapter.cross_attention_layers(m.unet)
        if unknown := [x for x in m.default_layers if x not in names]:  # as `memaudit run` refuses them
            fail(f"{m.name}: memaudit.json names default layer(s) that are not cross-attention layers of this "
                 f"model: {', '.join(unknown)}; fix or remove default_layers (the layers are: {', '.join(names)})")
        typer.echo(f"family {adapter.name}; default layer: {why}")
        for i, name in enumerate(names):
            mark = "  (default)" if name in m.default_layers else ""
            typer.echo(f"{i + 1:3d}  {name}{mark}")

    guarded(go, resumable=False)


# each defines register(app) adding its commands
COMMAND_MODULES = ("audit.cli.report", "audit.cli.eval", "audit.cli.generate", "audit.cli.docs")


def _mount_optional() -> None:
    """Mount commands that live in other modules (each imports its heavy libraries lazily)."""
    import importlib

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(app)
    try:
        from audit.lab.cli import lab_app
    except ModuleNotFoundError:
        return
    app.add_typer(lab_app, name="lab", help="The lab: a tiny model that memorizes on purpose, and AUROC of "
                                            "every scorer against measured ground truth.")


_mount_optional()


def main() -> None:
    """Console-script entry point. ``--debug`` is accepted anywhere before ``--`` (errors suggest adding it
    to the command as typed), not only before the subcommand."""
    from audit.faults import sigint_not_ignored

    sigint_not_ignored()  # before anything slow: an early kill -INT to a job started with & was dropped
    _standard_descriptors()
    _encodable_output()
    gone = _working_folder_gone()
    if gone:
        from audit.cli.common import say

        say(f"memaudit: error: {gone}")
        sys.exit(2)
    args = sys.argv[1:]
    end = args.index("--") if "--" in args else len(args)
    if "--debug" in args[1:end]:
        args = ["--debug"] + [a for i, a in enumerate(args) if not (a == "--debug" and i < end)]
    if "--debug" not in args[:end]:  # the libraries' own notices (transformers' "requires torchvision" at diffusers'
        # SD 3 import, diffusers' "error occurred while trying to fetch" before memaudit's one-line error) stay out
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "critical")
    from rich.console import Console

    from audit.faults import stdout_closed

    def closed(console) -> None:  # rich's own handling exits 1, which schedulers read as an unexpected failure
        console.quiet = True
        stdout_closed()

    Console.on_broken_pipe = closed  # every rich console of the command: reports, diffs, typer's --help
    code = _invoke(args)
    from audit.faults import finished_ignores_termination

    finished_ignores_termination()  # the command is done and has said so: its exit code stands
    sys.exit(code)


def _standard_descriptors() -> None:
    """Open the null device on any of file descriptors 0, 1 and 2 that the command was started without (``>&-``, a
    supervisor that closes them): Python then has no ``sys.stdout`` and the run ended, after scoring everything,
    with "AttributeError: 'NoneType' object has no attribute 'isatty'" (exit 1); and the first file the command
    opened would take the free descriptor, so anything a library prints to stdout would go into it."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False, encoding="utf-8", errors="backslashreplace"))


def _working_folder_gone() -> str | None:
    """Why the working folder cannot be used, or None. A job whose folder was deleted or moved away under it (a
    deploy that replaced the release folder a cron line `cd`s into, a cleaned temporary folder) got torch's
    "Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so." (no line end, exit 2) from `memaudit run`, even
    with every path absolute, or "memaudit: error: [Errno 2] No such file or directory" naming no file when the
    config's paths are relative; `run --dry-run` meanwhile planned the run as fine. Every command now says so."""
    try:
        os.getcwd()
    except OSError as exc:
        return (f"the working folder cannot be read ({exc.strerror or exc}: deleted or moved away since the job "
                "started in it); start memaudit from an existing folder (cron: `cd /srv/audits && ...`)")
    return None


def _encodable_output() -> None:
    """Under a locale whose encoding is not UTF-8 (``LC_ALL=C`` with ``PYTHONUTF8=0``, a Latin-1 locale: a cron or
    container environment), stdout and stderr write what the encoding lacks as backslash escapes (``caf\\xe9``)
    instead of failing the command with a UnicodeEncodeError at the first prompt or file name outside it."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding and not encoding.startswith("utf") and hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # pragma: no cover - a stream that cannot change (closed, replaced)
                pass


def _command_path(args: list[str]) -> str | None:
    """The command ``args`` name (``memaudit lab build``), for a usage error that carries no context: click raises
    "Option '--steps' requires an argument" and "Option '--compile' does not take a value" without one, so those
    lines alone named no ``--help`` to read. None where ``args`` name no command."""
    import typer.main

    command, path = typer.main.get_command(app), ["memaudit"]
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("-"):  # the group's own options (--debug, --version) take no value
            continue
        sub = getattr(command, "commands", {}).get(arg)
        if sub is None:
            break
        command = sub
        path.append(arg)
        if not hasattr(command, "commands"):  # a command, not a group: the rest are its arguments
            break
    return " ".join(path) if len(path) > 1 else None


def _invoke(args: list[str]) -> int:
    """Run the command line ``args`` and return its exit code. A usage error (an unknown option, a value of the
    wrong type, a missing argument: click's, which typer draws as a box of five lines under the usage line) is one
    line on stderr, as every other error, naming the command's ``--help``; exit 2."""
    from audit.cli.common import say

    try:
        code = app(args=args, prog_name="memaudit", standalone_mode=False)  # an Exit's code (--help, typer.Exit)
    except SystemExit as exc:
        # typer catches an EPIPE that a command's own echo raised outside guarded() (`memaudit run --dry-run | head`,
        # `memaudit docs`, `--version`) whatever standalone_mode is, and exits 1 with no word, stdout wrapped by
        # click's PacifyFlushWrapper: the reader of stdout went away, which ends the command with 141 as elsewhere
        from audit.faults import stdout_closed, stdout_is_closed

        if exc.code == 1 and "PacifyFlushWrapper" in type(sys.stdout).__name__ and stdout_is_closed():
            stdout_closed()
        raise
    except typer.TyperException as exc:  # click's errors, as typer (which vendors click) raises them
        if type(exc).__name__ == "NoArgsIsHelpError":  # `memaudit` alone: the help is printed already
            return exc.exit_code
        ctx = getattr(exc, "ctx", None)  # a usage error's command
        path = ctx.command_path if ctx is not None else _command_path(args)
        said = " ".join(exc.format_message().split()).rstrip(".")
        # after click's question ("Did you mean 'run'?") a semicolon read "run'?; see": the hint goes in parentheses
        hint = (f" (see {path} --help)" if said.endswith("?") else f"; see {path} --help") if path else ""
        say(f"memaudit: error: {said}{hint}")
        return exc.exit_code
    except typer.Abort:  # end of input at a prompt (memaudit asks none; typer's own exit 1)
        say("memaudit: error: aborted")
        return 1
    return code if isinstance(code, int) else 0
