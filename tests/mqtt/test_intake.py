"""An intake no message can jam: every message on every subscribed topic ends acknowledged to the
broker, poison messages are given up after a bounded number of tries, and the broker cannot make
the worker allocate more than its Maximum Packet Size (docs/mqtt-worker.md, "Intake")."""

from __future__ import annotations

import json
import socket
import struct
import threading
import uuid as uuidlib

import psutil
import pytest

from infoscreen.workers.mqtt.connection import MAX_PACKET_BYTES
from infoscreen.workers.mqtt.crashpoint import POISON_MARK
from infoscreen.workers.mqtt.intake import MAX_TRIES
from tests.support.waiting import wait_until

DEEP = b"[" * 20000 + b"]" * 20000


def _join_group(w, srv, group="lobby"):
    """Put the worker in a group and return once its subscription to the group's events is
    live (a retained marker event reached the hand-off file)."""
    srv.publish(f"infoscreen/{w.uuid}/group_id", group.encode(), retain=True)
    srv.publish(f"infoscreen/events/{group}", b'{"event_id": "joined"}', retain=True)
    wait_until(lambda: b"joined" in ((w.state_dir / "active_event.json").read_bytes()
                                      if (w.state_dir / "active_event.json").exists() else b""), 10,
               what="group joined")
    srv.publish(f"infoscreen/events/{group}", b"", retain=True)


def test_events_the_worker_cannot_parse_do_not_jam_later_commands(mqtt_worker, server):
    """The attack: 25 QoS 1 events nested 20,000 deep on the device's group events topic were never
    acknowledged; Mosquitto's in-flight window (20) filled and no later command was delivered, even
    after the worker restarted, because the session redelivered the same messages."""
    w = mqtt_worker()
    srv = server(w)
    _join_group(w, srv)
    srv.subscribe(f"infoscreen/{w.uuid}/logs/warn")
    for _ in range(25):
        srv.publish("infoscreen/events/lobby", DEEP)
    cid = srv.command(w.uuid, "shutdown_host")
    srv.wait_ack(w.uuid, cid, "completed", timeout=15)
    warn = srv.wait_for(f"infoscreen/{w.uuid}/logs/warn", lambda m: b"event" in m.payload, timeout=10)
    assert b"RecursionError" in warn.payload or b"not JSON" in warn.payload
    # Nothing is left in the session to be redelivered: after a restart, commands still flow.
    w.kill()
    w.start()
    cid2 = srv.command(w.uuid, "shutdown_host")
    srv.wait_ack(w.uuid, cid2, "completed", timeout=15)
    srv.publish("infoscreen/events/lobby", b"", retain=True)
    srv.publish(f"infoscreen/{w.uuid}/group_id", b"", retain=True)


@pytest.mark.parametrize("where", ["group_id", "power_intent", "command"])
def test_deep_nesting_is_answered_everywhere_payloads_are_parsed(mqtt_worker, server, where):
    w = mqtt_worker()
    srv = server(w)
    if where == "group_id":
        srv.publish(f"infoscreen/{w.uuid}/group_id", DEEP)
    elif where == "power_intent":
        _join_group(w, srv, "hall")
        srv.publish("infoscreen/groups/hall/power/intent", DEEP)
    else:
        srv.raw(w.uuid, b'{"command_id": "' + str(uuidlib.uuid4()).encode() + b'", "x": ' + DEEP + b"}")
    cid = srv.command(w.uuid, "shutdown_host")
    srv.wait_ack(w.uuid, cid, "completed", timeout=15)
    assert w.alive()
    srv.publish(f"infoscreen/{w.uuid}/group_id", b"", retain=True)


def test_a_command_whose_handling_keeps_failing_is_answered_internal_error(mqtt_worker, server):
    w = mqtt_worker(INFOSCREEN_TEST_CRASHPOINT="handle_raise")
    srv = server(w)
    poison = srv.command(w.uuid, "reboot_host", reason=POISON_MARK.decode())
    ack = srv.wait_ack(w.uuid, poison, "failed", code="internal_error", timeout=15)
    assert f"handling failed {MAX_TRIES} times" in ack["error_message"]
    assert srv.statuses(w.uuid, poison) == ["failed"]   # never accepted, never executed
    assert w.sup.exec_requests(poison) == []
    cid = srv.command(w.uuid, "shutdown_host")
    srv.wait_ack(w.uuid, cid, "completed", timeout=10)


def test_a_command_that_kills_the_worker_is_given_up_after_bounded_restarts(mqtt_worker, server):
    w = mqtt_worker(INFOSCREEN_TEST_CRASHPOINT="handle_kill")
    srv = server(w)
    poison = srv.command(w.uuid, "reboot_host", reason=POISON_MARK.decode())
    deaths = 0
    while True:   # the supervisor's part: restart the worker each time it dies
        try:
            srv.wait_ack(w.uuid, poison, "failed", code="internal_error", timeout=0.2)
            break
        except TimeoutError:
            pass
        if not w.alive():
            deaths += 1
            assert deaths <= MAX_TRIES, f"given up only after {deaths} deaths"
            w.start(wait_connected=False)  # it may die on the redelivery before it reports the broker
    assert deaths == MAX_TRIES   # the first delivery and MAX_TRIES - 1 redeliveries killed it
    assert w.sup.exec_requests(poison) == []
    cid = srv.command(w.uuid, "shutdown_host")
    srv.wait_ack(w.uuid, cid, "completed", timeout=10)
    w.kill()   # the poison message is gone from the session: a restart does not die on it
    w.start()
    cid = srv.command(w.uuid, "shutdown_host")
    srv.wait_ack(w.uuid, cid, "completed", timeout=10)
    assert w.alive()


