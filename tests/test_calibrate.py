"""`memaudit calibrate`, `run --calibration` (flagged, risk_percentile) and `--fail-on-flagged`."""

from __future__ import annotations

from dataclasses import replace
import json
import math
from pathlib import Path
import random
import shutil

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from audit.calibrate import (CalibrationError, apply_calibration, calibrate, load_calibration, risk_percentile,
                             small_reference_warning, write_calibration)
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


def test_threshold_is_an_order_statistic_of_unique_reference_risks(runs):
    root, _, _ = runs
    cal = calibrate(root / "ref", fpr=0.1)
    risk = pl.read_parquet(root / "ref" / "risk.parquet")
    assert risk.height == 45
    unique = risk.unique("prompt_hash", keep="first")["risk"].to_numpy()
    # 40 unique prompts, k = floor(0.1 * 40) = 4: the threshold is the 36th smallest risk
    assert cal["version"] == 2 and cal["threshold"] == float(np.sort(unique)[35])
    manifest = json.loads((root / "ref" / "manifest.json").read_text())
    assert cal["reference"]["size"] == 40 and cal["reference"]["rows"] == 45
    assert cal["model"]["fingerprint"] == manifest["model"]["fingerprint"]
    assert cal["score_config"] == manifest["score_config"]
    assert int((unique > cal["threshold"]).sum()) == 4
    assert cal["reference"]["flagged"] == cal["reference"]["allowed_flags"] == 4
    assert cal["reference_cdf"]["risk"] == sorted(set(unique.tolist()))  # 40 distinct risks: all stored
    assert cal["reference_cdf"]["at_or_below"] == list(range(1, 41))
    path = write_calibration(cal, root / "cal.json")
    assert load_calibration(path)["threshold"] == cal["threshold"]
    # fpr 0.01 of 40 allows 0 flagged: the threshold is the highest risk (numpy.quantile's 0.99 flagged 1 of 40)
    cal = calibrate(root / "ref", fpr=0.01)
    assert cal["threshold"] == unique.max() and cal["reference"]["flagged"] == 0
    with pytest.raises(CalibrationError, match="fpr"):
        calibrate(root / "ref", fpr=1.5)


def _synthetic_calibration(runs, monkeypatch, risks, fpr):
    """``calibrate`` on the intact reference run with its unique risks replaced by ``risks``, written and read back."""
    import audit.calibrate

    root = runs[0]
    monkeypatch.setattr(audit.calibrate, "reference_risks", lambda run_dir: np.asarray(risks, dtype=np.float64))
    cal = calibrate(root / "ref", fpr=fpr)
    path = root / f"synthetic-{len(risks)}-{fpr}.json"
    write_calibration(cal, path)
    return load_calibration(path)  # the threshold passes the file checks


def _flagged(risks, cal) -> np.ndarray:
    n = len(risks)
    table = pa.table({"risk": pa.array(np.asarray(risks, dtype=np.float64)), "flagged": pa.nulls(n, pa.bool_()),
                      "risk_percentile": pa.nulls(n, pa.float64())})
    return apply_calibration(table, cal).column("flagged").to_numpy(zero_copy_only=False)


@pytest.mark.parametrize("n", [2, 7, 40, 150, 200, 576, 1001])
@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.1, 0.25, 0.29, 0.5])
def test_calibration_flags_exactly_floor_fpr_n_of_its_reference(runs, monkeypatch, n, fpr):
    """Distinct risks 1..n (shuffled): exactly floor(fpr * n) reference prompts are flagged (numpy.quantile's linear
    interpolation flagged 1 of 2 at fpr 0.01, 2 of 150, 6 of 576), and their percentiles are the exact ECDF."""
    risks = np.random.default_rng(n).permutation(np.arange(1.0, n + 1))
    cal = _synthetic_calibration(runs, monkeypatch, risks, fpr)
    k = math.floor(round(fpr * n, 9))  # 0.29 * 200 is 57.99999999999999 in binary: 58 allowed
    assert int(_flagged(risks, cal).sum()) == k
    assert cal["threshold"] == n - k
    assert cal["reference"]["flagged"] == cal["reference"]["allowed_flags"] == k
    pct = risk_percentile(risks, cal)
    assert np.array_equal(pct, 100.0 * risks / n)  # at most this risk: 100/n at the lowest, 100 at the highest
    assert risk_percentile(np.array([0.5, n + 0.5]), cal).tolist() == [0.0, 100.0]


