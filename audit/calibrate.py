"""Calibrated flags: a risk threshold measured on a reference run over ordinary prompts.

``memaudit calibrate REFERENCE_RUN --fpr 0.01`` reads the reference run's ``risk.parquet`` and keeps one
risk per unique prompt (``prompt_hash``): n risks. With k = floor(fpr * n) (:func:`allowed_flags`), the
threshold is the (n - k)-th smallest of them (an order statistic, never an interpolation), and a prompt is
flagged when ``risk > threshold``. So at most k reference prompts are flagged, exactly k when no other
reference prompt ties the threshold's risk, and no lower threshold keeps to k: at most a fraction ``fpr``
of the reference is flagged. The calibration file records the model fingerprint, the score configuration
and the reference size; ``memaudit run --calibration`` refuses it for any other model or score
configuration, because a threshold means nothing on another scale.

``risk_percentile`` is the percentage of reference prompts whose risk is at most the prompt's risk (the
empirical distribution function: 100 / n at the reference's lowest risk when no other prompt ties it, 0
below it, 100 at and above its highest). The file stores the number of reference prompts at or below each
of up to 1001 of the reference's distinct risks (``reference_cdf``; all of them when there are at most
1001, so the percentile is exact); between two stored risks the percentile is the one at the lower.

Files of version 1 (memaudit before calibration version 2) hold a threshold interpolated by
``numpy.quantile`` and 1001 interpolated quantiles instead: they are read as they were made (the same
threshold, flagged when ``risk > threshold``, the percentile interpolated on those quantiles), so a run
with an old file flags what it flagged before; make the file again for the rule above.

Owns calibration files and their application to risk tables. Must not import torch, the scorers, the
models or the engines.
"""

from __future__ import annotations

import datetime as dt
import json
from fractions import Fraction
import math
from pathlib import Path
import re

import numpy as np

from audit.errors import CalibrationError
from audit.text import counted, threshold_text

CALIBRATION_KIND = "memaudit.calibration"
CALIBRATION_VERSION = 2  # 2: order-statistic threshold and reference_cdf; 1: interpolated (still read)
N_QUANTILES = 1001  # version 1: the number of interpolated reference quantiles
N_CDF = 1001  # version 2: the most distinct reference risks stored in reference_cdf (plus the threshold)


def reference_risks(run_dir: str | Path) -> np.ndarray:
    """Risk of each unique prompt (first row per ``prompt_hash``) of a finished run, as float64 [N].

    Raises:
        CalibrationError: ``run_dir`` holds no ``risk.parquet`` (not a finished run).
    """
    import polars as pl

    path = Path(run_dir) / "risk.parquet"
    if not path.exists():
        raise CalibrationError(f"{run_dir} is not a finished memaudit run (no risk.parquet)")
    df = (pl.scan_parquet(path, glob=False).select("prompt_hash", "risk").unique("prompt_hash", keep="first",
                                                                      maintain_order=True).collect())
    return df["risk"].to_numpy().astype(np.float64)


def allowed_flags(fpr: float, n: int) -> int:
    """k = floor(fpr * n): how many of ``n`` reference prompts a calibration at ``fpr`` may flag. ``fpr`` is read as
    the decimal it prints as (in binary 0.29 * 100 is 28.99999..., whose floor would be 28, not 29)."""
    return math.floor(Fraction(repr(float(fpr))) * n)


def order_threshold(risks: np.ndarray, fpr: float) -> tuple[float, int]:
    """``(threshold, k)``: the (n - k)-th smallest of the ``n`` risks, k = :func:`allowed_flags` (fpr, n). At most k
    risks exceed it (exactly k when none of the others ties it), and every lower threshold lets more than k
    exceed it. k = 0 gives the largest risk."""
    r = np.sort(np.asarray(risks, dtype=np.float64))
    k = allowed_flags(fpr, r.size)
    return float(r[r.size - k - 1]), k


