"""ZeroMQ sockets of the tree: the supervisor binds one ROUTER, each worker a DEALER.

Who is on the other end is the kernel's word, never the peer's. libzmq reads SO_PEERCRED of
every ipc:// connection and stamps it on each message it receives from it (the "Peer-Address"
property, ``<address>:<uid>:<gid>:<pid>``). The supervisor uses it twice:

- at the handshake (ZAP, ZeroMQ's authentication hook): a connection from a process that is
  not a worker this supervisor spawned is refused before it gets a queue, a route or a byte
  delivered; an admitted one is labelled with the worker's name ("User-Id");
- on every message: its peer pid must still be the pid spawned for that name (a worker that
  was replaced is no longer anyone), else the message is dropped before it is decoded.

Routes are the ROUTER's own routing ids (workers set no identity, so a peer can never claim
one), bound to a name by the first verified message of that connection: a restarted worker is
routed from its first message, and no identity is ever handed over to another connection.
Refusals and bad frames are logged at most a few times a minute per kernel-reported pid.

Bounded everywhere: high-water marks on both sides, zero linger, and non-blocking sends that
drop (and count) rather than block a process on a dead or slow peer. The endpoint lives in the
runtime directory, which the supervisor creates with mode 0700.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import zmq

from . import messages

log = logging.getLogger(__name__)

HWM = 1000  # messages; at ~1 KiB each, a peer that stops reading costs at most ~1 MiB
ENDPOINT_NAME = "tree.ipc"
# libzmq asks the handler bound at this fixed inproc address of the socket's context.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"infoscreen-tree"
# Messages (or handshakes) handled per wake-up of the loop: the poll is level-triggered, so the
# rest waits for the next turn, and a flood cannot keep the loop from its timers (the watchdog).
MAX_BATCH = 256


def endpoint(runtime_dir: str | os.PathLike[str]) -> str:
    return f"ipc://{Path(runtime_dir) / ENDPOINT_NAME}"


def prepare_runtime_dir(runtime_dir: str | os.PathLike[str]) -> None:
    """Create the runtime dir 0700 (or tighten it); refuse one owned by someone else."""
    path = Path(runtime_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{path} is owned by uid {st.st_uid}, not by us")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


@dataclasses.dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    pid: int

    def __str__(self) -> str:
        return f"pid {self.pid} (uid {self.uid})"


def parse_peer(address: str | bytes | None) -> Peer | None:
    """The credentials libzmq appended to an ipc:// peer's address, or None (fail closed)."""
    if isinstance(address, bytes):
        address = address.decode("ascii", "replace")
    if not address:
        return None
    parts = address.rsplit(":", 3)
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() and len(p) <= 10 for p in parts[1:]):
        return None
    uid, gid, pid = (int(p) for p in parts[1:])
    return Peer(uid, gid, pid) if pid > 0 else None


class DropLog:
    """Warnings about refused peers and bad frames: at most ``burst`` per sender per window.

    Senders are kernel-reported pids (a peer cannot mint new ones by changing its identity),
    kept in a table of at most ``max_senders``; past that, every new sender shares one entry,
    and all senders together get at most ``total`` lines per window. So a flood costs a dict
    lookup per message, never a log line or memory per message.
    """

    OTHERS = -1

    def __init__(self, clock: Callable[[], float] = time.monotonic, burst: int = 5,
                 window_s: float = 60.0, max_senders: int = 64, total: int = 30) -> None:
        self.clock = clock
        self.burst = burst
        self.window_s = window_s
        self.max_senders = max_senders
        self.total = total
        self._senders: dict[int, list] = {}  # pid -> [window start, logged, suppressed]
        self._all = [-window_s, 0]  # [window start, logged] over every sender
        self.suppressed = 0

    def warn(self, sender: int | None, fmt: str, *args: object) -> bool:
        """Log unless this sender used its burst in the current window; True if logged."""
        now = self.clock()
        key = self.OTHERS if sender is None else sender
        if key not in self._senders and len(self._senders) >= self.max_senders:
            for k in [k for k, e in self._senders.items() if now - e[0] >= self.window_s]:
                del self._senders[k]
            if len(self._senders) >= self.max_senders:
                key = self.OTHERS
        if now - self._all[0] >= self.window_s:
            self._all = [now, 0]
        if self._all[1] >= self.total:
            self.suppressed += 1
            return False
        entry = self._senders.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            if entry is not None and entry[2]:
                log.warning("%d more such warnings about %s were not logged in the last %g s",
                            entry[2], "other senders" if key == self.OTHERS else f"pid {key}", self.window_s)
            self._senders[key] = [now, 1, 0]
        elif entry[1] < self.burst:
            entry[1] += 1
        else:
            entry[2] += 1
            self.suppressed += 1
            return False
        self._all[1] += 1
        log.warning(fmt, *args)
        return True


