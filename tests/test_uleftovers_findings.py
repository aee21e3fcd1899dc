"""Findings of session 51's leftovers (helper uleftovers): ``python -m audit``, the names a model folder's
memaudit.json gives as its default layers, the values ``--cache ''`` / ``--calibration ''`` clear at a real run's
start, and the CSV record-by-record reader's cost on rows with both quoted-empty and empty fields."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _python_m(module: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True)


# ------------------------------------------------------------------ python -m audit

def test_python_m_audit_is_the_memaudit_command_line_with_its_exit_codes(tmp_path):
    """``python -m audit`` failed with "No module named audit.__main__; 'audit' is a package and cannot be directly
    executed" (exit 1). It now runs the memaudit command line as the ``memaudit`` script does (``audit.cli.main``):
    the same version line, a usage error's one line and exit 2, no command's help and exit 2, a missing input's
    one line and exit 2; and importing ``audit.__main__`` runs nothing."""
    version = _python_m("audit", "--version", cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout == _python_m("audit.cli", "--version", cwd=tmp_path).stdout
    assert version.stdout.startswith("memaudit 0.1.0 (build ")

    bare = _python_m("audit", cwd=tmp_path)
    assert bare.returncode == 2
    assert "Usage: memaudit [OPTIONS] COMMAND [ARGS]..." in bare.stdout

    usage = _python_m("audit", "run", "--nope", cwd=tmp_path)
    assert usage.returncode == 2
    assert usage.stderr.startswith("memaudit: error: No such option: --nope")
    assert usage.stderr.rstrip().endswith("see memaudit run --help")

    missing = _python_m("audit", "run", str(tmp_path / "absent.parquet"), cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr == f"memaudit: error: {tmp_path / 'absent.parquet'}: no such file or folder\n"

    imported = subprocess.run([sys.executable, "-c", "import audit.__main__; print('imported')"], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert (imported.returncode, imported.stdout) == (0, "imported\n")


# ------------------------------------------------------------------ --cache '' / --calibration '' at a run's start

def test_a_run_says_at_its_start_which_config_values_an_empty_flag_dropped(tmp_path, tiny_model_dir):
    """``--cache ''`` and ``--calibration ''`` over a --config file that sets them: the dry run said the values it
    dropped, the real run said nothing of them. Now the run says the dry run's lines on stderr at its start (before
    the summary), runs without them (no cache folder made, no flagged column, the file's --fail-on-flagged 0 gate
    gone: exit 0), and says nothing of the kind without the empty flags."""
    import polars as pl
    from typer.testing import CliRunner

    from audit.cli import app

    src = tmp_path / "p.csv"
    src.write_text("prompt\na red cat\na blue dog\n")
    cal = tmp_path / "cal.json"  # never read: the command line drops it
    conf = tmp_path / "job.toml"
    conf.write_text(f'cache = "{tmp_path / "cache"}"\ncalibration = "{cal}"\nfail_on_flagged = 0\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--device", "cpu", "--config",
                                   str(conf), "--cache", "", "--calibration", "", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    err = res.stderr.splitlines()
    assert err[:2] == [
        f"memaudit: cache: none: --cache '' runs without the --config file's ({tmp_path / 'cache'}): every prompt "
        "read is sent to the model",
        f"memaudit: calibration: none: --calibration '' runs without the --config file's ({cal}): no flagged or "
        "risk_percentile column, and no --fail-on-flagged 0 gate (it needs the calibration)"]
    assert err[2].startswith("memaudit: 2 rows read, 2 scored, 0 rejected")
    assert res.stdout == f"{out}\n"
    assert not (tmp_path / "cache").exists()
    assert pl.read_parquet(out / "risk.parquet")["flagged"].to_list() == [None, None]  # no calibration: no flags

    res = CliRunner().invoke(app, ["run", str(src), "--model", str(tiny_model_dir), "--device", "cpu", "--cache", "",
                                   "--out", str(tmp_path / "plain"), "--no-progress"])  # no file: nothing dropped
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines()[0].startswith("memaudit: 2 rows read, 2 scored, 0 rejected")
