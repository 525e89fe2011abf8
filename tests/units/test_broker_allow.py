"""scripts/broker-allow: what the installer's drop-in lets infoscreen-simclient.service reach
(the unit denies every IP address but loopback), from the device's .env."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "broker-allow"


def allow(tmp_path: Path, broker: str | None, nameservers: tuple[str, ...] = ()) -> tuple[list[str], str]:
    env = tmp_path / "infoscreen.env"
    env.write_text("CLIENT_UUID=x\n" + (f"MQTT_BROKER={broker}\n" if broker is not None else ""))
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("".join(f"nameserver {ns}\n" for ns in nameservers))
    done = subprocess.run([str(SCRIPT), str(env), str(resolv)], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    return done.stdout.split(), done.stderr


@pytest.mark.parametrize("broker", [None, "", "localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]", '"localhost"'])
def test_a_broker_on_loopback_needs_no_drop_in(tmp_path, broker):
    assert allow(tmp_path, broker, ("192.0.2.53",)) == ([], "")


@pytest.mark.parametrize("broker,expected", [("192.0.2.10", ["192.0.2.10"]), ("2001:db8::10", ["2001:db8::10"]),
                                              ("[2001:db8::10]", ["2001:db8::10"]), ("'192.0.2.10'", ["192.0.2.10"])])
def test_an_address_is_allowed_as_it_is(tmp_path, broker, expected):
    assert allow(tmp_path, broker, ("192.0.2.53",))[0] == expected   # no resolver needed for a literal


def test_a_host_name_brings_its_name_servers_but_not_a_loopback_one(tmp_path):
    got, warning = allow(tmp_path, "broker.invalid", ("127.0.0.53", "192.0.2.53", "2001:db8::53"))
    assert got == ["192.0.2.53", "2001:db8::53"]   # .invalid never resolves (RFC 6761)
    assert "cannot resolve broker.invalid" in warning
