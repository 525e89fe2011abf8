"""The per-worker policy driven without processes: a recording ProcessControl and a hand clock."""

from __future__ import annotations

import signal

import pytest

from infoscreen.supervisor.policy import Params, WorkerPolicy
from infoscreen.supervisor.states import Event, State


class Recorder:
    def __init__(self, fail_spawn: bool = False) -> None:
        self.calls: list[tuple] = []
        self.next_pid = 100
        self.fail_spawn = fail_spawn

    def spawn(self, worker: str) -> int:
        if self.fail_spawn:
            raise OSError(2, "No such file or directory")
        self.next_pid += 1
        self.calls.append(("spawn", worker, self.next_pid))
        return self.next_pid

    def kill(self, pid: int, sig: int) -> None:
        self.calls.append(("kill", pid, sig))


P = Params(hang_timeout_s=10, start_timeout_s=10, stop_grace_s=5, hung_grace_s=0.3, stable_after_s=2,
           backoff_base_s=0.25, backoff_cap_s=10, max_restarts=5, restart_window_s=60)


def running(now: float = 0.0, params: Params = P) -> tuple[WorkerPolicy, Recorder, list]:
    rec = Recorder()
    transitions: list = []
    p = WorkerPolicy("mqtt", params, rec, transitions.append)
    p.handle(Event.START, now)
    p.handle(Event.HELLO, now + 0.1)
    return p, rec, transitions


def test_start_hello_running():
    p, rec, tr = running()
    assert p.state is State.RUNNING and p.pid == 101
    assert rec.calls == [("spawn", "mqtt", 101)]
    assert [(t.old, t.new) for t in tr] == [(State.STOPPED, State.STARTING), (State.STARTING, State.RUNNING)]
    assert p.deadline == pytest.approx(10.1)


def test_heartbeat_moves_the_deadline_without_a_transition():
    p, _, tr = running()
    n = len(tr)
    p.handle(Event.HEARTBEAT, 5.0)
    assert p.deadline == pytest.approx(15.0) and len(tr) == n and p.state is State.RUNNING


def test_silence_is_a_hang_sigterm_then_sigkill_then_restart_at_once():
    p, rec, _ = running()
    p.handle(Event.DEADLINE, 10.1)
    assert p.state is State.STOPPING and rec.calls[-1] == ("kill", 101, signal.SIGTERM)
    assert p.deadline == pytest.approx(10.4)
    p.handle(Event.DEADLINE, 10.4)
    assert rec.calls[-1] == ("kill", 101, signal.SIGKILL) and p.state is State.STOPPING
    p.handle(Event.EXITED, 10.45)
    # It had been ready for 10 s: restarted at once, no backoff.
    assert p.state is State.STARTING and rec.calls[-1] == ("spawn", "mqtt", 102)
    assert p.restart_count == 1


def test_no_hello_in_time_is_a_hang_too():
    rec = Recorder()
    p = WorkerPolicy("health", P, rec)
    p.handle(Event.START, 0)
    p.handle(Event.HEARTBEAT, 1)  # heartbeats before hello do not make it ready
    assert p.state is State.STARTING
    p.handle(Event.DEADLINE, 10)
    assert p.state is State.STOPPING and rec.calls[-1] == ("kill", 101, signal.SIGTERM)


def test_early_exits_back_off_exponentially_with_a_cap():
    params = Params(backoff_base_s=0.25, backoff_cap_s=1.0, max_restarts=100, restart_window_s=60)
    rec = Recorder()
    p = WorkerPolicy("mqtt", params, rec)
    p.handle(Event.START, 0)
    now, delays = 0.0, []
    for _ in range(5):
        p.handle(Event.EXITED, now)
        assert p.state is State.BACKOFF
        delays.append(round(p.deadline - now, 3))
        now = p.deadline
        p.handle(Event.DEADLINE, now)
        assert p.state is State.STARTING
    assert delays == [0.25, 0.5, 1.0, 1.0, 1.0]


def test_a_stable_run_resets_the_backoff():
    p, rec, _ = running()
    p.handle(Event.EXITED, 0.5)  # ready only 0.4 s: early
    assert p.state is State.BACKOFF
    p.handle(Event.DEADLINE, p.deadline)
    p.handle(Event.HELLO, 1.0)
    p.handle(Event.EXITED, 30.0)  # ready 29 s: stable
    assert p.state is State.STARTING and p.consecutive_failures == 0


def test_more_than_max_restarts_in_the_window_is_fatal():
    p, rec, tr = running()
    now = 0.2
    for i in range(5):
        p.handle(Event.EXITED, now)
        assert p.state is State.BACKOFF, i
        now = p.deadline
        p.handle(Event.DEADLINE, now)
    p.handle(Event.EXITED, now + 0.1)  # the sixth restart within 60 s
    assert p.state is State.FATAL and not p.within_budget
    assert "6 restarts in 60 s" in tr[-1].reason
    spawns = [c for c in rec.calls if c[0] == "spawn"]
    assert len(spawns) == 6  # the first start and five restarts; never a seventh
    p.handle(Event.DEADLINE, now + 100)
    assert p.state is State.FATAL


def test_restarts_spread_beyond_the_window_do_not_escalate():
    p, _, _ = running()
    now = 0.0
    for _ in range(20):
        now += 13.0  # one crash every 13 s: at most 5 within any 60 s
        p.handle(Event.EXITED, now)
        if p.state is State.BACKOFF:
            p.handle(Event.DEADLINE, p.deadline)
        p.handle(Event.HELLO, now + 0.5)
    assert p.state is State.RUNNING and p.restart_count == 20


def test_stop_while_running_terminates_and_ends_stopped():
    p, rec, _ = running()
    p.handle(Event.STOP, 1.0)
    assert p.state is State.STOPPING and rec.calls[-1] == ("kill", 101, signal.SIGTERM)
    assert p.deadline == pytest.approx(6.0)
    p.handle(Event.DEADLINE, 6.0)
    assert rec.calls[-1] == ("kill", 101, signal.SIGKILL)
    p.handle(Event.EXITED, 6.01)
    assert p.state is State.STOPPED and p.deadline is None
    assert [c for c in rec.calls if c[0] == "spawn"] == [("spawn", "mqtt", 101)]


def test_stop_during_backoff_and_during_a_hang_kill():
    p, rec, _ = running()
    p.handle(Event.EXITED, 0.5)
    p.handle(Event.STOP, 0.6)
    assert p.state is State.STOPPED
    p2, rec2, _ = running()
    p2.handle(Event.DEADLINE, 10.1)  # hung: SIGTERM sent
    p2.handle(Event.STOP, 10.2)  # shutdown arrives meanwhile
    p2.handle(Event.EXITED, 10.3)
    assert p2.state is State.STOPPED  # not restarted on the way out


def test_spawn_failure_counts_as_an_early_exit():
    rec = Recorder(fail_spawn=True)
    p = WorkerPolicy("mqtt", P, rec)
    p.handle(Event.START, 0)
    assert p.state is State.BACKOFF and p.restart_count == 1


def test_events_without_a_row_are_ignored():
    p, rec, tr = running()
    n_calls, n_tr = len(rec.calls), len(tr)
    for ev in (Event.START,):
        p.handle(ev, 1.0)
    assert p.state is State.RUNNING and len(rec.calls) == n_calls and len(tr) == n_tr
    stopped = WorkerPolicy("x", P, Recorder())
    for ev in (Event.HELLO, Event.HEARTBEAT, Event.EXITED, Event.DEADLINE):
        stopped.handle(ev, 0)
        assert stopped.state is State.STOPPED