def test_an_event_that_kills_the_worker_is_dropped_with_a_warning(mqtt_worker, server):
    w = mqtt_worker(INFOSCREEN_TEST_CRASHPOINT="handle_kill")
    srv = server(w)
    _join_group(w, srv, "yard")
    srv.subscribe(f"infoscreen/{w.uuid}/logs/warn")
    srv.publish("infoscreen/events/yard", json.dumps({"event_id": 1, "x": POISON_MARK.decode()}).encode())
    deaths = 0
    while True:
        try:
            srv.wait_for(f"infoscreen/{w.uuid}/logs/warn", lambda m: b"gave up a message" in m.payload, timeout=0.2)
            break
        except TimeoutError:
            pass
        if not w.alive():
            deaths += 1
            assert deaths <= MAX_TRIES
            w.start(wait_connected=False)  # it may die on the redelivery before it reports the broker
    assert deaths == MAX_TRIES
    cid = srv.command(w.uuid, "shutdown_host")
    srv.wait_ack(w.uuid, cid, "completed", timeout=10)
    srv.publish(f"infoscreen/{w.uuid}/group_id", b"", retain=True)


@pytest.mark.parametrize("command_id", [uuidlib.uuid4().hex, "{%s}" % uuidlib.uuid4(), "urn:uuid:%s" % uuidlib.uuid4()])
def test_a_command_id_the_helper_would_refuse_is_invalid_payload_at_once(mqtt_worker, server, command_id):
    """The attack: a 32-hex command_id was answered accepted, execution_started, then failed
    helper_rejected: the worker and the helper disagreed on what a command id is."""
    w = mqtt_worker()
    srv = server(w)
    srv.command(w.uuid, "reboot_host", command_id=command_id)
    ack = srv.wait_ack(w.uuid, command_id, "failed", code="invalid_payload")
    assert "not a UUID" in ack["error_message"]
    assert srv.statuses(w.uuid, command_id) == ["failed"] and w.sup.exec_requests() == []


def test_issued_after_expiry_is_invalid_payload(mqtt_worker, server):
    w = mqtt_worker()
    srv = server(w)
    cid = srv.command(w.uuid, "reboot_host", issued_at="2030-01-01T00:10:00Z", expires_at="2030-01-01T00:00:00Z")
    ack = srv.wait_ack(w.uuid, cid, "failed", code="invalid_payload")
    assert "after expires_at" in ack["error_message"]


# ------------------------------------------------------------------ Maximum Packet Size
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_packet(conn: socket.socket) -> tuple[int, bytes]:
    head = conn.recv(1)
    if not head:
        raise ConnectionError("closed")
    length, mult = 0, 1
    while True:
        b = conn.recv(1)[0]
        length += (b & 127) * mult
        mult *= 128
        if not b & 128:
            break
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return head[0], body


class HostileBroker:
    """A TCP peer that speaks just enough MQTT 5 to accept the worker's CONNECT, then announces a
    PUBLISH of 255 MiB and streams it: what a compromised broker could do. A real Mosquitto
    honours the client's Maximum Packet Size and never sends this, so it cannot stand in here."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connect_packet = b""
        self.sent = 0
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(20)
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(10)
            kind, self.connect_packet = _read_packet(conn)
            assert kind >> 4 == 1   # CONNECT
            conn.sendall(b"\x20\x03\x00\x00\x00")   # CONNACK: no session, success, no properties
            size = 255 * 1024 * 1024   # the largest a remaining length of four bytes can say is 256 MiB - 1
            topic = b"infoscreen/events/x"
            conn.sendall(b"\x30" + _varint(size) + struct.pack("!H", len(topic)) + topic + b"\x00")
            chunk = b"x" * 65536
            try:
                while self.sent < size:
                    conn.sendall(chunk)
                    self.sent += len(chunk)
            except OSError:   # the worker hung up
                pass
        self.closed.set()

    def close(self) -> None:
        self.sock.close()


def test_a_broker_cannot_make_the_worker_allocate_past_its_maximum_packet_size(mqtt_worker, mqtt_broker):
    hostile = HostileBroker()
    try:
        w = mqtt_worker(start=False, MQTT_BROKER="127.0.0.1", MQTT_PORT=str(hostile.port), MQTT_TLS="0")
        w.start(wait_connected=False)
        rss_before = psutil.Process(w.proc.pid).memory_info().rss
        assert hostile.closed.wait(20), "the worker kept reading a 255 MiB packet"
        # The CONNECT advertised the limit (property 0x27, four bytes).
        assert b"\x27" + struct.pack("!I", MAX_PACKET_BYTES) in hostile.connect_packet
        assert hostile.sent < 64 * 1024 * 1024   # far from all of it: refused at the header
        wait_until(lambda: "larger than our Maximum Packet Size" in w.log_text(), 10, what="warning")
        rss_after = psutil.Process(w.proc.pid).memory_info().rss
        assert rss_after - rss_before < 16 * 1024 * 1024, (rss_before, rss_after)
        assert w.alive()
    finally:
        hostile.close()
