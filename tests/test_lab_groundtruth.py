"""The lab's ground truth as rebuilt by its code: the nearest-training-image search, the chance threshold,
the evaluation prompts and the labelling rule of ``measure``, against values derived by hand or by a brute-force
computation. CPU only, a few seconds."""

from __future__ import annotations

import numpy as np

from audit.lab.data import (STREAM_FRESH, STREAM_HELDOUT, STREAM_ORDINARY, STREAM_SCHEDULE, DataConfig, planted,
                            render, sample_scenes)


def _training_set(cfg: DataConfig, steps: int):
    """The training images re-drawn here from the data seeds, with their documented sources (planted index, or
    -(1 + step) for an ordinary image of that step)."""
    imgs = [render(planted(cfg)[0])]
    src = [np.arange(cfg.n_planted)]
    for s in range(steps):
        rng = np.random.default_rng([cfg.seed, STREAM_ORDINARY, s])
        imgs.append(render(sample_scenes(rng, cfg.batch_size - cfg.planted_per_batch)))
        src.append(np.full(cfg.batch_size - cfg.planted_per_batch, -(1 + s)))
    return np.concatenate(imgs).astype(np.float64), np.concatenate(src)


def _brute_nearest(queries: np.ndarray, train: np.ndarray):
    """||qc - tc|| / ||tc|| with each image's per-channel mean removed (docs/lab.md), least over the training set."""
    qc = (queries - queries.mean(axis=(2, 3), keepdims=True)).reshape(len(queries), -1)
    tc = (train - train.mean(axis=(2, 3), keepdims=True)).reshape(len(train), -1)
    d = np.linalg.norm(qc[:, None] - tc[None], axis=-1) / np.linalg.norm(tc, axis=-1)[None]
    return d.min(1), d.argmin(1)


def test_nearest_finds_each_training_image_with_its_source_and_ignores_colour_offsets():
    from audit.lab.groundtruth import nearest

    cfg = DataConfig()
    steps = 3
    train, src = _training_set(cfg, steps)
    p_imgs = render(planted(cfg)[0])
    step2 = render(sample_scenes(np.random.default_rng([cfg.seed, STREAM_ORDINARY, 2]), 32))
    step0 = render(sample_scenes(np.random.default_rng([cfg.seed, STREAM_ORDINARY, 0]), 32))
    shifted = p_imgs[7].copy()
    shifted[0] += 0.25  # a per-channel colour offset costs nothing
    shifted[2] -= 0.1
    fresh = render(sample_scenes(np.random.default_rng(123), 5))
    queries = np.stack([p_imgs[5], shifted, step2[4], step0[31], *fresh])
    d, s = nearest(queries, cfg, steps)
    assert np.allclose(d[:4], 0.0, atol=1e-6)
    assert s[:4].tolist() == [5, 7, -3, -1]  # planted 5, planted 7, ordinary of step 2, ordinary of step 0
    want_d, want_i = _brute_nearest(fresh.astype(np.float64), train)
    np.testing.assert_allclose(d[4:], want_d, rtol=1e-6, atol=1e-9)
    assert s[4:].tolist() == src[want_i].tolist()
    assert (d[4:] > 0.05).all()  # genuinely new scenes are not copies


def test_chance_threshold_is_the_first_percentile_of_2000_fresh_scenes():
    from audit.lab.groundtruth import chance_threshold

    cfg = DataConfig()
    steps = 2
    train, _ = _training_set(cfg, steps)
    fresh = render(sample_scenes(np.random.default_rng([cfg.seed, STREAM_FRESH]), 2000)).astype(np.float64)
    want = np.concatenate([_brute_nearest(fresh[i:i + 250], train)[0] for i in range(0, 2000, 250)])
    tau, dists = chance_threshold(cfg, steps)
    assert len(dists) == 2000
    np.testing.assert_allclose(np.sort(dists), np.sort(want), rtol=1e-6)
    assert abs(tau - float(np.percentile(want, 1))) < 1e-6


