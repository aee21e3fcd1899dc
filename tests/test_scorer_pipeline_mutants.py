"""The batch pipeline around the scorers, pinned where hand-applied mutants of audit/scorers/base.py, noise.py,
registry.py and audit/unit.py's score_prompts survived the other tests: the prompt seed and its noise recomputed
from the documented formula, truncation at exactly the tokenizer's length, a scorer's own non-finite column and a
lower-is-riskier risk, the partial forward's early exit, the auto batch size's memory accounting, the call order of
prepare / launch / collect with an injected failure, the out-of-memory halving and its reject reasons, and an
incomplete capture that is never retried away."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
import torch

from audit.capture import IncompleteCaptureError, cross_attention_layers
from audit.scorers import Column, ScoreConfig, Scorer, ScorerSpec, prompt_hash, prompt_seed, register, unregister
from audit.scorers.noise import philox_normal
from audit.unit import is_out_of_memory, score_prompts

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def _seed_by_hand(run_seed: int, prompt: str) -> int:
    """README / prompt_seed's docstring: 63 bits of BLAKE2b-64 over "<run seed>\\0<prompt>", read little-endian."""
    digest = hashlib.blake2b(f"{run_seed}\0{prompt}".encode(), digest_size=8).digest()
    return sum(byte << (8 * i) for i, byte in enumerate(digest)) % 2**63


def test_each_prompts_noise_is_torchs_cpu_generator_seeded_by_the_run_seed_and_prompt(tiny_model):
    """mt19937: draw k of prompt i is torch.randn of a CPU generator seeded with the prompt's seed under the RUN
    seed (7 here, not 0), K draws one after the other, prompt-major."""
    prompts = ["a red cat", "東京の夜景", "a photo of a cat"]
    # "a photo of a cat" under seed 7 has bit 62 of its seed set (bit 63 is always cleared)
    for prompt, seed in (("a red cat", 7), ("", 0), ("東京の夜景", 123456789), ("a photo of a cat", 7)):
        assert prompt_seed(seed, prompt) == _seed_by_hand(seed, prompt)
        # a prompt's identity (dedup, cache): hex BLAKE2b-128 of its UTF-8 bytes
        assert prompt_hash(prompt) == hashlib.blake2b(prompt.encode(), digest_size=16).hexdigest()
    s = Scorer(tiny_model, ScoreConfig("attention_entropy", tuple(tiny_model.default_layers), noise_draws=2, seed=7))
    expected = torch.cat([torch.randn((2, *s.latent_shape), generator=torch.Generator().manual_seed(
        _seed_by_hand(7, p))) for p in prompts])
    torch.testing.assert_close(s.noise(prompts), expected, rtol=0, atol=0)
    torch.testing.assert_close(s.prepare(prompts).noise, expected, rtol=0, atol=0)


def test_truncated_is_more_tokens_than_the_tokenizer_keeps(scorer):
    """75 words + BOS + EOS = 77 tokens fit CLIP's 77 exactly: not truncated; one word more is."""
    res = scorer.score([" ".join(["cat"] * 75), " ".join(["cat"] * 76)])
    assert res["n_tokens"].tolist() == [77, 78] and res["n_kept"].tolist() == [77, 77]
    assert res["truncated"].tolist() == [False, True]
    assert res["token_mass"].dtype == np.float32 and res["token_mass"].shape == (2, 77)


@pytest.fixture
def toy_lower():
    """A toy scorer whose column is 1 - BOS mass, NaN for its second prompt, and LOWER is riskier."""

    def compute(ctx):
        value = 1.0 - ctx.a[:, 0]
        value[1] = float("nan")
        return {"toy_lower": value}

    spec = register(ScorerSpec(name="toy_lower", description="test scorer", forward="partial_conditional",
                               compute=compute, risk_column="toy_lower", higher_is_riskier=False,
                               columns=(Column("toy_lower", "double", "1 - bos_mass"),)))
    yield spec
    unregister("toy_lower")


