"""``memaudit lab``: rebuild the lab model and evaluate every scorer on its measured labels.

Mounted by the main CLI as a sub-app (``lab_app``). Heavy modules (torch, diffusers) are imported inside
the commands only, so ``memaudit --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

lab_app = typer.Typer(help="The lab: a tiny model that memorizes on purpose, with measured ground truth.",
                      no_args_is_help=True, add_completion=False)


@lab_app.command()
def build(
    out: Path = typer.Option(..., "--out", help="Folder for model/, prompts.parquet, generations.png, report.json "
                                                "(training checkpoints in OUT/run, resumed when rerun)."),
    steps: Optional[int] = typer.Option(None, help="Training steps (default: the shipped model's)."),
) -> None:
    """Rebuild the lab model from scratch: train, measure replication, label, choose the default layer.

    On 2 CPU cores training takes about 45 minutes and the measurement about 10 (see docs/lab.md).
    """
    from audit.cli.common import guarded
    from audit.lab.build import TRAIN_STEPS, build_lab

    report = guarded(lambda: build_lab(out, steps=steps or TRAIN_STEPS, log=lambda m: typer.echo(m, err=True)))
    ev = report["evaluation"]["test"]
    typer.echo(f"wrote {out}/model, prompts.parquet, generations.png, report.json; test split: "
               f"{ev['n_memorized']} memorized, {ev['n_ordinary']} ordinary")


@lab_app.command("eval")
def eval_(
    model: Optional[str] = typer.Option(None, "--model", help="Model folder or hub id (default: the bundled lab model)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Labelled prompts (default: the bundled table)."),
    split: str = typer.Option("test", help="validation, test or all."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Score the labelled prompts with every scorer and per cross-attention layer; print AUROC and TPR at
    1% and 3% FPR (TPR of the last ROC point with FPR at or below the target, as Wen et al.)."""
    from audit.cli.common import guarded

    guarded(lambda: _eval(model, prompts, split, as_json))


def _eval(model: Optional[str], prompts: Optional[Path], split: str, as_json: bool) -> None:
    import polars as pl

    from audit.lab import LAB_MODEL_DIR, LAB_PROMPTS
    from audit.lab.evaluate import evaluate
    from audit.models import load_model

    if split not in ("validation", "test", "all"):
        raise typer.BadParameter("choose validation, test or all", param_hint="--split")
    if model is None:
        typer.echo(f"using the bundled lab model ({LAB_MODEL_DIR})", err=True)
    m = load_model(str(model or LAB_MODEL_DIR), device="cpu", dtype="float32")
    table = pl.read_parquet(prompts or LAB_PROMPTS)
    result = evaluate(m, table)
    result.pop("_scores")
    res = result[split]
    if as_json:
        payload = {"model": result["model"], "fingerprint": result["fingerprint"], "split": split,
                   "default_layers": result["default_layers"],
                   "n_memorized": res["n_memorized"], "n_ordinary": res["n_ordinary"],
                   "scorers": res["scorers"],
                   "attention_entropy_per_layer": res["layers"],
                   "tpr_convention": "TPR of the last ROC point with FPR <= target (Wen et al.)"}
        typer.echo(json.dumps(payload, indent=2))
        return
    typer.echo(f"model {result['model']} ({result['fingerprint']}); split {split}: "
               f"{res['n_memorized']} memorized, {res['n_ordinary']} ordinary prompts")
    typer.echo("TPR at x% FPR = TPR of the last ROC point with FPR <= x% (Wen et al.)")
    lines = [(name, mt) for name, mt in res["scorers"].items()]
    lines += [(f"attention_entropy @ {name}{' *' if name in result['default_layers'] else ''}", mt)
              for name, mt in res["layers"].items()]
    width = max(len(label) for label, _ in lines)
    typer.echo(f"{'scorer / layer':<{width}} {'AUROC':>6} {'TPR@1%':>7} {'TPR@3%':>7}")
    for label, mt in lines:
        typer.echo(f"{label:<{width}} {mt['auroc']:6.3f} {mt['tpr_at_1pct_fpr']:7.3f} {mt['tpr_at_3pct_fpr']:7.3f}")
    typer.echo("* default layer, chosen on the validation split")
