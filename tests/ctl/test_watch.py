"""`infoscreenctl watch`: the JSON stream and plain lines from real messages on a real broker, and
the fleet state (silence heuristic, table) driven directly."""

from __future__ import annotations

import json
import re

from infoscreen.ctl.watch import Fleet, render_table
from infoscreen.wire import topics


def heartbeat(uuid: str) -> dict:
    return {"timestamp": "2026-04-05T08:00:00Z", "client_uuid": uuid}


def health(reconnects: int = 2) -> dict:
    return {
        "timestamp": "2026-04-05T08:00:00Z",
        "expected_state": {"event_id": 42},
        "actual_state": {"process": "display_manager", "pid": 1234, "status": "running"},
        "broker_connection": {"broker_reachable": True, "reconnect_count": reconnects,
                              "last_disconnect_at": "2026-04-04T10:30:00Z"},
    }


def test_json_sees_a_heartbeat(ctl, device_probe, device_uuid):
    p = ctl("watch", "--json", "--once")
    p.wait_err(r"^watching infoscreen/\+/heartbeat, infoscreen/\+/health, infoscreen/\+/service_failed as ")
    dev = device_probe()
    dev.publish(topics.heartbeat(device_uuid), heartbeat(device_uuid))
    assert p.wait(10) == 0, p.stderr
    (line,) = p.stdout.splitlines()
    ev = json.loads(line)
    assert ev["event"] == "heartbeat"
    assert ev["device"] == device_uuid
    assert ev["topic"] == topics.heartbeat(device_uuid)
    assert ev["payload"] == heartbeat(device_uuid)
    assert ev["retained"] is False
    assert ev["row"]["heartbeat_age_s"] >= 0
    assert ev["row"]["heartbeat_timestamp"] == "2026-04-05T08:00:00Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ev["received_at"])


def test_json_health_and_alert_fill_the_row(ctl, device_probe, device_uuid, other_device_uuid):
    other = device_probe(other_device_uuid)
    other.publish(topics.service_failed(other_device_uuid),
                  {"event": "service_failed", "unit": "infoscreen-simclient.service",
                   "client_uuid": other_device_uuid, "failed_at": "2026-04-05T08:00:00Z"}, retain=True)
    p = ctl("watch", "--json", "--count", "3")
    first = json.loads(p.wait_line(r"service_failed"))  # the retained alert arrives at once
    assert first["event"] == "service_failed" and first["retained"] is True
    assert first["row"]["service_failed"]["unit"] == "infoscreen-simclient.service"
    dev = device_probe()
    dev.publish(topics.heartbeat(device_uuid), heartbeat(device_uuid))
    dev.publish(topics.health(device_uuid), health(3))
    assert p.wait(10) == 0
    events = [json.loads(l) for l in p.stdout.splitlines()]
    assert [e["event"] for e in events] == ["service_failed", "heartbeat", "health"]
    row = events[-1]["row"]
    assert row["display"] == "running" and row["display_pid"] == 1234
    assert row["reconnect_count"] == 3 and row["broker_reachable"] is True
    assert row["last_disconnect_at"] == "2026-04-04T10:30:00Z"


def test_plain_lines_when_not_a_terminal(ctl, device_probe, device_uuid):
    p = ctl("watch", "--device", device_uuid, "--count", "1")
    p.wait_err(rf"^watching infoscreen/{device_uuid}/heartbeat, ")
    device_probe().publish(topics.health(device_uuid), health(5))
    assert p.wait(10) == 0
    line = p.stdout.strip()
    assert "\x1b[" not in line  # no ANSI on a pipe
    assert re.fullmatch(rf"\d\d:\d\d:\d\d health {device_uuid} heartbeat_age=- display=running "
                        r"broker_reachable=yes reconnects=5 last_disconnect=2026-04-04T10:30:00Z", line)


def test_duration_ends_a_quiet_watch(ctl):
    p = ctl("watch", "--json", "--duration", "0.3")
    assert p.wait(10) == 0
    assert p.stdout == ""


