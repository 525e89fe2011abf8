"""The tree's IPC channel over a real ipc:// socket, with peers in real processes: who is admitted
is the kernel's word (SO_PEERCRED via libzmq), never the identity a peer gives."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

import msgspec
import pytest
import zmq

from infoscreen.ipc import messages
from infoscreen.ipc.channel import (
    MAX_BATCH, DropLog, Peer, SupervisorChannel, WorkerChannel, endpoint, parse_peer, prepare_runtime_dir,
)

# A peer process: connects a DEALER (with the identity given, or none), sends the frames given
# (hex), prints every frame it receives (hex, one a line) and exits when its stdin closes.
PEER = r"""
import sys, zmq
runtime, identity, *frames = sys.argv[1:]
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.setsockopt(zmq.LINGER, 0)
if identity != "-":
    s.setsockopt(zmq.IDENTITY, identity.encode())
s.connect(f"ipc://{runtime}/tree.ipc")
for f in frames:
    s.send_multipart([bytes.fromhex(p) for p in f.split(",")])
print("sent", flush=True)
poller = zmq.Poller()
poller.register(s, zmq.POLLIN)
poller.register(sys.stdin, zmq.POLLIN)
while True:
    ev = dict(poller.poll())
    if s in ev:
        print(s.recv().hex(), flush=True)
    if sys.stdin.fileno() in ev:
        sys.exit(0)
"""


@pytest.fixture
def runtime():
    d = tempfile.mkdtemp(prefix="isc-", dir="/tmp")  # ipc:// paths are limited to ~107 bytes
    prepare_runtime_dir(d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ctx():
    c = zmq.Context()  # its own: the ZAP handler's inproc address is one per context
    yield c
    c.destroy(linger=0)


@pytest.fixture
def channel(ctx, runtime):
    ch = SupervisorChannel(ctx, runtime)
    yield ch
    ch.close()


@pytest.fixture
def peers(runtime):
    made: list[subprocess.Popen] = []

    def start(*frames: messages.Msg | bytes | list[bytes], identity: str = "-") -> subprocess.Popen:
        args = []
        for f in frames:
            parts = [f] if isinstance(f, bytes) else f if isinstance(f, list) else [messages.encode(f)]
            args.append(",".join(p.hex() for p in parts))
        p = subprocess.Popen([sys.executable, "-c", PEER, runtime, identity, *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        made.append(p)
        assert p.stdout.readline().strip() == "sent"
        return p

    yield start
    for p in made:
        p.stdin.close()
        p.wait(5)


def pump(ch: SupervisorChannel, until, timeout: float = 5.0) -> list[tuple[str, messages.Msg]]:
    """Run the supervisor's side of the channel (handshakes and messages) until `until(got)`."""
    got: list[tuple[str, messages.Msg]] = []
    poller = zmq.Poller()
    poller.register(ch.zap, zmq.POLLIN)
    poller.register(ch.sock, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"not reached in {timeout} s; got {got}")
        ev = dict(poller.poll(int(left * 1000) + 1))
        if ch.zap in ev:
            ch.on_zap()
        if ch.sock in ev:
            got.extend(ch.drain())
    return got


def received(peer: subprocess.Popen) -> messages.Msg:
    return messages.decode(bytes.fromhex(peer.stdout.readline().strip()))


def test_peer_address_carries_the_kernel_credentials(ctx, runtime):
    """What the design relies on: libzmq stamps SO_PEERCRED of an ipc:// peer on each message."""
    r = ctx.socket(zmq.ROUTER)
    r.bind(endpoint(runtime))
    d = ctx.socket(zmq.DEALER)
    d.connect(endpoint(runtime))
    try:
        d.send(b"x")
        assert r.poll(5000)
        frames = r.recv_multipart(copy=False)
        assert parse_peer(frames[-1].get("Peer-Address")) == Peer(os.geteuid(), os.getegid(), os.getpid())
    finally:
        r.close(0)
        d.close(0)


@pytest.mark.parametrize("address", [
    None, "", "localhost", "localhost:1:2", "localhost:a:0:12", "localhost:0:0:0", "localhost:0:0:-5",
    "localhost:0:0:1_2", "localhost:0:0: 12", "localhost:0:0:١٢", b"\xff:0:0:1x", "x:0:0:99999999999",
])
def test_parse_peer_fails_closed(address):
    assert parse_peer(address) is None


def test_parse_peer():
    assert parse_peer("localhost:1000:1001:4242") == Peer(1000, 1001, 4242)
    assert parse_peer(b"localhost:0:0:7") == Peer(0, 0, 7)


def test_the_spawned_pid_is_admitted_under_its_name_whatever_identity_it_claims(channel, peers):
    hello = messages.Hello(worker="mqtt", pid=0)
    p = peers(hello, identity="health")  # the identity is ignored: the pid decides
    channel.worker_of_pid = lambda pid: "mqtt" if pid == p.pid else None
    got = pump(channel, lambda g: g)
    assert got == [("mqtt", hello)]
    assert channel.send("mqtt", messages.TreeStatus(workers={}, restarts={}))
    assert received(p) == messages.TreeStatus(workers={}, restarts={})
    assert channel.refused == channel.unverified == 0


def test_another_process_is_refused_at_the_handshake(channel, peers, caplog):
    worker = peers(messages.Hello(worker="mqtt", pid=0))
    channel.worker_of_pid = lambda pid: "mqtt" if pid == worker.pid else None
    pump(channel, lambda g: g)
    caplog.set_level(logging.WARNING)
    intruder = peers(messages.ExecRequest(command_id="c", action="shutdown_host"), identity="mqtt")
    pump(channel, lambda g: channel.refused >= 1)
    # Nothing of the intruder's reaches the caller, and the route stays the worker's.
    assert channel.sock.poll(0) == 0
    assert channel.send("mqtt", messages.ExecResult(command_id="c", action="shutdown_host", known=True))
    assert received(worker).command_id == "c"
    assert f"refused an IPC connection from pid {intruder.pid}" in caplog.text


