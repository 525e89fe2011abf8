"""The Debian package under a real systemd: a fresh install starts nothing until the screen is
configured; an upgrade with a command in flight keeps the store and the outbox and delivers the
ack that was pending; remove stops everything; purge leaves no configuration and no state.

The session's device (conftest.py) was installed from revision 1 of the package; the upgrade test
installs revision 2 over it. The purge test boots a container of its own, so the session's
device stays for the other tests.
"""

from __future__ import annotations

import json
import shutil
import uuid as uuidlib
from datetime import datetime, timedelta, timezone

import pytest

from infoscreen.wire import signing
from tests.e2e.conftest import ENV_FILE, UNIT, Device, command_for, install_deb
from tests.e2e.container import Container, RunRoot, ensure_root
from tests.support.mqtt import MqttProbe

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

HELPER_DROPIN_DIR = "/etc/systemd/system/infoscreen-helper@.service.d"


def test_a_fresh_install_starts_nothing_until_configured(machine: Device):
    assert machine.before_configure == {"enabled": "disabled", "active": "inactive"}, machine.before_configure
    assert "installed, not started" in machine.install_output
    assert "the configuration checks out" in machine.install_output
    c = machine.c
    assert c.exec(["dpkg-query", "-W", "-f", "${Status}", "infoscreen-client"]).stdout == "install ok installed"
    # The configuration is the package's template with the provisioned lines merged in.
    env = c.exec(["cat", ENV_FILE]).stdout
    assert f"CLIENT_UUID={machine.uuid}" in env and "# -- identity and broker" in env
    for prog in ("infoscreen-simclient", "infoscreen-helper", "infoscreen-notify-failure", "infoscreenctl"):
        out = c.exec([prog, "--version"]).stdout.strip()
        assert out.startswith(f"{prog} ") and out.split()[-1] == c.exec(
            ["dpkg-query", "-W", "-f", "${Version}", "infoscreen-client"]).stdout.split("-")[0]
    assert c.exec(["test", "-f", "/usr/share/man/man1/infoscreenctl.1.gz"], check=False).returncode == 0


def _slow_helper(machine: Device, seconds: int) -> None:
    """The helper answers `seconds` late (an ExecStartPre), and the client waits for it."""
    machine.c.exec(["mkdir", "-p", HELPER_DROPIN_DIR])
    machine.c.write_file(f"{HELPER_DROPIN_DIR}/50-e2e-slow.conf", f"[Service]\nExecStartPre=/bin/sleep {seconds}\n")
    machine.dropin("50-e2e-helper-timeout", "[Service]\nEnvironment=HELPER_TIMEOUT_S=30\n")


