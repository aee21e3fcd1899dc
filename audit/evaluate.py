"""``memaudit eval``: every chosen scorer on a labelled prompt table, for any model.

Owns reading and checking the labelled table, scoring it with each scorer (timed: prompts per second in
this run), and the per-layer attention entropy; the metrics and their bootstrap CIs are
:mod:`audit.eval`'s (AUROC; TPR at 1% and 3% FPR, the last ROC point with FPR strictly below the target, and
Ren et al.'s nearest-point convention under ``..._nearest``; 95% class-stratified percentile bootstrap).
Must not import engines, outputs or reporting; torch and the scorers are imported when scoring.

The labelled table: Parquet, CSV or JSONL with a prompt column (``prompt`` by default) and a BOOLEAN
``memorized`` column (True = memorized, the positive class); both classes must be present.
"""

from __future__ import annotations

from pathlib import Path
import time

import numpy as np

from audit.errors import MemauditError, RunError
from audit.eval import N_BOOT

ATTENTION_SCORERS = ("attention_entropy",)  # scorers with a per-layer variant (``--layers all``)


def forwards_per_prompt(spec, noise_draws: int = 1, num_inference_steps: int = 50) -> float:
    """UNet forwards per prompt: the registry's cost per draw times the draws; a sampling scorer costs
    2 forwards (conditional, unconditional) per step."""
    per_draw = 2.0 * num_inference_steps if spec.forward == "full_sampling" else spec.unet_forwards
    return per_draw * noise_draws


def read_labelled(path: str | Path, prompt_column: str = "prompt", label_column: str = "memorized"):
    """``(prompts list[str], labels bool [N])`` from a Parquet, CSV or JSONL file.

    Raises:
        RunError: unreadable file, missing prompt or label column, a prompt column that is not text, a null or
            empty prompt, a prompt labelled both ways, a non-boolean or null label, no memorized or no ordinary
            prompt (one line naming the problem).
    """
    return labelled_rows(read_table(path, prompt_column), path, prompt_column, label_column)


_TABLE_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".jsonl", ".json", ".ndjson")


