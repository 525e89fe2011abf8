"""Group membership, the active event and the power intent, handed to the display by file.

* ``infoscreen/{uuid}/group_id`` assigns the group (plain text or a JSON string/number;
  empty: no group). A group id is 1..64 printable characters without ``/ + #``. It is
  persisted; on a change the old group's topics are unsubscribed and the new ones
  (``infoscreen/events/{g}``, ``infoscreen/groups/{g}/power/intent``) subscribed.
* An event (a JSON object, or empty/``null`` for none) is written atomically to
  ``state_dir/active_event.json``; its ``event_id`` (or ``id``) is the health payload's
  ``expected_state.event_id``.
* A power intent (a JSON object of at most 16 KiB) is written to ``power_intent.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec

from ...wire import topics
from . import handoff
from .connection import Connection
from .store import Store

log = logging.getLogger(__name__)

MAX_GROUP_LEN = 64
MAX_EVENT_BYTES = 64 * 1024
MAX_INTENT_BYTES = 16 * 1024
GROUP_KEY = "group_id"


def valid_group(value: str) -> bool:
    return (0 < len(value) <= MAX_GROUP_LEN and value.isprintable()
            and not any(c in value for c in "/+#") and value.strip() == value)


def parse_group(payload: bytes) -> tuple[bool, str | None]:
    """(ok, group): ok False for an invalid id; group None for 'no group'."""
    if len(payload) > 1024:
        return False, None
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False, None
    if text in ("", "null"):
        return True, None
    if text[0] in '"0123456789-':
        try:
            val = msgspec.json.decode(text)
            if isinstance(val, (str, int)) and not isinstance(val, bool):
                text = str(val).strip()
        except (msgspec.DecodeError, RecursionError):
            pass
    if text == "":
        return True, None
    return (True, text) if valid_group(text) else (False, None)


def _event_id(obj: Any) -> str | int | None:
    if not isinstance(obj, dict):
        return None
    for k in ("event_id", "id"):
        v = obj.get(k)
        if isinstance(v, bool):
            continue
        if isinstance(v, int) or (isinstance(v, str) and 0 < len(v) <= 128):
            return v
    return None


class Groups:
    def __init__(self, uuid: str, state_dir: Path, store: Store, conn: Connection) -> None:
        self.uuid = uuid
        self.state_dir = state_dir
        self.store = store
        self.conn = conn
        self.group: str | None = store.kv_get(GROUP_KEY)
        if self.group is not None and not valid_group(str(self.group)):
            self.group = None
        self.event_id: str | int | None = None
        raw = handoff.read(state_dir / handoff.ACTIVE_EVENT, MAX_EVENT_BYTES + 1)
        if raw:
            try:
                self.event_id = _event_id(msgspec.json.decode(raw))
            except (msgspec.DecodeError, RecursionError):
                pass
        self.events_written = 0

    def topics_of(self, group: str) -> tuple[str, str]:
        return topics.events(group), topics.power_intent(group)

    def start(self) -> None:
        self.conn.subscribe(topics.group_id(self.uuid))
        if self.group:
            for t in self.topics_of(self.group):
                self.conn.subscribe(t)

    def on_group_id(self, payload: bytes) -> None:
        ok, group = parse_group(payload)
        if not ok:
            log.warning("ignored an invalid group id on %s (%d bytes)", topics.group_id(self.uuid), len(payload))
            return
        if group == self.group:
            return
        old = self.group
        if old:
            for t in self.topics_of(old):
                self.conn.unsubscribe(t)
        self.group = group
        self.store.kv_set(GROUP_KEY, group)
        if group:
            for t in self.topics_of(group):
                self.conn.subscribe(t)
        log.info("group changed: %s -> %s", old, group)

    def handles(self, topic: str) -> bool:
        return topics.is_group_topic(topic)

    def on_message(self, topic: str, payload: bytes) -> None:
        if not self.group or topic not in self.topics_of(self.group):
            # A leftover subscription of an older group (e.g. in the broker's session).
            log.info("ignored %s: not a topic of the current group %s", topic, self.group)
            if topics.is_group_topic(topic):
                self.conn.unsubscribe(topic)
            return
        if topic == topics.events(self.group):
            self._event(payload)
        else:
            self._intent(payload)

    _INVALID = object()

    @classmethod
    def _json_object(cls, payload: bytes, what: str, limit: int, empty_ok: bool) -> Any:
        """The payload as a JSON object (None for an empty one where allowed), or _INVALID (logged)."""
        if len(payload) > limit:
            log.warning("ignored %s of %d bytes (limit %d)", what, len(payload), limit)
            return cls._INVALID
        if empty_ok and payload.strip() in (b"", b"null"):
            return None
        try:
            obj = msgspec.json.decode(payload)
        except (msgspec.DecodeError, RecursionError) as exc:  # deep nesting: RecursionError
            log.warning("ignored %s that is not JSON: %s: %s", what, type(exc).__name__, str(exc)[:120])
            return cls._INVALID
        if not isinstance(obj, dict):
            log.warning("ignored %s that is not a JSON object", what)
            return cls._INVALID
        return obj

    def _event(self, payload: bytes) -> None:
        obj = self._json_object(payload, "an event", MAX_EVENT_BYTES, empty_ok=True)
        if obj is self._INVALID:
            return
        handoff.atomic_write(self.state_dir / handoff.ACTIVE_EVENT, msgspec.json.encode(obj))
        self.events_written += 1
        self.event_id = _event_id(obj)
        log.info("active event: %s", self.event_id)

    def _intent(self, payload: bytes) -> None:
        obj = self._json_object(payload, "a power intent", MAX_INTENT_BYTES, empty_ok=False)
        if obj is self._INVALID:
            return
        handoff.atomic_write(self.state_dir / handoff.POWER_INTENT, msgspec.json.encode(obj))
        log.info("power intent handed over")
