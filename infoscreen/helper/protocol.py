"""Wire protocol between the supervisor and the root helper. Standard library only.

One request per Unix stream connection, at most MAX_FRAME bytes each way:
  client -> helper  {"v": 1, "action": "reboot_host"|"shutdown_host", "command_id": "<uuid>"}
                    then shutdown(SHUT_WR): that EOF ends the frame.
  helper -> client  {"v": 1, "ok": bool, "command_id": str|null, "mock": bool,
                     "error_code": str|null, "error_message": str|null}, then close.
Decoding is strict on purpose (fail closed): a UTF-8 JSON object with exactly these keys and
types, no duplicate keys, a canonical UUID. Anything else is `bad_request`.
"""
import json, socket, time, uuid

VERSION, MAX_FRAME, MAX_MESSAGE = 1, 4096, 200   # MAX_MESSAGE: error_message is cut there
ACTIONS = ("reboot_host", "shutdown_host")
# The one error table (also in docs/security.md). ok=false always carries one of these.
ERRORS = {
    "peer_not_allowed": "SO_PEERCRED uid/gid of the caller is neither root nor allow-listed",
    "bad_request": "non-JSON, wrong types, unknown/missing fields, oversize, truncated, late",
    "unsupported_action": "well-formed request naming an action outside the fixed table",
    "busy": "another power action holds the lock (through its grace period and execution)",
    "rate_limited": "reboot-loop breaker: the per-hour limit of power actions is reached",
    "exec_failed": "the pre-flight `systemctl --dry-run` failed (exit status in message)",
    "exec_timeout": "the pre-flight check did not finish within its time bound",
    "internal_error": "the helper could not complete the request safely (e.g. state write)",
}
REQUEST_KEYS = frozenset(("v", "action", "command_id"))
RESPONSE_KEYS = frozenset(("v", "ok", "command_id", "mock", "error_code", "error_message"))

class ProtocolError(Exception):
    def __init__(self, code, message, command_id=None):
        super().__init__(message)
        self.code, self.message, self.command_id = code, message, command_id

def _strict_pairs(pairs):
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("duplicate key")
    return dict(pairs)

def _no_constants(name):
    raise ValueError("not JSON: " + name)

def _load_object(data):
    if len(data) > MAX_FRAME:
        raise ProtocolError("bad_request", "frame larger than %d bytes" % MAX_FRAME)
    try:   # parse_constant: NaN/Infinity are not JSON; RecursionError: deep nesting
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_strict_pairs,
                         parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("bad_request", "not JSON: " + type(exc).__name__) from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "not a JSON object")
    return obj

def is_uuid(value):
    try:
        return (isinstance(value, str) and len(value) == 36
                and str(uuid.UUID(value)) == value.lower())
    except ValueError:
        return False

def encode_request(action, command_id):
    return json.dumps({"v": VERSION, "action": action, "command_id": command_id}).encode()

def decode_request(data):
    """Return (action, command_id) or raise ProtocolError."""
    obj = _load_object(data)
    if set(obj) != REQUEST_KEYS or type(obj["v"]) is not int or obj["v"] != VERSION:
        raise ProtocolError("bad_request", "keys must be exactly v=1, action, command_id")
    action, command_id = obj["action"], obj["command_id"]
    if not is_uuid(command_id):
        raise ProtocolError("bad_request", "command_id must be a UUID string")
    if not isinstance(action, str):
        raise ProtocolError("bad_request", "action must be a string", command_id)
    if action not in ACTIONS:
        raise ProtocolError("unsupported_action", "unknown action", command_id)
    return action, command_id

def encode_response(ok, command_id=None, mock=False, error_code=None, error_message=None):
    message = None if error_message is None else str(error_message)[:MAX_MESSAGE]
    return json.dumps({"v": VERSION, "ok": bool(ok), "command_id": command_id, "mock": bool(mock),
                       "error_code": error_code, "error_message": message}).encode()

def decode_response(data):
    """Return the validated response dict or raise ProtocolError (client side)."""
    obj = _load_object(data)
    if (set(obj) != RESPONSE_KEYS or type(obj["v"]) is not int or obj["v"] != VERSION
            or type(obj["ok"]) is not bool or type(obj["mock"]) is not bool
            or any(obj[k] is not None and not isinstance(obj[k], str)
                   for k in ("command_id", "error_code", "error_message"))
            or obj["ok"] == (obj["error_code"] is not None)):
        raise ProtocolError("bad_request", "malformed response")
    return obj

def read_frame(sock, deadline, limit=MAX_FRAME):
    """Read until EOF, at most `limit` bytes, before the monotonic `deadline`.
    Raises ProtocolError("bad_request") past `limit`, socket.timeout past the deadline."""
    chunks, size = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("read deadline")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(limit + 1 - size)
        except ConnectionResetError:
            # AF_UNIX: a peer that closes with our bytes unread gives ECONNRESET after its
            # data. What was received is the frame; nothing received stays an error.
            if not chunks:
                raise
            chunk = b""
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ProtocolError("bad_request", "frame larger than %d bytes" % limit)
