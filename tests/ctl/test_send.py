"""`infoscreenctl send`: the command it publishes, the lifecycle it prints, its exit statuses.

Most tests play the device with an MqttProbe logged in with the device's account (the broker's
ACL applies): it waits for the command, then publishes acks on both topics as the client does.
The last test runs the real process tree in mock mode.
"""

from __future__ import annotations

import re
import time
import uuid as uuidlib

import pytest

from infoscreen.ctl import send as send_mod
from infoscreen.wire import signing, topics
from infoscreen.wire.schema import parse_rfc3339


def ack(command_id: str, status: str, code: str | None = None, message: str | None = None) -> dict:
    return {"command_id": command_id, "status": status, "error_code": code, "error_message": message}


def publish_both(dev, uuid: str, payload: dict) -> None:
    for t in topics.ack_topics(uuid):
        assert dev.publish(t, payload) in (0, 16)


def lifecycle_lines(out: str) -> list[str]:
    return re.findall(r"^\s+\+[\d.]+ (?:ms|s)\s+(\S+)", out, re.M)


@pytest.fixture
def device(device_probe, device_uuid):
    dev = device_probe()
    dev.subscribe(topics.commands(device_uuid))
    return dev


# ---- the happy path ---------------------------------------------------------------------------


def test_send_wait_completed_prints_lifecycle_with_timings(ctl, device, device_uuid):
    p = ctl("send", "reboot", "--device", device_uuid, "--wait", "--reason", "test")
    before = time.time()
    msg = device.wait_for(topics.commands(device_uuid), timeout=10)
    cmd = msg.json()
    assert msg.qos == 1 and not msg.retain
    # the contract's command
    uuidlib.UUID(cmd["command_id"])
    assert cmd["action"] == "reboot_host"
    assert cmd["schema_version"] == "1.0"
    assert cmd["client_uuid"] == device_uuid
    assert cmd["reason"] == "test"
    issued, expires = parse_rfc3339(cmd["issued_at"]), parse_rfc3339(cmd["expires_at"])
    assert abs(issued - before) < 5
    assert 590 <= expires - issued <= 601
    # The broker drops it if it is still queued for an offline screen when it expires.
    assert 500 <= msg.properties.MessageExpiryInterval <= 601
    cid = cmd["command_id"]
    publish_both(device, device_uuid, ack(cid, "accepted"))
    p.wait_line(r"\baccepted$")
    publish_both(device, device_uuid, ack(cid, "execution_started"))
    p.wait_line(r"\bexecution_started$")
    publish_both(device, device_uuid, ack(cid, "completed"))
    assert p.wait(10) == 0, p.stderr
    out = p.stdout
    assert f"command_id {cid}" in out
    assert lifecycle_lines(out) == ["published", "accepted", "execution_started", "completed"]
    assert re.search(r"^completed: device .* confirmed reboot_host .* after the publish$", out, re.M)
    # the copy on the alias topic is counted, not printed twice (the last one may not be read)
    assert re.search(r"^note: [23] duplicate ack\(s\) ignored", out, re.M)
    assert "PUBACK: 0 (success)" in out


def test_send_subscribes_before_publishing_so_an_instant_ack_is_not_missed(ctl, device, device_uuid):
    """The device answers the instant the command arrives (as the real client does in mock mode)."""
    p = ctl("send", "shutdown", "--device", device_uuid, "--wait", "--expires-in", "30s")
    cid = device.wait_for(topics.commands(device_uuid), timeout=10).json()["command_id"]
    for st in ("accepted", "execution_started", "completed"):
        publish_both(device, device_uuid, ack(cid, st))
    assert p.wait(10) == 0, p.stdout + p.stderr
    assert lifecycle_lines(p.stdout) == ["published", "accepted", "execution_started", "completed"]
    assert "shutdown_host" in p.stdout


