"""What a mutation review of `memaudit generate` and the evaluation path (audit/cli/generate.py, audit/cli/eval.py,
audit/evaluate.py, audit/eval.py) found untested: non-finite scores ranked least risky also below negative scores
and inside the bootstrap, NaN figures for one class, the CI's n_boot and seed, the labelled table's refusals and
messages, evaluate's options reaching each scorer, the eval command's options and text table (against a stub
result), and generate's seeds, per-seed rows, summary counts, resume checks, refusals and exit codes. Expected values
are counted by hand or recomputed with scikit-learn and numpy; CPU, seconds."""

from __future__ import annotations

import inspect
import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from audit.cli import app
from audit.errors import RunError

PROMPTS = ["a red cat", "a blue dog on a beach", "old city street at night", "portrait of a woman",
           "oil painting of a boat", "a green tree in the forest", "sunset over the lake", "a small house"]
LABELS = np.array([True, False, True, False, False, True, False, False])


def _hand_auroc_ci(y, s, n_boot, seed):
    """The module docstring's CI, recomputed: non-finite scores set to (least finite - 1), resamples drawn with
    replacement within each class (positives first) from default_rng(seed), sklearn's AUROC of each, 2.5 and 97.5
    percentiles."""
    s = np.asarray(s, float)
    s = np.where(np.isfinite(s), s, s[np.isfinite(s)].min() - 1)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(seed)
    aurocs = []
    for _ in range(n_boot):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        aurocs.append(roc_auc_score(y[idx], s[idx]))
    return np.percentile(aurocs, [2.5, 97.5])


# --- audit/eval.py --------------------------------------------------------------------------------------------
def test_a_non_finite_score_ranks_below_negative_scores():
    """(least finite - 1) stays below every score when scores are negative (its negation ranked it the riskiest)."""
    from audit.eval import metrics

    y = np.array([1, 1, 0, 0, 0], bool)
    for bad in (np.nan, np.inf, -np.inf):
        s = np.array([-1.0, bad, -2.0, -3.0, -0.5])
        # positives -1 and (-4): -1 beats -2 and -3, not -0.5; -4 beats none: 2 of 6 pairs
        assert metrics(y, s)["auroc"] == pytest.approx(2 / 6, abs=1e-12)


def test_one_class_gives_nan_figures_and_nan_bounds():
    from audit.eval import _NAMES, bootstrap_ci, metrics, metrics_with_ci

    s = np.array([0.3, 0.1, 0.2])
    for y in (np.zeros(3, bool), np.ones(3, bool)):
        m = metrics(y, s)
        assert list(m) == _NAMES and all(np.isnan(v) for v in m.values())
        ci = bootstrap_ci(y, s, n_boot=5)
        assert list(ci) == _NAMES and all(np.isnan(lo) and np.isnan(hi) for lo, hi in ci.values())
        assert all(np.isnan(v).all() for v in metrics_with_ci(y, s, n_boot=5).values())


def test_bootstrap_ranks_non_finite_scores_least_risky_too():
    """The CI resamples the cleaned scores: a +inf memorized score was the riskiest in every resample."""
    from audit.eval import bootstrap_ci

    rng = np.random.default_rng(5)
    y = np.r_[np.ones(12, bool), np.zeros(30, bool)]
    s = rng.normal(size=42) + 1.0 * y
    s[0], s[1], s[20] = np.inf, np.nan, -np.inf
    np.testing.assert_allclose(bootstrap_ci(y, s, n_boot=60, seed=2)["auroc"], _hand_auroc_ci(y, s, 60, 2),
                               rtol=0, atol=1e-12)


def test_metrics_with_ci_resamples_n_boot_times_from_its_seed():
    from audit.eval import metrics_with_ci

    rng = np.random.default_rng(8)
    y = np.r_[np.ones(10, bool), np.zeros(25, bool)]
    s = rng.normal(size=35) + 0.8 * y
    m = metrics_with_ci(y, s, n_boot=40, seed=9)
    np.testing.assert_allclose(m["auroc_ci"], _hand_auroc_ci(y, s, 40, 9), rtol=0, atol=1e-12)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


