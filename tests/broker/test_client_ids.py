"""Client ids bound to accounts, enforced by a real Mosquitto with the provisioned
dynamic-security file (tests/support/broker.py).

Each device account may connect only with its own client id (its CLIENT_UUID), and the check is
made at login, before the broker looks at an existing connection or session with that id: a
device's stolen password gives no way to knock another screen off the broker, nor to resume its
persistent session and read the commands queued in it. The server account is not bound: several
connections use it at once.
"""

from __future__ import annotations

import json

import pytest

from infoscreen.ctl import provision as prov
from tests.support.mqtt import NOT_AUTHORIZED, SUCCESS, MqttProbe

UNSPECIFIED_ERROR = 0x80  # what Mosquitto 2.0 answers an empty client id when it allows none
WEEK = 7 * 86400


def test_another_devices_account_cannot_take_a_connection_over(
    broker, device_uuid, other_device_uuid, server_probe, device_probe, mqtt_probe_factory
):
    """Connecting with device B's account and device A's client id is refused (CONNACK 0x87) and
    leaves A connected: before the binding it disconnected A, whose reconnect then kicked B."""
    a = device_probe(device_uuid)
    a.subscribe(f"infoscreen/{device_uuid}/commands")
    for protocol in (5, 4):
        thief = mqtt_probe_factory(broker.host, broker.port, username=broker.device_user(other_device_uuid),
                                   password=broker.device_password(other_device_uuid), client_id=device_uuid,
                                   protocol=protocol, connect=False)
        thief.connect(check=False)
        assert thief.connack != 0 and not thief.connected
        if protocol == 5:
            assert thief.connack == NOT_AUTHORIZED
    # A never lost its connection: a command published now reaches it on the same one.
    assert server_probe().publish(f"infoscreen/{device_uuid}/commands", b"still here") == SUCCESS
    assert a.wait_for(f"infoscreen/{device_uuid}/commands").payload == b"still here"
    assert a.connected and a._disconnects == 0
    assert f"Client {device_uuid} already connected, closing old connection" not in broker.log_text()


def test_another_account_cannot_resume_a_devices_session_or_read_its_queue(
    broker, device_uuid, other_device_uuid, server_probe, device_probe, mqtt_probe_factory
):
    """A's commands queued while A is offline: B's account under A's client id (resuming the
    session, clean_start=False) is refused and gets nothing; A's own reconnect gets all of them."""
    topic = f"infoscreen/{device_uuid}/commands"
    a = device_probe(device_uuid, clean_start=False, session_expiry=WEEK)
    a.subscribe(topic)
    a.close()
    server = server_probe()
    for i in range(3):
        assert server.publish(topic, f"queued {i}") == SUCCESS  # queued in A's offline session

    thief = mqtt_probe_factory(broker.host, broker.port, username=broker.device_user(other_device_uuid),
                               password=broker.device_password(other_device_uuid), client_id=device_uuid,
                               clean_start=False, session_expiry=WEEK, connect=False)
    thief.connect(check=False)
    assert thief.connack == NOT_AUTHORIZED
    assert thief.messages() == []

    a.connect()  # the real device, persistent session
    got = [a.wait_for(topic).text for _ in range(3)]
    assert got == ["queued 0", "queued 1", "queued 2"]


def test_a_device_account_connects_only_with_its_own_client_id(broker, device_uuid, mqtt_probe_factory):
    user, password = broker.device_user(device_uuid), broker.device_password(device_uuid)
    for client_id, expected in ((f"{device_uuid}-notify-failure", NOT_AUTHORIZED),
                                (device_uuid.upper(), NOT_AUTHORIZED),  # the id is compared exactly
                                ("probe-anything", NOT_AUTHORIZED),
                                ("", UNSPECIFIED_ERROR)):  # allow_zero_length_clientid false
        p = mqtt_probe_factory(broker.host, broker.port, username=user, password=password, client_id=client_id,
                               connect=False)
        p.connect(check=False)
        assert p.connack == expected, client_id
    assert mqtt_probe_factory(broker.host, broker.port, username=user, password=password,
                              client_id=device_uuid).connected