def test_a_peer_admitted_then_replaced_is_not_believed(channel, peers, caplog):
    current: dict[int, str] = {}
    channel.worker_of_pid = lambda pid: current.get(pid)
    p = peers(messages.Hello(worker="mqtt", pid=1), messages.ExecRequest(command_id="c", action="reboot_host"))
    current[p.pid] = "mqtt"
    poller = zmq.Poller()
    poller.register(channel.zap, zmq.POLLIN)
    assert poller.poll(5000)
    channel.on_zap()  # admitted as mqtt at the handshake ...
    assert channel.admitted == 1
    current.clear()  # ... then the supervisor replaced that worker: the pid is nobody's now
    caplog.set_level(logging.WARNING)
    got = pump(channel, lambda g: channel.unverified >= 2)
    assert got == [] and "mqtt" not in channel.routes
    assert f"dropped an IPC message from pid {p.pid}" in caplog.text


def test_bad_frames_from_an_admitted_peer_cost_a_count_not_a_log_line_each(channel, peers, caplog):
    garbage = [b"", b"\x00", b"not msgpack", os.urandom(512), msgspec.msgpack.encode({"t": "nope"}),
               msgspec.msgpack.encode({"t": "hello", "worker": 1, "pid": "x"}), [b"a", b"b"]] * 10
    p = peers(*garbage, messages.Hello(worker="health", pid=3))
    channel.worker_of_pid = lambda pid: "health" if pid == p.pid else None
    caplog.set_level(logging.WARNING)
    got = pump(channel, lambda g: g)
    assert got == [("health", messages.Hello(worker="health", pid=3))]
    assert channel.bad_frames == len(garbage)
    lines = [r for r in caplog.records if "malformed IPC" in r.getMessage()]
    assert len(lines) == channel.drops.burst  # per sender per window, whatever the flood
    assert channel.drops.suppressed == len(garbage) - channel.drops.burst


def test_a_flood_is_handled_in_bounded_batches(ctx, runtime, channel):
    """The loop's poll is level-triggered: drain() returns after MAX_BATCH messages so timers
    (the watchdog) run between batches of a flood, and the rest comes on the next turn."""
    channel.worker_of_pid = lambda pid: "mqtt" if pid == os.getpid() else None
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(endpoint(runtime))
    try:
        n = 3 * MAX_BATCH + 10
        for i in range(n):
            d.send(messages.encode(messages.Heartbeat(worker="mqtt", pid=os.getpid(), seq=i)))
        batches: list[int] = []
        poller = zmq.Poller()
        poller.register(channel.zap, zmq.POLLIN)
        poller.register(channel.sock, zmq.POLLIN)
        deadline = time.monotonic() + 10
        while sum(batches) < n and time.monotonic() < deadline:
            ev = dict(poller.poll(1000))
            if channel.zap in ev:
                channel.on_zap()
            if channel.sock in ev:
                batches.append(len(list(channel.drain())))
        assert sum(batches) == n
        assert max(batches) == MAX_BATCH, batches
    finally:
        d.close(0)


def test_the_worker_believes_only_its_supervisor(ctx, runtime, channel):
    channel.worker_of_pid = lambda pid: "mqtt" if pid == os.getpid() else None
    mine = WorkerChannel(ctx, runtime, "mqtt", supervisor_pid=os.getpid())
    try:
        mine.send(messages.Hello(worker="mqtt", pid=os.getpid()))
        pump(channel, lambda g: g)
        result = messages.ExecResult(command_id="c", action=None, known=False)
        channel.send("mqtt", result)
        assert mine.sock.poll(5000)
        assert list(mine.drain()) == [result]
    finally:
        mine.close()
    channel.forget("mqtt")
    other = WorkerChannel(ctx, runtime, "mqtt", supervisor_pid=1)  # expects another supervisor
    try:
        other.send(messages.Hello(worker="mqtt", pid=os.getpid()))
        pump(channel, lambda g: g)
        channel.send("mqtt", messages.ExecResult(command_id="forged", action=None, known=True, ok=True))
        assert other.sock.poll(5000)
        assert list(other.drain()) == [] and other.unverified == 1
    finally:
        other.close()


def test_send_without_a_route_drops_and_counts(channel):
    assert not channel.send("mqtt", messages.TreeStatus(workers={}, restarts={}))
    assert channel.dropped == 1


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_droplog_per_sender_burst_window_and_summary(caplog):
    caplog.set_level(logging.WARNING)
    clock = Clock()
    d = DropLog(clock, burst=2, window_s=10, max_senders=4, total=100)
    assert [d.warn(7, "m %d", i) for i in range(5)] == [True, True, False, False, False]
    assert d.warn(8, "other")  # another sender has its own burst
    clock.t += 10
    assert d.warn(7, "again")
    assert "3 more such warnings about pid 7" in caplog.text


def test_droplog_table_and_total_are_bounded():
    clock = Clock()
    d = DropLog(clock, burst=1, window_s=10, max_senders=4, total=6)
    logged = sum(d.warn(pid, "x") for pid in range(100))
    assert logged == 5  # four senders, then every new one shares a single entry
    assert len(d._senders) == 5 and d.suppressed == 95
    clock.t += 10  # old entries expire and make room
    assert sum(d.warn(pid, "x") for pid in range(200, 220)) == 5
    assert len(d._senders) <= 5
    d2 = DropLog(clock, burst=100, window_s=10, max_senders=100, total=3)
    assert sum(d2.warn(pid, "x") for pid in range(10)) == 3  # all senders together
