"""Findings of a reproducibility auditor (session 51): a run's recorded start, ordering and byte stability."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest

from audit.errors import RunError
from helpers import prompts_file, run_audit


class _Clock:
    """Stands in for ``audit.runner``'s ``datetime`` module: ``datetime.now`` gives the time set in ``now``."""

    timezone = dt.timezone

    def __init__(self):
        clock = self

        class datetime:
            @staticmethod
            def now(tz=None):
                return clock.now

        self.datetime = datetime
        self.now = None

    def at(self, text: str) -> str:
        self.now = dt.datetime.fromisoformat(text)
        return text


def test_a_run_killed_before_its_manifest_then_resumed_keeps_its_first_start(tmp_path, tiny_model_dir,
                                                                              monkeypatch):
    """A night killed midway (here: a unit that fails the run) and resumed after the next night had run recorded
    the resumption's start as its first_started_at (only a finished folder's manifest kept it), so `memaudit diff
    RUNS NEW` took that killed night, first started a day before, as the baseline of the night after it. Now
    run.json records the first invocation's start and the manifest's first_started_at is that one."""
    import audit.engines.local
    import audit.runner
    from audit.diff import previous_run

    clock = _Clock()
    monkeypatch.setattr(audit.runner, "dt", clock)
    src = prompts_file(tmp_path / "p.txt", 10)
    runs = tmp_path / "runs"
    night1 = clock.at("2026-12-01T02:00:00+00:00")
    run_audit([src], tiny_model_dir, runs / "n1", unit_rows=5)

    night2 = clock.at("2026-12-02T02:00:00+00:00")
    original = audit.engines.local.process_units

    def process_units(group, *args, **kwargs):  # the night is killed after its first unit
        if group.index == 1:
            raise OSError("killed")
        return original(group, *args, **kwargs)

    monkeypatch.setattr(audit.engines.local, "process_units", process_units)
    with pytest.raises(RunError, match="unit 1"):
        run_audit([src], tiny_model_dir, runs / "n2", unit_rows=5)
    monkeypatch.setattr(audit.engines.local, "process_units", original)
    assert not (runs / "n2" / "manifest.json").exists()

    night3 = clock.at("2026-12-03T02:00:00+00:00")
    run_audit([src], tiny_model_dir, runs / "n3", unit_rows=5)
    clock.at("2026-12-03T09:30:00+00:00")  # the operator resumes night 2 in the morning
    _, resumed = run_audit([src], tiny_model_dir, runs / "n2", unit_rows=5)
    assert resumed["units"] == {"total": 2, "resumed": 1}
    assert resumed["started_at"] == "2026-12-03T09:30:00+00:00"
    assert resumed["first_started_at"] == night2
    assert json.loads((runs / "n2" / "run.json").read_text())["started_at"] == night2

    clock.at("2026-12-04T02:00:00+00:00")
    _, m4 = run_audit([src], tiny_model_dir, runs / "n4", unit_rows=5)
    assert previous_run(runs, runs / "n4") == runs / "n3"  # was n2, "first started" at 09:30 on the 3rd
    assert previous_run(runs, runs / "n2") == runs / "n1"  # was n3
    assert previous_run(runs, runs / "n3") == runs / "n2"
    # a rerun of the finished folder keeps it, and the same command still resumes the folder
    clock.at("2026-12-05T02:00:00+00:00")
    _, again = run_audit([src], tiny_model_dir, runs / "n2", unit_rows=5)
    assert again["first_started_at"] == night2 and again["units"] == {"total": 2, "resumed": 2}
    assert m4["first_started_at"] == "2026-12-04T02:00:00+00:00" and night1 < night3


