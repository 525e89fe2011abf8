"""Chaos that spares nothing: commands keep flowing while every part of the tree is killed at
random moments, and afterwards every command has exactly one outcome and none ran twice.

The kinds of chaos (each happens at least once in every run; then at random):

- `worker_kill`: SIGKILL of the MQTT worker; the supervisor replaces it.
- `broker_restart`: Mosquitto stopped and started on the same port and persistence.
- `supervisor_kill`: SIGKILL of the supervisor (half of the time with its whole control group, as
  `systemctl kill -s KILL` or the OOM killer would). Then what systemd does with
  `KillMode=control-group` and `Restart=on-failure`: SIGTERM to what is left of the unit, SIGKILL
  after a stop timeout, and the whole tree started again on the same state and runtime dirs.
- `supervisor_stop`: SIGSTOP of the supervisor. Its WATCHDOG=1 pings stop; once none came for
  WATCHDOG_USEC (systemd's `WatchdogSec=`) it is SIGKILLed and the unit restarted as above.
- `helper_kill_before_answer`: the helper frozen (SIGSTOP) until a request waits on its socket
  (the kernel lists each connection under the socket's path in /proc/net/unix), then SIGKILLed
  and started again: the request dies unanswered.
- `helper_kill_in_grace`: the helper SIGKILLed after it answered a request `ok` and before the
  grace period (HELPER_GRACE_S) ends with the action: it dies holding the lock.

Invariants, across all restarts:

- no command runs twice: the helper's own audit log, per command id, shows at most one action
  execution (`mock_exec` of the action, then its `exec` line; tests/chaos/helper_audit.py);
- every published command ends with exactly one terminal outcome (`completed` or `failed`), the
  same on both ack topics, and every command that was still valid ends so within its expiry;
- `completed` means it ran once, except a command whose helper died in its grace: that one was
  answered "scheduled" (the contract's `completed` of a mock or a `shutdown_host`) and never runs;
- no state is corrupted: every restart comes up, the helper never reports a corrupt state file,
  the worker's SQLite file passes `PRAGMA integrity_check`, the helper's replay store holds every
  command it scheduled, and the tree still stops cleanly at the end.

Most outcomes are `busy`, by design: while a part is down the broker queues the commands, and they
arrive in a burst in which only one power command can be in flight.

Short form in every run (about 12 s of chaos, about 15 s in all); INFOSCREEN_SOAK_S=300 for a
soak; INFOSCREEN_CHAOS_SEED=<n> replays a run's random choices (not its timing).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from infoscreen.wire import topics
from infoscreen.wire.schema import SCHEMA_VERSION, CommandOut, encode, format_utc
from tests.chaos.helper_audit import HelperAudit
from tests.support.waiting import wait_process_exit, wait_until

DURATION_S = float(os.environ.get("INFOSCREEN_SOAK_S", "12"))
WATCHDOG_USEC = 1_000_000  # the tree's WATCHDOG_USEC, as WatchdogSec=1s would set it
STOP_TIMEOUT_S = 3.0  # TimeoutStopSec= for what is left of the unit, shortened for the test
HELPER_GRACE_S = 0.3  # long enough to be hit, short enough to keep the load flowing
HIT_WINDOW_S = 1.5  # < HELPER_TIMEOUT_S (2 s): a frozen helper is killed while it is awaited

KINDS = ("worker_kill", "broker_restart", "helper_kill_before_answer", "helper_kill_in_grace",
         "supervisor_kill", "supervisor_stop")
WEIGHTS = (0.40, 0.10, 0.125, 0.125, 0.125, 0.125)
TERMINAL = ("completed", "failed")


@dataclass
class Sent:
    action: str
    sent_mono: float
    expires_mono: float | None  # None: expired when sent (it must be refused)


class Load:
    """The server side: random power commands (unsigned: this tree has no command key), some
    repeated on the alias topic, a few already expired, the rest valid for 45 to 120 s."""

    def __init__(self, srv, device_uuid: str, rnd: random.Random) -> None:
        self.srv, self.uuid, self.rnd = srv, device_uuid, rnd
        self.sent: dict[str, Sent] = {}
        self.dropped = 0  # PUBACK 16: no subscriber, so the broker dropped it (must stay 0)

    def send(self) -> str | None:
        if not self.srv.connected:
            return None
        cid = str(uuid.uuid4())
        action = self.rnd.choice(["reboot_host", "shutdown_host"])
        now = int(time.time())  # whole seconds: what format_utc writes
        expired = self.rnd.random() < 0.05
        issued, expires = (now - 60, now - 60) if expired else (now, now + self.rnd.randint(45, 120))
        cmd = CommandOut(schema_version=SCHEMA_VERSION, command_id=cid, client_uuid=self.uuid, action=action,
                         issued_at=format_utc(issued), expires_at=format_utc(expires))
        mono = time.monotonic()
        rc = self.srv.publish(topics.commands(self.uuid), encode(cmd))
        if rc == 0:
            self.sent[cid] = Sent(action, mono, None if expired else mono + (expires - time.time()))
            if self.rnd.random() < 0.2:  # the same command again, on the alias topic
                self.srv.publish(topics.command_alias(self.uuid), encode(cmd))
            return cid
        if rc == 16:
            self.dropped += 1
        return None

    def burst(self, n: int) -> None:
        for _ in range(n):
            self.send()


def latest_status(records) -> str:
    return next((l[7:] for _, l in reversed(records) if l.startswith("STATUS=")), "")


def helper_connections(sock: Path) -> int:
    """Connections to the helper not yet answered and closed, queued or accepted. The kernel lists
    each under the listener's bound path (the helper binds a temporary name, then renames it, so
    the listed path starts with the socket's); the listener itself has __SO_ACCEPTCON (0x10000)."""
    n = 0
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7].startswith(str(sock)) and not int(parts[3], 16) & 0x10000:
                n += 1
    return n