def test_send_wait_failed_exits_1_with_code_and_message(ctl, device, device_uuid):
    p = ctl("send", "reboot", "--device", device_uuid, "--wait")
    cid = device.wait_for(topics.commands(device_uuid), timeout=10).json()["command_id"]
    publish_both(device, device_uuid, ack(cid, "failed", "helper_unavailable", "helper socket missing"))
    assert p.wait(10) == 1
    assert re.search(r"^\s+\+[\d.]+ ms\s+failed  helper_unavailable: helper socket missing$", p.stdout, re.M)
    assert "failed: helper_unavailable: helper socket missing" in p.stdout.splitlines()


def test_acks_of_other_commands_are_ignored_and_a_repeat_is_noted(ctl, device, device_uuid):
    p = ctl("send", "reboot", "--device", device_uuid, "--wait")
    cid = device.wait_for(topics.commands(device_uuid), timeout=10).json()["command_id"]
    other = str(uuidlib.uuid4())
    publish_both(device, device_uuid, ack(other, "failed", "busy", "not ours"))
    device.publish(topics.ack(device_uuid), b"not json")
    publish_both(device, device_uuid, ack(cid, "accepted"))
    p.wait_line(r"\baccepted$")
    # the device answering a duplicate: the latest status again on the same topic
    device.publish(topics.ack(device_uuid), ack(cid, "accepted"))
    p.wait_line(r"accepted again on commands/ack")
    publish_both(device, device_uuid, ack(cid, "completed"))
    assert p.wait(10) == 0
    assert "not ours" not in p.stdout
    assert "is not schema v1" in p.stdout


# ---- ending without a terminal status ----------------------------------------------------------


def test_send_wait_exits_3_when_expires_at_passes(ctl, device, device_uuid):
    # expires_at has second precision: --expires-in 2s ends 1-2 s after the publish.
    p = ctl("send", "reboot", "--device", device_uuid, "--wait", "--expires-in", "2s")
    cid = device.wait_for(topics.commands(device_uuid), timeout=10).json()["command_id"]
    publish_both(device, device_uuid, ack(cid, "accepted"))
    assert p.wait(10) == 3
    assert re.search(r"^expired: no completed or failed ack before expires_at \S+Z \(last status: accepted\)$",
                     p.stdout, re.M)


def test_send_wait_timeout_exits_4_and_says_the_command_is_still_valid(ctl, device, device_uuid):
    p = ctl("send", "reboot", "--device", device_uuid, "--wait", "--timeout", "300ms")
    device.wait_for(topics.commands(device_uuid), timeout=10)
    assert p.wait(10) == 4
    assert re.search(r"^timeout: .* \(last status: none\); the command stays valid until \S+Z$", p.stdout, re.M)


def test_send_without_wait_reports_in_progress_and_exits_0(ctl, device, device_uuid):
    p = ctl("send", "reboot", "--device", device_uuid, "--timeout", "300ms")
    cid = device.wait_for(topics.commands(device_uuid), timeout=10).json()["command_id"]
    publish_both(device, device_uuid, ack(cid, "accepted"))
    assert p.wait(10) == 0
    assert "still in progress" in p.stdout and "use --wait" in p.stdout


def test_publish_with_no_subscribed_device_is_reported(ctl, device_uuid, broker):
    p = ctl("send", "reboot", "--device", device_uuid, "--timeout", "200ms")
    assert p.wait(10) == 0
    assert "PUBACK: 16 (no matching subscribers)" in p.stdout
    assert "nothing will receive this command" in p.stdout


def test_follow_survives_a_broker_restart(ctl, broker, device_probe, device_uuid):
    """A clean broker restart: the broker saved the CLI's session, so an ack published while the
    CLI was away is delivered when it comes back."""
    dev = device_probe()
    dev.subscribe(topics.commands(device_uuid))
    p = ctl("send", "reboot", "--device", device_uuid, "--wait", "--expires-in", "1m")
    cid = dev.wait_for(topics.commands(device_uuid), timeout=10).json()["command_id"]
    publish_both(dev, device_uuid, ack(cid, "accepted"))
    p.wait_line(r"\baccepted$")
    broker.stop()  # SIGTERM: mosquitto saves sessions and retained messages
    p.wait_line(r"connection to the broker lost")
    broker.start()
    dev.connect()
    publish_both(dev, device_uuid, ack(cid, "completed"))  # queued in the CLI's session if it is not back
    assert p.wait(20) == 0, p.stdout + p.stderr
    assert "reconnected to the broker (the broker kept the session)" in p.stdout
    assert lifecycle_lines(p.stdout)[-1] == "completed"
    assert "re-sent" not in p.stdout


