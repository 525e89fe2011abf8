"""One way to start a tree: the tests' Tree (tests/support/tree.py, used by the benchmarks too)
builds its environments with the demo's (infoscreen/ctl/localtree.py), so the demo runs what the
tests check. The demo itself runs end to end in tests/ctl/test_demo.py."""

from __future__ import annotations

from infoscreen.ctl import localtree


def test_the_helper_env_is_the_trees(tmp_path):
    from tests.support import tree

    sock, state = tmp_path / "h.sock", tmp_path / "state"
    assert localtree.helper_env(sock, state) == tree.helper_env(sock, state)
    assert localtree.helper_env(sock, state, HELPER_GRACE_S="1") == tree.helper_env(sock, state, HELPER_GRACE_S="1")


def test_the_supervisor_env_is_the_trees(broker, device_uuid, tree_factory):
    t = tree_factory(broker, device_uuid)  # built, not started
    device_env = {**broker.device_env(device_uuid), "MQTT_BROKER": broker.host, "MQTT_PORT": str(broker.port)}
    expected = localtree.supervisor_env(state_dir=t.state, runtime_dir=t.runtime / "run",
                                        helper_socket=t.helper.socket, device_env=device_env,
                                        NOTIFY_SOCKET=t.notify.path, WATCHDOG_USEC="1000000")
    assert t.env == expected
    assert t.helper.env == localtree.helper_env(t.helper.socket, t.dir / "helper-state")


def test_a_child_dies_with_its_parent():
    import subprocess
    import sys

    import psutil

    # The parent starts the child with the hook, prints its pid and is SIGKILLed: the kernel
    # sends the child SIGTERM at once.
    code = ("import subprocess, sys, time; from infoscreen.ctl import localtree; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "preexec_fn=localtree.die_with_parent); print(p.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        parent.kill()
        parent.wait(5)
        child.wait(5)  # psutil.TimeoutExpired if it outlived its parent
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)
        parent.stdout.close()
        if child is not None and child.is_running():
            child.kill()