def test_calibration_with_ties_flags_the_largest_set_within_floor_fpr_n(runs, monkeypatch):
    # 12 risks, fpr 0.25: 3 may be flagged; 9 is held by 3 prompts, so the threshold 9 flags 1 (the 10) and the
    # next lower one (8) would flag 4
    risks = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 10], dtype=np.float64)
    cal = _synthetic_calibration(runs, monkeypatch, risks, 0.25)
    assert cal["threshold"] == 9.0 and int(_flagged(risks, cal).sum()) == 1
    assert cal["reference"]["flagged"] == 1 and cal["reference"]["allowed_flags"] == 3 and int((risks > 8.0).sum()) == 4
    assert risk_percentile(np.array([1.0, 8.5, 9.0, 10.0]), cal).tolist() == pytest.approx(
        [100 / 12, 800 / 12, 1100 / 12, 100.0])
    # duplicates of 1..200 (each risk on two to four prompts): never more than floor(fpr * n), and any lower
    # reference risk as the threshold would flag more than that
    dup = np.repeat(np.arange(1.0, 201.0), np.random.default_rng(0).integers(2, 5, 200))
    for fpr in (0.01, 0.03, 0.1, 0.5):
        cal = _synthetic_calibration(runs, monkeypatch, dup, fpr)
        k = math.floor(round(fpr * dup.size, 9))
        flagged = int(_flagged(dup, cal).sum())
        assert flagged == int((dup > cal["threshold"]).sum()) <= k < int((dup > cal["threshold"] - 1).sum())
        assert risk_percentile(dup, cal).tolist() == pytest.approx(
            (100.0 * np.searchsorted(np.sort(dup), dup, side="right") / dup.size).tolist())


def test_large_reference_stores_1001_risks_and_keeps_the_threshold(runs, monkeypatch):
    risks = np.random.default_rng(1).normal(size=20000)
    cal = _synthetic_calibration(runs, monkeypatch, risks, 0.01)
    assert int(_flagged(risks, cal).sum()) == 200 and len(cal["reference_cdf"]["risk"]) <= 1002
    assert cal["threshold"] in cal["reference_cdf"]["risk"]
    ecdf = 100.0 * np.searchsorted(np.sort(risks), risks, side="right") / risks.size
    pct = risk_percentile(risks, cal)
    assert np.all(pct <= ecdf + 1e-9) and np.max(ecdf - pct) < 0.11  # a step below, within 0.1 point
    stored = np.isin(risks, cal["reference_cdf"]["risk"])
    assert np.allclose(pct[stored], ecdf[stored])
    # 5000 distinct risks, half the prompts on one of them: the stored ranks still keep the error under 0.1 point
    heavy = np.r_[np.arange(5000.0), np.full(5000, 2500.5)]
    cal = _synthetic_calibration(runs, monkeypatch, heavy, 0.3)
    ecdf = 100.0 * np.searchsorted(np.sort(heavy), heavy, side="right") / heavy.size
    pct = risk_percentile(heavy, cal)
    assert np.all(pct <= ecdf + 1e-9) and np.max(ecdf - pct) < 0.1
    # 3000 may be flagged; the tied 5000 hold the 7000th smallest, so 2499 are (the next lower risk would flag 7499)
    assert cal["threshold"] == 2500.5 and int(_flagged(heavy, cal).sum()) == 2499


