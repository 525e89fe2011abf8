"""Signed power commands: the per-device command key and the `signature` user property.

The server (and `infoscreenctl send`) signs the command payload bytes exactly as published;
only the root helper verifies (its own standard-library copy of these rules, tied to this one
by tests/helper/test_signing_rules.py). See docs/server-integration.md, "Signed power commands".
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets

SIGNATURE_PROPERTY = "signature"  # the MQTT 5 user property on the command's PUBLISH
SCHEME = "hmac-sha256="
KEY_BYTES = 32
KEY_FILE_MAX = 2 * KEY_BYTES + 1  # 64 lower-case hex characters, an optional newline
_KEY_TEXT = re.compile(r"[0-9a-f]{64}\n?")
_SIGNATURE = re.compile(r"hmac-sha256=[0-9a-f]{64}")


class BadKey(ValueError):
    """A key file that is not 64 lower-case hex characters (and an optional newline)."""


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def key_text(key: bytes) -> str:
    """The key file's content: 64 lower-case hex characters and a newline."""
    if len(key) != KEY_BYTES:
        raise BadKey(f"a command key is {KEY_BYTES} bytes")
    return key.hex() + "\n"


def parse_key(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise BadKey("not 64 lower-case hex characters") from None
    if not _KEY_TEXT.fullmatch(text):
        raise BadKey("not 64 lower-case hex characters")
    return bytes.fromhex(text[:64])


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as f:
        return parse_key(f.read(KEY_FILE_MAX + 1))


def sign(key: bytes, payload: bytes) -> str:
    """The `signature` property value for these payload bytes."""
    return SCHEME + hmac.new(key, payload, hashlib.sha256).hexdigest()


def well_formed(signature: str | None) -> bool:
    """The shape only (the helper alone decides whether it is right)."""
    return signature is not None and _SIGNATURE.fullmatch(signature) is not None
