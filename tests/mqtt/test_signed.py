"""Signed power commands through the MQTT worker: the payload bytes and the `signature` property
reach the supervisor unchanged, a keyed device refuses a command without a signature at once,
and the whole tree with the real helper holding a key executes only what the key signed."""

from __future__ import annotations

import shutil
import uuid as uuidlib

from infoscreen.ipc import messages
from infoscreen.wire import signing
from tests.support.waiting import wait_until

from .conftest import Server

KEY = bytes(range(32))


def _key_file(path):
    path.write_text(signing.key_text(KEY))
    path.chmod(0o600)
    return path


def test_payload_and_signature_travel_unchanged_to_the_supervisor(mqtt_worker, server, tmp_path):
    w = mqtt_worker(HELPER_COMMAND_KEY_FILE=str(_key_file(tmp_path / "command.key")))
    srv = server(w)
    cid = srv.command(w.uuid, "shutdown_host", key=KEY, reason="weekly power-off")
    srv.wait_ack(w.uuid, cid, "completed")
    [req] = w.sup.exec_requests(cid)
    assert req.payload == srv.last_payload   # the bytes as published
    assert req.signature == signing.sign(KEY, srv.last_payload)


def test_a_keyed_device_refuses_an_unsigned_command_at_once(mqtt_worker, server, tmp_path):
    w = mqtt_worker(HELPER_COMMAND_KEY_FILE=str(_key_file(tmp_path / "command.key")))
    srv = server(w)
    for signature in (None, "hmac-sha256=short", "sha1=" + "0" * 40):
        cid = srv.command(w.uuid, "reboot_host", signature=signature)
        ack = srv.wait_ack(w.uuid, cid, "failed", code="signature_invalid")
        assert "signature" in ack["error_message"]
        srv.wait_ack(w.uuid, cid, "failed", topic="command/ack", code="signature_invalid")
        assert srv.statuses(w.uuid, cid) == ["failed"] and w.sup.exec_requests(cid) == []


def test_a_wrong_signature_is_the_helpers_to_refuse(mqtt_worker, server, tmp_path):
    """A well-formed but wrong signature reaches the helper, which alone can tell."""
    w = mqtt_worker(HELPER_COMMAND_KEY_FILE=str(_key_file(tmp_path / "command.key")))
    w.sup.on_exec = lambda r: messages.ExecResult(command_id=r.command_id, action=r.action, known=True, ok=False,
                                                  error_code="signature_invalid", error_message="missing or wrong signature")
    srv = server(w)
    cid = srv.command(w.uuid, "reboot_host", key=b"\x07" * 32)
    srv.wait_ack(w.uuid, cid, "failed", code="signature_invalid")
    assert srv.statuses(w.uuid, cid) == ["accepted", "execution_started", "failed"]


def test_health_reports_whether_commands_are_signed(mqtt_worker, server, tmp_path):
    from tests.mqtt.test_groups_acl import health_report
    for keyed, expected in ((False, "unsigned"), (True, "signed")):
        path = tmp_path / f"k{keyed}"
        if keyed:
            _key_file(path)
        w = mqtt_worker(HELPER_COMMAND_KEY_FILE=str(path))
        srv = server(w)
        srv.subscribe(f"infoscreen/{w.uuid}/health")
        w.sup.send(health_report())
        assert srv.wait_for(f"infoscreen/{w.uuid}/health").json()["command_auth"] == expected
        w.stop()


def _server(broker, uuid) -> Server:
    """The server account, once the device's worker is connected and subscribed: READY means
    the workers are up, not that the first connection to the broker is made."""
    s = Server(broker.host, broker.port, username=broker.server_user, password=broker.server_password)
    s.connect()
    s.subscribe(f"infoscreen/{uuid}/heartbeat")
    s.wait_for(f"infoscreen/{uuid}/heartbeat", timeout=15)
    return s.watch(uuid)


def _keyed_tree(tree_factory, broker, device_uuid, tmp_path):
    """The whole tree, its helper holding the device's key (and the client seeing it exists)."""
    key = _key_file(tmp_path / "command.key")
    tree = tree_factory(broker, device_uuid, env={"HELPER_COMMAND_KEY_FILE": str(key)})
    tree.helper.env["HELPER_COMMAND_KEY_FILE"] = str(key)
    return tree.start()


def test_the_tree_with_a_keyed_helper_runs_only_signed_commands_once(broker, device_uuid, tree_factory, tmp_path):
    tree = _keyed_tree(tree_factory, broker, device_uuid, tmp_path)
    srv = _server(broker, device_uuid)
    try:
        ok = srv.command(device_uuid, "shutdown_host", key=KEY)
        captured = srv.last_payload
        srv.wait_ack(device_uuid, ok, "completed", timeout=10)
        wrong = srv.command(device_uuid, "reboot_host", key=b"\x01" * 32)
        ack = srv.wait_ack(device_uuid, wrong, "failed", code="signature_invalid", timeout=10)
        unsigned = srv.command(device_uuid, "reboot_host")
        srv.wait_ack(device_uuid, unsigned, "failed", code="signature_invalid", timeout=10)
        assert "signature" in ack["error_message"]
        # A replay of the captured bytes and signature that gets past the worker (its state wiped,
        # as by a reinstall) reaches the helper, which refuses it from its own replay store.
        tree.stop()
        shutil.rmtree(tree.state)
        tree.start()
        srv.clear()
        srv.publish(f"infoscreen/{device_uuid}/commands", captured,
                    user_properties=[("signature", signing.sign(KEY, captured))])
        ack = srv.wait_ack(device_uuid, ok, "failed", code="helper_rejected", timeout=15)
        assert ack["error_message"].startswith("replayed")
        text = tree.helper.log_text()
        assert text.count('"event": "mock_exec"') == 2   # one command: pre-flight and action
    finally:
        srv.close()


def test_a_signed_retained_command_runs_once_across_both_topics(broker, device_uuid, tree_factory, tmp_path):
    tree = _keyed_tree(tree_factory, broker, device_uuid, tmp_path)
    srv = _server(broker, device_uuid)
    try:
        cid = str(uuidlib.uuid4())
        for topic in ("commands", "command"):
            srv.command(device_uuid, "shutdown_host", key=KEY, topic=topic, command_id=cid)
        srv.wait_ack(device_uuid, cid, "completed", timeout=10)
        wait_until(lambda: srv.statuses(device_uuid, cid).count("completed") >= 1, 5)
        assert tree.helper.log_text().count('"event": "mock_exec"') == 2
    finally:
        srv.close()
