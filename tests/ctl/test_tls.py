"""infoscreenctl over TLS, with the server.env that `broker provision --tls-*` writes."""

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
