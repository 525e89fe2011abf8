"""The TLS listener `broker provision` makes by default, on a real Mosquitto: the clients pin the
fleet CA and check the broker's name; nothing speaks clear text to it."""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.support import pki
from tests.support.mqtt import MqttProbe


def test_fixture_brokers_speak_tls_with_the_pinned_fleet_ca(broker, device_uuid, device_probe, server_probe):
    assert broker.ca_file == str(broker.workdir / "tls" / "ca.crt")
    for env in (broker.device_env(device_uuid), broker.server_env()):
        assert env["MQTT_TLS"] == "1" and env["MQTT_CA_FILE"] == broker.ca_file
        assert env["MQTT_PORT"] == str(broker.port)
    assert device_probe(device_uuid).ca_file == broker.ca_file  # what every probe pins
    assert server_probe().connected


def test_a_clear_text_client_gets_nothing_from_the_tls_listener(broker):
    probe = MqttProbe(broker.host, broker.port, username=broker.server_user, password=broker.server_password,
                      ca_file=None)
    try:
        probe.connect(check=False)
        assert probe.connack != 0 and not probe.connected
    finally:
        probe.close()


def test_a_client_pinning_another_ca_refuses_the_broker(broker, tmp_path):
    rogue, _ = pki.make_ca(tmp_path / "rogue", "rogue-ca")
    probe = MqttProbe(broker.host, broker.port, username=broker.server_user, password=broker.server_password,
                      ca_file=str(rogue))
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            probe.connect()
    finally:
        probe.close()


@pytest.mark.parametrize("name,ok", [("localhost", True), ("127.0.0.1", True), ("broker.evil.example", False)])
def test_the_certificate_names_the_broker_and_nothing_else(broker, name, ok):
    ctx = ssl.create_default_context(cafile=broker.ca_file)
    with socket.create_connection((broker.host, broker.port), timeout=5) as sock:
        if ok:
            with ctx.wrap_socket(sock, server_hostname=name) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        else:
            with pytest.raises(ssl.SSLCertVerificationError, match="match"):
                ctx.wrap_socket(sock, server_hostname=name)


def test_a_plaintext_broker_when_a_test_asks_for_one(broker_factory, device_uuid, mqtt_probe_factory):
    b = broker_factory([device_uuid], tls=False)
    assert b.ca_file is None and not (b.workdir / "tls").exists()
    env = b.device_env(device_uuid)
    assert "MQTT_TLS" not in env and "MQTT_CA_FILE" not in env
    dev = mqtt_probe_factory(b.host, b.port, username=b.device_user(device_uuid),
                             password=b.device_password(device_uuid), client_id=device_uuid)
    assert dev.ca_file is None and dev.connected


def test_bring_your_own_certificates_still_work(broker_factory, device_uuid, tmp_path, mqtt_probe_factory):
    b, ca = pki.tls_broker(broker_factory, [device_uuid], tmp_path)
    assert b.ca_file == str(ca) and not (b.workdir / "tls").exists()
    assert b.device_env(device_uuid)["MQTT_CA_FILE"] == str(ca)
    assert mqtt_probe_factory(b.host, b.port, username=b.server_user, password=b.server_password).connected
