"""The out-of-memory retry of audit/unit.py's score_prompts halves the batch size the kernels saw: a short batch is
padded to the batch size, so its prompts are not what ran out of memory."""

from __future__ import annotations

import pytest
import torch

from audit.unit import score_prompts

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def _record(scorer, monkeypatch, fail=None):
    """Record scorer.prepare / launch / collect calls as (name, first prompt, rows); ``fail(name, batch)`` may
    raise to inject a failure."""
    real = {n: getattr(scorer, n) for n in ("prepare", "launch", "collect")}
    events = []

    def prepare(batch, tokens=None, pad_to=None):
        prepared = real["prepare"](batch, tokens, pad_to)
        events.append(("prepare", batch[0], len(prepared.prompts)))
        return prepared

    def launch(batch):
        events.append(("launch", batch.prompts[0], len(batch.prompts)))
        if fail:
            fail("launch", batch)
        return real["launch"](batch)

    def collect(batch, packed):
        events.append(("collect", batch.prompts[0], len(batch.prompts)))
        if fail:
            fail("collect", batch)
        return real["collect"](batch, packed)

    for name, fn in (("prepare", prepare), ("launch", launch), ("collect", collect)):
        monkeypatch.setattr(scorer, name, fn)
    return events


@pytest.fixture
def fresh_max_batch(scorer, monkeypatch):
    monkeypatch.setattr(scorer, "max_batch", None, raising=False)
    freed = []
    monkeypatch.setattr("audit.unit.free_accelerator_memory", lambda: freed.append(1))
    return freed


def test_out_of_memory_on_a_padded_batch_halves_the_batch_size_not_its_prompts(scorer, monkeypatch, fresh_max_batch):
    """20 prompts at batch size 16: the second batch holds 4 prompts padded to 16 rows. Out of memory there
    halves the batch size the kernels saw, 16 -> 8 (the 4 prompts padded to 8), not the 4 prompts to 2; the
    accelerator's cache is freed once."""
    prompts = [f"a tall tower {i}" for i in range(20)]
    failed = []

    def fail(name, batch):
        if name == "launch" and batch.prompts[0] == prompts[16] and not failed:
            failed.append(len(batch.prompts))
            raise torch.cuda.OutOfMemoryError(OOM)

    events = _record(scorer, monkeypatch, fail)
    out, _, errors = score_prompts(scorer, prompts, 16, prepare_threads=0)
    assert errors == {} and failed == [16] and scorer.max_batch == 8 and fresh_max_batch == [1]
    assert [(e[1], e[2]) for e in events if e[0] == "launch"] == [(prompts[0], 16), (prompts[16], 16),
                                                                   (prompts[16], 8)]


def test_out_of_memory_on_one_prompt_padded_to_the_batch_size_halves_it_too(scorer, monkeypatch, fresh_max_batch):
    """One prompt at batch size 8 is padded to 8 rows; out of memory above 2 rows halves 8 -> 4 -> 2 (the batch
    size kept for what follows), as for any batch, rather than scoring the prompt alone at the old batch size."""
    def fail(name, batch):
        if name == "launch" and len(batch.prompts) > 2:
            raise torch.cuda.OutOfMemoryError(OOM)

    events = _record(scorer, monkeypatch, fail)
    _, _, errors = score_prompts(scorer, ["a lone lighthouse"], 8, prepare_threads=0)
    assert errors == {} and scorer.max_batch == 2 and fresh_max_batch == [1, 1]
    assert [e[2] for e in events if e[0] == "launch"] == [8, 4, 2]
