"""Two-stage scoring (``memaudit run ... --confirm SCORER --confirm-top FRACTION_OR_COUNT``): screen every
prompt with the run's scorer, then re-score the top of the ranking with a stronger, costlier scorer.

Stage 1 is an ordinary run (its ``risk.parquet``). Stage 2 takes the distinct prompts (by ``prompt_hash``,
so duplicates cost once) in rank order, keeps the first ``--confirm-top`` of them (a fraction of the
distinct prompts such as ``0.05`` or ``5%``, or a count such as ``500``), scores them with the confirming
scorer (same model, layers, noise draws and seed), and rewrites ``risk.parquet``: the confirming scorer's
own columns are filled for the confirmed rows (null for the others), both the screening ``risk`` and the
confirming score are kept, and the ranking puts the confirmed rows first, by the confirming score (higher =
riskier; ties by screening risk, then ``prompt_id``), then the others by screening risk as before.

Resumable: stage 2 writes one Parquet file per scored batch under ``<out>/confirm/`` (atomically; its
identity in ``confirm/confirm.json``); a rerun scores only the prompts not yet confirmed, and a rerun with
another confirming scorer or configuration on the same folder is refused. The manifest gains
``confirm``: the scorer, the cut, prompts and rows confirmed, resumed prompts, and the UNet forwards per
prompt of both stages and in total.

Before stage 1 scores anything, :func:`prepare_confirm` runs the confirming scorer on one probe prompt, so a
model it cannot run (an unconvertible prediction type, a family without published weights) is refused
before any scoring. The local engine only. Reads the whole ``risk.parquet`` into memory to re-rank it.
Must not import engines; torch is imported through the scorers.
"""

from __future__ import annotations

from fractions import Fraction
import json
import math
from pathlib import Path
import re
import time
import uuid

import numpy as np

from audit.errors import ModelError, RunError
from audit.text import counted

CONFIRM_DIR = "confirm"


def parse_top(value) -> tuple[str, float]:
    """``("fraction", f)`` for ``0 < f <= 1`` given as ``0.05`` or ``5%`` (``f`` as a float: 0.0 for a fraction
    below the smallest float, such as ``1e-500``, which :func:`top_size` reads exactly, as one prompt);
    ``("count", n)`` for an integer ``n >= 1`` given as ``500``.

    Raises:
        RunError: anything else.
    """
    kind, v = exact_top(value)
    return kind, (float(v) if kind == "fraction" else v)


def top_size(top, n_unique: int) -> int:
    """Distinct prompts to confirm out of ``n_unique``: ceil(fraction * n) or min(count, n). The fraction is read as
    the decimal it was given as (``0.07`` or ``7%``: 7/100; in binary 0.07 * 100 is 7.000000000000001, whose ceiling
    would be 8), as :func:`audit.calibrate.allowed_flags` reads ``--fpr``. One rule for every fraction above 0: it
    is rounded up, so however small (``1e-300``, ``1e-500``: :func:`audit.calibrate.decimal_share` keeps it above 0)
    it confirms at least one prompt of a run that scored any; 0 is refused.

    Raises:
        audit.errors.RunError: ``top`` is neither a fraction in (0, 1] nor a count >= 1 (:func:`parse_top`).
    """
    kind, v = exact_top(top)
    return min(n_unique, math.ceil(v * n_unique) if kind == "fraction" else v)


def exact_top(top) -> tuple[str, Fraction | int]:
    """:func:`parse_top` with the fraction as the decimal given (``0.7%`` and ``0.007``: 7/1000, read by
    :func:`audit.calibrate.decimal_share`), so that two spellings of one cut compare equal.

    Raises:
        RunError: as :func:`parse_top`.
    """
    from audit.calibrate import decimal_share

    text = str(top).strip()
    if re.fullmatch(r"\d+", text):
        if int(text) >= 1:
            return "count", int(text)
    else:
        f = decimal_share(top)
        if f is not None and 0 < f <= 1:
            return "fraction", f
    raise RunError(f"--confirm-top {top}: give a fraction of the distinct prompts (0.05 or 5%) or a count (500)")


def check_confirm_options(cfg) -> None:
    """Checks of ``--confirm``/``--confirm-top`` that need no model (called by the config check).

    Raises:
        RunError: unknown scorer (with a "did you mean"), the run's own scorer, no or a bad
            ``--confirm-top``, or an engine other than local.
    """
    from audit.scorers import get_scorer

    if cfg.confirm is None:
        if cfg.confirm_top is not None:
            raise RunError("--confirm-top needs --confirm SCORER")
        return
    try:
        get_scorer(cfg.confirm)
    except RunError as exc:  # its message names --scorer: the user typed --confirm
        raise RunError(str(exc).replace("--scorer", "--confirm", 1)) from None
    if cfg.confirm == cfg.scorer:
        raise RunError(f"--confirm {cfg.confirm}: the run already scores with it; confirm with another scorer")
    if cfg.confirm_top is None:
        raise RunError("--confirm needs --confirm-top FRACTION_OR_COUNT (e.g. 0.01 or 1000)")
    parse_top(cfg.confirm_top)
    if cfg.engine != "local":
        raise RunError("--confirm runs with --engine local only")


