"""What a mutation review of the lab's code (data, ground truth, adherence, regime, evaluation, mitigation, docs,
examples, encoder report) found no test holding: the renderer's shapes and gradient counted by hand, the evaluation
prompts' filters on a hand-made world, the sampler's seeds, steps, row order and clipping, the attention regime's
invariants, the encoder's position report recomputed in numpy, and the callers' arithmetic on hand-made inputs.
CPU only, no network, a few seconds."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from audit.lab import LAB_MODEL_DIR
from audit.lab.data import COLOR_NAMES, PALETTE, SHAPES, DataConfig, Scenes

META = json.loads((LAB_MODEL_DIR / "memaudit.json").read_text())


@pytest.fixture
def seeds(monkeypatch) -> list[int]:
    """The initial seed of every generator ``torch.randn`` draws from during the test, in call order."""
    import torch

    drawn, real = [], torch.randn

    def randn(*a, generator=None, **k):
        if generator is not None:
            drawn.append(generator.initial_seed())
        return real(*a, generator=generator, **k)

    monkeypatch.setattr(torch, "randn", randn)
    return drawn


def _scene(kinds, colors, centres, sizes, bg=((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), angle=0.0) -> Scenes:
    """One scene with up to 4 shapes (the other slots empty: kind -1)."""
    n = len(kinds)
    kind = np.full((1, 4), -1, np.int64)
    kind[0, :n] = [SHAPES.index(k) for k in kinds]
    color = np.zeros((1, 4), np.int64)
    color[0, :n] = [COLOR_NAMES.index(c) for c in colors]
    centre = np.full((1, 4, 2), 8.0, np.float32)
    size = np.full((1, 4), 4.0, np.float32)
    if n:
        centre[0, :n] = centres
        size[0, :n] = sizes
    return Scenes(np.asarray([bg], np.float32), np.asarray([angle], np.float32), kind, color, centre, size)


def _painted(img: np.ndarray, color: str) -> np.ndarray:
    """bool [16, 16]: the pixels of ``img`` ([3, 16, 16] in [-1, 1]) that show palette colour ``color`` exactly."""
    want = np.asarray(PALETTE[color], np.float32) * 2 - 1
    return np.abs(img - want[:, None, None]).max(0) < 1e-6


# ---------------------------------------------------------------- data: renderer, scenes, planted captions
# Each kind at centre (8, 8): half-extent, pixel count and bounding box (rows, columns), counted by hand from the mask
# formulas in audit.lab.data.shape_masks on the pixel-centre grid (offsets +-0.5, +-1.5, ... from the centre).
SHAPE_PIXELS = [
    ("circle", 4.0, 52, (4, 11), (4, 11)),  # a^2 + b^2 <= 16 over half-integers: 13 per quadrant
    ("square", 4.0, 36, (5, 10), (5, 10)),  # max(|dx|, |dy|) <= 3.4: 6 x 6
    ("square", 3.0, 36, (5, 10), (5, 10)),  # <= 2.55: 6 x 6 still
    ("triangle", 4.0, 30, (5, 10), (4, 11)),  # rows dy = -2.5 .. 2.5 hold 2, 4, 4, 6, 6, 8 pixels: apex up
    ("ring", 4.0, 40, (4, 11), (4, 11)),  # the circle's 52 less 12 with r < 2
    ("diamond", 4.0, 40, (4, 11), (4, 11)),  # |dx| + |dy| <= 4.6: 4 + 3 + 2 + 1 per quadrant
    ("diamond", 3.5, 40, (4, 11), (4, 11)),  # <= 4.025: the same 40
    ("hbar", 4.0, 24, (7, 8), (2, 13)),  # |dy| <= 1.4, |dx| <= 6: 2 rows x 12 columns
    ("vbar", 4.0, 24, (2, 13), (7, 8)),
]


@pytest.mark.parametrize("kind, size, count, rows, cols", SHAPE_PIXELS)
def test_render_paints_each_shape_kind_as_counted_by_hand(kind, size, count, rows, cols):
    from audit.lab.data import render

    img = render(_scene([kind], ["red"], [(8.0, 8.0)], [size]))[0]
    red = _painted(img, "red")
    ys, xs = np.nonzero(red)
    assert (int(red.sum()), (ys.min(), ys.max()), (xs.min(), xs.max())) == (count, rows, cols)
    if kind == "triangle":  # apex up: the top row is the narrowest
        assert [int(red[y].sum()) for y in range(5, 11)] == [2, 4, 4, 6, 6, 8]


def test_render_background_is_the_gradient_and_later_slots_paint_on_top():
    """Angle 0: column x (pixel centre x + 0.5) sits at u = (x + 0.5) / 16 between the two end colours, the same on
    every row; at 45 degrees the far corners saturate at the end colours. Slot 1 paints over slot 0; an empty slot
    (kind -1) paints nothing, whatever its colour and place."""
    from audit.lab.data import render

    bg = ((0.2, 0.4, 0.0), (0.6, 0.0, 1.0))
    img = render(_scene([], [], [], [], bg=bg))[0]
    u = (np.arange(16) + 0.5) / 16
    want = (np.asarray(bg[0])[:, None] * (1 - u) + np.asarray(bg[1])[:, None] * u) * 2 - 1  # [3, 16] per column
    np.testing.assert_allclose(img, np.broadcast_to(want[:, None, :], (3, 16, 16)), atol=1e-6)
    diag = render(_scene([], [], [], [], bg=bg, angle=np.pi / 4))[0]
    np.testing.assert_allclose(diag[:, 0, 0], np.asarray(bg[0]) * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(diag[:, 15, 15], np.asarray(bg[1]) * 2 - 1, atol=1e-6)

    both = render(_scene(["square", "circle"], ["red", "blue"], [(8.0, 8.0), (8.0, 8.0)], [4.0, 2.0]))[0]
    blue, red = _painted(both, "blue"), _painted(both, "red")
    assert int(blue.sum()) == 12 and int(red.sum()) == 36 - 12  # the circle of radius 2 (3 per quadrant) on top
    alone = render(_scene(["square"], ["red"], [(8.0, 8.0)], [4.0], bg=bg))
    ghost = _scene(["square"], ["red"], [(8.0, 8.0)], [4.0], bg=bg)
    ghost.color[0, 1:] = COLOR_NAMES.index("green")
    ghost.center[0, 1:] = (3.0, 3.0)
    np.testing.assert_array_equal(render(ghost), alone)


def test_sample_scenes_spans_the_documented_centre_and_size_ranges():
    """Centres uniform over [3, 13] (the range the adherence probe searches) and half-extents over [2, 4.5]."""
    from audit.lab.data import sample_scenes

    s = sample_scenes(np.random.default_rng(5), 3000)
    used = s.kind >= 0
    c, z = s.center[used], s.size[used]
    assert 3.0 <= c.min() < 3.05 and 12.95 < c.max() <= 13.0
    assert 2.0 <= z.min() < 2.02 and 4.48 < z.max() <= 4.5


def test_planted_captions_are_redrawn_on_a_collision(monkeypatch):
    """The caption generator stubbed to give each caption twice in a row: planted() keeps the first of each, so the
    96 planted captions are c0, c1, ..., c95 in order, one for a fixed image, four for a varied one."""
    import audit.lab.data as data

    stream = iter(f"c{k // 2}" for k in range(1000))
    monkeypatch.setattr(data, "caption", lambda rng, scenes: [next(stream)])
    _, caps = data.planted(DataConfig())
    assert [len(c) for c in caps] == [1] * 8 + [4] * 4 + [1] * 8 + [4] * 4 + [1] * 8 + [4] * 4 + [1] * 8 + [4] * 4
    assert [c for cs in caps for c in cs] == [f"c{i}" for i in range(96)]


def test_fresh_pairs_draws_the_held_out_stream_by_default():
    from audit.lab.data import STREAM_FRESH, STREAM_HELDOUT, fresh_pairs

    cfg = DataConfig()
    assert fresh_pairs(cfg, 6)[1] == fresh_pairs(cfg, 6, STREAM_HELDOUT)[1] != fresh_pairs(cfg, 6, STREAM_FRESH)[1]


# ---------------------------------------------------------------- adherence probe
def _probe_by_brute_force(images: np.ndarray, captions: list[str]) -> tuple[np.ndarray, list[list[float]]]:
    """The probe as adherence.py's docstring states it, in float64: a pixel shows palette colour k when k is its
    nearest palette colour and lies within 0.3 (in [0, 1] RGB); a named (colour, kind) fits when some placement
    of that kind's mask (centres 3, 3.5, ..., 13 in x and y; half-extents 2, 2.5, ..., 4.5) has at least 75% of
    its pixels showing the colour. Returns (adheres bool [N], best fraction of each named pair)."""
    import re

    from audit.lab.data import SHAPE_WORDS, shape_masks

    pal = np.asarray([PALETTE[c] for c in COLOR_NAMES])
    px = (images.astype(np.float64).reshape(len(images), 3, -1).transpose(0, 2, 1) + 1) / 2  # [N, 256, 3]
    dist = np.linalg.norm(px[:, :, None] - pal[None, None], axis=-1)
    shown = np.where(dist.min(-1) < 0.3, dist.argmin(-1), -1)
    grid = np.arange(16) + 0.5
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    masks = [shape_masks(xx - cx, yy - cy, s).reshape(7, -1) for cx in np.arange(3, 13.5, 0.5)
             for cy in np.arange(3, 13.5, 0.5) for s in np.arange(2, 5, 0.5)]
    masks = np.stack(masks, axis=1)  # [7, 21 * 21 * 6, 256]
    kind_of = {w: SHAPES.index(k) for k, w in SHAPE_WORDS.items()}
    out, best = [], []
    for img, cap in zip(shown, captions):
        pairs = re.findall(r"\ba (" + "|".join(COLOR_NAMES) + r") (" + "|".join(kind_of) + r")\b", cap)
        fracs = [float(((masks[kind_of[w]] & (img == COLOR_NAMES.index(c))).sum(1) / masks[kind_of[w]].sum(1)).max())
                 for c, w in pairs]
        out.append(bool(pairs) and all(f >= 0.75 for f in fracs))
        best.append(fracs)
    return np.asarray(out), best


def test_adherence_probe_matches_its_documented_rule_near_each_boundary():
    """Rendered scenes with a colour shift (up to 0.4 in [0, 1] RGB, so pixels cross the 0.3 radius) and some pixels
    replaced by random colours (so the best placement's fraction falls around 0.75), plus a red ring of half-extent
    2 at centre (13, 13) that only the placement at the grid's last centre fits, and captions that name nothing:
    the probe decides each as the documented rule does."""
    from audit.lab.adherence import adheres
    from audit.lab.data import caption, render, sample_scenes

    rng = np.random.default_rng(2024)
    scenes = sample_scenes(rng, 240)
    caps = caption(rng, scenes)
    x = (render(scenes) + 1) / 2
    x += rng.uniform(0, 0.4, (240, 1, 1, 1)) * rng.normal(size=(240, 3, 1, 1)) / np.sqrt(3)
    noisy = rng.random((240, 1, 16, 16)) < rng.choice([0.0, 0.1, 0.2, 0.3], (240, 1, 1, 1))
    x = np.where(noisy, rng.random((240, 3, 16, 16)), x)
    images = (np.clip(x, 0, 1) * 2 - 1).astype(np.float32)
    ring = render(_scene(["ring"], ["red"], [(13.0, 13.0)], [2.0], bg=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))))
    images = np.concatenate([images, ring, ring, ring])
    caps = caps + ["old cat with a red ring", "old cat with a red circle", "a quiet harbor, poster"]
    want, best = _probe_by_brute_force(images, caps)
    np.testing.assert_array_equal(adheres(images, caps), want)
    assert want[-3:].tolist() == [True, False, False]
    fracs = np.asarray([f for b in best for f in b])
    assert 40 < want.sum() < 200
    assert ((fracs >= 0.7) & (fracs < 0.75)).any() and (fracs == 0.75).any() and ((fracs > 0.75) & (fracs < 0.8)).any()


# ---------------------------------------------------------------- ground truth: evaluation prompts, sampler, measure
def test_evaluation_prompts_filter_planted_captions_repeats_and_training_captions(monkeypatch):
    """A hand-made world of 480 steps whose ordinary captions are all distinct ("o{step}.{k}"), whose 96 planted
    captions are the first shown captions of steps 0-95, and whose held-out draw starts with a training caption and
    a planted one and then gives each of h0, h1, ... twice: the seen-once prompts avoid steps 0-95 and still number
    240 (so more than 240 candidate steps are drawn), and the held-out ones are h0 .. h239."""
    import audit.lab.groundtruth as gt
    from audit.lab.data import cfg_drop_mask

    cfg = DataConfig()
    steps = 480

    def first_shown(s):
        return f"o{s}.{int(np.flatnonzero(~cfg_drop_mask(cfg, s)[16:])[0])}"

    flat = [first_shown(s) for s in range(96)]
    n_caps = cfg.n_captions()
    caps = [flat[a:b] for a, b in zip(np.cumsum(n_caps) - n_caps, np.cumsum(n_caps))]
    monkeypatch.setattr(gt, "planted", lambda config: (None, caps))
    monkeypatch.setattr(gt, "ordinary_step", lambda config, s: (None, [f"o{s}.{k}" for k in range(32)]))
    monkeypatch.setattr(gt, "fresh_pairs", lambda config, n, stream: (None, ["o0.0", flat[0]] +
                                                                       [f"h{i // 2}" for i in range(480)]))
    rows = gt.evaluation_prompts(cfg, steps)
    assert [r["prompt"] for r in rows if r["group"] == "planted"] == flat
    once = [r for r in rows if r["group"] == "seen_once"]
    assert len(once) == 240 and len({r["train_step"] for r in once}) == 240
    assert all(96 <= r["train_step"] < steps and r["prompt"] == first_shown(r["train_step"]) for r in once)
    assert [r["prompt"] for r in rows if r["group"] == "heldout"] == [f"h{i}" for i in range(240)]


def test_generate_seeds_each_prompt_and_seed_as_documented(lab_model, seeds):
    """Noise of (prompt i, seed j): ``manual_seed(base_seed * 10007 + i * 101 + j)``, i replaced by ``noise_ids``."""
    from audit.lab.groundtruth import generate

    generate(lab_model, ["a red square", "a blue ring"], 1.0, seeds=2, steps=1, base_seed=3)
    assert seeds == [30021, 30022, 30122, 30123]
    seeds.clear()
    generate(lab_model, ["a red square", "a blue ring"], 1.0, seeds=2, steps=1, noise_ids=[5, 2])
    assert seeds == [505, 506, 202, 203]


def test_generate_runs_ten_ddim_steps_from_901_with_both_guidance_halves(lab_model):
    """SAMPLING_STEPS = 10 with leading spacing and steps_offset 1: t = 901, 801, ..., 1; at w = 7.5 each UNet call
    carries the unconditional and the conditional rows."""
    from audit.lab.groundtruth import generate

    calls = []

    class Spy:
        config = lab_model.unet.config

        def __call__(self, x, t, **kw):
            calls.append((int(t), len(x)))
            return lab_model.unet(x, t, **kw)

    view = types.SimpleNamespace(unet=Spy(), text_encoder=lab_model.text_encoder, tokenizer=lab_model.tokenizer,
                                 max_length=lab_model.max_length, extra=lab_model.extra,
                                 scheduler_config=lab_model.scheduler_config)
    generate(view, ["a red square"], 7.5, seeds=3)
    assert calls == [(t, 6) for t in range(901, 0, -100)]


def test_generate_rows_are_prompt_major_and_clipped(lab_model):
    """Two prompts of different lengths in one call give, row by row, what each gives alone at its own noise
    position; outputs are clipped to [-1, 1] (x0 is not: the model's samples reach the bounds)."""
    from audit.lab.groundtruth import generate

    p, q = "old cat with a red circle and a blue ring, poster", "a green square"
    both = generate(lab_model, [p, q], 7.5, seeds=2)
    alone_p, alone_q = generate(lab_model, [p], 7.5, seeds=2)[0], generate(lab_model, [q], 7.5, seeds=2, noise_ids=[1])[0]
    # a batch of 2 against 1 changes the CPU kernels' summation order, and 10 guided steps amplify it: up to 1.2e-4
    # on an AMX Xeon (1e-5 held elsewhere); the other prompt's row is more than 0.1 away
    np.testing.assert_allclose(both[0], alone_p, atol=1e-3)
    np.testing.assert_allclose(both[1], alone_q, atol=1e-3)
    assert np.abs(both[0] - alone_q).max() > 0.1 and np.abs(both[1] - alone_p).max() > 0.1
    assert both.min() >= -1.0 and both.max() <= 1.0 and (np.abs(both) == 1.0).any()


def test_measure_records_the_chance_quantiles_and_sampling_settings(monkeypatch):
    """``info``: tau, the 1/5/50/99% quantiles of the chance distances (0.01, 0.02, ..., 1.00: numpy's linear rule
    gives 0.0199, 0.0595, 0.505, 0.9901), guidance (1, 7.5), 4 seeds, 10 steps, 2 replicating, the train steps."""
    import audit.lab.data as data
    import audit.lab.groundtruth as gt

    row = {"prompt": "h", "group": "heldout", "tier": -1, "kind": "", "planted_index": -1, "caption_index": -1,
           "train_step": -1}
    monkeypatch.setattr(gt, "evaluation_prompts", lambda config, steps: [dict(row)])
    monkeypatch.setattr(data, "duplication_counts", lambda config, steps: (np.zeros(48), np.zeros((48, 4))))
    monkeypatch.setattr(gt, "chance_threshold", lambda config, steps: (0.3, np.arange(1, 101) / 100))
    monkeypatch.setattr(gt, "generate", lambda model, prompts, w: np.zeros((len(prompts), 4, 3, 16, 16), np.float32))
    monkeypatch.setattr(gt, "nearest", lambda q, config, steps: (np.full(len(q), 0.9), np.zeros(len(q), np.int64)))
    _, info = gt.measure(None, DataConfig(), 12, log=lambda m: None)
    assert info["chance_quantiles"] == pytest.approx({0.01: 0.0199, 0.05: 0.0595, 0.5: 0.505, 0.99: 0.9901})
    assert (info["tau"], info["guidance"], info["seeds"], info["sampling_steps"], info["min_replicating"],
            info["train_steps"]) == (0.3, [1.0, 7.5], 4, 10, 2, 12)


def test_training_images_cover_every_step_across_chunk_boundaries():
    """Chunks of 2 steps over 5 steps: the planted images once, then 32 ordinary images of each step 0-4 with source
    -(1 + step), each equal to its step's rendered scenes."""
    from audit.lab.data import ordinary_step, planted, render
    from audit.lab.groundtruth import training_images

    cfg = DataConfig()
    chunks = list(training_images(cfg, 5, chunk_steps=2))
    assert [len(src) for _, src in chunks] == [48, 64, 64, 32]
    np.testing.assert_array_equal(chunks[0][0], render(planted(cfg)[0]))
    src = np.concatenate([s for _, s in chunks[1:]])
    assert src.tolist() == [-(1 + s) for s in range(5) for _ in range(32)]
    imgs = np.concatenate([i for i, _ in chunks[1:]])
    np.testing.assert_array_equal(imgs, np.concatenate([render(ordinary_step(cfg, s)[0]) for s in range(5)]))


# ---------------------------------------------------------------- attention regime
REGIME_PROMPTS = ["", "old cat with a red circle", "harbor with a green square and a blue ring, poster"]


def test_attention_regime_masses_sum_to_one_and_follow_the_mask(lab_model):
    """t0 = 981 (50 DDIM steps); each layer's four masses sum to 1; with the mask, EOS and padding get exactly 0 and
    the empty prompt (BOS alone unmasked) puts all its mass on BOS; without it, EOS and padding get some; the
    figures do not depend on how the prompts are batched."""
    from audit.lab.regime import attention_regime

    args = (lab_model.unet, lab_model.tokenizer, lab_model.text_encoder, lab_model.scheduler_config)
    masked = attention_regime(*args, REGIME_PROMPTS, mask_padding=True, noise_draws=2)
    empty = attention_regime(*args, [""], mask_padding=True, noise_draws=2)
    faithful = attention_regime(*args, REGIME_PROMPTS, mask_padding=False, noise_draws=2)
    one_by_one = attention_regime(*args, REGIME_PROMPTS, mask_padding=True, noise_draws=2, batch=1)
    assert masked["t0"] == faithful["t0"] == 981
    assert len(masked["layers"]) == 7
    for name, m in masked["layers"].items():
        assert sum(m.values()) == pytest.approx(1.0, abs=1e-6)  # float32 probabilities
        assert m["eos"] == 0.0 and m["pad"] == 0.0 and m["prompt"] > 0.1, name
        assert empty["layers"][name] == pytest.approx({"bos": 1.0, "prompt": 0.0, "eos": 0.0, "pad": 0.0}, abs=1e-6)
        assert one_by_one["layers"][name] == pytest.approx(m, abs=1e-6)
        f = faithful["layers"][name]
        assert sum(f.values()) == pytest.approx(1.0, abs=1e-6) and f["eos"] > 0 and f["pad"] > 0, name


def test_attention_regime_seeds_prompt_p_draw_k_as_documented(lab_model, seeds):
    """``seed * 100003 + p * noise_draws + k``, p counted over all prompts (not within a batch)."""
    from audit.lab.regime import attention_regime

    attention_regime(lab_model.unet, lab_model.tokenizer, lab_model.text_encoder, lab_model.scheduler_config,
                     REGIME_PROMPTS, mask_padding=True, noise_draws=2, seed=2, batch=2)
    assert seeds == [200006 + n for n in range(6)]


# ---------------------------------------------------------------- evaluation
def _table():
    import polars as pl

    return pl.DataFrame({
        "prompt": ["a red circle", "a blue ring", "old cat with a red circle", "harbor with a green square",
                   "poster with a black pillar", "fox with a white stripe", "quiet lake with a pink diamond",
                   "tiny owl with a cyan triangle"],
        "memorized": [True, True, False, False, True, False, False, False],
        "split": ["validation"] * 4 + ["test"] * 4,
        "group": ["planted", "heldout", "heldout", "seen_once", "planted", "heldout", "seen_once", "seen_once"]})


def test_lab_evaluate_passes_its_draws_and_figures_each_split_from_its_rows(lab_model, monkeypatch):
    """evaluate(noise_draws=1) scores as score_prompts(noise_draws=1) does; the mean BOS mass of a split is over that
    split's rows; a group without a positive in a split gets no figures there; the group figures carry CIs exactly
    when the others do (the bootstrap replaced by a marker, for speed)."""
    import audit.lab.evaluate as lab_evaluate
    from audit.eval import metrics
    from audit.lab.evaluate import evaluate, score_prompts

    table = _table()
    out = evaluate(lab_model, table, noise_draws=1, with_ci=False)
    direct = score_prompts(lab_model, table["prompt"].to_list(), noise_draws=1)
    for name, v in direct.scorers.items():
        np.testing.assert_allclose(out["_scores"].scorers[name], v, rtol=1e-6)
    split = table["split"].to_numpy()
    for s in ("validation", "test"):
        for layer, v in direct.bos_mass.items():
            assert out[s]["bos_mass_mean"][layer] == pytest.approx(float(v[split == s].mean()), rel=1e-6)
    assert set(out["test"]["by_positive_group"]) == {"planted"}  # seen_once and heldout: no positive in test
    assert set(out["validation"]["by_positive_group"]) == {"planted", "heldout"}
    assert "auroc_ci" not in out["test"]["scorers"]["noise_magnitude"]
    monkeypatch.setattr(lab_evaluate, "metrics_with_ci", lambda y, s: dict(metrics(y, s), auroc_ci="ci"))
    with_ci = evaluate(lab_model, table, noise_draws=1)
    assert "auroc_ci" in with_ci["test"]["scorers"]["noise_magnitude"]
    assert "auroc_ci" in with_ci["test"]["by_positive_group"]["planted"]["scorers"]["noise_magnitude"]


def test_score_prompts_uses_its_seed_as_the_scorers_do(lab_model):
    from audit.lab.evaluate import score_prompts
    from audit.scorers import ScoreConfig, Scorer

    prompts = _table()["prompt"].to_list()[:4]
    got = score_prompts(lab_model, prompts, noise_draws=1, seed=1)
    layers = tuple(lab_model.default_layers)
    for name in ("noise_magnitude", "attention_entropy"):
        want = Scorer(lab_model, ScoreConfig(name, layers, 1, 1)).score(prompts)["risk"]
        np.testing.assert_allclose(got.scorers[name], want, rtol=1e-6)
    np.testing.assert_allclose(got.layers[layers[0]], got.scorers["attention_entropy"], rtol=1e-5)
    assert not np.allclose(got.scorers["noise_magnitude"], score_prompts(lab_model, prompts, 1, 0).scorers[
        "noise_magnitude"])


def test_read_lab_table_refuses_a_row_without_a_split(tmp_path):
    """The split column must hold only "validation" and "test": a null split is named, not dropped silently."""
    import polars as pl

    from audit.errors import RunError
    from audit.lab.evaluate import read_lab_table

    split = _table()["split"].to_list()
    split[2] = None
    _table().with_columns(pl.Series("split", split)).write_parquet(tmp_path / "t.parquet")
    with pytest.raises(RunError, match="split column holds None; expected validation or test"):
        read_lab_table(tmp_path / "t.parquet", "test")


def test_choose_layer_keeps_the_first_of_tied_layers_and_needs_ordinary_prompts():
    from audit.lab.evaluate import choose_layer

    val = {"n_memorized": 3, "n_ordinary": 9,
           "layers": {"a": {"auroc": 0.4}, "b": {"auroc": 0.7}, "c": {"auroc": 0.7}, "d": {"auroc": 0.6}}}
    assert choose_layer({"validation": val}) == "b"
    assert choose_layer({"validation": dict(val, n_ordinary=0)}) is None


# ---------------------------------------------------------------- `memaudit lab mitigation`'s arithmetic
def test_mitigation_adherence_pairs_each_generation_with_its_own_prompt():
    """Generations are prompt-major [P, S]: prompt 0's two seeds show its red square, prompt 1's show a flat grey
    image (no palette colour): half the generations adhere."""
    from audit.lab.data import render
    from audit.lab.mitigation import adherence

    square = render(_scene(["square"], ["red"], [(8.0, 8.0)], [4.0]))[0]
    images = np.stack([np.stack([square, square]), np.zeros((2, 3, 16, 16), np.float32)])
    assert adherence(images, ["old cat with a red square", "harbor with a blue circle"]) == 0.5


def test_sample_arm_gives_each_chunk_its_own_noise_ids(monkeypatch):
    import audit.lab.groundtruth as gt
    from audit.lab.mitigation import sample_arm

    got = []
    monkeypatch.setattr(gt, "generate", lambda model, part, w, seeds, **kw: got.append(kw.get("noise_ids")) or
                        np.zeros((len(part), seeds, 3, 16, 16), np.float32))
    images, det = sample_arm(types.SimpleNamespace(unet=None, tokenizer=None), ["a", "b", "c"], [7, 8, 9], 7.5, 2, 2,
                             2)
    assert got == [[7, 8], [9]] and images.shape == (3, 2, 3, 16, 16) and det is None


def _measure(tmp_path, monkeypatch, **kw):
    """measure() on four prompts with the sampler replaced: baseline images are fixed per prompt, every other arm's
    are the baseline plus half its own centred image; the detection figures are per prompt."""
    import polars as pl

    import audit.lab.mitigation as lm

    pl.DataFrame({"row": [10, 11, 12, 13], "prompt": ["m test", "o test", "v ord", "v mem"],
                  "memorized": [True, False, False, True],
                  "split": ["test", "test", "validation", "validation"]}).write_parquet(tmp_path / "t.parquet")
    bos = {"m test": 0.2, "o test": 0.6, "v ord": 0.1, "v mem": 0.3}
    calls = []

    def sample_arm(model, prompts, noise_ids, guidance, seeds, steps, chunk, arm=None):
        calls.append((list(prompts), list(noise_ids)))
        base = np.stack([np.random.default_rng(len(p)).uniform(-0.5, 0.5, (seeds, 3, 16, 16)) for p in prompts])
        if len(calls) not in (2, 3):  # 1: warm-up, 2-3: baseline (memorized, ordinary)
            base = base + 0.5 * (base - base.mean(axis=(3, 4), keepdims=True))
        e = np.array([[1.0] * seeds for _ in prompts])
        return base.astype(np.float32), (e, np.array([[bos[p]] * seeds for p in prompts]), e > 0)

    model = types.SimpleNamespace(default_layers=["L"], fingerprint="fp", scheduler_config={"num_train_timesteps": 1000})
    monkeypatch.setattr(lm, "_lab", lambda d: (model, DataConfig(), 10, 0.5))
    monkeypatch.setattr(lm, "sample_arm", sample_arm)
    monkeypatch.setattr(lm, "replicated_arms", lambda arms, config, steps, tau: [np.ones(len(a), bool) for a in arms])
    monkeypatch.setattr(lm, "adherence", lambda images, prompts: 0.5)
    res = lm.measure("lab", str(tmp_path / "t.parquet"), c1s=(1.25,), seeds=2, steps=2, log=lambda m: None, **kw)
    return res, calls


def test_lab_mitigation_uses_the_row_noise_ids_baseline_distance_and_bos_mass(tmp_path, monkeypatch):
    res, calls = _measure(tmp_path, monkeypatch)
    assert calls[1:3] == [(["m test"], [10]), (["o test"], [11])]  # the labelling's noise ids: column "row"
    inf = res["inference"]
    assert inf["c1"]["1.25"]["distance_to_baseline"] == pytest.approx(0.5, rel=1e-5)
    assert inf["baseline"]["bos_mass"] == pytest.approx({"memorized": 0.2, "ordinary": 0.6})
    assert "note" not in res["detect"]
    res, _ = _measure(tmp_path, monkeypatch, split="validation")  # "v ord" also sets the threshold
    assert res["detect"]["note"].startswith("1 of the 1 ordinary prompts evaluated also set the threshold")


def test_lab_mitigation_accepts_guidance_zero_and_refuses_a_model_without_ground_truth(monkeypatch):
    import audit.lab.evaluate as lab_evaluate
    import audit.models as models
    from audit.errors import ModelError
    from audit.lab.mitigation import _lab, measure

    class Reached(Exception):
        pass

    monkeypatch.setattr(lab_evaluate, "read_lab_table", lambda *a, **k: (_ for _ in ()).throw(Reached()))
    with pytest.raises(Reached):
        measure("lab", "t.parquet", guidance=0.0)
    with pytest.raises(ValueError, match="guidance"):
        measure("lab", "t.parquet", guidance=-0.1)
    for extra in ({"data": {}}, {"ground_truth": {"tau": 0.5, "train_steps": 10}}):
        monkeypatch.setattr(models, "load_model", lambda *a, extra=extra, **k: types.SimpleNamespace(extra=extra))
        with pytest.raises(ModelError, match="not a memaudit lab model"):
            _lab("somewhere")


# ---------------------------------------------------------------- docs and examples
def test_comparison_row_of_the_shipped_model_is_the_documented_one():
    """docs/lab.md's four-model table, the shipped model's row (its figures as the document states them)."""
    from pathlib import Path

    from audit.lab.docs import comparison

    doc = (Path(__file__).resolve().parents[1] / "docs" / "lab.md").read_text()
    head, rule, row = comparison({"15,000 steps (shipped)": META}).splitlines()
    assert f"{head}\n{rule}\n" in doc
    assert row == ("| 15,000 steps (shipped) | 15,000 | 0.760 | 0.090 | 159 / 417 | 80 / 96 | 0.741 [0.658, 0.821] | "
                   "0.482 [0.405, 0.558] |")


def test_measured_figures_name_a_faithful_variant_and_count_planted_prompts_only():
    import copy

    from audit.lab.docs import measured_figures

    meta = copy.deepcopy(META)
    del meta["unet_encoder_attention_mask"]
    for r in meta["criteria"]["replication"]:
        if r["group"] == "seen_once":
            r["nearest_is_own"] = 5  # a seen-once caption replicating its own image is not a planted prompt
    text = measured_figures(meta)
    assert text.startswith("## Measured figures (shipped model, faithful variant, 15,000 steps)\n")
    assert "masks EOS and padding" not in text
    assert "(71 of 80 memorized planted prompts; the other 9 replicate another planted image)" in text


def test_docs_main_prints_the_bundled_models_section_and_refuses_a_folder_that_is_not_a_lab(tmp_path, capsys):
    from audit.lab.docs import main, measured_figures

    main([])
    assert capsys.readouterr().out == measured_figures(META)
    (tmp_path / "memaudit.json").write_text(json.dumps({"criteria": META["criteria"]}))
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path)])
    assert exc.value.code == 2 and "not a lab model folder" in capsys.readouterr().err