def _bound(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, messages.MAX_FRAME_BYTES)


class _Channel:
    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self.dropped = 0
        self.bad_frames = 0

    def close(self) -> None:
        self.sock.close(linger=0)


class SupervisorChannel(_Channel):
    """The supervisor's end. ``worker_of_pid(pid)`` names the worker spawned with that pid (None:
    no worker has it); until the supervisor sets it, nobody is admitted (fail closed)."""

    def __init__(self, ctx: zmq.Context, runtime_dir: str | os.PathLike[str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.worker_of_pid: Callable[[int], str | None] = lambda pid: None
        self.routes: dict[str, bytes] = {}  # worker name -> routing id of its verified connection
        self.admitted = 0  # connections admitted at the handshake
        self.refused = 0  # connections refused at the handshake
        self.unverified = 0  # messages dropped for their peer
        self.drops = DropLog(clock)
        self._euid = os.geteuid()
        # The handler first: with ZAP_ENFORCE_DOMAIN, a connection is refused while none is bound.
        self.zap = ctx.socket(zmq.ROUTER)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.setsockopt(zmq.RCVHWM, HWM)
        self.zap.setsockopt(zmq.SNDHWM, HWM)
        self.zap.bind(ZAP_ENDPOINT)
        sock = ctx.socket(zmq.ROUTER)
        _bound(sock)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        # Unroutable messages (worker gone) are dropped silently, never block or raise.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # No ROUTER_HANDOVER: a routing id belongs to one connection for its whole life.
        path = Path(runtime_dir) / ENDPOINT_NAME
        try:
            path.unlink()  # a stale endpoint of a previous run
        except FileNotFoundError:
            pass
        sock.bind(endpoint(runtime_dir))
        super().__init__(sock)

    def close(self) -> None:
        super().close()
        self.zap.close(linger=0)

    # -- who is there ------------------------------------------------------------------
    def _worker_for(self, peer: Peer | None) -> str | None:
        if peer is None or peer.uid != self._euid:
            return None
        return self.worker_of_pid(peer.pid)

    def on_zap(self) -> None:
        """Answer the handshakes waiting (call when ``self.zap`` is readable)."""
        for _ in range(MAX_BATCH):
            try:
                frames = self.zap.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self._answer_zap(frames)

    def _answer_zap(self, frames: list[bytes]) -> None:
        # RFC 27: envelope, empty delimiter, version, request id, domain, address, identity,
        # mechanism, credentials... (libzmq is the only client of this inproc endpoint)
        try:
            body = frames.index(b"") + 1
        except ValueError:
            return
        version, request_id, domain, address, _identity, mechanism = (frames[body:body + 6] + [b""] * 6)[:6]
        if version != b"1.0":
            return  # not a request we can answer; libzmq then times the handshake out
        peer = parse_peer(address)
        name = self._worker_for(peer) if domain == ZAP_DOMAIN and mechanism == b"NULL" else None
        if name is None:
            self.refused += 1
            self.drops.warn(peer.pid if peer else None,
                            "refused an IPC connection from %s: not a worker this supervisor started",
                            peer or f"an unknown peer ({address[:64]!r})")
            reply = [b"400", b"not a worker of this tree", b""]
        else:
            self.admitted += 1
            reply = [b"200", b"OK", name.encode()]
        try:
            self.zap.send_multipart(frames[:body] + [b"1.0", request_id, *reply, b""], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # libzmq's side is gone or full: the handshake times out, the peer is not admitted

    def _verify(self, frame: zmq.Frame) -> tuple[str | None, Peer | None]:
        try:
            peer = parse_peer(frame.get("Peer-Address"))
            admitted_as = frame.get("User-Id")
        except zmq.ZMQError:
            return None, None
        name = self._worker_for(peer)
        # The name the handshake admitted it as, and still the worker with that pid now.
        return (name if name is not None and name == admitted_as else None), peer

    # -- messages ----------------------------------------------------------------------
    def send(self, worker: str, msg: messages.Msg) -> bool:
        route = self.routes.get(worker)
        if route is None:  # not connected yet, or gone: as a full queue would, drop and count
            self.dropped += 1
            return False
        try:
            self.sock.send_multipart([route, messages.encode(msg)], flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped += 1
            return False

    def forget(self, worker: str) -> None:
        """The worker's process is gone: nothing more is sent to its connection."""
        self.routes.pop(worker, None)

    def recv(self) -> tuple[str, messages.Msg] | None:
        """One message as (worker name, message), or None for one dropped (logged, rate-limited):
        from a peer that is not the worker it was admitted as, or not a valid message."""
        frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        name, peer = self._verify(frames[-1])
        sender = peer.pid if peer else None
        if name is None:
            self.unverified += 1
            self.drops.warn(sender, "dropped an IPC message from %s: not the worker it was admitted as",
                            peer or "an unknown peer")
            return None
        self.routes[name] = frames[0].bytes
        if len(frames) != 2:
            self.bad_frames += 1
            self.drops.warn(sender, "dropped a malformed IPC message from %s (%d frames)", name, len(frames))
            return None
        try:
            return name, messages.decode(frames[1].bytes)
        except messages.BadFrame as exc:
            self.bad_frames += 1
            self.drops.warn(sender, "dropped a malformed IPC frame from %s: %s", name, str(exc)[:200])
            return None

    def drain(self) -> Iterator[tuple[str, messages.Msg]]:
        """At most MAX_BATCH messages waiting now (the loop's poll is level-triggered)."""
        for _ in range(MAX_BATCH):
            try:
                got = self.recv()
            except zmq.Again:
                return
            if got is not None:
                yield got


class WorkerChannel(_Channel):
    """A worker's end. It sets no identity: the supervisor's ROUTER names the connection, and the
    supervisor knows which worker it is from the kernel. Messages are accepted only from the
    process ``supervisor_pid`` (None: started by hand, no supervisor to check against)."""

    def __init__(self, ctx: zmq.Context, runtime_dir: str | os.PathLike[str], name: str,
                 supervisor_pid: int | None = None) -> None:
        sock = ctx.socket(zmq.DEALER)
        _bound(sock)
        sock.connect(endpoint(runtime_dir))
        super().__init__(sock)
        self.name = name
        self.supervisor_pid = supervisor_pid
        self.unverified = 0
        self.drops = DropLog()

    def send(self, msg: messages.Msg) -> bool:
        try:
            self.sock.send(messages.encode(msg), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped += 1
            return False

    def recv(self) -> messages.Msg | None:
        frame = self.sock.recv(flags=zmq.NOBLOCK, copy=False)
        if self.supervisor_pid is not None:
            # Whoever bound the endpoint (the runtime dir is writable by our uid) must be our
            # supervisor, or what it says (an ExecResult, a report) is not believed.
            try:
                peer = parse_peer(frame.get("Peer-Address"))
            except zmq.ZMQError:
                peer = None
            if peer is None or peer.pid != self.supervisor_pid or peer.uid != os.geteuid():
                self.unverified += 1
                self.drops.warn(peer.pid if peer else None,
                                "dropped an IPC message from %s: not the supervisor", peer or "an unknown peer")
                return None
        try:
            return messages.decode(frame.bytes)
        except messages.BadFrame as exc:
            self.bad_frames += 1
            self.drops.warn(self.supervisor_pid, "dropped a malformed IPC frame: %s", str(exc)[:200])
            return None

    def drain(self) -> Iterator[messages.Msg]:
        """At most MAX_BATCH messages waiting now (the loop's poll is level-triggered)."""
        for _ in range(MAX_BATCH):
            try:
                msg = self.recv()
            except zmq.Again:
                return
            if msg is not None:
                yield msg