def reference_cdf(risks: np.ndarray, threshold: float | None = None) -> dict:
    """``{"risk": [...], "at_or_below": [...]}``: distinct reference risks, increasing, each with the number of
    reference risks at or below it; all distinct risks when there are at most :data:`N_CDF`, else the risks at
    :data:`N_CDF` ranks evenly spaced over all n (``round(i * (n - 1) / (N_CDF - 1))``, i = 0 .. N_CDF - 1: the
    lowest and the highest included, so that fewer than n / 1000 reference risks lie strictly between two stored
    ones) plus ``threshold``'s own entry."""
    r = np.sort(np.asarray(risks, dtype=np.float64))
    values, first = np.unique(r, return_index=True)  # distinct values, increasing; first index of each in r
    counts = np.r_[first[1:], r.size]  # the first index of the next value = how many are at or below this one
    if values.size > N_CDF:
        ranks = np.round(np.linspace(0, r.size - 1, N_CDF)).astype(np.int64)
        keep = np.searchsorted(values, r[ranks])
        if threshold is not None:
            keep = np.r_[keep, np.searchsorted(values, threshold)]
        keep = np.unique(keep)
        values, counts = values[keep], counts[keep]
    return {"risk": [float(v) for v in values], "at_or_below": [int(c) for c in counts]}


def decimal_share(text: str | float) -> Fraction | None:
    """A share written as a fraction (``0.05``) or a percentage (``5%``), as the exact decimal written: ``7%``,
    ``0.07`` and ``0.070`` are all 7/100 (in binary 0.07 * 100 is 7.000000000000001). A float is read as the decimal
    it prints as. Read by ``--fpr`` and ``--confirm-top`` alike.

    Its sign is always the decimal's: a share below the smallest float (``1e-500``) is positive, not 0, so that a
    positive share below any a count can tell (``--confirm-top 1e-500``, rounded up to one prompt as ``1e-300`` is)
    is not read as 0. A decimal exponent past -10000 (``1e-99999999``, whose exact value would build
    ``10**99999999``) reads as ``±10**-10000``: the same sign, and no share of fewer than ``10**10000`` rows or
    prompts tells them apart.

    Returns:
        The value, of any sign (the caller checks its range), or None when ``text`` is not a finite decimal number
        (``"one"``, ``"1%%"``, ``"nan"``, ``"inf"``, ``"1/2"``).
    """
    raw = (repr(float(text)) if isinstance(text, float) else str(text)).strip()
    percent = raw.endswith("%")
    digits = raw[:-1].strip() if percent else raw
    if "_" in digits:  # float and Fraction read "1_0" as 10: not a decimal as given ("1/2" fails float below)
        return None
    try:
        approx = float(digits)
        exponent = re.search(r"[eE]([+-]?\d+)$", digits)
        if not exponent or abs(int(exponent[1])) <= _EXACT_EXPONENT:
            value = Fraction(digits)
        elif approx != 0 or not re.search(r"[1-9]", digits[:exponent.start()]):
            value = Fraction(approx)  # (an infinite one is refused below)
        else:  # below 10**-10000 and not 0: the sign kept, the magnitude no count tells apart
            value = Fraction(int(math.copysign(1, approx)), 10 ** _EXACT_EXPONENT)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    if not math.isfinite(approx):
        return None
    return value / 100 if percent else value


_EXACT_EXPONENT = 10_000  # decimal_share reads a decimal exponent up to this exactly (10**10000: 0.2 ms)