def read_table(path: str | Path, prompt_column: str | None = None):
    """The whole file as a pyarrow Table: Parquet, or CSV/TSV/JSONL by suffix in either case (``LABELS.CSV`` is a CSV,
    as for ``memaudit run``). A CSV/TSV's ``prompt_column`` is read as the bytes written (binary; decoded and checked
    by :func:`labelled_rows`), never typed by its look: prompts such as ``1984`` are text, as ``memaudit run`` reads
    them, and a file that is not UTF-8 is named as such instead of reading as a "binary" column.

    A folder is read only as Parquet (no suffix, or ``.parquet``: a dataset of Parquet parts, such as Spark writes).

    Raises:
        RunError: a URL (``s3://...``: a local file only), no such file, another suffix than those above (a file
            without one is read as Parquet), a folder named as a CSV/TSV/JSON file or holding no Parquet file, a
            memaudit run folder (``manifest.json`` or ``run.json``: no labels), an empty file (0 bytes), or a
            file that cannot be read as its format (the reader's error named).
    """
    import re

    if m := re.match(r"([A-Za-z][A-Za-z0-9+.-]+):/+(.*)", str(path)):  # a Path made of s3://b/x reads s3:/b/x
        raise RunError(f"{m[1]}://{m[2]}: a URL; memaudit eval reads a labelled table from a local file (copy it here "
                       "first; `memaudit run` reads URLs, eval does not)")
    path = Path(path)
    suffix = path.suffix.lower()  # LABELS.CSV was read as Parquet ("Parquet magic bytes not found")
    if suffix not in _TABLE_SUFFIXES and suffix:  # a .txt of prompts has no labels: it was read as Parquet too
        raise RunError(f"{path}: a labelled table is Parquet, CSV, TSV or JSON lines ({', '.join(_TABLE_SUFFIXES)}), "
                       f"with a prompt and a label column; not {suffix}")
    if suffix not in ("", ".parquet", ".pq") and path.is_dir():  # a .csv folder was "cannot read (OSError: ...)"
        raise RunError(f"{path}: is a folder, not a labelled table (give the {suffix[1:].upper()} file itself)")
    if path.is_dir() and any((path / name).is_file() for name in ("manifest.json", "run.json")):
        # read as a dataset of Parquet parts: "cannot read (ArrowInvalid: ... 'manifest.json' ... Parquet magic bytes
        # not found in footer ...)"
        raise RunError(f"{path}: is a memaudit run folder, not a labelled table: memaudit eval scores a table of "
                       "prompts with a label column (true = memorized); a run's risk.parquet holds no labels (join "
                       "its prompts with yours into one Parquet, CSV or JSON-lines file)")
    if path.is_file() and path.stat().st_size == 0:  # "cannot read (ArrowInvalid: Empty CSV file)", or Parquet's
        raise RunError(f"{path}: is empty (0 bytes): a labelled table needs a prompt and a label column, with rows")
    try:
        if suffix in (".csv", ".tsv"):
            from pyarrow import csv

            import pyarrow as pa

            opts = csv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
            types = {prompt_column: pa.binary()} if prompt_column else {}  # ignored when the file lacks the column
            return csv.read_csv(path, parse_options=opts, convert_options=csv.ConvertOptions(column_types=types))
        if suffix in (".jsonl", ".json", ".ndjson"):
            from pyarrow import json as pjson

            try:
                return pjson.read_json(path)
            except Exception:
                with open(path, "rb") as f:  # one JSON document (an array of records, pandas' to_json) read as lines
                    start = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
                if start == b"[":
                    raise RunError(f"{path}: a JSON array; a labelled table in JSON is JSON lines, one object a line "
                                   '({"prompt": ..., "memorized": true}; pandas: to_json(path, orient="records", '
                                   "lines=True))") from None
                raise
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if table.num_columns == 0 and path.is_dir():  # it read as a table of no column: "no prompt column (columns: )"
            raise RunError(f"{path}: is a folder holding no Parquet file, not a labelled table")
        return table
    except FileNotFoundError:
        raise RunError(f"{path}: no such file") from None
    except RunError:
        raise
    except Exception as exc:
        raise RunError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def labelled_rows(table, path: str | Path, prompt_column: str = "prompt", label_column: str = "memorized",
                  label_option: str | None = None):
    """``(prompts list[str], labels bool [N])`` of a labelled pyarrow ``table`` read from ``path``: prompts
    normalized as ``memaudit run`` does (:func:`audit.sources.normalize_prompt`), each distinct prompt once
    (in order of first appearance; a repeated prompt would weigh more in AUROC and TPR). ``label_option``: the
    command's option that names the label column (``--label-column``), pointed to when the column is missing.

    Raises:
        RunError: as :func:`read_labelled` (``path`` names the table in the message), and ``label_column`` the
            same as ``prompt_column``.
    """
    import pyarrow as pa

    names = table.column_names
    if twice := [c for c in dict.fromkeys((prompt_column, label_column)) if names.count(c) > 1]:
        raise RunError(f"{path}: the header names column {twice[0]!r} {names.count(twice[0])} times: which one holds "
                       "the prompts or labels is ambiguous")
    if prompt_column not in names:
        sep = next((c for c in ";\t|" if len(names) == 1 and c in names[0]), None)  # one column: another separator
        raise RunError(f"{path}: no prompt column {prompt_column!r} (columns: {', '.join(map(repr, names))})"
                       + (f"; the header is one column holding {sep!r}: a CSV is read separated by commas (a .tsv file"
                          " by tabs), save it so" if sep else "; see --prompt-column"))
    if label_column not in names:
        raise RunError(f"{path}: no label column {label_column!r} (columns: {', '.join(map(repr, names))})"
                       + (f"; see {label_option}" if label_option else ""))
    if label_column == prompt_column:  # its prompts were refused as labels: "is binary, not boolean; b'a red cat'"
        raise RunError(f"{path}: the label column {label_column!r} is the prompt column too: name the column that "
                       f"holds the labels (true/false or 1/0){f' with {label_option}' if label_option else ''}")
    if table.num_rows == 0:  # (a header-only CSV's label column reads as null-typed: "null, not boolean" misled)
        raise RunError(f"{path}: no rows: a labelled table needs memorized and ordinary prompts")
    col = table.column(label_column)
    from audit.sources import is_blank, is_text, normalize_prompt, text_values

    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):  # refused below; bytes unchecked (JSON)
        values = text_values(col.combine_chunks(), lossy=True)[0]  # a bad byte crashed (UnicodeDecodeError)
    else:
        values = col.to_pylist()

    def rows(where: list[int]) -> str:  # "row 2, 5" (0-based data rows), at most five
        return f"row {', '.join(map(str, where[:5]))}{' ...' if len(where) > 5 else ''}"

    if col.null_count:  # which rows: a CSV's empty field, NA or NaN, a JSON null, pandas' NaN or pd.NA
        raise RunError(f"{path}: label column {label_column!r} has {col.null_count} null value(s) "
                       f"({rows([i for i, v in enumerate(values) if v is None])}): every prompt needs a label, "
                       "true/false or 1/0")
    if pa.types.is_integer(col.type) and set(values) <= {0, 1}:  # 0/1 labels (a CSV's 1 and 0) are booleans
        values = [v == 1 for v in values]
    elif not pa.types.is_boolean(col.type):
        text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)  # '1', not 1: quoted as such
        # NaN last (it sorted anywhere); no values of a nested type (a struct: pandas' default to_json, by column)
        seen = [] if pa.types.is_nested(col.type) else sorted(set(values), key=lambda v: (v != v, v))[:5]
        if text:  # a CSV column of true/false with one 'yes' reads as text: name the rows that are no label at all
            odd = [i for i, v in enumerate(values) if str(v).strip().lower() not in ("true", "false", "1", "0")]
        else:
            odd = [i for i, v in enumerate(values) if v not in (0, 1)] if seen else []  # NaN: not 0 or 1
        raise RunError(f"{path}: label column {label_column!r} is {col.type}, not boolean (true/false, or integers 0/1)"
                       + (f"; values seen: {', '.join(map(repr if text else str, seen))}" if seen else "")
                       + (f" ({rows(odd)} not {'true/false or ' if text else ''}0/1)" if 0 < len(odd) < len(values)
                          else "")
                       + ("; each label is a nested value: a JSON table is one object a line (pandas: "
                          'to_json(path, orient="records", lines=True))' if pa.types.is_nested(col.type) else ""))
    labels = np.asarray(values, dtype=bool)
    check_labels(labels, str(path))
    texts = table.column(prompt_column).combine_chunks()
    if not is_text(texts.type):  # (pandas' category is judged by its values' type)
        kind = texts.type.value_type if pa.types.is_dictionary(texts.type) else texts.type
        raise RunError(f"{path}: prompt column {prompt_column!r} is {kind}, not text")
    # string or binary (a CSV's field bytes, Parquet bytes), decoded as `memaudit run` decodes them: pyarrow does not
    # check a JSON-lines or Parquet string's bytes, and invalid UTF-8 was a UnicodeDecodeError (exit 1)
    raw, bad_utf8 = text_values(texts)
    if bad := [i for i, b in enumerate(bad_utf8) if b]:
        raise RunError(f"{path}: {len(bad)} row(s) whose prompt is not valid UTF-8 ({rows(bad)}; 0-based data "
                       "rows): save the table as UTF-8 (`memaudit run` rejects such rows as invalid_utf8)")
    from audit.unit import MAX_PROMPT_CHARS

    if long := [i for i, p in enumerate(raw) if p is not None and len(p) > MAX_PROMPT_CHARS]:  # was scored: 1.5 MB
        raise RunError(f"{path}: {len(long)} row(s) with a prompt of more than {MAX_PROMPT_CHARS:,} characters "  # 23 s
                       f"({rows(long)}): `memaudit run` rejects such prompts as prompt_too_long")
    prompts = [normalize_prompt(p) if p is not None else "" for p in raw]  # as `memaudit run` does
    if blank := [i for i, p in enumerate(prompts) if is_blank(p)]:
        raise RunError(f"{path}: {len(blank)} row(s) with a null or empty prompt ({rows(blank)}): a labelled table "
                       "needs a prompt in every row")
    first_label: dict[str, tuple[bool, int]] = {}
    for i, (p, label) in enumerate(zip(prompts, labels)):
        first, at = first_label.setdefault(p, (bool(label), i))
        if first != bool(label):
            # the rows' text may differ (NFD and NFC, a trailing space) and print alike: name both rows
            same = "" if raw[at] == raw[i] else (", whose text differs only in Unicode normalization (NFC) or "
                                                 "surrounding spaces, one prompt to memaudit")
            raise RunError(f"{path}: the prompt {p[:80]!r} is labelled both memorized and ordinary (row {at} "
                           f"{'memorized' if first else 'ordinary'}, row {i} {'memorized' if label else 'ordinary'}; "
                           f"0-based data rows{same})")
    if len(first_label) < len(prompts):  # a prompt counts once in AUROC and TPR, however often it is listed
        prompts = list(first_label)
        labels = np.fromiter((label for label, _ in first_label.values()), dtype=bool, count=len(first_label))
    return prompts, labels


