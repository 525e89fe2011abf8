"""infoscreenctl over TLS, with the server.env that `broker provision` writes: the fleet CA it
makes by default, certificates of one's own (`--tls-*`), and `--plaintext`."""

from __future__ import annotations

from infoscreen.wire import topics
from tests.support import pki


def test_alerts_over_tls_and_a_wrong_ca_is_refused(broker_factory, device_uuid, ctl_raw, tmp_path, mqtt_probe_factory):
    b, ca = pki.tls_broker(broker_factory, [device_uuid], tmp_path)
    assert "MQTT_TLS=1" in b.server_env_path.read_text()
    dev = mqtt_probe_factory(b.host, b.port, username=b.device_user(device_uuid),
                             password=b.device_password(device_uuid), client_id=device_uuid, ca_file=str(ca))
    dev.publish(topics.service_failed(device_uuid),
                {"event": "service_failed", "unit": "infoscreen-simclient.service", "client_uuid": device_uuid,
                 "failed_at": "2026-04-05T08:00:00Z"}, retain=True)
    ok = ctl_raw("alerts", "--json", "--env", str(b.server_env_path))
    assert ok.wait(20) == 0, ok.stderr
    assert device_uuid in ok.stdout

    rogue, _ = pki.make_ca(tmp_path / "rogue", "rogue-ca")
    bad = ctl_raw("alerts", "--env", str(b.server_env_path), "--ca-file", str(rogue))
    assert bad.wait(20) == 2
    assert "certificate" in bad.stderr.lower() and b.server_password not in bad.stderr + bad.stdout


def test_the_provisioned_server_env_pins_the_fleet_ca(broker, device_uuid, ctl, ctl_raw, tmp_path, device_probe):
    """The default: server.env says MQTT_TLS=1 and MQTT_CA_FILE=<OUT>/tls/ca.crt, and that is all
    infoscreenctl needs; another CA given on the command line is refused."""
    env = broker.server_env()
    assert env["MQTT_TLS"] == "1" and env["MQTT_CA_FILE"] == str(broker.workdir / "tls" / "ca.crt")
    device_probe(device_uuid).publish(topics.service_failed(device_uuid), b'{"event": "service_failed"}', retain=True)
    ok = ctl("alerts", "--json")
    assert ok.wait(20) == 0, ok.stderr
    assert device_uuid in ok.stdout
    rogue, _ = pki.make_ca(tmp_path / "rogue", "rogue-ca")
    bad = ctl("alerts", "--ca-file", str(rogue))
    assert bad.wait(20) == 2
    assert "certificate" in bad.stderr.lower() and broker.server_password not in bad.stderr + bad.stdout


def test_a_plaintext_broker_and_its_server_env(broker_factory, device_uuid, ctl_raw):
    b = broker_factory([device_uuid], tls=False)
    assert "MQTT_TLS" not in b.server_env()
    p = ctl_raw("alerts", "--env", str(b.server_env_path))
    assert p.wait(20) == 0, p.stderr
    assert "(TLS)" not in p.stderr


def test_the_shared_session_checks_the_host_name(broker_factory, device_uuid, tmp_path):
    """The operator's and the alert unit's client (infoscreen.mqttclient) verify the name the
    certificate was issued for, as the worker does: a broker reached under another address is
    refused even though its certificate is of the pinned CA."""
    import pytest

    from infoscreen.mqttclient import Session, SessionError, Settings

    ca = pki.make_ca(tmp_path / "pki", "fleet-ca")
    cert, key = pki.make_server_cert(tmp_path / "pki", ca)  # names localhost and 127.0.0.1 only
    b = broker_factory([device_uuid], host="127.0.0.2", tls=(str(cert), str(key), str(ca[0])))
    settings = Settings(host="127.0.0.2", port=b.port, user=b.server_user, password=b.server_password, tls=True,
                        ca_file=str(ca[0]), connect_timeout=5)
    session = Session(settings)
    try:
        with pytest.raises(SessionError, match="certificate: IP address mismatch"):
            session.connect()
    finally:
        session.close()
    assert b.server_password not in str(settings)
