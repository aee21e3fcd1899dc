"""Mutation review of session 45's changes (helper mnew): ``memaudit run --retry-failed`` (audit.runner
``_retry_failed_units``, audit.unit ``failed_rows``/``forget_unit``), ``audit.diff.previous_run`` and the other
code changed that day, pinned with real values."""

from __future__ import annotations

import json

import pytest

from audit.config import RunConfig


def _failing_launch(monkeypatch):
    """``Scorer.launch`` fails a batch holding 'poison' with an out-of-memory error and one holding 'broken' with
    another error (the engines then score those batches' prompts one by one: just those prompts fail)."""
    import torch

    from audit.scorers import Scorer

    original = Scorer.launch

    def launch(self, batch):
        if any("poison" in p for p in batch.prompts):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any("broken" in p for p in batch.prompts):
            raise ValueError("this prompt breaks the model")
        return original(self, batch)

    monkeypatch.setattr(Scorer, "launch", launch)
    return original


PROMPTS = "a poison apple\na blue dog\nan old city\nsome green tea\na tall tower\na broken clock\n"


def _execute(src, model, out, **kw):
    from audit.runner import execute

    lines = []
    cfg = RunConfig(inputs=(str(src),), model=str(model), out=str(out), unit_rows=2, batch_size=2,
                    max_error_fraction=0.5, **kw)
    return execute(cfg, progress=False, log=lines.append)[1], lines


def test_a_failed_batchs_other_prompts_keep_their_batch_scores_in_the_cache(tmp_path, tiny_model_dir, monkeypatch):
    """A batch that fails (not out of memory) is scored prompt by prompt; each prompt was scored alone, a shape of
    one row, so its batch-mate got a score 2.2e-8 off its batch value, and --cache kept that value for every later
    run: --retry-failed --cache then did not give a clean run's table. Each prompt is now scored at the batch's
    shape (padded as a short batch is), so the batch-mate's score, the cache and the retried run equal a clean
    run's exactly."""
    import polars as pl

    from audit.scorers import Scorer

    src = tmp_path / "p.txt"
    src.write_text(PROMPTS.replace("a poison apple", "a red apple"))  # only 'a broken clock' fails, a ValueError
    ref, _ = _execute(src, tiny_model_dir, tmp_path / "ref")
    clean = pl.read_parquet(tmp_path / "ref" / "risk.parquet")
    original = _failing_launch(monkeypatch)
    out, cache = tmp_path / "out", tmp_path / "cache"
    first, _ = _execute(src, tiny_model_dir, out, cache=str(cache))
    assert first["counts"]["rejected_by_reason"] == {"scoring_error": 1}
    risk = pl.read_parquet(out / "risk.parquet")
    mate = risk.filter(pl.col("prompt") == "a tall tower")["risk"].item()
    assert mate == clean.filter(pl.col("prompt") == "a tall tower")["risk"].item()
    monkeypatch.setattr(Scorer, "launch", original)
    retried, _ = _execute(src, tiny_model_dir, out, cache=str(cache), retry_failed=True)
    assert retried["counts"]["scored"] == 6 and retried["units"] == {"total": 3, "resumed": 2}
    assert pl.read_parquet(out / "risk.parquet").equals(clean)
