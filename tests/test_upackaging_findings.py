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
    """The .py, template and schema files of the package as a wheel installs them: audit/ as is, the repository's
    schemas/ as audit/schemas/ (pyproject's package-dir)."""
    import shutil

    for base, dest in ((root / "audit", site / "audit"), (root / "schemas", site / "audit" / "schemas")):
        for path in base.rglob("*"):
            if "__pycache__" in path.parts or not path.is_file() or path.suffix not in (".py", ".j2", ".json"):
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

    from audit.build import is_code

    wheel_files = sorted(name for p in (site / "audit").rglob("*")
                         if p.is_file() and is_code(name := p.relative_to(site / "audit").as_posix()))
    assert sorted(package_files()) == wheel_files
    assert {"schemas/__init__.py", "schemas/risk.json", "templates/report.html.j2"} <= set(wheel_files)


# ------------------------------------------------------------------ package data: what the wheel ships

def _shipped_files(root):
    """The files a wheel built from ``root`` holds, as pyproject.toml's [tool.setuptools] lists them: each
    package's .py files and the files its package-data globs match (setuptools' glob, relative to the package's
    folder), as installed paths (``audit/lab/model/unet/config.json``) -> the source file."""
    import glob
    import os
    import tomllib

    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs, data = config.get("package-dir", {}), config.get("package-data", {})
    shipped = {}
    for package in config["packages"]:
        folder = root / dirs.get(package, package.replace(".", "/"))
        installed = package.replace(".", "/")
        for path in folder.glob("*.py"):
            shipped[f"{installed}/{path.name}"] = path
        for pattern in data.get(package, []):
            for name in glob.glob(os.path.join(folder, pattern), recursive=True):
                path = type(root)(name)
                if path.is_file():
                    shipped[f"{installed}/{path.relative_to(folder).as_posix()}"] = path
    return shipped


