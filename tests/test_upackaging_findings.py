"""Findings of packaging memaudit as a wheel (``pip wheel --no-deps .``) installed into a fresh virtual environment,
run from another working folder, without the [ray] and [dev] extras, and with a read-only site-packages. Each test
fails on the code before its fix."""

from __future__ import annotations

import sys

import pytest

from helpers import prompts_file


# ------------------------------------------------------------------ --engine ray on a minimal install (no [ray])

RAY_LINE = ("--engine ray needs the ray package, which is not installed in this environment ({bin}): "
            "pip install 'memaudit[ray]', or use --engine local")


def test_engine_ray_without_ray_installed_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    """``pip install memaudit`` (no [ray]) then ``memaudit run P --engine ray`` ended in "memaudit: error:
    ModuleNotFoundError: No module named 'ray'", exit 1 (the code of a crash), after planning the inputs. It is now
    a RunError (exit 2) naming the extra to install, before anything is planned or written; --dry-run says the same."""
    import os

    from audit.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails; find_spec says: not installed
    prompts = prompts_file(tmp_path / "p.txt", 3)
    line = RAY_LINE.format(bin=os.path.dirname(sys.executable))
    for extra in ([], ["--dry-run"]):
        out = tmp_path / f"run{len(extra)}"
        monkeypatch.setattr(sys, "argv", ["memaudit", "run", str(prompts), "--out", str(out), "--engine", "ray",
                                          "--no-progress", *extra])
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == f"memaudit: error: {line}"
        assert "ModuleNotFoundError" not in err
        assert not out.exists()


def test_engine_ray_refusal_reaches_the_api_and_get_engine(tmp_path, monkeypatch):
    """audit.run(engine="ray") and audit.engines.get_engine("ray") raise the same RunError, with ray absent;
    with ray importable (this test environment has it) neither refuses."""
    import os

    import audit
    from audit.engines import get_engine, missing_requirement
    from audit.errors import RunError

    assert missing_requirement("ray") is None and missing_requirement("local") is None  # ray is installed here
    assert get_engine("ray").__name__ == "audit.engines.ray"
    monkeypatch.setitem(sys.modules, "ray", None)
    line = RAY_LINE.format(bin=os.path.dirname(sys.executable))
    assert missing_requirement("ray") == line
    assert missing_requirement("local") is None
    with pytest.raises(RunError) as exc:
        get_engine("ray")
    assert str(exc.value) == line
    prompts = prompts_file(tmp_path / "p.txt", 2)
    with pytest.raises(RunError) as exc:
        audit.run(str(prompts), out=str(tmp_path / "r"), engine="ray")
    assert str(exc.value) == line
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ the memaudit build of a wheel and of a clone

def _wheel_layout(root, site):
    """The .py files of the package as a wheel installs them: audit/ as is, the repository's schemas/ as
    audit/schemas/ (pyproject's package-dir)."""
    import shutil

    for base, dest in ((root / "audit", site / "audit"), (root / "schemas", site / "audit" / "schemas")):
        for path in base.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            target = dest / path.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def test_a_wheel_and_a_clone_of_the_same_code_record_the_same_build(tmp_path):
    """memaudit_build hashed the .py files under audit/ by their path there: a wheel also holds
    audit/schemas/__init__.py (the repository's schemas/, mapped by package-dir), a clone does not, so the same
    commit ran as build b95fc97ff83b from the wheel and a078f7ea4e66 from the clone. run.json, manifest.json,
    calibration files and reports then named two builds for one code, and a run started from a clone and resumed
    by the batch image's wheel said it "was started by another memaudit". Both layouts now hash the same files
    under the same names."""
    import subprocess
    from pathlib import Path

    from audit.build import memaudit_build

    root = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"
    _wheel_layout(root, site)
    code = "from audit.build import memaudit_build; print(memaudit_build())"
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path,
                          check=True)
    assert done.stdout.split() == [memaudit_build()]
    from audit.build import package_files

    wheel_files = sorted(p.relative_to(site / "audit").as_posix() for p in (site / "audit").rglob("*.py"))
    assert sorted(package_files()) == wheel_files and "schemas/__init__.py" in wheel_files
