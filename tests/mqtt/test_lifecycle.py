"""Full command lifecycle against the real broker: the worker process alone, the test playing
the supervisor on its real IPC socket, commands published with the server account."""

from __future__ import annotations

import json

import pytest

from infoscreen.ipc import messages
from infoscreen.wire.schema import ERROR_CODES

from .conftest import now_plus


def result(ok=True, mock=False, code=None, message=None, known=True):
    def answer(req):
        return messages.ExecResult(command_id=req.command_id, action=getattr(req, "action", None), known=known,
                                   ok=ok, mock=mock, error_code=code, error_message=message)
    return answer


def health_report(ts="2026-04-05T08:00:00Z"):
    return messages.HealthReport(
        timestamp=ts,
        actual_state=messages.DisplayState(process="display_manager", pid=1234, status="running"),
        host=messages.HostFacts(cpu_percent=1.0, memory_percent=2.0, disk_percent=3.0, temperature_c=None,
                                uptime_s=10.0, boot_id="b"),
    )


def test_reboot_mock_completes_on_both_topics(mqtt_worker, server):
    w = mqtt_worker()
    srv = server(w)
    cid = srv.command(w.uuid, "reboot_host")
    for topic in ("commands/ack", "command/ack"):
        srv.wait_ack(w.uuid, cid, "completed", topic=topic)
        assert srv.statuses(w.uuid, cid, topic) == ["accepted", "execution_started", "completed"]
    assert srv.acks(w.uuid, cid)[-1] == {"command_id": cid, "status": "completed", "error_code": None,
                                         "error_message": None}
    assert len(w.sup.exec_requests(cid)) == 1
    assert w.sup.exec_requests(cid)[0].action == "reboot_host"


def test_config_mock_mode_completes_without_mock_flag(mqtt_worker, server):
    w = mqtt_worker(start=False, COMMAND_MOCK_REBOOT_IMMEDIATE_COMPLETE="1")
    w.sup.on_exec = result(ok=True, mock=False)
    w.start()
    srv = server(w)
    cid = srv.command(w.uuid, "reboot_host")
    srv.wait_ack(w.uuid, cid, "completed")


def test_real_reboot_completes_only_after_a_new_boot(mqtt_worker, server):
    w = mqtt_worker(start=False, REBOOT_GRACE_S="60")
    w.sup.on_exec = result(ok=True, mock=False)  # the helper scheduled it; nothing happens here
    w.start()
    srv = server(w)
    cid = srv.command(w.uuid, "reboot_host")
    srv.wait_ack(w.uuid, cid, "execution_started")
    srv.wait_ack(w.uuid, cid, "execution_started", topic="command/ack")
    w.sup.wait_for(lambda m: isinstance(m, messages.ExecRequest) and m.command_id == cid)
    old_boot = w.boot_id_file.read_text().strip()
    assert srv.statuses(w.uuid, cid) == ["accepted", "execution_started"]
    # The "reboot": the process dies, the boot id changes, the worker starts again.
    w.kill()
    new_boot = w.new_boot()
    w.start()
    srv.wait_ack(w.uuid, cid, "completed")
    srv.wait_ack(w.uuid, cid, "completed", topic="command/ack")
    assert len(w.sup.exec_requests(cid)) == 1  # never requested again
    # Evidence in health.
    srv.subscribe(f"infoscreen/{w.uuid}/health")
    w.sup.send(health_report())
    h = srv.wait_for(f"infoscreen/{w.uuid}/health").json()
    lp = h["last_power_command"]
    assert lp["command_id"] == cid and lp["action"] == "reboot_host" and lp["status"] == "completed"
    assert lp["boot_id_before"] == old_boot and lp["boot_id_after"] == new_boot
    assert isinstance(lp["seconds_to_reconnect"], float)