def test_the_wheel_ships_every_file_of_the_package_folders():
    """pyproject's package-data listed only *.parquet for audit.lab, so a wheel (pip wheel . / pip install .,
    the Dockerfile's install) lacked audit/lab/generations.png, which audit.lab.LAB_PICTURE names and docs/lab.md
    lists as shipped: from an installed memaudit LAB_PICTURE pointed to no file. Every file in the folders of the
    packages pyproject lists (but compiled caches) is now in the wheel, and every folder holding code or data
    under audit/ is a listed package (a folder left out would be missing from the wheel, its imports failing
    only once installed)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shipped = _shipped_files(root)
    sources = {p.resolve() for p in shipped.values()}
    left_out = []
    for base in (root / "audit", root / "schemas", root / "docs"):
        for path in base.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.resolve() not in sources:
                left_out.append(path.relative_to(root).as_posix())
    assert left_out == []
    assert shipped["audit/lab/generations.png"] == root / "audit" / "lab" / "generations.png"


def test_every_file_the_code_opens_from_the_package_is_shipped():
    """The files memaudit opens next to its code, by audit.lab's paths, importlib.resources (the table schemas)
    and Jinja's PackageLoader (the report template), are each in the wheel's list."""
    from pathlib import Path

    import audit.lab as lab

    root = Path(__file__).resolve().parents[1]
    shipped = _shipped_files(root)
    package = root / "audit"
    needed = [f"audit/{p.relative_to(package).as_posix()}" for p in sorted(lab.LAB_MODEL_DIR.rglob("*")) if p.is_file()]
    needed += [f"audit/lab/{p.name}" for p in (lab.LAB_PROMPTS, lab.LAB_PICTURE)]
    needed += [f"audit/schemas/{name}.json" for name in ("risk", "rejects", "manifest", "generations")]
    needed += ["audit/templates/report.html.j2"]
    assert len(needed) == 16
    assert [n for n in needed if n not in shipped] == []


# ------------------------------------------------------------------ the source distribution

def test_the_sdist_holds_what_make_test_and_the_docs_need():
    """Without MANIFEST.in, setuptools' sdist held the package, README and pyproject, and of tests/ only the
    test_*.py files: not conftest.py (the tiny_model_dir fixture ...) nor helpers.py, so the test suite of an
    unpacked sdist failed to collect; docs/ (which the README links), examples/prompts.parquet (make demo),
    pipelines/ (docs/audits.md's ready configs), benchmarks/ and the Makefile were missing too. MANIFEST.in now
    grafts them; the test reads its include and graft lines as setuptools does (a graft takes the whole folder,
    then global-exclude drops compiled caches) and checks that every such file of the clone is covered."""
    from fnmatch import fnmatch
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    lines = [line.split() for line in (root / "MANIFEST.in").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    grafts = [w[1] for w in lines if w[0] == "graft"]
    includes = [p for w in lines if w[0] == "include" for p in w[1:]]
    excludes = [p for w in lines if w[0] == "global-exclude" for p in w[1:]]

    def covered(rel: str) -> bool:
        if any(fnmatch(part, p) for part in rel.split("/") for p in excludes):
            return False
        return any(rel == g or rel.startswith(g + "/") for g in grafts) or any(fnmatch(rel, p) for p in includes)

    needed = ["Makefile", "tests/conftest.py", "tests/helpers.py", "examples/prompts.parquet",
              "pipelines/nightly.sh", "pipelines/nightly-prompt-log.toml"]
    needed += [p.relative_to(root).as_posix() for p in sorted((root / "docs").glob("*.md"))]
    needed += [p.relative_to(root).as_posix() for p in sorted((root / "benchmarks").glob("*.py"))]
    assert len(needed) > 12
    assert [n for n in needed if not covered(n)] == []
    assert not covered("tests/__pycache__/conftest.cpython-311.pyc")


# ------------------------------------------------------------------ requires-python

# standard-library modules that appeared after Python 3.9, with the version that added them
STDLIB_ADDED = {"zoneinfo": (3, 9), "graphlib": (3, 9), "tomllib": (3, 11), "wsgiref.types": (3, 11)}


def test_requires_python_admits_no_version_whose_standard_library_lacks_an_import():
    """pyproject said requires-python >=3.10 and the README 'Python 3.10+', but audit.config imports tomllib (Python
    3.11+), and audit.pipeline, audit.runner and the CLI's run import audit.config: on 3.10 pip installed the
    wheel and every memaudit run failed with "ModuleNotFoundError: No module named 'tomllib'". The floor is now
    3.11, in pyproject and the README; the test reads every import of the package and checks that each module
    newer than the floor's standard library is absent."""
    import ast
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = tomllib.loads((root / "pyproject.toml").read_text())["project"]["requires-python"]
    floor = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+)\.(\d+)", spec).groups())
    used = set()
    for path in list((root / "audit").rglob("*.py")) + list((root / "schemas").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                used.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                used.add(node.module)
    assert "tomllib" in used
    too_new = sorted(m for m in used if STDLIB_ADDED.get(m, (0, 0)) > floor)
    assert too_new == []
    readme = (root / "README.md").read_text()
    assert re.findall(r"Python (3\.\d+)\+", readme) == [f"{floor[0]}.{floor[1]}"]


# ------------------------------------------------------------------ building the wheel from a working clone

def test_make_wheel_clears_build_before_pip_wheel(tmp_path):
    """pip wheel --no-deps . in a clone packs setuptools' build/lib, which keeps every file an earlier build put
    there: a module removed or renamed since (audit/zz_stale.py made, wheel built, file deleted, wheel built
    again: the second wheel still held it) ships in the next wheel, and counts in its memaudit_build. `make wheel`
    removes build/ first; `make clean` removes it too. The test reads the commands make would run (make -n)."""
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "Makefile", tmp_path / "Makefile")  # make -n runs nothing, but reads no other file either

    def commands(target):
        # (--no-print-directory: under `make test`, as CI runs the suite, a nested make says where it enters)
        done = subprocess.run(["make", "-n", "--no-print-directory", target, "PYTHON=python3"], cwd=tmp_path,
                              capture_output=True, text=True, check=True)
        return done.stdout.splitlines()

    assert commands("wheel") == ["rm -rf build", "python3 -m pip wheel --no-deps . -w dist"]
    assert commands("clean") == ["rm -rf memaudit-runs .pytest_cache build"]