def test_evaluation_prompts_are_what_their_groups_say():
    """Planted rows name their image and caption; each seen-once row is the first caption of its step's ordinary
    pairs that was NOT dropped for guidance, and no other pair of any step, nor a planted image, has it (at 480
    steps 3 of the 240 chosen before that check recurred in other steps); held-out captions were never shown
    in training."""
    from audit.lab.data import fresh_pairs, ordinary_step
    from audit.lab.groundtruth import evaluation_prompts

    cfg = DataConfig()
    steps = 480
    rows = evaluation_prompts(cfg, steps)
    _, p_caps = planted(cfg)
    plant = [r for r in rows if r["group"] == "planted"]
    assert [(r["planted_index"], r["caption_index"]) for r in plant] == [
        (i, j) for i in range(48) for j in range(1 if i % 12 < 8 else 4)]
    assert all(r["prompt"] == p_caps[r["planted_index"]][r["caption_index"]] for r in plant)
    assert [r["tier"] for r in plant] == [r["planted_index"] // 12 for r in plant]
    assert [r["kind"] for r in plant] == ["fixed" if r["planted_index"] % 12 < 8 else "varied" for r in plant]

    once = [r for r in rows if r["group"] == "seen_once"]
    assert len(once) == 240 and len({r["train_step"] for r in once}) == 240
    training = {c for cs in p_caps for c in cs}
    drawn = {}
    for s in range(steps):
        for c in ordinary_step(cfg, s)[1]:
            drawn[c] = drawn.get(c, 0) + 1
    assert not {r["prompt"] for r in once} & training  # planted captions only, so far
    training.update(drawn)
    assert [drawn[r["prompt"]] for r in once] == [1] * 240
    for r in once:
        s = r["train_step"]
        assert 0 <= s < steps
        caps = ordinary_step(cfg, s)[1]
        dropped = np.random.default_rng([cfg.seed, STREAM_SCHEDULE, s]).random(48)[16:] < 0.1
        first_shown = caps[int(np.flatnonzero(~dropped)[0])]
        assert r["prompt"] == first_shown, s

    held = [r for r in rows if r["group"] == "heldout"]
    assert len(held) == 240
    assert not {r["prompt"] for r in held} & training
    _, fresh = fresh_pairs(cfg, 480, STREAM_HELDOUT)
    order = {c: i for i, c in reversed(list(enumerate(fresh)))}
    assert [order[r["prompt"]] for r in held] == sorted(order[r["prompt"]] for r in held)


def test_measure_labels_each_prompt_from_its_seed_distances(monkeypatch):
    """The labelling rule on hand-made distances (tau = 0.5; scales (1, 7.5); 4 seeds): memorized when at some
    scale at least 2 seeds are below tau (strictly); the distance is the least over scales of the 2nd smallest;
    the nearest source is that of the best seed at that scale; duplication from the per-caption counts."""
    import audit.lab.data as data
    import audit.lab.groundtruth as gt

    rows = [
        {"prompt": "p0", "group": "planted", "tier": 0, "kind": "fixed", "planted_index": 0, "caption_index": 0,
         "train_step": -1},
        {"prompt": "p1", "group": "planted", "tier": 0, "kind": "varied", "planted_index": 8, "caption_index": 2,
         "train_step": -1},
        {"prompt": "s5", "group": "seen_once", "tier": -1, "kind": "", "planted_index": -1, "caption_index": -1,
         "train_step": 5},
        {"prompt": "h", "group": "heldout", "tier": -1, "kind": "", "planted_index": -1, "caption_index": -1,
         "train_step": -1},
    ]
    d = np.array([
        [[0.1, 0.9, 0.8, 0.7], [0.3, 0.45, 0.2, 0.9]],  # 1 seed below tau at w=1, 3 at w=7.5
        [[0.5, 0.5, 0.6, 0.7], [0.55, 0.6, 0.5, 0.65]],  # 2nd smallest exactly tau: not memorized
        [[0.2, 0.25, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9]],
        [[0.9, 0.8, 0.95, 0.99], [0.9, 0.9, 0.9, 0.9]],
    ])
    src = np.zeros((4, 2, 4), dtype=np.int64)
    src[0, 1] = [4, 4, 0, 4]  # best seed at w=7.5 is seed 2: its own image
    src[1, 0] = [3, 3, 3, 3]  # another planted image
    src[2, 0] = [-6, -2, -2, -2]  # the ordinary image of step 5, its own
    src[3, 0] = [-2, -9, -2, -2]  # best seed at w=1 is seed 1
    img_counts = np.zeros(48, np.int64)
    cap_counts = np.zeros((48, 4), np.int64)
    img_counts[0], cap_counts[0, 0] = 100, 100
    img_counts[8], cap_counts[8] = 40, [11, 10, 9, 10]
    monkeypatch.setattr(gt, "evaluation_prompts", lambda config, steps: [dict(r) for r in rows])
    monkeypatch.setattr(data, "duplication_counts", lambda config, steps: (img_counts, cap_counts))
    monkeypatch.setattr(gt, "chance_threshold", lambda config, steps: (0.5, np.linspace(0.4, 1.0, 100)))
    monkeypatch.setattr(gt, "generate", lambda model, prompts, w: np.zeros((len(prompts), 4, 3, 16, 16), np.float32))
    monkeypatch.setattr(gt, "nearest", lambda q, config, steps: (d.reshape(-1), src.reshape(-1)))
    out, info = gt.measure(None, DataConfig(), 10, log=lambda m: None)
    assert info["tau"] == 0.5 and info["_images"].shape == (4, 2, 4, 3, 16, 16)
    got = [(r["memorized"], r["distance"], round(r["similarity"], 12), r["rep_w1"], r["rep_w7_5"], r["nearest_source"],
            r["nearest_is_own"], r["duplication"], r["image_duplication"]) for r in out]
    assert got == [
        (True, 0.3, 0.7, 1, 3, 0, True, 100, 100),
        (False, 0.5, 0.5, 0, 0, 3, False, 9, 40),
        (True, 0.25, 0.75, 2, 0, -6, True, 1, 1),
        (False, 0.9, 0.1, 0, 0, -9, False, 0, 0),
    ]


def test_generate_guidance_is_u_plus_w_times_c_minus_u_on_shared_noise(lab_model):
    """``out = u + w (c - u)``: at w = 0 a prompt's sampling is the unconditional one (= the empty prompt sampled
    conditionally at w = 1, same noise); just above w = 1 it is the conditional sampling of w = 1; the noise of
    (prompt i, seed j) is distinct for every (i, j) (seed base * 10007 + i * 101 + j)."""
    from audit.lab.groundtruth import generate

    model = lab_model
    p = "old cat with a red circle and a blue ring"
    kw = dict(seeds=2, steps=3)
    uncond = generate(model, [""], 1.0, **kw)
    at0 = generate(model, [p], 0.0, **kw)
    np.testing.assert_allclose(at0, uncond, atol=1e-5)
    cond = generate(model, [p, p], 1.0, **kw)
    np.testing.assert_allclose(generate(model, [p, p], 1.0 + 1e-6, **kw), cond, atol=1e-4)
    assert np.abs(cond[0] - at0[0]).max() > 1e-2  # the prompt matters
    # the same prompt at another position draws other noise, for every seed
    assert min(np.abs(cond[0, a] - cond[1, b]).max() for a in range(2) for b in range(2)) > 1e-2
    np.testing.assert_allclose(generate(model, [p], 1.0, noise_ids=[1], **kw)[0], cond[1], atol=1e-6)
