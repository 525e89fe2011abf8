"""The MQTT worker process: wires the connection, the command lifecycle, the outbox,
the group hand-off and the publications to one loop and to the supervisor link."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import msgspec

from ... import agentinfo
from ...config import ConfigError, ensure_client_uuid
from ...ipc import messages
from ...wire import topics
from ...wire.schema import (ActualState, BrokerConnection, ExpectedState, Health, Heartbeat, HostFacts,
                            SupervisorState, utc_now_iso)
from ..runtime import Worker
from . import bootid
from .clock import Clock, SystemClock
from .crashpoint import crash, poison
from .connection import Connection, Handlers, Incoming
from .groups import Groups
from .intake import Intake
from .lifecycle import Lifecycle
from .outbox import Outbox
from .publisher import LogPublisher, encode
from .store import Store

log = logging.getLogger("infoscreen.mqtt")

BROKER_KEY = "broker_connection"


class MqttWorker(Worker):
    name = "mqtt"

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__()
        try:
            self.cfg = ensure_client_uuid(self.cfg)
        except ConfigError as exc:
            print(exc, flush=True)
            raise SystemExit(2) from None
        self.uuid = self.cfg.client_uuid or ""
        self.clock = clock or SystemClock(self.cfg.clock_trust)
        self.started_mono = time.monotonic()
        self.logs = LogPublisher(self.uuid, self._publish_plain)
        self._quiet_sink = False
        self.refused_other = 0
        self.tree: dict[str, Any] | None = None
        self.last_health: bytes | None = None
        self.health_published = 0
        self.heartbeats = 0
        self.agent = agentinfo.describe()  # version, host name, OS: fixed for the process's life

    # -- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.boot_id = bootid.read_boot_id(self.cfg.boot_id_file)
        self.store = Store(self.cfg.state_dir)
        self.outbox = Outbox(self.store, self.loop, self.clock, self.boot_id)
        self.conn = Connection(self.cfg, self.loop, Handlers(
            connected=self._connected, disconnected=self._disconnected,
            message=self._message, puback=self._puback))
        self.outbox.publish = lambda topic, payload: self.conn.publish(topic, payload)
        self.intake = Intake(self.loop, self.store, self.clock, self._dispatch, self._give_up, self.conn)
        self.lifecycle = Lifecycle(self.cfg, self.loop, self.store, self.outbox, self.clock, self.boot_id,
                                   self.channel.send, lambda text: self.logs.log("info", text, "mqtt"))
        self.groups = Groups(self.uuid, self.cfg.state_dir, self.store, self.conn)
        self.command_topics = set(topics.command_topics(self.uuid))
        self.group_topic = topics.group_id(self.uuid)

        bs = self.store.kv_get(BROKER_KEY) or {}
        self.broker = {
            "broker_reachable": False,
            "reconnect_count": int(bs.get("reconnect_count", 0)),
            "last_disconnect_at": bs.get("last_disconnect_at"),
        }
        self._connected_before = bool(bs.get("connected_before", False))
        if bs.get("broker_reachable"):  # the previous process's connection ended with it
            self.broker["last_disconnect_at"] = utc_now_iso()
        self._save_broker()

        self.lifecycle.note_wall_time()
        self.lifecycle.startup()
        self.intake.purge()
        for t in sorted(self.command_topics):
            self.conn.subscribe(t)
        self.groups.start()
        self.conn.start()
        self.loop.call_later(self.cfg.heartbeat_interval_s, self._heartbeat_tick)
        log.info("mqtt worker for %s started (boot %s, %d pending acks)", self.uuid, self.boot_id,
                 len(self.outbox.rows))

    def teardown(self) -> None:
        try:
            self.conn.stop()
        finally:
            try:
                self.outbox.flush_now()
            finally:
                self.store.close()

    # -- broker state ------------------------------------------------------------------------
    def _save_broker(self) -> None:
        self.store.kv_set(BROKER_KEY, dict(self.broker, connected_before=self._connected_before))
        self.channel.send(messages.BrokerStatus(**self.broker))

    def _connected(self, session_present: bool) -> None:
        if self._connected_before:
            self.broker["reconnect_count"] += 1
        self._connected_before = True
        self.broker["broker_reachable"] = True
        self._save_broker()
        log.info("connected to the broker %s:%d (session present: %s)", self.cfg.mqtt_broker, self.cfg.mqtt_port,
                 session_present)
        self.outbox.on_connect()
        self.logs.on_connect()
        self.lifecycle.on_connected()
        self._publish_heartbeat()
        if self.last_health is not None and self.health_published == 0:
            self._publish_plain(topics.health(self.uuid), self.last_health)

    def _disconnected(self, why: str) -> None:
        self.broker["broker_reachable"] = False
        self.broker["last_disconnect_at"] = utc_now_iso()
        self.outbox.on_disconnect()
        self.logs.on_disconnect()
        self._save_broker()

    # -- MQTT input ---------------------------------------------------------------------------
    def _message(self, m: Incoming) -> bool:
        return self.intake.on_message(m)

    def _dispatch(self, m: Incoming) -> None:
        poison(m.payload)  # a test hook; nothing outside test and development
        if m.topic in self.command_topics:
            self.lifecycle.on_command(m.payload, m.topic, m.signature)
        elif m.topic == self.group_topic:
            self.groups.on_group_id(m.payload)
        elif self.groups.handles(m.topic):
            self.groups.on_message(m.topic, m.payload)
        else:
            log.info("ignored a message on %s", m.topic)

    def _give_up(self, m: Incoming, why: str) -> bool:
        return m.topic in self.command_topics and self.lifecycle.give_up(m.payload, why)

    def _puback(self, mid: int, rc: int, topic: str) -> None:
        kind = topics.parse(topic)
        name = kind[0] if kind is not None else None
        if name in ("ack", "ack_alias"):
            crash("before_puback")
        if self.outbox.on_puback(mid, rc) is not None:
            return
        if rc >= 128:
            self.refused_other += 1
            if name == "logs":
                self._quiet_sink = True  # a refused log must not log (and publish) another one
                try:
                    log.warning("the broker refused a publish on %s (reason code %d)", topic, rc)
                finally:
                    self._quiet_sink = False
            else:
                log.warning("the broker refused a publish on %s (reason code %d); check its ACL", topic, rc)

    @property
    def refused_publishes(self) -> int:
        return self.refused_other + self.outbox.refused

    # -- publications ---------------------------------------------------------------------------
    def _publish_plain(self, topic: str, payload: bytes) -> int | None:
        conn = getattr(self, "conn", None)
        if conn is None:
            return None
        return conn.publish(topic, payload)

    def _heartbeat_tick(self) -> None:
        try:
            self._publish_heartbeat()
            self.lifecycle.note_wall_time()
            self.lifecycle.refresh_evidence()
            self.lifecycle.purge_maybe()
        finally:
            self.loop.call_later(self.cfg.heartbeat_interval_s, self._heartbeat_tick)

    def _publish_heartbeat(self) -> None:
        if not self.conn.connected:
            return
        hb = Heartbeat(timestamp=utc_now_iso(), client_uuid=self.uuid,
                       uptime_s=round(time.monotonic() - self.started_mono, 3))
        if self._publish_plain(topics.heartbeat(self.uuid), encode(hb)) is not None:
            self.heartbeats += 1

    def health_payload(self, report: messages.HealthReport) -> Health:
        tree = self.tree
        return Health(
            timestamp=report.timestamp,
            client_uuid=self.uuid,
            expected_state=ExpectedState(event_id=self.groups.event_id),
            actual_state=ActualState(process=report.actual_state.process, pid=report.actual_state.pid,
                                     status=report.actual_state.status),
            broker_connection=BrokerConnection(**self.broker),
            host=msgspec.convert(msgspec.structs.asdict(report.host), HostFacts),
            clock_synchronized=self.clock.synchronized(),
            refused_publishes=self.refused_publishes,
            last_power_command=self.lifecycle.last_power_command(),
            group_id=self.groups.group,
            pending_acks=len(self.outbox.rows),
            command_auth="signed" if os.path.exists(self.cfg.command_key_file) else "unsigned",
            probe_errors=list(report.probe_errors),
            supervisor=None if tree is None else SupervisorState(**tree),
            agent=self.agent,
        )

    # -- IPC --------------------------------------------------------------------------------------
    def on_message(self, msg: messages.Msg) -> None:
        try:
            if isinstance(msg, messages.HealthReport):
                self.lifecycle.refresh_evidence()
                self.last_health = encode(self.health_payload(msg))
                self.health_published = 0
                if self._publish_plain(topics.health(self.uuid), self.last_health) is not None:
                    self.health_published += 1
            elif isinstance(msg, messages.LogRecord):
                self.logs.log(msg.level, msg.message, msg.source, msg.created)
            elif isinstance(msg, messages.ExecResult):
                self.lifecycle.on_exec_result(msg)
            elif isinstance(msg, messages.TreeStatus):
                self.tree = {"workers": dict(msg.workers), "restarts": dict(msg.restarts)}
        except Exception:  # noqa: BLE001
            log.exception("error handling %s", type(msg).__name__)

    def log_sink(self, level: str, message: str, created: float) -> None:
        """This worker's own warnings go straight to the logs topic (rate-limited)."""
        if self._quiet_sink:
            return
        self.logs.log(level, message, "mqtt", created)


def main() -> int:
    return MqttWorker().run()
