"""`infoscreen-notify-failure UNIT` against a real Mosquitto with the production ACL.

Delivery is checked the way the server sees it: the server account subscribes afterwards and
receives the retained alert. The systemd side (``systemctl show``) is replaced in-process by a
scripted sequence of states; the real thing runs under a real systemd in tests/e2e.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from infoscreen.notify_failure import main as nf
from tests.support.mqtt import MqttProbe

UNIT = "infoscreen-simclient.service"
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def device_environ(broker, uuid: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "CLIENT_UUID", "INFOSCREEN_"))}
    env.update(broker.device_env(uuid))
    env.update(extra)
    return env


def retained_alert(broker, uuid: str, timeout: float = 5.0):
    probe = MqttProbe(broker.host, broker.port, username=broker.server_user, password=broker.server_password)
    probe.connect()
    try:
        probe.subscribe(f"infoscreen/{uuid}/service_failed")
        return probe.wait_for(f"infoscreen/{uuid}/service_failed", timeout=timeout)
    finally:
        probe.close()


def no_retained_alert(broker, uuid: str) -> None:
    probe = MqttProbe(broker.host, broker.port, username=broker.server_user, password=broker.server_password)
    probe.connect()
    try:
        probe.subscribe(f"infoscreen/{uuid}/service_failed")  # retained messages come with the SUBACK
        probe.assert_nothing(f"infoscreen/{uuid}/service_failed", within=0.3)
    finally:
        probe.close()


def run_cli(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infoscreen.notify_failure", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Scripted:
    """A stand-in for `systemctl show`: returns the given states in order, then the last one."""

    def __init__(self, *states: tuple[str, str, str, str]) -> None:
        self.states = [nf.UnitState(a, s, r, n, None) for a, s, r, n in states]
        self.calls: list[str] = []

    def __call__(self, unit: str, timeout: float = 15.0) -> nf.UnitState:
        self.calls.append(unit)
        return self.states[min(len(self.calls) - 1, len(self.states) - 1)]


FAILED = ("failed", "failed", "start-limit-hit", "4")
AUTO_RESTART = ("activating", "auto-restart", "exit-code", "2")
STARTING = ("activating", "start", "success", "3")
RUNNING = ("active", "running", "success", "3")
STOPPED = ("inactive", "dead", "success", "0")


# ---------------------------------------------------------------------------- the alert itself
def test_delivers_the_contract_payload_retained(broker, device_uuid):
    t0 = time.time()
    r = run_cli("--no-state-check", UNIT, env=device_environ(broker, device_uuid))
    assert r.returncode == 0, r.stderr
    assert "alert delivered" in r.stderr
    msg = retained_alert(broker, device_uuid)
    assert msg.retain and msg.qos == 1
    body = msg.json()
    assert list(body) == ["event", "unit", "client_uuid", "failed_at"]
    assert body["event"] == "service_failed"
    assert body["unit"] == UNIT
    assert body["client_uuid"] == device_uuid
    assert STAMP.match(body["failed_at"])
    failed_at = time.mktime(time.strptime(body["failed_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert t0 - 2 <= failed_at <= time.time() + 1


def test_password_never_printed(broker, device_uuid):
    env = device_environ(broker, device_uuid)
    r = run_cli("--no-state-check", UNIT, env=env)
    assert r.returncode == 0
    assert env["MQTT_PASSWORD_BROKER"] not in r.stdout + r.stderr
    # a refused login neither
    env["MQTT_PASSWORD_BROKER"] = "wrong-" + env["MQTT_PASSWORD_BROKER"]
    r = run_cli("--no-state-check", UNIT, env=env)
    assert r.returncode == 1
    assert env["MQTT_PASSWORD_BROKER"] not in r.stdout + r.stderr


def test_uuid_from_the_state_dir_when_not_configured(broker, device_uuid, tmp_path):
    env = device_environ(broker, device_uuid, INFOSCREEN_STATE_DIR=str(tmp_path))
    del env["CLIENT_UUID"]
    (tmp_path / "client_uuid").write_text(device_uuid + "\n")
    r = run_cli("--no-state-check", UNIT, env=env)
    assert r.returncode == 0, r.stderr
    assert retained_alert(broker, device_uuid).json()["client_uuid"] == device_uuid


def test_no_uuid_anywhere_is_a_configuration_error(broker, device_uuid, tmp_path):
    env = device_environ(broker, device_uuid, INFOSCREEN_STATE_DIR=str(tmp_path))
    del env["CLIENT_UUID"]
    r = run_cli("--no-state-check", UNIT, env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "CLIENT_UUID" in lines[0], r.stderr
    # and it never invents an identity
    assert not (tmp_path / "client_uuid").exists()


def test_env_file_option(broker, device_uuid, tmp_path):
    envfile = tmp_path / "infoscreen.env"
    envfile.write_text("".join(f"{k}={v}\n" for k, v in broker.device_env(device_uuid).items()))
    env = {k: v for k, v in device_environ(broker, device_uuid).items() if not k.startswith(("MQTT_", "CLIENT_UUID"))}
    r = run_cli("--no-state-check", "--env-file", str(envfile), UNIT, env=env)
    assert r.returncode == 0, r.stderr
    assert retained_alert(broker, device_uuid).json()["unit"] == UNIT


def test_an_unrelated_bad_variable_does_not_silence_the_alert(broker, device_uuid):
    """A bad .env is the likeliest cause of a crash loop: the alert must still go out."""
    env = device_environ(broker, device_uuid, HEALTH_INTERVAL_S="bogus", INFOSCREEN_ENV="nonsense")
    r = run_cli("--no-state-check", UNIT, env=env)
    assert r.returncode == 0, r.stderr
    assert retained_alert(broker, device_uuid).json()["unit"] == UNIT


def test_a_bad_broker_variable_is_named(broker, device_uuid):
    r = run_cli("--no-state-check", UNIT, env=device_environ(broker, device_uuid, MQTT_PORT="eighty"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "MQTT_PORT" in lines[0]


def test_not_a_unit_name(broker, device_uuid):
    r = run_cli("--no-state-check", "bad unit; rm -rf /", env=device_environ(broker, device_uuid))
    assert r.returncode == 2


def test_acl_refusal_is_a_failure_not_a_retry(broker, device_uuid, other_device_uuid):
    """Publishing another device's alert: PUBACK 0x87; exit 1 at once, no retry loop."""
    env = device_environ(broker, device_uuid, CLIENT_UUID=other_device_uuid)
    t0 = time.monotonic()
    r = run_cli("--no-state-check", "--deliver-timeout", "20", UNIT, env=env)
    assert r.returncode == 1
    assert "0x87" in r.stderr
    assert time.monotonic() - t0 < 10
    no_retained_alert(broker, other_device_uuid)


