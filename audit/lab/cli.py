"""``memaudit lab``: rebuild the lab model and evaluate its first-step scorers on its measured labels.

Mounted by the main CLI as a sub-app (``lab_app``). Heavy modules (torch, diffusers) are imported inside
the commands only, so ``memaudit --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from audit.config import MAX_SEEDS
from audit.text import visible

lab_app = typer.Typer(help="The lab: a tiny model that memorizes on purpose, with measured ground truth.",
                      no_args_is_help=True, add_completion=False,
                      # as `memaudit` alone (audit.cli.NO_COMMAND_EPILOG): click's usage error for no command
                      epilog="Without a lab command this help is printed (stdout) and the exit code is 2, a usage "
                             "error as for any bad command line; --help exits 0.")


@lab_app.command(short_help="Rebuild the lab model from scratch: encoder, UNet, ground truth, criteria, scorer "
                            "figures (resumes from OUT/run).")
def build(
    out: Path = typer.Option(..., "--out", help="Folder for model/, prompts.parquet, generations.png, criteria.json, "
                                                "report.json (training checkpoints in OUT/run, resumed when rerun)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Training steps (default: the shipped model's)."),
    mask_padding: bool = typer.Option(True, "--mask-padding/--faithful",
                                      help="Mask EOS and padding out of the UNet's cross-attention (the shipped "
                                           "variant, a deviation from SD) or not (SD's behaviour)."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads for training (default: torch's, every "
                                                            "core; 2 threads train about 1.5x faster than 1 on a "
                                                            "2-core machine)."),
    training_seed: int = typer.Option(0, "--training-seed", min=0,
                                      help="0: the shipped run; K: a second run on the same data from another "
                                           "UNet initialization and noise draws (`memaudit docs lab`)."),
) -> None:
    """Rebuild the lab model from scratch: pretrain the text encoder, train the UNet, measure replication,
    check and record the acceptance criteria, then evaluate the first-step scorers once (see `memaudit docs
    lab` for times).
    Resumes from OUT/run when rerun."""
    from audit.cli.common import guarded
    from audit.faults import terminate_as_interrupt
    from audit.lab.build import TRAIN_STEPS, build_lab

    terminate_as_interrupt()  # SIGTERM: "terminated; rerun ... to resume", after training saves at a step's end
    report = guarded(lambda: build_lab(out, steps=steps or TRAIN_STEPS, log=lambda m: typer.echo(m, err=True),
                                       mask_padding=mask_padding, threads=threads, training_seed=training_seed))
    ev = report["evaluation"]["test"]
    typer.echo(f"criteria: {json.dumps(report['criteria']['checks'])}")
    from audit.lab.evaluate import criteria_note

    if note := criteria_note(report["criteria"].get("checks", {})):
        typer.echo(f"memaudit: warning: {note}", err=True)
    typer.echo(visible(f"wrote {out}/model, prompts.parquet, generations.png, criteria.json, report.json; test "
                       f"split: {ev['n_memorized']} memorized, {ev['n_ordinary']} ordinary"))


@lab_app.command("eval", short_help="AUROC and TPR at 1% and 3% FPR of the first-step scorers and every "
                                    "cross-attention layer on the labelled prompts.")
def eval_(
    model: Optional[str] = typer.Option(None, "--model", help="Model folder or hub id (default: the bundled lab model)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Labelled prompts: Parquet, CSV or JSONL with prompt, "
                                            "memorized (boolean) and split (validation/test) columns (default: the "
                                            "bundled table)."),
    split: str = typer.Option("test", help="validation, test or all."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Score the labelled prompts with the two first-step scorers (attention_entropy, noise_magnitude) and the
    attention entropy of each cross-attention layer (`memaudit eval` scores them with any scorer); print AUROC
    and TPR at 1% and 3% FPR (TPR of the last ROC point with FPR strictly below the target, as Wen et al.)."""
    from audit.cli.common import guarded

    if split not in ("validation", "test", "all"):  # a usage error: exit 2 before anything loads
        raise typer.BadParameter("choose validation, test or all", param_hint="--split")
    guarded(lambda: _eval(model, prompts, split, as_json))