# --- audit/evaluate.py ------------------------------------------------------------------------------------------
def test_read_labelled_reads_json_lines_and_names_a_missing_file(tmp_path):
    from audit.evaluate import read_labelled

    path = tmp_path / "t.json"
    path.write_text('{"prompt": "a red cat", "memorized": true}\n{"prompt": "blue sky", "memorized": false}\n')
    prompts, labels = read_labelled(path)
    assert prompts == ["a red cat", "blue sky"] and labels.tolist() == [True, False]
    with pytest.raises(RunError, match=re.escape(f"{tmp_path / 'none.csv'}: no such file")):
        read_labelled(tmp_path / "none.csv")


def test_labelled_rows_refuses_null_labels_and_lists_five_blank_rows():
    from audit.evaluate import labelled_rows

    table = pa.table({"prompt": ["a", "b", "c"], "memorized": pa.array([True, None, False], pa.bool_())})
    with pytest.raises(RunError, match=re.escape("t.csv: label column 'memorized' has 1 null value(s)")):
        labelled_rows(table, "t.csv")
    for n_blank, rows in ((5, "row 1, 2, 3, 4, 5)"), (6, "row 1, 2, 3, 4, 5 ...)")):
        prompts = ["a cat", *[""] * n_blank, "a dog"]
        table = pa.table({"prompt": prompts, "memorized": [True] + [False] * (n_blank + 1)})
        with pytest.raises(RunError, match=re.escape(f"{n_blank} row(s) with a null or empty prompt ({rows}")):
            labelled_rows(table, "t.csv")


def test_numeric_options_refuse_booleans():
    from audit.evaluate import eval_options_problem

    assert eval_options_problem(True, 50, 1, 1) == "noise_draws must be an integer, not bool"
    assert eval_options_problem(1, 50, 1, 1, seed=False) == "seed must be an integer, not bool"


def test_evaluate_refuses_labels_of_another_length_and_an_unknown_layers_value(tiny_model):
    from audit.evaluate import evaluate

    with pytest.raises(RunError, match="8 prompts but 7 labels"):
        evaluate(PROMPTS, LABELS[:7], tiny_model)
    with pytest.raises(RunError, match=r"^--layers: not a cross-attention layer of this model: first \(`memaudit "
                                       r"layers --model M` lists them\)$"):
        evaluate(PROMPTS, LABELS, tiny_model, layers="first")
    with pytest.raises(RunError, match=r"^--layers: give all, or cross-attention layer names"):
        evaluate(PROMPTS, LABELS, tiny_model, layers=" , ")
    with pytest.raises(RunError, match=r"^--layers \[3\]: give all, or cross-attention layer names"):
        evaluate(PROMPTS, LABELS, tiny_model, layers=[3])


