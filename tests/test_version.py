"""One version, from one place: infoscreen.__version__, read by pyproject.toml, printed by every
program's --version (the Debian package's version is checked in tests/packaging)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from infoscreen import __version__

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ["infoscreen-simclient", "infoscreen-helper", "infoscreen-notify-failure", "infoscreenctl"]


def test_pyproject_takes_the_version_from_the_package():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "infoscreen.__version__"}
    assert version("infoscreen-client") == __version__


@pytest.mark.parametrize("prog", PROGRAMS)
def test_every_program_prints_its_version(prog):
    exe = Path(sys.executable).parent / prog
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "INFOSCREEN_ENV": "production"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{prog} {__version__}"


def test_the_top_package_imports_nothing():
    """The root helper imports it (standard library only): it holds the version and nothing else."""
    import ast
    tree = ast.parse((REPO / "infoscreen" / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