def lab_payload(result: dict, split: str, meta: dict) -> dict:
    """The ``lab eval --json`` object: counts, the ``lab`` figures READ FROM ``memaudit.json`` (measured at
    build time: schedule, adherence, BOS mass per layer, mask declaration) and each first-step scorer's figures with
    95% bootstrap CIs on ``split``, plus the attention entropy of every layer."""
    crit = meta.get("criteria", {})
    regime = crit.get("attention_regime", {}).get("layers", {})
    lab = {"prediction_type": crit.get("schedule", {}).get("prediction_type"),
           "first_timestep": crit.get("schedule", {}).get("first_timestep"),
           "alpha_bar_t0": crit.get("schedule", {}).get("alpha_bar_t0"),
           "adherence": crit.get("adherence", {}).get("w7.5"),
           "bos_mass": {k: v["bos"] for k, v in regime.items()},
           "unet_encoder_attention_mask": meta.get("unet_encoder_attention_mask"),
           "checks": crit.get("checks", {}),
           "train_steps": meta.get("train_steps")}
    res = result[split]
    return {"model": result["model"], "fingerprint": result["fingerprint"], "split": split,
            "default_layers": result["default_layers"], "first_timestep": result["first_timestep"],
            "n_memorized": res["n_memorized"], "n_ordinary": res["n_ordinary"], "lab": lab,
            "scorers": res["scorers"], "attention_entropy_per_layer": res["layers"],
            "scorers_by_positive_group": res.get("by_positive_group", {}),
            "tpr_convention": "tpr_at_*: TPR of the last ROC point with FPR < target (Wen et al.'s code); "
                              "*_nearest: the first ROC point with FPR nearest the target (Ren et al.'s code)",
            "ci": "95% percentile bootstrap, 1000 class-stratified resamples, seed 0"}


