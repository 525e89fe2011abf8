"""Property-based fuzz of what the operator's tools read from devices (in-process, thousands of
cases): the payload parsers of `watch`, `alerts` and `send`'s ack follower are total (they never
raise, whatever the bytes), keep only bounded, printable values, and a message on one device's
topics never changes what is reported about another device.

A device account may write its own acks, heartbeat, health and service_failed alert with any
payload up to the broker's packet limit (256 KiB): not JSON, JSON nested 100,000 deep, NaN, huge
strings and numbers, wrong types, terminal escapes, another device's uuid or command id.
"""

from __future__ import annotations

import json
import math
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infoscreen.ctl import send as send_mod
from infoscreen.ctl.alerts import MAX_ALERT_BYTES, read_alert
from infoscreen.ctl.send import MAX_ACK_BYTES, MAX_WARNINGS, AckTracker, read_ack
from infoscreen.ctl.session import MAX_DEPTH, Unreadable, printable, read_json
from infoscreen.ctl.watch import (
    MAX_HEALTH_BYTES,
    MAX_HEARTBEAT_BYTES,
    Fleet,
    parse_health,
    parse_heartbeat,
    render_table,
)
from infoscreen.wire import topics
from infoscreen.wire.schema import Ack

HONEST = "9b8d1856-ff34-4864-a726-12de072d0f77"
HOSTILE = "2c0f7a53-8d0e-4f7e-9d7c-3a1e5b6c7d80"
COMMAND = "07aab032-53c2-45ef-a5a3-6aa58e9d9fae"
OTHER_COMMAND = "5d2c1b0a-0000-4000-8000-000000000001"
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))

nasty_text = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["\x1b[2J", "\x1b[H\x1b[K", "\x1b]0;owned\x07", "\r", "\n", "\u202e", "\u2028", "\x00",
                     "\ufeff", "x" * 65, "x" * 300, HONEST, HONEST.upper(), HOSTILE, COMMAND, COMMAND.upper(),
                     OTHER_COMMAND, "accepted", "completed", "failed", "execution_started", "Completed",
                     "service_failed", "2026-04-05T08:00:00Z", "2026-04-05T08:00:00", "NaN", ""]),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**80, max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),  # json.dumps writes NaN / Infinity tokens
    nasty_text,
)
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), c, max_size=3)),
                      max_leaves=8)
NAMES = ["timestamp", "client_uuid", "uptime_s", "actual_state", "broker_connection", "unit", "failed_at",
         "event", "command_id", "status", "error_code", "error_message", "extra"]
objects = st.dictionaries(st.sampled_from(NAMES), values, max_size=len(NAMES))
health_like = st.fixed_dictionaries({}, optional={
    "timestamp": values, "client_uuid": values,
    "actual_state": st.one_of(values, st.dictionaries(st.sampled_from(["process", "pid", "status"]), values)),
    "broker_connection": st.one_of(values, st.dictionaries(
        st.sampled_from(["broker_reachable", "reconnect_count", "last_disconnect_at"]), values)),
})
ack_like = st.fixed_dictionaries({}, optional={
    "command_id": st.one_of(st.sampled_from([COMMAND, COMMAND.upper(), OTHER_COMMAND]), values),
    "status": st.one_of(st.sampled_from(["accepted", "execution_started", "completed", "failed"]), values),
    "error_code": values, "error_message": values, "extra": values,
})


def _nested(n: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * n + b"]" * n
    return b'{"a":' * n + b"1" + b"}" * n


payloads = st.one_of(
    st.one_of(objects, health_like, ack_like, values).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=300),
    st.text(max_size=200).map(str.encode),
    st.tuples(st.one_of(objects, ack_like), st.integers(0, 80)).map(lambda t: json.dumps(t[0]).encode()[: t[1]]),
    st.builds(_nested, st.integers(1, 120_000), st.sampled_from(["list", "object"])),
    st.builds(lambda v, pad: json.dumps({**v, "pad": "x" * pad}).encode(), st.one_of(objects, ack_like),
              st.integers(0, 300_000)),
)


def printable_and_within(text: str | None, limit: int) -> bool:
    return text is None or (text.isprintable() and len(text) <= limit)


# ---- the shared rules ----------------------------------------------------------------------------


@FUZZ
@given(payloads, st.sampled_from([64, 4096, MAX_HEALTH_BYTES]))
def test_read_json_returns_a_bounded_value_or_unreadable(payload, cap):
    try:
        obj = read_json(payload, cap)
    except Unreadable as exc:
        assert str(exc).isprintable() and len(str(exc)) < 100
        return
    assert len(payload) <= cap
    json.dumps(obj)  # printable again as JSON: no NaN, no recursion error

    def depth(v) -> int:
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        return 0

    assert depth(obj) <= MAX_DEPTH
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in _leaves(obj))


