"""TLS to a real Mosquitto listener: the worker verifies the broker's certificate against
MQTT_CA_FILE (and its host name), and refuses a broker signed by another CA. With the fleet CA
`broker provision` makes by default (every fixture broker), with certificates of one's own
(--tls-cert/--tls-key), and without TLS (--plaintext)."""

from __future__ import annotations

import pytest

from infoscreen.ipc import messages
from tests.support import pki


@pytest.fixture
def tls_broker(broker_factory, device_uuid, tmp_path):
    return pki.tls_broker(broker_factory, [device_uuid], tmp_path)


def test_provisioned_tls_listener_and_env(tls_broker, device_uuid):
    b, ca = tls_broker
    conf = b.conf_path.read_text()
    assert "certfile " in conf and "keyfile " in conf and "tls_version tlsv1.2" in conf
    env = b.device_env(device_uuid)
    assert env["MQTT_TLS"] == "1" and env["MQTT_CA_FILE"] == str(ca)


def test_the_worker_speaks_tls_and_the_lifecycle_works(tls_broker, mqtt_worker, server):
    b, ca = tls_broker
    w = mqtt_worker(broker=b)  # waits for BrokerStatus reachable over TLS
    srv = server(w, broker=b, ca_file=str(ca))
    cid = srv.command(w.uuid, "reboot_host")
    srv.wait_ack(w.uuid, cid, "completed")
    assert srv.statuses(w.uuid, cid) == ["accepted", "execution_started", "completed"]


def test_a_broker_signed_by_another_ca_is_refused(tls_broker, mqtt_worker, tmp_path):
    b, _ = tls_broker
    other_ca, _ = pki.make_ca(tmp_path / "other", "rogue-ca")
    w = mqtt_worker(start=False, broker=b, MQTT_CA_FILE=str(other_ca))
    w.start(wait_connected=False)
    # Certificate verification is never switched off: the worker keeps retrying and never
    # reports the broker reachable.
    from tests.support.waiting import wait_until

    wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in w.log_text() or "certificate verify failed" in w.log_text(),
               10, what="a certificate verification failure")
    assert not any(m.broker_reachable for m in w.sup.of(messages.BrokerStatus))
    assert w.alive()


def test_the_worker_pins_the_provisioned_fleet_ca(mqtt_broker, device_uuid, mqtt_worker, server):
    env = mqtt_broker.device_env(device_uuid)
    assert env["MQTT_TLS"] == "1" and env["MQTT_CA_FILE"] == mqtt_broker.ca_file
    w = mqtt_worker()
    assert w.env["MQTT_CA_FILE"] == mqtt_broker.ca_file
    srv = server(w)
    cid = srv.command(w.uuid, "reboot_host")
    srv.wait_ack(w.uuid, cid, "completed")


def test_the_worker_on_a_plaintext_broker(broker_factory, device_uuid, mqtt_worker, server):
    b = broker_factory([device_uuid], tls=False)
    w = mqtt_worker(broker=b)
    assert "MQTT_TLS" not in w.env or w.env["MQTT_TLS"] in ("", "0")
    srv = server(w, broker=b)
    assert srv.ca_file is None
    cid = srv.command(w.uuid, "reboot_host")
    srv.wait_ack(w.uuid, cid, "completed")
