"""Everything a lab build does after training (audit/lab/build.py ``finish_lab``), driven on a real checkpoint: a
UNet trained 4 steps from scratch on the tiny data configuration of test_lab_train_mutants.py, measured with 2
seen-once and 6 held-out captions (the module's sizes ``N_SEEN_ONCE`` and ``N_HELDOUT``; every other setting
is the lab's: 4 seeds, 10 DDIM steps, guidance 1 and 7.5, tau from 2,000 fresh scenes). Nothing the lab measures
is replaced except where a test says so. Also the text output of ``memaudit lab mitigation`` and the argparse
entry point of audit/lab/mitigation.py. About 40 s in all on a 2-core CPU."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from test_lab_train_mutants import TINY, _new_run

FAMILY_DEFAULT = "up_blocks.0.attentions.0.transformer_blocks.0.attn2"  # SD 1.x's default layer (the lab's family)
# TINY's planted captions: 2 tiers x (1 fixed image with 1 caption + 1 varied image with 2 captions) = 6
N_PLANTED_CAPTIONS, N_SEEN, N_HELD = 6, 2, 6


@pytest.fixture(scope="module")
def sizes():
    """The ground truth's prompt counts made small for the module (the measurement itself is the lab's)."""
    import audit.lab.groundtruth as gt

    mp = pytest.MonkeyPatch()
    mp.setattr(gt, "N_SEEN_ONCE", N_SEEN)
    mp.setattr(gt, "N_HELDOUT", N_HELD)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def run4(tmp_path_factory, sizes):
    """A masked run trained 4 steps on TINY (4 distinct steps: 2 seen-once captions need 2 x 2)."""
    import audit.lab.train as tr

    run = _new_run(tmp_path_factory.mktemp("run4") / "run")
    tr.train(run, 4, TINY, mask_padding=True, log=lambda m: None)
    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory, run4):
    """``finish_lab`` once from ``run4``, with ``evaluate`` wrapped to record what was on disk when it was called."""
    import audit.lab.evaluate as ev
    from audit.lab.build import finish_lab

    out = tmp_path_factory.mktemp("lab") / "out"
    out.mkdir()
    seen, said = {}, []
    real = ev.evaluate

    def evaluate(model, table):
        seen["criteria.json"] = json.loads((out / "criteria.json").read_text())
        seen["memaudit.json"] = json.loads((out / "model" / "memaudit.json").read_text())
        seen["said"] = list(said)
        seen["table_rows"] = table.height
        return real(model, table)

    mp = pytest.MonkeyPatch()
    mp.setattr(ev, "evaluate", evaluate)
    try:
        report = finish_lab(out, run4 / "ckpt.pt", TINY, log=said.append)
    finally:
        mp.undo()
    return out, report, seen, said


def _json(path: Path):
    return json.loads(path.read_text())


def test_criteria_are_on_disk_with_their_final_content_before_any_scorer_is_evaluated(built):
    out, report, seen, said = built
    final = _json(out / "criteria.json")
    assert seen["criteria.json"] == final  # already there, and not rewritten after the scorers' figures
    assert seen["memaudit.json"]["criteria"] == final
    assert _json(out / "model" / "memaudit.json")["criteria"] == final
    assert _json(out / "report.json")["criteria"] == final
    assert json.loads(json.dumps(report["criteria"], default=float)) == final
    assert sorted(final) == ["adherence", "attention_regime", "checks", "counts", "replication", "schedule",
                             "text_encoder"]
    # the log up to the evaluation: the criteria line, then where they were written; no default layer yet
    crit = [m for m in seen["said"] if m.startswith("criteria: ")]
    assert crit == [f"criteria: {json.dumps(final['checks'])}"]
    assert seen["said"][-1] == (f"criteria written to {out / 'model' / 'memaudit.json'} and {out / 'criteria.json'}; "
                                "now evaluating the scorers once")
    assert not any("default layer" in m for m in seen["said"])
    assert not (out / "model.tmp").exists()


def test_prompts_table_reconciles_with_the_ground_truth_rows_and_the_criteria_counts(built):
    import polars as pl

    out, report, seen, _ = built
    cache = _json(out / "groundtruth.json")
    rows = cache["rows"]
    table = pl.read_parquet(out / "prompts.parquet")
    n = N_PLANTED_CAPTIONS + N_SEEN + N_HELD
    assert len(rows) == table.height == seen["table_rows"] == n == 14
    assert cache["train_steps"] == report["train_steps"] == 4
    assert np.load(out / "generations.npy").shape == (n, 2, 4, 3, 16, 16)  # prompts x guidance x seeds x image
    assert table["row"].to_list() == list(range(n))
    assert table["prompt"].to_list() == [r["prompt"] for r in rows]
    assert table["memorized"].to_list() == [r["memorized"] for r in rows]
    assert table["group"].to_list() == ["planted"] * 6 + ["seen_once"] * 2 + ["heldout"] * 6
    # every stratum (group x tier x kind x label) halved, the odd row to validation
    strata = {}
    for r in table.iter_rows(named=True):
        strata.setdefault((r["group"], r["tier"], r["kind"], r["memorized"]), []).append(r["split"])
    for key, splits in strata.items():
        assert splits.count("validation") == (len(splits) + 1) // 2, key
    counts = report["criteria"]["counts"]
    n_mem = int(table["memorized"].sum())
    assert (counts["memorized"], counts["not_memorized"]) == (n_mem, n - n_mem)
    for split in ("validation", "test"):
        part = table.filter(pl.col("split") == split)
        want = {"memorized": int(part["memorized"].sum()), "not_memorized": int((~part["memorized"]).sum())}
        assert counts["by_split"][split] == want
        ev = report["evaluation"][split]
        assert (ev["n_memorized"], ev["n_ordinary"]) == (want["memorized"], want["not_memorized"])
    assert sum(r["n_prompts"] for r in report["criteria"]["replication"]) == n
    assert sum(r["n"] for r in report["replication_by_group"]) == n
    # the held-out rows carry their adherence counts (of 4 seeds), the others -1
    held = table.filter(pl.col("group") == "heldout")
    assert held["adheres_w7_5"].is_between(0, 4).all() and held["adheres_w1"].is_between(0, 4).all()
    assert table.filter(pl.col("group") != "heldout")["adheres_w7_5"].to_list() == [-1] * 8


def test_untrained_model_gets_the_family_default_layer_with_a_note(built):
    """4 steps memorize nothing: the validation split has no memorized prompt, so no layer is chosen."""
    out, report, _, said = built
    val = report["evaluation"]["validation"]
    assert (val["n_memorized"], val["n_ordinary"]) == (0, 8)  # strata 1,2,1,2 | 2 | 6 -> 1,1,1,1 | 1 | 3
    meta = _json(out / "model" / "memaudit.json")
    note = "not chosen: the validation split has 0 memorized and 8 ordinary prompts, so no AUROC; the family's default"
    assert meta["default_layers_note"] == note
    assert meta["default_layers"] == report["default_layers"] == [FAMILY_DEFAULT]
    assert report["default_layers_note"] == note  # report.json says which layer, and why, as memaudit.json does
    assert f"warning: default layer NOT chosen ({note}, {FAMILY_DEFAULT}); the scorers' figures below are undefined" \
        in said
    for split in ("validation", "test", "all"):
        assert report["evaluation"][split]["scorers"]["attention_entropy"] == \
            report["evaluation"][split]["layers"][FAMILY_DEFAULT]
    assert meta["evaluation"] == json.loads(json.dumps(report["evaluation"], default=float))
    assert meta["train_steps"] == 4 and meta["ground_truth"]["tau"] == report["ground_truth"]["tau"]


def test_picture_has_one_line_per_chosen_prompt(built):
    """4 planted prompts (a fixed and a varied one per tier), no memorized ordinary prompt, 3 held-out ones; each
    line: the training image, a gap, 4 seeds at 7.5, a gap, 4 seeds at 1 (16 px tiles, x4)."""
    from PIL import Image

    out, *_ = built
    with Image.open(out / "generations.png") as img:
        assert img.size == (11 * 16 * 4, 7 * 16 * 4)


def test_a_rerun_from_the_same_checkpoint_reads_the_ground_truth_and_writes_the_same_report(built, run4, tmp_path,
                                                                                              monkeypatch):
    import audit.lab.groundtruth as gt
    from audit.lab.build import finish_lab

    out0, report0, _, _ = built
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    monkeypatch.setattr(gt, "measure", lambda *a, **k: pytest.fail("measured again"))
    said = []
    report = finish_lab(out, run4 / "ckpt.pt", TINY, log=said.append)
    assert said[0] == f"ground truth read from {out / 'groundtruth.json'}"
    for name in ("report.json", "criteria.json", "groundtruth.json"):
        assert (out / name).read_text() == (out0 / name).read_text(), name
    assert (out / "prompts.parquet").read_bytes() == (out0 / "prompts.parquet").read_bytes()
    # the returned report is report.json's content, on a first build as on a rerun
    for got in (report0, report):
        assert list(got["ground_truth"]["chance_quantiles"]) == ["0.01", "0.05", "0.5", "0.99"]
        assert json.dumps(got, indent=2) == (out0 / "report.json").read_text()


def test_a_checkpoint_of_another_step_measures_again(built, run4, tmp_path):
    import audit.lab.train as tr
    from audit.lab.build import finish_lab

    out0, report0, _, _ = built
    out, run = tmp_path / "out", tmp_path / "run"
    shutil.copytree(out0, out)
    shutil.copytree(run4, run)
    tr.train(run, 5, TINY, mask_padding=True, log=lambda m: None)
    said = []
    report = finish_lab(out, run / "ckpt.pt", TINY, log=said.append)
    assert said[0] == (f"ground truth in {out / 'groundtruth.json'} was measured at step 4, not 5: measuring again")
    assert _json(out / "groundtruth.json")["train_steps"] == report["train_steps"] == 5
    assert report["ground_truth"]["train_steps"] == 5
    assert _json(out / "model" / "memaudit.json")["train_steps"] == 5
    # the prompts are a function of the data and the step count: 5 steps draw their seen-once captions anew
    assert len(_json(out / "groundtruth.json")["rows"]) == 14


def test_another_model_at_the_same_step_measures_again(built, tmp_path):
    """A run retrained into the same build folder (its run folder removed, here with another training seed) reaches
    the same step with other weights: its ground truth is measured, not read from the first model's cache."""
    import audit.lab.train as tr
    from audit.lab.build import finish_lab

    out0, report0, _, _ = built
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    run = _new_run(tmp_path / "run")
    tr.train(run, 4, TINY, mask_padding=True, training_seed=1, log=lambda m: None)
    said = []
    report = finish_lab(out, run / "ckpt.pt", TINY, log=said.append)
    assert said[0] == (f"ground truth in {out / 'groundtruth.json'} was measured on another model at step 4 (other "
                       "weights or data): measuring again")
    assert not any(m.startswith("ground truth read from") for m in said)
    images0, images = np.load(out0 / "generations.npy"), np.load(out / "generations.npy")
    assert images.shape == images0.shape and not np.array_equal(images, images0)  # this model's own generations
    assert _json(out / "groundtruth.json")["model"] != _json(out0 / "groundtruth.json")["model"]
    assert report["train_steps"] == 4


