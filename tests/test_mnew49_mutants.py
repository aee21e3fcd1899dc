"""Mutation review of the exit-code gates (audit.gates), the units' commit and rerun logic (audit.unit) and the run's
finish (audit.runner), session 49 (helper mnew49): each test kills a hand-applied mutant that the suite let survive,
with exact values."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq


def test_the_error_gate_s_hint_names_the_first_scoring_failure_not_the_first_reject(tmp_path):
    """rejects.parquet lists every reject: the rows rejected before scoring (empty, null) come first as often as not.
    The hint after the error gate's message names the first row the model failed on, not an empty prompt."""
    from audit.gates import error_gate

    pq.write_table(pa.table({"reason": ["empty_prompt", "null_prompt", "out_of_memory", "scoring_error"],
                             "detail": pa.array([None, None, "OutOfMemoryError: CUDA", "ValueError: bad"],
                                                pa.string())}), tmp_path / "rejects.parquet")
    manifest = {"counts": {"rows_read": 8, "scored": 4,
                           "rejected_by_reason": {"empty_prompt": 1, "null_prompt": 1, "out_of_memory": 1,
                                                  "scoring_error": 1}}}
    assert error_gate(SimpleNamespace(max_error_fraction=0.01), tmp_path, manifest) == (
        "2 of 6 rows (33.3%) could not be scored (out_of_memory 1, scoring_error 1), more than --max-error-fraction "
        f"0.01; the first: out_of_memory: OutOfMemoryError: CUDA. The outputs in {tmp_path} hold what was scored.")


def test_recorded_failures_take_a_recorded_fraction_that_is_not_a_number_as_the_default(tmp_path):
    """A manifest whose run_config records ``max_error_fraction`` as true (a hand-edited or foreign manifest): a bool
    is no fraction (True would read as 1, passing every run), so the default 0.01 judges it; a recorded 0 is a
    fraction and fails a single failed row, a recorded 1 passes them all."""
    from audit.gates import recorded_failures

    def manifest(fraction):
        return {"counts": {"rows_read": 100, "scored": 95, "rejected_by_reason": {"scoring_error": 5}},
                "run_config": {"max_error_fraction": fraction}}

    expected = [f"5 of 100 rows (5.0%) could not be scored (scoring_error 5), more than --max-error-fraction 0.01. "
                f"The outputs in {tmp_path} hold what was scored"]
    assert recorded_failures(tmp_path, manifest(True)) == expected
    assert recorded_failures(tmp_path, manifest("0.5")) == expected
    assert recorded_failures(tmp_path, manifest(0.05)) == []  # 5 of 100: not more than 0.05
    assert recorded_failures(tmp_path, manifest(1)) == []  # an int is a fraction: 1 lets every failure pass
    assert recorded_failures(tmp_path, manifest(0)) == [
        "5 of 100 rows (5.0%) could not be scored (scoring_error 5), more than --max-error-fraction 0. The outputs "
        f"in {tmp_path} hold what was scored"]


def test_nothing_scored_counts_every_unreadable_file_and_names_the_first(tmp_path):
    """Every input with rows skipped as unreadable: the message counts those files (2 of the 3 skipped: the third
    was skipped as unsupported, not unreadable) and quotes the first one's reason on one line."""
    from audit.gates import nothing_scored

    manifest = {"counts": {"rows_read": 0, "scored": 0, "rejected_by_reason": {}},
                "skipped_files": [{"url": "notes.docx", "reason": "unsupported format"},
                                  {"url": "a.parquet", "reason": "cannot read as parquet:\nbad magic",
                                   "unreadable": True},
                                  {"url": "b.parquet", "reason": "cannot read as parquet: cut short",
                                   "unreadable": True}]}
    assert nothing_scored(manifest) == (
        "nothing was scored: every input file with rows was skipped as unreadable (2 under --skip-bad-files; "
        "manifest.json skipped_files says why for each), the first: cannot read as parquet:\\nbad magic")


def test_failed_rows_counts_each_scoring_failure_of_a_marker_and_nothing_else(tmp_path):
    """--retry-failed scores again the units whose marker counts rows the model failed: a non-finite attention
    (a NaN in fp16) is one of them, like scoring_error and out_of_memory; rows rejected before scoring are not."""
    from audit.unit import Unit, failed_rows, shard_paths

    unit = Unit(3, str(tmp_path / "p.txt"), "txt", 12, 16)
    done = shard_paths(tmp_path, unit)[2]
    assert failed_rows(tmp_path, unit) == {}  # no marker: not a finished unit
    done.write_text(json.dumps({"unit": unit.to_dict(), "stats": {"rejected_by_reason": {
        "empty_prompt": 1, "nonfinite_attention": 2, "unreadable_rows": 0}}}))
    assert failed_rows(tmp_path, unit) == {"nonfinite_attention": 2}
    done.write_text(json.dumps({"unit": unit.to_dict(), "stats": {"rejected_by_reason": {
        "scoring_error": 1, "nonfinite_attention": 1, "out_of_memory": 3, "null_prompt": 4}}}))
    assert failed_rows(tmp_path, unit) == {"scoring_error": 1, "out_of_memory": 3, "nonfinite_attention": 1}


