"""The unit files of systemd/, checked without booting anything (tests/e2e boots them for real):
`systemd-analyze verify` against a scratch root, the `systemd-analyze security --offline=yes`
exposure targets, and the restart arithmetic of docs/operations.md."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from infoscreen.config import load_config

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
CLIENT = "infoscreen-simclient.service"
NOTIFY = "infoscreen-notify-failure@.service"
HELPER = "infoscreen-helper@.service"
HELPER_SOCKET = "infoscreen-helper.socket"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
EXPOSURE_TARGET = {CLIENT: 2.0, NOTIFY: 2.0, HELPER: 1.5}


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment]
    cp.read(UNITS / name)
    return cp


def seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|min)?", text.strip())
    assert m, text
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "min": 60, None: 1}[m.group(2)]


@needs_analyze
@pytest.mark.parametrize("name", sorted(EXPOSURE_TARGET))
def test_exposure_within_target(name: str):
    r = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(UNITS / name)], capture_output=True, text=True
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= EXPOSURE_TARGET[name], r.stdout


@needs_analyze
@pytest.mark.skipif(not Path("/usr/lib/systemd/system/sysinit.target").exists(), reason="no systemd unit tree")
@pytest.mark.parametrize(
    "name",
    [CLIENT, "infoscreen-notify-failure@infoscreen-simclient.service.service", HELPER_SOCKET, "infoscreen-helper@0.service"],
)
def test_verify_in_a_scratch_root(tmp_path: Path, name: str):
    """What `systemd-analyze verify` says on a device (the e2e suite runs it there too)."""
    bindir = tmp_path / "opt/infoscreen/venv/bin"
    bindir.mkdir(parents=True)
    for prog in ("infoscreen-simclient", "infoscreen-notify-failure", "infoscreen-helper", "python"):
        (bindir / prog).write_text("#!/bin/sh\n")
        (bindir / prog).chmod(0o755)
    (tmp_path / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr/lib/systemd/system", symlinks=True)
    etc = tmp_path / "etc/systemd/system"
    etc.mkdir(parents=True)
    for f in UNITS.iterdir():
        if f.suffix in (".service", ".socket"):
            shutil.copy2(f, etc / f.name)
    r = subprocess.run(
        [ANALYZE, "verify", f"--root={tmp_path}", f"/etc/systemd/system/{name}"], capture_output=True, text=True
    )
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_client_unit_essentials():
    s = unit(CLIENT)["Service"]
    u = unit(CLIENT)["Unit"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main" and s["WatchdogSec"] == "60"
    assert s["Restart"] == "on-failure" and s["KillMode"] == "control-group"
    assert s["User"] == s["Group"] == "infoscreen"
    assert s["EnvironmentFile"] == "/etc/infoscreen/infoscreen.env"
    assert s["StateDirectory"] == s["RuntimeDirectory"] == "infoscreen"
    assert s["RuntimeDirectoryMode"] == "0700"
    assert s["ExecStart"] == "/opt/infoscreen/venv/bin/infoscreen-simclient"
    assert s["CapabilityBoundingSet"] == ""
    assert u["OnFailure"] == "infoscreen-notify-failure@%n.service"
    # the supervisor reads boot_id and sees the display process: no hidepid, no subset=pid
    assert s["ProtectProc"] == "default" and s["ProcSubset"] == "all"


def test_helper_units_essentials():
    """The privilege boundary's directives (docs/security.md, "The units")."""
    s, sock = unit(HELPER)["Service"], unit(HELPER_SOCKET)["Socket"]
    assert sock["SocketMode"] == "0660" and sock["SocketUser"] == "root" and sock["SocketGroup"] == "infoscreen"
    assert sock["Accept"] == "yes" and sock["ListenStream"] == "/run/infoscreen-helper/helper.sock"
    assert s["User"] == s["Group"] == "root"
    assert s["CapabilityBoundingSet"] == "" and s["AmbientCapabilities"] == ""
    assert s["NoNewPrivileges"] == "yes" and s["SecureBits"].split() == ["noroot", "noroot-locked"]
    assert s["PrivateNetwork"] == "yes" and s["RestrictAddressFamilies"] == "AF_UNIX"
    assert s["ProtectSystem"] == "strict" and s["PrivateUsers"] == "no"
    # isolated, no site processing: no .pth file of the venv runs as root
    assert s["ExecStart"].split()[:3] == ["/opt/infoscreen/venv/bin/python", "-I", "-S"]
    assert s["EnvironmentFile"] == "-/etc/infoscreen/helper.env"
    for u in (unit(HELPER), unit(HELPER_SOCKET)):
        assert u["Unit"]["Documentation"] == "file:///opt/infoscreen/docs/security.md"
    # an instance cannot outlive its longest legitimate life: read + pre-flight + grace + action
    assert seconds(s["RuntimeMaxSec"]) > 30 + 3 + 60 + 30


def test_restart_arithmetic_lets_the_start_limit_fire():
    """docs/operations.md, "Restart arithmetic": five lives of the longest kind that still is a
    crash loop must fit in StartLimitIntervalSec, else systemd's rate limiter resets before the
    sixth start and OnFailure= never fires; and RestartSec must not let systemd's default
    behaviour (a fast crash burning the burst within a second) return."""
    u, s = unit(CLIENT)["Unit"], unit(CLIENT)["Service"]
    burst = int(u["StartLimitBurst"])
    interval = seconds(u["StartLimitIntervalSec"])
    restart_sec = seconds(s["RestartSec"])
    start = seconds(s["TimeoutStartSec"])
    stop = seconds(s["TimeoutStopSec"])  # also TimeoutAbortSec after the watchdog's SIGABRT
    watchdog = seconds(s["WatchdogSec"])
    cfg = load_config({})  # the supervisor's defaults: more than max_restarts in restart_window_s
    escalation_life = start + cfg.restart_window_s  # worker crash loop -> supervisor exits
    hang_life = start + watchdog + stop  # hung supervisor -> watchdog SIGABRT -> SIGKILL
    longest = max(escalation_life, hang_life)
    assert burst * (longest + restart_sec) < interval, (burst, longest, restart_sec, interval)
    assert restart_sec >= 1
    # a bad configuration (exit 2 at once) fails the unit within a minute
    assert burst * (restart_sec + 1) < 60