def test_with_both_classes_in_validation_the_default_layer_is_the_best_validation_auroc(built, run4, tmp_path):
    """The labels are the one input replaced here (4 trained steps memorize nothing): the cached ground truth is
    relabelled with every planted prompt memorized, and the rerun reads it. 4 of the 6 go to validation (strata 1, 2,
    1, 2), against 4 ordinary prompts; the layer is the validation AUROC's argmax (ties: call order), with no
    note."""
    from audit.lab.build import finish_lab

    out0, *_ = built
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    cache = _json(out / "groundtruth.json")
    for r in cache["rows"]:
        r["memorized"] = r["group"] == "planted"
    (out / "groundtruth.json").write_text(json.dumps(cache))
    said = []
    report = finish_lab(out, run4 / "ckpt.pt", TINY, log=said.append)
    val = report["evaluation"]["validation"]
    assert (val["n_memorized"], val["n_ordinary"]) == (4, 4)
    assert report["criteria"]["counts"] == {"memorized": 6, "not_memorized": 8, "by_split": {
        "validation": {"memorized": 4, "not_memorized": 4}, "test": {"memorized": 2, "not_memorized": 4}}}
    aurocs = {k: v["auroc"] for k, v in val["layers"].items()}
    # after 4 steps every layer ranks the prompts alike (0.375 each): the tie goes to the first layer in call
    # order, which is not the family's default that a build without a choice records
    assert len(aurocs) == 7 and set(aurocs.values()) == {0.375}
    best = max(aurocs, key=aurocs.get)
    assert best == next(iter(aurocs)) == "down_blocks.1.attentions.0.transformer_blocks.0.attn2" != FAMILY_DEFAULT
    assert f"default layer (validation AUROC of attention entropy): {best}" in said
    assert not any("NOT chosen" in m for m in said)
    meta = _json(out / "model" / "memaudit.json")
    assert meta["default_layers"] == [best] and "default_layers_note" not in meta
    assert report["default_layers"] == [best] and "default_layers_note" not in report
    for split in ("validation", "test", "all"):
        ev = report["evaluation"][split]
        assert ev["scorers"]["attention_entropy"] == ev["layers"][best]
        recorded = meta["evaluation"][split]["scorers"]
        assert ev["scorers"]["noise_magnitude"]["auroc"] == recorded["noise_magnitude"]["auroc"]



