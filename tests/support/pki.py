"""A throw-away PKI of the tests' own, made with the openssl command (scripts/bootstrap installs
it): a rogue CA for refusal tests, and certificates brought to `broker provision --tls-cert
--tls-key --tls-ca`. The fixture's brokers do not need it: by default they use the fleet CA that
`broker provision` makes (tests/support/broker.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    """(certificate, key) of a new self-signed CA in `d`."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", *EC, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


def make_server_cert(d: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """(certificate, key) for localhost / 127.0.0.1, signed by `ca`."""
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("req", *EC, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d / "server.pem", d / "server.key"


def tls_broker(broker_factory, devices, workdir: Path):
    """(broker, CA certificate): a provisioned Mosquitto with a TLS listener of certificates
    brought by the operator (`--tls-cert/--tls-key/--tls-ca`)."""
    ca = make_ca(workdir / "pki", "fleet-ca")
    cert, key = make_server_cert(workdir / "pki", ca)
    return broker_factory(list(devices), tls=(str(cert), str(key), str(ca[0]))), ca[0]
