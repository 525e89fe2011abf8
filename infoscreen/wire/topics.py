"""Topic names of the wire contract (docs/server-integration.md, its topic and ACL table).

`TABLE` is the one declaration of every topic: its template, who writes it and who reads it.
The builders below, the subscription filters of the operator tool, the parsing of a received
topic and the broker's ACL (`infoscreenctl broker provision` renders it from `TABLE`) all come
from it, so no program spells a topic by hand.

Templates have the placeholders ``{uuid}`` (a device), ``{group}`` (a group id) and
``{level}`` (a log level). In a filter or an ACL row ``{uuid}`` and ``{group}`` become ``+``
and ``{level}`` becomes ``#`` (the contract's ``logs/#``).
"""

from __future__ import annotations

import dataclasses

from .ids import is_uuid

PREFIX = "infoscreen"
LOG_LEVELS = ("error", "warn", "info")

SERVER = "server"
DEVICE = "device"


@dataclasses.dataclass(frozen=True)
class Row:
    """One topic of the contract: who may write it and who may read it (ACL roles)."""

    name: str
    template: str
    writers: frozenset[str]
    readers: frozenset[str]

    def fill(self, uuid: str = "+", group: str = "+", level: str = "#") -> str:
        return self.template.format(uuid=uuid, group=group, level=level)

    @property
    def per_device(self) -> bool:
        return "{uuid}" in self.template


def _row(name: str, template: str, writers: tuple[str, ...], readers: tuple[str, ...]) -> Row:
    return Row(name, PREFIX + "/" + template, frozenset(writers), frozenset(readers))


# The contract's table, in its order, with its one deliberate change: the server may also write
# service_failed, to clear the retained alert with an empty retained publish.
TABLE: tuple[Row, ...] = (
    _row("commands", "{uuid}/commands", (SERVER,), (DEVICE,)),
    _row("command_alias", "{uuid}/command", (SERVER,), (DEVICE,)),
    _row("group_id", "{uuid}/group_id", (SERVER,), (DEVICE,)),
    _row("events", "events/{group}", (SERVER,), (DEVICE,)),
    _row("power_intent", "groups/{group}/power/intent", (SERVER,), (DEVICE,)),
    _row("ack", "{uuid}/commands/ack", (DEVICE,), (SERVER,)),
    _row("ack_alias", "{uuid}/command/ack", (DEVICE,), (SERVER,)),
    _row("heartbeat", "{uuid}/heartbeat", (DEVICE,), (SERVER,)),
    _row("health", "{uuid}/health", (DEVICE,), (SERVER,)),
    _row("logs", "{uuid}/logs/{level}", (DEVICE,), (SERVER,)),
    _row("service_failed", "{uuid}/service_failed", (DEVICE, SERVER), (SERVER,)),
)
ROWS = {r.name: r for r in TABLE}


def commands(uuid: str) -> str:
    return ROWS["commands"].fill(uuid)


def command_alias(uuid: str) -> str:
    """Transitional alias of :func:`commands`; the same command may arrive on both."""
    return ROWS["command_alias"].fill(uuid)


def command_topics(uuid: str) -> tuple[str, str]:
    return (commands(uuid), command_alias(uuid))


def ack(uuid: str) -> str:
    return ROWS["ack"].fill(uuid)


def ack_alias(uuid: str) -> str:
    return ROWS["ack_alias"].fill(uuid)


def ack_topics(uuid: str) -> tuple[str, str]:
    """Every ack status is published on both, canonical first."""
    return (ack(uuid), ack_alias(uuid))


def group_id(uuid: str) -> str:
    return ROWS["group_id"].fill(uuid)


def events(group: str) -> str:
    return ROWS["events"].fill(group=group)


def power_intent(group: str) -> str:
    return ROWS["power_intent"].fill(group=group)


def heartbeat(uuid: str) -> str:
    return ROWS["heartbeat"].fill(uuid)


def health(uuid: str) -> str:
    return ROWS["health"].fill(uuid)


def logs(uuid: str, level: str) -> str:
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {LOG_LEVELS}")
    return ROWS["logs"].fill(uuid, level=level)


def service_failed(uuid: str) -> str:
    return ROWS["service_failed"].fill(uuid)


def every_device(name: str) -> str:
    """The subscription filter of one per-device topic for the whole fleet
    (``every_device("heartbeat")`` is ``infoscreen/+/heartbeat``)."""
    row = ROWS[name]
    if not row.per_device:
        raise ValueError(f"{name} is not a per-device topic")
    return row.fill()


def _split(template: str) -> list[str]:
    return template.split("/")


def match(topic: str, name: str) -> dict[str, str] | None:
    """The placeholders of `topic` if it is an instance of the row `name`, else None. A device
    uuid must be one (wire/ids.py); a group or level fills exactly one level (a log level: one of
    LOG_LEVELS)."""
    parts = topic.split("/")
    want = _split(ROWS[name].template)
    if len(parts) != len(want):
        return None
    found: dict[str, str] = {}
    for got, tmpl in zip(parts, want):
        if tmpl.startswith("{") and tmpl.endswith("}"):
            if not got:
                return None
            found[tmpl[1:-1]] = got
        elif got != tmpl:
            return None
    if "uuid" in found and not is_uuid(found["uuid"]):
        return None
    if "level" in found and found["level"] not in LOG_LEVELS:
        return None
    return found


def device_topic(topic: str, name: str) -> str | None:
    """The device uuid of `topic` when it is the per-device topic `name`, else None. Everything
    the operator tool reports about a device is keyed on this uuid (the one the broker's ACL
    ties to the publishing account), never on a uuid inside a payload."""
    found = match(topic, name)
    return None if found is None else found.get("uuid")


def parse(topic: str) -> tuple[str, dict[str, str]] | None:
    """(row name, placeholders) of a topic of the contract, else None."""
    for row in TABLE:
        found = match(topic, row.name)
        if found is not None:
            return row.name, found
    return None


def device_of(topic: str) -> str | None:
    """The device uuid of a per-device topic (`infoscreen/{uuid}/...`), else None."""
    parsed = parse(topic)
    return None if parsed is None else parsed[1].get("uuid")


def is_group_topic(topic: str) -> bool:
    """An events or power-intent topic (of any group)."""
    parsed = parse(topic)
    return parsed is not None and "group" in parsed[1]


def covers(filter_: str, topic: str) -> bool:
    """MQTT topic matching: does the subscription filter (or ACL pattern) `filter_` match `topic`?"""
    f, t = filter_.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(f) == len(t)


def acl_pattern(row: Row, uuid: str | None) -> str:
    """The ACL topic of `row` for one device (`uuid`) or for the server (every device)."""
    return row.fill(uuid or "+")


def acl_lines(role: str, uuid: str | None = None) -> list[str]:
    """Mosquitto ``topic read|write|readwrite`` lines of `role` (a device's for `uuid`, the
    server's for every device), in the table's order; nothing for a topic it neither reads nor
    writes."""
    out = []
    for row in TABLE:
        access = {(True, True): "readwrite", (True, False): "read", (False, True): "write"}.get(
            (role in row.readers, role in row.writers))
        if access is not None:
            out.append(f"topic {access} {acl_pattern(row, uuid if row.per_device else None)}")
    return out
