"""The exit-4 gates: whether a finished run's counts make it a failed audit (too many rows not scored, or not read
as prompts, or none scored, or a ``--fail-on-flagged`` gate over no rows), judged while a run finishes
(:func:`run_failure`: the CLI's exit 4, the API's ScoringFailedError) and afterwards from its manifest
(:func:`recorded_failures`: report, diff and calibrate).

Owns the reasons that count as failures (:data:`SCORING_FAILURES`, :data:`INPUT_FAILURES`). Must not import the
driver, the pipeline, the unit or the calibration modules: calibrate reads it, and they import calibrate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from audit.text import fraction_text, share, visible

SCORING_FAILURES = ("scoring_error", "out_of_memory", "nonfinite_attention")  # rows the model failed, not the input


class Limits(Protocol):
    """What the gates read of a run's options: an :class:`audit.config.RunConfig`, or the options a manifest
    recorded (:func:`recorded_failures`)."""

    max_error_fraction: float
    fail_on_flagged: int | None


def over_limit(n: int, of: int, fraction: float) -> bool:
    """Whether ``n`` of ``of`` rows is more than ``fraction`` of them, the fraction read as the decimal it prints as:
    29 of 100 rows is not more than --max-error-fraction 0.29, though 0.29 * 100 is 28.999999999999996 in binary
    (the run failed, exit 4, with '29 of 100 rows (29.0%) ... more than --max-error-fraction 0.29')."""
    from fractions import Fraction

    return n > Fraction(repr(float(fraction))) * of


def error_gate(cfg: Limits, out: Path, manifest: dict,
               reasons: tuple[str, ...] | list[str] = SCORING_FAILURES) -> str | None:
    """The failure message when more than ``--max-error-fraction`` of the rows that reached the scorer could not
    be scored (``reasons``: :data:`SCORING_FAILURES`, or those a manifest records), else None. A model that cannot
    score must not look like a clean audit."""
    c = manifest["counts"]
    failed = {r: n for r, n in c["rejected_by_reason"].items() if r in reasons}
    tried = c["scored"] + sum(failed.values())
    if not tried or not over_limit(sum(failed.values()), tried, cfg.max_error_fraction):
        return None
    first = ""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        rej = pq.read_table(out / "rejects.parquet", columns=["reason", "detail"])
        rej = rej.filter(pc.is_in(rej.column("reason"), pa.array(list(reasons), pa.string())))
        if rej.num_rows:
            detail = rej.column("detail")[0].as_py()  # null where a reason has none: no ": ." after it
            first = f"; the first: {rej.column('reason')[0]}" + (f": {detail}" if detail else "")
    except Exception:  # the message is only a hint; the counts are what the gate is about
        pass
    n = sum(failed.values())
    return (f"{n} of {tried} rows ({share(n, tried, cfg.max_error_fraction)}) could not be scored "
            f"({', '.join(f'{r} {k}' for r, k in failed.items())}), more than --max-error-fraction "
            f"{fraction_text(cfg.max_error_fraction)}{first}. The outputs in {out} hold what was scored.")


# rows that exist but could not be read as prompts, without the user having chosen to go on past them (unreadable
# rows, like skipped files, exist only under --skip-bad-files: they are warned about, not gated)
# rows of a file without the prompt or id column; rows whose text could not be decoded or parsed (a caption CSV in
# Latin-1 lost half its rows as invalid_utf8 with exit 0, a release gate passing on an audit of half its input); rows
# whose prompt is not text (a Parquet prompt column of integers or lists: a whole file unaudited, exit 0)
INPUT_FAILURES = ("missing_prompt_column", "missing_id_column", "invalid_utf8", "invalid_csv_row", "invalid_json",
                  "prompt_not_string")
# what to check for each, in the exit-4 message
_INPUT_HINTS = {"missing_prompt_column": "a file with another prompt column? --prompt-column",
                "missing_id_column": "a file without the --id-column?",
                "invalid_utf8": "a file in another encoding than UTF-8? convert it, e.g. iconv -f latin1 -t utf-8; "
                                "or JSON escapes of half an emoji (\\ud83d), named in rejects.parquet's detail",
                "invalid_csv_row": "a CSV whose prompts hold unquoted commas? quote them",
                "invalid_json": "lines that are not JSON objects? rejects.parquet's detail says why",
                "prompt_not_string": "a prompt column of numbers or lists? rejects.parquet's detail names the type; "
                                     "give the text column with --prompt-column"}


def coverage_gate(cfg: Limits, manifest: dict,
                  reasons: tuple[str, ...] | list[str] = INPUT_FAILURES) -> str | None:
    """The failure message when more than ``--max-error-fraction`` of the rows read could not be read as prompts
    (``reasons``, :data:`INPUT_FAILURES` unless a manifest records others: rows of a file without the prompt column, or without the ``--id-column``, and rows
    whose text could not be decoded or parsed: invalid UTF-8, a ragged CSV record, a line that is not a JSON object),
    else None.
    An audit that covered only part of its input must not exit like a complete one (a caption shard whose column was renamed left 500 of 520
    rows unaudited, exit 0). Rejected prompts (null, empty) are not failures: they are rows that hold no prompt to
    audit. Files skipped whole and rows of damaged pages (``unreadable_rows``) are not counted: both exist only
    under ``--skip-bad-files``, the user's choice to go on past them, and each run warns about them."""
    c = manifest["counts"]
    lost = {r: n for r, n in c["rejected_by_reason"].items() if r in reasons}
    n = sum(lost.values())
    if not c["rows_read"] or not n or not over_limit(n, c["rows_read"], cfg.max_error_fraction) or not c["scored"]:
        return None  # (none scored: nothing_scored says so)
    hints = "; ".join(_INPUT_HINTS.get(r, "rejects.parquet's detail says why") for r in lost)
    return (f"{n} of {c['rows_read']} rows read ({share(n, c['rows_read'], cfg.max_error_fraction)}) could not be "
            f"read as prompts ({', '.join(f'{r} {k}' for r, k in lost.items())}), more than --max-error-fraction "
            f"{fraction_text(cfg.max_error_fraction)}: the audit covers only part of its input ({hints}; "
            "rejects.parquet names each row's file)")