def test_follow_after_a_broker_crash_resends_the_same_command(ctl, broker, device_probe, device_uuid):
    """A broker crash (SIGKILL) loses the CLI's session and whatever was published meanwhile. The CLI
    re-sends the same command (same command_id), which the contract answers with the latest status
    and never executes twice."""
    dev = device_probe()
    dev.subscribe(topics.commands(device_uuid))
    p = ctl("send", "reboot", "--device", device_uuid, "--wait", "--expires-in", "1m")
    cmd = dev.wait_for(topics.commands(device_uuid), timeout=10).json()
    cid = cmd["command_id"]
    publish_both(dev, device_uuid, ack(cid, "accepted"))
    p.wait_line(r"\baccepted$")
    broker.kill()
    p.wait_line(r"connection to the broker lost")
    broker.start()
    dev.connect()
    dev.subscribe(topics.commands(device_uuid))
    # the CLI reconnects, resubscribes and re-sends the very same command
    again = dev.wait_for(topics.commands(device_uuid), lambda m: m.json()["command_id"] == cid, timeout=20)
    assert again.json() == cmd
    publish_both(dev, device_uuid, ack(cid, "completed"))  # the device's answer to a duplicate
    assert p.wait(20) == 0, p.stdout + p.stderr
    assert "reconnected to the broker (session lost; resubscribed)" in p.stdout
    assert re.search(r"re-sent the same command \(same command_id: never executed twice\)", p.stdout)
    assert lifecycle_lines(p.stdout)[-1] == "completed"


# ---- refusals and bad input ------------------------------------------------------------------------


def test_publish_refused_by_the_acl_is_a_clear_error(ctl_raw, broker, device_uuid):
    """A device account may not write commands: the PUBACK's reason code 135 becomes one line."""
    # The device account logs in only under its own client id (bound in the broker).
    p = ctl_raw("send", "reboot", "--device", device_uuid, "--wait",
                "--env", str(broker.device_env_path(device_uuid)), "--client-id", device_uuid)
    assert p.wait(10) == 2
    assert re.search(r"error: the broker refused the publish to infoscreen/\S+/commands: 135 \(not authorized\)",
                     p.stderr)
    assert broker.device_password(device_uuid) not in p.stdout + p.stderr


def test_bad_password_is_a_clear_error_without_the_secret(ctl_raw, broker, device_uuid, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("wrong-password-xyz\n")
    pw.chmod(0o600)
    p = ctl_raw("send", "reboot", "--device", device_uuid, "--broker", broker.host, "--port", str(broker.port),
                "--user", broker.server_user, "--password-file", str(pw), "--tls", "--ca-file", broker.ca_file)
    assert p.wait(10) == 2
    # Mosquitto answers a wrong password with 135 (not authorized), some brokers with 134
    assert re.search(r"refused the login of infoscreen-server: 13[45] \((bad user name or password|not authorized)\)",
                     p.stderr)
    assert "wrong-password-xyz" not in p.stdout + p.stderr


def test_no_broker_is_a_clear_error(ctl_raw, tmp_path):
    from tests.support.broker import free_port

    p = ctl_raw("send", "reboot", "--device", str(uuidlib.uuid4()), "--broker", "127.0.0.1",
                "--port", str(free_port()), "--user", "x")
    assert p.wait(10) == 2
    assert "cannot connect to the broker at 127.0.0.1:" in p.stderr


@pytest.mark.parametrize("bad", ["not-a-uuid", "+", "#", "9b8d1856-ff34-4864-a726-12de072d0f7/"])
def test_device_must_be_a_uuid(ctl_raw, bad):
    p = ctl_raw("send", "reboot", "--device", bad)
    assert p.wait(10) == 2
    assert "not a device UUID" in p.stderr


def test_env_file_readable_by_others_is_warned_about(ctl_raw, broker, device_uuid, tmp_path):
    env = tmp_path / "server.env"
    env.write_text(broker.server_env_path.read_text())
    env.chmod(0o644)
    p = ctl_raw("send", "reboot", "--device", device_uuid, "--timeout", "100ms", "--env", str(env))
    assert p.wait(10) == 0
    assert "accessible to other users (mode 0644)" in p.stderr


# ---- units ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("10m", 600), ("1.5h", 5400),
                                          ("250ms", 0.25), ("1d", 86400), (" 2 min ", 120)])
