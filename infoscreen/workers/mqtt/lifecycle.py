"""The life of a command, interpreted: messages and timers in, the table's effects out.

The decisions are elsewhere and pure: :mod:`.admission` (what to do with a received command),
:mod:`.command_policy` (the table (state, kind, event) -> new state and effects) over
:mod:`.command_states`. This module turns what happens into events (a command, a repeat, an
``ExecResult``, a timer, a start after a crash) and applies the effects of the matching row in
one place, :meth:`Lifecycle._apply`, in the row's order: for a new command, the record with the
``accepted`` and ``execution_started`` rows in one transaction (one fsync), then the acks handed
to the outbox (on the wire at once), then the one ``ExecRequest``. A restarted worker never
sends ``ExecRequest`` again: a record left in ``execution_started`` asks ``ExecQuery``.
Boot and downtime evidence listens to the transitions (:mod:`.evidence`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import msgspec

from ...config import ClientConfig
from ...ipc import messages
from ...loop import Loop, Timer as LoopTimer
from ...wire import signing, topics
from ...wire.schema import Ack, ErrorCode, encode_ack
from . import admission, bootid
from .clock import RECORD_KEEP_S, Clock, Deadline, judge, rejection_deadline, wall_floor_from_timesyncd
from .command_policy import (FAILED, STARTED, Arm, Cancel, Commit, Occurrence, Publish, Query, Reanswer,
                             RequestExecution, Step, result_occurrence, step)
from .command_states import STATUS, TERMINAL, Event, Kind, State, Timer, kind_of, result_event, state_of_status
from .crashpoint import crash
from .evidence import Evidence
from .outbox import Outbox
from .store import OutRow, Record, Store
from .validation import Command, Rejection, validate

log = logging.getLogger(__name__)

QUERY_EVERY_S = 2.0
QUERY_TRIES = 5
RESULT_WAIT_EXTRA_S = 3.0  # past HELPER_TIMEOUT_S: the supervisor answers within it, plus the IPC
PURGE_EVERY_S = 600.0
WALL_FLOOR = "wall_floor"  # the latest wall time seen while the clock was synchronised


class Live(msgspec.Struct):
    """A command this process is handling: its record, where it is, what it waits for."""

    rec: Record
    state: State
    kind: Kind | None
    timers: dict[Timer, LoopTimer] = msgspec.field(default_factory=dict)
    queries: int = 0  # ExecQuery sent in this process
    request: messages.ExecRequest | None = None  # until sent (admitted commands only)


class Transition(msgspec.Struct, frozen=True):
    command_id: str
    key: tuple[State, Kind | None, Event]  # the row of the table that matched
    old: State
    new: State
    effects: tuple[Any, ...]


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
        on_transition: Callable[[Transition], None] = lambda t: None,
    ) -> None:
        self.cfg = cfg
        self.uuid = cfg.client_uuid or ""
        self.loop = loop
        self.store = store
        self.outbox = outbox
        self.clock = clock
        self.boot_id = boot_id
        self.send = send
        self.on_transition = on_transition
        self.ack_topics = topics.ack_topics(self.uuid)
        self.inflight: dict[str, Live] = {}
        self.counts = {"received": 0, "rejected": 0, "duplicates": 0, "no_id": 0, "exec_requests": 0}
        self.evidence = Evidence(store, clock, boot_id, info_log)
        self._floor: float | None = None  # cache of the stored wall-clock floor
        self._last_purge = 0.0

    def _kind(self, action: str | None) -> Kind | None:
        return kind_of(action, self.cfg.mock_execution, self.cfg.production)

    # -- commands in --------------------------------------------------------------------------
    def on_command(self, payload: bytes, topic: str, signature: str | None = None) -> None:
        self.counts["received"] += 1
        res = validate(payload, self.uuid)
        existing = self.store.get(res.key) if res.key is not None else None
        facts: dict[str, Any] = {"command_id": res.command_id, "known": existing is not None}
        deadline = None
        if isinstance(res, Rejection):
            facts["defect"] = (res.error_code, res.error_message)
        elif existing is None:
            # A stat only for a command without a well-formed signature; the floor only for
            # an unsynchronised clock: nothing more on the common path.
            facts["unsigned_on_keyed"] = (not signing.well_formed(signature)
                                          and os.path.exists(self.cfg.command_key_file))
            floor = None if self.clock.synchronized() else self.wall_floor()
            code, message, deadline = judge(res.expires_at, res.issued_at, self.clock, self.boot_id, floor)
            if code is None and deadline is None:
                code = ErrorCode.EXPIRED.value
            facts["expiry"] = (code, message)
            busy = next(iter(self.inflight.values()), None)
            facts["busy_with"] = (busy.rec.command_id, busy.rec.action) if busy is not None else None
        verdict = admission.admit(**facts)
        if isinstance(verdict, admission.Ignore):
            self.counts["no_id"] += 1
            log.warning("ignored a payload on %s without a readable command_id (%d bytes): %s",
                        topic, len(payload), res.error_message if isinstance(res, Rejection) else verdict.reason)
            return
        if isinstance(verdict, admission.Repeat):
            assert existing is not None
            self.counts["duplicates"] += 1
            self._repeat(existing)
            return
        assert res.command_id is not None
        action = res.action if isinstance(res, Command) else None
        if isinstance(verdict, admission.Refuse):
            self._refuse(res.command_id, action, verdict, deadline)
            return
        assert isinstance(res, Command) and deadline is not None
        now_w, now_m = self.clock.wall(), self.clock.mono()
        rec = Record(
            key=res.key, command_id=res.command_id, action=res.action, status=STARTED, error_code=None,
            error_message=None, received_wall=now_w, deadline=deadline,
            exec_boot_id=self.boot_id, exec_mono=now_m, exec_wall=now_w,
            purge_wall=max(now_w, res.expires_at) + RECORD_KEEP_S,
        )
        live = Live(rec, State.NEW, self._kind(res.action),
                    request=messages.ExecRequest(command_id=res.command_id, action=res.action, payload=payload,
                                                 signature=signature))
        self._handle(live, Occurrence(Event.ADMITTED))

    def give_up(self, payload: bytes, why: str) -> bool:
        """A command whose handling kept failing (intake.py): answered failed/internal_error
        unless it is already recorded. False when no command id can be read."""
        res = validate(payload, self.uuid)
        if res.command_id is None or res.key is None:
            return False
        verdict = admission.admit(command_id=res.command_id, known=self.store.get(res.key) is not None,
                                  given_up=why)
        if isinstance(verdict, admission.Refuse):
            self._refuse(res.command_id, getattr(res, "action", None), verdict, None)
        return True

    def _refuse(self, command_id: str, action: str | None, verdict: admission.Refuse,
                deadline: Deadline | None) -> None:
        self.counts["rejected"] += 1
        d = rejection_deadline(self.clock, self.boot_id)
        if verdict.own_deadline and deadline is not None \
                and deadline.remaining(self.clock, self.boot_id) > d.remaining(self.clock, self.boot_id):
            d = deadline  # a valid command refused (busy): its ack is owed until its own expiry
        rec = Record(
            key=command_id.lower(), command_id=command_id, action=action, status=FAILED, error_code=None,
            error_message=None, received_wall=self.clock.wall(), deadline=d,
            purge_wall=self.clock.wall() + RECORD_KEEP_S,
        )
        self._handle(Live(rec, State.NEW, self._kind(action)), Occurrence(Event.REFUSED, verdict.code, verdict.message))

    def _repeat(self, rec: Record) -> None:
        live = self.inflight.get(rec.key) or Live(rec, state_of_status(rec.status), self._kind(rec.action))
        self._handle(live, Occurrence(Event.REPEATED))

    # -- the supervisor's answers -------------------------------------------------------------
    def on_exec_result(self, msg: messages.ExecResult) -> None:
        live = self.inflight.get(msg.command_id.lower())
        if live is None:
            log.info("ExecResult for %s, which is not being executed (ignored)", msg.command_id)
            return
        event = result_event(msg.known, msg.ok, msg.mock, self.cfg.production)
        self._handle(live, result_occurrence(event, msg.error_code, msg.error_message))

    # -- start --------------------------------------------------------------------------------
    def startup(self) -> None:
        """Resolve what a previous process left in execution_started; never re-request it."""
        for rec in self.store.by_status(STARTED):
            live = Live(rec, State.STORED, self._kind(rec.action))
            self.inflight[rec.key] = live
            new_boot = self.boot_id is not None and rec.exec_boot_id is not None and rec.exec_boot_id != self.boot_id
            if new_boot:
                log.info("command %s (%s): a new boot is observed (%s -> %s)", rec.command_id, rec.action,
                         rec.exec_boot_id, self.boot_id)
            self._handle(live, Occurrence(Event.NEW_BOOT if new_boot else Event.SAME_BOOT))
        self.purge()

    # -- the one point where events meet the table ------------------------------------------------
    def _handle(self, live: Live, occ: Occurrence) -> None:
        rec = live.rec
        s = step(live.state, live.kind, occ)
        if s is None:
            log.info("command %s (%s): %s ignored in state %s", rec.command_id, rec.action, occ.event.value,
                     live.state.value)
            return
        old = live.state
        self._apply(live, s)
        self._enter(live, s.new)
        self._note(live, old, s.new, occ)
        self.on_transition(Transition(rec.command_id, s.key, old, s.new, s.effects))

    def _enter(self, live: Live, new: State) -> None:
        live.state = new
        if new in TERMINAL:
            self.inflight.pop(live.rec.key, None)
        else:
            self.inflight[live.rec.key] = live

    def _note(self, live: Live, old: State, new: State, occ: Occurrence) -> None:
        rec = live.rec
        if old is State.NEW and new is State.FAILED:
            log.warning("rejected command %s: %s (%s)", rec.command_id, rec.error_code, rec.error_message)
        elif occ.event is Event.LOST and new is State.AWAITING_BOOT:
            log.warning("the supervisor has no record of the reboot request %s; waiting for the grace period",
                        rec.command_id)
        elif new is not old:
            log.info("command %s (%s): %s -> %s on %s%s", rec.command_id, rec.action, old.value, new.value,
                     occ.event.value, f" {rec.error_code}: {rec.error_message}" if new is State.FAILED else "")

    def _apply(self, live: Live, s: Step) -> None:
        rows: list[OutRow] = []
        for eff in s.effects:
            if isinstance(eff, Commit):
                rows = self._commit(live, s.new, eff)
                if live.request is not None:
                    crash("after_commit")
            elif isinstance(eff, RequestExecution):
                assert live.request is not None
                crash("after_publish")
                self.counts["exec_requests"] += 1
                self.send(live.request)
                live.request = None  # once, ever
                crash("after_exec_request")
            elif isinstance(eff, Publish):
                self.outbox.add(rows, live.rec.deadline)
            elif isinstance(eff, Query):
                live.queries += 1
                self.send(messages.ExecQuery(command_id=live.rec.command_id))
            elif isinstance(eff, Arm):
                self._arm(live, eff.timer)
            elif isinstance(eff, Cancel):
                for t in eff.timers:
                    timer = live.timers.pop(t, None)
                    if timer is not None:
                        timer.cancel()
            elif isinstance(eff, Reanswer):
                self._reanswer(live.rec)
            else:  # pragma: no cover - the table holds only the effects above
                raise TypeError(f"unknown effect {eff!r}")

    def _acks(self, rec: Record, status: str) -> list[tuple[str, bytes]]:
        failed = status == FAILED
        payload = encode_ack(Ack(command_id=rec.command_id, status=status,
                                 error_code=rec.error_code if failed else None,
                                 error_message=rec.error_message if failed else None))
        return [(t, payload) for t in self.ack_topics]

    def _commit(self, live: Live, new: State, eff: Commit) -> list[OutRow]:
        """One transaction: the record's new status, its ack rows (every topic), the evidence."""
        rec = live.rec
        rec.status = STATUS[new]
        rec.error_code = eff.code if new is State.FAILED else None
        rec.error_message = eff.message if new is State.FAILED else None
        # Topic by topic (the canonical one first): each topic keeps the statuses' order, and the
        # server's canonical topic gets `execution_started` without waiting for the alias's copies.
        per_status = [self._acks(rec, status) for status in eff.acks]
        acks = [rows[i] for i in range(len(self.ack_topics)) for rows in per_status]
        kv = self.evidence.on_transition(rec, live.kind, new)
        if live.state is State.NEW:
            rows = self.store.insert(rec, acks, kv=kv or None)
        else:
            now_m = self.clock.mono()
            if rec.deadline.boot_id != self.boot_id:
                # Carried over a reboot: rebase what was left of the budget onto this boot's
                # monotonic clock (computed before updated_mono changes: it is the old boot's).
                left = rec.deadline.remaining(self.clock, self.boot_id)
                rec.deadline = Deadline(rec.deadline.expires_wall, now_m + max(0.0, left), self.boot_id, now_m)
            else:
                rec.deadline.updated_mono = now_m
            rows = self.store.update(rec, acks, kv=kv or None)
        self.evidence.committed(kv)
        self._enter(live, new)  # the store says so now, whatever the next effects do
        return rows

    def _reanswer(self, rec: Record) -> None:
        pending = {(r.topic, r.payload) for r in self.outbox.pending_for(rec.key)}
        latest = self._acks(rec, rec.status)
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

    # -- timers: each one's firing is an event --------------------------------------------------------
    def _arm(self, live: Live, timer: Timer) -> None:
        old = live.timers.pop(timer, None)
        if old is not None:
            old.cancel()
        fire = lambda: self._timer_fired(live, timer)  # noqa: E731
        if timer is Timer.RESULT_WAIT:
            live.timers[timer] = self.loop.call_later(self.cfg.helper_timeout_s + RESULT_WAIT_EXTRA_S, fire)
        elif timer is Timer.QUERY_RETRY:
            live.timers[timer] = self.loop.call_later(QUERY_EVERY_S, fire)
        else:  # the grace period, counted from execution_started (same boot: same monotonic clock)
            assert live.rec.exec_mono is not None
            live.timers[timer] = self.loop.call_at(live.rec.exec_mono + self.cfg.reboot_grace_s, fire)

    def _timer_fired(self, live: Live, timer: Timer) -> None:
        live.timers.pop(timer, None)
        if self.inflight.get(live.rec.key) is not live:
            return
        if timer is Timer.RESULT_WAIT:
            occ = Occurrence(Event.RESULT_WAIT_OVER)
        elif timer is Timer.QUERY_RETRY:
            occ = Occurrence(Event.QUERY_DUE if live.queries < QUERY_TRIES else Event.QUERIES_EXHAUSTED)
        else:
            occ = self._grace_over(live.rec)
        self._handle(live, occ)

    def _grace_over(self, rec: Record) -> Occurrence:
        current = bootid.read_boot_id(self.cfg.boot_id_file)
        if current is not None and rec.exec_boot_id is not None and current != rec.exec_boot_id:
            return Occurrence(Event.BOOT_CHANGING)  # a new boot is happening under us
        return Occurrence(Event.GRACE_OVER, message=f"the same boot ({rec.exec_boot_id}) was still running "
                                                    f"{self.cfg.reboot_grace_s:g} s after execution_started")

    # -- housekeeping -------------------------------------------------------------------------------
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
        if self.clock.mono() - self._last_purge >= PURGE_EVERY_S:
            self.purge()

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

    # -- evidence (evidence.py) -----------------------------------------------------------------------
    def on_connected(self) -> None:
        self.evidence.on_connected()

    def refresh_evidence(self) -> None:
        self.evidence.refresh()

    def last_power_command(self) -> dict[str, Any] | None:
        return self.evidence.last_power_command()
