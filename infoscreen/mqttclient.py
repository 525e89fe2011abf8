"""The one MQTT client layer off the device's worker: the operator tool (`infoscreenctl`) and the
alert unit (`infoscreen-notify-failure`) connect through it; the worker's own event-loop client
(workers/mqtt/connection.py) shares its TLS rules (`tls_context`, `configure_mqtt_security`).

* settings: the contract's MQTT_* variables, parsed by the client's own parser
  (infoscreen/config.py), so a value means the same to every program;
* TLS: TLS 1.2 at least, the certificate verified (CERT_REQUIRED) against MQTT_CA_FILE or the
  system store, and the broker's host name checked; never switched off;
* MQTT 5 reason codes named once;
* `Session`: a paho client whose every operation waits for the broker's answer (CONNACK,
  SUBACK, PUBACK) with a timeout and turns a refusal (reason code >= 128) into a
  `SessionError` with one clear line, never containing a secret.

Received messages are put on a queue, stamped with ``time.monotonic()`` on arrival (so timings
do not include the time spent printing). The queue is bounded (messages and bytes): a device
flooding its topics faster than a tool can handle them makes the session drop messages (counted
in `Session.dropped`), never grow without bound. TCP_NODELAY is set on the socket: without it
each QoS 1 round trip waits on Nagle's algorithm (tens of ms instead of well under one).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import socket
import ssl
import threading
import time
import uuid as uuidlib
from collections.abc import Mapping
from typing import Any, Iterable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import ClientConfig, ConfigError, load_config

log = logging.getLogger(__name__)

# The variables of a broker connection (docs/configuration.md), as the client reads them.
MQTT_VARS = ("MQTT_BROKER", "MQTT_PORT", "MQTT_USER", "MQTT_PASSWORD_BROKER", "MQTT_TLS", "MQTT_CA_FILE",
             "MQTT_CERT_FILE", "MQTT_KEY_FILE", "MQTT_ALLOW_PLAINTEXT")

# The inbox bound: far above what an honest fleet has in flight at once (a reply per device),
# small enough that a flood of maximum-size packets stays a few tens of MiB.
MAX_INBOX_MESSAGES = 20_000
MAX_INBOX_BYTES = 32 * 1024 * 1024

# MQTT 5 reason codes.
RC_SUCCESS = 0
RC_NO_MATCHING_SUBSCRIBERS = 16
RC_BAD_LOGIN = 134
RC_NOT_AUTHORIZED = 135
_RC_NAMES = {
    0: "success",
    16: "no matching subscribers",
    128: "unspecified error",
    131: "implementation specific error",
    132: "unsupported protocol version",
    133: "client identifier not valid",
    134: "bad user name or password",
    135: "not authorized",
    136: "server unavailable",
    137: "server busy",
    138: "banned",
    140: "bad authentication method",
    144: "topic name invalid",
    149: "packet too large",
    151: "quota exceeded",
    153: "payload format invalid",
}
# CONNACK reason codes after which retrying cannot help (protocol version, client id, bad login,
# not authorized, auth method); anything else may pass.
PERMANENT_CONNACK = frozenset({132, 133, 134, 135, 140})


class SessionError(Exception):
    """A connection or broker problem, described in one line (never containing a secret)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code  # the broker's reason code when it refused, else None

    @property
    def permanent(self) -> bool:
        """A refused login: trying again with the same settings cannot help."""
        return self.code in PERMANENT_CONNACK


def rc_int(value: Any) -> int:
    """A paho ReasonCode / MQTTErrorCode / int as an int."""
    if hasattr(value, "value"):
        return int(value.value)
    return int(value)


def rc_text(code: int) -> str:
    return f"{code} ({_RC_NAMES.get(code, 'reason code')})"


# ---- TLS ------------------------------------------------------------------------------------------


