"""`infoscreenctl watch`: a live view of the fleet from what the devices publish.

Subscribes to ``infoscreen/+/heartbeat``, ``infoscreen/+/health`` and
``infoscreen/+/service_failed`` (the retained alerts arrive at once) and keeps one row per
device: the age of its last heartbeat, the display process state, the broker-connection counters
of its health payload and its service_failed alert.

Output:
- on a terminal, a table redrawn in place (ANSI) on every update and every second;
- otherwise (a pipe, a file), one plain line per update;
- with ``--json``, one JSON object per update (``event``, ``device``, ``topic``, ``received_at``,
  ``retained``, ``payload``, ``row``, and ``problem`` when the payload is not what the contract
  says), plus ``silent``/``fleet_silent``, ``broker_*``, ``messages_dropped`` (messages arrived
  faster than they could be handled) and ``device_limit`` events.

The contract's alerting heuristic is applied: a device whose last heartbeat is older than
``--stale-after`` (default 90 s, three heartbeat periods) is marked silent; when every known
device is silent at once, the likely cause is the broker or the network, not the devices.

Everything shown comes from what devices publish, and one device may be compromised: each payload
is read as untrusted input (a size cap before parsing, every parser error caught, typed bounded
fields, text escaped before it reaches the terminal), and every row is keyed on the uuid in the
topic, never on one inside a payload, so no device can change what is shown about another. At
most MAX_DEVICES rows are kept. A payload that cannot be read still counts as a sign of life
(its ``problem`` says what is wrong with it).

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

import msgspec

from infoscreen.ctl.alerts import AlertView, read_alert
from infoscreen.ctl.session import (
    MAX_DEVICES,
    ConnectionEvent,
    Received,
    SessionError,
    Session,
    add_connection_args,
    check_device_uuid,
    device_of,
    fields_of,
    format_age,
    printable,
    read_object,
    settings_from_args,
)
from infoscreen.wire import topics
from infoscreen.wire.schema import Health, Heartbeat

DEFAULT_STALE_S = 90.0
REDRAW_S = 1.0
# The table is redrawn at most this often: a device flooding its topics must not make watch spend
# its time drawing (it would fall behind and drop the other devices' messages).
MIN_REDRAW_S = 0.1
EXIT_OK = 0
EXIT_ERROR = 2
# Far above the real payloads (a heartbeat ~150 bytes, a health report ~1.5 KiB), far below the
# broker's packet limit: a larger payload is not parsed.
MAX_HEARTBEAT_BYTES = 16 * 1024
MAX_HEALTH_BYTES = 64 * 1024


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HeartbeatView(msgspec.Struct, frozen=True):
    """What watch keeps of a heartbeat: its timestamp (printable, bounded) or why it is missing."""

    timestamp: str | None = None
    problem: str | None = None


class HealthView(msgspec.Struct, frozen=True):
    """What watch keeps of a health report; a missing or wrong field is None."""

    display: str | None = None
    display_pid: int | None = None
    broker_reachable: bool | None = None
    reconnect_count: int | None = None
    last_disconnect_at: str | None = None
    problem: str | None = None


def _text(value: str | None) -> str | None:
    return None if value is None else printable(value, 64)


def parse_heartbeat(payload: bytes) -> tuple[HeartbeatView, Any]:
    """(the view, the payload's JSON value or None): never raises, whatever the payload. The
    fields and their bounds are those of wire.schema.Heartbeat."""
    obj, problem = read_object(payload, MAX_HEARTBEAT_BYTES, "heartbeat")
    if problem is not None:
        return HeartbeatView(problem=problem), obj
    ts = _text(fields_of(obj, Heartbeat)["timestamp"])
    return HeartbeatView(timestamp=ts, problem=None if ts is not None else "no timestamp"), obj


def parse_health(payload: bytes) -> tuple[HealthView, Any]:
    """(the view, the payload's JSON value or None): never raises, whatever the payload. Each
    field of wire.schema.Health is read on its own, so one wrong field loses only itself."""
    obj, problem = read_object(payload, MAX_HEALTH_BYTES, "health")
    if problem is not None:
        return HealthView(problem=problem), obj
    h = fields_of(obj, Health)
    actual, bc = h["actual_state"] or {}, h["broker_connection"] or {}
    view = HealthView(
        display=_text(actual.get("status")),
        display_pid=actual.get("pid"),
        broker_reachable=bc.get("broker_reachable"),
        reconnect_count=bc.get("reconnect_count"),
        last_disconnect_at=_text(bc.get("last_disconnect_at")),
    )
    if h["actual_state"] is None or h["broker_connection"] is None:
        view = msgspec.structs.replace(view, problem="no actual_state or broker_connection object")
    return view, obj


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
    alert: AlertView | None = None
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
            "service_failed": None if self.alert is None else self.alert.as_dict(),
            "silent": self.silent,
        }


@dataclasses.dataclass(frozen=True)
class Update:
    """One applied message: the event name, the device's row, the payload's JSON value (None when
    unreadable) and what is wrong with the payload, if anything."""

    event: str
    row: DeviceRow
    payload: Any
    problem: str | None = None


_KINDS = ("heartbeat", "health", "service_failed")


class Fleet:
    """The rows, updated from messages. Pure state: no I/O (tests drive it directly).

    A message changes the row of the device in its topic and no other; at most `max_devices`
    rows are kept (messages of further devices are counted in `untracked`, not applied)."""

    def __init__(self, stale_after: float = DEFAULT_STALE_S, max_devices: int = MAX_DEVICES) -> None:
        self.rows: dict[str, DeviceRow] = {}
        self.stale_after = stale_after
        self.max_devices = max_devices
        self.untracked = 0

    def row(self, device: str) -> DeviceRow | None:
        r = self.rows.get(device)
        if r is None:
            if len(self.rows) >= self.max_devices:
                self.untracked += 1
                return None
            r = self.rows[device] = DeviceRow(device)
        return r

    def apply(self, topic: str, payload: bytes, at: float) -> Update | None:
        """Update from one message; returns the update, or None if irrelevant. Never raises."""
        for kind in _KINDS:
            device = device_of(topic, kind)
            if device is not None:
                break
        else:
            return None
        if kind == "heartbeat":
            hb, obj = parse_heartbeat(payload)
            r = self.row(device)
            if r is None:
                return None
            r.heartbeat_mono = at
            r.heartbeat_ts = hb.timestamp
            r.silent = False
            return Update("heartbeat", r, obj, hb.problem)
        if kind == "health":
            h, obj = parse_health(payload)
            r = self.row(device)
            if r is None:
                return None
            r.health_mono = at
            r.display = h.display
            r.display_pid = h.display_pid
            r.broker_reachable = h.broker_reachable
            r.reconnect_count = h.reconnect_count
            r.last_disconnect_at = h.last_disconnect_at
            return Update("health", r, obj, h.problem)
        # service_failed
        if not payload:
            r = self.rows.get(device)
            if r is None or r.alert is None:
                return None
            r.alert = None
            return Update("service_failed_cleared", r, None)
        r = self.row(device)
        if r is None:
            return None
        alert, obj = read_alert(device, payload)
        r.alert = alert
        return Update("service_failed", r, obj, alert.problem)

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
            alert = f"{r.alert.unit or 'ALERT'} at {r.alert.failed_at or '?'}"
            if r.alert.problem:
                alert += f" ({r.alert.problem})"
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


def _word(v: Any) -> str:
    # A device's text in a key=value line: no space, so it cannot fake further fields.
    return _cell(v).replace(" ", "_")


def plain_line(event: str, row: DeviceRow, now: float) -> str:
    age = row.heartbeat_age(now)
    parts = [datetime.now(timezone.utc).strftime("%H:%M:%S"), event, row.device,
             f"heartbeat_age={format_age(age).replace(' ', '')}",
             f"display={_word(row.display)}", f"broker_reachable={_cell(row.broker_reachable)}",
             f"reconnects={_cell(row.reconnect_count)}", f"last_disconnect={_word(row.last_disconnect_at)}"]
    if row.alert:
        parts.append(f"service_failed={_word(row.alert.unit or '?')}@{_word(row.alert.failed_at or '?')}")
        if row.alert.problem:
            parts.append(f"alert_problem={_word(row.alert.problem)}")
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
        self._reported_dropped = 0
        self._reported_untracked = False

    def _write(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _json(self, obj: dict[str, Any]) -> None:
        try:
            text = json.dumps(obj, separators=(",", ":"))
        except (ValueError, TypeError, RecursionError):  # not expected: read_json bounds the payload
            obj = {**obj, "payload": None, "problem": "payload not printable as JSON"}
            text = json.dumps(obj, separators=(",", ":"))
        self._write(text)

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
               retained: bool | None = None, payload: Any = None, problem: str | None = None,
               extra: dict[str, Any] | None = None) -> None:
        if self.mode == "json":
            obj: dict[str, Any] = {"event": event, "received_at": _iso(time.time())}
            if row is not None:
                obj["device"] = row.device
            if topic is not None:
                obj.update(topic=topic, retained=retained, payload=payload)
            if problem is not None:
                obj["problem"] = problem
            if row is not None:
                obj["row"] = row.as_dict(now)
            if extra:
                obj.update(extra)
            self._json(obj)
        elif self.mode == "plain":
            if row is not None:
                line = plain_line(event, row, now)
                self._write(line if problem is None else f"{line} problem={_word(problem)}")
            else:
                self._write(f"{datetime.now(timezone.utc).strftime('%H:%M:%S')} {event}"
                            + (f" {extra.get('message', '')}" if extra else ""))

    def _tick(self, now: float) -> None:
        dropped = self.session.dropped
        if dropped > self._reported_dropped:
            self._event("messages_dropped", None, now, extra={
                "message": f"{dropped - self._reported_dropped} message(s) dropped: they arrived faster than "
                           "they could be handled", "dropped": dropped})
            self._reported_dropped = dropped
        if self.fleet.untracked and not self._reported_untracked:
            self._reported_untracked = True
            self._event("device_limit", None, now, extra={
                "message": f"{self.fleet.max_devices} devices tracked: messages of further devices are ignored"})
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
        next_draw = start + REDRAW_S
        last_draw = start
        if self.mode == "table":
            self._redraw(start)
        while True:
            now = time.monotonic()
            if end is not None and now >= end:
                return EXIT_OK
            if self.count is not None and self.updates >= self.count:
                return EXIT_OK
            wait = REDRAW_S if end is None else min(REDRAW_S, end - now)
            if self.mode == "table":
                wait = min(wait, next_draw - now)
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
                up = self.fleet.apply(item.topic, item.payload, item.at)
                if up is not None:
                    self.updates += 1
                    self._event(up.event, up.row, now, topic=item.topic, retained=item.retain,
                                payload=up.payload, problem=up.problem)
                    changed = True
            self._tick(now)
            if self.mode == "table":
                if changed:
                    next_draw = min(next_draw, last_draw + MIN_REDRAW_S)
                if now >= next_draw:
                    self._redraw(now)
                    last_draw = now
                    next_draw = now + REDRAW_S


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "watch",
        help="live table of devices: heartbeat age, display state, reconnects, alerts",
        description="A live view of the fleet from what the screens publish.",
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
    return [topics.every_device(kind) for kind in _KINDS]


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