def test_small_reference_warning_names_the_flags_allowed(runs, monkeypatch):
    cal = _synthetic_calibration(runs, monkeypatch, [1.0, 2.0], 0.01)
    assert small_reference_warning(cal) == ("fpr 0.01 of 2 reference prompts allows 0 flagged (the threshold is the "
                                            "highest reference risk); 1,000 or more reference prompts give a "
                                            "steadier threshold")
    tiny = _synthetic_calibration(runs, monkeypatch, [1.0, 2.0], 1e-300)  # printed as given, the count readable
    assert small_reference_warning(tiny).startswith("fpr 1e-300 of 2") and "; 1e+301 or more" in \
        small_reference_warning(tiny)
    near = _synthetic_calibration(runs, monkeypatch, [1.0, 2.0], 0.9999999999999999)
    assert small_reference_warning(near).startswith("fpr 0.9999999999999999 of 2 reference prompts allows 1")
    cal = _synthetic_calibration(runs, monkeypatch, np.arange(576.0), 0.01)
    assert small_reference_warning(cal).startswith("fpr 0.01 of 576 reference prompts allows 5 flagged (the "
                                                   "threshold is the reference risk ranked 6 from the top)")
    assert small_reference_warning(_synthetic_calibration(runs, monkeypatch, np.arange(1000.0), 0.01)) is None


def test_example_prompts_calibrated_on_themselves_flag_at_most_1_percent(tmp_path):
    """The 576 example prompts on the bundled lab model, calibrated on their own run at fpr 0.01: 5 flagged
    (floor(5.76)); numpy.quantile's interpolated threshold flagged 6 (1.04%)."""
    examples = Path(__file__).resolve().parents[1] / "examples" / "prompts.parquet"
    cfg = RunConfig(inputs=(str(examples),), device="cpu", out=str(tmp_path / "base"))
    execute(cfg, progress=False, log=lambda m: None)
    cal = calibrate(tmp_path / "base", fpr=0.01)
    write_calibration(cal, tmp_path / "cal.json")
    shutil.copytree(tmp_path / "base", tmp_path / "self")  # the rerun only finalizes, calibrated
    _, manifest = execute(replace(cfg, out=str(tmp_path / "self"), calibration=str(tmp_path / "cal.json")),
                          progress=False, log=lambda m: None)
    risk = pl.read_parquet(tmp_path / "self" / "risk.parquet")
    assert manifest["counts"]["flagged"] == int(risk["flagged"].sum()) == 5
    assert risk["risk_percentile"].min() == pytest.approx(100 / 576)
    assert cal["reference"]["size"] == 576 and cal["reference"]["allowed_flags"] == cal["reference"]["flagged"] == 5


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
    assert np.allclose(pct, ecdf)  # the percentage of reference prompts at most this risk, exactly
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
    # 4 of the 40 unique reference prompts (floor(0.1 * 40)) lie above the threshold; one of them is repeated or not
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


def test_version_1_risk_percentile_interpolates_its_reference_quantiles():
    cal = {"reference_quantiles": list(np.quantile(np.arange(101.0), np.linspace(0, 1, 1001)))}
    pct = risk_percentile(np.array([-5.0, 0.0, 25.0, 50.5, 100.0, 200.0]), cal)
    assert pct.tolist() == pytest.approx([0.0, 0.0, 25.0, 50.5, 100.0, 100.0])
    flat = {"reference_quantiles": [2.0] * 1001}
    assert risk_percentile(np.array([1.0, 2.0, 3.0]), flat).tolist() == [0.0, 100.0, 100.0]