MAX_BOOTSTRAP = 100_000  # resamples of the CIs: one Python loop step each; a bound against a typo, 100x the default


def eval_options_problem(noise_draws, num_inference_steps, batch_size, n_boot, seed=0, scorers=()) -> str | None:
    """Why :func:`evaluate`'s numeric options cannot be used (one line naming the CLI flags too), or None. The
    fewest ``--steps`` are each scorer's of ``scorers`` (:func:`audit.scorers.registry.steps_problem`: 3 for
    guidance_geometry, which reads ``timesteps[-3]``), as ``memaudit run`` checks them; 1 otherwise."""
    values = {"noise_draws": noise_draws, "num_inference_steps": num_inference_steps, "batch_size": batch_size,
              "n_boot": n_boot, "seed": seed}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            return f"{name} must be an integer, not {type(value).__name__}"
    for flag, name, value in (("--noise-draws", "noise_draws", noise_draws),
                              ("--steps", "num_inference_steps", num_inference_steps),
                              ("--batch-size", "batch_size", batch_size), ("--bootstrap", "n_boot", n_boot)):
        if value < 1:  # the one given wrong, by name and value (the line named all four, whichever it was)
            return f"{flag} {value} ({name}): must be at least 1"
    if n_boot > MAX_BOOTSTRAP:  # checked before the model loads: the resamples are drawn after every prompt scored
        return (f"--bootstrap {n_boot} (n_boot): give 1 to {MAX_BOOTSTRAP:,} resamples (each one recomputes every "
                "figure; the default 1,000 gives stable 95% CIs)")
    from audit.config import MAX_NOISE_DRAWS
    from audit.scorers.registry import SCORERS, steps_problem

    if noise_draws > MAX_NOISE_DRAWS:
        return (f"--noise-draws {noise_draws}: give 1 to {MAX_NOISE_DRAWS:,} (each draw is one more UNet row per "
                "prompt: K draws cost K times one)")
    for name in scorers:
        if name in SCORERS and (problem := steps_problem(SCORERS[name], int(num_inference_steps))):
            return problem
    return None


def unmeasurable(pct: int, n_ordinary: int) -> bool:
    """Whether ``n_ordinary`` ordinary prompts are too few to measure a TPR at ``pct``% FPR: with 100/pct or fewer,
    one false positive is already ``pct``% FPR or more, so the last ROC point below it is at FPR 0
    (:func:`small_sample_warnings`)."""
    return pct * n_ordinary <= 100


