"""What a mutation review of the command line's wiring (audit/cli/__init__.py, audit/cli/common.py,
audit/cli/report.py) and of the Python API (audit/api.py) found unpinned: the defaults and flag values that reach
the run's configuration, the summary and warning lines, each exit code the README and ``memaudit run --help``
promise (0, 1, 2, 3, 4, 130, 143), the one-line error of each known exception, ``--debug`` anywhere before ``--``,
the options report, calibrate and diff pass on and their ``--output`` checks, and audit.run's and audit.score's
defaults and errors. Most tests replace the engine (``audit.runner.execute``) with a stub returning a manifest
written here, so the lines and exit codes are checked against counts set by hand, with no model loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

import audit.runner as runner


def _manifest(rows_read: int = 2, scored: int = 2, reasons: dict | None = None, **extra) -> dict:
    """A finished run's manifest: ``rows_read`` rows, ``scored`` of them scored, the rest rejected as ``reasons``."""
    reasons = reasons if reasons is not None else ({} if rows_read == scored else {"empty_prompt": rows_read - scored})
    counts = {"rows_read": rows_read, "scored": scored, "rejected": rows_read - scored,
              "rejected_by_reason": reasons, "unique_prompts": scored}
    counts.update(extra.pop("counts", {}))
    return {"counts": counts, "wall_time_s": 2.0, "throughput_rows_per_s": 1.0,
            "model": {"name": "m", "fingerprint": "f00d"}, "files": [{"format": "txt", "rows": rows_read}], **extra}


def _api_stub(monkeypatch, manifest):
    seen = []

    def execute(cfg, progress=None, log=None):
        seen.append((cfg, progress, log))
        return Path(cfg.out), manifest

    monkeypatch.setattr(runner, "execute", execute)
    return seen


def test_audit_run_refuses_the_names_of_its_private_arguments(tmp_path, monkeypatch):
    """run()'s docstring: an unknown option is a TypeError. ``nothing_scored_ok`` and ``caller`` (what score() tells
    the shared code) were taken silently, the first turning off the nothing-scored gate."""
    import audit

    _api_stub(monkeypatch, _manifest(2, 0))
    for name, value in (("nothing_scored_ok", True), ("caller", "me")):
        with pytest.raises(TypeError, match=f"^unknown option {name}: the options are address,"):
            audit.run("p.txt", out=tmp_path / "o", **{name: value})
        with pytest.raises(TypeError, match=f"^unknown option {name}: the options are address,"):
            audit.score(["a red cat"], **{name: value})


def test_score_that_fails_carries_every_row_and_a_message_without_the_temporary_folder(tiny_model_dir, monkeypatch):
    """1 of 2 prompts fails (50% > 1%): ScoringFailedError whose message names no run folder (it was temporary) and
    says .frame holds the rows, one sentence after another; .out is None; .frame has both rows, in order."""
    import audit
    from helpers import fail_batches_with

    fail_batches_with(monkeypatch, "poison")
    with pytest.raises(audit.ScoringFailedError) as err:
        audit.score(["a red cat", "a poison apple"], model=str(tiny_model_dir), device="cpu")
    assert str(err.value) == ("1 of 2 rows (50.0%) could not be scored (scoring_error 1), more than "
                              "--max-error-fraction 0.01; the first: scoring_error: ValueError: this prompt breaks "
                              "the model. The error's .frame holds every prompt's row (scored, or rejected with the "
                              "reason).")
    assert err.value.out is None and err.value.manifest["counts"]["scored"] == 1
    frame = err.value.frame
    assert frame["row"].to_list() == [0, 1] and frame["reason"].to_list() == [None, "scoring_error"]
    assert frame["prompt"].to_list() == ["a red cat", "a poison apple"] and frame["risk"][0] is not None
