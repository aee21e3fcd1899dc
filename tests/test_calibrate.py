"""`memaudit calibrate`, `run --calibration` (flagged, risk_percentile) and `--fail-on-flagged`."""

from __future__ import annotations

from dataclasses import replace
import json
import random
import shutil

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.calibrate import CalibrationError, calibrate, load_calibration, risk_percentile, write_calibration
from audit.pipeline import RunConfig
from audit.runner import execute
from audit.tiny import TINY_WORDS


def _prompts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A reference run over 40 ordinary prompts (5 of them repeated) and an uncalibrated screening run."""
    root = tmp_path_factory.mktemp("calib")
    ref = _prompts(1, 40)
    pq.write_table(pa.table({"prompt": ref + ref[:5]}), root / "reference.parquet")
    pq.write_table(pa.table({"prompt": _prompts(2, 12)}), root / "screen.parquet")
    base = RunConfig(inputs=(str(root / "reference.parquet"),), model=str(tiny_model_dir), device="cpu", batch_size=48)
    execute(replace(base, out=str(root / "ref")), progress=False, log=lambda m: None)
    screen = replace(base, inputs=(str(root / "screen.parquet"),), out=str(root / "screen"))
    execute(screen, progress=False, log=lambda m: None)
    return root, base, screen


def test_threshold_is_the_numpy_quantile_of_unique_reference_risks(runs):
    root, _, _ = runs
    cal = calibrate(root / "ref", fpr=0.1)
    risk = pl.read_parquet(root / "ref" / "risk.parquet")
    assert risk.height == 45
    unique = risk.unique("prompt_hash", keep="first")["risk"].to_numpy()
    assert cal["threshold"] == float(np.quantile(unique, 0.9))
    manifest = json.loads((root / "ref" / "manifest.json").read_text())
    assert cal["reference"]["size"] == 40 and cal["reference"]["rows"] == 45
    assert cal["model"]["fingerprint"] == manifest["model"]["fingerprint"]
    assert cal["score_config"] == manifest["score_config"]
    assert cal["reference"]["flagged"] == int((unique > cal["threshold"]).sum()) == 4
    assert len(cal["reference_quantiles"]) == 1001 and cal["reference_quantiles"][0] == unique.min()
    path = write_calibration(cal, root / "cal.json")
    assert load_calibration(path)["threshold"] == cal["threshold"]
    with pytest.raises(CalibrationError, match="fpr"):
        calibrate(root / "ref", fpr=1.5)


def test_uncalibrated_run_has_null_flags(runs):
    root, _, _ = runs
    risk = pl.read_parquet(root / "screen" / "risk.parquet")
    assert risk["flagged"].null_count() == risk.height and risk["risk_percentile"].null_count() == risk.height
    assert json.loads((root / "screen" / "manifest.json").read_text())["counts"]["flagged"] is None


def test_calibrated_run_flags_above_threshold(runs, tmp_path):
    root, _, screen = runs
    cal = calibrate(root / "ref", fpr=0.1)
    write_calibration(cal, tmp_path / "cal.json")
    out = tmp_path / "screen"
    shutil.copytree(root / "screen", out)  # finished units are reused: the rerun only finalizes, calibrated
    _, manifest = execute(replace(screen, out=str(out), calibration=str(tmp_path / "cal.json")), progress=False,
                          log=lambda m: None)
    risk = pl.read_parquet(out / "risk.parquet")
    assert risk["flagged"].null_count() == 0
    assert risk["flagged"].to_list() == (risk["risk"] > cal["threshold"]).to_list()
    assert manifest["counts"]["flagged"] == int(risk["flagged"].sum())
    assert manifest["calibration"]["threshold"] == cal["threshold"]
    ref = np.sort(pl.read_parquet(root / "ref" / "risk.parquet").unique("prompt_hash")["risk"].to_numpy())
    pct = risk["risk_percentile"].to_numpy()
    ecdf = 100.0 * np.searchsorted(ref, risk["risk"].to_numpy(), side="right") / len(ref)
    assert np.all((pct >= 0) & (pct <= 100))
    assert np.max(np.abs(pct - ecdf)) <= 100.0 / len(ref) + 1e-9  # quantile interpolation vs the step ECDF
    assert np.all(np.diff(pct) <= 1e-12)  # ranked by risk descending: percentile never rises
    meta = pq.read_schema(out / "risk.parquet").metadata
    assert json.loads(meta[b"memaudit.calibration"])["threshold"] == cal["threshold"]


def test_calibration_for_another_model_or_score_config_is_refused(runs, tmp_path):
    root, _, screen = runs
    cal = calibrate(root / "ref", fpr=0.1)
    other = json.loads(json.dumps(cal))
    other["model"]["fingerprint"] = "0123456789abcdef"
    write_calibration(other, tmp_path / "other-model.json")
    with pytest.raises(CalibrationError, match="made for model .*0123456789abcdef"):
        execute(replace(screen, out=str(tmp_path / "a"), calibration=str(tmp_path / "other-model.json")),
                progress=False, log=lambda m: None)
    write_calibration(cal, tmp_path / "cal.json")
    with pytest.raises(CalibrationError, match="score configuration .*seed: calibration 0, run 1"):
        execute(replace(screen, out=str(tmp_path / "b"), seed=1, calibration=str(tmp_path / "cal.json")),
                progress=False, log=lambda m: None)
    assert not (tmp_path / "b" / "risk.parquet").exists()
    (tmp_path / "junk.json").write_text('{"threshold": 1}')
    with pytest.raises(CalibrationError, match="not a memaudit calibration"):
        load_calibration(tmp_path / "junk.json")


def test_fail_on_flagged_exits_nonzero_after_writing_outputs(runs, tmp_path):
    from typer.testing import CliRunner

    from audit.cli import app

    root, base, _ = runs
    res = CliRunner().invoke(app, ["calibrate", str(root / "ref"), "--fpr", "0.1", "-o", str(tmp_path / "cal.json")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "ref"
    shutil.copytree(root / "ref", out)
    args = ["run", *base.inputs, "--model", base.model, "--device", "cpu", "--batch-size", "48", "--out", str(out),
            "--calibration", str(tmp_path / "cal.json")]
    res = CliRunner().invoke(app, args + ["--fail-on-flagged", "3"])
    # 4 of the 40 unique reference prompts lie above the 0.9 quantile; one of them is repeated or not
    flagged = int(pl.read_parquet(out / "risk.parquet")["flagged"].sum())
    assert flagged >= 4
    assert res.exit_code == 3 and f"{flagged} rows flagged" in res.output
    assert json.loads((out / "manifest.json").read_text())["counts"]["flagged"] == flagged
    res = CliRunner().invoke(app, args + ["--fail-on-flagged", str(flagged)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["run", *base.inputs, "--model", base.model, "--fail-on-flagged", "0"])
    assert res.exit_code == 2 and "--fail-on-flagged needs --calibration" in res.output
    res = CliRunner().invoke(app, ["calibrate", str(root / "ref"), "--fpr", "2"])
    assert res.exit_code == 2 and "--fpr" in res.output


def test_risk_percentile_interpolates_reference_quantiles():
    cal = {"reference_quantiles": list(np.quantile(np.arange(101.0), np.linspace(0, 1, 1001)))}
    pct = risk_percentile(np.array([-5.0, 0.0, 25.0, 50.5, 100.0, 200.0]), cal)
    assert pct.tolist() == pytest.approx([0.0, 0.0, 25.0, 50.5, 100.0, 100.0])
    flat = {"reference_quantiles": [2.0] * 1001}
    assert risk_percentile(np.array([1.0, 2.0, 3.0]), flat).tolist() == [0.0, 100.0, 100.0]


def test_calibration_values_are_checked_before_scoring(runs, tmp_path):
    """A calibration that would flag nothing (NaN threshold) or fail after scoring is refused up front, naming
    the value; calibrate refuses a reference table holding a non-finite risk."""
    root, _, screen = runs
    cal = calibrate(root / "ref", fpr=0.1)
    cases = [("threshold", float("nan"), "threshold"), ("reference_quantiles", [], "reference_quantiles"),
             ("version", 99, "version"), ("fpr", "x", "fpr"),
             # edited by hand: a threshold off the reference's (1 - fpr) quantile, a short quantile list
             ("threshold", cal["threshold"] + 100.0, "is not the reference's 0.9 quantile"),
             ("threshold", cal["reference_quantiles"][0] - 1.0, "is not the reference's 0.9 quantile"),
             ("reference_quantiles", [0.0, 5.0], "has 2 values, not 1001")]
    for i, (key, value, match) in enumerate(cases):
        bad = json.loads(json.dumps(cal)) | {key: value}
        (tmp_path / f"{i}.json").write_text(json.dumps(bad))  # json writes NaN as NaN, as an edited file would
        with pytest.raises(CalibrationError, match=match):
            execute(replace(screen, out=str(tmp_path / f"r{i}"), calibration=str(tmp_path / f"{i}.json")),
                    progress=False, log=lambda m: None)
        assert not (tmp_path / f"r{i}" / "risk.parquet").exists()
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(CalibrationError, match="a folder"):
        load_calibration(tmp_path / "dir.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CalibrationError, match="not JSON"):
        load_calibration(tmp_path / "bin.json")
    altered = tmp_path / "altered"
    shutil.copytree(root / "ref", altered)
    table = pq.read_table(altered / "risk.parquet")
    risk = table.column("risk").to_numpy().copy()
    risk[0] = np.nan
    pq.write_table(table.set_column(table.schema.get_field_index("risk"), "risk", pa.array(risk)),
                   altered / "risk.parquet")
    with pytest.raises(CalibrationError, match="1 of .* risks are null or not finite"):
        calibrate(altered, fpr=0.1)


def test_damaged_or_swapped_tables_are_refused_by_report_diff_and_calibrate(runs, tmp_path):
    """A risk.parquet that is not the run's own (another score configuration in its metadata, another row
    count than the manifest's), with a column of another type, non-finite risks, or a manifest field of
    another type: report, diff and calibrate all refuse it in one line, never summarize it."""
    from audit.diff import diff_runs
    from audit.errors import ReportError
    from audit.report import build_report

    root = runs[0]

    def altered(name, edit_table=None, edit_manifest=None):
        folder = tmp_path / name
        shutil.copytree(root / "ref", folder)
        if edit_table is not None:
            table = pq.read_table(folder / "risk.parquet")
            pq.write_table(edit_table(table), folder / "risk.parquet")
        if edit_manifest is not None:
            manifest = json.loads((folder / "manifest.json").read_text())
            edit_manifest(manifest)
            (folder / "manifest.json").write_text(json.dumps(manifest))
        return folder

    def with_column(table, name, values):
        return table.set_column(table.schema.get_field_index(name), name, values)

    def other_config(table):
        meta = dict(table.schema.metadata)
        meta[b"memaudit.score_config"] = json.dumps({"scorer": "noise_magnitude"}).encode()
        return table.replace_schema_metadata(meta)

    cases = {
        "inf": (lambda t: with_column(t, "risk", pa.array([np.inf] + t["risk"].to_pylist()[1:])), None,
                "1 of .* risks are null or not finite"),
        "short": (lambda t: t.slice(0, t.num_rows - 1), None, "rows but manifest.json counts"),
        "string_risk": (lambda t: with_column(t, "risk", t["risk"].cast(pa.string())), None,
                        "column risk is string, expected double"),
        "swapped": (other_config, None, "another score config than manifest.json records"),
        "manifest_type": (None, lambda m: m.update(score_config="x"), "score_config is a str, not an object"),
    }
    for name, (edit_table, edit_manifest, match) in cases.items():
        folder = altered(name, edit_table, edit_manifest)
        with pytest.raises(CalibrationError, match=match):
            calibrate(folder, fpr=0.1)
        with pytest.raises(ReportError, match=match):
            build_report(folder)
        with pytest.raises(ReportError, match=match):
            diff_runs(root / "ref", folder)
    assert build_report(root / "ref")  # the intact run passes every check


def test_api_run_raises_when_more_prompts_are_flagged_than_allowed(runs, tmp_path):
    import audit
    from audit.errors import FlaggedPromptsError

    root, _, screen = runs
    write_calibration(calibrate(root / "ref", fpr=0.5), tmp_path / "cal.json")
    with pytest.raises(FlaggedPromptsError, match="more than --fail-on-flagged 0") as err:
        audit.run(screen.inputs, out=tmp_path / "r", model=screen.model, calibration=str(tmp_path / "cal.json"),
                  fail_on_flagged=0)
    assert err.value.manifest["counts"]["flagged"] > 0 and (tmp_path / "r" / "risk.parquet").exists()


def test_diff_warns_when_the_runs_flagged_with_different_calibrations(runs, tmp_path):
    from audit.diff import diff_runs

    root, _, screen = runs
    for fpr in (0.1, 0.5):
        write_calibration(calibrate(root / "ref", fpr=fpr), tmp_path / f"cal{fpr}.json")
        execute(replace(screen, out=str(tmp_path / f"r{fpr}"), calibration=str(tmp_path / f"cal{fpr}.json")),
                progress=False, log=lambda m: None)
    d = diff_runs(tmp_path / "r0.1", tmp_path / "r0.5")
    assert any("different calibrations" in w and "FPR 0.1 vs" in w for w in d.warnings), d.warnings
    assert not diff_runs(tmp_path / "r0.1", tmp_path / "r0.1").warnings
