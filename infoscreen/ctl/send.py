"""`infoscreenctl send reboot|shutdown --device UUID`: publish a power command and follow its acks.

The command is the one of docs/server-integration.md (schema 1.0, a new UUID `command_id`,
`issued_at`, `expires_at`, `client_uuid`), published with the server account on ``infoscreen/{uuid}/commands`` at QoS 1, not
retained. Both ack topics (``.../commands/ack`` and the alias ``.../command/ack``) are subscribed
to BEFORE the command is published, so no status can be missed. Each status is printed when it
first arrives, with the time since the publish; the copy of the same status on the other topic is
counted, not printed again.

Signing (the contract's signed power commands): when the device's command key
``<DIR>/<uuid>.key`` exists, the PUBLISH carries the MQTT 5 user property ``signature`` =
``hmac-sha256=<hex>`` over the payload bytes exactly as published (also on a re-send). DIR is
``--keys DIR``, else ``$INFOSCREEN_COMMAND_KEYS``, else ``INFOSCREEN_COMMAND_KEYS`` of the env
file (``broker provision`` writes it into server.env). Without a key file for the device the
command is sent unsigned, said in one line on stderr (a device that has a key refuses it with
`signature_invalid`); ``--unsigned`` does so on purpose, to test that refusal. A key file that
cannot be read or is not 64 lower-case hex characters, or a key directory that does not exist,
is an error (exit 2): nothing is sent, and the key is never printed.

The acks are read as untrusted input (the device may be compromised): a size cap before parsing,
the strict v1 schema, only the four known statuses and this command's id on this device's ack
topics count; anything else is ignored, the first few with a warning, the rest counted.

Exit status (with ``--wait``): 0 `completed`, 1 `failed`, 3 `expires_at` passed without a terminal
status, 4 ``--timeout`` reached first (the command is still valid), 2 the command could not be
sent (bad option, bad key file, connection refused, publish refused). Without ``--wait`` the acks
are followed for ``--timeout`` seconds (default 10) or until a terminal status; the exit status is
1 if it was `failed`, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import math
import os
import re
import socket
import stat
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
    Unreadable,
    add_connection_args,
    check_device_uuid,
    env_from_args,
    format_elapsed,
    printable,
    rc_text,
    settings_from_args,
)
from infoscreen.wire import signing, topics
from infoscreen.wire.ids import command_key
from infoscreen.wire.schema import (
    SCHEMA_VERSION,
    TERMINAL_STATUSES,
    Ack,
    Action,
    AckStatus,
    CommandOut,
    ErrorCode,
    decode_ack,
    format_utc,
)
from infoscreen.wire.schema import encode as schema_encode

EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_EXPIRED = 3
EXIT_TIMEOUT = 4

# The command line's names: the contract's action without its "_host" (reboot, shutdown).
ACTIONS = {a.value.removesuffix("_host"): a.value for a in Action}
DEFAULT_EXPIRES_IN = "10m"
DEFAULT_FOLLOW_S = 10.0
MAX_EXPIRES_IN_S = 7 * 86400
KEYS_VAR = "INFOSCREEN_COMMAND_KEYS"
# An ack is four short fields (~150 bytes); anything far larger is not one and is not parsed.
MAX_ACK_BYTES = 16 * 1024
MAX_WARNINGS = 5  # lines about ignored acks or repeats; the rest are counted in the summary
KNOWN_STATUSES = frozenset(s.value for s in AckStatus)

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
    ignored: int = 0  # unreadable acks, or acks with an unknown status, on this device's ack topics

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
    """The command's JSON, keys in the contract's order, optional fields left None omitted."""
    return schema_encode(cmd)


def sign_payload(key: bytes | None, payload: bytes) -> str | None:
    """The `signature` user property for these very bytes (the device's helper verifies the
    payload as it arrives), None without a key: sent unsigned."""
    return signing.sign(key, payload) if key is not None else None


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A command ready to publish: its payload bytes and, with a key, their signature."""

    command: CommandOut
    payload: bytes
    expires_at: float  # epoch seconds
    signature: str | None


def prepare_command(device: str, action: str, expires_in_s: float, key: bytes | None, *, reason: str | None = None,
                    requested_by: str | None = None) -> Prepared:
    """The command of `send` (see `build_command`), encoded and signed with `key` (None: unsigned)."""
    cmd, expires_at = build_command(device, action, expires_in_s, reason=reason, requested_by=requested_by)
    payload = encode_command(cmd)
    return Prepared(cmd, payload, expires_at, sign_payload(key, payload))


def default_requested_by() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001
        user = "unknown"
    return f"{user}@{socket.gethostname()} (infoscreenctl)"


