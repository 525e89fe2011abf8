"""The supervisor's client for the root helper (standard library only).

`call_helper` makes one request over the helper's Unix socket and maps every outcome onto the
ack error codes of CONTRACT.md. It blocks (the supervisor calls it from a worker thread) but
never for longer than `timeout_s` in total: connect, send and the answer share one deadline.

    socket missing / refused / not permitted   -> helper_unavailable
    no complete answer before the deadline     -> helper_timeout
    helper answered busy                       -> busy
    helper answered exec_failed / exec_timeout -> execution_failed  (helper's detail in message)
    any other helper refusal                   -> helper_rejected   ("<helper code>: <detail>")
    garbage, oversize or no answer at all      -> helper_rejected
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from infoscreen.helper import protocol

_EXECUTION_CODES = frozenset(("exec_failed", "exec_timeout"))


@dataclass(frozen=True)
class HelperOutcome:
    ok: bool
    mock: bool
    error_code: str | None
    error_message: str | None


def _fail(code: str, message: str) -> HelperOutcome:
    return HelperOutcome(False, False, code, message[: protocol.MAX_MESSAGE + 40])


def _map_answer(answer: dict) -> HelperOutcome:
    if answer["ok"]:
        return HelperOutcome(True, answer["mock"], None, None)
    code, detail = answer["error_code"], answer["error_message"] or ""
    if code == "busy":
        return HelperOutcome(False, answer["mock"], "busy", detail or "helper busy")
    if code in _EXECUTION_CODES:
        return HelperOutcome(False, answer["mock"], "execution_failed", f"{code}: {detail}")
    return HelperOutcome(False, answer["mock"], "helper_rejected", f"{code}: {detail}")


def call_helper(socket_path: str, action: str, command_id: str, timeout_s: float) -> HelperOutcome:
    """One request to the helper. Never raises for I/O or protocol trouble; never takes
    longer than timeout_s."""
    deadline = time.monotonic() + timeout_s
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if timeout_s <= 0:
            return _fail("helper_timeout", "no time left to call the helper")
        sock.settimeout(timeout_s)
        try:
            sock.connect(socket_path)
        except socket.timeout:   # listen backlog full: the helper is alive but not accepting
            return _fail("helper_timeout", "connect to helper timed out")
        except OSError as exc:   # ENOENT, ECONNREFUSED, EACCES, ENOTDIR...
            reason = exc.strerror or exc
            return _fail("helper_unavailable", f"helper socket {socket_path}: {reason}")
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(protocol.encode_request(action, command_id))
            sock.shutdown(socket.SHUT_WR)   # end of frame
            data = protocol.read_frame(sock, deadline)
        except socket.timeout:
            return _fail("helper_timeout", f"no answer from helper within {timeout_s:g} s")
        except protocol.ProtocolError:
            return _fail("helper_rejected", "helper answer too large")
        except OSError as exc:   # EPIPE/ECONNRESET: the helper closed without answering
            return _fail("helper_rejected", f"helper closed the connection: {exc.strerror or exc}")
        if not data:
            return _fail("helper_rejected", "helper closed the connection without an answer")
        try:
            answer = protocol.decode_response(data)
        except protocol.ProtocolError:
            return _fail("helper_rejected", "malformed answer from helper")
        if answer["command_id"] not in (None, command_id):
            return _fail("helper_rejected", "helper answered for another command_id")
        return _map_answer(answer)
    finally:
        sock.close()
