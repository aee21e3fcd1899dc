"""``memaudit report RUN_DIR``: what a run found, computed with polars from its Parquet outputs.

One :class:`Report` (counts, a risk histogram with the flag threshold, the top prompts with their
trigger tokens, breakdowns by source file, date partition and ``--by`` columns) rendered three ways:
a rich terminal view, ``report.md`` and a self-contained ``report.html`` (plots embedded as PNG data
URIs, inline CSS, a Content-Security-Policy that forbids scripts and network loads).

Prompt text is untrusted everywhere: control characters and bidi overrides are shown as escapes
(:func:`visible`) in every format; the terminal view passes text to rich as :class:`rich.text.Text`
(never as markup), Markdown escapes the characters Markdown or HTML would interpret, and HTML comes
from a Jinja2 template (``templates/report.html.j2``) with autoescape, every value through
:func:`visible` and :func:`html.escape`.

The tables are read lazily (``polars.scan_parquet``); the histogram, counts and breakdowns are polars
aggregations, so a report over millions of rows holds aggregates, not the table.

Owns the report of a finished run and its renderers. Must not import torch, the scorers, the models
or the engines: it reads only the run folder.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
import datetime as dt
from decimal import Decimal
from functools import cached_property
import html
import io
import json
import math
import os
from pathlib import Path
import re
import unicodedata

import polars as pl

from audit.errors import ReportError
from audit.tables import being_written, finished_run
from audit.text import code_points, counted, encodable, plain_terminal, table_box, threshold_text, visible

FORMATS = ("terminal", "md", "html", "json")
MAX_GROUPS = 50

# hive-style partitions first (date=2026-11-28, dt=..., day=..., ds=...), then the ISO date or year/month/day
# folders nearest the file (partition_date)
_DATE_HIVE = re.compile(r"(?:date|dt|day|ds|partition_date|event_date)=(\d{4}-\d{2}-\d{2})")
_DATE_ISO = re.compile(r"(?<![0-9])(\d{4})-(\d{2})-(\d{2})(?![0-9])")
_DATE_PART = re.compile(r"\d{2}")


@dataclass
class Report:
    """Everything a report shows, as plain values and small polars frames."""

    run_dir: Path
    manifest: dict
    counts: dict
    threshold: float | None
    fpr: float | None
    # lo, hi, count (rows), flagged (its rows with risk > threshold: 0 without a calibration), above (the bin reaches
    # above the threshold: may hold flagged rows; a bin straddling the threshold holds unflagged rows too)
    hist: pl.DataFrame
    top: pl.DataFrame  # rank, risk, risk_percentile, flagged, prompt, trigger_tokens, rows, prompt_id, source
    breakdowns: list[tuple[str, str, pl.DataFrame]] = field(default_factory=list)  # (title, key column, frame)
    truncated_groups: dict[int, int] = field(default_factory=dict)  # index in breakdowns -> groups not shown
    confirm_column: str | None = None  # a --confirm run: the confirming score's column (in ``top``), which ranks
    # the folder holding every source file of the run (the terminal's source breakdown names its files under it), found
    # over all of them before the breakdown is cut to MAX_GROUPS; "" when none is common
    source_folder: str = ""
    being_written: bool = False  # a memaudit run held the folder's lock when the report was made (a rerun)

    @property
    def confirm(self) -> dict | None:
        """The manifest's ``confirm`` record of a two-stage run (scorer, prompts confirmed), else None."""
        return self.manifest.get("confirm")

    @property
    def skipped(self) -> list[list[str]]:
        """Input files not read (marker files, unsupported types, unreadable with --skip-bad-files): [path, reason]."""
        return [[s.get("path", ""), s.get("reason", "")] for s in self.manifest.get("skipped_files") or []]

    @property
    def warnings(self) -> list[str]:
        """What a reader of report.md or report.html must see before the tables: a run that scored nothing (every row
        rejected, no rows, or every input file skipped) summarizes no scores, and one that failed its error
        gates (exit 4: more than ``--max-error-fraction`` of its rows could not be scored, or could not be read
        as prompts) covers only part of its input; neither must pass for a clean audit (``memaudit report`` says
        it on stderr too); nor one that failed its ``--fail-on-flagged`` gate (exit 3: more rows flagged than
        the limit it last ran with), the release gate's verdict. And a finished folder that a memaudit run is
        writing again (``--retry-failed``, ``--confirm``, a scheduler's retry) is reported from its last
        finish's tables, which that run replaces. Last, a run whose units were scored with different settings
        that move risks by float rounding (:func:`audit.pipeline.mixed_settings_warning`, which the run
        printed): its near-equal risks may rank otherwise than in a run scored in one go; and a calibrated run
        scored with other such settings than its calibration's reference run
        (:func:`audit.pipeline.reference_settings_warning`, which the run printed too): a prompt at the
        threshold may be flagged or not by that rounding. And what the run warned of its ``--cache`` (the
        manifest's ``cache.warnings``, each line as the run printed it without ``memaudit: warning:``): a cache
        on a read-only mount, used for lookups only (its hits served, the run's new scores not stored, so the
        next run scores them again), scores that could not be stored, damaged parts set aside."""
        from audit.pipeline import settings_warnings

        busy = ["a memaudit run is writing this folder right now (a rerun): this report shows its last finish's "
                "tables, which that run replaces when it finishes"] if self.being_written else []
        if self.counts["scored"]:
            return busy + self._gate_warnings() + settings_warnings(self.manifest) + self.cache_warnings
        c, n = self.counts, len(self.skipped)
        skipped = f"; {counted(n, 'input file', ',')} skipped, not read: see Skipped files" if n else ""
        return busy + [f"the run scored nothing ({counted(c['rows_read'], 'row', ',')} read, {c['rejected']:,} "
                       f"rejected{skipped}): this report summarizes no scores"] + self.cache_warnings

    @property
    def cache_warnings(self) -> list[str]:
        """The lines the run warned of its score cache (``manifest.json``'s ``cache.warnings``, written by
        :func:`audit.pipeline.finalize` from its units' notes, :func:`audit.cache.merge_notes`), in their order; [] for
        a run without ``--cache`` or one whose cache gave no warning."""
        cache = self.manifest.get("cache")
        notes = cache.get("warnings") if isinstance(cache, dict) else None
        return [n for n in notes if isinstance(n, str) and n] if isinstance(notes, list) else []

    def _gate_warnings(self) -> list[str]:
        """The run's exit-4 reasons (:func:`audit.gates.error_gate`, :func:`audit.gates.coverage_gate`) under the
        ``--max-error-fraction`` it ran with (0.01 where the manifest records none): a nightly job's report of such
        a run showed its tables as for a clean audit, the failure only in the scheduler's exit code. Then its
        ``--fail-on-flagged`` verdict (:func:`audit.calibrate.flagged_gate` under the limit it last ran with): a
        release gate's report, attached to the ticket, showed the flagged count but not that it failed the gate."""
        from types import SimpleNamespace

        from audit.calibrate import flagged_gate
        from audit.gates import recorded_failures

        failed = [f"the run failed (exit 4): {why}" for why in recorded_failures(self.run_dir, self.manifest)]
        counts = self.manifest.get("counts")
        if self.fail_on_flagged is not None and self.calibrated and isinstance(counts, dict) \
                and type(counts.get("flagged")) is int \
                and (gate := flagged_gate(SimpleNamespace(fail_on_flagged=self.fail_on_flagged), self.manifest)):
            code = "" if failed else " (exit 3)"  # the run exits 4 before its flags are gated
            failed.append(f"the run failed its --fail-on-flagged gate{code}: {gate.split('; outputs')[0]}")
        return failed

    @property
    def fail_on_flagged(self) -> int | None:
        """The ``--fail-on-flagged`` limit the run last ran with (``run_config``), or None: a run without one, or a
        manifest that records none or not a whole number of at least 0."""
        limit = (self.manifest.get("run_config") or {}).get("fail_on_flagged")
        return limit if type(limit) is int and limit >= 0 else None

    @property
    def calibrated(self) -> bool:
        """Whether the run was scored with ``--calibration`` (then ``flagged`` and percentiles are filled)."""
        return self.threshold is not None

    @cached_property
    def _decimals(self) -> tuple[int, int]:
        """``(top, groups)``: the decimals of the top table's risks (5 at least) and of the breakdowns' max risks (4 at
        least), each the fewest with which no listed prompt or group reads against its flags beside the threshold
        (:attr:`threshold_text`; computed once, when first rendered): a flagged risk 1.7935740 beside the threshold
        1.7935721 printed 1.79357, as did the unflagged prompt at the threshold itself, "1.79357" beside "risk >
        1.7935721". Rows whose flag is not ``risk > threshold`` (a table rewritten by another tool) are not taken into
        account; at most 11 decimals are added."""
        if not self.calibrated:
            return 5, 4
        # the top table's risks, and each breakdown group's max risk, which is above the threshold exactly when the
        # group has a flagged row (a file whose riskiest prompt was the threshold's own, 1.7935721, read 'max 1.7936,
        # flagged 0' under 'risk > 1.79357')
        top = list(zip(self.top["risk"].to_list(), self.top["flagged"].to_list())) \
            if "flagged" in self.top.columns else []
        groups = []
        for _, _, frame in self.breakdowns:
            if "flagged" in frame.columns and "max_risk" in frame.columns:
                groups += [(v, n > 0) for v, n in zip(frame["max_risk"].to_list(), frame["flagged"].to_list())
                           if n is not None]
        shown = Decimal(self.threshold_text)

        def fewest(pairs, least):
            pairs = [(v, f) for v, f in pairs
                     if isinstance(v, float) and math.isfinite(v) and f is not None and f == (v > self.threshold)]
            return next((d for d in range(least, least + 12)
                         if all((Decimal(f"{v:.{d}f}") > shown) == f for v, f in pairs)), least + 11)
        return fewest(top, 5), fewest(groups, 4)

    @property
    def threshold_text(self) -> str:
        """The flag threshold as every format prints it, and as calibrate, run and diff print it
        (:func:`audit.text.threshold_text`: the digits that read back as the threshold itself)."""
        return threshold_text(self.threshold)

    @property
    def risk_decimals(self) -> int:
        """The decimals of the top table's risks: 5, more where one would read against its flag (:attr:`_decimals`)."""
        return self._decimals[0]

    @property
    def group_decimals(self) -> int:
        """The decimals of the breakdowns' max risk: 4, more where one would read against its flag (:attr:`_decimals`;
        the mean and p95 keep 4: they say nothing of the flags, and a column less leaves the group's name its width at
        80 columns)."""
        return self._decimals[1]

# ---------------------------------------------------------------- computing

def _valid_date(y: str, m: str, d: str) -> str | None:
    """``YYYY-MM-DD`` when the parts make a calendar date, else None (``2026-13-45`` is no partition)."""
    try:
        return dt.date(int(y), int(m), int(d)).isoformat()
    except ValueError:
        return None


def partition_date(source: str) -> str | None:
    """The date partition (``YYYY-MM-DD``) of a source path, or None: a hive-style component (``date=2026-11-28``,
    ``dt=``, ``day=``, ``ds=``, ``partition_date=``, ``event_date=``) nearest the file; else the ISO date
    (``2026-11-28``, within a name) or ``YYYY/MM/DD`` folders nearest the file. Nearest, because a path also holds
    the folders above the partitions (``backup-2025-12-31/logs/2026-11-28/a.parquet`` is 2026-11-28); only calendar
    dates count."""
    parts = re.split(r"[/\\]", source)
    for part in reversed(parts):
        m = _DATE_HIVE.fullmatch(part)
        if m and (day := _valid_date(*m.group(1).split("-"))):
            return day
    for i in range(len(parts) - 1, -1, -1):
        for m in reversed(list(_DATE_ISO.finditer(parts[i]))):
            if day := _valid_date(*m.groups()):
                return day
        # year/month/day folders: this component is the day folder (not the file name)
        if 2 <= i < len(parts) - 1 and re.fullmatch(r"\d{4}", parts[i - 2]) and all(
                _DATE_PART.fullmatch(p) for p in parts[i - 1:i + 1]):
            if day := _valid_date(parts[i - 2], parts[i - 1], parts[i]):
                return day
    return None


def partition_value(source: str, key: str) -> str | None:
    """The value of hive partition key ``key`` in a source path (``region=eu/part-0.parquet``: ``eu``), from the folder
    nearest the file, or None. An http(s) source is percent-decoded first (a server's listing names the folder
    ``region%3Deu``); other paths are taken as written."""
    from urllib.parse import unquote

    url = source.lower().startswith(("http://", "https://"))
    for part in reversed(re.split(r"[/\\]", source)[:-1]):
        part = unquote(part) if url else part
        if part.startswith(key + "="):
            return part[len(key) + 1:]
    return None


