"""Build infoscreen-client_VERSION-REVISION_ARCH.deb on this machine, for amd64 or arm64.

Run by scripts/build-deb (see there for the options). What the package holds:

* /usr/lib/infoscreen-client: a private venv (pyvenv.cfg, bin/python3 -> the Debian Python it
  was built for) whose site-packages hold this package and its dependencies, installed from
  wheels for the target architecture (the versions of the build machine's .venv, so the
  package carries what the tests ran); the launchers of the four programs; helper-entry.py, the
  root helper's entry (its unit runs `python -I -S` on it: no .pth file runs as root);
  broker-allow, for infoscreen-configure;
* /usr/bin/infoscreenctl, /usr/sbin/{infoscreen-simclient,infoscreen-notify-failure,
  infoscreen-helper,infoscreen-configure} (links into the private tree);
* the units in /lib/systemd/system, the account in /usr/lib/sysusers.d;
* /etc/infoscreen/infoscreen.env and helper.env, conffiles, root 0600, from packaging/etc;
* man pages and bash completion generated from the parsers (packaging/cli_docs.py), the docs.

The version is infoscreen.__version__ (the one place); REVISION is the packaging's own.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infoscreen import __version__  # noqa: E402

NAME = "infoscreen-client"
PREFIX = f"/usr/lib/{NAME}"
PY = "3.11"  # Debian 12's python3: the Depends names it, the wheels are for it
RUNTIME_DEPS = ("paho-mqtt", "pyzmq", "msgspec", "psutil", "sdnotify")
ARCHES = {"amd64": "x86_64", "arm64": "aarch64"}
# manylinux tags a Debian 12 (glibc 2.36) accepts, newest first.
GLIBC_MINORS = range(36, 16, -1)
PROGRAMS = {  # program -> (module:function, directory on PATH)
    "infoscreen-simclient": ("infoscreen.supervisor.main:main", "sbin"),
    "infoscreen-notify-failure": ("infoscreen.notify_failure.main:main", "sbin"),
    "infoscreenctl": ("infoscreen.ctl.cli:main", "bin"),
}
DOCS = ("operations.md", "security.md", "configuration.md", "server-integration.md", "architecture.md",
        "mqtt-worker.md")
DESCRIPTION = """\
agent of an infoscreen: supervised workers driven over MQTT
 The client of a screen of an infoscreen fleet: a supervisor (systemd
 Type=notify, watchdog) of an MQTT worker, which takes the server's commands
 with at-most-once execution and acks that survive crashes, and of a health
 worker; a socket-activated root helper that executes only signed reboot and
 power-off commands, within a reboot-loop breaker; an OnFailure alert.
 .
 Installing it starts nothing: infoscreen-configure sets the screen's
 identity, broker account and command key, then enables and starts it."""


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def pinned() -> list[str]:
    """The runtime dependencies at the versions installed where the tests ran."""
    return [f"{d}=={md.version(d)}" for d in RUNTIME_DEPS]


def fetch_wheels(arch: str, dest: Path, wheels_from: Path | None) -> list[Path]:
    """Our wheel, the pure dependencies built or fetched as wheels, the binary ones for the
    target architecture from the package index (or from wheels_from, offline)."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    run(*pip, "wheel", "--no-deps", "-w", str(dest), str(ROOT), stdout=subprocess.DEVNULL)
    machine = ARCHES[arch]
    platforms = [f"manylinux_2_{m}_{machine}" for m in GLIBC_MINORS] + [f"manylinux2014_{machine}"]
    index = ["--no-index", "--find-links", str(wheels_from)] if wheels_from else []
    for req in pinned():
        # A wheel for the target (binary or pure) when one exists; else the sdist built as a
        # pure wheel (sdnotify publishes only an sdist).
        got = subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", PY,
                              "--implementation", "cp", *[f"--platform={p}" for p in platforms + ["any"]],
                              *index, "-d", str(dest), req], capture_output=True, text=True)
        if got.returncode != 0:
            run(*pip, "wheel", "--no-deps", *index, "-w", str(dest), req, stdout=subprocess.DEVNULL)
    wheels = sorted(dest.glob("*.whl"))
    for w in wheels:
        tag = w.name.rsplit("-", 1)[1]
        if "linux" in tag and machine not in tag:
            raise SystemExit(f"build-deb: {w.name} is not for {arch}")
    return wheels


