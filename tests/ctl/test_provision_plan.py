"""`broker provision` as three steps: the plan and the render are pure (no broker, no openssl, no
file system: checked here), and one write puts the rendered files in place (tests/ctl/test_provision.py
and every broker fixture run the whole of it)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from infoscreen.ctl import provision as prov
from infoscreen.wire import signing, topics

A = "9b8d1856-ff34-4864-a726-12de072d0f77"
B = "07aab032-53c2-45ef-a5a3-6aa58e9d9fae"
OUT = Path("/srv/broker")


def options(**kw) -> prov.Options:
    base = dict(devices=(A, B), out=OUT, listen="127.0.0.1", port=8883, server_user="infoscreen-server",
                broker_host="broker.example", run_as_user="mosquitto", autosave_interval=30,
                log_types=("error",), plugin="/usr/lib/mosquitto_dynamic_security.so", plaintext=False,
                tls_cert=None, tls_key=None, tls_ca=None, sans=("DNS:broker.example",), device_ca_path=None)
    base.update(kw)
    return prov.Options(**base)


def secrets():
    """Deterministic generators: the plan takes its new secrets from them."""
    n = itertools.count()
    return dict(password=lambda: f"pw-{next(n)}", key=lambda: bytes([next(n)]) * 32,
                hashed=lambda pw: {"salt": "s", "password": f"hash({pw})", "iterations": 1})


def test_a_first_run_creates_every_secret():
    p = prov.plan(options(), prov.Existing(), **secrets())
    assert p.created == (A, B) and p.kept == () and p.remove == ()
    assert p.server_password == "pw-0" and p.passwords == {A: "pw-1", B: "pw-3"}
    assert p.keys == {A: bytes([2]) * 32, B: bytes([4]) * 32}
    assert [(u, c) for u, c, _ in p.accounts] == [("infoscreen-server", None), (prov.device_username(A), A),
                                                  (prov.device_username(B), B)]
    assert p.accounts[1][2] == {"salt": "s", "password": "hash(pw-1)", "iterations": 1}
    assert p.tls == (str(OUT / "tls/server.crt"), str(OUT / "tls/server.key"))
    assert p.ca_file == p.device_ca == str(OUT / "tls/ca.crt")


def test_a_rerun_keeps_passwords_keys_and_hashes_and_drops_unlisted_devices():
    key = signing.new_key()
    old_hash = prov.hash_password("kept-pw")
    existing = prov.Existing(
        server_passwords={"infoscreen-server": "server-pw"},
        device_passwords={A: "kept-pw"},
        keys={A: (key, key), B: (None, key)},  # B lost the server's copy: the device's is kept
        hashes={prov.device_username(A): {"username": prov.device_username(A), **old_hash}},
        device_files=((f"devices/{A}.env", A), ("devices/gone.env", "gone"), ("keys/gone.key", "gone")),
    )
    p = prov.plan(options(), existing, **secrets())
    assert p.server_password == "server-pw" and p.passwords[A] == "kept-pw"
    assert p.kept == (A,) and p.created == (B,)
    assert p.keys == {A: key, B: key}
    assert p.accounts[1][2] == old_hash  # still matches: the same hash, no needless change
    assert p.accounts[0][2]["password"] == "hash(server-pw)"  # no hash on record: a new one
    assert p.remove == ("devices/gone.env", "keys/gone.key")


def test_two_copies_of_a_key_that_differ_stop_the_plan():
    existing = prov.Existing(keys={A: (b"\1" * 32, b"\2" * 32)})
    with pytest.raises(prov.ProvisionError, match="differ"):
        prov.plan(options(), existing, **secrets())


def test_a_stale_hash_is_replaced():
    stale = {"username": prov.device_username(A), **prov.hash_password("another")}
    p = prov.plan(options(), prov.Existing(device_passwords={A: "pw"}, hashes={stale["username"]: stale}), **secrets())
    assert p.accounts[1][2]["password"] == "hash(pw)"


def test_tls_choices_of_the_plan():
    own = prov.plan(options(tls_cert="/c.crt", tls_key="/c.key", tls_ca="/ca.pem", sans=()), prov.Existing(),
                    **secrets())
    assert own.tls == ("/c.crt", "/c.key") and own.ca_file == own.device_ca == "/ca.pem"
    pinned = prov.plan(options(device_ca_path="/etc/infoscreen/ca.crt"), prov.Existing(), **secrets())
    assert pinned.device_ca == "/etc/infoscreen/ca.crt" and pinned.ca_file == str(OUT / "tls/ca.crt")
    plain = prov.plan(options(plaintext=True, port=1883, sans=()), prov.Existing(), **secrets())
    assert plain.tls is None and plain.ca_file is None and plain.device_ca is None


def test_the_render_is_every_file_with_its_mode():
    p = prov.plan(options(), prov.Existing(), **secrets())
    files = prov.render(p)
    assert set(files) == {"mosquitto.conf", "dynamic-security.json", "acl", "server.env",
                          *(f"devices/{u}.env" for u in (A, B)), *(f"devices/{u}.command.key" for u in (A, B)),
                          *(f"keys/{u}.key" for u in (A, B))}
    assert {name: mode for name, (_, mode) in files.items() if mode != 0o600} == {"mosquitto.conf": 0o644}
    env = dict(line.split("=", 1) for line in files[f"devices/{A}.env"][0].splitlines() if "=" in line
               and not line.startswith("#"))
    assert env == {"CLIENT_UUID": A, "MQTT_USER": prov.device_username(A), "MQTT_PASSWORD_BROKER": "pw-1",
                   "MQTT_BROKER": "broker.example", "MQTT_PORT": "8883", "MQTT_TLS": "1",
                   "MQTT_CA_FILE": str(OUT / "tls/ca.crt")}
    server = files["server.env"][0]
    assert f"INFOSCREEN_COMMAND_KEYS={OUT / 'keys'}\n" in server and "MQTT_PASSWORD_BROKER=pw-0\n" in server
    assert files[f"keys/{A}.key"][0] == files[f"devices/{A}.command.key"][0] == signing.key_text(p.keys[A])
    conf = files["mosquitto.conf"][0]
    assert f"listener 8883 127.0.0.1" in conf and f"certfile {OUT / 'tls/server.crt'}" in conf
    assert f"acl_file {OUT / 'acl'}" in conf


def test_the_rendered_acl_is_the_topic_table():
    files = prov.render(prov.plan(options(), prov.Existing(), **secrets()))
    blocks: dict[str, list[str]] = {}
    user = None
    for line in files["acl"][0].splitlines():
        if line.startswith("user "):
            user = line.split(" ", 1)[1]
            blocks[user] = []
        elif line.startswith("topic "):
            assert user is not None, "a topic line outside a user block"
            blocks[user].append(line)
    assert blocks == {"infoscreen-server": topics.acl_lines(topics.SERVER),
                      prov.device_username(A): topics.acl_lines(topics.DEVICE, A),
                      prov.device_username(B): topics.acl_lines(topics.DEVICE, B)}


def test_a_plaintext_render_says_nothing_of_tls_and_a_root_broker_gets_group_readable_files():
    p = prov.plan(options(plaintext=True, port=1883, sans=()), prov.Existing(), group_readable=True, **secrets())
    files = prov.render(p)
    assert "MQTT_TLS" not in files["server.env"][0] and "MQTT_CA_FILE" not in files[f"devices/{B}.env"][0]
    assert "certfile" not in files["mosquitto.conf"][0]
    assert files["acl"][1] == files["dynamic-security.json"][1] == 0o640
    assert files[f"devices/{A}.env"][1] == 0o600


def test_the_write_puts_the_render_in_place_and_removes_what_the_plan_drops(tmp_path):
    out = tmp_path / "o"
    for d in ("devices", "keys", "data"):
        (out / d).mkdir(parents=True)
    (out / "devices/gone.env").write_text("x")
    p = prov.plan(options(out=out), prov.Existing(device_files=(("devices/gone.env", "gone"),)), **secrets())
    files = prov.render(p)
    prov.write(p, files)
    for name, (text, mode) in files.items():
        assert (out / name).read_text() == text and (out / name).stat().st_mode & 0o777 == mode
    assert not (out / "devices/gone.env").exists()
    again = prov.read_existing(out, (A, B))
    assert again.device_passwords == p.passwords and again.server_passwords == {"infoscreen-server": "pw-0"}
    assert again.keys == {u: (k, k) for u, k in p.keys.items()}
