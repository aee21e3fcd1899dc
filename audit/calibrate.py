"""Calibrated flags: a risk threshold measured on a reference run over ordinary prompts.

``memaudit calibrate REFERENCE_RUN --fpr 0.01`` reads the reference run's ``risk.parquet``, keeps one
risk per unique prompt (``prompt_hash``) and sets the threshold to the risk at the ``1 - fpr`` quantile
(``numpy.quantile``, linear interpolation). A prompt is flagged when ``risk > threshold``, so at most a
fraction ``fpr`` of the reference prompts are flagged. The calibration file records the model
fingerprint, the score configuration and the reference size; ``memaudit run --calibration`` refuses it
for any other model or score configuration, because a threshold means nothing on another scale.

``risk_percentile`` is the percentage of reference prompts whose risk is at most the prompt's risk,
interpolated on 1001 reference quantiles stored in the file (0 below the reference minimum, 100 above
its maximum).

Owns calibration files and their application to risk tables. Must not import torch, the scorers, the
models or the engines.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np

from audit.errors import CalibrationError

CALIBRATION_KIND = "memaudit.calibration"
CALIBRATION_VERSION = 1
N_QUANTILES = 1001



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


def calibrate(reference_run: str | Path, fpr: float = 0.01) -> dict:
    """Build a calibration from a reference run over ordinary prompts.

    Args:
        reference_run: a finished run folder (``risk.parquet`` and ``manifest.json``).
        fpr: target false-positive rate on ordinary prompts, in (0, 1).

    Returns:
        The calibration document (see :func:`write_calibration`): ``threshold`` equals
        ``numpy.quantile(unique reference risks, 1 - fpr)``.

    Raises:
        CalibrationError: not an intact finished run (:func:`audit.tables.finished_run`: non-finite risks
            included), empty reference, or ``fpr`` out of range.
    """
    if not 0.0 < fpr < 1.0:
        raise CalibrationError(f"--fpr {fpr}: must be between 0 and 1 (e.g. 0.01)")
    from audit.tables import finished_run

    manifest = finished_run(reference_run, ("risk.parquet", "manifest.json"), CalibrationError)  # finite risks
    risks = reference_risks(reference_run)
    if risks.size == 0:
        raise CalibrationError(f"{reference_run} has no scored prompts to calibrate on")
    q = 1.0 - fpr
    threshold = float(np.quantile(risks, q))
    probs = np.linspace(0.0, 1.0, N_QUANTILES)
    from audit import __version__

    return {
        "kind": CALIBRATION_KIND,
        "version": CALIBRATION_VERSION,
        "fpr": fpr,
        "quantile": q,
        "threshold": threshold,
        "rule": "flagged = risk > threshold",
        "model": {"name": manifest["model"].get("name"), "fingerprint": manifest["model"]["fingerprint"],
                  "tokenizer": manifest["model"].get("tokenizer")},
        "score_config": manifest["score_config"],
        "reference": {
            "run": str(Path(reference_run).resolve()),
            "inputs": manifest.get("inputs", []),
            "size": int(risks.size),
            "rows": int(manifest["counts"]["scored"]),
            "flagged": int((risks > threshold).sum()),
            "risk_min": float(risks.min()),
            "risk_median": float(np.median(risks)),
            "risk_max": float(risks.max()),
        },
        "reference_quantiles": [float(v) for v in np.quantile(risks, probs)],
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "memaudit_version": __version__,
    }


def small_reference_warning(cal: dict) -> str | None:
    """A warning when the reference is too small for the FPR (fewer than 10 expected false positives)."""
    n, fpr = cal["reference"]["size"], cal["fpr"]
    if n * fpr < 10:
        need = math.ceil(10 / fpr)
        return (f"reference has {n} unique prompts: the {1 - fpr:.4g} quantile rests on {n * fpr:.1f} prompts; "
                f"{need} or more give a steadier threshold")
    return None


def write_calibration(cal: dict, path: str | Path) -> Path:
    """Write a calibration document atomically as JSON."""
    from audit.tables import write_json_atomic

    path = Path(path)
    write_json_atomic(cal, path)  # as report and diff: a missing folder is refused, not made
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
    if not isinstance(cal, dict) or cal.get("kind") != CALIBRATION_KIND:
        raise CalibrationError(f"--calibration {path}: not a memaudit calibration file (make one with "
                               "`memaudit calibrate REFERENCE_RUN`)")
    for key in ("threshold", "model", "score_config", "reference_quantiles"):
        if key not in cal:
            raise CalibrationError(f"--calibration {path}: missing '{key}'")
    if problem := _calibration_problem(cal):
        raise CalibrationError(f"--calibration {path}: {problem}; make it again with `memaudit calibrate "
                               "REFERENCE_RUN`")
    cal["_path"] = str(path)
    return cal


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _calibration_problem(cal: dict) -> str | None:
    """What makes a calibration document unusable (a value that would flag nothing, or fail after scoring), or
    None: a finite threshold, finite non-decreasing reference quantiles, a known version (if given), the model's
    fingerprint, the score configuration and the reference size."""
    version = cal.get("version", 1)  # absent: the first version
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= CALIBRATION_VERSION:
        return f"version {version!r}: this memaudit reads version {CALIBRATION_VERSION}"
    if not _finite_number(cal["threshold"]):
        return f"threshold {cal['threshold']!r} is not a finite number"
    q = cal["reference_quantiles"]
    if not isinstance(q, list) or len(q) < 2 or not all(_finite_number(v) for v in q):
        return "reference_quantiles must be a list of at least 2 finite numbers"
    if any(b < a for a, b in zip(q, q[1:])):
        return "reference_quantiles must not decrease"
    if len(q) != N_QUANTILES:
        return f"reference_quantiles has {len(q)} values, not {N_QUANTILES}"
    if not _finite_number(cal.get("fpr")) or not 0 < cal["fpr"] < 1:
        return f"fpr {cal.get('fpr')!r} is not a number between 0 and 1"
    # the threshold is the reference's (1 - fpr) quantile, so it lies between the two grid quantiles around it
    pos = (1.0 - cal["fpr"]) * (N_QUANTILES - 1)
    low, high = q[max(0, math.floor(pos) - 1)], q[min(N_QUANTILES - 1, math.ceil(pos) + 1)]
    slack = 1e-9 * max(1.0, abs(low), abs(high))
    if not low - slack <= cal["threshold"] <= high + slack:
        return (f"threshold {cal['threshold']:.6g} is not the reference's {1 - cal['fpr']:.4g} quantile (between "
                f"{low:.6g} and {high:.6g} by its reference_quantiles): the file was edited")
    if not isinstance(cal["model"], dict) or not isinstance(cal["model"].get("fingerprint"), str):
        return "model.fingerprint is missing"
    if not isinstance(cal["score_config"], dict):
        return "score_config is not a table of settings"
    ref = cal.get("reference")
    if not isinstance(ref, dict) or not isinstance(ref.get("size"), int) or ref["size"] < 1:
        return "reference.size is missing"
    return None


def check_calibration(cal: dict, model_info: dict, score_config: dict) -> None:
    """Refuse a calibration made for another model fingerprint or score configuration.

    Raises:
        CalibrationError: naming what differs.
    """
    where = cal.get("_path", "calibration")
    if cal["model"]["fingerprint"] != model_info["fingerprint"]:
        raise CalibrationError(
            f"--calibration {where} was made for model {cal['model'].get('name')} [{cal['model']['fingerprint']}], "
            f"not {model_info.get('name')} [{model_info['fingerprint']}]: calibrate on a reference run of this "
            "model (`memaudit calibrate REFERENCE_RUN`)")
    from audit.scorers import ScoreConfig

    want, got = ScoreConfig.complete(cal["score_config"]), ScoreConfig.complete(score_config)
    if want != got:
        keys = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        detail = "; ".join(f"{k}: calibration {want.get(k)!r}, run {got.get(k)!r}" for k in keys)
        raise CalibrationError(f"--calibration {where} was made for another score configuration ({detail}): "
                               "rerun with the calibration's options or calibrate again")


def risk_percentile(risk: np.ndarray, cal: dict) -> np.ndarray:
    """Percentage (0-100) of reference prompts with risk at most ``risk``, interpolated on the stored quantiles."""
    values = np.asarray(cal["reference_quantiles"], dtype=np.float64)
    probs = np.linspace(0.0, 100.0, len(values))
    xs, last = np.unique(values[::-1], return_index=True)  # for tied quantiles keep the highest probability
    ps = probs[::-1][last]
    risk = np.asarray(risk, dtype=np.float64)
    out = np.interp(risk, xs, ps, left=0.0, right=100.0)
    if len(xs) == 1:
        out = np.where(risk < xs[0], 0.0, 100.0)
    return out


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
    return {"path": cal.get("_path"), "threshold": cal["threshold"], "fpr": cal["fpr"],
            "reference_size": cal["reference"]["size"], "model_fingerprint": cal["model"]["fingerprint"]}


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
        CalibrationError: unreadable calibration, or ``--fail-on-flagged`` without ``--calibration``.
    """
    if cfg.fail_on_flagged is not None and not cfg.calibration:
        raise CalibrationError("--fail-on-flagged needs --calibration (flags come from a calibrated threshold)")
    if cfg.fail_on_flagged is not None and cfg.fail_on_flagged < 0:
        raise CalibrationError("--fail-on-flagged must be 0 or more")
    return load_calibration(cfg.calibration) if cfg.calibration else None


def flagged_gate(cfg, manifest: dict) -> str | None:
    """The failure message when more rows than ``--fail-on-flagged`` were flagged (``counts.flagged``: scored rows,
    so a prompt on 3 rows counts 3), else None."""
    n = manifest["counts"].get("flagged")
    if cfg.fail_on_flagged is None or n is None or n <= cfg.fail_on_flagged:
        return None
    return (f"{n} row{'s' if n != 1 else ''} flagged (risk > {manifest['calibration']['threshold']:.6g}), more than "
            f"--fail-on-flagged {cfg.fail_on_flagged}; outputs are complete in the run folder")
