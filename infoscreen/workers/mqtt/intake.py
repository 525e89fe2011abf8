"""The intake: every message on every subscribed topic ends acknowledged to the broker.

A QoS 1 message that is never acknowledged stays in the broker's in-flight window for this
client (20 messages on Mosquitto) and is delivered again after each reconnect: a handful of
messages the worker cannot handle would then jam every later command, restarts included. So:

* a message is acknowledged once its handler returned (a command's record committed);
* a handler that raises (disk full, a bug) is retried in this process after a short delay, up
  to MAX_TRIES in all, then given up;
* a handler that kills the process (a crash) cannot be retried here: the broker resends the
  message with the DUP flag after the restart. Each such delivery is counted on disk (only
  then: a first delivery costs no extra write) and the message is given up at MAX_TRIES.

Giving up a command answers it ``failed`` with ``internal_error`` (when a command id can be
read); anything else is dropped with a rate-limited warning, which reaches ``logs/warn``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from ...loop import Loop
from .clock import Clock
from .connection import Connection, Incoming
from .ratelimit import TokenBucket
from .store import Store

log = logging.getLogger(__name__)

MAX_TRIES = 3  # below the supervisor's restart intensity (5 in 60 s): a crash loop is not escalated
RETRY_DELAYS_S = (0.5, 2.0)
KEEP_REDELIVERIES_S = 86400.0


def digest(m: Incoming) -> str:
    return hashlib.sha256(m.topic.encode() + b"\0" + m.payload).hexdigest()


class Intake:
    def __init__(
        self,
        loop: Loop,
        store: Store,
        clock: Clock,
        dispatch: Callable[[Incoming], None],
        give_up_command: Callable[[Incoming, str], bool],
        conn: Connection,
    ) -> None:
        self.loop = loop
        self.store = store
        self.clock = clock
        self.dispatch = dispatch
        self.give_up_command = give_up_command  # True when the message was a command it answered
        self.conn = conn
        self.given_up = 0
        self._warn = TokenBucket(rate=1 / 60, burst=5, now=clock.mono)

    def on_message(self, m: Incoming) -> bool:
        """Handle one message; True: acknowledge it now, False: it will be acknowledged later."""
        key, tries = None, 0
        if m.dup:
            key = digest(m)
            try:
                tries = self.store.note_redelivery(key, self.clock.wall())
            except Exception:  # noqa: BLE001 - the store itself failing must not jam the intake
                log.exception("cannot count the redelivery of a message on %s", m.topic)
                tries = MAX_TRIES
            if tries >= MAX_TRIES:
                self._give_up(m, f"delivered {tries + 1} times without being handled (the worker "
                              "died handling it)")
                return True
        return self._attempt(m, key, tries)

    def _attempt(self, m: Incoming, key: str | None, tries: int) -> bool:
        try:
            self.dispatch(m)
        except Exception as exc:  # noqa: BLE001 - RecursionError, MemoryError, sqlite3 errors...
            tries += 1
            if tries >= MAX_TRIES:
                self._give_up(m, f"handling failed {tries} times, last: {type(exc).__name__}: {exc}"[:300])
                return True
            delay = RETRY_DELAYS_S[min(tries - 1, len(RETRY_DELAYS_S) - 1)]
            log.warning("handling a message on %s failed (%s: %s); trying again in %.1f s",
                        m.topic, type(exc).__name__, str(exc)[:200], delay)
            self.loop.call_later(delay, lambda: self._retry(m, key, tries))
            return False
        if key is not None:
            self._forget(key)
        return True

    def _retry(self, m: Incoming, key: str | None, tries: int) -> None:
        if not self.conn.current(m):
            return  # its connection is gone: the broker delivers it again (DUP)
        if self._attempt(m, key, tries):
            self.conn.ack(m)

    def _forget(self, key: str) -> None:
        try:
            self.store.forget_redelivery(key)
        except Exception:  # noqa: BLE001
            log.exception("cannot forget a redelivery count")

    def _give_up(self, m: Incoming, why: str) -> None:
        self.given_up += 1
        answered = False
        try:
            answered = self.give_up_command(m, why)
        except Exception:  # noqa: BLE001 - even the failed ack could not be recorded
            log.exception("cannot answer a command given up on %s", m.topic)
        if not answered and self._warn.take():
            dropped = self._warn.pop_dropped()
            log.warning("gave up a message on %s (%d bytes): %s%s", m.topic, len(m.payload), why,
                        f" ({dropped} more given up since the last warning)" if dropped else "")
        if m.dup:
            self._forget(digest(m))

    def purge(self) -> None:
        self.store.purge_redeliveries(self.clock.wall() - KEEP_REDELIVERIES_S)
