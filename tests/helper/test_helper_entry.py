"""The helper's entry script as scripts/install-device writes it, run the way its unit runs it
(`python -I -S /opt/infoscreen/venv/helper-entry.py`), in a throwaway venv holding the package:
it serves, and no .pth file of the venv runs (nothing of site-packages runs as root)."""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helper.helper_support import REPO, Helper, exchange, request

INSTALL = REPO / "scripts/install-device"
UNIT = REPO / "systemd/infoscreen-helper@.service"


def _function(name: str) -> str:
    """The text of one shell function of scripts/install-device."""
    lines = INSTALL.read_text().splitlines()
    start = lines.index(f"{name}() {{")
    end = lines.index("}", start)
    return "\n".join(lines[start : end + 1])


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv with the package in its site-packages and a .pth file that leaves a mark if site
    processing ever runs it."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin/python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()
    assert site.startswith(str(root)), site
    shutil.copytree(REPO / "infoscreen", Path(site) / "infoscreen", ignore=shutil.ignore_patterns("__pycache__"))
    mark = root / "pth-ran"
    (Path(site) / "zz-evil.pth").write_text(f"import pathlib; pathlib.Path({str(mark)!r}).touch()\n")
    (root / "site").write_text(site)
    return root


def test_entry_serves_under_python_isolated_without_site(venv, helper_env):
    python, mark = venv / "bin/python", venv / "pth-ran"
    entry = venv / "helper-entry.py"
    script = _function("helper_entry") + f'\nhelper_entry "{python}" > "{entry}"\n'
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], check=True, timeout=30, cwd=REPO)
    site = (venv / "site").read_text()
    assert f"sys.path.append({site!r})" in entry.read_text()   # the venv's, not the checkout (cwd)
    # Control: the generator ran the venv's python with site processing, so the .pth ran there.
    assert mark.exists()
    mark.unlink()

    helper = Helper(helper_env, argv=[str(python), "-I", "-S", str(entry)])
    try:
        helper.wait_audit(event="start")
        assert exchange(helper.socket_path, request())["ok"] is True
        helper.wait_audit(event="exec")
    finally:
        helper.stop()
    assert not mark.exists(), "a .pth file of the venv ran inside the helper"


def test_unit_runs_the_entry_isolated_and_without_site():
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment]
    cp.read(UNIT)
    argv = cp["Service"]["ExecStart"].split()
    assert argv == ["/opt/infoscreen/venv/bin/python", "-I", "-S", "/opt/infoscreen/venv/helper-entry.py"]
    # install-device writes the entry where the unit looks for it, next to the venv (--venv DIR
    # rewrites both paths alike).
    assert 'install -m 0644 -o root -g root "$tmpd/helper-entry.py" "$VENV/helper-entry.py"' in INSTALL.read_text()


def test_install_smoke_check_matches_the_helpers_refusal():
    """install-device checks the entry by running it with a bad INFOSCREEN_ENV: the helper must
    import everything and then refuse with the line the script looks for."""
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c",
         f"import sys; sys.path.append({str(REPO)!r}); from infoscreen.helper.server import main; main()"],
        env={"INFOSCREEN_ENV": "install-check"}, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert "refusing to start: INFOSCREEN_ENV" in proc.stderr
    assert '*"refusing to start: INFOSCREEN_ENV"*' in INSTALL.read_text()