def _leaves(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from _leaves(x)
    elif isinstance(v, list):
        for x in v:
            yield from _leaves(x)
    else:
        yield v


@FUZZ
@given(nasty_text | st.text(max_size=500), st.integers(0, 300))
def test_printable_is_printable_and_bounded(text, limit):
    out = printable(text, limit)
    assert out.isprintable() and len(out) <= limit
    if text.isprintable() and len(text) <= limit:
        assert out == text


# ---- watch ------------------------------------------------------------------------------------------


@FUZZ
@given(payloads)
def test_watch_parsers_are_total_and_bounded(payload):
    hb, obj = parse_heartbeat(payload)
    assert printable_and_within(hb.timestamp, 64) and (hb.timestamp is None) == (hb.problem is not None)
    if len(payload) > MAX_HEARTBEAT_BYTES:
        assert obj is None and hb.timestamp is None
    h, obj = parse_health(payload)
    assert printable_and_within(h.display, 64) and printable_and_within(h.last_disconnect_at, 64)
    assert h.display_pid is None or (type(h.display_pid) is int and 1 <= h.display_pid < 2**31)
    assert h.reconnect_count is None or (type(h.reconnect_count) is int and 0 <= h.reconnect_count <= 2**53)
    assert h.broker_reachable in (None, True, False)
    if len(payload) > MAX_HEALTH_BYTES:
        assert obj is None and h.problem


def _honest_fleet() -> Fleet:
    fleet = Fleet(stale_after=90)
    fleet.apply(topics.heartbeat(HONEST), json.dumps({"timestamp": "2026-04-05T08:00:00Z",
                                                      "client_uuid": HONEST}).encode(), at=100.0)
    fleet.apply(topics.health(HONEST), json.dumps({
        "timestamp": "2026-04-05T08:00:00Z", "client_uuid": HONEST,
        "actual_state": {"process": "display_manager", "pid": 1234, "status": "running"},
        "broker_connection": {"broker_reachable": True, "reconnect_count": 2,
                              "last_disconnect_at": "2026-04-04T10:30:00Z"}}).encode(), at=100.0)
    fleet.apply(topics.service_failed(HONEST), json.dumps({
        "event": "service_failed", "unit": "infoscreen-simclient.service", "client_uuid": HONEST,
        "failed_at": "2026-04-05T08:00:00Z"}).encode(), at=100.0)
    return fleet


hostile_topics = st.sampled_from(
    [topics.heartbeat(HOSTILE), topics.health(HOSTILE), topics.service_failed(HOSTILE),
     topics.heartbeat(HOSTILE.upper()), topics.logs(HOSTILE, "warn"), topics.ack(HOSTILE),
     f"infoscreen/{HOSTILE}/heartbeat/x", f"infoscreen/{HOSTILE}/logs/heartbeat", "infoscreen/events/health",
     "infoscreen/+/health", "infoscreen/#/health", "infoscreen//health", "infoscreen/not-a-uuid/heartbeat",
     f"infoscreen/{HONEST}x/heartbeat", "heartbeat", ""])


@FUZZ
@given(st.lists(st.tuples(hostile_topics, payloads), min_size=1, max_size=4))
def test_fleet_a_hostile_device_never_changes_another_devices_row(messages):
    fleet = _honest_fleet()
    before = fleet.rows[HONEST].as_dict(150.0)
    for topic, payload in messages:
        up = fleet.apply(topic, payload, at=120.0)
        if up is not None:
            assert up.row.device != HONEST
            assert up.row.device.lower() == HOSTILE
            json.dumps({"payload": up.payload, "problem": up.problem, "row": up.row.as_dict(150.0)})
    assert fleet.rows[HONEST].as_dict(150.0) == before
    assert set(fleet.rows) <= {HONEST, HOSTILE, HOSTILE.upper()}
    for r in fleet.rows.values():
        for text in (r.heartbeat_ts, r.display, r.last_disconnect_at):
            assert printable_and_within(text, 64)
        if r.alert is not None:
            assert printable_and_within(r.alert.unit, 256) and printable_and_within(r.alert.failed_at, 64)
            assert r.alert.client_uuid in (None, r.device)
    # The table reaches a terminal: nothing in it may move the cursor or redraw another row.
    table = render_table(fleet, 150.0, connected=True, since=None)
    assert all(line.isprintable() for line in table.split("\n"))
    honest_lines = [line for line in table.split("\n") if line.startswith(HONEST)]
    assert len(honest_lines) == 1 and "running (pid 1234)" in honest_lines[0]
    assert "infoscreen-simclient.service at 2026-04-05T08:00:00Z" in honest_lines[0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.uuids().map(str), min_size=1, max_size=40))
