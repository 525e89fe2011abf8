from __future__ import annotations

import pytest

from infoscreen.config import ConfigError, ensure_client_uuid, load_config, read_env_file


def test_defaults_follow_the_contract():
    c = load_config({})
    assert (c.mqtt_broker, c.mqtt_port, c.environment) == ("localhost", 1883, "production")
    assert (c.heartbeat_interval_s, c.health_interval_s) == (30, 60)
    assert c.helper_socket == "/run/infoscreen-helper/helper.sock"
    assert str(c.state_dir) == "/var/lib/infoscreen" and str(c.runtime_dir) == "/run/infoscreen"
    assert c.boot_id_file == "/proc/sys/kernel/random/boot_id" and c.clock_trust == "auto"
    assert load_config({"MQTT_TLS": "1"}).mqtt_port == 8883
    assert str(load_config({"RUNTIME_DIRECTORY": "/run/x"}).runtime_dir) == "/run/x"


def test_secret_never_in_repr_or_errors():
    c = load_config({"MQTT_USER": "u", "MQTT_PASSWORD_BROKER": "s3cret"})
    assert "s3cret" not in repr(c)
    with pytest.raises(ConfigError) as e:
        load_config({"MQTT_PASSWORD_BROKER": "s3cret"})
    assert "MQTT_USER" in str(e.value) and "s3cret" not in str(e.value)


def test_env_file_and_environment_precedence(tmp_path):
    f = tmp_path / "x.env"
    f.write_text('export MQTT_BROKER="broker.example"\nMQTT_PORT=1884\n# comment\n\n')
    assert read_env_file(f) == {"MQTT_BROKER": "broker.example", "MQTT_PORT": "1884"}
    c = load_config({"MQTT_PORT": "1999", "INFOSCREEN_ENV": "development"}, env_file=str(f))
    assert c.mqtt_broker == "broker.example" and c.mqtt_port == 1999
    f.write_text("garbage line\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_config({}, env_file=str(f))


def test_client_uuid_generated_once_and_kept(tmp_path):
    c = load_config({"INFOSCREEN_STATE_DIR": str(tmp_path)})
    a = ensure_client_uuid(c).client_uuid
    b = ensure_client_uuid(c).client_uuid
    assert a == b and (tmp_path / "client_uuid").read_text().strip() == a


def test_to_environ_round_trips():
    c = load_config({"CLIENT_UUID": "9b8d1856-ff34-4864-a726-12de072d0f77", "MQTT_USER": "u",
                     "MQTT_PASSWORD_BROKER": "p", "INFOSCREEN_ENV": "test", "REBOOT_GRACE_S": "7"})
    assert load_config(c.to_environ()) == c


@pytest.mark.parametrize("value", ["9B8D1856-FF34-4864-A726-12DE072D0F77", "9b8d1856ff344864a72612de072d0f77",
                                   "{9b8d1856-ff34-4864-a726-12de072d0f77}", "infoscreen/#"])
def test_client_uuid_must_be_canonical(value):
    with pytest.raises(ConfigError, match="CLIENT_UUID"):
        load_config({"CLIENT_UUID": value})
