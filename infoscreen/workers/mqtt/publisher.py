"""Heartbeat, health and log publications (QoS 1, not retained, not persisted).

Logs are rate-limited by a token bucket (5/s, burst 20); what was dropped is counted and
said in the next record that gets through. While offline the last 100 records wait in
memory and go out (through the same bucket) on reconnect.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import msgspec

from ...wire import topics
from ...wire.schema import LogRecord, format_utc
from .ratelimit import TokenBucket

LOG_RATE = 5.0
LOG_BURST = 20.0
OFFLINE_LOGS = 100

_enc = msgspec.json.Encoder()


def encode(obj: Any) -> bytes:
    return _enc.encode(obj)


class LogPublisher:
    def __init__(self, uuid: str, publish) -> None:  # publish(topic, payload) -> mid | None
        self.uuid = uuid
        self.publish = publish
        self.bucket = TokenBucket(LOG_RATE, LOG_BURST, time.monotonic)
        self.offline: collections.deque[tuple[str, str, str, float]] = collections.deque(maxlen=OFFLINE_LOGS)
        self.offline_dropped = 0
        self.connected = False
        self.sent = 0

    def log(self, level: str, message: str, source: str, created: float | None = None) -> None:
        if level not in topics.LOG_LEVELS:
            level = "warn"
        created = time.time() if created is None else created
        if not self.connected:
            if len(self.offline) == self.offline.maxlen:
                self.offline_dropped += 1
            self.offline.append((level, message, source, created))
            return
        self._send(level, message, source, created)

    def _send(self, level: str, message: str, source: str, created: float) -> None:
        if not self.bucket.take():
            return
        dropped = self.bucket.pop_dropped() + self.offline_dropped
        self.offline_dropped = 0
        text = message[:2000]
        if dropped:
            text = f"{text} ({dropped} earlier log records dropped by the rate limit)"
        body = LogRecord(timestamp=format_utc(created), client_uuid=self.uuid, level=level, source=source,
                         message=text, dropped_before=dropped or None)
        if self.publish(topics.logs(self.uuid, level), encode(body)) is not None:
            self.sent += 1

    def on_connect(self) -> None:
        self.connected = True
        while self.offline:
            self._send(*self.offline.popleft())

    def on_disconnect(self) -> None:
        self.connected = False
