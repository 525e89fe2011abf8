"""The states of a power command, the events that move it, and its kind (a leaf module).

The transitions are the table in :mod:`.command_policy`; docs/mqtt-worker.md ("The state of
a command") draws them, and a test holds the drawing to the table. Every state past ``new``
has a record in the store; the store keeps only its wire status (:data:`STATUS`), the finer
in-memory states say what the worker is waiting for.
"""

from __future__ import annotations

import enum

from ...wire.schema import AckStatus, Action


class State(str, enum.Enum):
    NEW = "new"  # received, not recorded yet
    REQUESTED = "requested"  # execution_started committed, ExecRequest sent; waiting for ExecResult
    QUERYING = "querying"  # execution_started; asking the supervisor with ExecQuery
    AWAITING_BOOT = "awaiting_boot"  # reboot: only a new boot (completed) or the grace period (failed) decides
    STORED = "stored"  # execution_started, left by an earlier process: never requested again
    COMPLETED = "completed"
    FAILED = "failed"


TERMINAL = frozenset({State.COMPLETED, State.FAILED})

STATUS = {  # the record's status in the store, and the status its acks say
    State.REQUESTED: AckStatus.EXECUTION_STARTED.value,
    State.QUERYING: AckStatus.EXECUTION_STARTED.value,
    State.AWAITING_BOOT: AckStatus.EXECUTION_STARTED.value,
    State.STORED: AckStatus.EXECUTION_STARTED.value,
    State.COMPLETED: AckStatus.COMPLETED.value,
    State.FAILED: AckStatus.FAILED.value,
}


def state_of_status(status: str) -> State:
    """The state of a record read from the store (execution_started: left by a process)."""
    if status == AckStatus.COMPLETED.value:
        return State.COMPLETED
    if status == AckStatus.FAILED.value:
        return State.FAILED
    return State.STORED


class Kind(str, enum.Enum):
    """What an execution means: the rows that differ by kind in the table."""

    REBOOT = "reboot"  # a real reboot_host: done only once a new boot is seen
    SHUTDOWN = "shutdown"  # a real shutdown_host: done on the helper's ok (the power goes off)
    MOCK = "mock"  # the mock setting (never in production): done on the helper's ok


def kind_of(action: str | None, mock_setting: bool, production: bool) -> Kind | None:
    """The one place a command's kind is decided. None: no valid action (refused anyway)."""
    if action not in (Action.REBOOT.value, Action.SHUTDOWN.value):
        return None
    if mock_setting and not production:  # the configuration refuses the mock setting in production too
        return Kind.MOCK
    return Kind.REBOOT if action == Action.REBOOT.value else Kind.SHUTDOWN


class Event(str, enum.Enum):
    ADMITTED = "admitted"  # new, valid, in time, not busy (admission.py)
    REFUSED = "refused"  # admission refused it: validation, signature, expiry, busy, given up
    REPEATED = "repeated"  # the same command_id again (either topic, redelivered, retained)
    # ExecResult (result_event):
    DONE = "done"  # ok from a helper that executes
    DONE_MOCK = "done_mock"  # ok from a helper in mock mode, this client not in production
    MOCK_IN_PRODUCTION = "mock_in_production"  # ok from a helper in mock mode, this client in production
    EXEC_FAILED = "exec_failed"  # not ok, with the supervisor's code
    LOST = "lost"  # known=False: the supervisor never got the request
    # timers:
    RESULT_WAIT_OVER = "result_wait_over"  # no ExecResult within HELPER_TIMEOUT_S + 3 s
    QUERY_DUE = "query_due"  # time to ask again (fewer than QUERY_TRIES asked)
    QUERIES_EXHAUSTED = "queries_exhausted"  # QUERY_TRIES asked, none answered
    GRACE_OVER = "grace_over"  # REBOOT_GRACE_S after execution_started and the same boot runs
    BOOT_CHANGING = "boot_changing"  # ... but the boot id file already names another boot
    # start of a process, for a record left in execution_started:
    NEW_BOOT = "new_boot"  # another boot than at execution_started
    SAME_BOOT = "same_boot"


def result_event(known: bool, ok: bool, mock: bool, production: bool) -> Event:
    """The event an ExecResult is; the one place the helper's mock flag is judged."""
    if not known:
        return Event.LOST
    if not ok:
        return Event.EXEC_FAILED
    if mock:
        # The helper executed nothing. Outside production that is the mock mode at work; in
        # production a power action that did not happen must never be reported completed.
        return Event.MOCK_IN_PRODUCTION if production else Event.DONE_MOCK
    return Event.DONE


class Timer(str, enum.Enum):
    RESULT_WAIT = "result_wait"  # HELPER_TIMEOUT_S + 3 s after the ExecRequest
    QUERY_RETRY = "query_retry"  # QUERY_EVERY_S after an ExecQuery
    REBOOT_GRACE = "reboot_grace"  # REBOOT_GRACE_S after execution_started (its monotonic time)