def test_evaluate_scores_with_its_options_and_resamples_n_boot_times(tiny_model, monkeypatch):
    """noise_draws, seed and num_inference_steps reach every scorer; n_boot reaches every CI (scorers and layers);
    only the attention scorer gets per-layer figures; prompts/s is the prompts over the timed seconds."""
    import audit.eval
    import audit.scorers
    from audit.evaluate import evaluate
    from audit.scorers import ScoreConfig, Scorer

    configs, n_boots = [], []
    real_ci = audit.eval.metrics_with_ci

    class Recording(Scorer):
        def __init__(self, model, config, **kw):
            configs.append(config)
            super().__init__(model, config, **kw)

    def recording_ci(labels, scores, n_boot=1000, seed=0):
        n_boots.append(n_boot)
        return real_ci(labels, scores, n_boot, seed)

    monkeypatch.setattr(audit.scorers, "Scorer", Recording)
    monkeypatch.setattr(audit.eval, "metrics_with_ci", recording_ci)
    layers = tuple(tiny_model.default_layers)
    res = evaluate(PROMPTS, LABELS, tiny_model, ("attention_entropy", "noise_magnitude"), layers="all",
                   noise_draws=2, seed=5, num_inference_steps=10, n_boot=7, batch_size=3)
    assert [(c.scorer, c.layers, c.noise_draws, c.seed, c.num_inference_steps) for c in configs] == [
        ("attention_entropy", layers, 2, 5, 10), ("noise_magnitude", layers, 2, 5, 10)]
    assert list(res["layers"]) == ["attention_entropy"]
    assert n_boots == [7] * (2 + len(res["layers"]["attention_entropy"]))
    for name in ("attention_entropy", "noise_magnitude"):
        fig = res["scorers"][name]
        risk = Scorer(tiny_model, ScoreConfig(name, layers, 2, 5, 10)).score(PROMPTS)["risk"]
        assert fig["auroc"] == pytest.approx(roc_auc_score(LABELS, risk), abs=1e-12)
        assert fig["prompts_per_s"] == pytest.approx(len(PROMPTS) / fig["seconds"])


# --- audit/cli/eval.py ------------------------------------------------------------------------------------------
RESULT = {"model": "tiny", "fingerprint": "abc123", "n_memorized": 3, "n_ordinary": 2, "noise_draws": 2, "seed": 4,
          "num_inference_steps": 10,
          "scorers": {"attention_entropy": {
              "auroc": 0.8137, "auroc_ci": [0.5121, 0.9764], "tpr_at_1pct_fpr": 0.25,
              "tpr_at_1pct_fpr_ci": [0.0, 0.6667], "tpr_at_3pct_fpr": 0.375, "tpr_at_3pct_fpr_ci": [0.125, 0.75],
              "tpr_at_1pct_fpr_nearest": 0.5,
              "n_nonfinite": 0, "n_nonfinite_memorized": 0, "forwards_per_prompt": 2.0, "prompts_per_s": 12.345,
              "seconds": 1.0}},
          "layers": {"attention_entropy": {"down.attn2": {"auroc": 0.6, "auroc_ci": [0.4, 0.9], "tpr_at_1pct_fpr": 0.1,
                                                          "tpr_at_1pct_fpr_ci": [0.0, 0.3]}}}}


def _stub_evaluate(monkeypatch, result):
    """Replace audit.evaluate.evaluate with a stub returning ``result``; returns the list of its bound arguments."""
    import audit.evaluate

    calls = []
    signature = inspect.signature(audit.evaluate.evaluate)

    def stub(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs).arguments)
        return result

    monkeypatch.setattr(audit.evaluate, "evaluate", stub)
    return calls


