"""`infoscreenctl broker provision` (infoscreen/ctl/provision.py): files, hashes, modes, idempotence,
errors and the CLI's output. The enforcement of the ACL by a real broker is in
tests/broker/test_broker_acl.py; here a real broker checks the hashes and the production config."""

from __future__ import annotations

import argparse
import base64
import json
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
from infoscreen.wire import signing
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


@pytest.mark.skipif(not shutil.which("mosquitto_ctrl"), reason="mosquitto_ctrl not installed")
def test_hash_is_exactly_what_the_dynamic_security_plugin_writes(tmp_path):
    """`mosquitto_ctrl dynsec init` writes a client as the plugin itself hashes it."""
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(tmp_path / "d.json"), "alice", "s3cret-pässword"],
                   check=True, capture_output=True, timeout=10)
    entry = json.loads((tmp_path / "d.json").read_text())["clients"][0]
    assert entry["iterations"] == prov.PW_ITERATIONS
    ours = prov.hash_password("s3cret-pässword", salt=base64.b64decode(entry["salt"]))
    assert ours == {k: entry[k] for k in ("salt", "password", "iterations")}
    assert prov.verify_password("s3cret-pässword", entry)
    assert not prov.verify_password("other", entry)


def test_hash_format():
    h = prov.hash_password("pw")
    assert set(h) == {"salt", "password", "iterations"} and h["iterations"] == 101
    assert len(base64.b64decode(h["salt"])) == 12 and len(base64.b64decode(h["password"])) == 64
    assert h != prov.hash_password("pw")  # a fresh salt each time
    assert not prov.verify_password("pw", {"salt": "x", "password": "y", "iterations": 101})


# ---- files ----------------------------------------------------------------------------------


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_cli_writes_everything_and_prints_no_secret(tmp_path):
    devices = uuids(3)
    out = tmp_path / "out"
    r = cli("--devices", str(write_devices(tmp_path / "devices.txt", devices)), "--out", str(out),
            "--port", "18883", "--listen", "127.0.0.1")
    assert r.returncode == 0, r.stderr
    for name in ("mosquitto.conf", "dynamic-security.json", "acl", "server.env", "tls/ca.crt", "tls/ca.key",
                 "tls/server.crt", "tls/server.key"):
        assert (out / name).is_file(), name
    printed = r.stdout + r.stderr
    assert "3 device(s), 3 new" in printed
    secrets = secrets_of(out)
    assert len(secrets) == 4 and len(set(secrets)) == 4
    keys = [(out / "keys" / f"{u}.key").read_text() for u in devices]
    for s in secrets + [k.strip() for k in keys]:
        assert len(s) >= 32
        assert s not in printed
        for name in ("dynamic-security.json", "acl", "mosquitto.conf"):  # hashed, never in clear
            assert s not in (out / name).read_text()

    # Env files: mode 0600, the contract's variables; TLS pinned to the fleet CA.
    ca = str(out.resolve() / "tls" / "ca.crt")
    for u in devices:
        p = out / "devices" / f"{u}.env"
        assert mode(p) == 0o600
        env = prov.parse_env_file(p)
        assert env["CLIENT_UUID"] == u
        assert env["MQTT_USER"] == "infoscreen-client-" + u[:8]
        assert env["MQTT_BROKER"] == "127.0.0.1" and env["MQTT_PORT"] == "18883"
        assert env["MQTT_TLS"] == "1" and env["MQTT_CA_FILE"] == ca
        assert env["MQTT_PASSWORD_BROKER"]
        assert "INFOSCREEN_COMMAND_KEYS" not in env
    assert mode(out / "server.env") == 0o600
    server_env = prov.parse_env_file(out / "server.env")
    assert server_env["MQTT_USER"] == "infoscreen-server"
    assert server_env["MQTT_TLS"] == "1" and server_env["MQTT_CA_FILE"] == ca
    assert server_env["INFOSCREEN_COMMAND_KEYS"] == str(out.resolve() / "keys")
    assert mode(out / "devices") == 0o700 and mode(out / "keys") == 0o700

    # The accounts: one per device, bound to its client id, and the server's, hashed.
    doc = json.loads((out / "dynamic-security.json").read_text())
    assert [(c["username"], c.get("clientid")) for c in doc["clients"]] == [("infoscreen-server", None)] + [
        ("infoscreen-client-" + u[:8], u) for u in devices]
    assert all(c["iterations"] == 101 for c in doc["clients"])
    assert mode(out / "dynamic-security.json") & 0o007 == 0
    assert mode(out / "acl") & 0o007 == 0
    # The PKI: private keys 0600, the CA's key never needed by the broker.
    assert mode(out / "tls" / "ca.key") == 0o600 and mode(out / "tls" / "server.key") == 0o600
    assert "ca.key" not in (out / "mosquitto.conf").read_text()


