"""What a stolen device password gives, and what it does not (docs/security.md, "A stolen device
password"), against a real Mosquitto provisioned by `broker provision`.

The thief has everything in the screen's env file (account, password, its uuid, the CA) and
nothing else; the screen itself is online with its persistent session.
"""

from __future__ import annotations

import pytest

from tests.support.mqtt import NOT_AUTHORIZED, SUCCESS, accepted

OWN_WRITES = ["commands/ack", "command/ack", "heartbeat", "health", "logs/error", "logs/warn", "logs/info",
              "service_failed"]
WEEK = 7 * 86400


@pytest.fixture
def thief(broker, device_uuid, mqtt_probe_factory):
    """`thief(client_id=<the stolen screen's uuid>, **kw)`: a connection made from the stolen env
    file alone."""
    env = broker.device_env(device_uuid)

    def make(client_id: str | None = None, **kw):
        return mqtt_probe_factory(env["MQTT_BROKER"], int(env["MQTT_PORT"]), username=env["MQTT_USER"],
                                  password=env["MQTT_PASSWORD_BROKER"], ca_file=env["MQTT_CA_FILE"],
                                  client_id=client_id or env["CLIENT_UUID"], **kw)

    return make


def test_it_gives_what_the_screen_itself_may_do(broker, device_uuid, thief, server_probe):
    """Publish the screen's own acks, heartbeat, health, logs and alert; read its own commands."""
    server = server_probe()
    server.subscribe(f"infoscreen/{device_uuid}/#")
    t = thief()
    for leaf in OWN_WRITES:
        assert t.publish(f"infoscreen/{device_uuid}/{leaf}", b"forged by the thief") == SUCCESS, leaf
    for leaf in OWN_WRITES:
        assert server.wait_for(f"infoscreen/{device_uuid}/{leaf}").payload == b"forged by the thief"
    t.subscribe(f"infoscreen/{device_uuid}/commands")
    assert server.publish(f"infoscreen/{device_uuid}/commands", b'{"action": "reboot_host"}') == SUCCESS
    assert t.wait_for(f"infoscreen/{device_uuid}/commands").payload == b'{"action": "reboot_host"}'


def test_no_other_devices_topics(broker, device_uuid, other_device_uuid, thief, server_probe, device_probe):
    other = device_probe(other_device_uuid)
    other.subscribe(f"infoscreen/{other_device_uuid}/commands")
    t = thief()
    for leaf in OWN_WRITES:  # write nothing of the other screen's
        assert t.publish(f"infoscreen/{other_device_uuid}/{leaf}", b"forged") == NOT_AUTHORIZED, leaf
    t.subscribe(f"infoscreen/{other_device_uuid}/#")  # granted, but delivers nothing
    t.subscribe("infoscreen/#")
    server = server_probe()
    assert server.publish(f"infoscreen/{other_device_uuid}/commands", b"not for the thief") == SUCCESS
    assert other.wait_for(f"infoscreen/{other_device_uuid}/commands").payload == b"not for the thief"
    assert server.publish(f"infoscreen/{device_uuid}/commands", b"marker") == SUCCESS  # orders the check
    t.wait_for(f"infoscreen/{device_uuid}/commands")
    assert t.messages(f"infoscreen/{other_device_uuid}/#") == []


def test_no_client_id_takeover(broker, device_uuid, other_device_uuid, thief, device_probe, server_probe):
    """Not the other screen's client id (refused at login, the screen stays connected and keeps
    its queued commands), and the stolen screen's own id only as that screen (itself)."""
    other = device_probe(other_device_uuid, clean_start=False, session_expiry=WEEK)
    other.subscribe(f"infoscreen/{other_device_uuid}/commands")
    t = thief(client_id=other_device_uuid, clean_start=False, session_expiry=WEEK, connect=False)
    t.connect(check=False)
    assert t.connack == NOT_AUTHORIZED
    assert other.connected and other._disconnects == 0
    assert server_probe().publish(f"infoscreen/{other_device_uuid}/commands", b"still its own") == SUCCESS
    assert other.wait_for(f"infoscreen/{other_device_uuid}/commands").payload == b"still its own"
    assert t.messages() == []


def test_no_command_to_itself(broker, device_uuid, thief):
    """The broker refuses the screen's account on its command topics; and the command key, which
    the screen's helper checks on every power command, is in no file the password comes with."""
    t = thief(client_id=device_uuid)  # logged in as the screen itself, its one possible identity
    for topic in ("commands", "command"):
        assert t.publish(f"infoscreen/{device_uuid}/{topic}", b'{"action": "reboot_host"}') == NOT_AUTHORIZED
    key = broker.device_key(device_uuid)
    assert len(key) == 32
    stolen = broker.device_env_path(device_uuid).read_text()
    broker_files = [broker.conf_path, broker.provisioned.dynsec_path, broker.provisioned.acl_path]
    for text in [stolen] + [p.read_text() for p in broker_files]:
        assert key.hex() not in text
    assert all(not k.startswith(("INFOSCREEN_COMMAND", "HELPER_COMMAND")) for k in broker.device_env(device_uuid))
    assert accepted(t.publish(f"infoscreen/{device_uuid}/heartbeat", b"{}"))


def test_recovery_rotates_that_password_alone(broker, device_uuid, other_device_uuid, thief, mqtt_probe_factory):
    """Delete the screen's env file, provision again, restart: the stolen password is refused, the
    other screen's is kept, and the command key stays unless its two copies are deleted too."""
    stolen = thief(connect=False)
    other_password = broker.device_password(other_device_uuid)
    key = broker.device_key(device_uuid)
    broker.device_env_path(device_uuid).unlink()
    broker.set_devices([device_uuid, other_device_uuid])  # provision again, broker restarted
    stolen.connect(check=False)
    assert stolen.connack in (134, 135)
    assert broker.device_password(other_device_uuid) == other_password
    assert mqtt_probe_factory(broker.host, broker.port, username=broker.device_user(device_uuid),
                              password=broker.device_password(device_uuid), client_id=device_uuid).connected
    assert broker.device_key(device_uuid) == key
    broker.server_key_path(device_uuid).unlink()
    broker.device_key_path(device_uuid).unlink()
    broker.set_devices([device_uuid, other_device_uuid])
    assert broker.device_key(device_uuid) != key
