"""What survives what: duplicates, broker outages, SIGKILL at each step of the lifecycle."""

from __future__ import annotations

import time
import uuid as uuidlib

import pytest

from infoscreen.ipc import messages
from tests.support.mqtt import MqttProbe
from tests.support.waiting import wait_until

from .conftest import Server


def known_if_requested(w):
    """The supervisor's answer to ExecQuery: the outcome if it got the request, else known=False."""
    def answer(q):
        if w.sup.exec_requests(q.command_id):
            return messages.ExecResult(command_id=q.command_id, action=None, known=True, ok=True, mock=True)
        return messages.ExecResult(command_id=q.command_id, action=None, known=False)
    return answer


def persistent_server(broker, w) -> Server:
    """A server client with a persistent session: it gets what was published while it was away."""
    s = Server(broker.host, broker.port, username=broker.server_user, password=broker.server_password,
               client_id=f"srv-{uuidlib.uuid4().hex[:8]}", clean_start=False, session_expiry=600)
    s.connect()
    s.watch(w.uuid)
    return s


def test_same_command_on_both_topics_runs_once(mqtt_worker, server):
    w = mqtt_worker()
    srv = server(w)
    cid = srv.command(w.uuid, "reboot_host", topic="commands")
    srv.wait_ack(w.uuid, cid, "completed")
    srv.command(w.uuid, "reboot_host", topic="command", command_id=cid)
    # Answered again with its latest status, on both topics; never executed again.
    srv.wait_ack(w.uuid, cid, "completed")
    srv.wait_ack(w.uuid, cid, "completed", topic="command/ack")
    assert len(w.sup.exec_requests(cid)) == 1
    assert srv.statuses(w.uuid, cid) == ["accepted", "execution_started", "completed", "completed"]


def test_duplicate_while_executing_is_answered_with_latest_status(mqtt_worker, server):
    w = mqtt_worker(start=False, HELPER_TIMEOUT_S="30")
    w.sup.on_exec = lambda r: None
    w.start()
    srv = server(w)
    cid = srv.command(w.uuid, "shutdown_host")
    srv.wait_ack(w.uuid, cid, "execution_started")
    srv.wait_ack(w.uuid, cid, "execution_started", topic="command/ack")
    srv.command(w.uuid, "shutdown_host", topic="command", command_id=cid)
    srv.wait_ack(w.uuid, cid, "execution_started")  # the second one
    assert len(w.sup.exec_requests(cid)) == 1


def test_redelivery_after_reconnect_runs_once(mqtt_worker, server, mqtt_broker):
    w = mqtt_worker()
    srv = persistent_server(mqtt_broker, w)
    cid = srv.command(w.uuid, "reboot_host")
    srv.wait_ack(w.uuid, cid, "completed")
    mark = w.sup.count()
    mqtt_broker.stop()
    w.wait_broker(False, 10, mark)
    mqtt_broker.start()
    w.wait_broker(True, 15, mark)
    srv.connect()
    srv.command(w.uuid, "reboot_host", command_id=cid)
    wait_until(lambda: srv.statuses(w.uuid, cid).count("completed") >= 2, 10, what="second answer")
    assert len(w.sup.exec_requests(cid)) == 1


def test_retained_command_after_simulated_reboot_runs_once(mqtt_worker, server, mqtt_broker):
    w = mqtt_worker()
    srv = server(w)
    cid = srv.command(w.uuid, "reboot_host", retain=True)
    srv.wait_ack(w.uuid, cid, "completed")
    w.kill()
    # The broker forgets the device's session (expired while the screen was off), so the new
    # subscription gets the retained command again.
    dev = MqttProbe(mqtt_broker.host, mqtt_broker.port, username=mqtt_broker.device_user(w.uuid),
                    password=mqtt_broker.device_password(w.uuid), client_id=w.uuid, clean_start=True,
                    session_expiry=0)
    dev.connect()
    dev.close()
    w.new_boot()
    w.start()
    wait_until(lambda: srv.statuses(w.uuid, cid).count("completed") >= 2, 10, what="answer to the retained copy")
    assert len(w.sup.exec_requests(cid)) == 1
    srv.publish(f"infoscreen/{w.uuid}/commands", b"", retain=True)  # clear the retained command


