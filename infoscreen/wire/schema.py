"""Payload shapes of the wire contract, as msgspec Structs.

The ack is the contract's frozen v1 schema (docs/server-integration.md): exactly four keys, nulls included, nothing
added. Inbound commands are parsed leniently (unknown fields ignored, as the contract
says) and validated field by field by the MQTT worker, which maps each defect to its
documented error code.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Annotated, Any

import msgspec

SCHEMA_VERSION = "1.0"
MAX_COMMAND_BYTES = 4096  # commands are ~300 bytes; anything far larger is not one


class Action(str, enum.Enum):
    REBOOT = "reboot_host"
    SHUTDOWN = "shutdown_host"


ACTIONS = frozenset(a.value for a in Action)


class AckStatus(str, enum.Enum):
    ACCEPTED = "accepted"
    EXECUTION_STARTED = "execution_started"
    COMPLETED = "completed"
    FAILED = "failed"


TERMINAL_STATUSES = frozenset({AckStatus.COMPLETED.value, AckStatus.FAILED.value})


class ErrorCode(str, enum.Enum):
    """The one table of `error_code` values of a `failed` ack (docs/server-integration.md)."""

    INVALID_PAYLOAD = "invalid_payload"
    UNSUPPORTED_ACTION = "unsupported_action"
    UNSUPPORTED_SCHEMA = "unsupported_schema"
    TARGET_MISMATCH = "target_mismatch"
    EXPIRED = "expired"
    BUSY = "busy"
    HELPER_UNAVAILABLE = "helper_unavailable"
    HELPER_TIMEOUT = "helper_timeout"
    HELPER_REJECTED = "helper_rejected"
    EXECUTION_FAILED = "execution_failed"
    REBOOT_NOT_OBSERVED = "reboot_not_observed"
    SIGNATURE_INVALID = "signature_invalid"  # a keyed device: signature missing or wrong
    INTERNAL_ERROR = "internal_error"  # project addition: handling kept failing, given up


ERROR_CODES = frozenset(c.value for c in ErrorCode)


class Ack(msgspec.Struct, omit_defaults=False, forbid_unknown_fields=True):
    """Ack payload schema v1 (frozen): the four keys, always all present."""

    command_id: str
    status: str
    error_code: str | None = None
    error_message: str | None = None


class CommandOut(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A command as the server side publishes it (infoscreenctl, tests), keys in the
    contract's order. Optional fields left None are omitted; schema_version is always sent."""

    schema_version: str
    command_id: str
    client_uuid: str | None = None
    action: str
    issued_at: str | None = None
    expires_at: str
    reason: str | None = None
    requested_by: str | None = None


# Bounds of what a reader keeps of a device's payload (the operator tool reads every field with
# these types; the device's encoder does not check them). Far above the real values.
Short = Annotated[str, msgspec.Meta(max_length=64)]
Text = Annotated[str, msgspec.Meta(max_length=2000)]
Pid = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
# A systemd unit name: at most 256 characters of this set (other bytes are \x-escaped by systemd).
UNIT_PATTERN = r"[A-Za-z0-9:_.\\@-]{1,256}"
Unit = Annotated[str, msgspec.Meta(pattern=r"\A" + UNIT_PATTERN + r"\Z")]  # \Z: no trailing newline
SERVICE_FAILED = "service_failed"


class ServiceFailed(msgspec.Struct, kw_only=True):
    """The retained alert of the OnFailure unit (docs/server-integration.md, "service_failed"):
    exactly these four keys, in this order."""

    event: Short = SERVICE_FAILED
    unit: Unit
    client_uuid: Short
    failed_at: Short


class Heartbeat(msgspec.Struct):
    timestamp: Short
    client_uuid: Short
    uptime_s: float | None = None


class ExpectedState(msgspec.Struct):
    event_id: Annotated[str, msgspec.Meta(max_length=128)] | int | None = None


class ActualState(msgspec.Struct):
    process: Short
    pid: Pid | None
    status: Short


class BrokerConnection(msgspec.Struct):
    broker_reachable: bool
    reconnect_count: Count
    last_disconnect_at: Short | None


class HostFacts(msgspec.Struct):
    cpu_percent: float | None = None
    memory_percent: float | None = None
    disk_percent: float | None = None
    temperature_c: float | None = None
    uptime_s: float | None = None
    boot_id: Short | None = None
    load_1m: float | None = None


class Agent(msgspec.Struct):
    """What runs on the screen: this program's version, the host name, the OS (os-release)."""

    version: Short
    hostname: Short
    os: Short | None


class SupervisorState(msgspec.Struct):
    workers: dict[str, str]
    restarts: dict[str, int]


class Health(msgspec.Struct, kw_only=True):
    """The health report: the contract's fields (timestamp, expected_state, actual_state,
    broker_connection) and the project's extra blocks, in the order they are published."""

    timestamp: Short
    client_uuid: Short
    expected_state: ExpectedState
    actual_state: ActualState
    broker_connection: BrokerConnection
    host: HostFacts
    clock_synchronized: bool
    refused_publishes: Count
    last_power_command: dict[str, Any] | None
    group_id: Short | None
    pending_acks: Count
    command_auth: Short
    probe_errors: list[str]
    supervisor: SupervisorState | None
    agent: Agent


class LogRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A record on ``logs/{level}``; `dropped_before` only when records were dropped before it."""

    timestamp: Short
    client_uuid: Short
    level: Short
    source: Short
    message: Text
    dropped_before: Count | None = None


_ack_encoder = msgspec.json.Encoder()
_ack_decoder = msgspec.json.Decoder(Ack)


def encode_ack(ack: Ack) -> bytes:
    return _ack_encoder.encode(ack)


def decode_ack(payload: bytes) -> Ack:
    return _ack_decoder.decode(payload)


def encode(obj: msgspec.Struct) -> bytes:
    return _ack_encoder.encode(obj)


def utc_now_iso() -> str:
    """RFC 3339 UTC with a `Z`, second precision, as the contract's examples."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> float:
    """Seconds since the epoch of an RFC 3339 timestamp; ValueError if it is not one.

    A zone is required: a naive time would be read in the device's local zone, which
    the server cannot know.
    """
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError("not an RFC 3339 timestamp")
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    dt = datetime.fromisoformat(t)
    if dt.tzinfo is None:
        raise ValueError("timestamp has no time zone")
    return dt.timestamp()
