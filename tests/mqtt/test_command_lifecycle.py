"""The interpreter (lifecycle.py) in this process on a hand clock (tests/mqtt/lifecycle_harness.py):
every row of the table reached through the real entry points (commands, ExecResult, timers,
restarts) with a real SQLite store and outbox; random sequences of all of them; the evidence;
what the path of a command costs in store statements."""

from __future__ import annotations

import logging
import tempfile
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infoscreen.ipc import messages
from infoscreen.workers.mqtt.command_policy import (ANY, TABLE, Arm, Cancel, Commit, Occurrence, Query, Reanswer,
                                                    RequestExecution, step)
from infoscreen.workers.mqtt.command_states import STATUS, TERMINAL, Event, Kind, State
from infoscreen.workers.mqtt.lifecycle import QUERY_EVERY_S, QUERY_TRIES

from .lifecycle_harness import ACK_TOPICS, Device

ACTION = {Kind.REBOOT: "reboot_host", Kind.SHUTDOWN: "shutdown_host", Kind.MOCK: "shutdown_host"}
RESULT_WAIT_S = 1 + 3.0  # HELPER_TIMEOUT_S=1 in the harness, plus 3 s
# Where a grace period falls for each state it can end: before the result wait is over
# (requested), within the queries (querying: 4 s .. 14 s), after them (awaiting_boot).
GRACE = {State.REQUESTED: "2", State.QUERYING: "9", State.AWAITING_BOOT: "60"}


def reachable(state: State, kind: Kind, event: Event) -> bool:
    if kind is Kind.MOCK and event is Event.MOCK_IN_PRODUCTION:
        return False  # the mock setting is refused in production, and only production sees this event
    if state is State.AWAITING_BOOT and kind is not Kind.REBOOT:
        return False  # only a reboot waits for a boot (the repeat row holds for any kind)
    return True


COMBOS = sorted(((s, k, e) for s in State for k in Kind for e in Event
                 if step(s, k, Occurrence(e)) is not None and reachable(s, k, e)),
                key=lambda c: (c[0].value, c[1].value, c[2].value))


def device(tmp, state: State, kind: Kind, event: Event) -> Device:
    env = {}
    if kind is Kind.MOCK:
        env["COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE"] = "1"
    if event is Event.MOCK_IN_PRODUCTION:
        env["INFOSCREEN_ENV"] = "production"
    if event in (Event.GRACE_OVER, Event.BOOT_CHANGING):
        env["REBOOT_GRACE_S"] = GRACE[state]
    return Device(tmp, **env)


def reach(dev: Device, state: State, kind: Kind) -> str | None:
    """Bring a command of this kind into this state through the entry points; its id."""
    action = ACTION[kind]
    if state is State.NEW:
        return None
    if state is State.FAILED:
        return dev.command(action, expires_in=-60)
    cid = dev.command(action)
    if state is State.QUERYING:
        dev.advance(RESULT_WAIT_S)
    elif state is State.AWAITING_BOOT:
        dev.result(cid, ok=True)
    elif state is State.COMPLETED:
        if kind is Kind.REBOOT:
            dev.restart(new_boot=True)
        else:
            dev.result(cid, ok=True)
    assert state is State.STORED or dev.last(cid).new is state
    return cid