def test_version_1_calibration_is_read_as_it_was_made(runs, tmp_path):
    """A file written before version 2 (numpy.quantile threshold, 1001 interpolated quantiles, no version key)
    keeps its meaning: its own threshold with risk > threshold, percentiles interpolated on its quantiles."""
    root, _, screen = runs
    unique = pl.read_parquet(root / "ref" / "risk.parquet").unique("prompt_hash", keep="first")["risk"].to_numpy()
    v1 = {k: v for k, v in calibrate(root / "ref", fpr=0.1).items()
          if k not in ("version", "reference_cdf", "threshold_rule")}
    v1 |= {"threshold": float(np.quantile(unique, 0.9)), "quantile": 0.9,
           "reference_quantiles": [float(v) for v in np.quantile(unique, np.linspace(0, 1, 1001))]}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    out = tmp_path / "screen"
    shutil.copytree(root / "screen", out)
    execute(replace(screen, out=str(out), calibration=str(tmp_path / "v1.json")), progress=False, log=lambda m: None)
    risk = pl.read_parquet(out / "risk.parquet")
    assert risk["flagged"].to_list() == (risk["risk"] > v1["threshold"]).to_list()
    assert np.allclose(risk["risk_percentile"].to_numpy(), risk_percentile(risk["risk"].to_numpy(), v1))
    # the run says it applied a version-1 file, and the manifest records the version
    logs: list[str] = []
    execute(replace(screen, out=str(out), calibration=str(tmp_path / "v1.json")), progress=False, log=logs.append)
    assert any("a version-1 calibration file" in m for m in logs), logs
    assert json.loads((out / "manifest.json").read_text())["calibration"]["version"] == 1
    # a v1 file is read as v1 whatever other keys it carries (a reference_cdf was taken unchecked for percentiles)
    (tmp_path / "v1cdf.json").write_text(json.dumps(v1 | {"reference_cdf": {"risk": [0.0], "at_or_below": [1]}}))
    cal = load_calibration(tmp_path / "v1cdf.json")
    assert np.array_equal(risk_percentile(unique, cal), risk_percentile(unique, v1))
    del v1["reference_quantiles"]
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    with pytest.raises(CalibrationError, match="missing 'reference_quantiles'"):
        load_calibration(tmp_path / "v1.json")


def test_calibration_files_with_unreadable_numbers_are_refused_naming_the_file(runs, tmp_path):
    """A huge integer, an integer of more than 4,300 digits or JSON nested too deep failed with a bare Python error
    (exit 1); each is refused naming the file."""
    root, _, _ = runs
    text = json.dumps(calibrate(root / "ref", fpr=0.1))
    cal = json.loads(text)
    cases = {"huge": text.replace(f'"threshold": {json.dumps(cal["threshold"])}', '"threshold": 1' + "0" * 400),
             "digits": text.replace(f'"size": {cal["reference"]["size"]}', '"size": 1' + "0" * 5000),
             "deep": "[" * 100_000 + "]" * 100_000}
    for name, body in cases.items():
        (tmp_path / f"{name}.json").write_text(body)
        with pytest.raises(CalibrationError, match=f"--calibration .*{name}.json: "):
            load_calibration(tmp_path / f"{name}.json")


def test_calibration_values_are_checked_before_scoring(runs, tmp_path):
    """A calibration that would flag nothing (NaN threshold) or fail after scoring is refused up front, naming
    the value; calibrate refuses a reference table holding a non-finite risk."""
    root, _, screen = runs
    cal = calibrate(root / "ref", fpr=0.1)
    xs, cs = cal["reference_cdf"]["risk"], cal["reference_cdf"]["at_or_below"]
    cases = [("threshold", float("nan"), "threshold"), ("reference_cdf", [], "reference_cdf must hold"),
             ("version", 99, "version 99: this memaudit reads versions 1 to 2"), ("fpr", "x", "fpr"),
             # edited by hand: a threshold off the reference's 36th smallest risk (5th from the top), another fpr
             # (0.2 of 40 allows 8 flagged), a damaged distribution
             ("threshold", cal["threshold"] + 100.0, "is not the reference risk ranked 5 from the top"),
             ("threshold", xs[34], "is not the reference risk ranked 5 from the top"),
             ("fpr", 0.2, "is not the reference risk ranked 9 from the top .* allows 8 flagged"),
             ("reference_cdf", {"risk": xs[::-1], "at_or_below": cs}, "must be finite numbers that increase"),
             ("reference_cdf", {"risk": xs, "at_or_below": [c + 1 for c in cs]}, "increase to the reference size 40"),
             ("reference_cdf", {"risk": xs, "at_or_below": cs[:-1]}, "each with its count")]
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
    assert any("different calibrations" in w and "FPR 0.1 vs" in w for w in d.flag_warnings), d.flag_warnings
    assert not any("different calibrations" in w for w in d.warnings)  # a threshold moves flags, not ranks
    assert not diff_runs(tmp_path / "r0.1", tmp_path / "r0.1").warnings