def _eval(model: Optional[str], prompts: Optional[Path], split: str, as_json: bool) -> None:
    from audit.lab import LAB_MODEL_DIR, LAB_PROMPTS
    from audit.lab.evaluate import criteria_note, evaluate, read_lab_table
    from audit.models import load_model

    table = read_lab_table(prompts or LAB_PROMPTS, split)
    if model is None:
        typer.echo(f"memaudit: using the bundled lab model ({LAB_MODEL_DIR})", err=True)
    m = load_model(str(LAB_MODEL_DIR if model is None else model), device="cpu", dtype="float32")
    result = evaluate(m, table)
    result.pop("_scores")
    res = result[split]
    layers = result["default_layers"]
    # one default layer: its per-layer figures are the scorer's (the build records them so, lab/build.py); a
    # model with several default layers keeps the scorer's own figures, whose attention is their mean
    if len(layers) == 1 and "attention_entropy" in res["scorers"] and layers[0] in res["layers"]:
        res["scorers"]["attention_entropy"] = res["layers"][layers[0]]
    from audit.cli.eval import UNMEASURABLE_NOTE, small_sample_warnings, tpr_mark

    warnings = small_sample_warnings(res["n_memorized"], res["n_ordinary"])
    if note := criteria_note((m.extra or {}).get("criteria", {}).get("checks", {})):
        warnings.append(note)
    from audit.evaluate import tied_fpr_warnings, zero_width_warnings

    layer_figures = {k: v for k, v in res["layers"].items() if k not in layers or len(layers) > 1}  # shown once
    warnings += tied_fpr_warnings(res["scorers"], {"attention_entropy": layer_figures}, res["n_ordinary"])
    warnings += zero_width_warnings(res["scorers"], {"attention_entropy": layer_figures}, res["n_memorized"],
                                    res["n_ordinary"])  # a CI of one point (a TPR of 0 in every resample)
    for warning in warnings:  # on stderr, so that --json's stdout stays one JSON object
        typer.echo(f"memaudit: warning: {warning}", err=True)
    if as_json:
        from audit.sources import strict_json

        # strict JSON: a figure that is not there (NaN: no finite score, audit.eval.metrics) is null, not NaN
        typer.echo(strict_json(lab_payload(result, split, m.extra or {}), indent=2, ensure_ascii=True))
        return
    typer.echo(f"model {result['model']} ({result['fingerprint']}); split {split}: "
               f"{res['n_memorized']} memorized, {res['n_ordinary']} ordinary prompts; t0 = {result['first_timestep']}")
    if (m.extra or {}).get("unet_encoder_attention_mask"):
        typer.echo("NOTE: this model masks EOS and padding out of the UNet's cross-attention (SD does not); "
                   "the summary-token half of Ren et al.'s mitigation is a no-op on it")
    typer.echo("TPR at x% FPR = TPR of the last ROC point with FPR < x% (Wen et al.); [95% bootstrap CI]")
    lines = [(name, mt) for name, mt in res["scorers"].items()]
    lines += [(f"attention_entropy @ {name}{' *' if name in result['default_layers'] else ''}", mt)
              for name, mt in res["layers"].items()]
    width = max(len(label) for label, _ in lines)
    n = res["n_ordinary"]
    from audit.cli.common import terminal_width

    columns = terminal_width()
    narrow = columns is not None and width + 53 > columns  # a block a scorer or layer, one figure a line: an
    # 80-column terminal wrapped the 120-odd-column rows of the layers mid-number, the figures under no header
    if not narrow:
        typer.echo(f"{'scorer / layer':<{width}} {'AUROC':>6} {'95% CI':>13} {'TPR@1%':>7} {'95% CI':>13} "
                   f"{'TPR@3%':>7}")
    marked = False
    for label, mt in lines:
        ci = mt.get("auroc_ci", [float("nan")] * 2)
        ci1 = mt.get("tpr_at_1pct_fpr_ci", [float("nan")] * 2)
        auroc, tpr1, tpr3 = mt["auroc"], mt["tpr_at_1pct_fpr"], mt["tpr_at_3pct_fpr"]
        cis = f"[{ci[0]:.3f},{ci[1]:.3f}]", f"[{ci1[0]:.3f},{ci1[1]:.3f}]"
        mark1, mark3 = tpr_mark(1, n, mt), tpr_mark(3, n, mt)  # read at FPR 0: too few ordinary prompts, or ties
        marked = marked or bool(mark1 or mark3)
        typer.echo(f"{label}\n  AUROC {auroc:.3f} {cis[0]}\n  TPR@1% {tpr1:.3f}{mark1} {cis[1]}\n"
                   f"  TPR@3% {tpr3:.3f}{mark3}" if narrow else
                   f"{label:<{width}} {auroc:6.3f} {cis[0]} {tpr1:7.3f}{mark1} {cis[1]} {tpr3:7.3f}{mark3}")
    if marked:
        typer.echo(UNMEASURABLE_NOTE)
    note = (m.extra or {}).get("default_layers_note")
    typer.echo(f"* default layer, {note}" if note else "* default layer, chosen on the validation split")
    groups = res.get("by_positive_group", {})
    if len(groups) > 1:
        typer.echo("AUROC with the positives of one group only, against every ordinary prompt:")
        for g, r in groups.items():
            figs = ", ".join(f"{k} {v['auroc']:.3f} [{v['auroc_ci'][0]:.3f},{v['auroc_ci'][1]:.3f}]"
                             for k, v in r["scorers"].items())
            typer.echo(f"  {g} ({r['n_memorized']} memorized): {figs}")


@lab_app.command(short_help="Measure Ren et al.'s inference-time mitigation on the lab (about 20 min on 2 "
                            "CPU cores).")
