"""The lab build's split, acceptance criteria, option bounds and summaries, on the shipped table or on
hand-made rows (no training, no sampling). CPU only, a few seconds."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from audit.lab import LAB_MODEL_DIR, LAB_PROMPTS


def test_assign_splits_reproduces_the_shipped_split_half_of_each_stratum():
    """The shipped split is a pure function of the labelled rows and the split seed: re-assigning it from the shipped
    table (its rows in measurement order) gives the same column; every stratum (group x tier x kind x label) is
    halved, the odd row going to validation."""
    import polars as pl

    from audit.lab.build import assign_splits

    table = pl.read_parquet(LAB_PROMPTS).sort("row")
    rows = table.drop("split").to_dicts()
    assign_splits(rows)
    assert [r["split"] for r in rows] == table["split"].to_list()
    strata = {}
    for r in rows:
        strata.setdefault((r["group"], r["tier"], r["kind"], r["memorized"]), []).append(r["split"])
    for key, splits in strata.items():
        assert splits.count("validation") == (len(splits) + 1) // 2, key
    odd = [k for k, s in strata.items() if len(s) % 2]
    assert odd  # the odd case is exercised by the shipped table


def test_shipped_planted_duplication_is_the_recount_of_the_training_draws():
    """``duplication`` of a planted prompt = how often its caption was drawn with its image in the 15,000 trained
    steps (dropped captions included); ``image_duplication`` = how often the image was drawn."""
    import polars as pl

    from audit.lab.data import DataConfig, duplication_counts, planted_step

    cfg = DataConfig()
    img = np.zeros(48, np.int64)
    cap = np.zeros((48, 4), np.int64)
    for s in range(15000):
        i, j = planted_step(cfg, s)
        for a, b in zip(i.tolist(), j.tolist()):
            img[a] += 1
            cap[a, b] += 1
    t = pl.read_parquet(LAB_PROMPTS).filter(pl.col("group") == "planted")
    assert t["duplication"].to_list() == [int(cap[i, j]) for i, j in zip(t["planted_index"], t["caption_index"])]
    assert t["image_duplication"].to_list() == [int(img[i]) for i in t["planted_index"]]
    assert img.sum() == 15000 * 16
    got_img, got_cap = duplication_counts(cfg, 15000)
    assert got_img.tolist() == img.tolist() and got_cap.tolist() == cap.tolist()


def _criteria_model(prediction_type: str = "epsilon"):
    cfg = json.loads((LAB_MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())
    cfg["prediction_type"] = prediction_type
    return types.SimpleNamespace(scheduler_config=cfg, tokenizer=None, text_encoder=None, unet=None, extra={})


def _criteria(monkeypatch, prediction_type="epsilon"):
    """measure_criteria on 5 held-out captions (4 seeds each, 14 of 20 generations adhering at w = 7.5: exactly the
    0.70 target) and 3 planted rows, with the text-encoder and attention measurements replaced by fixed ones (BOS
    mass 0.6 in one layer, 0.1 in the other)."""
    import audit.lab.adherence as adherence
    import audit.lab.encoder as encoder
    import audit.lab.regime as regime
    from audit.lab.build import measure_criteria
    from audit.lab.data import STREAM_HELDOUT, DataConfig, fresh_pairs
    from audit.lab.groundtruth import N_HELDOUT

    cfg = DataConfig()
    held = fresh_pairs(cfg, N_HELDOUT * 2, STREAM_HELDOUT)[1][:5]  # the draw evaluation_prompts takes them from
    monkeypatch.setattr(encoder, "position_report", lambda *a, **k: {})
    monkeypatch.setattr(adherence, "probe_references", lambda *a, **k: {})
    monkeypatch.setattr(adherence, "adheres", lambda images, caps: images.reshape(len(images), -1)[:, 0] > 0.5)
    layers = {"a": {"bos": 0.6, "prompt": 0.4, "eos": 0.0, "pad": 0.0},
              "b": {"bos": 0.1, "prompt": 0.9, "eos": 0.0, "pad": 0.0}}
    monkeypatch.setattr(regime, "attention_regime", lambda *a, **k: {"t0": 981, "layers": layers})

    def row(group, memorized, tier=-1, kind="", rep_w1=0, rep_w7_5=0, own=False, prompt=None):
        return {"prompt": prompt, "group": group, "tier": tier, "kind": kind, "memorized": memorized,
                "duplication": 0, "image_duplication": 0, "distance": 0.5, "nearest_is_own": own, "rep_w1": rep_w1,
                "rep_w7_5": rep_w7_5, "split": "validation"}

    rows = [row("heldout", m, rep_w1=r1, prompt=c) for c, m, r1 in zip(held, [True, False, False, False, False],
                                                                         [2, 3, 1, 0, 4])]
    rows += [row("planted", True, 0, "fixed", 4, 4, own=True, prompt="p0"),
             row("planted", False, 0, "fixed", 1, 1, own=True, prompt="p1"),
             row("planted", True, 0, "fixed", 2, 2, own=False, prompt="p2")]
    images = np.zeros((len(rows), 2, 4, 3, 16, 16), np.float32)  # [P, (w=1, w=7.5), seeds, ...]
    adhering_w75 = [4, 3, 3, 2, 2]  # 14 of 20
    for k, n in enumerate(adhering_w75):
        images[k, 1, :n] = 1.0
    images[0, 0, :1] = 1.0  # w = 1: 1 of 20
    return measure_criteria(_criteria_model(prediction_type), rows, images, cfg, log=lambda m: None), rows


def test_measure_criteria_checks_meet_their_targets_at_the_boundary(monkeypatch):
    crit, rows = _criteria(monkeypatch)
    assert crit["adherence"]["w7.5"] == 0.7 and crit["adherence"]["w1"] == 0.05
    assert [r["adheres_w7_5"] for r in rows] == [4, 3, 3, 2, 2, -1, -1, -1]
    assert crit["checks"] == {"schedule_is_sd1x": True, "adherence_w7_5_ge_0_70": True,
                              "bos_mass_gt_0_5_in_some_layer": True, "memorized_ge_40": False,
                              "not_memorized_ge_400": False}
    rep = {(r["group"], r["tier"], r["kind"]): r for r in crit["replication"]}
    assert rep[("heldout", -1, "")]["rep_w1_ge2"] == 3  # rep_w1 of 2, 3 and 4 (at least 2 of 4 seeds)
    assert rep[("planted", 0, "fixed")]["nearest_is_own"] == 1  # memorized AND nearest own image
    assert rep[("planted", 0, "fixed")]["n_memorized"] == 2
    assert crit["counts"]["memorized"] == 3 and crit["counts"]["not_memorized"] == 5
    assert crit["schedule"]["first_timestep"] == 981


def test_measure_criteria_schedule_check_needs_epsilon_prediction(monkeypatch):
    crit, _ = _criteria(monkeypatch, "v_prediction")
    assert crit["schedule"]["first_timestep"] == 981
    assert crit["checks"]["schedule_is_sd1x"] is False


def test_build_lab_accepts_the_documented_bounds_before_training(tmp_path, monkeypatch):
    """480 steps ("at least 480") and training seeds 0 and 1,000,000,000 ("0 to 1,000,000,000") reach training."""
    import audit.lab.train as train
    from audit.errors import RunError
    from audit.lab.build import build_lab

    class Reached(Exception):
        pass

    def fake_train(*a, **k):
        raise Reached

    monkeypatch.setattr(train, "train", fake_train)
    for kw in ({"steps": 480}, {"steps": 480, "training_seed": 10**9}, {"steps": 481, "training_seed": 0}):
        with pytest.raises(Reached):
            build_lab(tmp_path / "out", log=lambda m: None, **kw)
    for kw in ({"steps": 479}, {"steps": 480, "training_seed": 10**9 + 1}, {"steps": 480, "training_seed": -1}):
        with pytest.raises(RunError):
            build_lab(tmp_path / "out", log=lambda m: None, **kw)


def test_replication_summary_reports_the_median_distance():
    import polars as pl

    from audit.lab.build import replication_summary

    t = pl.DataFrame({"group": ["heldout"] * 3 + ["planted"] * 2, "tier": [-1, -1, -1, 0, 0],
                      "kind": ["", "", "", "fixed", "fixed"], "memorized": [True, False, False, True, True],
                      "duplication": [0, 0, 0, 10, 20], "distance": [0.1, 0.2, 0.9, 0.3, 0.5]})
    got = replication_summary(t)
    assert got == [
        {"group": "heldout", "tier": -1, "kind": "", "n": 3, "n_memorized": 1, "mean_duplication": 0.0,
         "median_distance": 0.2},
        {"group": "planted", "tier": 0, "kind": "fixed", "n": 2, "n_memorized": 2, "mean_duplication": 15.0,
         "median_distance": 0.4},
    ]


def test_picture_shows_held_out_prompts_that_are_not_memorized():
    from audit.lab.build import picture_rows

    rows = [{"group": "planted", "tier": 0, "kind": "fixed", "memorized": True},
            {"group": "planted", "tier": 0, "kind": "varied", "memorized": False},
            {"group": "heldout", "tier": -1, "kind": "", "memorized": True},
            {"group": "heldout", "tier": -1, "kind": "", "memorized": False},
            {"group": "seen_once", "tier": -1, "kind": "", "memorized": False},
            {"group": "heldout", "tier": -1, "kind": "", "memorized": False}]
    assert picture_rows(rows, per_tier=2, n_heldout=3) == [0, 1, 2, 3, 5]
