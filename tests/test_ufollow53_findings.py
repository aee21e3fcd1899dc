"""ufollow53's findings (session 53): the warning that a calibrated run was scored with other rounding settings than
its calibration's reference run (audit.pipeline.reference_settings_warning), printed where it was missing: a rerun
of a finished run folder on a read-only mount, and the first-step detection of `memaudit generate --calibration` and
the Python API's DetectAndMitigate."""

from __future__ import annotations

from dataclasses import replace
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.calibrate import calibrate, write_calibration
from audit.pipeline import RunConfig
from audit.runner import execute
from audit.tiny import TINY_WORDS


def _prompts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


# the line run --calibration printed for the run at --batch-size 7 flagged with a reference scored at 16
OTHER_BATCH = ("memaudit: warning: this run and its calibration's reference run were scored with different settings "
               "(batch_size: calibration reference 16, this run 7): a prompt's risk may differ between them by float "
               "rounding (about 1e-7), so a prompt at the threshold (one reference prompt's risk) may be flagged or "
               "not by that rounding alone; calibrate on a reference run scored with the run's settings")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_model_dir):
    """A reference run at --batch-size 16, its calibration, and a run at --batch-size 7 flagged with it, with what
    that run logged."""
    root = tmp_path_factory.mktemp("calset53")
    pq.write_table(pa.table({"prompt": _prompts(1, 30)}), root / "reference.parquet")
    pq.write_table(pa.table({"prompt": _prompts(2, 10)}), root / "screen.parquet")
    base = RunConfig(inputs=(str(root / "reference.parquet"),), model=str(tiny_model_dir), device="cpu",
                     batch_size=16)
    execute(replace(base, out=str(root / "ref")), progress=False, log=lambda m: None)
    cal_path = write_calibration(calibrate(root / "ref", fpr=0.1), root / "cal.json")
    other = replace(base, inputs=(str(root / "screen.parquet"),), out=str(root / "other"), batch_size=7,
                    calibration=str(cal_path))
    lines: list[str] = []
    execute(other, progress=False, log=lines.append)
    return root, cal_path, other, lines


def test_a_read_only_rerun_of_a_finished_calibrated_run_prints_the_reference_settings_warning(calibrated,
                                                                                            monkeypatch):
    """A finished run on a read-only mount, rerun with its --calibration, is answered from its manifest; it printed
    the note that nothing was written but not the warning the run printed (and its report repeats) that it was
    scored at another batch size than its calibration's reference. It prints it now, as a writable rerun does."""
    from test_ureadonly_findings import _read_only

    root, _, other, first = calibrated
    assert OTHER_BATCH in first
    writable: list[str] = []
    execute(other, progress=False, log=writable.append)  # a writable rerun of the finished folder
    assert OTHER_BATCH in writable
    _read_only(monkeypatch, root / "other")
    lines: list[str] = []
    execute(other, progress=False, log=lines.append)
    assert any("cannot be written" in m and "its run is complete" in m for m in lines), lines
    assert [m for m in lines if "calibration's reference run" in m] == [OTHER_BATCH]


# ------------------------------------------------------------------ memaudit generate --calibration, DetectAndMitigate

@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """A tiny SD 1.x folder with a VAE, its pipeline as `memaudit generate` builds it, and a calibration maker."""
    import json

    from audit.cli.generate import build_pipeline
    from audit.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("gen53")
    model_dir = build_tiny_model(root / "model", seed=0, sample_size=8, vae=True)
    pipe, loaded = build_pipeline(str(model_dir), device="cpu", dtype="float32")

    def calibration(name: str, scored_with: dict | None) -> dict:
        cal = {"kind": "memaudit.calibration", "threshold": 0.0, "fpr": 0.01,
               "reference_quantiles": [(i - 990) / 1000 for i in range(1001)],  # 0.99: 0
               "reference": {"size": 100, **({"scored_with": scored_with} if scored_with else {})},
               "model": {"name": "tiny", "fingerprint": loaded.fingerprint},
               "score_config": {"scorer": "attention_entropy", "layers": list(loaded.default_layers), "noise_draws": 1,
                                "seed": 0, "num_inference_steps": 2, "dtype": "float32"}}
        (root / name).write_text(json.dumps(cal))
        return cal | {"_path": str(root / name)}

    return root, model_dir, pipe, loaded, calibration