def test_reference_cdf_stores_the_rounded_evenly_spaced_ranks():
    """2500 distinct risks 0..2499: the stored ranks are round(i * 2499 / 1000), i = 0..1000: 0, 2, 5, 7, 10
    (2.499, 4.998, 7.497, 9.996 rounded), so at_or_below starts 1, 3, 6, 8, 11 and ends at 2500."""
    from audit.calibrate import reference_cdf

    cdf = reference_cdf(np.arange(2500, dtype=np.float64))
    assert cdf["at_or_below"][:5] == [1, 3, 6, 8, 11] and cdf["risk"][:5] == [0.0, 2.0, 5.0, 7.0, 10.0]
    assert len(cdf["risk"]) == 1001 and cdf["at_or_below"][-1] == 2500


def test_fpr_as_a_percentage_is_the_same_calibration_and_bad_text_is_one_line(runs, tmp_path):
    """``--fpr 10%`` was refused by typer as not a float, while ``--confirm-top 1%`` is read: both are read now."""
    from typer.testing import CliRunner

    from audit.calibrate import parse_fpr
    from audit.cli import app

    root, _, _ = runs
    made = {}
    for text in ("0.1", "10%", " 10 % "):
        out = tmp_path / f"cal{len(made)}.json"
        res = CliRunner().invoke(app, ["calibrate", str(root / "ref"), "--fpr", text, "-o", str(out)])
        assert res.exit_code == 0, res.output
        assert "at FPR 0.1 from 40 reference prompts" in res.output
        cal = json.loads(out.read_text())
        assert cal.pop("created_at")  # the time it was made: the rest must be equal
        made[text] = cal
    assert made["0.1"]["fpr"] == 0.1 and made["10%"] == made["0.1"] == made[" 10 % "]
    for bad in ("ten", "1%%", "nan", ""):
        res = CliRunner().invoke(app, ["calibrate", str(root / "ref"), "--fpr", bad, "-o", str(tmp_path / "x.json")])
        assert res.exit_code == 2 and res.output.strip().splitlines() == [
            f"memaudit: error: --fpr {bad}: give a fraction (0.01) or a percentage (1%)"], res.output
    assert parse_fpr("1%") == 0.01 and parse_fpr(0.25) == 0.25
    # out of range: named as given (the line said "--fpr 1.5" for 150%, "--fpr 0.0" for 0: udocs)
    for bad in ("150%", "0", "1", "-0.1"):
        res = CliRunner().invoke(app, ["calibrate", str(root / "ref"), "--fpr", bad, "-o", str(tmp_path / "x.json")])
        assert res.exit_code == 2 and res.output.strip().splitlines() == [
            f"memaudit: error: --fpr {bad}: must be between 0 and 1 (0% and 100%), both excluded (e.g. 0.01 or 1%)"], \
            res.output
    assert not (tmp_path / "x.json").exists()