def install_tree(stage: Path, arch: str, wheels: list[Path]) -> None:
    lib = stage / PREFIX.lstrip("/")
    site = lib / f"lib/python{PY}/site-packages"
    site.mkdir(parents=True)
    # A venv by hand: what `python -m venv` writes, for a Python that is not this one.
    (lib / "pyvenv.cfg").write_text(f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {PY}\n")
    (lib / "bin").mkdir()
    os.symlink(f"../../../bin/python{PY}", lib / "bin/python3")  # relative: the Debian way
    os.symlink("python3", lib / "bin/python")
    plat = ["--platform", f"manylinux2014_{ARCHES[arch]}"] + [
        x for m in GLIBC_MINORS for x in ("--platform", f"manylinux_2_{m}_{ARCHES[arch]}")]
    run(sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "install", "--no-deps", "--no-index",
        "--no-compile", "--only-binary=:all:", "--python-version", PY, "--implementation", "cp", *plat,
        "--target", str(site), *map(str, wheels))
    shutil.rmtree(site / "bin", ignore_errors=True)  # pip's console scripts: ours are below
    strip_objects(site, arch)
    for pycache in list(site.rglob("__pycache__")):
        shutil.rmtree(pycache)
    for f in site.rglob("*"):  # modes as Debian expects them; no file writable but by root
        if f.is_file() and not f.is_symlink():
            f.chmod(0o644)  # shared objects too (lintian: shlib-with-executable-bit)
        elif f.is_dir():
            f.chmod(0o755)
        if f.name == "direct_url.json":  # names the build machine's path: not the screen's business
            f.unlink()
    for prog, (entry, where) in PROGRAMS.items():
        module, func = entry.split(":")
        # A shell launcher, exec'ing the venv's python (the same pid: the unit's main process).
        # -I: no user site, no current directory, no PYTHON* variables on the path of a program
        # run as a service; -u: unbuffered, as PYTHONUNBUFFERED would be (-I ignores it).
        launcher = lib / "bin" / prog
        launcher.write_text(f"#!/bin/sh\nexec {PREFIX}/bin/python3 -I -u -c "
                            f"'import sys; from {module} import {func}; sys.exit({func}())' \"$@\"\n")
        launcher.chmod(0o755)
        link = stage / "usr" / where / prog
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f"../lib/{NAME}/bin/{prog}", link)
    entry = lib / "helper-entry.py"
    entry.write_text(f"# infoscreen-helper entry; its unit runs it with python -I -S (no site, no .pth as root).\n"
                     f"import sys\nsys.path.append({str(Path('/') / site.relative_to(stage))!r})\n"
                     f"from infoscreen.helper.server import main\nmain()\n")
    entry.chmod(0o644)
    helper = stage / "usr/sbin/infoscreen-helper"
    helper.write_text(f"#!/bin/sh\nexec {PREFIX}/bin/python3 -I -S {PREFIX}/helper-entry.py \"$@\"\n")
    helper.chmod(0o755)
    configure = stage / "usr/sbin/infoscreen-configure"
    shutil.copy2(ROOT / "scripts/configure-device", configure)
    configure.chmod(0o755)
    shutil.copy2(ROOT / "scripts/broker-allow", lib / "broker-allow")
    (lib / "broker-allow").chmod(0o755)


STRIP = {"amd64": ("x86_64-linux-gnu-strip", "strip"), "arm64": ("aarch64-linux-gnu-strip",)}
STRIP_PACKAGE = {"amd64": "binutils", "arm64": "binutils-aarch64-linux-gnu"}


