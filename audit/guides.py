"""The guides of ``docs/`` (``architecture``, ``audits``, ``gpu``, ``lab``, ``mitigation``, ``ray``), wherever this
memaudit is installed: ``memaudit docs`` lists them, ``memaudit docs NAME`` prints one, ``--path`` gives its file.

Messages and ``--help`` texts point to a guide as ``memaudit docs NAME``: a path such as ``docs/lab.md`` named
nothing for a user who installed the wheel (no clone, so no ``docs/`` folder beside them). The wheel ships the
guides as package data, ``audit/docs/*.md`` (pyproject.toml maps the repository's ``docs/`` to ``audit.docs``, as
it maps ``schemas/`` to ``audit.schemas``); a clone, an sdist and an editable install read the repository's
``docs/`` beside ``audit/``. Must not import anything heavy (``memaudit docs`` stays instant).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def guides_dir() -> Path | None:
    """The folder holding the guides: ``audit/docs`` where a wheel installed them, else the ``docs/`` of the source
    tree ``audit/`` lies in (a folder with a pyproject.toml: a clone, an unpacked sdist, an editable install), else
    None. (The source tree's test keeps a site-packages ``docs/`` of another package from being taken.)"""
    if (PACKAGE / "docs").is_dir():
        return PACKAGE / "docs"
    tree = PACKAGE.parent
    if (tree / "pyproject.toml").is_file() and (tree / "docs").is_dir():
        return tree / "docs"
    return None


def guides() -> dict[str, Path]:
    """Each guide's name (its file name without ``.md``) -> its file, in name order; ``{}`` without a guides
    folder."""
    folder = guides_dir()
    if folder is None:
        return {}
    return {path.stem: path for path in sorted(folder.glob("*.md")) if path.is_file()}


def title(path: Path) -> str:
    """A guide's title: its first heading's text (``# The GPU path`` -> ``The GPU path``), or ``""``."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#"):
                return line.lstrip("#").strip()
    return ""


def find(name: str) -> Path:
    """The file of the guide ``name``: ``lab``, also as written in a clone's links (``lab.md``, ``docs/lab.md``).

    Raises:
        RunError: no guides folder, or no guide of that name (naming the guides there are).
    """
    from audit.errors import RunError

    known = guides()
    if not known:
        raise RunError(f"this memaudit has no guides: neither {PACKAGE / 'docs'} (where a wheel installs them) nor "
                       f"{PACKAGE.parent / 'docs'} (a clone's) exists; reinstall memaudit (`make wheel` in a clone "
                       "builds a wheel that holds them)")
    key = name.strip().replace("\\", "/").rsplit("/", 1)[-1].lower().removesuffix(".md")  # LAB.MD as lab.md
    if key not in known:
        raise RunError(f"no guide named {name!r}: the guides are {', '.join(known)} (`memaudit docs` lists them)")
    return known[key]
