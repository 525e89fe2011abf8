"""`infoscreenctl watch`: a live view of the fleet from what the devices publish.

Subscribes to ``infoscreen/+/heartbeat``, ``infoscreen/+/health`` and
``infoscreen/+/service_failed`` (the retained alerts arrive at once) and keeps one row per
device: the age of its last heartbeat, the display process state, the broker-connection counters
of its health payload and its service_failed alert.

Output:
- on a terminal, a table redrawn in place (ANSI) on every update and every second;
- otherwise (a pipe, a file), one plain line per update;
- with ``--json``, one JSON object per update (``event``, ``device``, ``topic``, ``received_at``,
  ``retained``, ``payload``, ``row``), plus ``silent``/``fleet_silent`` and ``broker_*`` events.

The seed's alerting heuristic is applied: a device whose last heartbeat is older than
``--stale-after`` (default 90 s, three heartbeat periods) is marked silent; when every known
device is silent at once, the likely cause is the broker or the network, not the devices.

A line ``watching ...`` is written to stderr once the subscription is in place (scripts and tests
can wait for it before expecting updates). Stops on Ctrl-C, or after ``--once`` / ``--count N``
updates or ``--duration S`` seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, TextIO

from infoscreen.ctl.session import (
    ConnectionEvent,
    Received,
    SessionError,
    Session,
    add_connection_args,
    check_device_uuid,
    format_age,
    settings_from_args,
)
from infoscreen.wire import topics

DEFAULT_STALE_S = 90.0
REDRAW_S = 1.0
EXIT_OK = 0
EXIT_ERROR = 2


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclasses.dataclass
class DeviceRow:
    device: str
    heartbeat_mono: float | None = None  # when we received it (our clock)
    heartbeat_ts: str | None = None  # the device's own timestamp
    health_mono: float | None = None
    display: str | None = None
    display_pid: int | None = None
    broker_reachable: bool | None = None
    reconnect_count: int | None = None
    last_disconnect_at: str | None = None
    alert: dict[str, Any] | None = None
    silent: bool = False

    def heartbeat_age(self, now: float) -> float | None:
        return None if self.heartbeat_mono is None else max(0.0, now - self.heartbeat_mono)

    def as_dict(self, now: float) -> dict[str, Any]:
        age = self.heartbeat_age(now)
        return {
            "device": self.device,
            "heartbeat_age_s": None if age is None else round(age, 3),
            "heartbeat_timestamp": self.heartbeat_ts,
            "display": self.display,
            "display_pid": self.display_pid,
            "broker_reachable": self.broker_reachable,
            "reconnect_count": self.reconnect_count,
            "last_disconnect_at": self.last_disconnect_at,
            "service_failed": self.alert,
            "silent": self.silent,
        }


def _obj(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None


class Fleet:
    """The rows, updated from messages. Pure state: no I/O (tests drive it directly)."""

    def __init__(self, stale_after: float = DEFAULT_STALE_S) -> None:
        self.rows: dict[str, DeviceRow] = {}
        self.stale_after = stale_after

    def row(self, device: str) -> DeviceRow:
        r = self.rows.get(device)
        if r is None:
            r = self.rows[device] = DeviceRow(device)
        return r

    def apply(self, topic: str, payload: bytes, at: float) -> tuple[str, DeviceRow, Any] | None:
        """Update from one message; returns (event, row, parsed payload) or None if irrelevant."""
        device = topics.device_of(topic)
        if device is None:
            return None
        kind = topic[len(f"{topics.PREFIX}/{device}/"):]
        obj = _obj(payload) if payload else None
        if kind == "heartbeat":
            r = self.row(device)
            r.heartbeat_mono = at
            r.heartbeat_ts = obj.get("timestamp") if isinstance(obj, dict) else None
            r.silent = False
            return "heartbeat", r, obj
        if kind == "health":
            r = self.row(device)
            r.health_mono = at
            if isinstance(obj, dict):
                actual = obj.get("actual_state")
                if isinstance(actual, dict):
                    r.display = actual.get("status") if isinstance(actual.get("status"), str) else None
                    pid = actual.get("pid")
                    r.display_pid = pid if isinstance(pid, int) else None
                bc = obj.get("broker_connection")
                if isinstance(bc, dict):
                    r.broker_reachable = bc.get("broker_reachable")
                    r.reconnect_count = bc.get("reconnect_count")
                    r.last_disconnect_at = bc.get("last_disconnect_at")
            return "health", r, obj
        if kind == "service_failed":
            if not payload:
                r = self.rows.get(device)
                if r is None or r.alert is None:
                    return None
                r.alert = None
                return "service_failed_cleared", r, None
            r = self.row(device)
            r.alert = obj if isinstance(obj, dict) else {"raw": payload[:200].decode("utf-8", "replace")}
            return "service_failed", r, obj
        return None

    def newly_silent(self, now: float) -> list[DeviceRow]:
        out = []
        for r in self.rows.values():
            age = r.heartbeat_age(now)
            if age is not None and age > self.stale_after and not r.silent:
                r.silent = True
                out.append(r)
        return out

    def heard(self) -> list[DeviceRow]:
        return [r for r in self.rows.values() if r.heartbeat_mono is not None]

    def all_silent(self) -> bool:
        heard = self.heard()
        return bool(heard) and all(r.silent for r in heard)

    def verdict(self) -> str | None:
        heard = self.heard()
        silent = [r for r in heard if r.silent]
        if not silent:
            return None
        if len(silent) == len(heard) and len(heard) > 1:
            return (f"ALL {len(heard)} devices silent: likely a broker or network outage, not {len(heard)} "
                    "device faults")
        if len(silent) == len(heard) == 1:
            return "the only device heard is silent"
        return (f"{len(silent)} of {len(heard)} devices silent: a fault on those devices (crash, network, hang) "
                "while the broker works")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return str(v)


def render_table(fleet: Fleet, now: float, *, connected: bool, since: float | None) -> str:
    head = ("DEVICE", "HEARTBEAT", "DISPLAY", "BROKER", "RECONNECTS", "LAST DISCONNECT", "SERVICE_FAILED")
    rows = [head]
    for d in sorted(fleet.rows):
        r = fleet.rows[d]
        age = r.heartbeat_age(now)
        hb = format_age(age) + (" SILENT" if r.silent else "") if age is not None else "-"
        display = _cell(r.display) + (f" (pid {r.display_pid})" if r.display_pid else "")
        alert = "-"
        if r.alert:
            alert = f"{r.alert.get('unit', 'ALERT')} at {r.alert.get('failed_at', '?')}"
        rows.append((d, hb, display, _cell(r.broker_reachable), _cell(r.reconnect_count),
                     _cell(r.last_disconnect_at), alert))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"infoscreenctl watch - {datetime.now(timezone.utc).strftime('%H:%M:%S')} UTC - "
             f"{len(fleet.rows)} device(s) - Ctrl-C to stop"]
    if not connected:
        down = f" for {format_age(now - since)}" if since is not None else ""
        lines.append(f"!! not connected to the broker{down}; reconnecting (rows are frozen)")
    v = fleet.verdict()
    if v:
        lines.append(f"!! {v}")
    lines.append("")
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if len(rows) == 1:
        lines.append("(no device heard yet: heartbeats arrive every HEARTBEAT_INTERVAL_S, 30 s by default)")
    return "\n".join(lines)


def plain_line(event: str, row: DeviceRow, now: float) -> str:
    age = row.heartbeat_age(now)
    parts = [datetime.now(timezone.utc).strftime("%H:%M:%S"), event, row.device,
             f"heartbeat_age={format_age(age).replace(' ', '')}",
             f"display={_cell(row.display)}", f"broker_reachable={_cell(row.broker_reachable)}",
             f"reconnects={_cell(row.reconnect_count)}", f"last_disconnect={_cell(row.last_disconnect_at)}"]
    if row.alert:
        parts.append(f"service_failed={row.alert.get('unit', '?')}@{row.alert.get('failed_at', '?')}")
    return " ".join(parts)


class Watcher:
    def __init__(self, session: Session, fleet: Fleet, out: TextIO, *, mode: str, count: int | None,
                 duration: float | None) -> None:
        self.session = session
        self.fleet = fleet
        self.out = out
        self.mode = mode  # table | plain | json
        self.count = count
        self.duration = duration
        self.updates = 0
        self.connected = True
        self.disconnected_since: float | None = None
        self._drawn = False

    def _write(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _json(self, obj: dict[str, Any]) -> None:
        self._write(json.dumps(obj, separators=(",", ":")))

    def _redraw(self, now: float) -> None:
        # Cursor home, each line overwritten and cleared to its end, then the rest of the screen
        # cleared: the table replaces itself in place without flicker.
        if not self._drawn:
            self.out.write("\x1b[H\x1b[2J")
            self._drawn = True
        table = render_table(self.fleet, now, connected=self.connected, since=self.disconnected_since)
        self.out.write("\x1b[H" + "".join(line + "\x1b[K\n" for line in table.split("\n")) + "\x1b[J")
        self.out.flush()

    def _event(self, event: str, row: DeviceRow | None, now: float, *, topic: str | None = None,
               retained: bool | None = None, payload: Any = None, extra: dict[str, Any] | None = None) -> None:
        if self.mode == "json":
            obj: dict[str, Any] = {"event": event, "received_at": _iso(time.time())}
            if row is not None:
                obj["device"] = row.device
            if topic is not None:
                obj.update(topic=topic, retained=retained, payload=payload)
            if row is not None:
                obj["row"] = row.as_dict(now)
            if extra:
                obj.update(extra)
            self._json(obj)
        elif self.mode == "plain":
            if row is not None:
                self._write(plain_line(event, row, now))
            else:
                self._write(f"{datetime.now(timezone.utc).strftime('%H:%M:%S')} {event}"
                            + (f" {extra.get('message', '')}" if extra else ""))

    def _tick(self, now: float) -> None:
        if not self.connected:
            return  # our own outage: the devices' silence would be ours to blame
        newly = self.fleet.newly_silent(now)
        for r in newly:
            self._event("silent", r, now, extra={"message": f"no heartbeat for {format_age(r.heartbeat_age(now))}"})
        if newly and self.fleet.all_silent() and len(self.fleet.heard()) > 1:
            self._event("fleet_silent", None, now, extra={"message": self.fleet.verdict()})

    def run(self) -> int:
        start = time.monotonic()
        end = start + self.duration if self.duration is not None else None
        next_draw = start
        if self.mode == "table":
            self._redraw(start)
        while True:
            now = time.monotonic()
            if end is not None and now >= end:
                return EXIT_OK
            if self.count is not None and self.updates >= self.count:
                return EXIT_OK
            wait = REDRAW_S if end is None else min(REDRAW_S, end - now)
            item = self.session.get(max(0.0, wait))
            now = time.monotonic()
            changed = False
            if isinstance(item, ConnectionEvent):
                self.connected = item.connected
                self.disconnected_since = None if item.connected else item.at
                self._event("broker_reconnected" if item.connected else "broker_disconnected", None, now,
                            extra={"message": "connection to the broker " + ("restored" if item.connected else
                                                                               f"lost ({item.reason})")})
                changed = True
            elif isinstance(item, Received):
                res = self.fleet.apply(item.topic, item.payload, item.at)
                if res is not None:
                    event, row, obj = res
                    self.updates += 1
                    self._event(event, row, now, topic=item.topic, retained=item.retain, payload=obj)
                    changed = True
            self._tick(now)
            if self.mode == "table" and (changed or now >= next_draw):
                self._redraw(now)
                next_draw = now + REDRAW_S


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "watch",
        help="live table of devices: heartbeat age, display state, reconnects, alerts",
        description=__doc__.split("\n\n", 1)[0],
    )
    p.add_argument("--json", action="store_true", help="one JSON object per update (for scripts)")
    p.add_argument("--plain", action="store_true", help="one line per update even on a terminal")
    p.add_argument("--device", action="append", type=check_device_uuid, metavar="UUID",
                   help="watch only this device (repeatable)")
    p.add_argument("--once", action="store_true", help="stop after the first update")
    p.add_argument("--count", type=int, metavar="N", help="stop after N updates")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--stale-after", type=float, default=DEFAULT_STALE_S, metavar="S",
                   help=f"mark a device silent after S s without a heartbeat (default: {DEFAULT_STALE_S:g})")
    add_connection_args(p)
    p.set_defaults(func=run)
    return p


def subscriptions(devices: list[str] | None) -> list[str]:
    if devices:
        return [t for d in dict.fromkeys(devices)
                for t in (topics.heartbeat(d), topics.health(d), topics.service_failed(d))]
    return [f"{topics.PREFIX}/+/heartbeat", f"{topics.PREFIX}/+/health", f"{topics.PREFIX}/+/service_failed"]


def run(args: argparse.Namespace) -> int:
    count = 1 if args.once else args.count
    if count is not None and count < 1:
        print("infoscreenctl watch: error: --count must be at least 1", file=sys.stderr)
        return EXIT_ERROR
    if args.duration is not None and not args.duration > 0:
        print("infoscreenctl watch: error: --duration must be positive", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        mode = "json"
    elif args.plain or not sys.stdout.isatty() or os.environ.get("TERM") == "dumb":
        mode = "plain"
    else:
        mode = "table"
    subs = subscriptions(args.device)
    try:
        session = Session(settings_from_args(args)).connect()
        session.subscribe(subs, qos=1)
    except SessionError as exc:
        print(f"infoscreenctl watch: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"watching {', '.join(subs)} as {session.settings.describe()}", file=sys.stderr, flush=True)
    watcher = Watcher(session, Fleet(args.stale_after), sys.stdout, mode=mode, count=count, duration=args.duration)
    try:
        return watcher.run()
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        return EXIT_OK
    finally:
        session.close()
