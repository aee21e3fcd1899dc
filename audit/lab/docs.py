"""The measured-figures section of docs/lab.md, rendered from a lab model's ``memaudit.json``.

docs/lab.md states the shipped model's figures; they are written by this renderer from the model's own record
(``criteria``, measured at build time before any scorer ran, and ``evaluation``), and
``tests/test_lab.py`` checks that the document holds exactly the rendering of the shipped model, so the figures
in the document are the measured ones. Usage: ``python -m audit.lab.docs [MODEL_DIR]`` prints the section.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SD_SCHEDULE = ("scaled-linear 0.00085-0.012, 1000 steps", "epsilon", "leading, steps_offset 1", "981, 0.0058")


def _short(layer: str) -> str:
    return layer.replace(".transformer_blocks.0.attn2", "")


def _scorer_tables(ev: dict, split: str) -> list[str]:
    out = [f"### Scorers, {split} split ({ev['n_memorized']} memorized / {ev['n_ordinary']} not)", "",
           "| scorer | AUROC [95% CI] | TPR@1%FPR [CI] | TPR@3%FPR [CI] | TPR@1% nearest (Ren) |",
           "|---|---|---|---|---|"]
    for name, m in ev["scorers"].items():
        out.append(f"| {name} | {m['auroc']:.3f} [{m['auroc_ci'][0]:.3f}, {m['auroc_ci'][1]:.3f}] | "
                   f"{m['tpr_at_1pct_fpr']:.3f} [{m['tpr_at_1pct_fpr_ci'][0]:.3f}, {m['tpr_at_1pct_fpr_ci'][1]:.3f}] | "
                   f"{m['tpr_at_3pct_fpr']:.3f} [{m['tpr_at_3pct_fpr_ci'][0]:.3f}, {m['tpr_at_3pct_fpr_ci'][1]:.3f}] | "
                   f"{m['tpr_at_1pct_fpr_nearest']:.3f} |")
    out += ["", "| attention entropy, layer | AUROC [95% CI] | TPR@1%FPR [CI] | mean BOS mass |", "|---|---|---|---|"]
    for layer, m in ev["layers"].items():
        out.append(f"| {_short(layer)} | {m['auroc']:.3f} [{m['auroc_ci'][0]:.3f}, {m['auroc_ci'][1]:.3f}] | "
                   f"{m['tpr_at_1pct_fpr']:.3f} [{m['tpr_at_1pct_fpr_ci'][0]:.3f}, {m['tpr_at_1pct_fpr_ci'][1]:.3f}] | "
                   f"{ev['bos_mass_mean'][layer]:.3f} |")
    return out + [""]


def measured_figures(meta: dict) -> str:
    """The section "Measured figures" (markdown) of a lab model's ``memaudit.json`` dict ``meta``.

    Raises:
        KeyError: ``meta`` lacks ``criteria`` or ``evaluation`` (not a built lab model).
    """
    c, ev = meta["criteria"], meta["evaluation"]
    s, te, adh = c["schedule"], c["text_encoder"], c["adherence"]
    variant = "masked variant" if meta.get("unet_encoder_attention_mask") else "faithful variant"
    out = [f"## Measured figures (shipped model, {variant}, {meta['train_steps']:,} steps)", ""]
    if meta.get("unet_encoder_attention_mask"):
        out += ["Every figure below that involves attention was measured on a model that masks EOS and padding out "
                "of the UNet's cross-attention (SD does not; the summary-token half of Ren et al.'s mitigation is a "
                "no-op here).", ""]
    out += ["### Schedule", "", "| | SD 1.x | lab v2 |", "|---|---|---|",
            f"| betas | {SD_SCHEDULE[0]} | {s['beta_schedule']} {s['beta_start']:g}-{s['beta_end']:g}, "
            f"{s['num_train_timesteps']} steps |",
            f"| prediction | {SD_SCHEDULE[1]} | {s['prediction_type']} |",
            f"| DDIM spacing | {SD_SCHEDULE[2]} | {s['timestep_spacing']}, steps_offset {s['steps_offset']} |",
            f"| t0 (50 steps), alpha_bar(t0) | {SD_SCHEDULE[3]} | {s['first_timestep']}, {s['alpha_bar_t0']:.4f} |",
            "", "### Text-encoder outputs (100 held-out captions)", "",
            "| position | norm | largest channel / median channel |", "|---|---|---|"]
    for pos in ("bos", "prompt", "eos", "pad"):
        out.append(f"| {pos} | {te[pos]['norm']:.2f} | {te[pos]['max_over_median']:.2f} |")
    out += ["", f"cross-prompt cosine of padding position 76: {te['pad_cos_across_prompts']:.3f}; within-prompt "
                f"cosine of padding: {te['pad_cos_within_prompt']:.3f}; cos(BOS, pad): {te['bos_pad_cos']:.3f}", "",
            f"### Attention regime at t0 = {c['attention_regime']['t0']} (held-out ordinary captions, 4 noise draws)",
            "", "| layer | BOS | prompt | EOS | padding |", "|---|---|---|---|---|"]
    for layer, m in c["attention_regime"]["layers"].items():
        out.append(f"| {_short(layer)} | {m['bos']:.3f} | {m['prompt']:.3f} | {m['eos']:.3f} | {m['pad']:.3f} |")
    out += ["", "### Adherence (held-out captions x 4 seeds)", "",
            f"w = 7.5: {adh['w7.5']:.3f}; w = 1: {adh['w1']:.3f}; true images {adh['references']['true_images']:.3f}; "
            f"mismatched images {adh['references']['other_images']:.3f}", "",
            "### Replication per duplication level and kind", "",
            "| prompts | kind | n | caption dup. (mean) | image dup. (mean) | memorized | >=2 seeds at w=1 | at w=7.5 "
            "| median distance |", "|---|---|---|---|---|---|---|---|---|"]
    for r in c["replication"]:
        name = f"planted level {r['tier']}" if r["group"] == "planted" else r["group"]
        out.append(f"| {name} | {r['kind'] or '-'} | {r['n_prompts']} | {r['caption_duplication_mean']:.0f} | "
                   f"{r['image_duplication_mean']:.0f} | {r['n_memorized']} | {r['rep_w1_ge2']} | {r['rep_w7_5_ge2']} | "
                   f"{r['median_distance']:.2f} |")
    n = c["counts"]
    out += ["", f"Counts: {n['memorized']} memorized / {n['not_memorized']} not (validation "
                f"{n['by_split']['validation']}, test {n['by_split']['test']}); tau = {meta['ground_truth']['tau']:.3f}",
            "", f"checks: {json.dumps(c['checks'])}", ""]
    out += _scorer_tables(ev["test"], "test") + _scorer_tables(ev["validation"], "validation")
    layer = meta["default_layers"][0]
    planted = [r for r in c["replication"] if r["group"] == "planted"]
    own, mem = sum(r["nearest_is_own"] for r in planted), sum(r["n_memorized"] for r in planted)
    out += ["", f"Default layer of the attention-entropy scorer: `{layer}` (highest validation AUROC, "
                f"{ev['validation']['layers'][layer]['auroc']:.3f}). Every memorized planted prompt whose nearest "
                f"training image is its own: see `nearest_is_own` in `prompts.parquet` ({own} of {mem} memorized "
                f"planted prompts; the other {mem - own} replicate another planted image). The scorers were evaluated "
                "once, after the criteria were written; nothing about data or model was changed after."]
    return "\n".join(out) + "\n"


def comparison(metas: dict[str, dict]) -> str:
    """A markdown table of the headline figures of several lab models (label -> ``memaudit.json`` dict): the
    training steps, the two unmet criteria (adherence at w = 7.5, highest BOS mass), the memorized counts, and the
    test-split AUROC of the two detectors."""
    out = ["| model | steps | adherence (w = 7.5) | BOS mass, highest layer | memorized / not | planted memorized "
           "| test AUROC noise_magnitude | test AUROC attention_entropy |", "|---|---|---|---|---|---|---|---|"]
    for label, m in metas.items():
        c, ev = m["criteria"], m["evaluation"]["test"]["scorers"]
        bos = max(v["bos"] for v in c["attention_regime"]["layers"].values())
        planted = sum(r["n_memorized"] for r in c["replication"] if r["group"] == "planted")
        n_planted = sum(r["n_prompts"] for r in c["replication"] if r["group"] == "planted")
        out.append(f"| {label} | {m['train_steps']:,} | {c['adherence']['w7.5']:.3f} | {bos:.3f} | "
                   f"{c['counts']['memorized']} / {c['counts']['not_memorized']} | {planted} / {n_planted} | "
                   f"{ev['noise_magnitude']['auroc']:.3f} [{ev['noise_magnitude']['auroc_ci'][0]:.3f}, "
                   f"{ev['noise_magnitude']['auroc_ci'][1]:.3f}] | {ev['attention_entropy']['auroc']:.3f} "
                   f"[{ev['attention_entropy']['auroc_ci'][0]:.3f}, {ev['attention_entropy']['auroc_ci'][1]:.3f}] |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    """``python -m audit.lab.docs [MODEL_DIR]``: print docs/lab.md's "Measured figures" section from the lab model's
    ``memaudit.json`` (default: the bundled model)."""
    import argparse

    from audit.lab import LAB_MODEL_DIR

    parser = argparse.ArgumentParser(prog="python -m audit.lab.docs",
                                     description="Print the 'Measured figures' section of the lab guide "
                                                 "(`memaudit docs lab`) from a lab model's memaudit.json.")
    parser.add_argument("model", nargs="?", type=Path, default=LAB_MODEL_DIR, help="lab model folder "
                        "(default: the bundled one)")
    model = parser.parse_args(sys.argv[1:] if argv is None else argv).model
    meta = json.loads((model / "memaudit.json").read_text()) if (model / "memaudit.json").is_file() else None
    if not isinstance(meta, dict) or "criteria" not in meta or "evaluation" not in meta:
        parser.error(f"{model}: not a lab model folder (its memaudit.json has no criteria and evaluation)")
    sys.stdout.write(measured_figures(meta))


if __name__ == "__main__":
    main()
