"""Findings of packaging memaudit, checked on a wheel and an sdist really built from this clone (``make wheel``'s
``pip wheel --no-deps .``, without build isolation so that no index is reached; setuptools' ``build_sdist``): what
a user who installs the wheel, with no clone beside it, gets. Each test fails on the code before its fix."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# SHA-256 of the Apache License 2.0 as the Apache Software Foundation publishes it
# (https://www.apache.org/licenses/LICENSE-2.0.txt; Debian's /usr/share/common-licenses/Apache-2.0 is the same file)
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A wheel and an sdist built from a copy of this clone (a copy: a build writes build/ and *.egg-info into the
    tree it builds, and other tests run beside this one); the wheel unpacked as pip installs it (``site``)."""
    base = tmp_path_factory.mktemp("built")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "__pycache__", "*.pyc",
                                                             "*.egg-info", ".pytest_cache", "memaudit-runs",
                                                             ".ray_tmp", "tmp", "runs"))
    dist = base / "dist"
    # (setuptools >= 77, pyproject's build requirement, is in the environment: torch requires setuptools)
    for command in ([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                     "--disable-pip-version-check", ".", "-w", str(dist)],
                    [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"]):
        done = subprocess.run(command, cwd=src, capture_output=True, text=True)
        assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    (wheel,) = dist.glob("memaudit-*.whl")
    (sdist,) = dist.glob("memaudit-*.tar.gz")
    site = base / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return {"wheel": wheel, "sdist": sdist, "site": site}


# ------------------------------------------------------------------ the licence text

def test_the_wheel_and_the_sdist_hold_the_apache_license_text(built):
    """pyproject.toml declared ``license = "Apache-2.0"`` but the repository had no LICENSE file, so neither the
    wheel nor the sdist carried the licence text that the Apache License itself (section 4a) asks every
    redistribution to include. LICENSE is now the Apache License 2.0, word for word, and pyproject's license-files
    puts it in the wheel's .dist-info/licenses/ (named in METADATA as License-File) and in the sdist."""
    assert hashlib.sha256((ROOT / "LICENSE").read_bytes()).hexdigest() == APACHE_2_SHA256
    with zipfile.ZipFile(built["wheel"]) as z:
        names = z.namelist()
        (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        assert hashlib.sha256(z.read(f"{info}/licenses/LICENSE")).hexdigest() == APACHE_2_SHA256
        meta = z.read(f"{info}/METADATA").decode().split("\n\n")[0].splitlines()
    assert "License-Expression: Apache-2.0" in meta and "License-File: LICENSE" in meta
    with tarfile.open(built["sdist"]) as t:
        top = t.getnames()[0].split("/")[0]
        assert hashlib.sha256(t.extractfile(f"{top}/LICENSE").read()).hexdigest() == APACHE_2_SHA256


# ------------------------------------------------------------------ the guides, for a user without a clone

def _memaudit(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``memaudit ARGS`` as an installed wheel runs it: the package from ``site`` only (the clone is neither on the
    path nor the working folder), in ``cwd``."""
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1",
           "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "audit.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def test_the_wheel_holds_the_guides_and_memaudit_docs_prints_them(built, tmp_path):
    """Messages and --help pointed to docs/lab.md, docs/architecture.md, docs/gpu.md and docs/mitigation.md, and
    the wheel held no docs/: a user who installed it had no such file anywhere. The wheel now ships the guides as
    audit/docs/*.md, and ``memaudit docs`` lists them with their folder, ``memaudit docs NAME`` prints one (byte for
    byte the repository's) and ``--path`` its installed file; all from the wheel alone, in an unrelated folder."""
    site = built["site"]
    stems = sorted(p.stem for p in (ROOT / "docs").glob("*.md"))
    assert stems == ["architecture", "audits", "gpu", "lab", "mitigation", "ray"]
    with zipfile.ZipFile(built["wheel"]) as z:
        for stem in stems:
            assert z.read(f"audit/docs/{stem}.md") == (ROOT / "docs" / f"{stem}.md").read_bytes()
    listing = _memaudit(site, tmp_path, "docs")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == stems
    assert lines[2] == "gpu           The GPU path" and lines[5] == "ray           Scaling out with Ray"
    assert lines[-1] == f"(in {site / 'audit' / 'docs'}; `memaudit docs NAME` prints one)"
    shown = _memaudit(site, tmp_path, "docs", "lab")
    assert shown.returncode == 0 and shown.stdout == (ROOT / "docs" / "lab.md").read_text(encoding="utf-8")
    for name in ("mitigation", "mitigation.md", "docs/mitigation.md"):
        where = _memaudit(site, tmp_path, "docs", name, "--path")
        assert (where.returncode, where.stdout) == (0, f"{site / 'audit' / 'docs' / 'mitigation.md'}\n")
    folder = _memaudit(site, tmp_path, "docs", "--path")
    assert (folder.returncode, folder.stdout) == (0, f"{site / 'audit' / 'docs'}\n")
    wrong = _memaudit(site, tmp_path, "docs", "setup")
    assert (wrong.returncode, wrong.stdout) == (2, "")
    assert wrong.stderr == ("memaudit: error: no guide named 'setup': the guides are architecture, audits, gpu, lab, "
                            "mitigation, ray (`memaudit docs` lists them)\n")



def test_the_wheel_runs_as_python_m_audit(built, tmp_path):
    """``python -m audit`` (for a venv whose bin/ is not on PATH) failed: no audit/__main__.py. The wheel now holds
    it, and from the wheel alone it prints memaudit's version (exit 0) and refuses a bad option as the memaudit
    script does (one line, exit 2)."""
    with zipfile.ZipFile(built["wheel"]) as z:
        assert "audit/__main__.py" in z.namelist()
    env = {"PYTHONPATH": str(built["site"]), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1",
           "HF_HUB_OFFLINE": "1", "COLUMNS": "100"}
    version = subprocess.run([sys.executable, "-m", "audit", "--version"], cwd=tmp_path, env=env, capture_output=True,
                             text=True)
    assert (version.returncode, version.stdout[:len("memaudit 0.1.0 (build ")]) == (0, "memaudit 0.1.0 (build ")
    bad = subprocess.run([sys.executable, "-m", "audit", "docs", "--nope"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("memaudit: error: No such option: --nope")

def test_a_clone_reads_its_docs_folder_and_site_packages_docs_of_another_package_is_not_taken(tmp_path, monkeypatch):
    """Where audit/ has no docs/ inside (a clone, an sdist, an editable install), the guides are the docs/ beside
    it, in a folder with a pyproject.toml; a docs/ beside an installed package without one (site-packages/docs of
    another distribution) is not taken, and memaudit docs says where it looked and what to do."""
    from audit import guides

    assert guides.guides_dir() == ROOT / "docs"  # this clone
    assert guides.find("GPU") == ROOT / "docs" / "gpu.md"
    site = tmp_path / "site-packages"
    (site / "audit").mkdir(parents=True)
    (site / "docs").mkdir()
    (site / "docs" / "index.md").write_text("# another package's docs\n")
    monkeypatch.setattr(guides, "PACKAGE", site / "audit")
    assert guides.guides_dir() is None and guides.guides() == {}
    from audit.errors import RunError

    with pytest.raises(RunError) as exc:
        guides.find("index")
    assert str(exc.value) == (f"this memaudit has no guides: neither {site / 'audit' / 'docs'} (where a wheel installs "
                              f"them) nor {site / 'docs'} (a clone's) exists; reinstall memaudit (`make wheel` in a "
                              "clone builds a wheel that holds them)")
    (site / "pyproject.toml").write_text("")  # a source tree after all
    assert guides.guides() == {"index": site / "docs" / "index.md"}


def _user_visible_strings(path: Path):
    """The string constants of a module that can reach a user: every one but docstrings, except that a typer
    command's docstring (a function decorated with ``X.command(...)``) is its --help text."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                    isinstance(first.value.value, str):
                command = any(isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command"
                              for d in getattr(node, "decorator_list", []))
                if not command:
                    docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_message_or_help_points_to_a_docs_file_and_every_pointer_names_a_guide():
    """Every pointer a user can read (messages, warnings, notes in JSON output, --help) is ``memaudit docs NAME``
    with NAME a guide ``memaudit docs`` knows, not a docs/NAME.md path a wheel user lacks. The one exception is the
    description a lab build writes into its model's memaudit.json (audit/lab/train.py), which the shipped lab model
    holds as well and no command prints; and ``memaudit docs --help`` says that it reads docs/lab.md as lab."""
    import re

    from audit import guides

    known = set(guides.guides())
    paths, named = [], []
    for path in sorted((ROOT / "audit").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, text in _user_visible_strings(path):
            if re.search(r"docs/\w+\.md", text) and rel not in ("audit/lab/train.py", "audit/cli/docs.py"):
                paths.append(f"{rel}:{line}")
            named += [(f"{rel}:{line}", name) for name in re.findall(r"`memaudit docs\s+([a-z]\w*)`", text)]
    assert paths == []
    assert [n for n in named if n[1] not in known] == []
    assert {name for _, name in named} == {"architecture", "gpu", "lab", "mitigation"}


# ------------------------------------------------------------------ --top 0: report and diff say the same

def test_report_and_diff_refuse_top_below_1_in_the_same_words(tmp_path):
    """``memaudit report RUN --top 0`` said "--top 0: must be at least 1", ``memaudit diff A B --top 0`` "--top must
    be at least 1" (no value), and diff checked --format first, so ``--top 0 --format pdf`` was refused for the
    format by diff and for --top by report. Both now name the value given, in the same line, before anything else
    (run folders that do not exist are not even looked at)."""
    from typer.testing import CliRunner

    from audit.cli import app

    missing = str(tmp_path / "nope")
    for top in ("0", "-3"):
        for extra in ([], ["--format", "pdf"]):
            said = set()
            for args in (["report", missing], ["diff", missing, missing]):
                res = CliRunner().invoke(app, [*args, "--top", top, *extra])
                assert res.exit_code == 2, (args, res.output)
                said.add(res.output)
            assert said == {f"memaudit: error: --top {top}: must be at least 1\n"}


# ------------------------------------------------------------------ the terminal report at 60, 80 and 120 columns

SOURCES = [f"logs/date=2026-11-{20 + i % 3}/part-{i % 4}.parquet" for i in range(12)]


def _calibrated_run(tmp_path):
    """A calibrated run of 12 prompts over 12 files under logs/ in 3 date partitions, a kept column app, one
    rejected row: its breakdowns have every column (flagged, rejected)."""
    from test_report_mutants import make_run

    rows = [(f"prompt number {i} about a cat", 1.0 + i * 0.37, SOURCES[i]) for i in range(12)]
    return make_run(tmp_path / "run", rows, rejects=[(SOURCES[0], "empty_prompt")], threshold=3.0,
                    extra={"app": ["studio" if i % 2 else "mobile-app-long-name" for i in range(12)]})


def _render(run, width: int, by=("app",)) -> list[str]:
    import io

    from rich.console import Console

    from audit.report import build_report, render_terminal

    console = Console(record=True, width=width, color_system=None, file=io.StringIO())
    render_terminal(build_report(run, top=2, by=list(by)), console=console)
    return console.export_text().splitlines()


def test_the_terminal_report_at_60_columns_names_every_group_and_cuts_no_number(tmp_path):
    """At exactly 60 columns (COLUMNS=60) a calibrated run's breakdown tables gave the group column 0 cells: the source
    breakdown named no file, the date and app ones 3 cells ("stu / dio"), and rich cut what no longer fit ("1.0000"
    printed as "1.000", "rows" as "row", "rejected" as "rejecte"); the top table gave the prompt 4 cells. Where the
    group column would get fewer than 10 cells (or its longest label) a breakdown is now one block a group: the
    label on its own line, whole, and under it each number named, as the top prompts are below 60 columns (and now
    at 60 for a calibrated run, whose prompt would get 4 cells). The numbers are the tables' own text."""
    from typer.testing import CliRunner

    from audit.cli import app

    run = _calibrated_run(tmp_path)
    lines = _render(run, 60)
    assert max(len(line) for line in lines) <= 60
    start = lines.index("By source file under logs/ (risk: mean, p95, max)")
    assert lines[start + 1:start + 4] == ["date=2026-11-20/part-0.parquet", "  rows 1  unique 1  flagged 0  rejected 1",
                                          "  risk mean 1.0000  p95 1.0000  max 1.0000"]
    shown = [lines[start + 1 + 3 * i] for i in range(12)]
    assert shown == sorted(s.removeprefix("logs/") for s in SOURCES)
    start = lines.index("By date partition (risk: mean, p95, max)")
    assert lines[start + 1:start + 4] == ["2026-11-20", "  rows 4  unique 4  flagged 2  rejected 1",
                                          "  risk mean 2.6650  p95 4.3300  max 4.3300"]
    start = lines.index("By app (risk: mean, p95, max)")
    assert lines[start + 1:start + 7] == ["studio", "  rows 6  unique 6  flagged 3",
                                          "  risk mean 3.2200  p95 5.0700  max 5.0700", "mobile-app-long-name",
                                          "  rows 6  unique 6  flagged 3", "  risk mean 2.8500  p95 4.7000  max 4.7000"]
    assert "#1  risk 5.07000  pct -  FLAG  rows 1" in lines and "prompt number 11 about a cat" in lines
    # no table cut to fit: the only tables are Counts (no header) and the histogram
    assert sum("┌" in line for line in lines) == 1 and sum("┏" in line for line in lines) == 1
    assert [line for line in lines if "┃" in line] == [next(line for line in lines if "┃ risk from ┃" in line)]
    res = CliRunner().invoke(app, ["report", str(run), "--top", "2", "--by", "app"], env={"COLUMNS": "60"})
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == lines


def _table(lines: list[str], title: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the rich table under ``title``: a row's folded cell lines joined."""
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    head, rows = None, []
    for line in lines[start + 1:]:
        if line.startswith("└"):
            break
        if line.startswith("┃"):
            head = [c.strip() for c in line.strip("┃").split("┃")]
        elif line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            if cells[1]:  # a row's first line (the rows column is never folded)
                rows.append(cells)
            else:
                rows[-1] = [a + b for a, b in zip(rows[-1], cells)]
    return head, rows


def test_the_terminal_report_at_80_and_120_columns_keeps_the_breakdown_tables(tmp_path):
    """At 80 and 120 columns the breakdowns stay tables, every column whole: at 120 each file on one line, at 80
    folded in its cell (12 cells); the numbers as at 60 columns."""
    from audit.report import breakdown_fits

    run = _calibrated_run(tmp_path)
    for width in (80, 120):
        lines = _render(run, width)
        assert max(len(line) for line in lines) <= width
        head, rows = _table(lines, "By source file under logs/ (risk: mean, p95, max)")
        assert head == ["source", "rows", "unique", "mean", "p95", "max", "flagged", "rejected"]
        assert [row[0] for row in rows] == sorted(s.removeprefix("logs/") for s in SOURCES)
        assert rows[0] == ["date=2026-11-20/part-0.parquet", "1", "1", "1.0000", "1.0000", "1.0000", "0", "1"]
        head, rows = _table(lines, "By app (risk: mean, p95, max)")
        assert rows == [["studio", "6", "6", "3.2200", "5.0700", "5.0700", "3"],
                        ["mobile-app-long-name", "6", "6", "2.8500", "4.7000", "4.7000", "3"]]
        assert any("┃ rank ┃" in line for line in lines)  # the top prompts: a table
        assert ("date=2026-11-20/part-0.parquet │" in "\n".join(lines)) == (width == 120)
    cols = ["source", "rows", "unique", "mean_risk", "p95_risk", "max_risk", "flagged", "rejected"]
    heads = ["source", "rows", "unique", "mean", "p95", "max", "flagged", "rejected"]
    cells = [["date=2026-11-20/part-0.parquet", "1", "1", "1.0000", "1.0000", "1.0000", "0", "1"]]
    # the numbers take 64 cells and the left border 1: the group column gets width - 68
    assert [breakdown_fits(cols, heads, cells, "source", w) for w in (60, 77, 78, 80)] == [False, False, True, True]
    short = [["a", *cells[0][1:]]]  # a label shorter than 10 cells needs its own width only (and the header's)
    assert [breakdown_fits(cols, heads, short, "source", w) for w in (73, 74)] == [False, True]


def test_the_top_prompts_as_blocks_print_no_none_line(tmp_path):
    """The top prompts as blocks (under 60 columns; at 60 for a calibrated run) ended with a line "None" where the
    ranks needed no note (no --confirm, every prompt on one row), the table's caption being left out then; a note
    that is needed (a prompt on 2 rows) is still printed under the blocks."""
    from test_report_mutants import make_run

    run = _calibrated_run(tmp_path)
    for width in (50, 60):
        lines = _render(run, width)
        assert "None" not in lines
        after = lines[lines.index("id: part-2.parquet#10") + 1]  # the last block's id, then the breakdowns' note
        assert after.startswith("Breakdowns: rows = scored rows of the group"), after
    twice = make_run(tmp_path / "twice", [("a cat", 2.0), ("a cat", 2.0), ("a dog", 1.0)])
    lines = _render(twice, 50, by=())
    last_id = max(i for i, line in enumerate(lines) if line.startswith("id: "))
    assert lines[last_id + 1].startswith("rank is a prompt's first row in risk.parquet;") and "None" not in lines


# ------------------------------------------------------------------ the Docker image's install

def test_the_docker_images_build_context_builds_the_wheel(tmp_path):
    """docker/Dockerfile copies pyproject.toml, README.md, audit/ and schemas/ (its .dockerignore lets in nothing
    else) and pip-installs that: with pyproject's license-files = ["LICENSE"] and the guides mapped from docs/, the
    build there failed ("Pattern 'LICENSE' did not match any files", "package directory 'docs' does not exist").
    The image now copies LICENSE and docs/ too. The test copies exactly what the Dockerfile's COPY lines name,
    checks the .dockerignore lets each in, and builds the wheel from that alone."""
    import re

    docker = ROOT / "docker"
    copied = []
    for line in (docker / "Dockerfile").read_text().splitlines():
        if m := re.match(r"COPY\s+(.+)\s+\S+$", line):
            copied += m.group(1).split()
    assert copied == ["pyproject.toml", "README.md", "LICENSE", "audit", "schemas", "docs"]
    ignore = [line.strip() for line in (docker / "Dockerfile.dockerignore").read_text().splitlines()]
    assert ignore[ignore.index("*") + 1:ignore.index("*") + 1 + len(copied)] == \
        [f"!{name}/" if (ROOT / name).is_dir() else f"!{name}" for name in copied]
    context = tmp_path / "context"
    for name in copied:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, context / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copyfile(ROOT / name, context / name)
    done = subprocess.run([sys.executable, "-c", "from setuptools import build_meta; "
                           f"print(build_meta.build_wheel({str(tmp_path / 'dist')!r}))"], cwd=context,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / "dist" / done.stdout.split()[-1]) as z:
        names = set(z.namelist())
    assert "audit/docs/lab.md" in names and "memaudit-0.1.0.dist-info/licenses/LICENSE" in names
