"""`infoscreenctl send reboot|shutdown --device UUID`: publish a power command and follow its acks.

The command is CONTRACT.md's (schema 1.0, a new UUID `command_id`, `issued_at`, `expires_at`,
`client_uuid`), published with the server account on ``infoscreen/{uuid}/commands`` at QoS 1, not
retained. Both ack topics (``.../commands/ack`` and the alias ``.../command/ack``) are subscribed
to BEFORE the command is published, so no status can be missed. Each status is printed when it
first arrives, with the time since the publish; the copy of the same status on the other topic is
counted, not printed again.

Exit status (with ``--wait``): 0 `completed`, 1 `failed`, 3 `expires_at` passed without a terminal
status, 4 ``--timeout`` reached first (the command is still valid), 2 the command could not be
sent (bad option, connection refused, publish refused). Without ``--wait`` the acks are followed
for ``--timeout`` seconds (default 10) or until a terminal status; the exit status is 1 if it
was `failed`, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import math
import re
import socket
import sys
import time
import uuid as uuidlib
from typing import Callable

import msgspec
import msgspec.structs

from infoscreen.ctl.session import (
    RC_NO_MATCHING_SUBSCRIBERS,
    ConnectionEvent,
    Received,
    Session,
    SessionError,
    add_connection_args,
    check_device_uuid,
    format_elapsed,
    rc_text,
    settings_from_args,
)
from infoscreen.wire import topics
from infoscreen.wire.schema import (
    SCHEMA_VERSION,
    TERMINAL_STATUSES,
    Action,
    AckStatus,
    CommandOut,
    decode_ack,
    format_utc,
)
from infoscreen.wire.schema import encode as schema_encode

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_EXPIRED = 3
EXIT_TIMEOUT = 4

ACTIONS = {"reboot": Action.REBOOT.value, "shutdown": Action.SHUTDOWN.value}
DEFAULT_EXPIRES_IN = "10m"
DEFAULT_FOLLOW_S = 10.0
MAX_EXPIRES_IN_S = 7 * 86400

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '1.5h', '250ms' -> seconds (> 0)."""
    m = _DURATION_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration (e.g. 30s, 10m, 1h): {text!r}")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"a duration must be positive: {text!r}")
    return value


def _expires_in(text: str) -> float:
    value = parse_duration(text)
    if value < 1:
        raise argparse.ArgumentTypeError("--expires-in must be at least 1 s (expires_at has second precision)")
    if value > MAX_EXPIRES_IN_S:
        raise argparse.ArgumentTypeError("--expires-in must be at most 7 days")
    return value


def _short_topic(topic: str) -> str:
    parts = topic.split("/", 2)
    return parts[2] if len(parts) == 3 else topic


@dataclasses.dataclass
class AckSeen:
    status: str
    error_code: str | None
    error_message: str | None
    topic: str
    elapsed: float  # seconds since the publish


@dataclasses.dataclass
class SendResult:
    command_id: str
    action: str
    exit_code: int
    outcome: str  # completed | failed | expired | timeout | in_progress
    statuses: list[AckSeen]
    duplicates: int  # same status again on the other ack topic
    repeats: int  # same status again on the same topic (the device answered a duplicate)
    puback: int
    final_line: str

    @property
    def status_names(self) -> list[str]:
        return [s.status for s in self.statuses]

    @property
    def last(self) -> AckSeen | None:
        return self.statuses[-1] if self.statuses else None


def build_command(device: str, action: str, expires_in_s: float, *, reason: str | None = None,
                  requested_by: str | None = None, command_id: str | None = None) -> tuple[CommandOut, float]:
    """The command and its expires_at (epoch seconds, whole seconds as the payload carries)."""
    now = time.time()
    expires_at = math.floor(now + expires_in_s)
    cmd = CommandOut(
        schema_version=SCHEMA_VERSION,
        command_id=command_id or str(uuidlib.uuid4()),
        action=action,
        expires_at=format_utc(expires_at),
        client_uuid=device,
        issued_at=format_utc(now),
        reason=reason,
        requested_by=requested_by,
    )
    return cmd, float(expires_at)


def encode_command(cmd: CommandOut) -> bytes:
    """The command's JSON, keys in CONTRACT.md's order, optional fields left None omitted."""
    return schema_encode(cmd)


