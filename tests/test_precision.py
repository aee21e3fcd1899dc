"""Half precision, non-finite attention and batch sizing (issue 6), on CPU with the tiny model."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from audit.models import load_model
from audit.config import RunConfig
from audit.unit import score_prompts
from helpers import prompts_file, run_audit
from audit.runner import execute
from audit.scorers import ScoreConfig, Scorer, batch_size_for_memory

PROMPTS = ["a red cat", "a photo of a dog on the beach at sunset", "old oil painting of a house", "a blue car",
           "portrait of a woman in the city", "🎨", "東京の夜景", "night sky over the lake"]
BF16_TOLERANCE_NATS = 0.02  # |E_bf16 - E_fp32|; bfloat16 keeps ~3 significant digits in the projections


def test_bfloat16_scores_agree_with_float32(tiny_model_dir):
    fp32 = load_model(str(tiny_model_dir), "cpu", "float32")
    bf16 = load_model(str(tiny_model_dir), "cpu", "bfloat16")
    assert bf16.unet.dtype == torch.bfloat16
    layers = tuple(fp32.default_layers)
    a = Scorer(fp32, ScoreConfig("attention_entropy", layers)).score(PROMPTS)
    b = Scorer(bf16, ScoreConfig("attention_entropy", layers, dtype="bfloat16")).score(PROMPTS)
    assert b["token_mass"].dtype == np.float32  # probabilities are float32 whatever the model dtype
    diff = np.abs(a["attn_entropy"] - b["attn_entropy"])
    assert diff.max() <= BF16_TOLERANCE_NATS, diff
    assert np.abs(a["bos_mass"] - b["bos_mass"]).max() <= 0.01
    assert not b["nonfinite"].any()


def test_half_precision_on_the_trained_lab_model_keeps_the_ranking():
    """On trained weights (the lab model, 64 of its prompts) bfloat16 and float16 entropies stay within a stated
    tolerance of float32 and rank the prompts the same way (measured on all 576 prompts of the 15,000-step lab
    model: bfloat16 max 0.0505 nats, Spearman 0.9997; float16 max 0.0055 nats, Spearman 0.99999; E spans
    0.04-2.00 nats; docs/gpu.md). The tolerances are about 1.6x (bfloat16) and 1.8x (float16) those maxima."""
    from scipy.stats import spearmanr

    from audit.lab import LAB_PROMPTS
    from audit.runner import default_model

    prompts = pl.read_parquet(LAB_PROMPTS)["prompt"].to_list()[:64]
    scores = {}
    for dtype in ("float32", "bfloat16", "float16"):
        model = load_model(default_model(), "cpu", dtype)
        scores[dtype] = Scorer(model, ScoreConfig("attention_entropy", tuple(model.default_layers),
                                                  dtype=dtype)).score(prompts)["attn_entropy"]
    for dtype, tolerance in (("bfloat16", 0.08), ("float16", 0.01)):
        assert np.abs(scores[dtype] - scores["float32"]).max() <= tolerance
        assert spearmanr(scores[dtype], scores["float32"]).statistic >= 0.999


def test_float16_overflow_is_rejected_never_ranked(tmp_path, tiny_model_dir):
    """A layer whose query projection overflows float16 (|q| > 65504) gives non-finite logits: every
    prompt is rejected with nonfinite_attention and nothing is ranked."""
    from safetensors.torch import load_file, save_file
    import shutil

    bad = tmp_path / "overflow"
    shutil.copytree(tiny_model_dir, bad)
    model = load_model(str(tiny_model_dir), "cpu", "float32")
    layer = model.default_layers[0]
    path = next((bad / "unet").glob("*.safetensors"))
    weights = load_file(path)
    weights[f"{layer}.to_q.weight"] = weights[f"{layer}.to_q.weight"] * 1e6
    save_file(weights, path, metadata={"format": "pt"})
    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS}), src)
    out, manifest = execute(RunConfig(inputs=(str(src),), model=str(bad), out=str(tmp_path / "run"), device="cpu",
                                      dtype="float16", batch_size=4), progress=False, log=lambda m: None)
    assert manifest["counts"]["rejected_by_reason"] == {"nonfinite_attention": len(PROMPTS)}
    assert pl.read_parquet(out / "risk.parquet").height == 0
    assert set(pl.read_parquet(out / "rejects.parquet")["reason"]) == {"nonfinite_attention"}


def test_a_batch_size_above_the_rows_to_score_is_lowered_to_them(scorer, monkeypatch, tmp_path, tiny_model_dir):
    """Every batch is padded to the batch size, so 2 prompts at batch size 20,000 computed 20,000 rows' forwards
    (102 s and 9.8 GB through `audit.score` on the lab model): the batch size is now lowered to the rows there are,
    rounded up to a multiple of 8, and those rows are the unit's planned rows (what the cache left to score does
    not change the shape). The scores equal those at batch size 4 bit for bit on the CPU."""
    from audit.unit import batch_size_for_rows

    assert [batch_size_for_rows(b, r) for b, r in ((20000, 2), (20000, 8), (20000, 9), (32, 100), (5, 3), (20000, 0),
                                                    (20000, None))] == [8, 8, 16, 32, 5, 8, 20000]
    prompts = ["a red cat", "a blue dog", "an old house"]
    reference, ref_trig, _ = score_prompts(scorer, prompts, 4)
    real_prepare, seen = scorer.prepare, []

    def spy(batch, pad_to=None):
        prepared = real_prepare(batch, pad_to=pad_to)
        seen.append(len(prepared.prompts))
        pads.append(prepared.prompts[3:])
        assert len(batch) == 3 and prepared.tokens.input_ids.shape[0] == len(prepared.prompts)
        return prepared

    pads: list = []
    monkeypatch.setattr(scorer, "prepare", spy)
    out, trig, errors = score_prompts(scorer, prompts, 20000)
    assert seen == [8] and errors == {} and trig == ref_trig
    assert pads == [["a red cat"] * 5]  # padded with the batch's shortest prompt (not copies of a 10 MB last one)
    for c in reference:
        np.testing.assert_array_equal(out[c], reference[c])
    seen.clear()
    score_prompts(scorer, prompts, 20000, rows=100)  # 3 of a unit's 100 rows left to score: its shape, 104
    assert seen == [104]
    seen.clear()
    monkeypatch.setattr(scorer, "compiled", True, raising=False)  # compiled: one shape per run, no recompilation
    score_prompts(scorer, prompts, 64)
    assert seen == [64]
    monkeypatch.setattr(scorer, "compiled", False, raising=False)
    monkeypatch.undo()
    _, manifest = run_audit([prompts_file(tmp_path / "p.txt", 3)], tiny_model_dir, tmp_path / "run", device="cpu",
                            batch_size=20000)
    # the manifest keeps the batch size given: a short last unit lowered to its rows is no mixing of settings
    assert manifest["scored_with"]["batch_size"] == [20000] and manifest["counts"]["scored"] == 3
    logs: list[str] = []
    _, manifest = execute(RunConfig(inputs=(str(prompts_file(tmp_path / "q.txt", 25)),), model=str(tiny_model_dir),
                                    out=str(tmp_path / "run2"), device="cpu", batch_size=32, unit_rows=20),
                          progress=False, log=logs.append)  # units of 20 and 5 rows: shapes 24 and 8
    assert manifest["scored_with"]["batch_size"] == [32] and manifest["scored_with"]["mixed"] == []
    assert not [m for m in logs if "different settings" in m]


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_out_of_memory_halves_the_batch_and_loses_nothing(scorer, monkeypatch, threads):
    """With the preparation in the scoring thread (0), one or several preparing threads (batches prepared ahead
    at the old size are dropped)."""
    prompts = [f"a red cat {i}" for i in range(21)]
    reference, ref_trig, _ = score_prompts(scorer, prompts, 32)
    real_launch = scorer.launch
    seen_sizes = []

    def fake_launch(batch):
        seen_sizes.append(len(batch.prompts))
        if len(batch.prompts) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_launch(batch)

    monkeypatch.setattr(scorer, "launch", fake_launch)
    try:
        out, trig, errors = score_prompts(scorer, prompts, 16, prepare_threads=threads)
        assert errors == {}
        assert scorer.max_batch == 4 and seen_sizes[:3] == [16, 8, 4]
        np.testing.assert_allclose(out["risk"], reference["risk"], rtol=0, atol=1e-6)
        assert [t[0]["position"] for t in trig] == [t[0]["position"] for t in ref_trig]
        # after halving, 21 prompts take ceil(21 / 4) = 6 successful calls of 4 (the last one padded):
        # each prompt scored exactly once
        assert [s for s in seen_sizes if s <= 4] == [4] * 6
    finally:
        scorer.max_batch = None


def test_batch_size_for_memory():
    gib = 1 << 30
    assert batch_size_for_memory(10 * gib, 10 * (1 << 20)) == 512  # 0.7 * 10 GiB / 10 MiB = 716 -> 512
    assert batch_size_for_memory(100 * gib, 1 << 20) == 2048  # capped
    assert batch_size_for_memory(1 << 20, 1 << 30) == 1


def test_auto_batch_size_on_cpu(scorer):
    assert scorer.auto_batch_size() == 32


def test_batch_size_from_two_probes_separates_the_fixed_part():
    from audit.scorers import batch_size_from_probes

    mib, gib = 1 << 20, 1 << 30
    # 1 GiB fixed + 20 MiB per prompt: 4 prompts peak at 1.078 GiB, 16 at 1.3125 GiB
    small, large = (4, gib + 80 * mib), (16, gib + 320 * mib)
    # (0.7 * (40 GiB - 1 GiB)) / 20 MiB = 1397 -> 1024; one probe alone would say 0.7*40 GiB / 84 MiB = 341 -> 256
    assert batch_size_from_probes(40 * gib, small, large) == 1024
    assert batch_size_for_memory(40 * gib, large[1] / 16) == 256
    assert batch_size_from_probes(2 * gib, small, large) == 32  # 0.7 * 1 GiB / 20 MiB = 35.8 -> 32
    assert batch_size_from_probes(gib // 2, small, large) == 1  # the fixed part alone does not fit: 1, then OOM halving
    # no growth measured (noise): fall back to the single-probe estimate
    assert batch_size_from_probes(40 * gib, (4, gib), (16, gib)) == batch_size_for_memory(40 * gib, gib / 16)


def test_auto_batch_size_on_a_gpu_probes_twice(tiny_model, monkeypatch):
    """The GPU branch with torch.cuda's memory counters replaced by a model of 100 MiB fixed + 10 MiB per prompt."""
    import dataclasses

    mib = 1 << 20
    fake = {"peak": 0, "calls": []}
    s = Scorer(tiny_model, ScoreConfig("attention_entropy", tuple(tiny_model.default_layers)))
    s.model = dataclasses.replace(tiny_model, device=torch.device("cuda"))

    def score(prompts, tokens=None):
        fake["calls"].append(len(prompts))
        fake["peak"] = (100 + 10 * len(prompts)) * mib

    monkeypatch.setattr(s, "score", score)
    for name, fn in {"synchronize": lambda: None, "reset_peak_memory_stats": lambda: fake.update(peak=0),
                     "memory_allocated": lambda: 0, "max_memory_allocated": lambda: fake["peak"],
                     "memory_reserved": lambda: 300 * mib, "mem_get_info": lambda: (8 << 30, 16 << 30)}.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    # available = 8 GiB + 300 MiB cached; (0.7 * (8492 - 100) MiB) / 10 MiB = 587 -> 512
    assert s.auto_batch_size() == 512 and fake["calls"] == [4, 16]
    assert s.auto_batch_size() == 512 and fake["calls"] == [4, 16]  # cached


