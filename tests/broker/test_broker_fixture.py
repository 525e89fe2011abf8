"""The test fixture itself: MosquittoBroker's lifecycle and MqttProbe's waiting semantics."""

from __future__ import annotations

import socket
import uuid as uuidlib

import pytest

import tests.support.broker as broker_mod
from tests.support.broker import BrokerError, MosquittoBroker
from tests.support.mqtt import NO_MATCHING_SUBSCRIBERS, SUCCESS
from tests.support.waiting import wait_process_exit


def test_port_clash_on_first_start_moves_to_another_port(tmp_path, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        real = broker_mod.free_port
        picks = iter([busy])
        monkeypatch.setattr(broker_mod, "free_port", lambda host="127.0.0.1": next(picks, None) or real(host))
        b = MosquittoBroker([str(uuidlib.uuid4())], tmp_path / "b")
        try:
            assert b.port == busy
            b.start()
            assert b.port != busy and b.running
            assert "Address already in use" in b.log_text()
        finally:
            b.stop()


def test_restart_keeps_the_port_and_fails_clearly_if_it_was_taken(tmp_path):
    b = MosquittoBroker([str(uuidlib.uuid4())], tmp_path / "b").start()
    try:
        port, pid = b.port, b.pid
        assert b.stop() == 0
        wait_process_exit(pid, timeout=1)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            with pytest.raises(BrokerError, match="Address already in use"):
                b.start()
            assert not b.running
        b.start()
        assert b.port == port
    finally:
        b.stop()


def test_kill_and_restart(broker, server_probe, device_uuid):
    probe = server_probe()
    pid = broker.pid
    broker.kill()
    wait_process_exit(pid, timeout=1)
    probe.wait_disconnected()
    assert not broker.running
    broker.start()
    probe.connect()
    assert probe.publish(f"infoscreen/{device_uuid}/commands", b"x") == NO_MATCHING_SUBSCRIBERS


def test_persistent_session_survives_a_restart(broker, device_uuid, server_probe, device_probe):
    topic = f"infoscreen/{device_uuid}/commands"
    dev = device_probe(clean_start=False, session_expiry=3600)
    dev.subscribe(topic)
    dev.close()
    broker.restart()
    assert server_probe().publish(topic, b"queued") == SUCCESS  # queued for the offline session
    dev.connect()
    assert dev.wait_for(topic).payload == b"queued"


def test_wait_for_returns_successive_messages_and_assert_nothing_fails_on_arrival(
    broker, device_uuid, server_probe, device_probe
):
    topic = f"infoscreen/{device_uuid}/commands/ack"
    server = server_probe()
    server.subscribe("infoscreen/+/commands/ack")
    dev = device_probe()
    for status in ("accepted", "execution_started", "completed"):
        dev.publish(topic, {"status": status})
    assert [server.wait_for(topic).json()["status"] for _ in range(3)] == [
        "accepted", "execution_started", "completed"]
    with pytest.raises(TimeoutError):  # each message is returned by wait_for once
        server.wait_for(topic, lambda m: m.json()["status"] == "accepted", timeout=0.05)
    with pytest.raises(AssertionError):
        server.assert_nothing("infoscreen/+/commands/ack", within=0.05)
    server.assert_nothing("infoscreen/+/health", within=0.05)
    assert len(server.messages(topic)) == 3
    assert broker.device_env(device_uuid)["MQTT_USER"] == broker.device_user(device_uuid)