def test_eval_command_passes_its_options_and_prints_the_table(tmp_path, tiny_model_dir, monkeypatch):
    calls = _stub_evaluate(monkeypatch, RESULT)
    path = tmp_path / "t.csv"
    path.write_text("text,memorized\na red cat,true\nblue sky,false\nold boat,true\nsunset,false\nsmall house,true\n")
    res = CliRunner().invoke(app, ["eval", str(path), "--model", str(tiny_model_dir), "--prompt-column", "text",
                                   "--seed", "4", "--noise-draws", "2", "--steps", "10", "--bootstrap", "7",
                                   "--batch-size", "3", "--device", "cpu", "--scorers", "attention_entropy"],
                           env={"COLUMNS": "200"})  # the table (conftest's 80 columns print a block a scorer)
    assert res.exit_code == 0, res.output
    (args,) = calls
    assert args["prompts"] == ["a red cat", "blue sky", "old boat", "sunset", "small house"]
    assert list(args["labels"]) == [True, False, True, False, True]
    assert (args["seed"], args["noise_draws"], args["num_inference_steps"], args["n_boot"], args["batch_size"]) == (
        4, 2, 10, 7, 3)
    assert list(args["scorers"]) == ["attention_entropy"] and args["layers"] is None
    lines = res.stdout.splitlines()
    assert lines[0] == "model tiny [abc123]: 3 memorized, 2 ordinary prompts; 2 noise draw(s); 95% bootstrap CIs"
    row = next(line for line in lines if line.startswith("attention_entropy "))
    # AUROC, TPR@1%, TPR@3% with their CIs, the nearest TPR at 1%, forwards per prompt, prompts/s
    # (2 ordinary prompts read both TPRs at FPR 0: marked †)
    assert re.split(r"\s{2,}", row.strip()) == ["attention_entropy", "0.814 [0.512, 0.976]", "0.250 [0.000, 0.667]†",
                                                "0.375 [0.125, 0.750]†", "0.500", "2", "12.35"]
    layer = next(line for line in lines if "down.attn2" in line)
    assert layer.split() == ["down.attn2", "AUROC", "0.600", "[0.400,", "0.900]", "TPR@1%FPR", "0.100", "[0.000,",
                             "0.300]†"]
    err = " ".join(res.stderr.split())
    assert "2 ordinary prompts cannot measure TPR at 1% FPR" in err and "non-finite" not in err


def test_eval_command_notes_a_lab_model_that_fails_its_criteria(tmp_path, monkeypatch):
    from audit.lab import LAB_MODEL_DIR

    _stub_evaluate(monkeypatch, RESULT)
    path = tmp_path / "t.csv"
    path.write_text("prompt,memorized\na red cat,true\nblue sky,false\n")
    res = CliRunner().invoke(app, ["eval", str(path), "--model", str(LAB_MODEL_DIR), "--bootstrap", "7"])
    assert res.exit_code == 0, res.output
    assert "memaudit: warning: this lab model fails its acceptance criteria" in " ".join(res.stderr.split())


def test_small_sample_warning_under_ten_of_either_class():
    from audit.cli.eval import small_sample_warnings

    assert small_sample_warnings(10, 500) == []
    assert len(small_sample_warnings(9, 500)) == 1
    w = small_sample_warnings(500, 9)  # 9 ordinary: neither TPR can be measured, and under 10 of a class
    assert len(w) == 3 and w[2].startswith("500 memorized and 9 ordinary prompts: too few")


# --- audit/cli/generate.py --------------------------------------------------------------------------------------
def test_a_negative_guidance_is_refused_before_loading_anything(tmp_path):
    from audit.cli.generate import GenerateError, run_generate

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    with pytest.raises(GenerateError, match=r"--guidance -1.0: must be a finite number >= 0"):
        run_generate(prompts, str(tmp_path / "no-such-model"), tmp_path / "out", guidance=-1.0)
    assert not (tmp_path / "out").exists()


def test_read_prompts_rows_without_a_usable_prompt(tmp_path):
    from audit.cli.generate import read_prompts

    upper = tmp_path / "P.TXT"  # the suffix in any case, as `memaudit run` reads it
    upper.write_text("a red cat\n")
    assert read_prompts(upper) == [("a red cat", None)]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"text": "a cat"}\n7\n["prompt"]\n"prompt"\n{"prompt": "a dog"}\n')
    # memaudit run's verdicts (generate reads with its reader): a line that is no object is invalid JSON, kept
    assert read_prompts(lines) == [(None, "missing_prompt_column"), ("7", "invalid_json"), ('["prompt"]', "invalid_json"),
                                   ('"prompt"', "invalid_json"), ("a dog", None)]
    invisible = tmp_path / "i.txt"
    invisible.write_text(" \u200b \n")
    assert [reason for _, reason in read_prompts(invisible)] == ["empty_prompt"]


