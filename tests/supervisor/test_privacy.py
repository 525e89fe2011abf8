"""What a process of the service's own uid can learn of the tree: each child's environment is an
allow-list built from the configuration, and no process of the tree is dumpable (its environ,
memory and ptrace are closed to same-uid processes without CAP_SYS_PTRACE)."""

from __future__ import annotations

import ctypes
import errno
import subprocess
import sys

import pytest

from infoscreen.supervisor.process import PROCESS_VARS, WORKER_VARS
from tests.support.waiting import wait_until

CANARIES = {"AWS_SECRET_ACCESS_KEY": "canary-aws", "INFOSCREEN_CANARY": "canary-inf", "HOME": "/root"}

# Loaded through PYTHONPATH by every Python of the tree (the tree's environment passes it on):
# gives up every capability, so the tree runs as a uid with no privilege, as the unit's
# CapabilityBoundingSet= makes it on a device.
NO_CAPS = """\
import ctypes
_libc = ctypes.CDLL(None, use_errno=True)
for _cap in range(int(open("/proc/sys/kernel/cap_last_cap").read()) + 1):
    _libc.prctl(24, _cap, 0, 0, 0)  # PR_CAPBSET_DROP: nothing regained at the next exec

class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

assert _libc.capset(ctypes.byref(_Header(0x20080522, 0)), ctypes.byref((_Data * 2)())) == 0
"""

# A process of the same uid, also without capabilities, that tries what an attacker would.
PROBE = r"""
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
out = {}
for pid in map(int, sys.argv[1:]):
    try:
        open(f"/proc/{pid}/environ", "rb").read()
        environ = 0
    except OSError as exc:
        environ = exc.errno
    seized = libc.ptrace(0x4206, pid, None, None)  # PTRACE_SEIZE: attach without stopping it
    out[pid] = {"environ": environ, "ptrace": 0 if seized == 0 else ctypes.get_errno()}
print(json.dumps(out))
"""


def environ_of(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if e)


def cap_eff(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


def test_each_worker_gets_only_its_allow_list(tree_factory, broker, device_uuid):
    tree = tree_factory(broker, device_uuid, env={**CANARIES, "DISPLAY_PROCESS_USER": "nobody"}).start()
    password = tree.env["MQTT_PASSWORD_BROKER"]
    assert password and tree.env["NOTIFY_SOCKET"]
    workers = tree.workers()
    assert set(workers) == {"mqtt", "health"}
    for name, pid in workers.items():
        env = environ_of(pid)
        assert set(env) <= PROCESS_VARS | WORKER_VARS[name] | {"INFOSCREEN_SUPERVISOR_PID"}, name
        assert env["INFOSCREEN_SUPERVISOR_PID"] == str(tree.pid)
        assert not set(env) & {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", *CANARIES}, name
        assert not any(v.startswith("canary-") for v in env.values()), name
    health = environ_of(workers["health"])
    assert not [k for k in health if k.startswith("MQTT_")] and "CLIENT_UUID" not in health
    assert password not in "\0".join(health.values())
    assert health["DISPLAY_PROCESS_USER"] == "nobody" and health["DISPLAY_PROCESS_NAME"] == "display_manager"
    mqtt = environ_of(workers["mqtt"])
    assert mqtt["MQTT_PASSWORD_BROKER"] == password and mqtt["CLIENT_UUID"] == device_uuid
    assert mqtt["MQTT_USER"] == tree.env["MQTT_USER"] and mqtt["MQTT_PORT"] == str(broker.port)
    assert not [k for k in mqtt if k.startswith("DISPLAY_")]
    tree.notify.wait_status(lambda s: "broker=connected" in s, timeout=15)  # and it still works


@pytest.fixture
def no_caps_site(tmp_path):
    site = tmp_path / "nocaps"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_CAPS)
    return site


def run_probe(site, pids: list[int]) -> dict[int, dict[str, int]]:
    import json

    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, pids)], env={"PYTHONPATH": str(site)},
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return {int(k): v for k, v in json.loads(r.stdout).items()}


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "capset"), reason="no capset in this libc")
def test_no_process_of_the_tree_is_dumpable(tree_factory, broker, device_uuid, no_caps_site):
    tree = tree_factory(broker, device_uuid, helper=False, env={"PYTHONPATH": str(no_caps_site)}).start()
    pids = [tree.pid, *tree.workers().values()]
    assert len(pids) == 3
    assert [cap_eff(p) for p in pids] == [0, 0, 0]  # same uid, no privilege: the attacker's footing
    # The control: a process of the same uid and privilege that did not make itself non-dumpable.
    control = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                               env={"PYTHONPATH": str(no_caps_site), "SECRET": "x"})
    try:
        # Its sitecustomize drops the capabilities as it starts: probe it only once it has.
        wait_until(lambda: cap_eff(control.pid) == 0, 10, what="control without capabilities")
        result = run_probe(no_caps_site, [control.pid, *pids])
    finally:
        control.stdin.close()
        control.wait(5)
    assert result[control.pid] == {"environ": 0, "ptrace": 0}, result
    for pid in pids:
        assert result[pid] == {"environ": errno.EACCES, "ptrace": errno.EPERM}, (pid, result)


def test_make_non_dumpable_in_a_real_process():
    code = ("import ctypes; from infoscreen.supervisor.process import make_non_dumpable as m; "
            "libc = ctypes.CDLL(None); before = libc.prctl(3, 0, 0, 0, 0); ok = m(); "
            "print(before, ok, libc.prctl(3, 0, 0, 0, 0))")  # PR_GET_DUMPABLE = 3
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True)
    assert out.stdout.split() == ["1", "True", "0"]