def test_compiled_scorer_probes_its_batch_size_with_the_eager_modules(tiny_model, monkeypatch):
    """--compile with --batch-size auto: the two probe batches run through the eager text encoder and UNet (a
    compiled module would compile each probe's shape, ~40 s each for SD v1.4 on an H200), and the compiled
    modules are back in place afterwards, also when a probe fails."""
    import dataclasses

    s = Scorer(tiny_model, ScoreConfig("attention_entropy", tuple(tiny_model.default_layers)), compile=True)
    try:
        compiled = (s._text_encoder, s._unet)
        assert compiled[1] is not tiny_model.unet  # the torch.compile wrapper (nothing compiled yet)
        s.model = dataclasses.replace(tiny_model, device=torch.device("cuda"))
        used = []
        peak = {"now": 0}

        def score(prompts, tokens=None):
            used.append((len(prompts), s._text_encoder is tiny_model.text_encoder, s._unet is tiny_model.unet))
            peak["now"] = (100 + 10 * len(prompts)) << 20

        monkeypatch.setattr(s, "score", score)
        for name, fn in {"synchronize": lambda: None, "reset_peak_memory_stats": lambda: peak.update(now=0),
                         "memory_allocated": lambda: 0, "max_memory_allocated": lambda: peak["now"],
                         "memory_reserved": lambda: 0, "mem_get_info": lambda: (8 << 30, 16 << 30)}.items():
            monkeypatch.setattr(torch.cuda, name, fn)
        assert s.auto_batch_size() == 512 and used == [(4, True, True), (16, True, True)]
        assert (s._text_encoder, s._unet) == compiled

        s._auto_batch = None
        monkeypatch.setattr(s, "score", lambda prompts, tokens=None: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            s.auto_batch_size()
        assert (s._text_encoder, s._unet) == compiled
    finally:
        s.close()


def test_next_batch_is_prepared_while_the_device_scores(scorer, monkeypatch):
    """Tokenization and noise of batch i+1 run in the background during batch i's device work: the
    launch of the first batch waits until the second batch's preparation has started (it would time out
    if preparation only ran between batches), and the scores equal a plain run's."""
    import threading

    prompts = [f"an old house {i}" for i in range(12)]
    reference, _, _ = score_prompts(scorer, prompts, 4)
    real_prepare, real_launch = scorer.prepare, scorer.launch
    second_started = threading.Event()
    prepare_threads, overlapped = [], []

    def prepare(batch, tokens=None, pad_to=None):
        prepare_threads.append(threading.current_thread().name)
        if batch[0] == prompts[4]:
            second_started.set()
        return real_prepare(batch, tokens, pad_to)

    def launch(batch):
        if batch.prompts[0] == prompts[0]:
            overlapped.append(second_started.wait(timeout=20))
        return real_launch(batch)

    monkeypatch.setattr(scorer, "prepare", prepare)
    monkeypatch.setattr(scorer, "launch", launch)
    out, _, errors = score_prompts(scorer, prompts, 4)
    assert overlapped == [True] and errors == {}
    assert len(prepare_threads) == 3 and all(t.startswith("memaudit-prepare") for t in prepare_threads)
    np.testing.assert_array_equal(out["risk"], reference["risk"])


def test_next_batch_is_launched_before_this_one_is_collected(scorer, monkeypatch):
    """Batch i+1's device work is queued before batch i's results come back (so on a GPU its trigger tokens
    are decoded while the device runs the next forward); a batch whose collect fails is rescored prompt by
    prompt; the scores, trigger tokens and progress equal a plain run's."""
    prompts = [f"a small boat {i}" for i in range(10)]
    reference, ref_trig, _ = score_prompts(scorer, prompts, 4)
    real_launch, real_collect = scorer.launch, scorer.collect
    events, failed = [], []

    def launch(batch):
        events.append(("launch", batch.prompts[0]))
        return real_launch(batch)

    def collect(batch, packed):
        events.append(("collect", batch.prompts[0]))
        if batch.prompts[0] == prompts[4] and not failed:
            failed.append(1)
            raise RuntimeError("lost on the way back")
        return real_collect(batch, packed)

    monkeypatch.setattr(scorer, "launch", launch)
    monkeypatch.setattr(scorer, "collect", collect)
    done = []
    out, trig, errors = score_prompts(scorer, prompts, 4, progress=done.append)
    head = [("launch", prompts[0]), ("launch", prompts[4]), ("collect", prompts[0]), ("launch", prompts[8]),
            ("collect", prompts[4])]
    assert events[:5] == head
    # batch 1 (prompts 4-7) failed to come back: each of its prompts alone, then batch 2 is collected
    assert events[5:] == [e for i in range(4, 8) for e in (("launch", prompts[i]), ("collect", prompts[i]))] + \
        [("collect", prompts[8])]
    assert errors == {} and done == [4, 4, 2]
    rest = [0, 1, 2, 3, 8, 9]  # batch shapes as in the plain run: bit-identical
    np.testing.assert_array_equal(out["risk"][rest], reference["risk"][rest])
    # the retried prompts ran as batches of one (float32 kernels round differently for that shape, ~1e-8)
    np.testing.assert_allclose(out["risk"][4:8], reference["risk"][4:8], rtol=1e-7)
    assert [trig[i] for i in rest] == [ref_trig[i] for i in rest]
    for i in range(4, 8):
        assert [t["token"] for t in trig[i]] == [t["token"] for t in ref_trig[i]]


def test_scores_leave_the_device_once_per_batch(scorer, monkeypatch):
    """launch() returns one packed tensor [B, 4 + L]; collect() unpacks it with a single .cpu()."""
    calls = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    batch = scorer.prepare(PROMPTS[:3])
    packed = scorer.launch(batch)
    assert packed.shape == (3, 4 + scorer.model.max_length) and packed.dtype == torch.float64
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    res = scorer.collect(batch, packed)
    assert calls == [(3, 4 + scorer.model.max_length)]
    np.testing.assert_array_equal(res["token_mass"].sum(axis=1).round(5), np.ones(3))


def test_launch_copies_to_the_device_without_blocking(scorer, monkeypatch):
    """Every host-to-device copy memaudit makes in launch() (token ids, attention mask, noise) is
    non_blocking: a blocking copy synchronizes the host with the GPU once per batch, as the attention mask's
    did on an H200 (benchmarks/gpu_throughput.py, launch_host_synchronizations, 2026-12-04)."""
    import inspect

    copies = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        caller = inspect.stack()[1].filename
        target = args[0] if args else kwargs.get("device")
        if "/audit/" in caller and isinstance(target, (torch.device, str)) and self.device.type == "cpu":
            copies.append((tuple(self.shape), self.dtype, bool(kwargs.get("non_blocking"))))
        return real_to(self, *args, **kwargs)

    batch = scorer.prepare(PROMPTS[:3])
    assert batch.tokens.attention_mask is not None
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    scorer.launch(batch)
    length = scorer.model.max_length
    shapes = [shape for shape, _, _ in copies]
    assert shapes.count((3, length)) == 2  # token ids and attention mask, both int64 [B, L]
    assert [c for c in copies if not c[2]] == []  # each of them non_blocking


@pytest.mark.slow
@pytest.mark.timeout(900)  # torch.compile (inductor, C++ codegen) of two models on CPU: 240 s ran out on a loaded
# 2-core machine (a full suite beside other jobs), while it took 8.5 s alone (inductor's cache on disk)
def test_compiled_scorer_matches_eager_and_restores_processors(tiny_model):
    """--compile: torch.compile'd text encoder and UNet give the eager scores to float32 rounding, twice
    (the second batch reuses the compiled graph), and close() puts the original processors back."""
    layers = tuple(tiny_model.default_layers)
    config = ScoreConfig("attention_entropy", layers)
    before = {n: type(p).__name__ for n, p in tiny_model.unet.attn_processors.items()}
    eager = Scorer(tiny_model, config).score(PROMPTS[:4])
    compiled = Scorer(tiny_model, config, compile=True)
    try:
        assert type(tiny_model.unet.get_submodule(layers[0]).processor).__name__ == "_CaptureProcessor"
        for batch in (PROMPTS[:4], PROMPTS[4:8]):
            ref = eager if batch == PROMPTS[:4] else Scorer(tiny_model, config).score(batch)
            got = compiled.score(batch)
            np.testing.assert_allclose(got["attn_entropy"], ref["attn_entropy"], rtol=0, atol=1e-5)
            np.testing.assert_allclose(got["token_mass"], ref["token_mass"], rtol=0, atol=1e-6)
    finally:
        compiled.close()
    assert {n: type(p).__name__ for n, p in tiny_model.unet.attn_processors.items()} == before


def test_auto_dtype_bfloat16_only_where_native(monkeypatch):
    import contextlib

    from audit.models import ModelError, resolve_dtype

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    for native, expected in ((True, torch.bfloat16), (False, torch.float16)):
        # emulation always "supports" bfloat16; only native support picks it
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: native or including_emulation)
        assert resolve_dtype("auto", torch.device("cuda")) == expected
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ModelError, match="--dtype half: choose auto"):
        resolve_dtype("half", torch.device("cpu"))


