"""The one rule for identifiers on the wire (command ids, device uuids).

A UUID in its RFC 4122 string form: 8-4-4-4-12 hexadecimal digits with hyphens, in either case.
Other spellings Python's uuid module would also read (32 digits without hyphens, braces, a
``urn:uuid:`` prefix) are refused: the server never sends them, and the helper, which applies
the same rule (its standard-library copy, tied to this one by a test), would refuse them later.
Two spellings of one id differing only in case are the same command (the key is lower case).
"""

from __future__ import annotations

import re

UUID_PATTERN = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_UUID = re.compile(UUID_PATTERN)


def is_uuid(value: object) -> bool:
    return isinstance(value, str) and _UUID.fullmatch(value) is not None


def is_canonical_uuid(value: object) -> bool:
    """The lower-case form device identities must use (their topics are spelled with it)."""
    return is_uuid(value) and value == value.lower()  # type: ignore[union-attr]


def command_key(command_id: str) -> str:
    return command_id.lower()