def test_command_keys_one_per_device_in_both_copies(tmp_path):
    devices = uuids(2)
    res = prov.provision(devices, tmp_path / "o")
    for u in devices:
        server_copy, device_copy = res.server_key_path(u), res.device_key_path(u)
        assert server_copy == tmp_path / "o" / "keys" / f"{u}.key"
        assert device_copy == tmp_path / "o" / "devices" / f"{u}.command.key"
        assert mode(server_copy) == 0o600 and mode(device_copy) == 0o600
        key = signing.read_key_file(server_copy)
        assert len(key) == 32 and key == signing.read_key_file(device_copy) == res.command_keys[u]
        assert server_copy.read_text() == signing.key_text(key)
    assert res.command_keys[devices[0]] != res.command_keys[devices[1]]
    shown = repr(res)  # never the secrets
    assert res.server_password not in shown
    assert not any(k.hex() in shown or str(k) in shown for k in res.command_keys.values())


def test_conf_is_hardened_with_absolute_paths(tmp_path):
    res = prov.provision(uuids(1), tmp_path / "o", listen="127.0.0.1", port=1884)
    conf = res.conf_path.read_text()
    lines = conf.splitlines()
    directives: dict[str, list[str]] = {}
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            directives.setdefault(key, []).append(value)
    assert directives["per_listener_settings"] == ["false"]
    assert directives["listener"] == ["1884 127.0.0.1"]
    assert directives["allow_anonymous"] == ["false"]
    assert directives["allow_zero_length_clientid"] == ["false"]
    assert directives["set_tcp_nodelay"] == ["true"]
    assert directives["persistence"] == ["true"]
    assert directives["tls_version"] == ["tlsv1.2"]
    for key in ("plugin_opt_config_file", "acl_file", "persistence_location", "certfile", "keyfile"):
        path = Path(directives[key][0])
        assert path.is_absolute() and str(path).startswith(str(res.out_dir)), key
    assert directives["plugin"][0].endswith("/mosquitto_dynamic_security.so")
    assert "password_file" not in directives and "message_size_limit" not in directives
    limits = {"max_packet_size": "262144", "max_queued_messages": "1000", "max_queued_bytes": str(prov.MAX_QUEUED_BYTES),
              "max_inflight_messages": "20", "max_keepalive": "120", "max_topic_alias": "10",
              "persistent_client_expiration": "7d"}
    for key, value in limits.items():
        assert directives[key] == [value], key
        # each limit has its reason in a comment right above it
        i = next(i for i, line in enumerate(lines) if line.startswith(key + " "))
        assert lines[i - 1].startswith("#") or lines[i - 1].startswith("max_queued_messages"), key
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


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
            and "data" not in p.parts}


def test_reprovisioning_keeps_passwords_keys_and_the_pki_adds_and_removes(tmp_path):
    out = tmp_path / "out"
    a, b, c = uuids(3)
    first = prov.provision([a, b], out)
    before = tree_bytes(out)
    again = prov.provision([a, b], out)
    assert again.server_password == first.server_password
    assert again.device_passwords == first.device_passwords
    assert again.command_keys == first.command_keys
    assert tree_bytes(out) == before  # nothing rehashed, re-keyed or re-issued needlessly
    assert again.created == () and set(again.kept) == {a, b}
    assert again.tls_files == ("ca kept", "server kept")

    # Adding c keeps a's and b's credentials; dropping b removes its account, env and key files.
    third = prov.provision([a, c], out)
    assert third.device_passwords[a] == first.device_passwords[a]
    assert third.command_keys[a] == first.command_keys[a]
    assert third.created == (c,) and third.removed == (b,)
    for gone in (out / "devices" / f"{b}.env", out / "devices" / f"{b}.command.key", out / "keys" / f"{b}.key"):
        assert not gone.exists(), gone
    assert f"infoscreen-client-{b[:8]}" not in (out / "dynamic-security.json").read_text()
    assert b not in (out / "acl").read_text()
    for name in ("tls/ca.crt", "tls/ca.key", "tls/server.crt", "tls/server.key"):
        assert (out / name).read_bytes() == before[name], name