def test_broker_outage_after_accepted_remaining_acks_arrive(mqtt_worker, mqtt_broker):
    w = mqtt_worker(start=False, HELPER_TIMEOUT_S="30")
    w.sup.on_exec = lambda r: None  # the result comes during the outage
    w.start()
    srv = persistent_server(mqtt_broker, w)
    expires_at = time.time() + 20
    cid = srv.command(w.uuid, "shutdown_host", expires_in=20)
    srv.wait_ack(w.uuid, cid, "execution_started")
    srv.wait_ack(w.uuid, cid, "execution_started", topic="command/ack")
    mark = w.sup.count()
    mqtt_broker.stop()
    w.wait_broker(False, 10, mark)
    w.sup.send(messages.ExecResult(command_id=cid, action="shutdown_host", known=True, ok=True, mock=True))
    wait_until(lambda: "completed" in w.log_text(), 5, what="completed committed offline")
    mqtt_broker.start()
    srv.connect()
    srv.wait_ack(w.uuid, cid, "completed", timeout=15)
    srv.wait_ack(w.uuid, cid, "completed", topic="command/ack", timeout=15)
    assert time.time() < expires_at - 1
    assert srv.statuses(w.uuid, cid)[-1] == "completed"


def test_ack_of_command_expired_during_outage_never_arrives(mqtt_worker, mqtt_broker):
    w = mqtt_worker(start=False, HELPER_TIMEOUT_S="30")
    w.sup.on_exec = lambda r: None
    w.start()
    srv = persistent_server(mqtt_broker, w)
    cid = srv.command(w.uuid, "shutdown_host", expires_in=2)
    srv.wait_ack(w.uuid, cid, "execution_started")
    srv.wait_ack(w.uuid, cid, "execution_started", topic="command/ack")
    expires_at = time.time() + 2
    mark = w.sup.count()
    mqtt_broker.stop()
    w.wait_broker(False, 10, mark)
    w.sup.send(messages.ExecResult(command_id=cid, action="shutdown_host", known=True, ok=True, mock=True))
    wait_until(lambda: "completed" in w.log_text(), 5, what="completed committed offline")
    # The outage outlasts the command's expires_at (second precision: +1 s margin).
    wait_until(lambda: time.time() > expires_at + 1.0, 6, what="the command's expiry")
    mark = w.sup.count()
    srv.clear()
    mqtt_broker.start()
    srv.connect()
    w.wait_broker(True, 15, mark)
    # Synchronise on the worker's own publication after reconnecting: a heartbeat.
    srv.subscribe(f"infoscreen/{w.uuid}/heartbeat")
    srv.wait_for(f"infoscreen/{w.uuid}/heartbeat", timeout=5)
    # (The server's own session may get an older ack again from the broker: at-least-once.)
    with pytest.raises(TimeoutError):
        srv.wait_for(f"infoscreen/{w.uuid}/+/ack", lambda m: m.json()["status"] == "completed", timeout=0.5)
    assert "completed" not in srv.statuses(w.uuid, cid)
    assert "completed" not in srv.statuses(w.uuid, cid, "command/ack")
    wait_until(lambda: "the command expired" in w.log_text(), 5, what="drop logged")


@pytest.mark.parametrize("point", ["after_commit", "after_publish", "after_exec_request", "before_puback"])
@pytest.mark.parametrize("action", ["reboot_host", "shutdown_host"])
def test_sigkill_at_each_step_never_executes_twice(mqtt_worker, mqtt_broker, point, action):
    w = mqtt_worker(start=False, INFOSCREEN_TEST_CRASHPOINT=point, REBOOT_GRACE_S="2")
    w.sup.on_query = known_if_requested(w)
    w.start()
    srv = persistent_server(mqtt_broker, w)
    cid = srv.command(w.uuid, action, expires_in=60)
    assert w.proc.wait(10) == -9  # died by SIGKILL at the crash point
    del w.env["INFOSCREEN_TEST_CRASHPOINT"]
    w.start()
    terminal = wait_until(lambda: next((a for a in srv.acks(w.uuid, cid) if a["status"] in ("completed", "failed")),
                                       None), 15, what="terminal ack")
    assert len(w.sup.exec_requests(cid)) <= 1
    assert w.sup.exec_requests(cid) or terminal["status"] == "failed"
    if point in ("after_commit", "after_publish"):  # never requested: it must not be reported as done
        assert w.sup.exec_requests(cid) == []
        assert terminal["error_code"] == ("reboot_not_observed" if action == "reboot_host" else "execution_failed")
    # Order per topic: accepted and execution_started precede the terminal ack.
    for topic in ("commands/ack", "command/ack"):
        wait_until(lambda: any(a["status"] == terminal["status"] for a in srv.acks(w.uuid, cid, topic)), 10)
        st = srv.statuses(w.uuid, cid, topic)
        first_terminal = st.index(terminal["status"])
        assert "accepted" in st[:first_terminal] and "execution_started" in st[:first_terminal], st
    assert w.sup.of(messages.ExecQuery) or point == "before_puback"