# ------------------------------------------------------------------ Ray: the same memaudit code on every node

from test_ray_engine_mutants import Handle, actor, ray_mod  # noqa: E402,F401 (fixtures: UnitScorer in this process)


def test_a_ray_actor_refuses_other_memaudit_code_than_the_drivers(actor, monkeypatch):
    """docs/ray.md: every node needs the same memaudit. Nothing checked it: a head node running a clone and workers
    running an image's wheel of another commit scored with the workers' code, and the run recorded the driver's
    memaudit_build. (Before the fix above, a clone and a wheel of one commit had different builds, so no such
    check could be made.) The actor now compares its build with the driver's before it loads anything."""
    import audit
    from pathlib import Path

    import audit.engines.ray as r
    from audit.errors import RunError

    monkeypatch.setattr(r, "memaudit_build", lambda: "aaaaaaaaaaaa")
    cfg = r.RunConfig(inputs=("x",), device="cpu", dtype="float32")

    def make(build):
        return r.UnitScorer("m", cfg, type("SC", (), {"dtype": "float32"})(), "fp", "/shards",
                            type("H", (), {})(), None, 2, None, build=build)

    with pytest.raises(RunError) as exc:
        make("bbbbbbbbbbbb")
    assert str(exc.value) == (f"memaudit on this worker is build aaaaaaaaaaaa (version {audit.__version__}, "
                              f"{Path(audit.__file__).parent}), the driver runs build bbbbbbbbbbbb: every node must "
                              "run the same memaudit code (install the same wheel or commit on every node)")
    assert actor.loads == []  # refused before loading the model
    monkeypatch.setattr(r, "memaudit_build", lambda: "bbbbbbbbbbbb")  # the same build: loads as before
    r.UnitScorer("m", cfg, type("SC", (), {"dtype": "float32"})(), "fp", "/shards", Handle(actor.tracker), None, 2,
                 None, build="bbbbbbbbbbbb")
    assert actor.loads == [("m", "cpu", "float32")]


def test_the_ray_engine_passes_the_drivers_build_to_its_actors(monkeypatch):
    """The actors' constructor arguments carry the driver's memaudit_build: _execute is driven with a stand-in for
    ray whose dataset records map_batches' arguments and stops at the actors' stage (no cluster is started)."""
    import audit.engines.ray as r

    monkeypatch.setattr(r, "memaudit_build", lambda: "cccccccccccc")
    seen = []

    class Stop(Exception):
        pass

    class Dataset:
        def map_batches(self, fn, **kw):
            seen.append((fn, kw))
            if fn is r.UnitScorer:
                raise Stop
            return self

    fake = type("Ray", (), {"data": type("Data", (), {"from_items": staticmethod(lambda items, **kw: Dataset())})})
    cfg = r.RunConfig(inputs=("x",), device="cpu", dtype="float32")
    with pytest.raises(Stop):
        r._execute(fake, [], cfg, "/shards", None, "m", None, "fp", {"workers": 1, "threads": 1, "num_cpus": 1,
                                                                      "num_gpus": 0}, None)
    assert [fn for fn, _ in seen] == [r._read_units, r.UnitScorer]
    assert seen[1][1]["fn_constructor_kwargs"]["build"] == "cccccccccccc"


# ------------------------------------------------------------------ dependency floors

# The lowest version of each dependency with which the installed wheel ran, from a venv holding the floors of
# pyproject.toml (torch==2.13.0 CPU; 2026-12-07): run (the bundled lab model), report in every format, calibrate,
# run --calibration --cache, diff, eval, generate --mitigate always on a tiny model with a VAE. The earlier floors
# failed as the test's docstring says. typer 0.28 ran them too, but without the 0.29 internals memaudit hooks
# (an empty -o '' was taken as the working folder; flags' help read `--dry-run <bool>` on 0.29 without the hook;
# a narrow terminal's help cut option names).
# The one cap: typer below its next minor, where those internals may move (pyproject.toml says what to check).
CAPS = {"typer": (0, 30)}
VERIFIED_FLOORS = {"transformers": (5, 6, 0), "typer": (0, 29, 0), "pyarrow": (16, 0, 0), "polars": (1, 28, 1),
                   "diffusers": (0, 35, 2)}


