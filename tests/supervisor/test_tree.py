"""The real tree: real processes killed with real signals, a real NOTIFY_SOCKET, a real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import msgspec
import pytest
import zmq

from infoscreen.ipc import messages
from infoscreen.ipc.channel import endpoint
from tests.support.waiting import wait_process_exit, wait_until

CRASH_AT_START = """\
import os
# Test-only: any process whose command line names this module dies at once, as a worker
# with a start-up bug would. Loaded through PYTHONPATH by every Python of the tree.
if {module!r}.encode() in open('/proc/self/cmdline', 'rb').read().split(b'\\0'):
    os._exit(3)
"""


@pytest.fixture
def tree(tree_factory, broker, device_uuid):
    return tree_factory(broker, device_uuid).start()


def test_ready_watchdog_and_status(tree):
    n = tree.notify
    assert n.values("READY") == ["1"]
    status = n.wait_status(lambda s: "mqtt=running(restarts=0)" in s and "health=running(restarts=0)" in s)
    assert "broker=" in status
    first = n.wait_line("WATCHDOG=1")
    n.wait_for(lambda recs: sum(1 for t, l in recs if l == "WATCHDOG=1" and t > first) >= 3, 5, "3 more pets")
    pets = n.times("WATCHDOG=1")
    gaps = [b - a for a, b in zip(pets, pets[1:])]
    assert max(gaps) < 0.9, gaps  # WATCHDOG_USEC=1 s: petted every ~0.5 s
    # READY=1 came only once both workers had said hello.
    log = tree.log_text()
    ready_at = n.times("READY=1")[0]
    assert log.count("starting -> running (hello)") >= 2 and ready_at


def test_broker_state_reaches_the_status_line(tree):
    tree.notify.wait_status(lambda s: "broker=connected" in s, timeout=15)


@pytest.mark.parametrize("name", ["mqtt", "health"])
def test_sigkill_a_worker_it_is_replaced(tree, name):
    old = tree.worker_pid(name)
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    new = tree.wait_running(name, after_pid=old)
    assert new != old
    tree.notify.wait_status(lambda s: f"{name}=running(restarts=1)" in s)
    assert time.monotonic() - t0 < 5
    # Healthy again: still petting the watchdog after the replacement.
    tree.notify.wait_line("WATCHDOG=1", after=time.monotonic())
    assert tree.proc.poll() is None


def test_sigstop_a_worker_is_detected_as_hung_and_replaced(tree):
    old = tree.worker_pid("health")
    t0 = time.monotonic()
    os.kill(old, signal.SIGSTOP)
    try:
        new = tree.wait_running("health", after_pid=old, timeout=10)
    finally:
        try:
            os.kill(old, signal.SIGCONT)
        except ProcessLookupError:
            pass
    elapsed = time.monotonic() - t0
    wait_process_exit(old, 5)
    assert new != old
    assert "hung (heartbeats stopped)" in tree.log_text()
    assert elapsed < 1.5 + 2.0, elapsed  # hang timeout 1.5 s in this tree, plus kill and start


def test_a_worker_crashing_at_start_escalates(tree_factory, broker, device_uuid, tmp_path):
    site = tmp_path / "crashsite"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CRASH_AT_START.format(module="infoscreen.workers.health"))
    t = tree_factory(broker, device_uuid, env={
        "PYTHONPATH": str(site), "SUPERVISOR_MAX_RESTARTS": "3", "SUPERVISOR_RESTART_WINDOW_S": "60",
    })
    t.start(wait_ready=False)
    rc = t.wait_exit(timeout=20)
    assert rc == 1
    n = t.notify
    fatal_at = n.wait_for(
        lambda recs: next((tm for tm, l in recs if l.startswith("STATUS=FATAL")), None), 1, "FATAL status"
    )
    fatal = next(l for l in n.values("STATUS") if l.startswith("FATAL"))
    assert "health" in fatal and "4 restarts in 60 s" in fatal
    assert not [tm for tm in n.times("WATCHDOG=1") if tm > fatal_at]
    assert "READY=1" not in [l for _, l in n.records]
    assert t.workers() == {}


def test_sigkill_the_supervisor_workers_exit_by_themselves(tree):
    workers = tree.workers()
    assert set(workers) == {"mqtt", "health"}
    os.kill(tree.pid, signal.SIGKILL)
    tree.proc.wait(5)
    for pid in workers.values():
        wait_process_exit(pid, timeout=3)


def test_sigterm_stopping_and_a_clean_exit(tree):
    workers = tree.workers()
    tree.proc.send_signal(signal.SIGTERM)
    assert tree.wait_exit(10) == 0
    assert "STOPPING=1" in [l for _, l in tree.notify.records]
    for pid in workers.values():
        wait_process_exit(pid, timeout=1)


def test_garbage_from_another_process_is_refused_and_the_tree_is_unaffected(tree):
    """Frames of every bad kind from a process that is not a worker: refused at the handshake,
    so none is read (tests/ipc/test_channel.py shows the bad frames of an admitted peer)."""
    before = tree.workers()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"intruder")
    sock.connect(endpoint(tree.env["INFOSCREEN_RUNTIME_DIR"]))
    try:
        garbage = [
            b"", b"\x00", b"not msgpack at all", os.urandom(512), msgspec.msgpack.encode({"t": "nope"}),
            msgspec.msgpack.encode({"t": "hello", "worker": 1, "pid": "x"}),
            b"\xff" * 70000,  # over the frame bound
            messages.encode(messages.ExecRequest(command_id="x", action="reboot_host")),
            messages.encode(messages.Hello(worker="mqtt", pid=tree.workers()["mqtt"])),  # an impostor
        ]
        try:  # no blocking send: once refused, the DEALER has no peer to queue for
            for frame in garbage:
                sock.send(frame, flags=zmq.NOBLOCK)
            sock.send_multipart([b"a", b"b", b"c"], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        wait_until(lambda: f"refused an IPC connection from pid {os.getpid()}" in tree.log_text(), 5,
                   what="refusal logged")
    finally:
        sock.close()
        ctx.destroy(0)
    assert tree.proc.poll() is None
    assert tree.workers() == before
    mark = time.monotonic()
    tree.notify.wait_line("WATCHDOG=1", after=mark)
    text = tree.log_text()
    assert "power action" not in text and "malformed" not in text
    assert "starting -> running" in text and text.count("-> starting") == 2  # no worker was replaced


def _run_supervisor(env_extra: dict[str, str], tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "INFOSCREEN_", "NOTIFY_"))}
    env.update({"INFOSCREEN_STATE_DIR": str(tmp_path / "s"), "INFOSCREEN_RUNTIME_DIR": str(tmp_path / "r")})
    env.update(env_extra)
    return subprocess.run([sys.executable, "-m", "infoscreen.supervisor"], env=env, capture_output=True,
                          text=True, timeout=20)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to show the refusal")
def test_production_refuses_root(tmp_path):
    r = _run_supervisor({"INFOSCREEN_ENV": "production"}, tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to run as root" in lines[0]


@pytest.mark.parametrize(
    "env,var",
    [
        ({"MQTT_PORT": "eighty"}, "MQTT_PORT"),
        ({"INFOSCREEN_ENV": "staging"}, "INFOSCREEN_ENV"),
        ({"CLIENT_UUID": "not-a-uuid"}, "CLIENT_UUID"),
        ({"HEALTH_INTERVAL_S": "-1"}, "HEALTH_INTERVAL_S"),
        ({"INFOSCREEN_ENV": "production", "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE": "1"},
         "COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE"),
        ({"MQTT_TLS": "1", "MQTT_CA_FILE": "/nonexistent/ca.pem"}, "MQTT_CA_FILE"),
    ],
)
def test_bad_config_stops_the_start_with_one_line(tmp_path, env, var):
    env = {"INFOSCREEN_ENV": "test", "MQTT_USER": "u", "MQTT_PASSWORD_BROKER": "hunter2-secret", **env}
    r = _run_supervisor(env, tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert var in lines[0]
    assert "hunter2" not in r.stderr + r.stdout


def test_env_file_is_read(tmp_path):
    f = tmp_path / "device.env"
    f.write_text("# device\nINFOSCREEN_ENV=test\nMQTT_PORT='notaport'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "INFOSCREEN_"))}
    r = subprocess.run([sys.executable, "-m", "infoscreen.supervisor", "--env-file", str(f)], env=env,
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "MQTT_PORT" in r.stderr


def test_runtime_dir_is_private_and_holds_the_endpoint(tree):
    run = tree.env["INFOSCREEN_RUNTIME_DIR"]
    st = os.stat(run)
    assert st.st_mode & 0o777 == 0o700
    assert os.path.exists(os.path.join(run, "tree.ipc"))


def test_the_supervisors_warnings_reach_the_logs_topic(tree, device_uuid, server_probe):
    from infoscreen.wire import topics

    tree.notify.wait_status(lambda s: "broker=connected" in s, timeout=15)
    srv = server_probe()
    srv.subscribe(topics.logs(device_uuid, "warn"))
    pid = tree.worker_pid("health")
    os.kill(pid, signal.SIGKILL)
    msg = srv.wait_for(topics.logs(device_uuid, "warn"),
                       lambda m: f"worker health (pid {pid}) killed by SIGKILL" in m.text, timeout=10)
    assert "supervisor" in msg.text


def test_a_send_to_a_dead_peer_never_blocks(tmp_path):
    from infoscreen.ipc.channel import HWM, WorkerChannel

    ctx = zmq.Context.instance()
    ch = WorkerChannel(ctx, tmp_path, "mqtt")  # nothing is bound there: the peer is gone
    try:
        t0 = time.monotonic()
        sent = sum(ch.send(messages.Heartbeat(worker="mqtt", pid=1, seq=i)) for i in range(HWM * 3))
        assert time.monotonic() - t0 < 2.0
        assert sent <= HWM + 10 and ch.dropped >= HWM
    finally:
        ch.close()
