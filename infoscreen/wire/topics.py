"""Topic names of the wire contract (docs/server-integration.md, its ACL table)."""

from __future__ import annotations

PREFIX = "infoscreen"
LOG_LEVELS = ("error", "warn", "info")


def commands(uuid: str) -> str:
    return f"{PREFIX}/{uuid}/commands"


def command_alias(uuid: str) -> str:
    """Transitional alias of :func:`commands`; the same command may arrive on both."""
    return f"{PREFIX}/{uuid}/command"


def command_topics(uuid: str) -> tuple[str, str]:
    return (commands(uuid), command_alias(uuid))


def ack(uuid: str) -> str:
    return f"{PREFIX}/{uuid}/commands/ack"


def ack_alias(uuid: str) -> str:
    return f"{PREFIX}/{uuid}/command/ack"


def ack_topics(uuid: str) -> tuple[str, str]:
    """Every ack status is published on both, canonical first."""
    return (ack(uuid), ack_alias(uuid))


def group_id(uuid: str) -> str:
    return f"{PREFIX}/{uuid}/group_id"


def events(group: str) -> str:
    return f"{PREFIX}/events/{group}"


def power_intent(group: str) -> str:
    return f"{PREFIX}/groups/{group}/power/intent"


def heartbeat(uuid: str) -> str:
    return f"{PREFIX}/{uuid}/heartbeat"


def health(uuid: str) -> str:
    return f"{PREFIX}/{uuid}/health"


def logs(uuid: str, level: str) -> str:
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {LOG_LEVELS}")
    return f"{PREFIX}/{uuid}/logs/{level}"


def service_failed(uuid: str) -> str:
    return f"{PREFIX}/{uuid}/service_failed"


def device_of(topic: str) -> str | None:
    """The device uuid of a per-device topic (`infoscreen/{uuid}/...`), else None."""
    parts = topic.split("/")
    if len(parts) >= 3 and parts[0] == PREFIX and parts[1] not in ("events", "groups"):
        return parts[1]
    return None
