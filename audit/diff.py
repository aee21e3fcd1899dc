"""``memaudit diff OLD_RUN NEW_RUN``: what changed between two audits.

Prompts are matched by ``prompt_hash`` (the normalized prompt), one entry per unique prompt: its rank among
the run's unique prompts (ordered by their best row rank, so that how many rows repeat a prompt does not move
the others), its risk, whether any of its rows is flagged and how many rows carry it. Four lists:

* newly flagged: flagged in the new run and not flagged in the old one (or absent from it). When the old run
  was not calibrated it has no flags: every flagged prompt is listed, with status "old run not calibrated",
  and the diff warns;
* largest rank rises: prompts in both runs, by ``old rank - new rank`` (positive = closer to rank 1),
  largest first, where a rank is the prompt's place among the prompts in both runs only (by risk, equal risks
  sharing a rank) in each run. Ranks over each whole run would move every common prompt whenever prompts were
  added or removed (a night with fewer prompts lists its least risky as the largest rises), so an unchanged
  prompt of an unchanged model never moves;
* new prompts and gone prompts: those in one run only, each run's riskiest first (an uncalibrated night's riskiest
  new prompt is in neither list above).

Computed with polars; rendered as rich tables, Markdown or JSON.

Owns the comparison of two finished runs. Must not import torch, the scorers, the models or the engines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from audit.tables import finished_run

from audit.errors import ReportError
from audit.report import MIN_PROMPT_CELLS, clip_text, listed_count, ltr_cell, md_code, md_escape, _md_table
from audit.text import counted, encodable, table_box, threshold_text, visible


@dataclass
class RunDiff:
    """The comparison of two runs."""

    old_dir: Path
    new_dir: Path
    old_calibrated: bool
    new_calibrated: bool
    summary: dict
    # rank, risk, old_rank, old_risk, status, rows, prompt, prompt_id, source (whole-run ranks)
    newly_flagged: pl.DataFrame
    rank_rises: pl.DataFrame  # rise, old_rank, rank, old_risk, risk, rows, prompt, prompt_id, source (among in_both)
    warnings: list = field(default_factory=list)  # why the runs' scores may not be comparable (model, settings)
    flag_warnings: list = field(default_factory=list)  # why "newly flagged", new or gone may not mean so (old run
    # uncalibrated, other thresholds, other --prompt-column names, a run that failed its error gates)
    # the prompts only in the new run, riskiest first (rank, risk, flagged, rows, prompt, prompt_id, source: the new
    # run's), and those only in the old run (old_rank, old_risk, old_flagged, rows, prompt, prompt_id, source)
    added: pl.DataFrame | None = None
    gone: pl.DataFrame | None = None
    # prompts in both runs that the old run flagged and the new run does not (a mitigation's effect), the old run's
    # riskiest first: old_rank, old_risk, rank, risk, rows, prompt, prompt_id, source; None unless both are calibrated
    no_longer_flagged: pl.DataFrame | None = None


def _earlier_fingerprint(a: dict, b: dict) -> str | None:
    """When one run's model fingerprint is what an earlier memaudit computed for the files that the other run's
    model folder (still there, its fingerprint unchanged) holds: a run made before the upgrade and one after, of the
    same model (:func:`audit.models.base.earlier_fingerprint_note`). None otherwise."""
    from audit.models.base import earlier_fingerprint_note, fingerprint_files

    for earlier, current in ((a, b), (b, a)):
        path = current.get("path")
        if not (isinstance(path, str) and isinstance(earlier.get("fingerprint"), str) and Path(path).is_dir()):
            continue
        try:
            if fingerprint_files(Path(path)) != current.get("fingerprint"):
                continue
        except Exception:  # a folder that cannot be read now: no claim about it
            continue
        if note := earlier_fingerprint_note(path, earlier["fingerprint"]):
            return note
    return None


def _comparability(old: dict, new: dict) -> list[str]:
    """Differences in model, score configuration or calibration between two runs' manifests: their risks are then
    on other scales, or their flags from other thresholds; and in the settings that move risks by float rounding
    (:func:`audit.pipeline.mixed_settings_warning`, the rule ``memaudit report`` warns by within one run)."""
    out = []
    m_old, m_new = old.get("model", {}), new.get("model", {})
    if m_old.get("fingerprint") != m_new.get("fingerprint"):
        if note := _earlier_fingerprint(m_old, m_new):
            out.append(f"the runs' model fingerprints differ ([{m_old.get('fingerprint')}] vs "
                       f"[{m_new.get('fingerprint')}]), but not their model files: {note}")
        else:
            out.append(f"the runs used different models ({m_old.get('name')} [{m_old.get('fingerprint')}] vs "
                       f"{m_new.get('name')} [{m_new.get('fingerprint')}])")
    from audit.calibrate import tokenizer_warning

    if warning := tokenizer_warning(m_old.get("tokenizer"), m_new.get("tokenizer")):
        out.append(f"the runs {warning}")
    from audit.scorers import ScoreConfig

    a, b = (ScoreConfig.complete(r.get("score_config", {})) for r in (old, new))
    def shown(c: dict, k: str) -> str:  # a key an earlier memaudit did not record is not a None it chose
        return repr(c[k]) if k in c else "(not recorded by that run's earlier memaudit)"

    changed = [f"{k} {shown(a, k)} -> {shown(b, k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
               or (k in a) != (k in b)]
    if changed:
        out.append("the runs used different score settings (" + "; ".join(changed) + ")")
    from audit.pipeline import combined_scored_with, mixed_settings_warning

    # batch size, --compile, device and torch threads (dtype is a score setting, above): the report's rule, over the
    # units of both runs, so that two nights' rounding noise is not read as change
    if mixed := mixed_settings_warning({"scored_with": combined_scored_with([old, new])}, "the two runs",
                                       {"old run": old.get("scored_with"), "new run": new.get("scored_with")}):
        out.append(mixed)
    c_old, c_new = old.get("confirm"), new.get("confirm")
    if c_old or c_new:  # a --confirm run ranks its confirmed prompts by the confirming score, not by risk
        def cut(top):
            """``--confirm-top`` as the cut it makes: ``5%``, ``0.05`` and ``0.050`` are one cut."""
            from audit.cascade import exact_top

            try:
                return exact_top(top)
            except Exception:  # a value this memaudit does not read: compared as written
                return top

        def same(c):
            return (c.get("scorer"), cut(c.get("top")), c.get("score_config")) if c else None

        if same(c_old) != same(c_new):
            def said(c):
                return f"confirmed with {c.get('scorer')} (--confirm-top {c.get('top')})" if c else "not confirmed"
            out.append(f"the runs rank differently: the old run was {said(c_old)}, the new one {said(c_new)}; the "
                       "rank rises compare screening risks, not the confirmed order, and each list's ranks follow "
                       "its own run's order")
    started = [m.get("first_started_at") or m.get("started_at") for m in (old, new)]
    if all(isinstance(t, str) and t for t in started) and started[0] > started[1]:  # ISO times, both in UTC
        out.append(f"the old run was first started after the new one ({started[0]} vs {started[1]}): OLD_RUN and "
                   "NEW_RUN may be swapped, so that 'newly flagged' and the rises read backwards")
    for side, manifest in (("old", old), ("new", new)):
        if not manifest["counts"]["scored"]:  # an empty side makes every prompt 'new' or 'gone'
            out.append(f"the {side} run scored nothing ({counted(manifest['counts']['rows_read'], 'row')} read, "
                       f"{manifest['counts']['rejected']} rejected)")
    return out


def _calibration_warnings(old: dict, new: dict) -> list[str]:
    """Why "newly flagged" may not mean a prompt's risk rose: the runs flagged with different thresholds (a
    threshold moves flags, not ranks). Two calibrations of the same threshold at another FPR flag the same risks
    (``risk > threshold``), so they get no warning. And a run scored with other settings that move risks by float
    rounding than its calibration's reference run (:func:`audit.pipeline.reference_settings_warning`, as its run and
    its report warn): a prompt at the threshold may be flagged or not by that rounding."""
    from audit.pipeline import reference_settings_warning

    out = []
    c_old, c_new = old.get("calibration"), new.get("calibration")
    if c_old and c_new and c_old.get("threshold") != c_new.get("threshold"):
        # 1.7935721 vs 1.7935724, not 1.79357 twice: threshold_text reads back as the threshold itself
        t_old, t_new = threshold_text(c_old.get("threshold")), threshold_text(c_new.get("threshold"))
        out.append(f"the runs flagged with different calibrations (risk > {t_old} at FPR "
                   f"{c_old.get('fpr')} vs risk > {t_new} at FPR {c_new.get('fpr')}): a prompt "
                   "can be newly flagged with the same risk")
    return out + [w for side, m in (("the old run", old), ("the new run", new))
                  if (w := reference_settings_warning(m, side))]


def _prompt_column_note(old: dict, new: dict) -> list[str]:
    """Why a prompt may be "new" or "gone" with the logs unchanged: the runs read their prompts under different
    ``--prompt-column`` names (a night run with the names in another order, or a name added: each row reads the
    first of them holding a value, so other rows are scored or rejected). Nothing when either manifest does not
    record them."""
    from audit.sources import prompt_column_text

    def names(manifest: dict):
        value = (manifest.get("run_config") or {}).get("prompt_column")
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return tuple(value)
        return None

    n_old, n_new = names(old), names(new)
    if n_old is None or n_new is None or n_old == n_new:
        return []
    return [f"the runs read their prompts under different --prompt-column names ({prompt_column_text(n_old)} vs "
            f"{prompt_column_text(n_new)}): a prompt new or gone may be a row read from another column or rejected "
            "(rejects.parquet), not a change in the inputs"]


def _per_prompt(run_dir: Path) -> tuple[pl.LazyFrame, dict]:
    """One row per unique prompt of a finished run (lazy), and the run's manifest. ``rank`` is the prompt's rank
    among the unique prompts (1, 2, ...), by its best row rank (``best_row``, the rank of that row in
    risk.parquet): a prompt repeated on many rows takes one rank. No prompt text: :func:`_with_text` adds it to
    the few rows listed, so a diff of runs of millions of rows holds a hash and four numbers per prompt."""
    manifest = finished_run(run_dir, error=ReportError)
    calibrated = manifest.get("calibration") is not None  # a null calibration is none (as report reads it)
    lf = pl.scan_parquet(run_dir / "risk.parquet", glob=False)
    flagged = pl.col("flagged").fill_null(False).any() if calibrated else pl.lit(None, pl.Boolean)
    agg = (lf.group_by("prompt_hash")
           .agg(pl.col("rank").min().alias("best_row"), pl.col("risk").first(), flagged.alias("flagged"),
                pl.len().alias("rows"))
           .sort("best_row").with_columns(rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int64)))
    return agg, manifest


def _with_text(run_dir: Path, *frames: pl.DataFrame) -> list[pl.DataFrame]:
    """Each of ``frames`` (rows of :func:`_per_prompt`) with the ``prompt``, ``prompt_id`` and ``source`` of each
    prompt's best-ranked row, read from risk.parquet in one scan by row rank (unique per row; Parquet statistics skip
    row groups without them)."""
    rows = pl.concat([f["best_row"] for f in frames]).unique()
    text = (pl.scan_parquet(run_dir / "risk.parquet", glob=False).filter(pl.col("rank").is_in(rows.implode()))
            .select(best_row="rank", prompt="prompt", prompt_id="prompt_id", source="source").collect())
    return [f.join(text, on="best_row", how="left", maintain_order="left") for f in frames]


OLD_NOT_CALIBRATED = "old run not calibrated"  # a newly flagged prompt's status: the old run had no flags at all


def previous_run(runs: str | Path, new_run: str | Path, log: Callable[[str], None] | None = None) -> Path:
    """The run to compare ``new_run`` with, among the run folders directly under ``runs`` (a scheduled audit's
    ``--out`` parent, e.g. ``audits/nightly``): the latest finished run that was first started before
    ``new_run`` was (the manifests' ``first_started_at``, else ``started_at``; never file times, which a copy or
    a backup restore changes) and that scored at least one row (a night that scored nothing is no baseline: every
    prompt would read as newly flagged). A rerun of an earlier night is so compared with the night before it.
    Of those, the latest with ``new_run``'s model (fingerprint) and score settings is taken, so that a one-off
    run with another scorer or model in the folder does not become the baseline (its risks are on another
    scale); ``log`` is told when a later run was passed over for that. With no such run, the latest is taken and
    the diff warns (:func:`_comparability`).

    Raises:
        ReportError: ``new_run`` is not a finished run, or no such earlier run is under ``runs``.
    """
    import json

    def manifest_of(d: Path) -> dict:
        try:
            got = json.loads((d / "manifest.json").read_bytes())
        except (OSError, ValueError, RecursionError):
            return {}
        return got if isinstance(got, dict) else {}

    def first_start(manifest: dict) -> str:
        value = manifest.get("first_started_at") or manifest.get("started_at")
        return value if isinstance(value, str) else ""

    new_run = Path(new_run)
    new_start = first_start(manifest_of(new_run))
    if not new_start:
        raise ReportError(f"{new_run} is not a finished memaudit run (no manifest.json with its start time)")
    def scale(manifest: dict) -> tuple:
        from audit.scorers import ScoreConfig

        config, model = manifest.get("score_config"), manifest.get("model")
        try:
            return (model.get("fingerprint") if isinstance(model, dict) else None,
                    sorted(ScoreConfig.complete(config).items(), key=str) if isinstance(config, dict) else None)
        except (TypeError, ValueError):  # a manifest this memaudit cannot read: like no other
            return None, id(manifest)

    new_scale = scale(manifest_of(new_run))
    best, best_start, latest = None, "", None
    for d in sorted(Path(runs).iterdir()) if Path(runs).is_dir() else []:
        if not (d / "manifest.json").is_file() or d.resolve() == new_run.resolve():
            continue  # a run in progress has no manifest yet
        # chosen by its manifest alone: a chosen run whose tables are damaged fails the diff, saying so, rather
        # than an older night being compared without a word
        manifest = manifest_of(d)
        start = first_start(manifest)
        counts = manifest.get("counts")
        scored = counts.get("scored") if isinstance(counts, dict) else None  # damaged: no baseline, not a crash
        # (<=: times are to the second, and two runs a second apart are still one before the other)
        if not (start and start <= new_start and isinstance(scored, int) and scored > 0):
            continue
        if latest is None or start > latest[1]:
            latest = d, start
        if scale(manifest) == new_scale and start > best_start:
            best, best_start = d, start
    if latest is None:
        raise ReportError(f"{runs}: no finished run started before {new_run} that scored a row, to compare with")
    if best is None:
        return latest[0]
    if best != latest[0] and log is not None:
        log(f"memaudit: passed over {latest[0]}, a later run with another model or other score settings")
    return best


def _failed_run_notes(old_dir: Path, old: dict, new_dir: Path, new: dict) -> list[str]:
    """Why a prompt may be "new" or "gone", or missing from "newly flagged", with the inputs and the model's risks
    unchanged: a run failed its error gates (exit 4, :func:`audit.gates.recorded_failures`: more than its
    ``--max-error-fraction`` of rows could not be scored or read as prompts), so its lists lack the rows it could not
    score. The report says so of such a run; the diff of it said nothing."""
    from audit.gates import recorded_failures

    return [f"the {side} run failed (exit 4): {why}; a prompt it did not score is missing from its side of the lists"
            for side, run_dir, manifest in (("old", old_dir, old), ("new", new_dir, new))
            for why in recorded_failures(run_dir, manifest)]


def diff_runs(old_run: str | Path, new_run: str | Path, top: int = 20) -> RunDiff:
    """Compare two finished runs.

    Args:
        old_run, new_run: run folders.
        top: how many prompts each list keeps.

    Raises:
        ReportError: a folder is not a finished run, or ``top`` is not a whole number of at least 1.
    """
    top = listed_count(top)
    old_dir, new_dir = Path(old_run), Path(new_run)
    old, old_manifest = _per_prompt(old_dir)
    new, new_manifest = _per_prompt(new_dir)
    old_cal, new_cal = (m.get("calibration") is not None for m in (old_manifest, new_manifest))
    both = new.join(old.select("prompt_hash", old_rank="rank", old_risk="risk", old_flagged="flagged"),
                    on="prompt_hash", how="left").collect()
    newly = (both.filter(pl.col("flagged") & ~pl.col("old_flagged").fill_null(False))
             .with_columns(status=pl.when(pl.col("old_rank").is_null()).then(pl.lit("new prompt"))
                           .otherwise(pl.lit("was not flagged" if old_cal else OLD_NOT_CALIBRATED)))
             .sort("rank"))
    # ranks among the prompts in both runs (by risk, ties sharing the best rank: the runs break ties by prompt_id,
    # which differ between runs): added or removed prompts move no other prompt
    common = (both.filter(pl.col("old_rank").is_not_null())
              .with_columns(rank=pl.col("risk").rank("min", descending=True).cast(pl.Int64),
                            old_rank=pl.col("old_risk").rank("min", descending=True).cast(pl.Int64))
              .with_columns(rise=pl.col("old_rank") - pl.col("rank")))
    # equal rises at equal ranks in the new run's row order (best_row): polars' multi-threaded sort leaves ties in
    # any order, so that two diffs of the same runs listed other prompts under --top
    rises = common.filter(pl.col("rise") > 0).sort(["rise", "rank", "best_row"], descending=[True, False, False])
    n_old = old.select(pl.len()).collect().item()
    summary = {
        "old_prompts": n_old,
        "new_prompts": both.height,
        "in_both": int(both["old_rank"].is_not_null().sum()),
        "only_new": int(both["old_rank"].is_null().sum()),
        "newly_flagged": newly.height if new_cal else None,
        "rank_risen": rises.height,
        "rank_fallen": int((common["rise"] < 0).sum()),
    }
    summary["only_old"] = n_old - summary["in_both"]
    # the other direction of "newly flagged" (a mitigation's effect: prompts the old run flagged that the new run
    # scores but does not flag), and each run's flagged prompts; null where a run has no flags
    summary["old_flagged"] = (old.filter(pl.col("flagged")).select(pl.len()).collect().item() if old_cal else None)
    summary["new_flagged"] = int(both["flagged"].fill_null(False).sum()) if new_cal else None
    summary["no_longer_flagged"] = (int((both["old_flagged"].fill_null(False) & ~both["flagged"].fill_null(False))
                                        .sum()) if old_cal and new_cal else None)
    # each list ends with the source file of the prompt's row, which says whether its id is a default one (the
    # terminal shortens '<source>#<row>' to the file's name; an --id-column id such as 'users/alice#42' stays whole)
    cols_new = ["rank", "risk", "old_rank", "old_risk", "status", "rows", "prompt", "prompt_id", "source"]
    cols_rise = ["rise", "old_rank", "rank", "old_risk", "risk", "rows", "prompt", "prompt_id", "source"]
    flag_warnings = (_calibration_warnings(old_manifest, new_manifest) + _prompt_column_note(old_manifest, new_manifest)
                     + _failed_run_notes(old_dir, old_manifest, new_dir, new_manifest))
    if new_cal and not old_cal:
        flag_warnings.append(f"the old run was not calibrated: it has no flags, so every prompt flagged in the new "
                             f"run is listed as newly flagged, those the old run scored with status "
                             f"'{OLD_NOT_CALIBRATED}' (rerun the old run's command with the new run's --calibration "
                             "to compare flags)")
    # the prompts of one run only, each run's riskiest first: an uncalibrated night's new prompts are in no other list
    added = both.filter(pl.col("old_rank").is_null()).sort("rank").head(top)
    # (the old run scanned again, not held beside ``both``: a diff holds one run's prompts at a time, plus the hashes of
    # those in both runs; none of it when no prompt is gone)
    common_hashes = both.filter(pl.col("old_rank").is_not_null()).select("prompt_hash").lazy()
    gone = (old.join(common_hashes, on="prompt_hash", how="anti").sort("rank").head(top) if summary["only_old"]
            else old.head(0)).collect()
    dropped = (both.filter(pl.col("old_flagged").fill_null(False) & ~pl.col("flagged").fill_null(False))
               .sort("old_rank").head(top))
    newly, rises, added, dropped = _with_text(new_dir, newly.head(top), rises.head(top), added, dropped)
    (gone,) = _with_text(old_dir, gone)
    gone = gone.rename({"rank": "old_rank", "risk": "old_risk", "flagged": "old_flagged"})
    return RunDiff(old_dir, new_dir, old_cal, new_cal, summary, newly.select(cols_new), rises.select(cols_rise),
                   warnings=_comparability(old_manifest, new_manifest), flag_warnings=flag_warnings,
                   added=added.select("rank", "risk", "flagged", "rows", "prompt", "prompt_id", "source"),
                   gone=gone.select("old_rank", "old_risk", "old_flagged", "rows", "prompt", "prompt_id", "source"),
                   no_longer_flagged=dropped.select(_DROPPED_COLS) if old_cal and new_cal else None)


def _fmt(v, decimals: int = 5) -> str:
    if v is None:
        return "-"
    return f"{v:.{decimals}f}" if isinstance(v, float) else clip_text(str(v))


def _cells(frame: pl.DataFrame, short_ids: bool = False) -> list[list[str]]:
    """A list's rows as display text (:func:`_shown_rows`, each value by :func:`_fmt`). A row holding both runs'
    risks of a prompt (rank rises, no longer flagged) prints them with 5 decimals, more where they differ but would
    print alike: two nights at different batch sizes move a risk by about 1e-7, which reorders near-equal prompts, and
    a rise of 1 read 'old risk 1.00000, new risk 1.00000'."""
    cols = [c for c in frame.columns if c != "source"]
    pair = (cols.index("old_risk"), cols.index("risk")) if "old_risk" in cols and "risk" in cols else None
    out = []
    for row in _shown_rows(frame, short_ids):
        decimals = 5
        if pair and all(isinstance(row[i], float) for i in pair):
            a, b = row[pair[0]], row[pair[1]]
            while decimals < 17 and a != b and f"{a:.{decimals}f}" == f"{b:.{decimals}f}":
                decimals += 1
        out.append([_fmt(v, decimals if pair and i in pair else 5) for i, v in enumerate(row)])
    return out


_NEW_HEAD = ["rank", "risk", "old rank", "old risk", "status", "rows", "prompt", "prompt_id"]
_DROPPED_COLS = ["old_rank", "old_risk", "rank", "risk", "rows", "prompt", "prompt_id", "source"]
_DROPPED_HEAD = ["old rank", "old risk", "rank", "risk", "rows", "prompt", "prompt_id"]
DROPPED_NOTE = ("Old rank and rank: the prompt's place among all the unique prompts of its run (the old run, the new "
                "run), by risk; the old run's riskiest first")
_RISE_HEAD = ["rise", "old rank", "new rank", "old risk", "new risk", "rows", "prompt", "prompt_id"]
_ADDED_HEAD = ["rank", "risk", "flagged", "rows", "prompt", "prompt_id"]
_GONE_HEAD = ["old rank", "old risk", "old flagged", "rows", "prompt", "prompt_id"]
ADDED_NOTE = "Rank: the prompt's place among all the unique prompts of the new run, by risk; riskiest first"
GONE_NOTE = "Old rank: the prompt's place among all the unique prompts of the old run, by risk; riskiest first"


def _one_side_tables(d: RunDiff) -> list[tuple[str, pl.DataFrame, list[str], str]]:
    """The lists of prompts in one run only: (title, rows with a flag shown as FLAG or blank, header, note)."""
    out = []
    for title, frame, head, note, total, calibrated in (
            ("New prompts", d.added, _ADDED_HEAD, ADDED_NOTE, d.summary["only_new"], d.new_calibrated),
            ("Gone prompts", d.gone, _GONE_HEAD, GONE_NOTE, d.summary["only_old"], d.old_calibrated)):
        if frame is None:
            continue
        flag = frame.columns[2]
        if calibrated:
            frame = frame.with_columns(pl.col(flag).replace_strict({True: "FLAG", False: ""}, default=None,
                                                                   return_dtype=pl.String))
        else:  # that run has no flags: no column of "-"
            frame, head = frame.drop(flag), [h for h in head if h != head[2]]
        out.append((f"{title} ({frame.height} of {total:,} shown)", frame, head, note))
    return out


def _dropped_table(d: RunDiff) -> list[tuple[str, pl.DataFrame, list[str], str]]:
    """The list of prompts no longer flagged, as (title, rows, header, note), where both runs are calibrated."""
    if d.no_longer_flagged is None:
        return []
    return [(f"No longer flagged ({d.no_longer_flagged.height} of {d.summary['no_longer_flagged']:,} shown)",
             d.no_longer_flagged, _DROPPED_HEAD, DROPPED_NOTE)]


NEW_NOTE = ("Rank and old rank: the prompt's place among all the unique prompts of its run (the new run, the old "
            "run), by risk")


def _rise_note(d: RunDiff) -> str:
    """What the ranks of the rank-rises list are."""
    if not d.summary["in_both"]:
        return "No prompt is in both runs, so no rank can rise"
    return (f"Old rank and new rank: the prompt's place among the {counted(d.summary['in_both'], 'prompt', ',')} in "
            "both runs, by risk in each run (equal risks share a rank), so a prompt added or gone moves no other "
            "prompt's rank")


def _summary_line(d: RunDiff) -> str:
    s = d.summary
    # thousands separated, as the lists' titles count them ('New prompts (20 of 1,500 shown)')
    flagged = (f"{s['newly_flagged']:,} newly flagged, {s['no_longer_flagged']:,} no longer flagged "
               f"({counted(s['old_flagged'], 'prompt', ',')} flagged before, {s['new_flagged']:,} now)"
               if d.new_calibrated and d.old_calibrated
               else f"{s['newly_flagged']:,} flagged (old run not calibrated: no flags to compare)" if d.new_calibrated
               else "new run not calibrated: no flags to compare (run with --calibration)")
    return (f"{counted(s['new_prompts'], 'prompt', ',')} in the new run, {s['old_prompts']:,} in the old; "
            f"{s['in_both']:,} in both, {s['only_new']:,} new, {s['only_old']:,} gone; {flagged}; "
            f"{s['rank_risen']:,} rose and {s['rank_fallen']:,} fell in rank among the {s['in_both']:,} in both")


_TEXT_COLUMNS = ("prompt", "prompt_id", "status")  # the diff tables' left-aligned, wrapping columns


def list_widths(head: list[str], cells: list[list[str]], width: int) -> list[int | None] | None:
    """The widths of a diff list's terminal table, ``width`` columns wide (None for a text column: the prompt, its
    id and a status share what the numbers leave), or None where the table would leave its text columns under
    :data:`audit.report.MIN_PROMPT_CELLS` cells each, as the report's top table does
    (:func:`audit.report.top_table_fits`): then it is printed one block a prompt. A number column is as wide as its
    header or widest value, or where that leaves too little, its header's widest word (``old`` / ``rank`` on two
    lines); plus 3 (padding and border), the table 1 more. A number is never cut: left to rich, at 72 columns
    '2.12480' was folded into '2.1248' / '0', and at 40 columns (``COLUMNS=40``, a screen magnifier) the rank-rise
    table's six number columns left the prompt 2 cells and cut every risk over four lines."""
    from rich.cells import cell_len

    numbers = [j for j, h in enumerate(head) if h not in _TEXT_COLUMNS]
    text = len(head) - len(numbers)
    values = {j: max(cell_len(row[j]) for row in cells) for j in numbers}
    for header in (lambda h: cell_len(h), lambda h: max(cell_len(w) for w in h.split())):
        widths = {j: max(header(head[j]), values[j]) for j in numbers}
        if width - 1 - sum(w + 3 for w in widths.values()) - 3 * text >= MIN_PROMPT_CELLS * text:
            return [widths.get(j) for j in range(len(head))]
    return None