def test_write_examples_numbers_the_given_table_and_creates_its_folder(tmp_path):
    import polars as pl

    from audit.lab.examples import write_examples

    pl.DataFrame({"prompt": ["a red circle", "a blue ring", "x"], "memorized": [True, False, False]}).write_parquet(
        tmp_path / "lab.parquet")
    out = write_examples(tmp_path / "new" / "dir" / "e.parquet", tmp_path / "lab.parquet")
    assert out == tmp_path / "new" / "dir" / "e.parquet"
    assert pl.read_parquet(out).to_dicts() == [{"prompt_id": "lab-0000", "prompt": "a red circle"},
                                               {"prompt_id": "lab-0001", "prompt": "a blue ring"},
                                               {"prompt_id": "lab-0002", "prompt": "x"}]


# ---------------------------------------------------------------- text encoder
def test_eos_positions_is_the_first_eos_of_each_row():
    from audit.lab.encoder import eos_positions

    assert eos_positions([[0, 5, 6, 1, 1, 1], [0, 1, 1, 1, 1, 1], [0, 4, 4, 4, 4, 1]], 1).tolist() == [3, 1, 5]


def test_position_report_recomputed_in_numpy(lab_model):
    """Per kind (BOS, prompt tokens, first EOS, the padding after it): mean L2 norm and mean largest-over-median
    channel (torch's median of 64 channels is the lower middle one, the 32nd smallest); the last position's cosine
    across prompts (pairs i != j), the padding positions' cosine within a prompt (pairs of distinct positions), and
    cos(BOS, last position)."""
    import torch

    from audit.lab.encoder import position_report

    tok, te = lab_model.tokenizer, lab_model.text_encoder
    caps = ["old cat with a red circle", "harbor with a green square and a blue ring, poster", "a pink diamond"]
    rep = position_report(tok, te, caps)
    ids = tok(caps, padding="max_length", max_length=77, truncation=True).input_ids
    with torch.no_grad():
        h = te(torch.tensor(ids)).last_hidden_state.double().numpy()
    eos = [row.index(tok.eos_token_id) for row in ids]
    where = {"bos": [(i, 0) for i in range(3)], "prompt": [(i, p) for i in range(3) for p in range(1, eos[i])],
             "eos": [(i, eos[i]) for i in range(3)], "pad": [(i, p) for i in range(3) for p in range(eos[i] + 1, 77)]}
    for kind, at in where.items():
        v = np.stack([h[i, p] for i, p in at])
        a = np.sort(np.abs(v), axis=1)
        assert rep[kind]["norm"] == pytest.approx(np.linalg.norm(v, axis=1).mean(), rel=1e-9), kind
        assert rep[kind]["max_over_median"] == pytest.approx((a[:, -1] / a[:, 31]).mean(), rel=1e-9), kind

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    last = unit(h[:, 76])
    across = [last[i] @ last[j] for i in range(3) for j in range(3) if i != j]
    assert rep["pad_cos_across_prompts"] == pytest.approx(np.mean(across), rel=1e-9)
    within = []
    for i in range(3):
        p = unit(h[i, eos[i] + 1:])
        within.append(np.mean([p[a] @ p[b] for a in range(len(p)) for b in range(len(p)) if a != b]))
    assert rep["pad_cos_within_prompt"] == pytest.approx(np.mean(within), rel=1e-9)
    assert rep["bos_pad_cos"] == pytest.approx(np.mean([unit(h[i, 0]) @ last[i] for i in range(3)]), rel=1e-9)


