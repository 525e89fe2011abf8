"""The provisioned ACL, enforced by a real Mosquitto (tests/support/broker.py).

Every row of the contract's ACL table both ways (docs/server-integration.md), with its one change (the server may write
service_failed). All checks use MQTT 5 at QoS 1, where Mosquitto answers a refused publish with
PUBACK reason code 0x87 (135); under MQTT 3.1.1 or at QoS 0 it is dropped silently.

Absence of a delivery is proved without a fixed wait where possible: the refused publishes are
made (and answered by the broker) first, then an allowed publish on the same topic; once the
subscriber receives the allowed message, anything the broker had let through earlier would have
arrived before it.
"""

from __future__ import annotations

import pytest

from tests.support.mqtt import NOT_AUTHORIZED, SUCCESS, MqttProbe, accepted

GROUP = "lobby"

# (name, topic template, who may publish) - the contract's table. {u}: the device's uuid.
SERVER_ONLY = [
    ("commands", "infoscreen/{u}/commands"),
    ("command alias", "infoscreen/{u}/command"),
    ("group_id", "infoscreen/{u}/group_id"),
    ("events", "infoscreen/events/" + GROUP),
    ("power intent", "infoscreen/groups/" + GROUP + "/power/intent"),
]
CLIENT_ONLY = [
    ("commands/ack", "infoscreen/{u}/commands/ack"),
    ("command/ack", "infoscreen/{u}/command/ack"),
    ("heartbeat", "infoscreen/{u}/heartbeat"),
    ("health", "infoscreen/{u}/health"),
    ("logs/error", "infoscreen/{u}/logs/error"),
    ("logs/warn", "infoscreen/{u}/logs/warn"),
    ("logs/info", "infoscreen/{u}/logs/info"),
    ("service_failed", "infoscreen/{u}/service_failed"),
]


@pytest.mark.parametrize("name,template", SERVER_ONLY, ids=[r[0] for r in SERVER_ONLY])
def test_server_only_topic(name, template, broker, device_uuid, other_device_uuid, server_probe, device_probe):
    topic = template.format(u=device_uuid)
    reader = device_probe(device_uuid)  # the device reads its own (and the group) topics
    assert reader.subscribe(topic) == [1]
    intruder = device_probe(other_device_uuid)
    # Refused: the device itself (it must not forge its own commands) and another device.
    assert reader.publish(topic, b"forged by the device") == NOT_AUTHORIZED
    assert intruder.publish(topic, b"forged by another device") == NOT_AUTHORIZED
    # Allowed: the server, delivered to the device.
    assert server_probe().publish(topic, b"from the server") == SUCCESS
    msg = reader.wait_for(topic)
    assert msg.payload == b"from the server"
    assert [m.payload for m in reader.messages(topic)] == [b"from the server"]


@pytest.mark.parametrize("name,template", CLIENT_ONLY, ids=[r[0] for r in CLIENT_ONLY])
def test_client_only_topic(name, template, broker, device_uuid, other_device_uuid, server_probe, device_probe):
    topic = template.format(u=device_uuid)
    server = server_probe()
    assert server.subscribe(topic) == [1]
    # Refused: another device impersonating this one, and (except for service_failed, which the
    # server may write to clear the alert) the server.
    assert device_probe(other_device_uuid).publish(topic, b"forged by another device") == NOT_AUTHORIZED
    if name != "service_failed":
        assert server.publish(topic, b"forged by the server") == NOT_AUTHORIZED
    # Allowed: the device, delivered to the server.
    assert device_probe(device_uuid).publish(topic, b"from the device") == SUCCESS
    assert server.wait_for(topic).payload == b"from the device"
    assert [m.payload for m in server.messages(topic)] == [b"from the device"]


def test_device_cannot_read_what_it_writes(broker, device_uuid, server_probe, device_probe):
    """Reads are restricted too: a device receives none of its own outgoing topics."""
    dev = device_probe(device_uuid)
    assert dev.subscribe("#") == [1]  # granted, but filtered message by message
    for _, template in CLIENT_ONLY:
        assert dev.publish(template.format(u=device_uuid), b"x") == SUCCESS
    # A topic it may read, published last: its arrival orders the check.
    assert server_probe().publish(f"infoscreen/{device_uuid}/commands", b"marker") == SUCCESS
    dev.wait_for(f"infoscreen/{device_uuid}/commands")
    assert [m.topic for m in dev.messages("#")] == [f"infoscreen/{device_uuid}/commands"]


def test_device_cannot_read_another_devices_commands_or_acks(
    broker, device_uuid, other_device_uuid, server_probe, device_probe
):
    spy = device_probe(other_device_uuid)
    for t in ("commands", "command", "group_id", "commands/ack", "command/ack", "heartbeat",
              "health", "logs/#", "service_failed", "#"):
        # Mosquitto grants the subscription; the ACL is applied to each message.
        assert spy.subscribe(f"infoscreen/{device_uuid}/{t}") == [1]
    assert spy.subscribe("infoscreen/events/+") == [1]
    server, dev = server_probe(), device_probe(device_uuid)
    for t in ("commands", "command", "group_id"):
        assert server.publish(f"infoscreen/{device_uuid}/{t}", b"secret") == SUCCESS
    for t in ("commands/ack", "command/ack", "heartbeat", "health", "logs/info", "service_failed"):
        assert dev.publish(f"infoscreen/{device_uuid}/{t}", b"secret") == SUCCESS
    assert server.publish(f"infoscreen/events/{GROUP}", b"marker") == SUCCESS
    spy.wait_for(f"infoscreen/events/{GROUP}")
    assert spy.messages(f"infoscreen/{device_uuid}/#") == []