def partition_keys(paths) -> list[str]:
    """The hive partition keys (``region`` of ``region=eu/``) in the folders of ``paths``, sorted (decoded in http(s)
    URLs, as :func:`partition_value` reads them)."""
    from urllib.parse import unquote

    keys = set()
    for source in paths:
        url = source.lower().startswith(("http://", "https://"))
        for part in re.split(r"[/\\]", source)[:-1]:
            part = unquote(part) if url else part
            if "=" in part and not part.startswith("="):
                keys.add(part.split("=", 1)[0])
    return sorted(keys)


def date_expr(dates: dict[str, str | None], col: str = "source") -> pl.Expr:
    """The date partition of each row's source path, from ``dates``, :func:`partition_date` of the run's distinct
    sources (a run has few files and many rows: each path is parsed once); null for a source without one."""
    return pl.col(col).replace_strict(dates, default=None, return_dtype=pl.String)


def _histogram(risk: pl.LazyFrame, bins: int, threshold: float | None) -> pl.DataFrame:
    risk = risk.filter(pl.col("risk").is_finite())  # a memaudit run writes none other; an altered table might
    stats = risk.select(lo=pl.col("risk").min(), hi=pl.col("risk").max()).collect()
    lo, hi = stats["lo"][0], stats["hi"][0]
    if lo is None:
        return pl.DataFrame(schema={"lo": pl.Float64, "hi": pl.Float64, "count": pl.UInt32, "flagged": pl.UInt32,
                                    "above": pl.Boolean})
    if threshold is not None:
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi <= lo:  # every risk equal (and the threshold too): one bin, not N bins that all print the same range
        lo, hi = lo - 0.5 * max(abs(lo), 1e-9) * 1e-6, hi + 0.5 * max(abs(hi), 1e-9) * 1e-6
        bins = 1
    width = (hi - lo) / bins
    # each bin's flagged rows (risk > threshold, as run --calibration flags them): the bin that straddles the
    # threshold holds unflagged rows too, so the bins marked above it count more rows than were flagged
    flag = pl.lit(False) if threshold is None else pl.col("risk") > threshold
    counts = (risk.select(bin=((pl.col("risk") - lo) / width).floor().cast(pl.Int64).clip(0, bins - 1), flag=flag)
              .group_by("bin").agg(count=pl.len(), flagged=pl.col("flag").sum()).collect())
    frame = (pl.DataFrame({"bin": list(range(bins))}).join(counts, on="bin", how="left")
             .with_columns(pl.col("count").fill_null(0).cast(pl.UInt32), pl.col("flagged").fill_null(0).cast(pl.UInt32),
                           lo=lo + pl.col("bin") * width, hi=lo + (pl.col("bin") + 1) * width))
    above = pl.lit(False) if threshold is None else pl.col("hi") > threshold  # may hold flagged rows
    return frame.with_columns(above=above).select("lo", "hi", "count", "flagged", "above")


# what a breakdown computes for each group; a kept input column of one of these names is broken down under the
# label "NAME (column)"
BREAKDOWN_AGGREGATES = ("rows", "unique", "mean_risk", "p95_risk", "max_risk", "flagged", "rejected")
# memaudit's own scores (``--by`` refuses them as keys: they are what a breakdown summarizes)
BREAKDOWN_OWN = ("flagged", "risk", "rank", "risk_percentile")


def _breakdown(risk: pl.LazyFrame, rejects: pl.LazyFrame, key: pl.Expr, name: str, calibrated: bool,
               rejects_have_key: bool) -> pl.DataFrame:
    # mean_risk over the group's risks in ascending order, as one list: polars' mean() adds the chunks its threads
    # read in the order they finish, so two renderings of one run (risk.parquet in row groups) differed in the last
    # bits of a mean (1.0598249627808045 and ...043 in report.json), and a mean on a rounding edge in the page
    aggs = [pl.len().alias("rows"), pl.col("prompt_hash").n_unique().alias("unique"),
            pl.col("risk").sort().implode().list.mean().alias("mean_risk"),
            pl.col("risk").quantile(0.95).alias("p95_risk"),
            pl.col("risk").max().alias("max_risk")]
    if calibrated:
        aggs.append(pl.col("flagged").sum().cast(pl.Int64).alias("flagged"))
    scored = risk.with_columns(key.cast(pl.String).alias(name)).group_by(name).agg(aggs)
    if rejects_have_key:
        rej = rejects.with_columns(key.cast(pl.String).alias(name)).group_by(name).agg(rejected=pl.len())
        scored = scored.join(rej, on=name, how="full", coalesce=True, nulls_equal=True)
        # a group of rejected rows only (a file whose every row was rejected) scored 0 rows and flagged 0 of them
        scored = scored.with_columns(pl.col("rows").fill_null(0), pl.col("unique").fill_null(0),
                                     pl.col("rejected").fill_null(0),
                                     *([pl.col("flagged").fill_null(0)] if calibrated else []))
    return scored.collect()


# the most prompts a report's top list, or each list of a diff, holds: the lists are for reading (`--top 100000000` on a
# run of millions rendered every row into report.html, hours and gigabytes); every scored prompt is in risk.parquet
MAX_TOP = 1000


