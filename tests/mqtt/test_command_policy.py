"""The command table, admission and the kind decision, without processes, store or clock:
row by row, against the diagram in docs/mqtt-worker.md, and over random event sequences."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infoscreen.workers.mqtt import admission, command_policy
from infoscreen.workers.mqtt.command_policy import (ANY, TABLE, Arm, Cancel, Commit, Occurrence, Publish, Query,
                                                    Reanswer, RequestExecution, result_occurrence, step)
from infoscreen.workers.mqtt.command_states import (STATUS, TERMINAL, Event, Kind, State, Timer, kind_of,
                                                    result_event)

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "mqtt-worker.md"
PURE = ("command_states.py", "command_policy.py", "admission.py")


# -- the kind and the result, each decided once --------------------------------------------------------
def test_kind_from_the_action_and_the_mock_setting():
    assert kind_of("reboot_host", False, False) is Kind.REBOOT
    assert kind_of("shutdown_host", False, True) is Kind.SHUTDOWN
    assert kind_of("reboot_host", True, False) is Kind.MOCK
    assert kind_of("shutdown_host", True, False) is Kind.MOCK
    # The mock setting never applies in production (the configuration refuses it there too).
    assert kind_of("reboot_host", True, True) is Kind.REBOOT
    assert kind_of("format_disk", False, False) is None and kind_of(None, True, False) is None


def test_result_event_judges_the_helpers_mock_flag_against_production():
    assert result_event(known=False, ok=False, mock=False, production=True) is Event.LOST
    assert result_event(True, False, False, False) is Event.EXEC_FAILED
    assert result_event(True, False, True, True) is Event.EXEC_FAILED
    assert result_event(True, True, False, True) is Event.DONE
    assert result_event(True, True, True, False) is Event.DONE_MOCK
    assert result_event(True, True, True, True) is Event.MOCK_IN_PRODUCTION


def test_a_failed_result_keeps_a_known_code_and_maps_an_unknown_one():
    occ = result_occurrence(Event.EXEC_FAILED, "helper_timeout", "no answer within 5 s")
    assert (occ.code, occ.message) == ("helper_timeout", "no answer within 5 s")
    occ = result_occurrence(Event.EXEC_FAILED, "disk_on_fire", "smoke")
    assert (occ.code, occ.message) == ("execution_failed", "disk_on_fire: smoke")
    assert result_occurrence(Event.EXEC_FAILED, "x", "y" * 1000).message == ("x: " + "y" * 1000)[:300]
    # The supervisor never answers a failure without a code (its helper client refuses such an
    # answer); one would be a failure all the same, never "still running".
    occ = result_occurrence(Event.EXEC_FAILED, None, None)
    assert occ.code == "execution_failed" and "without a code" in occ.message
    assert result_occurrence(Event.DONE, None, None) == Occurrence(Event.DONE)


def test_the_supervisor_never_reports_a_failure_without_a_code():
    # Why the table has no "known, not ok, no code" case: the helper client refuses such an
    # answer from the helper (helper_rejected), and every failure it or the executor makes
    # has a code.
    import json

    from infoscreen.helper import protocol
    from infoscreen.supervisor import helper_client

    answer = {"v": protocol.VERSION, "ok": False, "command_id": None, "mock": False, "error_code": None,
              "error_message": "x"}
    with pytest.raises(protocol.ProtocolError):
        helper_client.decode_response(json.dumps(answer).encode())
    for helper_code in ("busy", "signature_invalid", "exec_failed", "exec_timeout", "anything"):
        out = helper_client._map_answer(dict(answer, error_code=helper_code))
        assert not out.ok and out.error_code


# -- admission ----------------------------------------------------------------------------------------
def test_admission_order():
    ok = dict(command_id="c", known=False)
    assert isinstance(admission.admit(command_id=None, known=False), admission.Ignore)
    # A known command is a repeat whatever else is wrong with this copy.
    assert admission.admit(command_id="c", known=True, defect=("invalid_payload", "x"), unsigned_on_keyed=True,
                           expiry=("expired", "e"), busy_with=("o", "reboot_host")) == admission.Repeat()
    everything = dict(defect=("target_mismatch", "not us"), unsigned_on_keyed=True, expiry=("expired", "late"),
                      busy_with=("o", "reboot_host"))
    assert admission.admit(**ok, **everything).code == "target_mismatch"
    everything.pop("defect")
    assert admission.admit(**ok, **everything).code == "signature_invalid"
    everything.pop("unsigned_on_keyed")
    assert admission.admit(**ok, **everything) == admission.Refuse("expired", "late")
    everything.pop("expiry")
    busy = admission.admit(**ok, **everything)
    assert busy.code == "busy" and "o (reboot_host)" in busy.message and busy.own_deadline
    assert admission.admit(**ok) == admission.Admit()
    assert admission.admit(**ok, expiry=("invalid_payload", "too far")).code == "invalid_payload"


def test_admission_of_a_command_given_up():
    assert admission.admit(command_id="c", known=False, given_up="crashed 3 times") == \
        admission.Refuse("internal_error", "given up: crashed 3 times")
    assert isinstance(admission.admit(command_id="c", known=True, given_up="x"), admission.Ignore)


# -- the table, row by row ----------------------------------------------------------------------------------
def kinds_of(key_kind):
    return list(Kind) if key_kind is ANY else [key_kind]


@pytest.mark.parametrize("key", sorted(TABLE, key=lambda k: (k[0].value, str(k[1]), k[2].value)),
                         ids=lambda k: f"{k[0].value}-{k[1].value if k[1] else 'any'}-{k[2].value}")
def test_every_row(key):
    state, key_kind, event = key
    row = TABLE[key]
    for kind in kinds_of(key_kind):
        if key_kind is ANY and (state, kind, event) in TABLE:
            continue  # a row of its own for this kind
        s = step(state, kind, Occurrence(event, "helper_timeout", "m"))
        assert s is not None and s.key == key and s.new is row.new
        effects = list(s.effects)
        commits = [e for e in effects if isinstance(e, Commit)]
        # A status change is one commit, published after it, and the acks say the new status.
        if commits:
            (c,) = commits
            assert c.acks[-1] == STATUS[row.new]
            assert isinstance(effects[effects.index(c) + 1], Publish)
            assert any(isinstance(e, Publish) for e in effects[effects.index(c):])
            if row.new is State.FAILED:
                assert c.code and c.message
        else:
            assert row.new in (state, State.AWAITING_BOOT, State.QUERYING), "a status change without a commit"
            assert STATUS.get(row.new) == STATUS.get(state)
        # Only admission requests execution, once, right after its commit's acks are published.
        requests = [i for i, e in enumerate(effects) if isinstance(e, RequestExecution)]
        assert (requests == [2]) == (event is Event.ADMITTED) and len(requests) <= 1
        if requests:
            assert isinstance(effects[0], Commit) and isinstance(effects[1], Publish)
        if row.new in TERMINAL and state not in TERMINAL:
            assert not any(isinstance(e, (Arm, Query)) for e in effects)
            if state is not State.NEW and state is not State.STORED:  # those have no timers yet
                assert effects[-1] == Cancel(frozenset(Timer)), "no timer outlives the command"
        if state in TERMINAL:
            assert row.new is state and effects == [Reanswer()]
        if any(isinstance(e, Arm) and e.timer is Timer.REBOOT_GRACE for e in effects):
            assert kind is Kind.REBOOT


def test_fixed_codes_of_the_rows():
    def code(state, kind, event):
        (c,) = [e for e in step(state, kind, Occurrence(event)).effects if isinstance(e, Commit)]
        return c.code, c.message

    assert code(State.QUERYING, Kind.SHUTDOWN, Event.QUERIES_EXHAUSTED)[0] == "helper_timeout"
    assert code(State.QUERYING, Kind.MOCK, Event.LOST)[0] == "execution_failed"
    c, m = code(State.REQUESTED, Kind.REBOOT, Event.MOCK_IN_PRODUCTION)
    assert c == "helper_rejected" and "mock" in m
    assert code(State.AWAITING_BOOT, Kind.REBOOT, Event.GRACE_OVER)[0] == "reboot_not_observed"
    s = step(State.QUERYING, Kind.REBOOT, Occurrence(Event.GRACE_OVER, message="the same boot (b) ..."))
    assert s.effects[0].message == "the same boot (b) ..."
    s = step(State.NEW, None, Occurrence(Event.REFUSED, "target_mismatch", "not this client"))
    assert s.new is State.FAILED and s.effects[0] == Commit(("failed",), "target_mismatch", "not this client")


def test_pairs_without_a_row_are_none():
    assert step(State.AWAITING_BOOT, Kind.REBOOT, Occurrence(Event.DONE)) is None  # already scheduled
    assert step(State.REQUESTED, Kind.SHUTDOWN, Occurrence(Event.LOST)) is None  # known=False answers a query
    assert step(State.COMPLETED, Kind.SHUTDOWN, Occurrence(Event.EXEC_FAILED)) is None
    assert step(State.REQUESTED, Kind.SHUTDOWN, Occurrence(Event.GRACE_OVER)) is None
    assert step(State.STORED, Kind.REBOOT, Occurrence(Event.ADMITTED)) is None
    for event in Event:  # terminal states are absorbing
        for state in TERMINAL:
            s = step(state, Kind.REBOOT, Occurrence(event))
            assert s is None or (s.new is state and event is Event.REPEATED)


def test_the_policy_modules_import_no_io():
    allowed = {"__future__", "enum", "msgspec", "typing", "collections.abc",
               "wire.schema", "command_states", "command_policy"}
    for name in PURE:
        tree = ast.parse((REPO / "infoscreen" / "workers" / "mqtt" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]  # relative: `from ...wire.schema` is "wire.schema"
            else:
                continue
            for m in mods:
                assert m in allowed, f"{name} imports {m}"


# -- the diagram in docs/mqtt-worker.md --------------------------------------------------------------------
LINE = re.compile(r"^(?P<src>[a-z_|]+) --(?P<event>[a-z_]+)(?: \((?P<kinds>[a-z|]+)\))?--> (?P<dst>[a-z_]+)(?:\s{2,}.*)?$")


def diagram() -> set[tuple[State, Kind, Event, State]]:
    text = DOC.read_text()
    section = text[text.index("## The state of a command"):]
    section = section[:section.index("\n## ", 3)]
    block = section.split("```")[1]
    out = set()
    for line in block.strip("\n").splitlines():
        m = LINE.match(line)
        assert m, f"not a transition: {line!r}"
        event = Event(m["event"])
        kinds = [Kind(k) for k in m["kinds"].split("|")] if m["kinds"] else list(Kind)
        for src in m["src"].split("|"):
            dst = src if m["dst"] == "same" else m["dst"]
            for kind in kinds:
                out.add((State(src), kind, event, State(dst)))
    return out


def test_the_diagram_draws_the_table():
    drawn, table = diagram(), command_policy.transitions()
    assert drawn - table == set(), "drawn, not in the table"
    assert table - drawn == set(), "in the table, not drawn"


def test_the_diagram_parser_sees_a_wrong_line():
    assert LINE.match("querying --lost (reboot)--> awaiting_boot     known=False")
    assert not LINE.match("querying -- lost --> failed")


# -- random event sequences -----------------------------------------------------------------------------
def expire(timer: Timer, queries: int) -> Event:
    """What the interpreter makes of a timer that fires (QUERY_TRIES = 5)."""
    if timer is Timer.RESULT_WAIT:
        return Event.RESULT_WAIT_OVER
    if timer is Timer.QUERY_RETRY:
        return Event.QUERY_DUE if queries < 5 else Event.QUERIES_EXHAUSTED
    return Event.GRACE_OVER


class Machine:
    """One command driven through the table as the interpreter would, recording the effects."""

    def __init__(self, kind: Kind) -> None:
        self.kind, self.state = kind, State.NEW
        self.armed: set[Timer] = set()
        self.queries = 0
        self.requests = 0
        self.statuses: list[str] = []
        self.terminal_commits = 0

    def feed(self, event: Event, code: str | None = "helper_rejected") -> None:
        s = step(self.state, self.kind, Occurrence(event, code, "m"))
        if s is None:
            return
        before = self.state
        for e in s.effects:
            if isinstance(e, Commit):
                self.statuses += list(e.acks)
                if s.new in TERMINAL:
                    self.terminal_commits += 1
            elif isinstance(e, RequestExecution):
                assert self.statuses[-2:] == ["accepted", "execution_started"]  # committed first
                self.requests += 1
            elif isinstance(e, Query):
                self.queries += 1
            elif isinstance(e, Arm):
                self.armed.add(e.timer)
            elif isinstance(e, Cancel):
                self.armed -= e.timers
        if before in TERMINAL:
            assert s.new is before and s.effects == (Reanswer(),)
        self.state = s.new

    def restart(self, new_boot: bool) -> None:
        """The process dies: its timers with it; a record in execution_started is stored."""
        self.armed.clear()
        self.queries = 0
        if self.state not in TERMINAL and self.state is not State.NEW:
            self.state = State.STORED
            self.feed(Event.NEW_BOOT if new_boot else Event.SAME_BOOT)

    def drain(self) -> None:
        """The timers run out; a command nothing is left to decide ends at the next boot."""
        for _ in range(50):
            if not self.armed:
                break
            timer = sorted(self.armed)[0]
            self.armed.discard(timer)
            self.feed(expire(timer, self.queries))
        if self.state not in TERMINAL and self.state is not State.NEW:
            self.restart(new_boot=True)


EVENTS = st.sampled_from([e for e in Event if e not in (Event.NEW_BOOT, Event.SAME_BOOT)])
ACTIONS = st.one_of(
    st.tuples(st.just("event"), EVENTS),
    st.tuples(st.just("timer"), st.sampled_from(list(Timer))),
    st.tuples(st.just("restart"), st.booleans()),
)


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(list(Kind)), actions=st.lists(ACTIONS, max_size=40))
def test_random_sequences_keep_the_promises(kind, actions):
    m = Machine(kind)
    terminal_seen = None
    for what, arg in actions:
        if what == "event":
            m.feed(arg)
        elif what == "timer":
            if arg in m.armed:  # only an armed timer fires
                m.armed.discard(arg)
                m.feed(expire(arg, m.queries))
        else:
            m.restart(arg)
        if m.state in TERMINAL:
            terminal_seen = terminal_seen or m.state
            assert m.state is terminal_seen, "a terminal state is absorbing"
            assert not m.armed, "no timer outlives the command"
        assert m.requests <= 1 and m.terminal_commits <= 1
    m.feed(Event.ADMITTED)  # a command never admitted is admitted now (or this is a repeat: no change)
    m.drain()
    assert m.state in TERMINAL and m.requests == 1 or m.statuses == ["failed"]
    assert m.terminal_commits == 1 and not m.armed
    # Statuses in lifecycle order, one terminal status, last.
    order = ["accepted", "execution_started", "completed", "failed"]
    assert m.statuses == sorted(m.statuses, key=order.index)
    assert [s for s in m.statuses if s in ("completed", "failed")] == [m.statuses[-1]]