def test_reboot_not_observed_after_grace(mqtt_worker, server):
    w = mqtt_worker(start=False, REBOOT_GRACE_S="1")
    w.sup.on_exec = result(ok=True, mock=False)
    w.start()
    srv = server(w)
    cid = srv.command(w.uuid, "reboot_host")
    ack = srv.wait_ack(w.uuid, cid, "failed", timeout=10)
    assert ack["error_code"] == "reboot_not_observed"
    assert "same boot" in ack["error_message"]


def test_shutdown_completes_and_next_boot_reports_off_time(mqtt_worker, server):
    w = mqtt_worker(start=False)
    w.sup.on_exec = result(ok=True, mock=False)
    w.start()
    srv = server(w)
    srv.subscribe(f"infoscreen/{w.uuid}/logs/info")
    cid = srv.command(w.uuid, "shutdown_host")
    srv.wait_ack(w.uuid, cid, "completed")
    assert srv.statuses(w.uuid, cid) == ["accepted", "execution_started", "completed"]
    w.kill()
    w.new_boot()
    w.start()
    msg = srv.wait_for(f"infoscreen/{w.uuid}/logs/info",
                       lambda m: cid in m.json().get("message", ""), timeout=10).json()
    assert "powered off by command" in msg["message"] and "shutdown_host" in msg["message"]
    assert len(w.sup.exec_requests(cid)) == 1


CRAFTED = {
    "invalid_payload": {"action": 42},
    "unsupported_action": {"action": "format_disk"},
    "unsupported_schema": {"schema_version": "2.0"},
    "target_mismatch": {"client_uuid": "00000000-0000-4000-8000-000000000000"},
    "expired": {"expires_at": now_plus(-60)},
}


@pytest.mark.parametrize("code", sorted(CRAFTED))
def test_crafted_payload_gets_its_code(mqtt_worker, server, code):
    w = mqtt_worker()
    srv = server(w)
    extra = dict(CRAFTED[code])
    if code == "expired":
        extra["expires_at"] = now_plus(-60)
        extra["issued_at"] = now_plus(-120)
    cid = srv.command(w.uuid, **extra)
    ack = srv.wait_ack(w.uuid, cid, "failed")
    assert ack["error_code"] == code and ack["error_message"]
    srv.wait_ack(w.uuid, cid, "failed", topic="command/ack")
    assert srv.statuses(w.uuid, cid) == ["failed"]
    assert w.sup.exec_requests(cid) == []


def test_missing_field_and_bad_timestamp_are_invalid_payload(mqtt_worker, server):
    w = mqtt_worker()
    srv = server(w)
    cid = srv.command(w.uuid, expires_at=None)
    assert srv.wait_ack(w.uuid, cid, "failed")["error_code"] == "invalid_payload"
    cid2 = srv.command(w.uuid, expires_at="tomorrow")
    assert srv.wait_ack(w.uuid, cid2, "failed")["error_code"] == "invalid_payload"
    cid3 = srv.command(w.uuid, expires_at=now_plus(30 * 86400))  # absurdly far ahead
    assert srv.wait_ack(w.uuid, cid3, "failed")["error_code"] == "invalid_payload"


@pytest.mark.parametrize("code", ["helper_unavailable", "helper_timeout", "helper_rejected", "execution_failed"])
def test_helper_codes_from_exec_result(mqtt_worker, server, code):
    w = mqtt_worker(start=False)
    w.sup.on_exec = result(ok=False, code=code, message=f"{code} details")
    w.start()
    srv = server(w)
    cid = srv.command(w.uuid, "shutdown_host")
    ack = srv.wait_ack(w.uuid, cid, "failed")
    assert ack == {"command_id": cid, "status": "failed", "error_code": code, "error_message": f"{code} details"}
    assert srv.statuses(w.uuid, cid) == ["accepted", "execution_started", "failed"]


