"""scripts/build-deb: both architectures build on this machine, lintian finds no error (and only
the warnings the build script explains), and the package holds what a screen needs. Installing,
upgrading and purging it under a real systemd: tests/e2e/test_e2e_package.py."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tarfile
import io
from pathlib import Path

import pytest

from infoscreen import __version__

REPO = Path(__file__).resolve().parents[2]
ARCHES = {"amd64": 0x3E, "arm64": 0xB7}  # ELF e_machine: x86-64, AArch64

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("debs")
    built = {}
    for arch in ARCHES:
        r = subprocess.run([str(REPO / "scripts/build-deb"), "--arch", arch, "--out", str(out)], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        built[arch] = Path(r.stdout.strip().splitlines()[-1])
    return built


def members(deb: Path) -> dict[str, tarfile.TarInfo]:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.removeprefix("./"): m for m in tar.getmembers()}


def read(deb: Path, name: str) -> bytes:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        f = tar.extractfile("./" + name)
        assert f is not None, name
        return f.read()


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True).stdout.strip()


def explained_warnings() -> set[str]:
    text = (REPO / "scripts/build-deb").read_text()
    return set(re.findall(r"^# - ([a-z0-9-]+)", text, re.M))


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_lintian_finds_no_error_and_only_explained_warnings(debs, arch):
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (scripts/test installs it)")
    r = subprocess.run(["lintian", "--tag-display-limit", "0", str(debs[arch])], capture_output=True, text=True,
                       timeout=300)
    tags = [line for line in r.stdout.splitlines() if re.match(r"[EWIXP]: ", line)]
    assert not [t for t in tags if t.startswith("E:")], tags
    warned = {t.split()[2] for t in tags if t.startswith("W:")}
    assert warned <= explained_warnings(), f"warnings without a reason in scripts/build-deb: {warned - explained_warnings()}"


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_the_control_fields(debs, arch):
    deb = debs[arch]
    assert deb.name == f"infoscreen-client_{__version__}-1_{arch}.deb"
    assert field(deb, "Version") == f"{__version__}-1" and field(deb, "Architecture") == arch
    depends = field(deb, "Depends")
    assert "python3.11" in depends and "systemd" in depends and re.search(r"libc6 \(>= 2\.\d+\)", depends)
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True,
                               check=True).stdout.split()
    assert conffiles == ["/etc/infoscreen/helper.env", "/etc/infoscreen/infoscreen.env"]


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_the_files_a_screen_needs(debs, arch):
    deb = debs[arch]
    m = members(deb)
    for name in ("etc/infoscreen/infoscreen.env", "etc/infoscreen/helper.env"):
        assert m[name].mode == 0o600 and m[name].uid == 0, name
    for unit in ("infoscreen-simclient.service", "infoscreen-helper.socket", "infoscreen-helper@.service",
                 "infoscreen-notify-failure@.service"):
        text = read(deb, f"lib/systemd/system/{unit}").decode()
        assert "/opt/infoscreen" not in text, unit
        for exe in re.findall(r"^ExecStart=(\S+)", text, re.M):
            assert exe.replace("/", "", 1) in m or exe.lstrip("/") in m, (unit, exe)
    assert "u infoscreen " in read(deb, "usr/lib/sysusers.d/infoscreen-client.conf").decode()
    for prog, place in (("infoscreenctl", "usr/bin"), ("infoscreen-simclient", "usr/sbin"),
                        ("infoscreen-notify-failure", "usr/sbin"), ("infoscreen-helper", "usr/sbin"),
                        ("infoscreen-configure", "usr/sbin")):
        assert f"{place}/{prog}" in m, prog
        section = 1 if prog == "infoscreenctl" else 8
        assert f"usr/share/man/man{section}/{prog}.{section}.gz" in m, prog
    assert "usr/share/bash-completion/completions/infoscreenctl" in m
    assert not [n for n in m if "__pycache__" in n or n.endswith(".pyc") or n.endswith("direct_url.json")]
    site = "usr/lib/infoscreen-client/lib/python3.11/site-packages/"
    assert f"{site}infoscreen/helper/server.py" in m
    assert repr("/" + site.rstrip("/")) in read(deb, "usr/lib/infoscreen-client/helper-entry.py").decode()
    assert m["usr/lib/infoscreen-client/bin/python3"].linkname == "../../../bin/python3.11"
    # Every shared object is for the target architecture.
    objects = [n for n in m if n.startswith(site) and re.search(r"\.so(\.|$)", n) and m[n].isfile()]
    assert objects
    for n in objects:
        head = read(deb, n)[:20]
        assert head[:4] == b"\x7fELF" and struct.unpack_from("<H", head, 18)[0] == ARCHES[arch], n


def test_the_version_comes_from_one_place(debs):
    for arch, deb in debs.items():
        assert field(deb, "Version").split("-")[0] == __version__
    meta = read(debs["amd64"], next(n for n in members(debs["amd64"]) if n.endswith(
        f"infoscreen_client-{__version__}.dist-info/METADATA"))).decode()
    assert f"Version: {__version__}" in meta
