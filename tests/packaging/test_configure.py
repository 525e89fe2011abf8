"""scripts/configure-device (the package's infoscreen-configure): --env-from merges into the
installed file, the checks gate enabling, files stay root 0600. Run for real against temporary
configuration and unit directories; systemctl is a stand-in that records its arguments."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "configure-device"
UUID = "9b8d1856-ff34-4864-a726-12de072d0f77"
KEY = "ab" * 32

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="configure-device runs as root")


@pytest.fixture
def dev(tmp_path):
    conf, units = tmp_path / "etc", tmp_path / "units"
    calls = tmp_path / "systemctl.calls"
    fake = tmp_path / "systemctl"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n")
    fake.chmod(0o755)
    env = {**os.environ, "INFOSCREEN_CONF_DIR": str(conf), "INFOSCREEN_UNIT_DIR": str(units),
           "INFOSCREEN_SYSTEMCTL": str(fake),
           "INFOSCREEN_SIMCLIENT": str(Path(sys.executable).parent / "infoscreen-simclient")}

    def run(*args):
        return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)

    run.conf, run.units, run.tmp = conf, units, tmp_path
    run.calls = lambda: calls.read_text().splitlines() if calls.exists() else []
    return run


def provisioned(tmp_path: Path, **extra: str) -> Path:
    env = tmp_path / f"{UUID}.env"
    lines = {"CLIENT_UUID": UUID, "MQTT_BROKER": "127.0.0.1", "MQTT_PORT": "8883", "MQTT_USER": f"device-{UUID}",
             "MQTT_PASSWORD_BROKER": "s3cret", **extra}
    env.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    return env


def active(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            k, _, v = line.partition("=")
            out.setdefault(k, []).append(v)
    return out


def test_a_fresh_screen_gets_the_templates_and_is_not_enabled(dev):
    r = dev()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "not ready: no broker account" in r.stderr and "not ready: no command key" in r.stderr
    assert not [c for c in dev.calls() if c.startswith("enable")]
    for name in ("infoscreen.env", "helper.env"):
        st = (dev.conf / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert (dev.conf / "infoscreen.env").read_text() == (REPO / "packaging/etc/infoscreen.env").read_text()


def test_env_from_merges_keeps_comments_and_other_lines(dev):
    dev()
    target = dev.conf / "infoscreen.env"
    target.write_text(target.read_text() + "HEARTBEAT_INTERVAL_S=15\nMQTT_USER=old\nMQTT_USER=older\n")
    key = dev.tmp / f"{UUID}.command.key"
    key.write_text(KEY + "\n")
    r = dev("--env-from", str(provisioned(dev.tmp)))
    assert r.returncode == 0, r.stdout + r.stderr
    got = active(target)
    assert got["CLIENT_UUID"] == [UUID] and got["MQTT_USER"] == [f"device-{UUID}"]  # one line per key
    assert got["HEARTBEAT_INTERVAL_S"] == ["15"]  # the screen's own setting stays
    assert got["DISPLAY_PROCESS_NAME"] == ["chromium"] and got["MQTT_PORT"] == ["8883"]
    assert "# -- identity and broker" in target.read_text()  # the template's comments stay
    # In place: CLIENT_UUID is still where the template has it, before the mode section.
    text = target.read_text()
    assert text.index(f"CLIENT_UUID={UUID}") < text.index("# -- mode")
    assert (dev.conf / "command.key").read_text().strip() == KEY
    assert stat.S_IMODE((dev.conf / "command.key").stat().st_mode) == 0o600
    assert "enable --quiet infoscreen-helper.socket infoscreen-simclient.service" in dev.calls()
    assert "configuration ok" in r.stdout
    # Run again with --set: one more variable, the rest unchanged.
    r = dev("--set", "HEALTH_INTERVAL_S=30")
    assert r.returncode == 0 and active(target)["HEALTH_INTERVAL_S"] == ["30"]
    assert active(target)["CLIENT_UUID"] == [UUID]


def test_a_bad_value_is_named_and_nothing_is_enabled(dev):
    (dev.tmp / f"{UUID}.command.key").write_text(KEY)
    r = dev("--env-from", str(provisioned(dev.tmp, HEARTBEAT_INTERVAL_S="soon")))
    assert r.returncode == 1
    assert "HEARTBEAT_INTERVAL_S" in r.stderr and "soon" in r.stderr
    assert not [c for c in dev.calls() if c.startswith("enable")]


def test_the_pinned_ca_is_installed_and_the_broker_allowed(dev):
    ca = dev.tmp / "fleet-ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    (dev.tmp / f"{UUID}.command.key").write_text(KEY)
    r = dev("--env-from", str(provisioned(dev.tmp, MQTT_BROKER="192.0.2.10", MQTT_TLS="1", MQTT_CA_FILE=str(ca))))
    # The CA is not a real certificate: the check may refuse it, but it was installed and pointed at.
    assert (dev.conf / "ca.crt").read_text() == ca.read_text()
    assert active(dev.conf / "infoscreen.env")["MQTT_CA_FILE"] == [str(dev.conf / "ca.crt")]
    dropin = dev.units / "infoscreen-simclient.service.d" / "broker.conf"
    assert "IPAddressAllow=192.0.2.10" in dropin.read_text(), r.stderr


def test_usage_errors_exit_2(dev):
    assert dev("--bogus").returncode == 2
    assert dev("--set", "lower=1").returncode == 2
    assert dev("--env-from", str(dev.tmp / "missing.env")).returncode == 2
