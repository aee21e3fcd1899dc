"""Evaluation of every scorer, and of the attention entropy per cross-attention layer, on the lab's labels.

Metrics: :mod:`audit.eval` (AUROC; TPR at 1% and 3% FPR as the TPR of the LAST ROC point with FPR strictly
below the target, Wen et al.'s code, plus Ren et al.'s "nearest point" convention under separate
keys; 95% class-stratified percentile-bootstrap CIs with a fixed seed). Memorized = positive class, higher
score = riskier. Scores use ``NOISE_DRAWS`` seeded first-step latents per prompt at t0 (981 for SD 1.x's
schedule); a model that declares a UNet cross-attention mask (``memaudit.json``) gets it everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from audit.eval import FPR_TARGETS, metrics, metrics_with_ci  # noqa: F401  (re-exported)

NOISE_DRAWS = 4
EVAL_SEED = 0


SPLITS = ("validation", "test")


def read_lab_table(path, split: str = "all", require_split: bool = True):
    """A labelled lab table (Parquet, CSV or JSONL) as a polars DataFrame, checked before any model loads.

    ``prompt`` (text) and ``memorized`` (boolean) are checked as :func:`audit.evaluate.read_labelled` checks
    them (prompts normalized as ``memaudit run`` does); ``split`` must hold only "validation" and "test", and
    the rows of ``split`` (or all rows for "all") must include both classes. Other columns (``group``, ``row``)
    are kept.

    Raises:
        RunError: the problem in one line, naming ``path`` (unreadable file, a missing or mistyped column, an
            unknown split value, a split without memorized or ordinary prompts, a prompt listed twice).
    """
    import polars as pl

    from audit.errors import RunError
    from audit.evaluate import check_labels, labelled_rows, read_table

    table = read_table(path, "prompt")
    prompts, labels = labelled_rows(table, path)
    if len(prompts) != table.num_rows:  # each row carries its own split and group: no merging of repeats here
        from collections import Counter

        from audit.sources import normalize_prompt

        seen = Counter(normalize_prompt(p) for p in table.column("prompt").to_pylist())
        twice = next(p for p, n in seen.items() if n > 1)
        raise RunError(f"{path}: the prompt {twice[:80]!r} is listed {seen[twice]} times; a lab table has one row "
                       f"per prompt ({table.num_rows - len(prompts)} repeated row(s))")
    names = table.column_names
    if "split" not in names:
        if require_split:
            raise RunError(f"{path}: no split column (values {' or '.join(SPLITS)}; columns: {', '.join(names)})")
        splits = None
    else:
        splits = np.asarray([str(v) if v is not None else None for v in table.column("split").to_pylist()], dtype=object)
        if unknown := sorted({repr(v) for v in splits if v not in SPLITS}):
            raise RunError(f"{path}: split column holds {', '.join(unknown[:5])}; expected {' or '.join(SPLITS)}")
    if split != "all" and splits is not None:
        check_labels(labels[splits == split], f"{path}, split {split}")
    # the labels as checked (0/1 integers are booleans there): the raw column, used as a mask, counted -44 ordinary
    return pl.from_arrow(table).with_columns(pl.Series("prompt", prompts, dtype=pl.String),
                                             pl.Series("memorized", labels, dtype=pl.Boolean))


def split_rows(table, split: str):
    """The rows of ``split`` ("validation", "test", or "all" for every row) of a lab table (polars); a table
    without a split column is all one split."""
    import polars as pl

    return table if split == "all" or "split" not in table.columns else table.filter(pl.col("split") == split)


@dataclass
class LabScores:
    """Scores of the labelled prompts. ``scorers``: name -> float64 [N]; ``layers``: attn2 path -> entropy
    float64 [N] (that layer alone); ``bos_mass``: layer -> float64 [N]."""

    scorers: dict
    layers: dict
    bos_mass: dict


def score_prompts(model, prompts: list[str], noise_draws: int = NOISE_DRAWS, seed: int = EVAL_SEED,
                  batch: int = 128) -> LabScores:
    """Score ``prompts`` with the first-step scorers (attention_entropy with the model's default layers, and
    noise_magnitude) and the
    attention entropy of every cross-attention layer on its own (same seeded latents as the scorer, the
    model's declared cross-attention mask if any)."""
    import torch

    from audit.capture import CrossAttentionCapture, cross_attention_layers
    from audit.scorers import ScoreConfig, Scorer, attention_entropy

    layers = cross_attention_layers(model.unet)
    scorers = {name: [] for name in ("attention_entropy", "noise_magnitude")}
    per_layer = {name: [] for name in layers}
    bos = {name: [] for name in layers}
    objs = {name: Scorer(model, ScoreConfig(name, tuple(model.default_layers), noise_draws, seed))
            for name in ("attention_entropy", "noise_magnitude")}  # the first-step scorers the lab was built with
    for b0 in range(0, len(prompts), batch):
        chunk = prompts[b0:b0 + batch]
        for name, sc in objs.items():
            scorers[name].append(sc.score(chunk)["risk"])
        sc = objs["attention_entropy"]
        with torch.inference_mode():
            # the family's conditioning carries the model's declared UNet attention mask, if any
            c = sc.encode(sc.adapter.tokenize(model, chunk)).repeat_interleave(noise_draws, dim=0)
            x = sc.latents(chunk)
            with CrossAttentionCapture(model.unet, layers, early_exit=True) as cap:
                probs = cap.run(lambda: sc.adapter.forward(model.unet, x, sc.t0.to(model.device), c))
        for name in layers:
            a = probs[name].float().view(len(chunk), noise_draws, -1).mean(dim=1).double()
            per_layer[name].append(attention_entropy(a).cpu().numpy())
            bos[name].append(a[:, 0].cpu().numpy())
    cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}  # noqa: E731
    return LabScores(cat(scorers), cat(per_layer), cat(bos))


