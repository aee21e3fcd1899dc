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
