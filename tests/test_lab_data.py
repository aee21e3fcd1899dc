"""The lab data as documented (2-4 shapes, captions naming 1-2 of them, 10% of captions dropped for guidance,
exactly the masked ones), and the shipped table's planted and seen-once prompts re-drawn from the data seeds.
CPU only, a few seconds."""

from __future__ import annotations

import numpy as np

from audit.lab import LAB_PROMPTS
from audit.lab.data import DataConfig


def test_shipped_prompts_are_redrawn_from_the_data_seeds():
    """The shipped model's prompts are the data code's: each planted prompt is caption ``caption_index`` of planted
    image ``planted_index``; each seen-once prompt is the first ordinary caption of its step that was not dropped."""
    import polars as pl

    from audit.lab.data import cfg_drop_mask, ordinary_step, planted

    cfg = DataConfig()
    t = pl.read_parquet(LAB_PROMPTS)
    _, caps = planted(cfg)
    p = t.filter(pl.col("group") == "planted")
    assert p["prompt"].to_list() == [caps[i][j] for i, j in zip(p["planted_index"], p["caption_index"])]
    once = t.filter(pl.col("group") == "seen_once").sort("train_step").head(40)
    for prompt, s in zip(once["prompt"], once["train_step"]):
        shown = [c for c, d in zip(ordinary_step(cfg, s)[1], cfg_drop_mask(cfg, s)[16:]) if not d]
        assert prompt == shown[0], s


def test_about_one_caption_in_ten_is_dropped_for_guidance():
    from audit.lab.data import cfg_drop_mask

    cfg = DataConfig()
    drop = np.concatenate([cfg_drop_mask(cfg, s) for s in range(500)])
    assert drop.shape == (500 * 48,)
    assert 0.09 < drop.mean() < 0.11  # cfg_drop = 0.1; 24,000 draws: sd 0.002


def test_training_batch_empties_exactly_the_dropped_captions():
    from audit.lab.data import cfg_drop_mask, ordinary_step, planted, planted_step, training_batch

    cfg = DataConfig()
    _, p_caps = planted(cfg)
    for step in (0, 7, 123):
        _, caps, index = training_batch(cfg, step)
        drop = cfg_drop_mask(cfg, step)
        assert 0 < drop.sum() < 48  # both cases occur in each of these steps
        idx, cap = planted_step(cfg, step)
        want = [p_caps[i][j] for i, j in zip(idx, cap)] + ordinary_step(cfg, step)[1]
        assert caps == ["" if d else w for w, d in zip(want, drop)]
        assert all(c != "" for c in want)


def test_scenes_hold_two_to_four_shapes_and_captions_name_one_or_two():
    from audit.lab.adherence import named_pairs
    from audit.lab.data import caption, sample_scenes

    rng = np.random.default_rng(11)
    scenes = sample_scenes(rng, 600)
    n_shapes = (scenes.kind >= 0).sum(1)
    assert set(np.unique(n_shapes).tolist()) == {2, 3, 4}
    assert all(np.bincount(n_shapes, minlength=5)[2:] > 150)  # each about a third
    named = [len(named_pairs(c)) for c in caption(rng, scenes)]
    assert set(named) == {1, 2} and 200 < named.count(2) < 400  # about half name two shapes