def small_sample_warnings(n_memorized: int, n_ordinary: int) -> list[str]:
    """What the labelled table is too small to measure: a TPR at x% FPR, read at the last ROC point with FPR
    strictly below x%, needs more than 100/x ordinary prompts (with 100/x or fewer, one false positive is already
    x% FPR or more, so only FPR 0 is read: 100 prompts for 1% are one too few), and a few prompts per class give
    wide, unstable CIs."""
    out = []
    for pct in (1, 3):
        if unmeasurable(pct, n_ordinary):
            out.append(f"{n_ordinary} ordinary prompts cannot measure TPR at {pct}% FPR (one false positive is "
                       f"already {100 / max(n_ordinary, 1):.3g}% FPR, not below {pct}%; it needs at least "
                       f"{100 // pct + 1})")
    if min(n_memorized, n_ordinary) < 10:
        out.append(f"{n_memorized} memorized and {n_ordinary} ordinary prompts: too few for a stable AUROC "
                   "(its bootstrap CI understates the uncertainty with under 10 of a class)")
    return out


def tied_past(pct: int, figures: dict) -> bool:
    """Whether the top ordinary scores of ``figures`` (an :func:`audit.eval.metrics` result) tie in a block of
    ``pct``% of the ordinary prompts or more (``min_nonzero_fpr`` >= pct / 100), so that a TPR at ``pct``% FPR is
    read at FPR 0 however many ordinary prompts there are. False without ``min_nonzero_fpr`` (NaN, or figures
    recorded before it was)."""
    step = figures.get("min_nonzero_fpr", float("nan"))
    return bool(step == step and step >= pct / 100)


def tied_fpr_warnings(scorers: dict, layers: dict, n_ordinary: int) -> list[str]:
    """One line for each scorer (``scorers``: name -> :func:`audit.eval.metrics` figures) and cross-attention layer
    (``layers``: scorer -> {layer: figures}, named ``SCORER @ LAYER``) whose TPR at x% FPR is read at FPR 0 although
    ``n_ordinary`` ordinary prompts could measure x% (:func:`unmeasurable` is False): its top ordinary scores tie in a
    block of x% of them or more (:func:`tied_past`), so no threshold flags more than none but fewer than x%."""
    named = list(scorers.items()) + [(f"{s} @ {layer}", f) for s, per in layers.items() for layer, f in per.items()]
    out = []
    for name, f in named:
        tied = [pct for pct in (1, 3) if not unmeasurable(pct, n_ordinary) and tied_past(pct, f)]
        if tied:
            k = round(f["min_nonzero_fpr"] * n_ordinary)
            out.append(f"{name}: TPR at {' and '.join(f'{p}%' for p in tied)} FPR read at FPR 0: its {k} highest "
                       f"ordinary scores tie ({100 * k / n_ordinary:.3g}% of {n_ordinary}), so no threshold flags more "
                       f"than none but fewer than {tied[-1]}% of the ordinary prompts (marked †)")
    return out


def result_warnings(result: dict) -> list[str]:
    """What an :func:`evaluate` result's figures cannot be trusted for, one line each: too few prompts
    (:func:`small_sample_warnings`), then each scorer's prompts with a non-finite score, then each TPR read at FPR 0
    on tied ordinary scores (:func:`tied_fpr_warnings`), then each scorer's figures whose bootstrap CI has zero width
    (:func:`zero_width_warning`; not with one resample, whose every CI is one point: :func:`bootstrap_warnings` says
    so), then what the model folder loaded was not (``model_notes``:
    :func:`audit.models.base.model_notes`, a fp16 variant beside the weights, ...)."""
    return small_sample_warnings(result["n_memorized"], result["n_ordinary"]) + bootstrap_warnings(
        result.get("n_boot", N_BOOT)) + [
        (f"{name}: every prompt's score ({r['n_nonfinite']}, {r['n_nonfinite_memorized']} memorized) was non-finite: "
         "no AUROC or TPR (n/a, null in --json); `memaudit run` rejects such prompts as nonfinite_attention"
         if r["n_nonfinite"] == result["n_memorized"] + result["n_ordinary"] else
         f"{name}: {r['n_nonfinite']} prompt(s) ({r['n_nonfinite_memorized']} memorized) got a non-finite score, "
         "counted as least risky (never a detection); `memaudit run` rejects them as nonfinite_attention")
        for name, r in result["scorers"].items() if r["n_nonfinite"]] + tied_fpr_warnings(
        result["scorers"], result.get("layers", {}), result["n_ordinary"]) + (zero_width_warnings(
            result["scorers"], result.get("layers", {}), result["n_memorized"], result["n_ordinary"])
            if result.get("n_boot", N_BOOT) > 1 else []) + list(  # one resample: every CI is one point (said above)
        result.get("model_notes", []))


def zero_width_warnings(scorers: dict, layers: dict, n_memorized: int, n_ordinary: int) -> list[str]:
    """:func:`zero_width_warning` of each scorer (``scorers``: name -> figures), then of each cross-attention layer
    (``layers``: scorer -> {layer: figures}, as ``--layers all`` gives them, named ``SCORER @ LAYER``): those
    whose figures have a CI of zero width, one line each."""
    named = list(scorers.items()) + [(f"{s} @ {layer}", f) for s, per in layers.items() for layer, f in per.items()]
    return [w for name, f in named if "auroc_ci" in f and (w := zero_width_warning(name, f, n_memorized, n_ordinary))]