def parse_fpr(text: str | float) -> float:
    """``--fpr`` as a fraction: ``0.01`` or ``1%`` (:func:`decimal_share`), as ``--confirm-top`` reads both.

    Raises:
        CalibrationError: not a number (``"one"``, ``"1%%"``, ``"nan"``), or not in (0, 1), named as given
            (``--fpr 150%``, not the 1.5 it reads as; :func:`calibrate` checks the range of a number it is passed).
    """
    value = decimal_share(text)
    if value is None:
        raise CalibrationError(f"--fpr {text}: give a fraction (0.01) or a percentage (1%)")
    # a positive share whose float is 0.0 (1e-330, 1e-500) or 1.0 (0.99999999999999999): calibrate refused it as
    # "--fpr 0.0" or "--fpr 1.0", and 1e-500 as not between 0 and 1
    if 0 < value < 1 and not 0 < float(value) < 1:
        raise CalibrationError(f"--fpr {text}: too close to {round(float(value))} to tell apart from it (it reads as "
                               f"{float(value)!r}); give a fraction between 0 and 1, both excluded (e.g. 0.01 or 1%)")
    if not 0 < value < 1:
        raise CalibrationError(f"--fpr {text}: must be between 0 and 1 (0% and 100%), both excluded (e.g. 0.01 or 1%)")
    return float(value)


def calibrate(reference_run: str | Path, fpr: float = 0.01) -> dict:
    """Build a calibration from a reference run over ordinary prompts.

    Args:
        reference_run: a finished run folder (``risk.parquet`` and ``manifest.json``).
        fpr: the largest fraction of the reference's unique prompts that may be flagged, in (0, 1).

    Returns:
        The calibration document (see :func:`write_calibration`): ``threshold`` is the (n - k)-th smallest of the
        n unique reference risks, k = floor(fpr * n) (:func:`order_threshold`), so that at most k of them are
        above it (``reference.flagged``).

    Raises:
        CalibrationError: not an intact finished run (:func:`audit.tables.finished_run`: non-finite risks
            included), a run that failed its error gates (exit 4, :func:`audit.gates.recorded_failures`: too
            many rows could not be scored or read as prompts, under the run's own ``--max-error-fraction``), empty
            reference, or ``fpr`` out of range.
    """
    if not 0.0 < fpr < 1.0:
        raise CalibrationError(f"--fpr {fpr}: must be between 0 and 1, both excluded (e.g. 0.01)")
    from audit.tables import finished_run

    manifest = finished_run(reference_run, ("risk.parquet", "manifest.json"), CalibrationError)  # finite risks
    from audit.gates import recorded_failures

    if failed := recorded_failures(reference_run, manifest):  # it exited 4: its risks are those of part of its input
        raise CalibrationError(
            f"{reference_run} is a run that failed (exit 4): {failed[0]}; a threshold from it would rest on the "
            "prompts it happened to score. Fix the reference run (rerun its command with the same --out once the "
            "inputs or the model are fixed; --retry-failed scores failed rows again), or rerun it with a larger "
            "--max-error-fraction to accept it as it is")
    risks = reference_risks(reference_run)
    if risks.size == 0:
        raise CalibrationError(f"{reference_run} has no scored prompts to calibrate on")
    threshold, k = order_threshold(risks, fpr)
    from audit import __version__
    from audit.build import memaudit_build

    return {
        "kind": CALIBRATION_KIND,
        "version": CALIBRATION_VERSION,
        "fpr": fpr,
        "threshold": threshold,
        "rule": "flagged = risk > threshold",
        "threshold_rule": "the (n - k)-th smallest of the n unique reference risks, k = floor(fpr * n): at most k "
                          "reference prompts have risk > threshold",
        "model": {"name": manifest["model"].get("name"), "fingerprint": manifest["model"]["fingerprint"],
                  "tokenizer": manifest["model"].get("tokenizer")},
        "score_config": manifest["score_config"],
        "reference": {
            "run": str(Path(reference_run).resolve()),
            "inputs": manifest.get("inputs", []),
            "size": int(risks.size),
            "rows": int(manifest["counts"]["scored"]),
            "allowed_flags": k,
            "flagged": int((risks > threshold).sum()),
            "risk_min": float(risks.min()),
            "risk_median": float(np.median(risks)),
            "risk_max": float(risks.max()),
            # what the reference was scored with beyond its score configuration (batch size, --compile, device,
            # engine: the manifest's scored_with), so that a run flagged with this threshold can be told it was
            # scored otherwise (reference_settings_warning); absent where the reference run recorded none
            **({"scored_with": manifest["scored_with"]} if isinstance(manifest.get("scored_with"), dict) else {}),
        },
        "reference_cdf": reference_cdf(risks, threshold),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "memaudit_version": __version__,
        "memaudit_build": memaudit_build(),
    }


