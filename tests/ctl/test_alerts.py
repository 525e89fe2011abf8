"""`infoscreenctl alerts` / `alerts clear`: against real retained messages on a real broker, published
by a device account as the OnFailure unit does."""

from __future__ import annotations

import json

from infoscreen.wire import topics


def alert(uuid: str, unit: str = "infoscreen-simclient.service", at: str = "2026-04-05T08:00:00Z") -> dict:
    return {"event": "service_failed", "unit": unit, "client_uuid": uuid, "failed_at": at}


def raise_alert(device_probe, uuid: str, **kw) -> None:
    dev = device_probe(uuid)
    assert dev.publish(topics.service_failed(uuid), alert(uuid, **kw), retain=True) in (0, 16)


def test_lists_retained_alerts_of_every_device(ctl, device_probe, device_uuid, other_device_uuid):
    raise_alert(device_probe, device_uuid)
    raise_alert(device_probe, other_device_uuid, unit="other.service", at="2026-04-05T09:00:00Z")
    p = ctl("alerts")
    assert p.wait(10) == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["DEVICE", "UNIT", "FAILED", "AT", "AGE"]
    rows = {l.split()[0]: l.split() for l in lines[1:3]}
    assert rows[device_uuid][1:3] == ["infoscreen-simclient.service", "2026-04-05T08:00:00Z"]
    assert rows[other_device_uuid][1:3] == ["other.service", "2026-04-05T09:00:00Z"]
    assert "2 alert(s)" in lines[3]


def test_json_and_check(ctl, device_probe, device_uuid):
    raise_alert(device_probe, device_uuid)
    p = ctl("alerts", "--json", "--check")
    assert p.wait(10) == 1  # --check: there is an alert
    assert json.loads(p.stdout) == [{"device": device_uuid, **alert(device_uuid)}]


def test_no_alerts(ctl):
    p = ctl("alerts", "--check")
    assert p.wait(10) == 0
    assert p.stdout.strip() == "no service_failed alerts"


def test_clear_removes_the_retained_alert(ctl, device_probe, server_probe, device_uuid, other_device_uuid):
    raise_alert(device_probe, device_uuid)
    raise_alert(device_probe, other_device_uuid)
    watcher = server_probe()
    watcher.subscribe(topics.service_failed(device_uuid))
    watcher.wait_for(topics.service_failed(device_uuid), lambda m: m.retain)

    p = ctl("alerts", "clear", device_uuid)
    assert p.wait(10) == 0, p.stderr
    assert p.stdout.startswith(f"cleared the service_failed alert of {device_uuid} at ")
    assert "(PUBACK: 0 (success))" in p.stdout  # the watcher is subscribed
    # Subscribers see the empty publish (the clear) ...
    cleared = watcher.wait_for(topics.service_failed(device_uuid), lambda m: m.payload == b"")
    assert cleared.payload == b""
    # ... and a new subscriber gets no retained message any more; the other device keeps its alert.
    fresh = server_probe()
    fresh.subscribe(topics.service_failed(device_uuid))
    fresh.subscribe(topics.service_failed(other_device_uuid))
    fresh.wait_for(topics.service_failed(other_device_uuid), lambda m: m.retain)  # orders the check below
    assert fresh.messages(topics.service_failed(device_uuid)) == []
    listing = ctl("alerts", "--json")
    assert listing.wait(10) == 0
    assert [a["device"] for a in json.loads(listing.stdout)] == [other_device_uuid]


def test_clear_all(ctl, device_probe, device_uuid, other_device_uuid):
    raise_alert(device_probe, device_uuid)
    raise_alert(device_probe, other_device_uuid)
    p = ctl("alerts", "clear", "--all")
    assert p.wait(10) == 0
    assert sorted(l.split()[5] for l in p.stdout.splitlines()) == sorted([device_uuid, other_device_uuid])
    listing = ctl("alerts")
    assert listing.wait(10) == 0
    assert listing.stdout.strip() == "no service_failed alerts"


def test_clear_refused_by_the_acl_is_a_clear_error(ctl_raw, broker, device_uuid, other_device_uuid):
    """A device may not clear another device's alert: PUBACK 135 becomes an error, exit 2."""
    # The device account logs in only under its own client id (bound in the broker).
    p = ctl_raw("alerts", "clear", other_device_uuid, "--env", str(broker.device_env_path(device_uuid)),
                "--client-id", device_uuid)
    assert p.wait(10) == 2
    assert "refused the publish to infoscreen/" in p.stderr and "135 (not authorized)" in p.stderr


def test_clear_needs_a_device(ctl):
    p = ctl("alerts", "clear")
    assert p.wait(10) == 2
    assert "needs a device UUID" in p.stderr