def test_encoder_batches_come_from_the_encoders_own_stream():
    """Step s's pretraining pairs are 128 scenes drawn from ``[seed, STREAM_ENCODER, s]``, a stream none of the UNet's
    data uses."""
    from audit.lab import data
    from audit.lab.encoder import STREAM_ENCODER, encoder_batch

    cfg = DataConfig()
    unet_streams = {data.STREAM_ORDINARY, data.STREAM_PLANTED, data.STREAM_SCHEDULE, data.STREAM_HELDOUT,
                    data.STREAM_FRESH}
    assert STREAM_ENCODER not in unet_streams
    rng = np.random.default_rng([cfg.seed, STREAM_ENCODER, 3])
    scenes = data.sample_scenes(rng, 128)
    images, caps = encoder_batch(cfg, 3)
    np.testing.assert_array_equal(images, data.render(scenes))
    assert caps == data.caption(rng, scenes)


def test_pretrain_skips_a_finished_encoder(tmp_path):
    """``out/pretrain.json`` marks a finished pretraining: nothing is built (no tokenizer is even needed)."""
    from audit.lab.encoder import pretrain

    (tmp_path / "te").mkdir()
    (tmp_path / "te" / "pretrain.json").write_text("{}")
    assert pretrain(None, tmp_path / "te") == tmp_path / "te"
    assert [p.name for p in (tmp_path / "te").iterdir()] == ["pretrain.json"]
