"""Processes that are not the tree's workers, on the tree's IPC socket, while the real tree runs:
refused at the handshake (the kernel's pid is not one the supervisor spawned), never answered,
never executed, logged a few times a minute, and the real workers keep their routes."""

from __future__ import annotations

import os
import time
import uuid

import psutil
import zmq

from infoscreen.ipc import messages
from infoscreen.ipc.channel import endpoint
from tests.support.commands import send, statuses
from tests.support.waiting import wait_until


def impostor(ctx: zmq.Context, tree, identity: bytes = b"mqtt"):
    """A DEALER that registers as the MQTT worker, with a monitor that reports its handshakes."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sock.connect(endpoint(tree.env["INFOSCREEN_RUNTIME_DIR"]))
    return sock, mon


def handshake_outcome(mon: zmq.Socket, timeout: float = 5.0) -> int:
    from zmq.utils.monitor import recv_monitor_message

    if not mon.poll(int(timeout * 1000)):
        raise TimeoutError("no handshake outcome")
    return recv_monitor_message(mon)["event"]


def test_an_impostor_registering_as_mqtt_gets_nothing_executed_nor_answered(running, device_uuid):
    """The security review's attack: a DEALER with identity `mqtt` sends an ExecRequest."""
    tree, srv = running
    ctx = zmq.Context()
    sock, mon = impostor(ctx, tree)
    try:
        forged = str(uuid.uuid4())
        sock.send(messages.encode(messages.ExecRequest(command_id=forged, action="shutdown_host")))
        sock.send(messages.encode(messages.ExecQuery(command_id=forged)))
        assert handshake_outcome(mon) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        wait_until(lambda: f"refused an IPC connection from pid {os.getpid()}" in tree.log_text(), 5,
                   what="refusal logged")
        # The real MQTT worker still has its route: a real command goes the whole way and back.
        cid = send(srv, device_uuid, "shutdown_host")
        acks = statuses(srv, device_uuid, cid, {"completed", "failed"})
        assert [a["status"] for a in acks] == ["accepted", "execution_started", "completed"]
        helper_log = tree.helper.log_text()
        assert cid in helper_log and forged not in helper_log
        assert forged not in tree.log_text()
        assert sock.poll(0) == 0  # nothing was ever answered to the impostor
        assert tree.proc.poll() is None
    finally:
        mon.close(0)
        sock.close(0)
        ctx.destroy(0)


def test_a_flood_of_wrong_peers_is_refused_rate_limited_and_bounded(running, device_uuid):
    tree, srv = running
    sup = psutil.Process(tree.pid)
    rss_before = sup.memory_info().rss
    cpu_before = sum(sup.cpu_times()[:2])
    ctx = zmq.Context()
    socks = []
    try:
        n = 60
        junk = os.urandom(60_000)  # near the frame bound: what a queue of them would cost
        for i in range(n):
            sock, mon = impostor(ctx, tree, identity=b"mqtt" if i % 2 else b"health")
            socks += [sock, mon]
            for _ in range(20):
                try:
                    sock.send(junk, flags=zmq.NOBLOCK)
                except zmq.Again:  # refused already: nothing to send to
                    break
        outcomes = [handshake_outcome(m) for m in socks[1::2]]
        assert outcomes == [zmq.EVENT_HANDSHAKE_FAILED_AUTH] * n
        text = tree.log_text()
        # One sender (this process): a few lines a minute, not one per connection or frame.
        assert 1 <= text.count(f"refused an IPC connection from pid {os.getpid()}") <= 5
        assert sum(sup.cpu_times()[:2]) - cpu_before < 2.0  # 60 handshakes, no frame read
        assert sup.memory_info().rss - rss_before < 16 * 2**20  # none of the 72 MB was queued
        # The tree is unaffected: both workers still routed, the watchdog still petted.
        tree.notify.wait_line("WATCHDOG=1", after=time.monotonic())
        cid = send(srv, device_uuid, "reboot_host")
        assert statuses(srv, device_uuid, cid, {"completed", "failed"})[-1]["status"] == "completed"
        tree.notify.wait_status(lambda s: "health=running(restarts=0)" in s and "mqtt=running(restarts=0)" in s)
    finally:
        for s in socks:
            s.close(0)
        ctx.destroy(0)