def test_each_row_records_its_own_seeds_flags(tmp_path):
    import types

    import torch

    from audit.cli.generate import _generate_prompt

    class Detector:
        def __init__(self, pipe, **kw):
            self.entropy = torch.tensor([0.25, 0.5])
            self.flagged = torch.tensor([True, False])
            self.mitigated = torch.tensor([False, True])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    from PIL import Image

    class Pipe:
        image_processor = types.SimpleNamespace(numpy_to_pil=lambda a: [Image.fromarray((a[0] * 255).astype("uint8"))])

        def __call__(self, prompt, num_images_per_prompt, **kw):
            return types.SimpleNamespace(images=np.full((num_images_per_prompt, 8, 8, 3), 0.5, np.float32))

    (tmp_path / "images").mkdir()
    rows = _generate_prompt(Pipe(), Detector, 0, "a red cat", tmp_path, 2, 2, 7.5, 1.25, False, "flagged", 0.3, ["L"],
                            torch)
    assert [(r["seed"], r["risk"], r["flagged"], r["mitigated"]) for r in rows] == [(0, 0.25, True, False),
                                                                                   (1, 0.5, False, True)]


def _row(i, seed, status="image", reason=None, flagged=None, mitigated=False):
    return {"prompt_index": i, "prompt": f"p{i}", "seed": seed, "image_path": f"images/{i:08d}_s{seed}.png"
            if status == "image" else None, "risk": 0.5, "flagged": flagged, "mitigated": mitigated,
            "status": status, "reason": reason}


def test_generate_missing_counts_image_rows_and_names_reject_parts_as_done(tmp_path):
    from audit.cli.generate import _generate_missing

    (tmp_path / "parts").mkdir()
    rows_in = [("a cat", None), (None, "null_prompt")]
    made = _generate_missing(tmp_path, rows_in, 2, False,
                             lambda i, p: [_row(i, 0), _row(i, 1, "rejected", "nonfinite_image")])
    assert made == 1  # the NaN image is no image
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["00000000.parquet", "00000001.parquet"]


def test_finalize_summary_counts(tmp_path):
    from audit.cli.generate import _finalize, _write_table_atomic

    (tmp_path / "parts").mkdir()
    _write_table_atomic([_row(0, 0, flagged=True, mitigated=True), _row(0, 1, "rejected", "nonfinite_image",
                                                                        flagged=False, mitigated=False)],
                        tmp_path / "parts" / "00000000.parquet")
    _write_table_atomic([_row(1, 0, "rejected", "empty_prompt"), _row(1, 1, "rejected", "empty_prompt")],
                        tmp_path / "parts" / "00000001.parquet")
    cal = {"path": "cal.json", "threshold": 0.3, "fpr": 0.01, "sha256": "0" * 16}
    summary = _finalize(tmp_path, 2, 2, {"mitigate": "flagged", "calibration": cal}, 3, 2.0)
    assert (summary["rows"], summary["images"], summary["rejected"]) == (4, 1, 3)
    assert summary["rejected_by_reason"] == {"nonfinite_image": 1, "empty_prompt": 2}
    assert (summary["flagged"], summary["mitigated"]) == (1, 1)
    assert summary["this_run"] == {"images": 3, "seconds": 2.0, "images_per_second": 1.5}
    # --mitigate always has no unmitigated first step: nothing was detected, even with a calibration
    assert _finalize(tmp_path, 2, 2, {"mitigate": "always", "calibration": cal}, 0, 1.0)["flagged"] is None


def test_a_part_with_more_rows_than_seeds_is_not_done(tmp_path):
    from audit.cli.generate import _part_ok, _reject, _write_table_atomic

    path = tmp_path / "00000003.parquet"
    _write_table_atomic([_reject(3, "p", 0, "empty_prompt"), _reject(3, "p", 1, "empty_prompt")], path)
    assert _part_ok(path, 2, 3) and not _part_ok(path, 1, 3)