def test_the_server_account_serves_several_connections_at_once(broker, device_uuid, server_probe, device_probe):
    """The server, `infoscreenctl send`, `watch` and `alerts` log in with the server account at the
    same time, each with its own client id: none disconnects another."""
    servers = [server_probe(client_id=f"infoscreenctl-{i}") for i in range(4)]
    dev = device_probe(device_uuid)
    dev.subscribe(f"infoscreen/{device_uuid}/commands")
    for i, s in enumerate(servers):
        assert s.publish(f"infoscreen/{device_uuid}/commands", f"from {i}") == SUCCESS
    assert sorted(dev.wait_for(f"infoscreen/{device_uuid}/commands").text for _ in servers) == [
        f"from {i}" for i in range(4)]
    assert all(s.connected and s._disconnects == 0 for s in servers)


def test_nobody_can_change_the_accounts_at_run_time(broker, device_uuid, server_probe, device_probe):
    """The plugin's control topic is refused to every account (no ACL row grants it): no new
    account, no unbinding, no password change through the broker."""
    command = {"commands": [{"command": "createClient", "username": "intruder", "password": "pw"},
                            {"command": "setClientId", "username": broker.device_user(device_uuid)}]}
    for probe in (server_probe(), device_probe(device_uuid)):
        assert probe.subscribe("$CONTROL/dynamic-security/#") == [1]  # granted, delivers nothing
        assert probe.publish("$CONTROL/dynamic-security/v1", json.dumps(command)) == NOT_AUTHORIZED
    intruder = MqttProbe(broker.host, broker.port, username="intruder", password="pw")
    try:
        intruder.connect(check=False)
        assert intruder.connack in (134, 135)
    finally:
        intruder.close()
    doc = json.loads(broker.provisioned.dynsec_path.read_text())
    assert [c["username"] for c in doc["clients"]] == [broker.server_user] + [
        broker.device_user(u) for u in broker.devices]


def test_the_binding_is_in_the_provisioned_accounts(broker, device_uuid, other_device_uuid):
    doc = json.loads(broker.provisioned.dynsec_path.read_text())
    bound = {c["username"]: c.get("clientid") for c in doc["clients"]}
    assert bound == {broker.server_user: None, broker.device_user(device_uuid): device_uuid,
                     broker.device_user(other_device_uuid): other_device_uuid}
    # Identities only: no role, no default access; the acl file decides every read and write.
    assert doc["roles"] == [] and doc["groups"] == []
    assert all(c["roles"] == [] for c in doc["clients"])
    assert not any(doc["defaultACLAccess"].values())
    conf = broker.conf_path.read_text()
    assert f"plugin_opt_config_file {broker.provisioned.dynsec_path}" in conf
    assert f"acl_file {broker.provisioned.acl_path}" in conf
    assert "password_file" not in conf


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_persistent_session_of_a_bound_device_survives_a_broker_restart(broker_factory, device_uuid, tls,
                                                                        mqtt_probe_factory):
    b = broker_factory([device_uuid], tls=tls)
    topic = f"infoscreen/{device_uuid}/commands"
    dev = mqtt_probe_factory(b.host, b.port, username=b.device_user(device_uuid),
                             password=b.device_password(device_uuid), client_id=device_uuid,
                             clean_start=False, session_expiry=WEEK)
    assert (dev.ca_file is not None) == tls
    dev.subscribe(topic)
    dev.close()
    b.restart()
    server = mqtt_probe_factory(b.host, b.port, username=b.server_user, password=b.server_password)
    assert server.publish(topic, b"queued across a restart") == SUCCESS
    dev.connect()
    assert dev.wait_for(topic).payload == b"queued across a restart"


def test_a_device_dropped_from_the_list_cannot_log_in(broker_factory, device_uuid, other_device_uuid,
                                                      mqtt_probe_factory):
    b = broker_factory([device_uuid, other_device_uuid])
    password = b.device_password(other_device_uuid)
    b.set_devices([device_uuid])
    p = mqtt_probe_factory(b.host, b.port, username=prov.device_username(other_device_uuid), password=password,
                           client_id=other_device_uuid, connect=False)
    p.connect(check=False)
    assert p.connack in (134, 135)