def strip_objects(site: Path, arch: str) -> None:
    """Strip the shared objects the wheels ship with their symbol tables (msgspec's, psutil's),
    as dh_strip does: code unchanged, symbols gone. Objects without a symbol table (those
    auditwheel already stripped and patched) are left alone."""
    tool = next((t for t in STRIP[arch] if shutil.which(t)), None)
    if tool is None:
        raise SystemExit(f"build-deb: {STRIP[arch][0]} is missing (apt install {STRIP_PACKAGE[arch]})")
    for f in sorted(site.rglob("*.so*")):
        if f.is_file() and not f.is_symlink() and _has_symtab(f):
            run(tool, "--strip-unneeded", "--remove-section=.comment", "--remove-section=.note", str(f))


def _has_symtab(path: Path) -> bool:
    """Does this ELF file hold a .symtab section (64-bit little-endian: amd64 and arm64)?"""
    import struct
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]
    for name, *_ in sections:
        end = data.index(b"\0", names_off + name)
        if data[names_off + name:end] == b".symtab":
            return True
    return False


def install_system_files(stage: Path) -> None:
    units = stage / "lib/systemd/system"
    units.mkdir(parents=True)
    for f in sorted((ROOT / "systemd").iterdir()):
        text = f.read_text().replace("/opt/infoscreen/venv", PREFIX)
        text = text.replace("/opt/infoscreen/docs/", f"/usr/share/doc/{NAME}/")
        text = text.replace("Installed by scripts/install-device", "Installed by the infoscreen-client package")
        (units / f.name).write_text(text)
        (units / f.name).chmod(0o644)
    sysusers = stage / "usr/lib/sysusers.d"
    sysusers.mkdir(parents=True)
    shutil.copy2(ROOT / "packaging/debian/sysusers.conf", sysusers / f"{NAME}.conf")
    etc = stage / "etc/infoscreen"
    etc.mkdir(parents=True)
    share = stage / f"usr/share/{NAME}"
    share.mkdir(parents=True)
    for name in ("infoscreen.env", "helper.env"):
        shutil.copy2(ROOT / "packaging/etc" / name, etc / name)
        (etc / name).chmod(0o600)  # conffiles holding credentials once configured
        shutil.copy2(ROOT / "packaging/etc" / name, share / name)  # infoscreen-configure's templates
        (share / name).chmod(0o644)
    doc = stage / f"usr/share/doc/{NAME}"
    doc.mkdir(parents=True)
    for name in DOCS:
        shutil.copy2(ROOT / "docs" / name, doc / name)
    shutil.copy2(ROOT / "packaging/debian/copyright", doc / "copyright")
    _gzip(ROOT / "CHANGELOG.md", doc / "changelog.gz")
    _gzip_text(f"{NAME} ({deb_version.value}) stable; urgency=medium\n\n"
               f"  * Built from infoscreen-client {__version__} (CHANGELOG in changelog.gz).\n\n"
               f" -- {MAINTAINER}  {_date()}\n", doc / "changelog.Debian.gz")
    gen = Path(tempfile.mkdtemp(prefix="infoscreen-cli-docs."))
    run(sys.executable, str(ROOT / "packaging/cli_docs.py"), "man", str(gen / "man"))
    run(sys.executable, str(ROOT / "packaging/cli_docs.py"), "completion", str(gen / "completion"))
    for page in sorted((gen / "man").iterdir()):
        section = page.suffix.lstrip(".")
        d = stage / f"usr/share/man/man{section}"
        d.mkdir(parents=True, exist_ok=True)
        _gzip(page, d / f"{page.name}.gz")
    comp = stage / "usr/share/bash-completion/completions"
    comp.mkdir(parents=True)
    for f in sorted((gen / "completion").iterdir()):
        shutil.copy2(f, comp / f.name)
        (comp / f.name).chmod(0o644)
    shutil.rmtree(gen)