def test_a_unit_is_done_only_for_its_own_marker_and_a_shard_of_the_rows_it_counts(tmp_path, tiny_model_dir):
    """unit_done reads the marker's unit record and the shard's row count: a marker of the same rows planned at
    another byte offset is not this unit's, and a risk shard that lost rows (rewritten from a filtered table: a
    valid Parquet file of this unit's rows and this version's columns) makes the unit scored again, not a merge
    that is short of rows."""
    import dataclasses

    import polars as pl

    from audit.pipeline import RunConfig
    from audit.runner import execute
    from audit.unit import Unit, shard_paths, unit_done
    from helpers import prompts_file, run_audit

    src = prompts_file(tmp_path / "p.txt", 12, seed=5)
    fresh, _ = run_audit([src], tiny_model_dir, tmp_path / "fresh", unit_rows=4, batch_size=4)
    out = tmp_path / "out"
    run_audit([src], tiny_model_dir, out, unit_rows=4, batch_size=4)
    shards = out / "shards"
    units = [Unit(**json.loads(p.read_text())["unit"]) for p in sorted(shards.glob("*.done.json"))]
    assert [(u.start, u.stop) for u in units] == [(0, 4), (4, 8), (8, 12)] and all(unit_done(shards, u) for u in units)
    assert not unit_done(shards, dataclasses.replace(units[1], byte_offset=units[1].byte_offset + 1))
    risk = shard_paths(shards, units[1])[0]
    table = pq.read_table(risk)
    pq.write_table(table.slice(0, 3), risk)
    assert not unit_done(shards, units[1]) and unit_done(shards, units[0]) and unit_done(shards, units[2])
    cfg = RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(out), unit_rows=4, batch_size=4)
    _, manifest = execute(cfg, progress=False, log=lambda msg: None)
    assert manifest["units"] == {"total": 3, "resumed": 2} and manifest["counts"]["scored"] == 12
    assert pl.read_parquet(out / "risk.parquet").equals(pl.read_parquet(fresh / "risk.parquet"))


def test_a_recorded_group_bound_of_one_row_is_kept_by_a_rerun(tmp_path, tiny_model_dir, launches, monkeypatch):
    """A first invocation split among 12 workers records group_rows 1 (every one-row file its own group, batch 8);
    a rerun on one worker keeps that bound, so the 3 units left are scored as 3 groups at batch 8, as the clean run
    scored them, not regrouped into one group of 12 planned rows at batch 16."""
    import polars as pl

    import audit.engines.local as local
    from helpers import run_audit

    folder = tmp_path / "files"
    folder.mkdir()
    for i in range(12):
        (folder / f"part-{i:03d}.txt").write_text(f"a photo of a small red cat number {i}\n")
    monkeypatch.setattr(local, "worker_count", lambda cfg: 12, raising=False)
    out, _ = run_audit([folder], tiny_model_dir, tmp_path / "out", device="cpu", batch_size=16)
    assert json.loads((out / "run.json").read_text())["group_rows"] == 1 and launches == [8] * 12
    clean = pl.read_parquet(out / "risk.parquet")
    monkeypatch.delattr(local, "worker_count")
    for i in (0, 1, 7):
        (out / "shards" / f"unit-{i:06d}.done.json").unlink()
    launches.clear()
    _, manifest = run_audit([folder], tiny_model_dir, out, device="cpu", batch_size=16)
    assert launches == [8, 8, 8] and manifest["units"] == {"total": 12, "resumed": 9}
    assert pl.read_parquet(out / "risk.parquet").equals(clean)