def test_a_scorers_own_nonfinite_column_flags_its_prompt_and_lower_is_riskier_is_negated(tiny_model, toy_lower):
    s = Scorer(tiny_model, ScoreConfig("toy_lower", tuple(tiny_model.default_layers)))
    res = s.score(["a red cat", "a blue dog", "an old house"])
    assert res["nonfinite"].tolist() == [False, True, False]
    assert np.isfinite(res["attn_entropy"]).all()  # the attention was fine: only the scorer's column was not
    keep = [0, 2]
    np.testing.assert_allclose(res["toy_lower"][keep], 1.0 - res["bos_mass"][keep], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(res["risk"][keep], -res["toy_lower"][keep])


def test_the_partial_forward_stops_after_the_last_selected_layer(tiny_model):
    """attention_entropy at the 4th of 7 cross-attention layers: the later layers and the UNet's output
    convolution never run (eager), and a compiled scorer's capture exits early on the selected layers only."""
    layers = cross_attention_layers(tiny_model.unet)
    chosen = tiny_model.default_layers[0]
    assert layers.index(chosen) == 3
    ran = []
    unet = tiny_model.unet
    modules = [(name, unet.get_submodule(name)) for name in layers] + [("conv_out", unet.conv_out)]
    hooks = [module.register_forward_pre_hook(lambda *a, n=name: ran.append(n)) for name, module in modules]
    try:
        Scorer(tiny_model, ScoreConfig("attention_entropy", (chosen,))).score(["a red cat", "a blue dog"])
    finally:
        for h in hooks:
            h.remove()
    assert ran == layers[:4]
    compiled = Scorer(tiny_model, ScoreConfig("attention_entropy", (chosen,)), compile=True)  # nothing compiled yet
    try:
        assert compiled._capture.early_exit is True and compiled._capture.layers == [chosen]
    finally:
        compiled.close()
    full = Scorer(tiny_model, ScoreConfig("noise_magnitude", (chosen,)), compile=True)
    try:
        assert full._capture.early_exit is False and sorted(full._capture.layers) == sorted(layers)
    finally:
        full.close()


def test_philox_normal_of_any_length_is_the_prefix_of_the_stream():
    seeds = torch.tensor([3, 2**40 + 9], dtype=torch.int64)
    longer = philox_normal(seeds, 12)
    for n in (1, 2, 3, 4, 5, 9):
        got = philox_normal(seeds, n)
        assert got.shape == (2, n)
        torch.testing.assert_close(got, longer[:, :n], rtol=0, atol=0)


def test_auto_batch_size_counts_only_the_probes_memory_and_the_unused_cache(tiny_model, monkeypatch):
    """A fake GPU: 20,000 MiB allocated (the model) out of 21,000 MiB reserved, 14,100 MiB free, a peak of
    50,000 MiB left from loading, and probes that need 100 MiB + 10 MiB a prompt above what was allocated.
    The peak counter is reset before each probe and the allocation before it subtracted (per = 10 MiB,
    fixed = 100 MiB); available = free + reserved - allocated = 15,100 MiB; 0.7 * 15,000 / 10 = 1,050 -> 1,024.
    With cap 256: 256."""
    mib = 1 << 20
    allocated = 20_000 * mib
    state = {"peak": 50_000 * mib, "order": []}
    s = Scorer(tiny_model, ScoreConfig("attention_entropy", tuple(tiny_model.default_layers)))
    s.model = dataclasses.replace(tiny_model, device=torch.device("cuda"))

    def score(prompts, tokens=None):
        state["order"].append(("score", len(prompts)))
        state["peak"] = max(state["peak"], allocated + (100 + 10 * len(prompts)) * mib)

    def reset():
        state["order"].append("reset")
        state["peak"] = allocated

    monkeypatch.setattr(s, "score", score)
    for name, fn in {"synchronize": lambda: state["order"].append("sync"), "reset_peak_memory_stats": reset,
                     "memory_allocated": lambda: allocated, "max_memory_allocated": lambda: state["peak"],
                     "memory_reserved": lambda: 21_000 * mib,
                     "mem_get_info": lambda: (14_100 * mib, 80_000 * mib)}.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    assert s.auto_batch_size() == 1024 and s.chosen_batch_size == 1024
    assert state["order"] == ["sync", "reset", ("score", 4), "sync", "sync", "reset", ("score", 16), "sync"]
    s._auto_batch = None
    assert s.auto_batch_size(cap=256) == 256


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


def test_inline_preparation_order_and_a_failed_launch_completes_the_batch_in_flight_first(scorer, monkeypatch):
    """prepare_threads=0: each batch is prepared just before its launch (none ahead), batch i+1 is launched
    before batch i is collected; when batch 1's launch fails (not out of memory), batch 0 (in flight) is
    brought back first, then batch 1's prompts are scored one by one, each alone (a batch of 1), then those that
    scored together again at the batch's 4 rows (the kernels' shape: their scores equal a clean run's exactly),
    and the progress counts every prompt once."""
    prompts = [f"a green field {i}" for i in range(10)]
    reference, _, _ = score_prompts(scorer, prompts, 4, prepare_threads=0)

    failed = []

    def fail(name, batch):
        if name == "launch" and batch.prompts[0] == prompts[4] and not failed:
            failed.append(batch.prompts)
            raise ValueError("this batch breaks the model")

    events = _record(scorer, monkeypatch, fail)
    done = []
    out, _, errors = score_prompts(scorer, prompts, 4, progress=done.append, prepare_threads=0)
    p = prompts
    alone = [e for i in range(4, 8) for e in (("prepare", p[i], 1), ("launch", p[i], 1), ("collect", p[i], 1))]
    alone += [("prepare", p[4], 4), ("launch", p[4], 4), ("collect", p[4], 4)]  # the 4 that scored, together
    assert events == [("prepare", p[0], 4), ("launch", p[0], 4), ("prepare", p[4], 4), ("launch", p[4], 4),
                      ("collect", p[0], 4), *alone, ("prepare", p[8], 4), ("launch", p[8], 4), ("collect", p[8], 4)]
    assert errors == {} and done == [4, 4, 2] and failed == [p[4:8]]
    np.testing.assert_array_equal(out["risk"], reference["risk"])


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


def test_out_of_memory_halving_of_odd_and_two_row_batches(scorer, monkeypatch, fresh_max_batch):
    """Batch size 5 out of memory above 2 rows: 5 -> 2 (floor of the half), then 2-row batches; a batch of 2
    that runs out of memory becomes the batch size 1 for what follows (it is halved, not scored one by one
    without lowering the batch size)."""
    prompts = [f"a wide river {i}" for i in range(6)]

    def fail_above(limit):
        def fail(name, batch):
            if name == "launch" and len(batch.prompts) > limit:
                raise torch.cuda.OutOfMemoryError(OOM)
        return fail

    events = _record(scorer, monkeypatch, fail_above(2))
    _, _, errors = score_prompts(scorer, prompts, 5, prepare_threads=0)
    assert errors == {} and scorer.max_batch == 2
    assert [e[2] for e in events if e[0] == "launch"] == [5, 2, 2, 2]
    monkeypatch.setattr(scorer, "max_batch", None)
    events = _record(scorer, monkeypatch, fail_above(1))
    _, _, errors = score_prompts(scorer, prompts[:2], 2, prepare_threads=0)
    assert errors == {} and scorer.max_batch == 1
    assert [e[2] for e in events if e[0] == "launch"] == [2, 1, 1]


def test_a_prompt_that_does_not_fit_alone_is_an_out_of_memory_reject_and_a_long_error_is_cut(scorer, monkeypatch,
                                                                                               fresh_max_batch):
    prompts = ["a red cat", "a huge poison prompt", "a blue dog", "another poison"]

    def fail(name, batch):
        if name == "launch" and any("huge" in p for p in batch.prompts):
            raise torch.cuda.OutOfMemoryError(OOM)
        if name == "launch" and any("another" in p for p in batch.prompts):
            raise ValueError("x" * 300)

    _record(scorer, monkeypatch, fail)
    done = []
    _, _, errors = score_prompts(scorer, prompts, 4, progress=done.append, prepare_threads=0)
    assert sorted(errors) == [1, 3] and sum(done) == 4
    assert errors[1] == f"out_of_memory: OutOfMemoryError: {OOM}"
    assert errors[3] == "scoring_error: ValueError: " + "x" * 200


def test_is_out_of_memory_by_type_or_by_message():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("Tried to allocate 2.00 GiB"))  # the type alone
    assert is_out_of_memory(RuntimeError("HIP error: Out of memory"))  # any case
    assert is_out_of_memory(MemoryError("OUT OF MEMORY"))
    assert not is_out_of_memory(ValueError("out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("where", ["launch", "collect", "retry"])
def test_an_incomplete_capture_is_never_retried_away(scorer, monkeypatch, where):
    """An IncompleteCaptureError (the scorer is broken) fails score_prompts even when it happens once: at a
    batch's launch, at its collect, or while a failed batch's prompts are retried one by one."""
    prompts = [f"a dark forest {i}" for i in range(6)]
    raised, broke = [], []

    def fail(name, batch):
        rows = len(batch.prompts)
        if where == "retry" and name == "launch" and not broke:
            broke.append(name)
            raise ValueError("this batch breaks the model")
        once = {"launch": (name, rows) == ("launch", 4), "collect": name == "collect",
                "retry": name == "launch" and bool(broke)}[where]
        if once and not raised:
            raised.append(name)
            raise IncompleteCaptureError("cross-attention capture incomplete")

    _record(scorer, monkeypatch, fail)
    with pytest.raises(IncompleteCaptureError):
        score_prompts(scorer, prompts, 4, prepare_threads=0)
    assert len(raised) == 1


def test_steps_up_to_the_training_timesteps_are_accepted(tiny_model):
    """--steps equal to the scheduler's training timesteps is allowed (one more is not); a configuration without
    num_train_timesteps counts diffusers' default, 1000."""
    from audit.errors import ModelError
    from audit.models import adapter_of
    from audit.scorers import get_scorer
    from audit.scorers.base import scorer_scheduler

    adapter, spec = adapter_of(tiny_model), get_scorer("attention_entropy")
    config = dict(tiny_model.scheduler_config)
    assert config["num_train_timesteps"] == 1000
    assert len(scorer_scheduler(adapter, spec, config, 1000).timesteps) == 1000
    with pytest.raises(ModelError, match="^--steps 1001: more than the 1000 training timesteps"):
        scorer_scheduler(adapter, spec, config, 1001)
    del config["num_train_timesteps"]
    assert len(scorer_scheduler(adapter, spec, config, 1000).timesteps) == 1000
    with pytest.raises(ModelError, match="^--steps 1001: more than the 1000 training timesteps"):
        scorer_scheduler(adapter, spec, config, 1001)


def test_batch_size_from_probes_edges():
    """Probes of equal size measure no growth (the single-probe estimate, no division by zero); memory growing
    faster than linearly gives a negative fixed part, counted as 0; the fraction and cap are passed on; no
    memory per prompt at all is the cap."""
    from audit.scorers import batch_size_for_memory, batch_size_from_probes

    mib, gib = 1 << 20, 1 << 30
    assert batch_size_from_probes(40 * gib, (4, 4 * gib), (4, 4 * gib)) == 16  # per 1 GiB: 0.7 * 40 = 28 -> 16
    # per = (400 - 40) / 12 = 30 MiB, fixed = max(40 - 120, 0) = 0: 0.7 * 2700 / 30 = 63 -> 32 (a fixed part of
    # -80 MiB would make it 0.7 * 2780 / 30 = 64.9 -> 64)
    assert batch_size_from_probes(2700 * mib, (4, 40 * mib), (16, 400 * mib)) == 32
    small, large = (4, gib + 80 * mib), (16, gib + 320 * mib)  # 1 GiB fixed + 20 MiB a prompt
    assert batch_size_from_probes(40 * gib, small, large, fraction=0.35) == 512  # 0.35 * 39 GiB / 20 MiB = 698
    assert batch_size_from_probes(40 * gib, small, large, cap=256) == 256
    assert batch_size_for_memory(gib, 0) == 2048 and batch_size_for_memory(gib, 0, cap=64) == 64


def test_a_scorer_without_layers_is_refused_when_built(tiny_model):
    with pytest.raises(KeyError, match=r"not a cross-attention layer of this UNet: \(none given\)"):
        Scorer(tiny_model, ScoreConfig("attention_entropy", ()))


def test_a_short_batch_is_padded_with_copies_of_its_shortest_prompt(scorer):
    """The pad rows copy the SHORTEST prompt (here the second, not the first) with its tokens, and score as it."""
    prompts = ["a blue dog on a sunny beach", "a cat", "an old stone house"]
    batch = scorer.prepare(prompts, pad_to=6)
    assert batch.prompts == prompts + ["a cat"] * 3
    np.testing.assert_array_equal(batch.tokens.input_ids[3:], np.repeat(batch.tokens.input_ids[1:2], 3, axis=0))
    assert batch.tokens.n_tokens.tolist()[3:] == [batch.tokens.n_tokens[1]] * 3
    res = scorer.collect(batch, scorer.launch(batch))
    np.testing.assert_array_equal(res["risk"][3:], [res["risk"][1]] * 3)
    assert scorer.prepare(prompts, pad_to=3).prompts == prompts  # a full batch: nothing added


def test_the_seeds_are_pinned_for_a_cuda_copy(scorer, monkeypatch):
    """philox's seeds on the host are pinned when the model is on CUDA (the copy to the device is then
    asynchronous), and left as they are on the CPU."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.tolist()) or self)
    expected = [prompt_seed(0, "a red cat"), prompt_seed(0, "a cat")]
    assert scorer.seeds(["a red cat", "a cat"]).tolist() == expected and pinned == []
    monkeypatch.setattr(scorer, "model", dataclasses.replace(scorer.model, device=torch.device("cuda")))
    assert scorer.seeds(["a red cat", "a cat"]).tolist() == expected and pinned == [expected]


def test_trigger_tokens_of_equal_mass_are_ranked_by_position(scorer, tiny_model):
    """Six tokens of 60 share the top mass: the five first by position are the triggers, in position order."""
    from audit.scorers import tokenize

    tokens = tokenize(tiny_model.tokenizer, [" ".join(["cat"] * 60)], 77)
    mass = np.full((1, 77), 0.01, dtype=np.float32)
    mass[0, [3, 9, 15, 30, 40, 50]] = 0.02
    trig = scorer.trigger_tokens(tokens, mass)[0]
    assert [(t["token"], t["position"]) for t in trig] == [("cat", p) for p in (3, 9, 15, 30, 40)]


def test_trigger_tokens_start_at_position_0_for_a_family_without_bos(scorer, tiny_model, monkeypatch):
    """T5 families have no BOS token: position 0 is the prompt's first token and may be a trigger (the tiny
    model's CLIP tokens stand in, its adapter told it has no BOS); the EOS stays out."""
    from audit.scorers import tokenize

    tokens = tokenize(tiny_model.tokenizer, ["a red cat"], 77)  # BOS a red cat EOS
    mass = np.zeros((1, 77), dtype=np.float32)
    mass[0, :5] = [0.5, 0.1, 0.2, 0.05, 0.9]
    assert [t["position"] for t in scorer.trigger_tokens(tokens, mass)[0]] == [2, 1, 3]
    monkeypatch.setattr(type(scorer.adapter), "has_bos", False)
    assert [t["position"] for t in scorer.trigger_tokens(tokens, mass)[0]] == [0, 2, 1, 3]


def test_trigger_entries_of_character_pieces_take_the_union_span_and_rank_ties_by_position(scorer, tiny_model):
    """The path that merges a character's pieces (a piece decodes to U+FFFD): an entry's span is the union of
    its tokens' spans (here made to differ, as a merged vocabulary's tokens that straddle characters do), runs
    with one EMPTY span stay apart, entries of equal mass rank by position, and the EOS stays out however heavy."""
    from audit.scorers import tokenize

    tokens = tokenize(tiny_model.tokenizer, ["🎨 cat dog"], 77)  # BOS, 4 byte pieces of 🎨, cat, dog, EOS
    assert int(tokens.n_kept[0]) == 8
    offsets = tokens.offset_mapping().copy()
    assert offsets[0, 1:5].tolist() == [[0, 1]] * 4 and offsets[0, 5:7].tolist() == [[2, 5], [6, 9]]
    offsets[0, 1:5] = [[0, 1], [0, 2], [1, 2], [1, 3]]
    mass = np.zeros((1, 77), dtype=np.float32)
    mass[0, 1:8] = [0.0625] * 4 + [0.25, 0.25, 0.9]  # 🎨 0.25 in all, cat 0.25, dog 0.25; EOS 0.9
    trig = scorer.trigger_tokens(dataclasses.replace(tokens, offsets=offsets, encodings=None), mass)[0]
    assert [(t["token"], t["position"], t["mass"], t["start"], t["end"]) for t in trig] == [
        ("🎨", 1, 0.25, 0, 3), ("cat", 5, 0.25, 2, 5), ("dog", 6, 0.25, 6, 9)]
    offsets[0, 5:7] = [[4, 4], [4, 4]]  # cat and dog given one empty span: still two entries
    trig = scorer.trigger_tokens(dataclasses.replace(tokens, offsets=offsets, encodings=None), mass)[0]
    assert [(t["token"], t["start"], t["end"]) for t in trig] == [("🎨", 0, 3), ("cat", 4, 4), ("dog", 4, 4)]


def test_an_unknown_scorer_suggests_difflibs_closest_at_its_default_cutoff():
    """difflib's ratio 2M / T at the default cutoff 0.6: "attn_entropy" is 0.83 from attention_entropy,
    "guidance" 0.64 from guidance_geometry; "xyz" is close to none (no suggestion)."""
    from audit.errors import RunError
    from audit.scorers import get_scorer

    for typo, suggestion in (("attn_entropy", "attention_entropy"), ("guidance", "guidance_geometry")):
        with pytest.raises(RunError, match=rf"\(did you mean '{suggestion}'\?\)$"):
            get_scorer(typo)
    with pytest.raises(RunError, match=r"^--scorer xyz: choose one of attention_entropy, [a-z_, ]+$"):
        get_scorer("xyz")
