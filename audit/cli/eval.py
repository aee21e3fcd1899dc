"""Command ``eval`` (mounted by :mod:`audit.cli`): detection figures of each scorer on a labelled table,
for any model. Owns this command's options and its text and JSON output; the work is
:func:`audit.evaluate.evaluate`. Must not import torch or the scorers at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from audit.evaluate import MAX_BOOTSTRAP, small_sample_warnings, tied_past, unmeasurable  # noqa: F401 (also the lab's, from here)


def _fmt(v: float, ci=None) -> str:
    if v != v:  # NaN: no figure (every score non-finite; the warnings say why)
        return "n/a"
    text = f"{v:.3f}"
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None else text


def tpr_mark(pct: int, n_ordinary: int, figures: dict | None = None) -> str:
    """``"†"`` after a TPR at ``pct``% FPR that was read at FPR 0, else ``""``: where ``n_ordinary`` ordinary prompts
    are too few to measure it (:func:`unmeasurable`), or where ``figures`` (a scorer's or layer's
    :func:`audit.eval.metrics`) say the top ordinary scores tie past ``pct``% (:func:`tied_past`). Figures without
    ``min_nonzero_fpr`` are marked by the count alone."""
    return "†" if unmeasurable(pct, n_ordinary) or tied_past(pct, figures or {}) else ""


UNMEASURABLE_NOTE = ("†: read at FPR 0: too few ordinary prompts to measure this FPR, or their top scores tie past "
                     "it (the warning says which)")


def render(result: dict, width: int | None = None) -> str:
    """The text table of an :func:`audit.evaluate.evaluate` result (one line per scorer, then per layer); a TPR
    that too few ordinary prompts read at FPR 0 is marked † (:func:`tpr_mark`). Where ``width`` (columns,
    :func:`audit.cli.common.terminal_width`) is narrower than the table's 130-odd columns, each scorer and layer is a
    block instead, one figure a line (``  AUROC 0.520 [0.464, 0.571]``): an 80-column terminal wrapped the table's
    lines mid-number, its figures under no header. The heading and notes stay one line each."""
    n = result["n_ordinary"]
    head = (f"model {result['model']} [{result['fingerprint']}]: {result['n_memorized']} memorized, "
            f"{result['n_ordinary']} ordinary prompts"
            + (f" ({result['n_rows']} rows: {result['n_duplicate_rows']} repeating a prompt above, merged)"
               if result.get("n_duplicate_rows") else "")
            + f"; {result['noise_draws']} noise draw(s)"
            + (f" ({result['noise_generator']})" if result.get("noise_generator", "mt19937") != "mt19937" else "")
            + (f"; layers {', '.join(result['score_layers'])}" if result.get("score_layers_given") else "")
            + "; 95% bootstrap CIs")
    rows = []  # (name, [(label, figure)...]) a scorer, then (layer, ...) under each scorer's heading
    for name, f in result["scorers"].items():
        rows.append((name, [("AUROC", _fmt(f["auroc"], f["auroc_ci"])),
                            ("TPR@1%FPR", _fmt(f["tpr_at_1pct_fpr"], f["tpr_at_1pct_fpr_ci"]) + tpr_mark(1, n, f)),
                            ("TPR@3%FPR", _fmt(f["tpr_at_3pct_fpr"], f["tpr_at_3pct_fpr_ci"]) + tpr_mark(3, n, f)),
                            ("TPR@1% nearest*", _fmt(f["tpr_at_1pct_fpr_nearest"])),
                            ("fwd/prompt", f"{f['forwards_per_prompt']:g}"),
                            ("prompts/s", f"{f['prompts_per_s']:.2f}")]))
    layer_rows = [(f"{scorer} per cross-attention layer:",
                   [(layer, [("AUROC", _fmt(f["auroc"], f["auroc_ci"])),
                             ("TPR@1%FPR", f"{_fmt(f['tpr_at_1pct_fpr'], f['tpr_at_1pct_fpr_ci'])}{tpr_mark(1, n, f)}")])
                    for layer, f in layers.items()])
                  for scorer, layers in result.get("layers", {}).items()]
    notes = ["TPR@x%FPR: the last ROC point with FPR < x (Wen's code). *nearest: the first ROC point with FPR "
             "nearest to 1% (Ren et al.'s code; can exceed 1%)."] + ([UNMEASURABLE_NOTE] if any(
                 "†" in figure for _, figures in rows + [f for _, per in layer_rows for f in per]
                 for _, figure in figures) else [])
    lines = [head, f"{'scorer':<24} {'AUROC':<22} {'TPR@1%FPR':<22} {'TPR@3%FPR':<22} {'TPR@1% nearest*':<16} "
                   f"{'fwd/prompt':>10} {'prompts/s':>10}"]
    for name, (auroc, tpr1, tpr3, nearest, fwd, speed) in rows:
        lines.append(f"{name:<24} {auroc[1]:<22} {tpr1[1]:<22} {tpr3[1]:<22} {nearest[1]:<16} {fwd[1]:>10} "
                     f"{speed[1]:>10}")
    for heading, layers in layer_rows:
        lines.append(heading)
        for layer, ((_, auroc), (_, tpr1)) in layers:
            lines.append(f"  {layer:<58} AUROC {auroc}  TPR@1%FPR {tpr1}")
    lines += notes
    if width is None or max(len(line) for line in lines[1:-len(notes)] or [""]) <= width:
        return "\n".join(lines)
    out = [head]  # the heading and notes stay one line each (found whole by grep), as memaudit's messages
    for name, figures in rows:
        out += [name, *(f"  {label} {figure}" for label, figure in figures)]
    for heading, layers in layer_rows:
        out.append(heading)
        for layer, figures in layers:
            out += [f"  {layer}", *(f"    {label} {figure}" for label, figure in figures)]
    out += notes
    return "\n".join(out)


def lab_criteria_note(model: str) -> str | None:
    """The warning ``lab eval`` gives for a lab model that fails its acceptance criteria
    (:func:`audit.lab.evaluate.criteria_note`), for ``model`` when it is a local folder whose ``memaudit.json`` records
    them; None for any other model."""
    from audit.errors import ModelError
    from audit.lab.evaluate import criteria_note
    from audit.models import read_extra

    try:
        checks = read_extra(Path(model)).get("criteria", {}).get("checks")
    except (ModelError, AttributeError):  # an unreadable memaudit.json, or "criteria" that is not an object
        return None
    return criteria_note(checks) if isinstance(checks, dict) else None


# `memaudit eval --help`: what it measures, then its exit codes one a line (typer keeps line breaks there)
EVAL_HELP = "\n".join([
    "AUROC and TPR at 1% and 3% FPR (with 95% bootstrap CIs), forwards per prompt and measured prompts per second of "
    "each scorer on a labelled prompt table.",
    "",
    "Exit codes:",
    "0 done (warnings on stderr say what the table is too small to measure);",
    "2 an error said in one line (options, the labelled table, the model);",
    "130, 143, 129 interrupted, terminated, hung up (nothing is kept: rerun the command);",
    "1 anything unexpected (--debug shows the traceback).",
])


def register(app: typer.Typer) -> None:
    """Add ``eval`` to the memaudit app."""
    from audit.cli.common import _split, fail, guarded, say, terminal_width
    from audit.text import visible

    @app.command("eval", help=EVAL_HELP, short_help="AUROC and TPR at 1% and 3% FPR (95% bootstrap CIs), forwards "
                 "per prompt and prompts/s of each scorer on a labelled prompt table.")
    def eval_cmd(
        labelled: Path = typer.Argument(..., metavar="LABELLED", help="Parquet, CSV or JSONL with a prompt column and a boolean "
                                        "'memorized' column (true = memorized)."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id or local diffusers folder. "
                                            "Default: the bundled lab model."),
        scorers: Optional[list[str]] = typer.Option(None, "--scorers", help="Scorers, comma separated "
                                                    "(default: attention_entropy)."),
        layers: Optional[list[str]] = typer.Option(None, "--layers", help="all: also attention entropy per "
                                                   "cross-attention layer. Or layer names, comma separated or "
                                                   "repeated: score with them instead of the model's default "
                                                   "layers, as `memaudit run --layers`."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
        prompt_column: str = typer.Option("prompt", "--prompt-column", help="Column holding the prompt text."),
        label_column: str = typer.Option("memorized", "--label-column", help="Column holding the labels: true/false "
                                         "or 1/0, true = memorized."),
        noise_draws: int = typer.Option(1, "--noise-draws", help="Seeded noise draws per prompt."),
        seed: int = typer.Option(0, "--seed", help="Run seed, mixed with each prompt's hash."),
        noise_generator: str = typer.Option("mt19937", "--noise-generator", help="mt19937 or philox, as `memaudit "
                                            "run --noise-generator` (another noise: other scores)."),
        steps: int = typer.Option(50, "--steps", help="Scheduler steps (t0; guidance geometry's t_lo; the "
                                  "sampling length of attention_entropy_late)."),
        batch_size: int = typer.Option(32, "--batch-size", "-b", help="Prompts per forward pass."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        dtype: str = typer.Option("auto", "--dtype", help="auto, float32, float16 or bfloat16."),
        n_boot: int = typer.Option(1000, "--bootstrap",
                                   help=f"Bootstrap resamples for the CIs (1 to {MAX_BOOTSTRAP:,})."),
    ) -> None:
        """AUROC and TPR at 1% and 3% FPR (with 95% bootstrap CIs), forwards per prompt and measured
        prompts per second of each scorer on a labelled prompt table."""

        def go():
            from audit.config import device_dtype_problem
            from audit.errors import RunError
            from audit.evaluate import eval_options_problem, evaluate, labelled_rows, read_table
            from audit.scorers import get_scorer

            names = _split(scorers, "--scorers") or ("attention_entropy",)  # --scorers '' is refused there
            for name in names:
                try:
                    get_scorer(name)  # one line with a "did you mean" before reading or loading anything
                except RunError as exc:
                    fail(str(exc).replace("--scorer ", "--scorers ", 1))
            if problem := device_dtype_problem(device, dtype):
                fail(problem)
            from audit.scorers.noise import NOISE_GENERATORS

            if noise_generator not in NOISE_GENERATORS:  # with the other options: it came after the table was read
                # and the lab model's note was said (evaluate checks it, for a Python caller)
                fail(f"--noise-generator {noise_generator!r}: choose {' or '.join(NOISE_GENERATORS)}")
            # "all", or the names every scorer is configured with (evaluate checks them); repeated as run's --layers
            # (a single-valued option kept the last one: `--layers A --layers B` scored with B alone, in silence)
            layer_arg = None
            if layers is not None:
                given = list(_split(layers, "--layers"))  # --layers '' is refused there
                if "all" in given and given != ["all"]:
                    fail(f"--layers {','.join(given)}: give all alone (every layer's figures), or layer names")
                layer_arg = "all" if given == ["all"] else given
            from audit.evaluate import ATTENTION_SCORERS

            if layer_arg == "all" and not set(names) & set(ATTENTION_SCORERS):  # before the table is read
                fail(f"--layers all: the per-layer figures are those of {', '.join(ATTENTION_SCORERS)}; add it to "
                     f"--scorers ({', '.join(names)})")
            if problem := eval_options_problem(noise_draws, steps, batch_size, n_boot, seed, names):
                fail(problem)
            table = read_table(labelled, prompt_column)
            prompts, labels = labelled_rows(table, labelled, prompt_column, label_column, "--label-column")
            if table.num_rows > len(prompts):  # said, as `memaudit run` says its unique prompts
                typer.echo(f"memaudit: {table.num_rows} rows, {len(prompts)} distinct prompts after normalization "
                           f"(a prompt listed {table.num_rows - len(prompts)} more time(s) counts once)", err=True)
            from audit.runner import model_argument

            chosen = model_argument(model, say)  # None: the lab model, said
            import warnings as python_warnings

            with python_warnings.catch_warnings():  # evaluate() warns a Python caller; here: result["warnings"]
                python_warnings.simplefilter("ignore", UserWarning)
                result = evaluate(prompts, labels, chosen, names, layer_arg, noise_draws, seed, batch_size, steps,
                                  n_boot, device, dtype, noise_generator=noise_generator,
                                  progress=None if as_json else lambda line: typer.echo(line, err=True))
            # the table's rows, not the distinct prompts passed on: every row is a prompt counted or merged
            result.update(n_rows=table.num_rows, n_duplicate_rows=table.num_rows - len(prompts))
            from audit.evaluate import result_warnings

            warnings = result_warnings(result)  # too few prompts, non-finite scores
            if note := lab_criteria_note(chosen):
                warnings.insert(len(small_sample_warnings(result["n_memorized"], result["n_ordinary"])), note)
            result["warnings"] = warnings  # --json's "warnings": every line printed as a warning below
            from audit.sources import strict_json

            # strict JSON: a figure that is not there (NaN: no finite score) is null, not NaN; --model: a folder name
            typer.echo(strict_json(result, indent=2, ensure_ascii=True) if as_json
                       else visible(render(result, terminal_width())))
            for warning in warnings:
                say(f"memaudit: warning: {warning}")

        guarded(go, resumable=False)