def test_a_folder_whose_run_json_records_no_start_keeps_its_manifests(tmp_path):
    """A folder made before run.json recorded the start: the manifest's first_started_at (then started_at)."""
    from audit.pipeline import _first_started_at

    (tmp_path / "run.json").write_text(json.dumps({"schema_version": 2, "units": 1}))
    (tmp_path / "manifest.json").write_text(json.dumps({"first_started_at": "2026-01-01T00:00:00+00:00",
                                                         "started_at": "2026-01-02T00:00:00+00:00"}))
    assert _first_started_at(tmp_path, "2026-01-03T00:00:00+00:00") == "2026-01-01T00:00:00+00:00"
    (tmp_path / "run.json").write_text(json.dumps({"schema_version": 2, "started_at": "2025-12-31T00:00:00+00:00"}))
    assert _first_started_at(tmp_path, "2026-01-03T00:00:00+00:00") == "2025-12-31T00:00:00+00:00"
    (tmp_path / "run.json").write_text("{torn")
    assert _first_started_at(tmp_path, "2026-01-03T00:00:00+00:00") == "2026-01-01T00:00:00+00:00"


def test_the_html_report_is_the_same_file_each_time_under_source_date_epoch(tmp_path, monkeypatch):
    """`memaudit report RUN --format html` rendered twice gave two files that differed in their "generated" line
    (report.md and report.json are byte-stable): an auditor archiving reports by checksum saw every page as
    changed. With SOURCE_DATE_EPOCH (the reproducible-builds convention) the page shows that time and is the same
    file; a value that is not whole seconds is refused in one line; without it the page shows the current time."""
    from typer.testing import CliRunner

    from audit.cli import app
    from test_report_mutants import make_run

    run = make_run(tmp_path / "run", [("a red cat", 1.5), ("a blue dog", 0.5)])

    def page(name: str, **env) -> tuple[int, str, bytes]:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        res = CliRunner().invoke(app, ["report", str(run), "--format", "html", "-o", str(tmp_path / name)])
        out = tmp_path / name
        return res.exit_code, res.output, out.read_bytes() if out.exists() else b""

    code1, _, first = page("a.html", SOURCE_DATE_EPOCH="1796688000")
    code2, _, second = page("b.html", SOURCE_DATE_EPOCH=" 1796688000\n")
    assert code1 == code2 == 0 and first == second
    assert b"generated 2026-12-08T00:00:00+00:00</p>" in first
    for bad in ("1796688000.5", "-5", "yesterday", "99999999999999999"):
        code, said, _ = page("bad.html", SOURCE_DATE_EPOCH=bad)
        assert code == 2 and not (tmp_path / "bad.html").exists(), said
        assert f"SOURCE_DATE_EPOCH '{bad}' is not a whole number of seconds since 1970-01-01 UTC" in said, said
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    code, _, now = page("c.html")
    shown = dt.datetime.fromisoformat(now.split(b"generated ")[1].split(b"</p>")[0].decode())
    assert code == 0 and before <= shown <= dt.datetime.now(dt.timezone.utc)
    assert now.replace(now.split(b"generated ")[1][:25], b"2026-12-08T00:00:00+00:00") == first


def test_report_json_names_the_build_that_started_a_run_rerun_by_another(tmp_path):
    """The terminal, Markdown and HTML headers name both builds of a night finished by build A and rerun by build B
    after an upgrade (its scores are A's), but report.json, what a CI script reads, held only B's
    (`memaudit_build`): the scores looked like B's. It now has `memaudit_started_build`, run.json's build."""
    from audit.report import build_report, render_json, render_markdown
    from test_report_mutants import make_run

    run = make_run(tmp_path / "r", [("p0", 0.0), ("p1", 1.0)])
    assert json.loads(render_json(build_report(run)))["memaudit_started_build"] is None  # no run.json
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps(manifest | {"memaudit_version": "0.1.0",
                                                              "memaudit_build": "bbbbbbbbbbbb"}))
    (run / "run.json").write_text(json.dumps({"schema_version": 2, "memaudit_build": "aaaaaaaaaaaa"}))
    doc = json.loads(render_json(build_report(run)))
    assert (doc["memaudit_build"], doc["memaudit_started_build"]) == ("bbbbbbbbbbbb", "aaaaaaaaaaaa")
    assert "started by build aaaaaaaaaaaa" in render_markdown(build_report(run))
    (run / "run.json").write_text(json.dumps({"schema_version": 2, "memaudit_build": "bbbbbbbbbbbb"}))
    doc = json.loads(render_json(build_report(run)))
    assert (doc["memaudit_build"], doc["memaudit_started_build"]) == ("bbbbbbbbbbbb", "bbbbbbbbbbbb")


