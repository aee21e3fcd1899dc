"""Which memaudit code runs: :func:`memaudit_build`, recorded in run.json, manifest.json and calibration files.

Must not import anything of ``audit`` (it is read by the modules that write those files).
"""

from __future__ import annotations

from functools import lru_cache
import hashlib
from pathlib import Path


@lru_cache(maxsize=None)
def memaudit_build() -> str:
    """An identifier of the memaudit code this process runs: SHA-256 (first 12 hex characters) over the path and
    bytes of every ``.py`` file of the ``audit`` package, computed once per process. ``audit.__version__`` stays one
    number across many changes, so run.json, manifest.json and calibration files also record this: an upgrade
    between two nights, or between an interrupted run and its resumption, shows as another build."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
