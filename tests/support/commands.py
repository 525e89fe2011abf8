"""Commands as the server publishes them, and their acks, for tests that drive a whole tree."""

from __future__ import annotations

import time
import uuid

from infoscreen.wire import topics
from infoscreen.wire.schema import SCHEMA_VERSION, CommandOut, encode, format_utc


def send(srv, device: str, action: str = "reboot_host") -> str:
    """Publish a command valid for 5 minutes with `srv` (an MqttProbe); return its id."""
    cid = str(uuid.uuid4())
    now = time.time()
    cmd = CommandOut(schema_version=SCHEMA_VERSION, command_id=cid, client_uuid=device, action=action,
                     issued_at=format_utc(now), expires_at=format_utc(now + 300))
    assert srv.publish(topics.commands(device), encode(cmd)) in (0, 16)
    return cid


def statuses(srv, device: str, cid: str, until: set[str], timeout: float = 15.0) -> list[dict]:
    """The acks of `cid` on the canonical ack topic, up to the first whose status is in `until`."""
    seen: list[dict] = []
    while not seen or seen[-1]["status"] not in until:
        msg = srv.wait_for(topics.ack(device), lambda m: m.json()["command_id"] == cid, timeout=timeout)
        seen.append(msg.json())
    return seen
