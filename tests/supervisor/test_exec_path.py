"""Power commands end to end through the tree: server -> broker -> MQTT worker -> supervisor ->
helper (real process, mock backend) and back as acks; helper down or stalled."""

from __future__ import annotations

import signal
import time

from tests.support.commands import send, statuses


def test_a_command_reaches_the_helper_and_its_outcome_comes_back(running, device_uuid):
    tree, srv = running
    cid = send(srv, device_uuid, "shutdown_host")
    acks = statuses(srv, device_uuid, cid, {"completed", "failed"})
    assert [a["status"] for a in acks] == ["accepted", "execution_started", "completed"]
    audit = [line for line in tree.helper.log_text().splitlines() if cid in line]
    assert audit and '"outcome": "ok"' in audit[-1] and "/usr/bin/systemctl" in audit[-1]


def test_helper_stopped_gives_helper_unavailable(running, device_uuid):
    tree, srv = running
    tree.helper.stop()
    cid = send(srv, device_uuid)
    acks = statuses(srv, device_uuid, cid, {"completed", "failed"})
    assert acks[-1]["status"] == "failed" and acks[-1]["error_code"] == "helper_unavailable"
    assert [a["status"] for a in acks[:2]] == ["accepted", "execution_started"]


def test_helper_stalled_gives_helper_timeout(running, device_uuid):
    tree, srv = running
    tree.helper.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        cid = send(srv, device_uuid)
        acks = statuses(srv, device_uuid, cid, {"completed", "failed"})
        assert acks[-1]["error_code"] == "helper_timeout", acks
        assert time.monotonic() - t0 < 2 + 2  # HELPER_TIMEOUT_S=2 in the test tree
    finally:
        tree.helper.proc.send_signal(signal.SIGCONT)
    assert tree.proc.poll() is None
