"""The supervisor's client for the root helper.

`call_helper` makes one request over the helper's Unix socket and maps every outcome onto the
ack error codes (docs/server-integration.md). It carries the command's MQTT payload bytes and its
`signature` property unchanged: the helper alone verifies them. It blocks (the supervisor calls it from a worker thread) but
never for longer than `timeout_s` in total: connect, send and the answer share one deadline.

    socket missing / refused / not permitted   -> helper_unavailable
    listen backlog full (EAGAIN, no waiting)   -> helper_unavailable
    socket served by a process not root        -> helper_unavailable  (nothing is sent)
    no complete answer before the deadline     -> helper_timeout
    helper answered busy                       -> busy
    helper answered signature_invalid          -> signature_invalid
    helper answered exec_failed / exec_timeout -> execution_failed  (helper's detail in message)
    any other helper refusal                   -> helper_rejected   ("<helper code>: <detail>")
    garbage, oversize or no answer at all      -> helper_rejected
"""
from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from dataclasses import dataclass

from infoscreen.helper import protocol
from infoscreen.wire.schema import ErrorCode

# The helper's own codes (its standard-library table, protocol.ERRORS; tests/wire ties them):
# two of them are ack codes of the same name and pass through, two mean the execution failed.
_SAME_NAME = frozenset((ErrorCode.BUSY.value, ErrorCode.SIGNATURE_INVALID.value))
_EXECUTION_CODES = frozenset(("exec_failed", "exec_timeout"))
_RESPONSE_KEYS = frozenset(("v", "ok", "command_id", "mock", "error_code", "error_message"))


@dataclass(frozen=True)
class HelperOutcome:
    ok: bool
    mock: bool
    error_code: str | None
    error_message: str | None


def _fail(code: ErrorCode, message: str) -> HelperOutcome:
    return HelperOutcome(False, False, code.value, message[: protocol.MAX_MESSAGE + 40])


def encode_request(action: str, command_id: str, payload: bytes, signature: str | None) -> bytes:
    return json.dumps({"v": protocol.VERSION, "action": action, "command_id": command_id,
                       "payload": base64.b64encode(payload).decode("ascii"),
                       "signature": signature}).encode()


def decode_response(data: bytes) -> dict:
    """Return the validated answer or raise protocol.ProtocolError: as strict as the helper."""
    obj = protocol.load_object(data)
    if (
        set(obj) != _RESPONSE_KEYS
        or type(obj["v"]) is not int
        or obj["v"] != protocol.VERSION
        or type(obj["ok"]) is not bool
        or type(obj["mock"]) is not bool
        or any(obj[k] is not None and not isinstance(obj[k], str) for k in ("command_id", "error_code", "error_message"))
        or obj["ok"] == (obj["error_code"] is not None)
    ):
        raise protocol.ProtocolError("bad_request", "malformed response")
    return obj


def _peer_uid(sock: socket.socket) -> int:
    """The uid of the process that listens on the socket (the kernel's record), -1 if unknown."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return -1
    return struct.unpack("3i", creds)[1]


def _map_answer(answer: dict) -> HelperOutcome:
    if answer["ok"]:
        return HelperOutcome(True, answer["mock"], None, None)
    code, detail = answer["error_code"], answer["error_message"] or ""
    if code in _SAME_NAME:  # the ack codes of the same name
        return HelperOutcome(False, answer["mock"], ErrorCode(code).value, detail or code)
    if code in _EXECUTION_CODES:
        return HelperOutcome(False, answer["mock"], ErrorCode.EXECUTION_FAILED.value, f"{code}: {detail}")
    return HelperOutcome(False, answer["mock"], ErrorCode.HELPER_REJECTED.value, f"{code}: {detail}")


def call_helper(socket_path: str, action: str, command_id: str, timeout_s: float, payload: bytes,
                signature: str | None) -> HelperOutcome:
    """One request to the helper. Never raises for I/O or protocol trouble; never takes
    longer than timeout_s."""
    deadline = time.monotonic() + timeout_s
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if timeout_s <= 0:
            return _fail(ErrorCode.HELPER_TIMEOUT, "no time left to call the helper")
        sock.settimeout(timeout_s)
        try:
            sock.connect(socket_path)
        except socket.timeout:   # kept for safety: AF_UNIX does not wait in connect()
            return _fail(ErrorCode.HELPER_TIMEOUT, "connect to helper timed out")
        except OSError as exc:   # ENOENT, ECONNREFUSED, EACCES, ENOTDIR; a full backlog: EAGAIN
            reason = exc.strerror or exc
            return _fail(ErrorCode.HELPER_UNAVAILABLE, f"helper socket {socket_path}: {reason}")
        # Fail closed before sending anything: only a root process (the helper) may answer. A
        # process with our own uid is accepted too (development runs): it could act as us anyway.
        uid = _peer_uid(sock)
        if uid not in (0, os.geteuid()):
            return _fail(ErrorCode.HELPER_UNAVAILABLE, f"helper socket {socket_path} is served by uid {uid}, not root")
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                sock.sendall(encode_request(action, command_id, payload, signature))
                sock.shutdown(socket.SHUT_WR)   # end of frame
            except (BrokenPipeError, ConnectionResetError):
                pass   # it answered before reading (a refused peer) and closed: read that answer
            data = protocol.read_frame(sock, deadline)
        except socket.timeout:
            return _fail(ErrorCode.HELPER_TIMEOUT, f"no answer from helper within {timeout_s:g} s")
        except protocol.ProtocolError:
            return _fail(ErrorCode.HELPER_REJECTED, "helper answer too large")
        except OSError as exc:   # EPIPE/ECONNRESET: the helper closed without answering
            return _fail(ErrorCode.HELPER_REJECTED, f"helper closed the connection: {exc.strerror or exc}")
        if not data:
            return _fail(ErrorCode.HELPER_REJECTED, "helper closed the connection without an answer")
        try:
            answer = decode_response(data)
        except protocol.ProtocolError:
            return _fail(ErrorCode.HELPER_REJECTED, "malformed answer from helper")
        if answer["command_id"] not in (None, command_id):
            return _fail(ErrorCode.HELPER_REJECTED, "helper answered for another command_id")
        return _map_answer(answer)
    finally:
        sock.close()