def _emit_default(line: str) -> None:
    print(line, flush=True)


class CommandKeyError(Exception):
    """A key file that exists but cannot be used, in one line (never containing the key)."""


def command_key_dir(args: argparse.Namespace, env: dict[str, str]) -> str | None:
    """Where the server's copies of the command keys are: ``--keys``, else the environment's
    INFOSCREEN_COMMAND_KEYS, else the env file's; None when none is set."""
    for value in (getattr(args, "keys", None), os.environ.get(KEYS_VAR), env.get(KEYS_VAR)):
        if value:
            return value
    return None


def key_path(key_dir: str, device: str) -> str:
    # `device` passed check_device_uuid: lower-case hex and hyphens only, no path separator.
    return os.path.join(key_dir, f"{device}.key")


def load_command_key(key_dir: str, device: str) -> bytes | None:
    """The device's command key from `key_dir`, None when its file does not exist.

    CommandKeyError when the directory does not exist (a typo must not silently turn into
    unsigned commands), or the file is not a regular file, cannot be read, or is not the key
    format. Opened non-blocking: a FIFO planted at the path cannot hang the tool."""
    path = key_path(key_dir, device)
    if not os.path.isdir(key_dir):
        raise CommandKeyError(f"the command key directory {key_dir} does not exist (or is not a directory)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CommandKeyError(f"command key {path}: cannot read it ({exc.strerror or exc.__class__.__name__})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CommandKeyError(f"command key {path}: not a regular file")
        try:
            data = os.read(fd, signing.KEY_FILE_MAX + 1)
        except OSError as exc:
            raise CommandKeyError(f"command key {path}: cannot read it ({exc.strerror or exc.__class__.__name__})") from None
    finally:
        os.close(fd)
    try:
        key = signing.parse_key(data)
    except signing.BadKey:
        raise CommandKeyError(f"command key {path} is malformed: it must be 64 lower-case hex characters "
                              "(and an optional newline)") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"infoscreenctl send: warning: command key {path} is accessible to other users "
              f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it", file=sys.stderr)
    return key


def read_ack(payload: bytes) -> Ack:
    """The schema v1 ack in a device's `payload`, or Unreadable saying why (printable, short).

    The size is checked first; msgspec's typed decoder refuses anything but the four keys with
    their types (so a nested value is refused where it stands, never walked), and a
    RecursionError or any other parser error is caught as well."""
    if len(payload) > MAX_ACK_BYTES:
        raise Unreadable(f"too large ({len(payload)} bytes; at most {MAX_ACK_BYTES} are read)")
    try:
        return decode_ack(payload)
    except RecursionError:
        raise Unreadable("nested too deep") from None
    except msgspec.DecodeError:
        raise Unreadable("not JSON") from None
    except msgspec.ValidationError as exc:
        raise Unreadable(printable(str(exc), 120)) from None
    except Exception:  # noqa: BLE001 - whatever else a parser may raise on hostile bytes
        raise Unreadable("not JSON") from None


class AckTracker:
    """The acks of one command, judged message by message. Pure state: no I/O (fuzzed directly).

    Only a message on one of `device`'s own ack topics, readable as a v1 ack, with a known status
    and this `command_id` counts: the uuid in the topic is the one the broker's ACL vouches for,
    whatever the payload says. What is kept is bounded (one record per known status), whatever
    the device sends; `feed` returns the lines to print (device text escaped and bounded; a few
    warnings, then only counts)."""

    def __init__(self, device: str, command_id: str, t0: float) -> None:
        self.ack_topics = frozenset(topics.ack_topics(device))
        self.ours = command_key(command_id)
        self.t0 = t0
        self.seen: dict[str, AckSeen] = {}
        self.topics_of: dict[str, set[str]] = {}
        self.order: list[AckSeen] = []
        self.duplicates = self.repeats = self.ignored = self.warnings = 0
        self.terminal: AckSeen | None = None

    def _stamp(self, at: float) -> str:
        return f"  {format_elapsed(at - self.t0):>10}  "

    def _warn(self, at: float, text: str) -> list[str]:
        self.warnings += 1
        out = []
        if self.warnings <= MAX_WARNINGS:
            out.append(self._stamp(at) + text)
        if self.warnings == MAX_WARNINGS:
            out.append(self._stamp(at) + "(further such lines are not printed; they are counted at the end)")
        return out

    def feed(self, topic: str, payload: bytes, at: float) -> list[str]:
        """Judge one received message; returns the lines to print. Never raises."""
        if topic not in self.ack_topics:
            return []  # not this device's ack topics: whatever it says, it is not about this command
        try:
            ack = read_ack(payload)
        except Unreadable as exc:
            self.ignored += 1
            return self._warn(at, f"warning: an ack on {_short_topic(topic)} is not schema v1 ({exc}); ignored")
        if command_key(ack.command_id) != self.ours:
            return []  # another command's ack (another operator, an earlier send)
        st = ack.status
        if st not in KNOWN_STATUSES:
            self.ignored += 1
            return self._warn(at, f"warning: an ack on {_short_topic(topic)} has an unknown status "
                                  f"{printable(st, 40)!r}; ignored")
        if self.terminal is not None:
            return []  # decided: nothing later changes the outcome
        if st in self.seen:
            if topic in self.topics_of[st]:
                self.repeats += 1
                if self.repeats <= MAX_WARNINGS:
                    return [self._stamp(at) + f"{st} again on {_short_topic(topic)} "
                            "(the device repeats the latest status when it sees the command again)"]
            else:
                self.duplicates += 1
                self.topics_of[st].add(topic)
            return []
        err_code = None if ack.error_code is None else printable(ack.error_code, 64)
        message = None if ack.error_message is None else printable(ack.error_message, 300)
        rec = AckSeen(st, err_code, message, topic, at - self.t0)
        self.seen[st] = rec
        self.topics_of[st] = {topic}
        self.order.append(rec)
        detail = ""
        if st == AckStatus.FAILED.value:
            detail = f"  {err_code or '?'}: {message or ''}".rstrip(": ")
        if st in TERMINAL_STATUSES:
            self.terminal = rec
        return [f"  {format_elapsed(rec.elapsed):>10}  {st}{detail}"]


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
    signature: str | None = None,
) -> SendResult:
    """Publish `payload` on the device's command topic with an already-connected `session` and
    follow the acks of `command_id`. The caller subscribed to both ack topics before (see
    `open_for_device`). `signature`: the `signature` user property of the PUBLISH (and of a
    re-send), None to send unsigned. Prints with `emit`; returns the outcome. The acks are judged
    by an `AckTracker`."""
    topic = topic or topics.commands(device)
    props = [(signing.SIGNATURE_PROPERTY, signature)] if signature is not None else None
    t0 = time.monotonic()
    # Wall clock -> monotonic once, so a clock step while waiting changes nothing.
    expires_mono = t0 + (expires_at - time.time())
    puback = session.publish(topic, payload, qos=1, retain=False, expiry_s=max(1.0, expires_at - time.time()),
                             user_properties=props)
    emit(f"  {format_elapsed(time.monotonic() - t0):>10}  published to {topic} (PUBACK: {rc_text(puback)})")
    if puback == RC_NO_MATCHING_SUBSCRIBERS:
        emit("  note: no session is subscribed to this device's commands: the device is not connected "
             "and has no persistent session, so nothing will receive this command")

    if wait:
        deadline = expires_mono if timeout is None else min(expires_mono, t0 + timeout)
    else:
        deadline = t0 + (DEFAULT_FOLLOW_S if timeout is None else timeout)
    tracker = AckTracker(device, command_id, t0)

    while tracker.terminal is None:
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
                                    expiry_s=max(1.0, expires_at - time.time()), user_properties=props)
                    emit(f"  {format_elapsed(time.monotonic() - t0):>10}  re-sent the same command (same command_id: "
                         "never executed twice) so the device repeats its latest status")
                except SessionError as exc:
                    emit(f"  {format_elapsed(time.monotonic() - t0):>10}  could not re-send the command: {exc}")
            else:
                emit(f"  {format_elapsed(item.at - t0):>10}  connection to the broker lost ({item.reason}); "
                     "reconnecting")
            continue
        assert isinstance(item, Received)
        for line in tracker.feed(item.topic, item.payload, item.at):
            emit(line)

    order, terminal = tracker.order, tracker.terminal
    duplicates, repeats, ignored = tracker.duplicates, tracker.repeats, tracker.ignored
    last = order[-1].status if order else "none"
    now = time.monotonic()
    if terminal is not None and terminal.status == AckStatus.COMPLETED.value:
        outcome, code = "completed", EXIT_COMPLETED
        line = f"completed: device {device} confirmed {action} {format_elapsed(terminal.elapsed)[1:]} after the publish"
    elif terminal is not None:
        outcome, code = "failed", EXIT_FAILED
        line = f"failed: {terminal.error_code or 'no error_code'}: {terminal.error_message or 'no message'}"
    elif wait and now >= expires_mono:
        outcome, code = ErrorCode.EXPIRED.value, EXIT_EXPIRED  # the contract's word for it
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
    if ignored:
        emit(f"note: {ignored} unreadable ack(s) or ack(s) with an unknown status ignored")
    if repeats > MAX_WARNINGS:
        emit(f"note: the device repeated a status {repeats} times")
    if session.dropped:
        emit(f"note: {session.dropped} message(s) dropped: they arrived faster than they could be read")
    return SendResult(command_id, action, code, outcome, order, duplicates, repeats, puback, line, ignored)