def fire(dev: Device, cid: str | None, kind: Kind, event: Event) -> str:
    action = ACTION[kind]
    if event is Event.ADMITTED:
        return dev.command(action)
    if event is Event.REFUSED:
        return dev.command(action, expires_in=-60)
    assert cid is not None
    if event is Event.REPEATED:
        dev.command(action, cid, topic="command")
    elif event is Event.DONE:
        dev.result(cid, ok=True)
    elif event in (Event.DONE_MOCK, Event.MOCK_IN_PRODUCTION):
        dev.result(cid, ok=True, mock=True)
    elif event is Event.EXEC_FAILED:
        dev.result(cid, ok=False, code="helper_unavailable", message="no helper socket")
    elif event is Event.LOST:
        dev.result(cid, known=False)
    elif event is Event.RESULT_WAIT_OVER:
        dev.advance(RESULT_WAIT_S)
    elif event is Event.QUERY_DUE:
        dev.advance(QUERY_EVERY_S)
    elif event is Event.QUERIES_EXHAUSTED:
        dev.advance(QUERY_EVERY_S * QUERY_TRIES)
    elif event in (Event.GRACE_OVER, Event.BOOT_CHANGING):
        if event is Event.BOOT_CHANGING:
            dev.new_boot()
        rec = dev.store.get(cid.lower())
        dev.advance(rec.exec_mono + dev.cfg.reboot_grace_s - dev.clock.mono())
    elif event in (Event.NEW_BOOT, Event.SAME_BOOT):
        dev.restart(new_boot=event is Event.NEW_BOOT)
    return cid


def test_every_row_is_reached():
    covered = {step(s, k, Occurrence(e)).key for s, k, e in COMBOS}
    assert covered == set(TABLE)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(x.value for x in c))
def test_every_row_through_the_interpreter(tmp_path, combo):
    state, kind, event = combo
    dev = device(tmp_path, state, kind, event)
    cid = reach(dev, state, kind)
    restart = event in (Event.NEW_BOOT, Event.SAME_BOOT)  # the old process's timers die with it
    live = dev.lc.inflight.get(cid.lower()) if cid and not restart else None
    n = len(dev.transitions)
    cid = fire(dev, cid, kind, event)
    t = dev.last(cid)
    i = dev.transitions.index(t)
    expected = step(state, kind, Occurrence(event))
    assert i >= n and (t.key, t.old, t.new) == (expected.key, state, expected.new)
    assert t.key[:1] == (state,) and t.key[2] is event and t.key[1] in (kind, ANY)

    # The effects, as the outside saw them.
    effects = t.effects
    sent = [s.msg for s in dev.sent if s.transition == i]
    assert len([m for m in sent if isinstance(m, messages.ExecRequest)]) == \
        sum(isinstance(e, RequestExecution) for e in effects)
    assert len([m for m in sent if isinstance(m, messages.ExecQuery)]) == sum(isinstance(e, Query) for e in effects)
    rec = dev.store.get(cid.lower())
    assert rec.status == STATUS[t.new]
    want = []
    for e in effects:
        if isinstance(e, Commit):
            want += list(e.acks)
        elif isinstance(e, Reanswer):
            want.append(rec.status)
    for topic in ACK_TOPICS:
        got = [p.ack for p in dev.published if p.transition == i and p.topic == topic]
        assert [a["status"] for a in got] == want, topic
        for a in got:
            failed = a["status"] == "failed"
            assert (a["error_code"] is not None) == failed and (a["error_message"] is not None) == failed
            if failed:
                assert a["error_code"] == rec.error_code
    if any(isinstance(e, RequestExecution) for e in effects):
        req = next(s for s in dev.sent if s.transition == i and isinstance(s.msg, messages.ExecRequest))
        last_ack = max(p.seq for p in dev.published if p.transition == i)
        assert last_ack < req.seq  # committed, then published, then requested
    # The timers.
    if t.new in TERMINAL:
        assert cid.lower() not in dev.lc.inflight
        assert dev.command_timers() == [], "no timer outlives the command"
    else:
        live = dev.lc.inflight[cid.lower()]
        armed = {k for k, timer in live.timers.items() if not timer.cancelled}
        assert len(dev.command_timers()) == len(armed)
        for e in effects:
            if isinstance(e, Arm):
                assert e.timer in armed
            elif isinstance(e, Cancel):
                assert not (e.timers & armed)
    assert len(dev.requests(cid)) <= 1
    dev.stop()


def test_a_refused_command_without_a_valid_action(tmp_path):
    dev = Device(tmp_path)
    cid = dev.command("format_disk")
    t = dev.last(cid)
    assert t.key == (State.NEW, ANY, Event.REFUSED) and t.new is State.FAILED
    assert dev.acks(cid)[-1]["error_code"] == "unsupported_action" and dev.requests(cid) == []
    dev.stop()