def test_watch_resubscribes_after_a_broker_restart(ctl, broker, device_probe, device_uuid):
    p = ctl("watch", "--json")
    p.wait_err(r"^watching ")
    broker.stop()
    p.wait_line(r'"event":"broker_disconnected"')
    broker.start()
    p.wait_line(r'"event":"broker_reconnected"', timeout=20)
    dev = device_probe()
    # the watcher resubscribed when it reconnected; publish until it shows (its SUBACK may still be
    # on the way): each publish is a round trip, and the first heartbeat seen ends the wait
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        dev.publish(topics.heartbeat(device_uuid), heartbeat(device_uuid))
        try:
            p.wait_line(r'"event":"heartbeat"', timeout=0.2)
            break
        except TimeoutError:
            continue
    line = p.wait_line(r'"event":"heartbeat"', timeout=0.1)
    assert json.loads(line)["device"] == device_uuid


# ---- the fleet state and the table (no broker) -------------------------------------------------------


def test_silence_heuristic_one_device_vs_all():
    fleet = Fleet(stale_after=90)
    a, b = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
    fleet.apply(topics.heartbeat(a), json.dumps(heartbeat(a)).encode(), at=1000.0)
    fleet.apply(topics.heartbeat(b), json.dumps(heartbeat(b)).encode(), at=1050.0)
    assert fleet.newly_silent(1100.0) == [fleet.rows[a]]
    assert "1 of 2 devices silent: a fault on those devices" in fleet.verdict()
    assert [r.device for r in fleet.newly_silent(1141.0)] == [b]
    assert fleet.all_silent()
    assert fleet.verdict().startswith("ALL 2 devices silent: likely a broker or network outage")
    # a heartbeat brings the device back
    fleet.apply(topics.heartbeat(a), json.dumps(heartbeat(a)).encode(), at=1150.0)
    assert not fleet.rows[a].silent and not fleet.all_silent()


def test_alert_cleared_by_empty_payload_and_table_render():
    fleet = Fleet()
    d = "33333333-3333-4333-8333-333333333333"
    fleet.apply(topics.health(d), json.dumps(health(1)).encode(), at=10.0)
    fleet.apply(topics.service_failed(d), b'{"unit": "x.service", "failed_at": "2026-04-05T08:00:00Z"}', at=10.0)
    table = render_table(fleet, 12.0, connected=False, since=5.0)
    assert "not connected to the broker for 7 s" in table
    assert re.search(rf"{d}\s+-\s+running \(pid 1234\)\s+yes\s+1\s+2026-04-04T10:30:00Z\s+x.service at 2026", table)
    event = fleet.apply(topics.service_failed(d), b"", at=11.0)
    assert event is not None and event.event == "service_failed_cleared"
    assert fleet.rows[d].alert is None
    assert fleet.apply("infoscreen/events/g1", b"{}", at=1.0) is None


def test_on_a_terminal_the_table_is_redrawn_in_place(broker, device_probe, device_uuid):
    """Under a real pseudo-terminal, `watch` draws its table with ANSI cursor control."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "infoscreen.ctl.cli", "watch", "--duration", "4", "--env", str(broker.server_env_path)],
        stdin=subprocess.DEVNULL, stdout=secondary, stderr=subprocess.PIPE,
    )
    os.close(secondary)
    out = b""
    try:
        # The "watching ..." line on stderr says it subscribed; then a heartbeat fills a row.
        proc.stderr.readline()
        device_probe().publish(topics.heartbeat(device_uuid), heartbeat(device_uuid))
        deadline = time.monotonic() + 10
        while device_uuid[:8].encode() not in out or out.count(b"\x1b[") < 2:
            remaining = deadline - time.monotonic()
            assert remaining > 0, out[-500:]
            ready, _, _ = select.select([primary], [], [], remaining)
            if ready:
                try:
                    out += os.read(primary, 65536)
                except OSError:  # the terminal closed: the process ended
                    break
    finally:
        proc.kill()
        proc.wait(5)
        os.close(primary)
    assert b"\x1b[" in out  # cursor control: redrawn in place, not appended
    assert device_uuid[:8].encode() in out
