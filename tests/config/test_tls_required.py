"""TLS by default: in production, a broker that is not on loopback without TLS stops the start
with one line naming TLS (the device's password would otherwise cross the network in the
clear), unless MQTT_ALLOW_PLAINTEXT=1 says plaintext is wanted."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from infoscreen.config import ConfigError, is_loopback, load_config

BASE = {"INFOSCREEN_ENV": "production", "CLIENT_UUID": str(uuid.uuid4()), "MQTT_USER": "u",
        "MQTT_PASSWORD_BROKER": "secret-password"}


@pytest.mark.parametrize("host", ["broker.example", "10.0.0.5", "192.0.2.1", "::ffff:8.8.8.8", "localhost.example"])
def test_a_remote_broker_without_tls_stops_the_start_in_production(tmp_path, host):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "INFOSCREEN_", "HELPER_"))}
    env.update(BASE, MQTT_BROKER=host, INFOSCREEN_STATE_DIR=str(tmp_path / "s"),
               INFOSCREEN_RUNTIME_DIR=str(tmp_path / "r"))
    done = subprocess.run([sys.executable, "-m", "infoscreen.supervisor"], env=env, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    [line] = done.stderr.strip().splitlines()
    assert "MQTT_TLS" in line and "TLS is required" in line and host in line
    assert "secret-password" not in done.stderr + done.stdout
    assert not (tmp_path / "r").exists()   # nothing was started


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]", "LOCALHOST."])
def test_loopback_needs_no_tls(host):
    assert is_loopback(host)
    assert load_config({**BASE, "MQTT_BROKER": host}).mqtt_tls is False


def test_plaintext_to_a_remote_broker_only_when_asked_for():
    cfg = load_config({**BASE, "MQTT_BROKER": "broker.example", "MQTT_ALLOW_PLAINTEXT": "1"})
    assert cfg.mqtt_allow_plaintext is True and cfg.mqtt_tls is False
    with pytest.raises(ConfigError, match="MQTT_ALLOW_PLAINTEXT"):
        load_config({**BASE, "MQTT_BROKER": "broker.example", "MQTT_ALLOW_PLAINTEXT": "maybe"})


def test_tls_or_another_environment_passes(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert load_config({**BASE, "MQTT_BROKER": "broker.example", "MQTT_TLS": "1", "MQTT_CA_FILE": str(ca)}).mqtt_tls
    assert load_config({**BASE, "MQTT_BROKER": "broker.example", "INFOSCREEN_ENV": "development"}).mqtt_tls is False


def test_the_child_environment_carries_the_choice():
    cfg = load_config({**BASE, "MQTT_BROKER": "broker.example", "MQTT_ALLOW_PLAINTEXT": "1"})
    assert load_config(cfg.to_environ()) == cfg