def _count(n: int) -> str:
    """A count as a reader takes it in: ``10,000``, or ``1e+300`` past a billion (``--fpr 1e-300`` asks for that;
    ``--fpr 1e-320``, ``2e+321``, past the largest float)."""
    if n < 10**9:
        return f"{n:,}"
    try:
        return f"{float(n):.3g}"
    except OverflowError:
        e = len(str(n)) - 1
        m = float(f"{n / 10**e:.3g}")
        m, e = (m / 10, e + 1) if m >= 10 else (m, e)
        return f"{m:g}e+{e}"


def small_reference_warning(cal: dict) -> str | None:
    """A warning when the reference is too small for the FPR (fpr * n under 10: fewer than 10 prompts may be
    flagged, so the threshold rests on the few highest reference risks). fpr * n is exact, ``fpr`` read as the
    decimal it prints as, as :func:`allowed_flags` reads it: the warning and the count it gives follow one rule
    (the float product agreed with it on every FPR of up to 6 decimals tried, but by luck of rounding)."""
    n, fpr = cal["reference"]["size"], cal["fpr"]
    if Fraction(repr(float(fpr))) * n < 10:
        k = allowed_flags(fpr, n)
        rank = "the highest reference risk" if k == 0 else f"the reference risk ranked {k + 1} from the top"
        return (f"fpr {fpr!r} of {n} reference prompts allows {k} flagged (the threshold is {rank}); "
                f"{_count(math.ceil(10 / Fraction(repr(float(fpr)))))} or more reference prompts give a steadier "
                "threshold")
    return None


def calibration_warnings(cal: dict) -> list[str]:
    """Every warning ``memaudit calibrate`` prints for the calibration document ``cal``, one line each: the reference
    too small for the FPR (:func:`small_reference_warning`); an FPR below 1 / n, which no threshold on n reference
    prompts can tell from 0; and ties at the threshold that leave it flagging fewer than the k allowed.

    With k = floor(fpr * n) = 0 the threshold is the highest reference risk whatever the FPR (``--fpr 0.001`` and
    ``--fpr 0.0001`` on 500 prompts give one threshold, flagging none of them), and a new ordinary prompt scored
    alike exceeds the highest of n such risks with probability 1 / (n + 1) when the risks are continuous and
    exchangeable (the rank of one of n + 1 such draws is uniform; the order-statistic argument of conformal
    prediction, Vovk et al. 2005), not ``fpr``. With ties, the threshold's risk is shared by reference prompts below
    the k + 1 highest: it flags ``reference.flagged`` < k of them, and any lower threshold flags more than k."""
    out = [w] if (w := small_reference_warning(cal)) else []
    ref, fpr = cal["reference"], cal["fpr"]
    n, k, flagged = ref["size"], ref["allowed_flags"], ref["flagged"]
    if k == 0:
        out.append(f"fpr {fpr!r} is below 1/{n}, the least share of {n} reference prompts: the threshold is their "
                   f"highest risk, the same for any fpr under 1/{n}, and flags none of them; a new ordinary prompt "
                   f"scored alike exceeds it with probability about 1/{n + 1} ({100 / (n + 1):.2g}%), not "
                   f"{float(fpr) * 100:g}%")
    elif flagged < k:
        same = (" (every reference prompt has this risk)" if ref.get("risk_min") == ref.get("risk_max") else "")
        out.append(f"the threshold {threshold_text(cal['threshold'])} is the risk of more than one reference prompt"
                   f"{same}: it flags "
                   f"{flagged} of the {n} ({100 * flagged / n:.3g}%), fewer than the {k} that fpr {fpr!r} allows, and "
                   f"any lower threshold flags more than {k}")
    return out


