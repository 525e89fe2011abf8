"""ZeroMQ sockets of the tree: the supervisor binds one ROUTER, each worker a DEALER.

Bounded everywhere: high-water marks on both sides, zero linger, and non-blocking
sends that drop (and count) rather than block a process on a dead or slow peer. The
endpoint lives in the runtime directory, which the supervisor creates with mode 0700,
so only processes of the service's own user can connect.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq

from . import messages

log = logging.getLogger(__name__)

HWM = 1000  # messages; at ~1 KiB each, a peer that stops reading costs at most ~1 MiB
ENDPOINT_NAME = "tree.ipc"


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
    """The supervisor's end: routes by the worker name each DEALER gives as identity."""

    def __init__(self, ctx: zmq.Context, runtime_dir: str | os.PathLike[str]) -> None:
        sock = ctx.socket(zmq.ROUTER)
        _bound(sock)
        # A restarted worker reconnects under the same name: let it take the route over.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # Unroutable messages (worker gone) are dropped silently, never block or raise.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        path = Path(runtime_dir) / ENDPOINT_NAME
        try:
            path.unlink()  # a stale endpoint of a previous run
        except FileNotFoundError:
            pass
        sock.bind(endpoint(runtime_dir))
        super().__init__(sock)

    def send(self, worker: str, msg: messages.Msg) -> bool:
        try:
            self.sock.send_multipart([worker.encode(), messages.encode(msg)], flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped += 1
            return False

    def recv(self) -> tuple[str, messages.Msg] | None:
        """One message, or None for a frame that is not a valid message (logged, dropped)."""
        frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
        if len(frames) != 2:
            self.bad_frames += 1
            log.warning("dropped a malformed IPC message (%d frames)", len(frames))
            return None
        ident, frame = frames
        try:
            return ident.decode("ascii", "replace"), messages.decode(frame)
        except messages.BadFrame as exc:
            self.bad_frames += 1
            log.warning("dropped a malformed IPC frame from %r: %s", ident[:32], str(exc)[:200])
            return None


class WorkerChannel(_Channel):
    """A worker's end, connected to the supervisor under the worker's name."""

    def __init__(self, ctx: zmq.Context, runtime_dir: str | os.PathLike[str], name: str) -> None:
        sock = ctx.socket(zmq.DEALER)
        _bound(sock)
        sock.setsockopt(zmq.IDENTITY, name.encode())
        sock.connect(endpoint(runtime_dir))
        super().__init__(sock)

    def send(self, msg: messages.Msg) -> bool:
        try:
            self.sock.send(messages.encode(msg), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped += 1
            return False

    def recv(self) -> messages.Msg | None:
        frame = self.sock.recv(flags=zmq.NOBLOCK)
        try:
            return messages.decode(frame)
        except messages.BadFrame as exc:
            self.bad_frames += 1
            log.warning("dropped a malformed IPC frame: %s", str(exc)[:200])
            return None

    def drain(self):
        """Every message waiting now (the socket is edge-polled by the loop)."""
        while True:
            try:
                msg = self.recv()
            except zmq.Again:
                return
            if msg is not None:
                yield msg
