"""Which memaudit code runs: :func:`memaudit_build`, recorded in run.json, manifest.json and calibration files.

Must not import anything of ``audit`` (it is read by the modules that write those files).
"""

from __future__ import annotations

from functools import lru_cache
import hashlib
import importlib.util
from pathlib import Path


@lru_cache(maxsize=None)
def memaudit_build() -> str:
    """An identifier of the memaudit code this process runs: SHA-256 (first 12 hex characters) over the path and
    bytes of every code file of the ``audit`` package (:func:`is_code`: its ``.py`` files, the report's Jinja2
    templates and the output tables' JSON schemas), computed once per process. ``audit.__version__`` stays one
    number across many changes, so run.json, manifest.json and calibration files also record this: an upgrade
    between two nights, or between an interrupted run and its resumption, shows as another build.

    The files are taken as an installed wheel lays them out (:func:`package_files`), so a clone (or an editable
    install) and a wheel built from the same commit give the same identifier."""
    digest = hashlib.sha256()
    for name, path in sorted(package_files().items()):
        digest.update(name.encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def is_code(name: str) -> bool:
    """Whether the file at ``name`` (its path inside the installed package, ``templates/report.html.j2``) is part
    of what :func:`memaudit_build` identifies: a ``.py`` file, a Jinja2 template (``.j2``: report.html's page), or
    a JSON schema under ``schemas/`` (the output tables' columns). Not the lab model's files (its own fingerprint
    names them), the lab's prompts and picture, or the guides."""
    return name.endswith((".py", ".j2")) or (name.startswith("schemas/") and name.endswith(".json"))


def package_files() -> dict[str, Path]:
    """The code files (:func:`is_code`) of the ``audit`` package by their path inside it as installed
    (``lab/cli.py``), with the subpackages that pyproject.toml maps from folders outside ``audit/``
    (``audit.schemas``, the repository's ``schemas/``) under their installed name (``schemas/__init__.py``,
    ``schemas/risk.json``): a wheel puts them inside the package, a clone and an editable install keep them beside
    it."""
    root = Path(__file__).resolve().parent
    files = {name: path for path in root.rglob("*")
             if path.is_file() and is_code(name := path.relative_to(root).as_posix())}
    for sub in MAPPED_SUBPACKAGES:
        if (root / sub).is_dir():  # installed from a wheel: already walked above
            continue
        try:
            spec = importlib.util.find_spec(f"{__package__}.{sub}")
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec is not None else []:
            base = Path(location)
            for path in base.rglob("*"):
                if path.is_file() and is_code(name := f"{sub}/{path.relative_to(base).as_posix()}"):
                    files.setdefault(name, path)
    return files


# subpackages of audit whose folder lies outside audit/ in the repository ([tool.setuptools.package-dir])
MAPPED_SUBPACKAGES = ("schemas",)
