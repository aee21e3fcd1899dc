"""Evaluation of every scorer, and of the attention entropy per cross-attention layer, on the lab's labels.

Metrics (scikit-learn): AUROC (``roc_auc_score``) with memorized as the positive class and a higher score
meaning riskier; TPR at 1% and 3% FPR read off ``roc_curve(drop_intermediate=False)`` as the TPR of the
LAST ROC point whose FPR is at or below the target (the convention of Wen et al., ICLR 2024, sec. 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FPR_TARGETS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_3pct_fpr": 0.03}
NOISE_DRAWS = 4
EVAL_SEED = 0


def metrics(labels: np.ndarray, scores: np.ndarray) -> dict:
    """AUROC and TPR at 1% / 3% FPR of ``scores`` (float [N], higher = riskier) against bool ``labels`` [N].

    Non-finite scores count as the least risky. Returns ``{"auroc", "tpr_at_1pct_fpr", "tpr_at_3pct_fpr"}``.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any():  # one class: undefined
        return {"auroc": float("nan"), **{name: float("nan") for name in FPR_TARGETS}}
    s = np.where(np.isfinite(s), s, -np.inf if np.isfinite(s).any() else 0.0)
    s = np.where(np.isneginf(s), np.nanmin(s[np.isfinite(s)]) - 1 if np.isfinite(s).any() else 0.0, s)
    out = {"auroc": float(roc_auc_score(y, s))}
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    for name, target in FPR_TARGETS.items():
        out[name] = float(tpr[np.flatnonzero(fpr <= target + 1e-12)[-1]])
    return out


@dataclass
class LabScores:
    """Scores of the labelled prompts. ``scorers``: name -> float64 [N]; ``layers``: attn2 path -> entropy
    float64 [N] (that layer alone); ``bos_mass``: layer -> float64 [N]."""

    scorers: dict
    layers: dict
    bos_mass: dict


def score_prompts(model, prompts: list[str], noise_draws: int = NOISE_DRAWS, seed: int = EVAL_SEED,
                  batch: int = 128) -> LabScores:
    """Score ``prompts`` with every scorer (the model's default layers for attention entropy) and the
    attention entropy of every cross-attention layer on its own (same seeded latents as the scorer)."""
    import torch

    from audit.capture import CrossAttentionCapture, cross_attention_layers
    from audit.scorers import ScoreConfig, Scorer, attention_entropy, tokenize

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
            tok = tokenize(model.tokenizer, chunk, model.max_length)
            c = sc.encode(tok.input_ids).repeat_interleave(noise_draws, dim=0)
            x = sc.latents(chunk)
            with CrossAttentionCapture(model.unet, layers, early_exit=True) as cap:
                probs = cap.run(lambda: model.unet(x, sc.t0.to(model.device), encoder_hidden_states=c).sample)
        for name in layers:
            a = probs[name].float().view(len(chunk), noise_draws, -1).mean(dim=1).double()
            per_layer[name].append(attention_entropy(a).cpu().numpy())
            bos[name].append(a[:, 0].cpu().numpy())
    cat = lambda d: {k: np.concatenate(v) for k, v in d.items()}  # noqa: E731
    return LabScores(cat(scorers), cat(per_layer), cat(bos))


def evaluate(model, table, noise_draws: int = NOISE_DRAWS) -> dict:
    """Score the labelled prompts of ``table`` (a polars DataFrame with prompt, memorized, split) and
    return, per split ("validation", "test", "all"), ``{"n_memorized", "n_ordinary", "scorers": {name:
    metrics}, "layers": {attn2 path: metrics}}`` plus ``"default_layers"``."""
    scores = score_prompts(model, table["prompt"].to_list(), noise_draws=noise_draws)
    y = table["memorized"].to_numpy()
    split = table["split"].to_numpy()
    out = {"model": model.name, "fingerprint": model.fingerprint, "default_layers": list(model.default_layers),
           "noise_draws": noise_draws}
    for name in ("validation", "test", "all"):
        m = np.ones(len(y), bool) if name == "all" else split == name
        out[name] = {
            "n_memorized": int(y[m].sum()), "n_ordinary": int((~y[m]).sum()),
            "scorers": {k: metrics(y[m], v[m]) for k, v in scores.scorers.items()},
            "layers": {k: metrics(y[m], v[m]) for k, v in scores.layers.items()},
            "bos_mass_mean": {k: float(v[m].mean()) for k, v in scores.bos_mass.items()},
        }
    out["_scores"] = scores
    return out


def choose_layer(result: dict) -> str:
    """The cross-attention layer with the highest validation AUROC of attention entropy (ties: call order)."""
    layers = result["validation"]["layers"]
    return max(layers, key=lambda k: layers[k]["auroc"])