def test_generate_command_exit_codes_and_failed_rows_warning(tmp_path, monkeypatch):
    import audit.cli.generate as gen
    from audit.errors import CalibrationError
    from audit.faults import Terminated

    def invoke(effect):
        def run_generate(*a, **kw):
            if isinstance(effect, BaseException):
                raise effect
            return effect

        monkeypatch.setattr(gen, "run_generate", run_generate)
        return CliRunner().invoke(app, ["generate", "p.txt", "--model", "m", "--out", str(tmp_path / "o")])

    r = invoke(Terminated())
    assert r.exit_code == 143 and "memaudit: terminated (SIGTERM); the finished prompts are kept" in r.stderr
    r = invoke(CalibrationError("--calibration c.json: not JSON"))
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == ["memaudit: error: --calibration c.json: not JSON"]
    summary = {"rows": 4, "images": 2, "rejected": 2, "rejected_by_reason": {"generation_failed": 2}}
    r = invoke(summary)
    assert r.exit_code == 0 and json.loads(r.stdout) == summary
    assert "memaudit: warning: 2 of 4 rows failed to generate" in r.stderr


def test_build_pipeline_refuses_a_mask_model_and_a_vae_without_weights(tmp_path, gen_pipeline):
    from audit.cli.generate import GenerateError, build_pipeline

    model_dir, _ = gen_pipeline
    masked = tmp_path / "masked"
    shutil.copytree(model_dir, masked)
    extra = masked / "memaudit.json"
    extra.write_text(json.dumps({**(json.loads(extra.read_text()) if extra.exists() else {}),
                                 "unet_encoder_attention_mask": "bos_and_prompt_tokens"}))
    with pytest.raises(GenerateError, match=r"declares a UNet encoder attention mask \(bos_and_prompt_tokens\)"):
        build_pipeline(str(masked), device="cpu")
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    for weights in (bare / "vae").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(GenerateError, match=r"vae/ has no \.safetensors weights, nor any weight file .*; generate "
                                            "decodes images with the model's VAE"):
        build_pipeline(str(bare), device="cpu")


def test_generate_resume_compares_every_option(tmp_path, gen_pipeline):
    """Another --guidance, --mask-eos or prompts content is refused, naming it; a folder written before
    vae_fingerprint was recorded resumes."""
    from audit.cli.generate import GenerateError, run_generate

    model_dir, pipeline = gen_pipeline
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("")  # no rows: no sampling, only the folder's options
    kw = dict(steps=2, progress=False, _pipeline=pipeline, log=lambda m: None)
    assert run_generate(prompts, str(model_dir), out, **kw)["rows"] == 0
    for other, named in (({"guidance": 3.0}, "guidance"), ({"mask_eos": True}, "mask_eos")):
        with pytest.raises(GenerateError, match=rf"other options \({named}\)"):
            run_generate(prompts, str(model_dir), out, **kw, **other)
    prompts.write_text("\n")
    with pytest.raises(GenerateError, match=r"other options \(prompts_sha256: the prompts file's content changed\)"):
        run_generate(prompts, str(model_dir), out, **kw)
    prompts.write_text("")
    options = json.loads((out / "generate.json").read_text())
    del options["vae_fingerprint"]
    (out / "generate.json").write_text(json.dumps(options))
    assert run_generate(prompts, str(model_dir), out, **kw)["rows"] == 0


def test_seed_s_draws_its_latent_from_a_generator_seeded_with_s(tmp_path, gen_pipeline):
    """schemas/generations.json: seed is the CPU generator's seed; the image equals the plain pipeline's for that seed
    (detection is float rounding only: one 8-bit level at most), and not the other seed's."""
    from PIL import Image

    from audit.cli.generate import run_generate
    from helpers import generate_np

    model_dir, pipeline = gen_pipeline
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    run_generate(prompts, str(model_dir), tmp_path / "out", seeds=2, steps=2, progress=False, _pipeline=pipeline,
                 log=lambda m: None)
    reference = [generate_np(pipeline[0], "a red cat", 2, seed=s)[0] for s in (0, 1)]
    for s in (0, 1):
        png = np.asarray(Image.open(tmp_path / "out" / "images" / f"00000000_s{s}.png"), np.float64) / 255
        assert np.abs(png - reference[s]).max() <= 1 / 255 + 1e-6
        assert np.abs(png - reference[1 - s]).max() > 0.05


