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
