"""The command lifecycle as a table: (state, kind, event) -> (new state, effects as data).

Pure: no store, no loop, no sockets, no clock. :func:`step` looks the row up and returns what
to do; :class:`~.lifecycle.Lifecycle` turns messages and timers into events and carries the
effects out, in the order given, through one point. A pair without a row is ignored (the
interpreter logs it). A row keyed with ``ANY`` holds for every kind that has no row of its own.

Effects:

* :class:`Commit`: one SQLite transaction with the record's new status and one ack row per
  status in ``acks`` and per ack topic (and the power evidence, :mod:`.evidence`);
* :class:`RequestExecution`: the one ``ExecRequest`` (only in the ``admitted`` row);
* :class:`Publish`: hand the rows of that commit to the outbox;
* :class:`Query`: an ``ExecQuery``; :class:`Arm` / :class:`Cancel`: the command's timers;
* :class:`Reanswer`: publish the latest status again (a repeated command).
"""

from __future__ import annotations

import msgspec

from ...wire.schema import ERROR_CODES, AckStatus, ErrorCode
from .command_states import Event, Kind, State, Timer

ANY = None  # the kind of a row that holds for every kind (and for a command without one)

ACCEPTED = AckStatus.ACCEPTED.value
STARTED = AckStatus.EXECUTION_STARTED.value
COMPLETED = AckStatus.COMPLETED.value
FAILED = AckStatus.FAILED.value
MAX_MESSAGE = 300


# -- effects -----------------------------------------------------------------------------------
class Commit(msgspec.Struct, frozen=True):
    acks: tuple[str, ...]  # the ack statuses committed with the record, in order
    code: str | None = None  # a failed status: this code, or (None) the event's
    message: str | None = None  # the event's message if it has one, else this


class RequestExecution(msgspec.Struct, frozen=True):
    pass


class Publish(msgspec.Struct, frozen=True):
    pass


class Query(msgspec.Struct, frozen=True):
    pass


class Arm(msgspec.Struct, frozen=True):
    timer: Timer


class Cancel(msgspec.Struct, frozen=True):
    timers: frozenset[Timer]


class Reanswer(msgspec.Struct, frozen=True):
    pass


Effect = Commit | RequestExecution | Publish | Query | Arm | Cancel | Reanswer


class Occurrence(msgspec.Struct, frozen=True):
    """An event with what came with it (a refusal's or the supervisor's code and message)."""

    event: Event
    code: str | None = None
    message: str | None = None


class Row(msgspec.Struct, frozen=True):
    new: State
    effects: tuple[Effect, ...] = ()


class Step(msgspec.Struct, frozen=True):
    key: tuple[State, Kind | None, Event]  # the row that matched
    new: State
    effects: tuple[Effect, ...]


# -- the table --------------------------------------------------------------------------------------
ALL_TIMERS = frozenset(Timer)
ANSWERED = Cancel(frozenset({Timer.RESULT_WAIT, Timer.QUERY_RETRY}))  # an answer ends the asking


def _completed() -> Row:
    return Row(State.COMPLETED, (Commit((COMPLETED,)), Publish(), Cancel(ALL_TIMERS)))


def _failed(code: str | None = None, message: str | None = None) -> Row:
    return Row(State.FAILED, (Commit((FAILED,), code, message), Publish(), Cancel(ALL_TIMERS)))


LOST_MESSAGE = "the execution request was lost (the worker restarted before the supervisor got it)"
NO_ANSWER_MESSAGE = "no answer from the supervisor about the execution request"
MOCK_HELPER_MESSAGE = "the helper is in mock mode and executed nothing, but this client runs in production"

# The acks go out before the request: the server hears `accepted` one IPC send sooner, and a
# crash between the two is the same case as a crash right after the commit (a record in
# execution_started whose request the supervisor never got: ExecQuery says so).
_START = (Commit((ACCEPTED, STARTED)), Publish(), RequestExecution(), Arm(Timer.RESULT_WAIT))
_ASK = (Query(), Arm(Timer.QUERY_RETRY))
_REAL = (Kind.SHUTDOWN, Kind.MOCK)  # done on the helper's ok; a reboot needs a new boot