def test_bad_login_is_a_failure_not_a_retry(broker, device_uuid):
    env = device_environ(broker, device_uuid, MQTT_PASSWORD_BROKER="not-the-password")
    t0 = time.monotonic()
    r = run_cli("--no-state-check", "--deliver-timeout", "20", UNIT, env=env)
    assert r.returncode == 1
    assert "refused the connection" in r.stderr
    assert time.monotonic() - t0 < 10


def test_broker_down_throughout_exits_nonzero_within_the_bound(broker, device_uuid):
    broker.stop()
    t0 = time.monotonic()
    r = run_cli("--no-state-check", "--deliver-timeout", "2", UNIT, env=device_environ(broker, device_uuid))
    took = time.monotonic() - t0
    assert r.returncode == 1
    assert "giving up" in r.stderr
    assert 2 <= took < 8


def test_broker_back_during_the_retries(broker, device_uuid):
    """The broker is down when the alert starts; it comes back (on the first failed attempt)
    and the alert is delivered by a later attempt."""
    broker.stop()
    proc = subprocess.Popen(
        [sys.executable, "-m", "infoscreen.notify_failure", "--no-state-check", "--deliver-timeout", "30", UNIT],
        env=device_environ(broker, device_uuid),
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    first_failure = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "attempt 1 failed" in line:
                first_failure.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert first_failure.wait(10), lines
        broker.start()
        assert proc.wait(30) == 0, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    assert any("alert delivered" in line for line in lines)
    assert retained_alert(broker, device_uuid).json()["client_uuid"] == device_uuid


def test_alert_survives_a_broker_restart_and_clears_with_an_empty_retained_publish(broker, device_uuid):
    assert run_cli("--no-state-check", UNIT, env=device_environ(broker, device_uuid)).returncode == 0
    broker.restart()
    assert retained_alert(broker, device_uuid).json()["unit"] == UNIT
    # The server clears it (the contract: the server account may write service_failed).
    server = MqttProbe(broker.host, broker.port, username=broker.server_user, password=broker.server_password)
    server.connect()
    try:
        assert server.publish(f"infoscreen/{device_uuid}/service_failed", b"", retain=True) < 128
    finally:
        server.close()
    no_retained_alert(broker, device_uuid)


# ------------------------------------------------------- the device's own client id and session
WEEK = 7 * 86400


def test_the_alert_connects_as_the_device_and_leaves_its_queued_commands_to_it(
        broker, device_uuid, server_probe, device_probe):
    """The broker binds the device's account to its client id, so the alert connects as the
    device and resumes its persistent session (no clean start). Commands queued for the screen
    while it was down (the worker's session) are still delivered to the worker afterwards: the
    one the session lent the alert program is not acknowledged, so the broker sends it again."""
    topics = [f"infoscreen/{device_uuid}/commands", f"infoscreen/{device_uuid}/command"]
    worker = device_probe(device_uuid, clean_start=False, session_expiry=WEEK)  # as the MQTT worker connects
    for t in topics:
        worker.subscribe(t)
    worker.close()  # the client crash-looped: its session waits on the broker
    server = server_probe()
    sent = [(topics[i % 2], f"command {i}".encode()) for i in range(4)]
    for t, p in sent:
        assert server.publish(t, p) == 0

    r = run_cli("--no-state-check", UNIT, env=device_environ(broker, device_uuid))
    assert r.returncode == 0, r.stderr
    assert retained_alert(broker, device_uuid).json()["client_uuid"] == device_uuid
    assert f"as {device_uuid} (p5, c0, k30, u'{broker.device_user(device_uuid)}')" in broker.log_text()

    worker.connect()  # the worker back, resuming its session
    assert worker.session_present
    got = [worker.wait_for("infoscreen/#") for _ in sent]
    assert sorted((m.topic, m.payload) for m in got) == sorted(sent)
    assert [m for m in got if m.dup] == [got[0]]  # lent to the alert, never acknowledged, sent again
    assert server.publish(topics[0], b"marker") == 0  # delivered after anything still pending
    worker.wait_for(topics[0], lambda m: m.payload == b"marker")
    assert len(worker.messages("infoscreen/#")) == len(sent) + 1  # and nothing twice


def test_the_alert_keeps_the_session_it_resumes_for_the_workers_expiry(broker, device_uuid, server_probe,
                                                                     device_probe):
    """The last CONNECT sets a session's expiry: the alert asks for the worker's own 7 days, so
    a session it touches (here: one it had to create) outlives its disconnect."""
    from infoscreen.workers.mqtt import connection

    assert nf.SESSION_EXPIRY_S == connection.SESSION_EXPIRY_S == WEEK
    assert run_cli("--no-state-check", UNIT, env=device_environ(broker, device_uuid)).returncode == 0
    broker.restart()  # and it is persisted like the worker's
    worker = device_probe(device_uuid, clean_start=False, session_expiry=WEEK)
    assert worker.session_present


def test_a_running_worker_loses_nothing_either(broker, device_uuid, server_probe, device_probe):
    """By hand (--no-state-check) while the worker is connected: the alert takes the connection
    over for a moment; the worker's session, subscriptions and queue are the same afterwards."""
    topic = f"infoscreen/{device_uuid}/commands"
    worker = device_probe(device_uuid, clean_start=False, session_expiry=WEEK)
    worker.subscribe(topic)
    assert run_cli("--no-state-check", UNIT, env=device_environ(broker, device_uuid)).returncode == 0
    worker.wait_disconnected()  # taken over
    assert server_probe().publish(topic, b"while it was away") == 0
    worker.connect()
    assert worker.session_present
    assert worker.wait_for(topic).payload == b"while it was away"


# ------------------------------------------------------------------ the state check (in-process)
@pytest.fixture
def in_process(broker, device_uuid, monkeypatch):
    """`run(script, *args)`: main() in-process with `systemctl show` scripted."""
    env = device_environ(broker, device_uuid)
    monkeypatch.setattr(nf, "SETTLE_INTERVAL", 0.001)

    def run(script, *extra: str) -> int:
        monkeypatch.setattr(nf, "query_unit", script)
        return nf.main([*extra, UNIT], environ=env)

    return run


def test_failed_for_good_alerts(in_process, broker, device_uuid, capsys):
    assert in_process(Scripted(FAILED)) == 0
    assert "failed for good" in capsys.readouterr().err
    assert retained_alert(broker, device_uuid).json()["unit"] == UNIT


def test_running_again_does_not_alert(in_process, broker, device_uuid, capsys):
    assert in_process(Scripted(RUNNING)) == 0
    assert "no alert" in capsys.readouterr().err
    no_retained_alert(broker, device_uuid)


def test_stopped_does_not_alert(in_process, broker, device_uuid, capsys):
    assert in_process(Scripted(STOPPED)) == 0
    assert "stopped, not failed" in capsys.readouterr().err
    no_retained_alert(broker, device_uuid)


def test_waits_through_a_pending_restart_that_recovers(in_process, broker, device_uuid, capsys):
    script = Scripted(AUTO_RESTART, AUTO_RESTART, STARTING, RUNNING)
    assert in_process(script) == 0
    assert len(script.calls) == 4
    assert "running again" in capsys.readouterr().err
    no_retained_alert(broker, device_uuid)


def test_waits_through_a_pending_restart_that_fails_for_good(in_process, broker, device_uuid):
    """OnFailure= fired early (a restart was still pending); systemd's final attempt fails while
    this instance runs: it must be this instance that alerts."""
    script = Scripted(AUTO_RESTART, STARTING, AUTO_RESTART, FAILED)
    assert in_process(script) == 0
    assert len(script.calls) == 4
    assert retained_alert(broker, device_uuid).json()["unit"] == UNIT


def test_undecided_within_the_bound_does_not_alert(in_process, broker, device_uuid, capsys):
    assert in_process(Scripted(AUTO_RESTART), "--settle-timeout", "0.05") == 0
    assert "has not decided" in capsys.readouterr().err
    no_retained_alert(broker, device_uuid)


def test_settle_is_bounded_by_its_timeout():
    ticks = iter(range(10_000))  # one "second" per reading of the clock
    script = Scripted(AUTO_RESTART)
    st = nf.settle(UNIT, 5, query=script, clock=lambda: float(next(ticks)), sleep=lambda s: None)
    assert not st.settled
    assert 4 <= len(script.calls) <= 7


def test_systemctl_unusable_alerts_anyway(in_process, broker, device_uuid, capsys):
    def broken(unit: str, timeout: float = 15.0) -> nf.UnitState:
        raise RuntimeError("systemctl show exited 1: Failed to connect to bus")

    assert in_process(broken) == 0
    assert "alerting anyway" in capsys.readouterr().err
    assert retained_alert(broker, device_uuid).json()["unit"] == UNIT


def test_query_unit_parses_systemctl_show(tmp_path, monkeypatch):
    """The real query function with a stand-in systemctl: fixed argv, `--` before the unit."""
    fake = tmp_path / "systemctl"
    record = tmp_path / "argv"
    fake.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {record}\n'
        'printf "ActiveState=failed\\nSubState=failed\\nResult=exit-code\\nNRestarts=4\\n'
        'StateChangeTimestampMonotonic=123456789\\n"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setattr(nf, "systemctl_path", lambda: str(fake))
    st = nf.query_unit(UNIT)
    assert (st.active, st.sub, st.result, st.n_restarts, st.changed_mono_us) == (
        "failed", "failed", "exit-code", "4", 123456789)
    assert record.read_text().split("\n")[:5] == [
        "show", "-p", ",".join(nf.SHOW_PROPS), "--", UNIT]


def test_failed_at_is_when_the_unit_failed_not_when_the_alert_went_out():
    now_mono = time.monotonic()
    st = nf.UnitState("failed", "failed", "exit-code", "4", int((now_mono - 30) * 1e6))
    assert abs((time.time() - nf.failed_at_from(st)) - 30) < 1
    assert abs(nf.failed_at_from(None) - time.time()) < 1
    body = json.loads(nf.alert_payload(UNIT, "u", 0))
    assert body["failed_at"] == "1970-01-01T00:00:00Z"


def test_console_script_is_declared():
    """`infoscreen-notify-failure` is the entry point the unit's ExecStart names."""
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert eps.get("infoscreen-notify-failure") == "infoscreen.notify_failure.main:main"


def test_unit_file_runs_the_program_with_the_instance_name():
    text = (Path(__file__).resolve().parents[2] / "systemd/infoscreen-notify-failure@.service").read_text()
    assert "ExecStart=/opt/infoscreen/venv/bin/infoscreen-notify-failure %i\n" in text
    assert "EnvironmentFile=/etc/infoscreen/infoscreen.env" in text
    client = (Path(__file__).resolve().parents[2] / "systemd/infoscreen-simclient.service").read_text()
    assert "OnFailure=infoscreen-notify-failure@%n.service" in client