CI_LEVEL = 0.95  # the level of every CI of audit.eval (its bootstrap_ci default)


def bootstrap_warnings(n_boot: int) -> list[str]:
    """A warning when ``n_boot`` resamples are too few for a 95% percentile interval: its limits are the 2.5th and
    97.5th percentiles of the resampled figures (numpy's linear interpolation between order statistics), so with
    fewer than 1 / 0.025 = 40 resamples each tail holds less than one and the limits are about the resamples' least
    and greatest values, whatever the level (Efron & Tibshirani 1993, ch. 13 and 19, ask for 1,000 or more for
    percentile intervals)."""
    tail = (1 - CI_LEVEL) / 2
    if n_boot * tail >= 1:
        return []
    return [f"--bootstrap {n_boot} (n_boot): a 95% CI's limits are the 2.5th and 97.5th percentiles of the resampled "
            f"figures, and {n_boot} resample(s) put fewer than one in each tail, so every CI printed is about their "
            f"range, not a 95% interval; give {N_BOOT:,} (the default) or more"]


def zero_width_warning(name: str, figures: dict, n_memorized: int, n_ordinary: int) -> str | None:
    """One line naming the printed figures of scorer ``name`` (AUROC, TPR at 1% and 3% FPR; ``figures``: an
    :func:`evaluate` scorer entry with their ``_ci`` pairs) whose 95% bootstrap CI has zero width, or None.

    Every resample then gave the same value: the percentile bootstrap (Efron & Tibshirani 1993, ch. 13) resamples
    the observed prompts only, so a figure at 0 or 1 (every memorized prompt above every ordinary one, or none
    detected) or scores that are all equal give an "interval" of one point, which says nothing of the figure's
    uncertainty: 50 of 50 memorized prompts detected is [1.000, 1.000], though a true TPR of 0.95 detects all 50
    with probability 0.08. For a TPR at 0 or 1 the line gives the exact (Clopper-Pearson 1934) 95% interval of a
    binomial proportion of ``n_memorized``: [0, 1 - 0.025 ** (1 / n)] for none detected, [0.025 ** (1 / n), 1] for
    all (the TPR is such a proportion at its threshold; the threshold's own uncertainty would widen it). A TPR that
    ``n_ordinary`` cannot measure (:func:`unmeasurable`, read at FPR 0) is left to :func:`small_sample_warnings`, one
    read at FPR 0 on tied scores to :func:`tied_fpr_warnings`."""
    names = {"auroc": "AUROC", "tpr_at_1pct_fpr": "TPR at 1% FPR", "tpr_at_3pct_fpr": "TPR at 3% FPR"}
    tail = (1 - CI_LEVEL) / 2
    zero, exact = [], []
    for key, label in names.items():
        pct = {"tpr_at_1pct_fpr": 1, "tpr_at_3pct_fpr": 3}.get(key)
        if pct is not None and (unmeasurable(pct, n_ordinary) or tied_past(pct, figures)):
            continue  # read at FPR 0: said by small_sample_warnings or tied_fpr_warnings
        value, (lo, hi) = figures[key], figures[key + "_ci"]
        if not (np.isfinite(lo) and lo == hi):
            continue
        zero.append(f"{label} {value:.3f} [{lo:.3f}, {hi:.3f}]")
        if pct is not None and value in (0.0, 1.0) and not exact and n_memorized:
            bound = tail ** (1 / n_memorized)
            ci = (0.0, 1 - bound) if value == 0 else (bound, 1.0)
            exact.append(f"a TPR of {round(value * n_memorized)} of {n_memorized} memorized prompts has the exact "
                         f"(Clopper-Pearson) 95% interval [{ci[0]:.3f}, {ci[1]:.3f}] as a binomial proportion")
    if not zero:
        return None
    return (f"{name}: {' and '.join([', '.join(zero[:-1]), zero[-1]] if len(zero) > 1 else zero)}: a 95% bootstrap "
            "CI of zero width is no interval (every resample gave the same value, as the percentile bootstrap does "
            "for a figure at 0 or 1 or for scores all equal)" + (f"; {exact[0]}" if exact else ""))


def check_labels(labels: np.ndarray, where: str = "labels") -> None:
    """Raises RunError when ``labels`` (bool [N]) hold no memorized or no ordinary prompt."""
    if not labels.any():
        raise RunError(f"{where}: no memorized prompt (no true label): AUROC and TPR need both classes")
    if labels.all():
        raise RunError(f"{where}: no ordinary prompt (no false label): AUROC and TPR need both classes")