def test_busy_while_another_executes(mqtt_worker, server):
    w = mqtt_worker(start=False, REBOOT_GRACE_S="60", HELPER_TIMEOUT_S="30")
    w.sup.on_exec = lambda r: None  # the first one stays in execution
    w.start()
    srv = server(w)
    first = srv.command(w.uuid, "shutdown_host")
    srv.wait_ack(w.uuid, first, "execution_started")
    second = srv.command(w.uuid, "reboot_host")
    ack = srv.wait_ack(w.uuid, second, "failed")
    assert ack["error_code"] == "busy" and first in ack["error_message"]
    assert [r.command_id for r in w.sup.exec_requests()] == [first]
    w.sup.send(messages.ExecResult(command_id=first, action="shutdown_host", known=True, ok=True, mock=True))
    srv.wait_ack(w.uuid, first, "completed")


def test_all_documented_codes_are_reachable():
    reached = set(CRAFTED) | {"helper_unavailable", "helper_timeout", "helper_rejected", "execution_failed",
                              "busy", "reboot_not_observed",
                              "signature_invalid",  # tests/mqtt/test_signed.py
                              "internal_error"}  # tests/mqtt/test_intake.py
    assert reached == ERROR_CODES


def test_no_readable_command_id_gets_no_ack_but_a_warn_log(mqtt_worker, server):
    w = mqtt_worker()
    srv = server(w)
    srv.subscribe(f"infoscreen/{w.uuid}/logs/warn")
    srv.raw(w.uuid, b"this is not json")
    srv.raw(w.uuid, json.dumps({"action": "reboot_host", "command_id": 17}).encode())
    log1 = srv.wait_for(f"infoscreen/{w.uuid}/logs/warn", lambda m: "not JSON" in m.json()["message"]).json()
    assert log1["client_uuid"] == w.uuid and log1["level"] == "warn"
    srv.wait_for(f"infoscreen/{w.uuid}/logs/warn", lambda m: "not readable" in m.json()["message"])
    srv.assert_nothing(f"infoscreen/{w.uuid}/commands/ack", within=0.3)
    assert w.sup.exec_requests() == []


def test_heartbeat_health_and_broker_status(mqtt_worker, server, mqtt_broker):
    w = mqtt_worker()
    srv = server(w)
    srv.subscribe(f"infoscreen/{w.uuid}/heartbeat")
    srv.subscribe(f"infoscreen/{w.uuid}/health")
    hb = srv.wait_for(f"infoscreen/{w.uuid}/heartbeat", timeout=5).json()
    assert hb["client_uuid"] == w.uuid and hb["timestamp"].endswith("Z")
    w.sup.send(health_report())
    h = srv.wait_for(f"infoscreen/{w.uuid}/health").json()
    assert h["timestamp"] == "2026-04-05T08:00:00Z"
    assert h["expected_state"] == {"event_id": None}
    assert h["actual_state"] == {"process": "display_manager", "pid": 1234, "status": "running"}
    assert h["broker_connection"] == {"broker_reachable": True, "reconnect_count": 0, "last_disconnect_at": None}
    assert h["clock_synchronized"] is True and h["refused_publishes"] == 0
    assert h["host"]["cpu_percent"] == 1.0
    # A restart of the worker is a reconnect; the count survives in the state dir.
    w.kill()
    w.start()
    st = w.sup.of(messages.BrokerStatus)[-1]
    assert st.broker_reachable and st.reconnect_count == 1 and st.last_disconnect_at is not None
    # A broker outage: BrokerStatus on each change.
    mark = w.sup.count()
    mqtt_broker.stop()
    w.wait_broker(False, 10, mark)
    mqtt_broker.start()
    st = w.wait_broker(True, 15, mark)
    assert st.reconnect_count == 2


def test_a_mock_helper_never_completes_a_production_command(mqtt_worker, server):
    # A helper left in mock mode executed nothing: a production client must not say `completed`.
    w = mqtt_worker(start=False, INFOSCREEN_ENV="production")
    w.sup.on_exec = result(ok=True, mock=True)
    w.start()
    srv = server(w)
    cid = srv.command(w.uuid, "reboot_host")
    srv.wait_ack(w.uuid, cid, "failed")
    last = srv.acks(w.uuid, cid)[-1]
    assert last["error_code"] == "helper_rejected" and "mock" in last["error_message"]
