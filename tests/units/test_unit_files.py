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
EXPOSURE_TARGET = {CLIENT: 1.2, NOTIFY: 2.0, HELPER: 1.5}
# The client's exposure once the installer's broker drop-in adds a non-loopback address to the IP
# allow list (systemd scores "non-localhost entries" 0.1 above "only localhost entries"): still
# within the target, since sched_setscheduler answers success without being allowed (the unit).
CLIENT_WITH_BROKER_TARGET = 1.2
BROKER_DROP_IN = "[Service]\nIPAddressAllow=192.0.2.10 2001:db8::10\n"


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
    assert exposure(str(UNITS / name)) <= EXPOSURE_TARGET[name]


def exposure(*args: str) -> float:
    r = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", *args], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    return float(m.group(1))


def scratch_root(root: Path, drop_ins: dict[str, str] | None = None) -> Path:
    """A root with the host's unit tree, the units of systemd/ in /etc and stand-in programs."""
    bindir = root / "opt/infoscreen/venv/bin"
    bindir.mkdir(parents=True)
    for prog in ("infoscreen-simclient", "infoscreen-notify-failure", "infoscreen-helper", "python"):
        (bindir / prog).write_text("#!/bin/sh\n")
        (bindir / prog).chmod(0o755)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for f in UNITS.iterdir():
        if f.suffix in (".service", ".socket"):
            shutil.copy2(f, etc / f.name)
    for rel, text in (drop_ins or {}).items():
        (etc / rel).parent.mkdir(parents=True, exist_ok=True)
        (etc / rel).write_text(text)
    return root


needs_unit_tree = pytest.mark.skipif(not Path("/usr/lib/systemd/system/sysinit.target").exists(),
                                     reason="no systemd unit tree")


@needs_analyze
@needs_unit_tree
@pytest.mark.parametrize(
    "name",
    [CLIENT, "infoscreen-notify-failure@infoscreen-simclient.service.service", HELPER_SOCKET, "infoscreen-helper@0.service"],
)
def test_verify_in_a_scratch_root(tmp_path: Path, name: str):
    """What `systemd-analyze verify` says on a device (the e2e suite runs it there too)."""
    scratch_root(tmp_path)
    r = subprocess.run(
        [ANALYZE, "verify", f"--root={tmp_path}", f"/etc/systemd/system/{name}"], capture_output=True, text=True
    )
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


@needs_analyze
@needs_unit_tree
def test_the_installers_broker_drop_in(tmp_path: Path):
    """The drop-in scripts/install-device writes for the broker's addresses: verify stays clean, the
    deny stays, and the exposure moves only by the allow list's non-loopback entry."""
    scratch_root(tmp_path, {f"{CLIENT}.d/broker.conf": BROKER_DROP_IN})
    r = subprocess.run([ANALYZE, "verify", f"--root={tmp_path}", f"/etc/systemd/system/{CLIENT}"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    assert exposure(f"--root={tmp_path}", CLIENT) <= CLIENT_WITH_BROKER_TARGET
    s = unit(CLIENT)["Service"]
    assert s["IPAddressDeny"] == "any" and s["IPAddressAllow"] == "localhost"


def size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip())
    assert m, text
    return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]


def test_client_unit_limits_fit_the_real_tree_with_headroom(tree_factory, broker, device_uuid):
    """MemoryMax=, TasksMax=, LimitNOFILE= against what a real tree uses once connected: at least
    3x (memory, tasks) and 10x (descriptors, per process) the measured use, and still a bound."""
    import psutil

    s = unit(CLIENT)["Service"]
    memory_max, tasks_max, nofile = size_bytes(s["MemoryMax"]), int(s["TasksMax"]), int(s["LimitNOFILE"])
    tree = tree_factory(broker, device_uuid).start()
    tree.notify.wait_status(lambda st: "broker=connected" in st, timeout=15)
    procs = [psutil.Process(p) for p in (tree.pid, *tree.workers().values())]
    assert len(procs) == 3
    rss = sum(p.memory_info().rss for p in procs)
    tasks = sum(p.num_threads() for p in procs)
    fds = max(p.num_fds() for p in procs)
    assert 3 * rss <= memory_max <= 512 * 2**20, (rss, memory_max)
    assert 3 * tasks <= tasks_max <= 64, (tasks, tasks_max)
    assert 10 * fds <= nofile <= 4096, (fds, nofile)


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