def prepare_confirm(cfg, model, score_config):
    """The confirming :class:`audit.scorers.Scorer`, after scoring one probe prompt with it.

    Raises:
        ModelError: the model cannot run the confirming scorer (the reason in one line).
    """
    import dataclasses

    from audit.scorers import Scorer

    config = dataclasses.replace(score_config, scorer=cfg.confirm)
    try:
        scorer = Scorer(model, config)
        probe = scorer.score(["a photo of a cat"])
    except Exception as exc:  # any failure on the probe means the model cannot run this scorer
        raise ModelError(f"--confirm {cfg.confirm}: model {model.name} cannot run it ({type(exc).__name__}: "
                         f"{exc})") from exc
    if probe["nonfinite"].any():
        raise ModelError(f"--confirm {cfg.confirm}: model {model.name} gives a non-finite score on a probe prompt")
    return scorer


def _forwards(spec, config) -> float:
    per_draw = 2.0 * config.num_inference_steps if spec.forward == "full_sampling" else spec.unet_forwards
    return per_draw * config.noise_draws


def run_confirm(out: Path, scorer, cfg, manifest: dict, screen_config, log=print) -> dict:
    """Stage 2 on the finished run in ``out`` (see the module docstring); returns the updated manifest, whose
    ``confirm`` is the stage's summary; risk.parquet's ``memaudit.confirm`` metadata holds it less
    :data:`INVOCATION_FIELDS` (prompts resumed or scored by this invocation, its seconds), so that the table's
    bytes depend on the inputs alone.

    Raises:
        RunError: ``out/confirm`` holds another confirming configuration.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audit.scorers import get_scorer
    from audit.tables import atomic_path, write_json_atomic

    spec = scorer.spec
    cdir = Path(out) / CONFIRM_DIR
    cdir.mkdir(exist_ok=True)
    identity = {"scorer": spec.name, "score_config": scorer.config.to_dict(),
                "model_fingerprint": scorer.model.fingerprint}
    id_path = cdir / "confirm.json"
    if id_path.exists():
        try:
            stored = json.loads(id_path.read_bytes())
        except (OSError, ValueError, RecursionError) as exc:  # edited or damaged: not JSON, not UTF-8, too deep
            raise RunError(f"--out {out}: its {CONFIRM_DIR}/confirm.json cannot be read ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); remove its {CONFIRM_DIR}/ folder to confirm again, or use a new "
                           "--out") from None
        if stored != identity:
            raise RunError(f"--out {out}: its confirm/ stage was made with another confirming scorer or "
                           "configuration; use a new --out")
    else:
        with atomic_path(id_path) as tmp:
            tmp.write_text(json.dumps(identity, indent=2))

    started = time.perf_counter()
    risk_path = Path(out) / "risk.parquet"
    table = pq.read_table(risk_path)
    hashes = table.column("prompt_hash").to_pylist()
    prompts = table.column("prompt").to_pylist()
    first: dict[str, int] = {}
    for i, h in enumerate(hashes):  # rows are in rank order: the first row of a hash is its best rank
        first.setdefault(h, i)
    n_top = top_size(cfg.confirm_top, len(first))
    chosen = list(first)[:n_top]
    cols = [c.name for c in spec.columns]
    done: dict[str, dict] = {}
    for f in sorted(cdir.glob("part-*.parquet")):
        try:  # each part is written whole (atomically); one damaged since is dropped, its prompts scored again
            rows = pq.read_table(f, columns=["prompt_hash", *cols, "nonfinite"]).to_pylist()
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            log(f"memaudit: {CONFIRM_DIR}/{f.name} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); "
                "removed, its prompts are confirmed again")
            f.unlink(missing_ok=True)
            continue
        for row in rows:  # a prompt scored again (--retry-failed) has its finite row kept, whatever the part order
            if row["prompt_hash"] not in done or not _finite(done[row["prompt_hash"]], spec.risk_column):
                done[row["prompt_hash"]] = row
    failed = [h for h in chosen if h in done and not _finite(done[h], spec.risk_column)]
    if failed and getattr(cfg, "retry_failed", False):
        log(f"memaudit: --retry-failed: {counted(len(failed), 'prompt')} of the {CONFIRM_DIR}/ stage had a non-finite "
            f"{spec.name} score: scoring {'them' if len(failed) > 1 else 'it'} again")
        for h in failed:
            del done[h]
    elif failed:
        log(f"memaudit: note: {counted(len(failed), 'prompt')} of the {CONFIRM_DIR}/ stage had a non-finite "
            f"{spec.name} score and stay{'s' if len(failed) == 1 else ''} unconfirmed; --retry-failed scores "
            f"{'them' if len(failed) > 1 else 'it'} again")
    resumed = sum(h in done for h in chosen)
    todo = [h for h in chosen if h not in done]
    batch = cfg.batch_size if isinstance(cfg.batch_size, int) else scorer.auto_batch_size()
    for b0 in range(0, len(todo), batch):
        hs = todo[b0:b0 + batch]
        res = scorer.score([prompts[first[h]] for h in hs])
        part = {"prompt_hash": hs, **{c: [float(v) for v in res[c]] for c in cols},
                "nonfinite": [bool(v) for v in res["nonfinite"]]}
        with atomic_path(cdir / f"part-{uuid.uuid4().hex[:12]}.parquet") as tmp:
            pq.write_table(pa.table(part), tmp)
        for j, h in enumerate(hs):
            done[h] = {k: part[k][j] for k in part}

    ok = {h for h in chosen if _finite(done[h], spec.risk_column)}
    confirmed = np.array([h in ok for h in hashes])
    for c in cols:
        values = np.array([done[h][c] if h in ok else np.nan for h in hashes], dtype=np.float64)
        idx = table.schema.get_field_index(c)
        table = table.set_column(idx, table.schema.field(c), pa.array(values, mask=np.isnan(values)))
    sign = 1.0 if spec.higher_is_riskier else -1.0
    key = np.array([sign * done[h][spec.risk_column] if h in ok else -np.inf for h in hashes])
    table = table.append_column("_confirmed", pa.array(confirmed)).append_column("_key", pa.array(key))
    table = table.sort_by([("_confirmed", "descending"), ("_key", "descending"), ("risk", "descending"),
                           ("prompt_id", "ascending")])
    table = table.drop(["_confirmed", "_key"])
    table = table.set_column(table.schema.get_field_index("rank"), table.schema.field("rank"),
                             pa.array(np.arange(1, table.num_rows + 1, dtype=np.int64)))
    meta = dict(table.schema.metadata or {})
    summary = {
        "scorer": spec.name, "top": str(cfg.confirm_top), "screened_unique_prompts": len(first),
        "unique_prompts_confirmed": len(ok), "rows_confirmed": int(confirmed.sum()),
        "nonfinite": len(chosen) - len(ok), "resumed_prompts": resumed, "scored_prompts": len(todo),
        "forwards_per_prompt": {"screen": _forwards(get_scorer(cfg.scorer), screen_config),
                                "confirm": _forwards(spec, scorer.config)},
        "seconds": round(time.perf_counter() - started, 3),
    }
    fw = summary["forwards_per_prompt"]
    summary["forwards_total"] = fw["screen"] * len(first) + fw["confirm"] * len(chosen)
    # what this invocation did (prompts resumed from the confirm/ stage or scored now, its time) goes to manifest.json
    # only, where the screening run keeps its own wall time: risk.parquet holds the same bytes for the same inputs,
    # a confirm stage resumed or not (its "seconds" made two identical runs' tables differ)
    meta[b"memaudit.confirm"] = json.dumps({k: v for k, v in summary.items() if k not in INVOCATION_FIELDS}).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(risk_path) as tmp:
        pq.write_table(table, tmp)
    manifest = dict(manifest, confirm=summary | {"score_config": scorer.config.to_dict()})
    write_json_atomic(manifest, Path(out) / "manifest.json")
    log(f"memaudit: confirmed the top {len(chosen)} of {len(first)} distinct prompts with {spec.name} "
        f"({len(ok)} confirmed, {resumed} resumed); ranked first by {spec.risk_column}")
    return manifest


# the keys of the confirm summary that describe the invocation, not the table: in manifest.json's ``confirm`` only
INVOCATION_FIELDS = ("resumed_prompts", "scored_prompts", "seconds")


def _finite(row: dict, risk_column: str) -> bool:
    """Whether a confirm part's row holds a usable confirming score: not flagged non-finite by the scorer, and its
    risk column a finite number."""
    value = row[risk_column]
    return not row["nonfinite"] and value is not None and bool(np.isfinite(value))


def unapplied_note(out: Path) -> str | None:
    """What a rerun without ``--confirm`` on a folder confirmed before says: ``risk.parquet`` now ranks by the
    screening score alone, and the ``confirm/`` stage kept there is applied again by adding ``--confirm`` (it
    resumes, scoring nothing again). None when the folder holds no confirm stage."""
    try:
        stage = json.loads((Path(out) / CONFIRM_DIR / "confirm.json").read_text())
        name = stage["scorer"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return (f"this folder's {CONFIRM_DIR}/ stage ({name}) is not applied: the command has no --confirm, so "
            f"risk.parquet ranks by the screening score alone; add --confirm {name} --confirm-top ... to apply it "
            "again (its scores are kept)")