def test_parse_duration(text, seconds):
    assert send_mod.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "-1s", "0", "10x", "1e9"])
def test_parse_duration_rejects(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        send_mod.parse_duration(text)


def test_build_command_matches_the_contract():
    dev = str(uuidlib.uuid4())
    cmd, expires_at = send_mod.build_command(dev, "reboot_host", 600)
    import json

    obj = json.loads(send_mod.encode_command(cmd))
    assert set(obj) == {"schema_version", "command_id", "client_uuid", "action", "issued_at", "expires_at"}
    assert obj["expires_at"].endswith("Z") and parse_rfc3339(obj["expires_at"]) == expires_at


# ---- against the real process tree (mock mode) ----------------------------------------------------------


def test_send_wait_against_the_running_tree_in_mock_mode(ctl, broker, device_uuid, tree_factory, server_probe):
    online = server_probe()
    online.subscribe(topics.heartbeat(device_uuid))
    tree = tree_factory(broker, device_uuid).start()
    # the device is online once its first heartbeat (published on every connect) arrives
    online.wait_for(topics.heartbeat(device_uuid), timeout=20)
    p = ctl("send", "reboot", "--device", device_uuid, "--wait", "--expires-in", "1m")
    assert p.wait(30) == 0, p.stdout + p.stderr + tree.log_text()[-3000:]
    assert lifecycle_lines(p.stdout) == ["published", "accepted", "execution_started", "completed"]
    assert "completed: device" in p.stdout


# ---- signed power commands ------------------------------------------------------------------------


def user_properties(msg) -> list[tuple[str, str]]:
    return list(getattr(msg.properties, "UserProperty", None) or [])


def write_key(key_dir, uuid: str, key: bytes | None = None) -> bytes:
    key = key or signing.new_key()
    key_dir.mkdir(mode=0o700, exist_ok=True)
    path = key_dir / f"{uuid}.key"
    path.write_text(signing.key_text(key))
    path.chmod(0o600)
    return key


def finish(dev, uuid: str, msg) -> None:
    publish_both(dev, uuid, ack(msg.json()["command_id"], "completed"))


def test_send_signs_the_payload_bytes_as_published(ctl, device, device_uuid, tmp_path):
    """The device receives the PUBLISH with one `signature` user property: hmac-sha256 over the
    received payload, byte for byte, on the command topic."""
    key = write_key(tmp_path / "keys", device_uuid)
    p = ctl("send", "reboot", "--device", device_uuid, "--wait", "--keys", str(tmp_path / "keys"))
    msg = device.wait_for(topics.commands(device_uuid), timeout=10)
    assert msg.topic == topics.commands(device_uuid)
    props = user_properties(msg)
    assert props == [(signing.SIGNATURE_PROPERTY, signing.sign(key, msg.payload))]
    assert re.fullmatch(r"hmac-sha256=[0-9a-f]{64}", props[0][1])
    finish(device, device_uuid, msg)
    assert p.wait(10) == 0, p.stdout + p.stderr
    assert re.search(r"^command_id \S+, expires_at \S+, signed \(hmac-sha256\)$", p.stdout, re.M)
    assert key.hex() not in p.stdout + p.stderr
    assert "unsigned" not in p.stderr


@pytest.mark.parametrize("source", ["option", "environment", "env file"])
def test_key_directory_precedence(ctl_raw, broker, device, device_uuid, tmp_path, source):
    """--keys, then $INFOSCREEN_COMMAND_KEYS, then INFOSCREEN_COMMAND_KEYS of the env file."""
    keys = {name: write_key(tmp_path / name, device_uuid) for name in ("option", "environment", "env file")}
    env_file = tmp_path / "server.env"
    env_file.write_text(broker.server_env_path.read_text()
                        + f"\nINFOSCREEN_COMMAND_KEYS={tmp_path / 'env file'}\n")
    env_file.chmod(0o600)
    argv = ["send", "shutdown", "--device", device_uuid, "--wait", "--env", str(env_file)]
    env = {}
    if source == "option":
        argv += ["--keys", str(tmp_path / "option")]
    if source in ("option", "environment"):
        env["INFOSCREEN_COMMAND_KEYS"] = str(tmp_path / "environment")
    p = ctl_raw(*argv, env=env)
    msg = device.wait_for(topics.commands(device_uuid), timeout=10)
    assert user_properties(msg) == [("signature", signing.sign(keys[source], msg.payload))]
    finish(device, device_uuid, msg)
    assert p.wait(10) == 0, p.stdout + p.stderr


def test_the_re_sent_command_after_a_broker_crash_is_signed_too(ctl, broker, device_probe, device_uuid, tmp_path):
    key = write_key(tmp_path / "keys", device_uuid)
    dev = device_probe()
    dev.subscribe(topics.commands(device_uuid))
    p = ctl("send", "reboot", "--device", device_uuid, "--wait", "--expires-in", "1m", "--keys", str(tmp_path / "keys"))
    first = dev.wait_for(topics.commands(device_uuid), timeout=10)
    cid = first.json()["command_id"]
    broker.kill()
    p.wait_line(r"connection to the broker lost")
    broker.start()
    dev.connect()
    dev.subscribe(topics.commands(device_uuid))
    again = dev.wait_for(topics.commands(device_uuid), lambda m: m.json()["command_id"] == cid, timeout=20)
    assert again.payload == first.payload
    assert user_properties(again) == [("signature", signing.sign(key, again.payload))]
    finish(dev, device_uuid, again)
    assert p.wait(20) == 0, p.stdout + p.stderr


def test_without_a_key_file_it_sends_unsigned_and_says_so_in_one_line(ctl, device, device_uuid, tmp_path):
    (tmp_path / "keys").mkdir()
    write_key(tmp_path / "keys", str(uuidlib.uuid4()))  # another device's key is never used
    p = ctl("send", "reboot", "--device", device_uuid, "--wait", "--keys", str(tmp_path / "keys"))
    msg = device.wait_for(topics.commands(device_uuid), timeout=10)
    assert user_properties(msg) == []
    finish(device, device_uuid, msg)
    assert p.wait(10) == 0, p.stdout + p.stderr
    notes = [l for l in p.err if "unsigned" in l]
    assert notes == [f"infoscreenctl send: note: no command key {tmp_path / 'keys' / (device_uuid + '.key')}: "
                     "the command is sent unsigned (a device that has a command key refuses it: signature_invalid)"]
    assert p.stdout.splitlines()[1].endswith(", unsigned")


def test_no_key_directory_configured_sends_unsigned_with_one_note(ctl_raw, broker, device, device_uuid, tmp_path):
    env_file = tmp_path / "server.env"
    env_file.write_text("\n".join(l for l in broker.server_env_path.read_text().splitlines()
                                  if not l.startswith("INFOSCREEN_COMMAND_KEYS=")) + "\n")
    env_file.chmod(0o600)
    p = ctl_raw("send", "reboot", "--device", device_uuid, "--wait", "--env", str(env_file),
                env={"INFOSCREEN_COMMAND_KEYS": ""})
    msg = device.wait_for(topics.commands(device_uuid), timeout=10)
    assert user_properties(msg) == []
    finish(device, device_uuid, msg)
    assert p.wait(10) == 0, p.stdout + p.stderr
    assert len([l for l in p.err if "sent unsigned" in l]) == 1
    assert "no command key directory" in p.stderr


def test_unsigned_option_sends_no_signature_even_with_a_key(ctl, device, device_uuid, tmp_path):
    write_key(tmp_path / "keys", device_uuid)
    p = ctl("send", "reboot", "--device", device_uuid, "--wait", "--keys", str(tmp_path / "keys"), "--unsigned")
    msg = device.wait_for(topics.commands(device_uuid), timeout=10)
    assert user_properties(msg) == []
    finish(device, device_uuid, msg)
    assert p.wait(10) == 0
    assert len([l for l in p.err if "--unsigned" in l]) == 1


SECRETISH = "f" * 63 + "Z"  # looks like a key; must never be echoed


@pytest.mark.parametrize("content", [
    SECRETISH.encode(),
    ("A" * 64 + "\n").encode(),  # upper case
    ("a" * 63 + "\n").encode(),
    ("a" * 64 + "\n\n").encode(),
    ("a" * 64 + " ").encode(),
    b"",
    b"\xff" * 64,
    ("a" * 64 + "\n").encode() * 100,
])
def test_a_malformed_key_file_is_an_error_and_nothing_is_sent(ctl, device, device_uuid, tmp_path, content):
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / f"{device_uuid}.key").write_bytes(content)
    (keys / f"{device_uuid}.key").chmod(0o600)
    p = ctl("send", "reboot", "--device", device_uuid, "--wait", "--keys", str(keys))
    assert p.wait(10) == 2
    assert p.err == [f"infoscreenctl send: error: command key {keys / (device_uuid + '.key')} is malformed: "
                     "it must be 64 lower-case hex characters (and an optional newline)"]
    assert p.stdout == ""
    text = content.decode("latin-1").strip()
    if text:
        assert text[:32] not in p.stderr
    device.assert_nothing(topics.commands(device_uuid), within=0.3)


