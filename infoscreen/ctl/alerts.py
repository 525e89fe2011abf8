"""`infoscreenctl alerts`: list the retained `service_failed` alerts; `alerts clear UUID` clears one.

When systemd gives up restarting the client on a device, the device's OnFailure unit publishes a
retained message on ``infoscreen/{uuid}/service_failed``. Listing subscribes to
``infoscreen/+/service_failed`` and collects what the broker delivers. Clearing is an empty
retained publish at QoS 1 (the broker then deletes the retained message); the server account may
write this topic for that purpose (the one deliberate change to the ACL table, explained in
docs/server-integration.md).

Why listing waits a short "settle" time: MQTT has no "end of retained messages" marker. The
broker sends the retained messages after the SUBACK, at its own pace (QoS 1 ones within the
client's in-flight window, so a large fleet arrives in several rounds), and nothing tells the
subscriber that the last one has been sent. A lister can therefore only stop once no message has
arrived for a quiet period (``--settle``, default 0.5 s, far above the sub-millisecond spacing on
a LAN; raise it over a slow link), with an overall cap (``--max-wait``). Only retained deliveries
count for that quiet period, so a device publishing on its topic without end cannot hold the
listing open.

A device account writes its own alert topic, and a compromised device may write anything there.
Each alert is read as untrusted input (`parse_alert`: a size cap before parsing, typed bounded
fields, printable text) and reported under the uuid of its topic: an alert whose `client_uuid`
names another device is shown with a problem, never as that device's. A payload that is not an
alert is still listed (the device did write something there), with what is wrong with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from typing import Any

import msgspec

from infoscreen.ctl.session import (
    MAX_DEVICES,
    ConnectionEvent,
    Received,
    Session,
    SessionError,
    add_connection_args,
    check_device_uuid,
    device_of,
    fields_of,
    format_age,
    printable,
    rc_text,
    read_object,
    settings_from_args,
)
from infoscreen.wire import topics
from infoscreen.wire.ids import command_key
from infoscreen.wire.schema import SERVICE_FAILED, ServiceFailed, parse_rfc3339

EXIT_OK = 0
EXIT_ALERTS = 1  # only with --check
EXIT_ERROR = 2
DEFAULT_SETTLE_S = 0.5
DEFAULT_MAX_WAIT_S = 10.0
ALL_ALERTS = topics.every_device("service_failed")
# The alert is ~150 bytes; a payload far larger is not one and is not parsed.
MAX_ALERT_BYTES = 16 * 1024



class AlertView(msgspec.Struct, frozen=True):
    """What the tools report of one device's service_failed alert (the device is the one in the
    topic). Every text is printable and bounded; a field that is missing, of the wrong type or
    too long is None and named in `problem`. `client_uuid` is kept only when it is the topic's
    device: an alert never names another device."""

    unit: str | None = None
    failed_at: str | None = None
    event: str | None = None
    client_uuid: str | None = None
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set, in the contract's order (`problem` last, only when there is one)."""
        out = {"event": self.event, "unit": self.unit, "client_uuid": self.client_uuid,
               "failed_at": self.failed_at, "problem": self.problem}
        return {k: v for k, v in out.items() if v is not None}


def read_alert(device: str, payload: bytes) -> tuple[AlertView, Any]:
    """(the alert of `device` (from the topic) in `payload`, the payload's JSON value or None),
    whatever the payload is: never raises."""
    obj, problem = read_object(payload, MAX_ALERT_BYTES, "alert")
    if problem is not None:
        return AlertView(problem=problem), obj
    problems = []
    fields = fields_of(obj, ServiceFailed)
    unit = fields["unit"]
    if unit is None:
        problems.append("no unit")
    failed_at = fields["failed_at"]
    if failed_at is not None:
        try:
            parse_rfc3339(failed_at)
        except ValueError:
            failed_at = None
    if failed_at is None:
        problems.append("no RFC 3339 failed_at")
    event = fields["event"]
    if "event" in obj and event != SERVICE_FAILED:
        problems.append("event is not service_failed")
        event = None
    claimed = obj.get("client_uuid")
    client_uuid = None
    if claimed is not None:
        if fields["client_uuid"] is not None and command_key(claimed) == command_key(device):
            client_uuid = claimed
        else:
            problems.append("client_uuid is not this device's")  # never quoted: it may name another device
    view = AlertView(
        unit=None if unit is None else printable(unit, 256),
        failed_at=None if failed_at is None else printable(failed_at, 64),
        event=event,
        client_uuid=client_uuid,
        problem="; ".join(problems) or None,
    )
    return view, obj


def parse_alert(device: str, payload: bytes) -> AlertView:
    """The alert of `device` in `payload` (see `read_alert`); never raises."""
    return read_alert(device, payload)[0]


