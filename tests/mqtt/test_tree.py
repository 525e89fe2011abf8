"""The MQTT worker under the real supervisor with the real helper (mock mode): the whole path."""

from __future__ import annotations

import os
import signal

from tests.support.waiting import wait_until

from .conftest import Server


def _server(broker, uuid) -> Server:
    s = Server(broker.host, broker.port, username=broker.server_user, password=broker.server_password)
    s.connect()
    return s.watch(uuid)


def test_commands_through_the_whole_tree(broker, device_uuid, tree_factory):
    tree = tree_factory(broker, device_uuid).start()
    # READY says the workers are up, not that the first connection to the broker is made: a
    # command published before the worker subscribed would reach nobody.
    tree.notify.wait_status(lambda s: "broker=connected" in s, timeout=15)
    srv = _server(broker, device_uuid)
    try:
        srv.subscribe(f"infoscreen/{device_uuid}/health")
        for action in ("reboot_host", "shutdown_host"):
            cid = srv.command(device_uuid, action)
            srv.wait_ack(device_uuid, cid, "completed", timeout=10)
            srv.wait_ack(device_uuid, cid, "completed", topic="command/ack", timeout=10)
            assert srv.statuses(device_uuid, cid) == ["accepted", "execution_started", "completed"]
        h = srv.wait_for(f"infoscreen/{device_uuid}/health", timeout=10).json()
        assert h["broker_connection"]["broker_reachable"] is True
        assert set(h["actual_state"]) == {"process", "pid", "status"}
        assert h["last_power_command"]["action"] == "shutdown_host"
        # SIGKILL of the MQTT worker: the supervisor replaces it; the same command is not run again.
        pid = tree.worker_pid("mqtt")
        os.kill(pid, signal.SIGKILL)
        tree.wait_running("mqtt", after_pid=pid)
        srv.command(device_uuid, "shutdown_host", command_id=cid)
        wait_until(lambda: srv.statuses(device_uuid, cid).count("completed") >= 2, 10, what="duplicate answered")
        assert tree.log_text().count(f"for command {cid}") == 1
        srv.clear()
        h = srv.wait_for(f"infoscreen/{device_uuid}/health", timeout=10).json()
        assert h["broker_connection"]["reconnect_count"] >= 1
    finally:
        srv.close()