def layer_entropies(scorer, prompts: list[str], layers: list[str], batch_size: int) -> dict:
    """Attention entropy of each cross-attention layer on its own, ``{layer: float64 [N]}``, with the same
    seeded latents and text as ``scorer`` (one forward per batch, stopped after the last of ``layers``;
    a averaged over heads, pixels and draws, as in :mod:`audit.scorers.attention_entropy`); NaN for a prompt
    whose attention in that layer is not finite (least risky in the metrics, counted in ``n_nonfinite``).

    Raises:
        KeyError: a name in ``layers`` is not an attention module of the model.
        audit.errors.IncompleteCaptureError: a layer did not report during a forward.
    """
    import torch

    from audit.capture import CrossAttentionCapture
    from audit.scorers import attention_entropy

    k = scorer.config.noise_draws
    out = {name: [] for name in layers}
    for b0 in range(0, len(prompts), batch_size):
        batch = scorer.prepare(prompts[b0:b0 + batch_size])
        with torch.inference_mode():
            c = scorer.encode(batch.tokens).repeat_interleave(k, dim=0)  # Tokens: with the attention mask
            x = scorer.latents(batch.prompts, batch.noise, batch.seeds)
            with CrossAttentionCapture(scorer.model.unet, layers, early_exit=True) as cap:
                probs = cap.run(lambda: scorer.model_output(x, scorer._t0_device, c))
        for name in layers:
            a = probs[name].view(len(batch.prompts), k, -1).mean(dim=1).double()
            bad = cap.nonfinite[name].view(len(batch.prompts), k).any(dim=1)  # as the scorer flags a prompt
            out[name].append(torch.where(bad, float("nan"), attention_entropy(a)).cpu().numpy())
    return {name: np.concatenate(v) for name, v in out.items()}