def tls_context(ca_file: str | None, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """The TLS rules of every client of the project: the CA file (or the system store), an
    optional client certificate; TLS 1.2 at least, certificate and host name verification on."""
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def configure_mqtt_security(client: mqtt.Client, cfg: ClientConfig, logger: logging.Logger = log) -> None:
    """Broker login and TLS from the configuration.

    Login (MQTT_USER / MQTT_PASSWORD_BROKER) is independent of the identity (CLIENT_UUID).
    TLS: see `tls_context`. Without login: one warning per call.
    """
    if cfg.mqtt_user:
        client.username_pw_set(cfg.mqtt_user, cfg.mqtt_password)
    else:
        logger.warning("connecting to %s:%d without a broker login (MQTT_USER unset)", cfg.mqtt_broker, cfg.mqtt_port)
    if cfg.mqtt_tls:
        client.tls_set_context(tls_context(cfg.mqtt_ca_file, cfg.mqtt_cert_file, cfg.mqtt_key_file))


# ---- settings -------------------------------------------------------------------------------------


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

    @classmethod
    def from_config(cls, cfg: ClientConfig, *, client_id: str | None = None,
                    connect_timeout: float = 10.0) -> "Settings":
        return cls(host=cfg.mqtt_broker, port=cfg.mqtt_port, user=cfg.mqtt_user, password=cfg.mqtt_password,
                   tls=cfg.mqtt_tls, ca_file=cfg.mqtt_ca_file, cert_file=cfg.mqtt_cert_file,
                   key_file=cfg.mqtt_key_file, client_id=client_id, connect_timeout=connect_timeout)


def settings_from_env(env: Mapping[str, str], *, client_id: str | None = None,
                      connect_timeout: float = 10.0) -> Settings:
    """The broker connection of the MQTT_* variables in `env`, read by the client's parser (only
    those: a bad value of an unrelated variable is not this connection's problem). ConfigError
    names the variable of a bad value."""
    cfg = load_config({k: env[k] for k in MQTT_VARS if k in env})
    return Settings.from_config(cfg, client_id=client_id, connect_timeout=connect_timeout)


__all__ = ["ConfigError", "MQTT_VARS", "PERMANENT_CONNACK", "RC_NO_MATCHING_SUBSCRIBERS", "RC_SUCCESS", "Received",
           "ConnectionEvent", "Session", "SessionError", "Settings", "configure_mqtt_security", "rc_int", "rc_text",
           "settings_from_env", "tls_context"]


# ---- the blocking session ---------------------------------------------------------------------------


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

    Subscriptions are (re)made on every connect when the broker did not keep the session, so a
    watcher survives a broker restart. Messages and connection changes arrive on `self.inbox` (a
    `queue.Queue` of `Received` / `ConnectionEvent`).

    `receive=False` (the alert unit, which resumes the device's own session): nothing the broker
    delivers is queued or acknowledged, so the broker keeps it for the device's worker.
    """

    def __init__(self, settings: Settings, *, client_id_prefix: str = "infoscreenctl", receive: bool = True) -> None:
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
            manual_ack=not receive,
        )
        c.on_socket_open = _set_nodelay
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        if receive:
            c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.reconnect_delay_set(min_delay=1, max_delay=8)
        c.connect_timeout = settings.connect_timeout
        if settings.user is not None:
            c.username_pw_set(settings.user, settings.password)
        if settings.tls:
            try:
                c.tls_set_context(tls_context(settings.ca_file, settings.cert_file, settings.key_file))
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

    def connect(self, *, session_expiry: int = 0, receive_maximum: int | None = None) -> "Session":
        """Connect and wait for the CONNACK; raise SessionError on a refusal (its `code`: the
        reason code).

        `session_expiry` > 0 asks the broker to keep the session (subscriptions, queued QoS 1
        messages) that long across a connection loss; paho's reconnects then resume it, and an
        existing session of this client id is resumed (no clean start). `receive_maximum`: how
        many QoS 1 messages the broker may have in flight to us."""
        s = self.settings
        props = Properties(PacketTypes.CONNECT)
        clean_start: Any = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if receive_maximum is not None:
            props.ReceiveMaximum = int(receive_maximum)
        if session_expiry > 0:
            props.SessionExpiryInterval = int(session_expiry)
            # Mosquitto 2.0 does not save a session created with clean start to its persistence
            # file, so it would not survive a broker restart. The operator tool's client id is new
            # for every run (unless --client-id is given), so there is no older session to resume
            # by mistake; the alert unit resumes the device's session on purpose.
            clean_start = False
        try:
            self._client.connect(s.host, s.port, keepalive=30, clean_start=clean_start, properties=props)
        except ssl.SSLCertVerificationError as exc:  # the CA, the name, the dates: say which
            raise SessionError(f"TLS handshake with {s.host}:{s.port} failed: the broker's certificate: "
                               f"{exc.verify_message or exc.reason}") from None
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
            if code in (RC_BAD_LOGIN, RC_NOT_AUTHORIZED):
                hint = " (check the account and its password: MQTT_USER / MQTT_PASSWORD_BROKER of the env file)"
            raise SessionError(f"the broker at {s.host}:{s.port} refused the login of "
                               f"{s.user or 'anonymous'}: {rc_text(code)}{hint}", code)
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
            hint = " (the ACL does not let this account write it)" if code == RC_NOT_AUTHORIZED else ""
            raise SessionError(f"the broker refused the publish to {topic}: {rc_text(code)}{hint}", code)
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