def test_a_lost_server_key_copy_is_restored_from_the_device_copy(tmp_path):
    u = uuids(1)[0]
    first = prov.provision([u], tmp_path / "o")
    first.server_key_path(u).unlink()
    again = prov.provision([u], tmp_path / "o")
    assert again.command_keys[u] == first.command_keys[u]
    assert signing.read_key_file(again.server_key_path(u)) == first.command_keys[u]


@pytest.mark.parametrize("damage", ["not a key", "differing copies"])
def test_a_damaged_key_stops_the_run_and_is_not_replaced(tmp_path, damage):
    devices = uuids(1)
    out = tmp_path / "o"
    f = write_devices(tmp_path / "d.txt", devices)
    assert cli("--devices", str(f), "--out", str(out)).returncode == 0
    key = out / "keys" / f"{devices[0]}.key"
    key.write_text("zz\n" if damage == "not a key" else signing.key_text(signing.new_key()))
    before = key.read_text()
    r = cli("--devices", str(f), "--out", str(out))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and str(key) in r.stderr
    assert key.read_text() == before


# ---- TLS ------------------------------------------------------------------------------------


def cert_text(path: Path) -> str:
    return subprocess.run(["openssl", "x509", "-in", str(path), "-noout", "-text"], capture_output=True,
                          text=True, check=True, timeout=10).stdout


def sans_of(path: Path) -> set[str]:
    text = cert_text(path)
    line = text.split("X509v3 Subject Alternative Name:", 1)[1].strip().splitlines()[0]
    return {item.strip() for item in line.split(",")}


def verifies(ca: Path, cert: Path) -> bool:
    return subprocess.run(["openssl", "verify", "-CAfile", str(ca), str(cert)], capture_output=True,
                          timeout=10).returncode == 0


def test_tls_by_default_with_a_fleet_ca_and_the_broker_names(tmp_path):
    out = tmp_path / "o"
    f = write_devices(tmp_path / "d.txt", uuids(1))
    r = cli("--devices", str(f), "--out", str(out), "--listen", "0.0.0.0", "--broker-host", "broker.example.org",
            "--tls-san", "10.0.0.5", "--tls-san", "mqtt.example.org")
    assert r.returncode == 0, r.stderr
    assert "TLS: " in r.stdout and "ca created" in r.stdout
    env = prov.parse_env_file(next((out / "devices").glob("*.env")))
    assert env["MQTT_PORT"] == "8883" and env["MQTT_BROKER"] == "broker.example.org"
    assert sans_of(out / "tls" / "server.crt") == {"DNS:broker.example.org", "IP Address:10.0.0.5",
                                                    "DNS:mqtt.example.org", "DNS:localhost", "IP Address:127.0.0.1"}
    ca = cert_text(out / "tls" / "ca.crt")
    assert "CA:TRUE, pathlen:0" in ca and "Certificate Sign" in ca
    server = cert_text(out / "tls" / "server.crt")
    assert "CA:FALSE" in server and "TLS Web Server Authentication" in server
    assert verifies(out / "tls" / "ca.crt", out / "tls" / "server.crt")
    conf = (out / "mosquitto.conf").read_text()
    assert f"certfile {out.resolve() / 'tls' / 'server.crt'}" in conf
    assert f"keyfile {out.resolve() / 'tls' / 'server.key'}" in conf


def test_a_new_broker_name_reissues_the_server_certificate_and_keeps_the_ca(tmp_path):
    out = tmp_path / "o"
    devices = uuids(1)
    prov.provision(devices, out)
    ca_before = (out / "tls" / "ca.crt").read_bytes()
    crt_before = (out / "tls" / "server.crt").read_bytes()
    res = prov.provision(devices, out, tls_sans=["screens.example.org"])
    assert res.tls_files == ("ca kept", "server issued")
    assert (out / "tls" / "ca.crt").read_bytes() == ca_before
    assert (out / "tls" / "server.crt").read_bytes() != crt_before
    assert "DNS:screens.example.org" in sans_of(out / "tls" / "server.crt")
    assert verifies(out / "tls" / "ca.crt", out / "tls" / "server.crt")


