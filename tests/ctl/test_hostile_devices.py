"""One compromised screen cannot harm the operator's tools: against a real broker, a hostile device
account publishes what its ACL lets it write (its own acks, heartbeat, health and service_failed
alert, retained or not, up to the broker's packet limit) while `watch`, `alerts` and `send` run as
real processes. They keep working, and what they report about the honest device is exactly what
the honest device published.

The broker's ACL is the basis of the trust: a device cannot write another device's topics (shown
below), so every tool keys what it reports on the uuid in the topic, never on one in a payload.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import uuid as uuidlib

import pytest

from infoscreen import mqttclient as session_mod  # the shared session: its inbox bounds
from infoscreen.ctl.send import MAX_WARNINGS
from infoscreen.ctl.session import Received, Session, settings_from_args
from infoscreen.wire import topics
from tests.support.mqtt import NOT_AUTHORIZED, accepted
from tests.support.waiting import wait_until

HEALTH = {
    "timestamp": "2026-04-05T08:00:00Z",
    "expected_state": {"event_id": 42},
    "actual_state": {"process": "display_manager", "pid": 1234, "status": "running"},
    "broker_connection": {"broker_reachable": True, "reconnect_count": 2,
                          "last_disconnect_at": "2026-04-04T10:30:00Z"},
}


def alert(uuid: str) -> dict:
    return {"event": "service_failed", "unit": "infoscreen-simclient.service", "client_uuid": uuid,
            "failed_at": "2026-04-05T08:00:00Z"}


def payload_limit(broker) -> int:
    """The largest payload the broker accepts (its configured packet or message size limit, less
    room for the topic and properties of a packet limit)."""
    text = broker.conf_path.read_text()
    m = re.search(r"^message_size_limit\s+(\d+)", text, re.M)
    if m:
        return int(m.group(1))
    m = re.search(r"^max_packet_size\s+(\d+)", text, re.M)
    return (int(m.group(1)) if m else 256 * 1024) - 512


def hostile_payloads(limit: int, honest: str) -> list[bytes]:
    """What a compromised device writes: every kind of junk, as large and as deep as the broker
    lets through, and lies about another device."""
    depth = min(100_000, limit // 2 - 8)
    big = limit - 64
    lie = {"timestamp": "2099-01-01T00:00:00Z", "client_uuid": honest, "device": honest,
           "actual_state": {"process": "display_manager", "pid": 1, "status": "crashed"},
           "broker_connection": {"broker_reachable": False, "reconnect_count": 999,
                                 "last_disconnect_at": "2099-01-01T00:00:00Z"},
           "event": "service_failed", "unit": "fake.service", "failed_at": "2099-01-01T00:00:00Z"}
    return [
        b"not json",
        b"\xff\xfe\x00\x01garbage",
        b"[" * depth + b"]" * depth,
        b'{"a":' * (depth // 6) + b"1" + b"}" * (depth // 6),
        json.dumps({"timestamp": "x" * big}).encode()[:limit],
        json.dumps({"pad": "y" * big}).encode()[:limit],
        b'{"timestamp": NaN, "broker_connection": {"reconnect_count": Infinity, "broker_reachable": NaN}}',
        b'{"broker_connection": {"reconnect_count": 1' + b"0" * 5000 + b"}}",
        json.dumps({"timestamp": 5, "actual_state": "running", "broker_connection": [1, 2], "unit": 7,
                    "failed_at": {"x": 1}}).encode(),
        json.dumps(lie).encode(),
        json.dumps({**lie, "actual_state": {"status": f"\x1b[2J\x1b[H{honest} running", "pid": 2},
                    "unit": "\x1b]0;owned\x07.service", "timestamp": "\r\u202e\u2028"}).encode(),
        json.dumps([lie, lie]).encode(),
        b"[" * 3000 + b"]" * 3000,  # deep, yet under every tool's size cap: the parser's depth bound
        b"",
    ]


@pytest.fixture
def honest(device_probe, device_uuid):
    return device_probe(device_uuid)


@pytest.fixture
def hostile(device_probe, other_device_uuid):
    return device_probe(other_device_uuid)


def test_a_device_cannot_write_another_devices_topics(hostile, device_uuid):
    """The ACL the tools rely on: the uuid in a topic is the account that wrote it."""
    for t in (topics.heartbeat(device_uuid), topics.health(device_uuid), topics.service_failed(device_uuid),
              *topics.ack_topics(device_uuid)):
        assert hostile.publish(t, {"client_uuid": device_uuid}) == NOT_AUTHORIZED


# ---- watch ----------------------------------------------------------------------------------------


def test_watch_keeps_working_and_reports_the_honest_device_exactly(
        ctl, broker, honest, hostile, device_uuid, other_device_uuid):
    bad = hostile_payloads(payload_limit(broker), device_uuid)
    hostile_topics = [topics.heartbeat(other_device_uuid), topics.health(other_device_uuid),
                      topics.service_failed(other_device_uuid)]
    # Retained junk, there before the tools start (delivered at once on subscription).
    for t, payload in zip(hostile_topics, (bad[2], bad[4], bad[9])):
        assert accepted(hostile.publish(t, payload, retain=True))
    jsonw = ctl("watch", "--json")
    plain = ctl("watch", "--plain")
    for p in (jsonw, plain):
        p.wait_err(r"^watching ")
    live = 0
    for t in hostile_topics:
        for i, payload in enumerate(bad):
            if t.endswith("service_failed") and not payload:
                continue  # an empty payload clears the device's own alert; counted below
            assert accepted(hostile.publish(t, payload, retain=i % 2 == 0))
            live += 1
    honest.publish(topics.health(device_uuid), HEALTH)
    honest.publish(topics.service_failed(device_uuid), alert(device_uuid), retain=True)
    honest.publish(topics.heartbeat(device_uuid), {"timestamp": "2026-04-05T09:00:00Z", "client_uuid": device_uuid})
    # The honest heartbeat went through the broker after everything else: once it is shown, every
    # hostile message before it was handled.
    jsonw.wait_line(rf'^{{"event":"heartbeat","received_at":"[^"]+","device":"{device_uuid}"', timeout=20)
    plain.wait_line(rf"heartbeat {device_uuid} ", timeout=20)
    assert jsonw.proc.poll() is None and plain.proc.poll() is None
    assert "Traceback" not in jsonw.stderr + plain.stderr

    events = [json.loads(line) for line in jsonw.out]
    for ev in events:
        if "topic" in ev:  # keyed on the topic's uuid, whatever the payload claims
            assert ev["device"] == topics.device_of(ev["topic"])
    hostile_events = [e for e in events if e.get("device") == other_device_uuid]
    assert len(hostile_events) == 3 + live  # every message handled, none lost, none crashed the tool
    assert any(e.get("problem", "").startswith("unreadable") and "nested too deep" in e["problem"]
               for e in hostile_events)
    assert any("too large" in e.get("problem", "") for e in hostile_events)
    honest_row = [e for e in events if e.get("device") == device_uuid][-1]["row"]
    assert honest_row == {
        "device": device_uuid, "heartbeat_age_s": honest_row["heartbeat_age_s"],
        "heartbeat_timestamp": "2026-04-05T09:00:00Z", "display": "running", "display_pid": 1234,
        "broker_reachable": True, "reconnect_count": 2, "last_disconnect_at": "2026-04-04T10:30:00Z",
        "service_failed": alert(device_uuid), "silent": False,
    }
    # The hostile device's own row holds only bounded, printable values.
    hostile_row = hostile_events[-1]["row"]
    for key in ("heartbeat_timestamp", "display", "last_disconnect_at"):
        assert hostile_row[key] is None or (hostile_row[key].isprintable() and len(hostile_row[key]) <= 64)
    assert "\x1b" not in plain.stdout and "\u202e" not in plain.stdout  # nothing reaches the terminal raw
    honest_lines = [line for line in plain.out if f" {device_uuid} " in line]
    assert honest_lines[-1].endswith(f"heartbeat {device_uuid} heartbeat_age=0s display=running broker_reachable=yes "
                                     "reconnects=2 last_disconnect=2026-04-04T10:30:00Z "
                                     "service_failed=infoscreen-simclient.service@2026-04-05T08:00:00Z")


# ---- alerts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["not json", "deep", "huge", "lie", "escapes", "list"])
def test_alerts_lists_the_honest_alert_exactly_next_to_retained_junk(
        ctl, broker, honest, hostile, device_uuid, other_device_uuid, which):
    bad = dict(zip(["not json", "binary", "deep", "deep obj", "huge", "pad", "nan", "bigint", "types", "lie",
                    "escapes", "list", "empty"], hostile_payloads(payload_limit(broker), device_uuid)))
    assert accepted(hostile.publish(topics.service_failed(other_device_uuid), bad[which], retain=True))
    assert accepted(honest.publish(topics.service_failed(device_uuid), alert(device_uuid), retain=True))
    listing = ctl("alerts", "--json")
    table = ctl("alerts")
    assert listing.wait(15) == 0 and table.wait(15) == 0, listing.stderr + table.stderr
    out = json.loads(listing.stdout)
    assert [a["device"] for a in out] == sorted([device_uuid, other_device_uuid])
    mine = next(a for a in out if a["device"] == device_uuid)
    assert mine == {"device": device_uuid, **alert(device_uuid)}
    theirs = next(a for a in out if a["device"] == other_device_uuid)
    assert theirs["problem"] and theirs.get("client_uuid") in (None, other_device_uuid)
    assert device_uuid not in json.dumps(theirs)  # the lie about the honest device is not repeated
    rows = {line.split()[0]: line for line in table.out[1:-1]}
    assert rows[device_uuid].split()[1:3] == ["infoscreen-simclient.service", "2026-04-05T08:00:00Z"]
    assert rows[other_device_uuid].isprintable()
    assert "\x1b" not in table.stdout


def test_a_device_publishing_without_end_cannot_hold_the_alerts_listing_open(
        ctl, honest, hostile, device_uuid, other_device_uuid):
    """Only retained deliveries extend the settle time: a live flood does not."""
    assert accepted(honest.publish(topics.service_failed(device_uuid), alert(device_uuid), retain=True))
    stop = threading.Event()
    sent = []

    def flood() -> None:
        while not stop.is_set():
            hostile.publish(topics.service_failed(other_device_uuid), b"junk" * 100, retain=True)
            sent.append(1)

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        wait_until(lambda: len(sent) >= 10, timeout=10)
        listing = ctl("alerts", "--json", "--max-wait", "120")
        assert listing.wait(30) == 0, listing.stderr
    finally:
        stop.set()
        t.join(10)
    out = {a["device"]: a for a in json.loads(listing.stdout)}
    assert out[device_uuid] == {"device": device_uuid, **alert(device_uuid)}
    assert out[other_device_uuid]["problem"] == "unreadable alert: not JSON"


# ---- send ------------------------------------------------------------------------------------------


def ack(command_id: str, status: str, code: str | None = None, message: str | None = None) -> dict:
    return {"command_id": command_id, "status": status, "error_code": code, "error_message": message}


def test_another_devices_ack_for_the_same_command_id_never_counts(ctl, honest, hostile, device_uuid,
                                                                   other_device_uuid):
    honest.subscribe(topics.commands(device_uuid))
    p = ctl("send", "reboot", "--device", device_uuid, "--wait", "--expires-in", "1m")
    cid = honest.wait_for(topics.commands(device_uuid), timeout=10).json()["command_id"]
    # The hostile device answers the honest device's command on its own topics (and is refused on
    # the honest device's): it claims completion, names the honest device, and retains it.
    for t in topics.ack_topics(other_device_uuid):
        assert accepted(hostile.publish(t, {**ack(cid, "completed"), "client_uuid": device_uuid}))
        assert accepted(hostile.publish(t, ack(cid, "failed", "busy", "fake"), retain=True))
    for t in topics.ack_topics(device_uuid):
        assert hostile.publish(t, ack(cid, "completed")) == NOT_AUTHORIZED
    for t in topics.ack_topics(device_uuid):
        honest.publish(t, ack(cid, "accepted"))
    p.wait_line(r"\baccepted$")
    assert p.proc.poll() is None  # still following: nothing it received ended the command
    for t in topics.ack_topics(device_uuid):
        honest.publish(t, ack(cid, "execution_started"))
        honest.publish(t, ack(cid, "completed"))
    assert p.wait(10) == 0, p.stdout + p.stderr
    statuses = re.findall(r"^\s+\+[\d.]+ (?:ms|s)\s+(\S+)", p.stdout, re.M)
    assert statuses == ["published", "accepted", "execution_started", "completed"]
    assert "fake" not in p.stdout and "busy" not in p.stdout


def test_send_survives_junk_on_the_targets_own_ack_topics(ctl, broker, honest, device_uuid):
    """The target itself writes junk (retained before the send, and live): the follower ignores
    it with a few warnings, counts the rest, and still reports the real outcome."""
    limit = payload_limit(broker)
    junk = hostile_payloads(limit, device_uuid)
    assert all(accepted(honest.publish(t, junk[2], retain=True)) for t in topics.ack_topics(device_uuid))
    honest.subscribe(topics.commands(device_uuid))
    p = ctl("send", "shutdown", "--device", device_uuid, "--wait", "--expires-in", "1m")
    cid = honest.wait_for(topics.commands(device_uuid), timeout=10).json()["command_id"]
    odd = [json.dumps(ack(cid, "completed\x1b[2J")).encode(), json.dumps(ack(cid, "x" * (limit - 200))).encode(),
           json.dumps({**ack(cid, "completed"), "extra": 1}).encode(),
           json.dumps(ack(cid, "completed", {"nested": 1})).encode(),
           json.dumps({"command_id": cid.upper(), "status": 1}).encode()]
    live = [j for j in junk if j] + odd
    for payload in live:
        assert accepted(honest.publish(topics.ack(device_uuid), payload))
    # An ack of another command (another operator) is not ours and not a warning.
    honest.publish(topics.ack(device_uuid), ack(str(uuidlib.uuid4()), "completed"))
    honest.publish(topics.ack(device_uuid), ack(cid, "accepted"))
    for _ in range(MAX_WARNINGS + 3):  # the device repeating a status without end
        honest.publish(topics.ack(device_uuid), ack(cid, "accepted"))
    honest.publish(topics.ack(device_uuid), ack(cid.upper(), "failed", "helper_rejected", "replay\x1b[2J"))
    assert p.wait(10) == 1, p.stdout + p.stderr
    out = p.stdout
    assert "Traceback" not in p.stderr
    assert len(re.findall(r"warning: an ack on", out)) == MAX_WARNINGS
    assert "(further such lines are not printed; they are counted at the end)" in out
    assert f"note: {2 + len(live)} unreadable ack(s) or ack(s) with an unknown status ignored" in out
    assert len(re.findall(r"accepted again on commands/ack", out)) == MAX_WARNINGS
    assert f"note: the device repeated a status {MAX_WARNINGS + 3} times" in out
    assert "failed: helper_rejected: replay\\x1b[2J" in out.splitlines()  # escaped, never raw
    assert "\x1b" not in out and all(len(line) < 1000 for line in p.out)


# ---- the session's inbox ----------------------------------------------------------------------------


def _server_session(broker) -> Session:
    return Session(settings_from_args(argparse.Namespace(env=str(broker.server_env_path)))).connect()


@pytest.mark.parametrize("bound", ["messages", "bytes"])
def test_the_inbox_is_bounded_and_drops_are_counted(broker, honest, device_uuid, monkeypatch, bound):
    if bound == "messages":
        monkeypatch.setattr(session_mod, "MAX_INBOX_MESSAGES", 5)
        payload = b"{}"
    else:
        monkeypatch.setattr(session_mod, "MAX_INBOX_BYTES", 5 * 1000)
        payload = b"x" * 1000
    s = _server_session(broker)
    try:
        s.subscribe([topics.heartbeat(device_uuid)])
        for _ in range(20):
            honest.publish(topics.heartbeat(device_uuid), payload)
        wait_until(lambda: s.dropped == 15, timeout=10, what="15 messages dropped")
        kept = []
        while (item := s.get(0)) is not None:
            kept.append(item)
        assert len(kept) == 5 and all(isinstance(i, Received) and i.payload == payload for i in kept)
        # Once read, there is room again.
        honest.publish(topics.heartbeat(device_uuid), payload)
        item = s.get(10)
        assert isinstance(item, Received) and item.payload == payload
        assert s.dropped == 15
    finally:
        s.close()


def test_alerts_keeps_at_most_max_devices(broker, honest, hostile, device_uuid, other_device_uuid, monkeypatch):
    from infoscreen.ctl import alerts as alerts_mod

    monkeypatch.setattr(alerts_mod, "MAX_DEVICES", 1)
    for probe, uuid in ((honest, device_uuid), (hostile, other_device_uuid)):
        assert accepted(probe.publish(topics.service_failed(uuid), alert(uuid), retain=True))
    s = _server_session(broker)
    try:
        found = alerts_mod.collect_alerts(s, settle=0.3)
    finally:
        s.close()
    assert len(found) == 1 and set(found) <= {device_uuid, other_device_uuid}
