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
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".", "-w",
                    str(dist)], cwd=src, check=True, capture_output=True, text=True)
    subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
                   cwd=src, check=True, capture_output=True, text=True)
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
