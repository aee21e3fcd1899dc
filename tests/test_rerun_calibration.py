"""A rerun of a finished, calibrated run folder without --calibration drops its flags (flagged null) and its
--fail-on-flagged gate with them, as documented; a scheduler's retry that left the option out did it without a
word. The rerun now warns, naming the calibration and its threshold; a rerun with the same calibration, or of a run
never calibrated, says nothing. Tiny model, CPU."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from audit.config import RunConfig
from helpers import prompts_file, run_audit


def test_a_rerun_without_the_calibration_warns_that_it_drops_the_flags(tmp_path, tiny_model_dir):
    from audit.calibrate import calibrate, write_calibration
    from audit.runner import execute

    src = prompts_file(tmp_path / "p.txt", 8, seed=11)
    ref, _ = run_audit([src], tiny_model_dir, tmp_path / "ref", unit_rows=8, batch_size=8, device="cpu")
    cal = write_calibration(calibrate(ref, fpr=0.25), tmp_path / "cal.json")
    threshold = json.loads(cal.read_text())["threshold"]
    out = tmp_path / "night"
    kw = dict(inputs=(str(src),), model=str(tiny_model_dir), out=str(out), unit_rows=8, batch_size=8, device="cpu")
    logs: list[str] = []
    _, first = execute(RunConfig(**kw, calibration=str(cal)), progress=False, log=logs.append)
    assert first["counts"]["flagged"] == 2 and not [m for m in logs if "flags are dropped" in m]
    logs.clear()
    execute(RunConfig(**kw, calibration=str(cal)), progress=False, log=logs.append)  # the same command: silent
    assert not [m for m in logs if "flags are dropped" in m]
    _, again = execute(RunConfig(**kw), progress=False, log=logs.append)
    assert [m for m in logs if "flags are dropped" in m] == [
        f"memaudit: warning: {out} was flagged with --calibration {cal} (risk > {threshold!r}); this rerun gives "
        "none, so its flags are dropped (flagged null, and no --fail-on-flagged gate): rerun with the same "
        "--calibration to keep them"]
    assert again["counts"]["flagged"] is None
    assert pq.read_table(out / "risk.parquet", columns=["flagged"]).column("flagged").null_count == 8
    logs.clear()  # the folder is uncalibrated now: a second rerun without it has nothing to drop
    execute(RunConfig(**kw), progress=False, log=logs.append)
    assert not [m for m in logs if "flags are dropped" in m]
