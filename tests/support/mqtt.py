"""`MqttProbe`: a small synchronous MQTT 5 test client on top of paho-mqtt 2.x.

Every call waits on the broker's answer (CONNACK, SUBACK, PUBACK) or on a message's arrival,
through a condition variable fed by paho's network thread: never a sleep loop. Every wait has a
timeout and raises `TimeoutError` with what was received so far.

    probe = MqttProbe(broker.host, broker.port, username=..., password=...).connect()
    probe.subscribe("infoscreen/+/commands/ack")
    rc = probe.publish("infoscreen/x/commands", {"command_id": ...})  # 0, or 135: not authorized
    msg = probe.wait_for("infoscreen/x/commands/ack", lambda m: m.json()["status"] == "accepted")
    probe.assert_nothing("infoscreen/y/#", within=0.3)

TLS: a probe for the host and port of a fixture broker (tests/support/broker.py) pins that broker's
CA, as every client of a provisioned broker does; `ca_file=` names another CA, `ca_file=None`
asks for a plaintext connection.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import socket
import threading
import time
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

# MQTT 5 reason codes the tests look at.
SUCCESS = 0
NO_MATCHING_SUBSCRIBERS = 16  # a PUBACK for an authorised publish nobody subscribed to
NOT_AUTHORIZED = 135  # 0x87
BAD_USERNAME_OR_PASSWORD = 134  # 0x86


# (host, port) -> the CA file of the fixture broker provisioned there (set by the fixture).
_TRUSTED: dict[tuple[str, int], str] = {}
_AUTO = object()


def trust(host: str, port: int, ca_file: str | None) -> None:
    """Record the CA of the broker at host:port (None: a plaintext broker)."""
    if ca_file is None:
        _TRUSTED.pop((host, port), None)
    else:
        _TRUSTED[(host, port)] = str(ca_file)


def trusted_ca(host: str, port: int) -> str | None:
    return _TRUSTED.get((host, port))


def accepted(reason_code: int) -> bool:
    """A PUBACK reason code of an accepted publish: 0, or 16 (no matching subscribers)."""
    return reason_code < 128

_ids = itertools.count(1)


def _rc(value: Any) -> int:
    """A paho ReasonCode / MQTTErrorCode / int as an int."""
    if hasattr(value, "value"):
        return int(value.value)
    return int(value)


@dataclasses.dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Any
    received_at: float  # time.monotonic()
    dup: bool = False  # a redelivery of a message sent before and not acknowledged

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.payload)


def _encode(payload: Any) -> bytes:
    if payload is None:
        return b""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload).encode("utf-8")


class MqttProbe:
    """One MQTT connection for a test. Not reconnecting by itself: call `connect()` again."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        protocol: int = 5,
        clean_start: bool = True,
        session_expiry: int | None = None,
        keepalive: int = 30,
        ca_file: Any = _AUTO,
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self.client_id = client_id if client_id is not None else f"probe-{username or 'anon'}-{next(_ids)}-{id(self):x}"
        self.protocol = protocol
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        proto = {5: MQTTProtocolVersion.MQTTv5, 4: MQTTProtocolVersion.MQTTv311}[protocol]
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=proto,
            reconnect_on_failure=False,
            **({} if protocol == 5 else {"clean_session": clean_start}),
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        if ca_file is _AUTO:
            ca_file = trusted_ca(host, port)
        self.ca_file = ca_file
        if ca_file is not None:  # TLS, verifying the broker's certificate (and host name) against this CA
            self._client.tls_set(ca_certs=str(ca_file))
        self._cond = threading.Condition()
        self._msgs: list[Message] = []
        self._taken: set[int] = set()
        self._acks: dict[int, Any] = {}  # mid -> result of SUBACK / UNSUBACK / PUBACK
        self._connack: int | None = None
        self.connack_properties: Any = None  # the last CONNACK's MQTT 5 properties (limits the broker set)
        self.session_present: bool | None = None  # the last CONNACK's flag: the broker resumed a session
        self._connected = False
        self._disconnects = 0
        self._loop_running = False
        c = self._client
        c.on_socket_open = self._on_socket_open
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe
        c.on_publish = self._on_publish

    # ---- paho callbacks (network thread) ----------------------------------------------------

    @staticmethod
    def _on_socket_open(client, userdata, sock) -> None:
        # Without TCP_NODELAY a QoS 1 round trip waits on Nagle's algorithm (tens of ms).
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self._connack = _rc(reason_code)
            self.connack_properties = properties
            self.session_present = bool(getattr(flags, "session_present", False))
            self._connected = self._connack == 0
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self._connected = False
            self._disconnects += 1
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg) -> None:
        m = Message(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            properties=getattr(msg, "properties", None),
            received_at=time.monotonic(),
            dup=bool(getattr(msg, "dup", False)),
        )
        with self._cond:
            self._msgs.append(m)
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        with self._cond:
            self._acks[mid] = [_rc(r) for r in reason_code_list]
            self._cond.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        with self._cond:
            self._acks[mid] = [_rc(r) for r in reason_code_list]
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self._acks[mid] = _rc(reason_code)
            self._cond.notify_all()

    # ---- waiting -----------------------------------------------------------------------------

    def _wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Wait on the condition (held by the caller) until `predicate()` is truthy."""
        value = self._cond.wait_for(predicate, timeout)
        if not value:
            raise TimeoutError(f"{self.client_id}: {what} within {timeout} s")
        return value

    def _wait_ack(self, mid: int, timeout: float, what: str) -> Any:
        with self._cond:
            self._wait(lambda: mid in self._acks or not self._connected, timeout, what)
            if mid not in self._acks:
                raise ConnectionError(f"{self.client_id}: disconnected while waiting for {what}")
            return self._acks.pop(mid)

    # ---- connection --------------------------------------------------------------------------

    def connect(self, timeout: float = 5.0, *, check: bool = True) -> "MqttProbe":
        """Connect and wait for the CONNACK. With `check`, a refusal raises `ConnectionRefusedError`
        (its reason code in `.connack`); without, the probe is returned either way."""
        self._stop_loop()
        with self._cond:
            self._connack = None
            disconnects_before = self._disconnects
        props = None
        if self.protocol == 5:
            props = Properties(PacketTypes.CONNECT)
            if self.session_expiry is not None:
                props.SessionExpiryInterval = self.session_expiry
            kwargs: dict[str, Any] = {"clean_start": self.clean_start, "properties": props}
        else:
            kwargs = {}
        self._client.connect(self.host, self.port, self.keepalive, **kwargs)
        self._client.loop_start()
        self._loop_running = True
        with self._cond:
            # A broker may also close the connection without a CONNACK (MQTT 3.1.1 refusals).
            self._wait(lambda: self._connack is not None or self._disconnects > disconnects_before,
                       timeout, "no CONNACK")
            if self._connack is None:
                self._connack = -1
        if check and self._connack != 0:
            self._stop_loop()
            raise ConnectionRefusedError(f"{self.client_id}: connection refused, reason code {self._connack}")
        return self

    @property
    def connack(self) -> int | None:
        """The reason code of the last CONNACK (0: accepted; 134: bad login; 135: not authorized)."""
        return self._connack

    @property
    def connected(self) -> bool:
        return self._connected

    def wait_disconnected(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._wait(lambda: not self._connected, timeout, "still connected")

    def wait_connected(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._wait(lambda: self._connected, timeout, "not connected")

    # ---- operations --------------------------------------------------------------------------

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        """Subscribe and wait for the SUBACK; returns its reason codes (granted QoS, or >= 128).

        Note: Mosquitto grants a subscription the ACL would not allow reading; the ACL is applied
        to each message instead (nothing is delivered)."""
        rc, mid = self._client.subscribe(topic, qos)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"{self.client_id}: subscribe {topic!r} failed: {mqtt.error_string(rc)}")
        return self._wait_ack(mid, timeout, f"no SUBACK for {topic!r}")

    def unsubscribe(self, topic: str, timeout: float = 5.0) -> list[int]:
        rc, mid = self._client.unsubscribe(topic)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"{self.client_id}: unsubscribe {topic!r} failed: {mqtt.error_string(rc)}")
        return self._wait_ack(mid, timeout, f"no UNSUBACK for {topic!r}")

    def publish(self, topic: str, payload: Any = b"", qos: int = 1, retain: bool = False,
                timeout: float = 5.0, user_properties: list[tuple[str, str]] | None = None) -> int:
        """Publish and return the PUBACK reason code (QoS 1, MQTT 5): 0 delivered to subscribers,
        16 no matching subscribers, 135 not authorized. At QoS 0 (or under MQTT 3.1.1) the broker
        says nothing, and 0 is returned once the packet is written."""
        props = None
        if user_properties:  # e.g. [("signature", "hmac-sha256=...")] on a signed command
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = list(user_properties)
        info = self._client.publish(topic, _encode(payload), qos=qos, retain=retain, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"{self.client_id}: publish {topic!r} failed: {mqtt.error_string(info.rc)}")
        return self._wait_ack(info.mid, timeout, f"no PUBACK for {topic!r}")

    def wait_for(self, topic_filter: str = "#", predicate: Callable[[Message], bool] | None = None,
                 timeout: float = 5.0) -> Message:
        """The first message matching `topic_filter` (MQTT wildcards) and `predicate` that no
        earlier `wait_for` returned, including messages that arrived before the call. Returns as
        soon as it arrives."""
        def find() -> Message | None:
            for i, m in enumerate(self._msgs):
                if i in self._taken or not mqtt.topic_matches_sub(topic_filter, m.topic):
                    continue
                if predicate is None or predicate(m):
                    self._taken.add(i)
                    return m
            return None

        with self._cond:
            try:
                return self._wait(find, timeout, f"no message on {topic_filter!r}")
            except TimeoutError as exc:
                seen = [f"{m.topic}: {m.payload[:200]!r}" for m in self._msgs]
                raise TimeoutError(f"{exc}; received: {seen}") from None

    def messages(self, topic_filter: str = "#") -> list[Message]:
        """Every message received so far on topics matching `topic_filter`, in arrival order."""
        with self._cond:
            return [m for m in self._msgs if mqtt.topic_matches_sub(topic_filter, m.topic)]

    def assert_nothing(self, topic_filter: str = "#", within: float = 0.3) -> None:
        """Assert that no message matching `topic_filter` is received (so far, nor for `within`
        seconds). Proving an absence is the one place where waiting a fixed time is inherent: the
        window only needs to exceed the broker's delivery latency (sub-millisecond on loopback with
        TCP_NODELAY), so a few hundred ms is ample. Returns early (failing) on the first such
        message; a round trip through the broker made before the call (e.g. a PUBACK) already
        orders most deliveries, so this window is a safety margin."""
        def found() -> list[Message]:
            return [m for m in self._msgs if mqtt.topic_matches_sub(topic_filter, m.topic)]

        with self._cond:
            try:
                got = self._wait(found, within, "")
            except TimeoutError:
                return
        raise AssertionError(f"{self.client_id}: unexpected message(s) on {topic_filter!r}: "
                             f"{[(m.topic, m.payload[:200]) for m in got]}")

    def clear(self) -> None:
        """Forget every message received so far."""
        with self._cond:
            self._msgs.clear()
            self._taken.clear()

    def _stop_loop(self) -> None:
        if self._loop_running:
            self._client.loop_stop()
            self._loop_running = False

    def disconnect(self) -> None:
        """A clean DISCONNECT (the broker then drops the will and, with clean_start, the session)."""
        if self._connected:
            self._client.disconnect()
            try:
                self.wait_disconnected(timeout=2.0)
            except TimeoutError:
                pass
        self._stop_loop()

    def close(self) -> None:
        try:
            self.disconnect()
        finally:
            self._stop_loop()
            try:
                sock = self._client.socket()
                if sock is not None:
                    sock.close()
            except Exception:
                pass

    def __enter__(self) -> "MqttProbe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MqttProbe {self.client_id} {'connected' if self._connected else 'disconnected'}>"