def test_eval_reads_a_table_whose_suffix_is_upper_case(tmp_path):
    """LABELS.CSV is a CSV, as `memaudit run` and `memaudit generate` read it: eval took it for Parquet ("Parquet
    magic bytes not found")."""
    from audit.evaluate import read_labelled

    (tmp_path / "LABELS.CSV").write_text("prompt,memorized\na red cat,true\nblue sky,false\n")
    (tmp_path / "LABELS.JSONL").write_text('{"prompt": "a red cat", "memorized": true}\n'
                                           '{"prompt": "blue sky", "memorized": false}\n')
    (tmp_path / "LABELS.TSV").write_text("prompt\tmemorized\na red cat, on a mat\ttrue\nblue sky\tfalse\n")
    for name, first in (("LABELS.CSV", "a red cat"), ("LABELS.JSONL", "a red cat"),
                        ("LABELS.TSV", "a red cat, on a mat")):
        prompts, labels = read_labelled(tmp_path / name)
        assert prompts == [first, "blue sky"] and labels.tolist() == [True, False], name


def test_eval_refuses_a_text_file_of_prompts_naming_the_table_formats(tmp_path):
    """`memaudit eval prompts.txt` said "cannot read (ArrowInvalid: ... Parquet magic bytes not found)": a .txt of
    prompts has no label column. Another suffix is refused naming the formats; a file without one is still read as
    Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audit.errors import RunError
    from audit.evaluate import read_labelled

    (tmp_path / "prompts.txt").write_text("a red cat\nblue sky\n")
    with pytest.raises(RunError, match=r"prompts\.txt: a labelled table is Parquet, CSV, TSV or JSON lines \(\.parquet, "
                                       r"\.pq, \.csv, \.tsv, \.jsonl, \.json, \.ndjson\), with a prompt and a label "
                                       r"column; not \.txt$"):
        read_labelled(tmp_path / "prompts.txt")
    pq.write_table(pa.table({"prompt": ["a red cat", "blue sky"], "memorized": [True, False]}), tmp_path / "labels")
    prompts, labels = read_labelled(tmp_path / "labels")
    assert prompts == ["a red cat", "blue sky"] and labels.tolist() == [True, False]


@pytest.mark.parametrize("n_ordinary, marks", [(2, ("†", "†")), (33, ("†", "†")), (34, ("†", "")), (100, ("†", "")),
                                               (101, ("", ""))])
def test_a_tpr_read_at_fpr_0_is_marked_in_the_table(n_ordinary, marks):
    """`lab eval --prompts` on 45 ordinary prompts warned that TPR at 1% FPR cannot be measured, then printed
    '0.200 [0.000,0.467]' in the TPR@1% column as if it had been. With 100/x ordinary prompts or fewer the TPR at
    x% FPR is read at FPR 0: the value is marked † and a footnote says so (1%: 100 or fewer; 3%: 33 or fewer)."""
    from audit.cli.eval import UNMEASURABLE_NOTE, render

    lines = render(dict(RESULT, n_ordinary=n_ordinary)).splitlines()
    row = next(line for line in lines if line.startswith("attention_entropy "))
    cells = re.split(r"\s{2,}", row.strip())
    assert (cells[2], cells[3]) == ("0.250 [0.000, 0.667]" + marks[0], "0.375 [0.125, 0.750]" + marks[1])
    layer = next(line for line in lines if line.strip().startswith("down.attn2"))
    assert layer.endswith("TPR@1%FPR 0.100 [0.000, 0.300]" + marks[0])
    assert (lines[-1] == UNMEASURABLE_NOTE) == bool(marks[0])