def open_for_device(session: Session, device: str) -> None:
    """Subscribe to both ack topics of `device` (wait for the SUBACK): call before publishing."""
    session.subscribe(list(topics.ack_topics(device)), qos=1)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "send",
        help="send a reboot or shutdown command to a device and follow its acks",
        description="Publish a power command (reboot or shutdown) to one screen, signed with its key, "
                    "and follow its acks.",
        epilog="exit status with --wait: 0 completed, 1 failed, 2 not sent, 3 expired, 4 --timeout reached",
    )
    p.add_argument("action", choices=sorted(ACTIONS), help=", ".join(f"{k} ({v})" for k, v in sorted(ACTIONS.items())))
    p.add_argument("--device", required=True, type=check_device_uuid, metavar="UUID", help="the device's CLIENT_UUID")
    p.add_argument("--expires-in", type=_expires_in, default=_expires_in(DEFAULT_EXPIRES_IN), metavar="DURATION",
                   help=f"the command's validity, e.g. 90s, 10m, 1h (default: {DEFAULT_EXPIRES_IN})")
    p.add_argument("--wait", action="store_true",
                   help="follow until completed (exit 0), failed (1) or expires_at (3)")
    p.add_argument("--timeout", type=parse_duration, metavar="DURATION",
                   help="stop following after this long (with --wait: exit 4 if no terminal status by then; "
                        f"without: default {DEFAULT_FOLLOW_S:g}s)")
    p.add_argument("--reason", metavar="TEXT", help="free text carried in the command's reason field")
    p.add_argument("--requested-by", metavar="WHO", default=None,
                   help="carried in the command's requested_by field (default: user@host (infoscreenctl))")
    p.add_argument("--keys", metavar="DIR", default=None,
                   help=f"directory of the server's command keys, DIR/<uuid>.key (default: ${KEYS_VAR}, "
                        f"else {KEYS_VAR} of the env file)")
    p.add_argument("--unsigned", action="store_true",
                   help="send without a signature even when the device has a key (to test its refusal)")
    add_connection_args(p)
    p.set_defaults(func=run)
    return p


