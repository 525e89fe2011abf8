"""`infoscreen-simclient --check-config`: validates a configuration, says what it says, starts
nothing and writes nothing (no identity generated, no state or runtime directory made)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SIMCLIENT = Path(sys.executable).parent / "infoscreen-simclient"


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    env_file = tmp_path / "infoscreen.env"
    env_file.write_text(text + f"INFOSCREEN_STATE_DIR={tmp_path / 'state'}\nINFOSCREEN_RUNTIME_DIR={tmp_path / 'run'}\n")
    return subprocess.run([str(SIMCLIENT), "--check-config", "--env-file", str(env_file)], env={"PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)


def test_a_good_configuration_is_described_and_nothing_is_written(tmp_path):
    r = check(tmp_path, "MQTT_BROKER=localhost\nMQTT_USER=dev\nMQTT_PASSWORD_BROKER=pw\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("infoscreen-simclient: configuration ok: device (none: generated at the first start)")
    assert "broker localhost:1883 (plaintext) as dev" in r.stdout and "pw" not in r.stdout
    assert not (tmp_path / "state").exists() and not (tmp_path / "run").exists()


def test_a_bad_value_is_one_line_naming_it(tmp_path):
    r = check(tmp_path, "MQTT_BROKER=localhost\nHEALTH_INTERVAL_S=soon\n")
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "HEALTH_INTERVAL_S" in r.stderr