def evaluate(model, table, noise_draws: int = NOISE_DRAWS, with_ci: bool = True) -> dict:
    """Score the labelled prompts of ``table`` (a polars DataFrame with prompt, memorized, split) and
    return, per split ("validation", "test", "all"), ``{"n_memorized", "n_ordinary", "scorers": {name:
    figures}, "layers": {attn2 path: figures}, "bos_mass_mean": {attn2 path: float}, "by_positive_group":
    {group: ...} (:func:`by_positive_group`; {} without a group column)}`` plus ``"model"``, ``"fingerprint"``,
    ``"default_layers"``, ``"noise_draws"``, ``"first_timestep"`` and ``"_scores"`` (the :class:`LabScores`).
    Figures are
    :func:`audit.eval.metrics_with_ci` (or :func:`audit.eval.metrics` when ``with_ci`` is False)."""
    from audit.scorers import ScoreConfig, Scorer

    scores = score_prompts(model, table["prompt"].to_list(), noise_draws=noise_draws)
    y = table["memorized"].to_numpy()
    split = table["split"].to_numpy()
    group = table["group"].to_numpy() if "group" in table.columns else None
    fig = metrics_with_ci if with_ci else metrics
    t0 = Scorer(model, ScoreConfig("attention_entropy", tuple(model.default_layers))).first_timestep
    out = {"model": model.name, "fingerprint": model.fingerprint, "default_layers": list(model.default_layers),
           "noise_draws": noise_draws, "first_timestep": t0}
    for name in ("validation", "test", "all"):
        m = np.ones(len(y), bool) if name == "all" else split == name
        out[name] = {
            "n_memorized": int(y[m].sum()), "n_ordinary": int((~y[m]).sum()),
            "scorers": {k: fig(y[m], v[m]) for k, v in scores.scorers.items()},
            "layers": {k: fig(y[m], v[m]) for k, v in scores.layers.items()},
            "bos_mass_mean": {k: float(v[m].mean()) if m.any() else float("nan") for k, v in scores.bos_mass.items()},
            "by_positive_group": by_positive_group(y[m], group[m], scores.scorers, m, fig) if group is not None else {},
        }
    out["_scores"] = scores
    return out


def by_positive_group(y: np.ndarray, group: np.ndarray, scorers: dict, rows: np.ndarray, fig) -> dict:
    """Every scorer's figures with the positives restricted to one prompt group, against ALL negatives.

    The lab's memorized prompts are of two origins: planted captions (trained on with their duplicated
    image) and ordinary captions (held out, or seen once) whose generations replicate a planted image
    (docs/lab.md, "leakage"). ``y`` bool [N] and ``group`` str [N] are the rows of one split; ``scorers``
    maps name -> float64 [N_all] and ``rows`` bool [N_all] selects the split. Returns ``{group: {"n_memorized":
    int, "scorers": {name: figures}}}`` for each group with at least one positive; ``fig`` is
    :func:`audit.eval.metrics_with_ci` or :func:`audit.eval.metrics`.
    """
    out = {}
    for g in sorted(set(group[y].tolist())):
        keep = ~y | (group == g)
        out[g] = {"n_memorized": int((y & (group == g)).sum()),
                  "scorers": {k: fig(y[keep], v[rows][keep]) for k, v in scorers.items()}}
    return out


def criteria_note(checks: dict) -> str | None:
    """One line naming the acceptance criteria a lab model failed (``checks``: name -> bool, as ``memaudit.json``
    records them at build time), or None when it met them all. A model that fails them is still measured; what it
    measures is a finding about that model (docs/lab.md, "not an accepted instrument")."""
    failed = [name for name, ok in checks.items() if not ok]
    if not failed:
        return None
    attention = any(name.startswith("bos_mass") for name in failed)
    return (f"this lab model fails its acceptance criteria {', '.join(failed)}: it is not an accepted instrument"
            f"{' for attention-based claims (no attention sink on BOS)' if attention and len(failed) == 1 else ''}; "
            "its figures are findings about this model, not about Stable Diffusion (`memaudit docs lab`)")


def choose_layer(result: dict) -> str | None:
    """The cross-attention layer with the highest validation AUROC of attention entropy (ties: call order); None
    when the validation split lacks a class or no AUROC is finite (NaN compares false, so ``max`` returned the
    first layer, recorded as if chosen)."""
    val = result["validation"]
    layers = {k: v for k, v in val["layers"].items() if np.isfinite(v["auroc"])}
    if not val["n_memorized"] or not val["n_ordinary"] or not layers:
        return None
    return max(layers, key=lambda k: layers[k]["auroc"])