def test_eval_json_records_the_dtype_device_batch_bootstrap_and_build(tmp_path, tiny_model_dir):
    """`memaudit eval --json` recorded the model, seed, noise and layers but not the dtype (--dtype auto is bfloat16 on
    a GPU and float32 on a CPU: other scores, other figures), the device, the batch size, the bootstrap's resamples
    (the CIs) or the memaudit build: two eval files made on two machines, or by two versions, read as the same
    measurement. They are now in the JSON, as a run's manifest records them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from audit.build import memaudit_build
    from audit.cli import app

    table = tmp_path / "labelled.parquet"
    pq.write_table(pa.table({"prompt": ["a red cat", "a blue dog", "old city street", "a small house"],
                             "memorized": [True, False, True, False]}), table)
    res = CliRunner().invoke(app, ["eval", str(table), "--model", str(tiny_model_dir), "--json", "--device", "cpu",
                                   "--dtype", "float32", "--batch-size", "3", "--bootstrap", "40"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {k: out[k] for k in ("dtype", "device", "batch_size", "n_boot", "memaudit_version", "memaudit_build")} == {
        "dtype": "float32", "device": "cpu", "batch_size": 3, "n_boot": 40, "memaudit_version": "0.1.0",
        "memaudit_build": memaudit_build()}


@pytest.mark.parametrize("option, value, said", [
    ("seed", 1, "seed: calibration 0, run 1"),
    ("noise_generator", "philox", "noise_generator: calibration 'mt19937', run 'philox'"),
    ("noise_draws", 2, "noise_draws: calibration 1, run 2"),
    ("steps", 20, "num_inference_steps: calibration 50, run 20"),
    ("scorer", "noise_magnitude", "scorer: calibration 'attention_entropy', run 'noise_magnitude'")])
def test_dry_run_refuses_a_calibration_made_with_other_score_options_as_the_run_does(tmp_path, tiny_model_dir,
                                                                                     monkeypatch, option, value, said):
    """`memaudit run --dry-run --seed 1 --calibration cal.json` (a calibration made at seed 0) said the calibration
    would be "checked against the model when the run starts" and exited 0; the run then refused it (exit 2) after
    loading the model: a scheduler's first-night check passed a night that would fail. The options the run gives
    (scorer, seed, noise draws and generator, steps) are now checked where the calibration is read: the dry run
    and the run refuse it alike, before any model loads; the calibration's own options still pass."""
    from typer.testing import CliRunner

    import audit.runner
    from audit.calibrate import calibrate, write_calibration
    from audit.cli import app
    from audit.errors import CalibrationError

    src = prompts_file(tmp_path / "p.txt", 12)
    ref, _ = run_audit([src], tiny_model_dir, tmp_path / "ref", device="cpu", batch_size=8)
    cal = tmp_path / "cal.json"
    write_calibration(calibrate(ref, 0.1), cal)
    flag = "--" + option.replace("_", "-")

    def invoke(*extra):
        return CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--calibration", str(cal),
                                        "--device", "cpu", "--batch-size", "8", "--no-progress", *map(str, extra)])

    res = invoke("--dry-run", "--out", tmp_path / "dry")
    assert res.exit_code == 0 and "flags risk >" in res.output, res.output
    res = invoke("--dry-run", "--out", tmp_path / "dry", flag, value)
    assert res.exit_code == 2, res.output
    assert f"--calibration {cal} was made for another score configuration ({said}): rerun" in res.output

    def no_model(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(audit.runner, "_load_scorer", no_model)
    monkeypatch.setattr(audit.runner, "_identity_info", no_model)
    with pytest.raises(CalibrationError, match=re.escape(f"({said}): rerun")):
        run_audit([src], tiny_model_dir, tmp_path / "real", device="cpu", batch_size=8, calibration=str(cal),
                  **{option: value})
    assert not (tmp_path / "real" / "risk.parquet").exists()