def test_dependency_floors_admit_no_version_memaudit_fails_with():
    """pip installs memaudit beside whatever a user's environment already has, down to pyproject's floors (and up
    to its one cap, typer's: CAPS). At the floors memaudit did not work: typer 0.12 (every command: "module 'typer'
    has no attribute 'TyperException'", added in 0.28), pyarrow 15 (every run: "module 'pyarrow' has no attribute
    'string_view'", added in 16),
    transformers 4.40-5.5 (the bundled lab model, saved by transformers 5.6+ without the text_model. prefix:
    "text_encoder/ weights lack 36 tensor(s)"; 4.40's tokenizers cannot even read its tokenizer.json), polars
    1.0-1.27 (every report, diff and calibrated rerun: "shapes don't match: expected 3 elements in 'is_in'
    comparison", the is_in(list.implode()) form of 1.28), diffusers 0.30-0.35.1 beside transformers 5.6 (memaudit
    generate: "cannot import name 'FLAX_WEIGHTS_NAME' from 'transformers.utils'"). Each floor is now at least the
    verified one; at these floors all those commands ran, and eval gave the AUROCs of the newest versions."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    floors = {}
    for req in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?\s*>=\s*([0-9.]+)(?:,\s*<\s*([0-9.]+))?", req.strip())
        assert m, req  # every dependency has a floor, and a cap only where CAPS names one
        name = m.group(1).lower()
        floors[name] = tuple(int(x) for x in m.group(2).split("."))
        assert (tuple(int(x) for x in m.group(3).split(".")) if m.group(3) else None) == CAPS.get(name), req
    too_low = {name: floors.get(name) for name, least in VERIFIED_FLOORS.items()
               if floors.get(name, (0,)) + (0,) * 3 < least}
    assert too_low == {}
    assert floors["torch"] <= (2, 13)  # torch==2.13.0, the README's CPU build, is admitted
    assert set(CAPS) <= set(floors)
    from importlib.metadata import version

    assert tuple(int(x) for x in version("typer").split(".")[:2]) < CAPS["typer"]  # the installed typer is admitted


def test_the_build_changes_with_the_report_template_and_the_table_schemas(tmp_path):
    """The build identified the .py files alone: a memaudit whose report.html template or output-table schema
    had changed recorded the same build, so two pages or tables of other layouts claimed one code. The template
    and the schemas are hashed too; the lab model's files and the guides are not (the lab model has its own
    fingerprint; a guide changes no output)."""
    import subprocess
    from pathlib import Path

    from audit.build import is_code, memaudit_build

    assert [is_code(n) for n in ("cli/run.py", "templates/report.html.j2", "schemas/risk.json",
                                 "lab/model/unet/config.json", "docs/lab.md", "lab/prompts.parquet")] == \
        [True, True, True, False, False, False]
    root = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"
    _wheel_layout(root, site)
    code = "from audit.build import memaudit_build; print(memaudit_build())"
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}

    def build():
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path,
                              check=True).stdout.split()

    builds = [build()[0]]
    assert builds == [memaudit_build()]
    for name in ("templates/report.html.j2", "schemas/risk.json"):
        path = site / "audit" / name
        path.write_text(path.read_text() + "\n")
        builds += build()
    assert len(set(builds)) == 3
    (site / "audit" / "lab" / "model").mkdir(parents=True, exist_ok=True)
    (site / "audit" / "lab" / "model" / "model_index.json").write_text("{}")
    (site / "audit" / "docs").mkdir(exist_ok=True)
    (site / "audit" / "docs" / "lab.md").write_text("# another guide\n")
    assert build() == builds[-1:]
