"""One MQTT 5 connection with the server account, shared by the `infoscreenctl` sub-commands.

Where the connection settings come from, highest priority first:

1. the options ``--broker``, ``--port``, ``--user``, ``--password-file``, ``--tls``, ``--ca-file``,
   ``--cert-file``, ``--key-file``;
2. the env file given with ``--env FILE`` (default: ``$INFOSCREENCTL_ENV``), normally the
   ``server.env`` that ``infoscreenctl broker provision`` writes (``MQTT_BROKER``, ``MQTT_PORT``,
   ``MQTT_USER``, ``MQTT_PASSWORD_BROKER``, ``MQTT_TLS``, ``MQTT_CA_FILE``, ...);
3. ``localhost:1883`` (``8883`` with TLS), no login.

A password is never taken from the command line (where ``ps`` would show it): only from the env
file or from ``--password-file``. It never appears in a message or an error.

`Session` wraps paho-mqtt: every operation waits for the broker's answer (CONNACK, SUBACK, PUBACK)
with a timeout and turns a refusal (reason code >= 128) into a `SessionError` with one clear line.
Received messages are put on a queue, stamped with ``time.monotonic()`` on arrival (so timings
do not include the time spent printing). The queue is bounded (messages and bytes): a device
flooding its topics faster than a tool can handle them makes the session drop messages (counted
in `Session.dropped`), never grow without bound. TCP_NODELAY is set on the socket: without it
each QoS 1 round trip waits on Nagle's algorithm (tens of ms instead of well under one).

Everything a device publishes is untrusted: one compromised screen holds a device account and may
write any bytes, up to the broker's packet limit, on its own topics. `read_json`, `field` and
`printable` are the few rules the tools read such payloads with: a size cap checked before
parsing, every parser error (a recursion limit included) turned into `Unreadable`, a depth cap,
typed bounded fields, and text made safe for the operator's terminal.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import re
import socket
import ssl
import stat
import sys
import threading
import time
import types
import typing
import uuid as uuidlib
from typing import Any, Iterable

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from infoscreen.config import ConfigError, read_env_file
from infoscreen.wire import topics as wire_topics
from infoscreen.wire.ids import is_uuid

ENV_VAR_DEFAULT = "INFOSCREENCTL_ENV"
_TRUE = {"1", "true", "yes", "on"}

# The inbox bound: far above what an honest fleet has in flight at once (a reply per device),
# small enough that a flood of maximum-size packets stays a few tens of MiB.
MAX_INBOX_MESSAGES = 20_000
MAX_INBOX_BYTES = 32 * 1024 * 1024

# MQTT 5 reason codes shown to the operator.
RC_SUCCESS = 0
RC_NO_MATCHING_SUBSCRIBERS = 16
_RC_NAMES = {
    0: "success",
    16: "no matching subscribers",
    128: "unspecified error",
    131: "implementation specific error",
    133: "client identifier not valid",
    134: "bad user name or password",
    135: "not authorized",
    136: "server unavailable",
    137: "server busy",
    138: "banned",
    144: "topic name invalid",
    149: "packet too large",
    151: "quota exceeded",
    153: "payload format invalid",
}


class SessionError(Exception):
    """A connection or broker problem, described in one line (never containing a secret)."""


def rc_int(value: Any) -> int:
    """A paho ReasonCode / MQTTErrorCode / int as an int."""
    if hasattr(value, "value"):
        return int(value.value)
    return int(value)


def rc_text(code: int) -> str:
    return f"{code} ({_RC_NAMES.get(code, 'reason code')})"


def check_device_uuid(value: str) -> str:
    """A device UUID as used in topics: canonical 8-4-4-4-12 form, returned in lower case (the
    client generates lower-case ones and `broker provision` writes the ACL in lower case). Rejects
    anything else, in particular MQTT wildcards, which would widen a topic."""
    v = value.strip()
    if not is_uuid(v):
        raise argparse.ArgumentTypeError(f"not a device UUID (8-4-4-4-12 hex digits): {value!r}")
    return v.lower()


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str = "localhost"
    port: int = 1883
    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_id: str | None = None
    connect_timeout: float = 10.0

    def describe(self) -> str:
        who = self.user or "anonymous"
        return f"{who}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("broker connection (the server account)")
    g.add_argument("--env", metavar="FILE", default=os.environ.get(ENV_VAR_DEFAULT),
                   help="env file with MQTT_BROKER, MQTT_PORT, MQTT_USER, MQTT_PASSWORD_BROKER (and "
                        "MQTT_TLS, MQTT_CA_FILE, ...): the server.env written by `broker provision` "
                        f"(default: ${ENV_VAR_DEFAULT})")
    g.add_argument("--broker", metavar="HOST", help="broker host (overrides the env file)")
    g.add_argument("--port", type=int, metavar="N", help="broker port (overrides the env file)")
    g.add_argument("--user", metavar="NAME", help="broker account (overrides the env file)")
    g.add_argument("--password-file", metavar="FILE",
                   help="file whose first line is the password (there is no --password: a password "
                        "on the command line is visible to every user of the machine)")
    g.add_argument("--tls", action="store_true", default=None, help="connect with TLS")
    g.add_argument("--ca-file", metavar="FILE", help="CA certificate(s) to verify the broker with")
    g.add_argument("--cert-file", metavar="FILE", help="client certificate (TLS)")
    g.add_argument("--key-file", metavar="FILE", help="client key (TLS)")
    g.add_argument("--client-id", metavar="ID", help="MQTT client id (default: infoscreenctl-<random>)")
    g.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the broker to accept the connection (default: 10)")


def _warn(text: str) -> None:
    print(f"infoscreenctl: warning: {text}", file=sys.stderr)


def _read_secret_file(path: str, what: str) -> str:
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as fh:
            first = fh.readline().rstrip("\r\n")
    except OSError as exc:
        raise SessionError(f"{what}: cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None
    except UnicodeDecodeError:
        raise SessionError(f"{what}: {path} is not UTF-8 text") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        _warn(f"{path} holds a password and is accessible to other users "
              f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    return first


def env_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The variables of the env file given with ``--env`` (none: empty); SessionError if it
    cannot be read. Warns once when it holds a password that other users can read."""
    env: dict[str, str] = {}
    if getattr(args, "env", None):
        try:
            env = read_env_file(args.env)
        except ConfigError as exc:
            raise SessionError(f"--env: {exc}".replace("configuration error: --env-file: ", "")) from None
        try:
            st = os.stat(args.env)
            if env.get("MQTT_PASSWORD_BROKER") and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                _warn(f"{args.env} holds a password and is accessible to other users "
                      f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        except OSError:
            pass
    return env


def settings_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> Settings:
    """Merge the options over the env file (`env`: its variables, already read by
    `env_from_args`; None: read it here); raise SessionError on a bad value."""
    if env is None:
        env = env_from_args(args)

    def pick(opt: str, var: str) -> str | None:
        v = getattr(args, opt, None)
        if v is not None:
            return str(v)
        v = env.get(var)
        return v if v not in (None, "") else None

    tls_opt = getattr(args, "tls", None)
    tls = bool(tls_opt) if tls_opt is not None else (env.get("MQTT_TLS", "").strip().lower() in _TRUE)
    host = pick("broker", "MQTT_BROKER") or "localhost"
    port_text = pick("port", "MQTT_PORT")
    try:
        port = int(port_text) if port_text is not None else (8883 if tls else 1883)
    except ValueError:
        raise SessionError(f"MQTT_PORT: not a port number: {port_text!r}") from None
    if not 1 <= port <= 65535:
        raise SessionError(f"port {port} is not a TCP port")
    user = pick("user", "MQTT_USER")
    password: str | None = None
    if getattr(args, "password_file", None):
        password = _read_secret_file(args.password_file, "--password-file")
    elif env.get("MQTT_PASSWORD_BROKER"):
        password = env["MQTT_PASSWORD_BROKER"]
    if password is not None and user is None:
        raise SessionError("a password is given but no account: set --user or MQTT_USER")
    if user is None:
        _warn("no broker account given (--env server.env or --user): connecting without login")
    timeout = float(getattr(args, "connect_timeout", 10.0) or 10.0)
    if not 0 < timeout <= 600:
        raise SessionError("--connect-timeout must be between 0 and 600 seconds")
    return Settings(
        host=host,
        port=port,
        user=user,
        password=password,
        tls=tls,
        ca_file=pick("ca_file", "MQTT_CA_FILE"),
        cert_file=pick("cert_file", "MQTT_CERT_FILE"),
        key_file=pick("key_file", "MQTT_KEY_FILE"),
        client_id=getattr(args, "client_id", None),
        connect_timeout=timeout,
    )


@dataclasses.dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    at: float  # time.monotonic() when paho handed it over


@dataclasses.dataclass(frozen=True)
class ConnectionEvent:
    """Put on the message queue when the connection drops or comes back."""

    connected: bool
    reason: str
    session_present: bool
    at: float


def _set_nodelay(client: Any, userdata: Any, sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # a websocket or TLS wrapper without the option
        pass


class Session:
    """A paho MQTT 5 client with blocking, checked operations.

    `subscriptions` given to `connect()` are (re)made on every connect when the broker did not keep
    the session, so a watcher survives a broker restart. Messages and connection changes arrive on
    `self.inbox` (a `queue.Queue` of `Received` / `ConnectionEvent`).
    """

    def __init__(self, settings: Settings, *, client_id_prefix: str = "infoscreenctl") -> None:
        self.settings = settings
        self.client_id = settings.client_id or f"{client_id_prefix}-{uuidlib.uuid4().hex[:12]}"
        self.inbox: "queue.Queue[Received | ConnectionEvent]" = queue.Queue()
        self._inbox_lock = threading.Lock()
        self._inbox_messages = 0
        self._inbox_bytes = 0
        self.dropped = 0  # messages not queued because the inbox was full
        self._cond = threading.Condition()
        self._connack: int | None = None
        self._connected = False
        self._ever_connected = False
        self._acks: dict[int, Any] = {}
        self._subscriptions: list[tuple[str, int]] = []
        self._auto_subscribe_mids: set[int] = set()
        self._loop = False
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        c.on_socket_open = _set_nodelay
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.reconnect_delay_set(min_delay=1, max_delay=8)
        c.connect_timeout = settings.connect_timeout
        if settings.user is not None:
            c.username_pw_set(settings.user, settings.password)
        if settings.tls:
            try:
                c.tls_set(
                    ca_certs=settings.ca_file,
                    certfile=settings.cert_file,
                    keyfile=settings.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise SessionError(f"TLS setup failed: {exc}") from None
        self._client = c

    # ---- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        code = rc_int(reason_code)
        session_present = bool(getattr(flags, "session_present", False))
        with self._cond:
            self._connack = code
            was_connected_before = self._ever_connected
            self._connected = code == 0
            if code == 0:
                self._ever_connected = True
            self._cond.notify_all()
        if code == 0 and was_connected_before:
            # A reconnect: paho's own loop did it. Subscriptions are gone unless the broker kept
            # the session.
            if not session_present and self._subscriptions:
                rc, mid = client.subscribe(self._subscriptions)
                if rc == mqtt.MQTT_ERR_SUCCESS:
                    with self._cond:
                        self._auto_subscribe_mids.add(mid)
            self.inbox.put(ConnectionEvent(True, "reconnected", session_present, time.monotonic()))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            was = self._connected
            self._connected = False
            self._cond.notify_all()
        if was:
            self.inbox.put(ConnectionEvent(False, str(reason_code), False, time.monotonic()))

    def _on_message(self, client, userdata, msg) -> None:
        # paho re-raises what a callback raises, ending its network thread: never raise here.
        try:
            topic = msg.topic  # decoded as UTF-8 (a broker enforces it; a bad one is dropped)
            payload = bytes(msg.payload)
        except Exception:  # noqa: BLE001
            with self._inbox_lock:
                self.dropped += 1
            return
        size = len(payload)
        with self._inbox_lock:
            if (self._inbox_messages >= MAX_INBOX_MESSAGES
                    or self._inbox_bytes + size > MAX_INBOX_BYTES):
                # Dropping, not blocking: a blocked network thread would also stop the PUBACKs
                # that a publish waits for (a deadlock until its timeout).
                self.dropped += 1
                return
            self._inbox_messages += 1
            self._inbox_bytes += size
        self.inbox.put(Received(topic, payload, bool(msg.retain), msg.qos, time.monotonic()))

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        with self._cond:
            if mid in self._auto_subscribe_mids:
                self._auto_subscribe_mids.discard(mid)
                return
            self._acks[mid] = [rc_int(r) for r in reason_code_list]
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self._acks[mid] = rc_int(reason_code)
            self._cond.notify_all()

    # ---- operations ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self, *, session_expiry: int = 0) -> "Session":
        """Connect (clean start) and wait for the CONNACK; raise SessionError on a refusal.

        `session_expiry` > 0 asks the broker to keep the session (subscriptions, queued QoS 1
        messages) that long across a connection loss; paho's reconnects then resume it."""
        s = self.settings
        props = Properties(PacketTypes.CONNECT)
        clean_start: Any = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if session_expiry > 0:
            props.SessionExpiryInterval = int(session_expiry)
            # Mosquitto 2.0 does not save a session created with clean start to its persistence
            # file, so it would not survive a broker restart. The client id is new for every run
            # (unless --client-id is given), so there is no older session to resume by mistake.
            clean_start = False
        try:
            self._client.connect(s.host, s.port, keepalive=30, clean_start=clean_start, properties=props)
        except ssl.SSLError as exc:
            raise SessionError(f"TLS handshake with {s.host}:{s.port} failed: {exc.reason or exc}") from None
        except (OSError, ValueError) as exc:
            detail = getattr(exc, "strerror", None) or str(exc) or exc.__class__.__name__
            raise SessionError(f"cannot connect to the broker at {s.host}:{s.port}: {detail}") from None
        self._client.loop_start()
        self._loop = True
        deadline = time.monotonic() + s.connect_timeout
        with self._cond:
            while self._connack is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            code = self._connack
        if code is None:
            self.close()
            raise SessionError(f"the broker at {s.host}:{s.port} did not answer the connection "
                               f"within {s.connect_timeout:g} s")
        if code != 0:
            self.close()
            hint = ""
            if code in (134, 135):
                hint = " (check the account and its password: MQTT_USER / MQTT_PASSWORD_BROKER of the env file)"
            raise SessionError(f"the broker at {s.host}:{s.port} refused the login of "
                               f"{s.user or 'anonymous'}: {rc_text(code)}{hint}")
        return self

    def _wait_ack(self, mid: int, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._acks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SessionError(f"no answer from the broker to {what} within {timeout:g} s")
                self._cond.wait(remaining)
            return self._acks.pop(mid)

    def subscribe(self, topics: Iterable[str], qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe to all `topics` in one SUBSCRIBE and wait for the SUBACK; a refused one raises.
        They are remade after a reconnect that lost the session."""
        subs = [(t, qos) for t in topics]
        rc, mid = self._client.subscribe(subs)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise SessionError(f"cannot subscribe: {mqtt.error_string(rc)}")
        codes = self._wait_ack(mid, timeout, "the subscription")
        refused = [(t, c) for (t, _), c in zip(subs, codes) if c >= 128]
        if refused:
            raise SessionError("the broker refused the subscription to "
                               + ", ".join(f"{t}: {rc_text(c)}" for t, c in refused))
        self._subscriptions.extend(subs)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                timeout: float = 10.0, expiry_s: float | None = None,
                user_properties: list[tuple[str, str]] | None = None) -> int:
        """Publish and, at QoS 1, wait for the PUBACK. Returns its reason code (0, or 16: nobody
        subscribed); raises SessionError on a refusal (>= 128: e.g. 135, not authorized).
        `expiry_s`: MQTT 5 Message Expiry Interval, so the broker (whose clock is right) drops a
        message still queued for an offline device once it is stale. `user_properties`: MQTT 5
        user properties of the PUBLISH (a signed command's `signature`)."""
        props = None
        if expiry_s is not None or user_properties:
            props = Properties(PacketTypes.PUBLISH)
        if expiry_s is not None:
            props.MessageExpiryInterval = max(1, int(expiry_s + 0.999))
        if user_properties:
            props.UserProperty = list(user_properties)
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise SessionError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return RC_SUCCESS
        code = self._wait_ack(info.mid, timeout, f"the publish to {topic}")
        if code >= 128:
            hint = " (the ACL does not let this account write it)" if code == 135 else ""
            raise SessionError(f"the broker refused the publish to {topic}: {rc_text(code)}{hint}")
        return code

    def get(self, timeout: float | None) -> "Received | ConnectionEvent | None":
        """The next message or connection event, or None after `timeout` seconds."""
        try:
            if timeout is not None and timeout <= 0:
                item = self.inbox.get_nowait()
            else:
                item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, Received):
            with self._inbox_lock:
                self._inbox_messages -= 1
                self._inbox_bytes -= len(item.payload)
        return item

    def close(self, *, end_session: bool = True) -> None:
        """Disconnect cleanly (asking the broker to drop a kept session) and stop the loop."""
        try:
            if self._connected:
                props = None
                if end_session:
                    props = Properties(PacketTypes.DISCONNECT)
                    props.SessionExpiryInterval = 0
                self._client.disconnect(properties=props)
        except Exception:  # noqa: BLE001 - closing must not fail
            pass
        if self._loop:
            self._client.loop_stop()
            self._loop = False

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_session(args: argparse.Namespace, *, subscriptions: Iterable[str] = (), session_expiry: int = 0,
                 client_id_prefix: str = "infoscreenctl") -> Session:
    """Settings from `args`, connected, subscribed."""
    s = Session(settings_from_args(args), client_id_prefix=client_id_prefix)
    s.connect(session_expiry=session_expiry)
    subs = list(subscriptions)
    if subs:
        try:
            s.subscribe(subs)
        except BaseException:
            s.close()
            raise
    return s


def format_elapsed(seconds: float) -> str:
    """+0.4 ms, +12.3 ms, +1.25 s, +1 m 05 s."""
    if seconds < 1.0:
        return f"+{seconds * 1000:.1f} ms"
    if seconds < 60:
        return f"+{seconds:.2f} s"
    m, s = divmod(int(seconds), 60)
    return f"+{m} m {s:02d} s"


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


# ---- payloads from devices (untrusted) -----------------------------------------------------------

MAX_DEPTH = 32  # the contract's payloads are at most 3 levels deep
# How many devices a tool keeps state for, from the uuids in the topics it sees: far above a
# fleet, and a bound on memory however many topics a broker (misconfigured ACL) lets through.
MAX_DEVICES = 10_000


class Unreadable(ValueError):
    """A device's payload that is not read; the message says why in a few words, never quoting it."""


def device_of(topic: str, kind: str) -> str | None:
    """The device uuid of the per-device topic `kind` (a row of wire.topics.TABLE: "heartbeat",
    "health", "service_failed", "ack", ...), else None. Everything a tool reports about a device
    is keyed on this uuid, the one the broker's ACL ties to the publishing account, never on a
    uuid inside a payload."""
    return wire_topics.device_topic(topic, kind)


def _depth_within(obj: Any, limit: int) -> bool:
    # Iterative: a recursive walk is what a deeply nested payload is built to break.
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return False
            children = value.values() if isinstance(value, dict) else value
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


def read_json(payload: bytes, max_bytes: int) -> Any:
    """The JSON value of a device's `payload`, or `Unreadable`.

    The size is checked before anything is parsed. msgspec's parser refuses what is not strict
    JSON (NaN, Infinity, lone surrogates, integers beyond 64 bits) and raises RecursionError on
    deep nesting; what it accepts deeper than MAX_DEPTH is refused too, so no later recursive
    step (printing it as JSON) can hit the recursion limit."""
    if len(payload) > max_bytes:
        raise Unreadable(f"too large ({len(payload)} bytes; at most {max_bytes} are read)")
    try:
        obj = msgspec.json.decode(payload)
    except RecursionError:
        raise Unreadable("nested too deep") from None
    except Exception:  # noqa: BLE001 - DecodeError, ValidationError (a number out of range), ...
        raise Unreadable("not JSON") from None
    if not _depth_within(obj, MAX_DEPTH):
        raise Unreadable("nested too deep")
    return obj


def field(obj: Any, key: str, typ: Any) -> Any:
    """`obj[key]` as `typ` (a msgspec type, its bounds included: e.g. a str of at most 64
    characters), or None when `obj` is not an object, the key is absent or null, or the value
    is not of that type. One wrong field costs that field only."""
    if not isinstance(obj, dict):
        return None
    value = obj.get(key)
    if value is None:
        return None
    try:
        return msgspec.convert(value, typ)
    except (msgspec.ValidationError, TypeError, ValueError):
        return None


def _struct_of(typ: Any) -> Any:
    """The Struct type of a field typed `S` or `S | None`, else None."""
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
        return typ
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if typing.get_origin(typ) in (typing.Union, types.UnionType) and len(args) == 1:
        return _struct_of(args[0])
    return None


def fields_of(obj: Any, struct: type[msgspec.Struct]) -> dict[str, Any]:
    """Every field of the wire payload `struct` (wire/schema.py) read from a device's JSON value
    `obj` one by one, with the field's own type and bounds: a missing or wrong field is None (a
    nested payload block: the dict of its fields, or None when it is not an object), so one
    wrong field costs that field only. `obj` itself not an object: every field is None."""
    out: dict[str, Any] = {}
    for f in msgspec.structs.fields(struct):
        nested = _struct_of(f.type)
        if nested is not None:
            value = obj.get(f.name) if isinstance(obj, dict) else None
            out[f.name] = fields_of(value, nested) if isinstance(value, dict) else None
        else:
            out[f.name] = field(obj, f.name, f.type)
    return out


def printable(text: str, max_len: int = 200) -> str:
    """A device's text made safe to print on the operator's terminal: characters that are not
    printable (ESC and the other controls, CR, bidi overrides, line separators) are written as
    escapes, so no payload can move the cursor or redraw another device's row; at most
    `max_len` characters, a longer text ends with "...". """
    cut = len(text) > max_len
    head = text[:max_len]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in head)
    if cut or len(head) > max_len:
        return head[: max_len - 3] + "..." if max_len >= 3 else head[:max_len]
    return head