def test_a_percentage_and_its_fraction_allow_the_same_number_of_flags():
    """``--fpr 0.7%`` was read as float("0.7") / 100 = 0.006999999999999999, so a reference of 1,000 prompts could
    flag 6, where ``--fpr 0.007`` allows 7: both spellings (and ``--confirm-top``'s) are now the decimal written,
    through one reader (audit.calibrate.decimal_share)."""
    from fractions import Fraction

    from audit.calibrate import allowed_flags, decimal_share, parse_fpr
    from audit.cascade import exact_top, top_size

    for pct, frac, n, k in (("0.7%", "0.007", 1000, 7), ("0.57%", "0.0057", 10000, 57), ("0.35%", "0.0035", 100000, 350)):
        assert parse_fpr(pct) == parse_fpr(frac) == float(frac)
        assert allowed_flags(parse_fpr(pct), n) == allowed_flags(parse_fpr(frac), n) == k
        assert exact_top(pct) == exact_top(frac) == ("fraction", Fraction(frac))
        assert top_size(pct, n) == top_size(frac, n) == k
    assert decimal_share(" 7 % ") == decimal_share("0.070") == decimal_share(0.07) == Fraction(7, 100)
    # past a decimal exponent of 10000, +-10**-10000 (above 0: --confirm-top 1e-500 confirms one prompt, as 1e-300
    # does; test_ufixcli_findings)
    assert decimal_share("1e-99999999") == Fraction(1, 10**10000) and decimal_share("5e-1") == Fraction(1, 2)
    for bad in ("1/2", "1_0", "inf", "-inf", "nan", "1e99999", "1%%", "", "%", "0x10"):
        assert decimal_share(bad) is None, bad


def test_calibrate_over_an_earlier_calibration_says_what_it_replaced(runs, tmp_path):
    """`calibrate -o cal.json` over the calibration a --config or run folder names replaced its threshold without a
    word, and the next run flagged with the new one. As report and diff, calibrate still overwrites its own kind of
    file (a nightly recalibration into one path is a use) and refuses any other, but a replaced calibration whose
    threshold (or fpr, model, score configuration, reference) changed is now a warning naming the old and new values;
    the same calibration made again, or a new file, says nothing."""
    from typer.testing import CliRunner

    from audit.cli import app

    root, _, _ = runs
    cal = tmp_path / "cal.json"

    def calibrate_to(fpr: str):
        res = CliRunner().invoke(app, ["calibrate", str(root / "ref"), "--fpr", fpr, "-o", str(cal)])
        assert res.exit_code == 0, res.output
        return res, json.loads(cal.read_text())

    res, first = calibrate_to("0.1")
    assert "replaced" not in res.stderr
    res, again = calibrate_to("0.1")  # the same calibration made again (only its created_at differs)
    assert "replaced" not in res.stderr and again["threshold"] == first["threshold"]
    res, second = calibrate_to("0.5")
    assert second["threshold"] < first["threshold"]
    model = f"model {first['model']['name']} [{first['model']['fingerprint']}]"
    ref = (root / "ref").resolve()
    assert [line for line in res.stderr.splitlines() if "replaced" in line] == [
        f"memaudit: warning: --output {cal} held an earlier calibration, now replaced (it held threshold "
        f"{first['threshold']!r} at FPR 0.1, {model}, 40 reference prompts of {ref}; now threshold "
        f"{second['threshold']!r} at FPR 0.5, {model}, 40 reference prompts of {ref}): a --config file, "
        "scheduled job or run folder naming it flags with the new threshold from its next run (a finished run rerun "
        "re-merges with it); write to another -o to keep both"]
    assert res.stdout.strip() == str(cal)  # the path written, on stdout as before
    (tmp_path / "notes.json").write_text('{"mine": 1}')  # not a calibration: refused, as before
    res = CliRunner().invoke(app, ["calibrate", str(root / "ref"), "-o", str(tmp_path / "notes.json")])
    assert res.exit_code == 2 and json.loads((tmp_path / "notes.json").read_text()) == {"mine": 1}
