"""The seeded noise generators (audit.scorers.noise): Philox4x32-10 against its published known answers and a
scalar reference, its normal transform, and the ``philox`` generator through the scorer and a run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from audit.errors import RunError
from audit.scorers import ScoreConfig, Scorer, prompt_seed
from audit.scorers.noise import philox4x32_10, philox_normal
from helpers import prompts_file, run_audit

# Random123 1.14, examples/kat_vectors, the three philox4x32 10-round lines: counter, key, expected output
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def scalar_philox(ctr, key):
    """Philox4x32-10 on Python integers (Salmon et al. 2011; Random123 philox.h), the test's own reference."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
    return c0, c1, c2, c3


@pytest.mark.parametrize("ctr,key,expected", KNOWN_ANSWERS)
def test_philox_gives_random123_known_answers(ctr, key, expected):
    words = philox4x32_10(*(torch.tensor([v], dtype=torch.int64) for v in (*ctr, *key)))
    assert tuple(int(w) for w in words) == expected
    assert scalar_philox(ctr, key) == expected


def test_philox_normal_is_box_muller_of_the_prompt_stream():
    """Value 4j + m of a row is pair m // 2 of block j (counter (j, 0, 0, 0), key = the seed's 32-bit halves),
    cos for even m, sin for odd, computed here in Python floats."""
    seeds = [0, 1, 2**62 + 12345, prompt_seed(0, "a red cat")]
    n = 10
    z = philox_normal(torch.tensor(seeds, dtype=torch.int64), n)
    assert z.shape == (4, n) and z.dtype == torch.float32
    for row, seed in enumerate(seeds):
        expected = []
        for j in range((n + 3) // 4):
            x0, x1, x2, x3 = scalar_philox((j, 0, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))
            for x, y in ((x0, x1), (x2, x3)):
                r, theta = math.sqrt(-2 * math.log((x + 1) / 2**32)), 2 * math.pi * y / 2**32
                expected += [r * math.cos(theta), r * math.sin(theta)]
        np.testing.assert_array_equal(z[row].numpy(), np.float32(expected[:n]))


def test_philox_rows_depend_only_on_their_seed_and_prefix():
    seeds = torch.tensor([5, 7, 11], dtype=torch.int64)
    z = philox_normal(seeds, 30)
    torch.testing.assert_close(philox_normal(seeds.flip(0), 30), z.flip(0), rtol=0, atol=0)
    torch.testing.assert_close(philox_normal(seeds[1:2], 30), z[1:2], rtol=0, atol=0)
    torch.testing.assert_close(philox_normal(seeds, 7), z[:, :7], rtol=0, atol=0)  # n not a multiple of 4
    assert not torch.equal(z[0], z[1])


def test_philox_normal_is_standard_normal():
    z = philox_normal(torch.arange(64, dtype=torch.int64) * 7919, 4096).double()  # 262,144 values
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert stats.kstest(z.numpy().ravel(), "norm").pvalue > 1e-3
    # the two values of a Box-Muller pair and neighbouring blocks are uncorrelated
    pairs = z.view(64, -1, 2)
    assert abs(float(torch.corrcoef(torch.stack([pairs[..., 0].ravel(), pairs[..., 1].ravel()]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([z[:, :-4].ravel(), z[:, 4:].ravel()]))[0, 1])) < 0.01


def test_philox_normal_copies_nothing_from_the_host(monkeypatch):
    """Drawn from device-side operations only: no tensor built from host data for the device (on a GPU each
    would be a blocking copy, a host synchronization per batch). Checked on the meta device, where such a copy
    would have to go through torch.tensor / as_tensor / Tensor.to from a CPU tensor."""
    calls = []
    for name in ("tensor", "as_tensor", "from_numpy"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: (calls.append("to") if self.device.type == "cpu"
                                                                   else None) or real_to(self, *a, **k))
    z = philox_normal(torch.empty(3, dtype=torch.int64, device="meta"), 16384)
    assert z.device.type == "meta" and z.shape == (3, 16384) and calls == []


def test_philox_normal_refuses_bad_arguments():
    with pytest.raises(ValueError, match="int64"):
        philox_normal(torch.tensor([1, 2], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="at least 1"):
        philox_normal(torch.tensor([1], dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="choose mt19937 or philox"):
        ScoreConfig("attention_entropy", ("x",), noise_generator="pcg")


def test_scorer_with_philox_draws_the_prompts_streams_on_the_device(tiny_model):
    layers = tuple(tiny_model.default_layers)
    prompts = ["a red cat", "a photo of a dog on the beach", "東京の夜景"]
    philox = Scorer(tiny_model, ScoreConfig("attention_entropy", layers, noise_draws=2, seed=3,
                                            noise_generator="philox"))
    mt = Scorer(tiny_model, ScoreConfig("attention_entropy", layers, noise_draws=2, seed=3))
    c, h, w = philox.latent_shape
    seeds = torch.tensor([prompt_seed(3, p) for p in prompts], dtype=torch.int64)
    expected = philox_normal(seeds, 2 * c * h * w).view(6, c, h, w)  # draw k = values [k*CHW, (k+1)*CHW)
    torch.testing.assert_close(philox.noise(prompts), expected, rtol=0, atol=0)
    batch = philox.prepare(prompts)
    assert batch.noise is None and batch.seeds.tolist() == seeds.tolist()  # the host draws nothing
    assert mt.prepare(prompts).seeds is None
    assert not torch.equal(mt.noise(prompts), expected)
    # the scores are those of the same forward given this noise: the mt19937 scorer fed philox's noise
    got = philox.collect(batch, philox.launch(batch))
    fed = mt.prepare(prompts)
    fed.noise = expected
    want = mt.collect(fed, mt.launch(fed))
    np.testing.assert_array_equal(got["attn_entropy"], want["attn_entropy"])
    np.testing.assert_array_equal(got["token_mass"], want["token_mass"])
    # a prompt's score does not depend on its batch or position
    alone = philox.score(prompts[1:2])
    assert abs(alone["attn_entropy"][0] - got["attn_entropy"][1]) <= 1e-6


def test_run_records_the_generator_and_keeps_earlier_identities(tmp_path, tiny_model_dir):
    src = prompts_file(tmp_path / "p.txt", 20)
    default, m_default = run_audit([src], tiny_model_dir, tmp_path / "mt", cache=str(tmp_path / "cache"))
    philox, m_philox = run_audit([src], tiny_model_dir, tmp_path / "ph", cache=str(tmp_path / "cache"),
                                 noise_generator="philox")
    assert json.loads((philox / "manifest.json").read_text())["score_config"] == m_philox["score_config"]
    # mt19937, the only generator before it was a choice, is not written: earlier caches and calibrations match
    assert "noise_generator" not in m_default["score_config"]
    assert m_philox["score_config"]["noise_generator"] == "philox"
    for m in (m_default, m_philox):
        assert m["counts"]["scored"] == 20 and m["counts"]["scored"] + m["counts"]["rejected"] == m["counts"]["rows_read"]
    # a separate cache entry per generator: the philox run scored everything, none of it from mt19937's cache
    assert m_philox["cache"]["hits"] == 0
    import polars as pl

    a = pl.read_parquet(default / "risk.parquet").sort("prompt_id")
    b = pl.read_parquet(philox / "risk.parquet").sort("prompt_id")
    assert a["prompt_id"].to_list() == b["prompt_id"].to_list()
    assert not np.allclose(a["attn_entropy"].to_numpy(), b["attn_entropy"].to_numpy())
    with pytest.raises(RunError, match="--noise-generator 'pcg'"):
        run_audit([src], tiny_model_dir, tmp_path / "bad", noise_generator="pcg")
    # resuming a run folder with the other generator is refused, naming both (the default too)
    with pytest.raises(RunError, match="score_config.noise_generator: 'philox' -> 'mt19937'"):
        run_audit([src], tiny_model_dir, tmp_path / "ph", cache=str(tmp_path / "cache"))


def test_calibration_and_diff_name_a_different_generator():
    from audit.calibrate import check_calibration
    from audit.errors import CalibrationError

    model = {"name": "m", "fingerprint": "f"}
    old = {"scorer": "attention_entropy", "layers": ["l"], "noise_draws": 1, "seed": 0, "num_inference_steps": 50,
           "dtype": "float32"}  # recorded before the generator was a choice
    cal = {"model": model, "score_config": old}
    check_calibration(cal, model, ScoreConfig("attention_entropy", ("l",)).to_dict())  # still accepted
    new = ScoreConfig("attention_entropy", ("l",), noise_generator="philox").to_dict()
    with pytest.raises(CalibrationError, match="noise_generator: calibration 'mt19937', run 'philox'"):
        check_calibration(cal, model, new)


def test_philox_launch_copies_only_the_seeds_and_without_blocking(tiny_model, monkeypatch):
    """With philox, launch() copies the seeds (int64 [B]) instead of the noise, non_blocking like every copy."""
    import inspect

    scorer = Scorer(tiny_model, ScoreConfig("attention_entropy", tuple(tiny_model.default_layers),
                                            noise_generator="philox"))
    batch = scorer.prepare(["a red cat", "a blue car", "an old house"])
    copies = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if "/audit/" in inspect.stack()[1].filename and isinstance(target, (torch.device, str)):
            copies.append((tuple(self.shape), self.dtype, bool(kwargs.get("non_blocking"))))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    scorer.launch(batch)
    assert ((3,), torch.int64, True) in copies  # the seeds
    assert [c for c in copies if not c[2]] == []


def test_philox_draw_is_a_fixed_number_of_operations_whatever_the_batch():
    """The host's cost of the device-side draw does not grow with the batch: the same tensor operations for 1
    prompt and for 512 (no per-prompt loop)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    counts = []
    for b in (1, 512):
        with Count() as c:
            philox_normal(torch.arange(b, dtype=torch.int64), 4 * 16 * 16)
        counts.append(c.ops)
    assert counts[0] == counts[1] and 150 < len(counts[0]) < 300


def test_box_muller_at_the_extreme_words(monkeypatch):
    """u1 = (x + 1) / 2^32 lies in (0, 1]: word x = 0 gives r = sqrt(-2 ln 2^-32) = sqrt(64 ln 2), finite,
    and x = 2^32 - 1 gives u1 = 1, r = 0. theta = 2 pi y / 2^32 with y = 0: (cos, sin) = (1, 0)."""
    import audit.scorers.noise as noise

    for word, r in ((0, math.sqrt(64 * math.log(2))), (2**32 - 1, 0.0)):
        def fake(c0, c1, c2, c3, k0, k1, word=word):
            shape = torch.broadcast_shapes(c0.shape, k0.shape)
            x = torch.full(shape, word, dtype=torch.int64)
            y = torch.zeros(shape, dtype=torch.int64)
            return x, y, x, y

        monkeypatch.setattr(noise, "philox4x32_10", fake)
        z = noise.philox_normal(torch.tensor([7], dtype=torch.int64), 4)
        np.testing.assert_array_equal(z.numpy(), np.float32([[r, 0.0, r, 0.0]]))
