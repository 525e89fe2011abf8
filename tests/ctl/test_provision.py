"""`infoscreenctl broker provision` (infoscreen/ctl/provision.py): files, hashes, modes, idempotence,
errors and the CLI's output. The enforcement of the ACL by a real broker is in
tests/broker/test_broker_acl.py; here a real broker checks the hashes and the production config."""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid as uuidlib
from pathlib import Path

import pytest

from infoscreen.ctl import provision as prov
from tests.support.broker import MosquittoBroker

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]


def uuids(n: int) -> list[str]:
    return [str(uuidlib.uuid4()) for _ in range(n)]


def write_devices(path: Path, devices: list[str], extra: str = "") -> Path:
    path.write_text("# the fleet\n\n" + "\n".join(devices) + "\n" + extra)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "infoscreen.ctl.provision", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=30)


def secrets_of(out: Path) -> list[str]:
    found = [prov.parse_env_file(p)["MQTT_PASSWORD_BROKER"] for p in (out / "devices").glob("*.env")]
    found.append(prov.parse_env_file(out / "server.env")["MQTT_PASSWORD_BROKER"])
    return found


# ---- hashing --------------------------------------------------------------------------------


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="mosquitto_passwd not installed")
def test_hash_is_exactly_what_mosquitto_passwd_writes(tmp_path):
    pwfile = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "alice", "s3cret-pässword"], check=True,
                   capture_output=True, timeout=10)
    user, hashed = pwfile.read_text().strip().split(":", 1)
    _, alg, iterations, salt_b64, _digest = hashed.split("$")
    assert (alg, iterations) == ("7", "101")
    import base64

    assert prov.hash_password("s3cret-pässword", salt=base64.b64decode(salt_b64)) == hashed
    assert prov.verify_password("s3cret-pässword", hashed)
    assert not prov.verify_password("other", hashed)


def test_hash_format():
    h = prov.hash_password("pw")
    parts = h.split("$")
    assert parts[:3] == ["", "7", "101"] and len(parts) == 5
    assert h != prov.hash_password("pw")  # a fresh salt each time


# ---- files ----------------------------------------------------------------------------------


