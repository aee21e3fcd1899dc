"""Inference-time mitigation measured on a lab model: replication, adherence, distance, time (issue 14).

Runs the lab's own sampler (:func:`audit.lab.groundtruth.generate`: DDIM, the lab's seeds and noise, guidance
``--guidance``) on the lab's labelled prompts, once per arm:

* ``baseline``: no mitigation;
* ``c1 = VALUE`` for each ``--c1``: :class:`audit.mitigation.Mitigation` (BOS logit x c1 in the conditional
  rows, summary tokens masked in both halves) at every step;
* ``detect``: :class:`audit.mitigation.DetectAndMitigate` at the default c1 (1.25), the threshold being the
  ``1 - --fpr`` quantile of the first-step entropy of the VALIDATION split's ordinary prompts in this very
  sampler (a calibration at the sampler's step count), evaluated on the ``--split`` prompts.

The lab samples by calling the UNet directly, so each call declares its rows with ``Mitigation.set_prompts``
(one UNet batch per call: ``batch = prompts x seeds``).

Per arm, on the ``--split`` prompts:
* ``replication_rate``: share of the MEMORIZED prompts whose generations replicate a training image (at least
  ``MIN_REPLICATING`` of ``SEEDS`` seeds with the nearest-training-image distance below the lab's tau, the
  lab's own replication measure, same seeds in every arm);
* ``adherence``: share of the ORDINARY prompts' generations that pass the lab's adherence probe
  (``audit.lab.adherence.adheres``; null for a lab without the probe, e.g. lab v1);
* ``distance_to_baseline``: mean normalised centred distance of the ordinary prompts' generations to the
  baseline generation of the same seed (0 = unchanged);
* ``seconds`` of sampling (after one untimed warm-up sample); ``time_ratio`` = seconds(c1 = 1.25) /
  seconds(baseline).
``bos_mass``: the first step's attention mass on BOS in the detection layer(s), mean over memorized and
over ordinary prompts (the rule acts through BOS).

Training-time mitigation (``training``): read, not computed here, from two measured lab builds of the same
run, hook off and hook on (:func:`training_figures`; the protocol in docs/mitigation.md, "Lab measurements").

Command: ``memaudit lab mitigation [--model M] [--prompts P] [--json] [--c1 ...] [--training-on BUILD]``
(``benchmarks/mitigation_lab.py`` is the same with file output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types


def _lab(model_dir: str):
    from audit.errors import ModelError
    from audit.lab.data import DataConfig
    from audit.models import load_model

    model = load_model(model_dir, device="cpu", dtype="float32")
    extra = model.extra or {}
    if "data" not in extra or "ground_truth" not in extra:
        raise ModelError(f"{model_dir}: not a memaudit lab model (memaudit.json lacks data / ground_truth)")
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in extra["data"].items()
            if k in DataConfig.__dataclass_fields__}
    return model, DataConfig(**data), int(extra.get("train_steps", extra["ground_truth"]["train_steps"])), \
        float(extra["ground_truth"]["tau"])


def sample_arm(model, prompts, noise_ids, guidance, seeds, steps, chunk, arm=None):
    """Generations float32 [P, S, 3, H, W] and, for detection arms, (entropy, bos_mass, flagged) per row."""
    import numpy as np

    from audit.lab.groundtruth import generate
    from audit.mitigation.inference import prompt_lengths

    view = types.SimpleNamespace(unet=model.unet, tokenizer=model.tokenizer)
    images, entropy, bos, flagged = [], [], [], []
    for start in range(0, len(prompts), chunk):
        part, ids = prompts[start:start + chunk], noise_ids[start:start + chunk]
        kw = dict(seeds=seeds, steps=steps, batch=len(part) * seeds, noise_ids=ids)
        if arm is None:
            images.append(generate(model, part, guidance, **kw))
            continue
        with arm(view) as m:
            m.set_prompts(len(part) * seeds, prompt_lengths(model.tokenizer, part).repeat_interleave(seeds))
            images.append(generate(model, part, guidance, **kw))
        if getattr(m, "entropy", None) is not None:
            entropy.append(m.entropy.view(len(part), seeds).numpy())
            bos.append(m.bos_mass.view(len(part), seeds).numpy())
            flagged.append(m.flagged.view(len(part), seeds).numpy())
    images = np.concatenate(images)
    det = (np.concatenate(entropy), np.concatenate(bos), np.concatenate(flagged)) if entropy else None
    return images, det


def replicated(images, config, train_steps, tau):
    """bool [P]: at least MIN_REPLICATING seeds replicate (nearest training image closer than tau)."""
    import numpy as np

    from audit.lab.groundtruth import MIN_REPLICATING, nearest

    p, s = images.shape[:2]
    d, _ = nearest(images.reshape(p * s, *images.shape[2:]), config, train_steps)
    return np.sort(d.reshape(p, s), axis=1)[:, MIN_REPLICATING - 1] < tau


def replicated_arms(arms, config, train_steps, tau):
    """:func:`replicated` of several arms' generations (each [P_i, S, 3, H, W], the same S) in one pass over the
    training set, which is rendered anew on each pass (tens of seconds for the shipped lab); list of bool [P_i]."""
    import numpy as np

    rep = replicated(np.concatenate(arms), config, train_steps, tau)
    return np.split(rep, np.cumsum([len(a) for a in arms])[:-1])


def adherence(images, prompts):
    """Share of generations passing the lab's adherence probe, or None when the lab has none."""
    try:
        from audit.lab.adherence import adheres
    except ImportError:
        return None
    p, s = images.shape[:2]
    caps = [c for c in prompts for _ in range(s)]
    return float(adheres(images.reshape(p * s, *images.shape[2:]), caps).mean())


