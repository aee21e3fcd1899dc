"""ufixrun's findings (session 53): a calibration records the settings its reference run was scored with, and a run
flagged with it is warned when its own differ."""

from __future__ import annotations

from dataclasses import replace
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.calibrate import calibrate, load_calibration, write_calibration
from audit.pipeline import RunConfig
from audit.runner import execute
from audit.tiny import TINY_WORDS


def _prompts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_model_dir):
    """A reference run at --batch-size 16, its calibration, and two runs flagged with it: one at --batch-size 16
    (the reference's settings) and one at 7, with what each logged."""
    root = tmp_path_factory.mktemp("calset")
    pq.write_table(pa.table({"prompt": _prompts(1, 30)}), root / "reference.parquet")
    pq.write_table(pa.table({"prompt": _prompts(2, 10)}), root / "screen.parquet")
    base = RunConfig(inputs=(str(root / "reference.parquet"),), model=str(tiny_model_dir), device="cpu",
                     batch_size=16)
    execute(replace(base, out=str(root / "ref")), progress=False, log=lambda m: None)
    cal_path = write_calibration(calibrate(root / "ref", fpr=0.1), root / "cal.json")
    logs = {}
    for name, size in (("same", 16), ("other", 7)):
        lines: list[str] = []
        execute(replace(base, inputs=(str(root / "screen.parquet"),), out=str(root / name), batch_size=size,
                        calibration=str(cal_path)), progress=False, log=lines.append)
        logs[name] = lines
    return root, cal_path, logs


def test_calibration_records_the_reference_runs_settings(calibrated):
    root, cal_path, _ = calibrated
    ref = json.loads((root / "ref" / "manifest.json").read_text())
    cal = load_calibration(cal_path)
    assert cal["reference"]["scored_with"] == ref["scored_with"]
    assert cal["reference"]["scored_with"]["batch_size"] == [16]
    assert cal["reference"]["scored_with"]["engine"] == ["local"]
    # the run flagged with it records them in its manifest's calibration section
    other = json.loads((root / "other" / "manifest.json").read_text())
    assert other["calibration"]["reference_scored_with"] == ref["scored_with"]
    assert other["scored_with"]["batch_size"] == [7]


def test_run_report_and_diff_warn_of_a_calibration_scored_otherwise(calibrated):
    root, _, logs = calibrated
    warned = [m for m in logs["other"] if "calibration's reference run" in m]
    assert warned == ["memaudit: warning: this run and its calibration's reference run were scored with different "
                      "settings (batch_size: calibration reference 16, this run 7): a prompt's risk may differ "
                      "between them by float rounding (about 1e-7), so a prompt at the threshold (one reference "
                      "prompt's risk) may be flagged or not by that rounding alone; calibrate on a reference run "
                      "scored with the run's settings"]
    assert not [m for m in logs["same"] if "calibration's reference run" in m]
    from audit.report import build_report

    assert warned[0].removeprefix("memaudit: warning: ") in build_report(root / "other").warnings
    assert not [w for w in build_report(root / "same").warnings if "calibration's reference run" in w]
    from audit.diff import diff_runs

    d = diff_runs(root / "same", root / "other")
    assert [w for w in d.flag_warnings if "reference run" in w] == [
        "the new run and its calibration's reference run were scored with different settings (batch_size: "
        "calibration reference 16, the new run 7): a prompt's risk may differ between them by float rounding (about "
        "1e-7), so a prompt at the threshold (one reference prompt's risk) may be flagged or not by that rounding "
        "alone; calibrate on a reference run scored with the run's settings"]
    d = diff_runs(root / "other", root / "same")
    assert [w for w in d.flag_warnings if "reference run" in w][0].startswith("the old run and its calibration's")


def test_a_calibration_without_recorded_settings_makes_no_claim(calibrated):
    """A calibration made by an earlier memaudit (no reference.scored_with) gives no warning and no error."""
    from audit.calibrate import calibration_summary, reference_settings_warning

    root, cal_path, _ = calibrated
    cal = load_calibration(cal_path)
    del cal["reference"]["scored_with"]
    other = json.loads((root / "other" / "manifest.json").read_text())
    assert "reference_scored_with" not in calibration_summary(cal)
    assert reference_settings_warning(other | {"calibration": calibration_summary(cal)}) is None