def _signing_key(args: argparse.Namespace, env: dict[str, str], device: str) -> bytes | None:
    """The key to sign with, or None (unsigned, said in one stderr line); CommandKeyError."""
    if args.unsigned:
        print("infoscreenctl send: note: --unsigned: the command is sent without a signature "
              "(a device that has a command key refuses it: signature_invalid)", file=sys.stderr)
        return None
    key_dir = command_key_dir(args, env)
    if key_dir is None:
        print(f"infoscreenctl send: note: no command key directory (--keys, {KEYS_VAR}): the command is "
              "sent unsigned (a device that has a command key refuses it: signature_invalid)", file=sys.stderr)
        return None
    key = load_command_key(key_dir, device)
    if key is None:
        print(f"infoscreenctl send: note: no command key {key_path(key_dir, device)}: the command is sent "
              "unsigned (a device that has a command key refuses it: signature_invalid)", file=sys.stderr)
    return key


def run(args: argparse.Namespace) -> int:
    action = ACTIONS[args.action]
    device = args.device
    try:
        env = env_from_args(args)
        settings = settings_from_args(args, env)
        key = _signing_key(args, env, device)
    except (SessionError, CommandKeyError) as exc:
        print(f"infoscreenctl send: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    prepared = prepare_command(device, action, args.expires_in, key, reason=args.reason,
                               requested_by=args.requested_by or default_requested_by())
    cmd, payload, expires_at, signature = prepared.command, prepared.payload, prepared.expires_at, prepared.signature
    session = Session(settings)
    try:
        # With --wait the broker keeps our session (subscriptions, queued acks) across a connection
        # loss until a minute after expiry; it is dropped when we disconnect.
        follow_s = args.expires_in if args.wait else (args.timeout or DEFAULT_FOLLOW_S)
        session.connect(session_expiry=int(min(follow_s + 60, 7 * 86400)))
        open_for_device(session, device)
        print(f"{action} -> device {device} (as {settings.describe()})", flush=True)
        print(f"command_id {cmd.command_id}, expires_at {cmd.expires_at}, "
              + ("signed (hmac-sha256)" if signature is not None else "unsigned"), flush=True)
        result = follow_command(session, device, cmd.command_id, payload, action=action,
                                expires_at=expires_at, wait=args.wait, timeout=args.timeout,
                                signature=signature)
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