def test_upgrade_with_a_command_in_flight_delivers_the_pending_ack_after_it(machine: Device):
    c = machine.c
    machine.reset()  # (removes the test drop-ins: the slow helper's come after it)
    _slow_helper(machine, 6)
    server = MqttProbe(machine.broker.host, machine.broker.port, username=machine.broker.server_user,
                       password=machine.broker.server_password, client_id=f"e2e-upgrade-{uuidlib.uuid4()}",
                       clean_start=False, session_expiry=3600)
    try:
        machine.systemctl("restart", UNIT)
        machine.wait_active()
        server.connect()
        for t in ("commands/ack", "command/ack"):
            server.subscribe(machine.topic(t))
        c.wait_unit(UNIT, lambda p: "broker=connected" in p["StatusText"], 30, "broker=connected")
        # A command the helper will refuse (signed with another key): no power action, and its
        # terminal ack comes from the helper's answer, 6 s after execution_started.
        now = datetime.now(timezone.utc)
        cmd = command_for(machine, "shutdown_host", issued=now, expires=now + timedelta(minutes=10),
                          requested_by="e2e-upgrade")
        cid = cmd["command_id"]
        payload = json.dumps(cmd).encode()
        wrong = [(signing.SIGNATURE_PROPERTY, signing.sign(b"\x06" * 32, payload))]
        assert server.publish(machine.topic("commands"), payload, user_properties=wrong) < 128
        server.wait_for(machine.topic("commands/ack"),
                        lambda m: m.json().get("command_id") == cid and m.json()["status"] == "execution_started", 20)
        # The broker goes away: the terminal ack, committed when the helper answers, waits in the outbox.
        machine.broker.stop()
        c.wait_journal(rf"command {cid} \(shutdown_host\): \w+ -> failed", unit=UNIT, timeout=40)
        # The journal files each line at its priority: the worker's warning about the broker is
        # in `journalctl -p warning`, its info lines are not.
        warnings = c.exec(["journalctl", "--no-pager", "-q", "-o", "cat", "-p", "warning", "-u", UNIT]).stdout
        assert "lost the broker connection" in warnings and " INFO " not in warnings
        old_pid = machine.show("MainPID")["MainPID"]
        r = install_deb(c, machine.debs["2"])
        assert r.returncode == 0, r.stdout + r.stderr
        assert c.exec(["dpkg-query", "-W", "-f", "${Version}", "infoscreen-client"]).stdout.endswith("-2")
        props = machine.wait_active()
        assert props["MainPID"] != old_pid, "the upgrade restarts the running client"
        # The broker is back: the new process sends what the old one could not.
        machine.broker.start()
        server.connect()
        got = [server.wait_for(machine.topic(t),
                               lambda m: m.json().get("command_id") == cid and m.json()["status"] == "failed", 60)
               for t in ("commands/ack", "command/ack")]
        assert all(m.json()["error_code"] == "signature_invalid" for m in got)
        # Once: the helper was asked once; the store still knows the command (a repeat is answered,
        # not executed).
        helper_log = c.exec(["journalctl", "--no-pager", "-q", "-o", "cat", "-u", "infoscreen-helper*"],
                            check=False).stdout
        assert helper_log.count(cid) >= 1
        assert c.exec(["test", "-s", "/var/lib/infoscreen/mqtt-worker.sqlite3"], check=False).returncode == 0
    finally:
        server.close()
        c.exec(["rm", "-rf", HELPER_DROPIN_DIR])
        if not machine.broker.running:
            machine.broker.start()
        machine.reset()


def test_remove_stops_everything_and_purge_leaves_nothing(device: Device, e2e_log_dir):
    """A container of its own (the session's device stays): install, configure and start against
    a broker address nothing listens on, remove, purge."""
    run_root = RunRoot(ensure_root())
    c = Container(run_root.path, "infoscreen-e2e-purge", e2e_log_dir)
    try:
        deb = device.deb_files["1"]
        shutil.copy2(deb, run_root.path / "root" / deb.name)
        uid = str(uuidlib.uuid4())
        (run_root.path / "root/device.env").write_text(
            f"CLIENT_UUID={uid}\nMQTT_BROKER=127.0.0.1\nMQTT_PORT=9\nMQTT_USER=device-{uid}\n"
            "MQTT_PASSWORD_BROKER=x\nINFOSCREEN_ENV=production\n")
        (run_root.path / "root/device.command.key").write_text(signing.key_text(signing.new_key()))
        c.boot()
        assert install_deb(c, f"/root/{deb.name}").returncode == 0
        r = c.exec(["infoscreen-configure", "--env-from", "/root/device.env", "--start"], check=False, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        c.wait_unit(UNIT, lambda p: p["ActiveState"] == "active", 60, "active")
        assert c.exec(["test", "-d", "/var/lib/infoscreen"], check=False).returncode == 0
        r = c.exec(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "remove", "-y", "-q", "infoscreen-client"],
                   check=False, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert c.exec(["systemctl", "is-active", UNIT], check=False).stdout.strip() in ("inactive", "unknown")
        assert c.exec(["pgrep", "-f", "infoscreen"], check=False).returncode == 1, "a process outlived the remove"
        assert c.exec(["test", "-e", "/etc/infoscreen/infoscreen.env"], check=False).returncode == 0  # conffiles stay
        r = c.exec(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y", "-q", "infoscreen-client"],
                   check=False, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        for path in ("/etc/infoscreen", "/var/lib/infoscreen", "/var/lib/private/infoscreen", "/var/lib/infoscreen-helper",
                     "/usr/lib/infoscreen-client", "/etc/systemd/system/infoscreen-simclient.service.d"):
            assert c.exec(["test", "-e", path], check=False).returncode == 1, f"{path} survived the purge"
        assert c.exec(["dpkg-query", "-W", "infoscreen-client"], check=False).returncode != 0
    finally:
        if c.running:
            c.kill()
        run_root.cleanup()