def test_a_truncated_ground_truth_cache_is_measured_again_not_a_crash(built, run4, tmp_path):
    """A build interrupted while writing groundtruth.json left half a file, and every rerun died in json.loads."""
    from audit.lab.build import finish_lab

    out0, *_ = built
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    text = (out / "groundtruth.json").read_text()
    (out / "groundtruth.json").write_text(text[:len(text) // 2])
    said = []
    finish_lab(out, run4 / "ckpt.pt", TINY, log=said.append)
    assert said[0].startswith(f"ground truth in {out / 'groundtruth.json'} is unreadable (JSONDecodeError: ")
    assert said[0].endswith("): measuring again")
    # measured anew from the same checkpoint: the same ground truth and report, and no temporary file left
    for name in ("groundtruth.json", "report.json"):
        assert (out / name).read_text() == (out0 / name).read_text(), name
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []


def test_generations_that_do_not_match_the_cached_rows_are_measured_again(built, run4, tmp_path):
    from audit.lab.build import finish_lab

    out0, *_ = built
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    np.save(out / "generations.npy", np.load(out0 / "generations.npy")[:3])
    said = []
    finish_lab(out, run4 / "ckpt.pt", TINY, log=said.append)
    assert said[0] == (f"ground truth in {out / 'groundtruth.json'}: generations.npy holds (3, 2, 4, 3, 16, 16) "
                       "generations for 14 prompts: measuring again")
    assert np.array_equal(np.load(out / "generations.npy"), np.load(out0 / "generations.npy"))


# ---------------------------------------------------------------- memaudit lab mitigation: the table it prints
def _mitigation_result(note=None, time_ratio=1.5):
    """A fixed ``audit.lab.mitigation.measure`` result: two c1 arms, one of them without memorized prompts'
    replication, a detect arm without adherence."""
    inf = {"baseline": {"replication_rate": 0.5, "adherence": 0.75, "seconds": 1.234, "bos_mass": {}, "entropy": {}},
           "c1": {"1.1": {"replication_rate": 0.25, "adherence": 0.8125, "seconds": 12.0,
                          "distance_to_baseline": 0.0123},
                  "1.25": {"replication_rate": None, "adherence": 0.5, "seconds": 1.851, "distance_to_baseline": 0.25}}}
    if time_ratio is not None:
        inf["time_ratio"] = time_ratio
    det = {"replication_rate": 0.0, "adherence": None, "seconds": 123.456, "distance_to_baseline": 1.0,
           "false_flags_ordinary": 3, "ordinary_images": 40}
    if note:
        det["note"] = note
    return {"inference": inf, "detect": det, "training": None, "training_note": "not measured", "lab": {}}


def test_lab_mitigation_prints_one_line_per_arm_the_time_ratio_note_and_training_figures(monkeypatch):
    from typer.testing import CliRunner

    import audit.lab.mitigation as lm
    from audit.cli import app
    from audit.lab import LAB_MODEL_DIR, LAB_PROMPTS

    calls = []

    def measure(*a, **k):
        calls.append((a, {key: v for key, v in k.items() if key != "log"}))
        return _mitigation_result(note="2 of the 4 ordinary prompts evaluated also set the threshold")

    monkeypatch.setattr(lm, "measure", measure)
    res = CliRunner().invoke(app, ["lab", "mitigation", "--c1", "1.1", "--c1", "1.25", "--split", "validation",
                                   "--guidance", "3", "--limit", "5", "--seeds", "3", "--steps", "4",
                                   "--training-on", str(LAB_MODEL_DIR / "memaudit.json")])
    assert res.exit_code == 0, res.output
    assert calls == [((str(LAB_MODEL_DIR), str(LAB_PROMPTS), (1.1, 1.25), 3.0, "validation"),
                      {"limit": 5, "seeds": 3, "steps": 4})]
    assert res.stdout.splitlines() == [
        "arm                    replication adherence distance  seconds",
        "baseline                     0.500     0.750    0.000      1.2",
        "c1 = 1.1                     0.250     0.812    0.012     12.0",
        "c1 = 1.25                        -     0.500    0.250      1.9",
        "detect                       0.000         -    1.000    123.5",
        "time ratio (c1 = 1.25 / baseline): 1.500; detect flagged 3 of 40 ordinary images",
        "note: 2 of the 4 ordinary prompts evaluated also set the threshold",
        # the bundled model's own criteria, read as both arms: 80 of its 96 planted prompts memorized
        "training hook off: planted replication 0.833 (80/96), adherence 0.760",
        "training hook on: planted replication 0.833 (80/96), adherence 0.760",
    ]


def test_lab_mitigation_json_is_the_measured_result(monkeypatch):
    from typer.testing import CliRunner

    import audit.lab.mitigation as lm
    from audit.cli import app

    monkeypatch.setattr(lm, "measure", lambda *a, **k: _mitigation_result())
    res = CliRunner().invoke(app, ["lab", "mitigation", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == _mitigation_result()


def test_lab_mitigation_prints_figures_it_did_not_measure_as_such(monkeypatch):
    """Without a c1 = 1.25 arm there is no time ratio (it printed nan), and an arm without ordinary prompts has no
    distance to the baseline (it printed 0.000, "unchanged")."""
    from typer.testing import CliRunner

    import audit.lab.mitigation as lm
    from audit.cli import app

    result = _mitigation_result(time_ratio=None)
    del result["inference"]["c1"]["1.1"]["distance_to_baseline"]
    monkeypatch.setattr(lm, "measure", lambda *a, **k: result)
    res = CliRunner().invoke(app, ["lab", "mitigation", "--c1", "1.1", "--c1", "1.5"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[1] == "baseline                     0.500     0.750    0.000      1.2"
    assert lines[2] == "c1 = 1.1                     0.250     0.812        -     12.0"
    assert lines[5] == ("time ratio (c1 = 1.25 / baseline): not measured (no c1 = 1.25 arm); detect flagged 3 of 40 "
                        "ordinary images")
    result["detect"] |= {"false_flags_ordinary": None, "ordinary_images": 0}  # a table without ordinary prompts
    res = CliRunner().invoke(app, ["lab", "mitigation", "--c1", "1.1", "--c1", "1.5"])
    assert res.stdout.splitlines()[5] == ("time ratio (c1 = 1.25 / baseline): not measured (no c1 = 1.25 arm); no "
                                          "ordinary images to count detect's false flags on")  # was "None of 0"


# ---------------------------------------------------------------- audit/lab/mitigation.py main(): the argparse entry
def test_mitigation_main_passes_every_option_and_writes_the_json(monkeypatch, tmp_path, capsys):
    import audit.lab.mitigation as lm

    calls = []

    def measure(*a, **k):
        calls.append((a, {key: v for key, v in k.items() if key != "log"}))
        return _mitigation_result()

    monkeypatch.setattr(lm, "measure", measure)
    lm.main(["--model", "M", "--prompts", "P.parquet", "--c1", "1.5", "--c1", "2", "--guidance", "3", "--split",
             "all", "--fpr", "0.05", "--limit", "7", "--seeds", "3", "--steps", "4", "--no-mask-summary", "--json",
             str(tmp_path / "r.json")])
    assert calls == [(("M", "P.parquet", (1.5, 2.0), 3.0, "all", 0.05, 7, 3, 4), {"mask_summary": False})]
    assert (tmp_path / "r.json").read_text() == json.dumps(_mitigation_result(), indent=2) + "\n"
    assert capsys.readouterr().out == ""
    lm.main(["--model", "M", "--prompts", "P.parquet"])  # the defaults, the JSON on stdout
    assert calls[1] == (("M", "P.parquet", (1.1, 1.25, 1.5), 7.5, "test", 0.01, None, None, None),
                        {"mask_summary": True})
    assert json.loads(capsys.readouterr().out) == _mitigation_result()


@pytest.mark.parametrize("option, value, words", [
    ("--fpr", "1.5", "fpr 1.5: must be a number strictly between 0 and 1"),
    ("--fpr", "0", "fpr 0.0: must be a number strictly between 0 and 1"),
    ("--fpr", "nan", "fpr nan: must be a number strictly between 0 and 1"),
    ("--c1", "0", "c1 must be finite, > 0"),
    ("--split", "tset", "split 'tset': choose validation, test or all"),
    ("--limit", "0", "limit 0: must be an integer >= 1"),
    ("--steps", "0", "steps 0: must be an integer >= 1"),
    ("--seeds", "1", "seeds 1: at least 2"),
])
def test_mitigation_main_refuses_bad_options_before_the_model_loads(monkeypatch, capsys, option, value, words):
    """A bad --fpr failed in np.quantile after every arm was sampled (about 20 minutes), a bad --c1 when its arm
    started, --limit 0 meant no limit; each is now a usage error (exit 2) before anything loads."""
    import audit.lab.mitigation as lm
    from audit.lab import LAB_MODEL_DIR, LAB_PROMPTS

    monkeypatch.setattr(lm, "_lab", lambda *a: pytest.fail("the model loaded"))
    monkeypatch.setattr(lm, "sample_arm", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(SystemExit) as exc:
        lm.main(["--model", str(LAB_MODEL_DIR), "--prompts", str(LAB_PROMPTS), option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_mitigation_main_says_in_one_line_that_a_model_is_not_a_lab_model(capsys, tiny_model_dir):
    import audit.lab.mitigation as lm
    from audit.lab import LAB_PROMPTS

    with pytest.raises(SystemExit) as exc:
        lm.main(["--model", str(tiny_model_dir), "--prompts", str(LAB_PROMPTS), "--limit", "1"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.splitlines()
    prog = Path(sys.argv[0]).name  # argparse's program name
    assert err[-1] == (f"{prog}: error: {tiny_model_dir}: not a memaudit lab model (memaudit.json lacks data / "
                       "ground_truth)")
    assert not any("Traceback" in line for line in err)


def test_mitigation_refuses_a_table_without_ordinary_validation_prompts_before_sampling(monkeypatch, tmp_path, capsys):
    """The detect arm's threshold is the (1 - fpr) quantile over the validation split's ordinary prompts: a table
    with none (here only a test split, which `--split test` accepts) failed after every other arm was sampled."""
    import polars as pl

    import audit.lab.mitigation as lm
    from audit.errors import RunError

    path = tmp_path / "t.parquet"
    pl.DataFrame({"prompt": ["a red circle", "a blue square", "a green star"], "memorized": [True, False, True],
                  "split": ["test", "test", "validation"]}).write_parquet(path)
    monkeypatch.setattr(lm, "_lab", lambda *a: pytest.fail("the model loaded"))
    monkeypatch.setattr(lm, "sample_arm", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(RunError) as exc:
        lm.measure("lab", str(path), split="test", log=lambda m: None)
    assert str(exc.value) == (f"{path}: the detect arm's threshold is calibrated on the validation split's ordinary "
                              "prompts, and it has none")
    with pytest.raises(SystemExit) as stop:
        lm.main(["--model", "lab", "--prompts", str(path)])
    assert stop.value.code == 1 and capsys.readouterr().err.endswith(f"error: {exc.value}\n")


def test_undefined_figures_are_written_as_null_not_nan(built):
    """With no memorized prompt in validation the AUROCs are undefined: criteria.json, report.json and the model's
    memaudit.json held bare NaN tokens, which strict JSON readers (jq, JavaScript, polars) refuse; they are null."""
    out, report, _, _ = built

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    for path in (out / "criteria.json", out / "report.json", out / "model" / "memaudit.json"):
        json.loads(path.read_text(), parse_constant=refuse)  # NaN, Infinity, -Infinity
    auroc = report["evaluation"]["validation"]["scorers"]["attention_entropy"]["auroc"]
    assert auroc is None