def collect_alerts(session: Session, topic_filter: str = ALL_ALERTS, *, settle: float = DEFAULT_SETTLE_S,
                   max_wait: float = DEFAULT_MAX_WAIT_S) -> dict[str, AlertView]:
    """Subscribe to `topic_filter` and return {device: alert} once no retained message came for
    `settle` s (see the module's docstring for why a bound is inherent). Only retained deliveries
    extend the wait: a device publishing without end cannot hold the listing open. A message
    arriving live updates the result (an empty one: the alert was cleared meanwhile). At most
    MAX_DEVICES devices are kept."""
    session.subscribe([topic_filter], qos=1)
    alerts: dict[str, AlertView] = {}
    start = time.monotonic()
    last = start
    while True:
        now = time.monotonic()
        wait = min(last + settle, start + max_wait) - now
        if wait <= 0:
            break
        item = session.get(wait)
        if item is None or isinstance(item, ConnectionEvent):
            continue
        assert isinstance(item, Received)
        if item.retain:
            last = item.at
        device = device_of(item.topic, "service_failed")
        if device is None:
            continue
        if not item.payload:
            alerts.pop(device, None)
            continue
        if device not in alerts and len(alerts) >= MAX_DEVICES:
            continue
        alerts[device] = parse_alert(device, item.payload)
    return alerts


def _age(failed_at: Any) -> str:
    try:
        return format_age(max(0.0, time.time() - parse_rfc3339(failed_at)))
    except (ValueError, TypeError):
        return "-"


def print_table(alerts: dict[str, AlertView]) -> None:
    if not alerts:
        print("no service_failed alerts", flush=True)
        return
    rows = [("DEVICE", "UNIT", "FAILED AT", "AGE")]
    for device in sorted(alerts):
        a = alerts[device]
        unit = a.unit or "?"
        if a.problem:
            unit += f" ({a.problem})"
        rows.append((device, unit, a.failed_at or "-", _age(a.failed_at)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), flush=True)
    print(f"{len(alerts)} alert(s); clear one with: infoscreenctl alerts clear UUID", flush=True)


def _warn_incomplete(session: Session, alerts: dict[str, AlertView]) -> None:
    if session.dropped:
        print(f"infoscreenctl alerts: warning: {session.dropped} message(s) dropped (they arrived faster "
              "than they could be read): the listing may be incomplete", file=sys.stderr)
    if len(alerts) >= MAX_DEVICES:
        print(f"infoscreenctl alerts: warning: the listing stops at {MAX_DEVICES} devices", file=sys.stderr)


def clear_alert(session: Session, device: str) -> int:
    """Empty retained publish, QoS 1; returns the PUBACK reason code (raises on a refusal)."""
    return session.publish(topics.service_failed(device), b"", qos=1, retain=True)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "alerts",
        help="list retained service_failed alerts, or clear them (alerts clear UUID...)",
        description="List the retained service_failed alerts; 'alerts clear UUID' clears one.",
        epilog="Listing waits --settle seconds after the last message: MQTT has no end-of-retained marker.",
    )
    p.add_argument("op", nargs="?", choices=("list", "clear"), default="list", help="list (default) or clear")
    p.add_argument("devices", nargs="*", type=check_device_uuid, metavar="UUID", help="with clear: the device(s)")
    p.add_argument("--all", action="store_true", help="with clear: clear every alert listed")
    p.add_argument("--json", action="store_true", help="list as one JSON array")
    p.add_argument("--check", action="store_true", help="list, and exit 1 if there is any alert")
    p.add_argument("--settle", type=float, default=DEFAULT_SETTLE_S, metavar="S",
                   help=f"quiet period that ends the listing (default: {DEFAULT_SETTLE_S:g})")
    p.add_argument("--max-wait", type=float, default=DEFAULT_MAX_WAIT_S, metavar="S",
                   help=f"overall cap of the listing (default: {DEFAULT_MAX_WAIT_S:g})")
    add_connection_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if args.op == "list" and (args.devices or args.all):
        print("infoscreenctl alerts: error: device UUIDs and --all go with `alerts clear`", file=sys.stderr)
        return EXIT_ERROR
    if args.op == "clear" and not args.devices and not args.all:
        print("infoscreenctl alerts: error: `alerts clear` needs a device UUID (or --all)", file=sys.stderr)
        return EXIT_ERROR
    if not (0 < args.settle <= 60) or not (0 < args.max_wait <= 600):
        print("infoscreenctl alerts: error: --settle must be in (0, 60] and --max-wait in (0, 600]", file=sys.stderr)
        return EXIT_ERROR
    try:
        session = Session(settings_from_args(args)).connect()
    except SessionError as exc:
        print(f"infoscreenctl alerts: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        if args.op == "list":
            alerts = collect_alerts(session, settle=args.settle, max_wait=args.max_wait)
            _warn_incomplete(session, alerts)
            if args.json:
                # "device" is the topic's uuid; as_dict has no key that could replace it.
                out = [{"device": d, **a.as_dict()} for d, a in sorted(alerts.items())]
                print(json.dumps(out), flush=True)
            else:
                print_table(alerts)
            return EXIT_ALERTS if (args.check and alerts) else EXIT_OK
        # clear
        if args.all:
            targets = sorted(collect_alerts(session, settle=args.settle, max_wait=args.max_wait))
            if not targets:
                print("no service_failed alerts to clear", flush=True)
                return EXIT_OK
        else:
            targets = list(dict.fromkeys(args.devices))
        for device in targets:
            rc = clear_alert(session, device)
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            print(f"cleared the service_failed alert of {device} at {stamp} (PUBACK: {rc_text(rc)})", flush=True)
        return EXIT_OK
    except SessionError as exc:
        print(f"infoscreenctl alerts: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        session.close()