def test_cli_writes_everything_and_prints_no_secret(tmp_path):
    devices = uuids(3)
    out = tmp_path / "out"
    r = cli("--devices", str(write_devices(tmp_path / "devices.txt", devices)), "--out", str(out),
            "--port", "18883", "--listen", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    for name in ("mosquitto.conf", "passwd", "acl", "server.env"):
        assert (out / name).is_file()
    printed = r.stdout + r.stderr
    assert "3 device(s), 3 new" in printed
    secrets = secrets_of(out)
    assert len(secrets) == 4 and len(set(secrets)) == 4
    for s in secrets:
        assert len(s) >= 32
        assert s not in printed
        for name in ("passwd", "acl", "mosquitto.conf"):  # hashed, never in clear
            assert s not in (out / name).read_text()

    # Env files: mode 0600, the contract's variables.
    for u in devices:
        p = out / "devices" / f"{u}.env"
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        env = prov.parse_env_file(p)
        assert env["CLIENT_UUID"] == u
        assert env["MQTT_USER"] == "infoscreen-client-" + u[:8]
        assert env["MQTT_BROKER"] == "127.0.0.1" and env["MQTT_PORT"] == "18883"
        assert env["MQTT_PASSWORD_BROKER"]
    assert stat.S_IMODE((out / "server.env").stat().st_mode) == 0o600
    server_env = prov.parse_env_file(out / "server.env")
    assert server_env["MQTT_USER"] == "infoscreen-server"
    assert stat.S_IMODE((out / "devices").stat().st_mode) == 0o700

    # passwd: one hashed line per account.
    lines = (out / "passwd").read_text().splitlines()
    users = [line.split(":", 1)[0] for line in lines]
    assert users == ["infoscreen-server"] + ["infoscreen-client-" + u[:8] for u in devices]
    for line in lines:
        assert line.split(":", 1)[1].startswith("$7$101$")
    assert stat.S_IMODE((out / "passwd").stat().st_mode) & 0o007 == 0


def test_conf_is_hardened_with_absolute_paths(tmp_path):
    res = prov.provision(uuids(1), tmp_path / "o", listen="127.0.0.1", port=1884)
    conf = res.conf_path.read_text()
    directives = {}
    for line in conf.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            directives.setdefault(key, []).append(value)
    assert directives["per_listener_settings"] == ["false"]
    assert directives["listener"] == ["1884 127.0.0.1"]
    assert directives["allow_anonymous"] == ["false"]
    assert directives["set_tcp_nodelay"] == ["true"]
    assert directives["persistence"] == ["true"]
    for key in ("password_file", "acl_file", "persistence_location"):
        path = Path(directives[key][0])
        assert path.is_absolute() and str(path).startswith(str(res.out_dir)), key
    for key in ("persistent_client_expiration", "max_queued_messages", "max_inflight_messages",
                "message_size_limit", "autosave_interval"):
        assert key in directives
    assert directives["user"] == ["mosquitto"]  # production: drop privileges
    rules = [line for line in res.acl_path.read_text().splitlines() if line and not line.startswith("#")]
    assert not any(r.startswith("pattern") or "%" in r for r in rules)


def test_acl_lists_explicit_topics_for_every_device(tmp_path):
    devices = uuids(2)
    acl = prov.provision(devices, tmp_path / "o").acl_path.read_text()
    rules = [line for line in acl.splitlines() if line and not line.startswith("#")]
    for u in devices:
        block_start = rules.index(f"user infoscreen-client-{u[:8]}")
        block = rules[block_start + 1: block_start + 12]
        assert f"topic read infoscreen/{u}/commands" in block
        assert f"topic write infoscreen/{u}/commands/ack" in block
        assert all(u in r or "events/+" in r or "groups/+" in r for r in block)
    server = rules[rules.index("user infoscreen-server") + 1:]
    assert "topic readwrite infoscreen/+/service_failed" in server


def test_reprovisioning_keeps_passwords_adds_and_removes(tmp_path):
    out = tmp_path / "out"
    a, b, c = uuids(3)
    first = prov.provision([a, b], out)
    passwd_before = (out / "passwd").read_text()
    again = prov.provision([a, b], out)
    assert again.server_password == first.server_password
    assert again.device_passwords == first.device_passwords
    assert (out / "passwd").read_text() == passwd_before  # nothing rehashed needlessly
    assert again.created == () and set(again.kept) == {a, b}

    # Adding c keeps a's and b's credentials; dropping b removes its account and env file.
    third = prov.provision([a, c], out)
    assert third.device_passwords[a] == first.device_passwords[a]
    assert third.created == (c,) and third.removed == (b,)
    assert not (out / "devices" / f"{b}.env").exists()
    assert f"infoscreen-client-{b[:8]}" not in (out / "passwd").read_text()
    assert b not in (out / "acl").read_text()


def test_cli_rerun_reports_kept(tmp_path):
    devices = uuids(2)
    f = write_devices(tmp_path / "d.txt", devices)
    assert cli("--devices", str(f), "--out", str(tmp_path / "o")).returncode == 0
    before = secrets_of(tmp_path / "o")
    r = cli("--devices", str(f), "--out", str(tmp_path / "o"))
    assert r.returncode == 0 and "0 new, 2 kept" in r.stdout
    assert sorted(secrets_of(tmp_path / "o")) == sorted(before)


def test_devices_file_parsing():
    u = str(uuidlib.uuid4())
    assert prov.parse_devices(["", "# comment", f"  {u.upper()}  # lobby screen", ""]) == [u]


@pytest.mark.parametrize(
    "content,needle",
    [
        ("not-a-uuid\n", ":1: not a UUID"),
        ("{u}\n{u}\n", ":2: duplicate device"),
        ("# only comments\n\n", "no device UUID"),
        ("{u}\n{same_prefix}\n", "would share the account"),
        ("{u} extra\n", "not a UUID"),
    ],
    ids=["invalid", "duplicate", "empty", "account-collision", "trailing-garbage"],
)
def test_bad_devices_file_is_one_clear_error_and_exit_2(tmp_path, content, needle):
    u = str(uuidlib.uuid4())
    same_prefix = u[:8] + str(uuidlib.uuid4())[8:]
    f = tmp_path / "devices.txt"
    f.write_text(content.format(u=u, same_prefix=same_prefix))
    r = cli("--devices", str(f), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0] and str(f) in lines[0]
    assert not (tmp_path / "o").exists()


def test_missing_devices_file_exit_2(tmp_path):
    r = cli("--devices", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nope" in r.stderr


def test_register_under_a_broker_group():
    parser = argparse.ArgumentParser(prog="infoscreenctl")
    top = parser.add_subparsers(dest="command", required=True)
    broker = top.add_parser("broker").add_subparsers(dest="broker_command", required=True)
    prov.register(broker)
    args = parser.parse_args(["broker", "provision", "--devices", "d", "--out", "o", "--port", "1999"])
    assert args.func is prov.run and args.port == 1999 and args.server_user == "infoscreen-server"


# ---- against a real broker ------------------------------------------------------------------


def test_every_provisioned_account_logs_in_and_a_bad_password_does_not(broker_factory, mqtt_probe_factory):
    devices = uuids(3)
    b = broker_factory(devices)
    accounts = [(b.server_user, b.server_password)] + [(b.device_user(u), b.device_password(u)) for u in devices]
    for user, password in accounts:
        assert mqtt_probe_factory(b.host, b.port, username=user, password=password).connected
    bad = mqtt_probe_factory(b.host, b.port, username=b.server_user, password="x", connect=False)
    bad.connect(check=False)
    assert bad.connack in (134, 135)


def test_broker_keeps_accepting_old_passwords_after_adding_a_device(broker_factory, mqtt_probe_factory):
    a, c = uuids(2)
    b = broker_factory([a])
    password_a = b.device_password(a)
    b.set_devices([a, c])  # what an operator does: re-run provision with the longer list
    assert b.device_password(a) == password_a
    for u in (a, c):
        assert mqtt_probe_factory(b.host, b.port, username=b.device_user(u), password=b.device_password(u)).connected


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_production_config_drops_privileges_and_works(mqtt_probe_factory):
    """The config as provisioned for production (`user mosquitto`), started as root: mosquitto
    switches to its user and can still read the password/ACL files and write its persistence."""
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no mosquitto user")
    # pytest's tmp dirs are root-only (0700); the broker's user must reach the files.
    top = Path(tempfile.mkdtemp(prefix="infoscreen-prov-"))
    try:
        os.chmod(top, 0o755)
        u = str(uuidlib.uuid4())
        b = MosquittoBroker([u], top / "broker", run_as_user="mosquitto")
        assert "user mosquitto" in b.conf_path.read_text()
        b.start()
        try:
            status = Path(f"/proc/{b.pid}/status").read_text()
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            assert int(uid_line.split()[1]) == pwd.getpwnam("mosquitto").pw_uid
            dev = mqtt_probe_factory(b.host, b.port, username=b.device_user(u), password=b.device_password(u))
            assert dev.publish(f"infoscreen/{u}/service_failed", b"{}", retain=True) < 128
            dev.close()
        finally:
            b.stop()
        assert (b.data_dir / "mosquitto.db").exists()  # written by the unprivileged broker
    finally:
        shutil.rmtree(top, ignore_errors=True)
