"""A small single-threaded event loop: one poll, one next deadline, nothing sleeps.

Every process of the tree runs on one of these. Readers and writers are ZeroMQ
sockets or plain file descriptors (a pidfd, a paho socket, the signal wake-up pipe),
all in one ``zmq.Poller``; timers are a heap, and the poll timeout is the time to the
earliest one. A callback that raises is logged with its traceback and the loop goes on:
no input, however bad, takes a process down through its loop. Signals are turned into callbacks on the loop through
``signal.set_wakeup_fd`` (the handler itself does nothing), so no code runs in
signal context. Deliberately smaller than asyncio: it costs no import time in the
worker start that the supervisor's restart latency is measured against.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import signal
import socket
import time
from collections.abc import Callable

import zmq

log = logging.getLogger(__name__)

Callback = Callable[[], None]


class Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self) -> None:
        self._poller = zmq.Poller()
        self._readers: dict[object, Callback] = {}
        self._writers: dict[object, Callback] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._signal_callbacks: dict[int, Callback] = {}
        self._wake_r: socket.socket | None = None
        self._running = False

    # -- time -----------------------------------------------------------------
    @staticmethod
    def time() -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Callback) -> Timer:
        timer = Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(self.time() + delay, callback)

    # -- file descriptors and sockets ------------------------------------------
    @staticmethod
    def _key(obj: object) -> object:
        # zmq.Poller reports plain sockets and files by descriptor: key them by their fd.
        if isinstance(obj, zmq.Socket) or isinstance(obj, int):
            return obj
        return obj.fileno()  # type: ignore[attr-defined]

    def _register(self, obj: object) -> None:
        flags = (zmq.POLLIN if obj in self._readers else 0) | (zmq.POLLOUT if obj in self._writers else 0)
        if flags:
            self._poller.register(obj, flags)
        else:
            try:
                self._poller.unregister(obj)
            except KeyError:
                pass

    def add_reader(self, obj: object, callback: Callback) -> None:
        obj = self._key(obj)
        self._readers[obj] = callback
        self._register(obj)

    def remove_reader(self, obj: object) -> None:
        obj = self._key(obj)
        if self._readers.pop(obj, None) is not None:
            self._register(obj)

    def add_writer(self, obj: object, callback: Callback) -> None:
        obj = self._key(obj)
        self._writers[obj] = callback
        self._register(obj)

    def remove_writer(self, obj: object) -> None:
        obj = self._key(obj)
        if self._writers.pop(obj, None) is not None:
            self._register(obj)

    @staticmethod
    def _call(callback: Callback) -> None:
        try:
            callback()
        except Exception:  # noqa: BLE001 - logged with its traceback; the loop goes on
            log.exception("error in %s", getattr(callback, "__qualname__", callback))

    # -- signals ---------------------------------------------------------------
    def add_signal_handler(self, signum: int, callback: Callback) -> None:
        if self._wake_r is None:
            r, w = socket.socketpair()
            r.setblocking(False)
            w.setblocking(False)
            signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
            self._wake_r, self._wake_w = r, w
            self.add_reader(r.fileno(), self._on_wakeup)
        self._signal_callbacks[signum] = callback
        signal.signal(signum, lambda *_: None)

    def _on_wakeup(self) -> None:
        assert self._wake_r is not None
        try:
            data = self._wake_r.recv(256)
        except BlockingIOError:
            return
        for signum in dict.fromkeys(data):  # each distinct signal once, in order
            cb = self._signal_callbacks.get(signum)
            if cb is not None:
                self._call(cb)

    # -- running ---------------------------------------------------------------
    def stop(self) -> None:
        self._running = False

    def _next_timeout_ms(self) -> int | None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0, int((self._timers[0][0] - self.time()) * 1000) + 1)

    def _run_due_timers(self) -> None:
        now = self.time()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.cancelled = True
                self._call(timer.callback)

    def run_once(self, max_wait_s: float | None = None) -> None:
        timeout = self._next_timeout_ms()
        if max_wait_s is not None:
            cap = int(max_wait_s * 1000)
            timeout = cap if timeout is None else min(timeout, cap)
        events = self._poller.poll(timeout)
        for obj, flags in events:
            if flags & zmq.POLLIN and obj in self._readers:
                self._call(self._readers[obj])
            if flags & zmq.POLLOUT and obj in self._writers:
                self._call(self._writers[obj])
        self._run_due_timers()

    def run_forever(self) -> None:
        self._running = True
        while self._running:
            self.run_once()
