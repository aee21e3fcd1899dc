"""`memaudit generate`'s option bounds as documented, the summary's null ``flagged`` without detection, the
resume check of a part's row count and a NaN risk written as null. Tiny seeded model, CPU, seconds."""

from __future__ import annotations

import pytest


def test_generate_refuses_zero_steps_before_loading_anything(tmp_path):
    from audit.cli.generate import GenerateError, run_generate

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    for kw, message in (({"steps": 0}, "--steps 0: must be at least 1"), ({"seeds": -2}, "--seeds -2: must be at least 1"),
                        ({"c1": 0.0}, "--c1 0: must be finite, > 0 and at most 100"),
                        ({"c1": 150.0}, "--c1 150: must be finite, > 0 and at most 100"),
                        ({"prompt_column": "text"}, "--prompt-column 'text': .*p.txt is a .txt file")):
        with pytest.raises(GenerateError, match=message):
            run_generate(prompts, str(tmp_path / "no-such-model"), tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


def test_generate_accepts_guidance_zero_and_every_training_timestep(tmp_path, gen_pipeline):
    """--guidance must be "a finite number >= 0": 0 is one; --steps may be the scheduler's 1000 training timesteps
    (only more is refused). An empty prompts file generates nothing, so no sampling runs."""
    from audit.cli.generate import GenerateError, run_generate

    model_dir, pipeline = gen_pipeline
    prompts = tmp_path / "empty.txt"
    prompts.write_text("")
    ok = run_generate(prompts, str(model_dir), tmp_path / "g0", guidance=0.0, steps=2, progress=False,
                      _pipeline=pipeline, log=lambda m: None)
    assert ok["rows"] == 0
    ok = run_generate(prompts, str(model_dir), tmp_path / "s1000", steps=1000, progress=False, _pipeline=pipeline,
                      log=lambda m: None)
    assert ok["rows"] == 0
    with pytest.raises(GenerateError, match="--steps 1001"):
        run_generate(prompts, str(model_dir), tmp_path / "s1001", steps=1001, progress=False, _pipeline=pipeline,
                     log=lambda m: None)


def test_generate_summary_flagged_is_null_without_a_calibration(tmp_path, gen_pipeline):
    """With no calibration nothing is flagged or not flagged: ``flagged`` is null (module docstring: risk and flag
    come from a calibration), as each row's flag is."""
    import polars as pl

    from audit.cli.generate import run_generate

    model_dir, pipeline = gen_pipeline
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    summary = run_generate(prompts, str(model_dir), tmp_path / "out", seeds=1, steps=2, progress=False,
                           _pipeline=pipeline, log=lambda m: None)
    assert summary["images"] == 1 and summary["flagged"] is None and summary["mitigated"] == 0
    rows = pl.read_parquet(tmp_path / "out" / "generations.parquet")
    assert rows["flagged"].to_list() == [None]


def test_a_part_with_fewer_rows_than_seeds_is_generated_again(tmp_path):
    from audit.cli.generate import _part_ok, _reject, _write_table_atomic

    path = tmp_path / "00000003.parquet"
    _write_table_atomic([_reject(3, "p", 0, "empty_prompt")], path)
    assert _part_ok(path, 1, 3)
    assert not _part_ok(path, 2, 3)  # cut short: one row of two seeds
    assert not _part_ok(path, 1, 4)  # another prompt's rows


def test_a_nan_risk_is_written_as_null(tmp_path):
    """schemas/generations.json: risk is "null for ... a non-finite value"; a NaN entropy (non-finite attention)
    must not reach the table as NaN, nor its flag as False."""
    import types

    import numpy as np
    import torch

    from audit.cli.generate import _generate_prompt

    class Detector:
        def __init__(self, pipe, **kw):
            self.entropy = torch.tensor([float("nan"), 0.5])
            self.flagged = torch.tensor([False, True])
            self.mitigated = torch.tensor([False, False])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Pipe:
        image_processor = types.SimpleNamespace(
            numpy_to_pil=lambda a: [__import__("PIL.Image", fromlist=["Image"]).fromarray((a[0] * 255).astype("uint8"))])

        def __call__(self, prompt, num_images_per_prompt, **kw):
            return types.SimpleNamespace(images=np.full((num_images_per_prompt, 8, 8, 3), 0.5, np.float32))

    (tmp_path / "images").mkdir()
    rows = _generate_prompt(Pipe(), Detector, 0, "a red cat", tmp_path, 2, 2, 7.5, 1.25, False, "off", 0.1, ["L"],
                            torch)
    assert [r["risk"] for r in rows] == [None, 0.5]
    # a NaN entropy decides nothing: its flag is null, not a False that reads as "cleared"
    assert [r["flagged"] for r in rows] == [None, True] and [r["status"] for r in rows] == ["image", "image"]


def test_generate_checks_the_calibration_before_loading_the_model(tmp_path):
    """A calibration made at another step count (or with 4 noise draws) is refused before the model loads (seconds
    to minutes at SD scale): here the model folder does not exist, and the calibration's own reason is said."""
    import json

    from audit.cli.generate import run_generate
    from audit.errors import MitigationError

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\n")
    base = {"kind": "memaudit.calibration", "threshold": 1.0, "fpr": 0.01, "reference_quantiles": [1.0] * 1001,
            "reference": {"size": 100}, "model": {"name": "m", "fingerprint": "0" * 16}}
    for config, said in (({"num_inference_steps": 50, "noise_draws": 1}, "made at num_inference_steps 50"),
                         ({"num_inference_steps": 2, "noise_draws": 4}, "averages 4 noise draws")):
        cal = tmp_path / "cal.json"
        cal.write_text(json.dumps({**base, "score_config": {"scorer": "attention_entropy", "layers": ["x"], "seed": 0,
                                                            "dtype": "float32", **config}}))
        with pytest.raises(MitigationError, match=said):
            run_generate(prompts, str(tmp_path / "no-such-model"), tmp_path / "out", mitigate="flagged",
                         calibration=cal, steps=2)
    assert not (tmp_path / "out").exists()
