"""TLS to a real Mosquitto listener provisioned with --tls-cert/--tls-key: the worker verifies
the broker's certificate against MQTT_CA_FILE (and its host name), and refuses a broker signed
by another CA."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from infoscreen.ipc import messages


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


def make_server_cert(d: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d / "server.pem", d / "server.key"


@pytest.fixture
def tls_broker(broker_factory, device_uuid, tmp_path):
    ca = make_ca(tmp_path / "pki", "fleet-ca")
    cert, key = make_server_cert(tmp_path / "pki", ca)
    b = broker_factory([device_uuid], tls=(str(cert), str(key), str(ca[0])))
    return b, ca[0]


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
    other_ca, _ = make_ca(tmp_path / "other", "rogue-ca")
    w = mqtt_worker(start=False, broker=b, MQTT_CA_FILE=str(other_ca))
    w.start(wait_connected=False)
    # Certificate verification is never switched off: the worker keeps retrying and never
    # reports the broker reachable.
    from tests.support.waiting import wait_until

    wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in w.log_text() or "certificate verify failed" in w.log_text(),
               10, what="a certificate verification failure")
    assert not any(m.broker_reachable for m in w.sup.of(messages.BrokerStatus))
    assert w.alive()
