"""Health probes against real processes: found by name or pidfile, states, failures reported."""

from __future__ import annotations

import signal
import subprocess

import pytest

from infoscreen.ipc.messages import DisplayState
from infoscreen.workers.health.probes import DisplayProbe, HostProbe, collect


@pytest.fixture
def display():
    # A stand-in display process: its argv[0] is the name the probe looks for.
    p = subprocess.Popen(["bash", "-c", "exec -a display_manager sleep 60"])
    yield p
    p.kill()
    p.wait(5)


def test_display_found_by_name_and_states(display):
    from tests.support.waiting import wait_until

    probe = DisplayProbe("display_manager")
    st = wait_until(lambda: (s := probe.probe()).pid == display.pid and s, 5)
    assert st.status == "running" and st.process == "display_manager"
    display.send_signal(signal.SIGSTOP)
    assert wait_until(lambda: probe.probe().status == "stopped", 5)
    display.send_signal(signal.SIGCONT)
    display.kill()
    display.wait(5)
    st = probe.probe()
    assert st.status == "not_running" and st.pid is None


def test_display_by_pidfile(display, tmp_path):
    pidfile = tmp_path / "display.pid"
    probe = DisplayProbe("whatever", str(pidfile))
    assert probe.probe().status == "not_running"  # no pidfile yet
    pidfile.write_text(f"{display.pid}\n")
    assert probe.probe().pid == display.pid
    pidfile.write_text("garbage")
    assert probe.probe().status == "not_running"


def test_failing_probes_are_reported_not_raised(tmp_path):
    host = HostProbe(str(tmp_path / "missing-dir"), str(tmp_path / "no-boot-id"))
    report = collect(DisplayProbe("no-such-display-process"), host)
    assert report.actual_state.status == "not_running"
    assert any(e.startswith("disk:") for e in report.probe_errors)
    assert any(e.startswith("boot_id:") for e in report.probe_errors)
    assert report.host.disk_percent is None and report.host.boot_id is None
    assert report.host.memory_percent is not None and report.host.uptime_s > 0


def test_host_facts(tmp_path):
    boot = tmp_path / "boot_id"
    boot.write_text("0f0e0d0c-0000-4000-8000-000000000001\n")
    report = collect(DisplayProbe("x"), HostProbe(str(tmp_path), str(boot)))
    assert report.host.boot_id == "0f0e0d0c-0000-4000-8000-000000000001"
    assert 0 <= report.host.disk_percent <= 100 and report.probe_errors == []


NOBODY = 65534


@pytest.fixture
def displays():
    """Two processes named like the display: one of another user (the real display), one of ours
    (what any process of the tree's own uid could start to pass for it)."""
    import os
    import pwd

    if os.geteuid() != 0:
        pytest.skip("needs root to start a process as another user")
    nobody = pwd.getpwuid(NOBODY).pw_name
    # The impostor first, so a scan by name alone would find it before the real one.
    ours = subprocess.Popen(["bash", "-c", "exec -a display_manager sleep 60"])
    theirs = subprocess.Popen(["bash", "-c", "exec -a display_manager sleep 60"], user=NOBODY, group=NOBODY)
    yield nobody, theirs, ours
    for p in (theirs, ours):
        p.kill()
        p.wait(5)


@pytest.mark.parametrize("by", ["name", "uid"])
def test_display_of_another_user_is_not_the_display(displays, by):
    from tests.support.waiting import wait_until

    nobody, theirs, ours = displays
    probe = DisplayProbe("display_manager", user=nobody if by == "name" else str(NOBODY))
    st = wait_until(lambda: (s := probe.probe()).pid == theirs.pid and s, 5)
    assert st.status == "running"
    theirs.kill()
    theirs.wait(5)
    # Only ours is left: same name, wrong user, so the display is not running.
    assert probe.probe() == DisplayState(process="display_manager", pid=None, status="not_running")
    assert ours.poll() is None
    assert DisplayProbe("display_manager").probe().pid == ours.pid  # without a user it would count


def test_display_user_applies_to_the_pidfile_too(displays, tmp_path):
    nobody, theirs, ours = displays
    pidfile = tmp_path / "display.pid"
    probe = DisplayProbe("whatever", str(pidfile), user=nobody)
    pidfile.write_text(f"{ours.pid}\n")
    assert probe.probe().status == "not_running"
    pidfile.write_text(f"{theirs.pid}\n")
    assert probe.probe().pid == theirs.pid


def test_an_unknown_display_user_is_a_probe_error_not_a_match(display, tmp_path):
    host = HostProbe(str(tmp_path), str(tmp_path / "no-boot-id"))
    report = collect(DisplayProbe("display_manager", user="no-such-user-here"), host)
    assert report.actual_state.status == "unknown" and report.actual_state.pid is None
    assert any(e.startswith("display: LookupError") and "no-such-user-here" in e for e in report.probe_errors)


def test_the_tree_reports_only_the_display_of_its_user(displays, tree_factory, broker, device_uuid, server_probe):
    """DISPLAY_PROCESS_USER through the real tree: configuration -> health worker -> health topic."""
    from infoscreen.wire import topics

    nobody, theirs, ours = displays
    srv = server_probe()
    srv.subscribe(topics.health(device_uuid))
    tree_factory(broker, device_uuid, env={"DISPLAY_PROCESS_USER": nobody}).start()
    state = lambda m: m.json()["actual_state"]  # noqa: E731
    srv.wait_for(topics.health(device_uuid), lambda m: state(m)["pid"] == theirs.pid, timeout=15)
    theirs.kill()
    theirs.wait(5)
    got = srv.wait_for(topics.health(device_uuid), lambda m: state(m)["pid"] != theirs.pid, timeout=15)
    assert state(got) == {"process": "display_manager", "pid": None, "status": "not_running"}
    assert ours.poll() is None  # the same-named process of another user was there all along


IN_A_USER_NAMESPACE = r"""
import json, sys
from infoscreen.workers.health.probes import DisplayProbe, uid_as_seen_here
st = DisplayProbe("display_manager", user=sys.argv[1]).probe()
print(json.dumps({"pid": st.pid, "seen_as": uid_as_seen_here(int(sys.argv[1])),
                  "map": open("/proc/self/uid_map").read().split()}))
"""


def test_display_user_under_private_users(tmp_path):
    """The unit's PrivateUsers=yes maps only root and the service's uid: the display's user shows as
    nobody there. Still found, and still never one of our own uid's processes."""
    import json
    import os
    import shutil
    import sys

    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1)")
    uid = 1234  # the display's user, not mapped in the namespace below
    ours = subprocess.Popen(["bash", "-c", "exec -a display_manager sleep 60"])
    theirs = subprocess.Popen(["bash", "-c", "exec -a display_manager sleep 60"], user=uid, group=uid)
    try:
        r = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c", IN_A_USER_NAMESPACE,
                            str(uid)], capture_output=True, text=True, timeout=20)
        if r.returncode != 0 and "Operation not permitted" in r.stderr:
            pytest.skip("no user namespaces here")
        got = json.loads(r.stdout)
        assert got["map"] == ["0", "0", "1"]  # only our uid (root) is mapped, as under PrivateUsers
        assert got["seen_as"] == int(open("/proc/sys/kernel/overflowuid").read())
        assert got["pid"] == theirs.pid
    finally:
        for p in (theirs, ours):
            p.kill()
            p.wait(5)
