"""The ack outbox: what was committed is published until the broker acknowledges it.

Every ack row is written to SQLite in the same transaction as the status change
(:mod:`.store`), then handed here. Rules:

* a row is removed only on a PUBACK with a reason code < 128; a refusal (>= 128, e.g.
  0x87 not authorized) is counted, logged and retried with exponential backoff;
* on (re)connect every pending row is sent at once (backoffs are reset): the broker or
  the connection may have lost what was in flight;
* rows are sent in commit order; per (command, topic) a later row is never sent while
  an earlier one waits in backoff, so accepted -> execution_started -> completed keep
  their order; rows in flight on the same connection may be pipelined (MQTT keeps the
  order of one connection);
* a row whose command expired (:class:`~.clock.Deadline`) is dropped, never sent;
* deletions of delivered rows are batched into one transaction per loop pass. A crash
  before that commit re-sends an ack already delivered: a duplicate, never a loss.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable

from ...loop import Loop, Timer
from .clock import Clock, Deadline
from .store import OutRow, Store

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], "int | None"]


class Outbox:
    RETRY_BASE_S = 1.0
    RETRY_CAP_S = 60.0
    SWEEP_S = 10.0

    def __init__(self, store: Store, loop: Loop, clock: Clock, boot_id: str | None) -> None:
        self.store = store
        self.loop = loop
        self.clock = clock
        self.boot_id = boot_id
        self.rows: dict[int, OutRow] = {r.seq: r for r in store.outbox_rows()}
        self.deadlines: dict[str, Deadline] = store.deadlines(list({r.key for r in self.rows.values()}))
        self.publish: Publish | None = None
        self.connected = False
        self.inflight: dict[int, int] = {}  # mid -> seq (current connection)
        self.sent: set[int] = set()
        self.attempts: dict[int, int] = {}
        self.waiting: dict[int, Timer] = {}  # seq -> its backoff timer
        self._to_delete: list[int] = []
        self._flush_timer: Timer | None = None
        self.delivered = 0
        self.refused = 0
        self.dropped_expired = 0
        self._sweep_timer = self.loop.call_later(self.SWEEP_S, self._sweep)

    # -- input -------------------------------------------------------------------------
    def add(self, rows: Iterable[OutRow], deadline: Deadline) -> None:
        for r in rows:
            self.rows[r.seq] = r
            self.deadlines[r.key] = deadline
        self.kick()

    def set_deadline(self, key: str, deadline: Deadline) -> None:
        self.deadlines[key] = deadline

    def pending_for(self, key: str) -> list[OutRow]:
        return [r for r in self.rows.values() if r.key == key]

    # -- connection events -----------------------------------------------------------------
    def on_connect(self) -> None:
        self.connected = True
        self.kick()

    def on_disconnect(self) -> None:
        self.connected = False
        self.inflight.clear()
        self.sent.clear()
        for t in self.waiting.values():
            t.cancel()
        self.waiting.clear()

    def on_puback(self, mid: int, reason_code: int) -> bool | None:
        """True delivered, False refused, None not an outbox publish."""
        seq = self.inflight.pop(mid, None)
        if seq is None:
            return None
        self.sent.discard(seq)
        row = self.rows.get(seq)
        if reason_code < 128:
            self.delivered += 1
            self.attempts.pop(seq, None)
            if row is not None:
                del self.rows[seq]
                self._to_delete.append(seq)
                if self._flush_timer is None:
                    self._flush_timer = self.loop.call_later(0.0, self._flush)
            if len(self.rows) > len(self.sent):
                self.kick()
            return True
        self.refused += 1
        n = self.attempts.get(seq, 0) + 1
        self.attempts[seq] = n
        delay = min(self.RETRY_CAP_S, self.RETRY_BASE_S * 2 ** (n - 1)) * random.uniform(0.8, 1.2)
        log.warning("the broker refused the ack on %s (reason code %d, attempt %d): retrying in %.1f s;"
                    " check the broker's ACL", row.topic if row else "?", reason_code, n, delay)
        self.waiting[seq] = self.loop.call_later(delay, lambda s=seq: self._retry(s))
        return False

    # -- sending -----------------------------------------------------------------------------
    def _retry(self, seq: int) -> None:
        self.waiting.pop(seq, None)
        self.kick()

    def _expired(self, key: str) -> bool:
        d = self.deadlines.get(key)
        return d is not None and d.expired(self.clock, self.boot_id)

    def kick(self) -> None:
        if not self.connected or self.publish is None:
            return
        blocked: set[tuple[str, str]] = set()
        expired: set[str] = set()
        for seq, row in list(self.rows.items()):
            if seq in self.sent:
                continue
            k = (row.key, row.topic)
            if k in blocked:
                continue
            if seq in self.waiting:
                blocked.add(k)
                continue
            if row.key in expired or self._expired(row.key):
                expired.add(row.key)
                continue
            mid = self.publish(row.topic, row.payload)
            if mid is None:  # not connected any more, or the client's queue is full
                break
            self.inflight[mid] = seq
            self.sent.add(seq)
        if expired:
            self._drop(expired)

    def _drop(self, keys: set[str]) -> None:
        seqs = [s for s, r in self.rows.items() if r.key in keys and s not in self.sent]
        for s in seqs:
            del self.rows[s]
            self.attempts.pop(s, None)
            t = self.waiting.pop(s, None)
            if t is not None:
                t.cancel()
        self.dropped_expired += len(seqs)
        try:
            self.store.delete_rows(seqs)
        except Exception:  # noqa: BLE001
            log.exception("could not delete expired outbox rows")
        for k in keys:
            log.info("dropped the undelivered ack(s) of command %s: the command expired", k)

    def _sweep(self) -> None:
        try:
            expired = {r.key for r in self.rows.values() if self._expired(r.key)}
            if expired:
                self._drop(expired)
        finally:
            self._sweep_timer = self.loop.call_later(self.SWEEP_S, self._sweep)

    def _flush(self) -> None:
        self._flush_timer = None
        seqs, self._to_delete = self._to_delete, []
        try:
            self.store.delete_rows(seqs)
        except Exception:  # noqa: BLE001 - the rows are re-sent after a restart: a duplicate
            log.exception("could not delete %d delivered outbox rows", len(seqs))

    def flush_now(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        self._flush()