def default_requested_by() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001
        user = "unknown"
    return f"{user}@{socket.gethostname()} (infoscreenctl)"


def _emit_default(line: str) -> None:
    print(line, flush=True)


def follow_command(
    session: Session,
    device: str,
    command_id: str,
    payload: bytes,
    *,
    action: str,
    expires_at: float,
    wait: bool,
    timeout: float | None,
    emit: Callable[[str], None] = _emit_default,
    topic: str | None = None,
) -> SendResult:
    """Publish `payload` on the device's command topic with an already-connected `session` and
    follow the acks of `command_id`. The caller subscribed to both ack topics before (see
    `open_for_device`). Prints with `emit`; returns the outcome."""
    topic = topic or topics.commands(device)
    t0 = time.monotonic()
    # Wall clock -> monotonic once, so a clock step while waiting changes nothing.
    expires_mono = t0 + (expires_at - time.time())
    puback = session.publish(topic, payload, qos=1, retain=False, expiry_s=max(1.0, expires_at - time.time()))
    emit(f"  {format_elapsed(time.monotonic() - t0):>10}  published to {topic} (PUBACK: {rc_text(puback)})")
    if puback == RC_NO_MATCHING_SUBSCRIBERS:
        emit("  note: no session is subscribed to this device's commands: the device is not connected "
             "and has no persistent session, so nothing will receive this command")

    if wait:
        deadline = expires_mono if timeout is None else min(expires_mono, t0 + timeout)
    else:
        deadline = t0 + (DEFAULT_FOLLOW_S if timeout is None else timeout)
    ack_topics = set(topics.ack_topics(device))
    seen: dict[str, AckSeen] = {}
    topics_of: dict[str, set[str]] = {}
    order: list[AckSeen] = []
    duplicates = repeats = 0
    terminal: AckSeen | None = None

    while terminal is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        item = session.get(remaining)
        if item is None:
            continue
        if isinstance(item, ConnectionEvent):
            if item.connected and item.session_present:
                emit(f"  {format_elapsed(item.at - t0):>10}  reconnected to the broker (the broker kept the session)")
            elif item.connected:
                # Acks published while we were away are lost with the session. The contract's answer
                # to a duplicate command_id is the latest status, never a second execution: re-send
                # the same payload (after the resubscription, which went out first on this connection).
                emit(f"  {format_elapsed(item.at - t0):>10}  reconnected to the broker (session lost; resubscribed)")
                try:
                    session.publish(topic, payload, qos=1, retain=False,
                                    expiry_s=max(1.0, expires_at - time.time()))
                    emit(f"  {format_elapsed(time.monotonic() - t0):>10}  re-sent the same command (same command_id: "
                         "never executed twice) so the device repeats its latest status")
                except SessionError as exc:
                    emit(f"  {format_elapsed(time.monotonic() - t0):>10}  could not re-send the command: {exc}")
            else:
                emit(f"  {format_elapsed(item.at - t0):>10}  connection to the broker lost ({item.reason}); "
                     "reconnecting")
            continue
        assert isinstance(item, Received)
        if item.topic not in ack_topics:
            continue
        try:
            ack = decode_ack(item.payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            emit(f"  {format_elapsed(item.at - t0):>10}  warning: an ack on {_short_topic(item.topic)} is not "
                 f"schema v1 ({exc}); ignored")
            continue
        if ack.command_id != command_id:
            continue  # another command's ack (another operator, an earlier send)
        st = ack.status
        if st in seen:
            if item.topic in topics_of[st]:
                repeats += 1
                emit(f"  {format_elapsed(item.at - t0):>10}  {st} again on {_short_topic(item.topic)} "
                     "(the device repeats the latest status when it sees the command again)")
            else:
                duplicates += 1
                topics_of[st].add(item.topic)
            continue
        rec = AckSeen(st, ack.error_code, ack.error_message, item.topic, item.at - t0)
        seen[st] = rec
        topics_of[st] = {item.topic}
        order.append(rec)
        detail = ""
        if st == AckStatus.FAILED.value:
            detail = f"  {ack.error_code or '?'}: {ack.error_message or ''}".rstrip(": ")
        elif st not in {s.value for s in AckStatus}:
            detail = "  (unknown status)"
        emit(f"  {format_elapsed(rec.elapsed):>10}  {st}{detail}")
        if st in TERMINAL_STATUSES:
            terminal = rec

    last = order[-1].status if order else "none"
    now = time.monotonic()
    if terminal is not None and terminal.status == AckStatus.COMPLETED.value:
        outcome, code = "completed", EXIT_COMPLETED
        line = f"completed: device {device} confirmed {action} {format_elapsed(terminal.elapsed)[1:]} after the publish"
    elif terminal is not None:
        outcome, code = "failed", EXIT_FAILED
        line = f"failed: {terminal.error_code or 'no error_code'}: {terminal.error_message or 'no message'}"
    elif wait and now >= expires_mono:
        outcome, code = "expired", EXIT_EXPIRED
        line = (f"expired: no completed or failed ack before expires_at {format_utc(expires_at)} "
                f"(last status: {last})")
    elif wait:
        outcome, code = "timeout", EXIT_TIMEOUT
        line = (f"timeout: no completed or failed ack within {timeout:g} s (last status: {last}); "
                f"the command stays valid until {format_utc(expires_at)}")
    else:
        outcome, code = "in_progress", EXIT_COMPLETED
        line = (f"still in progress after {deadline - t0:g} s (last status: {last}); the command is valid until "
                f"{format_utc(expires_at)} (use --wait to follow it to the end)")
    emit(line)
    if duplicates:
        emit(f"note: {duplicates} duplicate ack(s) ignored: every status is published on both "
             "commands/ack and its alias command/ack")
    return SendResult(command_id, action, code, outcome, order, duplicates, repeats, puback, line)


def open_for_device(session: Session, device: str) -> None:
    """Subscribe to both ack topics of `device` (wait for the SUBACK): call before publishing."""
    session.subscribe(list(topics.ack_topics(device)), qos=1)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "send",
        help="send a reboot or shutdown command to a device and follow its acks",
        description=__doc__.split("\n\n", 1)[0],
        epilog="exit status with --wait: 0 completed, 1 failed, 2 not sent, 3 expired, 4 --timeout reached",
    )
    p.add_argument("action", choices=sorted(ACTIONS), help="reboot (reboot_host) or shutdown (shutdown_host)")
    p.add_argument("--device", required=True, type=check_device_uuid, metavar="UUID", help="the device's CLIENT_UUID")
    p.add_argument("--expires-in", type=_expires_in, default=_expires_in(DEFAULT_EXPIRES_IN), metavar="DURATION",
                   help=f"the command's validity, e.g. 90s, 10m, 1h (default: {DEFAULT_EXPIRES_IN})")
    p.add_argument("--wait", action="store_true",
                   help="follow until completed (exit 0), failed (1) or expires_at (3)")
    p.add_argument("--timeout", type=parse_duration, metavar="DURATION",
                   help="stop following after this long (with --wait: exit 4 if no terminal status by then; "
                        f"without: default {DEFAULT_FOLLOW_S:g}s)")
    p.add_argument("--reason", metavar="TEXT", help="free text carried in the command's `reason`")
    p.add_argument("--requested-by", metavar="WHO", default=None,
                   help="carried in `requested_by` (default: user@host (infoscreenctl))")
    add_connection_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    action = ACTIONS[args.action]
    device = args.device
    try:
        settings = settings_from_args(args)
    except SessionError as exc:
        print(f"infoscreenctl send: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    cmd, expires_at = build_command(device, action, args.expires_in, reason=args.reason,
                                    requested_by=args.requested_by or default_requested_by())
    session = Session(settings)
    try:
        # With --wait the broker keeps our session (subscriptions, queued acks) across a connection
        # loss until a minute after expiry; it is dropped when we disconnect.
        follow_s = args.expires_in if args.wait else (args.timeout or DEFAULT_FOLLOW_S)
        session.connect(session_expiry=int(min(follow_s + 60, 7 * 86400)))
        open_for_device(session, device)
        print(f"{action} -> device {device} (as {settings.describe()})", flush=True)
        print(f"command_id {cmd.command_id}, expires_at {cmd.expires_at}", flush=True)
        result = follow_command(session, device, cmd.command_id, encode_command(cmd), action=action,
                                expires_at=expires_at, wait=args.wait, timeout=args.timeout)
    except SessionError as exc:
        print(f"infoscreenctl send: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted: stopped following (the command, if published, stays valid until "
              f"{cmd.expires_at})", file=sys.stderr)
        return 130
    finally:
        session.close()
    return result.exit_code