TABLE: dict[tuple[State, Kind | None, Event], Row] = {
    # Received: accepted and execution_started in one transaction, then both acks, then the one
    # ExecRequest; a refusal is answered and never executed.
    (State.NEW, ANY, Event.ADMITTED): Row(State.REQUESTED, _START),
    (State.NEW, Kind.REBOOT, Event.ADMITTED): Row(State.REQUESTED, (*_START, Arm(Timer.REBOOT_GRACE))),
    (State.NEW, ANY, Event.REFUSED): Row(State.FAILED, (Commit((FAILED,)), Publish())),
    # A record a previous process left in execution_started: never requested again.
    (State.STORED, ANY, Event.NEW_BOOT): Row(State.COMPLETED, (Commit((COMPLETED,)), Publish())),
    (State.STORED, ANY, Event.SAME_BOOT): Row(State.QUERYING, _ASK),
    (State.STORED, Kind.REBOOT, Event.SAME_BOOT): Row(State.QUERYING, (Arm(Timer.REBOOT_GRACE), *_ASK)),
    # No answer in time: ask, every QUERY_EVERY_S, QUERY_TRIES times.
    (State.REQUESTED, ANY, Event.RESULT_WAIT_OVER): Row(State.QUERYING, _ASK),
    (State.QUERYING, ANY, Event.QUERY_DUE): Row(State.QUERYING, _ASK),
    (State.QUERYING, Kind.REBOOT, Event.QUERIES_EXHAUSTED): Row(State.AWAITING_BOOT),
    **{(State.QUERYING, k, Event.QUERIES_EXHAUSTED): _failed(ErrorCode.HELPER_TIMEOUT.value, NO_ANSWER_MESSAGE)
       for k in _REAL},
    # known=False answers only an ExecQuery: the supervisor never got the request.
    (State.QUERYING, Kind.REBOOT, Event.LOST): Row(State.AWAITING_BOOT, (ANSWERED,)),
    **{(State.QUERYING, k, Event.LOST): _failed(ErrorCode.EXECUTION_FAILED.value, LOST_MESSAGE) for k in _REAL},
    # The supervisor's answer, to the request or to a query.
    **{row: r for s in (State.REQUESTED, State.QUERYING) for row, r in {
        (s, Kind.REBOOT, Event.DONE): Row(State.AWAITING_BOOT, (ANSWERED,)),
        (s, Kind.SHUTDOWN, Event.DONE): _completed(),
        (s, Kind.MOCK, Event.DONE): _completed(),
        (s, ANY, Event.DONE_MOCK): _completed(),
        (s, ANY, Event.MOCK_IN_PRODUCTION): _failed(ErrorCode.HELPER_REJECTED.value, MOCK_HELPER_MESSAGE),
        (s, ANY, Event.EXEC_FAILED): _failed(),
    }.items()},
    # A reboot: the grace period, counted from execution_started, ends it unless a new boot
    # is already under way (then the next start completes it).
    **{row: r for s in (State.REQUESTED, State.QUERYING, State.AWAITING_BOOT) for row, r in {
        (s, Kind.REBOOT, Event.GRACE_OVER): _failed(ErrorCode.REBOOT_NOT_OBSERVED.value),
        (s, Kind.REBOOT, Event.BOOT_CHANGING): Row(s),
    }.items()},
    # A late answer after the queries ran out is still the truth about the execution.
    (State.AWAITING_BOOT, Kind.REBOOT, Event.DONE_MOCK): _completed(),
    (State.AWAITING_BOOT, Kind.REBOOT, Event.MOCK_IN_PRODUCTION): _failed(ErrorCode.HELPER_REJECTED.value,
                                                                          MOCK_HELPER_MESSAGE),
    (State.AWAITING_BOOT, Kind.REBOOT, Event.EXEC_FAILED): _failed(),
    # The same command again: never executed again; its latest status is published again.
    **{(s, ANY, Event.REPEATED): Row(s, (Reanswer(),))
       for s in (State.REQUESTED, State.QUERYING, State.AWAITING_BOOT, State.COMPLETED, State.FAILED)},
}


def step(state: State, kind: Kind | None, occ: Occurrence) -> Step | None:
    """The row for (state, kind, event), its effects completed from the occurrence; None: no row."""
    key: tuple[State, Kind | None, Event] = (state, kind, occ.event)
    row = TABLE.get(key)
    if row is None:
        key = (state, ANY, occ.event)
        row = TABLE.get(key)
    if row is None:
        return None
    effects = tuple(_complete(e, occ) for e in row.effects)
    return Step(key, row.new, effects)


def _complete(effect: Effect, occ: Occurrence) -> Effect:
    if not isinstance(effect, Commit) or FAILED not in effect.acks:
        return effect
    code = effect.code or occ.code or ErrorCode.EXECUTION_FAILED.value
    message = occ.message if occ.message is not None else (effect.message or code)
    return msgspec.structs.replace(effect, code=code, message=message)


def result_occurrence(event: Event, error_code: str | None, error_message: str | None) -> Occurrence:
    """An ExecResult's occurrence: a failure's code as one of ours (else execution_failed,
    with the original in the message)."""
    if event is not Event.EXEC_FAILED:
        return Occurrence(event)
    if error_code is None:
        # The supervisor's helper client never answers a failure without a code; read one
        # that does as a failure all the same (fail closed), never as "still running".
        return Occurrence(event, ErrorCode.EXECUTION_FAILED.value,
                          (f"the supervisor reported a failure without a code: {error_message}"
                           if error_message else "the supervisor reported a failure without a code")[:MAX_MESSAGE])
    code = error_code if error_code in ERROR_CODES else ErrorCode.EXECUTION_FAILED.value
    text = error_message or error_code
    if code != error_code:
        text = f"{error_code}: {text}"
    return Occurrence(event, code, text[:MAX_MESSAGE])


def transitions() -> set[tuple[State, Kind, Event, State]]:
    """Every (state, kind, event, new state) the table allows, ANY rows spread over the kinds:
    what the diagram in docs/mqtt-worker.md must draw."""
    out = set()
    for state in State:
        for event in Event:
            for kind in Kind:
                s = step(state, kind, Occurrence(event))
                if s is not None:
                    out.add((state, kind, event, s.new))
    return out