def run_failure(cfg: Limits, out: Path, manifest: dict, nothing_scored_ok: bool = False) -> str | None:
    """Why a finished run failed, for the CLI's exit 4 and the API's ScoringFailedError, else None: too many rows
    could not be scored (:func:`error_gate`), none was scored (:func:`nothing_scored`, left out with
    ``nothing_scored_ok``), too many rows could not be read as prompts (:func:`coverage_gate`), or a
    ``--fail-on-flagged`` gate had no row to judge (:func:`empty_gate`)."""
    return (error_gate(cfg, out, manifest) or (None if nothing_scored_ok else nothing_scored(manifest))
            or coverage_gate(cfg, manifest) or empty_gate(cfg, manifest))


def empty_gate(cfg: Limits, manifest: dict) -> str | None:
    """The failure message when a run gated by ``--fail-on-flagged`` read no row at all (an empty or zero-byte input,
    ``--limit 0``), else None. Without a gate such a run only warns (a day of logs without rows); with one, "0 rows
    flagged" over no prompts passed a release gate with exit 0 when the screening set failed to upload."""
    c = manifest["counts"]
    if cfg.fail_on_flagged is None or c["rows_read"]:
        return None
    if getattr(cfg, "limit", None) == 0:  # the inputs may hold rows: "the inputs hold no rows" sent the user to them
        return (f"nothing was scored: --limit 0 reads no row, so --fail-on-flagged {cfg.fail_on_flagged} has no prompt "
                "to judge; a gate over no prompts does not pass")
    return (f"nothing was scored: the inputs hold no rows, so --fail-on-flagged {cfg.fail_on_flagged} has no prompt to "
            "judge (an empty screening set, or a file that failed to upload?); a gate over no prompts does not pass")


# what a manifest made before the manifest recorded its gated reasons (gated_reasons) was judged by: a manifest that
# records the build that made it (memaudit_build) was made by a memaudit that gated these (prompt_not_string joined
# the gate later, and those manifests record it); one without was made before the undecodable and unparsable rows
# joined the coverage gate
_BUILD_INPUT_FAILURES = ("missing_prompt_column", "missing_id_column", "invalid_utf8", "invalid_csv_row",
                         "invalid_json")