MAINTAINER = "infoscreen-client developers <infoscreen-client@users.noreply.github.com>"


class deb_version:  # noqa: N801 - set once in main: VERSION-REVISION
    value = ""


def _date() -> str:
    # Reproducible: SOURCE_DATE_EPOCH when set (as Debian's tools do), else the last commit's date.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        try:
            epoch = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%ct"], capture_output=True,
                                   text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            epoch = "0"
    from email.utils import formatdate
    return formatdate(int(epoch or 0), usegmt=False).replace("-0000", "+0000")


def _gzip(src: Path, dest: Path) -> None:
    _gzip_bytes(src.read_bytes(), dest)


def _gzip_text(text: str, dest: Path) -> None:
    _gzip_bytes(text.encode(), dest)


def _gzip_bytes(data: bytes, dest: Path) -> None:
    with open(dest, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as f:
        f.write(data)
    dest.chmod(0o644)


def glibc_needed(stage: Path) -> str:
    """The newest GLIBC_2.x symbol version any shipped ELF object asks for."""
    need = (2, 17)
    for f in stage.rglob("*.so*"):
        if f.is_file() and not f.is_symlink():
            for m in re.finditer(rb"GLIBC_2\.(\d+)", f.read_bytes()):
                need = max(need, (2, int(m.group(1))))
    return f"{need[0]}.{need[1]}"


def control(stage: Path, arch: str) -> None:
    deb = stage / "DEBIAN"
    deb.mkdir()
    size_kib = sum(f.stat().st_size for f in stage.rglob("*") if f.is_file() and not f.is_symlink()) // 1024 + 1
    (deb / "control").write_text(
        f"Package: {NAME}\nVersion: {deb_version.value}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\n"
        f"Installed-Size: {size_kib}\nDepends: python{PY}, libc6 (>= {glibc_needed(stage)}), systemd\n"
        f"Section: admin\nPriority: optional\nDescription: {DESCRIPTION}\n")
    (deb / "conffiles").write_text("/etc/infoscreen/helper.env\n/etc/infoscreen/infoscreen.env\n")
    for script in ("postinst", "prerm", "postrm"):
        shutil.copy2(ROOT / "packaging/debian" / script, deb / script)
        (deb / script).chmod(0o755)
    sums = []
    for f in sorted(stage.rglob("*")):
        if f.is_file() and not f.is_symlink() and deb not in f.parents:
            sums.append(f"{hashlib.md5(f.read_bytes()).hexdigest()}  {f.relative_to(stage)}\n")  # noqa: S324 - dpkg's format
    (deb / "md5sums").write_text("".join(sums))
    for f in deb.iterdir():
        if f.name not in ("postinst", "prerm", "postrm"):
            f.chmod(0o644)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="build-deb", description="Build the Debian package of infoscreen-client.")
    ap.add_argument("--arch", choices=sorted(ARCHES), required=True)
    ap.add_argument("--out", default=str(ROOT / "dist"), help="directory for the .deb (default: dist/)")
    ap.add_argument("--revision", default="1", help="the Debian revision (default: 1)")
    ap.add_argument("--wheels", help="take every wheel from this directory (offline; no package index)")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"[0-9][0-9A-Za-z.+~]*", args.revision):
        ap.error("--revision: digits, letters, . + ~")
    deb_version.value = f"{__version__}-{args.revision}"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="infoscreen-deb."))
    try:
        stage = work / "root"
        wheels = fetch_wheels(args.arch, work / "wheels", Path(args.wheels).resolve() if args.wheels else None)
        install_tree(stage, args.arch, wheels)
        install_system_files(stage)
        control(stage, args.arch)
        for d in [stage, *[p for p in stage.rglob("*") if p.is_dir()]]:
            d.chmod(0o755)
        target = out / f"{NAME}_{deb_version.value}_{args.arch}.deb"
        run("dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(stage), str(target), stdout=subprocess.DEVNULL)
        print(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