def write_calibration(cal: dict, path: str | Path) -> Path:
    """Write a calibration document atomically as JSON; returns ``path``.

    Raises:
        audit.errors.RunError: ``path`` is a folder or not a regular file, or its folder does not exist.
    """
    from audit.tables import write_json_atomic

    path = Path(path)
    write_json_atomic(cal, path, sweep=True)  # as report and diff: a missing folder is refused, not made
    return path


def load_calibration(path: str | Path) -> dict:
    """Read and validate a calibration file written by ``memaudit calibrate``.

    Raises:
        CalibrationError: missing file, not JSON, or not a memaudit calibration.
    """
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"--calibration {path}: no such file")
    if not path.is_file():
        raise CalibrationError(f"--calibration {path}: a folder, not a calibration file")
    try:
        cal = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"--calibration {path}: not JSON ({type(exc).__name__}: {exc})") from None
    except (ValueError, RecursionError) as exc:  # an integer of 4,300+ digits, arrays nested too deep
        raise CalibrationError(f"--calibration {path}: not usable JSON ({type(exc).__name__}: "
                               f"{str(exc)[:200]})") from None
    if not isinstance(cal, dict) or cal.get("kind") != CALIBRATION_KIND:
        raise CalibrationError(f"--calibration {path}: not a memaudit calibration file (make one with "
                               "`memaudit calibrate REFERENCE_RUN`)")
    for key in ("threshold", "model", "score_config"):
        if key not in cal:
            raise CalibrationError(f"--calibration {path}: missing '{key}'")
    try:
        problem = _calibration_problem(cal)
    except (OverflowError, ValueError, TypeError) as exc:  # e.g. an integer too large for a float
        problem = f"a value cannot be read as a number ({type(exc).__name__}: {str(exc)[:200]})"
    if problem:
        raise CalibrationError(f"--calibration {path}: {problem}; make it again with `memaudit calibrate "
                               "REFERENCE_RUN`")
    cal["_path"] = str(path)
    return cal


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def calibration_version(cal: dict):
    """The calibration file's ``version`` (absent: 1, the first; any other value as written, checked by
    :func:`load_calibration`)."""
    return cal.get("version", 1)


def _calibration_problem(cal: dict) -> str | None:
    """What makes a calibration document unusable (a value that would flag nothing, or fail after scoring), or
    None: a known version (absent: 1), a finite threshold, an fpr in (0, 1), the reference size, the model's
    fingerprint, the score configuration, and the reference's distribution: version 2's ``reference_cdf``
    (increasing distinct risks, increasing counts ending at the reference size; the threshold is its
    order statistic), version 1's 1001 non-decreasing quantiles (the threshold lies at its quantile)."""
    version = calibration_version(cal)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= CALIBRATION_VERSION:
        return f"version {version!r}: this memaudit reads versions 1 to {CALIBRATION_VERSION}"
    if (distribution := "reference_cdf" if version >= 2 else "reference_quantiles") not in cal:
        return f"missing '{distribution}'"
    if not _finite_number(cal["threshold"]):
        return f"threshold {cal['threshold']!r} is not a finite number"
    if not _finite_number(cal.get("fpr")) or not 0 < cal["fpr"] < 1:
        return f"fpr {cal.get('fpr')!r} is not a number between 0 and 1"
    ref = cal.get("reference")
    if not isinstance(ref, dict) or not isinstance(ref.get("size"), int) or isinstance(ref.get("size"), bool) \
            or ref["size"] < 1:
        return "reference.size is missing"
    problem = _cdf_problem(cal) if version >= 2 else _quantiles_problem(cal)
    if problem:
        return problem
    if not isinstance(cal["model"], dict) or not isinstance(cal["model"].get("fingerprint"), str):
        return "model.fingerprint is missing"
    if not isinstance(cal["score_config"], dict):
        return "score_config is not a table of settings"
    return None