def _reference(batch_size) -> dict:
    """A calibration reference run's scored_with (as audit.pipeline.scored_with_summary writes it) on this device."""
    from audit.models.base import device_kind

    return {"batch_size": [batch_size], "compile": [False], "device": [device_kind("cpu")], "engine": ["local"],
            "mixed": []}


# what generate --calibration and DetectAndMitigate say of a reference scored at --batch-size 48, the generation's
# forward holding 2 rows (one image per prompt, its unconditional row beside it): run --calibration's line
GENERATION_AT_2 = ("this generation and its calibration's reference run were scored with different settings "
                   "(batch_size: calibration reference 48, this generation 2): a prompt's risk may differ between "
                   "them by float rounding (about 1e-7), so a prompt at the threshold (one reference prompt's risk) "
                   "may be flagged or not by that rounding alone; calibrate on a reference run scored with the run's "
                   "settings")


def test_generate_with_a_calibration_scored_otherwise_warns_as_run_does_and_records_its_settings(generator):
    """`memaudit generate --mitigate flagged --calibration` with a calibration whose reference ran at --batch-size 48
    printed nothing and recorded no scored_with, where `memaudit run --calibration` warns. It now prints run's line
    once, before the images, and summary.json's this_run records what the risks were scored with; a reference at the
    generation's own settings, or a calibration that recorded none, gives no line."""
    from audit.cli.generate import run_generate
    from audit.models.base import device_kind

    root, model_dir, pipe, loaded, calibration = generator
    (root / "p.txt").write_text("a red cat\nblue sky over the lake\n")
    logs = {}
    for name, scored_with in (("other", _reference(48)), ("same", _reference(2)), ("none", None)):
        calibration(f"{name}.json", scored_with)
        lines: list[str] = []
        summary = run_generate(root / "p.txt", str(model_dir), root / f"out-{name}", mitigate="flagged",
                               calibration=root / f"{name}.json", seeds=1, steps=2, progress=False,
                               _pipeline=(pipe, loaded), log=lines.append)
        logs[name] = [m for m in lines if "warning" in m]
        assert summary["this_run"]["scored_with"] == {"batch_size": [2], "compile": [False],
                                                      "device": [device_kind("cpu")], "mixed": []}
    assert logs == {"other": [f"memaudit: warning: {GENERATION_AT_2}"], "same": [], "none": []}
    # two images per prompt: a forward of 4 rows
    calibration("four.json", _reference(4))
    lines = []
    summary = run_generate(root / "p.txt", str(model_dir), root / "out-four", mitigate="flagged",
                           calibration=root / "four.json", seeds=2, steps=2, progress=False, _pipeline=(pipe, loaded),
                           log=lines.append)
    assert summary["this_run"]["scored_with"]["batch_size"] == [4] and not [m for m in lines if "warning" in m]


def test_detect_and_mitigate_with_a_calibration_scored_otherwise_warns_once_and_records_its_settings(generator):
    """The Python API's DetectAndMitigate(pipe, calibration=...) applied the threshold with no word of a reference
    scored at another batch size. Its first detecting call now warns (UserWarning) with run's line, once per block,
    and records dm.scored_with: the rows of its UNet forward, which is what memaudit generate predicts for itself
    (generation_rows)."""
    import warnings

    import torch

    from audit.mitigation.detect import DetectAndMitigate, detection_scored_with, generation_rows

    _, _, pipe, _, calibration = generator
    cal = calibration("api.json", _reference(48))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with DetectAndMitigate(pipe, calibration=cal) as dm:
            for _ in range(2):
                pipe("a red cat", num_inference_steps=2, guidance_scale=7.5, output_type="latent",
                     generator=torch.Generator().manual_seed(0))
    assert [str(w.message) for w in seen if w.category is UserWarning] == [GENERATION_AT_2]
    assert dm.scored_with == detection_scored_with(pipe.unet, generation_rows(pipe, 1, 7.5))
    assert dm.scored_with["batch_size"] == [2]
    with warnings.catch_warnings(record=True) as seen:  # a reference at the call's own settings: no warning
        warnings.simplefilter("always")
        with DetectAndMitigate(pipe, calibration=calibration("api2.json", _reference(2))):
            pipe("a red cat", num_inference_steps=2, guidance_scale=7.5, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
    assert not [w for w in seen if w.category is UserWarning and "reference run" in str(w.message)]
