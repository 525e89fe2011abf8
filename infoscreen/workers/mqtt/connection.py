"""The broker connection: paho-mqtt 2.x driven by our own loop, no paho thread.

* a fresh paho ``Client`` per connection attempt: paho's in-memory queue of the last
  connection is thrown away with it, so only the outbox decides what is (re)published;
* MQTT 5, client id = CLIENT_UUID, ``clean_start=False`` with a session expiry of 7 days:
  QoS 1 commands sent while the screen is offline are delivered when it returns;
* QoS 1 subscriptions with retain handling 1 (retained messages only on a *new*
  subscription), so a persistent session does not get the retained command again on
  every reconnect; duplicates are handled anyway (store);
* incoming QoS 1 messages are acknowledged manually, once the handler is done with them
  (a command's record committed): a crash before that gets them redelivered. The handler
  (intake.py) ends every message acknowledged, a poison one after a bounded number of tries;
* an MQTT 5 Maximum Packet Size is advertised on connect and enforced on what is read: a
  broker that sends a larger packet is disconnected before the packet is allocated;
* TCP_NODELAY on the socket (a QoS 1 round trip: 88 ms with Nagle, 0.36 ms without);
* connect bounded by ``connect_timeout`` (well under the hang timeout) and CONNACK by
  :data:`CONNACK_TIMEOUT_S`; reconnect forever with capped exponential backoff and jitter;
* the socket is a reader of the loop, a writer only while paho has bytes to write,
  ``loop_misc`` (keepalive) every second.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ...config import ClientConfig
from ...loop import Loop, Timer
from ...mqttclient import configure_mqtt_security  # noqa: F401 - TLS rules shared with every client

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 86400
KEEPALIVE_S = 30
CONNACK_TIMEOUT_S = 5.0
BACKOFF_MIN_S = 0.25
BACKOFF_MAX_S = 30.0
MAX_QUEUED = 2000
# Commands are at most 4 KiB; events and group payloads far less than this. The provisioned
# broker's max_packet_size is the same, so it never sends us more.
MAX_PACKET_BYTES = 256 * 1024
READ_CHUNK = 64 * 1024


def _rc(value: object) -> int:
    if hasattr(value, "value"):
        return int(value.value)  # type: ignore[attr-defined]
    return int(value)  # type: ignore[arg-type]


class _BoundedClient(mqtt.Client):
    """paho reads a packet's remaining length, then asks the socket for all of it in one call,
    which allocates that much at once (a 256 MiB publish took the worker to 801 MiB). Refuse a
    packet over our Maximum Packet Size before that, and read at most READ_CHUNK per call.
    paho 2.x's ``_sock_recv`` and ``_in_packet`` (the dependency is pinned below 3)."""

    oversize = False

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._in_packet["remaining_length"] > MAX_PACKET_BYTES:
            self.oversize = True
            raise OSError(errno.EMSGSIZE, "packet larger than our Maximum Packet Size")
        return super()._sock_recv(min(bufsize, READ_CHUNK))


@dataclass(frozen=True)
class Incoming:
    """One received PUBLISH, as the intake sees it."""

    topic: str
    payload: bytes
    retain: bool
    dup: bool  # the broker resent it: a previous delivery was never acknowledged
    signature: str | None  # the `signature` user property, unchanged (the helper verifies it)
    mid: int = 0
    qos: int = 0
    client: Any = field(default=None, repr=False, compare=False)  # its ack is valid only there


def _signature(properties: Any) -> str | None:
    values = [v for k, v in getattr(properties, "UserProperty", None) or () if k == "signature"]
    return values[0] if len(values) == 1 else ("" if values else None)  # two: not one signature


@dataclass
class Handlers:
    connected: Callable[[bool], None]  # session_present
    disconnected: Callable[[str], None]
    message: Callable[[Incoming], bool]  # True: acknowledge now; False: the handler will ack()
    puback: Callable[[int, int, str], None]  # mid, reason code, topic


