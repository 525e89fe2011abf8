"""Validation of an inbound command against the contract (docs/server-integration.md), mapping each defect to its code.

Pure and total: :func:`validate` never raises, whatever the bytes. It returns either a
:class:`Command` (valid as far as the payload alone can tell; expiry is judged by the
clock module) or a :class:`Rejection` whose ``command_id`` is None when no command id can
be read (then no ack is possible: the caller logs it and publishes on ``logs/warn``).

Order of checks (the first defect found decides the code):

1. size (> 64 KiB), UTF-8, JSON, a JSON object -> no readable command_id: no ack
2. ``command_id``: a string of 1..64 printable characters, else no ack; then a payload
   over MAX_COMMAND_BYTES (4 KiB) or a command_id that is not a UUID in its 8-4-4-4-12 form
   (wire/ids.py, the helper's rule too) -> ``invalid_payload``
3. ``schema_version`` present: a string whose major is 1 (``"1"``, ``"1.0"``, ``"1.7"``),
   else ``unsupported_schema`` (a string of another major) or ``invalid_payload`` (not a
   string, or not a version)
4. ``client_uuid`` present: a string, else ``invalid_payload``; not ours -> ``target_mismatch``
5. field types (msgspec): ``action`` and ``expires_at`` required strings; ``issued_at``,
   ``reason``, ``requested_by`` optional strings (bounded) -> ``invalid_payload``
6. ``action`` not reboot_host/shutdown_host -> ``unsupported_action``
7. ``expires_at``/``issued_at`` not RFC 3339 with a zone, or ``issued_at`` after
   ``expires_at`` (the payload's own timestamps disagree) -> ``invalid_payload``
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from ...wire import ids
from ...wire.schema import ACTIONS, MAX_COMMAND_BYTES, ErrorCode, parse_rfc3339

MAX_ID_LEN = 64
MAX_PARSE_BYTES = 64 * 1024  # larger than the broker's message_size_limit: never parsed
_Text = Annotated[str, msgspec.Meta(max_length=256)]
_Stamp = Annotated[str, msgspec.Meta(max_length=64)]


class _Typed(msgspec.Struct, forbid_unknown_fields=False):
    action: Annotated[str, msgspec.Meta(max_length=64)]
    expires_at: _Stamp
    issued_at: _Stamp | None = None
    reason: _Text | None = None
    requested_by: _Text | None = None


class Command(msgspec.Struct, frozen=True):
    command_id: str  # as the server sent it (echoed in every ack)
    action: str
    expires_at: float
    issued_at: float | None = None
    reason: str | None = None
    requested_by: str | None = None

    @property
    def key(self) -> str:
        return self.command_id.lower()


class Rejection(msgspec.Struct, frozen=True):
    command_id: str | None
    error_code: str | None  # None when command_id is None
    error_message: str

    @property
    def key(self) -> str | None:
        return self.command_id.lower() if self.command_id is not None else None


def _short(value: object, n: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def readable_command_id(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LEN and value.isprintable():
        return value
    return None


def _schema_major(value: str) -> int | None:
    head = value.strip().split(".", 1)[0]
    if not head.isdigit() or len(head) > 6:
        return None
    return int(head)


def validate(payload: bytes, our_uuid: str) -> Command | Rejection:
    try:
        return _validate(payload, our_uuid)
    except Exception as exc:  # noqa: BLE001 - total by construction; a bug must not crash
        return Rejection(None, None, f"validation error: {exc.__class__.__name__}")


def _validate(payload: bytes, our_uuid: str) -> Command | Rejection:
    too_big = len(payload) > MAX_COMMAND_BYTES
    if len(payload) > MAX_PARSE_BYTES:
        return Rejection(None, None, f"payload of {len(payload)} bytes exceeds {MAX_COMMAND_BYTES}")
    try:
        obj = msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        return Rejection(None, None, f"not JSON: {str(exc)[:120]}")
    if not isinstance(obj, dict):
        return Rejection(None, None, f"not a JSON object but {type(obj).__name__}")
    cid = readable_command_id(obj.get("command_id"))
    if cid is None:
        if "command_id" not in obj:
            return Rejection(None, None, "no command_id")
        return Rejection(None, None, f"command_id is not readable: {_short(obj.get('command_id'))}")

    def fail(code: ErrorCode, message: str) -> Rejection:
        return Rejection(cid, code.value, message[:300])

    if too_big:
        return fail(ErrorCode.INVALID_PAYLOAD, f"payload of {len(payload)} bytes exceeds {MAX_COMMAND_BYTES}")

    if not ids.is_uuid(cid):
        return fail(ErrorCode.INVALID_PAYLOAD, f"command_id {_short(cid)} is not a UUID (8-4-4-4-12 hex digits)")

    if "schema_version" in obj and obj["schema_version"] is not None:
        sv = obj["schema_version"]
        if not isinstance(sv, str):
            return fail(ErrorCode.INVALID_PAYLOAD, f"schema_version must be a string like \"1.0\", got {_short(sv)}")
        major = _schema_major(sv)
        if major is None:
            return fail(ErrorCode.INVALID_PAYLOAD, f"schema_version {_short(sv)} is not a version")
        if major != 1:
            return fail(ErrorCode.UNSUPPORTED_SCHEMA, f"schema_version {_short(sv)}: this client speaks major version 1")

    if "client_uuid" in obj and obj["client_uuid"] is not None:
        target = obj["client_uuid"]
        if not isinstance(target, str):
            return fail(ErrorCode.INVALID_PAYLOAD, f"client_uuid must be a string, got {_short(target)}")
        if target.lower() != our_uuid.lower():
            return fail(ErrorCode.TARGET_MISMATCH, f"client_uuid {_short(target, 48)} is not this client ({our_uuid})")

    try:
        typed = msgspec.convert(obj, _Typed)
    except msgspec.ValidationError as exc:
        return fail(ErrorCode.INVALID_PAYLOAD, str(exc))

    if typed.action not in ACTIONS:
        return fail(ErrorCode.UNSUPPORTED_ACTION,
                    f"action {_short(typed.action)} is not one of {', '.join(sorted(ACTIONS))}")
    try:
        expires = parse_rfc3339(typed.expires_at)
    except (ValueError, OverflowError, OSError):
        return fail(ErrorCode.INVALID_PAYLOAD, f"expires_at {_short(typed.expires_at)} is not an RFC 3339 timestamp with a zone")
    issued = None
    if typed.issued_at is not None:
        try:
            issued = parse_rfc3339(typed.issued_at)
        except (ValueError, OverflowError, OSError):
            return fail(ErrorCode.INVALID_PAYLOAD, f"issued_at {_short(typed.issued_at)} is not an RFC 3339 timestamp with a zone")
        if issued > expires:
            return fail(ErrorCode.INVALID_PAYLOAD, f"issued_at {_short(typed.issued_at)} is after expires_at "
                        f"{_short(typed.expires_at)}")
    return Command(cid, typed.action, expires, issued, typed.reason, typed.requested_by)