def distance_to(images, reference):
    """Mean normalised centred distance ||xc - yc|| / ||yc|| between paired generations."""
    import numpy as np

    from audit.lab.groundtruth import centred

    x = centred(images.reshape(-1, *images.shape[2:]))
    y = centred(reference.reshape(-1, *reference.shape[2:]))
    return float((np.linalg.norm(x - y, axis=1) / np.maximum(np.linalg.norm(y, axis=1), 1e-12)).mean())


def measure(model_dir: str, prompts_path: str, c1s=(1.1, 1.25, 1.5), guidance: float = 7.5, split: str = "test",
            fpr: float = 0.01, limit: int | None = None, seeds: int | None = None, steps: int | None = None,
            chunk: int = 64, mask_summary: bool = True, log=print) -> dict:
    """Run every arm and return the issue's JSON (see the module docstring).

    Raises:
        ValueError: before anything loads or samples: ``seeds`` below ``MIN_REPLICATING`` (a prompt replicates when
            that many of its seeds do), ``guidance`` not a finite number >= 0, ``fpr`` not a number strictly
            between 0 and 1, ``split`` not validation, test or all, ``limit`` or ``steps`` below 1, a c1 that
            :class:`audit.mitigation.inference.MitigationRule` refuses (``MitigationError``).
        audit.errors.ModelError: ``model_dir`` is not a lab model.
        audit.errors.RunError: before sampling, a table without ordinary prompts to calibrate the detect arm on
            (the validation split's, or the table's without a split column); an arm's generations are not finite
            (they would count as never replicated).
    """
    import math

    import numpy as np
    import polars as pl

    from audit.errors import RunError
    from audit.lab.evaluate import read_lab_table, split_rows
    from audit.lab.groundtruth import MIN_REPLICATING, SAMPLING_STEPS, SEEDS
    from audit.mitigation import DetectAndMitigate, Mitigation

    seeds = SEEDS if seeds is None else seeds
    if seeds < MIN_REPLICATING:
        raise ValueError(f"seeds {seeds}: at least {MIN_REPLICATING} (a prompt replicates when {MIN_REPLICATING} "
                         "of its seeds do)")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or guidance < 0:
        raise ValueError(f"guidance {guidance!r}: must be a finite number >= 0")
    steps = SAMPLING_STEPS if steps is None else steps
    # checked before the model loads: a bad fpr failed in np.quantile after every c1 arm was sampled (20 minutes),
    # a bad c1 when its arm started
    from audit.mitigation.inference import MitigationRule, is_number

    for c1 in c1s:
        MitigationRule(c1)
    if not is_number(fpr) or not 0 < float(fpr) < 1:
        raise ValueError(f"fpr {fpr!r}: must be a number strictly between 0 and 1 (the detect threshold is the "
                         "1 - fpr quantile of the validation split's ordinary prompts)")
    if split not in ("validation", "test", "all"):
        raise ValueError(f"split {split!r}: choose validation, test or all")
    for name, value in (("limit", limit), ("steps", steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} {value!r}: must be an integer >= 1")
    table = read_lab_table(prompts_path, split, require_split=False).with_row_index("_i")
    noise_col = "row" if "row" in table.columns else "_i"  # the labelling's noise ids
    ev = split_rows(table, split)
    mem = ev.filter(pl.col("memorized"))
    ordi = ev.filter(~pl.col("memorized"))
    val = table.filter((pl.col("split") == "validation") & ~pl.col("memorized")) if "split" in table.columns else ordi
    if not val.height:  # np.quantile of nothing failed after the baseline and every c1 arm were sampled
        raise RunError(f"{prompts_path}: the detect arm's threshold is calibrated on the "
                       f"{'validation split' if 'split' in table.columns else 'table'}'s ordinary prompts, and it has "
                       "none")
    if limit:
        mem, ordi, val = mem.head(limit), ordi.head(limit), val.head(limit)
    model, config, train_steps, tau = _lab(model_dir)
    trained = int(model.scheduler_config.get("num_train_timesteps", 1000))
    if steps > trained:  # DDIM's set_timesteps refused it at the first arm: "ValueError: `num_inference_steps`", exit 1
        raise RunError(f"--steps {steps}: more than the {trained} training timesteps of the model's scheduler (the "
                       f"lab samples with {SAMPLING_STEPS})")
    sets = {"memorized": mem, "ordinary": ordi}
    log(f"lab {model_dir}: {mem.height} memorized, {ordi.height} ordinary ({split}), tau {tau:.4f}, "
        f"guidance {guidance}, {seeds} seeds, {steps} steps")

    def run(arm, name):
        out, t0 = {}, time.perf_counter()
        for key, df in sets.items():
            out[key] = sample_arm(model, df["prompt"].to_list(), df[noise_col].to_list(), guidance, seeds, steps,
                                  chunk, arm)
            if not np.isfinite(out[key][0]).all():  # NaN images would count as "not replicated": a perfect score
                raise RunError(f"{name}: the {key} prompts' generations are not finite (guidance {guidance}, "
                               f"{steps} steps): no figure is reported")
        seconds = time.perf_counter() - t0
        log(f"{name}: sampled in {seconds:.1f}s")
        return out, seconds

    pending = []  # (figures, memorized generations): replication measured for every arm at once, at the end

    def figures(gen, seconds, base=None):
        fig = {"replication_rate": None,
               "adherence": adherence(gen["ordinary"][0], ordi["prompt"].to_list()) if ordi.height else None,
               "seconds": round(seconds, 3)}
        if base is not None and ordi.height:
            fig["distance_to_baseline"] = distance_to(gen["ordinary"][0], base["ordinary"][0])
        if mem.height:
            pending.append((fig, gen["memorized"][0]))
        return fig

    # detection in the lab model's own default layers (memaudit.json, chosen on the validation split), the ones
    # `memaudit run` scores with; without them DetectAndMitigate would take the 4th attn2 layer in call order
    layers = list(model.default_layers)
    detect_off = lambda view: DetectAndMitigate(view, threshold=None, layers=layers, mode="off")  # noqa: E731
    # an untimed warm-up (lazy initialization, first kernels): the first timed arm paid it, 10.1 s against 0.8 s
    # for each later arm with --limit 3, which made time_ratio 0.085
    first = next((df for df in sets.values() if df.height), None)
    if first is not None:
        sample_arm(model, first["prompt"].to_list()[:1], first[noise_col].to_list()[:1], guidance, seeds,
                   min(steps, 2), chunk, detect_off)
    base, base_s = run(detect_off, "baseline")  # detection only: the unmitigated generation plus step-0 attention
    result = {"baseline": figures(base, base_s)}
    result["baseline"]["bos_mass"] = {k: float(v[1][1].mean()) for k, v in base.items() if v[1] is not None}
    result["baseline"]["entropy"] = {k: float(v[1][0].mean()) for k, v in base.items() if v[1] is not None}
    per_c1 = {}
    for c1 in c1s:
        gen, sec = run(lambda view, c1=c1: Mitigation(view, c1=c1, mask_summary=mask_summary), f"c1={c1}")
        per_c1[f"{c1:g}"] = figures(gen, sec, base)
    result["c1"] = per_c1
    if "1.25" in per_c1 and base_s > 0:
        result["time_ratio"] = per_c1["1.25"]["seconds"] / base_s

    # detect-and-mitigate: threshold from the validation split's ordinary prompts in this sampler
    vgen = sample_arm(model, val["prompt"].to_list(), val[noise_col].to_list(), guidance, seeds, steps, chunk,
                      detect_off)[1]
    threshold = float(np.quantile(vgen[0].ravel(), 1 - fpr))
    gen, sec = run(lambda view: DetectAndMitigate(view, threshold=threshold, layers=layers, c1=1.25,
                                                  mask_summary=mask_summary), "detect")
    det = figures(gen, sec, base)
    det.update({"threshold": threshold, "fpr_target": fpr, "calibration_prompts": val.height, "layers": layers,
                "flagged_memorized": float(gen["memorized"][1][2].mean()) if mem.height else None,
                "false_flags_ordinary": int(gen["ordinary"][1][2].sum()) if ordi.height else None,
                "ordinary_images": ordi.height * seeds})
    overlap = set(val["prompt"].to_list()) & set(ordi["prompt"].to_list())
    if overlap:  # --split validation or all (or a table without splits): not an out-of-sample false-flag rate
        det["note"] = (f"{len(overlap)} of the {ordi.height} ordinary prompts evaluated also set the threshold "
                       f"(split {split}): false_flags_ordinary is near fpr_target by construction; --split test "
                       "evaluates on prompts the threshold never saw")
    if pending:
        for (fig, _), rep in zip(pending, replicated_arms([g for _, g in pending], config, train_steps, tau)):
            fig["replication_rate"] = float(rep.mean())
    return {
        "inference": result, "detect": det,
        "training": None, "training_note": "not measured: needs the lab retrained with the hook on and off "
                                           "(`memaudit docs mitigation`, Lab measurements, step 3)",
        "lab": {"model": model_dir, "fingerprint": model.fingerprint, "tau": tau, "split": split,
                "n_memorized": mem.height, "n_ordinary": ordi.height, "seeds": seeds, "steps": steps,
                "guidance": guidance, "limit": limit, "mask_summary": mask_summary},
    }


def training_figures(off: dict, on: dict) -> dict:
    """The issue's ``training`` object from two ``memaudit.json`` criteria (or build ``report.json``) dicts of the
    same run measured by the same code, hook off and hook on: per arm, the adherence at guidance 7.5, the
    memorized count and replication rate of the planted prompts per duplication tier (``criteria.replication``
    rows of group ``planted``; ``nearest_is_own``: memorized prompts whose nearest training image is their own
    planted image), and the memorized count over every evaluation prompt.

    Raises:
        KeyError: a dict without ``criteria.replication`` / ``adherence`` / ``counts`` (not a lab build)."""
    def arm(doc: dict) -> dict:
        crit = doc.get("criteria", doc)
        rows = crit["replication"]
        tiers = {}
        for r in rows:
            if r["group"] != "planted":
                continue
            t = tiers.setdefault(str(r["tier"]), {"n_prompts": 0, "n_memorized": 0, "nearest_is_own": 0,
                                                  "caption_duplication_mean": 0.0})
            t["caption_duplication_mean"] = ((t["caption_duplication_mean"] * t["n_prompts"] + r["n_prompts"]
                                              * r["caption_duplication_mean"]) / (t["n_prompts"] + r["n_prompts"]))
            t["n_prompts"] += r["n_prompts"]
            t["n_memorized"] += r["n_memorized"]
            t["nearest_is_own"] += r["nearest_is_own"]
        for t in tiers.values():
            t["replication_rate"] = t["n_memorized"] / t["n_prompts"] if t["n_prompts"] else None
        planted_n = sum(t["n_prompts"] for t in tiers.values())
        planted_m = sum(t["n_memorized"] for t in tiers.values())
        return {"adherence": crit["adherence"]["w7.5"],
                "replication_rate": planted_m / planted_n if planted_n else None,
                "memorized_planted": planted_m, "planted_prompts": planted_n,
                "memorized_all": crit["counts"]["memorized"], "by_tier": tiers}

    return {"off": arm(off), "on": arm(on)}


def main(argv=None) -> None:
    """``python benchmarks/mitigation_lab.py`` / ``python -m audit.lab.mitigation``: :func:`measure` with the
    options of ``argv``, the JSON to ``--json FILE`` or stdout. Bad options exit 2 before the model loads; a model
    that is not a lab model, an unusable table or non-finite generations exit 1, each with a one-line message."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--c1", type=float, action="append")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--split", default="test")
    ap.add_argument("--fpr", type=float, default=0.01)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--no-mask-summary", action="store_true", help="BOS scaling only (to separate its effect)")
    ap.add_argument("--json", help="write the result here (default: stdout)")
    a = ap.parse_args(argv)
    from audit.errors import KNOWN_ERRORS

    try:
        res = measure(a.model, a.prompts, tuple(a.c1 or (1.1, 1.25, 1.5)), a.guidance, a.split, a.fpr, a.limit,
                      a.seeds, a.steps, mask_summary=not a.no_mask_summary, log=lambda m: print(m, file=sys.stderr))
    except ValueError as exc:  # a bad option, before anything samples: a usage error (exit 2)
        ap.error(str(exc))
    except KNOWN_ERRORS as exc:  # not a lab model, an unreadable table, non-finite generations: one line, exit 1
        ap.exit(1, f"{ap.prog}: error: {exc}\n")
    text = json.dumps(res, indent=2)
    if a.json:
        with open(a.json, "w") as fh:
            fh.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
