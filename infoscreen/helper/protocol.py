"""Wire protocol of the root helper (docs/security.md, "Protocol"); the client's decoder of
answers is in helper_client.py. One request per Unix stream connection, <= MAX_FRAME bytes each
way: {"v": 2, "action": "reboot_host"|"shutdown_host", "command_id": "<uuid>", "payload":
"<base64 of the command's MQTT payload>", "signature": "hmac-sha256=<hex>"|null}, then the client
half-closes; answer {"v", "ok", "command_id", "mock", "error_code", "error_message"}, close."""
import base64, binascii, json, re, socket, time

VERSION, MAX_FRAME, MAX_PAYLOAD, MAX_MESSAGE = 2, 8192, 4096, 200
ACTIONS = ("reboot_host", "shutdown_host")
# The one error table; when each is given: docs/security.md, "Error table".
ERRORS = ("peer_not_allowed", "bad_request", "unsupported_action", "busy", "rate_limited", "exec_failed",
          "exec_timeout", "internal_error", "signature_invalid", "replayed", "expired")
# The client's command id rule (wire/ids.py; a test ties the two): 8-4-4-4-12 hex, either case.
COMMAND_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
SIGNATURE = re.compile(r"hmac-sha256=[0-9a-f]{64}")

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

def load_object(data):
    """Strict on purpose (fail closed): one UTF-8 JSON object, no duplicate keys, no NaN."""
    if len(data) > MAX_FRAME:
        raise ProtocolError("bad_request", "frame larger than %d bytes" % MAX_FRAME)
    try:   # RecursionError: deep nesting
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_strict_pairs,
                         parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("bad_request", "not JSON: " + type(exc).__name__) from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "not a JSON object")
    return obj

def decode_request(data):
    """Return (action, command_id, payload bytes, signature or None) or raise ProtocolError."""
    obj = load_object(data)
    if (set(obj) != {"v", "action", "command_id", "payload", "signature"}
            or type(obj["v"]) is not int or obj["v"] != VERSION):
        raise ProtocolError("bad_request", "keys must be exactly v=2, action, command_id, "
                            "payload, signature")
    action, command_id, sig = obj["action"], obj["command_id"], obj["signature"]
    if not (isinstance(command_id, str) and COMMAND_ID.fullmatch(command_id)):
        raise ProtocolError("bad_request", "command_id must be a UUID string")
    if not isinstance(action, str):
        raise ProtocolError("bad_request", "action must be a string", command_id)
    if action not in ACTIONS:
        raise ProtocolError("unsupported_action", "unknown action", command_id)
    try:
        payload = base64.b64decode(obj["payload"], validate=True)
    except (TypeError, ValueError, binascii.Error):
        raise ProtocolError("bad_request", "payload must be base64", command_id) from None
    if len(payload) > MAX_PAYLOAD or not (sig is None or isinstance(sig, str)):   # b64: < MAX_FRAME
        raise ProtocolError("bad_request", "payload too large or signature not a string", command_id)
    return action, command_id, payload, sig

def encode_response(ok, command_id=None, mock=False, error_code=None, error_message=None):
    message = None if error_message is None else str(error_message)[:MAX_MESSAGE]
    return json.dumps({"v": VERSION, "ok": bool(ok), "command_id": command_id, "mock": bool(mock),
                       "error_code": error_code, "error_message": message}).encode()

def read_frame(sock, deadline, limit=MAX_FRAME):
    """Read until EOF: `limit` bytes at most (bad_request), before `deadline` (socket.timeout)."""
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