def test_pairs_without_a_row_are_ignored_and_logged(tmp_path, caplog):
    dev = Device(tmp_path)
    cid = dev.command("reboot_host")
    dev.result(cid, known=False)  # before any query: not an answer to anything
    assert dev.last(cid).new is State.REQUESTED
    dev.result(cid, ok=True)
    with caplog.at_level(logging.INFO, logger="infoscreen.workers.mqtt.lifecycle"):
        dev.result(cid, ok=True)  # a second answer to a reboot already scheduled
    assert "done ignored in state awaiting_boot" in caplog.text
    assert all(r.levelno < logging.WARNING for r in caplog.records)  # not a logs/warn line
    assert dev.statuses(cid) == ["accepted", "execution_started"] and len(dev.requests(cid)) == 1
    dev.stop()


def test_the_path_of_a_command_is_one_read_and_one_transaction_with_its_evidence(tmp_path):
    dev = Device(tmp_path)
    dev.result(dev.command("shutdown_host"), ok=True)  # a command executed before: evidence exists
    dev.restart()
    statements: list[str] = []
    dev.store.db.set_trace_callback(statements.append)
    cid = str(uuid.uuid4())
    dev.lc.on_command(dev.payload("reboot_host", cid), "infoscreen/x/commands", None)
    dev.store.db.set_trace_callback(None)
    assert dev.last(cid).new is State.REQUESTED and len(dev.requests(cid)) == 1
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 1 and "FROM commands WHERE key" in selects[0]
    assert [s for s in statements if s.strip().upper() in ("BEGIN IMMEDIATE", "COMMIT")] == \
        ["BEGIN IMMEDIATE", "COMMIT"]
    # The record, its ack rows and the power evidence are that one transaction.
    txn = statements[statements.index("BEGIN IMMEDIATE"):statements.index("COMMIT")]
    assert any("INTO commands" in s for s in txn) and any("INTO kv" in s for s in txn)
    assert sum("INTO outbox" in s for s in txn) == 4  # accepted and execution_started, both topics
    dev.stop()


# -- evidence ----------------------------------------------------------------------------------
def test_reboot_evidence_across_the_boot(tmp_path):
    dev = Device(tmp_path)
    before = dev.boot_id
    cid = dev.command("reboot_host")
    dev.result(cid, ok=True)
    lp = dev.lc.last_power_command()
    assert lp["command_id"] == cid and lp["status"] == "execution_started" and lp["boot_id_before"] == before
    dev.clock.advance(40.0)  # off, and booting
    dev.restart(new_boot=True)
    assert dev.statuses(cid) == ["accepted", "execution_started", "completed"]
    lp = dev.lc.last_power_command()
    assert lp["status"] == "completed" and lp["boot_id_after"] == dev.boot_id and lp["seconds_to_reconnect"] is None
    dev.clock.advance(5.0)
    dev.lc.on_connected()
    assert dev.lc.last_power_command()["seconds_to_reconnect"] == pytest.approx(45.0)
    dev.restart()  # and it is on disk
    assert dev.lc.last_power_command()["seconds_to_reconnect"] == pytest.approx(45.0)
    dev.stop()


def test_a_real_shutdown_is_reported_at_the_next_boot_a_mock_one_is_not(tmp_path):
    dev = Device(tmp_path / "real")
    cid = dev.command("shutdown_host")
    dev.result(cid, ok=True)
    dev.lc.on_connected()
    assert dev.info == []  # the same boot: nothing to say yet
    dev.restart(new_boot=True)
    dev.lc.on_connected()
    assert len(dev.info) == 1 and f"powered off by command {cid} (shutdown_host)" in dev.info[0]
    dev.restart(new_boot=True)
    dev.lc.on_connected()
    assert len(dev.info) == 1  # said once
    dev.stop()

    mock = Device(tmp_path / "mock", COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE="1")
    cid = mock.command("shutdown_host")
    mock.result(cid, ok=True)
    assert mock.statuses(cid)[-1] == "completed"
    mock.restart(new_boot=True)
    mock.lc.on_connected()
    assert mock.info == []
    mock.stop()