def evaluate(prompts: list[str], labels, model, scorers=("attention_entropy",), layers: str | None = None,
             noise_draws: int = 1, seed: int = 0, batch_size: int = 32, num_inference_steps: int = 50,
             n_boot: int = 1000, device: str = "auto", dtype: str = "auto", progress=None,
             noise_generator: str = "mt19937") -> dict:
    """Score labelled prompts with each scorer and measure detection.

    Args:
        prompts: N prompt strings (normalized as ``memaudit run`` does; a repeated prompt counts once: the result's
            ``n_rows`` = ``n_memorized`` + ``n_ordinary`` + ``n_duplicate_rows``).
        labels: bool [N] (or integers 0/1), True = memorized.
        model: a loaded model (:class:`audit.models.LoadedModel`), a hub id or local folder to load, or None or
            ``"lab"``: the bundled lab model.
        scorers: registered scorer names.
        layers: None (the model's default layers), ``"all"`` (the default layers, and also the attention entropy
            of every cross-attention layer on its own, for :data:`ATTENTION_SCORERS`), or cross-attention layer
            names (a list, or one comma-separated string): every scorer is configured with them, as ``memaudit run
            --layers`` does, so a run scored on chosen layers can be evaluated on the same ones.
        noise_draws, seed, num_inference_steps: the :class:`audit.scorers.ScoreConfig` of every scorer
            (``num_inference_steps`` sets t0, guidance geometry's t_lo and Ren D's sampling length).
        batch_size: prompts per scored batch (the timed pass and the per-layer pass).
        n_boot: bootstrap resamples of the CIs.
        device, dtype: as ``--device`` / ``--dtype`` (auto, cpu, cuda, ...; auto, float32, float16, bfloat16),
            used only when ``model`` is loaded here (ignored for a :class:`audit.models.LoadedModel`).
        progress: optional callable(str) for one line per scorer.
        noise_generator: ``"mt19937"`` or ``"philox"``, as ``memaudit run --noise-generator`` (another noise, so other
            scores: give a run's to reproduce its scores).

    Returns:
        ``{"model", "fingerprint", "n_memorized", "n_ordinary", "noise_draws", "seed", "num_inference_steps",
        "scorers": {name: {"auroc", "auroc_ci", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_ci", "tpr_at_3pct_fpr",
        "tpr_at_3pct_fpr_ci", "tpr_at_1pct_fpr_nearest", ... (each with _ci), "n_nonfinite",
        "n_nonfinite_memorized", "forwards_per_prompt", "prompts_per_s", "seconds"}}, "layers": {scorer: {layer:
        metrics}} (with ``layers="all"``), "score_layers": [names the scorers were configured with],
        "score_layers_given": bool (False: the model's defaults), "dtype", "device", "batch_size", "n_boot",
        "memaudit_version", "memaudit_build", "conventions": {...}, "n_rows", "n_duplicate_rows", "warnings": [...]}``
        (``warnings``: :func:`result_warnings`, also issued as Python ``UserWarning`` warnings). CIs are [lo, hi] lists.
        A prompt whose score is not finite (NaN, an infinity, or attention the scorer flags non-finite, which
        ``memaudit run`` rejects as ``nonfinite_attention``) counts as least risky, never as a detection, and is
        counted in ``n_nonfinite`` (``n_nonfinite_memorized`` of them memorized).

    Raises:
        TypeError: ``prompts`` a string or not iterable.
        RunError: unknown scorer (with a "did you mean"), labels with one class or not boolean (or 0/1), labels
            not as long as prompts, a prompt that is not text or blank, a prompt labelled both ways, an unknown
            ``layers`` value, or numeric options out of range (:func:`eval_options_problem`); a scorer that
            raised while scoring (naming it and the exception); :class:`audit.errors.ScorerError` for a scorer
            whose ``compute`` broke its contract. Prompts are
            normalized and each distinct prompt counts once, as :func:`labelled_rows` does for a table.
        ModelError: ``model`` cannot be found or loaded, or its family refuses one of ``scorers``
            (``guidance_geometry`` without published weights for it, the noise scorers on SD 3.x).
        KeyError: the model's default layers are not cross-attention layers of its denoiser.
    """
    import pyarrow as pa

    from audit.eval import metrics_with_ci
    from audit.scorers import ScoreConfig, Scorer, get_scorer

    if problem := eval_options_problem(noise_draws, num_inference_steps, batch_size, n_boot, seed):
        raise RunError(problem)
    from audit.scorers.noise import NOISE_GENERATORS

    if noise_generator not in NOISE_GENERATORS:  # a ValueError from ScoreConfig after the model had loaded
        raise RunError(f"--noise-generator {noise_generator!r}: choose {' or '.join(NOISE_GENERATORS)}")
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"prompts must be a list of strings, not a {type(prompts).__name__}")
    prompts, labels = list(prompts), np.asarray(labels)
    if bad := [i for i, p in enumerate(prompts) if not isinstance(p, str)]:
        first = prompts[bad[0]]
        nan = isinstance(first, float) and first != first  # pandas' missing value
        raise RunError(f"prompts: item {bad[0]} is {type(first).__name__}{' (NaN: a missing value)' if nan else ''}, "
                       f"not text ({len(bad)} such item(s))")

    from audit.sources import text_or_escaped

    if bad := [i for i, p in enumerate(prompts) if text_or_escaped(p)[1]]:  # crashed in pyarrow: UnicodeEncodeError
        raise RunError(f"prompts: item {bad[0]} is not valid UTF-8 text (a lone surrogate such as '\\ud83d'; "
                       f"{len(bad)} such item(s)): `memaudit run` rejects such prompts as invalid_utf8")
    if labels.dtype == object and labels.ndim == 1:  # a list with None, pd.NA or text among its labels
        items = labels.tolist()
        if odd := [i for i, v in enumerate(items)
                   if not (isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1)))]:
            raise RunError(f"labels: item {odd[0]} is {items[odd[0]]!r}, not a boolean (or 0/1) "
                           f"({len(odd)} such item(s))")
        labels = np.asarray([bool(v) for v in items], dtype=bool)  # Python bools and 0/1 in an object array
    if labels.ndim != 1:
        raise RunError(f"labels must be one boolean per prompt (a 1-D array), not an array of shape {labels.shape}")
    if len(labels) != len(prompts):
        raise RunError(f"{len(prompts)} prompts but {len(labels)} labels")
    if len(labels) and labels.dtype != bool and not (labels.dtype.kind in "iu" and set(labels.tolist()) <= {0, 1}):
        seen = sorted(set(labels.tolist()), key=lambda v: (v != v, v))[:5] if labels.dtype.kind in "iufb" else []
        raise RunError(f"labels are {labels.dtype}, not boolean (or integers 0/1)"
                       + (f"; values seen: {', '.join(map(str, seen))}" if seen else ""))
    n_rows = len(prompts)  # the rows given: n_memorized + n_ordinary + n_duplicate_rows
    # normalized, blank prompts refused, each distinct prompt once, a prompt labelled both ways refused: as the table
    prompts, labels = labelled_rows(pa.table({"prompt": pa.array(prompts, pa.string()),
                                              "memorized": pa.array(labels.astype(bool), pa.bool_())}), "prompts")
    chosen_layers = None  # the layers every scorer is configured with; None: the model's defaults
    if layers is not None and layers != "all":
        names = layers.split(",") if isinstance(layers, str) else layers
        if not all(isinstance(n, str) for n in names):
            raise RunError(f"--layers {layers!r}: give all, or cross-attention layer names")
        chosen_layers = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
        if not chosen_layers:
            raise RunError("--layers: give all, or cross-attention layer names (`memaudit layers --model M` lists "
                           "them)")
        layers = None
    scorers = [n.strip() for n in scorers.split(",") if n.strip()] if isinstance(scorers, str) else list(scorers)
    scorers = list(dict.fromkeys(scorers))  # each once: a repeated name was scored twice and reported once
    if not scorers:
        raise RunError("scorers: give at least one scorer name")
    specs = [get_scorer(name) for name in scorers]  # unknown names fail before any model is loaded
    from audit.scorers.registry import steps_problem

    if problem := next(filter(None, (steps_problem(spec, int(num_inference_steps)) for spec in specs)), None):
        raise RunError(problem)  # each scorer's fewest --steps (the counts were checked above)
    if layers == "all" and not set(scorers) & set(ATTENTION_SCORERS):  # it gave no per-layer figure, saying nothing
        raise RunError(f"--layers all (layers='all'): the per-layer figures are those of {', '.join(ATTENTION_SCORERS)}"
                       f"; add it to the scorers ({', '.join(scorers)})")
    from audit import __version__
    from audit.build import memaudit_build

    if model is None or isinstance(model, (str, Path)):
        from audit.models import load_model
        from audit.runner import model_argument

        from audit.models import adapter_of
        from audit.models.base import model_notes

        model = load_model(model_argument(None if model is None else str(model)), device, dtype)  # None, "lab"
        notes = model_notes(model.name, model.path, adapter_of(model).components)
    else:
        notes = []
    out = {"model": model.name, "fingerprint": model.fingerprint, "model_notes": notes,
           "n_memorized": int(labels.sum()),
           "n_ordinary": int((~labels).sum()), "n_rows": n_rows, "n_duplicate_rows": n_rows - len(prompts),
           "noise_draws": noise_draws, "noise_generator": noise_generator, "seed": seed,
           "num_inference_steps": num_inference_steps,
           "score_layers": list(chosen_layers or model.default_layers), "score_layers_given": chosen_layers is not None,
           # what else moves the figures or says which code made them, as a run's manifest records: the dtype
           # (--dtype auto is bfloat16 on a GPU, float32 on a CPU), the device, the batch size (float rounding),
           # the bootstrap's resamples (the CIs) and the memaudit build
           "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device), "batch_size": batch_size,
           "n_boot": n_boot, "memaudit_version": __version__, "memaudit_build": memaudit_build(),
           "scorers": {},
           "conventions": {"tpr_at_Xpct_fpr": "TPR of the last ROC point with FPR < X (Wen et al.'s code)",
                           "tpr_at_Xpct_fpr_nearest": "TPR of the first ROC point with FPR nearest to X "
                                                      "(Ren et al.'s code; can exceed X)",
                           "ci": "95% percentile bootstrap, resampled within each class",
                           "n_nonfinite": "prompts whose score was not finite: ranked least risky (never a "
                                          "detection)"}}
    # every scorer is timed before any metric is computed: the bootstrap's numpy work between two timed scorers
    # slowed the second one's forwards by 20-40% on a 2-core machine (so its prompts/s depended on the order)
    timed = []
    if chosen_layers is not None:  # names that are not cross-attention layers: one line before any scoring
        from audit.models import adapter_of

        known = adapter_of(model).cross_attention_layers(model.unet)
        if unknown := [n for n in chosen_layers if n not in known]:
            raise RunError(f"--layers: not a cross-attention layer of this model: {', '.join(unknown)} (`memaudit "
                           "layers --model M` lists them)")
    # every scorer is built (and so checked against the model: a noise scorer on SD 3.x, guidance_geometry without
    # weights) before any is scored: a refusal of the second one came after the first had scored every prompt
    built = [(spec, Scorer(model, ScoreConfig(spec.name, chosen_layers or tuple(model.default_layers), noise_draws,
                                              seed, num_inference_steps, noise_generator=noise_generator)))
             for spec in specs]
    for spec, scorer in built:
        try:
            scorer.score(prompts[:1])  # warm-up (kernel selection, lazy init) outside the timed run
            start = time.perf_counter()
            parts = [scorer.score(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
        except MemauditError:  # a broken scorer (ScorerError), a layer that did not report: said as it is
            raise
        except Exception as exc:  # noqa: BLE001 - one line naming the scorer, not a bare exception (exit 1)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise RunError(f"scorer {spec.name} raised while scoring ({type(exc).__name__}{': ' + first if first else ''}"
                           f"); `memaudit run LABELLED --scorer {spec.name}` scores prompt by prompt and rejects "
                           "the prompts that fail as scoring_error, naming them") from exc
        seconds = time.perf_counter() - start
        risk = np.concatenate([p["risk"] for p in parts])
        # a prompt whose attention or score is not finite (what `memaudit run` rejects as nonfinite_attention)
        # cannot be a detection: its risk is set to NaN, which the metrics rank below every finite score
        flagged = np.concatenate([np.asarray(p["nonfinite"], bool) for p in parts]) | ~np.isfinite(risk)
        risk = np.where(flagged, np.nan, risk)
        timed.append((spec, scorer, risk, seconds))
        if progress:
            progress(f"{spec.name}: scored {len(prompts)} prompts in {timed[-1][3]:.1f} s")
    for spec, scorer, risk, seconds in timed:
        figures = metrics_with_ci(labels, risk, n_boot=n_boot)
        nonfinite = ~np.isfinite(risk)
        figures |= {"n_nonfinite": int(nonfinite.sum()), "n_nonfinite_memorized": int((nonfinite & labels).sum()),
                    "forwards_per_prompt": forwards_per_prompt(spec, noise_draws, num_inference_steps),
                    "prompts_per_s": len(prompts) / seconds if seconds > 0 else float("inf"), "seconds": seconds}
        out["scorers"][spec.name] = figures
        if layers == "all" and spec.name in ATTENTION_SCORERS:
            names = scorer.adapter.cross_attention_layers(model.unet)
            per_layer = layer_entropies(scorer, prompts, names, batch_size)
            out.setdefault("layers", {})[spec.name] = {
                n: metrics_with_ci(labels, v, n_boot=n_boot) | {"n_nonfinite": int((~np.isfinite(v)).sum())}
                for n, v in per_layer.items()}
        if progress:
            progress(f"{spec.name}: AUROC {figures['auroc']:.3f}, {figures['prompts_per_s']:.1f} prompts/s")
    out["warnings"] = result_warnings(out)  # as `memaudit eval` warns; a Python caller gets them as warnings too
    import warnings

    for warning in out["warnings"]:
        warnings.warn(f"memaudit eval: {warning}", UserWarning, stacklevel=2)
    return out