def _cdf_problem(cal: dict) -> str | None:
    """Version 2: ``reference_cdf`` is well formed and ``threshold`` is the reference's (n - k)-th smallest risk (the
    first stored risk with at least n - k reference risks at or below it)."""
    cdf, n = cal["reference_cdf"], cal["reference"]["size"]
    if not isinstance(cdf, dict) or not all(isinstance(cdf.get(key), list) for key in ("risk", "at_or_below")):
        return "reference_cdf must hold the lists 'risk' and 'at_or_below'"
    xs, cs = cdf["risk"], cdf["at_or_below"]
    if not 1 <= len(xs) <= N_CDF + 1 or len(cs) != len(xs):
        return f"reference_cdf must hold 1 to {N_CDF + 1} risks, each with its count"
    if not all(_finite_number(v) for v in xs) or any(b <= a for a, b in zip(xs, xs[1:])):
        return "reference_cdf.risk must be finite numbers that increase"
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in cs) or cs[0] < 1 \
            or any(b <= a for a, b in zip(cs, cs[1:])) or cs[-1] != n:
        return f"reference_cdf.at_or_below must be counts that increase to the reference size {n}"
    k = allowed_flags(cal["fpr"], n)
    at = next(i for i, c in enumerate(cs) if c >= n - k)  # the first stored risk with n - k at or below it
    if cal["threshold"] != xs[at]:
        said, stored = threshold_text(cal["threshold"]), threshold_text(xs[at])  # an edit of 1e-7 reads as two
        return (f"threshold {said} is not the reference risk ranked {k + 1} from the top ({stored} "
                f"by its reference_cdf: fpr {cal['fpr']:g} of {n} allows {k} flagged): the file was edited")
    return None


def _quantiles_problem(cal: dict) -> str | None:
    """Version 1: 1001 finite non-decreasing ``reference_quantiles``; the threshold lies at the (1 - fpr) one."""
    q = cal["reference_quantiles"]
    if not isinstance(q, list) or len(q) < 2 or not all(_finite_number(v) for v in q):
        return "reference_quantiles must be a list of at least 2 finite numbers"
    if any(b < a for a, b in zip(q, q[1:])):
        return "reference_quantiles must not decrease"
    if len(q) != N_QUANTILES:
        return f"reference_quantiles has {len(q)} values, not {N_QUANTILES}"
    # the threshold is the reference's (1 - fpr) quantile, so it lies between the two grid quantiles around it
    pos = (1.0 - cal["fpr"]) * (N_QUANTILES - 1)
    low, high = q[max(0, math.floor(pos) - 1)], q[min(N_QUANTILES - 1, math.ceil(pos) + 1)]
    slack = 1e-9 * max(1.0, abs(low), abs(high))
    if not low - slack <= cal["threshold"] <= high + slack:
        return (f"threshold {threshold_text(cal['threshold'])} is not the reference's {1 - cal['fpr']:.4g} quantile "
                f"(between "
                f"{low:.6g} and {high:.6g} by its reference_quantiles): the file was edited")
    return None


def check_calibration(cal: dict, model_info: dict, score_config: dict) -> None:
    """Refuse a calibration made for another model fingerprint or score configuration.

    Raises:
        CalibrationError: naming what differs.
    """
    where = cal.get("_path", "calibration")
    if cal["model"]["fingerprint"] != model_info["fingerprint"]:
        from audit.models.base import earlier_fingerprint_note

        if note := earlier_fingerprint_note(model_info.get("path"), str(cal["model"]["fingerprint"])):
            raise CalibrationError(
                f"--calibration {where} was made for model {cal['model'].get('name')} [{cal['model']['fingerprint']}]"
                f", not [{model_info['fingerprint']}], but the model is the same: {note}. Score the reference prompts "
                "again with this memaudit into a new --out, then `memaudit calibrate` that run (a reference run "
                "folder of the earlier memaudit gives a calibration with the earlier fingerprint)")
        raise CalibrationError(
            f"--calibration {where} was made for model {cal['model'].get('name')} [{cal['model']['fingerprint']}], "
            f"not {model_info.get('name')} [{model_info['fingerprint']}]: calibrate on a reference run of this "
            "model (`memaudit calibrate REFERENCE_RUN`)")
    from audit.scorers import ScoreConfig

    want, got = ScoreConfig.complete(cal["score_config"]), ScoreConfig.complete(score_config)
    if unrecorded := sorted(set(got) - set(want)):
        raise CalibrationError(
            f"--calibration {where} was made by an earlier memaudit, which did not record the score configuration's "
            f"{', '.join(unrecorded)}: it cannot be checked against this run; score the reference prompts again with "
            "this memaudit into a new --out, then `memaudit calibrate` that run")
    if want != got:
        _refuse_config(where, want, got, sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k)))


