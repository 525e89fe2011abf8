"""Every message that crosses a process boundary inside the tree: one tagged union.

MessagePack on the wire, decoded with validation (types, required fields, size): a
frame that does not decode into one of these Structs is logged and dropped by the
receiver, never raised into its loop.

Who sends what (the supervisor routes; workers never talk to each other):

    worker -> supervisor : Hello, Heartbeat, LogRecord
    health -> supervisor : HealthReport            (routed to the MQTT worker)
    mqtt   -> supervisor : BrokerStatus, ExecRequest, ExecQuery
    supervisor -> mqtt   : HealthReport, LogRecord, ExecResult, TreeStatus
"""

from __future__ import annotations

import msgspec

MAX_FRAME_BYTES = 64 * 1024  # the largest message (a health report) is ~1 KiB


class Msg(msgspec.Struct, tag_field="t", forbid_unknown_fields=True, frozen=True):
    """Base of the union; `t` carries the tag."""


class Hello(Msg, tag="hello"):
    """The worker is initialised (its loop runs); broker reachability is not readiness."""

    worker: str
    pid: int


class Heartbeat(Msg, tag="hb"):
    """Sent from the worker's main loop, so it stops when the real work is stuck."""

    worker: str
    pid: int
    seq: int


class LogRecord(Msg, tag="log"):
    source: str
    level: str  # error | warn | info (the logs topic's levels)
    message: str
    created: float


class DisplayState(Msg, tag="display"):
    process: str
    pid: int | None
    status: str  # running | sleeping | stopped | zombie | not_running | unknown


class HostFacts(Msg, tag="host"):
    cpu_percent: float | None
    memory_percent: float | None
    disk_percent: float | None
    temperature_c: float | None
    uptime_s: float | None
    boot_id: str | None
    load_1m: float | None = None


class HealthReport(Msg, tag="health"):
    timestamp: str
    actual_state: DisplayState
    host: HostFacts
    probe_errors: list[str] = []


class BrokerStatus(Msg, tag="broker"):
    broker_reachable: bool
    reconnect_count: int
    last_disconnect_at: str | None


class ExecRequest(Msg, tag="exec"):
    """Run a power action through the helper; sent once per command, never repeated. The
    command's MQTT payload bytes and its `signature` user property travel unchanged: the
    helper alone verifies them and reads the action, id and expiry from the signed bytes."""

    command_id: str
    action: str
    payload: bytes = b""
    signature: str | None = None


class ExecQuery(Msg, tag="exec?"):
    """A restarted MQTT worker asks for the outcome of a request it may have missed."""

    command_id: str


class ExecResult(Msg, tag="result"):
    command_id: str
    action: str | None
    known: bool  # False: the supervisor has no record of this request
    ok: bool = False
    mock: bool = False
    error_code: str | None = None
    error_message: str | None = None


class TreeStatus(Msg, tag="tree"):
    """The supervisor's view of its workers, for the health payload."""

    workers: dict[str, str]
    restarts: dict[str, int]


Message = (
    Hello
    | Heartbeat
    | LogRecord
    | HealthReport
    | BrokerStatus
    | ExecRequest
    | ExecQuery
    | ExecResult
    | TreeStatus
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class BadFrame(ValueError):
    """A frame that is not a valid message; the receiver logs and drops it."""


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


def decode(frame: bytes) -> Msg:
    if len(frame) > MAX_FRAME_BYTES:
        raise BadFrame(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        return _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadFrame(str(exc)) from None
