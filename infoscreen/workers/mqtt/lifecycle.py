"""The life of a command: validated, recorded, executed at most once, answered until done.

States (the record's ``status`` in the store; every change is committed together with
its ack rows before anything is published or requested):

    (new) --reject--> failed(code)                       [no execution]
    (new) --accept--> execution_started --ExecRequest--> ...
          ... ExecResult ok (mock)            -> completed
          ... ExecResult ok, shutdown_host    -> completed
          ... ExecResult ok, reboot_host      -> wait for a new boot id
          ... new boot id observed at start   -> completed
          ... same boot after REBOOT_GRACE_S  -> failed(reboot_not_observed)
          ... ExecResult failed(code)         -> failed(code)

``accepted`` and ``execution_started`` are committed in one transaction (one fsync),
then ``ExecRequest`` is sent exactly once, then the acks are published in that order.
A restarted worker never sends ``ExecRequest`` again: it asks ``ExecQuery``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ...config import ClientConfig
from ...ipc import messages
from ...loop import Loop, Timer
from ...wire import signing, topics
from ...wire.schema import ERROR_CODES, Ack, AckStatus, Action, ErrorCode, encode_ack, format_utc
from . import bootid
from .crashpoint import crash
from .clock import RECORD_KEEP_S, Clock, Deadline, judge, rejection_deadline, wall_floor_from_timesyncd
from .outbox import Outbox
from .store import Record, Store
from .validation import Command, Rejection, validate

log = logging.getLogger(__name__)

QUERY_EVERY_S = 2.0
QUERY_TRIES = 5
PURGE_EVERY_S = 600.0
LAST_POWER = "last_power_command"
WALL_FLOOR = "wall_floor"  # the latest wall time seen while the clock was synchronised
SHUTDOWN_EVIDENCE = "shutdown_evidence"

STARTED = AckStatus.EXECUTION_STARTED.value
COMPLETED = AckStatus.COMPLETED.value
FAILED = AckStatus.FAILED.value
ACCEPTED = AckStatus.ACCEPTED.value


class Lifecycle:
    def __init__(
        self,
        cfg: ClientConfig,
        loop: Loop,
        store: Store,
        outbox: Outbox,
        clock: Clock,
        boot_id: str | None,
        send: Callable[[messages.Msg], bool],
        info_log: Callable[[str], None],
    ) -> None:
        self.cfg = cfg
        self.uuid = cfg.client_uuid or ""
        self.loop = loop
        self.store = store
        self.outbox = outbox
        self.clock = clock
        self.boot_id = boot_id
        self.send = send
        self.info_log = info_log
        self.ack_topics = topics.ack_topics(self.uuid)
        self.inflight: dict[str, Record] = {}
        self._timers: dict[str, list[Timer]] = {}
        self._queries: dict[str, int] = {}
        self.reconnect_mono: float | None = None
        self.counts = {"received": 0, "rejected": 0, "duplicates": 0, "no_id": 0, "exec_requests": 0}
        self.mock = cfg.mock_execution and not cfg.production
        self._floor: float | None = None  # cache of the stored wall-clock floor

    # -- acks -------------------------------------------------------------------------------
    def _acks(self, rec: Record, status: str | None = None) -> list[tuple[str, bytes]]:
        status = status or rec.status
        code = rec.error_code if status == FAILED else None
        msg = rec.error_message if status == FAILED else None
        payload = encode_ack(Ack(command_id=rec.command_id, status=status, error_code=code, error_message=msg))
        return [(t, payload) for t in self.ack_topics]

    def _transition(self, rec: Record, status: str, code: str | None = None, message: str | None = None) -> None:
        rec.status = status
        rec.error_code = code
        rec.error_message = message
        now_m = self.clock.mono()
        if rec.deadline.boot_id != self.boot_id:
            # Carried over a reboot: rebase what was left of the budget onto this boot's
            # monotonic clock (computed before updated_mono changes: it is the old boot's).
            left = rec.deadline.remaining(self.clock, self.boot_id)
            rec.deadline = Deadline(rec.deadline.expires_wall, now_m + max(0.0, left), self.boot_id, now_m)
        else:
            rec.deadline.updated_mono = now_m
        kv = self._evidence_status(rec) or {}
        if status == COMPLETED and rec.action == Action.SHUTDOWN.value and not self.mock:
            kv[SHUTDOWN_EVIDENCE] = self._shutdown_evidence(rec)
        rows = self.store.update(rec, self._acks(rec), kv=kv)
        if status in (COMPLETED, FAILED):
            self.inflight.pop(rec.key, None)
            for t in self._timers.pop(rec.key, []):
                t.cancel()
            self._queries.pop(rec.key, None)
        self.outbox.add(rows, rec.deadline)
        log.info("command %s (%s): %s%s", rec.command_id, rec.action, status, f" {code}: {message}" if code else "")

    # -- intake ----------------------------------------------------------------------------------
    def on_command(self, payload: bytes, topic: str, signature: str | None = None) -> None:
        self.counts["received"] += 1
        res = validate(payload, self.uuid)
        if isinstance(res, Rejection) and res.command_id is None:
            self.counts["no_id"] += 1
            log.warning("ignored a payload on %s without a readable command_id (%d bytes): %s",
                        topic, len(payload), res.error_message)
            return
        key = res.key
        assert key is not None
        existing = self.store.get(key)
        if existing is not None:
            self._duplicate(existing)
            return
        if isinstance(res, Rejection):
            self._reject(res.command_id or "", None, res.error_code or ErrorCode.INVALID_PAYLOAD.value,
                         res.error_message)
            return
        self._intake(res, payload, signature)

    def give_up(self, payload: bytes, why: str) -> bool:
        """A command whose handling kept failing (intake.py): answered failed/internal_error
        unless it is already recorded. False when no command id can be read."""
        res = validate(payload, self.uuid)
        if res.command_id is None or res.key is None:
            return False
        if self.store.get(res.key) is None:
            self._reject(res.command_id, getattr(res, "action", None), ErrorCode.INTERNAL_ERROR.value,
                         f"given up: {why}")
        return True

    def _duplicate(self, rec: Record) -> None:
        self.counts["duplicates"] += 1
        pending = {(r.topic, r.payload) for r in self.outbox.pending_for(rec.key)}
        latest = self._acks(rec)
        if all(a in pending for a in latest):  # not yet delivered on either topic: no second copy
            log.info("duplicate command %s: its latest status %s is still being delivered", rec.command_id, rec.status)
            return
        log.info("duplicate command %s: not executed again; answering with its latest status %s",
                 rec.command_id, rec.status)
        rows = self.store.add_acks(rec.key, latest)
        # The answer to a repeat must reach the server even when the command's own window has
        # passed (a server asking again after an outage): a short fresh window of its own.
        deadline = rec.deadline
        if deadline.expired(self.clock, self.boot_id):
            deadline = rejection_deadline(self.clock, self.boot_id)
        self.outbox.add(rows, deadline)

    def _reject(self, command_id: str, action: str | None, code: str, message: str,
                deadline: Deadline | None = None) -> None:
        self.counts["rejected"] += 1
        d = rejection_deadline(self.clock, self.boot_id)
        if deadline is not None and deadline.remaining(self.clock, self.boot_id) > d.remaining(self.clock, self.boot_id):
            d = deadline  # a valid command refused (busy): its ack is owed until its own expiry
        rec = Record(
            key=command_id.lower(), command_id=command_id, action=action, status=FAILED, error_code=code,
            error_message=message, received_wall=self.clock.wall(), deadline=d,
            purge_wall=self.clock.wall() + RECORD_KEEP_S,
        )
        rows = self.store.insert(rec, self._acks(rec))
        self.outbox.add(rows, d)
        log.warning("rejected command %s: %s (%s)", command_id, code, message)

    def _intake(self, cmd: Command, payload: bytes, signature: str | None) -> None:
        if not signing.well_formed(signature) and os.path.exists(self.cfg.command_key_file):
            # Only the helper can tell a wrong signature; a missing one is refused here at once.
            self._reject(cmd.command_id, cmd.action, ErrorCode.SIGNATURE_INVALID.value,
                         "this device has a command key and the command has no valid signature")
            return
        # The floor matters only to an unsynchronised clock: no store read or stat otherwise.
        floor = None if self.clock.synchronized() else self.wall_floor()
        code, message, deadline = judge(cmd.expires_at, cmd.issued_at, self.clock, self.boot_id, floor)
        if code is not None or deadline is None:
            self._reject(cmd.command_id, cmd.action, code or ErrorCode.EXPIRED.value, message or "expired")
            return
        if self.inflight:
            other = next(iter(self.inflight.values()))
            self._reject(cmd.command_id, cmd.action, ErrorCode.BUSY.value,
                         f"command {other.command_id} ({other.action}) is being executed", deadline)
            return
        now_w, now_m = self.clock.wall(), self.clock.mono()
        rec = Record(
            key=cmd.key, command_id=cmd.command_id, action=cmd.action, status=STARTED, error_code=None,
            error_message=None, received_wall=now_w, deadline=deadline,
            exec_boot_id=self.boot_id, exec_mono=now_m, exec_wall=now_w,
            purge_wall=max(now_w, cmd.expires_at) + RECORD_KEEP_S,
        )
        # One transaction: the record in execution_started plus the accepted and
        # execution_started ack rows. Only then is execution requested, once.
        rows = self.store.insert(rec, self._acks(rec, ACCEPTED) + self._acks(rec, STARTED),
                                 kv=self._evidence_status(rec))
        self.inflight[rec.key] = rec
        crash("after_commit")
        self.counts["exec_requests"] += 1
        self.send(messages.ExecRequest(command_id=rec.command_id, action=rec.action or "", payload=payload,
                                       signature=signature))
        crash("after_exec_request")
        self.outbox.add(rows, deadline)
        self._arm(rec, self.cfg.helper_timeout_s + 3.0)
        log.info("command %s (%s): accepted, execution requested", rec.command_id, rec.action)

    # -- outcome ------------------------------------------------------------------------------------
    def _arm(self, rec: Record, result_wait_s: float | None) -> None:
        timers = self._timers.setdefault(rec.key, [])
        if result_wait_s is not None:
            timers.append(self.loop.call_later(result_wait_s, lambda k=rec.key: self._query(k)))
        if rec.action == Action.REBOOT.value and not self.mock:
            assert rec.exec_mono is not None
            when = rec.exec_mono + self.cfg.reboot_grace_s
            timers.append(self.loop.call_at(when, lambda k=rec.key: self._grace_over(k)))

    def _query(self, key: str) -> None:
        rec = self.inflight.get(key)
        if rec is None:
            return
        n = self._queries.get(key, 0)
        if n >= QUERY_TRIES:
            if rec.action == Action.SHUTDOWN.value or self.mock:
                self._transition(rec, FAILED, ErrorCode.HELPER_TIMEOUT.value,
                                 "no answer from the supervisor about the execution request")
            return  # reboot_host: the grace period decides
        self._queries[key] = n + 1
        self.send(messages.ExecQuery(command_id=rec.command_id))
        self._timers.setdefault(key, []).append(self.loop.call_later(QUERY_EVERY_S, lambda: self._query(key)))

    def _grace_over(self, key: str) -> None:
        rec = self.inflight.get(key)
        if rec is None or rec.status != STARTED:
            return
        current = bootid.read_boot_id(self.cfg.boot_id_file)
        if current is not None and rec.exec_boot_id is not None and current != rec.exec_boot_id:
            return  # a new boot is happening under us; the next start completes it
        self._transition(rec, FAILED, ErrorCode.REBOOT_NOT_OBSERVED.value,
                         f"the same boot ({rec.exec_boot_id}) was still running {self.cfg.reboot_grace_s:g} s"
                         " after execution_started")

    def on_exec_result(self, msg: messages.ExecResult) -> None:
        key = msg.command_id.lower()
        rec = self.inflight.get(key)
        if rec is None:
            log.info("ExecResult for %s, which is not being executed (ignored)", msg.command_id)
            return
        self._queries[key] = QUERY_TRIES + 1  # answered: no more queries
        for t in self._timers.pop(key, []):
            t.cancel()
        if rec.action == Action.REBOOT.value and not self.mock:  # keep the grace period running
            assert rec.exec_mono is not None
            self._timers[key] = [self.loop.call_at(rec.exec_mono + self.cfg.reboot_grace_s,
                                                   lambda k=key: self._grace_over(k))]
        if not msg.known:
            if rec.action == Action.REBOOT.value and not self.mock:
                log.warning("the supervisor has no record of the reboot request %s; waiting for the grace period",
                            rec.command_id)
                return
            self._transition(rec, FAILED, ErrorCode.EXECUTION_FAILED.value,
                             "the execution request was lost (the worker restarted before the supervisor got it)")
            return
        if msg.ok:
            if msg.mock and self.cfg.production:
                # The helper executed nothing, but this client runs in production: never
                # report a power action that did not happen as completed.
                self._transition(rec, FAILED, ErrorCode.HELPER_REJECTED.value,
                                 "the helper is in mock mode and executed nothing, but this client runs in production")
            elif msg.mock or self.mock:
                self._transition(rec, COMPLETED)
            elif rec.action == Action.SHUTDOWN.value:
                self._transition(rec, COMPLETED)  # records the shutdown evidence too
            else:
                log.info("reboot %s scheduled by the helper; completed once a new boot is observed", rec.command_id)
            return
        if msg.error_code is None:
            # known, not ok, no code: still running (an answer to ExecQuery); keep waiting.
            self._queries.pop(key, None)
            self._timers.setdefault(key, []).append(self.loop.call_later(QUERY_EVERY_S, lambda: self._query(key)))
            return
        code = msg.error_code if msg.error_code in ERROR_CODES else ErrorCode.EXECUTION_FAILED.value
        text = msg.error_message or msg.error_code
        if code != msg.error_code:
            text = f"{msg.error_code}: {text}"
        self._transition(rec, FAILED, code, (text or code)[:300])

    # -- start ----------------------------------------------------------------------------------------
    def startup(self) -> None:
        """Resolve what a previous process left in execution_started; never re-request it."""
        for rec in self.store.by_status(STARTED):
            new_boot = (self.boot_id is not None and rec.exec_boot_id is not None and rec.exec_boot_id != self.boot_id)
            if new_boot:
                log.info("command %s (%s): a new boot is observed (%s -> %s)", rec.command_id, rec.action,
                         rec.exec_boot_id, self.boot_id)
                self._transition(rec, COMPLETED)
                continue
            self.inflight[rec.key] = rec
            self._arm(rec, None)  # the reboot grace period, counted from execution_started
            self._query(rec.key)  # ExecQuery now, then every QUERY_EVERY_S until answered
        self._shutdown_report_pending = self.store.kv_get(SHUTDOWN_EVIDENCE)
        self.purge()

    def purge(self) -> None:
        """Forget records past their keep time (only with a synchronised clock); at start and
        every PURGE_EVERY_S."""
        self._last_purge = self.clock.mono()
        if not self.clock.synchronized():
            return
        n = self.store.purge(self.clock.wall())
        if n:
            log.info("forgot %d command records past their keep time", n)

    def purge_maybe(self) -> None:
        if self.clock.mono() - getattr(self, "_last_purge", 0.0) >= PURGE_EVERY_S:
            self.purge()

    # -- evidence ---------------------------------------------------------------------------------------
    def _evidence_status(self, rec: Record) -> dict[str, Any] | None:
        """The new last_power_command block, written in the same transaction as the status."""
        if rec.exec_boot_id is None:
            return None  # never reached execution
        ev = self.store.kv_get(LAST_POWER) or {}
        if ev.get("command_id") != rec.command_id:
            ev = {
                "command_id": rec.command_id,
                "action": rec.action,
                "status": rec.status,
                "boot_id_before": rec.exec_boot_id,
                "boot_id_after": None,
                "seconds_to_reconnect": None,
                "execution_started_at": format_utc(rec.exec_wall) if rec.exec_wall else None,
                "_exec_wall": rec.exec_wall,
                "_synced_at_start": self.clock.synchronized(),
            }
        ev["status"] = rec.status
        if rec.status != STARTED:
            ev["error_code"] = rec.error_code
        if self.boot_id and rec.exec_boot_id != self.boot_id:
            ev["boot_id_after"] = self.boot_id
        return {LAST_POWER: ev}

    def on_connected(self) -> None:
        if self.reconnect_mono is None:
            self.reconnect_mono = self.clock.mono()
        self.refresh_evidence()

    def wall_floor(self) -> float | None:
        """A time this device has certainly reached: ours, or systemd-timesyncd's."""
        if self._floor is None:  # read once; note_wall_time keeps it current afterwards
            self._floor = self.store.kv_get(WALL_FLOOR) or 0.0
        floors = [f for f in (self._floor, wall_floor_from_timesyncd()) if f]
        return max(floors) if floors else None

    def note_wall_time(self) -> None:
        """Keep the wall-clock floor (at every heartbeat while synchronised; one tiny commit)."""
        if self.clock.synchronized():
            self._floor = self.clock.wall()
            self.store.kv_set(WALL_FLOOR, self._floor)

    def refresh_evidence(self) -> None:
        """Fill in what needs a synchronised clock once it is (seconds_to_reconnect, off time)."""
        if self.reconnect_mono is None or not self.clock.synchronized():
            return
        ev = self.store.kv_get(LAST_POWER)
        if ev and ev.get("seconds_to_reconnect") is None and ev.get("boot_id_before") not in (None, self.boot_id) \
                and ev.get("_exec_wall") and ev.get("_synced_at_start"):
            reconnect_wall = self.clock.wall() - (self.clock.mono() - self.reconnect_mono)
            ev["seconds_to_reconnect"] = round(max(0.0, reconnect_wall - ev["_exec_wall"]), 1)
            ev["boot_id_after"] = self.boot_id
            self.store.kv_set(LAST_POWER, ev)
        sd = getattr(self, "_shutdown_report_pending", None)
        if sd and not sd.get("reported") and sd.get("boot_id") != self.boot_id:
            self._report_off_time(sd)

    def _shutdown_evidence(self, rec: Record) -> dict[str, Any]:
        same_boot = rec.exec_boot_id == self.boot_id  # else: completed at the next start
        return {
            "command_id": rec.command_id, "boot_id": rec.exec_boot_id,
            "acked_wall": self.clock.wall() if same_boot else None,
            "synced": self.clock.synchronized(), "reported": False,
        }

    def _report_off_time(self, sd: dict[str, Any]) -> None:
        now = self.clock.wall()
        up = bootid.seconds_since_boot()
        acked = sd.get("acked_wall")
        if acked is not None and sd.get("synced"):
            off = (now - up - acked) if up is not None else None
            if off is not None and off >= 0:
                text = (f"this screen was powered off by command {sd['command_id']} (shutdown_host) at "
                        f"{format_utc(acked)} and was off for {off:.0f} s (up again since {format_utc(now - up)})")
            else:
                text = (f"this screen was powered off by command {sd['command_id']} (shutdown_host) at "
                        f"{format_utc(acked)}; it is back {now - acked:.0f} s after that ack")
        else:
            text = (f"this screen was powered off by command {sd['command_id']} (shutdown_host); the off time is"
                    " unknown (the clock was not synchronised at the shutdown)")
        sd["reported"] = True
        self._shutdown_report_pending = None
        self.store.kv_set(SHUTDOWN_EVIDENCE, sd)
        log.info("%s", text)
        self.info_log(text)

    def last_power_command(self) -> dict[str, Any] | None:
        ev = self.store.kv_get(LAST_POWER)
        if not ev:
            return None
        return {k: v for k, v in ev.items() if not k.startswith("_")}