def whole_number(value, name: str, low: int = 1) -> int:
    """``value`` as an int of at least ``low``, for the counts the report and diff take from Python (``top``,
    ``bins``): polars' ``head(-1)`` keeps all rows but the last, so ``top=-1`` listed one prompt short.

    Raises:
        ReportError: a bool, a non-integer or a value under ``low``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ReportError(f"{name}={value!r}: give a whole number of at least {low}")
    return value


def listed_count(top) -> int:
    """``top`` (:func:`whole_number`, at least 1) as the count of prompts a list keeps: at most :data:`MAX_TOP`
    (a larger count lists that many; :func:`top_note` says so). (``memaudit report --top 4294967296`` and ``diff --top
    10**21`` ended in polars' OverflowError, exit 1; ``--top 100000000`` rendered every row of a big run.)"""
    return min(whole_number(top, "top"), MAX_TOP)


def top_note(asked: int, listed: int, where: str, unique: int | None = None) -> str | None:
    """The one line ``memaudit report`` and ``diff`` print (``memaudit: note: ...``, on stderr) when ``--top asked``
    lists fewer prompts than asked: past :data:`MAX_TOP` (every prompt is in ``where``, the run's risk.parquet), or
    (``unique`` given: a report) more than the run's ``unique`` prompts, all ``listed``. None: as asked."""
    if asked > MAX_TOP:
        return f"--top {asked:,}: a list holds at most {MAX_TOP:,} prompts (every scored prompt is in {where})"
    if unique is not None and asked > listed and listed == unique:
        return f"--top {asked:,}: the run has {counted(unique, 'unique prompt')}, all listed"
    return None


def _top_unique(risk: pl.LazyFrame, cols: list[str], top: int, n_rows: int) -> pl.DataFrame:
    """The ``top`` best-ranked unique prompts, reading only the head of the ranked table: rows with
    ``rank <= k`` (Parquet statistics skip the rest), ``k`` growing until ``top`` unique prompts are found. The
    search reads only ``rank`` and ``prompt_hash``; ``cols`` are read for the ``top`` rows found. (It read every
    column of the head: on a log where prompts repeat, 1,000,000 rows of 200 prompts, the top 20 took 262,144 rows
    with their prompts and trigger tokens, and the report's memory grew with the rows, not the unique prompts.)"""
    k = max(4 * top, 256)
    while True:
        firsts = (risk.filter(pl.col("rank") <= k).group_by("prompt_hash").agg(pl.col("rank").min())
                  .sort("rank").head(top).collect())
        if firsts.height >= top or k >= n_rows:
            break
        k *= 4
    ranks = firsts["rank"]
    last = ranks.max() if len(ranks) else 0
    return (risk.filter((pl.col("rank") <= last) & pl.col("rank").is_in(ranks.implode())).select(cols).collect()
            .sort("rank"))


def build_report(run_dir: str | Path, top: int = 20, by: tuple[str, ...] | list[str] = (), bins: int = 30,
                 all_groups: bool = False) -> Report:
    """Compute a :class:`Report` for a finished run folder.

    Args:
        run_dir: the folder ``memaudit run`` wrote (risk.parquet, rejects.parquet, manifest.json).
        top: how many of the highest-risk prompts to list (unique prompts, best rank first); at most
            :data:`MAX_TOP` (a larger ``top`` lists that many: :func:`listed_count`).
        by: extra columns of risk.parquet to break down by (e.g. columns kept with ``--keep-columns``), or hive
            partition keys of the source paths (``dt`` for ``dt=2026-12-01/part-0.parquet``) that are no column.
        bins: histogram bins.
        all_groups: keep every group of each breakdown (``report.json``, for analysis); by default a breakdown keeps
            :data:`MAX_GROUPS` and counts the others in ``truncated_groups``.

    Raises:
        ReportError: not a finished run, a ``--by`` column that risk.parquet lacks, or ``top`` or ``bins`` not a
            whole number of at least 1 (:func:`whole_number`).
    """
    top, bins = listed_count(top), whole_number(bins, "bins")
    run_dir = Path(run_dir)
    manifest = finished_run(run_dir, ("risk.parquet", "rejects.parquet", "manifest.json"), ReportError)
    risk = pl.scan_parquet(run_dir / "risk.parquet", glob=False)
    rejects = pl.scan_parquet(run_dir / "rejects.parquet", glob=False)
    schema = risk.collect_schema()
    risk_cols = schema.names()
    rej_cols = rejects.collect_schema().names()
    by = list(dict.fromkeys(by))  # a column named twice is broken down once
    sources = pl.concat([risk.select("source"), rejects.select("source")]).unique().collect()["source"].to_list()
    empty = [f.get("path") for f in manifest.get("files") or [] if isinstance(f, dict) and f.get("rows") == 0
             and isinstance(f.get("path"), str)]  # read, and held no row
    hive: dict[str, dict[str, str | None]] = {}  # --by keys that are hive partition folders, not columns
    for col in by:
        if col not in risk_cols and "=" not in col and "/" not in col:
            values = {src: partition_value(src, col) for src in [*sources, *empty] if src is not None}
            if any(v is not None for v in values.values()):
                hive[col] = values
                continue
        if col not in risk_cols:
            keys = partition_keys([*sources, *empty])
            # a kept column whose name holds a comma was split apart by --by's comma list: say how to name it
            comma = next((c for c in risk_cols if "," in c and col.strip() in c.split(",")), None)
            quoted = '"' + comma.replace('"', '""') + '"' if comma else ""
            raise ReportError(f"--by {col}: risk.parquet has no such column; columns: {', '.join(risk_cols)} "
                              "(carry input columns with `memaudit run --keep-columns`)"
                              + (f"; partition keys in the source paths: {', '.join(keys)}" if keys else "")
                              + (f"; the column {comma!r} holds a comma: name it in double quotes, --by '{quoted}'"
                                 if comma else ""))
        if col in BREAKDOWN_OWN or schema[col].is_nested() or schema[col].is_float():
            raise ReportError(f"--by {col}: not a column to group by (a breakdown groups rows by a label such as a "
                              "kept input column, source or prompt; it computes rows, risk and flags itself)")
    cal = manifest.get("calibration")
    threshold = float(cal["threshold"]) if cal else None
    calibrated = threshold is not None and "flagged" in risk_cols
    if not calibrated:  # a table without its flagged column (rewritten by another tool) is shown as uncalibrated:
        threshold = cal = None  # Report.calibrated follows the threshold, and its renderers read counts["flagged"]

    c = risk.select(scored=pl.len(), unique=pl.col("prompt_hash").n_unique(),
                    flagged=pl.col("flagged").sum() if calibrated else pl.lit(None),
                    truncated=pl.col("truncated").sum() if "truncated" in risk_cols else pl.lit(None)
                    ).collect().row(0, named=True)
    reasons = rejects.group_by("reason").agg(n=pl.len()).sort("n", "reason", descending=[True, False]).collect()
    rejected_by_reason = dict(zip(reasons["reason"].to_list(), reasons["n"].to_list()))
    counts = {
        "rows_read": c["scored"] + sum(rejected_by_reason.values()),
        "scored": c["scored"],
        "unique_prompts": c["unique"],
        "duplicates": c["scored"] - c["unique"],
        "rejected": sum(rejected_by_reason.values()),
        "rejected_by_reason": rejected_by_reason,
        "flagged": int(c["flagged"]) if calibrated else None,
        "truncated": int(c["truncated"] or 0) if c["truncated"] is not None else None,
    }
    if manifest.get("cache") is not None:  # null is no cache, as audit.tables.finished_run reads it
        counts["cache_hits"] = manifest["cache"]["hits"]

    top_cols = ["rank", "risk", "risk_percentile", "flagged", "prompt", "trigger_tokens", "prompt_id", "source",
                "prompt_hash"]
    confirm_column = confirm_risk_column(manifest)
    if confirm_column in risk_cols and confirm_column not in top_cols:
        top_cols.insert(2, confirm_column)
    else:
        confirm_column = None
    top_df = _top_unique(risk, [c for c in top_cols if c in risk_cols], top, c["scored"])
    occurrences = (risk.filter(pl.col("prompt_hash").is_in(top_df["prompt_hash"].implode()))
                   .group_by("prompt_hash").agg(rows=pl.len()).collect())
    top_df = top_df.join(occurrences, on="prompt_hash", how="left").sort("rank")

    report = Report(run_dir, manifest, counts, threshold, cal.get("fpr") if cal else None,
                    _histogram(risk, bins, threshold), top_df, confirm_column=confirm_column,
                    being_written=being_written(run_dir))

    def add(title: str, name: str, key: pl.Expr, rejects_have_key: bool, sort_by_key: bool = False,
            empty: tuple = ()) -> None:
        frame = _breakdown(risk, rejects, key, name, calibrated, rejects_have_key)
        if missing := [k for k in dict.fromkeys(empty) if k not in set(frame[name].to_list())]:
            # groups that hold no row (an input file with 0 rows: an empty day of logs) are shown with 0 rows
            zero = pl.DataFrame({name: missing}).with_columns(
                *(pl.lit(0, frame.schema[c]).alias(c) for c in ("rows", "unique", "rejected", "flagged")
                  if c in frame.columns))
            frame = pl.concat([frame, zero], how="diagonal_relaxed")
        if name == "source" and frame.height:  # over every file, not only the MAX_GROUPS shown
            folder = os.path.commonprefix([str(v) for v in frame[name].to_list()]).rpartition("/")[0] + "/"
            report.source_folder = folder if len(folder) > 1 else ""
        # riskiest first (most flagged rows in a calibrated run, then the highest max risk; groups of rejected rows
        # only last), so that when there are more than MAX_GROUPS, the groups shown are the riskiest: with 1,500
        # log files, the first 50 by name hid a file of risky prompts further down
        order = (["flagged"] if calibrated else []) + ["max_risk", name]
        frame = frame.sort(order, descending=[True] * (len(order) - 1) + [False], nulls_last=True)
        if not all_groups and frame.height > MAX_GROUPS:
            report.truncated_groups[len(report.breakdowns)] = frame.height - MAX_GROUPS  # titles may repeat
            frame = frame.head(MAX_GROUPS)
        if sort_by_key:  # files and dates are then listed in their own order
            frame = frame.sort(name, nulls_last=True)
        report.breakdowns.append((title, name, frame))

    add("By source file", "source", pl.col("source"), True, sort_by_key=True, empty=tuple(empty))
    dates = {s: partition_date(s) for s in [*sources, *empty] if s is not None}
    if any(dates.values()):
        add("By date partition", "date", date_expr(dates), True, sort_by_key=True,
            empty=tuple(d for d in (dates.get(f) for f in empty) if d))
    for col in by:
        label = f"{col} (column)" if col in BREAKDOWN_AGGREGATES else col  # a kept column named rows, unique, ...
        if col in hive:  # a partition key of the source paths (dt=2026-12-01/): its folders, empty ones included
            values = hive[col]
            add(f"By {col} (partition folder)", label,
                pl.col("source").replace_strict(values, default=None, return_dtype=pl.String), True,
                sort_by_key=True, empty=tuple(v for v in (values.get(f) for f in empty) if v is not None))
        else:
            add(f"By {col}", label, pl.col(col), col in rej_cols)
    return report


def more_groups(r: Report, i: int) -> str:
    """The line under breakdown ``i`` when it shows only ``MAX_GROUPS`` of its groups: how many are left out, and
    that those shown are the riskiest (:func:`build_report` keeps the groups with the most flagged rows in a
    calibrated run, then the highest max risk)."""
    by = "most flagged rows, then highest max risk" if r.calibrated else "highest max risk"
    return f"... {r.truncated_groups[i]} more groups (those shown have the {by})"


# ---------------------------------------------------------------- trigger tokens in the prompt

_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


def trigger_spans(prompt: str, triggers: list[dict] | None) -> list[tuple[int, int]]:
    """Character spans of the trigger tokens in ``prompt``, merged and sorted.

    A trigger token scored with a fast tokenizer carries its exact span (``start``, ``end``: the tokenizer's
    offset mapping, :meth:`audit.scorers.Scorer.trigger_tokens`); that span is used. Tokens without one
    (a slow tokenizer, or a run written before spans were recorded) are located as before: each BPE piece of
    the CLIP-tokenized (lower-cased) prompt is found inside the word (CLIP's pre-tokenizer split) that
    contains it, preferring the last such word at or before the token's position (a word is at least one
    token), so a repeated word is highlighted where the model attended to it.

    Each span is widened to whole grapheme clusters (:func:`_cluster_span`): the byte-level BPE splits an emoji
    sequence into several tokens, and a highlight cut inside one (a styled and an unstyled piece of the same
    cluster) is mis-measured by rich, which then drops characters of the prompt in the terminal.
    """
    if not prompt or not triggers:
        return []
    spans = [(int(t["start"]), int(t["end"])) for t in triggers
             if t.get("start") is not None and t.get("end") is not None and 0 <= t["start"] < t["end"] <= len(prompt)]
    located = [t for t in triggers if t.get("start") is None or t.get("end") is None]
    words = [(m.start(), m.end(), m.group().lower()) for m in _WORDS.finditer(prompt)] if located else []
    for t in located:
        piece = (t.get("token") or "").replace("</w>", "").strip().lower()
        if not piece:
            continue
        cands = [i for i, w in enumerate(words) if piece in w[2] and len(w[2]) == w[1] - w[0]]
        if not cands:
            continue
        pos = int(t.get("position") or 1)
        before = [i for i in cands if i <= pos - 1]
        i = before[-1] if before else cands[0]
        start, _, text = words[i]
        off = text.find(piece)
        spans.append((start + off, start + off + len(piece)))
    spans = sorted(_cluster_span(prompt, s, e) for s, e in spans)
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _extends(ch: str) -> bool:
    """Whether ``ch`` continues the grapheme cluster before it (a simplified UAX #29 "extend"): a combining mark
    (category M*), zero-width joiner, variation selector, emoji skin-tone modifier or tag character."""
    o = ord(ch)
    return (o == 0x200D or 0xFE00 <= o <= 0xFE0F or 0xE0100 <= o <= 0xE01EF or 0x1F3FB <= o <= 0x1F3FF
            or 0xE0020 <= o <= 0xE007F or unicodedata.category(ch).startswith("M"))


def _joined(text: str, i: int) -> bool:
    """Whether position ``i`` (0 < i < len(text)) lies inside a grapheme cluster, so that no span may start or end
    there: ``text[i]`` extends the character before it, follows a zero-width joiner (the next emoji of a ZWJ
    sequence), or is the second regional indicator of a flag pair."""
    if _extends(text[i]) or text[i - 1] == "\u200d":
        return True
    ri = 0  # regional indicators (flag letters) right before i: they pair up from the left
    while i - 1 - ri >= 0 and 0x1F1E6 <= ord(text[i - 1 - ri]) <= 0x1F1FF:
        ri += 1
    return 0x1F1E6 <= ord(text[i]) <= 0x1F1FF and ri % 2 == 1


def _cluster_span(text: str, start: int, end: int) -> tuple[int, int]:
    """``(start, end)`` widened to grapheme-cluster boundaries of ``text``, so that a highlight never splits an
    emoji ZWJ sequence (👩‍👩‍👧‍👦), a flag, an emoji with its variation selector or skin tone, or a letter and its
    combining accents."""
    while 0 < start < len(text) and _joined(text, start):
        start -= 1
    while 0 < end < len(text) and _joined(text, end):
        end += 1
    return start, end


# what a histogram bar counts: rows of risk.parquet (a prompt repeated on N rows counts N times, as the flagged
# count does), not unique prompts
HIST_COUNTS = "rows"
HIST_ROWS = "counts rows of risk.parquet: a prompt found on several rows counts once per row."
HIST_NOTE = f"Each bar {HIST_ROWS}"

PROMPT_DISPLAY_CHARS = 300  # a prompt is shown up to this many characters in tables (the rest is counted)
PAGE_PROMPT_CHARS = 2000  # ... and up to this many in report.html
NARROW_TERMINAL = 60  # below this many columns the terminal report lists the top prompts as blocks, not a table
# the top prompts are a table only where the prompt column gets about this many cells beside the other columns, else
# one block a prompt (:func:`top_table_fits`)
MIN_PROMPT_CELLS = 8
# a breakdown is a table only where its group column gets this many cells (or its longest label, if shorter) beside
# the numbers, else one block a group (:func:`breakdown_fits`)
MIN_GROUP_CELLS = 10


def top_table_fits(r: Report, width: int) -> bool:
    """Whether the top prompts' terminal table, ``width`` columns wide, leaves the prompt about
    :data:`MIN_PROMPT_CELLS` cells: each number column (rank, risk, a --confirm score, pct and flag, rows) takes its
    header's or widest value's cells plus 3 (padding and border), the table 1 more; the prompt, its trigger tokens
    and its id share the rest (each less 3) about equally: rich, fitting a table wider than the terminal, narrows
    its widest wrapping columns first, whatever their ratios (measured: a calibrated run's three text columns got
    6, 6, 6 cells at 65 columns, 8, 8, 8 at 71, 11, 11, 11 at 80). At exactly 60 columns a calibrated run's prompt
    got 4 cells ("prom / pt / numb / er", a word cut on every line); from there down the prompts are blocks, as
    below 60 columns; a share of 4 in 9 (the ratios) made a table of it from 65 columns, with 6 cells."""
    from rich.cells import cell_len

    heads = ["rank", "risk", *([r.confirm_column] if r.confirm_column else []), *(["pct", "flag"] if r.calibrated
                                                                                else []), "rows"]
    widths = [cell_len(h) for h in heads]
    for row in r.top.iter_rows(named=True):
        cells = [str(row["rank"]), f"{row['risk']:.{r.risk_decimals}f}", *_confirm_cells(r, row),
                 *_calibrated_cells(r, row), str(row["rows"])]
        widths = [max(w, cell_len(c)) for w, c in zip(widths, cells)]
    text = width - 1 - sum(w + 3 for w in widths) - 3 * 3
    return text // 3 >= MIN_PROMPT_CELLS


def breakdown_fits(cols: list[str], heads: list[str], cells: list[list[str]], key: str, width: int) -> bool:
    """Whether a breakdown's terminal table, ``width`` columns wide, leaves its group column (``key``) at least
    :data:`MIN_GROUP_CELLS` cells, or its longest label where that is shorter: each number column takes its header's
    or widest value's cells plus 3 (padding and border), the table 1 more for its left border. At 60 columns a
    calibrated run's source breakdown (8 columns) left the group column 0 cells, no file named, and rich cut the
    numbers that no longer fit ("1.0000" shown as "1.000", "rejected" as "rejecte")."""
    from rich.cells import cell_len

    numbers = sum(max([cell_len(head)] + [cell_len(row[j]) for row in cells]) + 3
                  for j, (col, head) in enumerate(zip(cols, heads)) if col != key)
    k = cols.index(key)
    label = max([cell_len(heads[k])] + [cell_len(row[k]) for row in cells])
    return width - 1 - numbers - 3 >= min(MIN_GROUP_CELLS, label)


def _clip_at(text: str, max_chars: int) -> int:
    """Where to cut ``text`` to at most ``max_chars`` characters without splitting a grapheme cluster (an emoji
    ZWJ sequence, a letter and its accents: :func:`_cluster_span`); ``max_chars`` when one cluster spans it all."""
    return _cluster_span(text, max_chars, max_chars)[0] or max_chars


def cut_text(text: str, max_chars: int = PROMPT_DISPLAY_CHARS) -> str:
    """``text`` cut to ``max_chars`` characters (between characters as drawn), with `` … (+N chars)`` saying how
    much was left out; unchanged when shorter."""
    if len(text) > max_chars:
        cut = _clip_at(text, max_chars)
        text = f"{text[:cut]} … (+{len(text) - cut:,} chars)"
    return text


def clip_text(text: str, max_chars: int = PROMPT_DISPLAY_CHARS) -> str:
    """:func:`cut_text`, passed through :func:`visible` (line breaks as ``\\n``: it fills a table cell)."""
    return visible(cut_text(text, max_chars), one_line=True)


def segments(prompt: str, triggers, max_chars: int | None = PROMPT_DISPLAY_CHARS) -> list[tuple[str, bool]]:
    """``prompt`` cut into ``(text, is_trigger)`` pieces, each passed through :func:`visible` (line breaks and
    tabs as ``\\n`` and ``\\t``: the pieces fill a table cell in every format); past
    ``max_chars`` characters the rest is replaced by one `` … (+N chars)`` piece (None: never)."""
    out, at = [], 0
    for s, e in trigger_spans(prompt, triggers):
        if s > at:
            out.append((prompt[at:s], False))
        out.append((prompt[s:e], True))
        at = e
    if at < len(prompt):
        out.append((prompt[at:], False))
    if max_chars is None or len(prompt) <= max_chars:
        return [(visible(t, one_line=True), hit) for t, hit in out]
    cut = _clip_at(prompt, max_chars)
    clipped, left = [], cut
    for text, hit in out:
        if left <= 0:
            break
        clipped.append((text[:left], hit))
        left -= len(text)
    clipped.append((f" … (+{len(prompt) - cut:,} chars)", False))
    return [(visible(t, one_line=True), hit) for t, hit in clipped]


def _short_id(prompt_id: str, source: str | None) -> str:
    """A default ``prompt_id`` (``<source>#<row>``) as the source file's name and the row, for the terminal's
    narrow column (the HTML page and Markdown keep the whole id); ids from ``--id-column`` cut at
    :data:`PROMPT_DISPLAY_CHARS` as prompts are."""
    if source and prompt_id.startswith(f"{source}#"):
        return f"{source.rstrip('/').rsplit('/', 1)[-1]}#{prompt_id[len(source) + 1:]}"
    return clip_text(prompt_id)  # an --id-column id: cut as prompts are, line breaks shown as \n (findable)


def confirm_risk_column(manifest: dict) -> str | None:
    """The column of ``risk.parquet`` that holds a ``--confirm`` run's confirming score (the confirming scorer's
    risk column, e.g. ``noise_magnitude``), or None for a one-stage run, a manifest without the scorer's name,
    or a scorer this install lacks (a plugin scorer's run reported where the plugin is not installed: the report
    then ranks as a one-stage run does)."""
    confirm = manifest.get("confirm")
    if not confirm:
        return None
    from audit.errors import RunError
    from audit.scorers import get_scorer

    try:
        return get_scorer(confirm["scorer"]).risk_column
    except (KeyError, TypeError, RunError):  # no name, a name that is not a string, an unregistered scorer
        return None


def _rank_note(r: Report) -> str | None:
    """How to read the ranks of the top table: in a ``--confirm`` run the confirmed prompts rank first, by the
    confirming score, not by risk; and ranks skip numbers where a prompt holds several rows (each row of
    ``risk.parquet`` has its own rank; the table lists a prompt once, at its best rank, with its row count)."""
    notes = []
    if r.confirm_column:
        c = r.confirm or {}
        notes.append(f"two-stage run: the top {c.get('unique_prompts_confirmed')} prompts by risk were re-scored "
                     f"with {c.get('scorer')} and rank first by its score (column {r.confirm_column}; higher = "
                     "riskier), the others after them by risk; flags follow risk.")
    if r.top.height and (r.top["rows"] > 1).any():
        notes.append("rank is a prompt's first row in risk.parquet; a prompt found in several rows (rows > 1) "
                     "holds that many ranks, so the next prompt's rank skips them.")
    return " ".join(notes) or None


def _confirm_cells(r: Report, row: dict) -> list[str]:
    """The top table's confirming-score cell of a ``--confirm`` run (``-`` for a prompt not confirmed), else none."""
    return [_num(row[r.confirm_column])] if r.confirm_column else []


def _calibrated_cells(r: Report, row: dict) -> list[str]:
    """The top table's percentile and flag cells of a calibrated run, else none (without a calibration they are
    ``-`` on every row: the terminal, Markdown and HTML reports leave them out alike)."""
    return [_percentile(row.get("risk_percentile")), _flag(row.get("flagged"))] if r.calibrated else []


def top_title(r: Report) -> str:
    """The top table's heading in report.md and report.html: ``Top 12 prompts``, or ``Top prompts`` for a run that
    scored nothing (its one line :data:`NO_SCORED_ROWS` under it, as the terminal's ``Top prompts: no scored rows``)."""
    return f"Top {counted(r.top.height, 'prompt')}" if r.top.height else "Top prompts"


def _top_header(r: Report) -> list[str]:
    """The top table's column names in report.md and report.html."""
    return ["rank", "risk", *([r.confirm_column] if r.confirm_column else []),
            *(["percentile", "flagged"] if r.calibrated else []), "prompt", "trigger tokens", "rows", "prompt_id"]


def _token_label(token) -> str:
    """A trigger token as listed: a word as is, anything else (``,``, ``.``, a space, an empty token) in double
    quotes, so that a comma token is not read as the list's separator (``ring (0.161), "," (0.104)``)."""
    token = token or ""
    return token if re.fullmatch(r"\w+(?:['-]\w+)*", token) else json.dumps(token, ensure_ascii=False)


def _trigger_pairs(triggers) -> list[tuple[str, str]]:
    """Each trigger token's label (:func:`_token_label`) and mass as shown (``0.104``; a null mass, which the
    schema allows, as ``-``). A mass under 0.0005 has two significant digits (``0.00041``): at 3 decimals it read
    ``0.000``, no attention at all, where Stable Diffusion's BOS token holds 90-99% of it and a prompt's fifth
    trigger token often holds less than that."""
    def mass(m: float) -> str:
        return format(m, ".3f") if m == 0 or abs(m) >= 0.0005 else format(m, ".2g")

    return [(_token_label(t["token"]), "-" if t["mass"] is None else mass(t["mass"])) for t in (triggers or [])]


def _trigger_list(triggers, marks: bool = True) -> str:
    """``token (mass), ...`` (:func:`_trigger_pairs`), escaped (:func:`audit.text.visible`), for the terminal (print
    it as plain :class:`rich.text.Text`, not escaped again): a right-to-left token (Arabic, Hebrew) is
    followed by a left-to-right mark (U+200E, drawn as nothing), so that a terminal that lays out bidirectional text
    (GNOME Terminal, Konsole) keeps each token beside its own mass, as ``<bdi>`` does on the page; not with
    ``marks=False`` (a console that cannot print the mark writes it as an escape)."""
    labels = [(visible(label, one_line=True), mass) for label, mass in _trigger_pairs(triggers)]
    return ", ".join(f"{label}{LRM if marks and has_rtl(label) else ''} ({mass})" for label, mass in labels)


LRM = "\u200e"  # LEFT-TO-RIGHT MARK: a strong left-to-right character of no width


def has_rtl(text: str) -> bool:
    """Whether ``text`` holds a right-to-left letter (bidi class R or AL: Hebrew, Arabic, Syriac, Thaana, ...)."""
    return any(unicodedata.bidirectional(c) in ("R", "AL") for c in text if ord(c) >= 0x590)


def ltr_cell(text):
    """A rich table cell of ``text`` (:class:`rich.text.Text`) laid out as before, whose every line that holds a
    right-to-left letter ends with a left-to-right mark (U+200E, no width). A terminal that lays out bidirectional
    text (GNOME Terminal's VTE, Konsole: the Unicode bidi algorithm over each printed line, left to right) otherwise
    reads the spaces and the border between an Arabic prompt and an Arabic trigger token in the next column as part
    of one right-to-left run and mirrors the whole run: the token and the next cells' values (the row count) were
    drawn inside the prompt's column, the border moved. Text without such letters is returned as it is, and no
    mark is written to a console that cannot encode it (``LC_ALL=C``: it would print as an escape)."""
    if not has_rtl(text.plain):
        return text
    from rich.measure import Measurement
    from rich.segment import Segment

    class _LtrLines:
        def __rich_console__(self, console, options):
            marks = (console.encoding or "").lower().startswith("utf")  # else the mark is printed as an escape
            for line in console.render_lines(text, options, pad=False):
                yield from line
                if marks and has_rtl("".join(seg.text for seg in line)):
                    yield Segment(LRM)
                yield Segment.line()

        def __rich_measure__(self, console, options):
            return Measurement.get(console, options, text)

    return _LtrLines()


# ---------------------------------------------------------------- formatting helpers

def _num(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e6 else f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _percentile(v) -> str:
    """A risk percentile as the top table shows it, 2 decimals (``98.09``), more where 2 would read 100.00 or 0.00 for
    one that is not: 100 means at or above the reference's highest risk, and a prompt above 99,999 of 100,000
    reference prompts (99.999) is not there."""
    if not isinstance(v, float) or not 0 < v < 100:
        return _num(v, 2)
    digits = 2
    while digits < 12 and float(f"{v:.{digits}f}") in (0.0, 100.0):
        digits += 1
    return f"{v:.{digits}f}"


def _fpr(r: Report) -> str:
    """The calibration's FPR as shown (``0.01``), or ``unknown`` for a manifest whose calibration records none (an
    edited one: memaudit writes it)."""
    return "unknown" if r.fpr is None else f"{r.fpr:g}"


def _flag(v) -> str:
    return "-" if v is None else ("FLAG" if v else "")


def _bar(count: int, peak: int, width: int = 40, ascii_only: bool = False) -> str:
    """A histogram bar of ``count`` against ``peak`` (a sliver for a count too small to round to a block); in
    ``#`` and ``|`` where the output's encoding has no block characters (``LC_ALL=C`` with ``PYTHONUTF8=0``)."""
    n = 0 if peak == 0 else round(width * count / peak)
    block, sliver = ("#", "|") if ascii_only else ("█", "▏")
    return block * n if n or not count else sliver


def _split_bar(count: int, flagged: int, peak: int, width: int = 40, ascii_only: bool = False) -> tuple[str, str]:
    """A histogram bar (:func:`_bar`) cut in two: the part for the bin's unflagged rows and the part for its
    flagged ones (drawn red), the flagged part at least one cell when the bin holds a flagged row and all of it
    when every row is flagged."""
    bar = _bar(count, peak, width, ascii_only)
    if not flagged or flagged >= count:
        return ("", bar) if flagged else (bar, "")
    n = min(max(round(len(bar) * flagged / count), 1), len(bar))
    if n == len(bar) > 1:  # some rows are not flagged: one cell at least stays unflagged
        n -= 1
    return bar[:len(bar) - n], bar[len(bar) - n:]


def _count_rows(r: Report) -> list[tuple[str, str]]:
    c = r.counts
    rows = [("rows read", _num(c["rows_read"])), ("scored", _num(c["scored"])),
            ("unique prompts", _num(c["unique_prompts"])), ("duplicates", _num(c["duplicates"])),
            ("rejected", _num(c["rejected"]))]
    rows += [(f"rejected: {reason}", _num(n)) for reason, n in c["rejected_by_reason"].items()]
    if c.get("truncated"):  # scored from their first tokens only: the text encoder's maximum length
        rows.append(("truncated (scored on the first tokens)", _num(c["truncated"])))
    if r.calibrated:
        rows.append(("flagged", f"{c['flagged']:,} rows (risk > {r.threshold_text}, calibrated at FPR {_fpr(r)})"))
    else:
        rows.append(("flagged", "not calibrated (run with --calibration)"))
    if "cache_hits" in c:
        # scored rows served by the cache, as the manifest counts them (a prompt on 3 rows is 3): with the rows the
        # model scored they add up to the rows scored
        rows.append(("cache hits (rows)", _num(c["cache_hits"])))
    if r.skipped:
        rows.append(("skipped files (not read)", _num(len(r.skipped))))
    return rows


NO_GROUP = "(none)"  # the label of a breakdown's rows that have no value for its key (a null kept column, a file
# outside any date partition): "-" is what an input value "-" shows, and what a missing number shows


def _breakdown_cells(frame: pl.DataFrame, cols: list[str], key: str, digits: int = 4) -> list[list[str]]:
    """A breakdown's rows as display text: numbers formatted, the group label clipped as prompts are (a ``--by
    prompt`` label can be thousands of characters), a null label as :data:`NO_GROUP`. Labels that differ only in
    Unicode normalization (a kept column's 'café' composed and decomposed, files named by macOS and by Linux) print
    alike, as two groups of one name: those are written with their characters beyond ASCII as escapes
    (:func:`audit.text.code_points`: ``caf\\u00e9``, ``cafe\\u0301``). ``digits``: the max risk's decimals
    (:attr:`Report.group_decimals`); mean and p95 print 4."""
    labels = {v for v in frame[key].to_list() if isinstance(v, str)} if key in frame.columns else set()
    forms: dict[str, int] = {}
    for v in labels:
        forms[unicodedata.normalize("NFC", v)] = forms.get(unicodedata.normalize("NFC", v), 0) + 1

    def label(v) -> str:
        if v is None:
            return NO_GROUP
        if not isinstance(v, str):
            return _num(v)
        return clip_text(code_points(v) if forms[unicodedata.normalize("NFC", v)] > 1 else v)

    return [[label(row[c]) if c == key else _num(row[c], digits if c == "max_risk" else 4) for c in cols]
            for row in frame.iter_rows(named=True)]


def _breakdown_columns(frame: pl.DataFrame, key: str) -> list[str]:
    cols = [key, "rows", "unique", "mean_risk", "p95_risk", "max_risk"]
    cols += [c for c in ("flagged", "rejected") if c in frame.columns]
    return cols


def _model_lines(r: Report) -> tuple[str, ...]:
    """The report's header: the model (name, fingerprint and the family that ran it, where recorded), how it was
    scored (scorer, noise draws, seed, the confirm stage if any), the cross-attention layers read, the memaudit that
    finished the run (version and ``memaudit_build``, where the manifest records it), when it ran (:func:`_run_times`),
    and for a run given several
    ``--prompt-column`` names which (in their order: nights run with other names read other rows, :mod:`audit.diff`
    warns)."""
    m, sc = r.manifest.get("model") or {}, r.manifest.get("score_config") or {}
    confirm = r.confirm
    confirmed = (f"; confirmed with {confirm.get('scorer')} (top {confirm.get('unique_prompts_confirmed')} prompts, "
                 "ranked first by it)") if confirm else ""
    family = f"family {m['family']}, " if isinstance(m.get("family"), str) else ""  # recorded since 2026-12-07
    lines = (f"model {m.get('name')} [{m.get('fingerprint')}]",
             f"{family}scorer {sc.get('scorer')}, noise draws {sc.get('noise_draws')} "
             f"({sc.get('noise_generator', 'mt19937')}), seed {sc.get('seed')}{confirmed}",
             f"layers {', '.join(sc.get('layers', []))}")
    if isinstance(build := r.manifest.get("memaudit_build"), str):  # which code made the run (an upgrade between
        made = f"made by memaudit {r.manifest.get('memaudit_version')}, build {build}"  # two nights shows)
        started = _started_build(r.run_dir)
        if started is not None and started != build:  # rerun by an upgraded memaudit: its scores are the old one's
            made = (f"finished by memaudit {r.manifest.get('memaudit_version')}, build {build}; started by build "
                    f"{started} (the units scored before the rerun keep that build's scores)")
        lines += (made,)
    if when := _run_times(r.manifest):
        lines += (when,)
    names = (r.manifest.get("run_config") or {}).get("prompt_column")
    if isinstance(names, list) and len(names) > 1 and all(isinstance(n, str) for n in names):
        from audit.sources import prompt_column_text

        lines += (f"prompts read from {prompt_column_text(tuple(names))} (each row the first holding a value)",)
    return lines


def _run_times(manifest: dict) -> str | None:
    """When the run ran, from its manifest: ``"run 2026-12-08T05:00:33+00:00 to 2026-12-08T05:01:40+00:00 (16 of 20
    units resumed from an earlier invocation)"`` (its first start, its finish, and the units a rerun found done);
    None where the manifest records no start or finish. A report read long after, or handed to someone else, said
    nothing of when its scores were made, or that a kill and a rerun came between."""
    start, end = manifest.get("first_started_at") or manifest.get("started_at"), manifest.get("finished_at")
    if not (isinstance(start, str) and isinstance(end, str)):
        return None
    units = manifest.get("units") if isinstance(manifest.get("units"), dict) else {}
    resumed, total = units.get("resumed"), units.get("total")
    again = (f" ({resumed} of {total} units resumed from an earlier invocation)"
             if isinstance(resumed, int) and isinstance(total, int) and 0 < resumed else "")
    return f"run {start} to {end}{again}"


def _started_build(run_dir: Path) -> str | None:
    """The memaudit build that started the run folder (run.json's ``memaudit_build``), None where it records none
    or cannot be read. A night finished by one build and rerun after an upgrade (nothing left to score) had its
    manifest rewritten by the new build, and the report said "made by" it, though every score came from the old one."""
    try:
        build = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8")).get("memaudit_build")
    except (OSError, ValueError, AttributeError):
        return None
    return build if isinstance(build, str) else None


def _model_line(r: Report) -> str:
    """:func:`_model_lines` as one line (Markdown and HTML, which wrap it themselves)."""
    return ", ".join(_model_lines(r))


def _in_nats(spec) -> bool:
    """Whether a scorer's risk is in nats (its risk column's description says so, as the entropies' do)."""
    from audit.scorers.registry import CAPTURE_COLUMNS

    columns = {c.name: c.description for c in (*CAPTURE_COLUMNS, *spec.columns)}
    return "nats" in columns.get(spec.risk_column, "")


def risk_axis(r: Report) -> str:
    """The plots' risk axis label: ``risk (attention_entropy, nats)``, the scorer and the unit the risk note names
    (the axis read a bare ``risk`` beside text saying nats), ``risk (noise_magnitude)`` for a scorer without one."""
    from audit.errors import RunError
    from audit.scorers import get_scorer

    name = (r.manifest.get("score_config") or {}).get("scorer")
    try:
        spec = get_scorer(name)
    except (RunError, TypeError):
        spec = None
    if not isinstance(name, str):
        return "risk"
    return f"risk ({name}, nats)" if spec is not None and _in_nats(spec) else f"risk ({name})"


def risk_note(r: Report) -> str:
    """What ``risk`` is in this run, for a reader of the report who never ran it: the scorer's quantity, its unit
    where it has one (the scorer registry's column description), that higher is riskier, and that risks compare
    only between runs of one model and score settings; with a calibration, what the percentile is."""
    from audit.errors import RunError
    from audit.scorers import get_scorer

    name = (r.manifest.get("score_config") or {}).get("scorer")
    try:
        spec = get_scorer(name)
    except (RunError, TypeError):  # a scorer this install lacks (a plugin's run reported without the plugin)
        spec = None
    if spec is None:
        what = f"the {name} scorer's value"
    else:
        unit = ", in nats" if _in_nats(spec) else ""
        what = (f"{spec.name}: {spec.description.removesuffix('; higher = riskier')}{unit} (also in column "
                f"{spec.risk_column})")
    note = (f"risk = {what}; higher = riskier. Risks compare only between runs of the same model and score settings "
            "(named above).")
    if r.calibrated:
        note += (" percentile: the percentage of the calibration's reference prompts whose risk is at or below this "
                 f"one; flagged: risk > {r.threshold_text}.")
    return note


# what a breakdown's columns are, under its tables
BREAKDOWN_NOTE = ("Breakdowns: rows = scored rows of the group, unique = its distinct prompts; mean_risk, p95_risk "
                  "and max_risk over its scored rows (a prompt on 3 rows counts 3 times); p95_risk is the risk at "
                  "position round(0.95 x (n - 1)) of the group's n sorted risks, halves rounded up, not interpolated "
                  "(polars' quantile 'nearest'; pandas' default quantile interpolates and differs); flagged = its "
                  "rows with risk above the threshold; rejected = its rows in rejects.parquet; - = no value (no "
                  f"scored row); {NO_GROUP} = the rows without a value for the group's key (a null kept column, a "
                  "file outside any date partition).")


# ---------------------------------------------------------------- terminal (rich)

def render_terminal(r: Report, console=None) -> None:
    """Print the report with rich tables. Untrusted text is passed as :class:`rich.text.Text`, never markup, with
    what the console's encoding lacks already escaped (:func:`audit.text.encodable`: under ``LC_ALL=C``, escapes
    that the stream added after rich sized the columns pushed the borders of a row out of line)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()

    def esc(text: str) -> str:  # what the console's encoding lacks, escaped before rich sizes a column with it
        return encodable(text, console.encoding)

    def text_of(value, **style) -> Text:  # untrusted text: never markup, control characters and line breaks escaped
        return Text(esc(visible(value, one_line=True)), **style)

    console.print(text_of(f"memaudit report: {r.run_dir}", style="bold"))
    for line in _model_lines(r):  # one line would wrap mid-phrase at 80 columns
        console.print(text_of(line, style="dim"))
    console.print(text_of(risk_note(r), style="dim"))

    t = Table(title="Counts", show_header=False, box=table_box())
    t.add_column("what")
    t.add_column("value", justify="right")
    for k, v in _count_rows(r):
        t.add_row(text_of(k), text_of(v))
    console.print(t)

    hist_title = "Risk distribution" + (f" (threshold {r.threshold_text})" if r.calibrated else "")
    plain = plain_terminal()  # a screen reader's terminal: no bars (their counts are in the rows column)
    h = Table(title=hist_title, caption=f"Each bin {HIST_ROWS}" if plain else HIST_NOTE, caption_justify="left",
              box=table_box())
    h.add_column("risk from", justify="right")
    h.add_column("to", justify="right")
    h.add_column(HIST_COUNTS, justify="right")
    if r.calibrated:  # the rows of each bin that were flagged (risk > threshold): they add up to the flagged count
        h.add_column("flagged", justify="right")
    h.add_column("")
    peak = int(r.hist["count"].max() or 0) if r.hist.height else 0
    marked = False
    fmt = edge_format(r.hist, 5)
    ascii_only = plain or not (console.encoding or "").lower().startswith("utf")
    rule = "--" if ascii_only else "──"
    for row in r.hist.iter_rows(named=True):
        if r.calibrated and not marked and row["above"]:
            h.add_row("", "", "", "", text_of(f"{rule} flag threshold {r.threshold_text} {rule}", style="bold red"))
            marked = True
        unflagged, flagged = ("", "") if plain else _split_bar(row["count"], row["flagged"], peak,
                                                                ascii_only=ascii_only)
        bar = Text(unflagged, style="cyan")
        bar.append(flagged, style="red")
        h.add_row(f"{row['lo']:{fmt}}", f"{row['hi']:{fmt}}", f"{row['count']:,}",
                  *([f"{row['flagged']:,}"] if r.calibrated else []), bar)
    console.print(h if r.hist.height else text_of(f"{hist_title}: {NO_SCORED_ROWS}", style="italic"))

    if r.skipped:
        st = Table(title=f"Skipped files: {len(r.skipped)} (not read, not counted)", box=table_box())
        st.add_column("path", overflow="fold")
        st.add_column("reason", overflow="fold")
        for path, reason in r.skipped:
            st.add_row(ltr_cell(text_of(path)), ltr_cell(text_of(reason)))
        console.print(st)

    def prompt_text(row) -> Text:
        text = Text()
        for seg, hit in segments(row["prompt"], row.get("trigger_tokens")):
            text.append(esc(seg), style="bold magenta underline" if hit else None)
        return text

    # a console that shows no styles (TERM=dumb, a pipe or a log file: rich writes no escape codes) shows no
    # highlight: the title said "highlighted" over plain text; the trigger tokens are listed with each prompt
    how = "trigger tokens highlighted" if console.color_system is not None else "trigger tokens listed with each prompt"
    if not r.top.height:  # a run that scored nothing: one line, not a table of headers only
        console.print(text_of(f"Top prompts: {NO_SCORED_ROWS}", style="italic"))
    elif console.width < NARROW_TERMINAL or not top_table_fits(r, console.width):  # one block a prompt: a table's
        # text columns would get 0-1 cells each below 60 columns, and a few from there for a calibrated run
        console.print(Text(f"Top {counted(r.top.height, 'prompt')} ({how})", style="italic"))
        for row in r.top.iter_rows(named=True):
            confirmed = f"  {r.confirm_column} {_num(row[r.confirm_column])}" if r.confirm_column else ""
            calibrated = f"  pct {_percentile(row.get('risk_percentile'))}  {_flag(row.get('flagged'))}" \
                if r.calibrated else ""
            risk = f"{row['risk']:.{r.risk_decimals}f}"
            console.print(text_of(f"#{row['rank']}  risk {risk}{confirmed}{calibrated}  rows {row['rows']}",
                                  style="bold"))
            console.print(prompt_text(row))
            console.print(Text(esc(f"tokens: {_trigger_list(row.get('trigger_tokens'), not ascii_only)}"),
                               style="dim"))
            console.print(text_of(f"id: {_short_id(row['prompt_id'], row.get('source'))}", style="dim"))
        if note := _rank_note(r):  # (printed "None" under the blocks of a run without such a note)
            console.print(text_of(note, style="dim"))
    else:
        tt = Table(title=f"Top {counted(r.top.height, 'prompt')} ({how})",
                   caption=text_of(_rank_note(r)) if _rank_note(r) else None, caption_justify="left",
                   box=table_box())
        # the text columns share the width left by the numbers: the prompt most, then its trigger tokens, the id;
        # pct and flag only for a calibrated run (without a calibration they are "-" on every row: width the prompt
        # needs at 80 columns, a --confirm run's extra score column beside them)
        ratios = {"prompt": 4, "trigger tokens": 3, "prompt_id": 2}
        calibrated = [("pct", "right"), ("flag", "center")] if r.calibrated else []
        for col, just in (("rank", "right"), ("risk", "right"), *([(r.confirm_column, "right")] if r.confirm_column
                                                                  else []), *calibrated,
                          ("prompt", "left"), ("trigger tokens", "left"), ("rows", "right"), ("prompt_id", "left")):
            tt.add_column(col, justify=just, overflow="fold", ratio=ratios.get(col), no_wrap=col not in ratios)
        for row in r.top.iter_rows(named=True):
            flag = [_percentile(row.get("risk_percentile")), text_of(_flag(row.get("flagged")), style="bold red")] \
                if r.calibrated else []
            tokens = Text(esc(_trigger_list(row.get("trigger_tokens"), not ascii_only)))
            tt.add_row(str(row["rank"]), f"{row['risk']:.{r.risk_decimals}f}", *_confirm_cells(r, row), *flag,
                       ltr_cell(prompt_text(row)), ltr_cell(tokens), str(row["rows"]),
                       ltr_cell(text_of(_short_id(row["prompt_id"], row.get("source")))))
        console.print(tt)

    if r.breakdowns:
        console.print(text_of(BREAKDOWN_NOTE, style="dim"))
    for i, (title, key, frame) in enumerate(r.breakdowns):
        # --by titles and columns name input columns: untrusted text. The risk columns are headed mean / p95 / max
        # under a "risk" title, so that at 80 columns (a CI log) the group's name keeps a readable width
        shown = title
        if key == "source" and frame.height and r.source_folder:  # paths under the folder common to all the run's
            # files, named once in the title (not the shown files' own: the first 50 of 1,500 files, all in hour=00/,
            # were titled 'under .../hour=00/' above '... 1450 more groups' from the other hours)
            folder = r.source_folder
            shown, frame = f"{title} under {folder}", frame.with_columns(pl.col(key).str.strip_prefix(folder))
        heading = text_of(f"{shown} (risk: mean, p95, max)")
        cols = _breakdown_columns(frame, key)
        heads = [esc(visible(col.removesuffix("_risk") if col in ("mean_risk", "p95_risk", "max_risk") else col,
                             one_line=True)) for col in cols]
        rows = [[esc(cell) for cell in cells] for cells in _breakdown_cells(frame, cols, key, r.group_decimals)]
        if not breakdown_fits(cols, heads, rows, key, console.width):  # one block a group: its label on a line of
            # its own, the numbers below it, named (a table would squeeze the label to nothing and cut the numbers)
            console.print(Text.assemble(heading, style="italic"))
            risk_cols = ("mean_risk", "p95_risk", "max_risk")
            for cells in rows:
                console.print(text_of(cells[cols.index(key)], style="bold"))
                named = [(col, f"{head} {cell}") for col, head, cell in zip(cols, heads, cells) if col != key]
                console.print(text_of("  " + "  ".join(text for col, text in named if col not in risk_cols)))
                console.print(text_of("  risk " + "  ".join(text for col, text in named if col in risk_cols)))
        else:
            # as wide as its title where the terminal allows: a long folder wrapped the title over two lines at 200
            # columns
            bt = Table(title=heading, min_width=heading.cell_len + 4, box=table_box())
            for col, head in zip(cols, heads):
                bt.add_column(Text(head), justify="left" if col == key else "right", overflow="fold",
                              ratio=1 if col == key else None, no_wrap=col != key)
            for cells in rows:
                bt.add_row(*[ltr_cell(text_of(cell)) for cell in cells])
            console.print(bt)
        if i in r.truncated_groups:
            console.print(text_of(more_groups(r, i), style="dim"))


# ---------------------------------------------------------------- Markdown

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~$#])")


def md_escape(text) -> str:
    """Escape untrusted text for a Markdown table cell: HTML-significant characters as entities,
    Markdown-significant ones with a backslash, line breaks as spaces, control characters escaped
    (:func:`visible`)."""
    s = visible(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = _MD_SPECIAL.sub(r"\\\1", s)
    return re.sub(r"[\r\n\t]+", " ", s)


def md_code(text) -> str:
    """Untrusted text as a Markdown code span: shown literally (no backslash escapes, which code spans do
    not interpret), delimited by more backticks than it contains, control characters escaped."""
    s = re.sub(r"[\r\n\t]+", " ", visible(text))
    ticks = "`" * (max((len(m) for m in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{ticks}{pad}{s}{pad}{ticks}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def edge_format(hist: pl.DataFrame, least: int) -> str:
    """The format spec of the histogram's bin edges: ``least`` significant digits (``.5g``), more where fewer would
    print two different edges alike (risks packed within 1e-4 of each other, as a random-weight model gives), so
    that no two rows of the table read as the same range. At most 17 digits (every float64 prints distinct)."""
    edges = sorted(set(hist["lo"].to_list()) | set(hist["hi"].to_list()))
    for digits in range(least, 17):
        if len({f"{e:.{digits}g}" for e in edges}) == len(edges):
            return f".{digits}g"
    return ".17g"


def render_markdown(r: Report) -> str:
    """The report as GitHub-flavoured Markdown (prompts escaped, trigger tokens in ``<b>``: Markdown's ``**``
    misparses next to the escaped punctuation prompts are full of)."""
    out = [f"# memaudit report: {md_escape(r.run_dir.name or r.run_dir)}", "", md_escape(_model_line(r)), "",
           md_escape(risk_note(r)), ""]
    out += [line for w in r.warnings for line in (f"**Warning:** {md_escape(w)}.", "")]
    out += ["## Counts", "", _md_table(["", "value"], [[md_escape(k), md_escape(v)] for k, v in _count_rows(r)]), ""]
    out += ["## Risk distribution", "", HIST_NOTE, ""]
    if r.calibrated:
        out += [f"Flag threshold: risk > {r.threshold_text} (calibrated at FPR {_fpr(r)}); bins reaching above "
                "it are marked `!`, and `flagged` counts each bin's rows above it (the bin holding the threshold "
                "has rows on both sides).", ""]
    if not r.hist.height:  # a run that scored nothing: one line, not an empty block
        out += [f"_{NO_SCORED_ROWS}_", ""]
    else:
        fmt = edge_format(r.hist, 6)
        width = max([12] + [len(f"{e:{fmt}}") for e in r.hist["lo"].to_list() + r.hist["hi"].to_list()])
        flagged_head = f" {'flagged':>8}" if r.calibrated else ""
        out += ["```text", f"{'risk from':>{width}} {'to':>{width}} {HIST_COUNTS:>8}{flagged_head}"]
        peak = int(r.hist["count"].max() or 0) if r.hist.height else 0
        marked = False
        for row in r.hist.iter_rows(named=True):
            if r.calibrated and not marked and row["above"]:
                out.append(f"{'-' * (2 * width + 3)} flag threshold {r.threshold_text}")
                marked = True
            flagged = f" {row['flagged']:>8,}" if r.calibrated else ""
            out.append(f"{row['lo']:>{width}{fmt}} {row['hi']:>{width}{fmt}} {row['count']:>8,}{flagged} "
                       f"{'!' if row['above'] else ' '} {_bar(row['count'], peak)}")
        out += ["```", ""]
    if r.skipped:
        out += [f"## Skipped files: {len(r.skipped)}", "", "Not read, so not counted.", "",
                _md_table(["path", "reason"], [[md_escape(p), md_escape(why)] for p, why in r.skipped]), ""]
    rank_note = _rank_note(r)
    # nothing scored: "Top prompts" over its one line (as the terminal says it), not "Top 0 prompts" and a note on
    # the trigger tokens of a table that is not there
    out += [f"## {top_title(r)}", "", "Trigger tokens (highest attention mass) in <b>bold</b>."
            + (f" {md_escape(rank_note)}" if rank_note else ""), ""] if r.top.height else [f"## {top_title(r)}", ""]
    def tokens(triggers) -> str:  # each token isolated, as on the page: right-to-left tokens keep their masses
        return ", ".join(f"<bdi>{md_escape(label)}</bdi> ({mass})" for label, mass in _trigger_pairs(triggers))

    rows = []
    for row in r.top.iter_rows(named=True):
        prompt = "".join(f"<b>{md_escape(s)}</b>" if hit else md_escape(s)
                         for s, hit in segments(row["prompt"], row.get("trigger_tokens")))
        rows.append([str(row["rank"]), f"{row['risk']:.{r.risk_decimals}f}", *_confirm_cells(r, row),
                     *_calibrated_cells(r, row), prompt, tokens(row.get("trigger_tokens")), str(row["rows"]),
                     md_escape(clip_text(row["prompt_id"]))])
    out += [_md_table([md_escape(h) for h in _top_header(r)], rows) if rows else f"_{NO_SCORED_ROWS}_", ""]
    for i, (title, key, frame) in enumerate(r.breakdowns):
        cols = _breakdown_columns(frame, key)
        cells = _breakdown_cells(frame, cols, key, r.group_decimals)
        out += [f"## {md_escape(title)}", "", *([md_escape(BREAKDOWN_NOTE), ""] if i == 0 else []),
                _md_table([md_escape(c) for c in cols], [[md_escape(cell) for cell in row] for row in cells]), ""]
        if i in r.truncated_groups:
            out += [md_escape(more_groups(r, i)), ""]
    return "\n".join(out)


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem;color:#1d1d1f;max-width:1200px}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #d0d0d7;padding:.25rem .5rem;vertical-align:top;text-align:left}
th{background:#f3f3f6}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td{overflow-wrap:anywhere;max-width:30rem}
td.prompt{max-width:40rem;word-break:break-word}mark{background:#ffd54f;padding:0 .1em}
td.prompt .scroll{max-height:7.5em;overflow-y:auto}td.id .scroll{max-height:7.5em;overflow-y:auto}
.flag{color:#b00020;font-weight:bold}.meta{color:#555;font-size:.9rem}img{max-width:100%;height:auto}
.warning{color:#b00020;font-weight:bold;border:2px solid #b00020;padding:.5rem .75rem;background:#fdecea}
details.bins summary{cursor:pointer;color:#555;font-size:.9rem}
@media print{body{margin:0;max-width:none}table{font-size:.75rem}th,td{padding:.15rem .25rem}
th{font-size:.65rem;font-weight:normal}
td.prompt{width:50%;max-width:none}td.prompt .scroll,td.id .scroll{max-height:none;overflow:visible}
mark,th,.warning{-webkit-print-color-adjust:exact;print-color-adjust:exact}details.bins{display:none}
tr,img{break-inside:avoid}h2,h2+p.meta{break-after:avoid}thead{display:table-header-group}}
"""
# @media print (printed, or saved as PDF, to forward): a prompt's cell, which scrolls past 7.5 lines on screen, shows
# its whole text (paper cannot scroll: the rest was cut with no mark); the trigger tokens' highlight, the warning's
# box and the header cells keep their backgrounds (browsers leave backgrounds out of print by default, so no token
# was marked on paper); a row or a plot is not split between pages, a heading not left at a page's foot, and a
# table's header repeats on each page it spans; the histogram's table, folded under its plot, is left out (the plot is
# on the sheet); the prompt column asks for half the table's width, in 9-point type (.75rem) with tighter cells: on A4
# portrait the number columns, tokens and id left it 22% of the table (a few words a line); now at least 40%, a
# --confirm run's too: a header breaks after its underscores (noise_<wbr>magnitude: :func:`breakable`; as one word it
# held its column wide and left the prompt 25% of the table), and header cells print in 7.8-point regular type on
# their grey (a header word, percentile or magnitude, is what sets a number column's width: bold at 9 points they left
# the prompt 33% beside a --confirm column, 45% now, measured in headless Chromium)
# default-src does not cover base-uri and form-action: a <base> or <form> that escaping ever let through would still
# be inert (frame-ancestors cannot be set from a <meta> policy)
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


# the plots' pixels per inch; the page shows them at PAGE_DPI (CSS pixels), so each CSS pixel holds 2 x 2 of the PNG's:
# drawn at 100, the page's size, their text and lines were soft on paper (about 115 dots per inch on an A4 sheet) and
# on a high-density screen
PLOT_DPI = 200
PAGE_DPI = 100


def _png_data_uri(fig) -> str:
    """``fig`` as a PNG data URI, drawn at :data:`PLOT_DPI` (shown at :data:`PAGE_DPI`: :func:`shown_size`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def shown_size(uri: str | None) -> tuple[int, int] | None:
    """The width and height, in CSS pixels, at which the page shows the PNG of ``uri`` (:func:`_png_data_uri`): its
    pixels (from the PNG's IHDR header) x PAGE_DPI / PLOT_DPI, rounded, at least 1; None for anything that is not a
    PNG data URI (the page then shows the image at its own size)."""
    if not uri or not uri.startswith("data:image/png;base64,"):
        return None
    try:
        head = base64.b64decode(uri.split(",", 1)[1][:44])  # 33 bytes: signature and the IHDR chunk's size fields
    except ValueError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return max(1, round(width * PAGE_DPI / PLOT_DPI)), max(1, round(height * PAGE_DPI / PLOT_DPI))


def _figure_class():
    """matplotlib's ``Figure``, imported with matplotlib's own log notes held back: with a read-only or missing
    home folder (a container's, a service user's) its import wrote "mkdir -p failed for path ~/.config/matplotlib"
    and "Matplotlib created a temporary cache directory at /tmp/matplotlib-... it is highly recommended to set the
    MPLCONFIGDIR environment variable ..." to stderr on every `memaudit report --format html`: noise in a nightly
    job's log, about a cache the page does not need. Errors still show. A home folder that does not exist (a
    service user's ``HOME=/nonexistent``, a container's unset home) is not made: matplotlib created it, with
    ``.cache/matplotlib/`` and ``.config/matplotlib/`` in it, wherever the user may (root); its font cache then
    goes to a temporary folder removed at exit, as matplotlib does itself for a read-only home."""
    import logging
    import sys

    log = logging.getLogger("matplotlib")
    level = log.level
    log.setLevel(logging.ERROR)
    before = os.environ.get("MPLCONFIGDIR")
    homeless = "matplotlib" not in sys.modules and not before and not os.path.isdir(os.path.expanduser("~"))
    if homeless:
        import atexit
        import shutil
        import tempfile

        temporary = tempfile.mkdtemp(prefix="memaudit-matplotlib-")
        atexit.register(shutil.rmtree, temporary, ignore_errors=True)
        os.environ["MPLCONFIGDIR"] = temporary  # read once, at matplotlib's import
    try:
        from matplotlib.figure import Figure
    finally:
        log.setLevel(level)
        if homeless:  # the user's environment as it was
            if before is None:
                os.environ.pop("MPLCONFIGDIR")
            else:
                os.environ["MPLCONFIGDIR"] = before
    return Figure


# what stands in place of a plot or table that would be empty: a run that scored nothing (its warning says so too)
NO_SCORED_ROWS = "no scored rows"


# the plots' bar colours, the same in the histogram and the date plot: rows, flagged rows. Each has at least 3:1
# contrast against the white page (WCAG 2.1 1.4.11, non-text contrast: #1e88e5 3.7:1, #c62828 5.6:1); the date
# plot's rows were #90caf9, 1.75:1
ROWS_COLOUR = "#1e88e5"
FLAGGED_COLOUR = "#c62828"
# the date plot's lines over those bars: the max risk, the mean risk. The mean line was #777, 1.2:1 against either bar
# colour it crosses and 2.8:1 against the max line beside it. Each line now has a white halo (LINE_HALO points wide
# each side), so where it crosses a bar its adjacent colour is white; against white and each other each line has at
# least 3:1 (WCAG 2.1 1.4.11; contrast ratio (L1 + 0.05) / (L2 + 0.05) of relative luminances, WCAG 2.1's definition):
# #333 12.6:1 on white, #e66100 3.46:1 on white and 3.65:1 against #333
MAX_COLOUR = "#333333"
MEAN_COLOUR = "#e66100"
LINE_HALO = 1.5


def plot_histogram(r: Report) -> str:
    """The risk histogram (threshold marked) as a PNG data URI (matplotlib, no display needed)."""
    return _png_data_uri(histogram_figure(r))


def histogram_figure(r: Report):
    """The matplotlib figure of :func:`plot_histogram`: bars of rows per risk bin, the threshold marked."""
    Figure = _figure_class()

    fig = Figure(figsize=(8, 3))
    ax = fig.subplots()
    if r.hist.height:  # each bar: its unflagged rows in blue, its flagged rows (risk > threshold) in red on top, so
        # the red adds up to the flagged count (a bin straddling the threshold holds both)
        lo, widths = r.hist["lo"].to_list(), (r.hist["hi"] - r.hist["lo"]).to_list()
        count, flagged = r.hist["count"].to_list(), r.hist["flagged"].to_list()
        plain = [c - f for c, f in zip(count, flagged)]
        ax.bar(lo, plain, width=widths, align="edge", color=ROWS_COLOUR, edgecolor="white", linewidth=0.5)
        if r.calibrated:
            ax.bar(lo, flagged, width=widths, bottom=plain, align="edge", color=FLAGGED_COLOUR, edgecolor="white",
                   linewidth=0.5, label=f"flagged rows ({sum(flagged):,})")
        # headroom over the tallest bar: the flagged bars, stacked on the unflagged ones, pin the axis's top to the
        # tallest bar's height (matplotlib does not pad past a bar's base), which drew it flush with the frame
        ax.set_ylim(0, max(count) * 1.05 or 1)
    if r.calibrated:
        ax.axvline(r.threshold, color="#b00020", linestyle="--", linewidth=1.5,
                   label=f"flag threshold {r.threshold_text} (FPR {_fpr(r)})")
        # above the plot, not over it: inside, at the upper left, it covered the tallest bars of low-risk bins
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1.01), ncols=2, fontsize=8, frameon=False)
    ax.set_xlabel(risk_axis(r))
    ax.set_ylabel(HIST_COUNTS)
    ax.ticklabel_format(axis="x", useOffset=False)
    return fig


# the date plot labels at most this many dates (every k-th, from the first): 50 dates (a breakdown's most) at 45
# degrees in the plot's 8 inches overlapped one another into an unreadable band
MAX_DATE_LABELS = 25


def plot_dates(frame: pl.DataFrame, calibrated: bool, risk_label: str = "risk") -> str:
    """Rows (bars) and max/mean risk (lines) per date partition as a PNG data URI (:func:`dates_figure`)."""
    return _png_data_uri(dates_figure(frame, calibrated, risk_label))


def dates_figure(frame: pl.DataFrame, calibrated: bool, risk_label: str = "risk"):
    """The matplotlib figure of :func:`plot_dates`: one bar a date partition of ``frame`` (a date breakdown: ``date``,
    ``rows``, ``flagged``, ``mean_risk``, ``max_risk``; dates without a value left out), its flagged rows in a
    calibrated run, else its scored rows, and the max and mean risk as lines on a second axis (:data:`MAX_COLOUR`,
    :data:`MEAN_COLOUR`, each in a white halo so that it keeps 3:1 contrast where it crosses a bar). Every date has its
    tick; with more than :data:`MAX_DATE_LABELS` dates only every k-th is labelled (k = ceil(n / MAX_DATE_LABELS),
    the first date always), so that the labels do not overlap."""
    Figure = _figure_class()

    frame = frame.filter(pl.col("date").is_not_null())
    fig = Figure(figsize=(8, 3))
    ax = fig.subplots()
    x = list(range(frame.height))
    ax.bar(x, frame["flagged" if calibrated else "rows"].to_list(), color=FLAGGED_COLOUR if calibrated else ROWS_COLOUR)
    ax.set_ylabel("flagged rows" if calibrated else "scored rows")
    step = -(-frame.height // MAX_DATE_LABELS)
    ax.set_xticks(x, [d if i % step == 0 else "" for i, d in enumerate(frame["date"].to_list())], rotation=45,
                  ha="right", fontsize=8)
    ax2 = ax.twinx()
    from matplotlib import patheffects

    for column, style, colour, label in (("max_risk", "o-", MAX_COLOUR, "max risk"),
                                         ("mean_risk", "s--", MEAN_COLOUR, "mean risk")):
        line, = ax2.plot(x, frame[column].to_list(), style, color=colour, label=label)
        # a white halo: a line over a bar had the bar's colour beside it (the mean's #777 1.2:1 on the bars)
        line.set_path_effects([patheffects.withStroke(linewidth=line.get_linewidth() + 2 * LINE_HALO,
                                                      foreground="white"), patheffects.Normal()])
    ax2.set_ylabel(risk_label)
    ax2.ticklabel_format(axis="y", useOffset=False)
    ax2.legend(loc="lower left", bbox_to_anchor=(0, 1.01), ncols=2, fontsize=8, frameon=False)  # above the plot
    return fig


# what a spreadsheet reads as the start of a formula in a cell's text (OWASP's CSV injection list; tab and carriage
# return never start a cell here: visible() writes them as \t and \x0d)
FORMULA_START = ("=", "+", "-", "@")
# put before such a cell's text on the page: hidden in a browser (and left out of what it copies), read by a
# spreadsheet's HTML import (LibreOffice Calc, Excel), where a leading apostrophe makes the cell text, not a formula
FORMULA_GUARD = "<span hidden>'</span>"


def spreadsheet_formula(value) -> bool:
    """Whether ``value`` is text that a spreadsheet opening the page would run as a formula (``=HYPERLINK(...)``,
    ``+1+2``, ``@SUM(...)``): LibreOffice Calc, opening report.html, made a prompt ``=1+1`` the number 2 and
    ``=HYPERLINK("http://...","click")`` a live link. A lone ``-`` or ``+`` (a group label, a missing number) is
    text to a spreadsheet."""
    return isinstance(value, str) and value[:1] in FORMULA_START and value not in ("-", "+")


def breakable(name) -> str:
    """A column name for a table header on the page: shown and escaped as every value is (:func:`visible`, then
    :func:`html.escape`), with a ``<wbr>`` (a line break opportunity, no character) after each underscore, so that a
    long name such as ``noise_magnitude`` or ``summary_entropy_change`` can wrap in a narrow column: as one unbreakable
    word it held a --confirm run's score column as wide as the word, and on an A4 sheet the prompt column got 25% of
    the top table (183 of 718 pixels). Copied text and the header's ``textContent`` are unchanged. Returns a
    ``markupsafe.Markup`` (a ``str`` the template does not escape again)."""
    from markupsafe import Markup

    return Markup(html.escape(visible(name)).replace("_", "_<wbr>"))


def _html_environment():
    """Jinja2 environment for ``templates/*.j2``: autoescape on, and every value first shown with
    :func:`visible` (control characters, bidi overrides as escapes) and escaped with :func:`html.escape`
    (so quotes become ``&#x27;``/``&quot;`` as before); values the template builds itself stay markup."""
    import jinja2
    from markupsafe import Markup

    def finalize(value):
        if isinstance(value, Markup) or isinstance(value, (dict, list, tuple, range)):
            return value
        return Markup(html.escape(visible(value)))

    env = jinja2.Environment(loader=jinja2.PackageLoader("audit", "templates"), autoescape=True,
                             finalize=finalize, trim_blocks=False, lstrip_blocks=False)
    env.tests["formula"] = spreadsheet_formula
    env.filters["breakable"] = breakable
    env.globals["formula_guard"] = Markup(FORMULA_GUARD)
    return env


def _unique_id(name: str, taken: set[str]) -> str:
    """An HTML id from ``name`` (an input column's name: untrusted, anything but letters, digits, ``-`` and ``_``
    as ``-``), made unique among ``taken`` with a ``-2``, ``-3``... suffix; added to ``taken``."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "table"
    out, n = base, 1
    while out in taken:
        n += 1
        out = f"{base}-{n}"
    taken.add(out)
    return out


def render_html(r: Report) -> str:
    """A self-contained HTML page from ``templates/report.html.j2``: inline CSS, plots as data URIs, no
    scripts, every value escaped (autoescape, after :func:`visible`). Each top-table cell that may scroll (a prompt, a
    prompt id) is a keyboard-reachable region named ``prompt ranked N`` / ``prompt_id ranked N``."""
    from markupsafe import Markup

    top = []
    for row in r.top.iter_rows(named=True):
        # each cell that scrolls is named for the keyboard and a screen reader (the template's scroll regions)
        prompt = {"segments": segments(row["prompt"], row.get("trigger_tokens"), max_chars=PAGE_PROMPT_CHARS),
                  "label": f"prompt ranked {row['rank']}"}
        # each token isolated (<bdi>): right-to-left tokens (Arabic, Hebrew) otherwise reorder the list around them,
        # so that a token was drawn beside another token's mass
        tokens = {"tokens": _trigger_pairs(row.get("trigger_tokens"))}
        top.append([str(row["rank"]), f"{row['risk']:.{r.risk_decimals}f}", *_confirm_cells(r, row),
                    *_calibrated_cells(r, row), prompt, tokens, str(row["rows"]),
                    {"segments": [(clip_text(row["prompt_id"], PAGE_PROMPT_CHARS), False)],
                     "label": f"prompt_id ranked {row['rank']}"}])
    header = _top_header(r)
    numeric = [i for i, h in enumerate(header) if h in ("rank", "risk", "percentile", "rows", r.confirm_column)]
    # the prompt and its id scroll past 7.5 lines (an --id-column id of 2,000 characters made its row 70 lines tall)
    classes = {header.index(h): cls for h, cls in (("flagged", "flag"), ("prompt", "prompt"), ("prompt_id", "id"))
               if h in header}
    hist_header, hist_rows = histogram_cells(r)
    breakdowns, ids = [], {"counts", "histogram", "histogram-bins", "skipped", "top"}
    for i, (title, key, frame) in enumerate(r.breakdowns):
        cols = _breakdown_columns(frame, key)
        dates = plot_dates(frame, r.calibrated, risk_axis(r)) if key == "date" and r.hist.height and \
            frame.filter(pl.col("date").is_not_null()).height > 1 else None
        # ids unique in the page: `--by date` on a run with date partitions, or `--by source`, breaks down a second
        # column of the same name
        table_id = _unique_id("by-" + key, ids)
        breakdowns.append({"title": title, "key": key, "columns": cols, "id": table_id,
                           "dates": dates, "dates_id": _unique_id("dates", ids) if dates else None,
                           "dates_size": shown_size(dates),
                           "rows": _breakdown_cells(frame, cols, key, r.group_decimals),
                           "truncated": more_groups(r, i) if i in r.truncated_groups else None})
    histogram = plot_histogram(r) if r.hist.height else None  # nothing scored: a line, not empty axes
    return _html_environment().get_template("report.html.j2").render(
        csp=Markup(_CSP), css=Markup(_CSS), run_name=r.run_dir.name or str(r.run_dir), run_dir=str(r.run_dir),
        model_line=_model_line(r), risk_note=risk_note(r), breakdown_note=BREAKDOWN_NOTE,
        generated=generated_at(),
        counts=[[k, v] for k, v in _count_rows(r)], histogram=histogram,
        histogram_size=shown_size(histogram) if histogram else None, top=top,
        top_title=top_title(r), breakdowns=breakdowns,
        top_header=header, top_numeric=numeric, top_classes=classes, skipped=r.skipped, rank_note=_rank_note(r),
        warnings=r.warnings, hist_note=HIST_NOTE, hist_header=hist_header, hist_rows=hist_rows,
        hist_alt=f"risk histogram: {HIST_COUNTS} per risk bin", no_scored_rows=NO_SCORED_ROWS)


def histogram_cells(r: Report) -> tuple[list[str], list[list[str]]]:
    """The histogram's bins as the page's table under its plot (header, then one row a bin): ``risk from``, ``to``
    (edges printed as report.md prints them, :func:`edge_format`), ``rows`` and, in a calibrated run, ``flagged`` (the
    bin's rows above the threshold), counts with thousands separators. The plot is a PNG: its alt text cannot carry
    30 bins, so a screen reader, or a reader who needs the exact counts, had no figure of the distribution but in
    report.md or report.json. No rows (nothing scored): no bins."""
    header = ["risk from", "to", HIST_COUNTS, *(["flagged"] if r.calibrated else [])]
    if not r.hist.height:
        return header, []
    fmt = edge_format(r.hist, 6)
    return header, [[f"{row['lo']:{fmt}}", f"{row['hi']:{fmt}}", f"{row['count']:,}",
                     *([f"{row['flagged']:,}"] if r.calibrated else [])] for row in r.hist.iter_rows(named=True)]


def generated_at() -> str:
    """The page's "generated" time (UTC, to the second): now, or the time ``SOURCE_DATE_EPOCH`` gives (whole seconds
    since 1970-01-01 UTC, the reproducible-builds convention, https://reproducible-builds.org/specs/source-date-epoch/),
    so that the page of one run rendered twice is the same file, byte for byte, as ``report.md`` and ``report.json``
    are (they hold no time): the only part of the page that changed between two renderings.

    Raises:
        ReportError: ``SOURCE_DATE_EPOCH`` is set but is not a whole number of seconds (the convention asks a tool to
            fail rather than guess).
    """
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    digits = value.strip()
    when = None
    if digits.isascii() and digits.isdigit():
        try:
            when = dt.datetime.fromtimestamp(int(digits), dt.timezone.utc)
        except (OverflowError, OSError, ValueError):  # past year 9999
            when = None
    if when is None:
        raise ReportError(f"SOURCE_DATE_EPOCH '{visible(value, one_line=True)}' is not a whole number of seconds "
                          "since 1970-01-01 UTC (before the year 10000): unset it, or set it to one (e.g. "
                          "$(git log -1 --format=%ct)) for the page's \"generated\" time")
    return when.isoformat(timespec="seconds")


# ---------------------------------------------------------------- JSON (the report's figures as data)

REPORT_KIND = "memaudit.report"  # report.json's "kind" (an existing JSON file of another kind is not overwritten)
REPORT_JSON_VERSION = 1
JSON_GROUP_SLICE = 1024  # breakdown groups encoded together in report.json (only their texts are held)


def render_json(r: Report) -> str:
    """The report's figures as JSON, for an analyst's pandas, polars or DuckDB: the counts, the histogram (each
    bin's rows and flagged rows), the top prompts with their exact text, id, source and trigger tokens (as
    risk.parquet holds them: nothing escaped or cut), and every group of every breakdown (build the report with
    ``all_groups=True``: the page and Markdown show 50). Numbers are as computed, not rounded; a missing one is
    null. Strict JSON (no NaN), UTF-8. The text :func:`iter_json` writes in pieces."""
    return "".join(iter_json(r))


def iter_json(r: Report):
    """:func:`render_json`'s text in pieces (``json.dumps(doc, ensure_ascii=False, indent=1, allow_nan=False)`` and a
    line end, the same characters), each breakdown group encoded as it is written: ``report --format json --by``
    a column of 900,000 values (a user id, the prompt) held every group as a Python dict, then the whole text, then
    its UTF-8 bytes: 2.3 GB at its peak for a 248 MB file (1,000,000 rows), where the page of the same run took
    0.6 GB. Now the groups are read from the breakdown's frame one at a time and only the pieces are held.

    Raises:
        ValueError: a number that is not finite (a memaudit run writes none).
    """
    def group_rows(frame: pl.DataFrame, key: str):
        cols = _breakdown_columns(frame, key)
        if "flagged" not in cols:  # not calibrated: null, as counts.flagged and the histogram bins (0 read "none")
            cols.insert(cols.index("max_risk") + 1, "flagged")
        return ({"group": row[key], **{c: row.get(c) for c in cols[1:]}} for row in frame.iter_rows(named=True))

    def group_texts(frame: pl.DataFrame, key: str, depth: int):
        """Each group's text as ``at(group, depth)`` writes it (the same characters), a slice of
        :data:`JSON_GROUP_SLICE` groups at a time: each column's values encoded at once (json's own string encoder,
        ``float.__repr__`` and ``int.__repr__``, as json.dumps uses them), not one dict and one pure-Python indented
        encode per group (`--by prompt` on 1,000,000 rows, 900,000 groups: 33 to 43 s, now 13 to 19 s). A column of
        another type, or a number that is not finite (json.dumps' ValueError), goes the per-group way."""
        cols = _breakdown_columns(frame, key)
        if "flagged" not in cols:
            cols.insert(cols.index("max_risk") + 1, "flagged")
        names = ["group", *cols[1:]]
        plain = all(t in (pl.String, pl.Null) or t.is_integer() or t.is_float()
                    for t in (frame.schema[c] for c in cols if c in frame.columns))
        if not plain or any(frame.schema[c].is_float() and (frame[c].is_nan().any() or frame[c].is_infinite().any())
                            for c in cols if c in frame.columns):
            yield from (at(group, depth) for group in group_rows(frame, key))
            return
        inner = "\n" + " " * (depth + 1)
        template = "{" + ",".join(f"{inner}{quote(n).replace('%', '%%')}: %s" for n in names) + "\n" + " " * depth + "}"

        def texts(part: pl.DataFrame, c: str) -> list[str]:
            if c not in part.columns:
                return ["null"] * part.height
            dtype, values = part.schema[c], part[c].to_list()
            if dtype == pl.String:
                return [quote(v) if v is not None else "null" for v in values]
            number = float.__repr__ if dtype.is_float() else int.__repr__
            return [number(v) if v is not None else "null" for v in values]

        for start in range(0, frame.height, JSON_GROUP_SLICE):
            part = frame.slice(start, JSON_GROUP_SLICE)
            yield from (template % row for row in zip(*(texts(part, c) for c in cols)))

    top_cols = ["rank", "risk", *([r.confirm_column] if r.confirm_column else []), "risk_percentile", "flagged",
                "rows", "prompt", "prompt_id", "source", "trigger_tokens"]
    top = [{c: row.get(c) for c in top_cols} for row in r.top.iter_rows(named=True)]
    m = r.manifest
    head = {
        "kind": REPORT_KIND, "version": REPORT_JSON_VERSION, "run_dir": str(r.run_dir),
        "model": m.get("model"), "score_config": m.get("score_config"), "confirm": r.confirm,
        "memaudit_version": m.get("memaudit_version"), "memaudit_build": m.get("memaudit_build"),
        # the build that started the folder, whose scores a rerun by another build keeps (the header names both)
        "memaudit_started_build": _started_build(r.run_dir),
        "risk": risk_note(r), "breakdown_note": BREAKDOWN_NOTE,
        "calibration": {"threshold": r.threshold, "fpr": r.fpr, "fail_on_flagged": r.fail_on_flagged}
        if r.calibrated else None,
        "counts": r.counts, "skipped_files": [{"path": p, "reason": why} for p, why in r.skipped],
        # a bin's flagged rows are null in a run without a calibration, as counts.flagged: 0 read as 'none flagged'
        "histogram": [{"lo": row["lo"], "hi": row["hi"], "rows": row["count"],
                       "flagged": row["flagged"] if r.calibrated else None} for row in r.hist.iter_rows(named=True)],
        "top": top,
    }
    encoder = json.JSONEncoder(ensure_ascii=False, indent=1, allow_nan=False)
    quote = json.encoder.encode_basestring  # the string encoder of that encoder (ensure_ascii=False)

    def at(value, depth: int) -> str:  # value's text where it starts at nesting depth (indent 1: one space a level)
        return encoder.encode(value).replace("\n", "\n" + " " * depth)  # JSON text holds no raw line break

    # the object's keys in render order: what json.dumps(indent=1) writes, with "breakdowns" and "warnings" after
    # "top" (the object ends "\n}")
    yield encoder.encode(head)[:-2]
    yield ',\n "breakdowns": '
    if not r.breakdowns:
        yield "[]"
    for i, (title, key, frame) in enumerate(r.breakdowns):
        yield (("[\n  {" if i == 0 else ",\n  {")
               + f'\n   "title": {at(title, 3)},\n   "key": {at(key, 3)},\n   "groups": ')
        first = True
        for text in group_texts(frame, key, 4):
            yield ("[\n    " if first else ",\n    ") + text
            first = False
        yield "[]" if first else "\n   ]"
        yield f',\n   "groups_left_out": {at(r.truncated_groups.get(i, 0), 3)}\n  }}'
    if r.breakdowns:
        yield "\n ]"
    yield f',\n "warnings": {at(r.warnings, 1)}\n}}\n'


def write_report(run_dir: str | Path, fmt: str = "terminal", top: int = 20, by=(), bins: int = 30,
                 output: str | Path | None = None, console=None) -> Path | None:
    """Build the report of ``run_dir`` and print it (``terminal``) or write ``report.md``/``report.html``/
    ``report.json`` (default: in the run folder; JSON keeps every group of each breakdown). Returns the written
    path, or None for the terminal.

    Raises:
        ReportError: an unknown ``fmt``, or ``run_dir`` is not a finished run whose tables match its
            manifest (:func:`build_report`).
    """
    if fmt not in FORMATS:
        raise ReportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    return emit_report(build_report(run_dir, top=top, by=tuple(by), bins=bins, all_groups=fmt == "json"), fmt,
                       output, console)


def report_text(r: Report, fmt: str) -> str:
    """A built report as the text of ``report.md``, ``report.html`` or ``report.json`` (``fmt`` md, html, json).

    Raises:
        ReportError: ``fmt`` is not one of those three.
    """
    render = {"md": render_markdown, "json": render_json, "html": render_html}.get(fmt)
    if render is None:
        raise ReportError(f"--format {fmt}: a report's text is md, html or json")
    return render(r)


def emit_report(r: Report, fmt: str, output: str | Path | None = None, console=None) -> Path | None:
    """Print a built report (``terminal``) or write it as ``report.md``/``report.html``/``report.json`` (default: in
    its run folder); the second half of :func:`write_report`. Returns the written path, or None for the terminal.

    Raises:
        ReportError: ``fmt`` is not one of :data:`FORMATS` (anything but terminal and md was written as HTML).
        audit.errors.RunError: ``output`` is a folder or its folder does not exist.
    """
    if fmt not in FORMATS:
        raise ReportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    run_dir = r.run_dir
    if fmt == "terminal":
        render_terminal(r, console)
        return None
    from audit.tables import atomic_path

    path = Path(output) if output else Path(run_dir) / f"report.{fmt}"
    with atomic_path(path, sweep=True) as tmp:
        if fmt == "json":  # every group of every breakdown: written as it is encoded (iter_json)
            with tmp.open("w", encoding="utf-8") as f:
                f.writelines(iter_json(r))
        else:
            tmp.write_text(report_text(r, fmt), encoding="utf-8")
    return path