def test_compile_flag_reaches_the_scorer_and_warns_on_cpu(tmp_path, tiny_model_dir, monkeypatch):
    """RunConfig.compile is handed to the Scorer (compiled for real in the test above; here recorded and
    run eagerly to keep the test fast), and a CPU run says that compiling does not pay there."""
    seen, logs = [], []
    original = Scorer.__init__

    def init(self, model, config, compile=False):
        seen.append(compile)
        original(self, model, config, compile=False)

    monkeypatch.setattr(Scorer, "__init__", init)
    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS}), src)
    out, manifest = execute(RunConfig(inputs=(str(src),), model=str(tiny_model_dir), out=str(tmp_path / "run"),
                                      device="cpu", compile=True, workers=3), progress=False, log=logs.append)
    assert seen == [True] and manifest["counts"]["scored"] == len(PROMPTS)
    assert any("--compile on CPU was measured slower" in m for m in logs)
    assert "memaudit: --workers applies to --engine ray only; ignored with --engine local" in logs


def test_several_threads_prepare_the_batches_ahead_and_change_no_score(scorer, monkeypatch):
    """prepare_threads=3: while the device scores batch 1, batches 2, 3 and 4 are prepared at the same time
    (the first launch waits until all three preparations have started and none has finished: it would time
    out with fewer threads), and every score and trigger token equals the one-thread run's exactly."""
    import threading

    prompts = [f"a quiet harbour {i}" for i in range(22)]
    reference, ref_trig, _ = score_prompts(scorer, prompts, 4, prepare_threads=1)
    real_prepare, real_launch = scorer.prepare, scorer.launch
    started = {p: threading.Event() for p in (prompts[4], prompts[8], prompts[12])}
    release = threading.Event()
    waited = []

    def prepare(batch, tokens=None, pad_to=None):
        if batch[0] in started:
            started[batch[0]].set()
            release.wait(timeout=20)  # held until the first launch has seen all three running at once
        return real_prepare(batch, tokens, pad_to)

    def launch(batch):
        if batch.prompts[0] == prompts[0]:
            waited.append(all(e.wait(timeout=20) for e in started.values()))
            release.set()
        return real_launch(batch)

    monkeypatch.setattr(scorer, "prepare", prepare)
    monkeypatch.setattr(scorer, "launch", launch)
    out, trig, errors = score_prompts(scorer, prompts, 4, prepare_threads=3)
    assert waited == [True] and errors == {}
    for c in reference:
        np.testing.assert_array_equal(out[c], reference[c])
    assert trig == ref_trig


def test_prepare_threads_auto_is_one_on_cpu_and_bounded_on_a_gpu(scorer, monkeypatch):
    import dataclasses
    import os

    from audit.unit import prepare_threads_for

    assert prepare_threads_for(scorer) == 1 and prepare_threads_for(scorer, 3) == 3
    assert prepare_threads_for(scorer, 0) == 0  # in the scoring thread
    monkeypatch.setattr(scorer, "model", dataclasses.replace(scorer.model, device=torch.device("cuda")))
    for cores, expected in ((1, 1), (2, 1), (3, 2), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, c=cores: set(range(c)))
        assert prepare_threads_for(scorer) == expected


def test_batch_size_from_probes_splits_fixed_and_per_prompt_memory():
    """Probes (4, 6 GiB) and (16, 18 GiB): per = 12 GiB / 12 = 1 GiB, fixed = 6 - 4 = 2 GiB; with 40 GiB
    available: 0.7 * 38 = 26.6 prompts -> 16 (the largest power of two)."""
    from audit.scorers.base import batch_size_from_probes

    g = 2**30
    assert batch_size_from_probes(40 * g, (4, 6 * g), (16, 18 * g)) == 16