def test_fleet_tracks_at_most_max_devices(uuids):
    fleet = Fleet(max_devices=5)
    for u in uuids:
        fleet.apply(topics.heartbeat(u), b"{}", at=1.0)
    assert len(fleet.rows) == min(5, len(set(uuids)))
    assert fleet.untracked == sum(1 for u in uuids if u not in fleet.rows)


# ---- alerts -----------------------------------------------------------------------------------------


@FUZZ
@given(payloads)
def test_alert_parser_is_total_bounded_and_names_only_its_topics_device(payload):
    view, obj = read_alert(HONEST, payload)
    assert printable_and_within(view.unit, 256) and printable_and_within(view.failed_at, 64)
    assert view.event in (None, "service_failed")
    assert view.client_uuid is None or view.client_uuid.lower() == HONEST
    assert printable_and_within(view.problem, 300)
    listed = {"device": HONEST, **view.as_dict()}
    assert listed["device"] == HONEST and listed.get("client_uuid", HONEST).lower() == HONEST
    assert view.unit is None or re.fullmatch(r"[A-Za-z0-9:_.\\@-]{1,256}", view.unit)
    if len(payload) > MAX_ALERT_BYTES:
        assert obj is None and view.unit is None and view.problem.startswith("unreadable alert: too large")
    if view.problem is None:
        assert view.unit is not None and view.failed_at is not None


# ---- send's ack follower --------------------------------------------------------------------------


def _strict_v1_ack(payload: bytes) -> Ack | None:
    """An independent reading of the v1 ack rules, with the standard library's parser."""
    if len(payload) > MAX_ACK_BYTES:
        return None
    try:
        obj = json.loads(payload, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    keys = {"command_id", "status", "error_code", "error_message"}
    if not isinstance(obj, dict) or not {"command_id", "status"} <= set(obj) <= keys:
        return None
    if not all(isinstance(obj[k], str) for k in ("command_id", "status")):
        return None
    if not all(obj.get(k) is None or isinstance(obj[k], str) for k in ("error_code", "error_message")):
        return None
    return Ack(obj["command_id"], obj["status"], obj.get("error_code"), obj.get("error_message"))


@FUZZ
@given(payloads)
def test_read_ack_returns_an_ack_or_unreadable(payload):
    expected = _strict_v1_ack(payload)
    try:
        got = read_ack(payload)
    except Unreadable as exc:
        assert str(exc).isprintable() and len(str(exc)) <= 120
        assert expected is None
        return
    assert got == expected


ack_topics_mixed = st.sampled_from([
    topics.ack(HONEST), topics.ack_alias(HONEST),  # the target's: these alone count
    topics.ack(HOSTILE), topics.ack_alias(HOSTILE), topics.ack(HONEST.upper()), topics.commands(HONEST),
    topics.heartbeat(HONEST), f"{topics.ack(HONEST)}/x", "infoscreen/+/commands/ack",
])
ack_payloads = st.one_of(
    st.builds(lambda cid, status, code, msg: json.dumps(
        {"command_id": cid, "status": status, "error_code": code, "error_message": msg}).encode(),
        st.sampled_from([COMMAND, COMMAND.upper(), OTHER_COMMAND]) | nasty_text,
        st.sampled_from(["accepted", "execution_started", "completed", "failed"]) | nasty_text,
        st.none() | nasty_text, st.none() | nasty_text),
    payloads,
)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(ack_topics_mixed, ack_payloads), max_size=20))
def test_ack_tracker_counts_only_this_devices_acks_of_this_command(messages):
    tracker = AckTracker(HONEST, COMMAND, t0=0.0)
    lines: list[str] = []
    expected_terminal = None
    expected_order: list[str] = []
    for i, (topic, payload) in enumerate(messages):
        lines += tracker.feed(topic, payload, at=float(i))
        ack = _strict_v1_ack(payload)
        if (expected_terminal is None and topic in topics.ack_topics(HONEST) and ack is not None
                and ack.command_id.lower() == COMMAND and ack.status in send_mod.KNOWN_STATUSES
                and ack.status not in expected_order):
            expected_order.append(ack.status)
            if ack.status in ("completed", "failed"):
                expected_terminal = ack.status
    assert [s.status for s in tracker.order] == expected_order
    assert (tracker.terminal.status if tracker.terminal else None) == expected_terminal
    assert all(rec.topic in topics.ack_topics(HONEST) for rec in tracker.order)
    assert len(tracker.seen) <= 4 and all(len(t) <= 2 for t in tracker.topics_of.values())
    assert all(line.isprintable() and len(line) < 600 for line in lines)
    assert sum("warning:" in line for line in lines) <= MAX_WARNINGS
    for rec in tracker.order:
        assert printable_and_within(rec.error_code, 64) and printable_and_within(rec.error_message, 300)
