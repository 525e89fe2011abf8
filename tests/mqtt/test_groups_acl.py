"""Group subscriptions and the hand-off files; the broker's ACL as the worker meets it."""

from __future__ import annotations

import json
import threading

from tests.support.mqtt import NOT_AUTHORIZED, MqttProbe
from tests.support.waiting import wait_until

from .test_lifecycle import health_report


def read_json(path):
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return "missing"


def test_group_change_resubscribes_and_hands_events_over(mqtt_worker, server):
    w = mqtt_worker()
    srv = server(w)
    event_file = w.state_dir / "active_event.json"
    srv.publish(f"infoscreen/{w.uuid}/group_id", b"lobby", retain=True)
    srv.publish("infoscreen/events/lobby", json.dumps({"event_id": 42, "title": "a"}).encode(), retain=True)
    wait_until(lambda: read_json(event_file) == {"event_id": 42, "title": "a"}, 5, what="event of lobby")
    srv.subscribe(f"infoscreen/{w.uuid}/health")
    w.sup.send(health_report())
    assert srv.wait_for(f"infoscreen/{w.uuid}/health").json()["expected_state"] == {"event_id": 42}
    # Power intent of the group.
    srv.publish("infoscreen/groups/lobby/power/intent", json.dumps({"state": "off", "at": "22:00"}).encode())
    wait_until(lambda: read_json(w.state_dir / "power_intent.json") == {"state": "off", "at": "22:00"}, 5)
    # Change of group: the retained event of the new group arrives; the old group's are ignored.
    srv.publish("infoscreen/events/hall", json.dumps({"id": "h-1"}).encode(), retain=True)
    srv.publish(f"infoscreen/{w.uuid}/group_id", b"hall", retain=True)
    wait_until(lambda: read_json(event_file) == {"id": "h-1"}, 5, what="event of hall")
    srv.publish("infoscreen/events/lobby", json.dumps({"event_id": 43}).encode())
    srv.publish("infoscreen/events/hall", json.dumps({"id": "h-2"}).encode())
    wait_until(lambda: read_json(event_file) == {"id": "h-2"}, 5, what="second event of hall")
    assert "event_id\": 43" not in event_file.read_text()
    # The group survives a restart (persisted), with the session's subscriptions.
    w.kill()
    w.start()
    srv.publish("infoscreen/events/hall", json.dumps({"id": "h-3"}).encode())
    wait_until(lambda: read_json(event_file) == {"id": "h-3"}, 5, what="event after restart")
    for topic in ("infoscreen/events/lobby", "infoscreen/events/hall", f"infoscreen/{w.uuid}/group_id"):
        srv.publish(topic, b"", retain=True)


def test_invalid_group_id_is_ignored(mqtt_worker, server):
    w = mqtt_worker()
    srv = server(w)
    srv.subscribe(f"infoscreen/{w.uuid}/logs/warn")
    srv.publish(f"infoscreen/{w.uuid}/group_id", b"a/b")
    srv.wait_for(f"infoscreen/{w.uuid}/logs/warn", lambda m: "invalid group id" in m.json()["message"])
    srv.publish(f"infoscreen/{w.uuid}/group_id", b"x" * 200)
    srv.wait_for(f"infoscreen/{w.uuid}/logs/warn", lambda m: "invalid group id" in m.json()["message"])


def test_event_file_is_never_seen_half_written(mqtt_worker, server):
    w = mqtt_worker()
    srv = server(w)
    # Retained first event: it reaches the worker whenever its subscription lands.
    srv.publish("infoscreen/events/g1", json.dumps({"event_id": -1}).encode(), retain=True)
    srv.publish(f"infoscreen/{w.uuid}/group_id", b"g1")
    event_file = w.state_dir / "active_event.json"
    payloads = [{"event_id": i, "body": "x" * (i * 97 % 20000)} for i in range(150)]
    valid = {p["event_id"] for p in payloads} | {-1}
    wait_until(lambda: event_file.exists(), 5)
    stop = threading.Event()
    bad: list[str] = []
    reads = [0]

    def hammer() -> None:
        while not stop.is_set():
            try:
                data = event_file.read_bytes()
            except FileNotFoundError:
                bad.append("missing")
                continue
            reads[0] += 1
            try:
                obj = json.loads(data)
            except ValueError:
                bad.append(f"half-written ({len(data)} bytes)")
                continue
            if obj.get("event_id") not in valid:
                bad.append(f"unknown {obj!r:.80}")

    readers = [threading.Thread(target=hammer) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for p in payloads:
            srv.publish("infoscreen/events/g1", json.dumps(p).encode())
        wait_until(lambda: read_json(event_file).get("event_id") == 149, 20, what="last event")
    finally:
        stop.set()
        for t in readers:
            t.join(5)
    assert not bad, bad[:5]
    assert reads[0] > 100
    assert not [p for p in w.state_dir.iterdir() if p.name.endswith(".tmp")]


def test_device_cannot_publish_on_its_own_commands_topic(mqtt_worker, mqtt_broker, server):
    w = mqtt_worker(start=False)
    srv = server(w)
    # The device's account logs in only under its own client id (bound in the broker): the
    # worker is started once this probe is gone.
    dev = MqttProbe(mqtt_broker.host, mqtt_broker.port, username=mqtt_broker.device_user(w.uuid),
                    password=mqtt_broker.device_password(w.uuid), client_id=w.uuid)
    dev.connect()
    try:
        body = {"command_id": "5b1c6a43-3c1f-4f57-9b0e-9c5f5b7e7a11", "action": "reboot_host",
                "expires_at": "2099-01-01T00:00:00Z"}
        assert dev.publish(f"infoscreen/{w.uuid}/commands", json.dumps(body).encode()) == NOT_AUTHORIZED
        assert dev.publish(f"infoscreen/{w.uuid}/command", json.dumps(body).encode()) == NOT_AUTHORIZED
    finally:
        dev.close()
    w.start()
    # A real command afterwards is handled: the refused one never reached the worker before it.
    cid = srv.command(w.uuid, "reboot_host")
    srv.wait_ack(w.uuid, cid, "completed")
    assert [r.command_id for r in w.sup.exec_requests()] == [cid]
    assert srv.acks(w.uuid, body["command_id"]) == []
    assert "5b1c6a43" not in w.log_text()


def test_refused_ack_is_counted_and_not_treated_as_delivered(broker_factory, device_uuid, mqtt_worker, server):
    b = broker_factory([device_uuid], start=False)
    acl = b.provisioned.acl_path
    text = acl.read_text()
    line = f"topic write infoscreen/{device_uuid}/commands/ack\n"
    assert line in text
    acl.write_text(text.replace(line, ""))  # an ACL that forgot the canonical ack topic
    b.start()
    w = mqtt_worker(broker=b)
    srv = server(w, broker=b)
    srv.subscribe(f"infoscreen/{w.uuid}/health")
    srv.subscribe(f"infoscreen/{w.uuid}/logs/warn")
    cid = srv.command(w.uuid, "reboot_host")
    srv.wait_ack(w.uuid, cid, "completed", topic="command/ack")  # the alias is allowed
    srv.wait_for(f"infoscreen/{w.uuid}/logs/warn", lambda m: "refused" in m.json()["message"])
    w.sup.send(health_report())
    h = srv.wait_for(f"infoscreen/{w.uuid}/health").json()
    assert h["refused_publishes"] >= 1  # accepted on commands/ack (the later ones wait behind it, in order)
    assert h["pending_acks"] >= 3  # kept for retry, never counted as delivered
    assert srv.acks(w.uuid, cid) == []
