"""The IPC union: round trips, and a fuzz showing a bad frame is always BadFrame, never a crash."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infoscreen.ipc import messages as m

SAMPLES = [
    m.Hello(worker="mqtt", pid=12),
    m.Heartbeat(worker="health", pid=13, seq=7),
    m.LogRecord(source="supervisor", level="warn", message="x", created=1.5),
    m.HealthReport(
        timestamp="2026-04-05T08:00:00Z",
        actual_state=m.DisplayState(process="display_manager", pid=None, status="not_running"),
        host=m.HostFacts(cpu_percent=1.0, memory_percent=2.0, disk_percent=3.0, temperature_c=None,
                         uptime_s=4.0, boot_id="b"),
        probe_errors=["temperature: nope"],
    ),
    m.BrokerStatus(broker_reachable=True, reconnect_count=2, last_disconnect_at=None),
    m.ExecRequest(command_id="c", action="reboot_host"),
    m.ExecQuery(command_id="c"),
    m.ExecResult(command_id="c", action="reboot_host", known=True, ok=False, error_code="busy"),
    m.TreeStatus(workers={"mqtt": "running"}, restarts={"mqtt": 0}),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip(msg):
    assert m.decode(m.encode(msg)) == msg


def test_validation_rejects_wrong_types_and_unknown_fields():
    with pytest.raises(m.BadFrame):
        m.decode(msgspec.msgpack.encode({"t": "hello", "worker": "mqtt", "pid": "12"}))
    with pytest.raises(m.BadFrame):
        m.decode(msgspec.msgpack.encode({"t": "hello", "worker": "mqtt", "pid": 12, "extra": 1}))
    with pytest.raises(m.BadFrame):
        m.decode(b"\x00" * (m.MAX_FRAME_BYTES + 1))


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    json_like.map(msgspec.msgpack.encode),
    st.dictionaries(st.sampled_from(["t", "worker", "pid", "seq", "command_id", "action", "known"]), json_like,
                    max_size=5).map(msgspec.msgpack.encode),
    st.sampled_from([m.encode(s) for s in SAMPLES]).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda i: b[:i])),
))
def test_fuzz_decode_only_ever_returns_a_message_or_raises_badframe(frame):
    try:
        msg = m.decode(frame)
    except m.BadFrame:
        return
    assert isinstance(msg, m.Msg)