def test_retry_failed_scores_the_uncommitted_units_too(tmp_path, tiny_model_dir, monkeypatch):
    """A rerun with --retry-failed over a folder holding a finished unit with a failed row (unit 1) and a unit left
    uncommitted (unit 2, its marker gone): both are scored, the other unit resumed, and the tables equal a clean
    run's (6 rows scored, none rejected)."""
    import polars as pl

    from helpers import fail_batches_with, run_audit

    src = tmp_path / "p.txt"
    src.write_text("a red cat\na blue dog\na poison apple\nan old city\nsome green tea\na tall tower\n")
    opts = dict(unit_rows=2, batch_size=2, max_error_fraction=0.5)
    fail_batches_with(monkeypatch, "poison")
    out, first = run_audit([src], tiny_model_dir, tmp_path / "out", **opts)
    assert first["counts"]["rejected_by_reason"] == {"scoring_error": 1}
    monkeypatch.undo()
    (out / "shards" / "unit-000002.done.json").unlink()
    _, manifest = run_audit([src], tiny_model_dir, out, retry_failed=True, **opts)
    assert manifest["units"] == {"total": 3, "resumed": 1}
    assert manifest["counts"]["scored"] == 6 and manifest["counts"]["rejected_by_reason"] == {}
    ref, _ = run_audit([src], tiny_model_dir, tmp_path / "ref", **opts)
    assert pl.read_parquet(out / "risk.parquet").equals(pl.read_parquet(ref / "risk.parquet"))


def test_the_api_raises_the_scoring_failure_before_the_flag_gate(tmp_path, monkeypatch):
    """audit.run with --fail-on-flagged 2 over a run with 3 rows flagged and 1 of 4 rows failed (25% > 1%): the
    scoring failure is raised (ScoringFailedError, the CLI's exit 4), as the CLI says it first, not the flag gate's
    FlaggedPromptsError (exit 3) over an audit that did not score its input."""
    import pytest

    import audit
    import audit.runner as runner
    from audit.errors import FlaggedPromptsError, ScoringFailedError

    src = tmp_path / "p.txt"
    src.write_text("a photo\n")
    (tmp_path / "cal.json").write_text("{}")
    counts = {"rows_read": 4, "scored": 3, "rejected": 1, "rejected_by_reason": {"scoring_error": 1},
              "unique_prompts": 3, "flagged": 3}
    manifest = {"counts": counts, "calibration": {"threshold": 0.5}}
    monkeypatch.setattr(runner, "execute", lambda cfg, progress=None, log=None: (tmp_path / "out", manifest))
    with pytest.raises(ScoringFailedError) as err:
        audit.run(src, out=tmp_path / "out", calibration=str(tmp_path / "cal.json"), fail_on_flagged=2)
    assert str(err.value).startswith("1 of 4 rows (25.0%) could not be scored (scoring_error 1), more than "
                                     "--max-error-fraction 0.01")
    counts.update(scored=4, rejected=0, rejected_by_reason={})
    with pytest.raises(FlaggedPromptsError, match=r"^3 rows flagged \(risk > 0\.5\), more than --fail-on-flagged 2"):
        audit.run(src, out=tmp_path / "out", calibration=str(tmp_path / "cal.json"), fail_on_flagged=2)


def test_score_returns_every_row_rejected_rather_than_raising_nothing_scored(tiny_model_dir):
    """audit.score over prompts all rejected by the run (empty, blank, null) returns each row's reason: the run's
    nothing-scored failure is for audit.run and the CLI, not for a function whose answer is the rows' reasons."""
    import audit

    df = audit.score(["", None, "   "], model=str(tiny_model_dir), device="cpu")
    assert df["row"].to_list() == [0, 1, 2]
    assert df["reason"].to_list() == ["empty_prompt", "null_prompt", "empty_prompt"]
    assert df["risk"].null_count() == 3


def test_a_two_row_group_unit_rejects_only_its_damaged_group(tmp_path, tiny_model_dir):
    """A Parquet unit of two row groups, the second with a page failing its CRC, under --skip-bad-files: the first
    group's 20 rows are scored and only the second's 20 are rejected as unreadable_rows (a unit of one row group is
    rejected whole; two are already read one at a time)."""
    import polars as pl

    from helpers import run_audit

    path = tmp_path / "two.parquet"
    caps = [f"caption {i:03d} a red cat on a beach" for i in range(40)]
    pq.write_table(pa.table({"caption": caps}), path, compression="NONE", write_page_checksum=True,
                   row_group_size=20, use_dictionary=False)
    data = bytearray(path.read_bytes())
    at = data.find(b"caption 030 a red")
    data[at + 8:at + 11] = b"999"
    path.write_bytes(bytes(data))
    out, manifest = run_audit([path], tiny_model_dir, tmp_path / "run", device="cpu", prompt_column="caption",
                              skip_bad_files=True)
    assert manifest["counts"]["rows_read"] == 40 and manifest["counts"]["scored"] == 20
    assert manifest["counts"]["rejected_by_reason"] == {"unreadable_rows": 20}
    assert sorted(pl.read_parquet(out / "rejects.parquet")["row"]) == list(range(20, 40))
    assert sorted(pl.read_parquet(out / "risk.parquet")["row"]) == list(range(20))
