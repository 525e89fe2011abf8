"""`send`'s AckTracker, pure: fed (topic, payload, time) by hand, no broker, no clock, no output
(the fuzzing of it with hostile input is in tests/ctl/test_operator_fuzz.py)."""

from __future__ import annotations

import json

from infoscreen.ctl.send import MAX_WARNINGS, AckTracker
from infoscreen.wire import topics
from infoscreen.wire.schema import Ack, ErrorCode, encode_ack

DEV = "9b8d1856-ff34-4864-a726-12de072d0f77"
OTHER = "07aab032-53c2-45ef-a5a3-6aa58e9d9fae"
CMD = "5f0c1a7e-0c5d-4d8e-9a43-1f4e2b6c7d80"
ACK, ALIAS = topics.ack_topics(DEV)


def ack(status: str, cid: str = CMD, code: str | None = None, message: str | None = None) -> bytes:
    return encode_ack(Ack(command_id=cid, status=status, error_code=code, error_message=message))


def test_the_lifecycle_in_order_with_the_alias_copies_counted_once():
    t = AckTracker(DEV, CMD, t0=10.0)
    lines = []
    for i, status in enumerate(("accepted", "execution_started", "completed")):
        lines += t.feed(ACK, ack(status), at=10.0 + i)
        lines += t.feed(ALIAS, ack(status), at=10.5 + i)
    assert [s.status for s in t.order] == ["accepted", "execution_started", "completed"]
    assert t.terminal is not None and t.terminal.status == "completed" and t.terminal.elapsed == 2.0
    assert t.duplicates == 2 and t.repeats == 0 and t.ignored == 0  # the alias after completed is not looked at
    assert len(lines) == 3 and lines[-1].endswith("completed")


def test_failed_carries_its_code_and_message_and_ends_it():
    t = AckTracker(DEV, CMD, t0=0.0)
    t.feed(ACK, ack("accepted"), at=0.1)
    (line,) = t.feed(ACK, ack("failed", code=ErrorCode.HELPER_UNAVAILABLE.value, message="no socket"), at=0.2)
    assert "failed  helper_unavailable: no socket" in line
    assert t.terminal.status == "failed" and t.terminal.error_code == "helper_unavailable"
    assert t.feed(ACK, ack("completed"), at=0.3) == [] and t.terminal.status == "failed"  # decided


def test_only_this_devices_ack_topics_and_this_command_count():
    t = AckTracker(DEV, CMD, t0=0.0)
    assert t.feed(topics.ack(OTHER), ack("completed"), at=1) == []  # another device, whatever it says
    assert t.feed(topics.heartbeat(DEV), ack("completed"), at=1) == []
    assert t.feed(ACK, ack("completed", cid=OTHER), at=1) == []  # another command
    assert t.order == [] and t.terminal is None and t.ignored == 0
    t.feed(ACK, ack("accepted", cid=CMD.upper()), at=2)  # the same command in another case
    assert [s.status for s in t.order] == ["accepted"]


def test_a_repeat_on_the_same_topic_is_noted_not_recorded_again():
    t = AckTracker(DEV, CMD, t0=0.0)
    t.feed(ACK, ack("accepted"), at=1)
    (line,) = t.feed(ACK, ack("accepted"), at=2)
    assert "accepted again" in line and t.repeats == 1 and len(t.order) == 1


def test_unreadable_acks_and_unknown_statuses_are_ignored_with_a_few_warnings():
    t = AckTracker(DEV, CMD, t0=0.0)
    lines = []
    for i in range(MAX_WARNINGS + 5):
        lines += t.feed(ACK, b"\x1b[2J not json" if i % 2 else json.dumps(
            {"command_id": CMD, "status": "rebooting\x1b[31m", "error_code": None, "error_message": None}).encode(),
            at=float(i))
    assert t.ignored == MAX_WARNINGS + 5 and t.order == []
    assert sum("warning:" in line for line in lines) == MAX_WARNINGS
    assert all(line.isprintable() for line in lines)
    assert any("not schema v1" in line for line in lines) and any("unknown status" in line for line in lines)


def test_a_fifth_key_is_not_an_ack():
    t = AckTracker(DEV, CMD, t0=0.0)
    payload = json.dumps({"command_id": CMD, "status": "completed", "error_code": None, "error_message": None,
                          "extra": 1}).encode()
    assert t.feed(ACK, payload, at=1)[0].count("not schema v1") == 1
    assert t.terminal is None


def test_the_tracker_does_no_io():
    """Pure state: no clock, no output, no broker in it (the caller stamps and prints)."""
    import ast
    import inspect

    names = {n.id for n in ast.walk(ast.parse(inspect.getsource(AckTracker))) if isinstance(n, ast.Name)}
    assert not names & {"time", "print", "open", "os", "sys", "session", "Session"}
