"""The exact console lines of `memaudit run` (skipped files; the summary of a resumed run) and `memaudit layers`
(numbering)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


def test_skipped_line_names_five_files_then_counts_the_rest():
    from audit.cli import skipped_line

    files = [{"path": f"in/f{i}.parquet", "reason": "bad"} for i in range(6)]
    five = "; ".join(f"in/f{i}.parquet (bad)" for i in range(5))
    assert skipped_line(files[:5]) == ("memaudit: warning: 5 input files skipped, not read (manifest.json "
                                       f"skipped_files): {five}")
    assert skipped_line(files) == ("memaudit: warning: 6 input files skipped, not read (manifest.json "
                                   f"skipped_files): {five}; and 1 more")
    assert skipped_line(files[:1]) == ("memaudit: warning: 1 input file skipped, not read (manifest.json "
                                       "skipped_files): in/f0.parquet (bad)")


def test_layers_are_numbered_from_1_in_call_order(tiny_model_dir, tiny_model):
    from audit.cli import app
    from audit.models import adapter_of

    res = CliRunner().invoke(app, ["layers", "--model", str(tiny_model_dir)])
    assert res.exit_code == 0, res.output
    names = adapter_of(tiny_model).cross_attention_layers(tiny_model.unet)
    lines = [ln for ln in res.stdout.splitlines() if not ln.startswith("family ")]
    assert [ln.replace("  (default)", "") for ln in lines] == [f"{i:3d}  {n}" for i, n in enumerate(names, 1)]
    assert [ln.endswith("  (default)") for ln in lines] == [n in tiny_model.default_layers for n in names]


def _manifest(rows_read: int, this_run: int) -> dict:
    return {"counts": {"rows_read": rows_read, "scored": rows_read, "rejected": 0, "rejected_by_reason": {},
                       "unique_prompts": rows_read},
            "rows_this_run": this_run, "wall_time_s": 2.0, "throughput_rows_per_s": 5.0,
            "model": {"name": "m", "fingerprint": "f00d"}}


@pytest.mark.parametrize("rows_read, this_run, speed", [
    (10, 10, "5.0 rows/s in 2.0 s"),
    (10, 4, "5.0 rows/s in 2.0 s (4 rows read in this invocation, the rest resumed)"),
    (10, 0, "nothing left to score, every row resumed (2.0 s)"),
])
def test_summary_line_says_what_this_invocation_read(tmp_path, monkeypatch, tiny_model_dir, rows_read, this_run, speed):
    import audit.gates as gates
    import audit.runner as runner
    from audit.cli import app

    src = tmp_path / "p.txt"
    src.write_text("a photo\n")
    monkeypatch.setattr(runner, "execute", lambda cfg, progress=None: (tmp_path / "out", _manifest(rows_read, this_run)))
    monkeypatch.setattr(gates, "run_failure", lambda cfg, out, manifest: None)
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert (f"memaudit: {rows_read} rows read, {rows_read} scored, 0 rejected (none), {rows_read} unique prompts; "
            f"model m [f00d]; {speed}\n") in res.stderr


def test_summary_line_separates_thousands_as_the_progress_line_does(tmp_path, monkeypatch, tiny_model_dir):
    """A log read "1,080" on the progress line and "1728" on the summary; every count is now separated."""
    import audit.gates as gates
    import audit.runner as runner
    from audit.cli import app

    src = tmp_path / "p.txt"
    src.write_text("a photo\n")
    manifest = _manifest(12_345, 2_345)
    manifest["counts"] |= {"scored": 11_000, "rejected": 1_345, "rejected_by_reason": {"empty_prompt": 1_345},
                           "unique_prompts": 10_500}
    manifest["throughput_rows_per_s"] = 1234.5
    monkeypatch.setattr(runner, "execute", lambda cfg, progress=None: (tmp_path / "out", manifest))
    monkeypatch.setattr(gates, "run_failure", lambda cfg, out, manifest: None)
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert ("memaudit: 12,345 rows read, 11,000 scored, 1,345 rejected (empty_prompt 1,345), 10,500 unique prompts; "
            "model m [f00d]; 1,234.5 rows/s in 2.0 s (2,345 rows read in this invocation, the rest resumed)\n"
            in res.stderr)


def test_summary_line_of_one_row_is_singular(tmp_path, monkeypatch, tiny_model_dir):
    """"1 row read ... 1 unique prompt", not "1 rows read ... 1 unique prompts"; the resumed note agrees too."""
    import audit.gates as gates
    import audit.runner as runner
    from audit.cli import app

    src = tmp_path / "p.txt"
    src.write_text("a photo\n")
    monkeypatch.setattr(runner, "execute", lambda cfg, progress=None: (tmp_path / "out", _manifest(1, 1)))
    monkeypatch.setattr(gates, "run_failure", lambda cfg, out, manifest: None)
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert ("memaudit: 1 row read, 1 scored, 0 rejected (none), 1 unique prompt; model m [f00d]; 5.0 rows/s in 2.0 s\n"
            in res.stderr)
    monkeypatch.setattr(runner, "execute", lambda cfg, progress=None: (tmp_path / "out", _manifest(3, 1)))
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")])
    assert "3 rows read, 3 scored, 0 rejected (none), 3 unique prompts;" in res.stderr
    assert "(1 row read in this invocation, the rest resumed)" in res.stderr


@pytest.mark.parametrize("n, noun, fmt, expected", [
    (0, "row", "", "0 rows"), (1, "row", "", "1 row"), (2, "unique prompt", "", "2 unique prompts"),
    (1, "unique prompt", "", "1 unique prompt"), (20000, "row", ",", "20,000 rows"), (1, "input file", ",", "1 input file"),
])
def test_counted_agrees_in_number(n, noun, fmt, expected):
    from audit.text import counted

    assert counted(n, noun, fmt) == expected


def test_nothing_scored_of_one_row_is_singular():
    from audit.gates import nothing_scored

    manifest = {"counts": {"scored": 0, "rows_read": 1, "rejected": 1, "rejected_by_reason": {"empty_prompt": 1}},
                "files": [{"format": "txt", "rows": 1}]}
    assert nothing_scored(manifest) == ("nothing was scored: the 1 row read was rejected (empty_prompt 1); "
                                        "rejects.parquet says why for each")


def test_run_help_groups_options_in_panels_model_first():
    """`memaudit run --help` listed --config, --calibration, --fail-on-flagged and --cache before --model and --out;
    its options now come in four panels, in this order, each option in one of them."""
    from audit.cli import app

    res = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    panels = ["Model and score", "Inputs", "Outputs and exit codes", "Speed and scale"]
    at = [res.output.index(f"╭─ {p} ") for p in panels]
    assert at == sorted(at)
    owner = {"--model": 0, "--scorer": 0, "--layers": 0, "--prompt-column": 1, "--config": 1, "--out": 2,
             "--calibration": 2, "--cache": 2, "--batch-size": 3, "--engine": 3, "--progress": 3}
    for flag, panel in owner.items():
        pos = res.output.index(f"│ {flag} ")
        assert at[panel] < pos and (panel == 3 or pos < at[panel + 1]), flag