class Connection:
    def __init__(self, cfg: ClientConfig, loop: Loop, handlers: Handlers, warned_login: bool = False) -> None:
        self.cfg = cfg
        self.loop = loop
        self.h = handlers
        self.client: mqtt.Client | None = None
        self._sock: int | None = None
        self._writer = False
        self.connected = False
        self._attempt_timer: Timer | None = None
        self._misc_timer: Timer | None = None
        self._connack_timer: Timer | None = None
        self._failures = 0
        self._warned_login = warned_login
        self._stopping = False
        self._reading = False  # inside loop_read: paho callbacks run, nothing is written
        # Run once loop_read has returned, in order: "connected", then the messages it read.
        self._after_read: list[Callable[[], object]] = []
        self.subscriptions: set[str] = set()
        self._pub_topics: dict[int, str] = {}
        self.connect_timeout = max(0.5, min(3.0, cfg.worker_hang_timeout_s / 4))

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._schedule_attempt(0.0)

    def stop(self) -> None:
        self._stopping = True
        if self._attempt_timer is not None:
            self._attempt_timer.cancel()
        c = self.client
        if c is not None and self.connected:
            try:
                c.disconnect()
                self._flush()
            except Exception:  # noqa: BLE001
                pass
        self._teardown("worker stopping", notify=False)

    def _schedule_attempt(self, delay: float) -> None:
        if self._stopping:
            return
        if self._attempt_timer is not None:
            self._attempt_timer.cancel()
        self._attempt_timer = self.loop.call_later(delay, self._attempt)

    def _backoff(self) -> float:
        self._failures += 1
        base = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(self._failures - 1, 10))
        return base * random.uniform(0.5, 1.0)

    def _attempt(self) -> None:
        self._attempt_timer = None
        client = _BoundedClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.cfg.client_uuid or "",
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
            manual_ack=True,
        )
        client.suppress_exceptions = True
        client.connect_timeout = self.connect_timeout
        client.max_queued_messages_set(MAX_QUEUED)
        try:
            if self._warned_login:
                quiet = logging.getLogger("infoscreen.quiet")
                quiet.disabled = True
                configure_mqtt_security(client, self.cfg, quiet)
            else:
                configure_mqtt_security(client, self.cfg)
                self._warned_login = True
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("TLS configuration failed: %s", exc)
            self._schedule_attempt(self._backoff())
            return
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.MaximumPacketSize = MAX_PACKET_BYTES
        self.client = client
        try:
            client.connect(self.cfg.mqtt_broker, self.cfg.mqtt_port, KEEPALIVE_S, clean_start=False, properties=props)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.client = None
            delay = self._backoff()
            if self._failures <= 3 or self._failures % 20 == 0:
                log.warning("cannot connect to the broker %s:%d: %s (retry in %.1f s)",
                            self.cfg.mqtt_broker, self.cfg.mqtt_port, exc, delay)
            self._schedule_attempt(delay)
            return
        sock = client.socket()
        # The loop's poller reports plain sockets by file descriptor: register the fd.
        self._sock = sock.fileno()
        self.loop.add_reader(self._sock, self._on_readable)
        self._connack_timer = self.loop.call_later(CONNACK_TIMEOUT_S, self._connack_timeout)
        self._misc_timer = self.loop.call_later(1.0, self._misc)
        self._flush()

    def _on_socket_open(self, client, userdata, sock) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    def _connack_timeout(self) -> None:
        self._connack_timer = None
        if not self.connected:
            log.warning("no CONNACK within %.0f s; reconnecting", CONNACK_TIMEOUT_S)
            self._teardown("no CONNACK", notify=False)
            self._schedule_attempt(self._backoff())

    def _teardown(self, why: str, notify: bool) -> None:
        was = self.connected
        self.connected = False
        for t in (self._misc_timer, self._connack_timer):
            if t is not None:
                t.cancel()
        self._misc_timer = self._connack_timer = None
        if self._sock is not None:
            self.loop.remove_reader(self._sock)
            self.loop.remove_writer(self._sock)
            self._writer = False
            self._sock = None
        c, self.client = self.client, None
        if c is not None:
            c.on_disconnect = None
            c.on_socket_open = None
            try:
                s = c.socket()
                if s is not None:
                    s.close()
            except Exception:  # noqa: BLE001
                pass
        self._pub_topics.clear()
        if was and notify:
            self.h.disconnected(why)

    # -- I/O -------------------------------------------------------------------------------
    def _flush(self) -> None:
        """Write what paho queued; keep a writer registered only while bytes remain.

        Never from inside loop_read (a publish or subscribe made by a paho callback): a write
        that fails there makes paho call on_disconnect under the callback lock it already holds
        for on_message, a deadlock. _on_readable flushes once loop_read has returned."""
        c = self.client
        if c is None or self._sock is None or self._reading:
            return
        if c.want_write():
            rc = c.loop_write()
            if rc != mqtt.MQTT_ERR_SUCCESS or self.client is None:
                return
        want = c.want_write()
        if want and not self._writer:
            self.loop.add_writer(self._sock, self._on_writable)
            self._writer = True
        elif not want and self._writer:
            self.loop.remove_writer(self._sock)
            self._writer = False

    def _on_readable(self) -> None:
        c = self.client
        if c is None:
            return
        self._reading = True
        try:
            self._read_all(c)
        finally:
            self._reading = False
        self._flush()
        later, self._after_read = self._after_read, []
        for fn in later:
            fn()

    def _read_all(self, c: mqtt.Client) -> None:
        c.loop_read()
        # With TLS, whole packets can wait decrypted in the SSL object while the socket itself
        # has nothing more to read, so the poller would not wake us for them: drain them now.
        sock = c.socket()
        while c is self.client and sock is not None and getattr(sock, "pending", lambda: 0)() > 0:
            c.loop_read()
            sock = c.socket()

    def _on_writable(self) -> None:
        c = self.client
        if c is None:
            return
        c.loop_write()
        self._flush()

    def _misc(self) -> None:
        self._misc_timer = None
        c = self.client
        if c is None:
            return
        c.loop_misc()
        if self.client is c:
            self._misc_timer = self.loop.call_later(1.0, self._misc)
            self._flush()

    # -- paho callbacks (never raise: every one is guarded) -----------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            rc = _rc(reason_code)
            if client is not self.client:
                return
            if rc != 0:
                log.error("the broker refused the connection: %s (reason code %d)", reason_code, rc)
                self.loop.call_later(0.0, lambda: (self._teardown("refused", notify=False),
                                                    self._schedule_attempt(self._backoff())))
                return
            if self._connack_timer is not None:
                self._connack_timer.cancel()
                self._connack_timer = None
            self.connected = True
            self._failures = 0
            for topic in sorted(self.subscriptions):
                self._subscribe(topic)
            # Announced once the subscriptions are written (after loop_read): whoever hears
            # "connected" may rely on them being on their way to the broker.
            present = bool(getattr(flags, "session_present", False))
            self._after_read.append(lambda: self.client is client and self.h.connected(present))
        except Exception:  # noqa: BLE001
            log.exception("error in on_connect")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if client is not self.client:
                return
            why = f"{reason_code}"
            was = self.connected
            # Tear down outside paho's own call stack.
            self.loop.call_later(0.0, lambda: self._after_disconnect(client, why, was))
        except Exception:  # noqa: BLE001
            log.exception("error in on_disconnect")

    def _after_disconnect(self, client, why: str, was_connected: bool) -> None:
        if client is not self.client:
            return
        if getattr(client, "oversize", False):
            log.warning("the broker sent a packet larger than our Maximum Packet Size (%d bytes); "
                        "disconnected before reading it", MAX_PACKET_BYTES)
        elif was_connected:
            log.warning("lost the broker connection: %s", why)
        self._teardown(why, notify=True)
        self._schedule_attempt(BACKOFF_MIN_S * random.uniform(0.5, 1.0) if was_connected else self._backoff())

    def _on_message(self, client, userdata, msg) -> None:
        # Handled once loop_read has returned, outside paho's callback lock: what the handler
        # publishes (a command's `accepted`) is then written to the socket at once, not after
        # the whole read pass. The PUBACK goes out only once the handler is done with the
        # message (a command's record is committed by then); the handler decides when
        # (intake.py).
        try:
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                topic = None  # not a topic we subscribed to: nothing to keep it for
            if topic is None:
                self._ack(client, msg.mid, msg.qos)
                return
            m = Incoming(topic, bytes(msg.payload), bool(msg.retain), bool(msg.dup),
                         _signature(getattr(msg, "properties", None)), msg.mid, msg.qos, client)
        except Exception:  # noqa: BLE001 - never raise into paho / the loop; never jam the session
            log.exception("error reading a message; acknowledged to the broker all the same")
            self._ack(client, msg.mid, msg.qos)
            return
        self._after_read.append(lambda: self._deliver(m))

    def _deliver(self, m: Incoming) -> None:
        now = True
        try:
            now = self.h.message(m)
        except Exception:  # noqa: BLE001 - never raise into the loop; never jam the session
            log.exception("error handling a message; acknowledged to the broker all the same")
        if now:
            self._ack(m.client, m.mid, m.qos)
            self._flush()

    def _ack(self, client, mid: int, qos: int) -> None:
        if qos > 0 and client is self.client:  # a mid means nothing on another connection
            try:
                client.ack(mid, qos)
            except Exception:  # noqa: BLE001
                pass

    def current(self, m: Incoming) -> bool:
        return m.client is self.client

    def ack(self, m: Incoming) -> bool:
        """Acknowledge a message whose handling was deferred; False once its connection is gone
        (the broker then delivers it again, with the DUP flag)."""
        if m.client is not self.client:
            return False
        self._ack(m.client, m.mid, m.qos)
        self._flush()
        return True

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        try:
            if client is not self.client:
                return
            topic = self._pub_topics.pop(mid, "?")
            self.h.puback(mid, _rc(reason_code), topic)
        except Exception:  # noqa: BLE001
            log.exception("error in on_publish")

    # -- API -----------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """The message id, or None when not connected or the client's queue is full."""
        c = self.client
        if c is None or not self.connected:
            return None
        try:
            info = c.publish(topic, payload, qos=qos, retain=retain)
        except (ValueError, OSError) as exc:
            log.warning("publish on %s failed: %s", topic, exc)
            return None
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN) or self.client is not c:
            return None
        if qos > 0:
            self._pub_topics[info.mid] = topic
        self._flush()
        return info.mid

    def _subscribe(self, topic: str) -> None:
        c = self.client
        if c is None:
            return
        opts = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        c.subscribe(topic, options=opts)
        self._flush()

    def subscribe(self, topic: str) -> None:
        self.subscriptions.add(topic)
        if self.connected:
            self._subscribe(topic)

    def unsubscribe(self, topic: str) -> None:
        self.subscriptions.discard(topic)
        if self.connected and self.client is not None:
            self.client.unsubscribe(topic)
            self._flush()