class Chaos:
    def __init__(self, tree, broker, srv, load: Load) -> None:
        self.tree, self.broker, self.srv, self.load = tree, broker, srv, load
        self.counts: Counter = Counter()  # kind -> times done (and misses, as "<kind>_idle")
        self.lapses: list[float] = []  # SIGSTOP -> watchdog SIGKILL, seconds
        self.restarts: list[float] = []  # unit restart -> READY=1, seconds

    def run(self, kind: str) -> bool:
        """Do one chaos event; False when it did not hit what it aims at (it is then retried)."""
        hit = getattr(self, kind)()
        self.counts[kind if hit else f"{kind}_idle"] += 1
        return hit

    # -- the MQTT worker and the broker, as before ----------------------------------------
    def worker_kill(self) -> bool:
        pid = self.tree.workers().get("mqtt")
        if pid:
            os.kill(pid, signal.SIGKILL)
        return bool(pid)

    def broker_restart(self) -> bool:
        self.broker.stop()
        self.broker.start()
        self.srv.connect(timeout=10)  # the probe does not reconnect by itself
        return True

    # -- the supervisor, and systemd's answer ----------------------------------------------
    def supervisor_kill(self) -> bool:
        workers = list(self.tree.workers().values())
        os.kill(self.tree.pid, signal.SIGKILL)
        if self.load.rnd.random() < 0.5:  # the whole control group at once
            for pid in workers:
                _signal(pid, signal.SIGKILL)
        self._restart_unit(workers)
        return True

    def supervisor_stop(self) -> bool:
        workers = list(self.tree.workers().values())
        stopped = time.monotonic()
        os.kill(self.tree.pid, signal.SIGSTOP)
        self.load.burst(2)  # its workers still run: these reach a frozen supervisor
        self._watchdog_lapse()
        os.kill(self.tree.pid, signal.SIGKILL)  # WatchdogSignal= cannot act on a stopped process
        self.lapses.append(time.monotonic() - stopped)
        self._restart_unit(workers)
        return True

    def _watchdog_lapse(self) -> None:
        """Return once no WATCHDOG=1 arrived for WATCHDOG_USEC, counted from the last one; the
        wait itself is the watchdog's timeout, woken early by each ping that still arrives."""
        notify, limit = self.tree.notify, WATCHDOG_USEC / 1e6
        while True:
            last = max(notify.times("WATCHDOG=1"), default=0.0)
            left = last + limit - time.monotonic()
            if left <= 0:
                return
            try:
                notify.wait_for(lambda recs: any(l == "WATCHDOG=1" and t > last for t, l in recs[-8:]),
                                left, "a watchdog ping")
            except TimeoutError:
                return

    def _restart_unit(self, workers: list[int]) -> None:
        """The main process is dead: stop the rest of the control group, start the unit again."""
        self.tree.proc.wait(5)
        for pid in workers:  # they got SIGTERM from PR_SET_PDEATHSIG already; systemd sends one too
            _signal(pid, signal.SIGTERM)
        for pid in workers:
            try:
                wait_process_exit(pid, STOP_TIMEOUT_S)
            except TimeoutError:
                _signal(pid, signal.SIGKILL)
                wait_process_exit(pid, 5)
        self.load.burst(2)  # the unit is down: the broker queues these for its session
        t0 = time.monotonic()
        self.tree.start(timeout=30)  # every restart must come up on the state it was left
        self.restarts.append(time.monotonic() - t0)

    # -- the helper, mid-request ------------------------------------------------------------
    def _ready_for_a_command(self) -> None:
        # A request can reach the helper only through a running MQTT worker on a live broker.
        self.tree.notify.wait_for(
            lambda recs: "mqtt=running" in (s := latest_status(recs)) and "broker=connected" in s,
            15, "mqtt running and the broker connected")

    def _until(self, predicate) -> bool:
        """Send a command every 100 ms until `predicate()` holds, at most HIT_WINDOW_S."""
        deadline = time.monotonic() + HIT_WINDOW_S
        while time.monotonic() < deadline:
            self.load.send()
            try:
                wait_until(predicate, min(0.1, max(0.0, deadline - time.monotonic())), what="a request")
                return True
            except TimeoutError:
                pass
        return False

    def helper_kill_before_answer(self) -> bool:
        self._ready_for_a_command()
        helper = self.tree.helper
        os.kill(helper.proc.pid, signal.SIGSTOP)
        hit = self._until(lambda: helper_connections(helper.socket) > 0)
        self._restart_helper()
        return hit

    def helper_kill_in_grace(self) -> bool:
        self._ready_for_a_command()
        helper = self.tree.helper
        mark = helper.log_path.stat().st_size if helper.log_path.exists() else 0

        def answered_ok() -> bool:
            with open(helper.log_path, "rb") as f:
                f.seek(mark)
                tail = f.read().decode(errors="replace")
            audit = HelperAudit.parse(tail)
            return any(cid not in audit.exec_outcomes for cid in audit.scheduled)

        hit = self._until(answered_ok)
        self._restart_helper()
        return hit

    def _restart_helper(self) -> None:
        helper = self.tree.helper
        helper.proc.kill()
        helper.proc.wait(5)
        helper.start()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.mark.timeout(DURATION_S + 150)