def test_server_reads_everything_it_needs_with_wildcards(
    broker, device_uuid, other_device_uuid, server_probe, device_probe
):
    server = server_probe()
    filters = ["infoscreen/+/commands/ack", "infoscreen/+/command/ack", "infoscreen/+/heartbeat",
               "infoscreen/+/health", "infoscreen/+/logs/#", "infoscreen/+/service_failed"]
    for f in filters:
        assert server.subscribe(f) == [1]
    expected = set()
    for u in (device_uuid, other_device_uuid):
        dev = device_probe(u)
        for t in ("commands/ack", "command/ack", "heartbeat", "health", "logs/error", "logs/warn",
                  "logs/info", "service_failed"):
            topic = f"infoscreen/{u}/{t}"
            assert dev.publish(topic, topic) == SUCCESS
            expected.add(topic)
    for topic in expected:
        assert server.wait_for(topic).text == topic


def test_server_cannot_read_commands_or_publish_outside_its_topics(broker, device_uuid, server_probe):
    server = server_probe()
    assert server.publish(f"infoscreen/{device_uuid}/something_else", b"x") == NOT_AUTHORIZED
    assert server.publish("elsewhere", b"x") == NOT_AUTHORIZED
    assert server.publish("$SYS/broker/x", b"x") == NOT_AUTHORIZED
    assert server.publish(f"infoscreen/{device_uuid}/logs/info", b"x") == NOT_AUTHORIZED


def test_server_clears_a_retained_service_failed(
    broker, device_uuid, other_device_uuid, server_probe, device_probe
):
    topic = f"infoscreen/{device_uuid}/service_failed"
    other = f"infoscreen/{other_device_uuid}/service_failed"
    alert = {"event": "service_failed", "unit": "infoscreen-simclient.service",
             "client_uuid": device_uuid, "failed_at": "2026-04-05T08:00:00Z"}
    assert accepted(device_probe(device_uuid).publish(topic, alert, retain=True))
    assert accepted(device_probe(other_device_uuid).publish(other, b"{}", retain=True))

    first = server_probe()
    first.subscribe("infoscreen/+/service_failed")
    msg = first.wait_for(topic)
    assert msg.retain and msg.json() == alert

    assert first.publish(topic, b"", retain=True) == SUCCESS  # the clearing
    assert first.wait_for(topic).payload == b""

    later = server_probe()
    later.subscribe("infoscreen/+/service_failed")
    later.wait_for(other)  # retained messages of one subscription are sent together
    assert later.messages(topic) == []


def test_retained_alert_survives_a_broker_restart(broker, device_uuid, server_probe, device_probe):
    topic = f"infoscreen/{device_uuid}/service_failed"
    dev = device_probe(device_uuid)
    assert accepted(dev.publish(topic, b'{"event": "service_failed"}', retain=True))
    port = broker.port
    broker.stop()  # SIGTERM: mosquitto saves its database
    dev.wait_disconnected()
    broker.start()
    assert broker.port == port
    server = server_probe()
    server.subscribe(topic)
    assert server.wait_for(topic).retain


@pytest.mark.parametrize("protocol", [5, 4], ids=["mqtt5", "mqtt311"])
def test_anonymous_connection_refused(broker, protocol):
    probe = MqttProbe(broker.host, broker.port, protocol=protocol)
    try:
        probe.connect(check=False)
        assert probe.connack != 0
        if protocol == 5:
            assert probe.connack in (134, 135)  # bad user name or password / not authorized
    finally:
        probe.close()


def test_wrong_password_and_unknown_user_refused(broker, device_uuid):
    for user, password in ((broker.device_user(device_uuid), "wrong"),
                           ("infoscreen-client-00000000", "x"),
                           (broker.server_user, broker.device_password(device_uuid))):
        probe = MqttProbe(broker.host, broker.port, username=user, password=password)
        try:
            probe.connect(check=False)
            assert probe.connack in (134, 135), user
        finally:
            probe.close()


def test_device_env_logs_in(broker, device_uuid, mqtt_probe_factory):
    env = broker.device_env(device_uuid)
    assert env["CLIENT_UUID"] == device_uuid
    assert env["MQTT_USER"] == f"infoscreen-client-{device_uuid[:8]}"
    assert (env["MQTT_BROKER"], int(env["MQTT_PORT"])) == (broker.host, broker.port)
    probe = mqtt_probe_factory(env["MQTT_BROKER"], int(env["MQTT_PORT"]), username=env["MQTT_USER"],
                               password=env["MQTT_PASSWORD_BROKER"], client_id=env["CLIENT_UUID"])
    assert probe.connected
