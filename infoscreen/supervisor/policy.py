"""The per-worker supervision policy: a state x event table, with OS calls behind a boundary.

Pure logic. It owns no process and reads no clock: the caller passes ``now`` and a
:class:`ProcessControl` (the real one spawns and signals processes; tests pass a
recorder), and reads :attr:`WorkerPolicy.deadline` to know when to call back with
``Event.DEADLINE``. Every transition goes through :meth:`WorkerPolicy._enter`, the
one place a state changes.
"""

from __future__ import annotations

import dataclasses
import signal
from collections import deque
from collections.abc import Callable
from typing import Protocol

from .states import LIVE, Event, State


class ProcessControl(Protocol):
    def spawn(self, worker: str) -> int:
        """Start the worker's process; returns its pid."""

    def kill(self, pid: int, sig: int) -> None:
        """Send a signal; a process that is already gone is not an error."""


@dataclasses.dataclass(frozen=True)
class Params:
    hang_timeout_s: float = 10.0  # heartbeats every 2 s: five missed ones is a hang, not a hiccup
    start_timeout_s: float = 10.0  # spawn to hello; a worker imports and opens sockets in ~0.2 s
    stop_grace_s: float = 5.0  # SIGTERM to SIGKILL on shutdown: time to flush and close cleanly
    hung_grace_s: float = 0.3  # SIGTERM to SIGKILL for a hung worker: its loop cannot run a handler
    stable_after_s: float = 2.0  # ready this long = it did real work; restart at once
    backoff_base_s: float = 0.25
    backoff_cap_s: float = 10.0
    max_restarts: int = 5  # more than this many restarts ...
    restart_window_s: float = 60.0  # ... within this window escalates (Erlang's intensity/period)


@dataclasses.dataclass
class Transition:
    worker: str
    old: State
    new: State
    reason: str


class WorkerPolicy:
    def __init__(
        self,
        name: str,
        params: Params,
        control: ProcessControl,
        on_transition: Callable[[Transition], None] = lambda t: None,
    ) -> None:
        self.name = name
        self.params = params
        self.control = control
        self.on_transition = on_transition
        self.state = State.STOPPED
        self.pid: int | None = None
        self.deadline: float | None = None
        self.ready_since: float | None = None
        self.ever_ready = False
        self.restarts: deque[float] = deque()
        self.restart_count = 0
        self.consecutive_failures = 0
        self.shutting_down = False
        self.reason = ""
        self._table: dict[tuple[State, Event], Callable[[float], None]] = {
            (State.STOPPED, Event.START): self._spawn,
            (State.BACKOFF, Event.DEADLINE): self._spawn,
            (State.BACKOFF, Event.STOP): self._stopped,
            (State.STARTING, Event.HELLO): self._ready,
            (State.RUNNING, Event.HELLO): self._alive,
            (State.RUNNING, Event.HEARTBEAT): self._alive,
            (State.STARTING, Event.DEADLINE): self._hung,
            (State.RUNNING, Event.DEADLINE): self._hung,
            (State.STOPPING, Event.DEADLINE): self._force_kill,
            (State.STARTING, Event.EXITED): self._exited,
            (State.RUNNING, Event.EXITED): self._exited,
            (State.STOPPING, Event.EXITED): self._exited,
            (State.STARTING, Event.STOP): self._terminate,
            (State.RUNNING, Event.STOP): self._terminate,
            (State.STOPPING, Event.STOP): self._mark_shutdown,
            (State.FATAL, Event.STOP): self._mark_shutdown,
        }

    # -- the public surface ---------------------------------------------------------
    def handle(self, event: Event, now: float) -> None:
        """Apply one event; events with no row for the current state are ignored."""
        action = self._table.get((self.state, event))
        if action is not None:
            action(now)

    @property
    def live(self) -> bool:
        return self.state in LIVE

    @property
    def within_budget(self) -> bool:
        return self.state is not State.FATAL

    # -- the one transition point ---------------------------------------------------
    def _enter(self, new: State, reason: str, deadline: float | None) -> None:
        old, self.state, self.reason, self.deadline = self.state, new, reason, deadline
        if old is not new or reason:
            self.on_transition(Transition(self.name, old, new, reason))

    # -- actions -----------------------------------------------------------------------
    def _spawn(self, now: float) -> None:
        try:
            self.pid = self.control.spawn(self.name)
        except OSError as exc:  # cannot even start it: count it like an early exit
            self.pid = None
            self._enter(State.STARTING, f"spawn failed: {exc.strerror or exc}", None)
            self._exited(now)
            return
        self.ready_since = None
        self._enter(State.STARTING, f"pid {self.pid}", now + self.params.start_timeout_s)

    def _ready(self, now: float) -> None:
        self.ready_since = now
        self.ever_ready = True
        self._enter(State.RUNNING, "hello", now + self.params.hang_timeout_s)

    def _alive(self, now: float) -> None:
        self.deadline = now + self.params.hang_timeout_s  # no transition: just liveness

    def _hung(self, now: float) -> None:
        what = "no hello" if self.state is State.STARTING else "heartbeats stopped"
        self._signal(signal.SIGTERM)
        self._enter(State.STOPPING, f"hung ({what}); SIGTERM", now + self.params.hung_grace_s)

    def _force_kill(self, now: float) -> None:
        self._signal(signal.SIGKILL)
        # Stay in STOPPING; the pidfd tells us when it is gone. Re-arm in case it never is.
        self.deadline = now + self.params.stop_grace_s

    def _terminate(self, now: float) -> None:
        self.shutting_down = True
        self._signal(signal.SIGTERM)
        self._enter(State.STOPPING, "shutdown; SIGTERM", now + self.params.stop_grace_s)

    def _mark_shutdown(self, now: float) -> None:
        self.shutting_down = True
        if self.state is State.FATAL:
            self._enter(State.STOPPED, "shutdown", None)

    def _stopped(self, now: float) -> None:
        self.shutting_down = True
        self._enter(State.STOPPED, "shutdown", None)

    def _exited(self, now: float) -> None:
        was_stable = self.ready_since is not None and now - self.ready_since >= self.params.stable_after_s
        self.pid = None
        self.ready_since = None
        if self.shutting_down:
            self._enter(State.STOPPED, "exited on shutdown", None)
            return
        window = self.params.restart_window_s
        self.restarts.append(now)
        while self.restarts and self.restarts[0] <= now - window:
            self.restarts.popleft()
        if len(self.restarts) > self.params.max_restarts:
            self._enter(
                State.FATAL,
                f"{len(self.restarts)} restarts in {window:g} s (limit {self.params.max_restarts})",
                None,
            )
            return
        self.restart_count += 1
        if was_stable:
            self.consecutive_failures = 0
            self._spawn(now)
            return
        delay = min(self.params.backoff_cap_s, self.params.backoff_base_s * 2**self.consecutive_failures)
        self.consecutive_failures += 1
        self._enter(State.BACKOFF, f"exited early; restart in {delay:g} s", now + delay)

    def _signal(self, sig: int) -> None:
        if self.pid is not None:
            self.control.kill(self.pid, sig)