_EARLIER_INPUT_FAILURES = ("missing_prompt_column", "missing_id_column")


def gated_reasons() -> dict[str, list[str]]:
    """The reject reasons that count as failures, as a manifest records them (``gated_reasons``): ``{"scoring":
    SCORING_FAILURES, "input": INPUT_FAILURES}``, so that a run is judged afterwards by the reasons it ran under."""
    return {"scoring": list(SCORING_FAILURES), "input": list(INPUT_FAILURES)}


def recorded_reasons(manifest: dict) -> tuple[list[str], list[str]]:
    """The (scoring, input) reasons a finished run was gated by: its manifest's ``gated_reasons``; for a manifest
    written before they were recorded, those of the memaudit that wrote it (where it records its build, the
    undecodable and unparsable rows and the files without the prompt or id column, else only the latter). A run
    must not change verdict with an upgrade: a folder that exited 0 with 2% of its rows invalid_utf8, before such rows
    were gated, was reported as "failed (exit 4)" afterwards."""
    recorded = manifest.get("gated_reasons")
    if isinstance(recorded, dict) and all(isinstance(recorded.get(k), list) for k in ("scoring", "input")):
        return [str(r) for r in recorded["scoring"]], [str(r) for r in recorded["input"]]
    return list(SCORING_FAILURES), list(_BUILD_INPUT_FAILURES if manifest.get("memaudit_build")
                                        else _EARLIER_INPUT_FAILURES)


def recorded_failures(run_dir: str | Path, manifest: dict) -> list[str]:
    """The exit-4 reasons of a finished run as its manifest records it (:func:`error_gate`, :func:`coverage_gate`),
    under the ``--max-error-fraction`` the run last ran with (0.01 where the manifest records none) and the reasons
    it was gated by (:func:`recorded_reasons`), for the commands
    that read a run afterwards: the report warns of them, the diff warns of them, and a calibration refuses such a
    reference. Empty for a run that passed them, for one that scored nothing (:func:`nothing_scored` says that) and
    for a manifest without ``counts.rejected_by_reason`` (one made by hand)."""
    from types import SimpleNamespace

    counts = manifest.get("counts") or {}
    if not isinstance(counts.get("rejected_by_reason"), dict) or not counts.get("scored"):
        return []
    fraction = (manifest.get("run_config") or {}).get("max_error_fraction")
    limits = SimpleNamespace(max_error_fraction=fraction if isinstance(fraction, (int, float))
                             and not isinstance(fraction, bool) else 0.01)
    scoring, inputs = recorded_reasons(manifest)
    found = (error_gate(limits, Path(run_dir), manifest, scoring), coverage_gate(limits, manifest, inputs))
    return [why.rstrip(".") for why in found if why]


def nothing_scored(manifest: dict) -> str | None:
    """The failure message when rows were read and none was scored (every one rejected), or when nothing was read
    because every input file that holds rows was skipped as unreadable (``--skip-bad-files``), else None: such a
    run must not look like a clean audit. A run over inputs with no rows at all is not refused (it only warns)."""
    c = manifest["counts"]
    if c["scored"] > 0:
        return None
    if c["rows_read"] == 0:
        bad = [s for s in manifest.get("skipped_files", []) if s.get("unreadable")]
        if not bad:
            return None
        return (f"nothing was scored: every input file with rows was skipped as unreadable ({len(bad)} under "
                f"--skip-bad-files; manifest.json skipped_files says why for each), the first: "
                f"{visible(bad[0]['reason'], one_line=True)}")
    reasons = ", ".join(f"{r} {n}" for r, n in c["rejected_by_reason"].items())
    column_like = ("missing_prompt_column", "prompt_not_string", "null_prompt", "empty_prompt")
    tables = any(f.get("format") != "txt" for f in manifest.get("files", []) if f.get("rows"))  # .txt: no columns
    hint = " (a wrong --prompt-column?)" if tables and any(r in c["rejected_by_reason"] for r in column_like) else ""
    which = "the 1 row read was" if c["rows_read"] == 1 else f"all {c['rows_read']} rows read were"
    return f"nothing was scored: {which} rejected ({reasons}); rejects.parquet says why for each{hint}"