def test_without_the_ca_key_the_certificate_is_kept_but_never_reissued(tmp_path):
    out = tmp_path / "o"
    devices = uuids(1)
    f = write_devices(tmp_path / "d.txt", devices)
    assert cli("--devices", str(f), "--out", str(out)).returncode == 0
    (out / "tls" / "ca.key").unlink()  # kept offline, say
    assert cli("--devices", str(f), "--out", str(out)).returncode == 0  # nothing to issue
    r = cli("--devices", str(f), "--out", str(out), "--tls-san", "new.example.org")
    assert r.returncode == 2 and "ca.key is missing" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (out / "tls" / "ca.crt").unlink()
    (out / "tls" / "ca.key").write_text("x")
    r = cli("--devices", str(f), "--out", str(out))
    assert r.returncode == 2 and "ca.crt is missing" in r.stderr


def test_plaintext_is_todays_clear_listener(tmp_path):
    out = tmp_path / "o"
    f = write_devices(tmp_path / "d.txt", uuids(1))
    r = cli("--devices", str(f), "--out", str(out), "--plaintext")
    assert r.returncode == 0, r.stderr
    assert "TLS: off" in r.stdout
    assert not (out / "tls").exists()
    conf = (out / "mosquitto.conf").read_text()
    assert "listener 1883 127.0.0.1" in conf and "certfile" not in conf and "--plaintext" in conf
    for p in [out / "server.env", *(out / "devices").glob("*.env")]:
        env = prov.parse_env_file(p)
        assert env["MQTT_PORT"] == "1883" and "MQTT_TLS" not in env and "MQTT_CA_FILE" not in env


def test_device_ca_path_is_what_the_screens_pin(tmp_path):
    res = prov.provision(uuids(1), tmp_path / "o", device_ca_path="/etc/infoscreen/ca.crt")
    assert prov.parse_env_file(res.device_env_path(res.devices[0]))["MQTT_CA_FILE"] == "/etc/infoscreen/ca.crt"
    assert prov.parse_env_file(res.server_env_path)["MQTT_CA_FILE"] == str(res.out_dir / "tls" / "ca.crt")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--plaintext", "--tls-san", "x.example.org"], "--plaintext turns TLS off"),
        (["--tls-cert", "{f}", "--tls-key", "{f}", "--tls-san", "x.example.org"], "not with --tls-cert"),
        (["--tls-san", "a.example.org,DNS:evil"], "not a host name or IP address"),
        (["--tls-san", "bad\nname"], "not a host name or IP address"),
        (["--device-ca-path", "relative/ca.crt"], "not an absolute path"),
        (["--dynsec-plugin", "relative.so"], "not an absolute path"),
    ],
    ids=["plaintext-and-san", "own-cert-and-san", "san-injection", "san-newline", "relative-ca", "relative-plugin"],
)
def test_bad_tls_options_are_one_clear_error(tmp_path, args, needle):
    f = write_devices(tmp_path / "d.txt", uuids(1))
    r = cli("--devices", str(f), "--out", str(tmp_path / "o"), *[a.format(f=f) for a in args])
    assert r.returncode == 2, r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "o" / "tls").exists()


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
    accounts = [(b.server_user, b.server_password, None)] + [(b.device_user(u), b.device_password(u), u)
                                                             for u in devices]
    for user, password, client_id in accounts:
        assert mqtt_probe_factory(b.host, b.port, username=user, password=password, client_id=client_id).connected
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
        assert mqtt_probe_factory(b.host, b.port, username=b.device_user(u), password=b.device_password(u),
                                  client_id=u).connected


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_production_config_drops_privileges_and_works(mqtt_probe_factory):
    """The config as provisioned for production (`user mosquitto`), started as root: mosquitto
    switches to its user at once and can still read the accounts, the ACL and the TLS key, and
    write its persistence; it says nothing about deprecated options."""
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
            dev = mqtt_probe_factory(b.host, b.port, username=b.device_user(u), password=b.device_password(u),
                                     client_id=u)
            assert dev.ca_file == str(b.ca_file)  # over TLS, the broker's key read after the switch
            assert dev.publish(f"infoscreen/{u}/service_failed", b"{}", retain=True) < 128
            dev.close()
        finally:
            b.stop()
        assert (b.data_dir / "mosquitto.db").exists()  # written by the unprivileged broker
        assert not [line for line in b.log_text().splitlines() if "deprecat" in line.lower()]
        key = b.workdir / "tls" / "server.key"
        assert key.stat().st_uid == pwd.getpwnam("mosquitto").pw_uid and mode(key) == 0o600
        assert (b.workdir / "tls" / "ca.key").stat().st_uid == 0
    finally:
        shutil.rmtree(top, ignore_errors=True)