@pytest.mark.parametrize("kind", ["directory", "fifo", "missing dir", "dir is a file"])
def test_an_unreadable_key_file_or_missing_key_dir_is_an_error(ctl, device, device_uuid, tmp_path, kind):
    import os

    keys = tmp_path / "keys"
    path = keys / f"{device_uuid}.key"
    if kind == "directory":
        path.mkdir(parents=True)
    elif kind == "fifo":
        keys.mkdir()
        os.mkfifo(path)  # opening it for reading would block: it must not
    elif kind == "dir is a file":
        keys.write_text("x")
    p = ctl("send", "reboot", "--device", device_uuid, "--wait", "--keys", str(keys))
    assert p.wait(10) == 2
    (line,) = p.err
    assert line.startswith("infoscreenctl send: error: ")
    if kind in ("directory", "fifo"):
        assert line.endswith(f"command key {path}: not a regular file")
    else:
        assert "the command key directory" in line and "does not exist" in line
    device.assert_nothing(topics.commands(device_uuid), within=0.3)


def test_a_key_readable_by_others_is_warned_about(ctl, device, device_uuid, tmp_path):
    key = write_key(tmp_path / "keys", device_uuid)
    (tmp_path / "keys" / f"{device_uuid}.key").chmod(0o644)
    p = ctl("send", "reboot", "--device", device_uuid, "--wait", "--keys", str(tmp_path / "keys"))
    msg = device.wait_for(topics.commands(device_uuid), timeout=10)
    assert user_properties(msg) == [("signature", signing.sign(key, msg.payload))]
    finish(device, device_uuid, msg)
    assert p.wait(10) == 0
    assert "is accessible to other users (mode 0644); chmod 600 it" in p.stderr