def render_terminal(d: RunDiff, console=None) -> None:
    """Print the diff as rich tables (untrusted text as :class:`rich.text.Text`), what the console's encoding lacks
    escaped before rich sizes a column with it (:func:`audit.text.encodable`); a list whose table would leave its
    prompt too narrow (:func:`list_widths`: a terminal under about 70 columns) prints one block a prompt instead, as the
    report does: its numbers on one line, named as diff.json names them (``old_rank=11``), the prompt, its id."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()

    def shown(text: str) -> Text:
        return Text(encodable(visible(text), console.encoding))

    def print_list(title: str, head: list[str], frame: pl.DataFrame, note) -> None:
        cells = _cells(frame, short_ids=True)
        widths = list_widths(head, cells, console.width)
        if widths is None:  # one block a prompt: the numbers named as diff.json names them (its columns), the text
            console.print(Text(title, style="italic"))
            names = [c for c in frame.columns if c != "source"]  # the rises' "new rank" is diff.json's "rank"
            for row in cells:
                named = [f"{n}={c}" for n, c in zip(names, row) if n not in ("prompt", "prompt_id") and c != ""]
                console.print(shown("  ".join(named)), style="bold")
                console.print(ltr_cell(shown(row[head.index("prompt")])))
                console.print(shown(f"id: {row[head.index('prompt_id')]}"), style="dim")
            console.print(note if isinstance(note, Text) else shown(note), style="dim")
            return
        t = Table(title=title, caption=note, caption_justify="left", box=table_box())
        for h, w in zip(head, widths):  # a number column as wide as list_widths says: its numbers never cut
            t.add_column(h, justify="left" if h in _TEXT_COLUMNS else "right", overflow="fold", width=w)
        for row in cells:
            t.add_row(*[ltr_cell(shown(cell)) for cell in row])
        console.print(t)

    console.print(Text.assemble(shown(f"memaudit diff: {d.old_dir} -> {d.new_dir}"), style="bold"))
    console.print(shown(_summary_line(d)))
    for w in d.warnings:
        console.print(Text.assemble(shown(f"warning: {w}; rank changes may reflect that, not the prompts"),
                                    style="yellow"))
    for w in d.flag_warnings:
        console.print(Text.assemble(shown(f"warning: {w}"), style="yellow"))
    for title, frame, head in ((f"Newly flagged ({d.newly_flagged.height} shown)", d.newly_flagged, _NEW_HEAD),
                               (f"Largest rank rises ({d.rank_rises.height} shown)", d.rank_rises, _RISE_HEAD)):
        if title.startswith("Newly") and not d.new_calibrated:
            continue
        rises = title.startswith("Largest")
        if frame.height == 0:  # no table of headers only: its title and note say it
            console.print(Text(f"{title}: none.", style="bold"), shown(_rise_note(d) if rises else NEW_NOTE))
            continue
        print_list(title, head, frame, shown(_rise_note(d) if rises else NEW_NOTE))
    for title, frame, head, note in _dropped_table(d) + _one_side_tables(d):
        if frame.height == 0:
            console.print(Text(f"{title}: none.", style="bold"))  # (its note explains the columns)
            continue
        print_list(title, head, frame, note)


def _short_default_id(prompt_id, source=None):
    """A default ``prompt_id`` (``<source>#<row>``, of the row's own ``source``) as the file's name and the row in the
    terminal, as the report shows it (a whole path wrapped over several lines of a table cell); any other id, such
    as an --id-column id ``users/alice#42``, unchanged (it was cut to ``alice#42``, another id)."""
    if isinstance(prompt_id, str) and isinstance(source, str) and prompt_id.startswith(f"{source}#") and \
            prompt_id[len(source) + 1:].isdigit():
        return f"{source.rstrip('/').rsplit('/', 1)[-1]}#{prompt_id[len(source) + 1:]}"
    return prompt_id


def _shown_rows(frame: pl.DataFrame, short_ids: bool = False) -> list[tuple]:
    """A list's rows as the tables show them: without the ``source`` column, the id shortened by
    :func:`_short_default_id` when ``short_ids`` (the terminal)."""
    cols = [c for c in frame.columns if c != "source"]
    if not short_ids or "source" not in frame.columns:
        return list(frame.select(cols).iter_rows())
    pid = cols.index("prompt_id")
    return [tuple(_short_default_id(v, row["source"]) if i == pid else v for i, v in enumerate(row[c] for c in cols))
            for row in frame.iter_rows(named=True)]


DIFF_KIND = "memaudit.diff"  # diff.json's "kind" (an existing JSON file of another kind is not overwritten)


def render_json(d: RunDiff) -> str:
    """The diff as JSON, for an analyst's pandas, polars or DuckDB: the summary, the warnings and the five lists
    (newly flagged, no longer flagged, rank rises, new prompts, gone prompts) with their ranks, risks, flags and rows, and each
    prompt's text and id exactly as risk.parquet holds them (nothing escaped or cut). Strict JSON, UTF-8."""
    import json

    def records(frame: pl.DataFrame | None) -> list[dict]:
        return [] if frame is None else frame.to_dicts()

    doc = {"kind": DIFF_KIND, "version": 1, "old_run": str(d.old_dir), "new_run": str(d.new_dir),
           "old_calibrated": d.old_calibrated, "new_calibrated": d.new_calibrated, "summary": d.summary,
           "warnings": d.warnings, "flag_warnings": d.flag_warnings,
           "newly_flagged": records(d.newly_flagged) if d.new_calibrated else None,
           "no_longer_flagged": records(d.no_longer_flagged) if d.no_longer_flagged is not None else None,
           "rank_rises": records(d.rank_rises), "new_prompts": records(d.added), "gone_prompts": records(d.gone)}
    return json.dumps(doc, ensure_ascii=False, indent=1, allow_nan=False)


def render_markdown(d: RunDiff) -> str:
    """The diff as Markdown (prompts escaped)."""
    out = ["# memaudit diff", "", f"Old: {md_code(d.old_dir)}  ", f"New: {md_code(d.new_dir)}", "",
           md_escape(_summary_line(d)), ""]
    out += [f"**Warning:** {md_escape(w)}; rank changes may reflect that, not the prompts.  " for w in d.warnings]
    out += [f"**Warning:** {md_escape(w)}.  " for w in d.flag_warnings]
    if d.warnings or d.flag_warnings:
        out.append("")
    if d.new_calibrated:
        out += ["## Newly flagged", "", NEW_NOTE + ".", "", _escaped_table(_NEW_HEAD, d.newly_flagged), ""]
    out += ["## Largest rank rises", "", md_escape(_rise_note(d)) + ".", "", _escaped_table(_RISE_HEAD, d.rank_rises),
            ""]
    for title, frame, head, note in _dropped_table(d) + _one_side_tables(d):
        out += [f"## {title}", ""] + ([note + ".", ""] if frame.height else []) + [_escaped_table(head, frame), ""]
    return "\n".join(out)


def _escaped_table(head: list[str], frame: pl.DataFrame) -> str:
    """A Markdown table of ``frame``'s cells (:func:`_cells`) under ``head``, header and cells escaped alike (the
    newly-flagged and rank-rise tables' headers read ``prompt_id`` where the others read ``prompt\\_id``); for no
    rows, the line ``None.`` (a table of headers only, as a diff against a run that scored nothing printed them,
    says nothing the note above it does not)."""
    if frame.height == 0:
        return "None."
    return _md_table([md_escape(h) for h in head], [[md_escape(cell) for cell in row] for row in _cells(frame)])
