"""`infoscreenctl alerts`: list the retained `service_failed` alerts; `alerts clear UUID` clears one.

When systemd gives up restarting the client on a device, the device's OnFailure unit publishes a
retained message on ``infoscreen/{uuid}/service_failed``. Listing subscribes to
``infoscreen/+/service_failed`` and collects what the broker delivers. Clearing is an empty
retained publish at QoS 1 (the broker then deletes the retained message); the server account may
write this topic for that purpose (CONTRACT.md's one deliberate change to the seed's ACL table).

Why listing waits a short "settle" time: MQTT has no "end of retained messages" marker. The
broker sends the retained messages after the SUBACK, at its own pace (QoS 1 ones within the
client's in-flight window, so a large fleet arrives in several rounds), and nothing tells the
subscriber that the last one has been sent. A lister can therefore only stop once no message has
arrived for a quiet period (``--settle``, default 0.5 s, far above the sub-millisecond spacing on
a LAN; raise it over a slow link), with an overall cap (``--max-wait``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from typing import Any

from infoscreen.ctl.session import (
    ConnectionEvent,
    Received,
    Session,
    SessionError,
    add_connection_args,
    check_device_uuid,
    format_age,
    rc_text,
    settings_from_args,
)
from infoscreen.wire import topics
from infoscreen.wire.schema import parse_rfc3339

EXIT_OK = 0
EXIT_ALERTS = 1  # only with --check
EXIT_ERROR = 2
DEFAULT_SETTLE_S = 0.5
DEFAULT_MAX_WAIT_S = 10.0
ALL_ALERTS = f"{topics.PREFIX}/+/service_failed"


def parse_alert(payload: bytes) -> dict[str, Any]:
    """The alert's fields, tolerant of a malformed payload (shown raw)."""
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return {"raw": payload[:200].decode("utf-8", "replace")}
    return obj if isinstance(obj, dict) else {"raw": payload[:200].decode("utf-8", "replace")}


def collect_alerts(session: Session, topic_filter: str = ALL_ALERTS, *, settle: float = DEFAULT_SETTLE_S,
                   max_wait: float = DEFAULT_MAX_WAIT_S) -> dict[str, dict[str, Any]]:
    """Subscribe to `topic_filter` and return {device: alert} once no message came for `settle` s
    (see the module's docstring for why a bound is inherent). An empty payload arriving live (an
    alert cleared meanwhile) removes the device."""
    session.subscribe([topic_filter], qos=1)
    alerts: dict[str, dict[str, Any]] = {}
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
        last = item.at
        device = topics.device_of(item.topic)
        if device is None or not item.topic.endswith("/service_failed"):
            continue
        if not item.payload:
            alerts.pop(device, None)
            continue
        alert = parse_alert(item.payload)
        alert["_retained"] = item.retain
        alerts[device] = alert
    return alerts


def _age(failed_at: Any) -> str:
    try:
        return format_age(max(0.0, time.time() - parse_rfc3339(failed_at)))
    except (ValueError, TypeError):
        return "-"


def print_table(alerts: dict[str, dict[str, Any]]) -> None:
    if not alerts:
        print("no service_failed alerts", flush=True)
        return
    rows = [("DEVICE", "UNIT", "FAILED AT", "AGE")]
    for device in sorted(alerts):
        a = alerts[device]
        unit = str(a.get("unit", a.get("raw", "?")))
        rows.append((device, unit, str(a.get("failed_at", "-")), _age(a.get("failed_at"))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), flush=True)
    print(f"{len(alerts)} alert(s); clear one with: infoscreenctl alerts clear UUID", flush=True)


def clear_alert(session: Session, device: str) -> int:
    """Empty retained publish, QoS 1; returns the PUBACK reason code (raises on a refusal)."""
    return session.publish(topics.service_failed(device), b"", qos=1, retain=True)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "alerts",
        help="list retained service_failed alerts, or clear them (alerts clear UUID...)",
        description=__doc__.split("\n\n", 1)[0],
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
            if args.json:
                out = [{"device": d, **{k: v for k, v in a.items() if k != "_retained"}} for d, a in sorted(alerts.items())]
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