def mitigation(
    model: Optional[str] = typer.Option(None, "--model", help="Lab model folder (default: the bundled lab model)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Labelled prompts: Parquet, CSV or JSONL with prompt, "
                                            "memorized (boolean) and split (validation/test) columns (default: the "
                                            "bundled table)."),
    c1: Optional[list[float]] = typer.Option(None, "--c1", help="BOS logit scale(s) to measure (default 1.1, 1.25, "
                                                                "1.5); 1.25 is the default arm of the time ratio."),
    split: str = typer.Option("test", help="validation, test or all (the detect arm calibrates on validation)."),
    guidance: float = typer.Option(7.5, help="Classifier-free guidance scale."),
    limit: Optional[int] = typer.Option(None, min=1, help="At most N memorized and N ordinary prompts (a quick "
                                                          "look)."),
    seeds: Optional[int] = typer.Option(None, min=2, max=MAX_SEEDS, help="Seeds per prompt, at least 2: a prompt "
                                        "replicates when 2 of its seeds do (default: the lab's, 4)."),
    steps: Optional[int] = typer.Option(None, min=2, help="DDIM steps (default: the lab's, 10)."),
    training_on: Optional[Path] = typer.Option(None, "--training-on", help="A lab build (its report.json) trained "
                                               "with the training-time hook on from the same run: adds the "
                                               "training figures, the off arm being --model's own measurement."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (detect, inference, training; "
                                 "`memaudit docs mitigation`) instead of a table."),
) -> None:
    """Measure Ren et al.'s inference-time mitigation on the lab: replication rate of the memorized prompts,
    adherence and distance of ordinary prompts, time, for each c1 and for detect-and-mitigate (`memaudit docs
    mitigation`).
    Takes about 20 minutes on 2 CPU cores with the defaults."""
    import math

    from audit.cli.common import guarded
    from audit.errors import MitigationError
    from audit.mitigation.inference import MitigationRule

    c1s = tuple(c1 or (1.1, 1.25, 1.5))
    for c in c1s:  # usage errors: exit 2 before anything loads or samples
        try:
            MitigationRule(c)
        except MitigationError as exc:
            raise typer.BadParameter(str(exc), param_hint="--c1") from None
    if split not in ("validation", "test", "all"):
        raise typer.BadParameter("choose validation, test or all", param_hint="--split")
    if not math.isfinite(guidance) or guidance < 0:
        raise typer.BadParameter(f"{guidance}: must be a finite number >= 0", param_hint="--guidance")
    guarded(lambda: _mitigation(model, prompts, c1s, split, guidance, limit, seeds, steps, training_on, as_json))


def _mitigation(model, prompts, c1s, split, guidance, limit, seeds, steps, training_on, as_json) -> None:
    from audit.lab import LAB_MODEL_DIR, LAB_PROMPTS
    from audit.lab.mitigation import measure, training_figures
    from audit.models.base import read_json

    model_dir = str(LAB_MODEL_DIR if model is None else model)  # '' (an unset $MODEL) is refused by load_model
    on = None
    if training_on is not None:  # checked before the measurement (20 minutes), not after it
        path = training_on / "report.json" if training_on.is_dir() else training_on
        if not path.is_file():
            raise typer.BadParameter(f"{path}: no lab build report", param_hint="--training-on")
        on = read_json(path)
        try:
            training_figures(on, on)
        except (KeyError, TypeError, AttributeError) as exc:
            raise typer.BadParameter(f"{path}: not a lab build's report.json or memaudit.json (no criteria "
                                     f"{exc}: replication, adherence and counts are needed)",
                                     param_hint="--training-on") from None
    res = measure(model_dir, str(prompts or LAB_PROMPTS), c1s, guidance, split, limit=limit, seeds=seeds, steps=steps,
                  log=lambda m: typer.echo(m, err=True))
    if on is not None:
        off = read_json(Path(model_dir) / "memaudit.json")
        res["training"] = training_figures(off, on)
        res.pop("training_note", None)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
        return
    inf = res["inference"]
    typer.echo(f"{'arm':<22} {'replication':>11} {'adherence':>9} {'distance':>8} {'seconds':>8}")
    arms = [("baseline", inf["baseline"])] + [(f"c1 = {k}", v) for k, v in inf["c1"].items()] + [("detect", res["detect"])]
    for name, f in arms:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        # the baseline is its own reference (0); an arm without ordinary prompts has no distance: "-", not 0
        dist = 0.0 if name == "baseline" else f.get("distance_to_baseline")
        typer.echo(f"{name:<22} {fmt(f['replication_rate']):>11} {fmt(f['adherence']):>9} "
                   f"{fmt(dist):>8} {f['seconds']:8.1f}")
    ratio = inf.get("time_ratio")
    ratio = f"{ratio:.3f}" if ratio is not None else "not measured (no c1 = 1.25 arm)"
    det = res["detect"]
    flags = (f"detect flagged {det['false_flags_ordinary']} of {det['ordinary_images']} ordinary images"
             if det.get("ordinary_images") else "no ordinary images to count detect's false flags on")
    typer.echo(f"time ratio (c1 = 1.25 / baseline): {ratio}; {flags}")
    if res["detect"].get("note"):
        typer.echo(f"note: {res['detect']['note']}")
    if res.get("training"):
        for arm, f in res["training"].items():
            typer.echo(f"training hook {arm}: planted replication {f['replication_rate']:.3f} "
                       f"({f['memorized_planted']}/{f['planted_prompts']}), adherence {f['adherence']:.3f}")