def _refuse_config(where: str, want: dict, got: dict, keys: list[str]) -> None:
    """Raise the refusal of a calibration whose score configuration ``want`` differs from the run's ``got`` in
    ``keys``."""
    detail = "; ".join(f"{k}: calibration {want.get(k)!r}, run {got.get(k)!r}" for k in keys)
    raise CalibrationError(f"--calibration {where} was made for another score configuration ({detail}): "
                           "rerun with the calibration's options or calibrate again")


def check_calibration_options(cal: dict, cfg) -> None:
    """The part of :func:`check_calibration` that the run's options decide without the model: the scorer, seed,
    noise draws, noise generator and steps (the layers, dtype and first timestep may follow from the model). Run
    where the calibration is loaded (:func:`calibration_for_run`), so that ``--dry-run`` refuses what the run will
    (it said "checked against the model when the run starts", exit 0, and the run then refused ``--seed 1``
    against a calibration made at seed 0), and the run refuses it before loading the model.

    Raises:
        CalibrationError: naming what differs, as :func:`check_calibration` does.
    """
    from audit.scorers import ScoreConfig

    recorded = cal.get("score_config")
    if not isinstance(recorded, dict):
        return
    want = ScoreConfig.complete(recorded)
    got = {"scorer": cfg.scorer, "noise_draws": cfg.noise_draws, "seed": cfg.seed,
           "num_inference_steps": cfg.steps, "noise_generator": cfg.noise_generator}
    if keys := sorted(k for k in got if k in want and want[k] != got[k]):
        _refuse_config(cal.get("_path", "calibration"), want, got, keys)


def risk_percentile(risk: np.ndarray, cal: dict) -> np.ndarray:
    """Percentage (0-100) of reference prompts with risk at most ``risk``: 100 * (reference risks <= risk) / n.

    Version 2: read off ``reference_cdf`` (exact when it stores every distinct reference risk, else the count at
    the highest stored risk <= ``risk``); 0 below the reference's lowest risk, 100 at and above its highest.
    Version 1 (no ``reference_cdf``): interpolated on its 1001 stored quantiles, as it was made (0 at the lowest).
    NaN stays NaN.

    Args:
        risk: float [N] (any shape), in the calibrated scorer's risk units.
        cal: a calibration document (:func:`load_calibration`).

    Returns:
        float64 of ``risk``'s shape, a percentage in [0, 100] (NaN where ``risk`` is NaN).
    """
    risk = np.asarray(risk, dtype=np.float64)
    if calibration_version(cal) != 1:  # by the version load_calibration checked, never by which keys are present
        xs = np.asarray(cal["reference_cdf"]["risk"], dtype=np.float64)
        cs = np.r_[0.0, np.asarray(cal["reference_cdf"]["at_or_below"], dtype=np.float64)]
        n = float(cal["reference"]["size"])
        out = 100.0 * cs[np.searchsorted(xs, risk, side="right")] / n  # stored risks <= risk: index into cs
        return np.where(np.isnan(risk), np.nan, out)
    values = np.asarray(cal["reference_quantiles"], dtype=np.float64)
    probs = np.linspace(0.0, 100.0, len(values))
    xs, last = np.unique(values[::-1], return_index=True)  # for tied quantiles keep the highest probability
    ps = probs[::-1][last]
    out = np.interp(risk, xs, ps, left=0.0, right=100.0)  # (a flat reference, one xs: 0 below it, 100 from it)
    return np.where(np.isnan(risk), np.nan, out)  # np.interp gives a NaN 100 when xs is one value