def test_a_refused_command_leaves_no_power_evidence(tmp_path):
    dev = Device(tmp_path)
    dev.command("reboot_host", expires_in=-5)
    assert dev.lc.last_power_command() is None
    dev.stop()


# -- random sequences through the interpreter -------------------------------------------------------
IDS = ["0b7a8c34-1e1b-4f5e-9d0c-7a1f2e3d4c5b", "1c8b9d45-2f2c-4a6f-8e1d-8b2a3f4e5d6c", "2d9cae56-3a3d-4b7a-9f2e-9c3b4a5f6e7d"]
STEPS = st.one_of(
    st.tuples(st.just("command"), st.sampled_from(["reboot_host", "shutdown_host"]), st.sampled_from(IDS),
              st.booleans()),
    st.tuples(st.just("result"), st.sampled_from(IDS), st.sampled_from(["ok", "mock", "failed", "lost"])),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 2.0, 5.0, 13.0, 70.0])),
    st.tuples(st.just("restart"), st.booleans()),
    st.tuples(st.just("boot_changes")),
    st.tuples(st.just("give_up"), st.sampled_from(IDS)),
)
ORDER = ["accepted", "execution_started", "completed", "failed"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setting=st.sampled_from(["test", "mock", "production"]), grace=st.sampled_from(["2", "9", "60"]),
       steps=st.lists(STEPS, max_size=25))
def test_random_sequences_through_the_interpreter(setting, grace, steps):
    env = {"REBOOT_GRACE_S": grace}
    if setting == "mock":
        env["COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE"] = "1"
    elif setting == "production":
        env["INFOSCREEN_ENV"] = "production"
    with tempfile.TemporaryDirectory() as tmp:
        dev = Device(tmp, **env)
        for s in steps:
            what = s[0]
            if what == "command":
                dev.command(s[1], s[2], expires_in=-5 if s[3] else 3600)
            elif what == "result":
                dev.result(s[1], ok=s[2] in ("ok", "mock"), mock=s[2] == "mock", known=s[2] != "lost",
                           code="execution_failed" if s[2] == "failed" else None, message="m")
            elif what == "advance":
                dev.advance(s[1])
            elif what == "restart":
                dev.restart(new_boot=s[1])
            elif what == "boot_changes":
                dev.new_boot()
            else:
                dev.lc.give_up(dev.payload("reboot_host", s[1]), "test")
                dev.settle()
        # Whatever happened, every command ends: the timers run out, and the next boot decides
        # what nothing else can (a reboot under way).
        dev.advance(200.0)
        if dev.lc.inflight:
            dev.restart(new_boot=True)
        assert not dev.lc.inflight and dev.command_timers() == []
        for cid in IDS:
            trans = dev.of(cid)
            if not trans:
                assert dev.statuses(cid) == [] and dev.requests(cid) == []
                continue
            # At most one execution request, ever, and only for an accepted command.
            reqs = [x for x in dev.sent if isinstance(x.msg, messages.ExecRequest) and x.msg.command_id == cid]
            assert len(reqs) <= 1
            # Every status on both ack topics, in the same order.
            a, b = dev.statuses(cid, ACK_TOPICS[0]), dev.statuses(cid, ACK_TOPICS[1])
            assert a == b
            assert a == sorted(a, key=ORDER.index), a
            terminal = [x for x in a if x in ("completed", "failed")]
            assert terminal and set(terminal) == {a[-1]}, a  # exactly one terminal status
            assert ("accepted" in a) == bool(reqs)
            # One transition into a terminal state, and terminal states are absorbing.
            into = [t for t in trans if t.new in TERMINAL and t.old not in TERMINAL]
            assert len(into) == 1
            after = trans[trans.index(into[0]) + 1:]
            assert all(t.old is into[0].new and t.new is into[0].new for t in after)
            assert dev.store.get(cid.lower()).status == a[-1]
        dev.stop()