def test_no_command_lost_or_run_twice_whatever_is_killed(tree_factory, broker, device_uuid, server_probe):
    seed = int(os.environ.get("INFOSCREEN_CHAOS_SEED", "0")) or random.randrange(1, 1 << 30)
    rnd = random.Random(seed)
    tree = tree_factory(broker, device_uuid, watchdog_usec=WATCHDOG_USEC,
                        env={"SUPERVISOR_MAX_RESTARTS": "10000"})
    tree.helper.env["HELPER_GRACE_S"] = str(HELPER_GRACE_S)
    tree.start()
    tree.notify.wait_status(lambda s: "broker=connected" in s, timeout=15)
    srv = server_probe(clean_start=False, session_expiry=3600, client_id=f"chaos-{uuid.uuid4()}")
    for t in topics.ack_topics(device_uuid):
        srv.subscribe(t)

    load = Load(srv, device_uuid, rnd)
    chaos = Chaos(tree, broker, srv, load)
    todo = list(KINDS)  # every kind once first (in a random order), then at random
    rnd.shuffle(todo)
    t_start = time.monotonic()
    end = t_start + DURATION_S
    next_event = time.monotonic() + rnd.uniform(0.3, 1.0)
    while time.monotonic() < end or todo:
        load.send()
        if time.monotonic() >= next_event:
            kind = todo.pop(0) if todo else rnd.choices(KINDS, WEIGHTS)[0]
            if not chaos.run(kind) and time.monotonic() < end + 30:
                todo.append(kind)  # missed (nothing was in flight): again later
            next_event = time.monotonic() + rnd.uniform(0.3, 1.0 if todo else 1.5)
        time.sleep(rnd.uniform(0.01, 0.08))  # pacing of the load generator, not a synchronisation
    chaos_s = time.monotonic() - t_start
    sent = load.sent

    for kind in KINDS:
        assert chaos.counts[kind] >= 1, (kind, dict(chaos.counts), f"seed {seed}")
    assert len(sent) >= 50 and load.dropped == 0, (len(sent), load.dropped)

    ack_topics = topics.ack_topics(device_uuid)

    done: dict[str, set[str]] = {t: set() for t in ack_topics}
    parsed = 0

    def terminal_for_all() -> bool:  # incremental: a soak's acks are tens of thousands
        nonlocal parsed
        msgs = srv.messages("#")
        for m in msgs[parsed:]:
            if m.topic in done and (body := m.json())["status"] in TERMINAL:
                done[m.topic].add(body["command_id"])
        parsed = len(msgs)
        return all(set(sent) <= d for d in done.values())

    wait_until(terminal_for_all, 60, what=f"a terminal ack for every command on both topics (seed {seed})")

    # -- what the server saw ------------------------------------------------------------------
    acks: dict[str, dict[str, list]] = {t: defaultdict(list) for t in ack_topics}
    for t in ack_topics:
        for m in srv.messages(t):
            acks[t][m.json()["command_id"]].append(m)
    # The last command may still be in the helper's grace: read the log once it has acted.
    audit = wait_until(lambda: (a := HelperAudit.parse(tree.helper.log_text())).pending is None and a,
                       10, what="the helper done with its last action")
    outcome: dict[str, tuple[str, str | None]] = {}
    accepted = 0
    for cid, s in sent.items():
        terminals = []
        for t in ack_topics:
            got = {(m.json()["status"], m.json()["error_code"]) for m in acks[t][cid] if m.json()["status"] in TERMINAL}
            assert len(got) == 1, (cid, t, [m.json() for m in acks[t][cid]], f"seed {seed}")  # one outcome
            terminals.append(got.pop())
        assert terminals[0] == terminals[1], (cid, terminals)  # the same on both topics
        outcome[cid] = terminals[0]
        if any(m.json()["status"] == "accepted" for m in acks[ack_topics[0]][cid]):
            accepted += 1
            assert s.expires_mono is not None, (cid, "accepted although expired when sent")
            for t in ack_topics:  # within its expiry, on each topic
                first = min(m.received_at for m in acks[t][cid] if m.json()["status"] in TERMINAL)
                assert first <= s.expires_mono, (cid, t, first - s.expires_mono)
        if s.expires_mono is None:
            assert outcome[cid] == ("failed", "expired"), (cid, outcome[cid])

    # -- what the helper did: never twice, and `completed` only if it ran ----------------------
    assert audit.unattributed == 0 and audit.state_corrupt == 0, audit
    assert not set(audit.executions) - set(sent)
    for cid in sent:
        assert audit.executions[cid] <= 1, (cid, audit.executions[cid], f"seed {seed}")  # never run twice
        assert audit.scheduled[cid] <= 1, (cid, audit.scheduled[cid])  # never even scheduled twice
        assert len([o for o in audit.exec_outcomes.get(cid, []) if o == "ok"]) <= audit.executions[cid]
        if outcome[cid] == ("completed", None) and audit.executions[cid] == 0:
            assert cid in audit.died_in_grace, (cid, "completed but never run")

    # -- no state corrupted: a clean stop, an intact store, a replay store that knows all ---------
    assert tree.stop() == 0, tree.log_text()[-3000:]
    db = sqlite3.connect(tree.state / "mqtt-worker.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {k: s for k, s in db.execute("SELECT key, status FROM commands")}
    finally:
        db.close()
    assert all(stored.get(cid) in TERMINAL for cid in sent), "a command left unfinished in the store"
    seen = json.loads((tree.helper.dir / "helper-state" / "actions.json").read_text())["seen"]
    assert set(audit.scheduled) <= set(seen)

    outcomes = Counter(code or status for status, code in outcome.values())
    completed_not_run = sum(1 for c in sent if outcome[c][0] == "completed" and not audit.executions[c])
    failed_but_run = sum(1 for c in sent if outcome[c][0] == "failed" and audit.executions[c])
    kills = {k: v for k, v in sorted(chaos.counts.items())}
    # Replaced by the supervisor's hang timeout: what the deadlock of test_broker_gone_mid_command.py
    # looks like from outside (a broker restart while the worker publishes from a paho callback).
    hangs = tree.log_text().count("hung (heartbeats stopped)")
    print(f"\nchaos (seed {seed}): {chaos_s:.0f} s, {len(sent)} commands ({accepted} accepted), "
          f"{sum(audit.executions.values())} executions; kills {kills}; outcomes {dict(outcomes)}; "
          f"completed but not run (helper died in its grace) {completed_not_run}, "
          f"failed but run (the answer died with the supervisor) {failed_but_run}; "
          f"helper refusals {dict(audit.refusals)}; MQTT worker hangs {hangs}; "
          f"watchdog lapse max {max(chaos.lapses, default=0):.2f} s, "
          f"unit restart to READY max {max(chaos.restarts, default=0):.2f} s")