def apply_calibration(table, cal: dict | None):
    """Fill the ``flagged`` and ``risk_percentile`` columns of a risk table chunk (pyarrow) from ``cal``.

    Without a calibration both columns stay null.
    """
    import pyarrow as pa

    if cal is None:
        return table
    risk = table.column("risk").to_numpy()
    flagged = pa.array(risk > float(cal["threshold"]), pa.bool_())
    pct = pa.array(risk_percentile(risk, cal), pa.float64())
    table = table.set_column(table.schema.get_field_index("flagged"), "flagged", flagged)
    return table.set_column(table.schema.get_field_index("risk_percentile"), "risk_percentile", pct)


def calibration_summary(cal: dict) -> dict:
    """What a run's manifest and Parquet metadata record about the calibration it applied."""
    used = cal["reference"].get("scored_with")
    return {"path": cal.get("_path"), "version": calibration_version(cal), "threshold": cal["threshold"],
            "fpr": cal["fpr"], "reference_size": cal["reference"]["size"],
            "model_fingerprint": cal["model"]["fingerprint"]} | (
        {"reference_scored_with": used} if isinstance(used, dict) else {})



def version_warning(cal: dict) -> str | None:
    """A warning for a version-1 calibration file (its threshold interpolated, so it may flag more than
    floor(fpr * n) of its reference), else None."""
    if calibration_version(cal) != 1:
        return None
    return ("a version-1 calibration file: its threshold is interpolated between reference risks (it may flag "
            "more than floor(fpr * n) of its reference, one more on the examples); make it again with "
            "`memaudit calibrate` for the order-statistic rule")


def tokenizer_warning(old: dict | None, new: dict | None) -> str | None:
    """``"tokenized differently (...)"`` when two tokenizer identities (:func:`audit.runner.tokenizer_identity`)
    differ, else None (also when either was not recorded). The same model files can give other token ids under
    another tokenizer implementation (fast vs slow, ftfy present or not)."""
    if not old or not new:
        return None
    keys = ("class", "fast", "files_sha256", "ftfy")
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return f"tokenized differently ({'; '.join(changed)})" if changed else None


def calibration_for_run(cfg) -> dict | None:
    """Load ``cfg.calibration`` (None without one); check ``--fail-on-flagged`` has a calibration to use.

    Raises:
        CalibrationError: unreadable calibration, one made for other score options than the run's
            (:func:`check_calibration_options`), ``--fail-on-flagged`` without ``--calibration``, or
            ``--fail-on-flagged`` below 0.
    """
    if cfg.fail_on_flagged is not None and not cfg.calibration:
        raise CalibrationError("--fail-on-flagged needs --calibration (flags come from a calibrated threshold)")
    if cfg.fail_on_flagged is not None and cfg.fail_on_flagged < 0:
        raise CalibrationError("--fail-on-flagged must be 0 or more")
    if not cfg.calibration:
        return None
    cal = load_calibration(cfg.calibration)
    check_calibration_options(cal, cfg)
    return cal


def flagged_gate(cfg, manifest: dict) -> str | None:
    """The failure message when more rows than ``--fail-on-flagged`` were flagged (``counts.flagged``: scored rows,
    so a prompt on 3 rows counts 3), else None."""
    n = manifest["counts"].get("flagged")
    if cfg.fail_on_flagged is None or n is None or n <= cfg.fail_on_flagged:
        return None
    return (f"{counted(n, 'row')} flagged (risk > {threshold_text(manifest['calibration']['threshold'])}), more than "
            f"--fail-on-flagged {cfg.fail_on_flagged}; outputs are complete in the run folder")
